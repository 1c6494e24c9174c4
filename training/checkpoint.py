"""Checkpoints: atomic, pruned to the last K plus the best, loadable by open_clip.

A checkpoint is a superset of OpenCLIP's format ("epoch", "name", "state_dict",
"optimizer", "scaler"), so `open_clip.create_model_and_transforms(name,
pretrained=path)` loads it, once `open_clip.add_model_config(OUT/model)` has
registered the config that "name" refers to (training writes it there; with
--siglip it is NAME-sigmoid, the config plus SigLIP's logit bias). The rest is what an exact resume needs: the global step,
the data position of every rank, the resolved config, RNG states and library
versions. Everything is plain tensors and Python containers, so loading works
with `torch.load(weights_only=True)`, the only way clipforge loads a checkpoint: a
file whose pickle would build other objects (run code) is refused as untrusted.

Only regular files named `step_XXXXXXXX.pt` are checkpoints; pruning deletes only
those, never through a symbolic link.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch

from pipeline.shards import atomic_write_json
from training.errors import RunFailed, TrainError
from training.storage import STORE_ERRORS, Loc

log = logging.getLogger(__name__)

CKPT_RE = re.compile(r"^step_(\d{8})\.pt$")
BEST_FILE = "best.json"
FORMAT_VERSION = 1
UNREADABLE_SUFFIX = ".unreadable"
"""An unreadable checkpoint a resume went past is renamed NAME.unreadable: kept for a look, out of the way."""
TMP_RE = re.compile(r"^\.step_\d{8}\.pt\.tmp-\d+-[0-9a-f]{8}$")
"""Temporaries of save_checkpoint (a killed save leaves one behind)."""

# Settings whose change alters the data stream or the meaning of a step: refuse to resume across them.
# The model and the data are compared by content (check_resumable), not by these path strings.
RESUME_INVARIANTS = {
    ("run", "world_size"): "world size (number of processes)",
    ("data", "batch_size"): "--batch-size",
    ("optim", "accum_freq"): "--accum-freq",
    ("data", "workers"): "--workers (data order depends on it)",
    ("run", "seed"): "--seed",
    ("model", "siglip"): "--siglip (the model gains a logit bias)",
    # Steps per epoch follow from it: a position inside an epoch means nothing under another length.
    ("data", "samples_per_epoch"): "samples per epoch (--train-num-samples, else sizes.json)",
    ("data", "shuffle_buffer"): "--shuffle-buffer (data order depends on it)",
    ("data", "shuffle_initial"): "--shuffle-initial (data order depends on it)",
}


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def step_of(path: Path | Loc) -> int:
    return int(CKPT_RE.match(path.name)[1])


def list_checkpoints(ckpt_dir: str | Path | Loc) -> list[Loc]:
    """step_XXXXXXXX.pt regular files, oldest first (a link with such a name is not one of ours).
    Only finished names: an upload in progress has a temporary name (Loc.put), never one of these."""
    d = Loc.of(ckpt_dir)
    if d.local:
        if not os.path.isdir(d.path) or os.path.islink(d.path):
            return []
        names = [e.name for e in os.scandir(d.path) if CKPT_RE.match(e.name) and e.is_file(follow_symlinks=False)]
    else:
        try:
            entries = d.fs.ls(d.path, detail=True)
        except FileNotFoundError:
            return []
        names = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "file"]
        names = [n for n in names if CKPT_RE.match(n)]
    return [d / n for n in sorted(names)]


def find_latest(ckpt_dir: str | Path | Loc) -> Loc | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def read_best(ckpt_dir: str | Path | Loc) -> dict[str, Any] | None:
    path = Loc.of(ckpt_dir) / BEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def all_finite(tensors: Any) -> bool:
    """True if every floating-point tensor in a (nested) state dict is finite."""
    if isinstance(tensors, torch.Tensor):
        return not tensors.is_floating_point() or bool(torch.isfinite(tensors).all())
    if isinstance(tensors, dict):
        return all(all_finite(v) for v in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return all(all_finite(v) for v in tensors)
    return True


def save_checkpoint(ckpt_dir: str | Path | Loc, step: int, payload: dict[str, Any], keep_last: int,
                    score: tuple[str, float] | None = None) -> Loc:
    """Write step_XXXXXXXX.pt atomically, update best.json, prune all but last K and best.

    Locally through a temporary file in the folder, renamed into place; on object storage
    through a local temporary file, uploaded to a temporary key and moved onto the final one
    (Loc.put). A payload with a non-finite weight is a bug of the caller (the trainer stops
    before it saves one): refused here too, so no NaN model is ever published or ranked."""
    if not (all_finite(payload["state_dict"]) and all_finite(payload.get("optimizer"))):
        raise RunFailed(f"step {step}: the model's weights or optimizer state are not finite; not saved")
    ckpt_dir = Loc.of(ckpt_dir)
    path = ckpt_dir / checkpoint_name(step)
    if ckpt_dir.local:
        tmp = f"{ckpt_dir.path}/.{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    else:
        fd, tmp = tempfile.mkstemp(prefix="clipforge-", suffix=f"-{path.name}")
        os.close(fd)
    try:
        ckpt_dir.mkdir()
        torch.save(payload, tmp)
        # Read back before publishing: a checkpoint that weights_only loading rejects is no checkpoint.
        torch.load(tmp, map_location="cpu", weights_only=True, mmap=True)
        if ckpt_dir.local:
            os.replace(tmp, path.path)  # atomic on POSIX: readers see the old file or the new one
        else:
            path.put(tmp)
    except (*STORE_ERRORS, RuntimeError) as exc:
        # torch.save reports an unwritable folder as "[enforce fail at inline_container.cc] open file
        # failed", without the path: name it.
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0][:160]
        raise RunFailed(f"{path}: cannot write the checkpoint ({reason}); the previous checkpoints are intact") \
            from exc
    finally:
        Path(tmp).unlink(missing_ok=True)
    best = read_best(ckpt_dir)
    if score is not None and (best is None or score[1] > best["value"] or best["file"] == path.name):
        best = {"file": path.name, "step": step, "metric": score[0], "value": score[1]}
        atomic_write_json(ckpt_dir.fs, (ckpt_dir / BEST_FILE).path, best)
    keep = {p.name for p in list_checkpoints(ckpt_dir)[-keep_last:]}
    if best is not None:
        keep.add(best["file"])
    for old in list_checkpoints(ckpt_dir):
        if old.name not in keep:
            old.unlink()
    return path


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def _load_problem(path: Path | Loc, exc: BaseException) -> str:
    """One line on why torch.load(weights_only=True) refused a file."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "weights only" in text.lower():
        # torch's own message goes on to advise weights_only=False: the wrong advice for a file
        # of unknown origin, which may run code when unpickled that way. Never repeated here.
        m = _GLOBAL_RE.search(text)
        what = f"it would call {m[1]}" if m else "it holds objects other than tensors and plain containers"
        return (f"untrusted content, not loaded: {what} when unpickled, which a checkpoint never needs; "
                "clipforge loads only weights (weights_only=True). Do not load this file with pickle")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"unreadable ({type(exc).__name__}: {first[:160]}); truncated, or not a torch checkpoint"


def load_checkpoint(path: str | Path | Loc, mmap: bool = False) -> dict[str, Any]:
    """A clipforge checkpoint (a local path or a URL), loaded with weights_only=True; TrainError (one
    line) if it is not one. One on object storage is downloaded to a temporary file first."""
    path = Loc.of(path, "--resume")
    if not path.is_file():
        raise TrainError(f"{path}: checkpoint not found")
    try:
        with path.local_copy() as local:
            ckpt = torch.load(local, map_location="cpu", weights_only=True, mmap=mmap and path.local)
    except Exception as exc:  # truncated, not a torch file, or unsafe content
        raise TrainError(f"{path}: {_load_problem(path, exc)}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_VERSION or "data" not in ckpt:
        raise TrainError(f"{path}: not a clipforge checkpoint of format {FORMAT_VERSION}; "
                         "use it as --pretrained to start a new run from its weights")
    return ckpt


def unreadable(path: str | Path | Loc) -> str | None:
    """Why a checkpoint cannot be resumed from (None if it can); memory-mapped where local, so cheap."""
    try:
        load_checkpoint(path, mmap=True)
    except TrainError as exc:
        return str(exc)
    return None


def newest_readable(ckpt_dir: str | Path | Loc) -> tuple[Loc | None, dict[str, Any] | None, list[tuple[Loc, str]]]:
    """The newest checkpoint that loads, the checkpoint itself, and each newer one passed over with why."""
    skipped = []
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return path, load_checkpoint(path), skipped
        except TrainError as exc:
            skipped.append((path, str(exc)))
    return None, None, skipped


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out |= _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def dict_changes(old: dict[str, Any], new: dict[str, Any], limit: int = 4) -> str:
    """'a.b: 1 -> 2, c: absent -> 3' for the keys that differ (nested keys dotted)."""
    a, b = _flatten(json.loads(json.dumps(old))), _flatten(json.loads(json.dumps(new)))
    missing = object()
    diffs = [f"{k}: {a.get(k, 'absent')} -> {b.get(k, 'absent')}" for k in sorted(set(a) | set(b))
             if a.get(k, missing) != b.get(k, missing)]
    return ", ".join(diffs[:limit]) + (f" (+{len(diffs) - limit} more)" if len(diffs) > limit else "")


def _model_stem(model: str) -> str:
    return Path(model).stem if model.endswith(".json") else model


def _normalised_spec(spec: str) -> str:
    return "::".join(os.path.normpath(s.strip()) for s in spec.split("::") if s.strip())


def check_resumable(saved: dict[str, Any], current: dict[str, Any], path: Path | Loc) -> None:
    """Refuse to resume when a setting changed that the data position or the weights depend on."""
    changes = []
    for (section, key), label in RESUME_INVARIANTS.items():
        if key not in saved.get(section, {}):
            continue  # recorded only by later versions (samples_per_epoch): nothing to compare against
        old, new = saved[section][key], current.get(section, {}).get(key)
        if old != new:
            changes.append(f"{label}: {old} -> {new}")
    s_model, c_model = saved.get("model", {}), current.get("model", {})
    if "definition" in s_model and "definition" in c_model:
        if s_model["definition"] != c_model["definition"]:
            changes.append(f"model definition: {dict_changes(s_model['definition'], c_model['definition'])}")
    elif _model_stem(str(s_model.get("model"))) != _model_stem(str(c_model.get("model"))):
        changes.append(f"--model: {s_model.get('model')} -> {c_model.get('model')}")
    s_data, c_data = saved.get("data", {}), current.get("data", {})
    if "fingerprint" in s_data and "fingerprint" in c_data:
        # The data by content (each shard's name, size and sizes.json count), not by how its path is spelt.
        old, new = s_data["fingerprint"], c_data["fingerprint"]
        if old != new:
            changes.append(f"--train-data: other data ({old['shards']} shards, {old['bytes']} bytes -> "
                           f"{new['shards']} shards, {new['bytes']} bytes; shard names, sizes or sizes.json "
                           "counts differ)")
    elif _normalised_spec(str(s_data.get("train_data"))) != _normalised_spec(str(c_data.get("train_data"))):
        # A checkpoint of an earlier version records only the spec: compare it normalised.
        changes.append(f"--train-data: {s_data.get('train_data')} -> {c_data.get('train_data')}")
    if changes:
        raise TrainError(f"{path}: cannot resume exactly, changed since the checkpoint: {'; '.join(changes)}. "
                         "Restore these settings, or start a new run with --pretrained pointing at the checkpoint")
