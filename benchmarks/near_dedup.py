"""What --dedup-within costs: the same local-web build without it, with text,image and with image alone.

    .venv/bin/python benchmarks/near_dedup.py --rows 2000

The rows are pipeline.localweb's images (every one a separate random drawing) with its templated
captions (about 120 distinct ones, so text dedup keeps one row per caption: k copies of a caption
must cost O(k) checks, and the verified edges equal the rows removed), plus a re-upload of every
`--copy-every`th image (JPEG quality 70 at 0.8x its size, a caption of its own) at the end of the
list. In-process executor, parts kept so that each step's task seconds can be read back. Printed
per run: wall seconds, the task seconds of each step, rows written, the near_duplicates entry of
stats.json, and against the planted re-uploads: how many were dropped as image near-duplicates of
their original (recall) and how many other rows were (false drops).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs.build_corpus import main as build_main  # noqa: E402
from pipeline.localweb import LocalWeb, Resource, encode, populate_images  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2000, help="URL rows (local-web images)")
    p.add_argument("--rows-per-task", type=int, default=500)
    p.add_argument("--copy-every", type=int, default=10, help="re-upload every Nth image")
    args = p.parse_args(argv)
    web = LocalWeb("127.0.0.1").start()
    try:
        tmp = Path(tempfile.mkdtemp(prefix="near-bench-"))
        rows = populate_images(web, args.rows, seed=0)
        planted = {}  # copy row -> original row
        for i in range(0, args.rows, args.copy_every):
            img = Image.open(io.BytesIO(web.resources[rows[i]["url"][len(web.base):]].body)).convert("RGB")
            img = img.resize((max(1, int(img.width * 0.8)), max(1, int(img.height * 0.8))), Image.LANCZOS)
            planted[len(rows)] = i
            rows.append({"url": web.add(f"/reupload/{i}.jpg", Resource(encode(img, "jpg", 70), "image/jpeg")),
                         "caption": f"re-upload number {i} of an image", "uid": f"c{i}", "label": rows[i]["label"]})
        pq.write_table(pa.Table.from_pylist(rows), tmp / "in.parquet")
        for flag in ([], ["--dedup-within", "text,image"], ["--dedup-within", "image"]):
            out = tmp / ("out-" + ("-".join(flag[1:]) or "plain"))
            t0 = time.monotonic()
            rc = build_main(["--urls", str(tmp / "in.parquet"), "--out", str(out), "--allow-hosts", web.hostport,
                             "--executor", "local", "--rows-per-task", str(args.rows_per_task), "--keep-parts",
                             "--image-size", "128", *flag])
            wall = time.monotonic() - t0
            if rc != 0:
                return rc
            steps = {p.stem: round(sum(s.get("seconds", 0) for s in json.loads(p.read_text())), 2)
                     for p in sorted((out / "_steps").glob("*.json"))}
            stats = json.loads((out / "stats.json").read_text())
            image_drops = {r["row"]: int(r["duplicate_of"]) for p in sorted((out / "manifest").glob("*.parquet"))
                           for r in pq.read_table(p).to_pylist() if r["reason"] == "near_duplicate:image"}
            found = sum(image_drops.get(c) == o for c, o in planted.items())
            print(json.dumps({"flag": " ".join(flag) or "(none)", "wall_s": round(wall, 1), "task_s": steps,
                              "written": stats["written"], "near_duplicates": stats.get("near_duplicates"),
                              "reuploads_found": f"{found}/{len(planted)}",
                              "false_image_drops": sum(r not in planted for r in image_drops)}), flush=True)
    finally:
        web.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
