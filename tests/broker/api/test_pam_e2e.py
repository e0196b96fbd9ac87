"""PAM logins and the online CA over a real `broker serve` and a real PAM stack."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.client import BrokerClient
from broker.devpki import DEV_POLICY, policy_rule
from broker.errors import AuthenticationError, BrokerError
from broker.pam_client import PamClient
from broker.pki.chain import validate_chain
from broker.pki.loading import load_certificates
from tests.brokerserver import RunningBroker, start_broker
from tests.pamstack import make_pam_stack
from tests.pkifixtures import GridPki

PASSWORD = "alice-site-pw"
ALICE_DN = "/DC=org/DC=example/CN=alice"  # from the online CA's template, not the dev PKI's Alice

POLICY = DEV_POLICY + policy_rule(
    "site users log on through PAM", "retrieve", ["pam:*"], auth=["pam"], max_lifetime="6h"
)


@pytest.fixture
def pam_broker(grid_pki: GridPki, tmp_path: Path) -> Iterator[RunningBroker]:
    stack = make_pam_stack(
        tmp_path / "pam", {"alice": PASSWORD, "bob": "bob-pw"}, locked={"carol": PASSWORD}
    )
    config = tmp_path / "broker.toml"
    config.write_text(
        "[server]\n"
        f'pam_service = "{stack.service}"\n'
        f'pam_confdir = "{stack.confdir}"\n'
        # the dev PKI's CA is in the CA directory the broker trusts
        f'online_ca_cert = "{grid_pki.root / "ca.pem"}"\n'
        f'online_ca_key = "{grid_pki.root / "ca.key"}"\n'
        'online_ca_dn_template = "/DC=org/DC=example/CN={username}"\n'
        "online_ca_max_hours = 12\n"
    )
    broker = start_broker(
        grid_pki, tmp_path / "srv", policy=POLICY, extra=("--config", str(config))
    )
    try:
        yield broker
    finally:
        broker.stop()


def _pam_client(broker: RunningBroker) -> PamClient:
    return PamClient(broker.server, ca_dir=str(broker.pki.ca_dir))


def _cli(
    broker: RunningBroker, tool: str, *args: str, stdin: str
) -> subprocess.CompletedProcess[str]:
    exe = str(Path(broker.broker_cmd()[0]).parent / tool)
    return subprocess.run(
        [exe, *args], input=stdin, capture_output=True, text=True, env=broker.cli_env(), timeout=60
    )


def _audit(broker: RunningBroker, *args: str) -> list[dict[str, object]]:
    out = subprocess.run(
        broker.broker_cmd(
            "audit",
            "--state-dir",
            str(broker.state_dir),
            "--database-url",
            broker.database_url,
            "--json",
            *args,
        ),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows: list[dict[str, object]] = json.loads(out)
    return rows


def test_init_with_pam_then_pilot_and_pam_logon(pam_broker: RunningBroker, tmp_path: Path) -> None:
    init = _cli(
        pam_broker,
        "broker-init",
        "--pam",
        "-S",
        "-l",
        "alice",
        "-c",
        "24",
        "--json",
        stdin=PASSWORD + "\n",
    )
    assert init.returncode == 0, init.stderr
    stored = json.loads(init.stdout)
    assert stored["owner"] == ALICE_DN and stored["username"] == "alice"
    # the stored proxy lives no longer than the online CA's certificate (12 h)
    assert stored["timeleft"] <= 12 * 3600

    # a pilot retrieves it with its certificate, like any other credential
    cred, result = pam_broker.client("pilot").retrieve(username="alice", job_id="7.0")
    assert result["owner"] == ALICE_DN
    info = validate_chain(cred.chain, pam_broker.pki.trust, now=datetime.now(UTC))
    assert info.identity == ALICE_DN

    # alice, still without a grid certificate, logs on with her password
    out = tmp_path / "x509up_alice"
    logon = _cli(
        pam_broker,
        "broker-logon",
        "--pam",
        "-S",
        "-l",
        "alice",
        "-o",
        str(out),
        "-t",
        "24",
        "--job-id",
        "pam-job-1",
        stdin=PASSWORD + "\n",
    )
    assert logon.returncode == 0, logon.stderr
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    chain = load_certificates(out.read_bytes())
    proxy_info = validate_chain(chain, pam_broker.pki.trust, now=datetime.now(UTC))
    assert proxy_info.identity == ALICE_DN
    assert chain[0].not_valid_after_utc <= datetime.now(UTC) + timedelta(hours=6, minutes=1)

    rows = _audit(pam_broker, "--job-id", "pam-job-1")
    assert [(r["action"], r["decision"], r["requester"]) for r in rows] == [
        ("retrieve", "allow", "pam:alice")
    ]
    issued = _audit(pam_broker, "--action", "issue-certificate")
    assert [(r["decision"], r["requester"], r["owner"]) for r in issued] == [
        ("allow", "pam:alice", ALICE_DN)
    ]


@pytest.mark.parametrize(
    ("user", "password", "pam_reason"),
    [
        ("alice", "wrong", "Authentication failure"),
        ("mallory", PASSWORD, "User not known"),
        ("carol", PASSWORD, "Authentication failure"),  # locked: the right password is refused
    ],
)
def test_refused_logins(
    pam_broker: RunningBroker, user: str, password: str, pam_reason: str
) -> None:
    client = _pam_client(pam_broker)
    with pytest.raises(AuthenticationError) as err:
        client.pam_retrieve(username=user, password=password, job_id=f"refused-{user}")
    # the client learns nothing about which part was wrong ...
    assert err.value.reason == "pam_failed"
    assert user not in err.value.message
    with pytest.raises(AuthenticationError) as err2:
        client.pam_certificate(username=user, password=password)
    assert err2.value.reason == "pam_failed"
    # ... while the audit trail keeps PAM's reason
    rows = _audit(pam_broker, "--job-id", f"refused-{user}")
    assert len(rows) == 1
    row = rows[0]
    assert (row["action"], row["decision"], row["requester"]) == ("retrieve", "deny", f"pam:{user}")
    assert pam_reason in str(row["reason"]) and password not in str(row["reason"])
    denied = [
        r
        for r in _audit(pam_broker, "--action", "issue-certificate")
        if r["requester"] == f"pam:{user}"
    ]
    assert [r["decision"] for r in denied] == ["deny"]

    # the CLI maps it to exit code 3
    run = _cli(
        pam_broker,
        "broker-logon",
        "--pam",
        "-S",
        "-l",
        user,
        "-o",
        "/dev/null",
        stdin=password + "\n",
    )
    assert run.returncode == 3 and "PAM login failed" in run.stderr


def test_certificate_endpoint_and_no_cert_routes(pam_broker: RunningBroker) -> None:
    client = _pam_client(pam_broker)
    cred, result = client.pam_certificate(
        username="bob", password="bob-pw", lifetime=timedelta(hours=1)
    )
    assert result["subject"] == "/DC=org/DC=example/CN=bob"
    assert 3500 <= result["lifetime"] <= 3600
    assert (
        validate_chain(cred.chain, pam_broker.pki.trust, now=datetime.now(UTC)).identity
        == "/DC=org/DC=example/CN=bob"
    )
    # bob stored nothing, so his PAM logon finds nothing (and is audited as pam:bob)
    with pytest.raises(BrokerError) as err:
        client.pam_retrieve(username="bob", password="bob-pw")
    assert err.value.reason == "not_found"
    # without a client certificate every other route still fails closed
    for method, path in (
        ("GET", "/v1/whoami"),
        ("GET", "/v1/credentials"),
        ("POST", "/v1/retrievals"),
    ):
        with pytest.raises(AuthenticationError) as denied:
            client.call(method, path, {} if method == "POST" else None)
        assert denied.value.reason == "no_chain"


def test_pam_routes_absent_without_pam(sqlite_broker: RunningBroker) -> None:
    # No pam_service: the handshake still requires a certificate.
    with pytest.raises(BrokerError):
        _pam_client(sqlite_broker).pam_retrieve(username="alice", password=PASSWORD)
    # and with a certificate, the PAM routes do not exist
    alice: BrokerClient = sqlite_broker.client("alice")
    with pytest.raises(BrokerError) as err:
        alice.call("POST", "/v1/pam/retrievals", {})
    assert err.value.reason == "not_found"
