"""Perceptual matching: planted copies found under each edit, look-alikes not, banded lookup exact."""

from __future__ import annotations

import io
import random
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from dedup import image as im
from dedup.evalsets import load_eval_set
from dedup.index import BandedIndex, brute_force_hamming, chunk_bounds, chunk_radii
from dedup.matcher import MatchConfig, OverlapMatcher, brute_force_image_candidates, image_candidates
from dedup.synth import TRANSFORMS, generated, photos, random_image
from pipeline.localweb import encode, write_imagefolder

REPO = Path(__file__).resolve().parent.parent
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


def textured_image(seed: int, size: tuple[int, int]) -> Image.Image:
    """Photo-like: smooth colour regions plus detail at several scales (unlike localweb's flat shapes)."""
    rng = np.random.default_rng(seed)
    w, h = size
    acc = np.zeros((h, w, 3), np.float32)
    for cells, amp in ((4, 70.0), (12, 35.0), (40, 15.0)):
        coarse = rng.normal(0, amp, (cells * h // w + 1, cells + 1, 3)).astype(np.float32)
        acc += cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    return Image.fromarray(np.clip(acc + 128, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def non_square_set(tmp_path_factory):
    """4:3 and 3:4 eval images, flat-shape and photo-like, plus a square one."""
    root = tmp_path_factory.mktemp("evals") / "ns"
    (root / "a").mkdir(parents=True)
    rng = random.Random(3)
    imgs = {}
    for i, size in enumerate([(320, 240), (240, 320), (640, 480), (200, 200)]):
        imgs[f"a/shape{i}.jpg"] = random_image(rng, size)[0]
    imgs["a/photo43.jpg"] = textured_image(1, (400, 300))
    imgs["a/photo34.jpg"] = textured_image(2, (300, 400))
    for name, img in imgs.items():
        (root / name).write_bytes(encode(img, "jpg"))
    es = load_eval_set("ns", str(root))
    return imgs, OverlapMatcher.build([es], MatchConfig(kinds=("image",)), threads=2)


@pytest.mark.parametrize("mode", ["center_crop", "border", "keep_ratio"])
def test_resized_copies_of_non_square_images_are_found(non_square_set, mode):
    # The corpus side as build_corpus writes it: img2dataset's Resizer at 256 px
    # (center_crop is pipeline/config.py's default) after a JPEG q50 re-encode on the web.
    from img2dataset.resizer import Resizer

    imgs, matcher = non_square_set
    resizer = Resizer(image_size=256, resize_mode=mode, resize_only_if_bigger=False, encode_format="jpg",
                      encode_quality=95)
    for name, img in imgs.items():
        data, *_ = resizer(io.BytesIO(TRANSFORMS["jpeg_q50"](img)))
        assert name in {m.eval_item for m in matcher.match("k", None, data)}, (mode, name, img.size)


@pytest.mark.parametrize("frac", [0.03, 0.04, 0.05])
def test_symmetric_crop_of_photo_like_image_is_found(non_square_set, frac):
    # A crop on every side scales the content: the thumbnail check must try zooms, not only shifts.
    imgs, matcher = non_square_set
    for name in ("a/photo43.jpg", "a/photo34.jpg"):
        img = imgs[name]
        w, h = img.size
        dx, dy = round(w * frac), round(h * frac)
        data = encode(img.crop((dx, dy, w - dx, h - dy)), "jpg", 90)
        assert name in {m.eval_item for m in matcher.match("k", None, data)}, (name, frac)


def _scene(bg: tuple, blob: tuple, shape: str, fill: tuple, size: int = 128) -> Image.Image:
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    for x, y, r in ((110, 20, 25), (40, 110, 30)):
        d.ellipse([x - r, y - r, x + r, y + r], fill=blob)
    c, r = size // 2, 36
    if shape == "cross":
        d.rectangle([c - r, c - r // 3, c + r, c + r // 3], fill=fill)
        d.rectangle([c - r // 3, c - r, c + r // 3, c + r], fill=fill)
    elif shape == "circle":
        d.ellipse([c - r, c - r, c + r, c + r], fill=fill)
    else:
        d.rectangle([c - r, c - r, c + r, c + r], fill=fill)
    return img.filter(ImageFilter.GaussianBlur(0.6))


# Same shape, colour and layout on backgrounds of another tint, like the three false pairs
# benchmarks/dedup.py found in 5,000 images: hashes within a few bits, correlation 0.97-0.99
# (it subtracts each channel's mean, so the tint is normalised away).
LOOKALIKES = [
    (("cross", (230, 40, 30)), ((200, 240, 235), (150, 215, 190)), ((170, 230, 240), (110, 200, 200))),
    (("circle", (60, 90, 230)), ((200, 200, 190), (160, 160, 150)), ((210, 215, 160), (180, 180, 110))),
    (("square", (210, 30, 40)), ((170, 220, 170), (120, 160, 120)), ((200, 240, 240), (140, 200, 180))),
]


def test_same_shape_on_other_tint_does_not_match(tmp_path):
    root = tmp_path / "tints"
    (root / "a").mkdir(parents=True)
    for i, ((shape, fill), (bg, blob), _) in enumerate(LOOKALIKES):
        (root / "a" / f"{i}.jpg").write_bytes(encode(_scene(bg, blob, shape, fill), "jpg"))
    matcher = OverlapMatcher.build([load_eval_set("t", str(root))], MatchConfig(kinds=("image",)), threads=1)
    for i, ((shape, fill), (bg, blob), (bg2, blob2)) in enumerate(LOOKALIKES):
        original = _scene(bg, blob, shape, fill)
        other = encode(_scene(bg2, blob2, shape, fill), "jpg")
        ii = matcher.sets[0].images
        row = int(np.flatnonzero(ii.variant_view == i)[0])  # the view's first variant: the whole image
        f = im.features(other)
        v = im.verify(f, f.boxes[0], ii.thumbs[i], ii.colours[i], ii.variants[row], matcher.limits())
        # The other tint is what tells them apart: the structure agrees.
        assert v.correlation >= matcher.cfg.image_min_similarity and v.failed == "colour", v
        assert matcher.match("k", None, other) == [], i
        # ...while the edits a real copy picks up (brightness included) still match.
        for name, tf in TRANSFORMS.items():
            assert f"a/{i}.jpg" in {m.eval_item for m in matcher.match("k", None, tf(original))}, (i, name)


def test_flat_images():
    grey = encode(Image.new("RGB", (64, 64), (120, 120, 120)), "png")
    sha, [v] = im.view_features(grey)
    f = im.features(grey)
    same = im.verify(f, f.boxes[0], v.thumb, v.colour, v.variants[0])
    assert same.correlation == 1.0 and same.ok
    other = im.features(encode(Image.new("RGB", (64, 64), (200, 120, 40)), "png"))
    differs = im.verify(other, other.boxes[0], v.thumb, v.colour, v.variants[0])
    assert differs.colour_diff > im.Limits().max_colour and differs.failed == "colour"
    assert im.features(b"not an image") is None


def _codes_computing_everything(img: np.ndarray, crop: float) -> tuple[np.ndarray, ...]:
    """An eval view's (hashes, chroma, variants, parts) as they were computed before the eval side
    skipped codes it never keeps: every turn and fill hashed on every turned box, mirrored too, then
    rows picked; one view at a time."""
    lay = im._eval_layout(crop)
    grey, chroma = im.grids(img)
    h, c, hm, cm = im._box_codes(grey, chroma, lay.boxes, mirror=lay.flip)
    hs, cs = [h, hm], [c, cm]
    variants = [(*b, 0.0, 0.0) for b in lay.boxes] + [(*lay.boxes[i], 1.0, 0.0) for i in lay.flip]
    parts = list(lay.crop_parts)
    trimmed = im.content_box(grey)
    if trimmed != im.WHOLE:
        h, c, hm, cm = im._box_codes(grey, chroma, [trimmed])
        hs += [h, hm]
        cs += [c, cm]
        variants += [(*trimmed, 0.0, 0.0), (*trimmed, 1.0, 0.0)]
        parts += [True, True]
    for a in im.ROTATIONS:
        cut = im.rotated_cut(a)
        variants += [(*im.WHOLE, 0.0, a), (cut, cut, 1 - cut, 1 - cut, 0.0, a), (*im.WHOLE, 0.0, a)]
        parts += [True] * 3
    both = np.dstack([grey, chroma])
    turned = np.stack([cv2.warpAffine(both, m, (im.GRID, im.GRID), flags=cv2.INTER_LINEAR,
                                      borderMode=cv2.BORDER_CONSTANT) for m in lay.turns])
    greys = np.concatenate([turned[..., 0], turned[..., 0] + 255.0 * lay.corners])
    h_t, c_t, _, _ = im._box_codes(greys, np.concatenate([turned[..., 1:]] * 2), lay.turned_boxes)
    k, nb = len(im.ROTATIONS), len(lay.turned_boxes)
    rows = [r for i, j in enumerate(lay.turned_cut) for r in (i * nb, i * nb + j, (k + i) * nb)]
    hs.append(h_t.reshape(-1, im.N_REGIONS)[rows])
    cs.append(c_t.reshape(-1, im.N_REGIONS, im.CHROMA_DIM)[rows])
    return np.concatenate(hs), np.concatenate(cs), np.array(variants, np.float32), np.array(parts)


def _assert_same_codes(hashes, chroma, want_hashes, want_chroma):
    """Equal codes, up to float32 rounding: the batched path multiplies the same numbers in other
    matrix shapes, and a BLAS may sum them in another order for another shape (bit for bit on the
    hosts measured so far). A flipped bit is a coefficient within rounding of its block's median;
    a chroma code off by more than one step, or more than a few such, is a real difference."""
    assert hashes.shape == want_hashes.shape and chroma.shape == want_chroma.shape
    flipped = int(np.unpackbits((hashes ^ want_hashes).view(np.uint8)).sum())
    assert flipped <= max(2, hashes.size * 64 // 2000), f"{flipped} of {hashes.size * 64} hash bits differ"
    diff = np.abs(chroma.astype(np.int16) - want_chroma.astype(np.int16))
    assert diff.max(initial=0) <= 1 and int((diff > 0).sum()) <= max(2, chroma.size // 1000)


def test_batched_eval_codes_equal_computing_everything():
    # Real photographs (non-square ones give three views, some trimmed borders) and generated images.
    pictures = [p.image for p in photos(160)[::6]] + [img for _, img in generated(6, 3)]
    rng = random.Random(5)
    pictures += [random_image(rng, size)[0] for size in ((128, 128), (200, 150), (96, 120))]
    datas = [encode(picture, "jpg") for picture in pictures]
    # All images in one call, their views stacked: the codes of each view alone, as computed before.
    batched = im.view_features_many(datas)
    trimmed = 0
    for data, (sha, views) in zip(datas, batched, strict=True):
        assert (sha, len(views)) == (im.view_features(data)[0], len(im.view_features(data)[1]))
        img = im.decode(data)
        for view, v in zip(im.views(img), views, strict=True):
            hashes, chroma, variants, parts = _codes_computing_everything(view, 0.08)
            _assert_same_codes(v.hashes, v.chroma, hashes, chroma)
            # Each row labelled with its box, mirror and turn, and parts indexed where they were.
            assert np.array_equal(v.variants, variants) and np.array_equal(v.parts, parts)
            assert np.array_equal(v.thumb, im._thumbs(view)[0]) and v.sha256 == sha
            trimmed += im.content_box(im.grids(view)[0]) != im.WHOLE
        # The training side keeps the unmirrored codes of the same boxes.
        f = im.features(data)
        grey, chroma = im.grids(img)
        h, c, _, _ = im._box_codes(grey, chroma, [tuple(b) for b in f.boxes.tolist()])
        _assert_same_codes(f.hashes, f.chroma, h, c)
    assert trimmed >= 3  # the trimmed-box path was exercised


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
    assert sum(w for _, w in chunk_bounds(d)) == 64 and len(chunk_bounds(d)) == 4


@pytest.mark.parametrize("d", [3, 8, 10, 13])
def test_banded_lookup_probes_generalised_pigeonhole_radii(d):
    # Radii adding up to d - 3, not floor(d / 4) on every chunk: d = 8 probes 188 buckets a query, not 548.
    radii = chunk_radii(d, 4)
    assert sum(radii) == d - 3 and max(radii) - min(radii) <= 1
    # The hardest pairs: exactly d bits apart, within its radius on one chunk only (one bit more on
    # every other), so that chunk alone can find them; each must still be found, at distance d.
    rng = np.random.default_rng(d)
    base = rng.integers(0, 2**63, size=50, dtype=np.uint64)
    bounds = chunk_bounds(d)
    queries = []
    for h in base:
        for j in range(4):
            q = int(h)
            for k, (shift, width) in enumerate(bounds):
                for b in rng.choice(width, size=radii[k] + (k != j), replace=False):
                    q ^= 1 << (shift + int(b))
            queries.append(q)
    queries = np.array(queries, dtype=np.uint64)
    assert (np.bitwise_count(queries ^ np.repeat(base, 4)) == d).all()
    got = BandedIndex(base, None, d).search(queries)
    assert all(got.get((i, i // 4)) == d for i in range(len(queries)))
    assert got == brute_force_hamming(queries, base, np.arange(len(base)), d)
    # Which chunks get the larger radius is chosen per query by bucket size: with most of the index
    # in one bucket of the first chunk (crop boxes of one image share chunk values), pairs that only
    # the first chunk can find at the larger radius must still be found when it gets the smaller.
    top = np.repeat(base, 10) & np.uint64(0xFFFF << 48)
    index = np.concatenate([top | rng.integers(0, 2**48, len(top), dtype=np.uint64), base])
    got = BandedIndex(index, None, d).search(queries)
    assert got == brute_force_hamming(queries, index, np.arange(len(index)), d)
    assert all(got.get((i, len(top) + i // 4)) == d for i in range(len(queries)))


def test_banded_lookup_equals_brute_force_on_real_hashes(shapes_set):
    es, matcher = shapes_set
    s = matcher.sets[0]
    rng = random.Random(5)
    feats = [im.features(encode(random_image(rng)[0], "jpg")) for _ in range(60)]
    feats += [im.features(TRANSFORMS["crop_4pct"](Image.open(it.path).convert("RGB")))
              for it in es.items[:20]]
    q = np.concatenate([f.hashes[:, 0] for f in feats])
    whole = s.images.bands[0]
    for d in (6, 10, 14):
        rows = np.arange(len(whole.hashes))  # the matcher's index: each variant row its own owner
        idx = BandedIndex(whole.hashes, None, d)
        assert idx.search(q) == brute_force_hamming(q, whole.hashes, rows, d)
    # The matcher's lookup (every box and part of the training image against the same part of every
    # eval variant, then the chroma pre-check) against all pairs.
    got = image_candidates(s, feats, matcher.cfg)
    assert got == brute_force_image_candidates(s, feats, matcher.cfg)
    assert all(any(k == (60 + i, i_item) for k in got) for i, i_item in enumerate(
        [s.item_ids.index(it.id) for it in es.items[:20]]))


def test_content_boxes_of_a_stack_equal_one_at_a_time():
    # Letterboxes, pillarboxes and frames of several widths and colours, one-cell JPEG edges, a flat
    # grid (every side cut to the limit) and plain pictures, as the eval groups stack them.
    rng = np.random.default_rng(3)
    grids = []
    for _ in range(40):
        g = rng.uniform(0, 255, (im.GRID, im.GRID)).astype(np.float32)
        cuts = rng.integers(0, 24, 4) * rng.integers(0, 2, 4)
        fill = float(rng.choice([0.0, 255.0, rng.uniform(0, 255)]))
        t, b, lf, r = cuts
        g[:t], g[im.GRID - b :], g[:, :lf], g[:, im.GRID - r :] = fill, fill, fill, fill
        grids.append(g + rng.uniform(-3, 3, g.shape).astype(np.float32))
    grids.append(np.full((im.GRID, im.GRID), 128.0, np.float32))
    stack = np.stack(grids)
    want = [im.content_box(g) for g in stack]
    assert im.content_boxes(stack) == want
    assert len(set(want)) > 20 and im.WHOLE in want  # the grids do exercise many cuts, and none


def test_eval_group_holds_one_decoded_image_at_a_time():
    # 16 copies of a 4000x3000 JPEG hashed as one group: each image is reduced to its grids and
    # thumbnails as soon as it is decoded. Holding all 16 decoded images and their views until the
    # group's end grew the peak by 1.3 GB (one at a time: about 70 MB).
    code = """
import resource, sys
import cv2, numpy as np
from dedup import image as im
small = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
data = cv2.imencode(".jpg", cv2.resize(small, (4000, 3000), interpolation=cv2.INTER_LINEAR))[1].tobytes()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = im.view_features_many([data] * 16)
assert len(out) == 16 and all(len(views) == 3 for _, views in out)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=170)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[-1]) < 400, f"peak RSS grew {r.stdout.split()[-1]} MiB"
