"""Two ranks with batch B each give the loss and gradients of one process with batch 2B."""

from __future__ import annotations

import sys

import pytest
import torch
from train_helpers import REPO, TINY, torchrun

from training.config import ModelConfig
from training.loss import build_loss, compute_loss
from training.model import build_model
from training.optim import build_optimizer, cosine_lr

B = 6

# Runs under torchrun: each rank takes its half of the same 2B samples, DDP averages gradients.
SCRIPT = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from torch.nn.parallel import DistributedDataParallel
from training.config import ModelConfig
from training.loss import build_loss, compute_loss
from training.model import build_model
from tests_inputs import make_inputs
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
out = {}
for siglip in (False, True):
    torch.manual_seed(0)
    model = build_model(ModelConfig(model=sys.argv[3], siglip=siglip), "fp32", torch.device("cpu")).model
    images, texts = make_inputs(2 * {B})
    mine = slice(rank * {B}, (rank + 1) * {B})
    ddp = DistributedDataParallel(model)
    loss = compute_loss(build_loss(siglip, rank, world), ddp(images[mine], texts[mine]))
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    out[siglip] = (float(total) / world, {n: p.grad.clone() for n, p in model.named_parameters()})
if rank == 0:
    torch.save(out, sys.argv[1])
dist.destroy_process_group()
""".replace("{B}", str(B))

INPUTS = """
import torch, open_clip
def make_inputs(n):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 32, 32, generator=g)
    words = ["red circle", "blue square", "green cross", "purple triangle", "orange circle", "yellow square"]
    texts = open_clip.get_tokenizer("ViT-B-32")([f"a photo of a {words[i % 6]} number {i}" for i in range(n)])
    return images, texts[:, :32]
"""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_ranks_equal_one_process_with_double_batch(tmp_path):
    (tmp_path / "tests_inputs.py").write_text(INPUTS)
    (tmp_path / "dist_loss.py").write_text(SCRIPT)
    result = tmp_path / "dist.pt"
    r = torchrun(2, tmp_path / "dist_loss.py", str(result), str(REPO), TINY, cwd=tmp_path, timeout=200)
    assert r.returncode == 0, r.stderr[-3000:]
    dist_out = torch.load(result, weights_only=True)

    sys.path.insert(0, str(tmp_path))
    try:
        from tests_inputs import make_inputs
    finally:
        sys.path.remove(str(tmp_path))
    for siglip in (False, True):
        torch.manual_seed(0)
        model = build_model(ModelConfig(model=TINY, siglip=siglip), "fp32", torch.device("cpu")).model
        images, texts = make_inputs(2 * B)
        loss = compute_loss(build_loss(siglip, 0, 1), model(images, texts))
        loss.backward()
        d_loss, d_grads = dist_out[siglip]
        assert d_loss == pytest.approx(float(loss.detach()), rel=1e-5)
        for name, p in model.named_parameters():
            # fp32 sums in a different order differ by ~1e-6 of the tensor's scale: compare against that
            # scale, not element by element (a wrong gather or label offset is off by O(1)).
            g, d = p.grad, d_grads[name]
            scale = float(g.abs().max()) + 1e-12
            assert torch.allclose(d, g, rtol=1e-4, atol=1e-5 * scale), (name, float((d - g).abs().max()), scale)
            assert float((d - g).norm()) <= 1e-5 * float(g.norm()) + 1e-12, name
        assert any(p.grad.abs().sum() > 0 for p in model.parameters())


def test_weight_decay_skips_gains_biases_and_logit_scale():
    from training.config import OptimConfig

    model = build_model(ModelConfig(model=TINY), "fp32", torch.device("cpu")).model
    opt = build_optimizer(model, OptimConfig(wd=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in opt.param_groups[0]["params"]}
    decay = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0 and opt.param_groups[1]["weight_decay"] == 0.1
    assert "logit_scale" in no_decay and "visual.conv1.weight" in decay
    assert all(n.endswith("bias") or "ln" in n or model.get_parameter(n).ndim < 2 or "logit" in n for n in no_decay)
    assert len(no_decay) + len(decay) == len(names)


def test_cosine_schedule():
    lrs = [cosine_lr(s, 1.0, 10, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False)) and lrs[-1] < 1e-3


def test_fused_adamw_matches_torch_default():
    from training.config import OptimConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(model=TINY), "fp32", torch.device("cpu")).model
    twin = build_model(ModelConfig(model=TINY), "fp32", torch.device("cpu")).model
    twin.load_state_dict(model.state_dict())
    ours = build_optimizer(model, OptimConfig(wd=0.1))
    assert ours.defaults["fused"]  # one kernel per tensor, not a Python loop of elementwise ops
    names = {id(p): n for n, p in model.named_parameters()}
    ref = torch.optim.AdamW([{"params": [twin.get_parameter(names[id(p)]) for p in g["params"]],
                              "weight_decay": g["weight_decay"]} for g in ours.param_groups],
                            lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):  # the same gradients into both: only the update rule is compared
        for n, p in model.named_parameters():
            p.grad = torch.randn(p.shape, generator=gen)
            twin.get_parameter(n).grad = p.grad.clone()
        ours.step()
        ref.step()
    assert all(not torch.equal(p, start[n]) for n, p in model.named_parameters())
    for n, p in model.named_parameters():
        assert torch.allclose(p, twin.get_parameter(n), rtol=1e-5, atol=1e-7), n


@pytest.mark.parametrize("siglip", [False, True])
def test_accumulation_equals_one_big_batch(tmp_path, siglip):
    # Every pass of the accumulation loop computes the whole batch's loss: the temperature (and
    # SigLIP's bias) must get its gradient from one pass only, or it is accum_freq times too large.
    from contextlib import nullcontext

    from training.trainer import forward_backward

    (tmp_path / "tests_inputs.py").write_text(INPUTS)
    sys.path.insert(0, str(tmp_path))
    try:
        from tests_inputs import make_inputs
    finally:
        sys.path.remove(str(tmp_path))
    torch.manual_seed(0)
    model = build_model(ModelConfig(model=TINY, siglip=siglip), "fp32", torch.device("cpu")).model
    images, texts = make_inputs(8)
    loss_fn = build_loss(siglip, 0, 1)
    big = forward_backward(model, loss_fn, [(images, texts)], nullcontext, torch.Tensor.backward)
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    halves = [(images[:4], texts[:4]), (images[4:], texts[4:])]
    acc = forward_backward(model, loss_fn, halves, nullcontext, torch.Tensor.backward)
    assert float(acc.detach()) == pytest.approx(float(big.detach()), rel=1e-5)
    assert {"logit_scale", *(["logit_bias"] if siglip else [])} <= set(want)
    for name, p in model.named_parameters():
        scale = float(want[name].abs().max()) + 1e-12
        assert torch.allclose(p.grad, want[name], rtol=1e-4, atol=1e-5 * scale), (
            name, float(p.grad.norm() / want[name].norm()))
