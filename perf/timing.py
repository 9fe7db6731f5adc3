"""Timers, the copy-bandwidth probe and the peak-memory probe.

GPU: ``triton.testing.do_bench`` (CUDA events; it zeroes a 256 MB buffer before every repetition,
flushing L2, and the flush is not part of the measured time), reporting the median and the 20th
and 80th percentiles.
CPU (the interpreter in ``--quick``): wall clock over a few repetitions after one warm-up call; the
numbers measure Triton's interpreter, not a GPU, and say nothing about kernel speed.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch

QUANTILES = [0.5, 0.2, 0.8]


def _quantile(sorted_xs: list[float], q: float) -> float:
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = q * (len(sorted_xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


class Timer:
    """``timer(fn) -> (p50, p20, p80)`` in milliseconds."""

    def __init__(self, device: torch.device, warmup_ms: float = 25, rep_ms: float = 100,
                 cpu_reps: int = 3):
        self.device, self.warmup_ms, self.rep_ms, self.cpu_reps = device, warmup_ms, rep_ms, cpu_reps

    def __call__(self, fn: Callable) -> tuple[float, float, float]:
        if self.device.type == "cuda":
            import triton.testing

            p50, p20, p80 = triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms,
                                                    quantiles=QUANTILES)
            return float(p50), float(p20), float(p80)
        fn()  # warm-up (first-call costs: tracing, caches)
        # At least cpu_reps repetitions; cheap calls (eager on tiny tensors) repeat until 20 ms
        # have passed (at most 50 times), so that one scheduler hiccup does not make the median.
        xs, total = [], 0.0
        while len(xs) < max(1, self.cpu_reps) or (total < 20.0 and len(xs) < 50):
            t0 = time.perf_counter()
            fn()
            xs.append((time.perf_counter() - t0) * 1e3)
            total += xs[-1]
        xs.sort()
        return tuple(_quantile(xs, q) for q in QUANTILES)


def copy_bandwidth(device: torch.device, timer: Timer, mbytes: int | None = None) -> float:
    """GB/s of a device-to-device copy (read + write counted), measured now on ``device``.

    GPU: a 1 GiB buffer copied with ``Tensor.copy_``, timed like every row (median).
    CPU: a 64 MiB memcpy, median of 5.
    """
    if mbytes is None:
        mbytes = 1024 if device.type == "cuda" else 64
    n = mbytes * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        ms = timer(lambda: dst.copy_(src))[0]
    else:
        xs = []
        for _ in range(6):
            t0 = time.perf_counter()
            dst.copy_(src)
            xs.append(time.perf_counter() - t0)
        ms = statistics.median(xs[1:]) * 1e3
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def peak_memory_mb(fn: Callable, device: torch.device) -> float:
    """Peak allocated memory (MiB) while ``fn`` runs, the live inputs included; NaN on CPU, where
    torch keeps no allocator statistics."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
