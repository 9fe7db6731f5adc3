"""Command line of the harness; ``python -m perf --help`` documents every option."""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import perf  # noqa: F401  (decides TRITON_INTERPRET before triton is imported)

EXIT_WRONG, EXIT_GATE, EXIT_INTERRUPTED = 1, 4, 8
# flag_gems where importable; tkern+compile only on the cases that ask for it
PROVIDER_DEFAULTS = ("eager", "torch.compile", "tkern", "tkern+compile", "flag_gems")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "float64": torch.float64, "fp64": torch.float64}

CPU_BANNER = ("CPU-INTERPRETER TIMINGS: no GPU here, so tkern's kernels ran in Triton's interpreter "
              "on the CPU (tiny shapes). These are NOT GPU results and say nothing about kernel "
              "speed; they show that the harness and every kernel run end to end.")

DESCRIPTION = """\
tkern's performance harness: times eager PyTorch, torch.compile of the same eager code (GPU only;
"n/a" elsewhere) and tkern on realistic shapes (ResNet-50 BatchNorm, AlexNet/GoogLeNet LRN,
transformer-MLP and conv-map activation+dropout, Linear/conv weight norm) across batch sizes, in
the modes fwd (training forward), bwd (the backward alone: one forward kept, its graph replayed
with retain_graph) and full (forward + backward).  Every provider's output and gradients are
checked against eager (float64 reference, tolerance rule of tkern.testing) before it is timed; a
wrong provider gets "WRONG" in its row's metric cells and the command exits non-zero.

GPU timings: triton.testing.do_bench (L2 flushed), median/p20/p80.  gbps counts the op's minimal
bytes (each input read once, each output written once per phase; formulas in perf/cases/*.py);
pct_peak is against a device-to-device copy measured in the same run; peak_mem_mb is
max_memory_allocated over one full step, live inputs included (NaN on CPU).

Outputs in --out: results.csv, results.json, one PNG per op; a table on stdout; progress on stderr.
Ops whose tkern function does not exist yet are skipped with a message."""

EPILOG = """\
exit status: a sum of 1 (eager, torch.compile or tkern failed its check or raised; flag_gems,
a peer, never sets it), 4 (the --compare gate tripped or
matched no row) and 8 (interrupted by Ctrl-C or SIGTERM: the outputs hold the rows measured so far,
written after every op); 0 all good; 2 bad arguments.

examples:
  python -m perf --quick                         # CPU: interpreter smoke run, ~1-2 minutes
  python -m perf --ops batch_norm,batch_norm_relu --dtypes bf16 --batches 32,64,128
  python -m perf --out baseline                  # then, after a change:
  python -m perf --compare baseline/results.json --max-slowdown 0.10"""


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def parse_dtypes(s: str) -> list[torch.dtype]:
    out = []
    for x in _csv(s):
        if x.lower() not in DTYPES:
            raise argparse.ArgumentTypeError(f"unknown dtype {x!r}; use one of {', '.join(DTYPES)}")
        if DTYPES[x.lower()] not in out:
            out.append(DTYPES[x.lower()])
    return out


def parse_batches(s: str) -> list[int]:
    m = re.fullmatch(r"pow2:(\d+)", s.strip())
    if m:
        top = int(m.group(1))
        return [2**i for i in range(top.bit_length()) if 2**i <= top]
    try:
        out = sorted({int(x) for x in _csv(s)})
    except ValueError:
        raise argparse.ArgumentTypeError(f"batches must be a comma list of integers or pow2:MAX, got {s!r}")
    if not out or out[0] < 1:
        raise argparse.ArgumentTypeError("batch sizes must be >= 1")
    return out


def _choices(allowed, aliases=None):
    def parse(s: str) -> list[str]:
        out = []
        for x in _csv(s):
            x = (aliases or {}).get(x, x)
            if x not in allowed:
                raise argparse.ArgumentTypeError(f"unknown value {x!r}; use {', '.join(allowed)}")
            if x not in out:
                out.append(x)
        return out

    return parse


def build_parser() -> argparse.ArgumentParser:
    from .cases import ALIASES, REGISTRY
    from .runner import MODES, PROVIDERS

    p = argparse.ArgumentParser(prog="python -m perf", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", type=_choices(list(REGISTRY), ALIASES), default=list(REGISTRY),
                   help=f"comma list of ops (default: all): {', '.join(REGISTRY)}; aliases "
                        f"{', '.join(ALIASES)}")
    p.add_argument("--dtypes", type=parse_dtypes, default=None,
                   help="comma list of float32/bfloat16/float16/float64 (or fp32, bf16, fp16, "
                        "fp64); default float32,bfloat16 on GPU, float32 with --quick or on CPU")
    p.add_argument("--batches", type=parse_batches, default=None,
                   help="comma list of batch sizes, or pow2:MAX for 1,2,4..MAX (default pow2:256; "
                        "1,2,4 with --quick). A case's sweep stops at the first batch that runs "
                        "out of memory; weight_norm stops at 32 stacked weights")
    p.add_argument("--modes", type=_choices(list(MODES)), default=list(MODES),
                   help="comma list of fwd (training forward), bwd (backward alone), full "
                        "(forward + backward); default all")
    p.add_argument("--layouts", type=_choices(["contiguous", "channels_last"], {"nchw": "contiguous"}),
                   default=["contiguous", "channels_last"],
                   help="comma list of contiguous (NCHW for 4-D; alias nchw) and channels_last; "
                        "default both (ops without a channels_last case run contiguous only)")
    p.add_argument("--shapes", type=_csv, default=None,
                   help="comma list of per-sample shapes to keep, as printed in the shape column "
                        "(e.g. 64x112x112,2048x7x7); default every shape of the chosen ops")
    p.add_argument("--providers", type=_choices(list(PROVIDERS), {"compile": "torch.compile",
                                                                  "gems": "flag_gems"}),
                   default=None,
                   help="comma list of eager, torch.compile (alias compile), tkern, "
                        "tkern+compile (torch.compile of a converted model: train_step cases "
                        "only), flag_gems (alias gems: FlagGems, a peer Triton library, where "
                        "importable; its rows count toward no target and its failures fail no "
                        "sweep); default all. eager is needed for speedup_vs_eager")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, 3 batch sizes, float32: a smoke run. Without a GPU it runs "
                        "tkern in Triton's interpreter (CPU-interpreter timings, not GPU results) "
                        "and finishes in a minute or two")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder for results.csv, results.json and the PNGs (default "
                        "./perf-results/<YYYY-MM-DD>-<card>)")
    p.add_argument("--compare", type=Path, default=None, metavar="BASELINE.json",
                   help="regression gate: exit non-zero if any row matching a baseline row (same "
                        "op, mode, provider, dtype, batch, shape, layout) has a median slower by "
                        "more than --max-slowdown, or if no row matches")
    p.add_argument("--max-slowdown", type=float, default=0.10,
                   help="allowed slowdown for --compare, as a fraction (default 0.10 = 10%%)")
    p.add_argument("--gate-providers", type=_choices(list(PROVIDERS), {"compile": "torch.compile",
                                                                       "gems": "flag_gems"}),
                   default=None,
                   help="providers the gate checks (default: every matching row but the flag_gems peer's)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop starting new measurements after this many seconds (each op gets "
                        "an equal share of what is left); outputs are still written")
    p.add_argument("--warmup-ms", type=float, default=None,
                   help="do_bench warm-up per measurement, GPU (default 25; 5 with --quick)")
    p.add_argument("--rep-ms", type=float, default=None,
                   help="do_bench measuring time per measurement, GPU (default 100; 20 with --quick)")
    p.add_argument("--cpu-reps", type=int, default=3,
                   help="timed repetitions per measurement on CPU, after one warm-up (default 3; "
                        "calls cheaper than that repeat until 20 ms, at most 50 times)")
    p.add_argument("--compile-dynamic", choices=["auto", "true", "false"], default="auto",
                   help="torch.compile(dynamic=...): auto (torch's default: the batch dimension "
                        "turns dynamic after the first recompile), true, or false (one static "
                        "compile per shape: slower sweep)")
    p.add_argument("--host", action="store_true",
                   help="host cost per call instead of the sweep: tkern with kernel bodies skipped "
                        "(CPU; Triton's launch front end still runs) beside eager PyTorch, with "
                        "Triton launches and other torch kernels per call (see perf/host.py)")
    p.add_argument("--host-reps", type=int, default=40, help="calls per timing round in --host")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def card_name(device: torch.device) -> str:
    """A short name for folder names: 'H100' from 'NVIDIA H100 80GB HBM3'; 'cpu' off-GPU."""
    if device.type != "cuda":
        return "cpu"
    words = [w for w in torch.cuda.get_device_name(device).split() if w not in ("NVIDIA", "GeForce")]
    if not words:
        return "gpu"
    name = words[0] if any(ch.isdigit() for ch in words[0]) or len(words) == 1 else "-".join(words[:2])
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-interpreter ({platform.machine() or 'cpu'})"


def git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001 - no git, not a checkout
        return "unknown"


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _on_sigterm(handler):
    """Install ``handler`` for SIGTERM; returns the previous one (None off the main thread)."""
    if handler is None:
        return None
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.host:
        from . import host
        host.run(reps=args.host_reps)
        return 0

    import triton

    import tkern._runtime as rt

    from . import report
    from .progress import Progress
    from .runner import Config, Sweep
    from .timing import Timer, copy_bandwidth

    baseline = None
    if args.compare is not None:  # read it first: a bad path should not cost a whole sweep
        try:
            baseline = report.read_rows(args.compare)
        except (OSError, ValueError, KeyError) as e:
            print(f"python -m perf: cannot read the baseline {args.compare}: {e}", file=sys.stderr)
            return 2
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    if not gpu and not rt.interpreter_enabled():
        print("python -m perf: no GPU and TRITON_INTERPRET is not set: tkern would fall back to "
              "eager PyTorch. Run it as `python -m perf` (which sets it) or export TRITON_INTERPRET=1 "
              "before importing triton.", file=sys.stderr)
        return 2
    dtypes = args.dtypes or ([torch.float32] if (args.quick or not gpu) else [torch.float32, torch.bfloat16])
    batches = args.batches or ([1, 2, 4] if args.quick else parse_batches("pow2:256"))
    warmup = args.warmup_ms if args.warmup_ms is not None else (5 if args.quick else 25)
    rep = args.rep_ms if args.rep_ms is not None else (20 if args.quick else 100)
    timer = Timer(device, warmup, rep, args.cpu_reps)
    date = _dt.datetime.now(_dt.timezone.utc)
    out = args.out or Path("perf-results") / f"{date:%Y-%m-%d}-{card_name(device)}"
    out.mkdir(parents=True, exist_ok=True)

    from .cases import gems

    explicit = args.providers is not None
    args.providers = list(args.providers or PROVIDER_DEFAULTS)
    peer = "not asked for"
    if "flag_gems" in args.providers:
        ok, why = gems.available()
        peer = why
        if not ok:
            args.providers.remove("flag_gems")
            if explicit:
                print(f"flag_gems provider dropped: {why}", file=sys.stderr)
        else:
            print(f"peer provider: {why} (its rows count toward no target)", file=sys.stderr)
    if not gpu:
        print(CPU_BANNER, file=sys.stderr)
    if "torch.compile" in args.providers and not gpu:
        print("torch.compile: n/a without a GPU (its rows are marked n/a)", file=sys.stderr)
    t0 = time.monotonic()
    peak = copy_bandwidth(device, timer)
    print(f"device: {device_name(device)}; copy bandwidth {peak:.1f} GB/s (pct_peak is against it)",
          file=sys.stderr)
    cfg = Config(ops=args.ops, dtypes=dtypes, batches=batches, modes=args.modes,
                 layouts=args.layouts, shapes=args.shapes, providers=args.providers,
                 quick=args.quick, device=device,
                 device_name=device_name(device), timer=timer, peak_gbps=peak,
                 time_budget=args.time_budget,
                 compile_dynamic={"auto": None, "true": True, "false": False}[args.compile_dynamic])
    progress = Progress(0, enabled=not args.no_progress)
    threads = torch.get_num_threads()
    if not gpu:
        # Single-threaded eager on CPU: the interpreter is single-threaded too, and on a shared
        # machine waking intra-op threads costs whole scheduler ticks (eager times jump ~16 ms).
        torch.set_num_threads(1)
    commit = git_commit()

    def write(result) -> None:
        meta = {
            "device": cfg.device_name, "torch": torch.__version__, "triton": triton.__version__,
            "commit": commit, "timestamp": date.isoformat(timespec="seconds"), "peak_gbps": peak,
            "backend": "cuda" if gpu else "cpu-interpreter",
            "note": "" if gpu else CPU_BANNER,
            "argv": sys.argv[1:] if argv is None else list(argv),
            "elapsed_s": round(time.monotonic() - t0, 1),
            "failures": result.failures, "skipped_ops": result.skipped_ops, "notes": result.notes,
            "interrupted": result.interrupted, "peer": peer,
        }
        report.write_csv(result.rows, out / "results.csv")
        report.write_json(meta, result.rows, out / "results.json")

    # SIGTERM (e.g. from `timeout`) stops the sweep like Ctrl-C: the outputs are still written.
    old_handler = _on_sigterm(_raise_interrupt)
    try:
        result = Sweep(cfg, progress, checkpoint=write).run()
    finally:
        torch.set_num_threads(threads)
        _on_sigterm(old_handler)
    elapsed = time.monotonic() - t0
    write(result)
    plots = not args.no_plots
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            plots = False
            print("matplotlib is not installed (pip install -e '.[perf]'): no PNGs written",
                  file=sys.stderr)
    pngs = [] if not plots else report.plot(result.rows, out, title_note=(
        f"on {cfg.device_name}" + ("" if gpu else " (CPU-interpreter timings, not GPU results)")))

    print(report.table(result.rows, args.providers) if result.rows else "(no rows measured)")
    if not gpu:
        print("\n" + CPU_BANNER)
    ran = sorted({r["op"] for r in result.rows}, key=list(args.ops).index)
    print(f"\nops measured: {', '.join(ran) or 'none'}"
          + (f"; skipped: {', '.join(f'{k} ({v})' for k, v in result.skipped_ops.items())}"
             if result.skipped_ops else ""))
    print(f"wrote {out / 'results.csv'}, {out / 'results.json'}"
          + (f" and {len(pngs)} PNG(s)" if pngs else "") + f" in {elapsed:.0f} s")

    status = 0
    if result.interrupted:
        status |= EXIT_INTERRUPTED
        print("\nINTERRUPTED: the sweep stopped early; outputs hold the rows measured so far",
              file=sys.stderr)
    from .runner import PEERS

    if result.failures:
        if any(f["provider"] not in PEERS for f in result.failures):
            status |= EXIT_WRONG
        print(f"\nFAILED: {len(result.failures)} provider check(s) failed (rows marked WRONG; "
              f"{', '.join(PEERS)} failures do not set the exit status):", file=sys.stderr)
        for f in result.failures:
            print(f"  {f['op']} {f['shape']} {f['layout']} {f['dtype']} batch={f['batch']} "
                  f"provider={f['provider']}: {f['error']}", file=sys.stderr)
    if args.compare is not None:
        matched, bad = report.compare(result.rows, baseline, args.max_slowdown, args.gate_providers)
        if matched == 0:
            status |= EXIT_GATE
            print(f"\nperf gate: no row matches the baseline {args.compare}: nothing was compared "
                  f"(same ops, dtypes, batches and layouts as the baseline are needed)",
                  file=sys.stderr)
        elif bad:
            status |= EXIT_GATE
            print("\n" + report.format_offenders(bad, args.max_slowdown), file=sys.stderr)
        else:
            print(f"\nperf gate: {matched} row(s) within {100 * args.max_slowdown:.0f}% of "
                  f"{args.compare}")
    return status


if __name__ == "__main__":
    sys.exit(main())
