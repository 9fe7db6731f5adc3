"""Drop-in BatchNorm1d/2d/3d with an optional fused activation.

Each class subclasses its torch counterpart, so constructor arguments, parameter/buffer names,
``_check_input_dim``, ``reset_parameters`` and the state_dict (including num_batches_tracked and
its version-1 loading) are torch's own.  One mixin supplies ``__init__`` (the activation
arguments), ``forward`` and ``extra_repr``.  The activation is not part of the state_dict (like
the other constructor arguments), so checkpoints move freely between torch and tkern.

``bias=False`` (affine weight, no bias) is tkern's on every supported torch: torch 2.13 added the
argument, and on older torch (2.11) tkern drops the bias parameter itself after torch's
constructor, so the module, its state_dict (no ``bias`` key) and its gradients are those of a
newer torch's ``BatchNorm(..., bias=False)``.
"""

from __future__ import annotations

import inspect

import torch

from .. import _runtime as rt
from ..activations import activation_repr, activation_scalars, check_activation
from ..ops._op import ABSENT, call_state, tensor_guard
from ..ops.batch_norm import _CALLS, _batch_norm, checked_key, repeat, runner


# Whether the installed torch's BatchNorm takes ``bias=`` (torch >= 2.13).
TORCH_HAS_BIAS_ARG = "bias" in inspect.signature(torch.nn.modules.batchnorm._NormBase.__init__).parameters


def split_bias(kwargs: dict) -> bool:
    """Pops ``bias`` from ``kwargs`` where torch lacks it; returns the bias flag."""
    if TORCH_HAS_BIAS_ARG:
        return kwargs.get("bias", True)
    return bool(kwargs.pop("bias", True))


def drop_bias(module: torch.nn.Module, bias: bool) -> None:
    """``bias=False`` on a torch without the argument: what torch >= 2.13's constructor does."""
    if not TORCH_HAS_BIAS_ARG and module.affine and not bias:
        module.register_parameter("bias", None)


# where a module keeps its last checked call, by training mode (``_remember``)
_MEMO = {True: "_tk_train_call", False: "_tk_eval_call"}
_SEEN = "_tk_last_checked"  # the last checked call's entry (``_remember``)
_MEMO_NAMES = frozenset((*_MEMO.values(), _SEEN))

# what the kernels' activation scalars are made of
_ACTIVATION_ATTRIBUTES = frozenset(("activation", "negative_slope", "alpha", "approximate",
                                    "min_val", "max_val", "beta", "threshold"))


class _TkernBatchNormMixin:
    """Shared forward: torch's _BatchNorm.forward semantics, tkern's kernels."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, activation=None,
                 negative_slope=0.01, alpha=1.0, approximate="none", min_val=-1.0, max_val=1.0,
                 beta=1.0, threshold=20.0, **kwargs):
        # kwargs passes on keyword-only arguments of the installed torch (e.g. bias=False)
        bias = split_bias(kwargs)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         **kwargs)
        drop_bias(self, bias)
        check_activation(activation, approximate)
        activation_scalars(activation, negative_slope, alpha, min_val, max_val, beta, threshold)
        self.activation = activation
        self.negative_slope = negative_slope
        self.alpha = alpha
        self.approximate = approximate
        self.min_val, self.max_val = min_val, max_val
        self.beta, self.threshold = beta, threshold

    def _activation_scalars(self):
        # getattr: modules made before these parameters existed (pickles) lack them
        return activation_scalars(self.activation, self.negative_slope, self.alpha,
                                  getattr(self, "min_val", -1.0), getattr(self, "max_val", 1.0),
                                  getattr(self, "beta", 1.0), getattr(self, "threshold", 20.0))

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``act(bn(input))``, or ``act(bn(input) + residual)`` with ``residual``."""
        # A repeated call: the tensors of a call this module checked and ran before, by one
        # guard on their metadata (``_remember``), then the op's program.
        memo = None if torch.compiler.is_compiling() else self.__dict__.get(
            _MEMO[self.training])
        if memo is not None:
            p, s = self._parameters, self._buffers
            weight, bias = p.get("weight"), p.get("bias")
            rm, rv = s.get("running_mean"), s.get("running_var")
            nbt = s.get("num_batches_tracked")
            if (memo[0](input, ABSENT[1] if weight is None else weight,
                        ABSENT[2] if bias is None else bias, ABSENT[3] if rm is None else rm,
                        ABSENT[4] if rv is None else rv, ABSENT[5] if nbt is None else nbt,
                        ABSENT[6] if residual is None else residual)
                    and memo[2] is rt.plan_state
                    and (memo[3] is None or memo[3] is rt.interpreter_enabled())
                    and not torch._C._are_functorch_transforms_active()):
                return memo[1](input, rm, rv, weight, bias, nbt, residual)
        return self._checked_forward(input, residual)

    def _checked_forward(self, input, residual):
        """torch's _BatchNorm.forward: the checks and the mode's arguments, then the op."""
        self._check_input_dim(input)
        weight, bias, running_mean, running_var, nbt = state = (
            self.weight, self.bias, self.running_mean, self.running_var,
            self.num_batches_tracked)
        training = self.training
        counted = training and self.track_running_stats and nbt is not None
        momentum = self.momentum
        if momentum is None and not counted:
            momentum = 0.0  # unused: no running stats to update
        if not training or self.track_running_stats:
            rm, rv = running_mean, running_var
        else:
            rm = rv = None
        bn_training = training or (running_mean is None and running_var is None)
        slope, alpha = self._kernel_scalars()
        nbt = nbt if counted else None
        eps, activation, approximate = self.eps, self.activation, self.approximate
        # the checked-call cache, without _batch_norm's argument handling
        key = checked_key(bn_training, momentum, eps, activation, slope, alpha, approximate,
                          (input, rm, rv, weight, bias, nbt, residual))
        hit = None if key is None else _CALLS.plans.get(key)
        if hit is not None:
            y = repeat(hit, input, rm, rv, weight, bias, nbt, residual)
        else:
            y = _batch_norm(input, rm, rv, weight, bias, bn_training, momentum, eps, activation,
                            slope, alpha, approximate, num_batches_tracked=nbt,
                            residual=residual, key=key)
            hit = None if key is None else _CALLS.plans.get(key)
        if hit is not None:
            self._remember(hit, input, state, residual)
        return y

    def _remember(self, hit, input, state, residual):
        """Keep ``hit`` (a ``_CALLS`` entry) for calls whose tensors have these ones' metadata,
        read from the module's dicts as forward reads them: only where those dicts hold what
        attribute access gave (a subclass's properties, or a hook's plain ``weight`` attribute
        as old-style weight_norm sets, do not).  Any attribute set forgets it
        (``__setattr__``); a tensor swapped in the dicts fails the guard.  Made on the second
        checked call in a row with this entry (a guard costs a few checked calls' keys): a
        module fed shapes in turn keeps to the checked path."""
        d = self.__dict__
        if self.__class__ not in _OWN_CLASSES or d.get(_SEEN) is not hit:
            d[_SEEN] = hit
            return
        p, s = self._parameters, self._buffers
        if (state[0] is not p.get("weight") or state[1] is not p.get("bias")
                or state[2] is not s.get("running_mean") or state[3] is not s.get("running_var")
                or state[4] is not s.get("num_batches_tracked")):
            return
        tensors = (input, *state, residual)
        guard = tensor_guard(tuple(ABSENT[i] if t is None else t for i, t in enumerate(tensors)))
        d[_MEMO[self.training]] = (guard, runner(hit), *call_state(input.device))

    def _kernel_scalars(self):
        """The kernels' two activation scalars, made once per value of the activation's
        attributes (``__setattr__`` forgets them)."""
        got = self.__dict__.get("_tk_scalars")
        if got is None:
            got = self.__dict__["_tk_scalars"] = self._activation_scalars()
        return got

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        d = self.__dict__
        if name in _ACTIVATION_ATTRIBUTES:
            d.pop("_tk_scalars", None)
        if name != "training":  # momentum, eps, a parameter...: the remembered calls may differ
            self._forget_calls()

    def __delattr__(self, name):
        super().__delattr__(name)
        self._forget_calls()

    def _forget_calls(self):
        d = self.__dict__
        for name in _MEMO_NAMES:
            d.pop(name, None)

    def __getstate__(self):
        # the remembered calls hold guards (C objects): not copied, not pickled
        state = super().__getstate__()
        return {k: v for k, v in state.items() if k not in _MEMO_NAMES}

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if not TORCH_HAS_BIAS_ARG and self.affine and self.bias is None:
            s = s.replace("affine=True, ", "affine=True, bias=False, ")  # newer torch's wording
        if self.activation is not None:
            s += f", activation={self.activation}" + activation_repr(
                self.activation, self.approximate, negative_slope=self.negative_slope,
                alpha=self.alpha, min_val=self.min_val, max_val=self.max_val, beta=self.beta,
                threshold=self.threshold)
        return s


class BatchNorm1d(_TkernBatchNormMixin, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on tkern kernels, with an optional fused activation.

    Accepts every argument of ``torch.nn.BatchNorm1d`` plus keyword-only ``activation`` (None, or
    a name in ``tkern.ACTIVATIONS``), ``negative_slope``, ``alpha``, ``approximate``,
    ``min_val``, ``max_val``, ``beta`` and ``threshold`` (the activation's parameters, as torch's).
    Input (N, C) or (N, C, L).
    """


class BatchNorm2d(_TkernBatchNormMixin, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on tkern kernels (see :class:`BatchNorm1d`); input (N, C, H, W),
    NCHW or channels_last."""


class BatchNorm3d(_TkernBatchNormMixin, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on tkern kernels (see :class:`BatchNorm1d`); input (N, C, D, H, W),
    contiguous or channels_last_3d."""


_OWN_CLASSES = frozenset((BatchNorm1d, BatchNorm2d, BatchNorm3d))

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]
