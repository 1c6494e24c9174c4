"""The demo's noisy web and its before/after filtering figures (issue 11 item 5), without training."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dedup.image import features, hamming
from dedup.matcher import MatchConfig
from jobs.demo import (
    MISMATCHED,
    REUPLOAD,
    change,
    filter_fates,
    order_rows,
    plant_noise,
    removal_scores,
)
from pipeline.localweb import populate_faults, populate_images


def _body(web, url: str) -> bytes:
    return web.resources[url[len(web.base):]].body


def test_planted_noise_is_what_the_truth_says(web):
    images = populate_images(web, 60, seed=3)
    original = {r["uid"]: dict(r) for r in images}
    rng = random.Random(5)
    reuploads, truth = plant_noise(web, images, 0.2, 0.1, rng)
    rows = order_rows(images + list(populate_faults(web).values()), reuploads, truth, rng)
    by_uid = {r["uid"]: r for r in rows}
    noise = {t["uid"]: t for t in truth}
    assert sum(t["noise"] == MISMATCHED for t in truth) == 12 and sum(t["noise"] == REUPLOAD for t in truth) == 6
    assert len(rows) == len(by_uid) == 60 + 6 + len(populate_faults(web))
    assert all(rows[t["row"]]["uid"] == t["uid"] for t in truth)
    for uid, row in original.items():
        t = noise.get(uid)
        if t is None:  # clean images keep their caption
            assert by_uid[uid]["caption"] == row["caption"]
            continue
        # A mismatched caption is the true caption of another image, of another class, that keeps it.
        donor = original[t["of"]]
        assert by_uid[uid]["caption"] == donor["caption"] != row["caption"]
        assert donor["label"] != row["label"] and t["of"] not in noise
        assert by_uid[t["of"]]["caption"] == donor["caption"]
    for t in (t for t in truth if t["noise"] == REUPLOAD):
        copy, first = by_uid[t["uid"]], by_uid[t["of"]]
        assert t["of"] not in noise  # a copy of a clean image, with a right caption of its own
        assert t["row"] > rows.index(first)  # after the original: dedup keeping the lowest row drops the copy
        assert first["label"] in copy["caption"] and copy["caption"] != first["caption"]
        a, b = _body(web, first["url"]), _body(web, copy["url"])
        assert a != b
        # Near-duplicates as the image dedup sees them: whole-image hashes within its match distance.
        fa, fb = features(a), features(b)
        assert hamming(fa.hashes[0, 0], fb.hashes[0, 0]) <= MatchConfig().image_max_distance
        assert fb.size != fa.size


def test_plant_noise_refuses_shares_that_do_not_fit(web):
    images = populate_images(web, 10, seed=3)
    with pytest.raises(ValueError, match="--mismatched"):
        plant_noise(web, images, 1.0, 0.0, random.Random(0))
    with pytest.raises(ValueError, match="add up"):
        plant_noise(web, images, 0.6, 0.5, random.Random(0))


def test_removal_precision_and_recall_on_a_constructed_case(tmp_path):
    truth = {1: MISMATCHED, 2: MISMATCHED, 3: REUPLOAD, 9: MISMATCHED}  # row 9 never reached the filters
    fates = [(0, None), (1, "clip_score_low"), (2, None), (3, "near_duplicate:image"), (4, "clip_score_low"),
             (5, None), (6, "clip_score_low")]
    s = removal_scores(truth, fates)
    # Removed: 1, 3, 4, 6, of which noise 1 and 3; noise seen: 1, 2, 3.
    assert (s["rows"], s["removed"], s["noise"], s["noise_removed"]) == (7, 4, 3, 2)
    assert s["precision"] == pytest.approx(2 / 4) and s["recall"] == pytest.approx(2 / 3)
    assert s["kinds"] == {MISMATCHED: {"planted": 2, "removed": 1}, REUPLOAD: {"planted": 1, "removed": 1}}
    assert s["reasons"] == {"clip_score_low": {"removed": 3, "noise": 1},
                            "near_duplicate:image": {"removed": 1, "noise": 1}}
    none = removal_scores({}, [(0, None)])
    assert none["precision"] is None and none["recall"] is None

    # The fates come from the filtered build's manifest: only rows that reached its filters count.
    (tmp_path / "manifest").mkdir()
    pq.write_table(pa.Table.from_pylist([
        {"row": 4, "status": "dropped", "reason": "clip_score_low"},
        {"row": 1, "status": "written", "reason": None},
        {"row": 8, "status": "dropped", "reason": "near_duplicate:image"},
        {"row": 2, "status": "dropped", "reason": "duplicate_url"},
        {"row": 7, "status": "failed", "reason": "http_404"}]), tmp_path / "manifest/00000.parquet")
    assert list(filter_fates(tmp_path / "manifest")) == [(4, "clip_score_low"), (1, None),
                                                         (8, "near_duplicate:image")]


def test_change_is_judged_against_the_eval_sets_noise():
    assert change(0.50, 0.60, 240) == "better"  # 0.10 > 2 x 0.045
    assert change(0.60, 0.50, 240) == "worse"
    assert change(0.50, 0.55, 240) == "no clear change"
    assert change(0.50, 0.60, 60) == "no clear change"  # the same gain on a quarter of the items
    assert change(0.0, 0.0, 60) == "no clear change"


def test_both_demo_trainings_see_the_same_samples(tmp_path, monkeypatch):
    """The filtered corpus is smaller: its run gets the first corpus's epoch length, so the same steps."""
    from training import demo

    seen = []

    def fake_train(argv):
        seen.append(argv)
        out = argv[argv.index("--output") + 1]
        recs = [{"set": "shapes", "top1": 0.5, "top5": 0.9, "items": 240},
                {"set": "pairs", "i2t_R@1": 0.1, "t2i_R@1": 0.2}]
        (tmp_path / out).mkdir(parents=True, exist_ok=True)
        (tmp_path / out / "results.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
        return 0

    monkeypatch.setattr(demo.train, "main", fake_train)
    for name, n in (("noisy", 2600), ("filtered", 2100)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "sizes.json").write_text(json.dumps({"00000.tar": n}))
    kw = {"retrieval_name": "pairs", "target_samples": 40_000}
    before = demo.run_demo(tmp_path / "noisy", "zs", "ret", tmp_path / "run", **kw)
    after = demo.run_demo(tmp_path / "filtered", "zs", "ret", tmp_path / "run2",
                          samples_per_epoch=before["corpus_samples"], **kw)
    assert (before["corpus_samples"], after["corpus_samples"]) == (2600, 2100)
    assert before["samples_seen"] == after["samples_seen"] == 15 * (2600 // 64 * 64)
    epochs = [a[a.index("--epochs") + 1] for a in seen]
    assert epochs == ["15", "15"]
    assert "--train-num-samples" not in seen[0] and seen[1][seen[1].index("--train-num-samples") + 1] == "2600"
