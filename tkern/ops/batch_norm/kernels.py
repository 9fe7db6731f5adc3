"""BatchNorm's Triton kernels (the design is in ``tkern/ops/batch_norm/__init__.py``).

Every kernel addresses its tensors as ``[N, C, S]`` through strides and walks *units* (one
sample, one block of S) for a block of channels; the launchers in ``launch.py`` pass the plan
(``launch_plan.py``) as ``nsb, n_units, units_per_prog, BLOCK_S, BLOCK_C``.
- ``_fused_forward_kernel``: training forward in one launch (statistics, running stats, y).
- ``_stats_partial_kernel`` -> ``_merge_normalize_kernel``: the split training forward (each
  normalize program merges its channels' partials); ``_stats_combine_kernel`` merges partials
  alone (statistics without y, SyncBatchNorm); eval runs ``_normalize_kernel`` alone (invstd
  from running_var).
- ``_backward_reduce_kernel`` (sums; dx in the same launch with EVAL_DX / TRAIN_DX) and
  ``_dx_kernel``: backward.
Under ``FLAT`` (see ``_lanes``) the tile columns are a program's CPP channels' contiguous
positions and the tile rows samples: parameters reach the columns through ``_at_pos``, column
results reach the channels through ``_merge_positions`` / ``_channel_sums``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..._launch import jit
from .._math import cast_rn, from_pair
from ...activations import activate, activation_grad

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
def _lanes(C, BLOCK_C: tl.constexpr, FLAT: tl.constexpr, FLAT_S: tl.constexpr,
           FLAT_C: tl.constexpr, CPP: tl.constexpr):
    """This program's channels and its tile columns: (c, cmask, owned, pos, pmask, lc).
    c [FLAT_C or BLOCK_C]: channel indices, cmask where they exist, owned where this program
    writes their per-channel results.  pos / pmask: the tile's column offsets and mask (the
    channels themselves, or under FLAT the CPP * FLAT_S contiguous positions of channels c,
    channel-major, and lc the local channel of each position)."""
    if FLAT:
        lanes = tl.arange(0, FLAT_C)
        first = tl.program_id(0) * CPP
        # the last block moves back to end at channel C, overlapping its neighbour, so every
        # position of every block is in range: the position mask is a constant (vector access)
        c0 = tl.minimum(first, C - CPP)
        c = c0 + lanes
        cmask = lanes < CPP
        owned = cmask & (c >= first)
        f = tl.arange(0, BLOCK_C)
        pos = c0 * FLAT_S + f
        pmask = f < CPP * FLAT_S
        lc = tl.minimum(f // FLAT_S, FLAT_C - 1)
    else:
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = c < C
        owned = cmask
        pos = c
        pmask = cmask
        lc = c
    return c, cmask, owned, pos, pmask, lc


@triton.jit
def _at_pos(v, lc, FLAT: tl.constexpr):
    """A per-channel vector at the tile's columns (a register gather under FLAT)."""
    if FLAT:
        v = tl.gather(v, lc, 0)
    return v


@triton.jit
def _position_tile(v, FLAT_S: tl.constexpr, FLAT_S2: tl.constexpr, FLAT_C: tl.constexpr):
    """Per-position values [BLOCK_F] as [FLAT_C, FLAT_S2]: row j holds channel j's FLAT_S
    positions (zeros past them), and the mask of those."""
    s = tl.arange(0, FLAT_S2)
    j = tl.arange(0, FLAT_C)
    valid = (s < FLAT_S)[None, :] & (j >= 0)[:, None]
    idx = tl.where(valid, j[:, None] * FLAT_S + s[None, :], 0)
    idx = tl.minimum(idx, v.shape[0] - 1)
    t = tl.reshape(tl.gather(v, tl.reshape(idx, [FLAT_C * FLAT_S2]), 0), [FLAT_C, FLAT_S2])
    return tl.where(valid, t, 0.0), valid


@triton.jit
def _channel_sums(v, FLAT: tl.constexpr, FLAT_S: tl.constexpr, FLAT_S2: tl.constexpr,
                  FLAT_C: tl.constexpr):
    """Per-column sums as per-channel sums (under FLAT: each channel's positions added)."""
    if FLAT:
        t, valid = _position_tile(v, FLAT_S, FLAT_S2, FLAT_C)
        v = tl.sum(t, 1)
    return v


@triton.jit
def _two_sum(a, b):
    """(hi, lo) with hi = fl(a + b) and hi + lo == a + b exactly (Knuth's TwoSum; adds only, so
    FMA contraction cannot disturb it)."""
    hi = a + b
    bb = hi - a
    lo = (a - (hi - bb)) + (b - bb)
    # an infinite sum has no low part (inf - inf would make the mean NaN, torch's is inf)
    return hi, tl.where(hi - hi == 0, lo, 0.0)


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
    # Two tiles a trip, both loads issued before either is used (twice the bytes in flight);
    # units past this program's own are masked through the limit ``end``.
    end = tl.minimum(u0 + units, n_units)
    n, s, smask = _unit(u0, nsb, lanes_s, S, end, INT64, BLOCK_S)
    n_b, s_b, smask_b = _unit(u0 + 1, nsb, lanes_s, S, end, INT64, BLOCK_S)
    mask = smask[:, None] & cmask[None, :]
    mask_b = smask_b[:, None] & cmask[None, :]
    x = tl.load(X + _offsets(n, s, c, sN, sS, sC), mask=mask, other=0.0).to(COMPUTE)
    x_b = tl.load(X + _offsets(n_b, s_b, c, sN, sS, sC), mask=mask_b, other=0.0).to(COMPUTE)
    shift = tl.sum(x, 0) / tl.maximum(tl.sum(smask.to(COMPUTE), 0), 1.0)
    shift = tl.where(shift - shift == 0, shift, 0.0)  # an inf in the first tile: shift by 0
    # the first tiles are summed from the registers that gave the shift (no second load)
    xs = tl.where(mask, x - shift[None, :], 0.0)
    xs_b = tl.where(mask_b, x_b - shift[None, :], 0.0)
    cnt = smask.to(COMPUTE) + smask_b.to(COMPUTE)  # per lane: valid elements seen
    s1 = xs + xs_b
    s2 = xs * xs + xs_b * xs_b
    for i in range(2, units, 2):
        n, s, smask = _unit(u0 + i, nsb, lanes_s, S, end, INT64, BLOCK_S)
        n_b, s_b, smask_b = _unit(u0 + i + 1, nsb, lanes_s, S, end, INT64, BLOCK_S)
        mask = smask[:, None] & cmask[None, :]
        mask_b = smask_b[:, None] & cmask[None, :]
        x = tl.load(X + _offsets(n, s, c, sN, sS, sC), mask=mask, other=0.0).to(COMPUTE)
        x_b = tl.load(X + _offsets(n_b, s_b, c, sN, sS, sC), mask=mask_b, other=0.0).to(COMPUTE)
        xs = tl.where(mask, x - shift[None, :], 0.0)
        xs_b = tl.where(mask_b, x_b - shift[None, :], 0.0)
        cnt += smask.to(COMPUTE) + smask_b.to(COMPUTE)
        s1 += xs + xs_b
        s2 += xs * xs + xs_b * xs_b
    n_tot = tl.sum(cnt, 0)
    sum1 = tl.sum(s1, 0)
    mean_s = sum1 / tl.maximum(n_tot, 1.0)  # relative to shift
    # NaN (inf or NaN input) stays NaN, as torch's variance: a plain maximum would give 0
    m2 = tl.maximum(tl.sum(s2, 0) - sum1 * mean_s, 0.0, propagate_nan=tl.PropagateNan.ALL)
    # the absolute mean as hi + lo: hi alone (fp32) would lose ulp(mean) when |mean| >> std
    hi, lo = _two_sum(shift, mean_s)
    return n_tot, hi, lo, m2


@triton.jit
def _merge_positions(n_tot, hi, lo, m2, FLAT: tl.constexpr, FLAT_S: tl.constexpr,
                     FLAT_S2: tl.constexpr, FLAT_C: tl.constexpr):
    """Per-position statistics (count n_tot each, mean hi + lo, M2) merged per channel under
    FLAT: every position of a channel saw the same samples, so the exact parallel formula has
    equal weights: mean = mean of the position means, M2 = sum M2_f + n sum (mean_f - mean)^2."""
    if FLAT:
        hi_t, valid = _position_tile(hi, FLAT_S, FLAT_S2, FLAT_C)
        lo_t, valid = _position_tile(lo, FLAT_S, FLAT_S2, FLAT_C)
        m2_t, valid = _position_tile(m2, FLAT_S, FLAT_S2, FLAT_C)
        ref = tl.sum(hi_t, 1) / FLAT_S
        ref = tl.where(ref - ref == 0, ref, 0.0)  # an infinite position mean: deviations from 0
        d = tl.where(valid, hi_t - ref[:, None] + lo_t, 0.0)
        dbar = tl.sum(d, 1) / FLAT_S
        dd = tl.where(valid, d - dbar[:, None], 0.0)
        m2 = tl.sum(m2_t, 1) + n_tot * tl.sum(dd * dd, 1)
        m2 = tl.maximum(m2, 0.0, propagate_nan=tl.PropagateNan.ALL)
        hi, lo = _two_sum(ref, dbar)
        n_tot = n_tot * FLAT_S
    return n_tot, hi, lo, m2


@triton.jit
def _partial_blocks(PCOUNT, PMEAN, PMEAN_LO, PM2, P, C, PARTS_ROWS: tl.constexpr):
    """The [P, C] partials' four pointers: separate tensors, or (PARTS_ROWS) the blocks count,
    mean, M2, mean_lo of one [3 + 4P, C] tensor after its 3 statistics rows (a program's one
    allocation: no views, and backward's partial sums reuse it)."""
    if PARTS_ROWS:
        n = P * C
        base = PCOUNT + 3 * C
        return base, base + n, base + 3 * n, base + 2 * n
    return PCOUNT, PMEAN, PMEAN_LO, PM2


@jit
def _stats_partial_kernel(
    X,  # input viewed as [N, C, S] through (sN, sC, sS)
    PCOUNT, PMEAN, PMEAN_LO, PM2,  # [P, C] partial count, mean as hi + lo, M2 (sum of squared dev.)
    C, S, sN, sC, sS,  # channel count, spatial size, strides of X
    nsb, n_units, units_per_prog,  # S-blocks per sample; units in all; units per program
    COMPUTE: tl.constexpr, INT64: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    FLAT: tl.constexpr = False,  # tiles of whole channels' contiguous positions (see _lanes)
    FLAT_S: tl.constexpr = 1, FLAT_S2: tl.constexpr = 1, FLAT_C: tl.constexpr = 1,
    CPP: tl.constexpr = 1,  # under FLAT: positions per channel, its next power of 2, channel
                            # lanes, channels per program
    PARTS_ROWS: tl.constexpr = False,  # one [3 + 4P, C] tensor (see _partial_blocks)
):
    pid_p = tl.program_id(1)
    PCOUNT, PMEAN, PMEAN_LO, PM2 = _partial_blocks(PCOUNT, PMEAN, PMEAN_LO, PM2,
                                                   tl.num_programs(1), C, PARTS_ROWS)
    c, cmask, owned, pos, pmask, lc = _lanes(C, BLOCK_C, FLAT, FLAT_S, FLAT_C, CPP)
    n_tot, hi, lo, m2 = _shifted_stats(X, pos, pmask, S, sN, sC, sS, nsb, n_units,
                                       pid_p * units_per_prog, units_per_prog,
                                       COMPUTE, INT64, BLOCK_S, BLOCK_C)
    n_tot, hi, lo, m2 = _merge_positions(n_tot, hi, lo, m2, FLAT, FLAT_S, FLAT_S2, FLAT_C)
    out = pid_p * C + c
    tl.store(PCOUNT + out, tl.zeros(c.shape, COMPUTE) + n_tot, mask=owned)
    tl.store(PMEAN + out, hi, mask=owned)
    tl.store(PMEAN_LO + out, lo, mask=owned)
    tl.store(PM2 + out, m2, mask=owned)


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
    tl.store(RMEAN + c, cast_rn(new_rm, rm.dtype), mask=cmask)
    tl.store(RVAR + c, cast_rn(new_rv, rv.dtype), mask=cmask)


@triton.jit
def _partial_rows(PCOUNT, PMEAN, PMEAN_LO, PM2, p, P, C, c, cmask, HAS_LO: tl.constexpr,
                  COMPUTE: tl.constexpr):
    """Partials p of channels c: count, mean hi, mean lo (0 without HAS_LO), M2; 0 where
    masked (a masked lane adds nothing: its count is 0)."""
    m = (p < P)[:, None] & cmask[None, :]
    offs = p[:, None] * C + c[None, :]
    n_i = tl.load(PCOUNT + offs, mask=m, other=0.0).to(COMPUTE)
    hi_i = tl.load(PMEAN + offs, mask=m, other=0.0).to(COMPUTE)
    m2_i = tl.load(PM2 + offs, mask=m, other=0.0).to(COMPUTE)
    if HAS_LO:
        lo_i = tl.load(PMEAN_LO + offs, mask=m, other=0.0).to(COMPUTE)
    else:
        lo_i = tl.zeros(offs.shape, COMPUTE)
    return n_i, hi_i, lo_i, m2_i


@triton.jit
def _merge_partials(PCOUNT, PMEAN, PMEAN_LO, PM2, P, C, c, cmask, HAS_LO: tl.constexpr,
                    COMPUTE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """(count, mean as hi + lo, M2) of channels c from their P partials, in one pass over them.
    About a reference ref (the weighted mean of the first BLOCK_P partials), with d_i = mean_i -
    ref: M2 = sum (M2_i + n_i d_i^2) - n mean_d^2, mean = ref + mean_d (the parallel formula).
    The first rows are part of the data, so n mean_d^2 is at most (P / BLOCK_P) times M2: a
    few bits at worst, never catastrophic (as in ``_shifted_stats``).  Sums are kept per (row,
    channel) lane and reduced once after the loop: a trip is loads and FMAs (a reduction a trip
    costs shuffles and barriers)."""
    p = tl.arange(0, BLOCK_P)
    n_i, hi_i, lo_i, m2_i = _partial_rows(PCOUNT, PMEAN, PMEAN_LO, PM2, p, P, C, c, cmask,
                                          HAS_LO, COMPUTE)
    n_first = tl.sum(n_i, 0)
    ref = tl.sum(n_i * hi_i, 0) / tl.maximum(n_first, 1.0)
    ref = tl.where(ref - ref == 0, ref, 0.0)  # an infinite partial mean: deviations from 0
    # the first rows are summed from the registers that gave ref (no second load)
    d_i = hi_i - ref[None, :] + lo_i
    t_i = n_i * d_i
    acc_n = n_i
    acc_d = t_i
    acc_q = m2_i + t_i * d_i
    for p0 in range(BLOCK_P, P, BLOCK_P):
        n_i, hi_i, lo_i, m2_i = _partial_rows(PCOUNT, PMEAN, PMEAN_LO, PM2, p0 + p, P, C, c,
                                              cmask, HAS_LO, COMPUTE)
        d_i = hi_i - ref[None, :] + lo_i
        t_i = n_i * d_i
        acc_n += n_i
        acc_d += t_i
        acc_q += m2_i + t_i * d_i
    n_tot = tl.sum(acc_n, 0)
    dsum = tl.sum(acc_d, 0)
    mean_d = dsum / tl.maximum(n_tot, 1.0)
    # NaN (inf or NaN input) stays NaN, as torch's variance: a plain maximum would give 0
    m2 = tl.maximum(tl.sum(acc_q, 0) - mean_d * dsum, 0.0, propagate_nan=tl.PropagateNan.ALL)
    # The mean as hi + lo: with |mean| >> std, the rounding of hi alone would move every xhat by
    # up to ulp(mean) * invstd (3e-3 for 1000 + 0.01 * randn in fp32).
    mean_hi, mean_lo = _two_sum(ref, mean_d)
    return n_tot, mean_hi, mean_lo, m2


@jit
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
    n_tot, mean_hi, mean_lo, m2 = _merge_partials(PCOUNT, PMEAN, PMEAN_LO, PM2, P, C, c, cmask,
                                                  HAS_LO, COMPUTE, BLOCK_P, BLOCK_C)
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
                      HAS_B: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr,
                      FLAT: tl.constexpr, FLAT_S: tl.constexpr, FLAT_C: tl.constexpr,
                      CPP: tl.constexpr):
    """The preamble of the elementwise and backward kernels: this program's channels and tile
    columns (``_lanes``), the channels' statistics and affine parameters, the activation's
    scalars."""
    c, cmask, owned, pos, pmask, lc = _lanes(C, BLOCK_C, FLAT, FLAT_S, FLAT_C, CPP)
    eps = from_pair(eps_hi, eps_lo, COMPUTE)
    mean, mean_lo, invstd, w, b = _channel_params(MEAN, MEAN_LO, INVSTD, W, B, c, cmask, eps,
                                                  HAS_LO, FROM_VAR, HAS_W, HAS_B, COMPUTE)
    negative_slope = from_pair(slope_hi, slope_lo, COMPUTE)
    alpha = from_pair(alpha_hi, alpha_lo, COMPUTE)
    return c, cmask, owned, pos, pmask, lc, mean, mean_lo, invstd, w, b, negative_slope, alpha


@triton.jit
def _centered(x, mean, mean_lo, HAS_LO: tl.constexpr):
    # x - hi is exact when x is near the mean; lo then corrects what hi rounded away
    xc = x - mean[None, :]
    if HAS_LO:
        xc = xc - mean_lo[None, :]
    return xc


@triton.jit
def _normalize_units(X, Y, pos, pmask, mean, scale, shift, negative_slope, alpha,
                     S, sxN, sxC, sxS, syN, syC, syS, nsb, n_units, u0, units,
                     ACTIVATION: tl.constexpr, COMPUTE: tl.constexpr,
                     INT64: tl.constexpr, BLOCK_S: tl.constexpr, R=None,
                     HAS_R: tl.constexpr = False):
    """y = act((x - mean) * scale + shift [+ r]) over the units [u0, u0 + units), per tile
    column (``_lanes``' pos); the residual R (HAS_R) has x's strides."""
    lanes_s = tl.arange(0, BLOCK_S)
    for i in range(0, units):
        n, s, smask = _unit(u0 + i, nsb, lanes_s, S, n_units, INT64, BLOCK_S)
        mask = smask[:, None] & pmask[None, :]
        xo = _offsets(n, s, pos, sxN, sxS, sxC)
        yo = _offsets(n, s, pos, syN, syS, syC)
        x = tl.load(X + xo, mask=mask, other=0.0).to(COMPUTE)
        z = (x - mean[None, :]) * scale[None, :] + shift[None, :]
        if HAS_R:
            z += tl.load(R + xo, mask=mask, other=0.0).to(COMPUTE)
        y = activate(z, ACTIVATION, negative_slope, alpha)
        tl.store(Y + yo, cast_rn(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _scale_shift(mean_lo, invstd, w, b, HAS_LO: tl.constexpr):
    """Per channel: scale = invstd * w and shift = b - mean_lo * scale, so that y = (x - hi) *
    scale + shift (x - hi is exact near the mean; lo, a few ulps of hi, enters through shift)."""
    scale = invstd * w
    shift = b
    if HAS_LO:  # 0 * an infinite scale (zero variance, eps = 0) stays out
        shift = b - tl.where(mean_lo == 0, 0.0, mean_lo * scale)
    return scale, shift


@jit
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
    FLAT: tl.constexpr = False,  # tiles of whole channels' contiguous positions (see _lanes)
    FLAT_S: tl.constexpr = 1, FLAT_S2: tl.constexpr = 1, FLAT_C: tl.constexpr = 1,
    CPP: tl.constexpr = 1,  # under FLAT: positions per channel, its next power of 2, channel
                            # lanes, channels per program
):
    c, cmask, owned, pos, pmask, lc, mean, mean_lo, invstd, w, b, negative_slope, alpha = \
        _program_channels(MEAN, MEAN_LO, INVSTD, W, B, C, eps_hi, eps_lo, slope_hi, slope_lo,
                          alpha_hi, alpha_lo, HAS_LO, FROM_VAR, HAS_W, HAS_B, COMPUTE, BLOCK_C,
                          FLAT, FLAT_S, FLAT_C, CPP)
    scale, shift = _scale_shift(mean_lo, invstd, w, b, HAS_LO)
    _normalize_units(X, Y, pos, pmask, _at_pos(mean, lc, FLAT), _at_pos(scale, lc, FLAT),
                     _at_pos(shift, lc, FLAT), negative_slope, alpha,
                     S, sxN, sxC, sxS, syN, syC, syS, nsb, n_units,
                     tl.program_id(1) * units_per_prog, units_per_prog,
                     ACTIVATION, COMPUTE, INT64, BLOCK_S, R, HAS_R)


@triton.jit
def _finish_stats(MEAN, MEAN_LO, INVSTD, RMEAN, RVAR, NBT, c, smask, n_tot, mean, mean_lo, m2,
                  eps_hi, eps_lo, mom_hi, mom_lo, UPDATE: tl.constexpr, CUMULATIVE: tl.constexpr,
                  COMPUTE: tl.constexpr):
    """invstd from (count, M2); the statistics stored and the running stats updated where smask."""
    invstd = _inv_sqrt(m2 / tl.maximum(n_tot, 1.0) + from_pair(eps_hi, eps_lo, COMPUTE), COMPUTE)
    tl.store(MEAN + c, mean, mask=smask)
    tl.store(MEAN_LO + c, mean_lo, mask=smask)
    tl.store(INVSTD + c, invstd, mask=smask)
    if UPDATE:
        _update_running(RMEAN, RVAR, NBT, c, smask, n_tot, mean + mean_lo, m2, mom_hi, mom_lo,
                        CUMULATIVE, COMPUTE)
    return invstd


@triton.jit
def _stat_rows(MEAN, MEAN_LO, INVSTD, C, STATS_ROWS: tl.constexpr):
    """The statistics' three pointers: separate [C] tensors, or (STATS_ROWS) the rows of one
    [3, C] tensor (a program allocates one tensor and makes no views: host time)."""
    if STATS_ROWS:
        return MEAN, MEAN + C, MEAN + 2 * C
    return MEAN, MEAN_LO, INVSTD


@triton.jit
def _count_batch(NBT, COUNT: tl.constexpr):
    """num_batches_tracked += 1 in program (0, 0) when COUNT: a module's training call counts
    its batch in the kernel rather than with an add_ launch of its own (the kernels never read
    NBT then: with momentum=None, CUMULATIVE, the caller counts before the launch)."""
    if COUNT:
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            tl.store(NBT, tl.load(NBT) + 1)


@triton.jit
def _affine_normalize(X, Y, W, B, c, cmask, pos, pmask, lc, mean, mean_lo, invstd, slope_hi,
                      slope_lo, alpha_hi, alpha_lo, S, sxN, sxC, sxS, syN, syC, syS, nsb,
                      n_units, u0, units, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                      ACTIVATION: tl.constexpr, COMPUTE: tl.constexpr, INT64: tl.constexpr,
                      BLOCK_S: tl.constexpr, FLAT: tl.constexpr, R=None,
                      HAS_R: tl.constexpr = False):
    """y over units [u0, u0 + units) from the batch statistics of channels c and the affine
    parameters (and the residual R when HAS_R)."""
    if HAS_W:
        w = tl.load(W + c, mask=cmask, other=0.0).to(COMPUTE)
    else:
        w = tl.full(c.shape, 1.0, COMPUTE)
    if HAS_B:
        b = tl.load(B + c, mask=cmask, other=0.0).to(COMPUTE)
    else:
        b = tl.zeros(c.shape, COMPUTE)
    scale, shift = _scale_shift(mean_lo, invstd, w, b, True)
    _normalize_units(X, Y, pos, pmask, _at_pos(mean, lc, FLAT), _at_pos(scale, lc, FLAT),
                     _at_pos(shift, lc, FLAT),
                     from_pair(slope_hi, slope_lo, COMPUTE), from_pair(alpha_hi, alpha_lo, COMPUTE),
                     S, sxN, sxC, sxS, syN, syC, syS, nsb, n_units, u0, units,
                     ACTIVATION, COMPUTE, INT64, BLOCK_S, R, HAS_R)


@jit
def _fused_forward_kernel(
    X, Y,  # [N, C, S] through their strides
    MEAN, MEAN_LO, INVSTD,  # [C] outputs: the batch mean as hi + lo, 1 / sqrt(biased var + eps)
    W, B,  # [C] affine weight and bias (dummies when HAS_W / HAS_B is False)
    RMEAN, RVAR, NBT,  # running stats, updated in place when UPDATE; NBT: CUMULATIVE, COUNT
    C, S, sxN, sxC, sxS, syN, syC, syS,
    nsb, n_units,
    eps_hi, eps_lo, mom_hi, mom_lo, slope_hi, slope_lo, alpha_hi, alpha_lo,  # fp32 pairs
    UPDATE: tl.constexpr, CUMULATIVE: tl.constexpr, WRITE_Y: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACTIVATION: tl.constexpr,
    COMPUTE: tl.constexpr, INT64: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    R=None,  # residual [N, C, S] with X's strides, added before the activation when HAS_R
    HAS_R: tl.constexpr = False,
    FLAT: tl.constexpr = False,  # tiles of whole channels' contiguous positions (see _lanes)
    FLAT_S: tl.constexpr = 1, FLAT_S2: tl.constexpr = 1, FLAT_C: tl.constexpr = 1,
    CPP: tl.constexpr = 1,  # under FLAT: positions per channel, its next power of 2, channel
                            # lanes, channels per program
    COUNT: tl.constexpr = False,  # NBT += 1 (see _count_batch)
    STATS_ROWS: tl.constexpr = False,  # MEAN is [3, C]: MEAN_LO and INVSTD are its rows 1, 2
):
    """Training forward in one launch for layers whose channel blocks span few units: each
    program reduces its channels over the whole batch, writes the statistics, updates the running
    stats and (WRITE_Y) normalizes, re-reading x while it is still in cache."""
    _count_batch(NBT, COUNT)
    MEAN, MEAN_LO, INVSTD = _stat_rows(MEAN, MEAN_LO, INVSTD, C, STATS_ROWS)
    c, cmask, owned, pos, pmask, lc = _lanes(C, BLOCK_C, FLAT, FLAT_S, FLAT_C, CPP)
    u0 = tl.program_id(1) * n_units  # 0 (a one-column grid), as a tensor _unit can widen
    n_tot, mean, mean_lo, m2 = _shifted_stats(X, pos, pmask, S, sxN, sxC, sxS, nsb, n_units,
                                              u0, n_units, COMPUTE, INT64, BLOCK_S, BLOCK_C)
    n_tot, mean, mean_lo, m2 = _merge_positions(n_tot, mean, mean_lo, m2, FLAT, FLAT_S, FLAT_S2,
                                                FLAT_C)
    invstd = _finish_stats(MEAN, MEAN_LO, INVSTD, RMEAN, RVAR, NBT, c, owned, n_tot, mean,
                           mean_lo, m2, eps_hi, eps_lo, mom_hi, mom_lo, UPDATE, CUMULATIVE,
                           COMPUTE)
    if WRITE_Y:
        _affine_normalize(X, Y, W, B, c, cmask, pos, pmask, lc, mean, mean_lo, invstd, slope_hi,
                          slope_lo, alpha_hi, alpha_lo, S, sxN, sxC, sxS, syN, syC, syS, nsb,
                          n_units, u0, n_units, HAS_W, HAS_B, ACTIVATION, COMPUTE, INT64,
                          BLOCK_S, FLAT, R, HAS_R)


@jit
def _merge_normalize_kernel(
    X, Y,  # [N, C, S] through their strides
    PCOUNT, PMEAN, PMEAN_LO, PM2,  # [P, C] partials of _stats_partial_kernel
    MEAN, MEAN_LO, INVSTD,  # [C] outputs: the batch mean as hi + lo, 1 / sqrt(biased var + eps)
    W, B,  # [C] affine weight and bias (dummies when HAS_W / HAS_B is False)
    RMEAN, RVAR, NBT,  # running stats, updated in place when UPDATE; NBT: CUMULATIVE, COUNT
    P, C, S, sxN, sxC, sxS, syN, syC, syS,
    nsb, n_units, units_per_prog,
    eps_hi, eps_lo, mom_hi, mom_lo, slope_hi, slope_lo, alpha_hi, alpha_lo,  # fp32 pairs
    UPDATE: tl.constexpr, CUMULATIVE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ACTIVATION: tl.constexpr, COMPUTE: tl.constexpr, INT64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    R=None,  # residual [N, C, S] with X's strides, added before the activation when HAS_R
    HAS_R: tl.constexpr = False,
    FLAT: tl.constexpr = False,  # tiles of whole channels' contiguous positions (see _lanes)
    FLAT_S: tl.constexpr = 1, FLAT_S2: tl.constexpr = 1, FLAT_C: tl.constexpr = 1,
    CPP: tl.constexpr = 1,  # under FLAT: positions per channel, its next power of 2, channel
                            # lanes, channels per program
    COUNT: tl.constexpr = False,  # NBT += 1 (see _count_batch)
    STATS_ROWS: tl.constexpr = False,  # MEAN is [3, C]: MEAN_LO and INVSTD are its rows 1, 2
    PARTS_ROWS: tl.constexpr = False,  # one [3 + 4P, C] tensor (see _partial_blocks)
):
    """The split training forward's second launch: every program merges its channels' P
    partials itself (P small rows from L2, instead of a combine launch), the first program along
    the units writes the statistics and updates the running stats, and all normalize."""
    _count_batch(NBT, COUNT)
    MEAN, MEAN_LO, INVSTD = _stat_rows(MEAN, MEAN_LO, INVSTD, C, STATS_ROWS)
    PCOUNT, PMEAN, PMEAN_LO, PM2 = _partial_blocks(PCOUNT, PMEAN, PMEAN_LO, PM2, P, C,
                                                   PARTS_ROWS)
    c, cmask, owned, pos, pmask, lc = _lanes(C, BLOCK_C, FLAT, FLAT_S, FLAT_C, CPP)
    n_tot, mean, mean_lo, m2 = _merge_partials(PCOUNT, PMEAN, PMEAN_LO, PM2, P, C, c, cmask,
                                               True, COMPUTE, BLOCK_P, c.shape[0])
    # once per channel: the first program along the units (bool & scalar mistypes)
    first = owned & (c < tl.where(tl.program_id(1) == 0, C, 0))
    invstd = _finish_stats(MEAN, MEAN_LO, INVSTD, RMEAN, RVAR, NBT, c, first, n_tot, mean,
                           mean_lo, m2, eps_hi, eps_lo, mom_hi, mom_lo, UPDATE, CUMULATIVE,
                           COMPUTE)
    _affine_normalize(X, Y, W, B, c, cmask, pos, pmask, lc, mean, mean_lo, invstd, slope_hi,
                      slope_lo, alpha_hi, alpha_lo, S, sxN, sxC, sxS, syN, syC, syS, nsb, n_units,
                      tl.program_id(1) * units_per_prog, units_per_prog, HAS_W, HAS_B,
                      ACTIVATION, COMPUTE, INT64, BLOCK_S, FLAT, R, HAS_R)


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
def _dx_units(X, DY, DX, pos, pmask, mean, mean_lo, invstd, w, b, mean_g, mean_gx,
              negative_slope, alpha, S, sxN, sxC, sxS, sdN, sdC, sdS, soN, soC, soS,
              nsb, n_units, u0, units, TRAINING: tl.constexpr, HAS_LO: tl.constexpr,
              ACTIVATION: tl.constexpr, COMPUTE: tl.constexpr, INT64: tl.constexpr,
              BLOCK_S: tl.constexpr, R=None, DR=None, HAS_R: tl.constexpr = False,
              WRITE_DR: tl.constexpr = False):
    """dx over the units [u0, u0 + units), per tile column (every parameter given per column):
    w * invstd * (g - mean_g - xhat * mean_gx) in training (mean_g, mean_gx: the batch means of
    g and g * xhat), w * invstd * g in eval.  With a residual R (x's strides), g rebuilds z + r;
    WRITE_DR stores g, its gradient, to DR."""
    lanes_s = tl.arange(0, BLOCK_S)
    scale = invstd * w
    for i in range(0, units):
        n, s, smask = _unit(u0 + i, nsb, lanes_s, S, n_units, INT64, BLOCK_S)
        mask = smask[:, None] & pmask[None, :]
        xo = _offsets(n, s, pos, sxN, sxS, sxC)
        x = tl.load(X + xo, mask=mask, other=0.0).to(COMPUTE)
        dy = tl.load(DY + _offsets(n, s, pos, sdN, sdS, sdC), mask=mask, other=0.0).to(COMPUTE)
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
        tl.store(DX + _offsets(n, s, pos, soN, soS, soC), cast_rn(dx, DX.dtype.element_ty),
                 mask=mask)


@triton.jit
def _grad_params_at_pos(mean, mean_lo, invstd, w, b, lc, HAS_LO: tl.constexpr,
                        ACTIVATION: tl.constexpr, FLAT: tl.constexpr):
    """The backward's per-channel parameters at the tile columns (only those it reads)."""
    mean = _at_pos(mean, lc, FLAT)
    if HAS_LO:
        mean_lo = _at_pos(mean_lo, lc, FLAT)
    else:
        mean_lo = mean
    invstd = _at_pos(invstd, lc, FLAT)
    if ACTIVATION == "identity":
        w = _at_pos(w, lc, FLAT)
        b = w
    else:
        w = _at_pos(w, lc, FLAT)
        b = _at_pos(b, lc, FLAT)
    return mean, mean_lo, invstd, w, b


@triton.jit
def _reduce_tile(x, dy, xo, mask, n, s, pos, DX, DR, R, mean, mean_lo, invstd, w, b, scale,
                 negative_slope, alpha, soN, soS, soC, EVAL_DX: tl.constexpr,
                 HAS_LO: tl.constexpr, ACTIVATION: tl.constexpr, COMPUTE: tl.constexpr,
                 HAS_R: tl.constexpr):
    """One tile of the backward reduction: (g, g * xhat) masked, with dr (HAS_R) and the eval
    dx (EVAL_DX) stored."""
    r = 0.0
    if HAS_R:
        r = tl.load(R + xo, mask=mask, other=0.0).to(COMPUTE)
    xhat, g = _grad_pre_activation(x, dy, mean, mean_lo, invstd, w, b, negative_slope, alpha,
                                   HAS_LO, ACTIVATION, r)
    if HAS_R:  # the first pass over each element writes the residual's gradient
        tl.store(DR + xo, g.to(DR.dtype.element_ty), mask=mask)
    g = tl.where(mask, g, 0.0)
    if EVAL_DX:
        dx = g * scale[None, :]
        tl.store(DX + _offsets(n, s, pos, soN, soS, soC), cast_rn(dx, DX.dtype.element_ty),
                 mask=mask)
    return g, g * xhat


@jit
def _backward_reduce_kernel(
    X, DY, DX,  # [N, C, S] through their strides; DX written with EVAL_DX or TRAIN_DX
    MEAN, MEAN_LO, INVSTD, W, B,  # [C] saved statistics (MEAN_LO when HAS_LO) and affine parameters
    PSUM_G, PSUM_GX,  # [P, C] partial sums of g and g * xhat (the sums when P == 1)
    C, S, sxN, sxC, sxS, sdN, sdC, sdS, soN, soC, soS,
    nsb, n_units, units_per_prog,
    inv_n_hi, inv_n_lo,  # 1 / count as an fp32 pair (hi + lo), used with TRAIN_DX
    slope_hi, slope_lo, alpha_hi, alpha_lo,  # leaky_relu slope, elu alpha: fp32 pairs
    eps_hi, eps_lo,  # eps as an fp32 pair, used with FROM_VAR (INVSTD then holds the variance)
    EVAL_DX: tl.constexpr,  # write the eval dx (it needs no sums) in the same pass
    TRAIN_DX: tl.constexpr,  # write the training dx in a second pass (one program per channel)
    HAS_LO: tl.constexpr, FROM_VAR: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ACTIVATION: tl.constexpr,
    COMPUTE: tl.constexpr, INT64: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    R=None, DR=None,  # residual and its gradient (= g), [N, C, S] with X's strides, when HAS_R
    HAS_R: tl.constexpr = False,
    FLAT: tl.constexpr = False,  # tiles of whole channels' contiguous positions (see _lanes)
    FLAT_S: tl.constexpr = 1, FLAT_S2: tl.constexpr = 1, FLAT_C: tl.constexpr = 1,
    CPP: tl.constexpr = 1,  # under FLAT: positions per channel, its next power of 2, channel
                            # lanes, channels per program
    STATS_ROWS: tl.constexpr = False,  # MEAN is [3, C]: MEAN_LO and INVSTD are its rows 1, 2
    SUMS_ROWS: tl.constexpr = False,  # PSUM_G is [3 + 2P, C] or taller: the two [P, C]
                                      # blocks after 3 rows (the statistics' forward tensor)
):
    """Sums of g = dy * act'(z) and g * xhat over this program's units.  EVAL_DX (dx needs no
    sums) writes dx in the same pass; TRAIN_DX (one program per channel block, so the sums are
    whole) writes dx in a second pass, x and dy still in cache."""
    MEAN, MEAN_LO, INVSTD = _stat_rows(MEAN, MEAN_LO, INVSTD, C, STATS_ROWS)
    if SUMS_ROWS:
        PSUM_G += 3 * C
        PSUM_GX = PSUM_G + tl.num_programs(1) * C
    c, cmask, owned, pos, pmask, lc, mean_c, mean_lo_c, invstd_c, w_c, b_c, negative_slope, alpha = \
        _program_channels(MEAN, MEAN_LO, INVSTD, W, B, C, eps_hi, eps_lo, slope_hi, slope_lo,
                          alpha_hi, alpha_lo, HAS_LO, FROM_VAR, HAS_W, HAS_B, COMPUTE, BLOCK_C,
                          FLAT, FLAT_S, FLAT_C, CPP)
    mean, mean_lo, invstd, w, b = _grad_params_at_pos(mean_c, mean_lo_c, invstd_c, w_c, b_c, lc,
                                                      HAS_LO, ACTIVATION, FLAT)
    pid_p = tl.program_id(1)
    lanes_s = tl.arange(0, BLOCK_S)
    scale = invstd * w
    # per-lane sums, reduced across lanes once at the end (no reductions inside the loop)
    acc_g = tl.zeros([BLOCK_S, BLOCK_C], COMPUTE)
    acc_gx = tl.zeros([BLOCK_S, BLOCK_C], COMPUTE)
    u0 = pid_p * units_per_prog
    end = tl.minimum(u0 + units_per_prog, n_units)
    # two tiles a trip: all four loads issued before the math (twice the bytes in flight)
    for i in range(0, units_per_prog, 2):
        n, s, smask = _unit(u0 + i, nsb, lanes_s, S, end, INT64, BLOCK_S)
        n_b, s_b, smask_b = _unit(u0 + i + 1, nsb, lanes_s, S, end, INT64, BLOCK_S)
        mask = smask[:, None] & pmask[None, :]
        mask_b = smask_b[:, None] & pmask[None, :]
        xo = _offsets(n, s, pos, sxN, sxS, sxC)
        xo_b = _offsets(n_b, s_b, pos, sxN, sxS, sxC)
        x = tl.load(X + xo, mask=mask, other=0.0).to(COMPUTE)
        x_b = tl.load(X + xo_b, mask=mask_b, other=0.0).to(COMPUTE)
        dy = tl.load(DY + _offsets(n, s, pos, sdN, sdS, sdC), mask=mask, other=0.0).to(COMPUTE)
        dy_b = tl.load(DY + _offsets(n_b, s_b, pos, sdN, sdS, sdC), mask=mask_b,
                       other=0.0).to(COMPUTE)
        g, gx = _reduce_tile(x, dy, xo, mask, n, s, pos, DX, DR, R, mean, mean_lo, invstd, w, b,
                             scale, negative_slope, alpha, soN, soS, soC, EVAL_DX, HAS_LO,
                             ACTIVATION, COMPUTE, HAS_R)
        g_b, gx_b = _reduce_tile(x_b, dy_b, xo_b, mask_b, n_b, s_b, pos, DX, DR, R, mean,
                                 mean_lo, invstd, w, b, scale, negative_slope, alpha, soN, soS,
                                 soC, EVAL_DX, HAS_LO, ACTIVATION, COMPUTE, HAS_R)
        acc_g += g + g_b
        acc_gx += gx + gx_b
    sum_g = _channel_sums(tl.sum(acc_g, 0), FLAT, FLAT_S, FLAT_S2, FLAT_C)
    sum_gx = _channel_sums(tl.sum(acc_gx, 0), FLAT, FLAT_S, FLAT_S2, FLAT_C)
    out = pid_p * C + c
    tl.store(PSUM_G + out, sum_g, mask=owned)
    tl.store(PSUM_GX + out, sum_gx, mask=owned)
    if TRAIN_DX:
        inv_n = from_pair(inv_n_hi, inv_n_lo, COMPUTE)
        _dx_units(X, DY, DX, pos, pmask, mean, mean_lo, invstd, w, b,
                  _at_pos(sum_g * inv_n, lc, FLAT), _at_pos(sum_gx * inv_n, lc, FLAT),
                  negative_slope, alpha, S, sxN, sxC, sxS, sdN, sdC, sdS, soN, soC, soS,
                  nsb, n_units, u0, units_per_prog, True, HAS_LO, ACTIVATION, COMPUTE, INT64,
                  BLOCK_S, R, DR, HAS_R, False)


@jit
def _dx_kernel(
    X, DY, DX,  # [N, C, S] through their strides
    MEAN, MEAN_LO, INVSTD, W, B,  # [C] saved statistics (MEAN_LO when HAS_LO) and affine parameters
    SUM_G, SUM_GX,  # [P, C] partial sums of g and g * xhat over the (global) batch; eval: unused
    SUMS,  # [2, C] output when WRITE_SUMS: the partials' totals (sum g, sum g * xhat)
    # (SUMS_ROWS: SUM_G's tensor holds both partial blocks, SUMS is [C] for sum g and the
    # SUM_GX argument [C] for sum g * xhat: a program's dbias and dweight, no views)
    n_rows,  # rows of SUM_G / SUM_GX, summed here in order (deterministic)
    C, S, sxN, sxC, sxS, sdN, sdC, sdS, soN, soC, soS,
    nsb, n_units, units_per_prog,
    inv_n_hi, inv_n_lo,  # 1 / count as an fp32 pair (hi + lo)
    slope_hi, slope_lo, alpha_hi, alpha_lo,  # leaky_relu slope, elu alpha: fp32 pairs
    eps_hi, eps_lo,  # eps as an fp32 pair, used with FROM_VAR (INVSTD then holds the variance)
    TRAINING: tl.constexpr, HAS_LO: tl.constexpr, FROM_VAR: tl.constexpr, HAS_W: tl.constexpr,
    HAS_B: tl.constexpr, WRITE_SUMS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    COMPUTE: tl.constexpr, INT64: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    R=None, DR=None,  # residual and its gradient, [N, C, S] with X's strides, when HAS_R
    HAS_R: tl.constexpr = False,
    WRITE_DR: tl.constexpr = False,  # store g to DR (when no reduction pass wrote it)
    FLAT: tl.constexpr = False,  # tiles of whole channels' contiguous positions (see _lanes)
    FLAT_S: tl.constexpr = 1, FLAT_S2: tl.constexpr = 1, FLAT_C: tl.constexpr = 1,
    CPP: tl.constexpr = 1,  # under FLAT: positions per channel, its next power of 2, channel
                            # lanes, channels per program
    STATS_ROWS: tl.constexpr = False,  # MEAN is [3, C]: MEAN_LO and INVSTD are its rows 1, 2
    SUMS_ROWS: tl.constexpr = False,  # SUM_G is [3 + 2 n_rows, C] or taller: the two blocks
                                      # after 3 rows (see _backward_reduce_kernel)
    BLOCK_P: tl.constexpr = 16,  # partial rows a trip of the training sums
):
    MEAN, MEAN_LO, INVSTD = _stat_rows(MEAN, MEAN_LO, INVSTD, C, STATS_ROWS)
    if SUMS_ROWS:
        OUT_GX = SUM_GX
        SUM_G += 3 * C
        SUM_GX = SUM_G + n_rows * C
    else:
        OUT_GX = SUMS + C
    c, cmask, owned, pos, pmask, lc, mean_c, mean_lo_c, invstd_c, w_c, b_c, negative_slope, alpha = \
        _program_channels(MEAN, MEAN_LO, INVSTD, W, B, C, eps_hi, eps_lo, slope_hi, slope_lo,
                          alpha_hi, alpha_lo, HAS_LO, FROM_VAR, HAS_W, HAS_B, COMPUTE, BLOCK_C,
                          FLAT, FLAT_S, FLAT_C, CPP)
    if TRAINING:
        # the partials' totals: P small rows from L2, so no separate reduction launch; BLOCK_P
        # rows a trip spread over all threads, per-lane sums reduced once after the loop (a row
        # a trip had every thread load its channels' values of every row)
        rows = tl.arange(0, BLOCK_P)
        acc_g = tl.zeros([BLOCK_P, c.shape[0]], COMPUTE)
        acc_gx = tl.zeros([BLOCK_P, c.shape[0]], COMPUTE)
        for p0 in range(0, n_rows, BLOCK_P):
            p = p0 + rows
            m = (p < n_rows)[:, None] & cmask[None, :]
            offs = p[:, None] * C + c[None, :]
            acc_g += tl.load(SUM_G + offs, mask=m, other=0.0).to(COMPUTE)
            acc_gx += tl.load(SUM_GX + offs, mask=m, other=0.0).to(COMPUTE)
        sum_g = tl.sum(acc_g, 0)
        sum_gx = tl.sum(acc_gx, 0)
        if WRITE_SUMS:  # once per channel: by the first program along the units
            first = owned & (c < tl.where(tl.program_id(1) == 0, C, 0))  # (bool & scalar mistypes)
            tl.store(SUMS + c, sum_g, mask=first)
            tl.store(OUT_GX + c, sum_gx, mask=first)
        inv_n = from_pair(inv_n_hi, inv_n_lo, COMPUTE)
        mean_g = _at_pos(sum_g * inv_n, lc, FLAT)
        mean_gx = _at_pos(sum_gx * inv_n, lc, FLAT)
    else:
        mean_g = pos  # unused
        mean_gx = pos
    mean, mean_lo, invstd, w, b = _grad_params_at_pos(mean_c, mean_lo_c, invstd_c, w_c, b_c, lc,
                                                      HAS_LO, ACTIVATION, FLAT)
    _dx_units(X, DY, DX, pos, pmask, mean, mean_lo, invstd, w, b, mean_g, mean_gx,
              negative_slope, alpha, S, sxN, sxC, sxS, sdN, sdC, sdS, soN, soC, soS,
              nsb, n_units, tl.program_id(1) * units_per_prog, units_per_prog, TRAINING, HAS_LO,
              ACTIVATION, COMPUTE, INT64, BLOCK_S, R, DR, HAS_R, WRITE_DR)
