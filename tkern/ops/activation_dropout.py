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

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _runtime as rt
from ._math import from_pair
from ..activations import activate, activation_grad, eager_activation, kernel_name

QUARTER = 512
BLOCK = 4 * QUARTER


@triton.jit
def _keep(r, p):
    # r: random uint32 words; an element survives with probability 1 - p
    return tl.uint_to_uniform_float(r) >= p


@triton.jit
def _quarter(X, BIAS, DY, OUT, offs, r, n_elements, n_cols, p, scale, negative_slope, alpha,
             ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
             BACKWARD: tl.constexpr, COMPUTE: tl.constexpr):
    mask = offs < n_elements
    z = tl.load(X + offs, mask=mask, other=0.0).to(COMPUTE)
    if HAS_BIAS:
        z += tl.load(BIAS + offs % n_cols, mask=mask, other=0.0).to(COMPUTE)
    if BACKWARD:  # dz = dy * act'(z) * mask * scale
        out = tl.load(DY + offs, mask=mask, other=0.0).to(COMPUTE)
        out = out * activation_grad(z, ACTIVATION, negative_slope, alpha)
    else:  # y = act(z) * mask * scale
        out = activate(z, ACTIVATION, negative_slope, alpha)
    if DROPOUT:
        # select, not multiply: with p = 1 nothing survives and no 0 * inf can appear
        out = tl.where(_keep(r, p), out * scale, 0.0)
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _kernel(
    X,  # input, flat (n_elements,)
    BIAS,  # bias over the last dim (n_cols,), or a dummy when HAS_BIAS is False
    DY,  # backward: gradient of y, in X's layout; forward: a dummy
    OUT,  # forward: y; backward: dx (= dz); flat, in X's layout
    n_elements, n_cols,  # element count; length of the last dim (bias index = offset % n_cols)
    seed, p,  # Philox seed; drop probability
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
    _quarter(X, BIAS, DY, OUT, base, r0, n_elements, n_cols, p, scale, negative_slope, alpha,
             ACTIVATION, HAS_BIAS, DROPOUT, BACKWARD, COMPUTE)
    _quarter(X, BIAS, DY, OUT, base + QUARTER, r1, n_elements, n_cols, p, scale, negative_slope,
             alpha, ACTIVATION, HAS_BIAS, DROPOUT, BACKWARD, COMPUTE)
    _quarter(X, BIAS, DY, OUT, base + 2 * QUARTER, r2, n_elements, n_cols, p, scale,
             negative_slope, alpha, ACTIVATION, HAS_BIAS, DROPOUT, BACKWARD, COMPUTE)
    _quarter(X, BIAS, DY, OUT, base + 3 * QUARTER, r3, n_elements, n_cols, p, scale,
             negative_slope, alpha, ACTIVATION, HAS_BIAS, DROPOUT, BACKWARD, COMPUTE)


def _kernel_args(x, activation, p, dropout, negative_slope, alpha, has_bias, seed):
    """Launch arguments shared by forward and backward."""
    scale_hi, scale_lo = rt.split_f32(0.0 if p >= 1.0 else 1.0 / (1.0 - p))
    slope_hi, slope_lo = rt.split_f32(negative_slope)
    alpha_hi, alpha_lo = rt.split_f32(alpha)
    return dict(
        n_elements=x.numel(), n_cols=max(x.shape[-1], 1) if x.dim() else 1, seed=seed, p=p,
        scale_hi=scale_hi, scale_lo=scale_lo, slope_hi=slope_hi, slope_lo=slope_lo,
        alpha_hi=alpha_hi, alpha_lo=alpha_lo,
        ACTIVATION=activation, HAS_BIAS=has_bias, DROPOUT=dropout,
        COMPUTE=rt.compute_dtype(x.dtype), INT64=rt.needs_int64(x), QUARTER=QUARTER, num_warps=4,
    )


def _walks_as_is(x: torch.Tensor, has_bias: bool) -> bool:
    """Whether the kernels can walk x's memory as it is: any dense layout, or, with a bias (indexed
    by offset % n_cols), a row-major one.  Other inputs are copied to contiguous first."""
    return x.is_contiguous() or (not has_bias and rt.is_dense(x))


def _empty_output(x: torch.Tensor, has_bias: bool) -> torch.Tensor:
    return torch.empty_like(x) if _walks_as_is(x, has_bias) else torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _forward_impl(x, bias, seed, activation, p, dropout, negative_slope, alpha):
    has_bias = bias is not None
    if not _walks_as_is(x, has_bias):
        x = x.contiguous()
    y = torch.empty_like(x)
    if x.numel():
        args = _kernel_args(x, activation, p, dropout, negative_slope, alpha, has_bias, int(seed))
        _kernel[(triton.cdiv(x.numel(), BLOCK),)](x, bias if has_bias else x, x, y, BACKWARD=False,
                                                  **args)
    return y


def _backward_impl(dy, x, bias, seed, activation, p, dropout, negative_slope, alpha):
    has_bias = bias is not None
    if not _walks_as_is(x, has_bias):
        x = x.contiguous()
    if dy.stride() != x.stride():
        dy = torch.empty_like(x).copy_(dy)  # walk dy in x's layout: the mask is keyed by offset
    dx = torch.empty_like(x)
    if x.numel():
        args = _kernel_args(x, activation, p, dropout, negative_slope, alpha, has_bias, int(seed))
        _kernel[(triton.cdiv(x.numel(), BLOCK),)](x, bias if has_bias else x, dy, dx, BACKWARD=True,
                                                  **args)
    return dx


def _grads(ctx, dy, backward):
    """(dx, dbias) from what forward saved: x, the bias and the seed, never the mask."""
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

    @staticmethod
    def forward(ctx, x, bias, seed, *cfg):
        if not _walks_as_is(x, bias is not None):
            x = x.contiguous()  # copy once, and save the copy: backward walks it as it is
        ctx.save_for_backward(x, bias, seed)
        ctx.cfg = cfg
        return _forward_impl(x, bias, seed, *cfg)

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
    return _empty_output(x, bias is not None)


@torch.library.custom_op("tkern::activation_dropout_backward", mutates_args=())
def _backward_op(dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], seed: torch.Tensor,
                 activation: str, p: float, dropout: bool, negative_slope: float,
                 alpha: float) -> torch.Tensor:
    return _backward_impl(dy, x, bias, seed, activation, p, dropout, negative_slope, alpha)


@_backward_op.register_fake
def _(dy, x, bias, seed, activation, p, dropout, negative_slope, alpha):
    return _empty_output(x, bias is not None)


def _setup_context(ctx, inputs, output):
    x, bias, seed, *cfg = inputs
    ctx.save_for_backward(x, bias, seed)
    ctx.cfg = cfg


_forward_op.register_autograd(
    lambda ctx, dy: (*_grads(ctx, dy, _backward_op), None) + (None,) * len(ctx.cfg),
    setup_context=_setup_context)


def _check(x, bias, activation, p, approximate):
    activation = kernel_name(activation, approximate)  # validates the name
    if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:  # NaN fails both comparisons
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    rt.check_floating("activation_dropout", x=x, bias=bias)
    if bias is not None:
        if bias.dim() != 1 or x.dim() == 0 or bias.shape[0] != x.shape[-1]:
            raise RuntimeError(
                f"tkern.activation_dropout: bias must be 1-D with x.shape[-1] = "
                f"{x.shape[-1] if x.dim() else None} elements, got shape {tuple(bias.shape)}"
            )
    return activation


def _eager(x, bias, activation, p, dropout, negative_slope, alpha, approximate, generator):
    """The CPU fallback, in plain PyTorch (autograd through the composite)."""
    z = x if bias is None else x + bias
    y = eager_activation(z, activation, negative_slope, alpha, approximate)
    if not dropout:
        return y
    keep = torch.rand(y.shape, generator=generator, device=y.device) >= p
    return torch.where(keep, y * (0.0 if p >= 1.0 else 1.0 / (1.0 - p)), 0.0).to(y.dtype)


def activation_dropout(x, activation="relu", p=0.5, training=True, *, bias=None,
                       negative_slope=0.01, alpha=1.0, approximate="none", generator=None):
    """``dropout(act(x + bias), p)`` in one fused kernel each way.

    Args:
        x: input of any shape and floating dtype; the output has its shape, dtype and (when x is
            dense) its memory layout.
        activation: one of identity, relu, leaky_relu, sigmoid, tanh, gelu, silu, elu.
        p: probability of zeroing an element; survivors are scaled by 1 / (1 - p).
        training: dropout applies only when True (and p > 0), as with ``F.dropout``.
        bias: optional 1-D tensor added over the last dimension before the activation.
        negative_slope, alpha, approximate: parameters of leaky_relu, elu and gelu.
        generator: where the Philox seed is drawn from (default: torch's default generator).
    """
    _check(x, bias, activation, p, approximate)
    dropout = bool(training) and p > 0.0
    if not rt.use_triton("activation_dropout", x, bias):
        return _eager(x, bias, activation, p, dropout, negative_slope, alpha, approximate, generator)
    seed = rt.draw_seed_tensor(generator) if dropout else torch.zeros((), dtype=torch.int64)
    args = (x, bias, seed, kernel_name(activation, approximate), float(p), dropout,
            float(negative_slope), float(alpha))
    if torch.compiler.is_compiling():
        return _forward_op(*args)
    return _ActivationDropoutFunction.apply(*args)
