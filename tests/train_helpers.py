"""Helpers for the training tests: run a (torchrun) command that can never outlive its timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "training/configs/tiny-vit.json")


def run(cmd: list[str], timeout: float, cwd: str | Path = REPO, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess:
    """Run in a new session and kill the whole group on timeout: torchrun's ranks must not linger."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def torchrun(nproc: int, script: str | Path, *args: str, timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    # --standalone: a private rendezvous on a free port, so parallel test runs cannot collide.
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                str(script), *args], timeout=timeout, **kw)


def train(*args: str, timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    """`python training/train.py ARGS` in one process."""
    return run([sys.executable, str(REPO / "training/train.py"), *args], timeout=timeout, **kw)


def train_here(*args: str) -> subprocess.CompletedProcess:
    """training/train.py's main(ARGS) in this process, for the many short runs of a test: no
    interpreter and torch start-up each time. Returns its exit code and what it wrote to stderr
    (its one error line and its log). Use --workers 0: a forked worker's log would not be caught."""
    import contextlib
    import io
    import logging

    import torch

    from training import train as entry

    root, trainer_log = logging.getLogger(), logging.getLogger("training")
    saved = (root.handlers[:], root.level, trainer_log.level, torch.get_num_threads())
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            rc = entry.main(list(args))
    finally:
        for h in root.handlers[:]:
            if h not in saved[0]:
                root.removeHandler(h)
        for h in saved[0]:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(saved[1])
        trainer_log.setLevel(saved[2])
        torch.set_num_threads(saved[3])
    return subprocess.CompletedProcess(list(args), rc, "", err.getvalue())


def ranks(n: int, script: str | Path, *args: str, timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """n ranks of `script` on gloo, started directly rather than by torchrun: torchrun ends every
    rank once one fails, which would hide whether the others would have stopped by themselves."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(n):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n),
               "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script), *args], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    results = []
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"a rank did not stop within {timeout}s") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    return results
