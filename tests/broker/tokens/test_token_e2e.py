"""Bearer tokens over a real `broker serve` (TLS, gunicorn) with a real authlib issuer."""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from broker.pki.proxy import csr_to_pem, generate_key, make_csr
from tests.broker.tokens.conftest import JOB_SCOPES
from tests.broker.tokens.issuer import AUDIENCE, CLIENT_ID, CLIENT_SECRET, TestIssuer
from tests.broker.tokens.test_token_service import token_policy
from tests.brokerserver import RunningBroker, start_broker
from tests.pkifixtures import GridPki


def broker_toml(issuer: TestIssuer, directory: Path) -> Path:
    secret = directory / "client.secret"
    secret.write_text(CLIENT_SECRET)
    secret.chmod(0o600)
    config = directory / "broker.toml"
    config.write_text(f'''
[tokens]
leeway_seconds = 30

[[tokens.issuers]]
name = "test"
issuer = "{issuer.url}"
audience = ["{AUDIENCE}"]
client_id = "{CLIENT_ID}"
client_secret_file = "{secret}"
job_scopes = {json.dumps(list(JOB_SCOPES))}
insecure_loopback_http = true
''')
    return config


@pytest.fixture
def token_broker(grid_pki: GridPki, tmp_path: Path, issuer: TestIssuer) -> Iterator[RunningBroker]:
    config = broker_toml(issuer, tmp_path)
    broker = start_broker(
        grid_pki, tmp_path / "srv", policy=token_policy(issuer.url), extra=("--config", str(config))
    )
    try:
        yield broker
    finally:
        broker.stop()


def call(
    broker: RunningBroker,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    token: str | None = None,
    cert: str | None = None,
) -> tuple[int, dict[str, Any]]:
    """One HTTPS request; no client certificate unless ``cert`` names a user."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.load_verify_locations(capath=str(broker.pki.ca_dir))
    if cert is not None:
        ctx.load_cert_chain(str(broker.pki.cert_path(cert)), str(broker.pki.key_path(cert)))
    conn = http.client.HTTPSConnection("localhost", broker.port, context=ctx, timeout=30)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(
            method,
            path,
            body=json.dumps(body).encode() if body is not None else None,
            headers=headers,
        )
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def _delegate_alice(broker: RunningBroker) -> None:
    client = broker.client("alice")
    client.delegate(client.identity.load(), username="alice", now=datetime.now(UTC))


def test_token_only_pilot_retrieves_over_tls(
    token_broker: RunningBroker, issuer: TestIssuer
) -> None:
    _delegate_alice(token_broker)
    pilot_token = issuer.mint(sub="glidein-9", groups=["/cms/pilots"])
    csr = csr_to_pem(make_csr(generate_key("ec"))).decode()
    status, body = call(token_broker, "GET", "/v1/whoami", token=pilot_token)
    assert status == 200 and body["token"]["subject"] == "glidein-9", body
    status, body = call(
        token_broker,
        "POST",
        "/v1/retrievals",
        {"csr": csr, "username": "alice", "job_id": "cluster.1"},
        token=pilot_token,
    )
    assert status == 200, body
    assert "BEGIN CERTIFICATE" in body["chain"] and body["owner"].endswith("CN=Alice")
    # no certificate and no token: refused (fail closed)
    status, body = call(
        token_broker, "POST", "/v1/retrievals", {"csr": csr, "username": "alice", "job_id": "x"}
    )
    assert status == 401 and body["error"] == "no_chain"
    # certificate-only routes ignore the bearer token
    for method, path in (
        ("POST", "/v1/delegations"),
        ("GET", "/v1/credentials"),
        ("POST", "/v1/tokens/refresh-tokens"),
    ):
        status, body = call(token_broker, method, path, {"username": "alice"}, token=pilot_token)
        assert status == 401 and body["error"] == "no_chain", (path, body)
    # a forged token: 401 with the failed check, never a 500
    status, body = call(
        token_broker,
        "POST",
        "/v1/retrievals",
        {"csr": csr, "username": "alice", "job_id": "x"},
        token=pilot_token[:-4] + "AAAA",
    )
    assert status == 401 and body["error"] == "token_signature", body
    status, body = call(token_broker, "GET", "/v1/whoami", token="not-a-jwt")
    assert status == 401 and body["error"] == "token_malformed"


def test_broker_init_device_flow_then_job_access_token(
    token_broker: RunningBroker, issuer: TestIssuer, grid_pki: GridPki
) -> None:
    bin_dir = Path(sys.executable).parent
    env = token_broker.cli_env()
    argv = [
        str(bin_dir / "broker-init"),
        "--cert",
        str(grid_pki.cert_path("alice")),
        "--key",
        str(grid_pki.key_path("alice")),
        "-l",
        "alice",
        "--token-issuer",
        "test",
        "--scope",
        "offline_access",
        "--scope",
        "compute.read",
        "--scope",
        "storage.read:/",
        "--json",
    ]
    init = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert init.stderr is not None
    code = None
    for line in init.stderr:
        if "enter the code" in line:
            code = line.rsplit("code", 1)[1].split(".")[0].strip()
            break
    assert code, "broker-init printed no user code"
    # the user approves in the browser
    requests.post(
        issuer.url + "/approve", data={"user_code": code, "user": "alice-sub"}, timeout=5
    ).raise_for_status()
    out, err = init.communicate(timeout=60)
    assert init.returncode == 0, err
    stored = json.loads(out)
    assert stored["issuer"] == "test" and "compute.read" in stored["scopes"]

    issuer.state.groups["alice-sub"] = ["/cms"]
    pilot_token = issuer.mint(sub="glidein-9", groups=["/cms/pilots"])
    status, body = call(
        token_broker,
        "POST",
        "/v1/tokens/access",
        {"issuer": "test", "username": "alice", "scopes": ["compute.read"], "job_id": "cluster.2"},
        token=pilot_token,
    )
    assert status == 200, body
    assert body["scopes"] == ["compute.read"] and 0 < body["expires_in"] <= 600
    assert body["access_token"] != pilot_token
    # escalation: 403 with a message, the issuer is not asked
    status, body = call(
        token_broker,
        "POST",
        "/v1/tokens/access",
        {
            "issuer": "test",
            "username": "alice",
            "scopes": ["compute.modify"],
            "job_id": "cluster.2",
        },
        token=pilot_token,
    )
    assert status == 403 and body["error"] == "scope_not_allowed", body
    # issuer down: 503 naming it
    issuer.state.down = True
    status, body = call(
        token_broker,
        "POST",
        "/v1/tokens/access",
        {
            "issuer": "test",
            "username": "alice",
            "scopes": ["storage.read:/cms"],
            "job_id": "cluster.3",
        },
        token=pilot_token,
    )
    assert status == 503 and "test" in body["message"], body


def test_broker_init_refresh_token_from_a_file(
    token_broker: RunningBroker, issuer: TestIssuer, grid_pki: GridPki, tmp_path: Path
) -> None:
    bin_dir = Path(sys.executable).parent
    token_file = tmp_path / "refresh.token"
    token_file.write_text(issuer.issue_refresh_token("alice-sub", "compute.read") + "\n")
    token_file.chmod(0o644)
    argv = [
        str(bin_dir / "broker-init"),
        "--cert",
        str(grid_pki.cert_path("alice")),
        "--key",
        str(grid_pki.key_path("alice")),
        "-l",
        "alice",
        "--token-issuer",
        "test",
        "--refresh-token-file",
        str(token_file),
        "--scope",
        "compute.read",
    ]
    loose = subprocess.run(
        argv, env=token_broker.cli_env(), capture_output=True, text=True, timeout=60, check=False
    )
    assert loose.returncode != 0 and "refresh.token" in loose.stderr, loose.stderr
    assert "Traceback" not in loose.stderr
    token_file.chmod(0o600)
    done = subprocess.run(
        argv, env=token_broker.cli_env(), capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "refresh token for alice at issuer test" in done.stdout
    unknown = subprocess.run(
        [*argv[:-4], "--token-issuer", "nope", "--refresh-token-file", str(token_file)],
        env=token_broker.cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert unknown.returncode != 0 and "unknown token issuer" in unknown.stderr, unknown.stderr
    pilot_token = issuer.mint(sub="glidein-9", groups=["/cms/pilots"])
    status, body = call(
        token_broker,
        "POST",
        "/v1/tokens/access",
        {"issuer": "test", "username": "alice", "job_id": "c.9", "scopes": ["compute.read"]},
        token=pilot_token,
    )
    assert status == 200 and body["owner"].endswith("CN=Alice"), body
