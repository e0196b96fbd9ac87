"""Run a real ``broker serve`` (gunicorn, mutual TLS) on loopback for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.client import BrokerClient, ClientIdentity
from broker.devpki import DEV_POLICY
from tests.pkifixtures import GridPki

__all__ = [
    "DEV_POLICY",
    "RunningBroker",
    "free_port",
    "launch_broker",
    "start_broker",
    "wait_ready",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningBroker:
    port: int
    state_dir: Path
    policy_dir: Path
    database_url: str
    log: Path
    process: subprocess.Popen[bytes]
    pki: GridPki

    @property
    def server(self) -> str:
        return f"localhost:{self.port}"

    def client(self, name: str) -> BrokerClient:
        identity = ClientIdentity(
            cert=str(self.pki.cert_path(name)), key=str(self.pki.key_path(name))
        )
        return BrokerClient(self.server, identity, ca_dir=str(self.pki.ca_dir))

    def proxy_client(self, path: Path) -> BrokerClient:
        return BrokerClient(
            self.server, ClientIdentity(cert=str(path), key=str(path)), ca_dir=str(self.pki.ca_dir)
        )

    def cli_env(self) -> dict[str, str]:
        env = self.pki.env()
        for var in ("X509_USER_PROXY", "X509_USER_CERT", "X509_USER_KEY"):
            env.pop(var, None)
        env["BROKER_SERVER"] = self.server
        return env

    def broker_cmd(self, *args: str) -> list[str]:
        return [str(Path(sys.executable).parent / "broker"), *args]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def launch_broker(
    pki: GridPki,
    base: Path,
    *,
    database_url: str = "",
    policy: str = DEV_POLICY,
    extra: tuple[str, ...] = (),
    workers: int = 2,
    new_session: bool = False,
) -> RunningBroker:
    """Start ``broker serve`` without waiting for it (:func:`wait_ready` does that), so that
    several nodes can be started at the same moment. ``new_session``: the server and its
    workers get their own process group (a test can then kill the whole node)."""
    state = base / "state"
    policy_dir = base / "policies"
    policy_dir.mkdir(parents=True, exist_ok=True)
    (policy_dir / "10-test.toml").write_text(policy)
    port = free_port()
    log = base / "serve.log"
    argv = [
        str(Path(sys.executable).parent / "broker"),
        "serve",
        "--state-dir",
        str(state),
        "--bind",
        f"127.0.0.1:{port}",
        "--host-cert",
        str(pki.cert_path("host")),
        "--host-key",
        str(pki.key_path("host")),
        "--ca-dir",
        str(pki.ca_dir),
        "--vomsdir",
        str(pki.vomsdir),
        "--policy-dir",
        str(policy_dir),
        # The tests store credentials under free usernames; a test of the binding
        # passes "--username-binding", "dn" in extra (the later flag wins).
        "--workers",
        str(workers),
        "--username-binding",
        "none",
        *extra,
    ]
    if database_url:
        argv += ["--database-url", database_url]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=new_session,
        )
    return RunningBroker(
        port,
        state,
        policy_dir,
        database_url or f"sqlite:///{state / 'broker.sqlite'}",
        log,
        process,
        pki,
    )


def wait_ready(broker: RunningBroker, timeout: float = 30.0) -> RunningBroker:
    """Wait until the broker answers /healthz; stop it and fail if it does not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if broker.process.poll() is not None:
            raise AssertionError(f"broker serve exited early:\n{broker.log.read_text()}")
        try:
            with broker.client("alice") as probe:
                probe.call("GET", "/healthz")
            return broker
        except Exception:
            time.sleep(0.2)
    broker.stop()
    raise AssertionError(f"broker serve did not come up:\n{broker.log.read_text()}")


def start_broker(
    pki: GridPki,
    base: Path,
    *,
    database_url: str = "",
    policy: str = DEV_POLICY,
    extra: tuple[str, ...] = (),
    workers: int = 2,
) -> RunningBroker:
    return wait_ready(
        launch_broker(
            pki, base, database_url=database_url, policy=policy, extra=extra, workers=workers
        )
    )


@pytest.fixture
def sqlite_broker(grid_pki: GridPki, tmp_path: Path) -> Iterator[RunningBroker]:
    broker = start_broker(grid_pki, tmp_path)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_broker(
    request: pytest.FixtureRequest, grid_pki: GridPki, tmp_path: Path
) -> Iterator[RunningBroker]:
    url = "" if request.param == "sqlite" else str(request.getfixturevalue("postgres_database"))
    broker = start_broker(grid_pki, tmp_path, database_url=url)
    try:
        yield broker
    finally:
        broker.stop()
