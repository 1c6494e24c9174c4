"""End to end: torchrun training, exact resume, checkpoints in open_clip, bad input."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from train_helpers import REPO, TINY, run, torchrun, train

from pipeline.localweb import CLASSES, write_imagefolder, write_retrieval
from training.checkpoint import find_latest, load_checkpoint
from training.config import ModelConfig
from training.dist import DistInfo, set_cpu_threads
from training.model import build_model
from training.synthetic import write_shape_shards

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("train-data")
    write_shape_shards(d / "shards", 1024, 64, seed=0, size=48)
    write_imagefolder(d / "zs", per_class=4, seed=100, size=48)
    write_retrieval(d / "ret", n=48, seed=200, size=48)
    return d


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_torchrun_two_ranks_trains_checkpoints_and_evaluates(data, tmp_path):
    out = tmp_path / "run"
    r = torchrun(2, REPO / "training/train.py",
                 "--train-data", f"{data}/shards/{{00000..00015}}.tar", "--model", TINY,
                 "--batch-size", "32", "--epochs", "4", "--workers", "1", "--lr", "2e-3", "--wd", "0.1",
                 "--warmup", "8", "--zeroshot", f"shapes={data}/zs", "--retrieval", f"ret={data}/ret",
                 "--eval-every", "24", "--save-every", "10", "--keep-last", "2", "--log-every", "8",
                 "--output", str(out), timeout=280)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "global batch 64 = 32 per rank x 2 ranks x 1 accum; 16 steps/epoch, 64 steps" in r.stderr

    results = jsonl(out / "results.jsonl")
    zs = [x for x in results if x["set"] == "shapes"]
    # Every 24 steps and at each of the 4 epoch ends (steps 16, 32, 48, 64), once where they coincide.
    assert [x["step"] for x in zs] == [16, 24, 32, 48, 64]
    final = zs[-1]
    assert final["items"] == 4 * len(CLASSES) and set(final["per_class"]) == set(CLASSES)
    chance = 1 / len(CLASSES)
    assert final["top1"] > 4 * chance, final  # the easy task is learned, not guessed
    ret = [x for x in results if x["set"] == "ret"][-1]
    assert {"i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"} <= set(ret)
    assert ret["i2t_R@10"] > 10 / 48

    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*.pt"))
    best = json.loads((out / "checkpoints/best.json").read_text())
    assert ckpts[-2:] == ["step_00000060.pt", "step_00000064.pt"]
    assert best["file"] in ckpts and len(ckpts) == len({*ckpts[-2:], best["file"]})
    assert best["value"] == max(x["top1"] for x in zs if x["step"] % 16 == 0)  # scored checkpoints
    assert not list((out / "checkpoints").glob("*.tmp*"))
    ckpt = load_checkpoint(out / "checkpoints/step_00000064.pt")
    assert ckpt["epoch"] == 4 and ckpt["step"] == 64 and ckpt["config"]["run"]["world_size"] == 2
    assert ckpt["data"] == {"epoch": 4, "batch": 0, "consumed": [[0], [0]],
                            "bad": {"before_epoch": [0, 0], "in_epoch": [[], []]}}
    assert set(ckpt["versions"]) == {"torch", "open_clip", "webdataset"}

    log = jsonl(out / "train_log.jsonl")
    assert log[-1]["step"] == 64 and log[-1]["loss"] < log[0]["loss"]
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "config.yaml").is_file() and list((out / "tb").glob("events.out.tfevents.*"))


def _trace(out: Path) -> dict[int, dict]:
    return {rec["step"]: rec for rec in jsonl(out / "trace-rank0.jsonl")}  # last record of a step wins


def test_exact_resume(data, tmp_path):
    common = ["--train-data", f"{data}/shards/{{00000..00007}}.tar", "--model", TINY, "--batch-size", "16",
              "--accum-freq", "2", "--epochs", "2", "--workers", "2", "--warmup", "3", "--trace-samples",
              "--train-num-samples", "320", "--log-every", "5"]
    full = tmp_path / "full"
    r = train(*common, "--output", str(full))
    assert r.returncode == 0, r.stderr[-3000:]
    part = tmp_path / "part"
    for extra in (["--stop-after", "4"], ["--resume", "latest", "--stop-after", "13"], ["--resume", "latest"]):
        r = train(*common, "--output", str(part), *extra)
        assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "step 13, epoch 1" in r.stderr
    a, b = _trace(full), _trace(part)
    assert sorted(a) == sorted(b) == list(range(1, 21))  # 320 // (16 * 2) = 10 steps per epoch
    for step in a:
        assert a[step]["keys"] == b[step]["keys"], step
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-6, abs=1e-6), step
    fa = torch.load(full / "checkpoints/step_00000020.pt", weights_only=True)["state_dict"]
    fb = torch.load(part / "checkpoints/step_00000020.pt", weights_only=True)["state_dict"]
    assert all(torch.allclose(fa[k], fb[k], atol=1e-6) for k in fa)

    # Changing the batch size (or world size) would change the data stream: refused, saying what changed.
    r = train(*[c if c != "16" else "8" for c in common], "--output", str(part), "--resume", "latest")
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "--batch-size: 16 -> 8" in errors[0]

    # A shorter epoch would leave the saved position past its end, where the epoch loop never ends.
    shorter = [c if c != "320" else "160" for c in common]
    r = train(*shorter, "--output", str(part), "--resume", "latest", timeout=90)
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "samples per epoch (--train-num-samples, else sizes.json): 320 -> 160" in errors[0]
    ckpt = torch.load(part / "checkpoints/step_00000013.pt", weights_only=True)
    ckpt["data"]["batch"] = 40  # a position no epoch of 10 steps x 2 micro-batches has
    torch.save(ckpt, tmp_path / "past_end.pt")
    r = train(*common, "--output", str(part), "--resume", str(tmp_path / "past_end.pt"), timeout=90)
    assert r.returncode == 2 and "micro-batch 40 lies outside an epoch of 20 micro-batches" in r.stderr, r.stderr[-2000:]
    # Going back to an earlier checkpoint in the same folder would mix two histories there.
    r = train(*common, "--output", str(part), "--resume", str(part / "checkpoints/step_00000013.pt"), timeout=90)
    assert r.returncode == 2 and "step 13, but" in r.stderr and "up to step_00000020.pt" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("siglip", [False, True])
def test_checkpoint_loads_in_open_clip(data, tmp_path, siglip):
    out = tmp_path / "run"
    r = train("--train-data", f"{data}/shards/{{00000..00003}}.tar", "--model", TINY, "--batch-size", "32",
              "--epochs", "1", "--workers", "1", "--output", str(out), *(["--siglip"] if siglip else []))
    assert r.returncode == 0, r.stderr[-3000:]
    path = find_latest(out / "checkpoints")
    name = torch.load(path, weights_only=True)["name"]
    # As the README says: register OUT/model, then load the checkpoint by the name it records.
    # SigLIP's logit bias must be in that config, or open_clip builds a model without one.
    assert name == ("tiny-vit-sigmoid" if siglip else "tiny-vit") and (out / f"model/{name}.json").is_file()
    fresh_process = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
                     "m = open_clip.create_model_and_transforms(sys.argv[2], pretrained=sys.argv[3])[0]; "
                     "print('logit_bias', m.logit_bias is not None)")
    r = run([sys.executable, "-c", fresh_process, str(out / "model"), name, str(path)], timeout=60)
    assert r.returncode == 0 and f"logit_bias {siglip}" in r.stdout, r.stderr[-2000:]
    open_clip.add_model_config(out / "model")
    theirs, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(path))
    ours = build_model(ModelConfig(model=TINY, siglip=siglip), "fp32", torch.device("cpu"))
    fresh = ours.model.encode_image(torch.zeros(1, 3, 32, 32))
    state = load_checkpoint(path)["state_dict"]
    ours.model.load_state_dict(state)
    if siglip:
        assert theirs.logit_bias is not None and torch.equal(theirs.logit_bias.detach(), state["logit_bias"])
    images = torch.stack([preprocess(open_clip_image(p)) for p in sorted((data / "zs").rglob("*.jpg"))[:8]])
    ours.model.eval()
    theirs.eval()
    with torch.no_grad():
        a, b = ours.model.encode_image(images), theirs.encode_image(images)
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(theirs.encode_image(torch.zeros(1, 3, 32, 32)), fresh, atol=1e-4)  # trained


def open_clip_image(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["missing_shard", "bad_model", "all_invalid", "missing_resume", "bad_precision",
                                  "fresh_over_old_run", "corrupt_eval_image"])
def test_bad_input_is_one_line_and_exit_2(data, tmp_path, case):
    shards = f"{data}/shards/{{00000..00003}}.tar"
    args = {"missing_shard": ["--train-data", f"{data}/shards/{{00000..00099}}.tar"],
            "bad_model": ["--train-data", shards, "--model", "ViT-Nope-99"],
            "missing_resume": ["--train-data", shards, "--resume", str(tmp_path / "nope.pt")],
            "bad_precision": ["--train-data", shards, "--precision", "fp8"]}.get(case)
    expected = {"missing_shard": "00016.tar: shard not found", "bad_model": "ViT-Nope-99",
                "all_invalid": "no sample with an image and a txt", "missing_resume": "nope.pt: checkpoint not found",
                "bad_precision": "--precision 'fp8'",
                "fresh_over_old_run": "already holds checkpoints of a run; continue it with --resume latest",
                "corrupt_eval_image": "0000.jpg: cannot decode this evaluation image"}[case]
    if case == "all_invalid":
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "00000.tar").write_bytes(b"")
        (bad / "sizes.json").write_text('{"00000.tar": 100}')
        args = ["--train-data", str(bad / "00000.tar")]
    if case == "fresh_over_old_run":
        # Without --resume, pruning by step number would delete the new run's checkpoints, not the old run's.
        # (A clipforge 0.1 run folder: config.yaml and checkpoints/, no run.json.)
        old = tmp_path / "o/checkpoints/step_00000099.pt"
        old.parent.mkdir(parents=True)
        old.write_bytes(b"an earlier run's checkpoint")
        (tmp_path / "o/config.yaml").write_text("data: {}\nmodel: {}\nrun: {}\n")
        args = ["--train-data", shards]
    if case == "corrupt_eval_image":
        zs = _tiny_zs(tmp_path)
        next(zs.rglob("0000.jpg")).write_bytes(b"not an image")
        args = ["--train-data", shards, "--zeroshot", f"zs={zs}"]
    r = train(*args, "--model", TINY, "--batch-size", "8", "--workers", "1", "--output", str(tmp_path / "o"),
              timeout=100) if case != "bad_model" else train(*args, "--output", str(tmp_path / "o"), timeout=100)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], r.stderr[-2000:]
    if case == "fresh_over_old_run":
        assert (tmp_path / "o/checkpoints/step_00000099.pt").read_bytes() == b"an earlier run's checkpoint"


@pytest.mark.timeout(30)
def test_cpu_threads_share_the_cores_among_local_ranks(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    two_ranks = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), local_world_size=2)
    nine_ranks = DistInfo(rank=0, world_size=9, local_rank=0, device=torch.device("cpu"), local_world_size=9)
    try:
        assert set_cpu_threads(None, two_ranks) == 4  # 8 cores / 2 ranks (loader workers mostly wait)
        assert set_cpu_threads(None, nine_ranks) == 1  # never below one
        assert set_cpu_threads(2, two_ranks) == 2  # --threads wins
        monkeypatch.setenv("OMP_NUM_THREADS", "5")
        torch.set_num_threads(5)
        assert set_cpu_threads(None, two_ranks) == 5  # the user's (or torchrun's) setting stands
    finally:
        torch.set_num_threads(before)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("precision", ["pure_bf16", "fp32"])
def test_short_cpu_run_in_each_precision(data, tmp_path, precision):
    # pure_bf16 casts the model itself: images must reach it in bf16, in training and in evaluation.
    out = tmp_path / "run"
    r = train("--train-data", f"{data}/shards/{{00000..00001}}.tar", "--model", TINY, "--batch-size", "8",
              "--train-num-samples", "16", "--workers", "0", "--precision", precision,
              "--zeroshot", f"shapes={data}/zs", "--output", str(out), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["step"] for x in jsonl(out / "results.jsonl")] == [2]
    assert find_latest(out / "checkpoints").name == "step_00000002.pt"


@pytest.mark.timeout(150)
def test_bad_samples_are_counted_across_workers_and_reported(tmp_path):
    # Two shards, one per loader worker, each with 8 good samples and 2 without a caption. The
    # shuffle buffer reads a whole shard before its first batch, so each worker counts exactly 2.
    import tarfile

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shards = tmp_path / "shards"
    write_shape_shards(shards, 16, 8, seed=0, size=32)
    for shard in sorted(shards.glob("*.tar")):
        with tarfile.open(shard, "a") as tar:
            for k in range(2):
                jpg = tmp_path / "notxt.jpg"
                jpg.write_bytes(b"\xff\xd8 an image without a caption")
                tar.add(jpg, arcname=f"{shard.stem}-notxt{k}.jpg")
    out = tmp_path / "run"
    r = train("--train-data", f"{shards}/{{00000..00001}}.tar", "--model", TINY, "--batch-size", "4",
              "--workers", "2", "--log-every", "1", "--zeroshot", f"shapes={_tiny_zs(tmp_path)}",
              "--output", str(out), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| 4 bad samples skipped" in r.stderr
    assert [x["bad_samples"] for x in jsonl(out / "train_log.jsonl")][-1] == 4
    assert [x["bad_samples"] for x in jsonl(out / "results.jsonl")] == [4]
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert events.Scalars("train/bad_samples")[-1].value == 4



@pytest.mark.timeout(240)
def test_bad_sample_count_survives_a_resume(tmp_path):
    """Stopped mid-epoch and resumed, the count equals an uninterrupted run's: not restarted at 0, and
    neither the tar-level errors the resumed reader meets again nor the undecoded skipped stretch
    counted twice or lost."""
    import tarfile

    shards = tmp_path / "shards"
    write_shape_shards(shards, 32, 16, seed=0, size=32)
    broken, caption = tmp_path / "broken.jpg", tmp_path / "caption.txt"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    caption.write_text("a red circle")
    for shard in sorted(shards.glob("*.tar")):
        # Bad samples first, so that some fall in the stretch a resumed worker skips undecoded.
        rewritten = shard.with_suffix(".new")
        with tarfile.open(shard) as src, tarfile.open(rewritten, "w") as tar:
            for k in range(6):
                tar.add(broken, arcname=f"{shard.stem}-bad{k}.jpg")
                if k >= 2:  # with a caption: caught at decode, after the shuffle; without: when read
                    tar.add(caption, arcname=f"{shard.stem}-bad{k}.txt")
            for member in src.getmembers():
                tar.addfile(member, src.extractfile(member))
        rewritten.replace(shard)
    zs = _tiny_zs(tmp_path)

    def run_to_end(out: Path, *stop: str) -> int:
        args = ["--train-data", f"{shards}/{{00000..00001}}.tar", "--model", TINY, "--batch-size", "4",
                "--workers", "2", "--log-every", "1", "--shuffle-buffer", "8", "--shuffle-initial", "4",
                "--zeroshot", f"shapes={zs}", "--output", str(out)]
        r = train(*args, *stop, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        if stop:
            r = train(*args, "--resume", "latest", timeout=120)
            assert r.returncode == 0, r.stderr[-3000:]
        return [x["bad_samples"] for x in jsonl(out / "train_log.jsonl")][-1]

    whole = run_to_end(tmp_path / "whole")
    assert whole >= 6  # at least the caption-less ones of both shards
    assert run_to_end(tmp_path / "resumed", "--stop-after", "5") == whole


def _tiny_zs(tmp_path: Path) -> Path:
    write_imagefolder(tmp_path / "zs", per_class=1, seed=1, size=32)
    return tmp_path / "zs"


def test_siglip_with_a_pretrained_tag(tmp_path, monkeypatch):
    """--siglip --pretrained TAG: open_clip looks tags up by the base model's name (not NAME-sigmoid)."""
    import open_clip.pretrained

    src = build_model(ModelConfig(model=TINY, siglip=True), "fp32", torch.device("cpu")).model
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01)
    weights = tmp_path / "tiny-sigmoid.pt"
    torch.save(src.state_dict(), weights)
    # A tag whose "download" is a local file (open_clip's `file` entry): no network in tests.
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "tiny-vit", {"localtag": {"file": str(weights)}})
    bundle = build_model(ModelConfig(model=TINY, siglip=True, pretrained="localtag"), "fp32", torch.device("cpu"))
    assert bundle.name == "tiny-vit-sigmoid"
    loaded = bundle.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in src.state_dict().items())
