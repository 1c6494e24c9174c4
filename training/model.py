"""open_clip models, transforms and tokenizer, by name or from a JSON config file."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from training.config import ModelConfig
from training.errors import TrainError


def resolve_model_name(model: str) -> str:
    """Register path/to/NAME.json with open_clip (name = file stem) or check a known name."""
    if model.endswith(".json"):
        path = Path(model)
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise TrainError(f"{model}: cannot read model config ({exc})") from exc
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
        if missing:
            raise TrainError(f"{model}: model config lacks {missing} (OpenCLIP format: embed_dim, vision_cfg, text_cfg)")
        open_clip.add_model_config(path)
        return path.stem
    if model not in open_clip.list_models():
        raise TrainError(f"--model {model!r}: not an open_clip model name nor a .json config; see open_clip.list_models()")
    return model


@dataclass
class ModelBundle:
    name: str
    model: torch.nn.Module
    train_transform: Any
    val_transform: Any
    tokenizer: Any


def write_model_config(name: str, model_cfg: dict[str, Any], config_dir: Path | None) -> Path | None:
    """Write config_dir/NAME.json atomically (every rank writes the same bytes); None without a dir."""
    if config_dir is None:
        return None
    config_dir.mkdir(parents=True, exist_ok=True)
    path = config_dir / f"{name}.json"
    tmp = config_dir / f".{name}.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(model_cfg, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def build_model(cfg: ModelConfig, precision: str, device: torch.device,
                config_dir: Path | None = None) -> ModelBundle:
    """The model, its transforms and tokenizer; with config_dir, also config_dir/NAME.json for open_clip.

    NAME is what checkpoints record: `open_clip.add_model_config(config_dir)` and then
    `open_clip.create_model_and_transforms(NAME, pretrained=checkpoint)` rebuild the model.
    """
    base = name = resolve_model_name(cfg.model)
    model_cfg = open_clip.get_model_config(name)
    init: dict[str, float] = {}
    if cfg.siglip and "init_logit_bias" not in model_cfg:
        # SigLIP's published init (OpenCLIP main.py does the same for --siglip). The model is
        # built under the base name with these as keyword overrides (open_clip looks --pretrained
        # tags up by model name), but checkpoints name a config that holds them, NAME-sigmoid:
        # loading by the base name would build a model without a logit bias and refuse the state
        # dict. Not "-siglip": open_clip.get_tokenizer picks its SentencePiece SigLIP tokenizer then.
        init = {"init_logit_scale": math.log(10), "init_logit_bias": -10}
        model_cfg.update(init)
        name = f"{name}-sigmoid"
    write_model_config(name, model_cfg, config_dir)
    model, train_tf, val_tf = open_clip.create_model_and_transforms(
        base,
        pretrained=cfg.pretrained,
        # AMP keeps fp32 master weights; only pure_bf16 casts the model itself.
        precision="pure_bf16" if precision == "pure_bf16" else "fp32",
        device=device,
        output_dict=True,
        **init,
    )
    return ModelBundle(name, model, train_tf, val_tf, open_clip.get_tokenizer(base))
