"""torch.library registration: opcheck for every tkern custom op, and fullgraph torch.compile of
converted models (aot_eager on CPU, inductor on GPU)."""

import copy

import pytest
import torch
from torch import nn

import tkern


def _backend(device):
    return "inductor" if device.type == "cuda" else "aot_eager"


def _op(name):
    return getattr(torch.ops.tkern, name).default


def test_lrn_opcheck(device):
    x = torch.randn(2, 5, 3, 2, device=device, requires_grad=True)
    for args in [(x, False, 1, 1, 1e-2, 0.75, 1.0),
                 (x.to(memory_format=torch.channels_last), False, 2, 1, 1e-2, 0.75, 2.0),
                 (x.permute(0, 2, 3, 1), True, 2, 2, 0.5, 0.5, 1.0)]:
        torch.library.opcheck(_op("local_response_norm"), args)
    torch.library.opcheck(_op("local_response_norm_backward"),
                          ([torch.randn_like(x)], [x.detach()], False, 1, 1, 1e-2, 0.75, 1.0,
                           [True]))


def test_weight_norm_opcheck(device):
    v = torch.randn(5, 3, 2, device=device, requires_grad=True)
    for dim, g_shape in [(0, (5, 1, 1)), (2, (1, 1, 2))]:
        g = torch.rand(g_shape, device=device, requires_grad=True)
        torch.library.opcheck(_op("weight_norm"), (v, g, dim))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.LocalResponseNorm(3),
            nn.Flatten(), nn.Linear(6 * 5 * 5, 8), nn.GELU(), nn.Dropout(0.2), nn.Linear(8, 4))
        self.head = nn.utils.parametrizations.weight_norm(nn.Linear(4, 3))

    def forward(self, x):
        return self.head(self.features(x))


def test_fullgraph_compile_of_converted_model(device):
    torch.manual_seed(0)
    model = Net().to(device)
    model.head = tkern.nn.utils.weight_norm(nn.Linear(4, 3)).to(device)
    model = tkern.convert(model)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend=_backend(device))
    x = torch.randn(4, 3, 7, 7, device=device)
    for _ in range(2):  # running stats move: the mutation must be visible after each step
        torch.manual_seed(3)
        y_c = compiled(x)
        y_c.square().sum().backward()
        torch.manual_seed(3)
        y_e = eager(x)
        y_e.square().sum().backward()
        torch.testing.assert_close(y_c, y_e, rtol=1e-4, atol=1e-5)
    for (n, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)
    for (n, b), (_, c) in zip(model.named_buffers(), eager.named_buffers()):
        torch.testing.assert_close(b, c, msg=n)
