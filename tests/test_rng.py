"""Dropout's randomness: where the Philox seed comes from (tkern/ops/_rng.py) and that no op reads
a tensor back to the host on its hot path (a GPU sync, and a value frozen into CUDA graphs)."""

import pytest
import torch

import tkern
from tkern.ops import _rng


class _FakeDeviceGenerator:
    """Stands in for a CUDA generator on machines without one: a seed and a Philox offset."""

    def __init__(self, seed):
        self.seed, self.offset = seed, 0

    def initial_seed(self):
        return self.seed

    def get_offset(self):
        return self.offset

    def set_offset(self, offset):
        assert offset % 4 == 0, "CUDA generators take offsets in multiples of 4"
        self.offset = offset


@pytest.fixture
def fake_cuda(monkeypatch):
    gen = _FakeDeviceGenerator(1234)
    monkeypatch.setattr(_rng, "_default_generator", lambda device: gen)
    monkeypatch.setattr(_rng, "_capturing", lambda device: False)
    return gen


def test_device_seed_advances_the_generators_offset(fake_cuda):
    cuda = torch.device("cuda", 0)
    cpu_state = torch.get_rng_state()
    draws = [_rng.draw(cuda) for _ in range(5)]
    assert all(t is None for t, _ in draws)  # host ints: no kernel, no device tensor
    seeds = [s for _, s in draws]
    assert fake_cuda.offset == 5 * _rng.OFFSET_STEP  # advanced per call, as torch's dropout does
    assert len(set(seeds)) == 5 and all(0 <= s < 2**31 for s in seeds)
    assert torch.equal(torch.get_rng_state(), cpu_state)  # the CPU stream is untouched
    fake_cuda.offset = 0  # what torch.manual_seed does to a CUDA generator
    assert [_rng.draw(cuda)[1] for _ in range(5)] == seeds
    fake_cuda.seed = 99
    fake_cuda.offset = 0
    assert [_rng.draw(cuda)[1] for _ in range(5)] != seeds


def test_capture_and_compile_draw_a_device_tensor(monkeypatch):
    """While capturing (and compiling) the seed is a tensor drawn by torch.randint on the data's
    device, which a replayed graph draws again; here on CPU, where randint runs the same way."""
    monkeypatch.setattr(_rng, "_capturing", lambda device: True)
    torch.manual_seed(3)
    t1, s1 = _rng.draw(torch.device("cpu"))
    t2, _ = _rng.draw(torch.device("cpu"))
    assert s1 == 0 and t1.dtype == torch.int64 and t1.dim() == 0 and not torch.equal(t1, t2)
    torch.manual_seed(3)
    assert torch.equal(_rng.draw(torch.device("cpu"))[0], t1)


def test_int_seed_and_tensor_seed_draw_the_same_mask(device):
    """The kernel's two seed paths (a host int on CUDA, a loaded tensor elsewhere) agree."""
    x = torch.ones(3000, device=device)
    cfg = tkern.ops.activation_dropout.DropoutConfig("identity", 0.5, True, 0.0, 0.0, 777)
    (a,) = tkern.ops.activation_dropout._forward(x, None, None, cfg)
    (b,) = tkern.ops.activation_dropout._forward(x, None, torch.tensor(777, device=device),
                                                 cfg._replace(philox_seed=0))
    assert torch.equal(a, b)
    assert 0.4 < (a == 0).float().mean().item() < 0.6


def _no_host_reads(monkeypatch):
    def refuse(name):
        def fail(self, *a, **k):
            raise AssertionError(f"Tensor.{name} on the hot path")
        return fail
    for name in ("item", "__int__", "__index__", "__float__", "__bool__", "cpu", "tolist",
                 "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run stubs the interpreter")
def test_no_host_reads_on_any_hot_path(monkeypatch):
    """Forward and backward of every op, with kernel bodies skipped (the interpreter itself reads
    tensors as numpy; Triton's launch front end still binds every argument)."""
    from perf.host import skip_kernel_bodies

    x = torch.randn(4, 6, 5, 5, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    bn = tkern.nn.BatchNorm2d(6, activation="relu", momentum=None)
    v = torch.randn(6, 5, requires_grad=True)
    g = torch.rand(6, 1, requires_grad=True)
    calls = [lambda: tkern.activation_dropout(x, "gelu", 0.3, bias=b),
             lambda: tkern.local_response_norm(x, 3), lambda: bn(x),
             lambda: bn.eval()(x), lambda: tkern.weight_norm(v, g, 0)]
    with skip_kernel_bodies() as log:
        _no_host_reads(monkeypatch)
        for call in calls:
            y = call()
            torch.autograd.backward(y, torch.ones_like(y))
    assert log.launches >= 2 * len(calls)
