"""Rank 0's scalars, under OpenCLIP's tag names: TensorBoard always (OUT/tb), wandb with --report-to wandb.

Tags are the ones OpenCLIP's `open_clip_train/train.py` writes where the quantity is the same
(`train/loss`, `train/lr`, `train/scale`, `train/samples_per_second`, ..., and `val/...`
for evaluations), so dashboards and scripts made for its runs read ours. Quantities
OpenCLIP has no name for keep ours under the same prefix (`train/bad_samples`,
`train/epoch`). The x-axis is the global step for evaluations too: ours also run
mid-epoch (--eval-every), where OpenCLIP's TensorBoard uses the epoch.

wandb is imported only when asked for (it is an optional dependency). It runs in
whatever mode its environment says; `WANDB_MODE=offline` logs into OUT/wandb/ without a
network, for `wandb sync` later.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from training.errors import TrainError

log = logging.getLogger(__name__)

TRAIN_TAGS = {
    # train_log.jsonl key -> OpenCLIP's tag. Its data_time/batch_time are seconds per step, as
    # ours (which are means over the log window, its the last step's: loggers smooth anyway).
    "loss": "train/loss",
    "lr": "train/lr",
    "logit_scale": "train/scale",
    "samples_per_s": "train/samples_per_second",
    "samples_per_s_per_device": "train/samples_per_second_per_gpu",
    "data_s": "train/data_time",
    "step_s": "train/batch_time",
}


def train_scalars(record: dict[str, Any]) -> dict[str, float]:
    """A train_log.jsonl record as tagged scalars."""
    return {TRAIN_TAGS.get(k, f"train/{k}"): v for k, v in record.items() if k != "step"}


def _retrieval_metric(key: str) -> str:
    """i2t_R@1 -> image_to_text_R@1 (OpenCLIP's get_clip_metrics names), also after a clean_/overlap_ prefix."""
    return key.replace("i2t_", "image_to_text_").replace("t2i_", "text_to_image_")


def eval_scalars(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Evaluator results as OpenCLIP's val/ tags: zero-shot set NAME as `val/NAME-zeroshot-val-top1`
    (`--zeroshot imagenet=DIR` gives its exact `val/imagenet-zeroshot-val-top1`), retrieval set
    NAME as `val/NAME-image_to_text_R@1`. Numbers only (not per-class tables)."""
    out: dict[str, float] = {}
    for name, metrics in results.items():
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if metrics["kind"] == "zeroshot":
                out[f"val/{name}-zeroshot-val-{key}"] = value
            else:
                out[f"val/{name}-{_retrieval_metric(key)}"] = value
    return out


def import_wandb() -> Any:
    """wandb, or one line saying how to get it. Called before anything of the run is written."""
    try:
        import wandb
    except ImportError as exc:
        raise TrainError(f"--report-to wandb: wandb is not installed ({exc}); `pip install wandb`, or leave "
                         "wandb out of --report-to (TensorBoard is always written to OUT/tb)") from None
    return wandb


def wandb_run_id(output: str, created: str) -> str:
    """One wandb run per output folder: a resume continues it. From the folder and its run.json
    creation time, so a later run in a folder of the same name (or path) is another wandb run."""
    return hashlib.sha256(f"{output}\0{created}".encode()).hexdigest()[:16]


class Reporter:
    """Where rank 0's scalars go: TensorBoard, and wandb when given (the imported module)."""

    def __init__(self, tb: Any, name: str, wandb_dir: str, wandb: Any = None, *, project: str = "clipforge",
                 run_id: str | None = None, config: dict[str, Any] | None = None) -> None:
        """`tb`: the run's training.storage.TensorBoard (OUT/tb, uploaded when OUT is on object
        storage); `wandb_dir`: a local folder (wandb writes only to local disks)."""
        self.wandb_run = None
        if wandb is not None:
            try:
                # resume="allow": the same id again (a resumed run) continues that wandb run.
                self.wandb_run = wandb.init(project=project, name=name, id=run_id, resume="allow",
                                            dir=wandb_dir, config=config)
            except Exception as exc:  # wandb's own errors (not logged in, no network): one line, not a traceback
                raise TrainError(f"--report-to wandb: wandb.init failed ({' '.join(str(exc).split())[:300]}); "
                                 "set WANDB_MODE=offline to log without a network, or run `wandb login`") from None
        self.tb = tb

    def log(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.tb.add_scalar(tag, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def flush(self) -> None:
        self.tb.flush()

    def close(self) -> None:
        try:
            self.tb.close()
        finally:
            if self.wandb_run is not None:
                self.wandb_run.finish()
                self.wandb_run = None
