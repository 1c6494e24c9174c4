"""Remove training samples that overlap evaluation sets, and report what overlapped.

    python jobs/audit_overlap.py --corpus corpus/ --eval imagenet=evalsets/imagenet-val \\
        --eval coco=evalsets/coco-5k --out audited/
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/audit_overlap.py ...

Writes audited/shards/ (the corpus without overlapping samples), audited/manifest/,
audited/audit/{overlap.parquet,summary.json,report.html}. The last line printed
is `rows in N = written W + dropped D + failed F`. Exit code 2 on bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python jobs/audit_overlap.py` from a Ray working dir: make the repo importable without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402

from dedup.audit import (  # noqa: E402
    LEGACY_RUN_KEYS,
    AuditConfig,
    AuditContext,
    AuditError,
    count_line,
    finalize,
    format_summary,
    map_local,
    open_output,
    prepare,
    run_task,
)
from dedup.matcher import KINDS, MatchConfig  # noqa: E402
from pipeline.executor import RayExecutor, TaskFailed  # noqa: E402
from pipeline.progress import Progress  # noqa: E402

log = logging.getLogger("audit_overlap")


def map_ray(ctx: AuditContext, n_tasks: int | None, num_cpus: int | None = None) -> list[dict[str, float]]:
    """One Ray task per shard group through the pipeline's executor; the eval index goes
    to the object store once (put) and every task receives the reference.

    Every task deserialises the whole eval index (about 250 MB and 2.5 s for ImageNet +
    COCO), so by default there is one task per cluster CPU, each taking every n-th
    shard (`run_task`'s stride), not one task per shard. Tasks log each finished
    shard with their ETA; the progress line counts finished tasks.
    """
    import ray

    results: list[dict[str, float]] = []
    progress = Progress(sum(ctx.sizes.values()), every=5.0, what="samples")

    def on_result(_index: int, r: dict[str, float]) -> None:
        results.append(r)
        progress.update(int(r["rows"]), int(r["rows"]))

    with RayExecutor(num_cpus=num_cpus) as executor:
        if n_tasks is None:
            n_tasks = max(1, min(len(ctx.shards), int(ray.cluster_resources().get("CPU", 1))))
        log.info("%d tasks over %d input shards", n_tasks, len(ctx.shards))
        ctx_ref = executor.put(ctx)
        executor.map(_ray_task, [(i, (i, n_tasks, ctx_ref)) for i in range(n_tasks)], on_result,
                     on_tick=progress.tick, tick_seconds=1.0)
    progress.tick(force=True)
    return results


def _ray_task(task_index: int, n_tasks: int, ctx: AuditContext) -> dict[str, float]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return run_task(task_index, n_tasks, ctx)


def parse_args(argv: list[str] | None) -> tuple[AuditConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = MatchConfig()
    p.add_argument("--corpus", required=True, help="build_corpus output (CORPUS/shards/ with sizes.json)")
    p.add_argument("--eval", action="append", required=True, metavar="NAME=PATH", dest="evals",
                   help="eval set (ImageFolder, KEY.jpg+KEY.txt pairs, or clip_benchmark WebDataset); repeatable")
    p.add_argument("--out", required=True, help="output folder (shards/, manifest/, audit/)")
    p.add_argument("--text-threshold", type=float, default=d.text_threshold, help="caption Jaccard (default 0.8)")
    p.add_argument("--ngram", type=int, default=d.ngram, help="words per caption shingle")
    p.add_argument("--num-perm", type=int, default=d.num_perm, help="MinHash permutations")
    p.add_argument("--min-caption-words", type=int, default=d.min_caption_words,
                   help="never text-match captions shorter than this")
    p.add_argument("--image-max-distance", type=int, default=d.image_max_distance,
                   help="perceptual-hash candidate distance in bits of 64")
    p.add_argument("--image-min-similarity", type=float, default=d.image_min_similarity,
                   help="thumbnail correlation a candidate needs to count")
    p.add_argument("--kinds", default=",".join(KINDS), help="image,text | image | text")
    p.add_argument("--samples-per-shard", type=int, default=None, help="clean shard size (default: the input's)")
    p.add_argument("--executor", choices=("ray", "local"), default="ray")
    p.add_argument("--tasks", type=int, default=None,
                   help="parallel tasks, each taking every n-th input shard (default: one per cluster CPU)")
    p.add_argument("--num-cpus", type=int, default=None, help="local Ray cluster size (no RAY_ADDRESS)")
    args = p.parse_args(argv)
    match = MatchConfig(text_threshold=args.text_threshold, ngram=args.ngram, num_perm=args.num_perm,
                        min_caption_words=args.min_caption_words, image_max_distance=args.image_max_distance,
                        image_min_similarity=args.image_min_similarity,
                        kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()))
    cfg = AuditConfig(corpus=args.corpus, evals=args.evals, out=args.out, match=match,
                      samples_per_shard=args.samples_per_shard)
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg, args = parse_args(argv)
        if args.tasks is not None and args.tasks < 1:
            raise AuditError(f"--tasks must be >= 1, got {args.tasks}")
        rd = open_output(cfg)
        rd.check_ours(LEGACY_RUN_KEYS)  # before the lock file: a foreign folder gets nothing written
        with rd.lock():  # one run at a time in --out, from the first write to the summary
            ctx = prepare(cfg, rd)
            t0 = time.perf_counter()
            if args.executor == "ray":
                map_ray(ctx, args.tasks, args.num_cpus)
            else:
                map_local(ctx, args.tasks or 1)  # in-process: the index is not copied, the task count is moot
            ctx.timings["match_s"] = round(time.perf_counter() - t0, 3)
            summary = finalize(ctx)
    except (AuditError, ValueError) as exc:  # bad input or settings (ConfigError, OutputError included)
        print(f"audit_overlap: error: {exc}", file=sys.stderr)
        return 2
    except TaskFailed as exc:
        print(f"audit_overlap: error: {exc}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    print(count_line(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
