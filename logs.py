"""A run's logs: config.json, metrics.jsonl and wandb (`RunLogger`), and the terminal
progress bar (`Progress`). Metrics are computed in metrics.py, checkpoints written in checkpoint.py."""

from __future__ import annotations

import contextlib
import json
import math
import netrc
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

from torch import Tensor
from tqdm.auto import tqdm

from activation_store import WRITE_ERRORS, write_failure
from checkpoint import reopen_run_dir, write_atomic
from config import ConfigError


class LogWriteError(RuntimeError):
    """config.json or metrics.jsonl could not be written (disk full...); what they held before is intact."""


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


def _reopened_at(file, path: Path, size: int):
    """`path` cut back to `size` bytes and opened for appending again (the failed `file` dropped unflushed)."""
    with contextlib.suppress(OSError, ValueError):
        file.close()
    with contextlib.suppress(OSError):
        os.truncate(path, size)
    return path.open("a")


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
            for k, v in metrics.items() if not isinstance(v, Tensor)}


class RunLogger:
    """One run's folder: creates it (or, with `resume_step`, reopens it rolled back to that
    step: `checkpoint.reopen_run_dir`), writes config.json and metrics.jsonl, and its wandb run."""

    def __init__(self, cfg: dict[str, Any], resume_step: int | None = None):
        self.cfg = cfg
        self.run_dir = Path(cfg["output_dir"]) / cfg["run_name"]
        if resume_step is None:
            self._create_run_dir()
            if cfg.get("auto"):
                print(f"{cfg['run_name']}: {cfg['auto']}")
        else:
            reopen_run_dir(self.run_dir, resume_step)
        try:
            write_atomic(self.run_dir / "config.json", json.dumps(cfg, indent=2, default=str))
        except WRITE_ERRORS as err:
            raise self._failed(err, "config.json") from None
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

    def _failed(self, err: BaseException, name: str) -> LogWriteError:
        return LogWriteError(f"{write_failure(err, self.run_dir)} while writing {self.run_dir / name}; what it held "
                             f"is intact: free space, then continue with python main.py --resume {self.run_dir}")

    def log(self, metrics: dict[str, Any], step: int, tokens: int) -> None:
        record = {"step": step, "tokens": tokens, **_jsonable(metrics)}
        before = self.metrics_file.tell()
        try:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
        except WRITE_ERRORS as err:  # drop the partial line: the file keeps only whole records
            path = self.run_dir / "metrics.jsonl"
            self.metrics_file = _reopened_at(self.metrics_file, path, before)
            raise self._failed(err, "metrics.jsonl") from None
        if self.wandb_run is not None:
            payload = {k: v for k, v in record.items() if k != "step"}
            if "density" in metrics:
                import wandb

                log_density = metrics["density"].clamp_min(1e-10).log10().numpy()
                payload["log10_density"] = wandb.Histogram(log_density)
            self.wandb_run.log(payload, step=step)

    def finish(self) -> None:
        """Close metrics.jsonl and finish the wandb run (again: nothing)."""
        if self.metrics_file.closed:
            return
        self.metrics_file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


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
