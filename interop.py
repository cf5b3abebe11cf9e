"""Interoperability: SAELens folders (export, import), circuit-tracer folders for cross-layer
transcoders (export), and the Hugging Face Hub (model card, upload).

    from interop import export_saelens, export_circuit_tracer, load_saelens, upload
    export_saelens(run.sae(), "out/sae")       # cfg.json + sae_weights.safetensors (SAELens 6)
    export_circuit_tracer(clt, "out/clt")       # W_enc_{i}/W_dec_{i} files + hooks.json
    sae = load_saelens("path/to/saelens_sae")  # a SAELens folder (e.g. from the Hub) as our SAE
    upload("runs/<run>", "me/my-sae")          # README.md card + <hook_point>/ export (HF token)

Each variant states its SAELens form (sae.py: `saelens_architecture`, `saelens_tensors`,
`from_saelens`); this module writes and reads the files around it.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from checkpoint import FINAL_DIR
from clt import CrossLayerTranscoder
from config import SITES, ConfigError, get_default_cfg, site_hook
from logs import Run, as_run, last_evaluation, markdown_cell
from sae import SAE_CLASSES, BaseSAE, build_sae

# The layout is SAELens 6's (read in decoderesearch/SAELens at sae_lens 6.49: saes/sae.py SAEConfig
# and SAE.load_from_disk, saes/{standard,topk,jumprelu,batchtopk}_sae.py,
# loading/pretrained_sae_loaders.py; exports of all four variants checked once by hand to load in
# sae_lens 6.54.12 and give our outputs). cfg.json: the SAEConfig fields at the top level
# (architecture, d_in, d_sae, dtype, device, apply_b_dec_to_input, normalize_activations,
# reshape_activations; topk adds k and rescale_acts_by_decoder_norm) and the model facts under
# "metadata" (model_name, hook_name, context_size, ...; metadata.sae_lens_version must be >= 6.0,
# or SAELens reads an older flat config). sae_weights.safetensors: W_enc (d_in, d_sae),
# W_dec (d_sae, d_in), b_enc, b_dec, and threshold (d_sae,) for jumprelu. SAELens computes
# pre = (x - b_dec) @ W_enc + b_enc (with apply_b_dec_to_input) and x_hat = f @ W_dec + b_dec,
# with f = relu(pre) (standard), relu of each row's k largest pre (topk), or
# relu(pre) * 1[pre > relu(threshold)] (jumprelu; SAELens saves its BatchTopK SAEs this way too).

# Transcoders (saes/transcoder.py): pre = x @ W_enc + b_enc (apply_b_dec_to_input must be False),
# y_hat = f @ W_dec + b_dec (+ x @ W_skip.T, W_skip (d_out, d_in), for the skip architectures);
# cfg.json adds d_out and metadata.hook_name_out. SAELens 6 has them for ReLU and JumpReLU codes
# only: the architecture of each (SAE architecture, skip connection) pair is below.
TRANSCODER_ARCHITECTURES = {
    ("standard", False): "transcoder", ("standard", True): "skip_transcoder",
    ("jumprelu", False): "jumprelu_transcoder", ("jumprelu", True): "jumprelu_skip_transcoder"}
TRANSCODER_BASE = {arch: base for (base, _), arch in TRANSCODER_ARCHITECTURES.items()}

SAELENS_CFG_FILE = "cfg.json"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"  # metadata.sae_lens_version: the layout above, not an install
EXPORT_MARKER = "sae_training_export"  # metadata entry: variant, its keys, folded input scale, run
# the model card's config rows: CARD_KEYS, then the variant's own keys, then CARD_TRAINING_KEYS
CARD_KEYS = ("model_name", "hook_point", "dataset_path", "sae_type", "dict_size")
CARD_TRAINING_KEYS = ("num_tokens", "batch_size", "lr", "seq_len", "seed")


def hook_name(cfg: dict[str, Any]) -> str:
    """The hook point an SAE reads (`blocks.{layer}.hook_{site}`); also its Hub folder name."""
    return cfg.get("hook_point") or site_hook(cfg["layer"], cfg["site"])


def saelens_architecture(sae: BaseSAE) -> str | None:
    """The SAELens architecture of the inference form (of a transcoder, the transcoder kind)."""
    if not sae.transcoder:
        return sae.saelens_architecture
    return TRANSCODER_ARCHITECTURES.get((sae.saelens_architecture, sae.W_skip is not None))


@torch.no_grad()
def saelens_tensors(sae: BaseSAE) -> dict[str, Tensor]:
    """The SAE's weights under SAELens's names, the input scale s folded in so that SAELens's
    formulas on raw x give exactly our encode/decode: (x - b_dec/s) @ (s W_enc) + b_enc =
    (s x - b_dec) @ W_enc + b_enc, and f @ (W_dec/s) + b_dec/s = (f @ W_dec + b_dec)/s. Latents (and
    so thresholds) are unchanged; the exported decoder rows have norm 1/s. The variant adds what its
    architecture needs (`saelens_tensors`, per latent): e.g. BatchTopK's inference rule
    f = pre * 1[pre > theta] is a JumpReLU with theta given to every latent. A transcoder folds
    s_in into W_enc and s_out into the decoder: x @ (s_in W_enc) + b_enc, and f @ (W_dec/s_out)
    + b_dec/s_out + x @ (s_in/s_out W_skip) = (f @ W_dec + b_dec + s_in x @ W_skip)/s_out."""
    s = sae.scale.detach().float()
    s_out = sae.target_scale.detach().float() if sae.transcoder else s
    w_enc, w_dec, b_enc, b_dec = (t.detach().float()
                                  for t in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec))
    tensors = {"W_enc": w_enc * s, "W_dec": w_dec / s_out, "b_enc": b_enc, "b_dec": b_dec / s_out}
    if sae.W_skip is not None:
        tensors["W_skip"] = (sae.W_skip.detach().float() * (s / s_out)).T
    tensors |= {name: getattr(sae, name).detach().float().expand(sae.cfg["dict_size"])
                for name in sae.saelens_tensors}
    tensors = {sae.saelens_names.get(name, name): t for name, t in tensors.items()}
    return {name: t.float().cpu().contiguous() for name, t in tensors.items()}


def saelens_config(sae: BaseSAE) -> dict[str, Any]:
    """cfg.json for `saelens_tensors(sae)`: the scale is in the weights (no normalisation), but an
    SAE trained with standardize_tokens is SAELens's normalize_activations="layer_norm" (the same
    standardisation in; SAELens puts back std, not std + 1e-5: relative difference 1e-5 / std)."""
    cfg = sae.cfg
    out: dict[str, Any] = {"architecture": saelens_architecture(sae), "d_in": cfg["act_size"],
                           "d_sae": cfg["dict_size"], "dtype": "float32", "device": "cpu",
                           "apply_b_dec_to_input": not sae.transcoder,
                           "normalize_activations": ("layer_norm" if cfg.get("standardize_tokens")
                                                     else "none"),
                           "reshape_activations": "none"}
    if sae.saelens_architecture == "topk":  # SAELens's TopK reads its k from cfg.json
        out |= {"k": cfg["top_k"], "rescale_acts_by_decoder_norm": False}
    transcoder = ({"hook_name_out": cfg["target_hook_point"], "hook_head_index_out": None}
                  if sae.transcoder else {})
    if sae.transcoder:
        out["d_out"] = cfg["act_size"]
    out["metadata"] = transcoder | {
        "sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
        "model_name": cfg.get("model_name"), "hook_name": hook_name(cfg), "hook_head_index": None,
        "context_size": cfg.get("seq_len"), "dataset_path": cfg.get("dataset_path"),
        "prepend_bos": True,
        EXPORT_MARKER: {"sae_type": cfg["sae_type"], "input_scale": float(sae.scale),
                        "run_name": cfg.get("run_name"),
                        **({"target_scale": float(sae.target_scale)} if sae.transcoder else {}),
                        **{k: cfg.get(k) for k in sae.keys}},
    }
    return out


def export_saelens(sae: BaseSAE, folder: str | Path) -> Path:
    """Write the SAE's inference form as a SAELens 6 folder (cfg.json, sae_weights.safetensors) for
    `sae_lens.SAE.load_from_disk(folder)`: raw activations in, our latents and x_hat out."""
    if sae.saelens_architecture is None:
        raise ConfigError(f"sae_type={sae.cfg['sae_type']!r} states no saelens_architecture (its "
                          "activation is its own, which SAELens may not compute): set it on the "
                          "class if one fits, or share the SAE as saved (save_sae / load_sae in "
                          "sae.py)")
    if saelens_architecture(sae) is None:
        raise ConfigError(f"SAELens has transcoder layouts for ReLU and JumpReLU codes only ("
                          f"{', '.join(TRANSCODER_ARCHITECTURES.values())}), none for a "
                          f"{sae.cfg['sae_type']} transcoder: share it as saved (save_sae / "
                          f"load_sae in sae.py)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(saelens_tensors(sae), folder / SAELENS_WEIGHTS_FILE)
    (folder / SAELENS_CFG_FILE).write_text(json.dumps(saelens_config(sae), indent=2) + "\n")
    return folder


def _saelens_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """One flat dict from a SAELens cfg.json: version 6 keeps the model facts under `metadata`;
    older ones at the top level, the hook as `hook_point`, TopK's k in `activation_fn_kwargs`."""
    fields = {**raw, **(raw.get("metadata") or {})}
    fields.setdefault("hook_name", fields.get("hook_point"))
    k = (fields.get("activation_fn_kwargs") or {}).get("k")
    if fields.get("activation_fn_str", fields.get("activation_fn")) == "topk" and k is not None:
        fields |= {"architecture": "topk", "k": k}
    fields.setdefault("architecture", "standard")
    return fields


def saelens_architectures() -> list[str]:
    """SAELens architectures a registered variant reads, in registration order, transcoders last."""
    bases = list(dict.fromkeys(c.saelens_architecture for c in SAE_CLASSES.values()
                               if c.saelens_architecture))
    return bases + [arch for (base, _), arch in TRANSCODER_ARCHITECTURES.items() if base in bases]


def saelens_extra_tensors(architecture: str) -> list[str]:
    """Per-latent tensors beyond W_enc, W_dec, b_enc, b_dec that `architecture`'s variants read."""
    same = [c for c in SAE_CLASSES.values() if c.saelens_architecture == architecture]
    return list(dict.fromkeys(name for c in same for name in c.saelens_tensors))


def saelens_renames(architecture: str) -> dict[str, str]:
    """SAELens's tensor names -> ours, for `architecture`'s variants (e.g. gated's b_gate)."""
    same = [c for c in SAE_CLASSES.values() if c.saelens_architecture == architecture]
    return {theirs: ours for c in same for ours, theirs in c.saelens_names.items()}


def _check_saelens_fields(fields: dict[str, Any], where: Path) -> None:
    if fields["architecture"] not in saelens_architectures():
        raise ConfigError(f"{where}: SAELens architecture {fields['architecture']!r} is not "
                          f"supported; supported: {', '.join(saelens_architectures())}")
    if fields.get("normalize_activations") not in (None, False, "none", "layer_norm"):
        raise ConfigError(f"{where}: normalize_activations={fields['normalize_activations']!r} "
                          "is not supported (its scale is not in the folder); only 'none' and "
                          "'layer_norm'")
    for key in ("d_in", "d_sae") + (("k",) if fields["architecture"] == "topk" else ()):
        if not isinstance(fields.get(key), int):
            raise ConfigError(f"{where}: {key}={fields.get(key)!r} is invalid: "
                              "a whole number is needed")
    if (fields["architecture"] in TRANSCODER_BASE
            and fields.get("normalize_activations") == "layer_norm"):
        raise ConfigError(f"{where}: a transcoder with normalize_activations='layer_norm' is not "
                          "supported (this project's transcoders take raw activations)")
    if fields["architecture"] in TRANSCODER_BASE and fields.get("d_out") != fields["d_in"]:
        raise ConfigError(f"{where}: a transcoder from width d_in={fields['d_in']} to "
                          f"d_out={fields.get('d_out')!r}; this project's transcoders map between "
                          "hook points of one width (d_model)")


@torch.no_grad()
def _fold_saelens_options(t: dict[str, Tensor], fields: dict[str, Any],
                          transcoder: bool) -> dict[str, Tensor]:
    """Fold SAELens options this project has no switch for into the weights, each exactly:
    apply_b_dec_to_input=False: b_enc += b_dec @ W_enc (an SAE here always subtracts b_dec first;
    a transcoder never does);
    rescale_acts_by_decoder_norm (topk): decoder rows to unit norm, their norms into W_enc, b_enc;
    SAELens < 6's `scaling_factor` (f multiplied by it before decoding): into the decoder rows."""
    t = {name: v.float() for name, v in t.items()}
    for old in ("scaling_factor", "finetuning_scaling_factor"):
        if old in t:
            t["W_dec"] = t["W_dec"] * t.pop(old)[:, None]
    if not fields.get("apply_b_dec_to_input", True) and not transcoder:
        t["b_enc"] = t["b_enc"] + t["b_dec"] @ t["W_enc"]
    if fields.get("rescale_acts_by_decoder_norm"):
        norms = t["W_dec"].norm(dim=-1).clamp_min(1e-8)
        t |= {"W_enc": t["W_enc"] * norms, "b_enc": t["b_enc"] * norms,
              "W_dec": t["W_dec"] / norms[:, None]}
    return t


def _check_saelens_tensors(t: dict[str, Tensor], d: int, m: int, architecture: str,
                           where: Path) -> None:
    shapes = {"W_enc": (d, m), "W_dec": (m, d), "b_enc": (m,), "b_dec": (d,)}
    shapes |= {"W_skip": (d, d)} if "skip" in architecture else {}
    shapes |= {name: (m,)
               for name in saelens_extra_tensors(TRANSCODER_BASE.get(architecture, architecture))}
    for name, shape in shapes.items():
        if name not in t or tuple(t[name].shape) != shape:
            found = tuple(t[name].shape) if name in t else "missing"
            raise ConfigError(f"{where}: tensor {name} is {found}; expected shape {shape} "
                              f"(d_in {d}, d_sae {m})")
    extra = sorted(set(t) - set(shapes))
    if extra:
        raise ConfigError(f"{where}: unsupported tensors {', '.join(extra)}; "
                          f"expected {', '.join(shapes)}")


def _imported_cfg(fields: dict[str, Any], cls: type[BaseSAE], folder: Path) -> dict[str, Any]:
    """This project's config for an imported SAE: defaults plus what the SAELens folder says (an
    export of ours also carries the variant's own keys)."""
    marker = fields.get(EXPORT_MARKER) or {}
    cfg = get_default_cfg() | {
        "sae_type": cls.name, "act_size": fields["d_in"], "dict_size": fields["d_sae"],
        "run_name": marker.get("run_name") or folder.resolve().name,
        "standardize_tokens": fields.get("normalize_activations") == "layer_norm"}
    cfg |= {k: marker[k] for k in cls.keys if marker.get(k) is not None}
    if fields.get("hook_name_out"):
        cfg |= {"target_hook_point": fields["hook_name_out"],
                "skip_connection": "skip" in fields["architecture"]}
    hook = fields.get("hook_name")
    if hook:
        cfg["hook_point"] = hook
        match = re.fullmatch(r"blocks\.(\d+)\.hook_(\w+)", hook)
        if match and match.group(2) in SITES:
            cfg |= {"layer": int(match.group(1)), "site": match.group(2)}
    for ours, theirs in (("model_name", "model_name"), ("dataset_path", "dataset_path"),
                         ("seq_len", "context_size")):
        if fields.get(theirs) is not None:
            cfg[ours] = fields[theirs]
    return cfg


def _saelens_variant(fields: dict[str, Any], extras: dict[str, Tensor], folder: Path
                     ) -> tuple[type[BaseSAE], dict[str, Any]]:
    """The variant that reads the folder, and what it reads from it: the one our export names, else
    the first registered variant of its architecture that accepts it (`from_saelens`)."""
    marker = fields.get(EXPORT_MARKER) or {}
    if marker.get("sae_type") and marker["sae_type"] not in SAE_CLASSES:
        raise ConfigError(f"{folder}: exported from sae_type={marker['sae_type']!r}, which is not "
                          f"registered here (registered: {', '.join(SAE_CLASSES)}): import the "
                          f"module that registers it first")
    named = [SAE_CLASSES[marker["sae_type"]]] if marker.get("sae_type") else []
    base = TRANSCODER_BASE.get(fields["architecture"], fields["architecture"])
    same = [c for c in SAE_CLASSES.values() if c.saelens_architecture == base]
    for cls in [c for c in named if c in same] + same:
        try:
            found = cls.from_saelens(extras, fields | marker)
        except ConfigError as err:
            raise ConfigError(f"{folder}: {err}") from None
        if found is not None:
            return cls, found
    raise ConfigError(f"{folder}: no registered variant reads this "
                      f"{fields['architecture']!r} folder")


def load_saelens(folder: str | Path, device: str = "cpu") -> BaseSAE:
    """An SAE folder in SAELens's layout (ours, SAELens-trained, or from the Hub) as this project's
    SAE class, input scale 1, eval mode (normalize_activations="layer_norm" -> standardize_tokens):
    standard -> VanillaSAE, topk -> TopKSAE, jumprelu -> JumpReLUSAE (log_threshold = log threshold;
    thresholds must be > 0), gated -> GatedSAE; our exports go back to their variant (BatchTopK to
    BatchTopKSAE)."""
    folder = Path(folder)
    for name in (SAELENS_CFG_FILE, SAELENS_WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a SAELens SAE folder: it has no {name}")
    fields = _saelens_fields(json.loads((folder / SAELENS_CFG_FILE).read_text()))
    _check_saelens_fields(fields, folder)
    d, m, architecture = fields["d_in"], fields["d_sae"], fields["architecture"]
    transcoder = architecture in TRANSCODER_BASE
    if transcoder and not fields.get("hook_name_out"):
        fields["hook_name_out"] = "unknown"  # still a transcoder; the folder omits where it writes
    renames = saelens_renames(TRANSCODER_BASE.get(architecture, architecture))
    t = {renames.get(name, name): v for name, v in load_file(folder / SAELENS_WEIGHTS_FILE).items()}
    t = _fold_saelens_options(t, fields, transcoder)
    _check_saelens_tensors(t, d, m, architecture, folder)
    extras = {name: t.pop(name)
              for name in saelens_extra_tensors(TRANSCODER_BASE.get(architecture, architecture))}
    cls, found = _saelens_variant(fields, extras, folder)
    sae = build_sae(_imported_cfg(fields, cls, folder) | found["cfg"])
    scales = {"scale": torch.ones(())} | ({"target_scale": torch.ones(())} if transcoder else {})
    if "W_skip" in t:
        t["W_skip"] = t["W_skip"].T.contiguous()  # SAELens's (d_out, d_in) to our (d_in, d_out)
    sae.load_state_dict(sae.state_dict() | t | scales | found["state"])
    return sae.to(device).eval()


# --- circuit-tracer (0.5.0, transcoder/cross_layer_transcoder.py, read for its layout) ---------
# A folder of W_enc_{i}.safetensors (W_enc_i (m, d), b_enc_i (m), b_dec_i (d), threshold_i (m) for
# a JumpReLU) and W_dec_{i}.safetensors (W_dec_i (m, L - i, d): layer i's latents to targets
# i..L-1), one pair per model layer from 0. It computes f_i = pre_i * 1[pre_i > threshold_i] with
# pre_i = x_i @ W_enc_i.T + b_enc_i on raw x, and y_t = sum_{i<=t} f_i W_dec_i[:, t - i] + b_dec_t;
# load_clt reads no skip connection and no input scale, and is told its hooks
# (feature_input_hook, feature_output_hook: the hook names after "blocks.{layer}.").
CIRCUIT_TRACER_HOOKS_FILE = "hooks.json"


@torch.no_grad()
def circuit_tracer_tensors(clt: CrossLayerTranscoder) -> list[tuple[dict[str, Tensor],
                                                                    dict[str, Tensor]]]:
    """Per layer i, (W_enc_i file, W_dec_i file) tensors: each layer's SAELens form
    (`saelens_tensors`: s_in folded into W_enc, s_out of the target into W_dec and b_dec), its
    decoders to later layers divided by their own target's s_out. Latents are unchanged."""
    files = []
    for i, layer in enumerate(clt.layers):
        own = saelens_tensors(layer)
        later = [(clt.W_dec_later[i][:, k].float().cpu() if i < len(clt.W_dec_later)
                  else torch.zeros_like(own["W_dec"]))  # zeros: cross_layer_writes=false
                 / clt.layers[i + 1 + k].target_scale.float().cpu()
                 for k in range(len(clt.layers) - 1 - i)]
        w_dec = torch.stack([own["W_dec"], *later], dim=1)
        files.append(({f"W_enc_{i}": own["W_enc"].T.contiguous(), f"b_enc_{i}": own["b_enc"],
                       f"b_dec_{i}": own["b_dec"], f"threshold_{i}": own["threshold"]},
                      {f"W_dec_{i}": w_dec.contiguous()}))
    return files


def export_circuit_tracer(clt: CrossLayerTranscoder, folder: str | Path) -> Path:
    """Write the CLT as circuit-tracer's folder, for circuit_tracer's load_clt(folder,
    feature_input_hook=..., feature_output_hook=...) with the hooks in hooks.json: raw activations
    in, our latents and reconstructions out."""
    if not isinstance(clt, CrossLayerTranscoder):
        raise ConfigError("export_circuit_tracer takes a cross-layer transcoder "
                          "(cross_layer=true); export a single SAE or transcoder with "
                          "export_saelens")
    cfg, variant = clt.cfg, clt.variant
    if "threshold" not in variant.saelens_tensors:
        raise ConfigError(f"circuit-tracer computes a JumpReLU, and a {cfg['sae_type']} CLT has "
                          "no threshold form (TopK's k per token is not one): train "
                          "sae_type=batchtopk or jumprelu")
    if cfg.get("skip_connection"):
        raise ConfigError("circuit-tracer's load_clt reads no skip connection (W_skip): export a "
                          "CLT trained with skip_connection=false")
    if clt.layer_ids != list(range(cfg["n_layers"])):
        raise ConfigError(f"circuit-tracer takes a CLT over all the model's layers, and this one "
                          f"has layers={cfg['layers']} of 0..{cfg['n_layers'] - 1}: train with "
                          "layers=\"\"")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (enc, dec) in enumerate(circuit_tracer_tensors(clt)):
        save_file(enc, folder / f"W_enc_{i}.safetensors")
        save_file(dec, folder / f"W_dec_{i}.safetensors")
    hooks = {"feature_input_hook": site_hook(0, cfg["site"]).removeprefix("blocks.0."),
             "feature_output_hook": site_hook(0, cfg["target_site"]).removeprefix("blocks.0."),
             "model_name": cfg.get("model_name"), "sae_type": cfg["sae_type"],
             "run_name": cfg.get("run_name")}
    (folder / CIRCUIT_TRACER_HOOKS_FILE).write_text(json.dumps(hooks, indent=2) + "\n")
    return folder


def _final_sae(run: Run) -> BaseSAE:
    if not (run.path / FINAL_DIR / "config.json").exists():
        raise FileNotFoundError(f"{run.path} has no final SAE ({FINAL_DIR}/): "
                                "the run has not finished")
    return run.sae()


def model_card(run_or_sae: str | Path | Run | BaseSAE, metrics: dict[str, Any] | None = None,
               repo_id: str | None = None) -> str:
    """README.md for the Hub: what the SAE is, its config, final metrics (default: a run's last
    evaluation in metrics.jsonl, exactly as written), how to load it (SAELens, this project)."""
    if isinstance(run_or_sae, BaseSAE):
        sae, metrics = run_or_sae, metrics or {}
    else:
        run = as_run(run_or_sae)
        sae = _final_sae(run)
        metrics = last_evaluation(run) if metrics is None else metrics
    cfg, repo, sae_id = sae.cfg, repo_id or "<user>/<repo>", hook_name(sae.cfg)
    keys = [k for k in (*CARD_KEYS, *type(sae).keys, *CARD_TRAINING_KEYS) if k in cfg]
    metric_rows = ([f"| {k} | {markdown_cell(v)} |" for k, v in metrics.items()]
                   or ["| (none given) | |"])
    skip = "skip " if sae.W_skip is not None else ""
    kind, what = (("SAE", "sparse autoencoder") if not sae.transcoder
                  else (f"{skip}transcoder", f"{skip}transcoder"))
    target = f" predicting those at `{cfg['target_hook_point']}`" if sae.transcoder else ""
    keys += [k for k in ("target_hook_point", "skip_connection") if sae.transcoder]
    return "\n".join([
        "---", "library_name: saelens", "tags:", "- sparse-autoencoder", "- interpretability",
        f"- {cfg['sae_type']}", "---", "",
        f"# {type(sae).title} {kind} on `{cfg.get('model_name')}`, `{sae_id}`", "",
        f"A {what} with {cfg['dict_size']} latents on the {cfg['act_size']}-dimensional "
        f"activations at `{sae_id}`{target}, trained with the flat SAE training scripts "
        f"(run `{cfg.get('run_name')}`).", "",
        "## Final metrics", "",
        "The last evaluation on held-out activations never trained on, in raw activation space:",
        "", "| metric | value |", "|---|---|", *metric_rows, "",
        "## Configuration", "", "| key | value |", "|---|---|",
        *(f"| {k} | {markdown_cell(cfg[k])} |" for k in keys), "",
        "<details><summary>full config.json</summary>", "", "```json",
        json.dumps(cfg, indent=2, default=str), "```", "", "</details>", "",
        "## Files", "",
        f"`{sae_id}/cfg.json` and `{sae_id}/sae_weights.safetensors` in the SAELens 6 layout. "
        f"The input scale s = {float(sae.scale):.6g} used in training is folded into the weights: "
        "give the SAE raw activations. Latent values are those of the training code, so decoder "
        "rows have norm 1/s."
        + (" Each token is standardised first (its mean subtracted, divided by its std: SAELens's "
           "normalize_activations layer_norm) and its mean and std are put back after decoding."
           if cfg.get("standardize_tokens") else ""), "",
        "## Load", "", "With SAELens:", "", "```python", "from sae_lens import SAE", "",
        f'sae = SAE.from_pretrained("{repo}", "{sae_id}")', "```", "",
        "With the training scripts (`interop.py`):", "", "```python",
        "from huggingface_hub import snapshot_download", "from interop import load_saelens", "",
        f'sae = load_saelens(snapshot_download("{repo}") + "/{sae_id}")',
        "latents = sae.encode(x); x_hat = sae.decode(latents, x)  "
        "# x: raw activations, shape (tokens, d_in)",
        "```", "",
    ])


def build_hub_folder(run: str | Path | Run, folder: str | Path, repo_id: str | None = None) -> Path:
    """Everything `upload` publishes, written locally: README.md (model card) and <hook_point>/
    holding the final SAE in SAELens's layout (the SAELens sae_id is the hook point)."""
    run, folder = as_run(run), Path(folder)
    sae = _final_sae(run)
    export_saelens(sae, folder / hook_name(sae.cfg))
    (folder / "README.md").write_text(model_card(sae, last_evaluation(run), repo_id))
    return folder


def upload(run: str | Path | Run, repo_id: str, token: str | None = None,
           private: bool = False) -> str:
    """Publish a run's final SAE and model card to the Hugging Face Hub; returns the repo URL. The
    token defaults to huggingface_hub's (HF_TOKEN or `hf auth login`)."""
    from huggingface_hub import HfApi

    run = as_run(run)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_hub_folder(run, tmp, repo_id)
        api = HfApi(token=token)
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder,
                          commit_message=f"Upload SAE {run.cfg['run_name']}")
    return str(url)


