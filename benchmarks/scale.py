"""Scale: does the driver stay flat and the job stay linear as the URL list grows?

    .venv/bin/python benchmarks/scale.py --sizes 1000000,10000000

For each size, a URL list is written as parquet (row groups of 100,000 rows): most rows
are cheap to decide, as in a real list after filtering (empty or one-word captions, 30%
of them repeats of an earlier URL, none ever fetched), and a small sample (`--downloads`, default 500) are real
images served by a local web on 127.0.0.1 from a separate process. build_corpus runs as
its own command line on the Ray executor (`--num-cpus`, default all cores). Printed per
size: the driver's peak RSS (stats.json, measured by the driver itself), wall time of the
whole command, rows/s and decided rows/s per core; then the ratios the issue sets
(driver RSS 10M/1M <= 1.2, wall 10M/1M <= 11, >= 50,000 rows/s per core).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def serve(n: int, urls_path: str, ready: mp.Event, stop: mp.Event) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.localweb import LocalWeb, populate_images

    web = LocalWeb("127.0.0.1").start()
    rows = populate_images(web, n, seed=7)
    pq.write_table(pa.Table.from_pylist([{"url": r["url"], "caption": r["caption"]} for r in rows]), urls_path)
    Path(urls_path + ".host").write_text(web.hostport)
    ready.set()
    stop.wait()
    web.stop()


def write_list(path: Path, n: int, real: list[dict], seed: int = 0) -> None:
    """n rows: real downloads spread evenly, the rest decided without a download."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    chunk = 100_000
    every = max(1, n // max(1, len(real)))
    with pq.ParquetWriter(path, pa.schema([("url", pa.string()), ("caption", pa.string())])) as w:
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            idx = np.arange(lo, hi)
            kind = rng.random(hi - lo)
            # 100-character URLs on a loopback port nothing listens on; a repeat points at an earlier
            # row's URL. Every caption is empty or one word, so no such row is ever fetched: they are
            # decided by the caption filter or as duplicate URLs.
            src = np.where(kind < 0.3, (idx * 0.5).astype(np.int64), idx)
            urls = [f"http://127.0.0.1:9/images/{s:012d}/" + "x" * 58 + ".jpg" for s in src]
            caps = ["" if k < 0.5 else "one" for k in kind]
            for i in range(lo, hi):
                if i % every == 0 and i // every < len(real):
                    r = real[i // every]
                    urls[i - lo], caps[i - lo] = r["url"], r["caption"]
            w.write_table(pa.table({"url": urls, "caption": caps}))


def main(argv: list[str] | None = None) -> int:
    import pyarrow.parquet as pq

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000000,10000000")
    p.add_argument("--downloads", type=int, default=500)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rows-per-task", type=int, default=100_000)
    p.add_argument("--keep", action="store_true", help="keep the outputs in bench-out/scale")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="clipforge-scale-"))
    ready, stop = mp.Event(), mp.Event()
    real_path = str(work / "real.parquet")
    server = mp.Process(target=serve, args=(args.downloads, real_path, ready, stop), daemon=True)
    server.start()
    ready.wait(120)
    real = pq.read_table(real_path).to_pylist()
    host = Path(real_path + ".host").read_text()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    results = []
    try:
        for n in sizes:
            urls = work / f"urls-{n}.parquet"
            write_list(urls, n, real)
            out = work / f"out-{n}"
            cmd = [sys.executable, str(ROOT / "jobs" / "build_corpus.py"), "--urls", str(urls), "--out", str(out),
                   "--allow-hosts", host, "--num-cpus", str(args.num_cpus), "--rows-per-task", str(args.rows_per_task),
                   "--samples-per-shard", "1000", "--timeout", "5", "--progress-every", "30"]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if r.returncode != 0:
                raise SystemExit(f"build_corpus failed at {n} rows ({r.returncode}):\n{r.stderr[-3000:]}")
            stats = json.loads((out / "stats.json").read_text())
            res = {"rows": n, "wall_s": round(wall, 1), "driver_peak_rss_mb": stats["driver_peak_rss_mb"],
                   "rows_per_s": round(n / wall), "rows_per_s_per_core": round(n / wall / args.num_cpus),
                   "written": stats["written"], "accounting": r.stdout.strip().splitlines()[-1]}
            results.append(res)
            print(json.dumps(res), flush=True)
            if not args.keep:
                shutil.rmtree(out)
            urls.unlink()
    finally:
        stop.set()
        server.join(10)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if len(results) >= 2:
        a, b = results[0], results[-1]
        scale = b["rows"] / a["rows"]
        print(f"driver peak RSS {b['rows']:,} / {a['rows']:,} rows: {b['driver_peak_rss_mb']} / "
              f"{a['driver_peak_rss_mb']} MB = {b['driver_peak_rss_mb'] / a['driver_peak_rss_mb']:.2f} (target <= 1.2)")
        print(f"wall time {b['rows']:,} / {a['rows']:,} rows: {b['wall_s']} / {a['wall_s']} s = "
              f"{b['wall_s'] / a['wall_s']:.2f} for {scale:.0f}x the rows (target <= {1.1 * scale:.0f})")
    for res in results:
        print(f"{res['rows']:,} rows: {res['rows_per_s_per_core']:,} rows/s per core on {args.num_cpus} cores, "
              "fixed costs included (Ray's start, the downloads)")
    if len(results) >= 2:
        # The per-row cost alone: what the extra rows cost (the downloads and start-up are the same).
        a, b = results[0], results[-1]
        marginal = (b["rows"] - a["rows"]) / max(1e-9, b["wall_s"] - a["wall_s"]) / args.num_cpus
        print(f"decided rows/s per core, {a['rows']:,} -> {b['rows']:,} rows: {marginal:,.0f} (target >= 50,000)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
