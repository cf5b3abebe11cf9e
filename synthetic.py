"""Activations with known features, to ask whether an SAE finds the real ones (docs/math.md §10).

    x = sum_i c_i · a_i · d_i + b

from `synthetic_features` unit directions d_i in `synthetic_d` dimensions (many more features
than dimensions: superposition). Feature i fires (a_i = 1) with a Zipf-distributed probability
(exponent 0.5: a heavy tail) scaled so that a sample holds `synthetic_l0` features on average.
Firing is correlated: each sample is of one of a few kinds (contexts) that scale every
feature's odds. A quarter of the features are children, in groups of siblings under a
parent: a fired parent fires one of its children half of the time (siblings exclude each
other), and a child never fires without it. Parents are the most frequent features (general
features, with specific ones under them): the structure in which an SAE's latent for a parent
tends to absorb its children.
Magnitudes c_i are 1 + MAGNITUDE_STD·N(0, 1), at least 0.1; b is a fixed random bias. Every stream
(directions, structure, samples, the held-out set) has its own generator, seeded from `seed`
but never the SAE's, so the SAE cannot start out holding the answer. `SyntheticStore` serves
fresh samples with the interface of a TensorStore.

`synthetic_generator=synthsaebench` draws from `TreeFeatures` instead: this project's generator of
SynthSAEBench-16k's published description (trees of depth 3, a rank-25 copula, magnitudes by rank).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from activation_store import GroundTruth
from config import ConfigError, resolve_device, validate_cfg

STREAMS = {"directions": 1_000_003, "structure": 2_000_003, "eval": 3_000_017, "train": 4_000_037}
CHILD_FRACTION = 0.25  # of the features, in sibling groups under parents
SIBLINGS = 4  # children per parent
CHILD_GIVEN_PARENT = 0.5  # a fired parent fires one of its children this often
CONTEXTS, CONTEXT_SPREAD = 8, 0.5  # kinds of sample, and how much each scales the odds (log-normal)
ZIPF_EXPONENT = 0.5  # as SynthSAEBench-16k's: a heavy tail no SAE of this width can all learn
MAGNITUDE_STD = 0.25  # c_i = 1 + MAGNITUDE_STD * N(0, 1), at least 0.1
GENERATOR_VERSION = 2  # saved with a run's stream: runs of another version must not resume here


def _bernoulli_positions(p: Tensor, n: int, gen: torch.Generator,
                         spare: tuple[float, float] = (5, 3)) -> tuple[Tensor, Tensor]:
    """(sample, feature) of every success of independent Bernoulli(p[i]) trials over n samples,
    drawn as geometric gaps between successes: work grows with the successes, not with n x features.
    Each round draws the expected gaps plus `spare` (standard deviations, a constant) and repeats
    for the features not yet past n: fewer spare draws for many features of few successes each."""
    rows, cols = [], []
    pending, start = torch.nonzero(p > 0).squeeze(1), torch.zeros(len(p), dtype=torch.long)
    while pending.numel():
        q, expected = p[pending].double(), n * p[pending].double()
        draws = (expected + spare[0] * expected.sqrt() + spare[1]).ceil().long()
        feature = pending.repeat_interleave(draws)
        gaps = (torch.log(torch.rand(feature.shape, generator=gen, dtype=torch.float64))
                / torch.log1p(-q.repeat_interleave(draws))).floor().long() + 1
        ends, total = draws.cumsum(0), gaps.cumsum(0)
        before = (total - gaps)[ends - draws]  # the running sum before each feature's first gap
        position = total - before.repeat_interleave(draws) + start[feature] - 1
        keep = position < n
        rows.append(position[keep])
        cols.append(feature[keep])
        last = position[ends - 1]
        start[pending] = last + 1
        pending = pending[last < n]  # features whose draws did not reach the end yet
    return torch.cat(rows), torch.cat(cols)


class SyntheticFeatures:
    """The ground truth: directions, firing structure, a sampler of (activations, what fired)."""

    def __init__(self, n: int, d: int, l0: float, seed: int):
        gen = torch.Generator().manual_seed(seed + STREAMS["directions"])
        self.n, self.directions = n, torch.nn.functional.normalize(
            torch.randn(n, d, generator=gen), dim=-1)
        self.bias = 0.1 * torch.randn(d, generator=gen)
        gen = torch.Generator().manual_seed(seed + STREAMS["structure"])
        order = torch.randperm(n, generator=gen)  # which features are children, parents, free
        n_groups = int(CHILD_FRACTION * n) // SIBLINGS
        self.children = order[: n_groups * SIBLINGS].view(n_groups, SIBLINGS)
        self.parents = order[n_groups * SIBLINGS: n_groups * (SIBLINGS + 1)]
        independent = order[n_groups * SIBLINGS:]  # parents first: the most frequent are general
        weights = torch.zeros(n)  # Zipf over parents and free features; children fire via parents
        weights[independent] = torch.arange(1, len(independent) + 1).float().pow(-ZIPF_EXPONENT)
        self.p = self._scaled_to_l0(weights, l0)
        # which sibling a fired parent fires: Zipf weights j^-ZIPF_EXPONENT within the group
        sibling_weights = torch.arange(1, SIBLINGS + 1).float().pow(-ZIPF_EXPONENT)
        self.child_cdf = (sibling_weights / sibling_weights.sum()).cumsum(0)  # one for all groups
        self.p[self.children] = self.p[self.parents].unsqueeze(1) * CHILD_GIVEN_PARENT * (
            sibling_weights / sibling_weights.sum())  # each child's marginal rate, for reference
        # correlated firing: CONTEXTS kinds of sample, each scaling every independent feature's odds
        odds = torch.exp(CONTEXT_SPREAD * torch.randn(CONTEXTS, n, generator=gen))
        self.context_p = (self.p * odds / odds.mean(0)).clamp(max=0.9)  # the factors' mean is 1
        self.context_p[:, self.children.flatten()] = 0  # children fire only through their parents

    def _scaled_to_l0(self, weights: Tensor, l0: float) -> Tensor:
        """Probabilities proportional to `weights` (0 for children, each <= 0.5) of expected L0
        `l0`: a free feature counts p, a parent p plus a child CHILD_GIVEN_PARENT of the time."""
        counts = torch.ones(len(weights), dtype=torch.float64)
        counts[self.parents] += CHILD_GIVEN_PARENT
        lo, hi = 0.0, 1e6
        for _ in range(100):  # bisection on the scale
            mid = (lo + hi) / 2
            expected = ((weights.double() * mid).clamp(max=0.5) * counts).sum()
            lo, hi = (mid, hi) if expected < l0 else (lo, mid)
        if expected < 0.999 * l0:
            raise ConfigError(f"config synthetic_l0={l0} is invalid: {len(weights)} features with "
                              f"firing probabilities of at most 0.5 reach only "
                              f"{float(expected):.1f}; add features or lower")
        return (weights * lo).clamp(max=0.5).float()

    def sample(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """(activations (n, d), the fired (sample, feature) pairs (2, fires))."""
        sizes = torch.bincount(torch.randint(CONTEXTS, (n,), generator=gen),
                               minlength=CONTEXTS).tolist()
        rows, cols, offset = [], [], 0
        for k, size in enumerate(sizes):  # samples of one context form a block
            r, c = _bernoulli_positions(self.context_p[k], size, gen)
            rows.append(r + offset)
            cols.append(c)
            offset += size
        rows, cols = torch.cat(rows), torch.cat(cols)
        is_parent = torch.zeros(self.n, dtype=torch.long)
        is_parent[self.parents] = torch.arange(1, len(self.parents) + 1)
        group = is_parent[cols] - 1  # the sibling group of a fired parent (-1: not a parent)
        fired_parent = (group >= 0).nonzero().squeeze(1)
        g = group[fired_parent]
        fires = torch.rand(len(g), generator=gen) < CHILD_GIVEN_PARENT
        pick = (torch.rand(len(g), 1, generator=gen)
                > self.child_cdf).sum(1).clamp(max=SIBLINGS - 1)
        rows = torch.cat([rows, rows[fired_parent][fires]])
        cols = torch.cat([cols, self.children[g, pick][fires]])
        magnitude = (1 + MAGNITUDE_STD * torch.randn(len(rows), generator=gen)).clamp_min(0.1)
        codes = torch.sparse_coo_tensor(torch.stack([rows, cols]), magnitude, (n, self.n),
                                        check_invariants=False)
        x = torch.sparse.mm(codes, self.directions) + self.bias  # no (fires, d) copy of directions
        return x, torch.stack([rows, cols])


# synthetic_generator=synthsaebench: SynthSAEBench-16k's description, for n features in d dimensions
TREE_SHARE = 10_880 / 16_384  # in trees (128 trees of 85 at 16,384 features); the rest fire freely
BRANCHING, DEPTH = 4, 3  # children per node, levels below a root: a tree holds 1 + 4 + 16 + 64 = 85
P_MAX, P_MIN = 0.4, 5e-4  # firing probability, most to least frequent: Zipf 0.5 between
CORRELATION_RANK, CORRELATION_SCALE = 25, 0.1  # a low-rank Gaussian copula over which features fire
MAGNITUDE_MEAN = (5.0, 4.0)  # mean magnitude, most to least frequent: linear in rank between
MAGNITUDE_SPREAD = 0.5  # each feature's magnitude std is |N(0.5, 0.5^2)|
BIAS_NORM = 0.5
THINNING_BLOCK = 64  # samples sharing a bound of free features' p: a tighter one wastes fewer draws
CHUNK = 4096  # samples drawn at once: the free features' copula shifts are dense (chunk, features)


class TreeFeatures:
    """SynthSAEBench-16k's structure (docs/math.md §10): feature i is the (i+1)-th most frequent;
    trees (branching 4, depth 3) at the front, breadth first, whose children fire only with their
    parent, one at a time (a random winner among the siblings drawn), their probabilities divided by
    the parent's so each keeps its Zipf rate where it can; firing through a rank-25 Gaussian copula;
    magnitudes per feature, a child's scaled by its parent's; a bias of norm 0.5; no noise."""

    def __init__(self, n: int, d: int, seed: int):
        gen = torch.Generator().manual_seed(seed + STREAMS["directions"])
        self.n, self.directions = n, torch.nn.functional.normalize(
            torch.randn(n, d, generator=gen), dim=-1)
        self.bias = BIAS_NORM * torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0)
        gen = torch.Generator().manual_seed(seed + STREAMS["structure"])
        trees = int(TREE_SHARE * n) // sum(BRANCHING ** k for k in range(DEPTH + 1))
        self.roots = trees  # features 0..trees-1; then each level below, contiguous, breadth first
        self.levels: list[tuple[int, int, int]] = []  # (first feature, size, first of level above)
        above, start = 0, trees
        for depth in range(1, DEPTH + 1):
            self.levels.append((start, trees * BRANCHING ** depth, above))
            above, start = start, start + trees * BRANCHING ** depth
        self.free = start  # features from here on fire on their own
        rank = torch.arange(1, n + 1, dtype=torch.float64).pow(-0.5)
        # each feature's target rate
        self.p = (P_MIN + (P_MAX - P_MIN) * (rank - rank[-1]) / (1 - rank[-1])).float()
        self.q = self.p.clone()  # its draw probability: a child's given its parent, after exclusion
        for first, size, above in self.levels:
            given = (self.p[first: first + size].view(-1, BRANCHING)
                     / self.p[above: above + size // BRANCHING, None])
            self.q[first: first + size] = self._exclusion_compensated(given)
        factors = CORRELATION_SCALE * torch.randn(n, CORRELATION_RANK, generator=gen)
        self.factors, self.own = factors, (1 - factors.pow(2).sum(1)).clamp_min(1e-3).sqrt()
        self.threshold = torch.special.ndtri(1 - self.q.double()).float()  # P(z > threshold) = q
        self.magnitude_mean = torch.linspace(*MAGNITUDE_MEAN, n)
        self.magnitude_std = (MAGNITUDE_SPREAD
                              + MAGNITUDE_SPREAD * torch.randn(n, generator=gen)).abs()

    @staticmethod
    def _exclusion_compensated(target: Tensor, iterations: int = 50) -> Tensor:
        """Per sibling group (rows), draw probabilities q whose winner (random among those drawn)
        fires at `target` given the parent, as near as q <= 1 allows (fixed-point iteration)."""
        others = torch.tensor([[(c >> k) & 1 for k in range(BRANCHING - 1)]
                               for c in range(2 ** (BRANCHING - 1))])
        share = 1 / (1 + others.sum(1).double())  # a winner's chance with this many others drawn
        q = target.double().clamp(max=1)
        for _ in range(iterations):
            won = []
            for j in range(BRANCHING):
                rest = torch.cat([q[:, :j], q[:, j + 1:]], 1).unsqueeze(1)  # (groups, 1, others)
                odds = torch.where(others.bool(), rest, 1 - rest).prod(-1)  # P(each draw pattern)
                won.append(q[:, j] * (odds * share).sum(-1))
            q = (q * target.double() / torch.stack(won, 1).clamp_min(1e-12)).clamp(max=1)
        return q.flatten().float()

    def _fires(self, shift: Tensor, features: Tensor | slice, gen: torch.Generator) -> Tensor:
        """Whether z = shift + own·N(0, 1) passes each feature's threshold (`shift`: the copula's,
        one per draw)."""
        return (shift + self.own[features] * torch.randn(shift.shape, generator=gen)
                > self.threshold[features])

    def _magnitudes(self, features: Tensor, gen: torch.Generator) -> Tensor:
        return (self.magnitude_mean[features] + self.magnitude_std[features]
                * torch.randn(features.shape, generator=gen)).relu_()

    def sample(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """(activations (n, d), the fired (sample, feature) pairs (2, fires)). Drawn sparsely,
        exactly: roots densely; free features by thinning (Bernoulli draws at each feature's largest
        probability over the samples, each kept with its sample's probability over that); a level's
        children only under fired parents. A magnitude of 0 counts as unfired, firing no child."""
        if n > CHUNK:
            parts = [self.sample(min(CHUNK, n - start), gen) for start in range(0, n, CHUNK)]
            fired = torch.cat([f + torch.tensor([[i * CHUNK], [0]])
                               for i, (_, f) in enumerate(parts)], 1)
            return torch.cat([x for x, _ in parts]), fired
        eps = torch.randn(n, CORRELATION_RANK, generator=gen)
        rows, cols = self._fires(eps @ self.factors[: self.roots].T, slice(0, self.roots),
                                 gen).nonzero().unbind(1)
        values = self._magnitudes(cols, gen)
        found = [(rows, cols, values)]
        for first, _size, above in self.levels:  # top down: fired features draw their children
            rows, cols, values = (t[values > 0] for t in (rows, cols, values))
            # (parents, siblings)
            kids = first + (cols - above).unsqueeze(1) * BRANCHING + torch.arange(BRANCHING)
            drawn = self._fires((eps[rows].unsqueeze(1) * self.factors[kids]).sum(-1), kids, gen)
            score = torch.rand(drawn.shape, generator=gen).masked_fill_(~drawn, -1)
            won = drawn & (torch.arange(BRANCHING) == score.argmax(-1, keepdim=True))  # one winner
            # the parent's scale
            follows = (values / self.magnitude_mean[cols]).unsqueeze(1).expand_as(kids)[won]
            rows, cols = rows.unsqueeze(1).expand_as(kids)[won], kids[won]
            values = self._magnitudes(cols, gen) * follows
            found.append((rows, cols, values))
        free = slice(self.free, self.n)
        shift = eps @ self.factors[free].T  # dense (n, free), only a matmul: the draws are sparse
        scale, threshold = self.own[free].double(), self.threshold[free].double()
        blocks = -(-n // THINNING_BLOCK)  # a block draws at its own largest probability per feature
        padded = torch.cat([shift, shift.new_full((blocks * THINNING_BLOCK - n, shift.shape[1]),
                                                  -torch.inf)])
        top = padded.view(blocks, THINNING_BLOCK, -1).amax(1).double()
        bound = torch.special.ndtr((top - threshold) / scale).flatten()  # (blocks x features)
        at, which = _bernoulli_positions(bound, THINNING_BLOCK, gen, spare=(1, 1))
        rows, cols = which // shift.shape[1] * THINNING_BLOCK + at, which % shift.shape[1]
        rows, cols, bound = rows[rows < n], cols[rows < n], bound[which[rows < n]]
        p = torch.special.ndtr((shift[rows, cols].double() - threshold[cols]) / scale[cols])
        keep = torch.rand(len(rows), generator=gen, dtype=torch.float64) * bound < p
        rows, cols = rows[keep], cols[keep] + self.free
        found.append((rows, cols, self._magnitudes(cols, gen)))
        rows, cols, values = (torch.cat(parts) for parts in zip(*found, strict=True))
        fired = values > 0
        order = torch.argsort(rows[fired], stable=True)  # sample by sample: one embedding bag each
        rows, cols, values = rows[fired][order], cols[fired][order], values[fired][order]
        offsets = torch.cat([rows.new_zeros(1), torch.bincount(rows, minlength=n).cumsum(0)[:-1]])
        x = torch.nn.functional.embedding_bag(cols, self.directions, offsets, mode="sum",
                                              per_sample_weights=values)
        return x + self.bias, torch.stack([rows, cols])


class SyntheticStore:
    """Fresh synthetic samples, `batch_size` at a time, with a held-out set of `eval_tokens` samples
    and the ground truth for its metrics (`ground_truth`: the directions, and the held-out (sample,
    feature) pairs). No model: downstream metrics are skipped."""

    def __init__(self, cfg: dict[str, Any]):
        validate_cfg(cfg)
        self.cfg = cfg
        self.dims = {"d_model": cfg["synthetic_d"], "n_layers": cfg["layer"] + 1,
                     "n_ctx": cfg["seq_len"]}
        n, d = cfg["synthetic_features"], cfg["synthetic_d"]
        self.truth = (TreeFeatures(n, d, cfg["seed"])
                      if cfg["synthetic_generator"] == "synthsaebench"
                      else SyntheticFeatures(n, d, cfg["synthetic_l0"], cfg["seed"]))
        eval_acts, eval_fired = self.truth.sample(cfg["eval_tokens"], self._generator("eval"))
        self.ground_truth = GroundTruth(self.truth.directions, eval_fired)
        self.eval_acts = eval_acts.unsqueeze(0)
        self.device = torch.device(resolve_device(cfg["device"]))
        self.sharded, self.downstream = False, None
        self.generator = self._generator("train")
        self.scales = [math.sqrt(cfg["synthetic_d"] / eval_acts.pow(2).sum(-1).mean().item())]

    def _generator(self, stream: str) -> torch.Generator:
        return torch.Generator().manual_seed(self.cfg["seed"] + STREAMS[stream])

    def hook_index(self, hook_point: str) -> int:
        return 0

    def next_batch(self) -> Tensor:
        return self.truth.sample(self.cfg["batch_size"],
                                 self.generator)[0].to(self.device).unsqueeze(0)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "scales": list(self.scales),
                "version": GENERATOR_VERSION}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version", 1) != GENERATOR_VERSION:
            raise ConfigError(f"this run's synthetic stream was saved by generator version "
                              f"{state.get('version', 1)}, this synthetic.py is version "
                              f"{GENERATOR_VERSION}: its data would change mid-run; "
                              "train it again from the start")
        self.generator.set_state(state["generator"])
        self.scales = [float(s) for s in state["scales"]]

    def finish(self) -> None:
        pass
