"""Analyse finished runs in a notebook or the terminal: tables, frontier and density plots,
and latent dashboards built from each run's held-out evaluation text.

    from results import load_run, load_runs, plot_frontier, plot_density, top_activations, latent_summary
    df = load_runs("runs")                     # one row per run: differing config + final metrics
    plot_frontier(df, x="l0", y="nmse")        # one series per variant
    run = load_run(df.run_dir[0])              # config, metrics history, final SAE
    plot_density(run); top_activations(run, latent=7); latent_summary(run, latent=7)

`python results.py RUNS_DIR` prints the summary table and writes a report folder
(`RUNS_DIR/report/`, or `--out`): summary.md, frontier and density PNGs, latent dashboards.

SAELens export/import and the Hugging Face Hub are in interop.py.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file
from torch import Tensor

from activation_store import (
    eval_token_rows,
    excluded_token_ids,
    is_causal_lm,
    kept_activations,
    kept_position_mask,
    load_model,
)
from checkpoint import DENSITY_FILE, FINAL_DIR
from config import EVAL_KEYS, SYNTHETIC_DATASET, resolve_device
from metrics import DENSE_FRACTION, HEADLINE_METRICS, SUMMARY_METRICS
from sae import SAE_CLASSES, BaseSAE, load_sae

FRONTIER_METRICS = ("nmse", "explained_variance", "ce_recovered", "downstream_recovered", "mcc", "f1")
LABELS = {
    "l0": "L0 (active latents per token)",
    "nmse": "normalised MSE (lower is better)",
    "explained_variance": "explained variance (higher is better)",
    "ce_recovered": "CE loss recovered (higher is better)",
    "downstream_recovered": "downstream similarity recovered (higher is better)",
    "mcc": "MCC, decoder rows vs true features (higher is better)",
    "f1": "F1 of latents as detectors of their feature (higher is better)",
}
# wandb keeps the last value of every logged key; these come from the training lines, not evaluations
TRAINING_LINE_KEYS = ("lr", "sparsity_coeff", "tokens_per_s")
CONTEXT_CHARS = (80, 40)  # characters of text shown before and after a firing token


# --- runs and tables ------------------------------------------------------------------------

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


def read_records(run: str | Path | Run) -> list[dict[str, Any]]:
    """metrics.jsonl as written: one dict per logged step."""
    path = run.path if isinstance(run, Run) else Path(run)
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]


def load_history(run: str | Path | Run) -> pd.DataFrame:
    """The metric history (metrics.jsonl) as a DataFrame, one row per logged record."""
    return pd.DataFrame(read_records(run))


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a run folder: it has no config.json")
    return Run(path, json.loads((path / "config.json").read_text()), load_history(path))


def _as_run(run: str | Path | Run) -> Run:
    return run if isinstance(run, Run) else load_run(run)


def find_runs(paths: str | Path | list[str | Path]) -> list[Path]:
    """Run folders at or directly under each given path."""
    found = []
    for p in [paths] if isinstance(paths, (str, Path)) else paths:
        p = Path(p)
        found += [p] if (p / "config.json").exists() else sorted(c.parent for c in p.glob("*/config.json"))
    return found


def _runs_frame(records: list[tuple[dict[str, Any], dict[str, Any], str]]) -> pd.DataFrame:
    """(config, final metrics, location) per run -> one row each: the config keys that differ, metrics, run_dir."""
    if not records:
        return pd.DataFrame()
    configs = pd.DataFrame([cfg for cfg, _, _ in records]).astype(str)
    varying = [c for c in configs.columns if (configs[c].nunique() > 1 or c == "sae_type") and c != "run_name"]
    return pd.DataFrame([{**{k: cfg.get(k) for k in varying}, "run_name": cfg.get("run_name"), **metrics,
                          "run_dir": where} for cfg, metrics, where in records])


def _wandb_records(project: str) -> list[tuple[dict[str, Any], dict[str, Any], str]]:
    """Runs of a wandb project ("entity/project" or "project"): config, last evaluation, run URL."""
    try:
        import wandb

        runs = list(wandb.Api().runs(project))
    except Exception as err:
        raise RuntimeError(f"wandb_project={project!r}: could not read runs from wandb ({type(err).__name__}: "
                           f"{err}); local run folders need no wandb: load_runs('runs')") from err
    records = []
    for run in runs:
        summary = run.summary_metrics
        metrics = {k: v for k, v in summary.items() if isinstance(v, (int, float))
                   and not k.startswith(("_", "train/")) and k not in TRAINING_LINE_KEYS}
        cfg = dict(run.config)
        records.append((cfg | {"run_name": cfg.get("run_name", run.name)},
                        {"step": summary.get("_step"), **metrics}, run.url))
    return records


def load_runs(paths: str | Path | list[str | Path] | None = None, wandb_project: str | None = None) -> pd.DataFrame:
    """One row per run: the config keys that differ between runs, final metrics, run folder.
    With `wandb_project`, also the runs of that wandb project (run_dir is then the run's URL)."""
    records = [(r.cfg, r.final_metrics, str(r.path)) for r in map(load_run, find_runs(paths))] if paths else []
    if wandb_project:
        records += _wandb_records(wandb_project)
    return _runs_frame(records)


def last_evaluation(run: str | Path | Run) -> dict[str, Any]:
    """The last record of metrics.jsonl that holds evaluation metrics, exactly as written."""
    evals = [r for r in read_records(run) if "nmse" in r]
    return evals[-1] if evals else {}


# --- plots ----------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    headless = sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    if headless and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _variant_color(variant: str) -> str | None:
    """The same colour for a variant in every plot."""
    variants = list(SAE_CLASSES)
    return f"C{variants.index(variant)}" if variant in variants else None


def _finish(plt, fig):
    """Close the pyplot handle (no duplicate display in notebooks); the Figure still renders and saves."""
    fig.tight_layout()
    plt.close(fig)
    return fig


KIND_STYLES = {"SAE": ("-", "o"), "transcoder": ("--", "s"), "skip transcoder": (":", "^")}  # line, marker


def _kind(row) -> str:
    """SAE, transcoder or skip transcoder, from a load_runs row."""
    if not isinstance(row.get("target_hook_point"), str) or not row.get("target_hook_point"):
        return "SAE"
    return "skip transcoder" if row.get("skip_connection") is True else "transcoder"


def plot_frontier(df: pd.DataFrame, x: str = "l0", y: str = "nmse"):
    """Sparsity against a quality metric: one series per variant (`sae_type`) and kind (SAE, transcoder, skip
    transcoder: solid with circles, dashed with squares, dotted with triangles), points joined in order of x."""
    for column in (x, y):
        if column not in df:
            raise KeyError(f"plot_frontier: no column {column!r}; columns are {', '.join(map(str, df.columns))}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    kinds = df.apply(_kind, axis=1) if len(df) else []
    groups = df.groupby(["sae_type", kinds], sort=False) if "sae_type" in df else [(("runs", "SAE"), df)]
    for (variant, kind), points in groups:
        points = points.dropna(subset=[x, y]).sort_values(x)
        name = variant if kind == "SAE" else f"{variant} {kind}"
        line, marker = KIND_STYLES[kind]
        ax.plot(points[x], points[y], marker=marker, color=_variant_color(str(variant)), linestyle=line,
                label=f"{name} ({len(points)} run{'s' * (len(points) != 1)})")
    xs = df[x].dropna()
    if len(xs) and xs.min() > 0 and xs.max() / xs.min() >= 10:
        ax.set_xscale("log")
    ax.set_xlabel(LABELS.get(x, x))
    ax.set_ylabel(LABELS.get(y, y))
    short = {c: LABELS.get(c, c).split(" (")[0] for c in (x, y)}
    ax.set_title(f"Sparsity frontier on held-out data:\n{short[y]} vs {short[x]}")  # long labels: two lines
    ax.grid(alpha=0.3)
    ax.legend(title="variant")
    return _finish(plt, fig)


def plot_sample_efficiency(runs: list[str | Path | Run], metrics: tuple[str, ...] = ("mcc", "f1")):
    """Each metric of the held-out evaluations against the samples trained on (log axis), a panel per metric and
    a line per run: solid where the run's lr came from the recipe (config `auto`), dashed where it was set."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
    for run in map(_as_run, runs):
        history = load_history(run)
        history = history[history["tokens"] > 0].dropna(subset=list(metrics))
        auto = bool(run.cfg.get("auto"))
        label = f"{run.cfg['sae_type']}, lr {run.cfg['lr']:.1e}" + (" (auto)" if auto else "")
        for ax, metric in zip(axes[0], metrics, strict=True):
            ax.plot(history["tokens"], history[metric], marker=".", linestyle="-" if auto else "--",
                    color=_variant_color(run.cfg["sae_type"]), label=label)
    from matplotlib.ticker import EngFormatter, LogLocator

    for ax, metric in zip(axes[0], metrics, strict=True):
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(LogLocator(subs=(2, 4)))  # 250k, 500k, 1M, 2M, 4M... labelled as such
        for formatter in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
            formatter(EngFormatter(sep=""))
        ax.set_xlabel("training samples")
        ax.set_title(LABELS.get(metric, metric), fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Ground truth against samples, on held-out data")
    return _finish(plt, fig)


def load_density(run: str | Path | Run) -> Tensor:
    """Per-latent firing density on the evaluation set, saved with the final checkpoint."""
    return load_file(_as_run(run).path / FINAL_DIR / DENSITY_FILE)["density"]


def _group_ends(run: Run) -> list[int] | None:
    cls = SAE_CLASSES.get(run.cfg["sae_type"])
    return cls.group_ends(run.cfg) if cls else None


def latent_group(run: str | Path | Run, latent: int) -> str | None:
    """'group g of G (latents a-b)' for a variant with groups of latents (Matryoshka), else None."""
    ends = _group_ends(_as_run(run))
    if not ends:
        return None
    g = int(np.searchsorted(np.array(ends), latent, side="right"))
    return f"group {g + 1} of {len(ends)} (latents {([0, *ends])[g]}-{ends[g] - 1})"


def plot_density(run: str | Path | Run):
    """Histogram of log10 firing density; latents that never fired (density 0) get their own bar on the left,
    dense latents (> DENSE_FRACTION of tokens) are coloured (or, for a variant with groups of latents, each group)
    and the dense line drawn."""
    run = _as_run(run)
    density = load_density(run).double().numpy()
    alive = density[density > 0]
    log_alive = np.log10(alive)
    dense = alive > DENSE_FRACTION
    low = math.floor(min(log_alive.min(), math.log10(DENSE_FRACTION))) if alive.size else -5
    bins = np.linspace(low, 0, 8 * -low + 1)
    never_x = low - 0.75

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    never = int((density == 0).sum())
    ends = _group_ends(run)
    if ends:  # one colour per group of latents, in order
        group = np.searchsorted(np.array(ends), np.nonzero(density > 0)[0], side="right")
        spans = list(zip([0, *ends[:-1]], ends, strict=True))
        ax.hist([log_alive[group == g] for g in range(len(ends))], bins=bins, stacked=True,
                color=[plt.cm.viridis(g / max(len(ends) - 1, 1)) for g in range(len(ends))],
                label=[f"group {g + 1}, latents {a}-{b - 1}: {int((group == g).sum())} alive, "
                       f"{int((density[a:b] > DENSE_FRACTION).sum())} dense" for g, (a, b) in enumerate(spans)])
    else:
        ax.hist([log_alive[~dense], log_alive[dense]], bins=bins, stacked=True, color=["C0", "C3"],
                label=[f"fire on ≤ {DENSE_FRACTION:.0%} of tokens: {int((~dense).sum())}",
                       f"dense, > {DENSE_FRACTION:.0%} (right of dashed line): {int(dense.sum())}"])
    ax.bar([never_x], [never], width=0.5, color="0.5", label=f"never fired on eval: {never}")
    ax.annotate(str(never), (never_x, never), ha="center", va="bottom")
    ax.axvline(math.log10(DENSE_FRACTION), color="C3", linestyle="--", linewidth=1)
    ticks = list(range(low, 1))
    ax.set_xticks([never_x, *ticks], ["never", *map(str, ticks)])
    ax.set_xlabel("log10 firing density (fraction of held-out tokens a latent fires on)")
    ax.set_ylabel("latents")
    dead = run.final_metrics.get("dead")
    dead_note = "" if dead is None else f", dead in training: {int(dead)}"
    ax.set_title(f"Firing density: {run.cfg['sae_type']}, {len(density)} latents{dead_note}\n{run.cfg['run_name']}",
                 fontsize=10)
    ax.legend(fontsize=8)
    return _finish(plt, fig)


# --- the evaluation text, rebuilt as training built it --------------------------------------

@dataclass
class EvalSet:
    tokens: Tensor  # (rows, seq_len) the held-out rows
    where: Tensor  # (n, 2) row and position of each activation below
    acts: Tensor  # (n, d) raw hook activations at the positions the SAE was evaluated on


_MODELS: dict[tuple[str, str, str], Any] = {}
_EVAL_SETS: dict[tuple[str, ...], EvalSet] = {}


def get_model(model_name: str, device: str = "cpu", dtype: str = "float32"):
    """Boot a model once per process, so dashboards for many latents and runs share it."""
    key = (model_name, device, dtype)
    if key not in _MODELS:
        _MODELS[key] = load_model(model_name, device, dtype)
    return _MODELS[key]


def _model_of(run: Run, device: str):
    return get_model(run.cfg["model_name"], device, run.cfg.get("model_dtype", "float32"))


def eval_set(run: str | Path | Run, device: str = "auto") -> EvalSet:
    """The run's held-out rows and activations, as its ActivationsStore built them; cached per stream."""
    run, device = _as_run(run), resolve_device(device)
    key = (device, *(str(run.cfg.get(k)) for k in EVAL_KEYS))
    if key not in _EVAL_SETS:
        model, cfg = _model_of(run, device), run.cfg
        tokens = eval_token_rows(model.tokenizer, cfg)
        excluded = excluded_token_ids(model.tokenizer, cfg["exclude_special_tokens"])
        acts = kept_activations(model, tokens, [cfg["hook_point"]], excluded, cfg["model_batch_size"],
                                device, device)[0]
        _EVAL_SETS[key] = EvalSet(tokens, kept_position_mask(tokens, excluded).nonzero(), acts)
    return _EVAL_SETS[key]


@torch.no_grad()
def latent_activations(run: str | Path | Run, latents: list[int], device: str = "auto",
                       chunk: int = 4096) -> Tensor:
    """(held-out tokens, len(latents)) activations of the chosen latents, inference encoder, on the CPU."""
    run, device = _as_run(run), resolve_device(device)
    sae = run.sae(device)
    bad = [i for i in latents if not 0 <= i < sae.cfg["dict_size"]]
    if bad:
        raise IndexError(f"latent {bad[0]} does not exist: this SAE has {sae.cfg['dict_size']} latents")
    return torch.cat([sae.encode(x)[:, latents].cpu() for x in eval_set(run, device).acts.split(chunk)])


# --- latent dashboards ----------------------------------------------------------------------

def _one_line(text: str) -> str:
    return text.replace("\n", " ↵ ")


@dataclass
class Context:
    row: int  # held-out row
    position: int  # the firing token's position in the row
    activation: float
    before: str
    token: str
    after: str

    def marked(self, left: str = "[[", right: str = "]]") -> str:
        return _one_line(self.before) + left + _one_line(self.token) + right + _one_line(self.after)


@dataclass
class TopActivations:
    """The held-out contexts where a latent fires hardest; text in a terminal, HTML in a notebook."""

    run_name: str
    latent: int
    contexts: list[Context]

    def header(self) -> str:
        return f"latent {self.latent} of {self.run_name}: top {len(self.contexts)} held-out activations"

    def __str__(self) -> str:
        return "\n".join([self.header(), *(f"{c.activation:9.3f}  {c.marked()}" for c in self.contexts)])

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td style='text-align:right'>{c.activation:.3f}</td><td style='text-align:left'><code>"
            f"{html.escape(_one_line(c.before))}<mark><b>{html.escape(_one_line(c.token))}</b></mark>"
            f"{html.escape(_one_line(c.after))}</code></td></tr>" for c in self.contexts)
        return (f"<div><p><b>{html.escape(self.header())}</b></p><table><tr><th>activation</th>"
                f"<th style='text-align:left'>context (firing token marked)</th></tr>{rows}</table></div>")


def _split_context(tokenizer, ids: list[int], at: int) -> tuple[str, str, str]:
    """Text before, of and after token `at`: the row decoded as a whole (so sub-words and spacing read as in
    the text), then cut at word boundaries to about CONTEXT_CHARS either side."""
    before, upto, full = (tokenizer.decode(ids[:i]) for i in (at, at + 1, len(ids)))
    if not (upto.startswith(before) and full.startswith(upto)):  # decoding is not prefix-stable here
        before, upto = before, before + tokenizer.decode(ids[at:at + 1])
        full = upto + tokenizer.decode(ids[at + 1:])
    token, after = upto[len(before):], full[len(upto):]
    stripped = token.lstrip()
    before += token[:len(token) - len(stripped)]
    before_chars, after_chars = CONTEXT_CHARS
    if len(before) > before_chars:
        tail = before[-before_chars:]
        before = tail[tail.find(" ") + 1:]
    if len(after) > after_chars and " " in after[1:after_chars]:
        after = after[:after.rfind(" ", 1, after_chars)]
    return before, stripped, after


def _top_contexts(run: Run, latent: int, values: Tensor, n: int, device: str) -> TopActivations:
    ev, tokenizer = eval_set(run, device), _model_of(run, resolve_device(device)).tokenizer
    top = values.topk(min(n, int((values != 0).sum())))
    contexts = []
    for value, index in zip(top.values.tolist(), top.indices.tolist(), strict=True):
        row, pos = ev.where[index].tolist()
        text = _split_context(tokenizer, ev.tokens[row, 1:].tolist(), pos - 1)  # position 0 is BOS/CLS
        contexts.append(Context(row, pos, value, *text))
    return TopActivations(run.cfg["run_name"], latent, contexts)


def top_activations(run: str | Path | Run, latent: int, n: int = 20, device: str = "auto") -> TopActivations:
    """The n held-out contexts where `latent` fires hardest (fewer if it fires on fewer tokens)."""
    run = _as_run(run)
    return _top_contexts(run, latent, latent_activations(run, [latent], device)[:, 0], n, device)


@dataclass
class LatentSummary:
    run_name: str
    latent: int
    density: float  # fraction of held-out tokens it fires on (saved with the final checkpoint)
    mean_activation: float  # mean activation over the held-out tokens where it fires; nan if none
    promoted_tokens: list[tuple[str, float]] | None  # (token, logit per unit activation); None: no unembedding
    group: str | None = None  # its group of latents, for a variant that has groups (Matryoshka)

    def __str__(self) -> str:
        promoted = ("none (not a language model with an unembedding)" if self.promoted_tokens is None
                    else ", ".join(f"{tok!r} {value:+.2f}" for tok, value in self.promoted_tokens))
        group = f" ({self.group})" if self.group else ""
        return (f"latent {self.latent}{group} of {self.run_name}: density {self.density:.4g}, "
                f"mean activation when firing {self.mean_activation:.4g}; promoted tokens: {promoted}")


@torch.no_grad()
def promoted_tokens(run: str | Path | Run, latent: int, n: int = 10,
                    device: str = "auto") -> list[tuple[str, float]] | None:
    """The tokens whose logits the latent's raw-space decoder direction raises most through the unembedding
    (direct path, final layer norm ignored); None for models without one (encoders)."""
    run, device = _as_run(run), resolve_device(device)
    model = _model_of(run, device)
    if not is_causal_lm(model) or not hasattr(model, "W_U"):
        return None
    sae = run.sae(device)
    direction = sae.W_dec[latent] / sae.scale  # decode() divides by the input scale
    top = (direction.to(model.W_U.dtype) @ model.W_U).float().topk(n)
    return [(model.tokenizer.decode([i]), v) for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)]


def _summarise(run: Run, latent: int, values: Tensor, device: str) -> LatentSummary:
    firing = values[values != 0]
    mean = firing.mean().item() if firing.numel() else float("nan")
    return LatentSummary(run.cfg["run_name"], latent, float(load_density(run)[latent]), mean,
                         promoted_tokens(run, latent, device=device), latent_group(run, latent))


def latent_summary(run: str | Path | Run, latent: int, device: str = "auto") -> LatentSummary:
    """Density, mean activation when firing, and the tokens the decoder direction promotes."""
    run = _as_run(run)
    return _summarise(run, latent, latent_activations(run, [latent], device)[:, 0], device)


def dashboard_latents(run: str | Path | Run, n: int = 3, seed: int = 0) -> dict[int, str]:
    """The n most frequent alive latents and n others drawn at random from the alive ones: {latent: why}."""
    density = load_density(run)
    alive = (density > 0).nonzero().flatten()
    frequent = alive[density[alive].argsort(descending=True)][:n].tolist()
    others = np.array(sorted(set(alive.tolist()) - set(frequent)), dtype=int)
    drawn = np.random.default_rng(seed).choice(others, size=min(n, len(others)), replace=False).tolist()
    return {i: "most frequent" for i in frequent} | {int(i): "random alive" for i in sorted(drawn)}


# --- report ---------------------------------------------------------------------------------

def _cell(value: Any) -> str:
    """A value as written in metrics.jsonl (shortest exact float form, whole numbers as integers)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value).replace("|", "\\|")


def summary_table(runs: list[Run], config_columns: list[str]) -> str:
    """Markdown table of each run's last evaluation in metrics.jsonl."""
    evals = [last_evaluation(r) for r in runs]
    metrics = [m for m in ("step", "tokens", *SUMMARY_METRICS) if any(m in e for e in evals)]
    header = ["run_name", *config_columns, *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run, ev in zip(runs, evals, strict=True):
        cells = [run.cfg["run_name"], *(run.cfg.get(c) for c in config_columns), *(ev.get(m) for m in metrics)]
        lines.append("| " + " | ".join(_cell(v) for v in cells) + " |")
    return "\n".join(lines)


def write_dashboards(run: Run, folder: Path, n_latents: int, n_contexts: int = 10, device: str = "auto") -> Path:
    """Markdown and HTML dashboards for a handful of alive latents of one run; returns the markdown file."""
    chosen = dashboard_latents(run, n_latents)
    values = latent_activations(run, list(chosen), device)
    intro = (f"{n_latents} most frequent and {n_latents} random alive latents; top {n_contexts} held-out "
             f"contexts each, the firing token marked.")
    name = run.cfg["run_name"]
    md = [f"# Latent dashboards: {name}", "", intro]
    page = [f"<h1>{html.escape(name)}</h1>", f"<p>{html.escape(intro)}</p>"]
    for column, (latent, why) in enumerate(chosen.items()):
        summary = _summarise(run, latent, values[:, column], device)
        top = _top_contexts(run, latent, values[:, column], n_contexts, device)
        md += ["", f"## latent {latent} ({why})", "", str(summary), "", "```text", str(top), "```"]
        page += [f"<h2>latent {latent} ({why})</h2>", f"<p>{html.escape(str(summary))}</p>", top._repr_html_()]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.html").write_text("<html><meta charset='utf-8'><body>" + "\n".join(page) + "</body></html>\n")
    (folder / f"{name}.md").write_text("\n".join(md) + "\n")
    return folder / f"{name}.md"


def write_report(paths: str | Path | list[str | Path], out: str | Path, n_latents: int = 3,
                 device: str = "auto") -> Path:
    """summary.md (table, plots, links), frontier_<metric>.png, density/<run>.png, dashboards/<run>.md|html."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [load_run(p) for p in find_runs(paths)]
    df = load_runs(paths)
    config_columns = [c for c in df.columns if c in runs[0].cfg and c not in ("run_name", "run_dir")]
    doc = [f"# SAE report: {len(runs)} run(s)", "",
           "Each run's last evaluation on the held-out set, exactly as in its metrics.jsonl.", "",
           summary_table(runs, config_columns)]

    frontiers = [y for y in FRONTIER_METRICS if y in df and df[y].notna().any() and "l0" in df]
    doc += ["", "## Sparsity frontier"] if frontiers else []
    for y in frontiers:
        plot_frontier(df, "l0", y).savefig(out / f"frontier_{y}.png", dpi=120)
        doc += ["", f"![{y} against L0](frontier_{y}.png)"]

    finished = [r for r in runs if (r.path / FINAL_DIR / DENSITY_FILE).exists()]
    doc += ["", "## Firing density"] if finished else []
    (out / "density").mkdir(exist_ok=True)
    for run in finished:
        plot_density(run).savefig(out / "density" / f"{run.cfg['run_name']}.png", dpi=120)
        doc += ["", f"![density of {run.cfg['run_name']}](density/{run.cfg['run_name']}.png)"]

    with_text = [run for run in finished if run.cfg.get("dataset_path") != SYNTHETIC_DATASET]  # synthetic: no text
    if n_latents > 0 and with_text:
        doc += ["", "## Latent dashboards", ""]
        for run in with_text:
            md = write_dashboards(run, out / "dashboards", n_latents, device=device)
            doc.append(f"- [{run.cfg['run_name']}](dashboards/{md.name}) (also dashboards/{md.stem}.html)")
    (out / "summary.md").write_text("\n".join(doc) + "\n")
    return out


def __getattr__(name: str):
    """`from results import load_saelens` (and the other SAELens/Hub functions, now in interop.py), as model
    cards already published print it."""
    if name in ("export_saelens", "load_saelens", "model_card", "build_hub_folder", "upload"):
        import interop

        return getattr(interop, name)
    raise AttributeError(f"module 'results' has no attribute {name!r}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Print a summary of finished runs and write a report folder.")
    parser.add_argument("runs", nargs="+", help="run folders, or folders holding them")
    parser.add_argument("--out", help="report folder (default: RUNS_DIR/report)")
    parser.add_argument("--latents", type=int, default=3,
                        help="dashboards for this many most frequent and this many random alive latents per run")
    parser.add_argument("--device", default="auto", help="where the model and SAEs run for the dashboards")
    args = parser.parse_args(argv)
    df = load_runs(args.runs)
    if df.empty:
        print(f"no run folders (with config.json) under {', '.join(args.runs)}", file=sys.stderr)
        return 1
    columns = [c for c in ("run_name", "sae_type", *HEADLINE_METRICS) if c in df]
    print(df[columns].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    out = write_report(args.runs, args.out or Path(args.runs[0]) / "report", args.latents, args.device)
    print(f"report: {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
