"""The one owner of a job's output folder: who may write there, what it may delete, who holds it.

Every job (build_corpus, audit_overlap, train) opens its `--out` through `RunDir`:

* **Ours or untouched.** A job writes into a folder only if it is absent, empty,
  or holds this job's own `run.json` (`{"job": ..., ...}`); anything else (someone's
  files, another job's output, a regular file, a garbage run.json) is refused with
  one line before anything is written. `--out` names are normalised first, so
  `a/x/../b` never creates `a/x`; a URL whose scheme has no filesystem is an error,
  never a local folder named `s3:`.
* **Never delete what we did not write.** Cleanup removes only names that match the
  patterns the job declares it writes (`00042.tar`, `00042.parquet`, our own
  temporaries `NAME.tmp-PID-HEX8`), in sub-folders that are real folders inside
  the output: a symlink inside `--out` is refused, never followed. A folder is
  removed recursively only if this job created it (`remove_own_tree`).
* **One run at a time.** `lock()` takes `OUT/.clipforge.lock` (host, pid, process
  start time, a token; created atomically, refreshed while alive). A second run is
  refused with who holds it; the lock of a dead process on this host, or one whose
  holder stopped refreshing it for longer than the lease, is taken over with a
  warning. On object storage there is no exclusive create: the lock is a lease
  object written, then read back after a pause to see who won.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import ConfigError

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
LOCK_FILE = ".clipforge.lock"
TMP_RE = re.compile(r"^.+\.tmp-\d+-[0-9a-f]{8}$")
"""Temporaries our atomic writes make (pipeline.shards.atomic_open): NAME.tmp-PID-HEX8."""
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


class OutputError(ConfigError):
    """The output folder is not ours to write, or is held by another run (exit 2)."""


class SettingsChanged(OutputError):
    """The output folder holds a run of this job made with other settings or other input."""


def resolve(url: str, what: str = "--out", output: bool = False) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, normalised path) for a local path or an fsspec URL; a URL no filesystem
    serves, or a malformed one, is an OutputError (never a local folder named after it).
    `output`: a job's output folder, where chained URLs (simplecache::s3://...) are refused: a cache
    or dir:: layer over a folder we write would hide where the files really go, and with it the
    checks that keep an output out of its inputs."""
    if not url or not url.strip():
        raise OutputError(f"{what}: empty path")
    m = _SCHEME_RE.match(url)
    if m and len(m.group(1)) > 1:  # one letter would be a Windows drive
        scheme = m.group(1).lower()
        if scheme != "file" and "://" not in url:
            raise OutputError(f"{what} {url!r}: malformed URL (expected {scheme}://BUCKET/PATH)")
        if output and "::" in url:
            raise OutputError(f"{what} {url!r}: chained URLs are not supported for an output; give the store's "
                              "own URL (s3://BUCKET/PATH)")
        url = scheme + url[len(scheme) :]  # S3://b/x is s3://b/x (fsspec knows lower-case protocols only)
        try:
            fsspec.get_filesystem_class(scheme)
        except (ValueError, ImportError) as exc:
            raise OutputError(f"{what} {url!r}: no filesystem for {scheme}:// here "
                              f"({str(exc).splitlines()[0][:120]})") from None
        rest = url.split("://", 1)[1]
        if ".." in rest.split("/"):
            raise OutputError(f"{what} {url!r}: '..' is not allowed in a URL")
        # No listings cache: tasks in other processes write here, and a cached listing then
        # answers "no such file" for what they wrote (s3fs consults the parent's listing before
        # asking the store). Every listing we take is meant fresh; a read is one HEAD more.
        fs, path = fsspec.core.url_to_fs(url, use_listings_cache=False)
        return fs, path.rstrip("/")
    # A local path: normalised before any folder is made, so a/x/../b never creates a/x.
    path = os.path.abspath(os.path.normpath(os.path.expanduser(url)))
    return LocalFileSystem(), path


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


@dataclass
class RunDir:
    """A job's output folder; see the module docstring."""

    url: str
    job: str
    """Name recorded in run.json: build_corpus, audit_overlap, train."""
    fs: fsspec.AbstractFileSystem = field(init=False)
    root: str = field(init=False)
    _lock: RunLock | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.fs, self.root = resolve(self.url, output=True)

    # -- paths ----------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        """A path below the root; a part that would leave the folder is a bug, not input."""
        for part in parts:
            if part.startswith("/") or ".." in part.split("/"):
                raise ValueError(f"path part {part!r} would escape {self.root!r}")
        return "/".join([self.root, *parts])

    def display(self, *parts: str) -> str:
        """What a message shows: the URL as given for object storage, the path for local folders."""
        p = self.path(*parts)
        if _is_local(self.fs):
            return p
        proto = self.fs.protocol[0] if isinstance(self.fs.protocol, (tuple, list)) else self.fs.protocol
        return f"{proto}://{p}"

    # -- ownership ------------------------------------------------------------------

    def read_run(self) -> dict[str, Any] | None:
        """OUT/run.json as a dict, None if absent; OutputError if it is not a JSON object."""
        path = self.path(RUN_FILE)
        try:
            with self.fs.open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            raise OutputError(f"{self.display(RUN_FILE)}: is a folder, not clipforge's run record; "
                              "use another --out") from None
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            obj = None
        if not isinstance(obj, dict):
            raise OutputError(f"{self.display(RUN_FILE)}: not a clipforge run record (not a JSON object); "
                              "this folder holds something else: use another --out")
        return obj

    def check_ours(self, legacy: Iterable[str] = ()) -> dict[str, Any] | None:
        """Refuse unless the folder is absent, empty (but for our lock), or holds this job's run.json.

        Returns the recorded run (None for a new or empty folder). `legacy`: keys whose
        presence in a run.json without a "job" entry marks an output of this job written
        by clipforge 0.1. Reads only; writes nothing.
        """
        if self.fs.exists(self.root) and not self.fs.isdir(self.root):
            raise OutputError(f"{self.display()}: --out is a file, not a folder; use another --out")
        if not self.fs.exists(self.root):
            return None
        if _is_local(self.fs) and os.path.islink(self.root) and not os.path.isdir(self.root):
            raise OutputError(f"{self.display()}: --out is a broken symbolic link")
        run = self.read_run()
        if run is None:
            names = [n for n in self._names(self.root) if n != LOCK_FILE]
            if names:
                shown = ", ".join(sorted(names)[:3]) + (" ..." if len(names) > 3 else "")
                raise OutputError(f"{self.display()}: --out holds files that clipforge did not write ({shown}) "
                                  f"and no {RUN_FILE}; use an empty or new folder")
            return None
        job = run.get("job")
        legacy_keys = set(legacy)
        if job is None and legacy_keys and legacy_keys <= set(run):
            return run
        if job != self.job:
            what = f"output of {job}" if isinstance(job, str) else "another tool's run record"
            raise OutputError(f"{self.display(RUN_FILE)}: --out holds {what}, not of {self.job}; "
                              "use another --out")
        return run

    def check_links(self, subdirs: Iterable[str]) -> None:
        """Refuse sub-folders that are symbolic links (writes and cleanup would land outside --out)."""
        if not _is_local(self.fs):
            return  # object stores have no links
        for sub in subdirs:
            p = self.path(sub)
            if os.path.islink(p):
                raise OutputError(f"{p}: is a symbolic link to {os.path.realpath(p)}; clipforge never writes or "
                                  "deletes through links inside --out: replace it with a real folder")
            if os.path.exists(p) and not os.path.isdir(p):
                raise OutputError(f"{p}: is a file where clipforge keeps a folder; use another --out")

    def names(self, sub: str = "") -> list[str]:
        """Names directly in OUT/sub (files and folders); empty if it does not exist."""
        path = self.path(sub) if sub else self.root
        if not _is_local(self.fs):
            self.fs.invalidate_cache(path)  # a listing cached before other processes wrote is stale
        return self._names(path)

    def _names(self, path: str) -> list[str]:
        try:
            return [e.rstrip("/").rsplit("/", 1)[-1] for e in self.fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []

    def url_of(self, *parts: str) -> str:
        """A path below the root as a URL that fsspec opens anywhere (tasks, other machines)."""
        return self.display(*parts)

    def walk(self, sub: str) -> list[tuple[str, str]]:
        """(relative path, kind) of everything below OUT/sub: kind is file, dir or link; links are
        listed, never followed."""
        top = self.path(sub)
        out: list[tuple[str, str]] = []
        if _is_local(self.fs):
            if os.path.islink(top):
                return [("", "link")]
            for dirpath, dirnames, filenames in os.walk(top):
                rel = os.path.relpath(dirpath, top)
                rel = "" if rel == "." else rel + "/"
                for d in list(dirnames):
                    if os.path.islink(os.path.join(dirpath, d)):
                        out.append((rel + d, "link"))
                        dirnames.remove(d)
                    else:
                        out.append((rel + d, "dir"))
                for f in filenames:
                    out.append((rel + f, "link" if os.path.islink(os.path.join(dirpath, f)) else "file"))
            return out
        self.fs.invalidate_cache(top)
        try:
            found = self.fs.find(top, withdirs=False, detail=False)
        except FileNotFoundError:
            return []
        return [(p[len(top) + 1:], "file") for p in found if p.startswith(top + "/")]

    def check_foreign(self, own: dict[str, re.Pattern[str]]) -> None:
        """Refuse files in our sub-folders that this job never writes, and links (one line naming
        the first): someone else's file must never be mistaken for ours, nor deleted as stale.
        `own`: sub-folder -> a pattern its files' paths (relative to it) fully match."""
        for sub, pattern in own.items():
            for rel, kind in self.walk(sub):
                if kind == "link":
                    p = self.path(sub, rel) if rel else self.path(sub)
                    raise OutputError(f"{p}: is a symbolic link to {os.path.realpath(p)}; clipforge never writes or "
                                      "deletes through links inside --out: replace it with a real folder")
                if kind == "dir":
                    continue
                if not (pattern.fullmatch(rel) or TMP_RE.fullmatch(rel.rsplit("/", 1)[-1])):
                    raise OutputError(f"{self.display(sub, rel)}: not a file {self.job} writes, inside its "
                                      "output folder; move it out of --out (nothing was changed)")

    def remove_own_files(self, sub: str, pattern: re.Pattern[str]) -> list[str]:
        """Delete the files below OUT/sub whose relative paths fully match `pattern` (and our
        temporaries), never through a link; then the folders left empty. Returns what was deleted."""
        removed = []
        entries = self.walk(sub)
        if any(kind == "link" for _, kind in entries):
            self.check_foreign({sub: pattern})  # raises, naming the link
        for rel, kind in entries:
            if kind == "file" and (pattern.fullmatch(rel) or TMP_RE.fullmatch(rel.rsplit("/", 1)[-1])):
                self.fs.rm(self.path(sub, rel))
                removed.append(rel)
        if _is_local(self.fs):
            for rel, kind in sorted(entries, key=lambda e: -e[0].count("/")):
                if kind == "dir":
                    try:
                        os.rmdir(self.path(sub, rel))
                    except OSError:
                        pass  # not empty: something that is not ours stays, and so does its folder
            try:
                os.rmdir(self.path(sub))
            except OSError:
                pass
        return removed

    def claim(self, settings: dict[str, Any], own: dict[str, re.Pattern[str]], legacy: Iterable[str] = ()) -> None:
        """Call under lock(): refuse an --out that is not ours, holds links or foreign files where we
        write, or records a run of other settings; then remove our own temporaries and record the
        settings in run.json. Nothing is written before every check has passed.

        `own`: sub-folder -> the names this job writes there (a full-match pattern).
        """
        from pipeline.shards import compare_settings

        run = self.check_ours(legacy)
        self.check_links(own)
        self.check_foreign(own)
        if run is not None:
            changed = compare_settings({k: v for k, v in run.items() if k != "job"}, settings)
            if changed:
                raise SettingsChanged(
                    f"{self.display(RUN_FILE)}: the output folder holds a {self.job} run with other settings or "
                    f"input ({'; '.join(changed[:4])}); use a new --out, or delete the folder to start over")
        self.remove_temporaries(own)
        self.write_run(settings)

    def write_run(self, record: dict[str, Any]) -> None:
        from pipeline.shards import atomic_write_json

        self.fs.makedirs(self.root, exist_ok=True)
        atomic_write_json(self.fs, self.path(RUN_FILE), {"job": self.job, **record})

    # -- cleanup of our own names -----------------------------------------------------

    def remove_own(self, sub: str, pattern: re.Pattern[str], keep: Iterable[str] = ()) -> list[str]:
        """Delete files directly in OUT/sub whose names fully match `pattern` (and are not in
        `keep`); nothing else, nothing below, never through a link. Returns what was deleted."""
        folder = self.path(sub) if sub else self.root
        if sub:
            self.check_links([sub])
        keep = set(keep)
        removed = []
        if _is_local(self.fs):
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                return []
            for e in entries:
                # A link's own name can look like ours; we never delete through one either.
                if pattern.fullmatch(e.name) and e.name not in keep and e.is_file(follow_symlinks=False):
                    os.unlink(e.path)
                    removed.append(e.path)
            return removed
        self.fs.invalidate_cache(folder)
        try:
            entries = self.fs.ls(folder, detail=True)
        except FileNotFoundError:
            return []
        for e in entries:
            name = e["name"].rstrip("/").rsplit("/", 1)[-1]
            if e.get("type") == "file" and pattern.fullmatch(name) and name not in keep:
                self.fs.rm(e["name"])
                removed.append(e["name"])
        return removed

    def remove_temporaries(self, own: dict[str, re.Pattern[str]]) -> list[str]:
        """Our atomic writes' leftovers (a killed run): NAME.tmp-PID-HEX8 whose NAME is one this job
        writes, in the root (run.json, config.yaml, stats.json, the lock) and below its folders."""
        removed = []
        root_names = re.compile(r"run\.json|config\.yaml|stats\.json|" + re.escape(LOCK_FILE))
        for name in self.names():
            base = _tmp_base(name)
            if base is not None and root_names.fullmatch(base) and self.fs.isfile(self.path(name)):
                self.fs.rm(self.path(name))
                removed.append(name)
        for sub, pattern in own.items():
            if not self.fs.exists(self.path(sub)):
                continue
            for rel, kind in self.walk(sub):
                head, _, name = rel.rpartition("/")
                base = _tmp_base(name)
                if kind == "file" and base is not None and pattern.fullmatch(f"{head}/{base}" if head else base):
                    self.fs.rm(self.path(sub, rel))
                    removed.append(f"{sub}/{rel}")
        return removed

    def remove_own_tree(self, sub: str, created_marker: str) -> None:
        """Remove OUT/sub recursively, only if it holds `created_marker`, the file this job writes
        into a folder it created; otherwise only our own names could be removed, so refuse."""
        self.check_links([sub])
        p = self.path(sub)
        if not self.fs.exists(p):
            return
        if not self.fs.exists(self.path(sub, created_marker)):
            raise OutputError(f"{self.display(sub)}: not a folder this job created (no {created_marker}); "
                              "move it away or use another --out")
        self.fs.rm(p, recursive=True)

    # -- lock -----------------------------------------------------------------------

    def lock(self, lease_seconds: float = 300.0) -> RunLock:
        """Take the folder's lock (see RunLock); released by release() or at exit of a `with`."""
        try:
            self.fs.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{self.display()}: cannot create --out ({type(exc).__name__}: "
                              f"{exc.strerror or exc})") from None
        lock_path = self.path(LOCK_FILE)
        if _is_local(self.fs) and (os.path.islink(lock_path) or os.path.isdir(lock_path)):
            raise OutputError(f"{lock_path}: is a link or a folder, not clipforge's lock file; remove it")
        lk = RunLock(self.fs, self.path(LOCK_FILE), self.job, lease_seconds=lease_seconds,
                     display=self.display(LOCK_FILE))
        lk.acquire()
        self._lock = lk
        return lk

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @contextmanager
    def claimed(self, legacy: Iterable[str] = (), subdirs: Iterable[str] = ()) -> Any:
        """check_ours + check_links, the lock, check_ours again under the lock (another run may
        have started in between); yields the recorded run (or None) and releases at the end."""
        self.check_ours(legacy)
        self.check_links(subdirs)
        self.lock()
        try:
            yield self.check_ours(legacy)
        finally:
            self.release()


def _tmp_base(name: str) -> str | None:
    """NAME of a temporary NAME.tmp-PID-HEX8 of ours, else None."""
    return name.rsplit(".tmp-", 1)[0] if TMP_RE.fullmatch(name) else None


def _process_start(pid: int) -> float | None:
    """A process's start time (clock ticks since boot, from /proc), None if it does not exist;
    -1 when it exists but the start time cannot be read (not Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
        fields = data[data.rindex(")") + 2:].split()
        return None if fields[0] in ("Z", "X") else float(fields[19])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return -1.0


class RunLock:
    """An exclusive, refreshed lock file (see the module docstring)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, job: str, lease_seconds: float = 300.0,
                 display: str | None = None, refresh_seconds: float | None = None):
        self.fs, self.path, self.job = fs, path, job
        self.display = display or path
        self.lease = lease_seconds
        self.refresh_every = refresh_seconds or max(1.0, lease_seconds / 5)
        self.token = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def record(self) -> dict[str, Any]:
        return {"job": self.job, "host": self.host, "pid": self.pid, "process_start": _process_start(self.pid),
                "started": self.started, "refreshed": time.time(), "token": self.token}

    def _read(self) -> dict[str, Any] | None:
        try:
            with self.fs.open(self.path, "rb") as f:
                obj = json.loads(f.read())
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError, OSError):
            return {}  # unreadable: a crash mid-write (local writes are atomic, so not ours) or foreign
        return obj if isinstance(obj, dict) else {}

    def _stale(self, other: dict[str, Any]) -> str | None:
        """Why `other`'s lock may be taken over, or None if it is held."""
        if not other:
            return "the lock file is unreadable"
        try:
            float(other.get("refreshed") or 0), float(other.get("started") or 0)
        except (TypeError, ValueError):
            return "the lock file is garbled"
        if other.get("host") == self.host and isinstance(other.get("pid"), int):
            start = _process_start(other["pid"])
            if start is None:
                return f"process {other['pid']} on this host is gone"
            recorded = other.get("process_start")
            if start >= 0 and isinstance(recorded, (int, float)) and recorded >= 0 and start != recorded:
                return f"process {other['pid']} is another process now (its holder is gone)"
            return None
        age = time.time() - float(other.get("refreshed") or 0)
        if age > self.lease:
            return f"its holder on {other.get('host')} stopped refreshing it {age:.0f}s ago (lease {self.lease:.0f}s)"
        return None

    def _refuse(self, other: dict[str, Any]) -> OutputError:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(other.get("started") or 0)))
        age = time.time() - float(other.get("refreshed") or 0)
        return OutputError(
            f"{self.display}: the folder is in use by another {other.get('job', 'clipforge')} run "
            f"(host {other.get('host')}, pid {other.get('pid')}, since {since}, refreshed {age:.0f}s ago); "
            "wait for it to end, or stop it; a lock whose holder died is taken over automatically")

    def _write_exclusive(self) -> bool:
        data = json.dumps(self.record()).encode()
        if isinstance(self.fs, LocalFileSystem):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        # Object storage: no exclusive create here; write, wait, read back: the last writer wins
        # and every other contender sees a foreign token and backs off.
        if self.fs.exists(self.path):
            return False
        with self.fs.open(self.path, "wb") as f:
            f.write(data)
        time.sleep(1.0)
        self.fs.invalidate_cache(self.path)
        return (self._read() or {}).get("token") == self.token

    def _take_over(self, other: dict[str, Any], why: str) -> bool:
        log.warning("%s: taking over a stale lock (%s)", self.display, why)
        if isinstance(self.fs, LocalFileSystem):
            # Rename a fresh lock over the stale one, then check that ours survived: two contenders
            # taking over at once both rename, and the loser sees the winner's token.
            tmp = f"{self.path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(json.dumps(self.record()).encode())
            current = self._read()
            if current != other and current is not None:
                os.unlink(tmp)
                return False  # someone else took it (or refreshed it) meanwhile
            os.replace(tmp, self.path)
            time.sleep(0.05)
            return (self._read() or {}).get("token") == self.token
        self.fs.rm(self.path)
        return self._write_exclusive()

    def acquire(self) -> None:
        for _ in range(5):
            if self._write_exclusive():
                break
            other = self._read()
            if other is None:
                continue  # released between our attempt and the read
            why = self._stale(other)
            if why is None:
                raise self._refuse(other)
            if self._take_over(other, why):
                break
        else:
            raise OutputError(f"{self.display}: could not take the lock (contended); try again")
        self.held = True
        self._thread = threading.Thread(target=self._refresh_loop, name="clipforge-lock", daemon=True)
        self._thread.start()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_every):
            try:
                current = self._read()
                if current is not None and current.get("token") != self.token:
                    log.error("%s: the lock was taken over by host %s pid %s; this run no longer holds it",
                              self.display, current.get("host"), current.get("pid"))
                    return
                from pipeline.shards import atomic_write_bytes

                atomic_write_bytes(self.fs, self.path, json.dumps(self.record()).encode())
            except Exception as exc:  # noqa: BLE001 - a missed refresh is retried; the lease covers several
                log.warning("%s: lock refresh failed (%s)", self.display, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.held:
            current = self._read()
            if current is not None and current.get("token") == self.token:
                try:
                    self.fs.rm(self.path)
                except FileNotFoundError:
                    pass
            self.held = False

    def __enter__(self) -> RunLock:
        if not self.held:
            self.acquire()
        return self

    def __exit__(self, *_: Any) -> None:
        self.release()
