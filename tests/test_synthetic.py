"""The synthetic source with known features (synthetic.py) and ground-truth metrics (metrics.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import small_cfg

from config import prepare_cfg
from metrics import ground_truth_metrics
from sae import build_sae
from synthetic import SyntheticFeatures, SyntheticStore

N, D, L0 = 512, 32, 8.0


def synthetic_cfg(**overrides) -> dict:
    return small_cfg(dataset_path="synthetic", model_name="synthetic", layer=0,
                     synthetic_features=N, synthetic_d=D, synthetic_l0=L0, dict_size=128, top_k=8,
                     eval_tokens=2048) | overrides


def test_samples_hold_the_requested_l0_and_respect_the_hierarchy():
    truth = SyntheticFeatures(N, D, L0, seed=0)
    x, fired = truth.sample(8192, torch.Generator().manual_seed(1))
    assert x.shape == (8192, D)
    assert abs(torch.bincount(fired[0], minlength=8192).float().mean().item() - L0) < 0.05 * L0
    on = torch.zeros(8192, N, dtype=torch.bool)
    on[fired[0], fired[1]] = True
    assert on.sum() == fired.shape[1]  # no feature twice in a sample
    children_on = on[:, truth.children]  # (samples, groups, siblings)
    assert (children_on.sum(-1) <= 1).all()  # siblings exclude each other
    assert (children_on.any(-1) <= on[:, truth.parents]).all()  # a child fires only with its parent
    assert children_on.any()
    one = truth.sample(1, torch.Generator().manual_seed(2))  # x: the bias plus the fired directions
    assert (one[0].shape == (1, D)
            and torch.allclose(one[0][0], truth.bias) == (one[1].shape[1] == 0))


def test_parents_are_the_frequent_features_and_fire_a_child_half_of_the_time(monkeypatch):
    import synthetic

    truth = SyntheticFeatures(N, D, L0, seed=0)
    free = torch.ones(N, dtype=torch.bool)
    free[truth.parents] = free[truth.children.flatten()] = False
    assert truth.p[truth.parents].min() >= truth.p[free].max()  # parents take the first Zipf ranks
    monkeypatch.setattr(synthetic, "MAGNITUDE_STD", 0.0)  # every magnitude 1: x = bias + directions
    x, fired = truth.sample(20000, torch.Generator().manual_seed(3))
    on = torch.zeros(20000, N, dtype=torch.bool)
    on[fired[0], fired[1]] = True
    parent_on, child_on = on[:, truth.parents], on[:, truth.children].any(-1)
    assert abs(child_on.sum() / parent_on.sum() - synthetic.CHILD_GIVEN_PARENT) < 0.03
    per_sibling = on[:, truth.children].sum((0, 1)).float()  # siblings j = 1..4 fire as j^-0.5
    weights = torch.arange(1, synthetic.SIBLINGS + 1).float().pow(-synthetic.ZIPF_EXPONENT)
    torch.testing.assert_close(per_sibling / per_sibling.sum(), weights / weights.sum(),
                               atol=0.02, rtol=0)
    reference = truth.bias.repeat(20000, 1).index_add_(0, fired[0], truth.directions[fired[1]])
    torch.testing.assert_close(x, reference, atol=1e-5, rtol=0)


def test_an_l0_the_features_cannot_reach_is_one_line():
    import pytest

    from config import ConfigError

    with pytest.raises(ConfigError, match="config synthetic_l0=400 is invalid: 512 features"):
        SyntheticFeatures(N, D, 400, seed=0)


def test_the_stream_is_seeded_and_resumes_exactly():
    store = SyntheticStore(synthetic_cfg())
    again = SyntheticStore(synthetic_cfg())
    assert (torch.equal(store.ground_truth.directions, again.ground_truth.directions)
            and torch.equal(store.eval_acts, again.eval_acts))
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v
             for k, v in store.state_dict().items()}
    ahead = [store.next_batch() for _ in range(3)]
    again.load_state_dict(state)
    assert all(torch.equal(a, again.next_batch()) for a in ahead)
    other = SyntheticStore(synthetic_cfg(seed=7))
    assert not torch.equal(store.ground_truth.directions, other.ground_truth.directions)
    import pytest

    from config import ConfigError

    with pytest.raises(ConfigError,
                       match="saved by generator version 1, this synthetic.py is version"):
        again.load_state_dict({k: v for k, v in state.items() if k != "version"})  # pre-versioning


def test_an_untrained_sae_scores_chance_and_the_answer_scores_one():
    store = SyntheticStore(synthetic_cfg())
    cfg = prepare_cfg(store.cfg | {"sae_type": "topk", "dict_size": N, "top_k": 8}, store.dims)
    sae = build_sae(cfg).eval()
    sae.init_from_batch(store.next_batch()[0], store.scales[0])
    untrained = ground_truth_metrics(sae, store.ground_truth.directions, store.eval_acts[0],
                                     store.ground_truth.eval_fired)
    random_rows = F.normalize(torch.randn(N, D, generator=torch.Generator().manual_seed(123)),
                              dim=-1)
    chance = (random_rows @ store.ground_truth.directions.T).abs()
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(chance.numpy(), maximize=True)
    assert abs(untrained["mcc"] - chance[rows, cols].mean().item()) < 0.03  # init lacks the answer
    with torch.no_grad():
        sae.W_dec.copy_(store.ground_truth.directions)
    planted = ground_truth_metrics(sae, store.ground_truth.directions, store.eval_acts[0],
                                   store.ground_truth.eval_fired)
    assert planted["mcc"] > 0.999 and planted["uniqueness"] == 1.0


def test_training_on_the_synthetic_source_reports_ground_truth_metrics(tmp_path):
    from training import train_sae

    cfg = synthetic_cfg(sae_type="batchtopk", num_tokens=256 * 30, output_dir=str(tmp_path),
                        run_name="synthetic")
    trainee = train_sae(cfg)
    metrics = trainee.final_metrics
    assert {"mcc", "uniqueness", "precision", "recall", "f1"} <= set(metrics)
    assert 0 <= metrics["f1"] <= 1 and 0 < metrics["mcc"] <= 1


def tree_truth(n: int = 512, d: int = 32):
    from synthetic import TreeFeatures

    return TreeFeatures(n, d, seed=0)


def dense_tree_sample(truth, n: int, gen: torch.Generator) -> torch.Tensor:
    """The plain reference of TreeFeatures.sample, straight from the description: every feature's
    copula z, the hierarchy level by level (a child only with its parent, one random sibling),
    magnitudes; (n, features)."""
    from synthetic import BRANCHING, CORRELATION_RANK

    z = torch.randn(n, CORRELATION_RANK, generator=gen) @ truth.factors.T + truth.own * torch.randn(
        n, truth.n, generator=gen)
    values = (truth.magnitude_mean
              + truth.magnitude_std * torch.randn(n, truth.n, generator=gen)).relu()
    values = values * (z > truth.threshold)
    for first, size, above in truth.levels:
        kids = slice(first, first + size)
        drawn = ((values[:, kids] > 0) & (values[:, above: above + size // BRANCHING] > 0
                                          ).repeat_interleave(BRANCHING, 1)).view(n, -1, BRANCHING)
        score = torch.rand(drawn.shape, generator=gen).masked_fill_(~drawn, -1)
        won = (drawn & (torch.arange(BRANCHING) == score.argmax(-1, keepdim=True))).view(n, -1)
        parent = values[:, above: above + size // BRANCHING].repeat_interleave(BRANCHING, 1)
        values[:, kids] = values[:, kids] * won * parent / truth.magnitude_mean[
            above: above + size // BRANCHING].repeat_interleave(BRANCHING)
    return values


def test_the_synthsaebench_generator_keeps_its_hierarchy_and_sums_its_fired_directions():
    truth = tree_truth()
    x, fired = truth.sample(5000, torch.Generator().manual_seed(1))  # over a chunk: chunks join up
    on = torch.zeros(5000, truth.n, dtype=torch.bool)
    on[fired[0], fired[1]] = True
    assert on.sum() == fired.shape[1] and truth.roots == 4 and truth.free == 340  # 4 trees of 85
    for first, size, above in truth.levels:
        kids = on[:, first: first + size].view(5000, -1, 4)
        assert (kids.sum(-1) <= 1).all()  # siblings exclude each other
        assert (kids.any(-1) <= on[:, above: above + size // 4]).all()  # a child needs its parent
        assert kids.any()
    directions = truth.directions[fired[1][fired[0] == 0]].T  # x = bias + positive multiples of
    solved = torch.linalg.lstsq(directions, x[0] - truth.bias).solution  # fired directions only
    assert (solved > 0).all() and torch.allclose(directions @ solved, x[0] - truth.bias, atol=1e-4)


def test_the_sparse_tree_sampler_matches_the_dense_reference():
    truth, n = tree_truth(), 40_000
    fast = torch.zeros(n, truth.n)
    _, fired = truth.sample(n, torch.Generator().manual_seed(2))
    fast[fired[0], fired[1]] = 1
    dense = dense_tree_sample(truth, n, torch.Generator().manual_seed(3))
    slow = (dense > 0).float()
    rate_fast, rate_slow = fast.mean(0), slow.mean(0)
    sigma = (rate_slow * (1 - rate_slow) / n).sqrt().clamp_min(1 / n)
    assert ((rate_fast - rate_slow).abs() / (sigma * 2 ** 0.5)).max() < 5.5  # all 512 rates at once
    l0_fast, l0_slow = fast.sum(1), slow.sum(1)
    assert abs(l0_fast.mean() - l0_slow.mean()) < 0.05 * l0_slow.mean()
    assert abs(l0_fast.var() / l0_slow.var() - 1) < 0.08  # copula's correlation: L0 varies as much
    independent = (rate_slow * (1 - rate_slow)).sum()  # the variance without any correlation
    assert l0_slow.var() > 1.2 * independent
    on_fast = fast[:, : truth.roots]  # roots' co-firing: the copula's pairwise correlations, alike
    on_slow = slow[:, : truth.roots]
    torch.testing.assert_close(torch.corrcoef(on_fast.T), torch.corrcoef(on_slow.T),
                               atol=0.04, rtol=0)


def test_the_synthsaebench_source_is_chosen_by_its_key_and_resumes_exactly():
    from synthetic import TreeFeatures

    store = SyntheticStore(synthetic_cfg(synthetic_generator="synthsaebench"))
    assert isinstance(store.truth, TreeFeatures)
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v
             for k, v in store.state_dict().items()}
    ahead = [store.next_batch() for _ in range(2)]
    store.load_state_dict(state)
    assert all(torch.equal(a, store.next_batch()) for a in ahead)
