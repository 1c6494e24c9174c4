"""Eval-set overlap in the job layer: matched inside the tasks, merged into one audit by one task.

    python jobs/build_corpus.py --urls data/urls.parquet --out corpus/ --eval coco=evalsets/coco-5k

`EvalOverlap.from_args` builds the eval index once on the driver (a bad --eval fails
fast with a ConfigError). The job puts it in the object store once; each download task
(build_corpus) or match task (audit_overlap) asks `task_matcher()` for a matcher that
answers per sample (None = keep, else the manifest reason `eval_overlap:<set>:<kind>`)
and writes the task's match rows to a parquet file of its own.

`merge_overlap` then runs one task (on the driver's node, where the eval files are)
that streams every task's match file into `OUT/audit/overlap.parquet`, sums them into
`summary.json` without holding all matches at once, and draws `report.html` from the
first `report_max_pairs` pairs per eval set (thumbnails of the training images, which the
tasks keep for those pairs only). Both jobs write the same three files.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dedup.evalsets import EvalSet, EvalSetError, load_eval_set, parse_eval_arg
from dedup.matcher import KINDS, MatchConfig, OverlapMatcher
from pipeline.config import ConfigError
from pipeline.job import Step, TaskContext, run_step
from pipeline.rundir import RunDir
from pipeline.shards import atomic_open, atomic_write_json

log = logging.getLogger(__name__)

MATCH_SCHEMA = pa.schema([("key", pa.string()), ("uid", pa.string()), ("url", pa.string()), ("caption", pa.string()),
                          ("eval_set", pa.string()), ("eval_item", pa.string()), ("kind", pa.string()),
                          ("score", pa.float64()), ("similarity", pa.float64()), ("source_shard", pa.string()),
                          # Image matches: which eval view and variant matched, and the precise check's
                          # evidence (dedup.matcher.Match); null for text and sha256 matches.
                          ("view", pa.string()), ("colour_diff", pa.float64()), ("detail", pa.float64()),
                          ("residual", pa.float64()), ("displaced", pa.float64())])


def drop_reason(ms: list[dict], order: dict[str, int]) -> str:
    """The manifest reason for a sample with matches `ms`: the first eval set (in --eval order), image before text."""
    first = min(ms, key=lambda m: (order[m["eval_set"]], KINDS.index(m["kind"])))
    return f"eval_overlap:{first['eval_set']}:{first['kind']}"


def _str(v: Any) -> str | None:
    return None if v is None else str(v)


class EvalOverlap:
    """The eval sets and their index, built once on the driver; what every task receives."""

    def __init__(self, eval_sets: list[EvalSet], matcher: OverlapMatcher, report_max_pairs: int = 60,
                 timings: dict[str, float] | None = None):
        self.eval_sets, self.matcher = eval_sets, matcher
        self.report_max_pairs = report_max_pairs
        self.order = {es.name: i for i, es in enumerate(eval_sets)}
        self.timings: dict[str, float] = dict(timings or {})

    @classmethod
    def from_args(cls, evals: tuple[str, ...] | list[str], report_max_pairs: int = 60,
                  **match_kwargs: Any) -> EvalOverlap:
        """Load the NAME=PATH eval sets and build their index; `match_kwargs` override MatchConfig's thresholds.

        Raises ConfigError (one line, naming the path) for an eval set that cannot be used.
        """
        try:
            cfg = MatchConfig(**match_kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"eval overlap thresholds: {exc}") from None
        if report_max_pairs < 0:
            raise ConfigError(f"report_max_pairs must be >= 0, got {report_max_pairs}")
        if not evals:
            raise ConfigError("give at least one --eval NAME=PATH")
        try:
            eval_sets = [load_eval_set(*parse_eval_arg(e)) for e in evals]
        except EvalSetError as exc:
            raise ConfigError(str(exc)) from None
        names = [es.name for es in eval_sets]
        if len(set(names)) != len(names):
            raise ConfigError(f"--eval: eval set names must be unique, got {names}")
        for es in eval_sets:
            if not es.items:
                raise ConfigError(f"{es.root}: eval set {es.name!r} holds no images")
        t0 = time.perf_counter()
        matcher = OverlapMatcher.build(eval_sets, cfg)
        build_s = round(time.perf_counter() - t0, 3)
        log.info("eval overlap: %s; index built in %.1fs",
                 ", ".join(f"{es.name} ({len(es.items)} {es.kind} items)" for es in eval_sets), build_s)
        return cls(eval_sets, matcher, report_max_pairs, {"eval_index_s": build_s})

    def task_matcher(self) -> TaskMatcher:
        return TaskMatcher(self)


class TaskMatcher:
    """One task's matcher: (key, caption, image, meta) -> drop reason or None; keeps the task's match
    rows, and a thumbnail of the first `report_max_pairs` matched images per eval set (the report's)."""

    def __init__(self, overlap: EvalOverlap):
        self.overlap = overlap
        self.rows: list[dict[str, Any]] = []
        self.thumbs: dict[str, bytes | None] = {}
        self._drawn: dict[str, set[str]] = defaultdict(set)
        self.checked = 0
        self.seconds = 0.0

    def _thumb(self, rows: list[dict[str, Any]], image: bytes | None) -> None:
        for r in rows:
            drawn = self._drawn[r["eval_set"]]
            if r["key"] in drawn or len(drawn) < self.overlap.report_max_pairs:
                drawn.add(r["key"])
                if r["key"] not in self.thumbs and image:
                    from dedup.report import small_jpeg

                    self.thumbs[r["key"]] = small_jpeg(image)

    def __call__(self, key: str, caption: str, image: bytes, meta: dict[str, Any],
                 source_shard: str | None = None) -> str | None:
        t0 = time.perf_counter()
        sha = meta.get("sha256")  # of the downloaded bytes: an eval file served as-is matches exactly
        found = self.overlap.matcher.match(key, caption, image, sha if isinstance(sha, str) else None)
        self.seconds += time.perf_counter() - t0
        self.checked += 1
        if not found:
            return None
        rows = [{"key": key, "uid": _str(meta.get("uid")), "url": _str(meta.get("url")), "caption": caption,
                 **asdict(m), "source_shard": source_shard} for m in found]
        self.rows.extend(rows)
        self._thumb(rows, image)
        return drop_reason(rows, self.overlap.order)

    def add(self, rows: list[dict[str, Any]], image: bytes | None = None) -> None:
        """Match rows found elsewhere (the audit's batched lookup) and the training image they matched."""
        self.rows.extend(rows)
        self._thumb(rows, image)

    def write(self, fs: Any, path: str) -> None:
        """The task's match rows plus a THUMB_COLUMN (the report's thumbnails, null for most rows)."""
        # In key order, not the order downloads finished: the file, and so overlap.parquet and the
        # report's choice of pairs, are the same on every run.
        rows = sorted(self.rows, key=lambda r: (r["key"], r["eval_set"], r["eval_item"], r["kind"]))
        table = pa.Table.from_pylist(rows, schema=_match_schema(rows))
        thumbs = [self.thumbs.get(r["key"]) for r in rows]
        table = table.append_column(pa.field(THUMB_COLUMN, pa.binary()), pa.array(thumbs, pa.binary()))
        with atomic_open(fs, path) as f:
            pq.write_table(table, f)


THUMB_COLUMN = "train_thumb"
"""In a task's match file only: the report's thumbnail of the training image (not in overlap.parquet)."""


def _match_schema(rows: list[dict[str, Any]]) -> pa.Schema:
    """MATCH_SCHEMA plus any evidence columns the matcher adds (kept as they come)."""
    extra = [k for k in (rows[0] if rows else {}) if k not in MATCH_SCHEMA.names]
    if not extra:
        return MATCH_SCHEMA
    return pa.schema(list(MATCH_SCHEMA) + [pa.field(k, pa.Table.from_pylist(rows).schema.field(k).type)
                                           for k in extra])


class OverlapSummary:
    """summary.json's per-set numbers, summed over match files one at a time."""

    def __init__(self, overlap: EvalOverlap):
        self.overlap = overlap
        self.items: dict[str, set[str]] = defaultdict(set)
        self.removed: dict[str, int] = defaultdict(int)
        self.kinds: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(KINDS, 0))

    def add(self, rows: list[dict[str, Any]], removed_keys: set[str] | None = None) -> None:
        """Rows of one task's file; every key of a sample is in the same file, so distinct keys add up.
        `removed_keys`: the samples actually dropped (None: every matched sample was)."""
        per_set_keys: dict[str, set[str]] = defaultdict(set)
        for m in rows:
            self.items[m["eval_set"]].add(m["eval_item"])
            self.kinds[m["eval_set"]][m["kind"]] += 1
            if removed_keys is None or m["key"] in removed_keys:
                per_set_keys[m["eval_set"]].add(m["key"])
        for name, keys in per_set_keys.items():
            self.removed[name] += len(keys)

    def summary(self, corpus: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
        sets: dict[str, Any] = {}
        mc = self.overlap.matcher.cfg
        thresholds = {"text_jaccard": mc.text_threshold, "ngram": mc.ngram, "num_perm": mc.num_perm,
                      "image_max_distance": mc.image_max_distance, "image_min_similarity": mc.image_min_similarity,
                      "kinds": list(mc.kinds), "min_caption_words": mc.min_caption_words}
        for s in self.overlap.matcher.sets:
            items = sorted(self.items.get(s.name, set()))
            n = len(s.item_ids)
            sets[s.name] = {
                "kind": s.kind, "layout": s.layout, "items": n, "items_with_overlap": len(items),
                "overlap_pct": round(100.0 * len(items) / n, 4) if n else 0.0,
                "train_samples_removed": self.removed.get(s.name, 0),
                "matches": dict(self.kinds[s.name]),
                "overlapping_items": items,
                "unreadable_items": len(s.unreadable),
                "thresholds": dict(thresholds),
                "timings": s.timings,
            }
        return {"eval_sets": sets, "corpus": corpus, "timings": timings}


class OverlapMergeStep(Step):
    """One task: every match file -> audit/overlap.parquet, summary.json, config.json, report.html."""

    name = "overlap"
    what = "files"
    on_driver_node = True
    """The report reads eval images from the paths the driver loaded them from."""

    def __init__(self, match_files: list[str], corpus: dict[str, Any], removed_files: list[str | None] | None = None,
                 sections: Sequence[Any] = ()):
        self.match_files, self.corpus = match_files, corpus
        self.removed_files = removed_files
        self.sections = list(sections)
        """More of the report (dedup.report.NearSection: build_corpus --dedup-within), drawn here from what
        their tasks wrote."""

    def tasks(self) -> list[int]:
        return [0]

    def run(self, ctx: TaskContext, spec: int, shared: Any = None) -> dict[str, Any]:
        from dedup.report import write_report

        overlap: EvalOverlap = shared
        rd = ctx.rd
        t0 = time.perf_counter()
        acc = OverlapSummary(overlap)
        report_keys: dict[str, set[str]] = defaultdict(set)
        report_rows: list[dict[str, Any]] = []
        train_images: dict[str, bytes] = {}
        n_rows = 0
        out_path = rd.path("audit", "overlap.parquet")
        writer = None
        with atomic_open(rd.fs, out_path) as out:
            for i, path in enumerate(self.match_files):
                with rd.fs.open(path, "rb") as f:
                    t = pq.read_table(f)
                if THUMB_COLUMN in t.column_names:
                    for key, thumb in zip(t.column("key").to_pylist(), t.column(THUMB_COLUMN).to_pylist(),
                                          strict=True):
                        if thumb is not None and key not in train_images and len(train_images) < self._max_thumbs(overlap):
                            train_images[key] = thumb
                    t = t.drop_columns([THUMB_COLUMN])
                if writer is None:
                    # The first file's schema (MATCH_SCHEMA plus the matcher's evidence columns).
                    writer = pq.ParquetWriter(out, t.schema if t.num_columns else MATCH_SCHEMA)
                if t.num_rows:
                    writer.write_table(t.cast(writer.schema) if t.schema != writer.schema else t)
                rows = t.to_pylist()
                n_rows += len(rows)
                acc.add(rows, self._removed(rd, i))
                for r in rows:
                    drawn = report_keys[r["eval_set"]]
                    if r["key"] in drawn or len(drawn) < overlap.report_max_pairs:
                        drawn.add(r["key"])
                        report_rows.append(r)
                ctx.progress(i + 1, i + 1)
            if writer is None:
                writer = pq.ParquetWriter(out, MATCH_SCHEMA)
            writer.close()
        drawn = {r["key"] for r in report_rows}
        train_images = {k: v for k, v in train_images.items() if k in drawn}
        timings = {**overlap.timings, "merge_s": round(time.perf_counter() - t0, 3)}
        summary = acc.summary(self.corpus, timings)
        atomic_write_json(rd.fs, rd.path("audit", "config.json"),
                          {"evals": [f"{es.name}={es.root}" for es in overlap.eval_sets],
                           "match": overlap.matcher.cfg.thresholds(), "report_max_pairs": overlap.report_max_pairs})
        write_report(overlap.eval_sets, summary, report_rows, train_images, report_keys,
                     rd.url_of("audit", "report.html"), [s.html(rd.fs) for s in self.sections])
        with rd.fs.open(out_path, "rb") as f:  # read back what matters: every match row is there
            if pq.read_metadata(f).num_rows != n_rows:
                raise RuntimeError(f"{out_path}: holds other than the {n_rows} match rows written")
        atomic_write_json(rd.fs, rd.path("audit", "summary.json"), summary)  # last: the audit is complete
        return {"matches": n_rows, "summary": {n: s["items_with_overlap"] for n, s in summary["eval_sets"].items()}}

    @staticmethod
    def _max_thumbs(overlap: EvalOverlap) -> int:
        return max(1, overlap.report_max_pairs) * max(1, len(overlap.eval_sets)) * 4

    def _removed(self, rd: RunDir, i: int) -> set[str] | None:
        if not self.removed_files or self.removed_files[i] is None:
            return None
        with rd.fs.open(self.removed_files[i], "rb") as f:
            t = pq.read_table(f, columns=["key", "reason"])
        return {k for k, r in zip(t.column("key").to_pylist(), t.column("reason").to_pylist(), strict=True)
                if r and r.startswith("eval_overlap:")}


def merge_overlap(rd: RunDir, executor: Any, overlap: Any, match_files: list[str], corpus: dict[str, Any],
                  removed_files: list[str | None] | None = None, sections: Sequence[Any] = ()) -> dict[str, Any]:
    """Run the merge step (`sections`: more of report.html, see OverlapMergeStep); returns summary.json's content."""
    shared = overlap if not isinstance(overlap, EvalOverlap) else executor.put(overlap)
    run_step(rd, OverlapMergeStep(match_files, corpus, removed_files, sections), executor, shared=shared)
    with rd.fs.open(rd.path("audit", "summary.json"), "rb") as f:
        summary = json.load(f)
    log.info("eval overlap: %s", json.dumps({n: s["items_with_overlap"] for n, s in summary["eval_sets"].items()}))
    return summary


# The name build_corpus used before the job layer.
EvalRemoval = EvalOverlap
