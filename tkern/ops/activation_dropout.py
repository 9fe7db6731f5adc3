"""Fused activation + dropout: ``y = dropout(act(x + bias), p)``.

Design:
- Forward reads x (and the bias) once and writes y once; backward reads x and dy, writes dx, and
  with a bias sums the bias gradient in the same pass: each program adds dz over its rows in
  fp32 (fp64 for fp64) and writes one partial row (a small [programs, n] buffer); the last
  program of each column block to finish (an int32 count per block, zeroed by the launcher)
  adds the partial rows up in row order: deterministic (no float atomics), one kernel launch.
- The dropout mask is never stored.  It is a function of (seed, element position) through
  Philox, so the backward kernel draws it again; what autograd saves is x (and the bias), from
  which backward rebuilds z = x + bias for the activation's derivative.
- Kernels walk x's memory as rows: rows of the last dim when there is a bias along a unit-stride
  last dim, else rows of QUARTER elements of flat memory (a bias along a strided last dim is then
  gathered per element, and its gradient is a torch sum of dx).  Element (row, col) keeps word
  row % 4 of the Philox call with counter (row // 4) * n_cols + col: independent of the tiling,
  and a tile of four quarters (rows 4k + q) uses all four words of each call in the data's
  layout.  The mask of a call with a bias therefore differs from the same call without one.
- Every load of a tile is issued before any math (bytes in flight); each thread holds 8
  contiguous elements (16-byte accesses in bf16).  Static predictions:
  ``python -m perf.static_cost --ops activation_dropout``.
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
from .._launch import Site, jit
from ._math import cast_rn, from_pair
from . import _rng
from ._op import Op, PlanCache, cdiv, f32_pairs, next_pow2, signature
from ..activations import (activate, activation_grad, activation_scalars, eager_activation,
                           kernel_name, named_scalars)

# A tile is four quarters of QUARTER elements over 128 threads: 8 contiguous elements a thread,
# one 16-byte access for bf16 (two for fp32).  Without a bias the kernels walk memory as rows
# of QUARTER elements, one tile a program (4 rows: BLOCK contiguous elements).
QUARTER = 1024
BLOCK = 4 * QUARTER
# With a bias, tiles are QUARTER elements of BIAS_COLS columns (fewer for narrower rows) a
# quarter: narrow enough that the bias-gradient backward has many column programs.
BIAS_COLS = 256
# Philox4x32 rounds per call: 7, the fewest that Salmon et al. (SC'11, "Parallel random numbers:
# as easy as 1, 2, 3") found to pass TestU01's BigCrush with no failures (Triton's default, 10,
# is their safety margin); each round costs ~6 instructions per 4 elements (~4 with WIDE_MUL,
# see _mul_hi_lo), and 10 rounds kept bf16 bias+GELU+dropout issue-bound (perf/RESULTS.md)
N_ROUNDS = 7


# Philox4x32's multipliers and key increments (Salmon et al.), as Triton's tl.randint4x: the
# same words (tests/test_activation_dropout.py checks them bit for bit)
PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)


@triton.jit
def _mul_hi_lo(a, M: tl.constexpr, WIDE_MUL: tl.constexpr):
    # (hi, lo) words of the 64-bit product a * M (uint32).  WIDE_MUL (compiled on NVIDIA): one
    # mul.wide.u32 (IMAD.WIDE.U32) for both, where umulhi and a low multiply are two
    # instructions.  Inline PTX because the 64-bit form of the same product in Triton ops makes
    # Triton's layout pass convert the mask through shared memory instead of drawing it in the
    # data's layout (perf.static_cost, bf16 forward: 1012 SASS instructions a thread, 11 of them
    # barriers, against 955).  Otherwise Triton's own two (the interpreter runs no inline PTX).
    if WIDE_MUL:
        hi, lo = tl.inline_asm_elementwise(
            "{ .reg .b64 t; mul.wide.u32 t, $2, $3; mov.b64 {$1, $0}, t; }", "=r,=r,r,r",
            [a, tl.full(a.shape, M, tl.uint32)], dtype=(tl.uint32, tl.uint32), is_pure=True,
            pack=1)
    else:
        hi = tl.umulhi(a, M)
        lo = tl.mul(a, M, sanitize_overflow=False)
    return hi, lo


@triton.jit
def _philox4x32(seed, counter, N_ROUNDS: tl.constexpr, WIDE_MUL: tl.constexpr):
    """The four uint32 words of Philox4x32-N_ROUNDS with key ``seed`` at counters (counter's low
    word, its high word, 0, 0): ``tl.randint4x(seed, counter, N_ROUNDS)``'s words, each round's
    two products from two wide multiplies (WIDE_MUL, see ``_mul_hi_lo``)."""
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    c0 = counter.to(tl.uint32)
    zero = c0 * 0
    c1 = zero
    if counter.dtype.primitive_bitwidth > 32:
        c1 = (counter >> 32).to(tl.uint32)
    c2 = zero
    c3 = zero
    for _ in tl.static_range(N_ROUNDS):
        hi0, lo0 = _mul_hi_lo(c0, PHILOX_M0, WIDE_MUL)
        hi2, lo2 = _mul_hi_lo(c2, PHILOX_M1, WIDE_MUL)
        c0 = hi2 ^ c1 ^ k0
        c1 = lo2
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = tl.add(k0, PHILOX_W0, sanitize_overflow=False)
        k1 = tl.add(k1, PHILOX_W1, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def _keep(r, threshold):
    # r: random uint32 words, uniform on [0, 2^32); an element is dropped when r <= threshold =
    # ceil(p * 2^32) - 1 (uint32, passed bitcast to int32), with probability ceil(p * 2^32) /
    # 2^32 (p to within 2^-32), one unsigned compare: no int-to-float conversion per element
    return r > threshold.to(tl.uint32, bitcast=True)


@triton.jit
def _load_quarter(X, DY, offs, mask, BACKWARD: tl.constexpr, EVEN: tl.constexpr):
    # x and dy (x when absent) of one quarter
    if EVEN:  # every tile full: no bounds to check
        x = tl.load(X + offs)
    else:
        x = tl.load(X + offs, mask=mask, other=0.0)
    dy = x
    if BACKWARD:
        if EVEN:
            dy = tl.load(DY + offs)
        else:
            dy = tl.load(DY + offs, mask=mask, other=0.0)
    return x, dy


@triton.jit
def _quarter_out(x, b, dy, r, threshold, scale, negative_slope, alpha, ACTIVATION: tl.constexpr,
                 HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, BACKWARD: tl.constexpr,
                 COMPUTE: tl.constexpr):
    # forward: y = act(z) * mask * scale; backward: dz = dy * act'(z) * mask * scale (COMPUTE)
    z = x.to(COMPUTE)
    if HAS_BIAS:
        z += b.to(COMPUTE)
    if BACKWARD:
        out = dy.to(COMPUTE) * activation_grad(z, ACTIVATION, negative_slope, alpha)
    else:
        out = activate(z, ACTIVATION, negative_slope, alpha)
    if DROPOUT:
        # dropped elements are out * 0, as torch's x * mask: 0, or NaN where out is inf or NaN
        out = out * tl.where(_keep(r, threshold), scale, 0.0)
    return out


@triton.jit
def _store_quarter(OUT, offs, mask, out, EVEN: tl.constexpr):
    if EVEN:
        tl.store(OUT + offs, cast_rn(out, OUT.dtype.element_ty))
    else:
        tl.store(OUT + offs, cast_rn(out, OUT.dtype.element_ty), mask=mask)


@triton.jit
def _tile(X, BIAS, DY, OUT, group, rows, cols, b, seed, n_elements, n_cols, bias_cols,
          col_stride, threshold, scale, negative_slope, alpha, ACTIVATION: tl.constexpr,
          HAS_BIAS: tl.constexpr, BIAS_GATHER: tl.constexpr, DROPOUT: tl.constexpr,
          BACKWARD: tl.constexpr, COMPUTE: tl.constexpr, ROWS: tl.constexpr,
          EVEN: tl.constexpr, EVEN_COLS: tl.constexpr, N_ROUNDS: tl.constexpr,
          WIDE_MUL: tl.constexpr):
    """One tile: rows 4 * (group * ROWS + i) + q (quarter q, i < ROWS) of the [rows, n_cols]
    view, columns ``cols``; writes y (dx) and returns the four quarters' outputs (COMPUTE) and
    their bounds masks."""
    k_row = group * ROWS + rows  # [ROWS, 1]: the Philox counter's row, shared by the quarters
    row0 = k_row * (4 * n_cols)
    o0 = row0 + cols
    o1 = o0 + n_cols
    o2 = o1 + n_cols
    o3 = o2 + n_cols
    m0 = o0 < n_elements  # with cols < n_cols, the row bound (see _kernel)
    if not EVEN_COLS:
        m0 = m0 & (cols < n_cols)
    m1 = m0 & (o1 < n_elements)
    m2 = m0 & (o2 < n_elements)
    m3 = m0 & (o3 < n_elements)
    # every load of the tile before any math (bytes in flight)
    x0, d0 = _load_quarter(X, DY, o0, m0, BACKWARD, EVEN)
    x1, d1 = _load_quarter(X, DY, o1, m1, BACKWARD, EVEN)
    x2, d2 = _load_quarter(X, DY, o2, m2, BACKWARD, EVEN)
    x3, d3 = _load_quarter(X, DY, o3, m3, BACKWARD, EVEN)
    b0, b1, b2, b3 = b, b, b, b  # the tile's bias columns (loaded once by the caller)
    if BIAS_GATHER:  # a bias along a strided last dim: its index is (offset // stride) % size
        b0 = tl.load(BIAS + (o0 // col_stride) % bias_cols, mask=m0, other=0.0)
        b1 = tl.load(BIAS + (o1 // col_stride) % bias_cols, mask=m1, other=0.0)
        b2 = tl.load(BIAS + (o2 // col_stride) % bias_cols, mask=m2, other=0.0)
        b3 = tl.load(BIAS + (o3 // col_stride) % bias_cols, mask=m3, other=0.0)
    if DROPOUT:
        # one Philox call per (row // 4, column): its word q is the mask of row 4 * k_row + q,
        # each word in the quarter's own shape (the data's layout)
        counter = k_row * n_cols + cols
        if WIDE_MUL:
            r0, r1, r2, r3 = _philox4x32(seed, counter, N_ROUNDS, WIDE_MUL)
        else:  # the same words
            r0, r1, r2, r3 = tl.randint4x(seed, counter, N_ROUNDS)
    else:
        r0, r1, r2, r3 = o0, o1, o2, o3  # unused
    y0 = _quarter_out(x0, b0, d0, r0, threshold, scale, negative_slope, alpha, ACTIVATION,
                      HAS_BIAS, DROPOUT, BACKWARD, COMPUTE)
    _store_quarter(OUT, o0, m0, y0, EVEN)
    y1 = _quarter_out(x1, b1, d1, r1, threshold, scale, negative_slope, alpha, ACTIVATION,
                      HAS_BIAS, DROPOUT, BACKWARD, COMPUTE)
    _store_quarter(OUT, o1, m1, y1, EVEN)
    y2 = _quarter_out(x2, b2, d2, r2, threshold, scale, negative_slope, alpha, ACTIVATION,
                      HAS_BIAS, DROPOUT, BACKWARD, COMPUTE)
    _store_quarter(OUT, o2, m2, y2, EVEN)
    y3 = _quarter_out(x3, b3, d3, r3, threshold, scale, negative_slope, alpha, ACTIVATION,
                      HAS_BIAS, DROPOUT, BACKWARD, COMPUTE)
    _store_quarter(OUT, o3, m3, y3, EVEN)
    return y0, y1, y2, y3, m0, m1, m2, m3


@triton.jit
def _partial_rows(PARTIAL, rows, cols, n_parts, n_cols):
    # loads at L2 (.cg): the rows were written by other SMs
    return tl.load(PARTIAL + rows * n_cols + cols, mask=(rows < n_parts) & (cols < n_cols),
                   other=0.0, cache_modifier=".cg")


@triton.jit
def _add_partials(PARTIAL, GRAD, n_parts, n_cols, cols1, PARTS: tl.constexpr,
                  TRIPS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """GRAD[cols1] = the column sums of PARTIAL's n_parts rows [n_parts, n_cols], PARTS rows a
    trip, in row order (the same bits whichever program runs it).  TRIPS > 0: the trips
    unrolled (their loads issued together; and no loop that perf.static_cost would count as
    every program's), else a loop."""
    parts = tl.arange(0, PARTS)[:, None]
    cols = cols1[None, :]
    acc = tl.zeros([PARTS, BLOCK_COLS], dtype=PARTIAL.dtype.element_ty)
    if TRIPS > 0:
        for t in tl.static_range(TRIPS):
            acc += _partial_rows(PARTIAL, t * PARTS + parts, cols, n_parts, n_cols)
    else:
        for start in range(0, n_parts, PARTS):
            acc += _partial_rows(PARTIAL, start + parts, cols, n_parts, n_cols)
    tl.store(GRAD + cols1, cast_rn(tl.sum(acc, axis=0), GRAD.dtype.element_ty),
             mask=cols1 < n_cols)


@jit(do_not_specialize=["seed"])  # a new seed per call: one compiled variant
def _kernel(
    X,  # input, flat (n_elements,): the [n_elements / n_cols, n_cols] view
    BIAS,  # bias over the last dim (bias_cols,), or a dummy when HAS_BIAS is False
    DY,  # backward: gradient of y, in X's layout; forward: a dummy
    OUT,  # forward: y; backward: dx (= dz); flat, in X's layout
    DBIAS,  # SUM_DBIAS: the bias gradient's partial sums [programs along rows, n_cols] (ACC)
    # when DBIAS_PARTIAL, else the bias gradient (n_cols,) itself; else a dummy
    GRAD,  # DBIAS_PARTIAL: the bias gradient (n_cols,), summed by the last program of each
    # column block; else a dummy
    DONE,  # DBIAS_PARTIAL: int32 [programs along columns], zeros: programs done per column block
    n_elements, n_cols,  # element count; the view's row length (the last dim with a bias)
    bias_cols, col_stride,  # BIAS_GATHER: the last dim's size and stride
    n_col_programs, groups_per_program,  # programs along columns; SUM_DBIAS: row groups a program
    SEED,  # a 0-dim int64 tensor holding the Philox seed when SEED_FROM_PTR, else a dummy
    seed, threshold,  # Philox seed (unless SEED_FROM_PTR); drop threshold (see _keep)
    # fp32 pairs (hi, lo) of 1 / (1 - p) (0 when p == 1), the leaky_relu slope and the elu alpha
    scale_hi, scale_lo, slope_hi, slope_lo, alpha_hi, alpha_lo,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    BACKWARD: tl.constexpr,
    BIAS_GATHER: tl.constexpr,  # the bias indexed per element (flat view), not per column
    SUM_DBIAS: tl.constexpr,  # backward: sum dz over rows into DBIAS
    DBIAS_PARTIAL: tl.constexpr,  # DBIAS holds partial sums (ACC), else the gradient itself
    PARTS: tl.constexpr, TRIPS: tl.constexpr,  # DBIAS_PARTIAL: partial rows a trip of the
    # final sum; its trips when unrolled (0: a loop)
    SEED_FROM_PTR: tl.constexpr,  # seed from SEED (device-side: CUDA graphs, compile, CPU)
    COMPUTE: tl.constexpr,  # fp32, or fp64 for fp64 tensors
    ACC: tl.constexpr,  # the bias gradient's accumulation type: fp32, or fp64
    INT64: tl.constexpr,  # index in int64 (tensors past 2^31 elements)
    ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,  # a quarter: [ROWS, BLOCK_COLS]
    EVEN: tl.constexpr,  # every tile full: no bounds checks
    EVEN_COLS: tl.constexpr,  # BLOCK_COLS divides n_cols
    N_ROUNDS: tl.constexpr,  # Philox rounds
    WIDE_MUL: tl.constexpr,  # Philox's products through PTX mul.wide (see _mul_hi_lo)
):
    # The mask of element (row, col) of the [rows, n_cols] view is word row % 4 of the Philox
    # call with counter (row // 4) * n_cols + col: a function of the element alone, so any
    # tiling draws it (forward, backward and the double-backward composite agree), and a tile
    # of rows 4k..4k+3 uses all four words of each call.  Offset o = row * n_cols + col is in
    # bounds iff o < n_elements and col < n_cols.
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    pid_col = pid % n_col_programs
    pid_row = pid // n_col_programs
    scale = from_pair(scale_hi, scale_lo, COMPUTE)
    negative_slope = from_pair(slope_hi, slope_lo, COMPUTE)
    alpha = from_pair(alpha_hi, alpha_lo, COMPUTE)
    rows = tl.arange(0, ROWS)[:, None]
    cols = pid_col * BLOCK_COLS + tl.arange(0, BLOCK_COLS)[None, :]
    if DROPOUT and SEED_FROM_PTR:
        seed = tl.load(SEED)
    b = tl.zeros([1, BLOCK_COLS], dtype=COMPUTE)
    if HAS_BIAS and not BIAS_GATHER:  # one load of the tile's bias columns
        if EVEN_COLS:
            b = tl.load(BIAS + cols)
        else:
            b = tl.load(BIAS + cols, mask=cols < n_cols, other=0.0)
    if SUM_DBIAS:
        acc = tl.zeros([ROWS, BLOCK_COLS], dtype=ACC)
        for step in range(groups_per_program):
            y0, y1, y2, y3, m0, m1, m2, m3 = _tile(
                X, BIAS, DY, OUT, pid_row * groups_per_program + step, rows, cols, b, seed,
                n_elements, n_cols, bias_cols, col_stride, threshold, scale, negative_slope,
                alpha, ACTIVATION, HAS_BIAS, BIAS_GATHER, DROPOUT, BACKWARD, COMPUTE, ROWS, EVEN,
                EVEN_COLS, N_ROUNDS, WIDE_MUL)
            if EVEN:
                acc += (y0.to(ACC) + y1.to(ACC)) + (y2.to(ACC) + y3.to(ACC))
            else:  # out of bounds: no term (the activation of the zeros loaded there may be inf)
                acc += ((tl.where(m0, y0, 0.0).to(ACC) + tl.where(m1, y1, 0.0).to(ACC))
                        + (tl.where(m2, y2, 0.0).to(ACC) + tl.where(m3, y3, 0.0).to(ACC)))
        total = tl.sum(acc, axis=0)  # [BLOCK_COLS]: a fixed order, deterministic
        cols1 = pid_col * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        if DBIAS_PARTIAL:
            tl.store(DBIAS + pid_row * n_cols + cols1, total, mask=cols1 < n_cols)
            # The last program of the column block to finish adds the partial rows up, in row
            # order: deterministic, and no second launch.  The barrier orders every thread's
            # partial store before the count; the count's release / acquire (GPU scope) makes
            # all rows visible to the last program.
            tl.debug_barrier()
            n_row_programs = tl.num_programs(0) // n_col_programs
            done = tl.atomic_add(DONE + pid_col, 1, sem="acq_rel", scope="gpu")
            if done == n_row_programs - 1:
                _add_partials(DBIAS, GRAD, n_row_programs, n_cols, cols1, PARTS, TRIPS,
                              BLOCK_COLS)
        else:
            tl.store(DBIAS + cols1, cast_rn(total, DBIAS.dtype.element_ty), mask=cols1 < n_cols)
    else:
        _tile(X, BIAS, DY, OUT, pid_row, rows, cols, b, seed, n_elements, n_cols, bias_cols,
              col_stride, threshold, scale, negative_slope, alpha, ACTIVATION, HAS_BIAS,
              BIAS_GATHER, DROPOUT, BACKWARD, COMPUTE, ROWS, EVEN, EVEN_COLS, N_ROUNDS,
              WIDE_MUL)


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
    threshold = min(math.ceil(p * 2.0**32), 2**32) - 1  # as uint32; bitcast to int32 below
    if threshold >= 2**31:
        threshold -= 2**32
    return (threshold, *f32_pairs(0.0 if p >= 1.0 else 1.0 / (1.0 - p), negative_slope, alpha))


class _View(NamedTuple):
    """How a launch walks x's memory (see ``_kernel``): as [n / n_cols, n_cols] rows."""
    n_cols: int
    gather: bool  # the bias indexed per element: a bias along a strided last dim
    rows: int  # a quarter's tile: [rows, block_cols]
    block_cols: int


@functools.lru_cache(maxsize=1024)
def _plan_view(n_cols: int, col_stride: int, has_bias: bool, itemsize: int) -> _View:
    if has_bias and col_stride == 1:  # rows of the last dim: the bias is one load a tile
        block = min(BIAS_COLS, next_pow2(n_cols))
        # 4-byte and 8-byte types: half the elements a quarter (4 a thread), which keeps the
        # bias-gradient backward's four quarters of x and dy in registers without spills
        quarter = QUARTER if itemsize <= 2 else QUARTER // 2
        return _View(n_cols, False, max(1, quarter // block), block)
    return _View(QUARTER, has_bias, 1, QUARTER)  # flat: rows of QUARTER elements


def _view(x: torch.Tensor, has_bias: bool) -> _View:
    """The view of a dense x (tiles differ by dtype; the mask depends on n_cols alone, so
    forward, backward and the composite agree)."""
    n_cols = x.shape[-1] if x.dim() else 1
    return _plan_view(n_cols, x.stride(-1) if n_cols > 1 else 1, has_bias, x.element_size())


# Programs along rows for the bias gradient: about this many resident programs per SM in all
DBIAS_PROGRAMS_PER_SM = 4
# Partial rows a trip of the final bias-gradient sum (a [DBIAS_PARTS, BLOCK_COLS] tile in ACC):
# 16 x 256 fp32 is 32 registers a thread (33 partial rows, 4096 columns on 132 SMs: 3 trips).
# Up to DBIAS_UNROLL trips are unrolled.
DBIAS_PARTS = 16
DBIAS_UNROLL = 4


def _dbias_row_programs(device: torch.device, groups: int, col_programs: int) -> int:
    """Programs along rows, each summing its rows into one partial row: enough to fill a GPU,
    few for a small partial buffer (one under the interpreter: no partials at all)."""
    if not rt.plans_for_gpu(device):
        return 1
    return max(1, min(groups, DBIAS_PROGRAMS_PER_SM * rt.sm_count(device) // col_programs))


class _Launch(NamedTuple):
    """Everything of a ``_kernel`` launch but its tensors and the per-call seed int."""
    grid: tuple
    kwargs: dict  # ``_kernel``'s parameters after DONE, by name (SEED and seed excepted)
    partial_rows: int  # rows of the bias gradient's partial sums, 0 for none
    col_programs: int  # programs along columns: the last-program counts (with partial rows)


def _arguments(x, bias, seed, cfg, backward, sum_dbias) -> _Launch:
    """The launch over x's memory (dense: any dim order) for these inputs' metadata and the
    config; ``sum_dbias`` (backward, a bias along a unit-stride last dim) sums the bias gradient
    too: in the kernel directly, or into partial sums that the last program of each column block
    adds up (its int32 counts zeroed by the caller: a fill, no second kernel)."""
    n = x.numel()
    v = _view(x, bias is not None)
    n_rows = cdiv(n, v.n_cols)
    col_programs = cdiv(v.n_cols, v.block_cols)
    groups = cdiv(n_rows, 4 * v.rows)
    steps, row_programs, partial_rows = 1, groups, 0
    if sum_dbias:
        row_programs = _dbias_row_programs(x.device, groups, col_programs)
        steps = cdiv(groups, row_programs)
        row_programs = cdiv(groups, steps)
        if row_programs > 1:
            partial_rows = row_programs
    trips = cdiv(partial_rows, DBIAS_PARTS)
    even_cols = v.n_cols % v.block_cols == 0
    even = (even_cols and n == n_rows * v.n_cols and n_rows % (4 * v.rows) == 0
            and groups == row_programs * steps)
    bias_cols = x.shape[-1] if x.dim() else 1
    threshold, *pairs = _scalars(cfg.p, cfg.negative_slope, cfg.alpha)
    acc64 = sum_dbias and _dbias_accum(x, bias) == torch.float64
    kwargs = dict(
        n_elements=n, n_cols=v.n_cols, bias_cols=max(bias_cols, 1),
        col_stride=x.stride(-1) if bias_cols > 1 else 1, n_col_programs=col_programs,
        groups_per_program=steps, threshold=threshold,
        **dict(zip(("scale_hi", "scale_lo", "slope_hi", "slope_lo", "alpha_hi", "alpha_lo"),
                   pairs)),
        ACTIVATION=cfg.activation, HAS_BIAS=bias is not None, DROPOUT=cfg.dropout,
        BACKWARD=backward, BIAS_GATHER=v.gather, SUM_DBIAS=sum_dbias,
        DBIAS_PARTIAL=partial_rows > 0, PARTS=DBIAS_PARTS,
        TRIPS=trips if trips <= DBIAS_UNROLL else 0, SEED_FROM_PTR=seed is not None,
        COMPUTE=rt.compute_dtype(x.dtype), ACC=tl.float64 if acc64 else tl.float32,
        INT64=rt.needs_int64(x), ROWS=v.rows, BLOCK_COLS=v.block_cols, EVEN=even,
        EVEN_COLS=even_cols, N_ROUNDS=N_ROUNDS,
        WIDE_MUL=cfg.dropout and _wide_mul(x),
        num_warps=4)
    return _Launch((row_programs * col_programs,), kwargs, partial_rows, col_programs)


def _wide_mul(x: torch.Tensor) -> bool:
    """Whether the kernels take Philox's products from inline PTX (``_mul_hi_lo``): compiled for
    NVIDIA (CUDA, or CPU tensors planned as a GPU's by perf.static_cost; not Triton's
    interpreter, not ROCm), for 2-byte types, whose instruction mix is the limit (4-byte types
    move twice the bytes an element; their bias-gradient backward took 94 registers with it,
    against 80, and so fewer bytes in flight)."""
    return (x.element_size() <= 2 and rt.plans_for_gpu(x.device)
            and x.device.type in ("cuda", "cpu") and torch.version.hip is None
            and not rt.interpreter_enabled())


def _bias_grad_buffers(x, bias, a: _Launch):
    """(partial rows, zeroed counts) of a launch summing the bias gradient through partials."""
    partial = x.new_empty((a.partial_rows, a.kwargs["n_cols"]), dtype=_dbias_accum(x, bias))
    return partial, torch.zeros(a.col_programs, dtype=torch.int32, device=x.device)


def _launch(x, bias, dy, out, seed, cfg, backward, dbias=None):
    """One ``_kernel`` launch (``_arguments``); with ``dbias`` the bias gradient is summed too,
    into ``dbias`` directly or through partial sums its last programs add up."""
    a = _arguments(x, bias, seed, cfg, backward, dbias is not None)
    partial = done = None
    if a.partial_rows:
        partial, done = _bias_grad_buffers(x, bias, a)
    _kernel[a.grid](x, bias if bias is not None else x, dy, out,
                    (partial if partial is not None else dbias) if dbias is not None else x,
                    dbias if partial is not None else x, done if done is not None else x,
                    SEED=seed if seed is not None else x, seed=cfg.philox_seed, **a.kwargs)


class _Program:
    """A signature's launches (``_op`` programs): forward, and backward with and without the
    bias gradient, as ``Site``s (fixed dtypes; the seed int live).  Made for dense x; a dy laid
    out otherwise, or a bias gathered per element, takes ``_backward``."""

    def __init__(self, inputs, cfg):
        x, bias, seed = inputs
        self.stride, self.dtype = x.stride(), x.dtype
        self.gather = bias is not None and _view(x, True).gather
        self.sites = {}
        for backward, sum_dbias in ((False, False), (True, False), (True, True)):
            if sum_dbias and (bias is None or self.gather):
                continue
            a = _arguments(x, bias, seed, cfg, backward, sum_dbias)
            site = Site(_kernel, a.grid, (), ("SEED",), ("seed",), **a.kwargs).fixed_dtypes()
            self.sites[backward, sum_dbias] = (site, a)

    def forward(self, cfg, x, bias, seed):
        y = torch.empty_like(x)
        site = self.sites[False, False][0]
        site(x, x if bias is None else bias, x, y, x, x, x, x if seed is None else seed,
             cfg.philox_seed)
        return (y,)

    def backward(self, douts, saved, cfg, needs):
        dy = douts[0]
        x, bias, seed = saved
        want_dbias = bias is not None and needs[1]
        if dy.stride() != self.stride or dy.dtype != self.dtype or (want_dbias and self.gather):
            return None
        site, a = self.sites[True, want_dbias]
        dx = torch.empty_like(x)
        dbias = out = grad = done = None
        if want_dbias:
            dbias = out = torch.empty_like(bias)
            if a.partial_rows:
                out, done = _bias_grad_buffers(x, bias, a)
                grad = dbias
        site(x, x if bias is None else bias, dy, dx, x if out is None else out,
             x if grad is None else grad, x if done is None else done,
             x if seed is None else seed, cfg.philox_seed)
        return dx, dbias


def _program(inputs, cfg):
    x = inputs[0]
    if x.numel() == 0 or not _walks_as_is(x):
        return None
    return _Program(inputs, cfg)


def _dbias_accum(x: torch.Tensor, bias: torch.Tensor) -> torch.dtype:
    """The bias gradient's accumulation type: fp64 when x or the bias is fp64, else fp32."""
    return torch.float64 if torch.float64 in (x.dtype, bias.dtype) else torch.float32


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
    """(dx, dbias) from x, the bias and the seed (never a mask): one kernel, which also sums the
    bias gradient over rows (on a GPU through partial sums that its last programs add up)."""
    (dy,), (x, bias, seed) = douts, saved
    if not _walks_as_is(x):
        x = x.contiguous()
    if dy.stride() != x.stride():
        dy = torch.empty_like(x).copy_(dy)  # walk dy in x's layout: the mask is keyed by offset
    dx = torch.empty_like(x)
    want_dbias = bias is not None and needs[1]
    in_kernel = want_dbias and x.numel() and not _view(x, True).gather
    dbias = torch.empty(bias.shape, dtype=bias.dtype, device=bias.device) if in_kernel else None
    if x.numel():
        _launch(x, bias, dy, dx, seed, cfg, backward=True, dbias=dbias)
    if want_dbias and not in_kernel:
        # empty x, or a bias along a strided last dim: every dim but the last (flatten, not
        # reshape(-1, n): n may be 0), accumulated in fp32 (fp64) by torch's reduction
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
        zero_bias = None if bias is None else torch.zeros_like(bias)  # forward's view
        with torch.no_grad():
            mask, = _forward(ones, zero_bias, seed, cfg._replace(activation="identity"))
        y = y * mask
    return y


# The declaration: eager autograd, torch.library ops (tkern::activation_dropout and
# tkern::activation_dropout_backward) for torch.compile, and double backward, built by _op.Op.
OP = Op("tkern::activation_dropout", inputs=("x", "bias?", "seed?"), outputs=("y",),
        config=DropoutConfig, forward=_forward, fake=_forward_fake, saves=("x", "bias", "seed"),
        grads=("x", "bias"), backward=_backward, backward_fake=_backward_fake,
        composite=_composite, program=_program,
        program_key=lambda cfg: cfg[:-1])  # not philox_seed: a new one every call


# Calls that passed activation_dropout's checks, by their scalars and signature
# (``_op.signature``): the config (seed 0), the op's program, whether the seed was a tensor.
_CALLS = PlanCache(None)


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
    key = None
    # plain tensors and float scalars only (a subclass, a 0-dim tensor p: the full path)
    if (x.__class__ is torch.Tensor and p.__class__ is float and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active()):  # wrapped tensors: full path
        key = (activation, p, training, negative_slope, alpha, approximate, min_val, max_val,
               beta, threshold, *signature((x, bias)))
        hit = _CALLS.plans.get(key)
        if hit is not None:
            cfg, program, seed_tensor = hit
            seed = None
            if cfg.dropout:
                seed, seed_int = _rng.draw(x.device, generator)
                if seed_int:
                    cfg = cfg._replace(philox_seed=seed_int)
                if (seed is not None) != seed_tensor:  # capturing now, or no longer
                    return OP.apply(x, bias, seed, cfg=cfg)[0]
            return OP.run(program, (x, bias, seed), cfg)[0]
    p = _check(x, bias, activation, p, approximate)
    # the kernels' two activation scalars (see tkern.activations)
    negative_slope, alpha = activation_scalars(activation, negative_slope, alpha, min_val, max_val,
                                               beta, threshold)
    rt.check_scalars("activation_dropout", x.dtype,
                     **named_scalars(activation, negative_slope, alpha))
    dropout = bool(training) and p > 0.0
    if not rt.use_triton("activation_dropout", x, bias):
        return _eager(x, bias, activation, p, dropout, negative_slope, alpha, approximate, generator)
    given, bias = bias, _contiguous_bias(x, bias)
    seed, seed_int = _rng.draw(x.device, generator) if dropout else (None, 0)
    cfg = DropoutConfig(kernel_name(activation, approximate), p, dropout, negative_slope, alpha,
                        seed_int)
    y = OP.apply(x, bias, seed, cfg=cfg)[0]
    if key is not None and bias is given:
        _CALLS.put(key, (cfg._replace(philox_seed=0), OP.program((x, bias, seed), cfg),
                         seed is not None))
    return y
