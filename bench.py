r"""Measure what an SAE run costs on this machine; prints a table and writes bench_results.json.

    python bench.py                                   # embedded shape: d=384 m=3072 k=32 batch=4096
    python bench.py d=768 m=24576 device=cuda          # gpt2-small shape, GPU, random activations
    python bench.py generation=false end_to_end=false  # SAE steps only
    python bench.py sae_steps=false end_to_end=false   # generation only
    python bench.py model_batch_size=128               # rows per model forward (a GPU wants > 32)
    python bench.py dtype=bfloat16                     # bf16 model and SAEs: generation, end to end
    # some step rows:
    python bench.py variants=jumprelu,topk kernels=sparse generation=false end_to_end=false
    python bench.py acts=acts.npy generation=false end_to_end=false  # SAE steps on (tokens, d) acts
    python bench.py peers=true generation=false end_to_end=false  # + eai-sparsify==1.3.3's step
    # a step ratio; synthetic samples/s; a transcoder's step against the SAE's:
    python bench.py compare=matryoshka,batchtopk sae_steps=false generation=false end_to_end=false
    python bench.py synthetic=true transcoder= sae_steps=false generation=false end_to_end=false
    python bench.py transcoder=batchtopk sae_steps=false generation=false end_to_end=false
    python bench.py clt=6 transcoder= sae_steps=false generation=false end_to_end=false  # CLT step
    python bench.py model=random-gpt2-small device=cuda  # gpt2-small shape, random weights, offline
    python bench.py quality=true acts=train.npy eval_acts=eval.npy \
        sae_steps=false generation=false end_to_end=false

Every figure is timed here: the fp32 (and bf16) matmul roofline at the configured shape, SAE-step
tokens/s per variant (fp32, and bf16 autocast where the device supports it) with the
achieved GFLOP/s of the dense-equivalent step and its fraction of the roofline, and
activation generation as the store captures it and through TransformerBridge, against a plain
Hugging Face forward truncated at the same layer (with each one's model FLOP utilisation, and at
1 x 16 tokens the time and Python calls per forward), the end-to-end
training loop (store + steps) for one SAE and for a group of 8 sharing the stream, the
disk cache's read rate, and peak memory (GPU memory allocated on CUDA, resident memory on
CPU). With peers=true, also sparsify's TopK step (the fastest peer) on the same batch, timed
round by round alongside this project's: the ratio holds where the machine's speed drifts. With
quality=true, every registered variant of this project and sparsify's TopK trained on the same
rows of acts= and evaluated on eval_acts= (held-out EV, L0, latents never firing). `transcoder=`
(the default sae_type unless set; "" skips it): that variant's transcoder step, plain and skip,
against its SAE step. `clt=L`: a cross-layer transcoder's step over L layers of that variant against
L of its transcoder steps.
Speed is never asserted in tests.
"""

from __future__ import annotations

import functools
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from activation_store import ActivationsStore
from bench_sae import (
    PEER,
    activation_batch,
    clt_ratio,
    interleaved_rates,
    matmul_roofline,
    peer_comparison,
    peer_dtype,
    quality_comparison,
    sae_step_rate,
    synthetic_rates,
    timed,
    transcoder_ratios,
    variant_ratio,
)
from cache import CACHE_SHARD_TOKENS
from capture import load_model, model_dims, resolve_model_path, run_bridge_to_hooks, run_to_hook
from config import TORCH_DTYPES, get_default_cfg, prepare_cfg, resolve_device, site_hook
from sae import SAE_CLASSES
from text import shakespeare_documents
from training import Trainee, make_trainee, training_step

SETTINGS = {"d": 384, "m": 3072, "k": 32, "batch": 4096, "steps": 10, "device": "auto",
            "sae_steps": True, "generation": True, "end_to_end": True, "e2e_refills": 2,
            "e2e_warmup_steps": 20, "model": get_default_cfg()["model_name"],
            "model_batch_size": get_default_cfg()["model_batch_size"], "dtype": "float32",
            "variants": "", "kernels": "sparse,dense", "acts": "", "peers": False,
            "quality": False, "eval_acts": "", "quality_tokens": 1_048_576, "compare": "",
            "transcoder": get_default_cfg()["sae_type"], "synthetic": False, "clt": 0}


def model_flops_per_token(plain, seq_len: int) -> float:
    """Forward FLOPs per token of the truncated model: 2 per matrix weight outside the
    embedding tables (a lookup, not a product; GPT-2 names its own `wte`/`wpe`) and pooler,
    plus attention's two (seq x seq x d) products per layer."""
    tables = {id(p) for m in plain.modules() if isinstance(m, torch.nn.Embedding)
              for p in m.parameters()}
    weights = sum(p.numel() for name, p in plain.named_parameters()
                  if p.dim() > 1 and id(p) not in tables and "pooler" not in name)
    return 2 * weights + 4 * seq_len * plain.config.hidden_size * plain.config.num_hidden_layers


def python_calls(fn: Callable[[], Any]) -> int:
    """Python function calls one call of `fn` makes (cProfile, after a warm-up call): a cost that
    does not drift with the machine's load, and what bounds a small model's forward on a GPU."""
    import cProfile
    import pstats

    fn()
    profile = cProfile.Profile()
    profile.runcall(fn)
    return pstats.Stats(profile).total_calls


def generation_rates(model_name: str, model_batch_size: int, device: torch.device, dtype: str,
                     roofline: Callable[[], float]) -> dict[str, float]:
    """Tokens/s to the default hook, all in `dtype`: the store's capture (`run_to_hook`: the lean
    modules), the TransformerBridge itself, and plain HF truncated at the hook's depth, each with
    its model FLOP utilisation (of the faster of two matmul rooflines measured just before and
    just after the timings, as the machine's speed drifts). At 1 x 16 tokens, where a forward is
    all overhead: the capture's time per forward over plain HF's (median of interleaved rounds)
    and the Python calls of each (cProfile; a count that does not drift with the machine's load)."""
    from transformers import AutoModel

    cfg = get_default_cfg()
    model = load_model(model_name, str(device), dtype)
    hook = site_hook(cfg["layer"], cfg["site"])
    tokens = torch.randint(1000, 20000, (model_batch_size, cfg["seq_len"]), device=device)
    plain = AutoModel.from_pretrained(resolve_model_path(model_name),
                                      num_hidden_layers=cfg["layer"], dtype=TORCH_DTYPES[dtype])
    plain = plain.to(device).eval()

    def plain_forward(t: torch.Tensor) -> Any:
        with torch.inference_mode():
            return plain(input_ids=t)

    n = tokens.numel()
    before = roofline()
    rates = interleaved_rates({"capture": lambda: run_to_hook(model, tokens, hook),
                               "bridge": lambda: run_bridge_to_hooks(model, tokens, [hook]),
                               "plain_hf": lambda: plain_forward(tokens)},
                              device, rounds=6, steps=2)
    roofline_gflops = max(before, roofline())
    flops = model_flops_per_token(plain, cfg["seq_len"])
    row = tokens[:1, :16]  # one row of 16 tokens: the per-forward overhead, nothing else
    small = interleaved_rates({"capture": lambda: run_to_hook(model, row, hook),
                               "plain_hf": lambda: plain_forward(row)}, device, rounds=10, steps=20)
    calls = {"capture": python_calls(lambda: run_to_hook(model, row, hook)),
             "bridge": python_calls(lambda: run_bridge_to_hooks(model, row, [hook])),
             "plain_hf": python_calls(lambda: plain_forward(row))}
    out = {f"{name}_calls": count for name, count in calls.items()}
    out |= {"capture_calls_ratio": calls["capture"] / calls["plain_hf"],
            "bridge_calls_ratio": calls["bridge"] / calls["plain_hf"],
            "capture_1x16_time_vs_plain": statistics.median(
                p / c for c, p in zip(small["capture"], small["plain_hf"], strict=True)),
            "model_flops_per_token": flops, "roofline_gflops": roofline_gflops}
    for name, per_round in rates.items():
        out[f"{name}_tokens_per_s"] = n * statistics.median(per_round)
        out[f"{name}_mfu"] = out[f"{name}_tokens_per_s"] * flops / (roofline_gflops * 1e9)
    for name in ("capture", "bridge"):
        out[f"{name}_vs_plain"] = statistics.median(
            a / b for a, b in zip(rates[name], rates["plain_hf"], strict=True))
    return out


def stream_cfg(s: dict[str, Any], device: torch.device, model) -> dict[str, Any]:
    cfg = get_default_cfg() | {"model_name": s["model"], "device": str(device),
                               "batch_size": s["batch"], "model_batch_size": s["model_batch_size"],
                               "dtype": s["dtype"], "model_dtype": s["dtype"],
                               "dict_size": s["m"], "top_k": s["k"], "wandb_mode": "disabled"}
    return prepare_cfg(cfg, model_dims(model))


def train_loop(store: ActivationsStore, trainees: list[Trainee], steps: range,
               total_steps: int) -> None:
    """The training loop's work without logging: a batch from the store, one step per SAE."""
    for step in steps:
        x = store.next_batch()[0]
        for t in trainees:
            training_step(t, x, step, total_steps, aux_enabled=False)


def time_refills(store: ActivationsStore, device: torch.device) -> list[float]:
    """Accumulate [seconds, tokens] of the store's refills (model forwards included) from now
    on: the generation rate inside the loop, measured in the same minutes as the loop."""
    spent = [0.0, 0]
    refill = store._fresh_activations

    def timed_refill(n: int, desc: str | None = None) -> torch.Tensor:
        start = time.perf_counter()
        acts = refill(n, desc)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        spent[0] += time.perf_counter() - start
        spent[1] += n
        return acts

    store._fresh_activations = timed_refill
    return spent


def end_to_end_rates(s: dict[str, Any], device: torch.device, model) -> dict[str, float]:
    """Tokens/s of the training loop in steady state (batches from the store, its refills
    running the model, one step per SAE): one SAE, and a group of 8 sharing the stream.
    Timed over `e2e_refills` buffer refills, after the initial fill and `e2e_warmup_steps`
    untimed steps (from initialisation Vanilla's codes are dense for ~20 steps and JumpReLU's
    for ~5, which a long run never sees again); also the rate of those refills alone (this
    VM's speed drifts between sections, so the loop's ratio to its own generation rate is
    steadier than its ratio to the generation section's; nan where no refill fell in the loop)."""
    rates = {}
    group_of_8 = (tuple(SAE_CLASSES) * 8)[:8]  # the registered variants in turn
    for name, variants in (("one_sae", (get_default_cfg()["sae_type"],)),
                           ("group_of_8", group_of_8)):
        cfgs = [stream_cfg(s, device, model) | {"sae_type": v} for v in variants]
        store = ActivationsStore(model, cfgs[0])
        warmup, steps = s["e2e_warmup_steps"], s["e2e_refills"] * store.serve_count // s["batch"]
        total = 10 * (warmup + steps)  # the run these steps begin: schedules stay in early phase
        trainees = []
        for cfg in cfgs:  # main=False: no run folder
            trainees.append(make_trainee(cfg, total, main=False, schedule=lambda i: 1.0))
            trainees[-1].sae.init_from_batch(store.next_batch()[0], store.scale)
        train_loop(store, trainees, range(warmup), total)
        refills = time_refills(store, device)
        seconds = timed(functools.partial(train_loop, store, trainees,
                                          range(warmup, warmup + steps), total),
                        device, repeats=1, warmup=0, rounds=1)
        rates[f"{name}_tokens_per_s"] = steps * s["batch"] / seconds
        rates[f"{name}_refill_tokens_per_s"] = (refills[1] / refills[0] if refills[0]
                                                else float("nan"))
    return rates


def cache_read_rate(s: dict[str, Any], device: torch.device, model) -> float:
    """Tokens/s a store reads a cached stream at: a first store writes its buffer fill to a
    cache, a second starts from it, then the second's stream is re-read from the start."""
    with tempfile.TemporaryDirectory() as folder:
        cfg = stream_cfg(s, device, model) | {"cache_dir": folder}
        ActivationsStore(model, cfg).finish()
        reader = ActivationsStore(model, cfg)
        cached = min(c.tokens for c in reader.caches)
        reader.stream_tokens, read = 0, 0
        start = time.perf_counter()
        while reader.stream_tokens + CACHE_SHARD_TOKENS < cached:  # the end would seek the text
            read += reader._next_chunk().shape[1]
        return read / (time.perf_counter() - start)


def report_peak_memory(results: dict[str, Any], when: str, device: torch.device) -> None:
    """The process's peak so far: allocated GPU memory on CUDA, resident memory (the model,
    the store's buffer and every workspace included) on CPU. Peaks only grow, so the
    figure after the SAE steps bounds what they needed."""
    if device.type == "cuda":
        kind, gib = "GPU memory allocated", torch.cuda.max_memory_allocated(device) / 2**30
    else:
        unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        kind, gib = ("resident memory",
                     resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2**30)
    results.setdefault("peak_memory_gib", {})[when] = gib
    print(f"peak {kind} {when.replace('_', ' ')}: {gib:.2f} GiB")


RANDOM_GPT2 = "random-gpt2-small"  # model= for gpt2-small's shape, random weights, built offline


def random_gpt2(folder: Path, bpe_vocab: int = 512, **config: Any) -> Path:
    """A GPT-2 with random weights (`GPT2Config(**config)`: gpt2-small's shape unless told
    otherwise; the vocabulary the tokenizer's unless `vocab_size` is given) and a `bpe_vocab`-token
    BPE trained on a few scenes of the embedded plays, saved in `folder`. Its forward costs what the
    real model's does, so it times one offline; the tests' tiny GPT-2 is one too."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(shakespeare_documents(0)[:40], vocab_size=bpe_vocab,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    end = "<|endoftext|>"
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=end, eos_token=end,
                                  unk_token=end)
    tokenizer.save_pretrained(folder)
    config = {"vocab_size": len(tokenizer)} | config
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id,
                               **config)).save_pretrained(folder)
    return folder


def parse(argv: list[str]) -> dict[str, Any]:
    s = dict(SETTINGS)
    for item in argv:
        key, _, value = item.partition("=")
        if key not in s:
            sys.exit(f"error: unknown bench setting {key!r}; valid: {', '.join(s)}")
        s[key] = value.lower() == "true" if isinstance(s[key], bool) else type(s[key])(value)
    if s["dtype"] not in ("float32", "bfloat16"):
        sys.exit(f"error: bench setting dtype={s['dtype']!r}: use float32 or bfloat16")
    s["variants"] = s["variants"] or ",".join(SAE_CLASSES)  # "": every registered variant
    if s["transcoder"] and s["transcoder"] not in SAE_CLASSES:
        sys.exit(f"error: bench setting transcoder={s['transcoder']!r}: a variant "
                 f"({', '.join(SAE_CLASSES)}) or \"\"")
    if s["compare"] and (len(s["compare"].split(",")) != 2
                         or not set(s["compare"].split(",")) <= set(SAE_CLASSES)):
        sys.exit(f"error: bench setting compare={s['compare']!r}: give two variants, "
                 "e.g. compare=matryoshka,batchtopk")
    for key, allowed in (("variants", SAE_CLASSES), ("kernels", ("sparse", "dense"))):
        unknown = set(s[key].split(",")) - set(allowed)
        if unknown:
            sys.exit(f"error: bench setting {key}={s[key]!r}: {', '.join(sorted(unknown))} "
                     f"unknown; use a comma-separated list of {', '.join(allowed)}")
    return s


def main(argv: list[str]) -> None:
    s = parse(argv)
    if s["model"] == RANDOM_GPT2:
        s["model"] = str(random_gpt2(Path(tempfile.mkdtemp(prefix="gpt2-small-")),
                                     vocab_size=50257))
        print(f"model: gpt2-small's shape with random weights, in {s['model']}", flush=True)
    device = torch.device(resolve_device(s["device"]))
    x = activation_batch(s["acts"], s["batch"]) if s["acts"] and s["sae_steps"] else None
    if x is not None:
        s["d"] = x.shape[1]
        print(f"SAE steps on {s['batch']} rows of {s['acts']} (d {s['d']}), not random activations")
    bf16 = (torch.cuda.is_bf16_supported() if device.type == "cuda"
            else torch.backends.mkldnn.is_available())
    dtypes = ["float32"] + (["bfloat16"] if bf16 else [])
    roofline = matmul_roofline(s["d"], s["m"], s["batch"], device)
    rooflines = {dtype: roofline if dtype == "float32" else
                 matmul_roofline(s["d"], s["m"], s["batch"], device, dtype) for dtype in dtypes}
    dense_step_flops = 12 * s["batch"] * s["d"] * s["m"]  # six (B,d)x(d,m)-sized matmuls
    results: dict[str, Any] = {
        "settings": s, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "matmul_roofline_gflops": roofline, "matmul_roofline_gflops_by_dtype": rooflines,
        "dense_step_ceiling_tokens_per_s": roofline * 1e9 / dense_step_flops * s["batch"],
        "sae_step": {}}
    results["encoder_forward_ceiling_tokens_per_s"] = roofline * 1e9 / (2 * s["d"] * s["m"])
    print(f"device: {results['device']}; fp32 matmul roofline {roofline:.0f} GFLOP/s; "
          f"dense-step ceiling {results['dense_step_ceiling_tokens_per_s']:,.0f} tokens/s; "
          f"encoder-forward ceiling {results['encoder_forward_ceiling_tokens_per_s']:,.0f} tokens/s"
          + "".join(f"; {dt} matmul roofline {r:.0f} GFLOP/s" for dt, r in rooflines.items()
                    if dt != "float32"))
    if s["sae_steps"]:
        print("GFLOP/s counts the dense-equivalent step (6 matmuls), so a sparse step can pass "
              "100% of the roofline;")
        print("the fp32 roofline is re-measured before each row (a shared machine's speed drifts "
              "between rows)")
        print(f"{'variant':<10}{'kernels':<9}{'dtype':<10}{'tokens/s':>12}{'GFLOP/s':>10}"
              f"{'roofline':>10}{'of roofline':>13}")
    for variant in s["variants"].split(",") if s["sae_steps"] else ():
        for kernels in (s["kernels"].split(",") if SAE_CLASSES[variant].has_sparse_path
                        else ("dense",)):
            for dtype in dtypes:
                row_roofline = matmul_roofline(s["d"], s["m"], s["batch"], device)
                steps_per_s = sae_step_rate(variant, s, device, dtype, kernels, x)
                gflops = steps_per_s * dense_step_flops / 1e9
                tokens_per_s = steps_per_s * s["batch"]
                results["sae_step"][f"{variant}/{kernels}/{dtype}"] = {
                    "tokens_per_s": tokens_per_s, "gflops": gflops,
                    "fp32_roofline_gflops": row_roofline}
                print(f"{variant:<10}{kernels:<9}{dtype:<10}{tokens_per_s:>12,.0f}{gflops:>10.0f}"
                      f"{row_roofline:>10.0f}{gflops / row_roofline:>13.0%}", flush=True)
    if s["sae_steps"]:
        report_peak_memory(results, "after_sae_steps", device)
    if s["compare"]:
        a, b = s["compare"].split(",")
        row = results["compare"] = variant_ratio(a, b, s, device, x)
        print(f"{a} against {b}, steps as training takes them (kernels=auto, fp32; "
              f"{2 * s['steps']} interleaved rounds): {row['tokens_per_s'][a]:,.0f} vs "
              f"{row['tokens_per_s'][b]:,.0f} tokens/s, ratio per round median "
              f"{row['ratio_median']:.3f}, smallest {row['ratio_min']:.3f}", flush=True)
    if s["transcoder"]:
        row = results["transcoder"] = transcoder_ratios(s["transcoder"], s, device, x)
        rates = row["tokens_per_s"]
        print(f"{s['transcoder']} transcoder step against the SAE step (kernels=auto, fp32; "
              f"{2 * s['steps']} interleaved rounds): SAE {rates['sae']:,.0f}, transcoder "
              f"{rates['plain']:,.0f} ({row['plain_vs_sae_median']:.3f}x), skip transcoder "
              f"{rates['skip']:,.0f} ({row['skip_vs_sae_median']:.3f}x) tokens/s", flush=True)
    if s["clt"]:
        variant = s["transcoder"] or get_default_cfg()["sae_type"]
        row = results["clt"] = clt_ratio(variant, s["clt"], s, device)
        rates = row["tokens_per_s"]
        print(f"{variant} CLT step over {s['clt']} layers against {s['clt']} transcoder steps "
              f"(kernels=auto, fp32; {2 * s['steps']} interleaved rounds): CLT "
              f"{rates['clt']:,.0f}, transcoders {rates['transcoders']:,.0f} tokens/s; CLT time / "
              f"transcoders' time "
              f"per round median {row['time_ratio_median']:.2f}, largest "
              f"{row['time_ratio_max']:.2f}", flush=True)
    if s["peers"]:
        peers = results["peers"] = peer_comparison(s, device, x)
        print(f"same sitting as {PEER}'s TopK step ({peer_dtype(device)}, kernels=auto; "
              f"{2 * s['steps']} rounds, interleaved; tokens/s median of rounds; ratio to sparsify "
              "with Adam per round, median and smallest):")
        for name, row in peers.items():
            print(f"  {name:<20}{row['tokens_per_s']:>10,.0f} tokens/s  "
                  f"{row['vs_sparsify_adam_median']:.2f}x (smallest "
                  f"{row['vs_sparsify_adam_min']:.2f}x)", flush=True)
    if s["quality"]:
        if not (s["acts"] and s["eval_acts"]):
            sys.exit("error: bench setting quality=true needs acts=TRAIN_FILE and "
                     "eval_acts=HELD_OUT_FILE")
        quality = results["quality"] = quality_comparison(s, device)
        print(f"held-out quality after {quality['tokens']:,} training rows of {s['acts']}, "
              f"evaluated on {s['eval_acts']} (EV around the held-out mean; tokens/s of training, "
              f"data reading included):")
        for name, row in quality["runs"].items():
            print(f"  {name:<40}  EV {row['explained_variance']:.4f}  L0 {row['l0']:6.2f}  "
                  f"never fired {row['never_fired_eval_frac']:6.2%}  "
                  f"{row['tokens_per_s']:>8,.0f} tokens/s", flush=True)
    if s["synthetic"]:
        syn = results["synthetic"] = synthetic_rates()
        print(f"synthetic source: {syn['preset_samples_per_s']:,.0f} samples/s at the preset's "
              f"shape and batch, {syn['synthsaebench_shape_samples_per_s']:,.0f} at 16,384 "
              f"features in d 768 with L0 25 (batches of 4,096); the synthsaebench generator "
              f"(synthetic16k, batches of 1,024): {syn['synthetic16k_samples_per_s']:,.0f}",
              flush=True)
    if s["generation"]:
        gen = generation_rates(s["model"], s["model_batch_size"], device, s["dtype"],
                               functools.partial(matmul_roofline, s["d"], s["m"], s["batch"],
                                                 device, s["dtype"]))
        results["generation"] = gen
        print(f"generation to the default hook ({s['dtype']}; median of interleaved rounds): "
              f"capture {gen['capture_tokens_per_s']:,.0f} tokens/s "
              f"({gen['capture_vs_plain']:.2f}x plain HF), bridge "
              f"{gen['bridge_tokens_per_s']:,.0f} ({gen['bridge_vs_plain']:.2f}x), plain HF "
              f"{gen['plain_hf_tokens_per_s']:,.0f}; model FLOP utilisation (of the {s['dtype']} "
              f"matmul roofline, {gen['roofline_gflops']:.0f} GFLOP/s around the timings) "
              f"{gen['capture_mfu']:.0%} vs {gen['plain_hf_mfu']:.0%}", flush=True)
        print(f"one forward of 1 x 16 tokens: capture {gen['capture_1x16_time_vs_plain']:.2f}x "
              f"plain HF's time; Python calls: capture {gen['capture_calls']:,}, bridge "
              f"{gen['bridge_calls']:,}, plain HF {gen['plain_hf_calls']:,} (capture_calls_ratio "
              f"{gen['capture_calls_ratio']:.2f})", flush=True)
    if s["end_to_end"]:
        model = load_model(s["model"], str(device), s["dtype"])
        e2e = end_to_end_rates(s, device, model) | {
            "cache_read_tokens_per_s": cache_read_rate(s, device, model)}
        results["end_to_end"] = e2e
        base = results.get("generation", {}).get("capture_tokens_per_s")
        for name in ("one_sae", "group_of_8"):
            rate, refill = e2e[f"{name}_tokens_per_s"], e2e[f"{name}_refill_tokens_per_s"]
            print(f"end to end, {name.replace('_', ' ')}: {rate:,.0f} tokens/s "
                  f"({rate / refill:.2f}x the loop's own refills, {refill:,.0f} tokens/s"
                  + (f"; {rate / base:.2f}x the generation section's)" if base else ")"))
        print(f"cache read: {e2e['cache_read_tokens_per_s']:,.0f} tokens/s"
              + (f" ({e2e['cache_read_tokens_per_s'] / base:.2f}x generation)" if base else ""))
    report_peak_memory(results, "at_end", device)
    with open("bench_results.json", "w") as f:
        json.dump(results, f, indent=2)
    print("wrote bench_results.json")


if __name__ == "__main__":
    main(sys.argv[1:])
