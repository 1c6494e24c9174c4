"""Build tasks on hostile images (issue 7) and what a build task imports (issue 12), in a subprocess.

No import of pipeline.resize here: these run against any version of the pipeline,
the one before the resizer was replaced included.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT

from pipeline.localweb import Resource

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")]
MiB = 2**20


def solid_png(w: int, h: int, rgba: tuple[int, ...], depth: int = 8) -> bytes:
    """A one-colour RGBA PNG, streamed row by row (the test process never holds the pixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    pixel = b"".join(v.to_bytes(depth // 8, "big") for v in rgba)
    row = b"\x00" + pixel * w
    z = zlib.compressobj(6)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, depth, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# Runs build_corpus in this (fresh) interpreter, then reports its peak RSS and what it imported.
# The peak is the process's VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over
# execve from the spawning process (subprocess uses vfork), so a child of a 1 GB pytest
# reports at least 1 GB whatever it does itself.
PROBE = textwrap.dedent("""
    import json, sys, time
    t = time.monotonic()
    from jobs.build_corpus import main
    imported = time.monotonic() - t
    rc = main(sys.argv[1:])
    hwm = [int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")]
    print(json.dumps({"rc": rc, "peak_rss": hwm[0], "import_seconds": imported, "modules": sorted(sys.modules)}))
""")


def run_build(tmp_path: Path, web, rows: list[dict], *extra: str) -> tuple[dict, list[dict]]:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    out = tmp_path / "o"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", PROBE, "--urls", str(path), "--out", str(out), "--allow-hosts",
                        web.hostport, "--executor", "local", *extra], env=env, capture_output=True, text=True,
                       timeout=150)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    manifest = [rec for p in sorted((out / "manifest").glob("*.parquet")) for rec in pq.read_table(p).to_pylist()]
    return report, manifest


def test_issue7_images_build_within_the_memory_bound(tmp_path, web):
    # Issue 7: img2dataset's Resizer peaked at 6.9 GB, 3.6 GB and 2.2 GB on these.
    bodies = {"rgba-9000.png": solid_png(9000, 9000, (10, 200, 30, 128)),
              "rgba-6000.png": solid_png(6000, 6000, (10, 200, 30, 128)),
              "rgba16-4000.png": solid_png(4000, 4000, (2570, 51400, 7710, 32896), depth=16)}
    rows = [{"url": web.add(f"/{name}", Resource(body, "image/png")), "caption": f"a large transparent {name}"}
            for name, body in bodies.items()]
    report, manifest = run_build(tmp_path, web, rows)
    assert report["rc"] == 0
    print(f"peak RSS of the build with the three images: {report['peak_rss'] / MiB:.0f} MiB")
    assert report["peak_rss"] < 512 * MiB, f"{report['peak_rss'] / MiB:.0f} MiB"
    fates = {r["url"].rsplit("/", 1)[1]: (r["status"], r["reason"]) for r in manifest}
    assert fates == {"rgba-9000.png": ("failed", "decompression_bomb"),  # 2 x 309 MiB to decode: over the default
                     "rgba-6000.png": ("written", None), "rgba16-4000.png": ("written", None)}
    (bomb,) = [r for r in manifest if r["status"] == "failed"]
    assert "--max-decode-bytes" in bomb["error"]


def test_build_task_imports_neither_torch_nor_albumentations(tmp_path, web):
    from pipeline.localweb import populate_images

    report, manifest = run_build(tmp_path, web, populate_images(web, 3, seed=1))
    assert [r["status"] for r in manifest] == ["written"] * 3
    heavy = {"torch", "albumentations", "wandb", "img2dataset"} & set(report["modules"])
    assert not heavy, heavy
    print(f"build_corpus process: imports {report['import_seconds']:.2f} s, peak RSS {report['peak_rss'] / MiB:.0f} MiB")
