"""Small numeric helpers shared by the kernels.

- ``from_pair``: a float scalar passed as an fp32 pair (``_runtime.split_f32``), in COMPUTE.
- ``sqrt_rn`` / ``div_rn``: correctly rounded for fp32 and fp64.  On NVIDIA GPUs Triton lowers fp32
  ``tl.sqrt`` and ``/`` to approximate instructions (within an ulp or two); the ``_rn`` forms are
  IEEE-exact but take fp32 only.  fp64 ``sqrt`` and ``/`` are exact.
- ``cast_rn``: the cast of every store (and of every rounding a kernel mimics) to a narrower float
  type, rounded to nearest even, compiled and in the interpreter alike.
"""

import os

import triton
import triton.language as tl

# Whether triton.jit builds interpreted functions: Triton reads TRITON_INTERPRET when a kernel is
# decorated, i.e. when tkern is imported, so this is read then too.
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


@triton.jit
def cast_rn(x, dtype: tl.constexpr):
    """``x.to(dtype)``, rounded to nearest even.  Compiled, that is the plain cast (GPUs round
    so).  Triton's interpreter truncates fp32 -> bf16 (its fp16 cast is numpy's, which rounds):
    there the rounding is done on the bits, so that CPU tests check what a GPU computes."""
    if _INTERPRETED and dtype == tl.bfloat16:
        # the interpreter also mangles subnormals in its cast: build the bf16 bits directly
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16  # ties to the even neighbour
        quiet_nan = (bits >> 16) | 0x40  # a NaN stays NaN (rounding could carry it into inf)
        r = tl.where(x != x, quiet_nan, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        r = x.to(dtype)
    return r


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
