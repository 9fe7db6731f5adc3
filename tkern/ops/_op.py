"""One mechanism for every op: an op declares its parts once, this module builds the plumbing.

An op module keeps its kernels, its launch plan and launchers, and one declaration::

    OP = Op("tkern::local_response_norm", inputs=("x",), outputs=("y",), config=LrnConfig,
            forward=_forward, fake=_forward_fake, saves=("x",), grads=("x",),
            backward=_backward, backward_fake=_backward_fake, composite=_composite)

and its public function checks arguments, builds the config record and calls ``OP.apply``.
From the declaration ``Op`` builds:

- the eager autograd path.  Two ``autograd.Function`` classes: an old-style one (``forward(ctx,
  ...)``) launched through the C++ ``_FunctionBase.apply`` directly, whose tensor arguments are
  only the ``grads`` inputs (the rest travel in one tuple), and a ``setup_context`` one, taking
  every input, for torch.func transforms and for dynamo where there are no custom ops.
  ``Function.apply`` with ``setup_context`` binds every call through ``inspect.signature``
  (10-20 us); the old style skips that, so it is taken whenever no functorch transform is
  active.
- the ``torch.library`` custom ops ``<name>`` and ``<name>_backward`` with fake implementations
  and ``register_autograd``, used under ``torch.compile`` (``torch.compiler.is_compiling()``).
  Inputs an op mutates (BatchNorm's running stats) are updated in place on the eager path; the
  custom op, which must be functional to carry a gradient, returns their new values instead and
  ``apply`` copies them back (a graph-level mutation torch.compile understands).
- the create_graph (double backward) path: with grad mode on inside backward, the op's
  ``composite`` (its forward in torch ops, from the saved tensors) is differentiated with
  ``create_graph=True``; first-order backward always runs the op's ``backward`` launcher.
- the non-differentiable outputs (``aux``: saved statistics) stay inside the eager path: its
  Function returns the differentiable outputs only and saves the aux ones as intermediates (an
  output autograd tracks costs host time on every call); the torch.func and torch.compile paths
  return them marked non-differentiable.  ``apply`` and ``run`` give the differentiable outputs
  on every path.  Gradients are not materialised (``set_materialize_grads(False)``).
- arity: ``apply`` checks the number of inputs; backward results are padded to the inputs.
- programs (optional, the host fast path): ``program(inputs, cfg)`` returns an object with
  ``forward(cfg, *inputs) -> outputs`` and ``backward(douts, saved, cfg, needs) -> grads`` (or
  None to take the op's ``backward``), everything that depends only on the inputs' metadata and
  the config (plans, launch sites, which outputs to allocate) prepared once; or None where the
  op's plain ``forward`` / ``backward`` must run.  ``apply`` keeps them per
  ``signature(inputs)`` and ``program_key(cfg)`` (default: the whole config; dropout leaves out
  its per-call seed); a public function that caches its own checks per signature hands one to
  ``run`` (only programs ``program`` made: it gives each its ``tk_saves`` picker, what the
  eager Function saves for it without a per-call lookup).

Declaration contract (``inputs`` are tensors, ``?`` marks an optional one; ``cfg`` is an instance
of ``config``, a NamedTuple whose annotated fields become the custom ops' scalar arguments):

- ``forward(*inputs, cfg) -> tuple`` of the ``outputs``, running the kernels;
- ``fake(*inputs, cfg) -> tuple``: the same outputs' metadata (shapes, dtypes, strides);
- ``saves``: names of inputs and outputs autograd keeps for backward, in that order
  (``save_when``: name -> predicate of the config, None saved in its place when it fails);
- ``grads``: names of the inputs that can get a gradient;
- ``backward(douts, saved, cfg, needs) -> tuple`` aligned with ``grads`` (None where not
  needed); ``douts`` holds one gradient (or None) per differentiable output, ``needs`` one bool
  per ``grads`` entry;
- ``backward_fake``: the same, metadata only;
- ``composite(saved, cfg)``: the differentiable outputs from torch ops, for double backward
  (without one, backward under create_graph=True runs the kernels: a graph-less gradient);
- ``library=False``: no custom ops (a config that cannot travel through a schema, such as a
  process group); then ``fake``/``backward_fake`` are not needed;
- ``eager(*inputs, cfg)`` (optional): the CPU fallback without Triton's interpreter, for
  ``Op.__call__``.

Shared launch helpers also live here: ``PlanCache``, ``f32_pairs``, ``num_warps_for``, ``cdiv``,
and for call sites that remember their last checked call (modules): ``tensor_guard``,
``call_state``.
"""

from __future__ import annotations

import functools
import operator
import typing
import weakref
from typing import Callable, NamedTuple, Optional

import torch

from .. import _runtime as rt

# ----------------------------------------------------------------------------------------------
# shared launch helpers


def cdiv(a: int, b: int) -> int:
    """Ceil division in plain integers (``triton.cdiv`` is a jit function: slow to call)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def num_warps_for(block: int) -> int:
    """Warps for a block of ``block`` elements: one warp per 256 elements, between 1 and 16."""
    return max(1, min(16, block // 256))


@functools.lru_cache(maxsize=4096)
def f32_pairs(*values: float) -> tuple:
    """Each value as an fp32 pair (hi, lo), flattened: the kernels' convention for float scalars
    (see ``_runtime.split_f32`` and ``_math.from_pair``).  Cached: a layer's scalars repeat."""
    out = []
    for v in values:
        out.extend(rt.split_f32(float(v)))
    return tuple(out)


class PlanCache:
    """A bounded dict for launch plans keyed by shapes/strides: host time matters on small
    layers, and a plan is pure integer arithmetic on metadata.  ``clear_plan_caches`` empties
    every one (after changing what plans depend on, as perf.host does)."""

    def __init__(self, make: Callable, limit: int = 4096):
        self.make = make
        self.limit = limit
        self.plans: dict = {}
        _CACHES.add(self)

    def __call__(self, key, *args):
        p = self.plans.get(key)
        if p is None:
            if len(self.plans) >= self.limit:
                self.plans.clear()
            p = self.plans[key] = self.make(*args)
        return p

    def put(self, key, value) -> None:
        """Store a value made elsewhere (``make=None`` caches)."""
        if len(self.plans) >= self.limit:
            self.plans.clear()
        self.plans[key] = value

    def clear(self) -> None:
        self.plans.clear()


_CACHES: "weakref.WeakSet[PlanCache]" = weakref.WeakSet()


def clear_plan_caches() -> None:
    rt.plan_state = object()  # calls remembered before (``call_state``) are stale
    for cache in list(_CACHES):
        cache.clear()


def call_state(device: torch.device) -> tuple:
    """What a call on ``device`` remembered by its tensors' guard (``tensor_guard``) also
    depends on (``signature``'s last entries): ``(rt.plan_state, interpreter switch or None)``,
    the switch only for CPU tensors.  Still current while ``state[0] is rt.plan_state and
    state[1] in (None, rt.interpreter_enabled())``: no tuple built per call."""
    return rt.plan_state, rt.interpreter_enabled() if device.type == "cpu" else None


try:  # dynamo's guard on tensors' metadata: one C call (torch.compile checks its graphs' inputs so)
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover - every torch tkern supports has it
    _TensorGuards = None

# ``ABSENT[i]`` stands for an absent (None) tensor at position i of a guard: no tensor an op
# takes is a 0-element fp32 vector where the guard saw one (a call with C = 0 has no elements
# and no program).  One per position: TensorGuards fails a check that repeats an object.
ABSENT = tuple(torch.empty(0) for _ in range(16))


def tensor_guard(tensors: tuple) -> Callable[..., bool]:
    """``check(*tensors) -> bool``: whether tensors (``ABSENT[i]`` for None) have the metadata
    ``tensors`` have now: class, shape, strides, dtype, device, requires_grad and dispatch keys,
    everything ``signature`` covers but its last entries (``call_state``).  dynamo's
    TensorGuards where torch has them: one C call, ~0.4 us for seven tensors, against ~3 us
    for building and hashing a signature (which it falls back to).  A check passing one tensor
    twice fails: conservative, as a guard must be."""
    if _TensorGuards is not None:
        try:
            return _TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                                 dynamic_dims_strides=[list(t.stride()) for t in tensors]).check
        except (TypeError, RuntimeError):  # pragma: no cover - a torch whose guards differ
            pass
    sig = signature(tensors)[:-2]
    return lambda *ts: (len(ts) == len(tensors) and signature(ts)[:-2] == sig
                        and all(a.__class__ is b.__class__ for a, b in zip(ts, tensors)))


def signature(tensors: tuple) -> tuple:
    """What a program may depend on besides the config: each tensor's shape, strides, dtype and
    device (None for an absent one; alignment is the launch sites' concern), and the runtime
    rule's state (``rt.plan_as_gpu``; for CPU tensors, whether the interpreter is on).  One flat
    tuple (a tensor gives four entries, a torch.Size first; None one): cheaper to build and to
    hash than a tuple per tensor, and as unambiguous."""
    sig = []
    for t in tensors:
        if t is None:
            sig.append(None)
        else:
            sig += (t.shape, t.stride(), t.dtype, t.device)
    cpu = tensors[0] is not None and sig[3].type == "cpu"  # the first tensor's device
    sig.append(rt._planned_sms)
    sig.append(cpu and rt.interpreter_enabled())
    return tuple(sig)


# ----------------------------------------------------------------------------------------------
# the mechanism

_SCHEMA_TYPES = {torch.Tensor: "Tensor", Optional[torch.Tensor]: "Tensor?", float: "float",
                 Optional[float]: "float?", int: "int", Optional[int]: "int?", bool: "bool",
                 str: "str"}


def _field_schema(config: type) -> list[str]:
    hints = typing.get_type_hints(config)
    return [f"{_SCHEMA_TYPES[hints[name]]} {name}" for name in config._fields]


class Op:
    """An op's declaration and everything built from it (see the module docstring)."""

    def __init__(self, name: str, *, inputs: tuple, outputs: tuple, config: type,
                 forward: Callable, saves: tuple, grads: tuple, backward: Callable,
                 fake: Callable | None = None, backward_fake: Callable | None = None,
                 composite: Callable | None = None, eager: Callable | None = None,
                 aux: tuple = (), mutates: tuple = (), save_when: dict | None = None,
                 library: bool = True, program: Callable | None = None,
                 program_key: Callable | None = None):
        self.name = name
        self.public_name = name.split("::")[-1]
        self.input_names = tuple(n.rstrip("?") for n in inputs)
        self.optional = tuple(n.endswith("?") for n in inputs)
        self.n_inputs = len(inputs)
        self.outputs = outputs
        self.config = config
        self.forward, self.fake = forward, fake
        self.backward, self.backward_fake = backward, backward_fake
        self.composite, self.eager = composite, eager
        self.aux = tuple(outputs.index(n) for n in aux)
        self.diff_outputs = tuple(i for i in range(len(outputs)) if i not in self.aux)
        self._pick_diff = _picker(self.diff_outputs)
        self._n_diff = len(self.diff_outputs)
        names = self.input_names + outputs
        self.saves = tuple(names.index(n) for n in saves)  # indices into inputs + outputs
        # saved names kept only when a predicate of the config holds (None in their place else)
        self.save_when = tuple((saves.index(n), f) for n, f in (save_when or {}).items())
        self.grads = tuple(self.input_names.index(n) for n in grads)
        # backward's per-call work, precomputed (it runs on every training step)
        self._pick_needs = _picker(self.grads)
        self._pick_grad_inputs = self._pick_needs
        self._pick_saves = _picker(self.saves)
        self._save_pickers: dict = {}  # config -> picker, for save_when
        self._pick_aux = _picker(self.aux)
        self._no_grads = (None,) * len(self.grads)
        self._grads_prefix = self.grads == tuple(range(len(self.grads)))
        self._grads_pad = (None,) * (self.n_inputs - len(self.grads))
        # saved index -> position in grads, for composite (differentiate w.r.t. saved inputs)
        self.saved_grad_slot = {k: self.grads.index(i) for k, i in enumerate(self.saves)
                                if i in self.grads}
        self.mutates = tuple(self.input_names.index(n) for n in mutates)
        self.library = library
        self.make_program = program
        if program_key is not None and save_when:  # a program's saves picker is per config
            raise ValueError(f"{name}: save_when needs the whole config as the program key")
        self.program_key = program_key or (lambda cfg: cfg)
        self._programs = PlanCache(None)
        self._build_functions()
        if library:
            self._build_library_ops()

    # -- entry points

    def __call__(self, *inputs, cfg):
        """The runtime rule: Triton kernels (``apply``), or the eager fallback."""
        if self.eager is not None and not rt.use_triton(self.public_name, *inputs):
            return self.eager(*inputs, cfg)
        return self.apply(*inputs, cfg=cfg)

    def apply(self, *inputs, cfg):
        """Run the kernels with autograd: a tuple of the differentiable outputs (``aux`` ones
        are autograd's)."""
        if len(inputs) != self.n_inputs:
            raise TypeError(f"{self.name}: expected {self.n_inputs} inputs "
                            f"{self.input_names}, got {len(inputs)}")
        compiling = torch.compiler.is_compiling()
        if compiling and self.library:
            return self._compiled(inputs, cfg)
        if compiling or torch._C._are_functorch_transforms_active():
            # the setup_context Function (dynamo traces it; without custom ops, or it breaks
            # the graph)
            out = self._func_fn.apply(*inputs, cfg)
            return self._pick_diff(out if len(self.outputs) > 1 else (out,))
        out = self._fast_apply(*self._pick_grad_inputs(inputs), inputs, cfg,
                               self.program(inputs, cfg))
        return out if self._n_diff > 1 else (out,)

    def program(self, inputs: tuple, cfg):
        """The op's program for these inputs' signature and ``cfg`` (made once), or None."""
        if self.make_program is None:
            return None
        key = (self.program_key(cfg), *signature(inputs))
        programs = self._programs.plans
        if key in programs:
            return programs[key]
        made = self.make_program(inputs, cfg)
        if made is not None:  # what autograd saves, picked from (*inputs, *outputs, None)
            made.tk_saves = self._save_picker(cfg) if self.save_when else self._pick_saves
        self._programs.put(key, made)
        return made

    def run(self, program, inputs: tuple, cfg):
        """``apply`` with a program the caller looked up (a public function's fast path, which
        has checked its arguments and that it is not being compiled)."""
        if torch._C._are_functorch_transforms_active():
            return self.apply(*inputs, cfg=cfg)
        out = self._fast_apply(*self._pick_grad_inputs(inputs), inputs, cfg, program)
        return out if self._n_diff > 1 else (out,)

    # -- autograd (shared by both Function classes and the custom op's formula)

    def _setup(self, ctx, inputs, cfg, outs):
        """Autograd state for a Function that returns every output (aux ones marked)."""
        if self.aux:
            ctx.mark_non_differentiable(*self._pick_aux(outs))
        self._save(ctx, inputs, cfg, outs)

    def _save(self, ctx, inputs, cfg, outs):
        ctx.set_materialize_grads(False)
        pick = self._pick_saves
        if self.save_when:
            pick = self._save_pickers.get(cfg)
            if pick is None:
                pick = self._save_picker(cfg)
        ctx.save_for_backward(*pick((*inputs, *outs, None)))
        ctx.cfg = cfg

    def _save_picker(self, cfg):
        """``saves`` with the names ``save_when`` drops for ``cfg`` picking the trailing None."""
        indices = list(self.saves)
        for k, keep in self.save_when:
            if not keep(cfg):
                indices[k] = -1
        pick = _picker(tuple(indices))
        if len(self._save_pickers) >= 4096:
            self._save_pickers.clear()
        self._save_pickers[cfg] = pick
        return pick

    def _grads(self, ctx, douts, backward, program=None, needs=None):
        """Gradients for ``grads`` (None where not needed)."""
        if needs is None:
            needs = self._pick_needs(ctx.needs_input_grad)
        if True not in needs:
            return self._no_grads
        for d in douts:
            if d is not None:
                break
        else:  # no output got a gradient
            return self._no_grads
        saved = ctx.saved_tensors
        if torch.is_grad_enabled() and self.composite is not None:
            # create_graph=True: differentiable torch ops
            return self._differentiable(saved, douts, ctx.cfg, needs)
        if program is not None:
            grads = program.backward(douts, saved, ctx.cfg, needs)
            if grads is not None:
                return grads
        return backward(douts, saved, ctx.cfg, needs)

    def _differentiable(self, saved, douts, cfg, needs):
        wanted = [(slot, t) for k, t in enumerate(saved)
                  if (slot := self.saved_grad_slot.get(k)) is not None and needs[slot]]
        with torch.enable_grad():
            outs = self.composite(saved, cfg)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, d) for o, d in zip(outs, douts) if d is not None]
        got = torch.autograd.grad([o for o, _ in pairs], [t for _, t in wanted],
                                  [d for _, d in pairs], create_graph=True, allow_unused=True)
        result = [None] * len(self.grads)
        for (slot, _), g in zip(wanted, got):
            result[slot] = g
        return tuple(result)

    def _input_grads(self, grads):
        """``grads`` (aligned with self.grads) spread over every input position."""
        if self._grads_prefix:
            return (*grads, *self._grads_pad)
        out = [None] * self.n_inputs
        for i, g in zip(self.grads, grads):
            out[i] = g
        return out

    def _build_functions(self):
        op = self
        n_out = len(self.outputs)
        pad = (None,)  # the config record

        pick_diff = self._pick_diff
        n_diff = self._n_diff

        n_grads = len(self.grads)

        # The eager Function's arguments: the inputs that can get a gradient (autograd's edges),
        # then every input in declared order as one tuple (the others, such as running stats
        # updated in place, are no autograd business: each tensor argument costs host time),
        # the config record and the program.
        first_diff = op.diff_outputs[0]

        def fast_forward(ctx, *args):  # returns the differentiable outputs; aux ones are saved
            inputs, cfg, program = args[-3], args[-2], args[-1]
            if program is None:
                outs = op.forward(*inputs, cfg)
                op._save(ctx, inputs, cfg, outs)
            else:  # _save with the program's own picker (``program`` made it)
                outs = program.forward(cfg, *inputs)
                ctx.set_materialize_grads(False)
                ctx.save_for_backward(*program.tk_saves((*inputs, *outs, None)))
                ctx.cfg = cfg
            ctx.program = program
            return pick_diff(outs) if n_diff > 1 else outs[first_diff]

        def func_forward(*args):
            outs = op.forward(*args[:-1], args[-1])
            return outs if n_out > 1 else outs[0]

        def setup_context(ctx, inputs, output):
            op._setup(ctx, tuple(inputs[:-1]), inputs[-1], output if n_out > 1 else (output,))

        pick_douts = _picker(op.diff_outputs)

        def backward(ctx, *douts):
            return (*op._input_grads(op._grads(ctx, pick_douts(douts), op.backward)), *pad)

        def fast_backward(ctx, *douts):  # douts: the differentiable outputs'
            grads = op._grads(ctx, douts, op.backward, ctx.program,
                              ctx.needs_input_grad[:n_grads])
            return (*grads, None, None, None)  # the inputs tuple, the config, the program

        base = torch.autograd.Function
        cls_name = "".join(w.capitalize() for w in self.public_name.split("_"))
        fast = type(cls_name + "Function", (base,), dict(
            forward=staticmethod(fast_forward), backward=staticmethod(fast_backward),
            __doc__=f"{self.name}: eager autograd (old-style forward, no signature binding)."))
        self._func_fn = type(cls_name + "FuncFunction", (base,), dict(
            forward=staticmethod(func_forward), setup_context=staticmethod(setup_context),
            backward=staticmethod(backward),
            __doc__=f"{self.name}: autograd under torch.func transforms (setup_context)."))
        self._fast_fn = fast
        # the C++ apply itself: Function.apply adds only functorch checks for old-style forwards
        self._fast_apply = super(base, fast).apply
        # for a caller that has checked what ``run`` checks (no torch.func transform active, not
        # compiling): ``fast(*grad_inputs, inputs, cfg, program)`` -> the differentiable output
        # (a tuple of them where there are several)
        self.fast = self._fast_apply

    # -- torch.library (torch.compile)

    def _build_library_ops(self):
        op = self
        n_in, fields = self.n_inputs, self.config._fields
        cfg_schema = _field_schema(self.config)
        tensors = [f"Tensor{'?' if opt else ''} {n}" for n, opt in zip(self.input_names,
                                                                          self.optional)]
        n_ret = len(self.outputs) + len(self.mutates)
        ret = "Tensor" if n_ret == 1 else "(" + ", ".join(["Tensor"] * n_ret) + ")"
        fwd_schema = "(" + ", ".join(tensors + cfg_schema) + ") -> " + ret

        def split(args):
            return tuple(args[:n_in]), op.config(*args[n_in:])

        def fwd_impl(*args):
            inputs, cfg = split(args)
            if op.mutates:  # functional: update copies, return them
                inputs = list(inputs)
                for i in op.mutates:
                    if inputs[i] is not None:
                        inputs[i] = inputs[i].clone()
                inputs = tuple(inputs)
            outs = _unalias(tuple(op.forward(*inputs, cfg)), args[:n_in])
            return _ret(outs + op._mutated(inputs))

        def fwd_fake(*args):
            inputs, cfg = split(args)
            extra = tuple(torch.empty_like(inputs[i]) if inputs[i] is not None
                          else inputs[0].new_empty(0) for i in op.mutates)
            return _ret(tuple(op.fake(*inputs, cfg)) + extra)

        self._fwd_op = torch.library.custom_op(self.name, fwd_impl, mutates_args=(),
                                               schema=fwd_schema)
        self._fwd_op.register_fake(fwd_fake)

        bwd_schema = ("(Tensor?[] douts, Tensor?[] saved, " + ", ".join(cfg_schema)
                      + ", bool[] needs) -> Tensor[]")

        def bwd_impl(douts, saved, *rest):
            cfg, needs = op.config(*rest[:-1]), tuple(rest[-1])
            grads = op.backward(tuple(douts), tuple(saved), cfg, needs)
            return list(_unalias(_filled(grads, saved), tuple(douts) + tuple(saved)))

        def bwd_fake(douts, saved, *rest):
            cfg, needs = op.config(*rest[:-1]), tuple(rest[-1])
            return list(_filled(op.backward_fake(tuple(douts), tuple(saved), cfg, needs), saved))

        self._bwd_op = torch.library.custom_op(self.name + "_backward", bwd_impl,
                                               mutates_args=(), schema=bwd_schema)
        self._bwd_op.register_fake(bwd_fake)

        def library_backward(douts, saved, cfg, needs):
            got = op._bwd_op(list(douts), list(saved), *cfg, list(needs))
            return tuple(g if need else None for g, need in zip(got, needs))

        def setup_context(ctx, inputs, output):
            inputs, cfg = split(inputs)
            outs = output if n_ret > 1 else (output,)
            op._setup(ctx, inputs, cfg, outs[:len(op.outputs)])
            if op.mutates:  # the mutated inputs' new values carry no gradient
                ctx.mark_non_differentiable(*outs[len(op.outputs):], *(outs[i] for i in op.aux))

        pick_douts = _picker(op.diff_outputs)

        def autograd_backward(ctx, *douts):
            douts = pick_douts(douts)
            return (*op._input_grads(op._grads(ctx, douts, library_backward)),
                    *(None,) * len(fields))

        self._fwd_op.register_autograd(autograd_backward, setup_context=setup_context)

    def _mutated(self, inputs):
        return tuple(inputs[i] if inputs[i] is not None else inputs[0].new_empty(0)
                     for i in self.mutates)

    def _compiled(self, inputs, cfg):
        got = self._fwd_op(*inputs, *cfg)
        got = got if isinstance(got, tuple) else (got,)
        n = len(self.outputs)
        for i, new in zip(self.mutates, got[n:]):
            if inputs[i] is not None:
                inputs[i].copy_(new.detach())
        return self._pick_diff(got[:n])


def _picker(indices: tuple) -> Callable:
    """``seq -> tuple(seq[i] for i in indices)``, without a generator per call."""
    if indices == tuple(range(len(indices))):
        n = len(indices)
        return lambda seq: tuple(seq[:n])
    if len(indices) == 1:
        i = indices[0]
        return lambda seq: (seq[i],)
    return operator.itemgetter(*indices)


def _ret(outs: tuple):
    return outs if len(outs) > 1 else outs[0]


def _filled(grads, saved):
    """Custom ops return tensors only: an empty tensor where a gradient is not needed."""
    like = next(t for t in saved if t is not None)
    return tuple(like.new_empty(0) if g is None else g for g in grads)


def _unalias(outs: tuple, inputs: tuple) -> tuple:
    """Custom op outputs may not alias inputs or one another, and their metadata must match the
    fakes': copy views and aliases (the compile path only; eager calls keep their views)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
    result = []
    for t in outs:
        if isinstance(t, torch.Tensor):
            ptr = t.untyped_storage().data_ptr()
            whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
            if t.numel() and (ptr in seen or not whole or t.storage_offset()):
                t = t.clone()
            else:
                seen.add(ptr)
        result.append(t)
    return tuple(result)


class NoConfig(NamedTuple):
    """For ops without scalar arguments."""
