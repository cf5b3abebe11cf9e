"""Data parallel under torchrun: the process group, and the collectives the training step uses.

Every rank boots the model, reads every world_size-th training row of the stream (its own
shard) and steps its own copy of each SAE on its own batch. Gradients are averaged before
clipping, so all ranks take the same Adam step as one process on the union of the batches
(the loss is a per-token mean). Dead-latent counters count a latent as fired if it fired on
any rank, and averaged_buffers (BatchTopK's threshold) are averaged, so every rank holds
identical state. BatchTopK selects the top k*B of each rank's own batch, not of the union:
mean L0 is still k, but which tokens get more or fewer latents is decided per rank.
Rank 0 alone evaluates, logs and checkpoints.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from torch import Tensor

from config import resolve_device
from sae import BaseSAE


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def init_distributed(device: str) -> str:
    """Under torchrun (WORLD_SIZE > 1): join the process group, NCCL on GPUs and gloo on
    CPU, and return this rank's device (cuda:LOCAL_RANK for a CUDA `device`)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    device = resolve_device(device)
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def average_gradients(sae: BaseSAE) -> None:
    """One all-reduce for all of an SAE's gradients, then divide by the world size."""
    grads = [p.grad for p in sae.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    for g, averaged in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(averaged)


@torch.no_grad()
def average_buffers(module: torch.nn.Module, names: tuple[str, ...]) -> None:
    for name in names:
        buffer = getattr(module, name)
        dist.all_reduce(buffer)
        buffer /= world_size()


def all_ranks_any(mask: Tensor) -> Tensor:
    flags = mask.to(torch.int32)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.bool()


def average_scale(scale: float, d: int) -> float:
    """The scale of the union of the ranks' estimate sets: average E||x||^2, not s."""
    mean_sq = torch.tensor(d / scale**2, dtype=torch.float64)
    dist.all_reduce(mean_sq)
    return math.sqrt(d / (mean_sq.item() / world_size()))
