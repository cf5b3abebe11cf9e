"""End to end: every variant learns on the embedded model; checkpoints reload; causal-LM metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import small_cfg

from sae import SAE_CLASSES, load_sae
from training import lr_factor, train_sae, train_sae_group

VARIANTS = tuple(SAE_CLASSES)


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def eval_records(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "nmse" in r]


@pytest.fixture(scope="module")
def trained_group(minilm, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfgs = [small_cfg(sae_type=t, output_dir=str(out), l1_coeff=0.5, l0_coeff=0.05)
            for t in VARIANTS]
    return train_sae_group(cfgs, model=minilm)


def test_every_variant_learns(trained_group):
    for t in trained_group:
        evals = eval_records(t.run_dir)
        assert evals[0]["step"] == 0 and evals[-1]["step"] == 60
        assert evals[-1]["nmse"] < 0.65 * evals[0]["nmse"], (t.cfg["sae_type"], evals[0]["nmse"],
                                                              evals[-1]["nmse"])
        assert 0 < evals[-1]["l0"] < t.cfg["dict_size"] / 2


def test_topk_variants_hold_l0_near_k(trained_group):
    for t in trained_group:
        if t.cfg["sae_type"] == "topk":
            assert eval_records(t.run_dir)[-1]["l0"] <= t.cfg["top_k"] + 1e-6
        if t.cfg["sae_type"] == "batchtopk":  # inference threshold, so only close to k
            assert eval_records(t.run_dir)[-1]["l0"] == pytest.approx(t.cfg["top_k"], rel=0.5)


def test_metrics_file_has_steps_tokens_and_every_core_metric(trained_group):
    core = ("l0", "l1", "nmse", "explained_variance", "cosine", "shrinkage", "dead", "dense",
            "downstream_recovered")
    for t in trained_group:
        records = read_metrics(t.run_dir)
        assert all("step" in r and "tokens" in r for r in records)
        assert all(k in eval_records(t.run_dir)[-1] for k in core)
        assert any("train/loss" in r for r in records)


def test_final_checkpoint_reloads_with_identical_outputs(trained_group):
    x = torch.randn(64, 384) * 3
    for t in trained_group:
        loaded = load_sae(t.run_dir / "final")
        t.sae.eval()
        assert torch.equal(loaded.encode(x), t.sae.encode(x))
        assert torch.allclose(loaded(x).x_hat, t.sae(x).x_hat)
        assert loaded.scale.item() == t.sae.scale.item() != 1.0
        assert (t.run_dir / "final" / "training_state.pt").exists()
        assert (t.run_dir / "checkpoints" / "step_0000040" / "sae.safetensors").exists()


def test_run_names_unique_in_a_group(trained_group):
    names = [t.cfg["run_name"] for t in trained_group]
    assert len(set(names)) == len(names)
    assert all(t.cfg["sae_type"] in t.cfg["run_name"] for t in trained_group)


def test_causal_lm_path_reports_ce_metrics(tiny_gpt2_dir, tmp_path):
    from capture import load_model

    model = load_model(str(tiny_gpt2_dir), "cpu")
    cfg = small_cfg(model_name=str(tiny_gpt2_dir), layer=1, sae_type="topk", dict_size=64, top_k=4,
                    output_dir=str(tmp_path), num_tokens=256 * 10, eval_freq=10, checkpoint_freq=0)
    t = train_sae(cfg, model=model)
    final = t.final_metrics
    for key in ("ce_clean", "ce_spliced", "ce_zero", "ce_recovered", "kl"):
        assert math.isfinite(final[key]), key
    assert final["kl"] >= 0
    vocab = model.cfg.d_vocab
    assert abs(final["ce_clean"] - math.log(vocab)) < 0.5  # random weights predict near-uniformly



def test_lr_schedule_warms_up_and_decays():
    factors = [lr_factor(s, 100, 0.1, 0.2) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0 and factors[50] == 1.0
    assert factors[80] == 1.0 and factors[90] == pytest.approx(0.5) \
        and factors[99] == pytest.approx(0.05)


def test_nan_batch_stops_with_step_variant_and_term_and_keeps_checkpoints(minilm, tmp_path,
                                                                          monkeypatch):
    from activation_store import ActivationsStore
    from training import NonFiniteError

    served = {"n": 0}
    original = ActivationsStore.next_batch

    def poisoned(self):
        batch = original(self)
        served["n"] += 1
        return batch * float("nan") if served["n"] == 7 else batch  # the 7th batch trains step 7

    monkeypatch.setattr(ActivationsStore, "next_batch", poisoned)
    cfg = small_cfg(sae_type="topk", output_dir=str(tmp_path), run_name="nan", checkpoint_freq=4,
                    perf_log_freq=10, eval_freq=100, num_tokens=256 * 12)
    with pytest.raises(NonFiniteError, match=r"non-finite recon_loss at step 7 in topk run nan"):
        train_sae(cfg, model=minilm)
    checkpoints = sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir())
    assert checkpoints == ["step_0000004"]  # the step-8 checkpoint was refused, step 4 intact
    assert torch.isfinite(load_sae(tmp_path / "nan" / "checkpoints" / "step_0000004").W_dec).all()


def test_group_across_layers_trains_each_sae_on_its_own_hook(minilm, tmp_path):
    """SAEs on different layers share one forward per batch and train as if alone."""
    cfgs = [small_cfg(sae_type="topk", layer=layer, output_dir=str(tmp_path / "group"),
                      num_tokens=256 * 12) for layer in (1, 4)]
    group = train_sae_group(cfgs, model=minilm)
    alone = train_sae(cfgs[1] | {"output_dir": str(tmp_path / "alone")}, model=minilm)
    assert [t.cfg["hook_point"] for t in group] == ["blocks.1.hook_resid_pre",
                                                    "blocks.4.hook_resid_pre"]
    for name, value in alone.sae.state_dict().items():
        torch.testing.assert_close(group[1].sae.state_dict()[name], value, rtol=1e-4, atol=1e-5,
                                   msg=name)
    assert group[0].sae.scale != group[1].sae.scale  # each hook has its own input scale
    assert group[0].final_metrics["nmse"] < eval_records(group[0].run_dir)[0]["nmse"]


def _trainee_after_steps(sae_type: str, lazy: bool, n_steps: int):
    """A Trainee stepped with training_step on random data; returns it and the parameters
    before its last step, with latents 0-9 silenced in that last step."""
    from test_sae import make_cfg, rand_x

    from sae import build_sae
    from schedule import SparsityCoefficient
    from training import Trainee, training_step

    cfg = make_cfg(sae_type, lazy_adam=lazy, beta1=0.9, lr=1e-2, dead_after_tokens=10**9)
    sae = build_sae(cfg)
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    t = Trainee(cfg, sae, optimizer, scheduler, logger=None, coefficient=SparsityCoefficient(sae))
    sae.init_from_batch(rand_x(seed=1), 1.0)
    for step in range(n_steps - 1):
        training_step(t, rand_x(seed=2 + step), step, 100, aux_enabled=False)
    with torch.no_grad():  # latents 0-9 can no longer fire: a large negative encoder bias
        sae.b_enc[:10] = -1e4
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    training_step(t, rand_x(seed=50), n_steps - 1, 100, aux_enabled=False)
    return t, before


@pytest.mark.parametrize("sae_type", VARIANTS)
def test_lazy_adam_freezes_latents_without_gradient_and_moves_the_rest(sae_type):
    t, before = _trainee_after_steps(sae_type, lazy=True, n_steps=4)
    sae = t.sae
    silent, active = slice(0, 10), slice(10, None)
    assert torch.equal(sae.W_enc[:, silent], before["W_enc"][:, silent])
    assert torch.equal(sae.b_enc[silent], before["b_enc"][silent])
    assert torch.allclose(sae.W_dec[silent], before["W_dec"][silent], atol=1e-6)  # renormed only
    assert not torch.equal(sae.W_enc[:, active], before["W_enc"][:, active])
    # without it, Adam's momentum keeps moving the silenced latents
    t_eager, before_eager = _trainee_after_steps(sae_type, lazy=False, n_steps=4)
    assert not torch.equal(t_eager.sae.W_enc[:, silent], before_eager["W_enc"][:, silent])


@pytest.mark.parametrize(("device", "dtype", "dict_size", "kernels", "sparse"), [
    ("cpu", "float32", 3072, "auto", True),
    ("cpu", "bfloat16", 3072, "auto", True),
    ("cuda", "float32", 3072, "auto", False),
    ("cuda", "float32", 24576, "auto", True),
    ("cuda", "bfloat16", 24576, "auto", False),
    ("cuda", "float32", 3072, "sparse", True),
    ("cpu", "float32", 24576, "dense", False),
])
def test_kernels_auto_picks_the_measured_faster_step(device, dtype, dict_size, kernels, sparse):
    from training import use_sparse_kernels

    cfg = {"device": device, "dtype": dtype, "dict_size": dict_size, "kernels": kernels}
    assert use_sparse_kernels(cfg) is sparse
