"""The training loop: build everything once, then epochs of steps, evals and checkpoints.

A step is one optimizer update; it consumes `accum_freq` micro-batches of
`batch_size` samples on each of `world_size` ranks. Every rank runs
`steps_per_epoch = samples_per_epoch // global_batch` steps per epoch, so no rank
ever waits in a collective for one that ran out of data.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import open_clip
import torch
import yaml
from fsspec.implementations.local import LocalFileSystem
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel

from pipeline.shards import atomic_write_bytes, get_fs
from training.checkpoint import (
    FORMAT_VERSION,
    UNREADABLE_SUFFIX,
    all_finite,
    check_resumable,
    checkpoint_name,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    newest_readable,
    save_checkpoint,
    step_of,
    unreadable,
)
from training.config import TrainConfig, run_precision
from training.data import WORKER_NICE, EpochPlan, ShardSet, count_samples, expand_shards, is_pipe, make_loader
from training.dist import DistInfo, any_rank, gather_objects, set_cpu_threads
from training.errors import RunFailed, TrainError
from training.evaluate import Evaluator
from training.loss import build_loss, compute_loss
from training.model import build_model, model_definition, recorded_model_change, write_model_config
from training.optim import build_optimizer, cosine_lr, set_lr
from training.output import OutputError, RunOutput
from training.report import Reporter, eval_scalars, import_wandb, train_scalars, wandb_run_id
from training.storage import STORE_ERRORS, Appender, Loc, TensorBoard

log = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100)  # CLIP clamps the learned temperature at 100


def library_versions() -> dict[str, str]:
    import open_clip
    import webdataset

    # str(): torch.__version__ is a TorchVersion, which weights_only loading rejects.
    return {"torch": str(torch.__version__), "open_clip": str(open_clip.__version__),
            "webdataset": str(webdataset.__version__)}


@dataclass
class StepStats:
    loss: torch.Tensor | float
    """A float on logged steps; elsewhere left on the device, unread (reading it syncs the GPU)."""
    data_s: float
    step_s: float


class Trainer:
    """Built in phases, so that a run that must be refused is refused before anything in OUT is
    written, on every rank at once (a rank left behind would wait forever in a collective):

    1. rank 0 claims OUT (ownership, links, lock);
    2. every rank checks what it reads (data, the recorded model config, the checkpoint to resume)
       and that it can write where it will write, builds the model and loads the checkpoint;
    3. the evaluator decodes its eval images; the model is wrapped for DDP;
    4. rank 0 writes run.json, OUT/model/NAME.json (once per folder), config.yaml, removes
       the temporaries of killed saves, and opens TensorBoard (and wandb, --report-to).
    """

    def __init__(self, cfg: TrainConfig, dist: DistInfo) -> None:
        self.cfg, self.dist = cfg, dist
        self.device = dist.device
        self.precision = run_precision(cfg.run.precision, self.device.type)
        """What --precision computes in here (OpenCLIP's `amp` depends on the device)."""
        self.report: Reporter | None = None
        self.wandb: Any = None
        self.tb: TensorBoard | None = None
        self.logs: dict[str, Appender] = {}
        self.trace: Appender | None = None
        self.output: RunOutput | None = None
        self._wandb_tmp: str | None = None
        try:
            self._build()
        except BaseException:
            # A refusal at the very end (wandb.init failing) comes after TensorBoard's writer was
            # opened: its local staging folder and the wandb folder go, not left in /tmp.
            if self.tb is not None:
                self.tb.discard()
            if self._wandb_tmp is not None:
                shutil.rmtree(self._wandb_tmp, ignore_errors=True)
            if self.output is not None:
                self.output.abandon()  # the lock, and a folder that only the lock had created
            raise

    def _build(self) -> None:
        cfg, dist = self.cfg, self.dist
        if cfg.run.precision == "amp_fp16" and self.device.type == "cpu":
            raise TrainError("--precision amp_fp16 needs a CUDA GPU; on CPU use amp_bf16 or fp32")
        if self.precision != cfg.run.precision and dist.is_main:
            log.warning("--precision %s is OpenCLIP's fp16 autocast with a GradScaler, for CUDA GPUs; on %s (no fast "
                        "fp16) this run computes in %s: bf16 autocast, fp32 weights, no GradScaler", cfg.run.precision,
                        self.device.type, self.precision)
        self.output = RunOutput(cfg.run.output)
        # A local folder or object storage alike (training/storage.py); a URL no filesystem serves
        # was refused above, never taken for a local folder named after it.
        self.out = Loc(self.output.fs, self.output.root)
        self.ckpt_dir = self.out / "checkpoints"

        # Data first: a bad --train-data should fail before minutes of model building.
        self.urls = expand_shards(cfg.data.train_data)
        self.shards = ShardSet.describe(self.urls)
        self.samples_per_epoch = cfg.data.train_num_samples or count_samples(self.urls)
        self.global_batch = cfg.data.batch_size * dist.world_size * cfg.optim.accum_freq
        self.steps_per_epoch = self.samples_per_epoch // self.global_batch
        if self.steps_per_epoch == 0:
            raise TrainError(f"{cfg.data.train_data}: {self.samples_per_epoch} samples per epoch is less than one "
                             f"global batch of {self.global_batch}; lower --batch-size or add data")
        self.total_steps = self.steps_per_epoch * cfg.run.epochs
        # Checked now rather than in a worker: too few shards for ranks x workers.
        EpochPlan(urls=self.urls, seed=cfg.run.seed, epoch=0, rank=dist.rank, world_size=dist.world_size,
                  workers=cfg.data.workers, batch_size=cfg.data.batch_size, batches=1)
        self.definition = model_definition(cfg.model)
        self.model_name = self.definition.name
        if dist.is_main:
            self._warn_about_inputs()

        # Position: global step, completed epochs, micro-batches into the current epoch.
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.consumed: list[list[int]] | None = None  # per rank, per worker: raw samples consumed
        # Bad samples this rank's loader skipped: in finished epochs, and per worker in this one.
        self.bad_before_epoch = 0
        self.bad_in_epoch: list[int] = []
        self.resume_bad_in_epoch: list[int] = []
        self.nonfinite_skipped = 0
        self.last_saved: Loc | None = None
        self._set_aside: list[Loc] = []  # unreadable checkpoints a resume went past

        self._together(self.output.claim if dist.is_main else lambda: None)
        self._together(self._prepare)
        self.evaluator = Evaluator(cfg.eval.zeroshot, cfg.eval.retrieval, cfg.eval.overlap_audit,
                                   self.val_transform, self.tokenizer, self.device, self.autocast,
                                   dist.rank, dist.world_size, cfg.eval.eval_batch_size,
                                   input_dtype=open_clip.get_input_dtype(self.precision))
        self.ddp: DistributedDataParallel | None = None
        model: torch.nn.Module = self.raw_model
        if dist.distributed:
            # Broadcasts rank 0's weights: only once every rank is known to have got this far.
            self.ddp = DistributedDataParallel(
                self.raw_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            model = self.ddp
        self.model = torch.compile(model) if cfg.model.compile else model
        self._together(self._write_run_files if dist.is_main else lambda: None)

        n_params = sum(p.numel() for p in self.raw_model.parameters())
        log.info("model %s: %.2fM parameters, precision %s, device %s, world size %d, %d torch thread(s) "
                 "+ %d loader worker(s) per rank", self.model_name, n_params / 1e6, self.precision, self.device,
                 dist.world_size, self.threads, cfg.data.workers)
        log.info("%d shards, %d samples/epoch; global batch %d = %d per rank x %d ranks x %d accum; "
                 "%d steps/epoch, %d steps in %d epochs (%d samples/epoch used)",
                 len(self.urls), self.samples_per_epoch, self.global_batch, cfg.data.batch_size,
                 dist.world_size, cfg.optim.accum_freq, self.steps_per_epoch, self.total_steps, cfg.run.epochs,
                 self.steps_per_epoch * self.global_batch)

    def _together(self, phase: Callable[[], None]) -> None:
        """Run a setup phase on this rank; if it fails on any rank, every rank stops with it (a refusal
        with exit 2, a failure with exit 1) instead of waiting for the others in a collective."""
        error: BaseException | None = None
        try:
            phase()
        except (TrainError, OutputError, RunFailed) as exc:
            error = exc
        mine = None if error is None else (isinstance(error, RunFailed), str(error))
        failed = [(r, m) for r, m in enumerate(gather_objects(mine, self.dist.world_size)) if m is not None]
        if error is not None:
            raise error
        if failed:
            rank, (run_failed, message) = failed[0]
            raise (RunFailed if run_failed else TrainError)(f"stopped because rank {rank} did: {message}")

    def _warn_about_inputs(self) -> None:
        """Things that do not stop a run but make it other than the user thinks."""
        implausible = self.shards.implausible_counts()
        if implausible:
            log.warning("sizes.json over-states %d shard(s), e.g. %s; samples per epoch (%d) comes from it, so "
                        "each epoch re-reads the shards to make up the difference: rewrite sizes.json or pass "
                        "--train-num-samples", len(implausible), implausible[0], self.samples_per_epoch)
        if not self.out.local:
            return
        out = os.path.realpath(self.out)
        for folder in sorted({os.path.realpath(os.path.dirname(u)) for u in self.urls
                              if not is_pipe(u) and isinstance(get_fs(u)[0], LocalFileSystem)}):
            if out == folder or out.startswith(folder + os.sep):
                log.warning("--output %s is inside the shards folder %s: checkpoints and logs then mix with the "
                            "data (and travel with it); keep runs in a folder of their own", self.out, folder)

    def _prepare(self) -> None:
        """Every check that reads (nothing written yet), then the model built and the checkpoint loaded."""
        cfg, dist = self.cfg, self.dist
        change = recorded_model_change(self.definition, self.out / "model")
        if change:
            raise TrainError(change)
        if cfg.run.wandb and dist.is_main:
            self.wandb = import_wandb()  # only when asked: an optional dependency
        ckpt_path, ckpt = self._checkpoint_to_resume(cfg.ckpt.resume)
        if ckpt is not None:
            check_resumable(ckpt["config"], self.config_record(), ckpt_path)
            self._check_resume_position(ckpt_path, ckpt)
        # The folders this rank writes to, checked now rather than at the first save an epoch later.
        subdirs = ["", "checkpoints", "model", "tb"] if dist.is_main else ([""] if cfg.run.trace_samples else [])
        self.output.check_writable(subdirs)

        self.threads = set_cpu_threads(cfg.run.threads, dist)
        torch.manual_seed(cfg.run.seed)  # same init on every rank (DDP also broadcasts rank 0's)
        random.seed(cfg.run.seed)
        bundle = build_model(cfg.model, self.precision, self.device, self.definition)
        self.raw_model = bundle.model
        self.train_transform, self.val_transform, self.tokenizer = (bundle.train_transform, bundle.val_transform,
                                                                   bundle.tokenizer)
        self.optimizer = build_optimizer(self.raw_model, cfg.optim)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "amp_fp16" else None
        self.loss_fn = build_loss(cfg.model.siglip, dist.rank, dist.world_size)
        if ckpt is not None:
            self._resume(ckpt_path, ckpt)

    def _write_run_files(self) -> None:
        """Rank 0, once every check passed: the only writes before training."""
        try:
            self._write_run_files_unchecked()
        except OSError as exc:  # checked writable a moment ago: a full disk, or someone changed it since
            raise RunFailed(f"{exc.filename or self.out}: cannot write ({exc.strerror or exc})") from exc

    def _write_run_files_unchecked(self) -> None:
        self.output.record_run({"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": self.model_name})
        if not (self.out / "model" / f"{self.model_name}.json").exists():
            # OUT/model/NAME.json: what open_clip needs to rebuild the model a checkpoint names.
            write_model_config(self.definition, self.out / "model")
        for path in self._set_aside:
            aside = path.with_name(path.name + UNREADABLE_SUFFIX)
            n = 1
            while aside.exists():
                aside, n = path.with_name(f"{path.name}{UNREADABLE_SUFFIX}.{n}"), n + 1
            path.rename(aside)
            log.warning("%s: unreadable, renamed to %s (out of the way of pruning and --resume latest)",
                        path, aside.name)
        self.output.remove_temporaries()
        atomic_write_bytes(self.output.fs, self.output.path("config.yaml"),
                           yaml.safe_dump(self.config_record(), sort_keys=False).encode())
        self.tb = TensorBoard(self.out / "tb")
        self.logs = {name: Appender(self.out / name) for name in ("results.jsonl", "train_log.jsonl")}
        # A wandb folder only when wandb is asked for: made for every run, an s3 one left an empty
        # clipforge-wandb-* folder in /tmp each time.
        self.report = Reporter(self.tb, self.out.name, self._wandb_dir() if self.wandb is not None else "", self.wandb,
                               project=self.cfg.run.wandb_project_name,
                               run_id=wandb_run_id(self.output.display(), str(self.output.recorded.get("created"))),
                               config=self.config_record())

    # -- helpers ---------------------------------------------------------------------

    def _wandb_dir(self) -> str:
        """wandb writes only to a local disk: OUT itself when local, else WANDB_DIR or a temporary folder
        (offline runs there are for `wandb sync`; online ones are uploaded by wandb itself)."""
        if self.out.local:
            return self.out.path
        if os.environ.get("WANDB_DIR"):
            return os.environ["WANDB_DIR"]
        self._wandb_tmp = tempfile.mkdtemp(prefix="clipforge-wandb-")
        return self._wandb_tmp

    @contextmanager
    def autocast(self) -> Iterator[None]:
        """The context of every forward pass, training and eval: mixed precision and attention kernel."""
        p = self.precision
        amp: AbstractContextManager = nullcontext()
        if p == "amp_bf16":
            amp = torch.autocast(self.device.type, dtype=torch.bfloat16)
        elif p == "amp_fp16":
            amp = torch.autocast(self.device.type, dtype=torch.float16)
        attention: AbstractContextManager = nullcontext()
        if self.device.type == "cpu" and p in ("amp_bf16", "pure_bf16"):
            # In bf16 torch's CPU flash-attention kernel is 2-8x slower than the plain math one
            # (forward + backward at batch 64: 7.3 vs 1.8 ms for a 32-token text tower, 110 vs 48 ms
            # for ViT-B/32's 50 tokens); it was half of every step of a small CLIP. In fp32 flash is
            # faster, and on GPUs the fused kernels are, so only here. Same math, other rounding.
            attention = sdpa_kernel(SDPBackend.MATH)
        with attention, amp:
            yield

    def config_record(self) -> dict[str, Any]:
        """The resolved config plus the derived facts a resume must agree with."""
        rec = self.cfg.to_dict()
        rec["run"]["world_size"] = self.dist.world_size
        rec["data"]["samples_per_epoch"] = self.samples_per_epoch
        # The data and the model by content: the same shards spelt another way are the same data.
        rec["data"]["fingerprint"] = self.shards.fingerprint()
        rec["model"]["definition"] = self.definition.config
        return rec

    def bad_samples(self) -> int:
        """Bad samples skipped so far by every worker of every rank; every rank must call it."""
        return sum(gather_objects(self.bad_before_epoch + sum(self.bad_in_epoch), self.dist.world_size))

    @property
    def micro_batches_per_epoch(self) -> int:
        return self.steps_per_epoch * self.cfg.optim.accum_freq

    # -- checkpoints -----------------------------------------------------------------

    def _checkpoint_to_resume(self, resume: str | None) -> tuple[Loc | None, dict[str, Any] | None]:
        """The checkpoint to resume from (loaded), after the checks that can refuse it; (None, None) for
        a fresh start. Unreadable checkpoints are passed over with a warning naming each one."""
        if not resume:
            # Checkpoints are pruned by step number, so a new run's early steps would be deleted in
            # favour of an old run's later ones: a fresh start never shares a checkpoint folder.
            existing = find_latest(self.ckpt_dir)
            if existing is not None:
                raise TrainError(f"{existing}: --output {self.cfg.run.output} already holds checkpoints of a run; "
                                 "continue it with --resume latest, or start a new run with another --output")
            return None, None
        if resume == "latest":
            path, ckpt, skipped = newest_readable(self.ckpt_dir)
            for _, why in skipped:
                log.warning("--resume latest: passing over %s", why)
            self._set_aside = [p for p, _ in skipped]
            if path is None:
                log.info("--resume latest: no %scheckpoint in %s, starting from scratch",
                         "readable " if skipped else "", self.ckpt_dir)
            return path, ckpt
        path = Loc.of(resume, "--resume")
        return path, load_checkpoint(path)

    def _check_resume_position(self, path: Loc, ckpt: dict[str, Any]) -> None:
        """Refusals that depend on where in the data and in the folder's history the checkpoint lies."""
        batch = ckpt["data"]["batch"]
        if not 0 <= batch <= self.micro_batches_per_epoch:
            # The epoch loop runs until batch_in_epoch == micro_batches_per_epoch: past it, never ends.
            raise TrainError(f"{path}: data position micro-batch {batch} lies outside an epoch of "
                             f"{self.micro_batches_per_epoch} micro-batches; restore the run's settings, or start "
                             "a new run with --pretrained pointing at the checkpoint")
        step = ckpt["step"]
        later = {p: unreadable(p) for p in list_checkpoints(self.ckpt_dir)
                 if step_of(p) > step and p not in self._set_aside}
        readable_later = [p for p, why in later.items() if why is None]
        if readable_later:
            # Same trap as a fresh start over an old run: pruning by step would keep the old
            # history's later checkpoints and delete the new ones, and "latest" would pick the old.
            raise TrainError(f"{path}: step {step}, but {self.ckpt_dir} already holds {len(readable_later)} later "
                             f"checkpoint(s) up to {readable_later[-1].name}; resume from the latest, or copy this "
                             "checkpoint and resume it with another --output")
        for p, why in later.items():
            log.warning("--resume %s: step %d, past the later %s: %s", path, step, p.name, why)
        self._set_aside += list(later)

    def _resume(self, path: Loc, ckpt: dict[str, Any]) -> None:
        try:
            self.raw_model.load_state_dict(ckpt["state_dict"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise TrainError(f"{path}: its weights do not fit model {self.model_name} "
                             f"({' '.join(str(exc).split())[:200]}); resume with the model it was trained with") \
                from None
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = ckpt["step"]
        self.nonfinite_skipped = int(ckpt.get("nonfinite_skipped") or 0)
        data = ckpt["data"]
        self.epoch, self.batch_in_epoch, self.consumed = data["epoch"], data["batch"], data["consumed"]
        # Bad samples skipped: this rank's total over finished epochs, and per worker in this one
        # (handed back to the loader, which carries on counting from there). Older checkpoints: 0.
        bad = data.get("bad") or {}
        self.bad_before_epoch = (bad.get("before_epoch") or [0] * self.dist.world_size)[self.dist.rank]
        self.resume_bad_in_epoch = (bad.get("in_epoch") or [[]] * self.dist.world_size)[self.dist.rank]
        rng = ckpt["rng"]
        random.setstate(_as_tuple(rng["python"]))
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and rng.get("cuda") is not None:
            # Gathered in global rank order (save()); local_rank would hand node 1's ranks node 0's states.
            torch.cuda.set_rng_state(rng["cuda"][self.dist.rank])
        log.info("resumed from %s: step %d, epoch %d, micro-batch %d of the epoch",
                 path, self.step, self.epoch, self.batch_in_epoch)

    def save(self, consumed_here: list[int], score: tuple[str, float] | None) -> None:
        # Every rank's loader position goes into the checkpoint; all ranks take part in the gather.
        consumed = gather_objects(consumed_here, self.dist.world_size)
        # At an epoch end bad_in_epoch is already folded into bad_before_epoch (and is empty).
        bad = {"before_epoch": gather_objects(self.bad_before_epoch, self.dist.world_size),
               "in_epoch": gather_objects(list(self.bad_in_epoch), self.dist.world_size)}
        cuda_rng = gather_objects(torch.cuda.get_rng_state() if self.device.type == "cuda" else None,
                                  self.dist.world_size)
        self._check_finite_weights("saved")
        error = None
        if self.dist.is_main:
            payload = {
                # OpenCLIP's keys, so open_clip.create_model_and_transforms(name, pretrained=path) loads it.
                "epoch": self.epoch,
                "name": self.model_name,
                "state_dict": self.raw_model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                # What an exact resume needs.
                "format": FORMAT_VERSION,
                "step": self.step,
                "data": {"epoch": self.epoch, "batch": self.batch_in_epoch, "consumed": consumed, "bad": bad},
                "config": self.config_record(),
                "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                        "cuda": cuda_rng if cuda_rng[0] is not None else None},
                "versions": library_versions(),
                "nonfinite_skipped": self.nonfinite_skipped,
            }
            try:
                # The logs first: once a checkpoint is visible, the logs up to its step are too (a resume
                # continues them from there).
                self.sync_outputs()
                log.info("saved %s", save_checkpoint(self.ckpt_dir, self.step, payload, self.cfg.ckpt.keep_last,
                                                     score))
            except RunFailed as exc:
                error = str(exc)
        # Also the barrier that keeps the other ranks from running ahead of the save.
        failed = [m for m in gather_objects(error, self.dist.world_size) if m is not None]
        if failed:
            raise RunFailed(failed[0])
        self.last_saved = self.ckpt_dir / checkpoint_name(self.step)  # on every rank, for their messages

    def _check_finite_weights(self, before: str) -> None:
        """Stop if the last update left a weight (or optimizer moment) non-finite: a loss that was still
        finite does not prove the update it drove was. Checked on every rank, before evals and saves."""
        state = self.optimizer.state_dict()["state"]
        bad = not (all_finite(self.raw_model.state_dict()) and all_finite(state))
        if any_rank(bad, self.device, self.dist.world_size):
            raise RunFailed(f"step {self.step}: the weights are not finite after this step's update; stopping "
                            f"before it is {before}. {self._nonfinite_advice()}")

    def _nonfinite_advice(self) -> str:
        saved = f"the last checkpoint ({self.last_saved.name}) holds finite weights" if self.last_saved else \
            "no checkpoint of this run was written with them"
        return (f"Nothing non-finite was saved ({saved}). Lower --lr (now {self.cfg.optim.lr:g}), keep "
                "--grad-clip-norm on, or let --skip-nonfinite N skip a few such steps")

    # -- evaluation ------------------------------------------------------------------

    def evaluate(self) -> tuple[str, float] | None:
        """Run every eval set; on rank 0 log and record. Returns the checkpoint score, if any."""
        if self.evaluator.empty:
            return None
        self._check_finite_weights("evaluated")  # a NaN model's scores would be noise, and could rank as best
        t0 = time.perf_counter()
        results = self.evaluator.run(self.raw_model)
        bad = self.bad_samples()
        score = None
        if self.dist.is_main:
            with self.logs["results.jsonl"] as f:  # written at once, on object storage too
                for name, metrics in results.items():
                    f.write(json.dumps({"step": self.step, "epoch": self.epoch, "set": name, **metrics,
                                        "bad_samples": bad}) + "\n")
                    if metrics["kind"] == "zeroshot" and score is None:
                        score = (f"{name}/top1", metrics["top1"])
            summary = ", ".join(
                f"{n} top1 {m['top1']:.3f} top5 {m['top5']:.3f}" if m["kind"] == "zeroshot"
                else f"{n} i2t R@1 {m['i2t_R@1']:.3f} t2i R@1 {m['t2i_R@1']:.3f}" for n, m in results.items())
            self.report.log(eval_scalars(results), self.step)
            log.info("eval step %d (%.1fs): %s", self.step, time.perf_counter() - t0, summary)
        # Rank 0's score decides which checkpoint is "best"; the others never use it.
        return score

    # -- training --------------------------------------------------------------------

    def train_step(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """One optimizer step: (loss, gradient norm, applied). Loss and norm stay on the device.

        The update is applied only if the loss and the gradient norm are finite on every rank;
        all ranks learn it from one all-reduced flag, so they skip (or stop) together. That flag
        is the one read from the device each step (GradScaler reads its own the same way)."""
        lr = cosine_lr(self.step, self.cfg.optim.lr, self.cfg.optim.warmup, self.total_steps)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        # pure_bf16 casts the weights, so the images must match them (autocast does it for AMP).
        dtype = open_clip.get_input_dtype(self.precision)
        micro = [(i.to(self.device, dtype=dtype, non_blocking=True), t.to(self.device, non_blocking=True))
                 for i, t in micro]
        no_sync = self.ddp.no_sync if self.ddp is not None else None
        loss = forward_backward(self.model, self.loss_fn, micro, self.autocast, self._backward, no_sync).detach()
        norm, applied = apply_update(self.raw_model, self.optimizer, self.scaler, loss, self.cfg.optim.grad_clip_norm,
                                     self.dist.world_size)
        if applied:
            with torch.no_grad():
                self.raw_model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return loss, norm, applied

    def _skip_or_stop(self, loss: torch.Tensor, norm: torch.Tensor) -> None:
        """A step whose update was not applied: counted against --skip-nonfinite, else the run stops."""
        values = gather_objects((float(loss), float(norm)), self.dist.world_size)
        ranks = [r for r, (lo, no) in enumerate(values) if not (math.isfinite(lo) and math.isfinite(no))]
        what = ", ".join(f"rank {r}: loss {values[r][0]:.4g}, gradient norm {values[r][1]:.4g}" for r in ranks[:4])
        self.nonfinite_skipped += 1
        allowed = self.cfg.optim.skip_nonfinite
        if self.nonfinite_skipped > allowed:
            skipped = f" after skipping {allowed} such step(s)" if allowed else ""
            raise RunFailed(f"step {self.step}: non-finite loss or gradient ({what}); stopping{skipped}, this "
                            f"step's update not applied. {self._nonfinite_advice()}")
        log.warning("step %d: non-finite loss or gradient (%s); update skipped (%d of --skip-nonfinite %d)",
                    self.step, what, self.nonfinite_skipped, allowed)

    def _backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _log_step(self, stats: StepStats, window: list[StepStats], epoch_batch: int, bad: int) -> None:
        step_s = sum(s.step_s for s in window) / len(window)
        data_s = sum(s.data_s for s in window) / len(window)
        sps = self.global_batch / step_s
        lr = self.optimizer.param_groups[0]["lr"]
        scale = float(self.raw_model.logit_scale.detach().exp())
        loss = float(stats.loss)
        # ETA: the steps left to where this run ends (its last step, or --stop-after) at the log
        # window's rate; evals and saves not included. Elapsed: since this process began training.
        end = min(self.total_steps, self.cfg.run.stop_after or self.total_steps)
        elapsed, eta = time.perf_counter() - self.t_start, max(0, end - self.step) * step_s
        # benchmarks/train.py reads "step N/TOTAL " from these lines (OURS_PROGRESS): keep it first.
        log.info("step %d/%d epoch %d (%.0f%%) loss %.4f lr %.3g scale %.2f | %.1f samples/s, %.1f/device | "
                 "data %.3fs of %.3fs step | %d bad samples skipped | elapsed %s, ETA %s", self.step,
                 self.total_steps, self.epoch, 100 * epoch_batch / self.micro_batches_per_epoch, loss, lr, scale,
                 sps, sps / self.dist.world_size, data_s, step_s, bad, hms(elapsed), hms(eta))
        rec = {"step": self.step, "epoch": self.epoch, "loss": loss, "lr": lr, "logit_scale": scale,
               "samples_per_s": sps, "samples_per_s_per_device": sps / self.dist.world_size,
               "data_s": data_s, "step_s": step_s, "bad_samples": bad}
        self.logs["train_log.jsonl"].write(json.dumps(rec) + "\n")
        self.report.log(train_scalars(rec), self.step)
        self.sync_outputs(force=False)

    def train(self) -> dict[str, Any]:
        """Run to the end (or --stop-after); returns the last eval results summary on rank 0."""
        cfg, d = self.cfg, self.dist
        accum = cfg.optim.accum_freq
        stopped = False
        self.t_start = time.perf_counter()
        if cfg.run.trace_samples:
            self.out.mkdir(parents=True, exist_ok=True)
        trace = Appender(self.out / f"trace-rank{d.rank}.jsonl") if cfg.run.trace_samples else None
        self.trace = trace
        try:
            while self.epoch < cfg.run.epochs and not stopped:
                plan = EpochPlan(
                    urls=self.urls, seed=cfg.run.seed, epoch=self.epoch, rank=d.rank, world_size=d.world_size,
                    workers=cfg.data.workers, batch_size=cfg.data.batch_size, batches=self.micro_batches_per_epoch,
                    start_batch=self.batch_in_epoch, consumed=self.consumed[d.rank] if self.consumed else [],
                    bad=self.resume_bad_in_epoch if self.consumed else [],
                    shuffle_buffer=cfg.data.shuffle_buffer, shuffle_initial=cfg.data.shuffle_initial,
                    sizes=self.shards.counts)
                consumed = list(plan.consumed)
                self.bad_in_epoch = list(plan.bad)
                batches = iter(make_loader(plan, self.train_transform, self.tokenizer,
                                           pin_memory=self.device.type == "cuda",
                                           worker_nice=WORKER_NICE if self.device.type == "cpu" else 0))
                window: list[StepStats] = []
                while self.batch_in_epoch < self.micro_batches_per_epoch:
                    t0 = time.perf_counter()
                    micro, keys = [], []
                    for _ in range(accum):
                        images, texts, meta = next(batches)
                        consumed[meta["worker"]] = meta["consumed"]
                        self.bad_in_epoch[meta["worker"]] = meta["bad"]  # the worker's running count
                        micro.append((images, texts))
                        keys.extend(meta["keys"])
                    t1 = time.perf_counter()
                    loss, norm, applied = self.train_step(micro)
                    self.step += 1
                    self.batch_in_epoch += accum
                    if not applied:
                        self._skip_or_stop(loss, norm)
                    log_now = self.step % cfg.run.log_every == 0 or self.step == 1
                    shown: torch.Tensor | float = loss
                    if log_now or trace is not None:
                        # Reading the loss waits for the GPU, so only where it is shown; and inside the
                        # timed step, so the step times of a log window add up to its wall time.
                        shown = float(loss)
                    stats = StepStats(shown, t1 - t0, time.perf_counter() - t0)
                    window = [*window[-(cfg.run.log_every - 1):], stats] if cfg.run.log_every > 1 else [stats]
                    if trace is not None:
                        trace.write(json.dumps({"step": self.step, "loss": shown, "keys": keys}) + "\n")
                        trace.flush(force=False)
                    if log_now:
                        bad = self.bad_samples()  # a collective: on every rank, at the same steps
                        if d.is_main:
                            self._log_step(stats, window, self.batch_in_epoch, bad)
                    epoch_end = self.batch_in_epoch == self.micro_batches_per_epoch
                    stopped = cfg.run.stop_after is not None and self.step >= cfg.run.stop_after
                    if epoch_end:
                        break
                    score = None
                    if cfg.eval.eval_every and self.step % cfg.eval.eval_every == 0:
                        score = self.evaluate()
                    if stopped or (cfg.ckpt.save_every and self.step % cfg.ckpt.save_every == 0):
                        self.save(consumed, score)
                    if stopped:
                        log.info("stopping after step %d (--stop-after)", self.step)
                        break
                del batches  # shut the workers down before the next epoch starts its own
                self.bad_before_epoch += sum(self.bad_in_epoch)
                self.bad_in_epoch = []
                if self.batch_in_epoch == self.micro_batches_per_epoch:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    self.consumed = None
                    score = self.evaluate()
                    self.save([0] * plan.n_workers, score)
                    stopped = stopped or (cfg.run.stop_after is not None and self.step >= cfg.run.stop_after)
        finally:
            if trace is not None:
                trace.close()
        if d.is_main:
            self.sync_outputs()
            if not stopped or self.epoch >= cfg.run.epochs:
                from training.curves import plot_curves

                log.info("curves: %s", plot_curves(self.out))
        return {"step": self.step, "epoch": self.epoch, "stopped": stopped}

    def sync_outputs(self, force: bool = True) -> None:
        """Logs and TensorBoard onto object storage (locally they are written as they go); `force`
        False: only if the last upload is SYNC_EVERY seconds old."""
        try:
            for f in [*self.logs.values(), *([self.trace] if self.trace is not None else [])]:
                f.flush(force=force)
            if self.tb is not None:
                self.tb.sync(force=force)
        except STORE_ERRORS as exc:
            raise RunFailed(f"{self.out}: cannot write the run's logs ({getattr(exc, 'strerror', None) or exc})") \
                from exc

    def close(self) -> None:
        """At the end, also after an error: logs and TensorBoard written, the output folder's lock released."""
        try:
            try:
                self.sync_outputs()
                if self.report is not None:
                    self.report.close()  # TensorBoard's last upload, and wandb's finish
                elif self.tb is not None:
                    self.tb.close()
            except (RunFailed, *STORE_ERRORS) as exc:  # after a failure, that failure is the one to report
                log.warning("while closing the run: %s", exc)
        finally:
            if self.output is not None:
                self.output.release()


def hms(seconds: float) -> str:
    """1:02:03 (hours not padded, as datetime.timedelta prints)."""
    s = max(0, round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def apply_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                 loss: torch.Tensor, clip: float | None, world_size: int) -> tuple[torch.Tensor, bool]:
    """After the backward pass: unscale (fp16), clip, and step, unless the loss or the gradient norm
    is non-finite on any rank (nonfinite_step). Returns (gradient norm, whether the update was applied);
    an update the scaler itself skipped for an fp16 overflow counts as applied (it is its routine)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip is not None:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    if any_rank(nonfinite_step(loss, norm, scaled=scaler is not None), loss.device, world_size):
        if scaler is not None:
            scaler.update()  # closes the step unscale_ opened (and lowers the scale: the grads are bad too)
        return norm, False
    if scaler is not None:
        scaler.step(optimizer)  # skips the update itself if a gradient overflowed in fp16
        scaler.update()
    else:
        optimizer.step()
    return norm, True


def nonfinite_step(loss: torch.Tensor, norm: torch.Tensor, scaled: bool) -> torch.Tensor:
    """A device flag: must this step's update be withheld as non-finite?

    Under GradScaler (fp16), inf/NaN gradients are the scaler's business: it skips that update
    itself and lowers the scale, which is no divergence and counts against nothing. The loss is
    computed before any scaling, so a non-finite loss is a real one, with or without a scaler."""
    if scaled:
        return ~torch.isfinite(loss)
    return ~(torch.isfinite(loss) & torch.isfinite(norm))


def forward_backward(model: torch.nn.Module, loss_fn: torch.nn.Module, micro: list[tuple[torch.Tensor, torch.Tensor]],
                     autocast: Callable[[], AbstractContextManager], backward: Callable[[torch.Tensor], None],
                     no_sync: Callable[[], AbstractContextManager] | None = None) -> torch.Tensor:
    """Gradients of the loss of all micro-batches taken as one batch; returns the loss.

    With several micro-batches, OpenCLIP's accumulation: features of all micro-batches first
    (no grad), then each micro-batch again with grad against the cached rest, so every
    micro-batch sees the negatives of the whole accumulated batch, as one big batch would.
    """
    if len(micro) == 1:
        with autocast():
            loss = compute_loss(loss_fn, model(*micro[0]))
        backward(loss)
        return loss
    with torch.no_grad(), autocast():
        cached = [model(i, t) for i, t in micro]
    for j, (images, texts) in enumerate(micro):
        last = j == len(micro) - 1
        # DDP all-reduces gradients once, in the last backward.
        sync = nullcontext() if last or no_sync is None else no_sync()
        with sync:
            with autocast():
                out = model(images, texts)
                merged = dict(out)
                for key in ("image_features", "text_features"):
                    merged[key] = torch.cat([c[key] for c in cached[:j]] + [out[key]]
                                            + [c[key] for c in cached[j + 1:]])
                if not last:
                    # Each pass computes the whole batch's loss: its gradient for a micro-batch's own
                    # features is that micro-batch's share, but for the temperature (and SigLIP's bias)
                    # it is the whole gradient, so only one pass may carry it, or it is accum_freq x
                    # too large (OpenCLIP's accumulation has this bug).
                    for key in ("logit_scale", "logit_bias"):
                        if merged.get(key) is not None:
                            merged[key] = merged[key].detach()
                loss = compute_loss(loss_fn, merged)
            backward(loss)
    return loss


def _as_tuple(state: Any) -> Any:
    """random.setstate needs tuples; a round trip through torch.save keeps them, but be lenient."""
    return tuple(_as_tuple(s) for s in state) if isinstance(state, list) else state
