"""On CUDA the training loop never waits for the device between logging steps: every variant trains
under `torch.cuda.set_sync_debug_mode("error")` except while it logs, evaluates or checkpoints. On
CPU the same loop runs with every Python-level read of a tensor's value (`.item()`, `bool()`,
`.tolist()`, ...: a sync on CUDA) made to raise; the CUDA test also catches reads in ATen ops."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import small_cfg

import training
from activation_store import TensorStore
from checkpoint import checkpoint_due
from sae import SAE_CLASSES

STEPS = 30


def train_with_sync_checks(variant: str, device: str, set_mode: Callable[[str], None], tmp_path,
                           monkeypatch, **overrides) -> None:
    """Train `variant` STEPS steps on `device`, sync debug mode "error" from the first step,
    "default" while the loop logs, evaluates or checkpoints (those read on the host by design)."""
    cfg = small_cfg(sae_type=variant, device=device, dict_size=512, top_k=8, num_tokens=256 * STEPS,
                    perf_log_freq=10, eval_freq=20, checkpoint_freq=25, dead_after_tokens=256 * 5,
                    output_dir=str(tmp_path), run_name=f"{variant}_sync",
                    eval_tokens=1024) | overrides
    acts = torch.randn(20_000, 64).relu() + 0.1

    run_steps, log_step, checkpoint_group = training._run_steps, training._log_step, \
        training.checkpoint_group

    def on_host(fn: Callable, due: bool) -> Callable:
        def call(*args, **kwargs):
            if due:
                set_mode("default")
            try:
                return fn(*args, **kwargs)
            finally:
                if due:
                    set_mode("error")
        return call

    def steps(*args, **kwargs):
        set_mode("error")
        try:
            return run_steps(*args, **kwargs)
        finally:
            set_mode("default")

    def logged(t, out, step, total_steps, *rest):
        c = t.cfg
        due = step % c["perf_log_freq"] == 0 or step % c["eval_freq"] == 0 or step == total_steps \
            or checkpoint_due(c, step)
        return on_host(log_step, due)(t, out, step, total_steps, *rest)

    def checkpointed(trainees, step, total_steps, *rest, now=False):
        due = now or step == total_steps or any(checkpoint_due(t.cfg, step) for t in trainees)
        return on_host(checkpoint_group, due)(trainees, step, total_steps, *rest, now=now)

    monkeypatch.setattr(training, "_run_steps", steps)
    monkeypatch.setattr(training, "_log_step", logged)
    monkeypatch.setattr(training, "checkpoint_group", checkpointed)
    trainee = training.train_sae(cfg, store=TensorStore(acts, cfg))
    assert trainee.final_metrics["l0"] > 0


def test_the_sync_checks_cover_every_step_but_the_logging_ones(tmp_path, monkeypatch):
    """CPU: mode is "error" for each training step but those that log, evaluate or checkpoint."""
    modes: list[str] = []
    steps_under: list[str] = []
    training_step = training.training_step

    def recording_step(*args, **kwargs):
        steps_under.append(modes[-1])
        return training_step(*args, **kwargs)

    monkeypatch.setattr(training, "training_step", recording_step)
    train_with_sync_checks("topk", "cpu", modes.append, tmp_path, monkeypatch)
    assert steps_under == ["error"] * STEPS  # the loop's own work runs checked from the first step
    visits = modes.count("default") - 1  # the last one ends the loop
    # logs at steps 10, 20, 25 (the checkpoint finiteness check) and 30; checkpoints at 25, 30 (end)
    assert visits == 6 and modes[0] == "error" and modes[-1] == "default"


HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


class HostRead(AssertionError):
    """A tensor's value was read on the host between logging steps."""


def host_reads_forbidden(monkeypatch) -> Callable[[str], None]:
    """A CPU `set_mode`: in mode "error", reading a tensor's value on the host raises HostRead."""
    forbidden = [False]

    def guarded(name: str) -> Callable:
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if forbidden[0]:
                raise HostRead(f"Tensor.{name} between logging steps")
            return original(self, *args, **kwargs)
        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, guarded(name))

    def set_mode(mode: str) -> None:
        forbidden[0] = mode == "error"
    return set_mode


def variant_settings() -> list:
    return [pytest.param(v, t, id=f"{v}-target{t}") for v, cls in SAE_CLASSES.items()
            for t in ([0, 8] if cls.coeff_key else [0])]


@pytest.mark.parametrize(("variant", "target_l0"), variant_settings())
def test_no_host_read_between_logging_steps(variant, target_l0, tmp_path, monkeypatch):
    """The dense step (what CUDA runs at this size) and its loop read no tensor on the host."""
    train_with_sync_checks(variant, "cpu", host_reads_forbidden(monkeypatch), tmp_path, monkeypatch,
                           kernels="dense", target_l0=target_l0)


def test_a_host_read_between_logging_steps_is_caught(tmp_path, monkeypatch):
    """skip_nonfinite_batches reads the loss every step by design: the check must see it."""
    with pytest.raises(HostRead, match="Tensor.item"):
        train_with_sync_checks("topk", "cpu", host_reads_forbidden(monkeypatch), tmp_path,
                               monkeypatch, kernels="dense", skip_nonfinite_batches=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("variant", "target_l0"), variant_settings())
def test_no_host_sync_between_logging_steps_on_cuda(variant, target_l0, tmp_path, monkeypatch):
    # kernels=dense: the sparse CUDA path syncs by design (it is picked only for large dictionaries)
    train_with_sync_checks(variant, "cuda", torch.cuda.set_sync_debug_mode, tmp_path, monkeypatch,
                           kernels="dense", target_l0=target_l0)
