"""Issue 10 on a small set: copies planted under each everyday edit (ISC 2021 / DISC21 family) are found
on real photographs and on generated images; distinct look-alikes are not.

The edits go on the photographs the thresholds were chosen on (`split_photos`' tuning half) and on
generated images; the held-out half is measured, not asserted, by `benchmarks/dedup.py --photos
report` (which falls short on some of it: see the README).
"""

from __future__ import annotations

import random

import pytest

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
