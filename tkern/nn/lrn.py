"""``tkern.nn.LocalResponseNorm``: torch's module, running tkern's fused LRN kernels."""

from __future__ import annotations

import torch

from ..ops.lrn import local_response_norm


class LocalResponseNorm(torch.nn.LocalResponseNorm):
    """Drop-in for ``torch.nn.LocalResponseNorm(size, alpha=1e-4, beta=0.75, k=1.0)``: same
    constructor, attributes and (empty) state_dict; forward runs ``tkern.local_response_norm``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return local_response_norm(input, self.size, self.alpha, self.beta, self.k)
