"""results.py on small trained runs: tables, the report, plots, latent dashboards, the notebook."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import small_cfg

import dashboards
import results
from capture import load_model, run_to_hook
from config import get_default_cfg
from training import train_sae, train_sae_group

VARIANTS = ("topk", "batchtopk")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def shared_minilm(minilm, monkeypatch):
    """results boots models itself; hand it the session's MiniLM instead of a second copy."""
    monkeypatch.setitem(dashboards._MODELS, (get_default_cfg()["model_name"], "cpu", "float32"),
                        minilm)


@pytest.fixture(scope="module")
def runs_dir(minilm, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    cfgs = [small_cfg(sae_type=t, output_dir=str(out), num_tokens=256 * 30, eval_freq=15,
                      checkpoint_freq=0) for t in VARIANTS]
    train_sae_group(cfgs, model=minilm)
    return out


def last_eval(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "nmse" in r][-1]


def first_run(runs_dir: Path) -> results.Run:
    return results.load_run(results.find_runs(runs_dir)[0])


def test_load_runs_one_row_per_run_with_final_metrics(runs_dir):
    df = results.load_runs(runs_dir)
    assert sorted(df.sae_type) == sorted(VARIANTS) and df.run_name.is_unique
    assert "dict_size" not in df  # the same in both runs
    for _, row in df.iterrows():
        expected = last_eval(Path(row.run_dir))
        for key in ("step", "l0", "nmse", "explained_variance", "dead", "downstream_recovered"):
            assert row[key] == expected[key], key


def test_load_runs_from_wandb_has_the_local_columns(runs_dir, monkeypatch):
    local = results.load_runs(runs_dir)

    def fake_run(run_dir: Path):
        run = results.load_run(run_dir)
        evaluation = {k: v for k, v in last_eval(run_dir).items() if k != "step"}  # wandb: _step
        summary = {**evaluation, "_step": run.final_metrics["step"], "_runtime": 3.0,
                   "train/loss": 1.0, "lr": 1e-3, "log10_density": {"_type": "histogram"}}
        return types.SimpleNamespace(config=run.cfg, summary_metrics=summary,
                                     name=run.cfg["run_name"],
                                     url=f"https://wandb.ai/me/sae/runs/{run.cfg['run_name']}")

    runs = [fake_run(p) for p in results.find_runs(runs_dir)]
    api = types.SimpleNamespace(runs=lambda project: runs if project == "me/sae" else [])
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Api=lambda: api))
    remote = results.load_runs(wandb_project="me/sae")
    assert sorted(remote.columns) == sorted(local.columns)
    assert remote.run_dir.str.startswith("https://wandb.ai/me/sae/runs/").all()
    pd.testing.assert_frame_equal(remote[local.columns].drop(columns="run_dir"),
                                  local.drop(columns="run_dir"), check_dtype=False)

    def failing_api():
        raise RuntimeError("No API key configured")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Api=failing_api))
    with pytest.raises(RuntimeError,
                       match="wandb_project='me/sae': could not read runs from wandb"):
        results.load_runs(wandb_project="me/sae")


def test_report_numbers_equal_metrics_jsonl(runs_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert results.main([str(runs_dir), "--out", str(out), "--latents", "1", "--device",
                         "cpu"]) == 0
    assert "report:" in capsys.readouterr().out
    table = [line.strip("|").split("|") for line in (out / "summary.md").read_text().splitlines()
             if line.startswith("|")]
    header, rows = [c.strip() for c in table[0]], table[2:]
    assert {"l0", "nmse", "explained_variance", "dead", "dense",
            "downstream_recovered"} <= set(header)
    assert len(rows) == len(VARIANTS)
    for cells in rows:
        row = dict(zip(header, (c.strip() for c in cells), strict=True))
        expected = last_eval(runs_dir / row["run_name"])
        for key, value in row.items():
            if key in expected:
                assert float(value) == expected[key], key  # exact: the report rounds nothing
    assert {p.name for p in out.glob("frontier_*.png")} == {"frontier_nmse.png",
                                                           "frontier_explained_variance.png",
                                                           "frontier_downstream_recovered.png"}
    for run_dir in results.find_runs(runs_dir):
        assert (out / "density" / f"{run_dir.name}.png").stat().st_size > 10_000
        dashboard = (out / "dashboards" / f"{run_dir.name}.md").read_text()
        assert dashboard.count("## latent") == 2 and "[[" in dashboard \
            and "(random alive)" in dashboard
        page = next((out / "dashboards" / run_dir.name).glob("latent_*.html")).read_text()
        assert "without an unembedding" in page and "<svg" in page


def test_frontier_has_one_joined_series_per_variant(runs_dir):
    df = results.load_runs(runs_dir)
    ax = results.plot_frontier(df, x="l0", y="explained_variance").axes[0]
    assert len(ax.lines) == len(VARIANTS)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sorted(label.split()[0] for label in labels) == sorted(VARIANTS)
    for line in ax.lines:
        variant = line.get_label().split()[0]
        row = df[df.sae_type == variant].iloc[0]
        assert list(line.get_xdata()) == [row.l0] \
            and list(line.get_ydata()) == [row.explained_variance]
    assert "L0" in ax.get_xlabel() and "explained variance" in ax.get_ylabel() and ax.get_title()
    with pytest.raises(KeyError, match="no column 'ce_recovered'"):
        results.plot_frontier(df, y="ce_recovered")


def test_sample_efficiency_draws_every_evaluation_of_every_run(runs_dir):
    paths = results.find_runs(runs_dir)
    fig = results.plot_sample_efficiency(paths, metrics=("explained_variance", "nmse"))
    left, right = fig.axes
    assert len(left.lines) == len(right.lines) == len(paths) and left.get_xscale() == "log"
    for line, path in zip(left.lines, paths, strict=True):
        evals = [r for r in results.read_records(path) if "nmse" in r and r["tokens"] > 0]
        assert list(line.get_xdata()) == [r["tokens"] for r in evals]
        assert list(line.get_ydata()) == [r["explained_variance"] for r in evals]
        assert line.get_linestyle() == "--" and "lr 1.0e-02" in line.get_label()  # lr set by hand


def test_density_plot_counts_every_latent_once(runs_dir):
    run = first_run(runs_dir)
    density = results.load_density(run)
    ax = results.plot_density(run).axes[0]
    bars = [patch.get_height() for container in ax.containers for patch in container]
    assert sum(bars) == len(density) == run.cfg["dict_size"]
    legend = " ".join(t.get_text() for t in ax.get_legend().get_texts())
    assert f"never fired on eval: {int((density == 0).sum())}" in legend
    assert f"(right of dashed line): {int((density > 0.1).sum())}" in legend
    assert "log10" in ax.get_xlabel() and ax.get_ylabel() == "latents"


def test_rebuilt_eval_set_reproduces_the_saved_densities(runs_dir):
    run = first_run(runs_dir)
    fired = results.latent_activations(run, list(range(run.cfg["dict_size"])), device="cpu") != 0
    assert fired.shape[0] == results.eval_set(run, "cpu").where.shape[0]
    assert torch.allclose(fired.double().mean(0), results.load_density(run).double(), atol=1e-7)


def test_top_activations_are_real_text_sorted_and_exact(runs_dir, minilm):
    run = first_run(runs_dir)
    latent = int(results.load_density(run).argmax())
    top = results.top_activations(run, latent, n=5, device="cpu")
    rows = results.eval_set(run, "cpu").tokens
    sae, tokenizer = run.sae(), minilm.tokenizer
    values = [c.activation for c in top.contexts]
    assert len(values) == 5 and values == sorted(values, reverse=True)
    assert values[0] == results.latent_activations(run, [latent], device="cpu").max().item()
    for c in top.contexts:
        token_id = int(rows[c.row, c.position])
        assert c.token == tokenizer.convert_ids_to_tokens(token_id).removeprefix("##") != ""
        assert c.before + c.token + c.after in tokenizer.decode(rows[c.row, 1:])
        act = run_to_hook(minilm, rows[c.row:c.row + 1],
                          run.cfg["hook_point"])[0, c.position].float()
        assert sae.encode(act[None])[0, latent].item() == pytest.approx(c.activation,
                                                                        rel=1e-4, abs=1e-5)
        assert f"[[{c.token}]]" in str(top) \
            and f"<mark><b>{c.token}</b></mark>" in top._repr_html_()


def test_latent_summary_on_the_encoder_has_no_promoted_tokens(runs_dir):
    run = first_run(runs_dir)
    latent = int(results.load_density(run).argmax())
    summary = results.latent_summary(run, latent, device="cpu")
    values = results.latent_activations(run, [latent], device="cpu")[:, 0]
    assert summary.density == pytest.approx(results.load_density(run)[latent].item())
    assert summary.mean_activation == pytest.approx(values[values != 0].mean().item())
    assert summary.promoted_tokens is None and "none" in str(summary)


def test_promoted_tokens_follow_the_unembedding(tiny_gpt2_dir, tmp_path, monkeypatch):
    from transformers import GPT2LMHeadModel

    model = load_model(str(tiny_gpt2_dir), "cpu")
    monkeypatch.setitem(dashboards._MODELS, (str(tiny_gpt2_dir), "cpu", "float32"), model)
    cfg = small_cfg(model_name=str(tiny_gpt2_dir), layer=1, sae_type="topk", dict_size=64, top_k=4,
                    output_dir=str(tmp_path), num_tokens=256 * 5, eval_freq=5, checkpoint_freq=0)
    run = results.load_run(train_sae(cfg, model=model).run_dir)
    sae, latent = run.sae(), 3
    summary = results.latent_summary(run, latent, device="cpu")
    lm_head = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).lm_head.weight.detach()  # (vocab, d)
    expected = (lm_head @ (sae.W_dec[latent] / sae.scale)).topk(10)
    assert [tok for tok, _ in summary.promoted_tokens] == [model.tokenizer.decode([i])
                                                           for i in expected.indices]
    assert [v for _, v in summary.promoted_tokens] == pytest.approx(expected.values.tolist(),
                                                                    rel=1e-4)


def test_notebook_runs_top_to_bottom(runs_dir, monkeypatch):
    import nbclient
    import nbformat

    monkeypatch.setenv("SAE_RUNS_DIR", str(runs_dir))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    nb = nbformat.read(REPO / "analysis.ipynb", as_version=4)
    resources = {"metadata": {"path": str(REPO)}}  # the kernel imports results.py from the repo
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources=resources)
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2 + len(VARIANTS)  # two frontiers and a density plot per run
    assert any("<mark>" in o.get("data", {}).get("text/html", "") for o in outputs)


def test_a_variant_with_groups_shows_them_in_the_density_plot_and_dashboards(tmp_path):
    from activation_store import TensorStore
    from results import latent_group, load_run, plot_density
    from training import train_sae

    acts = torch.randn(4096, 16, generator=torch.Generator().manual_seed(2))
    cfg = small_cfg(sae_type="matryoshka", dict_size=64, top_k=4, top_k_aux=8,
                    matryoshka_groups="8,24,32", num_tokens=256 * 4, eval_tokens=512,
                    output_dir=str(tmp_path), run_name="nested")
    train_sae(cfg, store=TensorStore(acts, cfg))
    run = load_run(tmp_path / "nested")
    assert latent_group(run, 7) == "group 1 of 3 (latents 0-7)" \
        and latent_group(run, 63).startswith("group 3 of 3")
    labels = [t.get_text() for t in plot_density(run).axes[0].get_legend().get_texts()]
    assert [label.split(",")[0] for label in labels[:3]] == ["group 1", "group 2", "group 3"]
