"""The shared launch helpers in tkern._runtime."""

import math
import struct

import pytest
import torch

import tkern
from tkern import _runtime as rt


def _is_f32(v):
    return math.isnan(v) or struct.unpack("f", struct.pack("f", v))[0] == v


@pytest.mark.parametrize("v", [0.1, 0.2, 1.3, 1e-5, 1 / 3, -2.5e-7, 1.0, 0.0, 123456.789, 1e-30])
def test_split_f32_pairs_are_fp32_and_sum_to_v(v):
    hi, lo = rt.split_f32(v)
    assert _is_f32(hi) and _is_f32(lo)
    assert abs((hi + lo) - v) <= abs(v) * 2.0**-46


@pytest.mark.parametrize("v", [math.inf, -math.inf, 1e300, -1e300])
def test_split_f32_out_of_range(v):
    hi, lo = rt.split_f32(v)
    assert hi == math.copysign(math.inf, v) and lo == 0.0
    hi, lo = rt.split_f32(math.nan)
    assert math.isnan(hi) and lo == 0.0


def test_is_dense():
    x = torch.randn(3, 4, 5)
    assert rt.is_dense(x) and rt.is_dense(x.transpose(0, 2))
    assert rt.is_dense(torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last))
    assert not rt.is_dense(x[:, ::2])
    assert not rt.is_dense(torch.randn(3, 1).expand(3, 4))


def test_check_same_device():
    a = torch.randn(2)
    assert rt.check_same_device(a, None, a) == a.device
    with pytest.raises(RuntimeError, match="same device"):
        rt.check_same_device(a, torch.randn(2, device="meta"))


def test_int64_offset_rule():
    assert rt.needs_int64(torch.empty(2**31 + 3, device="meta"))
    assert not rt.needs_int64(torch.empty(1000))
    # a view whose span, not its element count, passes 2^31
    assert rt.needs_int64(torch.empty(2, device="meta").as_strided((2, 2), (2**31, 1)))


def test_float64_scalars_outside_float32_range_raise_value_error(device):
    """Float scalars travel to kernels as fp32 pairs: for float64 tensors, one the pair cannot
    carry (an eps below ~1e-33, a slope or alpha past fp32's max) raises ValueError naming it
    instead of giving a silently wrong result; in range they are exact, and fp32 tensors (which
    compute with the fp32 value, as torch's do) are unaffected."""
    x = torch.randn(4, 3, 5, device=device, dtype=torch.float64)
    cases = [
        ("eps", lambda t: tkern.batch_norm(t, None, None, training=True, eps=1e-40)),
        ("negative_slope", lambda t: tkern.batch_norm(t, None, None, training=True,
                                                       activation="leaky_relu",
                                                       negative_slope=-1e39)),
        ("alpha", lambda t: tkern.batch_norm(t, None, None, training=True, activation="elu",
                                              alpha=1e39)),
        ("momentum", lambda t: tkern.batch_norm(t, torch.zeros(3, device=device, dtype=t.dtype),
                                                 torch.ones(3, device=device, dtype=t.dtype),
                                                 training=True, momentum=1e-45)),
        ("alpha", lambda t: tkern.activation_dropout(t, "elu", 0.0, alpha=4e38)),
        ("negative_slope", lambda t: tkern.activation_dropout(t, "leaky_relu", 0.0,
                                                               negative_slope=1e-39)),
        ("k", lambda t: tkern.local_response_norm(t, 3, k=1e39)),
        ("bias", lambda t: tkern.local_response_normalization(t, 1, bias=1e-42)),
    ]
    for name, fn in cases:
        with pytest.raises(ValueError, match=name):
            fn(x)
        fn(x.float())  # fp32 takes the fp32 value, as torch's fp32 kernels
    # in range, the float64 kernels use the exact value: 1e-30 is no fp32 number (as an fp32 it
    # is 1e-30 * (1 + 3e-9)), and with var = 1e-30 it moves y by ~1e-9
    c = torch.tensor([1e-15, -1e-15] * 6, device=device, dtype=torch.float64).view(4, 3, 1)
    y = tkern.batch_norm(c, None, None, training=True, eps=1e-30)
    torch.testing.assert_close(y, c / math.sqrt(1e-30 + 1e-30), rtol=1e-12, atol=0)
    # ignored parameters are not checked (relu has no slope)
    tkern.activation_dropout(x, "relu", 0.0, negative_slope=1e39)


def test_fallback_warning_points_at_the_callers_line(monkeypatch):
    """The CPU-fallback RuntimeWarning names the line that called tkern (function or module, at
    whatever depth tkern's code runs), not a line inside tkern or torch."""
    import inspect
    import warnings

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the runtime rule reads it per call
    monkeypatch.setattr(rt, "_warned", set())
    x = torch.randn(4, 3, 5)
    bn = tkern.nn.BatchNorm1d(3, activation="relu")
    calls = [
        lambda: tkern.batch_norm(x, None, None, training=True),
        lambda: bn(x),
        lambda: tkern.nn.BatchNorm1d(3).eval()(x),
        lambda: tkern.activation_dropout(x, "gelu", 0.2),
        lambda: tkern.nn.ActivationDropout("relu", 0.1)(x),
        lambda: tkern.local_response_norm(x, 3),
        lambda: tkern.nn.LocalResponseNorm(2)(x),
        lambda: tkern.local_response_normalization(x, 1),
        lambda: tkern.weight_norm(x, torch.rand(4, 1, 1), 0),
    ]
    for call in calls:
        rt._warned.clear()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            call()
        ours = [w for w in seen if issubclass(w.category, RuntimeWarning) and "tkern." in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in seen]
        lines, first = inspect.getsourcelines(call)
        assert (ours[0].filename, ours[0].lineno) == (__file__, first), (
            f"{ours[0].message} at {ours[0].filename}:{ours[0].lineno}")
