"""Correctly rounded arithmetic for kernels whose results must round exactly as PyTorch's.

On NVIDIA GPUs Triton lowers fp32 ``tl.sqrt`` and ``/`` to approximate instructions (within an ulp
or two); the ``_rn`` forms are IEEE-exact but take fp32 only.  fp64 ``sqrt`` and ``/`` are exact.
"""

import triton
import triton.language as tl


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
