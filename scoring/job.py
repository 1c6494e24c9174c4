"""CLIP-score filtering of an existing corpus, with the embeddings stored beside the shards.

Steps of the one job layer (pipeline.job), as the audit's (dedup/audit.py):

1. **embed** (one task per input shard, run in a pool of actors that each load the model once,
   pipeline.executor): decode the images in the worker, embed images and captions in batches,
   `clip_score` = cosine of the two L2-normalised embeddings. Writes `_work/STEM.scores.parquet`
   (every sample with its status and score: failed ones with `missing_image`, `missing_txt`,
   `undecodable_image`, `unreadable_json`, `duplicate_key` (the key's second sample in a
   shard) or `bad_key` (one the shard writer cannot write)) and `_work/STEM.npy` (the embeddings of the scored
   samples); returns a histogram of its scores (sparse, `--score-bins` bins over [-1, 1]).
2. The driver merges the histograms (O(tasks x bins) numbers, never a score per sample) and, with
   `--clip-score-top-frac F`, takes the threshold bin: the highest bin k such that the samples in
   bins k and above are at least F of the scored ones. Kept are exactly those samples, so the
   kept count is at least ceil(F x scored) and exceeds it by less than the count of bin k.
3. **settle_scores** (one task per 16 inputs): apply the keep rules (`--clip-score-min X`: score
   >= X; `--clip-score-top-frac F`: bin >= k; both: both) to each input's records; the others are
   dropped as `clip_score_low`. Writes `_work/STEM.kept.parquet`, returns the kept count per input.
4. **write_shards** (pipeline.shards.write_shard_range, as build and audit): shards of the kept
   samples, each sample's json gaining `clip_score`; beside `shards/NNNNN.tar` it writes
   `embeddings/NNNNN.npy` (the same samples in the same order) and the manifests
   (`manifest/STEM.parquet`: MANIFEST_SCHEMA plus `clip_score`).

`score_and_write` runs these steps over any list of inputs: score_corpus's are the shards of an
input corpus (every sample a row), build_corpus --clip-filter's are its download parts with their
settled records (only the rows still kept are scored; the others keep their fate).

The driver writes `shards/sizes.json`, `embeddings/model.json`, and last `score/summary.json`
(the run is complete). A rerun resumes from the steps' markers; one with another corpus, model,
checkpoint (by sha256) or keep rule is refused with what changed.

Embeddings file (`read_embeddings`): one structured numpy array per shard, fields `key` (the
sample key, as in the tar), `image` and `text` (float16, shape (dim,), L2-normalised in float32
before the cast). `np.load(path)["image"]` is an (n, dim) matrix in shard order.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dedup.audit import _decode_json, read_corpus, read_input_shard
from pipeline.build import WriteShardsStep
from pipeline.config import ConfigError
from pipeline.job import AccountingError, Step, TaskContext, run_step
from pipeline.rundir import RUN_FILE, RunDir
from pipeline.sample import DROPPED, FAILED, WRITTEN
from pipeline.shards import (
    IMAGE_EXTS,
    KEY_RE,
    MANIFEST_SCHEMA,
    SIZES_FILE,
    ShardError,
    Source,
    atomic_open,
    atomic_write_json,
    get_fs,
    shard_name,
    write_shard_range,
)
from scoring import EMBEDDINGS_NAMES, WORK_FILES
from scoring.model import Embedder, ModelSpec, ScoreError, resolve_weights

log = logging.getLogger("clipforge.score")

__all__ = ["ScoreConfig", "ScoreError", "read_embeddings", "run_score"]

JOB = "score_corpus"
DROP_REASON = "clip_score_low"
SCORE_SCHEMA = MANIFEST_SCHEMA.append(pa.field("clip_score", pa.float32()))
"""The manifest of this job: build's and audit's columns, and the sample's score (null if it failed)."""
SHARDS_PER_TASK = 8
SETTLE_SHARDS_PER_TASK = 16
EMBEDDINGS_FORMAT = "clipforge-embeddings-1"


@dataclass(kw_only=True)
class ScoreSettings:
    """How samples are scored and which are kept: score_corpus's flags, and build_corpus's --clip-* ones."""

    model: str
    """What the trainer's --model takes: an open_clip model name or path/to/NAME.json."""
    clip_pretrained: str
    """The weights: a checkpoint file or URL (clipforge's trainer's included) or a cached open_clip tag."""
    clip_score_min: float | None = None
    """Keep samples whose score is at least this (LAION-400M: 0.3, LAION-2B-en: 0.28, with ViT-B/32)."""
    clip_score_top_frac: float | None = None
    """Keep this top fraction of the scored samples, a quantile over the whole corpus (DataComp: 0.3)."""
    score_bins: int = 2000
    """Histogram bins over [-1, 1] for --clip-score-top-frac; the kept fraction is exact to one bin."""
    batch_size: int = 256
    """Images and captions embedded together."""
    device: str = "auto"
    """auto: one GPU per actor when the cluster (or this machine, --executor local) has GPUs, else CPU; cpu; cuda."""
    cpus_per_actor: int = 1
    """CPU cores (torch threads, decode threads) of each CPU actor."""

    def __post_init__(self) -> None:
        for name in ("clip_score_min", "clip_score_top_frac"):
            v = getattr(self, name)
            _check(v is None or math.isfinite(v), f"--{name.replace('_', '-')} must be a finite number, got {v}")
        _check(self.clip_score_min is None or -1 <= self.clip_score_min <= 1,
               f"--clip-score-min is a cosine similarity, in [-1, 1]; got {self.clip_score_min}")
        _check(self.clip_score_top_frac is None or 0 < self.clip_score_top_frac <= 1,
               f"--clip-score-top-frac is a fraction in (0, 1]; got {self.clip_score_top_frac}")
        _check(10 <= self.score_bins <= 1_000_000, f"--score-bins must be 10..1000000, got {self.score_bins}")
        _check(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        _check(self.device in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {self.device!r}")
        _check(self.cpus_per_actor >= 1, f"--cpus-per-actor must be >= 1, got {self.cpus_per_actor}")

    def keep_rules(self) -> dict[str, Any]:
        return {"clip_score_min": self.clip_score_min, "clip_score_top_frac": self.clip_score_top_frac,
                "score_bins": self.score_bins}


@dataclass(kw_only=True)
class ScoreConfig(ScoreSettings):
    """One score_corpus run: the corpus, where the output goes, and the scoring settings."""

    corpus: str
    """build_corpus or img2dataset output (CORPUS/shards/*.tar), or the shards folder itself; local or URL."""
    out: str
    """Output folder: shards/, embeddings/, manifest/, score/."""
    samples_per_shard: int | None = None
    """Samples per output shard; default: the input's (its first shard's size)."""
    keep_work: bool = False
    """Keep _work/ and _steps/ after success."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.samples_per_shard is None or self.samples_per_shard >= 1,
               f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ScoreError(msg)


@dataclass(frozen=True)
class ScoreInput:
    """What one embed task reads: a tar, and which of its samples are rows to score."""

    stem: str
    """Names the task's files: WORK/STEM.*, manifest/STEM.parquet."""
    tar: str
    """The tar (a URL or a local path)."""
    rows: int
    """Rows this input accounts for (a count to check against)."""
    first_row: int
    """Global row number of its first row."""
    records: str | None = None
    """None: every sample of the tar is a row (an input corpus). Else a parquet of MANIFEST_SCHEMA, one
    record per row, whose `written` rows are the tar's samples of that key to score (build_corpus's parts:
    the others keep their fate)."""


# -- scores, bins, thresholds ------------------------------------------------------------------------


def score_bins(scores: np.ndarray, bins: int) -> np.ndarray:
    """The histogram bin of each score: `bins` equal bins over [-1, 1], the last one closed. The one
    function both passes use, so a sample's bin is the same when counted and when kept."""
    s = np.asarray(scores, dtype=np.float32).astype(np.float64)
    return np.clip(np.floor((s + 1.0) * (bins / 2.0)), 0, bins - 1).astype(np.int64)


def top_frac_bin(hist: np.ndarray, frac: float) -> int:
    """The highest bin k whose samples and those above are at least ceil(frac x total); keeping bins
    >= k keeps between that many and that many plus hist[k] - 1. len(hist) if there is nothing."""
    total = int(hist.sum())
    if total == 0:
        return len(hist)
    target = math.ceil(frac * total - 1e-9)
    above = np.cumsum(hist[::-1])[::-1]  # above[k]: samples in bins k..end
    return int(np.flatnonzero(above >= target).max())


def bin_edge(k: int, bins: int) -> float:
    """The lower edge of bin k (the threshold score that keeping bins >= k amounts to)."""
    return -1.0 + 2.0 * k / bins


# -- embeddings files --------------------------------------------------------------------------------


def embeddings_dtype(keys: list[str], dim: int) -> np.dtype:
    width = max([1, *(len(k) for k in keys)])
    return np.dtype([("key", f"<U{width}"), ("image", "<f2", (dim,)), ("text", "<f2", (dim,))])


def pack_embeddings(keys: list[str], image: np.ndarray, text: np.ndarray, dim: int) -> np.ndarray:
    out = np.zeros(len(keys), dtype=embeddings_dtype(keys, dim))
    if keys:
        out["key"] = keys
        out["image"] = image.astype(np.float16)
        out["text"] = text.astype(np.float16)
    return out


def write_embeddings(fs: Any, path: str, arr: np.ndarray) -> None:
    with atomic_open(fs, path) as f:
        np.save(f, arr, allow_pickle=False)


def read_embeddings(fs: Any, path: str) -> np.ndarray:
    """One embeddings file (see the module docstring): a structured array with key, image, text;
    AccountingError naming the file if it is not one (a damaged output, exit 1)."""
    with fs.open(path, "rb") as f:
        try:
            arr = np.load(f, allow_pickle=False)
        except (ValueError, EOFError, OSError) as exc:
            raise AccountingError(f"{path}: not an embeddings file ({' '.join(str(exc).split())[:120]})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.names is None or \
            not {"key", "image", "text"} <= set(arr.dtype.names):
        raise AccountingError(f"{path}: not an embeddings file (no key, image and text fields)")
    return arr


def _read_work(rd: RunDir, path: str, read: Any) -> Any:
    """read(path) of a scratch file an earlier step finished: a damaged one (a disk fault, a hand edit) is
    said in one line with the way out, not retried (a rerun would trust the same finished marker)."""
    try:
        return read(path)
    except AccountingError as exc:
        raise AccountingError(f"{' '.join(str(exc).split())[:200]}; a scratch file of this run is damaged: delete "
                              f"{rd.url_of('_steps')} and rerun to redo the scoring steps") from None


def _read_parquet(fs: Any, path: str, columns: list[str] | None = None) -> pa.Table:
    with fs.open(path, "rb") as f:
        try:
            t = pq.read_table(f, columns=columns)
            return t if columns else t.cast(SCORE_SCHEMA)
        except (pa.ArrowException, ValueError) as exc:  # ArrowInvalid is both
            raise AccountingError(f"{path}: not a scores file ({' '.join(str(exc).split())[:120]})") from None


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


# -- step 1: embed -----------------------------------------------------------------------------------


class EmbedStep(Step):
    """Per input: every row's score, the scored samples' embeddings, a histogram of the scores."""

    name = "embed"
    what = "samples"
    actors = True

    def __init__(self, settings: ScoreSettings, inputs: list[ScoreInput], spec: ModelSpec, work: str):
        self.settings, self.inputs, self.spec, self.work = settings, inputs, spec, work
        self.device, self.num_cpus = settings.device, settings.cpus_per_actor

    def tasks(self) -> list[int]:
        return list(range(len(self.inputs)))

    def total(self, specs: list[Any]) -> int:
        return sum(inp.rows for inp in self.inputs)

    def setup(self, device: str, cpus: int, shared: Any = None) -> Embedder:
        return Embedder(self.spec, device, cpus, state_dict=shared)

    def run(self, ctx: TaskContext, i: int, shared: Any = None) -> dict[str, Any]:
        emb: Embedder = ctx.state
        inp = self.inputs[i]
        rd = ctx.rd
        batch: list[tuple[dict[str, Any], bytes, str]] = []
        keys: list[str] = []
        images: list[np.ndarray] = []
        texts: list[np.ndarray] = []
        if inp.records is None:
            records: list[dict[str, Any]] = []
            by_key: dict[str, dict[str, Any]] | None = None
        else:
            with rd.fs.open(inp.records, "rb") as f:
                records = [{**r, "clip_score": None} for r in pq.read_table(f).cast(MANIFEST_SCHEMA).to_pylist()]
            by_key = {r["key"]: r for r in records if r["status"] == WRITTEN}
        # On a GPU the next batch is decoded (in the actor's threads) while this one runs on the device;
        # on a CPU decoding and inference share the same cores, so one after the other.
        overlap = emb.prefetch
        waiting: list[tuple[list[tuple[dict[str, Any], bytes, str]], Any]] = []

        def finish(items: list[tuple[dict[str, Any], bytes, str]], pixels: Any) -> None:
            pixels = pixels.result() if overlap else pixels
            good = [(rec, caption, px) for (rec, _, caption), px in zip(items, pixels, strict=True) if px is not None]
            for (rec, _, _), px in zip(items, pixels, strict=True):
                if px is None:
                    rec.update(status=FAILED, reason="undecodable_image")
            if good:
                img, txt = emb.embed([g[2] for g in good], [g[1] for g in good])
                scores = np.einsum("ij,ij->i", img, txt).astype(np.float32)
                if not np.isfinite(scores).all():
                    # Finite weights whose activations overflow (or fp16 on a GPU without bf16): the model, not
                    # the sample, is at fault, and a NaN has no histogram bin.
                    bad = good[int(np.flatnonzero(~np.isfinite(scores))[0])][0]["key"]
                    raise ScoreError(f"{self.spec.pretrained}: the model gives a non-finite score (sample {bad} of "
                                     f"{inp.tar}); check the checkpoint, or score on another --device")
                for (rec, _, _), s in zip(good, scores, strict=True):
                    rec["clip_score"] = float(s)
                    keys.append(rec["key"])
                images.append(img)
                texts.append(txt)
            ctx.progress(len(records), sum(r["clip_score"] is not None for r in records))

        def flush() -> None:
            items = list(batch)
            batch.clear()
            data = [b[1] for b in items]
            waiting.append((items, emb.decode_later(data) if overlap else emb.decode_many(data)))
            if len(waiting) > int(overlap):
                finish(*waiting.pop(0))

        seen = 0
        keys_seen: set[str] = set()
        for key, members in read_input_shard(*get_fs(inp.tar)):
            if by_key is None:
                rec: dict[str, Any] = {"row": inp.first_row + len(records), "key": key, "url": None,
                                       "status": WRITTEN, "reason": None, "error": None, "shard": None,
                                       "sha256": None, "source": inp.tar.rsplit("/", 1)[-1], "clip_score": None}
                records.append(rec)
                if key in keys_seen:
                    # The shard writer and the embeddings find a sample by its key in its shard: a second sample
                    # of one key would be written with the first one's score and embeddings. The first stays.
                    rec.update(status=FAILED, reason="duplicate_key")
                    continue
                if not KEY_RE.match(key):
                    # A key the shard writer refuses (webdataset's own rules are looser): failed here, not by
                    # the writer after the whole corpus was embedded, where no rerun could get past it.
                    rec.update(status=FAILED, reason="bad_key")
                    continue
                keys_seen.add(key)
            elif key in by_key:
                rec = by_key[key]
                seen += 1
            else:
                continue  # a candidate of build_corpus's part that a later step dropped
            meta = _json_object(members["json"]) if "json" in members else {}
            if meta is None:
                rec.update(status=FAILED, reason="unreadable_json")  # its clip_score could not be added to it
                continue
            if by_key is None:
                rec["url"] = None if meta.get("url") is None else str(meta["url"])
                rec["sha256"] = meta["sha256"] if isinstance(meta.get("sha256"), str) else None
            img_ext = next((e for e in IMAGE_EXTS if e in members), None)
            if img_ext is None:
                rec.update(status=FAILED, reason="missing_image")
                continue
            if "txt" not in members:
                rec.update(status=FAILED, reason="missing_txt")
                continue
            batch.append((rec, members[img_ext], members["txt"].decode("utf-8", "replace").strip()))
            if len(batch) >= self.settings.batch_size:
                flush()
        if batch:
            flush()
        while waiting:
            finish(*waiting.pop(0))
        if by_key is None and len(records) != inp.rows:
            raise ScoreError(f"{inp.tar}: holds {len(records)} samples, its {SIZES_FILE} says {inp.rows}; "
                             "the corpus is damaged")
        if by_key is not None and (seen != len(by_key) or len(records) != inp.rows):
            raise AccountingError(f"{inp.tar}: {seen} of the {len(by_key)} kept samples of {inp.records} found, "
                                  f"{len(records)} records for {inp.rows} rows")
        dim = emb.dim
        arr = pack_embeddings(keys, np.concatenate(images) if images else np.zeros((0, dim), np.float32),
                              np.concatenate(texts) if texts else np.zeros((0, dim), np.float32), dim)
        write_embeddings(rd.fs, rd.path(self.work, f"{inp.stem}.npy"), arr)
        with atomic_open(rd.fs, rd.path(self.work, f"{inp.stem}.scores.parquet")) as f:
            pq.write_table(pa.Table.from_pylist(records, schema=SCORE_SCHEMA), f)
        scored = np.array([r["clip_score"] for r in records if r["clip_score"] is not None], dtype=np.float32)
        bins, counts = np.unique(score_bins(scored, self.settings.score_bins), return_counts=True)
        failed: dict[str, int] = {}
        for r in records:
            if r["status"] == FAILED and r["clip_score"] is None and (by_key is None or r["key"] in by_key):
                failed[r["reason"]] = failed.get(r["reason"], 0) + 1
        return {"rows": len(records), "scored": int(len(scored)), "failed": failed,
                "hist": {str(int(b)): int(c) for b, c in zip(bins, counts, strict=True)},
                "progress_rows": len(records), "progress_ok": int(len(scored))}


# -- step 3: settle ----------------------------------------------------------------------------------


class SettleStep(Step):
    """Per group of inputs: the keep rules applied to each one's scored records."""

    name = "settle_scores"
    what = "inputs"

    def __init__(self, stems: list[str], settings: ScoreSettings, threshold_bin: int | None, work: str):
        self.stems, self.settings, self.threshold_bin, self.work = stems, settings, threshold_bin, work
        self.groups = [list(range(i, min(len(stems), i + SETTLE_SHARDS_PER_TASK)))
                       for i in range(0, len(stems), SETTLE_SHARDS_PER_TASK)]

    def tasks(self) -> list[list[int]]:
        return self.groups

    def keep(self, scores: np.ndarray) -> np.ndarray:
        """Which of these (non-null) scores the rules keep."""
        keep = np.ones(len(scores), dtype=bool)
        if self.settings.clip_score_min is not None:
            keep &= scores.astype(np.float32).astype(np.float64) >= self.settings.clip_score_min
        if self.threshold_bin is not None:
            keep &= score_bins(scores, self.settings.score_bins) >= self.threshold_bin
        return keep

    def run(self, ctx: TaskContext, group: list[int], shared: Any = None) -> dict[str, Any]:
        rd = ctx.rd
        kept: dict[str, int] = {}
        for i in group:
            stem = self.stems[i]
            t = _read_work(rd, rd.path(self.work, f"{stem}.scores.parquet"), lambda p: _read_parquet(rd.fs, p))
            status = np.array(t.column("status").to_pylist(), dtype=object)
            reason = np.array(t.column("reason").to_pylist(), dtype=object)
            scores = t.column("clip_score").to_numpy(zero_copy_only=False)
            cand = status == WRITTEN
            if np.isnan(scores[cand].astype(np.float64)).any():
                raise AccountingError(f"{rd.url_of(self.work, f'{stem}.scores.parquet')}: a kept row has no score; "
                                      f"delete {rd.url_of('_steps')} and rerun")
            low = np.zeros(len(status), dtype=bool)
            if cand.any():
                low[cand] = ~self.keep(scores[cand].astype(np.float32))
            status[low], reason[low] = DROPPED, DROP_REASON
            t = t.set_column(t.schema.get_field_index("status"), "status", pa.array(status, pa.string()))
            t = t.set_column(t.schema.get_field_index("reason"), "reason", pa.array(reason, pa.string()))
            with atomic_open(rd.fs, rd.path(self.work, f"{stem}.kept.parquet")) as f:
                pq.write_table(t, f)
            kept[stem] = int((cand & ~low).sum())
        return {"kept": kept, "rows": len(group)}


# -- step 4: shards with scores, embeddings beside them ------------------------------------------------


class ScoreShardsStep(WriteShardsStep):
    """build_corpus's shard writer over the input shards' kept samples, each json gaining its
    clip_score, and `embeddings/NNNNN.npy` beside each shard written."""

    def __init__(self, sources: list[Source], samples_per_shard: int, shards_dir: str, embeddings_dir: str,
                 work: list[str], dim: int):
        super().__init__(sources, samples_per_shard, shards_dir, SHARDS_PER_TASK)
        self.embeddings_dir, self.work, self.dim = embeddings_dir, work, dim

    def run(self, ctx: TaskContext, spec: tuple, shared: Any = None) -> dict[str, Any]:
        first, _end, reads, _owned = spec
        fs = ctx.rd.fs
        # Per source: key -> score, and key -> row of its embeddings (keys need only be unique in a source).
        scores: dict[int, dict[str, float]] = {}
        rows: dict[int, dict[str, int]] = {}
        tables: dict[int, np.ndarray] = {}
        for j in reads:
            t = _read_work(ctx.rd, self.sources[j].records, lambda p: _read_parquet(fs, p, ["key", "status", "clip_score"]))
            scores[j] = {key: s for key, st, s in zip(*(t.column(c).to_pylist() for c in ("key", "status",
                                                                                      "clip_score")), strict=True)
                         if st == WRITTEN}
            tables[j] = _read_work(ctx.rd, self.work[j], lambda p: read_embeddings(fs, p))
            rows[j] = {k: n for n, k in enumerate(tables[j]["key"].tolist())}
        order: list[tuple[int, str]] = []

        def add_score(j: int, key: str, members: dict[str, bytes]) -> dict[str, bytes]:
            if key not in scores[j] or key not in rows[j]:
                raise ShardError(f"{self.work[j]}: no score or embedding for kept sample {key}; delete "
                                 f"{ctx.rd.url_of('_steps')} and rerun")
            meta = _decode_json(members.get("json")) if "json" in members else {"key": key}
            meta["clip_score"] = scores[j][key]
            order.append((j, key))
            return {**members, "json": json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str).encode()}

        done = [0]

        def on_sample() -> None:
            done[0] += 1
            ctx.progress(done[0], done[0])

        summary = write_shard_range(fs, self.sources, self.prefix, spec, self.samples_per_shard, self.shards_dir,
                                    on_sample=on_sample, edit=add_score, schema=SCORE_SCHEMA)
        at = 0
        for k in range(first, first + len(summary["sizes"])):
            name = shard_name(k)
            if name not in summary["sizes"]:
                raise ShardError(f"{self.shards_dir}: task wrote {sorted(summary['sizes'])}, from {shard_name(first)}")
            placed = order[at:at + summary["sizes"][name]]
            at += len(placed)
            image = np.stack([tables[j]["image"][rows[j][key]] for j, key in placed])
            text = np.stack([tables[j]["text"][rows[j][key]] for j, key in placed])
            write_embeddings(fs, f"{self.embeddings_dir}/{name[: -len('.tar')]}.npy",
                             pack_embeddings([key for _, key in placed], image, text, self.dim))
        if at != len(order):
            raise ShardError(f"{self.shards_dir}: {len(order)} samples written, {at} placed in shards")
        return {**summary, "progress_rows": summary["rows"], "progress_ok": summary["rows"]}


# -- the driver --------------------------------------------------------------------------------------


def own_names(stems: list[str]) -> dict[str, re.Pattern[str]]:
    """What this job writes below each folder of --out (see pipeline.rundir)."""
    alt = "|".join(re.escape(s) for s in stems) or "(?!)"
    return {
        "shards": re.compile(r"\d{5,}\.(tar|parquet)|sizes\.json"),
        "embeddings": EMBEDDINGS_NAMES,
        "manifest": re.compile(rf"({alt})\.parquet"),
        "score": re.compile(r"summary\.json"),
        WORK: re.compile(rf"({alt})\.{WORK_FILES}"),
        "_steps": re.compile(r"[a-z_]+/\d{5,}\.json|[a-z_]+\.json"),
    }


WORK = "_work"
SCRATCH = (WORK, "_steps")


def count_line(summary: dict[str, Any]) -> str:
    c = summary["corpus"]
    return f"rows in {c['rows']} = written {c[WRITTEN]} + dropped {c[DROPPED]} + failed {c[FAILED]}"


def _finished(rd: RunDir) -> dict[str, Any] | None:
    """score/summary.json of a finished run (written last), or None."""
    path = rd.path("score", "summary.json")
    if not rd.fs.exists(path):
        return None
    try:
        with rd.fs.open(path, "rb") as f:
            summary = json.load(f)
    except (ValueError, UnicodeDecodeError):
        return None
    return summary if isinstance(summary, dict) and isinstance(summary.get("corpus"), dict) else None


def _check_finished(rd: RunDir, summary: dict[str, Any]) -> None:
    """A finished run's folder still holds the shards and embeddings its summary counts (by name and
    sizes.json: O(shards) on the driver); AccountingError (exit 1) naming what is missing otherwise."""
    fix = f"delete {rd.url_of('score', 'summary.json')} and rerun the same command to write the output again"
    try:
        with rd.fs.open(rd.path("shards", SIZES_FILE), "rb") as f:
            sizes = json.load(f)
        total = sum(int(v) for v in sizes.values())
    except (OSError, ValueError, UnicodeDecodeError, AttributeError, TypeError):
        raise AccountingError(f"{rd.url_of('shards', SIZES_FILE)}: missing or unreadable in a finished run; "
                              f"{fix}") from None
    tars = sorted(n for n in rd.names("shards") if re.fullmatch(r"\d{5,}\.tar", n))
    npys = sorted(n for n in rd.names("embeddings") if EMBEDDINGS_NAMES.fullmatch(n))
    want = sorted(sizes)
    missing = sorted({*want, *(n[: -len(".tar")] + ".npy" for n in want), "model.json"} - {*tars, *npys})
    if missing or tars != want or total != summary["corpus"].get(WRITTEN):
        what = f"{', '.join(missing[:3])} missing" if missing else "its shards do not match sizes.json and the summary"
        raise AccountingError(f"{rd.url_of()}: a finished scoring, but {what}; {fix}")


@dataclass
class Scored:
    """What score_and_write returns: the shards' accounting and what the keep rules did."""

    result: Any
    """pipeline.build.BuildResult of the shards written."""
    keep: dict[str, Any]
    """The rules, the threshold bin and score, scored and kept counts."""
    histogram: dict[str, Any]
    model: dict[str, Any]


def score_and_write(rd: RunDir, executor: Any, settings: ScoreSettings, spec: ModelSpec, inputs: list[ScoreInput],
                    samples_per_shard: int, n_rows: int, work: str = WORK, progress_every: float = 5.0,
                    weights: dict[str, Any] | None = None) -> Scored:
    """The steps (see the module docstring) over `inputs`, into rd's shards/, embeddings/ and manifest/
    (build_corpus --clip-filter runs them over its parts, score_corpus over an input corpus). `weights`:
    the state dict the driver checked, sent to the workers through the object store (else each worker
    reads spec.checkpoint itself: a path every node must see)."""
    from pipeline.build import finish_shards, verify_earlier_shards

    shared = executor.put(weights) if weights is not None else None
    embedded = run_step(rd, EmbedStep(settings, inputs, spec, work), executor, shared=shared,
                        progress_every=progress_every)
    del shared
    hist = np.zeros(settings.score_bins, dtype=np.int64)
    for s in embedded:
        for b, c in s["hist"].items():
            hist[int(b)] += int(c)
    scored = int(hist.sum())
    k = top_frac_bin(hist, settings.clip_score_top_frac) if settings.clip_score_top_frac is not None else None
    stems = [inp.stem for inp in inputs]
    settled = run_step(rd, SettleStep(stems, settings, k, work), executor, progress_every=progress_every)
    kept: dict[str, int] = {}
    for s in settled:
        kept.update(s["kept"])
    sources = [Source(inp.tar, rd.url_of(work, f"{inp.stem}.kept.parquet"), kept[inp.stem],
                      rd.url_of("manifest", f"{inp.stem}.parquet")) for inp in inputs]
    dim = int(spec.config["embed_dim"])
    writer = ScoreShardsStep(sources, samples_per_shard, rd.url_of("shards"), rd.url_of("embeddings"),
                             [rd.url_of(work, f"{st}.npy") for st in stems], dim)
    written = run_step(rd, writer, executor, progress_every=progress_every)
    verify_earlier_shards(rd, writer, written, executor)
    result = finish_shards(rd, written, n_rows, writer.prefix[-1], samples_per_shard)
    shard_names = sorted(n for n in rd.names("shards") if re.fullmatch(r"\d{5,}\.tar", n))
    on_disk = sorted(n for n in rd.names("embeddings") if n.endswith(".npy"))
    if on_disk != [n[: -len(".tar")] + ".npy" for n in shard_names]:
        raise AccountingError(f"{rd.url_of('embeddings')}: holds {len(on_disk)} embeddings files for "
                              f"{len(shard_names)} shards")
    dropped_low = result.reasons.get(f"{DROPPED}:{DROP_REASON}", 0)
    if result.written + dropped_low != scored:
        raise AccountingError(f"{rd.url_of('manifest')}: {scored} samples scored, but {result.written} written "
                              f"+ {dropped_low} dropped as {DROP_REASON}")
    model = {**spec.record(), "model": spec.model, "pretrained": spec.pretrained, "checkpoint": spec.checkpoint}
    atomic_write_json(rd.fs, rd.path("embeddings", "model.json"), {
        "format": EMBEDDINGS_FORMAT, "dim": dim, "dtype": "float16",
        "fields": {"key": "sample key, as in shards/NNNNN.tar", "image": "image embedding",
                   "text": "caption embedding"},
        "normalised": "L2, in float32 before the cast to float16 (clip_score: image . text in float32)",
        "files": "embeddings/NNNNN.npy holds the samples of shards/NNNNN.tar, in order",
        "model": model})
    keep = {**settings.keep_rules(), "threshold_bin": k,
            "top_frac_threshold": None if k is None else bin_edge(k, settings.score_bins),
            "scored": scored, "kept": result.written, "kept_fraction": result.written / scored if scored else None}
    histogram = {"bins": settings.score_bins, "range": [-1.0, 1.0],
                 "counts": {str(int(b)): int(hist[b]) for b in np.flatnonzero(hist)}}
    return Scored(result, keep, histogram, model)


def run_score(cfg: ScoreConfig, executor: Any = None) -> dict[str, Any]:
    """The whole job with `executor` (default: in this process), holding the output folder's lock from
    the first write to score/summary.json. Returns summary.json's content."""
    from pipeline.executor import LocalExecutor

    executor = executor or LocalExecutor()
    rd = RunDir(cfg.out, JOB)
    existed = rd.fs.exists(rd.root)
    new = rd.check_ours() is None  # before anything else: a foreign folder gets nothing written
    corpus = read_corpus(cfg.corpus, cfg.out, rd)
    spec, weights = resolve_weights(cfg.model, cfg.clip_pretrained)
    stems = [s.rsplit(".", 1)[0] for s in corpus.shards]
    # The input's shard size is its largest shard's: the first one may be empty or short (a failed download).
    samples_per_shard = cfg.samples_per_shard or max([1, *corpus.sizes.values()])
    settings = {**corpus.settings(), "model": spec.record(), "keep": cfg.keep_rules(),
                "samples_per_shard": samples_per_shard}
    inputs, row = [], 0
    for shard, stem in zip(corpus.shards, stems, strict=True):
        inputs.append(ScoreInput(stem=stem, tar=_tar_url(corpus.url(shard), rd), rows=corpus.sizes[shard],
                                 first_row=row))
        row += corpus.sizes[shard]
    try:
        with rd.lock():
            return _run_locked(cfg, rd, executor, corpus, spec, weights, stems, samples_per_shard, settings, inputs,
                               row, new)
    finally:
        if new and not existed and _is_local(rd.fs):
            try:
                os.rmdir(rd.root)  # a bad input left the new folder empty (see _run_locked): it goes too
            except OSError:
                pass  # it holds the output


def _tar_url(url: str, rd: RunDir) -> str:
    """An input shard as the shard writer opens it: a path without a scheme is read from --out's store, so a
    local corpus scored into object storage is named by an absolute file:// URL."""
    if "://" in url or _is_local(rd.fs):
        return url
    return f"file://{os.path.abspath(url)}"


def _is_local(fs: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _run_locked(cfg: ScoreConfig, rd: RunDir, executor: Any, corpus: Any, spec: ModelSpec, weights: dict[str, Any],
                stems: list[str], samples_per_shard: int, settings: dict[str, Any], inputs: list[ScoreInput],
                row: int, new: bool) -> dict[str, Any]:
    """run_score's part under the folder's lock. `new`: the folder held nothing of an earlier run."""
    own = own_names(stems)
    done = _finished(rd)
    rd.claim(settings, own)
    if done is not None:
        _check_finished(rd, done)
        for sub in SCRATCH:
            rd.remove_own_files(sub, own[sub])
        log.info("%s holds a finished scoring of this corpus with this model and rules: nothing to do",
                 rd.url_of())
        return {**done, "already_complete": True}
    try:
        scored = score_and_write(rd, executor, cfg, spec, inputs, samples_per_shard, row, weights=weights)
    except ConfigError:
        if new:
            # Bad input found by a task (a damaged input shard): like bad input found on the driver, it leaves
            # nothing behind, so the rerun after the corpus is repaired is no rerun "with other input".
            for sub, pattern in own.items():
                rd.remove_own_files(sub, pattern)
            rd.fs.rm(rd.path(RUN_FILE))
        raise
    result = scored.result
    summary = {
        "corpus": {"input": cfg.corpus, "rows": result.rows_in, WRITTEN: result.written,
                   DROPPED: result.dropped, FAILED: result.failed, "input_shards": len(corpus.shards),
                   "shards": result.shards},
        "reasons": dict(result.reasons.most_common()),
        "model": scored.model,
        "keep": scored.keep,
        "histogram": scored.histogram,
    }
    atomic_write_json(rd.fs, rd.path("score", "summary.json"), summary)  # last: the run is complete
    if not cfg.keep_work:
        for sub in SCRATCH:
            rd.remove_own_files(sub, own[sub])
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    return format_keep(summary["keep"], summary["model"])


def format_keep(k: dict[str, Any], model: dict[str, Any]) -> str:
    rules = []
    if k["clip_score_min"] is not None:
        rules.append(f"clip_score >= {k['clip_score_min']}")
    if k["clip_score_top_frac"] is not None:
        rules.append(f"top {k['clip_score_top_frac']:g} (clip_score >= {k['top_frac_threshold']:.4f})")
    frac = f"{k['kept_fraction']:.4f}" if k["kept_fraction"] is not None else "-"
    return (f"scored {k['scored']} samples with {model['name']} (sha256 {model['pretrained_sha256'][:12]}); "
            f"keep: {' and '.join(rules) or 'all'}; kept {k['kept']} ({frac})")
