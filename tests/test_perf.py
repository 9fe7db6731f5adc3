"""Tests of the perf harness itself (python -m perf), on a reduced op set.

On CPU the tkern provider runs in Triton's interpreter; the same file runs on CUDA (do_bench timer,
torch.compile provider included).
"""

import csv
import json
import math

import pytest
import torch

import perf  # noqa: F401
from perf import cli, report
from perf.cases import local_response_norm as lrn_case
from perf.cases import activation_dropout as ad_case
from perf.runner import COLUMNS, WRONG

META_KEYS = {"device", "torch", "triton", "commit", "timestamp", "peak_gbps"}
GPU = torch.cuda.is_available()


def _run(tmp_path, *extra, name="out"):
    out = tmp_path / name
    status = cli.main(["--quick", "--no-progress", "--out", str(out), *extra])
    return status, out


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Quick mode end to end: two ops (one with a bias+GELU dropout case), three batch sizes."""
    tmp = tmp_path_factory.mktemp("perf")
    out = tmp / "quick"
    status = cli.main(["--quick", "--no-progress", "--ops", "activation_dropout,lrn",
                       "--layouts", "contiguous", "--providers", "eager,compile,tkern",
                       "--out", str(out)])
    return status, out


def _csv_rows(path):
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        return header, [dict(zip(header, r)) for r in reader]


def test_quick_end_to_end(quick_run, capsys):
    status, out = quick_run
    assert status == 0
    header, rows = _csv_rows(out / "results.csv")
    assert header == COLUMNS
    ops = {r["op"] for r in rows}
    assert ops == {"activation_dropout", "local_response_norm"}
    for op in ops:
        assert len({int(r["batch"]) for r in rows if r["op"] == op}) >= 3
    # every (case, batch) has each provider in each mode
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "full"}
    assert {r["provider"] for r in rows} == {"eager", "torch.compile", "tkern"}
    for r in rows:
        if r["provider"] == "torch.compile" and not GPU:
            assert all(r[m] == "n/a" for m in COLUMNS[7:14]), r
            continue
        assert r["ms_p50"] not in ("n/a", WRONG), r
        p50, p20, p80 = float(r["ms_p50"]), float(r["ms_p20"]), float(r["ms_p80"])
        assert 0 < p20 <= p50 <= p80
        assert float(r["gbps"]) > 0 and float(r["pct_peak"]) > 0
        if r["provider"] == "eager":
            assert float(r["speedup_vs_eager"]) == pytest.approx(1.0)
        assert math.isnan(float(r["peak_mem_mb"])) != GPU
    if pytest.importorskip("matplotlib"):
        assert (out / "activation_dropout.png").stat().st_size > 0
        assert (out / "local_response_norm.png").stat().st_size > 0


def test_json_schema(quick_run):
    _, out = quick_run
    doc = json.loads((out / "results.json").read_text())
    assert set(doc) == {"meta", "rows"}
    assert META_KEYS <= set(doc["meta"])
    assert doc["meta"]["peak_gbps"] > 0
    assert doc["meta"]["failures"] == []
    _, csv_rows = _csv_rows(out / "results.csv")
    assert len(doc["rows"]) == len(csv_rows) > 0
    for r in doc["rows"]:
        assert list(r) == COLUMNS
        assert isinstance(r["batch"], int)
    if not GPU:
        assert "NOT GPU results" in doc["meta"]["note"]


def test_cpu_banner_and_table(tmp_path, capsys):
    status, out = _run(tmp_path, "--ops", "lrn", "--batches", "1", "--modes", "fwd", "--no-plots")
    assert status == 0
    captured = capsys.readouterr()
    assert "tkern GB/s" in captured.out and "local_response_norm" in captured.out
    if not GPU:
        assert "NOT GPU results" in captured.err and "NOT GPU results" in captured.out


def _garbage_lrn(x):
    return lrn_case.eager_lrn(x) * 1.5 + 0.1


class _WrongGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return lrn_case.eager_lrn(x.detach())

    @staticmethod
    def backward(ctx, dy):
        return 2 * dy


@pytest.mark.parametrize("bad", ["output", "grad", "raises"])
def test_wrong_provider_fails_loudly(tmp_path, monkeypatch, capsys, bad):
    def raises(x):
        raise RuntimeError("kernel exploded")

    fn = {"output": _garbage_lrn, "grad": _WrongGrad.apply, "raises": raises}[bad]
    monkeypatch.setattr(lrn_case, "tkern_lrn", fn)
    status, out = _run(tmp_path, "--ops", "lrn", "--batches", "1,2", "--no-plots")
    assert status & cli.EXIT_WRONG
    _, rows = _csv_rows(out / "results.csv")
    tk = [r for r in rows if r["provider"] == "tkern"]
    assert len(tk) == 6 and all(r["ms_p50"] == WRONG for r in tk)
    assert all(r["ms_p50"] not in ("n/a", WRONG) for r in rows if r["provider"] == "eager")
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert len(meta["failures"]) == 2 and {f["provider"] for f in meta["failures"]} == {"tkern"}
    err = capsys.readouterr().err
    assert "FAILED" in err and "provider=tkern" in err


def test_wrong_dropout_rate_fails(tmp_path, monkeypatch):
    # right activation, wrong p: only the statistical check can see it
    monkeypatch.setattr(ad_case, "_conv_fns", lambda p: (
        lambda x: torch.nn.functional.dropout(torch.relu(x), p, True),
        lambda x: torch.relu(x),
        lambda x: torch.nn.functional.dropout(torch.relu(x), 0.5, True) * (0.5 / (1 - p))))
    monkeypatch.setattr(ad_case, "QUICK_CONV", (16, 12, 12))
    status, out = _run(tmp_path, "--ops", "activation_dropout", "--layouts", "channels_last",
                       "--batches", "2", "--modes", "fwd", "--no-plots")
    assert status & cli.EXIT_WRONG
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert [f["provider"] for f in meta["failures"]] == ["tkern"]
    assert "dropped fraction" in meta["failures"][0]["error"]


def _with_scaled_times(src, dst, factor):
    doc = json.loads(src.read_text())
    for r in doc["rows"]:
        if isinstance(r["ms_p50"], float):
            r["ms_p50"] *= factor
    dst.write_text(json.dumps(doc))


def test_gate(tmp_path, quick_run, capsys):
    _, out = quick_run
    results = out / "results.json"
    rows = report.read_rows(results)
    # an equal baseline never trips; nor does one made slower than reality
    matched, bad = report.compare(rows, rows, 0.10)
    assert matched > 0 and bad == []
    # a baseline made 20% faster trips the 10% gate on every timed row, not the 30% one
    fast = [{**r, "ms_p50": r["ms_p50"] / 1.2} if report.is_num(r["ms_p50"]) else r for r in rows]
    matched, bad = report.compare(rows, fast, 0.10)
    assert len(bad) == matched > 0
    assert report.compare(rows, fast, 0.30)[1] == []
    assert "slower than the baseline" in report.format_offenders(bad, 0.10)

    # through the command line, against a real fresh run
    lrn = ["--ops", "lrn", "--batches", "1,2", "--modes", "fwd", "--no-plots"]
    status, first = _run(tmp_path, *lrn, name="first")
    assert status == 0
    _with_scaled_times(first / "results.json", tmp_path / "faster.json", 0.01)
    _with_scaled_times(first / "results.json", tmp_path / "slower.json", 100.0)
    capsys.readouterr()
    status, _ = _run(tmp_path, *lrn, "--compare", str(tmp_path / "faster.json"), "--max-slowdown",
                     "0.10", name="second")
    assert status == cli.EXIT_GATE
    err = capsys.readouterr().err
    assert "perf gate" in err and "local_response_norm" in err
    status, _ = _run(tmp_path, *lrn, "--compare", str(tmp_path / "slower.json"), name="third")
    assert status == 0
    # a baseline that matches nothing is an error, not a silent pass
    status, _ = _run(tmp_path, "--ops", "lrn", "--batches", "4", "--modes", "fwd", "--no-plots",
                     "--compare", str(tmp_path / "slower.json"), name="fourth")
    assert status == cli.EXIT_GATE


def test_missing_op_is_skipped(tmp_path, monkeypatch, capsys):
    import tkern

    monkeypatch.delattr(tkern, "weight_norm", raising=False)
    status, out = _run(tmp_path, "--ops", "weight_norm", "--no-plots")
    assert status == 0
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert "op not available" in meta["skipped_ops"]["weight_norm"]
    assert "op not available" in capsys.readouterr().err


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for opt in ("--ops", "--dtypes", "--batches", "--modes", "--layouts", "--providers", "--quick",
                "--out", "--compare", "--max-slowdown", "--time-budget", "--gate-providers"):
        assert opt in text
    for action in cli.build_parser()._actions:
        assert action.help, action.option_strings


def test_batch_and_dtype_parsing():
    assert cli.parse_batches("pow2:16") == [1, 2, 4, 8, 16]
    assert cli.parse_batches("8,2,2") == [2, 8]
    assert cli.parse_dtypes("bf16,float32") == [torch.bfloat16, torch.float32]
    with pytest.raises(Exception):
        cli.parse_batches("0")


def test_time_budget_stops_cleanly(tmp_path, capsys):
    status, out = _run(tmp_path, "--ops", "lrn,activation_dropout", "--time-budget", "0",
                       "--no-plots")
    assert status == 0
    header, rows = _csv_rows(out / "results.csv")
    assert header == COLUMNS and rows == []
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert any("time budget" in n for n in meta["notes"])
    assert "time budget" in capsys.readouterr().err


def test_out_of_memory_ends_the_sweep(tmp_path, monkeypatch):
    make = lrn_case._make

    def make_oom(shape, layout):
        inner = make(shape, layout)

        def f(batch, dtype, device):
            if batch >= 2:
                raise torch.OutOfMemoryError("simulated: out of memory")
            return inner(batch, dtype, device)

        return f

    monkeypatch.setattr(lrn_case, "_make", make_oom)
    status, out = _run(tmp_path, "--ops", "lrn", "--batches", "1,2,4", "--modes", "fwd", "--no-plots")
    assert status == 0
    _, rows = _csv_rows(out / "results.csv")
    assert {int(r["batch"]) for r in rows} == {1}
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert any("out of memory at batch 2" in n for n in meta["notes"])


def test_provider_failing_while_timed_fails_its_row(tmp_path, monkeypatch):
    calls = []

    def flaky(x):  # right the first time (the check), then broken
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("launch failed")
        return lrn_case.eager_lrn(x)

    monkeypatch.setattr(lrn_case, "tkern_lrn", flaky)
    status, out = _run(tmp_path, "--ops", "lrn", "--batches", "1", "--no-plots")
    assert status & cli.EXIT_WRONG
    _, rows = _csv_rows(out / "results.csv")
    assert [r["ms_p50"] for r in rows if r["provider"] == "tkern"] == [WRONG] * 3
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert "launch failed" in meta["failures"][0]["error"]


def test_targets_read_the_issues_thresholds():
    """perf.targets on synthetic rows: geomean ratios, bandwidth minima, the memory slack."""
    from perf import targets

    def row(op, mode, provider, ms, batch=8, pct=90.0, mem=100.0, dtype="bfloat16"):
        return dict(op=op, mode=mode, provider=provider, dtype=dtype, batch=batch, shape="4x8",
                    layout="contiguous", ms_p50=ms, pct_peak=pct, peak_mem_mb=mem)

    rows = [row("local_response_norm", "full", "eager", 6.0), row("local_response_norm", "full",
            "tkern", 1.0), row("local_response_norm", "full", "torch.compile", 1.2),
            row("local_response_norm", "fwd", "tkern", 1.0, pct=70.0),
            row("activation_dropout", "full", "eager", 2.5, mem=10.0),
            row("activation_dropout", "full", "tkern", 1.0, mem=10.0 - 8 * 32 / 2**20 - 1e-3)]
    got = {what: (status, value) for _, what, status, value in targets.evaluate(rows)}
    lrn = "local_response_norm full bfloat16: >= "
    assert got[lrn + "5.0x eager (geomean)"] == ("PASS", "6.00x over 1 cases")
    assert got[lrn + "1.5x torch.compile (geomean)"] == ("FAIL", "1.20x over 1 cases")
    assert got["local_response_norm fwd: >= 76.9% of copy bandwidth on every row (min)"] == (
        "FAIL", "70.0% (bfloat16, 4x8, batch 8, 1 rows)")
    assert got["activation_dropout full bfloat16: >= 2.0x eager (geomean)"][0] == "PASS"
    assert got["activation_dropout full float32: >= 2.0x eager (geomean)"][0] == "NO DATA"
    memory = "activation_dropout full: peak memory below eager's by >= the mask (min slack)"
    assert got[memory][0] == "PASS"
    assert got["batch_norm full bfloat16: >= 1.3x eager (geomean)"][0] == "NO DATA"
    # a tkern row that failed its check fails every target of its op
    rows.append(row("local_response_norm", "full", "tkern", "WRONG", batch=16))
    got = {what: status for _, what, status, _ in targets.evaluate(rows)}
    assert got[lrn + "5.0x eager (geomean)"] == "FAIL"


def test_plot_legend_lists_only_drawn_providers():
    """Off-GPU torch.compile is n/a: no line, so no legend entry either."""
    rows = [dict(provider=p, ms_p50=v) for p, v in (("eager", 1.0), ("torch.compile", report.NA),
                                                   ("tkern", 0.5), ("tkern", report.NA))]
    assert report.drawn_providers(rows) == ["eager", "tkern"]
    rows.append(dict(provider="torch.compile", ms_p50=0.7))
    assert report.drawn_providers(rows) == ["eager", "torch.compile", "tkern"]


def test_help_examples_name_folders_they_make():
    """--help's --compare example reads a results.json that an earlier example writes (no
    folder that exists only on someone's machine)."""
    import pathlib
    import re

    examples = "\n".join(line for line in cli.EPILOG.splitlines()
                          if line.strip().startswith("python -m perf"))
    outs = re.findall(r"--out (\S+)", examples)
    compares = re.findall(r"--compare (\S+)", examples)
    assert compares
    for path in compares:
        path = pathlib.PurePosixPath(path)
        assert path.name == "results.json" and str(path.parent) in outs, path


def test_torchvision_train_step_cases_and_their_providers():
    """resnet50 and mobilenet_v2 training steps when torchvision imports; only they get the
    torch.compile(tkern.convert(model)) provider, and their rows report images/s."""
    from perf.cases import train_step
    from perf.runner import PEERS, PROVIDERS, Sweep
    cases = train_step.torchvision_cases(dict(image=32, width=0, hidden=0, classes=10))
    if not cases:
        pytest.skip("torchvision is not importable with this torch")
    assert [c.label for c in cases] == ["torchvision resnet50", "torchvision mobilenet_v2"]
    assert all(c.extra["compile_tkern"] and c.extra["images"] for c in cases)
    assert any(type(m).__name__ == "BatchNorm2d" and m.activation == "relu"
               for m in cases[0].extra["model"].modules())
    sweep = Sweep.__new__(Sweep)
    sweep.cfg = type("Cfg", (), dict(providers=list(PROVIDERS), device=torch.device("cpu")))()
    # no flag_gems row: the peer has no whole-model case
    assert list(sweep._providers(cases[0])) == [p for p in PROVIDERS if p not in PEERS]
    alexnet = train_step.cases(quick=True)[0]
    assert "tkern+compile" not in sweep._providers(alexnet)


def _fake_flag_gems(wrong_dropout=False):
    """A stand-in for FlagGems' functions used by perf/cases/gems.py, written with torch ops."""
    import types

    F = torch.nn.functional

    def batch_norm(x, w, b, rm, rv, training, momentum, eps):
        dims = [d for d in range(x.dim()) if d != 1]
        var, mean = torch.var_mean(x.float(), dims, unbiased=False)
        F.batch_norm(x.detach(), rm, rv, None, None, True, momentum, eps)  # running stats
        return F.batch_norm(x, None, None, w, b, True, 0.0, eps), mean, torch.rsqrt(var + eps)

    def batch_norm_backward(dy, x, w, rm, rv, mean, inv_std, train, eps, mask):
        xx, ww = x.detach().requires_grad_(), w.detach().requires_grad_()
        bb = torch.zeros_like(ww, requires_grad=True)
        with torch.enable_grad():  # called inside an autograd Function's backward
            y = F.batch_norm(xx, None, None, ww, bb, True, 0.0, eps)
            return torch.autograd.grad(y, (xx, ww, bb), dy)

    def dropout(x, p, train):
        mask = torch.rand_like(x, dtype=torch.float32) >= p
        return x * mask / (1 - p) * (1.5 if wrong_dropout else 1.0), mask

    def dropout_backward(dy, mask, scale):
        return dy * mask * scale

    fake = types.ModuleType("flag_gems")
    fake.__version__ = "fake"
    fake.ops = types.SimpleNamespace(batch_norm=batch_norm, batch_norm_backward=batch_norm_backward,
                                     dropout=dropout, dropout_backward=dropout_backward)
    fake.weight_norm = lambda v, g, dim: torch._weight_norm(v, g, dim)
    return fake


@pytest.mark.parametrize("wrong", [False, True])
def test_flag_gems_peer_provider(tmp_path, monkeypatch, capsys, wrong):
    """Where flag_gems imports, it is a provider of batch_norm, dropout and weight norm, checked
    like every provider; a wrong peer marks its rows WRONG but fails neither the sweep nor a
    target (here a torch-written stand-in, on CPU)."""
    import sys

    from perf import targets
    from perf.cases import gems

    monkeypatch.setitem(sys.modules, "flag_gems", _fake_flag_gems(wrong))
    gems.module.cache_clear()
    try:
        status, out = _run(tmp_path, "--ops", "bn,bn_relu,dropout,wn,lrn", "--batches", "2", "--modes",
                           "fwd,full", "--layouts", "contiguous", "--no-plots")
    finally:
        gems.module.cache_clear()
    assert status == 0, capsys.readouterr().err
    rows = report.read_rows(out / "results.json")
    peer = [r for r in rows if r["provider"] == "flag_gems"]
    assert {r["op"] for r in peer} == {"batch_norm", "batch_norm_relu", "activation_dropout",
                                       "weight_norm"}  # LRN: FlagGems has none, so no rows
    bad = [r for r in peer if r["ms_p50"] == WRONG]
    if wrong:
        assert {r["op"] for r in bad} == {"activation_dropout"}
        assert all(f["provider"] == "flag_gems" for f in json.loads(
            (out / "results.json").read_text())["meta"]["failures"])
    else:
        assert not bad and all(r["ms_p50"] > 0 for r in peer)
    assert "flag_gems ms" in capsys.readouterr().out
    for _, what, status, _ in targets.evaluate(rows):
        assert status != "FAIL" or not wrong or "flag_gems" not in what


def test_flag_gems_absent_is_no_provider(tmp_path, monkeypatch):
    import sys

    from perf.cases import gems

    monkeypatch.setitem(sys.modules, "flag_gems", None)  # import raises ImportError
    gems.module.cache_clear()
    try:
        assert gems.available()[0] is False
        status, out = _run(tmp_path, "--ops", "wn", "--batches", "1", "--modes", "fwd", "--no-plots")
    finally:
        gems.module.cache_clear()
    assert status == 0
    assert {r["provider"] for r in report.read_rows(out / "results.json")} == {
        "eager", "torch.compile", "tkern"}


def test_gpu_check_summary_stays_readable(tmp_path):
    """summary.txt keeps to 120 lines and 11,000 characters however many tests fail, lists the
    counts, each failure's first line (up to its cap), and tells a cut phase apart."""
    from perf import summary

    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    (work / "env.json").write_text(json.dumps({"commit": "abc", "card": "H100", "torch": "2.11.0"}))
    (work / "phases.tsv").write_text("tests-gpu\t60\t41\t0\nperf\t165\t170\t0\n"
                                     "tests-suite\t185\t190\t124\n")
    lines = [json.dumps({"collected": 500})]
    lines += [json.dumps({"nodeid": f"tests/test_x.py::test_{i}", "when": "call", "outcome": "failed",
                          "first": "AssertionError: " + "x" * 300}) for i in range(200)]
    lines += [json.dumps({"nodeid": f"tests/test_y.py::test_{i}", "when": "call", "outcome": "passed",
                          "first": ""}) for i in range(250)]
    (work / "outcomes-tests-suite.jsonl").write_text("\n".join(lines) + "\n{\"nodeid\": ")  # cut
    (work / "targets.txt").write_text("#2  activation_dropout full bfloat16: >= 2.0x eager (geomean)"
                                      "  PASS     2.31x over 9 cases\n")
    assert summary.main([str(work), str(out)]) == 0
    text = (out / "summary.txt").read_text()
    rows = text.splitlines()
    assert len(rows) <= summary.MAX_LINES and len(text) <= summary.MAX_CHARS
    assert all(len(r) <= summary.WIDTH for r in rows)
    assert "tests-suite: 250 passed, 200 failed, 0 error, 0 skipped of 500 collected, 50 NOT RUN" in text
    assert "no end of session" in text and "CUT at budget" in text
    assert text.count("FAIL tests/test_x.py::") == summary.MAX_FAILURES
    assert "PASS    #2 activation_dropout full bfloat16: >= 2.0x eager  2.31x over 9 cases" in text
    assert "tests-gpu: no outcomes" in text
    assert summary.main(["--verdict", str(work), str(out)]) == 1  # failures and a cut phase
