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


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import ConfigError  # pipeline.rundir's OutputError: --output is not ours to write
    from training.config import parse_config
    from training.dist import close_distributed, init_distributed

    dist = None
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


if __name__ == "__main__":
    raise SystemExit(main())
