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


def test_resnet_basic_block_matches_without_fusion(device):
    original = BasicBlock(3, 6).to(device)
    converted = tkern.convert(copy.deepcopy(original))
    assert isinstance(converted.bn1, tkern.nn.BatchNorm2d) and converted.bn1.activation is None
    assert isinstance(converted.relu, tkern.nn.ActivationDropout) and converted.relu.p == 0.0
    assert isinstance(converted.downsample[1], tkern.nn.BatchNorm2d)
    assert not any("fused" in line for line in converted.tkern_report)
    _compare(original, converted, torch.randn(2, 3, 7, 7, device=device))


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
    assert kinds == ["BatchNorm1d", "ActivationDropout", "Linear", "ActivationDropout", "Identity",
                     "BatchNorm1d", "Identity", "ActivationDropout", "ActivationDropout", "Linear"]
    assert converted[0].activation is None and converted[1].activation == "identity"
    assert (converted[3].activation, converted[3].p, converted[3].approximate) == ("gelu", 0.2, "tanh")
    assert (converted[5].activation, converted[5].negative_slope) == ("leaky_relu", 0.2)
    assert converted[7].activation == "identity" and converted[7].p == 0.3
    assert converted[8].activation == "silu" and converted[8].p == 0.0
    assert sum("fused" in line for line in converted.tkern_report) == 2


def test_no_fusion_when_disabled():
    converted = tkern.convert(nn.Sequential(nn.BatchNorm1d(3), nn.ReLU()), fuse=False)
    assert converted[0].activation is None and converted[1].activation == "relu"


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
    assert type(m[0]) is MyBN and isinstance(m[1], tkern.nn.ActivationDropout)


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
