"""Evaluation (SPEC §5), progress, metrics.jsonl, wandb and checkpoints (SPEC §7).

The metric functions at the top are pure tensor math; everything that touches files,
wandb or the terminal is in `RunLogger` and `Progress` below them.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from activation_store import is_causal_lm, run_to_hook
from config import ConfigError
from sae import BaseSAE

DENSE_FRACTION = 0.1  # a latent firing on more than this fraction of eval tokens is dense
FINAL_DIR = "final"
CHECKPOINT_DIR = "checkpoints"
TRAINING_STATE_FILE = "training_state.pt"
DENSITY_FILE = "density.safetensors"


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


# --- evaluation ---------------------------------------------------------------------------

@torch.no_grad()
def reconstruction_metrics(sae: BaseSAE, eval_acts: Tensor, device: torch.device, chunk: int = 4096) -> dict[str, Any]:
    sums = ReconstructionSums()
    decoder_norms = sae.W_dec.norm(dim=-1)
    for x in eval_acts.split(chunk):
        x = x.to(device)
        f = sae.encode(x)
        sums.add(x, sae.decode(f), f, decoder_norms)
    m = sae.cfg["dict_size"]
    density = sums.fire_counts / sums.n
    nmse = sums.sq_err / total_variance(eval_acts)
    dead = int(sae.dead_mask().sum().item())
    return {
        "l0": sums.l0 / sums.n,
        "l1": sums.l1 / sums.n,
        "nmse": nmse,
        "explained_variance": 1 - nmse,
        "cosine": sums.cosine / sums.n,
        "shrinkage": sums.shrinkage / sums.n,
        "dead": dead,
        "dead_frac": dead / m,
        "dense": int((density > DENSE_FRACTION).sum().item()),
        "never_fired_eval_frac": (density == 0).double().mean().item(),
        "density": density.float().cpu(),
    }


def _splice_hook(sae: BaseSAE, keep: Tensor, zero: bool):
    def hook(act: Tensor, hook) -> Tensor:
        act = act.clone()
        x = act[keep].float()
        act[keep] = (torch.zeros_like(x) if zero else sae.decode(sae.encode(x))).to(act.dtype)
        return act
    return hook


def _final_hidden(model, tokens: Tensor, hooks: list) -> Tensor:
    """The encoder's last block output, with `hooks` applied on the way."""
    return run_to_hook(model, tokens, f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", hooks).float()


@torch.no_grad()
def downstream_metrics(sae: BaseSAE, model, tokens: Tensor, keep: Tensor, hook_point: str,
                       batch: int) -> dict[str, float]:
    """Splice the reconstruction (and zeros) into the model at the kept positions (SPEC §5)."""
    device = next(sae.parameters()).device
    causal = is_causal_lm(model)
    totals = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl": 0.0}
    n_chunks = 0
    for rows, mask in zip(tokens.split(batch), keep.split(batch), strict=True):
        rows, mask = rows.to(device), mask.to(device)
        spliced = [(hook_point, _splice_hook(sae, mask, zero=False))]
        zeroed = [(hook_point, _splice_hook(sae, mask, zero=True))]
        if causal:
            clean_logits = model(rows)
            spliced_logits = model.run_with_hooks(rows, fwd_hooks=spliced)
            zero_logits = model.run_with_hooks(rows, fwd_hooks=zeroed)
            totals["clean"] += next_token_ce(clean_logits, rows).item()
            totals["spliced"] += next_token_ce(spliced_logits, rows).item()
            totals["zero"] += next_token_ce(zero_logits, rows).item()
            totals["kl"] += mean_kl(clean_logits, spliced_logits).item()
        else:
            clean = _final_hidden(model, rows, [])
            totals["spliced"] += cosine_distance(clean, _final_hidden(model, rows, spliced)).item()
            totals["zero"] += cosine_distance(clean, _final_hidden(model, rows, zeroed)).item()
        n_chunks += 1
    mean = {k: v / n_chunks for k, v in totals.items()}
    if causal:
        return {"ce_clean": mean["clean"], "ce_spliced": mean["spliced"], "ce_zero": mean["zero"],
                "ce_recovered": recovered(mean["zero"], mean["spliced"], mean["clean"]), "kl": mean["kl"]}
    return {"downstream_recovered": recovered(mean["zero"], mean["spliced"], 0.0)}


def evaluate(sae: BaseSAE, store) -> dict[str, Any]:
    """All SPEC §5 metrics on the held-out set, in raw space, with the inference encoder.
    Touches no training state: counters, threshold and RNG are only read."""
    was_training = sae.training
    sae.eval()
    try:
        metrics = reconstruction_metrics(sae, store.eval_acts, store.device)
        rows = store.eval_tokens[: store.cfg["downstream_eval_rows"]]
        metrics.update(downstream_metrics(sae, store.model, rows, store.kept_positions(rows),
                                          store.hook_point, store.cfg["model_batch_size"]))
    finally:
        sae.train(was_training)
    return metrics


# --- I/O ----------------------------------------------------------------------------------

def resolve_wandb_mode(setting: str) -> str:
    """auto: online when an API key is configured, offline otherwise; never a prompt."""
    if setting != "auto":
        return setting
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (FileNotFoundError, netrc.NetrcParseError):
        return "offline"


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
            for k, v in metrics.items() if not isinstance(v, Tensor)}


class RunLogger:
    """One run's folder: config.json, metrics.jsonl, checkpoints, and its wandb run."""

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = cfg
        self.run_dir = Path(cfg["output_dir"]) / cfg["run_name"]
        try:
            self.run_dir.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            raise ConfigError(f"config run_name={cfg['run_name']!r}: the run folder {self.run_dir} already exists; "
                              f"choose another run_name or leave it empty for a generated one") from None
        except OSError as err:
            raise ConfigError(f"config output_dir={cfg['output_dir']!r} is not writable ({err.strerror}); "
                              f"choose another output_dir") from None
        (self.run_dir / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        self.metrics_file = (self.run_dir / "metrics.jsonl").open("a")
        self.wandb_run = self._init_wandb()

    def _init_wandb(self):
        mode = resolve_wandb_mode(self.cfg["wandb_mode"])
        if mode == "disabled":
            return None
        try:
            import wandb

            return wandb.init(project=self.cfg["wandb_project"], name=self.cfg["run_name"], config=self.cfg,
                              dir=str(self.run_dir), mode=mode, reinit="create_new")
        except Exception as err:  # wandb trouble never stops training
            warnings.warn(f"wandb disabled for {self.cfg['run_name']}: {type(err).__name__}: {err}", stacklevel=2)
            return None

    def log(self, metrics: dict[str, Any], step: int, tokens: int) -> None:
        record = {"step": step, "tokens": tokens, **_jsonable(metrics)}
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        if self.wandb_run is not None:
            payload = {k: v for k, v in record.items() if k != "step"}
            if "density" in metrics:
                import wandb

                log_density = metrics["density"].clamp_min(1e-10).log10().numpy()
                payload["log10_density"] = wandb.Histogram(log_density)
            self.wandb_run.log(payload, step=step)

    def save_checkpoint(self, sae: BaseSAE, training_state: dict[str, Any], step: int,
                        density: Tensor | None = None, final: bool = False) -> Path:
        """Write to a temporary folder, then rename it into place (SPEC §7)."""
        target = self.run_dir / FINAL_DIR if final else self.run_dir / CHECKPOINT_DIR / f"step_{step:07d}"
        tmp = target.with_name(f".tmp-{target.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        sae.save(tmp)
        torch.save(training_state, tmp / TRAINING_STATE_FILE)
        if density is not None:
            save_file({"density": density.contiguous()}, tmp / DENSITY_FILE)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        return target

    def finish(self) -> None:
        self.metrics_file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


class Progress:
    """One tqdm bar for a group of SAEs sharing a stream: tokens/s, loss, L0, dead, ETA."""

    def __init__(self, total_tokens: int, desc: str):
        self.bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc=desc, dynamic_ncols=True)
        self.start = time.perf_counter()

    def advance(self, tokens: int) -> None:
        self.bar.update(tokens)

    def show(self, loss: float, l0: float, dead: int) -> None:
        self.bar.set_postfix(loss=f"{loss:.3f}", l0=f"{l0:.1f}", dead=dead, refresh=False)

    def rate(self) -> float:
        return self.bar.n / max(time.perf_counter() - self.start, 1e-9)

    def close(self) -> None:
        self.bar.close()
