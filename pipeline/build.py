"""Build a corpus: URL rows -> download tasks -> parts -> contiguous shards + manifest.

Two phases, both re-runnable:

1. `run_task(i, rows, cfg)` (one Ray task per chunk of input rows) runs the
   stages on its rows and writes `parts/{i:05d}.tar` (candidate samples, input
   order) and `parts/{i:05d}.parquet` (every row with its status), each to a
   temporary name renamed into place, then the marker `parts/{i:05d}.done.json`
   last. A rerun skips tasks whose marker exists.
2. `finalize` (driver) walks the parts in order, drops exact image duplicates
   (sha256, first occurrence wins) across the whole corpus, writes
   `shards/00000.tar ...` of exactly `samples_per_shard` samples, `sizes.json`,
   `manifest/{i:05d}.parquet`, reads every shard back, checks that the counts
   add up, and writes `stats.json` last. It is deterministic, so re-running it
   after a crash writes the same bytes.

Why two phases: download tasks finish with unpredictable numbers of good
samples, and shards must be full and numbered without gaps, so they can only
be cut once all candidates are known. The second phase only copies bytes.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import BuildConfig, to_yaml
from pipeline.filters import CaptionCleaner, CaptionFilter, DuplicateUrlFilter, ImageSizeFilter
from pipeline.progress import Progress, fmt_duration
from pipeline.readers import fingerprint
from pipeline.rundir import RunDir
from pipeline.sample import DROPPED, FAILED, PENDING, WRITTEN, Sample, run_stages
from pipeline.shards import (
    ShardError,
    ShardSetWriter,
    atomic_open,
    atomic_write_bytes,
    atomic_write_json,
    get_fs,
    join,
    read_tar,
    verify_shards,
    write_tar,
)

log = logging.getLogger("clipforge.build")

CANDIDATE = "candidate"
MANIFEST_SCHEMA = pa.schema([
    ("row", pa.int64()), ("key", pa.string()), ("url", pa.string()), ("status", pa.string()),
    ("reason", pa.string()), ("error", pa.string()), ("shard", pa.string()), ("sha256", pa.string()),
])


class AccountingError(RuntimeError):
    """The part files do not account for every input row exactly once (a damaged output)."""


def key_width(n_rows: int) -> int:
    return max(9, len(str(max(0, n_rows - 1))))


def part_path(root: str, index: int, suffix: str) -> str:
    return join(root, "parts", f"{index:05d}{suffix}")


def _samples(rows: pa.Table, width: int, extra_cols: tuple[str, ...]) -> Iterator[Sample]:
    for r in rows.to_pylist():
        s = Sample(
            key=f"{r['row']:0{width}d}", row=r["row"], url=r["url"] or "", caption=r["caption"],
            extra={c: r.get(c) for c in extra_cols},
        )
        s.meta["duplicate_url"] = r["duplicate_url"]
        yield s


def run_task(index: int, rows: pa.Table, cfg: BuildConfig, width: int) -> dict[str, Any]:
    """Download, filter and resize one chunk of rows into part files. Idempotent."""
    fs, root = get_fs(cfg.out)
    done_path = part_path(root, index, ".done.json")
    if fs.exists(done_path):
        with fs.open(done_path, "rb") as f:
            return json.load(f)
    # Worker-side imports: the download stages import OpenCV, which the driver need not pay for.
    from pipeline.download import DownloadStage, ErrorLog, ResizeStage
    from pipeline.fetch import Fetcher

    t0 = time.monotonic()
    errors = ErrorLog()
    cleaner = CaptionCleaner(cfg.max_caption_chars, truncate=cfg.long_captions == "truncate")
    filters = [
        DuplicateUrlFilter(),
        CaptionFilter(cfg.min_caption_words, cfg.min_caption_chars, cfg.max_caption_chars,
                      drop_long=cfg.long_captions == "drop"),
    ]
    download = DownloadStage(Fetcher(cfg.fetch_config()), cfg.threads, cfg.max_image_pixels, errors)
    size_filter = ImageSizeFilter(cfg.min_image_side, cfg.max_aspect_ratio)
    resize = ResizeStage(cfg.image_size, cfg.resize_mode, cfg.encode_format, cfg.encode_quality, errors,
                         max_decode_bytes=cfg.max_decode_bytes)
    stages = [cleaner, *filters, download, size_filter, resize]
    results = sorted(run_stages(_samples(rows, width, cfg.extra_cols), stages), key=lambda s: s.row)

    tar_samples = []
    records = []
    for s in results:
        status = CANDIDATE if s.status == PENDING else s.status
        if status == CANDIDATE:
            meta = {**s.extra, "url": s.url, "caption": s.caption, "key": s.key, **s.meta}
            members = {s.ext or cfg.encode_format: s.image or b"", "txt": (s.caption or "").encode(),
                       "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()}
            tar_samples.append((s.key, members))
        records.append({"row": s.row, "key": s.key, "url": s.url, "status": status, "reason": s.reason,
                        "error": s.error, "shard": None, "sha256": s.meta.get("sha256")})
    with atomic_open(fs, part_path(root, index, ".tar")) as f:
        write_tar(f, tar_samples)
    with atomic_open(fs, part_path(root, index, ".parquet")) as f:
        pq.write_table(pa.Table.from_pylist(records, schema=MANIFEST_SCHEMA), f)
    counts = Counter(r["status"] for r in records)
    reasons = Counter(f"{r['status']}:{r['reason']}" for r in records if r["reason"])
    stage_stats: Counter[str] = Counter()
    # Prefixed by stage: every filter counts "seen" and "kept", which summed together mean nothing.
    for name, st in (("caption_cleaner", cleaner), *((f.name, f) for f in filters), (size_filter.name, size_filter)):
        stage_stats.update({f"{name}:{k}": v for k, v in st.stats.items()})
    summary = {"task": index, "rows": len(records), "candidates": counts[CANDIDATE], "dropped": counts[DROPPED],
               "failed": counts[FAILED], "reasons": dict(reasons), "stage_stats": dict(stage_stats),
               "seconds": round(time.monotonic() - t0, 3)}
    atomic_write_json(fs, done_path, summary)  # the completion marker, last
    return summary


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

    @property
    def adds_up(self) -> bool:
        return self.rows_in == self.written + self.dropped + self.failed

    def accounting_line(self) -> str:
        return (f"rows in {self.rows_in} = written {self.written} + dropped {self.dropped} + failed {self.failed}"
                + ("" if self.adds_up else "  <-- DOES NOT ADD UP"))


class Matcher(Protocol):
    """Removal of evaluation-set overlap before final sharding (dedup.removal.EvalRemoval)."""

    def __call__(self, key: str, caption: str, image: bytes, meta: dict[str, Any]) -> str | None:
        """A drop reason (e.g. eval_overlap:coco:image) or None to keep."""

    def finish(self, out: str) -> None:
        """Write the audit (OUT/audit/...) for everything matched so far."""


# The names this job writes, per sub-folder of --out: cleanup deletes nothing else, and
# anything else found there is refused (someone else's file must not be mistaken for ours).
OWN_NAMES = {
    "parts": re.compile(r"\d{5}\.(tar|parquet|done\.json)"),
    "shards": re.compile(r"\d{5}\.tar|sizes\.json"),
    "manifest": re.compile(r"\d{5}\.parquet"),
    "audit": re.compile(r"overlap\.parquet|summary\.json|config\.json|report\.html"),
}
SHARD_RE = re.compile(r"\d{5}\.tar")
MANIFEST_RE = re.compile(r"\d{5}\.parquet")
LEGACY_RUN_KEYS = ("input_fingerprint", "input_rows")
"""A run.json of clipforge 0.1's build_corpus (no "job" entry) holds these."""


def open_output(cfg: BuildConfig) -> RunDir:
    return RunDir(cfg.out, "build_corpus")


def done_tasks(fs: Any, root: str) -> set[int]:
    """Indexes of the tasks whose completion marker exists.

    One listing rather than an exists() per task: on object storage each is a request.
    """
    try:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(join(root, "parts"), detail=False)]
    except FileNotFoundError:
        return set()
    return {int(name[: -len(".done.json")]) for name in names
            if name.endswith(".done.json") and name[: -len(".done.json")].isdigit()}


def stage_totals(fs: Any, root: str, n_tasks: int) -> Counter[str]:
    """The stages' own counters (captions cleaned, truncated, ...) summed over every task's marker."""
    totals: Counter[str] = Counter()
    for i in range(n_tasks):
        with fs.open(part_path(root, i, ".done.json"), "rb") as f:
            totals.update(json.load(f).get("stage_stats", {}))
    return totals


def build_corpus(cfg: BuildConfig, table: pa.Table, executor: Any, matcher: Matcher | None = None) -> BuildResult:
    """Run both phases on `table` (columns url, caption, extras) with `executor`."""
    n = table.num_rows
    settings = {**cfg.output_settings(), "input_rows": n, "input_fingerprint": fingerprint(table)}
    rd = open_output(cfg)
    rd.check_ours(LEGACY_RUN_KEYS)  # before the lock file: a foreign folder gets nothing written
    with rd.lock():
        rd.claim(settings, OWN_NAMES, LEGACY_RUN_KEYS)
        return _build(cfg, rd, table, executor, matcher)


def _build(cfg: BuildConfig, rd: RunDir, table: pa.Table, executor: Any, matcher: Matcher | None) -> BuildResult:
    fs, root = rd.fs, rd.root
    n = table.num_rows
    width = key_width(n)
    fs.makedirs(join(root, "parts"), exist_ok=True)
    atomic_write_bytes(fs, join(root, "config.yaml"), to_yaml(cfg).encode())

    # Duplicate URLs are judged here, the only place that sees every row: first occurrence wins.
    seen: set[str] = set()
    dup = []
    for url in table.column("url").to_pylist():
        dup.append(url in seen)
        seen.add(url)
    table = table.append_column("row", pa.array(range(n), pa.int64())).append_column("duplicate_url", pa.array(dup))

    n_tasks = (n + cfg.rows_per_task - 1) // cfg.rows_per_task
    done = done_tasks(fs, root)
    todo = [i for i in range(n_tasks) if i not in done]
    already = sum(min(cfg.rows_per_task, n - i * cfg.rows_per_task) for i in range(n_tasks) if i in done)
    log.info("%d input rows in %d tasks of %d rows; %d tasks to run (%d done before); executor %s",
             n, n_tasks, cfg.rows_per_task, len(todo), n_tasks - len(todo), executor.name)
    progress = Progress(n, cfg.progress_every, already=already)
    t0 = time.monotonic()

    def on_result(_index: int, summary: dict[str, Any]) -> None:
        progress.update(summary["rows"], summary["candidates"])

    tasks = [(i, (i, table.slice(i * cfg.rows_per_task, cfg.rows_per_task), cfg, width)) for i in todo]
    executor.map(run_task, tasks, on_result, on_tick=progress.tick, tick_seconds=min(cfg.progress_every, 1.0))
    progress.tick(force=True)
    download_seconds = time.monotonic() - t0

    result = finalize(cfg, n_tasks, n, matcher, rd)
    if matcher is not None:
        matcher.finish(cfg.out)
    elapsed = time.monotonic() - t0
    # Rates count this run's work only: a resumed run did not write what earlier runs did.
    result.rows_this_run, result.images_this_run = progress.done_this_run, progress.ok
    stats = {
        "rows_in": result.rows_in, "written": result.written, "dropped": result.dropped, "failed": result.failed,
        "shards": result.shards, "reasons": dict(result.reasons.most_common()),
        "stages": dict(sorted(stage_totals(fs, root, n_tasks).items())),
        "seconds": {"download": round(download_seconds, 3), "total": round(elapsed, 3)},
        "rows_this_run": result.rows_this_run,
        "images_this_run": result.images_this_run,
        "rows_per_second": round(result.rows_this_run / max(1e-9, elapsed), 2),
        "images_per_second": round(result.images_this_run / max(1e-9, elapsed), 2),
    }
    atomic_write_json(fs, join(root, "stats.json"), stats)  # written last: the run is complete
    result.elapsed, result.root = elapsed, root
    return result


def finalize(cfg: BuildConfig, n_tasks: int, n_rows: int, matcher: Matcher | None = None,
             rd: RunDir | None = None) -> BuildResult:
    """Cut the shards from the parts; every one of the `n_rows` input rows must appear exactly once."""
    rd = rd or open_output(cfg)
    fs, root = rd.fs, rd.root
    shards_dir = join(root, "shards")
    # rows_in is the input's row count, not a count of what the parts hold: the check
    # that rows in = written + dropped + failed must be able to fail.
    result = BuildResult(n_rows, 0, 0, 0)
    seen_sha: set[str] = set()
    seen_rows = bytearray(n_rows)
    with ShardSetWriter(fs, shards_dir, cfg.samples_per_shard) as writer:
        for i in range(n_tasks):
            redo = f"delete {part_path(root, i, '.done.json')} and rerun to redo that task"
            try:
                # Closed here, not by the garbage collector: pyarrow reading a Python file that is
                # finalised during interpreter exit aborted the process ("terminate called without
                # an active exception") about one exit in 40 after an accounting error.
                with fs.open(part_path(root, i, ".parquet"), "rb") as fh:
                    records = pq.read_table(fh).to_pylist()
                members_by_key = dict(read_tar(fs, part_path(root, i, ".tar")))
            except FileNotFoundError as exc:
                raise AccountingError(f"{exc.filename or part_path(root, i, '')}: part file missing; {redo}") from None
            except (pa.ArrowInvalid, ShardError) as exc:
                raise AccountingError(f"{part_path(root, i, '.parquet')}: unreadable part "
                                      f"({str(exc).splitlines()[0][:160]}); {redo}") from None
            lo, hi = i * cfg.rows_per_task, min(n_rows, (i + 1) * cfg.rows_per_task)
            for rec in records:
                r = rec["row"]
                if r is None or not lo <= r < hi or seen_rows[r]:
                    what = "twice" if r is not None and lo <= r < hi else f"outside the task's rows {lo}..{hi - 1}"
                    raise AccountingError(f"{part_path(root, i, '.parquet')}: input row {r} appears {what}; {redo}")
                seen_rows[r] = 1
                if rec["status"] == CANDIDATE:
                    members = members_by_key.pop(rec["key"], None)
                    if members is None:
                        raise AccountingError(f"{part_path(root, i, '.tar')}: sample {rec['key']} missing; {redo}")
                    reason = None
                    if rec["sha256"] in seen_sha:
                        reason = "duplicate_image"
                    elif matcher is not None:
                        image = next(v for k, v in members.items() if k in ("jpg", "webp", "png", "jpeg"))
                        reason = matcher(rec["key"], members["txt"].decode(), image, json.loads(members["json"]))
                    if reason:
                        rec["status"], rec["reason"] = DROPPED, reason
                    else:
                        seen_sha.add(rec["sha256"])
                        rec["shard"] = writer.add(rec["key"], members)
                        rec["status"] = WRITTEN
                if rec["status"] == WRITTEN:
                    result.written += 1
                elif rec["status"] == DROPPED:
                    result.dropped += 1
                    result.reasons[f"dropped:{rec['reason']}"] += 1
                elif rec["status"] == FAILED:
                    result.failed += 1
                    result.reasons[f"failed:{rec['reason']}"] += 1
                else:
                    raise AccountingError(f"{part_path(root, i, '.parquet')}: row {r} has status {rec['status']}; {redo}")
            if sum(seen_rows[lo:hi]) != hi - lo:
                missing = next(r for r in range(lo, hi) if not seen_rows[r])
                raise AccountingError(f"{part_path(root, i, '.parquet')}: {hi - lo - sum(seen_rows[lo:hi])} input "
                                      f"row(s) missing, first {missing}; {redo}")
            with atomic_open(fs, join(root, "manifest", f"{i:05d}.parquet")) as f:
                pq.write_table(pa.Table.from_pylist(records, schema=MANIFEST_SCHEMA), f)
    sizes = writer.sizes
    result.shards = len(sizes)
    # Shards left by an earlier, different finalize (cannot happen with the settings
    # check, but a stale file must never be mistaken for part of this corpus): only our
    # own numbered names are candidates, never anything else in the folder.
    rd.remove_own("shards", SHARD_RE, keep=sizes)
    rd.remove_own("manifest", MANIFEST_RE, keep={f"{i:05d}.parquet" for i in range(n_tasks)})
    counted = verify_shards(fs, shards_dir, cfg.samples_per_shard)
    if counted != result.written:
        raise AccountingError(f"{shards_dir}: shards hold {counted} samples, the manifest says {result.written}")
    return result


def print_summary(result: BuildResult) -> None:
    """The end-of-run summary; its last line is the accounting line."""
    elapsed, root = result.elapsed, result.root
    print(f"corpus written to {root}/shards: {result.shards} shards, {result.written} samples; this run: "
          f"{result.rows_this_run} rows in {fmt_duration(elapsed)} "
          f"({result.images_this_run / max(1e-9, elapsed):.1f} images/s)")
    top = result.reasons.most_common(10)
    if top:
        print("most common reasons a row was not written:")
        for reason, count in top:
            print(f"  {count:8d}  {reason}")
    print(result.accounting_line(), flush=True)
