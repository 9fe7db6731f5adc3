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
