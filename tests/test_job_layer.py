"""Issue 8's pieces, each against a plain reference: slices read back the whole file, the column
decisions equal the per-sample stages, the bucketed dedup equals first-occurrence, and shards do not
depend on how the work was cut into tasks."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from jobs.build_corpus import main as build_main
from pipeline.exact_dedup import DedupStep, gather_dups, write_keys
from pipeline.filters import CaptionCleaner, CaptionFilter, DuplicateUrlFilter, decide_captions
from pipeline.job import TaskContext
from pipeline.localweb import populate_images
from pipeline.readers import InputSlice, list_inputs, plan_slices, read_slice, read_table
from pipeline.sample import PENDING, Sample, run_stages

pytestmark = pytest.mark.timeout(180)

ALPHABET = ["a", "b", "Z", " ", "  ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\x00", "\x1b", "\x1c", "\x7f", "\x85",
            "\xa0", "\u2003", "\u2028", "\u200b", "\ufeff", "\ue000", "é", "日本", "🙂", ".", ",", "word "]


def _random_caption(rng: random.Random) -> str | None:
    if rng.random() < 0.05:
        return None
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(0, 40)))


@pytest.mark.parametrize("long_captions", ["truncate", "drop"])
def test_column_decisions_equal_the_per_sample_stages(long_captions):
    rng = random.Random(1)
    captions = [_random_caption(rng) for _ in range(3000)]
    dup = [rng.random() < 0.2 for _ in captions]

    def stages():
        return (CaptionCleaner(30, truncate=long_captions == "truncate"), DuplicateUrlFilter(),
                CaptionFilter(2, 5, 30, drop_long=long_captions == "drop"))

    ref = stages()
    samples = []
    for i, (c, d) in enumerate(zip(captions, dup, strict=True)):
        s = Sample(key=str(i), row=i, url="u", caption=c)
        s.meta["duplicate_url"] = d
        samples.append(s)
    out = list(run_stages(iter(samples), list(ref)))
    got = stages()
    cleaned, reasons = decide_captions(captions, dup, *got)
    assert [s.reason if s.status != PENDING else None for s in out] == reasons
    assert [s.caption for s in out if s.status == PENDING] == [c for c, r in zip(cleaned, reasons, strict=True)
                                                               if r is None]
    for a, b in zip(ref, got, strict=True):
        assert a.stats == b.stats


def _lines_file(path: Path, fmt: str, n: int, crlf: bool = False, trailing_newline: bool = True) -> list[dict]:
    rows = [{"url": f"http://h/{i}.jpg", "caption": f"caption {i} " + "x" * (i % 17)} for i in range(n)]
    nl = "\r\n" if crlf else "\n"
    if fmt == "jsonl":
        body = nl.join(json.dumps(r) for r in rows)
    else:
        body = nl.join(["url\tcaption"] + [f"{r['url']}\t{r['caption']}" for r in rows])
    path.write_text(body + (nl if trailing_newline else ""), newline="")
    return rows


@pytest.mark.parametrize("fmt,crlf,trailing", [("jsonl", False, True), ("jsonl", True, False),
                                               ("tsv", False, True), ("tsv", True, False)])
def test_byte_range_slices_read_every_row_once(tmp_path, fmt, crlf, trailing):
    path = tmp_path / f"in.{fmt}"
    rows = _lines_file(path, fmt, 500, crlf, trailing)
    files = list_inputs(str(path))
    for size in (7, 64, 100, 999, 10**6):
        slices = plan_slices(files, slice_bytes=size)
        got = [r for sl in slices for r in read_slice(sl, "url", "caption", ()).to_pylist()]
        assert got == rows, size


def test_parquet_slices_are_whole_row_groups(tmp_path):
    path = tmp_path / "in.parquet"
    rows = [{"url": f"u{i}", "caption": f"c{i}"} for i in range(1000)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=70)
    slices = plan_slices(list_inputs(str(path)), slice_rows=200)
    assert all(sl.stop - sl.start == 3 for sl in slices[:-1])
    assert [r for sl in slices for r in read_table(sl).to_pylist()] == rows


def _brute_force_dups(keys_per_slice: list[list[str | None]]) -> list[list[int]]:
    seen: set[str] = set()
    out = []
    for keys in keys_per_slice:
        dups = []
        for i, k in enumerate(keys):
            if k is None:
                continue
            if k in seen:
                dups.append(i)
            seen.add(k)
        out.append(dups)
    return out


@pytest.mark.parametrize("buckets", [1, 3, 17])
def test_bucketed_dedup_equals_first_occurrence_whatever_the_buckets(tmp_path, buckets):
    rng = random.Random(buckets)
    slices = [[rng.choice([None, *[f"k{j}" for j in range(60)]]) for _ in range(rng.randrange(0, 80))]
              for _ in range(5)]
    fs = LocalFileSystem()
    keys = []
    for s, values in enumerate(slices):
        path = str(tmp_path / f"keys-{s}.parquet")
        write_keys(fs, path, values, np.arange(len(values)), buckets)
        keys.append(path)
    step = DedupStep("d", keys, str(tmp_path / "dups"), buckets)
    for b in step.tasks():
        step.run(TaskContext(str(tmp_path), "test", "d", b), b)
    got = [gather_dups(fs, str(tmp_path / "dups"), buckets, s).tolist() for s in range(len(slices))]
    assert got == _brute_force_dups(slices)


def test_shards_do_not_depend_on_how_the_work_is_cut(tmp_path, web):
    rows = populate_images(web, 23, seed=9)
    rows += [dict(rows[3]), dict(rows[7], url=rows[7]["url"] + "?copy")]  # a repeated URL, repeated bytes
    web.add("/" + rows[-1]["url"].split("/", 3)[3], web.resources[rows[7]["url"].split(web.hostport)[1]])
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=5)
    outs = []
    for rows_per_task in (2, 7, 100):
        out = tmp_path / f"o{rows_per_task}"
        assert build_main(["--urls", str(path), "--out", str(out), "--allow-hosts", web.hostport, "--executor",
                           "local", "--rows-per-task", str(rows_per_task), "--samples-per-shard", "4"]) == 0
        outs.append(out)
    ref = {p.name: p.read_bytes() for p in (outs[0] / "shards").iterdir()}
    assert len(ref) == 1 + 2 * 6  # sizes.json + 23 written samples in shards of 4, each tar with its parquet
    for out in outs[1:]:
        assert {p.name: p.read_bytes() for p in (out / "shards").iterdir()} == ref
    m = pq.read_table(outs[0] / "manifest").to_pylist()
    reasons = {r["row"]: r["reason"] for r in m}
    assert reasons[23] == "duplicate_url" and reasons[24] == "duplicate_image"


def test_a_task_reports_progress_while_it_runs(tmp_path, web):
    from pipeline.build import DownloadStep  # noqa: F401 - the step whose progress is checked below
    from pipeline.executor import LocalExecutor
    from pipeline.localweb import Resource

    rows = populate_images(web, 12, seed=2)
    for i, r in enumerate(rows):  # image i answers after 0.15 * (i + 1) s: the task takes about 2 s
        res = web.resources[r["url"].split(web.hostport)[1]]
        r["url"] = web.add("/slow" + r["url"].split(web.hostport)[1],
                           Resource(res.body, res.content_type, delay=0.15 * (i + 1)))
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    reports: list[tuple[str, int, int, int]] = []
    real = LocalExecutor.run_tasks

    def spy(self, step, tasks, out, job, shared, on_result, on_report, **kw):
        def report(*a):
            reports.append(a)
            on_report(*a)
        return real(self, step, tasks, out, job, shared, on_result, report, **kw)

    LocalExecutor.run_tasks = spy
    try:
        assert build_main(["--urls", str(path), "--out", str(tmp_path / "o"), "--allow-hosts", web.hostport,
                           "--executor", "local", "--rows-per-task", "100", "--threads", "2"]) == 0
    finally:
        LocalExecutor.run_tasks = real
    mid = [r for r in reports if r[0] == "download" and 0 < r[2] < 12]
    assert mid, reports  # counts arrived before the task's 12 rows were all done


def test_plan_holds_no_rows(tmp_path):
    """The driver's plan for a 1M-row parquet list is slices and counts, not rows."""
    import pickle

    path = tmp_path / "big.parquet"
    n = 1_000_000
    t = pa.table({"url": pa.array([f"http://h/{i}" for i in range(n)]), "caption": pa.array(["c"] * n)})
    pq.write_table(t, path, row_group_size=50_000)
    files = list_inputs(str(path))
    slices = plan_slices(files)
    assert all(isinstance(s, InputSlice) for s in slices)
    assert len(pickle.dumps((files, slices))) < 10_000
