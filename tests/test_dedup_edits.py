"""Issue 10 on a small set: copies planted under each everyday edit (ISC 2021 / DISC21 family) are found
on real photographs and on generated images; distinct look-alikes are not.

The edits go on the photographs the thresholds were chosen on (`split_photos`' tuning half) and on
generated images; the held-out half is measured, not asserted, by `benchmarks/dedup.py --photos
report` (which falls short on some of it: see the README).
"""

from __future__ import annotations

import math
import random

import cv2
import numpy as np
import pytest
from PIL import Image

from dedup import image as im
from dedup.evalsets import load_eval_set
from dedup.matcher import MatchConfig, OverlapMatcher
from dedup.synth import (
    EDIT_RECALL_BAR,
    EDITS,
    Query,
    edit_table,
    generated,
    generated_lookalike,
    photos,
    plant_edits,
    plant_lookalikes,
    split_photos,
)
from pipeline.localweb import encode

pytestmark = pytest.mark.timeout(300)
GEN_SEED = 11


@pytest.fixture(scope="module")
def edit_set(tmp_path_factory):
    """Eval set: every packaged photograph that is not a look-alike (both halves, so that each look-alike's
    partner is there) and nine generated images. Returns (photos, tuning-half eval photos, eval images
    by family, matcher)."""
    shots = photos(max_side=240)
    tune = {p.name for p in split_photos(shots)[0]}
    root = tmp_path_factory.mktemp("edits")
    evals: dict[str, list[tuple[str, object]]] = {"photo": [], "generated": []}
    tuning: list[tuple[str, object]] = []
    items = [("photo", p.name, p.image) for p in shots if not p.lookalike]
    items += [("generated", name, img) for name, img in generated(9, GEN_SEED)]
    for family, name, img in items:
        item = f"{family}/{name.replace('/', '_').replace('#', '_')}.jpg"
        (root / item).parent.mkdir(exist_ok=True)
        (root / item).write_bytes(encode(img, "jpg", 95))
        evals[family].append((item, img))
        if name in tune:
            tuning.append((item, img))
    matcher = OverlapMatcher.build([load_eval_set("edits", str(root))], MatchConfig(kinds=("image",)), threads=2)
    return shots, tuning, evals, matcher


def _found(matcher: OverlapMatcher, queries: list[Query]) -> list[set[str]]:
    feats = [im.features(q.data) for q in queries]
    return [{m.eval_item for m in ms} for ms in matcher.match_features([None] * len(feats), feats)]


@pytest.mark.parametrize("kind", sorted(EDITS))
def test_edited_copies_are_found(edit_set, kind):
    _, tuning, evals, matcher = edit_set
    rng = random.Random(sorted(EDITS).index(kind))
    queries = plant_edits(tuning[::2], "photo", 2, rng, kinds=[kind])
    queries += plant_edits(evals["generated"], "generated", 2, rng, kinds=[kind])
    found = _found(matcher, queries)
    table = edit_table(queries, found)
    for family, t in table.items():
        r = t["recall"][kind]
        missed = [q.target for q, f in zip(queries, found, strict=True) if q.family == family and q.target not in f]
        assert r["planted"] >= 12 and r["recall"] >= EDIT_RECALL_BAR[kind], (family, r, missed)
        # Precision: no copy is taken for another eval image (the bar is 0.99; this set has no room for one).
        assert t["false_matches"] == 0, (family, t)


def test_lookalikes_are_not_matched(edit_set):
    """Distinct pictures of the same subject: the other view of the stereo motorcycle, the fourth tile
    of each tiled photograph (bricks, grass, gravel, a galaxy field, a retina, a stained tissue), six
    more faces, and generated images of the same layout and kind; each as it is and once edited."""
    shots, _, _, matcher = edit_set
    rng = random.Random(5)
    queries = plant_lookalikes([p.image for p in shots if p.lookalike], "photo", rng)
    gens = generated(9, GEN_SEED)
    queries += plant_lookalikes([generated_lookalike(n, img.size, GEN_SEED, rng) for n, img in gens], "generated", rng)
    assert len(queries) == 2 * (sum(p.lookalike for p in shots) + len(gens)) >= 40
    found = _found(matcher, queries)
    assert [(q.family, f) for q, f in zip(queries, found, strict=True) if f] == []


def _turned(img, angle: float, fill, cut: bool):
    out = img.convert("RGB").rotate(angle, Image.Resampling.BICUBIC, expand=False, fillcolor=fill)
    if cut:
        w, h = img.size
        t = math.tan(math.radians(abs(angle)))
        dx, dy = math.ceil(h * t / 2) + 1, math.ceil(w * t / 2) + 1
        out = out.crop((dx, dy, w - dx, h - dy))
    return out


def _cropped(img, cuts):
    w, h = img.size
    return img.crop((round(w * cuts[0]), round(h * cuts[1]), w - round(w * cuts[2]), h - round(h * cuts[3])))


FINE = ("text", "gravel", "ihc", "page")
"""Print and fine textures (tuning half): their hashes move furthest under a shift or a turn."""


def test_turned_copies_of_print_and_fine_texture_are_found(edit_set):
    """Turns between the indexed angles, corners left black or white or cut away. Indexed at +/-3 degrees
    alone with replicated corners, a third of these were missed (hash distances of 12 to 18 bits)."""
    _, tuning, _, matcher = edit_set
    shots = [(item, img) for item, img in tuning if any(k in item for k in FINE)]
    assert len(shots) >= 3
    queries = [Query(encode(_turned(img, a, fill, cut), "jpg", 90), "rotate", "photo", item)
               for item, img in shots for a in (-4.9, -3.1, -1.2, 1.4, 2.9, 4.6)
               for fill, cut in ((None, False), ((255, 255, 255), False), (None, True))]
    found = _found(matcher, queries)
    missed = [(q.target, i) for i, (q, f) in enumerate(zip(queries, found, strict=True)) if q.target not in f]
    # The bar for turns (text turned by nearly 5 degrees is the hardest here, and is missed).
    assert 1 - len(missed) / len(queries) >= EDIT_RECALL_BAR["rotate"], missed
    assert all(f <= {q.target} for q, f in zip(queries, found, strict=True))


def test_crops_between_the_indexed_boxes_are_found(edit_set):
    """Cuts of up to 10% a side that fall between the indexed crop boxes. With boxes cutting 0 or 7%
    only (an offset of up to 3.5% a side), crops of fine textures were missed."""
    _, tuning, _, matcher = edit_set
    shots = [(item, img) for item, img in tuning if any(k in item for k in FINE)]
    cuts = [(0.1, 0.0, 0.0, 0.1), (0.035, 0.035, 0.035, 0.035), (0.1, 0.1, 0.1, 0.1), (0.0, 0.1, 0.035, 0.0),
            (0.1, 0.035, 0.1, 0.035), (0.06, 0.02, 0.0, 0.1)]
    queries = [Query(encode(_cropped(img, c), "jpg", 90), "crop", "photo", item) for item, img in shots for c in cuts]
    found = _found(matcher, queries)
    missed = [(q.target, i) for i, (q, f) in enumerate(zip(queries, found, strict=True)) if q.target not in f]
    assert not missed, missed
    assert all(f <= {q.target} for q, f in zip(queries, found, strict=True))


def _brick_wall(seed: int, side: int = 240) -> Image.Image:
    """Like scikit-image's brick.png tiles: dark even bricks in columns, about 9 to a side, light joints,
    seen at a slant (columns tilted and converging): a fine periodic texture with little else in it."""
    rng = np.random.default_rng(seed)
    n = side * 3 // 2  # drawn larger, then tilted and cut to `side`
    img = np.full((n, n), 190.0, np.float32)  # joints
    col = side / 9
    for x in np.arange(0.0, n, col):
        y = -rng.uniform(0, 4 * col)
        while y < n:
            tall = rng.uniform(3, 4.5) * col
            y0 = max(0, round(y) + 2)
            img[y0 : max(y0, round(y + tall) - 1), round(x) + 2 : round(x + col) - 1] = rng.normal(90, 4)
            y += tall
    img = cv2.GaussianBlur(img + rng.normal(0, 6, img.shape).astype(np.float32), (0, 0), 0.5)  # grain
    d = 0.1 * n
    slant = cv2.getPerspectiveTransform(np.float32([[0, 0], [n, 0], [n, n], [0, n]]),
                                        np.float32([[d, 0], [n - d, 0], [n, n], [0, n]]))
    turn = np.vstack([cv2.getRotationMatrix2D((n / 2, n / 2), 12, 1.0), [0, 0, 1]])
    img = cv2.warpPerspective(img, turn @ slant, (n, n), borderMode=cv2.BORDER_REFLECT)
    m = (n - side) // 2
    grey = np.clip(img[m : m + side, m : m + side], 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def test_crops_of_bricks_between_the_indexed_boxes_are_found(tmp_path):
    """Bricks cropped 2% a side away from every indexed crop box: the loose search pairs them with the
    nearest boxes, from where ECC settles a column of bricks off. Refining the box sides of the closest
    alignment finds them; the other walls (look-alikes of each other) still match nothing."""
    walls = {f"bricks/wall{s}.jpg": _brick_wall(s) for s in range(3)}  # one class folder, three items
    (tmp_path / "bricks").mkdir()
    for name, img in walls.items():
        (tmp_path / name).write_bytes(encode(img, "jpg", 95))
    matcher = OverlapMatcher.build([load_eval_set("bricks", str(tmp_path))], MatchConfig(kinds=("image",)), threads=1)
    # Each side 2% from the nearest indexed cut (0, 4 or 8%): 6 of these 12 were missed before.
    cuts = [(0.02, 0.06, 0.06, 0.06), (0.06, 0.02, 0.06, 0.06), (0.02, 0.06, 0.02, 0.02), (0.06, 0.02, 0.1, 0.02)]
    queries = [Query(encode(_cropped(img, c), "jpg", 90), "crop", "photo", name) for name, img in walls.items()
               for c in cuts]
    found = _found(matcher, queries)
    missed = [(q.target, i) for i, (q, f) in enumerate(zip(queries, found, strict=True)) if q.target not in f]
    assert not missed, missed
    assert all(f <= {q.target} for q, f in zip(queries, found, strict=True))
