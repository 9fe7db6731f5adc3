"""The shared numeric helpers of tkern/ops/_math.py."""

import pytest
import torch
import triton
import triton.language as tl

import tkern

from tkern.ops._math import cast_rn


@triton.jit
def _cast_kernel(X, Y, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    tl.store(Y + o, cast_rn(tl.load(X + o, mask=m), Y.dtype.element_ty), mask=m)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_rn_rounds_to_nearest_even_as_torch(device, dtype):
    """Every store's cast rounds as torch (and a GPU) does: random fp32 bit patterns (subnormals,
    NaNs, infs included), ties, and values just past the narrow type's range.  Triton's
    interpreter truncates fp32 -> bf16 and mangles subnormals; cast_rn must not."""
    g = torch.Generator().manual_seed(3)
    bits = torch.randint(-2**31, 2**31 - 1, (1 << 14,), generator=g, dtype=torch.int64)
    ties = [1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 1.0 + 2**-11, 1.0 + 3 * 2**-11]
    specials = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 3.3961e38, 3.4e38, 1e-40,
                -1e-40, 1e-45, 65504.0, 65520.0, 65519.0, 6e-8, 3e-8, 1e-8] + ties
    x = torch.cat([bits.to(torch.int32).view(torch.float32), torch.tensor(specials),
                   torch.randn(1000, generator=g)]).to(device)
    y = torch.empty_like(x, dtype=dtype)
    _cast_kernel[(triton.cdiv(x.numel(), 4096),)](x, y, x.numel(), BLOCK=4096)
    ref = x.to(dtype)
    same = (y.view(torch.int16) == ref.view(torch.int16)) | (y.isnan() & ref.isnan())
    assert bool(same.all()), f"{int((~same).sum())} of {x.numel()} differ from torch's rounding"


def _run(fn, x, dy, *params):
    x = x.detach().requires_grad_()
    params = [p.detach().requires_grad_() if isinstance(p, torch.Tensor) and p.is_floating_point()
              else p for p in params]
    torch.manual_seed(11)  # the same dropout mask for both dtypes
    y = fn(x, *params)
    y.backward(dy)
    return [y.detach(), x.grad] + [p.grad for p in params if isinstance(p, torch.Tensor)
                                   and p.grad is not None]


_BN_W = dict(weight=torch.rand(5) + 0.5, bias=torch.randn(5))


@pytest.mark.parametrize("op", ["batch_norm_train", "batch_norm_eval", "activation_dropout",
                                "activation_dropout_bias"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_outputs_are_the_fp32_results_rounded(device, op, dtype):
    """Kernels compute fp16/bf16 inputs in fp32 and round once at the store, so on inputs that are
    exact in the narrow type, its outputs and gradients must equal the fp32 kernels' results
    rounded to nearest even by torch (as a GPU stores them).  LRN and weight norm have theirs in
    their own test files.  Before the shared cast_rn, the interpreter's truncation made half the
    bf16 elements differ."""
    x = (torch.randn(4, 5, 6, 7, device=device) * 2).to(dtype)
    dy = torch.randn(4, 5, 6, 7, device=device).to(dtype)
    w, b = (t.to(device) for t in _BN_W.values())
    rm, rv = torch.randn(5, device=device), torch.rand(5, device=device) + 0.5
    if op == "batch_norm_train":
        def fn(a, w_, b_):
            return tkern.batch_norm(a, None, None, w_, b_, training=True, activation="silu")
        params = (w, b)
    elif op == "batch_norm_eval":
        def fn(a, w_, b_):
            return tkern.batch_norm(a, rm, rv, w_, b_, training=False, activation="gelu")
        params = (w, b)
    elif op == "activation_dropout":
        def fn(a):
            return tkern.activation_dropout(a, "gelu", 0.3)
        params = ()
    else:
        def fn(a, b_):
            return tkern.activation_dropout(a, "elu", 0.2, bias=b_)
        params = (torch.randn(7, device=device).to(dtype),)
    low = _run(fn, x, dy, *params)
    full = _run(fn, x.float(), dy.float(), *(p.float() for p in params))
    # activation_dropout_bias: dbias is summed in fp32 from dz before dx is rounded, so it too is
    # the fp32 kernel's result rounded
    for i, (a, f) in enumerate(zip(low, full)):
        assert a.dtype in (dtype, torch.float32)
        if a.dtype == torch.float32:  # weight and bias grads of fp32 parameters: the same sums
            assert torch.equal(a, f), i
        else:
            same = a.view(torch.int16) == f.to(dtype).view(torch.int16)
            assert bool(same.all()), f"output {i}: {int((~same).sum())} of {a.numel()} differ"
