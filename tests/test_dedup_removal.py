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

