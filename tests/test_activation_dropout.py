"""tkern.activation_dropout and tkern.nn.ActivationDropout against PyTorch."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import tkern
from tkern import _runtime
from tkern.activations import activation_scalars, eager_activation
from tkern.ops import activation_dropout as ad
from tkern.ops.activation_dropout import BLOCK, QUARTER
from tkern.testing import assert_close_rule

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# (activation, approximate): every entry of the table, gelu in both forms
ACTS = [(a, "none") for a in tkern.ACTIVATIONS] + [("gelu", "tanh")]
# every activation parameter away from its default (inputs are ~3 randn: both sides of the bounds)
PARAMS = dict(negative_slope=0.2, alpha=1.3, min_val=-0.7, max_val=1.9, beta=1.7, threshold=2.5)


def _eager(x, act, approximate, bias=None, params=PARAMS):
    z = x if bias is None else x + bias
    return eager_activation(z, act, *activation_scalars(act, **params), approximate)


def _torch_scalar_loop(x, act, params):
    """torch's values and gradients one element at a time: its CPU kernels' vectorised loops
    disagree with their scalar loops (and with the backward formula) at NaN, e.g. relu6'(NaN) is
    0 in a vector lane and 1 in the scalar tail; tkern follows the formula."""
    ys, ds = [], []
    for v in x.detach():
        e = v.reshape(1).clone().requires_grad_()
        y = _eager(e, act, "none", params=params)
        y.backward(torch.ones_like(y))
        ys.append(y.detach())
        ds.append(e.grad)
    return torch.cat(ys), torch.cat(ds)


def _mask(shape, p, device, seed, bias=False):
    """The keep-mask tkern draws for ``shape`` with generator seed ``seed``, read off a ones tensor
    (with a zero bias for a call with a bias: the mask is keyed by the view the kernels walk,
    rows of the last dim with a bias, flat memory without)."""
    g = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(seed)
    ones = torch.ones(shape, device=device)
    b = torch.zeros(shape[-1], device=device) if bias else None
    return tkern.activation_dropout(ones, "identity", p, bias=b, generator=g) != 0


@pytest.mark.parametrize("act,approximate", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_matches_torch(device, act, approximate, dtype):
    shape = (3, 5, 37)
    x64 = (torch.randn(shape, device=device, dtype=torch.float64) * 3).requires_grad_()
    b64 = torch.randn(shape[-1], device=device, dtype=torch.float64).requires_grad_()
    dy64 = torch.randn(shape, device=device, dtype=torch.float64)
    x, b, dy = (t.detach().to(dtype).requires_grad_(t.requires_grad) for t in (x64, b64, dy64))
    xt, bt = (t.detach().clone().requires_grad_() for t in (x, b))

    ours = tkern.activation_dropout(x, act, 0.0, bias=b, approximate=approximate, **PARAMS)
    theirs = _eager(xt, act, approximate, bt)
    ref = _eager(x64, act, approximate, b64)
    assert_close_rule(ours, theirs, ref, name=f"{act} forward")

    ours.backward(dy)
    theirs.backward(dy)
    ref.backward(dy64)
    assert_close_rule(x.grad, xt.grad, x64.grad, name=f"{act} dx")
    assert_close_rule(b.grad, bt.grad, b64.grad, name=f"{act} dbias")


@pytest.mark.parametrize("act,approximate", ACTS)
def test_gradcheck_with_dropout(device, act, approximate):
    x = torch.randn(2, 6, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, device=device, dtype=torch.float64, requires_grad=True)
    gen_device = device if device.type == "cuda" else "cpu"
    g = torch.Generator(device=gen_device)

    def fn(x, b):  # the same mask on every call: reseed the generator each time
        g.manual_seed(1234)
        return tkern.activation_dropout(x, act, 0.3, bias=b, approximate=approximate, generator=g,
                                        **PARAMS)

    assert torch.autograd.gradcheck(fn, (x, b))


@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_dropout_statistics_and_survivors(device, p):
    x = torch.randn(64, 129, device=device) + 0.1  # 4 programs; no exact zeros
    g = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(7)
    y = tkern.activation_dropout(x, "identity", p, generator=g)
    keep = y != 0
    n = x.numel()
    kept = keep.sum().item()
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(kept - n * (1 - p)) <= 5 * sigma, (kept, n * (1 - p), sigma)
    # survivors are exactly x / (1 - p), computed as torch does
    assert torch.equal(y[keep], (x * (1.0 / (1.0 - p)))[keep])

    # the same mask for a non-trivial activation: survivors are act(x) / (1 - p)
    g.manual_seed(7)
    ys = tkern.activation_dropout(x, "silu", p, generator=g)
    assert torch.equal(ys != 0, keep)
    assert_close_rule(ys[keep], (F.silu(x) / (1 - p))[keep], (F.silu(x.double()) / (1 - p))[keep])


@pytest.mark.parametrize("shape", [(2, 2 * QUARTER), (3, QUARTER), (2, 3, QUARTER + 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_full_programs_and_bias_rows(device, shape, dtype):
    """The unmasked path (every program full: 2 x 2 QUARTER elements), the contiguous bias
    rows (QUARTER divides the last dim) with a partial last program, and neither; forward and
    backward with dropout against torch under the kernel's own mask."""
    assert (math.prod(shape) % BLOCK == 0) == (shape == (2, 2 * QUARTER))
    x64 = torch.randn(shape, device=device, dtype=torch.float64)
    b64 = torch.randn(shape[-1], device=device, dtype=torch.float64)
    dy64 = torch.randn(shape, device=device, dtype=torch.float64)
    x, b = (t.to(dtype).requires_grad_() for t in (x64, b64))
    g = torch.Generator().manual_seed(3)
    y = tkern.activation_dropout(x, "gelu", 0.3, bias=b, generator=g)
    keep = _mask(shape, 0.3, device, 3, bias=True)
    assert 0.6 < keep.double().mean().item() < 0.8
    scale = 1 / 0.7
    xt, bt = (t.detach().clone().requires_grad_() for t in (x, b))
    x64.requires_grad_()
    b64.requires_grad_()
    theirs = torch.where(keep, F.gelu(xt + bt) * scale, 0.0).to(dtype)
    ref = torch.where(keep, F.gelu(x64 + b64) * scale, 0.0)
    assert_close_rule(y, theirs, ref, name="forward")
    y.backward(dy64.to(dtype))
    theirs.backward(dy64.to(dtype))
    ref.backward(dy64)
    assert_close_rule(x.grad, xt.grad, x64.grad, name="dx")
    assert_close_rule(b.grad, bt.grad, b64.grad, name="dbias")


# rows a test shape needs for 3 row groups of the bias view (a group: 4 quarters of
# QUARTER // block rows; block: min(BIAS_COLS, next_pow2(H)) columns), one short of that
def _rows_for_groups(n_cols, groups):
    block = min(ad.BIAS_COLS, 1 << (n_cols - 1).bit_length())
    return groups * 4 * (QUARTER // block) - 1


# (n_cols, row programs, dtype): every dtype on the narrow rows; the wide row (17 column
# programs, slow in the interpreter) with partials in bf16 and fp64
BIAS_GRAD_CASES = ([(n, r, d) for n in (1, 7, 256) for r in (1, 2) for d in DTYPES]
                   + [(4097, 2, torch.bfloat16), (4097, 2, torch.float64)])


class _KernelLaunches:
    """Stands in for ``ad._kernel``: records each launch's keyword arguments."""

    def __init__(self, kernel):
        self.kernel, self.kwargs = kernel, []

    def __getitem__(self, grid):
        launcher = self.kernel[grid]

        def launch(*args, **kwargs):
            self.kwargs.append(kwargs)
            return launcher(*args, **kwargs)
        return launch


def _bias_gradient_case(device, shape, dtype, seed=11):
    """dropout(gelu(x + b), 0.3) forward and backward against torch under the kernel's mask."""
    n_cols = shape[-1]
    x64 = torch.randn(shape, device=device, dtype=torch.float64)
    b64 = torch.randn(n_cols, device=device, dtype=torch.float64)
    dy64 = torch.randn(shape, device=device, dtype=torch.float64).to(dtype).double()
    x, b = (t.to(dtype).requires_grad_() for t in (x64, b64))
    g = torch.Generator().manual_seed(seed)
    y = tkern.activation_dropout(x, "gelu", 0.3, bias=b, generator=g)
    y.backward(dy64.to(dtype))
    keep = _mask(shape, 0.3, device, seed, bias=True)
    xt, bt = (t.detach().clone().requires_grad_() for t in (x, b))
    xr, br = (t.detach().double().requires_grad_() for t in (x, b))
    theirs = torch.where(keep, F.gelu(xt + bt) / 0.7, 0.0).to(dtype)
    ref = torch.where(keep, F.gelu(xr + br) / 0.7, 0.0)
    assert_close_rule(y, theirs, ref, name="forward")
    theirs.backward(dy64.to(dtype))
    ref.backward(dy64)
    assert_close_rule(x.grad, xt.grad, xr.grad, name="dx")
    assert b.grad.dtype == dtype
    assert_close_rule(b.grad, bt.grad, br.grad, name="dbias")


@pytest.mark.parametrize("n_cols,row_programs,dtype", BIAS_GRAD_CASES, ids=str)
def test_bias_gradient_summed_in_the_kernel(device, monkeypatch, n_cols, dtype, row_programs):
    """The bias gradient from the backward kernel's sums over rows, in its one launch: written
    directly (one program along rows), or as partial sums over uneven row ranges (two programs
    over three row groups: the second has one group past the end) that the last program of each
    column block adds up; awkward row lengths, every dtype, against torch under the kernel's own
    mask."""
    monkeypatch.setattr(ad, "_dbias_row_programs", lambda device, groups, cols: min(groups, row_programs))
    launches = _KernelLaunches(ad._kernel)
    monkeypatch.setattr(ad, "_kernel", launches)
    _bias_gradient_case(device, (_rows_for_groups(n_cols, 2 if n_cols > QUARTER else 3), n_cols),
                        dtype)
    backward = [k for k in launches.kwargs if k["BACKWARD"]]
    assert len(backward) == 1 and backward[0]["DBIAS_PARTIAL"] == (row_programs > 1)


@pytest.mark.parametrize("unroll", [4, 0], ids=["unrolled", "loop"])
def test_bias_gradient_partials_in_several_trips(device, monkeypatch, unroll):
    """The last program's sum of the partial rows in several trips (2 rows a trip over 7
    partial rows, the last trip partly past them): unrolled, and as a loop."""
    monkeypatch.setattr(ad, "_dbias_row_programs", lambda device, groups, cols: min(groups, 7))
    monkeypatch.setattr(ad, "DBIAS_PARTS", 2)
    monkeypatch.setattr(ad, "DBIAS_UNROLL", unroll)
    launches = _KernelLaunches(ad._kernel)
    monkeypatch.setattr(ad, "_kernel", launches)
    _bias_gradient_case(device, (_rows_for_groups(5, 7), 5), torch.float32)
    backward = [k for k in launches.kwargs if k["BACKWARD"]]
    assert backward[0]["DBIAS_PARTIAL"] and backward[0]["PARTS"] == 2
    assert backward[0]["TRIPS"] == (4 if unroll else 0)


def test_bias_gradient_partials_gradcheck(device, monkeypatch):
    """fp64 gradcheck of dx and dbias through the partial sums (three programs along rows)."""
    monkeypatch.setattr(ad, "_dbias_row_programs", lambda device, groups, cols: min(groups, 3))
    x = torch.randn(_rows_for_groups(3, 3), 3, device=device, dtype=torch.float64,
                    requires_grad=True)
    b = torch.randn(3, device=device, dtype=torch.float64, requires_grad=True)
    g = torch.Generator(device=device if device.type == "cuda" else "cpu")

    def fn(x, b):
        g.manual_seed(21)
        return tkern.activation_dropout(x, "gelu", 0.2, bias=b, generator=g)

    assert torch.autograd.gradcheck(fn, (x, b), fast_mode=True)


def test_bias_gradient_is_deterministic(device, monkeypatch):
    """Partial sums added in a fixed order by whichever program finishes last: the same bits on
    every run (no float atomics)."""
    monkeypatch.setattr(ad, "_dbias_row_programs", lambda device, groups, cols: min(groups, 2))
    x = torch.randn(_rows_for_groups(7, 3), 7, device=device)
    dy = torch.randn_like(x)
    grads = []
    for _ in range(2):
        b = torch.randn(7, device=device, generator=torch.Generator().manual_seed(0)).to(device)
        b.requires_grad_()
        tkern.activation_dropout(x, "silu", 0.0, bias=b).backward(dy)
        grads.append(b.grad)
    assert torch.equal(grads[0], grads[1])


def test_drop_threshold_keeps_p_to_2_pow_minus_32(device):
    """An element is dropped when its 32 random bits r <= ceil(p * 2^32) - 1 (unsigned), so
    P(drop) = ceil(p * 2^32) / 2^32: p to within 2^-32; the threshold travels bitcast to int32."""
    for p in (1e-9, 0.1, 0.25, 0.5, 0.9, 1.0 - 2**-40, 1.0):
        t = ad._scalars(p, 0.01, 1.0)[0]
        assert -2**31 <= t < 2**31
        u = t % 2**32  # the kernel's uint32 view
        assert 0 <= (u + 1) / 2**32 - p < 2**-32, p
    assert ad._scalars(1.0, 0.01, 1.0)[0] == -1  # 2^32 - 1: every word dropped


@triton.jit
def _philox_both(SEED, COUNTER, OURS, TRITONS, n, WIDE_MUL: tl.constexpr, BLOCK: tl.constexpr):
    # COUNTER (n,) int32 or int64; OURS, TRITONS (4, n) int32: the words of both Philox forms
    i = tl.arange(0, BLOCK)
    m = i < n
    seed = tl.load(SEED)
    c = tl.load(COUNTER + i, mask=m, other=0)
    a0, a1, a2, a3 = ad._philox4x32(seed, c, ad.N_ROUNDS, WIDE_MUL)
    b0, b1, b2, b3 = tl.randint4x(seed, c, ad.N_ROUNDS)
    for q, (a, b) in enumerate(((a0, b0), (a1, b1), (a2, b2), (a3, b3))):
        tl.store(OURS + q * n + i, a.to(tl.int32, bitcast=True), mask=m)
        tl.store(TRITONS + q * n + i, b.to(tl.int32, bitcast=True), mask=m)


@pytest.mark.parametrize("counter_dtype", [torch.int32, torch.int64])
def test_philox_words_match_triton(device, counter_dtype):
    """The kernels' Philox (each round's products from wide multiplies: inline PTX where
    compiled on NVIDIA) draws tl.randint4x's four words, for 32-bit counters and 64-bit ones
    past 2^32 (the high word is a counter word too)."""
    g = torch.Generator().manual_seed(11)
    top = 2**31 - 1 if counter_dtype == torch.int32 else 2**40
    counter = torch.cat([torch.randint(0, top, (120,), generator=g, dtype=torch.int64),
                         torch.tensor([0, 1, 2**31 - 1] + ([2**32, 2**32 + 7, 2**40 - 1]
                                                           if top > 2**31 else []))])
    counter = counter.to(counter_dtype).to(device)
    n = counter.numel()
    wide = device.type == "cuda" and torch.version.hip is None
    for seed in (0, 1234567, 2**31 - 2, 2**40 + 5):  # the last one's high word keys too
        ours = torch.empty(4, n, dtype=torch.int32, device=device)
        theirs = torch.empty_like(ours)
        _philox_both[(1,)](torch.tensor(seed, device=device), counter, ours, theirs, n,
                           WIDE_MUL=wide, BLOCK=triton.next_power_of_2(n))
        assert torch.equal(ours, theirs), seed


_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def _philox_numpy(seed, counter, rounds):
    """Philox4x32-rounds (Salmon et al.) in numpy uint64, from the paper's definition: the
    reference the kernels' mask stream is pinned to."""
    low = np.uint64(0xFFFFFFFF)
    c = [counter & low, counter >> np.uint64(32), np.zeros_like(counter), np.zeros_like(counter)]
    k = [np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)]
    for _ in range(rounds):
        p0 = c[0] * np.uint64(_PHILOX_M[0])  # < 2^64: exact
        p1 = c[2] * np.uint64(_PHILOX_M[1])
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k[0], p1 & low, (p0 >> np.uint64(32)) ^ c[3] ^ k[1],
             p0 & low]
        k = [(k[0] + np.uint64(_PHILOX_W[0])) & low, (k[1] + np.uint64(_PHILOX_W[1])) & low]
    return c


@pytest.mark.parametrize("shape,bias,p", [((6, 300), True, 0.3), ((5000,), False, 1 / 3),
                                          ((3, 4, 37), True, 0.9)])
def test_mask_is_the_documented_philox_stream(device, shape, bias, p):
    """Element (row, col) of the [rows, n_cols] view the kernels walk (rows of the last dim with
    a bias, of QUARTER flat elements without) is dropped iff word row % 4 of Philox4x32-7 at
    counter (row // 4) * n_cols + col is <= ceil(p 2^32) - 1: the mask equals a numpy Philox
    bit for bit, with the seed as an int and as a tensor (CUDA graphs), so any change of the
    stream (rounds, words, counters, threshold) shows here."""
    n_cols = shape[-1] if bias else QUARTER
    n = math.prod(shape)
    o = np.arange(n, dtype=np.uint64)
    row, col = o // np.uint64(n_cols), o % np.uint64(n_cols)
    ones = torch.ones(shape, device=device)
    b = torch.zeros(shape[-1], device=device) if bias else None
    threshold = np.uint64(math.ceil(p * 2**32) - 1)
    for seed in (77, 2**31 - 3):
        words = _philox_numpy(seed, (row // np.uint64(4)) * np.uint64(n_cols) + col, 7)
        r = np.choose((row % np.uint64(4)).astype(np.int64), words)
        want = torch.from_numpy(r > threshold).reshape(shape).to(device)
        cfg = ad.DropoutConfig("identity", p, True, 0.01, 1.0, seed)
        for seed_tensor in (None, torch.tensor(seed, dtype=torch.int64, device=device)):
            y, = ad._forward(ones, b, seed_tensor, cfg if seed_tensor is None
                             else cfg._replace(philox_seed=0))
            assert torch.equal(y != 0, want), (seed, seed_tensor is not None)
        kept = want.sum().item()  # and the stream keeps 1 - p of the elements
        assert abs(kept - n * (1 - p)) <= 5 * math.sqrt(n * p * (1 - p)), (kept, n * (1 - p))


def test_fp32_gelu_as_accurate_as_torch(device):
    """fp32 GELU through the fitted normal CDF (tkern.activations._normal_cdf): on a dense grid
    over [-8, 8] and wide random values, its largest error against float64 is at most twice
    torch's own fp32 error (no absolute slack beyond 1e-7), forward and backward."""
    z = torch.cat([torch.linspace(-8, 8, 160001), torch.randn(40000) * 4,
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 5.6, -5.6, 5.59, -5.59, 30.0, -30.0])])
    z = z.to(device)
    zg, zt, zr = z.clone().requires_grad_(), z.clone().requires_grad_(), z.double().requires_grad_()
    y = tkern.activation_dropout(zg, "gelu", 0.0)
    theirs, ref = F.gelu(zt), F.gelu(zr)
    assert_close_rule(y, theirs, ref, atol=1e-7, name="gelu")
    dy = torch.ones_like(z)
    y.backward(dy)
    theirs.backward(dy)
    ref.backward(dy.double())
    assert_close_rule(zg.grad, zt.grad, zr.grad, atol=1e-7, name="gelu'")
    # relative precision where torch's 1 + erf cancels: z < 0 keeps its digits
    tail = (z < -1) & (z > -5)
    rel = ((y.double() - ref) / ref).abs()[tail].max().item()
    assert rel < 1e-5, rel


def test_gradient_mask_is_forward_mask(device):
    x = (torch.randn(5, 1000, device=device) + 0.05).requires_grad_()
    y = tkern.activation_dropout(x, "identity", 0.4)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad != 0, y != 0)
    assert torch.allclose(x.grad[y != 0], torch.full_like(x.grad[y != 0], 1 / 0.6))


def test_reproducible_and_fresh_masks(device):
    x = torch.randn(3000, device=device) + 0.1
    torch.manual_seed(123)
    a = tkern.activation_dropout(x, "relu", 0.5)
    b = tkern.activation_dropout(x, "relu", 0.5)
    torch.manual_seed(123)
    a2 = tkern.activation_dropout(x, "relu", 0.5)
    assert torch.equal(a, a2), "torch.manual_seed must reproduce the mask"
    assert not torch.equal(a != 0, b != 0), "consecutive calls must draw new masks"


def test_no_pattern_repeats_between_blocks(device):
    mask = _mask((4 * BLOCK,), 0.5, device, seed=3)
    quarters = mask.view(-1, QUARTER)  # each program draws one Philox call per quarter lane
    for i in range(quarters.shape[0]):
        for j in range(i + 1, quarters.shape[0]):
            agree = (quarters[i] == quarters[j]).float().mean().item()
            assert 0.35 < agree < 0.65, f"quarters {i} and {j} agree on {agree:.2f} of the mask"


def test_no_pattern_repeats_between_rows_with_a_bias(device):
    """With a bias, rows 4k..4k+3 share Philox calls (one word each) and row groups differ by
    counter: every pair of rows agrees on about half of a p = 0.5 mask, and each keeps about
    half."""
    mask = _mask((8, 1536), 0.5, device, seed=5, bias=True)
    for i in range(mask.shape[0]):
        assert 0.43 < mask[i].double().mean().item() < 0.57, i  # 5.5 sigma
        for j in range(i + 1, mask.shape[0]):
            agree = (mask[i] == mask[j]).double().mean().item()
            assert 0.43 < agree < 0.57, f"rows {i} and {j} agree on {agree:.2f} of the mask"


def test_eval_and_p_zero_give_the_activation(device):
    x = torch.randn(7, 33, device=device)
    expected = F.gelu(x)
    assert torch.allclose(tkern.activation_dropout(x, "gelu", 0.7, training=False), expected, atol=1e-6)
    assert torch.allclose(tkern.activation_dropout(x, "gelu", 0.0), expected, atol=1e-6)
    m = tkern.nn.ActivationDropout("gelu", p=0.7).eval()
    assert torch.allclose(m(x), expected, atol=1e-6)
    m.train()
    assert (m(x) == 0).any()


def test_p_one_gives_zeros_and_zero_grads(device):
    x = torch.randn(11, 13, device=device, requires_grad=True)
    b = torch.randn(13, device=device, requires_grad=True)
    y = tkern.activation_dropout(x, "elu", 1.0, bias=b)
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert torch.equal(b.grad, torch.zeros_like(b))


def test_errors(device):
    x = torch.randn(4, 5, device=device)
    for p in (-0.1, 1.5, float("nan")):
        # ValueError as the issue and F.dropout (out of range); also RuntimeError, torch's for NaN
        with pytest.raises(RuntimeError, match="between 0 and 1"):
            tkern.activation_dropout(x, "relu", p)
        with pytest.raises(ValueError, match="between 0 and 1"):
            tkern.activation_dropout(x, "relu", p)
        with pytest.raises(ValueError, match="between 0 and 1"):
            tkern.nn.ActivationDropout("relu", p)
    with pytest.raises(ValueError, match="relu.*leaky_relu.*sigmoid.*tanh.*gelu.*silu.*elu"):
        tkern.activation_dropout(x, "swish")
    with pytest.raises(ValueError, match="valid activations"):
        tkern.nn.ActivationDropout("swish")
    with pytest.raises(RuntimeError, match="approximate"):
        tkern.activation_dropout(x, "gelu", approximate="fast")
    with pytest.raises(RuntimeError, match="bias"):
        tkern.activation_dropout(x, "relu", bias=torch.randn(4, device=device))
    for shape in [(2, 5), (1, 1, 5), (5, 1)]:  # would change x's shape, or vary along dim 0
        with pytest.raises(RuntimeError, match="bias"):
            tkern.activation_dropout(x, "relu", bias=torch.randn(shape, device=device))
    with pytest.raises(RuntimeError, match="bias"):
        tkern.activation_dropout(torch.randn((), device=device), "relu",
                                 bias=torch.randn(1, device=device))
    with pytest.raises(TypeError, match="floating"):
        tkern.activation_dropout(torch.ones(3, dtype=torch.long, device=device), "relu")
    with pytest.raises(RuntimeError, match="same device"):
        tkern.activation_dropout(x, "relu", bias=torch.randn(5, device="meta"))


def test_empty_tensors(device):
    for shape in [(0,), (0, 5), (3, 0, 4), (3, 0)]:
        x = torch.randn(shape, device=device, requires_grad=True)
        b = torch.randn(shape[-1], device=device, requires_grad=True)
        y = tkern.activation_dropout(x, "tanh", 0.3, bias=b)
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape
        assert torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("with_bias", [False, True])
def test_non_contiguous_inputs(device, with_bias):
    base = torch.randn(9, 6, 10, device=device)
    views = {
        "transposed": base.transpose(0, 2),  # dense, permuted
        "sliced": base[:, ::2, 1:],  # gaps
        "channels_last": torch.randn(2, 5, 3, 7, device=device).to(memory_format=torch.channels_last),
    }
    for name, view in views.items():
        x = view.clone().requires_grad_()
        b = torch.randn(x.shape[-1], device=device, requires_grad=True) if with_bias else None
        y = tkern.activation_dropout(x, "leaky_relu", 0.0, bias=b, negative_slope=0.1)
        ref = F.leaky_relu(x.detach() + (b.detach() if with_bias else 0), 0.1)
        assert torch.allclose(y, ref, atol=1e-6), name
        if name != "sliced":
            assert y.stride() == x.stride(), f"{name}: layout not kept"
        dy = torch.randn_like(y).transpose(0, 1).contiguous().transpose(0, 1)  # yet another layout
        y.backward(dy)
        assert torch.allclose(x.grad, dy * torch.where(ref > 0, 1.0, 0.1), atol=1e-6), name


def test_dropout_mask_on_non_contiguous_matches_grad(device):
    x = (torch.randn(40, 30, device=device) + 0.1).t().requires_grad_()
    y = tkern.activation_dropout(x, "identity", 0.5)
    y.backward(torch.ones_like(y).contiguous())  # dy in a different layout from x
    assert torch.equal(x.grad != 0, y != 0)


def test_saved_tensors_are_x_and_bias_only(device):
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    x = torch.randn(33, 65, device=device, requires_grad=True)
    b = torch.randn(65, device=device, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = tkern.activation_dropout(x, "gelu", 0.5, bias=b)
    # x, the bias and (CPU: a 0-dim int64 tensor; CUDA: a host int) the seed: nothing mask-sized
    seed = [8] if device.type == "cpu" else []
    assert sorted(saved) == seed + [b.numel() * 4, x.numel() * 4], saved
    y.sum().backward()  # backward works from what was saved


def test_bias_gradient_fp32_accumulation(device):
    x = torch.randn(513, 17, device=device, dtype=torch.bfloat16)
    b = torch.randn(17, device=device, dtype=torch.float32, requires_grad=True)
    y = tkern.activation_dropout(x, "relu", 0.0, bias=b)
    assert y.dtype == torch.bfloat16
    dy = torch.randn_like(y)
    y.backward(dy)
    ref = ((x.double() + b.detach().double()) > 0) * dy.double()
    bt = b.detach().clone().requires_grad_()
    torch.relu(x + bt).backward(dy.float())  # torch's own: fp32 (x + b promotes)
    assert_close_rule(b.grad, bt.grad, ref.sum(0), name="dbias")


def test_module(device):
    m = tkern.nn.ActivationDropout("leaky_relu", p=0.25, negative_slope=0.3)
    assert "activation=leaky_relu" in repr(m) and "p=0.25" in repr(m) and "negative_slope=0.3" in repr(m)
    assert m.state_dict() == {}
    x = torch.randn(6, 7, device=device)
    m.eval()
    assert torch.allclose(m(x), F.leaky_relu(x, 0.3))
    assert "approximate='tanh'" in repr(tkern.nn.ActivationDropout("gelu", approximate="tanh"))


def test_eager_fallback_warns_once(device, monkeypatch):
    if device.type != "cpu":
        pytest.skip("the fallback is for CPU tensors")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_runtime, "_warned", set())
    x = torch.randn(50, 40) + 0.1
    with pytest.warns(RuntimeWarning, match="eager PyTorch"):
        y = tkern.activation_dropout(x, "relu", 0.0)
    assert torch.allclose(y, F.relu(x))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = tkern.activation_dropout(x, "identity", 0.5)  # no second warning
    keep = y != 0
    assert torch.allclose(y[keep], x[keep] * 2)
    assert abs(keep.float().mean().item() - 0.5) < 0.05


def test_opcheck(device):
    from tkern.ops.activation_dropout import OP

    x = torch.randn(4, 6, device=device, requires_grad=True)
    b = torch.randn(6, device=device, requires_grad=True)
    seed = torch.tensor(5)
    for args in [(x, b, seed, "gelu_tanh", 0.3, True, 0.01, 1.0, 0),
                 (x.t(), None, None, "elu", 0.0, False, 0.01, 0.5, 0),
                 (x, None, None, "relu", 0.4, True, 0.01, 1.0, 1234)]:  # the seed as an int
        torch.library.opcheck(OP._fwd_op, args)
    torch.library.opcheck(OP._bwd_op, ([torch.randn(4, 6, device=device)], [x.detach(), b.detach(), seed],
                                       "silu", 0.5, True, 0.01, 1.0, 0, [True, True]))


def test_torch_compile_fullgraph(device):
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    m = torch.nn.Sequential(torch.nn.Linear(6, 6), tkern.nn.ActivationDropout("gelu", 0.25)).to(device)
    compiled = torch.compile(m, fullgraph=True, backend=backend)
    x = torch.randn(5, 6, device=device, requires_grad=True)
    torch.manual_seed(11)
    y_c = compiled(x)
    y_c.sum().backward()
    g_c = x.grad.clone()
    x.grad = None
    torch.manual_seed(11)
    y_e = m(x)
    y_e.sum().backward()
    assert torch.allclose(y_c, y_e, atol=1e-6) and torch.allclose(g_c, x.grad, atol=1e-6)


def test_bias_strides_broadcasts_and_promotion(device):
    """Any bias torch's ``x + bias`` takes without changing x's shape: strided, expanded,
    broadcast from one element or [1, n]; the output keeps x's dtype (no promotion)."""
    x = torch.randn(3, 4, device=device, dtype=torch.float64)
    biases = {
        "strided": torch.arange(8.0, device=device, dtype=torch.float64)[::2],
        "expanded": torch.tensor([1.5], device=device, dtype=torch.float64).expand(4),
        "column of a matrix": torch.randn(4, 3, device=device, dtype=torch.float64)[:, 0],
        "0-dim": torch.tensor(0.7, device=device, dtype=torch.float64),
        "[1]": torch.randn(1, device=device, dtype=torch.float64),
        "[1, n]": torch.randn(1, 4, device=device, dtype=torch.float64),
    }
    for name, bias in biases.items():
        xo, xr = (x.clone().requires_grad_() for _ in range(2))
        bo, br = (bias.detach().clone().requires_grad_() for _ in range(2))
        y = tkern.activation_dropout(xo, "silu", 0.0, bias=bo)
        ref = F.silu(xr + br)
        assert y.shape == ref.shape, name
        assert_close_rule(y, ref, ref, name=name)
        dy = torch.randn_like(ref)
        y.backward(dy)
        ref.backward(dy)
        assert_close_rule(xo.grad, xr.grad, xr.grad, name=f"{name} dx")
        assert bo.grad.shape == bias.shape, name
        assert_close_rule(bo.grad, br.grad, br.grad, name=f"{name} dbias")
    for xd, bd in [(torch.float32, torch.float64), (torch.float16, torch.float32)]:
        y = tkern.activation_dropout(torch.randn(2, 4, device=device, dtype=xd), "relu", 0.0,
                                     bias=torch.randn(4, device=device, dtype=bd))
        assert y.dtype == xd


def test_bias_on_permuted_layouts_keeps_them(device):
    for x in (torch.randn(2, 5, 3, 4, device=device).contiguous(memory_format=torch.channels_last),
              torch.randn(7, 6, device=device).t()):
        b = torch.randn(x.shape[-1], device=device)
        y = tkern.activation_dropout(x, "gelu", 0.0, bias=b)
        assert y.stride() == x.stride()
        torch.testing.assert_close(y, F.gelu(x + b))
        # dropout: the mask follows memory order, and backward draws it where forward did
        xg = x.clone().requires_grad_()
        y = tkern.activation_dropout(xg, "identity", 0.5, bias=b)
        y.backward(torch.ones_like(y))
        assert torch.equal(xg.grad != 0, y != 0)


def test_probability_types(device):
    x = torch.randn(3, 4, device=device)
    ref = tkern.activation_dropout(x, "relu", 0.0)
    for p in (0, torch.tensor(0.0), torch.tensor([0.0]), __import__("numpy").float32(0.0)):
        torch.testing.assert_close(tkern.activation_dropout(x, "relu", p), ref)
    assert tkern.nn.ActivationDropout("relu", torch.tensor(0.25)).p == 0.25
    with pytest.raises(TypeError, match="number"):
        tkern.activation_dropout(x, "relu", "0.5")


@pytest.mark.parametrize("act,approximate", ACTS)
def test_nan_and_inf_follow_torch(device, act, approximate):
    """torch's values forward at NaN and +-inf, and backward at NaN (relu'(NaN) = elu'(NaN) = 1,
    as torch's backward formulas compare): the fused BatchNorm shares this table."""
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5, -0.5], device=device,
                     dtype=torch.float64)
    # gelu and silu at +-inf: torch's formulas give NaN (inf * 0) where the limits are finite
    keep = slice(0, 1) if act in ("gelu", "silu") else slice(None)
    xo, xr = (x.clone().requires_grad_() for _ in range(2))
    y = tkern.activation_dropout(xo, act, 0.0, approximate=approximate, **PARAMS)
    ref = _eager(xr, act, approximate)
    torch.testing.assert_close(y[keep], ref[keep], equal_nan=True)
    y.backward(torch.ones_like(y))
    if approximate == "none":  # NaN's gradient: torch's scalar loop (see _torch_scalar_loop)
        _, d_ref = _torch_scalar_loop(x.cpu()[:1], act, PARAMS)
        torch.testing.assert_close(xo.grad[:1].cpu(), d_ref, equal_nan=True)


# (activation, parameters, points): each kink and branch boundary, with a point either side
KINKS = [
    ("relu6", {}, [0.0, 6.0]),
    ("hardtanh", dict(min_val=-0.75, max_val=1.5), [-0.75, 1.5]),
    ("hardtanh", dict(min_val=0.5, max_val=0.5), [0.5]),
    ("hardswish", {}, [-3.0, 3.0]),
    ("hardsigmoid", {}, [-3.0, 3.0]),
    ("softplus", {}, [20.0, -20.0]),
    ("softplus", dict(beta=2.0, threshold=5.0), [2.5, 0.0]),
    ("softplus", dict(beta=-0.5, threshold=1.0), [-2.0]),
    ("elu", dict(alpha=1.3), [0.0]),
    ("leaky_relu", dict(negative_slope=0.2), [0.0]),
    ("mish", {}, [0.0, -30.0, 30.0]),
]


@pytest.mark.parametrize("act,params,points", KINKS, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kinks_and_nan_follow_torch(device, act, params, points, dtype):
    """Values and derivatives exactly at the kinks (relu6' is 0 at 0 and at 6, hardswish' 0 at -3
    and 1 at 3, softplus is linear above its threshold...) and at NaN and +-inf, as torch's."""
    pts = [q + d for q in points for d in (0.0, 1e-3, -1e-3)]
    x = torch.tensor(pts + [float("nan"), float("inf"), -float("inf")], dtype=dtype)
    y_ref, d_ref = _torch_scalar_loop(x, act, params)
    xo = x.to(device).requires_grad_()
    y = tkern.activation_dropout(xo, act, 0.0, **params)
    y.backward(torch.ones_like(y))
    finite_limit = slice(None) if act != "mish" else slice(0, -2)  # mish'(+-inf): inf * 0 = NaN
    torch.testing.assert_close(y.detach().cpu(), y_ref, equal_nan=True)
    torch.testing.assert_close(xo.grad.cpu()[finite_limit], d_ref[finite_limit], equal_nan=True)


def test_activation_parameter_errors(device):
    x = torch.randn(4, device=device)
    with pytest.raises(ValueError, match="min_val cannot be greater than max_val"):
        tkern.activation_dropout(x, "hardtanh", 0.0, min_val=1.0, max_val=0.0)
    with pytest.raises(ValueError, match="min_val cannot be greater than max_val"):
        tkern.nn.ActivationDropout("hardtanh", 0.1, min_val=1.0, max_val=0.0)
    m = tkern.nn.ActivationDropout("softplus", 0.1, beta=2.0, threshold=7.0)
    assert "beta=2.0" in repr(m) and "threshold=7.0" in repr(m)
    assert "min_val=-2.0" in repr(tkern.nn.ActivationDropout("hardtanh", 0.1, min_val=-2.0))


def test_dropped_inf_is_nan_like_torch(device):
    """A dropped inf or NaN gives NaN (torch's x * mask); finite dropped values give 0, and p = 1
    gives zeros on finite input."""
    x = torch.full((4096,), float("inf"), device=device)
    y = tkern.activation_dropout(x, "identity", 0.5)
    dropped = ~torch.isinf(y)
    assert dropped.any() and torch.isnan(y[dropped]).all()
    assert torch.equal(tkern.activation_dropout(torch.randn(64, device=device), "relu", 1.0),
                       torch.zeros(64, device=device))


@pytest.mark.parametrize("act,approximate", [("relu", "none"), ("gelu", "tanh"), ("silu", "none"),
                                             ("elu", "none")])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gradgradcheck(device, act, approximate, p):
    x = torch.randn(3, 5, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, device=device, dtype=torch.float64, requires_grad=True)
    gen_device = device if device.type == "cuda" else "cpu"
    g = torch.Generator(device=gen_device)

    def fn(x, b):  # the same mask on every call: reseed the generator each time
        g.manual_seed(99)
        return tkern.activation_dropout(x, act, p, bias=b, approximate=approximate, generator=g,
                                        **PARAMS)

    assert torch.autograd.gradgradcheck(fn, (x, b))


def test_double_backward_of_a_non_dense_input(device):
    """The copy forward makes of a non-dense x is not what autograd differentiates: the
    create_graph path works from the original x."""
    base = torch.randn(4, 6, device=device, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(tkern.activation_dropout(base[:, ::2], "silu", 0.0).sum(), base,
                               create_graph=True)
    (g_ref,) = torch.autograd.grad(F.silu(base[:, ::2]).sum(), base, create_graph=True)
    torch.testing.assert_close(g, g_ref)
    (gg,) = torch.autograd.grad(g.sum(), base)
    (gg_ref,) = torch.autograd.grad(g_ref.sum(), base)
    torch.testing.assert_close(gg, gg_ref)


def test_double_backward_mask_of_a_permuted_non_dense_input(device):
    """create_graph's mask is the forward's: drawn over the same (contiguous) walk of x."""
    leaf = torch.randn(12, 10, device=device, dtype=torch.float64, requires_grad=True)
    view = leaf.t()[:, ::2]  # column-major order, with gaps: forward walks a contiguous copy
    assert not _runtime.is_dense(view)
    g = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(5)
    y = tkern.activation_dropout(view, "identity", 0.5, generator=g)
    (d1,) = torch.autograd.grad(y.sum(), leaf, create_graph=True)
    (d0,) = torch.autograd.grad(y.sum(), leaf)
    torch.testing.assert_close(d1, d0)  # same mask both ways: first order and create_graph
    kept = (y != 0)
    assert torch.equal(d0.t()[:, ::2] != 0, kept)


def test_programs_match_the_launchers(device, monkeypatch):
    """The per-signature program (``ad._Program``, behind the checked-call cache) gives
    bit-for-bit what ``_forward`` / ``_backward`` give: with and without a bias, dropout on and
    off, every set of wanted gradients, a dy laid out otherwise than y (the launchers then), and
    seeds that switch between a device tensor and a host int from call to call (as entering and
    leaving CUDA-graph capture does: the cached program must not keep the other kind)."""
    from tkern.ops import _op

    draws = iter(range(10**6))

    def draw(dev, generator=None):  # alternate tensor seeds and int seeds, reproducibly
        k = next(draws)
        if k % 2:
            return None, 1000 + k
        return torch.tensor(2000 + k, dtype=torch.int64, device=dev), 0

    monkeypatch.setattr(ad._rng, "draw", draw)
    plain = ad.OP.make_program
    cases = [(dict(bias=True, p=0.3), ("x", "b")), (dict(bias=True, p=0.3), ("x",)),
             (dict(bias=True, p=0.3), ("b",)), (dict(bias=False, p=0.3), ("x",)),
             (dict(bias=False, p=0.0), ("x",)), (dict(bias=True, p=0.3, t=True), ("x", "b"))]
    for kw, wanted in cases:
        got = {}
        for use in (True, False):
            draws = iter(range(10**6))
            ad.OP.make_program = plain if use else None
            _op.clear_plan_caches()
            try:
                g = torch.Generator().manual_seed(5)
                x = torch.randn(9, 300, generator=g, dtype=torch.float64).to(device,
                                                                             torch.float32)
                x.requires_grad_()
                b = torch.randn(300, generator=g, dtype=torch.float64).to(device).float()
                b = b.requires_grad_() if kw["bias"] else None
                out = []
                for _ in range(3):  # tensor seed, int seed, tensor seed
                    y = tkern.activation_dropout(x, "gelu", kw["p"], bias=b)
                    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(device,
                                                                                   y.dtype)
                    if kw.get("t"):
                        dy = dy.t().contiguous().t()
                    inputs = [t for n, t in (("x", x), ("b", b)) if n in wanted and t is not None]
                    out += [y, *torch.autograd.grad(y, inputs, dy)]
                got[use] = out
            finally:
                ad.OP.make_program = plain
        for a, c in zip(got[True], got[False], strict=True):
            assert torch.equal(a, c), f"{kw} {wanted}"
    _op.clear_plan_caches()
    x = torch.randn(4, 8, device=device)
    tkern.activation_dropout(x, "gelu", 0.3)
    assert ad._CALLS.plans and all(prog is not None for _, prog, _ in ad._CALLS.plans.values())
