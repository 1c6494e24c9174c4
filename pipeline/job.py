"""The one job layer: a job is a RunDir and a list of steps; this module runs them (DataTrove's executor habit).

A `Step` plans its tasks on the driver (small, picklable descriptions: a file and a
row range, a bucket number, a range of shards) and runs one task in a worker
(`run(ctx, spec) -> summary`). This layer owns what every job repeats:

* **Markers.** A task's outputs are written atomically by the step; then this layer
  writes `OUT/_steps/STEP/NNNNN.json` (the task's summary) last. A rerun skips tasks
  whose marker exists and reads their summaries back; a finished step leaves
  `OUT/_steps/STEP.json` (every summary, in task order), so a resumed job reads one file
  per finished step, not one per task.
* **Summaries, not rows.** The driver keeps what tasks return: small dicts (counts,
  shard plans, node ids), O(tasks) in all. No row and no image byte passes through it.
* **Retries.** A task whose worker dies is re-run by Ray (`max_retries`); a task that
  raises is re-run once more by this layer before the job fails. Bad input a task meets
  (`ConfigError`: a damaged input shard, say) stops the job at once, exit 2.
* **Progress** moves within a task: `ctx.progress(rows, ok)` reports a task's running
  counts (throttled), the driver prints rate and ETA over all tasks of the step.
* **Exit codes** (`job_main`): bad input or settings 2, damaged output 1, failed tasks 1.

Where tasks run is the executor's business (pipeline/executor.py): in this process, or
as Ray tasks. `import ray` stays there.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import ConfigError
from pipeline.progress import Progress
from pipeline.rundir import RunDir
from pipeline.shards import ShardError, atomic_write_json

log = logging.getLogger("clipforge.job")

STEPS_DIR = "_steps"


class AccountingError(RuntimeError):
    """The outputs do not account for every input row exactly once (a damaged output, exit 1)."""


@dataclass
class TaskContext:
    """What a task knows besides its spec: where the output is, and how to report progress."""

    out: str
    job: str
    step: str
    index: int
    report: Callable[[str, int, int, int], None] | None = None
    """(step, task index, rows done, ok) -> None; set by the executor."""
    state: Any = None
    """What `Step.setup` returned in this worker (a loaded model), or None."""
    _last: float = 0.0
    _rd: RunDir | None = field(default=None, repr=False)

    @property
    def rd(self) -> RunDir:
        """The output folder (path helpers only: the lock is the driver's)."""
        if self._rd is None:
            self._rd = RunDir(self.out, self.job)
        return self._rd

    def progress(self, rows: int, ok: int, force: bool = False) -> None:
        """This task's running counts so far (not increments); cheap to call per row."""
        now = time.monotonic()
        if self.report is not None and (force or now - self._last >= 0.5):
            self._last = now
            self.report(self.step, self.index, rows, ok)


class Step:
    """One stage of a job; subclasses set `name` and implement `tasks` and `run`."""

    name = "step"
    what = "rows"
    """What progress counts (rows, samples, shards)."""

    def tasks(self) -> list[Any]:
        """Driver side: one small, picklable spec per task, in task order."""
        raise NotImplementedError

    def total(self, specs: list[Any]) -> int | None:
        """Driver side: what progress counts to, if known."""
        return None

    def run(self, ctx: TaskContext, spec: Any, shared: Any = None) -> dict[str, Any]:
        """Worker side: do one task, write its outputs atomically, return a small JSON-able summary."""
        raise NotImplementedError

    actors = False
    """True: the step's tasks run in a pool of long-lived workers (Ray actors), each calling `setup`
    once and then running many tasks with what it returned (`ctx.state`): a model is loaded once
    per worker, not once per task."""
    device = "cpu"
    """With `actors`: "auto" (one GPU per actor when the cluster has GPUs, else CPU actors), "cuda"
    (GPU actors, an error without GPUs) or "cpu"."""

    def setup(self, device: str, cpus: int, shared: Any = None) -> Any:
        """Worker side, once per worker of an actor step: what every task of it needs (a loaded
        model), placed on `device` ("cpu", "cuda" or "auto"), using `cpus` threads, from the
        step's `shared` object (weights the driver read); handed to `run` as `ctx.state`."""
        return None


def marker_path(rd: RunDir, step: str, index: int) -> str:
    return rd.path(STEPS_DIR, step, f"{index:05d}.json")


def run_task(step: Step, index: int, spec: Any, out: str, job: str, shared: Any = None,
             report: Callable[[str, int, int, int], None] | None = None,
             node: Callable[[], str] | None = None, state: Any = None) -> dict[str, Any]:
    """Run one task and write its marker last (also what a Ray task or actor runs)."""
    ctx = TaskContext(out, job, step.name, index, report, state)
    t0 = time.monotonic()
    summary = step.run(ctx, spec, shared)
    summary = {**summary, "task": index, "seconds": round(time.monotonic() - t0, 3)}
    if node is not None:
        summary["node"] = node()
    if getattr(step, "markers", True):
        atomic_write_json(ctx.rd.fs, marker_path(ctx.rd, step.name, index), summary)
    return summary


def _read_json(rd: RunDir, path: str) -> Any:
    with rd.fs.open(path, "rb") as f:
        return json.load(f)


def done_summaries(rd: RunDir, step: str) -> dict[int, dict[str, Any]]:
    """Summaries of the tasks of `step` that finished (one listing, then one read per marker)."""
    folder = rd.path(STEPS_DIR, step)
    out: dict[int, dict[str, Any]] = {}
    for name in rd.names(f"{STEPS_DIR}/{step}"):
        stem = name[: -len(".json")] if name.endswith(".json") else ""
        if stem.isdigit():
            try:
                out[int(stem)] = _read_json(rd, f"{folder}/{name}")
            except (ValueError, UnicodeDecodeError):
                continue  # unreadable: the task runs again (markers are written atomically, so foreign)
    return out


def run_step(rd: RunDir, step: Step, executor: Any, shared: Any = None,
             progress_every: float = 5.0) -> list[dict[str, Any]]:
    """Run every task of `step` not yet done; return all summaries in task order."""
    whole = rd.path(STEPS_DIR, f"{step.name}.json")
    specs = step.tasks()
    if rd.fs.exists(whole):
        try:
            summaries = _read_json(rd, whole)
        except (ValueError, UnicodeDecodeError):
            summaries = None  # damaged: the per-task markers say what is done
        if (isinstance(summaries, list) and len(summaries) == len(specs)
                and all(isinstance(s, dict) for s in summaries)):
            log.info("%s: done in an earlier run (%d tasks)", step.name, len(specs))
            return [{**s, "fresh": False} for s in summaries]
    done = done_summaries(rd, step.name)
    done = {i: s for i, s in done.items() if i < len(specs) and isinstance(s, dict)}
    todo = [i for i in range(len(specs)) if i not in done]
    total = step.total(specs)
    already = sum(int(s.get("progress_rows", s.get("rows", 0))) for s in done.values()) if total else 0
    progress = Progress(total or len(specs), progress_every, what=step.what if total else "tasks", already=already)
    log.info("%s: %d tasks (%d done before)%s", step.name, len(specs), len(done),
             f", {total} {step.what}" if total else "")
    summaries = dict(done)

    def on_result(index: int, summary: dict[str, Any]) -> None:
        summaries[index] = summary
        if total:
            progress.finish_task(index, int(summary.get("progress_rows", summary.get("rows", 0))),
                                 int(summary.get("progress_ok", 0)))
        else:
            progress.finish_task(index, 1, 1)

    def on_report(_step: str, index: int, rows: int, ok: int) -> None:
        if total:
            progress.task_running(index, rows, ok)

    if todo:
        t0 = time.monotonic()
        progress._last = time.monotonic()  # the first line after `progress_every`, not at once
        executor.run_tasks(step, [(i, specs[i]) for i in todo], rd.url, rd.job, shared, on_result, on_report,
                           on_tick=progress.tick, tick_seconds=min(progress_every, 1.0))
        log.info("%s: %d tasks done in %.1fs", step.name, len(todo), time.monotonic() - t0)
    ordered = [summaries[i] for i in range(len(specs))]
    atomic_write_json(rd.fs, whole, ordered)
    # "fresh": run by this call (rates count this run's work only); not recorded in the markers.
    return [{**s, "fresh": i in set(todo)} for i, s in enumerate(ordered)]


QUIET_LOGGERS = ("botocore", "aiobotocore", "boto3", "s3fs", "gcsfs", "fsspec", "urllib3", "huggingface_hub")
"""Storage clients that log at INFO ("Found credentials in environment variables", one line per
client): under our INFO root logger they would put lines before a job's one-line error."""


def quiet_storage_loggers() -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def job_main(name: str, body: Callable[[], int]) -> int:
    """Run a job's body with the one exit-code policy: bad input or settings 2 (one line), damaged
    output 1 (one line), failed tasks 1, Ctrl-C 130."""
    from pipeline.executor import TaskFailed

    quiet_storage_loggers()
    try:
        return body()
    except ConfigError as exc:
        print(f"{name}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (AccountingError, ShardError) as exc:
        print(f"{name}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except TaskFailed as exc:
        print(f"{name}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:  # the storage failed us (a full disk, a lost mount): no traceback, exit 1
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"{name}: error: {where}{exc.strerror or _one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted; finished tasks are kept, rerun the same command to resume", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    """[lo, hi) ranges of `size` covering 0..n-1."""
    for lo in range(0, n, size):
        yield lo, min(n, lo + size)
