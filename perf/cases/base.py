"""What a benchmark case is, and the correctness check every provider passes before it is timed.

A case is one realistic shape of one op in one memory layout.  It builds its inputs for a batch size
and dtype, and gives three things:
- ``eager(*args)``: the PyTorch code a user writes today (also what torch.compile compiles);
- ``tkern(*args)``: the same computation through tkern;
- ``min_bytes(batch, dtype, mode)``: the bytes a perfect kernel moves (each input read once, each
  output written once, per phase; see each op module's docstring for its formula).
Both functions take the same positional tensors and return one differentiable tensor; in-place
state (BatchNorm's running statistics) is passed as arguments, so every provider gets its own copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from tkern.testing import ATOL, assert_close_rule

# The harness checks providers to catch wrong kernels, not to grade accuracy (the tests do that
# with the strict rule): allow 3x PyTorch's own error rather than 2x, so that a correct kernel with
# a different summation order never fails a long GPU sweep.
CHECK_FACTOR = 3.0


def elements(shape: Sequence[int]) -> int:
    return math.prod(shape)


def nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return elements(shape) * torch.empty((), dtype=dtype).element_size()


@dataclass
class Inputs:
    """A case's tensors for one (batch, dtype).

    args: positional arguments of eager/tkern; grad_idx: which of them require grad (the backward
    computes their gradients); state_idx: arguments updated in place (copied per provider); dy: the
    gradient fed to the output.
    """

    args: list
    grad_idx: tuple[int, ...]
    state_idx: tuple[int, ...] = ()
    dy: torch.Tensor | None = None

    def for_provider(self) -> "Inputs":
        """Fresh copies of the in-place state, shared everything else."""
        args = list(self.args)
        for i in self.state_idx:
            args[i] = args[i].clone()
        return Inputs(args, self.grad_idx, self.state_idx, self.dy)

    def to_reference(self) -> "Inputs":
        """Detached float64 copies (same layout) for the reference run."""
        args = []
        for i, a in enumerate(self.args):
            if isinstance(a, torch.Tensor):
                b = a.detach().to(torch.float64)
                if i in self.grad_idx:
                    b.requires_grad_(True)
                a = b
            args.append(a)
        return Inputs(args, self.grad_idx, self.state_idx, self.dy.double() if self.dy is not None else None)

    def grad_args(self) -> list:
        return [self.args[i] for i in self.grad_idx]


@dataclass
class Result:
    """One run of a function: its output, the gradients of grad_idx args, and the state after."""

    out: torch.Tensor
    grads: tuple
    state: tuple


def run_once(fn: Callable, inp: Inputs) -> Result:
    out = fn(*inp.args)
    grads = torch.autograd.grad(out, inp.grad_args(), inp.dy) if inp.grad_idx else ()
    return Result(out.detach(), tuple(g.detach() for g in grads),
                  tuple(inp.args[i].detach().clone() for i in inp.state_idx))


@dataclass
class Case:
    """One op x shape x layout; see the module docstring."""

    op: str  # row name, e.g. "batch_norm_relu"
    shape: tuple[int, ...]  # per-sample shape (the batch dimension excluded)
    layout: str  # "contiguous" or "channels_last"
    label: str  # where the shape comes from, e.g. "ResNet-50 layer2"
    make: Callable[[int, torch.dtype, torch.device], Inputs]
    eager: Callable
    tkern: Callable
    min_bytes: Callable[[int, torch.dtype, str], int]
    # Functions for the correctness reference when it differs from ``eager`` (dropout: the same
    # computation with dropout off), and a comparison that knows about the difference.
    reference: Callable | None = None
    compare: Callable[[Result, Result, Result, torch.dtype], None] | None = None
    extra: dict = field(default_factory=dict)
    # The flag_gems peer's function for this case (perf/cases/gems.py), where FlagGems has the op.
    gems: Callable | None = None

    @property
    def shape_str(self) -> str:
        return "x".join(str(s) for s in self.shape)


def compare_exact(actual: Result, torch_same: Result, ref: Result, dtype: torch.dtype) -> None:
    """Output, gradients and updated state each obey the tolerance rule (factor CHECK_FACTOR)."""
    pairs = [("output", actual.out, torch_same.out, ref.out)]
    pairs += [(f"grad[{i}]", a, t, r) for i, (a, t, r) in enumerate(zip(actual.grads, torch_same.grads, ref.grads))]
    pairs += [(f"state[{i}]", a, t, r) for i, (a, t, r) in enumerate(zip(actual.state, torch_same.state, ref.state))]
    for name, a, t, r in pairs:
        if a.dtype not in ATOL:
            raise AssertionError(f"{name}: unexpected dtype {a.dtype}")
        if a.shape != r.shape:
            raise AssertionError(f"{name}: shape {tuple(a.shape)} != {tuple(r.shape)}")
        if not torch.isfinite(a).all() and torch.isfinite(r).all():
            raise AssertionError(f"{name}: non-finite values")
        assert_close_rule(a, t, r, factor=CHECK_FACTOR, name=name)


def layout_tensor(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
        return t.contiguous(memory_format=fmt)
    return t.contiguous()
