"""Where tasks run, kept apart from what they do (DataTrove's executor split).

`LocalExecutor` runs tasks in this process, one after the other (tests,
debugging). `RayExecutor` runs each task as a Ray task, joining a cluster when
an address is given (or RAY_ADDRESS is set, as `ray job submit` does) and
starting a local Ray otherwise. This is the only pipeline module that imports
ray. Task arguments travel through Ray, never through a file only the driver's
disk holds (img2dataset's Ray distributor needs a shared filesystem for that).
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError

log = logging.getLogger(__name__)


class TaskFailed(RuntimeError):
    """One or more tasks failed after Ray's retries; rerunning the job resumes."""


def input_error(exc: BaseException) -> Exception | None:
    """The error a task raised that no retry can mend (Ray wraps it; `.cause` is the original), else None.

    Bad input (a damaged input shard, say: ConfigError) is the user's to fix, and a damaged
    output (AccountingError) needs its task redone by hand: the job stops at once and prints
    it as one line (exit 2 or 1), instead of retrying and reporting a task failure.
    """
    from pipeline.job import AccountingError

    cause = getattr(exc, "cause", None) or exc
    return cause if isinstance(cause, (ConfigError, AccountingError)) else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1][:300] if text else type(exc).__name__


class LocalExecutor:
    name = "local"

    def run_tasks(self, step: Any, tasks: Sequence[tuple[int, Any]], out: str, job: str, shared: Any,
                  on_result: Callable[[int, Any], None], on_report: Callable[[str, int, int, int], None],
                  on_tick: Callable[[], None] | None = None, tick_seconds: float = 5.0,
                  task_retries: int = 1) -> None:
        """Run `step`'s tasks in this process, in order (pipeline.job.run_step calls this)."""
        from pipeline.job import run_task

        failures = []
        for index, spec in tasks:
            for attempt in range(task_retries + 1):
                try:
                    on_result(index, run_task(step, index, spec, out, job, shared, report=on_report))
                    break
                except Exception as exc:  # noqa: BLE001 - retried, then collected and raised below
                    if input_error(exc) is not None:
                        raise
                    log.error("%s task %05d failed (attempt %d): %s", step.name, index, attempt + 1, exc)
                    if attempt == task_retries:
                        failures.append((index, exc))
            if on_tick:
                on_tick()
        if failures:
            raise TaskFailed(f"{step.name}: {len(failures)} task(s) failed, first: {failures[0][0]:05d}: "
                             f"{_first_line(failures[0][1])}; rerun the same command to resume")

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *_: Any) -> None:
        pass

    def put(self, obj: Any) -> Any:
        return obj


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, max_retries: int = 3):
        self.address = address or os.environ.get("RAY_ADDRESS")
        self.num_cpus = num_cpus
        self.max_retries = max_retries
        self._started = False
        self._reaper: subprocess.Popen | None = None
        self._sink: Any = None

    def __enter__(self) -> RayExecutor:
        import ray

        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=True)
            else:
                # address="local": always a fresh local Ray, never a `ray start` cluster
                # that happens to be running on this machine.
                ray.init(address="local", num_cpus=self.num_cpus, include_dashboard=False,
                         logging_level=logging.WARNING, log_to_driver=True)
                self._start_reaper()
            self._started = True
        log.info("ray: %s CPUs in the cluster", ray.cluster_resources().get("CPU"))
        return self

    def _start_reaper(self) -> None:
        """A watcher that ends this local Ray's processes if this driver is killed (pipeline/reaper.py)."""
        if sys.platform != "linux":
            return
        try:  # Ray names its session in every worker's command line: the reaper's last sweep finds them by it
            import ray

            session = [ray._private.worker._global_node.session_name]
        except Exception:  # noqa: BLE001 - a private attribute; without it the reaper still ends the rest
            session = []
        self._reaper = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("reaper.py")), str(os.getpid()), *session],
            stdin=subprocess.DEVNULL, start_new_session=True)

    def __exit__(self, *_: Any) -> None:
        import ray

        if self._sink is not None and ray.is_initialized():
            try:
                ray.kill(self._sink)
            except Exception:  # noqa: BLE001 - gone with its node already
                pass
            self._sink = None
        if self._started:
            ray.shutdown()
        if self._reaper is not None:
            self._reaper.terminate()  # a clean shutdown: nothing left to reap
            self._reaper.wait(timeout=10)
            self._reaper = None

    def put(self, obj: Any) -> Any:
        import ray

        return ray.put(obj)

    def run_tasks(self, step: Any, tasks: Sequence[tuple[int, Any]], out: str, job: str, shared: Any,
                  on_result: Callable[[int, Any], None], on_report: Callable[[str, int, int, int], None],
                  on_tick: Callable[[], None] | None = None, tick_seconds: float = 5.0,
                  task_retries: int = 1) -> None:
        """Run `step`'s tasks as Ray tasks, a bounded number in flight (pipeline.job.run_step calls this).

        The step object and `shared` (an eval index, say) go to the object store once; every
        task gets references. Tasks report progress to a small actor that the driver drains
        every tick, so the progress line moves while tasks run.
        """
        import ray

        # Named after the step: `ps` on a worker shows ray::download, ray::write_shards, ...
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        on_driver_node = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        # SPREAD, as Ray Data schedules its read tasks: the default packs short tasks onto the
        # driver's node while another node's CPUs still look leased, so a step of quick tasks
        # (dedup buckets, settle) would use one machine's disk and network only.
        options: dict[str, Any] = {"num_cpus": getattr(step, "num_cpus", 1), "max_retries": self.max_retries,
                                   "name": step.name, "scheduling_strategy": "SPREAD"}
        if getattr(step, "on_driver_node", False):
            options["scheduling_strategy"] = on_driver_node
        remote = ray.remote(**options)(_ray_task)
        # The sink lives beside the driver: on a node that can be lost, it would take the job with it
        # (the driver drains it every tick), while the tasks themselves are simply re-run elsewhere.
        # One for the whole job: an actor costs a worker process's start, about a second, per step.
        if self._sink is None:
            self._sink = _progress_sink().options(scheduling_strategy=on_driver_node).remote()
        sink = self._sink
        step_ref = ray.put(step)
        shared_ref = shared if isinstance(shared, ray.ObjectRef) or shared is None else ray.put(shared)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        # Arguments of queued tasks sit in the object store: about twice what can run at once.
        max_inflight = 2 * math.ceil(cpus / options["num_cpus"]) + 2
        pending = list(tasks)[::-1]
        attempts: dict[int, int] = {}
        inflight: dict[Any, tuple[int, Any]] = {}
        failures: list[tuple[int, BaseException]] = []
        while pending or inflight:
            while pending and len(inflight) < max_inflight:
                index, spec = pending.pop()
                inflight[remote.remote(step_ref, index, spec, out, job, shared_ref, sink)] = (index, spec)
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=tick_seconds)
            for ref in ready:
                index, spec = inflight.pop(ref)
                try:
                    summary = ray.get(ref)
                except (ray.exceptions.RayError, Exception) as exc:  # noqa: BLE001
                    bad_input = input_error(exc)
                    if bad_input is not None:
                        for other in inflight:
                            ray.cancel(other)
                        raise type(bad_input)(*bad_input.args) from None
                    attempts[index] = attempts.get(index, 0) + 1
                    log.error("%s task %05d failed (attempt %d): %s", step.name, index, attempts[index],
                              _first_line(exc))
                    if attempts[index] <= task_retries:
                        pending.append((index, spec))
                    else:
                        failures.append((index, exc))
                    continue
                on_result(index, summary)
            for update in ray.get(sink.drain.remote()):
                if update[0] == step.name:  # a late report of an earlier step's task is dropped
                    on_report(*update)
            if on_tick:
                on_tick()
        if failures:
            first_index, first_exc = failures[0]
            raise TaskFailed(f"{step.name}: {len(failures)} task(s) failed, first: {first_index:05d}: "
                             f"{_first_line(first_exc)}; rerun the same command to resume")


def make_executor(kind: str, address: str | None = None, num_cpus: int | None = None) -> LocalExecutor | RayExecutor:
    if kind == "local":
        return LocalExecutor()
    return RayExecutor(address=address, num_cpus=num_cpus)


def _ray_task(step: Any, index: int, spec: Any, out: str, job: str, shared: Any, sink: Any) -> dict[str, Any]:
    """A Ray task: pipeline.job.run_task with progress reports to `sink` and the node id in the summary."""
    import ray

    from pipeline.job import quiet_storage_loggers, run_task

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    quiet_storage_loggers()

    def report(step_name: str, i: int, rows: int, ok: int) -> None:
        sink.report.remote(step_name, i, rows, ok)  # fire and forget

    return run_task(step, index, spec, out, job, shared, report=report,
                    node=lambda: ray.get_runtime_context().get_node_id())


_SINK: Any = None


def _progress_sink() -> Any:
    """The Ray actor class that collects running task counts (defined once, on first use)."""
    global _SINK
    if _SINK is None:
        import ray

        @ray.remote(num_cpus=0)
        class ProgressSink:
            def __init__(self) -> None:
                self.latest: dict[tuple[str, int], tuple[int, int]] = {}

            def report(self, step: str, index: int, rows: int, ok: int) -> None:
                self.latest[(step, index)] = (rows, ok)

            def drain(self) -> list[tuple[str, int, int, int]]:
                out = [(s, i, r, o) for (s, i), (r, o) in self.latest.items()]
                self.latest.clear()
                return out

        _SINK = ProgressSink
    return _SINK
