"""Build a corpus: URL list -> WebDataset shards + manifest, as steps of the one job layer (pipeline.job).

The driver plans and adds up; tasks do every per-row and per-byte step:

1. **read** (one task per input slice: parquet row groups, tsv/jsonl byte ranges, csv
   files): read the slice through fsspec, write it as `_input/SSSSS.parquet` (row groups
   of `--rows-per-task` rows: the download tasks), hash each column (the input's identity,
   naming the column that changed on a rerun) and write the URL keys for step 2.
2. **url_dedup** (one task per bucket) and **url_gather** (per slice): duplicate URLs
   across the whole input, first row wins (pipeline.exact_dedup).
3. **download** (one task per row group): caption cleaning and filters, guarded fetch,
   header sniff, size filters, resize; with `--eval`, the eval-overlap check (the index is
   put in the object store once). Writes `parts/TTTTT.tar` (candidates, input order),
   `parts/TTTTT.parquet` (every row with its status) and, with --eval, its matches.
4. **sha_keys** (per slice), **sha_dedup** (per bucket) and **settle** (per slice):
   duplicate image bytes (sha256 of the download) across the corpus, first row wins;
   settle writes each part's final records (`_final/TTTTT.parquet`) and its kept count.
   With `--dedup-within text,image`, before settle: **near_keys** (per slice), **near_pairs** (per
   bucket) and **near_cluster** (one task) find clusters of near-duplicate captions and images
   among the rest (pipeline.near_dedup); settle drops all but the lowest row of each
   (`near_duplicate:text|image`, `duplicate_of` in the manifest). **near_thumbs** (per slice holding
   one) makes thumbnails of the largest clusters' samples for the report's near-duplicate section.
5. **write_shards** (one task per 8 shards): from prefix sums of the kept counts (the
   driver's only arithmetic), each task writes its range of `shards/NNNNN.tar` of exactly
   `--samples-per-shard` samples from the parts that hold them, reads every shard back,
   and writes the manifests it owns (`manifest/TTTTT.parquet`, one row per input row).
6. with `--eval`: **overlap** (one task) merges the parts' matches into
   `audit/overlap.parquet`, `summary.json` and `report.html` (with --dedup-within, with the
   near-duplicate section); with `--dedup-within` alone, **near_report** (one task) writes
   `audit/report.html` with that section alone.

The driver writes `shards/sizes.json` and `stats.json` (last: the run is complete), checks
that the counts add up, and removes the scratch folders unless `--keep-parts`. Each step
resumes from its tasks' completion markers, and every output is a pure function of the
input and the settings, so shards are byte-identical after any kill and rerun.
"""

from __future__ import annotations

import json
import logging
import re
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import BuildConfig, ConfigError, to_yaml
from pipeline.exact_dedup import DedupStep, gather_dups, n_buckets, write_keys
from pipeline.filters import CaptionCleaner, CaptionFilter, DuplicateUrlFilter, ImageSizeFilter, decide_captions
from pipeline.job import AccountingError, Step, TaskContext, run_step
from pipeline.progress import fmt_duration
from pipeline.readers import (
    InputError,
    InputFile,
    InputSlice,
    check_columns,
    column_digests,
    combine_digests,
    list_inputs,
    plan_slices,
    read_slice,
)
from pipeline.rundir import RunDir, SettingsChanged
from pipeline.sample import DROPPED, FAILED, PENDING, WRITTEN, Sample, run_stages
from pipeline.shards import (
    MANIFEST_SCHEMA,
    SIZES_FILE,
    ShardError,
    Source,
    atomic_open,
    atomic_write_bytes,
    atomic_write_json,
    compare_settings,
    plan_shard_tasks,
    shard_name,
    write_shard_range,
    write_tar,
)
from scoring import EMBEDDINGS_NAMES, WORK_FILES

log = logging.getLogger("clipforge.build")

__all__ = ["AccountingError", "BuildResult", "build_corpus", "print_summary"]

CANDIDATE = "candidate"
PART_SCHEMA = MANIFEST_SCHEMA
SHARDS_PER_TASK = 8

_N = r"\d{5,}"
# The names this job writes, per top-level folder of --out (relative paths below it):
# cleanup deletes nothing else, and anything else found there is refused.
OWN_NAMES = {
    "parts": re.compile(rf"{_N}\.(tar|parquet|matches\.parquet)"),
    "shards": re.compile(rf"{_N}\.(tar|parquet)|sizes\.json"),
    "manifest": re.compile(rf"{_N}\.parquet"),
    "audit": re.compile(r"overlap\.parquet|summary\.json|config\.json|report\.html"),
    "_input": re.compile(rf"{_N}\.parquet"),
    "_keys": re.compile(rf"(url|sha|near)-{_N}\.parquet"),
    "_dups": re.compile(rf"(url|sha)/{_N}\.parquet|(url|sha|near)-{_N}\.parquet"),
    "_near": re.compile(rf"(feat|edges|shown)-{_N}\.parquet"),  # --dedup-within (pipeline.near_dedup)
    "_final": re.compile(rf"{_N}\.parquet"),
    "_steps": re.compile(rf"[a-z_]+/{_N}\.json|[a-z_]+\.json"),
    # --clip-filter (scoring.job's steps over the parts)
    "embeddings": EMBEDDINGS_NAMES,
    "_clip": re.compile(rf"{_N}\.{WORK_FILES}"),
}
SCRATCH = ("parts", "_input", "_keys", "_dups", "_near", "_final", "_clip", "_steps")
"""Folders removed after success unless --keep-parts (the shards and manifests are what stays)."""
LEGACY_RUN_KEYS = ("input_fingerprint", "input_rows")
"""A run.json of clipforge 0.1's build_corpus (no "job" entry) holds these."""


def key_width(n_rows: int) -> int:
    return max(9, len(str(max(0, n_rows - 1))))


@dataclass(frozen=True)
class Plan:
    """What the driver knows after the read step: O(slices + tasks) numbers."""

    slices: list[InputSlice]
    slice_rows: list[int]
    slice_offsets: list[int]
    """Global row of each slice's first row."""
    buckets: int
    rows_per_task: int

    @property
    def n_rows(self) -> int:
        return self.slice_offsets[-1] if self.slice_offsets else 0

    def download_tasks(self) -> list[tuple[int, int, int, int]]:
        """(part index, slice, row group, first global row) per download task."""
        out = []
        for s, rows in enumerate(self.slice_rows):
            for g in range(-(-rows // self.rows_per_task)):
                out.append((len(out), s, g, self.slice_offsets[s] + g * self.rows_per_task))
        return out

    def part_rows(self, part: tuple[int, int, int, int]) -> tuple[int, int]:
        """[lo, hi) global rows of a download task."""
        _, s, g, lo = part
        return lo, min(self.slice_offsets[s] + self.slice_rows[s], lo + self.rows_per_task)


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far (a Ray worker's, when a task reports it)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _path(rd: RunDir, *parts: str) -> str:
    return rd.url_of(*parts)


# -- step 1: read -------------------------------------------------------------------------------


class ReadStep(Step):
    name = "read"

    def __init__(self, cfg: BuildConfig, slices: list[InputSlice], buckets: int, write: bool = True):
        self.cfg, self.slices, self.buckets, self.write = cfg, slices, buckets, write

    def tasks(self) -> list[int]:
        return list(range(len(self.slices)))

    def run(self, ctx: TaskContext, s: int, shared: Any = None) -> dict[str, Any]:
        cfg = self.cfg
        table = read_slice(self.slices[s], cfg.url_col, cfg.caption_col, cfg.extra_cols, not cfg.header)
        digests = column_digests(table)
        if self.write:
            rd = ctx.rd
            with atomic_open(rd.fs, rd.path("_input", f"{s:05d}.parquet")) as f:
                pq.write_table(table, f, row_group_size=cfg.rows_per_task)
            write_keys(rd.fs, rd.path("_keys", f"url-{s:05d}.parquet"), table.column("url").to_pylist(),
                       np.arange(table.num_rows), self.buckets)
        return {"rows": table.num_rows, "digests": digests}


class CheckStep(ReadStep):
    """The read step's hashing alone, to name what changed when the input files did (no outputs)."""

    name = "check_input"
    markers = False

    def __init__(self, cfg: BuildConfig, slices: list[InputSlice]):
        super().__init__(cfg, slices, 1, write=False)


# -- step 2: url gather (decide is exact_dedup.DedupStep) ----------------------------------------


class GatherStep(Step):
    """Per slice: its duplicates from every bucket's decision, in one file."""

    what = "slices"

    def __init__(self, name: str, kind: str, n_slices: int, buckets: int):
        self.name, self.kind, self.n_slices, self.buckets = name, kind, n_slices, buckets

    def tasks(self) -> list[int]:
        return list(range(self.n_slices))

    def run(self, ctx: TaskContext, s: int, shared: Any = None) -> dict[str, Any]:
        rd = ctx.rd
        rows = gather_dups(rd.fs, rd.path("_dups", self.kind), self.buckets, s)
        with atomic_open(rd.fs, rd.path("_dups", f"{self.kind}-{s:05d}.parquet")) as f:
            pq.write_table(pa.table({"row": rows}), f)
        return {"duplicates": int(len(rows))}


def _dup_rows(rd: RunDir, kind: str, s: int) -> np.ndarray:
    with rd.fs.open(rd.path("_dups", f"{kind}-{s:05d}.parquet"), "rb") as f:
        return pq.read_table(f).column("row").to_numpy()


# -- step 3: download --------------------------------------------------------------------------


class DownloadStep(Step):
    name = "download"

    def __init__(self, cfg: BuildConfig, plan: Plan, width: int, with_eval: bool):
        self.cfg, self.plan, self.width, self.with_eval = cfg, plan, width, with_eval
        self.parts = plan.download_tasks()
        # The CPU a task asks Ray for: a fraction, so that --tasks-per-cpu tasks share a core (pipeline.executor).
        self.num_cpus = round(1 / cfg.tasks_per_cpu, 4)  # Ray counts resources in units of 1/10,000

    def tasks(self) -> list[tuple[int, int, int, int]]:
        return self.parts

    def total(self, specs: list[Any]) -> int:
        return self.plan.n_rows

    def run(self, ctx: TaskContext, part: tuple[int, int, int, int], shared: Any = None) -> dict[str, Any]:
        # Worker-side imports: the download stages import OpenCV and the resizer.
        from pipeline.download import DownloadStage, ErrorLog, ResizeStage
        from pipeline.fetch import Fetcher

        cfg, rd = self.cfg, ctx.rd
        cpu0 = time.process_time()
        t, s, g, first = part
        lo, hi = self.plan.part_rows(part)
        with rd.fs.open(rd.path("_input", f"{s:05d}.parquet"), "rb") as f:
            table = pq.ParquetFile(f).read_row_group(g)
        if table.num_rows != hi - lo:
            raise AccountingError(f"{rd.url_of('_input', f'{s:05d}.parquet')}: row group {g} holds "
                                  f"{table.num_rows} rows, the plan says {hi - lo}; delete {rd.url_of('_steps')} "
                                  "and rerun")
        base = self.plan.slice_offsets[s]
        dups = _dup_rows(rd, "url", s)
        dup = np.isin(np.arange(lo - base, hi - base), dups)
        errors = ErrorLog()
        cleaner = CaptionCleaner(cfg.max_caption_chars, truncate=cfg.long_captions == "truncate")
        dup_filter = DuplicateUrlFilter()
        cap_filter = CaptionFilter(cfg.min_caption_words, cfg.min_caption_chars, cfg.max_caption_chars,
                                   drop_long=cfg.long_captions == "drop")
        # Most rows of a web list are decided by their caption or URL alone: whole columns at once,
        # the same decisions and counters as the per-sample stages; only the rest become Samples.
        captions, reasons = decide_captions(table.column("caption").to_pylist(), dup.tolist(), cleaner, dup_filter,
                                            cap_filter)
        n = hi - lo
        urls = table.column("url").to_pylist()
        status = [PENDING if r is None else DROPPED for r in reasons]
        error: list[str | None] = [None] * n
        sha: list[str | None] = [None] * n
        pending = [i for i in range(n) if reasons[i] is None]
        ctx.progress(n - len(pending), 0, force=True)
        download = DownloadStage(Fetcher(cfg.fetch_config()), cfg.threads, cfg.max_image_pixels, errors)
        size_filter = ImageSizeFilter(cfg.min_image_side, cfg.max_aspect_ratio)
        resize = ResizeStage(cfg.image_size, cfg.resize_mode, cfg.encode_format, cfg.encode_quality, errors,
                             max_decode_bytes=cfg.max_decode_bytes)
        matcher = shared.task_matcher() if (self.with_eval and shared is not None) else None
        extras = (table.select(list(cfg.extra_cols)).take(pa.array(pending, pa.int64())).to_pylist()
                  if cfg.extra_cols else [{}] * len(pending))
        samples = (Sample(key=f"{lo + i:0{self.width}d}", row=lo + i, url=urls[i] or "", caption=captions[i], extra=e)
                   for i, e in zip(pending, extras, strict=True))
        results = []
        ok = 0
        for sample in run_stages(samples, [download, size_filter, resize]):
            if matcher is not None and sample.status == PENDING:
                meta = {**sample.extra, "url": sample.url, **sample.meta}
                reason = matcher(sample.key, sample.caption or "", sample.image or b"", meta)
                if reason:
                    sample.drop(reason)
            results.append(sample)
            ok += sample.status == PENDING
            ctx.progress(n - len(pending) + len(results), ok)
        results.sort(key=lambda x: x.row)

        tar_samples = []
        for smp in results:
            i = smp.row - lo
            status[i] = CANDIDATE if smp.status == PENDING else smp.status
            reasons[i], error[i], sha[i] = smp.reason, smp.error, smp.meta.get("sha256")
            if status[i] == CANDIDATE:
                # img2dataset's fields with its meanings (tools written for its corpora read ours), then ours.
                meta = {**smp.extra, "url": smp.url, "caption": smp.caption, "key": smp.key, "status": "success",
                        "error_message": None, "exif": None, **smp.meta}
                members = {smp.ext or cfg.encode_format: smp.image or b"", "txt": (smp.caption or "").encode(),
                           "json": json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str).encode()}
                tar_samples.append((smp.key, members))
        if len(results) != len(pending) or PENDING in status:
            raise AccountingError(f"download task {t}: rows out do not cover rows {lo}..{hi - 1} once each")
        rows = np.arange(lo, hi, dtype=np.int64)
        records = pa.table({
            "row": rows, "key": [f"{r:0{self.width}d}" for r in range(lo, hi)], "url": urls, "status": status,
            "reason": reasons, "error": error, "shard": pa.nulls(n, pa.string()), "sha256": sha,
            "source": pa.nulls(n, pa.string()), "duplicate_of": pa.nulls(n, pa.string())}, schema=PART_SCHEMA)
        write0 = time.thread_time()
        with atomic_open(rd.fs, rd.path("parts", f"{t:05d}.tar")) as f:
            write_tar(f, tar_samples)
        with atomic_open(rd.fs, rd.path("parts", f"{t:05d}.parquet")) as f:
            pq.write_table(records, f)
        write_cpu = time.thread_time() - write0
        if matcher is not None:
            matcher.write(rd.fs, rd.path("parts", f"{t:05d}.matches.parquet"))
        counts = Counter(status)
        why = Counter(f"{st}:{r}" for st, r in zip(status, reasons, strict=True) if r)
        stage_stats: Counter[str] = Counter()
        # Prefixed by stage: every filter counts "seen" and "kept", which summed together mean nothing.
        for name, st in (("caption_cleaner", cleaner), (dup_filter.name, dup_filter), (cap_filter.name, cap_filter),
                         (size_filter.name, size_filter)):
            stage_stats.update({f"{name}:{k}": v for k, v in st.stats.items()})
        # CPU seconds by stage (benchmarks/ingest.py prints them per 1,000 images): the fetch threads',
        # the main thread's decode/resize/encode and part writing, and the whole process's during the
        # task (the rest: filters, the eval check, thread hand-offs, the watchdog, the interpreter).
        cpu = {"fetch": download.cpu_seconds, "resize": resize.cpu_seconds, "write_parts": write_cpu,
               "download_task": time.process_time() - cpu0}
        return {"rows": n, "candidates": counts[CANDIDATE], "dropped": counts[DROPPED],
                "failed": counts[FAILED], "reasons": dict(why), "stage_stats": dict(stage_stats),
                "progress_rows": n, "progress_ok": counts[CANDIDATE], "fetch_attempts": download.attempts,
                "cpu_seconds": {k: round(v, 4) for k, v in cpu.items()}, "peak_rss_mb": _peak_rss_mb()}


# -- step 4: sha keys, sha dedup, settle ---------------------------------------------------------


class _PartsBySliceStep(Step):
    """A step with one task per input slice, over the download parts of that slice."""

    what = "slices"

    def __init__(self, plan: Plan):
        self.plan = plan
        self.parts = plan.download_tasks()

    def tasks(self) -> list[int]:
        return list(range(len(self.plan.slices)))

    def parts_of(self, s: int) -> list[tuple[int, int, int, int]]:
        return [part for part in self.parts if part[1] == s]


class ShaKeysStep(_PartsBySliceStep):
    name = "sha_keys"

    def run(self, ctx: TaskContext, s: int, shared: Any = None) -> dict[str, Any]:
        rd = ctx.rd
        base = self.plan.slice_offsets[s]
        shas, rows = [], []
        for part in self.parts_of(s):
            recs = _part_records(rd, self.plan, part)
            cand = recs.filter(pc.equal(recs.column("status"), CANDIDATE))
            shas += cand.column("sha256").to_pylist()
            rows += (cand.column("row").to_numpy() - base).tolist()
        n = write_keys(rd.fs, rd.path("_keys", f"sha-{s:05d}.parquet"), shas, rows, self.plan.buckets)
        return {"keys": n}


def _part_records(rd: RunDir, plan: Plan, part: tuple[int, int, int, int]) -> pa.Table:
    """A download task's records, checked: its rows, each once, in order (else a damaged output)."""
    t = part[0]
    path = rd.path("parts", f"{t:05d}.parquet")
    lo, hi = plan.part_rows(part)
    redo = f"delete {rd.url_of('_steps', 'download', f'{t:05d}.json')} and rerun to redo that task"
    try:
        with rd.fs.open(path, "rb") as f:
            recs = pq.read_table(f)
    except FileNotFoundError:
        raise AccountingError(f"{rd.url_of('parts', f'{t:05d}.parquet')}: part file missing; {redo}") from None
    except pa.ArrowInvalid as exc:
        raise AccountingError(f"{rd.url_of('parts', f'{t:05d}.parquet')}: unreadable part "
                              f"({str(exc).splitlines()[0][:160]}); {redo}") from None
    rows = recs.column("row").to_numpy()
    if len(rows) != hi - lo or not np.array_equal(rows, np.arange(lo, hi)):
        raise AccountingError(f"{rd.url_of('parts', f'{t:05d}.parquet')}: rows {lo}..{hi - 1} are not there once "
                              f"each ({recs.num_rows} records); {redo}")
    return recs


class NearKeysStep(_PartsBySliceStep):
    """--dedup-within, per slice: the features and band keys of its candidates that are not exact
    image duplicates (pipeline.near_dedup, step 1)."""

    name = "near_keys"

    def __init__(self, plan: Plan, settings: Any, buckets: int):
        super().__init__(plan)
        self.settings, self.buckets = settings, buckets

    def run(self, ctx: TaskContext, s: int, shared: Any = None) -> dict[str, Any]:
        from pipeline.exact_dedup import write_bucketed
        from pipeline.near_dedup import FEAT_GROUP, FEAT_SCHEMA, band_keys, compute_features, keys_table
        from pipeline.shards import read_tar

        rd = ctx.rd
        base = self.plan.slice_offsets[s]
        dups = gather_dups(rd.fs, rd.path("_dups", "sha"), self.plan.buckets, s) + base
        keys, n = [], 0
        # One part at a time: its images are decoded, hashed and let go; the slice's band keys (about 1 KB a
        # row with both kinds) stay until they are written sorted by bucket.
        with atomic_open(rd.fs, rd.path("_near", f"feat-{s:05d}.parquet")) as f, \
                pq.ParquetWriter(f, FEAT_SCHEMA) as writer:
            for part in self.parts_of(s):
                recs = _part_records(rd, self.plan, part)
                cand = recs.filter(pc.equal(recs.column("status"), CANDIDATE))
                keep = ~np.isin(cand.column("row").to_numpy(), dups)  # exact duplicates are no members
                members = dict(zip(np.array(cand.column("key").to_pylist(), dtype=object)[keep].tolist(),
                                   cand.column("row").to_numpy()[keep].tolist(), strict=True))
                rows: list[int] = []
                captions: list[str] = []
                images: list[bytes | None] = []
                for key, files in read_tar(rd.fs, rd.path("parts", f"{part[0]:05d}.tar")):
                    if key in members:
                        rows.append(members[key])
                        caption, image = _caption_and_image(files)
                        captions.append(caption)
                        images.append(image)
                feats = compute_features(rows, captions, images, "image" in self.settings.kinds)
                writer.write_table(feats.table(), row_group_size=FEAT_GROUP)
                keys.append(band_keys(feats, self.settings, self.buckets))
                n += len(rows)
        table = keys_table(keys)
        write_bucketed(rd.fs, rd.path("_keys", f"near-{s:05d}.parquet"), table, self.buckets)
        return {"rows": n, "keys": table.num_rows}


def _caption_and_image(files: dict[str, bytes]) -> tuple[str, bytes | None]:
    """A part tar's sample: its caption and its image (the member that is neither txt nor json)."""
    return ((files.get("txt") or b"").decode("utf-8", "replace"),
            next((v for k, v in files.items() if k not in ("txt", "json")), None))


class NearThumbsStep(_PartsBySliceStep):
    """--dedup-within, per slice holding a row the report shows (near_cluster's few clusters): each such
    row's key, caption and a small JPEG (`_near/shown-SSSSS.parquet`), read from its part. The images
    stay in the task; the page is drawn from these files."""

    name = "near_thumbs"

    def __init__(self, plan: Plan, rows: list[int]):
        super().__init__(plan)
        self.rows = sorted(set(rows))
        slice_of = np.searchsorted(np.asarray(plan.slice_offsets), self.rows, side="right") - 1
        self.slices = sorted(set(slice_of.tolist()))

    def tasks(self) -> list[int]:
        return self.slices

    def run(self, ctx: TaskContext, s: int, shared: Any = None) -> dict[str, Any]:
        from dedup.report import THUMB_SIDE, small_jpeg
        from pipeline.near_dedup import SHOWN_SCHEMA
        from pipeline.shards import read_tar

        rd = ctx.rd
        out: list[dict[str, Any]] = []
        for part in self.parts_of(s):
            lo, hi = self.plan.part_rows(part)
            want = [r for r in self.rows if lo <= r < hi]
            if not want:
                continue
            recs = _part_records(rd, self.plan, part)
            keys = recs.column("key").to_pylist()
            rows = {keys[r - lo]: r for r in want}
            for key, files in read_tar(rd.fs, rd.path("parts", f"{part[0]:05d}.tar")):
                if key in rows:
                    caption, image = _caption_and_image(files)
                    out.append({"row": rows.pop(key), "key": key, "caption": caption,
                                "jpeg": small_jpeg(image, THUMB_SIDE)})
            if rows:
                raise AccountingError(f"{rd.url_of('parts', f'{part[0]:05d}.tar')}: holds no sample {sorted(rows)[0]}"
                                      ", a near-duplicate cluster's member; delete the folder's _steps/near_* and "
                                      "rerun")
        t = pa.Table.from_pylist(sorted(out, key=lambda r: r["row"]), schema=SHOWN_SCHEMA)
        with atomic_open(rd.fs, rd.path("_near", f"shown-{s:05d}.parquet")) as f:
            pq.write_table(t, f)
        return {"rows": t.num_rows}


class NearReportStep(Step):
    """--dedup-within without --eval, one task: report.html holding the near-duplicate section alone
    (with --eval, the overlap step draws it into its report)."""

    name = "near_report"
    what = "tasks"

    def __init__(self, section: Any, corpus: dict[str, Any]):
        self.section, self.corpus = section, corpus

    def tasks(self) -> list[int]:
        return [0]

    def run(self, ctx: TaskContext, spec: int, shared: Any = None) -> dict[str, Any]:
        from dedup.report import write_page

        write_page(self.corpus, [self.section.html(ctx.rd.fs)], ctx.rd.url_of("audit", "report.html"))
        return {"clusters": len(self.section.summary["report"])}


class SettleStep(_PartsBySliceStep):
    """Per slice: each part's final records (candidates that are image duplicates, or with
    --dedup-within near-duplicates, dropped; the others `written`) and kept count, the input of the
    shard plan."""

    name = "settle"

    def __init__(self, plan: Plan, width: int = 9, near: bool = False):
        super().__init__(plan)
        self.width, self.near = width, near

    def run(self, ctx: TaskContext, s: int, shared: Any = None) -> dict[str, Any]:
        rd = ctx.rd
        base = self.plan.slice_offsets[s]
        dups = gather_dups(rd.fs, rd.path("_dups", "sha"), self.plan.buckets, s) + base
        near_rows = near_roots = near_kinds = np.zeros(0)
        if self.near:
            from pipeline.near_dedup import read_near

            t = read_near(rd.fs, rd.path("_dups", f"near-{s:05d}.parquet"))
            near_rows, near_roots = t.column("row").to_numpy(), t.column("root").to_numpy()
            near_kinds = np.array(t.column("kind").to_pylist(), dtype=object)
        kept: dict[str, int] = {}
        seen_near = 0
        for part in self.parts_of(s):
            t = part[0]
            recs = _part_records(rd, self.plan, part)
            rows = recs.column("row").to_numpy()
            cand = pc.equal(recs.column("status"), CANDIDATE).to_numpy(zero_copy_only=False)
            dup = cand & np.isin(rows, dups)
            near = np.isin(rows, near_rows)
            if (near & ~(cand & ~dup)).any():
                raise AccountingError(f"{rd.url_of('_dups', f'near-{s:05d}.parquet')}: names rows that are not "
                                      "candidates; delete the folder's _steps/near_* and rerun")
            seen_near += int(near.sum())
            status = np.array(recs.column("status").to_pylist(), dtype=object)
            reason = np.array(recs.column("reason").to_pylist(), dtype=object)
            of = np.full(len(rows), None, dtype=object)
            status[cand & ~dup & ~near] = WRITTEN
            status[dup], reason[dup] = DROPPED, "duplicate_image"
            if near.any():
                at = np.searchsorted(near_rows, rows[near])
                status[near] = DROPPED
                reason[near] = [f"near_duplicate:{k}" for k in near_kinds[at]]
                of[near] = [f"{r:0{self.width}d}" for r in near_roots[at].tolist()]
            recs = recs.set_column(recs.schema.get_field_index("status"), "status", pa.array(status, pa.string()))
            recs = recs.set_column(recs.schema.get_field_index("reason"), "reason", pa.array(reason, pa.string()))
            recs = recs.set_column(recs.schema.get_field_index("duplicate_of"), "duplicate_of",
                                   pa.array(of, pa.string()))
            with atomic_open(rd.fs, rd.path("_final", f"{t:05d}.parquet")) as f:
                pq.write_table(recs.cast(MANIFEST_SCHEMA), f)
            kept[str(t)] = int((cand & ~dup & ~near).sum())
        if seen_near != len(near_rows):
            raise AccountingError(f"{rd.url_of('_dups', f'near-{s:05d}.parquet')}: {len(near_rows)} rows, "
                                  f"{seen_near} of them in this slice's parts")
        return {"kept": kept, "duplicates": len(dups), "near_duplicates": seen_near}


# -- step 5: shards ------------------------------------------------------------------------------


class WriteShardsStep(Step):
    """Writes its range of shards and the manifests it owns (pipeline.shards.write_shard_range)."""

    name = "write_shards"
    what = "samples"

    def __init__(self, sources: list[Source], samples_per_shard: int, shards_dir: str, shards_per_task: int):
        self.sources, self.samples_per_shard, self.shards_dir = sources, samples_per_shard, shards_dir
        self.prefix, self.specs = plan_shard_tasks(sources, samples_per_shard, shards_per_task)

    def tasks(self) -> list[tuple]:
        return self.specs

    def total(self, specs: list[Any]) -> int:
        return self.prefix[-1]

    def run(self, ctx: TaskContext, spec: tuple, shared: Any = None) -> dict[str, Any]:
        done = [0]
        cpu0 = time.process_time()

        def on_sample() -> None:
            done[0] += 1
            ctx.progress(done[0], done[0])

        summary = write_shard_range(ctx.rd.fs, self.sources, self.prefix, spec, self.samples_per_shard,
                                    self.shards_dir, on_sample=on_sample)
        return {**summary, "progress_rows": summary["rows"], "progress_ok": summary["rows"],
                "cpu_seconds": round(time.process_time() - cpu0, 4), "peak_rss_mb": _peak_rss_mb()}


# -- the driver ----------------------------------------------------------------------------------


@dataclass
class BuildResult:
    rows_in: int
    written: int
    dropped: int
    failed: int
    reasons: Counter[str] = field(default_factory=Counter)
    shards: int = 0
    elapsed: float = 0.0
    root: str = ""
    rows_this_run: int = 0
    images_this_run: int = 0
    """Images downloaded and kept by this run's tasks (a resumed run skips finished tasks)."""
    already_complete: bool = False
    clip: str | None = None
    """With --clip-filter: what the CLIP-score filter did, one line."""
    near: str | None = None
    """With --dedup-within: the near-duplicate clusters found, one line."""

    @property
    def adds_up(self) -> bool:
        return self.rows_in == self.written + self.dropped + self.failed

    def accounting_line(self) -> str:
        return (f"rows in {self.rows_in} = written {self.written} + dropped {self.dropped} + failed {self.failed}"
                + ("" if self.adds_up else "  <-- DOES NOT ADD UP"))


def open_output(cfg: BuildConfig) -> RunDir:
    return RunDir(cfg.out, "build_corpus")


def _input_identity(files: list[InputFile]) -> list[dict[str, Any]]:
    return [{"url": f.url, "size": f.size, "version": f.version} for f in files]


def _check_input(cfg: BuildConfig, rd: RunDir, run: dict[str, Any], files: list[InputFile],
                 slices: list[InputSlice], executor: Any) -> bool:
    """True if the input is the one recorded. When its files changed (size, mtime, ETag), their
    columns are hashed again in tasks: the same content is accepted, other content refused
    naming the column that changed."""
    if run.get("input") == _input_identity(files):
        return True
    recorded = run.get("input_columns")
    if not isinstance(recorded, dict):
        return False
    summaries: list[dict[str, Any]] = []
    executor.run_tasks(CheckStep(cfg, slices), list(enumerate(range(len(slices)))), rd.url, rd.job, None,
                       lambda _i, s: summaries.append(s), lambda *_: None)
    summaries.sort(key=lambda s: s["task"])
    now = combine_digests([s["digests"] for s in summaries])
    changed = [f"input_fingerprint.{c}" for c in sorted(set(now) | set(recorded)) if now.get(c) != recorded.get(c)]
    if changed:
        raise SettingsChanged(f"{rd.url_of('run.json')}: the output folder holds a build_corpus run of other input "
                              f"(changed: {', '.join(changed)}); use a new --out, or delete the folder to start over")
    return True


def build_corpus(cfg: BuildConfig, executor: Any, matcher: Any = None) -> BuildResult:
    """Run the steps (see the module docstring) with `executor`; `matcher` removes eval-set overlap
    (dedup.removal.EvalOverlap) and goes to the tasks through the object store."""
    rd = open_output(cfg)
    rd.check_ours(LEGACY_RUN_KEYS)  # before the lock file: a foreign folder gets nothing written
    # A broad glob (data/**/*.parquet) may reach --out: its own files are never input.
    files = list_inputs(cfg.urls, exclude=rd.root)
    if check_columns(files, cfg.url_col, cfg.caption_col, cfg.extra_cols, not cfg.header) == 0:
        raise InputError(f"{cfg.urls}: no rows")
    slices = plan_slices(files)
    spec = weights = None
    if cfg.clip_filter:
        from scoring.model import resolve_weights

        # Checked before anything is written: the model, the checkpoint, and that its weights fit.
        spec, weights = resolve_weights(cfg.clip_filter, cfg.clip_pretrained or "")
    with rd.lock():
        run = rd.check_ours(LEGACY_RUN_KEYS)
        rd.check_links(OWN_NAMES)
        rd.check_foreign(OWN_NAMES)
        settings = {**cfg.output_settings()}
        if spec is not None:
            # The weights by content (sha256), not by how --clip-pretrained spells their path.
            settings = {k: v for k, v in settings.items() if k != "clip_pretrained"}
            settings["clip_model"] = spec.record()
        if run is not None:
            # The input is compared by its files' identity and content below, not by how --urls is spelled.
            skip = ("job", "input", "input_columns", "input_rows", "buckets", "near_buckets", "urls")
            old = {k: v for k, v in run.items() if k not in skip}
            changed = compare_settings(old, {k: v for k, v in settings.items() if k not in skip})
            if changed:
                raise SettingsChanged(
                    f"{rd.url_of('run.json')}: the output folder holds a build_corpus run with other settings "
                    f"({'; '.join(changed[:4])}); use a new --out, or delete the folder to start over")
            if not run.get("input_columns"):
                # The read step never finished (bad input found in it, or a kill): nothing was built
                # from the input yet, so a changed input starts the read over instead of being refused.
                if run.get("input") != _input_identity(files):
                    for sub in ("_input", "_keys", "_steps"):
                        rd.remove_own_files(sub, OWN_NAMES[sub])
            elif not _check_input(cfg, rd, run, files, slices, executor):
                raise SettingsChanged(f"{rd.url_of('run.json')}: the output folder holds a build_corpus run of other "
                                      "input; use a new --out, or delete the folder to start over")
            if rd.fs.exists(rd.path("stats.json")):
                return _already_complete(rd)
        rd.remove_temporaries(OWN_NAMES)
        buckets = run.get("buckets") if run else None
        near_buckets = run.get("near_buckets") if run else None
        for name, value in (("buckets", buckets), ("near_buckets", near_buckets)):
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise AccountingError(f"{rd.url_of('run.json')}: {name} {value!r} is not a positive whole number; "
                                      "the run record is damaged: use a new --out")
        buckets = buckets or cfg.dedup_buckets or n_buckets(_estimate_rows(files))
        record = {**settings, "input": _input_identity(files), "buckets": buckets}
        if cfg.dedup_within:
            from pipeline.near_dedup import keys_per_row

            # A row has dozens of band keys, not one: buckets for about as many keys each as the exact dedup's.
            record["near_buckets"] = near_buckets or cfg.dedup_buckets or n_buckets(
                _estimate_rows(files) * keys_per_row(cfg.near_settings()))
        if run and run.get("input_columns"):
            record["input_columns"], record["input_rows"] = run["input_columns"], run.get("input_rows")
        rd.write_run(record)
        atomic_write_bytes(rd.fs, rd.path("config.yaml"), to_yaml(cfg).encode())
        return _build(cfg, rd, slices, buckets, record, executor, matcher, spec, weights)


def _estimate_rows(files: list[InputFile]) -> int:
    return sum(max(1, f.size // 100) for f in files)


def _already_complete(rd: RunDir) -> BuildResult:
    try:
        with rd.fs.open(rd.path("stats.json"), "rb") as f:
            stats = json.load(f)
        counts = [int(stats[k]) for k in ("rows_in", "written", "dropped", "failed")]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        raise AccountingError(f"{rd.url_of('stats.json')}: unreadable (the mark of a finished build); delete it "
                              "and rerun the same command to finish the build again") from None
    removed = [p for sub in SCRATCH for p in rd.remove_own_files(sub, OWN_NAMES[sub])]
    log.info("%s holds a finished build of this input and settings: nothing to do%s", rd.url_of(),
             f" (removed {len(removed)} leftover scratch files)" if removed else "")
    reasons = stats.get("reasons") if isinstance(stats.get("reasons"), dict) else {}
    result = BuildResult(*counts, Counter(reasons), int(stats.get("shards") or 0), root=rd.url_of())
    result.already_complete = True
    return result


def _build(cfg: BuildConfig, rd: RunDir, slices: list[InputSlice], buckets: int, record: dict[str, Any],
           executor: Any, matcher: Any, spec: Any = None, weights: Any = None) -> BuildResult:
    t0 = time.monotonic()
    every = cfg.progress_every
    read = run_step(rd, ReadStep(cfg, slices, buckets), executor, progress_every=every)
    rows = [int(s["rows"]) for s in read]
    offsets = [0]
    for n in rows:
        offsets.append(offsets[-1] + n)
    if offsets[-1] == 0:
        raise InputError(f"{cfg.urls}: no rows")
    if not record.get("input_columns"):
        record["input_columns"] = combine_digests([s["digests"] for s in read])
        record["input_rows"] = offsets[-1]
        rd.write_run(record)
    plan = Plan(slices, rows, offsets, buckets, cfg.rows_per_task)
    width = key_width(plan.n_rows)
    log.info("%d input rows in %d slices, %d download tasks of up to %d rows, %d dedup buckets; executor %s",
             plan.n_rows, len(slices), len(plan.download_tasks()), cfg.rows_per_task, buckets, executor.name)
    keys = [rd.url_of("_keys", f"url-{s:05d}.parquet") for s in range(len(slices))]
    run_step(rd, DedupStep("url_dedup", keys, rd.url_of("_dups", "url"), buckets), executor, progress_every=every)
    run_step(rd, GatherStep("url_gather", "url", len(slices), buckets), executor, progress_every=every)
    shared = executor.put(matcher) if matcher is not None else None
    t_download = time.monotonic()
    downloads = run_step(rd, DownloadStep(cfg, plan, width, matcher is not None), executor, shared=shared,
                         progress_every=every)
    download_seconds = time.monotonic() - t_download
    run_step(rd, ShaKeysStep(plan), executor, progress_every=every)
    keys = [rd.url_of("_keys", f"sha-{s:05d}.parquet") for s in range(len(slices))]
    run_step(rd, DedupStep("sha_dedup", keys, rd.url_of("_dups", "sha"), buckets), executor, progress_every=every)
    near = cfg.near_settings()
    near_summary = near_section = None
    if near is not None:
        # Near-duplicates before the CLIP filter: fewer samples to score (pipeline.near_dedup).
        from dedup.report import NearSection
        from pipeline.near_dedup import NearClusterStep, NearPairsStep

        run_step(rd, NearKeysStep(plan, near, record["near_buckets"]), executor, progress_every=every)
        n_slices = len(slices)
        run_step(rd, NearPairsStep([rd.url_of("_keys", f"near-{s:05d}.parquet") for s in range(n_slices)],
                                   [rd.url_of("_near", f"feat-{s:05d}.parquet") for s in range(n_slices)],
                                   plan.slice_offsets, rd.url_of("_near"), record["near_buckets"], near),
                 executor, progress_every=every)
        near_summary = run_step(rd, NearClusterStep(rd.url_of("_near"), record["near_buckets"], plan.slice_offsets,
                                                    rd.url_of("_dups"), near.kinds), executor, progress_every=every)[0]
        if "report" not in near_summary:
            raise AccountingError(f"{rd.url_of('_steps', 'near_cluster.json')}: written by an older clipforge (no "
                                  "clusters for the report); delete the folder's _steps/near_cluster* and rerun")
        # The report's clusters: thumbnails made in the tasks of the slices that hold them.
        thumbs = NearThumbsStep(plan, [r for c in near_summary["report"] for r in (c["root"], *c["shown"])])
        run_step(rd, thumbs, executor, progress_every=every)
        near_section = NearSection(
            {k: near_summary[k] for k in ("clusters_by_kind", "removed", "report")},
            [rd.url_of("_near", f"shown-{s:05d}.parquet") for s in thumbs.slices],
            {k: getattr(near.match, k) for k in ("text_threshold", "ngram", "image_max_distance",
                                                 "image_min_similarity")})
    settled = run_step(rd, SettleStep(plan, width, near is not None), executor, progress_every=every)
    kept: dict[int, int] = {}
    for s in settled:
        kept.update({int(t): int(n) for t, n in s["kept"].items()})
    parts = plan.download_tasks()
    if sorted(kept) != [p[0] for p in parts]:
        raise AccountingError(f"{rd.url_of('_steps', 'settle')}: kept counts for {len(kept)} parts, "
                              f"{len(parts)} planned")
    clip = None
    written: list[dict[str, Any]] = []  # WriteShardsStep's summaries (--clip-filter writes through its own steps)
    if spec is not None:
        # --clip-filter: score the parts' kept samples, keep by the rules, write the shards with their
        # scores and the embeddings beside them (scoring.job's steps; rows already decided keep their fate).
        from scoring.job import ScoreInput, format_keep, score_and_write

        inputs = [ScoreInput(stem=f"{p[0]:05d}", tar=rd.url_of("parts", f"{p[0]:05d}.tar"),
                             rows=plan.part_rows(p)[1] - plan.part_rows(p)[0], first_row=plan.part_rows(p)[0],
                             records=rd.url_of("_final", f"{p[0]:05d}.parquet")) for p in parts]
        clip = score_and_write(rd, executor, cfg.clip_settings(), spec, inputs, cfg.samples_per_shard, plan.n_rows,
                               work="_clip", progress_every=every, weights=weights)
        result = clip.result
    else:
        sources = [Source(rd.url_of("parts", f"{t:05d}.tar"), rd.url_of("_final", f"{t:05d}.parquet"), kept[t],
                          rd.url_of("manifest", f"{t:05d}.parquet")) for t, *_ in parts]
        writer = WriteShardsStep(sources, cfg.samples_per_shard, rd.url_of("shards"), SHARDS_PER_TASK)
        written = run_step(rd, writer, executor, progress_every=every)
        verify_earlier_shards(rd, writer, written, executor)
        result = finish_shards(rd, written, plan.n_rows, writer.prefix[-1], cfg.samples_per_shard)
    corpus = {"input": cfg.urls, "rows": result.rows_in, WRITTEN: result.written, DROPPED: result.dropped,
              FAILED: result.failed}
    sections = [near_section] if near_section is not None else []
    if matcher is not None:
        from dedup.removal import merge_overlap

        merge_overlap(rd, executor, shared, [rd.url_of("parts", f"{t:05d}.matches.parquet") for t, *_ in parts],
                      corpus, sections=sections)
    elif sections:
        # No eval sets: report.html holds the near-duplicate section alone.
        run_step(rd, NearReportStep(near_section, corpus), executor, progress_every=every)
    elapsed = time.monotonic() - t0
    # Rates count this run's work only: a resumed run did not write what earlier runs did.
    this_run = [s for s in downloads if s.get("seconds") is not None and s.get("this_run", True)]
    result.rows_this_run = sum(int(s["rows"]) for s in this_run if s.get("fresh"))
    result.images_this_run = sum(int(s["candidates"]) for s in this_run if s.get("fresh"))
    stage_totals: Counter[str] = Counter()
    cpu: Counter[str] = Counter(dict.fromkeys(("fetch", "resize", "write_parts", "download_task"), 0.0))
    for s in downloads:
        stage_totals.update(s.get("stage_stats", {}))
        if s.get("fresh") and s.get("this_run", True):
            cpu.update(s.get("cpu_seconds", {}))
    cpu["write_shards"] = sum(float(s.get("cpu_seconds", 0)) for s in written if s.get("fresh"))
    peak = [float(s["peak_rss_mb"]) for s in (*downloads, *written) if s.get("fresh") and "peak_rss_mb" in s]
    stats = {
        "rows_in": result.rows_in, "written": result.written, "dropped": result.dropped, "failed": result.failed,
        "shards": result.shards, "reasons": dict(result.reasons.most_common()),
        "stages": dict(sorted(stage_totals.items())),
        "seconds": {"download": round(download_seconds, 3), "total": round(elapsed, 3)},
        "rows_this_run": result.rows_this_run,
        "images_this_run": result.images_this_run,
        "rows_per_second": round(result.rows_this_run / max(1e-9, elapsed), 2),
        "images_per_second": round(result.images_this_run / max(1e-9, elapsed), 2),
        "nodes": sorted({s["node"] for s in downloads if s.get("node")}),
        # The driver's own high-water mark: it holds O(tasks) state, so this must not grow with rows.
        "driver_peak_rss_mb": _peak_rss_mb(),
        # This run's tasks: CPU seconds by stage, and the largest peak RSS of the processes that ran them.
        "cpu_seconds": {k: round(v, 3) for k, v in sorted(cpu.items())},
        "worker_peak_rss_mb": max(peak, default=None),
    }
    if near_summary is not None:
        stats["near_duplicates"] = {"clusters": near_summary["clusters"], "removed": near_summary["removed"],
                                    "clusters_by_kind": near_summary["clusters_by_kind"],
                                    "edges": near_summary["edges"]}
        result.near = f"{format_near(near_summary)}; the largest in {rd.url_of('audit', 'report.html')}"
    if clip is not None:
        stats["clip"] = {"keep": clip.keep, "model": clip.model, "histogram": clip.histogram}
        result.clip = format_keep(clip.keep, clip.model)
    atomic_write_json(rd.fs, rd.path("stats.json"), stats)  # written last: the run is complete
    if not cfg.keep_parts:
        for sub in SCRATCH:
            rd.remove_own_files(sub, OWN_NAMES[sub])
    result.elapsed, result.root = elapsed, rd.url_of()
    return result


class VerifyShardsStep(Step):
    """Reads back the shards and manifests that earlier runs wrote (this run's writers checked their own)."""

    name = "verify_shards"
    what = "tasks"
    markers = False

    def __init__(self, writer: Any):
        self.writer = writer

    def run(self, ctx: TaskContext, spec: tuple, shared: Any = None) -> dict[str, Any]:
        from pipeline.shards import read_tar

        first, end, _reads, owned = spec
        w = self.writer
        fs = ctx.rd.fs
        for k in range(first, end):
            path = f"{w.shards_dir}/{shard_name(k)}"
            lo = k * w.samples_per_shard
            want = min(w.samples_per_shard, w.prefix[-1] - lo)
            try:
                got = sum(1 for _ in read_tar(fs, path))
            except (ShardError, FileNotFoundError) as exc:
                raise AccountingError(f"{path}: unreadable since it was written ({exc}); delete "
                                      f"{ctx.rd.url_of('_steps', 'write_shards.json')} and rerun") from None
            if got != want:
                raise AccountingError(f"{path}: holds {got} samples, {want} were written; delete "
                                      f"{ctx.rd.url_of('_steps', 'write_shards.json')} and rerun")
        for j in owned:
            src = w.sources[j]
            try:
                with fs.open(src.manifest, "rb") as f:
                    n = pq.read_metadata(f).num_rows
                with fs.open(src.records, "rb") as f:
                    expect = pq.read_metadata(f).num_rows
            except (FileNotFoundError, pa.ArrowInvalid, OSError) as exc:
                raise AccountingError(f"{src.manifest}: unreadable since it was written ({type(exc).__name__}); "
                                      f"delete {ctx.rd.url_of('_steps', 'write_shards.json')} and rerun") from None
            if n != expect:
                raise AccountingError(f"{src.manifest}: {n} rows, {expect} expected; delete "
                                      f"{ctx.rd.url_of('_steps', 'write_shards.json')} and rerun")
        return {"shards": end - first}


def verify_earlier_shards(rd: RunDir, writer: Any, written: list[dict[str, Any]], executor: Any) -> None:
    """A resumed run trusts no shard it did not write itself: the writer tasks of earlier runs are
    read back (in tasks, like everything per byte) before success is reported."""
    earlier = [(i, spec) for i, (spec, s) in enumerate(zip(writer.specs, written, strict=True)) if not s.get("fresh")]
    if earlier:
        executor.run_tasks(VerifyShardsStep(writer), earlier, rd.url, rd.job, None, lambda *_: None, lambda *_: None)


def finish_shards(rd: RunDir, written: list[dict[str, Any]], n_rows: int, n_kept: int,
                  samples_per_shard: int) -> BuildResult:
    """sizes.json from the writers' summaries, and the checks that everything adds up (both jobs)."""
    sizes: dict[str, int] = {}
    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for s in written:
        sizes.update(s["sizes"])
        counts.update(s["counts"])
        reasons.update(s["reasons"])
    names = [shard_name(i) for i in range(len(sizes))]
    if sorted(sizes) != names:
        raise ShardError(f"{rd.url_of('shards')}: the writers wrote shards {sorted(sizes)[:3]}..., not a contiguous "
                         "run from 00000.tar; delete the folder's _steps/write_shards* and rerun")
    full = [n for i, n in enumerate(sizes[k] for k in names) if i < len(names) - 1 and n != samples_per_shard]
    if full or sum(sizes.values()) != n_kept:
        raise ShardError(f"{rd.url_of('shards')}: shard sizes do not add up to the {n_kept} kept samples")
    on_disk = sorted(n for n in rd.names("shards") if re.fullmatch(r"\d{5,}\.tar", n))
    if on_disk != names:
        raise ShardError(f"{rd.url_of('shards')}: holds {len(on_disk)} tars, the writers wrote {len(names)}")
    atomic_write_json(rd.fs, rd.path("shards", SIZES_FILE), {k: sizes[k] for k in names})
    result = BuildResult(n_rows, counts[WRITTEN], counts[DROPPED], counts[FAILED], reasons, len(names))
    if result.written != n_kept:
        raise AccountingError(f"{rd.url_of('manifest')}: the manifests say {result.written} written, the shards "
                              f"hold {n_kept}")
    other = set(counts) - {WRITTEN, DROPPED, FAILED}
    if other:
        raise AccountingError(f"{rd.url_of('manifest')}: rows with status {sorted(other)}")
    return result


def format_near(summary: dict[str, Any]) -> str:
    """The near_cluster step's counts as the summary's line (a cluster: a kept sample and its copies)."""
    removed = summary["removed"]
    return (f"{summary['clusters']} clusters, removed {sum(removed.values())} "
            f"({', '.join(f'{k} {v}' for k, v in removed.items())})")


def print_summary(result: BuildResult) -> None:
    """The end-of-run summary; its last line is the accounting line."""
    elapsed, root = result.elapsed, result.root
    if result.already_complete:
        print(f"corpus in {root}/shards is complete ({result.shards} shards, {result.written} samples); "
              "nothing to do")
    else:
        print(f"corpus written to {root}/shards: {result.shards} shards, {result.written} samples; this run: "
              f"{result.rows_this_run} rows in {fmt_duration(elapsed)} "
              f"({result.images_this_run / max(1e-9, elapsed):.1f} images/s)")
    if result.near:
        print(f"near-duplicates within the corpus: {result.near}")
    if result.clip:
        print(f"CLIP-score filter: {result.clip}")
    top = result.reasons.most_common(10)
    if top:
        print("most common reasons a row was not written:")
        for reason, count in top:
            print(f"  {count:8d}  {reason}")
    print(result.accounting_line(), flush=True)


__all__ += ["ConfigError"]
