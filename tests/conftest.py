"""Shared fixtures: the local web (127.0.0.1) and an "internal" host (127.0.0.2)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pipeline.localweb import LocalWeb, populate_faults, populate_images  # noqa: E402


@pytest.fixture
def web():
    w = LocalWeb("127.0.0.1").start()
    yield w
    w.stop()


@pytest.fixture
def internal():
    """Stands for a private service: tests assert it is never contacted."""
    w = LocalWeb("127.0.0.2").start()
    yield w
    w.stop()


@pytest.fixture
def corpus_input(tmp_path, web, internal):
    """A URL list of good images plus one row per failure mode; returns (path, rows, faults)."""
    rows = populate_images(web, 120, seed=3)
    faults = populate_faults(web, internal)
    all_rows = rows + list(faults.values())
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.Table.from_pylist(all_rows), path)
    return path, rows, faults


def build_args(urls, out, web, *extra: str) -> list[str]:
    return [
        "--urls", str(urls), "--out", str(out), "--allow-hosts", web.hostport, "--timeout", "1.5",
        "--retry-backoff", "0.05", "--max-body-bytes", "1000000", "--rows-per-task", "40",
        "--samples-per-shard", "32", "--extra-cols", "uid", *extra,
    ]


# -- reports in a real browser ---------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"


def chromium_flags(profile: Path) -> list[str]:
    """Headless Chromium, offline and quiet, with a profile of its own (tests run side by side)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `apt-get install chromium` (the CI script installs it)")
    return [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--virtual-time-budget=10000"]


def thumbnails_in_chromium(report: Path, profile: Path) -> tuple[int, int, str]:
    """(thumbnails on the page, thumbnails that decoded, the DOM) as dedup.report's check script counted
    them in headless Chromium."""
    import re
    import subprocess

    dom = subprocess.run([*chromium_flags(profile), "--dump-dom", report.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    m = re.search(r'id="thumb-check"[^>]*data-total="(\d+)"[^>]*data-ok="(\d+)"', dom) or \
        re.search(r'data-total="(\d+)" data-ok="(\d+)"', dom)
    assert m, dom[:2000]
    return int(m.group(1)), int(m.group(2)), dom


# -- object storage: moto's S3 server on 127.0.0.1 -------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory):
    """A real S3 endpoint (`moto_server`) on 127.0.0.1 for the whole session; stopped at its end."""
    import socket
    import subprocess
    import time

    server = Path(sys.executable).parent / "moto_server"
    if not server.exists():
        pytest.fail(f"{server}: missing; pip install 'moto[server]' (the test extra)")
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto_server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@dataclass
class S3Bucket:
    endpoint: str
    bucket: str

    def url(self, path: str = "") -> str:
        return f"s3://{self.bucket}/{path}" if path else f"s3://{self.bucket}"

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem()

    def keys(self) -> list[str]:
        """Every object in the bucket, relative to it (fresh listing)."""
        fs = self.fs()
        fs.invalidate_cache()
        return sorted(p[len(self.bucket) + 1:] for p in fs.find(self.bucket))


@pytest.fixture
def s3(moto_endpoint, monkeypatch):
    """A fresh bucket on the moto server; the environment points botocore (this process, its
    subprocesses and their Ray workers) at the server with dummy credentials, never at AWS."""
    import uuid

    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # No profile, no config file, no instance metadata: nothing may lead botocore elsewhere.
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3",
                "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()  # an instance made before these variables were set
    bucket = S3Bucket(moto_endpoint, f"cf-{uuid.uuid4().hex[:12]}")
    fs = bucket.fs()
    fs.connect()
    assert fs.s3.meta.endpoint_url == moto_endpoint, f"s3fs talks to {fs.s3.meta.endpoint_url}, not the moto server"
    fs.mkdir(bucket.bucket)
    yield bucket
    s3fs.S3FileSystem.clear_instance_cache()
