"""What an operator sees of a running ``broker serve`` with 2 workers and the MyProxy
endpoint: metrics summed over every process and both endpoints, the plain-HTTP ops
listener (no client certificate), JSON logs at the configured level."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from broker.errors import NotFound
from broker.ops import parse_ops_bind
from tests.brokerserver import RunningBroker, free_port, start_broker
from tests.interop.tools import need
from tests.pkifixtures import GridPki

HOST_DN = "/DC=org/DC=example/CN=localhost"
REST_RETRIEVALS = 14


@pytest.fixture
def observed(grid_pki: GridPki, tmp_path: Path) -> Iterator[tuple[RunningBroker, int, int]]:
    ops, myproxy = free_port(), free_port()
    broker = start_broker(
        grid_pki,
        tmp_path,
        workers=2,
        extra=(
            "--ops-bind",
            f"127.0.0.1:{ops}",
            "--myproxy-bind",
            f"127.0.0.1:{myproxy}",
            "--log-format",
            "json",
            "--log-level",
            "info",
        ),
    )
    try:
        deadline = time.monotonic() + 30  # the MyProxy child comes up on its own
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", myproxy)) == 0:
                    break
            time.sleep(0.1)
        yield broker, ops, myproxy
    finally:
        broker.stop()


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _myproxy_logon(broker: RunningBroker, port: int, out: Path) -> subprocess.CompletedProcess[str]:
    need("myproxy-logon")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("X509_", "MYPROXY_"))}
    env.update(
        X509_CERT_DIR=str(broker.pki.ca_dir),
        MYPROXY_SERVER="localhost",
        MYPROXY_SERVER_PORT=str(port),
        MYPROXY_SERVER_DN=HOST_DN,
        GLOBUS_HOSTNAME="localhost",
        LC_ALL="C",
        X509_USER_CERT=str(broker.pki.cert_path("pilot")),
        X509_USER_KEY=str(broker.pki.key_path("pilot")),
    )
    return subprocess.run(
        ["myproxy-logon", "-n", "-l", "alice", "-o", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_metrics_add_up_over_workers_and_endpoints(
    observed: tuple[RunningBroker, int, int], tmp_path: Path
) -> None:
    broker, ops, myproxy = observed
    alice = broker.client("alice")
    alice.delegate(broker.pki.load("alice"), username="alice", now=datetime.now(UTC))
    for _ in range(REST_RETRIEVALS):
        with broker.client("pilot") as pilot:  # a new connection each: both workers serve
            pilot.retrieve(username="alice", key_type="ec")
    for i in range(2):
        result = _myproxy_logon(broker, myproxy, tmp_path / f"p{i}.pem")
        assert result.returncode == 0, result.stdout + result.stderr
    with pytest.raises(NotFound):
        broker.client("bob").retrieve(username="alice", key_type="ec")

    status, text = _get(ops, "/metrics")  # plain HTTP, no client certificate
    assert status == 200
    audit = json.loads(
        subprocess.run(
            broker.broker_cmd(
                "audit",
                "--state-dir",
                str(broker.state_dir),
                "--action",
                "retrieve",
                "--json",
                "--limit",
                "1000",
            ),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    allowed = [r for r in audit if r["decision"] == "allow"]
    by_endpoint = {e: sum(1 for r in allowed if r["endpoint"] == e) for e in ("rest", "myproxy")}
    assert by_endpoint == {"rest": REST_RETRIEVALS, "myproxy": 2}
    assert (
        _sample(
            text, "broker_operations_total", endpoint="rest", action="retrieve", outcome="allow"
        )
        == REST_RETRIEVALS
    )
    assert (
        _sample(
            text, "broker_operations_total", endpoint="myproxy", action="retrieve", outcome="allow"
        )
        == 2
    )
    assert (
        _sample(
            text, "broker_operations_total", endpoint="rest", action="delegate", outcome="allow"
        )
        == 1
    )
    assert _sample(text, "broker_refusals_total", endpoint="rest", action="retrieve") == 1
    assert (
        _sample(text, "broker_operation_seconds_count", endpoint="myproxy", action="retrieve") == 2
    )
    assert _sample(text, "broker_credentials_stored") == 1
    assert _sample(text, "broker_credentials_expiring", within="7d") == 1
    assert _sample(text, "broker_health_check", check="database") == 1
    assert _sample(text, "broker_host_certificate_expiry_timestamp_seconds") > 0
    # More than one worker answered (their values are summed above).
    found = re.search(
        r"metrics of every process are summed from (/[^\"\s]+)", broker.log.read_text()
    )
    assert found, broker.log.read_text()[-2000:]
    directory = Path(found.group(1))
    assert directory.parent == Path("/dev/shm") and (directory.stat().st_mode & 0o777) == 0o700
    pids = {p.stem.rsplit("_", 1)[-1] for p in directory.iterdir()}
    assert len(pids) >= 2, pids


def test_ops_healthz_and_json_logs(
    observed: tuple[RunningBroker, int, int], tmp_path: Path
) -> None:
    broker, ops, myproxy = observed
    status, body = _get(ops, "/healthz")
    doc = json.loads(body)
    assert status == 200 and doc["status"] == "ok", doc
    assert set(doc["checks"]) == {"database", "policy", "master_key_file"}
    assert _get(ops, "/v1/credentials")[0] == 404

    key_file = broker.state_dir / "master.key"
    assert key_file.exists()
    os.chmod(key_file, 0o644)  # no longer a usable key file
    try:
        status, body = _get(ops, "/healthz")
        doc = json.loads(body)
        assert status == 503 and doc["checks"]["master_key_file"]["ok"] is False
        assert "chmod 600" in doc["checks"]["master_key_file"]["detail"]
    finally:
        os.chmod(key_file, 0o600)

    broker.client("alice").delegate(
        broker.pki.load("alice"), username="alice", now=datetime.now(UTC)
    )
    result = _myproxy_logon(broker, myproxy, tmp_path / "p.pem")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [
        json.loads(line) for line in broker.log.read_text().splitlines() if line.startswith("{")
    ]
    requests = [r for r in lines if r.get("action") == "delegate"]
    assert requests, broker.log.read_text()[-3000:]
    line = requests[-1]
    assert line["outcome"] == "allow" and line["requester"] == "/DC=org/DC=example/CN=Alice"
    assert re.fullmatch(r"[0-9a-f]{32}", line["request_id"]) and line["level"] == "info"
    assert {"time", "level", "logger", "message"} <= set(line)
    served = [r for r in lines if r.get("endpoint") == "myproxy" and r.get("action") == "retrieve"]
    assert served and served[-1]["requester"] == "/DC=org/DC=example/CN=pilot", lines[-5:]
    # Every line is JSON, gunicorn's own included.
    text_lines = [
        line
        for line in broker.log.read_text().splitlines()
        if line.strip() and not line.startswith("{") and not line.startswith("broker:")
    ]
    assert text_lines == []


def test_log_level_is_honoured(grid_pki: GridPki, tmp_path: Path) -> None:
    broker = start_broker(
        grid_pki, tmp_path, workers=1, extra=("--log-format", "json", "--log-level", "warning")
    )
    try:
        broker.client("alice").delegate(
            broker.pki.load("alice"), username="alice", now=datetime.now(UTC)
        )
    finally:
        broker.stop()
    lines = [
        json.loads(line) for line in broker.log.read_text().splitlines() if line.startswith("{")
    ]
    assert lines and all(r["level"] in ("warning", "error", "critical") for r in lines), lines


@pytest.mark.parametrize(
    ("value", "expected"),
    [("9180", ("127.0.0.1", 9180)), ("[::1]:9", ("::1", 9)), ("0.0.0.0:80", ("0.0.0.0", 80))],
)
def test_ops_bind_values(value: str, expected: tuple[str, int]) -> None:
    assert parse_ops_bind(value) == expected


@pytest.mark.parametrize("value", ["x", "host:", "h:70000", "h:-1"])
def test_bad_ops_bind_values(value: str) -> None:
    from broker.errors import ConfigError

    with pytest.raises(ConfigError, match="--ops-bind"):
        parse_ops_bind(value)


def test_metrics_directory_is_private_and_stale_ones_are_removed(tmp_path: Path) -> None:
    from broker.observability import MULTIPROC_ENV, enable_multiprocess_metrics

    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = tmp_path / f"broker-metrics-{gone.pid}-old"
    stale.mkdir()
    (stale / "counter_1.db").write_bytes(b"x")
    alive = tmp_path / f"broker-metrics-{os.getpid()}-live"  # its process still runs
    alive.mkdir()
    made = enable_multiprocess_metrics(tmp_path)
    try:
        assert not stale.exists() and alive.exists()
        assert os.environ[MULTIPROC_ENV] == str(made)
        assert made.parent == tmp_path and (made.stat().st_mode & 0o777) == 0o700
        assert made.name.startswith(f"broker-metrics-{os.getpid()}-")
    finally:
        shutil.rmtree(made, ignore_errors=True)
