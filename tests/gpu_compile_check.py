"""Compile every tkern kernel for an H100 (sm_90) with the installed Triton, without a GPU.

The interpreter runs kernels as numpy code, so it accepts things the GPU compiler rejects; this
script (run by tests/test_gpu_compile.py in a process without TRITON_INTERPRET) catches those.
It prints one line per kernel variant and exits non-zero if any fails to compile.
"""

import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tkern.ops import activation_dropout as ad
from tkern.ops import batch_norm as bn
from tkern.ops import lrn
from tkern.ops import weight_norm as wn

TARGET = GPUTarget("cuda", 90, 32)
POINTERS = {"X", "Y", "BIAS", "DY", "OUT", "DX", "DBIAS", "GRAD", "DONE", "PARTIAL", "G", "V", "GW", "NORM", "DOT", "PART", "GG", "MEAN",
            "MEAN_LO", "INVSTD", "W", "B", "SUM_G", "SUM_GX", "PSUM_G", "PSUM_GX", "PCOUNT", "PMEAN",
            "PMEAN_LO", "PM2", "OCOUNT", "OM2", "RMEAN", "RVAR", "NBT", "COUNT", "M2", "SUMS"}
FLOATS = {"p", "scale_hi", "scale_lo", "eps_hi", "eps_lo", "mom_hi", "mom_lo", "negative_slope", "alpha", "inv_n_hi",
          "slope_hi", "slope_lo", "alpha_hi", "alpha_lo",
          "inv_n_lo", "k_hi", "k_lo", "a_hi", "a_lo", "b_hi", "b_lo", "scale"}
failures = []


def compile_variant(fn, consts, name, ptr="*fp32", overrides=None):
    fn = getattr(fn, "fn", fn) if not hasattr(fn, "params") else fn
    sig = {}
    consts = dict(consts)
    for kp in fn.params:
        given = kp.name in consts or (overrides and kp.name in overrides)
        if kp.has_default and not given:  # optional arguments (BatchNorm's residual) at defaults
            sig[kp.name] = "constexpr"
            consts[kp.name] = kp.default
        elif kp.is_constexpr:
            sig[kp.name] = "constexpr"
        elif overrides and kp.name in overrides:
            sig[kp.name] = overrides[kp.name]
        elif kp.annotation:
            sig[kp.name] = kp.annotation
        elif kp.name in POINTERS:
            sig[kp.name] = ptr
        elif kp.name in FLOATS:
            sig[kp.name] = "fp32"
        else:
            sig[kp.name] = "i32"
    missing = [k for k, v in sig.items() if v == "constexpr" and k not in consts]
    try:
        if missing:
            raise ValueError(f"no value for constexpr {missing}")
        triton.compile(ASTSource(fn, signature=sig, constexprs=consts), target=TARGET,
                       options={"num_warps": 4})
        print(f"ok    {name}")
    except Exception as e:  # report every failure, not just the first
        failures.append(name)
        print(f"FAIL  {name}: {type(e).__name__}: {str(e)[:800]}")


def main():
    f32 = tl.float32
    flat = dict(BIAS_GATHER=False, SUM_DBIAS=False, DBIAS_PARTIAL=False, PARTS=ad.DBIAS_PARTS, TRIPS=3,
                ACC=f32, ROWS=1,
                BLOCK_COLS=ad.QUARTER, EVEN_COLS=True, N_ROUNDS=ad.N_ROUNDS, WIDE_MUL=True)
    rows = dict(flat, ROWS=ad.QUARTER // ad.BIAS_COLS, BLOCK_COLS=ad.BIAS_COLS)
    for act in ("relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "elu", "tanh", "sigmoid",
                "relu6", "hardtanh", "hardswish", "hardsigmoid", "mish", "softplus"):
        for backward in ((False, True) if act in ("relu", "gelu", "elu") else (True,)):
            compile_variant(ad._kernel, dict(ACTIVATION=act, HAS_BIAS=True, DROPOUT=True, BACKWARD=backward,
                                             SEED_FROM_PTR=act == "gelu", COMPUTE=f32, INT64=act == "relu",
                                             EVEN=False, **dict(rows, EVEN_COLS=False, SUM_DBIAS=backward,
                                                                DBIAS_PARTIAL=backward)),
                            f"activation_dropout {act} backward={backward}", ptr="*bf16",
                            overrides={"SEED": "*i64", "DBIAS": "*fp32", "DONE": "*i32"})
    for even, tile, name in ((True, rows, "bias rows"), (True, flat, "flat"),
                             (False, dict(flat, BIAS_GATHER=True), "bias gathered")):
        compile_variant(ad._kernel, dict(ACTIVATION="gelu", HAS_BIAS=True, DROPOUT=True, BACKWARD=True,
                                         SEED_FROM_PTR=False, COMPUTE=f32, INT64=False, EVEN=even, **tile),
                        f"activation_dropout even={even} {name}", ptr="*bf16",
                        overrides={"SEED": "*i64"})
    compile_variant(ad._kernel, dict(ACTIVATION="gelu", HAS_BIAS=True, DROPOUT=True, BACKWARD=False,
                                     SEED_FROM_PTR=False, COMPUTE=f32, INT64=False, EVEN=True,
                                     **dict(rows, WIDE_MUL=False)),
                    "activation_dropout Philox without inline PTX", ptr="*bf16",
                    overrides={"SEED": "*i64"})
    compile_variant(ad._kernel, dict(ACTIVATION="gelu", HAS_BIAS=True, DROPOUT=True, BACKWARD=True,
                                     SEED_FROM_PTR=False, COMPUTE=tl.float64, INT64=True, EVEN=False,
                                     **dict(rows, SUM_DBIAS=True, ACC=tl.float64)),
                    "activation_dropout fp64 dbias", ptr="*fp64", overrides={"SEED": "*i64"})
    compile_variant(ad._kernel, dict(ACTIVATION="gelu", HAS_BIAS=False, DROPOUT=False, BACKWARD=True,
                                     SEED_FROM_PTR=False, COMPUTE=tl.float64, INT64=False, EVEN=False,
                                     **flat),
                    "activation_dropout fp64", ptr="*fp64", overrides={"SEED": "*i64"})
    tiles = dict(BLOCK_S=64, BLOCK_C=64)
    for int64 in (False, True):
        compile_variant(bn._stats_partial_kernel, dict(COMPUTE=f32, INT64=int64, **tiles),
                        f"bn stats_partial int64={int64}", overrides={"X": "*fp16"})
        common = dict(HAS_LO=True, HAS_W=True, HAS_B=True, COMPUTE=f32, INT64=int64, **tiles)
        compile_variant(bn._normalize_kernel, dict(FROM_VAR=False, ACTIVATION="silu", **common),
                        f"bn normalize int64={int64}", overrides={"X": "*bf16", "Y": "*bf16"})
        for eval_dx, train_dx in ((False, False), (True, False), (False, True)):
            compile_variant(bn._backward_reduce_kernel,
                            dict(EVAL_DX=eval_dx, TRAIN_DX=train_dx, FROM_VAR=eval_dx, ACTIVATION="leaky_relu",
                                 **common),
                            f"bn backward_reduce eval_dx={eval_dx} train_dx={train_dx} int64={int64}")
        for write_y in (False, True):
            compile_variant(bn._fused_forward_kernel,
                            dict(UPDATE=True, CUMULATIVE=write_y, WRITE_Y=write_y, HAS_W=True, HAS_B=False,
                                 ACTIVATION="elu", COMPUTE=f32, INT64=int64, **tiles),
                            f"bn fused_forward write_y={write_y} int64={int64}",
                            overrides={"X": "*bf16", "Y": "*bf16", "NBT": "*i64"})
        for cumulative in (False, True):
            compile_variant(bn._merge_normalize_kernel,
                            dict(UPDATE=True, CUMULATIVE=cumulative, HAS_W=True, HAS_B=True, ACTIVATION="relu",
                                 COMPUTE=f32, INT64=int64, BLOCK_P=32, **tiles),
                            f"bn merge_normalize cumulative={cumulative} int64={int64}",
                            overrides={"X": "*bf16", "Y": "*bf16", "NBT": "*i64"})
        compile_variant(bn._dx_kernel, dict(TRAINING=True, WRITE_SUMS=True, FROM_VAR=False, ACTIVATION="gelu", **common),
                        f"bn dx int64={int64}")
    # the residual variants (HAS_R: R read, DR written in backward's first pass)
    res = dict(HAS_LO=True, HAS_W=True, HAS_B=True, COMPUTE=f32, INT64=False, HAS_R=True, **tiles)
    bf16 = {"X": "*bf16", "Y": "*bf16", "R": "*bf16"}
    compile_variant(bn._normalize_kernel, dict(FROM_VAR=True, ACTIVATION="relu", **res),
                    "bn normalize residual", overrides=bf16)
    compile_variant(bn._fused_forward_kernel,
                    dict(UPDATE=True, CUMULATIVE=False, WRITE_Y=True, ACTIVATION="hardswish",
                         **{k: v for k, v in res.items() if k != "HAS_LO"}),
                    "bn fused_forward residual", overrides=dict(bf16, NBT="*i64"))
    compile_variant(bn._merge_normalize_kernel,
                    dict(UPDATE=True, CUMULATIVE=False, ACTIVATION="relu6", BLOCK_P=32,
                         **{k: v for k, v in res.items() if k != "HAS_LO"}),
                    "bn merge_normalize residual", overrides=dict(bf16, NBT="*i64"))
    compile_variant(bn._backward_reduce_kernel,
                    dict(EVAL_DX=False, TRAIN_DX=True, FROM_VAR=False, ACTIVATION="relu", **res),
                    "bn backward_reduce residual", overrides={"R": "*fp32", "DR": "*fp32"})
    compile_variant(bn._dx_kernel, dict(TRAINING=False, WRITE_SUMS=False, FROM_VAR=True,
                                        ACTIVATION="relu", WRITE_DR=True, **res),
                    "bn dx residual eval", overrides={"R": "*fp32", "DR": "*fp32"})
    for cumulative in (False, True):
        compile_variant(bn._stats_combine_kernel,
                        dict(HAS_LO=True, UPDATE=True, CUMULATIVE=cumulative, WRITE_INVSTD=True, WRITE_M2=False,
                             COMPUTE=f32, BLOCK_P=32, BLOCK_C=128),
                        f"bn stats_combine cumulative={cumulative}", overrides={"NBT": "*i64"})
    compile_variant(bn._normalize_kernel, dict(HAS_LO=True, FROM_VAR=True, HAS_W=True, HAS_B=True, ACTIVATION="elu",
                                               COMPUTE=tl.float64, INT64=False, BLOCK_S=64, BLOCK_C=32),
                    "bn normalize fp64", ptr="*fp64")
    for int64 in (False, True):
        for unroll in (False, True):  # the FAST (inline PTX) math only exists compiled
            consts = dict(COMPUTE=f32, INT64=int64, BLOCK_C=16, BLOCK_S=128, UNROLL=unroll,
                          BEFORE=2 if unroll else 0, AFTER=1 if unroll else 0, FAST=True)
            name = f"int64={int64} unroll={unroll}"
            compile_variant(lrn._lrn_forward_kernel, consts, f"lrn forward {name}", ptr="*bf16")
            compile_variant(lrn._lrn_backward_kernel, consts, f"lrn backward {name}", ptr="*fp16")
    consts = dict(COMPUTE=tl.float64, INT64=False, BLOCK_C=16, BLOCK_S=128, UNROLL=True, BEFORE=2,
                  AFTER=2, FAST=False)
    compile_variant(lrn._lrn_forward_kernel, consts, "lrn forward fp64", ptr="*fp64")
    compile_variant(lrn._lrn_backward_kernel, consts, "lrn backward fp64", ptr="*fp64")
    # the sliding kernels (positions contiguous): windows, the per-launch flags, int64, fp64
    # (the backward's MASK_S: a one-block S; RCP: s^(-beta-1) through rcp, with FTZ only)
    for (before, after), flags, back in [
            ((2, 2), dict(NEG_BASE=False, BETA_ZERO=False, FTZ=True), dict(MASK_S=False, RCP=True)),
            ((2, 2), dict(NEG_BASE=False, BETA_ZERO=False, FTZ=True), dict(MASK_S=True, RCP=False)),
            ((0, 0), dict(NEG_BASE=True, BETA_ZERO=False, FTZ=False), dict(MASK_S=True, RCP=False)),
            ((4, 4), dict(NEG_BASE=True, BETA_ZERO=True, FTZ=False), dict(MASK_S=False, RCP=False)),
            ((0, 3), dict(NEG_BASE=False, BETA_ZERO=False, FTZ=True), dict(MASK_S=False, RCP=True))]:
        for int64 in (False, True):
            consts = dict(BEFORE=before, AFTER=after, FAST=True, COMPUTE=f32, INT64=int64,
                          BLOCK_S=512, **flags)
            name = f"window=({before},{after}) {flags} {back} int64={int64}"
            compile_variant(lrn._lrn_forward_slide_kernel, consts, f"lrn forward slide {name}",
                            ptr="*bf16")
            compile_variant(lrn._lrn_backward_slide_kernel, dict(consts, **back),
                            f"lrn backward slide {name}", ptr="*fp16")
    consts = dict(BEFORE=2, AFTER=2, FAST=False, COMPUTE=tl.float64, INT64=False, BLOCK_S=128,
                  NEG_BASE=True, BETA_ZERO=False, FTZ=False)
    compile_variant(lrn._lrn_forward_slide_kernel, consts, "lrn forward slide fp64", ptr="*fp64")
    for mask_s in (False, True):
        compile_variant(lrn._lrn_backward_slide_kernel, dict(consts, MASK_S=mask_s, RCP=False),
                        f"lrn backward slide fp64 MASK_S={mask_s}", ptr="*fp64")
    for layout in (0, 1, 2):
        for backward in (False, True):
            compile_variant(
                wn._weight_norm_kernel,
                dict(BACKWARD=backward, REDUCE=True, APPLY=True, ONE_PASS=layout == 0, LAYOUT=layout, BLOCK_D=4,
                     BLOCK_R=1024, COMPUTE=f32, INT64=layout == 2,
                     NORM_TY=tl.bfloat16, NORM_MODE=1, RATIO_TY=tl.bfloat16, RATIO_MODE=1),
                f"weight_norm layout={layout} backward={backward}", overrides={"V": "*bf16", "OUT": "*bf16"})
    print(f"{len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
