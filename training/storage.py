"""Where a training run writes: a local folder or object storage (s3://, gs://, ...), through fsspec.

`Loc` is a small path-like handle (a filesystem and a path in it) with the few `Path`
operations the trainer uses (`/`, `name`, `with_name`, `exists`, `read_text`, `unlink`,
`rename`), so one code path serves both. A local Loc is also an `os.PathLike`; a remote
one refuses `os.fspath`, so code that only knows local files fails loudly instead of
writing into a local folder named `s3:`.

Object stores have no append and no rename, and a writer killed mid-upload must never
leave a file a reader could take for finished:

* whole files are written to a temporary key `.NAME.tmp-PID-HEX8` / `NAME.tmp-PID-HEX8`
  and moved onto the final key only when complete (a PUT or server-side copy is all or
  nothing, so readers see the old object or the new one);
* logs that a local run appends line by line (train_log.jsonl, results.jsonl, traces)
  are kept in memory and rewritten whole (`Appender.flush`), at most every SYNC_EVERY
  seconds and at every checkpoint; what a kill loses is replayed by the resume;
* TensorBoard writes into a local temporary folder whose event files are uploaded the
  same way (`TensorBoard.sync`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.rundir import resolve
from pipeline.shards import atomic_write_bytes


def _store_errors() -> tuple[type[BaseException], ...]:
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:
        return (OSError,)
    return (OSError, BotoCoreError)


STORE_ERRORS = _store_errors()
"""What a failing store raises: OSError (fsspec translates most failures), and botocore's own errors
(EndpointConnectionError, ...), which are no OSError and which s3fs lets through after its retries."""

SYNC_EVERY = 30.0
"""Seconds between uploads of the logs of a run on object storage (checkpoints always upload them)."""


def _protocol(fs: fsspec.AbstractFileSystem) -> str:
    return fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol


class Loc:
    """A file or folder on a local disk or on object storage; see the module docstring."""

    __slots__ = ("fs", "path")

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.fs, self.path = fs, path.rstrip("/") or path

    @classmethod
    def of(cls, where: str | os.PathLike | Loc, what: str = "--output") -> Loc:
        """A local path or an fsspec URL; pipeline.rundir.OutputError (exit 2) for a URL no filesystem serves."""
        if isinstance(where, Loc):
            return where
        fs, path = resolve(os.fspath(where), what)
        return cls(fs, path)

    @property
    def local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> Loc:
        return Loc(self.fs, self.path.rsplit("/", 1)[0])

    def __truediv__(self, part: str) -> Loc:
        return Loc(self.fs, f"{self.path}/{part}")

    def with_name(self, name: str) -> Loc:
        return self.parent / name

    def __str__(self) -> str:
        return self.path if self.local else f"{_protocol(self.fs)}://{self.path}"

    def __repr__(self) -> str:
        return f"Loc({str(self)!r})"

    def __fspath__(self) -> str:
        if not self.local:
            raise TypeError(f"{self}: on object storage, not a local path")
        return self.path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Loc) and (_protocol(self.fs), self.path) == (_protocol(other.fs), other.path)

    def __hash__(self) -> int:
        return hash((_protocol(self.fs), self.path))

    # -- reading ------------------------------------------------------------------------

    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def is_file(self) -> bool:
        return self.fs.isfile(self.path)

    def is_dir(self) -> bool:
        return self.fs.isdir(self.path)

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    @contextmanager
    def local_copy(self) -> Iterator[str]:
        """A local file with this file's bytes: the file itself, or a download deleted afterwards."""
        if self.local:
            yield self.path
            return
        fd, tmp = tempfile.mkstemp(prefix="clipforge-", suffix=f"-{self.name}")
        os.close(fd)
        try:
            self.fs.get_file(self.path, tmp)
            yield tmp
        finally:
            os.unlink(tmp)

    # -- writing ------------------------------------------------------------------------

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        self.fs.makedirs(self.path, exist_ok=exist_ok)

    def write_bytes(self, data: bytes) -> None:
        """Atomically (a temporary name, then the final one)."""
        atomic_write_bytes(self.fs, self.path, data)

    def put(self, local_file: str) -> None:
        """Upload a finished local file to this key: first to `.NAME.tmp-PID-HEX8`, then moved onto
        the final key, so a kill mid-upload leaves only a temporary no reader takes for finished."""
        tmp = self.with_name(f".{self.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            self.fs.put_file(local_file, tmp.path)
            self.fs.mv(tmp.path, self.path)
        except BaseException:
            try:
                if tmp.exists():
                    tmp.unlink()
            except OSError:
                pass  # the store failed: its temporary is removed by the next run's cleanup
            raise

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rename(self, target: Loc) -> Loc:
        if self.local:
            os.replace(self.path, target.path)
        else:
            self.fs.mv(self.path, target.path)
        return target


class Appender:
    """A log file that grows by lines: appended at once locally, rewritten whole on object storage."""

    def __init__(self, loc: Loc) -> None:
        self.loc = loc
        self._pending: list[str] = []
        self._content: bytes | None = None
        self._synced = time.monotonic()

    def write(self, text: str) -> None:
        if self.loc.local:
            with open(self.loc.path, "a") as f:
                f.write(text)
        else:
            self._pending.append(text)

    def flush(self, force: bool = True) -> None:
        if not self._pending or (not force and time.monotonic() - self._synced < SYNC_EVERY):
            return
        if self._content is None:  # a resumed run's earlier lines, read once
            self._content = self.loc.read_bytes() if self.loc.exists() else b""
        content = self._content + "".join(self._pending).encode()
        self.loc.write_bytes(content)
        self._content, self._pending, self._synced = content, [], time.monotonic()

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> Appender:
        return self

    def __exit__(self, *_: Any) -> None:
        self.flush()


class TensorBoard:
    """torch's SummaryWriter into OUT/tb: directly for a local folder; for object storage into a
    local temporary folder whose event files `sync` uploads (atomically, each whole)."""

    def __init__(self, loc: Loc) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.loc = loc
        self.local_dir = loc.path if loc.local else tempfile.mkdtemp(prefix="clipforge-tb-")
        self.writer = SummaryWriter(self.local_dir)
        self._synced = time.monotonic()

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        self.writer.add_scalar(*args, **kwargs)

    def flush(self) -> None:
        self.sync(force=True)

    def sync(self, force: bool = True) -> None:
        if not force and time.monotonic() - self._synced < SYNC_EVERY:
            return
        self.writer.flush()
        self._synced = time.monotonic()
        if self.loc.local:
            return
        for f in sorted(Path(self.local_dir).iterdir()):
            if f.is_file():
                (self.loc / f.name).put(str(f))

    def discard(self) -> None:
        """Close without uploading (a run refused at its start): the local staging folder removed."""
        try:
            self.writer.close()
        finally:
            if not self.loc.local:
                shutil.rmtree(self.local_dir, ignore_errors=True)

    def close(self) -> None:
        try:
            self.writer.close()
            self.sync()
        finally:
            if not self.loc.local:
                shutil.rmtree(self.local_dir, ignore_errors=True)
