"""Hard Concrete L0 (sae.HardConcreteSAE, docs/math.md §3): the stochastic gate against its
formula and its distribution, the expected-L0 penalty, the inference gate, the temperature
schedules, its own random stream, and a stopped run resuming bitwise."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from config import get_default_cfg
from sae import HC_CUT, HC_GAMMA, HC_ZETA, HardConcreteSAE, beta_at, build_sae

D, M, B = 16, 64, 256


def make_hc(**overrides) -> HardConcreteSAE:
    cfg = get_default_cfg() | {"act_size": D, "dict_size": M, "sae_type": "hardconcrete",
                               "seed": 3} | overrides
    sae = build_sae(cfg)
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        sae.b_gate.copy_(torch.randn(M, generator=gen))
        sae.W_gate.add_(0.3 * torch.randn(D, M, generator=gen))
        sae.b_enc.copy_(0.5 * torch.randn(M, generator=gen))
    return sae


def paths(sae: HardConcreteSAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log alpha and pi_mag written out from the raw input."""
    x_in = x * sae.scale - sae.b_dec
    return x_in @ sae.W_gate + sae.b_gate, x_in @ sae.W_enc + sae.b_enc


def test_its_pre_activations_are_the_gate_beside_the_untied_magnitude():
    sae = make_hc()
    x = rand_x()
    log_alpha, mag = paths(sae, x)
    pre = sae.pre_activations(x * sae.scale)
    assert pre.shape == (B, 2 * M)
    torch.testing.assert_close(pre, torch.cat([log_alpha, mag], -1))
    assert sae.encode(x).shape == (B, M)
    sae.train()
    sae.sparsity_penalty(sae.pre_activations(x * sae.scale), None).backward()
    assert sae.W_enc.grad.abs().max() == 0 and sae.W_gate.grad.abs().max() > 0  # untied


def rand_x(n: int = B, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def test_the_training_gate_is_the_stretched_clamped_concrete_sample():
    sae = make_hc(hc_beta=0.5).train()
    sae.load_state_dict(sae.state_dict() | {"gate_step": torch.tensor(7)})  # as a resume sets it
    assert sae.steps_taken == 7
    x = rand_x()
    f = sae.encode(x)
    log_alpha, mag = paths(sae, x)
    gen = torch.Generator().manual_seed(sae.cfg["seed"] * 1_000_003 + 7)
    u = torch.rand(log_alpha.shape, generator=gen).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / 0.5)
    z = (s * (HC_ZETA - HC_GAMMA) + HC_GAMMA).clamp(0, 1)
    torch.testing.assert_close(f, z * F.relu(mag), rtol=1e-5, atol=1e-6)
    assert (z == 0).any() and (z == 1).any() and ((z > 0) & (z < 1)).any()  # exact 0 and 1


def test_the_gate_is_open_as_often_as_the_expected_l0_says():
    """P(z > 0) = sigmoid(log alpha - beta log(-gamma / zeta)), over many draws of u."""
    sae = make_hc(hc_beta=2 / 3).train()
    log_alpha = torch.linspace(-4, 4, M)
    open_count = torch.zeros(M)
    draws = 400
    # magnitudes positive: f > 0 exactly where the gate is open
    pre = torch.cat([log_alpha.expand(B, M), torch.full((B, M), 5.0)], -1)
    with torch.no_grad():
        for step in range(draws):
            sae.steps_taken = step
            open_count += (sae.activation(pre) > 0).float().mean(0)
    expected = torch.sigmoid(log_alpha - 2 / 3 * math.log(-HC_GAMMA / HC_ZETA))
    torch.testing.assert_close(open_count / draws, expected, atol=0.01, rtol=0)
    penalty = sae.sparsity_penalty(pre, None)
    torch.testing.assert_close(penalty, expected.sum())


def test_the_inference_gate_is_the_clamped_mean_with_zeros_below_its_cut():
    sae = make_hc().eval()
    log_alpha, mag = torch.linspace(-6, 6, M).expand(4, M), torch.randn(4, M)
    pre = torch.cat([log_alpha, mag], -1)
    f = sae.activation(pre)
    gate = (torch.sigmoid(log_alpha) * (HC_ZETA - HC_GAMMA) + HC_GAMMA).clamp(0, 1)
    torch.testing.assert_close(f, gate * F.relu(mag))
    cut = math.log(-HC_GAMMA / HC_ZETA)  # logit(-gamma / (zeta - gamma)) = log(0.1 / 1.1)
    assert cut == HC_CUT and torch.equal(gate == 0, log_alpha <= cut)
    assert torch.equal(sae.activation(pre), f)  # deterministic


def test_the_dead_latent_pull_raises_only_dead_gates_to_the_cut():
    """hc_preact_coeff * mean_b sum_i dead_i relu(cut - log alpha_i): 0 with none dead, and its
    descent raises dead latents' log alpha (b_enc) and moves no live latent."""
    sae = make_hc(hc_preact_coeff=0.3).train()
    assert sae.uses_aux_loss and not make_hc(hc_preact_coeff=0).uses_aux_loss  # off by its 0
    x = rand_x()
    assert torch.equal(sae(x).aux_loss, torch.zeros(()))
    dead = torch.zeros(M, dtype=torch.bool)
    dead[::3] = True
    sae.tokens_since_fired[dead] = sae.cfg["dead_after_tokens"] + 1
    out = sae(x)
    log_alpha, _ = paths(sae, x)
    expected = 0.3 * ((HC_CUT - log_alpha).clamp_min(0) * dead).sum(-1).mean()
    torch.testing.assert_close(out.aux_loss, expected)
    assert out.aux_loss > 0
    sae.zero_grad()
    out.aux_loss.backward()
    assert sae.W_gate.grad[:, ~dead].abs().max() == 0 and sae.b_gate.grad[~dead].abs().max() == 0
    assert (sae.b_gate.grad[dead] <= 0).all() and (sae.b_gate.grad[dead] < 0).any()  # descent: up
    assert sae.W_enc.grad is None or sae.W_enc.grad.abs().max() == 0  # the magnitudes untouched


@pytest.mark.parametrize("schedule,mid", [
    ("constant", 2.0), ("linear", 1.25), ("exponential", math.sqrt(2.0 * 0.5)),
    ("cosine", 1.25)])
def test_the_temperature_schedules_run_from_initial_to_final_then_hold(schedule, mid):
    cfg = get_default_cfg() | {"hc_beta": 2.0, "hc_beta_final": 0.5, "hc_beta_schedule": schedule,
                               "hc_beta_frac": 0.5, "num_tokens": 4096 * 100, "batch_size": 4096}
    assert beta_at(cfg, 0) == pytest.approx(2.0)
    assert beta_at(cfg, 25) == pytest.approx(mid)
    final = 2.0 if schedule == "constant" else 0.5
    assert beta_at(cfg, 50) == pytest.approx(final) and beta_at(cfg, 99) == pytest.approx(final)
    betas = [beta_at(cfg, s) for s in range(51)]
    if schedule != "constant":
        assert all(a >= b for a, b in zip(betas, betas[1:], strict=False))  # monotone


def test_its_random_gate_draws_leave_the_global_stream_alone_and_advance_per_step():
    sae = make_hc().train()
    x = rand_x()
    before = torch.get_rng_state()
    f0 = sae(x).latents
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(sae(x).latents, f0)  # same step, same u
    sae.update_inference_state(f0)
    assert int(sae.gate_step) == sae.steps_taken == 1 and not torch.equal(sae(x).latents, f0)


def test_a_hard_concrete_run_stopped_after_a_checkpoint_resumes_bitwise(minilm, tmp_path,
                                                                        monkeypatch):
    from conftest import small_cfg, stopped_and_resumed

    def cfgs(out):
        return [small_cfg(sae_type="hardconcrete", hc_beta_schedule="cosine", hc_beta=1.0,
                          hc_beta_final=0.2, run_name="hc", output_dir=str(tmp_path / out),
                          checkpoint_freq=4, num_tokens=256 * 12)]
    [(reference, resumed)] = stopped_and_resumed(cfgs, minilm, tmp_path, monkeypatch)
    assert int(reference["gate_step"]) == 12
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
