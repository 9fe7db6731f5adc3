"""tkern.batch_norm and tkern.nn.BatchNorm1d/2d/3d against PyTorch."""

import pytest
import torch
import torch.nn.functional as F

import tkern
from tkern.activations import activation_scalars, eager_activation
from tkern.nn.batch_norm import TORCH_HAS_BIAS_ARG
from tkern.ops import _op, batch_norm as bn_ops
from tkern.ops.batch_norm import kernels as bn_kernels, launch_plan as bn_plan
from tkern.testing import assert_close_rule

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
ACTS = [(a, "none") for a in tkern.ACTIVATIONS] + [("gelu", "tanh")]
PARAMS = dict(negative_slope=0.2, alpha=1.3, min_val=-0.7, max_val=1.9, beta=1.7, threshold=2.5)
MODULES = {1: "BatchNorm1d", 2: "BatchNorm2d", 3: "BatchNorm3d"}


def _torch_module(name, *args, **kwargs):
    """torch's module.  ``bias=False`` on a torch without the argument (2.11) is built the way
    torch >= 2.13 builds it: an affine weight, the bias parameter registered as None."""
    bias = True if TORCH_HAS_BIAS_ARG else kwargs.pop("bias", True)
    m = getattr(torch.nn, name)(*args, **kwargs)
    if not bias and m.affine:
        m.register_parameter("bias", None)
    return m


def _pair(name, *args, **kwargs):
    """A torch module and a tkern module of the same kind with identical random state."""
    ref = _torch_module(name, *args, **kwargs)
    ours = getattr(tkern.nn, name)(*args, **kwargs)
    with torch.no_grad():
        for t in ref.parameters():
            t.copy_(torch.randn_like(t) * 0.5 + 1.0)
        if ref.running_mean is not None:
            ref.running_mean.copy_(torch.randn_like(ref.running_mean))
            ref.running_var.copy_(torch.rand_like(ref.running_var) + 0.5)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _close(ours, theirs, name):
    """fp64 comparison (both sides fp64): tkern must match to ~1e-9."""
    if theirs is None:
        assert ours is None, f"{name}: expected None"
        return
    assert ours is not None, f"{name}: missing"
    assert_close_rule(ours, theirs, theirs, name=name)


def _step(ref, ours, x, dy):
    """One forward/backward of both modules on the same input; compares everything observable."""
    xr = x.detach().clone().requires_grad_()
    xo = x.detach().clone().requires_grad_()
    yr, yo = ref(xr), ours(xo)
    _close(yo, yr, "output")
    if yr.requires_grad:
        yr.backward(dy)
        yo.backward(dy)
        _close(xo.grad, xr.grad, "dx")
        for (n, pr), (_, po) in zip(ref.named_parameters(), ours.named_parameters()):
            _close(po.grad, pr.grad, f"d{n}")
    for (n, br), (_, bo) in zip(ref.named_buffers(), ours.named_buffers()):
        if br.dtype == torch.long:
            assert torch.equal(bo, br), f"{n}: {bo} != {br}"
        else:
            _close(bo, br, n)


# ------------------------------------------------------------------------------------------------
# PyTorch's own module samples


def _module_db():
    try:
        from torch.testing._internal.common_modules import module_db
    except Exception as e:  # expecttest missing, or torch's internals moved
        pytest.skip(f"torch.testing._internal.common_modules unavailable: {e!r}")
    return {m.name: m for m in module_db if "BatchNorm" in m.name}


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
def test_module_db_samples(device, name, training):
    infos = _module_db()
    info = infos.get(f"nn.{name}")
    if info is None:
        pytest.skip(f"nn.{name} not in module_db")
    samples = info.module_inputs_func(info, device=device, dtype=torch.float64, requires_grad=True,
                                      training=training)
    assert samples
    for sample in samples:
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        ref, ours = _pair(name, *args, **kwargs, device=device, dtype=torch.float64)
        assert isinstance(ours, type(ref))
        ref.train(training)
        ours.train(training)
        (x,) = sample.forward_input.args
        for _ in range(2):
            _step(ref, ours, x, torch.randn_like(x))


# ------------------------------------------------------------------------------------------------
# options over several steps


@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("momentum", [0.3, None])
def test_option_combinations(device, affine, bias, track, momentum):
    ref, ours = _pair("BatchNorm2d", 5, eps=1e-3, momentum=momentum, affine=affine,
                      track_running_stats=track, bias=bias, device=device, dtype=torch.float64)
    for mode in ("train", "train", "eval", "train"):
        ref.train(mode == "train")
        ours.train(mode == "train")
        x = torch.randn(3, 5, 4, 3, device=device, dtype=torch.float64) * 2 + 0.5
        _step(ref, ours, x, torch.randn_like(x))


def test_module_attributes_and_repr():
    m = tkern.nn.BatchNorm2d(4, activation="leaky_relu", negative_slope=0.3)
    assert isinstance(m, torch.nn.BatchNorm2d)
    assert m.activation == "leaky_relu"
    assert "activation=leaky_relu" in repr(m) and "negative_slope=0.3" in repr(m)
    plain = tkern.nn.BatchNorm1d(3)
    assert plain.activation is None
    assert repr(plain) == repr(torch.nn.BatchNorm1d(3))
    no_bias = tkern.nn.BatchNorm3d(2, bias=False)
    assert no_bias.bias is None and no_bias.weight is not None
    assert "bias" not in no_bias.state_dict() and "weight" in no_bias.state_dict()
    assert repr(no_bias) == repr(_torch_module("BatchNorm3d", 2, bias=False)).replace(
        "affine=True, ", "affine=True, bias=False, " if not TORCH_HAS_BIAS_ARG else "affine=True, ")
    assert "bias=False" in repr(no_bias)
    assert tkern.nn.SyncBatchNorm(3, bias=False).bias is None
    with pytest.raises(ValueError, match="unknown activation"):
        tkern.nn.BatchNorm2d(4, activation="swish")


# ------------------------------------------------------------------------------------------------
# dtypes, layouts, sizes, numerics


def _functional_case(device, dtype, shape, training, act="identity", approximate="none",
                     memory_format=None, x64=None):
    """tkern vs torch at ``dtype`` vs torch in fp64, forward, backward and running stats.
    fp16/bf16 inputs take fp32 weight, bias and running stats, as under autocast."""
    C = shape[1]
    pdtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    if x64 is None:
        x64 = torch.randn(shape, device=device, dtype=torch.float64) * 1.5 + 0.3
    x = x64.to(dtype)
    x64 = x.double()  # the reference sees the same (rounded) values
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    w64 = torch.rand(C, device=device, dtype=torch.float64) + 0.5
    b64 = torch.randn(C, device=device, dtype=torch.float64)
    w64, b64 = w64.to(pdtype).double(), b64.to(pdtype).double()
    rm64 = torch.randn(C, device=device, dtype=torch.float64).to(pdtype).double()
    rv64 = (torch.rand(C, device=device, dtype=torch.float64) + 0.5).to(pdtype).double()
    dy64 = torch.randn(shape, device=device, dtype=torch.float64).to(dtype).double()

    def run(fn, xin, dt, pdt):
        xin = xin.detach().clone().requires_grad_()
        w = w64.to(pdt).requires_grad_()
        b = b64.to(pdt).requires_grad_()
        rm, rv = rm64.to(pdt), rv64.to(pdt)
        y = fn(xin, rm, rv, w, b)
        y.backward(dy64.to(dt))
        return y, xin.grad, w.grad, b.grad, rm, rv

    def torch_fn(xin, rm, rv, w, b):
        y = F.batch_norm(xin, rm, rv, w, b, training, 0.2, 1e-4)
        return eager_activation(y, act, *activation_scalars(act, **PARAMS), approximate)

    def ours_fn(xin, rm, rv, w, b):
        return tkern.batch_norm(xin, rm, rv, w, b, training, 0.2, 1e-4, activation=act,
                                approximate=approximate, **PARAMS)

    ours = run(ours_fn, x, dtype, pdtype)
    theirs = run(torch_fn, x.clone(), dtype, pdtype)
    ref = run(torch_fn, x64, torch.float64, torch.float64)
    for name, o, t, r in zip(("output", "dx", "dweight", "dbias", "running_mean", "running_var"),
                             ours, theirs, ref):
        assert_close_rule(o, t, r, name=name)
    return ours


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes(device, dtype, training):
    _functional_case(device, dtype, (5, 7, 3, 4), training, act="relu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,fmt", [((3, 6, 5, 7), torch.channels_last),
                                       ((2, 5, 3, 2, 3), torch.channels_last_3d)])
def test_channels_last(device, shape, fmt, dtype):
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    assert bn_ops._prepare_input(x) is x  # read through its strides, no copy
    y, dx = _functional_case(device, dtype, shape, True, memory_format=fmt)[:2]
    assert y.is_contiguous(memory_format=fmt)
    assert dx.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("shape", [(7, 13), (3, 131), (5, 3, 1, 17), (2, 3, 11, 1, 5), (1, 4, 13),
                                   (3, 2, 4099)])
def test_odd_sizes(device, shape):
    _functional_case(device, torch.float32, shape, True)


def test_strided_views(device):
    """Non-dense inputs (a channel slice; a transposed spatial pair) and a non-contiguous dy."""
    base = torch.randn(4, 9, 5, 6, device=device)
    for x in (base[:, 2:7], base.transpose(2, 3)):
        for training in (True, False):
            ours = tkern.batch_norm(x, torch.zeros(x.shape[1], device=device),
                                    torch.ones(x.shape[1], device=device), training=training)
            theirs = F.batch_norm(x, torch.zeros(x.shape[1], device=device),
                                  torch.ones(x.shape[1], device=device), training=training)
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    x = torch.randn(3, 4, 5, device=device, requires_grad=True)
    xt = x.detach().clone().requires_grad_()
    dy = torch.randn(5, 4, 3, device=device).permute(2, 1, 0)  # dy in another layout than x
    tkern.batch_norm(x, None, None, training=True).backward(dy)
    F.batch_norm(xt, None, None, training=True).backward(dy)
    torch.testing.assert_close(x.grad, xt.grad, rtol=1e-5, atol=1e-5)


def test_strided_parameters(device):
    x = torch.randn(4, 3, 5, device=device)
    params = torch.rand(4, 6, device=device) + 0.5  # each parameter a strided column view
    w, b, rm, rv = params.unbind(0)
    w, b, rm, rv = w[::2], b[::2], rm[::2], rv[::2]
    for training in (False, True):
        rm_t, rv_t = rm.clone(), rv.clone()
        args = (w, b, training, 0.1, 1e-5)
        rm_o, rv_o = (rm.contiguous(), rv.contiguous()) if training else (rm, rv)
        ours = tkern.batch_norm(x, rm_o, rv_o, *args)
        torch.testing.assert_close(ours, F.batch_norm(x, rm_t, rv_t, *args))
        torch.testing.assert_close(rm_o, rm_t)


def test_large_mean_is_stable(device):
    x64 = 1000.0 + 0.01 * torch.randn(6, 4, 9, 7, device=device, dtype=torch.float64)
    y = _functional_case(device, torch.float32, x64.shape, True, x64=x64)[0]
    assert 0.5 < y.float().std().item() < 3.0


@pytest.mark.parametrize("fmt", [None, torch.channels_last])
def test_split_path_small_c_large_spatial(device, fmt):
    shape = (8, 2, 64, 64)
    x = torch.randn(shape, device=device)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    assert bn_ops.num_partials(x) > 1  # several programs per channel
    _functional_case(device, torch.float32, shape, True, memory_format=fmt, x64=x.double() * 3 + 2)


class _LaunchCounter:
    """Stands in for a kernel in ``tkern.ops.batch_norm.kernels`` and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


_KERNELS = ("_fused_forward_kernel", "_stats_partial_kernel", "_stats_combine_kernel",
            "_merge_normalize_kernel", "_normalize_kernel", "_backward_reduce_kernel", "_dx_kernel")


@pytest.mark.parametrize("path", ["one_program", "split"])
def test_one_program_and_split_paths(device, monkeypatch, path):
    """Both plans, every backward variant (training, eval with and without parameter grads,
    parameter grads only), over several steps with the cumulative average; and the launch
    counts: one each way for a layer whose channels span few tiles, else 2 forward, 2 backward."""
    # the default plans: a small layer takes one program per channel block, a large one splits
    assert bn_ops.num_partials(torch.randn(2, 3, 4, 4, device=device)) == 1
    assert bn_ops.num_partials(torch.randn(8, 2, 64, 64, device=device)) > 1
    monkeypatch.setattr(bn_plan, "FUSED_MAX_UNITS", 10**9 if path == "one_program" else 0)
    counters = {name: _LaunchCounter(getattr(bn_kernels, name)) for name in _KERNELS}
    for name, counter in counters.items():
        monkeypatch.setattr(bn_kernels, name, counter)
    ref, ours = _pair("BatchNorm2d", 3, momentum=None, device=device, dtype=torch.float64)
    ref = torch.nn.Sequential(ref, torch.nn.SiLU())
    ours.activation = "silu"
    ours = torch.nn.Sequential(ours)
    x = torch.randn(6, 3, 5, 7, device=device, dtype=torch.float64) * 2 + 0.5
    assert (bn_ops.num_partials(x) == 1) == (path == "one_program")
    _step(ref, ours, x, torch.randn_like(x))
    launches = {n: c.launches for n, c in counters.items() if c.launches}
    if path == "one_program":
        assert launches == {"_fused_forward_kernel": 1, "_backward_reduce_kernel": 1}
    else:
        assert launches == {"_stats_partial_kernel": 1, "_merge_normalize_kernel": 1,
                            "_backward_reduce_kernel": 1, "_dx_kernel": 1}
    for mode, grad_x, grad_wb in (("train", True, True), ("eval", True, True),
                                  ("eval", True, False), ("train", False, True),
                                  ("eval", False, True), ("train", True, False)):
        ref.train(mode == "train")
        ours.train(mode == "train")
        for m in (ref, ours):
            m.requires_grad_(grad_wb)
        x = torch.randn(6, 3, 5, 7, device=device, dtype=torch.float64) - 1.0
        xr, xo = (x.clone().requires_grad_(grad_x) for _ in range(2))
        yr, yo = ref(xr), ours(xo)
        _close(yo, yr, f"{mode} output")
        dy = torch.randn_like(x)
        wanted = ([xr] if grad_x else []) + (list(ref.parameters()) if grad_wb else [])
        mine = ([xo] if grad_x else []) + (list(ours.parameters()) if grad_wb else [])
        for g_o, g_r in zip(torch.autograd.grad(yo, mine, dy), torch.autograd.grad(yr, wanted, dy)):
            _close(g_o, g_r, f"{mode} grad (x: {grad_x}, weight and bias: {grad_wb})")
        for (n, br), (_, bo) in zip(ref.named_buffers(), ours.named_buffers()):
            _close(bo.double(), br.double(), n)


@pytest.mark.parametrize("act,approximate", ACTS)
def test_fused_activation(device, act, approximate):
    _functional_case(device, torch.float32, (4, 3, 5), True, act=act, approximate=approximate)


def test_fused_activation_eval_and_module(device):
    _functional_case(device, torch.float32, (4, 3, 5), False, act="gelu")
    ref = torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.ELU(1.3)).to(device).double()
    ours = tkern.nn.BatchNorm1d(3, activation="elu", alpha=1.3).to(device).double()
    ours.load_state_dict(ref[0].state_dict())
    x = torch.randn(4, 3, 5, device=device, dtype=torch.float64, requires_grad=True)
    xt = x.detach().clone().requires_grad_()
    dy = torch.randn_like(x)
    torch.autograd.backward(ours(x), dy)
    torch.autograd.backward(ref(xt), dy)
    _close(x.grad, xt.grad, "dx")
    _close(ours.weight.grad, ref[0].weight.grad, "dweight")
    _close(ours.running_var, ref[0].running_var, "running_var")


@pytest.mark.parametrize("act,kwargs,module", [
    ("hardtanh", dict(min_val=-0.4, max_val=0.9), torch.nn.Hardtanh(-0.4, 0.9)),
    ("softplus", dict(beta=2.0, threshold=1.5), torch.nn.Softplus(2.0, 1.5)),
    ("relu6", {}, torch.nn.ReLU6()),
])
def test_activation_parameters_reach_the_module(device, act, kwargs, module):
    """min_val/max_val and beta/threshold flow through tkern.nn.BatchNorm*d into the kernels."""
    ref = torch.nn.Sequential(torch.nn.BatchNorm1d(3), module).to(device).double()
    ours = tkern.nn.BatchNorm1d(3, activation=act, **kwargs).to(device).double()
    assert all(f"{k}={v}" in repr(ours) for k, v in kwargs.items())
    x = torch.randn(4, 3, 5, device=device, dtype=torch.float64, requires_grad=True)
    xt = x.detach().clone().requires_grad_()
    dy = torch.randn_like(x)
    yo, yr = ours(x), ref(xt)
    _close(yo, yr, "output")
    torch.autograd.backward(yo, dy)
    torch.autograd.backward(yr, dy)
    _close(x.grad, xt.grad, "dx")
    _close(ours.weight.grad, ref[0].weight.grad, "dweight")
    with pytest.raises(ValueError, match="min_val cannot be greater"):
        tkern.nn.BatchNorm1d(3, activation="hardtanh", min_val=1.0, max_val=0.0)


# ------------------------------------------------------------------------------------------------
# gradcheck (fp64, functional form)


@pytest.mark.parametrize("training,act", [(True, None), (True, "tanh"), (False, None),
                                          (False, "silu")])
def test_gradcheck(device, training, act):
    x = torch.randn(3, 2, 4, device=device, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(2, device=device, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(2, device=device, dtype=torch.float64, requires_grad=True)
    rm = torch.randn(2, device=device, dtype=torch.float64)
    rv = torch.rand(2, device=device, dtype=torch.float64) + 0.5

    def fn(x, w, b):  # running stats cloned: gradcheck calls fn many times
        return tkern.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5,
                                activation=act)

    # fast mode (random projections of the Jacobian): the interpreter is slow per launch
    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-6, fast_mode=True)


# ------------------------------------------------------------------------------------------------
# state_dict, zero batch, errors, fallback


def test_state_dict_interchange(device):
    ref = torch.nn.BatchNorm2d(4, momentum=None).to(device)
    ours = tkern.nn.BatchNorm2d(4, momentum=None, activation="relu").to(device)
    x = torch.randn(3, 4, 5, 5, device=device)
    ref(x)
    ours(x * 2 + 1)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for k, v in ours.state_dict().items():
        assert v.dtype == ref.state_dict()[k].dtype and v.shape == ref.state_dict()[k].shape
    # tkern -> torch
    fresh_ref = torch.nn.BatchNorm2d(4, momentum=None).to(device)
    fresh_ref.load_state_dict(ours.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(fresh_ref.state_dict()[k], v)
    # torch -> tkern, then both continue identically
    fresh_ours = tkern.nn.BatchNorm2d(4, momentum=None).to(device)
    fresh_ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, 5, 5, device=device)
    torch.testing.assert_close(fresh_ours(x), ref(x))
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(fresh_ours.state_dict()[k], v)
    # old checkpoints without num_batches_tracked load as torch's do
    sd = ref.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata = {"": {"version": 1}}
    fresh_ref = torch.nn.BatchNorm2d(4, momentum=None).to(device)
    fresh_ours = tkern.nn.BatchNorm2d(4, momentum=None).to(device)
    fresh_ours.load_state_dict(sd)
    fresh_ref.load_state_dict(sd)
    assert torch.equal(fresh_ours.num_batches_tracked, fresh_ref.num_batches_tracked)


@pytest.mark.parametrize("name,shape", [("BatchNorm1d", (0, 5, 9)), ("BatchNorm2d", (0, 5, 2, 2))])
def test_zero_batch(device, name, shape):
    ref, ours = _pair(name, 5, device=device, dtype=torch.float64)
    x = torch.randn(shape, device=device, dtype=torch.float64)
    _step(ref, ours, x, torch.randn_like(x))
    assert ours.weight.grad is not None
    assert torch.equal(ours.weight.grad, torch.zeros_like(ours.weight))
    assert ours.num_batches_tracked.item() == 1


def test_errors(device):
    x = torch.randn(4, 3, 5, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    with pytest.raises(ValueError, match="expected 4D input"):
        tkern.nn.BatchNorm2d(3).to(device)(x)
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        tkern.nn.BatchNorm1d(3).to(device)(x[..., None])
    with pytest.raises(ValueError, match="expected 5D input"):
        tkern.nn.BatchNorm3d(3).to(device)(x)
    with pytest.raises(RuntimeError, match="should contain 3 elements not 4"):
        tkern.nn.BatchNorm1d(4).to(device)(x)
    for bad in ("weight", "bias"):
        kwargs = {bad: torch.ones(4, device=device)}
        with pytest.raises(RuntimeError, match=f"{bad} should contain"):
            tkern.batch_norm(x, rm, rv, training=True, **kwargs)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        tkern.batch_norm(torch.randn(1, 3, 1, device=device), None, None, training=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        tkern.nn.BatchNorm1d(3).to(device)(torch.randn(1, 3, device=device))
    tkern.nn.BatchNorm1d(3).to(device).eval()(torch.randn(1, 3, device=device))  # fine in eval
    with pytest.raises(ValueError, match="eps must be positive"):
        tkern.batch_norm(x, rm, rv, training=True, eps=0.0)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        tkern.batch_norm(x, rm, rv, training=False, eps=-1.0)
    with pytest.raises(ValueError, match="both be None"):
        tkern.batch_norm(x, rm, None, training=True)
    with pytest.raises(RuntimeError, match="running_mean must be defined"):
        tkern.batch_norm(x, None, None, training=False)
    with pytest.raises(TypeError):
        tkern.batch_norm(x, rm, rv, training=True, momentum=None)  # as F.batch_norm
    with pytest.raises(NotImplementedError):
        tkern.batch_norm(x.to(torch.int32), rm, rv, training=True)
    with pytest.raises(RuntimeError):
        tkern.batch_norm(x, rm.half(), rv.half(), training=True)
    with pytest.raises(ValueError, match="unknown activation"):
        tkern.batch_norm(x, rm, rv, training=True, activation="swish")
    with pytest.raises(RuntimeError, match="approximate"):
        tkern.batch_norm(x, rm, rv, training=True, activation="gelu", approximate="fast")
    with pytest.raises(IndexError):
        tkern.batch_norm(torch.randn(3, device=device), None, None, training=True)
    if device.type != "cpu":
        with pytest.raises(RuntimeError, match="same device"):
            tkern.batch_norm(x, rm.cpu(), rv.cpu(), training=True)


def test_functional_without_running_stats_and_determinism(device):
    x = torch.randn(6, 4, 7, device=device, requires_grad=True)
    w = torch.rand(4, device=device, requires_grad=True)
    dy = torch.randn_like(x)
    grads = []
    for _ in range(2):
        y = tkern.batch_norm(x, None, None, w, None, training=True)
        grads.append(torch.autograd.grad(y, (x, w), dy))
    assert all(torch.equal(a, b) for a, b in zip(*grads))  # no atomics: bitwise repeatable
    yt = F.batch_norm(x, None, None, w, None, training=True)
    torch.testing.assert_close(y, yt)
    for a, b in zip(grads[0], torch.autograd.grad(yt, (x, w), dy)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_eager_fallback_without_interpreter(device, monkeypatch):
    if device.type != "cpu":
        pytest.skip("the fallback is for CPU tensors")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(bn_ops.rt, "_warned", set())
    m = tkern.nn.BatchNorm1d(3, momentum=None, activation="relu")
    ref = torch.nn.BatchNorm1d(3, momentum=None)
    x = torch.randn(5, 3, 4)
    with pytest.warns(RuntimeWarning, match="eager PyTorch"):
        y = m(x)
    torch.testing.assert_close(y, F.relu(ref(x)))
    torch.testing.assert_close(m(x * 2), F.relu(ref(x * 2)))
    torch.testing.assert_close(m.running_var, ref.running_var)
    assert m.num_batches_tracked.item() == 2


def test_building_blocks_merge_like_one_batch(device):
    """What SyncBatchNorm does around its collectives, without them: local stats of two shards,
    merged, then normalize/backward with global sums equal the single-batch result."""
    x = torch.randn(7, 3, 5, device=device, dtype=torch.float64) * 2 + 5
    dy = torch.randn_like(x)
    w = torch.rand(3, device=device, dtype=torch.float64) + 0.5
    b = torch.randn(3, device=device, dtype=torch.float64)
    shards = (x[:2], x[2:])  # uneven
    local = [bn_ops.bn_combine_stats(*bn_ops.bn_partial_stats(s.contiguous()), local=True)
             for s in shards + (x[:0],)]  # and an empty rank
    count, mean, m2, mean_lo = (torch.cat(t) for t in zip(*local))  # the all_gather
    rm, rv = torch.zeros(3, device=device, dtype=torch.float64), torch.ones(3, device=device,
                                                                           dtype=torch.float64)
    g_mean, g_lo, invstd = bn_ops.bn_combine_stats(count, mean, m2, mean_lo, eps=1e-5,
                                                   running_mean=rm, running_var=rv, momentum=0.1)
    rm_ref, rv_ref = torch.zeros_like(rm), torch.ones_like(rv)
    xr = x.clone().requires_grad_()
    y_ref = F.batch_norm(xr, rm_ref, rv_ref, w, b, True, 0.1, 1e-5)
    y_ref.backward(dy)
    _close(rm, rm_ref, "running_mean")
    _close(rv, rv_ref, "running_var")
    sums = [bn_ops.bn_backward_reduce(s.contiguous(), d.contiguous(), g_mean, invstd, w, b,
                                      mean_lo=g_lo) for s, d in zip(shards, dy.split([2, 5]))]
    sum_g, sum_gx = (sum(t) for t in zip(*sums))  # the all_reduce
    for s, d, start in zip(shards, dy.split([2, 5]), (0, 2)):
        s, d = s.contiguous(), d.contiguous()
        y = bn_ops.bn_normalize(s, g_mean, invstd, w, b, mean_lo=g_lo)
        _close(y, y_ref[start:start + s.shape[0]].detach(), "output shard")
        dx = bn_ops.bn_backward_dx(s, d, g_mean, invstd, w, b, sum_g, sum_gx, x.shape[0] * 5,
                                   mean_lo=g_lo)
        _close(dx, xr.grad[start:start + s.shape[0]], "dx shard")


def test_no_channels(device):
    x = torch.randn(4, 0, 3, device=device, requires_grad=True)
    y = tkern.batch_norm(x, None, None, training=True)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("training,act", [(True, "tanh"), (False, None)])
def test_gradgradcheck(device, training, act):
    x = torch.randn(3, 2, 2, device=device, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(2, device=device, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(2, device=device, dtype=torch.float64, requires_grad=True)
    rm = torch.randn(2, device=device, dtype=torch.float64)
    rv = torch.rand(2, device=device, dtype=torch.float64) + 0.5

    def fn(x, w, b):
        return tkern.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5,
                                activation=act)

    assert torch.autograd.gradgradcheck(fn, (x, w, b), fast_mode=True)


def test_opcheck(device):
    x = torch.randn(4, 3, 5, device=device, requires_grad=True)
    w = torch.rand(3, device=device, requires_grad=True)
    b = torch.randn(3, device=device, requires_grad=True)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device) + 0.5
    nbt = torch.tensor(3, device=device)
    fwd, bwd = bn_ops.OP._fwd_op, bn_ops.OP._bwd_op
    r = torch.randn(4, 3, 5, device=device, requires_grad=True)
    for res in (None, r):
        torch.library.opcheck(fwd, (x, w, b, rm, rv, None, res, 1e-5, True, 0.1, "relu", 0.01,
                                    1.0))
    torch.library.opcheck(fwd, (x.transpose(0, 2), None, None, rm, rv, nbt, None, 1e-5, True, None,
                                "identity", 0.01, 1.0))
    torch.library.opcheck(fwd, (x, None, b, rm, rv, None, None, 1e-3, False, 0.0, "elu", 0.01,
                                0.5))
    torch.library.opcheck(fwd, (x, w, None, rm, rv, None, r, 1e-3, False, 0.0, "silu", 0.01,
                                1.0))
    _, stats = fwd(x.detach(), None, None, None, None, None, None, 1e-5, True, 0.0, "identity",
                   0.01, 1.0)[:2]
    dy = torch.randn(4, 3, 5, device=device)
    for training in (True, False):
        for res in (None, r.detach()):
            saved = [x.detach(), w.detach(), b.detach(), rm, rv, res,
                     stats if training else x.new_empty(0)]
            torch.library.opcheck(bwd, ([dy], saved, 1e-5, training, 0.1, "silu", 0.01, 1.0,
                                        [True, True, True, res is not None]))


@pytest.mark.parametrize("shape", [(5, 3, 4), (2, 3, 4)])
def test_torch_compile_fullgraph(device, shape):
    """Both statistics plans under the custom ops: split (partials + merge) and one program per
    channel block (the one-launch kernel without its normalize pass)."""
    if device.type == "cpu":
        assert (bn_ops.num_partials(torch.empty(shape)) == 1) == (shape[0] == 2)
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    m = tkern.nn.BatchNorm1d(3, activation="relu", momentum=None).to(device)
    ref = torch.nn.BatchNorm1d(3, momentum=None).to(device)
    compiled = torch.compile(m, fullgraph=True, backend=backend)
    for _ in range(2):
        x = torch.randn(shape, device=device, requires_grad=True)
        xr = x.detach().clone().requires_grad_()
        y, yr = compiled(x), torch.relu(ref(xr))
        y.sum().backward()
        yr.sum().backward()
        torch.testing.assert_close(y, yr)
        torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(m.weight.grad, ref.weight.grad)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(m.state_dict()[k], v)


@pytest.mark.parametrize("programs", [3, 528])
def test_gpu_like_plans_and_int64_offsets(device, monkeypatch, programs):
    """The launch plans a GPU gets (many splits, tail units past the end, several units per
    program) and the int64 index path, on small tensors."""
    monkeypatch.setattr(bn_plan, "_target_programs", lambda dev, reduction: programs)
    monkeypatch.setattr(bn_ops.rt, "needs_int64", lambda *t, **k: programs == 3)
    for shape, fmt in (((5, 3, 7, 9), None), ((5, 3, 7, 9), torch.channels_last), ((11, 6), None)):
        _functional_case(device, torch.float32, shape, True, act="silu", memory_format=fmt)


@pytest.mark.parametrize("shape,dtype,fmt,flat", [
    ((3, 5, 7), torch.float32, None, True),  # S = 7
    ((3, 3, 7, 7), torch.bfloat16, None, True),  # S = 49
    ((3, 2, 14, 14), torch.float64, None, True),  # S = 196
    ((3, 1, 7, 7), torch.float32, None, True),  # C = 1
    ((2, 4096, 7), torch.bfloat16, None, True),  # C = 4096: 15 channel blocks, the last overlapping
    ((3, 4096), torch.float32, None, False),  # S = 1: batch and channels, channels contiguous
    ((2, 3, 55, 55), torch.float32, None, False),  # S = 3025: S-blocks, not FLAT
    ((3, 6, 7, 7), torch.bfloat16, torch.channels_last, False),
    ((2, 3, 7, 7), torch.float64, torch.channels_last, False),
])
def test_tilings(device, shape, dtype, fmt, flat):
    """Each tiling (FLAT channel-major tiles; S-blocks; channels_last) on awkward S and C, in
    training and eval, by the 2x rule."""
    x = torch.empty(shape, device=device, dtype=dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    assert bn_plan.plan(x).flat == flat and bn_plan.plan(x, reduction=False).flat == flat
    for training in (True, False):
        _functional_case(device, dtype, shape, training, act="relu", memory_format=fmt)


@pytest.mark.parametrize("shape,one_program", [((4, 301, 7, 7), True), ((13, 45, 7, 7), False)])
def test_flat_gpu_plans(device, monkeypatch, shape, one_program):
    """FLAT plans as a GPU gets them (here for an 8-SM card): the one-launch plan with channel
    blocks sized to the card, and the split plan (channels too big for one program, here by a
    lowered FUSED_PROGRAM_BYTES: partials per tile of samples, several programs along the
    batch); the last channel block overlaps its neighbour."""
    if not one_program:
        monkeypatch.setattr(bn_plan, "FUSED_PROGRAM_BYTES", 512)
        monkeypatch.setattr(bn_plan, "FLAT_TILE_BYTES", 4096)  # tiles of 1 sample: 13 units
    with bn_ops.rt.plan_as_gpu(8):
        x = torch.empty(shape, device=device)
        p = bn_plan.plan(x)
        assert p.flat and (p.num_partials == 1) == one_program
        assert shape[1] % p.cpp  # a partial last block
        if not one_program:
            assert bn_plan.plan(x, reduction=False).grid[1] > 1
        _functional_case(device, torch.float32, shape, True, act="silu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dx_totals_many_partial_rows(device, monkeypatch, dtype):
    """The dx kernel totals the backward's partial rows BLOCK_P (16) at a time over all its
    threads: FLAT tiles (7 x 7) planned for a 16-SM card with 19 partials per channel (two trips,
    the second masked), by the 2x rule; channels_last with more than 16 partials is
    test_merge_of_many_partials."""
    monkeypatch.setattr(bn_plan, "FUSED_PROGRAM_BYTES", 512)
    monkeypatch.setattr(bn_plan, "FLAT_TILE_BYTES", 512 * dtype.itemsize)  # 2 samples a tile
    monkeypatch.setattr(bn_plan, "MIN_UNITS", (1, 1))
    monkeypatch.setattr(bn_plan._PLANS, "plans", {})
    shape = (37, 5, 7, 7)
    with bn_ops.rt.plan_as_gpu(16):
        p = bn_plan.plan(torch.empty(shape, device=device, dtype=dtype))
        assert p.flat and p.num_partials > 16 and p.num_partials % 16
        _functional_case(device, dtype, shape, True, act="relu")


@pytest.mark.parametrize("dtype,data", [(torch.float32, "large_mean"),
                                        (torch.float32, "by_sample"),
                                        (torch.float64, "by_sample")])
def test_merge_of_many_partials(device, monkeypatch, dtype, data):
    """The split forward as a 16-SM card plans it, with tiles shrunk so that a small layer has
    25 partials per channel: every merge-normalize program merges them in several trips of
    kernels._merge_partials (one pass about the first rows' mean), over the raised units of the
    merging plan (and the backward's dx kernel totals as many partial rows, BLOCK_P a trip).
    Data: a large mean (the hi + lo mean), and sample means far apart in batch order (the first
    rows' reference is then off the mean: the bound of _merge_partials)."""
    monkeypatch.setattr(bn_plan, "TILE_BYTES", 64 * dtype.itemsize)  # tiles of 8 x 4
    monkeypatch.setattr(bn_plan._PLANS, "plans", {})
    shape = (25, 3, 8, 8)
    g = torch.randn(shape, device=device, dtype=torch.float64)
    if data == "large_mean":
        x64 = 1000.0 + 0.01 * g
    else:  # by_sample
        x64 = g + 40.0 * torch.arange(25, device=device, dtype=torch.float64)[:, None, None, None]
    with bn_ops.rt.plan_as_gpu(16):
        x = torch.empty(shape, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last)
        red = bn_plan.plan(x)
        merging = bn_plan.plan(x, reduction=False, merging=bn_plan.PARTIAL_BYTES)
        assert red.num_partials > 16 and not red.flat  # two merge trips of 16 rows
        assert merging.units_per_prog > bn_plan.plan(x, reduction=False).units_per_prog
        # x bytes a program >= the partial bytes it merges, or one wave of programs
        x_bytes = merging.units_per_prog * merging.BLOCK_S * merging.BLOCK_C * x.element_size()
        assert x_bytes >= red.num_partials * merging.BLOCK_C * bn_plan.PARTIAL_BYTES or (
            merging.grid[0] * merging.grid[1] <= bn_plan.MERGING_PROGRAMS_PER_SM * 16)
        _functional_case(device, dtype, shape, True, act="relu",
                         memory_format=torch.channels_last, x64=x64)


def test_channels_last_one_launch_gpu_plan(device):
    """channels_last on a GPU plan whose channels fit one program each in narrow blocks (here a
    4-SM card: 8 fp32 channels, 32-byte rows, 5 blocks): one launch each way."""
    with bn_ops.rt.plan_as_gpu(4):
        x = torch.empty(4, 40, 3, 3, device=device).contiguous(memory_format=torch.channels_last)
        p = bn_plan.plan(x)
        assert not p.flat and p.num_partials == 1 and p.BLOCK_C == 8
        _functional_case(device, torch.float32, tuple(x.shape), True, act="relu",
                         memory_format=torch.channels_last)


def test_flat_residual_and_strided_gradient(device):
    """FLAT tiles with a residual, and a gradient in another layout (copied to x's)."""
    x = torch.randn(4, 5, 7, 7, device=device, requires_grad=True)
    r = torch.randn(4, 5, 7, 7, device=device, requires_grad=True)
    assert bn_plan.plan(x.detach()).flat
    dy = torch.randn(4, 5, 7, 7, device=device).contiguous(memory_format=torch.channels_last)
    xr, rr = (t.detach().clone().requires_grad_() for t in (x, r))
    y = tkern.batch_norm(x, None, None, training=True, activation="relu", residual=r)
    yr = F.relu(F.batch_norm(xr, None, None, training=True) + rr)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(y, (x, r), dy), torch.autograd.grad(yr, (xr, rr), dy)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation,params", [("leaky_relu", dict(negative_slope=0.2)),
                                               ("elu", dict(alpha=1.3))])
def test_fp64_activation_parameters_are_exact(device, activation, params):
    # 0.2 and 1.3 are not fp32 numbers: passed as plain floats they would cost ~1e-9 relative error
    x = torch.randn(4, 3, 5, device=device, dtype=torch.float64, requires_grad=True)
    dy = torch.randn_like(x)
    y = tkern.batch_norm(x, None, None, training=True, activation=activation, **params)
    xr = x.detach().clone().requires_grad_()
    z = F.batch_norm(xr, None, None, training=True)
    yr = F.leaky_relu(z, params["negative_slope"]) if activation == "leaky_relu" else F.elu(z, params["alpha"])
    assert (y - yr).abs().max().item() < 1e-13
    y.backward(dy)
    yr.backward(dy)
    assert (x.grad - xr.grad).abs().max().item() < 1e-12


@pytest.mark.parametrize("activation", ["relu", "tanh", "elu"])
def test_nan_passes_through_the_fused_activation(device, activation):
    m = tkern.nn.BatchNorm2d(2, activation=activation).to(device).eval()
    x = torch.randn(2, 2, 3, 3, device=device)
    x[0, 1, 1, 2] = float("nan")
    y = m(x)
    assert torch.isnan(y[0, 1, 1, 2]) and torch.isnan(y).sum() == 1


def test_torch_edge_semantics(device):
    """Behaviours a fuzzing review found against torch: strided running stats updated in place,
    numpy / tensor / bool momentum, eval with one running stat missing (RuntimeError), running
    stats that are not 1-D, mixed low-precision parameter dtypes, meta tensors."""
    x = torch.randn(4, 3, 5, device=device)
    a, b = torch.randn(6, device=device), torch.rand(6, device=device) + 0.5
    a_t, b_t = a.clone(), b.clone()
    y = tkern.batch_norm(x, a[::2], b[::2], training=True, momentum=0.3)
    y_t = F.batch_norm(x, a_t[::2], b_t[::2], training=True, momentum=0.3)
    torch.testing.assert_close(y, y_t)
    torch.testing.assert_close(a, a_t)  # the odd elements too: untouched
    torch.testing.assert_close(b, b_t)
    for momentum in (__import__("numpy").float32(0.2), torch.tensor(0.2), True):
        rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
        rm_t, rv_t = rm.clone(), rv.clone()
        tkern.batch_norm(x, rm, rv, training=True, momentum=momentum)
        F.batch_norm(x, rm_t, rv_t, training=True, momentum=momentum)
        torch.testing.assert_close(rm, rm_t)
        torch.testing.assert_close(rv, rv_t)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    for args in ((rm, None), (None, rv)):
        with pytest.raises(RuntimeError, match="evaluation mode"):
            tkern.batch_norm(x, *args, training=False)
    with pytest.raises(RuntimeError, match="1-D"):
        tkern.batch_norm(x, rm[None], rv[None], training=True)
    h = x.half()
    with pytest.raises(RuntimeError, match="all float32 or all"):
        tkern.batch_norm(h, rm.half(), rv.half(), torch.ones(3, device=device), training=True)
    y = tkern.batch_norm(torch.empty(4, 3, 5, device="meta"), None, None, training=True,
                         activation="relu")
    assert y.device.type == "meta" and y.shape == (4, 3, 5)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 4, 3), (5, 4, 4, 3)])  # one launch; split statistics
def test_inf_and_nan_input_give_torch_running_stats(device, dtype, shape):
    """+inf in a channel: the running mean becomes inf and the variance NaN, as torch's (the
    merge must not turn inf - inf into NaN, nor clamp a NaN variance to 0); -inf and +inf, or a
    NaN: NaN.  Outputs are NaN in those channels, as torch's."""
    x = torch.randn(shape, device=device, dtype=dtype)
    x[1, 0].view(-1)[1] = float("inf")
    x[0, 1].view(-1)[0] = float("inf")
    x[1, 1].view(-1)[0] = -float("inf")
    x[0, 2].view(-1)[0] = float("nan")
    x[0, 3].view(-1)[0] = -float("inf")  # in the first tile, which sets the shift
    assert (bn_ops.num_partials(x) > 1) == (len(shape) == 4)
    ours = [torch.zeros(4, device=device, dtype=dtype), torch.ones(4, device=device, dtype=dtype)]
    theirs = [t.clone() for t in ours]
    y = tkern.batch_norm(x, *ours, training=True)
    y_t = F.batch_norm(x, *theirs, training=True)
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    assert ours[0][0] == float("inf") and ours[0][3] == -float("inf")
    torch.testing.assert_close(y, y_t, equal_nan=True)


def test_empty_channels_with_weight_raise_index_error_as_torch(device):
    """C = 0 with a weight or bias: torch's batch_norm raises IndexError (it scales the empty
    input by weight[0]); without them it returns the empty input."""
    x = torch.randn(4, 0, 3, device=device)
    for kw in (dict(weight=torch.ones(0, device=device)), dict(bias=torch.zeros(0, device=device))):
        for training in (True, False):
            stats = (None, None) if training else (torch.zeros(0, device=device),) * 2
            with pytest.raises(IndexError):
                F.batch_norm(x, *stats, training=training, **kw)
            with pytest.raises(IndexError, match="C = 0"):
                tkern.batch_norm(x, *stats, training=training, **kw)
    with pytest.raises(IndexError, match="C = 0"):
        tkern.nn.BatchNorm2d(0).to(device)(torch.randn(2, 0, 3, 3, device=device))
    assert tkern.batch_norm(x, None, None, training=True).shape == x.shape


# ------------------------------------------------------------------------------------------------
# residual: act(bn(x) + r) in the normalize pass


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training,shape,channels_last", [
    (True, (2, 3, 4, 5), False),  # one launch each way
    (True, (17, 3, 61), False),  # split statistics, reduce + dx launches
    (False, (3, 5, 2, 3), True),
])
def test_residual_matches_torch(device, dtype, training, shape, channels_last):
    """Output, dx, dresidual, dweight, dbias and running stats against torch's
    act(F.batch_norm(x) + r), by the 2x rule at each dtype."""
    C = shape[1]
    x64 = torch.randn(shape, device=device, dtype=torch.float64) * 2 + 0.5
    if channels_last:
        x64 = x64.contiguous(memory_format=torch.channels_last)
    r64 = torch.randn(shape, device=device, dtype=torch.float64)
    dy64 = torch.randn(shape, device=device, dtype=torch.float64)
    w64, b64 = torch.randn(C, device=device, dtype=torch.float64), torch.randn(C, device=device, dtype=torch.float64)
    rm64 = torch.randn(C, device=device, dtype=torch.float64)
    rv64 = torch.rand(C, device=device, dtype=torch.float64) + 0.5
    # the reference sees the inputs rounded to dtype, as tkern and torch do
    x64, r64, dy64, w64, b64, rm64, rv64 = (t.to(dtype).double() for t in
                                            (x64, r64, dy64, w64, b64, rm64, rv64))

    def run(fn, dt):
        x, r = (t.to(dt).requires_grad_() for t in (x64, r64))
        w, b = (t.to(dt).requires_grad_() for t in (w64, b64))
        rm, rv = rm64.to(dt), rv64.to(dt)
        y = fn(x, r, rm, rv, w, b)
        grads = torch.autograd.grad(y, (x, r, w, b), dy64.to(dt))
        return (y, *grads, rm, rv)

    def ours(x, r, rm, rv, w, b):
        return tkern.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, activation="relu",
                                residual=r)

    def theirs(x, r, rm, rv, w, b):
        return F.relu(F.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5) + r)

    if training:
        assert (bn_ops.num_partials(x64) > 1) == (shape[0] == 17)
    o, t, ref = run(ours, dtype), run(theirs, dtype), run(theirs, torch.float64)
    assert o[0].stride() == t[0].stride()
    for name, a, b, c in zip(("output", "dx", "dresidual", "dweight", "dbias", "running_mean",
                              "running_var"), o, t, ref):
        assert_close_rule(a, b, c, name=name)


@pytest.mark.parametrize("training", [True, False])
def test_residual_gradcheck(device, training):
    x = torch.randn(3, 2, 3, device=device, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 2, 3, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, device=device, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(2, device=device, dtype=torch.float64), torch.rand(2, device=device, dtype=torch.float64) + 0.5

    def fn(x, r, w, b):
        return tkern.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5,
                                activation="softplus", beta=1.5, threshold=1.0, residual=r)

    assert torch.autograd.gradcheck(fn, (x, r, w, b))


def test_residual_only_gradient_and_module(device):
    """A residual that alone needs a gradient still gets it (the reduction pass writes it), and
    the modules take ``residual=``."""
    ref = torch.nn.BatchNorm2d(3).to(device).double()
    ours = tkern.nn.BatchNorm2d(3, activation="hardswish").to(device).double()
    x = torch.randn(2, 3, 4, 4, device=device, dtype=torch.float64)
    for training in (True, False):
        ref.train(training)
        ours.train(training)
        r = torch.randn(2, 3, 4, 4, device=device, dtype=torch.float64, requires_grad=True)
        rt_ = r.detach().clone().requires_grad_()
        yo = ours(x, residual=r)
        yr = F.hardswish(ref(x) + rt_)
        _close(yo, yr, "output")
        (go,) = torch.autograd.grad(yo.sum(), r)
        (gr,) = torch.autograd.grad(yr.sum(), rt_)
        _close(go, gr, "dresidual")
        _close(ours.running_mean, ref.running_mean, "running_mean")


@pytest.mark.parametrize("shape", [(3, 5, 4, 3), (2, 5, 3, 1)])  # split and one-program plans
def test_cached_launch_sites_follow_every_argument(device, shape):
    """One layer shape, calls that differ only in a scalar, a flag or a dtype, in turn: each must
    get its own launch (tkern._launch.Site per launcher, plan, dtype, flags and scalars), never a
    neighbour's cached one.  Checked against torch each time, forward and backward."""
    x64 = torch.randn(shape, device=device, dtype=torch.float64)
    dy64 = torch.randn_like(x64)
    calls = [dict(eps=1e-5, momentum=0.1, act="relu", slope=0.01, dtype=torch.float32),
             dict(eps=1e-2, momentum=0.1, act="relu", slope=0.01, dtype=torch.float32),
             dict(eps=1e-2, momentum=0.7, act="relu", slope=0.01, dtype=torch.float32),
             dict(eps=1e-2, momentum=0.7, act="leaky_relu", slope=0.3, dtype=torch.float32),
             dict(eps=1e-2, momentum=0.7, act="leaky_relu", slope=0.05, dtype=torch.float32),
             dict(eps=1e-2, momentum=0.7, act="leaky_relu", slope=0.05, dtype=torch.float64),
             dict(eps=1e-5, momentum=0.1, act="relu", slope=0.01, dtype=torch.float32)]
    for training in (True, False):
        for c in calls * 2:
            dt = c["dtype"]
            kw = dict(activation=c["act"], negative_slope=c["slope"])
            outs = []
            for impl, x_dt in (("tkern", dt), ("torch", dt), ("torch", torch.float64)):
                x = x64.to(x_dt).requires_grad_()
                w = torch.linspace(0.5, 1.5, 5, device=device, dtype=x_dt).requires_grad_()
                b = torch.linspace(-0.2, 0.3, 5, device=device, dtype=x_dt).requires_grad_()
                rm = torch.linspace(-0.1, 0.1, 5, device=device, dtype=x_dt)
                rv = torch.linspace(0.8, 1.2, 5, device=device, dtype=x_dt)
                if impl == "tkern":
                    y = tkern.batch_norm(x, rm, rv, w, b, training, c["momentum"], c["eps"], **kw)
                else:
                    y = F.batch_norm(x, rm, rv, w, b, training, c["momentum"], c["eps"])
                    y = eager_activation(y, c["act"], c["slope"], 1.0, "none")
                grads = torch.autograd.grad(y, (x, w, b), dy64.to(x_dt))
                outs.append((y, *grads, rm, rv))
            for name, t, s, r in zip(("y", "dx", "dw", "db", "running_mean", "running_var"),
                                     *outs):
                assert_close_rule(t, s, r, name=f"{name} {c} training={training}")


def _program_variants(device):
    """(name, call kwargs builder) over what a BatchNorm program is keyed on."""
    def make(shape=(4, 3, 5, 6), fmt=None, dtype=torch.float32, pdtype=None, affine=True,
             stats=True, momentum=0.1, residual=False, training=True, act="relu", count=False):
        def build():
            g = torch.Generator(device="cpu").manual_seed(7)
            x = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
            if fmt is not None:
                x = x.contiguous(memory_format=fmt)
            x.requires_grad_()
            C, pdt = shape[1], pdtype or dtype
            w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(device, pdt)
            b = torch.randn(C, generator=g, dtype=torch.float64).to(device, pdt)
            w, b = (w.requires_grad_(), b.requires_grad_()) if affine else (None, None)
            rm = rv = r = None
            if stats:
                rm = torch.randn(C, generator=g, dtype=torch.float64).to(device, pdt)
                rv = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(device, pdt)
            # the module's counter: counted by the call (in the kernel with a float momentum)
            nbt = torch.tensor(3, device=device) if momentum is None or count else None
            if residual:
                r = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
            return dict(x=x, w=w, b=b, rm=rm, rv=rv, nbt=nbt, r=r, training=training,
                        momentum=momentum, act=act)
        return build
    return [("nchw", make()), ("channels_last", make(fmt=torch.channels_last)),
            ("bf16 fp32 params", make(dtype=torch.bfloat16, pdtype=torch.float32)),
            ("no affine", make(affine=False)), ("no running stats", make(stats=False)),
            ("cumulative", make(momentum=None)), ("residual", make(residual=True)),
            ("eval", make(training=False)), ("eval residual", make(training=False, residual=True)),
            ("2d", make(shape=(7, 5))), ("split", make(shape=(8, 2, 16, 16), act="silu")),
            ("eval split", make(shape=(8, 2, 16, 16), training=False)),
            ("counted", make(count=True)),
            ("counted split", make(shape=(8, 2, 16, 16), count=True)),
            ("counted cumulative split", make(shape=(8, 2, 16, 16), momentum=None))]


def _run_variant(v, dy_fmt, wanted):
    """Forward twice (the second call takes the cached program, if any), backward of the second
    for the ``wanted`` inputs; returns every output, gradient and running stat."""
    out = []
    for _ in range(2):
        y = bn_ops._batch_norm(v["x"], v["rm"], v["rv"], v["w"], v["b"], v["training"],
                               v["momentum"], 1e-5, v["act"], 0.01, 1.0, "none",
                               num_batches_tracked=v["nbt"], residual=v["r"])
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3),
                     dtype=torch.float64).to(y.device, y.dtype)
    if dy_fmt == "transposed":  # strides other than y's
        dy = dy.transpose(0, 1).contiguous().transpose(0, 1)
    inputs = [t for name, t in (("x", v["x"]), ("w", v["w"]), ("b", v["b"])) if name in wanted
              and t is not None]
    out += [y, *(torch.autograd.grad(y, inputs, dy) if inputs else ())]
    return out + [t for t in (v["rm"], v["rv"], v["nbt"]) if t is not None]


def test_programs_match_the_launchers(device):
    """The per-signature programs (batch_norm/programs.py, and the checked-call cache in front of
    them) give bit-for-bit what the launchers give, for every kind of signature they key on and
    (on two of them) every set of wanted gradients; a dy laid out otherwise than y takes the
    launchers."""
    plain = bn_ops.OP.make_program
    for name, build in _program_variants(device):
        extra = name in ("nchw", "split", "eval", "eval split")
        assert (bn_ops.num_partials(build()["x"]) > 1) == name.endswith("split"), name
        for wanted, dy_fmt in ((("x", "w", "b"), "like_y"),
                               *(((("x",), "like_y"), (("w", "b"), "like_y"),
                                  (("x", "w", "b"), "transposed")) if extra else ())):
            got = {}
            for use in (True, False):
                bn_ops.OP.make_program = plain if use else None
                _op.clear_plan_caches()
                try:
                    got[use] = _run_variant(build(), dy_fmt, wanted)
                finally:
                    bn_ops.OP.make_program = plain
            _op.clear_plan_caches()
            for a, b in zip(got[True], got[False], strict=True):
                assert torch.equal(a, b), f"{name} {wanted} {dy_fmt}"
    # the checked-call cache and the programs were used
    _run_variant(_program_variants(device)[0][1](), "like_y", ("x",))
    assert bn_ops._CALLS.plans and all(p is not None for _, p, _, _ in bn_ops._CALLS.plans.values())


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (8, 2, 16, 16)], ids=["one launch", "split"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_counts_batches(device, shape, momentum):
    """num_batches_tracked and the running stats follow torch's module step by step, with the
    repeated calls counting in the kernel (float momentum: no add_ of their own) or on the host
    before the kernel reads the counter (momentum=None)."""
    from perf.host import _KernelCounter
    assert (bn_ops.num_partials(torch.empty(shape)) > 1) == (shape[0] == 8)
    ref = torch.nn.BatchNorm2d(shape[1], momentum=momentum).to(device, torch.float64)
    ours = tkern.nn.BatchNorm2d(shape[1], momentum=momentum).to(device, torch.float64)
    for step in range(4):
        x = torch.randn(shape, device=device, dtype=torch.float64) * 3 + step
        with _KernelCounter() as k:
            y = ours(x)
        torch.testing.assert_close(y, ref(x))
        assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == step + 1
        torch.testing.assert_close(ours.running_mean, ref.running_mean)
        torch.testing.assert_close(ours.running_var, ref.running_var)
        if step:  # a repeated call: the checked-call cache's path
            assert k.ops.count("add_") == (0 if momentum is not None else 1), k.ops
    ours.eval(), ref.eval()
    x = torch.randn(shape, device=device, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x))
    assert ours.num_batches_tracked.item() == 4


@pytest.mark.parametrize("guards", ["dynamo", "signature"])
def test_module_remembers_its_checked_call(device, monkeypatch, guards):
    """A module's repeated call skips the checks (one guard on its tensors' metadata, made on the
    second checked call in a row) and still follows torch through whatever changes between
    calls: a layout, momentum, a parameter swapped in the dicts or removed, train / eval, a
    residual, a plain ``weight`` attribute set by a hook; deepcopy and pickle work after calls."""
    import copy
    import pickle

    import tkern.nn.batch_norm as bn_module

    if guards == "signature":  # tensor_guard's fallback, for a torch without dynamo's guards
        monkeypatch.setattr(_op, "_TensorGuards", None)
    checked = []
    real_key = bn_module.checked_key
    monkeypatch.setattr(bn_module, "checked_key", lambda *a: checked.append(1) or real_key(*a))
    kw = dict(device=device, dtype=torch.float64)
    ref = torch.nn.BatchNorm2d(4, **kw)
    ours = tkern.nn.BatchNorm2d(4, activation="relu", **kw)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5), ref.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(ref.state_dict())

    def step(x, residual=None, m=ours, r=ref):
        y = m(x) if residual is None else m(x, residual)
        z = r(x) if residual is None else r(x) + residual
        torch.testing.assert_close(y, torch.relu(z))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            if getattr(r, name) is not None:
                torch.testing.assert_close(getattr(m, name), getattr(r, name))
        return len(checked)

    def x(fmt=torch.contiguous_format):
        return (torch.randn(2, 4, 3, 3, **kw) * 2 + 1).contiguous(memory_format=fmt)

    assert [step(x()) for _ in range(4)] == [1, 2, 2, 2]  # remembered from the second call
    ours.momentum = ref.momentum = 0.3  # an attribute set forgets the call
    assert [step(x()) for _ in range(3)] == [3, 4, 4]
    assert step(x(torch.channels_last)) == 5  # another layout: the guard fails
    assert step(x()) == 5  # ... and the remembered call still holds
    w = torch.nn.Parameter(torch.rand(4, **kw) + 0.5)
    ours._parameters["weight"], ref._parameters["weight"] = w, w  # swapped in the dict
    assert step(x()) == 5  # same metadata: the remembered call, with the new tensor
    ours.register_parameter("bias", None), ref.register_parameter("bias", None)
    assert [step(x()) for _ in range(3)] == [6, 7, 7]
    r = torch.randn(2, 4, 3, 3, **kw)
    assert [step(x(), r) for _ in range(3)] == [8, 9, 9]  # a residual: a call of its own
    ours.eval(), ref.eval()
    assert [step(x()) for _ in range(3)] == [10, 11, 11]
    ours.train(), ref.train()
    assert step(x(), r) == 11  # each mode keeps its own (training's: the residual call)
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        twin = copy.deepcopy(ref)
        step(x(), m=clone, r=twin), step(x(), m=clone, r=twin)
    # a plain ``weight`` attribute (old-style weight_norm's hook sets one): attribute access's
    for m in (ours, ref):
        del m._parameters["weight"]
        m.weight = torch.full((4,), 2.0, **kw)
    step(x()), step(x())
    m_weight = ours.__dict__["weight"]
    assert m_weight is not None and bn_module._MEMO[True] not in ours.__dict__
