"""Config validation: a bad setting raises one line naming the key, the value and what's allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from config import ConfigError, get_default_cfg, make_run_name, parse_value, prepare_cfg

DIMS = {"d_model": 384, "n_layers": 6, "n_ctx": 512}
REPO = Path(__file__).resolve().parent.parent

BAD = [
    ({"dict_sise": 10}, "unknown config key 'dict_sise': did you mean 'dict_size'?"),
    ({"dict_size": "big"}, "dict_size='big' is invalid: expected int, got str"),
    ({"top_k": 4000}, "top_k=4000 is invalid: must be <= dict_size (3072)"),
    ({"layer": 6}, "layer=6 is invalid: the model has 6 layers (0..5)"),
    ({"seq_len": 1024}, "seq_len=1024 is invalid: must be <= the model's context (512)"),
    ({"sae_type": "relu"}, "sae_type='relu' is invalid: allowed: vanilla, topk, batchtopk, "
     "jumprelu"),  # and more
    ({"site": "resid"}, "site='resid' is invalid: allowed: resid_pre, resid_mid, resid_post, "
     "attn_out, mlp_in, mlp_out"),
    ({"lr": -1.0}, "lr=-1.0 is invalid: must be >= 0"),
    ({"batch_size": 0}, "batch_size=0 is invalid: must be > 0"),
    ({"lr_warmup_frac": 1.5}, "lr_warmup_frac=1.5 is invalid: must be in [0, 1)"),
    ({"use_bf16": True}, "unknown config key 'use_bf16'"),
    ({"dtype": "float16"}, "dtype='float16' is invalid: allowed: float32, bfloat16"),
    ({"num_tokens": 100}, "num_tokens=100 is invalid: must be >= batch_size (4096)"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[next(iter(o)) for o, _ in BAD])
def test_bad_setting_gives_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        prepare_cfg(get_default_cfg() | override, DIMS)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_good_config_derives_hook_point_and_act_size():
    cfg = prepare_cfg(get_default_cfg(), DIMS)
    assert cfg["hook_point"] == "blocks.3.hook_resid_pre"
    assert cfg["act_size"] == 384 and cfg["device"] in ("cpu", "cuda")
    assert cfg["run_name"].startswith("batchtopk_all-MiniLM-L6-v2_L3_resid_pre_m3072_k32_")


def test_run_names_are_unique_per_run():
    cfg = get_default_cfg()
    assert make_run_name(cfg) != make_run_name(cfg)


def test_parse_value_uses_the_default_type():
    assert parse_value("dict_size", "6144") == 6144
    assert parse_value("num_tokens", "1e6") == 1_000_000
    assert parse_value("lr", "1e-3") == 1e-3
    assert parse_value("exclude_special_tokens", "true") is True
    assert parse_value("sae_type", "topk") == "topk"
    with pytest.raises(ConfigError, match="dict_size='many' is invalid: expected int"):
        parse_value("dict_size", "many")


def run_main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_cli_bad_key_exits_2_with_one_line():
    result = run_main("dict_sise=10")
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: unknown config key 'dict_sise': "
                                     "did you mean 'dict_size'?")


def test_cli_layer_beyond_model_exits_2_with_one_line():
    result = run_main("layer=9", "wandb_mode=disabled")
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error_lines == ["error: config layer=9 is invalid: the model has 6 layers (0..5)"]
    assert "Traceback" not in result.stderr


def test_config_reference_is_the_declaration():
    from config import ROLES, all_keys, reference_table

    assert all(spec.doc and set(spec.roles) <= set(ROLES) for spec in all_keys().values())
    written = (REPO / "docs" / "config.md").read_text()
    assert written == reference_table(), \
        "docs/config.md is stale: python config.py > docs/config.md"


def test_the_recipe_keeps_a_set_lr_and_derives_an_unset_one_from_the_shape():
    from config import LR_MAX, auto_lr

    default = prepare_cfg(get_default_cfg(), DIMS)  # MiniLM's 300 steps: not yet noise-limited
    assert default["lr"] == LR_MAX \
        and default["auto"] == "lr 5.0e-3 (auto: 3,072 latents, d 384, 300 steps)"
    kept = prepare_cfg(get_default_cfg() | {"lr": 1e-3}, DIMS)
    assert kept["lr"] == 1e-3 and kept["auto"] == ""
    again = prepare_cfg(default, DIMS)  # a derived config (a resumed run's) keeps its values
    assert again["lr"] == default["lr"] and again["auto"] == default["auto"]
    long = get_default_cfg() | {"num_tokens": 4096 * 40_000, "dict_size": 16384}
    lr = prepare_cfg(long, DIMS)["lr"]
    assert lr < LR_MAX and lr == auto_lr(40_000, 384, 16384)
    assert auto_lr(4 * 40_000, 384, 16384) == pytest.approx(lr / 2)  # 1/sqrt(steps x d x latents)
    assert auto_lr(40_000, 4 * 384, 16384) == pytest.approx(lr / 2)
    assert auto_lr(40_000, 384, 4 * 16384) == pytest.approx(lr / 2)
