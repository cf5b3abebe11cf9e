"""Selection: the entries of a (B, m) product a variant keeps (its `select`), found without sorting
or listing it all; the sparse path's CPU fast paths, each equal to its torch reference in tests."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kernels import SelectedPre, SparsePattern, workspace


@torch.no_grad()
def row_top_entries(pre: Tensor, k: int, group: int = 8) -> tuple[Tensor, Tensor]:
    """Values and column indices (B, k) of each row's k largest entries (any order), as
    `topk` picks them up to ties and to which entries <= 0 fill a row with fewer than k
    positive ones (f is 0 there and so is its gradient: nothing downstream can tell). On CPU
    through a prefilter: columns j, j+G, j+2G, ... (G = m / group) form a group, and every
    entry among a row's k largest lies in one of the k groups with the largest maxima, so the
    exact topk runs over k*group candidates instead of m. Both topks order the float bits as
    int32, which orders positive floats as floats and puts them above every negative one, and
    skips ATen's NaN checks. CUDA's topk is fast as it is."""
    b, m = pre.shape
    if pre.is_cuda or m % group or 4 * k * group > m or pre.dtype != torch.float32:
        return pre.topk(k, dim=-1, sorted=False)
    n_groups = m // group
    blocks = pre.view(b, group, n_groups)
    top_groups = blocks.amax(1).view(torch.int32).topk(k, dim=-1, sorted=False).indices
    candidates = blocks.gather(2, top_groups.unsqueeze(1).expand(b, group, k)).view(b, group * k)
    # candidate j * k + i is column top_groups[i] + j * n_groups
    vals, pick = candidates.view(torch.int32).topk(k, dim=-1, sorted=False)
    return (vals.view(torch.float32),
            top_groups.gather(1, pick % k) + n_groups * pick.div(k, rounding_mode="floor"))


def true_positions(mask: Tensor, max_count: int | None = None) -> Tensor | None:
    """Row-major positions of the True entries of a contiguous bool tensor, as
    `mask.view(-1).nonzero()` gives them, or None where more than `max_count` are True. On
    CPU 8 entries at a time: `nonzero` over the mask's 8-byte words, then over the bytes of
    the words that are not 0; most words of a sparse mask are 0. More than `max_count` words
    not 0 means more than `max_count` entries, so a dense mask is given up before its bytes are
    listed."""
    flat = mask.view(-1)
    if flat.is_cuda or flat.numel() % 8 or flat.data_ptr() % 8:
        positions = flat.nonzero().squeeze(1)
    else:
        words = flat.view(torch.int64)
        word_idx = words.nonzero().squeeze(1)
        if max_count is not None and word_idx.numel() > max_count:
            return None
        word, byte = (words.index_select(0, word_idx).view(torch.uint8).view(-1, 8).nonzero()
                      .unbind(1))
        positions = word_idx.index_select(0, word) * 8 + byte
    return None if max_count is not None and positions.numel() > max_count else positions


COMPARE_SCRATCH_BYTES = 3 << 19  # float32 compare results per chunk (1.5 MiB): stays in cache


def greater_than(pre: Tensor, bound: Tensor) -> Tensor:
    """pre > bound (a scalar or one per latent) as a bool tensor in a workspace. On CPU the
    comparison is written as float32 (vectorised) and cast to bool (vectorised), a few rows at
    a time through a small scratch: ATen compares into a bool output one element at a time
    (about half the time of the direct compare)."""
    mask = workspace(pre.shape, pre, torch.bool)
    if pre.device.type != "cpu" or pre.dtype != torch.float32:
        return torch.gt(pre, bound, out=mask)
    rows = max(1, COMPARE_SCRATCH_BYTES // (4 * pre.shape[1]))
    # never the (B, m) workspace, even if B == rows
    scratch = workspace((rows, pre.shape[1]), pre, use="compare")
    for start in range(0, pre.shape[0], rows):
        chunk = pre[start:start + rows]
        mask[start:start + rows].copy_(torch.gt(chunk, bound, out=scratch[: chunk.shape[0]]))
    return mask


def entries_above(pre: Tensor, bound: Tensor, max_count: int | None = None) -> SparsePattern | None:
    """The entries of `pre` (B, m) greater than `bound` (a scalar or one per latent), or
    None where there are more than `max_count`."""
    above = greater_than(pre, bound)
    positions = true_positions(above, max_count)
    return (None if positions is None
            else SparsePattern.from_positions(positions, pre.shape[0], pre.shape[1]))


def entries_above_biased(xw: Tensor, bias: Tensor, bound: Tensor,
                         max_count: int | None = None) -> SelectedPre | None:
    """The entries where pre = xw + bias (bias one per latent) exceeds `bound` (a scalar or
    one per latent), with their values of pre, found without forming pre over all of xw
    (None where there are more than `max_count`): xw is compared with bound - bias,
    loosened by 1e-6 relative so that rounding never drops an entry (float32 rounds each
    sum to within 6e-8 relative). So it may also hold entries within that slack at or below
    the bound; callers that need the exact set compare the returned values (Gated masks its
    magnitudes by pre > 0; where f is 0 there anyway, nothing needs to)."""
    slack = 1e-6 * (bound.abs() + bias.abs()) + 1e-30
    pattern = entries_above(xw, bound - bias - slack, max_count)
    if pattern is None:
        return None
    return SelectedPre(pattern,
                       xw.view(-1).take(pattern.positions()) + bias.index_select(0, pattern.cols))


# Prime, so the strided sample visits every latent unless m is a multiple of it (docs/kernels.md).
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
        n_above = (int((candidates.pre >= bound).sum()) if bound > 0
                   else int((candidates.pre > 0).sum()))
        if n_above >= n or bound == 0:
            break
    vals = candidates.pre  # every entry >= bound, so the n largest if n_above >= n
    lowest = kth_largest(vals, n) if n_above > n else bound
    return candidates.where((vals >= lowest) & (vals > 0))


def kth_largest(values: Tensor, k: int) -> Tensor:
    """The k-th largest entry of a 1-D tensor: kthvalue on CPU, topk on CUDA (each the faster
    there; same value either way)."""
    if values.is_cuda:
        return values.topk(k, sorted=False).values.min()
    return values.kthvalue(values.numel() - k + 1).values
