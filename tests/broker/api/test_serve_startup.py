"""``broker serve`` on the embedded default, and its refusals to start."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.brokerserver import DEV_POLICY

BROKER = str(Path(sys.executable).parent / "broker")


def _serve(cwd: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("X509_", "BROKER_"))}
    return subprocess.run(
        [BROKER, "serve", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _policy_dir(tmp_path: Path, text: str) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "10-site.toml").write_text(text)
    return directory


def test_refuses_an_unsafe_policy(tmp_path: Path) -> None:
    unsafe = (
        DEV_POLICY
        + """
[[rule]]
name = "anyone with a certificate"
action = "retrieve"
effect = "allow"
auth = ["certificate"]
requester = ["*"]
"""
    )
    result = _serve(
        tmp_path,
        "--policy-dir",
        str(_policy_dir(tmp_path, unsafe)),
        "--state-dir",
        str(tmp_path / "state"),
        "--bind",
        "127.0.0.1:1",
    )
    assert result.returncode == 1
    assert "unsafe" in result.stderr and "anyone with a certificate" in result.stderr
    assert "Traceback" not in result.stderr


def test_refuses_an_invalid_policy_naming_file_and_line(tmp_path: Path) -> None:
    broken = DEV_POLICY + '\n[[rule]]\nname = "typo"\naction = "retreive"\neffect = "allow"\n'
    result = _serve(
        tmp_path,
        "--policy-dir",
        str(_policy_dir(tmp_path, broken)),
        "--state-dir",
        str(tmp_path / "state"),
        "--bind",
        "127.0.0.1:1",
    )
    assert result.returncode == 1
    assert "10-site.toml:" in result.stderr and "retreive" in result.stderr
    assert "Traceback" not in result.stderr


def test_refuses_a_bad_config_file(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text('[server]\nbind = "everywhere"\n')
    result = _serve(tmp_path, "--config", str(config))
    assert result.returncode == 1 and "HOST:PORT" in result.stderr
    config.write_text('[server]\nbnd = "127.0.0.1:1"\n')
    result = _serve(tmp_path, "--config", str(config))
    assert result.returncode == 1 and "unknown setting 'bnd'" in result.stderr


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_runs_with_no_arguments_on_the_embedded_default(tmp_path: Path) -> None:
    if not _port_free(8443):
        pytest.fail("127.0.0.1:8443 is taken; the no-argument default binds there")
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "10-site.toml").write_text(DEV_POLICY)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("X509_", "BROKER_"))}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [BROKER, "serve"], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and _port_free(8443):
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
        assert not _port_free(8443), log.read_text()
        state = tmp_path / "broker-state"
        assert (state / "broker.sqlite").exists()
        assert (state / "master.key").stat().st_mode & 0o777 == 0o600
        assert (state / "devpki" / "host.key").stat().st_mode & 0o777 == 0o600
        assert state.stat().st_mode & 0o777 == 0o700
        # the dev PKI it made is usable by clients: whoami as alice over mutual TLS
        from broker.client import BrokerClient, ClientIdentity

        devpki = state / "devpki"
        client = BrokerClient(
            "localhost:8443",
            ClientIdentity(cert=str(devpki / "alice.pem"), key=str(devpki / "alice.key")),
            ca_dir=str(devpki / "certificates"),
        )
        assert client.call("GET", "/v1/whoami")["identity"] == "/DC=org/DC=example/CN=Alice"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
