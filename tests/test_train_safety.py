"""The trainer fails loudly and safely: a non-finite loss stops the run, the output folder is ours or
untouched (and held by one run at a time), nothing in it is damaged by a refused start, and a run can
always go on from its newest readable checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import REPO, TINY, ranks, run, train, train_here

from pipeline.localweb import write_imagefolder
from training.checkpoint import all_finite, list_checkpoints
from training.synthetic import write_shape_shards
from training.trainer import apply_update, nonfinite_step

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("safety-data")
    write_shape_shards(d / "shards", 256, 32, seed=0, size=32)
    write_imagefolder(d / "zs", per_class=1, seed=1, size=32)
    return d


def common(data: Path, *extra: str) -> list[str]:
    return ["--train-data", f"{data}/shards/{{00000..00003}}.tar", "--model", TINY, "--batch-size", "8",
            "--workers", "0", "--precision", "fp32", "--log-every", "1", *extra]


def errors(r: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry below `folder` (links as links) with a digest of its content."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = "link -> " + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


# -- 1. a non-finite loss stops the run -------------------------------------------------------


def test_nonfinite_loss_stops_every_rank_and_nothing_nonfinite_is_saved(data, tmp_path):
    out = tmp_path / "run"
    rs = ranks(2, REPO / "training/train.py", *common(data, "--lr", "1e3", "--warmup", "1", "--epochs", "4",
                                                       "--save-every", "1", "--eval-every", "1",
                                                       "--zeroshot", f"zs={data}/zs", "--output", str(out)),
               timeout=200)
    # Both ranks stop by themselves at the same step (an all-reduced flag), each with one line naming it.
    assert [r.returncode for r in rs] == [1, 1], rs[0].stderr[-3000:]
    lines = [errors(r) for r in rs]
    assert [len(x) for x in lines] == [1, 1], [r.stderr[-2000:] for r in rs]
    lines = [x[0] for x in lines]
    assert lines[0].startswith("error: rank 0: step ") and lines[1].startswith("error: rank 1: step ")
    step = int(lines[0].split("step ")[1].split(":")[0])
    assert all(f"step {step}: non-finite loss or gradient" in ln for ln in lines), lines
    assert "Nothing non-finite was saved" in lines[0]
    saved = list_checkpoints(out / "checkpoints")
    assert saved and saved[-1].name == f"step_{step - 1:08d}.pt"
    for path in saved:
        ckpt = torch.load(path, weights_only=True)
        assert all_finite(ckpt["state_dict"]) and all_finite(ckpt["optimizer"]["state"]), path
    best = json.loads((out / "checkpoints/best.json").read_text())
    assert (out / "checkpoints" / best["file"]).is_file() and best["step"] < step
    assert not (out / ".clipforge.lock").exists()  # released on the way out


def test_skip_nonfinite_skips_n_steps_then_stops(data, tmp_path):
    r = train_here(*common(data, "--lr", "1e3", "--warmup", "1", "--epochs", "4", "--skip-nonfinite", "2",
                      "--output", str(tmp_path / "run")))
    assert r.returncode == 1, r.stderr[-3000:]
    skipped = [ln for ln in r.stderr.splitlines() if "update skipped" in ln]
    assert len(skipped) == 2 and "(1 of --skip-nonfinite 2)" in skipped[0] and "(2 of" in skipped[1]
    first = int(skipped[0].split("step ")[1].split(":")[0])
    (line,) = errors(r)
    assert line.startswith(f"error: step {first + 2}: non-finite") and "after skipping 2 such step(s)" in line


def test_update_is_withheld_on_nonfinite_values_but_fp16_overflow_is_the_scalers(tmp_path):
    """The rule the trainer applies after each backward pass, with the GradScaler of fp16 (run on CPU here:
    the GPU path is the same code)."""
    def setup(scaled: bool):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16) if scaled else None
        return model, opt, scaler

    def backward(model, scaler, loss_value: float | None = None, grad_value: float | None = None):
        loss = model(torch.ones(3, 4)).sum()
        (scaler.scale(loss) if scaler else loss).backward()
        if grad_value is not None:
            model.weight.grad[0, 0] = grad_value
        return torch.tensor(loss_value) if loss_value is not None else loss.detach()

    # Plain precision: a NaN gradient (or loss) withholds the update; a finite step applies it.
    model, opt, _ = setup(False)
    before = model.weight.detach().clone()
    norm, applied = apply_update(model, opt, None, backward(model, None, grad_value=float("nan")), 1.0, 1)
    assert not applied and torch.isnan(norm) and torch.equal(model.weight, before)
    opt.zero_grad()
    norm, applied = apply_update(model, opt, None, backward(model, None, loss_value=float("inf")), None, 1)
    assert not applied and torch.equal(model.weight, before)
    opt.zero_grad()
    _, applied = apply_update(model, opt, None, backward(model, None), 1.0, 1)
    assert applied and not torch.equal(model.weight, before)

    # fp16 with a scaler: an overflowing gradient is the scaler's routine skip (scale halves, not counted).
    model, opt, scaler = setup(True)
    before = model.weight.detach().clone()
    _, applied = apply_update(model, opt, scaler, backward(model, scaler, grad_value=float("inf")), 1.0, 1)
    assert applied and torch.equal(model.weight, before) and scaler.get_scale() == 2.0**15
    # A non-finite loss is a divergence even so: withheld, and the scaler's step is closed properly...
    opt.zero_grad()
    _, applied = apply_update(model, opt, scaler, backward(model, scaler, loss_value=float("nan")), 1.0, 1)
    assert not applied and torch.equal(model.weight, before)
    # ... so that the next step works (unscale_ twice without update() would raise).
    opt.zero_grad()
    _, applied = apply_update(model, opt, scaler, backward(model, scaler), 1.0, 1)
    assert applied and not torch.equal(model.weight, before)
    assert nonfinite_step(torch.tensor(1.0), torch.tensor(float("inf")), scaled=True).item() is False
    assert nonfinite_step(torch.tensor(1.0), torch.tensor(float("inf")), scaled=False).item() is True


# -- the output folder: ours or untouched, one run at a time --------------------------------


def test_a_folder_of_someone_elses_files_is_refused_and_untouched(data, tmp_path):
    out = tmp_path / "theirs"
    (out / "shards").mkdir(parents=True)
    (out / "shards/mydata.tar").write_bytes(b"precious")
    (out / "notes.txt").write_text("mine")
    (out / "checkpoints").mkdir()
    (out / "checkpoints/step_00000001.pt").write_bytes(b"not yours either")
    before = snapshot(out)
    r = train_here(*common(data, "--output", str(out)))
    assert r.returncode == 2 and len(errors(r)) == 1, r.stderr[-2000:]
    assert "holds files that clipforge did not write" in errors(r)[0]
    assert snapshot(out) == before  # no run.json, no lock, nothing removed

    # Another job's output is not a training run's either.
    other = tmp_path / "corpus"
    other.mkdir()
    (other / "run.json").write_text('{"job": "build_corpus"}')
    r = train_here(*common(data, "--output", str(other)))
    assert r.returncode == 2 and "output of build_corpus, not of train" in errors(r)[0], r.stderr[-2000:]


def test_a_refusal_on_rank_0_stops_every_rank_at_once(data, tmp_path):
    """Only rank 0 claims the folder: the other ranks learn of its refusal instead of waiting for it
    in a collective."""
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rs = ranks(2, REPO / "training/train.py", *common(data, "--output", str(out)), timeout=150)
    assert [r.returncode for r in rs] == [2, 2], rs[1].stderr[-3000:]
    lines = [errors(r) for r in rs]
    assert [len(x) for x in lines] == [1, 1], [r.stderr[-2000:] for r in rs]
    assert lines[0][0].startswith("error: rank 0: ") and "holds files that clipforge did not write" in lines[0][0]
    assert lines[1][0].startswith("error: rank 1: stopped because rank 0 did: ")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_links_and_foreign_files_inside_our_folder_survive(data, tmp_path):
    out = tmp_path / "run"
    r = train_here(*common(data, "--save-every", "2", "--stop-after", "2", "--output", str(out)))
    assert r.returncode == 0, r.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "step_00000009.pt").write_bytes(b"someone's file")
    ckpts = out / "checkpoints"
    # Foreign names in our folders, a link named like a checkpoint, a temporary of a killed save
    # (ours, by its name) and files merely resembling one.
    (ckpts / "notes.txt").write_text("mine")
    (ckpts / "step_00000001.pt").symlink_to(elsewhere / "step_00000009.pt")
    (ckpts / "precious.pt.tmp-1-abcdef01").write_bytes(b"not a clipforge name")
    (ckpts / ".step_00000003.pt.tmp-999-abcdef01").write_bytes(b"\0" * 4096)
    (out / "model/.tiny-vit.json.tmp-999").write_text("{")  # clipforge 0.1's model config temporary
    (out / "mine.tmp-1-abcdef01").write_text("not ours: only names the trainer writes are")
    foreign = {k: v for k, v in snapshot(out).items()
               if k in ("checkpoints/notes.txt", "checkpoints/step_00000001.pt", "checkpoints/precious.pt.tmp-1-abcdef01",
                        "mine.tmp-1-abcdef01")}
    r = train_here(*common(data, "--save-every", "1", "--stop-after", "6", "--keep-last", "1", "--resume", "latest",
                      "--output", str(out)))
    assert r.returncode == 0, r.stderr[-2000:]
    after = snapshot(out)
    assert {k: after.get(k) for k in foreign} == foreign  # the link is still a link, all bytes the same
    assert (elsewhere / "step_00000009.pt").read_bytes() == b"someone's file"
    assert not (ckpts / ".step_00000003.pt.tmp-999-abcdef01").exists()  # a killed save's leftover: removed
    assert not (out / "model/.tiny-vit.json.tmp-999").exists()
    assert "removed 2 temporary file(s) of an interrupted run" in r.stderr
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000006.pt"]  # pruning: only ours

    # A sub-folder that is a link is refused: pruning would delete through it.
    shutil.rmtree(ckpts)
    ckpts.symlink_to(elsewhere)
    before = snapshot(elsewhere)
    r = train_here(*common(data, "--resume", "latest", "--output", str(out)))
    assert r.returncode == 2 and "is a symbolic link" in errors(r)[0], r.stderr[-2000:]
    assert snapshot(elsewhere) == before


def test_a_clipforge_0_1_run_folder_is_adopted(data, tmp_path):
    out = tmp_path / "old"
    r = train_here(*common(data, "--save-every", "2", "--stop-after", "2", "--output", str(out)))
    assert r.returncode == 0, r.stderr[-2000:]
    (out / "run.json").unlink()  # as clipforge 0.1 left its folders
    r = train_here(*common(data, "--resume", "latest", "--stop-after", "3", "--output", str(out)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "adopting it" in r.stderr and json.loads((out / "run.json").read_text())["job"] == "train"


def _wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"first run ended early: {proc.stderr.read()[-2000:] if proc.stderr else proc.args}")
        if time.monotonic() > deadline:
            raise AssertionError("first run never got going")
        time.sleep(0.2)


def test_a_second_run_into_a_held_folder_is_refused_naming_the_holder(data, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(REPO / "training/train.py"),
                              *common(data, "--epochs", "1000", "--save-every", "2", "--output", str(out))],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        _wait_for(lambda: list_checkpoints(out / "checkpoints"), 90, first)
        lock = json.loads((out / ".clipforge.lock").read_text())
        assert lock["pid"] == first.pid
        # A real second process, as a user would start it.
        r = train(*common(data, "--epochs", "1000", "--resume", "latest", "--output", str(out)), timeout=90)
        assert r.returncode == 2, r.stderr[-2000:]
        (line,) = errors(r)
        assert "in use by another train run" in line and f"pid {first.pid}" in line
        assert first.poll() is None  # the holder is unharmed and still training
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # as a crash would: the lock stays behind
        first.communicate()
    assert (out / ".clipforge.lock").exists()
    # The holder is gone: its lock is taken over, with a warning, and the run goes on.
    step = int(list_checkpoints(out / "checkpoints")[-1].name[5:13])
    r = train_here(*common(data, "--epochs", "1000", "--resume", "latest", "--stop-after", str(step + 1),
                      "--output", str(out)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "taking over a stale lock" in r.stderr and f"process {first.pid} on this host is gone" in r.stderr


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (dead, not yet reaped by its new parent) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_ranks_stop_when_torchrun_is_killed(data, tmp_path):
    """torchrun puts each rank in a session of its own: killing torchrun alone (or its process group)
    used to leave the ranks training into the folder. They follow their launcher now."""
    out = tmp_path / "run"
    log = (tmp_path / "torchrun.log").open("w")  # not a pipe: a rank that outlives torchrun would hold it open
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                                 str(REPO / "training/train.py"),
                                 *common(data, "--epochs", "1000", "--save-every", "2", "--output", str(out))],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        _wait_for(lambda: list_checkpoints(out / "checkpoints"), 90, launcher)
        rank0 = json.loads((out / ".clipforge.lock").read_text())["pid"]
        assert rank0 != launcher.pid and _alive(rank0)
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 40
        while _alive(rank0) and time.monotonic() < deadline:
            time.sleep(0.2)
        survived = _alive(rank0)
        if survived:
            os.killpg(rank0, signal.SIGKILL)
        assert not survived, "the rank kept running after torchrun was killed"
    finally:
        if launcher.poll() is None:
            launcher.kill()
        log.close()
    assert not (out / ".clipforge.lock").exists()  # it stopped through its finally blocks: lock released


# -- 3. unwritable output, found at start -------------------------------------------------------


def _read_only(cmd: list[str], path: Path) -> list[str]:
    """`cmd` run with `path` read-only: by permissions, or, for root (whom they do not stop), as a
    read-only bind mount in a private mount namespace."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return cmd
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("running as root without the right to make a private read-only mount")
    return ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(path), *cmd]


@pytest.mark.parametrize("where", ["checkpoints", "output"])
def test_an_unwritable_output_is_found_before_training(data, tmp_path, where):
    out = tmp_path / "run"
    r = train_here(*common(data, "--stop-after", "1", "--output", str(out)))
    assert r.returncode == 0, r.stderr[-2000:]
    target = out / "checkpoints" if where == "checkpoints" else out
    before = snapshot(out)
    cmd = [sys.executable, str(REPO / "training/train.py"),
           *common(data, "--resume", "latest", "--output", str(out))]
    try:
        r = run(_read_only(cmd, target), timeout=90)
    finally:
        target.chmod(0o755)
    assert r.returncode == 2, r.stderr[-2000:]
    (line,) = errors(r)
    assert f"{target}: cannot write" in line, line
    assert "step 2/" not in r.stderr  # refused before training, not at the first save an epoch later
    assert snapshot(out) == before


# -- 2. a refused resume leaves the run as it was ---------------------------------------------


def test_a_changed_model_definition_is_refused_and_the_recorded_one_kept(data, tmp_path):
    model = tmp_path / "cfg/tiny-vit.json"
    model.parent.mkdir()
    shutil.copy(TINY, model)
    out = tmp_path / "run"
    args = ["--train-data", f"{data}/shards/{{00000..00003}}.tar", "--batch-size", "8", "--workers", "0",
            "--precision", "fp32", "--output", str(out)]
    r = train_here(*args, "--model", str(model), "--stop-after", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads(model.read_text())
    cfg["vision_cfg"]["width"] = 96  # edited in place
    model.write_text(json.dumps(cfg))
    before = snapshot(out)
    r = train_here(*args, "--model", str(model), "--resume", "latest")
    assert r.returncode == 2, r.stderr[-2000:]
    (line,) = errors(r)
    assert f"{out}/model/tiny-vit.json: the model definition differs" in line and "vision_cfg.width: 64 -> 96" in line
    assert snapshot(out) == before  # the recorded config (what the checkpoints load with) is intact

    # The same definition under another path is the same model: a moved config resumes.
    moved = tmp_path / "elsewhere/tiny-vit.json"
    moved.parent.mkdir()
    shutil.copy(TINY, moved)
    r = train_here(*args, "--model", str(moved), "--resume", "latest", "--stop-after", "3")
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-2000:]


def test_data_is_identified_by_content_not_by_path_spelling(data, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(data / "shards", shards)
    out = tmp_path / "run"

    def go(spec: str, *extra: str) -> subprocess.CompletedProcess:
        return train_here("--train-data", spec, "--model", TINY, "--batch-size", "8", "--workers", "0",
                     "--precision", "fp32", "--output", str(out), *extra)

    r = go(f"{shards}/{{00000..00003}}.tar", "--stop-after", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    r = go(f"{tmp_path}/./shards/{{00000..00003}}.tar", "--resume", "latest", "--stop-after", "3")
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-2000:]
    # Other shards at the same path (the same counts, so sizes.json alone cannot tell) are other data.
    write_shape_shards(tmp_path / "other", 256, 32, seed=7, size=32)
    for name in ("00000.tar", "00001.tar", "00002.tar", "00003.tar"):
        shutil.copy(tmp_path / "other" / name, shards / name)
    r = go(f"{shards}/{{00000..00003}}.tar", "--resume", "latest")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--train-data: other data" in errors(r)[0]


# -- 7. a way out past unreadable checkpoints ------------------------------------------------


def test_resume_goes_past_unreadable_checkpoints_with_a_warning(data, tmp_path):
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    r = train_here(*common(data, "--save-every", "2", "--stop-after", "6", "--output", str(out)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000002.pt", "step_00000004.pt", "step_00000006.pt"]
    six = ckpts / "step_00000006.pt"
    six.write_bytes(six.read_bytes()[:1000])  # a broken latest checkpoint

    # An older checkpoint, when every later one is unreadable: allowed, saying so.
    r = train_here(*common(data, "--resume", str(ckpts / "step_00000004.pt"), "--save-every", "1", "--stop-after", "5",
                      "--output", str(out)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "past the later step_00000006.pt" in r.stderr and "unreadable" in r.stderr
    assert (ckpts / "step_00000006.pt.unreadable").is_file()  # kept for a look, out of the way

    # --resume latest falls back to the newest readable one, naming each one it passes over: here a
    # checkpoint whose pickle would run code, which is never loaded.
    marker = tmp_path / "pwned"
    evil = ckpts / "step_00000007.pt"
    torch.save({"x": _Evil(str(marker))}, evil)
    r = train_here(*common(data, "--resume", "latest", "--stop-after", "6", "--output", str(out)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"passing over {evil}: untrusted content, not loaded" in r.stderr
    assert "resumed from" in r.stderr and "step 5, epoch 0" in r.stderr
    assert not marker.exists()


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_an_untrusted_checkpoint_is_refused_without_bad_advice(data, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"x": _Evil(str(marker))}, evil)
    out = tmp_path / "run"
    r = train_here(*common(data, "--resume", str(evil), "--output", str(out)))
    assert r.returncode == 2, r.stderr[-2000:]
    (line,) = errors(r)
    assert f"{evil}: untrusted content, not loaded" in line and "system" in line
    assert "weights_only=False" not in r.stderr and "weights_only` set to `False" not in r.stderr
    assert not marker.exists() and not out.exists()  # refused before anything was written


# -- 8. warnings for inputs that are not what they seem ----------------------------------------


def test_warnings_for_misleading_inputs(data, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(data / "shards", shards)
    sizes = json.loads((shards / "sizes.json").read_text())
    (shards / "sizes.json").write_text(json.dumps({k: v * 10 for k, v in sizes.items()}))  # tenfold
    zs = tmp_path / "zs"
    shutil.copytree(data / "zs", zs)
    (zs / "classnames.txt").unlink()
    (zs / "zz_leftover").mkdir()  # no images: without classnames.txt, silently one class more
    r = train_here("--train-data", f"{shards}/{{00000..00001}}.tar", "--model", TINY, "--batch-size", "8",
              "--workers", "0", "--precision", "fp32", "--train-num-samples", "80", "--zeroshot", f"zs={zs}",
              "--output", str(shards / "run"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "sizes.json over-states 2 shard(s)" in r.stderr and "sizes.json says 320 samples" in r.stderr
    assert f"--output {shards}/run is inside the shards folder {shards}" in r.stderr
    assert "class folder(s) without images (zz_leftover) still count as classes (1 of 25)" in r.stderr
    assert "where sizes.json says 320" in r.stderr  # and what a shard really delivered


def test_checkpoints_of_earlier_versions_stay_resumable(tmp_path):
    """A checkpoint written before data fingerprints and model definitions were recorded is compared
    on what it has: the --train-data spec (normalised) and the model's name."""
    from training.checkpoint import check_resumable
    from training.errors import TrainError

    old = {"data": {"train_data": "/d/shards/{00000..00003}.tar", "batch_size": 8}, "model": {"model": "/a/tiny.json"},
           "run": {"seed": 0}}
    now = {"data": {"train_data": "/d/./shards/{00000..00003}.tar", "batch_size": 8,
                    "fingerprint": {"shards": 4, "bytes": 1, "digest": "x"}},
           "model": {"model": "/b/tiny.json", "definition": {"embed_dim": 64}}, "run": {"seed": 0}}
    check_resumable(old, now, tmp_path / "old.pt")  # same data and model, spelt otherwise: fine
    other = {**now, "data": {**now["data"], "train_data": "/e/shards/{00000..00003}.tar"}}
    with pytest.raises(TrainError, match=r"--train-data: /d/shards/\{00000..00003\}.tar -> /e/shards"):
        check_resumable(old, other, tmp_path / "old.pt")
    with pytest.raises(TrainError, match="--model: /a/tiny.json -> ViT-B-32"):
        check_resumable(old, {**now, "model": {"model": "ViT-B-32", "definition": {}}}, tmp_path / "old.pt")
