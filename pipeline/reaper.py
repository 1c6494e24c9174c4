"""Ends the local Ray a job started when the job's driver dies without shutting it down.

    python pipeline/reaper.py DRIVER_PID          # started by RayExecutor, in its own session

Ray's raylet and GCS notice a dead driver and exit, but the agents they started
(dashboard agent, runtime-env agent) are reparented to init and live on, one set per
killed run (seen with Ray 2.60 after SIGKILL of the driver). This process remembers
the driver's descendants (re-scanned every second, so late workers count too), and
when the driver is gone it sends them SIGKILL. A pid is only signalled if it still has
the start time it had when seen: a reused pid is someone else's process.

Standalone on purpose (no clipforge imports): it must start fast and must not hold
anything of the driver's. Linux only (/proc); elsewhere it exits at once.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live, non-zombie process, else None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = data[data.rindex(")") + 2:].split()  # after "pid (comm) "
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[19])


def _is_ray(pid: int) -> bool:
    """Only Ray's own processes are ours to end (a test's driver has other children too)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"ray" in f.read()
    except OSError:
        return False


def descendants(root: int) -> dict[int, int]:
    """pid -> start ticks of every live descendant of `root`."""
    parent: dict[int, tuple[int, int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                parent[int(name)] = st
    found: dict[int, int] = {}
    frontier = [root]
    while frontier:
        p = frontier.pop()
        for pid, (ppid, start) in parent.items():
            if ppid == p and pid not in found:
                found[pid] = start
                frontier.append(pid)
    return found


def _session_pids(session: str, me: int) -> dict[int, int]:
    """Live processes whose command line names the Ray session (workers that started in the last
    second before the driver died, and were reparented before a scan saw them)."""
    found = {}
    key = f"--session-name={session}".encode()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        # A worker renames itself (ray::IDLE), but its stdout and stderr stay in the session's logs.
        logs = []
        for fd in (1, 2):
            try:
                logs.append(os.readlink(f"/proc/{name}/fd/{fd}"))
            except OSError:
                pass
        if key in cmd.replace(b"\0", b" ") or f"/{session}/".encode() in cmd or any(f"/{session}/" in t for t in logs):
            st = _stat(int(name))
            if st is not None:
                found[int(name)] = st[1]
    return found


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2 or not argv[0].isdigit() or not os.path.isdir("/proc"):
        return 0
    driver = int(argv[0])
    session = argv[1] if len(argv) == 2 and argv[1].startswith("session_") else None
    me = os.getpid()
    seen: dict[int, int] = {}
    while True:
        alive = _stat(driver)
        if alive is None or os.getppid() != driver:
            break
        for pid, start in descendants(driver).items():
            if pid != me and pid not in seen and _is_ray(pid):
                seen[pid] = start
        time.sleep(1.0)
    if session:
        seen.update(_session_pids(session, me))
    for pid, start in seen.items():
        st = _stat(pid)
        if st is not None and st[1] == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to the terminal is the driver's to handle
    raise SystemExit(main(sys.argv[1:]))
