"""Cross-layer transcoders (docs/math.md §12): the forward against a plain loop over every
(source, target) pair, values and gradients; the one-layer case against a transcoder; the
concatenated decoder constraint; then a run on the tiny GPT-2: metrics, resume, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_sae import B, D, M, make_cfg

from clt import CrossLayerTranscoder
from config import ConfigError, hook_tag, validate_cfg
from constraints import latent_blocks, remove_parallel_decoder_grad
from sae import build_sae
from training import make_trainee, training_step

N_LAYERS = 3
CLT_VARIANTS = ("batchtopk", "topk", "jumprelu")
# the options the variants carry as CLTs: "<sae_type>_<option>"
OPTIONS = {"jumprelu_tanh": {"jumprelu_penalty": "tanh"}, "jumprelu_preact": {"preact_coeff": 0.3}}


def clt_cfg(sae_type: str, **overrides) -> dict:
    return make_cfg(sae_type, **{"cross_layer": True, "layers": "", "n_layers": N_LAYERS,
                                 "site": "resid_mid", "target_site": "mlp_out"} | overrides)


def layer_acts(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (L, B, d), each layer on its own scale, targets non-linear in inputs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N_LAYERS, B, D, generator=gen) * torch.tensor([1.0, 2.0, 0.5]).view(-1, 1, 1)
    y = 3.0 * torch.tanh(x @ torch.randn(D, D, generator=gen)) + 0.5
    return x, y


def trained_like_clt(sae_type: str, skip: bool = False, n_dead: int = 0,
                     **overrides) -> CrossLayerTranscoder:
    """A CLT with non-trivial scales, biases, thresholds and decoders to later layers."""
    clt = build_sae(clt_cfg(sae_type, skip_connection=skip, **overrides)).train()
    gen = torch.Generator().manual_seed(3)
    x, _ = layer_acts(5)
    with torch.no_grad():
        for n, layer in enumerate(clt.layers):
            layer.scale.fill_(1.7 - 0.3 * n)
            layer.target_scale.fill_(0.6 + 0.2 * n)
            layer.b_enc.copy_(0.1 * torch.randn(M, generator=gen))
            layer.b_dec.copy_(0.2 * torch.randn(D, generator=gen))
            layer.W_enc.add_(0.3 * torch.randn(D, M, generator=gen))
            if skip:
                layer.W_skip.copy_(0.2 * torch.randn(D, D, generator=gen))
            layer.start_at_density(layer.pre_activations(x[n] * layer.scale).quantile(0.95, dim=0))
            if sae_type == "batchtopk":  # its inference threshold, which the export carries
                layer.threshold.fill_(0.2 + 0.1 * n)
                layer.threshold_initialised.fill_(True)
            layer.tokens_since_fired[:n_dead] = layer.cfg["dead_after_tokens"] + 1
        for w in clt.W_dec_later:  # none with cross_layer_writes=false
            w.copy_(0.1 * torch.randn(w.shape, generator=gen))
    clt.sparsity_coeff = 0.7
    return clt


def reference_loss(clt: CrossLayerTranscoder, x: torch.Tensor, y: torch.Tensor) -> dict:
    """The loss from the parameters, one (source n, target t) pair at a time:
    y_hat_t = sum_{n <= t} f_n D[n -> t] + b_dec_t + s_in,t x_t W_skip_t, each target in its own
    scaled space s_out,t y_t; plus every layer's penalty and AuxK on its own target's residual."""
    fs, pres = [], []
    for n, layer in enumerate(clt.layers):
        pres.append(layer.scale * x[n] @ layer.W_enc + layer.b_enc)  # a transcoder: no b_dec
        fs.append(layer.activation(pres[-1]))
    recon, aux, sparsity = 0.0, 0.0, 0.0
    for t, layer in enumerate(clt.layers):
        y_hat = layer.b_dec + fs[t] @ layer.W_dec
        for n in range(t):
            y_hat = y_hat + fs[n] @ clt.W_dec_later[n][:, t - n - 1, :]
        if layer.W_skip is not None:
            y_hat = y_hat + layer.scale * x[t] @ layer.W_skip
        residual = layer.target_scale * y[t] - y_hat
        recon = recon + residual.pow(2).sum(-1).mean()
        if layer.uses_aux_loss:  # TopK's and BatchTopK's AuxK, JumpReLU's pre-activation loss
            aux = aux + layer.aux_loss(residual, pres[t])
        sparsity = sparsity + clt.sparsity_coeff * layer.sparsity_penalty(pres[t], fs[t])
    aux = torch.as_tensor(aux)
    return {"recon_loss": recon, "sparsity_loss": sparsity, "aux_loss": aux,
            "loss": recon + sparsity + aux, "latents": torch.stack(fs)}


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("sae_type", [*CLT_VARIANTS, "jumprelu_preact"])
def test_the_clt_forward_equals_the_pairwise_loop_in_values_and_gradients(sae_type, skip):
    extra = OPTIONS.get(sae_type, {})
    clt = trained_like_clt(sae_type.partition("_")[0], skip, n_dead=5, **extra)
    x, y = layer_acts(6)
    ref = reference_loss(clt, x, y)
    ref["loss"].backward()
    ref_grads = {name: p.grad.clone() for name, p in clt.named_parameters()}
    clt.zero_grad(set_to_none=True)
    out = clt(x, target=y)
    out.loss.backward()
    torch.testing.assert_close(out.latents, ref["latents"])
    for term in ("loss", "recon_loss", "sparsity_loss", "aux_loss"):
        torch.testing.assert_close(getattr(out, term), ref[term], rtol=1e-5, atol=1e-6, msg=term)
    if sae_type in ("batchtopk", "topk", "jumprelu_preact"):
        assert out.aux_loss > 0  # the dead latents are revived per layer
    for name, g in ref_grads.items():
        assert g.abs().sum() > 0, name  # every decoder to a later layer learns
        torch.testing.assert_close(clt.get_parameter(name).grad, g, rtol=1e-4, atol=1e-6,
                                   msg=name)
    # inference: decode is y_hat / s_out per target, decode_layer one target of it
    clt.eval()
    f = clt.encode(x)
    y_hat = clt.decode(f, x)
    assert y_hat.shape == y.shape
    for t in range(N_LAYERS):
        torch.testing.assert_close(clt.decode_layer(list(f), list(x), t), y_hat[t])


@pytest.mark.parametrize("writes", [True, False])
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("sae_type", [*CLT_VARIANTS, "jumprelu_tanh"])  # preact: dense
def test_the_sparse_clt_step_equals_the_dense_reference(sae_type, skip, writes):
    extra = OPTIONS.get(sae_type, {})
    sae_type = sae_type.partition("_")[0]
    clt = trained_like_clt(sae_type, skip, n_dead=5, **extra) if writes else build_sae(
        clt_cfg(sae_type, skip_connection=skip, cross_layer_writes=False, **extra))
    x, y = layer_acts(12)
    outs, grads = [], []
    for sparse in (False, True):
        out = clt(x, target=y, sparse=sparse)
        out.loss.backward()
        outs.append(out)
        grads.append({name: p.grad.clone() for name, p in clt.named_parameters()})
        clt.zero_grad(set_to_none=True)
    dense, sparse = outs
    assert isinstance(sparse.latents, list)  # the sparse path ran, one SparseLatents a layer
    torch.testing.assert_close(torch.stack([f.dense() for f in sparse.latents]), dense.latents)
    for term in ("loss", "recon_loss", "sparsity_loss", "aux_loss"):
        torch.testing.assert_close(getattr(sparse, term), getattr(dense, term), rtol=1e-5,
                                   atol=1e-6, msg=term)
    torch.testing.assert_close(sparse.error, dense.error, rtol=1e-5, atol=1e-5)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("sae_type", CLT_VARIANTS)
def test_a_one_layer_clt_is_the_transcoder_of_that_layer(sae_type):
    """From its initialisation (a transcoder of seed + n) to its loss terms and gradients."""
    clt = build_sae(clt_cfg(sae_type, layers="1:1", n_layers=2, skip_connection=True))
    tc = build_sae(make_cfg(sae_type, target_site="mlp_out", skip_connection=True))
    assert clt.layer_ids == [1] and len(clt.W_dec_later) == 0
    for name, value in tc.state_dict().items():
        assert torch.equal(clt.layers[0].state_dict()[name], value), name
    with torch.no_grad():
        clt.layers[0].tokens_since_fired[:5] = clt.cfg["dead_after_tokens"] + 1  # AuxK runs
        clt.layers[0].W_skip.normal_(0, 0.1)
    tc.load_state_dict(clt.layers[0].state_dict())
    clt.sparsity_coeff = tc.sparsity_coeff = 0.7
    x, y = layer_acts(7)
    a, b = clt(x[:1], target=y[:1]), tc(x[0], target=y[0])
    a.loss.backward()
    b.loss.backward()
    for term in ("loss", "recon_loss", "sparsity_loss", "aux_loss"):
        torch.testing.assert_close(getattr(a, term), getattr(b, term), msg=term)
    assert sae_type == "jumprelu" or a.aux_loss > 0
    torch.testing.assert_close(a.x_hat[0], b.x_hat)
    for name, p in tc.named_parameters():
        torch.testing.assert_close(clt.layers[0].get_parameter(name).grad, p.grad, msg=name)


def test_training_keeps_each_latents_concatenated_decoder_at_unit_norm():
    """Not each target's row: a latent of layer 0 may write mostly to a later layer."""
    cfg = clt_cfg("batchtopk", device="cpu", lr=1e-2)
    t = make_trainee(cfg, total_steps=10, main=False)
    x, y = layer_acts(8)
    for step in range(4):
        training_step(t, x, step, 10, True, target=y)
    for n, (layer, decoder) in enumerate(latent_blocks(t.sae)):
        assert len(decoder) == (2 if n < N_LAYERS - 1 else 1)
        norm = sum(w.flatten(1).pow(2).sum(-1) for w in decoder).sqrt()
        torch.testing.assert_close(norm, torch.ones(M))
        own = layer.W_dec.norm(dim=-1)
        if n < N_LAYERS - 1:
            assert (own < 1 - 1e-3).all() and decoder[1].abs().sum() > 0
    assert all(layer.threshold > 0 for layer in t.sae.layers)  # each layer keeps its own


def test_the_decoder_gradient_is_orthogonal_to_each_latents_concatenated_vector():
    clt = trained_like_clt("jumprelu")
    x, y = layer_acts(9)
    clt(x, target=y).loss.backward()
    for _, decoder in latent_blocks(clt):
        before = sum(w.grad.flatten(1).pow(2).sum(-1) for w in decoder).sqrt()
        remove_parallel_decoder_grad(decoder)
        along = sum(torch.linalg.vecdot(w.grad.flatten(1), w.flatten(1)) for w in decoder)
        norm = sum(w.flatten(1).pow(2).sum(-1) for w in decoder).sqrt()
        assert (along.abs() <= 1e-5 * before * norm).all()


@pytest.mark.parametrize("overrides,message", [
    ({"sae_type": "vanilla"}, "sae_type=vanilla cannot be a cross-layer transcoder"),
    ({"sae_type": "matryoshka"}, "sae_type=matryoshka cannot be a cross-layer transcoder"),
    ({"hook_point": "blocks.0.hook_resid_mid"}, "names its hook points by site"),
    ({"target_layer": 1}, "target_layer is for single-layer transcoders"),
    ({"site": "mlp_out"}, "reads and writes site 'mlp_out'"),
    ({"cross_layer": False}, "layers='0:1' is invalid: is for cross_layer=true"),
])
def test_a_config_that_cannot_be_a_clt_is_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        validate_cfg(clt_cfg("batchtopk", layers="0:1") | overrides)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("layers,message", [("0:3", "outside the model's layers 0..2"),
                                            ("2:1", "outside the model's layers 0..2"),
                                            ("1", "must be a:b")])
def test_a_layer_range_outside_the_model_is_refused_in_one_line(layers, message):
    from clt import clt_layers

    with pytest.raises(ConfigError, match=message) as err:
        clt_layers(clt_cfg("batchtopk", layers=layers))
    assert "\n" not in str(err.value)


# --- circuit-tracer's layout, read back by a loader written from it ----------------------------

def circuit_tracer_forward(folder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """circuit-tracer 0.5.0's CrossLayerTranscoder on raw x (L, N, d), from its files alone:
    f_i = pre_i * 1[pre_i > threshold_i], pre_i = x_i W_enc_i^T + b_enc_i;
    y_t = sum_{i <= t} f_i W_dec_i[:, t - i] + b_dec_t."""
    from safetensors.torch import load_file

    n_layers = len(list(folder.glob("W_enc_*.safetensors")))
    assert n_layers == len(list(folder.glob("W_dec_*.safetensors"))) == x.shape[0]
    fs, ys = [], []
    for i in range(n_layers):
        enc = load_file(folder / f"W_enc_{i}.safetensors")
        assert set(enc) == {f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}", f"threshold_{i}"}
        pre = x[i] @ enc[f"W_enc_{i}"].T + enc[f"b_enc_{i}"]
        fs.append(pre * (pre > enc[f"threshold_{i}"]))
        ys.append(enc[f"b_dec_{i}"].expand_as(x[i]).clone())
    for i in range(n_layers):
        w_dec = load_file(folder / f"W_dec_{i}.safetensors")[f"W_dec_{i}"]
        assert w_dec.shape == (fs[i].shape[1], n_layers - i, x.shape[-1])
        for t in range(i, n_layers):
            ys[t] = ys[t] + fs[i] @ w_dec[:, t - i]
    return torch.stack(fs), torch.stack(ys)


@pytest.mark.parametrize("writes", [True, False])
@pytest.mark.parametrize("sae_type", ["batchtopk", "jumprelu"])
def test_the_circuit_tracer_export_gives_our_latents_and_reconstructions(sae_type, writes,
                                                                          tmp_path):
    import json

    from interop import export_circuit_tracer

    clt = trained_like_clt(sae_type, cross_layer_writes=writes).eval()
    x, _ = layer_acts(10)
    folder = export_circuit_tracer(clt, tmp_path / "clt")
    f, y_hat = circuit_tracer_forward(folder, x)
    torch.testing.assert_close(f, clt.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_hat, clt.decode(clt.encode(x)), rtol=1e-4, atol=1e-5)
    hooks = json.loads((folder / "hooks.json").read_text())
    assert (hooks["feature_input_hook"], hooks["feature_output_hook"]) == ("hook_resid_mid",
                                                                           "hook_mlp_out")


@pytest.mark.parametrize("overrides,message", [
    ({"sae_type": "topk"}, "a topk CLT has no threshold form"),
    ({"skip_connection": True}, "reads no skip connection"),
    ({"layers": "1:2"}, "over all the model's layers"),
])
def test_a_clt_circuit_tracer_cannot_load_is_refused_in_one_line(overrides, message, tmp_path):
    from interop import export_circuit_tracer

    with pytest.raises(ConfigError, match=message) as err:
        export_circuit_tracer(build_sae(clt_cfg("batchtopk") | overrides), tmp_path / "clt")
    assert "\n" not in str(err.value) and not (tmp_path / "clt").exists()


# --- the pipeline on the tiny GPT-2: one stream, metrics, resume, export -----------------------

def gpt2_clt_cfg(tiny_gpt2_dir, **overrides) -> dict:
    from test_transcoder import gpt2_cfg

    return gpt2_cfg(tiny_gpt2_dir, **{"cross_layer": True, "site": "resid_mid",
                                      "target_site": "mlp_out"} | overrides)


def test_clts_train_from_one_forward_report_per_layer_and_replacement_metrics(tiny_gpt2_dir,
                                                                               tmp_path,
                                                                               monkeypatch):
    from conftest import record_forwards

    from capture import load_model
    from interop import export_circuit_tracer
    from training import train_sae_group

    model = load_model(str(tiny_gpt2_dir), "cpu")
    forwards, real = record_forwards(monkeypatch)
    out = str(tmp_path / "runs")
    cfgs = [gpt2_clt_cfg(tiny_gpt2_dir, sae_type="batchtopk", run_name="btk", output_dir=out),
            gpt2_clt_cfg(tiny_gpt2_dir, sae_type="jumprelu", target_l0=6.0, run_name="jr",
                         output_dir=out)]
    trainees = train_sae_group(cfgs, model=model)
    hooks = ["blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out", "blocks.1.hook_resid_mid",
             "blocks.1.hook_mlp_out"]
    assert forwards and all(sorted(h) == sorted(hooks) for h in forwards)  # one forward, all four
    for t in trainees:
        m = t.final_metrics
        assert t.cfg["layers"] == "0:1" and hook_tag(t.cfg) == "clt_L0-1_resid_mid_to_mlp_out"
        for layer in (0, 1):
            assert 0 < m[f"explained_variance_L{layer}"] < 1 and m[f"l0_L{layer}"] > 0
        assert m["l0_total"] == pytest.approx(m["l0_L0"] + m["l0_L1"])
        assert m["explained_variance"] == pytest.approx(
            (m["explained_variance_L0"] + m["explained_variance_L1"]) / 2)
        assert {"ce_recovered_L0", "ce_recovered_L1", "kl_L1"} <= set(m)  # one MLP replaced
        for loop in ("", "_open_loop"):  # the replacement model beats zero-ablating every MLP
            assert (abs(m["ce_spliced" + loop] - m["ce_clean" + loop])
                    < abs(m["ce_zero" + loop] - m["ce_clean" + loop])), (t.cfg["run_name"], m)
    # results: the per-layer table is the last evaluation's; each layer's writes sum to 1
    from results import clt_layer_table, clt_write_mass, load_run, write_report

    run = load_run(trainees[0].run_dir)
    table = clt_layer_table(run)
    assert list(table.index) == [0, 1]
    assert table.loc[1, "explained_variance"] == trainees[0].final_metrics["explained_variance_L1"]
    mass = clt_write_mass(run.sae())
    np.testing.assert_allclose(mass.sum(1), 1, rtol=1e-5)
    assert mass[1, 0] == 0 and mass[0, 1] > 0
    report = write_report(out, tmp_path / "report", n_latents=0)
    assert "## Cross-layer transcoders" in (report / "summary.md").read_text()
    assert (report / "density" / "btk_writes.png").stat().st_size > 0
    # the exported BatchTopK CLT, on the model's own raw activations, gives our latents
    acts = real(model, model.to_tokens("To be, or not to be"), hooks)
    x = torch.stack([a.reshape(-1, a.shape[-1]) for a in acts[0::2]])
    clt = trainees[0].sae.eval()
    f, y_hat = circuit_tracer_forward(export_circuit_tracer(clt, tmp_path / "ct"), x)
    torch.testing.assert_close(f, clt.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_hat, clt.decode(f), rtol=1e-4, atol=1e-5)


def test_a_cached_clt_group_stopped_after_a_checkpoint_resumes_bitwise(tiny_gpt2_dir, tmp_path,
                                                                       monkeypatch):
    from conftest import stopped_and_resumed

    from capture import load_model

    def cfgs(out):
        return [gpt2_clt_cfg(tiny_gpt2_dir, sae_type=v, run_name=v, output_dir=str(tmp_path / out),
                             skip_connection=v == "topk", cache_dir=str(tmp_path / "cache"),
                             cache_dtype="float16", **extra)
                for v, extra in (("topk", {}), ("jumprelu", {"target_l0": 6.0}))]
    model = load_model(str(tiny_gpt2_dir), "cpu")
    pairs = stopped_and_resumed(cfgs, model, tmp_path, monkeypatch)
    assert len(list((tmp_path / "cache").iterdir())) == 4  # every layer's input and target
    for wa, wb in pairs:
        assert "W_dec_later.0" in wa and "layers.1.W_enc" in wa
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_without_cross_layer_writes_each_layer_learns_exactly_as_its_own_transcoder():
    """cross_layer_writes=false, the baseline: the loss separates by layer, so every layer's
    gradients are those of a transcoder on that layer alone."""
    clt = build_sae(clt_cfg("batchtopk", cross_layer_writes=False))
    assert len(clt.W_dec_later) == 0 and hook_tag(clt.cfg).startswith("plt_")
    tcs = [build_sae(make_cfg("batchtopk", target_site="mlp_out", seed=n)) for n in range(N_LAYERS)]
    for layer, tc in zip(clt.layers, tcs, strict=True):
        assert torch.equal(layer.W_enc, tc.W_enc)  # layer n starts as the transcoder of seed n
        with torch.no_grad():
            layer.tokens_since_fired[:5] = clt.cfg["dead_after_tokens"] + 1
    x, y = layer_acts(11)
    out = clt(x, target=y)
    out.loss.backward()
    assert out.aux_loss > 0
    for n, (layer, tc) in enumerate(zip(clt.layers, tcs, strict=True)):
        tc.load_state_dict(layer.state_dict())
        tc(x[n], target=y[n]).loss.backward()
        for name, p in tc.named_parameters():
            torch.testing.assert_close(layer.get_parameter(name).grad, p.grad, msg=name)


def test_the_clt_sweep_sets_clts_beside_per_layer_transcoders_on_one_stream():
    import main
    from config import get_default_cfg, prepare_cfg
    from training import hook_points_of

    cfgs = main.sweep_clt(get_default_cfg())
    assert len(main.group_by_stream(cfgs)) == 1
    cfgs = [prepare_cfg(c, {"d_model": 384, "n_layers": 6, "n_ctx": 512}) for c in cfgs]
    assert len(hook_points_of(cfgs)) == 12  # every layer's MLP input and output, once
    tags = [(hook_tag(c), c["top_k"]) for c in cfgs]
    assert tags == [(f"{kind}_L0-5_mlp_in_to_mlp_out", k) for k in (8, 16, 32)
                    for kind in ("clt", "plt")]


def test_lazy_adam_freezes_an_idle_latents_decoders_to_later_layers():
    def after_steps(lazy: bool):
        t = make_trainee(clt_cfg("topk", device="cpu", lr=1e-2, lazy_adam=lazy, beta1=0.9,
                                 dead_after_tokens=10**9), total_steps=10, main=False)
        for step in range(3):
            x, y = layer_acts(20 + step)
            training_step(t, x, step, 10, False, target=y)
        with torch.no_grad():  # layer 0's latents 0-9 can no longer fire
            t.sae.layers[0].b_enc[:10] = -1e4
        before = t.sae.W_dec_later[0].detach().clone()
        x, y = layer_acts(30)
        training_step(t, x, 3, 10, False, target=y)
        return t.sae.W_dec_later[0], before
    later, before = after_steps(lazy=True)
    torch.testing.assert_close(later[:10], before[:10], rtol=0, atol=1e-6)  # renormalised only
    assert not torch.allclose(later[10:], before[10:])
    later, before = after_steps(lazy=False)  # without it Adam's momentum keeps moving them
    assert not torch.allclose(later[:10], before[:10], rtol=0, atol=1e-6)


def test_the_replacement_models_hooks_read_and_write_where_they_should(tiny_gpt2_dir,
                                                                       monkeypatch):
    """Closed loop: layer 1 reads the stream with target 0 replaced; open loop and a layer alone:
    every layer reads the clean stream; `only` writes its own target and no other."""
    from capture import load_model, model_dims, run_to_hooks
    from config import prepare_cfg, run_hook_points
    from metrics import replacement_hooks

    model = load_model(str(tiny_gpt2_dir), "cpu")
    cfg = prepare_cfg(gpt2_clt_cfg(tiny_gpt2_dir), model_dims(model))
    torch.manual_seed(0)
    clt = build_sae(cfg).eval()
    with torch.no_grad():
        clt.W_dec_later[0].normal_(0, 0.3)
    inputs, targets = run_hook_points(cfg)
    rows = model.to_tokens("To be, or not to be, that is the question")
    keep = torch.ones_like(rows, dtype=torch.bool)
    keep[:, 0] = False
    clean = [a[keep] for a in run_to_hooks(model, rows, [*inputs, *targets])]
    seen: dict[int, torch.Tensor] = {}
    for n, layer in enumerate(clt.layers):
        def record(x, n=n, encode=layer.encode):
            seen[n] = x.clone()
            return encode(x)
        monkeypatch.setattr(layer, "encode", record)

    def splice(open_loop: bool, only: int | None = None) -> list[torch.Tensor]:
        seen.clear()
        hooks = replacement_hooks(clt, model, rows, keep, False, inputs, targets, open_loop, only)
        return [a[keep] for a in run_to_hooks(model, rows, [*inputs, *targets], fwd_hooks=hooks)]

    closed = splice(open_loop=False)
    torch.testing.assert_close(seen[0], clean[0])
    y0 = clt.decode_layer([clt.layers[0].encode(clean[0])], [clean[0]], 0)

    def put(act, hook):
        act = act.clone()
        act[keep] = y0
        return act
    by_hand = run_to_hooks(model, rows, [inputs[1]], fwd_hooks=[(targets[0], put)])[0][keep]
    assert not torch.allclose(by_hand, clean[1])  # replacing target 0 changes layer 1's input
    torch.testing.assert_close(seen[1], by_hand)
    torch.testing.assert_close(closed[2], y0)
    splice(open_loop=True)
    for n in (0, 1):
        torch.testing.assert_close(seen[n], clean[n])
    alone = splice(open_loop=True, only=1)
    torch.testing.assert_close(seen[1], clean[1])
    torch.testing.assert_close(alone[2], clean[2])  # target 0 untouched
    assert not torch.allclose(alone[3], clean[3])
