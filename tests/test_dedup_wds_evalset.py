"""clip_benchmark-layout eval sets (WebDataset shards with cls or txt members): loaded and audited."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from dedup.evalsets import EvalSetError, load_eval_set
from dedup.synth import TRANSFORMS, random_image, write_corpus
from jobs.audit_overlap import main
from pipeline.localweb import encode

pytestmark = pytest.mark.timeout(120)


def _tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_clip_benchmark_layout_is_detected_and_audited(tmp_path):
    rng = random.Random(5)
    ev = tmp_path / "wds-cls"
    ev.mkdir()
    images = {f"s{i:04d}": encode(random_image(rng, (128, 128))[0], "webp") for i in range(12)}
    _tar(ev / "0.tar", [(k, {"webp": v, "cls": str(i % 3).encode()}) for i, (k, v) in enumerate(images.items())])
    (ev / "classnames.txt").write_text("cat\ndog\nbird\n")
    (ev / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    es = load_eval_set("wdscls", str(ev))
    assert (es.kind, es.layout, len(es.items), es.classnames) == ("classification", "wds", 12, ["cat", "dog", "bird"])
    assert dict(es.iter_images())[3] == images["s0003"]

    # A corpus with one eval image planted after a JPEG re-encode, among unrelated ones.
    samples = [(encode(random_image(rng, (128, 128))[0], "jpg"), f"unrelated picture number {i}", {"uid": f"u{i}"})
               for i in range(20)]
    planted = TRANSFORMS["jpeg_q50"](Image.open(io.BytesIO(images["s0007"])).convert("RGB"))
    samples.insert(9, (planted, "someone's copy", {"uid": "planted"}))
    write_corpus(str(tmp_path / "corpus"), samples, samples_per_shard=8)
    out = tmp_path / "audited"
    assert main(["--corpus", str(tmp_path / "corpus"), "--eval", f"wdscls={ev}", "--out", str(out),
                 "--executor", "local"]) == 0
    summary = json.loads((out / "audit" / "summary.json").read_text())
    assert summary["eval_sets"]["wdscls"]["overlapping_items"] == ["s0007"]
    rows = pq.read_table(out / "audit" / "overlap.parquet").to_pylist()
    assert [(r["uid"], r["eval_item"], r["kind"]) for r in rows] == [("planted", "s0007", "image")]


def test_wds_without_cls_or_txt_is_refused(tmp_path):
    ev = tmp_path / "bad"
    ev.mkdir()
    _tar(ev / "0.tar", [("a", {"jpg": b"xx", "json": b"{}"})])
    with pytest.raises(EvalSetError, match="neither cls nor txt"):
        load_eval_set("bad", str(ev))
