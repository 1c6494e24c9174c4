"""The trainer on object storage and pipes: moto's S3 server (conftest `s3`) stands for the bucket.

Shards are written to the bucket and read from it; `--output s3://...` puts everything in the
bucket (checkpoints, logs, TensorBoard, curves), a run killed mid-way resumes from the bucket, and
its final checkpoint loads in open_clip from there. `pipe:` shards are a command's output. URLs
nothing can serve are refused with one line, and nothing is written locally.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import open_clip
import pytest
import torch
from train_helpers import REPO, TINY, run, train, train_here

from pipeline.localweb import write_imagefolder
from training.checkpoint import list_checkpoints, load_checkpoint, newest_readable, save_checkpoint, step_of
from training.config import EvalConfig
from training.data import EpochPlan, ShardDamaged, ShardSet, expand_shards, make_loader, read_sizes, tar_members
from training.errors import RunFailed, TrainError
from training.evaluate import load_overlap
from training.synthetic import write_shape_shards

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("storage-data")
    write_shape_shards(d / "shards", 192, 32, seed=0, size=32)
    return d / "shards"


def errors(r: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]


def common(train_data: str, *extra: str) -> list[str]:
    return ["--train-data", train_data, "--model", TINY, "--batch-size", "8", "--workers", "1",
            "--precision", "fp32", "--log-every", "2", "--warmup", "2", *extra]


def bucket_names(s3, prefix: str) -> list[str]:
    return [k[len(prefix) + 1:] for k in s3.keys() if k.startswith(prefix + "/")]


# -- object storage, both ways ---------------------------------------------------------------------


def test_train_from_s3_into_s3_killed_resumed_and_loaded_in_open_clip(s3, tmp_path):
    write_shape_shards(s3.url("shards"), 192, 32, seed=0, size=32)  # 6 shards and sizes.json, in the bucket
    data = s3.url("shards/{00000..00005}.tar")
    out = s3.url("run1")
    zs_local = tmp_path.parent / f"{tmp_path.name}-zs"  # the working folder stays empty
    write_imagefolder(zs_local, per_class=1, seed=1, size=32)
    s3.fs().put(f"{zs_local}/", f"{s3.bucket}/evalsets/shapes/", recursive=True)
    zs = s3.url("evalsets/shapes")  # an eval set in the bucket too: copied to a local folder by each rank
    args = common(data, "--batch-size", "16", "--save-every", "4", "--keep-last", "2", "--trace-samples",
                  "--zeroshot", f"shapes={zs}", "--output", out)
    # From an empty folder: nothing may land on the local disk (formerly a folder named "s3:").
    first = subprocess.Popen([sys.executable, str(REPO / "training/train.py"), *args], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not list_checkpoints(f"{out}/checkpoints"):
            if first.poll() is not None:
                pytest.fail(f"the run ended (exit {first.returncode}) before its first checkpoint: "
                            f"{first.stderr.read()[-3000:]}")
            assert time.monotonic() < deadline, "no checkpoint in the bucket after 180s"
            time.sleep(0.3)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # as a lost node would
        first.communicate()
    assert os.listdir(tmp_path) == []
    killed_at = list_checkpoints(f"{out}/checkpoints")[-1]
    assert str(killed_at).startswith(f"{out}/checkpoints/step_") and step_of(killed_at) < 12  # killed mid-run

    r = train(*args, "--resume", "latest", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {killed_at}" in r.stderr
    assert os.listdir(tmp_path) == []
    names = bucket_names(s3, "run1")
    # 192 samples / batch 16 = 12 steps in the epoch; the last 2 checkpoints are kept (and best.json).
    assert [n for n in names if n.startswith("checkpoints/")] == [
        "checkpoints/best.json", "checkpoints/step_00000008.pt", "checkpoints/step_00000012.pt"]
    results = [json.loads(x) for x in s3.fs().cat(f"{s3.bucket}/run1/results.jsonl").decode().splitlines()]
    assert [(r["step"], r["set"]) for r in results] == [(12, "shapes")]  # the epoch end's evaluation
    assert results[0]["items"] == 24  # every image of the bucket's eval set
    for name in ("run.json", "config.yaml", "model/tiny-vit.json", "results.jsonl", "train_log.jsonl",
                 "curves.png", "trace-rank0.jsonl"):
        assert name in names, (name, names)
    assert not [n for n in names if ".tmp-" in n or n.endswith(".clipforge.lock")], names  # no leftovers, lock freed
    assert len([n for n in names if n.startswith("tb/events.out.tfevents.")]) == 2  # one per process
    fs = s3.fs()
    log = [json.loads(x) for x in fs.cat(f"{s3.bucket}/run1/train_log.jsonl").decode().splitlines()]
    assert log[-1]["step"] == 12 and {r["step"] for r in log} >= set(range(2, 13, 2))
    trace = {json.loads(x)["step"] for x in fs.cat(f"{s3.bucket}/run1/trace-rank0.jsonl").decode().splitlines()}
    assert trace == set(range(1, 13))  # every step of the run, the replayed ones once more

    # The final checkpoint, from the bucket, in open_clip (as the README says: register OUT/model first).
    local = tmp_path / "dl"
    local.mkdir()
    fs.get(f"{s3.bucket}/run1/checkpoints/step_00000012.pt", str(local / "final.pt"))
    fs.get(f"{s3.bucket}/run1/model/tiny-vit.json", str(local / "tiny-vit.json"))
    open_clip.add_model_config(local / "tiny-vit.json")
    model, _, _ = open_clip.create_model_and_transforms("tiny-vit", pretrained=str(local / "final.pt"))
    ours = load_checkpoint(f"{out}/checkpoints/step_00000012.pt")  # read straight from the bucket
    assert ours["step"] == 12 and ours["config"]["data"]["train_data"] == data
    theirs = model.state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in ours["state_dict"].items())


def test_checkpoints_on_s3_are_published_whole_and_resume_takes_only_finished_ones(s3):
    ckpts = s3.url("run/checkpoints")
    payload = {"state_dict": {"w": torch.ones(3)}, "optimizer": {}, "format": 1, "step": 2, "data": {}}
    path = save_checkpoint(ckpts, 2, payload, keep_last=2)
    assert str(path) == f"{ckpts}/step_00000002.pt"
    assert bucket_names(s3, "run/checkpoints") == ["step_00000002.pt"]  # the temporary key is gone
    fs = s3.fs()
    # What a kill mid-upload leaves (a temporary key), and a newer checkpoint cut short.
    fs.pipe(f"{s3.bucket}/run/checkpoints/.step_00000004.pt.tmp-1-0123abcd", b"partial")
    fs.pipe(f"{s3.bucket}/run/checkpoints/step_00000003.pt", fs.cat(f"{s3.bucket}/run/checkpoints/step_00000002.pt")[:500])
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000002.pt", "step_00000003.pt"]
    found, ckpt, skipped = newest_readable(ckpts)
    assert found.name == "step_00000002.pt" and torch.equal(ckpt["state_dict"]["w"], torch.ones(3))
    assert [p.name for p, _ in skipped] == ["step_00000003.pt"] and "unreadable" in skipped[0][1]


def test_data_identity_on_s3_is_by_content(s3, local):
    for name in ("00000.tar", "00001.tar", "sizes.json"):
        s3.fs().put(str(local / name), f"{s3.bucket}/copy/{name}")
    there = ShardSet.describe(expand_shards(s3.url("copy/{00000..00001}.tar")))
    here = ShardSet.describe(expand_shards(f"{local}/{{00000..00001}}.tar"))
    assert there.counts == {s3.url("copy/00000.tar"): 32, s3.url("copy/00001.tar"): 32}
    assert there.fingerprint() == here.fingerprint()
    other = ShardSet.describe(expand_shards(f"{local}/{{00000..00002}}.tar"))
    assert other.fingerprint() != here.fingerprint()


def test_overlap_audit_summary_read_from_s3(s3):
    summary = {"eval_sets": {"shapes": {"items": 24, "overlapping_items": ["red-circle/0.jpg"]}}}
    s3.fs().pipe(f"{s3.bucket}/audit/summary.json", json.dumps(summary).encode())
    cfg = EvalConfig(overlap_audit=s3.url("audit/summary.json"))
    assert load_overlap(cfg.overlap_audit) == ({"shapes": {"red-circle/0.jpg"}}, {"shapes": 24})
    with pytest.raises(TrainError, match="--overlap-audit file not found"):
        EvalConfig(overlap_audit=s3.url("audit/other.json"))


# -- the web --------------------------------------------------------------------------------------


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # a reader that stops early (a ranged read of a server that ignores Range) closes the connection


@pytest.fixture
def http_shards(local):
    """The shards served from 127.0.0.1 by a plain file server (HEAD, no Range support)."""
    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = _QuietServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(local)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(10)


def test_shards_over_http_read_counted_and_identified_as_local_ones(local, http_shards):
    urls = expand_shards(f"{http_shards}/{{00000..00001}}.tar")
    there = ShardSet.describe(urls)
    assert list(there.counts.values()) == [32, 32]  # the sizes.json beside them, over HTTP
    assert there.fingerprint() == ShardSet.describe(expand_shards(f"{local}/{{00000..00001}}.tar")).fingerprint()
    plan = EpochPlan(urls=urls, seed=0, epoch=0, rank=0, world_size=1, workers=1, batch_size=8, batches=8,
                     sizes=there.counts)
    batches = list(make_loader(plan, lambda im: torch.zeros(3, 4, 4), lambda caps: torch.zeros(len(caps), 2)))
    keys = [k for _, _, meta in batches for k in meta["keys"]]
    assert len(keys) == 64 and len(set(keys)) == 64 and batches[-1][2]["bad"] == 0  # every sample, once
    with pytest.raises(TrainError, match="00009.tar: shard not found"):
        expand_shards(f"{http_shards}/00009.tar")


# -- pipe: shards --------------------------------------------------------------------------------


def test_train_from_pipe_shards(local, tmp_path):
    data = f"pipe:cat {local}/{{00000..00003}}.tar"
    # A command has no sizes.json beside it: the samples per epoch must be given.
    r = train_here(*common(data, "--workers", "0", "--output", str(tmp_path / "refused")))
    assert r.returncode == 2, r.stderr[-2000:]
    (line,) = errors(r)
    assert "pipe:cat" in line and "--train-num-samples" in line and "Protocol" not in line
    assert not (tmp_path / "refused").exists()

    out = tmp_path / "run"
    r = train(*common(data, "--train-num-samples", "128", "--stop-after", "3", "--save-every", "3", "--trace-samples",
                      "--output", str(out)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "4 shards, 128 samples/epoch" in r.stderr and "| 0 bad samples skipped" in r.stderr
    keys = [k for line in (out / "trace-rank0.jsonl").read_text().splitlines() for k in json.loads(line)["keys"]]
    assert len(keys) == 24 and all(k.split("/")[0] in {f"0000{i}.tar" for i in range(4)} for k in keys)
    fp = load_checkpoint(out / "checkpoints/step_00000003.pt")["config"]["data"]["fingerprint"]
    # The command stands for the data: resuming with another command is refused.
    r = train_here(*common(f"pipe:cat {local}/{{00001..00004}}.tar", "--workers", "0", "--train-num-samples", "128",
                           "--resume", "latest", "--output", str(out)))
    assert r.returncode == 2 and "--train-data: other data" in errors(r)[0], r.stderr[-2000:]
    assert fp["shards"] == 4


def test_a_pipe_command_that_fails_is_a_damaged_shard(local, tmp_path):
    seen: list[BaseException] = []
    whole = list(tar_members(f"pipe:cat {local}/00000.tar", seen.append))
    assert len(whole) == 3 * 32 and seen == []  # jpg, txt and json of 32 samples
    failed = list(tar_members(f"pipe:cat {local}/00000.tar; exit 3", seen.append))
    assert len(failed) == len(whole)
    assert len(seen) == 1 and isinstance(seen[0], ShardDamaged) and "exited with status 3" in str(seen[0])
    assert list(tar_members(f"pipe:cat {tmp_path}/missing.tar", seen.append)) == []
    assert len(seen) == 2 and "not a readable tar" in str(seen[1])


# -- img2dataset's per-shard counts ----------------------------------------------------------------


def test_sample_counts_from_img2dataset_stats_files(local, tmp_path):
    folder = tmp_path / "i2d"
    folder.mkdir()
    for i in range(2):
        (folder / f"0000{i}.tar").write_bytes((local / f"0000{i}.tar").read_bytes())
        # img2dataset's NNNNN_stats.json: its tar holds the successes only.
        (folder / f"0000{i}_stats.json").write_text(json.dumps({"count": 40, "successes": 32, "failed_to_download": 8}))
    urls = expand_shards(f"{folder}/{{00000..00001}}.tar")
    assert read_sizes(urls, required=True) == {urls[0]: 32, urls[1]: 32}


# -- URLs that nothing serves ----------------------------------------------------------------------


@pytest.mark.parametrize("flag,value,says", [
    ("--output", "foo://bucket/run", "no filesystem for foo://"),
    ("--output", "s3:/bucket/run", "malformed URL"),
    ("--output", "http://127.0.0.1:9/run", "cannot be written"),
    ("--output", "memory://run", "lives only as long as this process"),  # formerly exit 0, nothing kept
    ("--train-data", "foo://bucket/{00000..00001}.tar", "no filesystem for foo://"),
    ("--train-data", "s3:/bucket/00000.tar", "malformed URL"),
    ("--zeroshot", "shapes=foo://bucket/zs", "no filesystem for foo://"),
])
def test_urls_nothing_serves_are_refused_and_nothing_is_written(local, tmp_path, monkeypatch, flag, value, says):
    monkeypatch.chdir(tmp_path)
    args = {"--train-data": f"{local}/{{00000..00001}}.tar", "--output": "run"}
    if flag == "--zeroshot":
        extra = [flag, value]
    else:
        args[flag] = value
        extra = []
    r = train_here("--train-data", args["--train-data"], "--model", TINY, "--workers", "0", "--output", args["--output"],
                   *extra)
    assert r.returncode == 2, r.stderr[-2000:]
    (line,) = errors(r)
    assert says in line and value.split("=")[-1].split("{")[0] in line, line
    assert os.listdir(tmp_path) == []


# -- nothing outside --output ----------------------------------------------------------------------


def test_a_run_into_s3_leaves_nothing_in_the_temporary_folder(s3, local, tmp_path):
    """TensorBoard's local staging folder and the rest are removed; no wandb folder is made for a run
    that did not ask for wandb (formerly one empty clipforge-wandb-* folder leaked per run)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = run([sys.executable, str(REPO / "training/train.py"),
             *common(f"{local}/{{00000..00001}}.tar", "--stop-after", "2", "--output", s3.url("run"))],
            timeout=240, cwd=tmp_path, env={**os.environ, "TMPDIR": str(tmp)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoints/step_00000002.pt" in bucket_names(s3, "run")
    assert os.listdir(tmp) == []


def test_eval_sets_given_as_urls_any_name_and_errors_name_the_url(s3, tmp_path):
    from training.evaluate import load_classification

    zs = tmp_path / "zs"
    write_imagefolder(zs, per_class=1, seed=1, size=32)
    s3.fs().put(f"{zs}/", f"{s3.bucket}/evalsets/shapes/", recursive=True)
    s3.fs().pipe(f"{s3.bucket}/evalsets/nothing/readme.txt", b"not an eval set")
    # A set name with a slash (tags are NAME-zeroshot-val-top1): formerly FileNotFoundError from
    # tempfile.mkdtemp, a traceback instead of a run.
    cs = load_classification("imagenet/val", s3.url("evalsets/shapes"))
    assert len(cs.items) == 24 and cs.root.parent == Path(tempfile.gettempdir())
    # What is wrong with a set on object storage names its URL, not the local copy nobody knows of.
    with pytest.raises(TrainError) as e:
        load_classification("nothing", s3.url("evalsets/nothing"))
    assert str(e.value).startswith(s3.url("evalsets/nothing") + ": ") and "clipforge-eval" not in str(e.value)


def test_an_object_store_that_cannot_be_reached_is_one_line(s3, local, tmp_path, monkeypatch):
    """botocore's connection errors are no OSError: s3fs lets them through after its retries. Formerly
    a traceback at the claim of --output (exit 1; under torchrun the other ranks, waiting in the
    setup's collective, learnt nothing), and at a checkpoint's upload."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.chdir(tmp_path)
    r = train_here(*common(f"{local}/{{00000..00001}}.tar", "--workers", "0", "--output", "s3://nowhere/run"))
    assert r.returncode == 2, r.stderr[-2000:]
    (line,) = errors(r)
    assert line.startswith("error: s3://nowhere/run: cannot reach") and "Traceback" not in r.stderr, r.stderr[-2000:]
    payload = {"state_dict": {"w": torch.ones(3)}, "optimizer": {}, "format": 1, "step": 2, "data": {}}
    with pytest.raises(RunFailed, match="s3://nowhere/run/checkpoints/step_00000002.pt: cannot write the checkpoint"):
        save_checkpoint("s3://nowhere/run/checkpoints", 2, payload, keep_last=2)
    assert os.listdir(tmp_path) == []
    s3fs.S3FileSystem.clear_instance_cache()


def test_output_in_a_bucket_that_does_not_exist(s3, local, tmp_path, monkeypatch):
    """Formerly an endless loop (the claim looked for an existing parent above the bucket, appending
    to a list at each turn until memory ran out)."""
    monkeypatch.chdir(tmp_path)
    out = f"s3://{s3.bucket}-missing/run"
    r = train_here(*common(f"{local}/{{00000..00001}}.tar", "--workers", "0", "--stop-after", "1",
                           "--output", out))
    # s3fs makes the bucket (as `aws s3 mb` would; a store that refuses is a one-line error): the run is there.
    assert r.returncode == 0, r.stderr[-2000:]
    assert [p.name for p in list_checkpoints(f"{out}/checkpoints")] == ["step_00000001.pt"]
    assert os.listdir(tmp_path) == []


def test_an_eval_set_on_a_store_that_cannot_be_reached_is_one_line(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(TrainError, match=r"^s3://nowhere/set: --zeroshot x=s3://nowhere/set: cannot reach it "):
        EvalConfig(zeroshot={"x": "s3://nowhere/set"})  # formerly botocore's EndpointConnectionError
    with pytest.raises(TrainError, match=r"^s3://nowhere/a.json: --overlap-audit: cannot reach it "):
        EvalConfig(overlap_audit="s3://nowhere/a.json")  # formerly "file not found": s3fs's isfile says False
    from training.evaluate import load_retrieval  # the copy, when the store went away after the check

    with pytest.raises(TrainError, match=r"^s3://nowhere/set: cannot copy eval set 'x' \(EndpointConnectionError"):
        load_retrieval("x", "s3://nowhere/set")
    s3fs.S3FileSystem.clear_instance_cache()


def test_sigterm_removes_the_temporaries_of_a_run_into_s3(s3, local, tmp_path):
    """SIGTERM is what schedulers send to preempt. Formerly it ended the process without its `finally`
    blocks: a checkpoint-sized clipforge-*-step_*.pt, the TensorBoard staging folder (and eval-set
    copies) stayed in /tmp at every preemption, and the bucket kept the lock."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = s3.url("run")
    proc = subprocess.Popen([sys.executable, str(REPO / "training/train.py"),
                             *common(f"{local}/{{00000..00001}}.tar", "--epochs", "50", "--save-every", "2",
                                     "--output", out)],
                            cwd=tmp_path, env={**os.environ, "TMPDIR": str(tmp)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(f"{out}/checkpoints"):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint in the bucket after 120s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert [n for n in os.listdir(tmp) if "clipforge" in n or "wandb" in n] == []
    assert ".clipforge.lock" not in bucket_names(s3, "run")  # released: a resume elsewhere need not wait
    assert "train_log.jsonl" in bucket_names(s3, "run")


def test_a_wandb_that_fails_to_start_leaves_nothing_in_the_temporary_folder(s3, local, tmp_path, monkeypatch):
    """wandb.init failing (not logged in, no network) is a one-line refusal; formerly the TensorBoard
    staging folder (with an event file) and the wandb folder made for it stayed in /tmp."""
    import types

    def init(**_):
        raise RuntimeError("api_key not configured (no-tty)")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.delenv("WANDB_DIR", raising=False)
    r = train_here(*common(f"{local}/{{00000..00001}}.tar", "--workers", "0", "--report-to", "wandb",
                           "--output", s3.url("run")))
    assert r.returncode == 2 and "wandb.init failed (api_key not configured" in errors(r)[0], r.stderr[-2000:]
    assert os.listdir(tmp) == []
