"""tkern.nn.SyncBatchNorm on gloo (CPU, interpreter) against single-process nn.BatchNorm over the
concatenated batch.  Each world size is one spawn running every scenario, to keep start-up costs
(each process imports torch and triton) down."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import tkern
from tkern.activations import eager_activation

C, H, W = 3, 2, 3
SPLITS = {  # per world size: batch sizes per rank, even and uneven (with an empty rank)
    1: ([4], [5]),
    2: ([3, 3], [4, 0]),
    3: ([2, 2, 2], [3, 0, 2]),
}
SCENARIOS = [  # (split index, momentum, activation, channels_last, eager fallback, mean, std, dtype)
    (0, 0.1, None, False, False, 5.0, 2.0, torch.float32),
    (1, None, "relu", False, False, 5.0, 2.0, torch.float32),
    (1, 0.3, "gelu", True, False, 5.0, 2.0, torch.float32),
    (1, 0.1, None, False, False, 1000.0, 0.01, torch.float32),  # a large mean: the merge must stay exact
    (1, None, "elu", False, True, 5.0, 2.0, torch.float32),  # CPU without the interpreter: plain PyTorch
    # float64: the gathered statistics are strided views that .to(float64) does not copy
    (0, 0.1, "relu", False, False, 5.0, 2.0, torch.float64),
]


def _data(sizes, seed, mean=5.0, std=2.0):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, C, H, W, generator=g) * std + mean
    dy = torch.randn(n, C, H, W, generator=g)
    return x, dy


def _local(t, sizes, rank):
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    for i, (split, momentum, act, cl, eager, mean, std, dtype) in enumerate(SCENARIOS):
        os.environ["TRITON_INTERPRET"] = "0" if eager else "1"  # the runtime rule reads it per call
        sizes = SPLITS[world][split]
        torch.manual_seed(0)
        m = tkern.nn.SyncBatchNorm(C, momentum=momentum, activation=act)
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
        m.to(dtype)
        steps = []
        for step in range(2):
            x, dy = _data(sizes, 10 * i + step, mean, std)
            x = _local(x, sizes, rank).to(dtype)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            y = m(x)
            y.backward(_local(dy, sizes, rank).to(dtype))
            dw, db = m.weight.grad.clone(), m.bias.grad.clone()
            dist.all_reduce(dw)  # what DDP's reduction (times world) would hold
            dist.all_reduce(db)
            m.weight.grad = m.bias.grad = None
            steps.append(dict(y=y.detach(), dx=x.grad, dw=dw, db=db,
                              cl=y.is_contiguous(memory_format=torch.channels_last)))
        m.eval()
        x, _ = _data(sizes, 99, mean, std)
        steps.append(dict(y=m(_local(x, sizes, rank).to(dtype))))
        results[i] = dict(steps=steps, running_mean=m.running_mean.clone(),
                          running_var=m.running_var.clone(), nbt=m.num_batches_tracked.clone())
    os.environ["TRITON_INTERPRET"] = "1"

    # under DistributedDataParallel, uneven non-empty batches
    sizes = [2 + r for r in range(world)]
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(C, 4, 1), tkern.nn.SyncBatchNorm(4, activation="silu"))
    with tkern.nn.SyncBatchNorm.allow_cpu_ddp():  # DDP refuses any SyncBatchNorm on CPU otherwise
        ddp = nn.parallel.DistributedDataParallel(model)
    x, _ = _data(sizes, seed=5)
    out = ddp(_local(x, sizes, rank))
    dy = torch.randn(sum(sizes), 4, H, W, generator=torch.Generator().manual_seed(6))
    out.backward(_local(dy, sizes, rank))
    results["ddp"] = dict(y=out.detach(), grads={n: p.grad * world for n, p in model.named_parameters()},
                          running_var=model[1].running_var.clone())
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _close(actual, expected, **tol):
    torch.testing.assert_close(actual.double(), expected.double(), **tol)


def _reference_bn(momentum, act):
    """torch's BatchNorm over the whole batch, in float64 (fp32 torch itself errs ~1e-3 on the
    large-mean case)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(C, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn.double()


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sync_batch_norm_matches_single_process(tmp_path, device, world):
    if device.type != "cpu":
        pytest.skip("these gloo tests run on CPU tensors")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    for i, (split, momentum, act, cl, _, mean, std, dtype) in enumerate(SCENARIOS):
        sizes = SPLITS[world][split]
        tight = dtype == torch.float64  # as exact as the float64 reference
        close = dict(rtol=1e-10, atol=1e-10) if tight else dict(rtol=1e-4, atol=1e-5)
        bn = _reference_bn(momentum, act)
        for step in range(2):
            x, dy = _data(sizes, 10 * i + step, mean, std)
            x = x.double().requires_grad_()
            y = eager_activation(bn(x), act)
            y.backward(dy.double())
            got = [r[i]["steps"][step] for r in ranks]
            dx_tol = close if tight else dict(rtol=1e-4, atol=1e-5 / std)  # dx scales with 1 / std
            _close(torch.cat([g["y"] for g in got]), y.detach(), **close)
            _close(torch.cat([g["dx"] for g in got]), x.grad, **dx_tol)
            for g in got:
                _close(g["dw"], bn.weight.grad, **close)
                _close(g["db"], bn.bias.grad, **close)
                if cl and g["y"].shape[0] > 1:
                    assert g["cl"], "channels_last input must give channels_last output"
            bn.weight.grad = bn.bias.grad = None
        for r in ranks:
            _close(r[i]["running_mean"], bn.running_mean, **close)
            _close(r[i]["running_var"], bn.running_var, **(close if tight else dict(rtol=1e-4, atol=1e-7)))
            assert r[i]["nbt"].item() == bn.num_batches_tracked.item() == 2
        bn.eval()
        x, _ = _data(sizes, 99, mean, std)
        expected = eager_activation(bn(x.double()), act)
        # eval normalizes with fp32 running stats: |x - mean| / std amplifies their rounding
        _close(torch.cat([r[i]["steps"][2]["y"] for r in ranks]), expected,
               **(close if tight else dict(rtol=1e-4, atol=1e-5 * max(1.0, mean / std / 10))))

    close = dict(rtol=1e-4, atol=1e-5)
    sizes = [2 + r for r in range(world)]
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(C, 4, 1), nn.BatchNorm2d(4), nn.SiLU())
    x, _ = _data(sizes, seed=5)
    out = model(x)
    out.backward(torch.randn(sum(sizes), 4, H, W, generator=torch.Generator().manual_seed(6)))
    torch.testing.assert_close(torch.cat([r["ddp"]["y"] for r in ranks]), out.detach(), **close)
    for r in ranks:
        for n, p in model.named_parameters():
            torch.testing.assert_close(r["ddp"]["grads"][n], p.grad, **close, msg=n)
        torch.testing.assert_close(r["ddp"]["running_var"], model[1].running_var, **close)


def test_without_process_group_behaves_as_batch_norm(device):
    assert not (dist.is_available() and dist.is_initialized())
    sync = tkern.nn.SyncBatchNorm(C, activation="relu").to(device)
    bn = tkern.nn.BatchNorm2d(C, activation="relu").to(device)
    x = torch.randn(4, C, H, W, device=device) + 1
    torch.testing.assert_close(sync(x), bn(x))
    torch.testing.assert_close(sync.running_var, bn.running_var)
    assert sync.num_batches_tracked.item() == 1
    with pytest.raises(ValueError):
        sync(torch.randn(C, device=device))


def test_convert_sync_batchnorm_keeps_parameters_buffers_and_activation():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), tkern.nn.BatchNorm1d(4, activation="elu", alpha=0.5),
                          nn.Sequential(nn.SyncBatchNorm(4)))
    model[1].running_mean.uniform_()
    weight = model[1].weight
    keys = list(model.state_dict())
    converted = tkern.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert list(converted.state_dict()) == keys
    for m in (converted[1], converted[2], converted[3][0]):
        assert type(m) is tkern.nn.SyncBatchNorm
    assert converted[1].weight is weight
    assert torch.equal(converted[1].running_mean, model[1].running_mean)
    assert (converted[2].activation, converted[2].alpha) == ("elu", 0.5)
    assert "activation=elu" in repr(converted[2])
    single = tkern.nn.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm3d(2))
    assert type(single) is tkern.nn.SyncBatchNorm and single.num_features == 2


# ---- the host building blocks SyncBatchNorm calls, with strided and expanded internal tensors:
# each must give exactly what it gives for dense ones (a view read as dense is a silent wrong value)

from tkern.ops.batch_norm import (bn_backward_dx, bn_backward_reduce, bn_combine_stats,  # noqa: E402
                                  bn_normalize, bn_partial_stats)


def _strided(t):
    """``t`` (any shape) as a non-contiguous view with the same values: every other element of a
    buffer twice as wide in the last dim."""
    buf = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    buf[..., ::2] = t
    return buf[..., ::2]


def _transposed(t):  # a [P, C] view of a [C, P] tensor
    return t.t().contiguous().t()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_combine_stats_reads_strided_and_expanded_partials(device, dtype):
    x = (torch.randn(5, 3, 4, 3, device=device, dtype=dtype) * 2 + 1)
    count, mean, m2, mean_lo = bn_partial_stats(x)
    assert mean.shape[0] > 1, "the test needs several partials"
    assert (count == count[:, :1]).all()
    rm, rv = torch.rand(3, device=device, dtype=dtype), torch.rand(3, device=device, dtype=dtype)
    dense_rm, dense_rv = rm.clone(), rv.clone()
    want = bn_combine_stats(count, mean, m2, mean_lo, eps=1e-3, running_mean=dense_rm,
                            running_var=dense_rv, momentum=0.3)
    want_local = bn_combine_stats(count, mean, m2, mean_lo, local=True)
    views = [
        (count[:, :1].expand(-1, 3), _strided(mean), _transposed(m2), _strided(mean_lo)),
        (_transposed(count), _transposed(mean), _strided(m2), _transposed(mean_lo)),
    ]
    for c_, m_, q_, l_ in views:
        assert not all(t.is_contiguous() for t in (c_, m_, q_, l_))
        got_rm, got_rv = rm.clone(), rv.clone()
        got = bn_combine_stats(c_, m_, q_, l_, eps=1e-3, running_mean=got_rm, running_var=got_rv,
                               momentum=0.3)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        assert torch.equal(got_rm, dense_rm) and torch.equal(got_rv, dense_rv)
        for a, b in zip(bn_combine_stats(c_, m_, q_, l_, local=True), want_local):
            assert torch.equal(a, b)
    # the stats are right, too
    var, mu = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close((want[0].double() + want[1].double()), mu)
    torch.testing.assert_close(want[2].double(), (var + 1e-3).rsqrt())
    # running stats are updated in place: a view that is not dense is refused, not copied
    with pytest.raises(RuntimeError, match="running_mean"):
        bn_combine_stats(count, mean, m2, mean_lo, running_mean=_strided(rm), running_var=rv)
    with pytest.raises(RuntimeError, match="m2 must have shape"):
        bn_combine_stats(count, mean, m2[:, :2], mean_lo)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normalize_and_backward_read_strided_and_expanded_tensors(device, dtype):
    C = 3
    x = torch.randn(5, C, 4, 3, device=device, dtype=dtype) * 2 + 1
    dy = torch.randn_like(x)
    stats = torch.stack([x.mean((0, 2, 3)), torch.randn(C, device=device, dtype=dtype) * 1e-3,
                         torch.rand(C, device=device, dtype=dtype) + 0.5])
    w = torch.rand(C, device=device, dtype=dtype) + 0.5
    b = torch.randn(C, device=device, dtype=dtype)
    mean, mean_lo, invstd = stats
    act = ("leaky_relu", 0.2, 1.0)
    want_y = bn_normalize(x, mean, invstd, w, b, *act, mean_lo=mean_lo)
    want_eval = bn_normalize(x, mean, None, w, b, *act, var=invstd, eps=1e-3)
    want_sums = bn_backward_reduce(x, dy, mean, invstd, w, b, *act, mean_lo=mean_lo)
    want_dx = bn_backward_dx(x, dy, mean, invstd, w, b, *want_sums, 60, *act, mean_lo=mean_lo)
    want_dx_eval = bn_backward_dx(x, dy, mean, None, w, b, activation=act[0],
                                  negative_slope=act[1], training=False, var=invstd, eps=1e-3)
    cols = stats.t().contiguous().t()  # rows of a [C, 3] tensor: stride 3
    # x and dy non-dense (a slice of a wider tensor); weight expanded from one value per call
    xs, dys = _strided(x), _strided(dy)
    one_w = torch.full((1,), 1.25, device=device, dtype=dtype)
    for m_, lo_, inv_, w_, b_ in [(cols[0], cols[1], cols[2], _strided(w), _strided(b)),
                                  (_strided(mean), _strided(mean_lo), _strided(invstd),
                                   one_w.expand(C), b[None].expand(2, C)[1])]:
        assert not any(t.is_contiguous() for t in (m_, lo_, inv_, w_))
        w_ref = w if w_.stride(0) else one_w.expand(C).contiguous()
        if w_.stride(0):
            expect_y, expect_eval, expect_sums, expect_dx, expect_dx_eval = (
                want_y, want_eval, want_sums, want_dx, want_dx_eval)
        else:  # another weight: the dense call with it is the reference
            expect_y = bn_normalize(x, mean, invstd, w_ref, b, *act, mean_lo=mean_lo)
            expect_eval = bn_normalize(x, mean, None, w_ref, b, *act, var=invstd, eps=1e-3)
            expect_sums = bn_backward_reduce(x, dy, mean, invstd, w_ref, b, *act, mean_lo=mean_lo)
            expect_dx = bn_backward_dx(x, dy, mean, invstd, w_ref, b, *expect_sums, 60, *act,
                                       mean_lo=mean_lo)
            expect_dx_eval = bn_backward_dx(x, dy, mean, None, w_ref, b, activation=act[0],
                                            negative_slope=act[1], training=False, var=invstd,
                                            eps=1e-3)
        assert torch.equal(bn_normalize(xs, m_, inv_, w_, b_, *act, mean_lo=lo_), expect_y)
        assert torch.equal(bn_normalize(xs, m_, None, w_, b_, *act, var=inv_, eps=1e-3),
                           expect_eval)
        sums = bn_backward_reduce(xs, dys, m_, inv_, w_, b_, *act, mean_lo=lo_)
        for a, e in zip(sums, expect_sums):
            assert torch.equal(a, e)
        sg, sgx = _strided(expect_sums[0]), expect_sums[1][None].expand(4, C)[2]
        assert torch.equal(bn_backward_dx(xs, dys, m_, inv_, w_, b_, sg, sgx, 60, *act,
                                          mean_lo=lo_), expect_dx)
        assert torch.equal(bn_backward_dx(xs, dys, m_, None, w_, b_, activation=act[0],
                                          negative_slope=act[1], training=False, var=inv_,
                                          eps=1e-3), expect_dx_eval)
    # an expanded dy (the gradient of a sum): read through stride 0, as its dense copy
    dy_e = torch.randn(1, C, 1, 1, device=device, dtype=dtype).expand_as(x)
    for a, e in zip(bn_backward_reduce(x, dy_e, mean, invstd, w, b, *act, mean_lo=mean_lo),
                    bn_backward_reduce(x, dy_e.contiguous(), mean, invstd, w, b, *act,
                                       mean_lo=mean_lo)):
        assert torch.equal(a, e)
    # a non-dense x gives the partial statistics of its values
    count, pm, m2, lo = bn_partial_stats(xs)
    got_mean = bn_combine_stats(count, pm, m2, lo)
    torch.testing.assert_close(got_mean[0].double() + got_mean[1].double(),
                               x.double().mean((0, 2, 3)))
