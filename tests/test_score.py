"""CLIP-score filtering (jobs/score_corpus.py): scores equal open_clip's own, the quantile keeps its fraction,
mismatched captions score low on a trained model, embeddings are stored and keyed, resume and bad input."""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from train_helpers import TINY, train_here

from dedup.synth import write_corpus
from jobs.score_corpus import main
from pipeline.localweb import COLORS, SHAPES, TEMPLATES, encode, make_image
from pipeline.shards import iter_tar, write_tar
from scoring.job import read_embeddings, score_bins, top_frac_bin
from training.synthetic import write_shape_shards

pytestmark = pytest.mark.timeout(240)


def _caption(rng: random.Random, color: str, shape: str) -> str:
    return rng.choice(TEMPLATES).format(c=f"{color} {shape}")


def shape_corpus(root: Path, n: int, per_shard: int, seed: int, plant: float = 0.0,
                 broken: bool = False) -> dict:
    """n shape images with their captions, a share `plant` of them with the caption of another colour and
    shape; returns {key: (true caption, planted or None)}."""
    rng = random.Random(seed)
    samples, truth = [], {}
    for i in range(n):
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        true = _caption(rng, color, shape)
        caption, planted = true, None
        if rng.random() < plant:
            other = _caption(rng, rng.choice([c for c in COLORS if c != color]),
                             rng.choice([s for s in SHAPES if s != shape]))
            caption, planted = other, other
        samples.append((encode(make_image(shape, color, (48, 48), rng), "jpg"), caption, {"uid": f"u{i}"}))
        truth[f"{i:09d}"] = (true, planted)
    if broken:
        samples[1] = (b"\xff\xd8 not a jpeg", "a broken image here", {"uid": "broken"})
        truth["000000001"] = (None, None)
    write_corpus(str(root), samples, per_shard)
    return truth


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A checkpoint of clipforge's trainer: the tiny ViT trained on shape shards (72 steps of 32, about 10 s
    of one core; one torch thread, as two spin against each other on a loaded machine)."""
    d = tmp_path_factory.mktemp("score-train")
    write_shape_shards(d / "shards", 768, 192, seed=7, size=48)
    r = train_here("--train-data", f"{d}/shards/{{00000..00003}}.tar", "--model", TINY, "--batch-size", "32",
                   "--epochs", "3", "--workers", "0", "--lr", "3e-3", "--wd", "0.1", "--warmup", "5",
                   "--precision", "fp32", "--threads", "1", "--log-every", "100", "--output", str(d / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    [ckpt] = sorted((d / "run" / "checkpoints").glob("step_*.pt"))[-1:]
    return ckpt


def run(corpus: Path, out: Path, ckpt: Path | str, *extra: str) -> int:
    return main(["--corpus", str(corpus), "--out", str(out), "--model", TINY, "--clip-pretrained", str(ckpt),
                 "--executor", "local", "--batch-size", "16", *extra])


def manifest(out: Path) -> list[dict]:
    return pq.read_table(out / "manifest").sort_by("row").to_pylist()


def shard_samples(out: Path) -> list[tuple[str, str, dict]]:
    """(shard, key, json) of every written sample, in shard order."""
    rows = []
    for tar in sorted((out / "shards").glob("*.tar")):
        with open(tar, "rb") as f:
            for key, members in iter_tar(f, str(tar)):
                rows.append((tar.stem, key, json.loads(members["json"])))
    return rows


def test_scores_equal_open_clips_own_cosine_and_embeddings_are_stored(trained, tmp_path, capsys):
    import open_clip
    import torch
    from PIL import Image

    truth = shape_corpus(tmp_path / "corpus", 14, 5, seed=1, broken=True)
    out = tmp_path / "out"
    assert run(tmp_path / "corpus", out, trained) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "rows in 14 = written 13 + dropped 0 + failed 1"
    rows = manifest(out)
    assert [r["key"] for r in rows] == sorted(truth)
    [failed] = [r for r in rows if r["status"] == "failed"]
    assert failed["key"] == "000000001" and failed["reason"] == "undecodable_image" and failed["clip_score"] is None

    # open_clip's own model, transform, tokenizer and checkpoint loader: the reference.
    open_clip.add_model_config(TINY)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-vit", pretrained=str(trained))
    tokenizer = open_clip.get_tokenizer("tiny-vit")
    model.eval()
    corpus_samples = {}
    for tar in sorted((tmp_path / "corpus" / "shards").glob("*.tar")):
        with open(tar, "rb") as f:
            corpus_samples.update(dict(iter_tar(f, str(tar))))
    written = shard_samples(out)
    assert [k for _, k, _ in written] == [r["key"] for r in rows if r["status"] == "written"]
    by_key = {r["key"]: r for r in rows}
    for shard, key, meta in written:
        m = corpus_samples[key]
        with torch.no_grad():
            img = model.encode_image(preprocess(Image.open(io.BytesIO(m["jpg"])).convert("RGB"))[None],
                                     normalize=True)[0]
            txt = model.encode_text(tokenizer([m["txt"].decode()]), normalize=True)[0]
        want = float(img @ txt)
        assert meta["clip_score"] == pytest.approx(want, abs=1e-5), key
        assert by_key[key]["clip_score"] == pytest.approx(want, abs=1e-5)
        assert by_key[key]["shard"] == f"{shard}.tar"
        assert meta["uid"] == json.loads(m["json"])["uid"]  # the input's fields stay
        emb = read_embeddings(fsspec.filesystem("file"), str(out / "embeddings" / f"{shard}.npy"))
        [row] = emb[emb["key"] == key]
        assert row["image"].dtype == np.float16
        np.testing.assert_allclose(row["image"].astype(np.float32), img.numpy(), atol=2e-3)
        np.testing.assert_allclose(row["text"].astype(np.float32), txt.numpy(), atol=2e-3)
    # Keyed like the shards: embeddings/NNNNN.npy holds shards/NNNNN.tar's samples in its order.
    for tar in sorted((out / "shards").glob("*.tar")):
        emb = np.load(out / "embeddings" / f"{tar.stem}.npy")
        assert emb["key"].tolist() == [k for s, k, _ in written if s == tar.stem]
        assert np.allclose(np.linalg.norm(emb["image"].astype(np.float32), axis=1), 1, atol=2e-3)
    info = json.loads((out / "embeddings" / "model.json").read_text())
    sha = hashlib.sha256(trained.read_bytes()).hexdigest()
    assert info["model"]["pretrained_sha256"] == sha and info["model"]["name"] == "tiny-vit"
    assert info["dim"] == 64 and info["dtype"] == "float16"
    assert json.loads((out / "run.json").read_text())["model"]["pretrained_sha256"] == sha
    assert sorted(p.name for p in out.iterdir()) == ["embeddings", "manifest", "run.json", "score", "shards"]


@pytest.mark.parametrize("frac", [0.001, 0.1, 0.3, 0.5, 0.77, 1.0])
def test_quantile_rule_keeps_the_fraction_within_one_bin(frac):
    # Many ties and a narrow spread, as real CLIP scores have (most between 0.15 and 0.4).
    rng = np.random.default_rng(3)
    scores = np.concatenate([rng.normal(0.27, 0.04, 20_000), np.full(700, 0.3), rng.uniform(-1, 1, 50)])
    scores = np.clip(scores, -1, 1).astype(np.float32)
    bins = 2000
    b = score_bins(scores, bins)
    # The per-task histograms merge to the whole one: split the scores into 7 "tasks".
    hist = np.zeros(bins, np.int64)
    for part in np.array_split(scores, 7):
        k_, c_ = np.unique(score_bins(part, bins), return_counts=True)
        hist[k_] += c_
    k = top_frac_bin(hist, frac)
    kept = int((b >= k).sum())
    target = math.ceil(round(frac * len(scores), 9))
    # The bound: at least the fraction, and less than one bin (the threshold's) more.
    assert target <= kept < target + hist[k]
    assert int((b >= k + 1).sum()) < target  # the highest such bin
    assert top_frac_bin(np.zeros(bins, np.int64), frac) == bins  # nothing scored: nothing kept


def test_planted_mismatched_captions_score_lower_and_the_filter_removes_them(trained, tmp_path, capsys):
    import torch

    from scoring.model import Embedder, resolve_model

    truth = shape_corpus(tmp_path / "corpus", 80, 16, seed=2, plant=0.25)
    out = tmp_path / "out"
    assert run(tmp_path / "corpus", out, trained, "--clip-score-top-frac", "0.6", "--score-bins", "400") == 0
    rows = {r["key"]: r for r in manifest(out)}
    planted = [k for k, (_, p) in truth.items() if p]
    assert 12 <= len(planted) <= 30
    # Each planted caption against the same image's true caption, scored by the same model.
    threads = torch.get_num_threads()
    try:
        emb = Embedder(resolve_model(TINY, str(trained)), "cpu", 1)
    finally:
        torch.set_num_threads(threads)
    corpus = {}
    for tar in sorted((tmp_path / "corpus" / "shards").glob("*.tar")):
        with open(tar, "rb") as f:
            corpus.update(dict(iter_tar(f, str(tar))))
    img, txt = emb.embed(emb.decode_many([corpus[k]["jpg"] for k in planted]), [truth[k][0] for k in planted])
    true_scores = (img * txt).sum(1)
    wrong = np.array([rows[k]["clip_score"] for k in planted])
    assert (wrong < true_scores).mean() >= 0.9, list(zip(wrong, true_scores, strict=True))
    clean = np.array([r["clip_score"] for k, r in rows.items() if not truth[k][1]])
    assert np.median(wrong) < np.quantile(clean, 0.2)
    # Top 60%: the planted quarter is mostly below the threshold.
    dropped = {k for k, r in rows.items() if r["status"] == "dropped"}
    assert all(rows[k]["reason"] == "clip_score_low" for k in dropped)
    assert len(set(planted) & dropped) >= 0.8 * len(planted)
    summary = json.loads((out / "score" / "summary.json").read_text())
    k = summary["keep"]["threshold_bin"]
    hist = {int(b): c for b, c in summary["histogram"]["counts"].items()}
    target = 48  # 0.6 x 80
    assert target <= summary["keep"]["kept"] < target + hist[k]
    assert capsys.readouterr().out.strip().splitlines()[-1] == \
        f"rows in 80 = written {80 - len(dropped)} + dropped {len(dropped)} + failed 0"
    # The keep rules together: --clip-score-min on top of the quantile.
    cut = float(np.quantile([r["clip_score"] for r in rows.values()], 0.7))
    out2 = tmp_path / "out2"
    assert run(tmp_path / "corpus", out2, trained, "--clip-score-top-frac", "0.6", "--score-bins", "400",
               "--clip-score-min", str(cut)) == 0
    kept2 = {r["key"] for r in manifest(out2) if r["status"] == "written"}
    assert kept2 == {k for k, r in rows.items() if r["status"] == "written" and r["clip_score"] >= cut}


def test_resume_after_a_kill_equals_an_uninterrupted_run(trained, tmp_path, capsys, caplog, monkeypatch):
    import scoring.job as job

    shape_corpus(tmp_path / "corpus", 30, 6, seed=4, broken=True)
    ref = tmp_path / "ref"
    assert run(tmp_path / "corpus", ref, trained, "--clip-score-min", "0.0", "--samples-per-shard", "7") == 0
    ref_line = capsys.readouterr().out.strip().splitlines()[-1]

    out = tmp_path / "out"
    real = job.EmbedStep.run
    calls = []

    def dies_at_the_third(self, ctx, i, shared=None):
        calls.append(i)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what a kill between tasks leaves: two markers, nothing after
        return real(self, ctx, i, shared)

    monkeypatch.setattr(job.EmbedStep, "run", dies_at_the_third)
    assert run(tmp_path / "corpus", out, trained, "--clip-score-min", "0.0", "--samples-per-shard", "7") == 130
    monkeypatch.undo()
    assert len(list((out / "_steps" / "embed").glob("*.json"))) == 2
    assert not (out / "score").exists() and not (out / "shards").exists()
    # A write the kill cut short, under our temporary name.
    (out / "_work" / "00002.npy.tmp-99999-0123abcd").write_bytes(b"half")
    with caplog.at_level("INFO"):
        assert run(tmp_path / "corpus", out, trained, "--clip-score-min", "0.0", "--samples-per-shard", "7") == 0
    assert "embed: 5 tasks (2 done before)" in caplog.text
    assert capsys.readouterr().out.strip().splitlines()[-1] == ref_line
    assert ref_line.startswith("rows in 30 = written") and ref_line.endswith("failed 1")
    for sub in ("shards", "embeddings"):
        names = sorted(p.name for p in (ref / sub).iterdir())
        assert names == sorted(p.name for p in (out / sub).iterdir())
        for name in names:
            if name != "model.json":
                assert (ref / sub / name).read_bytes() == (out / sub / name).read_bytes(), name
    assert manifest(ref) == manifest(out)
    assert not (out / "_work").exists() and not (out / "_steps").exists()
    # Done: a rerun does nothing.
    assert run(tmp_path / "corpus", out, trained, "--clip-score-min", "0.0", "--samples-per-shard", "7") == 0
    assert "is complete; nothing to do" in capsys.readouterr().out
    # Other rules into the same folder: refused, naming the change.
    assert run(tmp_path / "corpus", out, trained, "--clip-score-min", "0.1", "--samples-per-shard", "7") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "keep.clip_score_min: 0.0 -> 0.1" in err[0], err


def test_decoding_ahead_of_the_model_gives_the_same_output(trained, tmp_path, monkeypatch):
    # A worker with several cores (and every GPU worker) decodes the next batch while the model runs this
    # one; a one-core worker does one after the other. Both give the same bytes.
    import scoring.job as job

    shape_corpus(tmp_path / "corpus", 21, 21, seed=9, broken=True)
    setup = job.EmbedStep.setup
    for prefetch in (False, True):
        def fixed(self, device, cpus, shared=None, prefetch=prefetch):
            emb = setup(self, device, cpus, shared)
            emb.prefetch = prefetch
            return emb

        monkeypatch.setattr(job.EmbedStep, "setup", fixed)
        assert run(tmp_path / "corpus", tmp_path / f"prefetch-{prefetch}", trained, "--batch-size", "4") == 0
    a, b = tmp_path / "prefetch-False", tmp_path / "prefetch-True"
    assert manifest(a) == manifest(b) and len(manifest(a)) == 21
    for sub in ("shards/00000.tar", "embeddings/00000.npy"):
        assert (a / sub).read_bytes() == (b / sub).read_bytes()


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("score-small")
    shape_corpus(root / "corpus", 6, 3, seed=5)
    return root / "corpus"


def _unsafe_checkpoint(path: Path) -> None:
    import argparse

    import torch

    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1)}, path)


@pytest.mark.parametrize("case", ["missing_corpus", "missing_model", "unknown_model", "missing_ckpt", "truncated_ckpt",
                                  "unsafe_ckpt", "other_model_ckpt", "uncached_tag", "unknown_tag", "top_frac",
                                  "score_min", "out_in_corpus"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(trained, small_corpus, tmp_path, capsys, case):
    import torch

    corpus, model, ckpt, out, extra = str(small_corpus), TINY, str(trained), tmp_path / "out", []
    needle = {"missing_corpus": "corpus folder does not exist", "missing_model": "model config file not found",
              "unknown_model": "not an open_clip model name", "missing_ckpt": "checkpoint not found",
              "truncated_ckpt": "truncated, or not a torch checkpoint", "unsafe_ckpt": "untrusted content, not loaded",
              "other_model_ckpt": "its weights do not fit model tiny-vit",
              "uncached_tag": "not in the local cache, and this job never downloads",
              "unknown_tag": "neither a checkpoint file nor an open_clip pretrained tag",
              "top_frac": "--clip-score-top-frac is a fraction in (0, 1]", "score_min": "in [-1, 1]",
              "out_in_corpus": "--out must lie outside the corpus folder"}[case]
    if case == "missing_corpus":
        corpus = str(tmp_path / "nope")
    elif case == "missing_model":
        model = str(tmp_path / "nope.json")
    elif case == "unknown_model":
        model = "ViT-Nope-99"
    elif case == "missing_ckpt":
        ckpt = str(tmp_path / "nope.pt")
    elif case == "truncated_ckpt":
        ckpt = str(tmp_path / "truncated.pt")
        Path(ckpt).write_bytes(trained.read_bytes()[:4000])
    elif case == "unsafe_ckpt":
        ckpt = str(tmp_path / "unsafe.pt")
        _unsafe_checkpoint(Path(ckpt))
    elif case == "other_model_ckpt":
        ckpt = str(tmp_path / "other.pt")
        torch.save({"state_dict": {"visual.proj": torch.zeros(3, 3)}}, ckpt)
    elif case == "uncached_tag":
        model, ckpt = "RN50", "openai"
    elif case == "unknown_tag":
        ckpt = "no-such-tag"
    elif case == "top_frac":
        extra = ["--clip-score-top-frac", "1.5"]
    elif case == "score_min":
        extra = ["--clip-score-min", "2"]
    else:
        out = small_corpus / "scored"
    rc = main(["--corpus", corpus, "--out", str(out), "--model", model, "--clip-pretrained", ckpt,
               "--executor", "local", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert err[0].startswith("score_corpus: error: ")
    assert not out.exists()


def test_an_img2dataset_corpus_on_s3(trained, tmp_path, s3, capsys):
    """img2dataset's layout (NNNNN.tar + NNNNN_stats.json, no sizes.json) read from s3 through fsspec;
    output on s3 and on local disk."""
    truth = shape_corpus(tmp_path / "c", 10, 10, seed=6)
    fs = s3.fs()
    with open(tmp_path / "c" / "shards" / "00000.tar", "rb") as f:
        samples = list(iter_tar(f))
    for i, part in enumerate((samples[:6], samples[6:])):
        buf = io.BytesIO()
        write_tar(buf, part)
        fs.pipe(f"{s3.bucket}/i2d/{i:05d}.tar", buf.getvalue())
        fs.pipe(f"{s3.bucket}/i2d/{i:05d}_stats.json", json.dumps({"successes": len(part)}).encode())
    lines = []
    for out in (s3.url("scored"), str(tmp_path / "scored")):
        assert main(["--corpus", s3.url("i2d"), "--out", out, "--model", TINY, "--clip-pretrained", str(trained),
                     "--executor", "local", "--clip-score-top-frac", "0.5"]) == 0
        lines.append(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((tmp_path / "scored" / "score" / "summary.json").read_text())
    kept, k = summary["keep"]["kept"], summary["keep"]["threshold_bin"]
    assert 5 <= kept < 5 + summary["histogram"]["counts"][str(k)]  # the top half, to one bin
    assert lines == [f"rows in 10 = written {kept} + dropped {10 - kept} + failed 0"] * 2
    fs.invalidate_cache()
    keys = sorted(k for k in s3.keys() if k.startswith("scored/"))
    assert keys == ["scored/embeddings/00000.npy", "scored/embeddings/model.json", "scored/manifest/00000.parquet",
                    "scored/manifest/00001.parquet", "scored/run.json", "scored/score/summary.json",
                    "scored/shards/00000.parquet", "scored/shards/00000.tar", "scored/shards/sizes.json"]
    remote = read_embeddings(fs, f"{s3.bucket}/scored/embeddings/00000.npy")
    local = np.load(tmp_path / "scored" / "embeddings" / "00000.npy")
    assert remote.tobytes() == local.tobytes() and len(local) == kept
    assert set(local["key"].tolist()) <= set(truth)


@pytest.mark.slow
def test_ray_actor_pool_gives_the_same_result_and_replaces_a_dead_actor(trained, tmp_path, caplog):
    from pipeline.executor import RayExecutor
    from pipeline.job import run_step
    from pipeline.rundir import RunDir
    from scoring.job import ScoreConfig, run_score
    from tests.actor_helpers import DiesOnce

    shape_corpus(tmp_path / "corpus", 24, 4, seed=8)
    assert run(tmp_path / "corpus", tmp_path / "local", trained, "--clip-score-top-frac", "0.5") == 0
    cfg = ScoreConfig(corpus=str(tmp_path / "corpus"), out=str(tmp_path / "ray"), model=TINY,
                      clip_pretrained=str(trained), batch_size=16, clip_score_top_frac=0.5)
    with caplog.at_level("INFO"), RayExecutor(num_cpus=2) as ex:
        run_score(cfg, ex)
        assert "embed: 2 cpu actor(s) of 1 CPU(s)" in caplog.text
        rd = RunDir(str(tmp_path / "dies"), "test")
        summaries = run_step(rd, DiesOnce(4, str(tmp_path / "died")), ex, shared=ex.put({"w": 1}))
    died = int((tmp_path / "died").read_text())
    assert [s["task"] for s in summaries] == [0, 1, 2, 3]
    assert summaries[0]["task_pid"] != died and "an actor died" in caplog.text  # task 0 again, elsewhere
    assert all(s["task_pid"] == s["pid"] and s["cpus"] == 1 and s["device"] == "cpu" for s in summaries)
    assert all(s["shared"] == {"w": 1} for s in summaries)  # setup got the step's shared object
    assert manifest(tmp_path / "local") == manifest(tmp_path / "ray")
    for sub in ("shards", "embeddings"):
        for p in sorted((tmp_path / "local" / sub).iterdir()):
            if p.name != "model.json":
                assert p.read_bytes() == (tmp_path / "ray" / sub / p.name).read_bytes(), p


def test_build_corpus_clip_filter_scores_its_own_output(trained, tmp_path, web, capsys):
    """build_corpus --clip-filter: the same steps over the build's parts, after its own filters and dedup."""
    import pyarrow as pa
    from conftest import build_args

    from jobs.build_corpus import main as build_main
    from pipeline.localweb import populate_images

    rows = populate_images(web, 40, seed=21)
    rng = random.Random(5)
    planted = set()
    for i in range(0, 40, 4):  # a caption of another colour and shape
        color, shape = rows[i]["label"].split()
        rows[i]["caption"] = _caption(rng, rng.choice([c for c in COLORS if c != color]),
                                      rng.choice([s for s in SHAPES if s != shape]))
        planted.add(rows[i]["uid"])
    rows.append(dict(rows[3]))  # a duplicate URL: dropped by the build before any scoring
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "urls.parquet")
    out = tmp_path / "out"
    argv = build_args(tmp_path / "urls.parquet", out, web, "--executor", "local", "--clip-filter", TINY,
                      "--clip-pretrained", str(trained), "--clip-score-top-frac", "0.7", "--clip-batch-size", "8")
    assert build_main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    recs = pq.read_table(out / "manifest").sort_by("row").to_pylist()
    stats = json.loads((out / "stats.json").read_text())
    kept, k = stats["clip"]["keep"]["kept"], stats["clip"]["keep"]["threshold_bin"]
    assert 28 <= kept < 28 + stats["clip"]["histogram"]["counts"][str(k)]  # the top 0.7 of 40 scored, to one bin
    low = [r for r in recs if r["reason"] == "clip_score_low"]
    assert len(low) == 40 - kept and sum(r["status"] == "written" for r in recs) == kept
    assert lines[-1] == f"rows in 41 = written {kept} + dropped {41 - kept} + failed 0"
    assert any(line.startswith("CLIP-score filter: scored 40 samples with tiny-vit") for line in lines)
    assert [r["reason"] for r in recs if r["status"] == "dropped" and r["reason"] != "clip_score_low"] == \
        ["duplicate_url"]
    written = shard_samples(out)
    uid = {k: meta["uid"] for _, k, meta in written}
    scores = {k: meta["clip_score"] for _, k, meta in written}
    by_key = {r["key"]: r for r in recs}
    assert all(by_key[k]["clip_score"] == s for k, s in scores.items())
    assert min(scores.values()) >= max(r["clip_score"] for r in low)  # the kept are the top of the scored
    kept_planted = [k for k, u in uid.items() if u in planted]
    assert len(kept_planted) <= 2, kept_planted  # the mismatched captions are the ones dropped
    for tar in sorted((out / "shards").glob("*.tar")):
        emb = np.load(out / "embeddings" / f"{tar.stem}.npy")
        assert emb["key"].tolist() == [k for s, k, _ in written if s == tar.stem]
    assert stats["reasons"]["dropped:clip_score_low"] == 40 - kept
    assert json.loads((out / "run.json").read_text())["clip_model"]["pretrained_sha256"] == \
        hashlib.sha256(trained.read_bytes()).hexdigest()
    assert not (out / "_clip").exists() and not (out / "parts").exists()


def test_build_corpus_drops_near_duplicates_before_scoring(trained, tmp_path, web, capsys):
    """--dedup-within with --clip-filter: near-duplicates are dropped first and never scored."""
    import pyarrow as pa
    from conftest import build_args

    from jobs.build_corpus import main as build_main
    from pipeline.localweb import Resource, populate_images

    rows = populate_images(web, 20, seed=21)
    for i in range(3):  # other bytes (no exact duplicate), the same picture, a caption of its own
        body = web.resources[rows[i]["url"][len(web.base):]].body + b"\x00"
        rows.append({**rows[i], "url": web.add(f"/copy{i}.jpg", Resource(body, "image/jpeg")),
                     "caption": f"copy {i} with its own words here", "uid": f"c{i}"})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "urls.parquet")
    out = tmp_path / "out"
    assert build_main(build_args(tmp_path / "urls.parquet", out, web, "--executor", "local", "--clip-filter", TINY,
                                 "--clip-pretrained", str(trained), "--clip-score-top-frac", "0.7",
                                 "--clip-batch-size", "8", "--dedup-within", "image")) == 0
    printed = capsys.readouterr().out
    recs = pq.read_table(out / "manifest").sort_by("row").to_pylist()
    near = [(r["row"], r["duplicate_of"], r["clip_score"]) for r in recs if r["reason"] == "near_duplicate:image"]
    assert near == [(20, "000000000", None), (21, "000000001", None), (22, "000000002", None)]
    assert "CLIP-score filter: scored 20 samples" in printed
    assert printed.strip().splitlines()[-1].startswith("rows in 23 = ")


def test_clip_flags_of_build_corpus_match_score_corpus_and_need_a_model(capsys):
    from pipeline.config import BuildConfig
    from scoring.job import ScoreSettings

    b, s = BuildConfig(urls="u", out="o", clip_filter=TINY, clip_pretrained="x.pt"), ScoreSettings(model="m",
                                                                                                   clip_pretrained="p")
    got = b.clip_settings()
    assert (got.score_bins, got.batch_size, got.device, got.cpus_per_actor) == \
        (s.score_bins, s.batch_size, s.device, s.cpus_per_actor)
    assert "clip_filter" not in BuildConfig(urls="u", out="o").output_settings()  # older runs still resume
    from jobs.build_corpus import main as build_main

    assert build_main(["--urls", "u.parquet", "--out", "o", "--clip-score-min", "0.3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--clip-score-min: only with --clip-filter MODEL" in err[0], err
