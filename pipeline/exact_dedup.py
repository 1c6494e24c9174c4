"""Corpus-wide exact deduplication as distributed steps (DataTrove's bucketed dedup, for exact keys).

Used twice by build_corpus: duplicate URLs before any download, duplicate image bytes
(sha256) after. Three steps, none of which holds the whole corpus in one process:

1. **keys** (one task per input slice, inside another step): each key is hashed to 128
   bits; `write_keys` writes `(bucket, h1, h2, row)` sorted by bucket, one row group per
   bucket, to one file per slice.
2. **decide** (`DedupStep`, one task per bucket): reads that bucket's row groups from
   every slice's file, sorts by (hash, slice, row) and marks every key but the first as a
   duplicate; writes the duplicates' (slice, row), one row group per slice.
3. **gather** (`gather_dups`, one task per slice, inside another step): reads its slice's
   row group from every bucket's file.

"First" is the lowest (slice, row), which is the input order, so the winner does not
depend on how many buckets or tasks there are. Keys are compared by a 128-bit BLAKE2b
digest: two different keys collide with probability about n^2 / 2^129 (about 10^-21 for
10^9 keys), which we accept in exchange for not shipping whole URLs through the shuffle.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.job import Step, TaskContext
from pipeline.shards import atomic_write_bytes

KEYS_SCHEMA = pa.schema([("bucket", pa.uint32()), ("h1", pa.uint64()), ("h2", pa.uint64()), ("row", pa.int64())])
DUPS_SCHEMA = pa.schema([("slice", pa.int64()), ("row", pa.int64())])


def n_buckets(rows_estimate: int, rows_per_bucket: int = 4_000_000) -> int:
    """Buckets so that one decide task holds about `rows_per_bucket` keys (about 100 MB)."""
    return int(min(4096, max(1, -(-rows_estimate // rows_per_bucket))))


def hash_keys(values: list[str | bytes | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(h1, h2, valid) per value: the two halves of a 128-bit BLAKE2b digest; None and "" are not
    keys (an empty URL is a bad URL, not a duplicate of another)."""
    valid = np.fromiter((bool(v) for v in values), dtype=bool, count=len(values))
    blake = hashlib.blake2b
    digests = b"".join(blake(v if isinstance(v, bytes) else v.encode("utf-8", "surrogatepass"), digest_size=16).digest()
                       if v else bytes(16) for v in values)
    h = np.frombuffer(digests, dtype=np.uint64).reshape(-1, 2) if values else np.zeros((0, 2), dtype=np.uint64)
    return h[:, 0], h[:, 1], valid


def parquet_bytes(table: pa.Table, groups: list[pa.Table] | None = None, row_group_size: int | None = None) -> bytes:
    """A parquet file of `table`: one row group per entry of `groups` (empty ones left out), else row
    groups of `row_group_size` rows."""
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, table.schema) as w:
        for g in groups if groups is not None else [table]:
            if g.num_rows:
                w.write_table(g, row_group_size=row_group_size)
    return buf.getvalue()


def write_bucketed(fs: Any, path: str, table: pa.Table, buckets: int) -> None:
    """`table` (sorted by its `bucket` column) with one row group per bucket, so that a bucket's task
    reads only its own group of every slice's file."""
    bounds = np.searchsorted(table.column("bucket").to_numpy(), np.arange(buckets + 1))
    groups = [table.slice(int(lo), int(hi - lo)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    atomic_write_bytes(fs, path, parquet_bytes(table, groups))


def write_keys(fs: Any, path: str, values: list[str | bytes | None], rows: list[int] | np.ndarray,
               buckets: int) -> int:
    """Write the keys of one slice (row = position in the slice); returns how many keys."""
    h1, h2, valid = hash_keys(values)
    rows = np.asarray(rows, dtype=np.int64)
    h1, h2, rows = h1[valid], h2[valid], rows[valid]
    bucket = (h1 % np.uint64(buckets)).astype(np.uint32)
    order = np.lexsort((rows, bucket))
    table = pa.table({"bucket": bucket[order], "h1": h1[order], "h2": h2[order], "row": rows[order]},
                     schema=KEYS_SCHEMA)
    write_bucketed(fs, path, table, buckets)
    return table.num_rows


def _read_groups(fs: Any, path: str, column: str, value: int, schema: pa.Schema) -> pa.Table:
    """The row groups of `path` whose `column` statistics say they hold exactly `value`."""
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        idx = pf.schema_arrow.get_field_index(column)
        wanted = []
        for g in range(pf.metadata.num_row_groups):
            st = pf.metadata.row_group(g).column(idx).statistics
            if st is None or not st.has_min_max or st.min <= value <= st.max:
                wanted.append(g)
        if not wanted:
            return schema.empty_table()
        t = pf.read_row_groups(wanted)
    return t.filter(pc.equal(t.column(column), pa.scalar(value, t.schema.field(column).type)))


class DedupStep(Step):
    """Decide one bucket: the duplicates among all slices' keys that fall in it."""

    what = "buckets"

    def __init__(self, name: str, keys: list[str], out_dir: str, buckets: int):
        self.name, self.keys, self.out_dir, self.buckets = name, keys, out_dir, buckets

    def tasks(self) -> list[int]:
        return list(range(self.buckets))

    def run(self, ctx: TaskContext, bucket: int, shared: Any = None) -> dict[str, Any]:
        fs = ctx.rd.fs
        parts = []
        for s, path in enumerate(self.keys):
            t = _read_groups(fs, path, "bucket", bucket, KEYS_SCHEMA)
            if t.num_rows:
                parts.append(t.append_column("slice", pa.array(np.full(t.num_rows, s, dtype=np.int64))))
        if parts:
            t = pa.concat_tables(parts)
            h1, h2 = t.column("h1").to_numpy(), t.column("h2").to_numpy()
            sl, row = t.column("slice").to_numpy(), t.column("row").to_numpy()
            order = np.lexsort((row, sl, h2, h1))
            h1, h2, sl, row = h1[order], h2[order], sl[order], row[order]
            dup = np.zeros(len(order), dtype=bool)
            dup[1:] = (h1[1:] == h1[:-1]) & (h2[1:] == h2[:-1])
            sl, row = sl[dup], row[dup]
            o = np.lexsort((row, sl))
            sl, row = sl[o], row[o]
            keys = len(order)
        else:
            sl = row = np.zeros(0, dtype=np.int64)
            keys = 0
        dups = pa.table({"slice": sl, "row": row}, schema=DUPS_SCHEMA)
        bounds = np.searchsorted(sl, np.arange(len(self.keys) + 1))
        groups = [dups.slice(int(lo), int(hi - lo)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
        atomic_write_bytes(fs, f"{self.out_dir}/{bucket:05d}.parquet", parquet_bytes(dups, groups))
        return {"keys": keys, "duplicates": int(len(row))}


def gather_dups(fs: Any, out_dir: str, buckets: int, slice_index: int) -> np.ndarray:
    """Sorted rows (positions in the slice) of the slice's duplicates, from every bucket's decision."""
    rows = [_read_groups(fs, f"{out_dir}/{b:05d}.parquet", "slice", slice_index, DUPS_SCHEMA).column("row").to_numpy()
            for b in range(buckets)]
    return np.sort(np.concatenate(rows)) if rows else np.zeros(0, dtype=np.int64)
