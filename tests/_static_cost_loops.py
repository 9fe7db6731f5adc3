"""Hand-made kernels with loops of known trip counts, for tests/test_static_cost.py: compiled for
sm_90a in this process (run without TRITON_INTERPRET), their per-loop counts printed as JSON."""

import json
import sys

import torch
import triton
import triton.language as tl

from perf import static_cost as sc


@triton.jit
def _two_loops(X, OUT, n_a, n_b, BLOCK: tl.constexpr):
    """Loop A loads X's two rows in turn n_a times (re-reads: X's bytes count once); loop B
    stores n_b + program id rows of OUT."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(0, n_a):  # loads only; enough math a trip that ptxas keeps one copy
        v = tl.load(X + (i % 2) * BLOCK + offs)
        acc = tl.exp(acc * 0.5 + v) - tl.sqrt(tl.abs(v) + 1.0)
    for j in range(0, n_b + tl.program_id(0)):  # stores only
        acc = tl.exp(acc * 0.25) + j
        tl.store(OUT + j * BLOCK + offs, acc)


@triton.jit
def _small_and_nested(X, OUT, n_s, n_o, BLOCK: tl.constexpr):
    """A small loop (ptxas unrolls it), then a loop nest whose inner loop runs o + 1 times."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for p in range(0, n_s):
        acc += tl.load(X + p * BLOCK + offs)
    for o in range(0, n_o):
        for i in range(0, o + 1):
            acc = tl.exp(acc * 0.5) + tl.load(X + i * BLOCK + offs)
        tl.store(OUT + o * BLOCK + offs, acc)


@triton.jit
def _loaded_bound(X, N, OUT, BLOCK: tl.constexpr):
    """A loop whose trip count is read from memory: the launch cannot give it."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(0, tl.load(N)):
        acc += tl.load(X + i * BLOCK + offs)
    tl.store(OUT + offs, acc)


def _record(kernel, grid, *args, **kw):
    rec = sc._Recorder()
    with rec.active():
        kernel[grid](*args, **kw)
    (launch,) = rec.events
    return launch


def _report(launch):
    c = sc.compile_launch(launch)
    instrs = c.sass.instrs
    lc = sc.loop_counts(launch, c, len(instrs))
    loops = []
    for lp in c.sass.all_loops:
        body = sc._own_body(*lp, c.sass.all_loops)
        loops.append({"loop": lp, "body": len(body), "trips": lc.trips.get(lp),
                      "ldg": sum(1 for i in body if instrs[i][1].startswith("LDG")),
                      "stg": sum(1 for i in body if instrs[i][1].startswith("STG")),
                      "line": (lc.lines.get(lp) or (None, None))[0],
                      "factor": (lc.lines.get(lp) or (None, None))[1]})
    in_loops = {i for lp in c.sass.all_loops for i in range(lp[0], lp[1] + 1)}
    card = sc.CARDS["H200"]
    run = sc.CaseRun("test", "test", 1, {}, {})
    row = sc.kernel_row(run, "fwd", launch.name, launch, c, card)
    threads = 32 * c.num_warps
    return {"loops": loops, "outside": len(instrs) - len(in_loops), "dynamic": sum(lc.counts),
            "fallback": {str(k): v for k, v in lc.fallback.items()},
            "sass_per_byte": row.sass_per_byte, "trips_guessed": row.trips_guessed,
            "limiter": row.limiter, "threads": threads, "ctas": launch.ctas,
            "lines": {name: _line_of(name) for name in ("loop A", "loop B", "small", "outer",
                                                        "inner", "loaded")}}


def _line_of(tag):
    import inspect

    src, first = inspect.getsourcelines(sys.modules[__name__])
    marks = {"loop A": "for i in range(0, n_a)", "loop B": "for j in range(0, n_b",
             "small": "for p in range(0, n_s)", "outer": "for o in range(0, n_o)",
             "inner": "for i in range(0, o + 1)", "loaded": "for i in range(0, tl.load(N))"}
    return next(n + 1 for n, text in enumerate(src) if marks[tag] in text)


def main():
    BLOCK = 128  # one warp: 4 fp32 a thread, one 128-bit access a row
    x = torch.empty(64 * BLOCK)
    out = torch.empty(64 * BLOCK)
    n = torch.empty(1, dtype=torch.int32)
    x2 = torch.empty(2 * BLOCK)
    res = {
        "two_loops": _report(_record(_two_loops, (3,), x2, out, 5, 37, BLOCK=BLOCK, num_warps=1)),
        "small_and_nested": _report(_record(_small_and_nested, (2,), x, out, 23, 6, BLOCK=BLOCK,
                                            num_warps=1)),
        "loaded_bound": _report(_record(_loaded_bound, (2,), x, n, out, BLOCK=BLOCK, num_warps=1)),
    }
    json.dump(res, sys.stdout)


if __name__ == "__main__":
    main()
