"""A training run's output folder, through pipeline.rundir.RunDir (the one owner of job outputs).

    OUT/run.json               {"job": "train", ...}: marks the folder as a training run's
    OUT/.clipforge.lock        held by rank 0 while the run lives (host, pid, start time)
    OUT/config.yaml, model/, checkpoints/, tb/, results.jsonl, train_log.jsonl, curves.png, trace-rankR.jsonl

Rank 0 claims the folder before anything in it is written: it must be absent, empty,
hold a training run's run.json, or be a clipforge 0.1 training folder (config.yaml
and checkpoints/, no run.json), which is adopted; anything else is someone's files
and is refused. Sub-folders that are symbolic links are refused (writes and pruning
would land elsewhere). Then the lock: a second run into the same folder is refused
with who holds it. Every rank checks that it can write where it will write before
training starts. Cleanup deletes only the run's own temporaries, by name.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from typing import Any

import yaml

from pipeline.rundir import LOCK_FILE, RUN_FILE, OutputError, RunDir
from training.errors import TrainError
from training.storage import STORE_ERRORS

log = logging.getLogger(__name__)

SUBDIRS = ("checkpoints", "model", "tb")
_TMP = r"\.tmp-\d+-[0-9a-f]{8}"
PROBE = ".write-probe"
"""Name of the file a write check creates and deletes at once (a temporary if a kill interrupts it)."""
OWN_TEMPORARIES = {
    # pipeline.shards.atomic_open's NAME.tmp-PID-HEX8, for the names this run writes that way;
    # the lock's own takeover temporary; the write probe.
    # The logs and curves too: on object storage they are rewritten whole, the same way (training/storage.py).
    "": re.compile(rf"^(?:{RUN_FILE}|config\.yaml|{re.escape(LOCK_FILE)}|{re.escape(PROBE)}|results\.jsonl|"
                   rf"train_log\.jsonl|curves\.png|trace-rank\d+\.jsonl){_TMP}$"),
    "checkpoints": re.compile(rf"^(?:\.step_\d{{8}}\.pt|best\.json|{re.escape(PROBE)}){_TMP}$"),
    # TensorBoard's event files, uploaded from a local folder when OUT is on object storage (Loc.put).
    "tb": re.compile(rf"^\.events\.out\.tfevents\.[^/]+{_TMP}$"),
    # clipforge 0.1 wrote the model config through .NAME.json.tmp-PID.
    "model": re.compile(rf"^(?:[^/]+\.json{_TMP}|\.[^/]+\.json\.tmp-\d+|{re.escape(PROBE)}{_TMP})$"),
}
LEGACY_NAMES = re.compile(r"^(?:config\.yaml|checkpoints|model|tb|results\.jsonl|train_log\.jsonl|curves\.png|"
                          rf"trace-rank\d+\.jsonl|{re.escape(LOCK_FILE)})$")
"""Everything a clipforge 0.1 training run wrote at the top of its output folder."""


class RunOutput:
    """OUT of a training run; see the module docstring."""

    def __init__(self, url: str) -> None:
        self.dir = RunDir(url, job="train")  # OutputError for a URL no filesystem serves
        protocols = self.dir.fs.protocol if isinstance(self.dir.fs.protocol, (tuple, list)) else [self.dir.fs.protocol]
        if {"http", "https"} & set(protocols):
            raise OutputError(f"--output {url}: a web address cannot be written to; use a local folder or "
                              "object storage (s3://BUCKET/PATH, gs://...)")
        if "memory" in protocols:  # fsspec's in-process store: everything would vanish at exit, with exit 0
            raise OutputError(f"--output {url}: memory:// lives only as long as this process; use a local folder "
                              "or object storage (s3://BUCKET/PATH, gs://...)")
        self.fs, self.root = self.dir.fs, self.dir.root
        self.recorded: dict[str, Any] | None = None
        self.legacy = False
        self._made: list[str] = []
        """Folders that taking the lock created: removed again (if empty) when the run is refused."""

    def path(self, *parts: str) -> str:
        return self.dir.path(*parts)

    def display(self, *parts: str) -> str:
        return self.dir.display(*parts)

    # -- rank 0, before anything is written ---------------------------------------------

    def claim(self) -> None:
        """Ownership, links and the lock; raises OutputError/TrainError and leaves nothing behind."""
        try:
            self._claim()
        except OSError as exc:  # a folder we may not even read
            raise TrainError(f"{exc.filename or self.display()}: {exc.strerror or exc}; use another --output") \
                from None
        except STORE_ERRORS as exc:  # an object store that cannot be reached: before anything is written
            raise TrainError(f"{self.display()}: cannot reach the output folder ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:200]}); check the URL, the endpoint and the "
                             "credentials") from None

    def _claim(self) -> None:
        self._check_ours()
        self.dir.check_links(SUBDIRS)
        parent, missing = self.root, []
        while parent and not self.fs.exists(parent):
            missing.append(parent)
            if "/" not in parent.strip("/"):
                break  # a bucket that does not exist: it has no parent ("b".rsplit("/") is "b" again, forever)
            parent = parent.rsplit("/", 1)[0]
        try:
            self.dir.lock()
        except OSError as exc:
            self._made = missing
            self.abandon()
            raise TrainError(f"{self.display()}: cannot write to the output folder ({exc.strerror or exc}); "
                             "fix its permissions or use another --output") from None
        self._made = missing
        try:
            self._check_ours()  # again, under the lock: another run may have claimed the folder meanwhile
        except BaseException:
            self.abandon()
            raise

    def _check_ours(self) -> None:
        run = self.dir.read_run()
        if run is None and self._is_legacy():
            self.legacy = True
            return
        self.recorded = self.dir.check_ours()

    def _is_legacy(self) -> bool:
        """A clipforge 0.1 training folder: only names it wrote, its config.yaml and a checkpoints/ folder."""
        try:
            names = [e.rstrip("/").rsplit("/", 1)[-1] for e in self.fs.ls(self.root, detail=False)]
        except (FileNotFoundError, NotADirectoryError):
            return False
        if not names or not all(LEGACY_NAMES.fullmatch(n) for n in names):
            return False
        if "config.yaml" not in names or not self.fs.isdir(self.path("checkpoints")):
            return False
        try:
            with self.fs.open(self.path("config.yaml"), "rb") as f:
                cfg = yaml.safe_load(f)
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            return False
        return isinstance(cfg, dict) and {"data", "model", "run"} <= set(cfg)

    def abandon(self) -> None:
        """Release the lock and remove the (empty) folders the claim created: a refused run leaves nothing."""
        self.dir.release()
        for folder in self._made:
            try:
                self.fs.rmdir(folder)
            except OSError:
                break  # not empty (someone else's now) or already gone
        self._made = []

    def release(self) -> None:
        self.dir.release()

    # -- every rank ------------------------------------------------------------------------

    def check_writable(self, subdirs: list[str]) -> None:
        """Create and delete a file in each folder this rank will write to (or its nearest existing
        parent): permissions, read-only mounts and full quotas show now, not at the first save."""
        for sub in subdirs:
            folder = self.path(sub) if sub else self.root
            while not self.fs.exists(folder) and "/" in folder.strip("/"):
                folder = folder.rsplit("/", 1)[0]
            probe = f"{folder}/{PROBE}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                with self.fs.open(probe, "wb") as f:
                    f.write(b"clipforge write check\n")
                self.fs.rm(probe)
            except STORE_ERRORS as exc:
                where = self.display(sub) if sub else self.display()
                raise TrainError(f"{where}: cannot write here ({getattr(exc, 'strerror', None) or exc}); this run writes "
                                 f"{_WHAT.get(sub, 'its outputs')} there: fix the permissions or use another "
                                 "--output") from None

    # -- rank 0, after every check passed -----------------------------------------------

    def record_run(self, record: dict[str, Any]) -> None:
        """Write OUT/run.json once (a new folder, or a 0.1 folder adopted); a later run never rewrites it."""
        if self.recorded is None:
            if self.legacy:
                log.warning("%s: a clipforge 0.1 training run (no %s); adopting it as this run's folder",
                            self.display(), RUN_FILE)
            self.dir.write_run({**record, "adopted_0.1_folder": self.legacy})
            self.recorded = self.dir.read_run()

    def remove_temporaries(self) -> list[str]:
        """Leftovers of killed saves and writes: only this run's own names, never through a link."""
        removed = []
        for sub, pattern in OWN_TEMPORARIES.items():
            removed += self.dir.remove_own(sub, pattern)
        if removed:
            log.warning("removed %d temporary file(s) of an interrupted run: %s", len(removed),
                        ", ".join(r.rsplit("/", 1)[-1] for r in removed[:3]) + (" ..." if len(removed) > 3 else ""))
        return removed


_WHAT = {"": "config.yaml, logs and results", "checkpoints": "checkpoints", "model": "the model config",
         "tb": "TensorBoard logs"}

__all__ = ["OutputError", "RunOutput", "SUBDIRS"]
