"""The suite's report: each test records its cases through the `report` fixture; the session writes them to the
file given with --reliability-report (docs/reliability.md) once every test has run."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from reliability.report import REPORT, Case, Report

STARTED = time.monotonic()


def pytest_addoption(parser):
    parser.addoption(
        "--reliability-report",
        default=None,
        metavar="PATH",
        help="write the reliability suite's cases and figures as Markdown to PATH (docs/reliability.md)",
    )


class Recorder:
    """What one test tells the report."""

    def __init__(self, report: Report, test: str):
        self.report, self.test = report, test

    def case(self, section: str, surface: str, given: str, expected: str, actual: str, unchanged: str = "-"):
        self.report.cases.append(Case(section, surface, given, expected, actual, unchanged, self.test))

    def figure(self, section: str, what: str, value: str) -> None:
        self.report.figure(section, what, value)


@pytest.fixture
def report(request) -> Recorder:
    return Recorder(REPORT, request.node.nodeid)


def pytest_runtest_logreport(report):
    # a test's outcome is its worst phase's: a failed setup or call fails its cases, a skip skips them
    if report.when == "call" or report.outcome != "passed":
        if REPORT.outcomes.get(report.nodeid) not in ("failed",):
            REPORT.outcomes[report.nodeid] = report.outcome


def pytest_sessionfinish(session):
    path = session.config.getoption("--reliability-report", default=None)
    if path:
        from reliability.report import write

        write(REPORT, Path(path), time.monotonic() - STARTED)
