"""Unit tests for sae.py against docs/math.md §1-§4. Small tensors, CPU, seeded."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from config import get_default_cfg
from constraints import mark_fired, normalize_decoder, remove_parallel_decoder_grad
from kernels import fired_latents
from sae import (
    COEFFICIENT_STATE,
    SAE_CLASSES,
    BatchTopKSAE,
    JumpReLUSAE,
    build_sae,
    load_sae,
    save_sae,
)
from schedule import SparsityCoefficient

torch.set_num_threads(2)

D, M, B, K = 16, 64, 128, 4
VARIANTS = tuple(SAE_CLASSES)


# --- helpers ------------------------------------------------------------------------------


def make_cfg(sae_type: str, **overrides) -> dict:
    cfg = get_default_cfg()
    cfg.update(act_size=D, dict_size=M, sae_type=sae_type, top_k=K, top_k_aux=8, seed=0,
               dead_after_tokens=1000, bandwidth=0.5, jumprelu_init_threshold=0.3)
    cfg.update(overrides)
    return cfg


def make_sae(sae_type: str, **overrides):
    return build_sae(make_cfg(sae_type, **overrides))


def rand_x(n: int = B, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=gen, dtype=dtype)


def hand_pre(sae, x: torch.Tensor) -> torch.Tensor:
    """pre = (x*s - b_dec) W_enc + b_enc, from the parameters directly (docs/math.md §2)."""
    with torch.no_grad():
        return (x * sae.scale - sae.b_dec) @ sae.W_enc + sae.b_enc


def train_steps(sae, n_steps: int = 3, lr: float = 1e-2, seed: int = 10) -> None:
    """The trainer's step sequence (training.training_step), done by hand."""
    sae.train()
    sae.sparsity_coeff = sae.cfg[sae.coeff_key] if sae.coeff_key else 0.0
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    for i in range(n_steps):
        out = sae(rand_x(seed=seed + i))
        out.loss.backward()
        remove_parallel_decoder_grad([sae.W_dec])
        opt.step()
        opt.zero_grad(set_to_none=True)
        normalize_decoder([sae.W_dec])
        mark_fired(sae, fired_latents(out.latents), out.x.shape[0])
        sae.update_inference_state(out.latents)


def l0_per_token(f: torch.Tensor) -> torch.Tensor:
    return (f != 0).sum(-1)


# --- 1. shapes ----------------------------------------------------------------------------


@pytest.mark.parametrize("sae_type", VARIANTS)
def test_output_shapes(sae_type):
    sae = make_sae(sae_type)
    x = rand_x()
    out = sae(x)
    assert out.x_hat.shape == (B, D)
    assert out.latents.shape == (B, M)
    for loss in (out.loss, out.recon_loss, out.sparsity_loss, out.aux_loss):
        assert loss.shape == ()
    assert sae.encode(x).shape == (B, M)
    assert sae.decode(sae.encode(x)).shape == (B, D)


# --- 2. TopK ------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [0.0, -2.5])  # -2.5: many tokens have fewer than k positives
def test_topk_l0_at_most_k_and_keeps_largest(shift):
    sae = make_sae("topk")
    with torch.no_grad():
        sae.b_enc.fill_(shift)
    x = rand_x()
    f = sae.encode(x)
    assert (l0_per_token(f) <= K).all()
    assert (f >= 0).all()
    if shift < 0:
        assert (l0_per_token(f) < K).any()
    pre = hand_pre(sae, x)
    vals, idx = pre.topk(K, dim=-1)
    expected = torch.zeros_like(pre).scatter_(-1, idx, vals.clamp_min(0))
    torch.testing.assert_close(f, expected)


def test_topk_l0_exactly_k_when_all_positive():
    sae = make_sae("topk")
    with torch.no_grad():
        sae.b_enc.fill_(100.0)
    x = rand_x()
    assert (hand_pre(sae, x) > 0).all()
    assert (l0_per_token(sae.encode(x)) == K).all()


# --- 3. BatchTopK -------------------------------------------------------------------------


def test_batchtopk_training_keeps_k_times_batch():
    sae = make_sae("batchtopk")
    sae.train()
    gen = torch.Generator().manual_seed(3)
    x = rand_x() * torch.rand(B, 1, generator=gen).mul(3)  # varied token norms
    f = sae.encode(x)
    l0 = l0_per_token(f)
    assert l0.sum().item() == K * B  # batch-mean L0 is exactly k
    assert (l0 != K).any()  # but a single token's L0 varies
    assert l0.max().item() > K
    # the kept entries are the k*B largest of ReLU(pre)
    relu = hand_pre(sae, x).clamp_min(0).flatten()
    kept = f.flatten() != 0
    assert relu[kept].min() > relu[~kept].max()
    torch.testing.assert_close(f.flatten()[kept], relu[kept])


def test_batchtopk_threshold_is_ema_of_smallest_kept_value():
    sae = make_sae("batchtopk")
    sae.train()
    decay = sae.cfg["threshold_ema_decay"]
    f1, f2 = sae.encode(rand_x(seed=4)), sae.encode(rand_x(seed=5))
    smallest1, smallest2 = f1[f1 > 0].min(), f2[f2 > 0].min()
    sae.update_inference_state(f1)
    torch.testing.assert_close(sae.threshold, smallest1)
    sae.update_inference_state(f2)
    torch.testing.assert_close(sae.threshold, decay * smallest1 + (1 - decay) * smallest2)
    assert sae.threshold.dtype == torch.float32


def test_batchtopk_inference_uses_threshold_and_is_batch_independent():
    sae = make_sae("batchtopk")
    train_steps(sae)
    sae.eval()
    theta = sae.threshold.clone()
    assert theta > 0
    x = rand_x(seed=7)
    f_batch = sae.encode(x)
    pre = hand_pre(sae, x)
    torch.testing.assert_close(f_batch, pre * (pre > theta), rtol=1e-6, atol=1e-6)
    for i in (0, 5, B - 1):
        f_alone = sae.encode(x[i:i + 1])
        f_with_others = sae.encode(torch.cat([x[i:i + 1], rand_x(n=31, seed=8)]))[:1]
        torch.testing.assert_close(f_alone, f_batch[i:i + 1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(f_alone, f_with_others, rtol=1e-6, atol=1e-6)
    assert sae.threshold == theta  # encoding in eval mode does not move the threshold


# --- 4. decoder constraint ----------------------------------------------------------------


@pytest.mark.parametrize("sae_type", VARIANTS)
def test_decoder_grad_orthogonal_and_rows_unit_norm_after_step(sae_type):
    sae = make_sae(sae_type)
    sae.sparsity_coeff = 0.1
    opt = torch.optim.Adam(sae.parameters(), lr=0.05)
    sae(rand_x()).loss.backward()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(-1)
    assert parallel.abs().max() > 1e-4  # the test has something to remove
    remove_parallel_decoder_grad([sae.W_dec])
    parallel = (sae.W_dec.grad * sae.W_dec).sum(-1)
    assert parallel.abs().max() < 1e-5 * sae.W_dec.grad.norm(dim=-1).max().clamp_min(1)
    w_before = sae.W_dec.detach().clone()
    opt.step()
    normalize_decoder([sae.W_dec])
    assert not torch.equal(sae.W_dec, w_before)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(M))


# --- 5. aux loss --------------------------------------------------------------------------


def hand_aux_loss(sae, residual, pre):
    """docs/math.md §4 written per token: top k_aux dead pre-activations, decoded without b_dec."""
    dead_idx = sae.dead_mask().nonzero().squeeze(-1)
    k_aux = min(sae.cfg["top_k_aux"], len(dead_idx))
    f_aux = torch.zeros_like(pre)
    for b in range(pre.shape[0]):
        top = pre[b, dead_idx].topk(k_aux)
        f_aux[b, dead_idx[top.indices]] = top.values.clamp_min(0)
    err = (residual - f_aux @ sae.W_dec).pow(2).sum(-1).mean()
    return sae.cfg["aux_penalty"] * err / residual.pow(2).sum(-1).mean()


@pytest.mark.parametrize("sae_type", [n for n, c in SAE_CLASSES.items() if c.uses_aux_loss])
def test_aux_loss_exactly_zero_without_dead_latents(sae_type):
    sae = make_sae(sae_type)
    x = rand_x()
    assert not sae.dead_mask().any()
    out = sae(x)
    assert out.aux_loss.item() == 0.0
    residual = torch.randn(B, D)
    assert sae.aux_loss(residual, hand_pre(sae, x)).item() == 0.0


@pytest.mark.parametrize("n_dead", [3, 40])  # fewer / more dead latents than top_k_aux=8
def test_aux_loss_positive_and_matches_spec_with_dead_latents(n_dead):
    sae = make_sae("topk")
    with torch.no_grad():
        sae.tokens_since_fired[:n_dead] = sae.cfg["dead_after_tokens"] + 1
    assert sae.dead_mask().sum() == n_dead
    x = rand_x() + 2.0
    sae.init_from_batch(x, 1.5)  # nonzero b_dec: the aux decode must leave it out
    out = sae(x)
    assert out.aux_loss.item() > 0
    pre = hand_pre(sae, x)
    residual = (x * sae.scale - (out.latents @ sae.W_dec + sae.b_dec)).detach()
    with torch.no_grad():
        torch.testing.assert_close(out.aux_loss, hand_aux_loss(sae, residual, pre))
    # the sum of main and aux losses is the loss
    torch.testing.assert_close(out.loss, out.recon_loss + out.sparsity_loss + out.aux_loss)


def test_aux_loss_detaches_residual():
    sae = make_sae("topk")
    with torch.no_grad():
        sae.tokens_since_fired[:10] = sae.cfg["dead_after_tokens"] + 1
    residual = torch.randn(B, D, requires_grad=True)
    aux = sae.aux_loss(residual, sae.pre_activations(rand_x()))
    aux.backward()
    assert residual.grad is None
    assert sae.W_dec.grad is not None and sae.W_dec.grad.abs().sum() > 0
    assert sae.W_enc.grad.abs().sum() > 0  # the dead latents' encoder learns from it


# --- 6. dead counters ---------------------------------------------------------------------


def test_update_dead_counters_counts_tokens_and_resets_fired():
    sae = make_sae("topk")
    with torch.no_grad():
        sae.tokens_since_fired.copy_(torch.arange(M) * 7)
    f = torch.zeros(5, M)
    fired = torch.tensor([0, 3, 10, 63])
    f[torch.tensor([0, 1, 4, 2]), fired] = torch.tensor([0.5, 1.0, 2.0, 0.1])
    f[3, 20] = -1.0  # a negative value is not firing
    before = sae.tokens_since_fired.clone()
    mark_fired(sae, fired_latents(f), f.shape[0])
    expected = before + 5
    expected[fired] = 0
    assert torch.equal(sae.tokens_since_fired, expected)


@pytest.mark.parametrize("sae_type", VARIANTS)
def test_dead_counters_updated_in_training_untouched_by_evaluation(sae_type):
    sae = make_sae(sae_type)
    with torch.no_grad():
        sae.b_enc[0] = -100.0  # latent 0 can never fire
    train_steps(sae, n_steps=2)
    counters = sae.tokens_since_fired.clone()
    assert counters[0] == 2 * B  # training counts its tokens (all variants do, docs/math.md §4)
    assert (counters[1:] < 2 * B).any()
    sae.eval()
    with torch.no_grad():
        sae.encode(rand_x(seed=20))
        sae(rand_x(seed=21))
    assert torch.equal(sae.tokens_since_fired, counters)


# --- 7. JumpReLU straight-through gradients -----------------------------------------------


def smoothed_l0(pre, theta, eps):
    """Σ_i H(pre - θ_i) with H replaced by its rectangle-kernel integral, batch-averaged."""
    return ((pre - theta) / eps + 0.5).clamp(0, 1).sum(-1).mean()


def jumprelu_setup():
    sae = make_sae("jumprelu", bandwidth=0.5)
    gen = torch.Generator().manual_seed(11)
    theta = 0.2 + torch.rand(M, generator=gen)
    with torch.no_grad():
        sae.log_threshold.copy_(theta.log())
    pre = (torch.randn(B, M, generator=gen) * 1.5).requires_grad_(True)
    g = torch.randn(B, M, generator=gen)
    return sae, pre, theta, g


def test_jumprelu_forward_is_exact():
    sae, pre, theta, _ = jumprelu_setup()
    assert sae.threshold.dtype == torch.float32
    torch.testing.assert_close(sae.threshold, theta)
    f = sae.activation(pre)
    assert torch.equal(f, pre.detach() * (pre.detach() > theta))
    assert torch.equal(sae.sparsity_penalty(pre, f), (pre.detach() > theta).float().sum(-1).mean())


def test_jumprelu_gradients_match_spec_formulas():
    sae, pre, theta, g = jumprelu_setup()
    eps, c = sae.cfg["bandwidth"], 0.7
    in_window = ((pre.detach() - theta).abs() < eps / 2).float()
    assert 0 < in_window.mean() < 0.5  # some but not all values inside the window
    f = sae.activation(pre)
    loss = (g * f).sum() + c * sae.sparsity_penalty(pre, f)
    loss.backward()

    d_theta_f = (g * -(theta / eps) * in_window).sum(0)
    d_theta_l0 = c * (-(1 / eps) * in_window).sum(0) / B  # the penalty is a batch mean
    expected_log = theta * (d_theta_f + d_theta_l0)  # chain rule for log θ
    torch.testing.assert_close(sae.log_threshold.grad, expected_log, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pre.grad, g * (pre.detach() > theta).float())


def test_jumprelu_preact_loss_matches_its_formula_on_dead_latents_only():
    sae, _, theta, _ = jumprelu_setup()
    sae.cfg["preact_coeff"], sae.uses_aux_loss = 0.3, True
    sae.train()
    x = rand_x()
    assert torch.equal(sae(x).aux_loss, torch.zeros(()))  # no dead latents: exactly 0
    dead = torch.zeros(M, dtype=torch.bool)
    dead[::3] = True
    sae.tokens_since_fired[dead] = sae.cfg["dead_after_tokens"] + 1
    out = sae(x)
    pre = hand_pre(sae, x)
    expected = 0.3 * ((theta - pre).clamp_min(0) * dead).sum(-1).mean()
    torch.testing.assert_close(out.aux_loss, expected)
    assert out.aux_loss > 0
    sae.zero_grad()
    out.aux_loss.backward()
    # it moves only the dead latents: their encoder columns and thresholds, no live one's
    assert sae.W_enc.grad[:, ~dead].abs().max() == 0 and sae.W_enc.grad[:, dead].abs().max() > 0
    assert sae.log_threshold.grad[~dead].abs().max() == 0
    assert (sae.log_threshold.grad[dead] >= 0).all()  # descent lowers theta


def test_jumprelu_preact_loss_takes_the_dense_step():
    sae = make_sae("jumprelu", preact_coeff=0.3)
    sae.train()
    sae.tokens_since_fired[:8] = sae.cfg["dead_after_tokens"] + 1
    x = rand_x()
    dense, sparse = sae(x), sae(x, sparse=True)
    assert isinstance(sparse.latents, torch.Tensor)  # not the sparse path's SparseLatents
    assert torch.equal(dense.loss, sparse.loss) and dense.aux_loss > 0


def test_jumprelu_l0_gradient_matches_finite_difference_of_smoothed_step():
    sae, pre, theta, _ = jumprelu_setup()
    eps, c = sae.cfg["bandwidth"], 0.7
    pre64 = pre.detach().double()
    (c * sae.sparsity_penalty(pre, sae.activation(pre))).backward()

    log_theta = theta.double().log()
    h = 1e-6
    fd = torch.empty(M, dtype=torch.float64)
    for i in range(M):
        up, down = log_theta.clone(), log_theta.clone()
        up[i] += h
        down[i] -= h
        fd[i] = c * (smoothed_l0(pre64, up.exp(), eps)
                     - smoothed_l0(pre64, down.exp(), eps)) / (2 * h)
    assert fd.abs().max() > 0.01
    torch.testing.assert_close(sae.log_threshold.grad.double(), fd, rtol=1e-4, atol=1e-5)


# --- 8. input scale folded into encode/decode ---------------------------------------------


@pytest.mark.parametrize("sae_type", VARIANTS)
def test_scale_is_applied_in_encode_and_undone_in_decode(sae_type):
    sae = make_sae(sae_type)
    sae.eval()
    s = 3.7
    x = rand_x() / s * 2
    sae.init_from_batch(x, s)
    assert sae.scale.item() == pytest.approx(s)
    torch.testing.assert_close(sae.b_dec.detach(), (x * s).mean(0))

    out = sae(x)
    f = sae.encode(x)
    torch.testing.assert_close(out.latents, f)
    torch.testing.assert_close(out.x_hat, sae.decode(f))
    with torch.no_grad():
        pre = sae.pre_activations(x * s)
        if sae_type != "hardconcrete":  # its pre holds its gate beside its magnitude path
            torch.testing.assert_close(pre, (x * s - sae.b_dec) @ sae.W_enc + sae.b_enc)
        kept = sae.activation(pre)
        assert torch.equal(f, kept)  # encode is the activation of the scaled input's pre
        if sae_type != "hardconcrete":  # its inference gate is fractional
            assert (f[f != 0] == pre[f != 0]).all()  # the others pass kept values through
        x_hat_scaled = f @ sae.W_dec + sae.b_dec
        torch.testing.assert_close(out.x_hat, x_hat_scaled / s)
        # the loss is in the scaled space (docs/math.md §1): the error, and the full error's loss
        torch.testing.assert_close(out.error, x_hat_scaled - x * s)
        full = out.details.get(f"recon_loss_prefix_{M}", out.recon_loss)
        torch.testing.assert_close(full, (x * s - x_hat_scaled).pow(2).sum(-1).mean())


@pytest.mark.parametrize("sae_type", VARIANTS)
def test_rescaling_input_and_scale_gives_same_latents(sae_type):
    sae = make_sae(sae_type)
    sae.eval()
    x = rand_x(dtype=torch.float64)
    sae.double()
    sae.init_from_batch(x, 3.7)
    f1, x_hat1 = sae.encode(x), sae(x).x_hat
    c = 5.0
    with torch.no_grad():
        sae.scale /= c
    f2, x_hat2 = sae.encode(x * c), sae(x * c).x_hat
    torch.testing.assert_close(f2, f1)
    torch.testing.assert_close(x_hat2, x_hat1 * c)


def affine_tokens(x: torch.Tensor, seed: int = 2) -> torch.Tensor:
    """x with each token scaled by its own factor in [0.2, 5] and shifted by its own offset."""
    gen = torch.Generator().manual_seed(seed)
    a = 0.2 * 25 ** torch.rand(x.shape[0], 1, generator=gen, dtype=x.dtype)
    return x * a + torch.randn(x.shape[0], 1, generator=gen, dtype=x.dtype)


@pytest.mark.parametrize("sae_type", VARIANTS)
def test_standardised_tokens_match_a_plain_sae_on_standardised_input(sae_type):
    """standardize_tokens (docs/math.md §1): the SAE sees (x - mean) / (std + eps) per token and
    the reconstruction gets each token's mean and std + eps back; the loss is in that space."""
    std_sae = make_sae(sae_type, standardize_tokens=True).double().eval()
    plain = make_sae(sae_type).double().eval()
    x = affine_tokens(rand_x(dtype=torch.float64))
    mean, std = x.mean(-1, keepdim=True), x.std(-1, keepdim=True) + 1e-5
    x_n = (x - mean) / std
    std_sae.init_from_batch(x, 99.0)  # the store's raw-space estimate does not apply
    assert (x_n * std_sae.scale).pow(2).sum(-1).mean().item() == pytest.approx(D)  # E||s x||^2 = d
    plain.load_state_dict(std_sae.state_dict())
    torch.testing.assert_close(std_sae.b_dec.detach(), (x_n * std_sae.scale).mean(0))
    a, b = std_sae(x), plain(x_n)
    torch.testing.assert_close(a.latents, b.latents)
    torch.testing.assert_close(a.recon_loss, b.recon_loss)
    torch.testing.assert_close(a.x_hat, b.x_hat * std + mean)
    torch.testing.assert_close(std_sae.decode(std_sae.encode(x), x), a.x_hat)


@pytest.mark.parametrize("sae_type", VARIANTS)
def test_standardised_sae_latents_ignore_each_tokens_scale_and_offset(sae_type):
    sae = make_sae(sae_type, standardize_tokens=True).double().eval()
    x = rand_x(dtype=torch.float64)
    sae.init_from_batch(x, 1.0)
    moved = affine_tokens(x)
    f = sae.encode(x)
    assert 0 < (f != 0).double().mean() < 1
    torch.testing.assert_close(sae.encode(moved), f, rtol=1e-4, atol=1e-4)  # up to the std's eps
    gain = moved.std(-1, keepdim=True) / x.std(-1, keepdim=True)  # x_hat: each token's affine map
    shift = moved.mean(-1, keepdim=True) - gain * x.mean(-1, keepdim=True)
    torch.testing.assert_close(sae(moved).x_hat, sae(x).x_hat * gain + shift, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"decode\(f, x\) needs the raw input x"):
        sae.decode(f)


# --- 9. save / load -----------------------------------------------------------------------


@pytest.mark.parametrize("sae_type", VARIANTS)
def test_save_load_round_trip(sae_type, tmp_path):
    sae = make_sae(sae_type)
    sae.init_from_batch(rand_x(seed=30), 3.7)
    train_steps(sae, n_steps=3)
    if isinstance(sae, BatchTopKSAE):
        assert sae.threshold > 0
    if isinstance(sae, JumpReLUSAE):
        assert not torch.allclose(sae.threshold, torch.full((M,), 0.3))
    sae.eval()
    save_sae(sae, tmp_path / "ckpt")
    loaded = load_sae(tmp_path / "ckpt")

    assert not loaded.training
    assert type(loaded) is type(sae)
    assert loaded.scale.item() == pytest.approx(3.7)
    original = sae.state_dict()
    assert set(loaded.state_dict()) == set(original)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, original[key]), key
    if isinstance(sae, JumpReLUSAE):
        assert torch.equal(loaded.threshold, sae.threshold)
    x = rand_x(seed=31)
    with torch.no_grad():
        a, b = sae(x), loaded(x)
    assert torch.equal(a.latents, b.latents)
    assert torch.equal(a.x_hat, b.x_hat)


# --- 10. b_enc gets a gradient ------------------------------------------------------------


@pytest.mark.parametrize("sae_type", VARIANTS)
def test_b_enc_receives_gradient(sae_type):
    sae = make_sae(sae_type)
    sae.sparsity_coeff = 0.1
    x = rand_x()
    if sae_type == "jumprelu":
        assert (hand_pre(sae, x) > sae.threshold).any()
    sae(x).loss.backward()
    assert sae.b_enc.grad is not None
    assert sae.b_enc.grad.abs().sum() > 0


# --- 11. vanilla L1 penalty ---------------------------------------------------------------


def test_vanilla_sparsity_penalty_weights_by_decoder_norms():
    sae = make_sae("vanilla")
    gen = torch.Generator().manual_seed(12)
    with torch.no_grad():  # rows off unit norm, so the norm factor matters
        sae.W_dec.mul_(0.5 + 2 * torch.rand(M, 1, generator=gen))
    sae.sparsity_coeff = sae.cfg["l1_coeff"]
    x = rand_x()
    out = sae(x)
    f = hand_pre(sae, x).clamp_min(0)
    expected = sae.cfg["l1_coeff"] * (f * sae.W_dec.detach().norm(dim=-1)).sum(-1).mean()
    torch.testing.assert_close(out.sparsity_loss, expected)
    assert out.aux_loss.item() == 0.0
    torch.testing.assert_close(out.loss, out.recon_loss + out.sparsity_loss)


# --- Matryoshka -----------------------------------------------------------------------------


@pytest.mark.parametrize("groups,ends", [("", [4, 8, 16, 32, 64]), ("8,24,32", [8, 32, 64])])
def test_matryoshka_loss_averages_every_prefix_reconstruction(groups, ends):
    sae = make_sae("matryoshka", matryoshka_groups=groups).train()
    x = rand_x()
    out = sae(x, aux_enabled=False)
    f, xs = out.latents.detach(), x * sae.scale
    with torch.no_grad():  # each prefix: b_dec plus the latents before its end, vs the scaled input
        errors = [(f[:, :end] @ sae.W_dec[:end] + sae.b_dec - xs).pow(2).sum(-1).mean()
                  for end in ends]
    assert sorted(out.details) == sorted(f"recon_loss_prefix_{end}" for end in ends)
    for end, err in zip(ends, errors, strict=True):
        torch.testing.assert_close(out.details[f"recon_loss_prefix_{end}"], err)
    torch.testing.assert_close(out.recon_loss, torch.stack(errors).mean())
    assert l0_per_token(f).float().mean() == pytest.approx(K, rel=0.05)  # BatchTopK on all latents


def test_gated_forward_and_gradients_equal_the_papers_two_paths():
    """Rajamanoharan et al. 2024, written out with a second matmul: pi_gate = x_in W_gate + b_gate,
    pi_mag = x_in (W_gate * exp(r_mag)) + b_mag, f = 1[pi_gate > 0] relu(pi_mag); loss
    ||x - x_hat||^2 + lambda sum relu(pi_gate) ||d_i|| + ||x - (relu(pi_gate) W_dec' + b_dec')||^2
    with W_dec', b_dec' frozen copies."""
    sae = make_sae("gated").train()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        sae.scale.fill_(1.3)
        sae.b_enc.copy_(0.3 * torch.randn(M, generator=gen))
        sae.b_dec.copy_(0.2 * torch.randn(D, generator=gen))
        sae.r_mag.copy_(0.4 * torch.randn(M, generator=gen))
        sae.b_mag.copy_(0.5 * torch.randn(M, generator=gen))
        sae.W_dec.mul_(1 + 0.5 * torch.rand(M, 1, generator=gen))  # norms other than 1 count
    sae.sparsity_coeff = 0.7
    x = rand_x()
    params = dict(sae.named_parameters())
    x_in = x * sae.scale - params["b_dec"]
    pi_gate = x_in @ params["W_enc"] + params["b_enc"]
    pi_mag = x_in @ (params["W_enc"] * params["r_mag"].exp()) + params["b_mag"]
    f = (pi_gate > 0) * F.relu(pi_mag)
    goal = x * sae.scale
    recon = (f @ params["W_dec"] + params["b_dec"] - goal).pow(2).sum(-1).mean()
    l1 = 0.7 * (F.relu(pi_gate) * params["W_dec"].norm(dim=-1)).sum(-1).mean()
    via_gate = F.relu(pi_gate) @ params["W_dec"].detach() + params["b_dec"].detach() - goal
    aux = via_gate.pow(2).sum(-1).mean()
    grads = torch.autograd.grad(recon + l1 + aux, list(params.values()))
    out = sae(x)
    torch.testing.assert_close(out.latents, f, rtol=1e-5, atol=1e-6)
    assert 0 < (out.latents > 0).float().mean() < 1
    for name, ours, ref in (("recon", out.recon_loss, recon), ("l1", out.sparsity_loss, l1),
                            ("aux", out.aux_loss, aux)):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6, msg=name)
    ours = torch.autograd.grad(out.loss, list(params.values()), retain_graph=True)
    for name, g_ours, g_ref in zip(params, ours, grads, strict=True):
        assert g_ref.abs().sum() > 0, name
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-5, msg=name)
    # the reconstruction trains the magnitudes, never the gate's bias
    g_b_gate = torch.autograd.grad(out.recon_loss, sae.b_enc, retain_graph=True)[0]
    assert g_b_gate.abs().max() < 1e-6
    sae.eval()
    assert torch.equal(sae(x).aux_loss, torch.zeros(()))  # evaluation: the loss of the model alone


def test_matryoshka_groups_must_be_non_empty_and_add_up():
    from config import ConfigError, prepare_cfg

    dims = {"d_model": D, "n_layers": 4, "n_ctx": 512}
    for bad in ("32,16", "32,0,32", "a,b", "\u00b2,62"):  # superscript 2 is a digit to str.isdigit
        with pytest.raises(ConfigError, match="matryoshka_groups"):
            prepare_cfg(make_cfg("matryoshka", matryoshka_groups=bad), dims)
    prepare_cfg(make_cfg("matryoshka", matryoshka_groups="16, 48"), dims)


# --- target_l0 ------------------------------------------------------------------------------


def test_target_l0_moves_the_coefficient_towards_the_target_by_a_bounded_factor():
    sae = make_sae("jumprelu", target_l0=8.0, target_l0_rate=0.1, sparsity_warmup_frac=0.0)
    coeff = SparsityCoefficient(sae)
    assert coeff.at(0, 100) == pytest.approx(sae.cfg["l0_coeff"])
    dense = torch.ones(B, M)  # L0 64, far above 8: the ratio's log is clipped to 1
    coeff.adapt(dense, 0, 100)
    assert coeff.state["coeff_scale"].item() == pytest.approx(math.exp(0.1))
    sparse = torch.zeros(B, M)
    sparse[:, :4] = 1.0  # L0 4: half the target
    coeff.adapt(sparse, 1, 100)
    assert coeff.state["coeff_scale"].item() == pytest.approx(math.exp(0.1) * 0.5 ** 0.1)
    # JumpReLU's coefficient also answers the latest error: L0 is half the target, log 0.5 = -0.69
    damped = coeff.state["coeff_scale"].item() + sae.coeff_damping * math.log(0.5)
    assert sae.coeff_damping > 0 and damped < 0  # a reward to fire, until L0 comes up
    assert float(coeff.at(50, 100)) == pytest.approx(sae.cfg["l0_coeff"] * damped)
    assert set(coeff.state) == set(COEFFICIENT_STATE)  # checkpoints save both
    assert SparsityCoefficient(make_sae("jumprelu")).state == {}  # off by default: nothing added
    reloaded = SparsityCoefficient(make_sae("jumprelu", target_l0=8.0))
    reloaded.state["l0_error"].fill_(0.5)
    reloaded.load({"coeff_scale": coeff.state["coeff_scale"]})  # saved before damping existed
    assert reloaded.state["l0_error"].item() == 0
    assert reloaded.state["coeff_scale"].item() == coeff.state["coeff_scale"].item()
    vanilla = SparsityCoefficient(make_sae("vanilla", target_l0=8.0, target_l0_rate=0.1,
                                           sparsity_warmup_frac=0.0))
    vanilla.adapt(sparse, 1, 100)  # no damping: the running factor alone
    assert "l0_error" not in vanilla.state
    assert float(vanilla.at(50, 100)) \
        == pytest.approx(make_sae("vanilla").cfg["l1_coeff"] * 0.5 ** 0.1)
    own_sae = make_sae("vanilla", target_l0=8.0, sparsity_warmup_frac=0.0)  # rate 0 = Vanilla's own
    own = SparsityCoefficient(own_sae)
    rate, rise = type(own_sae).coeff_rate, type(own_sae).coeff_rise_clip
    assert rise < 1  # L0 far above target (log 8 / 1 clipped to 1): rises by e^(rate * rise) only
    own.adapt(dense, 0, 100)
    assert own.state["coeff_scale"].item() == pytest.approx(math.exp(rate * rise))
    own.adapt(sparse, 1, 100)  # and falls unclipped
    assert own.state["coeff_scale"].item() == pytest.approx(math.exp(rate * rise) * 0.5 ** rate)


def test_target_l0_is_refused_where_k_sets_the_l0():
    from config import ConfigError, prepare_cfg

    dims = {"d_model": D, "n_layers": 4, "n_ctx": 512}
    with pytest.raises(ConfigError, match="target_l0=8.0 is invalid: "
                                          "sae_type=topk has no sparsity coefficient"):
        prepare_cfg(make_cfg("topk", target_l0=8.0), dims)
    with pytest.raises(ConfigError,
                       match=r"target_l0=100.0 is invalid: must be <= dict_size \(64\)"):
        prepare_cfg(make_cfg("vanilla", target_l0=100.0), dims)
    with pytest.raises(ConfigError, match="target_l0=8.0 is invalid: scales l1_coeff, which is 0"):
        prepare_cfg(make_cfg("vanilla", target_l0=8.0, l1_coeff=0.0), dims)
    assert "_target8_" in prepare_cfg(make_cfg("vanilla", target_l0=8.0), dims)["run_name"]
