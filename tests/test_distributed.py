"""Data parallel on CPU with gloo: two ranks against one process on the union of their batches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import small_cfg
from safetensors.torch import load_file

from config import get_default_cfg
from data_parallel import average_gradients, average_tensors
from sae import build_sae
from schedule import SparsityCoefficient
from training import Trainee, training_step, use_sparse_kernels

D, M, B, STEPS = 32, 128, 64, 8


def step_cfg(sae_type: str) -> dict:
    return get_default_cfg() | {"sae_type": sae_type, "act_size": D, "dict_size": M, "top_k": 8,
                                "top_k_aux": 16, "batch_size": B, "device": "cpu", "seed": 0,
                                "lr": 1e-2, "dead_after_tokens": 10**9}  # AuxK's per-rank norm: off


def union_batch(step: int) -> torch.Tensor:
    """The 2B tokens of a step: rank r trains on rows [rB, (r+1)B)."""
    gen = torch.Generator().manual_seed(step)
    return torch.randn(2 * B, D, generator=gen) * torch.linspace(0.5, 2.0, D)


def train(sae_type: str, rows: slice) -> dict[str, torch.Tensor]:
    cfg = step_cfg(sae_type)
    sae = build_sae(cfg)
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg["lr"], fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    trainee = Trainee(cfg, sae, optimizer, scheduler, None, SparsityCoefficient(sae),
                      use_sparse_kernels(cfg))
    sae.init_from_batch(union_batch(0)[rows], scale=0.8)
    if dist.is_initialized():
        average_tensors([sae.b_dec])
    for step in range(STEPS):
        training_step(trainee, union_batch(step + 1)[rows], step, STEPS, aux_enabled=False)
    return {k: v.clone() for k, v in sae.state_dict().items()}


def _rank_main(rank: int, sae_type: str, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        probe = build_sae(step_cfg(sae_type))  # grads averaged, not summed (Adam would hide a sum)
        for p in probe.parameters():
            p.grad = torch.full_like(p, rank + 1.0)
        average_gradients(probe)
        assert all(torch.equal(p.grad, torch.full_like(p, 1.5)) for p in probe.parameters())
        torch.save(train(sae_type, slice(rank * B, (rank + 1) * B)), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sae_type", ["topk", "batchtopk"])
def test_two_ranks_match_each_other_and_one_process_on_the_union(sae_type, tmp_path):
    mp.spawn(_rank_main, args=(sae_type, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, value in ranks[0].items():
        assert torch.equal(ranks[1][name], value), name  # every rank holds identical state
    if sae_type == "batchtopk":
        return  # each rank picks its own batch's top k*B: not the union's (see training.py)
    single = train(sae_type, slice(0, 2 * B))
    for name, value in single.items():
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-4, atol=1e-5, msg=name)


def clt_cfg() -> dict:
    return step_cfg("topk") | {"cross_layer": True, "layers": "", "n_layers": 2,
                               "site": "mlp_in", "target_site": "mlp_out"}


def train_clt(rows: slice) -> dict[str, torch.Tensor]:
    """A 2-layer TopK CLT stepped as training does (per-layer b_dec and scales averaged over
    ranks at the start, latent blocks' counters and decoder constraint each step)."""
    from constraints import latent_blocks

    cfg = clt_cfg()
    clt = build_sae(cfg)
    optimizer = torch.optim.Adam(clt.parameters(), lr=cfg["lr"], fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    trainee = Trainee(cfg, clt, optimizer, scheduler, None, SparsityCoefficient(clt),
                      use_sparse_kernels(cfg))

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack([union_batch(2 * step), union_batch(2 * step + 1)])[:, rows]
        return x, torch.tanh(x.flip(-1)) * 2
    x, y = batch(0)
    clt.init_from_batch(x, [0.8, 1.1], y, [0.9, 1.2])
    if dist.is_initialized():
        average_tensors([p for b, _ in latent_blocks(clt) for p in (b.scale, b.b_dec)])
    for step in range(STEPS):
        training_step(trainee, *batch(step + 1)[:1], step, STEPS, aux_enabled=False,
                      target=batch(step + 1)[1])
    return {k: v.clone() for k, v in clt.state_dict().items()}


def _clt_rank_main(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.save(train_clt(slice(rank * B, (rank + 1) * B)), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_of_a_clt_match_each_other_and_one_process_on_the_union(tmp_path):
    mp.spawn(_clt_rank_main, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert "W_dec_later.0" in ranks[0]
    for name, value in ranks[0].items():
        assert torch.equal(ranks[1][name], value), name
    single = train_clt(slice(0, 2 * B))
    for name, value in single.items():
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-4, atol=1e-5, msg=name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REPO = Path(__file__).parent.parent
KILL_AFTER_CHECKPOINT = """
import os, sys
sys.path.insert(0, {repo!r})
import checkpoint, main
save = checkpoint.save_checkpoint
def save_then_die(run_dir, sae, state, step, *args, **kwargs):
    folder = save(run_dir, sae, state, step, *args, **kwargs)
    if step == {step}:
        os._exit(9)  # rank 0 dies right after this checkpoint; torchrun stops the other rank
    return folder
checkpoint.save_checkpoint = save_then_die
sys.exit(main.main(sys.argv[1:]))
"""


def torchrun(script: str, args: list[str]) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", script, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def ddp_args(out, run_name: str) -> list[str]:
    cfg = small_cfg(sae_type="batchtopk", output_dir=str(out), run_name=run_name,
                    num_tokens=256 * 8, checkpoint_freq=4, eval_freq=4, perf_log_freq=2,
                    num_batches_in_buffer=4)
    keys = ("sae_type", "output_dir", "run_name", "num_tokens", "checkpoint_freq", "eval_freq",
            "perf_log_freq", "seq_len", "model_batch_size", "num_batches_in_buffer", "batch_size",
            "eval_tokens", "downstream_eval_rows", "dict_size", "top_k", "wandb_mode", "device")
    return [f"{k}={cfg[k]}" for k in keys]


def test_torchrun_two_ranks_train_and_only_rank_0_writes(tmp_path):
    done = torchrun("main.py", ddp_args(tmp_path, "ddp"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]
    logged = [json.loads(line)
              for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    steps = [line["step"] for line in logged]
    assert steps == sorted(steps) and steps[-1] == 8
    batch_size = small_cfg()["batch_size"]
    assert all(line["tokens"] == line["step"] * batch_size * 2 for line in logged)  # of both ranks
    assert (tmp_path / "ddp" / "final" / "sae.safetensors").exists()
    weights = load_file(tmp_path / "ddp" / "final" / "sae.safetensors")
    assert torch.isfinite(weights["W_dec"]).all()
    assert done.stdout.count("run folder:") == 1  # the summary is printed once, by rank 0


def resume_and_compare(run_dir: Path, reference: Path) -> None:
    """Resume `run_dir` under torchrun and check its final weights are bitwise `reference`'s."""
    resumed = torchrun("main.py", ["--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    full = load_file(reference / "final" / "sae.safetensors")
    again = load_file(run_dir / "final" / "sae.safetensors")
    for name, value in full.items():
        assert torch.equal(again[name], value), name


def test_torchrun_run_killed_after_a_checkpoint_resumes_bitwise(tmp_path):
    """Each rank's stream state is in the checkpoint: the resumed 2-rank run ends with the
    uninterrupted one's weights (BatchTopK: counters and threshold synced across ranks)."""
    assert torchrun("main.py", ddp_args(tmp_path / "full", "run")).returncode == 0
    script = tmp_path / "kill_after_checkpoint.py"
    script.write_text(KILL_AFTER_CHECKPOINT.format(repo=str(REPO), step=4))
    assert torchrun(str(script), ddp_args(tmp_path / "killed", "run")).returncode != 0
    assert not (tmp_path / "killed" / "run" / "final").exists()
    resume_and_compare(tmp_path / "killed" / "run", tmp_path / "full" / "run")


TENSOR_STORE_UNDER_TORCHRUN = """
import sys
sys.path.insert(0, {repo!r})
import torch
from activation_store import TensorStore
from config import ConfigError
from data_parallel import init_distributed
from training import train_sae
cfg = {cfg!r}
init_distributed("cpu")
try:
    train_sae(cfg, store=TensorStore(torch.randn(4096, 16), cfg))
except ConfigError as err:
    print(f"error: {{err}}", file=sys.stderr)
    sys.exit(2)
"""


def test_torchrun_refuses_a_tensor_store(tmp_path):
    """Every rank would read the same rows: a one-line error instead of silently repeated data."""
    cfg = small_cfg(output_dir=str(tmp_path), run_name="t", eval_tokens=256)
    script = tmp_path / "tensor_store.py"
    script.write_text(TENSOR_STORE_UNDER_TORCHRUN.format(repo=str(REPO), cfg=cfg))
    done = torchrun(str(script), [])
    assert done.returncode != 0
    assert "TensorStore serves every torchrun rank the same rows" in done.stderr


SIGTERM_TO_RANK_1 = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import main, training
from data_parallel import rank
step = training.training_step
calls = []
def signalled_step(*args, **kwargs):
    calls.append(1)
    if rank() == 1 and len(calls) == {step}:
        os.kill(os.getpid(), signal.SIGTERM)  # one rank only: every rank stops after the same step
    return step(*args, **kwargs)
training.training_step = signalled_step
sys.exit(main.main(sys.argv[1:]))
"""


def test_torchrun_sigterm_to_one_rank_stops_both_at_one_step_and_resumes_bitwise(tmp_path):
    assert torchrun("main.py", ddp_args(tmp_path / "full", "run")).returncode == 0
    script = tmp_path / "sigterm_rank_1.py"
    script.write_text(SIGTERM_TO_RANK_1.format(repo=str(REPO), step=3))
    stopped = torchrun(str(script), ddp_args(tmp_path / "stopped", "run"))
    assert stopped.returncode != 0 \
        and "stopped at step 3 of 8: checkpoint written" in stopped.stderr, stopped.stderr[-3000:]
    assert (tmp_path / "stopped" / "run" / "checkpoints" / "step_0000003").is_dir()
    resume_and_compare(tmp_path / "stopped" / "run", tmp_path / "full" / "run")
