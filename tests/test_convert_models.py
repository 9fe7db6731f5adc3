"""tkern.convert on torchvision's models (random weights): every BatchNorm -> activation and
BatchNorm -> + -> activation of the traced graph is fused, and training steps match eager."""

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import tkern

try:
    import torchvision as tv
except Exception as e:  # noqa: BLE001 - absent, or built for another torch (fails on import)
    pytest.skip(f"torchvision is not importable with this torch ({type(e).__name__})",
                allow_module_level=True)

MODELS = ["resnet18", "resnet50", "googlenet", "mobilenet_v2", "mobilenet_v3_large",
          "densenet121", "efficientnet_b0", "regnet_y_400mf", "vgg11_bn"]
# What counts as an activation or an addition when reading a graph (written apart from
# tkern.conversion's matcher, so that the count does not come from the code under test).
_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.LeakyReLU, nn.ELU,
                nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Mish, nn.Softplus)
_ACT_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu6, F.silu, F.hardswish, F.gelu, F.elu,
                  F.leaky_relu, torch.sigmoid, torch.tanh, F.hardtanh, F.hardsigmoid, F.mish,
                  F.softplus}
_ACT_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}


def _build(name):
    torch.manual_seed(0)
    kw = dict(aux_logits=False, init_weights=False) if name == "googlenet" else {}
    model = getattr(tv.models, name)(weights=None, num_classes=10, **kw)
    for m in model.modules():  # comparable training steps: dropout would draw other masks
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


class _LeafTracer(fx.Tracer):
    """torch's leaves plus tkern's modules."""

    def is_leaf_module(self, m, qualname):
        return type(m).__module__.startswith("tkern.") or super().is_leaf_module(m, qualname)


def _patterns(model):
    """From the whole model's traced graph: the unfused BatchNorms whose output feeds an
    activation; for each addition that feeds an activation, the unfused BatchNorms among its
    operands; and the BatchNorm calls that take a residual."""
    graph = _LeafTracer().trace(model)
    mods = dict(model.named_modules())

    def is_act(n):
        if n.op == "call_module":
            return type(mods[n.target]) in _ACT_MODULES
        if n.op == "call_method":
            return n.target in _ACT_METHODS
        return n.op == "call_function" and n.target in _ACT_FUNCTIONS

    def is_add(n):
        return ((n.op == "call_function" and n.target in (operator.add, operator.iadd, torch.add))
                or (n.op == "call_method" and n.target in ("add", "add_")))

    def unfused_bn(n):
        m = mods.get(n.target) if isinstance(n, fx.Node) and n.op == "call_module" else None
        return (isinstance(m, nn.modules.batchnorm._BatchNorm)
                and getattr(m, "activation", None) is None)

    act_bns, add_bns, with_residual = set(), [], set()
    for n in graph.nodes:
        if n.op == "call_module" and "residual" in n.kwargs:
            with_residual.add(n.target)
        if not is_act(n) or not isinstance(n.args[0], fx.Node):
            continue
        src = n.args[0]
        if unfused_bn(src):
            act_bns.add(src.target)
        elif is_add(src):
            bns = {a.target for a in src.args if unfused_bn(a)}
            if bns:
                add_bns.append(bns)
    return act_bns, add_bns, with_residual


@pytest.mark.parametrize("name", MODELS)
def test_every_traced_pattern_is_fused(name):
    model = _build(name)
    act_bns, add_bns, _ = _patterns(model)
    keys = list(model.state_dict())
    cls = type(model)
    converted = tkern.convert(model)
    left_act, left_add, with_residual = _patterns(converted)
    assert type(converted) is cls and list(converted.state_dict()) == keys
    assert act_bns, f"{name}: no BatchNorm -> activation found in the graph"
    assert not left_act and not left_add, f"{name}: unfused {left_act} {left_add}"
    fused = {n for n, m in converted.named_modules()
             if isinstance(m, tkern.nn.BatchNorm2d) and m.activation is not None}
    # each BatchNorm -> activation fused; each add -> activation into one of its BatchNorms
    assert fused == act_bns | with_residual, name
    assert all(len(bns & with_residual) == 1 for bns in add_bns), name
    assert len(with_residual) == len(add_bns), name
    assert not any(line.startswith(("kept", "could not")) for line in converted.tkern_report)


def _step_matches(name, size):
    original = _build(name).double()
    converted = tkern.convert(copy.deepcopy(original))
    # a checkpoint of the torch model loads into the converted one and back
    converted.load_state_dict(original.state_dict())
    original.load_state_dict(converted.state_dict())
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    xo, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo, yc = original(xo), converted(xc)
    dy = torch.randn_like(yo)
    yo.backward(dy)
    yc.backward(dy)

    def close(a, b, what):  # fp64 on both sides: agreement to ~1e-9 of each tensor's scale
        err = (a.double() - b.double()).abs().max().item()
        assert err <= 1e-9 * max(1.0, b.double().abs().max().item()), f"{name} {what}: {err}"

    close(yc, yo, "output")
    close(xc.grad, xo.grad, "input grad")
    for (n, po), pc in zip(original.named_parameters(), converted.parameters()):
        close(pc.grad, po.grad, n)
    for (n, bo), bc in zip(original.named_buffers(), converted.buffers()):
        close(bc, bo, n)
    original.eval()
    converted.eval()
    close(converted(x), original(x), "eval output")


@pytest.mark.parametrize("name", ["resnet18", "googlenet"])
def test_training_step_matches_eager_fp64(name):
    """Outputs, input and parameter gradients, running statistics, then eval: module
    activations used twice and residual adds (resnet18), F.relu(inplace=True) (googlenet)."""
    _step_matches(name, 32)


def test_compiled_converted_resnet50_has_no_graph_break():
    model = tkern.convert(_build("resnet50"))
    x = torch.randn(2, 3, 32, 32)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # raises on a break
    y = compiled(x)
    y.sum().backward()
    ye = eager(x)
    ye.sum().backward()
    torch.testing.assert_close(y, ye, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.conv1.weight.grad, eager.conv1.weight.grad, rtol=1e-4,
                               atol=1e-5)
