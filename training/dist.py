"""Rank, world size, device and process group: settled once, here.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is one process. The
backend follows the device: NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import _thread
import datetime
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    local_world_size: int = 1
    """Processes on this node (torchrun's LOCAL_WORLD_SIZE)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", timeout_min: int = 30) -> DistInfo:
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            from training.errors import TrainError

            raise TrainError("--device cuda: no CUDA device visible; use --device cpu")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if "TORCHELASTIC_RUN_ID" in os.environ:
        follow_launcher()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(minutes=timeout_min),
            **({"device_id": dev} if use_cuda else {}),
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev, local_world_size=local_world)


def follow_launcher(interval: float = 1.0, grace: float = 30.0) -> None:
    """Stop this rank when torchrun, its parent, is gone.

    torchrun starts each rank in a session of its own, so killing torchrun's process group (what
    a job scheduler or a terminal does) leaves the ranks training and writing on their own. A
    watcher thread notices the parent's death and interrupts the main thread (KeyboardInterrupt:
    `finally` blocks run, the output folder's lock is released); if that cannot land in `grace`
    seconds (the main thread waits inside a collective for a rank that is gone), the process exits.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        log.error("rank %s: torchrun (pid %d) is gone; stopping this rank", os.environ.get("RANK", "?"), parent)
        _thread.interrupt_main()
        time.sleep(grace)
        os._exit(1)

    threading.Thread(target=watch, name="clipforge-follow-launcher", daemon=True).start()


def set_cpu_threads(requested: int | None, info: DistInfo) -> int:
    """Size torch's intra-op thread pool on CPU: the usable cores shared by the ranks of this node.

    Loader workers get no cores of their own: they mostly wait, and on CPU they run at nice 19
    (training/data.py:make_loader) so that they do not stall the pool. OpenMP's wait policy is left at
    its default (threads spin briefly between parallel regions), as OpenCLIP leaves it. Measured on
    2 quiet cores (64 px ViT, 6,016 samples, 2 workers, 2026-12-02): fp32 81.3 samples/s spinning,
    65.9 with OMP_WAIT_POLICY=PASSIVE (OpenCLIP 76.1); amp_bf16 107.3 and 112.8 (OpenCLIP 87.7).
    On a machine loaded by other jobs PASSIVE won instead (fp32 35 against 21 at load 4): export
    OMP_WAIT_POLICY=PASSIVE there. An explicit --threads wins; OMP_NUM_THREADS (torchrun sets it
    to 1 for several processes) is respected; GPU runs keep torch's default.
    """
    if requested is None and info.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        requested = max(1, cores // max(1, info.local_world_size))
    if requested is not None:
        torch.set_num_threads(requested)
    return torch.get_num_threads()


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """Every rank's `obj`, on every rank (a list of one without a process group)."""
    if world_size == 1 or not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool | torch.Tensor, device: torch.device, world_size: int) -> bool:
    """True on every rank if `flag` is true on any rank: one all-reduce of one number (on the device,
    as NCCL needs), read back to the host."""
    t = torch.as_tensor(flag, device=device).to(torch.float32).reshape(1)
    if world_size > 1 and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(world_size: int) -> None:
    if world_size > 1 and dist.is_initialized():
        dist.barrier()
