"""Memory stays flat: a long synthetic run (random activations, no model) through the whole
training loop (steps, logging, evaluation, checkpoints, pruning) does not grow resident memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import small_cfg

from config import prepare_cfg
from training import train_sae_group

STEPS = 1500
WARM = 300  # resident memory is compared from here (allocator pools, first checkpoint, eval done)


def resident_bytes() -> int:
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return psutil.Process().memory_info().rss


class SyntheticStore:
    """What train_sae_group reads from an ActivationsStore, from a seeded generator:
    correlated random activations, a fixed held-out set, and no model. Records resident
    memory each time a batch is drawn."""

    def __init__(self, cfg: dict):
        self.cfg, self.device = cfg, torch.device("cpu")
        self.dims = {"d_model": cfg["act_size"], "n_layers": 6, "n_ctx": 512}
        self.sharded, self.ground_truth, self.downstream = False, None, None
        self.generator = torch.Generator().manual_seed(cfg["seed"])
        d = cfg["act_size"]
        self.mixing = torch.randn(4 * d, d, generator=self.generator) / d**0.5
        self.eval_acts = self._sample(1024).unsqueeze(0)
        self.scales = [1.0]
        self.rss: list[int] = []

    def _sample(self, n: int) -> torch.Tensor:
        codes = torch.randn(n, self.mixing.shape[0], generator=self.generator).relu_() ** 2
        return codes @ self.mixing

    def hook_index(self, hook_point: str) -> int:
        return 0

    def next_batch(self) -> torch.Tensor:
        self.rss.append(resident_bytes())
        return self._sample(self.cfg["batch_size"]).unsqueeze(0)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def finish(self) -> None:
        pass


def run_synthetic(output_dir: str) -> dict:
    """The long run; resident memory at every step, final nmse and the checkpoints kept."""
    cfg = small_cfg(sae_type="batchtopk", dict_size=512, top_k=16, top_k_aux=64, batch_size=256,
                    num_tokens=256 * STEPS, perf_log_freq=20, eval_freq=250, checkpoint_freq=250,
                    keep_checkpoints=2, output_dir=output_dir)
    store = SyntheticStore(prepare_cfg(cfg, {"d_model": 64, "n_layers": 6, "n_ctx": 512}))
    trainee = train_sae_group([cfg], store=store)[0]
    return {"rss": store.rss, "nmse": trainee.final_metrics["nmse"],
            "checkpoints": sorted(p.name for p in (trainee.run_dir / "checkpoints").iterdir())}


# In a fresh process (its memory is the run's alone) with one thread: with two, each of the
# step's many small parallel ops waits for a descheduled thread when the CPU is busy, and
# the run was many times slower inside a full test session.
SCRIPT = """
import json, sys
sys.path.insert(0, "tests")
import torch
from test_long_run import run_synthetic
torch.set_num_threads(1)
print(json.dumps(run_synthetic(sys.argv[1])))
"""


def test_resident_memory_does_not_grow_over_a_long_run(tmp_path):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)],
                            cwd=Path(__file__).parent.parent,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads(result.stdout.splitlines()[-1])
    rss = run["rss"]
    assert len(rss) == STEPS
    warm, end = rss[WARM], rss[-1]
    growth = (end - warm) / warm
    print(f"resident memory: {warm / 2**20:.1f} MiB at step {WARM}, "
          f"{end / 2**20:.1f} MiB at step {STEPS} "
          f"({100 * growth:+.2f}%), peak {max(rss[WARM:]) / 2**20:.1f} MiB")
    assert growth < 0.02
    # it trained (the held-out error fell) and kept only the newest checkpoints
    assert run["nmse"] < 0.5
    assert run["checkpoints"] == ["step_0001000", "step_0001250"]
