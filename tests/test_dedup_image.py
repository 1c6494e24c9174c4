"""Perceptual matching: planted copies found under each edit, look-alikes not, banded lookup exact."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from dedup import image as im
from dedup.evalsets import load_eval_set
from dedup.index import BandedIndex, brute_force_hamming, chunk_bounds
from dedup.matcher import MatchConfig, OverlapMatcher, brute_force_image_candidates, image_candidates
from dedup.synth import TRANSFORMS, random_image
from pipeline.localweb import encode, write_imagefolder

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def shapes_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("evals") / "shapes"
    write_imagefolder(root, per_class=3, seed=7)  # 24 classes x 3 = 72 images, 128x128
    es = load_eval_set("shapes", str(root))
    matcher = OverlapMatcher.build([es], MatchConfig(kinds=("image",)), threads=2)
    return es, matcher


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_planted_copies_are_found(shapes_set, transform):
    es, matcher = shapes_set

    for item in es.items[::4]:  # 18 items x every edit
        img = Image.open(item.path).convert("RGB")
        ms = matcher.match("k", None, TRANSFORMS[transform](img))
        assert item.id in {m.eval_item for m in ms}, (transform, item.id, ms)
        assert all(m.kind == "image" and m.eval_set == "shapes" for m in ms)


def test_exact_bytes_match_by_sha256(shapes_set):
    es, matcher = shapes_set
    item = es.items[5]
    data = open(item.path, "rb").read()
    [m] = [m for m in matcher.match("k", None, data) if m.eval_item == item.id]
    assert m.score == 0.0 and m.similarity == 1.0
    # The digest of the originally downloaded bytes (json sha256) is looked up too.
    [m] = matcher.match("k", None, None, sha256=im.features(data).sha256)
    assert m.eval_item == item.id


def test_unrelated_images_of_same_shape_and_colour_do_not_match(shapes_set):
    es, matcher = shapes_set
    rng = random.Random(1234)
    n = 0
    for item in es.items:
        color, shape = item.id.split("/")[0].split("_")
        for _ in range(4):  # same class, same size: the closest an unrelated image gets
            img, _ = random_image(rng, (128, 128), shape, color)
            assert matcher.match("k", None, encode(img, "jpg")) == [], item.id
            n += 1
    assert n == 288


def test_flat_images():
    a = np.full((32, 32, 3), 120, np.uint8)
    assert im.similarity(a, a) == 1.0
    assert im.similarity(a, np.full((32, 32, 3), 200, np.uint8)) == 0.0
    assert im.features(b"not an image") is None


@pytest.mark.parametrize("d", [0, 3, 10, 20])
def test_banded_lookup_equals_brute_force(d):
    rng = np.random.default_rng(d)
    base = rng.integers(0, 2**63, size=400, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 400, dtype=np.uint64)
    # Queries at known distances from indexed hashes, plus random ones.
    flips = [np.bitwise_xor.reduce(np.uint64(1) << rng.choice(64, size=k, replace=False).astype(np.uint64))
             if k else np.uint64(0) for k in rng.integers(0, 2 * d + 3, size=300)]
    queries = np.concatenate([base[:300] ^ np.array(flips, dtype=np.uint64),
                              rng.integers(0, 2**63, size=200, dtype=np.uint64)])
    owners = np.arange(400) // 2  # two hashes per item, like the crop variants
    idx = BandedIndex(base, owners, d)
    got = idx.search(queries)
    assert got == brute_force_hamming(queries, base, owners, d)
    assert sum(w for _, w in chunk_bounds(d)) == 64 and len(chunk_bounds(d)) == d + 1


def test_banded_lookup_equals_brute_force_on_real_hashes(shapes_set):
    es, matcher = shapes_set
    s = matcher.sets[0]
    rng = random.Random(5)
    feats = [im.features(encode(random_image(rng)[0], "jpg")) for _ in range(60)]
    feats += [im.features(TRANSFORMS["crop_4pct"](Image.open(it.path).convert("RGB")))
              for it in es.items[:20]]
    q = np.concatenate([f.hashes for f in feats])
    for d in (6, 10, 14):
        idx = BandedIndex(s.image.hashes, s.image.owners, d)
        assert idx.search(q) == brute_force_hamming(q, s.image.hashes, s.image.owners, d)
    # The matcher's two-sided lookup (whole vs variants, variants vs whole) against all pairs.
    got = image_candidates(s, [f.hashes for f in feats])
    assert got == brute_force_image_candidates(s, [f.hashes for f in feats], matcher.cfg.image_max_distance)
    assert all(any(k == (60 + i, i_item) for k in got) for i, i_item in enumerate(
        [s.item_ids.index(it.id) for it in es.items[:20]]))
