"""Ingest speed: build_corpus against plain img2dataset, side by side in one run.

    .venv/bin/python benchmarks/ingest.py --images 5000 --rounds 2

A local web of generated images (jpg/png/webp, 96 to 640 px) is served from a
separate process on 127.0.0.1 (so neither side shares a GIL with the server).
Both tools run as their own command lines, alternating, with the same process
count, threads per process, rows per shard/task, image size, resize mode and
output format; wall time covers the whole command (Ray's start included for
build_corpus, process-pool start for img2dataset). Prints images/s of each and
the ratio build_corpus / img2dataset (target >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def serve(n: int, seed: int, urls_path: str, ready: mp.Event, stop: mp.Event) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.localweb import LocalWeb, populate_images

    web = LocalWeb("127.0.0.1").start()
    rows = populate_images(web, n, seed=seed)
    pq.write_table(pa.Table.from_pylist([{"url": r["url"], "caption": r["caption"]} for r in rows]), urls_path)
    Path(urls_path + ".host").write_text(web.hostport)
    ready.set()
    stop.wait()
    web.stop()


def run(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed ({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    return elapsed


def img2dataset_successes(out: Path) -> int:
    return sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=32)
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--work", default=str(ROOT / "bench-out" / "ingest"))
    a = p.parse_args(argv)

    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    urls = str(work / "urls.parquet")
    ready, stop = mp.Event(), mp.Event()
    server = mp.get_context("fork").Process(target=serve, args=(a.images, 7, urls, ready, stop), daemon=True)
    server.start()
    if not ready.wait(600):
        raise SystemExit("local web did not start")
    host = Path(urls + ".host").read_text()
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '')}", "NO_ALBUMENTATIONS_UPDATE": "1",
           "RAY_USAGE_STATS_ENABLED": "0"}
    common = dict(size=a.image_size, threads=a.threads, per_shard=a.per_shard)
    print(f"{a.images} images on http://{host}; {a.processes} processes x {a.threads} threads, "
          f"{a.image_size}px center_crop jpg q95, {a.per_shard} rows per shard/task", flush=True)

    i2d_cmd = lambda out: [  # noqa: E731
        str(bindir / "img2dataset"), f"--url_list={urls}", "--input_format=parquet", "--url_col=url",
        "--caption_col=caption", "--output_format=webdataset", f"--output_folder={out}",
        f"--processes_count={a.processes}", f"--thread_count={common['threads']}",
        f"--image_size={common['size']}", "--resize_mode=center_crop", "--encode_format=jpg",
        "--encode_quality=95", f"--number_sample_per_shard={common['per_shard']}", "--distributor=multiprocessing",
        "--timeout=10", "--retries=0", "--enable_wandb=False", "--compute_hash=sha256",
        # default incremental mode on a fresh folder: "overwrite" deletes the _tmp folder it just made.
    ]
    ours_cmd = lambda out: [  # noqa: E731
        sys.executable, str(ROOT / "jobs" / "build_corpus.py"), "--urls", urls, "--out", str(out),
        "--allow-hosts", host, "--num-cpus", str(a.processes), "--threads", str(common["threads"]),
        "--image-size", str(common["size"]), "--resize-mode", "center_crop", "--encode-format", "jpg",
        "--encode-quality", "95", "--rows-per-task", str(common["per_shard"]),
        "--samples-per-shard", str(common["per_shard"]), "--timeout", "10", "--retries", "0",
    ]
    results: dict[str, list[float]] = {"img2dataset": [], "build_corpus": []}
    try:
        for r in range(a.rounds):
            for name in ("img2dataset", "build_corpus"):
                out = work / f"{name}-{r}"
                secs = run(i2d_cmd(out) if name == "img2dataset" else ours_cmd(out), env)
                if name == "img2dataset":
                    n = img2dataset_successes(out)
                else:
                    n = json.loads((out / "stats.json").read_text())["written"]
                results[name].append(n / secs)
                print(f"round {r}: {name:<13} {n} images in {secs:6.1f} s = {n / secs:7.1f} images/s", flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        stop.set()
        server.join(10)
    mean = {k: sum(v) / len(v) for k, v in results.items()}
    ratio = mean["build_corpus"] / mean["img2dataset"]
    print(f"img2dataset {mean['img2dataset']:.1f} images/s, build_corpus {mean['build_corpus']:.1f} images/s, "
          f"ratio {ratio:.2f} (target >= 0.9)")
    (work / "result.json").write_text(json.dumps({"images_per_second": mean, "ratio": ratio, "runs": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
