"""Transcoders: every variant reading one hook point and reconstructing another (docs/math.md §11).
The math first (the sparse path against the dense reference, the skip path, decode), then the pipeline."""

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
        torch.testing.assert_close(getattr(sparse, term), getattr(dense, term), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse.x_hat, dense.x_hat, rtol=1e-5, atol=1e-5)
    for name, g in grads[0].items():
        assert g.abs().sum() > 0, name  # every parameter learns, W_skip included
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("sae_type", tuple(SAE_CLASSES))
def test_transcoder_formulas(sae_type, skip):
    """pre = s_in x W_enc + b_enc (no b_dec); y_hat = (f W_dec + b_dec + s_in x W_skip) / s_out; the loss is
    ||s_out y - (f W_dec + b_dec + s_in x W_skip)||^2, and x_hat is the raw prediction of y."""
    sae = trained_transcoder(sae_type, skip=skip).eval()
    x = rand_x(seed=6)
    y = target_of(x)
    s_in, s_out = sae.scale, sae.target_scale
    pre = s_in * x @ sae.W_enc + sae.b_enc
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
    torch.testing.assert_close(sae.pre_activations(s * x), (s * x - sae.b_dec) @ sae.W_enc + sae.b_enc)
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
