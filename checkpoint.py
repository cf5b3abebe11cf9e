"""Checkpoints and resume (docs/math.md §7).

A run folder holds `checkpoints/step_NNNNNNN/` folders and, once finished, `final/`. Each holds
the SAE (`sae.safetensors` with its buffers: dead counters, threshold; `config.json`),
`training_state.pt` (optimiser, lr schedule, step, tokens, skipped batches, RNG states, the
store's state: where the buffer's block starts in the stream), `stream.safetensors` (the store's
tensors: its shuffle generator's state),
`density.safetensors` in `final/` only, and `manifest.json` (size and sha256 of every other
file), written last, so a folder without a valid manifest is never resumed from. A group of
runs trained on one stream checkpoints and resumes together (`group.json` lists its runs).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor

from activation_store import ActivationSource
from config import (
    CHECKPOINT_KEYS,
    DERIVED_KEYS,
    RESUME_KEYS,
    RUN_KEYS,
    ConfigError,
    all_keys,
    get_default_cfg,
    resolve_device,
)
from data_parallel import rank, world_size
from files import WRITE_ERRORS, fsync_dir, remove_folder, write_atomic, write_failure
from sae import CONFIG_FILE, WEIGHTS_FILE, BaseSAE, sae_tensors, save_sae
from schedule import SparsityCoefficient

FINAL_DIR = "final"
CHECKPOINT_DIR = "checkpoints"
TRAINING_STATE_FILE = "training_state.pt"
DENSITY_FILE = "density.safetensors"
STREAM_FILE = "stream.safetensors"  # the store's tensors (shuffle generator state): exact resume
MANIFEST_FILE = "manifest.json"  # size and sha256 of every other file, written last
GROUP_FILE = "group.json"  # the runs that trained on one stream, so resuming one resumes all
STEP_DIR = re.compile(r"step_(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, I/O error); earlier checkpoints are intact."""


class ResumeWarning(UserWarning):
    """A checkpoint was passed over on resume (incomplete, corrupt, or missing in a group's run)."""


# --- files ----------------------------------------------------------------------------------

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
    fsync_dir(folder)


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


# --- run folders and groups -----------------------------------------------------------------

def checkpoint_folder(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"step_{step:07d}"


def periodic_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of a run's checkpoints/step_* folders, newest first (complete or not)."""
    folder = run_dir / CHECKPOINT_DIR
    found = [(int(m.group(1)), p) for p in folder.glob("step_*")
             if (m := STEP_DIR.fullmatch(p.name))]
    return sorted(found, reverse=True)


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The config.json of a run folder (or of a checkpoint folder: the SAE's config)."""
    path = Path(run_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"config resume={str(run_dir)!r} is not a run folder: {path} cannot be "
                          f"read ({getattr(err, 'strerror', None) or err})") from None


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
    dirs = [run_dir.parent / name
            for name in json.loads((run_dir / GROUP_FILE).read_text())["runs"]]
    missing = [str(d) for d in dirs if not (d / "config.json").exists()]
    if missing:
        raise ConfigError(f"config resume={str(run_dir)!r}: it trained in a group with "
                          f"{', '.join(missing)}, which is missing; a group resumes together "
                          f"(all its run folders side by side)")
    return dirs


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a partial line (a kill mid-write): dropped."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def reopen_run_dir(run_dir: Path, step: int) -> None:
    """Roll a run folder back to `step` for a resume: metrics.jsonl keeps its lines up to that
    step (none for 0, a restart), and checkpoints newer than it, or left half written by a
    killed process, are removed (they are written again, identically)."""
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        lines = metrics.read_text().splitlines()
        kept = [line for line in lines if _logged_step(line) <= step] if step > 0 else []
        write_atomic(metrics, "".join(line + "\n" for line in kept))
    for folder in (run_dir, run_dir / CHECKPOINT_DIR):  # left by a kill mid-write
        for entry in [*folder.glob(".tmp-*"), *folder.glob(".trash-*")]:
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    for ckpt_step, folder in periodic_checkpoints(run_dir):
        if ckpt_step > step:
            remove_folder(folder)


class Trainee(Protocol):
    """What a checkpoint reads and restores of a run in training (training.Trainee)."""

    cfg: dict[str, Any]
    sae: BaseSAE
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    skipped_batches: int
    final_metrics: dict[str, Any] | None
    coefficient: SparsityCoefficient

    @property
    def run_dir(self) -> Path: ...


# --- writing --------------------------------------------------------------------------------

def save_checkpoint(run_dir: Path, sae: BaseSAE, training_state: dict[str, Any], step: int,
                    density: Tensor | None = None, final: bool = False,
                    stream: dict[str, Tensor] | Path | None = None,
                    extra: dict[str, Tensor] | None = None) -> Path:
    """Write to a temporary folder, add the manifest (sizes and sha256 sums, written last,
    files fsynced), then rename it into place. `stream` is the activation store's tensors,
    or the stream file of another run's checkpoint of this step, which is hard-linked
    (copied where links fail) rather than written again. A failed write (disk full...)
    removes the temporary folder and raises CheckpointError."""
    target = run_dir / FINAL_DIR if final else checkpoint_folder(run_dir, step)
    tmp = target.with_name(f".tmp-{target.name}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        save_sae(sae, tmp, extra)
        torch.save(training_state, tmp / TRAINING_STATE_FILE)
        if density is not None:
            save_file({"density": density.contiguous()}, tmp / DENSITY_FILE)
        known = {}
        if isinstance(stream, Path):
            _link_or_copy(stream, tmp / STREAM_FILE)
            known[STREAM_FILE] = read_manifest(stream.parent)[STREAM_FILE]
        elif stream is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in stream.items()},
                      tmp / STREAM_FILE)
        write_manifest(tmp, known)
        if target.exists():
            remove_folder(target)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except WRITE_ERRORS as err:
        what = write_failure(err, tmp.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{what} while writing checkpoint {target}; earlier "
                              f"checkpoints are intact: free space, then continue with "
                              f"python main.py --resume {run_dir}") from None
    except BaseException:  # aborted (a second Ctrl-C): no half-written folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` periodic checkpoints (0: all); final/ is never pruned.
    Call only once the newest is complete (for a group: in every run)."""
    if keep > 0:
        for _, folder in periodic_checkpoints(run_dir)[keep:]:
            remove_folder(folder)


def checkpoint_due(cfg: dict[str, Any], step: int) -> bool:
    return bool(cfg["checkpoint_freq"]) and step % cfg["checkpoint_freq"] == 0


def rng_states() -> dict[str, Any]:
    """torch (CPU, CUDA), numpy, python RNG states, in types torch.load(weights_only=True) reads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(),
              "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
              "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def training_state(t: Trainee, step: int, tokens: int, stream: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint needs beyond the SAE's state dict; `stream` holds the store's
    non-tensor state (its tensors go to their own file)."""
    return {
        "step": step,
        "tokens": tokens,
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.scheduler.state_dict(),
        "skipped_batches": t.skipped_batches,
        "rng": rng_states(),
        "stream": stream,
    }


def gathered_stream_state(store: ActivationSource) -> dict[str, Any] | None:
    """The store state to checkpoint: this process's, or under torchrun every rank's,
    gathered on rank 0 with keys `rank{r}.` (None on the other ranks)."""
    state = store.state_dict()
    if world_size() == 1:
        return state
    states = [None] * world_size() if rank() == 0 else None
    dist.gather_object({k: v.cpu() if isinstance(v, Tensor) else v for k, v in state.items()},
                       states, dst=0)
    if rank() != 0:
        return None
    return {"world_size": world_size()} | {f"rank{r}.{k}": v for r, s in enumerate(states)
                                           for k, v in s.items()}


def checkpoint_group(trainees: list[Trainee], step: int, total_steps: int, tokens: int,
                     store: ActivationSource, now: bool = False) -> None:
    """Checkpoint the runs due at `step` (all at the end; all of `trainees` with `now`), after every
    run logged this step.
    The stream tensors are written once and hard-linked into the other runs' checkpoints;
    old checkpoints are pruned only once every run's new one is complete."""
    last = step == total_steps
    due = [t for t in trainees if now or last or checkpoint_due(t.cfg, step)]
    if not due:
        return
    stream = gathered_stream_state(store)
    if stream is None:  # ranks other than 0 write nothing
        return
    scalars = {k: v for k, v in stream.items() if not isinstance(v, Tensor)}
    tensors: dict[str, Tensor] | Path = {k: v for k, v in stream.items() if isinstance(v, Tensor)}
    for t in due:
        state = training_state(t, step, tokens, scalars)
        if last:
            save_checkpoint(t.run_dir, t.sae, state, step, density=t.final_metrics["density"],
                            final=True, extra=t.coefficient.state)
        else:
            tensors = save_checkpoint(t.run_dir, t.sae, state, step, stream=tensors,
                                      extra=t.coefficient.state) / STREAM_FILE
    if not last:
        for t in due:
            prune_checkpoints(t.run_dir, t.cfg.get("keep_checkpoints", 0))


# --- resuming -------------------------------------------------------------------------------

def _same_setting(key: str, given: Any, saved: Any) -> bool:
    if key == "device":
        return resolve_device(given) == resolve_device(saved)
    if key in ("buffer_device", "hook_point", "target_hook_point", "layers") and given == "":
        return True  # "" means derived (from device, layer, site, target_site, the model's
        # layers); the saved config has it
    return given == saved


def resumed_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    """For `resume=RUN_DIR`: the run's saved config, with `cfg`'s values of RESUME_KEYS.
    A key set differently in `cfg` (another variant, dict_size, data...) is refused, since
    a resumed run must continue the same run; the folder itself gives output_dir and run_name."""
    if not cfg.get("resume"):
        return cfg
    run_dir = Path(cfg["resume"])
    known = all_keys()  # a key of a variant not registered here is not this run's concern
    saved = {k: v for k, v in (get_default_cfg() | read_run_config(run_dir)).items() if k in known}
    for key, value in cfg.items():
        if key in RESUME_KEYS or key in DERIVED_KEYS or key in RUN_KEYS or key not in known:
            continue
        if not _same_setting(key, value, saved.get(key)):
            allowed = ", ".join(k for k in RESUME_KEYS if k != "resume")
            raise ConfigError(f"config {key}={value!r} differs from {saved.get(key)!r} in the run "
                              f"being resumed ({run_dir / 'config.json'}): a resumed run keeps its "
                              f"config; only {allowed} may change (start a new run for other "
                              f"settings)")
    return saved | {k: cfg[k] for k in RESUME_KEYS if k in cfg} | {
        "output_dir": str(run_dir.parent), "run_name": run_dir.name, "overwrite": False}


def find_resume_step(run_dirs: list[Path]) -> int:
    """The newest step at which every run has a complete checkpoint (0 when none: start over).
    Each newer checkpoint passed over gets a ResumeWarning saying why."""
    by_run = [dict(periodic_checkpoints(d)) for d in run_dirs]
    for step in sorted(set().union(*by_run), reverse=True):
        problems = []
        for run_dir, steps in zip(run_dirs, by_run, strict=True):
            folder = steps.get(step)
            reason = (verify_checkpoint(folder) if folder
                      else f"{run_dir.name} has no checkpoint of this step")
            if reason:
                problems.append(f"{folder or run_dir} ({reason})")
        if not problems:
            return step
        warnings.warn(f"checkpoint step {step} is incomplete or corrupted: {'; '.join(problems)}; "
                      f"falling back to an earlier checkpoint", ResumeWarning, stacklevel=2)
    names = ", ".join(str(d) for d in run_dirs)
    warnings.warn(f"no complete checkpoint in {names}: training again from step 0 in the same "
                  f"folder", ResumeWarning, stacklevel=2)
    return 0


def step_to_resume(run_dirs: list[Path]) -> int:
    """find_resume_step, refusing runs that already finished."""
    if all((d / FINAL_DIR / MANIFEST_FILE).exists() for d in run_dirs):
        raise ConfigError(f"config resume={str(run_dirs[0])!r}: the "
                          f"run{'s' if len(run_dirs) > 1 else ''} already finished "
                          f"({FINAL_DIR}/ is complete); nothing to resume")
    return find_resume_step(run_dirs)


def check_checkpoints_fit(cfgs: list[dict[str, Any]], step: int) -> None:
    """Each run's checkpoint of `step` was written by a run with the same variant, shapes
    and stream; checked before anything in the run folders is touched."""
    for cfg in cfgs:
        folder = checkpoint_folder(Path(cfg["output_dir"]) / cfg["run_name"], step)
        saved = read_run_config(folder)
        for key in CHECKPOINT_KEYS:
            if key in cfg and not _same_setting(key, cfg[key], saved.get(key)):
                raise ConfigError(f"checkpoint {folder} is from another run: its {key} is "
                                  f"{saved.get(key)!r}, this run's is {cfg[key]!r}; resume a run "
                                  f"only from its own checkpoints")


def load_checkpoint(folder: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(the SAE's state dict, the training state) of a checkpoint folder; the training
    state's `stream` holds the store's tensors too."""
    state = torch.load(folder / TRAINING_STATE_FILE, weights_only=True)
    state["stream"] = state["stream"] | load_file(folder / STREAM_FILE)
    return load_file(folder / WEIGHTS_FILE), state


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def this_ranks_stream_state(stream: dict[str, Any], folder: Path) -> dict[str, Any]:
    saved_world = stream.get("world_size", 1)
    if saved_world != world_size():
        raise ConfigError(f"checkpoint {folder} was written by {saved_world} data-parallel "
                          f"process(es), this run has {world_size()}: resume with the same "
                          f"torchrun --nproc_per_node/--nnodes")
    if saved_world == 1:
        return stream
    prefix = f"rank{rank()}."
    return {k.removeprefix(prefix): v for k, v in stream.items() if k.startswith(prefix)}


def restore_group(trainees: list[Trainee], store: ActivationSource, step: int) -> None:
    """Load every run's checkpoint of `step`, the stream state and the RNG states."""
    for i, t in enumerate(trainees):
        folder = checkpoint_folder(t.run_dir, step)
        weights, state = load_checkpoint(folder)
        try:
            t.sae.load_state_dict(sae_tensors(weights))
            t.coefficient.load(weights)
            t.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise ConfigError(f"checkpoint {folder} does not fit this run: "
                              f"{str(err).strip().splitlines()[0]}; "
                              f"resume a run only from its own folder") from None
        t.scheduler.load_state_dict(state["scheduler"])
        t.skipped_batches = state["skipped_batches"]
        if i == 0:  # the same stream and RNG state in every run of the group
            store.load_state_dict(this_ranks_stream_state(state["stream"], folder))
            set_rng_states(state["rng"])
