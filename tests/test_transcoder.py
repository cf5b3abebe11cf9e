"""Transcoders: every variant reading one hook point and reconstructing another (docs/math.md §11).
The math first (sparse path against the dense reference, skip path, decode), then the pipeline."""

from __future__ import annotations

import pytest
import torch
from test_sae import D, M, make_cfg, rand_x
from test_sparse import SPARSE_VARIANTS, trained_like

from config import ConfigError, validate_cfg
from sae import SAE_CLASSES, build_sae

TRANSCODER = {"target_site": "mlp_out", "target_hook_point": "blocks.3.hook_mlp_out"}


def target_of(x: torch.Tensor) -> torch.Tensor:
    """A target that depends on x non-linearly, on its own scale."""
    gen = torch.Generator().manual_seed(11)
    return 3.0 * torch.tanh(x @ torch.randn(D, D, generator=gen)) + 0.5


def trained_transcoder(sae_type: str, n_dead: int = 0, skip: bool = False):
    sae = trained_like(sae_type, n_dead, **TRANSCODER, skip_connection=skip)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        sae.target_scale.fill_(0.6)
        if skip:
            sae.W_skip.copy_(0.2 * torch.randn(D, D, generator=gen))
    return sae


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("n_dead", [0, 5])
@pytest.mark.parametrize("sae_type", SPARSE_VARIANTS)
def test_transcoder_sparse_path_equals_dense_reference(sae_type, n_dead, skip):
    sae = trained_transcoder(sae_type, n_dead, skip)
    x = rand_x(seed=5)
    y = target_of(x)
    outs, grads = [], []
    for sparse in (False, True):
        out = sae(x, sparse=sparse, target=y)
        out.loss.backward()
        outs.append(out)
        grads.append({name: p.grad.clone() for name, p in sae.named_parameters()})
        sae.zero_grad(set_to_none=True)
    dense, sparse = outs
    f = sparse.latents.dense() if hasattr(sparse.latents, "dense") else sparse.latents
    torch.testing.assert_close(f, dense.latents)
    for term in ("loss", "recon_loss", "sparsity_loss", "aux_loss"):
        torch.testing.assert_close(getattr(sparse, term), getattr(dense, term),
                                   rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse.x_hat, dense.x_hat, rtol=1e-5, atol=1e-5)
    for name, g in grads[0].items():
        assert g.abs().sum() > 0, name  # every parameter learns, W_skip included
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("sae_type", tuple(SAE_CLASSES))
def test_transcoder_formulas(sae_type, skip):
    """pre = s_in x W_enc + b_enc (no b_dec); y_hat = (f W_dec + b_dec + s_in x W_skip) / s_out; the
    loss is ||s_out y - (f W_dec + b_dec + s_in x W_skip)||^2, and x_hat is y's raw prediction."""
    sae = trained_transcoder(sae_type, skip=skip).eval()
    x = rand_x(seed=6)
    y = target_of(x)
    s_in, s_out = sae.scale, sae.target_scale
    pre = s_in * x @ sae.W_enc + sae.b_enc
    if sae_type == "hardconcrete":  # its gate's pre-activation beside the magnitude's
        pre = torch.cat([s_in * x @ sae.W_gate + sae.b_gate, pre], -1)
    torch.testing.assert_close(sae.pre_activations(s_in * x), pre)
    f = sae.encode(x)
    pred = f @ sae.W_dec + sae.b_dec + (s_in * x @ sae.W_skip if skip else 0)
    torch.testing.assert_close(sae.decode(f, x), pred / s_out)
    out = sae(x, target=y)
    torch.testing.assert_close(out.x_hat, pred / s_out, rtol=1e-5, atol=1e-5)
    if sae_type != "matryoshka":  # whose loss averages the prefixes' errors
        torch.testing.assert_close(out.recon_loss, (s_out * y - pred).pow(2).sum(-1).mean())
    if skip:
        with pytest.raises(ValueError, match="skip connection"):
            sae.decode(f)


def test_an_sae_is_unchanged_by_the_transcoder_code():
    """With no target the SAE still subtracts b_dec before encoding and reconstructs its input."""
    sae = trained_like("topk")
    x = rand_x(seed=6)
    s = sae.scale
    torch.testing.assert_close(sae.pre_activations(s * x),
                               (s * x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    assert sae.W_skip is None and not hasattr(sae, "target_scale")


def test_init_from_batch_sets_both_scales_and_the_target_mean():
    sae = build_sae(make_cfg("topk", **TRANSCODER))
    x = rand_x(seed=2)
    y = target_of(x)
    sae.init_from_batch(x, 1.5, y, 0.25)
    assert float(sae.scale) == 1.5 and float(sae.target_scale) == 0.25
    torch.testing.assert_close(sae.b_dec.data, (0.25 * y).mean(0))


@pytest.mark.parametrize("overrides,key", [
    ({"skip_connection": True}, "skip_connection"),
    ({**TRANSCODER, "standardize_tokens": True}, "standardize_tokens"),
    ({"target_layer": -3, "target_site": "mlp_out"}, "target_layer"),
    ({**TRANSCODER, "dataset_path": "synthetic"}, "target_site"),
])
def test_bad_transcoder_settings_are_one_line(overrides, key):
    with pytest.raises(ConfigError, match=key) as err:
        validate_cfg(make_cfg("topk", **overrides))
    assert "\n" not in str(err.value)


def test_dict_size_shapes():
    sae = build_sae(make_cfg("batchtopk", **TRANSCODER, skip_connection=True))
    assert tuple(sae.W_skip.shape) == (D, D) and tuple(sae.W_dec.shape) == (M, D)
    assert not sae.W_skip.any()  # zero-initialised: a skip transcoder starts as a plain one


# --- SAELens transcoder layouts -----------------------------------------------------------------

def saelens_transcoder_forward(folder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens 6's transcoder formulas (saes/transcoder.py), re-implemented on the exported files:
    pre = x @ W_enc + b_enc; f = relu(pre), masked by pre > threshold for jumprelu architectures;
    y = f @ W_dec + b_dec, plus x @ W_skip.T for the skip ones."""
    import json

    from safetensors.torch import load_file

    cfg = json.loads((folder / "cfg.json").read_text())
    t = load_file(folder / "sae_weights.safetensors")
    assert cfg["apply_b_dec_to_input"] is False and cfg["d_out"] == cfg["d_in"]
    assert "hook_name_out" in cfg["metadata"]
    pre = x @ t["W_enc"] + t["b_enc"]
    f = torch.relu(pre)
    if cfg["architecture"].startswith("jumprelu"):
        f = f * (pre > t["threshold"])
    y = f @ t["W_dec"] + t["b_dec"]
    if "skip" in cfg["architecture"]:
        y = y + x @ t["W_skip"].T
    return f, y


EXPORTABLE = tuple(name for name, cls in SAE_CLASSES.items()
                   if cls.saelens_architecture in ("standard", "jumprelu"))


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("sae_type", EXPORTABLE)
def test_saelens_transcoder_export_reproduces_latents_and_outputs(sae_type, skip, tmp_path):
    from interop import export_saelens, load_saelens

    sae = trained_transcoder(sae_type, skip=skip).eval()
    if hasattr(sae, "threshold_initialised"):
        sae.threshold.fill_(0.5)
        sae.threshold_initialised.fill_(True)
    x = 2.0 * rand_x(seed=9)
    folder = export_saelens(sae, tmp_path / "tc")
    f, y = saelens_transcoder_forward(folder, x)
    torch.testing.assert_close(f, sae.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, sae.decode(sae.encode(x), x), rtol=1e-5, atol=1e-5)
    back = load_saelens(folder)
    assert back.transcoder and (back.W_skip is not None) == skip
    assert back.cfg["target_hook_point"] == TRANSCODER["target_hook_point"]
    torch.testing.assert_close(back.decode(back.encode(x), x), y, rtol=1e-5, atol=1e-5)


def test_a_topk_transcoder_export_is_refused_in_one_line(tmp_path):
    from interop import export_saelens

    with pytest.raises(ConfigError, match="transcoder layouts for ReLU and JumpReLU") as err:
        export_saelens(trained_transcoder("topk"), tmp_path / "tc")
    assert "\n" not in str(err.value)


def test_a_transcoder_between_widths_is_refused_on_import(tmp_path):
    import json

    from interop import export_saelens, load_saelens

    folder = export_saelens(trained_transcoder("vanilla").eval(), tmp_path / "tc")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps(cfg | {"d_out": 2 * D}))
    with pytest.raises(ConfigError, match="d_out=32") as err:
        load_saelens(folder)
    assert "\n" not in str(err.value)


# --- the pipeline: one stream, SAEs and transcoders side by side ---------------------------------

def gpt2_cfg(tiny_gpt2_dir, **overrides) -> dict:
    from conftest import small_cfg

    return small_cfg(**{"model_name": str(tiny_gpt2_dir), "layer": 1, "batch_size": 64,
                        "num_batches_in_buffer": 4, "eval_tokens": 256, "downstream_eval_rows": 8,
                        "num_tokens": 64 * 48, "eval_freq": 48, "checkpoint_freq": 4,
                        "dict_size": 128, "top_k": 8} | overrides)


def test_an_sae_and_transcoders_train_from_one_forward_and_splice_into_the_model(tiny_gpt2_dir,
                                                                                  tmp_path,
                                                                                  monkeypatch):
    from conftest import record_forwards

    from capture import load_model
    from interop import export_saelens
    from training import train_sae_group

    model = load_model(str(tiny_gpt2_dir), "cpu")
    forwards, real = record_forwards(monkeypatch)
    out = str(tmp_path / "runs")
    cfgs = [gpt2_cfg(tiny_gpt2_dir, site="mlp_out", sae_type="topk", run_name="sae",
                     output_dir=out),
            gpt2_cfg(tiny_gpt2_dir, site="mlp_in", target_site="mlp_out", sae_type="topk",
                     run_name="tc", output_dir=out),
            gpt2_cfg(tiny_gpt2_dir, site="mlp_in", target_site="mlp_out", skip_connection=True,
                     sae_type="batchtopk", run_name="skip", output_dir=out)]
    sae, tc, skip = train_sae_group(cfgs, model=model)
    store_hooks = ["blocks.1.hook_mlp_out", "blocks.1.mlp.hook_in"]
    assert forwards.count(store_hooks) >= 3  # held-out set, buffer fills: all read both hook points
    assert not [hooks for hooks in forwards if len(hooks) == 1 and hooks[0] in store_hooks]
    assert (tc.cfg["target_hook_point"] == "blocks.1.hook_mlp_out"
            and skip.sae.W_skip.abs().sum() > 0)
    for t in (sae, tc, skip):
        m = t.final_metrics
        # random tiny model: CE barely depends on its MLP; spliced is nearer clean than zero-ablated
        assert abs(m["ce_spliced"] - m["ce_clean"]) < abs(m["ce_zero"] - m["ce_clean"]), (
            t.cfg["run_name"], m)
        assert 0 < m["explained_variance"] < 1 and m["l0"] > 0
    # the exported skip transcoder, given the model's raw input activations, predicts its target
    x, y = (a.reshape(-1, a.shape[-1])
            for a in real(model, model.to_tokens("To be, or not to be"),
                          ["blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"]))
    folder = export_saelens(skip.sae.eval(), tmp_path / "export")
    f, y_hat = saelens_transcoder_forward(folder, x)
    torch.testing.assert_close(f, skip.sae.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_hat, skip.sae.decode(skip.sae.encode(x), x), rtol=1e-4, atol=1e-5)
    assert (y_hat - y).pow(2).sum() < (y - y.mean(0)).pow(2).sum()  # and it does predict
    assert skip.final_metrics["explained_variance"] >= tc.final_metrics["explained_variance"]


def test_a_transcoder_group_stopped_after_a_checkpoint_resumes_bitwise(tiny_gpt2_dir, tmp_path,
                                                                       monkeypatch):
    from conftest import stopped_and_resumed

    from capture import load_model

    def cfgs(out):
        return [gpt2_cfg(tiny_gpt2_dir, site="mlp_in", target_site="mlp_out", skip_connection=True,
                         sae_type=v, run_name=v, output_dir=str(tmp_path / out),
                         cache_dir=str(tmp_path / "cache"))
                for v in ("jumprelu", "matryoshka")]
    model = load_model(str(tiny_gpt2_dir), "cpu")
    for wa, wb in stopped_and_resumed(cfgs, model, tmp_path, monkeypatch):
        assert "W_skip" in wa and "target_scale" in wa
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_transcoder_sweep_puts_three_runs_on_every_mlp_of_one_stream():
    import main
    from config import get_default_cfg, prepare_cfg
    from training import hook_points_of

    cfgs = main.sweep_transcoders(get_default_cfg())
    assert len(cfgs) == 3 * 6 and len(main.group_by_stream(cfgs)) == 1  # MiniLM-L6: one forward
    cfgs = [prepare_cfg(c, {"d_model": 384, "n_layers": 6, "n_ctx": 512}) for c in cfgs]
    assert hook_points_of(cfgs)[:3] == ["blocks.0.hook_mlp_out", "blocks.0.mlp.hook_in",
                                        "blocks.1.hook_mlp_out"]
    names = [c["run_name"].split(f"_m{c['dict_size']}_")[0] for c in cfgs[:3]]
    assert names == ["batchtopk_all-MiniLM-L6-v2_L0_mlp_out",
                     "batchtopk_all-MiniLM-L6-v2_L0_mlp_in_to_mlp_out",
                     "batchtopk_all-MiniLM-L6-v2_L0_mlp_in_to_mlp_out_skip"]


def test_an_override_of_the_swept_key_collapses_the_sweep():
    import main

    cfgs, _ = main.parse_args(["--sweep", "transcoders", "layer=3", "sae_type=topk"])
    assert [(c["layer"], c["site"], c.get("target_site", ""), c.get("skip_connection", False))
            for c in cfgs] == [(3, "mlp_out", "", False), (3, "mlp_in", "mlp_out", False),
                               (3, "mlp_in", "mlp_out", True)]
    # not also JumpReLU at k 16/32/64
    cfgs, _ = main.parse_args(["--sweep", "l0", "sae_type=jumprelu", "lr=1e-3"])
    assert [(c["sae_type"], c["target_l0"], c["lr"]) for c in cfgs] == [
        ("jumprelu", t, 1e-3) for t in (16, 32, 64)]
    cfgs, _ = main.parse_args(["--sweep", "l0", "sae_type=jumprelu", "top_k=16"])  # key by key
    assert [(c["sae_type"], c["target_l0"], c["top_k"]) for c in cfgs] == [
        ("jumprelu", t, 16) for t in (16, 32, 64)]
    # no run has it: set in each, once
    cfgs, _ = main.parse_args(["--sweep", "layers", "layer=9", "site=mlp_out"])
    assert [(c["layer"], c["site"]) for c in cfgs] == [(9, "mlp_out")]


def test_the_frontier_draws_saes_and_transcoders_as_separate_series():
    import pandas as pd

    import results

    df = pd.DataFrame({"sae_type": ["topk"] * 3, "l0": [32.0, 32.0, 31.9],
                       "nmse": [0.15, 0.2, 0.14],
                       "target_hook_point": ["", "blocks.3.hook_mlp_out", "blocks.3.hook_mlp_out"],
                       "skip_connection": [False, False, True]})
    ax = results.plot_frontier(df).axes[0]
    styles = {line.get_label().split(" (")[0]: (line.get_linestyle(), line.get_marker())
              for line in ax.lines}
    assert styles == {"topk": ("-", "o"), "topk transcoder": ("--", "s"),
                      "topk skip transcoder": (":", "^")}


@pytest.mark.parametrize("overrides,message", [
    ({"site": "mlp_out", "target_site": "mlp_out"}, "is the input hook point"),
    ({"target_site": "mlp_out", "target_hook_point": "blocks.2.hook_mlp_out"},
     "name different targets"),
])
def test_a_target_that_is_the_input_or_named_twice_differently_is_refused(overrides, message):
    from config import get_default_cfg, prepare_cfg

    with pytest.raises(ConfigError, match=message) as err:
        prepare_cfg(get_default_cfg() | overrides, {"d_model": 384, "n_layers": 6, "n_ctx": 512})
    assert "\n" not in str(err.value)


def test_the_model_card_names_a_transcoder_and_its_target():
    from interop import model_card

    card = model_card(trained_transcoder("jumprelu", skip=True).eval(), {"explained_variance": 0.9})
    assert "# JumpReLU skip transcoder on " in card
    assert ("predicting those at `blocks.3.hook_mlp_out`" in card
            and "| skip_connection | True |" in card)


@pytest.mark.parametrize("sparse", [False, True])
def test_gated_frozen_decoder_term_trains_no_part_of_a_skip_transcoders_decoder(sparse):
    """Gated's auxiliary term reconstructs the goal through the frozen decoder: W_dec, b_dec's
    decoder slot and W_skip (inside a skip transcoder's goal) get no gradient from it."""
    sae = trained_transcoder("gated", skip=True)
    x = rand_x(seed=5)
    out = sae(x, sparse=sparse, target=target_of(x))
    assert out.aux_loss > 0
    W_dec, W_skip, W_enc = torch.autograd.grad(out.aux_loss, [sae.W_dec, sae.W_skip, sae.W_enc],
                                               allow_unused=True)
    assert W_dec is None or W_dec.abs().max() == 0
    assert W_skip is None or W_skip.abs().max() == 0
    assert W_enc.abs().max() > 0  # the gate learns from it
