"""Issue 7: an existing --out is never harmed, every bad input is one line, reruns of changed input are refused.

Each test plants what a hostile (or careless) user would: foreign files and symlinks in the
output folder, garbage run records, a second run into the same folder, damaged input shards.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT

from dedup.synth import random_image, write_corpus
from jobs.audit_overlap import main as audit_main
from jobs.build_corpus import main as build_main
from pipeline.localweb import Resource, encode, populate_images, write_imagefolder
from pipeline.readers import fingerprint
from pipeline.rundir import LOCK_FILE, RunDir

pytestmark = pytest.mark.timeout(180)


def _input(tmp_path: Path, web, n: int = 6) -> Path:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(populate_images(web, n, seed=4)), path)
    return path


def _args(urls: Path, out: Path, web, *extra: str) -> list[str]:
    return ["--urls", str(urls), "--out", str(out), "--allow-hosts", web.hostport, "--executor", "local",
            "--rows-per-task", "3", *extra]


def _one_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    assert len(err) == 1, err
    return err[0]


def _snapshot(root: Path) -> dict[str, bytes | str]:
    """Every file and link below root (links as their target, never followed)."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[str(p.relative_to(root))] = "->" + os.readlink(p)
            elif p.is_file():
                out[str(p.relative_to(root))] = p.read_bytes()
    return out


# -- build_corpus: foreign folders ------------------------------------------------------


def test_build_refuses_a_folder_of_foreign_files_and_deletes_nothing(tmp_path, web, capsys):
    urls = _input(tmp_path, web)
    out = tmp_path / "o" / "u"
    for rel in ("shards/mydata.tar", "manifest/00042.parquet", "parts/00000.tar.tmp-foo", "notes.tmp-1-abc"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("precious")
    before = _snapshot(tmp_path / "o")
    assert build_main(_args(urls, out, web)) == 2
    line = _one_line(capsys)
    assert "did not write" in line and str(out) in line, line
    assert _snapshot(tmp_path / "o") == before  # nothing deleted, nothing added (not even a lock file)


def test_build_never_deletes_through_a_symlinked_shards_folder(tmp_path, web, capsys):
    urls = _input(tmp_path, web)
    out = tmp_path / "out"
    assert build_main(_args(urls, out, web)) == 0
    capsys.readouterr()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("00000.tar", "00007.tar", "theirs.tar"):
        (elsewhere / name).write_text("someone else's")
    # The run's own shards folder replaced by a link to someone else's folder.
    for p in (out / "shards").iterdir():
        p.unlink()
    (out / "shards").rmdir()
    (out / "shards").symlink_to(elsewhere)
    (out / "stats.json").unlink()  # as if the run had been killed before finishing
    before = _snapshot(elsewhere)
    assert build_main(_args(urls, out, web)) == 2
    line = _one_line(capsys)
    assert "symbolic link" in line and "shards" in line, line
    assert _snapshot(elsewhere) == before


def test_build_refuses_foreign_files_inside_its_own_folders(tmp_path, web, capsys):
    urls = _input(tmp_path, web)
    out = tmp_path / "out"
    assert build_main(_args(urls, out, web)) == 0
    capsys.readouterr()
    report = out / "manifest" / "report.parquet"  # a user's notebook output, say
    pq.write_table(pa.table({"a": [1]}), report)
    assert build_main(_args(urls, out, web)) == 2  # was: ValueError: invalid literal for int() on every rerun
    line = _one_line(capsys)
    assert str(report) in line and "not a file build_corpus writes" in line, line
    assert report.exists()


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '"a string"', "null"])
def test_build_refuses_a_garbage_run_record(tmp_path, web, capsys, content):
    urls = _input(tmp_path, web)
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(content)
    assert build_main(_args(urls, out, web)) == 2
    line = _one_line(capsys)
    assert str(out / "run.json") in line and "not a clipforge run record" in line, line
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]


def test_build_refuses_an_audit_output_and_a_regular_file(tmp_path, web, capsys):
    urls = _input(tmp_path, web)
    out = tmp_path / "audited"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"job": "audit_overlap", "corpus": "x"}))
    assert build_main(_args(urls, out, web)) == 2
    assert "output of audit_overlap" in _one_line(capsys)
    f = tmp_path / "a-file"
    f.write_text("x")
    assert build_main(_args(urls, f, web)) == 2
    assert "is a file" in _one_line(capsys)
    assert f.read_text() == "x"


def test_out_with_dotdot_creates_no_detour(tmp_path, web):
    urls = _input(tmp_path, web)
    assert build_main(_args(urls, tmp_path / "a" / "x" / ".." / "b", web)) == 0
    assert (tmp_path / "a" / "b" / "shards" / "sizes.json").exists()
    assert not (tmp_path / "a" / "x").exists()


# -- one run at a time --------------------------------------------------------------------


def _lock_record(pid: int) -> dict:
    from pipeline.rundir import _process_start

    return {"job": "build_corpus", "host": socket.gethostname(), "pid": pid, "process_start": _process_start(pid),
            "started": time.time(), "refreshed": time.time(), "token": "other"}


def test_a_second_run_into_a_held_folder_is_refused(tmp_path, web, capsys):
    urls = _input(tmp_path, web)
    out = tmp_path / "out"
    # Another live process holds the folder (a real one: its pid and start time check out).
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out.mkdir()
        (out / LOCK_FILE).write_text(json.dumps(_lock_record(holder.pid)))
        assert build_main(_args(urls, out, web)) == 2
        line = _one_line(capsys)
        assert "in use by another build_corpus run" in line and f"pid {holder.pid}" in line, line
        assert not (out / "run.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # Its holder is gone now: the lock is taken over with a warning, and the run completes.
    assert build_main(_args(urls, out, web)) == 0
    assert not (out / LOCK_FILE).exists()  # released at the end


def test_lock_refuses_a_live_holder_on_another_host_until_its_lease_ends(tmp_path):
    rd = RunDir(str(tmp_path / "o"), "build_corpus")
    (tmp_path / "o").mkdir()
    rec = {**_lock_record(os.getpid()), "host": "some-other-host"}
    (tmp_path / "o" / LOCK_FILE).write_text(json.dumps(rec))
    with pytest.raises(Exception, match="some-other-host"):
        rd.lock(lease_seconds=60)
    rec["refreshed"] = time.time() - 120  # no refresh for two minutes: its holder is gone
    (tmp_path / "o" / LOCK_FILE).write_text(json.dumps(rec))
    lk = rd.lock(lease_seconds=60)
    assert json.loads((tmp_path / "o" / LOCK_FILE).read_text())["token"] == lk.token
    rd.release()
    assert not (tmp_path / "o" / LOCK_FILE).exists()


# -- input fingerprint ---------------------------------------------------------------------


def test_fingerprint_is_unambiguous():
    def fp(values):
        return fingerprint(pa.table({"url": pa.array(values, pa.string())}))["url"]

    assert fp(["a\0b", "c"]) != fp(["a", "b\0c"])
    assert fp([None, "x"]) != fp(["", "x"])
    assert fp(["ab", "c"]) != fp(["a", "bc"])
    assert fp(["a", "b"]) == fp(["a", "b"])


def test_rerun_with_a_changed_extra_column_is_refused_naming_it(tmp_path, web, capsys):
    rows = populate_images(web, 6, seed=4)
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    out = tmp_path / "out"
    args = _args(path, out, web, "--extra-cols", "uid")
    assert build_main(args) == 0
    capsys.readouterr()
    for r in rows:
        r["uid"] = r["uid"] + "-new"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert build_main(args) == 2
    line = _one_line(capsys)
    assert "input_fingerprint.uid" in line and "input_fingerprint.url" not in line, line


# -- bad input: one line, exit 2 -----------------------------------------------------------


def test_csv_with_a_duplicated_column_name_is_one_line(tmp_path, capsys):
    path = tmp_path / "in.csv"
    path.write_text("url,caption,caption\nhttp://127.0.0.1/a.jpg,one,two\n")
    assert build_main(["--urls", str(path), "--out", str(tmp_path / "out"), "--executor", "local"]) == 2
    line = _one_line(capsys)
    assert str(path) in line and "'caption'" in line and "more than once" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,value", [("--max-aspect-ratio", "inf"), ("--max-aspect-ratio", "nan"),
                                        ("--progress-every", "0"), ("--progress-every", "-1"),
                                        ("--image-min-similarity", "nan"), ("--min-caption-words", "-1"),
                                        ("--num-cpus", "0")])
def test_meaningless_numbers_are_refused(tmp_path, web, capsys, flag, value):
    urls = _input(tmp_path, web)
    extra = [flag, value] + (["--eval", f"e={tmp_path}"] if flag == "--image-min-similarity" else [])
    assert build_main(_args(urls, tmp_path / "out", web, *extra)) == 2
    line = _one_line(capsys)
    assert flag.lstrip("-").replace("-", "_") in line.replace("-", "_"), line
    assert not (tmp_path / "out").exists()


# -- audit_overlap -------------------------------------------------------------------------


def _corpus_and_eval(tmp_path: Path) -> tuple[Path, Path]:
    rng = random.Random(0)
    corpus = tmp_path / "corpus"
    write_corpus(str(corpus), [(encode(random_image(rng)[0], "jpg"), f"a caption {i} words", {})
                               for i in range(12)], 5)
    ev = tmp_path / "ev"
    write_imagefolder(ev, per_class=1)
    return corpus, ev


def _audit(corpus: Path, ev: Path, out: Path) -> int:
    return audit_main(["--corpus", str(corpus), "--eval", f"e={ev}", "--out", str(out), "--executor", "local"])


def test_audit_refuses_a_folder_with_a_shards_folder_and_deletes_nothing(tmp_path, capsys):
    corpus, ev = _corpus_and_eval(tmp_path)
    out = tmp_path / "mine"
    (out / "shards" / "sub").mkdir(parents=True)
    (out / "shards" / "00000.tar").write_text("mine")
    (out / "shards" / "sub" / "deep.txt").write_text("mine too")
    before = _snapshot(out)
    assert _audit(corpus, ev, out) == 2  # was: shards/ removed recursively
    assert "did not write" in _one_line(capsys)
    assert _snapshot(out) == before


def test_audit_never_deletes_through_links_or_foreign_files_in_its_output(tmp_path, capsys):
    corpus, ev = _corpus_and_eval(tmp_path)
    out = tmp_path / "out"
    assert _audit(corpus, ev, out) == 0
    capsys.readouterr()
    # A foreign sub-folder planted inside the audit's own shards folder is refused, never removed.
    (out / "shards" / "keep").mkdir()
    (out / "shards" / "keep" / "x.tar").write_text("theirs")
    assert _audit(corpus, ev, out) == 2
    assert "keep" in _one_line(capsys)
    assert (out / "shards" / "keep" / "x.tar").read_text() == "theirs"
    # The shards folder swapped for a link to someone else's folder.
    (out / "shards" / "keep" / "x.tar").unlink()
    (out / "shards" / "keep").rmdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "00000.tar").write_text("theirs")
    for p in (out / "shards").iterdir():
        p.unlink()
    (out / "shards").rmdir()
    (out / "shards").symlink_to(elsewhere)
    assert _audit(corpus, ev, out) == 2
    assert "symbolic link" in _one_line(capsys)
    assert (elsewhere / "00000.tar").read_text() == "theirs"


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_audit_of_a_damaged_corpus_shard_is_one_line_exit_2(tmp_path, capsys, damage):
    corpus, ev = _corpus_and_eval(tmp_path)
    shard = corpus / "shards" / "00001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100] if damage == "truncated" else os.urandom(len(data)))
    assert _audit(corpus, ev, tmp_path / "out") == 2
    line = _one_line(capsys)
    assert str(shard) in line and "damaged" in line, line


def test_audit_names_an_eval_file_that_is_not_utf8(tmp_path, capsys):
    corpus, _ = _corpus_and_eval(tmp_path)
    ev = tmp_path / "pairs"
    ev.mkdir()
    img = encode(random_image(random.Random(1))[0], "jpg")
    (ev / "a.jpg").write_bytes(img)
    (ev / "a.txt").write_bytes(b"caf\xe9 au lait\n")  # latin-1, not UTF-8
    assert _audit(corpus, ev, tmp_path / "out") == 2
    line = _one_line(capsys)
    assert str(ev / "a.txt") in line and "UTF-8" in line, line


def test_audit_names_an_eval_file_whose_name_is_not_utf8(tmp_path, capsys):
    corpus, _ = _corpus_and_eval(tmp_path)
    ev = tmp_path / "pairs"
    ev.mkdir()
    name = os.fsdecode(b"caf\xe9")
    (ev / f"{name}.jpg").write_bytes(encode(random_image(random.Random(1))[0], "jpg"))
    (ev / f"{name}.txt").write_text("a caption\n")
    assert _audit(corpus, ev, tmp_path / "out") == 2
    line = _one_line(capsys)
    assert str(ev) in line and "UTF-8" in line, line


@pytest.mark.parametrize("flag,value", [("--text-threshold", "nan"), ("--image-min-similarity", "nan"),
                                        ("--num-cpus", "0"), ("--min-caption-words", "-2")])
def test_audit_meaningless_numbers_are_refused(tmp_path, capsys, flag, value):
    corpus, ev = _corpus_and_eval(tmp_path)
    out = tmp_path / "out"
    rc = audit_main(["--corpus", str(corpus), "--eval", f"e={ev}", "--out", str(out), "--executor", "local",
                     flag, value])
    assert rc == 2
    _one_line(capsys)
    assert not out.exists()


# -- a killed driver leaves no Ray behind ----------------------------------------------------


def _descendants(root: int) -> set[int]:
    from pipeline.reaper import descendants

    return set(descendants(root))


@pytest.mark.slow
def test_killed_driver_leaves_no_ray_process_behind(tmp_path, web):
    rows = populate_images(web, 30, seed=5)
    for i in range(0, 30, 3):  # slow rows keep the job busy while we look
        rows[i]["url"] = web.add(f"/slow{i}.jpg", Resource(b"x", "image/jpeg", delay=1.0))
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "build_corpus.py"), "--urls", str(path),
                             "--out", str(tmp_path / "out"), "--allow-hosts", web.hostport, "--rows-per-task", "3",
                             "--num-cpus", "2"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ray_pids: set[int] = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        ray_pids |= _descendants(proc.pid)
        if list((tmp_path / "out" / "_steps" / "download").glob("*.json")):
            break
        time.sleep(0.2)
    ray_pids |= _descendants(proc.pid)
    assert proc.poll() is None and len(ray_pids) >= 3, "the job ended or started no Ray"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(15)
    from pipeline.reaper import _stat

    left = {pid for pid in ray_pids if _stat(pid) is not None}
    if left:  # tidy up before failing, so the next tests do not inherit them
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert not left, f"{len(left)} process(es) of the killed job's Ray still run after 15 s"


@pytest.mark.parametrize("entry, argv", [
    ("jobs/build_corpus.py", ["--urls", "x.parquet", "--bogus", "1"]),
    ("jobs/audit_overlap.py", ["--corpus", "c"]),
    ("training/train.py", ["--nope"]),
])
def test_a_usage_error_is_one_line_exit_2(tmp_path, entry, argv):
    # argparse printed its whole usage block (a dozen lines) above the message.
    r = subprocess.run([sys.executable, str(ROOT / entry), *argv], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "usage" not in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_url_schemes_are_case_blind_and_an_output_takes_no_chained_url(tmp_path):
    from pipeline.rundir import OutputError, resolve

    # fsspec knows lower-case protocols only: S3://b/x raised a raw "Protocol not known: S3".
    fs, path = resolve("S3://bucket/corpus/")
    assert "s3" in fs.protocol and path == "bucket/corpus"
    # A cache or dir:: layer over an output hid the store underneath from the checks that keep an
    # output out of its inputs (an audit into simplecache::s3://B/corpus/audited was let through).
    for url in ("simplecache::s3://bucket/corpus/audited", f"dir::file://{tmp_path}/out"):
        with pytest.raises(OutputError, match="chained URLs are not supported for an output"):
            RunDir(url, "audit_overlap")
    assert list(tmp_path.iterdir()) == []
    assert resolve("simplecache::s3://bucket/corpus")[1] == "bucket/corpus"  # an input may be read through one
