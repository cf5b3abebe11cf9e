"""The sparse training path (kernels.sparse_forward) against the dense reference
(SAE.forward): same loss terms, same latents, same gradients for every parameter."""

from __future__ import annotations

import functools

import pytest
import torch
from test_sae import B, D, M, make_cfg, rand_x

from kernels import SparseLatents, SparsePattern, encoder_matmul, fired_latents, mean_l0
from sae import SAE_CLASSES, build_sae, save_sae
from selection import batch_top_entries

SPARSE_VARIANTS = tuple(name for name, cls in SAE_CLASSES.items() if cls.has_sparse_path)
DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)  # CI has no GPU; lent ones do


def trained_like(sae_type: str, n_dead: int = 0, **overrides):
    """An SAE with non-trivial parameters (scale, biases, thresholds) and `n_dead` dead latents."""
    sae = build_sae(make_cfg(sae_type, **overrides)).train()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        sae.scale.fill_(1.7)
        sae.b_enc.copy_(0.1 * torch.randn(M, generator=gen))
        sae.b_dec.copy_(0.2 * torch.randn(D, generator=gen))
        sae.W_enc.add_(0.3 * torch.randn(D, M, generator=gen))
        # as if trained: each latent fires on ~5% (Vanilla's sparse path runs), a threshold each
        sae.start_at_density(sae.pre_activations(rand_x(seed=5) * sae.scale).quantile(0.95, dim=0))
        sae.tokens_since_fired[:n_dead] = sae.cfg["dead_after_tokens"] + 1
    sae.sparsity_coeff = 0.7
    return sae


def loss_and_grads(sae, x: torch.Tensor, sparse: bool, autocast: torch.dtype | None = None):
    """Forward (under autocast if given) and backward (outside it, as the trainer does)."""
    with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16,
                        enabled=autocast is not None):
        out = sae(x, sparse=sparse)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_dead", [0, 5, 40])  # none, fewer and more dead latents than top_k_aux=8
@pytest.mark.parametrize("sae_type", SPARSE_VARIANTS)
def test_sparse_path_equals_dense_reference(sae_type, n_dead, device):
    sae = trained_like(sae_type, n_dead).to(device)
    x = rand_x(seed=5).to(device)
    dense, dense_grads = loss_and_grads(sae, x, sparse=False)
    sparse, sparse_grads = loss_and_grads(sae, x, sparse=True)
    assert isinstance(sparse.latents, SparseLatents)
    torch.testing.assert_close(sparse.latents.dense(), dense.latents)
    for term in ("loss", "recon_loss", "sparsity_loss", "aux_loss"):
        torch.testing.assert_close(getattr(sparse, term), getattr(dense, term),
                                   rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse.x_hat, dense.x_hat, rtol=1e-5, atol=1e-5)
    if n_dead and sae.uses_aux_loss:
        assert sparse.aux_loss > 0
    for name, g in dense_grads.items():
        assert g.abs().sum() > 0, name  # every parameter learns on both paths
        torch.testing.assert_close(sparse_grads[name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_jumprelus_tanh_penalty_is_its_formula_on_both_paths():
    """sum_i tanh(c f_i), averaged over tokens; its gradient reaches theta through f."""
    sae = trained_like("jumprelu", 0, jumprelu_penalty="tanh", tanh_scale=3.0)
    x = rand_x(seed=5)
    dense, dense_grads = loss_and_grads(sae, x, sparse=False)
    sparse, sparse_grads = loss_and_grads(sae, x, sparse=True)
    torch.testing.assert_close(dense.sparsity_loss,
                               0.7 * torch.tanh(3.0 * dense.latents).sum(-1).mean())
    torch.testing.assert_close(sparse.sparsity_loss, dense.sparsity_loss, rtol=1e-5, atol=1e-6)
    assert dense_grads["log_threshold"].abs().sum() > 0
    for name, g in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], g, rtol=1e-4, atol=1e-5, msg=name)
    assert SAE_CLASSES["jumprelu"].run_tag(sae.cfg) == "l0_tanh_0.4"


@pytest.mark.parametrize("sae_type", SPARSE_VARIANTS)
def test_sparse_path_equals_dense_reference_on_standardised_tokens(sae_type):
    sae = trained_like(sae_type, n_dead=5, standardize_tokens=True)
    x = rand_x(seed=5) * torch.linspace(0.3, 3.0, rand_x().shape[0])[:, None] + 0.5
    dense, dense_grads = loss_and_grads(sae, x, sparse=False)
    sparse, sparse_grads = loss_and_grads(sae, x, sparse=True)
    torch.testing.assert_close(sparse.latents.dense(), dense.latents)
    torch.testing.assert_close(sparse.loss, dense.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse.x_hat, dense.x_hat, rtol=1e-5, atol=1e-5)
    for name, g in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], g, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("sae_type", SPARSE_VARIANTS)
def test_sparse_training_steps_track_dense_ones(sae_type):
    """Five optimiser steps, counters and BatchTopK threshold included, on each path."""
    from test_sae import train_steps

    saes = [trained_like(sae_type, n_dead=3) for _ in range(2)]
    saes[1].forward = functools.partial(saes[1].forward, sparse=True)  # the trainer calls sae(x)
    for sae in saes:
        train_steps(sae, n_steps=5)
    for (name, a), b in zip(saes[0].state_dict().items(), saes[1].state_dict().values(),
                            strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


def test_sparse_latents_helpers_match_dense():
    sae = trained_like("topk")
    out = sae(rand_x(), sparse=True)
    dense = out.latents.dense()
    assert torch.equal(fired_latents(out.latents), (dense > 0).any(0))
    torch.testing.assert_close(mean_l0(out.latents), (dense > 0).float().sum(-1).mean())
    assert mean_l0(out.latents) <= sae.cfg["top_k"]


@pytest.mark.parametrize("n", [1, 37, B * 4, B * M // 2, B * M])
def test_batch_top_entries_equals_full_selection(n):
    gen = torch.Generator().manual_seed(n)
    pre = torch.randn(B, M, generator=gen)
    pre[:, :3] = 0.5  # ties
    bias = torch.randn(M, generator=gen)
    selected = batch_top_entries(pre - bias, bias, n)
    pattern = selected.pattern
    assert torch.equal(selected.pre,
                       (pre - bias).view(-1).take(pattern.positions()) + bias.take(pattern.cols))
    pre = (pre - bias) + bias  # the values the selection saw
    relu = torch.relu(pre)
    kth = relu.flatten().topk(n).values.min()
    expected = ((relu >= kth) & (relu > 0)).nonzero().unbind(1)
    assert torch.equal(pattern.rows(), expected[0])  # rows in order; columns in a row in any order
    assert torch.equal((pattern.rows() * M + pattern.cols).sort().values,
                       expected[0] * M + expected[1])


@pytest.mark.parametrize("m", [M, 40_000])  # column indices sorted as int16, as int32 past 32768
def test_pattern_transpose_is_the_transpose(m):
    gen = torch.Generator().manual_seed(0)
    idx = torch.rand(B, m, generator=gen).topk(5, dim=-1).indices
    pattern = SparsePattern.from_topk(idx, m)
    vals = torch.randn(pattern.cols.numel(), generator=gen)
    dense = pattern.csr(vals).to_dense()
    assert torch.equal(pattern.csr_transposed(vals).to_dense(), dense.T)


def test_sparse_path_runs_under_bf16_autocast():
    sae = trained_like("batchtopk")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae(rand_x(), sparse=True)
    out.loss.backward()
    assert torch.isfinite(out.loss) and sae.W_enc.grad.dtype == torch.float32


def test_vanilla_falls_back_to_dense_while_its_codes_are_dense():
    sae = build_sae(make_cfg("vanilla")).train()  # at init about half the entries fire
    x = rand_x()
    out = sae(x, sparse=True)
    assert isinstance(out.latents, torch.Tensor) \
        and (out.latents > 0).float().mean() > sae.max_sparse_density
    torch.testing.assert_close(out.loss, sae(x).loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the fallback keeps the caller's autocast
        assert torch.equal(sae(x, sparse=True).loss, sae(x).loss)


@pytest.mark.parametrize(("rows", "cols", "k"),
                         [(64, 3072, 32), (33, 512, 16), (8, 100, 5), (16, 256, 32)])
def test_row_top_entries_is_an_exact_row_topk(rows, cols, k):
    """The grouped prefilter picks each row's k largest values (also with many ties, and
    where it falls back to a plain topk: m not a multiple of 8, or k*8*4 > m). Rows with
    fewer than k positive entries may be filled up with other entries <= 0 than topk's (f
    is 0 there either way); their positive entries are all picked."""
    from selection import row_top_entries

    gen = torch.Generator().manual_seed(rows)
    few_positive = torch.randn(rows, cols, generator=gen) - 3  # ~0.1% positive: under k per row
    few_positive[:, ::7] = -0.0
    for pre in (torch.randn(rows, cols, generator=gen),
                torch.randint(0, 5, (rows, cols), generator=gen).float(),
                torch.randint(-5, 2, (rows, cols), generator=gen).float(), few_positive):
        vals, idx = row_top_entries(pre, k)
        assert idx.shape == (rows, k)
        assert all(len(set(r.tolist())) == k for r in idx)  # k distinct columns per row
        assert torch.equal(vals, pre.gather(1, idx))  # each value is the entry at its index
        picked = vals.relu().sort(-1, descending=True).values
        torch.testing.assert_close(picked, pre.topk(k, dim=-1).values.relu())


@pytest.mark.parametrize("shape", [(64, 3072), (33, 100), (7, 5), (1, 8)])
def test_true_positions_equals_nonzero(shape):
    """The word-at-a-time search finds every set entry, in row-major order (also for
    masks whose size is not a multiple of 8, where it falls back to `nonzero`), and gives
    None exactly where more than `max_count` are set."""
    from selection import true_positions

    gen = torch.Generator().manual_seed(shape[0])
    for density in (0.0, 0.02, 0.5, 1.0):
        mask = torch.rand(shape, generator=gen) < density
        expected = mask.view(-1).nonzero().squeeze(1)
        assert torch.equal(true_positions(mask), expected)
        n = expected.numel()
        for max_count in {0, n // 2, n - 1, n, 2 * n}:  # None iff more than max_count are set
            got = true_positions(mask, max_count)
            assert got is None if n > max_count else torch.equal(got, expected)


def test_batch_top_entries_when_the_sample_overestimates():
    """Every sampled position holds a large value: the sample's bound admits fewer than n
    entries, and the looser bounds must still give the exact selection."""
    from selection import BATCH_TOP_SAMPLE_STRIDE

    gen = torch.Generator().manual_seed(0)
    pre = torch.rand(B, M, generator=gen)
    pre.view(-1)[::BATCH_TOP_SAMPLE_STRIDE] += 10
    n = B * 4
    pattern = batch_top_entries(pre, torch.zeros(M), n).pattern
    kth = pre.flatten().topk(n).values.min()
    assert torch.equal(pattern.positions(), (pre >= kth).view(-1).nonzero().squeeze(1))


def test_jumprelu_selection_splits_active_entries_from_the_gradient_window():
    sae = trained_like("jumprelu")
    with torch.no_grad():
        xw = (rand_x() * sae.scale - sae.b_dec) @ sae.W_enc
        pre = xw + sae.b_enc
        active, window = sae.select(xw.clone())
        theta, lower = sae.threshold, sae.threshold - sae.cfg["bandwidth"] / 2
    assert torch.equal(active.pattern.positions(), (pre > theta).view(-1).nonzero().squeeze(1))
    assert torch.equal(active.pre, pre.view(-1).take(active.pattern.positions()))
    in_window = (pre > lower) & (pre <= theta)
    assert in_window.any()
    # the window may also hold entries within float32 rounding below its lower edge (f = 0 there,
    # and the gradient kernel is 0 outside the window, so they add nothing)
    window_positions = window.pattern.positions()
    assert torch.equal(window.pre, pre.view(-1).take(window_positions))
    assert set(in_window.view(-1).nonzero().squeeze(1).tolist()) <= set(window_positions.tolist())
    assert (window.pre > lower.take(window.pattern.cols) - 1e-5).all()
    assert (window.pre <= theta.take(window.pattern.cols)).all()


@pytest.mark.parametrize("sae_type", SPARSE_VARIANTS)
def test_sparse_path_under_bf16_autocast_matches_the_dense_autocast_path(sae_type):
    """Under autocast the sparse path computes the encoder matmul in bf16 (as the dense
    path does) and everything after it in float32; both agree to bf16 precision."""
    sae = trained_like(sae_type)
    x = rand_x(seed=5)
    dense, dense_grads = loss_and_grads(sae, x, sparse=False, autocast=torch.bfloat16)
    sparse, sparse_grads = loss_and_grads(sae, x, sparse=True, autocast=torch.bfloat16)
    assert isinstance(sparse.latents, SparseLatents)
    torch.testing.assert_close(sparse.recon_loss, dense.recon_loss.float(), rtol=2e-2, atol=1e-3)
    fp32_pre = sae.pre_activations(x * sae.scale)
    with torch.no_grad():
        bf16_pre = encoder_matmul(x * sae.scale - sae.b_dec, sae.W_enc, torch.bfloat16) + sae.b_enc
    assert not torch.equal(bf16_pre, fp32_pre)  # the bf16 matmul did run
    for name, g in dense_grads.items():
        assert sparse_grads[name].dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(sparse_grads[name].flatten(),
                                                    g.float().flatten(), dim=0)
        assert cos > 0.98, (name, cos)


def test_encoder_gradient_arrives_in_the_weights_layout(tmp_path):
    """W_enc is stored latent-major ((m, d) memory); the sparse backward hands autograd its
    gradient in that layout, so no transposing copy is made. The layout survives save/load."""
    from sae import load_sae

    sae = trained_like("topk")
    assert sae.W_enc.stride() == (1, D)
    incoming = []
    sae.W_enc.register_hook(lambda grad: incoming.append(grad.stride()))  # before autograd saves it
    sae(rand_x(), sparse=True).loss.backward()
    assert incoming == [sae.W_enc.stride()]
    save_sae(sae, tmp_path)
    assert load_sae(tmp_path).W_enc.stride() == (1, D)


def test_entries_above_biased_never_drops_an_entry_to_rounding():
    """b_enc is folded into the bound (xw > bound - bias, loosened): every entry whose
    float32 pre = xw + bias exceeds the bound is found, also entries one ulp above a bound
    taken from the data itself, and the values read back are exactly xw + bias."""
    from selection import entries_above_biased

    gen = torch.Generator().manual_seed(0)
    xw = torch.randn(B, M, generator=gen) * 3
    bias = torch.randn(M, generator=gen) * 1e3  # large bias: bound - bias rounds coarsely
    pre = xw + bias
    for bound in (pre[0], torch.nextafter(pre[1], torch.tensor(float("-inf"))), torch.tensor(0.0)):
        selected = entries_above_biased(xw, bias, bound)
        expected = (pre > bound).view(-1).nonzero().squeeze(1)
        found = selected.pattern.positions()
        assert torch.isin(expected, found).all()
        assert torch.equal(selected.pre, pre.view(-1).take(found))
        assert found.numel() - expected.numel() <= 1e-3 * expected.numel() + B  # rounding extras


@pytest.mark.parametrize("shape", [(300, 3072), (128, 3072), (7, 5), (2000, 96)])
def test_greater_than_equals_torch_gt(shape):
    """The chunked float32 compare gives torch.gt's mask (per-latent and scalar bounds, NaN,
    ties), also where the batch has as many rows as a chunk (its scratch is its own)."""
    from kernels import workspace
    from selection import greater_than

    gen = torch.Generator().manual_seed(shape[0])
    pre = workspace(shape, torch.empty(0))  # as the step passes it: the (B, m) workspace itself
    pre.copy_(torch.randn(shape, generator=gen))
    pre.view(-1)[::97] = float("nan")
    bound = torch.randn(shape[1], generator=gen)
    pre[:, 0] = bound[0]  # ties are not above
    kept = pre.clone()
    for b in (bound, torch.tensor(0.25)):
        assert torch.equal(greater_than(pre, b), torch.gt(kept, b))
        torch.testing.assert_close(pre, kept, rtol=0, atol=0, equal_nan=True)  # pre is unchanged


def test_matryoshka_sparse_path_with_more_groups_than_a_byte_holds():
    sae = build_sae(make_cfg("matryoshka", dict_size=300,
                             matryoshka_groups=",".join(["1"] * 300))).train()
    with torch.no_grad():
        sae.scale.fill_(1.7)
        sae.W_enc.add_(0.3 * torch.randn(sae.W_enc.shape,
                                         generator=torch.Generator().manual_seed(3)))
    x = rand_x()
    dense, dense_grads = loss_and_grads(sae, x, sparse=False)
    sparse, sparse_grads = loss_and_grads(sae, x, sparse=True)
    torch.testing.assert_close(sparse.loss, dense.loss)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, rtol=1e-4, atol=1e-5)


def test_matryoshka_sparse_path_with_a_group_that_never_fires():
    sae = trained_like("matryoshka")
    with torch.no_grad():
        sae.b_enc[:4] = -1e4  # the first group (latents 0-3 of the default prefixes) gets no entry
    x = rand_x()
    dense, dense_grads = loss_and_grads(sae, x, sparse=False)
    sparse, sparse_grads = loss_and_grads(sae, x, sparse=True)
    assert isinstance(sparse.latents, SparseLatents)
    torch.testing.assert_close(sparse.loss, dense.loss)
    for name, value in sparse.details.items():
        torch.testing.assert_close(value, dense.details[name])
    for name, grad in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, rtol=1e-4, atol=1e-5)
