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
    # The fused kernel updates each tensor in one pass. torch's default on CPU is a Python loop of ~10
    # elementwise ops per tensor: for a small CLIP on CPU it took a quarter of every step (20 ms of 66
    # single-threaded, against 1.7 ms fused). Same update rule; results agree to float rounding.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for _, p in named)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)


def cosine_lr(step: int, base_lr: float, warmup: int, total: int) -> float:
    """LR for optimizer step `step` (0-based): linear warmup, then cosine to 0 at `total`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * base_lr * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
