"""Data parallel under torchrun: the process group, and the collectives the training step uses.

Every rank boots the model, reads every world_size-th training row of the stream (its own
shard) and steps its own copy of each SAE on its own batch. Gradients are averaged before
clipping, so all ranks take the same Adam step as one process on the union of the batches
(the loss is a per-token mean). Dead-latent counters count a latent as fired if it fired on
any rank, and averaged_buffers (BatchTopK's threshold) are averaged, so every rank holds
identical state. BatchTopK selects the top k*B of each rank's own batch, not of the union:
mean L0 is still k, but which tokens get more or fewer latents is decided per rank.
Rank 0 alone evaluates, logs and checkpoints.

A stop request (main.py's signal handlers: Ctrl-C, SIGTERM, SIGUSR1) is a flag here; the training
loop reads it once per step through `stop_requested`, which under torchrun ORs it over the ranks on
a gloo group (a CPU all-reduce: no device sync), so one rank's signal stops all ranks at one step.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

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


class Stopped(Exception):
    """Training stopped on request after `step` of `total_steps` (0: before the first step,
    nothing trained), every run of the group checkpointed at that step; `run_dir` resumes it."""

    def __init__(self, step: int, total_steps: int, run_dir: Path | str = ""):
        super().__init__(f"stopped at step {step} of {total_steps}")
        self.step, self.total_steps, self.run_dir = step, total_steps, run_dir


_STOP = {"signal": ""}  # the name of the first stop signal received ("" none)
_FLAG_GROUP: list = []  # the gloo group stop_requested reduces over (created on first use)


def request_stop(signal_name: str) -> None:
    _STOP["signal"] = _STOP["signal"] or signal_name


def stop_signal() -> str:
    """The first stop signal this process received ("" none)."""
    return _STOP["signal"]


def clear_stop() -> None:
    _STOP["signal"] = ""


def stop_requested() -> bool:
    """Whether any rank received a stop signal (all ranks get the same answer: call it on all)."""
    if world_size() == 1:
        return bool(_STOP["signal"])
    if not _FLAG_GROUP:
        _FLAG_GROUP.append(dist.new_group(backend="gloo"))
    flag = torch.tensor([1 if _STOP["signal"] else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_FLAG_GROUP[0])
    return bool(flag.item())


def average_gradients(sae: BaseSAE) -> None:
    """One all-reduce for all of an SAE's gradients, then divide by the world size."""
    grads = [p.grad for p in sae.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    for g, averaged in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(averaged)


@torch.no_grad()
def average_tensors(tensors: list[Tensor]) -> None:
    """Each of `tensors` (state every rank holds) replaced, in place, by its mean over the ranks."""
    for tensor in tensors:
        dist.all_reduce(tensor)
        tensor /= world_size()


def all_ranks_any(mask: Tensor) -> Tensor:
    flags = mask.to(torch.int32)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.bool()


def average_scale(scale: float, d: int) -> float:
    """The scale of the union of the ranks' estimate sets: average E||x||^2, not s."""
    # NCCL: no CPU tensors
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    mean_sq = torch.tensor(d / scale**2, dtype=torch.float64, device=device)
    dist.all_reduce(mean_sq)
    return math.sqrt(d / (mean_sq.item() / world_size()))
