"""Analyse finished runs in a notebook or the terminal: tables, frontier and density plots,
and latent dashboards built from each run's held-out evaluation text.

    from results import (load_run, load_runs, plot_frontier, plot_density, top_activations,
                         latent_summary, clt_layer_table, plot_clt_writes)
    df = load_runs("runs")                     # one row per run: differing config + final metrics
    plot_frontier(df, x="l0", y="nmse")        # one series per variant
    run = load_run(df.run_dir[0])              # config, metrics history, final SAE
    plot_density(run); top_activations(run, latent=7); latent_summary(run, latent=7)
    clt_layer_table(clt_run); plot_clt_writes(clt_run)  # a CLT: per layer, where latents write

`python results.py RUNS_DIR` prints the summary table and writes a report folder
(`RUNS_DIR/report/`, or `--out`): summary.md, frontier and density PNGs, latent dashboards.
`--eval` first runs evals.py on each finished run (RUN/eval.json: decoder structure, sparse
probing, absorption); the report shows the tables of every run that has one.

SAELens export/import and the Hugging Face Hub are in interop.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from checkpoint import DENSITY_FILE, FINAL_DIR
from config import SYNTHETIC_DATASET, ConfigError
from dashboards import (  # noqa: F401  (the notebook's names: it imports them from results)
    EvalSet,
    LatentSummary,
    TopActivations,
    dashboard_latents,
    eval_set,
    get_model,
    group_ends_of,
    latent_activations,
    latent_group,
    latent_summary,
    promoted_tokens,
    top_activations,
    write_dashboards,
)
from evals import evaluate_run
from files import write_atomic

# re-exported for the imports (older) model cards print
from interop import build_hub_folder, export_saelens, load_saelens, model_card, upload  # noqa: F401
from logs import (  # noqa: F401
    Run,
    as_run,
    last_evaluation,
    load_density,
    load_history,
    load_run,
    markdown_cell,
    read_records,
)
from metrics import DENSE_FRACTION, HEADLINE_METRICS, PROBE_KS, SUMMARY_METRICS
from sae import SAE_CLASSES

FRONTIER_METRICS = ("nmse", "explained_variance", "ce_recovered", "downstream_recovered", "mcc",
                    "f1")
LABELS = {
    "l0": "L0 (active latents per token)",
    "nmse": "normalised MSE (lower is better)",
    "explained_variance": "explained variance (higher is better)",
    "ce_recovered": "CE loss recovered (higher is better)",
    "downstream_recovered": "downstream similarity recovered (higher is better)",
    "mcc": "MCC, decoder rows vs true features (higher is better)",
    "f1": "F1 of latents as detectors of their feature (higher is better)",
}
# wandb keeps every logged key's last value; these come from the training lines, not evaluations
TRAINING_LINE_KEYS = ("lr", "sparsity_coeff", "tokens_per_s")
EVAL_FILE = "eval.json"  # a finished run's evals.py results, beside its config.json



# --- runs and tables ------------------------------------------------------------------------


def find_runs(paths: str | Path | list[str | Path]) -> list[Path]:
    """Run folders at or directly under each given path."""
    found = []
    for p in [paths] if isinstance(paths, (str, Path)) else paths:
        p = Path(p)
        found += ([p] if (p / "config.json").exists()
                  else sorted(c.parent for c in p.glob("*/config.json")))
    return found


def _runs_frame(records: list[tuple[dict[str, Any], dict[str, Any], str]]) -> pd.DataFrame:
    """(config, final metrics, where) per run -> a row: differing config keys, metrics, run_dir."""
    if not records:
        return pd.DataFrame()
    configs = pd.DataFrame([cfg for cfg, _, _ in records]).astype(str)
    varying = [c for c in configs.columns
               if (configs[c].nunique() > 1 or c == "sae_type") and c != "run_name"]
    return pd.DataFrame([{**{k: cfg.get(k) for k in varying}, "run_name": cfg.get("run_name"),
                          **metrics, "run_dir": where} for cfg, metrics, where in records])


def _wandb_records(project: str) -> list[tuple[dict[str, Any], dict[str, Any], str]]:
    """Runs of a wandb project ("entity/project" or "project"): config, last evaluation, run URL."""
    try:
        import wandb

        runs = list(wandb.Api().runs(project))
    except Exception as err:
        raise RuntimeError(f"wandb_project={project!r}: could not read runs from wandb "
                           f"({type(err).__name__}: {err}); local run folders need no wandb: "
                           "load_runs('runs')") from err
    records = []
    for run in runs:
        summary = run.summary_metrics
        metrics = {k: v for k, v in summary.items() if isinstance(v, (int, float))
                   and not k.startswith(("_", "train/")) and k not in TRAINING_LINE_KEYS}
        cfg = dict(run.config)
        records.append((cfg | {"run_name": cfg.get("run_name", run.name)},
                        {"step": summary.get("_step"), **metrics}, run.url))
    return records


def load_runs(paths: str | Path | list[str | Path] | None = None,
              wandb_project: str | None = None) -> pd.DataFrame:
    """One row per run: the config keys that differ between runs, final metrics, run folder.
    With `wandb_project`, also the runs of that wandb project (run_dir is then the run's URL)."""
    records = ([(r.cfg, r.final_metrics, str(r.path)) for r in map(load_run, find_runs(paths))]
               if paths else [])
    if wandb_project:
        records += _wandb_records(wandb_project)
    return _runs_frame(records)


# --- plots ----------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    headless = sys.platform.startswith("linux") and not (os.environ.get("DISPLAY")
                                                         or os.environ.get("WAYLAND_DISPLAY"))
    if headless and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _variant_color(variant: str) -> str | None:
    """The same colour for a variant in every plot."""
    variants = list(SAE_CLASSES)
    return f"C{variants.index(variant)}" if variant in variants else None


def _finish(plt, fig):
    """Close pyplot's handle (no double display in notebooks); the Figure still shows and saves."""
    fig.tight_layout()
    plt.close(fig)
    return fig


KIND_STYLES = {"SAE": ("-", "o"), "transcoder": ("--", "s"),
               "skip transcoder": (":", "^")}  # line, marker


def _kind(row) -> str:
    """SAE, transcoder or skip transcoder, from a load_runs row."""
    if not isinstance(row.get("target_hook_point"), str) or not row.get("target_hook_point"):
        return "SAE"
    return "skip transcoder" if row.get("skip_connection") is True else "transcoder"


def plot_frontier(df: pd.DataFrame, x: str = "l0", y: str = "nmse"):
    """Sparsity against a quality metric: one series per variant (`sae_type`) and kind (SAE,
    transcoder, skip transcoder: solid with circles, dashed with squares, dotted with triangles),
    points joined in order of x."""
    for column in (x, y):
        if column not in df:
            raise KeyError(f"plot_frontier: no column {column!r}; columns are "
                           f"{', '.join(map(str, df.columns))}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    kinds = df.apply(_kind, axis=1) if len(df) else []
    groups = (df.groupby(["sae_type", kinds], sort=False) if "sae_type" in df
              else [(("runs", "SAE"), df)])
    for (variant, kind), points in groups:
        points = points.dropna(subset=[x, y]).sort_values(x)
        name = variant if kind == "SAE" else f"{variant} {kind}"
        line, marker = KIND_STYLES[kind]
        ax.plot(points[x], points[y], marker=marker, color=_variant_color(str(variant)),
                linestyle=line, label=f"{name} ({len(points)} run{'s' * (len(points) != 1)})")
    xs = df[x].dropna()
    if len(xs) and xs.min() > 0 and xs.max() / xs.min() >= 10:
        ax.set_xscale("log")
    ax.set_xlabel(LABELS.get(x, x))
    ax.set_ylabel(LABELS.get(y, y))
    short = {c: LABELS.get(c, c).split(" (")[0] for c in (x, y)}
    ax.set_title(f"Sparsity frontier on held-out data:\n{short[y]} vs {short[x]}")  # long labels
    ax.grid(alpha=0.3)
    ax.legend(title="variant")
    return _finish(plt, fig)


def plot_sample_efficiency(runs: list[str | Path | Run], metrics: tuple[str, ...] = ("mcc", "f1")):
    """Each metric of the held-out evaluations against the samples trained on (log axis), a panel
    per metric and a line per run: solid where the run's lr came from the recipe (config `auto`),
    dashed where it was set."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
    for run in map(as_run, runs):
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
        ax.xaxis.set_minor_locator(LogLocator(subs=(2, 4)))  # labels 250k, 500k, 1M, 2M, 4M...
        for formatter in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
            formatter(EngFormatter(sep=""))
        ax.set_xlabel("training samples")
        ax.set_title(LABELS.get(metric, metric), fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Ground truth against samples, on held-out data")
    return _finish(plt, fig)


def plot_density(run: str | Path | Run):
    """Histogram of log10 firing density; latents that never fired (density 0) get their own bar on
    the left, dense latents (> DENSE_FRACTION of tokens) are coloured (or, for a variant with groups
    of latents, each group) and the dense line drawn."""
    run = as_run(run)
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
    ends = group_ends_of(run)
    if ends:  # one colour per group of latents, in order
        group = np.searchsorted(np.array(ends), np.nonzero(density > 0)[0], side="right")
        spans = list(zip([0, *ends[:-1]], ends, strict=True))
        ax.hist([log_alive[group == g] for g in range(len(ends))], bins=bins, stacked=True,
                color=[plt.cm.viridis(g / max(len(ends) - 1, 1)) for g in range(len(ends))],
                label=[f"group {g + 1}, latents {a}-{b - 1}: {int((group == g).sum())} alive, "
                       f"{int((density[a:b] > DENSE_FRACTION).sum())} dense"
                       for g, (a, b) in enumerate(spans)])
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
    ax.set_title(f"Firing density: {run.cfg['sae_type']}, {len(density)} latents{dead_note}\n"
                 f"{run.cfg['run_name']}", fontsize=10)
    ax.legend(fontsize=8)
    return _finish(plt, fig)


def clt_layer_table(run: str | Path | Run) -> pd.DataFrame:
    """A cross-layer transcoder's last evaluation, one row per target layer."""
    run = as_run(run)
    ev = last_evaluation(run)
    layers = [int(k.removeprefix("l0_L")) for k in ev if k.startswith("l0_L")]
    if not run.cfg.get("cross_layer") or not layers:
        raise ValueError(f"{run.path} is not a cross-layer transcoder run with an evaluation")
    names = ("explained_variance", "nmse", "l0", "dead")
    return pd.DataFrame([{"layer": i, **{n: ev.get(f"{n}_L{i}") for n in names}}
                         for i in sorted(layers)]).set_index("layer")


def clt_write_mass(sae) -> np.ndarray:
    """(L, L): row n, column t, the mean over layer n's latents of ||D[n -> t]||^2, the share of
    its unit decoder norm it puts on target t (each row sums to 1; below the diagonal 0)."""
    n_layers = len(sae.layers)
    mass = np.zeros((n_layers, n_layers))
    for n, layer in enumerate(sae.layers):
        mass[n, n] = layer.W_dec.detach().pow(2).sum(-1).mean().item()
        if n < len(sae.W_dec_later):  # none with cross_layer_writes=false
            mass[n, n + 1:] = sae.W_dec_later[n].detach().pow(2).sum(-1).mean(0).double().numpy()
    return mass


def plot_clt_writes(run: str | Path | Run):
    """Where each layer's latents write: the share of their decoder norm by target layer."""
    run = as_run(run)
    sae = run.sae()
    mass, ids = clt_write_mass(sae), sae.layer_ids
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(ids) + 2.5, 1.0 * len(ids) + 1.8))
    image = ax.imshow(np.where(np.triu(np.ones_like(mass)) > 0, mass, np.nan), cmap="viridis",
                      vmin=0, vmax=1)
    for n in range(len(ids)):
        for t in range(n, len(ids)):
            ax.text(t, n, f"{mass[n, t]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if mass[n, t] < 0.5 else "black")
    ax.set_xticks(range(len(ids)), [str(i) for i in ids])
    ax.set_yticks(range(len(ids)), [str(i) for i in ids])
    ax.set_xlabel(f"target layer ({run.cfg['target_site']})")
    ax.set_ylabel(f"source layer ({run.cfg['site']})")
    fig.colorbar(image, ax=ax, label="mean share of a latent's decoder norm²")
    ax.set_title(f"Where each layer's latents write: {run.cfg['sae_type']} CLT\n"
                 f"{run.cfg['run_name']}", fontsize=10)
    return _finish(plt, fig)


# --- the evaluation text, rebuilt as training built it --------------------------------------




# --- latent dashboards ----------------------------------------------------------------------


# --- report ---------------------------------------------------------------------------------


def summary_table(runs: list[Run], config_columns: list[str]) -> str:
    """Markdown table of each run's last evaluation in metrics.jsonl."""
    evals = [last_evaluation(r) for r in runs]
    metrics = [m for m in ("step", "tokens", *SUMMARY_METRICS) if any(m in e for e in evals)]
    header = ["run_name", *config_columns, *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run, ev in zip(runs, evals, strict=True):
        cells = [run.cfg["run_name"], *(run.cfg.get(c) for c in config_columns),
                 *(ev.get(m) for m in metrics)]
        lines.append("| " + " | ".join(markdown_cell(v) for v in cells) + " |")
    return "\n".join(lines)


def frame_markdown(df: pd.DataFrame) -> str:
    """A markdown table of a small frame, its index as the first column, floats to 4 figures."""
    def cell(v: Any) -> str:
        rounded = isinstance(v, float) and not float(v).is_integer()
        return f"{v:.4g}" if rounded else markdown_cell(v)
    header = [df.index.name or "", *df.columns]
    rows = [[i, *row] for i, row in zip(df.index, df.itertuples(index=False), strict=True)]
    return "\n".join(["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows])


def run_evals(paths: str | Path | list[str | Path], device: str = "auto",
              dataset: str | None = None, label_columns: list[str] | None = None,
              text_column: str = "text") -> list[Path]:
    """evals.evaluate_run on each finished run, written to RUN/eval.json; the files written."""
    written = []
    for path in find_runs(paths):
        if not (path / FINAL_DIR / DENSITY_FILE).exists():
            print(f"{path}: not finished (no {FINAL_DIR}/{DENSITY_FILE}), not evaluated",
                  file=sys.stderr)
            continue
        found = evaluate_run(path, device, dataset, label_columns, text_column)
        write_atomic(path / EVAL_FILE, json.dumps(found, indent=2))
        print(f"{path / EVAL_FILE}: {found['seconds']:.0f} s")
        written.append(path / EVAL_FILE)
    return written


def eval_tables(evaluated: list[tuple[Run, dict[str, Any]]]) -> list[str]:
    """The report's decoder-structure table and, per run and label set, its probing table."""
    names = ("decoder_max_cos", "decoder_mean_cos", "near_duplicates")
    doc = ["", "## Decoder structure", "",
           "Over all latents' decoder rows: |cosine| of pairs, near duplicates at cosine > 0.9 "
           "(density: the summary table's `dense` and `never_fired_eval_frac`).", "",
           "| run_name | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    doc += ["| " + " | ".join([run.cfg["run_name"], *(markdown_cell(ev["structure"].get(n))
                                                     for n in names)]) + " |"
            for run, ev in evaluated if ev["structure"]]
    doc += ["", "## Sparse probing", "",
            "Held-out accuracy, the mean over one-vs-rest tasks (each balanced: chance 0.5) of a "
            "logistic probe on token-mean-pooled features: the k SAE latents of largest class mean "
            "difference, k random unit directions of the raw activations, or all of them (dense)."]
    for run, ev in evaluated:
        for label, probe in ev["probing"].items():
            if label == "skipped":
                doc += ["", f"{run.cfg['run_name']}: skipped ({probe})"]
                continue
            ks = [str(k) for k in PROBE_KS]
            doc += ["", f"### {run.cfg['run_name']}: {label} ({len(probe['classes'])} classes, "
                        f"{probe['train_examples']} train / {probe['test_examples']} test "
                        "examples over all tasks)", "",
                    "| features | " + " | ".join(f"k={k}" for k in ks) + " |",
                    "|" + "---|" * (len(ks) + 1),
                    "| SAE latents | " + " | ".join(f"{probe['sae'][k]:.3f}" for k in ks) + " |",
                    "| random directions | " + " | ".join(f"{probe['random'][k]:.3f}" for k in ks)
                    + " |",
                    f"| dense (all {run.cfg['act_size']}) | {probe['dense']:.3f} |"
                    + " |" * (len(ks) - 1)]
        doc += ["", f"{run.cfg['run_name']}: absorption skipped ({ev['absorption']['skipped']})"]
    return doc


def write_report(paths: str | Path | list[str | Path], out: str | Path, n_latents: int = 3,
                 device: str = "auto") -> Path:
    """summary.md (table, plots, links), frontier_<metric>.png, density/<run>.png,
    dashboards/<run>.md|html."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [load_run(p) for p in find_runs(paths)]
    df = load_runs(paths)
    config_columns = [c for c in df.columns
                      if c in runs[0].cfg and c not in ("run_name", "run_dir")]
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

    evaluated = [(run, json.loads((run.path / EVAL_FILE).read_text())) for run in finished
                 if (run.path / EVAL_FILE).exists()]
    doc += eval_tables(evaluated) if evaluated else []

    clts = [run for run in finished if run.cfg.get("cross_layer")]
    doc += ["", "## Cross-layer transcoders"] if clts else []
    for run in clts:
        name = run.cfg["run_name"]
        doc += ["", f"### {name}", "", frame_markdown(clt_layer_table(run))]
        if run.cfg.get("cross_layer_writes", True):  # per-layer transcoders write to their own
            plot_clt_writes(run).savefig(out / "density" / f"{name}_writes.png", dpi=120)
            doc += ["", f"![where {name} writes](density/{name}_writes.png)"]

    with_text = [run for run in finished
                 if run.cfg.get("dataset_path") != SYNTHETIC_DATASET]  # synthetic: no text
    if n_latents > 0 and with_text:
        doc += ["", "## Latent dashboards", ""]
        for run in with_text:
            md = write_dashboards(run, out / "dashboards", n_latents, device=device).markdown
            doc.append(f"- [{run.cfg['run_name']}](dashboards/{md.stem}/index.html) "
                       f"(plain text: dashboards/{md.name})")
    (out / "summary.md").write_text("\n".join(doc) + "\n")
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description="Print a summary of finished runs and write a report folder.")
    parser.add_argument("runs", nargs="+", help="run folders, or folders holding them")
    parser.add_argument("--out", help="report folder (default: RUNS_DIR/report)")
    parser.add_argument("--latents", type=int, default=3,
                        help="dashboards for this many most frequent and this many random alive "
                             "latents per run")
    parser.add_argument("--device", default="auto",
                        help="where the model and SAEs run for the dashboards and evals")
    parser.add_argument("--eval", action="store_true",
                        help="first run evals.py on each finished run (writes RUN/eval.json)")
    parser.add_argument("--probe-dataset",
                        help="probe on this Hugging Face dataset (default: Shakespeare's speeches)")
    parser.add_argument("--probe-labels", help="its label columns, comma-separated")
    parser.add_argument("--probe-text", default="text", help="its text column")
    args = parser.parse_args(argv)
    if args.probe_dataset and not args.probe_labels:
        parser.error(f"--probe-dataset {args.probe_dataset} needs --probe-labels COLUMN[,COLUMN]")
    df = load_runs(args.runs)
    if df.empty:
        print(f"no run folders (with config.json) under {', '.join(args.runs)}", file=sys.stderr)
        return 1
    columns = [c for c in ("run_name", "sae_type", *HEADLINE_METRICS) if c in df]
    print(df[columns].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if args.eval:
        labels = args.probe_labels.split(",") if args.probe_labels else None
        try:
            run_evals(args.runs, args.device, args.probe_dataset, labels, args.probe_text)
        except (ConfigError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    out = write_report(args.runs, args.out or Path(args.runs[0]) / "report", args.latents,
                       args.device)
    print(f"report: {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
