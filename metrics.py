"""Evaluation metrics (docs/math.md §5): pure tensor functions, then `evaluate`, which runs
them on the held-out set; and `SUMMARY_METRICS`, the metrics a run is summarised by."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from activation_store import ActivationSource
from capture import is_causal_lm, run_to_hook, run_to_hooks
from clt import CrossLayerTranscoder
from config import run_hook_points
from sae import BaseSAE

DENSE_FRACTION = 0.1  # a latent firing on more than this fraction of eval tokens is dense
# The metrics a run is summarised by, headline first: results.py's report shows every one present,
# the terminal tables (main.py, `python results.py`) the HEADLINE_METRICS present, so that a row
# fits ~120 columns (an encoder has downstream_recovered, a causal LM ce_recovered and kl, a
# synthetic source mcc and f1, never two of these).
SUMMARY_METRICS = ("l0", "explained_variance", "nmse", "cosine", "dead", "dense",
                   "downstream_recovered", "mcc", "f1", "ce_recovered", "kl", "shrinkage",
                   "never_fired_eval_frac", "ce_clean", "ce_spliced", "uniqueness", "precision",
                   "recall")
HEADLINE_METRICS = SUMMARY_METRICS[: SUMMARY_METRICS.index("kl") + 1]


# --- pure metrics -------------------------------------------------------------------------

@dataclass
class ReconstructionSums:
    """Running sums over evaluation chunks, so a large dictionary never needs (N, m) at once."""

    sq_err: float = 0.0
    l0: float = 0.0
    l1: float = 0.0
    cosine: float = 0.0
    shrinkage: float = 0.0
    n: int = 0
    fire_counts: Tensor | None = None

    def add(self, x: Tensor, x_hat: Tensor, f: Tensor, decoder_norms: Tensor) -> None:
        self.sq_err += (x - x_hat).pow(2).sum().item()
        self.l0 += (f != 0).sum().item()
        self.l1 += (f.abs() * decoder_norms).sum().item()
        self.cosine += F.cosine_similarity(x, x_hat, dim=-1).sum().item()
        self.shrinkage += (x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).sum().item()
        counts = (f != 0).sum(0).double()
        self.fire_counts = counts if self.fire_counts is None else self.fire_counts + counts
        self.n += x.shape[0]


def total_variance(x: Tensor) -> float:
    """sum ||x - mean(x)||^2 over tokens and dims (variance around the mean, not 0)."""
    return (x.double() - x.double().mean(0)).pow(2).sum().item()


def next_token_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """Mean next-token cross-entropy over all positions of all rows."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


def mean_kl(clean_logits: Tensor, other_logits: Tensor) -> Tensor:
    """Mean over positions of KL(clean next-token distribution || other)."""
    p_log = F.log_softmax(clean_logits.float(), dim=-1)
    q_log = F.log_softmax(other_logits.float(), dim=-1)
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean()


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """Mean over tokens of 1 - cos(a, b)."""
    return (1 - F.cosine_similarity(a, b, dim=-1)).mean()


def recovered(zero: float, spliced: float, clean: float) -> float:
    """(zero - spliced) / (zero - clean): 1 for a perfect splice, 0 for zero-ablation."""
    return (zero - spliced) / (zero - clean) if zero != clean else float("nan")


# --- density and decoder structure ---------------------------------------------------------

NEAR_DUPLICATE_COSINE = 0.9  # a decoder row this close (signed cosine) to another is a duplicate


class DensityStats(NamedTuple):
    dense: int  # latents firing on more than DENSE_FRACTION of the held-out tokens
    never_fired_frac: float  # fraction of latents firing on none of them


def density_stats(density: Tensor) -> DensityStats:
    """From per-latent firing frequencies on the held-out set (compared in their own dtype)."""
    return DensityStats(int((density > DENSE_FRACTION).sum()),
                        float((density == 0).double().mean()))


class DecoderStructure(NamedTuple):
    max_abs_cosine: float  # max over pairs i != j of |cos(W_dec,i, W_dec,j)|
    mean_abs_cosine: float  # mean over the m(m-1) ordered pairs i != j
    near_duplicates: int  # latents i with cos(W_dec,i, W_dec,j) > NEAR_DUPLICATE_COSINE for some j


@torch.no_grad()
def decoder_structure(w_dec: Tensor, chunk: int = 512) -> DecoderStructure:
    """Pairwise cosines of the decoder rows (m, d), `chunk` rows against all at a time so that no
    (m, m) matrix is held; all latents, dead ones included."""
    w = F.normalize(w_dec.detach().float(), dim=-1)
    m = len(w)
    abs_sum, abs_max = 0.0, 0.0
    duplicated = torch.zeros(m, dtype=torch.bool, device=w.device)
    for start in range(0, m, chunk):
        cos = w[start:start + chunk] @ w.T
        rows = torch.arange(len(cos), device=w.device)
        cos[rows, rows + start] = 0  # a row with itself: 0 counts towards neither sum nor max
        duplicated[start:start + chunk] = (cos > NEAR_DUPLICATE_COSINE).any(1)
        cos.abs_()  # in place: one (chunk, m) block at a time
        abs_sum += cos.sum(dtype=torch.float64).item()
        abs_max = max(abs_max, cos.max().item())
    pairs = m * (m - 1)
    return DecoderStructure(abs_max, abs_sum / pairs if pairs else float("nan"),
                            int(duplicated.sum()))


def structure_metrics(sae: BaseSAE | CrossLayerTranscoder) -> dict[str, float]:
    """The decoder structure under the names logged (none for a CLT: a decoder per layer)."""
    if isinstance(sae, CrossLayerTranscoder):
        return {}
    structure = decoder_structure(sae.W_dec)
    return {"decoder_max_cos": structure.max_abs_cosine,
            "decoder_mean_cos": structure.mean_abs_cosine,
            "near_duplicates": structure.near_duplicates}


# --- sparse probing ---------------------------------------------------------------------------

PROBE_KS = (1, 2, 5, 10, 20)
PROBE_L2 = 1e-3  # weight of (1/2)||w||^2 beside the mean cross-entropy: separable data stays finite


def fit_logistic_probe(x: Tensor, y: Tensor, l2: float = PROBE_L2,
                       max_iter: int = 100) -> tuple[Tensor, Tensor]:
    """Binary logistic regression: (w, b) minimising mean_n BCE(x_n w + b, y_n) + (l2/2)||w||^2,
    by L-BFGS (strong Wolfe line search) in float64."""
    x, y = x.double(), y.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimiser.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y) + l2 / 2 * w.pow(2).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        optimiser.step(closure)
    return w.detach(), b.detach()


def probe_accuracy(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor) -> float:
    """Held-out accuracy of a logistic probe fit on features standardised by the training split's
    mean and standard deviation (a constant feature stays 0)."""
    x_train, x_test = x_train.double(), x_test.double()
    mean, std = x_train.mean(0), x_train.std(0)
    std = torch.where(std > 0, std, 1.0)
    w, b = fit_logistic_probe((x_train - mean) / std, y_train)
    predicted = ((x_test - mean) / std @ w + b) > 0
    return float((predicted == y_test.bool()).double().mean())


def top_mean_difference(x: Tensor, y: Tensor, k: int) -> Tensor:
    """The k columns of x whose means over y = 1 and y = 0 differ most in absolute value."""
    y = y.bool()
    return (x[y].double().mean(0) - x[~y].double().mean(0)).abs().topk(k).indices


class ProbeScores(NamedTuple):
    sae: dict[int, float]  # k -> accuracy on the k latents of largest class mean difference
    random: dict[int, float]  # k -> accuracy on the projections onto k random unit directions
    dense: float  # accuracy on every coordinate of the raw activations


def sparse_probing(latents: tuple[Tensor, Tensor], acts: tuple[Tensor, Tensor],
                   labels: tuple[Tensor, Tensor], ks: tuple[int, ...] = PROBE_KS,
                   seed: int = 0) -> ProbeScores:
    """Held-out accuracy of binary probes; each argument is a (train, test) pair: pooled SAE
    latents (n, m), pooled raw activations (n, d), labels (n,) in {0, 1}. The k latents and the
    random directions are chosen on the training split alone."""
    (f_train, f_test), (a_train, a_test), (y_train, y_test) = latents, acts, labels
    if max(ks) > f_train.shape[1]:
        raise ValueError(f"sparse probing takes up to {max(ks)} latents; this SAE has "
                         f"{f_train.shape[1]}: probe an SAE of more latents")
    generator = torch.Generator().manual_seed(seed)
    sae, random = {}, {}
    for k in ks:
        chosen = top_mean_difference(f_train, y_train, k)
        sae[k] = probe_accuracy(f_train[:, chosen], y_train, f_test[:, chosen], y_test)
        directions = F.normalize(torch.randn(a_train.shape[1], k, generator=generator), dim=0)
        random[k] = probe_accuracy(a_train.float() @ directions, y_train,
                                   a_test.float() @ directions, y_test)
    return ProbeScores(sae, random, probe_accuracy(a_train, y_train, a_test, y_test))


# --- evaluation ---------------------------------------------------------------------------

@torch.no_grad()
def reconstruction_metrics(sae: BaseSAE, eval_acts: Tensor, device: torch.device, chunk: int = 4096,
                           eval_targets: Tensor | None = None) -> dict[str, Any]:
    """Against the input, or a transcoder's `eval_targets` (the same tokens at its target hook)."""
    sums = ReconstructionSums()
    decoder_norms = sae.W_dec.norm(dim=-1)
    # nested groups (Matryoshka): each prefix but the whole dictionary scored alone, the latents
    # past its end set to 0
    prefix_ends = (sae.group_ends(sae.cfg) or [])[:-1]
    partial = dict.fromkeys((f"prefix_{end}" for end in prefix_ends), 0.0)  # squared errors
    targets = eval_acts if eval_targets is None else eval_targets
    for x, y in zip(eval_acts.split(chunk), targets.split(chunk), strict=True):
        x, y = x.to(device), y.to(device)
        f = sae.encode(x)
        sums.add(y, sae.decode(f, x), f, decoder_norms)
        latent = torch.arange(f.shape[-1], device=f.device)
        for end in prefix_ends:
            y_hat = sae.decode(f * (latent < end), x)
            partial[f"prefix_{end}"] += (y - y_hat).pow(2).sum().item()
    m = sae.cfg["dict_size"]
    density = sums.fire_counts / sums.n
    nmse = sums.sq_err / total_variance(targets)
    dead = int(sae.dead_mask().sum().item())
    stats = density_stats(density)
    return {
        "l0": sums.l0 / sums.n,
        "l1": sums.l1 / sums.n,
        "nmse": nmse,
        "explained_variance": 1 - nmse,
        "cosine": sums.cosine / sums.n,
        "shrinkage": sums.shrinkage / sums.n,
        "dead": dead,
        "dead_frac": dead / m,
        "dense": stats.dense,
        "never_fired_eval_frac": stats.never_fired_frac,
        "density": density.float().cpu(),
    } | {f"nmse_{name}": sq_err / total_variance(targets) for name, sq_err in partial.items()}


def splice_hooks(sae: BaseSAE, keep: Tensor, zero: bool, hook_point: str,
                 target: str | None = None) -> list:
    """Forward hooks that replace the activation at `target` (an SAE: at `hook_point`) at the kept
    positions by the SAE's output for the `hook_point` input of the same forward, or by zeros."""
    seen: dict[str, Tensor] = {}

    def read(act: Tensor, hook) -> None:
        seen["x"] = act[keep].float()

    def write(act: Tensor, hook) -> Tensor:
        act = act.clone()
        x = seen.pop("x") if target else act[keep].float()
        act[keep] = (torch.zeros_like(act[keep]) if zero
                     else sae.decode(sae.encode(x), x)).to(act.dtype)
        return act
    return [(hook_point, read), (target, write)] if target else [(hook_point, write)]


def _final_hidden(model, tokens: Tensor, hooks: list) -> Tensor:
    """The encoder's last block output, with `hooks` applied on the way."""
    return run_to_hook(model, tokens, f"blocks.{model.cfg.n_layers - 1}.hook_resid_post",
                       hooks).float()


@torch.no_grad()
def downstream_metrics(sae: BaseSAE, model, tokens: Tensor, keep: Tensor, hook_point: str,
                       batch: int, target: str | None = None) -> dict[str, float]:
    """Splice the reconstruction (and zeros) into the model at the kept positions (docs/math.md §5);
    a transcoder's output replaces its `target` activation."""
    def hooks(rows: Tensor, mask: Tensor, zero: bool) -> list:
        return splice_hooks(sae, mask, zero, hook_point, target)
    return splice_metrics(model, tokens, keep, batch, next(sae.parameters()).device, hooks)


def replacement_hooks(clt: CrossLayerTranscoder, model, rows: Tensor, keep: Tensor, zero: bool,
                      inputs: list[str], targets: list[str], open_loop: bool,
                      only: int | None = None) -> list:
    """Hooks that replace every target of the CLT at once by its reconstruction (or zeros), or
    the `only`-th alone. Closed loop: each layer's latents come from the spliced model's own input
    at that layer; open loop: from the clean run's (docs/math.md §12)."""
    seen: list[Tensor] = []  # each layer's raw input at the kept positions, in layer order
    if open_loop and not zero:
        seen = [act[keep].float() for act in run_to_hooks(model, rows, inputs)]
    latents: list[Tensor] = []

    def read(act: Tensor, hook) -> None:
        seen.append(act[keep].float())

    def write(act: Tensor, hook, n: int) -> Tensor:
        act = act.clone()
        if zero:
            act[keep] = 0
            return act
        latents.extend(clt.layers[i].encode(seen[i]) for i in range(len(latents), n + 1))
        act[keep] = clt.decode_layer(latents, seen, n).to(act.dtype)
        return act
    writes = [(t, functools.partial(write, n=n)) for n, t in enumerate(targets)
              if only is None or n == only]
    return writes if open_loop or zero else [*((h, read) for h in inputs), *writes]


@torch.no_grad()
def splice_metrics(model, tokens: Tensor, keep: Tensor, batch: int, device: torch.device,
                   make_hooks: Callable[[Tensor, Tensor, bool], list]) -> dict[str, float]:
    """Downstream metrics of the hooks `make_hooks(rows, mask, zero)` against the clean model: for
    a causal LM CE and KL recovered, for an encoder the final hidden state's (docs/math.md §5)."""
    causal = is_causal_lm(model)
    totals = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl": 0.0}  # per-chunk means times rows
    for rows, mask in zip(tokens.split(batch), keep.split(batch), strict=True):
        rows, mask = rows.to(device), mask.to(device)
        spliced = make_hooks(rows, mask, False)
        zeroed = make_hooks(rows, mask, True)
        if causal:
            clean_logits = model(rows)
            spliced_logits = model.run_with_hooks(rows, fwd_hooks=spliced)
            zero_logits = model.run_with_hooks(rows, fwd_hooks=zeroed)
            totals["clean"] += next_token_ce(clean_logits, rows).item() * len(rows)
            totals["spliced"] += next_token_ce(spliced_logits, rows).item() * len(rows)
            totals["zero"] += next_token_ce(zero_logits, rows).item() * len(rows)
            totals["kl"] += mean_kl(clean_logits, spliced_logits).item() * len(rows)
        else:
            clean = _final_hidden(model, rows, [])
            totals["spliced"] += (cosine_distance(clean, _final_hidden(model, rows, spliced)).item()
                                  * len(rows))
            totals["zero"] += (cosine_distance(clean, _final_hidden(model, rows, zeroed)).item()
                               * len(rows))
    mean = {k: v / len(tokens) for k, v in totals.items()}  # every row has as many positions
    if causal:
        return {"ce_clean": mean["clean"], "ce_spliced": mean["spliced"], "ce_zero": mean["zero"],
                "ce_recovered": recovered(mean["zero"], mean["spliced"], mean["clean"]),
                "kl": mean["kl"]}
    return {"downstream_recovered": recovered(mean["zero"], mean["spliced"], 0.0)}


@torch.no_grad()
def ground_truth_metrics(sae: BaseSAE, true_features: Tensor, eval_acts: Tensor, eval_fired: Tensor,
                         chunk: int = 4096) -> dict[str, float]:
    """Against known feature directions (docs/math.md §10): `mcc`, the mean |cosine| of decoder rows
    and true features under the best one-to-one matching (scipy's assignment solver); `uniqueness`,
    the fraction of alive latents whose best-matching feature no other alive latent shares; and the
    mean over alive latents of `precision`, `recall` and `f1` of "the latent fires" as a detector of
    "its best feature fires" on held-out samples (`eval_fired`: their (sample, feature) pairs)."""
    from scipy.optimize import linear_sum_assignment

    device = sae.W_dec.device
    cos = (F.normalize(sae.W_dec.float(), dim=-1)
           @ F.normalize(true_features.to(device).float(), dim=-1).T).abs()
    matched_rows, matched_cols = linear_sum_assignment(cos.cpu().numpy(), maximize=True)
    fires = torch.cat([sae.encode(x.to(device)) > 0
                       for x in eval_acts.split(chunk)]).cpu()  # (N, m)
    alive = fires.any(0).nonzero().squeeze(1)
    best = cos.argmax(1).cpu()[alive]  # each alive latent's best-matching feature
    column = torch.full((true_features.shape[0],), -1)  # only matched features get a column
    needed = best.unique()
    column[needed] = torch.arange(len(needed))
    keep = column[eval_fired[1]] >= 0
    truth = torch.zeros(len(fires), len(needed), dtype=torch.bool)
    truth[eval_fired[0][keep], column[eval_fired[1][keep]]] = True
    wanted = truth[:, column[best]]  # (N, alive): whether each alive latent's feature fired
    detected = fires[:, alive]
    hits = (detected & wanted).sum(0).double()
    precision = hits / detected.sum(0).double()  # alive: it fired at least once
    recall = hits / wanted.sum(0).double().clamp_min(1)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    unique = torch.bincount(best).index_select(0, best) == 1
    per_latent = {"uniqueness": unique.double(), "precision": precision, "recall": recall, "f1": f1}
    return {"mcc": float(cos[matched_rows, matched_cols].mean())} | {
        name: float(values.mean()) if len(best) else 0.0 for name, values in per_latent.items()}


@torch.no_grad()
def cross_layer_metrics(clt: CrossLayerTranscoder, store: ActivationSource,
                        chunk: int = 4096) -> dict[str, Any]:
    """Per target layer (suffix _L<layer>) and overall: nmse and explained variance (overall: the
    mean over layers, each in its own units), cosine and shrinkage (overall only: the mean over
    layers and tokens), L0 (overall: the mean per layer; l0_total: summed),
    dead latents; and the replacement model's downstream metrics, closed loop and open loop, and
    per target layer replaced alone (the recovered fractions and KL, suffix _L<layer>)."""
    inputs, targets = run_hook_points(clt.cfg)
    x_all = store.eval_acts[[store.hook_index(h) for h in inputs]]
    y_all = store.eval_acts[[store.hook_index(h) for h in targets]]
    n_layers = len(inputs)
    sq_err = torch.zeros(n_layers, dtype=torch.float64)
    l0, cosine, shrinkage = (torch.zeros(n_layers, dtype=torch.float64) for _ in range(3))
    fire_counts = torch.zeros(n_layers, clt.cfg["dict_size"], dtype=torch.float64)
    for x, y in zip(x_all.split(chunk, dim=1), y_all.split(chunk, dim=1), strict=True):
        x, y = x.to(store.device), y.to(store.device)
        f = clt.encode(x)
        y_hat = clt.decode(f, x)
        sq_err += (y - y_hat).double().pow(2).sum((1, 2)).cpu()
        cosine += F.cosine_similarity(y, y_hat, dim=-1).double().sum(1).cpu()
        shrinkage += (y_hat.norm(dim=-1) / y.norm(dim=-1).clamp_min(1e-12)).double().sum(1).cpu()
        l0 += (f != 0).sum((1, 2)).double().cpu()
        fire_counts += (f != 0).sum(1).double().cpu()
    n = x_all.shape[1]
    nmse = sq_err / torch.tensor([total_variance(y) for y in y_all], dtype=torch.float64)
    dead = clt.dead_mask().sum(-1).cpu()
    density = fire_counts / n
    stats = density_stats(density)
    metrics: dict[str, Any] = {
        "l0": float(l0.mean() / n), "l0_total": float(l0.sum() / n), "nmse": float(nmse.mean()),
        "explained_variance": float(1 - nmse.mean()), "dead": int(dead.sum()),
        "cosine": float(cosine.mean() / n), "shrinkage": float(shrinkage.mean() / n),
        "dead_frac": float(dead.sum()) / density.numel(),
        "dense": stats.dense,
        "never_fired_eval_frac": stats.never_fired_frac,
        "density": density.flatten().float(),
    }
    for layer, e, z, d in zip(clt.layer_ids, nmse.tolist(), (l0 / n).tolist(), dead.tolist(),
                              strict=True):
        metrics |= {f"nmse_L{layer}": e, f"explained_variance_L{layer}": 1 - e,
                    f"l0_L{layer}": z, f"dead_L{layer}": int(d)}
    splice = store.downstream
    if splice is not None:
        device = next(clt.parameters()).device
        for loop, suffix in ((False, ""), (True, "_open_loop")):
            found = splice_metrics(splice.model, splice.tokens, splice.keep, splice.batch, device,
                                   functools.partial(_replacement, clt, splice.model, inputs,
                                                     targets, loop))
            metrics |= {name + suffix: value for name, value in found.items()}
        for n, layer in enumerate(clt.layer_ids):  # one target alone (its inputs are clean)
            found = splice_metrics(splice.model, splice.tokens, splice.keep, splice.batch, device,
                                   functools.partial(_replacement, clt, splice.model, inputs,
                                                     targets, True, only=n))
            metrics |= {f"{name}_L{layer}": value for name, value in found.items()
                        if name.endswith("recovered") or name == "kl"}
    return metrics


def _replacement(clt, model, inputs, targets, open_loop, rows, mask, zero,
                 only: int | None = None) -> list:
    return replacement_hooks(clt, model, rows, mask, zero, inputs, targets, open_loop, only)


def evaluate(sae: BaseSAE | CrossLayerTranscoder, store: ActivationSource) -> dict[str, Any]:
    """All docs/math.md §5 metrics on the held-out set, in raw space, with the inference encoder
    (a CLT's: `cross_layer_metrics`). Touches no training state: counters, threshold and RNG are
    only read."""
    was_training = sae.training
    sae.eval()
    try:
        if isinstance(sae, CrossLayerTranscoder):
            return cross_layer_metrics(sae, store)
        hook_point, target = sae.cfg["hook_point"], sae.cfg.get("target_hook_point") or None
        targets = store.eval_acts[store.hook_index(target)] if target else None
        metrics = reconstruction_metrics(sae, store.eval_acts[store.hook_index(hook_point)],
                                         store.device, eval_targets=targets)
        truth = store.ground_truth
        if truth is not None:
            metrics.update(ground_truth_metrics(sae, truth.directions, store.eval_acts[0],
                                                truth.eval_fired))
        splice = store.downstream
        if splice is not None:
            metrics.update(downstream_metrics(sae, splice.model, splice.tokens, splice.keep,
                                              hook_point, splice.batch, target))
    finally:
        sae.train(was_training)
    return metrics
