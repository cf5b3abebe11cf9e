"""Hard Concrete L0 (sae.HardConcreteSAE, docs/math.md §3): the stochastic gate against its
formula and its distribution, the expected-L0 penalty, the inference gate, the temperature
schedules, its own random stream, and a stopped run resuming bitwise."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from config import get_default_cfg
from sae import HC_GAMMA, HC_ZETA, HardConcreteSAE, beta_at, build_sae

D, M, B = 16, 64, 256


def make_hc(**overrides) -> HardConcreteSAE:
    cfg = get_default_cfg() | {"act_size": D, "dict_size": M, "sae_type": "hardconcrete",
                               "seed": 3} | overrides
    sae = build_sae(cfg)
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(M, generator=gen))
        sae.r_mag.copy_(0.3 * torch.randn(M, generator=gen))
        sae.b_mag.copy_(0.5 * torch.randn(M, generator=gen))
    return sae


def rand_x(n: int = B, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def test_the_training_gate_is_the_stretched_clamped_concrete_sample():
    sae = make_hc(hc_beta=0.5).train()
    sae.load_state_dict(sae.state_dict() | {"gate_step": torch.tensor(7)})  # as a resume sets it
    assert sae.steps_taken == 7
    pre = sae.pre_activations(rand_x() * sae.scale)
    f = sae.activation(pre)
    gen = torch.Generator().manual_seed(sae.cfg["seed"] * 1_000_003 + 7)
    u = torch.rand(pre.shape, generator=gen).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + pre) / 0.5)
    z = (s * (HC_ZETA - HC_GAMMA) + HC_GAMMA).clamp(0, 1)
    magnitude = F.relu((pre - sae.b_enc) * sae.r_mag.exp() + sae.b_mag)
    torch.testing.assert_close(f, z * magnitude, rtol=1e-5, atol=1e-6)
    assert (z == 0).any() and (z == 1).any() and ((z > 0) & (z < 1)).any()  # exact 0 and 1


def test_the_gate_is_open_as_often_as_the_expected_l0_says():
    """P(z > 0) = sigmoid(log alpha - beta log(-gamma / zeta)), over many draws of u."""
    sae = make_hc(hc_beta=2 / 3).train()
    log_alpha = torch.linspace(-4, 4, M)
    open_count = torch.zeros(M)
    draws = 400
    with torch.no_grad():
        sae.b_enc.zero_()
        sae.b_mag.fill_(5.0)  # magnitudes positive: f > 0 exactly where the gate is open
        sae.r_mag.fill_(0.0)
        for step in range(draws):
            sae.steps_taken = step
            pre = log_alpha.expand(B, M)
            open_count += (sae.activation(pre) > 0).float().mean(0)
    expected = torch.sigmoid(log_alpha - 2 / 3 * math.log(-HC_GAMMA / HC_ZETA))
    torch.testing.assert_close(open_count / draws, expected, atol=0.01, rtol=0)
    penalty = sae.sparsity_penalty(log_alpha.expand(B, M), None)
    torch.testing.assert_close(penalty, expected.sum())


def test_the_inference_gate_is_the_clamped_mean_with_zeros_below_its_cut():
    sae = make_hc().eval()
    pre = torch.linspace(-6, 6, M).expand(4, M)
    f = sae.activation(pre)
    gate = (torch.sigmoid(pre) * (HC_ZETA - HC_GAMMA) + HC_GAMMA).clamp(0, 1)
    torch.testing.assert_close(f, gate * sae.magnitude(pre))
    cut = math.log(-HC_GAMMA / HC_ZETA)  # logit(-gamma / (zeta - gamma)) = log(0.1 / 1.1)
    assert torch.equal(gate == 0, pre <= cut)
    assert torch.equal(sae.activation(pre), f)  # deterministic


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
