"""Run I/O: wandb never prompts, RunLogger's files, run folders that are refused."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import small_cfg

from logs import RunLogger, resolve_wandb_mode


def test_wandb_mode_never_prompts(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "disabled"
    assert resolve_wandb_mode("offline") == "offline"


def test_run_logger_writes_config_metrics_and_offline_wandb(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = small_cfg(output_dir=str(tmp_path), wandb_mode="offline", run_name="r1")
    logger = RunLogger(cfg)
    logger.log({"l0": 3.0, "density": torch.rand(10), "nmse": float("nan")}, step=5, tokens=1280)
    logger.finish()
    run_dir = tmp_path / "r1"
    assert json.loads((run_dir / "config.json").read_text())["run_name"] == "r1"
    record = json.loads((run_dir / "metrics.jsonl").read_text())
    assert record == {"step": 5, "tokens": 1280, "l0": 3.0, "nmse": None}
    assert any((run_dir / "wandb").glob("offline-run-*"))


def test_existing_run_folder_is_refused_and_left_intact(tmp_path):
    from config import ConfigError

    cfg = small_cfg(output_dir=str(tmp_path), run_name="taken")
    RunLogger(cfg).finish()
    (tmp_path / "taken" / "metrics.jsonl").write_text("keep me\n")
    with pytest.raises(ConfigError, match="the run folder .* already exists"):
        RunLogger(cfg)
    assert (tmp_path / "taken" / "metrics.jsonl").read_text() == "keep me\n"


def test_unwritable_output_dir_is_one_clear_error(tmp_path):
    from config import ConfigError

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="output_dir=.* is not writable"):
        RunLogger(small_cfg(output_dir=str(blocker / "runs")))
