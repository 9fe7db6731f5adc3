"""The case registry: one module per tkern op, each listing its realistic shapes.

``REGISTRY`` maps a row op name (``batch_norm``, ``batch_norm_relu``, ``local_response_norm``,
``activation_dropout``, ``weight_norm``, ``train_step``) to the module that builds its cases.  An op whose tkern
function does not exist yet is skipped with a message, so the harness picks ops up as they land.
"""

from __future__ import annotations

import tkern

from . import activation_dropout, batch_norm, local_response_norm, train_step, weight_norm
from .base import Case

MODULES = (batch_norm, local_response_norm, activation_dropout, weight_norm, train_step)
REGISTRY = {op: m for m in MODULES for op in m.OPS}
ALIASES = {"bn": "batch_norm", "bn_relu": "batch_norm_relu", "lrn": "local_response_norm",
           "dropout": "activation_dropout", "wn": "weight_norm",
           "step": "train_step"}


def resolve(names: list[str]) -> list[str]:
    out = []
    for n in names:
        n = ALIASES.get(n, n)
        if n not in REGISTRY:
            raise ValueError(f"unknown op {n!r}; known: {', '.join(REGISTRY)} (aliases: "
                             f"{', '.join(f'{a}={b}' for a, b in ALIASES.items())})")
        if n not in out:
            out.append(n)
    return out


def missing(op: str) -> list[str]:
    """tkern functions the op needs that do not exist (yet)."""
    return [a for a in REGISTRY[op].TKERN_ATTRS if not hasattr(tkern, a)]


def cases_for(op: str, quick: bool) -> list[Case]:
    return [c for c in REGISTRY[op].cases(quick) if c.op == op]


__all__ = ["ALIASES", "Case", "REGISTRY", "cases_for", "missing", "resolve"]
