"""Predicted cost of the sweep's kernels on a named card, from their machine code, without a GPU.

``python -m perf.static_cost [--card H200] [--ops ...] [--dtypes ...] [--json FILE]``

1. Record: each case of the sweep (``perf.cases``) runs its tkern forward and backward on CPU
   tensors under ``tkern._runtime.plan_as_gpu(card.sms)``, so every launch is planned as on the
   card (grid sizes, splits, block shapes), and ``JITFunction.run`` is replaced by a recorder that
   runs Triton's own launch specialisation (its binder and ``_pack_args``: constexpr 1s,
   16-divisible integers and pointers) and launches nothing.  Torch ops on the op's path
   (a ``sum`` combining partials, a copy) are logged by a dispatch mode: they move DRAM bytes too.
   Inputs are uninitialised (``torch.empty``): no kernel runs, so values do not matter.
2. Compile each distinct launch for sm_90a with ``triton.compile`` and read ptxas' report
   (registers, spill stores) and the SASS (nvdisasm, shipped with Triton).
3. Read the SASS and the PTX: global access widths on the data tensors (PTX addresses traced to
   the kernel's pointer arguments), loads in flight per thread before their first use, loops,
   instructions per DRAM byte; then predict the kernel's share of copy bandwidth with the model
   written down in perf/RESULTS.md ("Static predictions").

Everything printed or written is a prediction from machine code, never a measurement.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field

FIELDS = ("op", "case", "kernel", "direction", "regs", "spill_bytes", "ctas_per_sm", "load_bits",
          "bytes_in_flight_per_sm", "sass_per_byte", "dram_passes", "predicted_pct_copy")


@dataclass(frozen=True)
class Card:
    """What the model needs of a GPU.  ``copy_gbps``: a device-to-device copy's (read + write)
    bandwidth, the harness's 100%; ``latency_ns``: DRAM latency under load (Little's law)."""

    name: str
    sms: int
    clock_ghz: float
    copy_gbps: float
    latency_ns: float = 800.0
    issue_per_sm: int = 128  # thread instructions per clock per SM (4 schedulers x 32 lanes)
    mufu_per_sm: int = 16  # MUFU (ex2, lg2, rcp, rsqrt) results per clock per SM
    threads_per_sm: int = 2048
    regs_per_sm: int = 65536
    ctas_per_sm: int = 32
    smem_per_sm: int = 228 * 1024

    @property
    def sass_budget(self) -> float:
        """SASS thread-instructions the card issues per byte at copy bandwidth."""
        return self.sms * self.issue_per_sm * self.clock_ghz / self.copy_gbps

    @property
    def inflight_needed(self) -> float:
        """Bytes each SM must keep in flight to sustain copy bandwidth (Little's law)."""
        return self.copy_gbps / self.sms * self.latency_ns


# copy bandwidths are about 90% of the data sheets' 4.8 and 3.35 TB/s (what a copy reaches)
CARDS = {
    "H200": Card("H200", sms=132, clock_ghz=1.98, copy_gbps=4300.0),
    "H100": Card("H100", sms=132, clock_ghz=1.98, copy_gbps=3000.0),
}
LAUNCH_GAP_US = 1.0  # device time between back-to-back kernels on one stream (totals only)
TORCH_OP_PCT = 80.0  # assumed share of copy bandwidth for torch's own kernels (not read here)

# the sweep's batches per op in this analysis: the issue's shapes (ResNet-50 BN at 32 and 256,
# 4096 and 16384 transformer tokens = batch 8 and 32 of 512)
BATCHES = {"batch_norm": (32, 256), "batch_norm_relu": (32, 256), "local_response_norm": (32, 256),
           "activation_dropout": (8, 32), "weight_norm": (1,)}
CONV_DROPOUT_BATCHES = (32,)
DTYPES = ("bf16", "fp32")


# ----------------------------------------------------------------------------------------------
# 1. recording launches


@dataclass
class TensorArg:
    index: int  # position among the kernel's non-constexpr arguments (its PTX parameter)
    name: str
    nbytes: int  # bytes the tensor spans
    key: tuple  # (data_ptr, nbytes): the same memory passed twice counts once


@dataclass
class Launch:
    fn: object  # the JITFunction
    grid: tuple
    signature: dict
    constexprs: dict
    attrs: dict
    options: object
    tensors: list

    @property
    def name(self) -> str:
        return self.fn.__name__

    @property
    def ctas(self) -> int:
        return math.prod(self.grid)

    def compile_key(self) -> str:
        return repr((self.fn.__module__, self.name, sorted(self.signature.items()),
                     sorted((k, repr(v)) for k, v in self.constexprs.items()),
                     sorted((k, repr(v)) for k, v in self.attrs.items()),
                     self.options.num_warps, self.options.num_stages))


@dataclass
class TorchOp:
    name: str
    read_bytes: int
    write_bytes: int


def _span_bytes(t) -> int:
    if t.numel() == 0:
        return 0
    span = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    return min(t.numel(), span) * t.element_size()


class _Recorder:
    """Replaces ``JITFunction.run`` while active: specialise as Triton does, record, launch nothing."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.backend = make_backend(GPUTarget("cuda", 90, 32))
        self.events: list = []
        self._binders: dict = {}

    def run(self, jit, args, grid, kwargs):
        import torch
        from triton.runtime.jit import create_function_from_signature

        binder = self._binders.get(id(jit))
        if binder is None:
            binder = self._binders[id(jit)] = create_function_from_signature(
                jit.signature, jit.params, self.backend)
        bound, spec, opts = binder(*args, **kwargs)
        options, signature, constexprs, attrs = jit._pack_args(self.backend, kwargs, bound, spec,
                                                               opts)
        if callable(grid):
            grid = grid(bound)
        grid = tuple(grid) + (1,) * (3 - len(grid))
        tensors, index = [], 0
        for p, (name, value) in zip(jit.params, bound.items()):
            if p.is_constexpr or signature.get(name) == "constexpr":
                continue
            if isinstance(value, torch.Tensor):
                nb = _span_bytes(value)
                tensors.append(TensorArg(index, name, nb, (value.data_ptr(), nb)))
            index += 1
        self.events.append(Launch(jit, grid, signature, constexprs, attrs, options, tensors))

    @contextlib.contextmanager
    def active(self):
        from triton.runtime.jit import JITFunction

        saved = JITFunction.run
        rec = self

        def run(self, *args, grid, warmup, **kwargs):
            rec.run(self, args, grid, kwargs)

        JITFunction.run = run
        try:
            with _TorchOpLog(self.events):
                yield self
        finally:
            JITFunction.run = saved


def _torch_op_log_class():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    free = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach",
            "alias", "lift_fresh", "_local_scalar_dense", "randint", "random_", "lift_fresh_copy",
            "_to_copy_meta", "set_", "resize_"}

    class Log(TorchDispatchMode):
        def __init__(self, events):
            super().__init__()
            self.events = events

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if func.is_view or name in free:
                return out
            flat_in = [a for a in torch.utils._pytree.tree_leaves((args, kwargs))
                       if isinstance(a, torch.Tensor)]
            flat_out = [a for a in torch.utils._pytree.tree_leaves(out) if isinstance(a, torch.Tensor)]
            if name.endswith("_") and args:  # in place: writes its first argument
                write = _span_bytes(args[0])
                read = sum(_span_bytes(t) for t in flat_in) - (write if name == "copy_" else 0)
            else:
                read = sum(_span_bytes(t) for t in flat_in)
                write = sum(_span_bytes(t) for t in flat_out)
            if read + write > 0:
                self.events.append(TorchOp(f"torch.{name}", read, write))
            return out

    return Log


@contextlib.contextmanager
def _TorchOpLog(events):
    with _torch_op_log_class()(events):
        yield


@contextlib.contextmanager
def _unfilled():
    """torch's random fills as ``torch.empty``: the cases build their inputs without touching
    the memory (no kernel reads it; recording needs shapes and strides only)."""
    import torch

    saved = torch.randn, torch.rand, torch.randn_like, torch.rand_like

    def empty(*size, generator=None, **kw):
        return torch.empty(*size, **kw)

    def empty_like(t, **kw):
        return torch.empty_like(t, **kw)

    torch.randn, torch.rand, torch.randn_like, torch.rand_like = empty, empty, empty_like, empty_like
    try:
        yield
    finally:
        torch.randn, torch.rand, torch.randn_like, torch.rand_like = saved


@dataclass
class CaseRun:
    op: str
    case: str
    x_bytes: int
    min_bytes: dict  # direction -> bytes
    events: dict  # direction -> [Launch | TorchOp]


_DT = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}


def _case_list(ops, dtypes, quick=False):
    """(case, batch, dtype name) of the sweep that this analysis covers."""
    from perf import cases as registry

    out = []
    for op in ops:
        for case in registry.cases_for(op, quick):
            batches = BATCHES.get(op, (32,))
            if op == "activation_dropout" and len(case.shape) == 3:  # conv feature maps
                batches = CONV_DROPOUT_BATCHES
            if quick:
                batches = (2,)
            for dt in dtypes:
                for b in batches:
                    out.append((case, b, dt))
    return out


def case_name(case, batch, dt) -> str:
    return f"{case.label} {case.shape_str} {case.layout} {dt} b{batch}"


def record(case, batch, dt, card: Card) -> CaseRun:
    """The launches (and torch ops) of one case's training forward and its backward."""
    import torch

    from tkern import _runtime as rt

    dtype = getattr(torch, _DT[dt])
    with _unfilled():
        inp = case.make(batch, dtype, torch.device("cpu"))
    rec = _Recorder()
    events = {}
    with rt.plan_as_gpu(card.sms):
        with rec.active():
            out = case.tkern(*inp.args)
        events["fwd"], rec.events = rec.events, []
        if inp.grad_idx:
            with rec.active():
                torch.autograd.grad(out, inp.grad_args(), inp.dy)
            events["bwd"] = rec.events
    x = inp.args[0]
    mins = {d: case.min_bytes(batch, dtype, d) for d in events}
    return CaseRun(case.op, case_name(case, batch, dt), _span_bytes(x), mins, events)


# ----------------------------------------------------------------------------------------------
# 2. compiling and reading machine code


@dataclass
class Access:
    store: bool
    bits: int
    params: frozenset


@dataclass
class Sass:
    instrs: list  # (address, opcode, operands)
    loops: list  # innermost loops as (first index, last index)


@dataclass
class Compiled:
    regs: int
    spill_bytes: int
    shared: int
    num_warps: int
    sass: Sass
    accesses: list  # Access per global load/store in the PTX
    mufu: int


def _bindir() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


_cache: dict = {}


def compile_launch(launch: Launch) -> Compiled:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    key = launch.compile_key()
    if key in _cache:
        return _cache[key]
    src = ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs)
    buf = io.StringIO()
    # always compile: ptxas' report (-v, which Triton runs) is printed only when ptxas runs
    with knobs.nvidia.scope(), knobs.compilation.scope():
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        with contextlib.redirect_stdout(buf), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                               options=dict(launch.options.__dict__))
    log = buf.getvalue()
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores", log)
    sass = _read_sass(k.asm["cubin"])
    if regs is None:  # no report (a Triton that does not print it): the SASS's own numbers
        regs_n = _max_register(sass) + 1
        spill_n = sum(_width_bits(op) // 8 for _, op, _ in sass.instrs if op.startswith("STL"))
    else:
        regs_n, spill_n = int(regs.group(1)), int(spill.group(1)) if spill else 0
    ptx = k.asm["ptx"]
    res = Compiled(regs_n, spill_n, int(k.metadata.shared), launch.options.num_warps, sass,
                   _ptx_accesses(ptx), sum(1 for _, op, _ in sass.instrs if op.startswith("MUFU")))
    _cache[key] = res
    return res


_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")


def _read_sass(cubin: bytes) -> Sass:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([os.path.join(_bindir(), "nvdisasm"), "-c", f.name],
                              capture_output=True, text=True, check=True, timeout=120).stdout
    finally:
        os.unlink(f.name)
    instrs, labels, pending = [], {}, []
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _SASS.search(line)
        if m:
            for lab in pending:
                labels[lab] = len(instrs)
            pending = []
            instrs.append((int(m.group(1), 16), m.group(2), m.group(3).strip()))
    # drop the padding after the last EXIT (a branch to itself, NOPs)
    last_exit = max((i for i, (_, op, _) in enumerate(instrs) if op == "EXIT"), default=len(instrs) - 1)
    instrs = [ins for i, ins in enumerate(instrs) if i <= last_exit or not (
        ins[1] in ("NOP",) or ins[1].startswith("BRA"))]
    instrs = [ins for ins in instrs if ins[1] != "NOP"]
    loops = []
    # labels index the list before the padding went: padding is only at the end
    for i, (_, op, operands) in enumerate(instrs):
        if op.startswith("BRA"):
            m = re.search(r"(\.L_x_\d+)", operands)
            if m and m.group(1) in labels and labels[m.group(1)] < i:
                loops.append((labels[m.group(1)], i))
    inner = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    return Sass(instrs, inner)


def _width_bits(op: str) -> int:
    parts = op.split(".")
    for p in parts[1:]:
        if p in ("128", "64"):
            return int(p)
        if p in ("U16", "S16"):
            return 16
        if p in ("U8", "S8"):
            return 8
    return 32


_REG = re.compile(r"\bR(\d+)(\.64)?\b")


def _regs_of(text: str) -> set:
    out = set()
    for m in _REG.finditer(text):
        r = int(m.group(1))
        out.add(r)
        if m.group(2):
            out.add(r + 1)
    return out


def _max_register(sass: Sass) -> int:
    return max((r for _, _, ops in sass.instrs for r in _regs_of(ops)), default=0)


def _is_mem(op: str) -> bool:
    return op.startswith(("LDG", "STG"))


def _inflight_bytes(instrs) -> int:
    """Most bytes of global loads a thread has issued and not yet used, walking ``instrs`` in
    order: a load retires when an instruction reads one of its destination registers."""
    outstanding, best = [], 0
    for _, op, operands in instrs:
        if op.startswith("LDG"):
            dst, _, rest = operands.partition(",")
            srcs = _regs_of(rest)
        elif op.startswith(("STG", "BRA", "EXIT", "BAR", "RET")):
            srcs = _regs_of(operands)
        else:
            _, _, rest = operands.partition(",")
            srcs = _regs_of(rest)
        outstanding = [(regs, b) for regs, b in outstanding if not (regs & srcs)]
        if op.startswith("LDG"):
            w = _width_bits(op)
            first = _regs_of(dst)
            base = min(first) if first else -1
            outstanding.append(({base + i for i in range(max(1, w // 32))}, w // 8))
            best = max(best, sum(b for _, b in outstanding))
    return best


_PTX_INSTR = re.compile(r"^\s*(?:@!?%p\d+\s+)?([a-z][\w.:]*)\s+([^;]*);", re.M)
_PTX_REG = re.compile(r"%[a-z]+\d+")


def _ptx_accesses(ptx: str) -> list:
    """Each ld.global / st.global: its width and the pointer parameters its address derives from."""
    params, defs, accesses = {}, collections.defaultdict(set), []
    for m in _PTX_INSTR.finditer(ptx):
        op, operands = m.group(1), m.group(2)
        regs = _PTX_REG.findall(operands)
        if op.startswith("ld.param"):
            pm = re.search(r"_param_(\d+)\]", operands)
            if pm and regs:
                params[regs[0]] = int(pm.group(1))
            continue
        if op.startswith(("ld.global", "st.global")):
            addr = re.search(r"\[\s*(%rd\d+)", operands)
            vec = re.search(r"\.v(\d)", op)
            bits = re.search(r"\.[bufs](\d+)$", op) or re.search(r"\.[bufs](\d+)", op)
            width = (int(vec.group(1)) if vec else 1) * (int(bits.group(1)) if bits else 32)
            accesses.append([op.startswith("st."), width, addr.group(1) if addr else None])
            if op.startswith("ld.") and regs:  # loaded values: not traced further
                for r in _PTX_REG.findall(operands.split("[")[0]):
                    defs[r] = set()
            continue
        if regs and not op.startswith(("st.", "bra", "ret", "bar", "setp")):
            defs[regs[0]] |= set(regs[1:])
        elif op.startswith("setp") and regs:
            defs[regs[0]] |= set(regs[1:])
    out = []
    for store, width, addr in accesses:
        seen, stack, found = set(), [addr] if addr else [], set()
        while stack:
            r = stack.pop()
            if r in seen:
                continue
            seen.add(r)
            if r in params:
                found.add(params[r])
                continue
            stack.extend(defs.get(r, ()))
        out.append(Access(store, width, frozenset(found)))
    return out


# ----------------------------------------------------------------------------------------------
# 3. the model


@dataclass
class Row:
    op: str
    case: str
    kernel: str
    direction: str
    regs: int | None
    spill_bytes: int | None
    ctas_per_sm: int | None
    load_bits: int | None
    bytes_in_flight_per_sm: int | None
    sass_per_byte: float | None
    dram_passes: float
    predicted_pct_copy: float
    time_us: float = 0.0  # predicted; not in the JSON (derived)
    limiter: str = ""
    min_passes: float | None = None

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in FIELDS}


def occupancy(c: Compiled, card: Card) -> int:
    threads = 32 * c.num_warps
    regs = max(c.regs, 1)
    per_warp = math.ceil(regs * 32 / 256) * 256  # allocated per warp in units of 256
    by_regs = (card.regs_per_sm // per_warp) // c.num_warps
    by_threads = card.threads_per_sm // threads
    by_smem = card.smem_per_sm // (c.shared + 1024) if c.shared else card.ctas_per_sm
    return max(0, min(by_regs, by_threads, by_smem, card.ctas_per_sm))


def kernel_row(run: CaseRun, direction: str, name: str, launch: Launch, c: Compiled,
               card: Card) -> Row:
    by_index = {t.index: t for t in launch.tensors}
    read, written, data_bits = {}, {}, []
    big = max((t.nbytes for t in launch.tensors), default=0)
    for a in c.accesses:
        for i in a.params:
            t = by_index.get(i)
            if t is None:
                continue
            (written if a.store else read)[t.key] = t.nbytes
            if not a.store and t.nbytes >= big / 2:
                data_bits.append(a.bits)
    read_b, write_b = sum(read.values()), sum(written.values())
    total_b = read_b + write_b
    threads = 32 * c.num_warps
    ctas = launch.ctas
    occ = occupancy(c, card)
    slots = card.sms * occ
    resident = min(occ, ctas / card.sms)  # CTAs per SM, averaged over the card
    instrs = c.sass.instrs
    # A last-program-done step (activation+dropout's bias gradient): the code after the first
    # global atomic runs in the one program that took the last count, not in every program.
    # It is left out of the per-thread counts and adds its own loads' latency at the end.
    atom = next((i for i, (_, op, _) in enumerate(instrs) if op.startswith("ATOMG")), None)
    t_last = 0.0
    if atom is not None:
        last = instrs[atom + 1:]
        instrs = instrs[:atom + 1]
        last_loads = sum(_width_bits(op) // 8 for _, op, _ in last if op.startswith("LDG"))
        if last_loads:  # loops there counted once
            waves = math.ceil(last_loads / max(_inflight_bytes(last), 1))
            t_last = waves * card.latency_ns / 1e3
    loops = [(lo, hi) for lo, hi in c.sass.loops if hi < len(instrs)]
    loop_idx = [i for lo, hi in loops for i in range(lo, hi + 1)]
    loop_mem = [i for i in loop_idx if _is_mem(instrs[i][1])]
    bytes_per_thread = total_b / max(ctas * threads, 1)
    if loop_mem:  # steady state: loop bodies; trips from the bytes each thread moves
        body = [instrs[i] for i in loop_idx]
        outside = [ins for i, ins in enumerate(instrs) if i not in set(loop_idx)]
        body_bytes = sum(_width_bits(op) // 8 for _, op, _ in body if _is_mem(op))
        out_bytes = sum(_width_bits(op) // 8 for _, op, _ in outside if _is_mem(op))
        trips = max(1.0, (bytes_per_thread - out_bytes) / body_bytes)
        per_thread = len(outside) + trips * len(body)
        inflight = max(_inflight_bytes(instrs[lo:hi + 1]) for lo, hi in loops)
    else:
        per_thread = len(instrs)
        inflight = _inflight_bytes(instrs)
    sass_per_byte = per_thread / bytes_per_thread if bytes_per_thread else None
    t_bw = total_b / (card.copy_gbps * 1e3)  # us
    inflight_total = min(ctas, slots) * threads * inflight
    t_lat = read_b / (inflight_total / card.latency_ns) / 1e3 if inflight_total else 0.0
    active_sms = min(card.sms, ctas)
    warps_per_sm = min(occ, math.ceil(ctas / card.sms)) * c.num_warps
    issue = active_sms * card.issue_per_sm * min(1.0, warps_per_sm / 4) * card.clock_ghz * 1e3
    t_issue = per_thread * threads * ctas / issue  # us
    mufu = c.mufu * (per_thread / max(len(instrs), 1))  # MUFU share of the dynamic count
    t_mufu = mufu * threads * ctas / (active_sms * card.mufu_per_sm * card.clock_ghz * 1e3)
    bound = max((t_bw, "bandwidth"), (t_lat, "bytes in flight"), (t_issue, "issue"),
                (t_mufu, "MUFU"))
    # the tail: the last CTAs run alone, each at the rate its own bytes in flight allow; on
    # average half a lone CTA's lifetime is added
    cta_inflight = threads * inflight
    t_cta = (read_b / ctas) / (cta_inflight / card.latency_ns) / 1e3 if cta_inflight else 0.0
    tail = 0.5 * t_cta if ctas > slots else 0.0
    t = bound[0] + tail + t_last if occ else float("inf")
    pct = 100.0 * t_bw / t if t else 0.0
    return Row(run.op, run.case, name, direction, c.regs, c.spill_bytes, occ,
               min(data_bits) if data_bits else None, int(resident * threads * inflight),
               round(sass_per_byte, 2) if sass_per_byte is not None else None,
               round(total_b / run.x_bytes, 3) if run.x_bytes else 0.0, round(pct, 1),
               time_us=t, limiter=bound[1] + (", tail" if tail > 0.1 * bound[0] else "")
               + (", last-program step" if t_last else ""))


def torch_row(run: CaseRun, direction: str, op: TorchOp, card: Card) -> Row:
    b = op.read_bytes + op.write_bytes
    t = b / (card.copy_gbps * 1e3) / (TORCH_OP_PCT / 100)
    return Row(run.op, run.case, op.name, direction, None, None, None, None, None, None,
               round(b / run.x_bytes, 3) if run.x_bytes else 0.0, TORCH_OP_PCT, time_us=t,
               limiter="assumed (torch's kernel)")


def total_row(run: CaseRun, direction: str, rows: list, card: Card) -> Row:
    t = sum(r.time_us for r in rows) + LAUNCH_GAP_US * len(rows)
    t_min = run.min_bytes[direction] / (card.copy_gbps * 1e3)
    passes = sum(r.dram_passes for r in rows)
    return Row(run.op, run.case, "(total)", direction, max((r.regs or 0) for r in rows) or None,
               sum(r.spill_bytes or 0 for r in rows), None, None, None, None, round(passes, 3),
               round(100.0 * t_min / t, 1) if t else 0.0, time_us=t,
               limiter=f"{len(rows)} launches", min_passes=round(run.min_bytes[direction] / run.x_bytes, 3))


def analyse(run: CaseRun, card: Card) -> list:
    out = []
    for direction, events in run.events.items():
        rows, seen = [], collections.Counter()
        for ev in events:
            if isinstance(ev, TorchOp):
                rows.append(torch_row(run, direction, ev, card))
                continue
            seen[ev.name] += 1
            name = ev.name + (f"#{seen[ev.name]}" if seen[ev.name] > 1 else "")
            rows.append(kernel_row(run, direction, name, ev, compile_launch(ev), card))
        if rows:
            out += rows + [total_row(run, direction, rows, card)]
    return out


# ----------------------------------------------------------------------------------------------
# entry points


def _analysis_rows(card_name="H200", ops=None, dtypes=DTYPES, quick=False, match=None,
                   progress=None) -> list:
    card = CARDS[card_name]
    from perf import cases as registry

    ops = registry.resolve(ops) if ops else [o for o in BATCHES]
    rows = []
    for case, batch, dt in _case_list(ops, dtypes, quick):
        name = case_name(case, batch, dt)
        if match and not any(m in f"{case.op} {name}" for m in match):
            continue
        if progress:
            progress(f"{case.op} {name}")
        rows += analyse(record(case, batch, dt, card), card)
    return rows


def _kernels_compiled() -> bool:
    """Whether tkern's kernels were built as compilable JITFunctions (not the interpreter's)."""
    from triton.runtime.jit import JITFunction

    from tkern.ops import lrn

    return isinstance(lrn._lrn_forward_kernel, JITFunction)


def rows(card="H200", ops=None, dtypes=DTYPES, quick=False, match=None) -> list[dict]:
    """The predicted rows (dicts with FIELDS) for gpu_check and tests.  Runs in a fresh process
    when this one imported tkern under Triton's interpreter (its kernels cannot be compiled)."""
    if "tkern" not in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") or (
            "tkern" in sys.modules and _kernels_compiled()):
        return [r.as_dict() for r in _analysis_rows(card, ops, dtypes, quick, match)]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "rows.json")
        cmd = [sys.executable, "-m", "perf.static_cost", "--card", card, "--json", path, "--quiet",
               "--dtypes", ",".join(dtypes)]
        if ops:
            cmd += ["--ops", ",".join(ops)]
        if quick:
            cmd.append("--quick")
        for m in match or ():
            cmd += ["--match", m]
        subprocess.run(cmd, env=_compile_env(), check=True, cwd=_root())
        with open(path) as f:
            return json.load(f)


def _root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compile_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TKERN_STATIC_COST"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_root(), env.get("PYTHONPATH")]))
    return env


def _fmt(v, spec="") -> str:
    return "-" if v is None else format(v, spec)


def print_table(rs: list, card: Card, out=sys.stdout) -> None:
    import triton

    print(f"PREDICTED from sm_90a machine code (triton {triton.__version__}), not measured.  "
          f"{card.name}: {card.sms} SMs, copy {card.copy_gbps / 1000:.1f} TB/s, budget "
          f"{card.sass_budget:.1f} SASS/byte, {card.inflight_needed / 1024:.0f} KB in flight/SM "
          f"needed", file=out)
    head = (f"{'op':<20} {'case':<52} {'kernel':<28} {'dir':<3} {'regs':>4} {'spill':>5} "
            f"{'CTA/SM':>6} {'ld bits':>7} {'KB fly/SM':>9} {'SASS/B':>7} {'passes':>11} "
            f"{'pred %copy':>10}  limiter")
    print(head, file=out)
    for r in rs:
        passes = f"{r.dram_passes:.2f}" + (f"/{r.min_passes:.2f}" if r.min_passes is not None else "")
        fly = None if r.bytes_in_flight_per_sm is None else r.bytes_in_flight_per_sm / 1024
        print(f"{r.op:<20} {r.case:<52} {r.kernel:<28} {r.direction:<3} {_fmt(r.regs):>4} "
              f"{_fmt(r.spill_bytes):>5} {_fmt(r.ctas_per_sm):>6} {_fmt(r.load_bits):>7} "
              f"{_fmt(fly, '.1f'):>9} {_fmt(r.sass_per_byte, '.1f'):>7} {passes:>11} "
              f"{r.predicted_pct_copy:>10.0f}  {r.limiter}", file=out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.static_cost", description=__doc__.split("\n")[0])
    p.add_argument("--card", default="H200", choices=sorted(CARDS))
    p.add_argument("--ops", default=None, help="comma list (default: every op but train_step)")
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--quick", action="store_true", help="the sweep's tiny shapes at batch 2")
    p.add_argument("--match", action="append", default=None,
                   help="only cases whose 'op case' contains this text (repeatable)")
    p.add_argument("--json", default=None, help="write the rows (predictions) to this file")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION")  # Triton 3.9's notice
    card = CARDS[args.card]
    ops = args.ops.split(",") if args.ops else None
    progress = None if args.quiet else (lambda s: print(f"# recording {s}", file=sys.stderr))
    rs = _analysis_rows(args.card, ops, args.dtypes.split(","), args.quick, args.match, progress)
    if not args.quiet:
        print_table(rs, card)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in rs], f, indent=1)
    return 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # ``python -m perf.static_cost`` imported the perf package, which turns the interpreter
        # on when there is no GPU; compiling needs it off, so run this file again without it
        sys.exit(subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:]],
                                env=_compile_env()).returncode)
    sys.path.insert(0, _root())
    sys.exit(main())
