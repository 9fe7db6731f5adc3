"""Fused activation + dropout: ``y = dropout(act(x + bias), p)``.

Design:
- Forward reads x (and the bias) once and writes y once; backward reads x and dy, writes dx.
- The dropout mask is never stored.  It is a function of (seed, element offset) through Philox, so
  the backward kernel draws it again; what autograd saves is x (and the bias), from which backward
  rebuilds z = x + bias for the activation's derivative.
- Each program covers BLOCK = 4 * QUARTER elements as four contiguous quarters.  One Philox call per
  counter gives four random words, one per quarter, a quarter of the generator's cost.  Counters are
  global (program * QUARTER + lane), so no two blocks share random numbers.  QUARTER is a fixed
  constant because the mask depends on it: forward and backward must agree.
- The seed comes from torch's generator (see ``draw_seed_tensor``): ``torch.manual_seed`` reproduces a run.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _runtime as rt
from ._math import from_pair
from ..activations import (activate, activation_grad, activation_scalars, eager_activation,
                           kernel_name)

QUARTER = 512
BLOCK = 4 * QUARTER


@triton.jit
def _keep(r, threshold):
    # r: random uint32 words.  Their top 31 bits are a uniform integer u in [0, 2^31); an element
    # is dropped when u <= threshold = ceil(p * 2^31) - 1, with probability ceil(p * 2^31) / 2^31
    # (p to within 2^-31), in integer arithmetic: no int-to-float conversion per element.
    return (r >> 1).to(tl.int32, bitcast=True) > threshold


@triton.jit
def _quarter(X, BIAS, DY, OUT, offs, r, n_elements, n_cols, col_stride, threshold, scale,
             negative_slope, alpha, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr,
             DROPOUT: tl.constexpr, BACKWARD: tl.constexpr, COMPUTE: tl.constexpr):
    mask = offs < n_elements
    z = tl.load(X + offs, mask=mask, other=0.0).to(COMPUTE)
    if HAS_BIAS:  # in a dense layout, the last-dim index of offset o is (o // stride) % size
        z += tl.load(BIAS + (offs // col_stride) % n_cols, mask=mask, other=0.0).to(COMPUTE)
    if BACKWARD:  # dz = dy * act'(z) * mask * scale
        out = tl.load(DY + offs, mask=mask, other=0.0).to(COMPUTE)
        out = out * activation_grad(z, ACTIVATION, negative_slope, alpha)
    else:  # y = act(z) * mask * scale
        out = activate(z, ACTIVATION, negative_slope, alpha)
    if DROPOUT:
        # a select, so the scale (0 when p = 1) never meets a dropped inf; dropped elements are
        # out * 0, as torch's x * mask: 0, or NaN where out is inf or NaN
        out = tl.where(_keep(r, threshold), out * scale, out * 0.0)
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _kernel(
    X,  # input, flat (n_elements,)
    BIAS,  # bias over the last dim (n_cols,), or a dummy when HAS_BIAS is False
    DY,  # backward: gradient of y, in X's layout; forward: a dummy
    OUT,  # forward: y; backward: dx (= dz); flat, in X's layout
    n_elements, n_cols, col_stride,  # element count; last dim's size and stride (the bias index)
    seed, threshold,  # Philox seed; drop threshold, ceil(p * 2^31) - 1 (see _keep)
    # fp32 pairs (hi, lo) of 1 / (1 - p) (0 when p == 1), the leaky_relu slope and the elu alpha
    scale_hi, scale_lo, slope_hi, slope_lo, alpha_hi, alpha_lo,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    BACKWARD: tl.constexpr,
    COMPUTE: tl.constexpr,  # fp32, or fp64 for fp64 tensors
    INT64: tl.constexpr,  # index in int64 (tensors past 2^31 elements)
    QUARTER: tl.constexpr,
):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    scale = from_pair(scale_hi, scale_lo, COMPUTE)
    negative_slope = from_pair(slope_hi, slope_lo, COMPUTE)
    alpha = from_pair(alpha_hi, alpha_lo, COMPUTE)
    lanes = tl.arange(0, QUARTER)
    counters = pid * QUARTER + lanes
    if DROPOUT:
        r0, r1, r2, r3 = tl.randint4x(seed, counters)  # one Philox call, a word per quarter
    else:
        r0, r1, r2, r3 = counters, counters, counters, counters  # unused
    base = pid * (4 * QUARTER) + lanes
    _quarter(X, BIAS, DY, OUT, base, r0, n_elements, n_cols, col_stride, threshold, scale,
             negative_slope, alpha, ACTIVATION, HAS_BIAS, DROPOUT, BACKWARD, COMPUTE)
    _quarter(X, BIAS, DY, OUT, base + QUARTER, r1, n_elements, n_cols, col_stride, threshold,
             scale, negative_slope, alpha, ACTIVATION, HAS_BIAS, DROPOUT, BACKWARD, COMPUTE)
    _quarter(X, BIAS, DY, OUT, base + 2 * QUARTER, r2, n_elements, n_cols, col_stride, threshold,
             scale, negative_slope, alpha, ACTIVATION, HAS_BIAS, DROPOUT, BACKWARD, COMPUTE)
    _quarter(X, BIAS, DY, OUT, base + 3 * QUARTER, r3, n_elements, n_cols, col_stride, threshold,
             scale, negative_slope, alpha, ACTIVATION, HAS_BIAS, DROPOUT, BACKWARD, COMPUTE)


def _kernel_args(x, activation, p, dropout, negative_slope, alpha, has_bias, seed):
    """Launch arguments shared by forward and backward."""
    scale_hi, scale_lo = rt.split_f32(0.0 if p >= 1.0 else 1.0 / (1.0 - p))
    slope_hi, slope_lo = rt.split_f32(negative_slope)
    alpha_hi, alpha_lo = rt.split_f32(alpha)
    n_cols = x.shape[-1] if x.dim() else 1
    return dict(
        n_elements=x.numel(), n_cols=max(n_cols, 1), col_stride=x.stride(-1) if n_cols > 1 else 1,
        seed=seed, threshold=min(math.ceil(p * 2.0**31), 2**31) - 1,
        scale_hi=scale_hi, scale_lo=scale_lo, slope_hi=slope_hi, slope_lo=slope_lo,
        alpha_hi=alpha_hi, alpha_lo=alpha_lo,
        ACTIVATION=activation, HAS_BIAS=has_bias, DROPOUT=dropout,
        COMPUTE=rt.compute_dtype(x.dtype), INT64=rt.needs_int64(x), QUARTER=QUARTER, num_warps=4,
    )


def _walks_as_is(x: torch.Tensor) -> bool:
    """Whether the kernels can walk x's memory as it is: any dense layout (the bias index follows
    the last dim's stride).  Other inputs are copied to contiguous first."""
    return rt.is_dense(x)


def _empty_output(x: torch.Tensor) -> torch.Tensor:
    if _walks_as_is(x):
        return torch.empty_like(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _forward_impl(x, bias, seed, activation, p, dropout, negative_slope, alpha):
    has_bias = bias is not None
    if not _walks_as_is(x):
        x = x.contiguous()
    y = torch.empty_like(x)
    if x.numel():
        args = _kernel_args(x, activation, p, dropout, negative_slope, alpha, has_bias, int(seed))
        _kernel[(triton.cdiv(x.numel(), BLOCK),)](x, bias if has_bias else x, x, y, BACKWARD=False,
                                                  **args)
    return y


def _backward_impl(dy, x, bias, seed, activation, p, dropout, negative_slope, alpha):
    has_bias = bias is not None
    if not _walks_as_is(x):
        x = x.contiguous()
    if dy.stride() != x.stride():
        dy = torch.empty_like(x).copy_(dy)  # walk dy in x's layout: the mask is keyed by offset
    dx = torch.empty_like(x)
    if x.numel():
        args = _kernel_args(x, activation, p, dropout, negative_slope, alpha, has_bias, int(seed))
        _kernel[(triton.cdiv(x.numel(), BLOCK),)](x, bias if has_bias else x, dy, dx, BACKWARD=True,
                                                  **args)
    return dx


def _differentiable_backward(ctx, dy):
    """Backward under create_graph=True (double backward): the same gradients from torch ops,
    which autograd can differentiate again.  The mask is drawn again as a tensor (the forward
    kernel on ones); the first-order path never comes here."""
    x, bias, seed = ctx.saved_tensors
    activation, p, dropout, negative_slope, alpha = ctx.cfg
    act, approximate = ("gelu", "tanh") if activation == "gelu_tanh" else (activation, "none")
    wanted = [t for t, need in zip((x, bias), ctx.needs_input_grad[:2]) if need]
    with torch.enable_grad():
        y = eager_activation(x if bias is None else x + bias, act, negative_slope, alpha,
                             approximate)
        if dropout:  # keep * 1 / (1 - p) (0 when p = 1), drawn in the memory order forward walked
            walked = x if _walks_as_is(x) else x.contiguous()
            ones = torch.ones_like(walked)  # walked's strides: dense, so empty_like keeps them
            y = y * _forward_impl(ones, None, seed, "identity", p, True, 0.0, 0.0)
    grads = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need else None for need in ctx.needs_input_grad[:2])


def _grads(ctx, dy, backward):
    """(dx, dbias) from what forward saved: x, the bias and the seed, never the mask."""
    if torch.is_grad_enabled():
        return _differentiable_backward(ctx, dy)
    x, bias, seed = ctx.saved_tensors
    dx = backward(dy, x, bias, seed, *ctx.cfg)
    dbias = None
    if bias is not None and ctx.needs_input_grad[1]:
        # sum over every dim but the last (flatten, not reshape(-1, n): n may be 0)
        rows = dx if dx.dim() == 1 else dx.flatten(0, -2).sum(0, dtype=rt.accum_dtype(dx.dtype))
        dbias = rows.to(bias.dtype)
    return dx, dbias


class _ActivationDropoutFunction(torch.autograd.Function):
    """Eager autograd: dispatching a torch.library op costs tens of microseconds per call, as much
    as the kernel on a few-MB tensor, so eager calls take this path and torch.compile the ops."""

    # forward without ctx and a separate setup_context: what torch.func transforms require
    @staticmethod
    def forward(x, bias, seed, *cfg):
        return _forward_impl(x, bias, seed, *cfg)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)  # a non-dense x is copied again in backward

    @staticmethod
    def backward(ctx, dy):
        return (*_grads(ctx, dy, _backward_impl), None) + (None,) * len(ctx.cfg)


# The same kernels as torch.library custom ops (fake implementations, an autograd formula), which
# torch.compile(fullgraph=True) traces through.  The seed travels as a 0-dim CPU tensor: drawing it
# is part of the traced graph, and reading it here costs no GPU sync.
@torch.library.custom_op("tkern::activation_dropout", mutates_args=())
def _forward_op(x: torch.Tensor, bias: Optional[torch.Tensor], seed: torch.Tensor, activation: str,
                p: float, dropout: bool, negative_slope: float, alpha: float) -> torch.Tensor:
    return _forward_impl(x, bias, seed, activation, p, dropout, negative_slope, alpha)


@_forward_op.register_fake
def _(x, bias, seed, activation, p, dropout, negative_slope, alpha):
    return _empty_output(x)


@torch.library.custom_op("tkern::activation_dropout_backward", mutates_args=())
def _backward_op(dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], seed: torch.Tensor,
                 activation: str, p: float, dropout: bool, negative_slope: float,
                 alpha: float) -> torch.Tensor:
    return _backward_impl(dy, x, bias, seed, activation, p, dropout, negative_slope, alpha)


@_backward_op.register_fake
def _(dy, x, bias, seed, activation, p, dropout, negative_slope, alpha):
    return _empty_output(x)


def _setup_context(ctx, inputs, output):
    x, bias, seed, *cfg = inputs
    ctx.save_for_backward(x, bias, seed)
    ctx.cfg = cfg


_forward_op.register_autograd(
    lambda ctx, dy: (*_grads(ctx, dy, _backward_op), None) + (None,) * len(ctx.cfg),
    setup_context=_setup_context)


class _ProbabilityError(ValueError, RuntimeError):
    """A bad dropout probability.  ``F.dropout`` raises ValueError out of [0, 1] and RuntimeError
    for NaN; this is both."""


def _probability(p) -> float:
    """p as a float (a Python or numpy number, or a one-element tensor, as ``F.dropout`` takes)."""
    if not isinstance(p, (numbers.Real, torch.Tensor)):  # numpy scalars are numbers.Real
        raise TypeError(f"dropout probability must be a number, got {type(p).__name__}")
    value = float(p)  # a tensor of more than one element raises, as in torch
    if not 0.0 <= value <= 1.0:  # NaN fails both comparisons
        raise _ProbabilityError(f"dropout probability has to be between 0 and 1, but got {p}")
    return value


def _check(x, bias, activation, p, approximate):
    activation = kernel_name(activation, approximate)  # validates the name
    p = _probability(p)
    rt.check_floating("activation_dropout", x=x, bias=bias)
    if bias is not None:
        # torch's x + bias broadcasts; tkern takes the biases that vary along the last dim only
        # and leave x's shape as it is: [n] or [1] after leading ones
        n = x.shape[-1] if x.dim() else None
        if (x.dim() == 0 or bias.dim() > x.dim() or any(d != 1 for d in bias.shape[:-1])
                or (bias.dim() and bias.shape[-1] not in (1, n))):
            raise RuntimeError(
                f"tkern.activation_dropout: bias must broadcast over x's last dim ({n} elements) "
                f"without changing x's shape {tuple(x.shape)}, got shape {tuple(bias.shape)}")
    return p


def _contiguous_bias(x, bias):
    """The bias as the kernels index it: contiguous [n].  Differentiable (done outside the
    autograd.Function), so a broadcast bias gets its summed gradient."""
    if bias is None or (bias.dim() == 1 and bias.stride(0) == 1 and bias.shape[0] == x.shape[-1]):
        return bias  # the common case: no view ops on the host path
    return bias.reshape(-1).expand(x.shape[-1]).contiguous()


def _eager(x, bias, activation, p, dropout, negative_slope, alpha, approximate, generator):
    """The CPU fallback, in plain PyTorch (autograd through the composite)."""
    z = x if bias is None else x + bias
    y = eager_activation(z, activation, negative_slope, alpha, approximate)
    if not dropout:
        return y
    keep = torch.rand(y.shape, generator=generator, device=y.device) >= p
    return torch.where(keep, y * (0.0 if p >= 1.0 else 1.0 / (1.0 - p)), y * 0.0)


def activation_dropout(x, activation="relu", p=0.5, training=True, *, bias=None,
                       negative_slope=0.01, alpha=1.0, approximate="none", min_val=-1.0,
                       max_val=1.0, beta=1.0, threshold=20.0, generator=None):
    """``dropout(act(x + bias), p)`` in one fused kernel each way.

    Args:
        x: input of any shape and floating dtype; the output has its shape, dtype and (when x is
            dense) its memory layout.
        activation: one of identity, relu, leaky_relu, sigmoid, tanh, gelu, silu, elu, relu6,
            hardtanh, hardswish, hardsigmoid, mish, softplus.
        p: probability of zeroing an element; survivors are scaled by 1 / (1 - p).
        training: dropout applies only when True (and p > 0), as with ``F.dropout``.
        bias: optional tensor added over the last dimension before the activation: ``[n]``,
            or any shape that broadcasts over the last dim alone (``[1]``, ``[1, n]``, ...).
            The output keeps x's dtype (a mixed-precision epilogue: an fp32 bias on bf16
            activations gives bf16), where torch's ``x + bias`` would promote.
        negative_slope, alpha, approximate, min_val/max_val, beta/threshold: parameters of
            leaky_relu, elu, gelu, hardtanh and softplus, as torch's.
        generator: where the Philox seed is drawn from (default: torch's default generator).
    """
    p = _check(x, bias, activation, p, approximate)
    # the kernels' two activation scalars (see tkern.activations)
    negative_slope, alpha = activation_scalars(activation, negative_slope, alpha, min_val, max_val,
                                               beta, threshold)
    dropout = bool(training) and p > 0.0
    if not rt.use_triton("activation_dropout", x, bias):
        return _eager(x, bias, activation, p, dropout, negative_slope, alpha, approximate, generator)
    bias = _contiguous_bias(x, bias)
    seed = rt.draw_seed_tensor(generator) if dropout else torch.zeros((), dtype=torch.int64)
    args = (x, bias, seed, kernel_name(activation, approximate), p, dropout, negative_slope, alpha)
    if torch.compiler.is_compiling():
        return _forward_op(*args)
    return _ActivationDropoutFunction.apply(*args)
