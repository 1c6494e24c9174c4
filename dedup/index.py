"""Indexes over an evaluation set: banded Hamming lookup for image hashes, MinHashLSH for captions.

Both are candidate generators with a known guarantee, followed by an exact check:

- `BandedIndex` splits each 64-bit hash into m contiguous chunks (m = 4 for
  d >= 3, d + 1 below). Two hashes within d bits differ in at most d bits, so
  (pigeonhole) on at least one chunk they differ in at most floor(d / m): every
  chunk is looked up with all values that close to the query's (multi-index
  hashing, Norouzi et al. 2012), which finds every pair within d with no false
  negatives. Candidates are then filtered by their true distance. With 16-bit
  chunks and d = 10, a query reads about 4 x 137 / 65,536 = 0.8% of the index
  (d + 1 = 11 exact-match chunks of 6 bits read 17%).
- `TextIndex` is datasketch's MinHashLSH over LeanMinHash signatures; LSH has
  false negatives and false positives near the threshold, so every candidate
  is verified by exact Jaccard on the shingle sets (the maintainers' advice,
  datasketch #105, #140).

Everything here pickles (numpy arrays, dicts), so the index is built once and
shipped to workers with one `ray.put`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from datasketch import MinHashLSH

from dedup.image import HASH_BITS, hamming
from dedup.text import TextSigner, jaccard


def n_chunks(max_distance: int) -> int:
    return min(max_distance + 1, 4)


def chunk_bounds(max_distance: int, bits: int = HASH_BITS) -> list[tuple[int, int]]:
    """(shift, width) of the `n_chunks` chunks covering `bits` bits, widths differing by at most one."""
    if not 0 <= max_distance < bits:
        raise ValueError(f"image_max_distance must be < {bits}, got {max_distance}")
    n = n_chunks(max_distance)
    widths = [bits // n + (1 if i < bits % n else 0) for i in range(n)]
    bounds, shift = [], bits
    for w in widths:
        shift -= w
        bounds.append((shift, w))
    return bounds


def _probe_masks(width: int, radius: int) -> np.ndarray:
    """uint64: every value of `width` bits with at most `radius` bits set."""
    from itertools import combinations

    masks = [0]
    for r in range(1, radius + 1):
        masks += [sum(1 << b for b in c) for c in combinations(range(width), r)]
    return np.array(masks, dtype=np.uint64)


class BandedIndex:
    """Exact "all hashes within d bits" lookup over uint64 hashes, each owned by an item."""

    def __init__(self, hashes: np.ndarray, owners: np.ndarray, max_distance: int):
        self.hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
        self.owners = np.ascontiguousarray(owners, dtype=np.int64)
        self.max_distance = max_distance
        self.bounds = chunk_bounds(max_distance)
        self.radius = max_distance // len(self.bounds)
        # Per chunk: the chunk values sorted, and the hash row each sorted value came from.
        self._sorted: list[tuple[np.ndarray, np.ndarray]] = []
        for shift, width in self.bounds:
            vals = self._chunk(self.hashes, shift, width)
            order = np.argsort(vals, kind="stable")
            self._sorted.append((vals[order], order))

    @staticmethod
    def _chunk(h: np.ndarray, shift: int, width: int) -> np.ndarray:
        return (h >> np.uint64(shift)) & np.uint64((1 << width) - 1)

    def search(self, queries: np.ndarray, block: int = 1024) -> dict[tuple[int, int], int]:
        """{(query index, owner item): min distance} over all hash rows within max_distance.

        Per chunk, the rows whose chunk value is within `radius` bits of the
        query's are read off the sorted array and their true distance computed
        at once; only pairs within max_distance survive. Queries go in blocks to
        bound memory.
        """
        queries = np.asarray(queries, dtype=np.uint64)
        out: dict[tuple[int, int], int] = {}
        for b0 in range(0, len(queries), block):
            qb = queries[b0 : b0 + block]
            qs, owners, dists = [], [], []
            for (shift, width), (vals, order) in zip(self.bounds, self._sorted, strict=True):
                probes = (self._chunk(qb, shift, width)[:, None] ^ _masks(width, self.radius)[None, :]).ravel()
                lo = np.searchsorted(vals, probes, "left")
                counts = np.searchsorted(vals, probes, "right") - lo
                total = int(counts.sum())
                if not total:
                    continue
                # Expand each probe's [lo, hi) run without a Python loop.
                q_idx = np.repeat(np.arange(len(probes)) // len(_masks(width, self.radius)), counts)
                offs = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
                rows = order[np.repeat(lo, counts) + offs]
                d = hamming(qb[q_idx], self.hashes[rows])
                keep = d <= self.max_distance
                qs.append(q_idx[keep] + b0)
                owners.append(self.owners[rows[keep]])
                dists.append(d[keep])
            if not qs:
                continue
            for qi, owner, dist in zip(np.concatenate(qs).tolist(), np.concatenate(owners).tolist(),
                                       np.concatenate(dists).tolist(), strict=True):
                key = (qi, owner)
                if dist < out.get(key, HASH_BITS + 1):
                    out[key] = dist
        return out


_MASKS: dict[tuple[int, int], np.ndarray] = {}


def _masks(width: int, radius: int) -> np.ndarray:
    key = (width, radius)
    if key not in _MASKS:
        _MASKS[key] = _probe_masks(width, radius)
    return _MASKS[key]


def lsh_params(threshold: float, num_perm: int, recall: float = 0.999) -> tuple[int, int]:
    """(bands, rows) with P(candidate | Jaccard = threshold) >= recall, as selective as that allows.

    datasketch's own choice balances false positives against false negatives:
    at threshold 0.8 and 128 permutations it picks 9 x 13, which finds a pair
    at Jaccard exactly 0.8 only 40% of the time. For an audit a miss is the
    costly error and a false candidate only costs one exact Jaccard, so we
    take the most rows per band that still keep recall at the threshold.
    """
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= recall:
            best = (bands, rows)
    return best


class TextIndex:
    """Eval captions in a MinHashLSH; `search` returns only exactly-verified matches."""

    def __init__(self, signer: TextSigner, captions: Sequence[str], owners: Sequence[int], threshold: float):
        self.signer, self.threshold = signer, threshold
        self.shingles = signer.shingle_sets(captions)
        self.owners = np.asarray(owners, dtype=np.int64)
        self.lsh = MinHashLSH(num_perm=signer.num_perm, params=lsh_params(threshold, signer.num_perm))
        sigs = signer.signatures(captions)
        with self.lsh.insertion_session() as session:
            for i, sig in enumerate(sigs):
                if self.shingles[i]:  # an empty caption matches nothing; keep it out of the buckets
                    session.insert(i, signer.lean(sig), check_duplication=False)

    def __len__(self) -> int:
        return len(self.shingles)

    def search(self, shingle_sets: Sequence[frozenset[str]], signatures: np.ndarray) -> dict[tuple[int, int], float]:
        """{(query index, owner item): best Jaccard} for queries at or above the threshold."""
        out: dict[tuple[int, int], float] = {}
        for qi, (sh, sig) in enumerate(zip(shingle_sets, signatures, strict=True)):
            if not sh:
                continue
            for cand in self.lsh.query(self.signer.lean(sig)):
                j = jaccard(sh, self.shingles[cand])
                if j >= self.threshold:
                    key = (qi, int(self.owners[cand]))
                    out[key] = max(j, out.get(key, 0.0))
        return out


def brute_force_hamming(queries: np.ndarray, hashes: np.ndarray, owners: np.ndarray,
                        max_distance: int) -> dict[tuple[int, int], int]:
    """All pairs, for tests and the benchmark: what `BandedIndex.search` must return."""
    d = hamming(np.asarray(queries, np.uint64)[:, None], np.asarray(hashes, np.uint64)[None, :])
    out: dict[tuple[int, int], int] = {}
    for qi, row in zip(*np.nonzero(d <= max_distance), strict=True):
        key = (int(qi), int(owners[row]))
        out[key] = min(int(d[qi, row]), out.get(key, HASH_BITS + 1))
    return out


def brute_force_jaccard(queries: Sequence[frozenset[str]], targets: Sequence[frozenset[str]], owners: Sequence[int],
                        threshold: float) -> dict[tuple[int, int], float]:
    """All pairs by exact Jaccard: what `TextIndex.search` should return (LSH may miss a few near the threshold)."""
    out: dict[tuple[int, int], float] = {}
    for qi, q in enumerate(queries):
        for ti, t in enumerate(targets):
            j = jaccard(q, t)
            if j >= threshold:
                key = (qi, int(owners[ti]))
                out[key] = max(j, out.get(key, 0.0))
    return out
