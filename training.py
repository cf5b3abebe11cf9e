"""Optimise one SAE, or a group of SAEs sharing one activation stream.

`train_sae_group` opens the stream, builds one `Trainee` per config and runs `_run_steps`,
which calls `training_step` per SAE and batch; what a checkpoint holds and how a run resumes
is in checkpoint.py, the torchrun collectives in data_parallel.py."""

from __future__ import annotations

import random
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from activation_store import ActivationSource, ActivationsStore
from capture import check_hook_point, check_target_after_input, load_model, model_dims
from checkpoint import (
    check_checkpoints_fit,
    checkpoint_due,
    checkpoint_group,
    restore_group,
    resumed_cfg,
    step_to_resume,
    write_group_file,
)
from config import (
    STREAM_KEYS,
    SYNTHETIC_DATASET,
    ConfigError,
    prepare_cfg,
    resolve_device,
    run_hook_points,
    validate_cfg,
)
from constraints import (
    block_latents,
    latent_blocks,
    mark_fired,
    normalize_decoder,
    remove_parallel_decoder_grad,
    zero_idle_momentum,
)
from data_parallel import (
    Stopped,
    all_ranks_any,
    average_gradients,
    average_scale,
    average_tensors,
    rank,
    stop_requested,
    world_size,
)
from kernels import fired_latents, mean_l0
from logs import Progress, RunLogger
from metrics import evaluate, structure_metrics
from sae import BaseSAE, build_sae
from schedule import SparsityCoefficient, lr_factor
from synthetic import SyntheticStore

LOSS_TERMS = ("recon_loss", "sparsity_loss", "aux_loss")


class NonFiniteError(RuntimeError):
    """A loss term or parameter became NaN/inf; the message names step, variant and term."""


@dataclass
class Trainee:
    """One SAE with its optimiser, schedule and run logger."""

    cfg: dict[str, Any]
    sae: BaseSAE
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    logger: RunLogger
    coefficient: SparsityCoefficient
    sparse_kernels: bool = False
    final_metrics: dict[str, Any] | None = None
    # first step whose loss terms were non-finite (-1: none) and which terms; kept on the
    # device and read only when logging or checkpointing, so the step never syncs
    first_bad_step: Tensor = field(default_factory=lambda: torch.tensor(-1))
    bad_terms: Tensor = field(default_factory=lambda: torch.zeros(len(LOSS_TERMS),
                                                                  dtype=torch.bool))
    skipped_batches: int = 0  # steps skipped for a non-finite loss (skip_nonfinite_batches)

    @property
    def run_dir(self) -> Path:
        return self.logger.run_dir


SPARSE_ON_CUDA_FROM = 6144  # dict_size from which kernels=auto picks the sparse step on CUDA (fp32)


def use_sparse_kernels(cfg: dict[str, Any]) -> bool:
    """kernels=auto: sparse on CPU, where it is several times the dense step. On CUDA sparse for
    fp32 dictionaries of SPARSE_ON_CUDA_FROM latents or more, where it measured faster than the
    launch-bound dense step; dense otherwise (the H100 figures: docs/kernels.md)."""
    if cfg["kernels"] != "auto":
        return cfg["kernels"] == "sparse"
    if torch.device(cfg["device"]).type == "cpu":
        return True
    return cfg["dtype"] == "float32" and cfg["dict_size"] >= SPARSE_ON_CUDA_FROM


class _SilentLogger:
    """What data-parallel ranks other than 0 log and write: nothing (they read checkpoints
    from rank 0's run folder on resume)."""

    def __init__(self, cfg: dict[str, Any]):
        self.run_dir = Path(cfg["output_dir"]) / cfg["run_name"]

    def log(self, metrics: dict[str, Any], step: int, tokens: int) -> None:
        pass

    def finish(self) -> None:
        pass


def check_data_parallel(cfgs: list[dict[str, Any]]) -> None:
    if any(c["skip_nonfinite_batches"] for c in cfgs):
        raise ConfigError("config skip_nonfinite_batches is not supported under torchrun yet "
                          "(all ranks would have to skip the same steps); run it in one process")


def make_trainee(cfg: dict[str, Any], total_steps: int, resume_step: int | None = None,
                 main: bool = True, schedule: Callable[[int], float] | None = None) -> Trainee:
    """A fresh SAE with its Adam and lr schedule (`schedule`: the lr factor per step, default the
    configured warmup and decay); `main` false: a rank other than 0, or a caller that keeps
    no run folder (bench), whose logger writes nothing."""
    sae = build_sae(cfg).to(cfg["device"])
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]),
                                 fused=True)
    if schedule is None:
        def schedule(s: int) -> float:
            return lr_factor(s, total_steps, cfg["lr_warmup_frac"], cfg["lr_decay_frac"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    device = torch.device(cfg["device"])
    logger = RunLogger(cfg, resume_step) if main else _SilentLogger(cfg)
    trainee = Trainee(cfg, sae, optimizer, scheduler, logger, SparsityCoefficient(sae),
                      use_sparse_kernels(cfg))
    trainee.first_bad_step, trainee.bad_terms = (trainee.first_bad_step.to(device),
                                                 trainee.bad_terms.to(device))
    return trainee


def record_non_finite(t: Trainee, out: Any, step: int) -> None:
    """Remember the first step with a non-finite loss term, without a host sync
    (with skip_nonfinite_batches such steps were skipped instead)."""
    if t.cfg.get("skip_nonfinite_batches"):
        return
    bad = ~torch.isfinite(torch.stack([getattr(out, name).detach().float() for name in LOSS_TERMS]))
    first = (t.first_bad_step < 0) & bad.any()
    t.first_bad_step = torch.where(first, step, t.first_bad_step)
    t.bad_terms = torch.where(first, bad, t.bad_terms)


def check_finite(t: Trainee) -> None:
    """Raise NonFiniteError if a loss term or parameter went NaN/inf (syncs: call at intervals)."""
    where = f"{t.cfg['sae_type']} run {t.cfg['run_name']}"
    step = int(t.first_bad_step.item())
    if step >= 0:
        terms = ", ".join(n for n, b in zip(LOSS_TERMS, t.bad_terms.tolist(), strict=True) if b)
        raise NonFiniteError(f"non-finite {terms} at step {step} in {where}; earlier checkpoints "
                             f"are intact (lower lr, enable max_grad_norm, or check the data; "
                             f"python main.py --resume {t.run_dir} skip_nonfinite_batches=true "
                             f"continues, skipping such batches)")
    for name, param in t.sae.named_parameters():
        if not torch.isfinite(param).all():
            raise NonFiniteError(f"non-finite parameter {name} in {where}; "
                                 "earlier checkpoints are intact")


def training_step(t: Trainee, x: Tensor, step: int, total_steps: int, aux_enabled: bool,
                  target: Tensor | None = None) -> Any:
    """Forward, backward, decoder-constrained Adam step. No host synchronisation, except
    with skip_nonfinite_batches: skipping must be decided before the optimiser step, so
    the loss is read on the host every step (free on CPU; on CUDA it waits for the queue
    to drain, which is why the option is off by default)."""
    sae, cfg = t.sae, t.cfg
    sae.sparsity_coeff = t.coefficient.at(step, total_steps)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg["dtype"] == "bfloat16"):
        out = sae(x, aux_enabled=aux_enabled, sparse=t.sparse_kernels, target=target)
    if cfg.get("skip_nonfinite_batches") and not torch.isfinite(out.loss.detach()).item():
        # no optimiser step, no dead-counter or threshold update; the lr schedule still
        # advances, so lr stays a function of the step index
        t.skipped_batches += 1
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()" if 1st skipped
            warnings.simplefilter("ignore", UserWarning)
            t.scheduler.step()
        return out
    out.loss.backward()
    if world_size() > 1:
        average_gradients(sae)
    if cfg["max_grad_norm"] > 0:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg["max_grad_norm"])
    blocks = latent_blocks(sae)
    for _, decoder in blocks:
        remove_parallel_decoder_grad(decoder)
    if cfg["lazy_adam"]:
        for block, decoder in blocks:
            zero_idle_momentum(t.optimizer, block, decoder[1:])
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    t.scheduler.step()
    n_tokens = x.shape[-2] * world_size()
    for (block, decoder), f in zip(blocks, block_latents(sae, out.latents), strict=True):
        normalize_decoder(decoder)
        fired = fired_latents(f)
        mark_fired(block, all_ranks_any(fired) if world_size() > 1 else fired, n_tokens)
        block.update_inference_state(f)
    t.coefficient.adapt(out.latents, step, total_steps)
    if world_size() > 1:  # every rank ends the step with identical state
        average_tensors([*(getattr(b, name) for b, _ in blocks for name in b.averaged_buffers),
                         *t.coefficient.state.values()])
    return out


def _train_metrics(t: Trainee, out: Any) -> dict[str, float]:
    skipped = ({"train/skipped_batches": t.skipped_batches} if t.cfg["skip_nonfinite_batches"]
               else {})
    return skipped | {
        "train/loss": out.loss.item(),
        "train/recon_loss": out.recon_loss.item(),
        "train/sparsity_loss": out.sparsity_loss.item(),
        "train/aux_loss": out.aux_loss.item(),
        "train/l0": mean_l0(out.latents).item(),
        "train/dead": int(t.sae.dead_mask().sum().item()),
        "lr": t.scheduler.get_last_lr()[0],
        "sparsity_coeff": float(t.sae.sparsity_coeff),
    } | {f"train/{name}": value.item() for name, value in out.details.items()}


def check_group(cfgs: list[dict[str, Any]]) -> None:
    for key in STREAM_KEYS:
        values = {str(c[key]) for c in cfgs}
        if len(values) > 1:
            raise ConfigError(f"config {key} differs within a group ({', '.join(sorted(values))}): "
                              f"SAEs trained on one stream must share it; "
                              f"run them as separate jobs")
    names = [c["run_name"] for c in cfgs if c["run_name"]]
    if len(names) != len(set(names)):
        raise ConfigError("config run_name repeats within a group: leave it empty to generate "
                          "unique names")
    if len({bool(c["resume"]) for c in cfgs}) > 1:
        raise ConfigError("config resume is set for some runs of a group but not others: "
                          "a group resumes together (python main.py --resume RUN_DIR resumes its "
                          "whole group)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_sae_group(cfgs: list[dict[str, Any]], model=None,
                    store: ActivationSource | None = None) -> list[Trainee]:
    """Train several SAEs on one activation stream, each with its own optimiser.

    With `resume` set (every config of the group), continue the runs in those folders from
    their newest common complete checkpoint (from step 0 in the same folders if none).
    `store` replaces the model's stream: any `activation_store.ActivationSource` (a `TensorStore`,
    the synthetic source, your own); the configs are prepared from its dims."""
    cfgs, model, store, resume_step = _open_group(cfgs, model, store)
    total_steps = cfgs[0]["num_tokens"] // cfgs[0]["batch_size"]
    main = rank() == 0
    trainees = [make_trainee(c, total_steps, resume_step, main) for c in cfgs]
    if resume_step is None and len(trainees) > 1 and main:
        write_group_file([t.run_dir for t in trainees])
    try:
        if store is None:  # run folders first, so a stop during the fill leaves a run to resume
            store = _open_stream(trainees, model, resume_step, total_steps)
        hook_of = [hook_indices(store, c) for c in cfgs]
        if resume_step:
            restore_group(trainees, store, resume_step)
            first_batch = None
        else:
            first_batch = _init_from_first_batch(trainees, store, hook_of)
        _run_steps(trainees, store, hook_of, resume_step or 0, total_steps, first_batch)
    finally:  # however it ends, metrics.jsonl and wandb are closed (finish is idempotent)
        for t in trainees:
            t.logger.finish()
    return trainees


def hook_points_of(cfgs: list[dict[str, Any]]) -> list[str]:
    """The group's hook points (inputs and transcoders' targets), each once, in config order."""
    return list(dict.fromkeys(h for c in cfgs for hooks in run_hook_points(c) for h in hooks))


HookIndex = int | list[int]  # a run's hook point in the store's batches: one, or a CLT's per layer


def hook_indices(store: ActivationSource,
                 cfg: dict[str, Any]) -> tuple[HookIndex, HookIndex | None]:
    """Where the run's input and (a transcoder's) target are in the store's batches."""
    inputs, targets = run_hook_points(cfg)
    if cfg["cross_layer"]:
        return [store.hook_index(h) for h in inputs], [store.hook_index(h) for h in targets]
    return store.hook_index(inputs[0]), store.hook_index(targets[0]) if targets else None


def pick(values: list[float], index: HookIndex) -> float | list[float]:
    """The store's per-hook `values` (its scales) at a run's hook index."""
    return [values[i] for i in index] if isinstance(index, list) else values[index]


def _open_group(cfgs: list[dict[str, Any]], model, store: ActivationSource | None
                ) -> tuple[list[dict[str, Any]], Any, Any, int | None]:
    """The group's configs checked and post-initialised (a resumed run's saved ones), the model
    (booted if None and needed), the activation stream if given (or synthetic), and the resume step
    (None: a fresh start). Checks the hook points, so the stream built later on the model can be."""
    cfgs = [resumed_cfg(c) for c in cfgs]
    for cfg in cfgs:
        validate_cfg(cfg)
    check_group(cfgs)
    first = cfgs[0]
    resume_step = step_to_resume([Path(c["resume"]) for c in cfgs]) if first["resume"] else None
    seed_everything(first["seed"])
    if store is None and first["dataset_path"] == SYNTHETIC_DATASET:
        store = SyntheticStore(first)
    if store is not None:
        dims = store.dims
    else:
        if model is None:
            model = load_model(first["model_name"], resolve_device(first["device"]),
                               first["model_dtype"])
        dims = model_dims(model)
    cfgs = [prepare_cfg(c, dims) for c in cfgs]
    if resume_step:
        check_checkpoints_fit(cfgs, resume_step)
    if world_size() > 1:
        check_data_parallel(cfgs)
        if store is not None and not store.sharded:
            raise ConfigError(f"{type(store).__name__} serves every torchrun rank the same rows "
                              "(it does not shard yet); train on it in one process")
    if store is None:
        for hook_point in hook_points_of(cfgs):
            check_hook_point(model, hook_point)
        for inputs, targets in map(run_hook_points, cfgs):
            if targets:
                check_target_after_input(model, inputs[0], targets[0])
    return cfgs, model, store, resume_step


def _open_stream(trainees: list[Trainee], model, resume_step: int | None,
                 total_steps: int) -> ActivationsStore:
    """The group's stream on `model`: held-out set, scales, the first fill of the mixing buffer. A
    stop request in the fill raises Stopped at step 0 (nothing trained or saved); a bad hook point
    found only now (its width) removes the run folders just made, so the command can be rerun."""
    cfgs = [t.cfg for t in trainees]
    try:
        store = ActivationsStore(model, cfgs[0], hook_points_of(cfgs), shard=(rank(), world_size()),
                                 fill=not resume_step)  # resumes regenerate the checkpoint's block
    except BaseException as err:
        for t in trainees:
            t.logger.finish()
        if isinstance(err, Stopped):
            raise Stopped(0, total_steps, trainees[0].run_dir) from None
        if isinstance(err, ConfigError) and resume_step is None and rank() == 0:
            for t in trainees:
                shutil.rmtree(t.run_dir, ignore_errors=True)
        raise
    if world_size() > 1:
        if stop_requested():  # ranks check the fill's stop together, so that all of them stop
            for t in trainees:
                t.logger.finish()
            raise Stopped(0, total_steps, trainees[0].run_dir)
        store.scales = [average_scale(s, cfgs[0]["act_size"]) for s in store.scales]
    return store


def _init_from_first_batch(trainees: list[Trainee], store: ActivationSource,
                           hook_of: list[tuple[HookIndex, HookIndex | None]]) -> Tensor:
    """A fresh start: each SAE's input scale (a transcoder's target scale too) and b_dec from the
    first batch, then the step-0 evaluation. Returns that batch: the first step trains on it."""
    first_batch = store.next_batch()
    for t, (h, g) in zip(trainees, hook_of, strict=True):
        target = () if g is None else (first_batch[g], pick(store.scales, g))
        t.sae.init_from_batch(first_batch[h], pick(store.scales, h), *target)
        if world_size() > 1:  # b_dec = mean of the union of the ranks' first batches (and
            average_tensors([p for b, _ in latent_blocks(t.sae)  # standardize_tokens' per-rank
                             for p in (b.scale, b.b_dec)])  # scale)
        if rank() == 0:
            t.logger.log(evaluate(t.sae, store), step=0, tokens=0)
    return first_batch


def _run_steps(trainees: list[Trainee], store: ActivationSource,
               hook_of: list[tuple[HookIndex, HookIndex | None]], start: int, total_steps: int,
               first_batch: Tensor | None) -> None:
    """The training loop from step `start`: every SAE steps on its hook's slice of each batch,
    logs, and the group checkpoints together. `first_batch` is the batch of step `start`, or
    None to draw it (a resumed run: its checkpoint was taken before the next batch was drawn)."""
    cfgs = [t.cfg for t in trainees]
    hook_points = hook_points_of(cfgs)
    where = hook_points[0] if len(hook_points) == 1 else f"{len(hook_points)} hook points"
    tokens_per_step = cfgs[0]["batch_size"] * world_size()  # the dead-latent counters count it too
    progress = Progress(total_steps * tokens_per_step, desc=f"{len(trainees)} SAE(s) on {where}",
                        initial=start * tokens_per_step, enabled=rank() == 0)
    try:
        x = store.next_batch() if first_batch is None else first_batch
        for step in range(start, total_steps):
            tokens = (step + 1) * tokens_per_step
            aux_enabled = step * tokens_per_step > min(c["dead_after_tokens"] for c in cfgs)
            for t, (h, g) in zip(trainees, hook_of, strict=True):
                out = training_step(t, x[h], step, total_steps, aux_enabled,
                                    None if g is None else x[g])
                record_non_finite(t, out, step + 1)
                _log_step(t, out, step + 1, total_steps, tokens, store, progress)
            checkpoint_group(trainees, step + 1, total_steps, tokens, store)
            progress.advance(tokens_per_step)
            if step + 1 < total_steps and stop_requested():  # a signal: checkpoint this step, stop
                for t in trainees:
                    check_finite(t)  # as before every checkpoint: none is written from bad weights
                undone = [t for t in trainees if not checkpoint_due(t.cfg, step + 1)]
                checkpoint_group(undone, step + 1, total_steps, tokens, store, now=True)
                raise Stopped(step + 1, total_steps, trainees[0].run_dir)
            if step + 1 < total_steps:
                x = store.next_batch()
    finally:
        progress.close()
        try:
            store.finish()
        finally:  # the loggers finish (wandb included) even if the cache's last write fails
            for t in trainees:
                t.logger.finish()


def _log_step(t: Trainee, out: Any, step: int, total_steps: int, tokens: int,
              store: ActivationSource, progress: Progress) -> None:
    cfg, last = t.cfg, step == total_steps
    if step % cfg["perf_log_freq"] == 0 or last or checkpoint_due(cfg, step):
        check_finite(t)
    if rank() != 0:
        return
    if step % cfg["perf_log_freq"] == 0 or last:
        metrics = _train_metrics(t, out) | {"tokens_per_s": progress.rate()}
        t.logger.log(metrics, step, tokens)
        progress.show(metrics["train/loss"], metrics["train/l0"], metrics["train/dead"])
    if step % cfg["eval_freq"] == 0 or last:
        metrics = evaluate(t.sae, store)
        if last:  # the cheap structure metrics once, on the final dictionary
            metrics |= structure_metrics(t.sae)
        t.logger.log(metrics, step, tokens)
        if last:
            t.final_metrics = metrics


def train_sae(cfg: dict[str, Any], model=None, store: ActivationSource | None = None) -> Trainee:
    return train_sae_group([cfg], model, store)[0]
