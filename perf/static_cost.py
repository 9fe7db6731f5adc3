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
   instructions per DRAM byte (each loop at its own trip count: the TTIR's loop bounds run on the
   launch's arguments, see ``loop_counts``); then predict the kernel's share of copy bandwidth
   with the model written down in perf/RESULTS.md ("Static predictions").

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
    scalars: dict = field(default_factory=dict)  # index -> value of each int / float argument

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
        tensors, scalars, index = [], {}, 0
        for p, (name, value) in zip(jit.params, bound.items()):
            if p.is_constexpr or signature.get(name) == "constexpr":
                continue
            if isinstance(value, torch.Tensor):
                nb = _span_bytes(value)
                tensors.append(TensorArg(index, name, nb, (value.data_ptr(), nb)))
            elif isinstance(value, (int, float)):
                scalars[index] = value
            index += 1
        self.events.append(Launch(jit, grid, signature, constexprs, attrs, options, tensors,
                                  scalars))

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
    all_loops: list = field(default_factory=list)  # every loop (first, last), nested ones too
    lines: list = field(default_factory=list)  # per instruction: its source (file, line) chain,
    # innermost first (a line of an inlined function, then the call sites)


@dataclass
class Compiled:
    regs: int
    spill_bytes: int
    shared: int
    num_warps: int
    sass: Sass
    accesses: list  # Access per global load/store in the PTX
    mufu: int
    ttir: str = ""
    ptx: str = ""


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
                   _ptx_accesses(ptx), sum(1 for _, op, _ in sass.instrs if op.startswith("MUFU")),
                   k.asm.get("ttir", ""), ptx)
    _cache[key] = res
    return res


_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")


_LINE = re.compile(r'^\s*//## File "([^"]+)", line (\d+)')


def _read_sass(cubin: bytes) -> Sass:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        # -gi: the source line (and inlining chain) of each instruction, from Triton's -lineinfo
        text = subprocess.run([os.path.join(_bindir(), "nvdisasm"), "-c", "-gi", f.name],
                              capture_output=True, text=True, check=True, timeout=120).stdout
    finally:
        os.unlink(f.name)
    instrs, lines, labels, pending = [], [], {}, []
    chain, fresh = (), True
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:  # one comment line per level of the chain, innermost first; sticky until the next
            chain = (chain if not fresh else ()) + ((m.group(1), int(m.group(2))),)
            fresh = False
            continue
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _SASS.search(line)
        if m:
            fresh = True
            for lab in pending:
                labels[lab] = len(instrs)
            pending = []
            instrs.append((int(m.group(1), 16), m.group(2), m.group(3).strip()))
            lines.append(chain)
    # drop the padding after the last EXIT (a branch to itself, NOPs)
    last_exit = max((i for i, (_, op, _) in enumerate(instrs) if op == "EXIT"), default=len(instrs) - 1)
    keep = [i for i, ins in enumerate(instrs) if (i <= last_exit or not (
        ins[1] in ("NOP",) or ins[1].startswith("BRA"))) and ins[1] != "NOP"]
    # NOPs go: labels move to the next instruction kept
    new_index, j = {}, 0
    for i in range(len(instrs) + 1):
        while j < len(keep) and keep[j] < i:
            j += 1
        new_index[i] = j
    labels = {lab: new_index[i] for lab, i in labels.items()}
    instrs, lines = [instrs[i] for i in keep], [lines[i] for i in keep]
    heads = {}
    for i, (_, op, operands) in enumerate(instrs):
        if op.startswith("BRA"):
            m = re.search(r"(\.L_x_\d+)", operands)
            if m and m.group(1) in labels and labels[m.group(1)] <= i:
                head = labels[m.group(1)]
                heads[head] = max(heads.get(head, i), i)  # several back edges: one loop
    loops = sorted(heads.items())
    inner = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    return Sass(instrs, inner, loops, lines)


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
# loop trip counts, from the launch's own arguments
#
# Each ``scf.for`` of the kernel's TTIR is run on the launch's integer arguments and program ids
# (its bounds are scalar arithmetic on them), which gives its trips per program; each SASS loop
# is the TTIR loop with its back edge's source line (and inlining chain: nvdisasm -gi, from
# Triton's -lineinfo); a SASS loop that ptxas unrolled runs one trip per ``k`` TTIR trips, k =
# its memory instructions over the PTX loop's (the unrolled copy first, the remainder loop next).

_MAX_PROGRAMS = 2048  # programs evaluated per launch (evenly spread over the grid beyond that)
_MAX_ITERS = 64  # iterations of a loop walked to evaluate the loops nested in it (spread beyond)


@dataclass
class _TOp:
    kind: str  # "op", "for", "if", "other" (a region not walked: its loops count as unknown)
    res: str = ""
    name: str = ""
    args: tuple = ()
    attr: str = ""
    type: str = ""
    body: list = field(default_factory=list)  # for / other: [ops]; if: [then ops, else ops]
    iv: str = ""
    chain: tuple = ()
    id: int = -1


def _loc_chain(ref: str, locs: dict, depth=0) -> tuple:
    """((file, line), ...) innermost first, from a TTIR location (``#locN`` or ``loc(...)``)."""
    text = locs.get(ref, ref) if ref.startswith("#") else ref
    if depth > 64:
        return ()
    m = re.match(r'loc\("([^"]+)":(\d+):\d+\)', text)
    if m:
        return ((m.group(1), int(m.group(2))),)
    m = re.match(r'loc\(callsite\((#loc\d*|loc\(.*?\)) at (#loc\d*|loc\(.*?\))\)\)', text)
    if m:
        return _loc_chain(m.group(1), locs, depth + 1) + _loc_chain(m.group(2), locs, depth + 1)
    m = re.match(r'loc\("[^"]*"\((#loc\d*)\)\)', text) or re.match(r'loc\(fused\[(#loc\d*)', text) \
        or re.match(r'loc\((#loc\d*)\)', text)
    if m:
        return _loc_chain(m.group(1), locs, depth + 1)
    return ()


_TT_RES = re.compile(r"^(%[\w.$-]+)(?::\d+)? = ([\w.]+)\s*(.*)$")
_TT_VAL = re.compile(r"%[\w.$#-]+")


def _parse_ttir(ttir: str):
    """(argument names, top-level ops, loops by id): the scalar ops, loops and ifs of the TTIR."""
    locs = {}
    for m in re.finditer(r"^(#loc\d*) = (loc\(.*\))\s*$", ttir, re.M):
        locs[m.group(1)] = m.group(2)
    sig = re.search(r"tt\.func public @\w+\((.*)\)(?: attributes \{[^}]*\})? \{\s*$", ttir, re.M)
    if sig is None:
        return None
    args = re.findall(r"%([\w.$-]+):\s", sig.group(1))
    top: list = []
    stack = [(top, None)]  # (ops list being filled, the op owning it)
    loops = {}
    body = ttir[sig.end():]
    for raw in body.splitlines():
        line = raw.strip()
        if not line or line.startswith("#loc"):
            continue
        if line.startswith("}"):
            if len(stack) == 1:
                break  # the function's end
            ops, owner = stack.pop()
            if owner is not None and owner.kind == "if" and re.match(r"\}\s*else\s*\{", line):
                owner.body.append([])
                stack.append((owner.body[-1], owner))
                continue
            if re.match(r"\}\s*(do|else)\s*\{", line) or line.startswith("}) {") \
                    or re.match(r"\}\)?\s*,\s*\{", line):
                other = _TOp("other")
                stack[-1][0].append(other)
                stack.append((other.body, other))
                continue
            if owner is not None and owner.kind == "for":
                m = re.search(r"(loc\(.*\))\s*$", line)  # the loop's location closes it
                owner.chain = _loc_chain(m.group(1), locs) if m else ()
            continue
        opens = line.endswith("{")
        m = re.search(r"scf\.for (%[\w.$-]+) = (%[\w.$-]+) to (%[\w.$-]+) step (%[\w.$-]+)", line)
        if m and opens:
            op = _TOp("for", iv=m.group(1), args=(m.group(2), m.group(3), m.group(4)), id=len(loops))
            loops[op.id] = op
            stack[-1][0].append(op)
            stack.append((op.body, op))
            continue
        m = re.search(r"scf\.if (%[\w.$#-]+)", line)
        if m and opens:
            op = _TOp("if", args=(m.group(1),), body=[[]])
            stack[-1][0].append(op)
            stack.append((op.body[0], op))
            continue
        if opens:  # any other region (a reduction's combiner, a while loop)
            op = _TOp("other")
            stack[-1][0].append(op)
            stack.append((op.body, op))
            continue
        m = _TT_RES.match(line)
        if not m:
            continue
        res, name, rest = m.groups()
        text = rest.split(" loc(")[0]
        head, _, ty = text.rpartition(" : ")
        if "tensor" in ty or "ptr" in ty or not name.startswith(("arith.", "tt.get_")):
            continue
        attr = ""
        if name == "arith.constant":
            attr = head.strip()
        elif name == "arith.cmpi":
            attr, _, head = head.partition(",")
            attr = attr.strip()
        elif name.startswith("tt.get_"):
            attr = head.strip()
        stack[-1][0].append(_TOp("op", res=res, name=name, args=tuple(_TT_VAL.findall(head)),
                                 attr=attr, type=ty.strip()))
    return args, top, loops


def _wrap(v: int, ty: str) -> int:
    m = re.search(r"\bi(\d+)\b", ty.split(" to ")[-1])
    if not m or isinstance(v, bool):
        return v
    bits = int(m.group(1))
    if bits == 1:
        return int(bool(v))
    v &= (1 << bits) - 1
    return v - (1 << bits) if v >> (bits - 1) else v


def _tdiv(a, b):
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


_CMP = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "slt": lambda a, b: a < b,
        "sle": lambda a, b: a <= b, "sgt": lambda a, b: a > b, "sge": lambda a, b: a >= b,
        "ult": lambda a, b: a < b, "ule": lambda a, b: a <= b, "ugt": lambda a, b: a > b,
        "uge": lambda a, b: a >= b}
_ARITH = {"arith.addi": lambda a, b: a + b, "arith.subi": lambda a, b: a - b,
          "arith.muli": lambda a, b: a * b, "arith.divsi": _tdiv, "arith.divui": lambda a, b: a // b,
          "arith.remsi": lambda a, b: a - _tdiv(a, b) * b, "arith.remui": lambda a, b: a % b,
          "arith.floordivsi": lambda a, b: a // b, "arith.ceildivsi": lambda a, b: -(-a // b),
          "arith.ceildivui": lambda a, b: -(-a // b),
          "arith.minsi": min, "arith.maxsi": max, "arith.minui": min, "arith.maxui": max,
          "arith.andi": lambda a, b: a & b, "arith.ori": lambda a, b: a | b,
          "arith.xori": lambda a, b: a ^ b, "arith.shli": lambda a, b: a << b,
          "arith.shrsi": lambda a, b: a >> b, "arith.shrui": lambda a, b: a >> b}


def _eval_op(op: _TOp, env: dict):
    if op.name == "arith.constant":
        a = op.attr
        if a in ("true", "false"):
            return a == "true"
        try:
            return int(a)
        except ValueError:
            return None
    if op.name in ("tt.get_program_id", "tt.get_num_programs"):
        return env.get(("pid" if op.name == "tt.get_program_id" else "npid", op.attr))
    vals = [env.get(a) for a in op.args]
    if not vals or any(v is None for v in vals):
        return None
    try:
        if op.name in _ARITH and len(vals) == 2:
            return _wrap(_ARITH[op.name](*vals), op.type)
        if op.name == "arith.cmpi":
            return bool(_CMP[op.attr](*vals))
        if op.name == "arith.select" and len(vals) == 3:
            return vals[1] if vals[0] else vals[2]
        if op.name in ("arith.extsi", "arith.extui", "arith.trunci", "arith.index_cast",
                       "arith.index_castui"):
            return _wrap(vals[0], op.type)
    except (ZeroDivisionError, KeyError):
        return None
    return None


def _loops_in(ops) -> list:
    out = []
    for op in ops:
        if op.kind == "for":
            out.append(op)
            out += _loops_in(op.body)
        elif op.kind == "if":
            for region in op.body:
                out += _loops_in(region)
        elif op.kind == "other":
            out += _loops_in(op.body)
    return out


def _walk(ops, env, weight, visit, unknown):
    """Evaluate ``ops`` in ``env``; ``visit(loop id, trips, weight)`` per loop instance."""
    for op in ops:
        if op.kind == "op":
            env[op.res] = _eval_op(op, env)
        elif op.kind == "for":
            lb, ub, st = (env.get(a) for a in op.args)
            if lb is None or ub is None or not st or st < 0:
                unknown.update(lp.id for lp in [op] + _loops_in(op.body))
                continue
            n = max(0, -(-(ub - lb) // st))
            visit(op.id, n, weight)
            inner = _loops_in(op.body)
            if not inner or not n:
                continue
            picks = range(n) if n <= _MAX_ITERS else [
                int((j + 0.5) * n / _MAX_ITERS) for j in range(_MAX_ITERS)]
            w = weight * n / len(picks)
            for j in picks:
                env[op.iv] = lb + j * st
                _walk(op.body, env, w, visit, unknown)
        elif op.kind == "if":
            cond = env.get(op.args[0])
            if cond is None:
                for region in op.body:
                    unknown.update(lp.id for lp in _loops_in(region))
                continue
            region = op.body[0] if cond else (op.body[1] if len(op.body) > 1 else [])
            _walk(region, env, weight, visit, unknown)
        else:
            unknown.update(lp.id for lp in _loops_in(op.body))


_PTX_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)\s+\d+(?:,.*?inlined_at\s+(\d+)\s+(\d+)\s+\d+)?", re.M)


def _ptx_loops(ptx: str) -> list:
    """PTX loops as (line chain of the back edge, Counter of the line chains of the global
    memory instructions in its own body); PTX names at most two levels (a line, its call site)."""
    files = dict(re.findall(r'^\s*\.file\s+(\d+)\s+"([^"]+)"', ptx, re.M))
    items, labels, chain = [], {}, ()
    for line in ptx.splitlines():
        m = _PTX_LOC.match(line)
        if m:
            chain = ((files.get(m.group(1), m.group(1)), int(m.group(2))),)
            if m.group(3):
                chain += ((files.get(m.group(3), m.group(3)), int(m.group(4))),)
            continue
        m = re.match(r"^(\$L__BB\d+_\d+):", line)
        if m:
            labels[m.group(1)] = len(items)
            continue
        s = line.strip()
        if not s or s.startswith(("//", ".", "$", "{", "}")):
            continue
        items.append((s, chain))
    loops = []
    for i, (s, chain) in enumerate(items):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+)", s)
        if m and m.group(1) in labels and labels[m.group(1)] <= i:
            loops.append((labels[m.group(1)], i, chain))
    out = []
    for lo, hi, chain in loops:
        inner = [(a, b) for a, b, _ in loops if (a, b) != (lo, hi) and lo <= a and b <= hi]
        mem = collections.Counter(
            _chain_key(items[j][1])[:2] for j in range(lo, hi + 1)
            if re.search(r"\b(ld|st)\.global", items[j][0])
            and not any(a <= j <= b for a, b in inner))
        out.append((chain, mem))
    return out


def _chain_key(chain: tuple) -> tuple:
    # file names as the basename: the TTIR, PTX and SASS spell a path each their own way
    return tuple((os.path.basename(f), ln) for f, ln in chain)


@dataclass
class LoopCount:
    """Executions per thread of a kernel's SASS: ``counts[i]`` of instruction i (code outside
    loops 1), ``trips[(lo, hi)]`` each SASS loop's trips per program (averaged over the grid),
    ``fallback``: loops whose trips could not be derived from the launch (counted by the bytes
    rule, see ``kernel_row``), each with why."""

    counts: list
    trips: dict
    fallback: dict
    lines: dict = field(default_factory=dict)  # (lo, hi) -> (source line, unroll factor)


def _own_body(lo, hi, loops):
    inner = [(a, b) for a, b in loops if (a, b) != (lo, hi) and lo <= a and b <= hi]
    return [i for i in range(lo, hi + 1) if not any(a <= i <= b for a, b in inner)]


def loop_counts(launch: Launch, c: Compiled, n_instrs: int) -> LoopCount:
    """Per-loop trip counts for the first ``n_instrs`` SASS instructions (see above)."""
    sass = c.sass
    loops = [(lo, hi) for lo, hi in sass.all_loops if hi < n_instrs]
    counts = [1.0] * n_instrs
    trips, fallback = {}, {}
    if not loops:
        return LoopCount(counts, trips, fallback)
    parsed = _parse_ttir(c.ttir) if c.ttir else None
    lines = sass.lines if len(sass.lines) == len(sass.instrs) else [()] * len(sass.instrs)
    own = {lp: _own_body(*lp, loops) for lp in loops}
    if parsed is None:
        for lp in loops:
            fallback[lp] = "no TTIR to evaluate"
        return LoopCount(counts, trips, fallback)
    args, top, tloops = parsed
    by_chain = collections.defaultdict(list)
    for op in tloops.values():
        by_chain[_chain_key(op.chain)].append(op.id)
    # each SASS loop's TTIR loop: the one written at its back edge's source line
    owner = {}
    for lp in loops:
        key = _chain_key(lines[lp[1]]) if lines[lp[1]] else ()
        ids = by_chain.get(key, []) if key else []
        if not ids:  # else the TTIR loop whose line its own instructions carry most often
            seen = collections.Counter(_chain_key(lines[i]) for i in own[lp] if lines[i])
            for k, _ in seen.most_common():
                if by_chain.get(k):
                    ids = by_chain[k]
                    break
        if len(ids) == 1:
            owner[lp] = ids[0]
        else:
            fallback[lp] = ("no source line" if not lines[lp[1]] else
                            f"line {lines[lp[1]][0][1]}: " + ("no TTIR loop there" if not ids
                                                              else "several TTIR loops there"))
    # unroll factors: the SASS loop's copies of the PTX loop's memory instructions (those written
    # at the same lines: copies of a nested loop peeled into its body are not its own)
    ptx = collections.defaultdict(list)
    for chain, m in _ptx_loops(c.ptx):
        ptx[_chain_key(chain)[:2]].append(m)
    siblings = collections.defaultdict(list)
    for lp, tid in owner.items():
        siblings[tid].append(lp)
    factor = {}
    for tid, lps in siblings.items():
        bases = [m for m in ptx.get(_chain_key(tloops[tid].chain)[:2], ()) if m]
        base = min(bases, key=lambda m: sum(m.values())) if bases else None
        for lp in lps:
            copies = sum(1 for i in own[lp] if _is_mem(sass.instrs[i][1])
                         and _chain_key(lines[i])[:2] in base) if base else 0
            if copies:
                factor[lp] = max(1, round(copies / sum(base.values())))
            elif len(lps) > 1:  # no memory: by size against the smallest copy
                factor[lp] = max(1, round(len(own[lp]) / min(len(own[o]) for o in lps)))
            else:
                factor[lp] = 1
        lps.sort(key=lambda lp: -factor[lp])
    env0 = {}
    for i, name in enumerate(args):
        env0["%" + name] = launch.scalars.get(i)
    if len(args) != sum(1 for _ in _nonconstexpr_params(launch)):
        for lp in list(owner):
            fallback[lp] = "TTIR arguments do not match the launch's"
            owner.pop(lp)
    gx, gy, gz = launch.grid
    total = gx * gy * gz
    picks = range(total) if total <= _MAX_PROGRAMS else [
        int((j + 0.5) * total / _MAX_PROGRAMS) for j in range(_MAX_PROGRAMS)]
    acc = collections.Counter()
    unknown: set = set()

    def visit(tid, n, weight):
        for lp in siblings.get(tid, ()):  # the unrolled copies first, the rest to the remainder
            k = factor[lp]
            acc[lp] += weight * (n // k)
            n -= (n // k) * k

    for lin in picks:
        env = dict(env0)
        env[("pid", "x")], env[("pid", "y")], env[("pid", "z")] = (
            lin % gx, (lin // gx) % gy, lin // (gx * gy))
        env[("npid", "x")], env[("npid", "y")], env[("npid", "z")] = gx, gy, gz
        _walk(top, env, 1.0, visit, unknown)
    where = {lp: (tloops[tid].chain[0][1] if tloops[tid].chain else None, factor[lp])
             for lp, tid in owner.items()}
    for lp, tid in owner.items():
        if tid in unknown:
            fallback[lp] = f"line {tloops[tid].chain[0][1] if tloops[tid].chain else '?'}: " \
                           "bounds not known from the launch's arguments"
        else:
            trips[lp] = acc[lp] / len(picks)
    for lp in sorted(loops, key=lambda lp: lp[1] - lp[0], reverse=True):  # outer loops first
        if lp in trips:
            for i in own[lp]:
                counts[i] = trips[lp]
    return LoopCount(counts, trips, fallback, where)


def _nonconstexpr_params(launch: Launch):
    for p in launch.fn.params:
        if p.is_constexpr or launch.signature.get(p.name) == "constexpr":
            continue
        yield p


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
    trips_guessed: bool = False  # some loop's trips came from the bytes rule (see limiter)

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
    bytes_per_thread = total_b / max(ctas * threads, 1)
    lc = loop_counts(launch, c, len(instrs))
    counts = lc.counts
    if lc.fallback:
        # loops whose trips the launch does not give: the bytes each thread moves that the rest
        # of the kernel does not, spread over their bodies (one trip at least); flagged
        known = sum(counts[i] * _width_bits(op) // 8 for i, (_, op, _) in enumerate(instrs)
                    if _is_mem(op) and not any(lo <= i <= hi for lo, hi in lc.fallback))
        body = [i for lo, hi in lc.fallback for i in _own_body(lo, hi, list(lc.fallback))]
        body_bytes = sum(_width_bits(instrs[i][1]) // 8 for i in body if _is_mem(instrs[i][1]))
        guess = max(1.0, (bytes_per_thread - known) / body_bytes) if body_bytes else 1.0
        for i in body:
            counts[i] = guess
    per_thread = sum(counts)
    # bytes in flight: the steady state, the innermost loop bodies that load and run (the most
    # of theirs), else the whole kernel
    running = [(lo, hi) for lo, hi in c.sass.loops if hi < len(instrs) and counts[hi] > 0
               and any(instrs[i][1].startswith("LDG") for i in range(lo, hi + 1))]
    inflight = (max(_inflight_bytes(instrs[lo:hi + 1]) for lo, hi in running) if running
                else _inflight_bytes(instrs))
    sass_per_byte = per_thread / bytes_per_thread if bytes_per_thread else None
    t_bw = total_b / (card.copy_gbps * 1e3)  # us
    inflight_total = min(ctas, slots) * threads * inflight
    t_lat = read_b / (inflight_total / card.latency_ns) / 1e3 if inflight_total else 0.0
    active_sms = min(card.sms, ctas)
    warps_per_sm = min(occ, math.ceil(ctas / card.sms)) * c.num_warps
    issue = active_sms * card.issue_per_sm * min(1.0, warps_per_sm / 4) * card.clock_ghz * 1e3
    t_issue = per_thread * threads * ctas / issue  # us
    mufu = sum(n for n, (_, op, _) in zip(counts, instrs) if op.startswith("MUFU"))
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
               + (", last-program step" if t_last else "")
               + ("".join(f"; trips from bytes at SASS {lo}-{hi} ({why})"
                          for (lo, hi), why in sorted(lc.fallback.items()))),
               trips_guessed=bool(lc.fallback))


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
    guessed = [r for r in rs if r.trips_guessed]
    if guessed:  # never silent: these rows' loop counts are the bytes rule's, not the launch's
        print(f"# {len(guessed)} rows count some loop's trips from bytes (see their limiter): "
              + ", ".join(f"{r.op} {r.case} {r.kernel} {r.direction}" for r in guessed),
              file=sys.stderr)
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
