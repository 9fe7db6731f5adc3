"""BatchNorm's declaration to the op mechanism (``tkern/ops/_op.py``): its config record, the
forward and backward launchers it runs, their fakes, what autograd saves, and the torch-op
composite double backward differentiates.

One op covers training and eval: inputs ``x, weight, bias, running_mean, running_var,
num_batches_tracked, residual`` (the optional residual adds to the normalized x before the
activation: ``act(bn(x) + residual)``, with its gradient); outputs ``y`` and the batch statistics (``[3, C]``: mean, mean_lo,
invstd; empty in eval), a non-differentiable output autograd saves.  Training updates the
running stats in place (``mutates``: under torch.compile the custom op returns their new values
and the mechanism copies them back).  Eval normalizes with the running stats, which it saves.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ... import _runtime as rt
from ...activations import eager_activation
from .._op import Op
from . import launch, programs
from .launch_plan import _prepare_input


class BatchNormConfig(NamedTuple):
    """The scalar arguments of one call (the custom ops' schema comes from these annotations)."""
    eps: float
    training: bool  # batch statistics (training) or the running stats (eval)
    momentum: Optional[float]  # None: cumulative average, 1 / num_batches_tracked on the device
    activation: str  # a kernel name (``activations.kernel_name``)
    negative_slope: float
    alpha: float


def _forward(x, weight, bias, running_mean, running_var, num_batches_tracked, residual, cfg):
    """(y, statistics): training updates running_mean / running_var when given."""
    act = (cfg.activation, cfg.negative_slope, cfg.alpha)
    if cfg.training:
        return launch.train_forward(x, weight, bias, running_mean, running_var,
                                    num_batches_tracked, cfg.momentum, cfg.eps, *act, residual)
    y = launch.normalize(x, weight, bias, None, running_mean, running_var, cfg.eps, False, *act,
                         residual)
    return y, y.new_empty(0)


def _forward_fake(x, weight, bias, running_mean, running_var, num_batches_tracked, residual,
                  cfg):
    y = torch.empty_like(_prepare_input(x))
    shape = (3, x.shape[1]) if cfg.training else (0,)
    return y, x.new_empty(shape, dtype=rt.accum_dtype(x.dtype) if cfg.training else x.dtype)


def _backward(douts, saved, cfg, needs):
    (dy,), (x, weight, bias, running_mean, running_var, residual, stats) = douts, saved
    need_x, need_w, need_b, need_r = needs
    dx, sums, dr = launch.backward(dy, x, weight, bias, stats if cfg.training else None,
                                   running_mean, running_var, cfg.eps, cfg.training,
                                   cfg.activation, cfg.negative_slope, cfg.alpha, need_x,
                                   need_w or need_b, residual, need_r)
    return (dx if need_x else None, sums[1].to(weight.dtype) if need_w else None,
            sums[0].to(bias.dtype) if need_b else None, dr if need_r else None)


def _backward_fake(douts, saved, cfg, needs):
    (dy,), (x, weight, bias, *_) = douts, saved
    return (torch.empty_like(_prepare_input(x)) if needs[0] else None,
            weight.new_empty(weight.shape) if needs[1] else None,
            bias.new_empty(bias.shape) if needs[2] else None,
            torch.empty_like(_prepare_input(x)) if needs[3] else None)


def _composite(saved, cfg):
    """y from torch ops (batch statistics recomputed in training), for double backward."""
    x, weight, bias, running_mean, running_var, residual, _ = saved
    act, approximate = (("gelu", "tanh") if cfg.activation == "gelu_tanh"
                        else (cfg.activation, "none"))
    y = F.batch_norm(x, None if cfg.training else running_mean,
                     None if cfg.training else running_var, weight, bias, cfg.training, 0.0,
                     cfg.eps)
    if residual is not None:
        y = y + residual
    return eager_activation(y, act, cfg.negative_slope, cfg.alpha, approximate)


def _eval(cfg):
    return not cfg.training


OP = Op("tkern::batch_norm",
        inputs=("x", "weight?", "bias?", "running_mean?", "running_var?", "num_batches_tracked?",
                "residual?"),
        outputs=("y", "stats"), aux=("stats",), mutates=("running_mean", "running_var"),
        config=BatchNormConfig, forward=_forward, fake=_forward_fake,
        saves=("x", "weight", "bias", "running_mean", "running_var", "residual", "stats"),
        save_when={"running_mean": _eval, "running_var": _eval},  # training mutates them
        grads=("x", "weight", "bias", "residual"), backward=_backward, backward_fake=_backward_fake,
        composite=_composite, program=programs.make)
