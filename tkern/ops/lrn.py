"""Local Response Normalization across channels, PyTorch's and TensorFlow's semantics.

    y_c = x_c * s_c^(-beta),   s_c = k + a * sum_{c' in W(c)} x_c'^2,   W(c) = [c - before, c + after]

PyTorch (``local_response_norm``): channels on dim 1, before = size // 2, after = (size - 1) // 2,
a = alpha / size.  TensorFlow (``local_response_normalization``): channels on the last axis,
before = after = depth_radius, a = alpha.  Both run the same two kernels on an (N, C, S) strided
view: PyTorch's input as (N, C, prod(spatial)), TensorFlow's as (1, depth, rows) (the
channels_last case of the same view) or, for NCHW memory seen as NHWC, (N, depth, prod(middle)).

Design:
- Forward is one pass: each program owns a [BLOCK_C, BLOCK_S] tile of (channel, position) and sums
  the squares of its window by reloading the tile shifted by each channel offset in the window.
  Only the tile and its halo come from DRAM; the shifted reloads hit L1, and the 1-D grid puts
  channel tiles fastest so a halo was just read by the neighbouring program (L2).  Every window sum is
  summed directly, as torch's avg_pool does, rather than as a running sum over channels, so no
  cancellation error appears when a large value leaves the window (k = 0 stays accurate).
- Backward is one analytic pass that reads x and dy and writes dx:
      dx_i = dy_i * s_i^(-beta) - 2 a beta x_i * sum_{c : i in W(c)} dy_c x_c s_c^(-beta-1)
  The sum runs over the mirrored window c in [i - after, i + before]; for each such shift the
  program recomputes s at the shifted channels from x (a running sum would cancel badly when k
  is small).  Windows up to MAX_UNROLLED_WINDOW compile per (before, after) with the loops
  unrolled, so each shifted tile is loaded once: 2 size - 1 tiles of x and size of dy, all from
  L1/L2 but the tile itself.  Larger windows take a runtime loop, O(size^2) cached loads.
  Positions-contiguous layouts (NCHW) with windows up to MAX_UNROLLED_WINDOW take the sliding
  kernels instead (see their comment): each x and dy element read once, the window in registers;
  ``python -m perf.static_cost --ops lrn`` predicts them at >= 80% of copy bandwidth on the sweep's
  shapes (predictions, not timings).
  autograd saves x alone: s and y are recomputed, which costs no DRAM traffic, while saving them
  would add a write in forward and a read in backward.
- Double backward (create_graph=True, seen as grad mode on inside backward) recomputes the forward
  from the saved x as torch ops and differentiates that with create_graph; a first-order backward
  never leaves the kernel.
- Everything goes through strides, so NCHW, channels_last and transposed TensorFlow layouts are
  read in place and the output keeps the input's memory format.  Only a layout whose spatial dims
  cannot be merged into one stride (a sliced view, say) is copied first.
- Math in fp32 (fp64 for fp64).  s^(-beta) = exp2(-beta * log2|s|), with beta = 0 giving exactly 1
  as torch's pow does (and a zero gradient term, as torch's pow backward does).  A negative s
  (k < 0) follows pow too: the sign of the exponent's parity when it is an integer, else NaN; both
  are per-launch scalars, so each element pays one select.  Triton passes Python floats as fp32,
  so each scalar travels as an fp32 (hi, lo) pair that the kernel sums in COMPUTE: fp64 inputs
  keep a 48-bit alpha, beta and k.  Compiled fp32 on NVIDIA GPUs takes log2 and exp2 from the
  hardware approximations (lg2/ex2.approx, a few ulps; libdevice's log alone cost as much as the
  rest of the forward); fp64 and the interpreter take exact ones.
- Stores round to nearest even through ``_math.cast_rn`` (Triton's interpreter alone would
  truncate fp32 -> bf16).
- Windows are clipped to [-(C-1), C-1] on the host: any size >= 1 works and channels outside
  [0, C) are zeros (masked loads), as with torch's zero padding.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import _runtime as rt
from .._launch import Site, jit
from ._math import cast_rn, from_pair
from ._op import Op, PlanCache, f32_pairs

# Elements per tile, and per thread.  ptxas (sm_90a, fp32, NCHW, size 5 unrolled; see
# perf/RESULTS.md) gives the backward 92 registers at four elements a thread: one 512-thread
# program per SM, each thread with ~14 independent 16-byte loads in flight.
TILE = 2048
ELEMENTS_PER_THREAD = 4
# Windows up to this size (every LRN in the literature: AlexNet 5, GoogLeNet 5, Caffe's 3 to 9)
# compile per (before, after), unrolled: the backward then loads each shifted tile once, 2 size - 1
# x tiles and size dy tiles, where a runtime loop reloads size^2 + 2 size.  Larger windows loop.
MAX_UNROLLED_WINDOW = 9
# Positions per tile when positions are the contiguous dim (NCHW); channels per tile when channels
# are (channels_last, TensorFlow): 32 fp32 channels are one 128-byte line, and 96/192/256 split evenly.
BLOCK_CONTIG = 128
BLOCK_C_CONTIG = 32


@triton.jit
def _negative_base(e):
    # what |s|^e is multiplied by where s < 0, as torch's pow has it: the sign of e's parity for an
    # integer e, NaN otherwise.  One scalar per program, so each element pays one select.
    half = e * 0.5
    return tl.where(tl.floor(e) == e, tl.where(tl.floor(half) == half, 1.0, -1.0), float("nan"))


@triton.jit
def _log2(v, FAST: tl.constexpr):
    # FAST (compiled fp32 on NVIDIA): one MUFU instruction, CUDA's __log2f, documented to 2^-22
    # absolute error on [0.5, 2] and 2 ulp elsewhere (a relative error ~beta * 1e-7 in s^-beta).
    # libdevice's log2f compiles to ~30 PTX instructions: 77 -> 44 per element in the size-5
    # forward (perf.static_cost with FAST off and on)
    if FAST:
        r = tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [v], dtype=tl.float32,
                                      is_pure=True, pack=1)
    else:
        r = tl.log2(v)
    return r


@triton.jit
def _exp2(v, FAST: tl.constexpr):
    if FAST:  # without .ftz, unlike tl.exp2's lowering: subnormal results are kept
        r = tl.inline_asm_elementwise("ex2.approx.f32 $0, $1;", "=r,r", [v], dtype=tl.float32,
                                      is_pure=True, pack=1)
    else:
        r = tl.exp2(v)
    return r


@triton.jit
def _pow_abs(s, e, neg, FAST: tl.constexpr):
    # s^e for s != 0 as pow has it: |s|^e, times neg = _negative_base(e) where s < 0
    p = _exp2(e * _log2(tl.abs(s), FAST), FAST)
    return tl.where(s < 0.0, p * neg, p)


@triton.jit
def _tile(c_tiles, s_tiles, INT64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    # this program's batch index, channel column [BLOCK_C, 1] and position row [1, BLOCK_S].
    # Channel tiles vary fastest in launch order, so the halo a tile reads from its neighbours'
    # channels is still in L2 (it was read by the programs launched just before).
    pid = tl.program_id(0)
    pid_c = pid % c_tiles
    pid_ns = pid // c_tiles
    n = pid_ns // s_tiles
    st = pid_ns % s_tiles
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    s = st * BLOCK_S + tl.arange(0, BLOCK_S)
    if INT64:
        n = n.to(tl.int64)
        c = c.to(tl.int64)
        s = s.to(tl.int64)
    return n, c[:, None], s[None, :]


@triton.jit
def _at(T, base, c, s_ok, C, stride_c, COMPUTE: tl.constexpr):
    # the tile at channels c (zeros outside [0, C), as torch's zero padding)
    return tl.load(T + base + c * stride_c, mask=(c >= 0) & (c < C) & s_ok, other=0.0).to(COMPUTE)


@triton.jit
def _window_sumsq(X, base, c, j, s_ok, C, sxc, before, after, UNROLL: tl.constexpr,
                  BEFORE: tl.constexpr, AFTER: tl.constexpr, COMPUTE: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    # sum of x^2 over channels [c + j - before, c + j + after], summed directly.  UNROLL: the
    # window is the constexpr [BEFORE, AFTER], j is constexpr and the loop unrolls; each load's
    # channel is then c + (one constant), so the backward's overlapping windows share their loads
    # (the compiler merges loads of equal addresses).
    acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=COMPUTE)
    if UNROLL:
        for d in tl.static_range(-BEFORE, AFTER + 1):
            v = _at(X, base, c + (j + d), s_ok, C, sxc, COMPUTE)
            acc += v * v
    else:
        for d in range(-before, after + 1):
            v = _at(X, base, c + (j + d), s_ok, C, sxc, COMPUTE)
            acc += v * v
    return acc


@jit
def _lrn_forward_kernel(
    X,  # input viewed as (N, C, S), strides (sxn, sxc, sxs)
    Y,  # output (N, C, S), strides (syn, syc, sys)
    C, S, c_tiles, s_tiles,  # channels; positions; channel tiles; position tiles per batch row
    sxn, sxc, sxs, syn, syc, sys,
    before, after,  # window [c - before, c + after], clipped to C - 1 each way
    k_hi, k_lo, a_hi, a_lo, b_hi, b_lo,  # k, the scale of the square sum, beta: fp32 (hi, lo) pairs
    UNROLL: tl.constexpr, BEFORE: tl.constexpr, AFTER: tl.constexpr,  # see _window_sumsq
    FAST: tl.constexpr,  # approximate log2/exp2 instructions (see _log2)
    COMPUTE: tl.constexpr,  # fp32, or fp64 for fp64 tensors
    INT64: tl.constexpr,  # index in int64 (offsets past 2^31)
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    n, c, s = _tile(c_tiles, s_tiles, INT64, BLOCK_C, BLOCK_S)
    s_ok = s < S
    kk = from_pair(k_hi, k_lo, COMPUTE)
    aa = from_pair(a_hi, a_lo, COMPUTE)
    bb = from_pair(b_hi, b_lo, COMPUTE)
    xbase = n * sxn + s * sxs
    x = _at(X, xbase, c, s_ok, C, sxc, COMPUTE)
    sq = _window_sumsq(X, xbase, c, 0, s_ok, C, sxc, before, after, UNROLL, BEFORE, AFTER,
                       COMPUTE, BLOCK_C, BLOCK_S)
    # pow(s, 0) is 1 for every s in torch, NaN and 0 included
    f = tl.where(bb == 0.0, 1.0, _pow_abs(kk + aa * sq, -bb, _negative_base(-bb), FAST))
    tl.store(Y + n * syn + c * syc + s * sys, cast_rn(x * f, Y.dtype.element_ty), mask=(c < C) & s_ok)


@triton.jit
def _backward_term(X, G, xbase, gbase, c, j, s_ok, C, sxc, sgc, kk, aa, before, after, e1, neg1,
                   UNROLL: tl.constexpr, BEFORE: tl.constexpr, AFTER: tl.constexpr,
                   FAST: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_S: tl.constexpr):
    # (dy_c x_c s_c^(-beta-1), s_c) at channels c + j; zero outside [0, C), where k = 0 would
    # give 0 * inf
    cj = c + j
    sj = kk + aa * _window_sumsq(X, xbase, c, j, s_ok, C, sxc, before, after, UNROLL, BEFORE,
                                 AFTER, COMPUTE, BLOCK_C, BLOCK_S)
    term = _at(G, gbase, cj, s_ok, C, sgc, COMPUTE) * _at(X, xbase, cj, s_ok, C, sxc, COMPUTE)
    term = tl.where((cj >= 0) & (cj < C), term * _pow_abs(sj, e1, neg1, FAST), 0.0)
    return term, sj


@jit
def _lrn_backward_kernel(
    X,  # forward's input (N, C, S), strides (sxn, sxc, sxs)
    G,  # gradient of the output (N, C, S), strides (sgn, sgc, sgs)
    DX,  # gradient of the input (N, C, S), strides (sdn, sdc, sds)
    C, S, c_tiles, s_tiles,
    sxn, sxc, sxs, sgn, sgc, sgs, sdn, sdc, sds,
    before, after,  # forward's window; backward sums over the mirror [i - after, i + before]
    k_hi, k_lo, a_hi, a_lo, b_hi, b_lo,  # as in forward
    UNROLL: tl.constexpr, BEFORE: tl.constexpr, AFTER: tl.constexpr, FAST: tl.constexpr,
    COMPUTE: tl.constexpr, INT64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    n, c, s = _tile(c_tiles, s_tiles, INT64, BLOCK_C, BLOCK_S)
    s_ok = s < S
    kk = from_pair(k_hi, k_lo, COMPUTE)
    aa = from_pair(a_hi, a_lo, COMPUTE)
    bb = from_pair(b_hi, b_lo, COMPUTE)
    xbase = n * sxn + s * sxs
    gbase = n * sgn + s * sgs
    # s < 0 (k < 0): s^(-beta-1) has the integer-ness of s^(-beta) and the opposite parity
    neg = _negative_base(-bb)
    e1 = -bb - 1.0
    acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=COMPUTE)  # sum of dy_c x_c s_c^(-beta-1)
    # shift 0 first: it gives s_i.  Unrolled, every window and tile load is shared across shifts.
    term, s_i = _backward_term(X, G, xbase, gbase, c, 0, s_ok, C, sxc, sgc, kk, aa, before, after,
                               e1, -neg, UNROLL, BEFORE, AFTER, FAST, COMPUTE, BLOCK_C, BLOCK_S)
    acc += term
    if UNROLL:
        for j in tl.static_range(-AFTER, BEFORE + 1):
            if j != 0:
                term, _ = _backward_term(X, G, xbase, gbase, c, j, s_ok, C, sxc, sgc, kk, aa,
                                         before, after, e1, -neg, UNROLL, BEFORE, AFTER, FAST,
                                         COMPUTE, BLOCK_C, BLOCK_S)
                acc += term
    else:
        for j in range(-after, before + 1):
            if j != 0:
                term, _ = _backward_term(X, G, xbase, gbase, c, j, s_ok, C, sxc, sgc, kk, aa,
                                         before, after, e1, -neg, UNROLL, BEFORE, AFTER, FAST,
                                         COMPUTE, BLOCK_C, BLOCK_S)
                acc += term
    x = _at(X, xbase, c, s_ok, C, sxc, COMPUTE)
    g = _at(G, gbase, c, s_ok, C, sgc, COMPUTE)
    # beta = 0: y = x exactly (s^0 = 1 even at s = 0), and torch's pow backward gives the second
    # term as exact zeros
    f = tl.where(bb == 0.0, 1.0, _pow_abs(s_i, -bb, neg, FAST))
    dx = g * f - tl.where(bb == 0.0, 0.0, (2.0 * aa * bb) * x * acc)
    tl.store(DX + n * sdn + c * sdc + s * sds, cast_rn(dx, DX.dtype.element_ty), mask=(c < C) & s_ok)


# Sliding kernels: positions contiguous (NCHW), windows up to MAX_UNROLLED_WINDOW.  A program owns
# BLOCK_S positions of one sample and walks a chunk of channels; the window's x values ride in
# registers (v1 the newest .. v8 the oldest, carried across the loop), so each x and dy element
# comes from memory once (plus a halo of size - 1 channels per chunk, from L2) and every window
# sum is still summed directly (no running sum to cancel).  Four channels a loop trip, their loads
# issued before their math: four loads per thread in flight (Little's law: bytes in flight).
# The backward's loop runs unmasked (a mask costs a compare, a zeroing move and predicate
# shuffles per element and row: a fifth of its instructions): its last position block overlaps
# the one before instead of being partial, the halo steps that may touch channels outside
# [0, C) are peeled off in front, and the trips at the end of the last chunk run in a second,
# masked loop.


@triton.jit
def _slot(i: tl.constexpr, v1, v2, v3, v4, v5, v6, v7, v8):
    # the i-th newest carried value (i constexpr, 1..8)
    if i == 1:
        r = v1
    elif i == 2:
        r = v2
    elif i == 3:
        r = v3
    elif i == 4:
        r = v4
    elif i == 5:
        r = v5
    elif i == 6:
        r = v6
    elif i == 7:
        r = v7
    else:
        r = v8
    return r


@triton.jit
def _lanes_mask(s, pred):
    # a scalar predicate as a mask of s's shape: triton 3.9's interpreter stores through no
    # scalar (nor broadcast_to) mask; compiled, the all-true block folds away (one predicate)
    return tl.full(s.shape, 1, tl.int1) & pred


@triton.jit
def _row(P, ch, s, C, S, COMPUTE: tl.constexpr, ROWS: tl.constexpr = True,
         MASK_S: tl.constexpr = True):
    # one channel's row at P (pointer to position 0 of channel ch) for the block's positions.
    # ROWS: zeros outside channels [0, C) (torch's zero padding): a scalar limit, one compare a
    # lane, or without MASK_S one scalar predicate for the row; else the caller knows ch is in
    # range, and only MASK_S (a partial block) masks
    if ROWS and MASK_S:
        v = tl.load(P + s, mask=s < tl.where((ch >= 0) & (ch < C), S, 0), other=0.0)
    elif ROWS:
        v = tl.load(P + s, mask=_lanes_mask(s, (ch >= 0) & (ch < C)), other=0.0)
    elif MASK_S:
        v = tl.load(P + s, mask=s < S, other=0.0)
    else:
        v = tl.load(P + s)
    return v.to(COMPUTE)


@triton.jit
def _slide_start(C, S, s_tiles, chunk, INT64: tl.constexpr, BLOCK_S: tl.constexpr,
                 MASK_S: tl.constexpr = True):
    # (n, first channel, end channel, first position, positions from it).  Chunks of one
    # (n, position block) are adjacent in launch order: a chunk's halo was just read by its
    # neighbour (L2).  MASK_S False (S >= BLOCK_S): the last block ends at S, overlapping the one
    # before, so that no position needs a mask; the positions both hold are computed twice and
    # stored twice with the same value.  The first position goes into the row pointers, so that
    # each lane's offsets from them are constants (one address a row, not one a lane).
    pid = tl.program_id(0)
    c_chunks = tl.cdiv(C, chunk)
    q = pid % c_chunks
    r = pid // c_chunks
    st = r % s_tiles
    n = r // s_tiles
    c0 = q * chunk
    if INT64:
        n = n.to(tl.int64)
        c0 = c0.to(tl.int64)
    s0 = st * BLOCK_S
    if not MASK_S:
        s0 = tl.minimum(s0, S - BLOCK_S)
    if INT64:
        s0 = s0.to(tl.int64)
    return n, c0, tl.minimum(c0 + chunk, C), s0, tl.arange(0, BLOCK_S)


@triton.jit
def _wide(v, INT64: tl.constexpr):
    if INT64:
        v = v.to(tl.int64)
    return v


@triton.jit
def _log2_abs(v, FAST: tl.constexpr, FTZ: tl.constexpr, NEG_BASE: tl.constexpr = True):
    # FTZ (with FAST): the host knows s is a normal number, where lg2's .ftz form gives the same
    # result without the subnormal-input fix-up (three instructions).  NEG_BASE False: v >= 0
    # (or -0, whose log2 is -inf too), so no abs
    if NEG_BASE:
        v = tl.abs(v)
    if FAST and FTZ:
        r = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [v],
                                      dtype=tl.float32, is_pure=True, pack=1)
    else:
        r = _log2(v, FAST)
    return r


@triton.jit
def _pow_from_log(lg, s, e, neg, NEG_BASE: tl.constexpr, FAST: tl.constexpr,
                  FTZ: tl.constexpr = False):
    # s^e from lg = log2|s| (see _pow_abs); NEG_BASE False: the host knows s >= 0 (k, a >= 0).
    # FTZ: the host knows s^e is normal (see _log2_abs)
    if FAST and FTZ:
        p = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [e * lg],
                                      dtype=tl.float32, is_pure=True, pack=1)
    else:
        p = _exp2(e * lg, FAST)
    if NEG_BASE:
        p = tl.where(s < 0.0, p * neg, p)
    return p


@triton.jit
def _recip(v, FAST: tl.constexpr):
    # 1 / v; FAST: one MUFU instruction (rcp.approx.ftz, ~1 ulp), for a normal v whose reciprocal
    # is normal (the host's _reciprocal_path)
    if FAST:
        r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [v],
                                      dtype=tl.float32, is_pure=True, pack=1)
    else:
        r = 1.0 / v
    return r


@triton.jit
def _window_sq(lead, v1, v2, v3, v4, v5, v6, v7, v8, WIN: tl.constexpr):
    # sum of squares of the window: lead and the WIN - 1 newest carried values
    sq = lead * lead
    for i in tl.static_range(1, WIN):
        v = _slot(i, v1, v2, v3, v4, v5, v6, v7, v8)
        sq += v * v
    return sq


@triton.jit
def _forward_step(YP, c, c_end, s, S, lead, v1, v2, v3, v4, v5, v6, v7, v8, kk, aa, bb, neg,
                  AFTER: tl.constexpr, WIN: tl.constexpr, NEG_BASE: tl.constexpr,
                  BETA_ZERO: tl.constexpr, FAST: tl.constexpr, FTZ: tl.constexpr):
    # y at channel c (row pointer YP) from lead = x at c + AFTER and the carried window; returns
    # the window moved on by one channel
    if AFTER == 0:
        xc = lead
    else:
        xc = _slot(AFTER, v1, v2, v3, v4, v5, v6, v7, v8)
    if BETA_ZERO:  # pow(s, 0) is 1 for every s in torch, NaN and 0 included
        y = xc
    else:
        sc = kk + aa * _window_sq(lead, v1, v2, v3, v4, v5, v6, v7, v8, WIN)
        y = xc * _pow_from_log(_log2_abs(sc, FAST, FTZ), sc, -bb, neg, NEG_BASE, FAST, FTZ)
    tl.store(YP + s, cast_rn(y, YP.dtype.element_ty), mask=s < tl.where(c < c_end, S, 0))
    return lead, v1, v2, v3, v4, v5, v6, v7


# chunk unspecialised: a 16-divisible chunk would give the four rows of a trip different
# known alignments, hence different layouts (shared-memory shuffles between them)
@jit(do_not_specialize=["chunk"])
def _lrn_forward_slide_kernel(
    X,  # input (N, C, S), strides (sxn, sxc, 1)
    Y,  # output (N, C, S), strides (syn, syc, 1)
    C, S, s_tiles, chunk,  # channels; positions; position blocks per sample; channels per program
    sxn, sxc, syn, syc,
    k_hi, k_lo, a_hi, a_lo, b_hi, b_lo,  # as in _lrn_forward_kernel
    BEFORE: tl.constexpr, AFTER: tl.constexpr,  # window [c - BEFORE, c + AFTER], size <= 9
    NEG_BASE: tl.constexpr,  # s can be negative (k < 0 or alpha < 0): pow's sign rules apply
    BETA_ZERO: tl.constexpr,  # beta == 0: y = x exactly
    FTZ: tl.constexpr,  # s and s^-beta are normal numbers (see _log2_abs)
    FAST: tl.constexpr, COMPUTE: tl.constexpr, INT64: tl.constexpr, BLOCK_S: tl.constexpr,
):
    WIN: tl.constexpr = BEFORE + AFTER + 1
    n, c0, c_end, s0, s = _slide_start(C, S, s_tiles, chunk, INT64, BLOCK_S)
    s = s0 + s
    kk = from_pair(k_hi, k_lo, COMPUTE)
    aa = from_pair(a_hi, a_lo, COMPUTE)
    bb = from_pair(b_hi, b_lo, COMPUTE)
    neg = _negative_base(-bb)
    sxc = _wide(sxc, INT64)
    syc = _wide(syc, INT64)
    # row pointers, carried and stepped by the channel stride: every row then has the same
    # known alignment, so all loads and stores share one layout (no shared-memory shuffles)
    xp = X + n * sxn + (c0 + AFTER) * sxc  # the first step's lead channel
    yp = Y + n * syn + c0 * syc
    z = tl.zeros([BLOCK_S], dtype=COMPUTE)
    v1, v2, v3, v4, v5, v6, v7, v8 = z, z, z, z, z, z, z, z
    # the window before the first channel: x at c0 - BEFORE .. c0 + AFTER - 1, oldest first
    for d in tl.static_range(1 - WIN, 0):
        v8, v7, v6, v5, v4, v3, v2 = v7, v6, v5, v4, v3, v2, v1
        v1 = _row(xp + d * sxc, c0 + AFTER + d, s, C, S, COMPUTE)
    # four channels a trip: their loads are issued together, before the math (bytes in flight);
    # steps past c_end store nothing
    for c in range(c0, c_end, 4):
        l0 = _row(xp, c + AFTER, s, C, S, COMPUTE)
        l1 = _row(xp + sxc, c + AFTER + 1, s, C, S, COMPUTE)
        l2 = _row(xp + 2 * sxc, c + AFTER + 2, s, C, S, COMPUTE)
        l3 = _row(xp + 3 * sxc, c + AFTER + 3, s, C, S, COMPUTE)
        v1, v2, v3, v4, v5, v6, v7, v8 = _forward_step(
            yp, c, c_end, s, S, l0, v1, v2, v3, v4, v5, v6, v7, v8, kk, aa, bb, neg, AFTER, WIN,
            NEG_BASE, BETA_ZERO, FAST, FTZ)
        v1, v2, v3, v4, v5, v6, v7, v8 = _forward_step(
            yp + syc, c + 1, c_end, s, S, l1, v1, v2, v3, v4, v5, v6, v7, v8, kk, aa, bb, neg,
            AFTER, WIN, NEG_BASE, BETA_ZERO, FAST, FTZ)
        v1, v2, v3, v4, v5, v6, v7, v8 = _forward_step(
            yp + 2 * syc, c + 2, c_end, s, S, l2, v1, v2, v3, v4, v5, v6, v7, v8, kk, aa, bb, neg,
            AFTER, WIN, NEG_BASE, BETA_ZERO, FAST, FTZ)
        v1, v2, v3, v4, v5, v6, v7, v8 = _forward_step(
            yp + 3 * syc, c + 3, c_end, s, S, l3, v1, v2, v3, v4, v5, v6, v7, v8, kk, aa, bb, neg,
            AFTER, WIN, NEG_BASE, BETA_ZERO, FAST, FTZ)
        xp += 4 * sxc
        yp += 4 * syc


@triton.jit
def _backward_step(DP, L, c0, c_end, C, s, S, lead, g,
                   v1, v2, v3, v4, v5, v6, v7, v8, t1, t2, t3, t4, t5, t6, t7, t8,
                   u1, u2, u3, u4, u5, u6, u7, u8, kk, aa, bb, neg, e1, two_ab,
                   BEFORE: tl.constexpr, AFTER: tl.constexpr, WIN: tl.constexpr,
                   NEG_BASE: tl.constexpr, BETA_ZERO: tl.constexpr, FAST: tl.constexpr,
                   FTZ: tl.constexpr, RCP: tl.constexpr, STORE: tl.constexpr,
                   ROWS: tl.constexpr, MASK_S: tl.constexpr, NEED_U: tl.constexpr):
    # Step L: lead = x at L completes s_m at m = L - AFTER and with it (g = dy_m)
    # t_m = dy_m x_m s_m^(-beta-1) and u_m = dy_m s_m^(-beta); channel i = m - BEFORE (row
    # pointer DP), whose mirrored window [i - AFTER, i + BEFORE] of t is then complete, gets
    #     dx_i = u_i - 2 a beta x_i sum t.
    # STORE False: a halo step (i before the chunk), which only fills the t and u windows; NEED_U
    # False: its u is never used (m before the chunk).  ROWS: some channel of the step may lie
    # outside [0, C) or its store outside the chunk (masks and the t select); else none does.
    m = L - AFTER
    i = m - BEFORE
    if BETA_ZERO:  # y = x exactly (s^0 = 1 even at s = 0), and a zero second term as in torch
        t = g
        u = g
        dx = _slot(BEFORE, t1, t2, t3, t4, t5, t6, t7, t8) if BEFORE > 0 else g
    else:
        sm = kk + aa * _window_sq(lead, v1, v2, v3, v4, v5, v6, v7, v8, WIN)
        if AFTER == 0:
            xm = lead
        else:
            xm = _slot(AFTER, v1, v2, v3, v4, v5, v6, v7, v8)
        lg = _log2_abs(sm, FAST, FTZ, NEG_BASE)
        if RCP:  # sm = s / 16 (see the kernel): s^-beta = 2^(-beta (lg + 4)), t = 16 u x / s
            u = g * _pow_from_log(lg + 4.0, sm, -bb, neg, NEG_BASE, FAST, FTZ)
            t = u * xm * _recip(sm, FAST)
        else:
            t = g * xm * _pow_from_log(lg, sm, e1, -neg, NEG_BASE, FAST)
            if NEED_U:
                u = g * _pow_from_log(lg, sm, -bb, neg, NEG_BASE, FAST, FTZ)
            else:
                u = t
        if ROWS:  # outside [0, C) t is 0 (g is 0 there, and k = 0 would give 0 * inf)
            t = tl.where((m >= 0) & (m < C), t, 0.0)
        dx = t
        if STORE:
            tsum = t
            for j in tl.static_range(1, WIN):
                tsum += _slot(j, t1, t2, t3, t4, t5, t6, t7, t8)
            if WIN == 1:
                xi = lead
            else:
                xi = _slot(WIN - 1, v1, v2, v3, v4, v5, v6, v7, v8)
            if BEFORE == 0:
                ui = u
            else:
                ui = _slot(BEFORE, u1, u2, u3, u4, u5, u6, u7, u8)
            dx = ui - two_ab * xi * tsum
    if STORE:
        out = cast_rn(dx, DP.dtype.element_ty)
        if ROWS and MASK_S:
            tl.store(DP + s, out, mask=s < tl.where((i >= c0) & (i < c_end), S, 0))
        elif ROWS:
            tl.store(DP + s, out, mask=_lanes_mask(s, (i >= c0) & (i < c_end)))
        elif MASK_S:
            tl.store(DP + s, out, mask=s < S)
        else:
            tl.store(DP + s, out)
    return (lead, v1, v2, v3, v4, v5, v6, v7, t, t1, t2, t3, t4, t5, t6, t7,
            u, u1, u2, u3, u4, u5, u6, u7)


@triton.jit
def _backward_trip(xp, gp, dp, sxc, sgc, sdc, L, c0, c_end, C, s, S,
                   v1, v2, v3, v4, v5, v6, v7, v8, t1, t2, t3, t4, t5, t6, t7, t8,
                   u1, u2, u3, u4, u5, u6, u7, u8, kk, aa, bb, neg, e1, two_ab,
                   BEFORE: tl.constexpr, AFTER: tl.constexpr, WIN: tl.constexpr,
                   NEG_BASE: tl.constexpr, BETA_ZERO: tl.constexpr, FAST: tl.constexpr,
                   FTZ: tl.constexpr, RCP: tl.constexpr, ROWS: tl.constexpr,
                   MASK_S: tl.constexpr, COMPUTE: tl.constexpr):
    # steps L .. L + 3 (see _backward_step), their loads issued together before the math (dy
    # first: ptxas then keeps one more load in flight, perf.static_cost)
    g0 = _row(gp, L - AFTER, s, C, S, COMPUTE, ROWS, MASK_S)
    g1 = _row(gp + sgc, L + 1 - AFTER, s, C, S, COMPUTE, ROWS, MASK_S)
    g2 = _row(gp + 2 * sgc, L + 2 - AFTER, s, C, S, COMPUTE, ROWS, MASK_S)
    g3 = _row(gp + 3 * sgc, L + 3 - AFTER, s, C, S, COMPUTE, ROWS, MASK_S)
    x0 = _row(xp, L, s, C, S, COMPUTE, ROWS, MASK_S)
    x1 = _row(xp + sxc, L + 1, s, C, S, COMPUTE, ROWS, MASK_S)
    x2 = _row(xp + 2 * sxc, L + 2, s, C, S, COMPUTE, ROWS, MASK_S)
    x3 = _row(xp + 3 * sxc, L + 3, s, C, S, COMPUTE, ROWS, MASK_S)
    (v1, v2, v3, v4, v5, v6, v7, v8, t1, t2, t3, t4, t5, t6, t7, t8,
     u1, u2, u3, u4, u5, u6, u7, u8) = _backward_step(
        dp, L, c0, c_end, C, s, S, x0, g0, v1, v2, v3, v4, v5, v6, v7, v8,
        t1, t2, t3, t4, t5, t6, t7, t8, u1, u2, u3, u4, u5, u6, u7, u8, kk, aa, bb, neg, e1,
        two_ab, BEFORE, AFTER, WIN, NEG_BASE, BETA_ZERO, FAST, FTZ, RCP, True, ROWS, MASK_S, True)
    (v1, v2, v3, v4, v5, v6, v7, v8, t1, t2, t3, t4, t5, t6, t7, t8,
     u1, u2, u3, u4, u5, u6, u7, u8) = _backward_step(
        dp + sdc, L + 1, c0, c_end, C, s, S, x1, g1, v1, v2, v3, v4, v5, v6, v7, v8,
        t1, t2, t3, t4, t5, t6, t7, t8, u1, u2, u3, u4, u5, u6, u7, u8, kk, aa, bb, neg, e1,
        two_ab, BEFORE, AFTER, WIN, NEG_BASE, BETA_ZERO, FAST, FTZ, RCP, True, ROWS, MASK_S, True)
    (v1, v2, v3, v4, v5, v6, v7, v8, t1, t2, t3, t4, t5, t6, t7, t8,
     u1, u2, u3, u4, u5, u6, u7, u8) = _backward_step(
        dp + 2 * sdc, L + 2, c0, c_end, C, s, S, x2, g2, v1, v2, v3, v4, v5, v6, v7, v8,
        t1, t2, t3, t4, t5, t6, t7, t8, u1, u2, u3, u4, u5, u6, u7, u8, kk, aa, bb, neg, e1,
        two_ab, BEFORE, AFTER, WIN, NEG_BASE, BETA_ZERO, FAST, FTZ, RCP, True, ROWS, MASK_S, True)
    return _backward_step(
        dp + 3 * sdc, L + 3, c0, c_end, C, s, S, x3, g3, v1, v2, v3, v4, v5, v6, v7, v8,
        t1, t2, t3, t4, t5, t6, t7, t8, u1, u2, u3, u4, u5, u6, u7, u8, kk, aa, bb, neg, e1,
        two_ab, BEFORE, AFTER, WIN, NEG_BASE, BETA_ZERO, FAST, FTZ, RCP, True, ROWS, MASK_S, True)


# chunk unspecialised: a 16-divisible chunk would give the four rows of a trip different
# known alignments, hence different layouts (shared-memory shuffles between them)
@jit(do_not_specialize=["chunk"])
def _lrn_backward_slide_kernel(
    X,  # forward's input (N, C, S), strides (sxn, sxc, 1)
    G,  # gradient of the output (N, C, S), strides (sgn, sgc, 1)
    DX,  # gradient of the input (N, C, S), strides (sdn, sdc, 1)
    C, S, s_tiles, chunk,
    sxn, sxc, sgn, sgc, sdn, sdc,
    k_hi, k_lo, a_hi, a_lo, b_hi, b_lo,
    BEFORE: tl.constexpr, AFTER: tl.constexpr, NEG_BASE: tl.constexpr, BETA_ZERO: tl.constexpr,
    FTZ: tl.constexpr, FAST: tl.constexpr, COMPUTE: tl.constexpr, INT64: tl.constexpr,
    MASK_S: tl.constexpr,  # S < BLOCK_S: positions masked (else the last block overlaps)
    RCP: tl.constexpr,  # s^(-beta-1) as s^-beta / s (see _reciprocal_path)
    BLOCK_S: tl.constexpr,
):
    # see _backward_step.  The first WIN - 1 steps of a chunk fill the t and u windows (its halo,
    # no stores); then trips of four steps, unmasked while every channel they touch is in
    # [0, C) and every store in the chunk, the rest (the last chunk's end) masked.
    # beta = 0 keeps the same walk with dx = dy (dy carried in the t slots).
    WIN: tl.constexpr = BEFORE + AFTER + 1
    # s: positions from s0, which the row pointers hold; MASK_S implies s0 = 0 (one block)
    n, c0, c_end, s0, s = _slide_start(C, S, s_tiles, chunk, INT64, BLOCK_S, MASK_S)
    kk = from_pair(k_hi, k_lo, COMPUTE)
    aa = from_pair(a_hi, a_lo, COMPUTE)
    bb = from_pair(b_hi, b_lo, COMPUTE)
    neg = _negative_base(-bb)
    e1 = -bb - 1.0
    two_ab = 2.0 * aa * bb
    if RCP:  # the steps take s / 16 and carry 16 t (exact scalings: see _reciprocal_path)
        kk = kk * 0.0625
        aa = aa * 0.0625
        two_ab = two_ab * 0.0625
    sxc = _wide(sxc, INT64)
    sgc = _wide(sgc, INT64)
    sdc = _wide(sdc, INT64)
    xp = X + n * sxn + c0 * sxc + s0  # lead channel L
    gp = G + n * sgn + (c0 - AFTER) * sgc + s0  # channel m = L - AFTER
    dp = DX + n * sdn + (c0 - AFTER - BEFORE) * sdc + s0  # channel i = m - BEFORE
    z = tl.zeros([BLOCK_S], dtype=COMPUTE)
    v1, v2, v3, v4, v5, v6, v7, v8 = z, z, z, z, z, z, z, z  # x at L - 1, L - 2, ...
    t1, t2, t3, t4, t5, t6, t7, t8 = z, z, z, z, z, z, z, z  # t at m - 1, m - 2, ...
    u1, u2, u3, u4, u5, u6, u7, u8 = z, z, z, z, z, z, z, z  # u at m - 1, m - 2, ...
    for d in tl.static_range(1 - WIN, 0):  # x below the first lead c0 fills the window
        v8, v7, v6, v5, v4, v3, v2 = v7, v6, v5, v4, v3, v2, v1
        v1 = _row(xp + d * sxc, c0 + d, s, C, S, COMPUTE, True, MASK_S)
    for h in tl.static_range(0, WIN - 1):  # the halo: L = c0 + h, m before c0 + BEFORE
        xh = _row(xp + h * sxc, c0 + h, s, C, S, COMPUTE, True, MASK_S)
        gh = _row(gp + h * sgc, c0 + h - AFTER, s, C, S, COMPUTE, True, MASK_S)
        (v1, v2, v3, v4, v5, v6, v7, v8, t1, t2, t3, t4, t5, t6, t7, t8,
         u1, u2, u3, u4, u5, u6, u7, u8) = _backward_step(
            dp, c0 + h, c0, c_end, C, s, S, xh, gh, v1, v2, v3, v4, v5, v6, v7, v8,
            t1, t2, t3, t4, t5, t6, t7, t8, u1, u2, u3, u4, u5, u6, u7, u8, kk, aa, bb, neg, e1,
            two_ab, BEFORE, AFTER, WIN, NEG_BASE, BETA_ZERO, FAST, FTZ, RCP, False, True, MASK_S,
            h >= AFTER)
    xp += (WIN - 1) * sxc
    gp += (WIN - 1) * sgc
    dp += (WIN - 1) * sdc
    # trip L is unmasked when its highest channel L + 3 < C and its highest store
    # L + 3 - (WIN - 1) < c_end (its lowest channels are past the halo, in range)
    first = c0 + (WIN - 1)
    end = c_end + (WIN - 1)
    safe = tl.minimum(tl.cdiv(tl.maximum(tl.minimum(C, end) - 3 - first, 0), 4),
                      tl.cdiv(c_end - c0, 4))
    mid = first + 4 * safe
    for L in range(first, mid, 4):
        (v1, v2, v3, v4, v5, v6, v7, v8, t1, t2, t3, t4, t5, t6, t7, t8,
         u1, u2, u3, u4, u5, u6, u7, u8) = _backward_trip(
            xp, gp, dp, sxc, sgc, sdc, L, c0, c_end, C, s, S, v1, v2, v3, v4, v5, v6, v7, v8,
            t1, t2, t3, t4, t5, t6, t7, t8, u1, u2, u3, u4, u5, u6, u7, u8, kk, aa, bb, neg, e1,
            two_ab, BEFORE, AFTER, WIN, NEG_BASE, BETA_ZERO, FAST, FTZ, RCP, False, MASK_S, COMPUTE)
        xp += 4 * sxc
        gp += 4 * sgc
        dp += 4 * sdc
    for L in range(mid, end, 4):
        (v1, v2, v3, v4, v5, v6, v7, v8, t1, t2, t3, t4, t5, t6, t7, t8,
         u1, u2, u3, u4, u5, u6, u7, u8) = _backward_trip(
            xp, gp, dp, sxc, sgc, sdc, L, c0, c_end, C, s, S, v1, v2, v3, v4, v5, v6, v7, v8,
            t1, t2, t3, t4, t5, t6, t7, t8, u1, u2, u3, u4, u5, u6, u7, u8, kk, aa, bb, neg, e1,
            two_ab, BEFORE, AFTER, WIN, NEG_BASE, BETA_ZERO, FAST, FTZ, RCP, True, MASK_S, COMPUTE)
        xp += 4 * sxc
        gp += 4 * sgc
        dp += 4 * sdc


# ----------------------------------------------------------------------------------------------
# host side


def _view3(t: torch.Tensor, last: bool):
    """``t`` as the kernels' (N, C, S) view without copying, or None when its strides do not allow
    it. PyTorch semantics: (N, C, prod(spatial)).  TensorFlow: (1, depth, rows) when the rows
    merge (NHWC memory), else (N, depth, prod(middle dims)) (NCHW memory viewed as NHWC)."""
    if last:
        try:
            return t.view(-1, t.shape[-1]).t().unsqueeze(0)
        except (RuntimeError, ValueError):  # ValueError under fake tensors
            t = t.movedim(-1, 1)
    try:
        return t.view(t.shape[0], t.shape[1], -1)
    except (RuntimeError, ValueError):  # ValueError under fake tensors
        return None


def _blocks(C: int, S: int, channels_contiguous: bool) -> tuple[int, int]:
    """Tile shape: the contiguous dim gets the long side so that loads coalesce."""
    if channels_contiguous:
        bc = min(triton.next_power_of_2(C), BLOCK_C_CONTIG)
        bs = min(triton.next_power_of_2(S), max(1, TILE // bc))
    else:
        bs = min(triton.next_power_of_2(S), BLOCK_CONTIG)
        bc = min(triton.next_power_of_2(C), max(1, TILE // bs))
    return bc, bs


class LrnConfig(NamedTuple):
    """The scalar arguments of one call (the custom ops' schema comes from these annotations)."""
    last: bool  # channels on the last dim (TensorFlow's semantics), else dim 1 (PyTorch's)
    before: int  # window: channels [c - before, c + after]
    after: int
    scale: float  # a: alpha / size (PyTorch) or alpha (TensorFlow)
    beta: float
    k: float


# Sliding kernels: channels per program (a halo of size - 1 channels per chunk is reread from L2,
# and the backward's first size - 1 steps of a chunk compute its halo), and elements per thread.
SLIDE_CHUNK = 32
# ... halved on a GPU when the grid would hold fewer programs than this per SM: long-running
# programs over few waves leave a tail of lone programs (perf.static_cost's model).  The
# backward's halo steps cost math (5 steps' worth per 16 channels, 9 per 32), its forward's only
# loads: it keeps 32 down to fewer programs (AlexNet conv2 at batch 32: 5.8 an SM)
SLIDE_MIN_PROGRAMS_PER_SM = 6
SLIDE_MIN_PROGRAMS_PER_SM_BACKWARD = 5
SLIDE_ELEMENTS_PER_THREAD = 4


def _slide_block(S: int) -> int:
    """Positions per sliding program: the largest of 512, 256, 128 whose last block wastes
    under 1/16 of the work (S = 3136: 256), else the smallest that covers S."""
    if S <= 128:
        return max(16, triton.next_power_of_2(S))
    for bs in (512, 256, 128):
        if triton.cdiv(S, bs) * bs * 15 <= S * 16:
            return bs
    return 128


def _normal_powers(cfg) -> bool:
    """Whether s = k + a sum x^2 and s^-beta are normal fp32 numbers for every input: k at least
    the smallest normal, a >= 0 (so s >= k), and 0 <= beta < 126 / 128 (s <= fp32's max keeps
    s^-beta above 2^-126).  Then lg2/ex2's .ftz forms give the exact same results."""
    return cfg.k >= 2.0**-125 and cfg.scale >= 0.0 and 0.0 <= cfg.beta < 126 / 128


def _reciprocal_path(cfg, fast: bool) -> bool:
    """Whether the backward takes s^(-beta-1) = s^-beta / s (one ex2 for both powers and an rcp,
    no subnormal fix-ups) where it would take a second ex2 (each with a fix-up for subnormal
    results).  It works with s / 16 and 16 t, so that s / 16 and 16 / s are normal fp32 numbers
    for every s in [k, fp32's max] (rcp's .ftz form then loses nothing; s^-beta 1/s never goes
    through a subnormal intermediate, where a subnormal s^(-beta-1) lost bits), and k / 16,
    a / 16 and 2 a beta / 16 are exact: FAST and _normal_powers, k >= 2^-121, a and 2 a beta
    zero or at least 2^-100."""
    two_ab = 2.0 * cfg.scale * cfg.beta
    return (fast and _normal_powers(cfg) and cfg.k >= 2.0**-121
            and (cfg.scale == 0.0 or (cfg.scale >= 2.0**-100 and two_ab >= 2.0**-100)))


def _slide_args(ts, cfg, min_programs=None):
    """Launch of the sliding kernels for the (N, C, S) views ``ts`` (x first), or None where they
    do not apply: positions not unit-stride in every tensor, one position, or a looped window.
    ``min_programs``: per SM, below which chunks are halved (SLIDE_MIN_PROGRAMS_PER_SM)."""
    N, C, S = ts[0].shape
    before, after = min(cfg.before, C - 1), min(cfg.after, C - 1)
    if S == 1 or before + after + 1 > MAX_UNROLLED_WINDOW or any(t.stride(2) != 1 for t in ts):
        return None
    bs = _slide_block(S)
    s_tiles = triton.cdiv(S, bs)
    chunk = min(C, SLIDE_CHUNK)
    if (rt.plans_for_gpu(ts[0].device) and chunk > 16
            and N * s_tiles * triton.cdiv(C, chunk)
            < (SLIDE_MIN_PROGRAMS_PER_SM if min_programs is None else min_programs)
            * rt.sm_count(ts[0].device)):
        chunk = 16
    grid = (N * s_tiles * triton.cdiv(C, chunk),)
    fast = (ts[0].device.type in ("cuda", "cpu") and rt.plans_for_gpu(ts[0].device)
            and torch.version.hip is None and ts[0].dtype != torch.float64
            and not rt.interpreter_enabled())  # the interpreter runs no inline PTX
    k_hi, k_lo, a_hi, a_lo, b_hi, b_lo = f32_pairs(cfg.k, cfg.scale, cfg.beta)
    kw = dict(k_hi=k_hi, k_lo=k_lo, a_hi=a_hi, a_lo=a_lo, b_hi=b_hi, b_lo=b_lo, BEFORE=before, AFTER=after, FAST=fast,
              NEG_BASE=not (cfg.k >= 0.0 and cfg.scale >= 0.0), BETA_ZERO=cfg.beta == 0.0,
              FTZ=_normal_powers(cfg),
              COMPUTE=rt.compute_dtype(ts[0].dtype), INT64=rt.needs_int64(*ts), BLOCK_S=bs,
              num_warps=max(1, bs // (32 * SLIDE_ELEMENTS_PER_THREAD)))
    strides = [st for t in ts for st in t.stride()[:2]]
    return grid, (C, S, s_tiles, chunk, *strides), kw




def _launch_args(x3, cfg):
    _, C, S = x3.shape
    bc, bs = _blocks(C, S, x3.stride(1) == 1 and C > 1)
    c_tiles, s_tiles = triton.cdiv(C, bc), triton.cdiv(S, bs)
    grid = (c_tiles * x3.shape[0] * s_tiles,)
    before = min(cfg.before, C - 1)
    after = min(cfg.after, C - 1)
    unroll = before + after + 1 <= MAX_UNROLLED_WINDOW
    fast = (x3.device.type in ("cuda", "cpu") and rt.plans_for_gpu(x3.device)
            and torch.version.hip is None and x3.dtype != torch.float64
            and not rt.interpreter_enabled())  # the interpreter runs no inline PTX
    k_hi, k_lo, a_hi, a_lo, b_hi, b_lo = f32_pairs(cfg.k, cfg.scale, cfg.beta)
    kw = dict(before=before, after=after, k_hi=k_hi, k_lo=k_lo, a_hi=a_hi, a_lo=a_lo, b_hi=b_hi,
              b_lo=b_lo, UNROLL=unroll,
              BEFORE=before if unroll else 0, AFTER=after if unroll else 0, FAST=fast,
              COMPUTE=rt.compute_dtype(x3.dtype), BLOCK_C=bc, BLOCK_S=bs,
              num_warps=max(1, min(16, bc * bs // (32 * ELEMENTS_PER_THREAD))))
    return grid, (C, S, c_tiles, s_tiles), kw


def _walk(last: bool, *ts: torch.Tensor):
    """(N, C, S) views of ``ts`` sharing one decomposition (the kernels index every tensor with
    the same n, c, s), copying a tensor to row-major only where its strides do not allow it."""
    ts = [t if _view3(t, last) is not None else t.contiguous() for t in ts]
    vs = [_view3(t, last) for t in ts]
    if any(v.shape != vs[0].shape for v in vs):
        # TensorFlow semantics: one tensor walked as (N, depth, middle) (NCHW memory seen as NHWC),
        # another as (1, depth, rows); row-major tensors all walk as (1, depth, rows)
        ts = [t.contiguous() for t in ts]
        vs = [_view3(t, last) for t in ts]
    return ts, vs


def _empty(x: torch.Tensor, last: bool) -> torch.Tensor:
    """An output buffer in x's memory format, walked in x's decomposition where possible."""
    x3 = _view3(x, last)
    out = torch.empty_like(x)
    v = _view3(out, last)
    if v is not None and v.shape == x3.shape:
        return out
    if last and x3.shape[0] != 1:  # x walked as (N, depth, middle): allocate NCHW memory
        shape = (x.shape[0], x.shape[-1], *x.shape[1:-1])
        return torch.empty(shape, dtype=x.dtype, device=x.device).movedim(1, -1)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _forward_buffers(x: torch.Tensor, last: bool):
    """(x, y) as the forward kernel walks them: x itself unless its layout needs a copy, and an
    output in x's memory format.  Metadata only, so the fake implementation shares it."""
    if _view3(x, last) is None:
        x = x.contiguous()
    (x, y), _ = _walk(last, x, _empty(x, last))
    return x, y


# Launch sites of contiguous inputs, by (shape, dtype, device, config, planning mode): a call
# whose tensors are all contiguous needs no views, copies or plan (the Site has the integers)
_SITES = PlanCache(None)


def _site_key(x, cfg, backward):
    return (x.shape, x.dtype, x.device, cfg, backward, rt._planned_sms)


def _forward_site(x3, y3, cfg) -> Site:
    slide = _slide_args((x3, y3), cfg)
    if slide is not None:
        grid, args, kw = slide
        return Site(_lrn_forward_slide_kernel, grid, args, **kw)
    grid, dims, kw = _launch_args(x3, cfg)
    return Site(_lrn_forward_kernel, grid, (*dims, *x3.stride(), *y3.stride()),
                INT64=rt.needs_int64(x3, y3), **kw)


def _forward(x, cfg):
    if x.is_contiguous():
        site = _SITES.plans.get(_site_key(x, cfg, False))
        if site is not None:
            y = torch.empty_like(x)
            site(x, y)
            return (y,)
    contiguous = x.is_contiguous()
    x, y = _forward_buffers(x, cfg.last)
    x3, y3 = _view3(x, cfg.last), _view3(y, cfg.last)
    site = _forward_site(x3, y3, cfg)
    if contiguous and y.is_contiguous():
        _SITES.put(_site_key(x, cfg, False), site)
    site(x3, y3)
    return (y,)


def _forward_fake(x, cfg):
    return (_forward_buffers(x, cfg.last)[1],)


def _backward_buffers(x, dy, last):
    x, _ = _forward_buffers(x, last)
    return _walk(last, x, dy, _empty(x, last))


def _backward_site(x3, g3, d3, cfg) -> Site:
    slide = _slide_args((x3, g3, d3), cfg, SLIDE_MIN_PROGRAMS_PER_SM_BACKWARD)
    if slide is not None:
        grid, args, kw = slide
        return Site(_lrn_backward_slide_kernel, grid, args,
                    MASK_S=x3.shape[2] < kw["BLOCK_S"], RCP=_reciprocal_path(cfg, kw["FAST"]),
                    **kw)
    grid, dims, kw = _launch_args(x3, cfg)
    return Site(_lrn_backward_kernel, grid,
                (*dims, *x3.stride(), *g3.stride(), *d3.stride()),
                INT64=rt.needs_int64(x3, g3, d3), **kw)


def _backward(douts, saved, cfg, needs):
    """dx from the saved x alone: s and y are recomputed in the kernel."""
    x, dy = saved[0], douts[0]
    contiguous = x.is_contiguous() and dy.is_contiguous()
    if contiguous:
        site = _SITES.plans.get(_site_key(x, cfg, True))
        if site is not None:
            dx = torch.empty_like(x)
            site(x, dy, dx)
            return (dx,)
    (x, dy, dx), (x3, g3, _) = _backward_buffers(x, dy, cfg.last)
    d3 = _view3(dx, cfg.last)
    site = _backward_site(x3, g3, d3, cfg)
    if contiguous and dx.is_contiguous():
        _SITES.put(_site_key(x, cfg, True), site)
    site(x3, g3, d3)
    return (dx,)


def _backward_fake(douts, saved, cfg, needs):
    return (_backward_buffers(saved[0], douts[0], cfg.last)[0][2],)


def _composite(x, last, before, after, scale, beta, k):
    """The forward as torch ops, in fp32 (fp64) like the kernels: the CPU fallback for TensorFlow's
    semantics, and the graph that double backward differentiates.  x / s^beta, as torch computes
    it, so pow's own rules (negative s, beta = 0) and derivatives apply."""
    xc = x.to(rt.accum_dtype(x.dtype))
    if not last:
        xc = xc.movedim(1, -1)
    C = xc.shape[-1]
    before, after = min(before, C - 1), min(after, C - 1)
    sq = F.pad(xc.square(), (before, after))
    y = xc / (k + scale * sq.unfold(-1, before + after + 1, 1).sum(-1)).pow(beta)
    return (y if last else y.movedim(-1, 1)).to(x.dtype)


def _saved_composite(saved, cfg):
    return _composite(saved[0], *cfg)


# The declaration: eager autograd, torch.library ops (tkern::local_response_norm and
# tkern::local_response_norm_backward) for torch.compile, and double backward, built by _op.Op.
OP = Op("tkern::local_response_norm", inputs=("x",), outputs=("y",), config=LrnConfig,
        forward=_forward, fake=_forward_fake, saves=("x",), grads=("x",), backward=_backward,
        backward_fake=_backward_fake, composite=_saved_composite)


def _apply(x, last, before, after, scale, beta, k):
    return OP.apply(x, cfg=LrnConfig(last, before, after, float(scale), float(beta), float(k)))[0]


# ----------------------------------------------------------------------------------------------
# public functions


class WindowSizeError(ValueError, RuntimeError):
    """A window size out of range (size < 1, depth_radius < 0).  torch raises RuntimeError for
    size < 1, tkern documents ValueError: this is both, so either ``except`` clause catches it."""


def _check(op: str, x, size_name: str, size, min_size: int) -> int:
    """Validates the arguments; returns the size as an int."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"tkern.{op}: input must be a Tensor, got {type(x).__name__}")
    if x.dim() < 3:
        raise ValueError(
            f"tkern.{op}: expected 3D or higher dimensionality input (got {x.dim()} dimensions)"
        )
    if x.numel() == 0:  # torch returns an empty input as is, before looking at the size
        return 0
    # any integral value (numpy ints, a one-element integer tensor: torch takes them), but not a
    # bool, which torch rejects too (operator.index would take True, a bool tensor and, before
    # numpy 2.3, numpy's bool_ as 1)
    n = None
    is_bool = (type(size).__name__ in ("bool", "bool_")  # Python's and numpy's
               or (isinstance(size, torch.Tensor) and size.dtype == torch.bool))
    if not is_bool:
        try:
            n = operator.index(size)
        except TypeError:
            pass
    if n is None:
        raise TypeError(f"tkern.{op}: {size_name} must be an int, got {type(size).__name__}")
    if n < min_size:
        raise WindowSizeError(f"tkern.{op}: {size_name} must be >= {min_size}, got {n}")
    rt.check_floating(op, input=x)
    return n


def local_response_norm(input, size, alpha=1e-4, beta=0.75, k=1.0):
    """``torch.nn.functional.local_response_norm`` in one fused kernel each way.

    b_c = a_c * (k + alpha / size * sum_{c' = c - size//2}^{c + (size-1)//2} a_c'^2)^(-beta), with
    channels on dim 1 of an input of rank >= 3 and zeros outside [0, C).  Any size >= 1 (even sizes
    put the extra channel before c, as torch does); the output keeps the input's memory format.
    An empty input is returned as is, as torch does.
    """
    size = _check("local_response_norm", input, "size", size, 1)
    if input.numel() == 0:
        return input
    rt.check_scalars("local_response_norm", input.dtype, beta=beta, k=k,
                     **{"alpha / size": float(alpha) / size})
    if not rt.use_triton("local_response_norm", input):
        if input.dtype in (torch.float16, torch.bfloat16):  # torch's CPU avg_pool3d lacks them
            return F.local_response_norm(input.float(), size, alpha, beta, k).to(input.dtype)
        return F.local_response_norm(input, size, alpha, beta, k)
    return _apply(input, False, size // 2, (size - 1) // 2, float(alpha) / size, beta, k)


def local_response_normalization(input, depth_radius=5, bias=1.0, alpha=1.0, beta=0.5):
    """TensorFlow's ``tf.nn.local_response_normalization`` (alias ``tf.nn.lrn``).

    output = input / (bias + alpha * sum_{d' = d - r}^{d + r} input_d'^2)^beta over the last axis
    (r = depth_radius, zeros outside the axis; alpha is not divided by the window).  TensorFlow
    takes 4-D NHWC input; this takes any rank >= 3 with channels last.
    """
    r = _check("local_response_normalization", input, "depth_radius", depth_radius, 0)
    if input.numel() == 0:
        return input
    rt.check_scalars("local_response_normalization", input.dtype, bias=bias, alpha=alpha,
                     beta=beta)
    if not rt.use_triton("local_response_normalization", input):
        return _composite(input, True, r, r, float(alpha), float(beta), float(bias))
    return _apply(input, True, r, r, alpha, beta, bias)
