"""build_corpus end to end (in-process executor), bad input, config, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, build_args
from shardcheck import read_with_openclip, read_with_webdataset

from jobs.build_corpus import main
from pipeline.localweb import Resource, encode, make_image

pytestmark = pytest.mark.timeout(180)

EXPECTED = {
    "not_found": ("failed", "http_404"),
    "server_error": ("failed", "http_500"),
    "transient_503": ("written", None),
    "slow": ("failed", "timeout"),
    "trickle": ("failed", "timeout"),
    "trickle_headers": ("failed", "timeout"),
    "truncated": ("failed", "truncated_body"),
    "html": ("failed", "not_an_image"),
    "empty": ("failed", "empty_body"),
    "random_bytes": ("failed", "not_an_image"),
    "bomb": ("failed", "decompression_bomb"),
    "huge_body": ("failed", "body_too_large"),
    "noai": ("dropped", "opted_out"),
    "tiny": ("dropped", "image_too_small"),
    "wide": ("dropped", "aspect_ratio_too_large"),
    "long_caption": ("written", None),
    "empty_caption": ("dropped", "empty_caption"),
    "loop": ("failed", "too_many_redirects"),
    "redirect_internal": ("failed", "blocked_address"),
    "dup_first": ("written", None),
    "dup_second": ("dropped", "duplicate_url"),
}


def manifest(out: Path) -> list[dict]:
    rows = []
    for p in sorted((out / "manifest").glob("*.parquet")):
        rows += pq.read_table(p).to_pylist()
    return rows


def written_keys(out: Path) -> list[str]:
    return [r["key"] for r in manifest(out) if r["status"] == "written"]


def test_end_to_end(tmp_path, web, internal, corpus_input, capsys):
    path, rows, faults = corpus_input
    # Same bytes under a second URL: an exact image duplicate, and a caption with control characters.
    table = pq.read_table(path).to_pylist()
    copy_url = web.add("/copy.jpg", web.resources[rows[0]["url"].split(web.hostport)[1]])
    table.append({"url": copy_url, "caption": "copy \x00of\tthe first\x1b image", "uid": "copy", "label": ""})
    pq.write_table(pa.Table.from_pylist(table), path)
    out = tmp_path / "corpus"

    assert main(build_args(path, out, web)) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    n = len(table)
    m = manifest(out)
    written = sum(r["status"] == "written" for r in m)
    dropped = sum(r["status"] == "dropped" for r in m)
    failed = sum(r["status"] == "failed" for r in m)
    assert printed[-1] == f"rows in {n} = written {written} + dropped {dropped} + failed {failed}"
    assert len(m) == n and sorted(r["row"] for r in m) == list(range(n))

    by_url_first = {}
    for r in m:
        by_url_first.setdefault(r["url"], []).append(r)
    for name, (status, reason) in EXPECTED.items():
        url = faults[name]["url"]
        rec = by_url_first[url][1] if name == "dup_second" else by_url_first[url][0]
        assert (rec["status"], rec["reason"]) == (status, reason), name
    copy = by_url_first[copy_url][0]
    assert (copy["status"], copy["reason"]) == ("dropped", "duplicate_image")
    assert sum(internal.hits.values()) == 0
    # every good image written
    assert all(by_url_first[r["url"]][0]["status"] == "written" for r in rows)

    # shards: contiguous, full but the last, sizes.json right, keys unique, readable by both readers
    sizes = json.loads((out / "shards" / "sizes.json").read_text())
    assert list(sizes) == [f"{i:05d}.tar" for i in range(len(sizes))]
    assert all(v == 32 for v in list(sizes.values())[:-1]) and 0 < list(sizes.values())[-1] <= 32
    assert sum(sizes.values()) == written
    samples = read_with_webdataset(out / "shards")
    keys = [k for k, _, _ in samples]
    assert len(keys) == len(set(keys)) == written and keys == sorted(keys)
    assert set(keys) == set(written_keys(out))
    meta = {k: j for k, _, j in samples}
    rec = meta[by_url_first[rows[5]["url"]][0]["key"]]
    assert rec["uid"] == rows[5]["uid"] and rec["url"] == rows[5]["url"] and len(rec["sha256"]) == 64
    assert rec["original_width"] > 0 and rec["width"] == 256
    long_key = by_url_first[faults["long_caption"]["url"]][0]["key"]
    assert len(meta[long_key]["caption"]) <= 1000
    assert all("\x00" not in t and "\t" not in t for _, t, _ in samples)
    assert read_with_openclip(out / "shards") == (written, written)  # every sample, once, in one pass

    stats = json.loads((out / "stats.json").read_text())
    assert stats["written"] + stats["dropped"] + stats["failed"] == stats["rows_in"] == n
    assert stats["reasons"]["failed:timeout"] == 3
    assert "image_size: 256" in (out / "config.yaml").read_text()
    assert not list(out.rglob("*.tmp-*"))

    # A rerun of a finished build changes nothing and downloads nothing.
    hits = sum(web.hits.values())
    before = {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")}
    assert main(build_args(path, out, web)) == 0
    assert sum(web.hits.values()) == hits
    assert {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")} == before


def test_long_captions_can_be_dropped_and_webp(tmp_path, web):
    rows = [{"url": web.add(f"/{i}.png", Resource(encode(make_image("circle", "red", (100, 90), random.Random(i)), "png"),
                                                  "image/png")),
             "caption": "a red circle " * (i * 40 + 1)} for i in range(3)]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "o"
    args = ["--urls", str(path), "--out", str(out), "--allow-hosts", web.hostport, "--long-captions", "drop",
            "--max-caption-chars", "100", "--encode-format", "webp", "--image-size", "48", "--executor", "local"]
    assert main(args) == 0
    fates = [(r["status"], r["reason"]) for r in manifest(out)]
    assert fates == [("written", None), ("dropped", "caption_too_long"), ("dropped", "caption_too_long")]
    samples = read_with_webdataset(out / "shards")
    assert samples[0][2]["width"] == 48


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "build_corpus.py"), *args],
                          capture_output=True, text=True, timeout=120, **kw)


@pytest.mark.parametrize("case", ["missing_file", "missing_column", "empty_file", "garbage", "no_rows",
                                  "bad_value", "bad_yaml_key", "empty_folder", "extra_col_clash",
                                  "extra_col_is_caption_col", "extra_col_is_list"])
def test_bad_input_is_one_line_exit_2(tmp_path, case):
    out = tmp_path / "out"
    f = tmp_path / "in.parquet"
    extra: list[str] = []
    if case == "missing_file":
        f = tmp_path / "nope.parquet"
        expect = "no such file"
    elif case == "missing_column":
        pq.write_table(pa.table({"link": ["http://x"], "caption": ["a b"]}), f)
        expect = "missing column(s) url"
    elif case == "empty_file":
        f = tmp_path / "in.csv"
        f.write_text("")
        expect = "empty file"
    elif case == "garbage":
        f.write_bytes(b"not a parquet file at all")
        expect = "cannot read as parquet"
    elif case == "no_rows":
        pq.write_table(pa.table({"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())}), f)
        expect = "no rows"
    elif case == "bad_value":
        pq.write_table(pa.table({"url": ["http://x"], "caption": ["a b"]}), f)
        extra = ["--resize-mode", "stretch"]
        expect = "--resize-mode must be"
    elif case == "bad_yaml_key":
        pq.write_table(pa.table({"url": ["http://x"], "caption": ["a b"]}), f)
        cfg = tmp_path / "c.yaml"
        cfg.write_text("image_sise: 3\n")
        extra = ["--config", str(cfg)]
        expect = "unknown setting 'image_sise'"
    elif case == "extra_col_clash":
        pq.write_table(pa.table({"url": ["http://x"], "caption": ["a b"], "sha256": ["mine"]}), f)
        extra = ["--extra-cols", "uid,sha256"]
        expect = "--extra-cols: 'sha256' clashes with a field clipforge writes"
    elif case == "extra_col_is_caption_col":
        pq.write_table(pa.table({"url": ["http://x"], "text": ["a b"]}), f)
        extra = ["--caption-col", "text", "--extra-cols", "text"]
        expect = "--extra-cols: 'text' clashes with --caption-col"
    elif case == "extra_col_is_list":
        f = tmp_path / "in.jsonl"
        f.write_text('{"url": "http://x", "caption": "a b", "tags": ["x", "y"]}\n')
        extra = ["--extra-cols", "tags"]
        expect = "column 'tags' holds list<item: string> values"
    else:
        f = tmp_path / "emptydir"
        f.mkdir()
        expect = "folder holds no"
    r = run_cli("--urls", str(f), "--out", str(out), "--executor", "local", *extra)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("build_corpus: error: ") and expect in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    if case not in ("bad_value", "bad_yaml_key", "extra_col_clash", "extra_col_is_caption_col"):
        assert str(f.name) in lines[0]
    assert not out.exists()


def test_yaml_config_and_flag_override(tmp_path, web):
    from pipeline.localweb import populate_images

    rows = populate_images(web, 6, seed=9)
    path = tmp_path / "in.csv"
    pcsv.write_csv(pa.Table.from_pylist(rows), path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"image-size: 40\nencode_format: webp\nallow_hosts: [{web.hostport}]\nexecutor: local\n")
    out = tmp_path / "o"
    assert main(["--config", str(cfg), "--urls", str(path), "--out", str(out), "--image-size", "24"]) == 0
    text = (out / "config.yaml").read_text()
    assert "image_size: 24" in text and "encode_format: webp" in text
    samples = read_with_webdataset(out / "shards")
    assert len(samples) == 6 and samples[0][2]["width"] == 24


def test_changed_settings_refused_on_resume(tmp_path, web):
    from pipeline.localweb import populate_images

    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(populate_images(web, 4, seed=5)), path)
    out = tmp_path / "o"
    base = ["--urls", str(path), "--out", str(out), "--allow-hosts", web.hostport, "--executor", "local"]
    assert main(base) == 0
    r = run_cli(*base, "--image-size", "128")
    assert r.returncode == 2 and "image_size: 256 -> 128" in r.stderr and "use a new --out" in r.stderr


def test_sigkill_midway_then_rerun_equals_uninterrupted(tmp_path, web):
    from pipeline.localweb import populate_images

    rows = populate_images(web, 60, seed=11)
    # Each task gets a slow URL so that the run is still going when it is killed.
    for i in range(6):
        rows.insert(i * 11, {"url": web.add(f"/slowish{i}.jpg", Resource(b"x", "image/jpeg", delay=0.6)),
                             "caption": "a slow one", "uid": f"s{i}", "label": ""})
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    args = build_args(path, tmp_path / "ref", web, "--rows-per-task", "11", "--samples-per-shard", "7",
                      "--executor", "local")
    assert main(args) == 0
    ref = tmp_path / "ref"

    out = tmp_path / "killed"
    kill_args = [a if a != str(ref) else str(out) for a in args]
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "build_corpus.py"), *kill_args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list((out / "_steps" / "download").glob("*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done = len(list((out / "_steps" / "download").glob("*.json")))
    assert 2 <= done < 6, f"kill landed at {done} of 6 tasks"
    assert not (out / "stats.json").exists()

    r = run_cli(*kill_args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"download: 6 tasks ({done} done before)" in r.stderr
    assert "taking over a stale lock" in r.stderr  # the killed run's lock: its process is gone
    assert written_keys(out) == written_keys(ref)
    for p in (ref / "shards").iterdir():
        assert (out / "shards" / p.name).read_bytes() == p.read_bytes(), p.name


def test_output_through_fsspec(tmp_path, web):
    """Everything goes through fsspec, so --out can be object storage (memory:// stands in)."""
    import fsspec

    from pipeline.localweb import populate_images
    from pipeline.shards import verify_shards

    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(populate_images(web, 10, seed=2)), path)
    out = "memory://fsspec-corpus"
    assert main(["--urls", str(path), "--out", out, "--allow-hosts", web.hostport, "--executor", "local",
                 "--samples-per-shard", "4"]) == 0
    fs = fsspec.filesystem("memory")
    assert verify_shards(fs, "/fsspec-corpus/shards", 4) == 10
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/fsspec-corpus/shards", detail=False)) == [
        "00000.parquet", "00000.tar", "00001.parquet", "00001.tar", "00002.parquet", "00002.tar", "sizes.json"]
    assert fs.exists("/fsspec-corpus/stats.json") and fs.exists("/fsspec-corpus/manifest/00000.parquet")
    fs.rm("/fsspec-corpus", recursive=True)


def test_demo_starts_from_a_clean_corpus(tmp_path, caplog):
    """Each demo run serves a new port, so a kept corpus would be refused on the second `make demo`."""
    import logging

    from jobs.demo import MARKER, fresh_start

    out = tmp_path / "demo-out"
    assert fresh_start(out) == [] and (out / MARKER).is_file()  # a new folder is claimed with the marker
    (out / "corpus" / "parts").mkdir(parents=True)
    (out / "corpus" / "run.json").write_text('{"allow_hosts": ["127.0.0.1:1"]}')
    (out / "audited").mkdir()
    (out / "evalsets").mkdir()
    (out / "filtering.json").write_text("{}")  # the last run's before/after figures go too
    with caplog.at_level(logging.INFO, logger="clipforge.demo"):
        removed = fresh_start(out)
    assert sorted(p.name for p in removed) == ["audited", "corpus", "evalsets", "filtering.json"]
    assert sorted(p.name for p in out.iterdir()) == [MARKER]
    assert len([r for r in caplog.records if "starts clean" in r.message]) == 1
    assert fresh_start(out) == []


@pytest.mark.parametrize("case", ["no_marker", "foreign_beside_marker", "symlink_inside", "symlink_out", "file_out"])
def test_demo_never_removes_what_it_did_not_write(tmp_path, case, capsys):
    # `fresh_start` removed run/, corpus/, ... under any --out: `--out ~/work` cost the user's ~/work/run.
    from jobs.demo import MARKER, main

    out = tmp_path / "work"
    out.mkdir()
    mine = out / "run" / "checkpoints"
    mine.mkdir(parents=True)
    (mine / "epoch_9.pt").write_bytes(b"weeks of training")
    if case == "foreign_beside_marker":
        (out / MARKER).write_text("")
        (out / "notes.txt").write_text("mine")
    elif case == "symlink_inside":
        (out / MARKER).write_text("")
        (out / "corpus").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    elif case == "symlink_out":
        (tmp_path / "link").symlink_to(out, target_is_directory=True)
        (out / MARKER).write_text("")
        out = tmp_path / "link"
    elif case == "file_out":
        out = tmp_path / "file"
        out.write_text("mine")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert main(["--out", str(out), "--skip-train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"demo: error: {out}: --out"), err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert (mine / "epoch_9.pt").read_bytes() == b"weeks of training"


@pytest.mark.parametrize("args, why", [(["--images", "0"], "--images must be at least 1"),
                                       (["--train-samples", "-5"], "--train-samples must be at least 1"),
                                       (["--dedup-within", "embedding:0.95"], "--dedup-within takes text, image")])
def test_demo_bad_arguments_are_refused_before_anything_runs(tmp_path, args, why, capsys):
    # --dedup-within was refused only at step 5, three minutes in; --images 0 ended in a ZeroDivisionError.
    from jobs.demo import main

    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "out"), *args])
    assert exc.value.code == 2 and why in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["csv", "tsv"])
def test_csv_and_tsv_values_are_read_as_written(tmp_path, kind):
    from pipeline.readers import read_urls

    f = tmp_path / f"in.{kind}"
    if kind == "csv":
        f.write_text('url,caption,uid\nhttp://h/a.jpg,1.50,000123\nhttp://h/b.jpg,"a, b",7\n')
        expect = [("1.50", "000123"), ("a, b", "7")]
    else:
        f.write_text('url\tcaption\tuid\nhttp://h/a.jpg\t1.50\t000123\nhttp://h/b.jpg\t"Best" photo ever\t7\n')
        expect = [("1.50", "000123"), ('"Best" photo ever', "7")]
    t = read_urls(str(f), "url", "caption", ("uid",))
    assert list(zip(t.column("caption").to_pylist(), t.column("uid").to_pylist(), strict=True)) == expect


def _small_build(tmp_path, web, rows_per_task: int, keep_parts: bool = False) -> tuple[list[str], Path]:
    """Build 6 local-web images in tasks of `rows_per_task` rows, in-process; returns (args, out)."""
    from pipeline.localweb import populate_images

    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(populate_images(web, 6, seed=4)), path)
    out = tmp_path / "o"
    args = ["--urls", str(path), "--out", str(out), "--allow-hosts", web.hostport, "--executor", "local",
            "--rows-per-task", str(rows_per_task), *(["--keep-parts"] if keep_parts else [])]
    assert main(args) == 0
    return args, out


def _unsettle(out: Path) -> None:
    """Forget that the steps after the downloads ran (as if killed right after them)."""
    (out / "stats.json").unlink()
    for step in ("sha_keys", "sha_dedup", "settle", "write_shards"):
        (out / "_steps" / f"{step}.json").unlink()
        shutil.rmtree(out / "_steps" / step)


@pytest.mark.parametrize("damage", ["row_missing", "row_twice", "part_missing"])
def test_damaged_parts_fail_the_accounting_check_in_one_line(tmp_path, web, damage):
    args, out = _small_build(tmp_path, web, rows_per_task=3, keep_parts=True)
    _unsettle(out)
    part = out / "parts" / "00001.parquet"
    records = pq.read_table(part).to_pylist()
    if damage == "part_missing":
        part.unlink()
        expect = "00001.parquet: part file missing"
    else:
        records = records[:-1] if damage == "row_missing" else records + records[:1]
        pq.write_table(pa.Table.from_pylist(records, schema=pq.read_schema(part)), part)
        expect = "00001.parquet: rows 3..5 are not there once each"
    r = run_cli(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines[-1].startswith("build_corpus: error: ") and expect in lines[-1], lines[-1]


def test_resume_reads_one_record_per_finished_step(tmp_path, web, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    args, out = _small_build(tmp_path, web, rows_per_task=2, keep_parts=True)
    _unsettle(out)
    (out / "_steps" / "settle").mkdir()
    (out / "_steps" / "settle" / "00000.json.tmp-123-0123abcd").write_text("{}")  # a killed write of ours
    opened = []
    real_open = LocalFileSystem._open
    monkeypatch.setattr(LocalFileSystem, "_open",
                        lambda self, p, *a, **kw: opened.append(str(p)) or real_open(self, p, *a, **kw))
    assert main(args) == 0
    reads = [p for p in opened if "/_steps/download" in p]
    assert reads == [str(out / "_steps" / "download.json")], reads  # not one per task
    assert not (out / "_steps" / "settle" / "00000.json.tmp-123-0123abcd").exists()


def test_scratch_is_removed_after_success_and_a_rerun_is_a_no_op(tmp_path, web, capsys):
    args, out = _small_build(tmp_path, web, rows_per_task=2)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "manifest", "run.json", "shards", "stats.json"]
    capsys.readouterr()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    hits = sum(web.hits.values())
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "is complete" in printed and "nothing to do" in printed
    assert printed.strip().splitlines()[-1] == "rows in 6 = written 6 + dropped 0 + failed 0"
    assert sum(web.hits.values()) == hits
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != "run.json"} == {
        p: m for p, m in before.items() if p.name != "run.json"}


def test_stats_count_this_run_and_sum_stage_counters(tmp_path, web):
    from pipeline.localweb import populate_images

    rows = populate_images(web, 4, seed=6)
    rows[0]["caption"] = "a red\x1b circle"
    rows[1]["caption"] = "a long caption " * 20
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    out = tmp_path / "o"
    args = ["--urls", str(path), "--out", str(out), "--allow-hosts", web.hostport, "--executor", "local",
            "--rows-per-task", "2", "--max-caption-chars", "100", "--keep-parts"]
    assert main(args) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["stages"]["caption_cleaner:caption_cleaned"] == 1
    assert stats["stages"]["caption_cleaner:caption_truncated"] == 1
    assert stats["rows_this_run"] == 4 and stats["images_this_run"] == 4 and stats["images_per_second"] > 0
    # CPU by stage and the workers' peak memory (benchmarks/ingest.py prints them): this run's tasks.
    cpu = stats["cpu_seconds"]
    assert set(cpu) == {"fetch", "resize", "write_parts", "write_shards", "download_task"}
    assert cpu["resize"] > 0 and cpu["download_task"] >= cpu["resize"]
    assert 50 < stats["worker_peak_rss_mb"] < 4096
    # A resumed build whose downloads were all done before does no download work: its rate is
    # zero, not all runs' images over its seconds.
    _unsettle(out)
    assert main(args) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows_this_run"] == 0 and stats["images_per_second"] == 0
    assert stats["cpu_seconds"]["resize"] == 0  # nothing resized by this run
    assert stats["stages"]["caption_cleaner:caption_truncated"] == 1


@pytest.mark.parametrize("relative", ["--urls", "--out"])
def test_relative_paths_refused_under_ray_job_submit(tmp_path, relative):
    f = tmp_path / "in.parquet"
    pq.write_table(pa.table({"url": ["http://x"], "caption": ["a b"]}), f)
    urls, out = ("in.parquet", str(tmp_path / "o")) if relative == "--urls" else (str(f), "o")
    r = run_cli("--urls", urls, "--out", out, "--executor", "local", cwd=tmp_path,
                env={**os.environ, "RAY_JOB_CONFIG_JSON_ENV_VAR": '{"runtime_env": {"working_dir": "x"}}'})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith(f"build_corpus: error: {relative}: ") and "absolute path" in lines[0]
    assert not (tmp_path / "o").exists()


def shard_images(shards: Path) -> dict[str, tuple[str, dict, object]]:
    """{url: (caption, json, PIL image)} of every sample in the shards."""
    import webdataset as wds

    ds = wds.WebDataset(sorted(str(p) for p in shards.glob("*.tar")), shardshuffle=False).decode("pil")
    return {s["json"]["url"]: (s["txt"], s["json"], s.get("jpg") or s.get("webp")) for s in ds}


@pytest.mark.parametrize("layout", ["tsv", "glob", "folder", "renamed_cols"])
def test_input_layouts_and_column_names(tmp_path, web, layout):
    from pipeline.localweb import populate_images

    rows = populate_images(web, 6, seed=12)
    decoys = populate_images(web, 2, seed=13, prefix="/decoy")  # must not be read
    src = tmp_path / "in"
    src.mkdir()
    first, second = pa.Table.from_pylist(rows[:3]), pa.Table.from_pylist(rows[3:])
    extra: list[str] = []
    if layout == "tsv":
        urls = src / "in.tsv"
        urls.write_text("url\tcaption\n" + "".join(f"{r['url']}\t{r['caption']}\n" for r in rows))
    elif layout == "glob":  # files of two formats match; a third file beside them does not
        (src / "part-0.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:3]) + "\n")
        pcsv.write_csv(second, src / "part-1.csv")
        pq.write_table(pa.Table.from_pylist(decoys), src / "other.parquet")
        urls = src / "part-*"
    elif layout == "folder":  # every list in the folder is read; other files are skipped
        pq.write_table(first, src / "a.parquet")
        (src / "b.tsv").write_text("url\tcaption\n" + "".join(f"{r['url']}\t{r['caption']}\n" for r in rows[3:]))
        (src / "notes.txt").write_text("not a URL list\n")
        urls = src
    else:  # the default-named columns hold decoys: reading them instead would write other samples
        table = pa.table({"image_link": [r["url"] for r in rows], "alt_text": [r["caption"] for r in rows],
                          "url": [decoys[i % 2]["url"] for i in range(6)], "caption": ["a decoy caption"] * 6})
        urls = src / "in.parquet"
        pq.write_table(table, urls)
        extra = ["--url-col", "image_link", "--caption-col", "alt_text"]
    out = tmp_path / "o"
    assert main(["--urls", str(urls), "--out", str(out), "--allow-hosts", web.hostport, "--executor", "local",
                 "--image-size", "32", "--rows-per-task", "4", *extra]) == 0
    assert len(manifest(out)) == len(rows)
    assert {u: c for u, (c, _, _) in shard_images(out / "shards").items()} == {r["url"]: r["caption"] for r in rows}


@pytest.mark.parametrize("mode", ["keep_ratio", "border"])
def test_resize_modes_keep_the_aspect_ratio(tmp_path, web, mode):
    import numpy as np
    from PIL import Image

    # Solid dark images, so border's white padding is told apart from the picture.
    sizes = {(160, 120): (80, 60), (120, 200): (60, 100)}  # original -> keep_ratio: short side 60, aspect kept
    rows = []
    for i, (w, h) in enumerate(sizes):
        body = encode(Image.new("RGB", (w, h), (30 + 40 * i, 60, 90)), "png")
        rows.append({"url": web.add(f"/r{i}.png", Resource(body, "image/png")), "caption": f"a dark {w}x{h} box"})
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    out = tmp_path / "o"
    assert main(["--urls", str(path), "--out", str(out), "--allow-hosts", web.hostport, "--executor", "local",
                 "--image-size", "60", "--resize-mode", mode]) == 0
    got = shard_images(out / "shards")
    assert len(got) == len(rows)
    for row, ((w, h), kept) in zip(rows, sizes.items(), strict=True):
        _, meta, img = got[row["url"]]
        assert (meta["original_width"], meta["original_height"]) == (w, h)
        if mode == "keep_ratio":
            assert img.size == (meta["width"], meta["height"]) == kept
            continue
        # border: the long side scaled to 60, the short side padded white to a 60x60 square
        assert img.size == (meta["width"], meta["height"]) == (60, 60)
        a = np.asarray(img.convert("L"), dtype=float)
        pad_rows, pad_cols = int((a.mean(axis=1) > 200).sum()), int((a.mean(axis=0) > 200).sum())
        content = round(min(w, h) * 60 / max(w, h))  # 45 and 36
        if w > h:
            assert pad_cols == 0 and abs(pad_rows - (60 - content)) <= 2, (pad_rows, pad_cols)
        else:
            assert pad_rows == 0 and abs(pad_cols - (60 - content)) <= 2, (pad_rows, pad_cols)
