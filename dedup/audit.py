"""The data-overlap audit: find training samples that overlap eval sets, write the corpus without them.

Two phases, so that the expensive part runs in parallel and the output keeps
build_corpus's layout (contiguous shard numbering, full shards):

1. `run_task(task_index, n_tasks)` (parallel, one process per task, the eval
   index shared read-only): for each of its input shards, fingerprint every
   sample and look it up; write `OUT/_work/<shard>.parquet` (one row per
   sample) and `<shard>.matches.parquet`, then a completion marker
   `<shard>.done.json` last. A rerun skips shards whose marker carries the
   same fingerprint; a half-finished shard is redone. The fingerprint covers
   what the results depend on (thresholds; the corpus's path, sizes.json and
   its shards' sizes and mtimes; each eval set's items with their files' sizes
   and mtimes), and
   `OUT/run.json` keeps it in readable form: a rerun into the same --out with
   another corpus, eval set or thresholds is refused with what changed, as
   build_corpus does, instead of reusing results of the other input.
2. `finalize()` (one process, I/O only): copies the kept samples' bytes in
   input order through `ShardSetWriter` into `OUT/shards/`, writes
   `OUT/manifest/*.parquet` (one row per input sample), `OUT/audit/overlap.parquet`,
   `summary.json` and `report.html`, then reads the shards back and checks
   that the counts add up.

The input corpus is only read. Memory: the eval index plus one shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from dedup import image as im
from dedup.evalsets import EvalSet, EvalSetError, load_eval_set, parse_eval_arg
from dedup.matcher import KINDS, MatchConfig, OverlapMatcher
from pipeline.sample import DROPPED, FAILED, WRITTEN
from pipeline.shards import (
    IMAGE_EXTS,
    SIZES_FILE,
    ShardSetWriter,
    atomic_write_bytes,
    atomic_write_json,
    changed_settings,
    get_fs,
    join,
    read_tar,
    verify_shards,
)

log = logging.getLogger(__name__)

SAMPLE_SCHEMA = pa.schema([("key", pa.string()), ("status", pa.string()), ("reason", pa.string()),
                           ("uid", pa.string()), ("url", pa.string()), ("caption", pa.string())])
MATCH_SCHEMA = pa.schema([("key", pa.string()), ("uid", pa.string()), ("url", pa.string()), ("caption", pa.string()),
                          ("eval_set", pa.string()), ("eval_item", pa.string()), ("kind", pa.string()),
                          ("score", pa.float64()), ("similarity", pa.float64()), ("source_shard", pa.string()),
                          # image matches: which eval view/variant matched, and the precise check's evidence
                          ("view", pa.string()), ("colour_diff", pa.float64()), ("detail", pa.float64())])
MANIFEST_SCHEMA = pa.schema([("key", pa.string()), ("fate", pa.string()), ("reason", pa.string()),
                             ("shard", pa.string()), ("source_shard", pa.string())])


class AuditError(RuntimeError):
    """Bad input: the message names the file and the problem (the CLI prints it and exits 2)."""


@dataclass(kw_only=True)
class AuditConfig:
    """One audit run: inputs, outputs and what counts as overlap."""

    corpus: str
    """build_corpus output (CORPUS/shards/*.tar + sizes.json), or the shards folder itself."""
    evals: list[str]
    """Eval sets as NAME=PATH."""
    out: str
    """Output folder: shards/, manifest/, audit/ (and _work/ for resumable task results)."""
    match: MatchConfig = field(default_factory=MatchConfig)
    """Thresholds."""
    samples_per_shard: int | None = None
    """Samples per clean shard; default: the input's (its first shard's size)."""
    batch_size: int = 256
    """Samples fingerprinted and looked up together."""
    report_max_pairs: int = 60
    """Side-by-side pairs drawn per eval set in report.html (overlap.parquet has them all)."""

    def __post_init__(self) -> None:
        if not self.evals:
            raise ValueError("give at least one --eval NAME=PATH")
        if self.samples_per_shard is not None and self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class AuditContext:
    """Everything a task needs; pickled once per worker (the matcher is the big part)."""

    cfg: AuditConfig
    shards_dir: str
    shards: list[str]
    sizes: dict[str, int]
    matcher: OverlapMatcher
    fingerprint: str
    eval_kinds: dict[str, str]
    eval_sets: list[EvalSet]
    """Item lists (ids and paths, no pixels): the report reads a few eval images back."""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def work_dir(self) -> str:
        return join(get_fs(self.cfg.out)[1], "_work")


def resolve_shards_dir(corpus: str) -> str:
    fs, root = get_fs(corpus)
    for cand in (join(root, "shards"), root):
        if fs.exists(join(cand, SIZES_FILE)):
            return cand
    if not fs.exists(root):
        raise AuditError(f"{corpus}: corpus folder does not exist")
    raise AuditError(f"{join(root, 'shards', SIZES_FILE)}: missing; --corpus must be a build_corpus output "
                     "(CORPUS/shards/*.tar with sizes.json)")


def _abs(fs: Any, path: str) -> str:
    # Local paths resolved, so that "corpus" and "./corpus" are the same input and a moved symlink is not.
    return str(Path(path).resolve()) if isinstance(fs, LocalFileSystem) else path


def _corpus_digest(fs: Any, shards_dir: str, sizes_raw: bytes, shards: list[str]) -> str:
    h = hashlib.sha256(sizes_raw)
    # One listing, not a stat per shard. Sizes alone miss a rewritten corpus whose
    # tars pad to the same length, so the modification time counts too.
    listed = {Path(e["name"]).name: (e.get("size"), e.get("mtime") or e.get("LastModified") or e.get("updated"))
              for e in fs.ls(shards_dir, detail=True)}
    for name in shards:
        h.update(f"{name}:{listed.get(name)}\n".encode())
    return h.hexdigest()[:16]


def _eval_digest(es: EvalSet) -> str:
    h = hashlib.sha256()
    stats: dict[str, str] = {}
    for it in es.items:
        if it.path not in stats:
            try:
                st = Path(it.path).stat()
                stats[it.path] = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                stats[it.path] = "missing"
        h.update(f"{it.id}\t{it.path}\t{it.member}\t{stats[it.path]}\n".encode())
    return h.hexdigest()[:16]


def check_previous_run(fs: Any, root: str, settings: dict[str, Any]) -> None:
    """Refuse an --out that holds an audit of other input or thresholds (its _work/ results would be reused)."""
    path = join(root, "run.json")
    changed = changed_settings(fs, path, settings)
    if changed:
        raise AuditError(f"{path}: the output folder holds an audit of other input or settings "
                         f"({'; '.join(changed[:4])}); use a new --out, or delete the folder to start over")


def prepare(cfg: AuditConfig) -> AuditContext:
    """Check inputs, build the eval index once. Raises AuditError on bad input."""
    shards_dir = resolve_shards_dir(cfg.corpus)
    fs, _ = get_fs(cfg.corpus)
    out_fs, out_root = get_fs(cfg.out)
    if Path(out_root).resolve() in (Path(shards_dir).resolve(), Path(shards_dir).resolve().parent):
        raise AuditError(f"{cfg.out}: --out must not be the corpus folder (the input is never modified)")
    try:
        with fs.open(join(shards_dir, SIZES_FILE), "rb") as f:
            sizes_raw = f.read()
        sizes: dict[str, int] = json.loads(sizes_raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AuditError(f"{join(shards_dir, SIZES_FILE)}: not valid JSON ({exc})") from exc
    shards = sorted(sizes)
    for name in shards:
        if not fs.exists(join(shards_dir, name)):
            raise AuditError(f"{join(shards_dir, name)}: listed in {SIZES_FILE} but missing")
    try:
        eval_sets = [load_eval_set(*parse_eval_arg(e)) for e in cfg.evals]
    except EvalSetError as exc:
        raise AuditError(str(exc)) from exc
    names = [es.name for es in eval_sets]
    if len(set(names)) != len(names):
        raise AuditError(f"--eval: eval set names must be unique, got {names}")
    settings = {
        "corpus": _abs(fs, shards_dir),
        "corpus_digest": _corpus_digest(fs, shards_dir, sizes_raw, shards),
        "match": cfg.match.thresholds(),
        "evals": {es.name: {"root": str(Path(es.root).resolve()), "items": len(es.items), "digest": _eval_digest(es)}
                  for es in eval_sets},
    }
    # Checked before the (slow) eval index is built, and recorded before any task writes results.
    check_previous_run(out_fs, out_root, settings)
    atomic_write_json(out_fs, join(out_root, "run.json"), settings)
    t0 = time.perf_counter()
    matcher = OverlapMatcher.build(eval_sets, cfg.match)
    build_s = time.perf_counter() - t0
    fp_src = json.dumps(settings, sort_keys=True)
    return AuditContext(cfg, shards_dir, shards, sizes, matcher, hashlib.sha256(fp_src.encode()).hexdigest()[:16],
                        {es.name: es.kind for es in eval_sets}, eval_sets, {"eval_index_s": round(build_s, 3)})


def _decode_json(data: bytes | None) -> dict[str, Any]:
    if not data:
        return {}
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}


def write_parquet(fs: Any, path: str, rows: list[dict], schema: pa.Schema) -> None:
    table = pa.Table.from_pylist(rows, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(fs, path, buf.getvalue())


def audit_shard(ctx: AuditContext, shard: str) -> int:
    """Fingerprint and look up every sample of one input shard; write its results. Returns rows."""
    fs, _ = get_fs(ctx.cfg.corpus)
    out_fs, _ = get_fs(ctx.cfg.out)
    stem = shard.rsplit(".", 1)[0]
    samples: list[dict] = []
    matches: list[dict] = []
    batch: list[tuple[dict, str | None, im.ImageFeatures | None, list[str]]] = []

    def flush() -> None:
        found = ctx.matcher.match_features([b[1] for b in batch], [b[2] for b in batch], [b[3] for b in batch])
        for (row, _, _, _), ms in zip(batch, found, strict=True):
            for m in ms:
                matches.append({"key": row["key"], "uid": row["uid"], "url": row["url"], "caption": row["caption"],
                                **asdict(m), "source_shard": shard})
        batch.clear()

    for key, members in read_tar(fs, join(ctx.shards_dir, shard)):
        meta = _decode_json(members.get("json"))
        caption = members["txt"].decode("utf-8", "replace").strip() if "txt" in members else None
        row = {"key": key, "status": "ok", "reason": None, "uid": _str(meta.get("uid")), "url": _str(meta.get("url")),
               "caption": caption}
        img_ext = next((e for e in IMAGE_EXTS if e in members), None)
        feats = None
        if img_ext is None:
            row.update(status=FAILED, reason="missing_image")
        elif caption is None:
            row.update(status=FAILED, reason="missing_txt")
        elif "image" in ctx.cfg.match.kinds:
            feats = im.features(members[img_ext], ctx.cfg.match.crop)
            if feats is None:
                # Cannot be checked for overlap, so it cannot go into a corpus that claims to be clean.
                row.update(status=FAILED, reason="undecodable_image")
        samples.append(row)
        extra_sha = [meta["sha256"]] if isinstance(meta.get("sha256"), str) else []
        batch.append((row, caption, feats, extra_sha))
        if len(batch) >= ctx.cfg.batch_size:
            flush()
    if batch:
        flush()
    base = join(ctx.work_dir, stem)
    write_parquet(out_fs, base + ".parquet", samples, SAMPLE_SCHEMA)
    write_parquet(out_fs, base + ".matches.parquet", matches, MATCH_SCHEMA)
    atomic_write_json(out_fs, base + ".done.json", {"fingerprint": ctx.fingerprint, "rows": len(samples),
                                                    "matches": len(matches)})
    return len(samples)


def _str(v: Any) -> str | None:
    return None if v is None else str(v)


def _done(ctx: AuditContext, shard: str) -> bool:
    out_fs, _ = get_fs(ctx.cfg.out)
    marker = join(ctx.work_dir, shard.rsplit(".", 1)[0] + ".done.json")
    if not out_fs.exists(marker):
        return False
    with out_fs.open(marker, "rb") as f:
        return json.load(f).get("fingerprint") == ctx.fingerprint


def run_task(task_index: int, n_tasks: int, ctx: AuditContext) -> dict[str, float]:
    """Audit input shards task_index, task_index + n_tasks, ...; skips shards already done."""
    import cv2

    cv2.setNumThreads(1)  # one task per core; OpenCV's own threads would oversubscribe
    mine = ctx.shards[task_index::n_tasks]
    todo = [s for s in mine if not _done(ctx, s)]
    total = sum(ctx.sizes[s] for s in todo)
    t0 = time.perf_counter()
    rows = 0
    for shard in todo:
        rows += audit_shard(ctx, shard)
        el = time.perf_counter() - t0
        rate = rows / el if el else 0.0
        log.info("task %d/%d: %s done, %d/%d rows, %.0f rows/s, ETA %.0fs", task_index, n_tasks, shard, rows, total,
                 rate, (total - rows) / rate if rate else 0.0)
    return {"rows": rows, "shards": len(todo), "skipped": len(mine) - len(todo), "seconds": time.perf_counter() - t0}


MapFn = Callable[[AuditContext, int], list[dict[str, float]]]


def map_local(ctx: AuditContext, n_tasks: int) -> list[dict[str, float]]:
    """Run every task in this process, one after the other (tests, small corpora)."""
    return [run_task(i, n_tasks, ctx) for i in range(n_tasks)]


def drop_reason(ms: list[dict], order: dict[str, int]) -> str:
    """The manifest reason for a sample with matches `ms`: the first eval set (in --eval order), image before text."""
    first = min(ms, key=lambda m: (order[m["eval_set"]], KINDS.index(m["kind"])))
    return f"eval_overlap:{first['eval_set']}:{first['kind']}"


def finalize(ctx: AuditContext) -> dict[str, Any]:
    """Write the clean shards, manifest, overlap table, summary and report. Returns the summary."""
    from dedup.report import write_report

    t0 = time.perf_counter()
    cfg = ctx.cfg
    fs, _ = get_fs(cfg.corpus)
    out_fs, out_root = get_fs(cfg.out)
    missing = [s for s in ctx.shards if not _done(ctx, s)]
    if missing:
        raise AuditError(f"{join(ctx.work_dir, missing[0])}: task results missing for {len(missing)} shards; rerun")
    order = {name: i for i, name in enumerate(ctx.eval_kinds)}
    all_matches: list[dict] = []
    # An empty corpus (every download failed) is audited to an empty one, not a crash.
    samples_per_shard = cfg.samples_per_shard or max(ctx.sizes[ctx.shards[0]] if ctx.shards else 1, 1)
    shards_out = join(out_root, "shards")
    audit_dir = join(out_root, "audit")
    # summary.json says "this corpus is clean" (the trainer reads it): it must not outlive the shards
    # it described while new ones are written. It is written again last, once everything checks out.
    if out_fs.exists(join(audit_dir, "summary.json")):
        out_fs.rm(join(audit_dir, "summary.json"))
    if out_fs.exists(shards_out):
        out_fs.rm(shards_out, recursive=True)  # our own earlier output; stale tars would break numbering
    counts = {WRITTEN: 0, DROPPED: 0, FAILED: 0}
    removed: set[str] = set()
    # Which training images to keep for the report: the first pairs of each eval set.
    report_keys: dict[str, set[str]] = defaultdict(set)
    train_images: dict[str, bytes] = {}
    with ShardSetWriter(out_fs, shards_out, samples_per_shard) as writer:
        for shard in ctx.shards:
            base = join(ctx.work_dir, shard.rsplit(".", 1)[0])
            with out_fs.open(base + ".parquet", "rb") as f:
                rows = pq.read_table(f).to_pylist()
            with out_fs.open(base + ".matches.parquet", "rb") as f:
                ms = pq.read_table(f).to_pylist()
            all_matches.extend(ms)
            by_key: dict[str, list[dict]] = defaultdict(list)
            for m in ms:
                by_key[m["key"]].append(m)
                if len(report_keys[m["eval_set"]]) < cfg.report_max_pairs:
                    report_keys[m["eval_set"]].add(m["key"])
            wanted = set().union(*report_keys.values()) if report_keys else set()
            manifest: list[dict] = []
            it = iter(rows)
            for key, members in read_tar(fs, join(ctx.shards_dir, shard)):
                row = next(it, None)
                if row is None or row["key"] != key:
                    raise AuditError(f"{join(ctx.shards_dir, shard)}: changed since it was audited "
                                     f"(sample {key} vs {row and row['key']}); delete {ctx.work_dir} and rerun")
                if key in wanted:
                    img_ext = next((e for e in IMAGE_EXTS if e in members), None)
                    if img_ext:
                        train_images[key] = members[img_ext]
                if row["status"] == FAILED:
                    fate, reason, out_shard = FAILED, row["reason"], None
                elif key in by_key:
                    fate, reason, out_shard = DROPPED, drop_reason(by_key[key], order), None
                    removed.add(key)
                else:
                    fate, reason, out_shard = WRITTEN, None, writer.add(key, members)
                counts[fate] += 1
                manifest.append({"key": key, "fate": fate, "reason": reason, "shard": out_shard,
                                 "source_shard": shard})
            if next(it, None) is not None:
                raise AuditError(f"{join(ctx.shards_dir, shard)}: changed since it was audited (fewer samples); "
                                 f"delete {ctx.work_dir} and rerun")
            write_parquet(out_fs, join(out_root, "manifest", shard.rsplit(".", 1)[0] + ".parquet"), manifest,
                           MANIFEST_SCHEMA)
    # Check what we wrote: the shards read back and agree with sizes.json and the manifest.
    n_written = verify_shards(out_fs, shards_out, samples_per_shard)
    n_rows = sum(counts.values())
    if n_written != counts[WRITTEN] or n_rows != sum(ctx.sizes.values()):
        raise AuditError(f"{shards_out}: wrote {n_written} samples, manifest says {counts[WRITTEN]} written; "
                         f"input sizes.json {sum(ctx.sizes.values())} vs {n_rows} rows read")
    write_parquet(out_fs, join(audit_dir, "overlap.parquet"), all_matches, MATCH_SCHEMA)
    ctx.timings["finalize_s"] = round(time.perf_counter() - t0, 3)
    summary = build_summary(ctx, all_matches, counts, removed)
    atomic_write_json(out_fs, join(audit_dir, "config.json"), asdict(cfg))
    write_report(ctx.eval_sets, summary, all_matches, train_images, report_keys, join(audit_dir, "report.html"))
    atomic_write_json(out_fs, join(audit_dir, "summary.json"), summary)
    return summary


def build_summary(ctx: AuditContext, matches: list[dict], counts: dict[str, int],
                  removed: set[str] | None = None) -> dict[str, Any]:
    rows = sum(counts.values())
    return summarize(ctx.matcher, matches,
                     {"input": ctx.cfg.corpus, "rows": rows, **counts, "input_shards": len(ctx.shards)}, ctx.timings,
                     removed)


def summarize(matcher: OverlapMatcher, matches: list[dict], corpus: dict[str, Any],
              timings: dict[str, float], removed: set[str] | None = None) -> dict[str, Any]:
    """summary.json's content (shared by the audit job and removal during build_corpus).

    `corpus` needs at least input, rows, written, dropped and failed (report.html shows them).
    `removed`: keys of the samples actually dropped for overlap; a matched sample that failed
    for another reason (say its image does not decode but its sha256 matched) was not removed
    by the audit. None: every matched sample was removed.
    """
    sets: dict[str, Any] = {}
    mc = matcher.cfg
    thresholds = {"text_jaccard": mc.text_threshold, "ngram": mc.ngram, "num_perm": mc.num_perm,
                  "image_max_distance": mc.image_max_distance, "image_min_similarity": mc.image_min_similarity,
                  "kinds": list(mc.kinds), "min_caption_words": mc.min_caption_words}
    for s in matcher.sets:
        ms = [m for m in matches if m["eval_set"] == s.name]
        items = sorted({m["eval_item"] for m in ms})
        n = len(s.item_ids)
        sets[s.name] = {
            "kind": s.kind,
            "layout": s.layout,
            "items": n,
            "items_with_overlap": len(items),
            "overlap_pct": round(100.0 * len(items) / n, 4) if n else 0.0,
            "train_samples_removed": len({m["key"] for m in ms if removed is None or m["key"] in removed}),
            "matches": {k: sum(1 for m in ms if m["kind"] == k) for k in KINDS},
            "overlapping_items": items,
            "unreadable_items": len(s.unreadable),
            "thresholds": dict(thresholds),
            "timings": s.timings,
        }
    return {"eval_sets": sets, "corpus": corpus, "timings": timings}


def count_line(summary: dict[str, Any]) -> str:
    c = summary["corpus"]
    return f"rows in {c['rows']} = written {c[WRITTEN]} + dropped {c[DROPPED]} + failed {c[FAILED]}"


def run_audit(cfg: AuditConfig, map_fn: MapFn = map_local, n_tasks: int | None = None) -> dict[str, Any]:
    """prepare -> tasks (via map_fn) -> finalize. Returns summary.json's content."""
    ctx = prepare(cfg)
    t0 = time.perf_counter()
    map_fn(ctx, n_tasks or len(ctx.shards) or 1)
    ctx.timings["match_s"] = round(time.perf_counter() - t0, 3)
    return finalize(ctx)


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{'eval set':<16} {'kind':<15} {'items':>7} {'overlap':>8} {'pct':>7} {'removed':>8}"]
    for name, s in summary["eval_sets"].items():
        lines.append(f"{name:<16} {s['kind']:<15} {s['items']:>7} {s['items_with_overlap']:>8} "
                     f"{s['overlap_pct']:>6.2f}% {s['train_samples_removed']:>8}")
    return "\n".join(lines)


def demo(corpus: str, evals: dict[str, str], out: str, **match_kwargs: Any) -> dict[str, Any]:
    """For `make demo`: audit the demo corpus against eval set folders, print the per-set summary.

    demo("demo-out/corpus", {"shapes": "demo-out/evalsets/shapes"}, "demo-out/audited")
    """
    cfg = AuditConfig(corpus=corpus, evals=[f"{k}={v}" for k, v in evals.items()], out=out,
                      match=MatchConfig(**match_kwargs))
    summary = run_audit(cfg)
    print(format_summary(summary))
    print(f"report: {join(get_fs(out)[1], 'audit', 'report.html')}")
    print(count_line(summary))
    return summary
