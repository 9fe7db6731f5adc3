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
import operator
import types

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import nn as tnn
from .activations import ACTIVATIONS, PARAM_DEFAULTS as _PARAM_DEFAULTS

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


# ---- fusion through torch.fx graphs -----------------------------------------------------------
# Functional activations: (table name, the parameters after the input, in positional order).
_FUNCTIONS = {
    F.relu: ("relu", ("inplace",)), torch.relu: ("relu", ()), torch.relu_: ("relu", ()),
    F.relu6: ("relu6", ("inplace",)), F.leaky_relu: ("leaky_relu", ("negative_slope", "inplace")),
    F.elu: ("elu", ("alpha", "inplace")), F.gelu: ("gelu", ("approximate",)),
    F.silu: ("silu", ("inplace",)), F.sigmoid: ("sigmoid", ()), torch.sigmoid: ("sigmoid", ()),
    F.tanh: ("tanh", ()), torch.tanh: ("tanh", ()),
    F.hardtanh: ("hardtanh", ("min_val", "max_val", "inplace")),
    F.hardswish: ("hardswish", ("inplace",)), F.hardsigmoid: ("hardsigmoid", ("inplace",)),
    F.mish: ("mish", ("inplace",)), F.softplus: ("softplus", ("beta", "threshold")),
}
_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
            "tanh": "tanh", "tanh_": "tanh"}
_ADDS = (operator.add, operator.iadd, torch.add)
_ACT_PARAMS = ("negative_slope", "alpha", "approximate", "min_val", "max_val", "beta", "threshold")


def _transparent(m: nn.Module) -> bool:
    """An nn.Sequential that only chains its slots: traced through, its slots called directly."""
    return (isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward
            and not _hooked(m))


class _Tracer(fx.Tracer):
    """Traces one module's forward; submodules are leaves, except plain nn.Sequentials."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return not _transparent(m)


class _Graph:
    """One traced forward: its graph and the modules its call_module nodes name."""

    def __init__(self, root: nn.Module, graph: fx.Graph):
        self.root, self.graph = root, graph
        self.calls: dict[str, int] = {}
        for n in graph.nodes:
            if n.op == "call_module":
                self.calls[n.target] = self.calls.get(n.target, 0) + 1

    def module(self, node) -> nn.Module | None:
        if isinstance(node, fx.Node) and node.op == "call_module":
            return self.root.get_submodule(node.target)
        return None

    def activation(self, node) -> dict | None:
        """``{"activation": name, parameters...}`` when node applies an activation from the table
        to its first argument with constant parameters, or None."""
        if not isinstance(node, fx.Node):
            return None
        m = self.module(node)
        if m is not None:
            if type(m) not in _ACTIVATION_NAMES or len(node.args) != 1 or node.kwargs:
                return None
            return dict(activation=_ACTIVATION_NAMES[type(m)],
                        **{k: getattr(m, k) for k in _ACT_PARAMS if hasattr(m, k)})
        if node.op == "call_method" and node.target in _METHODS:
            ok = len(node.args) == 1 and not node.kwargs
            return dict(activation=_METHODS[node.target]) if ok else None
        if node.op != "call_function" or node.target not in _FUNCTIONS or not node.args:
            return None
        name, names = _FUNCTIONS[node.target]
        if len(node.args) - 1 > len(names) or any(k not in names for k in node.kwargs):
            return None
        params = dict(zip(names, node.args[1:]), **node.kwargs)
        if any(isinstance(v, fx.Node) for v in params.values()):
            return None  # a traced value: not a constant the module can keep
        params.pop("inplace", None)  # after BatchNorm the input is fresh: in place or not, same
        return dict(activation=name, **params)

    def batch_norm(self, node) -> nn.Module | None:
        """The tkern BatchNorm node calls, if it has no fused activation yet."""
        m = self.module(node)
        if isinstance(m, tuple(_BATCH_NORMS.values())) and m.activation is None:
            return m
        return None


def _fusable_bn(g: _Graph, bn_node, users_expected: int = 1) -> str | None:
    """Why the BatchNorm call bn_node cannot take a fused epilogue, or None."""
    m = g.module(bn_node)
    if _hooked(m):
        return "hooks"
    if g.calls[bn_node.target] != 1 or len(bn_node.args) != 1 or bn_node.kwargs:
        return "the BatchNorm module is called at several places"
    if len(bn_node.users) != users_expected:
        return "the BatchNorm's output is used elsewhere"
    return None


def _act_hooked(g: _Graph, act_node) -> str | None:
    m = g.module(act_node)
    return "hooks" if m is not None and _hooked(m) else None


def _residual_pattern(g: _Graph, add):
    """(bn node, residual node) when ``add`` adds a BatchNorm call's output to another tensor."""
    if add.op == "call_function" and add.target in _ADDS and len(add.args) == 2 and not add.kwargs:
        pass
    elif add.op == "call_method" and add.target in ("add", "add_") and len(add.args) == 2 \
            and not add.kwargs:
        pass
    else:
        return None
    a, b = add.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    in_place = add.op == "call_method" and add.target == "add_"
    for bn, r in ((a, b), (b, a)):
        if g.batch_norm(bn) is not None and bn is not r:
            if in_place and bn is not a:
                continue  # r.add_(bn(x)) writes into r, which others may hold
            return bn, r
    return None


def _set_activation(bn: nn.Module, act: dict) -> None:
    for k in _ACT_PARAMS:
        setattr(bn, k, _PARAM_DEFAULTS.get(k, "none"))  # approximate: "none"
    for k, v in act.items():
        setattr(bn, k, v)


def _fuse_graph(g: _Graph, prefix: str, report: list[str]) -> bool:
    """Fuse BatchNorm -> activation and BatchNorm -> + residual -> activation in g; whether the
    graph changed."""
    changed = False
    where = f"{type(g.root).__name__}.forward"
    for act_node in list(g.graph.nodes):
        act = g.activation(act_node)
        if act is None:
            continue
        src = act_node.args[0]
        act_desc = act_node.target if act_node.op != "call_function" else \
            getattr(act_node.target, "__name__", str(act_node.target))
        bn_mod = g.batch_norm(src)
        if bn_mod is not None:  # BatchNorm -> activation
            why = _fusable_bn(g, src) or _act_hooked(g, act_node)
            if why:
                report.append(f"kept {prefix}{src.target} and {act_desc} apart in {where}: {why}")
                continue
            _set_activation(bn_mod, act)
            act_node.replace_all_uses_with(src)
            g.graph.erase_node(act_node)
            report.append(f"fused {act_desc} ({act['activation']}) into {prefix}{src.target} "
                          f"({type(bn_mod).__name__}) in {where}")
            changed = True
            continue
        pair = _residual_pattern(g, src) if isinstance(src, fx.Node) else None
        if pair is None:
            continue
        bn_node, r = pair
        bn_mod = g.module(bn_node)
        why = (_fusable_bn(g, bn_node) or _act_hooked(g, act_node)
               or ("the sum is used elsewhere" if len(src.users) != 1 else None))
        if why:
            report.append(f"kept {prefix}{bn_node.target}, + and {act_desc} apart in {where}: {why}")
            continue
        _set_activation(bn_mod, act)
        src.prepend(bn_node)  # after the residual is computed (it may come later in forward)
        bn_node.kwargs = {"residual": r}
        act_node.replace_all_uses_with(bn_node)
        g.graph.erase_node(act_node)
        g.graph.erase_node(src)
        report.append(f"fused + residual and {act_desc} ({act['activation']}) into "
                      f"{prefix}{bn_node.target} ({type(bn_mod).__name__}) in {where}")
        changed = True
    return changed


def _trace(module: nn.Module):
    """module's forward graph, or the reason it cannot be used."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        codes = []
        for mode in (True, False):  # a forward that branches on self.training would be frozen
            for m, _ in flags:
                m.training = mode
            graph = _Tracer().trace(module)
            codes.append(graph.python_code("self").src)
    except Exception as e:  # fx raises many types (TraceError, TypeError, ...) on dynamic code
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, f"{type(e).__name__}: {reason}"
    finally:
        for m, t in flags:
            m.training = t
    if codes[0] != codes[1]:
        return None, "its forward depends on the training flag"
    return graph, None


def _install_forward(module: nn.Module, graph: fx.Graph) -> None:
    """Make graph module's forward, on the instance: its class, attributes and methods stay."""
    graph.lint()
    code = graph.python_code("self")
    fn = fx.graph_module._forward_from_src(code.src, code.globals)
    module.forward = types.MethodType(fn, module)
    module._tkern_forward_source = code.src  # what runs, for the curious


def _fuse_traced(model: nn.Module, report: list[str]) -> None:
    """Trace each module holding an unfused tkern BatchNorm (nn.Sequentials inside it are traced
    through) and fuse in its graph; a module that cannot be traced keeps its forward."""
    bns = tuple(_BATCH_NORMS.values())
    for name, m in list(model.named_modules()):
        if isinstance(m, bns) or type(m).__module__.startswith(("torch.nn.", "tkern.")) and \
                not isinstance(m, nn.Sequential):
            continue  # leaves of torch and tkern: nothing of the user's to rewrite
        if _transparent(m) and name:
            continue  # traced as part of the module that holds it
        if "forward" in m.__dict__:
            continue  # already rewritten (or replaced by the user): tracing would miss it
        if not any(isinstance(c, bns) and c.activation is None for c in m.modules()):
            continue
        prefix = f"{name}." if name else ""
        graph, why = _trace(m)
        if graph is None:
            report.append(f"could not trace {name or '(root)'} ({type(m).__name__}): {why}; "
                          "only its nn.Sequential neighbours are fused")
            continue
        if _fuse_graph(_Graph(m, graph), prefix, report):
            _install_forward(m, graph)


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
    module of the table becomes one fused BatchNorm, and an
    activation directly followed by Dropout becomes one ``ActivationDropout``; the emptied slot
    becomes ``nn.Identity``.  Activations and Dropout are replaced only when fused.  A pair is
    kept apart when either module has hooks, when an activation and its Dropout have different
    training flags, or when an in-place activation's input could be seen outside the pair.
    Then each module holding an unfused BatchNorm is traced with torch.fx and BatchNorm ->
    activation (module, function or method) and BatchNorm -> + residual -> activation are fused
    in its graph, which replaces that module's forward on the instance (see the README).
    state_dict keys do not change.  What changed, and each pair kept apart, is logged on the
    ``tkern`` logger (INFO) and kept as ``model.tkern_report``.
    """
    report: list[str] = []
    root = _swap(model)
    if root is not None:
        report.append(f"(root): {type(model).__name__} -> tkern.nn.{type(root).__name__}")
        model = root
    _convert(model, "", fuse, report)
    if fuse:
        _fuse_traced(model, report)
    for line in report:
        log.info("tkern.convert: %s", line)
    model.tkern_report = report
    return model
