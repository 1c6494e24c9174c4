"""Shared fixtures: the local web (127.0.0.1) and an "internal" host (127.0.0.2)."""

from __future__ import annotations

import os
import sys
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
