"""BatchNorm2d in training mode on ResNet-50's BN layer shapes, with and without a fused ReLU.

Rows ``batch_norm`` time ``F.batch_norm`` against ``tkern.batch_norm``; rows ``batch_norm_relu``
time ``F.relu(F.batch_norm(...))`` (what a ResNet runs) against ``tkern.batch_norm(...,
activation="relu")``.  Half-precision inputs come with fp32 weight, bias and running statistics, as
under autocast.

Minimal bytes (C channels, |x| = bytes of the input; params in their own dtype, stats fp32):
- fwd:  read x, write y, read weight and bias, read and write running_mean/var
        = 2|x| + C * (2 * param_size + 4 * 4)
- bwd:  read x and dy, write dx, read weight, write dweight and dbias
        = 3|x| + 3 * C * param_size
        (the saved mean and inverse std are the kernel's own workspace and are not counted)
- full: fwd + bwd (x is read in both phases: they are separate steps of a training iteration).
The fused ReLU adds no traffic, so both row kinds share the formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import tkern

from . import gems
from .base import Case, Inputs, layout_tensor, nbytes

NAME = "batch_norm"
OPS = ("batch_norm", "batch_norm_relu")
TKERN_ATTRS = ("batch_norm",)

# (C, H, W, where) of ResNet-50's BatchNorm layers at 224x224 input
SHAPES = [
    (64, 112, 112, "ResNet-50 stem"),
    (256, 56, 56, "ResNet-50 layer1"),
    (512, 28, 28, "ResNet-50 layer2"),
    (1024, 14, 14, "ResNet-50 layer3"),
    (2048, 7, 7, "ResNet-50 layer4"),
]
QUICK_SHAPES = [(8, 6, 6, "tiny")]
MOMENTUM, EPS = 0.1, 1e-5


def _param_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _make(shape, layout):
    c, h, w = shape

    def make(batch: int, dtype: torch.dtype, device: torch.device) -> Inputs:
        pdt = _param_dtype(dtype)
        x = layout_tensor(torch.randn(batch, c, h, w, device=device, dtype=dtype), layout).requires_grad_()
        weight = (1 + 0.1 * torch.randn(c, device=device, dtype=pdt)).requires_grad_()
        bias = (0.1 * torch.randn(c, device=device, dtype=pdt)).requires_grad_()
        running_mean = 0.1 * torch.randn(c, device=device, dtype=pdt)
        running_var = 0.5 + torch.rand(c, device=device, dtype=pdt)
        dy = torch.randn_like(x).detach()
        return Inputs([x, weight, bias, running_mean, running_var], grad_idx=(0, 1, 2),
                      state_idx=(3, 4), dy=dy)

    return make


def _bytes(shape):
    c = shape[0]

    def min_bytes(batch: int, dtype: torch.dtype, mode: str) -> int:
        x = nbytes((batch, *shape), dtype)
        ps = torch.empty((), dtype=_param_dtype(dtype)).element_size()
        fwd = 2 * x + c * (2 * ps + 4 * 4)
        bwd = 3 * x + 3 * c * ps
        return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]

    return min_bytes


def eager_bn(x, weight, bias, running_mean, running_var):
    return F.batch_norm(x, running_mean, running_var, weight, bias, True, MOMENTUM, EPS)


def eager_bn_relu(x, weight, bias, running_mean, running_var):
    return F.relu(F.batch_norm(x, running_mean, running_var, weight, bias, True, MOMENTUM, EPS))


def tkern_bn(x, weight, bias, running_mean, running_var):
    return tkern.batch_norm(x, running_mean, running_var, weight, bias, True, MOMENTUM, EPS)


def tkern_bn_relu(x, weight, bias, running_mean, running_var):
    return tkern.batch_norm(x, running_mean, running_var, weight, bias, True, MOMENTUM, EPS,
                            activation="relu")


def cases(quick: bool) -> list[Case]:
    out = []
    for c, h, w, label in QUICK_SHAPES if quick else SHAPES:
        shape = (c, h, w)
        for layout in ("contiguous", "channels_last"):
            out.append(Case("batch_norm", shape, layout, label, _make(shape, layout), eager_bn,
                            tkern_bn, _bytes(shape), gems=gems.batch_norm(MOMENTUM, EPS, False)))
            out.append(Case("batch_norm_relu", shape, layout, label, _make(shape, layout),
                            eager_bn_relu, tkern_bn_relu, _bytes(shape),
                            gems=gems.batch_norm(MOMENTUM, EPS, True)))
    return out
