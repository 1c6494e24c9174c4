"""Throughput: training/train.py against OpenCLIP's own trainer, same everything, alternating.

    .venv/bin/python benchmarks/train.py                       # generates shards in bench-out/
    .venv/bin/python benchmarks/train.py --shards 'DIR/{00000..00031}.tar' --samples 8192
    .venv/bin/python benchmarks/train.py --precision amp_bf16 --model-config training/configs/tiny-vit.json

Defaults: a model-bound small ViT (benchmarks/vit-64px.json: 64 px, 4 layers, width 192),
6,016 samples an epoch, 3 epochs per run (so start-up does not dominate), batch 64, 2
loader workers, fp32 and then amp_bf16, 3 alternating rounds each.

Both trainers get the same shards, model config (registered with
open_clip.add_model_config, then `python -m open_clip_train.main` via runpy), batch
size, precision, gradient clipping, worker count, number of samples and epochs,
no eval data, a checkpoint at each epoch end, and TensorBoard scalars every
--log-every steps (ours always writes them, so OpenCLIP gets `--report-to
tensorboard`). Runs alternate (ours, theirs, theirs, ours, ...) so that drift in
the shared machine hits both.

Both are timed by this script's clock, never by the figures each trainer logs about
itself (OpenCLIP's "N/s" is the rate of the last step alone, ours a window mean: not
comparable). Each progress line is stamped as it arrives; per trainer:

* steady: samples between its second progress line and its last one, divided by the
  time between them. Everything in the loop counts (data waits, logging); worker
  start-up and the first step do not.
* end-to-end: samples / process wall time, start-up and the final checkpoint included.

Summaries are medians over the rounds. OpenCLIP runs as its users run it: torch's default
thread count (one per core), OpenMP's default wait policy. Ours picks its own threads
(training/dist.py:set_cpu_threads: the cores shared by the node's ranks) and also leaves the
wait policy alone; --openclip-omp-threads N and --openclip-passive change OpenCLIP's, to see
how much of a difference those settings make.

Then the data loader alone (ours and OpenCLIP's, same shards, transform, tokenizer
and workers), which must outrun the training step. Not a test: figures depend on the
machine.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
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


OURS_PROGRESS = re.compile(r"step (\d+)/\d+ ")  # global batch x step = samples so far
# Our precision names where OpenCLIP's differ: its "amp" is fp16 autocast with a GradScaler.
OPENCLIP_PRECISION = {"amp_fp16": "amp"}
OPENCLIP_PROGRESS = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+) ")  # epoch, samples in it, per epoch


@dataclass
class Run:
    wall: float
    progress: list[tuple[float, int]]
    """(seconds since start, samples so far) of each progress line."""

    @property
    def steady(self) -> float:
        (t0, n0), (t1, n1) = self.progress[1], self.progress[-1]
        return (n1 - n0) / (t1 - t0)


def run_ours(a: argparse.Namespace, out: Path) -> Run:
    cmd = [sys.executable, str(REPO / "training/train.py"), "--train-data", a.shards, "--train-num-samples",
           str(a.samples), "--model", a.model_config, "--batch-size", str(a.batch_size), "--epochs", str(a.epochs),
           "--precision", a.precision, "--workers", str(a.workers), "--warmup", "10", "--grad-clip-norm", "1.0",
           "--log-every", str(a.log_every), "--output", str(out), "--seed", "0"]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    return _timed(cmd, lambda line: (m := OURS_PROGRESS.search(line)) and int(m[1]) * a.batch_size)


def run_openclip(a: argparse.Namespace, out: Path) -> Run:
    cmd = [sys.executable, "-c", OPENCLIP_RUNNER, a.model_config, "--train-data", a.shards,
           "--train-num-samples", str(a.samples), "--dataset-type", "webdataset", "--model",
           Path(a.model_config).stem, "--batch-size", str(a.batch_size), "--epochs", str(a.epochs), "--precision",
           OPENCLIP_PRECISION.get(a.precision, a.precision), "--workers", str(a.workers), "--warmup", "10", "--grad-clip-norm", "1.0",
           "--log-every-n-steps", str(a.log_every), "--logs", str(out), "--name", "bench",
           "--save-frequency", "1", "--seed", "0", "--report-to", "tensorboard"]
    # OpenCLIP keeps torch's default of one thread per core unless OMP_NUM_THREADS says otherwise;
    # --openclip-omp-threads gives it the thread count ours picks, to compare like with like.
    env = {"OMP_NUM_THREADS": str(a.openclip_omp_threads)} if a.openclip_omp_threads else {}
    if a.openclip_passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    # Its counter restarts each epoch: samples so far = epoch x samples per epoch + samples in this one.
    return _timed(cmd, lambda line: (m := OPENCLIP_PROGRESS.search(line)) and int(m[1]) * int(m[3]) + int(m[2]),
                  env)


def _timed(cmd: list[str], samples_in: Callable[[str], int | None], extra_env: dict[str, str] | None = None) -> Run:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    progress: list[tuple[float, int]] = []
    tail: deque[str] = deque(maxlen=40)
    t0 = time.perf_counter()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                          env=env) as proc:
        for line in proc.stdout:
            now = time.perf_counter() - t0
            tail.append(line)
            n = samples_in(line)
            if n:
                progress.append((now, n))
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{''.join(tail)}")
    if len(progress) < 3:
        raise SystemExit(f"{len(progress)} progress lines (need 3; lower --log-every): {' '.join(cmd)}")
    return Run(wall, progress)


def loader_alone(a: argparse.Namespace) -> tuple[float, float]:
    """Samples/s of our loader and of OpenCLIP's webdataset loader, worker start-up included."""
    import open_clip
    from open_clip_train.data import get_wds_dataset

    from training.data import EpochPlan, expand_shards, make_loader
    from training.model import resolve_model_name

    name = resolve_model_name(a.model_config)
    _, train_tf, _ = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    batches = a.samples // a.batch_size
    plan = EpochPlan(urls=expand_shards(a.shards), seed=0, epoch=0, rank=0, world_size=1, workers=a.workers,
                     batch_size=a.batch_size, batches=batches)
    t0 = time.perf_counter()
    n = sum(len(m["keys"]) for _, _, m in make_loader(plan, train_tf, tokenizer))
    ours = n / (time.perf_counter() - t0)
    args = argparse.Namespace(train_data=a.shards, val_data=None, dataset_resampled=False, seed=0,
                              train_num_samples=a.samples, train_data_upsampling_factors=None,
                              batch_size=a.batch_size, world_size=1, workers=a.workers)
    t0 = time.perf_counter()
    n = sum(len(images) for images, _ in get_wds_dataset(args, train_tf, True, tokenizer=tokenizer).dataloader)
    return ours, n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="shard spec; default: generate 32 shards of 256 128px images in --out")
    p.add_argument("--out", default=str(REPO / "bench-out"))
    p.add_argument("--model-config", default=str(REPO / "benchmarks/vit-64px.json"),
                   help="OpenCLIP model config; the default is a model-bound small ViT (64 px, 4 layers, width 192)")
    p.add_argument("--samples", type=int, default=6016, help="samples per epoch")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run, so that start-up does not dominate")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="fp32,amp_bf16", help="comma-separated; each is benchmarked in turn")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--log-every", type=int, default=16)
    p.add_argument("--openclip-omp-threads", type=int, help="OMP_NUM_THREADS for OpenCLIP (default: unset)")
    p.add_argument("--openclip-passive", action="store_true", help="OMP_WAIT_POLICY=PASSIVE for OpenCLIP")
    p.add_argument("--threads", type=int, help="--threads for training/train.py (default: its own choice)")
    p.add_argument("--no-loader", action="store_true", help="skip the data-loader-alone comparison")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.shards is None:
        from training.synthetic import write_shape_shards

        if not (out / "shards/sizes.json").is_file():
            write_shape_shards(out / "shards", 32 * 256, 256, seed=0, size=128)
        a.shards = f"{out}/shards/{{00000..00031}}.tar"
    precisions = [x.strip() for x in a.precision.split(",") if x.strip()]
    total = a.samples * a.epochs
    print(f"shards {a.shards}; model {a.model_config}; {a.samples} samples x {a.epochs} epochs, batch "
          f"{a.batch_size}, {', '.join(precisions)}, {a.workers} worker(s), grad clip 1.0, {a.rounds} alternating "
          f"rounds, clipforge --threads {a.threads or 'default'}, OpenCLIP "
          f"OMP_NUM_THREADS={a.openclip_omp_threads or os.environ.get('OMP_NUM_THREADS', 'unset')}"
          f"{' OMP_WAIT_POLICY=PASSIVE' if a.openclip_passive else ''}", flush=True)
    steady_ours = 0.0
    for precision in precisions:
        a.precision = precision
        results: dict[str, list[Run]] = {"clipforge": [], "openclip": []}
        for i in range(a.rounds):
            # Alternate which trainer goes first, so a drift in the machine's load favours neither.
            order = (("clipforge", run_ours), ("openclip", run_openclip))
            for label, fn in order if i % 2 == 0 else order[::-1]:
                run_dir = out / f"run-{label}-{precision}-{i}"
                shutil.rmtree(run_dir, ignore_errors=True)  # OpenCLIP silently skips a run whose folder exists
                run = fn(a, run_dir)
                shutil.rmtree(run_dir, ignore_errors=True)
                results[label].append(run)
                print(f"{precision} round {i} {label:9s}: steady {run.steady:7.1f} samples/s, end-to-end "
                      f"{total / run.wall:7.1f} samples/s ({run.wall:.1f}s wall: {run.progress[0][0]:.1f}s to "
                      f"the first step, {run.wall - run.progress[-1][0]:.1f}s after the last; load average "
                      f"{os.getloadavg()[0]:.2f} at its end)", flush=True)
        summary = {}
        for label, runs in results.items():
            # Medians: on a shared machine one round can run 10x slow (OpenMP threads that wait for a
            # descheduled sibling), and a mean would let that round decide the ratio.
            steady = statistics.median(r.steady for r in runs)
            wall = statistics.median(r.wall for r in runs)
            summary[label] = (steady, wall)
            print(f"{precision} {label:9s}: steady {steady:7.1f} samples/s, wall {wall:6.1f}s, end-to-end "
                  f"{total / wall:7.1f} samples/s (medians of {len(runs)})")
        print(f"{precision} ratio clipforge/openclip: steady {summary['clipforge'][0] / summary['openclip'][0]:.3f}, "
              f"end-to-end {summary['openclip'][1] / summary['clipforge'][1]:.3f}", flush=True)
        steady_ours = summary["clipforge"][0]
    if not a.no_loader:
        ours, theirs = loader_alone(a)
        print(f"data loader alone ({a.workers} worker(s), decode + augment + tokenize): clipforge {ours:.1f} "
              f"samples/s, openclip {theirs:.1f} samples/s; clipforge training steady {steady_ours:.1f} "
              f"samples/s ({'loader is faster' if ours > steady_ours else 'LOADER IS THE BOTTLENECK'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
