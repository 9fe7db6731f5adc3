"""A pytest plugin that writes each test's outcome as it happens, for gpu_check's summary.

``TKERN_OUTCOMES=FILE python -m pytest -p perf.pytest_outcomes ...`` appends JSON lines to FILE:
``{"collected": n}`` once, then one ``{"nodeid", "outcome", "first"}`` per finished test
(``first``: the failure's or skip's first line), then ``{"exitstatus": n}`` at the end.  Every
line is flushed when written, so a run that is cut (SIGINT) or killed still leaves its counts;
under xdist the controller writes, from the workers' reports.
"""

from __future__ import annotations

import json
import os

import pytest

_STATE = {"file": None, "seen": set()}


def _write(obj) -> None:
    f = _STATE["file"]
    if f is not None:
        f.write(json.dumps(obj) + "\n")
        f.flush()


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")


def pytest_configure(config):
    path = os.environ.get("TKERN_OUTCOMES")
    if path and not _is_worker(config):
        _STATE["file"] = open(path, "a")


def pytest_collection_modifyitems(session, config, items):
    if not _is_worker(config) and not getattr(config.option, "numprocesses", None):
        _write({"collected": len(items)})


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    if "collected" not in _STATE["seen"]:  # every worker collects the same list
        _STATE["seen"].add("collected")
        _write({"collected": len(ids)})


def _first_line(report) -> str:
    longrepr = report.longrepr
    if longrepr is None:
        return ""
    if isinstance(longrepr, tuple):  # a skip: (file, line, reason)
        return str(longrepr[2]).splitlines()[0] if longrepr[2] else ""
    crash = getattr(longrepr, "reprcrash", None)
    text = getattr(crash, "message", None) or str(longrepr)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[0][:300] if lines else ""


def pytest_runtest_logreport(report):
    if _STATE["file"] is None:
        return
    if report.when == "call" or report.outcome != "passed" or (report.when == "setup" and report.skipped):
        if report.when != "call" and report.outcome == "passed":
            return
        outcome = report.outcome
        if report.when != "call" and report.failed:
            outcome = "error"
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
        key = (report.nodeid, outcome)
        if key in _STATE["seen"]:
            return
        _STATE["seen"].add(key)
        _write({"nodeid": report.nodeid, "when": report.when, "outcome": outcome,
                "first": "" if outcome == "passed" else _first_line(report)})


def pytest_sessionfinish(session, exitstatus):
    _write({"exitstatus": int(exitstatus)})
