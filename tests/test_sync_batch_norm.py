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
SCENARIOS = [  # (split index, momentum, activation, channels_last, eager fallback, mean, std)
    (0, 0.1, None, False, False, 5.0, 2.0),
    (1, None, "relu", False, False, 5.0, 2.0),
    (1, 0.3, "gelu", True, False, 5.0, 2.0),
    (1, 0.1, None, False, False, 1000.0, 0.01),  # a large mean: the merge must stay exact
    (1, None, "elu", False, True, 5.0, 2.0),  # CPU without the interpreter: the plain-PyTorch path
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
    for i, (split, momentum, act, cl, eager, mean, std) in enumerate(SCENARIOS):
        os.environ["TRITON_INTERPRET"] = "0" if eager else "1"  # the runtime rule reads it per call
        sizes = SPLITS[world][split]
        torch.manual_seed(0)
        m = tkern.nn.SyncBatchNorm(C, momentum=momentum, activation=act)
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
        steps = []
        for step in range(2):
            x, dy = _data(sizes, 10 * i + step, mean, std)
            x = _local(x, sizes, rank).clone()
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            y = m(x)
            y.backward(_local(dy, sizes, rank))
            dw, db = m.weight.grad.clone(), m.bias.grad.clone()
            dist.all_reduce(dw)  # what DDP's reduction (times world) would hold
            dist.all_reduce(db)
            m.weight.grad = m.bias.grad = None
            steps.append(dict(y=y.detach(), dx=x.grad, dw=dw, db=db,
                              cl=y.is_contiguous(memory_format=torch.channels_last)))
        m.eval()
        x, _ = _data(sizes, 99, mean, std)
        steps.append(dict(y=m(_local(x, sizes, rank))))
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
    close = dict(rtol=1e-4, atol=1e-5)

    for i, (split, momentum, act, cl, _, mean, std) in enumerate(SCENARIOS):
        sizes = SPLITS[world][split]
        bn = _reference_bn(momentum, act)
        for step in range(2):
            x, dy = _data(sizes, 10 * i + step, mean, std)
            x = x.double().requires_grad_()
            y = eager_activation(bn(x), act)
            y.backward(dy.double())
            got = [r[i]["steps"][step] for r in ranks]
            dx_tol = dict(rtol=1e-4, atol=1e-5 / std)  # dx scales with 1 / std
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
            _close(r[i]["running_var"], bn.running_var, rtol=1e-4, atol=1e-7)
            assert r[i]["nbt"].item() == bn.num_batches_tracked.item() == 2
        bn.eval()
        x, _ = _data(sizes, 99, mean, std)
        expected = eager_activation(bn(x.double()), act)
        # eval normalizes with fp32 running stats: |x - mean| / std amplifies their rounding
        _close(torch.cat([r[i]["steps"][2]["y"] for r in ranks]), expected, rtol=1e-4,
               atol=1e-5 * max(1.0, mean / std / 10))

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
