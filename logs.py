"""Evaluation (SPEC §5), progress, metrics.jsonl, wandb and checkpoints (SPEC §7).

The metric functions at the top are pure tensor math; everything that touches files,
wandb or the terminal is in `RunLogger` and `Progress` below them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import netrc
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from activation_store import WRITE_ERRORS, is_causal_lm, run_to_hook, write_failure
from config import ConfigError
from sae import CONFIG_FILE, WEIGHTS_FILE, BaseSAE

DENSE_FRACTION = 0.1  # a latent firing on more than this fraction of eval tokens is dense
FINAL_DIR = "final"
CHECKPOINT_DIR = "checkpoints"
TRAINING_STATE_FILE = "training_state.pt"
DENSITY_FILE = "density.safetensors"
STREAM_FILE = "stream.safetensors"  # the activation store's tensors (mixing buffer...), for exact resume
MANIFEST_FILE = "manifest.json"  # size and sha256 of every other file, written last
GROUP_FILE = "group.json"  # the runs that trained on one stream, so resuming one resumes all
STEP_DIR = re.compile(r"step_(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, I/O error); earlier checkpoints are intact."""


class ResumeWarning(UserWarning):
    """A checkpoint was passed over on resume (incomplete, corrupted, or missing in a run of the group)."""


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
        sums.add(x, sae.decode(f, x), f, decoder_norms)
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
        act[keep] = (torch.zeros_like(x) if zero else sae.decode(sae.encode(x), x)).to(act.dtype)
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
    totals = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl": 0.0}  # each a per-chunk mean times its rows
    for rows, mask in zip(tokens.split(batch), keep.split(batch), strict=True):
        rows, mask = rows.to(device), mask.to(device)
        spliced = [(hook_point, _splice_hook(sae, mask, zero=False))]
        zeroed = [(hook_point, _splice_hook(sae, mask, zero=True))]
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
            totals["spliced"] += cosine_distance(clean, _final_hidden(model, rows, spliced)).item() * len(rows)
            totals["zero"] += cosine_distance(clean, _final_hidden(model, rows, zeroed)).item() * len(rows)
    mean = {k: v / len(tokens) for k, v in totals.items()}  # every row has the same number of positions
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
        hook_point = sae.cfg["hook_point"]
        metrics = reconstruction_metrics(sae, store.eval_acts[store.hook_index(hook_point)], store.device)
        if store.model is not None:  # None: a synthetic stream (tests), no model to splice into
            rows = store.eval_tokens[: store.cfg["downstream_eval_rows"]]
            metrics.update(downstream_metrics(sae, store.model, rows, store.kept_positions(rows),
                                              hook_point, store.cfg["model_batch_size"]))
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
    """One run's folder: config.json, metrics.jsonl, checkpoints, and its wandb run.

    `resume_step` reopens an existing run folder instead: metrics.jsonl keeps its lines up
    to that step (none for 0, a restart) and checkpoints newer than it, or left half
    written by a killed process, are removed (they are written again, identically)."""

    def __init__(self, cfg: dict[str, Any], resume_step: int | None = None):
        self.cfg = cfg
        self.run_dir = Path(cfg["output_dir"]) / cfg["run_name"]
        if resume_step is None:
            self._create_run_dir()
        else:
            self._reopen_run_dir(resume_step)
        write_atomic(self.run_dir / "config.json", json.dumps(cfg, indent=2, default=str))
        self.metrics_file = (self.run_dir / "metrics.jsonl").open("a")
        self.wandb_run = self._init_wandb()

    def _create_run_dir(self) -> None:
        cfg, run_dir = self.cfg, self.run_dir
        if cfg.get("overwrite") and run_dir.is_dir():
            if any(run_dir.iterdir()) and not (run_dir / "config.json").exists():
                raise ConfigError(f"config overwrite=True: {run_dir} is not a run folder (no config.json); "
                                  f"refusing to delete it")
            shutil.rmtree(run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            raise ConfigError(f"config run_name={cfg['run_name']!r}: the run folder {run_dir} already exists; "
                              f"continue it with --resume {run_dir}, replace it with overwrite=true, or choose "
                              f"another run_name (empty: a generated one)") from None
        except OSError as err:
            raise ConfigError(f"config output_dir={cfg['output_dir']!r} is not writable ({err.strerror}); "
                              f"choose another output_dir") from None

    def _reopen_run_dir(self, step: int) -> None:
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.exists():
            lines = metrics.read_text().splitlines()
            kept = [line for line in lines if _logged_step(line) <= step] if step > 0 else []
            write_atomic(metrics, "".join(line + "\n" for line in kept))
        for folder in (self.run_dir, self.run_dir / CHECKPOINT_DIR):  # left by a kill mid-write
            for entry in [*folder.glob(".tmp-*"), *folder.glob(".trash-*")]:
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        for ckpt_step, folder in periodic_checkpoints(self.run_dir):
            if ckpt_step > step:
                _remove_folder(folder)

    def _init_wandb(self):
        mode = resolve_wandb_mode(self.cfg["wandb_mode"])
        if mode == "disabled":
            return None
        id_file = self.run_dir / "wandb_run_id"
        try:
            import wandb

            resume = {"id": id_file.read_text().strip(), "resume": "allow"} if id_file.exists() else {}
            run = wandb.init(project=self.cfg["wandb_project"], name=self.cfg["run_name"], config=self.cfg,
                             dir=str(self.run_dir), mode=mode, reinit="create_new", **resume)
            id_file.write_text(run.id)
            return run
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
                        density: Tensor | None = None, final: bool = False,
                        stream: dict[str, Tensor] | Path | None = None) -> Path:
        """Write to a temporary folder, add the manifest (sizes and sha256 sums, written last,
        files fsynced), then rename it into place (SPEC §7). `stream` is the activation
        store's tensors, or the stream file of another run's checkpoint of this step, which
        is hard-linked (copied where links fail) rather than written again. A failed write (disk
        full...) removes the temporary folder and raises CheckpointError."""
        target = self.run_dir / FINAL_DIR if final else checkpoint_folder(self.run_dir, step)
        tmp = target.with_name(f".tmp-{target.name}")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            sae.save(tmp)
            torch.save(training_state, tmp / TRAINING_STATE_FILE)
            if density is not None:
                save_file({"density": density.contiguous()}, tmp / DENSITY_FILE)
            known = {}
            if isinstance(stream, Path):
                _link_or_copy(stream, tmp / STREAM_FILE)
                known[STREAM_FILE] = read_manifest(stream.parent)[STREAM_FILE]
            elif stream is not None:
                save_file({k: v.detach().contiguous().cpu() for k, v in stream.items()}, tmp / STREAM_FILE)
            write_manifest(tmp, known)
            if target.exists():
                _remove_folder(target)
            os.replace(tmp, target)
            _fsync_dir(target.parent)
        except WRITE_ERRORS as err:
            what = write_failure(err, tmp.parent)
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"{what} while writing checkpoint {target}; earlier "
                                  f"checkpoints are intact: free space, then continue with "
                                  f"python main.py --resume {self.run_dir}") from None
        return target

    def prune_checkpoints(self) -> None:
        """Keep the newest `keep_checkpoints` periodic checkpoints (0: all); final/ is never pruned.
        Call only once the newest is complete (for a group: in every run)."""
        keep = self.cfg.get("keep_checkpoints", 0)
        if keep > 0:
            for _, folder in periodic_checkpoints(self.run_dir)[keep:]:
                _remove_folder(folder)

    def finish(self) -> None:
        self.metrics_file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


# --- checkpoint files ---------------------------------------------------------------------

def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a partial line (a kill mid-write) so it is dropped."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _remove_folder(folder: Path) -> None:
    """Rename out of the way first, so a kill mid-delete never leaves a half folder under a real name."""
    trash = folder.with_name(f".trash-{folder.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_or_copy(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise
        shutil.copyfile(source, dest)


def _file_digest(path: Path, fsync: bool = False) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
        if fsync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def write_manifest(folder: Path, known: dict[str, dict[str, Any]] | None = None) -> None:
    """manifest.json: bytes and sha256 of every file in `folder` (`known` entries reused)."""
    files = {}
    for path in sorted(p for p in folder.iterdir() if p.name != MANIFEST_FILE):
        entry = (known or {}).get(path.name)
        if entry is None:
            entry = {"bytes": path.stat().st_size, "sha256": _file_digest(path, fsync=True)}
        files[path.name] = entry
    with (folder / MANIFEST_FILE).open("w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(folder)


def read_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    return json.loads((folder / MANIFEST_FILE).read_text())["files"]


def verify_checkpoint(folder: Path) -> str | None:
    """None when every file the manifest lists is there with its size and sha256, and the
    files a resume needs are among them; else what is wrong, in a few words."""
    try:
        files = read_manifest(folder)
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {MANIFEST_FILE}"
    for name in (WEIGHTS_FILE, CONFIG_FILE, TRAINING_STATE_FILE, STREAM_FILE):
        if name not in files:
            return f"{name} is not in its manifest"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, not {entry['bytes']}"
        if _file_digest(path) != entry["sha256"]:
            return f"{name} fails its sha256 check"
    return None


def periodic_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of a run's checkpoints/step_* folders, newest first (complete or not)."""
    folder = run_dir / CHECKPOINT_DIR
    found = [(int(m.group(1)), p) for p in folder.glob("step_*") if (m := STEP_DIR.fullmatch(p.name))]
    return sorted(found, reverse=True)


def find_resume_step(run_dirs: list[Path]) -> int:
    """The newest step at which every run has a complete checkpoint (0 when none: start over).
    Each newer checkpoint passed over gets a ResumeWarning saying why."""
    by_run = [dict(periodic_checkpoints(d)) for d in run_dirs]
    for step in sorted(set().union(*by_run), reverse=True):
        problems = []
        for run_dir, steps in zip(run_dirs, by_run, strict=True):
            folder = steps.get(step)
            reason = verify_checkpoint(folder) if folder else f"{run_dir.name} has no checkpoint of this step"
            if reason:
                problems.append(f"{folder or run_dir} ({reason})")
        if not problems:
            return step
        warnings.warn(f"checkpoint step {step} is incomplete or corrupted: {'; '.join(problems)}; "
                      f"falling back to an earlier checkpoint", ResumeWarning, stacklevel=2)
    names = ", ".join(str(d) for d in run_dirs)
    warnings.warn(f"no complete checkpoint in {names}: training again from step 0 in the same folder",
                  ResumeWarning, stacklevel=2)
    return 0


def checkpoint_folder(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"step_{step:07d}"


def load_checkpoint(folder: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(the SAE's state dict, the training state) of a checkpoint folder; the training
    state's `stream` holds the store's tensors too."""
    state = torch.load(folder / TRAINING_STATE_FILE, weights_only=True)
    state["stream"] = state["stream"] | load_file(folder / STREAM_FILE)
    return load_file(folder / WEIGHTS_FILE), state


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The config.json of a run folder (or of a checkpoint folder: the SAE's config)."""
    path = Path(run_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"config resume={str(run_dir)!r} is not a run folder: {path} cannot be read "
                          f"({getattr(err, 'strerror', None) or err})") from None


def write_group_file(run_dirs: list[Path]) -> None:
    """Record, in each run folder, the runs trained on one stream (resuming one resumes all)."""
    text = json.dumps({"runs": [d.name for d in run_dirs]}, indent=1)
    for run_dir in run_dirs:
        write_atomic(run_dir / GROUP_FILE, text)


def group_run_dirs(run_dir: str | Path) -> list[Path]:
    """The run folders trained on one stream with `run_dir` (itself included), in group order."""
    run_dir = Path(run_dir)
    read_run_config(run_dir)
    if not (run_dir / GROUP_FILE).exists():
        return [run_dir]
    dirs = [run_dir.parent / name for name in json.loads((run_dir / GROUP_FILE).read_text())["runs"]]
    missing = [str(d) for d in dirs if not (d / "config.json").exists()]
    if missing:
        raise ConfigError(f"config resume={str(run_dir)!r}: it trained in a group with {', '.join(missing)}, "
                          f"which is missing; a group resumes together (all its run folders side by side)")
    return dirs


class Progress:
    """One tqdm bar for a group of SAEs sharing a stream: tokens/s, loss, L0, dead, ETA."""

    def __init__(self, total_tokens: int, desc: str, initial: int = 0, enabled: bool = True):
        self.bar = tqdm(total=total_tokens, initial=initial, unit="tok", unit_scale=True, desc=desc,
                        dynamic_ncols=True, disable=not enabled)
        self.initial = initial  # tokens trained before a resume: not part of this process's rate
        self.start = time.perf_counter()

    def advance(self, tokens: int) -> None:
        self.bar.update(tokens)

    def show(self, loss: float, l0: float, dead: int) -> None:
        self.bar.set_postfix(loss=f"{loss:.3f}", l0=f"{l0:.1f}", dead=dead, refresh=False)

    def rate(self) -> float:
        return (self.bar.n - self.initial) / max(time.perf_counter() - self.start, 1e-9)

    def close(self) -> None:
        self.bar.close()
