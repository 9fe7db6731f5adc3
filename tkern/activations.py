"""The activation table: every activation tkern fuses, its Triton forward and its derivative.

Fused kernels (activation+dropout, BatchNorm+activation) take the activation as a ``tl.constexpr``
string and call :func:`activate` / :func:`activation_grad` on the pre-activation ``z``.  Both work
from ``z`` alone, so a backward pass only needs what rebuilds ``z`` (x, or x and saved statistics).

GELU's two forms are two kernel names: ``"gelu"`` (erf) and ``"gelu_tanh"``; :func:`kernel_name`
maps the public ``(activation, approximate)`` pair onto them.

Kernels carry two activation scalars, named after their first users: ``negative_slope`` (the
leaky_relu slope, hardtanh's ``min_val``, softplus's ``beta``) and ``alpha`` (the elu alpha,
hardtanh's ``max_val``, softplus's ``threshold``); :func:`activation_scalars` maps the public
keyword arguments onto them, so no kernel takes more scalars than it did for two activations.

Triton's interpreter lacks libdevice, so tanh, expm1 and log1p are built from ``exp``/``log`` here,
keeping full relative precision near zero (Kahan's forms), which plain ``exp(z) - 1`` would lose.
Derivatives at kinks and at NaN follow torch's backward formulas (checked against its autograd).
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
    eager: Callable  # eager PyTorch forward: (z, scalar0, scalar1, approximate) -> tensor
    # the public keyword arguments carried as the kernel's scalars (negative_slope, alpha)
    params: tuple = (None, None)


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("identity", torch.nn.Identity, lambda z, s, a, ap: z),
        Activation("relu", torch.nn.ReLU, lambda z, s, a, ap: F.relu(z)),
        Activation("leaky_relu", torch.nn.LeakyReLU, lambda z, s, a, ap: F.leaky_relu(z, s),
                   ("negative_slope", None)),
        Activation("sigmoid", torch.nn.Sigmoid, lambda z, s, a, ap: torch.sigmoid(z)),
        Activation("tanh", torch.nn.Tanh, lambda z, s, a, ap: torch.tanh(z)),
        Activation("gelu", torch.nn.GELU, lambda z, s, a, ap: F.gelu(z, approximate=ap)),
        Activation("silu", torch.nn.SiLU, lambda z, s, a, ap: F.silu(z)),
        Activation("elu", torch.nn.ELU, lambda z, s, a, ap: F.elu(z, a), (None, "alpha")),
        Activation("relu6", torch.nn.ReLU6, lambda z, s, a, ap: F.relu6(z)),
        Activation("hardtanh", torch.nn.Hardtanh, lambda z, s, a, ap: F.hardtanh(z, s, a),
                   ("min_val", "max_val")),
        Activation("hardswish", torch.nn.Hardswish, lambda z, s, a, ap: F.hardswish(z)),
        Activation("hardsigmoid", torch.nn.Hardsigmoid, lambda z, s, a, ap: F.hardsigmoid(z)),
        Activation("mish", torch.nn.Mish, lambda z, s, a, ap: F.mish(z)),
        Activation("softplus", torch.nn.Softplus, lambda z, s, a, ap: F.softplus(z, s, a),
                   ("beta", "threshold")),
    )
}
# The public activation parameters and their defaults (torch's).
PARAM_DEFAULTS = dict(negative_slope=0.01, alpha=1.0, min_val=-1.0, max_val=1.0, beta=1.0,
                      threshold=20.0)


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


def activation_scalars(activation: str | None, negative_slope=0.01, alpha=1.0, min_val=-1.0,
                       max_val=1.0, beta=1.0, threshold=20.0) -> tuple[float, float]:
    """The kernels' two activation scalars ``(negative_slope, alpha)`` for ``activation`` (see the
    module docstring); raises torch's errors for bad parameters."""
    activation = check_activation(activation)
    values = dict(negative_slope=negative_slope, alpha=alpha, min_val=min_val, max_val=max_val,
                  beta=beta, threshold=threshold)
    if activation == "hardtanh" and float(min_val) > float(max_val):
        raise ValueError("min_val cannot be greater than max_val")  # F.hardtanh's error
    n0, n1 = ACTIVATIONS[activation].params
    return (float(values[n0] if n0 else negative_slope), float(values[n1] if n1 else alpha))


def named_scalars(activation: str | None, s0: float, s1: float) -> dict[str, float]:
    """The kernels' two activation scalars under the parameter names ``activation`` gives them
    (``{}`` for an activation without parameters): what error messages name."""
    names = ACTIVATIONS[check_activation(activation)].params
    return {n: v for n, v in zip(names, (s0, s1)) if n is not None}


def activation_repr(activation: str | None, approximate="none", **params) -> str:
    """``", name=value"`` for the parameters ``activation`` uses (modules' extra_repr)."""
    if activation is None:
        return ""
    names = [n for n in ACTIVATIONS[activation].params if n is not None]
    parts = [f"{n}={params[n]}" for n in names]
    if activation == "gelu" and approximate != "none":
        parts.append(f"approximate={approximate!r}")
    return "".join(", " + p for p in parts)


def kernel_name(activation: str | None, approximate: str = "none") -> str:
    """The ``tl.constexpr`` name fused kernels dispatch on."""
    activation = check_activation(activation, approximate)
    if activation == "gelu" and approximate == "tanh":
        return "gelu_tanh"
    return activation


def eager_activation(z, activation, negative_slope=0.01, alpha=1.0, approximate="none"):
    """Eager PyTorch version of an activation: the CPU fallback and the tests' reference.
    ``negative_slope`` and ``alpha`` are the kernels' two scalars (:func:`activation_scalars`)."""
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
def _log1p(e):
    # Kahan: log(u) * e / (u - 1) with u = 1 + e cancels the rounding of u (full relative
    # precision for tiny e); where u - 1 == e exactly (large e, inf) the factor is 1
    u = 1.0 + e
    um1 = u - 1.0
    r = tl.log(u) * (e / tl.where(u == 1.0, 1.0, um1))
    return tl.where(um1 == e, tl.log(u), tl.where(u == 1.0, e, r))


@triton.jit
def _softplus(t):
    # log(1 + exp(t)) = max(t, 0) + log1p(exp(-|t|)): no overflow for large t (torch's fp32
    # formula gives inf where exp(t) overflows below the threshold; the true value is finite)
    return tl.where(t > 0, t, 0.0) + _log1p(tl.exp(-tl.abs(t)))


@triton.jit
def _clamp(z, lo, hi):
    # torch's clamp: NaN passes through (both selects keep z when the comparisons fail)
    return tl.where(z < lo, lo, tl.where(z > hi, hi, z))


@triton.jit
def _gelu_tanh_inner(z):
    # sqrt(2 / pi) * (z + 0.044715 z^3), the argument of tanh in GELU's tanh approximation
    return 0.7978845608028654 * (z + 0.044715 * z * z * z)


# The fitted range of the fp32 normal CDF: |z| is clamped here, so Phi(-|z|) bottoms out at
# Phi(-5.6) = 1.07e-8 (torch's fp32 erf form is exactly 0 from z ~ -5.45)
GELU_CDF_CUT = tl.constexpr(5.6)


@triton.jit
def _normal_tail(a):
    """Phi(-a) for a = min(|z|, 5.6) >= 0, fp32: 2^q(a), q a degree-10 polynomial fitted to
    log2 Phi(-a) on [0, 5.6] (tools/fit_normal_cdf.py: absolute error 2.9e-8, half an ulp at 1/2,
    before exp2's own; relative precision kept where 1 + erf would cancel).  Ten FMAs and one
    exp2, where erf costs two polynomial branches."""
    q = -3.2276247452500684e-08 * a + 9.339113375972374e-07
    q = q * a - 1.162690114142606e-05
    q = q * a + 7.94248262536712e-05
    q = q * a - 0.0002867975563276559
    q = q * a + 8.427329703408759e-06
    q = q * a + 0.006943977437913418
    q = q * a - 0.052443794906139374
    q = q * a - 0.45921874046325684
    q = q * a - 1.1511045694351196
    q = q * a - 1.0
    return tl.exp2(q)


@triton.jit
def _gelu(z):
    # fp32: z Phi(z) = max(z, 0) - |z| Phi(-|z|), |z| clamped at the cut (past it the term is
    # below 6e-8: z's own value, or 0 within 6e-8); the NaN-propagating max keeps NaN, +inf stays
    # inf (the clamp keeps inf * 0 out), -inf gives the limit 0.  fp64: through erf.
    if z.dtype == tl.float64:
        y = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    else:
        a = tl.minimum(tl.abs(z), GELU_CDF_CUT)
        y = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL) - a * _normal_tail(a)
    return y


@triton.jit
def _normal_cdf(z):
    """Phi(z) = (1 + erf(z / sqrt 2)) / 2: fp64 through erf; fp32 from ``_normal_tail``
    (1 - Phi(-z) for z > 0; within 1.1e-8 of 0 or 1 past |z| = 5.6)."""
    if z.dtype == tl.float64:
        c = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
    else:
        e = _normal_tail(tl.minimum(tl.abs(z), GELU_CDF_CUT))
        c = tl.where(z > 0, 1.0 - e, e)
    return c


@triton.jit
def activate(z, ACTIVATION: tl.constexpr, negative_slope, alpha):
    """act(z) for the pre-activation block ``z`` (fp32 or fp64); the two scalars ``negative_slope``
    and ``alpha`` (see :func:`activation_scalars`) must already be in z's type (see the float-scalar
    rule in docs/CONVENTIONS.md)."""
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
        y = _gelu(z)
    elif ACTIVATION == "gelu_tanh":
        y = 0.5 * z * (1.0 + _tanh(_gelu_tanh_inner(z)))
    elif ACTIVATION == "silu":
        y = z * _sigmoid(z)
    elif ACTIVATION == "elu":
        y = tl.where(z > 0, z, alpha * _expm1(z))
    elif ACTIVATION == "relu6":
        y = _clamp(z, 0.0, 6.0)
    elif ACTIVATION == "hardtanh":  # bounds: min_val, max_val
        y = _clamp(z, negative_slope, alpha)
    elif ACTIVATION == "hardswish":
        y = z * _clamp(z + 3.0, 0.0, 6.0) / 6.0  # -inf * 0 is NaN, as torch's
    elif ACTIVATION == "hardsigmoid":
        y = _clamp(z + 3.0, 0.0, 6.0) / 6.0
    elif ACTIVATION == "mish":
        y = z * _tanh(_softplus(z))
    elif ACTIVATION == "softplus":  # beta, threshold: linear above threshold, as torch's
        t = z * negative_slope
        y = tl.where(t > alpha, z, _softplus(t) / negative_slope)
    else:
        tl.static_assert(False, "unknown activation")
    return y


@triton.jit
def activation_grad(z, ACTIVATION: tl.constexpr, negative_slope, alpha):
    """d act(z) / dz, with PyTorch's choices at kinks (relu'(0) = 0, leaky_relu'(0) = slope,
    hardtanh' and relu6' 0 at both bounds, hardswish' 0 at -3 and 1 at 3, hardsigmoid' 0 at +-3)
    and at NaN (the comparisons torch's backward formulas make: relu', elu', hardtanh' and
    hardswish' are 1 there, hardsigmoid' 0)."""
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
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327  # 1 / sqrt(2 pi)
        d = _normal_cdf(z) + z * pdf
    elif ACTIVATION == "gelu_tanh":
        t = _tanh(_gelu_tanh_inner(z))
        dinner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        d = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * dinner
    elif ACTIVATION == "silu":
        s = _sigmoid(z)
        d = s * (1.0 + z * (1.0 - s))
    elif ACTIVATION == "elu":
        d = tl.where(z <= 0, alpha * tl.exp(z), 1.0).to(z.dtype)
    elif ACTIVATION == "relu6":
        d = tl.where((z <= 0.0) | (z >= 6.0), 0.0, 1.0).to(z.dtype)
    elif ACTIVATION == "hardtanh":
        d = tl.where((z <= negative_slope) | (z >= alpha), 0.0, 1.0).to(z.dtype)
    elif ACTIVATION == "hardswish":
        d = tl.where(z <= -3.0, 0.0, tl.where(z < 3.0, z / 3.0 + 0.5, 1.0)).to(z.dtype)
    elif ACTIVATION == "hardsigmoid":
        d = tl.where((z > -3.0) & (z < 3.0), 1.0 / 6.0, 0.0).to(z.dtype)
    elif ACTIVATION == "mish":
        t = _tanh(_softplus(z))
        d = t + z * _sigmoid(z) * (1.0 - t * t)
    elif ACTIVATION == "softplus":  # sigmoid(beta z) below the threshold, 1 above it
        t = z * negative_slope
        d = tl.where(t > alpha, 1.0, _sigmoid(t)).to(z.dtype)
    else:
        tl.static_assert(False, "unknown activation")
    return d
