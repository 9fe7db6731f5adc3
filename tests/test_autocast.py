"""Under torch.autocast, tkern layers take low-precision activations with fp32 parameters and
return the activation's dtype, as torch's BatchNorm does."""

import pytest
import torch
from torch import nn

import tkern
from tkern.testing import assert_close_rule


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_cnn(device, dtype):
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.LocalResponseNorm(3),
                        nn.Flatten(), nn.Linear(6 * 5 * 5, 8), nn.GELU(), nn.Dropout(0.0),
                        nn.Linear(8, 4), nn.BatchNorm1d(4)).to(device)
    import copy

    model = tkern.convert(copy.deepcopy(ref))
    x = torch.randn(4, 3, 7, 7, device=device)
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = (inputs[0].dtype, output.dtype)
        return hook

    for name, m in model.named_modules():
        if isinstance(m, (tkern.nn.BatchNorm2d, tkern.nn.BatchNorm1d, tkern.nn.LocalResponseNorm,
                          tkern.nn.ActivationDropout)):
            m.register_forward_hook(record(name))
    with torch.autocast(device.type, dtype=dtype):
        y = model(x)
        y_ref = ref(x)
    assert y.dtype == y_ref.dtype
    for name, (dtype_in, dtype_out) in seen.items():
        assert dtype_in == dtype_out == dtype, (name, dtype_in, dtype_out)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.weight.dtype == m.running_mean.dtype == torch.float32
    ref64 = copy.deepcopy(ref).double()  # the float64 reference, without autocast
    y64 = ref64(x.double())
    assert_close_rule(y, y_ref, y64)
    y.float().sum().backward()
    y_ref.float().sum().backward()
    y64.sum().backward()
    for (n, p), (_, q), (_, r) in zip(model.named_parameters(), ref.named_parameters(),
                                      ref64.named_parameters()):
        assert p.grad is not None and p.grad.dtype == torch.float32, n
        assert_close_rule(p.grad, q.grad, r.grad, name=n)
