"""End to end: planted overlaps removed, counts add up, shards open in the readers people use, report renders."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import chromium_flags, thumbnails_in_chromium
from PIL import Image

from dedup.synth import TRANSFORMS, random_image, write_corpus
from jobs.audit_overlap import main
from pipeline.localweb import encode, write_imagefolder
from pipeline.shards import get_fs, verify_shards

pytestmark = pytest.mark.timeout(240)
WORDS = ("river bridge lantern market evening crowd bicycle harbour mountain snow orchard kitchen window violin "
         "garden statue tram desert cloud meadow").split()


def _caption(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(10))


def _build(root: Path) -> dict:
    """Eval sets + a 3-shard corpus with known overlaps. Returns what was planted."""
    rng = random.Random(42)
    shapes = root / "evalsets" / "shapes"
    write_imagefolder(shapes, per_class=2, seed=11)
    pairs = root / "evalsets" / "pairs"
    pairs.mkdir(parents=True)
    pair_caps = {}
    for i in range(12):
        img, _ = random_image(rng, (160, 120))
        (pairs / f"p{i:03d}.jpg").write_bytes(encode(img, "jpg"))
        pair_caps[f"p{i:03d}"] = _caption(rng)
        (pairs / f"p{i:03d}.txt").write_text(pair_caps[f"p{i:03d}"] + "\n")
    samples, planted = [], {}
    shape_items = sorted(p.relative_to(shapes).as_posix() for p in shapes.glob("*/*.jpg"))
    for i in range(70):
        size = rng.choice([(96, 96), (160, 120), (200, 260)])
        img, cap = random_image(rng, size)
        samples.append((encode(img, "jpg"), f"{cap} {_caption(rng)}", {"uid": f"u{i}", "url": f"http://x/{i}.jpg"}))
    for n, (name, tf) in enumerate(sorted(TRANSFORMS.items())):  # one shapes item per edit
        item = shape_items[n * 7]
        data = tf(Image.open(shapes / item).convert("RGB"))
        planted[len(samples)] = ("shapes", item, "image")
        samples.append((data, f"a drawing {n} {_caption(rng)}", {"uid": f"plant-{name}", "url": f"http://x/{name}"}))
    for k in ("p002", "p007"):  # image copy from the retrieval set, with an unrelated caption
        planted[len(samples)] = ("pairs", k, "image")
        samples.append((TRANSFORMS["jpeg_q50"](Image.open(pairs / f"{k}.jpg")), _caption(rng), {"uid": k}))
    for k in ("p004", "p010"):  # caption copy (case, punctuation, spacing changed), unrelated image
        planted[len(samples)] = ("pairs", k, "text")
        cap = "  " + pair_caps[k].upper().replace(" ", " ,  ") + "!!"
        samples.append((encode(random_image(rng)[0], "jpg"), cap, {"uid": k}))
    bad = len(samples)
    samples.append((b"\xff\xd8 broken jpeg", "a broken image " + _caption(rng), {"uid": "broken"}))
    order = list(range(len(samples)))
    rng.shuffle(order)  # spread the planted samples over the shards
    keys = {old: f"{new:09d}" for new, old in enumerate(order)}
    write_corpus(str(root / "corpus"), [samples[i] for i in order], samples_per_shard=30)
    return {"planted": {keys[i]: v for i, v in planted.items()}, "broken": keys[bad], "n": len(samples),
            "shapes": str(shapes), "pairs": str(pairs)}


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(p.as_posix().encode() + (p.read_bytes() if p.is_file() else b""))
    return h.hexdigest()


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    info = _build(root)
    before = _tree_digest(root / "corpus")
    argv = ["--corpus", str(root / "corpus"), "--eval", f"shapes={info['shapes']}", "--eval",
            f"pairs={info['pairs']}", "--out", str(root / "audited"), "--executor", "local"]
    return root, info, argv, before


def test_planted_overlaps_removed_and_counts_add_up(audited, capsys):
    root, info, argv, before = audited
    assert main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    n_planted = len(info["planted"])
    assert last == f"rows in {info['n']} = written {info['n'] - n_planted - 1} + dropped {n_planted} + failed 1"
    assert _tree_digest(root / "corpus") == before  # input never modified

    out = root / "audited"
    manifest = pq.read_table(out / "manifest").to_pylist()
    assert sorted(r["key"] for r in manifest) == [f"{i:09d}" for i in range(info["n"])]
    dropped = {r["key"]: r["reason"] for r in manifest if r["status"] == "dropped"}
    assert dropped == {k: f"eval_overlap:{s}:{kind}" for k, (s, _, kind) in info["planted"].items()}
    [failed] = [r for r in manifest if r["status"] == "failed"]
    assert failed["key"] == info["broken"] and failed["reason"] == "undecodable_image"

    overlap = pq.read_table(out / "audit" / "overlap.parquet").to_pylist()
    assert {(r["key"], r["eval_set"], r["eval_item"], r["kind"]) for r in overlap} == {
        (k, s, item, kind) for k, (s, item, kind) in info["planted"].items()}
    assert {"key", "uid", "url", "caption", "eval_set", "eval_item", "kind", "score"} <= set(overlap[0])

    summary = json.loads((out / "audit" / "summary.json").read_text())["eval_sets"]
    for name in ("shapes", "pairs"):
        want = sorted({item for s, item, _ in info["planted"].values() if s == name})
        assert summary[name]["overlapping_items"] == want
        assert summary[name]["items_with_overlap"] == len(want)
        assert summary[name]["train_samples_removed"] == sum(1 for s, _, _ in info["planted"].values() if s == name)
    assert summary["shapes"]["kind"] == "classification" and summary["shapes"]["items"] == 48
    assert summary["pairs"]["kind"] == "retrieval" and summary["pairs"]["items"] == 12
    assert summary["shapes"]["overlap_pct"] == pytest.approx(100 * 5 / 48, abs=1e-3)

    # Same layout as build_corpus: contiguous, full shards, sizes.json agreeing with the tars.
    fs, _ = get_fs(str(out))
    assert verify_shards(fs, str(out / "shards"), 30) == info["n"] - n_planted - 1
    written = {r["key"]: r["shard"] for r in manifest if r["status"] == "written"}
    sizes = json.loads((out / "shards" / "sizes.json").read_text())
    assert sorted(sizes) == ["00000.tar", "00001.tar", "00002.tar"] and sum(sizes.values()) == len(written)


def test_clean_shards_open_in_webdataset_and_openclip(audited):
    import webdataset as wds

    root, info, argv, _ = audited
    shards = sorted(str(p) for p in (root / "audited" / "shards").glob("*.tar"))
    if not shards:
        assert main(argv) == 0
        shards = sorted(str(p) for p in (root / "audited" / "shards").glob("*.tar"))
    keys = [s["__key__"] for s in wds.WebDataset(shards, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg")
            .map(lambda t: {"__key__": t[0]})]
    assert len(keys) == info["n"] - len(info["planted"]) - 1 and not set(keys) & set(info["planted"])

    import argparse

    import torch
    from open_clip_train.data import get_wds_dataset

    args = argparse.Namespace(train_data="::".join(shards), val_data=None, train_num_samples=len(keys),
                              val_num_samples=None, train_data_upsampling_factors=None, seed=0, batch_size=8,
                              workers=1, world_size=1)

    def preprocess(img):
        return torch.from_numpy(np.asarray(img.convert("RGB").resize((32, 32)), dtype=np.float32)).permute(2, 0, 1)

    def tokenizer(texts):
        return torch.zeros((len(texts), 8), dtype=torch.long)

    data = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer)
    images, texts = next(iter(data.dataloader))
    assert images.shape == (8, 3, 32, 32) and texts.shape == (8, 8)


def test_rerun_skips_finished_shards(audited, capsys, caplog):
    root, info, argv, _ = audited
    assert main(argv) == 0
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main(argv) == 0  # every shard has its completion marker: nothing is fingerprinted again
    assert not [r for r in caplog.records if "rows/s" in r.getMessage() and "done" in r.getMessage()]
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"rows in {info['n']} = ")


def test_report_renders_in_headless_chromium(audited, tmp_path):
    root, info, argv, _ = audited
    report = root / "audited" / "audit" / "report.html"
    if not report.exists():
        assert main(argv) == 0
    total, ok, _ = thumbnails_in_chromium(report, tmp_path / "profile")
    # One training and one eval thumbnail per pair (the broken image never matched, so none is missing).
    assert total == 2 * len(info["planted"]) and ok == total
    shot = tmp_path / "report.png"
    subprocess.run([*chromium_flags(tmp_path / "profile"), f"--screenshot={shot}", "--window-size=1280,2400", report.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


@pytest.mark.parametrize("case", ["missing_eval", "unknown_layout", "no_sizes", "bad_eval_arg"])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, case):
    corpus = tmp_path / "corpus"
    write_corpus(str(corpus), [(encode(random_image(random.Random(0))[0], "jpg"), "a cap", {})], 10)
    ev = tmp_path / "ev"
    write_imagefolder(ev, per_class=1)
    args = {"corpus": str(corpus), "eval": f"e={ev}"}
    if case == "missing_eval":
        args["eval"], needle = f"e={tmp_path / 'nope'}", "nope: eval set 'e' does not exist"
    elif case == "unknown_layout":
        (tmp_path / "odd").mkdir()
        (tmp_path / "odd" / "readme.md").write_text("hi")
        args["eval"], needle = f"e={tmp_path / 'odd'}", "unknown eval set layout"
    elif case == "no_sizes":
        (corpus / "shards" / "sizes.json").unlink()
        needle = "sizes.json: missing"
    else:
        args["eval"], needle = "just-a-path", "expected NAME=PATH"
    rc = main(["--corpus", args["corpus"], "--eval", args["eval"], "--out", str(tmp_path / "out"), "--executor",
               "local"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err


def _small_corpus(path: Path, eval_image: Path, plant_at: int, seed: int) -> None:
    rng = random.Random(seed)
    samples = [(encode(random_image(rng)[0], "jpg"), f"unrelated caption number {i} here", {}) for i in range(10)]
    samples[plant_at] = (TRANSFORMS["jpeg_q50"](Image.open(eval_image).convert("RGB")), "copy", {})
    write_corpus(str(path), samples, 5)


def test_rerun_with_other_input_is_refused(tmp_path, capsys):
    # Reusing _work/ results of another corpus would drop the wrong samples and keep the copy.
    ev = tmp_path / "ev"
    write_imagefolder(ev, per_class=1, seed=3)
    first = sorted(ev.glob("*/*.jpg"))[0]
    _small_corpus(tmp_path / "A", first, 2, 1)
    _small_corpus(tmp_path / "B", first, 7, 1)
    out = tmp_path / "out"

    def run(corpus: Path) -> tuple[int, list[str]]:
        rc = main(["--corpus", str(corpus), "--eval", f"e={ev}", "--out", str(out), "--executor", "local"])
        return rc, capsys.readouterr().err.strip().splitlines()

    assert run(tmp_path / "A")[0] == 0
    dropped = [r["key"] for r in pq.read_table(out / "manifest").to_pylist() if r["status"] == "dropped"]
    assert dropped == ["000000002"]
    assert run(tmp_path / "A")[0] == 0  # the same input: fine, finished shards reused

    rc, err = run(tmp_path / "B")  # another corpus folder
    assert rc == 2 and len(err) == 1 and "run.json" in err[0] and "corpus:" in err[0], err
    _small_corpus(tmp_path / "A", first, 7, 1)  # the same folder, rewritten
    rc, err = run(tmp_path / "A")
    assert rc == 2 and len(err) == 1 and "corpus_digest" in err[0], err
    shutil.rmtree(out)  # what the message advises
    assert run(tmp_path / "A")[0] == 0
    extra = ev / first.parent.name / "extra.jpg"  # the eval set gains an item
    extra.write_bytes(first.read_bytes())
    rc, err = run(tmp_path / "A")
    assert rc == 2 and len(err) == 1 and "evals.e.digest" in err[0], err
    # A new --out starts clean and sees the new input.
    out = tmp_path / "out2"
    assert run(tmp_path / "B")[0] == 0
    dropped = [r["key"] for r in pq.read_table(out / "manifest").to_pylist() if r["status"] == "dropped"]
    assert dropped == ["000000007"]


def test_empty_corpus_gives_an_empty_clean_corpus(tmp_path, capsys):
    # build_corpus writes sizes.json {} when every download failed.
    ev = tmp_path / "ev"
    write_imagefolder(ev, per_class=1, seed=3)
    write_corpus(str(tmp_path / "c"), [], 5)
    out = tmp_path / "out"
    assert main(["--corpus", str(tmp_path / "c"), "--eval", f"e={ev}", "--out", str(out), "--executor", "local"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "rows in 0 = written 0 + dropped 0 + failed 0"
    assert json.loads((out / "shards" / "sizes.json").read_text()) == {}
    assert json.loads((out / "audit" / "summary.json").read_text())["eval_sets"]["e"]["train_samples_removed"] == 0


def test_failed_merge_leaves_no_summary_and_a_rerun_finishes(tmp_path, monkeypatch):
    # The trainer reads summary.json as "this corpus is clean": it is written last, after the
    # shards and the report, so an audit that dies before it leaves none.
    import dedup.audit as audit
    import dedup.report as report

    ev = tmp_path / "ev"
    write_imagefolder(ev, per_class=1, seed=3)
    _small_corpus(tmp_path / "A", sorted(ev.glob("*/*.jpg"))[0], 2, 1)
    cfg = audit.AuditConfig(corpus=str(tmp_path / "A"), evals=[f"e={ev}"], out=str(tmp_path / "out"))
    summary = tmp_path / "out" / "audit" / "summary.json"

    def broken(*_a, **_k):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(report, "write_report", broken)
        with pytest.raises(Exception, match="disk full"):
            audit.run_audit(cfg)
    assert not summary.exists() and (tmp_path / "out" / "shards" / "sizes.json").exists()
    assert audit.run_audit(cfg)["corpus"]["dropped"] == 1
    assert summary.exists() and not (tmp_path / "out" / "_work").exists()


def test_failed_samples_matched_by_sha256_are_not_counted_removed(tmp_path):
    # An eval file OpenCV cannot read still matches a training sample by the digest of its
    # bytes; and a training sample that failed (undecodable) is "failed", not "removed".
    ev = tmp_path / "ev"
    write_imagefolder(ev, per_class=1, seed=3)
    garbage = b"GIF89a not really an image"
    (ev / sorted(p.name for p in ev.iterdir() if p.is_dir())[0] / "odd.jpg").write_bytes(garbage)
    good = sorted(ev.glob("*/*.jpg"))[-1]
    rng = random.Random(4)
    samples = [(encode(random_image(rng)[0], "jpg"), f"unrelated caption number {i} here", {}) for i in range(6)]
    samples[1] = (TRANSFORMS["jpeg_q50"](Image.open(good).convert("RGB")), "copy", {})  # dropped
    samples[3] = (b"broken", "served as is", {"sha256": hashlib.sha256(garbage).hexdigest()})  # failed, matched
    write_corpus(str(tmp_path / "c"), samples, 3)
    out = tmp_path / "out"
    assert main(["--corpus", str(tmp_path / "c"), "--eval", f"e={ev}", "--out", str(out), "--executor", "local"]) == 0
    overlap = pq.read_table(out / "audit" / "overlap.parquet").to_pylist()
    assert {(m["key"], m["eval_item"].endswith("odd.jpg")) for m in overlap} == {("000000001", False),
                                                                                 ("000000003", True)}
    fates = {r["key"]: r["status"] for r in pq.read_table(out / "manifest").to_pylist()}
    assert fates["000000001"] == "dropped" and fates["000000003"] == "failed"
    e = json.loads((out / "audit" / "summary.json").read_text())["eval_sets"]["e"]
    assert e["train_samples_removed"] == 1 and e["items_with_overlap"] == 2


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ray_fan_out_gives_the_same_result(audited, tmp_path, capsys, caplog):
    root, info, argv, _ = audited
    ray_out = tmp_path / "ray-out"
    argv_ray = [a if a != str(root / "audited") else str(ray_out) for a in argv]
    argv_ray[argv_ray.index("local")] = "ray"
    try:
        with caplog.at_level("INFO"):
            assert main([*argv_ray, "--num-cpus", "2"]) == 0
    finally:
        import ray

        ray.shutdown()
    n_shards = len(json.loads((root / "corpus" / "shards" / "sizes.json").read_text()))
    assert n_shards > 2 and f"match: {n_shards} tasks (0 done before), {info['n']} samples" in caplog.text
    local = root / "audited"
    if not (local / "manifest").exists():
        assert main(argv) == 0
    for rel in ("manifest", "audit/overlap.parquet"):
        a = pq.read_table(local / rel).sort_by("key").to_pylist()
        b = pq.read_table(ray_out / rel).sort_by("key").to_pylist()
        assert a == b, rel
    assert (local / "shards" / "sizes.json").read_text() == (ray_out / "shards" / "sizes.json").read_text()
