"""broker-submit against a real broker: credential checks, --dry-run output, no schedd."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import htcondor2
import pytest

from tests.brokerserver import RunningBroker, start_broker
from tests.pkifixtures import GridPki, grid_pki  # noqa: F401 - fixture

BIN = Path(sys.executable).parent
ALICE = "/DC=org/DC=example/CN=Alice"


@pytest.fixture(scope="module")
def broker(grid_pki: GridPki) -> Iterator[RunningBroker]:  # noqa: F811 - fixture parameter
    base = Path(tempfile.mkdtemp(prefix="submit-broker-"))
    running = start_broker(grid_pki, base)
    try:
        alice = running.client("alice")
        alice.delegate(
            alice.identity.load(),
            username="alice",
            name="analysis",
            stored_hours=48,
            now=datetime.now(UTC),
        )
        yield running
    finally:
        running.stop()
        shutil.rmtree(base, ignore_errors=True)


def _submit(
    broker: RunningBroker,
    who: str,
    *args: str,
) -> subprocess.CompletedProcess[str]:
    pki = broker.pki
    env = {**broker.cli_env(), "CONDOR_CONFIG": "/dev/null"}
    return subprocess.run(
        [
            str(BIN / "broker-submit"),
            *args,
            "--cert",
            str(pki.cert_path(who)),
            "--key",
            str(pki.key_path(who)),
            "--ca-dir",
            str(pki.ca_dir),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def job(tmp_path: Path) -> Path:
    path = tmp_path / "job.sub"
    path.write_text("executable = /bin/echo\narguments = hello\nrequest_cpus = 1\nqueue 2\n")
    return path


def test_dry_run_prints_a_description_that_reparses(
    broker: RunningBroker, job: Path, tmp_path: Path
) -> None:
    out = tmp_path / "augmented.sub"
    result = _submit(
        broker,
        "alice",
        str(job),
        "-k",
        "analysis",
        "--dry-run",
        "--min-hours",
        "24",
        "-o",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    submit = htcondor2.Submit(result.stdout)
    values = {k.lower(): str(v) for k, v in submit.items()}
    assert values["my.brokerowner"] == f'"{ALICE}"'
    assert values["my.brokercredential"] == '"analysis"'
    assert values["run_as_owner"] == "False"
    assert values["getenv"] == "False"
    assert submit.getQArgs() == "2"
    assert out.read_text() == result.stdout


def test_missing_credential_says_how_to_delegate(broker: RunningBroker, job: Path) -> None:
    result = _submit(broker, "bob", str(job), "--dry-run")
    assert result.returncode == 4, result.stderr
    assert "broker-init -k default" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    # alice has "analysis" but no "default"
    result = _submit(broker, "alice", str(job), "--dry-run")
    assert result.returncode == 4 and "no credential named 'default'" in result.stderr


def test_too_short_a_credential_is_refused(broker: RunningBroker, job: Path) -> None:
    result = _submit(broker, "alice", str(job), "-k", "analysis", "--dry-run", "--min-hours", "100")
    assert result.returncode == 4
    assert "less than the 100 h" in result.stderr and "broker-init -k analysis" in result.stderr


def test_bad_description_is_refused_before_the_broker_is_asked(
    broker: RunningBroker, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.sub"
    bad.write_text("arguments = 1\ngetenv = true\nqueue\n")
    result = _submit(broker, "alice", str(bad), "-k", "analysis", "--dry-run", "-s", "localhost:1")
    assert result.returncode == 1
    assert "no executable" in result.stderr


def test_without_a_schedd_prints_the_description_and_a_clear_error(
    broker: RunningBroker, job: Path
) -> None:
    result = _submit(broker, "alice", str(job), "-k", "analysis")
    assert result.returncode == 2
    assert "no HTCondor schedd can be reached" in result.stderr
    assert "Traceback" not in result.stderr
    assert "+BrokerOwner" in result.stdout
