"""broker-submit against a real broker: can any of the site's pilots retrieve the credential?

The warning uses the broker's own decision code (site policy directory + the
credential's retriever lists), as ``broker policy explain`` does.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.brokerserver import RunningBroker, start_broker
from tests.pkifixtures import GridPki, grid_pki  # noqa: F401 - fixture

BIN = Path(sys.executable).parent
PILOT = "/DC=org/DC=example/CN=pilot"
ROBOT = "/DC=org/DC=example/CN=Robot"


@pytest.fixture(scope="module")
def broker(grid_pki: GridPki) -> Iterator[RunningBroker]:  # noqa: F811 - fixture parameter
    base = Path(tempfile.mkdtemp(prefix="submit-pilots-"))
    running = start_broker(grid_pki, base)  # DEV_POLICY: CN=pilot* may retrieve
    try:
        alice = running.client("alice")
        now = datetime.now(UTC)
        alice.delegate(
            alice.identity.load(), username="alice", name="open", stored_hours=48, now=now
        )
        alice.delegate(
            alice.identity.load(),
            username="alice",
            name="narrow",
            stored_hours=48,
            trusted_retrievers=["/DC=org/DC=example/CN=other-pilot"],
            now=now,
        )
        yield running
    finally:
        running.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def job(tmp_path: Path) -> Path:
    path = tmp_path / "job.sub"
    path.write_text("executable = /bin/echo\nqueue\n")
    return path


def _submit(
    broker: RunningBroker, who: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    pki = broker.pki
    base = {
        k: v
        for k, v in broker.cli_env().items()
        if k not in ("BROKER_POLICY_DIR", "BROKER_SUBMIT_PILOTS")
    }
    full = {**base, "CONDOR_CONFIG": "/dev/null", **(env or {})}
    return subprocess.run(
        [
            str(BIN / "broker-submit"),
            *args,
            "--dry-run",
            "--cert",
            str(pki.cert_path(who)),
            "--key",
            str(pki.key_path(who)),
            "--ca-dir",
            str(pki.ca_dir),
        ],
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_no_warning_when_a_pilot_may_retrieve(broker: RunningBroker, job: Path) -> None:
    result = _submit(
        broker,
        "alice",
        str(job),
        "-k",
        "open",
        "--pilot",
        ROBOT,
        "--pilot",
        PILOT,
        "--policy-dir",
        str(broker.policy_dir),
    )
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr


def test_site_policy_refusing_every_pilot_warns(broker: RunningBroker, job: Path) -> None:
    # Before: submitted silently; the job was held on the execute node much later.
    result = _submit(
        broker,
        "alice",
        str(job),
        "-k",
        "open",
        "--pilot",
        ROBOT,
        "--policy-dir",
        str(broker.policy_dir),
    )
    assert result.returncode == 0, result.stderr
    assert "warning: no configured pilot may retrieve your credential 'open'" in result.stderr
    assert ROBOT in result.stderr
    assert "broker policy explain --action retrieve" in result.stderr
    assert "+BrokerOwner" in result.stdout  # a warning, not a refusal


def test_owner_retriever_list_excluding_the_pilots_warns(broker: RunningBroker, job: Path) -> None:
    env = {"BROKER_SUBMIT_PILOTS": f"{PILOT}\n", "BROKER_POLICY_DIR": str(broker.policy_dir)}
    result = _submit(broker, "alice", str(job), "-k", "narrow", env=env)
    assert result.returncode == 0, result.stderr
    assert "no configured pilot may retrieve your credential 'narrow'" in result.stderr
    assert PILOT in result.stderr
    result = _submit(broker, "alice", str(job), "-k", "open", env=env)
    assert "warning" not in result.stderr


def test_messages_never_print_none(broker: RunningBroker, job: Path) -> None:
    # Before: "you (None) have no credential named 'default'".
    result = _submit(broker, "bob", str(job))
    assert result.returncode == 4, result.stderr
    assert "None" not in result.stderr
    assert "you (/DC=org/DC=example/CN=Bob) have no credential named 'default'" in result.stderr
    result = _submit(broker, "alice", str(job), "-k", "open", "--pilot", PILOT)
    assert result.returncode == 0
    assert "None" not in result.stderr
    assert "without the site's policy directory" in result.stderr
