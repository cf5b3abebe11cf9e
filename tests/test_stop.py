"""A stop is a checkpoint: Ctrl-C, SIGTERM and SIGUSR1 finish the step in flight, checkpoint every
run of the group and exit 5; resumed, they end with bitwise the weights of runs never stopped."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_resume import logged_steps, tiny_cfg

import checkpoint
import main
import training
from checkpoint import verify_checkpoint


def cli(cfg: dict) -> list[str]:
    from config import get_default_cfg

    defaults = get_default_cfg()
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in cfg.items()
            if v != defaults.get(k)]


def stop_cfg(out: Path, **overrides) -> dict:
    return tiny_cfg(num_tokens=64 * 20, checkpoint_freq=8, eval_freq=10, output_dir=str(out),
                    **overrides)


def signal_self_at(monkeypatch, module, name: str, when, sig: int) -> None:
    """Send `sig` to this process when `module.name` is called for the `when`-th time (1-based)."""
    real, calls = getattr(module, name), []

    def patched(*args, **kwargs):
        calls.append(1)
        if len(calls) == when:
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, patched)


def run_main(argv, minilm, monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(training, "load_model", lambda *args: minilm)
    capsys.readouterr()
    code = main.main(argv)
    return code, capsys.readouterr().err


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "sae.safetensors")


@pytest.fixture(scope="module")
def reference(minilm, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("reference")
    cfgs = [stop_cfg(out, sae_type=t, run_name=t) for t in ("batchtopk", "jumprelu")]
    return {t.cfg["run_name"]: t.run_dir for t in training.train_sae_group(cfgs, model=minilm)}


@pytest.mark.parametrize("sig,at_step", [  # mid-run; where a checkpoint is due anyway; at an eval
    (signal.SIGTERM, 3), (signal.SIGINT, 8), (signal.SIGUSR1, 10)])
def test_a_signal_checkpoints_the_group_and_the_resumed_runs_match_the_uninterrupted_ones(
        sig, at_step, reference, minilm, tmp_path, monkeypatch, capsys):
    out = tmp_path / "runs"
    argv = ["--sweep", "variants", *cli(stop_cfg(out))]  # the sweep below names runs and variants
    monkeypatch.setattr(main, "SWEEPS", {"variants": lambda base: [
        base | {"sae_type": t, "run_name": t} for t in ("batchtopk", "jumprelu")]})
    # the group's at_step-th step
    signal_self_at(monkeypatch, training, "training_step", 2 * at_step - 1, sig)
    code, err = run_main(argv, minilm, monkeypatch, capsys)
    assert code == 5, err[-2000:]
    line = [x for x in err.splitlines() if x.startswith("stopped")]
    assert line == [f"stopped at step {at_step} of 20: checkpoint written; continue with: "
                    f"python main.py --resume {out / 'batchtopk'}"], err[-2000:]
    for name in ("batchtopk", "jumprelu"):
        ckpt = checkpoint.checkpoint_folder(out / name, at_step)
        assert verify_checkpoint(ckpt) is None and not (out / name / "final").exists()
    monkeypatch.undo()
    code, err = run_main(["--resume", str(out / "jumprelu")], minilm, monkeypatch, capsys)
    assert code == 0, err[-2000:]
    for name, ref in reference.items():
        a, b = final_weights(ref), final_weights(out / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert logged_steps(out / name) == logged_steps(ref)


def test_a_signal_while_the_buffer_fills_loses_nothing_and_resumes_from_the_start(
        reference, minilm, tmp_path, monkeypatch, capsys):
    import activation_store

    out = tmp_path / "runs"
    signal_self_at(monkeypatch, activation_store.ActivationsStore, "_next_chunk", 3, signal.SIGTERM)
    code, err = run_main(cli(stop_cfg(out, sae_type="batchtopk", run_name="batchtopk")), minilm,
                         monkeypatch, capsys)
    assert code == 5 and "stopped before step 1 of 20 (filling the buffer): nothing trained, " \
                         "nothing lost; continue with: python main.py --resume " \
                         f"{out / 'batchtopk'}" in err, err[-2000:]
    assert (not (out / "batchtopk" / "checkpoints").exists()
            or not any((out / "batchtopk" / "checkpoints").iterdir()))
    monkeypatch.undo()
    code, err = run_main(["--resume", str(out / "batchtopk")], minilm, monkeypatch, capsys)
    assert code == 0, err[-2000:]
    a, b = final_weights(reference["batchtopk"]), final_weights(out / "batchtopk")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_ctrl_c_while_checkpointing_aborts_and_leaves_no_half_checkpoint(
        minilm, tmp_path, monkeypatch, capsys):
    out = tmp_path / "runs"
    cfg = stop_cfg(out, sae_type="topk", run_name="topk")
    signal_self_at(monkeypatch, training, "training_step", 11, signal.SIGINT)  # no checkpoint due
    real = checkpoint.save_checkpoint

    def save(run_dir, sae, state, step, **kwargs):
        if step == 11:  # the stop's own checkpoint: a second Ctrl-C arrives while it is written
            real_torch_save = torch.save

            def torch_save(obj, path, *a, **k):
                os.kill(os.getpid(), signal.SIGINT)
                return real_torch_save(obj, path, *a, **k)
            monkeypatch.setattr(torch, "save", torch_save)
        return real(run_dir, sae, state, step, **kwargs)
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    code, err = run_main(cli(cfg), minilm, monkeypatch, capsys)
    assert code == 130 and "aborted by a second Ctrl-C" in err, err[-2000:]
    folders = sorted(p.name for p in (out / "topk" / "checkpoints").iterdir())
    assert folders == ["step_0000008"]  # the step-8 checkpoint intact, nothing of step 11
    assert verify_checkpoint(out / "topk" / "checkpoints" / "step_0000008") is None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # main.main restored them


def test_a_run_with_a_cache_stopped_mid_way_resumes_bitwise(minilm, tmp_path, monkeypatch, capsys):
    """The stop flushes the cache's partial shard; the resumed run reads its block from the cache
    and generates the rest, ending with the weights of a run never stopped (with its own cache)."""
    ref = training.train_sae(stop_cfg(tmp_path / "ref", sae_type="topk", run_name="topk",
                                      cache_dir=str(tmp_path / "ref_cache")), model=minilm)
    out = tmp_path / "runs"
    cfg = stop_cfg(out, sae_type="topk", run_name="topk", cache_dir=str(tmp_path / "cache"))
    signal_self_at(monkeypatch, training, "training_step", 14, signal.SIGTERM)
    code, err = run_main(cli(cfg), minilm, monkeypatch, capsys)
    assert code == 5, err[-2000:]
    cache = next((tmp_path / "cache").iterdir())
    assert any(p.name.startswith("shard_") for p in cache.iterdir())  # the shard written on exit
    monkeypatch.undo()
    code, err = run_main(["--resume", str(out / "topk")], minilm, monkeypatch, capsys)
    assert code == 0, err[-2000:]
    a, b = final_weights(ref.run_dir), final_weights(out / "topk")
    assert all(torch.equal(a[k], b[k]) for k in a)


class FullDisk:
    """A text file whose flush writes half of what is pending, then fails as a full disk does."""

    def __init__(self, path: Path):
        self.real, self.pending = path.open("a"), ""

    def write(self, text: str) -> int:
        self.pending += text
        return len(text)

    def flush(self) -> None:
        self.real.write(self.pending[: len(self.pending) // 2])
        self.real.flush()
        raise OSError(28, "No space left on device")

    def tell(self) -> int:
        return self.real.tell()

    def close(self) -> None:
        self.real.close()


def test_a_full_disk_while_logging_is_one_line_exit_4_and_keeps_whole_records(
        minilm, tmp_path, monkeypatch, capsys):
    import logs

    out = tmp_path / "runs"
    real_log = logs.RunLogger.log

    def log(self, metrics, step, tokens):
        if step == 10:
            self.metrics_file = FullDisk(self.run_dir / "metrics.jsonl")
        return real_log(self, metrics, step, tokens)
    monkeypatch.setattr(logs.RunLogger, "log", log)
    code, err = run_main(cli(stop_cfg(out, sae_type="topk", run_name="topk")), minilm, monkeypatch,
                         capsys)
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 4 and len(errors) == 1 \
        and "disk full (No space left on device) while writing " in errors[0] \
        and "metrics.jsonl; what it held is intact" in errors[0], err[-2000:]
    lines = (out / "topk" / "metrics.jsonl").read_text().splitlines()
    assert lines and all(line.endswith("}") for line in lines)  # whole records only
    assert max(__import__("json").loads(line)["step"] for line in lines) < 10


def test_a_full_disk_while_writing_config_json_is_one_line(minilm, tmp_path, monkeypatch, capsys):
    import logs

    def full(path, text):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(logs, "write_atomic", full)
    code, err = run_main(cli(stop_cfg(tmp_path / "runs", sae_type="topk", run_name="topk")), minilm,
                         monkeypatch, capsys)
    assert (code == 4 and "disk full (No space left on device) while writing " in err
            and "config.json" in err)


def test_a_signal_inside_a_checkpoint_write_lets_it_finish_and_stops_there(
        reference, minilm, tmp_path, monkeypatch, capsys):
    out = tmp_path / "runs"
    monkeypatch.setattr(main, "SWEEPS", {"variants": lambda base: [
        base | {"sae_type": t, "run_name": t} for t in ("batchtopk", "jumprelu")]})
    signal_self_at(monkeypatch, checkpoint, "save_checkpoint", 2, signal.SIGTERM)  # jumprelu step 8
    code, err = run_main(["--sweep", "variants", *cli(stop_cfg(out))], minilm, monkeypatch, capsys)
    assert code == 5 and "stopped at step 8 of 20: checkpoint written" in err, err[-2000:]
    for name in ("batchtopk", "jumprelu"):
        assert sorted(p.name for p in (out / name / "checkpoints").iterdir()) == ["step_0000008"]
    monkeypatch.undo()
    assert run_main(["--resume", str(out / "batchtopk")], minilm, monkeypatch, capsys)[0] == 0
    for name, ref in reference.items():
        a, b = final_weights(ref), final_weights(out / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_a_block_read_from_the_cache_is_marked_so_and_needs_the_cache_on_resume(minilm, tmp_path):
    """A store reading its blocks from the cache records rows -1; a state taken at a block's end
    describes the next one (resume fills once); without the cache, resume refuses in one line."""
    import shutil

    from activation_store import ActivationsStore
    from capture import model_dims
    from config import ConfigError, prepare_cfg

    cfg = prepare_cfg(tiny_cfg(cache_dir=str(tmp_path / "cache")), model_dims(minilm))
    writer = ActivationsStore(minilm, cfg)
    for _ in range(40):
        writer.next_batch()
    writer.finish()
    reader = ActivationsStore(minilm, cfg)
    for _ in range(reader.serve_count // cfg["batch_size"] + 2):  # into the second block
        reader.next_batch()
    state = reader.state_dict()
    assert state["block"]["rows"] == -1
    again = ActivationsStore(minilm, cfg, fill=False)
    again.load_state_dict(state)
    for _ in range(12):
        assert torch.equal(again.next_batch(), reader.next_batch())
    while reader._served < reader.serve_count:  # to the end of a block
        reader.next_batch()
    end = reader.state_dict()
    assert end["served"] == 0 and end["block"]["start"] > state["block"]["start"]
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(ConfigError,
                       match="read from the activation cache, which no longer holds it"):
        ActivationsStore(minilm, cfg | {"cache_dir": str(tmp_path / "cache")},
                         fill=False).load_state_dict(state)
