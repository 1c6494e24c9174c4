"""Checkpoints: atomic, pruned to the last K plus the best, loadable by open_clip.

A checkpoint is a superset of OpenCLIP's format ("epoch", "name", "state_dict",
"optimizer", "scaler"), so `open_clip.create_model_and_transforms(name,
pretrained=path)` loads it, once `open_clip.add_model_config(OUT/model)` has
registered the config that "name" refers to (training writes it there; with
--siglip it is NAME-sigmoid, the config plus SigLIP's logit bias). The rest is what an exact resume needs: the global step,
the data position of every rank, the resolved config, RNG states and library
versions. Everything is plain tensors and Python containers, so loading works
with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any

import torch

from pipeline.shards import atomic_write_json, get_fs
from training.errors import TrainError

log = logging.getLogger(__name__)

CKPT_RE = re.compile(r"^step_(\d{8})\.pt$")
BEST_FILE = "best.json"
FORMAT_VERSION = 1

# Settings whose change alters the data stream or the meaning of a step: refuse to resume across them.
RESUME_INVARIANTS = {
    ("run", "world_size"): "world size (number of processes)",
    ("data", "batch_size"): "--batch-size",
    ("optim", "accum_freq"): "--accum-freq",
    ("data", "workers"): "--workers (data order depends on it)",
    ("data", "train_data"): "--train-data",
    ("run", "seed"): "--seed",
    ("model", "model"): "--model",
    ("model", "siglip"): "--siglip (the model gains a logit bias)",
    # Steps per epoch follow from it: a position inside an epoch means nothing under another length.
    ("data", "samples_per_epoch"): "samples per epoch (--train-num-samples, else sizes.json)",
    ("data", "shuffle_buffer"): "--shuffle-buffer (data order depends on it)",
    ("data", "shuffle_initial"): "--shuffle-initial (data order depends on it)",
}


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if CKPT_RE.match(p.name))


def find_latest(ckpt_dir: Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def read_best(ckpt_dir: Path) -> dict[str, Any] | None:
    path = ckpt_dir / BEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def save_checkpoint(ckpt_dir: Path, step: int, payload: dict[str, Any], keep_last: int,
                    score: tuple[str, float] | None = None) -> Path:
    """Write step_XXXXXXXX.pt atomically, update best.json, prune all but last K and best."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / checkpoint_name(step)
    tmp = ckpt_dir / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        torch.save(payload, tmp)
        # Read back before publishing: a checkpoint that weights_only loading rejects is no checkpoint.
        torch.load(tmp, map_location="cpu", weights_only=True, mmap=True)
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    finally:
        tmp.unlink(missing_ok=True)
    best = read_best(ckpt_dir)
    if score is not None and (best is None or score[1] > best["value"] or best["file"] == path.name):
        best = {"file": path.name, "step": step, "metric": score[0], "value": score[1]}
        fs, root = get_fs(str(ckpt_dir))
        atomic_write_json(fs, f"{root}/{BEST_FILE}", best)
    keep = {p.name for p in list_checkpoints(ckpt_dir)[-keep_last:]}
    if best is not None:
        keep.add(best["file"])
    for old in list_checkpoints(ckpt_dir):
        if old.name not in keep:
            old.unlink()
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or unsafe content
        raise TrainError(f"{path}: cannot load checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_VERSION or "data" not in ckpt:
        raise TrainError(f"{path}: not a clipforge checkpoint of format {FORMAT_VERSION}; "
                         "use it as --pretrained to start a new run from its weights")
    return ckpt


def check_resumable(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume when a setting changed that the data position depends on."""
    changes = []
    for (section, key), label in RESUME_INVARIANTS.items():
        if key not in saved.get(section, {}):
            continue  # recorded only by later versions (samples_per_epoch): nothing to compare against
        old, new = saved[section][key], current.get(section, {}).get(key)
        if old != new:
            changes.append(f"{label}: {old} -> {new}")
    if changes:
        raise TrainError(f"{path}: cannot resume exactly, changed since the checkpoint: {'; '.join(changes)}. "
                         "Restore these settings, or start a new run with --pretrained pointing at the checkpoint")
