"""Where a run's activations come from: the contract every source keeps (`ActivationSource`), the
stream from a TransformerLens model through a mixing buffer (`ActivationsStore`, docs/math.md §6),
and activations already at hand (`TensorStore`). The synthetic source is in synthetic.py.

The model stream reads text as text.py packs it (position 0, BOS/CLS, never reaches the SAE),
runs the model only up to the deepest hook point (capture.py) and can keep a disk cache (cache.py).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from cache import CACHE_SHARD_TOKENS, ActivationCache
from capture import check_hook_point, model_dims, run_to_hooks
from config import SITES, ConfigError, is_transcoder, resolve_device, validate_cfg
from data_parallel import Stopped, stop_signal, world_size
from text import (
    Prefetched,
    eval_rows_count,
    excluded_token_ids,
    kept_position_mask,
    take_eval_rows,
    training_rows,
)

PREFETCH_BATCHES = 2  # model batches of token rows the prefetching thread may hold ready


class GroundTruth(NamedTuple):
    """A source whose features are known: their directions (n_features, d) and which fired in each
    held-out sample, as (sample, feature) index pairs (2, n_fired)."""

    directions: Tensor
    eval_fired: Tensor


class Downstream(NamedTuple):
    """A source with a model to splice reconstructions into: held-out token rows, the positions that
    train (not BOS/CLS), and rows per forward."""

    model: Any
    tokens: Tensor
    keep: Tensor
    batch: int


class ActivationSource(Protocol):
    """What training, checkpoints and evaluation read of a source of activations. `hook_points` are
    the hook names it serves, in the order of the first axis of its batches; every hook's rows come
    from the same tokens."""

    dims: dict[str, int]  # d_model (the width), n_layers and n_ctx: what config.prepare_cfg checks
    device: torch.device  # where next_batch's batches are
    scales: list[float]  # the input scale s per hook point (docs/math.md §1)
    eval_acts: Tensor  # (n_hooks, N, d), held out: never served by next_batch
    sharded: bool  # under torchrun, each rank reads its own rows (False: training refuses torchrun)
    ground_truth: GroundTruth | None  # known features, for the §10 metrics (None: unknown)
    downstream: Downstream | None  # a model to splice into, for the §5 downstream metrics (or None)

    def hook_index(self, hook_point: str) -> int: ...

    def next_batch(self) -> Tensor:
        """(n_hooks, batch_size, d) float32 on `device`."""

    def state_dict(self) -> dict[str, Any]:
        """What decides the batches to come (a checkpoint saves it; tensors and plain values)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state_dict` was taken."""

    def finish(self) -> None:
        """The run ended (or stopped): write whatever is pending."""


def kept_activations(model, tokens: Tensor, hook_points: Sequence[str], excluded_ids: Tensor,
                     batch_size: int, device: torch.device | str,
                     out_device: torch.device | str) -> Tensor:
    """Float32 activations (n_hooks, n_kept, d) at the kept positions of `tokens`, row-major
    order, from one forward per batch that stops after the deepest hook."""
    out = []
    width = int(model.cfg.d_model)
    for chunk in tokens.split(batch_size):
        acts = run_to_hooks(model, chunk.to(device), hook_points)
        for hook_point, act in zip(hook_points, acts, strict=True):
            if act.dim() != 3 or act.shape[-1] != width:
                raise ConfigError(f"hook point {hook_point!r} gives activations of shape "
                                  f"{tuple(act.shape)}: this project trains on (batch, position, "
                                  f"d_model={width}) hook points, e.g. the sites "
                                  f"{', '.join(SITES)}")
        keep = kept_position_mask(chunk, excluded_ids).to(acts[0].device)
        out.append(torch.stack([a[keep] for a in acts]).float().to(out_device))
    return torch.cat(out, dim=1)


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
        self.dims = model_dims(model)
        self.sharded, self.ground_truth = True, None
        self.shard = shard  # (rank, world size): a rank reads every world-th training row
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
        self._leftover = torch.empty(len(self.hook_points), 0, cfg["act_size"],
                                     device=self.buffer_device)

        buffer_tokens = cfg["num_batches_in_buffer"] * cfg["model_batch_size"] * (self.seq_len - 1)
        self.serve_count = (buffer_tokens // self.batch_size) * self.batch_size  # one block
        if self.serve_count == 0:
            raise ConfigError(f"config num_batches_in_buffer={cfg['num_batches_in_buffer']} "
                              f"is too small: the buffer ({buffer_tokens} tokens) must hold "
                              f"at least batch_size ({self.batch_size})")
        # where the newest model batch began (first token, rows_read, epoch; rows -1: read from the
        # cache), and the buffer's block: its first token and the model batch to regenerate it from
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
        assert len(self.scales) == 1, \
            "a multi-hook store has one scale per hook: use scales[hook_index(...)]"
        return self.scales[0]

    def hook_index(self, hook_point: str) -> int:
        return self.hook_points.index(hook_point)

    # rows ---------------------------------------------------------------------------------

    def _open_rows(self) -> None:
        """A fresh row stream at its start, tokenised and packed ahead by a thread (with its own
        tokenizer: a fast tokenizer must not be called from two threads at once)."""
        if self._rows is not None:
            self._rows.close()
        tokenizer = copy.deepcopy(self.model.tokenizer)
        self._rows = Prefetched(training_rows(tokenizer, self.cfg, self.shard),
                                self.cfg["model_batch_size"], PREFETCH_BATCHES)
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

    @property
    def downstream(self) -> Downstream:
        """The first `downstream_eval_rows` eval rows, to splice reconstructions into the model."""
        rows = self.eval_tokens[: self.cfg["downstream_eval_rows"]]
        return Downstream(self.model, rows, self.kept_positions(rows), self.cfg["model_batch_size"])

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
        for cache, a, old in zip(self.caches, acts, cached, strict=False):  # no caches: no writes
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
            parts = [c.read(self.stream_tokens, stop) for c in self.caches]  # ends may differ
            acts = torch.stack([p[: min(p.shape[0] for p in parts)] for p in parts])
            self.stream_tokens += acts.shape[1]
            if self.stream_tokens == cached_to:  # about to generate: seek rows to the cache's end
                position = next(c for c in self.caches
                                if c.tokens == cached_to).position_after(cached_to)
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

    def finish(self) -> None:
        """Write the caches' partial shards (call when the run ends)."""
        for cache in self.caches:
            cache.flush()

    def _fresh_activations(self, n: int, desc: str | None = None) -> Tensor:
        parts, have = [self._leftover], self._leftover.shape[1]
        bar = tqdm(total=n, desc=desc, unit="tok", leave=False, disable=desc is None)
        while have < n:
            if desc is not None and world_size() == 1 and stop_signal():  # the first fill: step 0
                raise Stopped(0, 0)  # (under torchrun the ranks decide together after their fills)
            acts = self._next_chunk()
            parts.append(acts)
            have += acts.shape[1]
            bar.update(acts.shape[1])
        bar.close()
        allacts = torch.cat(parts, dim=1)
        self._leftover = allacts[:, n:]
        return allacts[:, :n]

    def _block_from_here(self) -> dict[str, int]:
        """Where the next block starts: at the model batch that produced its leading leftover (or,
        with none, the next one); rows -1 if read from the cache (regenerated by reading it)."""
        start = self.stream_tokens - self._leftover.shape[1]
        if self._leftover.shape[1]:
            origin, rows, epoch = self._last_chunk
        else:
            cached = min((c.tokens for c in self.caches), default=0) > start
            origin, rows, epoch = start, -1 if cached else self.rows_read, self.epoch
        return {"start": start, "origin": start if rows < 0 else origin, "rows": rows,
                "epoch": epoch}

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
        self._order = torch.randperm(self.serve_count,
                                     generator=self.generator).to(self.buffer_device)
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
        """Everything that decides the batches still to come, in a few KB: where the block in the
        buffer starts in the stream (and the model batch to regenerate it from), the shuffling
        generator's state before its order was drawn, how much of it was served, and the scales; the
        rest of the stream position follows from the block. A block served to the end is described
        by the next one (so resume fills once)."""
        block, generator, served = dict(self._block), self._order_state, self._served
        if served >= self.serve_count:
            block, generator, served = self._block_from_here(), self.generator.get_state(), 0
        return {"block": block, "order_generator": generator, "served": served,
                "scales": list(self.scales)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state_dict` was taken: regenerate the block from its model batch
        (the row stream re-read from its start, tokenised, not run through the model, so held-out
        rows are skipped in every epoch after the first just as when they were first read) or read
        it from the cache, redraw its order, and skip what was served. Costs one buffer fill."""
        if "block" not in state:
            raise ConfigError("the checkpoint holds the mixing buffer itself (written by an "
                              "earlier version of these scripts): resume it with that version, or "
                              "start a new run")
        block = state["block"]
        cached_to = min((c.tokens for c in self.caches), default=0)
        if block["rows"] < 0 and block["start"] >= cached_to:
            raise ConfigError(f"config cache_dir={self.cfg['cache_dir']!r}: the checkpoint's "
                              f"buffer was read from the activation cache, which no longer holds "
                              f"it; resume with the cache it was written with")
        self.scales = [float(s) for s in state["scales"]]
        self._leftover = self._leftover[:, :0]
        self.stream_tokens = block["origin"]
        if block["rows"] >= 0:
            self.seek_rows(block["rows"])  # silent: only rows served later announce a new epoch
            if self.epoch != block["epoch"]:
                raise ConfigError(f"config dataset_path={self.cfg['dataset_path']!r}: the stream "
                                  f"reaches epoch {self.epoch}, not {block['epoch']}, at the "
                                  f"checkpoint's row {block['rows']}; the data changed since the "
                                  f"checkpoint was written")
        self._fresh_activations(block["start"] - block["origin"])  # model batch up to the block
        self.buffer = None
        self.buffer = self._next_block()
        self._block = dict(block)  # as saved: a block read from the cache stays marked so
        self.generator.set_state(state["order_generator"])
        self._reshuffle()
        self._served = int(state["served"])


# --- activations already at hand ---------------------------------------------------------

def as_float32(rows) -> Tensor:
    """A float32 tensor of `rows` (a tensor or a numpy array, a read-only memmap's included)."""
    return (rows.float() if isinstance(rows, Tensor)
            else torch.from_numpy(np.array(rows, dtype=np.float32)))


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
            raise ConfigError(f"TensorStore takes (tokens, d) activations, "
                              f"got shape {tuple(acts.shape)}")
        if is_transcoder(cfg):
            raise ConfigError("TensorStore serves one hook point: a transcoder "
                              "(target_site / target_hook_point) trains on a model's activations "
                              "through ActivationsStore")
        n_eval = 0 if eval_acts is not None else cfg["eval_tokens"]
        if acts.shape[0] - n_eval < cfg["batch_size"]:
            raise ConfigError(f"TensorStore: {acts.shape[0]} rows leave fewer than "
                              f"batch_size={cfg['batch_size']} to train on after "
                              f"eval_tokens={n_eval}; pass more rows or lower those settings")
        validate_cfg(cfg)
        self.cfg = cfg
        # only d is real; the layer and context checks of prepare_cfg have no model to check against
        self.dims = {"d_model": acts.shape[1], "n_layers": cfg["layer"] + 1,
                     "n_ctx": cfg["seq_len"]}
        self.sharded, self.ground_truth, self.downstream = False, None, None
        self.acts, self.first_row = acts, n_eval
        held_out = acts[:n_eval] if eval_acts is None else eval_acts
        self.eval_acts = as_float32(held_out[:]).unsqueeze(0)
        self.device = torch.device(resolve_device(cfg["device"]))
        self.generator = torch.Generator().manual_seed(cfg["seed"])
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
        return self._rows(idx).to(self.device, non_blocking=True).unsqueeze(0)  # CUDA: no host wait

    def state_dict(self) -> dict[str, Any]:
        return {"order": self._order, "served": self._served, "epoch": self.epoch,
                "generator": self.generator.get_state(), "scales": list(self.scales)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._order, self._served, self.epoch = (state["order"], int(state["served"]),
                                                 int(state["epoch"]))
        self.generator.set_state(state["generator"])
        self.scales = [float(s) for s in state["scales"]]

    def finish(self) -> None:
        pass
