"""Eval-set overlap removal inside build_corpus: samples that overlap an eval set never reach a shard.

    python jobs/build_corpus.py --urls data/urls.parquet --out corpus/ --eval coco=evalsets/coco-5k

The eval index is built once, before any download (a bad --eval fails fast
with a ConfigError). `pipeline.build.finalize` then asks, on the driver and in
final order, about every candidate sample that survived the exact-duplicate
check; the answer is None (keep) or the manifest's drop reason
`eval_overlap:<set>:<image|text>`. `finish(out)` writes the same
OUT/audit/{overlap.parquet, summary.json, report.html} as jobs/audit_overlap.py.

Memory: the eval index, the match rows, and the image bytes of the matched
samples that report.html draws (at most `report_max_pairs` per eval set).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from dataclasses import asdict
from typing import Any

import pyarrow.parquet as pq

from dedup.audit import MATCH_SCHEMA, drop_reason, summarize, write_parquet
from dedup.evalsets import EvalSet, EvalSetError, load_eval_set, parse_eval_arg
from dedup.matcher import MatchConfig, OverlapMatcher
from dedup.report import write_report
from pipeline.config import ConfigError
from pipeline.sample import DROPPED, FAILED, WRITTEN
from pipeline.shards import atomic_write_json, get_fs, join

log = logging.getLogger(__name__)


class EvalRemoval:
    """The `Matcher` build_corpus calls per sample: (key, caption, image, meta) -> drop reason or None."""

    def __init__(self, eval_sets: list[EvalSet], matcher: OverlapMatcher, report_max_pairs: int = 60,
                 timings: dict[str, float] | None = None):
        self.eval_sets, self.matcher = eval_sets, matcher
        self.report_max_pairs = report_max_pairs
        self.order = {es.name: i for i, es in enumerate(eval_sets)}
        self.matches: list[dict] = []
        """One row per (training sample, eval item, kind), as overlap.parquet holds them."""
        self.report_keys: dict[str, set[str]] = defaultdict(set)
        self.train_images: dict[str, bytes] = {}
        """Image bytes of the matched samples drawn in report.html (nothing else is kept)."""
        self.checked = 0
        self.timings: dict[str, float] = dict(timings or {})
        self._match_s = 0.0

    @classmethod
    def from_args(cls, evals: tuple[str, ...] | list[str], report_max_pairs: int = 60,
                  **match_kwargs: Any) -> EvalRemoval:
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
        log.info("eval overlap removal: %s; index built in %.1fs",
                 ", ".join(f"{es.name} ({len(es.items)} {es.kind} items)" for es in eval_sets), build_s)
        return cls(eval_sets, matcher, report_max_pairs, {"eval_index_s": build_s})

    def __call__(self, key: str, caption: str, image: bytes, meta: dict[str, Any]) -> str | None:
        t0 = time.perf_counter()
        sha = meta.get("sha256")  # of the downloaded bytes: an eval file served as-is matches exactly
        found = self.matcher.match(key, caption, image, sha if isinstance(sha, str) else None)
        self._match_s += time.perf_counter() - t0
        self.checked += 1
        if not found:
            return None
        uid, url = meta.get("uid"), meta.get("url")
        rows = [{"key": key, "uid": None if uid is None else str(uid), "url": None if url is None else str(url),
                 "caption": caption, **asdict(m), "source_shard": None} for m in found]
        self.matches.extend(rows)
        for r in rows:
            drawn = self.report_keys[r["eval_set"]]
            if key in drawn or len(drawn) < self.report_max_pairs:
                drawn.add(key)
                self.train_images[key] = image
        return drop_reason(rows, self.order)

    def finish(self, out: str) -> dict[str, Any]:
        """Write OUT/audit/{overlap.parquet, summary.json, config.json, report.html}; returns the summary.

        Call after pipeline.build.finalize: the corpus counts are read from OUT/manifest/*.parquet.
        """
        t0 = time.perf_counter()
        fs, root = get_fs(out)
        counts: Counter[str] = Counter()
        for p in sorted(fs.glob(join(root, "manifest", "*.parquet"))):
            with fs.open(p, "rb") as f:
                counts.update(pq.read_table(f, columns=["status"]).column("status").to_pylist())
        corpus = {"input": root, "rows": sum(counts.values()), **{k: counts.get(k, 0) for k in (WRITTEN, DROPPED, FAILED)},
                  "checked": self.checked, "removed": len({m["key"] for m in self.matches})}
        audit_dir = join(root, "audit")
        write_parquet(fs, join(audit_dir, "overlap.parquet"), self.matches, MATCH_SCHEMA)
        timings = self.timings | {"match_s": round(self._match_s, 3)}
        summary = summarize(self.matcher, self.matches, corpus, timings)
        atomic_write_json(fs, join(audit_dir, "config.json"),
                          {"evals": [f"{es.name}={es.root}" for es in self.eval_sets],
                           "match": self.matcher.cfg.thresholds(), "report_max_pairs": self.report_max_pairs})
        write_report(self.eval_sets, summary, self.matches, self.train_images, self.report_keys,
                     join(audit_dir, "report.html"))
        summary["timings"]["finish_s"] = round(time.perf_counter() - t0, 3)
        atomic_write_json(fs, join(audit_dir, "summary.json"), summary)  # last: the audit is complete
        self._check(fs, audit_dir)
        log.info("eval overlap removal: %d samples checked, %d removed; %s", self.checked, corpus["removed"],
                 json.dumps({n: s["items_with_overlap"] for n, s in summary["eval_sets"].items()}))
        return summary

    def _check(self, fs: Any, audit_dir: str) -> None:
        """Read back what matters: overlap.parquet holds every match row."""
        path = join(audit_dir, "overlap.parquet")
        with fs.open(path, "rb") as f:
            n = pq.read_metadata(f).num_rows
        if n != len(self.matches):
            raise RuntimeError(f"{path}: holds {n} rows, expected {len(self.matches)}")
