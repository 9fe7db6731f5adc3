"""The activation table: every activation tkern fuses, its Triton forward and its derivative.

Fused kernels (activation+dropout, BatchNorm+activation) take the activation as a ``tl.constexpr``
string and call :func:`activate` / :func:`activation_grad` on the pre-activation ``z``.  Both work
from ``z`` alone, so a backward pass only needs what rebuilds ``z`` (x, or x and saved statistics).

GELU's two forms are two kernel names: ``"gelu"`` (erf) and ``"gelu_tanh"``; :func:`kernel_name`
maps the public ``(activation, approximate)`` pair onto them.

Triton's interpreter lacks libdevice, so tanh and expm1 are built from ``exp``/``log`` here, keeping
full relative precision near zero (Kahan's expm1), which plain ``exp(z) - 1`` would lose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@dataclass(frozen=True)
class Activation:
    name: str
    module: type  # the torch.nn module it replaces
    eager: Callable  # eager PyTorch forward: (z, negative_slope, alpha, approximate) -> tensor


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("identity", torch.nn.Identity, lambda z, s, a, ap: z),
        Activation("relu", torch.nn.ReLU, lambda z, s, a, ap: F.relu(z)),
        Activation("leaky_relu", torch.nn.LeakyReLU, lambda z, s, a, ap: F.leaky_relu(z, s)),
        Activation("sigmoid", torch.nn.Sigmoid, lambda z, s, a, ap: torch.sigmoid(z)),
        Activation("tanh", torch.nn.Tanh, lambda z, s, a, ap: torch.tanh(z)),
        Activation("gelu", torch.nn.GELU, lambda z, s, a, ap: F.gelu(z, approximate=ap)),
        Activation("silu", torch.nn.SiLU, lambda z, s, a, ap: F.silu(z)),
        Activation("elu", torch.nn.ELU, lambda z, s, a, ap: F.elu(z, a)),
    )
}


def check_activation(activation: str | None, approximate: str = "none") -> str:
    """Validate a public activation name (``None`` means identity) and return it."""
    if activation is None:
        activation = "identity"
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; valid activations are: {', '.join(ACTIVATIONS)}"
        )
    if approximate not in ("none", "tanh"):
        # torch.nn.functional.gelu raises RuntimeError for this.
        raise RuntimeError(f"approximate argument must be either none or tanh, got {approximate!r}")
    return activation


def kernel_name(activation: str | None, approximate: str = "none") -> str:
    """The ``tl.constexpr`` name fused kernels dispatch on."""
    activation = check_activation(activation, approximate)
    if activation == "gelu" and approximate == "tanh":
        return "gelu_tanh"
    return activation


def eager_activation(z, activation, negative_slope=0.01, alpha=1.0, approximate="none"):
    """Eager PyTorch version of an activation: the CPU fallback and the tests' reference."""
    activation = check_activation(activation, approximate)
    return ACTIVATIONS[activation].eager(z, negative_slope, alpha, approximate)


@triton.jit
def _expm1(z):
    # Kahan: (u - 1) * z / log(u) with u = exp(z) cancels the rounding of u, giving full relative
    # precision for small |z|; large |z| takes u - 1 directly (log(u) would be inf or exact anyway).
    u = tl.exp(z)
    um1 = u - 1.0
    log_u = tl.log(u)
    small = tl.where(u == 1.0, z, um1 * z / tl.where(u == 1.0, 1.0, log_u))
    return tl.where(tl.abs(z) < 0.5, small, um1)


@triton.jit
def _tanh(z):
    # tanh(|z|) = e / (e + 2) with e = expm1(2|z|); |z| is clamped at 20, where tanh rounds to 1
    # even in fp64, so e stays finite.  NaN stays NaN, as in torch.
    a = tl.where(tl.abs(z) > 20.0, 20.0, tl.abs(z))  # a select keeps NaN (tl.minimum may not)
    e = _expm1(2.0 * a)
    t = e / (e + 2.0)
    return tl.where(z < 0, -t, t)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _gelu_tanh_inner(z):
    # sqrt(2 / pi) * (z + 0.044715 z^3), the argument of tanh in GELU's tanh approximation
    return 0.7978845608028654 * (z + 0.044715 * z * z * z)


@triton.jit
def activate(z, ACTIVATION: tl.constexpr, negative_slope, alpha):
    """act(z) for the pre-activation block ``z`` (fp32 or fp64); ``negative_slope`` and ``alpha``
    must already be in z's type (see the float-scalar rule in docs/CONVENTIONS.md)."""
    if ACTIVATION == "identity":
        y = z
    elif ACTIVATION == "relu":
        y = tl.where(z <= 0, 0.0, z)  # NaN passes through, as torch's relu
    elif ACTIVATION == "leaky_relu":
        y = tl.where(z > 0, z, z * negative_slope)
    elif ACTIVATION == "sigmoid":
        y = _sigmoid(z)
    elif ACTIVATION == "tanh":
        y = _tanh(z)
    elif ACTIVATION == "gelu":
        y = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        y = 0.5 * z * (1.0 + _tanh(_gelu_tanh_inner(z)))
    elif ACTIVATION == "silu":
        y = z * _sigmoid(z)
    elif ACTIVATION == "elu":
        y = tl.where(z > 0, z, alpha * _expm1(z))
    else:
        tl.static_assert(False, "unknown activation")
    return y


@triton.jit
def activation_grad(z, ACTIVATION: tl.constexpr, negative_slope, alpha):
    """d act(z) / dz, with PyTorch's choices at kinks (relu'(0) = 0, leaky_relu'(0) = slope) and
    at NaN (the comparisons torch's backward formulas make: relu' and elu' are 1 there)."""
    if ACTIVATION == "identity":
        d = tl.full(z.shape, 1.0, z.dtype)
    elif ACTIVATION == "relu":
        d = tl.where(z <= 0, 0.0, 1.0).to(z.dtype)
    elif ACTIVATION == "leaky_relu":
        d = tl.where(z > 0, tl.full(z.shape, 1.0, z.dtype), negative_slope)
    elif ACTIVATION == "sigmoid":
        s = _sigmoid(z)
        d = s * (1.0 - s)
    elif ACTIVATION == "tanh":
        t = _tanh(z)
        d = 1.0 - t * t
    elif ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327  # 1 / sqrt(2 pi)
        d = cdf + z * pdf
    elif ACTIVATION == "gelu_tanh":
        t = _tanh(_gelu_tanh_inner(z))
        dinner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        d = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * dinner
    elif ACTIVATION == "silu":
        s = _sigmoid(z)
        d = s * (1.0 + z * (1.0 - s))
    elif ACTIVATION == "elu":
        d = tl.where(z <= 0, alpha * tl.exp(z), 1.0).to(z.dtype)
    else:
        tl.static_assert(False, "unknown activation")
    return d
