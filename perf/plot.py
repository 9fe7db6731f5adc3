"""Redraw a sweep's PNGs from its results.json, on any machine: ``python -m perf.plot DIR``.

DIR is a folder holding results.json (e.g. what ``perf/gpu_check.sh`` brought back from a GPU, which
writes no PNGs itself: the device tool returns at most 8 files).  One PNG per op is written to DIR,
or to ``--out``.  Needs matplotlib (``pip install -e '.[perf]'``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.plot", description=__doc__.split("\n")[0])
    ap.add_argument("dir", type=Path, help="folder with results.json (or the results.json itself)")
    ap.add_argument("--out", type=Path, default=None, help="where the PNGs go (default: DIR)")
    args = ap.parse_args(argv)
    src = args.dir if args.dir.suffix == ".json" else args.dir / "results.json"
    out = args.out or src.parent
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("python -m perf.plot: matplotlib is not installed (pip install -e '.[perf]')",
              file=sys.stderr)
        return 2
    import json

    from . import report

    try:
        rows = report.read_rows(src)
        meta = json.loads(src.read_text()).get("meta", {})
    except (OSError, ValueError, KeyError) as e:
        print(f"python -m perf.plot: cannot read {src}: {e}", file=sys.stderr)
        return 2
    if not rows:
        print(f"python -m perf.plot: {src} has no rows", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    cpu = meta.get("backend") == "cpu-interpreter"
    note = f"on {meta.get('device', '?')}" + (" (CPU-interpreter timings, not GPU results)" if cpu else "")
    for path in report.plot(rows, out, title_note=note):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
