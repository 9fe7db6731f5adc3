"""The training step of ``examples/train_alexnet.py``'s AlexNet-style CNN (LRN, BatchNorm,
ReLU + dropout): eager PyTorch, torch.compile of the eager model, and the model after
``tkern.convert``, at batch sizes 32 and up (tiny shapes and batches with ``--quick``).  When
torchvision is importable, also torchvision's resnet50 and mobilenet_v2 (random weights, 224x224,
full sweeps only: in the interpreter one step takes minutes), with a fourth provider,
``torch.compile(tkern.convert(model))`` (``tkern+compile``); their rows give images/s.

A row times the model's forward (fwd), its backward (bwd) or both (full) for the given batch; the
optimizer step is not included.  Parameters and BatchNorm buffers are passed as arguments through
``torch.func.functional_call``, so every provider works on its own copy of the running stats.

Dropout makes the providers' outputs differ, so the check here is coarse (shapes, dtypes, finite
values and gradients of the right shapes); that converted models compute what the
originals do is tested exactly in ``tests/test_convert.py``.

Minimal bytes: not a memory-bound op; the figure counts the input batch and the parameters once for
fwd, and the parameters twice (read, gradient written) plus the input gradient for bwd.  gbps and
pct_peak are only a scale for this row.
"""

from __future__ import annotations

import copy
import importlib.util
import pathlib

import torch

import tkern

from .base import Case, Inputs, Result, nbytes

NAME = "train_step"
OPS = ("train_step",)
TKERN_ATTRS = ("convert",)

FULL = dict(image=224, width=64, hidden=4096, classes=1000)
QUICK = dict(image=67, width=4, hidden=16, classes=5)
MIN_BATCH = 32


def _example():
    path = pathlib.Path(__file__).resolve().parents[2] / "examples" / "train_alexnet.py"
    spec = importlib.util.spec_from_file_location("tkern_example_train_alexnet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torchvision_model(name: str):
    def build(width, hidden, classes):
        import torchvision
        return getattr(torchvision.models, name)(weights=None, num_classes=classes)
    return build


def _case(size: dict, build=None, label="examples/train_alexnet.py model", extra=None) -> Case:
    torch.manual_seed(0)
    eager_model = (build or _example().alexnet)(size["width"], size["hidden"], size["classes"])
    tkern_model = tkern.convert(copy.deepcopy(eager_model))
    names = [n for n, _ in eager_model.named_parameters()]
    buffers = [n for n, b in eager_model.named_buffers() if b.is_floating_point()]
    shape = (3, size["image"], size["image"])

    def make(batch: int, dtype: torch.dtype, device: torch.device) -> Inputs:
        eager_model.to(device)
        tkern_model.to(device)
        x = torch.randn(batch, *shape, device=device, dtype=dtype).requires_grad_()
        params = [p.detach().to(dtype).clone().requires_grad_() for p in eager_model.parameters()]
        bufs = [b.detach().clone() for n, b in eager_model.named_buffers() if n in buffers]
        n = len(params)
        dy = torch.randn(batch, size["classes"], device=device, dtype=dtype)
        return Inputs([x, *params, *bufs], grad_idx=tuple(range(n + 1)),
                      state_idx=tuple(range(n + 1, n + 1 + len(bufs))), dy=dy)

    def call(model):
        def fn(x, *tensors):
            state = dict(zip(names + buffers, tensors))
            return torch.func.functional_call(model, state, (x,))
        return fn

    def min_bytes(batch: int, dtype: torch.dtype, mode: str) -> int:
        params = sum(nbytes(p.shape, dtype) for p in eager_model.parameters())
        x = nbytes((batch, *shape), dtype)
        fwd, bwd = x + params, 2 * params + x
        return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]

    def compare(actual: Result, torch_same: Result, ref: Result, dtype: torch.dtype) -> None:
        if actual.out.shape != ref.out.shape or actual.out.dtype != torch_same.out.dtype:
            raise AssertionError(f"output: {tuple(actual.out.shape)} {actual.out.dtype}, expected "
                                 f"{tuple(ref.out.shape)} {torch_same.out.dtype}")
        if not torch.isfinite(actual.out).all():
            raise AssertionError("output: non-finite values")
        for i, (a, t) in enumerate(zip(actual.grads, torch_same.grads)):
            if a.shape != t.shape or a.dtype != t.dtype or not torch.isfinite(a).all():
                raise AssertionError(f"grad[{i}]: {tuple(a.shape)} {a.dtype}, expected "
                                     f"{tuple(t.shape)} {t.dtype}, finite")

    return Case("train_step", shape, "contiguous", label, make,
                call(eager_model), call(tkern_model), min_bytes, compare=compare,
                extra={"min_batch": MIN_BATCH, "images": True, "model": tkern_model,
                       **(extra or {})})


def torchvision_cases(size: dict) -> list[Case]:
    """resnet50 and mobilenet_v2 at ``size`` (image, classes), or none without torchvision."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or built for another torch (fails on import)
        return []
    return [_case(size, _torchvision_model(name), f"torchvision {name}",
                  extra={"compile_tkern": True, "max_batch": 128})
            for name in ("resnet50", "mobilenet_v2")]


def cases(quick: bool) -> list[Case]:
    if quick:
        return [_case(QUICK)]
    return [_case(FULL)] + torchvision_cases(dict(FULL, classes=1000))
