"""Contrastive losses: open_clip's own, configured for multi-rank training.

ClipLoss with local_loss + gather_with_grad: features are all-gathered with
gradients, each rank computes only the logit rows of its own samples against all
gathered features (labels offset by B * rank). DDP's gradient average then equals
the gradient of the global-batch loss (tests/test_train_loss.py proves it).
"""

from __future__ import annotations

import torch
from open_clip.loss import ClipLoss, SigLipLoss


def build_loss(siglip: bool, rank: int, world_size: int) -> torch.nn.Module:
    if siglip:
        return SigLipLoss(rank=rank, world_size=world_size)
    return ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world_size)


def compute_loss(loss_fn: torch.nn.Module, out: dict[str, torch.Tensor]) -> torch.Tensor:
    """Loss from the model's output dict (logit_bias only for SigLIP-style models)."""
    args = [out["image_features"], out["text_features"], out["logit_scale"]]
    if out.get("logit_bias") is not None:
        args.append(out["logit_bias"])
    return loss_fn(*args)
