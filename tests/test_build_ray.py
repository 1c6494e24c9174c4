"""build_corpus on Ray: through `ray job submit` against a real `ray start --head`, and
with a Ray worker and the driver SIGKILLed midway (slow: these start Ray clusters)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, build_args
from shardcheck import read_with_openclip, read_with_webdataset
from test_build import written_keys

from jobs.build_corpus import main
from pipeline.localweb import Resource, populate_images

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env(token: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
           "NO_ALBUMENTATIONS_UPDATE": "1"}
    if token:
        # Ray >= 2.59 turns token authentication on for clusters it starts; the
        # cluster and the CLI that submits to it must share the token.
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return env


def start_head(env: dict[str, str], dash: int) -> subprocess.Popen:
    """`ray start --head --block` as a child: stopping it stops this cluster only (`ray stop`
    would end every Ray on the machine, other people's included)."""
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", f"--port={free_port()}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
         "--disable-usage-stats"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise AssertionError(f"ray start failed: {head.stderr.read()[-3000:]}")
        try:  # the jobs API answers once the dashboard is up (401 without the token: up too)
            with urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2):
                break
        except urllib.error.HTTPError:
            break
        except OSError:
            time.sleep(0.5)
    else:
        stop_head(head)
        raise AssertionError("the Ray dashboard did not come up")
    return head


def job_submit(env: dict[str, str], dash: int, *args: str) -> subprocess.CompletedProcess:
    """`ray job submit` until the head's job agent takes it (the dashboard answers before its agent is
    up, and refuses without starting anything)."""
    deadline = time.monotonic() + 90
    while True:
        r = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}",
                            "--working-dir", str(ROOT), "--", "python", *args],
                           env=env, capture_output=True, text=True, timeout=300)
        if r.returncode == 0 or "No available agent" not in r.stdout + r.stderr or time.monotonic() > deadline:
            return r
        time.sleep(1)


def stop_head(head: subprocess.Popen) -> None:
    head.send_signal(signal.SIGTERM)  # `ray start --block` ends the processes it started
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


def slow_input(tmp_path: Path, web, n: int = 80, every: int = 10, delay: float = 0.7) -> Path:
    rows = populate_images(web, n, seed=21)
    for i in range(n // every):
        rows.insert(i * (every + 1), {"url": web.add(f"/slowish{i}.jpg", Resource(b"x", "image/jpeg", delay=delay)),
                                      "caption": "a slow one", "uid": f"s{i}", "label": ""})
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_ray_job_submit(tmp_path, web, internal, corpus_input):
    path, rows, faults = corpus_input
    out = tmp_path / "corpus"
    dash = free_port()
    env = ray_env(token=secrets.token_hex(16))
    head = start_head(env, dash)
    try:
        r = job_submit(env, dash, "jobs/build_corpus.py", *build_args(path, out, web))
        # A relative --out would land in Ray's unpacked copy of the working dir: refused.
        rel = job_submit(env, dash, "jobs/build_corpus.py", "--urls", str(path), "--out", "corpus-rel")
    finally:
        stop_head(head)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert rel.returncode != 0 and "build_corpus: error: --out: 'corpus-rel' is relative" in rel.stdout + rel.stderr, \
        (rel.stdout + rel.stderr)[-3000:]
    n = len(rows) + len(faults)
    keys = written_keys(out)
    lines = [ln.strip() for ln in r.stdout.splitlines()]
    assert f"rows in {n} = written {len(keys)} + dropped 5 + failed 13" in lines, r.stdout[-3000:]
    assert len(read_with_webdataset(out / "shards")) == len(keys)
    assert read_with_openclip(out / "shards")[1] >= len(keys)
    assert sum(internal.hits.values()) == 0


def _ray_task_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(b"ray::download"):
                pids.append(int(proc.name))
    return pids


def test_killed_ray_worker_and_killed_driver_resume_exactly(tmp_path, web):
    path = slow_input(tmp_path, web)
    ref = tmp_path / "ref"
    common = ["--rows-per-task", "11", "--samples-per-shard", "9"]
    assert main(build_args(path, ref, web, *common, "--executor", "local")) == 0

    # 1. a Ray worker dies mid-task: Ray re-runs the task, the result is the same
    out = tmp_path / "worker"
    cli = [sys.executable, str(ROOT / "jobs" / "build_corpus.py"), *build_args(path, out, web, *common),
           "--num-cpus", "2"]
    proc = subprocess.Popen(cli, env=ray_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        pids = _ray_task_pids()
        if pids and list((out / "_steps" / "download").glob("*.json")):
            os.kill(pids[0], signal.SIGKILL)
            killed = pids[0]
        time.sleep(0.05)
    output, _ = proc.communicate(timeout=300)
    assert killed is not None, "no Ray task process found to kill"
    assert proc.returncode == 0, output[-3000:]
    assert written_keys(out) == written_keys(ref)
    for p in (ref / "shards").iterdir():
        assert (out / "shards" / p.name).read_bytes() == p.read_bytes(), p.name

    # 2. the driver dies (SIGKILL, no cleanup): the rerun finishes the rest
    out = tmp_path / "driver"
    cli = [sys.executable, str(ROOT / "jobs" / "build_corpus.py"), *build_args(path, out, web, *common),
           "--num-cpus", "2"]
    proc = subprocess.Popen(cli, env=ray_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((out / "_steps" / "download").glob("*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done = len(list((out / "_steps" / "download").glob("*.json")))
    assert 2 <= done < 8
    r = subprocess.run(cli, env=ray_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert written_keys(out) == written_keys(ref)
    for p in (ref / "shards").iterdir():
        assert (out / "shards" / p.name).read_bytes() == p.read_bytes(), p.name
