"""BatchNorm's launch plan: how an input is viewed as ``[N, C, S]`` and cut into programs.

``plan(x, reduction)`` returns a ``Plan`` record (cached per shape and strides): tile shape,
units, grid and the number of partials per channel.  ``prepare_input`` copies only layouts whose
spatial dims cannot be addressed with one stride.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ... import _runtime as rt
from .._op import PlanCache, cdiv, next_pow2, num_warps_for

# Elements per tile: 16 KiB of fp32 per loop step keeps enough loads in flight to approach memory
# bandwidth, with few enough registers per thread.
TILE_BYTES = 16384
# Channel width of a tile when channels are the contiguous axis: 128 fp32 = 512 contiguous bytes.
CL_BLOCK_C = 128
# Reductions over at most this many units (tiles) per channel block run one program per channel
# block, each way in one launch (statistics + normalize; sums + dx).  An estimate, not yet timed:
# a second pass over two cached tiles should cost less than the split path's two extra launches.
FUSED_MAX_UNITS = 2


def _ncs_strides(t: torch.Tensor):
    """(sN, sC, sS) of ``t`` seen as [N, C, S], or None when its spatial dims cannot be flattened
    into one stride (then the caller copies)."""
    if t.dim() == 2:
        return t.stride(0), t.stride(1), 1
    dims = [(n, st) for n, st in zip(t.shape[2:], t.stride()[2:]) if n != 1]
    if not dims:
        return t.stride(0), t.stride(1), 1
    for (n0, s0), (n1, s1) in zip(dims, dims[1:]):
        if s0 != s1 * n1:
            return None
    return t.stride(0), t.stride(1), dims[-1][1]


class _View:
    """How the kernels address one input: sizes, merged-or-not, and a tensor's strides."""

    def __init__(self, x: torch.Tensor):
        self.N, self.C = x.shape[0], x.shape[1]
        self.S = 1
        for n in x.shape[2:]:
            self.S *= n
        sN, _, sS = _ncs_strides(x)
        # batch and spatial merge when sample n + 1 starts where sample n ends in S order
        self.merged = self.N == 1 or self.S == 1 or sN == self.S * sS
        self.rows, self.cols = (1, self.N * self.S) if self.merged else (self.N, self.S)
        self.x_stride = x.stride()
        self.x_view_strides = self._strides(x)
        self.x_int64 = rt.needs_int64(x)

    def int64(self, *tensors: torch.Tensor) -> bool:
        """Whether offsets into x or ``tensors`` can pass 2^31."""
        return self.x_int64 or any(t.stride() != self.x_stride and rt.needs_int64(t)
                                   for t in tensors)

    def strides(self, t: torch.Tensor):
        if t.stride() == self.x_stride:  # y, dx (empty_like) and usually dy: x's layout
            return self.x_view_strides
        return self._strides(t)

    def _strides(self, t: torch.Tensor):
        st = _ncs_strides(t)
        if st is None:
            return None
        sN, sC, sS = st
        if not self.merged:
            return sN, sC, sS
        if self.S == 1:
            return 0, sC, sN
        if self.N == 1:
            return 0, sC, sS
        if sN != self.S * sS:
            return None
        return 0, sC, sS


def _prepare_input(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels can address it: dense with flattenable spatial dims, else a copy."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    if rt.is_dense(x) and _ncs_strides(x) is not None:
        return x
    if not rt.is_dense(x):
        x = torch.empty_like(x).copy_(x)  # dense, in the memory format torch suggests for x
        if _ncs_strides(x) is not None:
            return x
    return x.contiguous()


def _like(t: torch.Tensor, x: torch.Tensor, view: _View) -> torch.Tensor:
    """``t`` (e.g. the incoming gradient) in a layout ``view`` can address; copies if needed."""
    if view.strides(t) is not None:
        return t
    return torch.empty_like(x).copy_(t)


def _target_programs(device: torch.device, reduction: bool) -> int:
    """Programs to aim for: a few waves on a GPU (or under ``rt.plan_as_gpu``); a handful in the
    interpreter, where each program costs numpy calls."""
    if not rt.plans_for_gpu(device):  # the interpreter: each program costs Python per op
        return 4 if reduction else 1
    return (4 if reduction else 64) * rt.sm_count(device)


class Plan(NamedTuple):
    """How one input is cut into programs (see the package docstring: tiles, units, splits)."""
    view: _View
    BLOCK_S: int  # tile: spatial positions x channels
    BLOCK_C: int
    nsb: int  # S-blocks per sample (row of the view)
    n_units: int  # units in all: rows x nsb
    units_per_prog: int
    grid: tuple  # (channel blocks, splits)
    num_partials: int  # splits per channel: rows of the statistics workspace
    num_warps: int


def plan(x: torch.Tensor, reduction: bool = True) -> Plan:
    """Tile shape and grid for ``x`` ([N, C, *spatial], already prepared).  Cached per shape,
    strides, element size and device: host time matters for small layers."""
    target = _target_programs(x.device, reduction)
    return _PLANS((x.shape, x.stride(), x.element_size(), target, reduction), x, target,
                  reduction)


def _make_plan(x: torch.Tensor, target: int, reduction: bool) -> Plan:
    view = _View(x)
    C, cols = view.C, view.cols
    sN, sC, sS = view.strides(x)
    tile = max(16, TILE_BYTES // x.element_size())
    if sS == 1 and cols > 1 and sC != 1:  # spatial axis contiguous (NCHW): long in S
        block_s = min(next_pow2(cols), tile)
        block_c = min(next_pow2(max(C, 1)), max(1, tile // block_s))
    else:  # channels contiguous (channels_last, (N, C)): wide in C
        block_c = min(next_pow2(max(C, 1)), CL_BLOCK_C)
        block_s = min(next_pow2(max(cols, 1)), max(1, tile // block_c))
    nsb = cdiv(cols, block_s)
    n_units = view.rows * nsb
    c_blocks = cdiv(C, block_c)
    splits = max(1, min(n_units, cdiv(target, c_blocks), 65535))
    if reduction and n_units <= FUSED_MAX_UNITS:
        splits = 1
    units_per_prog = max(1, cdiv(n_units, splits))
    splits = cdiv(n_units, units_per_prog)
    return Plan(view, block_s, block_c, nsb, n_units, units_per_prog, (c_blocks, splits), splits,
                num_warps_for(block_s * block_c))


_PLANS = PlanCache(_make_plan)


def launch_args(p: Plan) -> dict:
    """The plan's kernel arguments shared by every BatchNorm kernel."""
    return dict(nsb=p.nsb, n_units=p.n_units, units_per_prog=p.units_per_prog,
                BLOCK_S=p.BLOCK_S, BLOCK_C=p.BLOCK_C, num_warps=p.num_warps)
