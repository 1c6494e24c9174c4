"""What a hostile review of the job layer found (each test failed before its fix)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT

from jobs.audit_overlap import main as audit_main
from jobs.build_corpus import main as build_main
from pipeline.localweb import populate_images, write_imagefolder

pytestmark = pytest.mark.timeout(180)


def _args(urls, out, web, *extra):
    return ["--urls", str(urls), "--out", str(out), "--allow-hosts", web.hostport, "--executor", "local",
            "--rows-per-task", "4", "--samples-per-shard", "4", *extra]


def _last(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_a_task_whose_rows_are_all_decided_before_download_with_extra_columns(tmp_path, web, capsys):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"url": ["http://x/a.jpg", "http://x/b.jpg"], "caption": ["", ""], "uid": ["a", "b"]}),
                   path)
    assert build_main(_args(path, tmp_path / "o", web, "--extra-cols", "uid")) == 0  # was: array_take (string, null)
    assert _last(capsys) == "rows in 2 = written 0 + dropped 2 + failed 0"


def test_bucket_reading_imports_what_it_uses(tmp_path):
    """In a fresh interpreter (a Ray worker that ran nothing else): pa.compute was not imported."""
    code = ("import sys, numpy as np, fsspec; sys.path.insert(0, sys.argv[1]);"
            "from pipeline.exact_dedup import write_keys, _read_groups, KEYS_SCHEMA;"
            "fs = fsspec.filesystem('file'); p = sys.argv[2];"
            "write_keys(fs, p, ['a', 'b', 'a'], np.arange(3), 2);"
            "print(sum(_read_groups(fs, p, 'bucket', b, KEYS_SCHEMA).num_rows for b in (0, 1)))")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tmp_path / "k.parquet")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "3", r.stderr[-2000:]


def test_a_quoted_newline_in_the_first_csv_row(tmp_path, web, capsys):
    rows = populate_images(web, 3, seed=40)
    path = tmp_path / "in.csv"
    path.write_text("url,caption\n" + "".join(f'{r["url"]},"a photo\nof thing {i}"\n' for i, r in enumerate(rows)))
    assert build_main(_args(path, tmp_path / "o", web)) == 0
    assert _last(capsys) == "rows in 3 = written 3 + dropped 0 + failed 0"
    nh = tmp_path / "nh.csv"  # no header, a quoted comma in the first row
    nh.write_text("".join(f'"a, photo {i} here",{r["url"]}\n' for i, r in enumerate(rows)))
    assert build_main(_args(nh, tmp_path / "o2", web, "--no-header", "--url-col", "1", "--caption-col", "0")) == 0
    assert _last(capsys) == "rows in 3 = written 3 + dropped 0 + failed 0"


def test_a_fixed_input_after_a_failed_read_is_not_refused(tmp_path, web, capsys):
    rows = populate_images(web, 6, seed=41)
    path = tmp_path / "in.tsv"
    good = "url\tcaption\n" + "".join(f"{r['url']}\t{r['caption']}\n" for r in rows)
    path.write_bytes(good.encode() + b"\xff\xfe\tbad line\n" + b"x\ty\tz\n")
    out = tmp_path / "o"
    assert build_main(_args(path, out, web)) == 2
    path.write_text(good)
    capsys.readouterr()
    assert build_main(_args(path, out, web)) == 0  # was: refused, "holds a build_corpus run of other input"
    assert _last(capsys) == "rows in 6 = written 6 + dropped 0 + failed 0"


def test_extra_columns_of_other_types_in_other_files(tmp_path, web, capsys):
    rows = populate_images(web, 4, seed=42)
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.table({"url": [r["url"] for r in rows[:2]], "caption": [r["caption"] for r in rows[:2]],
                             "uid": [1, 2]}), folder / "a.parquet")
    pq.write_table(pa.table({"url": [r["url"] for r in rows[2:]], "caption": [r["caption"] for r in rows[2:]],
                             "uid": ["x", "y"]}), folder / "b.parquet")
    assert build_main(_args(folder, tmp_path / "o", web, "--extra-cols", "uid", "--samples-per-shard", "100")) == 0
    assert _last(capsys) == "rows in 4 = written 4 + dropped 0 + failed 0"
    t = pq.read_table(tmp_path / "o" / "shards" / "00000.parquet")
    assert t.column("uid").to_pylist() == ["1", "2", "x", "y"]


def test_a_resumed_run_reads_back_shards_it_did_not_write(tmp_path, web, capsys):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(populate_images(web, 12, seed=43)), path)
    out = tmp_path / "o"
    args = _args(path, out, web, "--keep-parts")
    assert build_main(args) == 0
    (out / "stats.json").unlink()
    shard = out / "shards" / "00001.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    capsys.readouterr()
    assert build_main(args) == 1  # was: rc 0 over a truncated shard
    err = capsys.readouterr().err.strip().splitlines()
    assert "00001.tar" in err[-1] and err[-1].startswith("build_corpus: error:"), err[-1]


@pytest.mark.parametrize("damage", ["stats_garbage", "step_garbage", "buckets"])
def test_damaged_records_are_one_line(tmp_path, web, capsys, damage):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(populate_images(web, 4, seed=44)), path)
    out = tmp_path / "o"
    args = _args(path, out, web, "--keep-parts")
    assert build_main(args) == 0
    if damage == "stats_garbage":
        (out / "stats.json").write_text("garbage")
        want = 1
    elif damage == "step_garbage":
        (out / "stats.json").unlink()
        (out / "_steps" / "read.json").write_text("[1, 2, 3]")
        want = 0  # the per-task markers say what is done
    else:
        (out / "stats.json").unlink()
        run = json.loads((out / "run.json").read_text())
        (out / "run.json").write_text(json.dumps({**run, "buckets": "x"}))
        want = 1
    capsys.readouterr()
    assert build_main(args) == want
    err = [ln for ln in capsys.readouterr().err.splitlines() if "Traceback" in ln or "error:" in ln]
    assert not any("Traceback" in ln for ln in err) and len(err) == (0 if want == 0 else 1), err


def test_out_inside_the_input_glob_is_not_read_as_input(tmp_path, web, capsys):
    folder = tmp_path / "g"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(populate_images(web, 4, seed=45)), folder / "in.parquet")
    args = _args(f"{folder}/**/*.parquet", folder / "out", web, "--keep-parts")
    assert build_main(args) == 0
    (folder / "out" / "stats.json").unlink()
    capsys.readouterr()
    assert build_main(args) == 0  # was: _dups/url-00000.parquet: missing column(s) url, ...
    assert _last(capsys) == "rows in 4 = written 4 + dropped 0 + failed 0"


def test_audit_out_inside_the_corpus_is_refused(tmp_path, web, capsys):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(populate_images(web, 4, seed=46)), path)
    corpus = tmp_path / "c"
    assert build_main(_args(path, corpus, web)) == 0
    ev = tmp_path / "ev"
    write_imagefolder(ev, per_class=1)
    capsys.readouterr()
    for out in (corpus / "shards" / "sub", corpus / "manifest" / "x"):
        assert audit_main(["--corpus", str(corpus), "--eval", f"e={ev}", "--out", str(out), "--executor",
                           "local"]) == 2
        assert "outside the corpus folder" in capsys.readouterr().err
        assert not out.exists()


def test_build_eval_outputs_are_the_same_on_every_run(tmp_path, web):
    from PIL import Image

    from dedup.synth import TRANSFORMS
    from pipeline.localweb import Resource

    ev = tmp_path / "ev"
    items = write_imagefolder(ev, per_class=1, seed=5)
    rows = populate_images(web, 6, seed=47)
    for i, item in enumerate(items[:6]):
        rows.append({"url": web.add(f"/copy{i}.jpg", Resource(TRANSFORMS["jpeg_q50"](Image.open(item).convert("RGB")),
                                                              "image/jpeg")), "caption": f"a copy {i} of it"})
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    outs = []
    for k in range(2):
        out = tmp_path / f"o{k}"
        assert build_main(_args(path, out, web, "--rows-per-task", "100", "--threads", "8", "--eval", f"e={ev}",
                                "--overlap-kinds", "image")) == 0
        outs.append(out)
    assert (outs[0] / "audit" / "overlap.parquet").read_bytes() == (outs[1] / "audit" / "overlap.parquet").read_bytes()
    assert pq.read_table(outs[0] / "audit" / "overlap.parquet").num_rows >= 6


def test_img2dataset_layout_problems_are_named(tmp_path, capsys):
    import random as rnd

    from dedup.synth import random_image, write_corpus
    from pipeline.localweb import encode

    rng = rnd.Random(1)
    corpus = tmp_path / "i2d"
    write_corpus(str(tmp_path / "c"), [(encode(random_image(rng)[0], "jpg"), f"cap {i} here", {}) for i in range(6)], 3)
    corpus.mkdir()
    for name in ("00000.tar", "00001.tar"):
        (corpus / name).write_bytes((tmp_path / "c" / "shards" / name).read_bytes())
    (corpus / "00000_stats.json").write_text(json.dumps({"successes": 3}))
    ev = tmp_path / "ev"
    write_imagefolder(ev, per_class=1)
    argv = ["--corpus", str(corpus), "--eval", f"e={ev}", "--out", str(tmp_path / "o"), "--executor", "local"]
    assert audit_main(argv) == 2  # was: 00001.tar skipped without a word
    assert "00001.tar: no 00001_stats.json" in capsys.readouterr().err
    (corpus / "00001_stats.json").write_text(json.dumps({"successes": 2.7}))
    assert audit_main(argv) == 2
    assert "00001_stats.json: successes 2.7" in capsys.readouterr().err


def test_a_file_name_with_a_bracket_and_a_long_jsonl_line(tmp_path, web, capsys):
    rows = populate_images(web, 3, seed=48)
    path = tmp_path / "laion[part1].jsonl"
    rows[1]["caption"] = "long " * 300_000  # a 1.5 MB record
    path.write_text("".join(json.dumps({"url": r["url"], "caption": r["caption"]}) + "\n" for r in rows))
    assert build_main(_args(path, tmp_path / "o", web, "--long-captions", "drop")) == 0
    assert _last(capsys) == "rows in 3 = written 2 + dropped 1 + failed 0"


def test_empty_and_null_urls_are_bad_urls_not_duplicates(tmp_path, web, capsys):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"url": ["", "", None, None], "caption": ["a b c"] * 4}), path)
    out = tmp_path / "o"
    assert build_main(_args(path, out, web)) == 0
    m = pq.read_table(out / "manifest").to_pylist()
    assert [(r["status"], r["reason"]) for r in m] == [("failed", "bad_url")] * 4
    assert [r["url"] for r in m] == ["", "", None, None]


def test_killed_driver_workers_found_by_their_session(tmp_path):
    """A worker that started just before the driver died is ended too (the reaper's last sweep)."""
    code = ("import ray, os, sys, time; sys.path.insert(0, sys.argv[1]);"
            "from pipeline.executor import RayExecutor;"
            "ex = RayExecutor(num_cpus=1).__enter__();"
            "f = ray.remote(lambda: (os.getpid(), time.sleep(60)));"
            "ref = f.remote(); time.sleep(3);"
            "print(ray._private.worker._global_node.session_name, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(ROOT)], stdout=subprocess.PIPE, text=True)
    session = proc.stdout.readline().strip()
    from pipeline.reaper import _session_pids

    before = _session_pids(session, -1)
    assert before, "no process of the session found"
    proc.kill()
    proc.wait()
    import time

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _session_pids(session, -1):
        time.sleep(0.5)
    assert not _session_pids(session, -1)


def test_audit_says_nothing_to_do_on_stdout(tmp_path, web, capsys):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(populate_images(web, 4, seed=49)), path)
    corpus = tmp_path / "c"
    assert build_main(_args(path, corpus, web)) == 0
    ev = tmp_path / "ev"
    write_imagefolder(ev, per_class=1)
    argv = ["--corpus", str(corpus), "--eval", f"e={ev}", "--out", str(tmp_path / "a"), "--executor", "local"]
    assert audit_main(argv) == 0
    capsys.readouterr()
    assert audit_main(argv) == 0
    out = capsys.readouterr().out
    assert "is complete; nothing to do" in out and out.strip().splitlines()[-1].startswith("rows in 4 =")


def test_audit_of_a_repaired_corpus_starts_over(tmp_path, web, capsys):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(populate_images(web, 8, seed=50)), path)
    corpus = tmp_path / "c"
    assert build_main(_args(path, corpus, web)) == 0
    shard = corpus / "shards" / "00001.tar"
    good = shard.read_bytes()
    shard.write_bytes(good[:600])
    ev = tmp_path / "ev"
    write_imagefolder(ev, per_class=1)
    argv = ["--corpus", str(corpus), "--eval", f"e={ev}", "--out", str(tmp_path / "a"), "--executor", "local"]
    assert audit_main(argv) == 2
    shard.write_bytes(good)
    capsys.readouterr()
    assert audit_main(argv) == 0  # was: refused, corpus_digest changed
    assert _last(capsys) == "rows in 8 = written 8 + dropped 0 + failed 0"


def test_paths_spelled_differently_name_the_same_input(tmp_path, web, capsys):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(populate_images(web, 4, seed=51)), path)
    out = tmp_path / "o"
    assert build_main(_args(path, out, web, "--keep-parts")) == 0
    (out / "stats.json").unlink()
    other = Path("..") / ".." / Path(*path.parts[1:])
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        other = os.path.relpath(path)
        assert build_main(_args(f"./{other}", out, web, "--keep-parts")) == 0
    finally:
        os.chdir(cwd)
