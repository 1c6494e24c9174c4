"""Contrastive pretraining entry point: `torchrun ... training/train.py` or `python training/train.py`.

    torchrun --nproc_per_node=8 training/train.py --train-data 'corpus/shards/{00000..00127}.tar' \\
        --model ViT-B-32 --batch-size 256 --epochs 10 --precision amp_bf16 \\
        --zeroshot imagenet=evalsets/imagenet-val --retrieval coco=evalsets/coco-5k --output runs/b32
    torchrun ... --resume latest        # continues exactly where it stopped
"""

from __future__ import annotations

import sys
from pathlib import Path

# torchrun runs this file as a script: make `training` and `pipeline` importable without installing.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import logging  # noqa: E402
from typing import Any  # noqa: E402

from training.errors import RunFailed, TrainError  # noqa: E402


def _one_line(exc: BaseException) -> str:
    """A TrainError raised in a DataLoader worker arrives wrapped with its traceback: keep the message."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].removeprefix("training.errors.TrainError: ")
    return " ".join(text.split())


def _rank(dist: Any) -> str:
    return f"rank {dist.rank}: " if dist is not None and dist.distributed else ""


STOP_GRACE = 30.0
"""Seconds a SIGTERM'd process has for its `finally` blocks before it ends regardless."""


def _stop_on_sigterm(signum: int, _frame: Any) -> None:
    """SIGTERM (a scheduler's preemption, `kill`) ends the run as Ctrl-C does: `finally` blocks run, so
    the run's temporaries (a checkpoint being saved, TensorBoard's staging folder and the eval-set copies
    of a run on object storage, easily gigabytes in /tmp) are removed, the logs uploaded and the lock
    released. The process ends regardless STOP_GRACE seconds later, or at a second SIGTERM. (Python
    runs the handler between bytecodes: a rank blocked inside a collective whose peer is gone sees it
    only when that returns; torchrun sends SIGKILL 30 s after its SIGTERM.)"""
    import os
    import signal
    import threading

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    timer = threading.Timer(STOP_GRACE, os._exit, (128 + signum,))
    timer.daemon = True  # never what keeps a process that did finish alive
    timer.start()
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    from pipeline.config import ConfigError  # pipeline.rundir's OutputError: --output is not ours to write
    from training.config import parse_config
    from training.dist import close_distributed, init_distributed

    dist = None
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm) if in_main_thread else None
    try:
        cfg = parse_config(argv)
        dist = init_distributed(cfg.run.device)
        # open_clip logs its model-building chatter at INFO on the root logger: keep it at WARNING.
        logging.basicConfig(level=logging.WARNING, force=True,
                            format=f"%(asctime)s rank{dist.rank} %(levelname)s %(name)s: %(message)s")
        logging.getLogger("training").setLevel(logging.INFO if dist.is_main else logging.WARNING)
        from training.trainer import Trainer

        trainer = Trainer(cfg, dist)
        try:
            trainer.train()
        finally:
            trainer.close()
        return 0
    except (TrainError, ConfigError) as exc:
        print(f"error: {_rank(dist)}{_one_line(exc)}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"error: {_rank(dist)}{_one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        close_distributed()
        if in_main_thread and previous is not None:  # None: a handler installed outside Python, left as is
            signal.signal(signal.SIGTERM, previous)  # main() may be called in a longer-lived process (tests)


if __name__ == "__main__":
    raise SystemExit(main())
