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
- The seed comes from torch's generator (see ``draw_seed``): ``torch.manual_seed`` reproduces a run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _runtime as rt
from ..activations import activate, activation_grad, eager_activation, kernel_name

QUARTER = 512
BLOCK = 4 * QUARTER


@triton.jit
def _keep(r, p):
    # r: random uint32 words; an element survives with probability 1 - p
    return tl.uint_to_uniform_float(r) >= p


@triton.jit
def _forward_quarter(X, BIAS, Y, offs, r, n_elements, n_cols, p, scale, negative_slope, alpha,
                     ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
                     COMPUTE: tl.constexpr):
    mask = offs < n_elements
    z = tl.load(X + offs, mask=mask, other=0.0).to(COMPUTE)
    if HAS_BIAS:
        z += tl.load(BIAS + offs % n_cols, mask=mask, other=0.0).to(COMPUTE)
    y = activate(z, ACTIVATION, negative_slope, alpha)
    if DROPOUT:
        # select, not multiply: with p = 1 nothing survives and no 0 * inf can appear
        y = tl.where(_keep(r, p), y * scale, 0.0)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _forward_kernel(
    X,  # input, flat (n_elements,)
    BIAS,  # bias over the last dim (n_cols,), or a dummy when HAS_BIAS is False
    Y,  # output, flat (n_elements,), same layout as X
    n_elements, n_cols,  # element count; length of the last dim (bias index = offset % n_cols)
    seed, p,  # Philox seed; drop probability
    scale: tl.float64,  # 1 / (1 - p), or 0 when p == 1
    negative_slope: tl.float64, alpha: tl.float64,  # leaky_relu slope; elu alpha
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    COMPUTE: tl.constexpr,  # fp32, or fp64 for fp64 tensors
    INT64: tl.constexpr,  # index in int64 (tensors past 2^31 elements)
    QUARTER: tl.constexpr,
):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    # float arguments in the compute type, exact for fp64 (see docs/CONVENTIONS.md)
    scale = (tl.zeros([1], COMPUTE) + scale).to(COMPUTE)
    negative_slope = (tl.zeros([1], COMPUTE) + negative_slope).to(COMPUTE)
    alpha = (tl.zeros([1], COMPUTE) + alpha).to(COMPUTE)
    lanes = tl.arange(0, QUARTER)
    counters = pid * QUARTER + lanes
    if DROPOUT:
        r0, r1, r2, r3 = tl.randint4x(seed, counters)
    else:
        r0, r1, r2, r3 = counters, counters, counters, counters  # unused
    base = pid * (4 * QUARTER) + lanes
    _forward_quarter(X, BIAS, Y, base, r0, n_elements, n_cols, p, scale, negative_slope, alpha,
                     ACTIVATION, HAS_BIAS, DROPOUT, COMPUTE)
    _forward_quarter(X, BIAS, Y, base + QUARTER, r1, n_elements, n_cols, p, scale, negative_slope,
                     alpha, ACTIVATION, HAS_BIAS, DROPOUT, COMPUTE)
    _forward_quarter(X, BIAS, Y, base + 2 * QUARTER, r2, n_elements, n_cols, p, scale,
                     negative_slope, alpha, ACTIVATION, HAS_BIAS, DROPOUT, COMPUTE)
    _forward_quarter(X, BIAS, Y, base + 3 * QUARTER, r3, n_elements, n_cols, p, scale,
                     negative_slope, alpha, ACTIVATION, HAS_BIAS, DROPOUT, COMPUTE)


@triton.jit
def _backward_quarter(X, BIAS, DY, DX, offs, r, n_elements, n_cols, p, scale, negative_slope, alpha,
                      ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
                      COMPUTE: tl.constexpr):
    mask = offs < n_elements
    z = tl.load(X + offs, mask=mask, other=0.0).to(COMPUTE)
    if HAS_BIAS:
        z += tl.load(BIAS + offs % n_cols, mask=mask, other=0.0).to(COMPUTE)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(COMPUTE)
    dz = dy * activation_grad(z, ACTIVATION, negative_slope, alpha)
    if DROPOUT:
        dz = tl.where(_keep(r, p), dz * scale, 0.0)
    tl.store(DX + offs, dz.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    X, BIAS,  # forward's input and bias (the bias a dummy when HAS_BIAS is False)
    DY,  # gradient of y, in X's layout
    DX,  # gradient of x (= gradient of z), in X's layout
    n_elements, n_cols, seed, p,  # as in forward
    scale: tl.float64, negative_slope: tl.float64, alpha: tl.float64,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    COMPUTE: tl.constexpr, INT64: tl.constexpr, QUARTER: tl.constexpr,
):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    # float arguments in the compute type, exact for fp64 (see docs/CONVENTIONS.md)
    scale = (tl.zeros([1], COMPUTE) + scale).to(COMPUTE)
    negative_slope = (tl.zeros([1], COMPUTE) + negative_slope).to(COMPUTE)
    alpha = (tl.zeros([1], COMPUTE) + alpha).to(COMPUTE)
    lanes = tl.arange(0, QUARTER)
    counters = pid * QUARTER + lanes
    if DROPOUT:
        r0, r1, r2, r3 = tl.randint4x(seed, counters)
    else:
        r0, r1, r2, r3 = counters, counters, counters, counters
    base = pid * (4 * QUARTER) + lanes
    _backward_quarter(X, BIAS, DY, DX, base, r0, n_elements, n_cols, p, scale, negative_slope, alpha,
                      ACTIVATION, HAS_BIAS, DROPOUT, COMPUTE)
    _backward_quarter(X, BIAS, DY, DX, base + QUARTER, r1, n_elements, n_cols, p, scale,
                      negative_slope, alpha, ACTIVATION, HAS_BIAS, DROPOUT, COMPUTE)
    _backward_quarter(X, BIAS, DY, DX, base + 2 * QUARTER, r2, n_elements, n_cols, p, scale,
                      negative_slope, alpha, ACTIVATION, HAS_BIAS, DROPOUT, COMPUTE)
    _backward_quarter(X, BIAS, DY, DX, base + 3 * QUARTER, r3, n_elements, n_cols, p, scale,
                      negative_slope, alpha, ACTIVATION, HAS_BIAS, DROPOUT, COMPUTE)


def _kernel_args(x, cfg):
    """Launch arguments shared by forward and backward."""
    p, dropout = cfg["p"], cfg["dropout"]
    scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
    n_cols = x.shape[-1] if x.dim() > 0 else 1
    return dict(
        n_elements=x.numel(), n_cols=max(n_cols, 1), seed=cfg["seed"], p=p, scale=scale,
        negative_slope=cfg["negative_slope"], alpha=cfg["alpha"],
        ACTIVATION=cfg["kernel_activation"], HAS_BIAS=cfg["has_bias"], DROPOUT=dropout,
        COMPUTE=rt.compute_dtype(x.dtype), INT64=rt.needs_int64(x), QUARTER=QUARTER,
        num_warps=4,
    )


def _flat_input(x: torch.Tensor, has_bias: bool) -> torch.Tensor:
    """x as the kernels walk it: as it is when dense (any dim order) and, with a bias, row-major;
    otherwise a contiguous copy."""
    if x.is_contiguous() or (not has_bias and rt.is_dense(x)):
        return x
    return x.contiguous()


def _forward(x, bias, cfg):
    x = _flat_input(x, bias is not None)
    y = torch.empty_like(x)
    if x.numel():
        grid = (triton.cdiv(x.numel(), BLOCK),)
        _forward_kernel[grid](x, bias if bias is not None else x, y, **_kernel_args(x, cfg))
    return x, y


def _backward(x, bias, dy, cfg):
    if dy.stride() != x.stride():
        dy = torch.empty_like(x).copy_(dy)  # walk dy in x's layout
    dx = torch.empty_like(x)
    if x.numel():
        grid = (triton.cdiv(x.numel(), BLOCK),)
        _backward_kernel[grid](x, bias if bias is not None else x, dy, dx, **_kernel_args(x, cfg))
    return dx


class ActivationDropoutFunction(torch.autograd.Function):
    """autograd for the fused kernels; saves x (and the bias), never the mask."""

    @staticmethod
    def forward(ctx, x, bias, cfg):
        x_flat, y = _forward(x, bias, cfg)
        ctx.save_for_backward(x_flat, bias)
        ctx.cfg = cfg
        return y

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        dx = _backward(x, bias, dy, ctx.cfg)
        dbias = None
        if bias is not None and ctx.needs_input_grad[1]:
            dbias = dx.reshape(-1, bias.numel()).sum(0, dtype=rt.accum_dtype(dx.dtype)).to(bias.dtype)
        return dx, dbias, None


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


def _eager(x, bias, cfg, approximate, generator):
    """The CPU fallback, in plain PyTorch (autograd through the composite)."""
    z = x if bias is None else x + bias
    act = cfg["activation"]
    y = eager_activation(z, act, cfg["negative_slope"], cfg["alpha"], approximate)
    if not cfg["dropout"]:
        return y
    p = cfg["p"]
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
    cfg = dict(
        activation=activation or "identity", kernel_activation=kernel_name(activation, approximate),
        p=float(p), dropout=dropout, negative_slope=float(negative_slope), alpha=float(alpha),
        has_bias=bias is not None, seed=rt.draw_seed(generator) if dropout else 0,
    )
    if not rt.use_triton("activation_dropout", x, bias):
        return _eager(x, bias, cfg, approximate, generator)
    return ActivationDropoutFunction.apply(x, bias, cfg)
