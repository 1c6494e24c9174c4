"""The data-overlap audit: find training samples that overlap eval sets, write the corpus without them.

Steps of the one job layer (pipeline.job), as build_corpus's:

1. **match** (one task per group of input shards; the eval index goes to the object store
   once): fingerprint every sample and look it up in batches; write
   `OUT/_work/STEM.parquet` (every sample with its status: written, dropped with
   `eval_overlap:<set>:<kind>`, or failed) and `STEM.matches.parquet`.
2. **write_shards** (pipeline.shards.write_shard_range, shared with build_corpus): from
   prefix sums of the kept counts, each task copies its range of `OUT/shards/NNNNN.tar`
   out of the input shards, reads every shard back, and writes the manifests it owns
   (`OUT/manifest/STEM.parquet`, the same columns and status words as build_corpus's).
3. **overlap** (dedup.removal.merge_overlap, shared with build_corpus --eval): every
   match file into `OUT/audit/overlap.parquet`, `summary.json` and `report.html`.

The driver checks the inputs, claims the output folder (pipeline.rundir), writes
`shards/sizes.json` and checks that the counts add up. The input corpus (on disk or
object storage) is only read. A rerun resumes from the steps' markers; a rerun with
another corpus, eval set or thresholds is refused with what changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dedup import image as im
from dedup.evalsets import EvalSet, EvalSetError, load_eval_set, parse_eval_arg
from dedup.matcher import MatchConfig, OverlapMatcher
from dedup.removal import MATCH_SCHEMA, EvalOverlap, drop_reason, merge_overlap
from pipeline.build import WriteShardsStep
from pipeline.config import ConfigError
from pipeline.job import Step, TaskContext, run_step
from pipeline.rundir import OutputError, RunDir, resolve
from pipeline.sample import DROPPED, FAILED, WRITTEN
from pipeline.shards import (
    IMAGE_EXTS,
    MANIFEST_SCHEMA,
    SIZES_FILE,
    ShardError,
    Source,
    atomic_open,
    compare_settings,
    read_tar,
)

log = logging.getLogger(__name__)

__all__ = ["MATCH_SCHEMA", "AuditConfig", "AuditError", "run_audit", "summarize_counts"]

MAX_MATCH_TASKS = 512
"""Input shards are grouped into at most this many match tasks (each unpickles the eval index once)."""
SHARDS_PER_TASK = 8


class AuditError(ConfigError):
    """Bad input: the message names the file and the problem (the CLI prints it and exits 2)."""


@dataclass(kw_only=True)
class AuditConfig:
    """One audit run: inputs, outputs and what counts as overlap."""

    corpus: str
    """build_corpus output (CORPUS/shards/*.tar + sizes.json), or the shards folder itself (local or URL)."""
    evals: list[str]
    """Eval sets as NAME=PATH."""
    out: str
    """Output folder: shards/, manifest/, audit/ (and _work/, _steps/ while it runs)."""
    match: MatchConfig = field(default_factory=MatchConfig)
    """Thresholds."""
    samples_per_shard: int | None = None
    """Samples per clean shard; default: the input's (its first shard's size)."""
    batch_size: int = 256
    """Samples fingerprinted and looked up together."""
    report_max_pairs: int = 60
    """Side-by-side pairs drawn per eval set in report.html (overlap.parquet has them all)."""
    keep_work: bool = False
    """Keep _work/ and _steps/ after success."""

    def __post_init__(self) -> None:
        if not self.evals:
            raise ValueError("give at least one --eval NAME=PATH")
        if self.samples_per_shard is not None and self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


LEGACY_RUN_KEYS = ("corpus_digest", "evals")
"""A run.json of clipforge 0.1's audit (no "job" entry) holds these."""


def own_names(shards: list[str]) -> dict[str, re.Pattern[str]]:
    """What the audit writes below each folder of --out (see pipeline.rundir): per input shard
    STEM, _work/STEM.{parquet,matches.parquet} and manifest/STEM.parquet."""
    stems = "|".join(re.escape(s.rsplit(".", 1)[0]) for s in shards) or "(?!)"
    return {
        "shards": re.compile(r"\d{5,}\.(tar|parquet)|sizes\.json"),
        "manifest": re.compile(rf"({stems})\.parquet"),
        "_work": re.compile(rf"({stems})\.(parquet|matches\.parquet)"),
        "audit": re.compile(r"overlap\.parquet|summary\.json|config\.json|report\.html"),
        "_steps": re.compile(r"[a-z_]+/\d{5,}\.json|[a-z_]+\.json"),
    }


SCRATCH = ("_work", "_steps")


def open_output(cfg: AuditConfig) -> RunDir:
    return RunDir(cfg.out, "audit_overlap")


def resolve_shards_dir(corpus: str) -> tuple[Any, str]:
    """(filesystem, shards folder) of a corpus given as CORPUS or CORPUS/shards, local or URL:
    a build_corpus output (sizes.json) or an img2dataset webdataset output (NNNNN_stats.json)."""
    try:
        fs, root = resolve(corpus, "--corpus")
    except OutputError as exc:
        raise AuditError(str(exc)) from None
    for cand in (f"{root}/shards", root):
        if fs.exists(f"{cand}/{SIZES_FILE}"):
            return fs, cand
    if fs.exists(root) and fs.glob(f"{root}/*_stats.json"):
        return fs, root
    if not fs.exists(root):
        raise AuditError(f"{corpus}: corpus folder does not exist")
    raise AuditError(f"{corpus.rstrip('/')}/shards/{SIZES_FILE}: missing; --corpus must be a build_corpus output "
                     "(CORPUS/shards/*.tar with sizes.json)")


def _url(fs: Any, path: str) -> str:
    from fsspec.implementations.local import LocalFileSystem

    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _corpus_digest(fs: Any, shards_dir: str, sizes_raw: bytes, shards: list[str]) -> str:
    h = hashlib.sha256(sizes_raw)
    # One listing, not a stat per shard. Sizes alone miss a rewritten corpus whose
    # tars pad to the same length, so the modification time (or ETag) counts too.
    fs.invalidate_cache(shards_dir)
    listed = {e["name"].rsplit("/", 1)[-1]: (e.get("size"), e.get("mtime") or e.get("ETag") or e.get("LastModified")
                                             or e.get("updated"))
              for e in fs.ls(shards_dir, detail=True)}
    for name in shards:
        h.update(f"{name}:{listed.get(name)}\n".encode())
    return h.hexdigest()[:16]


def _eval_digest(es: EvalSet) -> str:
    from pathlib import Path

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


@dataclass
class Corpus:
    """What the driver learned about an input corpus: O(shards) names and counts, no samples."""

    fs: Any
    shards_dir: str
    shards: list[str]
    sizes: dict[str, int]
    sizes_raw: bytes

    def url(self, shard: str) -> str:
        return _url(self.fs, f"{self.shards_dir}/{shard}")

    def settings(self) -> dict[str, Any]:
        """The corpus's identity for run.json: where it is, and a digest of its shards' sizes and versions."""
        from pathlib import Path

        where = _url(self.fs, self.shards_dir)
        return {"corpus": where if "://" in where else str(Path(self.shards_dir).resolve()),
                "corpus_digest": _corpus_digest(self.fs, self.shards_dir, self.sizes_raw, self.shards)}


@dataclass
class Inputs(Corpus):
    """The corpus and the eval sets of an audit."""

    eval_sets: list[EvalSet]


def read_inputs(cfg: AuditConfig, rd: RunDir) -> Inputs:
    """Check the corpus and the eval sets (bad input: AuditError, one line). Reads only metadata."""
    c = read_corpus(cfg.corpus, cfg.out, rd)
    try:
        eval_sets = [load_eval_set(*parse_eval_arg(e)) for e in cfg.evals]
    except EvalSetError as exc:
        raise AuditError(str(exc)) from exc
    names = [es.name for es in eval_sets]
    if len(set(names)) != len(names):
        raise AuditError(f"--eval: eval set names must be unique, got {names}")
    return Inputs(c.fs, c.shards_dir, c.shards, c.sizes, c.sizes_raw, eval_sets)


def read_corpus(corpus: str, out: str, rd: RunDir) -> Corpus:
    """Check an input corpus (build_corpus output or img2dataset webdataset output, local or URL)
    and that --out lies outside it (bad input: AuditError, one line). Reads only metadata."""
    fs, shards_dir = resolve_shards_dir(corpus)
    from pathlib import Path, PurePosixPath

    from fsspec.implementations.local import LocalFileSystem

    local = isinstance(fs, LocalFileSystem) and isinstance(rd.fs, LocalFileSystem)
    # On object storage the check is on the paths within one kind of store (two endpoints of one kind
    # cannot be told apart here, and are judged as one: a refusal at worst, never a write into the input).
    if local or type(fs) is type(rd.fs):
        out_path = Path(rd.root).resolve() if local else PurePosixPath("/", rd.root.strip("/"))
        corpus_path = Path(shards_dir).resolve() if local else PurePosixPath("/", shards_dir.strip("/"))
        corpus_path = corpus_path.parent if corpus_path.name == "shards" else corpus_path
        if out_path == corpus_path or corpus_path in out_path.parents or out_path in corpus_path.parents:
            where = str(corpus_path) if local else _url(fs, str(corpus_path).lstrip("/"))
            raise AuditError(f"{out}: --out must lie outside the corpus folder {where} (the input is only read, "
                             "never written into)")
    try:
        if fs.exists(f"{shards_dir}/{SIZES_FILE}"):
            with fs.open(f"{shards_dir}/{SIZES_FILE}", "rb") as f:
                sizes_raw = f.read()
        else:
            sizes_raw = json.dumps(img2dataset_sizes(fs, shards_dir), sort_keys=True).encode()
        sizes: dict[str, int] = json.loads(sizes_raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AuditError(f"{_url(fs, shards_dir)}/{SIZES_FILE}: not valid JSON ({exc})") from exc
    if not isinstance(sizes, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                              for v in sizes.values()):
        raise AuditError(f"{_url(fs, shards_dir)}/{SIZES_FILE}: expected a JSON object of shard name -> sample count")
    shards = sorted(sizes)
    fs.invalidate_cache(shards_dir)
    present = {p.rsplit("/", 1)[-1] for p in fs.ls(shards_dir, detail=False)}
    for name in shards:
        if name not in present:
            raise AuditError(f"{_url(fs, shards_dir)}/{name}: listed in {SIZES_FILE} but missing")
    return Corpus(fs, shards_dir, shards, sizes, sizes_raw)


def img2dataset_sizes(fs: Any, folder: str) -> dict[str, int]:
    """Shard name -> samples of an img2dataset webdataset output, which has no sizes.json: each
    NNNNN.tar holds the successes its NNNNN_stats.json counts (failed rows are only in its parquet)."""
    sizes = {}
    stats_files = {p.rsplit("/", 1)[-1][: -len("_stats.json")]: p for p in fs.glob(f"{folder}/*_stats.json")}
    for tar in sorted(fs.glob(f"{folder}/*.tar")):
        stem = tar.rsplit("/", 1)[-1][: -len(".tar")]
        if stem not in stats_files:
            raise AuditError(f"{_url(fs, tar)}: no {stem}_stats.json beside it (img2dataset writes one per shard, "
                             f"and it says how many samples the tar holds); write {SIZES_FILE} for this folder")
    for stem, path in sorted(stats_files.items()):
        if not fs.exists(f"{folder}/{stem}.tar"):
            continue
        try:
            with fs.open(path, "rb") as f:
                n = json.load(f)["successes"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise AuditError(f"{_url(fs, path)}: not an img2dataset shard stats file ({exc})") from None
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise AuditError(f"{_url(fs, path)}: successes {n!r} is not a count of samples")
        sizes[f"{stem}.tar"] = n
    if not sizes:
        raise AuditError(f"{_url(fs, folder)}: no NNNNN.tar beside its NNNNN_stats.json (img2dataset output) "
                         f"and no {SIZES_FILE}")
    return sizes


def settings_of(cfg: AuditConfig, inp: Inputs) -> dict[str, Any]:
    from pathlib import Path

    return {
        **inp.settings(),
        "match": cfg.match.thresholds(),
        "evals": {es.name: {"root": str(Path(es.root).resolve()), "items": len(es.items), "digest": _eval_digest(es)}
                  for es in inp.eval_sets},
    }


# -- step 1: match --------------------------------------------------------------------------------


def _decode_json(data: bytes | None) -> dict[str, Any]:
    if not data:
        return {}
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _str(v: Any) -> str | None:
    return None if v is None else str(v)


def read_input_shard(fs: Any, url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples of one corpus shard; a truncated or garbage tar is bad input to the audit
    (one line naming the shard, exit 2), not a crash."""
    try:
        yield from read_tar(fs, url)
    except ShardError as exc:
        raise AuditError(f"{exc}; the corpus is damaged: rebuild that shard, or drop it from "
                         f"{SIZES_FILE} to audit the rest") from None


class MatchStep(Step):
    name = "match"
    what = "samples"

    def __init__(self, cfg: AuditConfig, inp: Inputs):
        self.cfg = cfg
        self.shards = inp.shards
        self.urls = [inp.url(s) for s in inp.shards]
        self.sizes = inp.sizes
        self.first_row = {}
        n = 0
        for s in inp.shards:
            self.first_row[s] = n
            n += inp.sizes[s]
        self.n_rows = n
        per_task = max(1, -(-len(inp.shards) // MAX_MATCH_TASKS))
        self.groups = [list(range(i, min(len(inp.shards), i + per_task))) for i in range(0, len(inp.shards), per_task)]

    def tasks(self) -> list[list[int]]:
        return self.groups

    def total(self, specs: list[Any]) -> int:
        return self.n_rows

    def run(self, ctx: TaskContext, group: list[int], shared: Any = None) -> dict[str, Any]:
        import cv2

        cv2.setNumThreads(1)  # one task per core; OpenCV's own threads would oversubscribe
        overlap: EvalOverlap = shared
        fs = ctx.rd.fs
        kept: dict[str, int] = {}
        done = ok = 0
        for i in group:
            shard = self.shards[i]
            base_done, base_ok = done, ok
            n, k = self._shard(ctx, fs, overlap, shard, self.urls[i],
                               lambda d, o, bd=base_done, bo=base_ok: ctx.progress(bd + d, bo + o))
            done += n
            ok += k
            kept[shard] = k
        return {"kept": kept, "rows": done, "progress_rows": done, "progress_ok": ok}

    def _shard(self, ctx: TaskContext, fs: Any, overlap: EvalOverlap, shard: str, url: str,
               progress: Any) -> tuple[int, int]:
        cfg = self.cfg
        matcher = overlap.matcher
        stem = shard.rsplit(".", 1)[0]
        records: list[dict[str, Any]] = []
        task_matcher = overlap.task_matcher()
        batch: list[tuple[dict, dict, str | None, im.ImageFeatures | None, list[str], bytes | None]] = []
        row0 = self.first_row[shard]

        def flush() -> None:
            found = matcher.match_features([b[2] for b in batch], [b[3] for b in batch], [b[4] for b in batch])
            for (rec, info, caption, _, _, image), ms in zip(batch, found, strict=True):
                if not ms:
                    continue
                rows = [{"key": rec["key"], "uid": info["uid"], "url": rec["url"], "caption": caption, **asdict(m),
                         "source_shard": shard} for m in ms]
                task_matcher.add(rows, image)
                if rec["status"] == WRITTEN:
                    rec["status"], rec["reason"] = DROPPED, drop_reason(rows, overlap.order)
            batch.clear()

        # One shard at a time from the store: a tar is read as a stream, never whole.
        for key, members in read_input_shard(fs, url):
            meta = _decode_json(members.get("json"))
            caption = members["txt"].decode("utf-8", "replace").strip() if "txt" in members else None
            rec = {"row": row0 + len(records), "key": key, "url": _str(meta.get("url")), "status": WRITTEN,
                   "reason": None, "error": None, "shard": None, "sha256": _str(meta.get("sha256")), "source": shard}
            img_ext = next((e for e in IMAGE_EXTS if e in members), None)
            feats = None
            if img_ext is None:
                rec.update(status=FAILED, reason="missing_image")
            elif caption is None:
                rec.update(status=FAILED, reason="missing_txt")
            elif "image" in cfg.match.kinds:
                feats = im.features(members[img_ext], cfg.match.crop)
                if feats is None:
                    # Cannot be checked for overlap, so it cannot go into a corpus that claims to be clean.
                    rec.update(status=FAILED, reason="undecodable_image")
            records.append(rec)
            extra_sha = [meta["sha256"]] if isinstance(meta.get("sha256"), str) else []
            batch.append((rec, {"uid": _str(meta.get("uid"))}, caption, feats, extra_sha,
                          members[img_ext] if img_ext else None))
            if len(batch) >= cfg.batch_size:
                flush()
                progress(len(records), sum(r["status"] == WRITTEN for r in records))
        if batch:
            flush()
        if len(records) != self.sizes[shard]:
            raise AuditError(f"{url}: holds {len(records)} samples, its {SIZES_FILE} says {self.sizes[shard]}; "
                             "the corpus is damaged")
        rd = ctx.rd
        task_matcher.write(rd.fs, rd.path("_work", f"{stem}.matches.parquet"))
        with atomic_open(rd.fs, rd.path("_work", f"{stem}.parquet")) as f:
            pq.write_table(pa.Table.from_pylist(records, schema=MANIFEST_SCHEMA), f)
        return len(records), sum(r["status"] == WRITTEN for r in records)


class AuditShardsStep(WriteShardsStep):
    """build_corpus's shard writer over the input shards (the kept samples of each)."""

    def __init__(self, sources: list[Source], samples_per_shard: int, shards_dir: str):
        super().__init__(sources, samples_per_shard, shards_dir, SHARDS_PER_TASK)

    def run(self, ctx: TaskContext, spec: tuple, shared: Any = None) -> dict[str, Any]:
        try:
            return super().run(ctx, spec, shared)
        except ShardError as exc:  # the input is the audit's: damaged input, not damaged output
            raise AuditError(f"{exc}; an input shard changed since it was audited: rerun with a new --out") from None


# -- the driver -------------------------------------------------------------------------------------


def summarize_counts(summary: dict[str, Any]) -> str:
    c = summary["corpus"]
    return f"rows in {c['rows']} = written {c[WRITTEN]} + dropped {c[DROPPED]} + failed {c[FAILED]}"


count_line = summarize_counts


def run_audit(cfg: AuditConfig, executor: Any = None) -> dict[str, Any]:
    """The whole audit with `executor` (default: in this process), holding the output folder's
    lock from the first write to summary.json. Returns summary.json's content."""
    from pipeline.build import finish_shards
    from pipeline.executor import LocalExecutor

    executor = executor or LocalExecutor()
    rd = open_output(cfg)
    rd.check_ours(LEGACY_RUN_KEYS)  # before the lock file: a foreign folder gets nothing written
    inp = read_inputs(cfg, rd)
    settings = settings_of(cfg, inp)
    own = own_names(inp.shards)
    with rd.lock():
        done = _finished_summary(rd)
        run = rd.check_ours(LEGACY_RUN_KEYS)
        if run is not None and done is None:
            changed = compare_settings({k: v for k, v in run.items() if k != "job"}, settings)
            if changed and all(c.startswith("corpus_digest:") for c in changed):
                # An unfinished audit of a corpus that changed since (a damaged shard repaired, say):
                # nothing of it was published, so start it over rather than refuse the folder.
                log.warning("%s: the corpus changed since this unfinished audit began; starting it over",
                            rd.url_of())
                for sub in ("_work", "_steps", "shards", "manifest", "audit"):
                    rd.remove_own_files(sub, own[sub])
                rd.write_run(settings)
        # Checked before the (slow) eval index is built, and recorded before any task writes results.
        rd.claim(settings, own, LEGACY_RUN_KEYS)
        if done is not None:
            for sub in SCRATCH:
                rd.remove_own_files(sub, own[sub])
            log.info("%s holds a finished audit of this corpus, eval sets and thresholds: nothing to do", rd.url_of())
            return {**done, "already_complete": True}
        t0 = time.perf_counter()
        eval_sets = inp.eval_sets
        matcher = OverlapMatcher.build(eval_sets, cfg.match)
        overlap = EvalOverlap(eval_sets, matcher, cfg.report_max_pairs,
                              {"eval_index_s": round(time.perf_counter() - t0, 3)})
        shared = executor.put(overlap)
        step = MatchStep(cfg, inp)
        matched = run_step(rd, step, executor, shared=shared)
        kept: dict[str, int] = {}
        for s in matched:
            kept.update(s["kept"])
        samples_per_shard = cfg.samples_per_shard or max(inp.sizes[inp.shards[0]] if inp.shards else 1, 1)
        stems = [s.rsplit(".", 1)[0] for s in inp.shards]
        sources = [Source(inp.url(s), rd.url_of("_work", f"{stem}.parquet"), kept[s],
                          rd.url_of("manifest", f"{stem}.parquet")) for s, stem in zip(inp.shards, stems, strict=True)]
        writer = AuditShardsStep(sources, samples_per_shard, rd.url_of("shards"))
        written = run_step(rd, writer, executor)
        result = finish_shards(rd, written, step.n_rows, writer.prefix[-1], samples_per_shard)
        corpus = {"input": cfg.corpus, "rows": result.rows_in, WRITTEN: result.written, DROPPED: result.dropped,
                  FAILED: result.failed, "input_shards": len(inp.shards)}
        summary = merge_overlap(rd, executor, shared, [rd.url_of("_work", f"{st}.matches.parquet") for st in stems],
                                corpus, removed_files=[rd.url_of("_work", f"{st}.parquet") for st in stems])
        if not cfg.keep_work:
            for sub in SCRATCH:
                rd.remove_own_files(sub, own[sub])
        return summary


def _finished_summary(rd: RunDir) -> dict[str, Any] | None:
    """summary.json of a finished audit in `rd` (written last), or None (absent or unreadable: not finished)."""
    if not (rd.fs.exists(rd.path("audit", "summary.json")) and rd.fs.exists(rd.path("shards", SIZES_FILE))):
        return None
    try:
        with rd.fs.open(rd.path("audit", "summary.json"), "rb") as f:
            summary = json.load(f)
    except (ValueError, UnicodeDecodeError):
        return None
    ok = isinstance(summary, dict) and isinstance(summary.get("corpus"), dict) and isinstance(
        summary.get("eval_sets"), dict)
    return summary if ok else None


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{'eval set':<16} {'kind':<15} {'items':>7} {'overlap':>8} {'pct':>7} {'removed':>8}"]
    for name, s in summary["eval_sets"].items():
        lines.append(f"{name:<16} {s['kind']:<15} {s['items']:>7} {s['items_with_overlap']:>8} "
                     f"{s['overlap_pct']:>6.2f}% {s['train_samples_removed']:>8}")
    return "\n".join(lines)


def demo(corpus: str, evals: dict[str, str], out: str, executor: Any = None, **match_kwargs: Any) -> dict[str, Any]:
    """For `make demo`: audit the demo corpus against eval set folders, print the per-set summary.

    demo("demo-out/corpus", {"shapes": "demo-out/evalsets/shapes"}, "demo-out/audited")
    """
    cfg = AuditConfig(corpus=corpus, evals=[f"{k}={v}" for k, v in evals.items()], out=out,
                      match=MatchConfig(**match_kwargs))
    summary = run_audit(cfg, executor)
    print(format_summary(summary))
    print(f"report: {open_output(cfg).url_of('audit', 'report.html')}")
    print(count_line(summary))
    return summary
