"""Small numeric helpers shared by the kernels.

- ``from_pair``: a float scalar passed as an fp32 pair (``_runtime.split_f32``), in COMPUTE.
- ``sqrt_rn`` / ``div_rn``: correctly rounded for fp32 and fp64.  On NVIDIA GPUs Triton lowers fp32
  ``tl.sqrt`` and ``/`` to approximate instructions (within an ulp or two); the ``_rn`` forms are
  IEEE-exact but take fp32 only.  fp64 ``sqrt`` and ``/`` are exact.
"""

import triton
import triton.language as tl


@triton.jit
def from_pair(hi, lo, COMPUTE: tl.constexpr):
    # tl.cast, not .to: the interpreter hands float arguments over as Python floats
    return tl.cast(hi, COMPUTE) + tl.cast(lo, COMPUTE)


@triton.jit
def sqrt_rn(x):
    if x.dtype == tl.float64:
        r = tl.sqrt(x)
    else:
        r = tl.sqrt_rn(x)
    return r


@triton.jit
def div_rn(x, y):
    if x.dtype == tl.float64:
        r = x / y
    else:
        r = tl.div_rn(x, y)
    return r
