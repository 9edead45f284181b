"""pytest plugin for .ci/run's free-threaded step (``python -m pytest -p gil_check``, with .ci on
PYTHONPATH): prints ``gil: False`` after the summary, and fails the session if the GIL was on at
its end (a C extension imported without declaring itself free-threading compatible turns it on)."""

from __future__ import annotations

import sys

import pytest


def _gil() -> bool:
    is_enabled = getattr(sys, "_is_gil_enabled", None)
    return True if is_enabled is None else bool(is_enabled())


def pytest_report_header(config: pytest.Config) -> str:
    return f"gil: {_gil()}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.write_line(f"gil: {_gil()}")


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _gil():
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
