"""build_corpus --dedup-within text,image: near-duplicate clusters within the corpus (pipeline.near_dedup)."""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import build_args, thumbnails_in_chromium
from PIL import Image

from jobs.build_corpus import main
from pipeline.localweb import MIME, Resource, encode, make_image
from pipeline.shards import read_tar

pytestmark = pytest.mark.timeout(240)

WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ri", "so", "tu", "va", "zo")
         for b in ("bar", "dek", "fin", "gol", "hum", "jat", "kos", "lum", "mev", "nop")]


def _caption(rng: random.Random, n: int = 12) -> list[str]:
    return rng.sample(WORDS, n)


def _planted(web, seed: int = 7) -> tuple[list[dict], dict[int, tuple[int, str]], dict[int, int], tuple[int, int]]:
    """60 rows of distinct images and captions with planted copies.

    Returns (rows, {row: (kept row, kind)} the near-dup drops by construction, {row: row} the exact
    image-byte duplicates, which are no near-dup members, the rows of a look-alike pair)."""
    rng = random.Random(seed)
    rows: list[dict] = []
    images: list[Image.Image] = []

    def add(img: Image.Image, words: list[str], fmt: str = "jpg", quality: int = 90) -> int:
        i = len(rows)
        body = encode(img, fmt, quality)
        rows.append({"url": web.add(f"/n{i:03d}.{fmt}", Resource(body, MIME[fmt])), "caption": " ".join(words),
                     "uid": f"n{i}"})
        images.append(img)
        return i

    shapes = ("circle", "square", "triangle", "cross")
    colours = ("red", "green", "blue", "yellow")
    for _ in range(40):
        add(make_image(rng.choice(shapes), rng.choice(colours), rng.choice([(200, 200), (320, 240)]), rng),
            _caption(rng))
    expect: dict[int, tuple[int, str]] = {}
    # A caption chain A ~ B ~ C with A !~ C (3-gram Jaccard 9/11 = 0.82 for each link, 8/12 = 0.67 end to end);
    # A is row 3, so B and C join a cluster whose kept row is 3 (C only through B).
    a = rows[3]["caption"].split()
    b = a[:-1] + ["zzfin"]
    c = ["zzbar"] + b[1:]
    for words in (b, c):
        k = add(make_image("circle", "red", (240, 240), rng), words)
        expect[k] = (3, "text")
    # Two words of A changed at both ends: Jaccard 8/12 = 0.67 with each of A, B and C, so LSH makes it a
    # candidate of theirs (at 0.67, 97% of the time) and verification keeps it out.
    add(make_image("square", "blue", (240, 240), rng), ["zzkos"] + a[1:-1] + ["zzhum"])
    # An image re-encoded at another quality, resized, and saved as png, each with its own caption.
    for src, edit in ((5, "q60"), (9, "resize"), (12, "png")):
        img = images[src]
        if edit == "q60":
            k = add(img, _caption(rng), quality=60)
        elif edit == "resize":
            k = add(img.resize((int(img.width * 0.7), int(img.height * 0.7)), Image.LANCZOS), _caption(rng))
        else:
            k = add(img, _caption(rng), fmt="png")
        expect[k] = (src, "image")
    # Two copies of row 17's image, the second with row 20's caption changed by one word: it is in a
    # caption cluster (kept: 20) and an image cluster (kept: 17), and goes as text; 20 stays.
    k1 = add(images[17], _caption(rng), quality=70)
    expect[k1] = (17, "image")
    words = rows[20]["caption"].split()
    k2 = add(images[17], words[:-1] + ["zzgol"], quality=80)
    expect[k2] = (20, "text")
    # A look-alike: another shape drawn on the same background (the same draws but the last), close
    # enough in hash and low-frequency colour to reach the precise check, which tells them apart.
    lookalike = (add(make_image("square", "red", (256, 256), random.Random(2)), _caption(rng), quality=95),
                 add(make_image("triangle", "red", (256, 256), random.Random(2)), _caption(rng), quality=95))
    # The very same bytes: an exact duplicate (sha256), dropped as such and not a near-dup member.
    exact = {len(rows): 30}
    rows.append({**rows[30], "uid": "exact"})
    rows[-1]["url"] = web.add("/exact.jpg", web.resources[rows[30]["url"][len(web.base):]])
    images.append(images[30])
    # Fillers up to 60 rows.
    while len(rows) < 60:
        add(make_image(rng.choice(shapes), rng.choice(colours), (256, 256), rng), _caption(rng))
    return rows, expect, exact, lookalike


def _write_two_files(tmp_path: Path, rows: list[dict]) -> Path:
    """Two input files: two slices, so that clusters cross slices."""
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:27]), folder / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[27:]), folder / "b.parquet")
    return folder


def _near_args(folder: Path, out: Path, web) -> list[str]:
    """In-process, 4 download tasks over 2 slices, 3 buckets: clusters cross tasks, slices and buckets."""
    return build_args(folder, out, web, "--executor", "local", "--rows-per-task", "15", "--samples-per-shard", "16",
                      "--dedup-within", "text,image", "--dedup-buckets", "3", "--keep-parts")


def _manifest(out: Path) -> list[dict]:
    rows = []
    for p in sorted((out / "manifest").glob("*.parquet")):
        rows += pq.read_table(p).to_pylist()
    return rows


def _parts_members(out: Path) -> tuple[list[int], list[str], list[bytes]]:
    """Rows, captions and images of the candidates that are no exact duplicates, from the kept parts."""
    recs = {}
    for p in sorted((out / "parts").glob("*.parquet")):
        if not p.name.endswith(".matches.parquet"):
            recs.update({r["key"]: r for r in pq.read_table(p).to_pylist()})
    final = {}
    for p in sorted((out / "_final").glob("*.parquet")):
        final.update({r["key"]: r for r in pq.read_table(p).to_pylist()})
    rows, caps, imgs = [], [], []
    import fsspec

    fs = fsspec.filesystem("file")
    for p in sorted((out / "parts").glob("*.tar")):
        for key, files in read_tar(fs, str(p)):
            if final[key]["reason"] == "duplicate_image":
                continue
            rows.append(int(recs[key]["row"]))
            caps.append(files["txt"].decode())
            imgs.append(files["jpg"])
    return rows, caps, imgs


def test_clusters_equal_brute_force_and_the_planted_truth(tmp_path, web, capsys):
    from dedup import image as im
    from pipeline.config import BuildConfig
    from pipeline.near_dedup import brute_force_clusters, compute_features

    rows, expect, exact, lookalike = _planted(web)
    folder = _write_two_files(tmp_path, rows)
    out = tmp_path / "o"
    assert main(_near_args(folder, out, web)) == 0
    printed = capsys.readouterr().out
    man = {r["row"]: r for r in _manifest(out)}
    got = {r: (int(m["duplicate_of"]), m["reason"].split(":")[1]) for r, m in man.items()
           if (m["reason"] or "").startswith("near_duplicate:")}
    assert got == expect
    for r, src in exact.items():
        assert (man[r]["status"], man[r]["reason"], man[r]["duplicate_of"]) == ("dropped", "duplicate_image", None)
        assert man[src]["status"] == "written"
    # The kept row of each cluster is written; every other member is not.
    assert all(man[root]["status"] == "written" for root, _ in expect.values())
    # The same clusters as comparing every pair of the corpus's samples.
    members = _parts_members(out)
    settings = BuildConfig(urls=str(folder), out=str(out), dedup_within=("text", "image")).near_settings()
    assert brute_force_clusters(members[1], members[2], settings, members[0]) == expect
    # The look-alikes reach the precise check (hash distance and chroma within the limits), which keeps both.
    m = settings.match
    i, j = (members[0].index(r) for r in lookalike)
    f = compute_features(list(lookalike), ["", ""], [members[2][i], members[2][j]], True)
    assert int(im.hamming(f.hashes[0], f.hashes[1])) <= m.image_max_distance
    assert im.chroma_residual(*(np.frombuffer(c, np.int8)[None] for c in f.chroma[::-1]))[0] <= m.image_max_chroma
    assert man[lookalike[0]]["status"] == man[lookalike[1]]["status"] == "written"
    # Counts add up, with the new reasons.
    reasons = Counter(m["reason"] for m in man.values() if m["reason"])
    assert reasons["near_duplicate:text"] == 3 and reasons["near_duplicate:image"] == 4
    status = Counter(m["status"] for m in man.values())
    assert status["written"] + status["dropped"] + status["failed"] == len(rows) == 60
    assert status["written"] == 60 - len(expect) - len(exact)
    assert "near-duplicates within the corpus: 6 clusters, removed 7 (text 3, image 4)" in printed
    assert printed.strip().splitlines()[-1] == f"rows in 60 = written {status['written']} + dropped 8 + failed 0"
    assert json.loads((out / "run.json").read_text())["near_buckets"] == 3  # a resume keeps the first run's


def test_rerun_after_a_kill_in_the_near_steps_gives_the_same_shards(tmp_path, web, caplog):
    rows, *_ = _planted(web)
    folder = _write_two_files(tmp_path, rows)
    ref = tmp_path / "ref"
    assert main(_near_args(folder, ref, web)) == 0
    out = tmp_path / "o"
    shutil.copytree(ref, out)
    # As if killed after one bucket's pairs: the later steps' markers, outputs and the run's end gone.
    (out / "stats.json").unlink()
    shutil.rmtree(out / "shards")
    shutil.rmtree(out / "manifest")
    for step in ("near_pairs", "near_cluster", "near_thumbs", "settle", "write_shards", "near_report"):
        (out / "_steps" / f"{step}.json").unlink()
    for p in sorted((out / "_steps" / "near_pairs").glob("*.json"))[1:]:
        p.unlink()
    for step in ("near_cluster", "near_thumbs", "settle", "write_shards", "near_report"):
        shutil.rmtree(out / "_steps" / step)
    for p in [*(out / "_dups").glob("near-*.parquet"), *(out / "_near").glob("shown-*.parquet")]:
        p.unlink()
    (out / "audit" / "report.html").unlink()
    with caplog.at_level(logging.INFO, logger="clipforge.job"):
        assert main(_near_args(folder, out, web)) == 0
    assert "near_keys: done in an earlier run" in caplog.text
    assert "near_pairs: 3 tasks (1 done before)" in caplog.text
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(p.name for p in (ref / "shards").iterdir())
    for p in (ref / "shards").iterdir():
        assert (out / "shards" / p.name).read_bytes() == p.read_bytes(), p.name
    assert _manifest(out) == _manifest(ref)
    assert (out / "audit" / "report.html").read_bytes() == (ref / "audit" / "report.html").read_bytes()


def test_near_buckets_of_their_own(tmp_path, web, monkeypatch):
    """The near steps bucket by run.json's near_buckets (sized for ~36 keys a row), not the exact dedup's."""
    import pipeline.near_dedup as nd

    monkeypatch.setattr(nd, "keys_per_row", lambda settings: 10**6)  # as if the input were 10^5 times larger
    rows, expect, *_ = _planted(web)
    folder = _write_two_files(tmp_path, rows)
    out = tmp_path / "o"
    args = [a for a in _near_args(folder, out, web) if a not in ("--dedup-buckets", "3")]
    assert main(args) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["buckets"] == 1 and run["near_buckets"] > 4, run
    man = _manifest(out)
    assert {r["row"]: (int(r["duplicate_of"]), r["reason"].split(":")[1]) for r in man if r["duplicate_of"]} == expect


def _report_clusters(html: str) -> dict[tuple[str, str], tuple[int, list[tuple[str, str, str]]]]:
    """{(kind, kept key): (size, [(cell class, key, thumbnail data URI)...])} of the near-duplicate section."""
    import re

    section = html[html.index("<h2 id='near-duplicates'>"):]
    out = {}
    for kind, body in re.findall(r"<table class='near' data-kind='(\w+)'>(.*?)</table>", section, re.S):
        for root, size, cells in re.findall(r"<tr class='cluster' data-root='(\d+)' data-size='(\d+)'>(.*?)</tr>",
                                            body, re.S):
            shown = re.findall(r"<td class='(kept|removed)' data-key='(\d+)'><img src=\"([^\"]+)\"", cells)
            out[(kind, root)] = (int(size), shown)
    return out


def _thumb_matches(uri: str, body: bytes) -> float:
    """Mean absolute difference (grey levels, 32x32) of a data: URI thumbnail and an image's bytes."""
    import base64
    import io

    a, b = (Image.open(io.BytesIO(x)).convert("L").resize((32, 32)) for x in
            (base64.b64decode(uri.split(",", 1)[1]), body))
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


def test_report_shows_the_planted_clusters_with_thumbnails(tmp_path, web):
    """Without --eval, audit/report.html holds the section alone: every planted cluster, kept sample first,
    each thumbnail its own sample's image, all of them decoding in a browser."""
    rows, expect, *_ = _planted(web)
    folder = _write_two_files(tmp_path, rows)
    out = tmp_path / "o"
    assert main(_near_args(folder, out, web)) == 0
    report = out / "audit" / "report.html"
    html = report.read_text()
    assert "Near-duplicates within the corpus" in html and "Data-overlap audit" not in html
    key = {r["row"]: r["key"] for r in _manifest(out)}
    want: dict[tuple[str, str], list[str]] = {}
    for r, (root, kind) in sorted(expect.items()):
        want.setdefault((kind, key[root]), []).append(key[r])
    got = _report_clusters(html)
    assert set(got) == set(want)
    for (kind, root), members in want.items():
        size, shown = got[(kind, root)]
        assert size == 1 + len(members)
        assert [(c, k) for c, k, _ in shown] == [("kept", root)] + [("removed", m) for m in members]
    # Each thumbnail is its own sample's image as the build stored it (the planted images are random
    # shapes: another row's differs).
    member_rows, _, images = _parts_members(out)
    body = {key[r]: img for r, img in zip(member_rows, images, strict=True)}
    for _, shown in got.values():
        for _, k, uri in shown:
            assert _thumb_matches(uri, body[k]) < 2 < 10 < _thumb_matches(uri, body[key[0]]), k  # row 0: no member
    # Counts per kind: the planted 2 text clusters (3 removed) and 4 image clusters (4 removed).
    assert "<tr><td>text</td><td>2</td><td>3</td>" in html and "<tr><td>image</td><td>4</td><td>4</td>" in html
    total, ok, _ = thumbnails_in_chromium(report, tmp_path / "profile")
    assert total == len(expect) + len(want) == 13 and ok == total


def test_report_without_clusters(tmp_path, web):
    """No near-duplicates: the section says so per kind; no thumbnail task runs."""
    rows, *_ = _planted(web)
    pq.write_table(pa.Table.from_pylist(rows[:20]), tmp_path / "in.parquet")  # rows 0-19: no planted copies
    out = tmp_path / "o"
    assert main(_near_args(tmp_path / "in.parquet", out, web)) == 0
    html = (out / "audit" / "report.html").read_text()
    assert "<tr><td>text</td><td>0</td><td>0</td>" in html and "<tr><td>image</td><td>0</td><td>0</td>" in html
    assert html.count("None found.") == 2 and "<img" not in html
    assert json.loads((out / "_steps" / "near_thumbs.json").read_text()) == []


def test_only_the_kinds_compared_are_reported(tmp_path, web):
    """--dedup-within image: stats.json and the page report image duplicates alone. Both kinds were
    reported, so a run that never compared captions said it found 0 text duplicates, by a rule it never applied."""
    rows, *_ = _planted(web)
    pq.write_table(pa.Table.from_pylist(rows[:20]), tmp_path / "in.parquet")
    out = tmp_path / "o"
    args = _near_args(tmp_path / "in.parquet", out, web)
    args[args.index("--dedup-within") + 1] = "image"
    assert main(args) == 0
    near = json.loads((out / "stats.json").read_text())["near_duplicates"]
    assert list(near["removed"]) == ["image"] and list(near["clusters_by_kind"]) == ["image"]
    html = (out / "audit" / "report.html").read_text()
    assert "<tr><td>image</td><td>0</td><td>0</td>" in html and "<td>text</td>" not in html
    assert "caption Jaccard" not in html and html.count("None found.") == 1


def test_a_kept_row_removed_as_the_other_kinds_duplicate_is_not_labelled_kept():
    # Row 2 keeps a caption cluster (5 is its copy) but is itself an image copy of row 1: the page
    # called it "kept" while the manifest removes it (duplicate_of 1).
    from dedup.report import near_section
    from pipeline.near_dedup import report_clusters

    dropped = {2: (1, "image"), 5: (2, "text")}
    summary = {"clusters_by_kind": {"text": 1, "image": 1}, "removed": {"text": 1, "image": 1},
               "report": report_clusters(dropped)}
    shown = {r: {"key": f"{r:09d}", "jpeg": b"\xff\xd8", "caption": f"caption {r}"} for r in (1, 2, 5)}
    html = near_section(summary, shown, {"text_threshold": 0.8, "ngram": 3, "image_max_distance": 10,
                                         "image_min_similarity": 0.96})
    got = _report_clusters(html)
    assert [(c, k) for c, k, _ in got[("text", "000000002")][1]] == [("removed", "000000002"), ("removed", "000000005")]
    assert [(c, k) for c, k, _ in got[("image", "000000001")][1]] == [("kept", "000000001"), ("removed", "000000002")]
    assert "removed too (image duplicate)" in html


def test_report_with_eval_holds_both_sections(tmp_path, web):
    """--eval and --dedup-within: one report.html, the eval sets' tables, then the near-duplicate section."""
    from pipeline.localweb import write_imagefolder

    rows, expect, *_ = _planted(web)
    folder = _write_two_files(tmp_path, rows)
    write_imagefolder(tmp_path / "eval", per_class=1, seed=3)
    out = tmp_path / "o"
    assert main([*_near_args(folder, out, web), "--eval", f"shapes={tmp_path / 'eval'}"]) == 0
    html = (out / "audit" / "report.html").read_text()
    assert html.index("<h2>shapes</h2>") < html.index("Near-duplicates within the corpus")
    assert (out / "audit" / "summary.json").exists()
    got = _report_clusters(html)
    assert sum(len(shown) for _, shown in got.values()) == len(expect) + 6


def test_report_on_s3(tmp_path, web, s3):
    """--out on s3://: the thumbnails' files and the page go through fsspec like every other output."""
    rows, expect, *_ = _planted(web)
    folder = _write_two_files(tmp_path, rows)
    # Few tasks (one bucket, a part per slice): every object is a round trip to the server.
    args = build_args(folder, s3.url("near"), web, "--executor", "local", "--rows-per-task", "40",
                      "--samples-per-shard", "64", "--dedup-within", "text,image", "--dedup-buckets", "1")
    assert main(args) == 0
    html = s3.fs().cat(f"{s3.bucket}/near/audit/report.html").decode()
    assert sum(len(shown) for _, shown in _report_clusters(html).values()) == len(expect) + 6
    assert not [k for k in s3.keys() if k.startswith("near/_near/")]  # scratch removed after success


def test_report_clusters_largest_first_ties_by_lowest_kept_row():
    from pipeline.near_dedup import report_clusters

    # text: kept 50 has 3 removed, kept 10 and 20 have 2 each, kept 5 has 1; image: kept 7 has 8 removed.
    dropped = {51: (50, "text"), 52: (50, "text"), 53: (50, "text"), 21: (20, "text"), 22: (20, "text"),
               11: (10, "text"), 12: (10, "text"), 6: (5, "text"), **{100 + i: (7, "image") for i in range(8)}}
    got = report_clusters(dropped, per_kind=3, members=5)
    assert [(c["kind"], c["root"], c["size"]) for c in got] == [("text", 50, 4), ("text", 10, 3), ("text", 20, 3),
                                                                ("image", 7, 9)]
    assert got[0]["shown"] == [51, 52, 53] and got[-1]["shown"] == [100, 101, 102, 103, 104]


@pytest.mark.parametrize(("value", "expect"), [("embedding:0.95", "embedding near-duplicates are not implemented"),
                                               ("caption", "caption is not text or image")])
def test_bad_kind_is_refused(tmp_path, value, expect):
    from pipeline.config import BuildConfig, ConfigError

    with pytest.raises(ConfigError, match=expect):
        BuildConfig(urls=str(tmp_path), out=str(tmp_path / "o"), dedup_within=(value,))
    cfg = BuildConfig(urls=str(tmp_path), out=str(tmp_path / "o"), dedup_within=("image", "text", "image"))
    assert cfg.dedup_within == ("text", "image")
    assert "dedup_within" not in BuildConfig(urls=str(tmp_path), out=str(tmp_path / "o")).output_settings()


def test_image_bands_put_every_pair_within_the_distance_in_one_band():
    from pipeline.near_dedup import image_bands

    rng = np.random.default_rng(0)
    for d in (0, 3, 10):
        h = rng.integers(0, 2**63, 2000, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
        flips = np.zeros(len(h), np.uint64)
        for i in range(len(h)):
            for bit in rng.choice(64, size=int(rng.integers(0, d + 1)), replace=False):
                flips[i] |= np.uint64(1) << np.uint64(int(bit))
        agree = image_bands(h, d) == image_bands(h ^ flips, d)
        assert agree.any(axis=1).all()
    # Not a vacuous property: at d + 1 flips, one per band, no band agrees.
    h = np.array([0], np.uint64)
    from pipeline.near_dedup import image_band_bounds

    one_per_band = np.uint64(sum(1 << s for s, _ in image_band_bounds(10)))
    assert not (image_bands(h, 10) == image_bands(h ^ one_per_band, 10)).any()


def test_many_copies_cost_checks_linear_in_the_copies(monkeypatch):
    """k copies of one caption or image: k - 1 edges from O(k) verifications, not k^2 / 2."""
    import dedup.image as im
    import dedup.text as text
    from pipeline.config import BuildConfig
    from pipeline.near_dedup import (
        band_keys,
        clusters,
        compute_features,
        image_candidates,
        keys_table,
        text_edges,
        verify_images,
    )

    k = 40
    body = encode(make_image("circle", "red", (128, 128), random.Random(1)), "jpg")
    feats = compute_features(list(range(k)), ["the same caption of a few words"] * k, [body] * k, True)
    settings = BuildConfig(urls="x", out="y", dedup_within=("text", "image")).near_settings()
    keys = keys_table([band_keys(feats, settings, 1)])
    calls = Counter()
    real_jaccard, real_verify = text.jaccard, im.verify
    monkeypatch.setattr(text, "jaccard", lambda a, b: calls.update(["jaccard"]) or real_jaccard(a, b))
    monkeypatch.setattr(im, "verify", lambda *a, **kw: calls.update(["verify"]) or real_verify(*a, **kw))
    kind = keys.column("kind").to_numpy()
    t = keys.filter(pa.array(kind == 0)).sort_by([("band", "ascending"), ("value", "ascending"), ("row", "ascending")])
    edges = text_edges(t, dict(enumerate(feats.captions)), settings)
    lo, hi = image_candidates(keys.filter(pa.array(kind == 1)), 0, 1, settings)
    assert len(lo) == k * (k - 1) // 2  # every pair is a candidate ...
    by_row = {r: {"thumb": feats.thumbs[r], "colour": feats.colours[r], "hash": int(feats.hashes[r]), "width": 128,
                  "height": 128} for r in range(k)}
    image = verify_images((lo, hi), by_row, settings)
    assert len(edges) == len(image) == k - 1
    assert calls["jaccard"] <= 2 * k and calls["verify"] <= 2 * k, calls  # ... but few are checked
    assert clusters({"text": edges}) == {r: (0, "text") for r in range(1, k)}
