"""Latent dashboards from a finished run's held-out eval text, rebuilt as training built it: each
latent's top contexts (firing token marked), its density and the tokens its decoder row promotes."""

from __future__ import annotations

import html
import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from activation_store import kept_activations
from capture import is_causal_lm, load_model
from clt import CrossLayerTranscoder, clt_layers
from config import EVAL_KEYS, resolve_device, run_hook_points
from logs import Run, as_run, load_density
from sae import SAE_CLASSES, BaseSAE
from text import eval_token_rows, excluded_token_ids, kept_position_mask

CONTEXT_CHARS = (80, 40)  # characters of text shown before and after a firing token
_MODELS: dict[tuple[str, str, str], Any] = {}
_EVAL_SETS: dict[tuple[str, ...], EvalSet] = {}


def group_ends_of(run: Run) -> list[int] | None:
    cls = SAE_CLASSES.get(run.cfg["sae_type"])
    return cls.group_ends(run.cfg) if cls else None


def latent_group(run: str | Path | Run, latent: int) -> str | None:
    """'group g of G (latents a-b)' for a variant with groups of latents (Matryoshka), else None."""
    ends = group_ends_of(as_run(run))
    if not ends:
        return None
    g = int(np.searchsorted(np.array(ends), latent, side="right"))
    return f"group {g + 1} of {len(ends)} (latents {([0, *ends])[g]}-{ends[g] - 1})"


@dataclass
class EvalSet:
    tokens: Tensor  # (rows, seq_len) the held-out rows
    where: Tensor  # (n, 2) row and position of each activation below
    acts: Tensor  # (n, d) raw hook activations at the positions the SAE was evaluated on; a
    # CLT's (layers, n, d)


def get_model(model_name: str, device: str = "cpu", dtype: str = "float32"):
    """Boot a model once per process, so dashboards for many latents and runs share it."""
    key = (model_name, device, dtype)
    if key not in _MODELS:
        _MODELS[key] = load_model(model_name, device, dtype)
    return _MODELS[key]


def _model_of(run: Run, device: str):
    return get_model(run.cfg["model_name"], device, run.cfg.get("model_dtype", "float32"))


def eval_set(run: str | Path | Run, device: str = "auto") -> EvalSet:
    """The run's held-out rows and activations, as its store built them; cached per stream."""
    run, device = as_run(run), resolve_device(device)
    key = (device, *(str(run.cfg.get(k)) for k in EVAL_KEYS))
    if key not in _EVAL_SETS:
        model, cfg = _model_of(run, device), run.cfg
        tokens = eval_token_rows(model.tokenizer, cfg)
        excluded = excluded_token_ids(model.tokenizer, cfg["exclude_special_tokens"])
        acts = kept_activations(model, tokens, run_hook_points(cfg)[0], excluded,
                                cfg["model_batch_size"], device, device)
        acts = acts if cfg.get("cross_layer") else acts[0]  # (hooks, n, d): a CLT reads each
        _EVAL_SETS[key] = EvalSet(tokens, kept_position_mask(tokens, excluded).nonzero(), acts)
    return _EVAL_SETS[key]


@torch.no_grad()
def latent_activations(run: str | Path | Run, latents: list[int], device: str = "auto",
                       chunk: int = 4096) -> Tensor:
    """(held-out tokens, len(latents)) activations of `latents`, inference encoder, on the CPU."""
    run, device = as_run(run), resolve_device(device)
    sae = run.sae(device)
    bad = [i for i in latents if not 0 <= i < latent_count(sae)]
    if bad:
        raise IndexError(f"latent {bad[0]} does not exist: this SAE has "
                         f"{latent_count(sae)} latents")
    return torch.cat([flat_encode(sae, x)[:, latents].cpu()
                      for x in eval_set(run, device).acts.split(chunk, dim=-2)])


def flat_encode(sae: BaseSAE | CrossLayerTranscoder, x: Tensor) -> Tensor:
    """(tokens, latents); a CLT's latents numbered layer by layer (layer n's latent i is n·m + i,
    as its saved density)."""
    f = sae.encode(x)
    return f.permute(1, 0, 2).flatten(1) if isinstance(sae, CrossLayerTranscoder) else f


def latent_count(sae: BaseSAE | CrossLayerTranscoder) -> int:
    layers = len(sae.layers) if isinstance(sae, CrossLayerTranscoder) else 1
    return sae.cfg["dict_size"] * layers


def raw_decoder(sae: BaseSAE | CrossLayerTranscoder) -> Tensor:
    """(latents, d) each latent's decoder row in its target's raw units (a CLT's: into its own
    layer), as decode() divides by the scale."""
    if isinstance(sae, CrossLayerTranscoder):
        return torch.cat([raw_decoder(layer) for layer in sae.layers])
    return sae.W_dec.detach() / (sae.target_scale if sae.transcoder else sae.scale)


def latent_place(run: Run, latent: int) -> str | None:
    """A CLT latent's layer, or its group for a variant with groups (Matryoshka), else None."""
    if not run.cfg.get("cross_layer"):
        return latent_group(run, latent)
    m = run.cfg["dict_size"]
    return f"layer {clt_layers(run.cfg)[latent // m]} (its latent {latent % m})"


def _one_line(text: str) -> str:
    return text.replace("\n", " ↵ ")


@dataclass
class Context:
    row: int  # held-out row
    position: int  # the firing token's position in the row
    activation: float
    before: str
    token: str
    after: str

    def marked(self, left: str = "[[", right: str = "]]") -> str:
        return _one_line(self.before) + left + _one_line(self.token) + right + _one_line(self.after)


@dataclass
class TopActivations:
    """The held-out contexts where a latent fires hardest; text in a terminal, HTML in notebooks."""

    run_name: str
    latent: int
    contexts: list[Context]

    def header(self) -> str:
        return (f"latent {self.latent} of {self.run_name}: top {len(self.contexts)} "
                "held-out activations")

    def __str__(self) -> str:
        return "\n".join([self.header(),
                          *(f"{c.activation:9.3f}  {c.marked()}" for c in self.contexts)])

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td style='text-align:right'>{c.activation:.3f}</td><td style='text-align:left'>"
            f"<code>{html.escape(_one_line(c.before))}<mark><b>{html.escape(_one_line(c.token))}"
            f"</b></mark>{html.escape(_one_line(c.after))}</code></td></tr>" for c in self.contexts)
        return (f"<div><p><b>{html.escape(self.header())}</b></p><table><tr><th>activation</th>"
                f"<th style='text-align:left'>context (firing token marked)</th></tr>"
                f"{rows}</table></div>")


def _split_context(tokenizer, ids: list[int], at: int) -> tuple[str, str, str]:
    """Text before, of and after token `at`: the row decoded as a whole (so sub-words and spacing
    read as in the text), then cut at word boundaries to about CONTEXT_CHARS either side."""
    before, upto, full = (tokenizer.decode(ids[:i]) for i in (at, at + 1, len(ids)))
    if not (upto.startswith(before) and full.startswith(upto)):  # decoding is not prefix-stable
        before, upto = before, before + tokenizer.decode(ids[at:at + 1])
        full = upto + tokenizer.decode(ids[at + 1:])
    token, after = upto[len(before):], full[len(upto):]
    stripped = token.lstrip()
    before += token[:len(token) - len(stripped)]
    before_chars, after_chars = CONTEXT_CHARS
    if len(before) > before_chars:
        tail = before[-before_chars:]
        before = tail[tail.find(" ") + 1:]
    if len(after) > after_chars and " " in after[1:after_chars]:
        after = after[:after.rfind(" ", 1, after_chars)]
    return before, stripped, after


def _top_contexts(run: Run, latent: int, values: Tensor, n: int, device: str) -> TopActivations:
    ev, tokenizer = eval_set(run, device), _model_of(run, resolve_device(device)).tokenizer
    top = values.topk(min(n, int((values != 0).sum())))
    contexts = []
    for value, index in zip(top.values.tolist(), top.indices.tolist(), strict=True):
        row, pos = ev.where[index].tolist()
        text = _split_context(tokenizer, ev.tokens[row, 1:].tolist(), pos - 1)  # pos 0 is BOS/CLS
        contexts.append(Context(row, pos, value, *text))
    return TopActivations(run.cfg["run_name"], latent, contexts)


def top_activations(run: str | Path | Run, latent: int, n: int = 20,
                    device: str = "auto") -> TopActivations:
    """The n held-out contexts where `latent` fires hardest (fewer if it fires on fewer tokens)."""
    run = as_run(run)
    return _top_contexts(run, latent, latent_activations(run, [latent], device)[:, 0], n, device)


@dataclass
class LatentSummary:
    run_name: str
    latent: int
    density: float  # fraction of held-out tokens it fires on (saved with the final checkpoint)
    mean_activation: float  # mean activation over the held-out tokens where it fires; nan if none
    promoted_tokens: list[tuple[str, float]] | None  # logit per unit activation; None: no W_U
    group: str | None = None  # its group of latents, for a variant that has groups (Matryoshka)

    def __str__(self) -> str:
        promoted = ("none (not a language model with an unembedding)"
                    if self.promoted_tokens is None
                    else ", ".join(f"{tok!r} {value:+.2f}" for tok, value in self.promoted_tokens))
        group = f" ({self.group})" if self.group else ""
        return (f"latent {self.latent}{group} of {self.run_name}: density {self.density:.4g}, "
                f"mean activation when firing {self.mean_activation:.4g}; "
                f"promoted tokens: {promoted}")


@torch.no_grad()
def promoted_tokens(run: str | Path | Run, latent: int, n: int = 10,
                    device: str = "auto") -> list[tuple[str, float]] | None:
    """The tokens whose logits the latent's raw-space decoder direction raises most through the
    unembedding (direct path, final layer norm ignored); None for models without one (encoders)."""
    run, device = as_run(run), resolve_device(device)
    model = _model_of(run, device)
    W_U = unembedding(model)
    if W_U is None:
        return None
    return token_effects(raw_decoder(run.sae(device))[latent], W_U, model.tokenizer, n).promoted


def _summarise(run: Run, latent: int, values: Tensor, device: str) -> LatentSummary:
    firing = values[values != 0]
    mean = firing.mean().item() if firing.numel() else float("nan")
    return LatentSummary(run.cfg["run_name"], latent, float(load_density(run)[latent]), mean,
                         promoted_tokens(run, latent, device=device), latent_group(run, latent))


def latent_summary(run: str | Path | Run, latent: int, device: str = "auto") -> LatentSummary:
    """Density, mean activation when firing, and the tokens the decoder direction promotes."""
    run = as_run(run)
    return _summarise(run, latent, latent_activations(run, [latent], device)[:, 0], device)


def dashboard_latents(run: str | Path | Run, n: int = 3, seed: int = 0) -> dict[int, str]:
    """The n most frequent alive latents and n other alive ones at random: {latent: why}."""
    density = load_density(run)
    alive = (density > 0).nonzero().flatten()
    frequent = alive[density[alive].argsort(descending=True)][:n].tolist()
    others = np.array(sorted(set(alive.tolist()) - set(frequent)), dtype=int)
    drawn = np.random.default_rng(seed).choice(others, size=min(n, len(others)),
                                               replace=False).tolist()
    return {i: "most frequent" for i in frequent} | {int(i): "random alive" for i in sorted(drawn)}


# --- the one pass over the held-out set -----------------------------------------------------


class Gathered(NamedTuple):
    count: Tensor  # (m,) held-out tokens each latent fires on
    max: Tensor  # (m,) its largest held-out activation (0 if it never fires)
    values: Tensor  # (tokens, len(shown)) every held-out activation of the shown latents


@torch.no_grad()
def gather(sae: BaseSAE, acts: Tensor, shown: list[int], chunk: int = 4096) -> Gathered:
    """Firing counts and maxima of every latent and the full columns of the shown ones, in one
    streamed pass (the (tokens, m) latents never exist at once)."""
    m, device = latent_count(sae), next(sae.parameters()).device
    count, top = torch.zeros(m, device=device), torch.zeros(m, device=device)
    columns, index = [], torch.tensor(shown, dtype=torch.long, device=device)
    scratch = None
    for x in tqdm(acts.split(chunk, dim=-2), desc="dashboard pass", unit="chunk", leave=False):
        f = flat_encode(sae, x.to(device))
        if scratch is None or scratch.shape != f.shape:
            scratch = torch.empty_like(f)
        count += torch.gt(f, 0, out=scratch).sum(0)  # a float output: CPU bool compares are slow
        torch.maximum(top, f.amax(0), out=top)
        columns.append(f[:, index].cpu())
    return Gathered(count.cpu(), top.cpu(), torch.cat(columns))


class Band(NamedTuple):
    low: float  # the band's smallest and largest firing activation
    high: float
    indices: list[int]  # held-out activations drawn from it, highest first


def quantile_bands(values: Tensor, n_bands: int, per_band: int, seed: int = 0) -> list[Band]:
    """The firing activations of one latent cut into n_bands equal-count bands (by quantile),
    lowest first, and up to per_band of each drawn at random."""
    firing = values.nonzero().flatten()
    if not firing.numel():
        return []
    order = firing[values[firing].argsort()]
    cuts = [round(b * len(order) / n_bands) for b in range(n_bands + 1)]
    generator, bands = torch.Generator().manual_seed(seed), []
    for lo, hi in itertools.pairwise(cuts):
        if hi <= lo:
            continue
        drawn = order[lo:hi][torch.randperm(hi - lo, generator=generator)[:per_band]]
        drawn = drawn[values[drawn].argsort(descending=True)]
        bands.append(Band(values[order[lo]].item(), values[order[hi - 1]].item(), drawn.tolist()))
    return bands


class Neighbour(NamedTuple):
    latent: int
    cosine: float


def decoder_neighbours(W_dec: Tensor, latents: list[int], n: int) -> list[list[Neighbour]]:
    """For each latent, the n others whose decoder rows have the largest cosine with its own."""
    unit = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = unit[latents] @ unit.T
    cos[torch.arange(len(latents)), torch.tensor(latents)] = -2.0  # never itself
    top = cos.topk(min(n, W_dec.shape[0] - 1), dim=1)
    return [[Neighbour(j, c) for j, c in zip(ids, cs, strict=True)]
            for ids, cs in zip(top.indices.tolist(), top.values.tolist(), strict=True)]


class TokenEffects(NamedTuple):
    promoted: list[tuple[str, float]]  # (token, logit per unit activation), largest first
    suppressed: list[tuple[str, float]]  # most negative first


def unembedding(model) -> Tensor | None:
    """The model's (d, vocab) unembedding, or None for one without (an encoder)."""
    return model.W_U if is_causal_lm(model) and hasattr(model, "W_U") else None


def token_effects(direction: Tensor, W_U: Tensor, tokenizer, n: int) -> TokenEffects:
    """The tokens whose logits a raw-space decoder direction raises and lowers most through the
    unembedding (direct path, final layer norm ignored)."""
    logits = (direction.to(W_U.dtype) @ W_U).float()
    up, down = logits.topk(n), logits.topk(n, largest=False)
    return TokenEffects(*([(tokenizer.decode([i]), v) for v, i in
                           zip(t.values.tolist(), t.indices.tolist(), strict=True)]
                          for t in (up, down)))


# --- HTML ----------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:17px;margin-top:24px}h3{font-size:14px;margin:14px 0 4px}
table{border-collapse:collapse;font-size:13px}td,th{padding:2px 10px;text-align:right}
th{cursor:pointer;background:#f2f2f2;position:sticky;top:0}tr:nth-child(even){background:#fafafa}
tr.hit,tr:target{background:#ffe9a8}.muted{color:#777}.row{display:flex;gap:40px;flex-wrap:wrap}
.ctx{font-family:ui-monospace,monospace;font-size:13px;white-space:pre-wrap;margin:2px 0;
line-height:1.7}.ctx .v{display:inline-block;width:64px;text-align:right;color:#555;
margin-right:8px}
.tok{border-radius:2px}.fire{outline:1.5px solid #c04000}.nav a{margin-right:14px}
"""
SORT_JS = """
function sortBy(col){const t=document.getElementById('latents'),b=t.tBodies[0];
const rows=[...b.rows],asc=t.dataset.col==col&&t.dataset.dir!='asc';
const v=(r)=>parseFloat(r.cells[col].dataset.v);
rows.sort((x,y)=>(v(x)-v(y))*(asc?1:-1));
t.dataset.col=col;t.dataset.dir=asc?'asc':'desc';b.append(...rows);}
function jump(){const i=parseInt(document.getElementById('n').value);
if(isNaN(i))return false;if(PAGES.has(i)){location.href='latent_'+i+'.html';return false;}
const r=document.getElementById('L'+i);if(!r){alert('no latent '+i);return false;}
document.querySelectorAll('tr.hit').forEach(e=>e.classList.remove('hit'));
r.classList.add('hit');r.scrollIntoView({block:'center'});return false;}
"""


def _page(title: str, body: list[str], script: str = "") -> str:
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style>"
            f"<script>{script}</script></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _shade(value: float, top: float) -> str:
    alpha = 0.0 if not value > 0 or top <= 0 else min(1.0, value / top)
    return f"background:rgba(255,110,0,{alpha:.3f})"


def shaded_tokens(pieces: list[str], values: list[float], top: float, fire: int | None) -> str:
    """Tokens as spans shaded by activation / top, the value on hover (nan: not scored)."""
    spans = []
    for j, (piece, v) in enumerate(zip(pieces, values, strict=True)):
        title = "not scored" if math.isnan(v) else f"{v + 0.0:.6g}"  # + 0.0: no "-0"
        cls = "tok fire" if j == fire else "tok"
        text = _one_line(piece)
        word = text.lstrip(" ")  # the space before a word stays unshaded
        spans.append(f"{' ' * (len(text) - len(word))}<span class='{cls}' title='{title}' "
                     f"style='{_shade(v, top)}'>{html.escape(word)}</span>")
    return "".join(spans)


def histogram_svg(values: Tensor, what: str = "firing tokens", bins: int = 40, width: int = 460,
                  height: int = 150) -> str:
    """Inline SVG histogram of `values` (log count), the count on hover; callers pass the firing
    ones (a latent's non-zero activations, the log10 densities of the latents that fire)."""
    if not values.numel():
        return "<p class='muted'>never fires on the held-out tokens</p>"
    low, top = values.min().item(), values.max().item()
    counts = torch.histc(values, bins=bins, min=low, max=top).tolist()
    peak = math.log1p(max(counts))
    bar, plot_h = width / bins, height - 18
    rects = []
    for b, c in enumerate(counts):
        h = plot_h * math.log1p(c) / peak
        lo, hi = low + (top - low) * b / bins, low + (top - low) * (b + 1) / bins
        rects.append(f"<rect x='{b * bar:.1f}' y='{plot_h - h:.1f}' width='{bar - 1:.1f}' "
                     f"height='{h:.1f}' fill='#e07020'><title>{lo:.3g}-{hi:.3g}: {int(c)}"
                     "</title></rect>")
    return (f"<svg width='{width}' height='{height}' role='img'>{''.join(rects)}"
            f"<text x='0' y='{height - 3}' font-size='11'>{low:.3g}</text><text x='{width}' "
            f"y='{height - 3}' font-size='11' text-anchor='end'>{top:.3g}</text></svg>"
            f"<div class='muted'>{values.numel()} {what}; bar height: log(1 + count)</div>")


def _token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text as it reads in the decoded window (sub-words joined, spaces kept)."""
    texts = [tokenizer.decode(ids[:j]) for j in range(len(ids) + 1)]
    if all(b.startswith(a) for a, b in itertools.pairwise(texts)):
        pieces = [b[len(a):] for a, b in itertools.pairwise(texts)]
    else:  # decoding is not prefix-stable
        pieces = [tokenizer.decode([i]) for i in ids]
    if pieces and pieces[0].startswith("##"):  # a WordPiece window that opens mid-word
        pieces[0] = pieces[0][2:]
    return pieces


class ContextWindow(NamedTuple):
    activation: float
    row: int  # held-out row, and the position of the first piece in it
    start: int
    pieces: list[str]
    values: list[float]  # the latent's activation at each piece (nan where not scored)
    fire: int  # the piece it was drawn for


WINDOW = (16, 6)  # tokens shown before and after the token a context was drawn for


def context_windows(tokenizer, tokens: Tensor, grid: Tensor, ev_where: Tensor,
                    indices: list[int]) -> list[ContextWindow]:
    """The windows around held-out activations `indices`; grid: (rows, seq_len) the latent's
    activation at every position (nan where not scored)."""
    out = []
    for i in indices:
        row, pos = ev_where[i].tolist()
        lo, hi = max(1, pos - WINDOW[0]), min(tokens.shape[1], pos + WINDOW[1] + 1)
        pieces = _token_pieces(tokenizer, tokens[row, lo:hi].tolist())
        out.append(ContextWindow(grid[row, pos].item(), row, lo, pieces,
                                 grid[row, lo:hi].tolist(), pos - lo))
    return out


def _contexts_html(windows: list[ContextWindow], top: float) -> str:
    return "".join(f"<div class='ctx' data-at='{w.row} {w.start}'><span class='v'>"
                   f"{w.activation:.3f}</span>"
                   f"{shaded_tokens(w.pieces, w.values, top, w.fire)}</div>" for w in windows)


def _effects_html(effects: TokenEffects | None) -> str:
    if effects is None:
        return ("<p class='muted'>no promoted or suppressed tokens: the model is an encoder "
                "without an unembedding</p>")
    cols = []
    for name, pairs in (("promoted", effects.promoted), ("suppressed", effects.suppressed)):
        rows = "".join(f"<tr><td style='text-align:left'><code>{html.escape(repr(t))}</code></td>"
                       f"<td>{v:+.3g}</td></tr>" for t, v in pairs)
        cols.append(f"<div><h3>{name}</h3><table>{rows}</table></div>")
    return ("<div class='row'>" + "".join(cols) + "</div><p class='muted'>logit per unit "
            "activation through the unembedding (direct path, final layer norm ignored)</p>")


class LatentPage(NamedTuple):
    latent: int
    why: str
    density: float
    max: float
    mean: float  # mean activation where it fires
    group: str | None  # its Matryoshka group or CLT layer
    histogram: str  # inline SVG
    top: list[ContextWindow]
    bands: list[tuple[Band, list[ContextWindow]]]
    neighbours: list[Neighbour]
    effects: TokenEffects | None


def _latent_html(run_name: str, page: LatentPage, shown: list[int]) -> str:
    def link(j: int) -> str:
        target = f"latent_{j}.html" if j in shown else f"index.html#L{j}"
        return f"<a href='{target}'>{j}</a>"
    at = shown.index(page.latent)
    nav = ["<a href='index.html'>index</a>"]
    nav += [f"<a href='latent_{shown[at - 1]}.html'>previous</a>"] if at > 0 else []
    nav += [f"<a href='latent_{shown[at + 1]}.html'>next</a>"] if at + 1 < len(shown) else []
    group = f"; {html.escape(page.group)}" if page.group else ""
    neighbours = "".join(f"<tr><td>{link(nb.latent)}</td><td>{nb.cosine:.3f}</td></tr>"
                         for nb in page.neighbours)
    bands = "".join(f"<h3>quantile band {b + 1} of {len(page.bands)}: activations "
                    f"{band.low:.3g} to {band.high:.3g}</h3>" + _contexts_html(ws, page.max)
                    for b, (band, ws) in enumerate(page.bands))
    body = [f"<div class='nav'>{''.join(nav)}</div>",
            f"<h1>latent {page.latent} <span class='muted'>({html.escape(page.why)})</span></h1>",
            f"<p>{html.escape(run_name)}<br>density {page.density:.4g}; max activation "
            f"{page.max:.4g}; mean when firing {page.mean:.4g}{group}</p>",
            "<div class='row'><div><h2>activations on held-out tokens</h2>"
            f"{page.histogram}</div><div><h2>nearest latents by decoder cosine</h2>"
            f"<table><tr><th>latent</th><th>cosine</th></tr>{neighbours}</table></div></div>",
            f"<h2>tokens the decoder promotes and suppresses</h2>{_effects_html(page.effects)}",
            f"<h2>top {len(page.top)} contexts</h2><p class='muted'>each token shaded by this "
            "latent's activation (hover for the value); outlined: the token drawn</p>"
            f"{_contexts_html(page.top, page.max)}",
            f"<h2>contexts from activation quantiles</h2>{bands}"]
    return _page(f"latent {page.latent}: {run_name}", body)


def _index_html(run_name: str, gathered: Gathered, n_tokens: int, places: list[str | None],
                shown: dict[int, str]) -> str:
    density, top = (gathered.count / n_tokens).tolist(), gathered.max.tolist()
    order = sorted(range(len(density)), key=lambda i: -density[i])
    rows = []
    for i in order:
        name = f"<a href='latent_{i}.html'>{i}</a>" if i in shown else str(i)
        rows.append(f"<tr id='L{i}'><td data-v='{i}'>{name}</td><td data-v='{density[i]}'>"
                    f"{density[i]:.4g}</td><td data-v='{top[i]}'>{top[i]:.4g}</td>"
                    + (f"<td style='text-align:left'>{places[i]}</td>" if places[0] else "")
                    + f"<td style='text-align:left'>{shown.get(i, '')}</td></tr>")
    dead = sum(d == 0 for d in density)
    head = "".join(f"<th onclick='sortBy({c})'>{h}</th>" for c, h in
                   enumerate(["latent", "density", "max activation"]))
    place = "layer" if places[0] and places[0].startswith("layer") else "group"
    head += (f"<th>{place}</th>" if places[0] else "") + "<th>page (why shown)</th>"
    pages = ",".join(map(str, shown))
    body = [f"<h1>latent dashboards: {html.escape(run_name)}</h1>",
            f"<p>{len(density)} latents ({dead} never fire on them) on {n_tokens} held-out tokens; "
            f"pages for the {len(shown)} linked. Click a column to sort.</p>",
            "<h2>log10 density of the latents that fire</h2>",
            histogram_svg(torch.tensor(density)[gathered.count > 0].clamp_min(1e-12).log10(),
                          "latents"),
            "<form onsubmit='return jump()'>latent <input id='n' type='number' min='0' "
            f"max='{len(density) - 1}'> <button>go</button></form>",
            f"<table id='latents' data-col='1' data-dir='desc'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>"]
    return _page(f"dashboards: {run_name}", body, f"const PAGES=new Set([{pages}]);{SORT_JS}")


class Dashboards(NamedTuple):
    index: Path  # the folder's index.html
    markdown: Path  # the plain-text summary beside it
    shown: list[int]
    seconds: dict[str, float]  # held-out set, the pass, the pages


@torch.no_grad()
def write_dashboards(run: Run, folder: Path, n_latents: int, n_contexts: int = 10,
                     device: str = "auto", n_bands: int = 5, per_band: int = 4,
                     n_neighbours: int = 8, n_tokens: int = 10) -> Dashboards:
    """folder/<run>/: index.html (every latent by density) and latent_<i>.html for the n_latents
    most frequent and n_latents random alive latents; folder/<run>.md: their plain summaries."""
    device, name, clock = resolve_device(device), run.cfg["run_name"], time.perf_counter()
    chosen = dashboard_latents(run, n_latents)
    shown = list(chosen)
    ev, model, sae = eval_set(run, device), _model_of(run, device), run.sae(device)
    seconds = {"held-out set": time.perf_counter() - clock}
    gathered = gather(sae, ev.acts, shown)
    seconds["pass"] = time.perf_counter() - clock - sum(seconds.values())
    n_held = ev.acts.shape[-2]
    m = latent_count(sae)
    places = ([latent_place(run, i) for i in range(m)]
              if group_ends_of(run) or run.cfg.get("cross_layer") else [None] * m)
    W_U = unembedding(model)
    decoder = raw_decoder(sae)
    neighbours = decoder_neighbours(decoder, shown, n_neighbours)
    out = folder / name
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# Latent dashboards: {name}", "",
          f"{n_latents} most frequent and {n_latents} random alive latents; top {n_contexts} "
          f"held-out contexts each, the firing token marked. HTML: {name}/index.html"]
    for c, latent in enumerate(tqdm(shown, desc="dashboard pages", leave=False)):
        values = gathered.values[:, c]
        grid = torch.full(tuple(ev.tokens.shape), float("nan"))
        grid[ev.where[:, 0], ev.where[:, 1]] = values
        firing = values[values != 0]
        top_ids = values.topk(min(n_contexts, firing.numel())).indices.tolist()
        bands = quantile_bands(values, n_bands, per_band, seed=latent)
        effects = None if W_U is None else token_effects(
            decoder[latent], W_U, model.tokenizer, n_tokens)
        page = LatentPage(
            latent, chosen[latent], firing.numel() / n_held, gathered.max[latent].item(),
            firing.mean().item() if firing.numel() else float("nan"), places[latent],
            histogram_svg(firing),
            context_windows(model.tokenizer, ev.tokens, grid, ev.where, top_ids),
            [(b, context_windows(model.tokenizer, ev.tokens, grid, ev.where, b.indices))
             for b in bands],
            neighbours[c], effects)
        (out / f"latent_{latent}.html").write_text(_latent_html(name, page, shown))
        summary = LatentSummary(name, latent, page.density, page.mean,
                                effects.promoted if effects else None, page.group)
        md += ["", f"## latent {latent} ({chosen[latent]})", "", str(summary), "", "```text",
               str(_top_contexts(run, latent, values, n_contexts, device)), "```"]
    (out / "index.html").write_text(_index_html(name, gathered, n_held, places, chosen))
    (folder / f"{name}.md").write_text("\n".join(md) + "\n")
    seconds["pages"] = time.perf_counter() - clock - sum(seconds.values())
    return Dashboards(out / "index.html", folder / f"{name}.md", shown, seconds)
