"""What the trainer sets each step beside the weights: the lr factor and the sparsity coefficient
(docs/math.md §8). The coefficient warms up linearly from 0; with `target_l0` a running factor,
kept on the device, steers the batch L0 to the target. A variant states how: its `coeff_key`, and
the controller's `coeff_rate`, `coeff_rise_clip` and `coeff_damping` (sae.py)."""

from __future__ import annotations

import torch
from torch import Tensor

from clt import CrossLayerTranscoder
from kernels import SparseLatents, mean_l0
from sae import COEFFICIENT_STATE, BaseSAE


def lr_factor(step: int, total_steps: int, warmup_frac: float, decay_frac: float) -> float:
    """Linear warmup from 0, constant, then linear decay to 0 over the final fraction."""
    warmup = warmup_frac * total_steps
    decay_start = (1 - decay_frac) * total_steps
    factor = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if step >= decay_start and decay_frac > 0:
        factor = min(factor, (total_steps - step) / (total_steps - decay_start))
    return factor


class SparsityCoefficient:
    """One SAE's sparsity coefficient. Its state (`coeff_scale`, the running factor, and
    `l0_error`, the latest clipped log(L0 / target), for a variant with damping) exists only under
    target_l0; checkpoints keep it beside the SAE's tensors, under those names."""

    def __init__(self, sae: BaseSAE | CrossLayerTranscoder):
        cls, cfg = getattr(sae, "variant", type(sae)), sae.cfg  # a CLT: its layers' variant
        self.base = cfg[cls.coeff_key] if cls.coeff_key else 0.0
        self.warmup_frac, self.target = cfg["sparsity_warmup_frac"], cfg.get("target_l0", 0.0)
        self.rate = cfg["target_l0_rate"] or cls.coeff_rate
        self.rise_clip, self.damping = cls.coeff_rise_clip, cls.coeff_damping
        device = next(sae.parameters()).device
        self.state: dict[str, Tensor] = {}
        if self.target > 0:
            self.state["coeff_scale"] = torch.ones((), device=device)
            if self.damping:
                self.state["l0_error"] = torch.zeros((), device=device)
        assert set(self.state) <= set(COEFFICIENT_STATE)

    def at(self, step: int, total_steps: int) -> float | Tensor:
        """cfg[coeff_key] warmed up linearly from 0, times the running factor, plus damping times
        the latest L0 error (it may go negative for a while: a penalty becomes a reward to fire)."""
        warmup = self.warmup_frac * total_steps
        coeff = self.base * (min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)
        if "coeff_scale" not in self.state:
            return coeff
        if "l0_error" in self.state:
            return coeff * (self.state["coeff_scale"] + self.damping * self.state["l0_error"])
        return coeff * self.state["coeff_scale"]

    @torch.no_grad()
    def adapt(self, f: Tensor | SparseLatents, step: int, total_steps: int) -> None:
        """After the warm-up, scale the factor by (batch L0 / target)^rate, the log ratio clipped to
        [-1, rise_clip]; keep the ratio clipped to [-1, 1] as the latest error. No host sync."""
        if "coeff_scale" not in self.state or step + 1 < self.warmup_frac * total_steps:
            return
        ratio = (mean_l0(f).clamp_min(1e-3) / self.target).log().clamp(-1.0, 1.0)
        step_factor = torch.exp(self.rate * ratio.clamp(max=self.rise_clip))
        self.state["coeff_scale"].mul_(step_factor).clamp_(1e-6, 1e6)
        if "l0_error" in self.state:
            self.state["l0_error"].copy_(ratio)

    def load(self, saved: dict[str, Tensor]) -> None:
        """From a checkpoint's tensors; one older than the damping term starts it at no error."""
        for name, value in self.state.items():
            value.copy_(saved[name] if name in saved else torch.zeros(()))
