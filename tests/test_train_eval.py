"""Zero-shot classification and retrieval metrics, with the overlap-audit split."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch
from train_helpers import TINY

from pipeline.localweb import CLASSES, write_imagefolder, write_retrieval
from training.config import ModelConfig
from training.errors import TrainError
from training.evaluate import Evaluator, _ret_metrics, load_classification
from training.model import build_model

pytestmark = pytest.mark.timeout(120)


def test_retrieval_metrics_on_known_similarities():
    # 3 images; captions 0,1 belong to image 0, caption 2 to image 1, caption 3 to image 2.
    owner = torch.tensor([0, 0, 1, 2])
    sim = torch.tensor([[0.9, 0.1, 0.0, 0.0],    # image 0: its caption first
                        [0.0, 0.0, 0.1, 0.9],    # image 1: caption 3 (wrong) first, its own second
                        [0.0, 0.0, 0.0, 1.0]])   # image 2: correct
    m = _ret_metrics(sim, owner, range(3))
    assert m["i2t_R@1"] == pytest.approx(2 / 3) and m["i2t_R@5"] == 1.0
    # texts: 0 -> image 0 (ok); 1 -> image 0 (0.1 beats 0.0s) ok; 2 -> image 1 (0.1) ok; 3 -> image 2 (1.0) ok
    assert m["t2i_R@1"] == 1.0
    sub = _ret_metrics(sim, owner, [1])
    assert sub["i2t_R@1"] == 0.0 and sub["t2i_R@1"] == 1.0


def test_zero_shot_with_overlap_audit(tmp_path, caplog):
    write_imagefolder(tmp_path / "zs", per_class=2, seed=1, size=32)
    write_retrieval(tmp_path / "ret", n=10, seed=2, size=32)
    overlapping = ["red_circle/0000.jpg", "blue_square/0001.jpg", "green_cross/0000.jpg"]
    audit = tmp_path / "summary.json"
    audit.write_text(json.dumps({"eval_sets": {"zs": {"items": 48, "overlapping_items": overlapping},
                                               "ret": {"items": 10, "overlapping_items": ["00003", "00007"]}}}))
    bundle = build_model(ModelConfig(model=TINY), "fp32", torch.device("cpu"))
    ev = Evaluator({"zs": str(tmp_path / "zs")}, {"ret": str(tmp_path / "ret")}, str(audit),
                   bundle.val_transform, bundle.tokenizer, torch.device("cpu"), nullcontext, 0, 1, batch_size=7)
    assert "--overlap-audit" not in caplog.text  # it matches these sets: nothing to warn about
    res = ev.run(bundle.model)
    zs, ret = res["zs"], res["ret"]
    assert zs["kind"] == "zeroshot" and zs["items"] == 2 * len(CLASSES) and set(zs["per_class"]) == set(CLASSES)
    assert (zs["clean_items"], zs["overlap_items"]) == (45, 3)
    assert zs["top1"] == pytest.approx((45 * zs["clean_top1"] + 3 * zs["overlap_top1"]) / 48)
    assert 0 <= zs["top1"] <= zs["top5"] <= 1
    assert (ret["clean_items"], ret["overlap_items"]) == (8, 2) and "overlap_i2t_R@1" in ret

    # The classifier is CLIP's prompt ensemble: check top-1 against a direct computation.
    ds = load_classification("zs", tmp_path / "zs")
    with torch.no_grad():
        w = torch.stack([torch.nn.functional.normalize(bundle.model.encode_text(
            bundle.tokenizer([t.format(c=c) for t in ds.templates]), normalize=True).mean(0), dim=0)
            for c in ds.classnames], dim=1)
        from PIL import Image
        feats = bundle.model.encode_image(torch.stack([bundle.val_transform(Image.open(ds.root / i).convert("RGB"))
                                                       for i, _ in ds.items]), normalize=True)
    direct = ((feats @ w).argmax(1) == torch.tensor([y for _, y in ds.items])).float().mean()
    assert zs["top1"] == pytest.approx(float(direct))


def test_eval_set_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainError, match="no class folders"):
        load_classification("x", tmp_path / "empty")
    write_imagefolder(tmp_path / "zs", per_class=1, seed=1, size=16)
    (tmp_path / "zs/templates.txt").write_text("no placeholder here\n")
    with pytest.raises(TrainError, match=r"templates.txt: every line needs \{c\}"):
        load_classification("x", tmp_path / "zs")


def test_corrupt_eval_image_is_refused_at_init(tmp_path):
    # Found before training starts, naming the file, not as a crash at the first evaluation.
    write_imagefolder(tmp_path / "zs", per_class=1, seed=1, size=16)
    write_retrieval(tmp_path / "ret", n=3, seed=2, size=16)
    bad = sorted((tmp_path / "zs").rglob("*.jpg"))[2]
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    bundle = build_model(ModelConfig(model=TINY), "fp32", torch.device("cpu"))
    with pytest.raises(TrainError, match=rf"{bad}.*cannot decode this evaluation image"):
        Evaluator({"zs": str(tmp_path / "zs")}, {"ret": str(tmp_path / "ret")}, None,
                  bundle.val_transform, bundle.tokenizer, torch.device("cpu"), nullcontext, 0, 1)


def test_overlap_audit_of_other_sets_is_reported(tmp_path, caplog):
    # An audit of other set names, another version of a set, or other item ids would be silently
    # ignored or split wrongly: say so at start.
    write_imagefolder(tmp_path / "zs", per_class=1, seed=1, size=16)
    write_retrieval(tmp_path / "ret", n=3, seed=2, size=16)
    audit = tmp_path / "summary.json"
    audit.write_text(json.dumps({"eval_sets": {"zs": {"items": 99, "overlapping_items": ["nope/0.jpg"]},
                                               "coco": {"items": 3, "overlapping_items": []}}}))
    bundle = build_model(ModelConfig(model=TINY), "fp32", torch.device("cpu"))
    Evaluator({"zs": str(tmp_path / "zs")}, {"ret": str(tmp_path / "ret")}, str(audit),
              bundle.val_transform, bundle.tokenizer, torch.device("cpu"), nullcontext, 0, 1)
    assert f"counted 99 items in 'zs', the eval set has {len(CLASSES)}" in caplog.text
    assert "1 of its 1 overlapping items of 'zs' are not in the eval set (e.g. 'nope/0.jpg')" in caplog.text
    assert "has no eval set 'ret' (it has ['coco', 'zs'])" in caplog.text


def _as_clip_benchmark_shards(src, dst, kind):
    """src as clip_benchmark writes a set: dst/test/0.tar (+ classnames / templates at dst)."""
    import io
    import tarfile

    (dst / "test").mkdir(parents=True)
    with tarfile.open(dst / "test/0.tar", "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if kind == "cls":
            dirs = sorted(d for d in src.iterdir() if d.is_dir())
            for label, d in enumerate(dirs):
                for n, img in enumerate(sorted(d.glob("*.jpg"))):
                    key = f"s{label:03d}{n:04d}"
                    add(f"{key}.webp", img.read_bytes())  # any image suffix: it is only a name
                    add(f"{key}.cls", str(label).encode())
            (dst / "classnames.txt").write_text("".join(d.name.replace("_", " ") + "\n" for d in dirs))
            (dst / "zeroshot_classification_templates.txt").write_bytes((src / "templates.txt").read_bytes())
        else:
            for img in sorted(src.glob("*.jpg")):
                add(f"{img.stem}.jpg", img.read_bytes())
                add(f"{img.stem}.txt", img.with_suffix(".txt").read_bytes())


def test_one_eval_set_loader_for_audit_and_training(tmp_path):
    # clip_benchmark's shards evaluate exactly as the same images in folders do, and every item
    # id the trainer splits metrics by is the id the overlap audit's loader gives that image.
    from dedup.evalsets import load_eval_set

    write_imagefolder(tmp_path / "zs", per_class=2, seed=1, size=32)
    write_retrieval(tmp_path / "ret", n=6, seed=2, size=32)
    _as_clip_benchmark_shards(tmp_path / "zs", tmp_path / "zs-wds", "cls")
    _as_clip_benchmark_shards(tmp_path / "ret", tmp_path / "ret-wds", "txt")
    bundle = build_model(ModelConfig(model=TINY), "fp32", torch.device("cpu"))

    def run(zs, ret):
        ev = Evaluator({"zs": str(tmp_path / zs)}, {"ret": str(tmp_path / ret)}, None, bundle.val_transform,
                       bundle.tokenizer, torch.device("cpu"), nullcontext, 0, 1, batch_size=5)
        assert [i for i, _ in ev.cls_sets[0].items] == [it.id for it in load_eval_set("zs", str(tmp_path / zs)).items]
        return ev.run(bundle.model)

    folders, shards = run("zs", "ret"), run("zs-wds", "ret-wds")
    assert folders["zs"]["items"] == shards["zs"]["items"] == 2 * len(CLASSES)
    assert shards["zs"]["top1"] == pytest.approx(folders["zs"]["top1"])
    assert shards["zs"]["per_class"] == folders["zs"]["per_class"]
    assert shards["ret"]["i2t_R@1"] == pytest.approx(folders["ret"]["i2t_R@1"])
    assert shards["ret"]["t2i_R@5"] == pytest.approx(folders["ret"]["t2i_R@5"])
    # The shards' images are read by offset, byte for byte.
    es = load_eval_set("zs", str(tmp_path / "zs-wds"))
    assert all(it.offset > 0 for it in es.items)
    first_class = sorted(d for d in (tmp_path / "zs").iterdir() if d.is_dir())[0]
    first = sorted(first_class.glob("*.jpg"))[0].read_bytes()
    assert es.read_image(es.items[0]) == first
    with pytest.raises(TrainError, match="is a retrieval set"):
        load_classification("x", tmp_path / "ret-wds")
