"""The user commands work with the core install only (issue 12, "install what you use").

A user machine that runs ``broker-init`` / ``broker-logon`` / ``broker-info`` /
``broker-destroy`` / ``broker-submit`` or the payload wrapper installs the project
without extras. These tests (1) check that pyproject.toml keeps the server-side
packages out of the core dependencies, and (2) import the entry modules and run
their ``--help`` in a fresh interpreter whose import system refuses those
packages, so a new top-level import of Flask, gunicorn, SQLAlchemy, psycopg,
htcondor or python-pam on those paths fails here instead of on a user's laptop.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

# Import names of the packages that only the extras install.
EXTRA_ONLY_MODULES = (
    "flask",
    "gunicorn",
    "sqlalchemy",
    "alembic",
    "prometheus_client",
    "psycopg",
    "htcondor",
    "htcondor2",
    "classad",
    "classad2",
    "pam",
    "joserfc",
    "requests",
)

# Distribution names that must not be core dependencies.
EXTRA_ONLY_DISTRIBUTIONS = {
    "flask",
    "gunicorn",
    "sqlalchemy",
    "alembic",
    "prometheus-client",
    "psycopg",
    "htcondor",
    "python-pam",
    "joserfc",
    "requests",
}

_BLOCKER = textwrap.dedent(
    """
    import importlib.abc
    import sys

    BLOCKED = set(sys.argv[1].split(","))

    class RefuseExtras(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"blocked extra-only module {fullname}")
            return None

    sys.meta_path.insert(0, RefuseExtras())
    """
)


def _requirement_name(spec: str) -> str:
    name = spec
    for stop in "[<>=!~; ":
        name = name.split(stop, 1)[0]
    return name.strip().lower().replace("_", "-")


def _pyproject() -> dict[str, object]:
    with (REPO / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)


def test_core_dependencies_leave_server_packages_to_extras() -> None:
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    core = {_requirement_name(spec) for spec in project["dependencies"]}
    assert core & EXTRA_ONLY_DISTRIBUTIONS == set()
    extras = project["optional-dependencies"]
    for name in ("server", "postgres", "condor", "pam", "tokens", "all", "dev"):
        assert name in extras, f"missing extra [{name}]"
    everything = {_requirement_name(spec) for specs in extras.values() for spec in specs}
    # every package that left the core is still installable through an extra
    assert EXTRA_ONLY_DISTRIBUTIONS <= everything
    assert any("[all]" in spec for spec in extras["dev"]), "[dev] must pull [all] for the tests"


def _run_blocked(code: str) -> subprocess.CompletedProcess[str]:
    script = _BLOCKER + "\n" + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script, ",".join(EXTRA_ONLY_MODULES)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_blocker_really_blocks() -> None:
    result = _run_blocked("import flask")
    assert result.returncode != 0
    assert "blocked extra-only module flask" in result.stderr


@pytest.mark.parametrize(
    ("module", "entry", "prog"),
    [
        ("broker.cli.user", "init_main", "broker-init"),
        ("broker.cli.user", "logon_main", "broker-logon"),
        ("broker.cli.user", "info_main", "broker-info"),
        ("broker.cli.user", "destroy_main", "broker-destroy"),
        ("broker.cli.submit", "main", "broker-submit"),
    ],
)
def test_user_commands_run_without_extras(module: str, entry: str, prog: str) -> None:
    result = _run_blocked(
        f"""
        import sys
        sys.argv = [{prog!r}, "--help"]
        from {module} import {entry}
        {entry}()
        """
    )
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout
    assert "blocked" not in result.stderr


def test_payload_wrapper_imports_without_extras() -> None:
    result = _run_blocked(
        """
        import payload_wrapper.cli
        import payload_wrapper.api
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
