"""FlagGems (``flag_gems``, a Triton op library) as a peer provider, where it is importable.

A peer, not a baseline: its rows count toward no target and its failures do not fail the sweep;
they show where tkern stands beside another Triton library.  It has batch_norm, dropout and weight
norm; its functions are aten-level (forward and backward apart), so each is wrapped here in an
autograd Function that calls FlagGems' kernels both ways (flag_gems.use_gems would route torch's
own eager calls, i.e. the eager provider, to it too):
- batch_norm: ``flag_gems.ops.batch_norm`` / ``batch_norm_backward``; the fused-ReLU rows apply
  torch's ReLU after it (FlagGems has no fused BatchNorm+ReLU);
- activation_dropout: torch's bias add and activation, then ``flag_gems.ops.dropout`` /
  ``dropout_backward`` (its dropout stores a mask, as eager's does);
- weight_norm: ``flag_gems.weight_norm`` (its own autograd Function).
The GPU run carries the wheel (``perf/wheels``, see perf/gpu_check.sh); ``import flag_gems``
needs PyYAML, SQLAlchemy and a GPU backend.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=None)
def module():
    """(flag_gems, None) when importable, else (None, why)."""
    try:
        import flag_gems
    except Exception as e:  # noqa: BLE001 - any import failure means no such provider
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    return flag_gems, None


def available() -> tuple[bool, str]:
    fg, why = module()
    if fg is None:
        return False, f"flag_gems not importable ({why})"
    return True, f"flag_gems {getattr(fg, '__version__', '?')}"


class _BatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        fg, _ = module()
        y, mean, inv_std = fg.ops.batch_norm(x, weight, bias, running_mean, running_var, True,
                                             momentum, eps)
        ctx.save_for_backward(x, weight, running_mean, running_var, mean, inv_std)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        fg, _ = module()
        x, weight, rm, rv, mean, inv_std = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        dx, dw, db = fg.ops.batch_norm_backward(dy.contiguous(), x, weight, rm, rv, mean, inv_std,
                                                True, ctx.eps, mask)
        return dx, dw, db, None, None, None, None


def batch_norm(momentum, eps, relu):
    def fn(x, weight, bias, running_mean, running_var):
        y = _BatchNorm.apply(x, weight, bias, running_mean, running_var, momentum, eps)
        return F.relu(y) if relu else y

    return fn


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):
        fg, _ = module()
        y, mask = fg.ops.dropout(x, p, True)
        ctx.save_for_backward(mask)
        ctx.scale = 1.0 / (1.0 - p)
        return y

    @staticmethod
    def backward(ctx, dy):
        fg, _ = module()
        (mask,) = ctx.saved_tensors
        return fg.ops.dropout_backward(dy, mask, ctx.scale), None


def activation_dropout(activation, p, has_bias):
    act = {"gelu": F.gelu, "relu": F.relu}[activation]

    if has_bias:
        def fn(x, b):
            return _Dropout.apply(act(x + b), p)
    else:
        def fn(x):
            return _Dropout.apply(act(x), p)
    return fn


def weight_norm(v, g):
    fg, _ = module()
    return fg.weight_norm(v, g, 0)
