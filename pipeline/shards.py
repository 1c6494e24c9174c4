"""WebDataset tar shards: atomic writing, contiguous numbering, read-back checks.

Shards are plain POSIX tars written with `tarfile`, not webdataset's TarWriter,
so the bytes do not depend on the installed webdataset version and a rerun
writes byte-identical files (fixed mtime, uid, mode). Each sample's members are
contiguous and share the key before the first dot, which is what webdataset
(every version) and OpenCLIP's loader group on.

Everything is written through fsspec to a temporary name and renamed into
place, so a crash never leaves a half-written file under its final name.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec
import numpy as np
import pyarrow as pa

KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SIZES_FILE = "sizes.json"


class ShardError(RuntimeError):
    """A shard or shard folder is not what its writer promised (or is missing)."""


def shard_name(index: int) -> str:
    return f"{index:05d}.tar"


def get_fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem and the path inside it ('corpus/', 's3://b/c', ...)."""
    fs, root = fsspec.core.url_to_fs(path)
    return fs, root.rstrip("/")


def join(root: str, *parts: str) -> str:
    """Join below root, refusing any part that would escape it."""
    for part in parts:
        if part.startswith("/") or ".." in part.split("/"):
            raise ValueError(f"path part {part!r} would escape {root!r}")
    return "/".join([root.rstrip("/"), *parts])


@contextmanager
def atomic_open(fs: fsspec.AbstractFileSystem, path: str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary sibling of `path`; rename it to `path` only on success."""
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    try:
        with fs.open(tmp, mode) as f:
            yield f
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def atomic_write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    with atomic_open(fs, path, "wb") as f:
        f.write(data)


def atomic_write_json(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    atomic_write_bytes(fs, path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def compare_settings(previous: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """What differs between a recorded run (a run.json's content) and `settings`, as "key: old -> new".
    Nested settings compare key by key."""
    old = _flatten(previous)
    now = _flatten(json.loads(json.dumps(settings, default=str)))  # the types read back (tuples: lists)
    return [f"{k}: {old.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(old) | set(now))
            if old.get(k) != now.get(k)]


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0  # byte-identical reruns
    info.mode = 0o644
    info.uname = info.gname = "clipforge"
    return info


def write_tar(f: IO[bytes], samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write (key, {ext: bytes}) samples as one tar, members of a sample contiguous."""
    with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            if not KEY_RE.match(key):
                raise ValueError(f"sample key {key!r} must match {KEY_RE.pattern} (no dots, no slashes)")
            for ext, data in members.items():
                tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))


def iter_tar(f: IO[bytes], source: str = "<tar>") -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) from a tar, grouping contiguous members by key."""
    key: str | None = None
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=f, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                base = info.name.rsplit("/", 1)[-1]
                k, _, ext = base.partition(".")
                data = tar.extractfile(info).read()  # type: ignore[union-attr]
                if k != key:
                    if key is not None:
                        yield key, members
                    key, members = k, {}
                members[ext] = data
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ShardError(f"{source}: not a readable tar ({exc})") from exc
    if key is not None:
        yield key, members


def read_tar(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    with fs.open(path, "rb") as f:
        yield from iter_tar(f, path)


@dataclass
class ShardSetWriter:
    """Writes samples in order into `00000.tar, 00001.tar, ...` of exactly
    `samples_per_shard` samples each (the last may hold fewer), then `sizes.json`.

    Use as a context manager; `add` returns the shard name the sample lands in.
    """

    fs: fsspec.AbstractFileSystem
    shards_dir: str
    samples_per_shard: int
    sizes: dict[str, int] = field(default_factory=dict)
    _buffer: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        self.fs.makedirs(self.shards_dir, exist_ok=True)

    @property
    def current_shard(self) -> str:
        return shard_name(len(self.sizes))

    def add(self, key: str, members: dict[str, bytes]) -> str:
        name = self.current_shard
        self._buffer.append((key, members))
        if len(self._buffer) == self.samples_per_shard:
            self._flush()
        return name

    def _flush(self) -> None:
        if not self._buffer:
            return
        name = self.current_shard
        with atomic_open(self.fs, join(self.shards_dir, name)) as f:
            write_tar(f, self._buffer)
        self.sizes[name] = len(self._buffer)
        self._buffer = []

    def close(self) -> dict[str, int]:
        self._flush()
        atomic_write_json(self.fs, join(self.shards_dir, SIZES_FILE), self.sizes)
        return self.sizes

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()


def verify_shards(fs: fsspec.AbstractFileSystem, shards_dir: str, samples_per_shard: int | None = None) -> int:
    """Read every shard back and check it against sizes.json; return the sample count.

    Checks: sizes.json exists; shard names are 00000..N-1 with no gap; each tar
    opens and holds the promised number of samples, each with an image and txt;
    keys are unique across the set; every shard but the last is full.
    """
    sizes_path = join(shards_dir, SIZES_FILE)
    if not fs.exists(sizes_path):
        raise ShardError(f"{sizes_path}: missing")
    with fs.open(sizes_path, "rb") as f:
        sizes: dict[str, int] = json.load(f)
    expected = [shard_name(i) for i in range(len(sizes))]
    if sorted(sizes) != expected:
        raise ShardError(f"{sizes_path}: shard names {sorted(sizes)[:5]}... are not contiguous from 00000.tar")
    on_disk = sorted(p.rsplit("/", 1)[-1] for p in fs.glob(join(shards_dir, "*.tar")))
    if on_disk != expected:
        raise ShardError(f"{shards_dir}: tars on disk {on_disk[:5]}... differ from sizes.json {expected[:5]}...")
    seen: set[str] = set()
    total = 0
    for i, name in enumerate(expected):
        path = join(shards_dir, name)
        n = 0
        for key, members in read_tar(fs, path):
            if key in seen:
                raise ShardError(f"{path}: duplicate key {key}")
            if "txt" not in members or not any(e in members for e in IMAGE_EXTS):
                raise ShardError(f"{path}: sample {key} lacks an image or txt member ({sorted(members)})")
            seen.add(key)
            n += 1
        if n != sizes[name]:
            raise ShardError(f"{path}: holds {n} samples, sizes.json says {sizes[name]}")
        if samples_per_shard is not None and i < len(expected) - 1 and n != samples_per_shard:
            raise ShardError(f"{path}: holds {n} samples, every shard but the last must hold {samples_per_shard}")
        total += n
    return total


# -- writing shards in parallel (pipeline.job steps) ----------------------------------------

MANIFEST_SCHEMA = pa.schema([
    ("row", pa.int64()), ("key", pa.string()), ("url", pa.string()), ("status", pa.string()),
    ("reason", pa.string()), ("error", pa.string()), ("shard", pa.string()), ("sha256", pa.string()),
    ("source", pa.string()), ("duplicate_of", pa.string()),
])
"""The manifest of every job (build and audit): one row per input row, the same columns and status words.
`duplicate_of`: the key of the kept sample a near-duplicate was dropped for (build_corpus --dedup-within)."""
WRITTEN_STATUS = "written"


@dataclass(frozen=True)
class Source:
    """A run of samples to copy into the shards, in order: the kept ones of `records`, found in `tar`."""

    tar: str
    """The tar holding the kept samples in order (it may hold others too, which are skipped)."""
    records: str
    """Parquet of MANIFEST_SCHEMA: every row of the source in order; status "written" marks the kept ones."""
    kept: int
    manifest: str
    """Where this source's manifest goes (records with the shard of each kept sample filled in)."""


# img2dataset's per-sample fields and their types (downloader.py's schema), for NNNNN.parquet.
IMG2DATASET_TYPES = {"key": pa.string(), "url": pa.string(), "caption": pa.string(), "status": pa.string(),
                     "error_message": pa.string(), "width": pa.int32(), "height": pa.int32(),
                     "original_width": pa.int32(), "original_height": pa.int32(), "exif": pa.string(),
                     "sha256": pa.string()}


def shard_metadata(samples: list[tuple[str, dict[str, bytes]]]) -> pa.Table:
    """NNNNN.parquet beside NNNNN.tar, as img2dataset writes it: one row per sample, its json's fields
    (img2dataset's with their types, then the rest as they come)."""
    rows = []
    for key, members in samples:
        try:
            meta = json.loads(members.get("json") or b"{}")
        except (ValueError, UnicodeDecodeError):
            meta = {}
        rows.append({"key": key, **(meta if isinstance(meta, dict) else {})})
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        # A field of other types in other rows (input files that disagree): its text form, as in the json.
        mixed = {k for k in {k for r in rows for k in r}
                 if len({type(r[k]) for r in rows if r.get(k) is not None}) > 1}
        rows = [{k: (json.dumps(v) if k in mixed and not isinstance(v, str) and v is not None else v)
                 for k, v in r.items()} for r in rows]
        table = pa.Table.from_pylist(rows)
    for name, tp in IMG2DATASET_TYPES.items():
        if name in table.column_names and table.schema.field(name).type != tp:
            try:
                table = table.set_column(table.schema.get_field_index(name), name, table.column(name).cast(tp))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                pass  # someone else's json: keep its own type
    return table


def plan_shard_tasks(sources: list[Source], samples_per_shard: int,
                     shards_per_task: int) -> tuple[list[int], list[tuple[int, int, list[int], list[int]]]]:
    """The driver's only arithmetic: prefix sums of kept counts, cut into tasks of whole shards.

    Returns (prefix, specs); a spec is (first shard, end shard, sources to read, sources whose
    manifest this task writes). Source j's manifest goes to the task holding its first kept
    sample (the one holding position prefix[j]); a source with nothing kept goes with the
    next position, and to the last task at the end.
    """
    prefix = [0]
    for s in sources:
        prefix.append(prefix[-1] + s.kept)
    total = prefix[-1]
    n_shards = -(-total // samples_per_shard)
    per_task = shards_per_task * samples_per_shard
    n_tasks = max(1, -(-n_shards // shards_per_task))
    specs: list[tuple[int, int, list[int], list[int]]] = []
    j = 0
    for t in range(n_tasks):
        lo, hi = t * per_task, min(total, (t + 1) * per_task)
        first, end = t * shards_per_task, min(n_shards, (t + 1) * shards_per_task)
        reads = []
        while j < len(sources) and prefix[j + 1] <= lo:
            j += 1
        k = j
        while k < len(sources) and prefix[k] < hi:
            if sources[k].kept:
                reads.append(k)
            k += 1
        specs.append((first, end, reads, []))
    for j in range(len(sources)):
        owner = min(prefix[j] // per_task, n_tasks - 1)
        specs[owner][3].append(j)
    return prefix, specs


def write_shard_range(fs: fsspec.AbstractFileSystem, sources: list[Source], prefix: list[int], spec: tuple,
                      samples_per_shard: int, shards_dir: str, source_name: Any = None,
                      on_sample: Any = None, edit: Any = None, schema: pa.Schema = MANIFEST_SCHEMA) -> dict[str, Any]:
    """One task of the shard writer: shards [first, end) from the sources that hold them, each
    written atomically and read back; then the manifests of the sources it owns.

    `edit(source index, key, members) -> members`: what a job adds to each kept sample on its way
    (a score in its json); `schema`: the manifests' columns (MANIFEST_SCHEMA, or it with a job's own added)."""
    import pyarrow.parquet as pq

    first, end, reads, owned = spec
    lo, hi = first * samples_per_shard, min(prefix[-1], end * samples_per_shard)
    sizes: dict[str, int] = {}
    buffer: list[tuple[str, dict[str, bytes]]] = []
    shard = first

    def flush() -> None:
        nonlocal buffer, shard
        name = shard_name(shard)
        path = join(shards_dir, name)
        with atomic_open(fs, path[: -len(".tar")] + ".parquet") as f:
            pq.write_table(shard_metadata(buffer), f)
        with atomic_open(fs, path) as f:
            write_tar(f, buffer)
        keys = [k for k, _ in read_tar(fs, path)]  # check what we wrote
        if keys != [k for k, _ in buffer]:
            raise ShardError(f"{path}: read back {len(keys)} samples, wrote {len(buffer)}")
        sizes[name] = len(buffer)
        buffer, shard = [], shard + 1

    for j in reads:
        src = sources[j]
        with fs.open(src.records, "rb") as f:
            t = pq.read_table(f, columns=["key", "status"])
        kept = [k for k, st in zip(t.column("key").to_pylist(), t.column("status").to_pylist(), strict=True)
                if st == WRITTEN_STATUS]
        if len(kept) != src.kept:
            raise ShardError(f"{src.records}: {len(kept)} kept samples, the plan says {src.kept}")
        # Only the part of this source inside [lo, hi).
        start, stop = max(0, lo - prefix[j]), min(src.kept, hi - prefix[j])
        wanted = kept[start:stop]
        got = 0
        if wanted:
            want = iter(wanted)
            nxt = next(want)
            # The input may live on another store than the output (a corpus on s3, --out local).
            tar_fs, tar_path = get_fs(src.tar) if "://" in src.tar else (fs, src.tar)
            for key, members in read_tar(tar_fs, tar_path):
                if key != nxt:
                    continue
                buffer.append((key, edit(j, key, members) if edit is not None else members))
                got += 1
                if on_sample is not None:
                    on_sample()
                if len(buffer) == samples_per_shard:
                    flush()
                nxt = next(want, None)
                if nxt is None:
                    break
        if got != len(wanted):
            raise ShardError(f"{src.tar}: {got} of the {len(wanted)} kept samples found in order "
                             f"(first missing: {wanted[got] if got < len(wanted) else '?'})")
    if buffer:
        flush()
    if shard != end:
        raise ShardError(f"{shards_dir}: task wrote shards {first}..{shard - 1}, planned {first}..{end - 1}")
    counts: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for j in owned:
        src = sources[j]
        with fs.open(src.records, "rb") as f:
            t = pq.read_table(f).cast(schema)
        status = t.column("status").to_pylist()
        written = np.array([st == WRITTEN_STATUS for st in status], dtype=bool)
        pos = prefix[j] + np.cumsum(written) - 1
        shard_col = [shard_name(int(p) // samples_per_shard) if w else None
                     for p, w in zip(pos.tolist(), written.tolist(), strict=True)]
        t = t.set_column(t.schema.get_field_index("shard"), "shard", pa.array(shard_col, pa.string()))
        for st, reason in zip(status, t.column("reason").to_pylist(), strict=True):
            counts[st] = counts.get(st, 0) + 1
            if reason:
                key = f"{st}:{reason}"
                reasons[key] = reasons.get(key, 0) + 1
        with atomic_open(fs, src.manifest) as f:
            pq.write_table(t, f)
    return {"sizes": sizes, "counts": counts, "reasons": reasons, "manifests": len(owned),
            "rows": sum(sizes.values())}
