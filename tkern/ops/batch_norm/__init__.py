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

FLAT tiles (``launch_plan.FLAT_MAX_S``: channel-major x with S <= 1024, i.e. NCHW 28x28, 14x14,
7x7).  A tile long in S would leave S = 49 or 196 in a 64- or 256-lane row, each position a 2-byte
load.  Instead a program owns CPP whole channels, whose CPP * S positions are contiguous in every
sample; the tile is [samples, positions] and its rows are read with 16-byte accesses (CPP * S a
multiple of 16 bytes; the last channel block moves back to end at C, overlapping its neighbour,
so the position mask is a constant; overlapped channels' results are written by their owner and
the overlapped y / dx twice with the same values).  The position -> channel map is the same in every
sample, so the kernels gather per-channel parameters to positions once per program
(``tl.gather``), accumulate per position over the samples, and merge positions into channels once
at the end (``_merge_positions``: equal counts, exact parallel formula).  On a GPU such a layer
takes the one-launch plan when a channel block of all samples is at most
``FUSED_PROGRAM_BYTES`` (64 KB: the re-read of normalize and backward's dx pass hits L2) and there
are channel blocks for ~every SM; channels_last does the same in narrow channel blocks (rows of
at least one 32-byte sector).  Reduction loops take their tiles in pairs (both loads issued
before either is used); tiles hold 64 bytes a thread.

Training forward.  When the plan has one partial per channel (a channel block spans at most
``FUSED_MAX_UNITS`` units, as in small batches and late layers, or there are channel blocks enough
to fill the GPU) it takes one launch, ``_fused_forward_kernel``: a program per channel block
reduces its channels, writes the statistics, updates the running stats and normalizes, re-reading
x (from cache when the block is a few tiles).  Larger layers take two launches, x read twice
from memory, y written once:
1. ``_stats_partial_kernel``: a grid (channel blocks) x (splits).  Each program reduces its units
   into a partial (count, mean, M2) per channel, written to an fp32 (fp64 for fp64) workspace
   ``[P, C]``.  Values are shifted by the mean of the program's first tile and summed per lane
   (sum and sum of squares), with one cross-lane reduction at the end: the loop is loads and
   FMAs, and the variance from shifted sums stays accurate (the bound is in ``_shifted_stats``),
   so 1000 + 0.01 * randn keeps its variance.  Partial means are kept as hi + lo (TwoSum).
   Splitting matters for few channels and large N x S (C=64 at 112x112): one program per channel
   would leave most of the GPU idle.
2. ``_merge_normalize_kernel``: each program first merges its channels' P partials
   (``_merge_partials``, exact parallel formula: weighted mean, then sum of M2_i + n_i (mean_i -
   mean)^2; P small rows read from L2, the price of not launching a combine kernel: a launch
   costs more than they on the small layers where it matters), then normalizes elementwise,
   ``act((x - hi - lo) * (invstd * w) + b)``, centring first because
   ``x * scale + (b - mean * scale)`` loses digits when |mean| >> std.  The first program along
   the units of each channel block writes the saved mean and invstd and updates running_mean /
   running_var in place, once (no autotuning).  The mean is saved as hi + lo (TwoSum): an fp32
   mean alone would move every xhat by up to ulp(mean) * invstd, 3e-3 for 1000 + 0.01 * randn.
   ``momentum=None`` (cumulative average) reads num_batches_tracked on the device: no host sync.
   ``_stats_combine_kernel`` does the merge alone (SyncBatchNorm, statistics without y).
Eval uses the running stats and only ``_normalize_kernel`` (one launch: the kernel takes invstd
from running_var).

Residual.  ``residual=r`` (x's shape and dtype) gives ``act(bn(x) + r)``: every normalize path
(``HAS_R``) loads r through x's offsets (a copy in x's layout when its strides differ) and adds it
before the activation; backward rebuilds ``z + r`` and the first pass over each element writes
``dr = g`` (``DR``; ``WRITE_DR`` in the eval dx kernel, where no reduction pass runs).

Backward saves x, weight, bias, the residual and the statistics used (the fp32/fp64 [3, C] mean,
mean_lo, invstd in training; the running stats in eval); the pre-activation is rebuilt from them.
1. ``_backward_reduce_kernel``: partial sums of g = dy * act'(z) and g * xhat per channel into
   ``[P, C]`` (deterministic: no float atomics); the dx kernel adds the P rows up (in order) and
   writes the totals, dbias and dweight.  With one partial per channel (the one-launch plan) the program holds
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

Files: ``kernels.py`` (the Triton kernels), ``launch_plan.py`` (the ``Plan`` record: view, tiles, grid),
``launch.py`` (launchers and the building blocks above), ``autograd.py`` (the declaration to
``tkern/ops/_op.py``, which builds the autograd.Function, the ``tkern::batch_norm`` custom ops for
torch.compile and the double backward).  A call: ``batch_norm`` -> ``autograd.OP.apply`` ->
``launch.train_forward`` -> ``kernels._fused_forward_kernel``.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from ... import _runtime as rt
from ...activations import activation_scalars, eager_activation, kernel_name, named_scalars
from .._op import PlanCache, signature
from .autograd import OP, BatchNormConfig
from .kernels import (_backward_reduce_kernel, _dx_kernel, _fused_forward_kernel,
                      _merge_normalize_kernel, _normalize_kernel, _stats_combine_kernel,
                      _stats_partial_kernel)
from .launch import (bn_backward_dx, bn_backward_reduce, bn_combine_stats, bn_normalize,
                     bn_partial_stats, num_partials)
from .launch_plan import FUSED_MAX_UNITS, Plan, _prepare_input, plan


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


def _check_scalars(dtype, eps, momentum, activation, negative_slope, alpha, op="batch_norm"):
    """ValueError for a float scalar a float64 kernel would get wrong (rt.check_scalars)."""
    scalars = dict(eps=eps)
    if momentum is not None:
        scalars["momentum"] = momentum
    scalars.update(named_scalars(activation, negative_slope, alpha))
    rt.check_scalars(op, dtype, **scalars)


def _flat(t):
    """A [C] parameter as the kernels index it (unit stride); a copy only when strided."""
    if t is None or (t.dim() == 1 and t.is_contiguous()):
        return t
    return t.reshape(-1).contiguous()


# Calls that passed the checks below, by their scalars and signature (``_op.signature``): the
# config record, the op's program, whether the running stats go to the op, and how the
# module's counter is kept (``_NBT_*``).  A repeated layer's call then costs this key and the
# program's launches.
_CALLS = PlanCache(None)
# num_batches_tracked on a repeated call: the kernel counts it (float momentum); the host counts
# it and the kernel reads it (momentum=None); the host counts it (no running stats)
_NBT_KERNEL, _NBT_READ, _NBT_HOST = 1, 2, 3


def checked_key(training, momentum, eps, activation, negative_slope, alpha, approximate,
                tensors):
    """The checked-call cache's key (``_CALLS``) of a call with these scalars and ``tensors``
    (input, running_mean, running_var, weight, bias, num_batches_tracked, residual), or None
    where the cache steps aside: a tensor subclass, non-float scalars (a 0-dim tensor: its
    value may change), torch.compile, functorch transforms (wrapped tensors)."""
    if (tensors[0].__class__ is torch.Tensor and eps.__class__ is float
            and (momentum is None or momentum.__class__ is float)
            and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active()):
        return (training, momentum, eps, activation, negative_slope, alpha, approximate,
                *signature(tensors))
    return None


def repeat(hit, input, running_mean, running_var, weight, bias, num_batches_tracked, residual):
    """A repeated call (a ``_CALLS`` entry; the caller has checked that no torch.func transform
    is active, ``checked_key`` does): the module's counter kept as the entry says, then the op's
    program; y."""
    cfg, program, stats, nbt = hit
    if nbt is not None and nbt != _NBT_KERNEL:
        num_batches_tracked.add_(1)
    inputs = (input, weight, bias, running_mean if stats else None,
              running_var if stats else None,
              num_batches_tracked if nbt is not None and nbt != _NBT_HOST else None, residual)
    return OP.fast(input, weight, bias, residual, inputs, cfg, program)  # OP.grads' inputs


def runner(hit):
    """``repeat`` for one ``_CALLS`` entry with its branches taken once (a module keeps it for
    its repeated calls): ``run(input, running_mean, running_var, weight, bias,
    num_batches_tracked, residual) -> y``."""
    cfg, program, stats, nbt = hit
    fast = OP.fast
    if stats and nbt == _NBT_KERNEL:  # training: the kernel counts the batch
        def run(input, running_mean, running_var, weight, bias, num_batches_tracked, residual):
            return fast(input, weight, bias, residual, (input, weight, bias, running_mean,
                        running_var, num_batches_tracked, residual), cfg, program)
    elif stats and nbt is None:  # eval
        def run(input, running_mean, running_var, weight, bias, num_batches_tracked, residual):
            return fast(input, weight, bias, residual, (input, weight, bias, running_mean,
                        running_var, None, residual), cfg, program)
    else:
        def run(input, running_mean, running_var, weight, bias, num_batches_tracked, residual):
            return repeat(hit, input, running_mean, running_var, weight, bias,
                          num_batches_tracked, residual)
    return run


_LOOK_UP = object()  # _batch_norm's default: look the call up (a module passes its own key)


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                activation, negative_slope, alpha, approximate, num_batches_tracked=None,
                residual=None, counted=False, key=_LOOK_UP):
    """Shared body of ``batch_norm`` and the modules.  ``num_batches_tracked`` (modules, in
    training with tracked stats): the module's counter, which this call advances by one first,
    as torch's modules do (in the kernel on a repeated call: no add_ launch); ``momentum=None``
    then means the cumulative average 1 / num_batches_tracked, read on the device
    (``counted``: already advanced).  ``negative_slope`` and ``alpha`` are the kernels' two
    activation scalars (``activations.activation_scalars``).  ``key``: the caller's
    ``checked_key``, already looked up and missed (the modules' forward)."""
    if key is _LOOK_UP:
        key = None if counted else checked_key(
            training, momentum, eps, activation, negative_slope, alpha, approximate,
            (input, running_mean, running_var, weight, bias, num_batches_tracked, residual))
        hit = None if key is None else _CALLS.plans.get(key)
        if hit is not None:
            return repeat(hit, input, running_mean, running_var, weight, bias,
                          num_batches_tracked, residual)
    if num_batches_tracked is not None and not counted:
        num_batches_tracked.add_(1)  # first, as torch's modules (even if a check fails below)
    kact = kernel_name(activation, approximate)
    if residual is not None and not (
            isinstance(residual, torch.Tensor) and isinstance(input, torch.Tensor)
            and residual.shape == input.shape and residual.dtype == input.dtype
            and residual.device == input.device and input.numel() > 0
            and rt.use_triton("batch_norm", input, residual)):
        # broadcast, promotion, an empty batch or the eager fallback: torch adds, as
        # act(bn(x) + r) would
        y = _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                        None, negative_slope, alpha, "none", num_batches_tracked, counted=True)
        return eager_activation(y + residual, activation, negative_slope, alpha, approximate)
    _check(input, running_mean, running_var, weight, bias, training, eps)
    _check_scalars(input.dtype, eps, momentum if training and running_mean is not None else None,
                   activation, negative_slope, alpha)
    if input.numel() == 0:
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.numel() == 0:  # torch indexes weight[0] / bias[0] here
                raise IndexError(f"tkern.batch_norm: an empty input with an empty {name} (C = 0): "
                                 f"torch's batch_norm raises IndexError for it too")
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
    given = weight, bias
    weight, bias = _flat(weight), _flat(bias)
    rm, rv = (_flat(running_mean), _flat(running_var)) if update or not training else (None, None)
    nbt = num_batches_tracked if update and momentum is None else None
    momentum = momentum if update else 0.0
    cfg = BatchNormConfig(float(eps), bool(training), momentum, kact, float(negative_slope),
                          float(alpha))
    inputs = (input, weight, bias, rm, rv, nbt, residual)
    y = OP.apply(*inputs, cfg=cfg)[0]
    if update:  # strided running stats were updated as contiguous copies (_flat)
        for t, flat in ((running_mean, rm), (running_var, rv)):
            if flat is not t:
                t.copy_(flat.view_as(t))
    stats = rm is not None
    if (key is not None and weight is given[0] and bias is given[1]
            and (not stats or (rm is running_mean and rv is running_var))):
        mode = program = None
        if num_batches_tracked is not None:
            mode = _NBT_READ if nbt is not None else _NBT_KERNEL if update else _NBT_HOST
        if mode == _NBT_KERNEL:  # the repeated call's inputs: the counter goes to the kernel
            program = OP.program((*inputs[:5], num_batches_tracked, residual), cfg)
        else:
            program = OP.program(inputs, cfg)
        _CALLS.put(key, (cfg, program, stats, mode))
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
