"""build_corpus on a two-node Ray cluster (ray.cluster_utils.Cluster, as Ray's own tests simulate
nodes on one machine), submitted with `ray job submit`; input and output on S3 (moto), so no
task relies on a disk the driver shares. Every step's tasks run on both nodes; then a second
run loses the second node mid-download and still writes the same shards, byte for byte."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, _free_port
from test_build_s3 import put_table, s3_manifest, s3_samples

from pipeline.localweb import Resource, populate_images

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
BIN = Path(sys.executable).parent
STEPS = ("read", "url_dedup", "url_gather", "download", "sha_keys", "sha_dedup", "settle", "write_shards")


@pytest.fixture
def cluster(s3, monkeypatch):
    """Head (1 CPU, dashboard for the jobs API) plus a second node (1 CPU), started after `s3` so
    that every Ray process inherits the moto endpoint; yields (cluster, dashboard URL)."""
    from ray.cluster_utils import Cluster

    # Ray >= 2.59 turns token authentication on for clusters it starts; the CLI that submits
    # must present the same token.
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))
    monkeypatch.setenv("PATH", f"{BIN}:{os.environ.get('PATH', '')}")  # `python` in the job: this venv's
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("NO_ALBUMENTATIONS_UPDATE", "1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")  # this process's Ray config reads RAY_AUTH_MODE again (as Ray's own tests do)
    AuthenticationTokenLoader.instance().reset_cache()
    dash = _free_port()
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dash})
    try:
        c.add_node(num_cpus=1)
        c.wait_for_nodes()
        yield c, f"http://127.0.0.1:{dash}"
    finally:
        c.shutdown()
        monkeypatch.undo()
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def submit(dashboard: str, *args: str) -> list[str]:
    return [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--working-dir", str(ROOT), "--",
            "python", "jobs/build_corpus.py", *args]


def submit_and_wait(dashboard: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`ray job submit` until the head's job agent takes it: right after the cluster starts, the
    dashboard answers before its agent is up, and refuses without starting anything."""
    deadline = time.monotonic() + 90
    while True:
        r = subprocess.run(submit(dashboard, *args), env=env, capture_output=True, text=True, timeout=300)
        if r.returncode == 0 or "No available agent to submit job" not in r.stderr or time.monotonic() > deadline:
            return r
        time.sleep(1)


def step_nodes(s3, prefix: str) -> dict[str, set[str]]:
    """{step: node ids its tasks ran on}, from the finished steps' summaries (OUT/_steps/STEP.json)."""
    fs = s3.fs()
    fs.invalidate_cache()
    out = {}
    for p in fs.glob(f"{s3.bucket}/{prefix}/_steps/*.json"):
        step = p.rsplit("/", 1)[-1][: -len(".json")]
        out[step] = {t["node"] for t in json.loads(fs.cat(p))}
    return out


def test_every_step_on_both_nodes_and_the_loss_of_one(tmp_path, s3, web, cluster):
    c, dashboard = cluster
    head, second = c.head_node.node_id, next(iter(c.worker_nodes)).node_id
    rows = populate_images(web, 30, seed=31)
    for i in range(6):  # a slow URL every 6 rows, so that the downloads are still running when a node goes
        rows.insert(i * 6, {"url": web.add(f"/slowish{i}.jpg", Resource(b"x", "image/jpeg", delay=1.5)),
                            "caption": "a slow one", "uid": f"s{i}", "label": ""})
    for k in range(3):  # three input files: three slices, so every per-slice step has three tasks
        put_table(s3, f"in/part-{k}.parquet", rows[k * 12:(k + 1) * 12])
    # 6 download tasks, 3 dedup buckets, 15 shards in 2 writer tasks (8 shards each).
    args = ["--urls", s3.url("in"), "--allow-hosts", web.hostport, "--timeout", "5", "--retry-backoff", "0.05",
            "--rows-per-task", "6", "--samples-per-shard", "2", "--dedup-buckets", "3", "--extra-cols", "uid",
            "--keep-parts"]
    env = dict(os.environ)

    t0 = time.monotonic()
    r = submit_and_wait(dashboard, *args, "--out", s3.url("both"), env=env)
    first_run = time.monotonic() - t0
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "rows in 36 = written 30 + dropped 0 + failed 6" in r.stdout, r.stdout[-3000:]
    nodes = step_nodes(s3, "both")
    assert set(STEPS) <= set(nodes), sorted(nodes)
    assert {step: nodes[step] for step in STEPS} == {step: {head, second} for step in STEPS}, (head, second)
    sizes, samples = s3_samples(s3, "both")
    assert len(samples) == 30 and len(sizes) == 15

    # The second node is lost (its raylet and workers SIGKILLed) while the downloads run: Ray
    # re-runs its tasks on the head, and the job writes exactly what the first run wrote.
    proc = subprocess.Popen(submit(dashboard, *args, "--out", s3.url("lost")), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    fs = s3.fs()
    deadline = time.monotonic() + 240
    done = 0
    while time.monotonic() < deadline and proc.poll() is None and done < 2:
        fs.invalidate_cache()
        done = len(fs.glob(f"{s3.bucket}/lost/_steps/download/*.json"))
        time.sleep(0.1)
    assert proc.poll() is None and done >= 2, "the job ended before the node could be removed"
    c.remove_node(next(iter(c.worker_nodes)), allow_graceful=False)
    fs.invalidate_cache()
    assert len(fs.glob(f"{s3.bucket}/lost/_steps/download/*.json")) < 6, "the node went after the downloads"
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-4000:]
    assert "rows in 36 = written 30 + dropped 0 + failed 6" in output, output[-3000:]
    nodes = step_nodes(s3, "lost")
    assert second in nodes["download"]  # it did run downloads before it went
    assert all(nodes[step] == {head} for step in STEPS[STEPS.index("download") + 1:]), nodes
    assert s3_manifest(s3, "lost") == s3_manifest(s3, "both")
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3.bucket}/both/shards", detail=False))
    assert names == sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3.bucket}/lost/shards", detail=False))
    for name in names:
        assert fs.cat(f"{s3.bucket}/lost/shards/{name}") == fs.cat(f"{s3.bucket}/both/shards/{name}"), name
    print(f"first run {first_run:.0f}s")
