"""Caption MinHash signatures, computed for a whole batch of captions at once with numpy.

datasketch's `MinHash.update` / `MinHash.bulk` make Python calls per token and
hash every shingle with sha1 (about 50k captions/s at 128 permutations). Here
a batch of captions is joined into one string and turned into one array of
code points; words (runs of `\\w` characters), word hashes, word n-gram
shingle hashes and the 128 permutation minima are all numpy array operations
over the whole batch. No Python code runs per word or per shingle.

The shingles are exactly those of `shingles()` (the sets that exact Jaccard
verification uses); only the hash of a shingle differs from datasketch's
default: `shingle_hash()` instead of sha1. The permutations are datasketch's
own "affine32" ones (fmix32, then a_k * h + b_k mod 2^32, with the a, b of
`MinHash(num_perm, seed)`), so a signature equals
`MinHash(num_perm, seed, hashfunc=shingle_hash)` value for value (the tests
check this). It is a datasketch affine32 MinHash, usable as
`LeanMinHash(..., scheme="affine32")` in a `MinHashLSH`, and estimates Jaccard
as well as datasketch's: affine32 is not provably min-wise independent, so the
tests measure it (no bias over 1500 pairs, mean error as datasketch's own).
It does not equal a sketch made with datasketch's default sha1 hash function;
eval and training captions must both be signed by a `TextSigner`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import numpy as np
from datasketch import LeanMinHash, MinHash
from datasketch.minhash import _fmix

SCHEME = "affine32"
_EMPTY = np.uint32(0xFFFFFFFF)  # datasketch's value for a MinHash that saw nothing
_WORD_RE = re.compile(r"\w+")
_WORD_CHAR_RE = re.compile(r"\w")
_MASK64 = (1 << 64) - 1
# Word hash: a polynomial over code points mod 2^64 (odd base, so it has an
# inverse and any substring's hash comes from two prefix sums), then fmix64.
_BASE = 0x9E3779B97F4A7C15
_BASE_INV = pow(_BASE, -1, 1 << 64)
_SHINGLE_START = 0x243F6A8885A308D3  # the state a shingle hash starts from
_ASCII_WORD = np.array([bool(_WORD_CHAR_RE.match(chr(c))) for c in range(128)])
_ASCII_WORD_BYTES = bytes(_ASCII_WORD.tolist() + [False] * 128)  # bytes.translate table: 1 for \w


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


def _fmix64_int(x: int) -> int:
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & _MASK64
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & _MASK64
    return x ^ (x >> 33)


def shingle_hash(shingle: bytes | str) -> int:
    """32-bit hash of one shingle (normalised words joined by single spaces).

    The scalar definition of what `TextSigner` computes in bulk; pass it as
    `MinHash(hashfunc=shingle_hash)` to get datasketch sketches that compare
    with `TextSigner` signatures.
    """
    if isinstance(shingle, bytes):
        shingle = shingle.decode("utf-8")
    h = _SHINGLE_START
    for word in shingle.split(" "):
        w = sum(ord(ch) * pow(_BASE, i, 1 << 64) for i, ch in enumerate(word)) & _MASK64
        h = _fmix64_int(h ^ _fmix64_int(w))
    return h >> 32


def _powers(base: int, n: int) -> np.ndarray:
    """base**0 .. base**(n-1) mod 2^64 (uint64 products wrap around)."""
    out = np.full(n, base, dtype=np.uint64)
    out[0] = 1
    return np.multiply.accumulate(out)


def _length_bucket(n: np.ndarray) -> np.ndarray:
    """Shingle counts rounded up so that there are few distinct ones (exact up to 16,
    then at most 1/8 more): each bucket is one dense (length x captions) block."""
    step = np.maximum(1, 1 << np.maximum(0, np.floor(np.log2(np.maximum(n, 1))).astype(np.int64) - 3))
    return -(-n // step) * step


class TextSigner:
    """MinHash signatures for batches of captions (uint32, shape (n, num_perm)).

    `signatures(captions)` and `signatures_from_shingles(shingle_sets(captions))`
    are equal, and equal `MinHash(num_perm, seed, hashfunc=shingle_hash)` over
    each caption's shingles; the test suite checks both.
    """

    def __init__(self, num_perm: int = 128, seed: int = 1, ngram: int = 3, block: int = 1280):
        if num_perm < 2:
            raise ValueError(f"num_perm must be >= 2, got {num_perm}")
        if ngram < 1:
            raise ValueError(f"ngram must be >= 1, got {ngram}")
        self.num_perm, self.seed, self.ngram = num_perm, seed, ngram
        a, b = MinHash(num_perm=num_perm, seed=seed, scheme=SCHEME).permutations
        self._a = np.asarray(a, dtype=np.uint32)
        self._b = np.asarray(b, dtype=np.uint32)
        self._block = block  # shingles permuted at once: (block, num_perm) uint32, ~0.7 MB at 128
        self._pow = self._pow_inv = np.ones(1, dtype=np.uint64)

    def __getstate__(self) -> dict:
        # The powers are a cache (MBs); a pickled signer (shipped with the index) rebuilds them.
        return {**self.__dict__, "_pow": np.ones(1, dtype=np.uint64), "_pow_inv": np.ones(1, dtype=np.uint64)}

    def shingle_sets(self, captions: Sequence[str]) -> list[frozenset[str]]:
        """The exact shingle sets (for Jaccard verification); Python, per caption."""
        return [shingles(c, self.ngram) for c in captions]

    def signatures(self, captions: Sequence[str], batch_size: int = 4096, batch_chars: int = 1 << 21) -> np.ndarray:
        """Signatures of raw captions, in batches of at most `batch_size` captions and
        (unless one caption is longer) `batch_chars` characters, which bound the
        temporaries to a few tens of MB."""
        ends = np.cumsum(np.fromiter(map(len, captions), dtype=np.int64, count=len(captions)) + 1)
        parts, i = [], 0
        while i < len(captions):
            j = int(np.searchsorted(ends, (ends[i - 1] if i else 0) + batch_chars, "right"))
            j = min(max(j, i + 1), i + batch_size)
            parts.append(self._sign(self._shingle_hashes(captions[i:j], normalised=False)))
            i = j
        return np.concatenate(parts) if parts else np.empty((0, self.num_perm), dtype=np.uint32)

    def signatures_from_shingles(self, sets: Sequence[frozenset[str]], batch_size: int = 4096) -> np.ndarray:
        """Signatures of shingle sets made by `shingle_sets` (or empty, to sign nothing).

        Each shingle is at most `ngram` words, so it is signed as a one-shingle
        "caption"; the shingle hashes are then regrouped by set.
        """
        out = np.full((len(sets), self.num_perm), _EMPTY, dtype=np.uint32)
        for i in range(0, len(sets), batch_size):
            part = sets[i : i + batch_size]
            counts = np.fromiter(map(len, part), dtype=np.int64, count=len(part))
            flat = [s for x in part for s in x]
            hashes, per_shingle = self._shingle_hashes(flat, normalised=True)
            if (per_shingle != 1).any():
                bad = flat[int(np.flatnonzero(per_shingle != 1)[0])]
                raise ValueError(f"not a shingle of {self.ngram} or fewer normalised words: {bad!r}; "
                                 "make shingle sets with TextSigner.shingle_sets")
            out[i : i + len(part)] = self._sign((hashes, counts))
        return out

    def lean(self, signature: np.ndarray) -> LeanMinHash:
        """Wrap one signature for datasketch (MinHashLSH, jaccard estimates)."""
        return LeanMinHash(seed=self.seed, hashvalues=signature, scheme=SCHEME)

    def _code_points(self, texts: Sequence[str], normalised: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All texts, normalised, as one array of code points (uint8 or uint32) with '\\n'
        before, between and after them; which of them are word characters (`\\w`);
        where each text starts."""
        joined = "\n".join(("", *texts, ""))
        if joined.isascii():
            raw = joined.encode("ascii")
            code = np.frombuffer(raw if normalised else raw.lower(), dtype=np.uint8)
            is_word = np.frombuffer(raw.translate(_ASCII_WORD_BYTES), dtype=bool)  # read-only is fine
        else:
            if not normalised:
                # NFKC + casefold where they can change anything; ASCII upper case
                # is folded below in numpy (no NFKC + casefold output has any).
                texts = [t if t.isascii() else unicodedata.normalize("NFKC", t).casefold() for t in texts]
                joined = "\n".join(("", *texts, ""))
            cp = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            code = cp.copy()
            if not normalised:
                code[(cp >= 65) & (cp <= 90)] += np.uint32(32)
            high = cp > 127
            is_word = _ASCII_WORD[np.where(high, 0, cp)]
            chars = np.unique(cp[high])
            word_chars = np.array([bool(_WORD_CHAR_RE.match(chr(c))) for c in chars.tolist()], dtype=bool)
            is_word[high] = word_chars[np.searchsorted(chars, cp[high])]
        lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        starts = np.cumsum(lengths + 1) - lengths  # +1: the leading '\n'
        return code, is_word, starts

    def _shingle_hashes(self, texts: Sequence[str], normalised: bool) -> tuple[np.ndarray, np.ndarray]:
        """(32-bit hash of every shingle, shingles per text), shingles grouped by text.

        The same shingles as `shingles()`, hashed as `shingle_hash()`; a repeated
        n-gram is hashed twice (harmless: the minimum does not change).
        """
        code, is_word, text_starts = self._code_points(texts, normalised)
        # Words are maximal runs of word characters; the '\n's around every text
        # keep each word inside its text and make starts and ends alternate.
        edges = np.flatnonzero(is_word[1:] != is_word[:-1]) + 1
        w_start, w_end = edges[0::2], edges[1::2]
        n_chars = code.size
        if self._pow.size < n_chars:
            size = max(n_chars, 2 * self._pow.size)
            self._pow, self._pow_inv = _powers(_BASE, size), _powers(_BASE_INV, size)
        prefix = np.multiply(code, self._pow[:n_chars], dtype=np.uint64)
        np.cumsum(prefix, out=prefix)  # prefix[k] = sum of code[j] * BASE**j for j <= k
        words = _fmix((prefix[w_end - 1] - prefix[w_start - 1]) * self._pow_inv[w_start], 64)

        # Word n-grams: a text of k words has max(1, k - n + 1) shingles if k > 0.
        n = self.ngram
        first_word = np.searchsorted(w_start, text_starts)
        n_words = np.diff(first_word, append=w_start.size)
        counts = np.where(n_words > 0, np.maximum(1, n_words - n + 1), 0)
        total = int(counts.sum())
        offsets = np.cumsum(counts) - counts
        start = np.repeat(first_word, counts) + (np.arange(total) - np.repeat(offsets, counts))
        length = np.repeat(np.minimum(n, n_words), counts)
        h = np.full(total, _SHINGLE_START, dtype=np.uint64)
        for k in range(n):
            step = _fmix(h ^ words[np.minimum(start + k, words.size - 1)], 64)
            h = step if k == 0 else np.where(k < length, step, h)
        return (h >> np.uint64(32)).astype(np.uint32), counts

    def _sign(self, shingled: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """Per text, the minimum over its shingles of each affine32 permutation."""
        hashes, counts = shingled
        out = np.full((len(counts), self.num_perm), _EMPTY, dtype=np.uint32)
        mixed = _fmix(hashes, 32)
        offsets = np.cumsum(counts) - counts
        # Texts with similar shingle counts form one dense (length, texts) block,
        # short rows padded with their first shingle (a repeat leaves the minimum
        # as it is). Permuting a block gives (length, texts, num_perm), reduced
        # over length: every numpy inner loop runs along num_perm contiguous values.
        bucket = _length_bucket(counts)
        order = np.argsort(bucket, kind="stable")
        order = order[counts[order] > 0]
        buf = np.empty(self._block * self.num_perm, dtype=np.uint32)
        for group in np.split(order, np.flatnonzero(np.diff(bucket[order])) + 1):
            if not group.size:
                continue
            width = int(bucket[group[0]])
            pos = np.minimum(np.arange(width)[:, None], counts[group][None, :] - 1)
            block = mixed[offsets[group][None, :] + pos]
            # At most `self._block` shingles permuted at once: several texts, or
            # part of one long text (then the minimum is kept over the parts).
            step, rows = max(1, self._block // width), min(width, self._block)
            for c0 in range(0, group.size, step):
                m = min(step, group.size - c0)
                mins = np.full((m, self.num_perm), _EMPTY, dtype=np.uint32)
                for r0 in range(0, width, rows):
                    cols = block[r0 : r0 + rows, c0 : c0 + m, None]
                    perm = buf[: cols.size * self.num_perm].reshape(cols.shape[0], m, self.num_perm)
                    np.multiply(cols, self._a, out=perm)  # uint32 wraparound = mod 2^32
                    perm += self._b
                    np.minimum(mins, perm.min(axis=0), out=mins)
                out[group[c0 : c0 + m]] = mins
        return out
