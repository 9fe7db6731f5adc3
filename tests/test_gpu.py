"""Checks that only a GPU can make (each skipped on CPU); ``perf/gpu_check.sh`` runs them first.

- CUDA-graph capture and replay of each op's training step (forward + backward): outputs equal
  eager's bit for bit, the dropout mask differs between replays, BatchNorm's running statistics
  advance once per replay;
- no host synchronisation in a training step (``torch.cuda.set_sync_debug_mode("error")``);
- fp16/bf16 outputs equal torch's wherever both compute the same fp32 value and round it once;
- inputs of more than 2^31 elements (int64 offsets);
- per-call latency on tiny tensors against eager's and kernel launches per call: measured and
  reported (``TKERN_GPU_REPORT``, shown in gpu_check's summary), not gated (targets are the
  harness's job), with a consistency check on the counts.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.nn.functional as F

import tkern

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LOW = [torch.float16, torch.bfloat16]


def _report(**row) -> None:
    """One measurement for gpu_check's summary (a JSON line in $TKERN_GPU_REPORT)."""
    path = os.environ.get("TKERN_GPU_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------------------------
# training steps of each op: (inputs, step) where step(*inputs) returns output and gradients


def _dropout_step(device):
    x = torch.randn(37, 129, device=device, requires_grad=True)
    b = torch.randn(129, device=device, requires_grad=True)
    dy = torch.randn(37, 129, device=device)

    def step():
        y = tkern.activation_dropout(x, "relu", 0.5, True, bias=b)
        dx, db = torch.autograd.grad(y, (x, b), dy)
        return y, dx, db

    return step, (x, b, dy)


def _bn_step(device):
    m = tkern.nn.BatchNorm2d(13, momentum=0.3, activation="relu").to(device)
    x = torch.randn(5, 13, 7, 11, device=device, requires_grad=True)
    dy = torch.randn(5, 13, 7, 11, device=device)

    def step():
        y = m(x)
        dx, dw, db = torch.autograd.grad(y, (x, m.weight, m.bias), dy)
        return y, dx, dw, db

    return step, (m, x)


def _lrn_step(device):
    x = torch.randn(3, 17, 9, 8, device=device, requires_grad=True)
    dy = torch.randn_like(x)

    def step():
        y = tkern.local_response_norm(x, 5, 1e-3, 0.75, 2.0)
        return (y, *torch.autograd.grad(y, (x,), dy))

    return step, None


def _wn_step(device):
    v = torch.randn(33, 7, 3, device=device, requires_grad=True)
    g = torch.rand(33, 1, 1, device=device).add_(0.5).requires_grad_()
    dw = torch.randn_like(v)

    def step():
        w = tkern.weight_norm(v, g, 0)
        return (w, *torch.autograd.grad(w, (v, g), dw))

    return step, None


STEPS = {"activation_dropout": _dropout_step, "batch_norm": _bn_step,
         "local_response_norm": _lrn_step, "weight_norm": _wn_step}


def _capture(step):
    """Warm up on a side stream (as torch's graph docs require), capture one step, return the
    graph and the captured outputs (static tensors each replay overwrites)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    return graph, outs


@pytest.mark.parametrize("op", ["batch_norm", "local_response_norm", "weight_norm"])
def test_fast_launch_equals_tritons_launch(device, op):
    """tkern._launch: a step's second call (cached launch signatures: tkern calls the compiled
    launchers itself) gives the first call's results (Triton's own run) bit for bit."""
    from tkern import _launch

    _launch.clear_cache()
    step, _ = STEPS[op](device)
    first = [t.clone() for t in step()]  # training BatchNorm: outputs depend on x only
    assert sum(len(c) for k in _launch._KERNELS for c in k._tk_cache.values()) > 0
    again = step()
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(first, again)):
        assert torch.equal(a, b), f"{op} output {i}: tkern's launch path differs from Triton's"


@pytest.mark.parametrize("op", ["local_response_norm", "weight_norm"])
def test_cuda_graph_replay_equals_eager(device, op):
    step, _ = STEPS[op](device)
    eager = [t.clone() for t in step()]
    graph, outs = _capture(step)
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        for name, o, e in zip(("output", "grad 0", "grad 1"), outs, eager):
            assert torch.equal(o, e), f"{op} {name}: the replay differs from the eager call"


def test_cuda_graph_dropout_mask_changes_per_replay(device):
    """Each replay draws a new mask (the seed must come from the device generator's graph-safe
    state, not be frozen into the graph), and every replay is a valid dropout of the same step."""
    step, (x, b, dy) = STEPS["activation_dropout"](device)
    graph, (y, dx, db) = _capture(step)
    z = x.detach() + b.detach()
    ref = F.relu(z) * 2.0  # p = 0.5: kept elements are doubled, exactly
    live = z > 0  # where the mask shows: relu's derivative is 1 (dy is nonzero almost surely)
    masks = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        kept = dx != 0  # dx = 2 dy where kept and live, else 0
        assert torch.equal(y, torch.where(kept, ref, 0)), "output is not the reference under its mask"
        assert torch.equal(dx, torch.where(kept, 2.0 * dy, 0)) and not (kept & ~live).any()
        torch.testing.assert_close(db, dx.sum(0))
        assert 0.4 < kept[live].float().mean().item() < 0.6, "kept fraction is not 1 - p"
        masks.append(kept[live].clone())
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2]), (
        "the dropout mask is the same on every replay of the captured graph")


def test_cuda_graph_batch_norm_running_stats_per_replay(device):
    step, (m, x) = STEPS["batch_norm"](device)
    graph, outs = _capture(step)
    # the warm-up steps moved m's statistics; the capture itself ran nothing
    twin = tkern.nn.BatchNorm2d(13, momentum=0.3, activation="relu").to(device)
    twin.load_state_dict(m.state_dict())
    for i in range(3):
        graph.replay()
        torch.cuda.synchronize()
        y = twin(x)
        assert torch.equal(outs[0], y), f"replay {i}: output differs from the eager module"
        assert torch.equal(m.running_mean, twin.running_mean), f"replay {i}: running_mean"
        assert torch.equal(m.running_var, twin.running_var), f"replay {i}: running_var"
        assert int(m.num_batches_tracked) == int(twin.num_batches_tracked), f"replay {i}: count"


@pytest.mark.parametrize("op", list(STEPS))
def test_no_host_sync_in_training_step(device, op):
    step, _ = STEPS[op](device)
    step()  # first call: compilation and caches may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------
# correct rounding


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("act", ["identity", "relu", "leaky_relu"])
def test_low_precision_outputs_equal_torch(device, dtype, act):
    """Where torch and tkern compute the same fp32 value (x + b, relu, a slope of 0.25, a dropout
    scale of 2: all exact in fp32) and round once, the fp16/bf16 results are identical."""
    x = (torch.randn(1031, 67, device=device) * 3).to(dtype)
    b = torch.randn(67, device=device).to(dtype)
    z = x.float() + b.float()
    want = {"identity": z, "relu": z.clamp_min(0), "leaky_relu": torch.where(z > 0, z, 0.25 * z)}[act]
    y = tkern.activation_dropout(x, act, 0.0, True, bias=b, negative_slope=0.25)
    assert torch.equal(y, want.to(dtype)), f"{act} {dtype}: not the correctly rounded value"
    yd = tkern.activation_dropout(x, act, 0.5, True, bias=b, negative_slope=0.25)
    kept = yd != 0
    assert torch.equal(yd[kept], (2 * want).to(dtype)[kept])
    if act != "leaky_relu":  # torch rounds x + b, then applies the activation: the same here
        assert torch.equal(y, F.relu(x + b) if act == "relu" else x + b)


# ------------------------------------------------------------------------------------------------
# > 2^31 elements


def _need_free(gib: float) -> None:
    if torch.cuda.mem_get_info()[0] < gib * 2**30:
        pytest.skip(f"needs {gib:.0f} GiB of free GPU memory")


def test_over_2_31_elements_activation_dropout(device):
    _need_free(24)
    n = 2**31 + 4099
    x = torch.empty(n, device=device, dtype=torch.float16).uniform_(-2, 2).requires_grad_()
    y = tkern.activation_dropout(x, "relu", 0.0)
    tail = slice(n - 5000, n)
    assert torch.equal(y[tail], F.relu(x[tail]))
    (dx,) = torch.autograd.grad(y, (x,), torch.ones_like(y))
    assert torch.equal(dx[tail], (x[tail] > 0).to(dx.dtype))
    del x, y, dx


def test_over_2_31_elements_norms(device):
    """BatchNorm, LRN and weight norm on 2.4e9 fp16 elements: the last rows, whose offsets pass
    2^31, against fp32 references (LRN mixes channels only, weight norm rows only, so their
    references need only those rows)."""
    _need_free(32)
    x = torch.randn(3, 3, 2**14, 2**14 + 9, device=device, dtype=torch.float16)
    assert x.numel() > 2**31
    tail = (slice(-1, None), slice(None), slice(-3, None))
    y = tkern.batch_norm(x, None, None, None, None, True)
    for c in range(3):
        var, mean = torch.var_mean(x[:, c].float(), unbiased=False)
        want = (x[-1, c, -3:].float() - mean) * torch.rsqrt(var + 1e-5)
        torch.testing.assert_close(y[-1, c, -3:].float(), want, atol=4e-3, rtol=2e-3)
    del y
    y = tkern.local_response_norm(x, 3, 1e-2, 0.75, 1.0)
    want = F.local_response_norm(x[tail].float(), 3, 1e-2, 0.75, 1.0)
    torch.testing.assert_close(y[tail].float(), want, atol=4e-3, rtol=2e-3)
    del y
    v = x.view(-1, 2**14 + 9)
    g = torch.rand(v.shape[0], 1, device=device, dtype=torch.float16) + 0.5
    w = tkern.weight_norm(v, g, 0)
    want = torch._weight_norm(v[-7:].float(), g[-7:].float(), 0)
    torch.testing.assert_close(w[-7:].float(), want, atol=4e-3, rtol=2e-3)
    del w, v, x


# ------------------------------------------------------------------------------------------------
# launch-bound latency and launches per call (reported)


def _cuda_kernels_per_call(fn, calls=5) -> float:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    return len(kernels) / calls


def _us_per_call(fn, calls=200) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def _triton_launches_per_call(fn, monkeypatch) -> int:
    """tkern's own Triton launches in one call, counted at the launcher."""
    from triton.runtime.jit import JITFunction

    count = [0]
    original = JITFunction.run

    def run(self, *args, **kwargs):
        count[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "run", run)
    fn()
    torch.cuda.synchronize()
    monkeypatch.setattr(JITFunction, "run", original)
    return count[0]


def _tiny_pairs(device):
    x = torch.randn(8, 16, 4, 4, device=device, requires_grad=True)
    w, b = torch.ones(16, device=device, requires_grad=True), torch.zeros(16, device=device, requires_grad=True)
    rm, rv = torch.zeros(16, device=device), torch.ones(16, device=device)
    v, g = torch.randn(16, 9, device=device, requires_grad=True), torch.ones(16, 1, device=device, requires_grad=True)
    return {
        "activation_dropout": (lambda: tkern.activation_dropout(x, "relu", 0.1),
                               lambda: F.dropout(F.relu(x), 0.1), (x,)),
        "batch_norm": (lambda: tkern.batch_norm(x, rm, rv, w, b, True),
                       lambda: F.batch_norm(x, rm, rv, w, b, True), (x, w, b)),
        "local_response_norm": (lambda: tkern.local_response_norm(x, 5),
                                lambda: F.local_response_norm(x, 5), (x,)),
        "weight_norm": (lambda: tkern.weight_norm(v, g, 0), lambda: torch._weight_norm(v, g, 0), (v, g)),
    }


@pytest.mark.parametrize("op", list(STEPS))
def test_tiny_call_latency_and_launches(device, op, monkeypatch):
    ours, theirs, leaves = _tiny_pairs(device)[op]
    row = {"kind": "latency", "op": op}
    for mode, wrap in (("fwd", lambda f: f),
                       ("full", lambda f: (lambda: torch.autograd.grad(f().sum(), leaves)))):
        ours_fn, theirs_fn = wrap(ours), wrap(theirs)
        triton_launches = _triton_launches_per_call(ours_fn, monkeypatch)
        row[f"{mode}_tkern_us"] = _us_per_call(ours_fn)
        row[f"{mode}_eager_us"] = _us_per_call(theirs_fn)
        row[f"{mode}_tkern_kernels"] = _cuda_kernels_per_call(ours_fn)
        row[f"{mode}_eager_kernels"] = _cuda_kernels_per_call(theirs_fn)
        row[f"{mode}_triton_launches"] = triton_launches
        # every Triton launch is a CUDA kernel the profiler must see, the same number each call
        assert triton_launches >= 1, f"{op} {mode}: no Triton kernel ran"
        assert row[f"{mode}_tkern_kernels"] >= triton_launches, row
        assert row[f"{mode}_tkern_kernels"] == int(row[f"{mode}_tkern_kernels"]), row
        assert row[f"{mode}_tkern_us"] > 0 and row[f"{mode}_eager_us"] > 0
    _report(**row)
