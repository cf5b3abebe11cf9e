"""Shared fixtures: the embedded MiniLM, a tiny random GPT-2, and small configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from capture import load_model
from config import get_default_cfg

torch.set_num_threads(2)


def small_cfg(**overrides) -> dict:
    """A config small enough for a test: short rows, a tiny buffer, a few hundred tokens a step."""
    cfg = get_default_cfg() | {
        "seq_len": 32, "model_batch_size": 8, "num_batches_in_buffer": 8, "batch_size": 256,
        "eval_tokens": 1024, "downstream_eval_rows": 8, "dict_size": 256, "top_k": 16,
        "top_k_aux": 32,
        "num_tokens": 256 * 60, "perf_log_freq": 10, "eval_freq": 30, "checkpoint_freq": 40,
        "dead_after_tokens": 2048, "wandb_mode": "disabled", "device": "cpu", "lr": 1e-2,
    }
    return cfg | overrides


@pytest.fixture(scope="session")
def minilm():
    return load_model(get_default_cfg()["model_name"], "cpu")


def make_tiny_gpt2(folder: Path) -> Path:
    """A 2-layer GPT-2 with random weights and a 512-token BPE trained on a few scenes."""
    from bench import random_gpt2

    return random_gpt2(folder, n_positions=64, n_embd=32, n_layer=2, n_head=2)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


def stopped_and_resumed(cfgs_in, model, tmp_path: Path, monkeypatch, stop_at: int = 4):
    """Final weights of the group `cfgs_in("ref")` trained through, and of `cfgs_in("stopped")`
    stopped right after its checkpoint at step `stop_at` and resumed: [(reference, resumed)]."""
    from safetensors.torch import load_file

    import training

    reference = training.train_sae_group(cfgs_in("ref"), model=model)

    class Stop(Exception):
        pass
    real = training.checkpoint_group

    def stop_after(trainees, step, *args):
        real(trainees, step, *args)
        if step == stop_at:
            raise Stop
    monkeypatch.setattr(training, "checkpoint_group", stop_after)
    with pytest.raises(Stop):
        training.train_sae_group(cfgs_in("stopped"), model=model)
    monkeypatch.undo()
    resumed = training.train_sae_group([c | {"resume": str(tmp_path / "stopped" / c["run_name"])}
                                        for c in cfgs_in("stopped")], model=model)
    return [tuple(load_file(t.run_dir / "final" / "sae.safetensors") for t in pair)
            for pair in zip(reference, resumed, strict=True)]


def record_forwards(monkeypatch) -> tuple[list[list[str]], Any]:
    """The hook sets of every model forward the store runs from now on, and the real capture."""
    import activation_store

    forwards: list[list[str]] = []
    real = activation_store.run_to_hooks
    monkeypatch.setattr(activation_store, "run_to_hooks",
                        lambda m, tokens, hooks, *a: forwards.append(list(hooks))
                        or real(m, tokens, hooks, *a))
    return forwards, real
