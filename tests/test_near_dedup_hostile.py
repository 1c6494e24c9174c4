"""Hostile input to build_corpus --dedup-within (issue 11 item 4): costs stay O(copies), bad values refused."""

from __future__ import annotations

import random
import time

import pyarrow as pa
import pytest

from pipeline.localweb import encode, make_image

pytestmark = pytest.mark.timeout(120)


def _settings(*kinds: str):
    from pipeline.config import BuildConfig

    return BuildConfig(urls="x", out="y", dedup_within=kinds).near_settings()


def _text_seconds(k: int) -> float:
    from pipeline.near_dedup import band_keys, compute_features, keys_table, text_edges

    s = _settings("text")
    feats = compute_features(list(range(k)), ["one caption copied many times over"] * k, [None] * k, False)
    keys = keys_table([band_keys(feats, s, 1)]).sort_by([("band", "ascending"), ("value", "ascending"),
                                                          ("row", "ascending")])
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        edges = text_edges(keys, dict(enumerate(feats.captions)), s)
        best = min(best, time.perf_counter() - t)
    assert len(edges) == k - 1
    return best


def test_thousands_of_identical_captions_cost_linear_time():
    """8x the copies: ~8x the time (it was ~50x: each row copied its whole cluster's member list)."""
    ratio = _text_seconds(4000) / _text_seconds(500)
    assert ratio < 25, ratio


def _image_rows(k_copies: int):
    """k copies of one image re-encoded (other bytes, one hash), a resized copy, and distinct images."""
    from PIL import Image

    rng = random.Random(3)
    img = make_image("circle", "red", (96, 96), random.Random(1))
    bodies = [encode(img, "jpg", 90)] * k_copies + [encode(img, "jpg", 60), encode(img, "png"),
                                                     encode(img.resize((70, 70), Image.LANCZOS), "jpg")]
    bodies += [encode(make_image(rng.choice(("square", "triangle")), rng.choice(("blue", "green")), (96, 96), rng),
                      "jpg") for _ in range(6)]
    order = list(range(len(bodies)))
    random.Random(5).shuffle(order)  # copies interleaved with the rest, lower and higher rows
    return [bodies[i] for i in order]


def _image_edges(bodies: list[bytes]):
    from pipeline.near_dedup import band_keys, compute_features, image_edges, keys_table

    s = _settings("image")
    n = len(bodies)
    feats = compute_features(list(range(n)), [""] * n, bodies, True)
    keys = keys_table([band_keys(feats, s, 1)])
    by_row = {r: {"thumb": feats.thumbs[r], "colour": feats.colours[r], "hash": int(feats.hashes[r]),
                  "width": feats.sizes[r][0], "height": feats.sizes[r][1]} for r in range(n)}
    edges, _ = image_edges(keys.filter(pa.array(keys.column("kind").to_numpy() == 1)), 0, 1, s,
                           lambda rows: {int(r): by_row[int(r)] for r in rows})
    return edges


def test_many_image_copies_verify_once_per_distinct_image(monkeypatch):
    """400 copies of one image: k - 1 edges from a handful of verifications (it was k^2 / 2 candidate
    pairs, ~8 million and 30 s at 4000 copies)."""
    import dedup.image as im

    calls = []
    real = im.verify
    monkeypatch.setattr(im, "verify", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    edges = _image_edges(_image_rows(400))
    assert len(calls) < 100 and len(edges) >= 399, (len(calls), len(edges))


def test_collapsed_image_copies_give_the_brute_force_clusters():
    from pipeline.near_dedup import brute_force_clusters, clusters

    bodies = _image_rows(25)
    got = clusters({"image": _image_edges(bodies)})
    assert len(got) >= 24 and got == brute_force_clusters([""] * len(bodies), bodies, _settings("image"))


def _reencoded_rows(k: int) -> list[bytes]:
    """k re-uploads of one image, each at another JPEG quality or a few pixels larger or smaller: one
    hash, but thumbnails that differ (no two rows collapse into one group of equal features)."""
    from PIL import Image

    base = make_image("circle", "red", (128, 128), random.Random(1))
    out = []
    for i in range(k):
        side = 128 + (i % 9) - 4
        out.append(encode(base.resize((side, side), Image.BICUBIC) if side != 128 else base, "jpg", 55 + (i * 7) % 45))
    return out


def test_reencoded_copies_verify_about_once_each_and_give_the_brute_force_clusters(monkeypatch):
    # Every pair of distinct groups was verified: k re-encodes cost k^2 / 2 checks (1,970 at k = 80,
    # hours for thousands of re-uploads of one picture in a bucket). A pair whose rows are already
    # one component changes no cluster.
    import dedup.image as im
    from pipeline.near_dedup import brute_force_clusters, clusters

    bodies = _reencoded_rows(60)
    calls = []
    real = im.verify
    monkeypatch.setattr(im, "verify", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = clusters({"image": _image_edges(bodies)})
    assert len(calls) < 2 * len(bodies), len(calls)
    monkeypatch.setattr(im, "verify", real)
    want = brute_force_clusters([""] * len(bodies), bodies, _settings("image"))
    assert len(want) >= 50 and got == want


@pytest.mark.parametrize("value", ["TEXT", "embedding:2", "embedding:0.95", "text,caption"])
def test_bad_dedup_within_values_exit_2_and_write_nothing(tmp_path, web, corpus_input, capsys, value):
    from conftest import build_args

    from jobs.build_corpus import main

    out = tmp_path / "o"
    assert main(build_args(corpus_input[0], out, web, "--executor", "local", "--dedup-within", value)) == 2
    assert not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--dedup-within" in err[0], err


@pytest.mark.parametrize(("value", "expect"), [("text,text", ("text",)), ("image,", ("image",)),
                                               ("image,text", ("text", "image"))])
def test_repeated_or_trailing_kinds_mean_the_same(tmp_path, value, expect):
    from pipeline.config import BuildConfig, _coerce

    kinds = _coerce("dedup_within", tuple[str, ...], value)
    assert BuildConfig(urls=str(tmp_path), out=str(tmp_path / "o"), dedup_within=kinds).dedup_within == expect


def test_odd_captions_and_a_changed_kind_on_rerun(tmp_path, web):
    """Captions None, empty, whitespace, emoji, control characters, 1 MB, repeated: counts add up; a
    rerun into the same --out with --dedup-within changed is refused (exit 2), nothing rewritten."""
    import json

    import pyarrow.parquet as pq
    from conftest import build_args

    from jobs.build_corpus import main
    from pipeline.localweb import populate_images

    rows = populate_images(web, 10, seed=4)
    odd = [None, "", "   \t\n", "🐱🐱🐱 🐶 " * 5, "\x00\ufffd\u202e?" * 3, "word " * 200_000, "a b c d e f g"]
    for r, c in zip(rows, odd + ["a b c d e f g"] * 3, strict=True):
        r["caption"] = c
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    out = tmp_path / "o"
    args = build_args(tmp_path / "in.parquet", out, web, "--executor", "local", "--dedup-within", "text,image",
                      "--long-captions", "drop", "--min-caption-words", "0")
    assert main(args) == 0
    stats = json.loads((out / "stats.json").read_text())
    flat = json.dumps(stats)
    assert "near_duplicate" in flat, stats
    man = [r for p in sorted((out / "manifest").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    by_key = {r["key"]: r for r in man}
    assert len(man) == 10 and {r["status"] for r in man} <= {"written", "dropped", "failed"}
    for r in man:  # duplicate_of always leads to a written sample
        if not (r["reason"] or "").startswith("near_duplicate:"):
            continue
        for _ in range(10):
            r = by_key[r["duplicate_of"]]
            if not (r["reason"] or "").startswith("near_duplicate:"):
                break
        assert r["status"] == "written", r
    assert sum((r["reason"] or "").startswith("near_duplicate:text") for r in man) == 3  # "a b c d e f g" x4
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))
    changed = [a if a != "text,image" else "image" for a in args]
    assert main(changed) == 2
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before
