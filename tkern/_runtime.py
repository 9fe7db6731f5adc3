"""Where a kernel runs, and the launch rules every op shares.

The runtime rule:
- tensors on a GPU (any non-CPU device Triton targets) run the compiled Triton kernels;
- CPU tensors with ``TRITON_INTERPRET=1`` (set before triton is imported) run the very same kernels in
  Triton's interpreter, which is how the test-suite checks kernels on machines without a GPU;
- CPU tensors otherwise fall back to eager PyTorch, with one warning per op;
- meta tensors (shapes without data) take the eager PyTorch path silently.
Tensors on different devices raise ``RuntimeError``, as PyTorch's own ops do.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import sys
import warnings

import torch
import triton
import triton.language as tl

_warned: set[str] = set()
# Frames in these folders are not the caller's: tkern itself, and torch (nn.Module.__call__ runs
# between a user's ``model(x)`` and tkern's forward).
_INTERNAL = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
             os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


def warn_at_caller(message: str, category=RuntimeWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside tkern and torch: the user's line,
    whatever the call depth of the op (functions, modules, autograd)."""
    if sys.version_info >= (3, 12):
        warnings.warn(message, category, skip_file_prefixes=_INTERNAL)
        return
    frame, level = sys._getframe(1), 2  # stacklevel 2 is this function's caller
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


# os.environ's own mapping of encoded names and values (POSIX and Windows CPython): a lookup
# there costs a tenth of os.environ.get, which encodes and decodes on every call
_ENV = getattr(os.environ, "_data", None)
if _ENV is not None:
    _INTERPRET_KEY = os.environ.encodekey("TRITON_INTERPRET")
    _INTERPRET_OFF = (os.environ.encodevalue(""), os.environ.encodevalue("0"))


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its interpreter (read each call: tests may toggle it)."""
    if _ENV is not None:
        value = _ENV.get(_INTERPRET_KEY)
        return value is not None and value not in _INTERPRET_OFF
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_same_device(*tensors: torch.Tensor | None) -> torch.device | None:
    """The common device of the given tensors (``None`` entries ignored); RuntimeError if they differ."""
    device = None
    for t in tensors:
        if t is None:
            continue
        if device is None:
            device = t.device
        elif t.device != device:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found at least two devices, "
                f"{device} and {t.device}!"
            )
    return device


# Set by ``plan_as_gpu``: the SM count of a card that CPU tensors' launches are planned for, so that
# perf.static_cost can record, without a GPU, the launches a GPU run makes (and compile them).
_planned_sms: int | None = None
# A new object whenever what plans depend on changes (``plan_as_gpu``; ``_op.clear_plan_caches``):
# a call remembered with one is valid while it is current (``_op.call_state``).
plan_state = object()
_sm_counts: dict = {}


@contextlib.contextmanager
def plan_as_gpu(sm_count: int):
    """Within this block CPU tensors take the GPU path and GPU-sized plans for a card of
    ``sm_count`` SMs.  For recording launches only (perf.static_cost): the caller intercepts
    the launches, which would otherwise run compiled code on CPU memory."""
    global _planned_sms, plan_state
    saved, _planned_sms = _planned_sms, int(sm_count)
    plan_state = object()
    try:
        yield
    finally:
        _planned_sms = saved
        plan_state = object()


def plans_for_gpu(device: torch.device) -> bool:
    """True when launches on ``device`` are planned and compiled as on a GPU (not the
    interpreter's few big programs)."""
    return device.type != "cpu" or _planned_sms is not None


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (``plan_as_gpu``'s count when set), cached."""
    if _planned_sms is not None:
        return _planned_sms
    key = (device.type, device.index)
    if key not in _sm_counts:
        try:
            _sm_counts[key] = torch.cuda.get_device_properties(device).multi_processor_count
        except Exception:  # a device torch.cuda cannot describe
            _sm_counts[key] = 108
    return _sm_counts[key]


def use_triton(op: str, *tensors: torch.Tensor | None) -> bool:
    """Apply the runtime rule for ``op``: True to launch Triton kernels, False for the eager fallback."""
    device = check_same_device(*tensors)
    if device is not None and device.type == "meta":  # shapes only: torch's ops give them
        return False
    if device is None or device.type != "cpu" or interpreter_enabled() or _planned_sms is not None:
        return True
    if op not in _warned:
        _warned.add(op)
        warn_at_caller(
            f"tkern.{op}: CPU tensors without TRITON_INTERPRET=1 run eager PyTorch, not tkern's "
            f"Triton kernels; move the tensors to a GPU (or set TRITON_INTERPRET=1 before importing "
            f"triton to run the kernels in Triton's interpreter).",
            RuntimeWarning,
        )
    return False


def compute_dtype(dtype: torch.dtype):
    """Triton type for the arithmetic: fp64 for fp64 tensors, fp32 for everything else."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """torch type of saved statistics and partial sums: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def num_warps_for(block: int) -> int:
    """Warps for a block of ``block`` elements: one warp per 256 elements, between 1 and 16."""
    return max(1, min(16, block // 256))


def is_dense(x: torch.Tensor) -> bool:
    """True when ``x`` covers its memory without gaps or overlaps (any dim order), so an
    elementwise kernel can walk it as a flat array and ``torch.empty_like`` keeps its strides."""
    if x.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(x.shape, x.stride()), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def draw_seed_tensor(generator: torch.Generator | None = None) -> torch.Tensor:
    """A Philox seed, as a 0-dim int64 CPU tensor, from torch's default CPU generator (or
    ``generator``), so that ``torch.manual_seed`` reproduces a run and consecutive calls draw new
    masks.  A tensor, not an int, so that torch.compile traces the draw; a CPU tensor, so that a
    kernel launcher reads it without a GPU sync.  31 bits keep the kernel's seed argument one
    integer type, hence one compiled variant.  A CUDA ``generator`` costs a device-to-host copy
    (a sync) per call; the default CPU generator costs none."""
    seed = torch.randint(0, 2**31 - 1, (), generator=generator,
                         device=generator.device if generator is not None else "cpu")
    return seed.cpu()


def split_f32(v: float) -> tuple[float, float]:
    """``v`` as an fp32 pair (hi, lo) with hi + lo == v to about 48 bits.

    Triton passes a Python float kernel argument as fp32, which would cost fp64 tensors ~1e-8
    relative error; kernels take such scalars as two arguments and rebuild them with
    ``tl.cast(hi, COMPUTE) + tl.cast(lo, COMPUTE)`` (exact enough for fp64, a plain fp32 value for
    fp32, the same compiled and in the interpreter)."""
    try:
        hi = struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:  # beyond fp32's range
        return math.copysign(math.inf, v), 0.0
    if not math.isfinite(hi):
        return hi, 0.0
    return hi, struct.unpack("f", struct.pack("f", v - hi))[0]


def check_scalars(op: str, dtype: torch.dtype, **scalars) -> None:
    """Float scalars reach kernels as fp32 pairs (``split_f32``), exact to ~48 bits within fp32's
    range.  For float64 tensors, a value the pair cannot carry (|v| > ~3.4e38 becomes inf; below
    ~1e-33 its bits are lost in subnormals) would be a silent wrong result: ValueError naming it.
    fp32/fp16/bf16 tensors compute in fp32, where the fp32 value is the one torch uses too."""
    if dtype != torch.float64:
        return
    for name, v in scalars.items():
        v = float(v)
        if v == 0.0 or not math.isfinite(v):  # 0, inf and NaN travel exactly
            continue
        hi, lo = split_f32(v)
        if not abs((hi + lo) - v) <= abs(v) * 2.0 ** -40:
            raise ValueError(
                f"tkern.{op}: {name}={v!r} is outside the range float scalars reach float64 kernels "
                f"in (|{name}| from about 1e-33 to 3.4e38, float32 pairs); it would arrive as "
                f"{hi + lo!r}")


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)


class DtypeError(TypeError, RuntimeError):
    """A tensor of a dtype the op does not take.  PyTorch raises RuntimeError or TypeError for
    this depending on the op; this is both, so either ``except`` clause catches it."""


def check_floating(op: str, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and not t.is_floating_point():
            raise DtypeError(f"tkern.{op}: {name} must be a floating-point tensor, got {t.dtype}")


def needs_int64(*tensors: torch.Tensor | None, margin: int = 1 << 20) -> bool:
    """Whether element offsets can pass 2^31 (then kernels index in int64; else int32 is cheaper).
    ``margin`` covers a last block that overruns the tensor's end."""
    def span(t: torch.Tensor) -> int:  # elements between the first and one past the last
        return max(t.numel(), 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()) if n))

    return any(t is not None and span(t) + margin >= 2**31 for t in tensors)
