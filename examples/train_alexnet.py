"""Train an AlexNet-style CNN (LRN, BatchNorm, ReLU + dropout) eagerly and converted to tkern.

Synthetic data is made on the fly (nothing is downloaded).  Both models start from the same weights
and see the same batches; the script prints both loss curves, the median step time and the peak
memory.  On a GPU it runs at AlexNet's real size; on a CPU it runs tiny, through Triton's interpreter.

    python examples/train_alexnet.py              # sizes picked for the device
    python examples/train_alexnet.py --steps 50 --batch 256
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

if not torch.cuda.is_available():  # must precede triton's import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch import nn  # noqa: E402

import tkern  # noqa: E402


def alexnet(width: int = 64, hidden: int = 4096, num_classes: int = 1000, p: float = 0.5) -> nn.Sequential:
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 11, stride=4, padding=2), nn.ReLU(inplace=True),
        nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0), nn.MaxPool2d(3, 2),
        nn.Conv2d(w, 3 * w, 5, padding=2, bias=False), nn.BatchNorm2d(3 * w), nn.ReLU(inplace=True),
        nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0), nn.MaxPool2d(3, 2),
        nn.Conv2d(3 * w, 6 * w, 3, padding=1, bias=False), nn.BatchNorm2d(6 * w), nn.ReLU(inplace=True),
        nn.Conv2d(6 * w, 4 * w, 3, padding=1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2), nn.AdaptiveAvgPool2d(6), nn.Flatten(),
        nn.Linear(4 * w * 36, hidden), nn.ReLU(inplace=True), nn.Dropout(p),
        nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(p),
        nn.Linear(hidden, num_classes),
    )


def synthetic_batches(steps, batch, image, num_classes, device, seed=0):
    """Images whose label is decided by a fixed random projection, so the loss can fall."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(3 * 8 * 8, num_classes, generator=g)
    for _ in range(steps):
        x = torch.randn(batch, 3, image, image, generator=g)
        pooled = nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)
        yield x.to(device), (pooled @ proj).argmax(1).to(device)


def train(model, args, device):
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    losses, times = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(1)  # same dropout draws for repeated runs of the same model kind
    for x, y in synthetic_batches(args.steps, args.batch, args.image, args.classes, device):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    warm = times[1:] or times  # the first step compiles kernels
    return losses, statistics.median(warm) * 1e3, peak


def main(argv=None):
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20 if gpu else 4)
    ap.add_argument("--batch", type=int, default=128 if gpu else 4)
    ap.add_argument("--image", type=int, default=224 if gpu else 67, help="image side")
    ap.add_argument("--width", type=int, default=64 if gpu else 4, help="channels of the first conv")
    ap.add_argument("--hidden", type=int, default=4096 if gpu else 32)
    ap.add_argument("--classes", type=int, default=1000 if gpu else 10)
    ap.add_argument("--lr", type=float, default=0.01)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if gpu else "cpu")

    torch.manual_seed(0)
    eager = alexnet(args.width, args.hidden, args.classes).to(device)
    converted = tkern.convert(copy.deepcopy(eager))
    print("tkern.convert:\n  " + "\n  ".join(converted.tkern_report))
    results = {"eager": train(eager, args, device), "tkern": train(converted, args, device)}

    print(f"\n{'step':>4} " + " ".join(f"{k:>10}" for k in results))
    for i in range(args.steps):
        print(f"{i:>4} " + " ".join(f"{r[0][i]:>10.4f}" for r in results.values()))
    for name, (_, ms, peak) in results.items():
        print(f"{name:>6}: median step {ms:9.2f} ms   peak memory {peak:9.1f} MiB")
    if not gpu:
        print("(CPU: tkern ran in Triton's interpreter; times are not GPU performance)")
    return results


if __name__ == "__main__":
    main()
