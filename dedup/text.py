"""Caption MinHash signatures, computed for many captions at once, bit-identical to datasketch 2.0.

datasketch's `MinHash.update` / `MinHash.bulk` do one Python call per token
(about 28k captions/s at 128 permutations). Here a batch of captions is cut
into shingles, each distinct shingle in the batch is hashed once with
datasketch's own `sha1_hash32`, and the permutations and the per-caption
minimum run as numpy array operations over the whole batch. The permutation
parameters are taken from a datasketch `MinHash(num_perm, seed)` rather than
re-derived, so the values equal `MinHash(scheme="affine32")` exactly and can be
wrapped as `LeanMinHash(seed=..., hashvalues=..., scheme="affine32")` and put
into a `MinHashLSH` next to sketches made by datasketch itself.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import numpy as np
from datasketch import LeanMinHash, MinHash
from datasketch.hashfunc import sha1_hash32
from datasketch.minhash import _fmix

SCHEME = "affine32"
_EMPTY = np.uint32(0xFFFFFFFF)  # datasketch's value for a MinHash that saw nothing
_WORD_RE = re.compile(r"\w+")


def normalize_words(caption: str) -> list[str]:
    """Lower-case words with punctuation folded away: 'A  Red-Circle!' -> ['a', 'red', 'circle'].

    NFKC first so that full-width or composed characters compare equal to their
    plain forms; `\\w+` then treats every run of punctuation or space as one break.
    """
    return _WORD_RE.findall(unicodedata.normalize("NFKC", caption).casefold())


def shingles(caption: str, ngram: int) -> frozenset[str]:
    """Word n-grams of the normalised caption. A caption shorter than `ngram`
    words is one shingle (all its words), so short captions still compare;
    an empty caption has no shingles (and never matches anything)."""
    words = normalize_words(caption)
    if not words:
        return frozenset()
    if len(words) <= ngram:
        return frozenset((" ".join(words),))
    return frozenset(" ".join(words[i : i + ngram]) for i in range(len(words) - ngram + 1))


def jaccard(a: frozenset[str] | set[str], b: frozenset[str] | set[str]) -> float:
    """Exact Jaccard similarity; two empty sets are 0 (an empty caption matches nothing)."""
    if not a or not b:
        return 0.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


class TextSigner:
    """MinHash signatures for batches of captions (uint32, shape (n, num_perm)).

    `signatures(captions)` equals `[MinHash.bulk([sorted shingle bytes])...]`
    value for value; the test suite checks it against datasketch.
    """

    def __init__(self, num_perm: int = 128, seed: int = 1, ngram: int = 3, cache_size: int = 1 << 20):
        if num_perm < 2:
            raise ValueError(f"num_perm must be >= 2, got {num_perm}")
        if ngram < 1:
            raise ValueError(f"ngram must be >= 1, got {ngram}")
        self.num_perm, self.seed, self.ngram = num_perm, seed, ngram
        a, b = MinHash(num_perm=num_perm, seed=seed, scheme=SCHEME).permutations
        self._a = np.asarray(a, dtype=np.uint32)
        self._b = np.asarray(b, dtype=np.uint32)
        # Captions repeat shingles a lot ("a photo of"); sha1 per distinct shingle
        # is the only per-token Python work left, so remember recent ones.
        self._cache: dict[str, int] = {}
        self._cache_size = cache_size

    def shingle_sets(self, captions: Sequence[str]) -> list[frozenset[str]]:
        return [shingles(c, self.ngram) for c in captions]

    def _hash(self, shingle: str) -> int:
        h = self._cache.get(shingle)
        if h is None:
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            h = self._cache[shingle] = sha1_hash32(shingle.encode("utf-8"))
        return h

    def signatures_from_shingles(self, sets: Sequence[frozenset[str]]) -> np.ndarray:
        out = np.full((len(sets), self.num_perm), _EMPTY, dtype=np.uint32)
        lengths = np.fromiter((len(s) for s in sets), dtype=np.int64, count=len(sets))
        nonempty = np.flatnonzero(lengths)
        if nonempty.size == 0:
            return out
        # One flat array of token hashes for the whole batch ...
        hv = np.fromiter((self._hash(t) for i in nonempty for t in sets[i]), dtype=np.uint32,
                         count=int(lengths[nonempty].sum()))
        mixed = _fmix(hv, 32)
        ends = np.cumsum(lengths[nonempty])
        # ... permuted and min-reduced per caption, in blocks of tokens so the
        # (tokens x num_perm) temporary stays in cache-friendly sizes.
        rows_done, block = 0, 1 << 13
        phv = np.empty((block, self.num_perm), dtype=np.uint32)
        while rows_done < len(nonempty):
            stop_tok = ends[rows_done] - 1 + block  # at least one caption per block
            last = max(rows_done + 1, int(np.searchsorted(ends, stop_tok, "right")))
            t0 = 0 if rows_done == 0 else int(ends[rows_done - 1])
            t1 = int(ends[last - 1])
            buf = phv[: t1 - t0] if t1 - t0 <= block else np.empty((t1 - t0, self.num_perm), np.uint32)
            np.multiply(mixed[t0:t1, None], self._a[None, :], out=buf)  # uint32 wraparound = mod 2^32
            np.add(buf, self._b[None, :], out=buf)
            starts = np.concatenate(([0], ends[rows_done : last - 1] - t0))
            out[nonempty[rows_done:last]] = np.minimum.reduceat(buf, starts, axis=0)
            rows_done = last
        return out

    def signatures(self, captions: Sequence[str], batch_size: int = 4096) -> np.ndarray:
        """Signatures of captions; batches bound the (tokens x num_perm) temporary."""
        parts = [self.signatures_from_shingles(self.shingle_sets(captions[i : i + batch_size]))
                 for i in range(0, len(captions), batch_size)]
        return np.concatenate(parts) if parts else np.empty((0, self.num_perm), dtype=np.uint32)

    def lean(self, signature: np.ndarray) -> LeanMinHash:
        """Wrap one signature for datasketch (MinHashLSH, jaccard estimates)."""
        return LeanMinHash(seed=self.seed, hashvalues=signature, scheme=SCHEME)
