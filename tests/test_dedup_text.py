"""Caption MinHash: equal to datasketch with our shingle hash, unbiased estimates, normalisation,
LSH + verification equals brute force."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
from datasketch import LeanMinHash, MinHash, MinHashLSH

from dedup.index import TextIndex, brute_force_jaccard
from dedup.text import TextSigner, jaccard, normalize_words, shingle_hash, shingles

pytestmark = pytest.mark.timeout(120)

WORDS = ("cat dog red blue green circle square on a the of photo picture small large over under near bright dark "
         "wooden table street car tree river city night morning two three people walking running").split()
ODD = ["Ünïcödé", "ＦＵＬＬ", "naïve", "CAFÉ", "Straße", "ΣΑΣ", "x_y", "3.5", "ﬁne", "Ꭰ", "日本語", "e\u0301", "\ud800"]


def random_caption(rng: random.Random, n: int | None = None) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n or rng.randint(5, 14)))


def messy_caption(rng: random.Random) -> str:
    """Mixed case, Unicode that NFKC/casefold change, punctuation, tabs, newlines."""
    words = [rng.choice(WORDS + ODD) for _ in range(rng.randint(0, 16))]
    return "".join((w.upper() if rng.random() < 0.2 else w) + rng.choice([" ", ", ", "!", " -- ", "\t", "\n", "'"])
                   for w in words)


@pytest.mark.parametrize("ngram", [1, 3])
def test_signatures_equal_datasketch_with_our_shingle_hash(ngram):
    rng = random.Random(ngram)
    caps = ([random_caption(rng) for _ in range(200)] + [messy_caption(rng) for _ in range(200)]
            + ["", "   ", "!!", "one", "a b", "Ünïcödé ＦＵＬＬ width"])
    signer = TextSigner(num_perm=128, seed=1, ngram=ngram)
    sets = signer.shingle_sets(caps)
    sigs = signer.signatures(caps, batch_size=64)  # several batches
    assert sigs.dtype == np.uint32 and sigs.shape == (len(caps), 128)
    # Raw captions and ready-made shingle sets give the same signatures ...
    np.testing.assert_array_equal(sigs, signer.signatures_from_shingles(sets, batch_size=50))
    np.testing.assert_array_equal(sigs, signer.signatures(caps, batch_chars=40))
    # ... equal to datasketch's own affine32 MinHash with our shingle hash: the
    # vectorised words, n-grams and permutations change nothing but speed.
    ref = MinHash.bulk([[t.encode() for t in s] for s in sets], num_perm=128, seed=1, hashfunc=shingle_hash)
    for sig, m in zip(sigs, ref, strict=True):
        assert m.scheme == "affine32"
        np.testing.assert_array_equal(sig, m.hashvalues)
    # The signatures are usable as datasketch objects next to datasketch's own sketches.
    lean = signer.lean(sigs[0])
    assert isinstance(lean, LeanMinHash) and lean.jaccard(LeanMinHash(ref[0])) == 1.0
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    lsh.insert("ours", lean)
    assert lsh.query(ref[0]) == ["ours"]
    # A pickled signer (shipped to workers with the index) signs the same.
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(signer)).signatures(caps[:50]), sigs[:50])


def test_empty_and_bad_input():
    signer = TextSigner()
    assert signer.signatures([]).shape == (0, 128)
    sigs = signer.signatures(["", " ,; ", "\n"])
    assert (sigs == np.uint32(0xFFFFFFFF)).all()  # datasketch's empty MinHash
    with pytest.raises(ValueError, match="shingle_sets"):
        signer.signatures_from_shingles([frozenset({"four words in here"})])


def test_long_caption_in_parts():
    """A caption with more shingles than one block is permuted in parts; same result."""
    rng = random.Random(5)
    caps = [random_caption(rng, 3000), random_caption(rng, 40), random_caption(rng, 3000)]
    small = TextSigner(block=64).signatures(caps)
    np.testing.assert_array_equal(small, TextSigner().signatures(caps))
    ref = MinHash.bulk([[t.encode() for t in s] for s in TextSigner().shingle_sets(caps)], hashfunc=shingle_hash)
    np.testing.assert_array_equal(small, np.stack([m.hashvalues for m in ref]))


def test_jaccard_estimates_unbiased():
    """MinHash agreement estimates exact Jaccard without bias, as well as datasketch's sha1 sketches."""
    rng = random.Random(7)
    vocab = [f"v{i}" for i in range(5000)]
    a_caps, b_caps = [], []
    for _ in range(1500):
        words = [rng.choice(vocab) for _ in range(rng.randint(10, 40))]
        other = list(words)
        for _ in range(rng.randint(0, len(words) // 2)):  # from identical to little in common
            other[rng.randrange(len(other))] = rng.choice(vocab)
        a_caps.append(" ".join(words))
        b_caps.append(" ".join(other))
    signer = TextSigner(num_perm=128, ngram=3)
    sa, sb = signer.signatures(a_caps), signer.signatures(b_caps)
    exact = np.array([jaccard(x, y) for x, y in zip(signer.shingle_sets(a_caps), signer.shingle_sets(b_caps),
                                                     strict=True)])
    est = (sa == sb).mean(axis=1)
    assert exact.min() < 0.3 and exact.max() == 1.0 and 0.3 < exact.mean() < 0.8  # a spread of similarities
    err = est - exact
    assert abs(err.mean()) < 0.01  # unbiased (the mean of 1500 errors has sd ~0.001)
    assert np.abs(err).mean() < 0.05  # and close: sd of one estimate is <= 0.5 / sqrt(128) = 0.044
    # Same accuracy as datasketch's default sha1-based sketches on the same pairs.
    ref_a = MinHash.bulk([[t.encode() for t in s] for s in signer.shingle_sets(a_caps)])
    ref_b = MinHash.bulk([[t.encode() for t in s] for s in signer.shingle_sets(b_caps)])
    ds_err = np.array([x.jaccard(y) for x, y in zip(ref_a, ref_b, strict=True)]) - exact
    assert np.abs(err).mean() < np.abs(ds_err).mean() + 0.01


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
