"""Sparse autoencoders: the shared base class, the variants, and their registry.

The math is docs/math.md §1-§4. Every SAE takes raw activations and returns raw-space
reconstructions: the input scale `s` is a buffer applied inside `encode` and undone in
`decode`, so losses, thresholds and coefficients all live in the scaled space.

A variant is one class that states what is its own (its activation, penalty, coefficient,
config keys, run-name tag, SAELens form) and registers with `@register`; everything else
(config validation, sweeps, bench, export, tests) reads `SAE_CLASSES`. A variant that also
states `select` trains with the CPU sparse kernels (kernels.py); one that does not runs the
dense `forward`, which is the reference.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from kernels import (
    SelectedPre,
    SparseLatents,
    SparsePattern,
    batch_top_entries,
    entries_above_biased,
    fired_latents,
    kth_largest,
    mean_l0,
    nested_sparse_reconstruction,
    row_top_entries,
    smallest_positive,
    sparse_forward,
    sparse_reconstruction,
)
from keys import ConfigError, Key, is_transcoder

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
TOKEN_STD_EPS = 1e-5  # added to each token's (unbiased) std under standardize_tokens, as SAELens's layer_norm does

SAE_CLASSES: dict[str, type[BaseSAE]] = {}  # the registry: sae_type -> class, in registration order


def register(cls: type[BaseSAE]) -> type[BaseSAE]:
    """Class decorator: make a variant trainable as `sae_type=cls.name`."""
    assert cls.name not in SAE_CLASSES or SAE_CLASSES[cls.name] is cls, f"sae_type {cls.name!r} is taken"
    SAE_CLASSES[cls.name] = cls
    return cls


class LossTerms(NamedTuple):
    recon: Tensor  # ||x - x_hat||^2 summed over d, averaged over the batch (scaled space)
    sparsity: Tensor  # coefficient times the variant's sparsity penalty
    aux: Tensor  # AuxK loss on dead latents (0 where the variant has none)
    details: Mapping[str, Tensor] = MappingProxyType({})  # parts worth logging (detached), e.g. each prefix's


@dataclass
class SAEOutput:
    """What a forward pass returns. Losses are scalars in the scaled space."""

    latents: Tensor | SparseLatents  # f, shape (B, m); SparseLatents from the sparse path
    loss: Tensor  # recon_loss + sparsity_loss + aux_loss
    recon_loss: Tensor
    sparsity_loss: Tensor
    aux_loss: Tensor
    error: Tensor  # x_hat_scaled - x_scaled, shape (B, d)
    x: Tensor  # the raw activations reconstructed: the input, or a transcoder's target
    unit: Tensor  # scaled-space units per raw unit of x: s, (B, 1) under standardize_tokens, a transcoder's s_out
    details: Mapping[str, Tensor] = field(default_factory=dict)  # logged as train/<name>

    @property
    def x_hat(self) -> Tensor:
        """Raw-space reconstruction, shape (B, d); formed when read (training does not read it)."""
        return self.x + self.error / self.unit


class BaseSAE(nn.Module):
    """Parameters, scale, encode/decode, loss, decoder constraint, dead-latent counters."""

    # --- what a variant states -------------------------------------------------------
    name: ClassVar[str]  # its sae_type
    title: ClassVar[str]  # how plots and model cards name it
    keys: ClassVar[dict[str, Key]] = {}  # the config keys it reads beyond config.KEYS, declared here
    coeff_key: ClassVar[str | None] = None  # the key of its sparsity coefficient (warmed up; None: no penalty)
    uses_aux_loss: ClassVar[bool] = False  # AuxK on dead latents (docs/math.md §4)
    saelens_architecture: ClassVar[str | None] = None  # SAELens's name for its inference rule (None: none fits)
    saelens_tensors: ClassVar[tuple[str, ...]] = ()  # per-latent tensors its SAELens form adds (m,)
    averaged_buffers: ClassVar[tuple[str, ...]] = ()  # training state data-parallel ranks average after each step
    coeff_damping: ClassVar[float] = 0.0  # target_l0: weight of the latest L0 error in the coefficient (math.md §8)
    coeff_rate: ClassVar[float] = 0.02  # target_l0: the running factor's rate, unless target_l0_rate sets one
    coeff_rise_clip: ClassVar[float] = 1.0  # target_l0: the largest log(L0 / target) the running factor rises by
    has_sparse_path: ClassVar[bool] = False  # set by __init_subclass__: the class states its own `select`

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # a subclass that changes its math does not inherit what computes the parent's math: it trains on
        # the dense reference and states its SAELens form itself
        cls.has_sparse_path = "select" in cls.__dict__
        if "activation" in cls.__dict__ and "saelens_architecture" not in cls.__dict__:
            cls.saelens_architecture = None

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        self.cfg = dict(cfg)
        d, m = cfg["act_size"], cfg["dict_size"]
        gen = torch.Generator().manual_seed(cfg["seed"])
        w_dec = torch.randn(m, d, generator=gen)
        w_dec /= w_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.T.clone())  # (d, m) stored latent-major, as W_dec.T is
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("scale", torch.ones(()))
        self.transcoder = is_transcoder(cfg)  # reads one hook point, reconstructs another (docs/math.md §11)
        if self.transcoder:
            self.register_buffer("target_scale", torch.ones(()))
        self.register_parameter("W_skip", nn.Parameter(torch.zeros(d, d)) if cfg.get("skip_connection") else None)
        self.register_buffer("tokens_since_fired", torch.zeros(m, dtype=torch.long))
        self.sparsity_coeff = 0.0  # set every step by the trainer (`coefficient_at`)
        if cfg.get("target_l0", 0) > 0:  # the coefficient's factor, adapted every step (`adapt_coefficient`)
            self.register_buffer("coeff_scale", torch.ones(()))
            self.averaged_buffers = (*self.averaged_buffers, "coeff_scale")
            if self.coeff_damping:  # and the latest clipped log(L0 / target)
                self.register_buffer("l0_error", torch.zeros(()))
                self.averaged_buffers = (*self.averaged_buffers, "l0_error")

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        if hasattr(self, "l0_error") and prefix + "l0_error" not in state_dict:  # saved before the damping term
            state_dict[prefix + "l0_error"] = torch.zeros(())  # existed: it starts again from no error
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def activation(self, pre: Tensor) -> Tensor:
        """f(pre); training and inference may differ (self.training)."""
        raise NotImplementedError

    def sparsity_penalty(self, pre: Tensor, f: Tensor) -> Tensor:
        """The penalty before its coefficient, averaged over the batch."""
        return pre.new_zeros(())

    def loss(self, goal: Tensor, pre: Tensor, f: Tensor, error: Tensor, aux_enabled: bool) -> LossTerms:
        """The loss terms of a dense forward (error = f @ W_dec + b_dec - goal); override for a loss of another
        shape."""
        recon = error.pow(2).sum(-1).mean()
        sparsity = self.sparsity_coeff * self.sparsity_penalty(pre, f)
        use_aux = self.uses_aux_loss and aux_enabled and self.training
        return LossTerms(recon, sparsity, self.aux_loss(-error, pre) if use_aux else recon.new_zeros(()))

    def coefficient_at(self, step: int, total_steps: int) -> float | Tensor:
        """The sparsity coefficient at `step`: cfg[coeff_key], warmed up linearly from 0 (times the
        factor `target_l0` adapts, plus `coeff_damping` times the latest L0 error)."""
        base = self.cfg[self.coeff_key] if self.coeff_key else 0.0
        warmup = self.cfg["sparsity_warmup_frac"] * total_steps
        coeff = base * (min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)
        if not hasattr(self, "coeff_scale"):
            return coeff
        if hasattr(self, "l0_error"):  # may turn negative for a while: a penalty becomes a reward to fire
            return coeff * (self.coeff_scale + self.coeff_damping * self.l0_error)
        return coeff * self.coeff_scale

    @torch.no_grad()
    def adapt_coefficient(self, f: Tensor | SparseLatents, step: int, total_steps: int) -> None:
        """target_l0: once the coefficient's warm-up is over, scale it by (batch L0 / target)^rate, the
        log ratio clipped to [-1, coeff_rise_clip], and keep the ratio clipped to [-1, 1] for the damping term;
        on the device (docs/math.md §8)."""
        if hasattr(self, "coeff_scale") and step + 1 >= self.cfg["sparsity_warmup_frac"] * total_steps:
            ratio = (mean_l0(f).clamp_min(1e-3) / self.cfg["target_l0"]).log().clamp(-1.0, 1.0)
            rate = self.cfg["target_l0_rate"] or self.coeff_rate
            self.coeff_scale.mul_(torch.exp(rate * ratio.clamp(max=self.coeff_rise_clip))).clamp_(1e-6, 1e6)
            if hasattr(self, "l0_error"):
                self.l0_error.copy_(ratio)

    @classmethod
    def run_tag(cls, cfg: dict[str, Any]) -> str:
        """The sparsity setting in generated run names, e.g. l1_1.5 (l1_1.5_target32 with target_l0)."""
        if not cls.coeff_key:
            return cls.name
        target = f"_target{cfg['target_l0']:g}" if cfg.get("target_l0", 0) > 0 else ""
        return f"{cls.coeff_key.removesuffix('_coeff')}_{cfg[cls.coeff_key]:g}{target}"

    @classmethod
    def check_cfg(cls, cfg: dict[str, Any]) -> dict[str, str]:
        """Problems with this variant's keys in `cfg` beyond their declared ranges: {key: what is allowed}."""
        return {}

    @staticmethod
    def group_ends(cfg: dict[str, Any]) -> list[int] | None:
        """Where the variant's groups of latents end, if it has groups (plots and dashboards show them)."""
        return None

    def partial_reconstructions(self, f: Tensor, x: Tensor) -> dict[str, Tensor]:
        """Raw-space reconstructions from parts of the code worth evaluating on their own (logged as nmse_<name>)."""
        return {}

    # --- shared math (docs/math.md §1, §2) -----------------------------------------------

    def encoder_input(self, x_scaled: Tensor) -> Tensor:
        """What W_enc reads: x_scaled - b_dec for an SAE; a transcoder's scaled input as it is (its b_dec lives in
        the target's space)."""
        return x_scaled if self.transcoder else x_scaled - self.b_dec

    def pre_activations(self, x_scaled: Tensor) -> Tensor:
        return self.encoder_input(x_scaled) @ self.W_enc + self.b_enc

    def scaled_goal(self, x_scaled: Tensor, unit: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor]:
        """(goal, unit): what f @ W_dec + b_dec must equal, in the scaled space, and its scaled units per raw unit.
        An SAE: its own scaled input. A transcoder: the target times s_out, less the skip path x_scaled @ W_skip."""
        if not self.transcoder:
            return x_scaled, unit
        if target is None:
            raise ValueError("a transcoder reconstructs its target: call sae(x, target=y)")
        goal = target * self.target_scale
        return (goal if self.W_skip is None else goal - x_scaled @ self.W_skip), self.target_scale

    def input_transform(self, x: Tensor) -> tuple[Tensor | None, Tensor]:
        """(shift, unit) for raw x (B, d): the SAE works on x_scaled = (x - shift) * unit and maps
        back by shift + x_hat_scaled / unit. shift is None (0) and unit is s, or with
        standardize_tokens each token's mean and s / (std + eps), shapes (B, 1)."""
        if not self.cfg.get("standardize_tokens", False):
            return None, self.scale
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 inputs: statistics in float32
        return x.mean(-1, keepdim=True), self.scale / (x.std(-1, keepdim=True) + TOKEN_STD_EPS)

    def scaled_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(x_scaled, unit): raw activations in the space the SAE works in."""
        shift, unit = self.input_transform(x)
        return (x if shift is None else x - shift) * unit, unit

    def encode(self, x: Tensor) -> Tensor:
        """Raw activations -> latents."""
        return self.activation(self.pre_activations(self.scaled_input(x)[0]))

    def decode(self, f: Tensor, x: Tensor | None = None) -> Tensor:
        """Latents -> raw-space reconstruction (a transcoder's prediction of its target); with standardize_tokens
        or a skip connection pass the raw input `x` the latents came from."""
        if self.transcoder:
            y = f @ self.W_dec + self.b_dec
            if self.W_skip is not None:
                if x is None:
                    raise ValueError("this transcoder has a skip connection: decode(f, x) needs the raw input x")
                y = y + self.scaled_input(x)[0] @ self.W_skip
            return y / self.target_scale
        if x is None and self.cfg.get("standardize_tokens", False):
            raise ValueError("this SAE standardises each token (standardize_tokens): decode(f, x) needs the raw "
                             "input x to put its tokens' mean and std back (or read sae(x).x_hat)")
        shift, unit = (None, self.scale) if x is None else self.input_transform(x)
        x_hat = (f @ self.W_dec + self.b_dec) / unit
        return x_hat if shift is None else x_hat + shift

    def forward(self, x: Tensor, aux_enabled: bool = True, sparse: bool = False,
                target: Tensor | None = None) -> SAEOutput:
        """Raw activations (and a transcoder's raw `target`) -> SAEOutput; `sparse`: the same values and
        gradients from kernels.py."""
        assert target is None or self.transcoder, "an SAE reconstructs its input: target is for transcoders"
        reconstructed = x if target is None else target
        if sparse and self.has_sparse_path and self.training:
            step = sparse_forward(self, x, aux_enabled, target)
            if step is not None:
                return SAEOutput(step.latents, step.recon_loss + step.sparsity_loss + step.aux_loss,
                                 step.recon_loss, step.sparsity_loss, step.aux_loss, step.error, reconstructed,
                                 step.unit, step.details)
        x_scaled, unit = self.scaled_input(x)
        pre = self.pre_activations(x_scaled)
        f = self.activation(pre)
        goal, unit = self.scaled_goal(x_scaled, unit, target)
        error = f @ self.W_dec + self.b_dec - goal
        terms = self.loss(goal, pre, f, error, aux_enabled)
        return SAEOutput(f, terms.recon + terms.sparsity + terms.aux, terms.recon, terms.sparsity, terms.aux, error,
                         reconstructed, unit, terms.details)

    # --- the sparse path (kernels.py): a variant states `select`, and its math on the selected entries

    def select(self, xw: Tensor) -> tuple[SelectedPre | None, SelectedPre | None]:
        """From xw = x_in @ W_enc (B, m), b_enc not added (a scratch): the entries that may be non-zero
        (None: too many for sparse kernels to pay) and those 0 with a straight-through gradient (or None)."""
        raise NotImplementedError

    def sparse_activation(self, pre_vals: Tensor, pattern: SparsePattern) -> Tensor:
        """f on the selected entries (the dense `activation`, restricted)."""
        return F.relu(pre_vals)

    def sparse_penalty(self, pre_vals: Tensor, f_vals: Tensor, pattern: SparsePattern) -> Tensor:
        return pre_vals.new_zeros(())

    def sparse_reconstruction(self, f_vals: Tensor, goal: Tensor, pattern: SparsePattern, zero_vals: Tensor | None,
                              zero_pattern: SparsePattern | None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(recon, error, details) of `loss` from the selected entries, error = f @ W_dec - goal (`zero_*`:
        JumpReLU's gradient window)."""
        return *sparse_reconstruction(f_vals, self.W_dec, self.b_dec, goal, pattern, zero_vals, zero_pattern), {}

    # --- dead latents and AuxK (docs/math.md §4) -----------------------------------------

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired > self.cfg["dead_after_tokens"]

    @torch.no_grad()
    def update_dead_counters(self, f: Tensor | SparseLatents) -> None:
        n_tokens = f.pattern.shape[0] if isinstance(f, SparseLatents) else f.shape[0]
        self.mark_fired(fired_latents(f), n_tokens)

    @torch.no_grad()
    def mark_fired(self, fired: Tensor, n_tokens: int) -> None:
        """Count `n_tokens` more training tokens for every latent, and reset those that fired."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired.masked_fill_(fired, 0)

    def aux_loss(self, residual: Tensor, pre: Tensor) -> Tensor:
        """The detached residual from each token's top `top_k_aux` dead pre-activations, decoded without
        b_dec; exactly 0 with no dead latents, with no host sync (live latents masked to -inf add 0)."""
        dead = self.dead_mask()
        k_aux = min(self.cfg["top_k_aux"], pre.shape[-1])
        vals, idx = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
        vals = torch.where(torch.isfinite(vals), F.relu(vals), torch.zeros_like(vals))
        f_aux = torch.zeros_like(pre).scatter_(-1, idx, vals)
        residual = residual.detach()
        err = (f_aux @ self.W_dec - residual).pow(2).sum(-1).mean()
        normalised = err / residual.pow(2).sum(-1).mean().clamp_min(1e-12)
        return torch.where(dead.any(), self.cfg["aux_penalty"] * normalised, 0.0 * normalised)

    def latent_params(self) -> list[tuple[nn.Parameter, int]]:
        """Parameters with one slice per latent, and the dimension that indexes the latents."""
        return [(self.W_dec, 0), (self.W_enc, 1), (self.b_enc, 0)]

    # --- decoder constraint (docs/math.md §2) ----------------------------------------------

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Before the step: drop each row's gradient component along the row."""
        if self.W_dec.grad is None:
            return
        # g -= (g.w / w.w) w for each row w: two reads and one in-place pass
        coef = torch.linalg.vecdot(self.W_dec.grad, self.W_dec) / torch.linalg.vecdot(self.W_dec, self.W_dec)
        self.W_dec.grad.addcmul_(self.W_dec, coef.unsqueeze(1), value=-1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """After the step: put every decoder row back on the unit sphere."""
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True)

    # --- state from data --------------------------------------------------------------------

    @torch.no_grad()
    def init_from_batch(self, x: Tensor, scale: float, target: Tensor | None = None,
                        target_scale: float | None = None) -> None:
        """s (from this batch under standardize_tokens) and b_dec = the batch's scaled mean (§1, §2); a
        transcoder's s_in, s_out and b_dec = the scaled target's mean (§11)."""
        if self.transcoder:
            self.scale.fill_(scale)
            self.target_scale.fill_(target_scale)
            self.b_dec.copy_((target * target_scale).mean(dim=0))
            return
        if self.cfg.get("standardize_tokens", False):
            self.scale.fill_(1.0)
            scale = math.sqrt(x.shape[-1] / self.scaled_input(x)[0].pow(2).sum(-1).mean().item())
        self.scale.fill_(scale)
        self.b_dec.copy_(self.scaled_input(x)[0].mean(dim=0))

    @torch.no_grad()
    def update_inference_state(self, f: Tensor | SparseLatents) -> None:
        """Training-only state beyond the dead counters (BatchTopK's threshold)."""

    @torch.no_grad()
    def start_at_density(self, bound: Tensor) -> None:
        """Benchmarks and tests: latent i fires where pre > bound[i], as in a trained SAE (k-variants: no-op)."""

    # --- SAELens form (interop.py writes and reads the files) ----------------------------------

    def saelens_extras(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """(tensors, cfg.json fields) its SAELens architecture needs beyond W_enc, W_dec, b_enc, b_dec."""
        return {}, {}

    @classmethod
    def from_saelens(cls, tensors: dict[str, Tensor], fields: dict[str, Any]) -> dict[str, Any] | None:
        """{"cfg": ..., "state": ...} entries from a SAELens folder's extra `tensors` and flat cfg `fields`,
        or None if the folder is not this variant's."""
        return {"cfg": {}, "state": {}}

    # --- save / load -----------------------------------------------------------------------

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().contiguous().cpu() if v.is_floating_point()
                   else v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, folder / WEIGHTS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(self.cfg, indent=2, default=str))


# --- the variants -------------------------------------------------------------------------------

TOP_K = Key(32, "latents kept per token (TopK), or per token on average over the batch (BatchTopK)", "> 0")


@register
class VanillaSAE(BaseSAE):
    """ReLU + L1 penalty weighted by decoder-row norms. Its codes are sparse only once the L1
    term has acted: the sparse path falls back to dense above `max_sparse_density` (docs/kernels.md)."""

    name, title = "vanilla", "Vanilla (ReLU + L1)"
    keys = {"l1_coeff": Key(1.5, "L1 coefficient (scaled space)", ">= 0")}
    coeff_key = "l1_coeff"
    # its L0 falls from dense by itself at first: a running factor free to rise all the while winds up, overshoots
    # the target and unwinds too slowly to get back (docs/math.md §8)
    coeff_rate, coeff_rise_clip = 0.05, 0.1
    saelens_architecture = "standard"
    max_sparse_density = 0.08

    def activation(self, pre: Tensor) -> Tensor:
        return F.relu(pre)

    def sparsity_penalty(self, pre: Tensor, f: Tensor) -> Tensor:
        return (f * self.W_dec.norm(dim=-1)).sum(-1).mean()

    def select(self, xw: Tensor) -> tuple[SelectedPre | None, None]:
        max_count = int(self.max_sparse_density * xw.numel())
        return entries_above_biased(xw, self.b_enc, xw.new_zeros(()), max_count), None

    def sparse_penalty(self, pre_vals: Tensor, f_vals: Tensor, pattern: SparsePattern) -> Tensor:
        norms = self.W_dec.norm(dim=-1).index_select(0, pattern.cols)
        return (f_vals * norms).sum() / pattern.shape[0]

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
        return {"top_k": f"must be <= dict_size ({cfg['dict_size']})"} if cfg["top_k"] > cfg["dict_size"] else {}

    def saelens_extras(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {}, {"k": self.cfg["top_k"], "rescale_acts_by_decoder_norm": False}

    @classmethod
    def from_saelens(cls, tensors: dict[str, Tensor], fields: dict[str, Any]) -> dict[str, Any] | None:
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
    averaged_buffers = ("threshold",)  # the EMA is linear: averaging after each update averages the batch minima
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

    def saelens_extras(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {"threshold": self.threshold.detach().float().expand(self.cfg["dict_size"])}, {}

    @classmethod
    def from_saelens(cls, tensors: dict[str, Tensor], fields: dict[str, Any]) -> dict[str, Any] | None:
        theta = tensors["threshold"]
        if fields.get("sae_type") != cls.name or not bool((theta == theta[0]).all()):
            return None  # a JumpReLU folder, unless it is our BatchTopK export
        return {"cfg": {}, "state": {"threshold": theta[0].clone(), "threshold_initialised": torch.tensor(True)}}


class _JumpReLU(torch.autograd.Function):
    """f = pre * H(pre - theta); d/dtheta = -(theta/eps) K((pre - theta)/eps), K the rectangle (§3)."""

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
            "jumprelu_init_threshold": Key(1.0, "initial per-latent threshold", "> 0")}
    coeff_key = "l0_coeff"
    # its thresholds move at Adam's rate whatever the coefficient, so L0 lags it: the integral alone overshoots
    # (target 16 ended at 13.4) and, kept positive, cannot raise L0 faster than the thresholds drift (64: 54.7)
    coeff_damping = 2.0
    saelens_architecture, saelens_tensors = "jumprelu", ("threshold",)

    def __init__(self, cfg: dict[str, Any]):
        super().__init__(cfg)
        init = torch.full((cfg["dict_size"],), float(cfg["jumprelu_init_threshold"]))
        self.log_threshold = nn.Parameter(init.log())

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.float().exp()

    def activation(self, pre: Tensor) -> Tensor:
        return _JumpReLU.apply(pre, self.threshold.to(pre.dtype), self.cfg["bandwidth"])

    def sparsity_penalty(self, pre: Tensor, f: Tensor) -> Tensor:
        return _Step.apply(pre, self.threshold.to(pre.dtype), self.cfg["bandwidth"]).sum(-1).mean()

    def select(self, xw: Tensor) -> tuple[SelectedPre, SelectedPre]:
        """Active entries (pre > theta), and the lower half of the threshold's gradient window
        (theta - eps/2 < pre <= theta), from one pass over `xw`."""
        theta = self.threshold.to(xw.dtype)
        band = entries_above_biased(xw, self.b_enc, theta - self.cfg["bandwidth"] / 2)
        return band.split(band.pre > theta.index_select(0, band.pattern.cols))

    def sparse_activation(self, pre_vals: Tensor, pattern: SparsePattern) -> Tensor:
        # index_select, whose backward is an index_add: `theta[cols]`'s sorts the indices on CPU
        return _JumpReLU.apply(pre_vals, self.threshold.index_select(0, pattern.cols), self.cfg["bandwidth"])

    def sparse_penalty(self, pre_vals: Tensor, f_vals: Tensor, pattern: SparsePattern) -> Tensor:
        theta = self.threshold.index_select(0, pattern.cols)
        return _Step.apply(pre_vals, theta, self.cfg["bandwidth"]).sum() / pattern.shape[0]

    def latent_params(self) -> list[tuple[nn.Parameter, int]]:
        return [*super().latent_params(), (self.log_threshold, 0)]

    @torch.no_grad()
    def start_at_density(self, bound: Tensor) -> None:
        self.log_threshold.copy_(bound.clamp_min(1e-3).log())

    def saelens_extras(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {"threshold": self.threshold.detach()}, {}

    @classmethod
    def from_saelens(cls, tensors: dict[str, Tensor], fields: dict[str, Any]) -> dict[str, Any] | None:
        theta = tensors["threshold"]
        if not bool((theta > 0).all()):
            bad = int((theta <= 0).nonzero()[0])
            raise ConfigError(f"jumprelu threshold of latent {bad} is {theta[bad].item():g}; JumpReLUSAE learns "
                              "log(threshold), so every threshold must be > 0")
        return {"cfg": {}, "state": {"log_threshold": theta.log()}}


@register
class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK whose latents form nested groups: every prefix of the dictionary (the decoder bias plus
    the selected latents before the prefix's end) must reconstruct the input on its own, so general
    features settle in the early latents. Loss: the prefixes' reconstruction errors averaged, plus AuxK
    (docs/math.md §3). Inference as BatchTopK: one learnt threshold."""

    name, title = "matryoshka", "Matryoshka BatchTopK"
    keys = BatchTopKSAE.keys | {"matryoshka_groups": Key("", "group sizes, comma-separated, adding up to dict_size "
                                                         "(\"\": prefixes at 1/16, 1/8, 1/4, 1/2 and all of it)")}
    select = BatchTopKSAE.select  # stated here: the sparse path computes this class's loss (sparse_reconstruction)

    @staticmethod
    def group_ends(cfg: dict[str, Any]) -> list[int]:
        """Where each nested prefix of the dictionary ends, the last at dict_size."""
        m, text = cfg["dict_size"], cfg["matryoshka_groups"]
        sizes = [int(size) for size in text.split(",")] if text.strip() else []
        return list(itertools.accumulate(sizes)) if sizes else [m // 16, m // 8, m // 4, m // 2, m]

    @classmethod
    def check_cfg(cls, cfg: dict[str, Any]) -> dict[str, str]:
        text = cfg["matryoshka_groups"]
        if text.strip() and not all(re.fullmatch(r"[0-9]+", size.strip()) for size in text.split(",")):
            return {"matryoshka_groups": "comma-separated whole numbers of latents, e.g. 192,192,384,768,1536"}
        ends = cls.group_ends(cfg)
        if ends[-1] != cfg["dict_size"] or min(b - a for a, b in zip([0, *ends], ends, strict=False)) <= 0:
            return {"matryoshka_groups": f"non-empty groups adding up to dict_size ({cfg['dict_size']})"}
        return super().check_cfg(cfg)

    def partial_reconstructions(self, f: Tensor, x: Tensor) -> dict[str, Tensor]:
        """Each prefix but the whole dictionary on its own: the latents past its end set to 0."""
        return {f"prefix_{end}": self.decode(f * (torch.arange(f.shape[-1], device=f.device) < end), x)
                for end in self.group_ends(self.cfg)[:-1]}

    def loss(self, goal: Tensor, pre: Tensor, f: Tensor, error: Tensor, aux_enabled: bool) -> LossTerms:
        ends = self.group_ends(self.cfg)
        prefix = [(f[:, :end] @ self.W_dec[:end] + self.b_dec - goal).pow(2).sum(-1).mean() for end in ends[:-1]]
        terms = super().loss(goal, pre, f, error, aux_enabled)  # the full dictionary's error, and AuxK on it
        return self._averaged(terms, [*prefix, terms.recon], ends)

    def sparse_reconstruction(self, f_vals: Tensor, goal: Tensor, pattern: SparsePattern, zero_vals: Tensor | None,
                              zero_pattern: SparsePattern | None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        ends = self.group_ends(self.cfg)
        recon, error, prefix = nested_sparse_reconstruction(f_vals, self.W_dec, self.b_dec, goal, pattern, ends)
        return recon, error, {f"recon_loss_prefix_{end}": r for end, r in zip(ends, prefix, strict=True)}

    @staticmethod
    def _averaged(terms: LossTerms, recons: list[Tensor], ends: list[int]) -> LossTerms:
        details = {f"recon_loss_prefix_{end}": r.detach() for end, r in zip(ends, recons, strict=True)}
        return terms._replace(recon=torch.stack(recons).mean(), details=details)


def build_sae(cfg: dict[str, Any]) -> BaseSAE:
    if cfg["sae_type"] not in SAE_CLASSES:
        raise ConfigError(f"config sae_type={cfg['sae_type']!r} is not a registered variant (registered: "
                          f"{', '.join(SAE_CLASSES)}): import the module that registers it first")
    return SAE_CLASSES[cfg["sae_type"]](cfg)


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> BaseSAE:
    """Load an SAE saved by `BaseSAE.save`; needs no training code."""
    folder = Path(folder)
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    sae = build_sae(cfg)
    sae.load_state_dict(load_file(folder / WEIGHTS_FILE))
    return sae.to(device).eval()
