"""``tkern.nn.ActivationDropout``: an activation followed by dropout, as one fused module."""

from __future__ import annotations

import torch

from ..activations import check_activation
from ..ops.activation_dropout import _probability, activation_dropout


class ActivationDropout(torch.nn.Module):
    """``dropout(act(x), p)``; dropout applies in ``train()`` mode only, as ``nn.Dropout``.

    Replaces ``nn.Sequential(act, nn.Dropout(p))`` with one kernel each way; holds no parameters,
    so its state_dict is empty like theirs.
    """

    def __init__(self, activation="relu", p=0.5, *, negative_slope=0.01, alpha=1.0,
                 approximate="none", generator=None):
        super().__init__()
        self.p = _probability(p)  # ValueError out of [0, 1], as nn.Dropout
        self.activation = check_activation(activation, approximate)
        self.negative_slope = negative_slope
        self.alpha = alpha
        self.approximate = approximate
        self.generator = generator

    def forward(self, x, bias=None):
        return activation_dropout(
            x, self.activation, self.p, self.training, bias=bias,
            negative_slope=self.negative_slope, alpha=self.alpha, approximate=self.approximate,
            generator=self.generator,
        )

    def extra_repr(self) -> str:
        parts = [f"activation={self.activation}", f"p={self.p}"]
        if self.activation == "leaky_relu":
            parts.append(f"negative_slope={self.negative_slope}")
        elif self.activation == "elu":
            parts.append(f"alpha={self.alpha}")
        elif self.activation == "gelu" and self.approximate != "none":
            parts.append(f"approximate={self.approximate!r}")
        return ", ".join(parts)
