"""The end-to-end demo on the embedded default: local web, local Ray, CPU.

    python jobs/demo.py --out demo-out          # what `make demo` runs

1. generates evaluation sets (an ImageFolder of coloured shapes, caption pairs)
   and a local web of a few thousand captioned images in jpg/png/webp, with
   broken URLs of every kind and some eval images planted (copied, re-encoded,
   resized, cropped, brightened), served on 127.0.0.1;
2. builds the corpus with jobs/build_corpus.py on a local Ray;
3. audits it against the eval sets (jobs/audit_overlap.py's stage) and writes
   the clean corpus and the HTML report;
4. trains a tiny CLIP on the clean corpus on the CPU with zero-shot evaluation.
"""

from __future__ import annotations

import argparse
import io
import logging
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image, ImageEnhance  # noqa: E402

from pipeline.localweb import (  # noqa: E402
    LocalWeb,
    Resource,
    populate_faults,
    populate_images,
    write_imagefolder,
    write_retrieval,
)

log = logging.getLogger("clipforge.demo")

# Outputs of the demo's stages. Each stage refuses to resume into output made from
# other input, and every demo run serves its web on a new random port (new URLs, new
# allow_hosts), so a second `make demo` would be refused: the demo starts clean instead.
STAGE_OUTPUTS = ("corpus", "audited", "run")


def fresh_start(out: Path) -> list[Path]:
    """Remove the previous run's stage outputs under `out`; return what was removed."""
    removed = [out / name for name in STAGE_OUTPUTS if (out / name).exists()]
    for path in removed:
        shutil.rmtree(path)
    if removed:
        log.info("demo starts clean: removed the previous run's %s", ", ".join(str(p) for p in removed))
    return removed


def _edit(data: bytes, kind: str) -> bytes:
    """The edits a copied image typically went through on its way around the web."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    if kind == "resize":
        img = img.resize((int(img.width * 1.5), int(img.height * 1.5)))
    elif kind == "crop":
        dx, dy = int(img.width * 0.04), int(img.height * 0.04)
        img = img.crop((dx, dy, img.width, img.height))
    elif kind == "brightness":
        img = ImageEnhance.Brightness(img).enhance(1.10)
    if kind == "exact":
        return data
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=50 if kind == "jpeg50" else 90)
    return buf.getvalue()


def plant_overlaps(web: LocalWeb, eval_images: list[Path], n: int, rng: random.Random) -> list[dict]:
    rows = []
    for i, path in enumerate(rng.sample(eval_images, n)):
        kind = ("exact", "jpeg50", "resize", "crop", "brightness")[i % 5]
        label = path.parent.name.replace("_", " ")
        url = web.add(f"/planted/{i:03d}.jpg", Resource(_edit(path.read_bytes(), kind), "image/jpeg"))
        rows.append({"url": url, "caption": f"my photo of a {label}, {kind}", "uid": f"planted-{i:03d}",
                     "label": label})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo-out")
    p.add_argument("--images", type=int, default=2400, help="good images in the local web")
    p.add_argument("--planted", type=int, default=25, help="eval images planted in the web")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--train-samples", type=int, default=40_000, help="samples seen in training (rounded to epochs)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    out = Path(args.out).resolve()
    rng = random.Random(0)
    fresh_start(out)

    print("== 1. generating evaluation sets and the local web", flush=True)
    evals = {"shapes": out / "evalsets" / "shapes", "pairs": out / "evalsets" / "pairs"}
    shapes = write_imagefolder(evals["shapes"], per_class=10, seed=100)
    pairs = write_retrieval(evals["pairs"], n=60, seed=200)
    web = LocalWeb("127.0.0.1").start()
    internal = LocalWeb("127.0.0.2").start()  # stands for a private service; must never be contacted
    try:
        rows = populate_images(web, args.images, seed=0)
        rows += list(populate_faults(web, internal).values())
        rows += plant_overlaps(web, shapes + pairs, args.planted, rng)
        rng.shuffle(rows)
        (out / "data").mkdir(parents=True, exist_ok=True)
        urls = out / "data" / "urls.parquet"
        pq.write_table(pa.Table.from_pylist(rows), urls)
        print(f"   {len(rows)} URLs served on {web.base} ({args.planted} planted eval images)")

        print("== 2. building the corpus on a local Ray (jobs/build_corpus.py)", flush=True)
        from jobs.build_corpus import main as build_main

        corpus = out / "corpus"
        rc = build_main(["--urls", str(urls), "--out", str(corpus), "--extra-cols", "uid",
                         "--allow-hosts", web.hostport, "--rows-per-task", "250", "--samples-per-shard", "256",
                         "--timeout", "2", "--retry-backoff", "0.1", "--image-size", "64"])
        if rc != 0:
            return rc
        if internal.hits:
            raise RuntimeError(f"the internal host was contacted: {dict(internal.hits)}")
    finally:
        web.stop()
        internal.stop()

    print("== 3. removing evaluation-set overlap (jobs/audit_overlap.py)", flush=True)
    from dedup.audit import demo as audit_demo

    audited = out / "audited"
    # Image matching only: the demo's captions come from a handful of templates, so
    # the eval captions genuinely overlap most training captions word for word.
    audit_demo(str(corpus), {k: str(v) for k, v in evals.items()}, str(audited), kinds=("image",))

    if not args.skip_train:
        print("== 4. training a tiny CLIP on the clean corpus (training/train.py)", flush=True)
        from training.demo import run_demo

        run_demo(audited / "shards", evals["shapes"], evals["pairs"], out / "run",
                 overlap_audit=audited / "audit" / "summary.json", retrieval_name="pairs",
                 target_samples=args.train_samples)
    print(f"== done: outputs under {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
