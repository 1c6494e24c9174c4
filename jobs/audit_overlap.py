"""Remove training samples that overlap evaluation sets, and report what overlapped.

    python jobs/audit_overlap.py --corpus corpus/ --eval imagenet=evalsets/imagenet-val \\
        --eval coco=evalsets/coco-5k --out audited/
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/audit_overlap.py ...

Writes audited/shards/ (the corpus without overlapping samples), audited/manifest/,
audited/audit/{overlap.parquet,summary.json,report.html}. --corpus and --out may be
object-store URLs (s3://...). The last line printed is
`rows in N = written W + dropped D + failed F`. Exit code 2 on bad input, 1 on a
damaged output or failed tasks (rerun to resume).
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python jobs/audit_overlap.py` from a Ray working dir: make the repo importable without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import logging  # noqa: E402

from dedup.audit import AuditConfig, AuditError, count_line, format_summary, run_audit  # noqa: E402
from dedup.matcher import KINDS, MatchConfig  # noqa: E402
from pipeline.cli import OneLineParser  # noqa: E402
from pipeline.executor import make_executor  # noqa: E402
from pipeline.job import job_main  # noqa: E402

log = logging.getLogger("audit_overlap")


def parse_args(argv: list[str] | None) -> tuple[AuditConfig, argparse.Namespace]:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--num-cpus", type=int, default=None, help="local Ray cluster size (no RAY_ADDRESS)")
    p.add_argument("--keep-work", action="store_true", help="keep _work/ and _steps/ after success")
    args = p.parse_args(argv)
    if args.num_cpus is not None and args.num_cpus < 1:
        raise AuditError(f"--num-cpus must be >= 1, got {args.num_cpus}")
    try:
        match = MatchConfig(text_threshold=args.text_threshold, ngram=args.ngram, num_perm=args.num_perm,
                            min_caption_words=args.min_caption_words, image_max_distance=args.image_max_distance,
                            image_min_similarity=args.image_min_similarity,
                            kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()))
        cfg = AuditConfig(corpus=args.corpus, evals=args.evals, out=args.out, match=match,
                          samples_per_shard=args.samples_per_shard, keep_work=args.keep_work)
    except ValueError as exc:
        raise AuditError(str(exc)) from None
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

    def body() -> int:
        cfg, args = parse_args(argv)
        with make_executor(args.executor, num_cpus=args.num_cpus) as executor:
            summary = run_audit(cfg, executor)
        if summary.get("already_complete"):
            print(f"the audit in {cfg.out} is complete; nothing to do")
        print(format_summary(summary))
        print(count_line(summary))
        return 0

    return job_main("audit_overlap", body)


if __name__ == "__main__":
    raise SystemExit(main())
