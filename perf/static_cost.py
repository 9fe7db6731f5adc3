"""Static cost of tkern's hot kernels on an H100, without a GPU: ``python -m perf.static_cost``.

Each kernel is compiled for sm_90a with the installed Triton, specialised the way a real launch
specialises it (unit strides as constants, 16-divisible sizes, strides and pointers marked so),
and its PTX counted: instructions per element (these kernels have no loops in the variants listed,
so the static count is the dynamic one), 16-byte loads per thread and MUFU (ex2/lg2) operations.
Registers and spills come from ptxas when Triton ships one that reads its PTX.

What it is for: an H100 issues about 128 instructions per clock per SM, so at ~3 TB/s it can
spend roughly 10 instructions per byte moved; a kernel above that is compute-bound whatever its
memory traffic.  These are estimates to steer kernel work between GPU runs, not timings.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
# a launch passes these as 1 (Triton turns them into constants) or as multiples of 16
UNIT = {"sxS", "syS", "sdS", "soS", "sxs", "sys", "sgs", "sds", "col_stride"}
DIV16 = {"sxN", "sxC", "syN", "syC", "sdN", "sdC", "soN", "soC", "sN", "sC", "S", "C",
         "sxn", "sxc", "syn", "syc", "sgn", "sgc", "sdn", "sdc", "n_elements"}
FLOATS = re.compile(r"(_hi|_lo)$")


def _compile(fn, consts, ptr, num_warps):
    fn = getattr(fn, "fn", fn) if not hasattr(fn, "params") else fn
    consts = dict(consts)
    sig, attrs = {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in UNIT:
            sig[p.name] = "constexpr"
            consts[p.name] = 1
        elif p.name in DIV16:
            sig[p.name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif p.name.isupper():  # pointers are upper case in tkern's kernels
            sig[p.name] = ptr
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[p.name] = "fp32" if FLOATS.search(p.name) else "i32"
    src = ASTSource(fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps})


def _ptxas_report(ptx: str) -> str:
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):  # the newest one first: it reads newer PTX
        exe = os.path.join(bindir, name)
        if not os.path.exists(exe):
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        try:
            r = subprocess.run([exe, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                               capture_output=True, text=True, timeout=120)
        finally:
            os.unlink(f.name)
        regs = re.search(r"Used (\d+) registers", r.stderr)
        spills = re.search(r"(\d+) bytes spill stores", r.stderr)
        if regs:
            return f"{regs.group(1)} regs, {spills.group(1) if spills else '?'} B spilled"
    return "ptxas: n/a"


def report(name, fn, consts, elements, num_warps, ptr="*fp32"):
    k = _compile(fn, consts, ptr, num_warps)
    ptx = k.asm["ptx"]
    ops = collections.Counter(re.findall(r"^\s+(?:@!?%p\d+ )?([a-z][\w.]*)", ptx, re.M))
    per_thread = elements / (32 * num_warps)
    instr = sum(ops.values()) / per_thread
    mufu = sum(n for op, n in ops.items() if op.startswith(("ex2", "lg2"))) / per_thread
    v4 = ops.get("ld.global.v4.b32", 0)
    print(f"{name:<44} {instr:6.0f} instr/elem  {mufu:4.1f} MUFU/elem  {v4:3d} v4 loads/thread  "
          f"{_ptxas_report(ptx)}")


def main() -> int:
    from tkern.ops import activation_dropout as ad
    from tkern.ops import batch_norm as bn
    from tkern.ops import lrn

    f32 = tl.float32
    print(f"triton {triton.__version__}, sm_90a, fp32 unless noted")
    for size in (3, 5, 9):
        before, after = size // 2, (size - 1) // 2
        consts = dict(UNROLL=True, BEFORE=before, AFTER=after, FAST=True, COMPUTE=f32, INT64=False,
                      BLOCK_C=16, BLOCK_S=128)
        report(f"lrn forward size {size}", lrn._lrn_forward_kernel, consts, 2048, 16)
        report(f"lrn backward size {size}", lrn._lrn_backward_kernel, consts, 2048, 16)
    for act in ("relu", "gelu", "silu"):
        for backward in (False, True):
            consts = dict(ACTIVATION=act, HAS_BIAS=False, DROPOUT=True, BACKWARD=backward,
                          SEED_FROM_PTR=False, COMPUTE=f32, INT64=False, QUARTER=ad.QUARTER)
            report(f"activation_dropout {act} {'backward' if backward else 'forward'} bf16",
                   ad._kernel, consts, ad.BLOCK, 4, ptr="*bf16")
    common = dict(HAS_LO=True, HAS_W=True, HAS_B=True, FROM_VAR=False, ACTIVATION="relu",
                  COMPUTE=f32, INT64=False, BLOCK_S=256, BLOCK_C=16)
    # loops over units: the count is one unit's (a program with one unit of work)
    report("batch_norm normalize NCHW, per unit", bn._normalize_kernel, common, 4096, 16)
    report("batch_norm dx NCHW, per unit", bn._dx_kernel, dict(common, TRAINING=True, WRITE_SUMS=True),
           4096, 16)
    return 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # ``python -m perf.static_cost`` imported the perf package, which turns the interpreter
        # on when there is no GPU; compiling needs it off, so run this file again without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        sys.exit(subprocess.run([sys.executable, os.path.abspath(__file__)], env=env).returncode)
    sys.exit(main())
