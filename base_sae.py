"""The shared base of every SAE (docs/math.md §1, §2, §4): parameters, the input scale, encode and
decode, the dense forward with its loss, AuxK on dead latents, and the hooks a variant states; and
the registry of variants. The variants themselves are in sae.py.

Every SAE takes raw activations and returns raw-space reconstructions: the input scale `s` is a
buffer applied inside `encode` and undone in `decode`, so losses, thresholds and coefficients all
live in the scaled space. A variant that states `select` trains with the CPU sparse kernels
(kernels.py); one that does not runs the dense `forward`, which is the reference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import (
    SparseCode,
    SparseLatents,
    SparsePattern,
    sparse_aux_loss,
    sparse_forward,
    sparse_reconstruction,
)
from keys import Key, is_transcoder

# added to each token's (unbiased) std under standardize_tokens, as SAELens's layer_norm does
TOKEN_STD_EPS = 1e-5


SAE_CLASSES: dict[str, type[BaseSAE]] = {}  # the registry: sae_type -> class, in registration order


def register(cls: type[BaseSAE]) -> type[BaseSAE]:
    """Class decorator: make a variant trainable as `sae_type=cls.name`."""
    assert (cls.name not in SAE_CLASSES
            or SAE_CLASSES[cls.name] is cls), f"sae_type {cls.name!r} is taken"
    SAE_CLASSES[cls.name] = cls
    return cls


class LossTerms(NamedTuple):
    recon: Tensor  # ||x - x_hat||^2 summed over d, averaged over the batch (scaled space)
    sparsity: Tensor  # coefficient times the variant's sparsity penalty
    aux: Tensor  # AuxK loss on dead latents (0 where the variant has none)
    details: Mapping[str, Tensor] = MappingProxyType({})  # detached parts to log, e.g. per prefix


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
    unit: Tensor  # scaled/raw units of x: s, (B, 1) under standardize_tokens, a transcoder's s_out
    details: Mapping[str, Tensor] = field(default_factory=dict)  # logged as train/<name>

    @property
    def x_hat(self) -> Tensor:
        """Raw-space reconstruction, shape (B, d); formed when read (training does not read it)."""
        return self.x + self.error / self.unit


class BaseSAE(nn.Module):
    """Parameters, the input scale, encode/decode, the dense forward and its loss, AuxK on dead
    latents, and the hooks a variant states."""

    # --- what a variant states -------------------------------------------------------
    name: ClassVar[str]  # its sae_type
    title: ClassVar[str]  # how plots and model cards name it
    keys: ClassVar[dict[str, Key]] = {}  # config keys it reads beyond config.KEYS, declared here
    coeff_key: ClassVar[str | None] = None  # its sparsity coefficient (warmed up; None: no penalty)
    uses_aux_loss: ClassVar[bool] = False  # AuxK on dead latents (docs/math.md §4)
    saelens_architecture: ClassVar[str | None] = None  # its SAELens architecture (None: none fits)
    # the attributes its SAELens form adds beyond W_enc, W_dec, b_enc, b_dec, each given per latent
    # (m,): a scalar (BatchTopK's threshold) to every latent
    saelens_tensors: ClassVar[tuple[str, ...]] = ()
    saelens_names: ClassVar[dict[str, str]] = {}  # our tensor name -> SAELens's, where they differ
    averaged_buffers: ClassVar[tuple[str, ...]] = ()  # training state the ranks average each step
    # parameters with a slice per latent, and the dimension indexing latents (lazy Adam reads them)
    latent_params: ClassVar[tuple[tuple[str, int], ...]] = (("W_dec", 0), ("W_enc", 1),
                                                            ("b_enc", 0))
    # target_l0's controller (schedule.SparsityCoefficient, docs/math.md §8): the running factor's
    # rate unless target_l0_rate sets one, the largest log(L0 / target) it rises by, the weight of
    # the latest L0 error
    coeff_rate: ClassVar[float] = 0.02
    coeff_rise_clip: ClassVar[float] = 1.0
    coeff_damping: ClassVar[float] = 0.0
    has_sparse_path: ClassVar[bool] = False  # __init_subclass__: the class states its own `select`
    # its math works per layer of a cross-layer transcoder (clt.py): not if its penalty reads the
    # decoder (a CLT latent has one per target) or it states its own `loss`
    cross_layer_ok: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # a subclass that changes its math does not inherit what computes the parent's math: it
        # trains on the dense reference and states its SAELens form itself
        cls.has_sparse_path = "select" in cls.__dict__
        cls.cross_layer_ok = cls.cross_layer_ok and "loss" not in cls.__dict__
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
        self.transcoder = is_transcoder(cfg)  # reads one hook, reconstructs another (§11)
        if self.transcoder:
            self.register_buffer("target_scale", torch.ones(()))
        self.register_parameter("W_skip", nn.Parameter(torch.zeros(d, d))
                                if cfg.get("skip_connection") else None)
        self.register_buffer("tokens_since_fired",
                             torch.zeros(m, dtype=torch.long))  # the trainer counts
        self.sparsity_coeff: float | Tensor = 0.0  # set each step (schedule.SparsityCoefficient)

    def activation(self, pre: Tensor) -> Tensor:
        """f(pre); training and inference may differ (self.training)."""
        raise NotImplementedError

    def sparsity_penalty(self, pre: Tensor, f: Tensor) -> Tensor:
        """The penalty before its coefficient, averaged over the batch."""
        return pre.new_zeros(())

    def loss(self, goal: Tensor, pre: Tensor, f: Tensor, error: Tensor,
             aux_enabled: bool) -> LossTerms:
        """The loss terms of a dense forward (error = f @ W_dec + b_dec - goal); override for a
        loss of another shape."""
        recon = error.pow(2).sum(-1).mean()
        sparsity = self.sparsity_coeff * self.sparsity_penalty(pre, f)
        use_aux = self.uses_aux_loss and aux_enabled and self.training
        return LossTerms(recon, sparsity,
                         self.aux_loss(-error, pre) if use_aux else recon.new_zeros(()))

    @classmethod
    def run_tag(cls, cfg: dict[str, Any]) -> str:
        """The sparsity in generated run names, e.g. l1_1.5 (l1_1.5_target32 with target_l0)."""
        if not cls.coeff_key:
            return cls.name
        target = f"_target{cfg['target_l0']:g}" if cfg.get("target_l0", 0) > 0 else ""
        return f"{cls.coeff_key.removesuffix('_coeff')}_{cfg[cls.coeff_key]:g}{target}"

    @classmethod
    def check_cfg(cls, cfg: dict[str, Any]) -> dict[str, str]:
        """Problems of its keys in `cfg` beyond their declared ranges: {key: what is allowed}."""
        return {}

    @staticmethod
    def group_ends(cfg: dict[str, Any]) -> list[int] | None:
        """Where its nested groups of latents end, if it has groups: plots and dashboards show
        them, metrics score each prefix alone (nmse_prefix_<end>)."""
        return None

    # --- shared math (docs/math.md §1, §2) -----------------------------------------------

    def pre_activations(self, x_scaled: Tensor) -> Tensor:
        """(x_scaled - b_dec) W_enc + b_enc; a transcoder's W_enc reads its scaled input as it is
        (its b_dec lives in the target's space)."""
        x_in = x_scaled if self.transcoder else x_scaled - self.b_dec
        return x_in @ self.W_enc + self.b_enc

    def scaled_goal(self, x_scaled: Tensor, unit: Tensor,
                    target: Tensor | None) -> tuple[Tensor, Tensor]:
        """(goal, unit): what f @ W_dec + b_dec must equal, in the scaled space, and its scaled
        units per raw unit. An SAE: its own scaled input. A transcoder: the target times s_out, less
        the skip path x_scaled @ W_skip."""
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
        """Latents -> raw-space reconstruction (a transcoder's prediction of its target); with
        standardize_tokens or a skip connection pass the raw input `x` the latents came from."""
        if self.transcoder:
            y = f @ self.W_dec + self.b_dec
            if self.W_skip is not None:
                if x is None:
                    raise ValueError("this transcoder has a skip connection: decode(f, x) needs "
                                     "the raw input x")
                y = y + self.scaled_input(x)[0] @ self.W_skip
            return y / self.target_scale
        if x is None and self.cfg.get("standardize_tokens", False):
            raise ValueError("this SAE standardises each token (standardize_tokens): decode(f, x) "
                             "needs the raw input x to put its tokens' mean and std back (or read "
                             "sae(x).x_hat)")
        shift, unit = (None, self.scale) if x is None else self.input_transform(x)
        x_hat = (f @ self.W_dec + self.b_dec) / unit
        return x_hat if shift is None else x_hat + shift

    def forward(self, x: Tensor, aux_enabled: bool = True, sparse: bool = False,
                target: Tensor | None = None) -> SAEOutput:
        """Raw activations (and a transcoder's raw `target`) -> SAEOutput; `sparse`: the same values
        and gradients from kernels.py."""
        assert target is None or self.transcoder, ("an SAE reconstructs its input: target is for "
                                                   "transcoders")
        reconstructed = x if target is None else target
        if sparse and self.has_sparse_path and self.training:
            step = sparse_forward(self, x, aux_enabled, target)
            if step is not None:
                return SAEOutput(step.latents, step.recon_loss + step.sparsity_loss + step.aux_loss,
                                 step.recon_loss, step.sparsity_loss, step.aux_loss, step.error,
                                 reconstructed, step.unit, step.details)
        x_scaled, unit = self.scaled_input(x)
        pre = self.pre_activations(x_scaled)
        f = self.activation(pre)
        goal, unit = self.scaled_goal(x_scaled, unit, target)
        error = f @ self.W_dec + self.b_dec - goal
        terms = self.loss(goal, pre, f, error, aux_enabled)
        return SAEOutput(f, terms.recon + terms.sparsity + terms.aux, terms.recon, terms.sparsity,
                         terms.aux, error, reconstructed, unit, terms.details)

    # --- the sparse path (kernels.py), for a variant that states `select(xw) -> (kept, window)`:
    # from xw = x_in @ W_enc (B, m), b_enc not added (a scratch), the entries that may be non-zero
    # (`kept`, a SelectedPre; None: too many for the sparse kernels to pay) and those 0 with a
    # straight-through gradient (`window`, or None); the methods below: the variant's math on them

    def sparse_activation(self, pre_vals: Tensor, pattern: SparsePattern) -> tuple[Tensor, Tensor]:
        """(f, penalty) on the selected entries: the dense `activation` and `sparsity_penalty`
        restricted to them (the penalty before its coefficient, averaged over the batch)."""
        return F.relu(pre_vals), pre_vals.new_zeros(())

    def sparse_reconstruction(self, f_vals: Tensor, goal: Tensor, pattern: SparsePattern,
                              zero_vals: Tensor | None, zero_pattern: SparsePattern | None
                              ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(recon, error, details) of `loss` from the selected entries, error = f @ W_dec - goal
        (`zero_*`: JumpReLU's gradient window)."""
        return *sparse_reconstruction(f_vals, self.W_dec, self.b_dec, goal, pattern, zero_vals,
                                      zero_pattern), {}

    def sparse_aux(self, code: SparseCode, error: Tensor, x: Tensor, aux_enabled: bool) -> Tensor:
        """The auxiliary term of `loss` on the sparse path: AuxK on the dead columns."""
        if self.uses_aux_loss and aux_enabled:
            return sparse_aux_loss(self, error, x)
        return error.new_zeros(())

    # --- dead latents and AuxK (docs/math.md §4) -----------------------------------------

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired > self.cfg["dead_after_tokens"]

    def aux_loss(self, residual: Tensor, pre: Tensor) -> Tensor:
        """The detached residual from each token's top `top_k_aux` dead pre-activations, decoded
        without b_dec; exactly 0 with no dead latents, no host sync (live latents at -inf add 0)."""
        dead = self.dead_mask()
        k_aux = min(self.cfg["top_k_aux"], pre.shape[-1])
        vals, idx = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
        vals = torch.where(torch.isfinite(vals), F.relu(vals), torch.zeros_like(vals))
        f_aux = torch.zeros_like(pre).scatter_(-1, idx, vals)
        residual = residual.detach()
        err = (f_aux @ self.W_dec - residual).pow(2).sum(-1).mean()
        normalised = err / residual.pow(2).sum(-1).mean().clamp_min(1e-12)
        return torch.where(dead.any(), self.cfg["aux_penalty"] * normalised, 0.0 * normalised)

    # --- state from data --------------------------------------------------------------------

    @torch.no_grad()
    def init_from_batch(self, x: Tensor, scale: float, target: Tensor | None = None,
                        target_scale: float | None = None) -> None:
        """s (from this batch under standardize_tokens) and b_dec = the batch's scaled mean
        (§1, §2); a transcoder's s_in, s_out and b_dec = the scaled target's mean (§11)."""
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
        """Benchmarks and tests: latent i fires where pre > bound[i], as in a trained SAE
        (k-variants: no-op)."""

    # --- SAELens form (interop.py writes and reads the files) ----------------------------------

    @classmethod
    def from_saelens(cls, tensors: dict[str, Tensor],
                     fields: dict[str, Any]) -> dict[str, Any] | None:
        """{"cfg": ..., "state": ...} entries from a SAELens folder's extra `tensors` and flat cfg
        `fields`, or None if the folder is not this variant's."""
        return {"cfg": {}, "state": {}}
