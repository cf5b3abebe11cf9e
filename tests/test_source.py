"""A data source is one class: a toy source defined in this file alone trains, checkpoints, stops,
resumes bitwise and is evaluated against its known features through the contract
(activation_store.ActivationSource), with no edit to any module."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import small_cfg
from safetensors.torch import load_file

from activation_store import GroundTruth
from data_parallel import Stopped
from training import train_sae

D, CENTRES, EVAL = 16, 24, 2048


class MixtureSource:
    """A Gaussian mixture: each sample is one of CENTRES unit directions at a random magnitude,
    plus noise; the directions are its known features."""

    def __init__(self, cfg: dict[str, Any]):
        self.batch_size = cfg["batch_size"]
        self.directions = F.normalize(
            torch.randn(CENTRES, D, generator=torch.Generator().manual_seed(1)), dim=-1)
        self.dims = {"d_model": D, "n_layers": cfg["layer"] + 1, "n_ctx": cfg["seq_len"]}
        self.device = torch.device("cpu")
        self.sharded, self.downstream = False, None
        eval_x, which = self._sample(EVAL, torch.Generator().manual_seed(2))
        self.eval_acts = eval_x.unsqueeze(0)
        self.ground_truth = GroundTruth(self.directions, torch.stack([torch.arange(EVAL), which]))
        self.scales = [math.sqrt(D / eval_x.pow(2).sum(-1).mean().item())]
        self.generator = torch.Generator().manual_seed(3)
        self.finished = 0

    def _sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        which = torch.randint(CENTRES, (n,), generator=gen)
        size = 1 + torch.rand(n, 1, generator=gen)
        return self.directions[which] * size + 0.02 * torch.randn(n, D, generator=gen), which

    def hook_index(self, hook_point: str) -> int:
        return 0

    def next_batch(self) -> torch.Tensor:
        return self._sample(self.batch_size, self.generator)[0].unsqueeze(0)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def finish(self) -> None:
        self.finished += 1


def test_a_toy_source_trains_stops_resumes_bitwise_and_is_evaluated(tmp_path, monkeypatch):
    import training

    cfg = small_cfg(sae_type="topk", dict_size=32, top_k=1, top_k_aux=8, num_tokens=256 * 48,
                    checkpoint_freq=8, eval_freq=24, output_dir=str(tmp_path))
    source = MixtureSource(cfg)
    whole = train_sae(cfg | {"run_name": "whole"}, store=source)
    metrics = whole.final_metrics
    assert source.finished == 1 and metrics["mcc"] > 0.8 and metrics["f1"] > 0.8  # centres found
    assert "downstream_recovered" not in metrics and "ce_recovered" not in metrics  # no model

    asked = {"n": 0}

    def stop_after_20_steps() -> bool:
        asked["n"] += 1
        return asked["n"] == 20

    monkeypatch.setattr(training, "stop_requested", stop_after_20_steps)
    with pytest.raises(Stopped) as stop:
        train_sae(cfg | {"run_name": "stopped"}, store=MixtureSource(cfg))
    assert stop.value.step == 20
    resumed = train_sae(cfg | {"resume": str(tmp_path / "stopped")}, store=MixtureSource(cfg))
    assert resumed.final_metrics["mcc"] == metrics["mcc"]
    a, b = (load_file(tmp_path / name / "final" / "sae.safetensors")
            for name in ("whole", "stopped"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
