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
from config import ConfigError, Key, get_default_cfg, prepare_cfg
from sae import SAE_CLASSES, TopKSAE, load_sae, register


class SquaredTopKSAE(TopKSAE):
    """TopK whose kept entries are squared (relu(pre)^2), with its own coefficient-free key."""

    name, title = "squared_topk", "Squared TopK"
    keys = TopKSAE.keys | {"square_scale": Key(1.0, "multiplies the squared kept entries", "> 0")}
    saelens_architecture = "topk"  # not inherited: SAELens reads TopK; load_saelens, this class

    def activation(self, pre: Tensor) -> Tensor:
        vals, idx = pre.topk(self.cfg["top_k"], dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx,
                                              self.cfg["square_scale"] * F.relu(vals).square())

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
    derived = prepare_cfg(cfg | {"sae_type": "squared_topk"},
                          {"d_model": 16, "n_layers": 4, "n_ctx": 512})
    assert "_sq32_" in derived["run_name"]
    assert [c["sae_type"] for c in main.sweep_variants(cfg)][-1] == "squared_topk"
    assert "squared_topk" in bench.parse(["variants=squared_topk"])["variants"]
    with pytest.raises(ConfigError, match="square_scale=0.0 is invalid: must be > 0"):
        prepare_cfg(cfg | {"square_scale": 0.0}, {"d_model": 16, "n_layers": 4, "n_ctx": 512})
    # it changed only its math, so it trains on the dense reference, never on TopK's sparse kernels
    assert TopKSAE.has_sparse_path and not squared_topk.has_sparse_path


def test_a_subclass_with_its_own_activation_does_not_export_as_its_parent(tmp_path):
    from interop import export_saelens

    class CubedTopKSAE(TopKSAE):  # not registered: export reads only the instance
        name, title = "cubed_topk", "Cubed TopK"

        def activation(self, pre: Tensor) -> Tensor:
            return super().activation(pre) ** 3

    assert CubedTopKSAE.saelens_architecture is None and not CubedTopKSAE.has_sparse_path
    cfg = get_default_cfg() | {"sae_type": "topk", "act_size": 8, "dict_size": 16, "top_k": 2}
    with pytest.raises(ConfigError, match="states no saelens_architecture"):
        export_saelens(CubedTopKSAE(cfg), tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_a_registered_variant_trains_exports_and_loads_back(squared_topk, tmp_path):
    from activation_store import TensorStore
    from interop import export_saelens, load_saelens
    from training import train_sae

    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(4096, 16, generator=gen) * torch.rand(16, generator=gen)
    cfg = small_cfg(sae_type="squared_topk", dict_size=64, top_k=4, top_k_aux=8,
                    num_tokens=256 * 6, eval_tokens=512, square_scale=0.5,
                    output_dir=str(tmp_path / "runs"), run_name="squared")
    trainee = train_sae(cfg, store=TensorStore(acts, cfg))
    assert trainee.final_metrics["l0"] <= 4 and trainee.final_metrics["explained_variance"] > 0
    sae = load_sae(tmp_path / "runs" / "squared" / "final")
    assert isinstance(sae, SquaredTopKSAE) and sae.cfg["square_scale"] == 0.5

    folder = export_saelens(sae, tmp_path / "export")
    back = load_saelens(folder)
    assert isinstance(back, SquaredTopKSAE) and back.cfg["square_scale"] == 0.5 \
        and back.cfg["top_k"] == 4
    x = acts[:64]
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back.decode(back.encode(x)), sae.decode(sae.encode(x)),
                                   rtol=1e-5, atol=1e-5)
    # in a process lacking the variant, its export is refused in one line, not read as TopK
    SAE_CLASSES.pop(squared_topk.name)
    try:
        with pytest.raises(ConfigError,
                           match="sae_type='squared_topk', which is not registered here"):
            load_saelens(folder)
    finally:
        register(squared_topk)


def test_a_run_saved_while_a_variant_was_registered_resumes_without_it(squared_topk, tmp_path):
    import json
    import shutil

    from activation_store import TensorStore
    from training import train_sae

    acts = torch.randn(4096, 16, generator=torch.Generator().manual_seed(1))
    cfg = small_cfg(sae_type="topk", dict_size=64, top_k=4, top_k_aux=8, num_tokens=256 * 6,
                    eval_tokens=512, checkpoint_freq=2, output_dir=str(tmp_path / "runs"),
                    run_name="plain")
    train_sae(cfg, store=TensorStore(acts, cfg))
    run_dir = tmp_path / "runs" / "plain"
    assert "square_scale" in json.loads((run_dir / "config.json").read_text())  # every key is saved
    SAE_CLASSES.pop(squared_topk.name)
    try:
        for leftover in ("final", "checkpoints/step_0000006"):  # as if killed after checkpoint 4
            shutil.rmtree(run_dir / leftover, ignore_errors=True)
        plain = {k: v for k, v in cfg.items() if k != "square_scale"}
        resumed = train_sae(plain | {"resume": str(run_dir)}, store=TensorStore(acts, plain))
        assert resumed.final_metrics["l0"] <= 4
    finally:
        register(squared_topk)


def test_the_l0_sweep_reaches_each_l0_through_the_variants_own_setting():
    cfgs = main.sweep_l0(get_default_cfg())
    assert len(cfgs) == 3 * len(SAE_CLASSES) and len(main.group_by_stream(cfgs)) == 1  # one stream
    dims = {"d_model": 16, "n_layers": 4, "n_ctx": 512}
    for cfg in cfgs:
        prepare_cfg(cfg, dims)  # every one is a valid config
        cls = SAE_CLASSES[cfg["sae_type"]]
        assert (cfg["target_l0"] > 0) == (cls.coeff_key is not None)
    assert sorted(c["top_k"] for c in cfgs if c["sae_type"] == "topk") == [16, 32, 64]


def test_the_matched_sweep_holds_every_variant_at_the_presets_l0():
    from config import PRESETS

    cfgs = main.sweep_matched(get_default_cfg() | PRESETS["synthetic16k"])
    assert [c["sae_type"] for c in cfgs] == list(SAE_CLASSES) \
        and len(main.group_by_stream(cfgs)) == 1
    for cfg in cfgs:
        assert cfg["target_l0"] == (25.0 if SAE_CLASSES[cfg["sae_type"]].coeff_key else 0.0) \
            and cfg["top_k"] == 25
