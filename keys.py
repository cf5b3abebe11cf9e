"""What config.py and sae.py both need, below both: how a setting is declared (`Key`), the error a
setting that cannot work raises (`ConfigError`), and which settings make a transcoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A setting that cannot work; the message is one line saying what and how to fix."""


@dataclass(frozen=True)
class Key:
    """One config key. `allowed`: "> 0", ">= 0", "[0, 1)", a tuple of choices, or "" (any value
    of the default's type). `roles`: what the key decides beyond its own step (config.ROLES)."""

    default: Any
    doc: str
    allowed: str | tuple[str, ...] = ""
    roles: tuple[str, ...] = ()


def is_transcoder(cfg: dict[str, Any]) -> bool:
    """Whether the run predicts a hook point it does not read (target_site or target_hook_point;
    a cross-layer transcoder)."""
    return bool(cfg.get("target_hook_point") or cfg.get("target_site") or cfg.get("cross_layer"))
