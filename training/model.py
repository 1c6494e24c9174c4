"""open_clip models, transforms and tokenizer, by name or from a JSON config file."""

from __future__ import annotations

import json
import math
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


def build_model(cfg: ModelConfig, precision: str, device: torch.device) -> ModelBundle:
    name = resolve_model_name(cfg.model)
    kwargs: dict[str, Any] = {}
    if cfg.siglip:
        # SigLIP's published init (OpenCLIP main.py does the same for --siglip).
        kwargs.update(init_logit_scale=math.log(10), init_logit_bias=-10)
    model, train_tf, val_tf = open_clip.create_model_and_transforms(
        name,
        pretrained=cfg.pretrained,
        # AMP keeps fp32 master weights; only pure_bf16 casts the model itself.
        precision="pure_bf16" if precision == "pure_bf16" else "fp32",
        device=device,
        output_dict=True,
        **kwargs,
    )
    return ModelBundle(name, model, train_tf, val_tf, open_clip.get_tokenizer(name))
