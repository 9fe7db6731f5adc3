"""Activation + dropout on a transformer MLP activation and on conv feature maps.

- transformer MLP: x of (batch, 512 tokens, 4096) plus a bias, GELU, dropout p = 0.1:
  ``F.dropout(F.gelu(x + b), 0.1)`` against ``tkern.activation_dropout(x, "gelu", 0.1, bias=b)``;
- conv feature map: x of (batch, 256, 56, 56), NCHW and channels_last, ReLU, dropout p = 0.2.

Dropout is random, so the check compares each provider's training-mode output with the reference
run with dropout off: the dropped fraction must match p (within 6 sigma), and every kept element
(and its gradient) must equal the reference scaled by 1 / (1 - p) under the tolerance rule.

Minimal bytes (|x| = bytes of the input, |b| of the bias; the mask is regenerated, never stored):
- fwd:  read x and b, write y = 2|x| + |b|
- bwd:  read x, b and dy, write dx and db = 3|x| + 2|b|
- full: fwd + bwd
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import tkern
from tkern.testing import assert_close_rule

from . import gems
from .base import CHECK_FACTOR, Case, Inputs, Result, layout_tensor, nbytes

NAME = "activation_dropout"
OPS = ("activation_dropout",)
TKERN_ATTRS = ("activation_dropout",)

MLP_TOKENS, MLP_HIDDEN, MLP_P = 512, 4096, 0.1
CONV_SHAPE, CONV_P = (256, 56, 56), 0.2
QUICK_MLP = (16, 64)
QUICK_CONV = (8, 6, 6)


def _mlp_fns(p):
    def eager(x, b):
        return F.dropout(F.gelu(x + b), p, training=True)

    def reference(x, b):
        return F.gelu(x + b)

    def tk(x, b):
        return tkern.activation_dropout(x, "gelu", p, True, bias=b)

    return eager, reference, tk


def _conv_fns(p):
    def eager(x):
        return F.dropout(F.relu(x), p, training=True)

    def reference(x):
        return F.relu(x)

    def tk(x):
        return tkern.activation_dropout(x, "relu", p, True)

    return eager, reference, tk


def _make(shape, layout, has_bias):
    def make(batch: int, dtype: torch.dtype, device: torch.device) -> Inputs:
        x = layout_tensor(torch.randn(batch, *shape, device=device, dtype=dtype), layout).requires_grad_()
        args = [x]
        if has_bias:
            args.append((0.1 * torch.randn(shape[-1], device=device, dtype=dtype)).requires_grad_())
        return Inputs(args, grad_idx=tuple(range(len(args))), dy=torch.randn_like(x).detach())

    return make


def _bytes(shape, has_bias):
    def min_bytes(batch: int, dtype: torch.dtype, mode: str) -> int:
        x = nbytes((batch, *shape), dtype)
        b = nbytes((shape[-1],), dtype) if has_bias else 0
        fwd, bwd = 2 * x + b, 3 * x + 2 * b
        return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]

    return min_bytes


def _compare(p):
    scale = 1.0 / (1.0 - p)

    def compare(actual: Result, torch_same: Result, ref: Result, dtype: torch.dtype) -> None:
        """``actual`` ran with dropout; ``torch_same`` (eager at dtype) and ``ref`` (fp64) without."""
        y, ry = actual.out, ref.out
        if y.shape != ry.shape or y.dtype != torch_same.out.dtype:
            raise AssertionError(f"output: shape/dtype {tuple(y.shape)} {y.dtype}, expected "
                                 f"{tuple(ry.shape)} {torch_same.out.dtype}")
        known = ry != 0  # where the reference is 0 (ReLU), a dropped and a kept element look alike
        kept = y != 0
        n = int(known.sum())
        if n:
            dropped = 1.0 - kept[known].double().mean().item()
            sigma = math.sqrt(p * (1 - p) / n)
            if abs(dropped - p) > 6 * sigma + 1.0 / n:
                raise AssertionError(f"dropout: dropped fraction {dropped:.4f}, expected p = {p} "
                                     f"(+- {6 * sigma:.4f} over {n} elements)")
        # kept elements: y = ref * scale; dropped: 0.  Where the mask is unknown, take it from the
        # gradient (a kept element with a zero activation derivative has a zero gradient anyway).
        gx = actual.grads[0]
        mask = torch.where(known, kept, gx != 0)
        assert_close_rule(y, torch.where(mask, torch_same.out * scale, 0).to(dtype),
                          torch.where(mask, ry * scale, 0), factor=CHECK_FACTOR, name="output")
        ref_gx = torch.where(mask, ref.grads[0] * scale, 0)
        assert_close_rule(gx, torch.where(mask, torch_same.grads[0] * scale, 0).to(dtype), ref_gx,
                          factor=CHECK_FACTOR, name="grad[x]")
        if len(actual.grads) > 1:  # the bias gradient sums dx over every row
            d = ref_gx.shape[-1]
            ref_gb = ref_gx.reshape(-1, d).sum(0)
            same_gb = torch.where(mask, torch_same.grads[0] * scale, 0).to(dtype).reshape(-1, d).float().sum(0)
            assert_close_rule(actual.grads[1], same_gb.to(dtype), ref_gb, factor=CHECK_FACTOR,
                              name="grad[bias]")

    return compare


def cases(quick: bool) -> list[Case]:
    mlp = QUICK_MLP if quick else (MLP_TOKENS, MLP_HIDDEN)
    conv = QUICK_CONV if quick else CONV_SHAPE
    out = []
    eager, ref, tk = _mlp_fns(MLP_P)
    out.append(Case("activation_dropout", mlp, "contiguous", "transformer MLP bias+GELU+dropout",
                    _make(mlp, "contiguous", True), eager, tk, _bytes(mlp, True), reference=ref,
                    compare=_compare(MLP_P), gems=gems.activation_dropout("gelu", MLP_P, True)))
    eager, ref, tk = _conv_fns(CONV_P)
    for layout in ("contiguous", "channels_last"):
        out.append(Case("activation_dropout", conv, layout, "conv feature map ReLU+dropout",
                        _make(conv, layout, False), eager, tk, _bytes(conv, False), reference=ref,
                        compare=_compare(CONV_P),
                        gems=gems.activation_dropout("relu", CONV_P, False)))
    return out
