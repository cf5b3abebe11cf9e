"""A variant added the way a researcher adds one: a class defined here and registered with one
line, no other file of the project touched. It must train through `train_sae`, be chosen by
config, sweeps and bench, name its runs, and export to SAELens and load back."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import small_cfg
from torch import Tensor

import bench
import main
from config import ConfigError, Key, get_default_cfg, post_init_cfg
from sae import SAE_CLASSES, TopKSAE, load_sae, register


class SquaredTopKSAE(TopKSAE):
    """TopK whose kept entries are squared (relu(pre)^2), with its own coefficient-free key."""

    name, title = "squared_topk", "Squared TopK"
    keys = TopKSAE.keys | {"square_scale": Key(1.0, "multiplies the squared kept entries", "> 0")}

    def activation(self, pre: Tensor) -> Tensor:
        vals, idx = pre.topk(self.cfg["top_k"], dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, self.cfg["square_scale"] * F.relu(vals).square())

    @classmethod
    def run_tag(cls, cfg) -> str:
        return f"sq{cfg['top_k']}"


@pytest.fixture
def squared_topk():
    register(SquaredTopKSAE)  # the one line a new variant needs
    yield SquaredTopKSAE
    SAE_CLASSES.pop(SquaredTopKSAE.name)  # the other tests see the built-in registry


def test_a_registered_variant_is_known_everywhere(squared_topk):
    cfg = get_default_cfg()
    assert cfg["square_scale"] == 1.0  # its key, declared on its class
    derived = post_init_cfg(cfg | {"sae_type": "squared_topk"}, {"d_model": 16, "n_layers": 4, "n_ctx": 512})
    assert "_sq32_" in derived["run_name"]
    assert [c["sae_type"] for c in main.sweep_variants(cfg)][-1] == "squared_topk"
    assert "squared_topk" in bench.parse(["variants=squared_topk"])["variants"]
    with pytest.raises(ConfigError, match="square_scale=0.0 is invalid: must be > 0"):
        post_init_cfg(cfg | {"square_scale": 0.0}, {"d_model": 16, "n_layers": 4, "n_ctx": 512})
    # it changed only its math, so it trains on the dense reference, never on TopK's sparse kernels
    assert TopKSAE.has_sparse_path and not squared_topk.has_sparse_path


def test_a_registered_variant_trains_exports_and_loads_back(squared_topk, tmp_path):
    from activation_store import TensorStore
    from interop import export_saelens, load_saelens
    from training import train_sae

    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(4096, 16, generator=gen) * torch.rand(16, generator=gen)
    cfg = small_cfg(sae_type="squared_topk", dict_size=64, top_k=4, top_k_aux=8, num_tokens=256 * 6, eval_tokens=512,
                    square_scale=0.5, output_dir=str(tmp_path / "runs"), run_name="squared")
    trainee = train_sae(cfg, store=TensorStore(acts, cfg))
    assert trainee.final_metrics["l0"] <= 4 and trainee.final_metrics["explained_variance"] > 0
    sae = load_sae(tmp_path / "runs" / "squared" / "final")
    assert isinstance(sae, SquaredTopKSAE) and sae.cfg["square_scale"] == 0.5

    back = load_saelens(export_saelens(sae, tmp_path / "export"))
    assert isinstance(back, SquaredTopKSAE) and back.cfg["square_scale"] == 0.5 and back.cfg["top_k"] == 4
    x = acts[:64]
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back.decode(back.encode(x)), sae.decode(sae.encode(x)), rtol=1e-5, atol=1e-5)
