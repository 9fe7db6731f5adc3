"""Property-based tests: one per op, tkern against torch on drawn shapes (0 and 1 sizes, primes),
layouts (transposed, sliced, expanded, channels_last), dtypes and parameters.  Outputs, gradients
and running statistics follow the 2x rule (``assert_close_rule``); where torch rejects an input,
tkern must raise an exception of torch's type.

Seeded and small (few examples, tiny tensors: each interpreter launch costs), so the file takes
about a minute on 2 cores; raise FUZZ_EXAMPLES locally for a longer search.
"""

import os

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import tkern  # noqa: E402
from tkern.activations import activation_scalars, eager_activation  # noqa: E402
from tkern.testing import assert_close_rule  # noqa: E402

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
SIZES = st.sampled_from([0, 1, 2, 3, 5, 7])
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])
LAYOUTS = st.sampled_from(["contiguous", "transposed", "sliced", "expanded", "channels_last"])


def _layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """``t``'s values (for "expanded": its first slice repeated) in the layout ``kind``."""
    if t.dim() < 2 or kind == "contiguous":
        return t
    if kind == "transposed":  # dense, with the last two dims swapped in memory
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "sliced":  # every other element of a buffer twice as wide
        buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        buf[..., ::2] = t
        return buf[..., ::2]
    if kind == "expanded":  # stride 0 along the first dim
        return t[:1].expand_as(t)
    if kind == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t


def _raises_like(torch_call, tkern_call):
    """Run torch's call; if it raises, tkern's must raise an exception of that type (and None is
    returned); else torch's result."""
    try:
        result = torch_call()
    except Exception as e:  # torch rejects the input
        with pytest.raises(type(e)):
            tkern_call()
        return None
    return result


def _leaf(t, dtype):
    return None if t is None else t.detach().to(dtype).requires_grad_()


def _grads(out, dy, *leaves):
    leaves = [t for t in leaves if t is not None]
    if out.numel() == 0 or not leaves:
        return [None] * len(leaves)
    return list(torch.autograd.grad(out, leaves, dy.to(out.dtype), allow_unused=True))


# ---------------------------------------------------------------------------------- batch norm


@seed(16001)
@FUZZ
@given(data=st.data())
def test_fuzz_batch_norm(device, data):
    ndim = data.draw(st.integers(2, 4), label="ndim")
    shape = [data.draw(SIZES, label=f"size{i}") for i in range(ndim)]
    dtype = data.draw(DTYPES, label="dtype")
    layout = data.draw(LAYOUTS, label="layout")
    training = data.draw(st.booleans(), label="training")
    stats = data.draw(st.booleans(), label="running stats") or not training
    affine = data.draw(st.sampled_from(["none", "weight", "both"]), label="affine")
    low = dtype in (torch.float16, torch.bfloat16)
    pdtype = torch.float32 if low and data.draw(st.booleans(), label="fp32 params") else dtype
    activation = data.draw(st.sampled_from([None, "relu", "leaky_relu", "gelu", "silu", "elu"]),
                           label="activation")
    momentum = data.draw(st.sampled_from([0.1, 0.5, 1.0]), label="momentum")
    eps = data.draw(st.sampled_from([1e-5, 1e-3, 0.3]), label="eps")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    C = shape[1]
    x64 = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).to(device)
    dy64 = torch.randn(shape, generator=g, dtype=torch.float64).to(device)
    w64 = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(device)
    b64 = torch.randn(C, generator=g, dtype=torch.float64).to(device)
    rm64 = torch.randn(C, generator=g, dtype=torch.float64).to(device)
    rv64 = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(device)
    # values representable in the dtypes used: every provider sees the same inputs
    x64 = _layout(x64.to(dtype), layout).double()
    dy64 = dy64.to(dtype).double()
    w64, b64, rm64, rv64 = (t.to(pdtype).double() for t in (w64, b64, rm64, rv64))
    kw = dict(negative_slope=0.2, alpha=1.3)

    def run(x_dtype, p_dtype, fn):
        x = _layout(x64.to(x_dtype), layout).detach().requires_grad_()
        w = _leaf(w64 if affine != "none" else None, p_dtype)
        b = _leaf(b64 if affine == "both" else None, p_dtype)
        rm = rm64.to(p_dtype) if stats else None
        rv = rv64.to(p_dtype) if stats else None
        y = fn(x, rm, rv, w, b)
        return [y.detach(), *_grads(y, dy64, x, w, b), rm, rv]

    def torch_bn(x, rm, rv, w, b):
        return eager_activation(F.batch_norm(x, rm, rv, w, b, training, momentum, eps),
                                activation or "identity", **kw)

    def tkern_bn(x, rm, rv, w, b):
        return tkern.batch_norm(x, rm, rv, w, b, training, momentum, eps, activation=activation,
                                **kw)

    theirs = _raises_like(lambda: run(dtype, pdtype, torch_bn), lambda: run(dtype, pdtype, tkern_bn))
    if theirs is None:
        return
    ours = run(dtype, pdtype, tkern_bn)
    ref = run(torch.float64, torch.float64, torch_bn)
    names = ["y", "dx", "dweight", "dbias", "running_mean", "running_var"][:len(ours)]
    for name, a, b, r in zip(names, ours, theirs, ref):
        if a is None or b is None:
            assert a is None and b is None, name
            continue
        assert_close_rule(a, b, r, name=name)


# ---------------------------------------------------------------------------- activation dropout


@seed(16002)
@FUZZ
@given(data=st.data())
def test_fuzz_activation_dropout(device, data):
    ndim = data.draw(st.integers(1, 3), label="ndim")
    shape = [data.draw(SIZES, label=f"size{i}") for i in range(ndim)]
    dtype = data.draw(DTYPES, label="dtype")
    layout = data.draw(LAYOUTS, label="layout")
    act, approximate = data.draw(st.sampled_from(
        [(a, "none") for a in tkern.ACTIVATIONS] + [("gelu", "tanh")]), label="activation")
    p = data.draw(st.sampled_from([0.0, 0.25, 0.6, 1.0, -0.1, 1.5]), label="p")
    training = data.draw(st.booleans(), label="training")
    with_bias = data.draw(st.booleans(), label="bias")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    x64 = _layout(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype), layout).double()
    dy64 = torch.randn(shape, generator=g, dtype=torch.float64)
    b64 = torch.randn(shape[-1], generator=g, dtype=torch.float64).to(dtype).double() \
        if with_bias else None
    x64, dy64 = x64.to(device), dy64.to(dtype).double().to(device)
    b64 = None if b64 is None else b64.to(device)
    kw = dict(negative_slope=0.2, alpha=1.3)

    def call_tkern(x, b, generator):
        return tkern.activation_dropout(x, act, p, training, bias=b, approximate=approximate,
                                        generator=generator, **kw)

    def gen():
        return torch.Generator(device="cpu").manual_seed(7)

    x = _layout(x64.to(dtype), layout).detach().requires_grad_()
    b = _leaf(b64, dtype)
    mask_ok = _raises_like(lambda: F.dropout(x64, p, training), lambda: call_tkern(x, b, gen()))
    if mask_ok is None:
        return
    y = call_tkern(x, b, gen())
    dx, db = _grads(y, dy64, x, b) if b is not None else (_grads(y, dy64, x) + [None])
    # the kept elements: identity on x with the same seed (x has no exact zeros)
    with torch.no_grad():
        # (a zero bias where the call has one: the mask follows the view the kernels walk)
        zero = None if b is None else torch.zeros_like(b)
        kept = tkern.activation_dropout(x, "identity", p, training, bias=zero,
                                        generator=gen()) != 0
    assert not (x64 == 0).any() or not training
    scale = 1.0 / (1.0 - p) if training and 0 < p < 1 else 1.0
    if training and p == 1.0:
        kept = torch.zeros_like(kept)
    elif not training or p == 0.0:
        kept = torch.ones_like(kept)

    def eager(xe, be):
        z = xe if be is None else xe + be.to(xe.dtype)
        # the public parameters as the two scalars eager_activation takes (softplus's are beta and
        # threshold, left at their defaults here)
        slots = activation_scalars(act, **kw)
        return eager_activation(z, act, *slots, approximate=approximate) * (kept.to(z.dtype) * scale)

    results = []
    for d in (dtype, torch.float64):
        xe = x64.to(d).detach().requires_grad_()
        be = _leaf(b64, d)
        ye = eager(xe, be)
        results.append([ye.detach().to(d), *(_grads(ye, dy64, xe, be) if be is not None
                                             else _grads(ye, dy64, xe) + [None])])
    theirs, ref = results
    for name, a, t, r in zip(("y", "dx", "dbias"), (y.detach(), dx, db), theirs, ref):
        if a is None:
            assert t is None, name
            continue
        assert_close_rule(a, t.to(a.dtype), r, name=name)


# ------------------------------------------------------------------------------------------- LRN


def _tf_lrn(x, r, bias, alpha, beta):
    """TensorFlow's local_response_normalization from its formula (channels last)."""
    if x.numel() == 0:
        return x.clone()
    sq = F.pad(x * x, (r, r)).unfold(-1, 2 * r + 1, 1).sum(-1)
    return x / (bias + alpha * sq) ** beta


@seed(16003)
@FUZZ
@given(data=st.data())
def test_fuzz_local_response_norm(device, data):
    ndim = data.draw(st.integers(2, 4), label="ndim")
    shape = [data.draw(SIZES, label=f"size{i}") for i in range(ndim)]
    dtype = data.draw(DTYPES, label="dtype")
    layout = data.draw(LAYOUTS, label="layout")
    tf = data.draw(st.booleans(), label="tensorflow semantics")
    size = data.draw(st.integers(0, 6), label="size / depth_radius")
    alpha = data.draw(st.sampled_from([1e-4, 0.5, 2.0]), label="alpha")
    beta = data.draw(st.sampled_from([0.5, 0.75, 1.3]), label="beta")
    k = data.draw(st.sampled_from([0.5, 1.0, 2.0]), label="k")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    x64 = torch.randn(shape, generator=g, dtype=torch.float64).to(device)
    dy64 = torch.randn(shape, generator=g, dtype=torch.float64).to(device)
    x64 = _layout(x64.to(dtype), layout).double()
    dy64 = dy64.to(dtype).double()

    if tf:
        def torch_fn(x):
            if x.dim() < 3:
                raise ValueError("expects rank >= 3")  # what tkern documents (TF takes 4-D)
            return _tf_lrn(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x,
                           size, k, alpha, beta).to(x.dtype)

        def tkern_fn(x):
            return tkern.local_response_normalization(x, size, k, alpha, beta)
    else:
        def torch_fn(x):
            if x.dtype in (torch.float16, torch.bfloat16):  # no fp16/bf16 avg_pool3d on CPU
                try:
                    return F.local_response_norm(x, size, alpha, beta, k)
                except (RuntimeError, NotImplementedError):
                    return F.local_response_norm(x.float(), size, alpha, beta, k).to(x.dtype)
            return F.local_response_norm(x, size, alpha, beta, k)

        def tkern_fn(x):
            return tkern.local_response_norm(x, size, alpha, beta, k)

    def run(fn, d):
        x = _layout(x64.to(d), layout).detach().requires_grad_()
        y = fn(x)
        return [y.detach(), *_grads(y, dy64, x)]

    theirs = _raises_like(lambda: run(torch_fn, dtype), lambda: run(tkern_fn, dtype))
    if theirs is None:
        return
    ours = run(tkern_fn, dtype)
    ref = run(torch_fn, torch.float64)
    for name, a, t, r in zip(("y", "dx"), ours, theirs, ref):
        if a is None:
            assert t is None, name
            continue
        assert_close_rule(a, t, r, name=name)


# ----------------------------------------------------------------------------------- weight norm


@seed(16004)
@FUZZ
@given(data=st.data())
def test_fuzz_weight_norm(device, data):
    ndim = data.draw(st.integers(1, 3), label="ndim")
    # no zero sizes: torch._weight_norm itself dies of SIGFPE on an empty v (torch 2.11-2.14, CPU)
    shape = [data.draw(st.sampled_from([1, 2, 3, 5, 7]), label=f"size{i}") for i in range(ndim)]
    dtype = data.draw(DTYPES, label="dtype")
    layout = data.draw(LAYOUTS, label="layout")
    # valid dims more often than the out-of-range ones torch rejects
    dim = data.draw(st.sampled_from([None, -1, 0, 0, ndim - 1, ndim - 1, ndim // 2, ndim,
                                     -ndim - 1]), label="dim")
    wrong_g = data.draw(st.integers(0, 5), label="wrong g size") == 0 and shape[0] > 1
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    v64 = torch.randn(shape, generator=g, dtype=torch.float64).to(device)
    v64 = _layout(v64.to(dtype), layout).double()
    torch_dim = -1 if dim is None else dim
    try:
        g_shape = torch.norm_except_dim(v64, 2, torch_dim).shape
    except IndexError:  # dim out of range: both must raise IndexError
        g_shape, wrong_g = (1,), False
    g64 = (torch.rand(g_shape, generator=g, dtype=torch.float64) + 0.5).to(device)
    if wrong_g:
        g64 = torch.cat([g64.reshape(-1), g64.reshape(-1)[:1]])
    dw64 = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).double().to(device)
    g64 = g64.to(dtype).double()

    def run(fn, d):
        v = _layout(v64.to(d), layout).detach().requires_grad_()
        gg = g64.to(d).detach().requires_grad_()
        w = fn(v, gg)
        return [w.detach(), *_grads(w, dw64, v, gg)]

    def torch_fn(v, gg):
        return torch._weight_norm(v, gg, torch_dim)

    def tkern_fn(v, gg):
        return tkern.weight_norm(v, gg, dim)

    if wrong_g:  # torch may broadcast a wrong-sized g; tkern refuses it (documented), as RuntimeError
        with pytest.raises(RuntimeError, match="g must have"):
            run(tkern_fn, dtype)
        return
    theirs = _raises_like(lambda: run(torch_fn, dtype), lambda: run(tkern_fn, dtype))
    if theirs is None:
        return
    ours = run(tkern_fn, dtype)
    ref = run(torch_fn, torch.float64)
    for name, a, t, r in zip(("w", "grad_v", "grad_g"), ours, theirs, ref):
        assert_close_rule(a, t, r, name=name)
