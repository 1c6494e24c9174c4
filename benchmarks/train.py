"""Throughput: training/train.py against OpenCLIP's own trainer, same everything, alternating.

    .venv/bin/python benchmarks/train.py                       # generates shards in bench-out/
    .venv/bin/python benchmarks/train.py --shards 'DIR/{00000..00031}.tar' --samples 8192

Both trainers get the same shards, model config (registered with
open_clip.add_model_config, then `python -m open_clip_train.main` via runpy), batch
size, precision, gradient clipping, worker count and number of samples. Runs
alternate (ours, theirs, ours, theirs, ...) so that drift in the shared machine
hits both. Reported per trainer: steady-state samples/s (mean of the per-window
figures each trainer logs, first window dropped: it holds start-up), and
end-to-end samples/s (samples / process wall time, start-up included). Then the
data loader alone. Not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

OPENCLIP_RUNNER = """
import runpy, sys
import open_clip
open_clip.add_model_config(sys.argv[1])
sys.argv = ["open_clip_train.main", *sys.argv[2:]]
runpy.run_module("open_clip_train.main", run_name="__main__", alter_sys=True)
"""


def run_ours(a: argparse.Namespace, out: Path) -> tuple[float, list[float]]:
    cmd = [sys.executable, str(REPO / "training/train.py"), "--train-data", a.shards, "--train-num-samples",
           str(a.samples), "--model", a.model_config, "--batch-size", str(a.batch_size), "--epochs", "1",
           "--precision", a.precision, "--workers", str(a.workers), "--warmup", "10", "--grad-clip-norm", "1.0",
           "--log-every", str(a.log_every), "--output", str(out), "--seed", "0"]
    wall, text = _timed(cmd)
    rates = [float(x) for x in re.findall(r"\| ([0-9.]+) samples/s", text)]
    return wall, rates


def run_openclip(a: argparse.Namespace, out: Path) -> tuple[float, list[float]]:
    cmd = [sys.executable, "-c", OPENCLIP_RUNNER, a.model_config, "--train-data", a.shards,
           "--train-num-samples", str(a.samples), "--dataset-type", "webdataset", "--model",
           Path(a.model_config).stem, "--batch-size", str(a.batch_size), "--epochs", "1", "--precision",
           a.precision, "--workers", str(a.workers), "--warmup", "10", "--grad-clip-norm", "1.0",
           "--log-every-n-steps", str(a.log_every), "--logs", str(out), "--name", "bench",
           "--save-frequency", "1", "--seed", "0", "--report-to", ""]
    wall, text = _timed(cmd)
    rates = [float(x) for x in re.findall(r"Batch \(t\): [0-9.]+, ([0-9.]+)/s,", text)]
    return wall, rates


def _timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=1800)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return wall, r.stdout + r.stderr


def loader_alone(a: argparse.Namespace) -> float:
    import open_clip

    from training.data import EpochPlan, expand_shards, make_loader
    from training.model import resolve_model_name

    name = resolve_model_name(a.model_config)
    _, train_tf, _ = open_clip.create_model_and_transforms(name)
    batches = a.samples // a.batch_size
    plan = EpochPlan(urls=expand_shards(a.shards), seed=0, epoch=0, rank=0, world_size=1, workers=a.workers,
                     batch_size=a.batch_size, batches=batches)
    t0 = time.perf_counter()
    n = sum(len(m["keys"]) for _, _, m in make_loader(plan, train_tf, open_clip.get_tokenizer(name)))
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="shard spec; default: generate 32 shards of 256 128px images in --out")
    p.add_argument("--out", default=str(REPO / "bench-out"))
    p.add_argument("--model-config", default=str(REPO / "training/configs/tiny-vit.json"))
    p.add_argument("--samples", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="amp_bf16")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--log-every", type=int, default=16)
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.shards is None:
        from training.synthetic import write_shape_shards

        if not (out / "shards/sizes.json").is_file():
            write_shape_shards(out / "shards", 32 * 256, 256, seed=0, size=128)
        a.shards = f"{out}/shards/{{00000..00031}}.tar"
    print(f"shards {a.shards}; model {a.model_config}; {a.samples} samples, batch {a.batch_size}, "
          f"{a.precision}, {a.workers} worker(s), grad clip 1.0, {a.rounds} alternating rounds", flush=True)
    results: dict[str, list[tuple[float, list[float]]]] = {"clipforge": [], "openclip": []}
    for i in range(a.rounds):
        for label, fn in (("clipforge", run_ours), ("openclip", run_openclip)):
            run_dir = out / f"run-{label}-{i}"
            shutil.rmtree(run_dir, ignore_errors=True)  # OpenCLIP silently skips a run whose folder exists
            wall, rates = fn(a, run_dir)
            if not rates:
                raise SystemExit(f"{label} logged no throughput; see {run_dir}")
            results[label].append((wall, rates))
            steady = statistics.mean(rates[1:]) if len(rates) > 1 else float("nan")
            print(f"round {i} {label:9s}: steady {steady:7.1f} samples/s, end-to-end {a.samples / wall:7.1f} "
                  f"samples/s ({wall:.1f}s wall)", flush=True)
    summary = {}
    for label, runs in results.items():
        steady = statistics.mean(r for _, rates in runs for r in rates[1:])
        e2e = statistics.mean(a.samples / w for w, _ in runs)
        summary[label] = (steady, e2e)
        print(f"{label:9s}: steady {steady:7.1f} samples/s, end-to-end {e2e:7.1f} samples/s")
    print(f"ratio clipforge/openclip: steady {summary['clipforge'][0] / summary['openclip'][0]:.3f}, "
          f"end-to-end {summary['clipforge'][1] / summary['openclip'][1]:.3f}")
    print(f"data loader alone: {loader_alone(a):.1f} samples/s ({a.workers} worker(s), decode + augment + tokenize)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
