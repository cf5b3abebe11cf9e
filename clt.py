"""Cross-layer transcoders (docs/math.md §12): the latents of layer i read that layer's input hook
and write to the target hook of layer i and of every later layer of the range.

A CLT is the chosen variant's module once per layer, with its math unchanged (activation, penalty,
AuxK, inference threshold, input and target scales, skip connection), plus the decoders to later
layers. Layer n's module keeps its own W_dec (m, d), the decoder to its own target; `W_dec_later[n]`
(m, L - 1 - n, d) writes the same latents to the later targets. In the scaled space

    y_hat_t = sum_{n <= t} f_n D[n -> t] + b_dec_t  (+ x_t W_skip_t),  D[t -> t] = layers[t].W_dec

and the loss sums every target's squared error (each target in its own scaled space, so every layer
counts alike), the layers' sparsity penalties and their AuxK terms. Each latent's decoder vectors
to all its targets, concatenated, have unit norm: the constraint a single-layer SAE's unit rows are
the L = 1 case of, so the variants' penalties keep their meaning.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from base_sae import SAE_CLASSES, BaseSAE, SAEOutput
from kernels import sparse_cross_layer_forward
from keys import ConfigError


def clt_layers(cfg: dict[str, Any]) -> list[int]:
    """The model layers of a CLT: `layers` "a:b" (inclusive), or every layer for ""."""
    text, n_layers = cfg["layers"].strip(), cfg["n_layers"]
    if not text:
        return list(range(n_layers))
    first, sep, last = text.partition(":")
    if not (sep and first.strip().isdigit() and last.strip().isdigit()):
        raise ConfigError(f"config layers={text!r} must be a:b, the first and last layer of the "
                          f"CLT (e.g. 0:{n_layers - 1}), or \"\" for all layers")
    first_i, last_i = int(first), int(last)
    if not first_i <= last_i < n_layers:
        raise ConfigError(f"config layers={text!r} is outside the model's layers 0..{n_layers - 1} "
                          "(or its first layer is after its last)")
    return list(range(first_i, last_i + 1))


class CrossLayerTranscoder(nn.Module):
    """One module of the variant per layer of the range, and the decoders to later layers.
    Inputs and targets are (L, B, d): layer-major, as the store's batches are."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        self.cfg = dict(cfg)
        self.variant: type[BaseSAE] = SAE_CLASSES[cfg["sae_type"]]
        assert self.variant.cross_layer_ok, f"sae_type {cfg['sae_type']} cannot be a CLT"
        self.layer_ids = clt_layers(cfg)
        n_layers, m, d = len(self.layer_ids), cfg["dict_size"], cfg["act_size"]
        # layer n starts as a transcoder of seed + n would: decoders to later layers at 0
        self.layers = nn.ModuleList(self.variant(cfg | {"seed": cfg["seed"] + n})
                                    for n in range(n_layers))
        # cross_layer_writes false: none (per-layer transcoders, the CLT's baseline)
        self.W_dec_later = nn.ParameterList(nn.Parameter(torch.zeros(m, n_layers - 1 - n, d))
                                            for n in range(n_layers - 1)
                                            if cfg.get("cross_layer_writes", True))
        self.sparsity_coeff: float | Tensor = 0.0  # set each step (schedule.SparsityCoefficient)

    def latent_blocks(self) -> list[tuple[BaseSAE, list[nn.Parameter]]]:
        """Each layer's module with its decoder parts: one latent's rows of them, together, are
        its decoder vector (the trainer keeps it at unit norm)."""
        later = [*self.W_dec_later] + [None] * (len(self.layers) - len(self.W_dec_later))
        return [(layer, [layer.W_dec] + ([w] if w is not None else []))
                for layer, w in zip(self.layers, later, strict=True)]

    def scaled_reconstructions(self, fs: list[Tensor]) -> list[Tensor]:
        """sum_{n <= t} f_n D[n -> t] + b_dec_t for every target t, in the scaled space."""
        outs = [f @ layer.W_dec + layer.b_dec for f, layer in zip(fs, self.layers, strict=True)]
        for n, (f, later) in enumerate(zip(fs, self.W_dec_later, strict=False)):
            writes = (f @ later.flatten(1)).unflatten(-1, later.shape[1:])  # (B, L - 1 - n, d)
            for k in range(writes.shape[1]):
                outs[n + 1 + k] = outs[n + 1 + k] + writes[:, k]
        return outs

    def forward(self, x: Tensor, aux_enabled: bool = True, sparse: bool = False,
                target: Tensor | None = None) -> SAEOutput:
        """Raw inputs and targets (L, B, d) -> SAEOutput with latents (L, B, m) and error
        (L, B, d); `sparse`: the same values and gradients from kernels.py, the latents a list of
        each layer's SparseLatents."""
        if target is None:
            raise ValueError("a CLT reconstructs its targets: call clt(x, target=y), (L, B, d)")
        if sparse and self.variant.has_sparse_path and self.training:
            step = sparse_cross_layer_forward(self, x, target, aux_enabled)
            if step is not None:
                recon = torch.stack(step.recon_losses).sum()
                return SAEOutput(step.latents, recon + step.sparsity_loss + step.aux_loss, recon,
                                 step.sparsity_loss, step.aux_loss, torch.stack(step.errors),
                                 target, torch.stack(step.units).reshape(-1, 1, 1),
                                 self._layer_details(step.recon_losses))
        pres, fs, goals, units = [], [], [], []
        for layer, x_n, y_n in zip(self.layers, x, target, strict=True):
            x_scaled, unit = layer.scaled_input(x_n)
            pre = layer.pre_activations(x_scaled)
            goal, unit = layer.scaled_goal(x_scaled, unit, y_n)
            pres.append(pre)
            fs.append(layer.activation(pre))
            goals.append(goal)
            units.append(unit)
        errors = [y_hat - goal for y_hat, goal in zip(self.scaled_reconstructions(fs), goals,
                                                      strict=True)]
        recons = [e.pow(2).sum(-1).mean() for e in errors]
        recon = torch.stack(recons).sum()
        sparsity = torch.stack([self.sparsity_coeff * layer.sparsity_penalty(pre, f)
                                for layer, pre, f in zip(self.layers, pres, fs, strict=True)]).sum()
        if self.layers[0].uses_aux_loss and aux_enabled and self.training:  # per layer: its dead
            aux = torch.stack([layer.aux_loss(-e, pre)  # latents on its own target's residual
                               for layer, e, pre in zip(self.layers, errors, pres,
                                                        strict=True)]).sum()
        else:
            aux = recon.new_zeros(())
        return SAEOutput(torch.stack(fs), recon + sparsity + aux, recon, sparsity, aux,
                         torch.stack(errors), target, torch.stack(units).reshape(-1, 1, 1),
                         self._layer_details(recons))

    def _layer_details(self, recons: list[Tensor]) -> dict[str, Tensor]:
        return {f"recon_loss_L{i}": r.detach() for i, r in zip(self.layer_ids, recons, strict=True)}

    # --- inference ------------------------------------------------------------------------------

    def encode(self, x: Tensor) -> Tensor:
        """Raw inputs (L, N, d) -> latents (L, N, m)."""
        return torch.stack([layer.encode(x_n) for layer, x_n in zip(self.layers, x, strict=True)])

    def decode(self, f: Tensor, x: Tensor | None = None) -> Tensor:
        """Latents (L, N, m) -> raw reconstructions of every target (L, N, d); with a skip
        connection pass the raw inputs `x`."""
        outs = self.scaled_reconstructions(list(f))
        for n, layer in enumerate(self.layers):
            if layer.W_skip is not None:
                if x is None:
                    raise ValueError("this CLT has skip connections: decode(f, x) needs the inputs")
                outs[n] = outs[n] + layer.scaled_input(x[n])[0] @ layer.W_skip
            outs[n] = outs[n] / layer.target_scale
        return torch.stack(outs)

    def decode_layer(self, f: list[Tensor], x: list[Tensor], t: int) -> Tensor:
        """The raw reconstruction of target t (N, d) from the latents `f` of layers 0..t (each
        (N, m)) and, for a skip connection, their raw inputs `x`: one layer of `decode`."""
        layer = self.layers[t]
        y = f[t] @ layer.W_dec + layer.b_dec
        for n in range(min(t, len(self.W_dec_later))):
            y = y + f[n] @ self.W_dec_later[n][:, t - n - 1]
        if layer.W_skip is not None:
            y = y + layer.scaled_input(x[t])[0] @ layer.W_skip
        return y / layer.target_scale

    # --- state the trainer keeps ------------------------------------------------------------------

    @torch.no_grad()
    def init_from_batch(self, x: Tensor, scales: list[float], target: Tensor,
                        target_scales: list[float]) -> None:
        for n, layer in enumerate(self.layers):
            layer.init_from_batch(x[n], scales[n], target[n], target_scales[n])

    def dead_mask(self) -> Tensor:
        """(L, m)"""
        return torch.stack([layer.dead_mask() for layer in self.layers])


def check_cross_layer(cfg: dict[str, Any]) -> None:
    """One line for a CLT config that cannot work (before any model is booted)."""
    variant = SAE_CLASSES[cfg["sae_type"]]
    if not variant.cross_layer_ok:
        able = ", ".join(name for name, cls in SAE_CLASSES.items() if cls.cross_layer_ok)
        raise ConfigError(f"config sae_type={cfg['sae_type']} cannot be a cross-layer transcoder "
                          f"(its loss or penalty reads one decoder); use one of {able}")
    if cfg["target_hook_point"] or cfg["hook_point"]:
        raise ConfigError("config cross_layer=true names its hook points by site: set site and "
                          "target_site (e.g. site=resid_mid target_site=mlp_out), not hook_point "
                          "or target_hook_point")
    if cfg["site"] == cfg["target_site"]:
        raise ConfigError(f"config cross_layer=true reads and writes site {cfg['site']!r}: set "
                          "target_site to another site (e.g. site=mlp_in target_site=mlp_out)")
    if cfg["target_layer"] >= 0:
        raise ConfigError("config target_layer is for single-layer transcoders: a CLT's layer i "
                          "writes to target_site of layer i and every later layer of `layers`")
