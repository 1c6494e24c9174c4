"""score_corpus under a hostile user (issue 11, items 1-3): garbage checkpoints, odd keep rules, damaged
corpora and outputs, local and object storage. Untrained tiny-vit weights are enough for all of it (a
score is a score); the scores against open_clip's own are in test_score.py."""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from train_helpers import TINY

from jobs.score_corpus import main
from pipeline.localweb import COLORS, SHAPES, encode, make_image
from pipeline.shards import iter_tar, write_tar

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A checkpoint as OpenCLIP writes one, of untrained tiny-vit weights (a second, not a training run)."""
    import open_clip
    import torch

    open_clip.add_model_config(TINY)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hostile-ckpt") / "tiny.pt"
    torch.save({"epoch": 1, "name": "tiny-vit",
                "state_dict": open_clip.create_model("tiny-vit", pretrained=None).state_dict()}, path)
    return path


def sample(i: int, rng: random.Random, **members: bytes | None) -> tuple[str, dict[str, bytes]]:
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    m: dict[str, bytes | None] = {"jpg": encode(make_image(shape, color, (48, 48), rng), "jpg"),
                                  "txt": f"a {color} {shape}".encode(), "json": json.dumps({"uid": f"u{i}"}).encode()}
    m.update(members)
    return f"{i:09d}", {k: v for k, v in m.items() if v is not None}


def tar_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buf = io.BytesIO()
    write_tar(buf, samples)
    return buf.getvalue()


def make_corpus(root: Path, shards: list[list[tuple[str, dict[str, bytes]]]]) -> Path:
    """ROOT/shards/NNNNN.tar with sizes.json, as build_corpus writes them (empty shards included)."""
    (root / "shards").mkdir(parents=True)
    for i, s in enumerate(shards):
        (root / "shards" / f"{i:05d}.tar").write_bytes(tar_bytes(s))
    (root / "shards" / "sizes.json").write_text(json.dumps({f"{i:05d}.tar": len(s) for i, s in enumerate(shards)}))
    return root


def simple_corpus(root: Path, n: int, per: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    samples = [sample(i, rng) for i in range(n)]
    return make_corpus(root, [samples[i:i + per] for i in range(0, n, per)])


def run(corpus: Path | str, out: Path | str, ckpt: Path | str, *extra: str) -> int:
    return main(["--corpus", str(corpus), "--out", str(out), "--model", TINY, "--clip-pretrained", str(ckpt),
                 "--executor", "local", "--batch-size", "4", *extra])


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("score_corpus: error: "), err
    return err[0]


def manifest(out: Path) -> list[dict]:
    return pq.read_table(out / "manifest").sort_by("row").to_pylist()


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- the checkpoint ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_diverged_checkpoint_is_refused_before_anything_is_written(ckpt, tmp_path, capsys, value):
    # It loads and runs, but every score is NaN: this crashed with a traceback in the histogram (a NaN has
    # no bin) after the whole corpus was embedded, leaving run.json and scratch behind.
    import torch

    bad = tmp_path / "diverged.pt"
    state = torch.load(ckpt, weights_only=True)
    state["state_dict"]["visual.proj"][0, 0] = value
    torch.save(state, bad)
    corpus = simple_corpus(tmp_path / "c", 4, 4)
    assert run(corpus, tmp_path / "out", bad) == 2
    err = one_error(capsys)
    assert str(bad) in err and "weight visual.proj holds NaN or infinite values" in err, err
    assert not (tmp_path / "out").exists()


def test_a_model_that_overflows_is_bad_input_and_leaves_nothing(ckpt, tmp_path, capsys):
    # Finite weights, infinite activations: the same NaN scores, found while embedding.
    import torch

    bad = tmp_path / "overflows.pt"
    state = torch.load(ckpt, weights_only=True)
    state["state_dict"]["visual.proj"].fill_(3e38)
    torch.save(state, bad)
    corpus = simple_corpus(tmp_path / "c", 4, 2)
    assert run(corpus, tmp_path / "out", bad) == 2
    err = one_error(capsys)
    assert f"{bad}: the model gives a non-finite score (sample 000000000 of {corpus / 'shards' / '00000.tar'})" in err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_replaced_while_it_is_read_is_refused(ckpt, tmp_path, capsys, monkeypatch):
    # The hash was taken in one read and the weights in another: a trainer replacing latest.pt in between
    # made model.json record one file's sha256 beside another file's scores.
    import hashlib

    import torch

    import scoring.model

    latest, newer = tmp_path / "latest.pt", tmp_path / "newer.pt"
    latest.write_bytes(ckpt.read_bytes())
    torch.save({**torch.load(ckpt, weights_only=True), "epoch": 2}, newer)

    class ReplacedAfterHashing:
        def __init__(self):
            self.h = hashlib.sha256()

        def update(self, data):
            self.h.update(data)

        def hexdigest(self):
            if newer.exists():
                os.replace(newer, latest)  # what the trainer's atomic save does
            return self.h.hexdigest()

    monkeypatch.setattr(scoring.model, "hashlib", type("H", (), {"sha256": ReplacedAfterHashing}))
    corpus = simple_corpus(tmp_path / "c", 2, 2)
    assert run(corpus, tmp_path / "out", latest) == 2
    assert f"{latest}: the file changed while it was read" in one_error(capsys)
    assert not (tmp_path / "out").exists()


def test_garbage_checkpoints_are_refused_in_one_line_and_nothing_runs(ckpt, tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    corpus = simple_corpus(tmp_path / "c", 2, 2)
    raw = tmp_path / "raw-pickle.pt"  # a plain pickle, not torch's zip format
    raw.write_bytes(pickle.dumps({"state_dict": Evil()}))
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    cases = {raw: "untrusted content, not loaded", tmp_path / "empty.pt": "truncated, or not a torch checkpoint",
             # The folder was "checkpoint not found", which it is not.
             tmp_path / "run" / "checkpoints": "is a folder, not a checkpoint file"}
    for path, needle in cases.items():
        assert run(corpus, tmp_path / "out", path) == 2
        err = one_error(capsys)
        assert f"{path}: " in err and needle in err, err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def test_a_checkpoint_url_that_is_not_on_the_store_is_bad_input(ckpt, tmp_path, s3, capsys):
    corpus = simple_corpus(tmp_path / "c", 2, 2)
    for url in (s3.url("runs/nope.pt"), "s3://no-such-bucket-cf/nope.pt"):
        assert run(corpus, s3.url("out"), url) == 2
        assert f"{url}: --clip-pretrained checkpoint not found" in one_error(capsys)
    assert s3.keys() == []


# -- keep rules ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flag", "value", "needle"), [
    ("--clip-score-top-frac", "0", "is a fraction in (0, 1]"), ("--clip-score-top-frac", "1.5", "is a fraction"),
    ("--clip-score-top-frac", "-0.3", "is a fraction"), ("--clip-score-top-frac", "nan", "must be a finite number"),
    ("--clip-score-top-frac", "inf", "must be a finite number"), ("--clip-score-min", "nan", "finite number"),
    ("--clip-score-min", "-1.01", "in [-1, 1]"), ("--score-bins", "5", "--score-bins must be 10..1000000"),
])
def test_keep_rules_out_of_range_are_bad_input(tmp_path, capsys, flag, value, needle):
    assert run(tmp_path / "c", tmp_path / "out", "x.pt", flag, value) == 2
    assert needle in one_error(capsys)
    assert not (tmp_path / "out").exists()


def test_top_frac_1_keeps_every_scored_sample_and_both_rules_intersect(ckpt, tmp_path, capsys):
    corpus = simple_corpus(tmp_path / "c", 10, 5)
    assert run(corpus, tmp_path / "all", ckpt, "--clip-score-top-frac", "1") == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "rows in 10 = written 10 + dropped 0 + failed 0"
    scores = sorted(r["clip_score"] for r in manifest(tmp_path / "all"))
    cut = (scores[6] + scores[7]) / 2  # the top 3 by --clip-score-min; the top half by the quantile
    assert run(corpus, tmp_path / "both", ckpt, "--clip-score-top-frac", "0.5", "--clip-score-min", str(cut)) == 0
    rows = manifest(tmp_path / "both")
    assert sorted(r["clip_score"] for r in rows if r["status"] == "written") == scores[7:]
    assert {r["reason"] for r in rows if r["status"] != "written"} == {"clip_score_low"}


# -- the corpus ------------------------------------------------------------------------------------------


def test_an_empty_first_shard_does_not_shrink_the_output_shards(ckpt, tmp_path, capsys):
    # The output's shard size defaulted to the first input shard's: an empty one gave a shard per sample.
    rng = random.Random(1)
    corpus = make_corpus(tmp_path / "c", [[], [sample(i, rng) for i in range(5)], [sample(i, rng) for i in range(5, 9)]])
    out = tmp_path / "out"
    assert run(corpus, out, ckpt) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "rows in 9 = written 9 + dropped 0 + failed 0"
    assert json.loads((out / "shards" / "sizes.json").read_text()) == {"00000.tar": 5, "00001.tar": 4}
    assert sorted(p.name for p in (out / "embeddings").iterdir()) == ["00000.npy", "00001.npy", "model.json"]


def test_bad_samples_are_counted_under_their_reasons_and_a_repeated_key_keeps_the_first(ckpt, tmp_path, capsys):
    # A key twice in one shard: the writer and the embeddings find samples by key, so both were written with
    # the second one's score and embeddings. Now the second fails as duplicate_key; the first is intact.
    import torch

    from scoring.model import Embedder, resolve_model

    rng = random.Random(2)
    first, second = sample(0, rng), sample(0, rng)
    rows = [first, sample(1, rng, txt=None), sample(2, rng, json=b"[1, 2"), sample(3, rng, jpg=None),
            sample(4, rng, jpg=b"\xff\xd8\xff not a jpeg"), sample(5, rng), second]
    corpus = make_corpus(tmp_path / "c", [rows])
    out = tmp_path / "out"
    assert run(corpus, out, ckpt) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "rows in 7 = written 2 + dropped 0 + failed 5"
    got = [(r["key"], r["status"], r["reason"]) for r in manifest(out)]
    assert got == [("000000000", "written", None), ("000000001", "failed", "missing_txt"),
                   ("000000002", "failed", "unreadable_json"), ("000000003", "failed", "missing_image"),
                   ("000000004", "failed", "undecodable_image"), ("000000005", "written", None),
                   ("000000000", "failed", "duplicate_key")]
    threads = torch.get_num_threads()
    try:
        emb = Embedder(resolve_model(TINY, str(ckpt)), "cpu", 1)
    finally:
        torch.set_num_threads(threads)
    img, txt = emb.embed(emb.decode_many([first[1]["jpg"], second[1]["jpg"]]),
                         [first[1]["txt"].decode(), second[1]["txt"].decode()])
    with open(out / "shards" / "00000.tar", "rb") as f:
        written = list(iter_tar(f))
    assert [k for k, _ in written] == ["000000000", "000000005"]
    assert written[0][1]["jpg"] == first[1]["jpg"]
    assert json.loads(written[0][1]["json"])["clip_score"] == pytest.approx(float(img[0] @ txt[0]), abs=1e-5)
    stored = np.load(out / "embeddings" / "00000.npy")
    assert stored["key"].tolist() == ["000000000", "000000005"]
    np.testing.assert_allclose(stored["image"][0].astype(np.float32), img[0], atol=2e-3)
    np.testing.assert_allclose(stored["text"][0].astype(np.float32), txt[0], atol=2e-3)


def test_a_key_the_shard_writer_refuses_fails_that_sample_not_the_job(ckpt, tmp_path, capsys):
    # webdataset takes any key without a dot; the shard writer does not. The writer failed the whole job after
    # every sample was embedded, and each rerun met the same key again.
    import tarfile

    rng = random.Random(3)
    (tmp_path / "c" / "shards").mkdir(parents=True)
    with tarfile.open(tmp_path / "c" / "shards" / "00000.tar", "w") as tar:
        for key in ("good-1", "a b", "über", "good_2"):
            for ext, data in sample(0, rng)[1].items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (tmp_path / "c" / "shards" / "sizes.json").write_text('{"00000.tar": 4}')
    out = tmp_path / "out"
    assert run(tmp_path / "c", out, ckpt) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "rows in 4 = written 2 + dropped 0 + failed 2"
    assert [(r["key"], r["reason"]) for r in manifest(out)] == [("good-1", None), ("a b", "bad_key"),
                                                                 ("über", "bad_key"), ("good_2", None)]
    assert np.load(out / "embeddings" / "00000.npy")["key"].tolist() == ["good-1", "good_2"]


@pytest.mark.parametrize("damage", ["truncated", "sizes"])
def test_a_damaged_input_shard_is_exit_2_leaves_nothing_and_the_repaired_corpus_then_runs(ckpt, tmp_path, capsys,
                                                                                       damage):
    # Found by the embed task, after run.json was written: it stayed, and the rerun after the repair was
    # refused as a run "with other input" (the corpus digest had changed).
    corpus = simple_corpus(tmp_path / "c", 6, 2)
    tar = corpus / "shards" / "00001.tar"
    good = tar.read_bytes()
    if damage == "truncated":
        tar.write_bytes(good[:3000])
        needle = f"{tar}: not a readable tar"
    else:
        sizes = json.loads((corpus / "shards" / "sizes.json").read_text())
        (corpus / "shards" / "sizes.json").write_text(json.dumps({**sizes, "00001.tar": 3}))
        needle = f"{tar}: holds 2 samples, its sizes.json says 3"
    out = tmp_path / "out"
    assert run(corpus, out, ckpt) == 2
    assert needle in one_error(capsys)
    assert not out.exists()
    tar.write_bytes(good)
    (corpus / "shards" / "sizes.json").write_text(json.dumps({f"{i:05d}.tar": 2 for i in range(3)}))
    assert run(corpus, out, ckpt) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "rows in 6 = written 6 + dropped 0 + failed 0"


def test_a_local_corpus_scored_into_object_storage(ckpt, tmp_path, s3, capsys):
    # The shard writer read the input tars from --out's store: "The specified bucket does not exist".
    corpus = simple_corpus(tmp_path / "c", 6, 3)
    assert run(corpus, s3.url("scored"), ckpt, "--clip-score-top-frac", "0.5") == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("rows in 6 = written ") and line.endswith(" failed 0")
    assert run(corpus, tmp_path / "local", ckpt, "--clip-score-top-frac", "0.5") == 0
    local = tmp_path / "local"
    fs = s3.fs()
    for name in ("shards/00000.tar", "embeddings/00000.npy", "shards/sizes.json"):
        assert fs.cat_file(f"{s3.bucket}/scored/{name}") == (local / name).read_bytes(), name


# -- the output ------------------------------------------------------------------------------------------


def test_a_finished_output_missing_a_shard_is_exit_1_and_the_way_out_works(ckpt, tmp_path, capsys):
    # A rerun said "complete; nothing to do" (exit 0) over a folder that had lost a shard or its embeddings.
    corpus = simple_corpus(tmp_path / "c", 6, 2)
    out = tmp_path / "out"
    assert run(corpus, out, ckpt) == 0
    ref = tree(out)
    for lost in ("shards/00001.tar", "embeddings/00002.npy"):
        (out / lost).unlink()
        capsys.readouterr()
        assert run(corpus, out, ckpt) == 1
        err = one_error(capsys)
        assert f"{out}: a finished scoring, but {Path(lost).name} missing; delete {out / 'score' / 'summary.json'}" \
            in err, err
        (out / "score" / "summary.json").unlink()
        assert run(corpus, out, ckpt) == 0
        assert tree(out) == ref


@pytest.mark.parametrize("scratch", ["00001.npy", "00001.scores.parquet"])
def test_a_damaged_scratch_file_is_exit_1_naming_it_with_the_way_out(ckpt, tmp_path, capsys, monkeypatch, scratch):
    # Behind a finished marker, a garbage scratch file was retried, then "rerun the same command to resume",
    # which met the same file again; the line named no file.
    import scoring.job as job

    corpus = simple_corpus(tmp_path / "c", 6, 2)

    def killed(self, *args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(job.SettleStep, "run", killed)
    out = tmp_path / "out"
    assert run(corpus, out, ckpt) == 130
    monkeypatch.undo()
    (out / "_work" / scratch).write_bytes(b"garbage")
    capsys.readouterr()
    assert run(corpus, out, ckpt) == 1
    err = one_error(capsys)
    assert f"{out / '_work' / scratch}: not a" in err and f"delete {out / '_steps'} and rerun" in err, err
    shutil.rmtree(out / "_steps")
    assert run(corpus, out, ckpt) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "rows in 6 = written 6 + dropped 0 + failed 0"


def test_a_kill_while_writing_shards_then_a_rerun_equals_one_run(ckpt, tmp_path, capsys, monkeypatch):
    import scoring.job as job

    corpus = simple_corpus(tmp_path / "c", 12, 3)
    args = ("--clip-score-top-frac", "0.5", "--samples-per-shard", "2")
    assert run(corpus, tmp_path / "ref", ckpt, *args) == 0
    real, calls = job.write_embeddings, []

    def dies_after_the_second_shard(fs, path, arr):
        real(fs, path, arr)
        if "/embeddings/" in path:
            calls.append(path)
            if len(calls) == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(job, "write_embeddings", dies_after_the_second_shard)
    out = tmp_path / "out"
    assert run(corpus, out, ckpt, *args) == 130
    monkeypatch.undo()
    assert (out / "embeddings" / "00000.npy").exists() and not (out / "score").exists()
    assert run(corpus, out, ckpt, *args) == 0
    assert tree(out) == tree(tmp_path / "ref")  # shards, embeddings, manifests, model.json, run.json: byte for byte
    # Into the same output with another rule, or another checkpoint file (other bytes, the same weights): refused
    # in one line, nothing changed.
    import torch

    other = tmp_path / "other.pt"
    torch.save({**torch.load(ckpt, weights_only=True), "epoch": 2}, other)
    before = tree(out)
    capsys.readouterr()
    assert run(corpus, out, ckpt, "--clip-score-top-frac", "0.4", "--samples-per-shard", "2") == 2
    assert "keep.clip_score_top_frac: 0.5 -> 0.4" in one_error(capsys)
    assert run(corpus, out, other, *args) == 2
    assert "model.pretrained_sha256: " in one_error(capsys)
    assert tree(out) == before
