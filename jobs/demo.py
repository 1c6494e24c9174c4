"""The end-to-end demo on the embedded default: local web, local Ray, CPU.

    python jobs/demo.py --out demo-out          # what `make demo` runs

1. generates evaluation sets (an ImageFolder of coloured shapes, caption pairs)
   and a local web of a few thousand captioned images in jpg/png/webp, with
   broken URLs of every kind and some eval images planted (copied, re-encoded,
   resized, cropped, brightened), served on 127.0.0.1; the web is noisy as real
   crawls are: a share of the images carry another image's caption, and a share
   are re-uploaded (resized, re-encoded, another caption); which rows are noise
   is written to data/noise.parquet;
2. builds the corpus with jobs/build_corpus.py on a local Ray;
3. audits it against the eval sets (jobs/audit_overlap.py's stage) and writes
   the clean corpus and the HTML report;
4. trains a tiny CLIP on the clean corpus on the CPU with zero-shot evaluation;
5. builds the same URL list again with the filters on (build_corpus --clip-filter
   with the checkpoint of step 4, keeping the top pairs by CLIP score; within-corpus
   near-duplicates too with --dedup-within) and audits it as in step 3;
6. trains again on the filtered corpus for the same number of samples;
7. prints zero-shot and retrieval before and after filtering, and the precision
   and recall of the noise removal against the planted truth.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import random
import shutil
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image, ImageEnhance  # noqa: E402

from pipeline.localweb import (  # noqa: E402
    MIME,
    TEMPLATES,
    LocalWeb,
    Resource,
    encode,
    populate_faults,
    populate_images,
    write_imagefolder,
    write_retrieval,
)
from pipeline.sample import DROPPED, WRITTEN  # noqa: E402
from scoring.job import DROP_REASON as CLIP_DROP  # noqa: E402

log = logging.getLogger("clipforge.demo")

# Outputs of the demo's stages. Each stage refuses to resume into output made from
# other input, and every demo run serves its web on a new random port (new URLs, new
# allow_hosts), so a second `make demo` would be refused: the demo starts clean instead.
STAGE_OUTPUTS = ("corpus", "audited", "run", "corpus-filtered", "filtered", "run-filtered")


MARKER = ".clipforge-demo"
"""Written first into a new demo output folder: only a folder holding it is cleared by the next demo."""
DEMO_FILES = ("evalsets", "data", "filtering.json", *STAGE_OUTPUTS)


class DemoError(Exception):
    """Bad input to the demo: one line, exit 2, nothing written or removed."""


def fresh_start(out: Path) -> list[Path]:
    """Claim `out` for the demo: create it with its marker, or clear the previous demo's outputs
    from a folder holding the marker; return what was removed. Anything else (a folder without the
    marker, other files beside the demo's, a symlink) is refused and nothing is removed: `--out ~/work`
    must never cost the user's ~/work/run."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise DemoError(f"{out}: --out must be a folder (not a file or a symlink)")
    entries = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if entries and MARKER not in entries:
        raise DemoError(f"{out}: --out holds files the demo did not write ({', '.join(entries[:3])}) and no "
                        f"{MARKER}; use an empty or new folder (a demo run before the marker existed: remove "
                        "its folder first)")
    foreign = [n for n in entries if n not in (MARKER, *DEMO_FILES)]
    links = [n for n in entries if (out / n).is_symlink()]
    if foreign or links:
        raise DemoError(f"{out}: --out holds {'symlinks' if links else 'files the demo did not write'} "
                        f"({', '.join((links or foreign)[:3])}); nothing was removed")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("clipforge demo output: the next `make demo` clears this folder\n")
    removed = [out / name for name in DEMO_FILES if (out / name).exists()]
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
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


# -- noise as real crawls have it, and how much of it the filters removed (issue 11) ------------

MISMATCHED = "mismatched_caption"
"""Planted noise: the image carries the caption of another image, of another class."""
REUPLOAD = "reupload"
"""Planted noise: another upload of an image already in the web, resized and re-encoded, captioned anew."""
NEAR_DUPLICATE = "near_duplicate"
"""build_corpus --dedup-within's drop reasons: near_duplicate:text, near_duplicate:image (issue 11 item 4)."""


def plant_noise(web: LocalWeb, images: list[dict], mismatched: float, reuploads: float,
                rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Make `images` (populate_images rows of `web`) as noisy as crawled pairs are.

    A `mismatched` share of them gets the caption of another image of another class (alt text
    copied from a neighbour on the page): their rows are changed in place. A `reuploads` share of
    the others is uploaded again at a new URL: the same picture resized and re-encoded, with
    another caption of its own (right for the picture, as re-uploads' usually are: only a
    duplicate filter can find them). Returns (the re-upload rows, the truth: one row per planted
    noise row, {uid, noise, of}, `of` naming the image the caption or the picture belongs to)."""
    for name, share in (("mismatched", mismatched), ("reuploads", reuploads)):
        if not 0 <= share < 1:
            raise ValueError(f"--{name} is a share of the images in [0, 1), got {share}")
    n = len(images)
    order = rng.sample(range(n), n)
    n_mis, n_re = round(mismatched * n), round(reuploads * n)
    if n_mis + n_re > n:
        raise ValueError(f"--mismatched {mismatched} and --reuploads {reuploads} add up to more than the images")
    wrong, copied, clean = order[:n_mis], order[n_mis:n_mis + n_re], order[n_mis:]
    truth = []
    # Captions are taken from images that keep their own, so each planted caption is the true one of `of`.
    for i in wrong:
        row = images[i]
        donors = [j for j in clean if images[j]["label"] != row["label"]]
        if not donors:
            raise ValueError(f"no image of another class than {row['label']!r} keeps its caption: add images")
        donor = images[rng.choice(donors)]
        row["caption"] = donor["caption"]
        truth.append({"uid": row["uid"], "noise": MISMATCHED, "of": donor["uid"]})
    extra = []
    for j, i in enumerate(copied):
        row = images[i]
        path = row["url"][len(web.base):]
        img = Image.open(io.BytesIO(web.resources[path].body)).convert("RGB")
        scale = rng.choice((0.8, 1.25))
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
        others = [t for t in TEMPLATES if t.format(c=row["label"]) != row["caption"]]
        url = web.add(f"/reupload/{j:06d}.jpg", Resource(encode(img, "jpg", quality=75), MIME["jpg"]))
        uid = f"reupload-{j:06d}"
        extra.append({"url": url, "caption": rng.choice(others).format(c=row["label"]), "uid": uid,
                      "label": row["label"]})
        truth.append({"uid": uid, "noise": REUPLOAD, "of": row["uid"]})
    return extra, truth


def order_rows(rows: list[dict], reuploads: list[dict], truth: list[dict], rng: random.Random) -> list[dict]:
    """`rows` shuffled, each re-upload at a random place after the image it copies (a re-upload
    comes later than its original, and within-corpus dedup keeps the lowest row: the planted copy
    is then the one a duplicate filter should remove). Sets each truth row's `row` (its input row)."""
    rows = rng.sample(rows, len(rows))
    place = {r["uid"]: float(i) for i, r in enumerate(rows)}
    of = {t["uid"]: t["of"] for t in truth}
    keyed = [(place[r["uid"]], 0, i) for i, r in enumerate(rows)]
    keyed += [(rng.uniform(place[of[r["uid"]]], len(rows)), 1, i) for i, r in enumerate(reuploads)]
    out = [(rows, reuploads)[kind][i] for _, kind, i in sorted(keyed)]
    row_of = {r["uid"]: k for k, r in enumerate(out)}
    for t in truth:
        t["row"] = row_of[t["uid"]]
    return out


def is_filter_drop(reason: str | None) -> bool:
    """Whether a drop reason is one of the filters step 5 adds (CLIP score, within-corpus duplicates)."""
    return reason is not None and (reason == CLIP_DROP or reason.startswith(NEAR_DUPLICATE))


def filter_fates(manifest_dir: Path) -> Iterator[tuple[int, str | None]]:
    """(input row, None if kept, else the filter's drop reason) for every row a build's manifest shows
    reaching its CLIP-score and duplicate filters: kept ones and those these filters dropped (a row
    that failed or was dropped before them was never theirs to judge)."""
    for path in sorted(manifest_dir.glob("*.parquet")):
        t = pq.read_table(path, columns=["row", "status", "reason"]).to_pydict()
        for row, status, reason in zip(t["row"], t["status"], t["reason"], strict=True):
            if status == WRITTEN:
                yield row, None
            elif status == DROPPED and is_filter_drop(reason):
                yield row, reason


def removal_scores(truth: dict[int, str], fates: Iterable[tuple[int, str | None]]) -> dict[str, Any]:
    """Precision and recall of the noise removal against the planted truth.

    `truth`: input row -> kind of planted noise; `fates`: (input row, None if kept, else the reason
    it was removed) for each row the filters saw. Precision: the share of removed rows that were
    planted noise; recall: the share of the planted noise the filters saw that they removed. Also
    by kind of noise and by reason of removal."""
    planted: Counter[str] = Counter()
    caught: Counter[str] = Counter()
    removed: Counter[str] = Counter()
    noise_removed: Counter[str] = Counter()
    rows = 0
    for row, reason in fates:
        rows += 1
        kind = truth.get(row)
        if kind is not None:
            planted[kind] += 1
        if reason is None:
            continue
        removed[reason] += 1
        if kind is not None:
            caught[kind] += 1
            noise_removed[reason] += 1
    n_removed, n_noise, hits = sum(removed.values()), sum(planted.values()), sum(caught.values())
    return {"rows": rows, "removed": n_removed, "noise": n_noise, "noise_removed": hits,
            "precision": hits / n_removed if n_removed else None, "recall": hits / n_noise if n_noise else None,
            "kinds": {k: {"planted": planted[k], "removed": caught[k]} for k in sorted(planted)},
            "reasons": {r: {"removed": removed[r], "noise": noise_removed[r]} for r in sorted(removed)}}


def change(before: float, after: float, n: int) -> str:
    """'better', 'worse' or 'no clear change' for an accuracy measured on n items before and after:
    a change counts when it exceeds twice the binomial standard error of the difference (both runs
    are evaluated on the same items, which makes this rule err towards 'no clear change')."""
    se = math.sqrt((before * (1 - before) + after * (1 - after)) / n)
    if abs(after - before) <= 2 * se:
        return "no clear change"
    return "better" if after > before else "worse"


def comparison(before: dict[str, Any], after: dict[str, Any], items: dict[str, int],
               scores: dict[str, Any]) -> list[str]:
    """The lines step 7 prints: each metric before and after filtering, and the noise removal."""
    lines = [f"{'':<22}{'noisy corpus':>14}{'filtered':>10}{'change':>9}   judged on",
             f"{'training samples':<22}{before['corpus_samples']:>14}{after['corpus_samples']:>10}",
             f"{'samples seen':<22}{before['samples_seen']:>14}{after['samples_seen']:>10}"]
    verdicts = []
    for metric, label in (("top1", "zero-shot top-1"), ("top5", "zero-shot top-5"),
                          ("i2t_R@1", "retrieval i2t R@1"), ("t2i_R@1", "retrieval t2i R@1")):
        n = items["zeroshot" if metric.startswith("top") else "retrieval"]
        word = change(before[metric], after[metric], n)
        verdicts.append(word)
        lines.append(f"{label:<22}{before[metric]:>14.3f}{after[metric]:>10.3f}{after[metric] - before[metric]:>+9.3f}"
                     f"   {n} items: {word}")

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    lines.append(f"noise removal: {scores['removed']} of {scores['rows']} rows removed, {scores['noise_removed']} "
                 f"of them planted noise: precision {pct(scores['precision'])}, recall {pct(scores['recall'])} "
                 f"({scores['noise_removed']} of {scores['noise']} planted noise rows)")
    for kind, k in scores["kinds"].items():
        lines.append(f"  {kind}: {k['removed']} of {k['planted']} removed")
    for reason, r in scores["reasons"].items():
        lines.append(f"  removed as {reason}: {r['removed']}, of which planted noise {r['noise']}")
    if "better" in verdicts and "worse" not in verdicts:
        lines.append("verdict: filtering helped at this scale (a change beyond twice the standard error)")
    elif "worse" in verdicts and "better" not in verdicts:
        lines.append("verdict: filtering made the model worse at this scale")
    elif verdicts.count("no clear change") == len(verdicts):
        lines.append("verdict: filtering did not clearly help at this scale: every change is within twice "
                     "the standard error of these small eval sets")
    else:
        lines.append("verdict: mixed: some metrics better, some worse at this scale")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo-out")
    p.add_argument("--images", type=int, default=2400, help="good images in the local web")
    p.add_argument("--planted", type=int, default=25, help="eval images planted in the web")
    p.add_argument("--mismatched", type=float, default=0.2,
                   help="share of the good images captioned with another image's caption (default 0.2)")
    p.add_argument("--reuploads", type=float, default=0.1,
                   help="share of the good images uploaded again, resized and re-encoded, with another caption "
                        "(default 0.1)")
    p.add_argument("--clip-top-frac", type=float, default=None,
                   help="step 5 keeps this top fraction by CLIP score (default: 1 - the share of mismatched "
                        "captions among the images served)")
    p.add_argument("--dedup-within", default="image", metavar="KINDS",
                   help="step 5 also removes near-duplicates within the corpus (build_corpus --dedup-within; "
                        "default 'image': the demo's captions come from a few templates, so nearly all are "
                        "near-duplicates as text); '' for the CLIP-score filter alone")
    p.add_argument("--skip-train", action="store_true", help="stop after the audit (no training, no filtering)")
    # 20k, not the 40k of one training: two trainings then keep `make demo` near 3.5 minutes on 2 cores.
    p.add_argument("--train-samples", type=int, default=20_000,
                   help="samples seen in each of the two trainings (rounded to epochs of the first corpus)")
    args = p.parse_args(argv)
    for name in ("mismatched", "reuploads"):
        if not 0 <= getattr(args, name) < 1:
            p.error(f"--{name} is a share of the images, in [0, 1); got {getattr(args, name)}")
    if args.mismatched + args.reuploads > 1:
        p.error(f"--mismatched {args.mismatched} and --reuploads {args.reuploads} add up to more than the images")
    if args.clip_top_frac is not None and not 0 < args.clip_top_frac <= 1:
        p.error(f"--clip-top-frac is a fraction in (0, 1]; got {args.clip_top_frac}")
    for name in ("images", "train_samples"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    if bad := [k for k in args.dedup_within.split(",") if k and k not in ("text", "image")]:
        p.error(f"--dedup-within takes text, image or both (comma-separated); got {', '.join(bad)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    out = Path(os.path.abspath(args.out))  # not resolved: a symlinked --out is refused, not followed
    rng = random.Random(0)
    try:
        fresh_start(out)
    except DemoError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2

    print("== 1. generating evaluation sets and the local web", flush=True)
    evals = {"shapes": out / "evalsets" / "shapes", "pairs": out / "evalsets" / "pairs"}
    shapes = write_imagefolder(evals["shapes"], per_class=10, seed=100)
    pairs = write_retrieval(evals["pairs"], n=60, seed=200)
    web = LocalWeb("127.0.0.1").start()
    internal = LocalWeb("127.0.0.2").start()  # stands for a private service; must never be contacted
    try:
        images = populate_images(web, args.images, seed=0)
        reuploads, truth = plant_noise(web, images, args.mismatched, args.reuploads, rng)
        rows = images + list(populate_faults(web, internal).values())
        rows += plant_overlaps(web, shapes + pairs, args.planted, rng)
        rows = order_rows(rows, reuploads, truth, rng)
        (out / "data").mkdir(parents=True, exist_ok=True)
        urls = out / "data" / "urls.parquet"
        pq.write_table(pa.Table.from_pylist(rows), urls)
        # The truth stays out of the URL list (and so out of the corpus): the filters never see it.
        pq.write_table(pa.Table.from_pylist(truth), out / "data" / "noise.parquet")
        kinds = Counter(t["noise"] for t in truth)
        print(f"   {len(rows)} URLs served on {web.base} ({args.planted} planted eval images; noise: "
              f"{kinds[MISMATCHED]} images with another image's caption, {kinds[REUPLOAD]} re-uploads; "
              f"truth in {out / 'data' / 'noise.parquet'})")

        print("== 2. building the corpus on a local Ray (jobs/build_corpus.py)", flush=True)
        corpus = out / "corpus"
        rc = build(urls, corpus, web, internal)
        if rc != 0:
            return rc

        print("== 3. removing evaluation-set overlap (jobs/audit_overlap.py)", flush=True)
        audited = out / "audited"
        audit(corpus, evals, audited)
        if args.skip_train:
            print(f"== done: outputs under {out}")
            return 0

        print("== 4. training a tiny CLIP on the clean corpus (training/train.py)", flush=True)
        from training.checkpoint import find_latest
        from training.demo import TINY, run_demo

        train = {"zeroshot": evals["shapes"], "retrieval": evals["pairs"], "retrieval_name": "pairs",
                 "target_samples": args.train_samples}
        before = run_demo(audited / "shards", out=out / "run", overlap_audit=audited / "audit" / "summary.json",
                          **train)

        # The rule that fits a web whose noise share is known: keep 1 - that share. Re-uploads carry
        # right captions, so only the mismatched ones count; with --dedup-within the re-uploads are
        # gone before the scores' quantile is taken, without it they are among the scored.
        scored = len(images) + (0 if args.dedup_within else len(reuploads))
        top_frac = args.clip_top_frac if args.clip_top_frac is not None else 1 - kinds[MISMATCHED] / scored
        ckpt = find_latest(out / "run" / "checkpoints")
        if ckpt is None:
            raise RuntimeError(f"{out / 'run' / 'checkpoints'}: no checkpoint to score with")
        print(f"== 5. the same build, filtered: top {top_frac:.3f} by CLIP score with {ckpt.name} of step 4"
              f"{', near-duplicates within the corpus (' + args.dedup_within + ')' if args.dedup_within else ''}"
              " (jobs/build_corpus.py --clip-filter), then the same audit", flush=True)
        # The user's way to the filtered corpus: build_corpus with the filters on. In this process:
        # a second Ray start would cost more than the build of a few thousand small images.
        filters = ["--executor", "local", "--clip-filter", str(TINY), "--clip-pretrained", ckpt.path,
                   "--clip-score-top-frac", f"{top_frac:.4f}"]
        if args.dedup_within:
            filters += ["--dedup-within", args.dedup_within]
        rc = build(urls, out / "corpus-filtered", web, internal, *filters)
        if rc != 0:
            return rc
    finally:
        web.stop()
        internal.stop()
    filtered = out / "filtered"
    audit(out / "corpus-filtered", evals, filtered)

    print("== 6. training again on the filtered corpus, for the same number of samples", flush=True)
    after = run_demo(filtered / "shards", out=out / "run-filtered", overlap_audit=filtered / "audit" / "summary.json",
                     samples_per_epoch=before["corpus_samples"], **train)
    if after["samples_seen"] != before["samples_seen"]:
        raise RuntimeError(f"the two trainings saw {before['samples_seen']} and {after['samples_seen']} samples")

    print("== 7. before and after filtering", flush=True)
    scores = removal_scores({t["row"]: t["noise"] for t in truth}, filter_fates(out / "corpus-filtered" / "manifest"))
    if scores["noise"] < len(truth):
        print(f"   {len(truth) - scores['noise']} of the {len(truth)} planted noise rows did not reach the filters "
              "(failed or dropped before them)")
    for line in comparison(before, after, {"zeroshot": len(shapes), "retrieval": len(pairs)}, scores):
        print(line)
    (out / "filtering.json").write_text(json.dumps({"before": before, "after": after, "noise_removal": scores,
                                                    "clip_top_frac": top_frac, "dedup_within": args.dedup_within},
                                                   indent=1))
    print(f"== done: outputs under {out}")
    return 0


def build(urls: Path, out: Path, web: LocalWeb, internal: LocalWeb, *extra: str) -> int:
    """jobs/build_corpus.py over the demo's URL list, with `extra` flags; the internal host must stay untouched."""
    from jobs.build_corpus import main as build_main

    rc = build_main(["--urls", str(urls), "--out", str(out), "--extra-cols", "uid", "--allow-hosts", web.hostport,
                     "--rows-per-task", "250", "--samples-per-shard", "256", "--timeout", "2", "--retry-backoff", "0.1",
                     "--image-size", "64", *extra])
    if internal.hits:
        raise RuntimeError(f"the internal host was contacted: {dict(internal.hits)}")
    return rc


def audit(corpus: Path, evals: dict[str, Path], out: Path) -> None:
    from dedup.audit import demo as audit_demo

    # Image matching only: the demo's captions come from a handful of templates, so
    # the eval captions genuinely overlap most training captions word for word.
    audit_demo(str(corpus), {k: str(v) for k, v in evals.items()}, str(out), kinds=("image",))


if __name__ == "__main__":
    raise SystemExit(main())
