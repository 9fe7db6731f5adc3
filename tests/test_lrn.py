"""tkern.local_response_norm (PyTorch semantics), tkern.local_response_normalization (TensorFlow
semantics) and tkern.nn.LocalResponseNorm, against PyTorch and a TensorFlow reference written here
from TF's formula.  Tensors are tiny: the kernels run in Triton's interpreter on CPU."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tkern
from tkern.ops import lrn as lrn_ops
from tkern.testing import assert_close_rule

LOW = [torch.float16, torch.bfloat16, torch.float32]


def _tf_reference(x, depth_radius, bias, alpha, beta):
    """tf.nn.local_response_normalization from its documented formula, one channel at a time:
    sqr_sum[..., d] = sum(input[..., d - r : d + r + 1] ** 2); output = input / (bias + alpha * sqr_sum) ** beta
    """
    depth = x.shape[-1]
    cols = []
    for d in range(depth):
        lo, hi = max(0, d - depth_radius), min(depth, d + depth_radius + 1)
        sqr_sum = (x[..., lo:hi] ** 2).sum(-1)
        cols.append(x[..., d] / (bias + alpha * sqr_sum) ** beta)
    return torch.stack(cols, -1)


def _same_dtype(fn, x, *args):
    """PyTorch's result at x's dtype; torch's CPU avg_pool3d has no fp16/bf16 kernel, so there it
    is computed in fp32 and rounded once (an error no larger than torch's own would be)."""
    try:
        return fn(x, *args)
    except (NotImplementedError, RuntimeError):
        out = fn(x.float(), *args)
        return tuple(o.to(x.dtype) for o in out) if isinstance(out, tuple) else out.to(x.dtype)


def _grads(fn, x, g, *args):
    x = x.detach().requires_grad_(True)
    y = fn(x, *args)
    (gx,) = torch.autograd.grad(y, x, g)
    return y.detach(), gx


# ----------------------------------------------------------------------------------------------
# PyTorch semantics


def test_module_db_samples(device):
    common_modules = pytest.importorskip("torch.testing._internal.common_modules")
    info = next((m for m in common_modules.module_db if m.module_cls is torch.nn.LocalResponseNorm),
                None)
    if info is None:
        pytest.skip("module_db has no LocalResponseNorm entry")
    for dtype in (torch.float32, torch.float64):
        samples = info.module_inputs_func(info, device=device, dtype=dtype, requires_grad=True,
                                          training=True)
        assert samples
        for sample in samples:
            args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
            ours_m = tkern.nn.LocalResponseNorm(*args, **kwargs)
            ref_m = torch.nn.LocalResponseNorm(*args, **kwargs)
            (x,) = sample.forward_input.args
            g = torch.randn_like(x)
            y, gx = _grads(ours_m, x, g)
            y_t, gx_t = _grads(ref_m, x, g)
            y_64, gx_64 = _grads(ref_m, x.double(), g.double())
            assert_close_rule(y, y_t, y_64, name=f"forward {args}")
            assert_close_rule(gx, gx_t, gx_64, name=f"grad {args}")


@pytest.mark.parametrize("rank", [3, 4, 5])
@pytest.mark.parametrize("size", range(1, 10))
def test_sizes_ranks_channels(device, size, rank):
    """Every size 1..9 (even ones put the extra channel before c), channels below and above it."""
    spatial = {3: (3,), 4: (2, 3), 5: (2, 1, 3)}[rank]
    for channels in (3, 11):
        x = torch.randn(2, channels, *spatial, device=device, dtype=torch.float64)
        g = torch.randn_like(x)
        y, gx = _grads(tkern.local_response_norm, x, g, size, 0.7, 0.75, 1.3)
        y_ref, gx_ref = _grads(F.local_response_norm, x, g, size, 0.7, 0.75, 1.3)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("max_unrolled", [0, 9])
@pytest.mark.parametrize("size", [4, 5, 12])
def test_unrolled_and_looped_windows(device, monkeypatch, max_unrolled, size):
    """Both kernel forms: windows unrolled at compile time (up to MAX_UNROLLED_WINDOW) and the
    runtime loop larger windows take, forced here for every size with max_unrolled = 0."""
    monkeypatch.setattr(lrn_ops, "MAX_UNROLLED_WINDOW", max_unrolled)
    x = torch.randn(2, 17, 3, 2, device=device, dtype=torch.float64)
    g = torch.randn_like(x)
    y, gx = _grads(tkern.local_response_norm, x, g, size, 0.9, 0.6, 0.8)
    y_ref, gx_ref = _grads(F.local_response_norm, x, g, size, 0.9, 0.6, 0.8)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("size", [2, 5])
def test_low_precision(device, dtype, size):
    # unit-scale inputs and a large alpha so that the normalizer actually varies
    x = torch.randn(3, 13, 5, 3, device=device, dtype=dtype)
    g = torch.randn_like(x)
    params = (size, 2.0, 0.75, 1.0)
    y, gx = _grads(tkern.local_response_norm, x, g, *params)
    y_t, gx_t = _same_dtype(lambda a, *p: _grads(F.local_response_norm, a, g.to(a.dtype), *p), x,
                            *params)
    y_64, gx_64 = _grads(F.local_response_norm, x.double(), g.double(), *params)
    assert_close_rule(y, y_t, y_64, name="forward")
    assert_close_rule(gx, gx_t, gx_64, name="grad")


def test_bf16_rounds_to_nearest(device):
    """bf16 results are the fp32 computation rounded to nearest even, as compiled kernels store
    them (Triton's interpreter truncates unless the ops work around it): the kernels compute bf16
    in fp32, so the bf16 outputs must equal tkern's fp32 outputs on the same values, rounded."""
    nchw = torch.randn(2, 7, 5, 3)
    for fn, v, params in ((tkern.local_response_norm, nchw, (3, 2.0, 0.75, 1.0)),
                          (tkern.local_response_norm, nchw.to(memory_format=torch.channels_last),
                           (4, 2.0, 0.75, 1.0)),
                          (tkern.local_response_normalization, torch.randn(3, 5, 13),
                           (2, 1.0, 0.5, 0.75))):
        x = v.to(device, torch.bfloat16)
        g = torch.randn_like(x)
        y, gx = _grads(fn, x, g, *params)
        y32, gx32 = _grads(fn, x.float(), g.float(), *params)
        assert torch.equal(y, y32.bfloat16()) and torch.equal(gx, gx32.bfloat16())


def test_gradcheck_pytorch(device):
    # an even size: the window is asymmetric, so the mirrored backward window is tested
    x = torch.randn(1, 5, 2, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a: tkern.local_response_norm(a, 4, 0.9, 0.75, 0.7), (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("fmt, shape", [(torch.channels_last, (2, 7, 3, 2)),
                                        (torch.channels_last_3d, (2, 7, 2, 1, 3))])
def test_channels_last(device, fmt, shape):
    x = torch.randn(shape, device=device, dtype=torch.float32).to(memory_format=fmt)
    g = torch.randn_like(x)  # channels_last as well
    y, gx = _grads(tkern.local_response_norm, x, g, 4, 0.5, 0.75, 1.0)
    assert y.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)
    y_t, gx_t = _grads(F.local_response_norm, x, g, 4, 0.5, 0.75, 1.0)
    y_64, gx_64 = _grads(F.local_response_norm, x.double(), g.double(), 4, 0.5, 0.75, 1.0)
    assert_close_rule(y, y_t, y_64, name="forward")
    assert_close_rule(gx, gx_t, gx_64, name="grad")
    # a contiguous gradient for a channels_last input is read through its own strides
    gc = g.contiguous()
    _, gx_c = _grads(tkern.local_response_norm, x, gc, 4, 0.5, 0.75, 1.0)
    assert_close_rule(gx_c, gx_t, gx_64, name="grad (contiguous dy)")


def test_strided_views(device):
    base = torch.randn(2, 9, 4, 5, device=device, dtype=torch.float64)
    for x in (base[:, ::2], base[..., 1:4], base.transpose(2, 3), base.expand(3, 2, 9, 4, 5)[1]):
        g = torch.randn_like(x)
        y, gx = _grads(tkern.local_response_norm, x, g, 3, 0.6, 0.8, 1.1)
        y_ref, gx_ref = _grads(F.local_response_norm, x.contiguous(), g, 3, 0.6, 0.8, 1.1)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("int64", [False, True])
def test_tile_boundaries(device, monkeypatch, int64):
    """Several channel and position tiles (small tiles forced), so windows cross tile edges; and
    the int64 indexing path."""
    import tkern._runtime as rt
    import tkern.ops.lrn as lrn

    monkeypatch.setattr(lrn, "TILE", 32)
    monkeypatch.setattr(lrn, "BLOCK_CONTIG", 8)
    monkeypatch.setattr(lrn, "BLOCK_C_CONTIG", 4)
    if int64:
        monkeypatch.setattr(rt, "needs_int64", lambda *t, **kw: True)
    x = torch.randn(1, 11, 3, 5, device=device, dtype=torch.float64)
    g = torch.randn_like(x)
    for v, gv in ((x, g), (x.to(memory_format=torch.channels_last),
                           g.to(memory_format=torch.channels_last))):
        for size in ((4,) if int64 else (4, 5)):
            y, gx = _grads(tkern.local_response_norm, v, gv, size, 0.6, 0.75, 1.2)
            y_ref, gx_ref = _grads(F.local_response_norm, v, gv, size, 0.6, 0.75, 1.2)
            torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    xt = x.movedim(1, -1).contiguous()
    y, gx = _grads(tkern.local_response_normalization, xt, g.movedim(1, -1), 2, 1.2, 0.3, 0.75)
    y_ref, gx_ref = _grads(_tf_reference, xt, g.movedim(1, -1), 2, 1.2, 0.3, 0.75)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape,size", [
    (shape, size) for shape in [(2, 5, 7), (1, 3, 49), (1, 37, 14, 14), (1, 6, 55, 55), (2, 1, 7)]
    for size in (1, 3, 5, 9)] + [((1, 130, 3), 5)])
def test_sliding_kernels(device, monkeypatch, shape, size):
    """The sliding-window kernels (positions contiguous): awkward S (7, 49, 196, 3025), C = 1 and
    130 (LRN layers have at most a few hundred channels), windows 1 to 9, several channel chunks
    (8 channels forced: chunk edges, a last chunk not a multiple of the four steps a trip), fp64
    against torch to 1e-12."""
    monkeypatch.setattr(lrn_ops, "SLIDE_CHUNK", 8)
    x = torch.randn(*shape, device=device, dtype=torch.float64)
    g = torch.randn_like(x)
    x3 = x.view(x.shape[0], x.shape[1], -1)
    cfg = lrn_ops.LrnConfig(False, size // 2, (size - 1) // 2, 0.7 / size, 0.75, 1.3)
    assert lrn_ops._slide_args((x3, x3), cfg) is not None  # the path under test
    y, gx = _grads(tkern.local_response_norm, x, g, size, 0.7, 0.75, 1.3)
    y_ref, gx_ref = _grads(F.local_response_norm, x, g, size, 0.7, 0.75, 1.3)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reciprocal", [False, True])
@pytest.mark.parametrize("shape,size", [((1, 6, 55, 55), 5), ((1, 5, 27, 27), 5),
                                        ((1, 37, 14, 14), 3), ((2, 5, 7), 5), ((1, 13, 3), 9)])
def test_sliding_backward_blocks(device, monkeypatch, shape, size, reciprocal):
    """The sliding backward's tiling: a last position block that overlaps the one before (S =
    3025, 729, 196 against blocks of 512, 256, 128) or a masked one (S = 7, 3: one block); 8-channel
    chunks whose last trips run masked (C = 37, 13: a short last chunk; C = 6, 5: one chunk, the
    window past both edges); and the reciprocal form of s^(-beta-1) with its scalings (taken on a
    GPU only, forced here with exact division), against torch in fp64."""
    monkeypatch.setattr(lrn_ops, "SLIDE_CHUNK", 8)
    monkeypatch.setattr(lrn_ops, "_reciprocal_path", lambda cfg, fast: reciprocal)
    x = torch.randn(*shape, device=device, dtype=torch.float64)
    g = torch.randn_like(x)
    x3 = x.view(x.shape[0], x.shape[1], -1)
    cfg = lrn_ops.LrnConfig(False, size // 2, (size - 1) // 2, 0.7 / size, 0.75, 1.3)
    site = lrn_ops._backward_site(x3, x3, x3, cfg)
    assert site.kernel is lrn_ops._lrn_backward_slide_kernel  # the path under test
    assert site.kwargs["RCP"] == reciprocal and site.kwargs["MASK_S"] == (x3.shape[2] < 16)
    params = (size, 0.7, 0.75, 1.3)
    _, gx = _grads(tkern.local_response_norm, x, g, *params)
    _, gx_ref = _grads(F.local_response_norm, x, g, *params)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)


def test_reciprocal_path_conditions():
    """The reciprocal form only where its scalings are exact and s, s / 16 and 16 / s normal."""
    ok = lrn_ops.LrnConfig(False, 2, 2, 1e-4 / 5, 0.75, 2.0)
    assert lrn_ops._reciprocal_path(ok, True) and not lrn_ops._reciprocal_path(ok, False)
    for bad in (ok._replace(k=2.0**-122), ok._replace(k=0.0), ok._replace(k=-1.0),
                ok._replace(scale=2.0**-101), ok._replace(scale=-1e-4),
                ok._replace(beta=2.0**-90), ok._replace(beta=1.0), ok._replace(beta=-0.5)):
        assert not lrn_ops._reciprocal_path(bad, True), bad
    assert lrn_ops._reciprocal_path(ok._replace(scale=0.0), True)


def test_sliding_plan_on_a_gpu():
    """Planned as on a 132-SM GPU (what perf.static_cost records): the sliding kernels for NCHW
    (16-channel chunks where the grid is small, 32 where large), the tile kernels for
    channels_last; the planning override ends with its block."""
    import tkern._runtime as rt

    cfg = lrn_ops.LrnConfig(False, 2, 2, 1e-4 / 5, 0.75, 2.0)
    small = torch.empty(2, 96, 3025).view(2, 96, -1)
    large = torch.empty(256, 96, 3025)
    with rt.plan_as_gpu(132):
        assert rt.plans_for_gpu(small.device) and rt.sm_count(small.device) == 132
        _, args_small, kw = lrn_ops._slide_args((small, small), cfg)
        _, args_large, _ = lrn_ops._slide_args((large, large), cfg)
        cl = torch.empty(2, 96, 5, 5).to(memory_format=torch.channels_last)
        cl3 = cl.view(2, 96, -1)  # channels contiguous: positions are not
        assert lrn_ops._slide_args((cl3, cl3), cfg) is None
        # AlexNet conv2 at batch 32: 768 programs at 32 channels, 5.8 an SM: the backward (whose
        # halo costs math) keeps 32, the forward takes 16
        mid = torch.empty(32, 256, 729)
        assert lrn_ops._forward_site(mid, mid, cfg).tail[3] == 16
        assert lrn_ops._backward_site(mid, mid, mid, cfg).tail[3] == 32
    assert args_small[3] == 16 and args_large[3] == 32
    assert kw["FTZ"] and not kw["NEG_BASE"] and not kw["BETA_ZERO"]
    assert not rt.plans_for_gpu(small.device)


def test_edge_parameters(device):
    x = torch.randn(2, 6, 5, device=device, dtype=torch.float64)
    g = torch.randn_like(x)
    # a window far wider than C, k = 0, and a negative beta
    for params in ((1000, 0.3, 0.75, 1.0), (3, 0.5, 0.75, 0.0), (4, 0.2, -0.5, 2.0)):
        y, gx = _grads(tkern.local_response_norm, x, g, *params)
        y_ref, gx_ref = _grads(F.local_response_norm, x, g, *params)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12, msg=str(params))
        torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12, msg=str(params))
    # beta = 0: pow(s, 0) is 1 even where s = 0, and the gradient is dy exactly
    x0 = x.clone()
    x0[:, :3] = 0.0
    y, gx = _grads(tkern.local_response_norm, x0, g, 3, 1.0, 0.0, 0.0)
    assert torch.equal(y, x0) and torch.equal(gx, g)


def _mixed_sign_s(device, shape):
    """Inputs whose s = -1 + (0.5 / 3) * window sum (size 3, alpha 0.5, k = -1) keeps away from 0:
    position 0 of the last dim has |x| <= 0.3 (s <= -0.95), position 1 has |x| >= 2 (s >= 0.33)."""
    x = torch.empty(shape, device=device, dtype=torch.float64)
    x[..., 0] = 0.3 * (2 * torch.rand_like(x[..., 0]) - 1)
    x[..., 1] = torch.randn_like(x[..., 1]).sign() * (2 + torch.rand_like(x[..., 1]))
    return x


@pytest.mark.parametrize("beta", [1.0, 2.0, 0.75])
def test_negative_base(device, beta):
    """k < 0 makes s negative: torch's pow gives a finite value (sign by parity) for an integer
    exponent, NaN for any other; the gradient's s^(-beta-1) has the opposite parity."""
    x = _mixed_sign_s(device, (2, 5, 2))
    g = torch.randn_like(x)
    params = (3, 0.5, beta, -1.0)
    y, gx = _grads(tkern.local_response_norm, x, g, *params)
    y_ref, gx_ref = _grads(F.local_response_norm, x, g, *params)
    assert y_ref[..., 0].isnan().all() == (beta == 0.75)  # the test means what it says
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12, equal_nan=True)
    xt = x.movedim(1, -1)  # TensorFlow semantics: window [c - 1, c + 1], alpha undivided
    gt, tf_params = g.movedim(1, -1), (1, -1.0, 0.5 / 3, beta)
    y, gx = _grads(tkern.local_response_normalization, xt, gt, *tf_params)
    y_ref, gx_ref = _grads(_tf_reference, xt, gt, *tf_params)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12, equal_nan=True)
    if beta != 0.75:
        xg = _mixed_sign_s(device, (1, 4, 2)).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda a: tkern.local_response_norm(a, *params), (xg,),
                                        eps=1e-6, atol=1e-7)


def test_scalar_precision_fp64(device):
    # alpha, beta and k that fp32 cannot hold: fp64 results must not round them to fp32
    x = torch.randn(2, 5, 7, device=device, dtype=torch.float64)
    params = (3, 0.1234567890123, 0.7654321098765, 1.1111111111111)
    torch.testing.assert_close(tkern.local_response_norm(x, *params),
                               F.local_response_norm(x, *params), rtol=1e-13, atol=1e-13)


def test_module(device):
    m = tkern.nn.LocalResponseNorm(3, alpha=0.2, beta=0.6, k=1.5)
    assert isinstance(m, torch.nn.LocalResponseNorm)
    ref = torch.nn.LocalResponseNorm(3, alpha=0.2, beta=0.6, k=1.5)
    assert repr(m) == repr(ref) and m.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 5, 3, 2, device=device, dtype=torch.float64)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# TensorFlow semantics


@pytest.mark.parametrize("depth_radius", [0, 1, 2, 5])
def test_tensorflow_semantics(device, depth_radius):
    for shape in ((2, 3, 2, 3), (3, 2, 11)):  # depth below and above the window
        x = torch.randn(shape, device=device, dtype=torch.float64)
        g = torch.randn_like(x)
        params = (depth_radius, 1.5, 0.3, 0.6)
        y, gx = _grads(tkern.local_response_normalization, x, g, *params)
        y_ref, gx_ref = _grads(_tf_reference, x, g, *params)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)


def test_tensorflow_defaults_and_layouts(device):
    x = torch.randn(2, 3, 4, 13, device=device, dtype=torch.float64)
    torch.testing.assert_close(tkern.local_response_normalization(x),
                               _tf_reference(x, 5, 1.0, 1.0, 0.5), rtol=1e-12, atol=1e-12)
    # NCHW memory viewed as NHWC (channels not contiguous), the same sliced (not dense, still
    # walked in place), and a sliced view that needs a copy
    nchw = torch.randn(2, 13, 3, 4, device=device, dtype=torch.float64).permute(0, 2, 3, 1)
    for v in (nchw, nchw[:, 1:3], x[:, :, 1:3, ::2]):
        g = torch.randn_like(v)
        y, gx = _grads(tkern.local_response_normalization, v, g, 2, 0.5, 0.2, 0.75)
        y_ref, gx_ref = _grads(_tf_reference, v, g, 2, 0.5, 0.2, 0.75)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
        if v.is_contiguous() or v is nchw:
            assert y.stride() == torch.empty_like(v).stride()


@pytest.mark.parametrize("dtype", LOW)
def test_tensorflow_low_precision(device, dtype):
    x = torch.randn(3, 5, 17, device=device, dtype=dtype)
    g = torch.randn_like(x)
    params = (2, 1.0, 0.5, 0.75)
    y, gx = _grads(tkern.local_response_normalization, x, g, *params)
    y_t, gx_t = _grads(_tf_reference, x, g, *params)
    y_64, gx_64 = _grads(_tf_reference, x.double(), g.double(), *params)
    assert_close_rule(y, y_t, y_64, name="forward")
    assert_close_rule(gx, gx_t, gx_64, name="grad")


def test_gradcheck_tensorflow(device):
    x = torch.randn(1, 2, 5, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a: tkern.local_response_normalization(a, 2, 0.8, 0.6, 0.7), (x,), eps=1e-6, atol=1e-7)


def test_double_backward(device):
    """create_graph=True differentiates again (as torch's composite does), for both semantics; an
    even size checks the mirrored window there too."""
    x = torch.randn(1, 5, 2, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda a: tkern.local_response_norm(a, 4, 0.9, 0.75, 0.7), (x,), eps=1e-6, atol=1e-7)
    xt = torch.randn(1, 2, 5, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda a: tkern.local_response_normalization(a, 1, 0.8, 0.6, 0.7), (xt,), eps=1e-6,
        atol=1e-7)


def test_first_order_backward_is_the_kernel(device, monkeypatch):
    """Only create_graph=True takes the torch-ops backward; its gradient is the kernel's."""
    import tkern.ops.lrn as lrn

    composite = lrn._composite
    for fn, args in ((tkern.local_response_norm, (4, 0.9, 0.75, 0.7)),
                     (tkern.local_response_normalization, (2, 0.8, 0.6, 0.7))):
        x = torch.randn(2, 7, 3, device=device, dtype=torch.float64, requires_grad=True)
        g = torch.randn_like(x)
        monkeypatch.setattr(lrn, "_composite", composite)
        (gx_graph,) = torch.autograd.grad(fn(x, *args), x, g, create_graph=True)
        assert gx_graph.requires_grad
        monkeypatch.setattr(lrn, "_composite", lambda *a: pytest.fail("torch-ops backward used"))
        (gx,) = torch.autograd.grad(fn(x, *args), x, g)
        torch.testing.assert_close(gx, gx_graph.detach(), rtol=1e-12, atol=1e-12)


def test_documented_mappings(device):
    """docs/lrn.md: TensorFlow's parametrization onto torch's, and cuDNN's even window as the
    channel-flipped torch window (cuDNN: lookBehind = (n-1)//2, lookAhead = n//2, alpha / n)."""
    x = torch.randn(2, 7, 3, 2, device=device, dtype=torch.float64)
    r, bias, alpha, beta = 2, 1.5, 0.1, 0.7
    torch.testing.assert_close(
        tkern.local_response_normalization(x.movedim(1, -1), r, bias, alpha, beta).movedim(-1, 1),
        tkern.local_response_norm(x, 2 * r + 1, alpha * (2 * r + 1), beta, bias),
        rtol=1e-12, atol=1e-12)
    n, C = 4, x.shape[1]
    sq = torch.stack([(x[:, max(0, c - (n - 1) // 2):c + n // 2 + 1] ** 2).sum(1) for c in range(C)], 1)
    cudnn = x / (bias + alpha / n * sq) ** beta
    torch.testing.assert_close(tkern.local_response_norm(x.flip(1), n, alpha, beta, bias).flip(1),
                               cudnn, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# shared behaviour


def test_saves_only_x(device):
    for fn, args in ((tkern.local_response_norm, (3,)), (tkern.local_response_normalization, (1,))):
        x = torch.randn(2, 5, 3, device=device, dtype=torch.float32, requires_grad=True)
        packed = []

        def pack(t):
            packed.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = fn(x, *args)
        assert len(packed) == 1, f"{fn.__name__} saved {len(packed)} tensors"
        assert packed[0].shape == x.shape and torch.equal(packed[0], x.detach())
        y.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        assert packed[0].data_ptr() == x.data_ptr()  # x itself, not a copy


def test_empty(device):
    for shape in ((0, 4, 3), (2, 0, 3, 2), (2, 4, 0)):
        x = torch.randn(shape, device=device, requires_grad=True)
        for y in (tkern.local_response_norm(x, 3), tkern.local_response_normalization(x, 1),
                  tkern.nn.LocalResponseNorm(2)(x)):
            assert y.shape == x.shape and y.dtype == x.dtype
            y.sum().backward()


def test_errors(device):
    x = torch.randn(2, 5, 3, device=device)
    for bad in (torch.randn(5, device=device), torch.randn(2, 5, device=device)):
        with pytest.raises(ValueError):
            tkern.local_response_norm(bad, 3)
        with pytest.raises(ValueError):
            tkern.local_response_normalization(bad, 1)
        with pytest.raises(ValueError):
            tkern.nn.LocalResponseNorm(3)(bad)
    for size in (0, -2, torch.tensor(0)):
        # the issue asks for ValueError, torch raises RuntimeError: the error is both
        for exc in (ValueError, RuntimeError):
            with pytest.raises(exc):
                tkern.local_response_norm(x, size)
    for exc in (ValueError, RuntimeError):
        with pytest.raises(exc):
            tkern.local_response_normalization(x, -1)
    # integral values as torch takes them (a 0-dim integer tensor, a numpy int)
    for size in (torch.tensor(3), torch.tensor(3, dtype=torch.uint8), np.int64(3)):
        torch.testing.assert_close(tkern.local_response_norm(x, size),
                                   F.local_response_norm(x, size))
        torch.testing.assert_close(tkern.local_response_normalization(x, size),
                                   tkern.local_response_normalization(x, 3))
    # a bool is no size (torch rejects it), nor is a float
    for size in (2.5, True, torch.tensor(True), np.bool_(True), torch.tensor(3.0)):
        with pytest.raises(TypeError):
            tkern.local_response_norm(x, size)
        with pytest.raises(TypeError):
            tkern.local_response_normalization(x, size)
    for dtype in (torch.int64, torch.int32, torch.bool):
        xi = torch.ones(2, 5, 3, device=device, dtype=dtype)
        with pytest.raises(TypeError):
            tkern.local_response_norm(xi, 3)
        with pytest.raises(TypeError):
            tkern.local_response_normalization(xi, 1)


def test_eager_fallback(device, monkeypatch):
    """CPU without the interpreter runs eager PyTorch (warning once): same results."""
    if device.type != "cpu":
        pytest.skip("the eager fallback is for CPU tensors")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(2, 7, 3, 2, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        torch.testing.assert_close(tkern.local_response_norm(x, 4, 0.5, 0.7, 1.2),
                                   F.local_response_norm(x, 4, 0.5, 0.7, 1.2))
        torch.testing.assert_close(tkern.local_response_normalization(x, 1, 1.2, 0.5, 0.7),
                                   _tf_reference(x, 1, 1.2, 0.5, 0.7))
        xh = x.half()
        assert_close_rule(tkern.local_response_norm(xh, 3, 0.5), F.local_response_norm(
            xh.float(), 3, 0.5).half(), F.local_response_norm(x, 3, 0.5))


def test_cached_launch_sites_follow_every_argument(device):
    """Contiguous inputs of one shape reuse a cached launch (``lrn._SITES``): calls that differ
    in a parameter or dtype, in turn, each get their own, checked against torch both ways."""
    x64 = torch.randn(2, 6, 5, 3, device=device, dtype=torch.float64)
    dy64 = torch.randn_like(x64)
    calls = [(5, 1e-4, 0.75, 1.0, torch.float32), (5, 0.5, 0.75, 1.0, torch.float32),
             (5, 0.5, 0.6, 1.0, torch.float32), (5, 0.5, 0.6, 2.0, torch.float32),
             (3, 0.5, 0.6, 2.0, torch.float32), (3, 0.5, 0.6, 2.0, torch.float64),
             (5, 1e-4, 0.75, 1.0, torch.float32)]
    for size, alpha, beta, k, dt in calls * 2:
        outs = []
        for fn, x_dt in ((tkern.local_response_norm, dt), (F.local_response_norm, dt),
                         (F.local_response_norm, torch.float64)):
            x = x64.to(x_dt).requires_grad_()
            y = fn(x, size, alpha, beta, k)
            outs.append((y, *torch.autograd.grad(y, x, dy64.to(x_dt))))
        for name, t, s, r in zip(("y", "dx"), *outs):
            assert_close_rule(t, s, r, name=f"{name} size={size} {alpha} {beta} {k} {dt}")
