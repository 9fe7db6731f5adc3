"""Count the distinct kernel specialisations a test run launches (what a GPU run must JIT-compile).

A pytest plugin for CPU runs under Triton's interpreter, which compiles nothing: it records, per
launch, the key on which Triton's GPU launcher would compile a new binary.  That key is
approximated as the kernel, every constexpr's value, each tensor argument's dtype and 16-byte
alignment, each integer's specialisation (== 1, divisible by 16, needs 64 bits), and the launch
options (num_warps, num_stages).  Used to size ``perf/gpu_check.sh``'s test budget:

    TKERN_SPEC_DIR=/tmp/specs python -m pytest -p perf.speccount -n 2 tests
    python -m perf.speccount /tmp/specs          # distinct keys, in all and per kernel

Each pytest process (xdist worker) writes its keys to its own file in ``TKERN_SPEC_DIR``.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections import Counter
from pathlib import Path

_KEYS: set = set()
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _is_constexpr(annotation) -> bool:
    return "constexpr" in (annotation if isinstance(annotation, str) else repr(annotation))


def _arg_key(value):
    import torch

    if isinstance(value, torch.Tensor):
        return (str(value.dtype), value.data_ptr() % 16 == 0)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):
        return ("int", value == 1, value % 16 == 0, not -2**31 <= value < 2**31)
    if isinstance(value, float):
        return ("fp32",)
    return (type(value).__name__, repr(value)[:80])


def spec_key(fn, args, kwargs) -> tuple:
    sig = inspect.signature(fn)
    options = tuple(sorted((k, kwargs[k]) for k in _OPTIONS if k in kwargs))
    bound = sig.bind_partial(*args, **{k: v for k, v in kwargs.items() if k not in _OPTIONS})
    parts = []
    for name, value in bound.arguments.items():
        if _is_constexpr(sig.parameters[name].annotation):
            parts.append((name, repr(value)[:80]))
        else:
            parts.append((name, _arg_key(value)))
    return (f"{fn.__module__}.{fn.__qualname__}", tuple(parts), options)


def _install() -> None:
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        try:
            _KEYS.add(repr(spec_key(self.fn, args, kwargs)))
        except Exception as e:  # noqa: BLE001 - counting must never break a test
            _KEYS.add(f"{getattr(self.fn, '__qualname__', self.fn)} unkeyed: {type(e).__name__}")
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run


def pytest_configure(config):
    if os.environ.get("TKERN_SPEC_DIR"):
        os.environ.setdefault("TRITON_INTERPRET", "1")
        _install()


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("TKERN_SPEC_DIR")
    if not out:
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    (Path(out) / f"{worker}.txt").write_text("".join(k + "\n" for k in sorted(_KEYS)))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m perf.speccount TKERN_SPEC_DIR", file=sys.stderr)
        return 2
    keys = set()
    for f in Path(argv[0]).glob("*.txt"):
        keys.update(line for line in f.read_text().splitlines() if line)
    per_kernel = Counter(k.split("'")[1] if "'" in k else k for k in keys)
    for name, n in per_kernel.most_common():
        print(f"{n:6d}  {name}")
    print(f"{len(keys):6d}  distinct specialisations in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
