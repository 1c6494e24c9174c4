"""build_corpus and audit_overlap on object storage: moto's S3 server (conftest `s3`) stands for the bucket.

Inputs and outputs are s3:// URLs; everything is read back through s3fs, as another machine
would. The kill-and-resume and the overlap-merge resume rerun on Ray, so tasks write from
other processes than the driver's: a listing the driver took before they wrote must not be
trusted afterwards (s3fs answers "no such file" from a cached listing).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, build_args
from PIL import Image

from pipeline.localweb import Resource, populate_images, write_imagefolder

pytestmark = pytest.mark.timeout(300)

SCRATCH = ("parts", "_input", "_keys", "_dups", "_final", "_steps", "_work")


def put_table(s3, key: str, rows: list[dict], fmt: str = "parquet") -> str:
    """Upload rows as parquet, tsv, csv or jsonl to s3://bucket/key; returns the URL."""
    table = pa.Table.from_pylist(rows)
    buf = io.BytesIO()
    if fmt == "parquet":
        pq.write_table(table, buf)
    elif fmt == "csv":
        pcsv.write_csv(table, buf)
    elif fmt == "tsv":
        cols = table.column_names
        buf.write(("\t".join(cols) + "\n" + "".join("\t".join(str(r[c]) for c in cols) + "\n" for r in rows)).encode())
    else:
        buf.write("".join(json.dumps(r) + "\n" for r in rows).encode())
    s3.fs().pipe(f"{s3.bucket}/{key}", buf.getvalue())
    return s3.url(key)


def run_job(script: str, *args: str, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """A job as a user runs it (its own process, the fixture's AWS_* environment), from `cwd`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "NO_ALBUMENTATIONS_UPDATE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "jobs" / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def s3_manifest(s3, prefix: str) -> list[dict]:
    fs = s3.fs()
    fs.invalidate_cache()
    rows: list[dict] = []
    for p in sorted(fs.glob(f"{s3.bucket}/{prefix}/manifest/*.parquet")):
        with fs.open(p, "rb") as f:
            rows += pq.read_table(f).to_pylist()
    return rows


def s3_samples(s3, prefix: str) -> tuple[dict[str, int], list[dict]]:
    """(sizes.json, every sample of the shards in order) read back through s3fs with webdataset's
    tar reader: key, caption, json and the decoded image size."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    fs = s3.fs()
    fs.invalidate_cache()
    folder = f"{s3.bucket}/{prefix}/shards"
    sizes = json.loads(fs.cat(f"{folder}/sizes.json"))
    tars = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False) if p.endswith(".tar"))
    assert tars == list(sizes), (tars, list(sizes))
    samples = []
    for name in tars:
        with fs.open(f"{folder}/{name}", "rb") as f:
            n = 0
            for s in group_by_keys(tar_file_expander([{"url": name, "stream": f}])):
                img = Image.open(io.BytesIO(s.get("jpg") or s.get("webp") or s["png"]))
                img.load()
                samples.append({"key": s["__key__"], "caption": s["txt"].decode(), "json": json.loads(s["json"]),
                                "size": img.size, "shard": name})
                n += 1
        assert n == sizes[name], f"{name}: {n} samples, sizes.json says {sizes[name]}"
    return sizes, samples


def accounting(stdout: str) -> str:
    lines = [ln for ln in stdout.strip().splitlines() if ln.startswith("rows in ")]
    assert lines, stdout[-2000:]
    return lines[-1]


def only_under(s3, prefixes: tuple[str, ...]) -> list[str]:
    """Keys of the bucket that lie outside the given prefixes (should be none)."""
    return [k for k in s3.keys() if not k.startswith(tuple(p.rstrip("/") + "/" for p in prefixes))]


def test_build_then_audit_on_s3(tmp_path, s3, web, internal, corpus_input):
    """URL list on s3 -> corpus on s3 -> audit of that corpus (eval set local) -> audited corpus on s3."""
    path, rows, faults = corpus_input
    eval_dir = tmp_path / "eval"
    write_imagefolder(eval_dir, per_class=1)
    planted = sorted(eval_dir.glob("*/*.jpg"))[:2]
    table = pq.read_table(path).to_pylist()
    for i, p in enumerate(planted):  # eval images in the corpus, with captions no eval item has
        url = web.add(f"/planted{i}.jpg", Resource(p.read_bytes(), "image/jpeg"))
        table.insert(10 + 20 * i, {"url": url, "caption": f"planted web sample number {i}", "uid": f"p{i}",
                                   "label": ""})
    urls = put_table(s3, "in/urls.parquet", table)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    buckets_before = set(s3.fs().ls("", detail=False))

    r = run_job("build_corpus.py", *build_args(urls, s3.url("corpus"), web, "--executor", "local"), cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    n = len(table)
    m = s3_manifest(s3, "corpus")
    assert len(m) == n and sorted(x["row"] for x in m) == list(range(n))
    fates = Counter(x["status"] for x in m)
    line = f"rows in {n} = written {fates['written']} + dropped {fates['dropped']} + failed {fates['failed']}"
    assert accounting(r.stdout) == line
    assert (fates["dropped"], fates["failed"]) == (5, 13)  # the fault rows, as on local disk (test_build)
    assert sum(internal.hits.values()) == 0
    sizes, samples = s3_samples(s3, "corpus")
    assert all(v == 32 for v in list(sizes.values())[:-1])
    assert [s["key"] for s in samples] == sorted(x["key"] for x in m if x["status"] == "written")
    by_key = {x["key"]: x for x in m}
    assert all(by_key[s["key"]]["shard"] == s["shard"] and s["json"]["url"] == by_key[s["key"]]["url"]
               and s["size"][0] == 256 for s in samples)
    assert {r["url"] for r in rows} <= {s["json"]["url"] for s in samples}
    stats = json.loads(s3.fs().cat(f"{s3.bucket}/corpus/stats.json"))
    assert stats["rows_in"] == n and stats["written"] == fates["written"]
    corpus_keys = [k for k in s3.keys() if k.startswith("corpus/")]
    assert not [k for k in corpus_keys if k.split("/")[1] in SCRATCH or ".tmp-" in k or ".clipforge.lock" in k]

    # The audit reads the corpus from s3 and writes its output there too; the eval set is local.
    audit = ["--corpus", s3.url("corpus"), "--eval", f"shapes={eval_dir}", "--out", s3.url("audited")]
    r = run_job("audit_overlap.py", *audit, "--executor", "local", "--keep-work", cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    w = fates["written"]
    assert accounting(r.stdout) == f"rows in {w} = written {w - 2} + dropped 2 + failed 0"
    fs = s3.fs()
    summary = json.loads(fs.cat(f"{s3.bucket}/audited/audit/summary.json"))
    assert summary["eval_sets"]["shapes"]["items_with_overlap"] == 2
    assert summary["eval_sets"]["shapes"]["train_samples_removed"] == 2
    with fs.open(f"{s3.bucket}/audited/audit/overlap.parquet", "rb") as f:
        overlap = pq.read_table(f).to_pylist()
    assert {x["url"] for x in overlap} == {x["url"] for x in table if x["uid"] in ("p0", "p1")}
    assert b"<html" in fs.cat(f"{s3.bucket}/audited/audit/report.html").lower()
    _, clean = s3_samples(s3, "audited")
    assert len(clean) == w - 2 and not {s["json"]["uid"] for s in clean} & {"p0", "p1"}
    am = s3_manifest(s3, "audited")
    assert Counter(x["status"] for x in am) == Counter({"written": w - 2, "dropped": 2})

    # A kill during the overlap merge, after its task wrote overlap.parquet and before summary.json
    # (the markers say the step did not finish). The rerun runs on Ray: the merge task writes
    # summary.json from a worker, and the driver, which listed audit/ when it claimed the
    # folder, must still find it.
    fs.rm(f"{s3.bucket}/audited/audit/summary.json")
    fs.rm(f"{s3.bucket}/audited/_steps/overlap.json")
    fs.rm(f"{s3.bucket}/audited/_steps/overlap", recursive=True)
    r = run_job("audit_overlap.py", *audit, "--executor", "ray", "--num-cpus", "2", cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert accounting(r.stdout) == f"rows in {w} = written {w - 2} + dropped 2 + failed 0"
    again = json.loads(s3.fs().cat(f"{s3.bucket}/audited/audit/summary.json"))
    assert again["corpus"] == summary["corpus"]
    for name, s in summary["eval_sets"].items():
        assert {k: v for k, v in again["eval_sets"][name].items() if k != "timings"} == {
            k: v for k, v in s.items() if k != "timings"}

    # Nothing outside the prefixes given, no other bucket, nothing in the working folder.
    assert only_under(s3, ("in", "corpus", "audited")) == []
    assert not [k for k in s3.keys() if k.startswith("audited/") and k.split("/")[1] in SCRATCH]
    assert set(s3.fs().ls("", detail=False)) == buckets_before
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("fmt", ["tsv", "jsonl"])
def test_byte_range_slices_of_a_file_on_s3(s3, fmt):
    """Slices cut at byte offsets, each read with its own seeks and range requests to the store,
    give back every row once, in order."""
    from pipeline.readers import list_inputs, plan_slices, read_slice

    rows = [{"url": f"http://h/{i}.jpg", "caption": f"caption {i} " + "x" * (i % 13)} for i in range(120)]
    url = put_table(s3, f"in/urls.{fmt}", rows, fmt)
    files = list_inputs(url)
    assert [f.url for f in files] == [url] and files[0].version.startswith("ETag=")
    for size in (97, 1000, 10**6):
        slices = plan_slices(files, slice_bytes=size)
        got = [r for sl in slices for r in read_slice(sl, "url", "caption", ()).to_pylist()]
        assert got == rows, size


@pytest.mark.parametrize("layout", ["tsv", "folder", "glob"])
def test_input_layouts_on_s3(tmp_path, s3, web, layout):
    from jobs.build_corpus import main

    rows = populate_images(web, 6, seed=12)
    decoys = populate_images(web, 2, seed=13, prefix="/decoy")  # must not be read
    if layout in ("tsv", "jsonl"):
        urls = put_table(s3, f"in/urls.{layout}", rows, layout)
    elif layout == "folder":  # every list in the folder, whatever its format; other files skipped
        put_table(s3, "in/a.parquet", rows[:2])
        put_table(s3, "in/b.tsv", rows[2:4], "tsv")
        put_table(s3, "in/c.jsonl", rows[4:], "jsonl")
        s3.fs().pipe(f"{s3.bucket}/in/notes.txt", b"not a URL list\n")
        urls = s3.url("in")
    else:
        put_table(s3, "in/part-0.csv", rows[:3], "csv")
        put_table(s3, "in/part-1.jsonl", rows[3:], "jsonl")
        put_table(s3, "in/other.parquet", decoys)
        urls = s3.url("in/part-*")
    assert main(["--urls", urls, "--out", s3.url("o"), "--allow-hosts", web.hostport, "--executor", "local",
                 "--image-size", "32", "--rows-per-task", "2", "--samples-per-shard", "4"]) == 0
    m = s3_manifest(s3, "o")
    assert [x["url"] for x in m] == [r["url"] for r in rows] and {x["status"] for x in m} == {"written"}
    sizes, samples = s3_samples(s3, "o")
    assert list(sizes.values()) == [4, 2]
    assert {s["json"]["url"]: s["caption"] for s in samples} == {r["url"]: r["caption"] for r in rows}
    assert only_under(s3, ("in", "o")) == []


def test_kill_and_resume_on_s3_and_the_lock_holds(tmp_path, s3, web):
    """SIGKILL mid-download; a second run while the first is alive is refused; the rerun (on Ray)
    takes over the dead run's lock and writes shards byte-identical to an uninterrupted run."""
    from jobs.build_corpus import main

    rows = populate_images(web, 60, seed=11)
    for i in range(6):  # one slow URL per task, so that the run is still going when it is killed
        rows.insert(i * 11, {"url": web.add(f"/slowish{i}.jpg", Resource(b"x", "image/jpeg", delay=1.5)),
                             "caption": "a slow one", "uid": f"s{i}", "label": ""})
    urls = put_table(s3, "in/urls.parquet", rows)
    common = ["--rows-per-task", "11", "--samples-per-shard", "7", "--timeout", "5"]
    assert main(build_args(urls, s3.url("ref"), web, *common, "--executor", "local")) == 0

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    args = build_args(urls, s3.url("killed"), web, *common)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "build_corpus.py"), *args, "--executor", "local"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd, env=env)
    fs = s3.fs()

    def markers() -> int:
        fs.invalidate_cache()
        return len(fs.glob(f"{s3.bucket}/killed/_steps/download/*.json"))

    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None and markers() < 1:
            time.sleep(0.05)
        # The folder's lock on s3: a second run into the same --out is refused while the first lives.
        second = run_job("build_corpus.py", *args, "--executor", "local", cwd=cwd)
        while time.monotonic() < deadline and proc.poll() is None and markers() < 2:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stderr[-2000:]
    assert lines[0].startswith("build_corpus: error: s3://") and "in use by another build_corpus run" in lines[0]
    done = markers()
    assert 2 <= done < 6, f"kill landed at {done} of 6 tasks"
    assert not fs.exists(f"{s3.bucket}/killed/stats.json")

    r = run_job("build_corpus.py", *args, "--executor", "ray", "--num-cpus", "2", cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "part file missing" not in r.stderr and "Traceback" not in r.stderr
    assert f"download: 6 tasks ({done} done before)" in r.stderr
    assert "taking over a stale lock" in r.stderr  # the killed run's: its process is gone
    ref_m, out_m = s3_manifest(s3, "ref"), s3_manifest(s3, "killed")
    assert out_m == ref_m
    fs.invalidate_cache()
    ref_files = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3.bucket}/ref/shards", detail=False))
    assert ref_files == sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3.bucket}/killed/shards", detail=False))
    for name in ref_files:
        assert fs.cat(f"{s3.bucket}/killed/shards/{name}") == fs.cat(f"{s3.bucket}/ref/shards/{name}"), name
    assert only_under(s3, ("in", "ref", "killed")) == []
    assert not [k for k in s3.keys() if k.split("/")[1] in SCRATCH or ".tmp-" in k or k.endswith(".clipforge.lock")]
    assert list(cwd.iterdir()) == []


def test_files_written_by_another_process_are_seen_after_a_listing(s3):
    """The driver lists a folder (claiming it, cleaning temporaries), then tasks elsewhere write
    there: every later look through the RunDir's filesystem must see what they wrote."""
    import s3fs

    from pipeline.rundir import RunDir

    rd = RunDir(s3.url("corpus"), "build_corpus")
    other = s3fs.S3FileSystem(skip_instance_cache=True)  # another process's client
    other.pipe(rd.path("parts", "00000.parquet"), b"first")
    other.pipe(rd.path("audit", "overlap.parquet"), b"x")
    assert [rel for rel, _ in rd.walk("parts")] == ["00000.parquet"]
    assert rd.names("audit") == ["overlap.parquet"]
    rd.fs.ls(rd.root)  # what any other listing of the folder would leave behind

    other.pipe(rd.path("parts", "00001.parquet"), b"second")
    other.pipe(rd.path("audit", "summary.json"), b"{}")
    other.pipe(rd.path("parts", "00000.parquet"), b"first, rewritten longer")
    other.pipe(rd.path("stats.json"), b"{}")
    assert rd.fs.exists(rd.path("parts", "00001.parquet"))
    with rd.fs.open(rd.path("parts", "00001.parquet"), "rb") as f:
        assert f.read() == b"second"
    with rd.fs.open(rd.path("audit", "summary.json"), "rb") as f:
        assert f.read() == b"{}"
    with rd.fs.open(rd.path("parts", "00000.parquet"), "rb") as f:  # not cut to the listed size
        assert f.read() == b"first, rewritten longer"
    assert rd.fs.exists(rd.path("stats.json"))
    assert rd.names("parts") == ["00000.parquet", "00001.parquet"]


@pytest.mark.parametrize("flag,value,expect", [
    ("--out", "foo://x/corpus", "no filesystem for foo://"),
    ("--out", "s3:/BUCKET/corpus", "malformed URL (expected s3://BUCKET/PATH)"),
    ("--urls", "s3:/BUCKET/in/urls.parquet", "malformed URL (expected s3://BUCKET/PATH)"),
    ("--urls", "foo://x/urls.parquet", "no filesystem for foo://"),
    ("--urls", "s3://BUCKET/in/missing.parquet", "no such file or folder"),
    ("--out", "simplecache::s3://BUCKET/corpus", "chained URLs are not supported for an output"),
])
def test_bad_urls_are_one_line_exit_2_and_write_nothing(tmp_path, s3, flag, value, expect):
    urls = put_table(s3, "in/urls.parquet", [{"url": "http://127.0.0.1:9/a.jpg", "caption": "a red circle"}])
    given = {"--urls": urls, "--out": s3.url("corpus"), flag: value.replace("BUCKET", s3.bucket)}
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = s3.keys()
    r = run_job("build_corpus.py", "--urls", given["--urls"], "--out", given["--out"], "--executor", "local", cwd=cwd)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith(f"build_corpus: error: {flag}") or given[flag] in lines[0], lines[0]
    assert expect in lines[0], lines[0]
    assert s3.keys() == before and list(cwd.iterdir()) == []


@pytest.mark.parametrize("out, why", [
    ("corpus/audited", "--out must lie outside the corpus folder s3://{bucket}/corpus "),
    ("corpus/shards/audited", "--out must lie outside the corpus folder s3://{bucket}/corpus "),
    ("corpus", "--out holds files that clipforge did not write (shards)"),
    ("", "--out holds files that clipforge did not write (corpus)"),
])
def test_audit_out_in_or_above_an_s3_corpus_is_one_line_exit_2(tmp_path, s3, out, why):
    # The same refusal as on local disk: the input is only read. Only local paths were checked, so an
    # audit into s3://BUCKET/corpus/audited went ahead and wrote into the corpus it read (the corpus
    # itself and folders above it were already refused: they hold files clipforge did not write).
    fs = s3.fs()
    fs.pipe(f"{s3.bucket}/corpus/shards/sizes.json", b"{}")
    eval_dir = tmp_path / "eval"
    write_imagefolder(eval_dir, per_class=1)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = s3.keys()
    target = s3.url(out) if out else f"s3://{s3.bucket}"
    r = run_job("audit_overlap.py", "--corpus", s3.url("corpus"), "--eval", f"shapes={eval_dir}", "--out", target,
                "--executor", "local", cwd=cwd)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert why.format(bucket=s3.bucket) in lines[0], lines[0]
    assert s3.keys() == before and list(cwd.iterdir()) == []
