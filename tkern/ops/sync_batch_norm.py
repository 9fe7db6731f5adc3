"""SyncBatchNorm: BatchNorm over the global batch of a torch.distributed process group.

tkern's BatchNorm kernels do the local work; torch.distributed does the talking, one collective
each way:
- forward: the local (mean, M2) per channel and the local count, 2C + 1 values (fp64, so that the
  mean's fp32 hi + lo pair travels as one value), are all-gathered;
  every rank merges the world's partials with Chan's formula (the same combine kernel BatchNorm
  uses for its splits, so 1000 + 0.01 * randn stays exact), updates the running stats as if one
  process had seen the global batch (unbiased with the global count), and normalizes locally.
  Gathering (mean, M2) rather than all-reducing (sum, sum of squares) keeps the merge stable.
- backward: the local sum(g) and sum(g * xhat), 2C values (g = dy * act'(z)), are all-reduced;
  dx follows from the global sums.  dweight and dbias stay local (DDP reduces them), as torch's.

Per step and rank: forward sends 2C + 1 values and receives (2C + 1) x world_size (all_gather
grows linearly with the world); backward all-reduces 2C values (a ring all-reduce moves about
2 x 2C values per rank, whatever the world size).  A rank with an empty batch still takes part,
contributing count 0.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from .. import _runtime as rt
from ..activations import eager_activation
from ._op import Op
from .batch_norm import (_prepare_input, bn_backward_dx, bn_backward_reduce, bn_combine_stats,
                         bn_normalize, bn_partial_stats)


def _all_gather_stats(packed: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    out = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(out, packed, group=group)
    return torch.stack(out)


def _check_global_count(total: torch.Tensor, shape) -> None:
    """torch's check that the group saw more than one value per channel, where it costs no GPU
    sync: on CPU tensors.  A device count stays on the device (torch's SyncBatchNorm makes no
    global check either), so CUDA graph capture and the host's run-ahead are undisturbed."""
    if total.device.type != "cpu":
        return
    n = int(total)
    if n <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(shape)} "
            f"and {n} value(s) per channel over the process group")


class SyncConfig(NamedTuple):
    """Scalar arguments and the process group (no custom op: a group has no schema type)."""
    momentum: Optional[float]
    eps: float
    activation: str  # eager name (the fallback's activation)
    kernel_activation: str  # kernel name
    negative_slope: float
    alpha: float
    approximate: str
    group: object


def _act(cfg):
    return cfg.kernel_activation, cfg.negative_slope, cfg.alpha


def _forward(x, weight, bias, running_mean, running_var, num_batches_tracked, cfg):
    """Triton: local partials, one all_gather, the world's merge, a local normalize."""
    x = _prepare_input(x)
    C = x.shape[1]
    acc = rt.accum_dtype(x.dtype)
    # the local (count, mean as hi + lo, M2) per channel; an empty batch gives count 0
    count, mean, m2, mean_lo = bn_combine_stats(*bn_partial_stats(x), local=True)
    # 2C + 1 values, in fp64 so the mean's hi + lo travel as one value (48 bits for fp32 input)
    packed = torch.cat([mean[0].double() + mean_lo[0].double(), m2[0].double(),
                        count[0, :1].double()])
    world = _all_gather_stats(packed, cfg.group)  # [W, 2C + 1]
    means = world[:, :C]
    mean_hi = means.to(acc)
    mean_lo = (means - mean_hi.double()).to(acc)
    counts = world[:, 2 * C:].expand(-1, C).to(acc)
    total = world[:, 2 * C].sum().to(acc)
    _check_global_count(total, x.shape)
    mean, mean_lo, invstd = bn_combine_stats(
        counts, mean_hi, world[:, C:2 * C].to(acc), mean_lo, eps=cfg.eps,
        running_mean=running_mean, running_var=running_var, momentum=cfg.momentum,
        num_batches_tracked=num_batches_tracked)
    y = bn_normalize(x, mean, invstd, weight, bias, *_act(cfg), mean_lo=mean_lo)
    return y, mean, mean_lo, invstd, total


def _backward(douts, saved, cfg, needs):
    """Local sums of g and g * xhat, one all_reduce, dx from the global sums."""
    (dy,), (x, weight, bias, mean, mean_lo, invstd, total) = douts, saved
    x = _prepare_input(x)
    sum_g, sum_gx = bn_backward_reduce(x, dy, mean, invstd, weight, bias, *_act(cfg),
                                       mean_lo=mean_lo)
    dx = None
    if needs[0]:
        sums = torch.cat([sum_g, sum_gx])
        dist.all_reduce(sums, group=cfg.group)
        C = x.shape[1]
        # the global count lives on the device: pass the means and count=1
        dx = bn_backward_dx(x, dy, mean, invstd, weight, bias, sums[:C] / total,
                            sums[C:] / total, 1, *_act(cfg), training=True, mean_lo=mean_lo)
    dw = sum_gx.to(weight.dtype) if weight is not None and needs[1] else None
    db = sum_g.to(bias.dtype) if bias is not None and needs[2] else None
    return dx, dw, db


def _eager_forward(x, weight, bias, running_mean, running_var, num_batches_tracked, cfg):
    """The same algorithm in plain PyTorch: the CPU fallback without Triton's interpreter."""
    C = x.shape[1]
    acc = rt.accum_dtype(x.dtype)
    dims = [0] + list(range(2, x.dim()))
    xf = x.to(acc)
    n = x.numel() // C if C else 0
    if n:
        var, mean = torch.var_mean(xf, dim=dims, correction=0)
        packed = torch.cat([mean, var * n, torch.tensor([float(n)], dtype=acc, device=x.device)])
    else:
        packed = torch.zeros(2 * C + 1, dtype=acc, device=x.device)
    world = _all_gather_stats(packed, cfg.group)
    counts, means, m2s = world[:, 2 * C:], world[:, :C], world[:, C:2 * C]
    total = counts.sum()
    _check_global_count(total, x.shape)
    mean = (counts * means).sum(0) / total
    var = (m2s + counts * (means - mean) ** 2).sum(0) / total
    invstd = torch.rsqrt(var + cfg.eps)
    if running_mean is not None:
        momentum = cfg.momentum
        if momentum is None:
            momentum = 1.0 / float(num_batches_tracked)
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        unbiased = var * total / (total - 1)
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    shape = [1, C] + [1] * (x.dim() - 2)
    xhat = (xf - mean.view(shape)) * invstd.view(shape)
    z = xhat
    if weight is not None:
        z = z * weight.to(acc).view(shape)
    if bias is not None:
        z = z + bias.to(acc).view(shape)
    y = eager_activation(z, cfg.activation, cfg.negative_slope, cfg.alpha, cfg.approximate)
    return y.to(x.dtype), mean, invstd, total


def _eager_backward(douts, saved, cfg, needs):
    (dy,), (x, weight, bias, mean, invstd, total) = douts, saved
    C = x.shape[1]
    acc = mean.dtype
    shape = [1, C] + [1] * (x.dim() - 2)
    dims = [0] + list(range(2, x.dim()))
    xhat = (x.to(acc) - mean.view(shape)) * invstd.view(shape)
    with torch.enable_grad():
        z = xhat * (weight.to(acc).view(shape) if weight is not None else 1.0)
        z = (z + (bias.to(acc).view(shape) if bias is not None else 0.0)).detach().requires_grad_()
        a = eager_activation(z, cfg.activation, cfg.negative_slope, cfg.alpha, cfg.approximate)
        (g,) = torch.autograd.grad(a, z, dy.to(acc))
    sum_g, sum_gx = g.sum(dims), (g * xhat).sum(dims)
    dx = None
    if needs[0]:
        sums = torch.cat([sum_g, sum_gx])
        dist.all_reduce(sums, group=cfg.group)
        w = weight.to(acc).view(shape) if weight is not None else 1.0
        dx = (w * invstd.view(shape) * (g - (sums[:C] / total).view(shape)
                                         - xhat * (sums[C:] / total).view(shape))).to(x.dtype)
    dw = sum_gx.to(weight.dtype) if weight is not None and needs[1] else None
    db = sum_g.to(bias.dtype) if bias is not None and needs[2] else None
    return dx, dw, db


_INPUTS = ("x", "weight?", "bias?", "running_mean?", "running_var?", "num_batches_tracked?")

# Two declarations (Triton, and the eager fallback) to the op mechanism, without torch.library
# ops (the process group cannot travel through a schema) and without double backward.
OP = Op("tkern::sync_batch_norm", inputs=_INPUTS,
        outputs=("y", "mean", "mean_lo", "invstd", "total"),
        aux=("mean", "mean_lo", "invstd", "total"), config=SyncConfig, forward=_forward,
        saves=("x", "weight", "bias", "mean", "mean_lo", "invstd", "total"),
        grads=("x", "weight", "bias"), backward=_backward, library=False)
EAGER_OP = Op("tkern::sync_batch_norm_eager", inputs=_INPUTS,
              outputs=("y", "mean", "invstd", "total"), aux=("mean", "invstd", "total"),
              config=SyncConfig, forward=_eager_forward,
              saves=("x", "weight", "bias", "mean", "invstd", "total"),
              grads=("x", "weight", "bias"), backward=_eager_backward, library=False)


def sync_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps, group, *,
                    activation="identity", kernel_activation="identity", negative_slope=0.01,
                    alpha=1.0, approximate="none", num_batches_tracked=None):
    """Training-mode BatchNorm over the global batch of ``group`` (world size > 1).
    ``momentum=None`` means the cumulative average 1 / num_batches_tracked."""
    cfg = SyncConfig(momentum, float(eps), activation, kernel_activation, float(negative_slope),
                     float(alpha), approximate, group)
    flat = [None if t is None else t.reshape(-1) for t in (weight, bias)]
    nbt = num_batches_tracked if momentum is None else None
    op = OP
    if not rt.use_triton("SyncBatchNorm", input, running_mean, running_var, weight, bias):
        op = EAGER_OP
    return op.apply(input, *flat, running_mean, running_var, nbt, cfg=cfg)[0]
