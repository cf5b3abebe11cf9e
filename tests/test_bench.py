"""bench.py runs as a user runs it (tiny shapes here; speed itself is never asserted)."""

from __future__ import annotations

import sys

import pytest
import torch

import bench
import bench_sae
from sae import SAE_CLASSES


def test_settings_parse_types_and_reject_unknown_keys():
    s = bench.parse(["d=16", "generation=false", "model_batch_size=8"])
    assert s["d"] == 16 and s["generation"] is False and s["model_batch_size"] == 8
    with pytest.raises(SystemExit, match="unknown bench setting 'dd'"):
        bench.parse(["dd=3"])
    with pytest.raises(SystemExit, match="dtype='float16': use float32 or bfloat16"):
        bench.parse(["dtype=float16"])
    assert bench.parse(["variants=jumprelu,topk", "kernels=sparse"])["variants"] == "jumprelu,topk"
    with pytest.raises(SystemExit, match="variants='topk,relu': relu unknown"):
        bench.parse(["variants=topk,relu"])


def test_roofline_is_measured_in_each_dtype():
    for dtype in ("float32", "bfloat16"):
        assert bench_sae.matmul_roofline(8, 16, 8, torch.device("cpu"), dtype) > 0


@pytest.mark.parametrize("kernels", ["sparse", "dense"])
@pytest.mark.parametrize("variant", list(SAE_CLASSES))
def test_sae_step_rate_runs_every_variant_and_kernel_path(variant, kernels):
    s = bench.parse(["d=16", "m=64", "k=4", "batch=64", "steps=1"])
    for dtype in ("float32", "bfloat16"):
        assert bench_sae.sae_step_rate(variant, s, torch.device("cpu"), dtype, kernels) > 0


def test_model_flops_per_token_counts_weights_and_attention():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32)
    per_layer = 4 * 16 * 16 + 2 * 16 * 64  # q, k, v, o and the two MLP matrices
    assert bench.model_flops_per_token(BertModel(cfg), seq_len=8) \
        == 2 * 2 * per_layer + 4 * 8 * 16 * 2


def test_main_writes_the_step_rows_and_peak_memory(tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.chdir(tmp_path)
    bench.main(["d=16", "m=64", "k=4", "batch=64", "steps=1", "generation=false",
                "end_to_end=false", "variants=topk", "kernels=sparse"])
    results = json.loads((tmp_path / "bench_results.json").read_text())
    assert set(results["sae_step"]) == {"topk/sparse/float32", "topk/sparse/bfloat16"}
    peak = results["peak_memory_gib"]
    assert 0 < peak["after_sae_steps"] <= peak["at_end"]
    assert "peak resident memory after sae steps" in capsys.readouterr().out


def test_step_rows_on_activations_from_a_file(tmp_path, monkeypatch):
    import json

    import numpy as np

    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "acts.npy",
            np.random.default_rng(0).standard_normal((100, 24), dtype=np.float32) + 1)
    batch = bench_sae.activation_batch(str(tmp_path / "acts.npy"), 64)
    assert batch.shape == (64, 24) and batch.dtype == torch.float32
    torch.save(torch.from_numpy(np.load(tmp_path / "acts.npy")), tmp_path / "acts.pt")
    assert torch.equal(bench_sae.activation_batch(str(tmp_path / "acts.pt"), 64),
                       batch)  # same rows either way
    bench.main(["m=64", "k=4", "batch=64", "steps=1", "generation=false", "end_to_end=false",
                "variants=jumprelu", "kernels=sparse", "acts=acts.npy"])
    results = json.loads((tmp_path / "bench_results.json").read_text())
    assert results["settings"]["d"] == 24 \
        and results["sae_step"]["jumprelu/sparse/float32"]["tokens_per_s"] > 0
    with pytest.raises(SystemExit, match=r"shape \(100, 24\), need \(tokens >= batch=128, d\)"):
        bench_sae.activation_batch(str(tmp_path / "acts.npy"), 128)
    with pytest.raises(SystemExit, match="give a \\(tokens, d\\) .npy or .pt file"):
        bench_sae.activation_batch("acts.csv", 64)


def test_generation_rates_take_the_faster_roofline_around_the_timings():
    rooflines = iter([100.0, 400.0])
    gen = bench.generation_rates(bench.SETTINGS["model"], 2, torch.device("cpu"), "float32",
                                 lambda: next(rooflines))
    assert gen["roofline_gflops"] == 400.0
    for name in ("capture", "bridge", "plain_hf"):
        assert gen[f"{name}_tokens_per_s"] > 0 and gen[f"{name}_calls"] > 0
        expected = gen[f"{name}_tokens_per_s"] * gen["model_flops_per_token"] / 400e9
        assert abs(gen[f"{name}_mfu"] - expected) < 1e-12
    assert gen["capture_calls_ratio"] == gen["capture_calls"] / gen["plain_hf_calls"]


def test_time_refills_counts_the_tokens_and_seconds_of_each_refill():
    class Store:
        def _fresh_activations(self, n, desc=None):
            return torch.zeros(1, n, 4)

    store = Store()
    spent = bench.time_refills(store, torch.device("cpu"))
    assert store._fresh_activations(10).shape == (1, 10, 4) \
        and store._fresh_activations(6, "x").shape == (1, 6, 4)
    assert spent[1] == 16 and spent[0] > 0


def test_interleaved_rates_time_every_function_every_round():
    calls = {"a": 0, "b": 0}

    def counter(name: str):
        return lambda: calls.__setitem__(name, calls[name] + 1)

    rates = bench_sae.interleaved_rates({name: counter(name) for name in calls},
                                        torch.device("cpu"), rounds=3, steps=2)
    assert set(rates) == {"a", "b"} and all(len(r) == 3 and min(r) > 0 for r in rates.values())
    assert calls == {"a": 1 + 3 * 2, "b": 1 + 3 * 2}  # one warm-up call, then `steps` per round


def test_compare_times_two_variants_in_the_same_rounds():
    s = bench.parse(["d=8", "m=64", "k=4", "batch=64", "steps=2", "compare=matryoshka,batchtopk"])
    row = bench_sae.variant_ratio("matryoshka", "batchtopk", s, torch.device("cpu"), None)
    assert set(row["tokens_per_s"]) == {"matryoshka", "batchtopk"} \
        and 0 < row["ratio_min"] <= row["ratio_median"]
    with pytest.raises(SystemExit, match="compare='topk': give two variants"):
        bench.parse(["compare=topk"])


def test_peers_without_sparsify_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sparsify", None)
    s = bench.parse(["d=16", "m=64", "k=4", "batch=64", "peers=true"])
    with pytest.raises(SystemExit,
                       match="peers=true needs sparsify: pip install eai-sparsify==1.3.3"):
        bench_sae.sparsify_step_fn(s, torch.device("cpu"), torch.randn(64, 16), "adam")


def test_peer_comparison_where_sparsify_is_installed():
    pytest.importorskip("sparsify")
    s = bench.parse(["d=16", "m=64", "k=4", "batch=64", "steps=1"])
    peers = bench_sae.peer_comparison(s, torch.device("cpu"), None)
    assert set(peers) == {"sparsify_topk_adam", "sparsify_topk_signum", *bench.SAE_CLASSES}
    assert peers["sparsify_topk_adam"]["vs_sparsify_adam_median"] == 1.0
    assert all(row["tokens_per_s"] > 0 for row in peers.values())


def test_quality_needs_both_activation_files(monkeypatch):
    monkeypatch.setattr(bench, "matmul_roofline", lambda *args: 1.0)
    with pytest.raises(SystemExit,
                       match="quality=true needs acts=TRAIN_FILE and eval_acts=HELD_OUT_FILE"):
        bench.main(["d=16", "m=64", "k=4", "batch=64", "quality=true", "sae_steps=false",
                    "generation=false", "end_to_end=false"])


def test_quality_comparison_where_sparsify_is_installed(tmp_path):
    """Ours and sparsify's TopK trained on the same rows of a file, scored on one held-out file."""
    pytest.importorskip("sparsify")
    import numpy as np
    from test_store import sparse_mixture

    acts = sparse_mixture(12_288 + 2048).numpy()
    np.save(tmp_path / "train.npy", acts[2048:])
    np.save(tmp_path / "eval.npy", acts[:2048])
    s = bench.parse(["d=32", "m=128", "k=8", "batch=256", "quality_tokens=12000",
                     f"acts={tmp_path}/train.npy", f"eval_acts={tmp_path}/eval.npy"])
    quality = bench_sae.quality_comparison(s, torch.device("cpu"))
    assert quality["tokens"] == 11_776  # whole batches
    runs = quality["runs"]
    assert set(runs) == {*bench.SAE_CLASSES, "sparsify_topk_signum",
                         "sparsify_topk_adam_lr0.0003_warmup1000",
                         "sparsify_topk_adam_lr0.0003_warmup0"}
    for name, row in runs.items():
        print(name, row)
        assert row["tokens_per_s"] > 0 and 0 <= row["never_fired_eval_frac"] <= 1
    assert runs["topk"]["l0"] == 8 and runs["sparsify_topk_signum"]["l0"] <= 8
    assert runs["topk"]["explained_variance"] > 0.5 \
        and runs["sparsify_topk_signum"]["explained_variance"] > 0.5


def test_synthetic_rates_time_the_preset_and_the_synthsaebench_shape():
    rates = bench_sae.synthetic_rates(repeats=1)
    assert set(rates) == {"preset_samples_per_s", "synthsaebench_shape_samples_per_s",
                          "synthetic16k_samples_per_s"}
    assert all(rate > 0 for rate in rates.values())
    assert bench.parse(["synthetic=true"])["synthetic"] is True
