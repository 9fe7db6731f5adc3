"""Fused activation + dropout: ``y = dropout(act(x + bias), p)``.

Design:
- Forward reads x (and the bias) once and writes y once; backward reads x and dy, writes dx.
- The dropout mask is never stored.  It is a function of (seed, element offset) through Philox, so
  the backward kernel draws it again; what autograd saves is x (and the bias), from which backward
  rebuilds z = x + bias for the activation's derivative.
- Each program covers BLOCK = 4 * QUARTER elements as four contiguous quarters.  One Philox call per
  counter gives four random words, one per quarter, a quarter of the generator's cost.  Counters are
  global (program * QUARTER + lane), so no two blocks share random numbers.  QUARTER is a fixed
  constant because the mask depends on it: forward and backward must agree.  Every quarter's loads
  are issued before any math (bytes in flight), each thread holds 8 contiguous elements (16-byte
  accesses in bf16), and each quarter's random word has the quarter's shape, so the mask is built
  in the data's layout.  Static predictions: ``python -m perf.static_cost --ops dropout``.
- The seed comes from torch's generators as torch's dropout takes it (``_rng.draw``): the CUDA
  device's Philox state (host-side, graph-safe under capture), the CPU generator for CPU tensors;
  ``torch.manual_seed`` reproduces a run.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import _runtime as rt
from .._launch import jit
from ._math import cast_rn, from_pair
from . import _rng
from ._op import Op, cdiv, f32_pairs
from ..activations import (activate, activation_grad, activation_scalars, eager_activation,
                           kernel_name, named_scalars)

# 1024 elements a quarter over 128 threads: 8 contiguous elements a thread, one 16-byte access
# for bf16 (two for fp32)
QUARTER = 1024
BLOCK = 4 * QUARTER


@triton.jit
def _keep(r, threshold):
    # r: random uint32 words.  Their top 31 bits are a uniform integer u in [0, 2^31); an element
    # is dropped when u <= threshold = ceil(p * 2^31) - 1, with probability ceil(p * 2^31) / 2^31
    # (p to within 2^-31), in integer arithmetic: no int-to-float conversion per element.
    return (r >> 1).to(tl.int32, bitcast=True) > threshold


@triton.jit
def _load_quarter(X, BIAS, DY, start, lanes, n_elements, n_cols, col_stride,
                  HAS_BIAS: tl.constexpr, BIAS_ROW: tl.constexpr, BACKWARD: tl.constexpr,
                  EVEN: tl.constexpr):
    # x, the bias and dy of the quarter at element offset start (bias and dy: x when absent)
    offs = start + lanes
    if EVEN:  # every program full: no bounds to check
        x = tl.load(X + offs)
    else:
        x = tl.load(X + offs, mask=offs < n_elements, other=0.0)
    b = x
    if HAS_BIAS:
        if BIAS_ROW:  # the quarter lies in one row: its columns are contiguous from one start
            b = tl.load(BIAS + (start % n_cols) + lanes)
        elif EVEN:  # in a dense layout, the last-dim index of offset o is (o // stride) % size
            b = tl.load(BIAS + (offs // col_stride) % n_cols)
        else:
            b = tl.load(BIAS + (offs // col_stride) % n_cols, mask=offs < n_elements, other=0.0)
    dy = x
    if BACKWARD:
        if EVEN:
            dy = tl.load(DY + offs)
        else:
            dy = tl.load(DY + offs, mask=offs < n_elements, other=0.0)
    return x, b, dy


@triton.jit
def _store_quarter(OUT, start, lanes, n_elements, x, b, dy, r, threshold, scale, negative_slope,
                   alpha, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
                   BACKWARD: tl.constexpr, COMPUTE: tl.constexpr, EVEN: tl.constexpr):
    z = x.to(COMPUTE)
    if HAS_BIAS:
        z += b.to(COMPUTE)
    if BACKWARD:  # dz = dy * act'(z) * mask * scale
        out = dy.to(COMPUTE) * activation_grad(z, ACTIVATION, negative_slope, alpha)
    else:  # y = act(z) * mask * scale
        out = activate(z, ACTIVATION, negative_slope, alpha)
    if DROPOUT:
        # a select, so the scale (0 when p = 1) never meets a dropped inf; dropped elements are
        # out * 0, as torch's x * mask: 0, or NaN where out is inf or NaN
        out = tl.where(_keep(r, threshold), out * scale, out * 0.0)
    offs = start + lanes
    if EVEN:
        tl.store(OUT + offs, cast_rn(out, OUT.dtype.element_ty))
    else:
        tl.store(OUT + offs, cast_rn(out, OUT.dtype.element_ty), mask=offs < n_elements)


@jit(do_not_specialize=["seed"])  # a new seed per call: one compiled variant
def _kernel(
    X,  # input, flat (n_elements,)
    BIAS,  # bias over the last dim (n_cols,), or a dummy when HAS_BIAS is False
    DY,  # backward: gradient of y, in X's layout; forward: a dummy
    OUT,  # forward: y; backward: dx (= dz); flat, in X's layout
    n_elements, n_cols, col_stride,  # element count; last dim's size and stride (the bias index)
    SEED,  # a 0-dim int64 tensor holding the Philox seed when SEED_FROM_PTR, else a dummy
    seed, threshold,  # Philox seed (unless SEED_FROM_PTR); drop threshold, ceil(p * 2^31) - 1
    # fp32 pairs (hi, lo) of 1 / (1 - p) (0 when p == 1), the leaky_relu slope and the elu alpha
    scale_hi, scale_lo, slope_hi, slope_lo, alpha_hi, alpha_lo,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    BACKWARD: tl.constexpr,
    SEED_FROM_PTR: tl.constexpr,  # seed from SEED (device-side: CUDA graphs, compile, CPU)
    COMPUTE: tl.constexpr,  # fp32, or fp64 for fp64 tensors
    INT64: tl.constexpr,  # index in int64 (tensors past 2^31 elements)
    QUARTER: tl.constexpr,
    EVEN: tl.constexpr,  # n_elements is a multiple of 4 * QUARTER: no bounds checks
    BIAS_ROW: tl.constexpr,  # col_stride 1 and QUARTER divides n_cols (see _load_quarter)
):
    # Every load of the four quarters is issued before any math (bytes in flight); each
    # quarter's random word r_q has the quarter's own shape, hence the data's layout.
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    scale = from_pair(scale_hi, scale_lo, COMPUTE)
    negative_slope = from_pair(slope_hi, slope_lo, COMPUTE)
    alpha = from_pair(alpha_hi, alpha_lo, COMPUTE)
    lanes = tl.arange(0, QUARTER)
    base = pid * (4 * QUARTER)
    x0, b0, d0 = _load_quarter(X, BIAS, DY, base, lanes, n_elements, n_cols, col_stride, HAS_BIAS,
                               BIAS_ROW, BACKWARD, EVEN)
    x1, b1, d1 = _load_quarter(X, BIAS, DY, base + QUARTER, lanes, n_elements, n_cols, col_stride,
                               HAS_BIAS, BIAS_ROW, BACKWARD, EVEN)
    x2, b2, d2 = _load_quarter(X, BIAS, DY, base + 2 * QUARTER, lanes, n_elements, n_cols,
                               col_stride, HAS_BIAS, BIAS_ROW, BACKWARD, EVEN)
    x3, b3, d3 = _load_quarter(X, BIAS, DY, base + 3 * QUARTER, lanes, n_elements, n_cols,
                               col_stride, HAS_BIAS, BIAS_ROW, BACKWARD, EVEN)
    counters = pid * QUARTER + lanes
    if DROPOUT:
        if SEED_FROM_PTR:
            seed = tl.load(SEED)
        r0, r1, r2, r3 = tl.randint4x(seed, counters)  # one Philox call, a word per quarter
    else:
        r0, r1, r2, r3 = counters, counters, counters, counters  # unused
    _store_quarter(OUT, base, lanes, n_elements, x0, b0, d0, r0, threshold, scale, negative_slope,
                   alpha, ACTIVATION, HAS_BIAS, DROPOUT, BACKWARD, COMPUTE, EVEN)
    _store_quarter(OUT, base + QUARTER, lanes, n_elements, x1, b1, d1, r1, threshold, scale,
                   negative_slope, alpha, ACTIVATION, HAS_BIAS, DROPOUT, BACKWARD, COMPUTE, EVEN)
    _store_quarter(OUT, base + 2 * QUARTER, lanes, n_elements, x2, b2, d2, r2, threshold, scale,
                   negative_slope, alpha, ACTIVATION, HAS_BIAS, DROPOUT, BACKWARD, COMPUTE, EVEN)
    _store_quarter(OUT, base + 3 * QUARTER, lanes, n_elements, x3, b3, d3, r3, threshold, scale,
                   negative_slope, alpha, ACTIVATION, HAS_BIAS, DROPOUT, BACKWARD, COMPUTE, EVEN)


class DropoutConfig(NamedTuple):
    """The scalar arguments of one call (the custom ops' schema comes from these annotations)."""
    activation: str  # a kernel name (``activations.kernel_name``)
    p: float
    dropout: bool  # training and p > 0
    negative_slope: float
    alpha: float
    philox_seed: int  # the seed when no seed tensor is given (CUDA, eager: see _rng)


@functools.lru_cache(maxsize=1024)
def _scalars(p: float, negative_slope: float, alpha: float) -> tuple:
    """(threshold, scale, slope and alpha as fp32 pairs): see ``_kernel``'s arguments."""
    threshold = min(math.ceil(p * 2.0**31), 2**31) - 1
    return (threshold, *f32_pairs(0.0 if p >= 1.0 else 1.0 / (1.0 - p), negative_slope, alpha))


def _launch(x, bias, dy, out, seed, cfg, backward):
    """One ``_kernel`` launch over x's memory (dense: any dim order)."""
    n = x.numel()
    n_cols = x.shape[-1] if x.dim() else 1
    col_stride = x.stride(-1) if n_cols > 1 else 1
    _kernel[(cdiv(n, BLOCK),)](
        x, bias if bias is not None else x, dy, out, n, max(n_cols, 1), col_stride,
        seed if seed is not None else x, cfg.philox_seed,
        *_scalars(cfg.p, cfg.negative_slope, cfg.alpha),
        ACTIVATION=cfg.activation, HAS_BIAS=bias is not None, DROPOUT=cfg.dropout,
        BACKWARD=backward, SEED_FROM_PTR=seed is not None, COMPUTE=rt.compute_dtype(x.dtype),
        INT64=rt.needs_int64(x), QUARTER=QUARTER, EVEN=n % BLOCK == 0,
        BIAS_ROW=bias is not None and col_stride == 1 and n_cols % QUARTER == 0, num_warps=4)


def _walks_as_is(x: torch.Tensor) -> bool:
    """Whether the kernels can walk x's memory as it is: any dense layout (the bias index follows
    the last dim's stride).  Other inputs are copied to contiguous first."""
    return rt.is_dense(x)


def _empty_output(x: torch.Tensor) -> torch.Tensor:
    if _walks_as_is(x):
        return torch.empty_like(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _forward(x, bias, seed, cfg):
    if not _walks_as_is(x):
        x = x.contiguous()
    y = torch.empty_like(x)
    if x.numel():
        _launch(x, bias, x, y, seed, cfg, backward=False)
    return (y,)


def _forward_fake(x, bias, seed, cfg):
    return (_empty_output(x),)


def _backward(douts, saved, cfg, needs):
    """(dx, dbias) from x, the bias and the seed (never a mask): one kernel, plus the bias
    gradient's sum over rows."""
    (dy,), (x, bias, seed) = douts, saved
    if not _walks_as_is(x):
        x = x.contiguous()
    if dy.stride() != x.stride():
        dy = torch.empty_like(x).copy_(dy)  # walk dy in x's layout: the mask is keyed by offset
    dx = torch.empty_like(x)
    if x.numel():
        _launch(x, bias, dy, dx, seed, cfg, backward=True)
    dbias = None
    if bias is not None and needs[1]:
        # every dim but the last (flatten, not reshape(-1, n): n may be 0), accumulated in fp32
        # (fp64) and written in the bias' dtype by the one reduction kernel
        rows = dx if dx.dim() == 1 else dx.flatten(0, -2)
        dbias = rows.sum(0, dtype=bias.dtype) if dx.dim() > 1 else dx.to(bias.dtype)
    return dx, dbias


def _backward_fake(douts, saved, cfg, needs):
    (dy,), (x, bias, seed) = douts, saved
    dbias = bias.new_empty(bias.shape) if bias is not None and needs[1] else None
    return _empty_output(x), dbias


def _composite(saved, cfg):
    """y from torch ops, for double backward.  The mask is drawn again as a tensor (the forward
    kernel on ones, in the memory order forward walked)."""
    x, bias, seed = saved
    act, approximate = (("gelu", "tanh") if cfg.activation == "gelu_tanh"
                        else (cfg.activation, "none"))
    y = eager_activation(x if bias is None else x + bias, act, cfg.negative_slope, cfg.alpha,
                         approximate)
    if cfg.dropout:  # keep * 1 / (1 - p) (0 when p = 1)
        walked = x if _walks_as_is(x) else x.contiguous()
        ones = torch.ones_like(walked)  # walked's strides: dense, so empty_like keeps them
        with torch.no_grad():
            mask, = _forward(ones, None, seed, cfg._replace(activation="identity"))
        y = y * mask
    return y


# The declaration: eager autograd, torch.library ops (tkern::activation_dropout and
# tkern::activation_dropout_backward) for torch.compile, and double backward, built by _op.Op.
OP = Op("tkern::activation_dropout", inputs=("x", "bias?", "seed?"), outputs=("y",),
        config=DropoutConfig, forward=_forward, fake=_forward_fake, saves=("x", "bias", "seed"),
        grads=("x", "bias"), backward=_backward, backward_fake=_backward_fake,
        composite=_composite)


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
    rt.check_scalars("activation_dropout", x.dtype,
                     **named_scalars(activation, negative_slope, alpha))
    dropout = bool(training) and p > 0.0
    if not rt.use_triton("activation_dropout", x, bias):
        return _eager(x, bias, activation, p, dropout, negative_slope, alpha, approximate, generator)
    bias = _contiguous_bias(x, bias)
    seed, seed_int = _rng.draw(x.device, generator) if dropout else (None, 0)
    cfg = DropoutConfig(kernel_name(activation, approximate), p, dropout, negative_slope, alpha,
                        seed_int)
    return OP.apply(x, bias, seed, cfg=cfg)[0]
