"""``tkern.convert``: swap an existing model's layers for tkern's, and fuse neighbours.

Modules are converted by re-classing a copy of their ``__dict__``: parameters and buffers are the
very same tensor objects, so state_dict keys and values are unchanged and an optimizer built before
the conversion still holds the model's parameters.  Fusion only merges neighbours in an
``nn.Sequential``, where the data flow from one slot to the next is certain; the emptied slot
becomes ``nn.Identity`` (no state), so state_dict keys stay as they were.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from . import nn as tnn
from .activations import ACTIVATIONS

log = logging.getLogger("tkern")

_ACTIVATION_NAMES = {a.module: a.name for a in ACTIVATIONS.values() if a.name != "identity"}
_BATCH_NORMS = {nn.BatchNorm1d: tnn.BatchNorm1d, nn.BatchNorm2d: tnn.BatchNorm2d,
                nn.BatchNorm3d: tnn.BatchNorm3d}
if hasattr(tnn, "SyncBatchNorm"):
    _BATCH_NORMS[nn.SyncBatchNorm] = tnn.SyncBatchNorm


def _reclass(module: nn.Module, cls: type, **attrs) -> nn.Module:
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    new.__dict__.update(attrs)
    return new


def _activation_module(act: nn.Module, p: float = 0.0) -> tnn.ActivationDropout:
    name = _ACTIVATION_NAMES[type(act)]
    new = tnn.ActivationDropout(
        name, p,
        negative_slope=getattr(act, "negative_slope", 0.01), alpha=getattr(act, "alpha", 1.0),
        approximate=getattr(act, "approximate", "none"),
    )
    return new.train(act.training)


def _swap(module: nn.Module) -> nn.Module | None:
    """The tkern replacement of one module, or None to keep it."""
    kind = type(module)  # exact types: a user's subclass may change forward
    if kind in _BATCH_NORMS:
        return _reclass(module, _BATCH_NORMS[kind], activation=None, negative_slope=0.01,
                        alpha=1.0, approximate="none")
    if kind is nn.LocalResponseNorm:
        return _reclass(module, tnn.LocalResponseNorm)
    if kind in _ACTIVATION_NAMES:
        return _activation_module(module)
    if kind is nn.Dropout:
        return tnn.ActivationDropout("identity", module.p).train(module.training)
    return None


def _is_plain_activation(m: nn.Module) -> bool:
    return isinstance(m, tnn.ActivationDropout) and m.p == 0.0 and m.activation != "identity"


def _is_plain_dropout(m: nn.Module) -> bool:
    return isinstance(m, tnn.ActivationDropout) and m.activation == "identity"


def _fuse_sequential(seq: nn.Sequential, prefix: str, report: list[str]) -> None:
    names = list(seq._modules)
    for left, right in zip(names, names[1:]):
        a, b = seq._modules[left], seq._modules[right]
        if isinstance(a, tuple(_BATCH_NORMS.values())) and a.activation is None and _is_plain_activation(b):
            a.activation, a.negative_slope, a.alpha, a.approximate = (
                b.activation, b.negative_slope, b.alpha, b.approximate)
            seq._modules[right] = nn.Identity()
            report.append(f"fused {prefix}{right} ({b.activation}) into {prefix}{left} ({type(a).__name__})")
        elif _is_plain_activation(a) and _is_plain_dropout(b):
            a.p = b.p
            seq._modules[right] = nn.Identity()
            report.append(f"fused {prefix}{right} (dropout p={b.p}) into {prefix}{left} ({a.activation})")


def _convert(module: nn.Module, prefix: str, fuse: bool, report: list[str]) -> None:
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        new = _swap(child)
        if new is not None:
            module._modules[name] = new
            report.append(f"{prefix}{name}: {type(child).__name__} -> tkern.nn.{type(new).__name__}")
            child = new
        _convert(child, f"{prefix}{name}.", fuse, report)
    if fuse and isinstance(module, nn.Sequential):
        _fuse_sequential(module, prefix, report)


def convert(model: nn.Module, *, fuse: bool = True) -> nn.Module:
    """Replace torch's BatchNorm1d/2d/3d, SyncBatchNorm, LocalResponseNorm, activation modules
    (ReLU, LeakyReLU, Sigmoid, Tanh, GELU, SiLU, ELU) and Dropout in ``model`` with tkern modules,
    in place, and return the model.

    With ``fuse``, inside an ``nn.Sequential`` a BatchNorm directly followed by an activation becomes
    one fused BatchNorm, and an activation directly followed by Dropout becomes one
    ``ActivationDropout``; the emptied slot becomes ``nn.Identity``.  state_dict keys do not change.
    What changed is logged on the ``tkern`` logger (INFO) and kept as ``model.tkern_report``.
    """
    report: list[str] = []
    root = _swap(model)
    if root is not None:
        report.append(f"(root): {type(model).__name__} -> tkern.nn.{type(root).__name__}")
        model = root
    _convert(model, "", fuse, report)
    for line in report:
        log.info("tkern.convert: %s", line)
    model.tkern_report = report
    return model
