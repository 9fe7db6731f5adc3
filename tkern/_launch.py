"""tkern's kernel launch path: Triton's launch without its per-call binder.

``kernel[grid](*args)`` on a ``triton.jit`` function binds every argument, specialises each one
(pointer alignment, integers equal to 1 or divisible by 16, their width), builds a cache key from
that and the options, and looks the compiled kernel up: about 0.3 us per argument plus the key,
5-25 us per launch with tkern's 15-40 arguments.  Kernels declared with ``@jit`` (this module)
do that once per *launch signature* and then find the compiled kernel by a cheaper key:

- a tensor contributes its dtype and whether its address is 16-byte aligned (all Triton
  specialises a pointer on);
- an integer declared ``do_not_specialize`` contributes only its width class (i32 / i64 / u64,
  what Triton still distinguishes), so a per-call seed does not miss the cache;
- a float contributes its type only (Triton passes every float as an fp32 argument);
- every other argument contributes its value and type: never coarser than Triton's
  specialisation (which keeps only ``== 1`` / ``% 16`` of an int), so one key never maps two
  Triton variants to one entry.  Plans make those values repeat from call to call.

On a hit the compiled kernel's own launcher is called with exactly the arguments and launch
parameters ``JITFunction.run`` would pass (the bound arguments in signature order, defaults
filled in).  Whatever this key cannot see goes through Triton's own ``run``: warm-up, callable
grids, active launch hooks (profilers), and the first launch of each key (which compiles).

Under ``TRITON_INTERPRET=1`` ``triton.jit`` returns the interpreter's function and ``@jit`` leaves
it as it is (the interpreter has no launcher to call); ``perf.host`` replays this module's key
and lookup there (``HostEmulation``) to measure the GPU path's host cost on CPU.
"""

from __future__ import annotations

import importlib
import inspect as _inspect
import os
import weakref

import torch
import triton

_Tensor = torch.Tensor
# TKERN_TRITON_LAUNCH=1 (read at import): every launch through Triton's own run, for comparison
_TRITON_ONLY = os.environ.get("TKERN_TRITON_LAUNCH", "0") not in ("", "0")
_I32 = 1 << 31
_U64 = 1 << 63
_CACHE_LIMIT = 1024  # entries per kernel and device: plans repeat, garbage (NaN scalars) must not grow


def _width(v):
    """The class Triton still tells apart for an unspecialised int (its kernel argument type)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return ("int", v >= _I32 or v < -_I32, v >= _U64)
    return v


def launch_key(args: tuple, kwargs: dict, info: "_Params") -> tuple:
    """The cache key of one launch (see the module docstring)."""
    toks = [(a.dtype, not a.data_ptr() & 15) if isinstance(a, _Tensor)
            else (a if a.__class__ is not float else None) for a in args]
    n = len(args)
    for i in info.const_pos:  # a constexpr float is specialised on its value
        if i < n:
            toks[i] = args[i]
    for i in info.dns_pos:
        if i < n:
            toks[i] = _width(toks[i])
    for k, v in kwargs.items():
        if isinstance(v, _Tensor):
            v = (v.dtype, not v.data_ptr() & 15)
        elif k in info.dns_names:
            v = _width(v)
        elif v.__class__ is float and k in info.runtime_names:
            v = None
        toks.append((k, v))
    toks.append(tuple(map(type, args)))
    toks.append(tuple(map(type, kwargs.values())))
    return tuple(toks)


class Entry:
    """A compiled kernel and how to build its launcher's argument list from a call."""

    __slots__ = ("kernel", "launcher", "function", "packed", "rest")

    def __init__(self, kernel, params, n_args: int, kwargs: dict):
        self.kernel = kernel
        # parameters after the positional ones, in signature order: (name, default)
        self.rest = tuple((p.name, p.default) for p in params[n_args:])
        for name, default in self.rest:
            if name not in kwargs and default is _EMPTY:
                raise TypeError(f"missing kernel argument {name!r}")
        self.launcher = self.function = self.packed = None

    def bind(self):
        """Launcher, function handle and metadata: valid once the kernel has been loaded (after
        its first launch)."""
        k = self.kernel
        self.launcher = k.run  # a property: loads the module on first use
        self.function, self.packed = k.function, k.packed_metadata

    def full_args(self, args: tuple, kwargs: dict) -> tuple:
        return (*args, *[kwargs.get(name, default) for name, default in self.rest])


_EMPTY = _inspect.Parameter.empty


class _Params:
    """A kernel's parameter list as ``Entry`` needs it (name, default), and its
    do_not_specialize positions and names."""

    def __init__(self, pyfn, dns):
        sig = _inspect.signature(pyfn)
        self.params = [_P(n, p.default) for n, p in sig.parameters.items()]
        dns = dns or ()
        names = [p.name for p in self.params]
        pos = {d if isinstance(d, int) else names.index(d) for d in dns}
        self.dns_pos = tuple(sorted(pos))
        self.dns_names = frozenset(names[i] for i in pos)
        const = [_is_constexpr(p.annotation) for p in sig.parameters.values()]
        self.const_pos = tuple(i for i, c in enumerate(const) if c)
        self.runtime_names = frozenset(n for n, c in zip(names, const) if not c)


def _is_constexpr(annotation) -> bool:
    """As Triton reads a parameter's annotation (the object, or its text under
    ``from __future__ import annotations``)."""
    if annotation is _EMPTY:
        return False
    return annotation is triton.language.constexpr or "constexpr" in str(annotation)


class _P:
    __slots__ = ("name", "default")

    def __init__(self, name, default):
        self.name, self.default = name, default


def _hooks_idle() -> bool:
    knobs = _RUNTIME_KNOBS
    enter, exit_ = knobs.launch_enter_hook, knobs.launch_exit_hook
    return ((enter is None or not getattr(enter, "calls", True))
            and (exit_ is None or not getattr(exit_, "calls", True)))


_JIT = triton.runtime.jit.JITFunction
_TRITON_RUN = _JIT.run
_RUNTIME_KNOBS = importlib.import_module("triton.knobs").runtime  # launch hooks live here


def _own_path() -> bool:
    """Whether tkern may call launchers itself: Triton's ``run`` is not replaced (perf.static_cost
    records launches that way, on CPU tensors) and no launch hook (a profiler) is active."""
    return _JIT.run is _TRITON_RUN and _hooks_idle()


class _FastJIT(_JIT):
    """A ``JITFunction`` whose launches after the first of each key skip Triton's binder."""

    def run(self, *args, grid, warmup, **kwargs):
        if warmup or callable(grid) or not _own_path():
            return super().run(*args, grid=grid, warmup=warmup, **kwargs)
        info = self._tk_params
        device = torch.cuda.current_device()
        cache = self._tk_cache.get(device)
        if cache is None:
            cache = self._tk_cache[device] = {}
        key = launch_key(args, kwargs, info)
        entry = cache.get(key)
        if entry is None:
            kernel = super().run(*args, grid=grid, warmup=False, **kwargs)
            if kernel is not None:
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                entry = Entry(kernel, info.params, len(args), kwargs)
                entry.bind()
                cache[key] = entry
            return kernel
        n = len(grid)
        entry.launcher(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1,
                       torch._C._cuda_getCurrentRawStream(device), entry.function, entry.packed,
                       None, None, None, *entry.full_args(args, kwargs))
        return entry.kernel


def jit(fn=None, **options):
    """``triton.jit`` for kernels tkern launches: the same function, launched through the cached
    path above when compiled (unchanged under the interpreter).  Helpers called from kernels stay
    plain ``triton.jit``."""
    if fn is None:
        return lambda f: jit(f, **options)
    k = triton.jit(fn, **options)
    if type(k) is _JIT and not _TRITON_ONLY:
        k.__class__ = _FastJIT
        k._tk_params = _Params(k.fn, k.do_not_specialize)
        k._tk_cache = {}
        _KERNELS.add(k)
    return k


def clear_cache() -> None:
    """Forget every cached launch signature (after changing Triton's debug or instrumentation
    knobs, which the key does not read)."""
    for k in _KERNELS:
        k._tk_cache.clear()


_KERNELS: "weakref.WeakSet[_FastJIT]" = weakref.WeakSet()


def _tokens(tensors: tuple) -> tuple:
    return tuple([(t.dtype, not t.data_ptr() & 15) for t in tensors])


def all_aligned(*tensors) -> bool:
    """Whether every tensor (None skipped) starts at a 16-byte aligned address: what Triton
    specialises pointers on (``Site.aligned``)."""
    bits = 0
    for t in tensors:
        if t is not None:
            bits |= t.data_ptr()
    return not bits & 15


def _aligned_key(device: int, tensors: tuple):
    """A fixed-dtype site's key: the device when every address is 16-byte aligned (fresh
    allocations always are), else which ones are."""
    bits = 0
    for t in tensors:
        bits |= t.data_ptr()
    if not bits & 15:
        return device
    return (device, *[not t.data_ptr() & 15 for t in tensors])


class Site:
    """One launch of one plan, everything fixed but the tensors: ``Site(kernel, grid, tail,
    named, live, **kwargs)(*tensors, *values)`` launches ``kernel[grid](*lead, *tail, **kwargs,
    **dict(zip(named + live, rest)))``: the last ``len(named)`` tensors go by keyword (optional
    tensor parameters late in the signature), the others lead; ``live`` names parameters whose
    values change from call to call (a dropout seed: ``do_not_specialize`` integers of one width,
    which Triton's specialisation does not see), passed last and left out of the key.

    Ops keep a Site per plan (a plan is cached by the inputs' metadata and the config, so its
    grid, integers, flags and scalars are fixed): a call then costs the tensors' dtype and
    alignment, one lookup and the compiled launcher's call, with the full argument list built
    once per variant.  The first launch of each variant goes through ``kernel[grid]``.
    ``fixed_dtypes()`` gives the same launch for a caller whose calls always pass the same
    dtypes (an op's program, whose signature fixes them): keyed by alignment alone."""

    __slots__ = ("kernel", "grid", "tail", "kwargs", "named", "live", "fixed", "_entries",
                 "_aligned_hit", "__weakref__")

    def __init__(self, kernel, grid: tuple, tail: tuple = (), named: tuple = (), live: tuple = (),
                 **kwargs):
        self.kernel, self.tail, self.named, self.kwargs = kernel, tuple(tail), tuple(named), kwargs
        self.live = tuple(live)
        n = len(grid)
        self.grid = (grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1)
        self.fixed = False
        self._entries: dict = {}
        # a fixed site's entry for aligned tensors without named ones: (compiled, device,
        # launcher, grid x 3, function, packed, rest), what ``aligned`` calls without a lookup
        self._aligned_hit = None

    def fixed_dtypes(self) -> "Site":
        site = Site(self.kernel, self.grid, self.tail, self.named, self.live, **self.kwargs)
        site.fixed = True
        return site

    def _split(self, args):
        by_name = (*self.named, *self.live)
        k = len(args) - len(by_name)
        return args[:k], dict(self.kwargs, **dict(zip(by_name, args[k:])))

    def _rest(self, params, n_lead: int) -> tuple:
        """(values of the parameters after the tail, slots of the named tensors and the live
        values among them)."""
        by_name = (*self.named, *self.live)
        lead_and_tail = n_lead + len(self.tail)
        entry = Entry(None, params, lead_and_tail, dict.fromkeys((*self.kwargs, *by_name)))
        names = [name for name, _ in entry.rest]
        values = tuple(entry.full_args((), self.kwargs))
        return values, tuple(names.index(n) for n in by_name)

    def __call__(self, *args):
        self._launch(args, False)

    def aligned(self, *args):
        """``self(*args)`` for a caller that has checked (``all_aligned``) that every tensor
        argument it did not allocate itself is 16-byte aligned (fresh allocations are): a
        ``fixed_dtypes`` site is then keyed by the device alone, its tensors unread."""
        hit = self._aligned_hit
        knobs = _RUNTIME_KNOBS  # _own_path, inlined: this runs on every launch of a program
        enter, exit_ = knobs.launch_enter_hook, knobs.launch_exit_hook
        if (hit is not None and _JIT.run is _TRITON_RUN
                and (enter is None or not getattr(enter, "calls", True))
                and (exit_ is None or not getattr(exit_, "calls", True))):
            compiled, device, launcher, g0, g1, g2, function, packed, rest = hit
            if compiled:
                if torch._C._cuda_getDevice() == device:
                    launcher(g0, g1, g2, torch._C._cuda_getCurrentRawStream(device), function,
                             packed, None, None, None, *args, *rest)
                    return
            elif EMULATION is not None and EMULATION.active:
                launcher(g0, g1, g2, 0, function, packed, None, None, None, *args, *rest)
                return
        self._launch(args, self.fixed)

    def _launch(self, args, aligned):
        compiled = self.kernel.__class__ is _FastJIT
        emulated = not compiled and EMULATION is not None and EMULATION.active
        if (compiled or emulated) and _JIT.run is _TRITON_RUN and _hooks_idle():  # _own_path
            # the hit path, also what perf.host measures on CPU (device -1, no launcher)
            # a CUDA tensor exists, so CUDA is initialised: the device query without the checks
            device = torch._C._cuda_getDevice() if compiled else -1
            if aligned:
                key = device  # what _aligned_key gives for aligned tensors
            else:
                tensors = args[:len(args) - len(self.live)] if self.live else args
                key = (_aligned_key(device, tensors) if self.fixed
                       else (device, *_tokens(tensors)))
            hit = self._entries.get(key)
            if hit is not None:
                launcher, function, packed, rest, slots = hit  # rest: tail and the rest
                if slots:
                    k = len(args) - len(slots)
                    rest = list(rest)
                    for slot, t in zip(slots, args[k:]):
                        rest[slot] = t
                    args = args[:k]
                g = self.grid
                launcher(g[0], g[1], g[2],
                         torch._C._cuda_getCurrentRawStream(device) if compiled else 0, function,
                         packed, None, None, None, *args, *rest)
                return
            lead, kwargs = self._split(args)
            kernel = self.kernel[self.grid](*lead, *self.tail, **kwargs)
            if compiled and kernel is None:
                return
            rest, slots = self._rest(_params(self.kernel).params, len(lead))
            n_tail = len(self.tail)
            rest, slots = (*self.tail, *rest), tuple(n_tail + slot for slot in slots)
            if compiled:
                entry = Entry(kernel, (), 0, {})
                entry.bind()
                made = (entry.launcher, entry.function, entry.packed, rest, slots)
            else:
                made = (_emulated_launch, self.kernel.fn.__name__, None, rest, slots)
            self._entries[key] = made
            if self.fixed and key == device and not slots:
                launcher, function, packed, rest = made[:4]
                self._aligned_hit = (compiled, device, launcher, *self.grid, function, packed,
                                     rest)
            return
        lead, kwargs = self._split(args)
        self.kernel[self.grid](*lead, *self.tail, **kwargs)


def _params(kernel) -> "_Params":
    info = getattr(kernel, "_tk_params", None)
    if info is None:  # an interpreted kernel (perf.host's emulation)
        info = kernel._tk_params = _Params(kernel.fn, kernel.kwargs.get("do_not_specialize"))
    return info


def _emulated_launch(g0, g1, g2, stream, name, *args):
    """Where a compiled launcher (C, a few us on a GPU, not counted) would run."""
    EMULATION.counted(name)


# set by ``perf.host`` while it measures: interpreted launches replay the GPU path's host steps
EMULATION = None


class HostEmulation:
    """The hit paths of ``_FastJIT.run`` and ``Site`` for interpreted kernels, without a kernel:
    ``perf.host`` calls ``launch(fn, args, grid, kwargs, first)`` in place of the interpreter
    (``first()`` stands in for Triton's own run, its binder, on a key's first launch); Sites
    take their own hit path (device -1, no launcher) and tell ``counted(name)`` of every launch
    they make without the interpreter."""

    def __init__(self, counted=None):
        self.caches: dict = {}
        self.params: dict = {}
        self.counted = counted or (lambda name: None)
        self.active = True

    def _info(self, fn):
        info = self.params.get(fn.fn)
        if info is None:
            info = self.params[fn.fn] = _Params(fn.fn, fn.kwargs.get("do_not_specialize"))
        return info

    def launch(self, fn, args, grid, kwargs, first):
        info = self._info(fn)
        cache = self.caches.setdefault(fn.fn, {})
        key = launch_key(args, kwargs, info)
        entry = cache.get(key)
        if entry is None:
            first()
            cache[key] = Entry(None, info.params, len(args), kwargs)
            return
        n = len(grid)
        _no_launcher(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, 0, None, None,
                     None, None, None, *entry.full_args(args, kwargs))


def _no_launcher(*args):
    """Where the compiled launcher (C, a few us on a GPU, not counted) would run."""
