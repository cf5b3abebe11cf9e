"""Latent dashboards from a finished run's held-out eval text, rebuilt as training built it: each
latent's top contexts (firing token marked), its density and the tokens its decoder row promotes."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from activation_store import kept_activations
from capture import is_causal_lm, load_model
from config import EVAL_KEYS, resolve_device
from logs import Run, as_run, load_density
from sae import SAE_CLASSES
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
    acts: Tensor  # (n, d) raw hook activations at the positions the SAE was evaluated on


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
        acts = kept_activations(model, tokens, [cfg["hook_point"]], excluded,
                                cfg["model_batch_size"], device, device)[0]
        _EVAL_SETS[key] = EvalSet(tokens, kept_position_mask(tokens, excluded).nonzero(), acts)
    return _EVAL_SETS[key]


@torch.no_grad()
def latent_activations(run: str | Path | Run, latents: list[int], device: str = "auto",
                       chunk: int = 4096) -> Tensor:
    """(held-out tokens, len(latents)) activations of `latents`, inference encoder, on the CPU."""
    run, device = as_run(run), resolve_device(device)
    sae = run.sae(device)
    bad = [i for i in latents if not 0 <= i < sae.cfg["dict_size"]]
    if bad:
        raise IndexError(f"latent {bad[0]} does not exist: this SAE has "
                         f"{sae.cfg['dict_size']} latents")
    return torch.cat([sae.encode(x)[:, latents].cpu()
                      for x in eval_set(run, device).acts.split(chunk)])


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
    if not is_causal_lm(model) or not hasattr(model, "W_U"):
        return None
    sae = run.sae(device)
    direction = sae.W_dec[latent] / sae.scale  # decode() divides by the input scale
    top = (direction.to(model.W_U.dtype) @ model.W_U).float().topk(n)
    return [(model.tokenizer.decode([i]), v)
            for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)]


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


def write_dashboards(run: Run, folder: Path, n_latents: int, n_contexts: int = 10,
                     device: str = "auto") -> Path:
    """Markdown and HTML dashboards for a few alive latents of a run; returns the markdown file."""
    chosen = dashboard_latents(run, n_latents)
    values = latent_activations(run, list(chosen), device)
    intro = (f"{n_latents} most frequent and {n_latents} random alive latents; top {n_contexts} "
             f"held-out contexts each, the firing token marked.")
    name = run.cfg["run_name"]
    md = [f"# Latent dashboards: {name}", "", intro]
    page = [f"<h1>{html.escape(name)}</h1>", f"<p>{html.escape(intro)}</p>"]
    for column, (latent, why) in enumerate(chosen.items()):
        summary = _summarise(run, latent, values[:, column], device)
        top = _top_contexts(run, latent, values[:, column], n_contexts, device)
        md += ["", f"## latent {latent} ({why})", "", str(summary), "", "```text", str(top), "```"]
        page += [f"<h2>latent {latent} ({why})</h2>", f"<p>{html.escape(str(summary))}</p>",
                 top._repr_html_()]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.html").write_text("<html><meta charset='utf-8'><body>" + "\n".join(page)
                                         + "</body></html>\n")
    (folder / f"{name}.md").write_text("\n".join(md) + "\n")
    return folder / f"{name}.md"
