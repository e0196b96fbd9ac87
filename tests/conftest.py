"""Suite-wide fixtures and hooks.

Keep each block self-contained: several people add to this file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from tests.prerequisites import (
    in_ci,
    must_be_root,  # noqa: F401 - fixture for @needs_root
)

# Fixture plugins shared by several test packages (see each module's docstring).
pytest_plugins = ["tests.pgcluster"]

# --------------------------------------------------------------------------- hypothesis

# Property tests judge correctness, not speed: on two shared cores Hypothesis's
# per-example deadline and its "input generation is slow" check fail for load alone.
settings.register_profile("broker", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("broker")

# --------------------------------------------------------------------------- process state


@pytest.fixture(autouse=True)
def _restore_process_state() -> Iterator[None]:
    """Give every test the environment and umask the previous test started with.

    Code under test (the payload wrapper above all) rewrites os.environ and the
    umask; without this, one test's leftovers would change the next test's result.
    """
    saved_env = dict(os.environ)
    saved_umask = os.umask(0o022)
    os.umask(saved_umask)
    yield
    os.umask(saved_umask)
    for key in [k for k in os.environ if k not in saved_env]:
        del os.environ[key]
    for key, value in saved_env.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


# --------------------------------------------------------------------------- CI skip guard
# Under CI=true a skipped test is a failure: CI installs everything the suite
# needs, so a skip there means a test silently did not run. Expected failures
# (xfail) stay allowed. scripts/test checks the JUnit XML as a second line.


class _SkipGuard:
    """Records skips (at collection or run time) and fails the session under CI."""

    def __init__(self) -> None:
        self.skips: list[tuple[str, str]] = []

    def _note(self, report: pytest.CollectReport | pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            longrepr = report.longrepr
            reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
            self.skips.append((report.nodeid or str(report.fspath), reason))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._note(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self._note(report)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.skips and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.skips:
            return
        terminalreporter.section("skipped tests are failures under CI=true", red=True, bold=True)
        for nodeid, reason in self.skips:
            terminalreporter.line(f"SKIPPED {nodeid}: {reason}", red=True)
        terminalreporter.line(
            "CI must run every test: install what these tests need in scripts/test, "
            "or fix the skip condition.",
            red=True,
        )


def pytest_configure(config: pytest.Config) -> None:
    if in_ci() and not config.pluginmanager.has_plugin("broker-skip-guard"):
        config.pluginmanager.register(_SkipGuard(), "broker-skip-guard")
