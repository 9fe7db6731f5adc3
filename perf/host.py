"""``python -m perf --host``: host cost per call, kernel bodies skipped, beside eager PyTorch.

What runs.  Every host step of a tkern call runs as it would on a GPU: argument checks, the op
mechanism's autograd.Function (or torch.library op), plans, allocations, the launchers' argument
lists, and for each kernel launch Triton's own launch front end: the real argument binder
(``create_function_from_signature`` for a CUDA sm_90 backend, the specialisation of every
argument), the kernel-cache key and lookup and the grid's canonicalisation, exactly the steps of
``JITFunction.run`` before the driver call.  Only the kernel body is skipped (and the driver's C
launch, a few us on a GPU, is not counted).  On CPU this is done by ``skip_kernel_bodies``: it
replaces the interpreter's ``InterpretedFunction.run`` (the hook every ``kernel[grid](...)`` goes
through under ``TRITON_INTERPRET=1``) with that front end plus a launch counter.  Outputs are then
uninitialised memory: the figures are host time, not results.

Plans are the GPU's (``tkern._runtime.plan_as_gpu`` for a 132-SM card, as perf.static_cost
records them), so every op takes the launch structure it takes on an H100/H200.

Counts per call and direction, of a repeated call: Triton launches (the hook above), and other
torch kernels (aten ops seen by a TorchDispatchMode, leaving out allocations and views, which
start no kernel).

On a GPU the kernels run (no hook): tkern and eager both run the small shapes, timed with a
synchronisation per round, i.e. launch-bound latency; Triton launches are not counted there.

Eager PyTorch runs the same call for real on CPU tensors of the same rank and channel count but
a small batch and spatial size, so that its kernels take a few us: its figure is host cost plus
those few us (an upper bound of its host cost).  tkern's BatchNorm runs on the case's real shape
(its plan, hence its launches, depend on it), the other ops on the small shape too.  torch ops
that tkern itself starts (the bias gradient's sum, BatchNorm's eval weight-gradient sum) run their
CPU bodies for real.

Host mode runs torch single-threaded and takes large CPU allocations from the heap (``mallopt``),
as a GPU's caching allocator would serve them.  Figures are host-machine dependent: record the
machine with them.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that start no kernel: allocation, views and metadata
_NO_KERNEL = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view",
    "_unsafe_view", "as_strided", "t", "transpose", "permute", "unsqueeze", "squeeze", "select",
    "slice", "unbind", "expand", "alias", "detach", "_reshape_alias", "split", "split_with_sizes",
    "lift_fresh", "unfold", "reshape", "flatten", "movedim", "view_as", "_to_copy_meta",
    "is_same_size", "promote_types", "result_type", "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "set_",
}


class _KernelCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name not in _NO_KERNEL and not func.namespace == "tkern":
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


class _FrontEnd:
    """Triton's launch front end for one kernel: ``JITFunction.run`` up to the driver call."""

    _backend = None

    def __init__(self, interpreted):
        from triton.runtime.jit import JITFunction, create_function_from_signature

        if _FrontEnd._backend is None:
            from triton.backends.compiler import GPUTarget
            from triton.compiler import make_backend
            _FrontEnd._backend = make_backend(GPUTarget("cuda", 90, 32))
        keep = ("do_not_specialize", "do_not_specialize_on_alignment")
        jf = JITFunction(interpreted.fn, **{k: v for k, v in interpreted.kwargs.items()
                                            if k in keep})
        self.binder = create_function_from_signature(jf.signature, jf.params, self._backend)
        self.key_cache: dict = {}
        self.kernel_cache: dict = {}

    def __call__(self, args, grid, kwargs):
        from triton import knobs
        from triton.runtime.jit import compute_cache_key

        kwargs["debug"] = kwargs.get("debug", None) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        bound_args, specialization, options = self.binder(*args, **kwargs)
        key = compute_cache_key(self.key_cache, specialization, options)
        if self.kernel_cache.get(key) is None:
            self.kernel_cache[key] = True  # "compiled" once
        if callable(grid):
            grid = grid(bound_args)
        grid_size = len(grid)
        return (grid[0], grid[1] if grid_size > 1 else 1, grid[2] if grid_size > 2 else 1,
                tuple(bound_args.values()))


class LaunchLog:
    def __init__(self):
        self.launches = 0
        self.names: list[str] = []


@contextlib.contextmanager
def skip_kernel_bodies():
    """Within: every Triton launch runs Triton's front end (binder, cache key, grid) and is
    counted in the yielded ``LaunchLog``; no kernel body runs.  CPU with TRITON_INTERPRET=1 only."""
    from triton.runtime.interpreter import InterpretedFunction

    from tkern import _launch

    log = LaunchLog()
    ends: dict = {}
    original = InterpretedFunction.run

    def counted(name):
        log.launches += 1
        log.names.append(name)

    fast = _launch.HostEmulation(counted)

    def run(self, *args, grid, warmup, **kwargs):
        end = ends.get(self.fn)
        if end is None:
            end = ends[self.fn] = _FrontEnd(self)
        # tkern's GPU launch path: Triton's front end on a launch signature's first call, then
        # tkern's own key and lookup (tkern._launch)
        fast.launch(self, args, grid, kwargs, lambda: end(args, grid, dict(kwargs)))
        log.launches += 1
        log.names.append(self.fn.__name__)

    InterpretedFunction.run = run
    previous, _launch.EMULATION = _launch.EMULATION, fast
    try:
        yield log
    finally:
        InterpretedFunction.run = original
        _launch.EMULATION = previous


@contextlib.contextmanager
def gpu_like_plans(sm_count: int = 132):
    """Every op plans its launches as on a card of ``sm_count`` SMs (``rt.plan_as_gpu``, what
    perf.static_cost records): BatchNorm's grids and one-launch plans, dropout's bias-gradient
    partial rows, LRN's kernel choice."""
    from tkern import _runtime as rt
    from tkern.ops import _op

    _op.clear_plan_caches()  # plans, and the launch sites and programs made from them
    try:
        with rt.plan_as_gpu(sm_count):
            yield
    finally:
        _op.clear_plan_caches()


class Case:
    """One call: ``make(shape, ours)`` -> (fn, input needing grad).  tkern runs on ``shape`` (its
    plans, hence its launches, depend on it); eager PyTorch on ``tiny``, where its CPU kernels
    cost least (see the module docstring).  Targets (issue 13): ``ratio``, the most tkern's
    fwd+bwd host µs may be of eager's (None: none); ``kernels``, the most kernels tkern may
    start per call (forward, backward), Triton's and torch's together."""

    def __init__(self, name: str, make: Callable, shape: tuple, tiny: tuple,
                 ratio: float | None = None, kernels: tuple = (1, 1)):
        self.name, self.make, self.shape, self.tiny = name, make, shape, tiny
        self.ratio, self.kernels = ratio, kernels


# torch kernels only the CPU path starts: CPU tensors draw dropout's seed as a CPU tensor
# (torch.randint); CUDA ones read and advance the generator's host-side state (tkern/ops/_rng.py)
_CPU_ONLY = frozenset(("randint",))


def verdict(case: "Case", row: dict) -> tuple[bool, str]:
    """(met, what is over) of a measured row against ``case``'s targets."""
    over = []
    t = row["tkern"]
    for direction, most in zip(("fwd", "bwd"), case.kernels):
        launches, others = t["counts"][direction]
        n = launches + sum(1 for name in others if name not in _CPU_ONLY)
        if n > most:
            over.append(f"{direction} {n} > {most} kernels")
    ratio = t["full_us"] / row["eager"]["full_us"]
    if case.ratio is not None and ratio > case.ratio:
        over.append(f"{ratio:.2f}x > {case.ratio:.1f}x")
    return not over, "; ".join(over)


def _bn_case(activation, training):
    def make(shape, ours):
        import tkern
        C = shape[1]
        if ours:
            m = tkern.nn.BatchNorm2d(C, activation=activation)
            fn = m
        else:
            bn = torch.nn.BatchNorm2d(C)
            m = bn
            fn = (lambda t: torch.relu(bn(t))) if activation == "relu" else bn
        m.train(training)
        x = torch.randn(shape, requires_grad=True)
        return fn, x
    return make


def _dropout_case(bias):
    def make(shape, ours):
        import tkern
        x = torch.randn(shape, requires_grad=True)
        b = torch.randn(shape[-1], requires_grad=True) if bias else None
        if ours:
            fn = lambda t: tkern.activation_dropout(t, "gelu", 0.1, bias=b)  # noqa: E731
        elif bias:
            fn = lambda t: F.dropout(F.gelu(t + b), 0.1)  # noqa: E731
        else:
            fn = lambda t: F.dropout(F.gelu(t), 0.1)  # noqa: E731
        fn.leaves = (b,) if bias else ()  # other tensors getting a gradient
        return fn, x
    return make


def _lrn_make(shape, ours):
    import tkern
    x = torch.randn(shape, requires_grad=True)
    if ours:
        return (lambda t: tkern.local_response_norm(t, 5)), x
    return (lambda t: F.local_response_norm(t, 5)), x


def _wn_make(shape, ours):
    import tkern
    v = torch.randn(shape, requires_grad=True)
    g = torch.rand(shape[0], 1, requires_grad=True) + 0.5
    g = g.detach().requires_grad_()
    if ours:
        fn = lambda t: tkern.weight_norm(t, g, 0)  # noqa: E731
    else:
        fn = lambda t: torch._weight_norm(t, g, 0)  # noqa: E731
    fn.leaves = (g,)
    return fn, v


# eager's tiny shapes keep the rank and the kind of call; its host cost does not depend on the
# sizes on a GPU, its CPU kernels here do (BatchNorm's per channel, dropout's Bernoulli draw per
# element), so the smallest shapes give the tightest bound on its host cost
# (targets: BatchNorm training <= 2 kernels each way, 1 where a channel fits one program's
# cache, as at 7x7; a bias gradient may take a second backward kernel)
CASES = [
    Case("BatchNorm2d(2048)+relu train", _bn_case("relu", True), (32, 2048, 7, 7), (2, 8, 2, 2),
         ratio=1.0),
    Case("BatchNorm2d(64)+relu train", _bn_case("relu", True), (32, 64, 56, 56), (2, 8, 2, 2),
         ratio=1.0, kernels=(2, 2)),
    Case("BatchNorm2d(2048) eval", _bn_case(None, False), (32, 2048, 7, 7), (2, 8, 2, 2)),
    # tkern on a small shape too: with GPU plans its launches are a large shape's (the bias
    # gradient in partial rows, added up by the kernel's last programs)
    Case("activation_dropout gelu p=0.1 +bias", _dropout_case(True), (16, 1024), (2, 8),
         ratio=1.0, kernels=(1, 2)),
    Case("activation_dropout gelu p=0.1", _dropout_case(False), (16, 1024), (2, 8), ratio=1.0),
    Case("local_response_norm size 5", _lrn_make, (2, 96, 9, 9), (1, 8, 2, 2), ratio=1.0),
    Case("weight_norm dim 0", _wn_make, (256, 256), (8, 8), kernels=(2, 2)),
]


def _time_us(steps: list, reps: int, rounds: int = 15) -> list:
    """For each step, the least over rounds of the mean time per call, in us.  The steps take
    turns round by round (tkern's and eager's, forward and forward+backward), so that a
    disturbed stretch of a shared machine hits all of them alike; synchronised on a GPU (there
    the figure is launch-bound latency)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for step in steps:
        step()
        step()
    best = [float("inf")] * len(steps)
    for _ in range(rounds):
        for i, step in enumerate(steps):
            sync()
            t0 = time.perf_counter()
            for _ in range(reps):
                step()
            sync()
            best[i] = min(best[i], (time.perf_counter() - t0) / reps * 1e6)
    return best


def _prepare(case: Case, ours: bool, log: "LaunchLog"):
    """(forward step, forward+backward step, counts per direction; launches from ``log``)."""
    gpu = torch.cuda.is_available()
    shape = case.shape if ours and not gpu else case.tiny
    with torch.device("cuda" if gpu else "cpu"):
        fn, x = case.make(shape, ours)
        dy = torch.randn(shape)
        if isinstance(fn, torch.nn.Module):
            fn.to(x.device)

    def fwd():
        return fn(x)

    leaves = [x, *(fn.parameters() if isinstance(fn, torch.nn.Module)
                   else getattr(fn, "leaves", ()))]

    def full():
        for t in leaves:  # no accumulation kernel: autograd hands its gradients over
            t.grad = None
        fn(x).backward(dy)

    full()  # the counts are a repeated call's, as the timing (a first call also makes plans)
    for t in leaves:
        t.grad = None
    return fwd, full, _counts(fn, x, dy, log)


def _counts(fn, x, dy, log) -> dict:
    n0 = log.launches
    with _KernelCounter() as k:
        y = fn(x)
    counts = {"fwd": (log.launches - n0, list(k.ops))}
    n0 = log.launches
    with _KernelCounter() as k:
        y.backward(dy)
    counts["bwd"] = (log.launches - n0, list(k.ops))
    return counts


def _measure_pair(case: Case, reps: int, rounds: int) -> tuple[dict, dict]:
    gpu = torch.cuda.is_available()
    ctx = contextlib.nullcontext(LaunchLog()) if gpu else skip_kernel_bodies()
    with ctx as log:
        t_fwd, t_full, t_counts = _prepare(case, True, log)
        e_fwd, e_full, e_counts = _prepare(case, False, log)
        times = _time_us([t_fwd, t_full, e_fwd, e_full], reps, rounds)
    return (dict(fwd_us=times[0], full_us=times[1], counts=t_counts),
            dict(fwd_us=times[2], full_us=times[3], counts=e_counts))


class _Floor(torch.autograd.Function):
    """A Python autograd op that only allocates: what any op written as an autograd.Function
    pays per call before its first launch (the engine's Python node, saving, ``.backward``)."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w, b)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        x, w, b = ctx.saved_tensors
        return torch.empty_like(x), torch.empty_like(w), torch.empty_like(b)


def _floor_us(reps: int, rounds: int) -> tuple[float, float]:
    x = torch.randn(2, 8, 2, 2, requires_grad=True)
    w, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    dy = torch.randn_like(x)

    def full():
        x.grad = w.grad = b.grad = None
        _Floor.apply(x, w, b).backward(dy)

    fwd, both = _time_us([lambda: _Floor.apply(x, w, b), full], reps, rounds)
    return fwd, both


def _bare_bn_us(reps: int, rounds: int, log) -> tuple[float, float, float]:
    """BatchNorm2d(2048)+relu's own program (``programs.make``: the same allocations and
    launches) in the leanest Python autograd.Function: no module, no argument checks, no
    checked-call key, no op mechanism.  (fwd, fwd+bwd, eager's fwd+bwd in the same rounds) in
    us: how far the public call is from what any Python Function calling these launches pays."""
    import tkern
    from tkern.ops.batch_norm import autograd as bn_autograd, programs

    gpu = torch.cuda.is_available()
    case = CASES[0]
    with torch.device("cuda" if gpu else "cpu"):
        shape = case.tiny if gpu else case.shape
        m = tkern.nn.BatchNorm2d(shape[1], activation="relu")
        x = torch.randn(shape, requires_grad=True)
        dy = torch.randn(shape)
    w, b = m.weight, m.bias
    rest = (m.running_mean, m.running_var, m.num_batches_tracked, None)
    cfg = bn_autograd.BatchNormConfig(1e-5, True, 0.1, "relu", 0.01, 1.0)
    prog = programs.make((x, w, b, *rest), cfg)

    class Bare(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, b):
            y, stats = prog.forward(cfg, x, w, b, *rest)
            ctx.save_for_backward(x, w, b, stats)
            return y

        @staticmethod
        def backward(ctx, dy):
            x, w, b, stats = ctx.saved_tensors
            return prog.backward((dy,), (x, w, b, None, None, None, stats), cfg,
                                 (True, True, True, False))[:3]

    apply = super(torch.autograd.Function, Bare).apply  # the C++ apply, as tkern's op

    def full():
        x.grad = w.grad = b.grad = None
        apply(x, w, b).backward(dy)

    e_fwd, e_full, _ = _prepare(case, False, log)
    full()
    fwd, both, eager = _time_us([lambda: apply(x, w, b), full, e_full], reps, rounds)
    return fwd, both, eager


def _cached_cpu_allocations() -> None:
    """Large CPU tensors from the heap rather than fresh mmaps (glibc ``mallopt``): close to a
    GPU's caching allocator, so that allocating tkern's full-size outputs costs what it costs
    there, not page-table work per call.  Linux/glibc only; elsewhere a no-op."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 31 - 1)
    except (OSError, AttributeError):
        pass


def run(reps: int = 40, cases=None, out=print, rounds: int = 25) -> list[dict]:
    """Measure every case (tkern and eager) and print one table; returns the rows."""
    import platform

    rows = []
    _cached_cpu_allocations()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # host cost, not intra-op parallelism (and no spinning threads)
    try:
        # on a GPU its own plans; on CPU a 132-SM card's
        plans = contextlib.nullcontext() if torch.cuda.is_available() else gpu_like_plans()
        with plans:
            for case in cases or CASES:
                ours, theirs = _measure_pair(case, reps, rounds)
                row = dict(case=case.name, shape=case.shape, tkern=ours, eager=theirs)
                row["met"], row["over"] = verdict(case, row)
                rows.append(row)
            bare = None
            if any(case is CASES[0] for case in cases or CASES):
                ctx = (contextlib.nullcontext(LaunchLog()) if torch.cuda.is_available()
                       else skip_kernel_bodies())
                with ctx as log:
                    bare = _bare_bn_us(reps, rounds, log)
        floor = _floor_us(reps, rounds)
    finally:
        torch.set_num_threads(threads)
    out(f"host cost per call (us), kernel bodies skipped; {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, triton {__import__('triton').__version__}; "
        f"tkern on the shape shown, eager on a tiny shape (its CPU kernels run); "
        f"least of {rounds} interleaved rounds of {reps} calls")
    head = (f"{'case':38s} {'shape':>18s} | {'tkern fwd':>9s} {'fwd+bwd':>8s} {'launch f/b':>10s}"
            f" {'other torch f / b':28s} | {'eager fwd':>9s} {'fwd+bwd':>8s} | ratio | target")
    out(head)
    out("-" * len(head))
    for r in rows:
        t, e = r["tkern"], r["eager"]
        (lf, of), (lb, ob) = t["counts"]["fwd"], t["counts"]["bwd"]
        other = f"{','.join(of) or '-'} / {','.join(ob) or '-'}"
        out(f"{r['case']:38s} {str(tuple(r['shape'])):>18s} | {t['fwd_us']:9.1f} {t['full_us']:8.1f}"
            f" {f'{lf} / {lb}':>10s} {other:28s} | {e['fwd_us']:9.1f} {e['full_us']:8.1f} |"
            f" {t['full_us'] / e['full_us']:.2f}x | {'met' if r['met'] else 'OVER: ' + r['over']}")
    if bare is not None:
        out(f"bare: {CASES[0].name}'s own program in a minimal Python autograd.Function (no "
            f"module, checks or key): {bare[0]:.1f} / {bare[1]:.1f} us fwd / fwd+bwd, "
            f"{bare[1] / bare[2]:.2f}x eager's {bare[2]:.1f} in the same rounds")
    out(f"floor: a Python autograd.Function that only allocates (3 inputs): {floor[0]:.1f} / "
        f"{floor[1]:.1f} us fwd / fwd+bwd, paid by every op written as one")
    return rows
