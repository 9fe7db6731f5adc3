"""tkern.weight_norm and tkern.nn.utils.weight_norm against PyTorch."""

import warnings

import pytest
import torch
from torch.nn.utils import parametrizations, parametrize

import tkern
from tkern import _runtime
from tkern.ops import weight_norm as wn_mod
from tkern.testing import assert_close_rule

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SHAPES = [(7, 13), (5, 3, 11), (6, 5, 3, 3)]


def _torch_dim(dim):
    return -1 if dim is None else dim


def _dims(ndim):
    # 0, 1, -1 (torch: whole tensor), the last dim by its positive index, None, -2
    return [0, 1, -1, ndim - 1, None, -2]


def _inputs(shape, dim, device, dtype, g_dtype=None):
    """fp64 leaves (v, g, gw) and copies at ``dtype``; g has norm_except_dim's shape."""
    v64 = torch.randn(shape, device=device, dtype=torch.float64)
    g_shape = torch.norm_except_dim(v64, 2, _torch_dim(dim)).shape
    g64 = torch.randn(g_shape, device=device, dtype=torch.float64) * 2
    gw64 = torch.randn(shape, device=device, dtype=torch.float64)
    v = v64.to(dtype)
    g = g64.to(g_dtype or dtype)
    return v64.requires_grad_(), g64.requires_grad_(), gw64, v, g


def _run(fn, v, g, dim, gw):
    v = v.detach().clone().requires_grad_()
    g = g.detach().clone().requires_grad_()
    w = fn(v, g, dim)
    w.backward(gw.to(w.dtype))
    return w, v.grad, g.grad


def _torch_wn(v, g, dim):
    return torch._weight_norm(v, g, _torch_dim(dim))


def _check_against_torch(shape, dim, device, dtype):
    v64, g64, gw64, v, g = _inputs(shape, dim, device, dtype)
    ours = _run(tkern.weight_norm, v, g, dim, gw64)
    theirs = _run(_torch_wn, v, g, dim, gw64)
    ref = _run(_torch_wn, v64, g64, dim, gw64)
    for name, a, b, r in zip(("w", "grad_v", "grad_g"), ours, theirs, ref):
        assert a.shape == b.shape, name
        assert_close_rule(a, b, r, name=f"{name} dim={dim} {tuple(shape)}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_torch_every_dim(device, shape, dtype):
    for dim in _dims(len(shape)):
        _check_against_torch(shape, dim, device, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_harness_row_structure(device, dtype):
    """The perf harness's weights (Linear 4096 wide, conv 512x3x3 per output channel) with fewer
    rows: the production block sizes (one pass over 4096 and over 4608 of 8192 lanes)."""
    for shape in ((8, 4096), (16, 512, 3, 3)):
        plan = wn_mod._plan(*wn_mod._geometry(shape, 0))
        assert plan["one_pass"] and plan["split"] == 1 and plan["block_r"] >= 4096
        _check_against_torch(shape, 0, device, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_dim_and_layout_paths(device, dtype, monkeypatch):
    """Every kernel path on small tensors: one pass, looped, split reduction, per layout."""
    _check_against_torch((11,), 0, device, dtype)  # 1-D: one norm per element
    _check_against_torch((11,), None, device, dtype)
    # Long slices (R = 3*5*11 = 165) with the tile shrunk: looped passes and the split reduction.
    monkeypatch.setattr(wn_mod, "TILE", 64)
    monkeypatch.setattr(wn_mod, "ONE_PASS_MAX", 64)
    monkeypatch.setattr(wn_mod, "COLS_BLOCK_D", 2)
    for split_below in (0, 1 << 30):  # never split / always split
        monkeypatch.setattr(wn_mod, "SPLIT_BELOW", split_below)
        monkeypatch.setattr(wn_mod, "SPLIT_TARGET", 8)
        for shape, dim in (((5, 3, 5, 11), 0), ((3, 5, 11, 5), 3), ((3, 5, 5, 11), 1),
                           ((3, 5, 11), None)):
            plan = wn_mod._plan(*wn_mod._geometry(shape, wn_mod._normalize_dim(dim, len(shape))))
            assert not plan["one_pass"]
            assert (plan["split"] > 1) == (split_below > 0), plan
            _check_against_torch(shape, dim, device, dtype)


def test_int64_indexing_path(device, monkeypatch):
    """Tensors past 2^31 elements do not fit here; the INT64 variant is checked on a small one."""
    monkeypatch.setattr(_runtime, "needs_int64", lambda *t, **k: True)
    monkeypatch.setattr(wn_mod, "TILE", 64)
    monkeypatch.setattr(wn_mod, "ONE_PASS_MAX", 64)
    monkeypatch.setattr(wn_mod, "SPLIT_BELOW", 1 << 30)
    monkeypatch.setattr(wn_mod, "SPLIT_TARGET", 8)
    _check_against_torch((3, 5, 41), 1, device, torch.float32)
    _check_against_torch((5, 131), 0, device, torch.float32)


def test_int64_rule():
    """Which shapes index in int64: masked lanes past the end count (meta tensors, no memory)."""
    def needs(shape, dim):
        v = torch.empty(shape, device="meta")
        nd = wn_mod._normalize_dim(dim, len(shape))
        outer, D, inner = wn_mod._geometry(shape, nd)
        return wn_mod._needs_int64(v, wn_mod._plan(outer, D, inner), D, inner)

    assert not needs((32 * 4096, 4096), 0)  # the harness's largest stack stays int32
    assert not needs((512, 512, 3, 3), 1)
    assert needs((1 << 16, 1 << 15), 0)  # 2^31 elements
    # 2M elements below 2^31, but a last row block's masked lanes reach ~2^28 past the end
    assert needs(((1 << 10) - 1, 1 << 21), 1)
    assert not _runtime.needs_int64(torch.empty(((1 << 10) - 1, 1 << 21), device="meta"))


@pytest.mark.parametrize("dim", [0, 1, 2, -1, -2, None])
def test_gradcheck(device, dim):
    v = torch.randn(3, 4, 2, device=device, dtype=torch.float64, requires_grad=True)
    g = torch.randn(torch.norm_except_dim(v, 2, _torch_dim(dim)).shape, device=device,
                    dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: tkern.weight_norm(a, b, dim), (v, g))


@pytest.mark.parametrize("dim", [1, None])
def test_gradgradcheck(device, dim):
    """Double backward (create_graph=True), as torch's weight norm supports."""
    v = torch.randn(3, 2, 2, device=device, dtype=torch.float64, requires_grad=True)
    g = torch.randn(torch.norm_except_dim(v, 2, _torch_dim(dim)).shape, device=device,
                    dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: tkern.weight_norm(a, b, dim), (v, g))
    # gradgradcheck differentiates whatever backward computes: check its values against torch too
    gw = torch.randn(v.shape, device=device, dtype=torch.float64)
    ours = torch.autograd.grad(tkern.weight_norm(v, g, dim), (v, g), gw, create_graph=True)
    theirs = torch.autograd.grad(torch._weight_norm(v, g, _torch_dim(dim)), (v, g), gw)
    for a, b in zip(ours, theirs):
        assert a.requires_grad
        torch.testing.assert_close(a, b)


def test_gradcheck_split_path(device, monkeypatch):
    monkeypatch.setattr(wn_mod, "TILE", 4)
    monkeypatch.setattr(wn_mod, "ONE_PASS_MAX", 4)
    monkeypatch.setattr(wn_mod, "SPLIT_BELOW", 1 << 30)
    monkeypatch.setattr(wn_mod, "SPLIT_TARGET", 4)
    v = torch.randn(2, 7, device=device, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 1, device=device, dtype=torch.float64, requires_grad=True)
    assert wn_mod._plan(1, 2, 7)["split"] > 1
    assert torch.autograd.gradcheck(lambda a, b: tkern.weight_norm(a, b, 0), (v, g))


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning",
                            "ignore:invalid value:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("dim,dtype", [(0, torch.float32), (1, torch.float32), (2, torch.float32),
                                       (None, torch.float32), (0, torch.bfloat16)])
def test_zero_norm_slice_like_torch(device, dim, dtype):
    """A zero slice of v: torch divides by the zero norm (NaN in w, grad_v and grad_g of that
    slice); tkern must give the same NaNs and the same values elsewhere."""
    shape = (4, 5, 3)
    v64, g64, gw64, _, _ = _inputs(shape, dim, device, torch.float64)
    v = v64.detach().to(dtype)
    g = g64.detach().to(dtype)
    if dim is None:
        v.zero_()
    else:
        index = [slice(None)] * 3
        index[dim] = 1
        v[tuple(index)] = 0
        g.view(-1)[2] = 0  # g = 0 on a non-zero slice: w = 0 there, no NaN
    ours = _run(tkern.weight_norm, v, g, dim, gw64)
    theirs = _run(_torch_wn, v, g, dim, gw64)
    for name, a, b in zip(("w", "grad_v", "grad_g"), ours, theirs):
        assert torch.equal(a.isnan(), b.isnan()), f"{name}: NaN positions differ from torch"
        assert a.isnan().any(), name
        ok = ~b.isnan()
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(a[ok], b[ok], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("v_dtype,g_dtype", [(torch.float16, torch.float32),
                                             (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.float64)])
def test_mixed_dtypes_promote_like_torch(device, v_dtype, g_dtype):
    """torch's composite path (a middle dim) returns result_type(v, g); tkern does so for every
    dim.  Gradients keep each input's dtype."""
    v64, g64, gw64, v, g = _inputs((5, 7, 3), 1, device, v_dtype, g_dtype)
    ours = _run(tkern.weight_norm, v, g, 1, gw64)
    theirs = _run(_torch_wn, v, g, 1, gw64)
    ref = _run(_torch_wn, v64, g64, 1, gw64)
    out_dtype = torch.promote_types(v_dtype, g_dtype)
    assert ours[0].dtype == theirs[0].dtype == out_dtype
    assert ours[1].dtype == v_dtype and ours[2].dtype == g_dtype
    assert_close_rule(ours[0], theirs[0], ref[0], name="w")
    # torch's own fp16 norm is coarser than tkern's fp32 one: gradients within the dtype's atol
    torch.testing.assert_close(ours[1].double(), ref[1].detach(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours[2].double(), ref[2].detach(), rtol=2e-2, atol=2e-2)
    for dim in (0, 2, None):  # where torch's fused CPU kernel rejects mixed dtypes
        _, _, _, v, g = _inputs((5, 7, 3), dim, device, v_dtype, g_dtype)
        w = tkern.weight_norm(v, g, dim)
        ref = _torch_wn(v.double(), g.double(), dim)
        assert w.dtype == torch.result_type(v, g)
        torch.testing.assert_close(w.double(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rounding_like_torch(device, dtype):
    """bf16/fp16: the per-slice scale is rounded where torch rounds it (its composite path: the
    norm to v's dtype, g / norm to promote(g, v)); its fused path (bf16, dim 0 or last) keeps the
    scale in fp32.  So outputs equal torch's (bar a rare element whose fp32 sum order differs), and
    a weight split by right_inverse comes back exactly: the parametrization does not perturb a
    pretrained low-precision model."""
    for shape, dim in (((37, 29), 0), ((37, 29), 1), ((7, 5, 9), 1), ((7, 5, 9), None)):
        v = torch.randn(shape, device=device).to(dtype)
        g_shape = torch.norm_except_dim(v, 2, _torch_dim(dim)).shape
        g = (torch.rand(g_shape, device=device) + 0.5).to(dtype)
        same = (tkern.weight_norm(v, g, dim) == torch._weight_norm(v, g, _torch_dim(dim)))
        if dtype == torch.bfloat16:  # torch's fp16 norm on CPU is less accurate than fp32 sums
            assert same.float().mean() > 0.99, (shape, dim)
        g = torch.norm_except_dim(v, 2, _torch_dim(dim))
        composite = dtype == torch.float16 or dim not in (0, len(shape) - 1)
        if composite:
            assert torch.equal(tkern.weight_norm(v, g, dim), v), (shape, dim)


def test_torch_parametrization_test_inputs(device):
    """PyTorch's own test_weight_norm_parametrization, run on tkern's parametrization, in fp32.

    torch's test also runs bf16 and compares exactly with the layer before parametrization; whether
    g * v / ||v|| rounds back onto the same bf16 weights depends on the data (torch 2.11's own
    weight norm fails it on this seed), so bf16 is checked by the rule below instead."""
    dtype = torch.float
    torch.manual_seed(0)
    x = torch.randn(3, 4, dtype=dtype, device=device)
    m = torch.nn.Linear(4, 5, dtype=dtype, device=device)
    expected = m(x)
    m = tkern.nn.utils.weight_norm(m)
    assert m.parametrizations.weight.original1.size() == m.weight.size()
    assert m.parametrizations.weight.original0.size() == (5, 1)
    torch.testing.assert_close(m(x), expected)
    parametrize.remove_parametrizations(m, "weight")
    assert not hasattr(m, "parametrizations")
    torch.testing.assert_close(m(x), expected)
    m = tkern.nn.utils.weight_norm(m, dim=1)
    assert m.parametrizations.weight.original0.size() == (1, 4)
    torch.testing.assert_close(m(x), expected)
    m = torch.nn.Linear(4, 5, dtype=dtype, device=device)
    expected = m(x)
    m = tkern.nn.utils.weight_norm(m, dim=None)
    torch.testing.assert_close(m(x), expected)


@pytest.mark.parametrize("dim", [0, 1, None])
def test_parametrization_low_precision_layer(device, dim):
    """bf16/fp16 layers under tkern's parametrization: the output obeys the tolerance rule against
    the fp64 layer with the original weights, with torch's own parametrization as the same-dtype
    result, over several fresh draws (a data-independent form of torch's bf16 check)."""
    import copy

    for dtype in (torch.bfloat16, torch.float16):
        for _ in range(3):
            x = torch.randn(3, 29, device=device, dtype=dtype)
            lin = torch.nn.Linear(29, 37, device=device, dtype=dtype)
            ref = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
            theirs = parametrizations.weight_norm(copy.deepcopy(lin), dim=dim)
            ours = tkern.nn.utils.weight_norm(copy.deepcopy(lin), dim=dim)
            with torch.no_grad():
                assert_close_rule(ours(x), theirs(x), ref, name=f"{dtype} dim={dim}")
                parametrize.remove_parametrizations(ours, "weight")
                parametrize.remove_parametrizations(theirs, "weight")
                assert_close_rule(ours.weight, theirs.weight, lin.weight.double(), name="weight")


def test_layouts_and_expanded_gradient(device):
    """A transposed v, a g with a non-unit stride, and a broadcast (stride-0) incoming gradient."""
    base = torch.randn(9, 6, device=device, dtype=torch.float32)
    v = base.t()  # (6, 9), not contiguous
    g = torch.randn(6, 3, device=device)[:, 1:2]  # (6, 1) with strides (3, 1)
    vt, gt = v.detach().clone().requires_grad_(), g.detach().clone().requires_grad_()
    vo, go = v.detach().clone().requires_grad_(), g.detach().clone().requires_grad_()
    vo_nc = vo.t().contiguous().t()  # same values, transposed strides, still a view of a leaf
    w = tkern.weight_norm(vo_nc, go, 0)
    wr = torch._weight_norm(vt, gt, 0)
    torch.testing.assert_close(w, wr)
    w.sum().backward()
    wr.sum().backward()
    torch.testing.assert_close(vo.grad, vt.grad)
    torch.testing.assert_close(go.grad, gt.grad)


def test_opcheck(device):
    """The custom ops' schemas, fake implementations and autograd registration."""
    v = torch.randn(5, 3, 2, device=device, requires_grad=True)
    g = torch.randn(3, 1, device=device).t().reshape(1, 3, 1).requires_grad_()
    torch.library.opcheck(wn_mod.OP._fwd_op, (v, g, 1))
    torch.library.opcheck(wn_mod.OP._bwd_op, ([torch.randn(5, 3, 2, device=device)],
                                              [v.detach(), g.detach(),
                                               torch.rand(3, device=device) + 1], 1, [True, True]))


def test_torch_compile_fullgraph(device):
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    m = tkern.nn.utils.weight_norm(torch.nn.Linear(7, 5).to(device))
    compiled = torch.compile(m, fullgraph=True, backend=backend)
    x = torch.randn(3, 7, device=device)
    compiled(x).square().sum().backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    expected = m(x)
    expected.square().sum().backward()
    torch.testing.assert_close(compiled(x), expected)
    for a, p in zip(grads, m.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_torch_func_grad(device):
    """torch.func.grad through functional_call of a weight-normed module."""
    m = tkern.nn.utils.weight_norm(torch.nn.Linear(5, 3).to(device))
    params = {k: p.detach() for k, p in m.named_parameters()}
    x = torch.randn(4, 5, device=device)
    grads = torch.func.grad(lambda p: torch.func.functional_call(m, p, (x,)).square().sum())(params)
    m(x).square().sum().backward()
    for k, p in m.named_parameters():
        torch.testing.assert_close(grads[k], p.grad)


def test_bad_inputs_raise_like_torch(device):
    v = torch.randn(3, 4, 5, device=device)
    g = torch.randn(3, 1, 1, device=device)
    for dim in (3, -4, 7):
        with pytest.raises(IndexError):
            torch._weight_norm(v, g, dim)
        with pytest.raises(IndexError, match="tkern.weight_norm"):
            tkern.weight_norm(v, g, dim)
    with pytest.raises(IndexError):
        tkern.weight_norm(torch.tensor(2.0, device=device), torch.tensor(1.0, device=device), 0)
    with pytest.raises(RuntimeError, match="tkern.weight_norm"):
        tkern.weight_norm(v, torch.randn(2, 1, 1, device=device), 0)
    for dim in (0, 1, -1):  # torch: NotImplementedError (its fused kernel) or RuntimeError
        with pytest.raises(NotImplementedError, match="tkern.weight_norm"):
            tkern.weight_norm(v.int(), g.int(), dim)
        with pytest.raises(RuntimeError):
            tkern.weight_norm(v.int(), g.int(), dim)
    with pytest.raises(TypeError, match="tkern.weight_norm"):
        tkern.weight_norm(v, g, 0.0)
    # an integer g with a floating v promotes, as torch's composite does; dim accepts int-likes
    gi = torch.randint(1, 4, (1, 4, 1), device=device)
    w = tkern.weight_norm(v, gi, torch.tensor(1))
    assert w.dtype == v.dtype
    torch.testing.assert_close(w, torch._weight_norm(v, gi, 1))


def test_cpu_fallback_without_interpreter(monkeypatch):
    """CPU tensors without the interpreter run torch's op (with one warning)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_runtime, "_warned", set())
    v = torch.randn(5, 7, dtype=torch.float64)
    g = torch.randn(5, 1, dtype=torch.float64)
    def no_kernels(*args, **kwargs):
        raise AssertionError("the Triton launcher ran without the interpreter")

    monkeypatch.setattr(wn_mod, "_forward", no_kernels)
    with pytest.warns(RuntimeWarning, match="tkern.weight_norm"):
        w = tkern.weight_norm(v, g, 0)
    torch.testing.assert_close(w, torch._weight_norm(v, g, 0))
    w16 = tkern.weight_norm(v.half(), g.float(), 0)  # mixed dtypes promote here too
    assert w16.dtype == torch.float32
    v3, g1 = torch.randn(5, 7, 3).half(), torch.randn(1, 7, 1)  # a middle dim: torch's composite
    torch.testing.assert_close(tkern.weight_norm(v3, g1, 1), torch._weight_norm(v3, g1, 1),
                               rtol=0, atol=0)


# ---------------------------------------------------------------- the parametrization

def _modules(device, kind, dim):
    def make():  # the same initial weights for both
        torch.manual_seed(3)
        return torch.nn.Linear(13, 7) if kind == "linear" else torch.nn.Conv2d(5, 6, 3)

    ours = tkern.nn.utils.weight_norm(make().to(device), dim=dim)
    theirs = parametrizations.weight_norm(make().to(device), dim=dim)
    return ours, theirs


def _input(device, kind):
    return torch.randn((4, 13) if kind == "linear" else (2, 5, 7, 7), device=device)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("dim", [0, 1, None])
def test_state_dict_interchange(device, kind, dim):
    ours, theirs = _modules(device, kind, dim)
    assert isinstance(ours.parametrizations.weight[0], parametrizations._WeightNorm)
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_theirs)
    assert "parametrizations.weight.original0" in sd_ours
    for key in sd_ours:
        assert sd_ours[key].shape == sd_theirs[key].shape, key
    torch.testing.assert_close(ours.weight, theirs.weight)  # same init, same right_inverse
    x = _input(device, kind)

    # torch -> tkern
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours(x), theirs(x))
    # tkern -> torch
    with torch.no_grad():
        for p in ours.parameters():
            p.mul_(1.5)
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(theirs(x), ours(x))


def test_legacy_keys_and_removal(device):
    old = torch.nn.Linear(11, 5).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.nn.utils.weight_norm(old)  # deprecated hook version: weight_g / weight_v keys
    m = tkern.nn.utils.weight_norm(torch.nn.Linear(11, 5).to(device))
    m.load_state_dict(old.state_dict())
    x = torch.randn(3, 11, device=device)
    torch.testing.assert_close(m(x), old(x))

    weight = m.weight.detach().clone()
    parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    assert not parametrize.is_parametrized(m)
    assert isinstance(m.weight, torch.nn.Parameter)
    torch.testing.assert_close(m.weight, weight)
    assert sorted(m.state_dict()) == ["bias", "weight"]


def test_training_matches_torch(device):
    """A few SGD steps of a weight-normed Linear: tkern's and torch's stay together."""
    ours, theirs = _modules(device, "linear", 0)
    ours, theirs = ours.double(), theirs.double()
    ours.load_state_dict(theirs.state_dict())
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.2, momentum=0.9)
    opt_t = torch.optim.SGD(theirs.parameters(), lr=0.2, momentum=0.9)
    x = torch.randn(8, 13, device=device, dtype=torch.float64)
    y = torch.randn(8, 7, device=device, dtype=torch.float64)
    for _ in range(4):
        for model, opt in ((ours, opt_o), (theirs, opt_t)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)
    assert not torch.allclose(ours.weight, _modules(device, "linear", 0)[1].double().weight)
