"""build_corpus --eval: eval images planted among web images never reach a shard; the audit is written."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, build_args
from PIL import Image

from jobs.build_corpus import main
from pipeline.config import ConfigError
from pipeline.localweb import Resource, encode, populate_images, write_imagefolder

pytestmark = pytest.mark.timeout(180)


def _plant(web, eval_dir) -> dict[str, str]:
    """Serve three eval images (as-is, JPEG q50, resized); returns {url: eval item id}."""
    items = sorted(p.relative_to(eval_dir).as_posix() for p in eval_dir.glob("*/*.jpg"))
    exact, q50, resized = items[3], items[17], items[30]
    img = Image.open(eval_dir / q50).convert("RGB")
    buf = io.BytesIO()
    Image.open(eval_dir / resized).convert("RGB").resize((200, 200), Image.BICUBIC).save(buf, "PNG")
    return {
        web.add("/plant/exact.jpg", Resource((eval_dir / exact).read_bytes(), "image/jpeg")): exact,
        web.add("/plant/q50.jpg", Resource(encode(img, "jpg", quality=50), "image/jpeg")): q50,
        web.add("/plant/resized.png", Resource(buf.getvalue(), "image/png")): resized,
    }


def test_overlap_removed_before_sharding(tmp_path, web, internal):
    eval_dir = tmp_path / "eval"
    write_imagefolder(eval_dir, per_class=2)
    rows = populate_images(web, 40, seed=5)
    planted = _plant(web, eval_dir)
    for n, url in enumerate(planted):  # distinctive captions: the eval set is matched by image only here
        rows.insert(7 + 11 * n, {"url": url, "caption": f"planted sample number {n} from a benchmark", "uid": f"p{n}"})
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.Table.from_pylist(rows), urls)
    out = tmp_path / "out"

    assert main(build_args(urls, out, web, "--eval", f"shapes={eval_dir}", "--executor", "local")) == 0

    manifest = pa.concat_tables(pq.read_table(p) for p in sorted((out / "manifest").glob("*.parquet"))).to_pylist()
    by_url = {r["url"]: r for r in manifest}
    assert len(manifest) == len(rows)
    for url in planted:
        assert (by_url[url]["status"], by_url[url]["reason"]) == ("dropped", "eval_overlap:shapes:image"), url
    others = [r for r in manifest if r["url"] not in planted]
    assert all(r["status"] == "written" for r in others), [r for r in others if r["status"] != "written"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows_in"] == stats["written"] + stats["dropped"] + stats["failed"] == len(rows)
    assert (stats["written"], stats["dropped"]) == (40, 3)
    assert stats["reasons"] == {"dropped:eval_overlap:shapes:image": 3}

    summary = json.loads((out / "audit" / "summary.json").read_text())
    s = summary["eval_sets"]["shapes"]
    assert s["kind"] == "classification" and s["items"] == 48
    assert s["overlapping_items"] == sorted(planted.values())
    assert (s["items_with_overlap"], s["train_samples_removed"]) == (3, 3)
    assert s["overlap_pct"] == round(100 * 3 / 48, 4)
    assert s["thresholds"]["image_min_similarity"] == 0.96 and "eval_index_s" in summary["timings"]
    assert summary["corpus"]["rows"] == len(rows) and summary["corpus"]["dropped"] == 3

    overlap = pq.read_table(out / "audit" / "overlap.parquet").to_pylist()
    assert {(m["url"], m["eval_item"]) for m in overlap} == set(planted.items())
    assert {m["kind"] for m in overlap} == {"image"}
    exact = next(m for m in overlap if m["url"].endswith("/plant/exact.jpg"))
    assert exact["score"] == 0.0 and exact["uid"] == "p0"

    html = (out / "audit" / "report.html").read_text()
    thumbs = re.findall(r'<img src="data:image/jpeg;base64,', html)
    assert len(thumbs) == 2 * len(overlap)  # training image | eval image, one row per pair


def test_thresholds_can_be_overridden(tmp_path):
    from dedup.removal import EvalRemoval

    write_imagefolder(tmp_path / "eval", per_class=1)
    r = EvalRemoval.from_args((f"s={tmp_path / 'eval'}",), image_min_similarity=0.99, kinds=("image",))
    assert r.matcher.cfg.image_min_similarity == 0.99 and r.matcher.cfg.kinds == ("image",)
    with pytest.raises(ConfigError, match="image_max_distance"):
        EvalRemoval.from_args((f"s={tmp_path / 'eval'}",), image_max_distance=99)


def test_bad_eval_path_is_one_line_exit_2(tmp_path):
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:1/a.jpg"], "caption": ["a red circle"]}), urls)
    missing = tmp_path / "no-such-evalset"
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "build_corpus.py"), "--urls", str(urls), "--out",
                        str(out), "--executor", "local", "--eval", f"coco={missing}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("build_corpus: error: ") and str(missing) in lines[0], r.stderr
    assert not out.exists()



def test_overlap_settings_and_repeated_eval_flags(tmp_path, web, internal):
    """--overlap-kinds and the thresholds reach the matcher; two --eval flags give two eval sets."""
    import numpy as np

    from dedup.matcher import MatchConfig
    from pipeline.config import BuildConfig

    # The flags' defaults are MatchConfig's (the two jobs must not disagree on what overlap is).
    b, m = BuildConfig(urls="u", out="o"), MatchConfig()
    assert BuildConfig(urls="u", out="o", eval=("x=y",)).match_kwargs() == {
        "text_threshold": m.text_threshold, "ngram": m.ngram, "image_max_distance": m.image_max_distance,
        "image_min_similarity": m.image_min_similarity, "kinds": m.kinds, "min_caption_words": m.min_caption_words}
    assert b.overlap_kinds == m.kinds

    # A retrieval set whose captions are distinctive, and an image set: text overlap only through a caption.
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    secret = "seven purple giraffes dancing on a frozen lake at dawn"
    for i, caption in enumerate([secret, "an old lighthouse under a violet storm cloud"]):
        noise = np.random.default_rng(i).integers(0, 256, (96, 96, 3), dtype=np.uint8)  # like no web image
        (pairs / f"{i:03d}.jpg").write_bytes(encode(Image.fromarray(noise), "jpg"))
        (pairs / f"{i:03d}.txt").write_text(caption + "\n")
    shapes = tmp_path / "shapes"
    write_imagefolder(shapes, per_class=1)
    rows = populate_images(web, 12, seed=11)
    rows[4]["caption"] = "Seven purple giraffes, dancing on a FROZEN lake at dawn!"  # same words, other case/punct
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.Table.from_pylist(rows), urls)

    def build(out, *flags):
        assert main(build_args(urls, out, web, "--executor", "local", "--eval", f"pairs={pairs}",
                               "--eval", f"shapes={shapes}", *flags)) == 0
        return json.loads((out / "stats.json").read_text()), json.loads((out / "audit" / "summary.json").read_text())

    stats, summary = build(tmp_path / "both", "--text-threshold", "0.9")
    assert set(summary["eval_sets"]) == {"pairs", "shapes"}
    assert summary["eval_sets"]["pairs"]["thresholds"]["text_jaccard"] == 0.9
    assert stats["reasons"] == {"dropped:eval_overlap:pairs:text": 1}, stats["reasons"]
    assert stats["written"] == 11

    stats, summary = build(tmp_path / "images", "--overlap-kinds", "image")
    assert stats["reasons"] == {} and stats["written"] == 12, stats["reasons"]
    assert summary["eval_sets"]["pairs"]["thresholds"]["kinds"] == ["image"]

    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "build_corpus.py"), "--urls", str(urls), "--out",
                        str(tmp_path / "bad"), "--executor", "local", "--eval", f"pairs={pairs}",
                        "--text-threshold", "1.5"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "text_threshold" in r.stderr, r.stderr
