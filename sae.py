"""The variants (docs/math.md §3) and how an SAE is built, saved and loaded.

A variant is one class that states what is its own (its activation, penalty, coefficient, config
keys, run-name tag, SAELens form) and registers with `@register`; everything else (config
validation, sweeps, bench, export, tests) reads `SAE_CLASSES`. What every SAE shares is in
base_sae.py.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

# re-exported: sae is where callers find them
from base_sae import SAE_CLASSES, BaseSAE, LossTerms, SAEOutput, register  # noqa: F401
from clt import CrossLayerTranscoder
from kernels import (
    SelectedPre,
    SparseCode,
    SparseLatents,
    SparsePattern,
    nested_sparse_reconstruction,
    smallest_positive,
    sparse_reconstruction,
)
from keys import ConfigError, Key
from selection import batch_top_entries, entries_above_biased, kth_largest, row_top_entries

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
COEFFICIENT_STATE = ("coeff_scale", "l0_error")  # schedule.py's tensors a weights file may hold


# --- the variants -------------------------------------------------------------------------------

TOP_K = Key(32, "latents kept per token (TopK), or per token on average over the batch "
            "(BatchTopK)", "> 0")


@register
class VanillaSAE(BaseSAE):
    """ReLU + L1 penalty weighted by decoder-row norms; codes are sparse only once the L1 term has
    acted: the sparse path falls back to dense above `max_sparse_density` (docs/kernels.md)."""

    name, title = "vanilla", "Vanilla (ReLU + L1)"
    keys = {"l1_coeff": Key(1.5, "L1 coefficient (scaled space)", ">= 0")}
    coeff_key = "l1_coeff"
    # its L0 falls from dense by itself at first: a running factor free to rise all the while winds
    # up, overshoots the target and unwinds too slowly to get back (docs/math.md §8)
    coeff_rate, coeff_rise_clip = 0.05, 0.1
    saelens_architecture = "standard"
    max_sparse_density = 0.08
    cross_layer_ok = False  # its L1 weights one decoder row's norm

    def activation(self, pre: Tensor) -> Tensor:
        return F.relu(pre)

    def sparsity_penalty(self, pre: Tensor, f: Tensor) -> Tensor:
        return (f * self.W_dec.norm(dim=-1)).sum(-1).mean()

    def select(self, xw: Tensor) -> tuple[SelectedPre | None, None]:
        max_count = int(self.max_sparse_density * xw.numel())
        return entries_above_biased(xw, self.b_enc, xw.new_zeros(()), max_count), None

    def sparse_activation(self, pre_vals: Tensor, pattern: SparsePattern) -> tuple[Tensor, Tensor]:
        f_vals = F.relu(pre_vals)
        norms = self.W_dec.norm(dim=-1).index_select(0, pattern.cols)
        return f_vals, (f_vals * norms).sum() / pattern.shape[0]

    @torch.no_grad()
    def start_at_density(self, bound: Tensor) -> None:
        self.b_enc.sub_(bound)


@register
class TopKSAE(BaseSAE):
    """Keep each token's k largest positive pre-activations."""

    name, title = "topk", "TopK"
    keys = {"top_k": TOP_K}
    uses_aux_loss = True
    saelens_architecture = "topk"

    def activation(self, pre: Tensor) -> Tensor:
        vals, idx = pre.topk(self.cfg["top_k"], dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, F.relu(vals))

    def select(self, xw: Tensor) -> tuple[SelectedPre, None]:
        pre = xw.add_(self.b_enc)  # a per-row selection cannot fold b_enc into a bound
        vals, idx = row_top_entries(pre, self.cfg["top_k"])
        return SelectedPre(SparsePattern.from_topk(idx, pre.shape[-1]), vals.flatten()), None

    @classmethod
    def run_tag(cls, cfg: dict[str, Any]) -> str:
        return f"k{cfg['top_k']}"

    @classmethod
    def check_cfg(cls, cfg: dict[str, Any]) -> dict[str, str]:
        return ({"top_k": f"must be <= dict_size ({cfg['dict_size']})"}
                if cfg["top_k"] > cfg["dict_size"] else {})

    @classmethod
    def from_saelens(cls, tensors: dict[str, Tensor],
                     fields: dict[str, Any]) -> dict[str, Any] | None:
        return {"cfg": {"top_k": fields["k"]}, "state": {}}


@register
class BatchTopKSAE(BaseSAE):
    """Training: keep the k*B largest positive pre-activations of the batch.
    Inference: one learnt global threshold, f = pre * 1[pre > theta] (a JumpReLU for SAELens)."""

    name, title = "batchtopk", "BatchTopK"
    keys = {"top_k": TOP_K,
            "threshold_ema_decay": Key(0.8, "inference threshold: EMA decay per step", "[0, 1)")}
    uses_aux_loss = True
    saelens_architecture, saelens_tensors = "jumprelu", ("threshold",)
    averaged_buffers = ("threshold",)  # the EMA is linear: averaging it averages the batch minima
    run_tag, check_cfg = TopKSAE.run_tag, TopKSAE.check_cfg  # k, as TopK's

    def __init__(self, cfg: dict[str, Any]):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32))
        self.register_buffer("threshold_initialised", torch.zeros((), dtype=torch.bool))

    def activation(self, pre: Tensor) -> Tensor:
        if not self.training:
            return pre * (pre > self.threshold)
        relu = F.relu(pre)
        kth = kth_largest(relu.flatten(), self.cfg["top_k"] * pre.shape[0])
        return relu * ((relu >= kth) & (relu > 0))

    def select(self, xw: Tensor) -> tuple[SelectedPre, None]:
        return batch_top_entries(xw, self.b_enc, self.cfg["top_k"] * xw.shape[0]), None

    @torch.no_grad()
    def update_inference_state(self, f: Tensor | SparseLatents) -> None:
        """EMA over steps of the smallest value the batch top-k kept."""
        smallest = smallest_positive(f)
        smallest = torch.where(torch.isfinite(smallest), smallest, self.threshold).float()
        decay = self.cfg["threshold_ema_decay"]
        blended = decay * self.threshold + (1 - decay) * smallest
        self.threshold.copy_(torch.where(self.threshold_initialised, blended, smallest))
        self.threshold_initialised.fill_(True)

    @classmethod
    def from_saelens(cls, tensors: dict[str, Tensor],
                     fields: dict[str, Any]) -> dict[str, Any] | None:
        theta = tensors["threshold"]
        if fields.get("sae_type") != cls.name or not bool((theta == theta[0]).all()):
            return None  # a JumpReLU folder, unless it is our BatchTopK export
        return {"cfg": {}, "state": {"threshold": theta[0].clone(),
                                     "threshold_initialised": torch.tensor(True)}}


class _JumpReLU(torch.autograd.Function):
    """f = pre * H(pre - theta); d/dtheta = -(theta/eps) K((pre - theta)/eps), K = rect (§3)."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        in_window = ((pre - theta).abs() < eps / 2).to(grad.dtype)
        grad_pre = grad * (pre > theta)
        grad_theta = (grad * -(theta / eps) * in_window).reshape(-1, theta.shape[-1]).sum(0)
        return grad_pre, grad_theta, None


class _Step(torch.autograd.Function):
    """H(pre - theta); gradient only for theta: -(1/eps) K((pre - theta)/eps)."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        in_window = ((pre - theta).abs() < eps / 2).to(grad.dtype)
        return None, (grad * -(1.0 / eps) * in_window).reshape(-1, theta.shape[-1]).sum(0), None


@register
class JumpReLUSAE(BaseSAE):
    """Per-latent threshold theta = exp(log_threshold), float32, L0 penalty whose step function
    is evaluated on the pre-activations (docs/math.md §3)."""

    name, title = "jumprelu", "JumpReLU"
    keys = {"l0_coeff": Key(0.4, "L0 coefficient (scaled space)", ">= 0"),
            "bandwidth": Key(0.5, "straight-through kernel width epsilon", "> 0"),
            "jumprelu_init_threshold": Key(1.0, "initial per-latent threshold", "> 0"),
            "jumprelu_penalty": Key("l0", "sparsity penalty: l0, sum_i H(pre_i - theta_i); or "
                                    "tanh, sum_i tanh(tanh_scale * f_i) (Anthropic's CLTs)",
                                    ("l0", "tanh")),
            "tanh_scale": Key(4.0, "c of the tanh penalty", "> 0"),
            "preact_coeff": Key(0.0, "pre-activation loss on dead latents, sum_i dead "
                                "relu(theta_i - pre_i) (Anthropic's; 0: off)", ">= 0")}
    coeff_key = "l0_coeff"
    # its thresholds move at Adam's rate whatever the coefficient, so L0 lags it: the integral alone
    # overshoots and, kept positive, cannot raise L0 faster than the thresholds drift
    coeff_damping = 2.0
    saelens_architecture, saelens_tensors = "jumprelu", ("threshold",)
    latent_params = (*BaseSAE.latent_params, ("log_threshold", 0))

    def __init__(self, cfg: dict[str, Any]):
        super().__init__(cfg)
        init = torch.full((cfg["dict_size"],), float(cfg["jumprelu_init_threshold"]))
        self.log_threshold = nn.Parameter(init.log())
        self.uses_aux_loss = cfg["preact_coeff"] > 0  # its loss on dead latents, when asked for

    @classmethod
    def run_tag(cls, cfg: dict[str, Any]) -> str:
        tanh = "_tanh" if cfg["jumprelu_penalty"] == "tanh" else ""
        return super().run_tag(cfg).replace("l0_", f"l0{tanh}_", 1)

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.float().exp()

    def activation(self, pre: Tensor) -> Tensor:
        return _JumpReLU.apply(pre, self.threshold.to(pre.dtype), self.cfg["bandwidth"])

    def sparsity_penalty(self, pre: Tensor, f: Tensor) -> Tensor:
        if self.cfg["jumprelu_penalty"] == "tanh":  # its gradient reaches theta through f's
            return torch.tanh(self.cfg["tanh_scale"] * f).sum(-1).mean()
        return _Step.apply(pre, self.threshold.to(pre.dtype), self.cfg["bandwidth"]).sum(-1).mean()

    def aux_loss(self, residual: Tensor, pre: Tensor) -> Tensor:
        """The pre-activation loss: each dead latent pulled toward firing by how far its
        pre-activation is below its threshold (weighted by its decoder norm, 1 here)."""
        gap = F.relu(self.threshold.to(pre.dtype) - pre) * self.dead_mask()
        return self.cfg["preact_coeff"] * gap.sum(-1).mean()

    def select(self, xw: Tensor) -> tuple[SelectedPre | None, SelectedPre | None]:
        """Active entries (pre > theta), and the lower half of the threshold's gradient window
        (theta - eps/2 < pre <= theta), from one pass over `xw`; the pre-activation loss reads
        every dead latent's pre-activation, so with it the step is dense."""
        if self.uses_aux_loss:
            return None, None
        theta = self.threshold.to(xw.dtype)
        band = entries_above_biased(xw, self.b_enc, theta - self.cfg["bandwidth"] / 2)
        return band.split(band.pre > theta.index_select(0, band.pattern.cols))

    def sparse_activation(self, pre_vals: Tensor, pattern: SparsePattern) -> tuple[Tensor, Tensor]:
        # index_select, whose backward is an index_add: `theta[cols]`'s sorts the indices on CPU
        f_vals = _JumpReLU.apply(pre_vals, self.threshold.index_select(0, pattern.cols),
                                 self.cfg["bandwidth"])
        if self.cfg["jumprelu_penalty"] == "tanh":
            return f_vals, torch.tanh(self.cfg["tanh_scale"] * f_vals).sum() / pattern.shape[0]
        theta = self.threshold.index_select(0, pattern.cols)
        return f_vals, _Step.apply(pre_vals, theta, self.cfg["bandwidth"]).sum() / pattern.shape[0]

    @torch.no_grad()
    def start_at_density(self, bound: Tensor) -> None:
        self.log_threshold.copy_(bound.clamp_min(1e-3).log())

    @classmethod
    def from_saelens(cls, tensors: dict[str, Tensor],
                     fields: dict[str, Any]) -> dict[str, Any] | None:
        theta = tensors["threshold"]
        if not bool((theta > 0).all()):
            bad = int((theta <= 0).nonzero()[0])
            raise ConfigError(f"jumprelu threshold of latent {bad} is {theta[bad].item():g}; "
                              "JumpReLUSAE learns log(threshold), so every threshold must be > 0")
        return {"cfg": {}, "state": {"log_threshold": theta.log()}}


@register
class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK whose latents form nested groups: every prefix of the dictionary (the decoder bias
    plus the selected latents before the prefix's end) must reconstruct the input on its own, so
    general features settle in the early latents. Loss: the prefixes' reconstruction errors
    averaged, plus AuxK (docs/math.md §3). Inference as BatchTopK: one learnt threshold."""

    name, title = "matryoshka", "Matryoshka BatchTopK"
    keys = BatchTopKSAE.keys | {
        "matryoshka_groups": Key("", "group sizes, comma-separated, adding up to dict_size (\"\": "
                                 "prefixes at 1/16, 1/8, 1/4, 1/2 and all of it)")}
    select = BatchTopKSAE.select  # stated here: the sparse path computes this class's loss

    @staticmethod
    def group_ends(cfg: dict[str, Any]) -> list[int]:
        """Where each nested prefix of the dictionary ends, the last at dict_size."""
        m, text = cfg["dict_size"], cfg["matryoshka_groups"]
        sizes = [int(size) for size in text.split(",")] if text.strip() else []
        return list(itertools.accumulate(sizes)) if sizes else [m // 16, m // 8, m // 4, m // 2, m]

    @classmethod
    def check_cfg(cls, cfg: dict[str, Any]) -> dict[str, str]:
        text = cfg["matryoshka_groups"]
        if text.strip() and not all(re.fullmatch(r"[0-9]+", size.strip())
                                    for size in text.split(",")):
            return {"matryoshka_groups": "comma-separated whole numbers of latents, e.g. "
                                         "192,192,384,768,1536"}
        ends = cls.group_ends(cfg)
        if (ends[-1] != cfg["dict_size"]
                or min(b - a for a, b in zip([0, *ends], ends, strict=False)) <= 0):
            return {"matryoshka_groups": "non-empty groups adding up to dict_size "
                                         f"({cfg['dict_size']})"}
        return super().check_cfg(cfg)

    def loss(self, goal: Tensor, pre: Tensor, f: Tensor, error: Tensor,
             aux_enabled: bool) -> LossTerms:
        ends = self.group_ends(self.cfg)
        prefix = [(f[:, :end] @ self.W_dec[:end] + self.b_dec - goal).pow(2).sum(-1).mean()
                  for end in ends[:-1]]
        terms = super().loss(goal, pre, f, error, aux_enabled)  # full dictionary: error and AuxK
        return self._averaged(terms, [*prefix, terms.recon], ends)

    def sparse_reconstruction(self, f_vals: Tensor, goal: Tensor, pattern: SparsePattern,
                              zero_vals: Tensor | None, zero_pattern: SparsePattern | None
                              ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        ends = self.group_ends(self.cfg)
        recon, error, prefix = nested_sparse_reconstruction(f_vals, self.W_dec, self.b_dec, goal,
                                                            pattern, ends)
        return recon, error, {f"recon_loss_prefix_{end}": r
                              for end, r in zip(ends, prefix, strict=True)}

    @staticmethod
    def _averaged(terms: LossTerms, recons: list[Tensor], ends: list[int]) -> LossTerms:
        details = {f"recon_loss_prefix_{end}": r.detach()
                   for end, r in zip(ends, recons, strict=True)}
        return terms._replace(recon=torch.stack(recons).mean(), details=details)


@register
class GatedSAE(BaseSAE):
    """Gated SAE (Rajamanoharan et al. 2024): the gate's pre-activation pi = x_in W_enc + b_enc
    decides which latents fire, a magnitude path with tied weights W_mag = W_enc * exp(r_mag) and
    its own bias b_mag decides how much: f = 1[pi > 0] relu(x_in W_mag + b_mag). Loss:
    reconstruction, the L1 of relu(pi) weighted by decoder norms, and the reconstruction from
    relu(pi) through the frozen decoder, the gate's only signal of what it must explain
    (docs/math.md §3)."""

    name, title = "gated", "Gated"
    keys = {"gated_l1_coeff": Key(2.0, "L1 coefficient on the gate's relu(pi) (scaled space)",
                                  ">= 0")}
    coeff_key = "gated_l1_coeff"
    saelens_architecture, saelens_tensors = "gated", ("r_mag", "b_mag")
    saelens_names = {"b_enc": "b_gate"}  # SAELens calls the gate's bias b_gate
    latent_params = (*BaseSAE.latent_params, ("r_mag", 0), ("b_mag", 0))
    max_sparse_density = VanillaSAE.max_sparse_density  # its gate is a ReLU's support
    # its L0 falls from dense by itself too: Vanilla's slow, clipped rise kills fewer latents
    coeff_rate, coeff_rise_clip = VanillaSAE.coeff_rate, VanillaSAE.coeff_rise_clip

    def __init__(self, cfg: dict[str, Any]):
        super().__init__(cfg)
        self.r_mag = nn.Parameter(torch.zeros(cfg["dict_size"]))
        self.b_mag = nn.Parameter(torch.zeros(cfg["dict_size"]))

    def magnitude(self, pre: Tensor) -> Tensor:
        """relu(x_in W_mag + b_mag) from the gate's pi: x_in W_mag = (x_in W_enc) * exp(r_mag) =
        (pi - b_enc) * exp(r_mag), no second matmul, and the gate's bias b_enc gets no gradient
        from the magnitudes."""
        return F.relu((pre - self.b_enc) * self.r_mag.exp() + self.b_mag)

    def activation(self, pre: Tensor) -> Tensor:
        return (pre > 0) * self.magnitude(pre)

    def sparsity_penalty(self, pre: Tensor, f: Tensor) -> Tensor:
        return (F.relu(pre) * self.W_dec.norm(dim=-1)).sum(-1).mean()

    def loss(self, goal: Tensor, pre: Tensor, f: Tensor, error: Tensor,
             aux_enabled: bool) -> LossTerms:
        terms = super().loss(goal, pre, f, error, aux_enabled)  # reconstruction and the L1
        if not self.training:
            return terms
        # the decoder frozen, a skip transcoder's W_skip (in its goal) too
        via_gate = F.relu(pre) @ self.W_dec.detach() + self.b_dec.detach() - goal.detach()
        return terms._replace(aux=via_gate.pow(2).sum(-1).mean())

    # the sparse path: the gate's entries pi > 0 are the only ones f and relu(pi) can be non-zero on

    def select(self, xw: Tensor) -> tuple[SelectedPre | None, None]:
        max_count = int(self.max_sparse_density * xw.numel())
        return entries_above_biased(xw, self.b_enc, xw.new_zeros(()), max_count), None

    def sparse_activation(self, pre_vals: Tensor, pattern: SparsePattern) -> tuple[Tensor, Tensor]:
        cols = pattern.cols
        mag = F.relu((pre_vals - self.b_enc.index_select(0, cols)) * self.r_mag.exp()
                     .index_select(0, cols) + self.b_mag.index_select(0, cols))
        norms = self.W_dec.norm(dim=-1).index_select(0, cols)
        # the selection may hold entries within rounding at or below 0: their gate is shut
        return (pre_vals > 0) * mag, (F.relu(pre_vals) * norms).sum() / pattern.shape[0]

    def sparse_aux(self, code: SparseCode, error: Tensor, x: Tensor, aux_enabled: bool) -> Tensor:
        """The frozen-decoder reconstruction from relu(pi), on the gate's entries."""
        return sparse_reconstruction(F.relu(code.pre_vals), self.W_dec.detach(),
                                     self.b_dec.detach(), code.goal.detach(), code.pattern)[0]

    @torch.no_grad()
    def start_at_density(self, bound: Tensor) -> None:
        self.b_enc.sub_(bound)  # the gate only: the magnitudes do not read b_enc

    @classmethod
    def from_saelens(cls, tensors: dict[str, Tensor],
                     fields: dict[str, Any]) -> dict[str, Any] | None:
        return {"cfg": {}, "state": {"r_mag": tensors["r_mag"], "b_mag": tensors["b_mag"]}}


HC_GAMMA, HC_ZETA = -0.1, 1.1  # the Hard Concrete stretch (gamma, zeta), as in the paper
HC_CUT = math.log(-HC_GAMMA / HC_ZETA)  # log alpha below which the inference gate is 0: -2.40


def beta_at(cfg: dict[str, Any], step: int) -> float:
    """The Hard Concrete temperature at `step`: from hc_beta to hc_beta_final over the first
    hc_beta_frac of the run's steps by hc_beta_schedule, then constant."""
    b0, b1 = cfg["hc_beta"], cfg["hc_beta_final"]
    span = cfg["hc_beta_frac"] * (cfg["num_tokens"] // cfg["batch_size"])
    p = min(1.0, step / span) if span > 0 else 1.0
    match cfg["hc_beta_schedule"]:
        case "constant":
            return b0
        case "linear":
            return b0 + (b1 - b0) * p
        case "exponential":
            return b0 * (b1 / b0) ** p
        case "cosine":
            return b1 + (b0 - b1) * (1 + math.cos(math.pi * p)) / 2
    raise AssertionError(cfg["hc_beta_schedule"])


@register
class HardConcreteSAE(BaseSAE):
    """Hard Concrete L0 (Louizos, Welling & Kingma 2017) with its own gate: log alpha = x_in W_gate
    + b_gate, the magnitude relu(x_in W_enc + b_enc) untied from it (better than Gated's tied
    paths, whose penalty also shrinks the magnitudes: docs/benchmarks.md). Training: per token and
    latent u ~ U(0, 1), z = clamp(sigmoid((log u - log(1 - u) + log alpha) / beta) (zeta - gamma)
    + gamma, 0, 1), exact zeros and ones with a gradient in between, f = z relu(pi_mag); penalty
    the expected L0, sum_i sigmoid(log alpha_i - beta log(-gamma / zeta)). Inference: the
    deterministic gate clamp(sigmoid(log alpha) (zeta - gamma) + gamma, 0, 1), 0 for log alpha
    below log(-gamma / zeta) (docs/math.md §3). Its `pre` holds both paths side by side,
    (B, 2m): [log alpha | pi_mag]."""

    name, title = "hardconcrete", "Hard Concrete"
    keys = {"hc_l0_coeff": Key(0.4, "expected-L0 coefficient (scaled space)", ">= 0"),
            "hc_beta": Key(2 / 3, "initial gate temperature beta", "> 0"),
            "hc_beta_final": Key(2 / 3, "final gate temperature", "> 0"),
            "hc_beta_schedule": Key("constant", "beta from hc_beta to hc_beta_final",
                                    ("constant", "linear", "exponential", "cosine")),
            "hc_beta_frac": Key(1.0, "fraction of the steps beta anneals over", "[0, 1]"),
            "hc_preact_coeff": Key(1.0, "pull on dead latents' gates, sum_i dead relu(cut - "
                                   "log alpha_i) (0: off)", ">= 0")}
    coeff_key = "hc_l0_coeff"
    latent_params = (*BaseSAE.latent_params, ("W_gate", 1), ("b_gate", 0))
    cross_layer_ok = False  # a CLT layer's pre-activations are one path, its are two

    def __init__(self, cfg: dict[str, Any]):
        super().__init__(cfg)
        self.W_gate = nn.Parameter(self.W_enc.detach().clone())
        self.b_gate = nn.Parameter(torch.zeros(cfg["dict_size"]))
        # steps taken: the temperature's schedule and the seed of this step's u, so a resume
        # continues both and the group's other random draws are untouched
        self.register_buffer("gate_step", torch.zeros((), dtype=torch.long))
        # its host copy: reading the buffer each step would wait for the device (CUDA)
        self.steps_taken = 0
        self.register_load_state_dict_post_hook(
            lambda module, _: setattr(module, "steps_taken", int(module.gate_step)))
        self.uses_aux_loss = cfg["hc_preact_coeff"] > 0

    def pre_activations(self, x_scaled: Tensor) -> Tensor:
        x_in = x_scaled if self.transcoder else x_scaled - self.b_dec
        return torch.cat([x_in @ self.W_gate + self.b_gate, x_in @ self.W_enc + self.b_enc], -1)

    def paths(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """(log alpha, pi_mag) from `pre`."""
        assert pre.shape[-1] == 2 * self.cfg["dict_size"], "pre must come from pre_activations"
        return pre.tensor_split(2, dim=-1)

    def activation(self, pre: Tensor) -> Tensor:
        log_alpha, mag = self.paths(pre)
        stretch = HC_ZETA - HC_GAMMA
        if not self.training:
            return (torch.sigmoid(log_alpha) * stretch + HC_GAMMA).clamp(0, 1) * F.relu(mag)
        step = self.steps_taken
        gen = torch.Generator(pre.device).manual_seed(self.cfg["seed"] * 1_000_003 + step)
        u = torch.rand(log_alpha.shape, generator=gen, device=pre.device)  # float32 under bf16
        u = u.clamp(1e-6, 1 - 1e-6)  # log u and log(1 - u) finite
        s = torch.sigmoid((u.log() - (-u).log1p() + log_alpha.float()) / beta_at(self.cfg, step))
        return (s * stretch + HC_GAMMA).clamp(0, 1) * F.relu(mag)

    def sparsity_penalty(self, pre: Tensor, f: Tensor) -> Tensor:
        shift = beta_at(self.cfg, self.steps_taken) * HC_CUT
        return torch.sigmoid(self.paths(pre)[0] - shift).sum(-1).mean()

    def aux_loss(self, residual: Tensor, pre: Tensor) -> Tensor:
        """Each dead latent's gate pulled up to the inference cut: the expected-L0 gradient keeps
        pushing a closed gate down (Adam scales its small size up), nothing else reaches it."""
        gap = F.relu(HC_CUT - self.paths(pre)[0]) * self.dead_mask()
        return self.cfg["hc_preact_coeff"] * gap.sum(-1).mean()

    @torch.no_grad()
    def update_inference_state(self, f: Tensor | SparseLatents) -> None:
        self.gate_step += 1
        self.steps_taken += 1


def build_sae(cfg: dict[str, Any]) -> BaseSAE | CrossLayerTranscoder:
    if cfg["sae_type"] not in SAE_CLASSES:
        raise ConfigError(f"config sae_type={cfg['sae_type']!r} is not a registered variant "
                          f"(registered: {', '.join(SAE_CLASSES)}): import the module that "
                          "registers it first")
    return (CrossLayerTranscoder if cfg.get("cross_layer") else SAE_CLASSES[cfg["sae_type"]])(cfg)


def save_sae(sae: BaseSAE, folder: str | Path, extra: dict[str, Tensor] | None = None) -> None:
    """The SAE's tensors (float32) and config; `extra`: the trainer's tensors saved beside them (its
    coefficient's state, COEFFICIENT_STATE)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = sae.state_dict() | (extra or {})
    tensors = {k: v.detach().float().contiguous().cpu() if v.is_floating_point()
               else v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(sae.cfg, indent=2, default=str))


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> BaseSAE:
    """Load an SAE saved by `save_sae`; needs no training code."""
    folder = Path(folder)
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    sae = build_sae(cfg)
    sae.load_state_dict(sae_tensors(load_file(folder / WEIGHTS_FILE)))
    return sae.to(device).eval()


def sae_tensors(saved: dict[str, Tensor]) -> dict[str, Tensor]:
    """A weights file's tensors less the trainer's."""
    return {k: v for k, v in saved.items() if k not in COEFFICIENT_STATE}
