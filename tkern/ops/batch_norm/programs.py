"""BatchNorm's programs (``tkern/ops/_op.py``): a call signature's plans and launch sites, made
once, so that a repeated layer's call costs its allocations and its launches.

A program is made for inputs the kernels read in place: x dense and addressable
(``_prepare_input`` returns it), the residual in x's layout, weight, bias and running stats
contiguous ``[C]``.  Anything else (program None), and a backward whose dy is not laid out as
x, or which the program does not cover (no dx wanted), runs the launchers of
``launch.py``, which the programs share their sites with: the same kernels, the same arguments.
A program's sites are ``fixed_dtypes()`` ones (keyed by alignment only): its signature fixes the
dtype of everything it launches with, dy included (autograd hands it over in y's dtype).
"""

from __future__ import annotations

import torch

from ... import _runtime as rt
from ..._launch import all_aligned
from . import launch
from .launch_plan import DX_PARTIAL_BYTES, PARTIAL_BYTES, _prepare_input, plan


def make(inputs, cfg):
    """The program for ``inputs`` (BatchNorm's op inputs) and ``cfg``, or None."""
    x, weight, bias, running_mean, running_var, _, residual = inputs
    if x.numel() == 0 or _prepare_input(x) is not x:
        return None
    C = x.shape[1]
    for t in (weight, bias, running_mean, running_var):
        if t is not None and (t.shape != (C,) or not t.is_contiguous()):
            return None
    if residual is not None and residual.stride() != x.stride():
        return None
    return (_Train if cfg.training else _Eval)(inputs, cfg)


def _stat_flags(has_lo, from_var, weight, bias, eps):
    return launch._stat_flags(has_lo, from_var, weight is not None, bias is not None, eps)


class _Train:
    """Training: forward in one launch (one partial per channel) or two (partials, then merge
    and normalize); backward with dx wanted in one launch (one partial) or two (partial sums,
    then dx, which totals them)."""

    def __init__(self, inputs, cfg):
        x, weight, bias, running_mean, running_var, num_batches_tracked, residual = inputs
        self.act = (cfg.activation, cfg.negative_slope, cfg.alpha)
        self.x_stride, self.dtype = x.stride(), x.dtype
        self.C = C = x.shape[1]
        self.acc = rt.accum_dtype(x.dtype)
        self.update = running_mean is not None
        self.cumulative = self.update and cfg.momentum is None
        self.count = count = launch.counts_batch(self.update, cfg.momentum, num_batches_tracked)
        self.p = p = plan(x, reduction=True)
        self.P = P = p.num_partials
        has_w, has_b = weight is not None, bias is not None
        named, rflags, _ = launch._residual_site(residual)
        head = (self.update, self.cumulative)
        tail = (has_w, has_b, cfg.eps, cfg.momentum, *self.act, named, rflags)
        # allocation templates: empty_like of a tensor costs half of new_empty(shape, dtype=).
        # The statistics [3, C]; split, the forward's partials [4, P, C] follow them in the same
        # tensor, and backward's partial sums [2, P, C] take their place (it runs on the
        # forward's stream, after it): one allocation per call for both.
        self.stats_like = x.new_empty((3 if P == 1 else 3 + 4 * P, C), dtype=self.acc)
        self.c_like = self.stats_like[0]
        if P == 1:
            self.stats_site = None
            self.site = launch.fused_forward_site(p, x, x, *head, True, *tail, count,
                                                  rows=True).fixed_dtypes()
        else:
            self.stats_site = launch.partial_stats_site(p, x, rows=True).fixed_dtypes()
            merging = plan(x, reduction=False, merging=PARTIAL_BYTES)
            self.site = launch.merge_normalize_site(merging, x, x, P, *head, *tail, count,
                                                    rows=True).fixed_dtypes()
        self.backwards: dict = {}

    def forward(self, cfg, x, weight, bias, running_mean, running_var, num_batches_tracked,
                residual):
        stats = torch.empty_like(self.stats_like)  # mean, mean_lo, invstd (, partials): rows
        y = torch.empty_like(x)
        w = stats if weight is None else weight
        b = stats if bias is None else bias
        rm, rv = (running_mean, running_var) if self.update else (stats, stats)
        nbt = num_batches_tracked if self.cumulative or self.count else stats
        res = () if residual is None else (residual,)
        aligned = all_aligned(x, weight, bias, running_mean, running_var, num_batches_tracked,
                              residual)  # the caller's tensors (the others are fresh)
        site = self.site.aligned if aligned else self.site
        if self.stats_site is None:
            site(x, y, stats, stats, stats, w, b, rm, rv, nbt, *res)
        else:  # the partials in stats' rows after the statistics
            (self.stats_site.aligned if aligned else self.stats_site)(x, stats, stats, stats,
                                                                      stats)
            site(x, y, stats, stats, stats, stats, stats, stats, stats, w, b, rm, rv, nbt, *res)
        return y, stats

    def backward(self, douts, saved, cfg, needs):
        dy = douts[0]
        if dy.stride() != self.x_stride or dy.dtype != self.dtype:
            return None
        run = self.backwards.get(needs)
        if run is None:
            run = self.backwards[needs] = _TrainBackward(self, saved, dy, needs)
        return run(dy, saved)


class _Gradients:
    """The four gradients of a backward variant, dw and db (accumulated in fp32 / fp64) in the
    parameters' dtypes; None where not wanted."""

    need_w = need_b = need_r = False
    w_dtype = b_dtype = None

    def _grads(self, dx, dw, db, dr):
        if self.need_w and dw.dtype != self.w_dtype:
            dw = dw.to(self.w_dtype)
        if self.need_b and db.dtype != self.b_dtype:
            db = db.to(self.b_dtype)
        return (dx, dw if self.need_w else None, db if self.need_b else None,
                dr if self.need_r else None)


class _TrainBackward(_Gradients):
    """One training backward variant (which gradients are wanted) of a ``_Train`` program."""

    def __init__(self, prog: _Train, saved, dy, needs):
        x, weight, bias, _, _, residual, _ = saved
        need_x, need_w, need_b, need_r = needs
        self.need_x = need_x
        if not need_x:  # sums only: launch.backward's reduction pass
            return
        self.need_w, self.need_b = need_w, need_b
        self.need_wb = need_wb = need_w or need_b
        self.need_r = need_r and residual is not None
        self.w_dtype = None if weight is None else weight.dtype
        self.b_dtype = None if bias is None else bias.dtype
        self.acc, self.C, self.P = prog.acc, prog.C, prog.P
        self.c_like = prog.c_like
        act = prog.act
        flags = _stat_flags(True, False, weight, bias, 0.0)
        count = x.numel() // prog.C
        p = prog.p
        if prog.P == 1:  # sums, then dx from the program's cached tiles
            named, rflags, _ = launch._residual_site(residual, x)
            self.reduce_site = launch.backward_reduce_site(
                p, x, dy, x, False, True, count, *act, named, flags, rflags,
                rows=True).fixed_dtypes()
            self.dx_site = None
        else:
            named, rflags, _ = launch._residual_site(residual, x)
            self.reduce_site = launch.backward_reduce_site(
                p, x, dy, x, False, False, 1, *act, named, flags, rflags,
                rows=True).fixed_dtypes()
            named, rflags, _ = launch._residual_site(residual)
            self.dx_site = launch.dx_site(
                plan(x, reduction=False, merging=DX_PARTIAL_BYTES), x, dy, x, prog.P, count,
                True, need_wb, False, *act, named, flags, rflags, one_tensor=True).fixed_dtypes()

    def __call__(self, dy, saved):
        if not self.need_x:
            return None
        # stats: the forward's one tensor, [3, C] or (split) [3 + 4P, C]: the kernels' rows
        x, weight, bias, _, _, residual, stats = saved
        w = stats if weight is None else weight
        b = stats if bias is None else bias
        dx = torch.empty_like(x)
        if residual is None:
            dr, res = None, ()
        else:
            dr = torch.empty_like(x)
            res = (residual, dr)
        aligned = all_aligned(x, dy, weight, bias, residual)  # the others are fresh
        reduce_site = self.reduce_site.aligned if aligned else self.reduce_site
        if self.dx_site is None:  # whole sums, straight into the gradients (no views)
            db, dw = torch.empty_like(self.c_like), torch.empty_like(self.c_like)
            reduce_site(x, dy, dx, stats, stats, stats, w, b, db, dw, *res)
        else:  # the partial sums in stats' rows after the statistics (the forward's partials)
            reduce_site(x, dy, x, stats, stats, stats, w, b, stats, stats, *res)
            if self.need_wb:
                db, dw = torch.empty_like(self.c_like), torch.empty_like(self.c_like)
            else:
                db = dw = stats  # not written
            (self.dx_site.aligned if aligned else self.dx_site)(
                x, dy, dx, stats, stats, stats, w, b, stats, dw, db, *res[:1])
        return self._grads(dx, dw, db, dr)


class _Eval:
    """Eval: the forward's one normalize launch from the running stats; backward with dx wanted
    in one launch (the reduction pass writing dx when weight or bias want a gradient, else the
    elementwise dx kernel)."""

    def __init__(self, inputs, cfg):
        x, weight, bias, running_mean, running_var, _, residual = inputs
        named, rflags, _ = launch._residual_site(residual)
        flags = _stat_flags(False, True, weight, bias, cfg.eps)
        self.site = launch.normalize_site(plan(x, reduction=False), x, x, cfg.activation,
                                          cfg.negative_slope, cfg.alpha, named, flags,
                                          rflags).fixed_dtypes()
        self.x_stride, self.dtype = x.stride(), x.dtype
        self.empty = x.new_empty(0)
        self.sums_like = x.new_empty((2, x.shape[1]), dtype=rt.accum_dtype(x.dtype))
        self.backwards: dict = {}

    def forward(self, cfg, x, weight, bias, running_mean, running_var, num_batches_tracked,
                residual):
        y = torch.empty_like(x)
        rm = running_mean
        site = (self.site.aligned if all_aligned(x, weight, bias, rm, running_var, residual)
                else self.site)
        site(x, y, rm, rm, running_var, rm if weight is None else weight,
             rm if bias is None else bias, *(() if residual is None else (residual,)))
        return y, torch.empty_like(self.empty)

    def backward(self, douts, saved, cfg, needs):
        dy = douts[0]
        if dy.stride() != self.x_stride or dy.dtype != self.dtype or not needs[0]:
            return None  # the launchers (dy laid out otherwise; no dx: sums only)
        run = self.backwards.get(needs)
        if run is None:
            run = self.backwards[needs] = _EvalBackward(self, saved, dy, cfg, needs)
        return run(dy, saved)


class _EvalBackward(_Gradients):
    """One eval backward variant (dx wanted) of an ``_Eval`` program: ``launch.backward``'s
    eval branch with its sites made once."""

    def __init__(self, prog: _Eval, saved, dy, cfg, needs):
        x, weight, bias, _, _, residual, _ = saved
        _, need_w, need_b, need_r = needs
        self.need_w, self.need_b = need_w, need_b
        self.need_wb = need_w or need_b
        self.need_r = need_r and residual is not None
        self.w_dtype = None if weight is None else weight.dtype
        self.b_dtype = None if bias is None else bias.dtype
        self.sums_like = prog.sums_like
        act = (cfg.activation, cfg.negative_slope, cfg.alpha)
        flags = _stat_flags(False, True, weight, bias, cfg.eps)
        # dr is written wherever a residual is read (the reduction pass), or when wanted (dx)
        named, rflags, _ = launch._residual_site(residual, x)
        if self.need_wb:
            p = plan(x, reduction=True)
            self.P = p.num_partials
            self.site = launch.backward_reduce_site(p, x, dy, x, True, False, 1, *act, named,
                                                    flags, rflags).fixed_dtypes()
            if self.P > 1:
                self.ws_like = x.new_empty((2, self.P, x.shape[1]), dtype=self.sums_like.dtype)
        else:
            self.site = launch.dx_site(plan(x, reduction=False), x, dy, x, 1, 1, False, False,
                                       self.need_r, *act, named, flags, rflags).fixed_dtypes()

    def __call__(self, dy, saved):
        x, weight, bias, rm, rv, residual, _ = saved
        w = rm if weight is None else weight
        b = rm if bias is None else bias
        dx = torch.empty_like(x)
        dr = None if residual is None else torch.empty_like(x)
        res = () if residual is None else (residual, dr)
        db = dw = None
        site = (self.site.aligned if all_aligned(x, dy, weight, bias, rm, rv, residual)
                else self.site)
        if not self.need_wb:
            site(x, dy, dx, rm, rm, rv, w, b, rm, rm, rm, *res)
        elif self.P == 1:  # whole sums straight into the gradients
            db, dw = torch.empty_like(self.sums_like).unbind(0)
            site(x, dy, dx, rm, rm, rv, w, b, db, dw, *res)
        else:  # the partial sums' deterministic combine, as launch.backward
            ws = torch.empty_like(self.ws_like)
            site(x, dy, dx, rm, rm, rv, w, b, *ws.unbind(0), *res)
            db, dw = ws.sum(1).unbind(0)
        return self._grads(dx, dw, db, dr)
