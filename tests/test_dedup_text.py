"""Caption MinHash: identical to datasketch, normalisation, LSH + verification equals brute force."""

from __future__ import annotations

import random

import numpy as np
import pytest
from datasketch import LeanMinHash, MinHash, MinHashLSH

from dedup.index import TextIndex, brute_force_jaccard
from dedup.text import TextSigner, jaccard, normalize_words, shingles

pytestmark = pytest.mark.timeout(120)

WORDS = ("cat dog red blue green circle square on a the of photo picture small large over under near bright dark "
         "wooden table street car tree river city night morning two three people walking running").split()


def random_caption(rng: random.Random, n: int | None = None) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n or rng.randint(5, 14)))


def test_signatures_equal_datasketch_bulk():
    rng = random.Random(0)
    caps = [random_caption(rng) for _ in range(300)] + ["", "   ", "!!", "one", "Ünïcödé ＦＵＬＬ width"]
    for ngram in (1, 3):
        signer = TextSigner(num_perm=128, seed=1, ngram=ngram)
        sigs = signer.signatures(caps, batch_size=64)  # several batches
        ref = MinHash.bulk([[t.encode() for t in signer.shingle_sets([c])[0]] for c in caps], num_perm=128)
        assert sigs.dtype == np.uint32
        for sig, m in zip(sigs, ref, strict=True):
            assert m.scheme == "affine32"
            np.testing.assert_array_equal(sig, m.hashvalues)
    # The signatures are usable as datasketch objects next to datasketch's own sketches.
    lean = signer.lean(sigs[0])
    assert isinstance(lean, LeanMinHash) and lean.jaccard(LeanMinHash(ref[0])) == 1.0
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    lsh.insert("ours", lean)
    assert lsh.query(ref[0]) == ["ours"]


def test_normalisation_folds_case_punctuation_spacing():
    assert normalize_words("  A Photo,of   the RED-circle!! ") == ["a", "photo", "of", "the", "red", "circle"]
    a = "Two people walking a large dog near the river at night."
    for b in ("two people walking a large dog near the river at night",
              "TWO  PEOPLE walking, a large dog -- near the river; at night!!!",
              "two\tpeople\nwalking a Large Dog near the River at Night ."):
        assert shingles(a, 3) == shingles(b, 3)
    assert jaccard(shingles("", 3), shingles("", 3)) == 0.0


def _index_and_queries(seed: int = 1):
    rng = random.Random(seed)
    evals = [random_caption(rng, rng.randint(8, 14)) for _ in range(150)]
    queries: list[str] = []
    for i, e in enumerate(evals[:60]):
        words = e.split()
        if i % 3 == 0:
            queries.append(e.upper().replace(" ", ",  ") + "!")  # same words: Jaccard 1
        elif i % 3 == 1:
            words[-1] = "zebra"  # one word changed at the end: high but < 1
            queries.append(" ".join(words))
        else:
            words[len(words) // 2] = "zebra"  # changed in the middle: lower
            queries.append(" ".join(words))
    queries += [random_caption(rng) for _ in range(400)]  # unrelated
    return evals, queries


@pytest.mark.parametrize("threshold", [0.5, 0.8])
def test_lsh_with_verification_equals_brute_force(threshold):
    evals, queries = _index_and_queries()
    signer = TextSigner(ngram=3)
    index = TextIndex(signer, evals, list(range(len(evals))), threshold)
    sh = signer.shingle_sets(queries)
    got = index.search(sh, signer.signatures_from_shingles(sh))
    want = brute_force_jaccard(sh, index.shingles, list(range(len(evals))), threshold)
    assert got == want
    # The case/punctuation variants are found with Jaccard 1; unrelated captions never.
    for i in range(0, 60, 3):
        assert got[(i, i)] == 1.0
    assert not [k for k in got if k[0] >= 60]
