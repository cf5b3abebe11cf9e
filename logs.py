"""A run's logs: config.json, metrics.jsonl and wandb (`RunLogger`), and the terminal progress bar
(`Progress`). Metrics are computed in metrics.py, checkpoints written in checkpoint.py."""

from __future__ import annotations

import contextlib
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

import pandas as pd
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from checkpoint import DENSITY_FILE, FINAL_DIR, reopen_run_dir
from config import ConfigError
from files import WRITE_ERRORS, write_atomic, write_failure
from sae import BaseSAE, load_sae


class LogWriteError(RuntimeError):
    """config.json or metrics.jsonl could not be written (disk full...); what they held before
    is intact."""


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
    """`path` cut to `size` bytes and reopened to append (the failed `file` dropped unflushed)."""
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
                raise ConfigError(f"config overwrite=True: {run_dir} is not a run folder (no "
                                  f"config.json); refusing to delete it")
            shutil.rmtree(run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            raise ConfigError(f"config run_name={cfg['run_name']!r}: the run folder {run_dir} "
                              f"already exists; continue it with --resume {run_dir}, replace it "
                              f"with overwrite=true, or choose another run_name (empty: a "
                              f"generated one)") from None
        except OSError as err:
            raise ConfigError(f"config output_dir={cfg['output_dir']!r} is not writable "
                              f"({err.strerror}); choose another output_dir") from None

    def _init_wandb(self):
        mode = resolve_wandb_mode(self.cfg["wandb_mode"])
        if mode == "disabled":
            return None
        id_file = self.run_dir / "wandb_run_id"
        try:
            import wandb

            resume = ({"id": id_file.read_text().strip(), "resume": "allow"}
                      if id_file.exists() else {})
            run = wandb.init(project=self.cfg["wandb_project"], name=self.cfg["run_name"],
                             config=self.cfg, dir=str(self.run_dir), mode=mode, reinit="create_new",
                             **resume)
            id_file.write_text(run.id)
            return run
        except Exception as err:  # wandb trouble never stops training
            warnings.warn(f"wandb disabled for {self.cfg['run_name']}: {type(err).__name__}: {err}",
                          stacklevel=2)
            return None

    def _failed(self, err: BaseException, name: str) -> LogWriteError:
        return LogWriteError(f"{write_failure(err, self.run_dir)} while writing "
                             f"{self.run_dir / name}; what it held is intact: free space, then "
                             f"continue with python main.py --resume {self.run_dir}")

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


@dataclass
class Run:
    path: Path
    cfg: dict[str, Any]
    history: pd.DataFrame

    def sae(self, device: str = "cpu") -> BaseSAE:
        return load_sae(self.path / FINAL_DIR, device)

    @property
    def final_metrics(self) -> dict[str, Any]:
        """The last evaluation's metrics (rows that carry `nmse` are evaluations)."""
        evals = (self.history.dropna(subset=["nmse"]) if "nmse" in self.history
                 else self.history.iloc[0:0])
        return {} if evals.empty else evals.iloc[-1].dropna().to_dict()


def read_records(run: str | Path | Run) -> list[dict[str, Any]]:
    """metrics.jsonl as written: one dict per logged step."""
    path = run.path if isinstance(run, Run) else Path(run)
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()
            if line.strip()]


def load_history(run: str | Path | Run) -> pd.DataFrame:
    """The metric history (metrics.jsonl) as a DataFrame, one row per logged record."""
    return pd.DataFrame(read_records(run))


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a run folder: it has no config.json")
    return Run(path, json.loads((path / "config.json").read_text()), load_history(path))


def as_run(run: str | Path | Run) -> Run:
    return run if isinstance(run, Run) else load_run(run)


def last_evaluation(run: str | Path | Run) -> dict[str, Any]:
    """The last record of metrics.jsonl that holds evaluation metrics, exactly as written."""
    evals = [r for r in read_records(run) if "nmse" in r]
    return evals[-1] if evals else {}


def load_density(run: str | Path | Run) -> Tensor:
    """Per-latent firing density on the evaluation set, saved with the final checkpoint."""
    return load_file(as_run(run).path / FINAL_DIR / DENSITY_FILE)["density"]


def markdown_cell(value: Any) -> str:
    """A value as written in metrics.jsonl (shortest exact float, whole numbers as integers)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value).replace("|", "\\|")
