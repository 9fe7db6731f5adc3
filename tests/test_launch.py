"""tkern's launch path (``tkern/_launch.py``) on CPU: its cache key is never coarser than Triton's
own specialisation, and a cache hit hands the compiled launcher exactly what ``JITFunction.run``
would (checked against Triton's real argument binder for an sm_90 backend, on every launch the
ops make here).  The launcher call itself needs a GPU (tests/test_gpu.py)."""

import pytest
import torch
import triton
import triton.language as tl

import tkern
from tkern import _launch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="records interpreted launches")


def _binder(fn):
    """Triton's binder for an interpreted kernel, as its CUDA launch would run it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    keep = ("do_not_specialize", "do_not_specialize_on_alignment")
    jf = JITFunction(fn.fn, **{k: v for k, v in fn.kwargs.items() if k in keep})
    return create_function_from_signature(jf.signature, jf.params,
                                          make_backend(GPUTarget("cuda", 90, 32)))


class _Recorder:
    """Every interpreted launch as (kernel, args, kwargs), kernels still run."""

    def __init__(self):
        self.launches = []

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction
        self._cls, self._orig = InterpretedFunction, InterpretedFunction.run
        rec = self

        def run(fn, *args, grid, warmup, **kwargs):
            rec.launches.append((fn, args, dict(kwargs)))
            return rec._orig(fn, *args, grid=grid, warmup=warmup, **kwargs)

        InterpretedFunction.run = run
        return self

    def __exit__(self, *exc):
        self._cls.run = self._orig


def _triton_view(fn, binders, args, kwargs):
    """(specialisation + options, bound argument values) as Triton's run computes them."""
    b = binders.get(fn.fn)
    if b is None:
        b = binders[fn.fn] = _binder(fn)
    kw = dict(kwargs, debug=False, instrumentation_mode="")
    bound, spec, options = b(*args, **kw)
    return (tuple(spec), tuple(sorted((k, str(v)) for k, v in options.items()))), tuple(bound.values())


def _check_launches(launches):
    binders, seen, params = {}, {}, {}
    for fn, args, kwargs in launches:
        info = params.get(fn.fn)
        if info is None:
            info = params[fn.fn] = _launch._Params(fn.fn, fn.kwargs.get("do_not_specialize"))
        key = (fn.fn, _launch.launch_key(args, kwargs, info))
        spec, bound = _triton_view(fn, binders, args, kwargs)
        # one key, one Triton variant
        assert seen.setdefault(key, spec) == spec, fn.fn.__name__
        # what a hit passes the launcher: the bound arguments in signature order
        entry = _launch.Entry(None, info.params, len(args), kwargs)
        full = entry.full_args(args, kwargs)
        assert len(full) == len(bound)
        for a, b in zip(full, bound):
            assert a is b or a == b
    return seen


def _op_calls(device):
    x = torch.randn(4, 6, 5, 3, device=device, requires_grad=True)
    bn = tkern.nn.BatchNorm2d(6, activation="relu").to(device)
    bn(x).sum().backward()
    bn(x.to(memory_format=torch.channels_last)).sum().backward()
    bn(x[:, :, 1:]).sum().backward()  # another plan
    bn.eval()
    bn(x).sum().backward()
    y = torch.randn(64, device=device, requires_grad=True)
    b = torch.randn(8, device=device, requires_grad=True)
    for t in (y.view(8, 8), y[1:].view(7, 9)):  # aligned and misaligned data pointers
        tkern.activation_dropout(t, "gelu", 0.2, bias=b if t.shape[-1] == 8 else None,
                                 training=True).sum().backward()
    tkern.local_response_norm(torch.randn(2, 7, 5, 5, device=device, requires_grad=True), 3).sum()
    v = torch.randn(6, 5, device=device, requires_grad=True)
    tkern.weight_norm(v, torch.rand(6, 1, device=device) + 0.5, 0).sum().backward()


def test_key_never_coarser_than_triton_on_op_launches(device):
    with _Recorder() as rec:
        _op_calls(device)
    assert len(rec.launches) >= 12
    seen = _check_launches(rec.launches)
    assert len(seen) >= 8  # the calls above do make distinct signatures


@triton.jit(do_not_specialize=["seed"])
def _probe(X, n, seed, f, flag, B: tl.constexpr, F: tl.constexpr = 0.5):
    pass


def test_key_separates_what_triton_specialises():
    x = torch.randn(64)
    cases = [
        ((x, 5, 7, 1.0, True), {"B": 4}),
        ((x[1:], 5, 7, 1.0, True), {"B": 4}),  # misaligned pointer
        ((x.double(), 5, 7, 1.0, True), {"B": 4}),  # dtype
        ((x, 1, 7, 1.0, True), {"B": 4}),  # n == 1
        ((x, 16, 7, 1.0, True), {"B": 4}),  # n % 16
        ((x, 5, 2**40, 1.0, True), {"B": 4}),  # unspecialised int, wider
        ((x, 5, 2**63, 1.0, True), {"B": 4}),  # unsigned 64
        ((x, 5, 7, 1.0, 1), {"B": 4}),  # an int where a bool was
        ((x, 5, 7, 1.0, True), {"B": 8}),  # constexpr
        ((x, 5, 7, 1.0, True), {"B": 4, "num_warps": 2}),  # option
        ((x, 5, 7, 1.0, True), {"B": 4, "F": 0.25}),  # a constexpr float's value
        ((x, 5, 7, 1.0, True, 4, 0.75), {}),  # the same, positionally
        ((x, 5, 8, 2.0, True), {"B": 4}),  # same variant: a new seed and float
    ]
    _check_launches([(_probe, a, k) for a, k in cases])
    info = _launch._Params(_probe.fn, ["seed"])
    keys = [_launch.launch_key(a, k, info) for a, k in cases]
    assert len(set(keys[:-1])) == len(keys) - 1  # every variant its own key
    # an unspecialised seed does not miss the cache when only its value changes
    assert (_launch.launch_key((x, 5, 9, 3.0, True), {"B": 4}, info)
            == keys[0])


class _FakeCompiled:
    """What ``JITFunction.run`` returns: a kernel with a launcher (recording its calls)."""

    def __init__(self):
        self.calls = []
        self.function, self.packed_metadata = "fn-handle", "meta"

    @property
    def run(self):
        return lambda *a: self.calls.append(a)


def _fake_gpu(monkeypatch, fn, dns=(), stream=1234, record=None):
    """``fn`` as a ``_FastJIT`` kernel on a pretend GPU: Triton's run records its calls (as
    ``record(args, kwargs)``) and returns a ``_FakeCompiled``; device 0, raw stream ``stream``."""
    jf = triton.runtime.jit.JITFunction(fn, do_not_specialize=list(dns))
    jf.__class__ = _launch._FastJIT
    jf._tk_params, jf._tk_cache = _launch._Params(jf.fn, jf.do_not_specialize), {}
    compiled, slow = _FakeCompiled(), []

    def triton_run(self, *args, grid, warmup, **kwargs):
        slow.append(record(args, kwargs) if record else args)
        return compiled

    monkeypatch.setattr(triton.runtime.jit.JITFunction, "run", triton_run)
    monkeypatch.setattr(_launch, "_TRITON_RUN", triton_run)  # Triton's own, not a recorder
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 0, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda d: stream, raising=False)
    return jf, compiled, slow


def test_fast_path_hands_the_launcher_tritons_arguments(monkeypatch):
    jf, compiled, slow = _fake_gpu(monkeypatch, _probe.fn, dns=["seed"], stream=1234)
    x = torch.randn(16)
    assert jf[(3,)](x, 5, 7, 1.5, True, B=4) is compiled
    assert len(slow) == 1 and not compiled.calls  # the first launch is Triton's
    jf[(3, 2)](x, 5, 11, 2.5, True, B=4)  # a new seed and float: same variant, tkern's path
    assert len(slow) == 1
    (call,) = compiled.calls
    assert call[:9] == (3, 2, 1, 1234, "fn-handle", "meta", None, None, None)
    assert call[9:] == (x, 5, 11, 2.5, True, 4, 0.5)  # defaults filled in, as Triton's binder
    jf[(1,)](x[1:], 5, 11, 2.5, True, B=4)  # misaligned: Triton's path again
    assert len(slow) == 2
    jf[lambda meta: (1,)](x, 5, 11, 2.5, True, B=4)  # a callable grid: Triton's path
    assert len(slow) == 3


def test_site_hands_the_launcher_tritons_arguments(monkeypatch):
    """``Site``: everything but the leading tensors fixed; a hit passes tensors, tail and the
    remaining parameters (keywords, defaults) in signature order."""
    jf, compiled, slow = _fake_gpu(monkeypatch, _probe.fn, dns=["seed"], stream=99,
                                   record=lambda a, k: (a, k))
    site = _launch.Site(jf, (4,), (5, 7, 1.5), flag=True, B=8)
    x, y = torch.randn(16), torch.randn(32)
    site(x)
    assert slow == [((x, 5, 7, 1.5), {"flag": True, "B": 8})] and not compiled.calls
    site(y)  # another tensor, same dtype and alignment: tkern's path
    assert len(slow) == 1
    assert compiled.calls == [(4, 1, 1, 99, "fn-handle", "meta", None, None, None,
                               y, 5, 7, 1.5, True, 8, 0.5)]
    site(y[1:])  # misaligned: a new variant, Triton's path
    site(y.double())
    assert len(slow) == 3
    monkeypatch.setattr(triton.runtime.jit.JITFunction, "run", lambda *a, **k: slow.append(a))
    site(y)  # Triton's run replaced (a recorder): it sees the launch
    assert len(slow) == 4 and len(compiled.calls) == 1


@triton.jit
def _probe_named(X, n, R, HAS_R: tl.constexpr = False, B: tl.constexpr = 4):
    pass


def test_site_named_tensors(monkeypatch):
    """Tensors late in the signature go by keyword (``named``): a hit puts them in their slots."""
    jf, compiled, slow = _fake_gpu(monkeypatch, _probe_named.fn, stream=7,
                                   record=lambda a, k: (a, k))
    site = _launch.Site(jf, (2, 3), (5,), ("R",), HAS_R=True)
    x, r, r2 = torch.randn(8), torch.randn(8), torch.randn(8)
    site(x, r)
    assert slow == [((x, 5), {"HAS_R": True, "R": r})]
    site(x, r2)
    assert compiled.calls == [(2, 3, 1, 7, "fn-handle", "meta", None, None, None,
                               x, 5, r2, True, 4)]


def test_fixed_dtype_site_keys_on_alignment(monkeypatch):
    """``Site.fixed_dtypes()`` (programs: dtypes fixed by their signature): keyed by alignment
    alone; a misaligned tensor is a variant of its own, which goes through Triton's run first."""
    jf, compiled, slow = _fake_gpu(monkeypatch, _probe.fn, dns=["seed"], stream=5)
    site = _launch.Site(jf, (4,), (5, 7, 1.5), flag=True, B=8).fixed_dtypes()
    x, y = torch.randn(16), torch.randn(32)
    site(x)
    site(y)
    assert len(slow) == 1 and compiled.calls[-1][9] is y
    site(y[1:])  # misaligned: Triton's path, then its own entry
    site(y[1:])
    assert len(slow) == 2 and len(compiled.calls) == 2 and compiled.calls[-1][9].data_ptr() & 15
    site(x)
    assert len(slow) == 2 and compiled.calls[-1][9] is x


def test_aligned_site_call(monkeypatch):
    """``Site.aligned`` (a caller that checked its tensors' alignment): a fixed site's entry for
    aligned tensors, shared with plain calls, found without a key; a non-fixed site keys as
    ever."""
    jf, compiled, slow = _fake_gpu(monkeypatch, _probe.fn, dns=["seed"], stream=5)
    site = _launch.Site(jf, (4,), (5, 7, 1.5), flag=True, B=8).fixed_dtypes()
    x, y = torch.randn(16), torch.randn(32)
    assert _launch.all_aligned(x, None, y) and not _launch.all_aligned(x, y[1:])
    site.aligned(x)  # first: Triton's run
    site.aligned(y)
    site(x)
    assert len(slow) == 1 and [c[9] for c in compiled.calls] == [y, x]
    assert compiled.calls[0][:9] == (4, 1, 1, 5, "fn-handle", "meta", None, None, None)
    plain = _launch.Site(jf, (4,), (5, 7, 1.5), flag=True, B=8)
    plain.aligned(x)  # the kernel's own cache has this variant: no Triton run
    plain.aligned(x.double())  # keyed by dtype too: a variant of its own, Triton's run
    assert len(slow) == 2 and plain._aligned_hit is None


def test_programs_vouch_only_for_aligned_tensors(device, monkeypatch):
    """BatchNorm's programs take ``Site.aligned`` only when every tensor they did not allocate
    is 16-byte aligned; a misaligned input takes the checked key, with the same results."""
    import tkern

    vouched = []
    original = _launch.Site.aligned

    def aligned(self, *args):
        vouched.append(all(a.data_ptr() % 16 == 0 for a in args if isinstance(a, torch.Tensor)))
        return original(self, *args)

    monkeypatch.setattr(_launch.Site, "aligned", aligned)
    kw = dict(device=device, dtype=torch.float64)
    for shape in ((4, 3, 5, 6), (8, 2, 16, 16)):  # one launch; split
        ref = torch.nn.BatchNorm2d(shape[1], **kw)
        ours = tkern.nn.BatchNorm2d(shape[1], **kw)
        base = torch.randn(torch.Size(shape).numel() + 1, **kw)
        for offset in (0, 1, 0, 1):  # 8-byte offset: misaligned for Triton's 16
            x = base[offset:offset + torch.Size(shape).numel()].view(shape).requires_grad_()
            dy = torch.randn(shape, **kw)
            n = len(vouched)
            y = ours(x)
            (dx,) = torch.autograd.grad(y, x, dy)
            xr = x.detach().requires_grad_()
            yr = ref(xr)
            (dxr,) = torch.autograd.grad(yr, xr, dy)
            torch.testing.assert_close(y, yr)
            torch.testing.assert_close(dx, dxr)
            if offset:
                assert len(vouched) == n, "a misaligned input was vouched for"
        assert vouched and all(vouched)
