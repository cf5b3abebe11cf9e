"""SAELens export/import and the Hub folder (interop.py): offline, small SAEs, no model.

Every variant gets a non-trivial input scale, random biases and thresholds, so folding the scale
into the exported weights is checked where it can fail. The SAELens formulas are re-implemented from
sae_lens 6 (saes/standard_sae.py, topk_sae.py, jumprelu_sae.py, gated_sae.py) and run on the
exported files alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from checkpoint import FINAL_DIR
from config import ConfigError, get_default_cfg
from interop import (
    SAELENS_CFG_FILE,
    SAELENS_WEIGHTS_FILE,
    build_hub_folder,
    export_saelens,
    load_saelens,
    model_card,
    upload,
)
from results import load_run
from sae import SAE_CLASSES, BaseSAE, BatchTopKSAE, GatedSAE, JumpReLUSAE, build_sae, save_sae

torch.set_num_threads(2)

D, M, K, B = 16, 64, 4, 256
SCALE = 3.7
HOOK = "blocks.3.hook_resid_pre"
VARIANTS = tuple(name for name, cls in SAE_CLASSES.items() if cls.saelens_architecture)
CLASSES = SAE_CLASSES
# built-in variants' SAELens architectures, written out (a new variant states its own on its class)
ARCHITECTURES = {"vanilla": "standard", "topk": "topk", "batchtopk": "jumprelu",
                 "jumprelu": "jumprelu", "matryoshka": "jumprelu", "gated": "gated"}
TOL = {"rtol": 1e-5, "atol": 1e-5}


def trained_like(sae_type: str, seed: int = 0, standardize_tokens: bool = False) -> BaseSAE:
    """A small eval-mode SAE with weights no fresh SAE has: scale 3.7, random biases, thresholds."""
    cfg = get_default_cfg() | {"act_size": D, "dict_size": M, "sae_type": sae_type, "top_k": K,
                               "seed": seed, "hook_point": HOOK, "run_name": f"{sae_type}_test_run",
                               "standardize_tokens": standardize_tokens}
    sae = build_sae(cfg)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        sae.scale.fill_(SCALE)
        sae.W_enc.add_(0.3 * torch.randn(D, M, generator=gen))
        sae.W_dec.add_(0.3 * torch.randn(M, D, generator=gen))
        sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True)
        sae.b_enc.copy_(torch.randn(M, generator=gen))
        sae.b_dec.copy_(torch.randn(D, generator=gen))
        if isinstance(sae, JumpReLUSAE):
            sae.log_threshold.copy_(0.5 + 0.5 * torch.randn(M, generator=gen))
        if isinstance(sae, BatchTopKSAE):
            sae.threshold.fill_(2.0)
            sae.threshold_initialised.fill_(True)
        if isinstance(sae, GatedSAE):
            sae.r_mag.copy_(0.3 * torch.randn(M, generator=gen))
            sae.b_mag.copy_(torch.randn(M, generator=gen))
    return sae.eval()


def raw_x(n: int = B, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def saelens_encode(cfg: dict, t: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """SAELens 6 inference encode (SAE.process_sae_in, then the architecture's encode)."""
    sae_in = x - t["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    if cfg["architecture"] == "gated":  # the gate decides which fire, the magnitude path how much
        active = sae_in @ t["W_enc"] + t["b_gate"] > 0
        return active * F.relu(sae_in @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"])
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    if cfg.get("rescale_acts_by_decoder_norm"):
        pre = pre * t["W_dec"].norm(dim=-1)
    if cfg["architecture"] == "standard":
        return F.relu(pre)
    if cfg["architecture"] == "topk":
        k = cfg["k"] if "k" in cfg else cfg["activation_fn_kwargs"]["k"]  # SAELens < 6 kept k there
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
    assert cfg["architecture"] == "jumprelu"
    return F.relu(pre) * (pre > t["threshold"].relu())


def saelens_decode(cfg: dict, t: dict[str, torch.Tensor], f: torch.Tensor) -> torch.Tensor:
    if "scaling_factor" in t:  # SAELens < 6: a fine-tuned factor applied to f before decoding
        f = f * t["scaling_factor"]
    if cfg.get("rescale_acts_by_decoder_norm"):
        f = f / t["W_dec"].norm(dim=-1)
    return f @ t["W_dec"] + t["b_dec"]


def saelens_layer_norm(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAELens 6's normalize_activations="layer_norm" on the way in: (x - mu) / (std + 1e-5), with
    mu and the (unbiased) std, which its way out puts back as x_hat * std + mu."""
    centred = x - x.mean(-1, keepdim=True)
    std = centred.std(-1, keepdim=True)
    return centred / (std + 1e-5), x.mean(-1, keepdim=True), std


def read_export(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((folder / SAELENS_CFG_FILE).read_text()), \
        load_file(folder / SAELENS_WEIGHTS_FILE)


def assert_some_fire_some_not(f: torch.Tensor) -> None:
    """Guard against a vacuous comparison: some entries fire, some do not."""
    active = (f != 0).float().mean().item()
    assert 0.0 < active < 1.0, active


# --- export: files, fields, and SAELens's formulas on them ---------------------------------


@pytest.mark.parametrize("sae_type", VARIANTS)
def test_export_cfg_fields_and_tensor_names(sae_type, tmp_path):
    sae = trained_like(sae_type)
    cfg, t = read_export(export_saelens(sae, tmp_path / "export"))
    assert cfg["architecture"] == ARCHITECTURES[sae_type]
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D, M, "float32")
    assert cfg["apply_b_dec_to_input"] is True
    assert cfg["normalize_activations"] == "none" and cfg["reshape_activations"] == "none"
    meta = cfg["metadata"]
    assert int(meta["sae_lens_version"].split(".")[0]) >= 6  # older versions read as flat configs
    assert meta["hook_name"] == HOOK and meta["model_name"] == sae.cfg["model_name"]
    assert meta["sae_training_export"]["sae_type"] == sae_type
    assert meta["sae_training_export"]["input_scale"] == pytest.approx(SCALE)
    if sae_type == "topk":
        assert cfg["k"] == K and cfg["rescale_acts_by_decoder_norm"] is False
    else:
        assert "k" not in cfg

    expected = {"W_enc": (D, M), "W_dec": (M, D), "b_enc": (M,), "b_dec": (D,)}
    if ARCHITECTURES[sae_type] == "jumprelu":
        expected["threshold"] = (M,)
    if sae_type == "gated":  # the gate's bias is SAELens's b_gate; r_mag and b_mag as they are
        expected = {"b_gate" if k == "b_enc" else k: v for k, v in expected.items()}
        expected |= {"r_mag": (M,), "b_mag": (M,)}
    assert {name: tuple(v.shape) for name, v in t.items()} == expected
    assert all(v.dtype == torch.float32 for v in t.values())
    with torch.no_grad():  # scale folded: W_enc * s, b_dec / s, W_dec / s; b_enc, thresholds kept
        torch.testing.assert_close(t["W_enc"], sae.W_enc * SCALE)
        torch.testing.assert_close(t["W_dec"], sae.W_dec / SCALE)
        torch.testing.assert_close(t["b_dec"], sae.b_dec / SCALE)
        torch.testing.assert_close(t["b_gate" if sae_type == "gated" else "b_enc"], sae.b_enc)
        if sae_type == "gated":
            assert torch.equal(t["r_mag"], sae.r_mag) and torch.equal(t["b_mag"], sae.b_mag)
        if sae_type == "jumprelu":
            torch.testing.assert_close(t["threshold"], sae.log_threshold.exp())
        if sae_type == "batchtopk":
            assert torch.equal(t["threshold"], sae.threshold.expand(M))
    assert float(sae.scale) == pytest.approx(SCALE)  # exporting leaves the SAE as it was


@pytest.mark.parametrize("sae_type", VARIANTS)
def test_exported_files_alone_reproduce_latents_and_reconstructions(sae_type, tmp_path):
    sae = trained_like(sae_type)
    cfg, t = read_export(export_saelens(sae, tmp_path / "export"))
    x = raw_x()
    with torch.no_grad():
        f = sae.encode(x)
        assert_some_fire_some_not(f)
        f_theirs = saelens_encode(cfg, t, x)
        torch.testing.assert_close(f_theirs, f, **TOL)
        assert torch.equal(f_theirs != 0, f != 0)
        torch.testing.assert_close(saelens_decode(cfg, t, f_theirs), sae.decode(f), **TOL)
        torch.testing.assert_close(saelens_decode(cfg, t, f_theirs), sae(x).x_hat, **TOL)


@pytest.mark.parametrize("sae_type", VARIANTS)
def test_export_then_load_saelens_round_trip(sae_type, tmp_path):
    sae = trained_like(sae_type)
    loaded = load_saelens(export_saelens(sae, tmp_path / "export"))
    assert type(loaded) is CLASSES[sae_type] and not loaded.training
    assert float(loaded.scale) == 1.0
    assert loaded.cfg["hook_point"] == HOOK \
        and (loaded.cfg["layer"], loaded.cfg["site"]) == (3, "resid_pre")
    assert loaded.cfg["run_name"] == sae.cfg["run_name"]
    if sae_type in ("topk", "batchtopk"):
        assert loaded.cfg["top_k"] == K
    x = raw_x(seed=2)
    with torch.no_grad():
        f = sae.encode(x)
        assert_some_fire_some_not(f)
        torch.testing.assert_close(loaded.encode(x), f, **TOL)
        torch.testing.assert_close(loaded.decode(f), sae.decode(f), **TOL)
        ours, theirs = sae(x), loaded(x)
        torch.testing.assert_close(theirs.latents, ours.latents, **TOL)
        torch.testing.assert_close(theirs.x_hat, ours.x_hat, **TOL)


def test_real_saelens_loads_the_export(tmp_path):
    """Only where sae_lens is installed (it is not a dependency of this project)."""
    sae_lens = pytest.importorskip("sae_lens")
    x = raw_x(seed=3)
    for sae_type in VARIANTS:
        sae = trained_like(sae_type)
        theirs = sae_lens.SAE.load_from_disk(export_saelens(sae, tmp_path / sae_type))
        with torch.no_grad():
            torch.testing.assert_close(theirs.encode(x), sae.encode(x), **TOL)
            torch.testing.assert_close(theirs(x), sae(x).x_hat, **TOL)


# --- import of folders written elsewhere ---------------------------------------------------


def write_saelens_folder(folder: Path, cfg: dict, seed: int = 5) -> dict[str, torch.Tensor]:
    """A SAELens-style folder: random weights (decoder rows not unit norm), the given cfg.json."""
    gen = torch.Generator().manual_seed(seed)
    t = {"W_enc": torch.randn(D, M, generator=gen) / D**0.5,
         "W_dec": 2 * torch.rand(M, 1, generator=gen) * torch.randn(M, D, generator=gen) / D**0.5,
         "b_enc": torch.randn(M, generator=gen) - 0.5, "b_dec": torch.randn(D, generator=gen)}
    if cfg.get("architecture") == "jumprelu":
        t["threshold"] = 0.2 + torch.rand(M, generator=gen)
    if cfg.get("finetuning_scaling_factor"):
        t["scaling_factor"] = 0.5 + torch.rand(M, generator=gen)
    folder.mkdir(parents=True)
    save_file(t, folder / SAELENS_WEIGHTS_FILE)
    (folder / SAELENS_CFG_FILE).write_text(json.dumps(cfg))
    return t


V6 = {"d_in": D, "d_sae": M, "dtype": "float32", "device": "cpu", "normalize_activations": "none",
      "metadata": {"sae_lens_version": "6.12.0", "model_name": "gpt2",
                   "hook_name": "blocks.8.hook_resid_pre", "context_size": 64}}


@pytest.mark.parametrize("cfg", [
    V6 | {"architecture": "standard", "apply_b_dec_to_input": False},
    V6 | {"architecture": "topk", "k": K, "rescale_acts_by_decoder_norm": True,
          "apply_b_dec_to_input": True},
    V6 | {"architecture": "jumprelu", "apply_b_dec_to_input": False},
    {"architecture": "topk", "d_in": D, "d_sae": M, "dtype": "float32",
     "hook_point": "blocks.1.hook_mlp_out",
     "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}, "apply_b_dec_to_input": True,
     "sae_lens_version": "5.3.0"},  # the flat layout of SAELens < 6
    {"architecture": "standard", "d_in": D, "d_sae": M, "dtype": "float32",
     "hook_name": "blocks.0.hook_resid_post", "finetuning_scaling_factor": True,
     "sae_lens_version": "4.0.0"},
], ids=["standard-no-bdec-in", "topk-rescaled", "jumprelu-no-bdec-in", "pre6-flat-topk",
        "pre6-scaling-factor"])
def test_load_saelens_folds_options_of_foreign_folders(cfg, tmp_path):
    t = write_saelens_folder(tmp_path / "sae", cfg)
    sae = load_saelens(tmp_path / "sae")
    assert type(sae) is CLASSES[{"standard": "vanilla"}.get(cfg["architecture"],
                                                            cfg["architecture"])]
    meta = cfg.get("metadata", cfg)
    assert sae.cfg["hook_point"] == meta.get("hook_name", cfg.get("hook_point"))
    if cfg["architecture"] == "topk":
        assert sae.cfg["top_k"] == K
    x = 2 * raw_x(seed=4)
    with torch.no_grad():
        f = saelens_encode(cfg, t, x)
        assert_some_fire_some_not(f)
        torch.testing.assert_close(sae.encode(x), f, **TOL)
        torch.testing.assert_close(sae.decode(f), saelens_decode(cfg, t, f), **TOL)


def one_line_error(error_type, call) -> str:
    with pytest.raises(error_type) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message
    return message


def test_variants_without_a_saelens_form_are_refused_in_one_line(tmp_path):
    without = [name for name, cls in SAE_CLASSES.items() if not cls.saelens_architecture]
    assert "hardconcrete" in without  # its fractional inference gate has no SAELens form
    for name in without:
        message = one_line_error(ConfigError,
                                 lambda n=name: export_saelens(trained_like(n), tmp_path / n))
        assert f"sae_type={name!r} states no saelens_architecture" in message
        assert not (tmp_path / name).exists()


def test_load_saelens_bad_folders_fail_with_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no cfg.json" in one_line_error(FileNotFoundError,
                                           lambda: load_saelens(tmp_path / "empty"))

    write_saelens_folder(tmp_path / "other", V6 | {"architecture": "matching_pursuit"})
    assert "'matching_pursuit' is not supported" in one_line_error(
        ConfigError, lambda: load_saelens(tmp_path / "other"))
    write_saelens_folder(tmp_path / "gated", V6 | {"architecture": "gated"})  # no r_mag, b_mag
    assert "tensor r_mag is missing" in one_line_error(ConfigError,
                                                       lambda: load_saelens(tmp_path / "gated"))

    t = write_saelens_folder(tmp_path / "zero", V6 | {"architecture": "jumprelu"})
    t["threshold"][7] = 0.0
    save_file(t, tmp_path / "zero" / SAELENS_WEIGHTS_FILE)
    message = one_line_error(ConfigError, lambda: load_saelens(tmp_path / "zero"))
    assert "latent 7" in message and "> 0" in message

    t = write_saelens_folder(tmp_path / "shape", V6 | {"architecture": "standard"})
    save_file(t | {"b_enc": torch.zeros(M + 1)}, tmp_path / "shape" / SAELENS_WEIGHTS_FILE)
    assert "b_enc" in one_line_error(ConfigError, lambda: load_saelens(tmp_path / "shape"))

    write_saelens_folder(tmp_path / "norm", V6 | {
        "architecture": "standard", "normalize_activations": "expected_average_only_in"})
    assert "normalize_activations" in one_line_error(ConfigError,
                                                     lambda: load_saelens(tmp_path / "norm"))


@pytest.mark.parametrize("sae_type", VARIANTS)
def test_an_sae_trained_on_standardised_tokens_exports_as_layer_norm_and_loads_back(sae_type,
                                                                                    tmp_path):
    sae = trained_like(sae_type, standardize_tokens=True)
    folder = export_saelens(sae, tmp_path / "export")
    cfg, t = read_export(folder)
    assert cfg["normalize_activations"] == "layer_norm"
    x = raw_x() * torch.linspace(0.5, 4.0, B)[:, None] + torch.randn(B, 1)  # varied means and stds
    x_n, mu, std = saelens_layer_norm(x)
    with torch.no_grad():
        f = sae.encode(x)
        assert_some_fire_some_not(f)
        f_theirs = saelens_encode(cfg, t, x_n)
        torch.testing.assert_close(f_theirs, f, **TOL)
        # SAELens puts back std, not std + 1e-5: relative difference 1e-5 / std
        torch.testing.assert_close(saelens_decode(cfg, t, f_theirs) * std + mu, sae.decode(f, x),
                                   rtol=1e-4, atol=1e-4)
        loaded = load_saelens(folder)
        assert loaded.cfg["standardize_tokens"] is True
        torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat, **TOL)
        torch.testing.assert_close(loaded.decode(loaded.encode(x), x), sae(x).x_hat,
                                   **TOL)  # as the model card says
    card = model_card(sae)
    assert "Each token is standardised first" in card and "x_hat = sae.decode(latents, x)" in card
    assert "standardised" not in model_card(trained_like(sae_type))


# --- the Hub folder and upload, without network --------------------------------------------


FINAL_EVAL = {"step": 300, "tokens": 76800, "l0": 3.9921875, "l1": 7.123456789,
              "nmse": 0.1258401135193840, "explained_variance": 0.874159886480616, "dead": 0,
              "dense": 2}


def fake_run(folder: Path, sae_type: str = "batchtopk") -> Path:
    """A finished run folder as RunLogger writes it: config.json, metrics.jsonl, final/ (SAE)."""
    sae = trained_like(sae_type)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(sae.cfg))
    records = [{"step": 0, "tokens": 0, "l0": 40.5, "nmse": 12.80761348737808},
               {"step": 20, "tokens": 5120, "train/loss": 3.5, "lr": 0.002}, FINAL_EVAL]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    save_sae(sae, folder / FINAL_DIR)
    return folder


def test_build_hub_folder_writes_export_and_model_card(tmp_path):
    run_dir = fake_run(tmp_path / "run")
    hub = build_hub_folder(run_dir, tmp_path / "hub", repo_id="someone/sae-test")
    assert sorted(str(p.relative_to(hub)) for p in hub.rglob("*") if p.is_file()) == [
        "README.md", f"{HOOK}/{SAELENS_CFG_FILE}", f"{HOOK}/{SAELENS_WEIGHTS_FILE}"]

    card = (hub / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: saelens\n")
    for key, value in FINAL_EVAL.items():  # the last evaluation, exactly as in metrics.jsonl
        assert f"| {key} | {value!r} |" in card
    assert "12.80761348737808" not in card  # not the step-0 evaluation
    assert f'SAE.from_pretrained("someone/sae-test", "{HOOK}")' in card
    assert "load_saelens(" in card and "3.7" in card
    assert card == model_card(load_run(run_dir), repo_id="someone/sae-test")

    run_sae, loaded = load_run(run_dir).sae(), load_saelens(hub / HOOK)
    x = raw_x(seed=6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).x_hat, run_sae(x).x_hat, **TOL)


def test_build_hub_folder_needs_a_finished_run(tmp_path):
    run_dir = fake_run(tmp_path / "run")
    for path in sorted((run_dir / FINAL_DIR).iterdir()):
        path.unlink()
    message = one_line_error(FileNotFoundError, lambda: build_hub_folder(run_dir, tmp_path / "hub"))
    assert "has not finished" in message


def test_upload_creates_repo_and_uploads_the_hub_folder(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls.append(("create_repo", repo_id, private, exist_ok))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, commit_message=None):
            files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*")
                           if p.is_file())
            calls.append(("upload_folder", repo_id, files))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = upload(fake_run(tmp_path / "run"), "someone/sae-test", token="tok", private=True)
    assert url == "https://huggingface.co/someone/sae-test"
    assert calls == [("init", "tok"), ("create_repo", "someone/sae-test", True, True),
                     ("upload_folder", "someone/sae-test",
                      ["README.md", f"{HOOK}/{SAELENS_CFG_FILE}",
                       f"{HOOK}/{SAELENS_WEIGHTS_FILE}"])]


def test_results_still_gives_the_interop_functions_older_model_cards_import():
    import interop
    import results

    assert results.load_saelens is interop.load_saelens and results.upload is interop.upload
    with pytest.raises(AttributeError):
        results.no_such_function  # noqa: B018
