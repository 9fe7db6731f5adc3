"""The shared launch helpers in tkern._runtime."""

import math
import struct

import pytest
import torch

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
