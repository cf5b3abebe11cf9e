"""CPU sparse kernels for the SAE training step: one entry point, `sparse_forward(sae, x)`.

Same values and gradients as `BaseSAE.forward` (tests/test_sparse.py checks every variant
that states `select`), with one dense matmul (the encoder) and everything else on the
entries the variant selects: the encoder backward is a sparse (m, B) x (B, d) product, the
decoder forward and backward touch only the used rows. Why each piece is shaped as it is,
with its timings: docs/kernels.md.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


# --- the sparse training path: latents on a CSR pattern, and its autograd functions ---------------


class SparsePattern:
    """Where a batch's latents may be non-zero: entries (row, column) of a (B, m) matrix, rows
    ascending, in CSR layout (row b owns entries crow[b]:crow[b+1]; columns in any order).
    Row indices, row-major positions and the transposed layout (which the sparse backward
    passes need) are each computed once, when first asked for."""

    def __init__(self, cols: Tensor, shape: tuple[int, int], crow: Tensor | None = None,
                 flat: Tensor | None = None):
        assert crow is not None or flat is not None, \
            "a pattern needs its row starts or its positions"
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
        return cls(idx.flatten(), (b, n_latents),
                   crow=torch.arange(0, b * k + 1, k, device=idx.device))

    @property
    def crow(self) -> Tensor:
        if self._crow is None:
            # positions ascend: row b starts where b * m would be inserted (faster than a bincount)
            b, m = self.shape
            self._crow = torch.searchsorted(self._flat, torch.arange(0, (b + 1) * m, m,
                                                                     device=self._flat.device))
        return self._crow

    def rows(self) -> Tensor:
        if self._rows is None:
            if self._flat is not None:
                self._rows = self._flat.div(self.shape[1], rounding_mode="floor")
            else:
                self._rows = torch.repeat_interleave(torch.arange(self.shape[0],
                                                                  device=self.cols.device),
                                                     self.crow.diff())
        return self._rows

    def positions(self) -> Tensor:
        """Row-major positions b * m + j of the entries, in this pattern's order."""
        if self._flat is None:
            self._flat = self.rows() * self.shape[1] + self.cols
        return self._flat

    def csr(self, vals: Tensor) -> Tensor:
        return torch.sparse_csr_tensor(self.crow, self.cols, vals, self.shape,
                                       check_invariants=False)

    def csr_transposed(self, vals: Tensor) -> Tensor:
        """The (m, B) transpose holding `vals` (given in this pattern's order)."""
        if self._transposed is None:
            # the narrowest integer type sorts fastest on CPU
            narrow = (torch.int16 if self.shape[1] <= torch.iinfo(torch.int16).max + 1
                      else torch.int32)
            order = self.cols.to(narrow).argsort(stable=True)
            t_crow = torch.zeros(self.shape[1] + 1, dtype=torch.long, device=self.cols.device)
            t_crow[1:] = torch.bincount(self.cols, minlength=self.shape[1]).cumsum(0)
            self._transposed = (order, t_crow, self.rows().take(order))
        order, t_crow, t_cols = self._transposed
        return torch.sparse_csr_tensor(t_crow, t_cols, vals.take(order), self.shape[::-1],
                                       check_invariants=False)


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
        fired = f.vals.new_zeros(f.pattern.shape[1]).index_add_(0, f.pattern.cols,
                                                                (f.vals > 0).to(f.vals.dtype))
        return fired > 0  # index_add, not cols[vals > 0]: a boolean index runs a nonzero
    return (f > 0).any(dim=0)


def mean_l0(f: Tensor | SparseLatents | list[SparseLatents]) -> Tensor:
    if isinstance(f, list):  # a CLT's layers (equal batches): the mean L0 per layer
        return torch.stack([mean_l0(g) for g in f]).mean()
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
        # an SAE's pre depends on b_dec through x_in = x - b_dec (a transcoder passes no b_dec)
        grad_b_dec = -(W_enc @ grad_b_enc) if ctx.needs_input_grad[4] else None
        return None, None, grad_W_enc, grad_b_enc, grad_b_dec, None


def sampled_grad(pattern: SparsePattern, grad: Tensor, W_dec: Tensor) -> Tensor:
    """(grad @ W_dec.T) at the pattern's entries: the gradient of f there."""
    return torch.sparse.sampled_addmm(pattern.csr(grad.new_zeros(pattern.cols.shape)), grad,
                                      W_dec.T, beta=0).values()


class _SparseReconstruction(torch.autograd.Function):
    """The reconstruction loss ||e||^2 / B and the error e = f @ W_dec - x_in in the scaled
    space (x_hat_scaled - x_scaled, as x_in = x * s - b_dec), for f given as values on a
    SparsePattern: one sparse product that starts from -x_in (no separate subtraction), and
    a backward whose gradient of e is one scaled copy of e. The error is returned without
    gradient (AuxK reads it detached). x_in's dependence on b_dec is differentiated here (e's
    gradient summed over the batch); a transcoder's x_in is its goal y_s - b_dec - x_s @ W_skip
    (sparse_forward), which carries autograd for W_skip, reached through -grad. Backward samples the
    dense gradient only at the pattern and scatters W_dec's gradient into the used rows. Optional
    `zero_vals` on a second pattern are entries of f known to be 0 (they add nothing to the product
    or to W_dec's gradient) whose gradient is still wanted: JumpReLU's threshold learns from them
    through its straight-through estimator."""

    @staticmethod
    def forward(ctx, vals: Tensor, W_dec: Tensor, b_dec: Tensor, x_in: Tensor,
                pattern: SparsePattern, zero_vals: Tensor | None = None,
                zero_pattern: SparsePattern | None = None) -> tuple[Tensor, Tensor]:
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
        grad_x_in = -grad if ctx.needs_input_grad[3] else None  # for a skip transcoder's W_skip
        return grad_vals, grad_W_dec, grad_b_dec, grad_x_in, None, grad_zero_vals, None


class _NestedSparseReconstruction(torch.autograd.Function):
    """Matryoshka's loss for f given as values on a SparsePattern: the mean over nested prefixes g
    of ||e_g||^2 / B, e_g = f_{<end_g} @ W_dec - x_in. The latents are split into groups at `ends`;
    forward adds one group's sparse product at a time (e_g = e_{g-1} + f_g @ W_dec_g), so the
    prefixes cost one full product.
    Backward: a latent of group h appears in every prefix from h on, so its gradient samples
    R_h = sum_{g >= h} e_g * 2 / (G B) at its entries, and W_dec's rows of group h get f_h^T @ R_h.
    Returns (loss, the full error without gradient, each prefix's ||e_g||^2 / B without it)."""

    @staticmethod
    def forward(ctx, vals: Tensor, W_dec: Tensor, b_dec: Tensor, x_in: Tensor,
                pattern: SparsePattern, ends: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
        b, _ = pattern.shape
        group = torch.bucketize(pattern.cols, torch.tensor(ends, device=vals.device), right=True)
        assert ends[-1] == W_dec.shape[0], \
            f"groups end at {ends[-1]}, the dictionary at {W_dec.shape[0]}"
        narrow = (torch.int16 if len(ends) <= torch.iinfo(torch.int16).max
                  else torch.int32)  # sorts fastest
        order = torch.argsort(group.to(narrow), stable=True)  # entries of group 0, then 1, ...
        sizes = torch.bincount(group, minlength=len(ends)).tolist()
        rows, cols = pattern.rows().index_select(0, order), pattern.cols.index_select(0, order)
        starts, groups, errors = [0, *ends[:-1]], [], []
        for start, end, piece, g_rows, g_cols in zip(starts, ends, order.split(sizes),
                                                      rows.split(sizes), cols.split(sizes),
                                                      strict=True):
            local = SparsePattern.from_positions(g_rows * (end - start) + g_cols - start, b,
                                                 end - start)
            g_vals = vals.index_select(0, piece)
            previous, beta = (errors[-1], 1) if errors else (x_in, -1)  # prefix 0 starts at -x_in
            errors.append(torch.addmm(previous, local.csr(g_vals), W_dec[start:end], beta=beta))
            groups.append((local, piece, g_vals))
        prefix = torch.stack([torch.dot(e.view(-1), e.view(-1)) for e in errors]) / b
        terms = prefix.clone()
        ctx.save_for_backward(W_dec, *errors)
        ctx.groups, ctx.starts, ctx.ends, ctx.n_vals = groups, starts, ends, vals.shape[0]
        ctx.mark_non_differentiable(errors[-1], terms)
        return prefix.mean(), errors[-1], terms

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_error: None, _grad_prefix: None):
        W_dec, *errors = ctx.saved_tensors
        scale = (2 * grad_loss / (len(errors) * errors[0].shape[0])).item()  # the path syncs anyway
        grad_vals = grad_loss.new_empty(ctx.n_vals)
        grad_W_dec = torch.empty_like(W_dec)  # every row belongs to one group
        reach = errors[-1] * scale
        for h in reversed(range(len(errors))):  # reach = R_h: every prefix that group h is part of
            if h < len(errors) - 1:
                reach.add_(errors[h], alpha=scale)
            local, piece, g_vals = ctx.groups[h]
            rows = slice(ctx.starts[h], ctx.ends[h])
            grad_vals.index_copy_(0, piece, sampled_grad(local, reach, W_dec[rows]))
            torch.mm(local.csr_transposed(g_vals), reach, out=grad_W_dec[rows])
        grad_x_in = -reach if ctx.needs_input_grad[3] else None  # reach = R_0, every prefix's error
        return grad_vals, grad_W_dec, reach.sum(0), grad_x_in, None, None


def nested_sparse_reconstruction(vals: Tensor, W_dec: Tensor, b_dec: Tensor, x_in: Tensor,
                                 pattern: SparsePattern,
                                 ends: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """(prefix mean, the full error, each prefix's ||e_g||^2 / B): `_NestedSparseReconstruction`."""
    return _NestedSparseReconstruction.apply(vals, W_dec, b_dec, x_in, pattern, tuple(ends))


_WORKSPACES: dict[tuple[Any, ...], Tensor] = {}


def workspace(shape: tuple[int, ...], like: Tensor, dtype: torch.dtype | None = None,
              use: str = "") -> Tensor:
    """A reused scratch tensor for the sparse step's (B, m) pre-activations and masks,
    shared by every SAE of the process (each uses it only inside its own forward): a fresh
    (B, m) tensor per step costs its page faults again. One per use, shape and dtype: a group
    of SAEs with one batch and dictionary size holds three (four under bf16 autocast)."""
    key = (use, shape, dtype or like.dtype, like.device)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = torch.empty(shape, dtype=key[2], device=like.device)
    return _WORKSPACES[key]


@dataclass
class SelectedPre:
    """Pre-activation values (without gradient) at the entries of a SparsePattern."""

    pattern: SparsePattern
    pre: Tensor

    def where(self, keep: Tensor) -> SelectedPre:
        """The entries where the bool `keep` (one per entry) holds."""
        idx = keep.nonzero().squeeze(1)  # once: each boolean index would run its own nonzero
        return SelectedPre(SparsePattern.from_positions(self.pattern.positions()
                                                        .index_select(0, idx), *self.pattern.shape),
                           self.pre.index_select(0, idx))

    def split(self, first: Tensor) -> tuple[SelectedPre, SelectedPre]:
        """(the entries where the bool `first` holds, the others), each in this order: one
        stable sort of the mask (cheaper than four boolean indexings)."""
        order = torch.argsort(first.logical_not().to(torch.uint8), stable=True)
        n_first = int(first.sum())
        positions, pre = (self.pattern.positions().index_select(0, order),
                          self.pre.index_select(0, order))
        b, m = self.pattern.shape
        return (SelectedPre(SparsePattern.from_positions(positions[:n_first], b, m), pre[:n_first]),
                SelectedPre(SparsePattern.from_positions(positions[n_first:], b, m), pre[n_first:]))


# --- the entry point ------------------------------------------------------------------------------


class SparseStep(NamedTuple):
    """What `sparse_forward` computed: the fields of an SAEOutput but its total loss and input."""

    latents: SparseLatents
    recon_loss: Tensor
    sparsity_loss: Tensor
    aux_loss: Tensor
    error: Tensor
    unit: Tensor
    details: dict[str, Tensor]


def sparse_reconstruction(vals: Tensor, W_dec: Tensor, b_dec: Tensor, x_in: Tensor,
                          pattern: SparsePattern, zero_vals: Tensor | None = None,
                          zero_pattern: SparsePattern | None = None) -> tuple[Tensor, Tensor]:
    """(||e||^2 / B, e), e = f @ W_dec - x_in, f = `vals` on `pattern` (`_SparseReconstruction`)."""
    return _SparseReconstruction.apply(vals, W_dec, b_dec, x_in, pattern, zero_vals, zero_pattern)


class SparseCode(NamedTuple):
    """One SAE's sparse encoding of a batch, with gradient: pre's and f's values on its pattern,
    the penalty, the reconstruction's goal (scaled space, less b_dec and a skip path), and
    JumpReLU's gradient window (entries of f known to be 0; None for other variants)."""

    pattern: SparsePattern
    pre_vals: Tensor
    f_vals: Tensor
    penalty: Tensor
    goal: Tensor
    unit: Tensor
    window_f: Tensor | None
    window_pattern: SparsePattern | None


def sparse_code(sae, x: Tensor, target: Tensor | None = None) -> SparseCode | None:
    """The encoding half of `sparse_forward`, or None where `select` finds too many entries."""
    device = x.device.type
    low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    with torch.autocast(device, enabled=False):
        with torch.no_grad():  # the Functions differentiate x_in's and goal's dependence on b_dec
            shift, unit = sae.input_transform(x)
            if sae.transcoder:
                if target is None:
                    raise ValueError("a transcoder reconstructs its target: call sae(x, target=y)")
                x_in, unit = x.float() * unit, sae.target_scale
                goal = torch.addcmul(-sae.b_dec, target.float(), unit)
            else:
                x_in = goal = torch.addcmul(-sae.b_dec,
                                            x.float() if shift is None else x.float() - shift, unit)
            active, window = sae.select(encoder_matmul(x_in, sae.W_enc, low))
        if active is None:
            return None
        if sae.W_skip is not None:  # W_skip's gradient flows back through the goal
            goal = goal - x_in @ sae.W_skip
        pattern = active.pattern
        b_dec_in_encoder = None if sae.transcoder else sae.b_dec
        pre_vals = _SparseEncode.apply(active.pre, x_in, sae.W_enc, sae.b_enc, b_dec_in_encoder,
                                       pattern)
        f_vals, penalty = sae.sparse_activation(pre_vals, pattern)
        window_f = window_pattern = None
        if window is not None:  # f is 0 there: no gradient reaches pre, so no encoder backward
            window_pattern = window.pattern
            window_f, window_penalty = sae.sparse_activation(window.pre, window_pattern)
            penalty = penalty + window_penalty
    return SparseCode(pattern, pre_vals, f_vals, penalty, goal, unit, window_f, window_pattern)


def sparse_forward(sae, x: Tensor, aux_enabled: bool = True,
                   target: Tensor | None = None) -> SparseStep | None:
    """The training forward of `sae` (of a transcoder: from x to `target`) with sparse kernels, or
    None where the variant's `select` finds too many entries for them to pay (the caller then takes
    the dense step). Under autocast the encoder matmul runs in the autocast dtype, as on the dense
    path, the rest in float32. Reconstruction: error = f @ W_dec - goal, goal = x_scaled - b_dec for
    an SAE (the encoder's input too) and y_scaled - b_dec - x_scaled @ W_skip for a transcoder."""
    code = sparse_code(sae, x, target)
    if code is None:
        return None
    with torch.autocast(x.device.type, enabled=False):
        recon, error, details = sae.sparse_reconstruction(code.f_vals, code.goal, code.pattern,
                                                          code.window_f, code.window_pattern)
        sparsity = sae.sparsity_coeff * code.penalty
        aux = sae.sparse_aux(code, error, x, aux_enabled)
    return SparseStep(SparseLatents(code.pattern, code.f_vals.detach()), recon, sparsity, aux,
                      error, code.unit, details)


class _SparseProduct(torch.autograd.Function):
    """f @ W for f given as values on a SparsePattern (a CLT layer's writes to later layers):
    backward samples the dense gradient at the pattern (and at the optional `zero_*` entries,
    JumpReLU's window, as `_SparseReconstruction`) and scatters W's gradient into the used rows."""

    @staticmethod
    def forward(ctx, vals: Tensor, W: Tensor, pattern: SparsePattern, zero_vals: Tensor | None,
                zero_pattern: SparsePattern | None) -> Tensor:
        ctx.save_for_backward(vals, W)
        ctx.patterns = pattern, zero_pattern
        return pattern.csr(vals) @ W

    @staticmethod
    def backward(ctx, grad: Tensor):
        vals, W = ctx.saved_tensors
        pattern, zero_pattern = ctx.patterns
        grad_vals = sampled_grad(pattern, grad, W) if ctx.needs_input_grad[0] else None
        grad_W = pattern.csr_transposed(vals) @ grad if ctx.needs_input_grad[1] else None
        grad_zero = (sampled_grad(zero_pattern, grad, W)
                     if zero_pattern is not None and ctx.needs_input_grad[3] else None)
        return grad_vals, grad_W, None, grad_zero, None


class SparseCrossLayerStep(NamedTuple):
    """What `sparse_cross_layer_forward` computed, per layer where a list."""

    latents: list[SparseLatents]
    recon_losses: list[Tensor]
    sparsity_loss: Tensor
    aux_loss: Tensor
    errors: list[Tensor]
    units: list[Tensor]


def sparse_cross_layer_forward(clt, x: Tensor, target: Tensor,
                               aux_enabled: bool = True) -> SparseCrossLayerStep | None:
    """A CLT's training forward (docs/math.md §12) from each layer's sparse code: layer t's goal
    less the earlier layers' sparse writes to it, then its own sparse reconstruction, penalty and
    AuxK. None where a layer's `select` finds too many entries (the dense step is taken)."""
    codes = [sparse_code(layer, x_n, y_n)
             for layer, x_n, y_n in zip(clt.layers, x, target, strict=True)]
    if any(code is None for code in codes):
        return None
    with torch.autocast(x.device.type, enabled=False):
        goals = [code.goal for code in codes]
        for n, (code, later) in enumerate(zip(codes, clt.W_dec_later, strict=False)):
            writes = _SparseProduct.apply(code.f_vals, later.flatten(1), code.pattern,
                                          code.window_f, code.window_pattern)
            for k, part in enumerate(writes.split(later.shape[-1], dim=1)):
                goals[n + 1 + k] = goals[n + 1 + k] - part
        recons, errors = [], []
        for layer, code, goal in zip(clt.layers, codes, goals, strict=True):
            recon, error, _ = layer.sparse_reconstruction(code.f_vals, goal, code.pattern,
                                                          code.window_f, code.window_pattern)
            recons.append(recon)
            errors.append(error)
        sparsity = torch.stack([clt.sparsity_coeff * code.penalty for code in codes]).sum()
        if clt.layers[0].uses_aux_loss and aux_enabled:
            aux = torch.stack([sparse_aux_loss(layer, e, x_n) for layer, e, x_n
                               in zip(clt.layers, errors, x, strict=True)]).sum()
        else:
            aux = sparsity.new_zeros(())
    return SparseCrossLayerStep([SparseLatents(c.pattern, c.f_vals.detach()) for c in codes],
                                recons, sparsity, aux, errors, [c.unit for c in codes])


@torch.no_grad()
def encoder_matmul(x_in: Tensor, W_enc: Tensor, dtype: torch.dtype | None) -> Tensor:
    """x_in @ W_enc as float32, into the reused workspace; computed in `dtype` if given (bf16
    runs on the CPU's AMX units where it has them)."""
    shape = (x_in.shape[0], W_enc.shape[1])
    out = workspace(shape, x_in)
    if dtype is None:
        return torch.mm(x_in, W_enc, out=out)
    low = torch.mm(x_in.to(dtype), W_enc.to(dtype), out=workspace(shape, x_in, dtype))
    return out.copy_(low)


def sparse_aux_loss(sae, error: Tensor, x: Tensor) -> Tensor:
    """`sae.aux_loss` computed on the dead columns only (a dense sub-problem of n_dead latents),
    given the error x_hat_scaled - x_scaled and the raw input. Reads the dead count on the host,
    which costs nothing on CPU (the device the sparse path is chosen for)."""
    dead_cols = sae.dead_mask().nonzero().squeeze(1)
    if dead_cols.numel() == 0:
        return x.new_zeros(())
    x_scaled = sae.scaled_input(x.float())[0]
    x_in = x_scaled if sae.transcoder else x_scaled - sae.b_dec
    pre = x_in @ sae.W_enc.index_select(1, dead_cols) + sae.b_enc.index_select(0, dead_cols)
    f_aux = F.relu(pre)
    if sae.cfg["top_k_aux"] < dead_cols.numel():
        top = pre.detach().topk(sae.cfg["top_k_aux"], dim=-1, sorted=False).indices
        f_aux = f_aux * torch.zeros_like(pre, dtype=torch.bool).scatter_(-1, top, True)
    error = error.detach()  # the residual to explain is -error
    err = (f_aux @ sae.W_dec.index_select(0, dead_cols) + error).pow(2).sum(-1).mean()
    return sae.cfg["aux_penalty"] * err / error.pow(2).sum(-1).mean().clamp_min(1e-12)
