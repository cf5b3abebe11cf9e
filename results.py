"""Analyse finished runs in a notebook or the terminal: tables, frontier and density plots,
and latent dashboards built from each run's held-out evaluation text.

    from results import load_run, load_runs, plot_frontier, plot_density, top_activations, latent_summary
    df = load_runs("runs")                     # one row per run: differing config + final metrics
    plot_frontier(df, x="l0", y="nmse")        # one series per variant
    run = load_run(df.run_dir[0])              # config, metrics history, final SAE
    plot_density(run); top_activations(run, latent=7); latent_summary(run, latent=7)

`python results.py RUNS_DIR` prints the summary table and writes a report folder
(`RUNS_DIR/report/`, or `--out`): summary.md, frontier and density PNGs, latent dashboards.

Interoperability: `export_saelens(sae, folder)` / `load_saelens(folder)` write and read SAELens 6 folders;
`build_hub_folder(run, folder)` and `upload(run, repo_id)` publish a run's final SAE with a model card.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
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
from config import SAE_TYPES, SITES, ConfigError, get_default_cfg, resolve_device
from metrics import DENSE_FRACTION, HEADLINE_METRICS, SUMMARY_METRICS
from sae import BaseSAE, BatchTopKSAE, JumpReLUSAE, build_sae, load_sae

FRONTIER_METRICS = ("nmse", "explained_variance", "ce_recovered", "downstream_recovered")
LABELS = {
    "l0": "L0 (active latents per token)",
    "nmse": "normalised MSE (lower is better)",
    "explained_variance": "explained variance (higher is better)",
    "ce_recovered": "CE loss recovered (higher is better)",
    "downstream_recovered": "downstream similarity recovered (higher is better)",
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
    return f"C{SAE_TYPES.index(variant)}" if variant in SAE_TYPES else None


def _finish(plt, fig):
    """Close the pyplot handle (no duplicate display in notebooks); the Figure still renders and saves."""
    fig.tight_layout()
    plt.close(fig)
    return fig


def plot_frontier(df: pd.DataFrame, x: str = "l0", y: str = "nmse"):
    """Sparsity against a quality metric: one series per variant (`sae_type`), points joined in order of x."""
    for column in (x, y):
        if column not in df:
            raise KeyError(f"plot_frontier: no column {column!r}; columns are {', '.join(map(str, df.columns))}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = df.groupby("sae_type") if "sae_type" in df else [("runs", df)]
    for variant, points in groups:
        points = points.dropna(subset=[x, y]).sort_values(x)
        ax.plot(points[x], points[y], marker="o", color=_variant_color(str(variant)),
                label=f"{variant} ({len(points)} run{'s' * (len(points) != 1)})")
    xs = df[x].dropna()
    if len(xs) and xs.min() > 0 and xs.max() / xs.min() >= 10:
        ax.set_xscale("log")
    ax.set_xlabel(LABELS.get(x, x))
    ax.set_ylabel(LABELS.get(y, y))
    short = {c: LABELS.get(c, c).split(" (")[0] for c in (x, y)}
    ax.set_title(f"Sparsity frontier on held-out data: {short[y]} vs {short[x]}")
    ax.grid(alpha=0.3)
    ax.legend(title="variant")
    return _finish(plt, fig)


def load_density(run: str | Path | Run) -> Tensor:
    """Per-latent firing density on the evaluation set, saved with the final checkpoint."""
    return load_file(_as_run(run).path / FINAL_DIR / DENSITY_FILE)["density"]


def plot_density(run: str | Path | Run):
    """Histogram of log10 firing density; latents that never fired (density 0) get their own bar on the left,
    dense latents (> DENSE_FRACTION of tokens) are coloured and the dense line drawn."""
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
    ax.legend()
    return _finish(plt, fig)


# --- the evaluation text, rebuilt as training built it --------------------------------------

@dataclass
class EvalSet:
    tokens: Tensor  # (rows, seq_len) the held-out rows
    where: Tensor  # (n, 2) row and position of each activation below
    acts: Tensor  # (n, d) raw hook activations at the positions the SAE was evaluated on


EVAL_KEYS = ("model_name", "model_dtype", "dataset_path", "dataset_split", "text_column", "seq_len", "seed",
             "eval_tokens", "hook_point", "exclude_special_tokens", "model_batch_size")
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

    def __str__(self) -> str:
        promoted = ("none (not a language model with an unembedding)" if self.promoted_tokens is None
                    else ", ".join(f"{tok!r} {value:+.2f}" for tok, value in self.promoted_tokens))
        return (f"latent {self.latent} of {self.run_name}: density {self.density:.4g}, "
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
                         promoted_tokens(run, latent, device=device))


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

    if n_latents > 0 and finished:
        doc += ["", "## Latent dashboards", ""]
        for run in finished:
            md = write_dashboards(run, out / "dashboards", n_latents, device=device)
            doc.append(f"- [{run.cfg['run_name']}](dashboards/{md.name}) (also dashboards/{md.stem}.html)")
    (out / "summary.md").write_text("\n".join(doc) + "\n")
    return out


# --- interoperability: SAELens folders and the Hugging Face Hub -----------------------------
#
# The layout matched is SAELens 6's (read in decoderesearch/SAELens at sae_lens 6.49: saes/sae.py SAEConfig and
# SAE.load_from_disk, saes/{standard,topk,jumprelu,batchtopk}_sae.py, loading/pretrained_sae_loaders.py; exports of
# all four variants checked once by hand to load in sae_lens 6.54.12 and give our outputs).
# cfg.json: the SAEConfig fields at the top level (architecture, d_in, d_sae, dtype, device, apply_b_dec_to_input,
# normalize_activations, reshape_activations; topk adds k and rescale_acts_by_decoder_norm) and the model facts
# under "metadata" (model_name, hook_name, context_size, ...; metadata.sae_lens_version must be >= 6.0, or SAELens
# reads the file as an older flat config). sae_weights.safetensors: W_enc (d_in, d_sae), W_dec (d_sae, d_in), b_enc,
# b_dec, and threshold (d_sae,) for jumprelu. SAELens computes pre = (x - b_dec) @ W_enc + b_enc (with
# apply_b_dec_to_input) and x_hat = f @ W_dec + b_dec, with f = relu(pre) (standard), relu of each row's k largest
# pre (topk), or relu(pre) * 1[pre > relu(threshold)] (jumprelu; SAELens saves its own BatchTopK SAEs this way too).

SAELENS_CFG_FILE = "cfg.json"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"  # metadata.sae_lens_version written: the cfg.json layout above, not an install
SAELENS_ARCHITECTURE = {"vanilla": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}
FROM_SAELENS = {"standard": "vanilla", "topk": "topk", "jumprelu": "jumprelu"}
EXPORT_MARKER = "sae_training_export"  # metadata entry of our exports: variant, top_k, folded input scale, run
HUB_CONFIG_KEYS = ("model_name", "hook_point", "dataset_path", "sae_type", "dict_size", "top_k", "l1_coeff", "l0_coeff",
                   "bandwidth", "threshold_ema_decay", "num_tokens", "batch_size", "lr", "seq_len", "seed")
VARIANT_KEYS = {"top_k": ("topk", "batchtopk"), "threshold_ema_decay": ("batchtopk",), "l1_coeff": ("vanilla",),
                "l0_coeff": ("jumprelu",), "bandwidth": ("jumprelu",)}  # model card rows shown only for these


def hook_name(cfg: dict[str, Any]) -> str:
    """The hook point an SAE reads (`blocks.{layer}.hook_{site}`); also the SAE's folder name on the Hub."""
    return cfg.get("hook_point") or f"blocks.{cfg['layer']}.hook_{cfg['site']}"


@torch.no_grad()
def saelens_tensors(sae: BaseSAE) -> dict[str, Tensor]:
    """The SAE's weights under SAELens's names, the input scale s folded in so that SAELens's formulas on raw x give
    exactly our encode/decode: (x - b_dec/s) @ (s W_enc) + b_enc = (s x - b_dec) @ W_enc + b_enc, and
    f @ (W_dec/s) + b_dec/s = (f @ W_dec + b_dec)/s. Latents (and so thresholds) are unchanged; the exported
    decoder rows have norm 1/s. BatchTopK's inference rule f = pre * 1[pre > theta] is a JumpReLU with theta
    given to every latent."""
    s = sae.scale.detach().float()
    w_enc, w_dec, b_enc, b_dec = (t.detach().float() for t in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec))
    tensors = {"W_enc": w_enc * s, "W_dec": w_dec / s, "b_enc": b_enc, "b_dec": b_dec / s}
    if isinstance(sae, JumpReLUSAE):
        tensors["threshold"] = sae.threshold.detach()
    elif isinstance(sae, BatchTopKSAE):
        tensors["threshold"] = sae.threshold.detach().float().expand(sae.cfg["dict_size"])
    return {name: t.float().cpu().contiguous() for name, t in tensors.items()}


def saelens_config(sae: BaseSAE) -> dict[str, Any]:
    """cfg.json for `saelens_tensors(sae)`: the scale is in the weights, so no normalisation, except that an SAE
    trained with standardize_tokens is SAELens's normalize_activations="layer_norm" (the same standardisation on
    the way in; SAELens puts back std rather than std + 1e-5 on the way out: relative difference 1e-5 / std)."""
    cfg = sae.cfg
    architecture = SAELENS_ARCHITECTURE[cfg["sae_type"]]
    out: dict[str, Any] = {"architecture": architecture, "d_in": cfg["act_size"], "d_sae": cfg["dict_size"],
                           "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
                           "normalize_activations": "layer_norm" if cfg.get("standardize_tokens") else "none",
                           "reshape_activations": "none"}
    if architecture == "topk":
        out |= {"k": cfg["top_k"], "rescale_acts_by_decoder_norm": False}
    out["metadata"] = {
        "sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
        "model_name": cfg.get("model_name"), "hook_name": hook_name(cfg), "hook_head_index": None,
        "context_size": cfg.get("seq_len"), "dataset_path": cfg.get("dataset_path"), "prepend_bos": True,
        EXPORT_MARKER: {"sae_type": cfg["sae_type"], "top_k": cfg.get("top_k"), "input_scale": float(sae.scale),
                        "run_name": cfg.get("run_name")},
    }
    return out


def export_saelens(sae: BaseSAE, folder: str | Path) -> Path:
    """Write the SAE's inference form as a SAELens 6 folder (cfg.json, sae_weights.safetensors), loadable with
    `sae_lens.SAE.load_from_disk(folder)`; it takes raw activations and gives our latents and reconstructions."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(saelens_tensors(sae), folder / SAELENS_WEIGHTS_FILE)
    (folder / SAELENS_CFG_FILE).write_text(json.dumps(saelens_config(sae), indent=2) + "\n")
    return folder


def _saelens_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """One flat dict from a SAELens cfg.json: version 6 keeps the model facts under `metadata`; earlier versions
    keep them at the top level, name the hook `hook_point` and give TopK's k in `activation_fn_kwargs`."""
    fields = {**raw, **(raw.get("metadata") or {})}
    fields.setdefault("hook_name", fields.get("hook_point"))
    k = (fields.get("activation_fn_kwargs") or {}).get("k")
    if fields.get("activation_fn_str", fields.get("activation_fn")) == "topk" and k is not None:
        fields |= {"architecture": "topk", "k": k}
    fields.setdefault("architecture", "standard")
    return fields


def _check_saelens_fields(fields: dict[str, Any], where: Path) -> None:
    if fields["architecture"] not in FROM_SAELENS:
        raise ConfigError(f"{where}: SAELens architecture {fields['architecture']!r} is not supported; "
                          f"supported: {', '.join(FROM_SAELENS)}")
    if fields.get("normalize_activations") not in (None, False, "none", "layer_norm"):
        raise ConfigError(f"{where}: normalize_activations={fields['normalize_activations']!r} is not supported "
                          "(its scale is not in the folder); only 'none' and 'layer_norm'")
    for key in ("d_in", "d_sae") + (("k",) if fields["architecture"] == "topk" else ()):
        if not isinstance(fields.get(key), int):
            raise ConfigError(f"{where}: {key}={fields.get(key)!r} is invalid: a whole number is needed")


@torch.no_grad()
def _fold_saelens_options(t: dict[str, Tensor], fields: dict[str, Any]) -> dict[str, Tensor]:
    """Fold SAELens options this project has no switch for into the weights, each exactly:
    apply_b_dec_to_input=False: b_enc += b_dec @ W_enc (we always subtract b_dec first);
    rescale_acts_by_decoder_norm (topk): decoder rows to unit norm, their norms into W_enc and b_enc;
    the `scaling_factor` of SAELens < 6 (f multiplied by it before decoding): into the decoder rows."""
    t = {name: v.float() for name, v in t.items()}
    for old in ("scaling_factor", "finetuning_scaling_factor"):
        if old in t:
            t["W_dec"] = t["W_dec"] * t.pop(old)[:, None]
    if not fields.get("apply_b_dec_to_input", True):
        t["b_enc"] = t["b_enc"] + t["b_dec"] @ t["W_enc"]
    if fields.get("rescale_acts_by_decoder_norm"):
        norms = t["W_dec"].norm(dim=-1).clamp_min(1e-8)
        t |= {"W_enc": t["W_enc"] * norms, "b_enc": t["b_enc"] * norms, "W_dec": t["W_dec"] / norms[:, None]}
    return t


def _check_saelens_tensors(t: dict[str, Tensor], d: int, m: int, architecture: str, where: Path) -> None:
    shapes = {"W_enc": (d, m), "W_dec": (m, d), "b_enc": (m,), "b_dec": (d,)}
    shapes |= {"threshold": (m,)} if architecture == "jumprelu" else {}
    for name, shape in shapes.items():
        if name not in t or tuple(t[name].shape) != shape:
            found = tuple(t[name].shape) if name in t else "missing"
            raise ConfigError(f"{where}: tensor {name} is {found}; expected shape {shape} (d_in {d}, d_sae {m})")
    extra = sorted(set(t) - set(shapes))
    if extra:
        raise ConfigError(f"{where}: unsupported tensors {', '.join(extra)}; expected {', '.join(shapes)}")


def _imported_cfg(fields: dict[str, Any], sae_type: str, folder: Path) -> dict[str, Any]:
    """This project's config for an imported SAE: defaults plus what the SAELens folder says."""
    marker = fields.get(EXPORT_MARKER) or {}
    cfg = get_default_cfg() | {"sae_type": sae_type, "act_size": fields["d_in"], "dict_size": fields["d_sae"],
                               "run_name": marker.get("run_name") or folder.resolve().name,
                               "standardize_tokens": fields.get("normalize_activations") == "layer_norm"}
    if sae_type == "topk":
        cfg["top_k"] = fields["k"]
    elif sae_type == "batchtopk" and marker.get("top_k"):
        cfg["top_k"] = marker["top_k"]
    hook = fields.get("hook_name")
    if hook:
        cfg["hook_point"] = hook
        match = re.fullmatch(r"blocks\.(\d+)\.hook_(\w+)", hook)
        if match and match.group(2) in SITES:
            cfg |= {"layer": int(match.group(1)), "site": match.group(2)}
    for ours, theirs in (("model_name", "model_name"), ("dataset_path", "dataset_path"), ("seq_len", "context_size")):
        if fields.get(theirs) is not None:
            cfg[ours] = fields[theirs]
    return cfg


def load_saelens(folder: str | Path, device: str = "cpu") -> BaseSAE:
    """An SAE folder in SAELens's layout (exported here, trained with SAELens, or downloaded from the Hub) as this
    project's SAE class, input scale 1, in eval mode (normalize_activations="layer_norm" -> standardize_tokens):
    standard -> VanillaSAE, topk -> TopKSAE, jumprelu -> JumpReLUSAE (log_threshold = log threshold; thresholds
    must be > 0), and jumprelu folders written by `export_saelens` from a BatchTopK SAE back to BatchTopKSAE."""
    folder = Path(folder)
    for name in (SAELENS_CFG_FILE, SAELENS_WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a SAELens SAE folder: it has no {name}")
    fields = _saelens_fields(json.loads((folder / SAELENS_CFG_FILE).read_text()))
    _check_saelens_fields(fields, folder)
    d, m, architecture = fields["d_in"], fields["d_sae"], fields["architecture"]
    t = _fold_saelens_options(load_file(folder / SAELENS_WEIGHTS_FILE), fields)
    _check_saelens_tensors(t, d, m, architecture, folder)

    sae_type = FROM_SAELENS[architecture]
    theta = t.pop("threshold", None)
    marker = fields.get(EXPORT_MARKER) or {}
    if theta is not None and marker.get("sae_type") == "batchtopk" and bool((theta == theta[0]).all()):
        sae_type = "batchtopk"
    elif theta is not None and not bool((theta > 0).all()):
        bad = int((theta <= 0).nonzero()[0])
        raise ConfigError(f"{folder}: jumprelu threshold of latent {bad} is {theta[bad].item():g}; "
                          "JumpReLUSAE learns log(threshold), so every threshold must be > 0")

    sae = build_sae(_imported_cfg(fields, sae_type, folder))
    state = sae.state_dict() | t | {"scale": torch.ones(())}
    if sae_type == "jumprelu":
        state["log_threshold"] = theta.log()
    elif sae_type == "batchtopk":
        state |= {"threshold": theta[0].clone(), "threshold_initialised": torch.tensor(True)}
    sae.load_state_dict(state)
    return sae.to(device).eval()


VARIANT_NAMES = {"vanilla": "Vanilla (ReLU + L1)", "topk": "TopK", "batchtopk": "BatchTopK", "jumprelu": "JumpReLU"}


def _final_sae(run: Run) -> BaseSAE:
    if not (run.path / FINAL_DIR / "config.json").exists():
        raise FileNotFoundError(f"{run.path} has no final SAE ({FINAL_DIR}/): the run has not finished")
    return run.sae()


def model_card(run_or_sae: str | Path | Run | BaseSAE, metrics: dict[str, Any] | None = None,
               repo_id: str | None = None) -> str:
    """README.md for the Hub: what the SAE is, its config, final metrics (default: a run's last evaluation in
    metrics.jsonl, exactly as written), and how to load it with SAELens and with this project."""
    if isinstance(run_or_sae, BaseSAE):
        sae, metrics = run_or_sae, metrics or {}
    else:
        run = _as_run(run_or_sae)
        sae = _final_sae(run)
        metrics = last_evaluation(run) if metrics is None else metrics
    cfg, repo, sae_id = sae.cfg, repo_id or "<user>/<repo>", hook_name(sae.cfg)
    keys = [k for k in HUB_CONFIG_KEYS if k in cfg and cfg["sae_type"] in VARIANT_KEYS.get(k, SAE_TYPES)]
    metric_rows = [f"| {k} | {_cell(v)} |" for k, v in metrics.items()] or ["| (none given) | |"]
    return "\n".join([
        "---", "library_name: saelens", "tags:", "- sparse-autoencoder", "- interpretability",
        f"- {cfg['sae_type']}", "---", "",
        f"# {VARIANT_NAMES[cfg['sae_type']]} SAE on `{cfg.get('model_name')}`, `{sae_id}`", "",
        f"A sparse autoencoder with {cfg['dict_size']} latents on the {cfg['act_size']}-dimensional activations at "
        f"`{sae_id}`, trained with the flat SAE training scripts (run `{cfg.get('run_name')}`).", "",
        "## Final metrics", "",
        "The last evaluation on held-out activations never trained on, in raw activation space:", "",
        "| metric | value |", "|---|---|", *metric_rows, "",
        "## Configuration", "", "| key | value |", "|---|---|", *(f"| {k} | {_cell(cfg[k])} |" for k in keys), "",
        "<details><summary>full config.json</summary>", "", "```json", json.dumps(cfg, indent=2, default=str),
        "```", "", "</details>", "",
        "## Files", "",
        f"`{sae_id}/cfg.json` and `{sae_id}/sae_weights.safetensors` in the SAELens 6 layout. The input scale "
        f"s = {float(sae.scale):.6g} used in training is folded into the weights: give the SAE raw activations. "
        "Latent values are those of the training code, so decoder rows have norm 1/s."
        + (" Each token is standardised first (its mean subtracted, divided by its std: SAELens's "
           "normalize_activations layer_norm) and its mean and std are put back after decoding."
           if cfg.get("standardize_tokens") else ""), "",
        "## Load", "", "With SAELens:", "", "```python", "from sae_lens import SAE", "",
        f'sae = SAE.from_pretrained("{repo}", "{sae_id}")', "```", "",
        "With the training scripts (`results.py`):", "", "```python",
        "from huggingface_hub import snapshot_download", "from results import load_saelens", "",
        f'sae = load_saelens(snapshot_download("{repo}") + "/{sae_id}")',
        "latents = sae.encode(x); x_hat = sae.decode(latents, x)  # x: raw activations, shape (tokens, d_in)",
        "```", "",
    ])


def build_hub_folder(run: str | Path | Run, folder: str | Path, repo_id: str | None = None) -> Path:
    """Everything `upload` publishes, written locally: README.md (model card) and <hook_point>/ holding the final
    SAE in SAELens's layout (the SAELens sae_id is the hook point)."""
    run, folder = _as_run(run), Path(folder)
    sae = _final_sae(run)
    export_saelens(sae, folder / hook_name(sae.cfg))
    (folder / "README.md").write_text(model_card(sae, last_evaluation(run), repo_id))
    return folder


def upload(run: str | Path | Run, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Publish a run's final SAE and model card to the Hugging Face Hub; returns the repo URL. The token defaults
    to huggingface_hub's (HF_TOKEN or `hf auth login`)."""
    from huggingface_hub import HfApi

    run = _as_run(run)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_hub_folder(run, tmp, repo_id)
        api = HfApi(token=token)
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=f"Upload SAE {run.cfg['run_name']}")
    return str(url)


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
