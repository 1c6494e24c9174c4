"""Progress lines for long work: rows done, rate, success rate, ETA."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("clipforge.progress")


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    def __init__(self, total: int, every: float = 5.0, what: str = "rows", already: int = 0):
        self.total, self.every, self.what = total, every, what
        self.done = already
        self.ok = 0
        self.done_this_run = 0
        self.start = time.monotonic()
        self._last = 0.0

    def update(self, rows: int, ok: int) -> None:
        self.done += rows
        self.done_this_run += rows
        self.ok += ok

    # Progress within tasks: a running task reports its counts so far; they count until it
    # finishes, when its final counts replace them (a retried task starts again from zero).
    def task_running(self, index: int, rows: int, ok: int) -> None:
        if not hasattr(self, "_running"):
            self._running: dict[int, tuple[int, int]] = {}
            self._finished: set[int] = set()
        if index in self._finished:
            return  # a report that arrived after the task's result
        old_rows, old_ok = self._running.get(index, (0, 0))
        self._running[index] = (rows, ok)
        self.update(rows - old_rows, ok - old_ok)

    def finish_task(self, index: int, rows: int, ok: int) -> None:
        if not hasattr(self, "_running"):
            self._running, self._finished = {}, set()
        self._finished.add(index)
        old_rows, old_ok = self._running.pop(index, (0, 0))
        self.update(rows - old_rows, ok - old_ok)

    def rate(self) -> float:
        return self.done_this_run / max(1e-9, time.monotonic() - self.start)

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.rate()
        left = self.total - self.done
        eta = fmt_duration(left / rate) if rate > 0 else "?"
        pct = 100.0 * self.done / max(1, self.total)
        success = 100.0 * self.ok / max(1, self.done_this_run)
        return (f"{self.what} {self.done}/{self.total} ({pct:.1f}%) | {rate:.1f} {self.what}/s | "
                f"{self.ok / max(1e-9, elapsed):.1f} images/s | success {success:.1f}% | "
                f"elapsed {fmt_duration(elapsed)} | ETA {eta}")

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.every:
            self._last = now
            log.info(self.line())
