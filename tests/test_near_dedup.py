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
from conftest import build_args
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
    for step in ("near_pairs", "near_cluster", "settle", "write_shards"):
        (out / "_steps" / f"{step}.json").unlink()
    for p in sorted((out / "_steps" / "near_pairs").glob("*.json"))[1:]:
        p.unlink()
    for step in ("near_cluster", "settle", "write_shards"):
        shutil.rmtree(out / "_steps" / step)
    for p in (out / "_dups").glob("near-*.parquet"):
        p.unlink()
    with caplog.at_level(logging.INFO, logger="clipforge.job"):
        assert main(_near_args(folder, out, web)) == 0
    assert "near_keys: done in an earlier run" in caplog.text
    assert "near_pairs: 3 tasks (1 done before)" in caplog.text
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(p.name for p in (ref / "shards").iterdir())
    for p in (ref / "shards").iterdir():
        assert (out / "shards" / p.name).read_bytes() == p.read_bytes(), p.name
    assert _manifest(out) == _manifest(ref)


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
