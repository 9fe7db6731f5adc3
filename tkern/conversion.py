"""``tkern.convert``: swap an existing model's layers for tkern's, and fuse neighbours.

Modules are converted by re-classing a copy of their ``__dict__``: parameters and buffers are the
very same tensor objects, so state_dict keys and values are unchanged and an optimizer built before
the conversion still holds the model's parameters; the hook dicts come along too, so hooks on a
BatchNorm or LRN keep firing (and their handles still remove them).

Activations and Dropout are only replaced when fused: standing alone, tkern's module gains nothing
and would drop ``inplace=True``, whose aliasing user code may rely on.  Fusion only merges
neighbours in an ``nn.Sequential`` (or a subclass keeping its forward), where the data flow from
one slot to the next is certain; the emptied slot becomes ``nn.Identity`` (no state), so state_dict
keys stay as they were.  Neighbours are kept apart when either has hooks (a hook would see, or
lose, a different tensor), when an activation and its Dropout differ in training flag, or when an
in-place activation's input may be held elsewhere; the report says which and why.
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
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")
# Layers whose output is always a new tensor: an in-place activation after one of them only
# overwrites a value nobody else holds, so fusing it away is not observable.
_FRESH_OUTPUT = (nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                 nn.ConvTranspose2d, nn.ConvTranspose3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                 nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.LocalResponseNorm,
                 tnn.LocalResponseNorm, *_BATCH_NORMS, *_BATCH_NORMS.values())


def _reclass(module: nn.Module, cls: type, **attrs) -> nn.Module:
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    new.__dict__.update(attrs)
    return new


def _hooked(m: nn.Module) -> bool:
    return any(getattr(m, d, None) for d in _HOOK_DICTS)


def _swap(module: nn.Module) -> nn.Module | None:
    """The tkern replacement of one module, or None to keep it (activations: see fusion)."""
    kind = type(module)  # exact types: a user's subclass may change forward
    if kind in _BATCH_NORMS:
        return _reclass(module, _BATCH_NORMS[kind], activation=None, negative_slope=0.01,
                        alpha=1.0, approximate="none", min_val=-1.0, max_val=1.0, beta=1.0,
                        threshold=20.0)
    if kind is nn.LocalResponseNorm:
        return _reclass(module, tnn.LocalResponseNorm)
    return None


def _activation_module(act: nn.Module, p: float) -> tnn.ActivationDropout:
    new = tnn.ActivationDropout(
        _ACTIVATION_NAMES[type(act)], p,
        negative_slope=getattr(act, "negative_slope", 0.01), alpha=getattr(act, "alpha", 1.0),
        approximate=getattr(act, "approximate", "none"),
        min_val=getattr(act, "min_val", -1.0), max_val=getattr(act, "max_val", 1.0),
        beta=getattr(act, "beta", 1.0), threshold=getattr(act, "threshold", 20.0),
    )
    return new.train(act.training)


def _kept_apart(a: nn.Module, b: nn.Module, prev: nn.Module | None, bn_left: bool) -> str | None:
    """Why neighbours a, b (a fusable pair by type) must not be fused, or None."""
    if _hooked(a) or _hooked(b):
        return "hooks"
    # BatchNorm's flag picks batch or running stats; an activation's flag changes nothing, so
    # BN + activation fuse whatever it says.  Dropout's flag decides whether it drops.
    if not bn_left and a.training != b.training:
        return "training flags differ"
    # In place after BN overwrites BN's own fresh output; otherwise the activation's input may be
    # the caller's tensor (first slot) or a view of one, which torch would have overwritten.
    if (not bn_left and getattr(a, "inplace", False)
            and (prev is None or type(prev) not in _FRESH_OUTPUT or _hooked(prev))):
        return "in-place activation whose input may be seen elsewhere"
    return None


def _fuse_sequential(seq: nn.Sequential, prefix: str, report: list[str]) -> None:
    names = list(seq._modules)
    for i, (left, right) in enumerate(zip(names, names[1:])):
        a, b = seq._modules[left], seq._modules[right]
        prev = seq._modules[names[i - 1]] if i > 0 else None
        bn_left = isinstance(a, tuple(_BATCH_NORMS.values())) and a.activation is None
        if not ((bn_left or type(a) in _ACTIVATION_NAMES) and
                (type(b) in _ACTIVATION_NAMES if bn_left else type(b) is nn.Dropout)):
            continue
        why = _kept_apart(a, b, prev, bn_left)
        if why is not None:
            report.append(f"kept {prefix}{left} ({type(a).__name__}) and {prefix}{right} "
                          f"({type(b).__name__}) apart: {why}")
        elif bn_left:
            fused = _activation_module(b, 0.0)
            for k in ("activation", "negative_slope", "alpha", "approximate", "min_val",
                      "max_val", "beta", "threshold"):
                setattr(a, k, getattr(fused, k))
            seq._modules[right] = nn.Identity()
            report.append(f"fused {prefix}{right} ({fused.activation}) into {prefix}{left} "
                          f"({type(a).__name__})")
        else:
            seq._modules[left] = _activation_module(a, b.p)
            seq._modules[right] = nn.Identity()
            report.append(f"fused {prefix}{right} (dropout p={b.p}) into {prefix}{left} "
                          f"({type(a).__name__} -> tkern.nn.ActivationDropout)")


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
    # A subclass that overrides forward may not feed each slot into the next.
    if fuse and isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        _fuse_sequential(module, prefix, report)


def convert(model: nn.Module, *, fuse: bool = True) -> nn.Module:
    """Replace torch's BatchNorm1d/2d/3d, SyncBatchNorm and LocalResponseNorm in ``model`` with
    tkern's (hooks included), in place, and return the model.

    With ``fuse``, inside an ``nn.Sequential`` a BatchNorm directly followed by an activation
    (ReLU, LeakyReLU, Sigmoid, Tanh, GELU, SiLU, ELU) becomes one fused BatchNorm, and an
    activation directly followed by Dropout becomes one ``ActivationDropout``; the emptied slot
    becomes ``nn.Identity``.  Activations and Dropout are replaced only when fused.  A pair is
    kept apart when either module has hooks, when an activation and its Dropout have different
    training flags, or when an in-place activation's input could be seen outside the pair.
    state_dict keys do not change.  What changed, and each pair kept apart, is logged on the
    ``tkern`` logger (INFO) and kept as ``model.tkern_report``.
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
