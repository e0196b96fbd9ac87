"""The CLIs with several servers (BROKER_SERVER / -s lists) and ``broker keys status``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.brokerserver import RunningBroker, free_port, start_broker
from tests.pkifixtures import GridPki

BIN = Path(sys.executable).parent


@pytest.fixture
def broker(grid_pki: GridPki, tmp_path: Path) -> Iterator[RunningBroker]:
    running = start_broker(grid_pki, tmp_path)
    try:
        yield running
    finally:
        running.stop()


def _info(broker: RunningBroker, servers: str, *args: str) -> subprocess.CompletedProcess[str]:
    pki = broker.pki
    env = {**broker.cli_env(), "BROKER_SERVER": servers}
    return subprocess.run(
        [
            str(BIN / "broker-info"),
            "--cert",
            str(pki.cert_path("alice")),
            "--key",
            str(pki.key_path("alice")),
            "--json",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_fails_over_to_the_next_server(broker: RunningBroker) -> None:
    dead = free_port()
    done = _info(broker, f"127.0.0.1:{dead},{broker.server}")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["credentials"] == []
    # -s overrides the environment and takes a list too
    done = _info(broker, "nowhere.invalid", "-s", f"127.0.0.1:{dead} {broker.server}")
    assert done.returncode == 0, done.stderr


def test_cli_names_every_server_it_tried(broker: RunningBroker) -> None:
    dead1, dead2 = free_port(), free_port()
    done = _info(broker, f"127.0.0.1:{dead1},127.0.0.1:{dead2}")
    assert done.returncode == 2
    assert f"127.0.0.1:{dead1}" in done.stderr and f"127.0.0.1:{dead2}" in done.stderr
    assert "Traceback" not in done.stderr
    bad = _info(broker, "host:notaport")
    assert bad.returncode == 1 and "HOST or HOST:PORT" in bad.stderr


def test_keys_status_counts_credentials_per_key(broker: RunningBroker) -> None:
    from datetime import UTC, datetime

    alice = broker.client("alice")
    alice.delegate(alice.identity.load(), username="alice", now=datetime.now(UTC))
    done = subprocess.run(
        [*broker.broker_cmd("keys", "status", "--json"), "--state-dir", str(broker.state_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (key,) = json.loads(done.stdout)
    assert key["active"] and key["in_file"] and key["rows"] == 1
    text = subprocess.run(
        [*broker.broker_cmd("keys", "status"), "--state-dir", str(broker.state_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert key["id"] in text.stdout and "active" in text.stdout


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--ops-bind", "nonsense", "give HOST:PORT or PORT"),
        ("--ops-bind", "127.0.0.1:99999", "give HOST:PORT or PORT"),
        ("--log-format", "xml", "Invalid value for '--log-format'"),
        ("--log-level", "loud", "Invalid value for '--log-level'"),
    ],
)
def test_serve_refuses_bad_ops_and_log_flags(
    tmp_path: Path, flag: str, value: str, message: str
) -> None:
    done = subprocess.run(
        [str(BIN / "broker"), "serve", "--state-dir", str(tmp_path / "s"), flag, value],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "s").exists()  # refused before anything was created
