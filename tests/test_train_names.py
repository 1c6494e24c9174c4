"""OpenCLIP's names where they mean the same (issue 9, item 6): `--precision amp`, `--trace` not a
false friend (ours is `--trace-samples`), `--report-to tensorboard,wandb` (wandb offline, optional),
`--logs DIR --name NAME`, elapsed time and ETA on progress lines, OpenCLIP's TensorBoard tags."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import struct
import sys
from pathlib import Path

import pytest
from train_helpers import REPO, TINY, torchrun, train_here

from pipeline.localweb import write_imagefolder, write_retrieval
from training.config import parse_config
from training.synthetic import write_shape_shards

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PROGRESS = re.compile(r"step (\d+)/(\d+) .*\| elapsed (\d+):(\d\d):(\d\d), ETA (\d+):(\d\d):(\d\d)$")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("names-data")
    write_shape_shards(d / "shards", 64, 16, seed=0, size=32)
    write_imagefolder(d / "zs", per_class=1, seed=1, size=32)
    write_retrieval(d / "ret", n=8, seed=2, size=32)
    return d


def common(data: Path, *extra: str) -> list[str]:
    return ["--train-data", f"{data}/shards/{{00000..00003}}.tar", "--model", TINY, "--batch-size", "8",
            "--workers", "0", "--log-every", "1", *extra]


@pytest.fixture(scope="module")
def amp_run(data, tmp_path_factory):
    """One run with OpenCLIP's spellings: --precision amp, --logs/--name; wandb unimportable the while."""
    logs = tmp_path_factory.mktemp("names-logs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError: it must not be imported
        r = train_here(*common(data, "--precision", "amp", "--epochs", "2", "--zeroshot", f"shapes={data}/zs",
                               "--retrieval", f"ret={data}/ret", "--trace-samples",
                               "--logs", str(logs), "--name", "amp-run"))
    return r, logs / "amp-run"


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def test_precision_amp_is_accepted_and_says_what_it_runs_as_on_cpu(amp_run):
    r, out = amp_run
    assert r.returncode == 0, r.stderr[-3000:]
    said = [ln for ln in r.stderr.splitlines() if "--precision amp " in ln]
    assert len(said) == 1 and "on cpu" in said[0] and "computes in amp_bf16" in said[0], r.stderr[-3000:]
    assert "precision amp_bf16, device cpu" in r.stderr
    assert "precision: amp\n" in (out / "config.yaml").read_text()  # what was asked for is recorded
    # OpenCLIP's amp is fp16 autocast with a GradScaler on CUDA: our amp_fp16 there.
    from training.config import run_precision

    assert run_precision("amp", "cuda") == "amp_fp16" and run_precision("amp", "cpu") == "amp_bf16"
    assert run_precision("amp_fp16", "cuda") == "amp_fp16" and run_precision("fp32", "cpu") == "fp32"


def test_precision_amp_autocasts_to_bf16_on_cpu(data, tmp_path):
    import torch

    from training.dist import DistInfo
    from training.trainer import Trainer

    cfg = parse_config(common(data, "--precision", "amp", "--output", str(tmp_path / "out")))
    dist = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    threads = torch.get_num_threads()
    trainer = Trainer(cfg, dist)
    try:
        with trainer.autocast():
            y = torch.nn.functional.linear(torch.ones(2, 4), torch.ones(3, 4))
        assert y.dtype == torch.bfloat16 and trainer.scaler is None
    finally:
        trainer.close()
        torch.set_num_threads(threads)


def test_trace_is_refused_naming_trace_samples(data, tmp_path):
    out = tmp_path / "out"
    r = train_here(*common(data, "--trace", "--output", str(out)))
    assert r.returncode == 2
    errors = error_lines(r.stderr)
    assert len(errors) == 1 and "--trace-samples" in errors[0] and "TorchScript" in errors[0], r.stderr
    assert not out.exists()


def test_trace_samples_records_keys(amp_run):
    r, out = amp_run
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(ln) for ln in (out / "trace-rank0.jsonl").read_text().splitlines()]
    assert [x["step"] for x in records] == list(range(1, 17))  # 64 samples / 8, 2 epochs
    assert all(len(x["keys"]) == 8 for x in records)


def test_a_config_file_with_the_old_trace_key_names_the_new_one(data, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run:\n  trace: true\n")
    r = train_here(*common(data, "--config", str(cfg), "--output", str(tmp_path / "out")))
    assert r.returncode == 2
    errors = error_lines(r.stderr)
    assert len(errors) == 1 and "trace is now trace_samples" in errors[0], r.stderr


def test_logs_and_name_are_output(amp_run, data, tmp_path):
    r, out = amp_run
    assert r.returncode == 0 and (out / "run.json").is_file() and (out / "checkpoints").is_dir()
    assert parse_config(common(data, "--logs", "/x/logs/", "--name", "b32")).run.output == "/x/logs/b32"
    assert parse_config(common(data, "--name", "b32")).run.output == "./logs/b32"  # OpenCLIP's default --logs
    cases = {
        ("--output", str(tmp_path / "o"), "--logs", str(tmp_path / "l"), "--name", "n"): "not both",
        ("--output", str(tmp_path / "o"), "--name", "n"): "not both",
        ("--logs", str(tmp_path / "l")): "needs --name",
        ("--logs", str(tmp_path / "l"), "--name", "a/b"): "without slashes",
    }
    for extra, message in cases.items():
        r = train_here(*common(data, *extra))
        errors = error_lines(r.stderr)
        assert r.returncode == 2 and len(errors) == 1 and message in errors[0], (extra, r.stderr)
    assert not list(tmp_path.iterdir())  # nothing written


def test_progress_lines_show_elapsed_and_eta(amp_run, monkeypatch):
    r, _ = amp_run
    lines = [ln for ln in r.stderr.splitlines() if " samples/s, " in ln]
    assert len(lines) == 16, r.stderr[-3000:]
    parsed = [PROGRESS.search(ln) for ln in lines]
    assert all(parsed), lines[:2]
    elapsed = [int(m[3]) * 3600 + int(m[4]) * 60 + int(m[5]) for m in parsed]
    eta = [int(m[6]) * 3600 + int(m[7]) * 60 + int(m[8]) for m in parsed]
    assert elapsed == sorted(elapsed) and eta[-1] == 0 and parsed[-1][1] == parsed[-1][2] == "16"
    # The benchmark times our trainer by these lines: its pattern must still find the step in them.
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "benchmarks/train.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_train", bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    assert [int(bench.OURS_PROGRESS.search(ln)[1]) for ln in lines] == list(range(1, 17))


def test_tensorboard_tags_are_openclips(amp_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r, out = amp_run
    assert r.returncode == 0, r.stderr[-3000:]
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    # The names open_clip_train/train.py writes for the same quantities.
    openclip = {"train/loss", "train/lr", "train/scale", "train/samples_per_second",
                "train/samples_per_second_per_gpu", "train/data_time", "train/batch_time",
                "val/shapes-zeroshot-val-top1", "val/shapes-zeroshot-val-top5",
                "val/ret-image_to_text_R@1", "val/ret-text_to_image_R@10"}
    assert openclip <= tags, sorted(tags)
    assert not {t for t in tags if t.startswith("eval/") or t in ("train/logit_scale", "train/samples_per_s")}
    log = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("train/scale")] == pytest.approx([x["logit_scale"] for x in log])
    results = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    top1 = [x["top1"] for x in results if x["set"] == "shapes"]
    assert [e.value for e in events.Scalars("val/shapes-zeroshot-val-top1")] == pytest.approx(top1)
    assert [e.step for e in events.Scalars("val/shapes-zeroshot-val-top1")] == [8, 16]


def test_report_to_wandb_without_wandb_is_refused_before_writing(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    out = tmp_path / "out"
    r = train_here(*common(data, "--report-to", "tensorboard,wandb", "--output", str(out)))
    errors = error_lines(r.stderr)
    assert r.returncode == 2 and len(errors) == 1 and "wandb is not installed" in errors[0], r.stderr[-2000:]
    assert not out.exists()
    r = train_here(*common(data, "--report-to", "tensorboard,neptune", "--output", str(out)))
    errors = error_lines(r.stderr)
    assert r.returncode == 2 and len(errors) == 1 and "unknown neptune" in errors[0], r.stderr[-2000:]
    assert not out.exists()


def read_wandb_history(run_file: Path) -> list[dict]:
    """History rows of a .wandb file: a LevelDB-style log (7-byte file header, 32 KiB blocks of
    records with a 7-byte header: crc32, length, type full/first/middle/last) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = run_file.read_bytes()
    assert raw[:4] == b":W&B", raw[:7]
    rows, pos, buf = [], 7, b""
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        buf += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


@pytest.mark.timeout(300)
def test_report_to_wandb_offline_logs_the_tensorboard_scalars_on_rank_0(data, tmp_path):
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    home = tmp_path / "home"
    # Offline, and wandb's own caches and settings in the test's folder; no network is reached.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "WANDB_DIR": str(home), "WANDB_CACHE_DIR": str(home / "cache"), "WANDB_CONFIG_DIR": str(home / "config"),
           "WANDB_DATA_DIR": str(home / "data"), "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    r = torchrun(2, REPO / "training/train.py", *common(data, "--precision", "fp32", "--epochs", "1",
                                                        "--zeroshot", f"shapes={data}/zs"),
                 "--report-to", "tensorboard,wandb", "--wandb-project-name", "names-test", "--output", str(out),
                 env=env, timeout=280)
    assert r.returncode == 0, r.stderr[-4000:]
    runs = glob.glob(str(out / "wandb/offline-run-*"))
    assert len(runs) == 1, runs  # rank 0 only
    files = glob.glob(f"{runs[0]}/run-*.wandb")
    assert len(files) == 1
    rows = read_wandb_history(Path(files[0]))
    logged: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if not key.startswith("_"):
                logged.setdefault(key, {})[row["_step"]] = value
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tb = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    assert "train/loss" in tb and "val/shapes-zeroshot-val-top1" in tb
    assert set(logged) == set(tb)
    for tag, points in tb.items():
        assert set(logged[tag]) == set(points), tag
        assert [logged[tag][s] for s in sorted(points)] == pytest.approx([points[s] for s in sorted(points)],
                                                                        rel=1e-6), tag
    assert sorted(tb["train/loss"]) == list(range(1, 5))  # 64 samples / (8 x 2 ranks)
