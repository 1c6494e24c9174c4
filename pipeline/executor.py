"""Where tasks run, kept apart from what they do (DataTrove's executor split).

`LocalExecutor` runs tasks in this process, one after the other (tests,
debugging). `RayExecutor` runs each task as a Ray task, joining a cluster when
an address is given (or RAY_ADDRESS is set, as `ray job submit` does) and
starting a local Ray otherwise; the tasks of a step with `actors = True` (model
inference) run instead on a pool of Ray actors, one GPU each when the cluster has
GPUs, each loading its model once (`Step.setup`). This is the only pipeline module
that imports ray. Task arguments travel through Ray, never through a file only the driver's
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


def _drain(sink: Any, step: str, on_report: Callable[..., None]) -> None:
    """Hand the job's progress sink's reports of `step` to `on_report`; one sink serves every step of a
    job, so a late report of an earlier step's task is dropped (task and actor loops alike)."""
    import ray

    for update in ray.get(sink.drain.remote()):
        if update[0] == step:
            on_report(*update)


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

        # An actor step's worker state (a loaded model): set up once for all its tasks here.
        state = step.setup(getattr(step, "device", "cpu"), local_threads(), shared) \
            if getattr(step, "actors", False) else None
        failures = []
        for index, spec in tasks:
            for attempt in range(task_retries + 1):
                try:
                    on_result(index, run_task(step, index, spec, out, job, shared, report=on_report, state=state))
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

        if getattr(step, "actors", False):
            self._run_actor_pool(step, tasks, out, job, shared, on_result, on_report, on_tick, tick_seconds,
                                 task_retries)
            return
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
            _drain(sink, step.name, on_report)
            if on_tick:
                on_tick()
        if failures:
            first_index, first_exc = failures[0]
            raise TaskFailed(f"{step.name}: {len(failures)} task(s) failed, first: {first_index:05d}: "
                             f"{_first_line(first_exc)}; rerun the same command to resume")


    def _run_actor_pool(self, step: Any, tasks: Sequence[tuple[int, Any]], out: str, job: str, shared: Any,
                        on_result: Callable[[int, Any], None], on_report: Callable[[str, int, int, int], None],
                        on_tick: Callable[[], None] | None, tick_seconds: float, task_retries: int) -> None:
        """Run an actor step's tasks on a pool of Ray actors (see pipeline.job.Step.actors).

        One GPU per actor when the cluster has GPUs (and the step does not ask for the CPU),
        as many actors as GPUs; otherwise CPU actors of `step.num_cpus` cores each, as many as
        the cluster's CPUs hold. Each actor calls `step.setup` once (a model load), then runs
        tasks one after another; two are queued on each, so an actor never waits for the driver
        between tasks. The job layer's rules hold as for Ray tasks: markers are written by the
        task itself, bad input stops the job, a task that raises is retried `task_retries` times,
        and the tasks of an actor that dies (a lost node, an out-of-memory kill) go to a new actor
        up to `max_retries` times each.
        """
        import ray

        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        want = getattr(step, "device", "cpu")
        if want == "cuda" and gpus == 0:
            raise ConfigError(f"{step.name}: --device cuda, but the Ray cluster has no GPU; use --device auto or cpu")
        if gpus and want in ("auto", "cuda"):
            # Decoding feeds the GPU: give each GPU actor a share of the CPUs (at most 8, at least 1).
            actor_cpus = getattr(step, "gpu_actor_cpus", None) or max(1, min(8, cpus // gpus))
            options: dict[str, Any] = {"num_gpus": 1, "num_cpus": actor_cpus}
            n_actors, device = gpus, "cuda"
        else:
            actor_cpus = max(1, int(getattr(step, "num_cpus", 1)))
            if actor_cpus > cpus:
                # No node could ever hold one: the actors would wait for resources forever.
                raise ConfigError(f"{step.name}: actors of {actor_cpus} CPUs, but the Ray cluster has {cpus}; "
                                  "lower --cpus-per-actor")
            options = {"num_cpus": actor_cpus}
            n_actors, device = max(1, cpus // actor_cpus), "cpu"
        n_actors = max(1, min(n_actors, len(tasks), getattr(step, "max_actors", None) or n_actors))
        log.info("%s: %d %s actor(s) of %d CPU(s)%s", step.name, n_actors, device, actor_cpus,
                 " and 1 GPU" if device == "cuda" else "")
        options.update(scheduling_strategy="SPREAD", max_restarts=0)  # a dead actor is replaced here
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        on_driver_node = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        sink = _progress_sink().options(scheduling_strategy=on_driver_node).remote()
        actor_cls = ray.remote(_StepActor).options(**options)
        step_ref = ray.put(step)
        shared_ref = shared if isinstance(shared, ray.ObjectRef) or shared is None else ray.put(shared)

        class Slot:
            def __init__(self) -> None:
                self.actor = actor_cls.remote(step_ref, device, actor_cpus)
                self.queued = 0
                self.generation = 0

            def replace(self) -> None:
                try:
                    ray.kill(self.actor, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
                self.actor = actor_cls.remote(step_ref, device, actor_cpus)
                self.queued = 0
                self.generation += 1

        slots = [Slot() for _ in range(n_actors)]
        pending = list(tasks)[::-1]
        inflight: dict[Any, tuple[int, int, int, Any]] = {}  # ref -> (slot, generation, index, spec)
        failed_runs: dict[int, int] = {}
        lost_runs: dict[int, int] = {}
        replacements = 0
        failures: list[tuple[int, BaseException]] = []
        try:
            while pending or inflight:
                for i, slot in enumerate(slots):
                    while pending and slot.queued < 2:
                        index, spec = pending.pop()
                        ref = slot.actor.run.remote(index, spec, out, job, shared_ref, sink)
                        inflight[ref] = (i, slot.generation, index, spec)
                        slot.queued += 1
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=tick_seconds)
                for ref in ready:
                    i, generation, index, spec = inflight.pop(ref)
                    slot = slots[i]
                    if generation == slot.generation:
                        slot.queued -= 1
                    try:
                        summary = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - sorted below: bad input, a lost actor, a task error
                        bad_input = input_error(exc)
                        if bad_input is not None:
                            raise type(bad_input)(*bad_input.args) from None
                        if isinstance(exc, ray.exceptions.RayActorError):
                            if generation == slot.generation:
                                replacements += 1
                                if replacements > n_actors * (self.max_retries + 1):
                                    raise TaskFailed(f"{step.name}: its actors keep dying ({replacements} replaced), "
                                                     f"last: {_first_line(exc)}; rerun the same command to resume") \
                                        from None
                                log.error("%s: an actor died (%s); starting another", step.name, _first_line(exc))
                                slot.replace()
                            lost_runs[index] = lost_runs.get(index, 0) + 1
                            retry = lost_runs[index] <= self.max_retries
                        else:
                            failed_runs[index] = failed_runs.get(index, 0) + 1
                            log.error("%s task %05d failed (attempt %d): %s", step.name, index, failed_runs[index],
                                      _first_line(exc))
                            retry = failed_runs[index] <= task_retries
                        if retry:
                            pending.append((index, spec))
                        else:
                            failures.append((index, exc))
                        continue
                    on_result(index, summary)
                _drain(sink, step.name, on_report)
                if on_tick:
                    on_tick()
        finally:
            for slot in slots:
                try:
                    ray.kill(slot.actor, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
            ray.kill(sink)
        if failures:
            first_index, first_exc = failures[0]
            raise TaskFailed(f"{step.name}: {len(failures)} task(s) failed, first: {first_index:05d}: "
                             f"{_first_line(first_exc)}; rerun the same command to resume")


def local_threads() -> int:
    """CPU threads a step's setup may use in this process: the cores it may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class _StepActor:
    """A Ray actor that holds one step's worker state (`step.setup`, done at its first task) and runs
    tasks of that step (pipeline.job.run_task) with it."""

    def __init__(self, step: Any, device: str, cpus: int):
        self.step, self.device, self.cpus = step, device, cpus
        self.state: Any = None
        self.ready = False

    def run(self, index: int, spec: Any, out: str, job: str, shared: Any, sink: Any) -> dict[str, Any]:
        import ray

        from pipeline.job import quiet_storage_loggers, run_task

        if not self.ready:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                                datefmt="%H:%M:%S")
            quiet_storage_loggers()
            # Set up in a call, not in __init__: an error there reaches the driver as this task's error
            # (bad input stops the job with its one line), not as a dead actor.
            self.state = self.step.setup(self.device, self.cpus, shared)
            self.ready = True

        def report(step_name: str, i: int, rows: int, ok: int) -> None:
            sink.report.remote(step_name, i, rows, ok)  # fire and forget

        return run_task(self.step, index, spec, out, job, shared, report=report,
                        node=lambda: ray.get_runtime_context().get_node_id(), state=self.state)


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
