"""Local response normalization on the AlexNet and GoogLeNet LRN layers.

``F.local_response_norm`` (a composite of several full passes) against
``tkern.local_response_norm``, with AlexNet's parameters (size 5, alpha 1e-4, beta 0.75, k 2).

Minimal bytes (|x| = bytes of the input):
- fwd:  read x, write y = 2|x|
- bwd:  read x and dy, write dx = 3|x| (the kernel saves x alone and recomputes the window sums)
- full: fwd + bwd = 5|x|
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import tkern

from .base import Case, Inputs, layout_tensor, nbytes

NAME = "local_response_norm"
OPS = ("local_response_norm",)
TKERN_ATTRS = ("local_response_norm",)

SHAPES = [
    (96, 55, 55, "AlexNet conv1"),
    (256, 27, 27, "AlexNet conv2"),
    (64, 56, 56, "GoogLeNet conv1"),
    (192, 56, 56, "GoogLeNet conv2"),
]
QUICK_SHAPES = [(12, 5, 5, "tiny")]
SIZE, ALPHA, BETA, K = 5, 1e-4, 0.75, 2.0


def _make(shape, layout):
    def make(batch: int, dtype: torch.dtype, device: torch.device) -> Inputs:
        x = layout_tensor(torch.randn(batch, *shape, device=device, dtype=dtype), layout).requires_grad_()
        return Inputs([x], grad_idx=(0,), dy=torch.randn_like(x).detach())

    return make


def _bytes(shape):
    def min_bytes(batch: int, dtype: torch.dtype, mode: str) -> int:
        x = nbytes((batch, *shape), dtype)
        return {"fwd": 2 * x, "bwd": 3 * x, "full": 5 * x}[mode]

    return min_bytes


def eager_lrn(x):
    return F.local_response_norm(x, SIZE, ALPHA, BETA, K)


def tkern_lrn(x):
    return tkern.local_response_norm(x, SIZE, ALPHA, BETA, K)


def cases(quick: bool) -> list[Case]:
    return [
        Case("local_response_norm", (c, h, w), "contiguous", label, _make((c, h, w), "contiguous"),
             eager_lrn, tkern_lrn, _bytes((c, h, w)))
        for c, h, w, label in (QUICK_SHAPES if quick else SHAPES)
    ]
