"""What each step keeps true per latent besides Adam's update: its decoder vector at unit norm
(docs/math.md §2; a CLT latent's decoders to all its targets together, §12), no Adam step for a
latent that got no gradient (lazy_adam), and the dead-latent counters AuxK reads (§4)."""

from __future__ import annotations

import torch
from torch import Tensor

from base_sae import BaseSAE
from clt import CrossLayerTranscoder
from kernels import SparseLatents


def latent_blocks(sae: BaseSAE | CrossLayerTranscoder) -> list[tuple[BaseSAE, list[Tensor]]]:
    """Each set of latents with its decoder parts, whose rows together are one latent's decoder
    vector: an SAE's W_dec; per layer of a CLT, its decoders to its own and the later layers."""
    return sae.latent_blocks() if isinstance(sae, CrossLayerTranscoder) else [(sae, [sae.W_dec])]


def block_latents(sae: BaseSAE | CrossLayerTranscoder, f: Tensor | SparseLatents) -> list:
    """A step's latents per block of `latent_blocks` (a CLT's are (L, B, m))."""
    return list(f) if isinstance(sae, CrossLayerTranscoder) else [f]


@torch.no_grad()
def remove_parallel_decoder_grad(decoder: list[Tensor]) -> None:
    """Before the step: drop each latent's decoder gradient component along its decoder vector."""
    if len(decoder) == 1:
        w = decoder[0]
        if w.grad is None:
            return
        # g -= (g.w / w.w) w for each row w: two reads and one in-place pass
        coef = torch.linalg.vecdot(w.grad, w) / torch.linalg.vecdot(w, w)
        w.grad.addcmul_(w, coef.unsqueeze(1), value=-1)
        return
    parts = [w for w in decoder if w.grad is not None]
    if not parts:
        return
    coef = (sum(torch.linalg.vecdot(w.grad.flatten(1), w.flatten(1)) for w in parts)
            / sum(torch.linalg.vecdot(w.flatten(1), w.flatten(1)) for w in decoder))
    for w in parts:
        w.grad.sub_(w * coef.view(-1, *[1] * (w.dim() - 1)))


@torch.no_grad()
def normalize_decoder(decoder: list[Tensor]) -> None:
    """After the step: put every latent's decoder vector back on the unit sphere."""
    if len(decoder) == 1:
        decoder[0] /= decoder[0].norm(dim=-1, keepdim=True)
        return
    norm = sum(w.flatten(1).pow(2).sum(-1) for w in decoder).sqrt()
    for w in decoder:
        w /= norm.view(-1, *[1] * (w.dim() - 1))


@torch.no_grad()
def mark_fired(sae: BaseSAE, fired: Tensor, n_tokens: int) -> None:
    """Count `n_tokens` more training tokens for every latent, and reset those that fired."""
    sae.tokens_since_fired += n_tokens
    sae.tokens_since_fired.masked_fill_(fired, 0)


@torch.no_grad()
def zero_idle_momentum(optimizer: torch.optim.Optimizer, sae: BaseSAE,
                       extra: list[Tensor] = ()) -> None:
    """lazy_adam: a latent that got no gradient this step (it fired on no token and AuxK
    did not pick it) takes no Adam step: its first moment is zeroed, so momentum from its
    last firing cannot keep pushing it away from the data, the way latents die at high
    learning rates (lazy / sparse Adam does the same for embedding rows). A latent is
    idle when its b_enc gradient is exactly 0; a per-latent vector (JumpReLU's threshold)
    goes by its own gradient; `extra`: more parameters indexed by latent first (a CLT layer's
    decoders to later layers). No host sync on CUDA."""
    if sae.b_enc.grad is None:
        return
    idle = sae.b_enc.grad == 0
    # on CPU only the idle latents' slices are touched (the host reads which): a masked fill
    # would pass over every (m, d) moment
    idle_idx = None if idle.is_cuda else idle.nonzero().squeeze(1)
    for param in extra:
        state = optimizer.state.get(param, {})
        if param.grad is None or "exp_avg" not in state:
            continue
        if idle_idx is not None:
            state["exp_avg"].index_fill_(0, idle_idx, 0)
        else:
            state["exp_avg"].masked_fill_(idle.view(-1, *[1] * (param.dim() - 1)), 0)
    for name, dim in sae.latent_params:
        param = getattr(sae, name)
        state = optimizer.state.get(param, {})
        if param.grad is None or "exp_avg" not in state:
            continue
        if param.dim() == 1:
            state["exp_avg"].masked_fill_(param.grad == 0, 0)
        elif idle_idx is not None:
            state["exp_avg"].index_fill_(dim, idle_idx, 0)
        else:
            state["exp_avg"].masked_fill_(idle.unsqueeze(1 - dim), 0)
