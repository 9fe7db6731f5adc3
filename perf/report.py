"""Outputs of a sweep: results.csv, results.json, one PNG per op, the terminal table, and the
regression gate (``--compare``).

Metric cells hold a number, ``"n/a"`` (provider unavailable on this machine: torch.compile off-GPU)
or ``"WRONG"`` (the provider failed its correctness check or raised; the reason is in
``meta.failures`` and was printed).  NaN (peak memory on CPU) is ``nan`` in the CSV, ``null`` in
the JSON.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from .runner import COLUMNS, KEY, METRICS, NA, PROVIDERS, WRONG


def is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _cell(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([_cell(r[c]) for c in COLUMNS])


def _json_value(v):
    return None if isinstance(v, float) and math.isnan(v) else v


def write_json(meta: dict, rows: list[dict], path: Path) -> None:
    doc = {"meta": meta, "rows": [{c: _json_value(r[c]) for c in COLUMNS} for r in rows]}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a results.json (or results.csv) written by this harness."""
    path = Path(path)
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        for r in rows:
            r["batch"] = int(r["batch"])
            for m in METRICS:
                try:
                    r[m] = float(r[m])
                except ValueError:
                    pass  # "n/a" / "WRONG"
        return rows
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or "rows" not in doc:
        raise ValueError(f"{path}: not a perf results.json (no 'rows')")
    return [{**r, **{m: (float("nan") if r.get(m) is None else r[m]) for m in METRICS}}
            for r in doc["rows"]]


def key_of(row: dict) -> tuple:
    return tuple(int(row[k]) if k == "batch" else str(row[k]) for k in KEY)


def compare(rows: list[dict], baseline: list[dict], max_slowdown: float,
            providers: list[str] | None = None) -> tuple[int, list[dict]]:
    """Rows slower than the baseline's matching row by more than ``max_slowdown`` (a fraction),
    comparing medians.  Returns (number of rows compared, offenders with their baseline time)."""
    from .runner import PEERS

    base = {key_of(r): r for r in baseline}
    matched, bad = 0, []
    for r in rows:
        if (providers and r["provider"] not in providers) or (not providers and r["provider"] in PEERS):
            continue  # a peer's speed (flag_gems) gates nothing unless asked for
        b = base.get(key_of(r))
        if b is None or not is_num(b["ms_p50"]) or b["ms_p50"] <= 0 or not is_num(r["ms_p50"]):
            continue
        matched += 1
        slowdown = r["ms_p50"] / b["ms_p50"] - 1.0
        if slowdown > max_slowdown:
            bad.append({**r, "baseline_ms_p50": b["ms_p50"], "slowdown": slowdown})
    return matched, bad


def format_offenders(bad: list[dict], max_slowdown: float) -> str:
    lines = [f"perf gate: {len(bad)} row(s) slower than the baseline by more than "
             f"{100 * max_slowdown:.0f}%:"]
    hdr = ["op", "mode", "provider", "dtype", "batch", "shape", "layout", "baseline ms", "now ms", "slower"]
    body = [[str(r[k]) for k in KEY] + [f"{r['baseline_ms_p50']:.4g}", f"{r['ms_p50']:.4g}",
                                         f"+{100 * r['slowdown']:.1f}%"] for r in bad]
    lines += _grid(hdr, body)
    return "\n".join(lines)


def _grid(hdr: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(hdr)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i >= 4 else c.ljust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return [fmt(hdr), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]


def _fmt(v, spec: str) -> str:
    if is_num(v):
        return format(v, spec)
    if isinstance(v, float):
        return "-"
    return str(v)


def table(rows: list[dict], providers: list[str]) -> str:
    """One line per (op, shape, layout, dtype, batch, mode): each provider's median ms, then
    tkern's GB/s, % of copy bandwidth, and speedups."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        k = (r["op"], r["shape"], r["layout"], r["dtype"], r["batch"], r["mode"])
        groups.setdefault(k, {})[r["provider"]] = r
    provs = [p for p in PROVIDERS if p in providers]
    hdr = ["op", "shape", "layout", "dtype", "batch", "mode"] + [f"{p} ms" for p in provs]
    if "tkern" in provs:
        hdr += ["tkern GB/s", "%peak", "x eager"] + (["x compile"] if "torch.compile" in provs else [])
    body = []
    for k, by in groups.items():
        line = [k[0], k[1], k[2], k[3], str(k[4]), k[5]]
        line += [_fmt(by.get(p, {}).get("ms_p50", "-"), ".4g") for p in provs]
        if "tkern" in provs:
            t = by.get("tkern", {})
            line += [_fmt(t.get("gbps", "-"), ".1f"), _fmt(t.get("pct_peak", "-"), ".0f"),
                     _fmt(t.get("speedup_vs_eager", "-"), ".2f")]
            if "torch.compile" in provs:
                c = by.get("torch.compile", {})
                ok = is_num(t.get("ms_p50")) and is_num(c.get("ms_p50"))
                line.append(f"{c['ms_p50'] / t['ms_p50']:.2f}" if ok else _fmt(c.get("ms_p50", "-"), ""))
        body.append(line)
    return "\n".join(_grid(hdr, body))


# ------------------------------------------------------------------------------------------ plots
_COLORS = {"eager": "#7f7f7f", "torch.compile": "#1f77b4", "tkern": "#d62728",
           "tkern+compile": "#9467bd", "flag_gems": "#2ca02c"}
_STYLES = {"fwd": "-", "bwd": "--", "full": ":"}
_MARKERS = ["o", "s", "^", "D"]


def drawn_providers(rows: list[dict]) -> list[str]:
    """The providers with a line in a plot of ``rows`` (a timed point), in legend order: the
    legend lists no torch.compile where it is n/a (off-GPU)."""
    drawn = {r["provider"] for r in rows if is_num(r["ms_p50"])}
    return [p for p in _COLORS if p in drawn]


def plot(rows: list[dict], out_dir: Path, title_note: str = "") -> list[Path]:
    """One PNG per op: a row of panels per (shape, layout); left GB/s, right speedup vs eager
    (log scales); x is the batch size; colour = provider, line style = mode, marker = dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    paths = []
    for op in dict.fromkeys(r["op"] for r in rows):
        ops_rows = [r for r in rows if r["op"] == op]
        panels = list(dict.fromkeys((r["shape"], r["layout"]) for r in ops_rows))
        dtypes = list(dict.fromkeys(r["dtype"] for r in ops_rows))
        fig, axes = plt.subplots(len(panels), 2, figsize=(12, 2.8 * len(panels) + 1.0), squeeze=False)
        for (shape, layout), (ax_bw, ax_sp) in zip(panels, axes):
            sel = [r for r in ops_rows if r["shape"] == shape and r["layout"] == layout]
            for prov in PROVIDERS:
                for mode in _STYLES:
                    for di, dt in enumerate(dtypes):
                        pts = sorted((r["batch"], r) for r in sel if r["provider"] == prov
                                     and r["mode"] == mode and r["dtype"] == dt and is_num(r["ms_p50"]))
                        if not pts:
                            continue
                        xs = [b for b, _ in pts]
                        kw = dict(color=_COLORS[prov], linestyle=_STYLES[mode],
                                  marker=_MARKERS[di % len(_MARKERS)], markersize=4)
                        ax_bw.plot(xs, [r["gbps"] for _, r in pts], **kw)
                        if prov != "eager":
                            ax_sp.plot(xs, [r["speedup_vs_eager"] for _, r in pts], **kw)
            ax_bw.set_title(f"{op} {shape} {layout}: GB/s (minimal bytes)", fontsize=9)
            ax_sp.set_title(f"{op} {shape} {layout}: speedup vs eager", fontsize=9)
            ax_sp.axhline(1.0, color="black", linewidth=0.6)
            ax_bw.set_yscale("log")  # GB/s and ratios span orders of magnitude across batches
            ax_sp.set_yscale("log", base=2)
            for ax in (ax_bw, ax_sp):
                ax.set_xscale("log", base=2)
                ax.set_xlabel("batch size", fontsize=8)
                ax.tick_params(labelsize=7)
                ax.grid(True, alpha=0.3)
        drawn = [r for r in ops_rows if is_num(r["ms_p50"])]  # the legend names what is drawn
        provs = {r["provider"] for r in drawn}
        modes = {r["mode"] for r in drawn}
        handles = [Line2D([], [], color=_COLORS[p], label=p) for p in drawn_providers(ops_rows)]
        handles += [Line2D([], [], color="black", linestyle=s, label=m) for m, s in _STYLES.items()
                    if m in modes]
        handles += [Line2D([], [], color="black", linestyle="", marker=_MARKERS[i % len(_MARKERS)],
                           label=d) for i, d in enumerate(dtypes)]
        height = fig.get_figheight()  # title, then the legend, then the panels (in inches)
        fig.suptitle(f"{op} {title_note}", fontsize=10, y=1 - 0.08 / height, va="top")
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.35 / height),
                   ncol=len(handles), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / height))
        path = out_dir / f"{op}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


__all__ = ["compare", "format_offenders", "plot", "read_rows", "table", "write_csv", "write_json",
           "NA", "WRONG"]
