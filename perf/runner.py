"""The sweep: for every op, case, dtype and batch size, check each provider against eager, then time
it in each mode and record one row per (provider, mode).

Rows are dicts with the columns of ``COLUMNS``.  A provider whose output is wrong (or that raises)
gets rows with no timings and an entry in ``failures``; torch.compile off-GPU gets rows marked
unavailable ("n/a").  Out-of-memory ends a case's batch sweep (the rows of the batch that ran out
are dropped); the time budget ends the sweep cleanly, keeping the rows measured so far.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .cases import cases_for, missing
from .cases.base import Case, Inputs, Result, compare_exact, run_once
from .progress import Progress
from .timing import Timer, peak_memory_mb, synchronize

COLUMNS = ["op", "mode", "provider", "dtype", "batch", "shape", "layout", "ms_p50", "ms_p20",
           "ms_p80", "gbps", "pct_peak", "speedup_vs_eager", "peak_mem_mb", "images_per_s", "device"]
METRICS = COLUMNS[7:15]
KEY = ("op", "mode", "provider", "dtype", "batch", "shape", "layout")
# "tkern+compile" is torch.compile of the tkern function, for cases that ask for it
# (extra["compile_tkern"]: torch.compile(tkern.convert(model)) training steps)
PROVIDERS = ("eager", "torch.compile", "tkern", "tkern+compile", "flag_gems")
# Peers: measured and checked like every provider, but their failures fail no sweep and their rows
# count toward no target (perf/cases/gems.py).
PEERS = ("flag_gems",)
MODES = ("fwd", "bwd", "full")
NA, WRONG = "n/a", "WRONG"  # markers for metric cells: provider unavailable / failed its check

_OOM = (torch.OutOfMemoryError, MemoryError)


@dataclass
class Config:
    ops: list[str]
    dtypes: list[torch.dtype]
    batches: list[int]
    modes: list[str]
    layouts: list[str]
    providers: list[str]
    quick: bool
    device: torch.device
    device_name: str
    timer: Timer
    peak_gbps: float
    shapes: list[str] | None = None  # keep only these shape strings
    time_budget: float | None = None  # seconds for the whole sweep
    compile_dynamic: bool | None = None  # torch.compile(dynamic=...)


@dataclass
class SweepResult:
    rows: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped_ops: dict = field(default_factory=dict)
    interrupted: bool = False


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class Sweep:
    def __init__(self, cfg: Config, progress: Progress | None = None,
                 checkpoint: Callable[[SweepResult], None] | None = None):
        self.cfg = cfg
        self.progress = progress or Progress(0, enabled=False)
        self.checkpoint = checkpoint  # called with the result so far after each op
        self.result = SweepResult()

    # ----------------------------------------------------------------------------------- set-up
    def note(self, msg: str) -> None:
        self.result.notes.append(msg)
        self.progress.message(msg)

    def _compile_available(self) -> bool:
        return self.cfg.device.type == "cuda"

    def _compile(self, fn: Callable) -> Callable:
        import torch._dynamo
        import torch._functorch.config as fconfig

        # One wrapper per case, many shapes and dtypes: lift the recompile limit (old and new name).
        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 1024))
        # The bwd mode replays one backward with retain_graph=True, which donated buffers forbid.
        if hasattr(fconfig, "donated_buffer"):
            fconfig.donated_buffer = False
        return torch.compile(fn, dynamic=self.cfg.compile_dynamic)

    def _providers(self, case: Case) -> dict[str, Callable | None]:
        out: dict[str, Callable | None] = {}
        for p in self.cfg.providers:
            if p == "eager":
                fn = case.eager
            elif p == "tkern":
                fn = case.tkern
            elif p == "tkern+compile":
                if not case.extra.get("compile_tkern"):
                    continue  # no row: only whole-model cases compile tkern
                fn = self._compile(case.tkern) if self._compile_available() else None
            elif p == "flag_gems":
                if case.gems is None:
                    continue  # FlagGems lacks the op: no rows at all, rather than n/a rows
                fn = case.gems
            else:
                fn = self._compile(case.eager) if self._compile_available() else None
            out[p] = fn
        return out

    def plan(self) -> list[tuple[str, list[Case]]]:
        plan = []
        for op in self.cfg.ops:
            miss = missing(op)
            if miss:
                reason = f"op not available: tkern has no {', '.join(miss)} yet"
                self.result.skipped_ops[op] = reason
                self.note(f"skipping {op}: {reason}")
                continue
            cases = [c for c in cases_for(op, self.cfg.quick) if c.layout in self.cfg.layouts
                     and (not self.cfg.shapes or c.shape_str in self.cfg.shapes)]
            if not cases:
                self.note(f"skipping {op}: no case with the chosen layouts and shapes")
                continue
            plan.append((op, cases))
        return plan

    def batches(self, case: Case) -> list[int]:
        cap = case.extra.get("max_batch")
        floor = None if self.cfg.quick else case.extra.get("min_batch")  # quick: tiny batches
        return [b for b in self.cfg.batches
                if (cap is None or b <= cap) and (floor is None or b >= floor)]

    # -------------------------------------------------------------------------------- the sweep
    def run(self) -> SweepResult:
        plan = self.plan()
        total = sum(len(self.cfg.dtypes) * len(self.batches(c)) for _, cases in plan for c in cases)
        self.progress.reset(total)
        start = time.monotonic()
        deadline = start + self.cfg.time_budget if self.cfg.time_budget is not None else math.inf
        try:
            for i, (op, cases) in enumerate(plan):
                now = time.monotonic()
                # Each op gets an equal share of what is left, so a slow op cannot starve the others.
                op_deadline = now + (deadline - now) / (len(plan) - i) if deadline < math.inf else math.inf
                self._run_op(op, cases, op_deadline)
                if self.checkpoint is not None:
                    self.checkpoint(self.result)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (see cli): keep what was measured
            self.result.interrupted = True
            self.note("interrupted: the sweep stopped early; rows measured so far are kept")
        self.progress.close()
        return self.result

    def _run_op(self, op: str, cases: list[Case], op_deadline: float) -> None:
        skipped = 0
        for case in cases:
            providers = self._providers(case)
            for dtype in self.cfg.dtypes:
                batches = self.batches(case)
                for j, batch in enumerate(batches):
                    if time.monotonic() > op_deadline:
                        skipped += len(batches) - j
                        self.progress.advance(len(batches) - j)
                        break
                    self.progress.update(f"{op} {case.shape_str} {case.layout} "
                                         f"{dtype_name(dtype)} batch={batch}")
                    try:
                        rows = self._run_group(case, dtype, batch, providers)
                    except _OOM:
                        self._free()
                        self.note(f"{op} {case.shape_str} {case.layout} {dtype_name(dtype)}: out of "
                                  f"memory at batch {batch}; larger batches skipped")
                        self.progress.advance(len(batches) - j)
                        break
                    self.result.rows.extend(rows)
                    self.progress.advance(1)
            self._free()
        if skipped:
            self.note(f"time budget: {op} stopped early, {skipped} (case, dtype, batch) groups not run")

    def _free(self) -> None:
        gc.collect()
        if self.cfg.device.type == "cuda":
            torch.cuda.empty_cache()

    # ----------------------------------------------------------------- one (case, dtype, batch)
    def _base_row(self, case, dtype, batch, provider, mode) -> dict:
        return dict(op=case.op, mode=mode, provider=provider, dtype=dtype_name(dtype), batch=batch,
                    shape=case.shape_str, layout=case.layout, device=self.cfg.device_name)

    def _marked_rows(self, case, dtype, batch, provider, marker) -> list[dict]:
        rows = []
        for mode in self.cfg.modes:
            row = self._base_row(case, dtype, batch, provider, mode)
            row.update({m: marker for m in METRICS})
            rows.append(row)
        return rows

    def _fail(self, case, dtype, batch, provider, err: BaseException) -> list[dict]:
        msg = f"{type(err).__name__}: {err}".strip()
        first = msg.splitlines()[0] if msg else type(err).__name__
        self.result.failures.append(dict(op=case.op, provider=provider, dtype=dtype_name(dtype),
                                         batch=batch, shape=case.shape_str, layout=case.layout,
                                         error=first[:500]))
        self.progress.message(f"FAILED {case.op} {case.shape_str} {case.layout} {dtype_name(dtype)} "
                              f"batch={batch} provider={provider}: {first[:300]}")
        return self._marked_rows(case, dtype, batch, provider, WRONG)

    def _run_group(self, case: Case, dtype: torch.dtype, batch: int,
                   providers: dict[str, Callable | None]) -> list[dict]:
        cfg = self.cfg
        reference_fn = case.reference or case.eager
        compare = case.compare or compare_exact
        try:
            inp = case.make(batch, dtype, cfg.device)
            # The fp64 reference and eager at the input's dtype, for the tolerance rule.
            ref = run_once(reference_fn, inp.to_reference())
        except _OOM:
            raise
        except Exception as e:  # noqa: BLE001 - nothing can be checked: every provider's row fails
            err = RuntimeError(f"the float64 reference failed: {type(e).__name__}: {e}")
            return [row for p, fn in providers.items()
                    for row in (self._marked_rows(case, dtype, batch, p, NA) if fn is None
                                else self._fail(case, dtype, batch, p, err))]
        eager_error = None
        try:
            torch_same = run_once(reference_fn, inp.for_provider())
        except _OOM:
            raise
        except Exception as e:  # eager lacks this dtype here: compare against the rounded reference
            eager_error = e
            torch_same = _cast_like(ref, inp)
        rows: list[dict] = []
        timings: dict[tuple[str, str], tuple] = {}
        for provider, fn in providers.items():
            if fn is None:
                rows += self._marked_rows(case, dtype, batch, provider, NA)
                continue
            if provider == "eager" and eager_error is not None:
                # PyTorch lacking a kernel (LRN has no half-precision CPU kernel) is not a wrong
                # provider: its rows say n/a, and the others are checked against the rounded
                # float64 reference instead.
                self.note(f"eager n/a for {case.op} {case.shape_str} {case.layout} "
                          f"{dtype_name(dtype)} batch={batch}: {type(eager_error).__name__}: "
                          f"{str(eager_error).splitlines()[0][:200] if str(eager_error) else ''}")
                rows += self._marked_rows(case, dtype, batch, provider, NA)
                continue
            pin = inp.for_provider()
            try:
                actual = torch_same if (provider == "eager" and case.reference is None) else run_once(fn, pin)
                compare(actual, torch_same, ref, dtype)
            except _OOM:
                raise
            except Exception as e:  # noqa: BLE001 - any failure marks the row, loudly
                rows += self._fail(case, dtype, batch, provider, e)
                continue
            del actual
            try:
                measured = self._time(fn, pin)
            except _OOM:
                raise
            except Exception as e:  # noqa: BLE001 - e.g. a backward that cannot be replayed
                rows += self._fail(case, dtype, batch, provider, e)
                continue
            for mode, (p50, p20, p80, peak) in measured.items():
                timings[(provider, mode)] = (p50, p20, p80, peak)
        del ref, torch_same
        for (provider, mode), (p50, p20, p80, peak) in timings.items():
            row = self._base_row(case, dtype, batch, provider, mode)
            gbps = case.min_bytes(batch, dtype, mode) / (p50 * 1e-3) / 1e9
            eager = timings.get(("eager", mode))
            row.update(ms_p50=p50, ms_p20=p20, ms_p80=p80, gbps=gbps,
                       pct_peak=100.0 * gbps / cfg.peak_gbps if cfg.peak_gbps > 0 else float("nan"),
                       speedup_vs_eager=eager[0] / p50 if eager else float("nan"), peak_mem_mb=peak,
                       images_per_s=(batch / (p50 * 1e-3) if case.extra.get("images")
                                     else float("nan")))
            rows.append(row)
        order = {(p, m): i for i, (p, m) in enumerate((p, m) for p in PROVIDERS for m in MODES)}
        rows.sort(key=lambda r: order.get((r["provider"], r["mode"]), 0))
        return rows

    def _time(self, fn: Callable, inp: Inputs) -> dict[str, tuple]:
        args, gargs, dy = inp.args, inp.grad_args(), inp.dy
        timer, device = self.cfg.timer, self.cfg.device

        def full():
            return torch.autograd.grad(fn(*args), gargs, dy)

        out = {}
        peak = peak_memory_mb(full, device)
        for mode in self.cfg.modes:
            if mode == "fwd":
                t = timer(lambda: fn(*args))
            elif mode == "full":
                t = timer(full)
            else:  # the backward alone: one forward kept alive, its graph replayed
                y = fn(*args)
                t = timer(lambda: torch.autograd.grad(y, gargs, dy, retain_graph=True))
                del y
            synchronize(device)
            out[mode] = (*t, peak)
        return out


def _cast_like(ref: Result, inp: Inputs) -> Result:
    """The fp64 reference rounded to the dtypes the provider's results will have."""
    out_dtype = inp.args[0].dtype
    grads = tuple(g.to(inp.args[i].dtype) for g, i in zip(ref.grads, inp.grad_idx))
    state = tuple(s.to(inp.args[i].dtype) for s, i in zip(ref.state, inp.state_idx))
    return Result(ref.out.to(out_dtype), grads, state)
