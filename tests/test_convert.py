"""tkern.convert: converted models match the originals; fusion only where it is safe."""

import copy

import pytest
import torch
from torch import nn

import tkern


def toy_alexnet(p=0.5):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.LocalResponseNorm(5, alpha=1e-2), nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(12 * 4 * 4, 32), nn.ReLU(), nn.Dropout(p), nn.Linear(32, 10),
    )


class BasicBlock(nn.Module):
    """ResNet's basic block: BN and ReLU are attributes, not Sequential neighbours."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


def _compare(original, converted, x, steps=2):
    """Train steps then eval: outputs, parameter grads and buffers match."""
    for mode in ["train"] * steps + ["eval"]:
        original.train(mode == "train")
        converted.train(mode == "train")
        xo, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yc = original(xo), converted(xc)
        torch.testing.assert_close(yc, yo, rtol=1e-4, atol=1e-4)
        g = torch.randn_like(yo)
        yo.backward(g)
        yc.backward(g)
        torch.testing.assert_close(xc.grad, xo.grad, rtol=1e-4, atol=1e-4)
        for (n, po), (_, pc) in zip(original.named_parameters(), converted.named_parameters()):
            torch.testing.assert_close(pc.grad, po.grad, rtol=1e-4, atol=1e-4, msg=n)
            po.grad = pc.grad = None
        for (n, bo), (_, bc) in zip(original.named_buffers(), converted.named_buffers()):
            torch.testing.assert_close(bc, bo, rtol=1e-5, atol=1e-6, msg=n)


def test_toy_alexnet_matches(device):
    original = toy_alexnet(p=0.0).to(device)  # p=0: train-mode outputs comparable
    converted = tkern.convert(copy.deepcopy(original))
    assert isinstance(converted[5], tkern.nn.BatchNorm2d) and converted[5].activation == "relu"
    assert isinstance(converted[6], nn.Identity)
    assert isinstance(converted[2], tkern.nn.LocalResponseNorm)
    assert isinstance(converted[10], tkern.nn.ActivationDropout) and converted[10].activation == "relu"
    assert isinstance(converted[11], nn.Identity)
    _compare(original, converted, torch.randn(4, 3, 16, 16, device=device))


def test_dropout_still_drops_after_conversion(device):
    converted = tkern.convert(toy_alexnet(p=0.5).to(device))
    head = converted[10]
    assert head.p == 0.5
    h = torch.randn(64, 32, device=device) + 3.0  # relu keeps nearly all
    out = head.train()(h)
    frac = (out == 0).float().mean().item()
    assert 0.4 < frac < 0.6
    assert torch.equal(head.eval()(h), torch.relu(h))


def test_resnet_basic_block_fuses_through_its_graph(device):
    original = BasicBlock(3, 6).to(device)
    keys = list(original.state_dict())
    converted = tkern.convert(copy.deepcopy(original))
    assert type(converted) is BasicBlock and list(converted.state_dict()) == keys
    assert isinstance(converted.bn1, tkern.nn.BatchNorm2d) and converted.bn1.activation == "relu"
    assert converted.bn2.activation == "relu"  # act(bn2(x) + downsample(x)), one op
    assert converted.downsample[1].activation is None  # the residual
    assert type(converted.relu) is nn.ReLU  # still there (state-free), no longer called
    assert sum("fused" in line for line in converted.tkern_report) == 2
    _compare(original, converted, torch.randn(2, 3, 7, 7, device=device))
    again = copy.deepcopy(converted)  # the rewritten forward is bound to the copy
    torch.testing.assert_close(again.eval()(torch.ones(1, 3, 5, 5, device=device)),
                               converted.eval()(torch.ones(1, 3, 5, 5, device=device)))


class _Functional(nn.Module):
    """Activations as functions and methods, in place or not, and an intermediate used twice."""

    def __init__(self):
        super().__init__()
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm1d(4), nn.BatchNorm1d(4), nn.BatchNorm1d(4)
        self.bn4, self.bn5 = nn.BatchNorm1d(4), nn.BatchNorm1d(4)

    def forward(self, x):
        a = torch.nn.functional.relu(self.bn1(x), inplace=True)
        b = self.bn2(a).relu()
        c = torch.nn.functional.hardtanh(self.bn3(b), -0.5, 0.75)
        d = self.bn4(c)
        e = torch.nn.functional.silu(d) + d  # d is used elsewhere: kept apart
        return torch.nn.functional.softplus(x + self.bn5(e), beta=2.0)  # residual first


def test_functional_and_method_activations_fuse(device):
    original = _Functional().to(device).double()
    model = tkern.convert(copy.deepcopy(original))
    acts = [model.bn1.activation, model.bn2.activation, model.bn3.activation,
            model.bn4.activation, model.bn5.activation]
    assert acts == ["relu", "relu", "hardtanh", None, "softplus"]
    assert (model.bn3.min_val, model.bn3.max_val, model.bn5.beta) == (-0.5, 0.75, 2.0)
    assert any(line.startswith("kept bn4") and "used elsewhere" in line
               for line in model.tkern_report)
    _compare(original, model, torch.randn(6, 4, device=device, dtype=torch.float64))


class _Dynamic(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(2, 3, 1), nn.BatchNorm1d(3), nn.ReLU())
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        y = self.bn(self.body(x))
        if y.sum() > 0:  # data-dependent: fx cannot trace this
            return torch.relu(y)
        return torch.relu(-y)


class _TrainingBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        if self.training:
            return torch.relu(self.bn(x))
        return torch.sigmoid(self.bn(x))


def test_untraceable_forwards_keep_their_sequential_fusion():
    model = tkern.convert(_Dynamic())
    assert model.body[1].activation == "relu" and model.bn.activation is None
    assert any(line.startswith("could not trace (root) (_Dynamic)") for line in model.tkern_report)
    assert "forward" not in model.__dict__
    model = tkern.convert(_TrainingBranch())
    assert model.bn.activation is None
    assert any("depends on the training flag" in line for line in model.tkern_report)
    x = torch.randn(4, 3)
    torch.testing.assert_close(model.eval()(x), torch.sigmoid(model.bn(x)))


def test_hooks_keep_graph_patterns_apart():
    block = BasicBlock(3, 4)
    seen = []
    block.bn1.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    model = tkern.convert(block)
    assert model.bn1.activation is None and model.bn2.activation == "relu"
    assert any(line.startswith("kept bn1") and "hooks" in line for line in model.tkern_report)
    model(torch.randn(2, 3, 5, 5))
    assert len(seen) == 1 and (seen[0] < 0).any()  # the hook saw BatchNorm's own output


def test_batchnorm_called_twice_is_kept_apart():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            return torch.relu(self.bn(x)) + torch.tanh(self.bn(x * 2))

    model = tkern.convert(Twice())
    assert model.bn.activation is None
    assert sum("called at several places" in line for line in model.tkern_report) == 2


def test_residual_with_broadcast_or_other_dtype_matches():
    bn = tkern.nn.BatchNorm2d(3).double()
    ref = nn.BatchNorm2d(3).double()
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    for r in (torch.randn(1, 3, 1, 5, dtype=torch.float64), torch.randn(2, 3, 4, 5)):
        bn.activation = "relu"
        torch.testing.assert_close(bn(x, residual=r), torch.relu(ref(x) + r))


def test_fusion_only_where_it_should():
    model = nn.Sequential(
        nn.BatchNorm1d(4), nn.Dropout(0.1),  # BN then dropout: no activation to fuse
        nn.Linear(4, 4), nn.GELU(approximate="tanh"), nn.Dropout(0.2),  # act + dropout: fused
        nn.BatchNorm1d(4), nn.LeakyReLU(0.2), nn.Dropout(0.3),  # BN+act fused; dropout stays
        nn.SiLU(), nn.Linear(4, 2),  # act then Linear: nothing to fuse
    )
    keys = list(model.state_dict())
    converted = tkern.convert(model)
    assert list(converted.state_dict()) == keys
    kinds = [type(m).__name__ for m in converted]
    assert kinds == ["BatchNorm1d", "Dropout", "Linear", "ActivationDropout", "Identity",
                     "BatchNorm1d", "Identity", "Dropout", "SiLU", "Linear"]
    assert converted[0].activation is None
    assert (converted[3].activation, converted[3].p, converted[3].approximate) == ("gelu", 0.2, "tanh")
    assert (converted[5].activation, converted[5].negative_slope) == ("leaky_relu", 0.2)
    assert sum("fused" in line for line in converted.tkern_report) == 2


def test_no_fusion_when_disabled():
    converted = tkern.convert(nn.Sequential(nn.BatchNorm1d(3), nn.ReLU()), fuse=False)
    assert converted[0].activation is None and type(converted[1]) is nn.ReLU


def test_checkpoints_interchange():
    original = toy_alexnet()
    converted = tkern.convert(toy_alexnet())
    converted.load_state_dict(original.state_dict())  # torch checkpoint into tkern
    fresh = toy_alexnet()
    fresh.load_state_dict(converted.state_dict())  # and back
    for (k, a), (_, b) in zip(original.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k


def test_parameters_are_the_same_objects():
    model = toy_alexnet()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    converted = tkern.convert(model)
    assert all(a is b for a, b in zip(params, converted.parameters()))
    assert opt.param_groups[0]["params"][0] is next(converted.parameters())


def test_root_module_and_user_subclasses():
    bn = tkern.convert(nn.BatchNorm2d(3))
    assert isinstance(bn, tkern.nn.BatchNorm2d)

    class MyBN(nn.BatchNorm2d):  # a subclass may change forward: left alone
        pass

    m = tkern.convert(nn.Sequential(MyBN(3), nn.ReLU()))
    assert type(m[0]) is MyBN and type(m[1]) is nn.ReLU


def test_example_training_script_runs(device):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "examples" / "train_alexnet.py"
    spec = importlib.util.spec_from_file_location("train_alexnet", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = ["--steps", "2", "--batch", "2", "--image", "67", "--width", "4", "--hidden", "16", "--classes", "5"]
    results = example.main(args)
    for losses, ms, _ in results.values():
        assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))) and ms > 0


def _drop_fraction(module, x):
    return (module(x) == 0).float().mean().item()


def test_activation_and_dropout_with_different_training_flags_stay_apart():
    x = torch.randn(64, 32) + 3.0  # relu keeps nearly all: zeros come from dropout
    for eval_slot in (0, 1):
        model = nn.Sequential(nn.ReLU(), nn.Dropout(0.5))
        model[eval_slot].eval()
        torch_frac = _drop_fraction(model, x)
        converted = tkern.convert(model)
        assert abs(_drop_fraction(converted, x) - torch_frac) < 0.1, eval_slot
        assert [type(m) for m in converted] == [nn.ReLU, nn.Dropout]
        assert any("apart: training flags differ" in line for line in converted.tkern_report)
    both = tkern.convert(nn.Sequential(nn.ReLU(), nn.Dropout(0.5)).eval())
    assert isinstance(both[0], tkern.nn.ActivationDropout) and not both[0].training
    assert torch.equal(both(x), torch.relu(x))


@pytest.mark.parametrize("bn_training", [True, False])
def test_batchnorm_fuses_whatever_the_activation_flag(bn_training):
    # The activation's flag changes nothing in torch, so BN + act fuse and follow BN's flag.
    original = nn.Sequential(nn.BatchNorm1d(5), nn.ReLU())
    original[0].train(bn_training)
    original[1].train(not bn_training)
    original[0].running_mean.uniform_(-1, 1)
    converted = tkern.convert(copy.deepcopy(original))
    assert converted[0].activation == "relu" and converted[0].training == bn_training
    xo = torch.randn(8, 5, requires_grad=True)
    xc = xo.detach().clone().requires_grad_()
    yo, yc = original(xo), converted(xc)
    torch.testing.assert_close(yc, yo, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(yo)
    yo.backward(g)
    yc.backward(g)
    torch.testing.assert_close(xc.grad, xo.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(converted[0].running_mean, original[0].running_mean)


def test_hooked_modules_are_not_fused_and_hooks_keep_firing():
    seen = []
    model = nn.Sequential(nn.BatchNorm1d(4), nn.ReLU(),  # hook on BN: must see BN's own output
                          nn.Linear(4, 4), nn.ReLU(), nn.Dropout(0.0),  # hook on the Dropout
                          nn.Linear(4, 4), nn.GELU(), nn.Dropout(0.0))  # hook on the GELU
    model[0].register_forward_hook(lambda m, i, o: seen.append(("bn", o.min().item() < 0)))
    model[4].register_forward_pre_hook(lambda m, i: seen.append(("dropout", None)))
    model[6].register_full_backward_hook(lambda m, gi, go: seen.append(("gelu", None)))
    converted = tkern.convert(model)
    converted(torch.randn(6, 4, requires_grad=True)).sum().backward()
    assert seen == [("bn", True), ("dropout", None), ("gelu", None)]
    assert isinstance(converted[0], tkern.nn.BatchNorm1d) and converted[0].activation is None
    assert [type(m) for m in converted][1:] == [nn.ReLU, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear,
                                               nn.GELU, nn.Dropout]
    assert sum("apart: hooks" in line for line in converted.tkern_report) == 3
    assert not any("fused" in line for line in converted.tkern_report)


def test_converted_batchnorm_keeps_every_kind_of_hook():
    seen = []
    bn = nn.BatchNorm2d(3)
    handle = bn.register_forward_pre_hook(lambda m, i: seen.append("pre"))
    bn.register_forward_hook(lambda m, i, o: seen.append("forward"))
    bn.register_full_backward_hook(lambda m, gi, go: seen.append("backward"))
    bn.register_state_dict_post_hook(lambda m, sd, prefix, local: seen.append("state_dict"))
    model = tkern.convert(nn.Sequential(nn.Conv2d(3, 3, 1), bn))
    assert isinstance(model[1], tkern.nn.BatchNorm2d)
    model(torch.randn(2, 3, 4, 4)).sum().backward()
    model.state_dict()
    assert seen == ["pre", "forward", "backward", "state_dict"]
    handle.remove()  # the handle still reaches the converted module's hooks
    seen.clear()
    model(torch.randn(2, 3, 4, 4))
    assert seen == ["forward"]


class InplaceResidual(nn.Module):
    """Relies on ReLU(inplace=True) overwriting its input: idt aliases h."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        h = self.lin(x)
        idt = h
        out = self.drop(self.relu(h))
        return out + idt


def test_standalone_activations_and_dropout_are_kept():
    original = InplaceResidual()
    with torch.no_grad():  # h = x: negatives certain, so the aliasing shows
        nn.init.eye_(original.lin.weight)
        original.lin.bias.zero_()
    converted = tkern.convert(copy.deepcopy(original))
    x = torch.randn(3, 4)
    assert (x < 0).any()
    torch.testing.assert_close(converted(x), original(x))
    assert type(converted.relu) is nn.ReLU and type(converted.drop) is nn.Dropout
    assert converted.tkern_report == []
    root = tkern.convert(nn.ReLU())
    assert type(root) is nn.ReLU and root.tkern_report == []


def test_inplace_activation_fused_only_where_unobservable():
    x = torch.randn(4, 6)
    # First slot: torch overwrites the caller's tensor, so the pair stays torch's.
    first = tkern.convert(nn.Sequential(nn.ReLU(inplace=True), nn.Dropout(0.0)))
    xi = x.clone()
    first(xi)
    assert torch.equal(xi, torch.relu(x))
    assert type(first[0]) is nn.ReLU and "in-place" in first.tkern_report[0]
    # After a view-returning layer the same holds (Flatten's output aliases its input).
    view = tkern.convert(nn.Sequential(nn.Linear(6, 6), nn.Flatten(), nn.ReLU(inplace=True),
                                       nn.Dropout()))
    assert type(view[2]) is nn.ReLU
    # After Linear the overwritten value is the Linear's own output: fused.
    lin = tkern.convert(nn.Sequential(nn.Linear(6, 6), nn.ReLU(inplace=True), nn.Dropout(0.0)))
    assert isinstance(lin[1], tkern.nn.ActivationDropout) and isinstance(lin[2], nn.Identity)


def test_inplace_activation_fused_into_batchnorm_matches():
    original = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                             nn.Conv2d(4, 2, 1))
    converted = tkern.convert(copy.deepcopy(original))
    assert converted[1].activation == "relu" and isinstance(converted[2], nn.Identity)
    _compare(original, converted, torch.randn(2, 3, 6, 6))


def test_sequential_subclass_with_own_forward_is_not_fused():
    class Residual(nn.Sequential):
        def forward(self, x):  # the slots do not feed each other
            return self[0](x) + self[1](x)

    original = Residual(nn.BatchNorm1d(3), nn.ReLU())
    model = tkern.convert(copy.deepcopy(original))
    x = torch.randn(5, 3)
    torch.testing.assert_close(model(x), original(x), rtol=1e-4, atol=1e-4)
    assert model[0].activation is None and type(model[1]) is nn.ReLU
    assert model.tkern_report == ["0: BatchNorm1d -> tkern.nn.BatchNorm1d"]


def test_report_lists_each_change():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.LocalResponseNorm(3),
                          nn.Flatten(), nn.Linear(4, 4), nn.GELU(), nn.Dropout(0.1), nn.Tanh())
    converted = tkern.convert(model)
    assert converted.tkern_report == [
        "1: BatchNorm2d -> tkern.nn.BatchNorm2d",
        "3: LocalResponseNorm -> tkern.nn.LocalResponseNorm",
        "fused 2 (relu) into 1 (BatchNorm2d)",
        "fused 7 (dropout p=0.1) into 6 (GELU -> tkern.nn.ActivationDropout)",
    ]
