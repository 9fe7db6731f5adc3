"""Weight normalization, w = g * v / ||v|| over every dim but 0, on a Linear 4096x4096 weight and a
512x512x3x3 conv weight.

``torch._weight_norm`` (what ``torch.nn.utils.parametrizations.weight_norm`` calls) against
``tkern.weight_norm``.  A weight has no batch: here "batch" is the number of such weights
normalized in one call, stacked along dim 0 (equivalent to normalizing each, since the norm runs
per output row), so the x axis shows how the kernels scale with size.  The sweep stops at 32
stacked weights (2 GiB of fp32 Linear weights), far past any real layer.

Minimal bytes (|v| = bytes of the weight, |g| = its row count in the weight's dtype):
- fwd:  read v and g, write w = 2|v| + |g|
- bwd:  read dw, v and g, write dv and dg = 3|v| + 2|g|
        (the per-row norms saved by forward are the kernel's own workspace and are not counted)
- full: fwd + bwd
"""

from __future__ import annotations

import torch

import tkern

from . import gems
from .base import Case, Inputs, nbytes

NAME = "weight_norm"
OPS = ("weight_norm",)
TKERN_ATTRS = ("weight_norm",)

SHAPES = [((4096, 4096), "Linear 4096x4096"), ((512, 512, 3, 3), "conv 512x512x3x3")]
QUICK_SHAPES = [((24, 16), "tiny Linear"), ((8, 4, 3, 3), "tiny conv")]
MAX_BATCH = 32


def _make(shape):
    def make(batch: int, dtype: torch.dtype, device: torch.device) -> Inputs:
        rows = batch * shape[0]
        v = torch.randn(rows, *shape[1:], device=device, dtype=dtype).requires_grad_()
        g = (1 + 0.1 * torch.randn(rows, *([1] * (len(shape) - 1)), device=device, dtype=dtype)).requires_grad_()
        return Inputs([v, g], grad_idx=(0, 1), dy=torch.randn_like(v).detach())

    return make


def _bytes(shape):
    def min_bytes(batch: int, dtype: torch.dtype, mode: str) -> int:
        v = nbytes((batch, *shape), dtype)
        g = nbytes((batch * shape[0],), dtype)
        fwd, bwd = 2 * v + g, 3 * v + 2 * g
        return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]

    return min_bytes


def eager_wn(v, g):
    return torch._weight_norm(v, g, 0)


def tkern_wn(v, g):
    return tkern.weight_norm(v, g, 0)


def cases(quick: bool) -> list[Case]:
    return [
        Case("weight_norm", shape, "contiguous", label, _make(shape), eager_wn, tkern_wn,
             _bytes(shape), extra={"max_batch": MAX_BATCH}, gems=gems.weight_norm)
        for shape, label in (QUICK_SHAPES if quick else SHAPES)
    ]
