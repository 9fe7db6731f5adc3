"""summary.txt of a ``perf/gpu_check.sh`` run: the verdict in at most 120 lines.

    python perf/summary.py WORK DIR      # WORK: the script's scratch folder; DIR: its outputs

Standard library only (no torch import: the script rewrites the summary after every phase, and a
cut run must still leave one).  It reads, when present:
- WORK/env.json: card, versions, commit, carried wheels (written once by the script);
- WORK/phases.tsv: one line per phase: name, budget s, used s, exit status;
- WORK/outcomes-<phase>.jsonl: the tests' outcomes (perf/pytest_outcomes.py);
- WORK/targets.txt: ``python -m perf.targets`` on the sweep;
- WORK/gpu-report.jsonl: measurements of tests/test_gpu.py (latency, launches);
- DIR/results.json: the sweep's rows and meta.
Sections: header, phases, tests (counts, each failure's first line), targets, a per-op table,
tiny-call latency, sweep notes, files.  Lines are cut at 110 characters, the whole at 120 lines.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

MAX_LINES, WIDTH, MAX_CHARS = 120, 110, 11000
MAX_FAILURES = 12  # first lines listed per test phase
PROVIDERS = ("eager", "torch.compile", "flag_gems")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _jsonl(path: Path) -> list[dict]:
    out = []
    try:
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass  # a line cut by a kill
    except OSError:
        pass
    return out


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _geomean(xs):
    xs = [x for x in xs if _num(x) and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def _fmt(v, spec=".2f", none="-"):
    return none if v is None else format(v, spec)


def header(env: dict, dry: bool) -> list[str]:
    e = env or {}
    lines = [f"tkern gpu_check {e.get('date', '?')}  commit {e.get('commit', '?')}"
             + ("  [DRY RUN: CPU interpreter, tiny budgets]" if dry else "")]
    lines.append(f"card: {e.get('card', '?')}")
    lines.append(f"versions: python {e.get('python', '?')}, torch {e.get('torch', '?')}, triton "
                 f"{e.get('triton', '?')}, numpy {e.get('numpy', '?')}, cuda {e.get('cuda', '-')}")
    extras = e.get("extras") or {}
    if extras:
        lines.append("extras: " + "; ".join(f"{k} {v}" for k, v in extras.items()))
    return lines


def phases(rows: list[list[str]]) -> list[str]:
    lines = ["", "phases (in order of value; each has its own budget):"]
    for r in rows:
        name, budget, used, rc = (r + ["?"] * 4)[:4]
        state = {"0": "ok", "124": "CUT at budget (SIGINT)", "130": "CUT (interrupted)",
                 "137": "KILLED", "-": "not run"}.get(rc, f"exit {rc}")
        lines.append(f"  {name:<22} budget {budget:>4}s  used {used:>4}s  {state}")
    if not rows:
        lines.append("  (none ran)")
    return lines


def tests(work: Path, names: list[str]) -> tuple[list[str], int]:
    """Lines of the tests section, and the number of failures/errors."""
    lines, bad_total = ["", "tests:"], 0
    for name in names:
        recs = _jsonl(work / f"outcomes-{name}.jsonl")
        if not recs:
            lines.append(f"  {name}: no outcomes (did not start)")
            continue
        collected = next((r["collected"] for r in recs if "collected" in r), None)
        exitstatus = next((r["exitstatus"] for r in recs if "exitstatus" in r), None)
        worst: dict[str, tuple[str, str]] = {}
        rank = {"passed": 0, "xfailed": 0, "skipped": 1, "xpassed": 2, "failed": 3, "error": 3}
        for r in recs:
            if "nodeid" not in r:
                continue
            old = worst.get(r["nodeid"])
            if old is None or rank.get(r["outcome"], 3) > rank.get(old[0], 3):
                worst[r["nodeid"]] = (r["outcome"], r.get("first", ""))
        count = {}
        for outcome, _ in worst.values():
            count[outcome] = count.get(outcome, 0) + 1
        bad = [(n, f) for n, (o, f) in worst.items() if o in ("failed", "error")]
        bad_total += len(bad)
        ran = len(worst)
        tail = ("" if collected is None else f" of {collected} collected"
                + (f", {collected - ran} NOT RUN" if collected > ran else ""))
        end = ("" if exitstatus is not None else ", no end of session (cut or killed)")
        parts = [f"{count.get(k, 0)} {k}" for k in ("passed", "failed", "error", "skipped")]
        parts += [f"{count[k]} {k}" for k in ("xfailed", "xpassed") if count.get(k)]
        lines.append(f"  {name}: " + ", ".join(parts) + tail + end)
        for nodeid, first in bad[:MAX_FAILURES]:
            lines.append(f"    FAIL {nodeid}: {first}")
        if len(bad) > MAX_FAILURES:
            lines.append(f"    ... {len(bad) - MAX_FAILURES} more failures in gpu_check.log")
        skipped = [f for o, f in worst.values() if o == "skipped"]
        if skipped:  # skips hide missing coverage (e.g. no expecttest): their commonest reasons
            reasons: dict[str, int] = {}
            for f in skipped:
                reasons[f] = reasons.get(f, 0) + 1
            top = sorted(reasons.items(), key=lambda kv: -kv[1])[:3]
            lines.append("    skips: " + "; ".join(f"{n}x {r[:60]}" for r, n in top))
    return lines, bad_total


def targets(work: Path) -> list[str]:
    lines = ["", "performance targets (python -m perf.targets on results.json; guide in "
             "perf/RESULTS.md):"]
    try:
        text = (work / "targets.txt").read_text().splitlines()
    except OSError:
        text = []
    rows = []
    for t in text:
        # "#2  what ...  STATUS   value" -> "STATUS  #2 what  value"
        for status in ("PASS", "FAIL", "NO DATA"):
            marker = f"  {status}"
            if marker in t:
                what, value = t.split(marker, 1)
                what = " ".join(what.split())
                for long, short in ((" (geomean)", ""), (" (min)", ""), ("of copy bandwidth", "of copy"),
                                    ("on the largest batch measured per shape", "largest batches"),
                                    ("peak memory below eager's by >= the mask (min slack)",
                                     "peak mem <= eager's - mask")):
                    what = what.replace(long, short)
                rows.append(f"  {status:<7} {what}  {value.strip()}")
                break
    lines += rows or ["  (no targets: the sweep did not run or wrote no results.json)"]
    return lines


def op_table(doc: dict | None) -> list[str]:
    """Per (op, dtype): geomean speedup of tkern over each provider per mode (>1: tkern faster),
    the lowest tkern %peak in fwd, and WRONG rows."""
    lines = ["", "per op (geomean over cases of other's ms / tkern's ms; >1 = tkern faster; "
             "'-' = no rows):"]
    if not doc:
        return lines + ["  (no results.json)"]
    rows = doc.get("rows", [])
    by = {}
    for r in rows:
        key = (r["op"], r["dtype"])
        case = (r["batch"], r["shape"], r["layout"], r["mode"])
        by.setdefault(key, {}).setdefault(r["provider"], {})[case] = r
    hdr = (f"  {'op':<20} {'dtype':<9} {'cases':>5} {'eag fwd':>7} {'eag bwd':>7} {'eag full':>8} "
           f"{'compile':>7} {'gems':>6} {'fwd%pk':>6} {'wrong':>5}")
    lines.append(hdr)
    for (op, dtype), provs in by.items():
        ours = provs.get("tkern", {})
        cases = {c[:3] for c in ours}

        def ratio(other, mode):
            theirs = provs.get(other, {})
            return _geomean([theirs[c]["ms_p50"] / r["ms_p50"] for c, r in ours.items()
                             if c[3] == mode and c in theirs and _num(r.get("ms_p50"))
                             and _num(theirs[c].get("ms_p50"))])

        pk = [r["pct_peak"] for c, r in ours.items() if c[3] == "fwd" and _num(r.get("pct_peak"))]
        wrong = sum(1 for p in provs.values() for r in p.values() if r.get("ms_p50") == "WRONG")
        lines.append(f"  {op:<20} {dtype:<9} {len(cases):>5} {_fmt(ratio('eager', 'fwd')):>7} "
                     f"{_fmt(ratio('eager', 'bwd')):>7} {_fmt(ratio('eager', 'full')):>8} "
                     f"{_fmt(ratio('torch.compile', 'full')):>7} {_fmt(ratio('flag_gems', 'full')):>6} "
                     f"{_fmt(min(pk) if pk else None, '.0f'):>6} {wrong:>5}")
    return lines


def latency(work: Path) -> list[str]:
    recs = [r for r in _jsonl(work / "gpu-report.jsonl") if r.get("kind") == "latency"]
    if not recs:
        return []
    lines = ["", "tiny tensors (launch-bound), per call: us tkern/eager, CUDA kernels tkern/eager "
             "(tests/test_gpu.py):",
             f"  {'op':<20} {'fwd us':>13} {'fwd kernels':>12} {'fwd+bwd us':>13} {'fwd+bwd kern':>13}"]
    for r in recs:
        def pair(mode, what, spec):
            a, b = r.get(f"{mode}_tkern_{what}"), r.get(f"{mode}_eager_{what}")
            return f"{_fmt(a, spec)}/{_fmt(b, spec)}"
        lines.append(f"  {r['op']:<20} {pair('fwd', 'us', '.0f'):>13} {pair('fwd', 'kernels', '.0f'):>12} "
                     f"{pair('full', 'us', '.0f'):>13} {pair('full', 'kernels', '.0f'):>13}")
    return lines


def sweep_notes(doc: dict | None) -> list[str]:
    if not doc:
        return []
    meta = doc.get("meta", {})
    lines = ["", f"sweep: {len(doc.get('rows', []))} rows, {meta.get('elapsed_s', '?')}s, copy "
             f"bandwidth {_fmt(meta.get('peak_gbps'), '.0f')} GB/s, backend {meta.get('backend', '?')}"
             + (", INTERRUPTED (budget or signal): partial" if meta.get("interrupted") else "")]
    if meta.get("peer"):
        lines.append(f"  peer provider: {meta['peer']}")
    fails = meta.get("failures", [])
    for f in fails[:6]:
        lines.append(f"  WRONG {f.get('provider')} {f.get('op')} {f.get('shape')} {f.get('layout')} "
                     f"{f.get('dtype')} batch={f.get('batch')}: {f.get('error', '')}")
    if len(fails) > 6:
        lines.append(f"  ... {len(fails) - 6} more provider failures in results.json meta.failures")
    notes = [n for n in meta.get("notes", []) if "time budget" in n or "skipping" in n
             or "flag_gems" in n]
    for n in notes[:4]:
        lines.append(f"  note: {n}")
    return lines


def build(work: Path, out: Path) -> list[str]:
    env = _read_json(work / "env.json") or {}
    dry = bool(env.get("dry_run"))
    phase_rows = _phase_rows(work)
    doc = _read_json(out / "results.json")
    test_lines, _ = tests(work, [r[0] for r in phase_rows if r[0].startswith("tests")]
                          or ["tests-gpu", "tests-suite"])
    lines = header(env, dry) + phases(phase_rows) + test_lines + targets(work)
    lines += op_table(doc) + latency(work) + sweep_notes(doc)
    files = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    lines += ["", f"files: {', '.join(files)}", "plots: python -m perf.plot DIR (from results.json, "
              "on any machine)"]
    lines = [ln if len(ln) <= WIDTH else ln[:WIDTH - 3] + "..." for ln in lines]
    if len(lines) > MAX_LINES:
        lines = lines[:MAX_LINES - 1] + [f"... cut at {MAX_LINES} lines; the rest in gpu_check.log"]
    while sum(len(ln) + 1 for ln in lines) > MAX_CHARS:  # the device tool returns 12,000 chars
        lines = lines[:-2] + [f"... cut at {MAX_CHARS} characters; the rest in gpu_check.log"]
    return lines


def _phase_rows(work: Path) -> list[list[str]]:
    try:
        return [ln.split("\t") for ln in (work / "phases.tsv").read_text().splitlines() if ln]
    except OSError:
        return []


def verdict(work: Path, out: Path) -> list[str]:
    """Why the run is not clean: a phase that failed (a cut counts only on a GPU: the dry run cuts
    its suite on purpose), a test failure, or a non-peer provider marked WRONG."""
    env = _read_json(work / "env.json") or {}
    problems = []
    for name, _, _, rc in ((r + ["?"] * 4)[:4] for r in _phase_rows(work)):
        if rc not in ("0", "124") or (rc == "124" and not env.get("dry_run")):
            problems.append(f"phase {name}: exit {rc}")
    _, bad = tests(work, [r[0] for r in _phase_rows(work) if r[0].startswith("tests")])
    if bad:
        problems.append(f"{bad} test failure(s)")
    doc = _read_json(out / "results.json") or {}
    wrong = [f for f in doc.get("meta", {}).get("failures", []) if f.get("provider") != "flag_gems"]
    if wrong:
        problems.append(f"{len(wrong)} provider check(s) failed in the sweep")
    return problems


def check_layout(work: Path, out: Path) -> list[str]:
    """What the dry run asserts about the outputs (the same layout a GPU run must produce)."""
    problems = []
    names = sorted(p.name for p in out.iterdir())
    want = ["gpu_check.log", "results.csv", "results.json", "summary.txt"]
    if names != want:
        problems.append(f"{out} holds {names}, expected {want}")
    if any(p.is_dir() for p in out.iterdir()) or len(names) > 8:
        problems.append("the device tool returns at most 8 files and no nested folders")
    text = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else ""
    lines = text.splitlines()
    if not lines or len(lines) > MAX_LINES or len(text) > MAX_CHARS:
        problems.append(f"summary.txt: {len(lines)} lines, {len(text)} chars (<= {MAX_LINES}, "
                        f"<= {MAX_CHARS})")
    if any(len(ln) > WIDTH for ln in lines):
        problems.append(f"summary.txt: a line over {WIDTH} characters")
    for section in ("versions:", "phases", "tests:", "  tests-gpu:", "  tests-suite:",
                    "performance targets", "per op", "sweep:"):
        if section not in text:
            problems.append(f"summary.txt lacks {section!r}")
    ran = [r[0] for r in _phase_rows(work)]
    if ran != ["tests-gpu", "perf", "tests-suite"]:
        problems.append(f"phases run: {ran}")
    doc = _read_json(out / "results.json")
    if not doc or not doc.get("rows"):
        problems.append("results.json: missing or no rows")
    if not (work / "targets.txt").exists():
        problems.append("perf.targets did not run")
    return problems


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = argv.pop(0) if argv and argv[0] in ("--verdict", "--check-layout") else None
    if len(argv) != 2:
        print("usage: python perf/summary.py [--verdict | --check-layout] WORK DIR", file=sys.stderr)
        return 2
    work, out = Path(argv[0]), Path(argv[1])
    if mode is not None:
        problems = (verdict if mode == "--verdict" else check_layout)(work, out)
        for p in problems:
            print(f"gpu_check {mode[2:]}: {p}")
        return 1 if problems else 0
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(build(work, out)) + "\n"
    tmp = out / ".summary.tmp"
    tmp.write_text(text)
    tmp.replace(out / "summary.txt")  # never a half-written summary, even if killed
    return 0


if __name__ == "__main__":
    sys.exit(main())
