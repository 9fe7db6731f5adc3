"""Weight normalization: ``w = g * v / ||v||``, the norm taken over every dim of ``v`` but ``dim``.

Design:
- ``v`` (contiguous) is seen as ``[outer, D, inner]`` with ``D = v.shape[dim]``: slice ``d`` is
  ``v[:, d, :]`` and its ``R = outer * inner`` elements are indexed by ``r``.  The launch rule picks
  one of three address forms (constexpr ``LAYOUT``): ``ROWS`` (outer == 1, e.g. dim=0 or the whole
  tensor: each slice is one contiguous row), ``COLS`` (inner == 1, the last dim: a program takes a
  block of adjacent columns, so loads stay coalesced along the contiguous dim), and ``GENERAL``
  (div/mod of ``r`` by ``inner``, any middle dim).
- One kernel body does both directions.  Fused (the common case, e.g. Linear/conv weights with
  dim=0): a program owns whole slices, reduces (sum v^2 forward, sum gw*v backward) and writes the
  outputs.  When a slice fits ``ONE_PASS_MAX`` elements it stays in registers: v is read once and
  w written once, the minimum traffic.  Longer slices loop twice (the second read mostly hits L2).
- Few long slices (the whole-tensor norm, small D) would leave most SMs idle, so they split: pass 1
  writes fp32 partial sums per (chunk, slice), torch sums the small ``[split, D]`` partials
  (deterministic, no atomics), pass 2 applies.  No host sync anywhere.
- Forward saves v, g and the norms (fp32; fp64 for fp64), so backward never re-reduces v^2.
  Backward: grad_g = sum(gw*v)/||v||, grad_v = g/||v|| * (gw - v*sum(gw*v)/||v||^2).
- Eager calls go through a torch.autograd.Function (cheap on the host); under torch.compile the
  same launchers run as torch.library custom ops (``tkern::weight_norm``,
  ``tkern::weight_norm_backward``) with fake implementations, so compile traces through them.
  Under create_graph=True (double backward) the gradients come from torch ops instead, which
  autograd can differentiate.
- Semantics follow ``torch._weight_norm``: dim=-1 (and None) is the whole-tensor norm, as in
  torch (``norm_except_dim`` treats -1 specially); other negative dims wrap.  A zero-norm slice
  divides by zero exactly as torch does (NaN outputs and gradients for that slice).  The output
  dtype is ``torch.result_type(v, g)``, the dtype of torch's ``v * (g / norm)``.
- Precision: the norm is always accumulated in fp32 (fp64 for fp64) and saved unrounded.  The
  per-slice scale g / norm is rounded exactly where torch rounds it (``_scale_rounding``), so fp16
  and bf16 outputs equal torch's and a weight split by ``right_inverse`` comes back unchanged.
"""

from __future__ import annotations

import functools
import operator
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .. import _runtime as rt
from .._launch import jit
from ._math import cast_rn, div_rn, sqrt_rn
from ._op import Op

# Launch rule (module constants so tests can shrink them to exercise every path on tiny tensors).
TILE = 4096  # elements per program per loop step
ONE_PASS_MAX = 8192  # a slice block up to this many elements is held in registers (single pass)
COLS_BLOCK_D = 32  # adjacent columns per program for the last-dim layout (128 B of fp32)
SPLIT_BELOW = 256  # fewer slice programs than this (~2 per H100 SM): split the reduction
SPLIT_TARGET = 1024  # about this many programs after splitting

ROWS, COLS, GENERAL = 0, 1, 2


@jit
def _weight_norm_kernel(
    V,  # v, contiguous, viewed [outer, D, inner]
    GW,  # backward: gradient of w, v's layout; forward: unused (V passed)
    G,  # g, D elements (flat)
    NORM,  # (D,) fp32/fp64 norms: written by fused forward, read otherwise
    DOT,  # (D,) fp32/fp64 sum(gw*v): read by split backward pass 2
    PART,  # (split, D) partial sums written by a reduce-only pass
    OUT,  # forward: w; backward: grad_v; v's layout
    GG,  # (D,) grad_g, written by fused backward
    D, R, inner,  # slices, elements per slice, product of the dims after `dim`
    chunk,  # elements of R per program along grid axis 1 (R when not split)
    BACKWARD: tl.constexpr,  # False: forward, True: backward
    REDUCE: tl.constexpr,  # compute the per-slice sum (v*v or gw*v) over this program's chunk
    APPLY: tl.constexpr,  # write OUT (and, fused backward, GG)
    ONE_PASS: tl.constexpr,  # the chunk fits one BLOCK_R: load once
    LAYOUT: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    COMPUTE: tl.constexpr,  # fp32, or fp64 when any input is fp64
    INT64: tl.constexpr,  # int64 offsets (tensors near 2^31 elements)
    # forward only, torch's dtype rule for its composite path (see _scale_rounding): round the
    # norm to NORM_TY, then g / norm to RATIO_TY.  MODE 0: no rounding, 1: round (cast_rn).
    NORM_TY: tl.constexpr, NORM_MODE: tl.constexpr,
    RATIO_TY: tl.constexpr, RATIO_MODE: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_r = tl.program_id(1)
    if INT64:
        pid_d = pid_d.to(tl.int64)
        pid_r = pid_r.to(tl.int64)
    d1 = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask1 = d1 < D
    d = d1[:, None]
    dmask = dmask1[:, None]
    if LAYOUT == 0:  # ROWS: slice d is the contiguous row d
        d_part = d * R
    elif LAYOUT == 1:  # COLS: slice d is column d of an [R, D] matrix
        d_part = d
    else:  # GENERAL: element (o, d, i) with r = o * inner + i
        d_part = d * inner
    r_start = pid_r * chunk
    r_end = tl.minimum(r_start + chunk, R)
    lanes = tl.arange(0, BLOCK_R)
    if INT64:
        lanes = lanes.to(tl.int64)

    # ---- reduction over this program's part of each slice
    if REDUCE:
        if ONE_PASS:
            r = (r_start + lanes)[None, :]
            mask = dmask & (r < r_end)
            # element offset = d_part (slice) + a term in r, per layout (written out in each loop
            # body: a nested jit helper costs a Python patch per call in the interpreter)
            if LAYOUT == 0:
                offs = d_part + r
            elif LAYOUT == 1:
                offs = d_part + r * D
            else:
                offs = d_part + (r // inner) * (D * inner) + r % inner
            x = tl.load(V + offs, mask=mask, other=0.0).to(COMPUTE)
            if BACKWARD:
                y = tl.load(GW + offs, mask=mask, other=0.0).to(COMPUTE)
                total = tl.sum(x * y, axis=1)
            else:
                total = tl.sum(x * x, axis=1)
        else:
            acc = tl.zeros([BLOCK_D, BLOCK_R], dtype=COMPUTE)
            for start in range(r_start, r_end, BLOCK_R):
                r = (start + lanes)[None, :]
                mask = dmask & (r < r_end)
                if LAYOUT == 0:
                    offs = d_part + r
                elif LAYOUT == 1:
                    offs = d_part + r * D
                else:
                    offs = d_part + (r // inner) * (D * inner) + r % inner
                x = tl.load(V + offs, mask=mask, other=0.0).to(COMPUTE)
                if BACKWARD:
                    acc += x * tl.load(GW + offs, mask=mask, other=0.0).to(COMPUTE)
                else:
                    acc += x * x
            total = tl.sum(acc, axis=1)
        if not APPLY:  # split pass 1: partial sums only
            tl.store(PART + pid_r * D + d1, total.to(PART.dtype.element_ty), mask=dmask1)

    # ---- per-slice coefficients, then the elementwise write
    if APPLY:
        g = tl.load(G + d1, mask=dmask1, other=0.0).to(COMPUTE)
        if BACKWARD:
            norm = tl.load(NORM + d1, mask=dmask1, other=1.0).to(COMPUTE)
            if REDUCE:
                dot = total
                tl.store(GG + d1, cast_rn(div_rn(dot, norm), GG.dtype.element_ty), mask=dmask1)
            else:
                dot = tl.load(DOT + d1, mask=dmask1, other=0.0).to(COMPUTE)
            a = div_rn(g, norm)[:, None]
            c = div_rn(dot, norm * norm)[:, None]
        else:
            if REDUCE:
                norm = sqrt_rn(total)  # correctly rounded, as torch's norm
                tl.store(NORM + d1, norm.to(NORM.dtype.element_ty), mask=dmask1)
                norm = tl.where(dmask1, norm, 1.0)  # lanes past D: no 0/0 (masked anyway)
            else:
                norm = tl.load(NORM + d1, mask=dmask1, other=1.0).to(COMPUTE)
            if NORM_MODE != 0:
                norm = cast_rn(norm, NORM_TY).to(COMPUTE)
            a = div_rn(g, norm)  # as torch: v * (g / norm); zero norm -> inf/NaN like torch
            if RATIO_MODE != 0:
                a = cast_rn(a, RATIO_TY).to(COMPUTE)
            a = a[:, None]
            c = a  # unused

        if ONE_PASS and REDUCE:
            if BACKWARD:
                out = a * (y - x * c)
            else:
                out = x * a
            tl.store(OUT + offs, cast_rn(out, OUT.dtype.element_ty), mask=mask)
        else:
            for start in range(r_start, r_end, BLOCK_R):
                r = (start + lanes)[None, :]
                mask = dmask & (r < r_end)
                if LAYOUT == 0:
                    offs = d_part + r
                elif LAYOUT == 1:
                    offs = d_part + r * D
                else:
                    offs = d_part + (r // inner) * (D * inner) + r % inner
                x = tl.load(V + offs, mask=mask, other=0.0).to(COMPUTE)
                if BACKWARD:
                    y = tl.load(GW + offs, mask=mask, other=0.0).to(COMPUTE)
                    out = a * (y - x * c)
                else:
                    out = x * a
                tl.store(OUT + offs, cast_rn(out, OUT.dtype.element_ty), mask=mask)


# Host helpers in plain integer arithmetic (triton.cdiv is a jit function, slow to call),
# so that the launch path costs little next to a ~20 us kernel.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def _plan(outer: int, D: int, inner: int) -> dict:
    """Block sizes, layout and split for a contiguous ``[outer, D, inner]`` tensor."""
    return _plan_cached(outer, D, inner, TILE, ONE_PASS_MAX, COLS_BLOCK_D, SPLIT_BELOW,
                        SPLIT_TARGET)


@functools.lru_cache(maxsize=256)
def _plan_cached(outer, D, inner, TILE, ONE_PASS_MAX, COLS_BLOCK_D, SPLIT_BELOW, SPLIT_TARGET):
    R = outer * inner
    if outer == 1:
        layout = ROWS
    elif inner == 1:
        layout = COLS
    else:
        layout = GENERAL
    r_pow = _next_pow2(R)
    if layout == COLS:
        block_d = min(_next_pow2(D), COLS_BLOCK_D)
    else:  # short rows share a program so that a tile still holds ~TILE elements
        block_d = min(_next_pow2(D), max(1, TILE // r_pow))
    if r_pow * block_d <= ONE_PASS_MAX:
        block_r, one_pass = r_pow, True
    else:
        block_r, one_pass = max(1, TILE // block_d), False
    n_d = _cdiv(D, block_d)
    split, chunk = 1, R
    if not one_pass and n_d < SPLIT_BELOW:
        steps = _cdiv(R, block_r)
        want = min(steps, _cdiv(SPLIT_TARGET, n_d))
        chunk = _cdiv(steps, want) * block_r
        split = _cdiv(R, chunk)
    return dict(layout=layout, block_d=block_d, block_r=block_r, one_pass=one_pass, n_d=n_d,
                split=split, chunk=chunk, R=R)


def _needs_int64(v, plan, D, inner):
    """int64 offsets when an offset can pass 2^31, masked lanes of a last block included: they
    run past the end by up to BLOCK_D slices and BLOCK_R slice elements, in the layout's strides."""
    block_d, block_r, R = plan["block_d"], plan["block_r"], plan["R"]
    if plan["layout"] == ROWS:
        over = block_d * R + block_r
    elif plan["layout"] == COLS:
        over = block_r * D + block_d
    else:  # an r past R lands up to BLOCK_R // inner + 1 outer steps of D * inner further
        over = (block_r // inner + 1) * D * inner + block_d * inner
    return rt.needs_int64(v, margin=over + (1 << 20))


def _launch(plan, v, gw, g, norm, dot, part, out, gg, D, inner, *, backward, reduce, apply,
            compute, int64, rounding=None):
    one_pass = plan["one_pass"] and plan["split"] == 1
    grid = (plan["n_d"], plan["split"])
    block = plan["block_d"] * plan["block_r"]
    _weight_norm_kernel[grid](
        v, gw, g, norm, dot, part, out, gg, D, plan["R"], inner, plan["chunk"],
        BACKWARD=backward, REDUCE=reduce, APPLY=apply, ONE_PASS=one_pass, LAYOUT=plan["layout"],
        BLOCK_D=plan["block_d"], BLOCK_R=plan["block_r"], COMPUTE=compute, INT64=int64,
        num_warps=rt.num_warps_for(block),
        **(rounding or dict(NORM_TY=compute, NORM_MODE=0, RATIO_TY=compute, RATIO_MODE=0)),
    )


_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
       torch.float64: tl.float64}


def _scale_rounding(v, g, dim, compute_torch):
    """Where the forward rounds its per-slice scale, so that outputs equal torch's.

    torch's fused kernels (v and g of one dtype, not fp16, dim 0 or the last) compute the norm
    and g / norm in fp32 and round w once: no rounding here.  Everywhere else torch computes
    ``v * (g / norm_except_dim(v))`` in the tensors' dtypes: the norm rounded to v's dtype and the
    ratio to promote(g, v).  Following that keeps tkern equal to torch, and a weight split by
    ``right_inverse`` (g = its rounded norm) comes back unchanged (g / norm == 1 exactly).
    The norm itself is still accumulated in fp32 (fp64) and saved unrounded for backward."""
    fused = (v.dtype == g.dtype and v.dtype != torch.float16 and dim is not None
             and dim in (0, v.dim() - 1))
    size = compute_torch.itemsize

    def mode(dtype):
        return 0 if fused or dtype.itemsize >= size else 1

    ratio = torch.promote_types(g.dtype, v.dtype)
    return dict(NORM_TY=_TL[v.dtype], NORM_MODE=mode(v.dtype), RATIO_TY=_TL[ratio],
                RATIO_MODE=mode(ratio))


def _geometry(shape, dim):
    """(outer, D, inner) for slices along ``dim`` (None: the whole tensor as one slice)."""
    if dim is None:
        n = 1
        for s in shape:
            n *= s
        return 1, 1, n
    outer = inner = 1
    for s in shape[:dim]:
        outer *= s
    for s in shape[dim + 1:]:
        inner *= s
    return outer, shape[dim], inner


def _forward(v, g, dim, out_dtype):
    outer, D, inner = _geometry(v.shape, dim)
    plan = _plan(outer, D, inner)
    stat = rt.accum_dtype(torch.float64 if torch.float64 in (v.dtype, g.dtype) else v.dtype)
    compute = tl.float64 if stat == torch.float64 else tl.float32
    int64 = _needs_int64(v, plan, D, inner)
    rounding = _scale_rounding(v, g, dim, stat)
    w = torch.empty(v.shape, dtype=out_dtype, device=v.device)
    norm = torch.empty(D, dtype=stat, device=v.device)
    if plan["split"] == 1:
        _launch(plan, v, v, g, norm, norm, norm, w, norm, D, inner, backward=False, reduce=True,
                apply=True, compute=compute, int64=int64, rounding=rounding)
    else:
        part = torch.empty(plan["split"], D, dtype=stat, device=v.device)
        _launch(plan, v, v, g, norm, norm, part, w, norm, D, inner, backward=False, reduce=True,
                apply=False, compute=compute, int64=int64)
        torch.sqrt(part.sum(0), out=norm)
        _launch(plan, v, v, g, norm, norm, part, w, norm, D, inner, backward=False, reduce=False,
                apply=True, compute=compute, int64=int64, rounding=rounding)
    return w, norm


def _backward(gw, v, g, norm, dim):
    outer, D, inner = _geometry(v.shape, dim)
    plan = _plan(outer, D, inner)
    stat = norm.dtype
    compute = tl.float64 if stat == torch.float64 or gw.dtype == torch.float64 else tl.float32
    int64 = _needs_int64(v, plan, D, inner)
    gw = gw.contiguous()  # walked in v's (contiguous) layout; expanded grads get materialised
    grad_v = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if plan["split"] == 1:
        grad_g = torch.empty(D, dtype=g.dtype, device=v.device)
        _launch(plan, v, gw, g, norm, norm, norm, grad_v, grad_g, D, inner, backward=True,
                reduce=True, apply=True, compute=compute, int64=int64)
    else:
        part = torch.empty(plan["split"], D, dtype=stat, device=v.device)
        _launch(plan, v, gw, g, norm, norm, part, grad_v, norm, D, inner, backward=True,
                reduce=True, apply=False, compute=compute, int64=int64)
        dot = part.sum(0)
        grad_g = (dot / norm).to(g.dtype)
        _launch(plan, v, gw, g, norm, dot, part, grad_v, norm, D, inner, backward=True,
                reduce=False, apply=True, compute=compute, int64=int64)
    return grad_v, grad_g


class WeightNormConfig(NamedTuple):
    dim: Optional[int]  # the dim that keeps one norm per index; None: the whole tensor


def _forward_op_impl(v, g, cfg):
    # parameters are contiguous; anything else is copied once.  g is read flat, unit stride.
    return _forward(v.contiguous(), g.reshape(-1).contiguous(), cfg.dim, torch.result_type(v, g))


def _stat_dtype(v, g):
    return rt.accum_dtype(torch.float64 if torch.float64 in (v.dtype, g.dtype) else v.dtype)


def _forward_fake(v, g, cfg):
    D = 1 if cfg.dim is None else v.shape[cfg.dim]
    return (v.new_empty(v.shape, dtype=torch.result_type(v, g)),
            v.new_empty((D,), dtype=_stat_dtype(v, g)))


def _backward_op_impl(douts, saved, cfg, needs):
    """From v, g and the fp32 norms forward saved: no re-reduction of v^2."""
    (gw,), (v, g, norm) = douts, saved
    grad_v, grad_g = _backward(gw, v.contiguous(), g.reshape(-1).contiguous(), norm, cfg.dim)
    return grad_v, grad_g.reshape(g.shape)


def _backward_fake(douts, saved, cfg, needs):
    v, g, _ = saved
    return v.new_empty(v.shape), g.new_empty(g.shape)


def _composite(saved, cfg):
    """w from torch ops (``v * (g / ||v||)`` in fp32/fp64), for double backward."""
    v, g, _ = saved
    outer, D, inner = _geometry(v.shape, cfg.dim)
    ct = torch.float64 if torch.float64 in (v.dtype, g.dtype) else torch.float32
    v3 = v.reshape(outer, D, inner).to(ct)
    norm = v3.square().sum((0, 2), keepdim=True).sqrt()
    w = v3 * (g.reshape(1, D, 1).to(ct) / norm)
    return w.reshape(v.shape).to(torch.result_type(v, g))


# The declaration: eager autograd, torch.library ops (tkern::weight_norm and
# tkern::weight_norm_backward) for torch.compile, and double backward, built by _op.Op.  The
# norms are an output autograd saves and never differentiates.
OP = Op("tkern::weight_norm", inputs=("v", "g"), outputs=("w", "norm"), aux=("norm",),
        config=WeightNormConfig, forward=_forward_op_impl, fake=_forward_fake,
        saves=("v", "g", "norm"), grads=("v", "g"), backward=_backward_op_impl,
        backward_fake=_backward_fake, composite=_composite)


class _DtypeNotImplemented(rt.DtypeError, NotImplementedError):
    """torch raises NotImplementedError (dim 0 / last) or RuntimeError (other dims) for an integer
    v; this is both (and TypeError, as every tkern dtype error)."""


def _normalize_dim(dim, ndim: int):
    """torch's rule: None and -1 are the whole tensor (returned as None); other dims wrap."""
    if ndim == 0:
        raise IndexError(
            f"tkern.weight_norm: dimension specified as {dim} but tensor has no dimensions")
    if dim is None:
        return None
    if isinstance(dim, bool):
        raise TypeError("tkern.weight_norm: dim must be an int or None, got bool")
    try:
        dim = operator.index(dim)  # ints, numpy ints, 0-dim integer tensors
    except TypeError:
        raise TypeError(
            f"tkern.weight_norm: dim must be an int or None, got {type(dim).__name__}") from None
    if dim == -1:
        return None
    if not -ndim <= dim < ndim:
        raise IndexError(
            f"tkern.weight_norm: Dimension out of range (expected to be in range of "
            f"[{-ndim}, {ndim - 1}], but got {dim})"
        )
    return dim % ndim


def _eager(v, g, dim, out_dtype):
    """The CPU fallback (and empty tensors): torch's own op, with g read flat like the kernels."""
    canon = [v.shape[i] if i == dim else 1 for i in range(v.dim())]  # dim None: all ones
    torch_dim = -1 if dim is None else dim
    if v.dtype == g.dtype:
        return torch._weight_norm(v, g.reshape(canon), torch_dim)
    # torch's fused CPU kernel rejects mixed dtypes: its composite formula, as for other dims
    g = g if g.dim() == 0 else g.reshape(canon)
    return (v * (g / torch.norm_except_dim(v, 2, torch_dim))).to(out_dtype)


def weight_norm(v: torch.Tensor, g: torch.Tensor, dim: int | None = 0) -> torch.Tensor:
    """``w = g * v / ||v||`` with the norm over every dim of ``v`` except ``dim``, as
    ``torch._weight_norm(v, g, dim)``.

    Args:
        v: the direction, any floating dtype and shape with at least one dimension.
        g: the magnitude, ``v.shape[dim]`` elements (the shape ``torch.norm_except_dim(v, 2, dim)``
            gives: size ``v.shape[dim]`` at ``dim``, 1 elsewhere; any shape with that many elements
            is read flat); one element for the whole-tensor norm.
        dim: the dim that keeps one norm per index.  Negative dims wrap, except that ``-1`` and
            ``None`` mean one norm over the whole tensor, exactly as in PyTorch.

    Returns ``w`` of ``v``'s shape and dtype ``torch.result_type(v, g)``.  Norms are accumulated
    in fp32 (fp64 for fp64).  A slice whose norm is zero gives NaN, as in PyTorch.
    """
    if not v.is_floating_point():
        raise _DtypeNotImplemented(
            f"tkern.weight_norm: v must be a floating-point tensor, got {v.dtype}")
    if g.is_complex():
        raise _DtypeNotImplemented(f"tkern.weight_norm: g must be a real tensor, got {g.dtype}")
    nd = _normalize_dim(dim, v.dim())
    n_slices = 1 if nd is None else v.shape[nd]
    if g.numel() != n_slices:
        raise RuntimeError(
            f"tkern.weight_norm: g must have {n_slices} element(s) (v.shape[{dim}] for v of shape "
            f"{tuple(v.shape)}), got shape {tuple(g.shape)}"
        )
    if not rt.use_triton("weight_norm", v, g) or v.numel() == 0:
        return _eager(v, g, nd, torch.result_type(v, g))
    return OP.apply(v, g, cfg=WeightNormConfig(nd))[0]
