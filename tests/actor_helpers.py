"""Steps for the actor-pool tests, importable by Ray workers as tests.actor_helpers (the repo root is on
their PYTHONPATH; a class defined in a test module would not be)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.job import Step, TaskContext


class DiesOnce(Step):
    """An actor step whose first attempt at task 0 kills its worker process (an out-of-memory kill, a
    lost node): the pool must start another actor and run the task again there."""

    name = "dies_once"
    actors = True
    device = "cpu"

    def __init__(self, n: int, marker: str):
        self.n, self.marker = n, marker

    def tasks(self) -> list[int]:
        return list(range(self.n))

    def setup(self, device: str, cpus: int, shared: Any = None) -> dict[str, Any]:
        return {"pid": os.getpid(), "device": device, "cpus": cpus, "shared": shared}

    def run(self, ctx: TaskContext, i: int, shared: Any = None) -> dict[str, Any]:
        if i == 0 and not Path(self.marker).exists():
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(1)
        return {"task_pid": os.getpid(), **ctx.state}
