"""`make demo` step: a short CPU training run on the demo corpus, evaluated zero-shot.

    python -m training.demo --demo-dir DEMO          # shards in DEMO/corpus/shards/, output in DEMO/train/
    run_demo(shards_dir, zeroshot_dir, retrieval_dir, out, overlap_audit=...)   # from jobs/demo.py

Trains the tiny ViT config (training/configs/tiny-vit.json) on every shard listed in
sizes.json, for as many epochs as make about `--target-samples` samples (about two
minutes on 2 CPU cores), evaluates zero-shot on a generated ImageFolder set of the
same 24 shape/colour classes and a generated retrieval set, and prints the final
accuracy and where curves.png is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.localweb import CLASSES, write_imagefolder, write_retrieval
from training import train

TINY = Path(__file__).resolve().parent / "configs/tiny-vit.json"


def run_demo(shards_dir: str | Path, zeroshot: str | Path, retrieval: str | Path, out: str | Path,
             overlap_audit: str | Path | None = None, retrieval_name: str = "shapes-retrieval", target_samples: int = 40_000, batch_size: int = 64,
             workers: int = 1, samples_per_epoch: int | None = None) -> dict:
    """Train on every shard of `shards_dir`, evaluate on the `zeroshot` ImageFolder and
    the `retrieval` pairs; with `overlap_audit` also on their clean/overlapping subsets.

    `samples_per_epoch` (default: the shards' sample count) sets the epoch length, and with it the
    samples seen: two runs given the same one see the same number of samples whatever their shards
    hold (a smaller corpus is re-read within an epoch), as the demo's before/after comparison needs."""
    shards_dir, out = Path(shards_dir), Path(out)
    sizes_path = shards_dir / "sizes.json"
    if not sizes_path.is_file():
        raise SystemExit(f"error: {sizes_path}: missing; build the demo corpus first")
    sizes = json.loads(sizes_path.read_text())
    n = sum(sizes.values())
    spec = "::".join(str(shards_dir / name) for name in sorted(sizes))
    per_epoch = samples_per_epoch or n
    epochs = max(1, round(target_samples / max(1, per_epoch)))
    argv = ["--train-data", spec, "--model", str(TINY), "--batch-size", str(batch_size), "--epochs", str(epochs),
            "--workers", str(workers), "--lr", "2e-3", "--wd", "0.1", "--warmup", "20",
            "--precision", "amp_bf16", "--zeroshot", f"shapes={zeroshot}",
            "--retrieval", f"{retrieval_name}={retrieval}", "--log-every", "20",
            "--output", str(out), "--resume", "latest"]
    if overlap_audit:
        argv += ["--overlap-audit", str(overlap_audit)]
    if samples_per_epoch:
        argv += ["--train-num-samples", str(samples_per_epoch)]
    seen = per_epoch // batch_size * batch_size * epochs
    print(f"demo: {n} samples in {len(sizes)} shards, {epochs} epochs of {per_epoch} samples ({seen} seen), "
          f"output {out}", flush=True)
    rc = train.main(argv)
    if rc != 0:
        raise SystemExit(rc)
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    zs = [r for r in results if r["set"] == "shapes"][-1]
    ret = [r for r in results if r["set"] == retrieval_name][-1]
    summary = {"top1": zs["top1"], "top5": zs["top5"], "chance": 1 / len(CLASSES), "i2t_R@1": ret["i2t_R@1"],
               "t2i_R@1": ret["t2i_R@1"], "samples_seen": seen, "corpus_samples": n, "curves": str(out / "curves.png"), "checkpoints": str(out / "checkpoints")}
    print(f"demo: zero-shot top-1 {zs['top1']:.3f} (top-5 {zs['top5']:.3f}, chance {1 / len(CLASSES):.3f}) on "
          f"{zs['items']} images; retrieval i2t R@1 {ret['i2t_R@1']:.3f}, t2i R@1 {ret['t2i_R@1']:.3f}")
    if "clean_top1" in zs:
        print(f"demo: overlap analysis: top-1 {zs['clean_top1']:.3f} on {zs['clean_items']} clean images, "
              f"{zs.get('overlap_top1', float('nan')):.3f} on {zs['overlap_items']} that overlapped the training data")
    print(f"demo: curves at {out / 'curves.png'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-dir", required=True, help="folder holding corpus/shards/ (sizes.json)")
    p.add_argument("--out", help="training output (default DEMO/train)")
    p.add_argument("--target-samples", type=int, default=40_000, help="samples to train on, rounded to epochs")
    a = p.parse_args(argv)
    demo_dir = Path(a.demo_dir)
    evals = demo_dir / "evalsets"
    if not (evals / "shapes/classnames.txt").is_file():
        write_imagefolder(evals / "shapes", per_class=10, seed=1234, size=96)
    if not any((evals / "shapes-retrieval").glob("*.txt")):
        write_retrieval(evals / "shapes-retrieval", n=200, seed=4321, size=96)
    run_demo(demo_dir / "corpus/shards", evals / "shapes", evals / "shapes-retrieval",
             a.out or demo_dir / "train", target_samples=a.target_samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
