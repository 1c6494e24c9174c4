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
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel

from training.checkpoint import (
    CKPT_RE,
    FORMAT_VERSION,
    check_resumable,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from training.config import TrainConfig
from training.data import EpochPlan, count_samples, expand_shards, make_loader
from training.dist import DistInfo, barrier, gather_objects, set_cpu_threads
from training.errors import TrainError
from training.evaluate import Evaluator
from training.loss import build_loss, compute_loss
from training.model import build_model
from training.optim import build_optimizer, cosine_lr, set_lr

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
    def __init__(self, cfg: TrainConfig, dist: DistInfo) -> None:
        self.cfg, self.dist = cfg, dist
        self.out = Path(cfg.run.output)
        self.ckpt_dir = self.out / "checkpoints"
        self.device = dist.device
        if cfg.run.precision == "amp_fp16" and self.device.type == "cpu":
            raise TrainError("--precision amp_fp16 needs a CUDA GPU; on CPU use amp_bf16 or fp32")

        # Checkpoints are pruned by step number, so a new run's early steps would be deleted in
        # favour of an old run's later ones: a fresh start never shares a checkpoint folder.
        existing = find_latest(self.ckpt_dir)
        if existing is not None and not cfg.ckpt.resume:
            raise TrainError(f"{existing}: --output {cfg.run.output} already holds checkpoints of a run; "
                             "continue it with --resume latest, or start a new run with another --output")

        # Data first: a bad --train-data should fail before minutes of model building.
        self.urls = expand_shards(cfg.data.train_data)
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

        self.threads = set_cpu_threads(cfg.run.threads, cfg.data.workers, dist)
        torch.manual_seed(cfg.run.seed)  # same init on every rank (DDP also broadcasts rank 0's)
        random.seed(cfg.run.seed)
        # OUT/model/NAME.json: what open_clip needs to rebuild the model a checkpoint names.
        bundle = build_model(cfg.model, cfg.run.precision, self.device, config_dir=self.out / "model")
        self.model_name = bundle.name
        self.raw_model = bundle.model
        self.train_transform, self.tokenizer = bundle.train_transform, bundle.tokenizer
        self.ddp: DistributedDataParallel | None = None
        model: torch.nn.Module = self.raw_model
        if dist.distributed:
            self.ddp = DistributedDataParallel(
                self.raw_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            model = self.ddp
        self.model = torch.compile(model) if cfg.model.compile else model
        self.optimizer = build_optimizer(self.raw_model, cfg.optim)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.run.precision == "amp_fp16" else None
        self.loss_fn = build_loss(cfg.model.siglip, dist.rank, dist.world_size)
        self.evaluator = Evaluator(cfg.eval.zeroshot, cfg.eval.retrieval, cfg.eval.overlap_audit,
                                   bundle.val_transform, self.tokenizer, self.device, self.autocast,
                                   dist.rank, dist.world_size, cfg.eval.eval_batch_size,
                                   input_dtype=open_clip.get_input_dtype(cfg.run.precision))

        # Position: global step, completed epochs, micro-batches into the current epoch.
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.consumed: list[list[int]] | None = None  # per rank, per worker: raw samples consumed
        # Bad samples this rank's loader skipped: in finished epochs, and per worker in this one.
        self.bad_before_epoch = 0
        self.bad_in_epoch: list[int] = []
        self.resume_bad_in_epoch: list[int] = []
        if cfg.ckpt.resume:
            self._resume(cfg.ckpt.resume)

        self.tb = None
        if dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(self.config_record(), sort_keys=False))
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tb"))
        n_params = sum(p.numel() for p in self.raw_model.parameters())
        log.info("model %s: %.2fM parameters, precision %s, device %s, world size %d, %d torch thread(s) "
                 "+ %d loader worker(s) per rank", self.model_name, n_params / 1e6, cfg.run.precision, self.device,
                 dist.world_size, self.threads, cfg.data.workers)
        log.info("%d shards, %d samples/epoch; global batch %d = %d per rank x %d ranks x %d accum; "
                 "%d steps/epoch, %d steps in %d epochs (%d samples/epoch used)",
                 len(self.urls), self.samples_per_epoch, self.global_batch, cfg.data.batch_size,
                 dist.world_size, cfg.optim.accum_freq, self.steps_per_epoch, self.total_steps, cfg.run.epochs,
                 self.steps_per_epoch * self.global_batch)

    # -- helpers ---------------------------------------------------------------------

    @contextmanager
    def autocast(self) -> Iterator[None]:
        """The context of every forward pass, training and eval: mixed precision and attention kernel."""
        p = self.cfg.run.precision
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
        return rec

    def bad_samples(self) -> int:
        """Bad samples skipped so far by every worker of every rank; every rank must call it."""
        return sum(gather_objects(self.bad_before_epoch + sum(self.bad_in_epoch), self.dist.world_size))

    @property
    def micro_batches_per_epoch(self) -> int:
        return self.steps_per_epoch * self.cfg.optim.accum_freq

    # -- checkpoints -----------------------------------------------------------------

    def _resume(self, resume: str) -> None:
        path = find_latest(self.ckpt_dir) if resume == "latest" else Path(resume)
        if path is None:
            log.info("--resume latest: no checkpoint in %s, starting from scratch", self.ckpt_dir)
            return
        ckpt = load_checkpoint(path)
        check_resumable(ckpt["config"], self.config_record(), path)
        self.raw_model.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = ckpt["step"]
        data = ckpt["data"]
        self.epoch, self.batch_in_epoch, self.consumed = data["epoch"], data["batch"], data["consumed"]
        # Bad samples skipped: this rank's total over finished epochs, and per worker in this one
        # (handed back to the loader, which carries on counting from there). Older checkpoints: 0.
        bad = data.get("bad") or {}
        self.bad_before_epoch = (bad.get("before_epoch") or [0] * self.dist.world_size)[self.dist.rank]
        self.resume_bad_in_epoch = (bad.get("in_epoch") or [[]] * self.dist.world_size)[self.dist.rank]
        if not 0 <= self.batch_in_epoch <= self.micro_batches_per_epoch:
            # The epoch loop runs until batch_in_epoch == micro_batches_per_epoch: past it, never ends.
            raise TrainError(f"{path}: data position micro-batch {self.batch_in_epoch} lies outside an epoch of "
                             f"{self.micro_batches_per_epoch} micro-batches; restore the run's settings, or start "
                             "a new run with --pretrained pointing at the checkpoint")
        later = [p for p in list_checkpoints(self.ckpt_dir) if int(CKPT_RE.match(p.name)[1]) > self.step]
        if later:
            # Same trap as a fresh start over an old run: pruning by step would keep the old
            # history's later checkpoints and delete the new ones, and "latest" would pick the old.
            raise TrainError(f"{path}: step {self.step}, but {self.ckpt_dir} already holds {len(later)} later "
                             f"checkpoint(s) up to {later[-1].name}; resume from the latest, or copy this "
                             "checkpoint and resume it with another --output")
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
            }
            path = save_checkpoint(self.ckpt_dir, self.step, payload, self.cfg.ckpt.keep_last, score)
            log.info("saved %s", path)
        barrier(self.dist.world_size)

    # -- evaluation ------------------------------------------------------------------

    def evaluate(self) -> tuple[str, float] | None:
        """Run every eval set; on rank 0 log and record. Returns the checkpoint score, if any."""
        if self.evaluator.empty:
            return None
        t0 = time.perf_counter()
        results = self.evaluator.run(self.raw_model)
        bad = self.bad_samples()
        score = None
        if self.dist.is_main:
            with open(self.out / "results.jsonl", "a") as f:
                for name, metrics in results.items():
                    f.write(json.dumps({"step": self.step, "epoch": self.epoch, "set": name, **metrics,
                                        "bad_samples": bad}) + "\n")
                    for k, v in metrics.items():
                        if isinstance(v, (int, float)) and not isinstance(v, bool):
                            self.tb.add_scalar(f"eval/{name}/{k}", v, self.step)
                    if metrics["kind"] == "zeroshot" and score is None:
                        score = (f"{name}/top1", metrics["top1"])
            summary = ", ".join(
                f"{n} top1 {m['top1']:.3f} top5 {m['top5']:.3f}" if m["kind"] == "zeroshot"
                else f"{n} i2t R@1 {m['i2t_R@1']:.3f} t2i R@1 {m['t2i_R@1']:.3f}" for n, m in results.items())
            log.info("eval step %d (%.1fs): %s", self.step, time.perf_counter() - t0, summary)
        # Rank 0's score decides which checkpoint is "best"; the others never use it.
        return score

    # -- training --------------------------------------------------------------------

    def train_step(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One optimizer step; returns the loss as a detached device tensor (no GPU sync)."""
        lr = cosine_lr(self.step, self.cfg.optim.lr, self.cfg.optim.warmup, self.total_steps)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        # pure_bf16 casts the weights, so the images must match them (autocast does it for AMP).
        dtype = open_clip.get_input_dtype(self.cfg.run.precision)
        micro = [(i.to(self.device, dtype=dtype, non_blocking=True), t.to(self.device, non_blocking=True))
                 for i, t in micro]
        no_sync = self.ddp.no_sync if self.ddp is not None else None
        loss = forward_backward(self.model, self.loss_fn, micro, self.autocast, self._backward, no_sync)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.optim.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.cfg.optim.grad_clip_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        with torch.no_grad():
            self.raw_model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return loss.detach()

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
        log.info("step %d/%d epoch %d (%.0f%%) loss %.4f lr %.3g scale %.2f | %.1f samples/s, %.1f/device | "
                 "data %.3fs of %.3fs step | %d bad samples skipped", self.step, self.total_steps, self.epoch,
                 100 * epoch_batch / self.micro_batches_per_epoch, loss, lr, scale, sps,
                 sps / self.dist.world_size, data_s, step_s, bad)
        rec = {"step": self.step, "epoch": self.epoch, "loss": loss, "lr": lr, "logit_scale": scale,
               "samples_per_s": sps, "samples_per_s_per_device": sps / self.dist.world_size,
               "data_s": data_s, "step_s": step_s, "bad_samples": bad}
        with open(self.out / "train_log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        for k, v in rec.items():
            if k != "step":
                self.tb.add_scalar(f"train/{k}", v, self.step)

    def train(self) -> dict[str, Any]:
        """Run to the end (or --stop-after); returns the last eval results summary on rank 0."""
        cfg, d = self.cfg, self.dist
        accum = cfg.optim.accum_freq
        stopped = False
        self.out.mkdir(parents=True, exist_ok=True)
        trace = open(self.out / f"trace-rank{d.rank}.jsonl", "a") if cfg.run.trace else None  # noqa: SIM115
        try:
            while self.epoch < cfg.run.epochs and not stopped:
                plan = EpochPlan(
                    urls=self.urls, seed=cfg.run.seed, epoch=self.epoch, rank=d.rank, world_size=d.world_size,
                    workers=cfg.data.workers, batch_size=cfg.data.batch_size, batches=self.micro_batches_per_epoch,
                    start_batch=self.batch_in_epoch, consumed=self.consumed[d.rank] if self.consumed else [],
                    bad=self.resume_bad_in_epoch if self.consumed else [],
                    shuffle_buffer=cfg.data.shuffle_buffer, shuffle_initial=cfg.data.shuffle_initial)
                consumed = list(plan.consumed)
                self.bad_in_epoch = list(plan.bad)
                batches = iter(make_loader(plan, self.train_transform, self.tokenizer,
                                           pin_memory=self.device.type == "cuda"))
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
                    loss: torch.Tensor | float = self.train_step(micro)
                    self.step += 1
                    self.batch_in_epoch += accum
                    log_now = self.step % cfg.run.log_every == 0 or self.step == 1
                    if log_now or trace is not None:
                        # Reading the loss waits for the GPU, so only where it is shown; and inside the
                        # timed step, so the step times of a log window add up to its wall time.
                        loss = float(loss)
                    stats = StepStats(loss, t1 - t0, time.perf_counter() - t0)
                    window = [*window[-(cfg.run.log_every - 1):], stats] if cfg.run.log_every > 1 else [stats]
                    if trace is not None:
                        trace.write(json.dumps({"step": self.step, "loss": loss, "keys": keys}) + "\n")
                        trace.flush()
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
            self.tb.flush()
            if not stopped or self.epoch >= cfg.run.epochs:
                from training.curves import plot_curves

                log.info("curves: %s", plot_curves(self.out))
        return {"step": self.step, "epoch": self.epoch, "stopped": stopped}

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


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
