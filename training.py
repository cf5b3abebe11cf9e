"""Optimise one SAE, or a group of SAEs sharing one activation stream."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from activation_store import ActivationsStore, load_model, model_dims
from config import STREAM_KEYS, ConfigError, post_init_cfg, resolve_device, validate_cfg
from logs import Progress, RunLogger, evaluate
from sae import BaseSAE, build_sae, mean_l0

LOSS_TERMS = ("recon_loss", "sparsity_loss", "aux_loss")


class NonFiniteError(RuntimeError):
    """A loss term or parameter became NaN/inf; the message names step, variant and term."""


def lr_factor(step: int, total_steps: int, warmup_frac: float, decay_frac: float) -> float:
    """Linear warmup from 0, constant, then linear decay to 0 over the final fraction."""
    warmup = warmup_frac * total_steps
    decay_start = (1 - decay_frac) * total_steps
    factor = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if step >= decay_start and decay_frac > 0:
        factor = min(factor, (total_steps - step) / (total_steps - decay_start))
    return factor


def sparsity_coeff(cfg: dict[str, Any], step: int, total_steps: int) -> float:
    base = {"vanilla": cfg["l1_coeff"], "jumprelu": cfg["l0_coeff"]}.get(cfg["sae_type"], 0.0)
    warmup = cfg["sparsity_warmup_frac"] * total_steps
    return base * (min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)


@dataclass
class Trainee:
    """One SAE with its optimiser, schedule and run logger."""

    cfg: dict[str, Any]
    sae: BaseSAE
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    logger: RunLogger
    sparse_kernels: bool = False
    final_metrics: dict[str, Any] | None = None
    # first step whose loss terms were non-finite (-1: none) and which terms; kept on the
    # device and read only when logging or checkpointing, so the step never syncs
    first_bad_step: Tensor = field(default_factory=lambda: torch.tensor(-1))
    bad_terms: Tensor = field(default_factory=lambda: torch.zeros(len(LOSS_TERMS), dtype=torch.bool))

    @property
    def run_dir(self) -> Path:
        return self.logger.run_dir


def use_sparse_kernels(cfg: dict[str, Any]) -> bool:
    """kernels=auto: sparse on CPU (measured 3-4x the dense step there), dense on CUDA."""
    if cfg["kernels"] == "auto":
        return torch.device(cfg["device"]).type == "cpu"
    return cfg["kernels"] == "sparse"


def make_trainee(cfg: dict[str, Any], total_steps: int) -> Trainee:
    sae = build_sae(cfg).to(cfg["device"])
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]), fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, cfg["lr_warmup_frac"], cfg["lr_decay_frac"]))
    device = torch.device(cfg["device"])
    trainee = Trainee(cfg, sae, optimizer, scheduler, RunLogger(cfg), use_sparse_kernels(cfg))
    trainee.first_bad_step, trainee.bad_terms = trainee.first_bad_step.to(device), trainee.bad_terms.to(device)
    return trainee


def record_non_finite(t: Trainee, out: Any, step: int) -> None:
    """Remember the first step with a non-finite loss term, without a host sync."""
    bad = ~torch.isfinite(torch.stack([getattr(out, name).detach().float() for name in LOSS_TERMS]))
    first = (t.first_bad_step < 0) & bad.any()
    t.first_bad_step = torch.where(first, step, t.first_bad_step)
    t.bad_terms = torch.where(first, bad, t.bad_terms)


def check_finite(t: Trainee) -> None:
    """Raise NonFiniteError if a loss term or a parameter went NaN/inf (syncs: call at intervals)."""
    where = f"{t.cfg['sae_type']} run {t.cfg['run_name']}"
    step = int(t.first_bad_step.item())
    if step >= 0:
        terms = ", ".join(n for n, b in zip(LOSS_TERMS, t.bad_terms.tolist(), strict=True) if b)
        raise NonFiniteError(f"non-finite {terms} at step {step} in {where}; earlier checkpoints are intact "
                             f"(lower lr, enable max_grad_norm, or check the data)")
    for name, param in t.sae.named_parameters():
        if not torch.isfinite(param).all():
            raise NonFiniteError(f"non-finite parameter {name} in {where}; earlier checkpoints are intact")


def training_step(t: Trainee, x: Tensor, step: int, total_steps: int, aux_enabled: bool) -> Any:
    """Forward, backward, decoder-constrained Adam step. No host synchronisation."""
    sae, cfg = t.sae, t.cfg
    sae.sparsity_coeff = sparsity_coeff(cfg, step, total_steps)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg["dtype"] == "bfloat16"):
        out = sae(x, aux_enabled=aux_enabled, sparse=t.sparse_kernels)
    out.loss.backward()
    if cfg["max_grad_norm"] > 0:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg["max_grad_norm"])
    sae.remove_parallel_decoder_grad()
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    t.scheduler.step()
    sae.normalize_decoder()
    sae.update_dead_counters(out.latents)
    sae.update_inference_state(out.latents)
    return out


def training_state(t: Trainee, step: int, tokens: int, store: ActivationsStore) -> dict[str, Any]:
    return {
        "step": step,
        "tokens": tokens,
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "stream": {"rows_read": store.rows_read, "epoch": store.epoch},
    }


def _train_metrics(t: Trainee, out: Any) -> dict[str, float]:
    return {
        "train/loss": out.loss.item(),
        "train/recon_loss": out.recon_loss.item(),
        "train/sparsity_loss": out.sparsity_loss.item(),
        "train/aux_loss": out.aux_loss.item(),
        "train/l0": mean_l0(out.latents).item(),
        "train/dead": int(t.sae.dead_mask().sum().item()),
        "lr": t.scheduler.get_last_lr()[0],
        "sparsity_coeff": t.sae.sparsity_coeff,
    }


def check_group(cfgs: list[dict[str, Any]]) -> None:
    for key in STREAM_KEYS:
        values = {str(c[key]) for c in cfgs}
        if len(values) > 1:
            raise ConfigError(f"config {key} differs within a group ({', '.join(sorted(values))}): "
                              f"SAEs trained on one stream must share it; run them as separate jobs")
    names = [c["run_name"] for c in cfgs if c["run_name"]]
    if len(names) != len(set(names)):
        raise ConfigError("config run_name repeats within a group: leave it empty to generate unique names")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_sae_group(cfgs: list[dict[str, Any]], model=None) -> list[Trainee]:
    """Train several SAEs on one activation stream, each with its own optimiser."""
    for cfg in cfgs:
        validate_cfg(cfg)
    check_group(cfgs)
    first = cfgs[0]
    seed_everything(first["seed"])
    if model is None:
        model = load_model(first["model_name"], resolve_device(first["device"]), first["model_dtype"])
    cfgs = [post_init_cfg(c, model_dims(model)) for c in cfgs]
    hook_points = list(dict.fromkeys(c["hook_point"] for c in cfgs))
    store = ActivationsStore(model, cfgs[0], hook_points)
    batch_size = first["batch_size"]
    total_steps = first["num_tokens"] // batch_size
    trainees = [make_trainee(c, total_steps) for c in cfgs]
    hook_of = [store.hook_index(c["hook_point"]) for c in cfgs]
    first_batch = store.next_batch()
    for t, h in zip(trainees, hook_of, strict=True):
        t.sae.init_from_batch(first_batch[h], store.scales[h])
        t.logger.log(evaluate(t.sae, store), step=0, tokens=0)

    where = hook_points[0] if len(hook_points) == 1 else f"{len(hook_points)} hook points"
    progress = Progress(total_steps * batch_size, desc=f"{len(trainees)} SAE(s) on {where}")
    x = first_batch
    try:
        for step in range(total_steps):
            tokens = (step + 1) * batch_size
            aux_enabled = step * batch_size > min(c["dead_after_tokens"] for c in cfgs)
            for t, h in zip(trainees, hook_of, strict=True):
                out = training_step(t, x[h], step, total_steps, aux_enabled)
                record_non_finite(t, out, step + 1)
                _log_and_checkpoint(t, out, step + 1, total_steps, tokens, store, progress)
            progress.advance(batch_size)
            if step + 1 < total_steps:
                x = store.next_batch()
    finally:
        progress.close()
        store.flush_cache()
        for t in trainees:
            t.logger.finish()
    return trainees


def _log_and_checkpoint(t: Trainee, out: Any, step: int, total_steps: int, tokens: int,
                        store: ActivationsStore, progress: Progress) -> None:
    cfg, last = t.cfg, step == total_steps
    checkpoint_now = last or (cfg["checkpoint_freq"] and step % cfg["checkpoint_freq"] == 0)
    if step % cfg["perf_log_freq"] == 0 or checkpoint_now:
        check_finite(t)
    if step % cfg["perf_log_freq"] == 0 or last:
        metrics = _train_metrics(t, out) | {"tokens_per_s": progress.rate()}
        t.logger.log(metrics, step, tokens)
        progress.show(metrics["train/loss"], metrics["train/l0"], metrics["train/dead"])
    if step % cfg["eval_freq"] == 0 or last:
        metrics = evaluate(t.sae, store)
        t.logger.log(metrics, step, tokens)
        if last:
            t.final_metrics = metrics
    if last:
        t.logger.save_checkpoint(t.sae, training_state(t, step, tokens, store), step,
                                 density=t.final_metrics["density"], final=True)
    elif cfg["checkpoint_freq"] and step % cfg["checkpoint_freq"] == 0:
        t.logger.save_checkpoint(t.sae, training_state(t, step, tokens, store), step)


def train_sae(cfg: dict[str, Any], model=None) -> Trainee:
    return train_sae_group([cfg], model)[0]
