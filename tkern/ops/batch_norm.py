"""BatchNorm (+ fused activation): ``y = act((x - mean) * invstd * weight + bias)`` per channel.

Layout.  Every tensor is viewed as ``[N, C, S]`` (S = the flattened spatial dims, 1 for ``(N, C)``)
and addressed through its strides, so NCHW, channels_last and channels_last_3d are read in place and
the output (``torch.empty_like``) keeps the input's memory format.  A kernel walks tiles
``[BLOCK_S, BLOCK_C]`` of one sample: for NCHW the S axis has unit stride and the tile is long in S;
for channels_last C has unit stride and the tile is wide in C.  Triton specialises unit strides, so
the loads vectorise along whichever axis is contiguous.  When the batch and spatial axes merge
(channels_last, ``(N, C)`` input, N == 1) the view becomes ``[1, C, N*S]`` and tiles run across
samples.  The reduction domain of a channel (N x S elements) is cut into *units* (one sample, one
block of S); a program owns a block of channels and a run of consecutive units.

Training forward.  When the plan has one partial per channel (a channel block spans at most
``FUSED_MAX_UNITS`` units, as in small batches and late layers, or there are channel blocks enough
to fill the GPU) it takes one launch, ``_fused_forward_kernel``: a program per channel block
reduces its channels, writes the statistics, updates the running stats and normalizes, re-reading
x (from cache when the block is a few tiles).  Larger layers take three launches, x read twice from memory, y written once:
1. ``_stats_partial_kernel``: a grid (channel blocks) x (splits).  Each program reduces its units
   into a partial (count, mean, M2) per channel, written to an fp32 (fp64 for fp64) workspace
   ``[P, C]``.  Values are shifted by the mean of the program's first tile and summed per lane
   (sum and sum of squares), with one cross-lane reduction at the end: the loop is loads and
   FMAs, and the variance from shifted sums stays accurate (the bound is in ``_shifted_stats``),
   so 1000 + 0.01 * randn keeps its variance.  Partial means are kept as hi + lo (TwoSum).
   Splitting matters for few channels and large N x S (C=64 at 112x112): one program per channel
   would leave most of the GPU idle.
2. ``_stats_combine_kernel``: one small program per channel block merges the P partials
   (exact parallel formula: weighted mean, then sum of M2_i + n_i (mean_i - mean)^2), writes the
   saved mean and invstd and updates running_mean / running_var in place, once (no autotuning).
   The mean is saved as hi + lo (TwoSum): an fp32 mean alone would move every xhat by up to
   ulp(mean) * invstd, 3e-3 for 1000 + 0.01 * randn.
   ``momentum=None`` (cumulative average) reads num_batches_tracked on the device: no host sync.
3. ``_normalize_kernel``: elementwise ``act((x - hi - lo) * (invstd * w) + b)``; centring first
   because ``x * scale + (b - mean * scale)`` loses digits when |mean| >> std.
Eval uses the running stats and only pass 3 (one launch: the kernel takes invstd from running_var).

Backward saves x, weight, bias and the statistics used (the fp32/fp64 [3, C] mean, mean_lo, invstd
in training; the running stats in eval); the pre-activation is rebuilt from them.
1. ``_backward_reduce_kernel``: partial sums of g = dy * act'(z) and g * xhat per channel into
   ``[P, C]`` (deterministic: no float atomics), then a torch ``sum(0)`` over P when P > 1.  They
   are dbias and dweight.  With one partial per channel (the one-launch plan) the program holds
   whole sums and writes dx in a second pass over its (cached) tiles; in eval dx needs no sums and
   is written in the same pass.
2. ``_dx_kernel`` (split plans in training, and eval without weight grads): elementwise
   ``dx = w * invstd * (g - sum_g / n - xhat * sum_gx / n)`` in training, ``g * w * invstd`` in
   eval.

Host building blocks (also used by SyncBatchNorm around torch.distributed collectives):
(x prepared by ``_prepare_input``; ``activation`` is a kernel name from ``kernel_name``)
- ``bn_partial_stats(x)`` -> (count, mean, m2, mean_lo): ``[P, C]`` partials of the local batch.
- ``bn_combine_stats(count, mean, m2, mean_lo, eps, running_mean, running_var, momentum,
  num_batches_tracked)`` -> (mean, mean_lo, invstd), running stats updated in place once;
  with ``local=True`` -> the merged (count, mean, m2, mean_lo) ``[1, C]`` of the local batch, to
  all_gather (``[world, C]`` each) and pass back in for the global statistics.
- ``bn_normalize(x, mean, invstd, weight, bias, activation, mean_lo=...)`` -> y (eval:
  ``bn_normalize(x, running_mean, None, ..., var=running_var, eps=eps)``).
- ``bn_backward_reduce(x, dy, mean, invstd, weight, bias, activation, mean_lo=...)``
  -> (sum_g, sum_g_xhat), ``[C]`` each: dbias, dweight, and what a SyncBatchNorm all-reduces.
- ``bn_backward_dx(x, dy, mean, invstd, weight, bias, sum_g, sum_g_xhat, count, activation,
  training, mean_lo=...)`` -> dx, from global sums and the global count.

Eager calls run through an autograd.Function; under torch.compile the same code runs as
torch.library custom ops (``tkern::batch_norm_stats``, which mutates the running stats, and the
functional ``tkern::batch_norm_normalize`` / ``tkern::batch_norm_backward`` pair carrying the
autograd formula), so fullgraph tracing works.
Double backward (create_graph=True) takes a differentiable torch-op backward instead.
"""

from __future__ import annotations

import functools
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import _runtime as rt
from ._math import from_pair
from ..activations import (activate, activation_grad, activation_scalars, eager_activation,
                           kernel_name)

# Elements per tile: 16 KiB of fp32 per loop step keeps enough loads in flight to approach memory
# bandwidth, with few enough registers per thread.
TILE_BYTES = 16384
# Channel width of a tile when channels are the contiguous axis: 128 fp32 = 512 contiguous bytes.
CL_BLOCK_C = 128
# Reductions over at most this many units (tiles) per channel block run one program per channel
# block, each way in one launch (statistics + normalize; sums + dx).  An estimate, not yet timed:
# a second pass over two cached tiles should cost less than the split path's two extra launches.
FUSED_MAX_UNITS = 2


# ----------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _unit(u, nsb, lanes_s, S, n_units, INT64: tl.constexpr, BLOCK_S: tl.constexpr):
    """Sample index, spatial indices and their mask of unit ``u`` (sample u // nsb, S-block
    u % nsb)."""
    if INT64:  # s can pass 2^31 when samples and positions merge into one axis
        u = u.to(tl.int64)
        lanes_s = lanes_s.to(tl.int64)
    n = u // nsb
    s = (u - n * nsb) * BLOCK_S + lanes_s
    # a unit past the end masks everything (a scalar select: the interpreter mistypes bool & scalar)
    smask = s < tl.where(u < n_units, S, 0)
    return n, s, smask


@triton.jit
def _offsets(n, s, c, sN, sS, sC):
    """Offsets of the tile (spatial s) x (channels c) of sample n, for strides sN, sS, sC."""
    return n * sN + s[:, None] * sS + c.to(s.dtype)[None, :] * sC  # s is int64 under INT64


@triton.jit
def _two_sum(a, b):
    """(hi, lo) with hi = fl(a + b) and hi + lo == a + b exactly (Knuth's TwoSum; adds only, so
    FMA contraction cannot disturb it)."""
    hi = a + b
    bb = hi - a
    lo = (a - (hi - bb)) + (b - bb)
    return hi, lo


@triton.jit
def _shifted_stats(X, c, cmask, S, sN, sC, sS, nsb, n_units, u0, units,
                   COMPUTE: tl.constexpr, INT64: tl.constexpr, BLOCK_S: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """(count, mean as hi + lo, M2) per channel c of the units [u0, u0 + units)."""
    lanes_s = tl.arange(0, BLOCK_S)
    # Shift: the mean of the first tile.  Values are summed as xs = x - shift per lane (no
    # reductions in the loop) and the variance comes from shifted sums, M2 = S2 - S1^2 / n, whose
    # cancellation grows with (shift - mean)^2 / var.  The first tile is part of the data, so that
    # ratio is at most (tiles per program), a few hundred at worst: a few ulps on the variance,
    # never catastrophic, whatever |mean| / std is.
    n, s, smask = _unit(u0, nsb, lanes_s, S, n_units, INT64, BLOCK_S)
    mask = smask[:, None] & cmask[None, :]
    x = tl.load(X + _offsets(n, s, c, sN, sS, sC), mask=mask, other=0.0).to(COMPUTE)
    shift = tl.sum(x, 0) / tl.maximum(tl.sum(smask.to(COMPUTE), 0), 1.0)
    cnt = tl.zeros([BLOCK_S], COMPUTE)  # per lane: valid elements seen
    s1 = tl.zeros([BLOCK_S, BLOCK_C], COMPUTE)
    s2 = tl.zeros([BLOCK_S, BLOCK_C], COMPUTE)
    for i in range(0, units):
        n, s, smask = _unit(u0 + i, nsb, lanes_s, S, n_units, INT64, BLOCK_S)
        mask = smask[:, None] & cmask[None, :]
        x = tl.load(X + _offsets(n, s, c, sN, sS, sC), mask=mask, other=0.0).to(COMPUTE)
        xs = tl.where(mask, x - shift[None, :], 0.0)
        cnt += smask.to(COMPUTE)
        s1 += xs
        s2 += xs * xs
    n_tot = tl.sum(cnt, 0)
    sum1 = tl.sum(s1, 0)
    mean_s = sum1 / tl.maximum(n_tot, 1.0)  # relative to shift
    m2 = tl.maximum(tl.sum(s2, 0) - sum1 * mean_s, 0.0)
    # the absolute mean as hi + lo: hi alone (fp32) would lose ulp(mean) when |mean| >> std
    hi, lo = _two_sum(shift, mean_s)
    return n_tot, hi, lo, m2


@triton.jit
def _stats_partial_kernel(
    X,  # input viewed as [N, C, S] through (sN, sC, sS)
    PCOUNT, PMEAN, PMEAN_LO, PM2,  # [P, C] partial count, mean as hi + lo, M2 (sum of squared dev.)
    C, S, sN, sC, sS,  # channel count, spatial size, strides of X
    nsb, n_units, units_per_prog,  # S-blocks per sample; units in all; units per program
    COMPUTE: tl.constexpr, INT64: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    n_tot, hi, lo, m2 = _shifted_stats(X, c, cmask, S, sN, sC, sS, nsb, n_units,
                                       pid_p * units_per_prog, units_per_prog,
                                       COMPUTE, INT64, BLOCK_S, BLOCK_C)
    out = pid_p * C + c
    tl.store(PCOUNT + out, tl.zeros([BLOCK_C], COMPUTE) + n_tot, mask=cmask)
    tl.store(PMEAN + out, hi, mask=cmask)
    tl.store(PMEAN_LO + out, lo, mask=cmask)
    tl.store(PM2 + out, m2, mask=cmask)


@triton.jit
def _update_running(RMEAN, RVAR, NBT, c, cmask, n_tot, mean, m2, mom_hi, mom_lo,
                    CUMULATIVE: tl.constexpr, COMPUTE: tl.constexpr):
    """running = (1 - f) * running + f * batch, with the unbiased variance; f is the momentum, or
    1 / num_batches_tracked (read on the device) for the cumulative average."""
    if CUMULATIVE:
        factor = 1.0 / tl.load(NBT).to(COMPUTE)
    else:
        factor = from_pair(mom_hi, mom_lo, COMPUTE)
    # a single value (possible only through SyncBatchNorm) keeps m2 / n
    unbiased = m2 / tl.maximum(n_tot - 1.0, 1.0)
    rm = tl.load(RMEAN + c, mask=cmask, other=0.0)
    rv = tl.load(RVAR + c, mask=cmask, other=0.0)
    new_rm = (1.0 - factor) * rm.to(COMPUTE) + factor * mean
    new_rv = (1.0 - factor) * rv.to(COMPUTE) + factor * unbiased
    tl.store(RMEAN + c, new_rm.to(rm.dtype), mask=cmask)
    tl.store(RVAR + c, new_rv.to(rv.dtype), mask=cmask)


@triton.jit
def _partial_deviation(PCOUNT, PMEAN, PMEAN_LO, p, P, C, c, cmask, ref, HAS_LO: tl.constexpr,
                       COMPUTE: tl.constexpr):
    """Partials p of channels c: (count n_i, mean_i - ref with mean_i as hi + lo, offsets, mask)."""
    m = (p < P)[:, None] & cmask[None, :]
    offs = p[:, None] * C + c[None, :]
    n_i = tl.load(PCOUNT + offs, mask=m, other=0.0).to(COMPUTE)
    d_i = tl.load(PMEAN + offs, mask=m, other=0.0).to(COMPUTE) - ref[None, :]
    if HAS_LO:
        d_i += tl.load(PMEAN_LO + offs, mask=m, other=0.0).to(COMPUTE)
    return n_i, d_i, offs, m


@triton.jit
def _stats_combine_kernel(
    PCOUNT, PMEAN, PMEAN_LO, PM2,  # [P, C] partials: count, mean as hi + lo (lo if HAS_LO), M2
    MEAN, MEAN_LO,  # [C] outputs: merged mean as hi + lo
    INVSTD,  # [C] output when WRITE_INVSTD: 1 / sqrt(biased var + eps)
    OCOUNT, OM2,  # [C] outputs when WRITE_M2: merged count and M2
    RMEAN, RVAR,  # [C] running stats, updated in place when UPDATE
    NBT,  # num_batches_tracked (int64 scalar) when CUMULATIVE: factor = 1 / NBT
    P, C,
    eps_hi, eps_lo, mom_hi, mom_lo,  # eps and momentum as fp32 pairs hi + lo (fp64 precision)
    HAS_LO: tl.constexpr, UPDATE: tl.constexpr, CUMULATIVE: tl.constexpr,
    WRITE_INVSTD: tl.constexpr, WRITE_M2: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    lanes_p = tl.arange(0, BLOCK_P)
    # pass 1: count and a reference near the mean (its rounding does not matter: every partial
    # mean is taken relative to it, exactly when close)
    n_tot = tl.zeros([BLOCK_C], COMPUTE)
    wsum = tl.zeros([BLOCK_C], COMPUTE)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + lanes_p
        m = (p < P)[:, None] & cmask[None, :]
        offs = p[:, None] * C + c[None, :]
        n_i = tl.load(PCOUNT + offs, mask=m, other=0.0).to(COMPUTE)
        hi_i = tl.load(PMEAN + offs, mask=m, other=0.0).to(COMPUTE)
        n_tot += tl.sum(n_i, 0)
        wsum += tl.sum(n_i * hi_i, 0)
    ref = wsum / tl.maximum(n_tot, 1.0)
    # pass 2: the mean relative to ref
    dsum = tl.zeros([BLOCK_C], COMPUTE)
    for p0 in range(0, P, BLOCK_P):
        n_i, d_i, offs, m = _partial_deviation(PCOUNT, PMEAN, PMEAN_LO, p0 + lanes_p, P, C, c,
                                               cmask, ref, HAS_LO, COMPUTE)
        dsum += tl.sum(n_i * d_i, 0)
    mean_d = dsum / tl.maximum(n_tot, 1.0)
    # pass 3: M2 = sum of M2_i + n_i (mean_i - mean)^2 (exact parallel formula)
    m2 = tl.zeros([BLOCK_C], COMPUTE)
    for p0 in range(0, P, BLOCK_P):
        n_i, d_i, offs, m = _partial_deviation(PCOUNT, PMEAN, PMEAN_LO, p0 + lanes_p, P, C, c,
                                               cmask, ref, HAS_LO, COMPUTE)
        d_i -= mean_d[None, :]
        m2 += tl.sum(tl.load(PM2 + offs, mask=m, other=0.0).to(COMPUTE) + n_i * d_i * d_i, 0)
    # The mean as hi + lo: with |mean| >> std, the rounding of hi alone would move every xhat by
    # up to ulp(mean) * invstd (3e-3 for 1000 + 0.01 * randn in fp32).
    mean_hi, mean_lo = _two_sum(ref, mean_d)
    tl.store(MEAN + c, mean_hi, mask=cmask)
    tl.store(MEAN_LO + c, mean_lo, mask=cmask)
    if WRITE_M2:
        tl.store(OCOUNT + c, n_tot, mask=cmask)
        tl.store(OM2 + c, m2, mask=cmask)
    if WRITE_INVSTD:
        eps = from_pair(eps_hi, eps_lo, COMPUTE)
        var = m2 / tl.maximum(n_tot, 1.0)
        tl.store(INVSTD + c, _inv_sqrt(var + eps, COMPUTE), mask=cmask)
    if UPDATE:
        _update_running(RMEAN, RVAR, NBT, c, cmask, n_tot, mean_hi + mean_lo, m2, mom_hi, mom_lo,
                        CUMULATIVE, COMPUTE)


@triton.jit
def _inv_sqrt(v, COMPUTE: tl.constexpr):
    if COMPUTE == tl.float64:
        r = 1.0 / tl.sqrt(v)
    else:
        r = 1.0 / tl.sqrt_rn(v)  # correctly rounded (tl.sqrt may be approximate)
    return r


@triton.jit
def _channel_params(MEAN, MEAN_LO, INVSTD, W, B, c, cmask, eps, HAS_LO: tl.constexpr,
                    FROM_VAR: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                    COMPUTE: tl.constexpr):
    """Per-channel statistics and affine parameters; with FROM_VAR, INVSTD holds the (running)
    variance and invstd = 1 / sqrt(var + eps) is taken here (eval: no separate launch)."""
    mean = tl.load(MEAN + c, mask=cmask, other=0.0).to(COMPUTE)
    if HAS_LO:
        mean_lo = tl.load(MEAN_LO + c, mask=cmask, other=0.0).to(COMPUTE)
    else:
        mean_lo = tl.zeros([c.shape[0]], COMPUTE)
    invstd = tl.load(INVSTD + c, mask=cmask, other=1.0).to(COMPUTE)
    if FROM_VAR:
        invstd = _inv_sqrt(invstd + eps, COMPUTE)
    if HAS_W:
        w = tl.load(W + c, mask=cmask, other=0.0).to(COMPUTE)
    else:
        w = tl.full([c.shape[0]], 1.0, COMPUTE)
    if HAS_B:
        b = tl.load(B + c, mask=cmask, other=0.0).to(COMPUTE)
    else:
        b = tl.zeros([c.shape[0]], COMPUTE)
    return mean, mean_lo, invstd, w, b


@triton.jit
def _program_channels(MEAN, MEAN_LO, INVSTD, W, B, C, eps_hi, eps_lo, slope_hi, slope_lo, alpha_hi,
                      alpha_lo, HAS_LO: tl.constexpr, FROM_VAR: tl.constexpr, HAS_W: tl.constexpr,
                      HAS_B: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr):
    """The preamble of the elementwise and backward kernels: this program's block of channels
    (grid axis 0) with its mask, statistics and affine parameters, and the activation's scalars."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    eps = from_pair(eps_hi, eps_lo, COMPUTE)
    mean, mean_lo, invstd, w, b = _channel_params(MEAN, MEAN_LO, INVSTD, W, B, c, cmask, eps,
                                                  HAS_LO, FROM_VAR, HAS_W, HAS_B, COMPUTE)
    negative_slope = from_pair(slope_hi, slope_lo, COMPUTE)
    alpha = from_pair(alpha_hi, alpha_lo, COMPUTE)
    return c, cmask, mean, mean_lo, invstd, w, b, negative_slope, alpha


@triton.jit
def _centered(x, mean, mean_lo, HAS_LO: tl.constexpr):
    # x - hi is exact when x is near the mean; lo then corrects what hi rounded away
    xc = x - mean[None, :]
    if HAS_LO:
        xc = xc - mean_lo[None, :]
    return xc


@triton.jit
def _normalize_units(X, Y, c, cmask, mean, mean_lo, scale, b, negative_slope, alpha,
                     S, sxN, sxC, sxS, syN, syC, syS, nsb, n_units, u0, units,
                     HAS_LO: tl.constexpr, ACTIVATION: tl.constexpr, COMPUTE: tl.constexpr,
                     INT64: tl.constexpr, BLOCK_S: tl.constexpr, R=None, HAS_R: tl.constexpr = False):
    """y = act((x - mean - mean_lo) * scale + b [+ r]) over the units [u0, u0 + units); the
    residual R (HAS_R) has x's strides."""
    lanes_s = tl.arange(0, BLOCK_S)
    for i in range(0, units):
        n, s, smask = _unit(u0 + i, nsb, lanes_s, S, n_units, INT64, BLOCK_S)
        mask = smask[:, None] & cmask[None, :]
        xo = _offsets(n, s, c, sxN, sxS, sxC)
        yo = _offsets(n, s, c, syN, syS, syC)
        x = tl.load(X + xo, mask=mask, other=0.0).to(COMPUTE)
        z = _centered(x, mean, mean_lo, HAS_LO) * scale[None, :] + b[None, :]
        if HAS_R:
            z += tl.load(R + xo, mask=mask, other=0.0).to(COMPUTE)
        y = activate(z, ACTIVATION, negative_slope, alpha)
        tl.store(Y + yo, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _normalize_kernel(
    X,  # input [N, C, S] through (sxN, sxC, sxS)
    Y,  # output [N, C, S] through (syN, syC, syS)
    MEAN, MEAN_LO, INVSTD,  # [C] statistics used (batch or running); MEAN_LO when HAS_LO
    W, B,  # [C] affine weight and bias (dummies when HAS_W / HAS_B is False)
    C, S, sxN, sxC, sxS, syN, syC, syS,
    nsb, n_units, units_per_prog,
    slope_hi, slope_lo, alpha_hi, alpha_lo,  # leaky_relu slope, elu alpha: fp32 pairs
    eps_hi, eps_lo,  # eps as an fp32 pair, used with FROM_VAR (INVSTD then holds the variance)
    HAS_LO: tl.constexpr, FROM_VAR: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ACTIVATION: tl.constexpr,
    COMPUTE: tl.constexpr, INT64: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    R=None,  # residual [N, C, S] with X's strides, added before the activation when HAS_R
    HAS_R: tl.constexpr = False,
):
    c, cmask, mean, mean_lo, invstd, w, b, negative_slope, alpha = _program_channels(
        MEAN, MEAN_LO, INVSTD, W, B, C, eps_hi, eps_lo, slope_hi, slope_lo, alpha_hi, alpha_lo,
        HAS_LO, FROM_VAR, HAS_W, HAS_B, COMPUTE, BLOCK_C)
    _normalize_units(X, Y, c, cmask, mean, mean_lo, invstd * w, b, negative_slope, alpha,
                     S, sxN, sxC, sxS, syN, syC, syS, nsb, n_units,
                     tl.program_id(1) * units_per_prog, units_per_prog,
                     HAS_LO, ACTIVATION, COMPUTE, INT64, BLOCK_S, R, HAS_R)


@triton.jit
def _fused_forward_kernel(
    X, Y,  # [N, C, S] through their strides
    MEAN, MEAN_LO, INVSTD,  # [C] outputs: the batch mean as hi + lo, 1 / sqrt(biased var + eps)
    W, B,  # [C] affine weight and bias (dummies when HAS_W / HAS_B is False)
    RMEAN, RVAR, NBT,  # running stats, updated in place when UPDATE; NBT when CUMULATIVE
    C, S, sxN, sxC, sxS, syN, syC, syS,
    nsb, n_units,
    eps_hi, eps_lo, mom_hi, mom_lo, slope_hi, slope_lo, alpha_hi, alpha_lo,  # fp32 pairs
    UPDATE: tl.constexpr, CUMULATIVE: tl.constexpr, WRITE_Y: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACTIVATION: tl.constexpr,
    COMPUTE: tl.constexpr, INT64: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    R=None,  # residual [N, C, S] with X's strides, added before the activation when HAS_R
    HAS_R: tl.constexpr = False,
):
    """Training forward in one launch for layers whose channel blocks span few units: each
    program reduces its channels over the whole batch, writes the statistics, updates the running
    stats and (WRITE_Y) normalizes, re-reading x while it is still in cache."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    u0 = tl.program_id(1) * n_units  # 0 (a one-column grid), as a tensor _unit can widen
    n_tot, mean, mean_lo, m2 = _shifted_stats(X, c, cmask, S, sxN, sxC, sxS, nsb, n_units,
                                              u0, n_units, COMPUTE, INT64, BLOCK_S, BLOCK_C)
    invstd = _inv_sqrt(m2 / tl.maximum(n_tot, 1.0) + from_pair(eps_hi, eps_lo, COMPUTE), COMPUTE)
    tl.store(MEAN + c, mean, mask=cmask)
    tl.store(MEAN_LO + c, mean_lo, mask=cmask)
    tl.store(INVSTD + c, invstd, mask=cmask)
    if UPDATE:
        _update_running(RMEAN, RVAR, NBT, c, cmask, n_tot, mean + mean_lo, m2, mom_hi, mom_lo,
                        CUMULATIVE, COMPUTE)
    if WRITE_Y:
        if HAS_W:
            invstd = invstd * tl.load(W + c, mask=cmask, other=0.0).to(COMPUTE)
        if HAS_B:
            b = tl.load(B + c, mask=cmask, other=0.0).to(COMPUTE)
        else:
            b = tl.zeros([BLOCK_C], COMPUTE)
        _normalize_units(X, Y, c, cmask, mean, mean_lo, invstd, b,
                         from_pair(slope_hi, slope_lo, COMPUTE),
                         from_pair(alpha_hi, alpha_lo, COMPUTE),
                         S, sxN, sxC, sxS, syN, syC, syS, nsb, n_units, u0, n_units,
                         True, ACTIVATION, COMPUTE, INT64, BLOCK_S, R, HAS_R)


@triton.jit
def _grad_pre_activation(x, dy, mean, mean_lo, invstd, w, b, negative_slope, alpha,
                         HAS_LO: tl.constexpr, ACTIVATION: tl.constexpr, r=0.0):
    """xhat and g = dy * act'(z), with z rebuilt from x, the saved statistics and the residual r
    (0 without one).  g is also the residual's gradient."""
    xhat = _centered(x, mean, mean_lo, HAS_LO) * invstd[None, :]
    if ACTIVATION == "identity":
        g = dy
    else:
        z = xhat * w[None, :] + b[None, :] + r
        g = dy * activation_grad(z, ACTIVATION, negative_slope, alpha)
    return xhat, g


@triton.jit
def _dx_units(X, DY, DX, c, cmask, mean, mean_lo, invstd, w, b, mean_g, mean_gx,
              negative_slope, alpha, S, sxN, sxC, sxS, sdN, sdC, sdS, soN, soC, soS,
              nsb, n_units, u0, units, TRAINING: tl.constexpr, HAS_LO: tl.constexpr,
              ACTIVATION: tl.constexpr, COMPUTE: tl.constexpr, INT64: tl.constexpr,
              BLOCK_S: tl.constexpr, R=None, DR=None, HAS_R: tl.constexpr = False,
              WRITE_DR: tl.constexpr = False):
    """dx over the units [u0, u0 + units): w * invstd * (g - mean_g - xhat * mean_gx) in
    training (mean_g, mean_gx: the batch means of g and g * xhat), w * invstd * g in eval.
    With a residual R (x's strides), g rebuilds z + r; WRITE_DR stores g, its gradient, to DR."""
    lanes_s = tl.arange(0, BLOCK_S)
    scale = invstd * w
    for i in range(0, units):
        n, s, smask = _unit(u0 + i, nsb, lanes_s, S, n_units, INT64, BLOCK_S)
        mask = smask[:, None] & cmask[None, :]
        xo = _offsets(n, s, c, sxN, sxS, sxC)
        x = tl.load(X + xo, mask=mask, other=0.0).to(COMPUTE)
        dy = tl.load(DY + _offsets(n, s, c, sdN, sdS, sdC), mask=mask, other=0.0).to(COMPUTE)
        r = 0.0
        if HAS_R:
            r = tl.load(R + xo, mask=mask, other=0.0).to(COMPUTE)
        xhat, g = _grad_pre_activation(x, dy, mean, mean_lo, invstd, w, b, negative_slope, alpha,
                                       HAS_LO, ACTIVATION, r)
        if WRITE_DR:
            tl.store(DR + xo, g.to(DR.dtype.element_ty), mask=mask)
        if TRAINING:
            g = g - mean_g[None, :] - xhat * mean_gx[None, :]
        dx = g * scale[None, :]
        tl.store(DX + _offsets(n, s, c, soN, soS, soC), dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _backward_reduce_kernel(
    X, DY, DX,  # [N, C, S] through their strides; DX written when DX_MODE > 0
    MEAN, MEAN_LO, INVSTD, W, B,  # [C] saved statistics (MEAN_LO when HAS_LO) and affine parameters
    PSUM_G, PSUM_GX,  # [P, C] partial sums of g and g * xhat (the sums when P == 1)
    C, S, sxN, sxC, sxS, sdN, sdC, sdS, soN, soC, soS,
    nsb, n_units, units_per_prog,
    inv_n_hi, inv_n_lo,  # 1 / count as an fp32 pair (hi + lo), used when DX_MODE == 2
    slope_hi, slope_lo, alpha_hi, alpha_lo,  # leaky_relu slope, elu alpha: fp32 pairs
    eps_hi, eps_lo,  # eps as an fp32 pair, used with FROM_VAR (INVSTD then holds the variance)
    DX_MODE: tl.constexpr,  # 0: sums only; 1: eval dx in the same pass; 2: training dx after it
    HAS_LO: tl.constexpr, FROM_VAR: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ACTIVATION: tl.constexpr,
    COMPUTE: tl.constexpr, INT64: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    R=None, DR=None,  # residual and its gradient (= g), [N, C, S] with X's strides, when HAS_R
    HAS_R: tl.constexpr = False,
):
    """Sums of g = dy * act'(z) and g * xhat over this program's units.  DX_MODE 1 (eval: dx
    needs no sums) writes dx in the same pass; DX_MODE 2 (training, one program per channel
    block, so the sums are whole) writes dx in a second pass, x and dy still in cache."""
    c, cmask, mean, mean_lo, invstd, w, b, negative_slope, alpha = _program_channels(
        MEAN, MEAN_LO, INVSTD, W, B, C, eps_hi, eps_lo, slope_hi, slope_lo, alpha_hi, alpha_lo,
        HAS_LO, FROM_VAR, HAS_W, HAS_B, COMPUTE, BLOCK_C)
    pid_p = tl.program_id(1)
    lanes_s = tl.arange(0, BLOCK_S)
    scale = invstd * w
    # per-lane sums, reduced across lanes once at the end (no reductions inside the loop)
    acc_g = tl.zeros([BLOCK_S, BLOCK_C], COMPUTE)
    acc_gx = tl.zeros([BLOCK_S, BLOCK_C], COMPUTE)
    u0 = pid_p * units_per_prog
    for i in range(0, units_per_prog):
        n, s, smask = _unit(u0 + i, nsb, lanes_s, S, n_units, INT64, BLOCK_S)
        mask = smask[:, None] & cmask[None, :]
        xo = _offsets(n, s, c, sxN, sxS, sxC)
        x = tl.load(X + xo, mask=mask, other=0.0).to(COMPUTE)
        dy = tl.load(DY + _offsets(n, s, c, sdN, sdS, sdC), mask=mask, other=0.0).to(COMPUTE)
        r = 0.0
        if HAS_R:
            r = tl.load(R + xo, mask=mask, other=0.0).to(COMPUTE)
        xhat, g = _grad_pre_activation(x, dy, mean, mean_lo, invstd, w, b, negative_slope, alpha,
                                       HAS_LO, ACTIVATION, r)
        if HAS_R:
            tl.store(DR + xo, g.to(DR.dtype.element_ty), mask=mask)
        g = tl.where(mask, g, 0.0)
        acc_g += g
        acc_gx += g * xhat
        if DX_MODE == 1:
            dx = g * scale[None, :]
            tl.store(DX + _offsets(n, s, c, soN, soS, soC), dx.to(DX.dtype.element_ty), mask=mask)
    sum_g = tl.sum(acc_g, 0)
    sum_gx = tl.sum(acc_gx, 0)
    out = pid_p * C + c
    tl.store(PSUM_G + out, sum_g, mask=cmask)
    tl.store(PSUM_GX + out, sum_gx, mask=cmask)
    if DX_MODE == 2:
        inv_n = from_pair(inv_n_hi, inv_n_lo, COMPUTE)
        _dx_units(X, DY, DX, c, cmask, mean, mean_lo, invstd, w, b, sum_g * inv_n, sum_gx * inv_n,
                  negative_slope, alpha, S, sxN, sxC, sxS, sdN, sdC, sdS, soN, soC, soS,
                  nsb, n_units, u0, units_per_prog, True, HAS_LO, ACTIVATION, COMPUTE, INT64,
                  BLOCK_S, R, DR, HAS_R, False)


@triton.jit
def _dx_kernel(
    X, DY, DX,  # [N, C, S] through their strides
    MEAN, MEAN_LO, INVSTD, W, B,  # [C] saved statistics (MEAN_LO when HAS_LO) and affine parameters
    SUM_G, SUM_GX,  # [C] sums of g and g * xhat over the (global) batch; unused in eval
    C, S, sxN, sxC, sxS, sdN, sdC, sdS, soN, soC, soS,
    nsb, n_units, units_per_prog,
    inv_n_hi, inv_n_lo,  # 1 / count as an fp32 pair (hi + lo)
    slope_hi, slope_lo, alpha_hi, alpha_lo,  # leaky_relu slope, elu alpha: fp32 pairs
    eps_hi, eps_lo,  # eps as an fp32 pair, used with FROM_VAR (INVSTD then holds the variance)
    TRAINING: tl.constexpr, HAS_LO: tl.constexpr, FROM_VAR: tl.constexpr, HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACTIVATION: tl.constexpr,
    COMPUTE: tl.constexpr, INT64: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    R=None, DR=None,  # residual and its gradient, [N, C, S] with X's strides, when HAS_R
    HAS_R: tl.constexpr = False,
    WRITE_DR: tl.constexpr = False,  # store g to DR (when no reduction pass wrote it)
):
    c, cmask, mean, mean_lo, invstd, w, b, negative_slope, alpha = _program_channels(
        MEAN, MEAN_LO, INVSTD, W, B, C, eps_hi, eps_lo, slope_hi, slope_lo, alpha_hi, alpha_lo,
        HAS_LO, FROM_VAR, HAS_W, HAS_B, COMPUTE, BLOCK_C)
    if TRAINING:
        inv_n = from_pair(inv_n_hi, inv_n_lo, COMPUTE)
        mean_g = tl.load(SUM_G + c, mask=cmask, other=0.0).to(COMPUTE) * inv_n
        mean_gx = tl.load(SUM_GX + c, mask=cmask, other=0.0).to(COMPUTE) * inv_n
    else:
        mean_g = mean  # unused
        mean_gx = mean
    _dx_units(X, DY, DX, c, cmask, mean, mean_lo, invstd, w, b, mean_g, mean_gx,
              negative_slope, alpha, S, sxN, sxC, sxS, sdN, sdC, sdS, soN, soC, soS,
              nsb, n_units, tl.program_id(1) * units_per_prog, units_per_prog, TRAINING, HAS_LO,
              ACTIVATION, COMPUTE, INT64, BLOCK_S, R, DR, HAS_R, WRITE_DR)


# ----------------------------------------------------------------------------------------------
# launch planning


@functools.lru_cache(maxsize=1024)
def _activation_scalars(negative_slope, alpha) -> dict:
    """The activation's float parameters as fp32 pairs (exact for fp64 inputs, like eps)."""
    slope_hi, slope_lo = rt.split_f32(float(negative_slope))
    alpha_hi, alpha_lo = rt.split_f32(float(alpha))
    return dict(slope_hi=slope_hi, slope_lo=slope_lo, alpha_hi=alpha_hi, alpha_lo=alpha_lo)


def _ncs_strides(t: torch.Tensor):
    """(sN, sC, sS) of ``t`` seen as [N, C, S], or None when its spatial dims cannot be flattened
    into one stride (then the caller copies)."""
    if t.dim() == 2:
        return t.stride(0), t.stride(1), 1
    dims = [(n, st) for n, st in zip(t.shape[2:], t.stride()[2:]) if n != 1]
    if not dims:
        return t.stride(0), t.stride(1), 1
    for (n0, s0), (n1, s1) in zip(dims, dims[1:]):
        if s0 != s1 * n1:
            return None
    return t.stride(0), t.stride(1), dims[-1][1]


class _View:
    """How the kernels address one input: sizes, merged-or-not, and a tensor's strides."""

    def __init__(self, x: torch.Tensor):
        self.N, self.C = x.shape[0], x.shape[1]
        self.S = 1
        for n in x.shape[2:]:
            self.S *= n
        sN, _, sS = _ncs_strides(x)
        # batch and spatial merge when sample n + 1 starts where sample n ends in S order
        self.merged = self.N == 1 or self.S == 1 or sN == self.S * sS
        self.rows, self.cols = (1, self.N * self.S) if self.merged else (self.N, self.S)
        self.x_stride = x.stride()
        self.x_view_strides = self._strides(x)
        self.x_int64 = rt.needs_int64(x)

    def int64(self, *tensors: torch.Tensor) -> bool:
        """Whether offsets into x or ``tensors`` can pass 2^31."""
        return self.x_int64 or any(t.stride() != self.x_stride and rt.needs_int64(t)
                                   for t in tensors)

    def strides(self, t: torch.Tensor):
        if t.stride() == self.x_stride:  # y, dx (empty_like) and usually dy: x's layout
            return self.x_view_strides
        return self._strides(t)

    def _strides(self, t: torch.Tensor):
        st = _ncs_strides(t)
        if st is None:
            return None
        sN, sC, sS = st
        if not self.merged:
            return sN, sC, sS
        if self.S == 1:
            return 0, sC, sN
        if self.N == 1:
            return 0, sC, sS
        if sN != self.S * sS:
            return None
        return 0, sC, sS


def _prepare_input(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels can address it: dense with flattenable spatial dims, else a copy."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    if rt.is_dense(x) and _ncs_strides(x) is not None:
        return x
    if not rt.is_dense(x):
        x = torch.empty_like(x).copy_(x)  # dense, in the memory format torch suggests for x
        if _ncs_strides(x) is not None:
            return x
    return x.contiguous()


def _like(t: torch.Tensor, x: torch.Tensor, view: _View) -> torch.Tensor:
    """``t`` (e.g. the incoming gradient) in a layout ``view`` can address; copies if needed."""
    if view.strides(t) is not None:
        return t
    return torch.empty_like(x).copy_(t)


_sm_count: dict = {}


def _target_programs(device: torch.device, reduction: bool) -> int:
    """Programs to aim for: a few waves on a GPU; a handful in the interpreter, where each program
    costs numpy calls."""
    if device.type == "cpu":  # the interpreter: each program costs Python per op
        return 4 if reduction else 1
    key = (device.type, device.index)
    if key not in _sm_count:
        try:
            _sm_count[key] = torch.cuda.get_device_properties(device).multi_processor_count
        except Exception:  # a device torch.cuda cannot describe
            _sm_count[key] = 108
    return (4 if reduction else 64) * _sm_count[key]


def plan(x: torch.Tensor, reduction: bool = True) -> dict:
    """Tile shape and grid for ``x`` ([N, C, *spatial], already prepared).  ``num_partials`` is
    the number of splits per channel (rows of the statistics workspace).  Cached per shape,
    strides, element size and device: host time matters for small layers."""
    target = _target_programs(x.device, reduction)
    key = (tuple(x.shape), x.stride(), x.element_size(), target, reduction)
    p = _plans.get(key)
    if p is None:
        if len(_plans) > 4096:
            _plans.clear()
        p = _plans[key] = _make_plan(x, target, reduction)
    return p


_plans: dict = {}


def _make_plan(x: torch.Tensor, target: int, reduction: bool) -> dict:
    view = _View(x)
    C, cols = view.C, view.cols
    sN, sC, sS = view.strides(x)
    tile = max(16, TILE_BYTES // x.element_size())
    if sS == 1 and cols > 1 and sC != 1:  # spatial axis contiguous (NCHW): long in S
        block_s = min(triton.next_power_of_2(cols), tile)
        block_c = min(triton.next_power_of_2(max(C, 1)), max(1, tile // block_s))
    else:  # channels contiguous (channels_last, (N, C)): wide in C
        block_c = min(triton.next_power_of_2(max(C, 1)), CL_BLOCK_C)
        block_s = min(triton.next_power_of_2(max(cols, 1)), max(1, tile // block_c))
    nsb = triton.cdiv(cols, block_s)
    n_units = view.rows * nsb
    c_blocks = triton.cdiv(C, block_c)
    splits = max(1, min(n_units, triton.cdiv(target, c_blocks), 65535))
    if reduction and n_units <= FUSED_MAX_UNITS:
        splits = 1
    units_per_prog = max(1, triton.cdiv(n_units, splits))
    splits = triton.cdiv(n_units, units_per_prog)
    return dict(view=view, BLOCK_S=block_s, BLOCK_C=block_c, nsb=nsb, n_units=n_units,
                units_per_prog=units_per_prog, grid=(c_blocks, splits), num_partials=splits,
                num_warps=rt.num_warps_for(block_s * block_c))


def _launch_args(p: dict) -> dict:
    return dict(nsb=p["nsb"], n_units=p["n_units"], units_per_prog=p["units_per_prog"],
                BLOCK_S=p["BLOCK_S"], BLOCK_C=p["BLOCK_C"], num_warps=p["num_warps"])


# ----------------------------------------------------------------------------------------------
# host building blocks (x already prepared with _prepare_input, numel > 0)


def bn_partial_stats(x: torch.Tensor):
    """Per-split partial statistics of a local batch (x prepared): (count, mean, m2, mean_lo),
    each [P, C] in the accumulation dtype (fp32, fp64 for fp64); the mean of a partial is
    mean + mean_lo.  An empty x gives one partial of count 0."""
    acc = rt.accum_dtype(x.dtype)
    if x.numel() == 0:  # an empty local batch (a SyncBatchNorm rank) contributes count 0
        return torch.zeros((4, 1, x.shape[1]), dtype=acc, device=x.device).unbind(0)
    p = plan(x, reduction=True)
    view = p["view"]
    sN, sC, sS = view.strides(x)
    P, C = p["num_partials"], view.C
    count, mean, m2, mean_lo = torch.empty((4, P, C), dtype=acc, device=x.device).unbind(0)
    _stats_partial_kernel[p["grid"]](
        x, count, mean, mean_lo, m2, C, view.cols, sN, sC, sS,
        COMPUTE=rt.compute_dtype(x.dtype), INT64=view.int64(), **_launch_args(p))
    return count, mean, m2, mean_lo


def bn_combine_stats(count, mean, m2, mean_lo=None, eps=1e-5, running_mean=None,
                     running_var=None, momentum=0.1, num_batches_tracked=None, local=False,
                     as_rows=False):
    """Merge partials (count, mean, m2 and optional mean_lo: [P, C] each, as bn_partial_stats
    returns them, or gathered from several processes).

    Default: returns (mean, mean_lo, invstd), [C] each: the batch mean as hi + lo (lo keeps the
    digits hi rounds away when |mean| >> std) and 1 / sqrt(biased var + eps); running stats, when
    given, are updated in place with the unbiased variance and ``momentum`` (``momentum=None``:
    factor 1 / ``num_batches_tracked``, read on the device).
    ``local=True``: returns the merged (count, mean, m2, mean_lo) as [1, C] tensors, one partial
    per process, ready to be gathered across processes and merged again.
    ``as_rows=True``: the same results as one [3, C] (or [4, 1, C]) tensor, one row each."""
    P, C = mean.shape
    acc = mean.dtype
    dev = mean.device
    compute = tl.float64 if acc == torch.float64 else tl.float32
    if local:
        out = torch.empty((4, 1, C), dtype=acc, device=dev)
        out_count, out_mean, out_m2, out_lo = out.unbind(0)
        invstd = out_mean  # unused
    else:
        out = torch.empty((3, C), dtype=acc, device=dev)
        out_mean, out_lo, invstd = out.unbind(0)
        out_count = out_m2 = out_mean  # unused
    update = running_mean is not None and not local
    cumulative = update and momentum is None
    block_p = min(triton.next_power_of_2(P), 32)
    block_c = min(triton.next_power_of_2(C), 128)
    eps_hi, eps_lo = rt.split_f32(float(eps))
    mom_hi, mom_lo = rt.split_f32(0.0 if momentum is None else float(momentum))
    _stats_combine_kernel[(triton.cdiv(C, block_c),)](
        count, mean, mean_lo if mean_lo is not None else mean, m2, out_mean, out_lo, invstd,
        out_count, out_m2,
        running_mean if update else out_mean, running_var if update else out_mean,
        num_batches_tracked if cumulative else out_mean,
        P, C, eps_hi, eps_lo, mom_hi, mom_lo,
        HAS_LO=mean_lo is not None, UPDATE=update, CUMULATIVE=cumulative,
        WRITE_INVSTD=not local, WRITE_M2=local,
        COMPUTE=compute, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)
    if as_rows:
        return out
    if local:
        return out_count, out_mean, out_m2, out_lo
    return out_mean, out_lo, invstd


def _stat_args(x, mean, mean_lo, invstd, weight, bias, var, eps):
    """Pointer arguments and flags shared by the normalize and backward kernels.  ``var`` (with
    ``eps``) replaces ``invstd``: the kernels then take 1 / sqrt(var + eps) themselves."""
    from_var = var is not None
    eps_hi, eps_lo = rt.split_f32(float(eps))
    flags = dict(HAS_LO=mean_lo is not None, FROM_VAR=from_var, HAS_W=weight is not None,
                 HAS_B=bias is not None, eps_hi=eps_hi, eps_lo=eps_lo)
    ptrs = (mean, mean_lo if mean_lo is not None else mean, var if from_var else invstd,
            weight if weight is not None else mean, bias if bias is not None else mean)
    return ptrs, flags


def _residual_args(residual, dr=None) -> dict:
    """Kernel arguments for an optional residual (already in x's layout) and its gradient."""
    if residual is None:
        return {}
    return dict(R=residual, HAS_R=True, **({} if dr is None else dict(DR=dr)))


def bn_normalize(x, mean, invstd, weight, bias, activation="identity", negative_slope=0.01,
                 alpha=1.0, mean_lo=None, var=None, eps=0.0, residual=None):
    """``act((x - mean - mean_lo) * invstd * weight + bias)``; ``activation`` is a kernel name
    (``activations.kernel_name``).  Output in x's dtype and memory format.  Eval passes the
    running stats: ``mean=running_mean, invstd=None, var=running_var, eps=eps``."""
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    p = plan(x, reduction=False)
    view = p["view"]
    ptrs, flags = _stat_args(x, mean, mean_lo, invstd, weight, bias, var, eps)
    _normalize_kernel[p["grid"]](
        x, y, *ptrs, view.C, view.cols, *view.strides(x), *view.strides(y),
        **_activation_scalars(negative_slope, alpha), ACTIVATION=activation,
        COMPUTE=rt.compute_dtype(x.dtype), INT64=view.int64(y), **flags, **_launch_args(p),
        **_residual_args(residual))
    return y


def bn_backward_reduce(x, dy, mean, invstd, weight, bias, activation="identity",
                       negative_slope=0.01, alpha=1.0, mean_lo=None, as_rows=False, var=None,
                       eps=0.0):
    """Per-channel (sum g, sum g * xhat) over the local batch, g = dy * act'(z): [C] each in the
    accumulation dtype.  They are dbias and dweight, and what SyncBatchNorm all-reduces
    (``as_rows=True``: one [2, C] tensor)."""
    if x.numel() == 0:
        sums = torch.zeros((2, x.shape[1]), dtype=rt.accum_dtype(x.dtype), device=x.device)
    else:
        sums, _ = _backward_pass(x, dy, mean, invstd, weight, bias, activation, negative_slope,
                                 alpha, mean_lo, var, eps)
    return sums if as_rows else sums.unbind(0)


def _backward_pass(x, dy, mean, invstd, weight, bias, activation, negative_slope, alpha, mean_lo,
                   var, eps, dx_mode=0, count=1, residual=None, dr=None):
    """One ``_backward_reduce_kernel`` launch over the reduction plan: (sums [2, C], dx or None).
    ``dx_mode`` 1 adds the eval dx to the pass; 2 the training dx (plans with one partial only:
    each program then holds its channels' whole sums; ``count`` is the elements per channel)."""
    p = plan(x, reduction=True)
    view = p["view"]
    P, C = p["num_partials"], view.C
    assert dx_mode != 2 or P == 1, "a training dx in the reduction pass needs whole channels"
    dy = _like(dy, x, view)
    dx = torch.empty_like(x) if dx_mode else None
    ws = torch.empty((2, P, C), dtype=rt.accum_dtype(x.dtype), device=x.device)
    ptrs, flags = _stat_args(x, mean, mean_lo, invstd, weight, bias, var, eps)
    inv_hi, inv_lo = rt.split_f32(1.0 / max(int(count), 1))
    out = dx if dx_mode else x  # a dummy pointer without dx
    _backward_reduce_kernel[p["grid"]](
        x, dy, out, *ptrs, ws[0], ws[1], C, view.cols, *view.strides(x), *view.strides(dy),
        *view.strides(out), inv_n_hi=inv_hi, inv_n_lo=inv_lo,
        **_activation_scalars(negative_slope, alpha), DX_MODE=dx_mode, ACTIVATION=activation,
        COMPUTE=rt.compute_dtype(x.dtype), INT64=view.int64(dy, out), **flags, **_launch_args(p),
        **_residual_args(residual, dr))
    sums = ws[:, 0] if P == 1 else ws.sum(1)  # deterministic combine over the splits
    return sums, dx


def bn_backward_dx(x, dy, mean, invstd, weight, bias, sum_g=None, sum_gx=None, count=1,
                   activation="identity", negative_slope=0.01, alpha=1.0, training=True,
                   mean_lo=None, var=None, eps=0.0, residual=None, dr=None, write_dr=False):
    """dx.  Training: from the (global) sums of g and g * xhat and the (global) element count per
    channel (pass sums already divided by the count and ``count=1`` if the count is on a device).
    Eval (``training=False``): ``g * weight * invstd``."""
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return dx
    p = plan(x, reduction=False)
    view = p["view"]
    dy = _like(dy, x, view)
    ptrs, flags = _stat_args(x, mean, mean_lo, invstd, weight, bias, var, eps)
    inv_hi, inv_lo = rt.split_f32(1.0 / max(int(count), 1))
    _dx_kernel[p["grid"]](
        x, dy, dx, *ptrs, sum_g if training else mean, sum_gx if training else mean,
        view.C, view.cols, *view.strides(x), *view.strides(dy), *view.strides(dx),
        inv_n_hi=inv_hi, inv_n_lo=inv_lo, **_activation_scalars(negative_slope, alpha),
        TRAINING=training, ACTIVATION=activation,
        COMPUTE=rt.compute_dtype(x.dtype), INT64=view.int64(dy, dx), **flags,
        **_launch_args(p), **_residual_args(residual, dr),
        **(dict(WRITE_DR=True) if write_dr else {}))
    return dx


def num_partials(x: torch.Tensor) -> int:
    """How many splits per channel the statistics pass uses for ``x`` (1 = one program per
    channel block); exposed for tests and tuning."""
    return plan(_prepare_input(x), reduction=True)["num_partials"]


# ----------------------------------------------------------------------------------------------
# autograd


# Two entry points share the implementations below.  Eager calls go through an
# autograd.Function (dispatching a torch.library op costs tens of microseconds per call, as much as
# the kernels of a small layer); under torch.compile the same implementations are torch.library
# custom ops with fake implementations.  There are two forward ops because an op that mutates its
# inputs cannot carry an autograd formula: ``tkern::batch_norm_stats`` (mutates the running stats,
# no gradient: it sees x detached) and ``tkern::batch_norm_normalize`` (functional; its backward,
# ``tkern::batch_norm_backward``, holds the whole gradient, including the batch statistics'
# dependence on x in training).  Batch statistics travel as one [3, C] tensor: mean, mean_lo,
# invstd; eval passes the running stats instead.


def _stat_kwargs(stats, running_mean, running_var, eps):
    """(mean, invstd, extra kwargs) for the launchers: batch statistics (rows of ``stats``) or,
    without them (eval), the running stats, whose invstd the kernels take themselves."""
    if stats is not None:
        return stats[0], stats[2], dict(mean_lo=stats[1])
    return running_mean, None, dict(var=running_var, eps=eps)


def _fused_forward(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum,
                   eps, activation="identity", negative_slope=0.01, alpha=1.0, write_y=True,
                   residual=None):
    """The one-launch training forward (x prepared, non-empty, a plan with one partial):
    (y or None, statistics [3, C]); running stats, when given, updated in place."""
    p = plan(x, reduction=True)
    view = p["view"]
    C = view.C
    stats = torch.empty((3, C), dtype=rt.accum_dtype(x.dtype), device=x.device)
    y = torch.empty_like(x) if write_y else x
    update = running_mean is not None
    cumulative = update and momentum is None
    eps_hi, eps_lo = rt.split_f32(float(eps))
    mom_hi, mom_lo = rt.split_f32(0.0 if momentum is None else float(momentum))
    dummy = stats[0]
    _fused_forward_kernel[(p["grid"][0],)](
        x, y, stats[0], stats[1], stats[2],
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        running_mean if update else dummy, running_var if update else dummy,
        num_batches_tracked if cumulative else dummy,
        C, view.cols, *view.strides(x), *view.strides(y), p["nsb"], p["n_units"],
        eps_hi, eps_lo, mom_hi, mom_lo, **_activation_scalars(negative_slope, alpha),
        UPDATE=update, CUMULATIVE=cumulative, WRITE_Y=write_y, HAS_W=weight is not None,
        HAS_B=bias is not None, ACTIVATION=activation, COMPUTE=rt.compute_dtype(x.dtype),
        INT64=view.int64(y), BLOCK_S=p["BLOCK_S"], BLOCK_C=p["BLOCK_C"],
        num_warps=p["num_warps"], **_residual_args(residual))
    return (y if write_y else None), stats


def _stats_impl(x, running_mean, running_var, num_batches_tracked, momentum, eps):
    """Batch statistics [3, C] (mean, mean_lo, invstd); running stats updated in place."""
    x = _prepare_input(x)
    acc = rt.accum_dtype(x.dtype)
    if x.numel() == 0:  # nothing to normalize; running stats stay as they are (as torch)
        stats = torch.zeros((3, x.shape[1]), dtype=acc, device=x.device)
        stats[2].fill_(1.0)
        return stats
    if plan(x, reduction=True)["num_partials"] == 1:
        return _fused_forward(x, None, None, running_mean, running_var, num_batches_tracked,
                              momentum, eps, write_y=False)[1]
    return bn_combine_stats(*bn_partial_stats(x), eps=eps, running_mean=running_mean,
                            running_var=running_var, momentum=momentum,
                            num_batches_tracked=num_batches_tracked, as_rows=True)


def _residual_like(residual, x):
    """The residual in x's (prepared) layout: the kernels read it through x's offsets."""
    if residual is None or residual.stride() == x.stride():
        return residual
    return torch.empty_like(x).copy_(residual)


def _train_forward_impl(x, weight, bias, running_mean, running_var, num_batches_tracked,
                        momentum, eps, activation, negative_slope, alpha, residual=None):
    """Training forward (eager): (y, batch statistics [3, C]), running stats updated in place.
    One launch when the plan has one partial per channel, else three (stats, merge, normalize)."""
    x = _prepare_input(x)
    residual = _residual_like(residual, x)
    if x.numel() and plan(x, reduction=True)["num_partials"] == 1:
        return _fused_forward(x, weight, bias, running_mean, running_var, num_batches_tracked,
                              momentum, eps, activation, negative_slope, alpha,
                              residual=residual)
    stats = _stats_impl(x, running_mean, running_var, num_batches_tracked, momentum, eps)
    return _normalize_impl(x, weight, bias, stats, None, None, eps, True, activation,
                           negative_slope, alpha, residual), stats


def _normalize_impl(x, weight, bias, stats, running_mean, running_var, eps, training, activation,
                    negative_slope, alpha, residual=None):
    """y from batch statistics ``stats`` [3, C] (training) or from the running stats (eval)."""
    x = _prepare_input(x)
    mean, invstd, kw = _stat_kwargs(stats, running_mean, running_var, eps)
    return bn_normalize(x, mean, invstd, weight, bias, activation, negative_slope, alpha, **kw,
                        residual=_residual_like(residual, x))


def _backward_impl(dy, x, weight, bias, stats, running_mean, running_var, eps, training,
                   activation, negative_slope, alpha, need_x, need_wb, residual=None,
                   need_r=False):
    """(dx or an empty tensor, sums [2, C]: sum g = dbias, sum g * xhat = dweight, and the
    residual's gradient g or an empty tensor).
    Passes over x and dy: eval one; training one per program when the plan has one partial per
    channel (reduce, then dx from cache), else two launches (reduce, dx)."""
    x = _prepare_input(x)
    mean, invstd, kw = _stat_kwargs(stats, running_mean, running_var, eps)
    residual = _residual_like(residual, x)
    # with a residual, g (dy * act'(bn(x) + r)) is the residual's gradient: the first pass over
    # each element writes it
    dr = torch.empty_like(x) if residual is not None else None
    res = dict(residual=residual, dr=dr)
    args = (x, dy, mean, invstd, weight, bias, activation, negative_slope, alpha,
            kw.get("mean_lo"), kw.get("var"), kw.get("eps", 0.0))
    C = x.shape[1]
    zeros = x.new_zeros((2, C), dtype=rt.accum_dtype(x.dtype))
    dx = x.new_empty(0)
    if x.numel() == 0:
        return ((torch.empty_like(x) if need_x else dx), zeros,
                (torch.empty_like(x) if need_r else dx))

    def out(dx, sums):
        return dx, sums, (dr if need_r and dr is not None else x.new_empty(0))

    count = x.numel() // C
    need_pass = need_wb or (need_r and residual is not None)
    if need_x and not training:
        if not need_pass:  # elementwise: the plan with more programs
            return out(bn_backward_dx(x, dy, mean, invstd, weight, bias, activation=activation,
                                      negative_slope=negative_slope, alpha=alpha,
                                      training=False, **kw, **res,
                                      write_dr=residual is not None), zeros)
        sums, dx = _backward_pass(*args, dx_mode=1, **res)
        return out(dx, sums)
    if need_x and plan(x, reduction=True)["num_partials"] == 1:
        sums, dx = _backward_pass(*args, dx_mode=2, count=count, **res)
        return out(dx, sums)
    if not (need_x or need_pass):
        return out(dx, zeros)
    sums, _ = _backward_pass(*args, **res)
    if need_x:
        dx = bn_backward_dx(x, dy, mean, invstd, weight, bias, sums[0], sums[1], count,
                            activation, negative_slope, alpha, training=True, **kw, **res)
    return out(dx, sums)


def _differentiable_backward(ctx, dy):
    """Backward under create_graph=True (double backward): the same gradient from torch ops, whose
    graph autograd can differentiate again.  The first-order path never comes here."""
    x, weight, bias, _, running_mean, running_var, residual = ctx.saved_tensors
    eps, training, activation, negative_slope, alpha = ctx.cfg
    act, approximate = ("gelu", "tanh") if activation == "gelu_tanh" else (activation, "none")
    needs = (*ctx.needs_input_grad[:3], residual is not None and ctx.needs_input_grad[-1])
    wanted = [t for t, need in zip((x, weight, bias, residual), needs) if need]
    with torch.enable_grad():
        y = F.batch_norm(x, None if training else running_mean, None if training else running_var,
                         weight, bias, training, 0.0, eps)
        if residual is not None:
            y = y + residual
        y = eager_activation(y, act, negative_slope, alpha, approximate)
    grads = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need else None for need in needs)


def _grads(ctx, dy, backward):
    """(dx, dweight, dbias, dresidual) from what forward saved: x, weight, bias, the statistics
    used and the residual (never the pre-activation: it is rebuilt from them)."""
    if torch.is_grad_enabled():
        return _differentiable_backward(ctx, dy)
    x, weight, bias, stats, running_mean, running_var, residual = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_r = residual is not None and ctx.needs_input_grad[-1]
    dx, sums, dr = backward(dy, x, weight, bias, stats, running_mean, running_var, *ctx.cfg,
                            need_x, need_w or need_b, residual, need_r)
    return (dx if need_x else None, sums[1].to(weight.dtype) if need_w else None,
            sums[0].to(bias.dtype) if need_b else None, dr if need_r else None)


def _save(ctx, x, weight, bias, stats, running_mean, running_var, eps, training, activation,
          negative_slope, alpha, residual=None):
    ctx.save_for_backward(x, weight, bias, stats, running_mean, running_var, residual)
    ctx.cfg = (eps, training, activation, negative_slope, alpha)


class _BatchNormFunction(torch.autograd.Function):
    """The eager path (see above).  Training computes the batch statistics here, updating the
    running stats named in ``update`` (running_mean, running_var, num_batches_tracked, momentum),
    a tuple so that autograd does not take them for inputs.  Returns (y, statistics or None);
    forward takes no ctx (setup_context saves), as torch.func transforms require."""

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, eps, training, activation,
                negative_slope, alpha, update, residual):
        act = (activation, negative_slope, alpha)
        if training:
            return _train_forward_impl(x, weight, bias, *update, eps, *act, residual)
        return _normalize_impl(x, weight, bias, None, running_mean, running_var, eps, False,
                               *act, residual), None

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, running_mean, running_var, eps, training, *act, _, residual = inputs
        stats = output[1]
        if stats is not None:
            ctx.mark_non_differentiable(stats)
        _save(ctx, x, weight, bias, stats, running_mean, running_var, eps, training, *act,
              residual)

    @staticmethod
    def backward(ctx, dy, _):
        dx, dw, db, dr = _grads(ctx, dy, _backward_impl)
        return (dx, dw, db) + (None,) * 8 + (dr,)


@torch.library.custom_op("tkern::batch_norm_stats", mutates_args=("running_mean", "running_var"))
def _stats_op(x: torch.Tensor, running_mean: Optional[torch.Tensor],
              running_var: Optional[torch.Tensor], num_batches_tracked: Optional[torch.Tensor],
              momentum: Optional[float], eps: float) -> torch.Tensor:
    return _stats_impl(x, running_mean, running_var, num_batches_tracked, momentum, eps)


@_stats_op.register_fake
def _(x, running_mean, running_var, num_batches_tracked, momentum, eps):
    return x.new_empty((3, x.shape[1]), dtype=rt.accum_dtype(x.dtype))


@torch.library.custom_op("tkern::batch_norm_normalize", mutates_args=())
def _forward_op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                stats: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                running_var: Optional[torch.Tensor], eps: float, training: bool, activation: str,
                negative_slope: float, alpha: float,
                residual: Optional[torch.Tensor]) -> torch.Tensor:
    return _normalize_impl(x, weight, bias, stats, running_mean, running_var, eps, training,
                           activation, negative_slope, alpha, residual)


@_forward_op.register_fake
def _(x, weight, bias, stats, running_mean, running_var, eps, training, activation,
      negative_slope, alpha, residual):
    return torch.empty_like(_prepare_input(x))


@torch.library.custom_op("tkern::batch_norm_backward", mutates_args=())
def _backward_op(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor], stats: Optional[torch.Tensor],
                 running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                 eps: float, training: bool, activation: str, negative_slope: float, alpha: float,
                 need_x: bool, need_wb: bool, residual: Optional[torch.Tensor],
                 need_r: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(dy, x, weight, bias, stats, running_mean, running_var, eps, training,
                          activation, negative_slope, alpha, need_x, need_wb, residual, need_r)


@_backward_op.register_fake
def _(dy, x, weight, bias, stats, running_mean, running_var, eps, training, activation,
      negative_slope, alpha, need_x, need_wb, residual, need_r):
    x = _prepare_input(x)
    dx = torch.empty_like(x) if need_x else x.new_empty(0)
    dr = torch.empty_like(x) if need_r else x.new_empty(0)
    return dx, x.new_empty((2, x.shape[1]), dtype=rt.accum_dtype(x.dtype)), dr


def _op_grads(ctx, dy):
    dx, dw, db, dr = _grads(ctx, dy, _backward_op)
    return (dx, dw, db) + (None,) * 8 + (dr,)


_forward_op.register_autograd(_op_grads,
                              setup_context=lambda ctx, inputs, output: _save(ctx, *inputs))


# ----------------------------------------------------------------------------------------------
# public function


class _DtypeNotImplemented(rt.DtypeError, NotImplementedError):
    """Integer input: torch raises NotImplementedError; this is that and DtypeError."""


def _check(input, running_mean, running_var, weight, bias, training, eps):
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"tkern.batch_norm: input must be a Tensor, got {type(input).__name__}")
    if training:
        size = input.shape
        if len(size) == 0:
            raise IndexError("tkern.batch_norm: input must have at least 2 dims (N, C, ...), got 0")
        n = size[0]
        for d in size[2:]:
            n *= d
        if n == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {size}")
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if input.numel() == 0:  # torch returns before checking anything else (see _batch_norm)
        return
    if not training:  # torch checks this first: one missing running stat in eval is RuntimeError
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is None:
                raise RuntimeError(f"tkern.batch_norm: {name} must be defined in evaluation mode")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if input.dim() < 2:
        raise (IndexError if running_mean is None else RuntimeError)(
            f"tkern.batch_norm: expected input of shape (N, C, ...), got {tuple(input.shape)}")
    if not input.is_floating_point():
        raise _DtypeNotImplemented(
            f"tkern.batch_norm: input must be a floating-point tensor, got {input.dtype}")
    C = input.shape[1]
    low = input.dtype in (torch.float16, torch.bfloat16)
    params = {"weight": weight, "bias": bias, "running_mean": running_mean,
              "running_var": running_var}
    params = {name: t for name, t in params.items() if t is not None}
    for name, t in params.items():
        if t.numel() != C:
            raise RuntimeError(
                f"tkern.batch_norm: {name} should contain {C} elements not {t.numel()}")
        if name.startswith("running") and t.dim() != 1:  # updated in place: torch wants [C]
            raise RuntimeError(f"tkern.batch_norm: {name} must be 1-D, got {tuple(t.shape)}")
        if t.dtype != input.dtype and not (low and t.dtype == torch.float32):
            raise rt.DtypeError(
                f"tkern.batch_norm: {name} must have the input's dtype ({input.dtype})"
                f"{' or float32' if low else ''}, got {t.dtype}")
    if low and len({t.dtype for t in params.values()}) > 1:  # torch takes all fp32, or none
        raise rt.DtypeError(
            f"tkern.batch_norm: with {input.dtype} input, weight, bias and running stats must be "
            f"all float32 or all {input.dtype}, got "
            + ", ".join(f"{name} {t.dtype}" for name, t in params.items()))


def _flat(t):
    """A [C] parameter as the kernels index it (unit stride); a copy only when strided."""
    if t is None or (t.dim() == 1 and t.is_contiguous()):
        return t
    return t.reshape(-1).contiguous()


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                activation, negative_slope, alpha, approximate, num_batches_tracked=None,
                residual=None):
    """Shared body of ``batch_norm`` and the modules.  ``momentum=None`` (modules only) means the
    cumulative average 1 / num_batches_tracked, read on the device."""
    kact = kernel_name(activation, approximate)
    if residual is not None and not (
            isinstance(residual, torch.Tensor) and isinstance(input, torch.Tensor)
            and residual.shape == input.shape and residual.dtype == input.dtype
            and residual.device == input.device and input.numel() > 0
            and rt.use_triton("batch_norm", input, residual)):
        # broadcast, promotion, an empty batch or the eager fallback: torch adds, as
        # act(bn(x) + r) would
        y = _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                        None, negative_slope, alpha, "none", num_batches_tracked)
        return eager_activation(y + residual, activation, negative_slope, alpha, approximate)
    _check(input, running_mean, running_var, weight, bias, training, eps)
    if input.numel() == 0:
        # torch's batch_norm on an empty input, whatever its rank or parameters: a copy (not a
        # view, not a fresh tensor: gradients still flow), scaled by weight[0] and shifted by
        # bias[0]; running stats untouched
        y = input.clone()
        if weight is not None:
            y = y * weight[0]
        if bias is not None:
            y = y + bias[0]
        return eager_activation(y, activation, negative_slope, alpha, approximate)
    if not rt.use_triton("batch_norm", input, running_mean, running_var, weight, bias):
        if momentum is None:
            momentum = 1.0 / float(num_batches_tracked) if num_batches_tracked is not None else 0.0
        y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return eager_activation(y, activation, negative_slope, alpha, approximate)
    update = training and running_mean is not None
    if update and momentum is None and num_batches_tracked is None:
        raise ValueError("tkern.batch_norm: momentum=None needs num_batches_tracked")
    weight, bias = _flat(weight), _flat(bias)
    rm, rv = (_flat(running_mean), _flat(running_var)) if update or not training else (None, None)
    nbt = num_batches_tracked if update and momentum is None else None
    momentum = momentum if update else 0.0
    act = (kact, float(negative_slope), float(alpha))
    if not torch.compiler.is_compiling():
        y, _ = _BatchNormFunction.apply(input, weight, bias, None if training else rm,
                                        None if training else rv, float(eps), bool(training),
                                        *act, (rm, rv, nbt, momentum), residual)
    else:
        stats = None
        if training:
            stats = _stats_op(input.detach(), rm, rv, nbt, momentum, float(eps))
        # eval: one launch, the kernel takes invstd from running_var itself
        y = _forward_op(input, weight, bias, stats, None if training else rm,
                        None if training else rv, float(eps), bool(training), *act, residual)
    if update:  # strided running stats were updated as contiguous copies (_flat)
        for t, flat in ((running_mean, rm), (running_var, rv)):
            if flat is not t:
                t.copy_(flat.view_as(t))
    return y


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, activation=None, negative_slope=0.01, alpha=1.0,
               approximate="none", min_val=-1.0, max_val=1.0, beta=1.0, threshold=20.0,
               residual=None):
    """``torch.nn.functional.batch_norm`` followed by a fused activation, in Triton.

    Arguments and errors as ``F.batch_norm``; ``activation`` (None = identity) is one of
    ``tkern.ACTIVATIONS``, with ``negative_slope`` (leaky_relu), ``alpha`` (elu),
    ``approximate`` (gelu), ``min_val``/``max_val`` (hardtanh) and ``beta``/``threshold``
    (softplus).  ``residual`` (a tensor of the input's shape) gives ``act(bn(x) + residual)`` in
    the same pass, with its gradient; backward rebuilds the pre-activation from x, the residual
    and the statistics.  Input (N, C, *) of any floating dtype, NCHW or channels_last
    (read through strides, output in the same memory format); fp16/bf16 input may come with fp32
    weight, bias and running stats.  Training updates running_mean/running_var in place with the
    unbiased batch variance.
    """
    if not isinstance(momentum, (numbers.Real, torch.Tensor)):  # torch takes numpy and 0-dim too
        raise TypeError(f"tkern.batch_norm: momentum must be float, not {type(momentum).__name__}")
    if not isinstance(training, bool):
        raise TypeError(f"tkern.batch_norm: training must be bool, not {type(training).__name__}")
    scalars = activation_scalars(activation, negative_slope, alpha, min_val, max_val, beta,
                                 threshold)  # the kernels' two activation scalars
    return _batch_norm(input, running_mean, running_var, weight, bias, training, float(momentum),
                       eps, activation, *scalars, approximate, residual=residual)
