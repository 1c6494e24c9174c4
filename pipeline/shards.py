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
