"""Sparse autoencoders: one shared base and four variants (SPEC §1-§4).

Every SAE takes raw activations and returns raw-space reconstructions; the input
scale `s` (SPEC §1) is a buffer applied inside `encode` and undone in `decode`, so
losses, thresholds and coefficients all live in the scaled space. With
`standardize_tokens` each token is also standardised first (its mean subtracted, divided
by its std) and its mean and std are put back on output.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
TOKEN_STD_EPS = 1e-5  # added to each token's (unbiased) std under standardize_tokens, as SAELens's layer_norm does


# --- the sparse training path: latents on a CSR pattern, and its autograd functions ----------------


class SparsePattern:
    """Where a batch's latents may be non-zero: entries (row, column) of a (B, m) matrix, rows
    ascending, in CSR layout (row b owns entries crow[b]:crow[b+1]; columns in any order).
    Row indices, row-major positions and the transposed layout (which the sparse backward
    passes need) are each computed once, when first asked for."""

    def __init__(self, cols: Tensor, shape: tuple[int, int], crow: Tensor | None = None, flat: Tensor | None = None):
        assert crow is not None or flat is not None, "a pattern needs its row starts or its positions"
        self.cols, self.shape = cols, shape
        self._crow, self._flat, self._rows = crow, flat, None
        self._transposed: tuple[Tensor, Tensor, Tensor] | None = None

    @classmethod
    def from_positions(cls, flat: Tensor, batch_size: int, n_latents: int) -> SparsePattern:
        """From ascending row-major positions b * m + j in the (B, m) matrix."""
        return cls(flat.remainder(n_latents), (batch_size, n_latents), flat=flat)

    @classmethod
    def from_topk(cls, idx: Tensor, n_latents: int) -> SparsePattern:
        """From per-row indices (B, k)."""
        b, k = idx.shape
        return cls(idx.flatten(), (b, n_latents), crow=torch.arange(0, b * k + 1, k, device=idx.device))

    @property
    def crow(self) -> Tensor:
        if self._crow is None:
            # positions ascend, so row b starts where b * m would be inserted (at 250k entries
            # 0.23 ms, vs 1.2 ms for counting the rows with bincount)
            b, m = self.shape
            self._crow = torch.searchsorted(self._flat, torch.arange(0, (b + 1) * m, m, device=self._flat.device))
        return self._crow

    def rows(self) -> Tensor:
        if self._rows is None:
            if self._flat is not None:
                self._rows = self._flat.div(self.shape[1], rounding_mode="floor")
            else:
                self._rows = torch.repeat_interleave(torch.arange(self.shape[0], device=self.cols.device),
                                                     self.crow.diff())
        return self._rows

    def positions(self) -> Tensor:
        """Row-major positions b * m + j of the entries, in this pattern's order."""
        if self._flat is None:
            self._flat = self.rows() * self.shape[1] + self.cols
        return self._flat

    def csr(self, vals: Tensor) -> Tensor:
        return torch.sparse_csr_tensor(self.crow, self.cols, vals, self.shape, check_invariants=False)

    def csr_transposed(self, vals: Tensor) -> Tensor:
        """The (m, B) transpose holding `vals` (given in this pattern's order)."""
        if self._transposed is None:
            # the narrowest integer type sorts fastest on CPU (131k entries: int16 0.9 ms, int32 1.5, int64 2.8)
            narrow = torch.int16 if self.shape[1] <= torch.iinfo(torch.int16).max + 1 else torch.int32
            order = self.cols.to(narrow).argsort(stable=True)
            t_crow = torch.zeros(self.shape[1] + 1, dtype=torch.long, device=self.cols.device)
            t_crow[1:] = torch.bincount(self.cols, minlength=self.shape[1]).cumsum(0)
            self._transposed = (order, t_crow, self.rows().take(order))
        order, t_crow, t_cols = self._transposed
        return torch.sparse_csr_tensor(t_crow, t_cols, vals.take(order), self.shape[::-1], check_invariants=False)


@dataclass
class SparseLatents:
    """Latents f as values on a SparsePattern (entries may hold 0)."""

    pattern: SparsePattern
    vals: Tensor

    def dense(self) -> Tensor:
        out = self.vals.new_zeros(self.pattern.shape)
        out[self.pattern.rows(), self.pattern.cols] = self.vals
        return out


def fired_latents(f: Tensor | SparseLatents) -> Tensor:
    """(m,) bool: which latents fired on at least one token of the batch."""
    if isinstance(f, SparseLatents):
        fired = f.vals.new_zeros(f.pattern.shape[1]).index_add_(0, f.pattern.cols, (f.vals > 0).to(f.vals.dtype))
        return fired > 0  # index_add, not cols[vals > 0]: a boolean index runs a nonzero
    return (f > 0).any(dim=0)


def mean_l0(f: Tensor | SparseLatents) -> Tensor:
    if isinstance(f, SparseLatents):
        return (f.vals > 0).sum() / f.pattern.shape[0]
    return (f > 0).float().sum(-1).mean()


def smallest_positive(f: Tensor | SparseLatents) -> Tensor:
    """Smallest positive latent value in the batch (inf if none)."""
    vals = f.vals if isinstance(f, SparseLatents) else f
    return torch.where(vals > 0, vals, torch.full_like(vals, float("inf"))).amin()


class _SparseEncode(torch.autograd.Function):
    """The selected entries of pre = x_in @ W_enc + b_enc, whose values were already
    computed without gradient. Backward touches only those entries: a sparse (m, B)
    by (B, d) product for W_enc instead of a dense (d, B) by (B, m) one."""

    @staticmethod
    def forward(ctx, pre_vals: Tensor, x_in: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor,
                pattern: SparsePattern) -> Tensor:
        ctx.save_for_backward(x_in, W_enc)
        ctx.pattern = pattern
        return pre_vals.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x_in, W_enc = ctx.saved_tensors
        pattern = ctx.pattern
        grad_b_enc = grad.new_zeros(pattern.shape[1]).index_add_(0, pattern.cols, grad)
        # (m, d) product returned as its (d, m) view: W_enc is stored latent-major (it starts
        # as W_dec.T), so autograd keeps this gradient as it is; a contiguous one would be
        # transposed into W_enc's layout by a copy
        grad_W_enc = (pattern.csr_transposed(grad) @ x_in).T
        grad_b_dec = -(W_enc @ grad_b_enc)  # pre depends on b_dec through x_in = x - b_dec
        return None, None, grad_W_enc, grad_b_enc, grad_b_dec, None


def sampled_grad(pattern: SparsePattern, grad: Tensor, W_dec: Tensor) -> Tensor:
    """(grad @ W_dec.T) at the pattern's entries: the gradient of f there."""
    return torch.sparse.sampled_addmm(pattern.csr(grad.new_zeros(pattern.cols.shape)), grad, W_dec.T, beta=0).values()


class _SparseReconstruction(torch.autograd.Function):
    """The reconstruction loss ||e||^2 / B and the error e = f @ W_dec - x_in in the scaled
    space (x_hat_scaled - x_scaled, as x_in = x * s - b_dec), for f given as values on a
    SparsePattern: one sparse product that starts from -x_in (no separate subtraction), and
    a backward whose gradient of e is one scaled copy of e. The error is returned without
    gradient (AuxK reads it detached). x_in comes without gradient: its dependence on b_dec
    is differentiated here (e's gradient summed over the batch). Backward samples the dense
    gradient only at the pattern and scatters W_dec's gradient into the used rows. Optional
    `zero_vals` on a second pattern are entries of f known to be 0 (they add nothing to the
    product or to W_dec's gradient) whose gradient is still wanted: JumpReLU's threshold
    learns from them through its straight-through estimator."""

    @staticmethod
    def forward(ctx, vals: Tensor, W_dec: Tensor, b_dec: Tensor, x_in: Tensor, pattern: SparsePattern,
                zero_vals: Tensor | None = None, zero_pattern: SparsePattern | None = None) -> tuple[Tensor, Tensor]:
        error = torch.addmm(x_in, pattern.csr(vals), W_dec, beta=-1)
        ctx.save_for_backward(vals, W_dec, error)
        ctx.patterns = pattern, zero_pattern
        ctx.mark_non_differentiable(error)
        return torch.dot(error.view(-1), error.view(-1)) / error.shape[0], error

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_error: None):
        vals, W_dec, error = ctx.saved_tensors
        pattern, zero_pattern = ctx.patterns
        grad = error * (2 * grad_loss / error.shape[0])
        grad_vals = grad_W_dec = grad_b_dec = grad_zero_vals = None
        if ctx.needs_input_grad[0]:
            grad_vals = sampled_grad(pattern, grad, W_dec)
        if ctx.needs_input_grad[1]:
            grad_W_dec = pattern.csr_transposed(vals) @ grad
        if ctx.needs_input_grad[2]:
            grad_b_dec = grad.sum(0)
        if zero_pattern is not None and ctx.needs_input_grad[5]:
            grad_zero_vals = sampled_grad(zero_pattern, grad, W_dec)
        return grad_vals, grad_W_dec, grad_b_dec, None, None, grad_zero_vals, None


_WORKSPACES: dict[tuple[Any, ...], Tensor] = {}


def workspace(shape: tuple[int, ...], like: Tensor, dtype: torch.dtype | None = None, use: str = "") -> Tensor:
    """A reused scratch tensor for the sparse step's (B, m) pre-activations and masks,
    shared by every SAE of the process (each uses it only inside its own forward). A fresh
    48 MB tensor per step costs ~15 ms of page faults on CPU (measured at B 4096, m 3072).
    One per use, shape and dtype: a group of SAEs with one batch and dictionary size holds
    three (four under bf16 autocast)."""
    key = (use, shape, dtype or like.dtype, like.device)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = torch.empty(shape, dtype=key[2], device=like.device)
    return _WORKSPACES[key]


@dataclass
class SAEOutput:
    """What a forward pass returns. Losses are scalars in the scaled space."""

    latents: Tensor | SparseLatents  # f, shape (B, m); SparseLatents from the sparse path
    loss: Tensor  # recon_loss + sparsity_loss + aux_loss
    recon_loss: Tensor  # ||x - x_hat||^2 summed over d, averaged over the batch (scaled space)
    sparsity_loss: Tensor  # coefficient times the variant's sparsity penalty
    aux_loss: Tensor  # AuxK loss on dead latents (0 where the variant has none)
    error: Tensor  # x_hat_scaled - x_scaled, shape (B, d)
    x: Tensor  # the raw input
    unit: Tensor  # scaled-space units per raw unit: s, or (B, 1) under standardize_tokens

    @property
    def x_hat(self) -> Tensor:
        """Raw-space reconstruction, shape (B, d); formed when read (training does not read it)."""
        return self.x + self.error / self.unit


@dataclass
class SelectedPre:
    """Pre-activation values (without gradient) at the entries of a SparsePattern."""

    pattern: SparsePattern
    pre: Tensor

    def where(self, keep: Tensor) -> SelectedPre:
        """The entries where the bool `keep` (one per entry) holds."""
        idx = keep.nonzero().squeeze(1)  # once: each boolean index would run its own nonzero
        return SelectedPre(SparsePattern.from_positions(self.pattern.positions().index_select(0, idx),
                                                        *self.pattern.shape), self.pre.index_select(0, idx))

    def split(self, first: Tensor) -> tuple[SelectedPre, SelectedPre]:
        """(the entries where the bool `first` holds, the others), each in this order: one
        stable sort of the mask (at 250k entries 1.7 ms, vs 4.4 ms for four boolean indexings)."""
        order = torch.argsort(first.logical_not().to(torch.uint8), stable=True)
        n_first = int(first.sum())
        positions, pre = self.pattern.positions().index_select(0, order), self.pre.index_select(0, order)
        b, m = self.pattern.shape
        return (SelectedPre(SparsePattern.from_positions(positions[:n_first], b, m), pre[:n_first]),
                SelectedPre(SparsePattern.from_positions(positions[n_first:], b, m), pre[n_first:]))


# --- selection: the entries of a (B, m) product a variant keeps, found without sorting or
# listing all of it (the sparse path's CPU fast paths; each equals its plain torch reference in tests)


@torch.no_grad()
def row_top_entries(pre: Tensor, k: int, group: int = 8) -> tuple[Tensor, Tensor]:
    """Values and column indices (B, k) of each row's k largest entries (any order), as
    `topk` picks them up to ties and to which entries <= 0 fill a row with fewer than k
    positive ones (f is 0 there and so is its gradient: nothing downstream can tell). On CPU
    through a prefilter: columns j, j+G, j+2G, ... (G = m / group) form a group, and every
    entry among a row's k largest lies in one of the k groups with the largest maxima, so the
    exact topk runs over k*group candidates instead of m. Both topks order the float bits as int32, which orders
    positive floats as floats and puts them above every negative one, and skips ATen's NaN
    checks (measured at 4096 x 3072, k 32, 2 threads: 25.4 ms vs 29.0 ms for float topks,
    35 ms for one topk over m). CUDA's topk is fast as it is."""
    b, m = pre.shape
    if pre.is_cuda or m % group or 4 * k * group > m or pre.dtype != torch.float32:
        return pre.topk(k, dim=-1, sorted=False)
    n_groups = m // group
    blocks = pre.view(b, group, n_groups)
    top_groups = blocks.amax(1).view(torch.int32).topk(k, dim=-1, sorted=False).indices
    candidates = blocks.gather(2, top_groups.unsqueeze(1).expand(b, group, k)).view(b, group * k)
    # candidate j * k + i is column top_groups[i] + j * n_groups
    vals, pick = candidates.view(torch.int32).topk(k, dim=-1, sorted=False)
    return vals.view(torch.float32), top_groups.gather(1, pick % k) + n_groups * pick.div(k, rounding_mode="floor")


def true_positions(mask: Tensor, max_count: int | None = None) -> Tensor | None:
    """Row-major positions of the True entries of a contiguous bool tensor, as
    `mask.view(-1).nonzero()` gives them, or None where more than `max_count` are True. On
    CPU 8 entries at a time: `nonzero` over the mask's 8-byte words, then over the bytes of
    the words that are not 0; most words of a sparse mask are 0 (measured at 4096 x 3072
    with 2% set: 10.6 ms vs 18.6 ms). More than `max_count` words not 0 means more than
    `max_count` entries, so a dense mask is given up before its bytes are listed (at 50%
    set, ~290 ms saved)."""
    flat = mask.view(-1)
    if flat.is_cuda or flat.numel() % 8 or flat.data_ptr() % 8:
        positions = flat.nonzero().squeeze(1)
    else:
        words = flat.view(torch.int64)
        word_idx = words.nonzero().squeeze(1)
        if max_count is not None and word_idx.numel() > max_count:
            return None
        word, byte = words.index_select(0, word_idx).view(torch.uint8).view(-1, 8).nonzero().unbind(1)
        positions = word_idx.index_select(0, word) * 8 + byte
    return None if max_count is not None and positions.numel() > max_count else positions


COMPARE_SCRATCH_BYTES = 3 << 19  # float32 compare results per chunk (1.5 MiB): small enough to stay in cache


def greater_than(pre: Tensor, bound: Tensor) -> Tensor:
    """pre > bound (a scalar or one per latent) as a bool tensor in a workspace. On CPU the
    comparison is written as float32 (vectorised) and cast to bool (vectorised), a few rows at
    a time through a small scratch: ATen compares into a bool output one element at a time
    (measured at 4096 x 3072 on 2 threads: 5.9-7.2 ms vs 3.3 ms; in the step, median of
    paired A/B over three runs: -1.8 to -5.9 ms JumpReLU, -1.1 to -3.8 ms BatchTopK; Vanilla -3.9)."""
    mask = workspace(pre.shape, pre, torch.bool)
    if pre.device.type != "cpu" or pre.dtype != torch.float32:
        return torch.gt(pre, bound, out=mask)
    rows = max(1, COMPARE_SCRATCH_BYTES // (4 * pre.shape[1]))
    scratch = workspace((rows, pre.shape[1]), pre, use="compare")  # never the (B, m) workspace, even if B == rows
    for start in range(0, pre.shape[0], rows):
        chunk = pre[start:start + rows]
        mask[start:start + rows].copy_(torch.gt(chunk, bound, out=scratch[: chunk.shape[0]]))
    return mask


def entries_above(pre: Tensor, bound: Tensor, max_count: int | None = None) -> SparsePattern | None:
    """The entries of `pre` (B, m) greater than `bound` (a scalar or one per latent), or
    None where there are more than `max_count`."""
    above = greater_than(pre, bound)
    positions = true_positions(above, max_count)
    return None if positions is None else SparsePattern.from_positions(positions, pre.shape[0], pre.shape[1])


def entries_above_biased(xw: Tensor, bias: Tensor, bound: Tensor, max_count: int | None = None) -> SelectedPre | None:
    """The entries where pre = xw + bias (bias one per latent) exceeds `bound` (a scalar or
    one per latent), with their values of pre, found without forming pre over all of xw
    (None where there are more than `max_count`): xw is compared with bound - bias,
    loosened by 1e-6 relative so that rounding never drops an entry (float32 rounds each
    sum to within 6e-8 relative). So it may also hold entries within that slack at or below
    the bound; callers that need the exact set compare the returned values (where f is 0
    there anyway, nothing needs to)."""
    slack = 1e-6 * (bound.abs() + bias.abs()) + 1e-30
    pattern = entries_above(xw, bound - bias - slack, max_count)
    if pattern is None:
        return None
    return SelectedPre(pattern, xw.view(-1).take(pattern.positions()) + bias.index_select(0, pattern.cols))


# Prime, so the strided sample visits every latent unless m is a multiple of it. On real
# MiniLM activations (trained SAE, 12 batches of 4096) the bound for 1.5 n admitted 1.40-1.56 n
# entries (stride 61: 1.47-1.53 n, ~4 ms slower per step).
BATCH_TOP_SAMPLE_STRIDE = 251


def batch_top_entries(xw: Tensor, bias: Tensor, n: int) -> SelectedPre:
    """The entries BatchTopK keeps, the n largest positive values of pre = xw + bias (ties
    at the n-th included), found without a full selection: a strided sample of the batch
    gives a lower bound expected to hold 1.5 n entries, and the exact n-th largest is taken
    among those. Where the bound holds fewer than n, a looser one (4 n), then 0, is tried. Syncs."""
    b, m = xw.shape
    sample_cols = torch.arange(0, b * m, BATCH_TOP_SAMPLE_STRIDE, device=xw.device) % m
    sample = xw.view(-1)[::BATCH_TOP_SAMPLE_STRIDE] + bias.index_select(0, sample_cols)
    zero = xw.new_zeros(())
    for margin in (1.5, 4.0, 0.0):
        rank = math.ceil(margin * n / BATCH_TOP_SAMPLE_STRIDE)
        bound = kth_largest(sample, rank).clamp_min(0) if 0 < rank <= sample.numel() else zero
        candidates = entries_above_biased(xw, bias, bound)
        n_above = int((candidates.pre >= bound).sum()) if bound > 0 else int((candidates.pre > 0).sum())
        if n_above >= n or bound == 0:
            break
    vals = candidates.pre  # every entry >= bound, so the n largest if n_above >= n
    lowest = kth_largest(vals, n) if n_above > n else bound
    return candidates.where((vals >= lowest) & (vals > 0))


def kth_largest(values: Tensor, k: int) -> Tensor:
    """The k-th largest entry of a 1-D tensor. Same value either way; measured at
    4096 x 3072: kthvalue 0.10 s vs topk 0.25 s on 2 CPU threads, but on an H100
    kthvalue 76 ms vs topk 0.3 ms."""
    if values.is_cuda:
        return values.topk(k, sorted=False).values.min()
    return values.kthvalue(values.numel() - k + 1).values


# --- the SAEs: the shared base, then the four variants ----------------------------------------------


class BaseSAE(nn.Module):
    """Parameters, scale, encode/decode, decoder constraint, dead-latent counters."""

    uses_aux_loss = False
    has_sparse_path = False  # variants that state `select` (and so can train with sparse kernels)
    averaged_buffers: tuple[str, ...] = ()  # training state data-parallel ranks average after each step

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
        self.register_buffer("tokens_since_fired", torch.zeros(m, dtype=torch.long))
        self.sparsity_coeff = 0.0  # set every step by the trainer (warmup)

    # --- shared math -----------------------------------------------------------------

    def pre_activations(self, x_scaled: Tensor) -> Tensor:
        return (x_scaled - self.b_dec) @ self.W_enc + self.b_enc

    def activation(self, pre: Tensor) -> Tensor:
        """Variant-specific f(pre); training and inference may differ."""
        raise NotImplementedError

    def sparsity_penalty(self, pre: Tensor, f: Tensor) -> Tensor:
        """Variant-specific penalty before its coefficient, averaged over the batch."""
        return pre.new_zeros(())

    def input_transform(self, x: Tensor) -> tuple[Tensor | None, Tensor]:
        """(shift, unit) for raw activations x (B, d): the SAE works on x_scaled = (x - shift) *
        unit and maps a reconstruction back as shift + x_hat_scaled / unit. By default shift is
        None (0) and unit the input scale s; with standardize_tokens they are each token's mean
        and s / (std + eps), shapes (B, 1) (SPEC §1)."""
        if not self.cfg.get("standardize_tokens", False):
            return None, self.scale
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 inputs: statistics in float32
        return x.mean(-1, keepdim=True), self.scale / (x.std(-1, keepdim=True) + TOKEN_STD_EPS)

    def scaled_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(x_scaled, unit): raw activations in the space the SAE works in (`input_transform`)."""
        shift, unit = self.input_transform(x)
        return (x if shift is None else x - shift) * unit, unit

    def encode(self, x: Tensor) -> Tensor:
        """Raw activations -> latents."""
        return self.activation(self.pre_activations(self.scaled_input(x)[0]))

    def decode(self, f: Tensor, x: Tensor | None = None) -> Tensor:
        """Latents -> raw-space reconstruction. With standardize_tokens pass the raw input `x`
        the latents came from: its tokens' mean and std are put back."""
        if x is None and self.cfg.get("standardize_tokens", False):
            raise ValueError("this SAE standardises each token (standardize_tokens): decode(f, x) needs the raw "
                             "input x to put its tokens' mean and std back (or read sae(x).x_hat)")
        shift, unit = (None, self.scale) if x is None else self.input_transform(x)
        x_hat = (f @ self.W_dec + self.b_dec) / unit
        return x_hat if shift is None else x_hat + shift

    def forward(self, x: Tensor, aux_enabled: bool = True, sparse: bool = False) -> SAEOutput:
        """Raw activations -> SAEOutput. `aux_enabled=False` lets the trainer skip the
        AuxK term while no latent can be dead yet (it would be exactly 0). `sparse=True`
        (training, variants with a sparse path) gives the same values and gradients
        with a backward that touches only the selected latents (`forward_sparse`)."""
        if sparse and self.has_sparse_path and self.training:
            return self.forward_sparse(x, aux_enabled)
        x_scaled, unit = self.scaled_input(x)
        pre = self.pre_activations(x_scaled)
        f = self.activation(pre)
        error = f @ self.W_dec + self.b_dec - x_scaled
        recon = error.pow(2).sum(-1).mean()
        sparsity = self.sparsity_coeff * self.sparsity_penalty(pre, f)
        if self.uses_aux_loss and aux_enabled and self.training:
            aux = self.aux_loss(-error, pre)
        else:
            aux = recon.new_zeros(())
        return SAEOutput(f, recon + sparsity + aux, recon, sparsity, aux, error, x, unit)

    # --- sparse training path ----------------------------------------------------------

    def select(self, xw: Tensor) -> tuple[SelectedPre | None, SelectedPre | None]:
        """Variant-specific, without gradient: from `xw` = x_in @ W_enc (B, m), b_enc not yet
        added (a scratch the variant may overwrite), the entries whose latent may be non-zero,
        and the entries whose latent is 0 but whose straight-through gradient may not be (None
        where the variant has none), each with its pre-activation values; the first is None
        where too many entries fire for sparse kernels to pay, and the step is then taken
        dense. A variant with a per-latent bound folds b_enc into the bound
        (`entries_above_biased`) instead of adding it to all B x m entries."""
        raise NotImplementedError

    def sparse_activation(self, pre_vals: Tensor, pattern: SparsePattern) -> Tensor:
        """f on the selected entries (the dense `activation`, restricted)."""
        return F.relu(pre_vals)

    def sparse_penalty(self, pre_vals: Tensor, f_vals: Tensor, pattern: SparsePattern) -> Tensor:
        return pre_vals.new_zeros(())

    def forward_sparse(self, x: Tensor, aux_enabled: bool = True) -> SAEOutput:
        """The training forward with sparse kernels: one dense matmul (the encoder),
        everything else on the selected entries. Same values and gradients as `forward`;
        under autocast the encoder matmul runs in the autocast dtype, as on the dense path,
        and the rest in float32."""
        device = x.device.type
        low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        with torch.autocast(device, enabled=False):
            with torch.no_grad():  # the sparse Functions differentiate x_in's dependence on b_dec
                shift, unit = self.input_transform(x)
                x_in = torch.addcmul(-self.b_dec, x.float() if shift is None else x.float() - shift, unit)
                active, window = self.select(self.encoder_matmul(x_in, low))
            if active is None:  # too dense for sparse kernels to pay (early Vanilla)
                with torch.autocast(device, dtype=low or torch.bfloat16, enabled=low is not None):
                    return self.forward(x, aux_enabled)
            pattern = active.pattern
            pre_vals = _SparseEncode.apply(active.pre, x_in, self.W_enc, self.b_enc, self.b_dec, pattern)
            f_vals = self.sparse_activation(pre_vals, pattern)
            penalty = self.sparse_penalty(pre_vals, f_vals, pattern)
            window_f = window_pattern = None
            if window is not None:  # f is 0 there: no gradient reaches pre, so no encoder backward
                window_pattern = window.pattern
                window_f = self.sparse_activation(window.pre, window_pattern)
                penalty = penalty + self.sparse_penalty(window.pre, window_f, window_pattern)
            recon, error = _SparseReconstruction.apply(f_vals, self.W_dec, self.b_dec, x_in, pattern, window_f,
                                                       window_pattern)
            sparsity = self.sparsity_coeff * penalty
            aux = self.sparse_aux_loss(error, x) if self.uses_aux_loss and aux_enabled else recon.new_zeros(())
        latents = SparseLatents(pattern, f_vals.detach())
        return SAEOutput(latents, recon + sparsity + aux, recon, sparsity, aux, error, x, unit)

    @torch.no_grad()
    def encoder_matmul(self, x_in: Tensor, dtype: torch.dtype | None) -> Tensor:
        """x_in @ W_enc as float32, into the reused workspace; computed in `dtype` if given
        (at 4096 x 384 x 3072 on a 2-thread CPU with AMX: 7.7 ms in bf16, conversions included,
        vs 32 ms in float32)."""
        shape = (x_in.shape[0], self.W_enc.shape[1])
        out = workspace(shape, x_in)
        if dtype is None:
            return torch.mm(x_in, self.W_enc, out=out)
        low = torch.mm(x_in.to(dtype), self.W_enc.to(dtype), out=workspace(shape, x_in, dtype))
        return out.copy_(low)

    def sparse_aux_loss(self, error: Tensor, x: Tensor) -> Tensor:
        """`aux_loss` computed on the dead columns only (a dense sub-problem of n_dead
        latents), given the error x_hat_scaled - x_scaled and the raw input. Reads the dead
        count on the host, which costs nothing on CPU (the device the sparse path is chosen for)."""
        dead_cols = self.dead_mask().nonzero().squeeze(1)
        if dead_cols.numel() == 0:
            return x.new_zeros(())
        x_in = self.scaled_input(x.float())[0] - self.b_dec
        pre = x_in @ self.W_enc.index_select(1, dead_cols) + self.b_enc.index_select(0, dead_cols)
        f_aux = F.relu(pre)
        if self.cfg["top_k_aux"] < dead_cols.numel():
            top = pre.detach().topk(self.cfg["top_k_aux"], dim=-1, sorted=False).indices
            f_aux = f_aux * torch.zeros_like(pre, dtype=torch.bool).scatter_(-1, top, True)
        error = error.detach()  # the residual to explain is -error
        err = (f_aux @ self.W_dec.index_select(0, dead_cols) + error).pow(2).sum(-1).mean()
        return self.cfg["aux_penalty"] * err / error.pow(2).sum(-1).mean().clamp_min(1e-12)

    # --- dead latents (SPEC §4) --------------------------------------------------------

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

    def latent_params(self) -> list[tuple[nn.Parameter, int]]:
        """Parameters with one slice per latent, and the dimension that indexes the latents."""
        return [(self.W_dec, 0), (self.W_enc, 1), (self.b_enc, 0)]

    def aux_loss(self, residual: Tensor, pre: Tensor) -> Tensor:
        """AuxK: reconstruct the detached residual from the top `top_k_aux` dead
        pre-activations of each token, decoded without b_dec. Exactly 0 with no dead
        latents, and computed without a host sync: live latents are masked to -inf,
        so a token picks min(top_k_aux, n_dead) dead latents and the rest add 0."""
        dead = self.dead_mask()
        k_aux = min(self.cfg["top_k_aux"], pre.shape[-1])
        masked = pre.masked_fill(~dead, float("-inf"))
        vals, idx = masked.topk(k_aux, dim=-1, sorted=False)
        vals = torch.where(torch.isfinite(vals), F.relu(vals), torch.zeros_like(vals))
        f_aux = torch.zeros_like(pre).scatter_(-1, idx, vals)
        residual = residual.detach()
        err = (f_aux @ self.W_dec - residual).pow(2).sum(-1).mean()
        normalised = err / residual.pow(2).sum(-1).mean().clamp_min(1e-12)
        return torch.where(dead.any(), self.cfg["aux_penalty"] * normalised, 0.0 * normalised)

    # --- decoder constraint (SPEC §2) --------------------------------------------------

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Before the step: drop each row's gradient component along the row."""
        if self.W_dec.grad is None:
            return
        # g -= (g.w / w.w) w for each row w: two reads and one in-place pass (1.1 vs 2.8 ms at 3072 x 384)
        coef = torch.linalg.vecdot(self.W_dec.grad, self.W_dec) / torch.linalg.vecdot(self.W_dec, self.W_dec)
        self.W_dec.grad.addcmul_(self.W_dec, coef.unsqueeze(1), value=-1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """After the step: put every decoder row back on the unit sphere."""
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True)

    # --- initialisation from data (SPEC §1, §2) ----------------------------------------

    @torch.no_grad()
    def init_from_batch(self, x: Tensor, scale: float) -> None:
        """Set the input scale and b_dec = mean of the first batch, scaled. With
        standardize_tokens the scale is not the store's estimate `scale` for raw activations
        but s = sqrt(d / mean ||x_standardised||^2) over this batch (SPEC §1: E||s x||^2 = d
        for what the SAE sees; about sqrt(d / (d - 1)), as the std is unbiased)."""
        if self.cfg.get("standardize_tokens", False):
            self.scale.fill_(1.0)
            scale = math.sqrt(x.shape[-1] / self.scaled_input(x)[0].pow(2).sum(-1).mean().item())
        self.scale.fill_(scale)
        self.b_dec.copy_(self.scaled_input(x)[0].mean(dim=0))

    @torch.no_grad()
    def update_inference_state(self, f: Tensor | SparseLatents) -> None:
        """Training-only state beyond the dead counters (BatchTopK's threshold)."""

    # --- save / load -------------------------------------------------------------------

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().contiguous().cpu() if v.is_floating_point()
                   else v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, folder / WEIGHTS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(self.cfg, indent=2, default=str))


class VanillaSAE(BaseSAE):
    """ReLU + L1 penalty weighted by decoder-row norms. Its codes are sparse only once the
    L1 term has acted, so the sparse path falls back to dense while over 8% of entries fire
    (measured at d384 m3072 B4096 on 2 CPU threads, sparse vs dense step: 1% 135 vs 396 ms,
    5% 242 vs 452 ms, 8% 324 vs 355 ms, 12% 498 vs 466 ms)."""

    has_sparse_path = True
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


class TopKSAE(BaseSAE):
    """Keep each token's k largest positive pre-activations."""

    uses_aux_loss = True
    has_sparse_path = True

    def activation(self, pre: Tensor) -> Tensor:
        vals, idx = pre.topk(self.cfg["top_k"], dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, F.relu(vals))

    def select(self, xw: Tensor) -> tuple[SelectedPre, None]:
        pre = xw.add_(self.b_enc)  # a per-row selection cannot fold b_enc into a bound
        vals, idx = row_top_entries(pre, self.cfg["top_k"])
        return SelectedPre(SparsePattern.from_topk(idx, pre.shape[-1]), vals.flatten()), None


class BatchTopKSAE(BaseSAE):
    """Training: keep the k*B largest positive pre-activations of the batch.
    Inference: one learnt global threshold, f = pre * 1[pre > theta]."""

    uses_aux_loss = True
    has_sparse_path = True
    averaged_buffers = ("threshold",)  # the EMA is linear: averaging after each update averages the batch minima

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


class _JumpReLU(torch.autograd.Function):
    """f = pre * H(pre - theta); straight-through rectangle-kernel gradient for theta."""

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


class JumpReLUSAE(BaseSAE):
    """Per-latent threshold theta = exp(log_threshold), float32, L0 penalty.
    The penalty's step function is evaluated on the pre-activations (SPEC §3)."""

    has_sparse_path = True

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
        theta = self.threshold.to(pre.dtype)
        return _Step.apply(pre, theta, self.cfg["bandwidth"]).sum(-1).mean()

    def select(self, xw: Tensor) -> tuple[SelectedPre, SelectedPre]:
        """Active entries (pre > theta), and the lower half of the threshold's gradient
        window (theta - eps/2 < pre <= theta), from one pass over `xw`."""
        theta = self.threshold.to(xw.dtype)
        band = entries_above_biased(xw, self.b_enc, theta - self.cfg["bandwidth"] / 2)
        return band.split(band.pre > theta.index_select(0, band.pattern.cols))

    def latent_params(self) -> list[tuple[nn.Parameter, int]]:
        return [*super().latent_params(), (self.log_threshold, 0)]

    def sparse_activation(self, pre_vals: Tensor, pattern: SparsePattern) -> Tensor:
        # index_select: its backward is an index_add; `theta[cols]`'s sorts the indices on CPU (~50x slower here)
        theta = self.threshold.index_select(0, pattern.cols)
        return _JumpReLU.apply(pre_vals, theta, self.cfg["bandwidth"])

    def sparse_penalty(self, pre_vals: Tensor, f_vals: Tensor, pattern: SparsePattern) -> Tensor:
        theta = self.threshold.index_select(0, pattern.cols)
        return _Step.apply(pre_vals, theta, self.cfg["bandwidth"]).sum() / pattern.shape[0]


SAE_CLASSES: dict[str, type[BaseSAE]] = {
    "vanilla": VanillaSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "jumprelu": JumpReLUSAE,
}


def build_sae(cfg: dict[str, Any]) -> BaseSAE:
    return SAE_CLASSES[cfg["sae_type"]](cfg)


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> BaseSAE:
    """Load an SAE saved by `BaseSAE.save`; needs no training code."""
    folder = Path(folder)
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    sae = build_sae(cfg)
    sae.load_state_dict(load_file(folder / WEIGHTS_FILE))
    return sae.to(device).eval()
