"""Runs that survive: SIGKILL and resume give the weights of an uninterrupted run, bitwise
(one run and a group); a corrupted checkpoint is passed over with a warning; old
checkpoints are pruned; a NaN batch can be skipped instead of stopping the run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import small_cfg
from safetensors.torch import load_file

from activation_store import ActivationsStore
from checkpoint import ResumeWarning, verify_checkpoint
from training import make_trainee, train_sae, train_sae_group, training_step

REPO = Path(__file__).resolve().parent.parent

# Runs in a subprocess: trains (spec "cfgs") or runs main.main (spec "argv"), and SIGKILLs
# itself at a chosen point, so the kill lands exactly there.
RUNNER = r"""
import json, os, signal, sys
import torch
torch.set_num_threads(2)
import checkpoint, logs, main, training

spec = json.loads(sys.argv[1])

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if "kill_before_manifest_of" in spec:  # mid-checkpoint: its files written, the manifest not yet
    write_manifest = checkpoint.write_manifest
    def patched(folder, known=None):
        if folder.name == ".tmp-" + spec["kill_before_manifest_of"]:
            die()
        write_manifest(folder, known)
    checkpoint.write_manifest = patched
if "kill_at_save" in spec:  # the n-th checkpoint save of the process (a group: between runs)
    save_checkpoint, calls = checkpoint.save_checkpoint, []
    def patched_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == spec["kill_at_save"]:
            die()
        return save_checkpoint(*args, **kwargs)
    checkpoint.save_checkpoint = patched_save
if "kill_mid_log_of" in spec:  # half a metrics.jsonl line written
    log = logs.RunLogger.log
    def patched_log(self, metrics, step, tokens):
        if step == spec["kill_mid_log_of"]:
            self.metrics_file.write(json.dumps({"step": step, "tokens": tokens})[:9])
            self.metrics_file.flush()
            die()
        log(self, metrics, step, tokens)
    logs.RunLogger.log = patched_log
if "cfgs" in spec:
    training.train_sae_group(spec["cfgs"])
else:
    sys.exit(main.main(spec["argv"]))
"""


def run(spec: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUNNER, json.dumps(spec)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def resume_in_process(run_dir: Path, minilm, monkeypatch, capsys) -> list[str]:
    """`python main.py --resume run_dir` in-process (model already loaded): its warning lines."""
    import main
    import training

    monkeypatch.setattr(training, "load_model", lambda *args: minilm)
    capsys.readouterr()
    assert main.main(["--resume", str(run_dir)]) == 0
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"]
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "final" / "sae.safetensors"), load_file(b / "final" / "sae.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def tiny_cfg(**overrides) -> dict:
    """Fewer model forwards than small_cfg: batches of 64, a 992-token buffer, 256 eval tokens;
    latents can go dead (and AuxK run) after 8 steps."""
    return small_cfg(**{"batch_size": 64, "num_batches_in_buffer": 4, "eval_tokens": 256,
                        "downstream_eval_rows": 4, "dead_after_tokens": 512,
                        "perf_log_freq": 2} | overrides)


def kill_cfg(**overrides) -> dict:
    return tiny_cfg(num_tokens=64 * 24, checkpoint_freq=4, eval_freq=12, **overrides)


def test_sigkilled_twice_then_resumed_gives_bitwise_the_uninterrupted_weights(minilm, tmp_path,
                                                                              monkeypatch, capsys):
    cfg = kill_cfg(sae_type="batchtopk", run_name="run")
    reference = train_sae(cfg | {"output_dir": str(tmp_path / "ref")}, model=minilm).run_dir
    run_dir = tmp_path / "killed" / "run"
    cfg = cfg | {"output_dir": str(tmp_path / "killed")}

    # 1. killed mid-way through writing the metrics line of step 10 (checkpoints at 4 and 8)
    result = run({"cfgs": [cfg], "kill_mid_log_of": 10})
    assert result.returncode == -9, result.stderr[-2000:]
    assert not (run_dir / "metrics.jsonl").read_text().endswith("\n")
    # 2. resumed from step 8, then killed writing the step-16 checkpoint (files there, no manifest)
    result = run({"argv": ["--resume", str(run_dir)], "kill_before_manifest_of": "step_0000016"})
    assert result.returncode == -9, result.stderr[-2000:]
    assert (run_dir / "checkpoints" / ".tmp-step_0000016").is_dir()
    # 3. resumed from step 12 to the end
    assert resume_in_process(run_dir, minilm, monkeypatch, capsys) == []

    assert_same_weights(reference, run_dir)
    assert logged_steps(run_dir) == logged_steps(reference)  # no step missing or repeated
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000016",
                                                                           "step_0000020"]
    assert verify_checkpoint(run_dir / "checkpoints" / "step_0000020") is None


def test_group_killed_between_its_runs_checkpoints_resumes_together_bitwise(minilm, tmp_path,
                                                                            monkeypatch, capsys):
    cfgs = [kill_cfg(sae_type=t, run_name=t, l0_coeff=0.05) for t in ("topk", "jumprelu")]
    reference = train_sae_group([c | {"output_dir": str(tmp_path / "ref")} for c in cfgs],
                                model=minilm)
    cfgs = [c | {"output_dir": str(tmp_path / "killed")} for c in cfgs]
    topk_dir, jumprelu_dir = (tmp_path / "killed" / name for name in ("topk", "jumprelu"))

    # saves: topk@4, jumprelu@4, topk@8, then killed before jumprelu@8
    result = run({"cfgs": cfgs, "kill_at_save": 4})
    assert result.returncode == -9, result.stderr[-2000:]
    assert (topk_dir / "checkpoints" / "step_0000008").is_dir()
    assert not (jumprelu_dir / "checkpoints" / "step_0000008").exists()

    warnings = resume_in_process(jumprelu_dir, minilm, monkeypatch, capsys)  # either resumes both
    assert len(warnings) == 1 and "step 8" in warnings[0] and "falling back" in warnings[0]

    for t, run_dir in zip(reference, (topk_dir, jumprelu_dir), strict=True):
        assert_same_weights(t.run_dir, run_dir)
        assert logged_steps(run_dir) == logged_steps(t.run_dir)


def test_corrupted_checkpoint_is_passed_over_with_a_warning(minilm, tmp_path):
    cfg = tiny_cfg(sae_type="topk", run_name="run", output_dir=str(tmp_path), num_tokens=64 * 16,
                   checkpoint_freq=4, eval_freq=8, keep_checkpoints=2)
    run_dir = train_sae(cfg, model=minilm).run_dir
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_0000008",
                                                             "step_0000012"]  # step 4 pruned
    finished = tmp_path / "finished"
    shutil.copytree(run_dir, finished)
    steps = logged_steps(run_dir)

    # a flipped byte (same size) fails the sha256; a truncated file fails the size check
    flipped = tmp_path / "flipped"
    shutil.copytree(checkpoints / "step_0000008", flipped)
    data = bytearray((flipped / "stream.safetensors").read_bytes())
    data[-1] ^= 1
    (flipped / "stream.safetensors").write_bytes(bytes(data))
    assert verify_checkpoint(flipped) == "stream.safetensors fails its sha256 check"

    shutil.rmtree(run_dir / "final")  # as if killed after step 12...
    weights = checkpoints / "step_0000012" / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # ...with a short file
    with pytest.warns(ResumeWarning, match=r"step 12 .*sae\.safetensors has \d+ bytes, "
                                           r"not \d+.*falling back"):
        train_sae(cfg | {"resume": str(run_dir)}, model=minilm)
    assert_same_weights(finished, run_dir)
    assert logged_steps(run_dir) == steps


def test_finished_run_and_foreign_config_are_refused_on_resume(minilm, tmp_path):
    from config import ConfigError

    cfg = tiny_cfg(sae_type="topk", run_name="run", output_dir=str(tmp_path), num_tokens=64 * 4,
                   checkpoint_freq=2, eval_freq=4)
    run_dir = train_sae(cfg, model=minilm).run_dir
    with pytest.raises(ConfigError, match="already finished"):
        train_sae(cfg | {"resume": str(run_dir)}, model=minilm)
    with pytest.raises(ConfigError,
                       match=r"config dict_size=512 differs from 256 in the run being resumed"):
        train_sae(cfg | {"resume": str(run_dir), "dict_size": 512}, model=minilm)


def test_nan_batch_is_skipped_counted_and_logged(minilm, tmp_path, monkeypatch):
    served = {"n": 0}
    original = ActivationsStore.next_batch

    def poisoned(self):
        served["n"] += 1
        batch = original(self)
        return batch * float("nan") if served["n"] == 7 else batch

    monkeypatch.setattr(ActivationsStore, "next_batch", poisoned)
    cfg = tiny_cfg(sae_type="topk", output_dir=str(tmp_path), run_name="skip", num_tokens=64 * 12,
                   checkpoint_freq=4, eval_freq=12, perf_log_freq=10, skip_nonfinite_batches=True)
    t = train_sae(cfg, model=minilm)
    assert t.skipped_batches == 1
    records = [json.loads(line) for line in (t.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/skipped_batches"]) for r in records
            if "train/skipped_batches" in r] == [(10, 1), (12, 1)]
    assert all(torch.isfinite(p).all() for p in t.sae.parameters())


def test_skipped_step_changes_no_weight_optimiser_state_or_counter(tmp_path):
    cfg = small_cfg(sae_type="batchtopk", output_dir=str(tmp_path), skip_nonfinite_batches=True)
    cfg |= {"act_size": 16, "hook_point": "blocks.0.hook_resid_pre", "run_name": "unit"}
    t = make_trainee(cfg, total_steps=10)
    x = torch.randn(256, 16)
    t.sae.init_from_batch(x, 1.0)
    training_step(t, x, 0, 10, aux_enabled=True)
    before = {k: v.clone() for k, v in t.sae.state_dict().items()}
    adam_steps = [s["step"].clone() for s in t.optimizer.state.values()]
    training_step(t, x * float("nan"), 1, 10, aux_enabled=True)
    assert t.skipped_batches == 1
    assert all(torch.equal(before[k], v) for k, v in t.sae.state_dict().items())
    assert [s["step"] for s in t.optimizer.state.values()] == adam_steps
    assert t.scheduler.last_epoch == 2  # the schedule still follows the step index
    t.logger.finish()


def test_store_state_round_trip_is_exact_across_epochs(minilm, tmp_path):
    """A store loaded from another's state serves the same batches, through epoch
    boundaries (where the held-out rows are skipped again)."""
    from capture import model_dims
    from config import prepare_cfg

    lines = [json.dumps({"body": f"Document {i}: " + " ".join(f"w{i}x{j}" for j in range(40))})
             for i in range(12)]
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines))
    cfg = prepare_cfg(small_cfg(dataset_path=str(tmp_path / "corpus.jsonl"), text_column="body",
                                eval_tokens=256, num_batches_in_buffer=2, batch_size=64),
                      model_dims(minilm))
    a, b = ActivationsStore(minilm, cfg), ActivationsStore(minilm, cfg)
    for _ in range(23):  # mid-buffer, within the second epoch
        a.next_batch()
    assert a.epoch == 1
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in a.state_dict().items()}
    b.load_state_dict(state)
    assert (b.rows_read, b.epoch) == (a.rows_read, a.epoch)
    for _ in range(30):  # on into the third epoch
        assert torch.equal(a.next_batch(), b.next_batch())
    assert a.epoch == b.epoch == 2
