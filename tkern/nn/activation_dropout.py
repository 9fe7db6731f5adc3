"""``tkern.nn.ActivationDropout``: an activation followed by dropout, as one fused module."""

from __future__ import annotations

import torch

from ..activations import activation_repr, activation_scalars, check_activation
from ..ops.activation_dropout import _probability, activation_dropout


class ActivationDropout(torch.nn.Module):
    """``dropout(act(x), p)``; dropout applies in ``train()`` mode only, as ``nn.Dropout``.

    Replaces ``nn.Sequential(act, nn.Dropout(p))`` with one kernel each way; holds no parameters,
    so its state_dict is empty like theirs.
    """

    def __init__(self, activation="relu", p=0.5, *, negative_slope=0.01, alpha=1.0,
                 approximate="none", min_val=-1.0, max_val=1.0, beta=1.0, threshold=20.0,
                 generator=None):
        super().__init__()
        self.p = _probability(p)  # ValueError out of [0, 1], as nn.Dropout
        self.activation = check_activation(activation, approximate)
        activation_scalars(activation, negative_slope, alpha, min_val, max_val, beta, threshold)
        self.negative_slope = negative_slope
        self.alpha = alpha
        self.approximate = approximate
        self.min_val, self.max_val = min_val, max_val
        self.beta, self.threshold = beta, threshold
        self.generator = generator

    def forward(self, x, bias=None):
        return activation_dropout(
            x, self.activation, self.p, self.training, bias=bias,
            negative_slope=self.negative_slope, alpha=self.alpha, approximate=self.approximate,
            min_val=self.min_val, max_val=self.max_val, beta=self.beta, threshold=self.threshold,
            generator=self.generator,
        )

    def extra_repr(self) -> str:
        return f"activation={self.activation}, p={self.p}" + activation_repr(
            self.activation, self.approximate, negative_slope=self.negative_slope,
            alpha=self.alpha, min_val=self.min_val, max_val=self.max_val, beta=self.beta,
            threshold=self.threshold)
