"""Train SAEs from the command line.

    python main.py                          # one BatchTopK SAE on the embedded default
    python main.py sae_type=topk top_k=64   # override any config key
    python main.py --preset paper           # start from a named preset (needs GPU + internet)
    python main.py --sweep variants         # named runs; those on one hook point share a stream
    python main.py --sweep l0               # every variant at L0 16, 32, 64 on one stream
    python main.py --preset synthetic16k --sweep matched  # every variant at the preset's L0 (top_k)
    python main.py --resume runs/<run>      # continue a killed run + group from newest checkpoint
    python main.py --sweep layers           # one SAE per layer, all from one forward per batch
    python main.py --sweep transcoders      # per MLP: SAE on output, transcoder, skip transcoder
    torchrun --nproc_per_node=4 main.py     # data parallel: one rank per GPU (gloo on CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import warnings
from collections import defaultdict
from typing import Any

import torch
from transformers import AutoConfig

from cache import CacheWriteError
from capture import resolve_model_path
from checkpoint import CheckpointError, ResumeWarning, group_run_dirs, read_run_config
from config import PRESETS, STREAM_KEYS, ConfigError, get_default_cfg, hook_tag, parse_value
from data_parallel import Stopped, clear_stop, init_distributed, rank, request_stop, stop_signal
from logs import LogWriteError
from metrics import HEADLINE_METRICS
from sae import SAE_CLASSES
from training import NonFiniteError, train_sae_group


def sweep_variants(base: dict[str, Any]) -> list[dict[str, Any]]:
    """Every registered variant on one stream at its default sparsity (L0 near 32 for built-ins)."""
    return [base | {"sae_type": t} for t in SAE_CLASSES]


def sweep_l0(base: dict[str, Any]) -> list[dict[str, Any]]:
    """Every registered variant at L0 16, 32 and 64 on one stream, for a frontier at matched L0: a
    variant whose sparsity is a coefficient reaches it through target_l0, the others via top_k."""
    return [base | {"sae_type": name}
            | ({"target_l0": float(l0)} if cls.coeff_key else {"top_k": l0})
            for name, cls in SAE_CLASSES.items() for l0 in (16, 32, 64)]


def sweep_matched(base: dict[str, Any]) -> list[dict[str, Any]]:
    """Every registered variant at the preset's L0 (`top_k`) on one stream: through target_l0 for a
    variant whose sparsity is a coefficient (the synthetic presets' quality table:
    docs/benchmarks.md)."""
    return [base | {"sae_type": name}
            | ({"target_l0": float(base["top_k"])} if cls.coeff_key else {})
            for name, cls in SAE_CLASSES.items()]


def sweep_paper(base: dict[str, Any]) -> list[dict[str, Any]]:
    """The BatchTopK paper grid on gpt2 layer 8: TopK and BatchTopK over k at dict 12288,
    and over dict size at k 32. Needs a GPU and internet (gpt2, openwebtext)."""
    base = base | PRESETS["paper"]
    grid = [(12288, k) for k in (16, 32, 64)] + [(m, 32) for m in (3072, 6144, 24576, 49152)]
    return [base | {"sae_type": t, "dict_size": m, "top_k": k}
            for t in ("topk", "batchtopk") for m, k in grid]


def sweep_layers(base: dict[str, Any]) -> list[dict[str, Any]]:
    """One SAE per layer at the configured site, all read from one forward pass per batch."""
    config = AutoConfig.from_pretrained(resolve_model_path(base["model_name"]))
    n_layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    return [base | {"layer": layer} for layer in range(n_layers)]


def sweep_transcoders(base: dict[str, Any]) -> list[dict[str, Any]]:
    """At every layer's MLP: an SAE on its output, and a transcoder from its input to its output,
    plain and with a skip connection; all read from one forward pass per batch."""
    runs = ({"site": "mlp_out"}, {"site": "mlp_in", "target_site": "mlp_out"},
            {"site": "mlp_in", "target_site": "mlp_out", "skip_connection": True})
    return [layer | run for layer in sweep_layers(base) for run in runs]


def sweep_clt(base: dict[str, Any]) -> list[dict[str, Any]]:
    """A cross-layer transcoder over every layer's MLP (input mlp_in, target mlp_out) against
    per-layer transcoders of the same total width and summed L0 (cross_layer_writes=false), at k
    8, 16 and 32 per layer: one forward pass per batch serves all six."""
    clt = {"cross_layer": True, "site": "mlp_in", "target_site": "mlp_out"}
    return [base | clt | {"top_k": k, "cross_layer_writes": writes}
            for k in (8, 16, 32) for writes in (True, False)]


SWEEPS = {"variants": sweep_variants, "l0": sweep_l0, "matched": sweep_matched,
          "paper": sweep_paper, "layers": sweep_layers, "transcoders": sweep_transcoders,
          "clt": sweep_clt}


def parse_args(argv: list[str]) -> tuple[list[dict[str, Any]], argparse.Namespace]:
    parser = argparse.ArgumentParser(
        description="Train sparse autoencoders on TransformerLens activations.")
    parser.add_argument("overrides", nargs="*",
                        help="config overrides as key=value (see config.py)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="embedded",
                        help="starting config")
    parser.add_argument("--sweep", choices=sorted(SWEEPS), help="train a named list of configs")
    parser.add_argument("--resume", metavar="RUN_DIR", default="",
                        help="continue this run (and the runs trained with it on one stream) "
                             "from its newest complete checkpoint, with its saved config "
                             "(same as resume=RUN_DIR)")
    args = parser.parse_intermixed_args(argv)
    overrides = {}
    for item in args.overrides:
        if "=" not in item:
            raise ConfigError(f"argument {item!r} is not key=value: write e.g. sae_type=topk")
        key, value = item.split("=", 1)
        overrides[key] = parse_value(key, value)
    resume = args.resume or overrides.pop("resume", "")
    if resume:
        if args.sweep or args.preset != "embedded":
            raise ConfigError("--resume continues runs with the config saved in their folder: "
                              "drop --preset and --sweep")
        return resume_cfgs(resume, overrides), args
    base = get_default_cfg() | PRESETS[args.preset]
    return select_runs(SWEEPS[args.sweep](base) if args.sweep else [base], overrides), args


def select_runs(cfgs: list[dict[str, Any]], overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """Overrides on a sweep, key by key: an override keeps the runs that have its value if any do
    (`--sweep transcoders layer=3`: layer 3's three runs; `--sweep l0 sae_type=jumprelu`: JumpReLU's
    three targets), then every override is set in every run kept. Runs made equal train once."""
    kept = cfgs
    for key, value in overrides.items():
        kept = [c for c in kept if c.get(key) == value] or kept
    unique = {json.dumps(c | overrides, sort_keys=True, default=str): c | overrides for c in kept}
    return list(unique.values())


def resume_cfgs(run_dir: str, overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """The saved configs of `run_dir` and the runs of its group, with `overrides` (which
    train_sae_group refuses unless they are config.RESUME_KEYS or equal the saved values)."""
    return [read_run_config(d) | overrides | {"resume": str(d)} for d in group_run_dirs(run_dir)]


def group_by_stream(cfgs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for cfg in cfgs:
        groups[tuple(str(cfg[k]) for k in STREAM_KEYS)].append(cfg)
    return list(groups.values())


def print_summary(trainees: list) -> None:
    """Final held-out metrics: one row per run, one column per headline metric it has."""
    present = [m for m in HEADLINE_METRICS if any(m in (t.final_metrics or {}) for t in trainees)]
    widths = [max(len(m), 8) + 2 for m in present]
    several_hooks = len({(t.cfg["hook_point"], t.cfg["target_hook_point"]) for t in trainees}) > 1
    labels = [t.cfg["sae_type"] + (f" {hook_tag(t.cfg)}" if several_hooks else "")
              for t in trainees]
    width = max(len(label) for label in [*labels, "variant"]) + 2
    print("\n" + "variant".ljust(width)
          + "".join(m.rjust(w) for m, w in zip(present, widths, strict=True)))
    for t, label in zip(trainees, labels, strict=True):
        values = [t.final_metrics.get(m, float("nan")) for m in present]
        print(label.ljust(width)
              + "".join(f"{v:>{w}.4g}" for v, w in zip(values, widths, strict=True)))
    for t in trainees:
        print(f"run folder: {t.run_dir}")


def _one_line_warnings(default):
    """A warnings.showwarning that prints a ResumeWarning (a checkpoint passed over on
    resume) as one `warning: ...` line and hands every other warning to `default`."""
    def show(message, category, *args, **kwargs) -> None:
        if issubclass(category, ResumeWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            default(message, category, *args, **kwargs)
    return show


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
EXIT_STOPPED, EXIT_ABORTED = 5, 130


def stop_on_signals() -> None:
    """Ctrl-C, SIGTERM and SIGUSR1 (a scheduler's preemption or time-limit warning) ask training to
    finish the step in flight, checkpoint every run and exit (data_parallel.request_stop). A second
    Ctrl-C aborts at once; a second SIGTERM or SIGUSR1 lets the checkpoint finish."""
    def handle(signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if stop_signal():
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        request_stop(name)  # os.write: a print here could re-enter a stderr write in progress
        os.write(2, f"\n{name}: finishing the step in flight, then writing a checkpoint "
                    f"(Ctrl-C again aborts at once)\n".encode())
    for sig in STOP_SIGNALS:
        signal.signal(sig, handle)


def main(argv: list[str]) -> int:
    """Exit codes: 0 done, 2 bad config or data, 3 NaN/inf in training, 4 a checkpoint, the
    activation cache or a log could not be written, 5 stopped by a signal after checkpointing every
    run, 130 aborted by a second Ctrl-C (complete checkpoints stay intact)."""
    torch.set_float32_matmul_precision("high")
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    stop_on_signals()
    try:
        with warnings.catch_warnings():  # restores the warnings machinery on the way out
            warnings.showwarning = _one_line_warnings(warnings.showwarning)
            cfgs, _ = parse_args(argv)
            device = init_distributed(cfgs[0]["device"])  # under torchrun: this rank's device
            cfgs = [c | {"device": device} for c in cfgs]
            trainees = []
            for group in group_by_stream(cfgs):
                trainees += train_sae_group(group)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (CheckpointError, CacheWriteError, LogWriteError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 4
    except Stopped as stop:
        if rank() == 0:
            done = (f"stopped at step {stop.step} of {stop.total_steps}: checkpoint written"
                    if stop.step else
                    f"stopped before step 1 of {stop.total_steps} (filling the buffer): "
                    f"nothing trained, nothing lost")
            print(f"{done}; continue with: python main.py --resume {stop.run_dir}", file=sys.stderr)
        return EXIT_STOPPED
    except KeyboardInterrupt:
        print("error: aborted by a second Ctrl-C; every complete checkpoint is intact "
              "(python main.py --resume RUN_DIR continues from the newest)", file=sys.stderr)
        return EXIT_ABORTED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        clear_stop()
    if rank() == 0:
        print_summary(trainees)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
