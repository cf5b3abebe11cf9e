"""The SAEBench-style evaluations: density and decoder structure against hand cases, probes that
must be perfect or at chance, the Shakespeare labels, and `results.py --eval` on finished runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import small_cfg
from test_results import shared_minilm  # noqa: F401  (results and evals share one MiniLM)

import evals
import results
from config import ConfigError
from metrics import (
    decoder_structure,
    density_stats,
    probe_accuracy,
    sparse_probing,
    top_mean_difference,
)
from text import shakespeare_speeches
from training import train_sae


def test_density_fractions_match_a_hand_count():
    density = torch.tensor([0.0, 0.0, 0.05, 0.1, 0.11, 0.5, 1e-4, 0.0])
    stats = density_stats(density)
    assert stats.never_fired_frac == 3 / 8  # latents 0, 1, 7
    assert stats.dense == 2  # 0.11 and 0.5; 0.1 itself is not above the line


def test_decoder_cosines_match_a_hand_computation():
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-3.0, 0.0]])
    # |cos| of the pairs: (0,1) 0, (0,2) 1/√2, (0,3) 1, (1,2) 1/√2, (1,3) 0, (2,3) 1/√2
    structure = decoder_structure(w, chunk=3)  # a chunk boundary inside the rows
    assert structure.max_abs_cosine == pytest.approx(1.0)
    assert structure.mean_abs_cosine == pytest.approx((1 + 3 / math.sqrt(2)) / 6)
    assert structure.near_duplicates == 0  # rows 0 and 3 are opposite, not duplicates


def test_duplicated_decoder_rows_are_counted():
    torch.manual_seed(0)
    w = torch.randn(300, 64)
    w[10] = w[200] * 3  # same direction, another norm
    w[20] = w[30] + 0.05 * torch.randn(64)  # nearly the same
    structure = decoder_structure(w, chunk=128)
    assert structure.near_duplicates == 4
    assert structure.max_abs_cosine == pytest.approx(1.0, abs=1e-5)
    assert structure.mean_abs_cosine < 0.15  # random directions in 64 dims: about 0.1


def planted(n: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise latents (n, m) with latent 7 firing exactly on the label's positives."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    f = torch.rand(n, m, generator=g).relu() * (torch.rand(n, m, generator=g) < 0.1)
    f[:, 7] = y * (1 + torch.rand(n, generator=g))
    return f, y


def test_a_planted_latent_is_a_perfect_probe_held_out():
    f_train, y_train = planted(200, 50, 0)
    f_test, y_test = planted(100, 50, 1)
    assert top_mean_difference(f_train, y_train, 1).tolist() == [7]
    acts = (torch.randn(200, 16), torch.randn(100, 16))
    scores = sparse_probing((f_train, f_test), acts, (y_train, y_test), ks=(1, 2))
    assert scores.sae == {1: 1.0, 2: 1.0}
    assert scores.dense < 0.75  # the raw activations here are noise


def test_probes_are_at_chance_on_random_labels():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(1200, 32, generator=g)
    y = torch.randint(0, 2, (1200,), generator=g)
    latents = acts.relu()
    scores = sparse_probing((latents[:800], latents[800:]), (acts[:800], acts[800:]),
                            (y[:800], y[800:]), ks=(1, 5, 20))
    for accuracy in [*scores.random.values(), *scores.sae.values(), scores.dense]:
        assert abs(accuracy - 0.5) < 0.1


def test_probe_accuracy_on_a_separable_dense_case():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g)
    y = (x[:, 3] - x[:, 5] > 0).long()
    assert probe_accuracy(x[:300], y[:300], x[300:], y[300:]) > 0.95


def test_shakespeare_speeches_are_labelled_and_scenes_split_whole():
    speeches = [s for s in shakespeare_speeches() if len(s.text) >= evals.PROBE_MIN_CHARS]
    hamlet = [s for s in speeches if s.labels["speaker"] == "HAMLET (hamlet)"]
    assert hamlet and all(s.labels["genre"] == "tragedies" for s in hamlet)
    assert any("To be, or not to be" in s.text for s in hamlet)
    assert not any("**" in s.text or "Enter" in s.text.split("\n")[0][:6] for s in speeches[:500])
    is_test = evals.held_out_groups(speeches, 0.2, seed=0)
    test_groups = {s.group for s, t in zip(speeches, is_test, strict=True) if t}
    train_groups = {s.group for s, t in zip(speeches, is_test, strict=True) if not t}
    assert test_groups and not test_groups & train_groups
    plays = {s.labels["play"] for s in speeches}
    assert {g.split("/")[0] for g in test_groups} == plays  # every play has held-out scenes
    tasks = evals.one_vs_rest_tasks([s.labels["genre"] for s in speeches], is_test, seed=0)
    assert len(tasks) == 6
    for task in tasks:
        assert sum(task.y_train) * 2 == len(task.train)  # balanced
        assert all(is_test[i] for i in task.test) and not any(is_test[i] for i in task.train)


@pytest.fixture(scope="module")
def run_dir(minilm, tmp_path_factory):
    """A finished run, as test_results.py's but one and shorter."""
    cfg = small_cfg(output_dir=str(tmp_path_factory.mktemp("runs")), num_tokens=256 * 12,
                    eval_freq=12, checkpoint_freq=0)
    return train_sae(cfg, model=minilm).run_dir


def test_eval_cli_writes_eval_json_and_the_report_tables(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(evals, "PROBE_TRAIN_PER_CLASS", 20)
    monkeypatch.setattr(evals, "PROBE_TEST_PER_CLASS", 8)
    monkeypatch.setattr(evals, "PROBE_CLASSES", 2)
    monkeypatch.setattr(evals, "SHAKESPEARE_LABELS", ("genre", "speaker"))
    out = tmp_path / "report"
    assert results.main([str(run_dir), "--out", str(out), "--latents", "0", "--eval"]) == 0
    report = (out / "summary.md").read_text()
    found = json.loads((run_dir / "eval.json").read_text())
    run = results.load_run(run_dir)
    for name in ("near_duplicates", "decoder_max_cos", "decoder_mean_cos"):  # the final eval's too
        assert found["structure"][name] == pytest.approx(run.final_metrics[name])
    assert found["absorption"]["skipped"].startswith(run.cfg["model_name"])
    assert list(found["probing"]) == ["genre", "speaker"]
    for probe in found["probing"].values():
        assert len(probe["classes"]) == 2 and probe["test_examples"] > 0
        assert all(0 <= v <= 1 for v in [*probe["sae"].values(), probe["dense"]])
        assert f"| SAE latents | {probe['sae']['1']:.3f} |" in report
    assert "## Sparse probing" in report and "## Decoder structure" in report


def test_a_datasets_label_columns_label_its_rows(tmp_path):
    rows = [{"text": f"row {i} of the file", "topic": ["a", "b", "c"][i % 3], "n": i}
            for i in range(30)]
    data = tmp_path / "labelled.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    examples, names = evals.probe_examples(str(data), ["topic", "n"], "text")
    assert names == ["topic", "n"] and len(examples) == 30
    assert [(e.text, e.labels["topic"], e.labels["n"]) for e in examples] == [
        (r["text"], r["topic"], str(r["n"])) for r in rows]
    assert len({e.group for e in examples}) == 30  # each row its own group
    with pytest.raises(ConfigError, match="has no column 'label'; its columns are text, topic, n"):
        evals.probe_examples(str(data), ["label"], "text")


def test_bad_probe_flags_give_one_line_and_exit_2(run_dir, tmp_path, capsys):
    out = ["--out", str(tmp_path / "report"), "--latents", "0", "--eval"]
    with pytest.raises(SystemExit) as exit_:
        results.main([str(run_dir), *out, "--probe-dataset", "some/dataset"])
    assert exit_.value.code == 2
    assert "--probe-dataset some/dataset needs --probe-labels" in capsys.readouterr().err
    data = tmp_path / "labelled.jsonl"
    data.write_text(json.dumps({"text": "a line", "topic": "a"}) + "\n")
    assert results.main([str(run_dir), *out, "--probe-dataset", str(data),
                         "--probe-labels", "label"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: dataset") and "has no column 'label'" in err[-1]
    assert not (run_dir / "eval.json").exists() or "genre" in (run_dir / "eval.json").read_text()
