"""BatchNorm's host launchers: each allocates its outputs and starts one kernel of
``kernels.py`` with the plan of ``launch_plan.py``.  Also the building blocks SyncBatchNorm calls around
torch.distributed's collectives (``bn_partial_stats``, ``bn_combine_stats``, ``bn_normalize``,
``bn_backward_reduce``, ``bn_backward_dx``; see the package docstring)."""

from __future__ import annotations

import functools

import torch

from ... import _runtime as rt
from ..._launch import Site
from .._op import PlanCache, cdiv, f32_pairs, next_pow2
from . import kernels as K
from .launch_plan import (DX_PARTIAL_BYTES, PARTIAL_BYTES, _like, _prepare_input, flat_args,
                          launch_args, plan)

# Partial rows a trip of the merge (``kernels._merge_partials``): with 128 channels and 4 warps,
# 16 rows keep its four [rows, channels] sums and loads at 64 registers a thread (32: 252 in
# all, 1 CTA per SM, predicted).
MERGE_BLOCK_P = 16

# Launch sites by (launcher, plan, dtype, flags, scalars): every argument of a launch but its
# tensors follows from those, so a repeated layer's launch costs the tensors and one lookup
# (tkern._launch.Site).  Keys hold the Plan itself (its view compares by identity), never an id.
_SITES = PlanCache(None)


def _site(key, build) -> Site:
    site = _SITES.plans.get(key)
    if site is None:
        site = build()
        _SITES.put(key, site)
    return site


# Every launcher normalises the internal tensors it is given (x through _prepare_input,
# statistics and parameters to dense rows) or checks them (in-place outputs), so a strided or
# expanded view -- a gathered count broadcast over C, a row of a stacked buffer -- is never read
# as if it were dense.


def _dense(t, shape, name):
    """``t`` (None, or a tensor of ``shape`` elements) as the kernels index it: dense rows, a copy
    when strided or expanded; RuntimeError for a wrong shape."""
    if t is None:
        return None
    if t.shape != shape:
        if len(shape) != 1 or t.numel() != shape[0]:
            raise RuntimeError(f"tkern.batch_norm: {name} must have shape {tuple(shape)}, "
                               f"got {tuple(t.shape)}")
        t = t.reshape(-1)
    return t if t.is_contiguous() else t.contiguous()


def _in_place(t, C, name):
    """A [C] tensor the kernels update in place: a copy would drop the update, so check it."""
    if t is not None and (t.shape != (C,) or not t.is_contiguous()):
        raise RuntimeError(f"tkern.batch_norm: {name} must be a contiguous [{C}] tensor, got "
                           f"shape {tuple(t.shape)} and strides {t.stride()}")
    return t


def _activation_scalars(negative_slope, alpha) -> dict:
    """The activation's float parameters as fp32 pairs (exact for fp64 inputs, like eps)."""
    slope_hi, slope_lo, alpha_hi, alpha_lo = f32_pairs(negative_slope, alpha)
    return dict(slope_hi=slope_hi, slope_lo=slope_lo, alpha_hi=alpha_hi, alpha_lo=alpha_lo)


def bn_partial_stats(x: torch.Tensor):
    """Per-split partial statistics of a local batch (x prepared): (count, mean, m2, mean_lo),
    each [P, C] in the accumulation dtype (fp32, fp64 for fp64); the mean of a partial is
    mean + mean_lo.  An empty x gives one partial of count 0."""
    acc = rt.accum_dtype(x.dtype)
    if x.numel() == 0:  # an empty local batch (a SyncBatchNorm rank) contributes count 0
        return torch.zeros((4, 1, x.shape[1]), dtype=acc, device=x.device).unbind(0)
    x = _prepare_input(x)
    p = plan(x, reduction=True)
    view = p.view
    P, C = p.num_partials, view.C
    count, mean, m2, mean_lo = torch.empty((4, P, C), dtype=acc, device=x.device).unbind(0)
    _site(("partial_stats", p, x.dtype), lambda: partial_stats_site(p, x))(
        x, count, mean, mean_lo, m2)
    return count, mean, m2, mean_lo


def partial_stats_site(p, x, rows=False) -> Site:
    """``_stats_partial_kernel`` on plan ``p``: tensors (x, count, mean, mean_lo, m2); ``rows``:
    count is one [3 + 4P, C] tensor holding all four after 3 rows (blocks count, mean, m2,
    mean_lo; the rows are the statistics', see ``merge_normalize_site``)."""
    view = p.view
    return Site(K._stats_partial_kernel, p.grid, (view.C, view.cols, *view.strides(x)),
                COMPUTE=rt.compute_dtype(x.dtype), INT64=view.int64(), **launch_args(p),
                **_set(PARTS_ROWS=rows))


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
    count, mean, m2, mean_lo = (_dense(t, (P, C), name) for t, name in (
        (count, "count"), (mean, "mean"), (m2, "m2"), (mean_lo, "mean_lo")))
    if not local:
        running_mean = _in_place(running_mean, C, "running_mean")
        running_var = _in_place(running_var, C, "running_var")
    acc = mean.dtype
    dev = mean.device
    compute = rt.compute_dtype(acc)
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
    block_p = min(next_pow2(P), MERGE_BLOCK_P)
    block_c = min(next_pow2(C), 128)
    eps_hi, eps_lo, mom_hi, mom_lo = f32_pairs(eps, 0.0 if momentum is None else momentum)
    K._stats_combine_kernel[(cdiv(C, block_c),)](
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
    shape = (x.shape[1],)
    mean = _dense(mean, shape, "mean")
    mean_lo = _dense(mean_lo, shape, "mean_lo")
    invstd = _dense(invstd, shape, "invstd")
    weight = _dense(weight, shape, "weight")
    bias = _dense(bias, shape, "bias")
    var = _dense(var, shape, "var")
    flags = _stat_flags(mean_lo is not None, from_var, weight is not None, bias is not None, eps)
    ptrs = (mean, mean_lo if mean_lo is not None else mean, var if from_var else invstd,
            weight if weight is not None else mean, bias if bias is not None else mean)
    return ptrs, flags


@functools.lru_cache(maxsize=256)
def _stat_flags(has_lo, from_var, has_w, has_b, eps) -> tuple:
    """The flags and eps pair of ``_stat_args`` as (name, value) items (hashable: site keys
    include them); the same few combinations repeat every call."""
    eps_hi, eps_lo = f32_pairs(eps)
    return tuple(dict(HAS_LO=has_lo, FROM_VAR=from_var, HAS_W=has_w, HAS_B=has_b,
                      eps_hi=eps_hi, eps_lo=eps_lo).items())


def _residual_args(residual, dr=None) -> dict:
    """Kernel arguments for an optional residual (already in x's layout) and its gradient."""
    if residual is None:
        return {}
    return dict(R=residual, HAS_R=True, **({} if dr is None else dict(DR=dr)))


def _residual_site(residual, dr=None):
    """(named tensors, flags, tensors) of an optional residual and its gradient, for a Site."""
    if residual is None:
        return (), {}, ()
    if dr is None:
        return ("R",), dict(HAS_R=True), (residual,)
    return ("R", "DR"), dict(HAS_R=True), (residual, dr)


def _residual_like(residual, x):
    """The residual in x's (prepared) layout: the kernels read it through x's offsets."""
    if residual is None or residual.stride() == x.stride():
        return residual
    return torch.empty_like(x).copy_(residual)


def bn_normalize(x, mean, invstd, weight, bias, activation="identity", negative_slope=0.01,
                 alpha=1.0, mean_lo=None, var=None, eps=0.0, residual=None):
    """``act((x - mean - mean_lo) * invstd * weight + bias)``; ``activation`` is a kernel name
    (``activations.kernel_name``).  Output in x's dtype and memory format.  Eval passes the
    running stats: ``mean=running_mean, invstd=None, var=running_var, eps=eps``."""
    x = _prepare_input(x)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    p = plan(x, reduction=False)
    view = p.view
    ptrs, flags = _stat_args(x, mean, mean_lo, invstd, weight, bias, var, eps)
    named, rflags, rtensors = _residual_site(residual)
    key = ("normalize", p, x.dtype, activation, negative_slope, alpha, named, *flags)
    site = _site(key, lambda: normalize_site(p, x, y, activation, negative_slope, alpha, named,
                                             flags, rflags))
    site(x, y, *ptrs, *rtensors)
    return y


def normalize_site(p, x, y, activation, negative_slope, alpha, named, flags, rflags) -> Site:
    """``_normalize_kernel`` on plan ``p``: tensors (x, y, the ``_stat_args`` pointers, then
    ``named``)."""
    view = p.view
    return Site(
        K._normalize_kernel, p.grid, (view.C, view.cols, *view.strides(x), *view.strides(y)),
        named, **_activation_scalars(negative_slope, alpha), ACTIVATION=activation,
        COMPUTE=rt.compute_dtype(x.dtype), INT64=view.int64(y), **dict(flags), **launch_args(p),
        **rflags)


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
                   var, eps, eval_dx=False, train_dx=False, count=1, partials=False,
                   residual=None, dr=None):
    """One ``_backward_reduce_kernel`` launch over the reduction plan: (sums [2, C], dx or None);
    ``partials=True``: the unsummed ``[2, P, C]`` workspace instead of the sums.
    ``eval_dx`` adds the eval dx to the pass; ``train_dx`` the training dx (one partial only:
    each program then holds its channels' whole sums; ``count`` is the elements per channel)."""
    x = _prepare_input(x)
    p = plan(x, reduction=True)
    view = p.view
    P, C = p.num_partials, view.C
    assert not train_dx or P == 1, "a training dx in the reduction pass needs whole channels"
    dy = _like(dy, x, view)
    with_dx = eval_dx or train_dx
    dx = torch.empty_like(x) if with_dx else None
    ws = torch.empty((2, P, C), dtype=rt.accum_dtype(x.dtype), device=x.device)
    ptrs, flags = _stat_args(x, mean, mean_lo, invstd, weight, bias, var, eps)
    out = dx if with_dx else x  # a dummy pointer without dx
    named, rflags, rtensors = _residual_site(residual, dr)

    # dy's strides are x's unless _like kept another addressable layout: part of the key
    key = ("backward_reduce", p, x.dtype, dy.stride(), eval_dx, train_dx, count, activation,
           negative_slope, alpha, named, *flags)
    site = _site(key, lambda: backward_reduce_site(
        p, x, dy, out, eval_dx, train_dx, count, activation, negative_slope, alpha, named,
        flags, rflags))
    site(x, dy, out, *ptrs, *ws.unbind(0), *rtensors)
    if partials:
        return ws, dx
    sums = ws[:, 0] if P == 1 else ws.sum(1)  # deterministic combine over the splits
    return sums, dx


def backward_reduce_site(p, x, dy, out, eval_dx, train_dx, count, activation, negative_slope,
                         alpha, named, flags, rflags, rows=False) -> Site:
    """``_backward_reduce_kernel`` on plan ``p``: tensors (x, dy, dx or a dummy, the
    ``_stat_args`` pointers, the two [P, C] partial rows, then ``named``).  ``rows`` (programs):
    the statistics are one [3, C] tensor; split, they are the first 3 rows of the forward's
    [3 + 4P, C] tensor, whose next 2P rows take the partial sums (see ``_set``)."""
    view = p.view
    inv_hi, inv_lo = f32_pairs(1.0 / max(count, 1))
    return Site(
        K._backward_reduce_kernel, p.grid,
        (view.C, view.cols, *view.strides(x), *view.strides(dy), *view.strides(out)), named,
        inv_n_hi=inv_hi, inv_n_lo=inv_lo, **_activation_scalars(negative_slope, alpha),
        EVAL_DX=eval_dx, TRAIN_DX=train_dx, ACTIVATION=activation,
        COMPUTE=rt.compute_dtype(x.dtype), INT64=view.int64(dy, out), **dict(flags),
        **launch_args(p), **rflags, **_set(STATS_ROWS=rows, SUMS_ROWS=rows and not train_dx))


def bn_backward_dx(x, dy, mean, invstd, weight, bias, sum_g=None, sum_gx=None, count=1,
                   activation="identity", negative_slope=0.01, alpha=1.0, training=True,
                   mean_lo=None, var=None, eps=0.0, sums_out=None, residual=None, dr=None,
                   write_dr=False):
    """dx.  Training: from the (global) sums of g and g * xhat and the (global) element count per
    channel (pass sums already divided by the count and ``count=1`` if the count is on a device).
    ``sum_g`` / ``sum_gx`` may be ``[P, C]`` partials: the kernel adds them up, and writes the
    totals into ``sums_out`` ([2, C]) when given.  Eval (``training=False``): ``g * weight *
    invstd``."""
    x = _prepare_input(x)
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return dx
    if training:
        C = x.shape[1]
        rows_shape = (sum_g.shape[0], C) if sum_g.dim() == 2 else (C,)
        sum_g, sum_gx = _dense(sum_g, rows_shape, "sum_g"), _dense(sum_gx, rows_shape, "sum_gx")
        if sums_out is not None:
            _in_place(sums_out.view(-1), 2 * C, "sums_out")
    rows = sum_g.shape[0] if training and sum_g.dim() == 2 else 1
    # every program totals the partial rows itself: with several, the merging plan's longer
    # programs (x bytes at least the rows' bytes they re-read, as the forward's merge)
    p = plan(x, reduction=False, merging=DX_PARTIAL_BYTES if rows > 1 else 0)
    view = p.view
    dy = _like(dy, x, view)
    ptrs, flags = _stat_args(x, mean, mean_lo, invstd, weight, bias, var, eps)
    named, rflags, rtensors = _residual_site(residual, dr)

    key = ("dx", p, x.dtype, dy.stride(), rows, count, training, sums_out is not None,
           write_dr, activation, negative_slope, alpha, named, *flags)
    site = _site(key, lambda: dx_site(p, x, dy, dx, rows, count, training, sums_out is not None,
                                      write_dr, activation, negative_slope, alpha, named, flags,
                                      rflags))
    site(x, dy, dx, *ptrs, sum_g if training else mean, sum_gx if training else mean,
         sums_out if sums_out is not None else mean, *rtensors)
    return dx


def dx_site(p, x, dy, dx, rows, count, training, write_sums, write_dr, activation,
            negative_slope, alpha, named, flags, rflags, one_tensor=False) -> Site:
    """``_dx_kernel`` on plan ``p``: tensors (x, dy, dx, the ``_stat_args`` pointers, sum_g,
    sum_gx, sums_out, then ``named``).  ``one_tensor`` (programs): the statistics are the
    first 3 rows of one tensor whose next 2 x ``rows`` rows hold sum_g and sum_gx (see
    ``backward_reduce_site``), passed as sum_g; the sum_gx and sums_out slots then take the two
    totals' [C] outputs (dweight, dbias)."""
    view = p.view
    inv_hi, inv_lo = f32_pairs(1.0 / max(count, 1))
    return Site(
        K._dx_kernel, p.grid,
        (rows, view.C, view.cols, *view.strides(x), *view.strides(dy), *view.strides(dx)),
        named, inv_n_hi=inv_hi, inv_n_lo=inv_lo,
        **_activation_scalars(negative_slope, alpha), TRAINING=training,
        WRITE_SUMS=write_sums, ACTIVATION=activation,
        COMPUTE=rt.compute_dtype(x.dtype), INT64=view.int64(dy, dx), **dict(flags),
        **launch_args(p), **rflags,
        **_set(WRITE_DR=write_dr, STATS_ROWS=one_tensor, SUMS_ROWS=one_tensor))


def num_partials(x: torch.Tensor) -> int:
    """How many splits per channel the statistics pass uses for ``x`` (1 = one program per
    channel block); exposed for tests and tuning."""
    return plan(_prepare_input(x), reduction=True).num_partials



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
    view = p.view
    C = view.C
    weight, bias = _dense(weight, (C,), "weight"), _dense(bias, (C,), "bias")
    running_mean = _in_place(running_mean, C, "running_mean")
    running_var = _in_place(running_var, C, "running_var")
    stats = torch.empty((3, C), dtype=rt.accum_dtype(x.dtype), device=x.device)
    y = torch.empty_like(x) if write_y else x
    update = running_mean is not None
    cumulative = update and momentum is None
    count = counts_batch(update, momentum, num_batches_tracked)
    named, rflags, rtensors = _residual_site(residual)

    key = ("fused_forward", p, x.dtype, update, cumulative, count, write_y, weight is not None,
           bias is not None, eps, momentum, activation, negative_slope, alpha, named)
    site = _site(key, lambda: fused_forward_site(
        p, x, y, update, cumulative, write_y, weight is not None, bias is not None, eps,
        momentum, activation, negative_slope, alpha, named, rflags, count))
    m, lo, inv = stats.unbind(0)
    site(x, y, m, lo, inv, weight if weight is not None else m, bias if bias is not None else m,
         running_mean if update else m, running_var if update else m,
         num_batches_tracked if cumulative or count else m, *rtensors)
    return (y if write_y else None), stats


def counts_batch(update, momentum, num_batches_tracked) -> bool:
    """Whether the training forward's kernel adds one to ``num_batches_tracked``: given with a
    float momentum (with momentum=None the caller counts first, and the kernels read it)."""
    return update and momentum is not None and num_batches_tracked is not None


def fused_forward_site(p, x, y, update, cumulative, write_y, has_w, has_b, eps, momentum,
                       activation, negative_slope, alpha, named, rflags, count=False,
                       rows=False) -> Site:
    """``_fused_forward_kernel`` on plan ``p``: tensors (x, y, mean, mean_lo, invstd, weight,
    bias, running_mean, running_var, num_batches_tracked, then ``named``; dummies for absent
    ones); ``count``: the kernel adds one to num_batches_tracked; ``rows``: mean is one [3, C]
    tensor holding all three (mean_lo and invstd unused)."""
    view = p.view
    eps_hi, eps_lo, mom_hi, mom_lo = f32_pairs(eps, 0.0 if momentum is None else momentum)
    return Site(
        K._fused_forward_kernel, (p.grid[0],),
        (view.C, view.cols, *view.strides(x), *view.strides(y), p.nsb, p.n_units,
         eps_hi, eps_lo, mom_hi, mom_lo), named,
        **_activation_scalars(negative_slope, alpha),
        UPDATE=update, CUMULATIVE=cumulative, WRITE_Y=write_y, HAS_W=has_w,
        HAS_B=has_b, ACTIVATION=activation, COMPUTE=rt.compute_dtype(x.dtype),
        INT64=view.int64(y), BLOCK_S=p.BLOCK_S, BLOCK_C=p.BLOCK_C,
        num_warps=p.num_warps, **flat_args(p), **rflags, **_set(COUNT=count, STATS_ROWS=rows))


def _set(**flags) -> dict:
    """The flags that are on (launches without them keep their key and their defaults)."""
    return {k: True for k, v in flags.items() if v}


def _stats_impl(x, running_mean, running_var, num_batches_tracked, momentum, eps):
    """Batch statistics [3, C] (mean, mean_lo, invstd); running stats updated in place."""
    x = _prepare_input(x)
    acc = rt.accum_dtype(x.dtype)
    if x.numel() == 0:  # nothing to normalize; running stats stay as they are (as torch)
        if counts_batch(running_mean is not None, momentum, num_batches_tracked):
            num_batches_tracked.add_(1)
        stats = torch.zeros((3, x.shape[1]), dtype=acc, device=x.device)
        stats[2].fill_(1.0)
        return stats
    if plan(x, reduction=True).num_partials == 1:
        return _fused_forward(x, None, None, running_mean, running_var, num_batches_tracked,
                              momentum, eps, write_y=False)[1]
    return bn_combine_stats(*bn_partial_stats(x), eps=eps, running_mean=running_mean,
                            running_var=running_var, momentum=momentum,
                            num_batches_tracked=num_batches_tracked, as_rows=True)


def train_forward(x, weight, bias, running_mean, running_var, num_batches_tracked,
                  momentum, eps, activation, negative_slope, alpha, residual=None):
    """Training forward: (y, batch statistics [3, C]), running stats updated in place.
    One launch when the plan has one partial per channel, else two (partials; merge+normalize).
    ``residual`` (x's shape) is added before the activation."""
    x = _prepare_input(x)
    residual = _residual_like(residual, x)
    if x.numel() == 0:
        stats = _stats_impl(x, running_mean, running_var, num_batches_tracked, momentum, eps)
        return torch.empty_like(x), stats
    if plan(x, reduction=True).num_partials == 1:
        return _fused_forward(x, weight, bias, running_mean, running_var, num_batches_tracked,
                              momentum, eps, activation, negative_slope, alpha,
                              residual=residual)
    count, mean, m2, mean_lo = bn_partial_stats(x)
    p = plan(x, reduction=False, merging=PARTIAL_BYTES)
    view = p.view
    P, C = mean.shape
    weight, bias = _dense(weight, (C,), "weight"), _dense(bias, (C,), "bias")
    running_mean = _in_place(running_mean, C, "running_mean")
    running_var = _in_place(running_var, C, "running_var")
    stats = torch.empty((3, C), dtype=mean.dtype, device=x.device)
    y = torch.empty_like(x)
    update = running_mean is not None
    cumulative = update and momentum is None
    counts = counts_batch(update, momentum, num_batches_tracked)
    named, rflags, rtensors = _residual_site(residual)
    site = _site(
        ("merge_normalize", p, x.dtype, update, cumulative, counts, weight is not None,
         bias is not None, eps, momentum, activation, negative_slope, alpha, named),
        lambda: merge_normalize_site(p, x, y, P, update, cumulative, weight is not None,
                                     bias is not None, eps, momentum, activation,
                                     negative_slope, alpha, named, rflags, counts))
    m, lo, inv = stats.unbind(0)
    site(x, y, count, mean, mean_lo, m2, m, lo, inv, weight if weight is not None else m,
         bias if bias is not None else m, running_mean if update else m,
         running_var if update else m, num_batches_tracked if cumulative or counts else m,
         *rtensors)
    return y, stats


def merge_normalize_site(p, x, y, P, update, cumulative, has_w, has_b, eps, momentum,
                         activation, negative_slope, alpha, named, rflags, count=False,
                         rows=False) -> Site:
    """``_merge_normalize_kernel`` on the elementwise plan ``p`` over ``P`` partials: tensors
    (x, y, the four [P, C] partials, mean, mean_lo, invstd, weight, bias, running_mean,
    running_var, num_batches_tracked, then ``named``; dummies for absent ones); ``count``: the
    kernel adds one to num_batches_tracked; ``rows``: mean is one [3 + 4P, C] tensor holding
    the three statistics (rows 0-2) and the four partials after them (``count``'s tensor too,
    see ``partial_stats_site``)."""
    view = p.view
    return Site(
        K._merge_normalize_kernel, p.grid,
        (P, view.C, view.cols, *view.strides(x), *view.strides(y), p.nsb, p.n_units,
         p.units_per_prog,
         *f32_pairs(eps, 0.0 if momentum is None else momentum, negative_slope, alpha)),
        named, UPDATE=update, CUMULATIVE=cumulative, HAS_W=has_w, HAS_B=has_b,
        ACTIVATION=activation, COMPUTE=rt.compute_dtype(x.dtype), INT64=view.int64(y),
        BLOCK_P=min(next_pow2(P), MERGE_BLOCK_P), BLOCK_S=p.BLOCK_S, BLOCK_C=p.BLOCK_C,
        num_warps=p.num_warps, **flat_args(p), **rflags,
        **_set(COUNT=count, STATS_ROWS=rows, PARTS_ROWS=rows))


def normalize(x, weight, bias, stats, running_mean, running_var, eps, training, activation,
              negative_slope, alpha, residual=None):
    """y from batch statistics ``stats`` [3, C] (training) or from the running stats (eval)."""
    x = _prepare_input(x)
    mean, invstd, kw = _stat_kwargs(stats, running_mean, running_var, eps)
    return bn_normalize(x, mean, invstd, weight, bias, activation, negative_slope, alpha, **kw,
                        residual=_residual_like(residual, x))


def backward(dy, x, weight, bias, stats, running_mean, running_var, eps, training,
             activation, negative_slope, alpha, need_x, need_wb, residual=None, need_r=False):
    """(dx or None, sums [2, C] or None: sum g = dbias, sum g * xhat = dweight, the residual's
    gradient g or None).
    Passes over x and dy: eval one; training one per program when the plan has one partial per
    channel (reduce, then dx from cache), else two launches (reduce, dx).  With a residual, the
    first pass over each element also writes g = dy * act'(bn(x) + r), its gradient."""
    x = _prepare_input(x)
    mean, invstd, kw = _stat_kwargs(stats, running_mean, running_var, eps)
    residual = _residual_like(residual, x)
    need_r = need_r and residual is not None
    # the reduction pass writes dr whenever it reads a residual (one flag, HAS_R)
    dr = torch.empty_like(x) if residual is not None else None
    res = dict(residual=residual, dr=dr)
    args = (x, dy, mean, invstd, weight, bias, activation, negative_slope, alpha,
            kw.get("mean_lo"), kw.get("var"), kw.get("eps", 0.0))
    C = x.shape[1]
    if x.numel() == 0:
        sums = x.new_zeros((2, C), dtype=rt.accum_dtype(x.dtype)) if need_wb else None
        return ((torch.empty_like(x) if need_x else None), sums,
                (torch.empty_like(x) if need_r else None))
    count = x.numel() // C
    if need_x and not training:
        if not need_wb:  # elementwise: the plan with more programs
            return bn_backward_dx(x, dy, mean, invstd, weight, bias, activation=activation,
                                  negative_slope=negative_slope, alpha=alpha, training=False,
                                  **kw, **res, write_dr=need_r), None, dr if need_r else None
        sums, dx = _backward_pass(*args, eval_dx=True, **res)
        return dx, sums, dr if need_r else None
    if need_x and plan(x, reduction=True).num_partials == 1:
        sums, dx = _backward_pass(*args, train_dx=True, count=count, **res)
        return dx, sums, dr if need_r else None
    if not (need_x or need_wb or need_r):
        return None, None, None
    if not need_x:
        sums = _backward_pass(*args, **res)[0]
        return None, sums if need_wb else None, dr if need_r else None
    # two launches: the partial sums (and dr), then dx, whose kernel also totals the partials
    ws, _ = _backward_pass(*args, partials=True, **res)
    sums = ws.new_empty((2, C)) if need_wb else None
    dx = bn_backward_dx(x, dy, mean, invstd, weight, bias, ws[0], ws[1], count,
                        activation, negative_slope, alpha, training=True, sums_out=sums, **kw,
                        residual=residual)
    return dx, sums, dr if need_r else None
