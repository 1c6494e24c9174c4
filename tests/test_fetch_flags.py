"""Numeric flags of the fetch and image stages: a meaningless value is one line, exit 2, nothing written."""

from __future__ import annotations

import pytest

from jobs.build_corpus import main
from pipeline.config import BuildConfig, parse_config

pytestmark = pytest.mark.timeout(60)

BAD = [
    ("--timeout", "inf"), ("--timeout", "nan"), ("--timeout", "0"), ("--timeout", "-1"), ("--timeout", "1e9"),
    ("--retries", "-1"), ("--retries", "inf"), ("--retries", "1.5"), ("--retries", "1000"),
    ("--retry-backoff", "-0.1"), ("--retry-backoff", "inf"), ("--retry-backoff", "nan"), ("--retry-backoff", "1e6"),
    ("--max-body-bytes", "0"), ("--max-body-bytes", "-5"), ("--max-body-bytes", "inf"),
    ("--max-redirects", "-1"), ("--max-redirects", "nan"), ("--max-redirects", "1000"),
    ("--max-image-pixels", "0"), ("--max-image-pixels", "-1"), ("--max-image-pixels", "inf"),
    ("--max-decode-bytes", "0"), ("--max-decode-bytes", "-1"), ("--max-decode-bytes", "inf"),
    ("--max-decode-bytes", "512"),  # megabytes meant: every image would be refused
    ("--image-size", "0"), ("--image-size", "-1"), ("--image-size", "inf"), ("--image-size", "nan"),
    ("--encode-quality", "0"), ("--encode-quality", "101"), ("--encode-quality", "inf"), ("--encode-quality", "nan"),
    ("--tasks-per-cpu", "0"), ("--tasks-per-cpu", "17"),
]


@pytest.mark.parametrize("flag, value", BAD)
def test_meaningless_value_is_one_line_exit_2(tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    # The input does not exist either: the flag must be what is reported, before the input is read.
    assert main(["--urls", str(tmp_path / "in.parquet"), "--out", str(out), "--executor", "local",
                 flag, value]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("build_corpus: error: ") and flag in lines[0], lines
    assert "Traceback" not in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("key, value", [("timeout", ".inf"), ("retry_backoff", ".nan"), ("image_size", ".inf"),
                                        ("max_decode_bytes", ".inf"), ("retries", "2.5"), ("max_redirects", "-.inf")])
def test_meaningless_yaml_value_is_one_line_exit_2(tmp_path, capsys, key, value):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"{key}: {value}\n")
    out = tmp_path / "out"
    assert main(["--config", str(cfg), "--urls", str(tmp_path / "in.parquet"), "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--" + key.replace("_", "-") in lines[0], lines
    assert not out.exists()


def test_zero_is_kept_where_it_means_something():
    cfg = parse_config(BuildConfig, ["--urls", "x", "--out", "y", "--retries", "0", "--retry-backoff", "0",
                                     "--max-redirects", "0", "--max-decode-bytes", str(64 * 2**20)])
    fetch = cfg.fetch_config()
    assert (fetch.retries, fetch.retry_backoff, fetch.max_redirects) == (0, 0.0, 0)
    assert cfg.max_decode_bytes == 64 * 2**20
