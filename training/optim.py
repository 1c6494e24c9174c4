"""AdamW with OpenCLIP's parameter groups and a cosine schedule with linear warmup."""

from __future__ import annotations

import math

import torch

from training.config import OptimConfig


def _no_decay(name: str, p: torch.nn.Parameter) -> bool:
    # Gains (norm weights), biases and the temperature: decaying them only hurts (OpenCLIP main.py).
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if _no_decay(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not _no_decay(n, p)], "weight_decay": cfg.wd},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def cosine_lr(step: int, base_lr: float, warmup: int, total: int) -> float:
    """LR for optimizer step `step` (0-based): linear warmup, then cosine to 0 at `total`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * base_lr * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
