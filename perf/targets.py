"""The issues' performance targets, checked against a sweep: ``python -m perf.targets results.json``.

Each target is read off the harness's rows exactly as the issue words it:
- "x eager" / "x torch.compile": the geometric mean, over every case (shape, layout, batch, dtype)
  of the op, of the other provider's median time over tkern's, in ``full`` mode (forward +
  backward) unless the target names a pass;
- "within F x of the minimal-bytes time": ``pct_peak >= 100 / F`` (pct_peak is the op's minimal
  bytes over its time, against the copy bandwidth measured in the same run), on the named rows;
- activation+dropout's memory target: eager's peak over a training step minus tkern's is at least
  the mask eager saves (one byte per element), on every row.

Prints one line per target: PASS, FAIL or NO DATA (the sweep has no such rows, e.g. fp32 when only
bf16 ran, or torch.compile off-GPU), with the measured value and how many cases it covers (a
partial sweep, cut by its time budget or run on fewer batch sizes than the issue names, covers
less than the issue asks: read the counts).  Any tkern row marked WRONG fails every target of its
op.  Exit status 0 when nothing FAILs.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict

from .report import is_num, read_rows
from .runner import WRONG

CASE = ("dtype", "batch", "shape", "layout")


def _times(rows, op, mode, provider):
    return {tuple(r[k] for k in CASE): r["ms_p50"] for r in rows
            if r["op"] == op and r["mode"] == mode and r["provider"] == provider
            and is_num(r["ms_p50"])}


def _ratios(rows, op, mode, other, dtype=None):
    """other's time over tkern's, per case (optionally of one dtype)."""
    ours, theirs = _times(rows, op, mode, "tkern"), _times(rows, op, mode, other)
    return [theirs[k] / ours[k] for k in ours if k in theirs and (dtype is None or k[0] == dtype)]


def _wrong(rows, op):
    """tkern rows of ``op`` that failed their correctness check (or raised): no target can pass."""
    return [r for r in rows if r["op"] == op and r["provider"] == "tkern"
            and r["ms_p50"] == WRONG]


def _geomean(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def _largest_batch_rows(rows, op, mode):
    """tkern's rows of the largest batch measured for each (dtype, shape, layout): "large shapes"."""
    mine = [r for r in rows if r["op"] == op and r["mode"] == mode and r["provider"] == "tkern"
            and is_num(r["pct_peak"])]
    top = defaultdict(int)
    for r in mine:
        key = (r["dtype"], r["shape"], r["layout"])
        top[key] = max(top[key], r["batch"])
    return [r for r in mine if r["batch"] == top[(r["dtype"], r["shape"], r["layout"])]]


def _numel(r):
    n = r["batch"]
    for d in str(r["shape"]).split("x"):
        n *= int(d)
    return n


def evaluate(rows):
    """[(issue, target text, status, measured text)]."""
    out = []

    def status(value, ok, op):
        if _wrong(rows, op):
            return "FAIL"  # a wrong result is no speed
        return "NO DATA" if value is None else "PASS" if ok else "FAIL"

    def speedup(issue, op, other, threshold, dtype, mode="full"):
        ratios = _ratios(rows, op, mode, other, dtype)
        g = _geomean(ratios)
        what = f"{op} {mode} {dtype}: >= {threshold}x {other} (geomean)"
        value = "-" if g is None else f"{g:.2f}x over {len(ratios)} cases"
        out.append((issue, what, status(g, g is not None and g >= threshold, op), value))

    def bandwidth(issue, op, mode, min_pct, large_only):
        sel = (_largest_batch_rows(rows, op, mode) if large_only else
               [r for r in rows if r["op"] == op and r["mode"] == mode
                and r["provider"] == "tkern" and is_num(r["pct_peak"])])
        worst = min(sel, key=lambda r: r["pct_peak"], default=None)
        what = (f"{op} {mode}: >= {min_pct:.1f}% of copy bandwidth"
                f"{' on the largest batch measured per shape' if large_only else ' on every row'}"
                " (min)")
        value = "-" if worst is None else (f"{worst['pct_peak']:.1f}% ({worst['dtype']}, "
                                           f"{worst['shape']}, batch {worst['batch']}, "
                                           f"{len(sel)} rows)")
        out.append((issue, what, status(worst, worst is not None and worst["pct_peak"] >= min_pct,
                                        op), value))

    dtypes = ("float32", "bfloat16")  # the issues' two dtypes, each judged on its own
    for dtype in dtypes:
        speedup(2, "activation_dropout", "eager", 2.0, dtype)
    bandwidth(2, "activation_dropout", "fwd", 80.0, large_only=False)
    for dtype in dtypes:
        speedup(2, "activation_dropout", "torch.compile", 1.0, dtype)
    saved = []  # (eager peak - tkern peak) - mask, in MiB, per case
    peaks = {p: {tuple(r[k] for k in CASE): r for r in rows if r["op"] == "activation_dropout"
                 and r["mode"] == "full" and r["provider"] == p and is_num(r["peak_mem_mb"])}
             for p in ("eager", "tkern")}
    for key, r in peaks["tkern"].items():
        if key in peaks["eager"]:
            saved.append(peaks["eager"][key]["peak_mem_mb"] - r["peak_mem_mb"] - _numel(r) / 2**20)
    worst = min(saved, default=None)
    out.append((2, "activation_dropout full: peak memory below eager's by >= the mask (min slack)",
                status(worst, worst is not None and worst >= 0, "activation_dropout"),
                "-" if worst is None else f"{worst:+.2f} MiB over {len(saved)} cases"))

    for dtype in dtypes:
        speedup(3, "batch_norm", "eager", 1.3, dtype)
        speedup(3, "batch_norm", "torch.compile", 1.0, dtype)
        speedup(3, "batch_norm_relu", "eager", 1.5, dtype)
    for mode in ("fwd", "bwd"):
        bandwidth(3, "batch_norm", mode, 100 / 1.5, large_only=True)

    for dtype in dtypes:
        speedup(4, "local_response_norm", "eager", 5.0, dtype)
        speedup(4, "local_response_norm", "torch.compile", 1.5, dtype)
    bandwidth(4, "local_response_norm", "fwd", 100 / 1.3, large_only=False)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.targets", description=__doc__.split("\n")[0])
    ap.add_argument("results", help="results.json (or results.csv) written by python -m perf")
    args = ap.parse_args(argv)
    results = evaluate(read_rows(args.results))
    width = max(len(t) for _, t, _, _ in results)
    for issue, what, status, value in results:
        print(f"#{issue}  {what:<{width}}  {status:<7}  {value}")
    return 1 if any(status == "FAIL" for _, _, status, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
