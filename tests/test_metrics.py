"""Metric definitions against direct computations; evaluation leaves training state alone."""

from __future__ import annotations

import pytest
import torch
from conftest import small_cfg

from activation_store import ActivationsStore
from capture import model_dims
from config import prepare_cfg
from metrics import (
    evaluate,
    mean_kl,
    next_token_ce,
    reconstruction_metrics,
    recovered,
    total_variance,
)
from sae import build_sae


def test_total_variance_is_around_the_mean_not_zero():
    x = torch.randn(500, 8) + 10.0
    direct = ((x - x.mean(0)) ** 2).sum().item()
    assert total_variance(x) == pytest.approx(direct, rel=1e-6)
    assert total_variance(x) < 0.1 * (x**2).sum().item()


def test_kl_of_identical_distributions_is_zero_and_positive_otherwise():
    logits = torch.randn(2, 5, 11)
    assert mean_kl(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    assert mean_kl(logits, torch.randn(2, 5, 11)).item() > 0


def test_next_token_ce_matches_direct_loop():
    logits, tokens = torch.randn(2, 6, 7), torch.randint(0, 7, (2, 6))
    direct = torch.stack([-logits[b, t].log_softmax(-1)[tokens[b, t + 1]]
                          for b in range(2) for t in range(5)]).mean()
    assert next_token_ce(logits, tokens).item() == pytest.approx(direct.item(), rel=1e-5)


def test_reconstruction_metrics_match_direct_computation():
    cfg = small_cfg() | {"act_size": 16, "dict_size": 64, "sae_type": "topk", "top_k": 4}
    sae = build_sae(cfg).eval()
    sae.init_from_batch(torch.randn(100, 16) * 2 + 1, 0.5)
    x = torch.randn(300, 16) * 2 + 1
    m = reconstruction_metrics(sae, x, torch.device("cpu"), chunk=64)
    f = sae.encode(x)
    x_hat = sae.decode(f)
    nmse = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert m["nmse"] == pytest.approx(nmse.item(), rel=1e-5)
    assert m["explained_variance"] == pytest.approx(1 - nmse.item(), rel=1e-5)
    assert m["l0"] == pytest.approx((f != 0).float().sum(-1).mean().item())
    assert m["l1"] == pytest.approx(f.abs().sum(-1).mean().item(), rel=1e-5)
    assert m["cosine"] == pytest.approx(torch.cosine_similarity(x, x_hat, dim=-1).mean().item(),
                                        rel=1e-5)
    assert m["shrinkage"] == pytest.approx((x_hat.norm(dim=-1) / x.norm(dim=-1)).mean().item(),
                                           rel=1e-5)
    assert torch.allclose(m["density"], (f != 0).float().mean(0))


def test_evaluation_never_changes_training_state(minilm):
    cfg = prepare_cfg(small_cfg(sae_type="batchtopk"), model_dims(minilm))
    store = ActivationsStore(minilm, cfg)
    sae = build_sae(cfg).train()
    sae.init_from_batch(store.next_batch()[0], store.scale)
    sae.tokens_since_fired.random_(0, 5000)
    sae.threshold.fill_(0.7)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    rng_before, rows_before = store.generator.get_state(), store.rows_read
    torch_rng = torch.get_rng_state()
    metrics = evaluate(sae, store)
    assert sae.training
    assert all(torch.equal(before[k], v) for k, v in sae.state_dict().items())
    assert torch.equal(store.generator.get_state(), rng_before) and store.rows_read == rows_before
    assert torch.equal(torch.get_rng_state(), torch_rng)
    assert 0 <= metrics["downstream_recovered"] <= 1.5


class _FixedSplice(torch.nn.Module):
    """Stands in for an SAE: reconstruction = input (identity) or zeros."""

    def __init__(self, zero: bool):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.zero = zero

    def encode(self, x):
        return x

    def decode(self, f, x=None):
        return torch.zeros_like(f) if self.zero else f


@pytest.mark.parametrize("zero,expected", [(False, 1.0), (True, 0.0)])
def test_ce_recovered_is_one_for_identity_and_zero_for_ablation(tiny_gpt2_dir, zero, expected):
    from capture import load_model
    from metrics import downstream_metrics

    model = load_model(str(tiny_gpt2_dir), "cpu")
    tokens = torch.randint(1, model.cfg.d_vocab, (4, 16))
    keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[:, 0] = False
    m = downstream_metrics(_FixedSplice(zero), model, tokens, keep, "blocks.1.hook_resid_pre",
                           batch=2)
    assert m["ce_recovered"] == pytest.approx(expected, abs=1e-5)
    if not zero:
        assert m["kl"] == pytest.approx(0.0, abs=1e-6) \
            and m["ce_spliced"] == pytest.approx(m["ce_clean"])


def test_downstream_metrics_do_not_depend_on_how_the_rows_are_chunked(tiny_gpt2_dir):
    """5 rows in chunks of 2 (2 + 2 + 1) give the means over all rows, as one chunk of 5 does."""
    from capture import load_model
    from metrics import downstream_metrics

    model = load_model(str(tiny_gpt2_dir), "cpu")
    tokens = torch.randint(1, model.cfg.d_vocab, (5, 16),
                           generator=torch.Generator().manual_seed(0))
    keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[:, 0] = False
    half = _FixedSplice(zero=False)
    half.decode = lambda f, x=None: 0.5 * f  # a splice between identity and ablation
    chunked = downstream_metrics(half, model, tokens, keep, "blocks.1.hook_resid_pre", batch=2)
    whole = downstream_metrics(half, model, tokens, keep, "blocks.1.hook_resid_pre", batch=5)
    recovered = chunked.pop("ce_recovered"), whole.pop("ce_recovered")  # ratio of small differences
    assert chunked == pytest.approx(whole, rel=1e-5) \
        and recovered[0] == pytest.approx(recovered[1], abs=1e-3)


def test_recovered_endpoints():
    assert recovered(zero=5.0, spliced=3.0, clean=3.0) == 1.0
    assert recovered(zero=5.0, spliced=5.0, clean=3.0) == 0.0


def test_matryoshka_prefixes_are_evaluated_on_their_own():
    from config import get_default_cfg
    from metrics import reconstruction_metrics, total_variance
    from sae import build_sae

    cfg = get_default_cfg() | {"sae_type": "matryoshka", "act_size": 8, "dict_size": 32, "top_k": 4,
                               "matryoshka_groups": "8,24"}
    sae = build_sae(cfg).eval()
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    sae.init_from_batch(x, 1.3)
    metrics = reconstruction_metrics(sae, x, torch.device("cpu"), chunk=128)
    with torch.no_grad():
        f = sae.encode(x)
        f[:, 8:] = 0
        expected = (x - sae.decode(f)).pow(2).sum().item() / total_variance(x)
    assert metrics["nmse_prefix_8"] == pytest.approx(expected, rel=1e-5)
    assert "nmse_prefix_32" not in metrics  # the whole dictionary is nmse itself
