"""Indexes over an evaluation set: banded Hamming lookup for image hashes, MinHashLSH for captions.

Both are candidate generators with a known guarantee, followed by an exact check:

- `BandedIndex` splits each 64-bit hash into 4 chunks of 16 bits. Two hashes
  within d bits differ in at most d bits, so (pigeonhole) on at least one chunk
  they differ in at most floor(d / 4): every chunk is looked up with all values
  that close to the query's (multi-index hashing, Norouzi et al. 2012), which
  finds every pair within d with no false negatives. Candidates are then
  filtered by their true distance. With d = 10, a query reads about
  4 x 137 / 65,536 = 0.8% of the index. Each chunk is a bucket table (rows
  sorted by chunk value, and where each value starts: 65,537 entries), so a
  probe costs two array reads.
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
    """Always 4: 16-bit chunks keep each bucket table at 65,537 entries (fewer, wider chunks would
    need tables of 2^21 or more; below d = 3 some chunks simply have to match exactly)."""
    return 4


def chunk_bounds(max_distance: int, bits: int = HASH_BITS) -> list[tuple[int, int]]:
    """(shift, width) of the `n_chunks` chunks covering `bits` bits, widths differing by at most one."""
    if not 0 <= max_distance < bits:
        raise ValueError(f"image_max_distance must be < {bits}, got {max_distance}")
    return split_bits(n_chunks(max_distance), bits)


def split_bits(n: int, bits: int = HASH_BITS) -> list[tuple[int, int]]:
    """(shift, width) of `n` chunks covering `bits` bits from the top, widths differing by at most one."""
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

    def __init__(self, hashes: np.ndarray, owners: np.ndarray | None, max_distance: int):
        """`owners`: the item of each hash row; None when each row is its own item (the matcher's
        variant rows), which saves an array the size of the index."""
        self.hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
        self.owners = None if owners is None else np.ascontiguousarray(owners, dtype=np.int64)
        self.max_distance = max_distance
        self.bounds = chunk_bounds(max_distance)
        self.radius = max_distance // len(self.bounds)
        # Per chunk, a bucket table: the hash rows sorted by chunk value, and where each value's run
        # starts (`starts[v]` to `starts[v + 1]`): a probe is two array reads, not a binary search.
        # The hashes are kept in each table's order too, so that a probe reads them in runs.
        self._tables: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for shift, width in self.bounds:
            vals = self._chunk(self.hashes, shift, width).astype(np.int64)
            order = np.argsort(vals, kind="stable").astype(np.int32)
            starts = np.zeros((1 << width) + 1, np.int32)
            np.cumsum(np.bincount(vals, minlength=1 << width), out=starts[1:])
            self._tables.append((starts, order, self.hashes[order]))

    @staticmethod
    def _chunk(h: np.ndarray, shift: int, width: int) -> np.ndarray:
        return (h >> np.uint64(shift)) & np.uint64((1 << width) - 1)

    def search_pairs(self, queries: np.ndarray, max_distance: int | None = None, block: int = 1024
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query index, hash row, distance) of every pair within `max_distance` (at most the index's),
        each pair once, as arrays.

        Per chunk, the rows whose chunk value is within `radius` bits of the query's are read off the
        bucket table and their true distance computed at once. Queries go in blocks to bound memory.
        """
        limit = self.max_distance if max_distance is None else min(max_distance, self.max_distance)
        queries = np.asarray(queries, dtype=np.uint64)
        out_q, out_r, out_d = [], [], []
        for b0 in range(0, len(queries), block):
            qb = queries[b0 : b0 + block]
            qs, rows_all, ds = [], [], []
            for (shift, width), (starts, order, ordered) in zip(self.bounds, self._tables, strict=True):
                masks = _masks(width, self.radius)
                probes = (self._chunk(qb, shift, width)[:, None] ^ masks[None, :]).ravel().astype(np.int64)
                lo = starts[probes]
                counts = starts[probes + 1] - lo
                ends = np.cumsum(counts)
                total = int(ends[-1]) if len(ends) else 0
                if not total:
                    continue
                # Expand each probe's run [lo, lo + count) of the table without a Python loop: hit j of
                # the flattened runs sits at j + (its run's lo - the run's first j).
                pos = np.arange(total) + np.repeat(lo - (ends - counts), counts)
                d = np.bitwise_count(ordered[pos] ^ np.repeat(np.repeat(qb, len(masks)), counts))
                keep = np.flatnonzero(d <= limit)
                qs.append(np.searchsorted(ends, keep, side="right") // len(masks))
                rows_all.append(order[pos[keep]])
                ds.append(d[keep])
            if not qs:
                continue
            q_idx = np.concatenate(qs).astype(np.int64)
            rows = np.concatenate(rows_all).astype(np.int64)
            d = np.concatenate(ds).astype(np.int64)
            # A pair close on several chunks was read several times.
            _, first = np.unique(q_idx * len(self.hashes) + rows, return_index=True)
            out_q.append(q_idx[first] + b0)
            out_r.append(rows[first])
            out_d.append(d[first])
        if not out_q:
            empty = np.zeros(0, np.int64)
            return empty, empty, empty
        return np.concatenate(out_q), np.concatenate(out_r), np.concatenate(out_d)

    def search(self, queries: np.ndarray, block: int = 1024) -> dict[tuple[int, int], int]:
        """{(query index, owner item): min distance} over all hash rows within max_distance."""
        q_idx, rows, dists = self.search_pairs(queries, block=block)
        out: dict[tuple[int, int], int] = {}
        owners = rows if self.owners is None else self.owners[rows]
        for qi, owner, dist in zip(q_idx.tolist(), owners.tolist(), dists.tolist(), strict=True):
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
