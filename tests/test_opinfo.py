"""tkern against PyTorch's own OpInfo test inputs (``common_methods_invocations.op_db``).

For every OpInfo that a tkern function mirrors (``MIRRORS``), each of torch's samples runs through
the torch op and through tkern with the same args and kwargs, and the test compares the output,
the gradients of every input that requires grad (``torch.autograd.grad`` with a random
grad_output) and every tensor argument that does not (BatchNorm's running stats, which both sides
update in place on their own clones).  Every comparison is ``assert_close_rule``: tkern's error
against a float64 torch run on the same values may be at most twice torch's own error at the
sample's dtype plus the dtype's small absolute term (for float64 that is ~1e-9).

- One test per sample, dtype and OpInfo (ids ``<op>-<dtype>-s<index>``), so a failure names the
  sample; dtypes are fp16/bf16/fp32/fp64 where the OpInfo supports them on the device, gradients
  where it supports backward there.
- ``reference_inputs`` are added only where the OpInfo defines its own (otherwise they are the
  sample inputs again).  None of the mirrored OpInfos does in torch 2.13.
- ``error_inputs``: tkern must raise an instance of the ErrorInput's ``error_type`` (messages may
  differ).  None of the mirrored OpInfos defines them in torch 2.13, so that test skips.
- Samples are subsampled deterministically (every k-th) only past ``MAX_SAMPLES`` per OpInfo and
  dtype; torch 2.13 has 12 (batch_norm) and 11 (local_response_norm), so all run.
- ``KNOWN_GAPS``: samples where tkern disagrees with torch, each with its repro; those exact samples
  skip (with the reason) until tkern is fixed and the entry removed.  Nothing else is skipped except
  what falls outside tkern's documented scope, said where it is decided.
"""

import math

import pytest
import torch

import tkern
from tkern.testing import assert_close_rule

try:
    from torch.testing._internal.common_methods_invocations import op_db
except Exception as e:  # expecttest missing, or torch's internals moved
    pytest.skip(f"torch.testing._internal.common_methods_invocations unavailable: {e!r}",
                allow_module_level=True)

# The device type the tests will run on, by conftest's rule (its `device` fixture); collection
# needs it to list the dtypes each OpInfo supports there.
DEVICE_TYPE = "cuda" if torch.cuda.is_available() else "cpu"

# tkern's documented dtypes.  local_response_norm's OpInfo also lists int64 (torch returns float32
# for it); tkern documents fp16/bf16/fp32/fp64 only and raises DtypeError for integer input, so
# int64 is outside its scope and not run.
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# op_db name -> the tkern function with the same signature (positional order and kwarg names
# match, so samples pass through unchanged).
MIRRORS = {
    "nn.functional.batch_norm": tkern.batch_norm,
    "nn.functional.local_response_norm": tkern.local_response_norm,
    # torch._weight_norm(v, g, dim=0); torch 2.13's op_db has no weight-norm OpInfo, so this entry
    # is used only if a later torch adds one.
    "_weight_norm": tkern.weight_norm,
}

MAX_SAMPLES = 48  # per OpInfo and dtype; above it every k-th sample runs


def _describe(sample) -> str:
    """A device- and value-independent name for a sample: the shapes and the non-tensor args."""
    def d(a):
        return f"T{tuple(a.shape)}" if isinstance(a, torch.Tensor) else repr(a)
    args = ", ".join(d(a) for a in sample.args)
    kwargs = ", ".join(f"{k}={d(v)}" for k, v in sample.kwargs.items())
    return f"input={d(sample.input)}; args=({args}); kwargs=({kwargs})"


# (op_db name, _describe(sample)) -> why tkern disagrees, with a minimal repro.  These samples skip
# (every dtype, every variant of the OpInfo); remove an entry once tkern is fixed.
KNOWN_GAPS = {
    # none now.  Form: (OpInfo name, sample description): reason, with a repro in a comment above
}


def _full_name(info) -> str:
    return info.name + (f".{info.variant_test_name}" if info.variant_test_name else "")


def _mirrored():
    """The OpInfos tkern mirrors, by full name, and skip reasons for related ones it cannot run."""
    infos, skipped = {}, []
    for info in op_db:
        if info.name in MIRRORS:
            infos[_full_name(info)] = info
        elif "weight_norm" in info.name:
            skipped.append((_full_name(info), "a weight-norm OpInfo with no tkern mapping"))
    if not any("weight_norm" in name for name in infos):
        skipped.append(("weight_norm",
                        f"torch {torch.__version__}'s op_db has no weight-norm OpInfo"))
    return infos, skipped


INFOS, _SKIPPED = _mirrored()


def _sample_lists(info, dtype, device):
    """(kind, samples) to run: torch's sample inputs, and its reference inputs if it has its own."""
    lists = [("s", list(info.sample_inputs(device, dtype, requires_grad=True)))]
    if info.reference_inputs_func is not None:
        lists.append(("r", list(info.reference_inputs(device, dtype, requires_grad=True))))
    return lists


def _indices(n: int) -> range:
    return range(0, n, max(1, math.ceil(n / MAX_SAMPLES)))


def _cases():
    params = []
    for full, info in INFOS.items():
        supported = info.supported_dtypes(DEVICE_TYPE)
        dtypes = [d for d in DTYPES if d in supported]
        if not dtypes:  # e.g. batch_norm's "without_cudnn" variant is CUDA-only
            params.append(pytest.param(full, None, None, None, None, id=f"{full}-none",
                                       marks=pytest.mark.skip(
                                           reason=f"{full} supports no dtype on {DEVICE_TYPE}")))
            continue
        for dtype in dtypes:
            # shapes and kwargs do not depend on the device; the test regenerates on its device
            for kind, samples in _sample_lists(info, dtype, "cpu"):
                for i in _indices(len(samples)):
                    params.append(pytest.param(full, dtype, kind, i, _describe(samples[i]),
                                               id=f"{full}-{str(dtype)[6:]}-{kind}{i}"))
    for full, reason in _SKIPPED:
        params.append(pytest.param(full, None, None, None, None, id=f"{full}-none",
                                   marks=pytest.mark.skip(reason=reason)))
    return params


# ------------------------------------------------------------------------------------------------
# running one sample


def _copy(a, dtype):
    """A fresh copy of a sample argument in ``dtype`` (floating tensors only), keeping
    requires_grad; anything else as is."""
    if not isinstance(a, torch.Tensor):
        return a
    t = a.detach().to(dtype) if a.is_floating_point() else a.detach()
    t = t.clone()
    return t.requires_grad_() if a.requires_grad else t


def _run(fn, sample, dtype, dy_fp64, backward):
    """fn on copies of the sample in ``dtype``: (output, grads of the inputs that require grad,
    the tensor arguments that do not, after the call)."""
    x = _copy(sample.input, dtype)
    args = [_copy(a, dtype) for a in sample.args]
    kwargs = {k: _copy(v, dtype) for k, v in sample.kwargs.items()}
    out = sample.output_process_fn_grad(fn(x, *args, **kwargs))
    tensors = [t for t in [x, *args, *kwargs.values()] if isinstance(t, torch.Tensor)]
    buffers = [t for t in tensors if not t.requires_grad]
    diff = [t for t in tensors if t.requires_grad]
    grads = None
    if backward and diff:
        dy = dy_fp64(out).to(out.dtype)
        grads = torch.autograd.grad(out, diff, dy, allow_unused=True, materialize_grads=True)
    return out, grads, buffers


def _close(ours, theirs, ref, name):
    """assert_close_rule, with NaNs required where torch (at the same dtype) has them."""
    assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    if ours.is_floating_point() and ours.numel():
        nan = torch.isnan(theirs)
        assert torch.equal(torch.isnan(ours), nan), f"{name}: NaNs at other places than torch's"
        if nan.any():
            keep = ~(nan | torch.isnan(ref))
            ours, theirs, ref = ours[keep], theirs[keep], ref[keep]
    assert_close_rule(ours, theirs, ref, name=name)


@pytest.mark.parametrize("full,dtype,kind,index,desc", _cases())
def test_opinfo_sample(device, full, dtype, kind, index, desc):
    info = INFOS[full]
    gap = KNOWN_GAPS.get((info.name, desc))
    if gap is not None:
        pytest.skip(f"KNOWN_GAPS: {gap}")
    if dtype not in info.supported_dtypes(device.type):
        pytest.skip(f"{full} does not support {dtype} on {device.type}")
    sample = dict(_sample_lists(info, dtype, device))[kind][index]
    assert _describe(sample) == desc, "torch's samples differ from those seen at collection"
    backward = info.supports_autograd and dtype in info.supported_backward_dtypes(device.type)

    # one grad_output for all three runs: drawn in fp64, rounded to the run's dtype
    dys = {}

    def dy_fp64(out):
        if out.shape not in dys:
            dys[out.shape] = torch.randn(out.shape, dtype=torch.float64, device=out.device)
        return dys[out.shape].to(dtype).double()

    def torch_op(*args, **kwargs):
        if info.variant_test_name == "without_cudnn":
            with torch.backends.cudnn.flags(enabled=False):
                return info.op(*args, **kwargs)
        return info.op(*args, **kwargs)

    theirs = _run(torch_op, sample, dtype, dy_fp64, backward)
    ref = _run(torch_op, sample, torch.float64, dy_fp64, backward)
    ours = _run(MIRRORS[info.name], sample, dtype, dy_fp64, backward)

    _close(ours[0], theirs[0], ref[0], "output")
    assert ours[0].dtype == theirs[0].dtype, f"output dtype {ours[0].dtype} != {theirs[0].dtype}"
    if backward:
        for i, (o, t, r) in enumerate(zip(*(run[1] for run in (ours, theirs, ref)))):
            _close(o, t, r, f"grad of differentiable arg {i}")
    for i, (o, t, r) in enumerate(zip(*(run[2] for run in (ours, theirs, ref)))):
        _close(o, t, r, f"non-differentiable tensor arg {i} after the call (running stat)")


# ------------------------------------------------------------------------------------------------
# torch's error inputs


@pytest.mark.parametrize("full", sorted(INFOS))
def test_opinfo_error_inputs(device, full):
    info = INFOS[full]
    if info.error_inputs_func is None:
        pytest.skip(f"{full} defines no error_inputs in torch {torch.__version__}")
    fn = MIRRORS[info.name]
    ran = 0
    for err in info.error_inputs(device):
        s = err.sample_input
        if (info.name, "error: " + _describe(s)) in KNOWN_GAPS:
            continue
        with pytest.raises(err.error_type):
            fn(s.input, *s.args, **s.kwargs)
        ran += 1
    assert ran or any(k[0] == info.name and k[1].startswith("error: ") for k in KNOWN_GAPS)
