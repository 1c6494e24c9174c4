"""Score every image-caption pair of a corpus with a CLIP model, keep the best, store the embeddings.

    python jobs/score_corpus.py --corpus corpus/ --out scored/ --model training/configs/tiny-vit.json \\
        --clip-pretrained runs/demo/checkpoints/step_00000600.pt --clip-score-top-frac 0.3
    python jobs/score_corpus.py --corpus corpus/ --out scored/ --model ViT-B-32 \\
        --clip-pretrained laion2b_s34b_b79k --clip-score-min 0.28          # a tag already in the local cache
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/score_corpus.py ...

--model takes what the trainer's --model takes. --corpus is a build_corpus output or an
img2dataset webdataset folder; --corpus and --out may be object-store URLs (s3://...). Writes
scored/shards/ (the kept samples, each json with its clip_score), scored/embeddings/NNNNN.npy
beside each shard (image and text embeddings, float16, L2-normalised, keyed by sample key) with
embeddings/model.json, scored/manifest/ (every input row: status, reason, clip_score) and
scored/score/summary.json. Inference runs in a pool of Ray actors, one GPU each when the cluster
has GPUs, CPU actors otherwise. The last line printed is
`rows in N = written W + dropped D + failed F`. Exit code 2 on bad input, 1 on a damaged output
or failed tasks (rerun to resume).
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python jobs/score_corpus.py` from a Ray working dir: make the repo importable without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import logging  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

from pipeline.cli import OneLineParser  # noqa: E402
from pipeline.executor import make_executor  # noqa: E402
from pipeline.job import job_main  # noqa: E402

if TYPE_CHECKING:
    from scoring.job import ScoreConfig


def parse_args(argv: list[str] | None) -> tuple[ScoreConfig, argparse.Namespace]:
    from scoring.job import ScoreConfig, ScoreError

    d = ScoreConfig(corpus="", out="", model="", clip_pretrained="")
    p = OneLineParser(prog="score_corpus", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="build_corpus or img2dataset output (local or URL)")
    p.add_argument("--out", required=True, help="output folder (shards/, embeddings/, manifest/, score/)")
    p.add_argument("--model", required=True, help="open_clip model name or path/to/NAME.json (as the trainer's)")
    p.add_argument("--clip-pretrained", required=True, metavar="TAG|PATH",
                   help="checkpoint file or URL (clipforge's trainer's included), or an open_clip tag in the local "
                        "cache")
    p.add_argument("--clip-score-min", type=float, default=None, metavar="X",
                   help="keep samples whose image-caption cosine is at least X (LAION: 0.28 to 0.3 with ViT-B/32)")
    p.add_argument("--clip-score-top-frac", type=float, default=None, metavar="F",
                   help="keep the top fraction F of the corpus by score (a global quantile; DataComp: 0.3)")
    p.add_argument("--score-bins", type=int, default=d.score_bins,
                   help=f"histogram bins over [-1, 1] for the quantile (default {d.score_bins})")
    p.add_argument("--samples-per-shard", type=int, default=None, help="output shard size (default: the input's)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"images per forward pass (default "
                                                                         f"{d.batch_size})")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device,
                   help="auto: one GPU per actor when the cluster has GPUs, else CPU actors")
    p.add_argument("--cpus-per-actor", type=int, default=d.cpus_per_actor,
                   help="cores per CPU actor (torch and decode threads)")
    p.add_argument("--executor", choices=("ray", "local"), default="ray")
    p.add_argument("--num-cpus", type=int, default=None, help="local Ray cluster size (no RAY_ADDRESS)")
    p.add_argument("--keep-work", action="store_true", help="keep _work/, _final/ and _steps/ after success")
    args = p.parse_args(argv)
    if args.num_cpus is not None and args.num_cpus < 1:
        raise ScoreError(f"--num-cpus must be >= 1, got {args.num_cpus}")
    cfg = ScoreConfig(corpus=args.corpus, out=args.out, model=args.model, clip_pretrained=args.clip_pretrained,
                      clip_score_min=args.clip_score_min, clip_score_top_frac=args.clip_score_top_frac,
                      score_bins=args.score_bins, samples_per_shard=args.samples_per_shard,
                      batch_size=args.batch_size, device=args.device, cpus_per_actor=args.cpus_per_actor,
                      keep_work=args.keep_work)
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

    def body() -> int:
        from scoring.job import count_line, format_summary, run_score

        cfg, args = parse_args(argv)
        with make_executor(args.executor, num_cpus=args.num_cpus) as executor:
            summary = run_score(cfg, executor)
        if summary.get("already_complete"):
            print(f"the scoring in {cfg.out} is complete; nothing to do")
        print(format_summary(summary))
        print(count_line(summary))
        return 0

    return job_main("score_corpus", body)


if __name__ == "__main__":
    raise SystemExit(main())
