"""Load finished runs for analysis in a notebook or the terminal.

    from results import load_run, load_runs, load_history
    run = load_run("runs/batchtopk_...")      # config, metrics history, final SAE
    df = load_runs("runs")                     # one row per run: differing config + final metrics

`python results.py RUNS_DIR` prints the summary table.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from logs import FINAL_DIR
from sae import BaseSAE, load_sae


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
        evals = self.history.dropna(subset=["nmse"]) if "nmse" in self.history else self.history.iloc[0:0]
        return {} if evals.empty else evals.iloc[-1].dropna().to_dict()


def load_history(run: str | Path | Run) -> pd.DataFrame:
    """The metric history (metrics.jsonl) as a DataFrame, one row per logged record."""
    path = run.path if isinstance(run, Run) else Path(run)
    lines = (path / "metrics.jsonl").read_text().splitlines()
    return pd.DataFrame([json.loads(line) for line in lines if line.strip()])


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a run folder: it has no config.json")
    return Run(path, json.loads((path / "config.json").read_text()), load_history(path))


def find_runs(paths: str | Path | list[str | Path]) -> list[Path]:
    """Run folders at or directly under each given path."""
    found = []
    for p in [paths] if isinstance(paths, (str, Path)) else paths:
        p = Path(p)
        found += [p] if (p / "config.json").exists() else sorted(c.parent for c in p.glob("*/config.json"))
    return found


def load_runs(paths: str | Path | list[str | Path]) -> pd.DataFrame:
    """One row per run: the config keys that differ between runs, final metrics, run folder."""
    runs = [load_run(p) for p in find_runs(paths)]
    if not runs:
        return pd.DataFrame()
    configs = pd.DataFrame([r.cfg for r in runs]).astype(str)
    varying = [c for c in configs.columns if configs[c].nunique() > 1 or c == "sae_type"]
    rows = []
    for run in runs:
        rows.append({**{k: run.cfg.get(k) for k in varying if k != "run_name"},
                     "run_name": run.cfg["run_name"], **run.final_metrics, "run_dir": str(run.path)})
    return pd.DataFrame(rows)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python results.py RUNS_DIR [RUNS_DIR ...]", file=sys.stderr)
        return 2
    df = load_runs(argv)
    if df.empty:
        print(f"no run folders (with config.json) under {', '.join(argv)}", file=sys.stderr)
        return 1
    columns = [c for c in ("run_name", "sae_type", "l0", "explained_variance", "nmse", "dead", "dense",
                           "downstream_recovered", "ce_recovered") if c in df]
    print(df[columns].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
