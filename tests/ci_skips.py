"""A pytest plugin: under ``CI=true`` a skipped test fails, so a missing tool or privilege cannot hide
part of the suite behind a green run. Skips stay skips on a developer's machine.

Covered under ``CI=true``: a skip in a test or its setup (``skipif`` markers, ``pytest.skip``, the
``require`` helper of conftest.py), a skip while collecting a module (a module-level ``importorskip`` or
``pytest.skip(allow_module_level=True)``), and an expected failure: an xfail is a known failure, so it
fails the run (``xfail_strict = true`` in pyproject.toml already fails an xfail that passes)."""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


def _reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if not _ci() or report.failed:
        return
    if report.passed and hasattr(report, "wasxfail"):  # a non-strict xfail that passed (XPASS)
        report.outcome = "failed"
        report.longrepr = f"xpassed under CI=true, where an xfail marker must go once the test passes: {report.wasxfail}"
        del report.wasxfail
    elif not report.skipped:
        return
    elif hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"xfailed under CI=true, where a known failure is a failure: {report.wasxfail}"
        del report.wasxfail  # else pytest's terminal still counts it as xfailed
    else:
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where every test must run: {_reason(report)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if _ci() and report.skipped:  # a module that skipped itself while being imported
        report.outcome = "failed"
        report.longrepr = f"module skipped under CI=true, where every test must run: {_reason(report)}"
