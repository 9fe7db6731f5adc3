"""``perf.static_cost``: the sweep's launches, compiled for sm_90a, give a predicted row per kernel.

One subset of the sweep (one shape per op and layout, bf16, the issue's batches) keeps this under
a minute on two cores; ``python -m perf.static_cost`` runs the whole sweep the same way.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (op, direction) -> kernels the subset must show (every Triton kernel on the hot path, the
# reduction and combine kernels included)
EXPECTED = {
    ("batch_norm", "fwd"): {"_stats_partial_kernel", "_merge_normalize_kernel"},
    ("batch_norm", "bwd"): {"_backward_reduce_kernel", "_dx_kernel"},
    ("local_response_norm", "fwd"): {"_lrn_forward_slide_kernel"},
    ("local_response_norm", "bwd"): {"_lrn_backward_slide_kernel"},
    ("activation_dropout", "fwd"): {"_kernel"},
    # the case has a bias: its gradient's partial sums are added by the kernel's last programs
    ("activation_dropout", "bwd"): {"_kernel"},
}
MATCH = ["batch_norm ResNet-50 layer3 1024x14x14 contiguous bf16 b256",  # split (b32: one launch)
         "batch_norm ResNet-50 layer3 1024x14x14 channels_last bf16 b32",
         "local_response_norm AlexNet conv1 96x55x55 contiguous bf16 b32",
         "activation_dropout transformer MLP bias+GELU+dropout 512x4096 contiguous bf16 b8"]


def _kernel_base(name: str) -> str:
    return name.split("#")[0]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as e:
        pytest.skip(f"Triton has no NVIDIA backend here: {e}")
    out = tmp_path_factory.mktemp("static_cost") / "rows.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "perf.static_cost", "--ops",
           "batch_norm,local_response_norm,activation_dropout", "--dtypes", "bf16",
           "--json", str(out)]
    for m in MATCH:
        cmd += ["--match", m]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PREDICTED" in proc.stdout and "measured" not in proc.stdout.replace("not measured", "")
    return json.loads(out.read_text()), proc.stdout


def test_rows_for_every_hot_kernel(rows):
    from perf.static_cost import FIELDS

    data, _ = rows
    assert data and all(tuple(r) == FIELDS for r in data)
    cases = {r["case"] for r in data}
    assert len(cases) == len(MATCH), cases
    for case in cases:
        op = next(r["op"] for r in data if r["case"] == case)
        for direction in ("fwd", "bwd"):
            got = {_kernel_base(r["kernel"]) for r in data
                   if r["case"] == case and r["direction"] == direction}
            missing = EXPECTED[(op, direction)] - got
            assert not missing, f"{case} {direction}: no rows for {missing} (got {got})"
            assert "(total)" in got


def test_kernel_rows_are_read_from_machine_code(rows):
    data, _ = rows
    kernels = [r for r in data if not r["kernel"].startswith(("(", "torch."))]
    assert kernels
    for r in kernels:
        assert r["regs"] > 0 and r["spill_bytes"] >= 0 and r["ctas_per_sm"] >= 1, r
        assert r["sass_per_byte"] > 0 and r["bytes_in_flight_per_sm"] > 0, r
        assert 0 < r["predicted_pct_copy"] <= 100, r
        assert r["dram_passes"] > 0, r
    # the data tensors' accesses are found: every elementwise/reduction pass over x loads it
    for r in kernels:
        if r["dram_passes"] >= 1:
            assert r["load_bits"] in (16, 32, 64, 128), r


def test_totals_count_every_launch(rows):
    data, _ = rows
    for r in data:
        if r["kernel"] != "(total)":
            continue
        parts = [p for p in data if p["case"] == r["case"] and p["direction"] == r["direction"]
                 and p["kernel"] != "(total)"]
        assert abs(sum(p["dram_passes"] for p in parts) - r["dram_passes"]) < 1e-2
        assert r["predicted_pct_copy"] <= max(p["predicted_pct_copy"] for p in parts) + 1e-6


@pytest.fixture(scope="module")
def loops():
    """Hand-made kernels (tests/_static_cost_loops.py) compiled for sm_90a in a process of their
    own (this one runs Triton's interpreter), with their per-loop trip counts."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as e:
        pytest.skip(f"Triton has no NVIDIA backend here: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TKERN_STATIC_COST"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_static_cost_loops.py")], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _by_line(kernel, line):
    return [lp for lp in kernel["loops"] if lp["line"] == line]


def test_each_loop_has_its_own_trip_count(loops):
    # _two_loops(n_a=5, n_b=37) on 3 programs: loop A runs 5 trips, loop B 37 + program id
    # (37, 38, 39: 38 on average); expected executions per thread = the code outside loops once
    # plus each loop body times its trips (one body a trip where ptxas kept one copy)
    k = loops["two_loops"]
    assert not k["fallback"] and not k["trips_guessed"], k
    a, b = _by_line(k, k["lines"]["loop A"]), _by_line(k, k["lines"]["loop B"])
    assert a and b and len(a) + len(b) == len(k["loops"]), k["loops"]
    assert sum(lp["trips"] * lp["factor"] for lp in a) == pytest.approx(5)
    assert sum(lp["trips"] * lp["factor"] for lp in b) == pytest.approx(38)
    assert all(lp["ldg"] and not lp["stg"] for lp in a) and all(lp["stg"] and not lp["ldg"] for lp in b)
    expected = k["outside"] + sum(lp["trips"] * lp["body"] for lp in a + b)
    if len(a) == len(b) == 1 and a[0]["factor"] == b[0]["factor"] == 1:
        expected_plain = k["outside"] + 5 * a[0]["body"] + 38 * b[0]["body"]
        assert expected == pytest.approx(expected_plain)
    assert k["dynamic"] == pytest.approx(expected)
    # DRAM bytes: X (2 rows) once, OUT (64 rows); the bytes rule's one trip count for both loops
    # (those bytes a thread over the 32 bytes of both bodies) would be far off
    bytes_per_thread = (2 + 64) * 128 * 4 / (k["threads"] * k["ctas"])
    assert k["sass_per_byte"] == pytest.approx(k["dynamic"] / bytes_per_thread, rel=1e-2)
    shared = k["outside"] + bytes_per_thread / 16 / 2 * sum(lp["body"] for lp in a + b)
    assert abs(shared - k["dynamic"]) > 0.2 * k["dynamic"]


def test_unrolled_and_nested_loops(loops):
    # _small_and_nested(n_s=23, n_o=6): the small loop 23 trips (split between ptxas' unrolled
    # copy and its remainder loop when it unrolls), the outer loop 6, the inner o + 1 each time:
    # 1 + 2 + ... + 6 = 21 trips a program
    k = loops["small_and_nested"]
    assert not k["fallback"], k
    for tag, trips in (("small", 23), ("outer", 6), ("inner", 21)):
        got = _by_line(k, k["lines"][tag])
        assert got, (tag, k["loops"])
        assert sum(lp["trips"] * lp["factor"] for lp in got) == pytest.approx(trips), (tag, got)


def test_unknown_trip_counts_are_flagged(loops):
    # a bound loaded from memory: the launch cannot give it, so the row says so
    k = loops["loaded_bound"]
    assert k["fallback"] and k["trips_guessed"], k
    assert "trips from bytes" in k["limiter"] and "bounds not known" in k["limiter"], k["limiter"]
