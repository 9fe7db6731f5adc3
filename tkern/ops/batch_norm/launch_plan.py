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
# Elementwise launches (normalize, dx) aim at this many programs per SM: each program loops over
# a few tiles, so its preamble (merging the partials, loading parameters) is paid once for them.
ELEMENTWISE_PROGRAMS_PER_SM = 16
REDUCTION_PROGRAMS_PER_SM = 4
# On a GPU, each program takes at least this many tiles (reduction, elementwise) where the layer
# has them: a reduction's epilogue (cross-lane sums, partial stores) and an elementwise program's
# preamble (merging the partials) are paid once for them, and there are fewer partials to merge.
MIN_UNITS = (6, 2)
# Channel-major samples (NCHW) with at most this many positions per channel take FLAT tiles: a
# program owns CPP whole channels, whose CPP * S positions are contiguous in every sample, and
# walks the samples FLAT_ROWS at a time with 16-byte accesses (a tile long in S would leave S = 49
# or 196 in a 64- or 256-lane row, each position a 2-byte load).
FLAT_MAX_S = 1024
# Positions per FLAT tile row: the power of two among these that CPP * S fills best.
FLAT_POSITIONS = (2048, 4096)
# A FLAT tile holds this many bytes of x (rows of samples x positions).
FLAT_TILE_BYTES = 16384
# Bytes of a tile per thread: four 16-byte loads per tensor read, issued together, so that one
# or two CTAs per SM keep ~25 KB in flight (Little's law at copy bandwidth on an H200).  FLAT
# tiles the same (32 predicted worse by perf.static_cost: the per-position epilogue then costs
# more threads' issue slots).
THREAD_BYTES = 64
FLAT_THREAD_BYTES = 64
# An elementwise program that first merges its channels' P partials (merge-normalize) re-reads
# them from L2 (16 bytes per partial and channel), every program: programs of 2 units over 98
# partials (ResNet-50 layer2, channels_last, batch 32) read 28x as many partial bytes as x bytes
# (708 MB against 26 MB), and issued ~21 SASS per byte.  On a GPU such a program takes units
# until its x bytes reach MERGE_X_PER_PARTIAL_BYTE times the partial bytes it reads, but keeps
# MERGING_PROGRAMS_PER_SM programs per SM where the layer has the units (one wave, 4 CTAs an SM).
# The split backward's dx programs, which total the P partial sums the same way, take such a
# plan too, for their smaller partials.
MERGE_X_PER_PARTIAL_BYTE = 1
MERGING_PROGRAMS_PER_SM = 4
PARTIAL_BYTES = 16  # count, mean hi and lo, M2: fp32 each
DX_PARTIAL_BYTES = 8  # sum g, sum g * xhat: fp32 each
# On a GPU, a channel-major layer whose channels hold at most this many bytes each program takes
# the one-launch path (statistics, then normalize re-reading its channels from L2) with one
# program per CPP channels: with ~4 resident programs per SM, ~34 MB in flight fits H100/H200's
# 50 MB L2.  CPP is chosen so that the channel blocks still cover ~every SM (0.9 a SM).
FUSED_PROGRAM_BYTES = 65536


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


class _FlatView:
    """An NCHW-like x as the FLAT kernels address it: the tile rows are samples (stride sN), the
    columns the C * S positions of a sample (unit stride; see kernels._lanes)."""

    def __init__(self, x: torch.Tensor, view: _View):
        self.N, self.C, self.S = view.N, view.C, view.S
        self.merged = False
        self.rows, self.cols = 1, view.N
        self.x_stride = view.x_stride
        self.x_int64 = view.x_int64
        self.x_view_strides = self._strides(x)

    int64 = _View.int64

    def strides(self, t: torch.Tensor):
        if t.stride() == self.x_stride:
            return self.x_view_strides
        return self._strides(t)

    def _strides(self, t: torch.Tensor):
        st = _ncs_strides(t) if t.dim() > 2 else None
        if st is None or st[2] != 1 or (self.C > 1 and st[1] != self.S):
            return None
        return 0, 1, st[0]


def _channel_major(x: torch.Tensor, view: _View) -> bool:
    """Whether each sample of x holds its channels one after another, each S contiguous."""
    st = _ncs_strides(x) if x.dim() > 2 else None
    return st is not None and st[2] == 1 and (view.C == 1 or st[1] == view.S)


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
    if t.shape != x.shape:
        raise RuntimeError(f"tkern.batch_norm: the gradient has shape {tuple(t.shape)}, the "
                           f"input {tuple(x.shape)}")
    if view.strides(t) is not None:
        return t
    return torch.empty_like(x).copy_(t)


def _target_programs(device: torch.device, reduction: bool) -> int:
    """Programs to aim for: a few waves on a GPU (or under ``rt.plan_as_gpu``); a handful in the
    interpreter, where each program costs numpy calls."""
    if not rt.plans_for_gpu(device):  # the interpreter: each program costs Python per op
        return 4 if reduction else 1
    return (REDUCTION_PROGRAMS_PER_SM if reduction else ELEMENTWISE_PROGRAMS_PER_SM) * rt.sm_count(device)


class Plan(NamedTuple):
    """How one input is cut into programs (see the package docstring: tiles, units, splits)."""
    view: object  # _View, or _FlatView under flat
    BLOCK_S: int  # tile: spatial positions x channels (flat: samples x positions)
    BLOCK_C: int
    nsb: int  # S-blocks per sample (row of the view)
    n_units: int  # units in all: rows x nsb
    units_per_prog: int
    grid: tuple  # (channel blocks, splits)
    num_partials: int  # splits per channel: rows of the statistics workspace
    num_warps: int
    flat: bool = False  # FLAT tiles: cpp whole channels a program, samples as tile rows
    cpp: int = 1  # channels per program under flat


def plan(x: torch.Tensor, reduction: bool = True, merging: int = 0) -> Plan:
    """Tile shape and grid for ``x`` ([N, C, *spatial], already prepared).  Cached per shape,
    strides, element size and device: host time matters for small layers.  ``merging``: the
    bytes per partial and channel that every program of an elementwise launch first reads
    (``_merge_normalize_kernel``: PARTIAL_BYTES; the split backward's dx: DX_PARTIAL_BYTES):
    more units a program on a GPU (MERGE_X_PER_PARTIAL_BYTE)."""
    target = _target_programs(x.device, reduction)
    sms = rt.sm_count(x.device) if rt.plans_for_gpu(x.device) else 0
    return _PLANS((x.shape, x.stride(), x.element_size(), target, reduction, sms, merging), x,
                  target, reduction, sms, merging)


def _flat_columns(C: int, S: int, elem: int):
    """(channels per program, positions per tile row) of a FLAT tile: the power-of-two row that
    CPP * S fills best, CPP * S a multiple of 16 bytes where S allows (aligned vector accesses)."""
    if C * S <= FLAT_POSITIONS[0]:
        return C, next_pow2(C * S)
    vec = max(1, 16 // elem)
    best = None
    for width in FLAT_POSITIONS:
        cpp = min(C, width // S)
        aligned = cpp
        while aligned > 1 and (aligned * S) % vec:
            aligned -= 1
        if (aligned * S) % vec == 0 and aligned * S * 8 >= cpp * S * 7:  # keep 7/8 of the fill
            cpp = aligned
        fill = cpp * S / width
        if best is None or fill > best[0] + 0.02:
            best = (fill, cpp, width)
    return best[1], best[2]


def _make_plan(x: torch.Tensor, target: int, reduction: bool, sms: int,
               merging: int = 0) -> Plan:
    if merging:
        return _merging_plan(x, target, sms, merging)
    view = _View(x)
    C, cols = view.C, view.cols
    if 1 < view.S <= FLAT_MAX_S and _channel_major(x, view):
        return _flat_plan(x, view, target, reduction, sms)
    sN, sC, sS = view.strides(x)
    tile = max(16, TILE_BYTES // x.element_size())
    narrow = None
    if sS == 1 and cols > 1 and sC != 1:  # spatial axis contiguous (NCHW): long in S
        block_s = _spatial_block(cols, tile)
        block_c = min(next_pow2(max(C, 1)), max(1, tile // block_s))
    else:  # channels contiguous (channels_last, (N, C)): wide in C
        block_c = min(next_pow2(max(C, 1)), CL_BLOCK_C)
        narrow = _fused_channel_block(C, cols, x.element_size(), sms) if reduction else None
        if narrow is not None:
            block_c = narrow
        # half a tile: 4 warps, up to 4 CTAs per SM (a whole one left the backward reduce with
        # an activation at 178 registers, 1 CTA and 16 KB in flight per SM, predicted)
        block_s = min(next_pow2(max(cols, 1)), max(1, tile // 2 // block_c))
    nsb = cdiv(cols, block_s)
    n_units = view.rows * nsb
    c_blocks = cdiv(C, block_c)
    return _split(view, block_s, block_c, nsb, n_units, c_blocks, target, reduction,
                  one_program=narrow is not None,
                  num_warps=_warps(block_s * block_c * x.element_size()), gpu=sms > 0)


def _merging_plan(x: torch.Tensor, target: int, sms: int, partial_bytes: int) -> Plan:
    """The elementwise plan, with more units a program on a GPU (MERGE_X_PER_PARTIAL_BYTE,
    MERGING_PROGRAMS_PER_SM)."""
    p = _make_plan(x, target, False, sms)
    if not sms:
        return p
    partials = _make_plan(x, _target_programs(x.device, True), True, sms).num_partials
    channels = p.cpp if p.flat else p.BLOCK_C
    unit_bytes = p.BLOCK_S * p.BLOCK_C * x.element_size()  # (under flat: samples x positions)
    by_bytes = cdiv(MERGE_X_PER_PARTIAL_BYTE * partials * channels * partial_bytes, unit_bytes)
    one_wave = cdiv(p.n_units, cdiv(MERGING_PROGRAMS_PER_SM * sms, p.grid[0]))
    units = min(max(p.units_per_prog, min(by_bytes, one_wave)), p.n_units)
    splits = cdiv(p.n_units, units)
    return p._replace(units_per_prog=units, grid=(p.grid[0], splits), num_partials=splits)


def _fused_channel_block(C: int, cols: int, elem: int, sms: int):
    """The channel block of a one-launch plan for channels-contiguous x on a GPU (None: split):
    the widest power of two with rows of at least a 32-byte sector, at most
    FUSED_PROGRAM_BYTES a program, and channel blocks for ~every SM (layer4 at batch 32:
    16 bf16 channels x 1568 rows, 128 programs)."""
    if not sms:
        return None
    block = CL_BLOCK_C
    while block * elem >= 32:
        if cols * block * elem <= FUSED_PROGRAM_BYTES and cdiv(C, block) * 10 >= sms * 9:
            return block
        block //= 2
    return None


def _warps(tile_bytes: int, per_thread: int = THREAD_BYTES) -> int:
    """Warps for a tile: ``per_thread`` bytes of it per thread."""
    return max(1, min(16, tile_bytes // (32 * per_thread)))


def _spatial_block(cols: int, tile: int) -> int:
    """The longest power-of-two S-block (at most ``tile``) whose blocks cover ``cols`` with at
    most 1/16 of their lanes idle (12544 = 49 x 256: 1024, not 8192 with a 53%-full second)."""
    block = min(next_pow2(cols), tile)
    while block > 16 and cdiv(cols, block) * block * 16 > cols * 17:
        block //= 2
    return block


def _split(view, block_s, block_c, nsb, n_units, c_blocks, target, reduction, flat=False,
           cpp=1, one_program=False, num_warps=None, gpu=False) -> Plan:
    splits = max(1, min(n_units, cdiv(target, c_blocks), 65535))
    if gpu:
        splits = max(1, min(splits, n_units // MIN_UNITS[0 if reduction else 1]))
    if reduction and (one_program or n_units <= FUSED_MAX_UNITS):
        splits = 1
    units_per_prog = max(1, cdiv(n_units, splits))
    if reduction and units_per_prog > 2 and units_per_prog % 2:
        units_per_prog += 1  # the reduction loops take tiles in pairs: no half-empty last trip
    splits = cdiv(n_units, units_per_prog)
    return Plan(view, block_s, block_c, nsb, n_units, units_per_prog, (c_blocks, splits), splits,
                num_warps or num_warps_for(block_s * block_c), flat, cpp)


def _fused_channels(C: int, N: int, S: int, elem: int, sms: int):
    """Channels per program of the one-launch FLAT plan (None when a channel is too big): at most
    FUSED_PROGRAM_BYTES a program and C / (0.9 sms) channels (blocks for ~every SM); among
    those, the count whose positions fill their power-of-two row best with 16-byte aligned rows
    (ties: more channels)."""
    top = min(C, FUSED_PROGRAM_BYTES // (N * S * elem), max(1, C * 10 // (sms * 9)))
    vec = max(1, 16 // elem)
    best = None
    for cpp in range(top, 0, -1):
        if (cpp * S) % vec and cpp != C:
            continue
        fill = cpp * S / next_pow2(cpp * S)
        if best is None or fill > best[0] + 1e-9:
            best = (fill, cpp)
    return best[1] if best else None


def _flat_plan(x: torch.Tensor, view: _View, target: int, reduction: bool, sms: int) -> Plan:
    C, N, S = view.C, view.N, view.S
    elem = x.element_size()
    cpp = _fused_channels(C, N, S, elem, sms) if reduction and sms else None
    one_program = cpp is not None
    if one_program:
        width = next_pow2(cpp * S)
    else:
        cpp, width = _flat_columns(C, S, elem)
    rows = max(1, min(next_pow2(N), FLAT_TILE_BYTES // elem // width))
    if not sms:  # the interpreter: units of two samples, so small tests still split and pair
        rows = min(rows, 2)
    nsb = cdiv(N, rows)
    warps = _warps(rows * width * elem, FLAT_THREAD_BYTES)
    return _split(_FlatView(x, view), rows, width, nsb, nsb, cdiv(C, cpp), target, reduction,
                  True, cpp, one_program, warps, gpu=sms > 0)


_PLANS = PlanCache(_make_plan)


def flat_args(p: Plan) -> dict:
    """The FLAT tiling's constexprs (none for the other plans: the kernels' defaults)."""
    if not p.flat:
        return {}
    S = p.view.S
    return dict(FLAT=True, FLAT_S=S, FLAT_S2=next_pow2(S), FLAT_C=next_pow2(p.cpp), CPP=p.cpp)


def launch_args(p: Plan) -> dict:
    """The plan's kernel arguments shared by every BatchNorm kernel."""
    return dict(nsb=p.nsb, n_units=p.n_units, units_per_prog=p.units_per_prog,
                BLOCK_S=p.BLOCK_S, BLOCK_C=p.BLOCK_C, num_warps=p.num_warps, **flat_args(p))
