"""The CI skip guard in tests/conftest.py: under CI=true a skipped test fails the run.

Each case runs a small throwaway suite in a child pytest that loads our
conftest as a plugin, so the guard is checked exactly as CI would meet it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

SUITE = {
    "skip": """
import pytest

@pytest.mark.skip(reason="needs a tool that is not installed")
def test_skipped():
    pass

def test_passes():
    pass
""",
    "module_skip": """
import pytest

pytest.skip("whole module skipped", allow_module_level=True)
""",
    "prerequisite": """
from tests.prerequisites import unavailable

def test_needs_a_missing_tool():
    unavailable("not installed: frobnicate")
""",
    "xfail_only": """
import pytest

@pytest.mark.xfail(reason="known bug")
def test_xfail():
    assert False

@pytest.mark.xfail(reason="fixed meanwhile")
def test_xpass():
    pass

def test_passes():
    pass
""",
}


def run_suite(tmp_path: Path, kind: str, *, ci: bool) -> subprocess.CompletedProcess[str]:
    ini = tmp_path / "pytest.ini"  # keeps the child away from the project's pytest settings
    ini.write_text("[pytest]\n")
    (tmp_path / f"test_{kind}.py").write_text(SUITE[kind])
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    if ci:
        env["CI"] = "true"
    command = [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider"]
    command += ["-p", "no:hypothesispytest", "--rootdir", str(tmp_path), "-c", str(ini)]
    return subprocess.run(
        [*command, str(tmp_path)],
        cwd=REPO,  # so that `tests.conftest` is importable
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_skip_fails_the_run_under_ci(tmp_path: Path) -> None:
    result = run_suite(tmp_path, "skip", ci=True)
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout + result.stderr
    assert "skipped tests are failures under CI=true" in result.stdout
    assert "test_skip.py::test_skipped: Skipped: needs a tool that is not installed" in (
        result.stdout
    )


def test_module_level_skip_fails_the_run_under_ci(tmp_path: Path) -> None:
    result = run_suite(tmp_path, "module_skip", ci=True)
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout + result.stderr
    assert "whole module skipped" in result.stdout


def test_xfail_and_xpass_are_allowed_under_ci(tmp_path: Path) -> None:
    result = run_suite(tmp_path, "xfail_only", ci=True)
    assert result.returncode == pytest.ExitCode.OK, result.stdout + result.stderr


def test_skip_is_allowed_outside_ci(tmp_path: Path) -> None:
    result = run_suite(tmp_path, "skip", ci=False)
    assert result.returncode == pytest.ExitCode.OK, result.stdout + result.stderr
    assert "failures under CI" not in result.stdout


def test_missing_prerequisite_is_a_failure_under_ci_and_a_skip_elsewhere(tmp_path: Path) -> None:
    ci = run_suite(tmp_path, "prerequisite", ci=True)
    assert ci.returncode == pytest.ExitCode.TESTS_FAILED, ci.stdout + ci.stderr
    assert "not installed: frobnicate -- CI must provide it" in ci.stdout
    local = run_suite(tmp_path, "prerequisite", ci=False)
    assert local.returncode == pytest.ExitCode.OK, local.stdout + local.stderr
    assert "1 skipped" in local.stdout
