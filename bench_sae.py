"""bench.py's SAE-side measurements: timing helpers, the SAE step per variant (and a transcoder's,
and one variant's against another's, round by round), sparsify's step and quality on the same rows,
and the synthetic generators' samples/s. `bench.py` runs them; its docstring lists the settings."""

from __future__ import annotations

import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from activation_store import ActivationsStore, TensorStore, as_float32
from config import PRESETS, TORCH_DTYPES, get_default_cfg
from metrics import total_variance
from sae import SAE_CLASSES
from synthetic import SyntheticFeatures, TreeFeatures
from training import make_trainee, train_sae_group, training_step


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 2,
          rounds: int = 3) -> float:
    """Seconds per call, after warm-up, synchronising the device around the timed calls: the
    fastest of `rounds` rounds of `repeats` calls (on a shared machine the slower rounds
    measure the neighbours; this VM's rounds differ by up to ~35%)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def matmul_roofline(d: int, m: int, batch: int, device: torch.device,
                    dtype: str = "float32") -> float:
    """GFLOP/s of a (batch, d) x (d, m) product, the SAE's dominant shape, written into a
    preallocated output (a fresh one per call would time page faults, not arithmetic)."""
    kind = TORCH_DTYPES[dtype]
    x, w = (torch.randn(batch, d, device=device, dtype=kind),
            torch.randn(d, m, device=device, dtype=kind))
    out = torch.empty(batch, m, device=device, dtype=kind)
    return 2 * batch * d * m / timed(lambda: torch.mm(x, w, out=out), device, repeats=10) / 1e9


def load_rows(path: str, what: str = "acts") -> np.ndarray | torch.Tensor:
    """A (tokens, d) `.npy` (memmapped) or `.pt` activations file, named by bench setting `what`."""
    if path.endswith(".npy"):
        acts = np.load(path, mmap_mode="r")
    elif path.endswith(".pt"):
        acts = torch.load(path, map_location="cpu", weights_only=True)
    else:
        sys.exit(f"error: bench setting {what}={path!r}: give a (tokens, d) .npy or .pt file")
    if len(acts.shape) != 2:
        sys.exit(f"error: bench setting {what}={path!r}: shape {tuple(acts.shape)}, "
                 "need (tokens, d)")
    return acts


def read_rows(acts: np.ndarray | torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` of `acts` as float32, read in ascending order (one pass over a memmap)."""
    rows = rows.sort().values
    return as_float32(acts[rows.numpy()] if isinstance(acts, np.ndarray) else acts[rows])


def activation_batch(path: str, batch: int) -> torch.Tensor:
    """`batch` rows drawn at random (seed 0) from a (tokens, d) `.npy` (memmapped) or `.pt` file."""
    acts = load_rows(path)
    if acts.shape[0] < batch:
        sys.exit(f"error: bench setting acts={path!r}: shape {tuple(acts.shape)}, "
                 f"need (tokens >= batch={batch}, d)")
    return read_rows(acts, torch.randperm(acts.shape[0],
                                          generator=torch.Generator().manual_seed(0))[:batch])


def sae_step_fn(variant: str, s: dict[str, Any], device: torch.device, dtype: str, kernels: str,
                x: torch.Tensor | None = None, transcoder: str = "") -> Callable[[], Any]:
    """One training step (forward, backward, Adam, constraint) on random activations, or on `x`,
    with `kernels` sparse, dense or auto (as training picks). JumpReLU's thresholds (Vanilla's
    b_enc) are set so each latent fires on k/m of the batch (L0 = k), the sparsity of a
    trained one; at initialisation far more latents fire. The learning rate is 0 (every step
    still does all its work), so that sparsity holds over the timed steps instead of
    drifting on random data. `transcoder` "plain" or "skip": a transcoder of the same shape,
    predicting a target of its own from x."""
    cfg = get_default_cfg() | {"sae_type": variant, "act_size": s["d"], "dict_size": s["m"],
                               "top_k": s["k"], "batch_size": s["batch"], "dtype": dtype,
                               "device": str(device), "kernels": kernels}
    if transcoder:
        cfg |= {"target_hook_point": "target", "skip_connection": transcoder == "skip"}
    trainee = make_trainee(cfg, total_steps=1000, main=False, schedule=lambda i: 0.0)  # no run dir
    sae = trainee.sae
    if x is None:
        x = torch.randn(s["batch"], s["d"], device=device)
        scale = 1.0
    else:
        x = x.to(device)
        scale = ActivationsStore.estimate_scale(x)
    y = torch.tanh(x @ torch.randn(s["d"], s["d"], device=device)) if transcoder else None
    sae.init_from_batch(x, scale, *((y, ActivationsStore.estimate_scale(y)) if transcoder else ()))
    with torch.no_grad():  # at a trained SAE's sparsity: each latent fires on k/m of tokens
        sae.start_at_density(
            sae.pre_activations(x * sae.scale).quantile(1 - s["k"] / s["m"], dim=0))
    return functools.partial(training_step, trainee, x, 10, 1000, aux_enabled=False, target=y)


def sae_step_rate(variant: str, s: dict[str, Any], device: torch.device, dtype: str, kernels: str,
                  x: torch.Tensor | None = None) -> float:
    """Training steps per second (see `sae_step_fn`)."""
    return 1 / timed(sae_step_fn(variant, s, device, dtype, kernels, x), device, s["steps"])


def variant_ratio(a: str, b: str, s: dict[str, Any], device: torch.device, x: torch.Tensor | None
                  ) -> dict[str, Any]:
    """Variant `a`'s step against `b`'s on the same batch, interleaved (`interleaved_rates`):
    tokens/s (median of rounds) and the per-round ratio a/b (median and smallest)."""
    x = torch.randn(s["batch"], s["d"]) if x is None else x
    rates = interleaved_rates({v: sae_step_fn(v, s, device, "float32", "auto", x) for v in (a, b)},
                              device, rounds=2 * s["steps"])
    ratios = [ra / rb for ra, rb in zip(rates[a], rates[b], strict=True)]
    return {"tokens_per_s": {v: s["batch"] * statistics.median(r) for v, r in rates.items()},
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios)}


def transcoder_ratios(variant: str, s: dict[str, Any], device: torch.device, x: torch.Tensor | None
                      ) -> dict[str, Any]:
    """A transcoder's step (plain and skip) against the SAE step of its variant and shape, on the
    same x, interleaved: tokens/s (median of rounds) and the per-round ratio to the SAE (median)."""
    x = torch.randn(s["batch"], s["d"]) if x is None else x
    fns = {kind or "sae": sae_step_fn(variant, s, device, "float32", "auto", x, kind)
           for kind in ("", "plain", "skip")}
    rates = interleaved_rates(fns, device, rounds=2 * s["steps"])
    return {"tokens_per_s": {k: s["batch"] * statistics.median(r) for k, r in rates.items()}} | {
        f"{kind}_vs_sae_median": statistics.median(
            a / b for a, b in zip(rates[kind], rates["sae"], strict=True))
        for kind in ("plain", "skip")}


def clt_step_fn(variant: str, s: dict[str, Any], device: torch.device, n_layers: int,
                x: torch.Tensor) -> Callable[[], Any]:
    """One training step of a CLT over `n_layers` layers of `variant` (dict m per layer) on x and
    a target of its own per layer (`x` (L, B, d)), thresholds set as in `sae_step_fn`."""
    cfg = get_default_cfg() | {"sae_type": variant, "act_size": s["d"], "dict_size": s["m"],
                               "top_k": s["k"], "batch_size": s["batch"], "device": str(device),
                               "cross_layer": True, "layers": "", "n_layers": n_layers,
                               "site": "resid_mid", "target_site": "mlp_out"}
    trainee = make_trainee(cfg, total_steps=1000, main=False, schedule=lambda i: 0.0)
    x = x.to(device)
    y = torch.tanh(x @ torch.randn(s["d"], s["d"], device=device))
    scales = [ActivationsStore.estimate_scale(a) for a in x]
    trainee.sae.init_from_batch(x, scales, y, [ActivationsStore.estimate_scale(a) for a in y])
    with torch.no_grad():
        for layer, x_n in zip(trainee.sae.layers, x, strict=True):
            layer.start_at_density(
                layer.pre_activations(x_n * layer.scale).quantile(1 - s["k"] / s["m"], dim=0))
    return functools.partial(training_step, trainee, x, 10, 1000, aux_enabled=False, target=y)


def clt_ratio(variant: str, n_layers: int, s: dict[str, Any], device: torch.device
              ) -> dict[str, Any]:
    """A CLT step over `n_layers` layers against `n_layers` transcoder steps of the same variant and
    shape (kernels=auto, as training takes them), interleaved: tokens/s of each (a CLT's token is
    one position of all its layers) and the per-round ratio of their times (median, largest)."""
    x = torch.randn(n_layers, s["batch"], s["d"])
    tc = sae_step_fn(variant, s, device, "float32", "auto", x[0], "plain")
    fns = {"clt": clt_step_fn(variant, s, device, n_layers, x),
           "transcoders": lambda: [tc() for _ in range(n_layers)]}
    rates = interleaved_rates(fns, device, rounds=2 * s["steps"], steps=1)
    ratios = [t / c for c, t in zip(rates["clt"], rates["transcoders"], strict=True)]
    return {"tokens_per_s": {k: s["batch"] * statistics.median(r) for k, r in rates.items()},
            "time_ratio_median": statistics.median(ratios), "time_ratio_max": max(ratios)}


PEER = "eai-sparsify==1.3.3"  # the fastest peer measured: EleutherAI's sparsify, TopK


SPARSIFY_WARMUP_STEPS = 1000  # sparsify 1.3.3's lr_warmup_steps (Adam only)


def sparsify_trainer(s: dict[str, Any], device: torch.device, optimizer: str,
                     lr: float | None = None, total_steps: int = 1,
                     warmup_steps: int = SPARSIFY_WARMUP_STEPS
                     ) -> tuple[Any, Callable[[torch.Tensor], None], Callable[[], None]]:
    """sparsify's TopK SAE and a function stepping it on a batch as sparsify 1.3.3's trainer does
    with its defaults: b_dec set to the first batch's mean, decoder rows renormalised, the FVU
    loss (auxk_alpha is 0 by default: no AuxK, no dead mask), the gradient parallel to the
    decoder rows removed, the optimizer, and the count of tokens since each latent fired.
    `optimizer`: `signum` (its default: schedule-free SignSGD, momentum 0.95, lr 5e-3 /
    sqrt(m / 2^14)) or `adam` (lr 2e-4 / sqrt(m / 2^14), warmed up linearly over `warmup_steps`
    and decayed linearly to 0 at `total_steps`); `lr` overrides the default rate. Returns the SAE,
    `step(x)`, and `finish()`, to call before evaluating (schedule-free keeps the averaged weights
    it is evaluated at aside while training)."""
    try:
        from schedulefree import ScheduleFreeWrapper
        from sparsify import SparseCoder, SparseCoderConfig
        from sparsify.sign_sgd import SignSGD
        from transformers import get_linear_schedule_with_warmup
    except ImportError:
        sys.exit(f"error: bench setting peers=true needs sparsify: pip install {PEER}")
    peer = SparseCoder(s["d"], SparseCoderConfig(num_latents=s["m"], k=s["k"]), device=device)
    size = (s["m"] / 2**14) ** 0.5
    schedule = None
    if optimizer == "adam":
        opt = torch.optim.Adam(peer.parameters(), lr=2e-4 / size if lr is None else lr)
        schedule = get_linear_schedule_with_warmup(opt, warmup_steps, total_steps)
    else:
        opt = ScheduleFreeWrapper(SignSGD(peer.parameters(), lr=5e-3 / size if lr is None else lr),
                                  momentum=0.95)
        opt.train()
    since_fired = torch.zeros(s["m"], dtype=torch.long, device=device)
    started = []

    def step(x: torch.Tensor) -> None:
        if not started:
            peer.b_dec.data = x.mean(0)
            started.append(True)
        peer.set_decoder_norm_to_unit_norm()
        out = peer(x)
        out.fvu.backward()
        peer.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        if schedule is not None:
            schedule.step()
        fired = torch.zeros(s["m"], dtype=torch.bool, device=device)
        fired[out.latent_indices.flatten()] = True
        since_fired.add_(x.shape[0]).masked_fill_(fired, 0)

    def finish() -> None:
        if schedule is None:
            opt.eval()

    return peer, step, finish


def sparsify_step_fn(s: dict[str, Any], device: torch.device, x: torch.Tensor,
                     optimizer: str) -> Callable[[], Any]:
    """One step of sparsify's TopK SAE on `x` as its trainer takes it (`sparsify_trainer`), at a
    learning rate of 0, as for this project's rows (SignSGD refuses 0: 1e-12)."""
    _, step, _ = sparsify_trainer(s, device, optimizer, lr=0.0 if optimizer == "adam" else 1e-12)
    return functools.partial(step, x.to(device))


def interleaved_rates(fns: dict[str, Callable[[], Any]], device: torch.device, rounds: int,
                      steps: int = 5) -> dict[str, list[float]]:
    """Steps per second of each function in each of `rounds` rounds, `steps` calls per
    function per round, the order reversed every other round: each round's figures come
    from the same minute, so their ratios hold on a machine whose speed drifts."""
    for fn in fns.values():
        fn()
    rates: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            rates[name].append(1 / timed(fns[name], device, steps, warmup=0, rounds=1))
    return rates


def peer_dtype(device: torch.device) -> str:
    """The dtype sparsify computes in: it autocasts to bf16 on CUDA, and runs fp32 elsewhere."""
    return "bfloat16" if device.type == "cuda" else "float32"


def peer_comparison(s: dict[str, Any], device: torch.device,
                    x: torch.Tensor | None) -> dict[str, Any]:
    """Every registered variant's step as training takes it (kernels=auto, in sparsify's
    dtype) against sparsify's TopK step (Adam and Signum) on the same batch, interleaved
    round by round: tokens/s (median of rounds) and each one's ratio to sparsify-with-Adam
    per round (median and smallest)."""
    if x is None:
        x = torch.randn(s["batch"], s["d"])
    fns = {f"sparsify_topk_{opt}": sparsify_step_fn(s, device, x, opt)
           for opt in ("adam", "signum")}
    fns |= {v: sae_step_fn(v, s, device, peer_dtype(device), "auto", x) for v in SAE_CLASSES}
    rates = interleaved_rates(fns, device, rounds=2 * s["steps"])
    results = {}
    for name, per_round in rates.items():
        ratios = [a / b for a, b in zip(per_round, rates["sparsify_topk_adam"], strict=True)]
        results[name] = {"tokens_per_s": s["batch"] * statistics.median(per_round),
                         "vs_sparsify_adam_median": statistics.median(ratios),
                         "vs_sparsify_adam_min": min(ratios)}
    return results


# sparsify runs of the quality comparison: (optimizer, lr (None: its default), warmup steps). Its
# default, then Adam at lr 3e-4 (a common choice) with its default warmup and without.
SPARSIFY_QUALITY_RUNS = (("signum", None, SPARSIFY_WARMUP_STEPS),
                         ("adam", 3e-4, SPARSIFY_WARMUP_STEPS), ("adam", 3e-4, 0))


@torch.no_grad()
def sparsify_held_out(peer, eval_acts: torch.Tensor, batch: int) -> dict[str, float]:
    """Explained variance (docs/math.md §5: around the held-out mean), L0 and the fraction of
    latents never firing on `eval_acts`, for a sparsify SAE."""
    sq_err, active, fired = 0.0, 0, torch.zeros(peer.num_latents, dtype=torch.bool,
                                                device=eval_acts.device)
    for chunk in eval_acts.split(batch):
        out = peer(chunk)
        sq_err += (out.sae_out - chunk).double().pow(2).sum().item()
        on = out.latent_acts > 0
        active += int(on.sum())
        fired[out.latent_indices[on]] = True
    return {"explained_variance": 1 - sq_err / total_variance(eval_acts),
            "l0": active / len(eval_acts), "never_fired_eval_frac": 1 - fired.float().mean().item()}


def quality_comparison(s: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """This project's variants (defaults, one group through TensorStore) and
    sparsify's TopK (SPARSIFY_QUALITY_RUNS) trained on the same `quality_tokens` rows of `acts`
    and evaluated on the same `eval_acts`: held-out explained variance, L0, latents never
    firing, and training tokens/s (data reading included; this project's SAEs share theirs).
    Returns {"tokens": training tokens, "runs": {name: figures}}."""
    acts, eval_acts = (load_rows(s["acts"], "acts"),
                       as_float32(load_rows(s["eval_acts"], "eval_acts")))
    tokens = min(s["quality_tokens"], acts.shape[0]) // s["batch"] * s["batch"]
    results = {}
    with tempfile.TemporaryDirectory() as out:
        cfgs = [get_default_cfg() | {"sae_type": v, "run_name": v, "output_dir": out,
                                     "device": str(device), "wandb_mode": "disabled",
                                     "num_tokens": tokens, "batch_size": s["batch"],
                                     "dict_size": s["m"], "top_k": s["k"]} for v in SAE_CLASSES]
        start = time.perf_counter()
        trainees = train_sae_group(cfgs, store=TensorStore(acts, cfgs[0], eval_acts=eval_acts))
        seconds = time.perf_counter() - start
    for t in trainees:
        m = t.final_metrics
        results[t.cfg["sae_type"]] = {
            k: m[k] for k in ("explained_variance", "l0", "never_fired_eval_frac")} | {
            "tokens_per_s": tokens * len(trainees) / seconds}
    order = torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(0))[:tokens]
    for optimizer, lr, warmup in SPARSIFY_QUALITY_RUNS:
        steps = tokens // s["batch"]
        peer, step, finish = sparsify_trainer(s, device, optimizer, lr, steps, warmup)
        start = time.perf_counter()
        for rows in order.view(steps, s["batch"]):
            step(read_rows(acts, rows).to(device))
        seconds = time.perf_counter() - start
        finish()
        name = f"sparsify_topk_{optimizer}" + (f"_lr{lr:g}_warmup{warmup}" if lr is not None
                                               else "")
        results[name] = sparsify_held_out(peer, eval_acts.to(device), s["batch"]) | {
            "tokens_per_s": tokens / seconds}
    return {"tokens": tokens, "runs": results}


def synthetic_rates(repeats: int = 10) -> dict[str, float]:
    """Samples/s of the synthetic source (synthetic.py) in the presets' batches: the `siblings`
    generator at the synthetic preset's shape and at SynthSAEBench-16k's (16,384 features in d 768,
    L0 25, batches of 4,096), and the synthetic16k preset's `synthsaebench`; best of 3 rounds."""
    preset, big = (get_default_cfg() | PRESETS["synthetic"],
                   get_default_cfg() | PRESETS["synthetic16k"])
    sources = {"preset": (SyntheticFeatures(preset["synthetic_features"], preset["synthetic_d"],
                                            preset["synthetic_l0"], seed=0), preset["batch_size"]),
               "synthsaebench_shape": (SyntheticFeatures(16384, 768, 25.0, seed=0), 4096),
               "synthetic16k": (TreeFeatures(big["synthetic_features"], big["synthetic_d"], seed=0),
                                big["batch_size"])}
    rates = {}
    for name, (truth, batch) in sources.items():
        sample = functools.partial(truth.sample, batch, torch.Generator().manual_seed(0))
        rates[f"{name}_samples_per_s"] = batch / timed(sample, torch.device("cpu"), repeats,
                                                       warmup=1, rounds=3)
    return rates
