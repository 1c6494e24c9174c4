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


@dataclass
class ModelDefinition:
    """What a model is, before it is built: the name checkpoints record and the config open_clip needs."""

    name: str
    """NAME of OUT/model/NAME.json and of the checkpoints (NAME-sigmoid with --siglip)."""
    base: str
    """The open_clip name the model is built under."""
    config: dict[str, Any]
    init: dict[str, float]
    """Keyword overrides for open_clip.create_model (SigLIP's initial logit scale and bias)."""


def model_definition(cfg: ModelConfig) -> ModelDefinition:
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
    # Through JSON: the types a recorded config reads back as (tuples become lists).
    return ModelDefinition(name, base, json.loads(json.dumps(model_cfg)), init)


def write_model_config(definition: ModelDefinition, config_dir: Path) -> Path:
    """Write config_dir/NAME.json atomically (rank 0, once per run folder)."""
    from pipeline.shards import atomic_write_bytes, get_fs

    path = config_dir / f"{definition.name}.json"
    fs, p = get_fs(str(path))
    atomic_write_bytes(fs, p, (json.dumps(definition.config, indent=2) + "\n").encode())
    return path


def recorded_model_change(definition: ModelDefinition, config_dir: Path) -> str | None:
    """None if config_dir/NAME.json is absent or holds this definition; else one line saying what differs.

    The recorded file is what open_clip rebuilds the run's checkpoints from: a run may never
    rewrite it, so a changed definition (an edited NAME.json, other overrides) is refused."""
    from training.checkpoint import dict_changes

    path = config_dir / f"{definition.name}.json"
    if not path.exists():
        return None
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return f"{path}: unreadable ({exc}); it is what this run's checkpoints are loaded with: restore it"
    if recorded != definition.config:
        return (f"{path}: the model definition differs from the one this run recorded "
                f"({dict_changes(recorded, definition.config)}); restore the model config, or start a new run "
                "with another --output")
    return None


def build_model(cfg: ModelConfig, precision: str, device: torch.device,
                definition: ModelDefinition | None = None) -> ModelBundle:
    """The model, its transforms and tokenizer. Writes nothing (the trainer records the config).

    NAME (definition.name) is what checkpoints record: `open_clip.add_model_config(OUT/model)`
    and then `open_clip.create_model_and_transforms(NAME, pretrained=checkpoint)` rebuild the model.
    """
    d = definition or model_definition(cfg)
    model, train_tf, val_tf = open_clip.create_model_and_transforms(
        d.base,
        pretrained=cfg.pretrained,
        # AMP keeps fp32 master weights; only pure_bf16 casts the model itself.
        precision="pure_bf16" if precision == "pure_bf16" else "fp32",
        device=device,
        output_dict=True,
        **d.init,
    )
    return ModelBundle(d.name, model, train_tf, val_tf, open_clip.get_tokenizer(d.base))
