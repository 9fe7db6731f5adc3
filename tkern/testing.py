"""Tolerance rule and helpers shared by the tests and the perf harness.

The rule: compared with a float64 reference, tkern's error may be at most twice PyTorch's own error
at the same dtype, plus a small absolute term scaled to the reference's magnitude.
"""

from __future__ import annotations

import torch

# Absolute slack per dtype, relative to max(1, |reference|.max()).  fp64 allows for scalar kernel
# arguments (eps, slopes) that Triton passes as fp32.  fp16/bf16: just over half an ulp of 1, so
# that a correctly rounded result passes even where torch's own rounding happens to land exact (a
# tiny tensor); the old 1e-2 / 2e-3 were 1.3 / 4 ulps, wide enough to hide a truncating store.
# (Rounding itself is checked exactly: tests/test_math.py.)
ATOL = {
    torch.float64: 1e-9,
    torch.float32: 1e-5,
    torch.bfloat16: 1.25 * 2.0 ** -8,
    torch.float16: 1.25 * 2.0 ** -11,
}


def max_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    return (actual.double() - reference.double()).abs().max().item()


def assert_close_rule(actual, torch_same_dtype, reference, *, atol=None, factor=2.0, name="output"):
    """Assert ``actual`` (tkern) obeys the tolerance rule against ``reference`` (fp64), where
    ``torch_same_dtype`` is PyTorch's result at ``actual``'s dtype."""
    assert actual.shape == reference.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    assert actual.dtype == torch_same_dtype.dtype, f"{name}: dtype {actual.dtype} != {torch_same_dtype.dtype}"
    assert not torch.isnan(actual).any() or torch.isnan(reference).any(), f"{name}: unexpected NaN"
    if atol is None:
        atol = ATOL[actual.dtype]
    scale = max(1.0, reference.double().abs().max().item()) if reference.numel() else 1.0
    ours = max_error(actual, reference)
    theirs = max_error(torch_same_dtype, reference)
    bound = factor * theirs + atol * scale
    assert ours <= bound, (
        f"{name}: tkern error {ours:.3e} > {factor} x torch error {theirs:.3e} + atol {atol * scale:.1e} "
        f"({actual.dtype})"
    )
