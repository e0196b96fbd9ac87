"""The broker end to end over real mutual TLS: delegate, retrieve, refuse, rotate, scan."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from broker.errors import (
    AuthenticationError,
    AuthorizationError,
    Conflict,
    CredentialError,
    InputError,
    NotFound,
    TooManyAttempts,
)
from broker.pki.chain import validate_chain
from broker.pki.loading import chain_to_pem, credential_to_pem, key_to_pem
from broker.pki.proxy import ProxyType, generate_key, new_proxy
from broker.store import CredentialWrite, Store, load_master_keys
from tests.brokerserver import RunningBroker
from tests.interop.tools import run
from tests.pkifixtures import write_proxy_file

NOW = datetime.now(UTC)


def _delegate(broker: RunningBroker, who: str = "alice", **kw: object) -> dict[str, object]:
    client = broker.client(who)
    return client.delegate(
        client.identity.load(),
        username=kw.pop("username", who),  # type: ignore[arg-type]
        now=datetime.now(UTC),
        **kw,  # type: ignore[arg-type]
    )


def test_delegate_then_pilot_retrieves_real_proxy(
    any_broker: RunningBroker, tmp_path: Path
) -> None:
    stored = _delegate(any_broker, max_proxy_hours=6)
    assert stored["owner"] == "/DC=org/DC=example/CN=Alice"
    cred, result = any_broker.client("pilot").retrieve(
        username="alice", job_id="cluster.1#42.0", lifetime_hours=24
    )
    assert result["owner"] == "/DC=org/DC=example/CN=Alice"
    assert 5.9 * 3600 < result["lifetime"] <= 6 * 3600  # min(requested, owner's -t)
    path = write_proxy_file(tmp_path / "x509up", cred)
    verify = run(
        [
            "openssl",
            "verify",
            "-CApath",
            str(any_broker.pki.ca_dir),
            "-allow_proxy_certs",
            "-untrusted",
            str(path),
            str(path),
        ]
    )
    assert verify.returncode == 0, verify.stderr
    info = run(["grid-proxy-info", "-file", str(path)], any_broker.pki.env())
    assert info.returncode == 0, info.stderr
    assert "identity : /DC=org/DC=example/CN=Alice" in info.stdout
    # the audit trail names the pilot, the owner and the job
    rows = json.loads(
        subprocess.run(
            any_broker.broker_cmd(
                "audit",
                "--state-dir",
                str(any_broker.state_dir),
                "--database-url",
                any_broker.database_url,
                "--job-id",
                "cluster.1#42.0",
                "--json",
            ),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert [(r["action"], r["decision"], r["requester"]) for r in rows] == [
        ("retrieve", "allow", "/DC=org/DC=example/CN=pilot")
    ]
    assert rows[0]["owner"] == "/DC=org/DC=example/CN=Alice"


def test_bob_cannot_destroy_or_overwrite(any_broker: RunningBroker) -> None:
    _delegate(any_broker)
    # someone else's credential is answered as a missing one (issue 18)
    with pytest.raises(NotFound) as err:
        any_broker.client("bob").destroy(username="alice")
    assert err.value.message == "no credential 'default' for user 'alice'"
    with pytest.raises(Conflict):
        _delegate(any_broker, "bob", username="alice")
    # alice's credential is intact and still hers
    summary = any_broker.client("alice").info()["credentials"]
    assert [c["owner"] for c in summary] == ["/DC=org/DC=example/CN=Alice"]
    any_broker.client("alice").destroy(username="alice")
    with pytest.raises(NotFound):
        any_broker.client("alice").destroy(username="alice")


def test_unauthorized_and_limited(sqlite_broker: RunningBroker, tmp_path: Path) -> None:
    _delegate(sqlite_broker)
    # no right on the credential: the same answer as for a missing one (issue 18)
    with pytest.raises(NotFound) as err:
        sqlite_broker.client("bob").retrieve(username="alice")
    assert err.value.reason == "not_found"
    # a limited pilot proxy gets a limited proxy back
    pilot = sqlite_broker.pki.load("pilot")
    limited = new_proxy(
        pilot, now=datetime.now(UTC), lifetime=timedelta(hours=1), proxy_type=ProxyType.LIMITED
    )
    path = write_proxy_file(tmp_path / "pilot-limited.pem", limited)
    cred, result = sqlite_broker.proxy_client(path).retrieve(username="alice", key_type="ec")
    assert result["limited"] is True
    info = validate_chain(cred.chain, sqlite_broker.pki.trust, now=datetime.now(UTC))
    assert info.limited and info.identity == "/DC=org/DC=example/CN=Alice"


def test_renewal_with_proof_of_possession(sqlite_broker: RunningBroker) -> None:
    _delegate(sqlite_broker)
    alice_old = new_proxy(
        sqlite_broker.pki.load("alice"), now=datetime.now(UTC), lifetime=timedelta(hours=1)
    )
    _, result = sqlite_broker.client("pilot").renew(alice_old, username="alice", lifetime_hours=2)
    assert result["owner"] == "/DC=org/DC=example/CN=Alice"
    assert result["limited"] is False
    # a limited proof of possession yields a limited proxy: renewal never widens rights
    alice_limited = new_proxy(
        sqlite_broker.pki.load("alice"),
        now=datetime.now(UTC),
        lifetime=timedelta(hours=1),
        proxy_type=ProxyType.LIMITED,
    )
    _, result = sqlite_broker.client("pilot").renew(alice_limited, username="alice")
    assert result["limited"] is True
    # a proxy of bob cannot renew alice's credential
    bob_old = new_proxy(
        sqlite_broker.pki.load("bob"), now=datetime.now(UTC), lifetime=timedelta(hours=1)
    )
    with pytest.raises(AuthorizationError) as err:
        sqlite_broker.client("pilot").renew(bob_old, username="alice")
    assert err.value.reason == "renewal_identity"


def test_expired_stored_credential_refused(sqlite_broker: RunningBroker) -> None:
    # Write an already-expired credential straight into the server's store.
    now = datetime.now(UTC)
    alice = sqlite_broker.pki.load("alice")
    old = new_proxy(alice, now=now - timedelta(hours=3), lifetime=timedelta(hours=1))
    assert old.key is not None
    with Store(
        sqlite_broker.database_url, load_master_keys(sqlite_broker.state_dir / "master.key")
    ) as store:
        store.put_credential(
            CredentialWrite(
                owner_dn="/DC=org/DC=example/CN=Alice",
                username="alice",
                name="old",
                private_key_pem=key_to_pem(old.key),
                certificate_chain=chain_to_pem(old.chain).decode(),
            ),
            now=datetime.now(UTC),
        )
    with pytest.raises(CredentialError) as err:
        sqlite_broker.client("alice").retrieve(username="alice", name="old")
    assert err.value.reason == "expired"
    assert "broker-init -k old" in err.value.message


def test_foreign_and_limited_chains_refused_at_delegation(sqlite_broker: RunningBroker) -> None:
    client = sqlite_broker.client("alice")
    bob = sqlite_broker.pki.load("bob")
    with pytest.raises(AuthorizationError) as err:
        client.delegate(bob, username="alice", now=datetime.now(UTC))
    assert err.value.reason == "foreign_chain"
    alice_limited = new_proxy(
        sqlite_broker.pki.load("alice"),
        now=datetime.now(UTC),
        lifetime=timedelta(hours=2),
        proxy_type=ProxyType.LIMITED,
    )
    with pytest.raises(InputError) as err2:
        client.delegate(alice_limited, username="alice", now=datetime.now(UTC))
    assert err2.value.reason == "limited_chain"


def test_master_key_rotation_keeps_credentials(sqlite_broker: RunningBroker) -> None:
    for name in ("a", "b", "c"):
        _delegate(sqlite_broker, name=name)
    keyfile = sqlite_broker.state_dir / "master.key"
    before = keyfile.read_bytes()
    out = subprocess.run(
        sqlite_broker.broker_cmd("keys", "rotate", "--state-dir", str(sqlite_broker.state_dir)),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert keyfile.read_bytes() != before
    assert keyfile.stat().st_mode & 0o777 == 0o600
    for name in ("a", "b", "c"):  # the running server, without restart
        sqlite_broker.client("pilot").retrieve(username="alice", name=name, key_type="ec")


def test_no_private_key_material_at_rest_or_in_logs(sqlite_broker: RunningBroker) -> None:
    _delegate(sqlite_broker, name="scan")
    _delegate(sqlite_broker, name="scanpp", passphrase="correct horse")
    sqlite_broker.client("pilot").retrieve(username="alice", name="scan")
    keys = load_master_keys(sqlite_broker.state_dir / "master.key")
    with Store(sqlite_broker.database_url, keys) as store:
        record = store.get_credential("alice", "scan")
        pem = store.decrypt_private_key(record)
    key = serialization.load_pem_private_key(pem, None)
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    secret_number = key.private_numbers().d.to_bytes(256, "big").lstrip(b"\0")
    blobs = [p.read_bytes() for p in sqlite_broker.state_dir.glob("broker.sqlite*")]
    blobs.append(sqlite_broker.log.read_bytes())
    for blob in blobs:
        assert b"PRIVATE KEY" not in blob
        assert der[-64:] not in blob
        assert secret_number[:32] not in blob


def test_malformed_requests_get_specific_4xx(sqlite_broker: RunningBroker) -> None:
    pilot = sqlite_broker.client("pilot")
    cases: list[tuple[str, str, dict[str, Any] | None, int, str]] = [
        ("POST", "/v1/retrievals", {"username": "alice"}, 400, "missing_field"),
        ("POST", "/v1/retrievals", {"csr": "not a csr", "username": "alice"}, 400, "bad_csr"),
        (
            "POST",
            "/v1/retrievals",
            {
                "csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"
                "-----END CERTIFICATE REQUEST-----\n",
                "username": "a",
            },
            400,
            "bad_csr",
        ),
        # usernames are database keys (DNs allowed, as in MyProxy); control characters not
        ("POST", "/v1/delegations", {"username": "al\nice"}, 400, "bad_name"),
        ("POST", "/v1/delegations", {"username": "alice", "stored_hours": -1}, 400, "bad_field"),
        ("POST", "/v1/delegations", {"username": "alice", "retrievers": "x"}, 400, "bad_field"),
        ("PUT", "/v1/delegations/nonexistent", {"chain": "x"}, 404, "not_found"),
        ("DELETE", "/v1/credentials/alice/nosuch", None, 404, "not_found"),
        ("GET", "/v1/nothing-here", None, 404, "not_found"),
        ("PATCH", "/v1/retrievals", None, 405, "method_not_allowed"),
    ]
    for method, path, body, _status, code in cases:
        with pytest.raises(Exception) as err:
            pilot.call(method, path, body)
        exc = err.value
        assert getattr(exc, "reason", None) == code, (method, path, exc)
    # a CSR for a credential nobody stored
    key = generate_key("ec")
    from broker.pki.proxy import csr_to_pem, make_csr

    with pytest.raises(NotFound):
        pilot.call(
            "POST",
            "/v1/retrievals",
            {"csr": csr_to_pem(make_csr(key)).decode(), "username": "nobody-here"},
        )
    # raw HTTP: invalid JSON and an oversize body, on a real TLS socket
    for payload, status in ((b"{not json", 400), (b"x" * 300_000, 413)):
        assert _raw_post(sqlite_broker, payload)[0] == status


def _raw_post(broker: RunningBroker, body: bytes) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=None, capath=str(broker.pki.ca_dir))
    ctx.load_cert_chain(str(broker.pki.cert_path("pilot")), str(broker.pki.key_path("pilot")))
    with (
        socket.create_connection(("127.0.0.1", broker.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(
            b"POST /v1/retrievals HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n"
        )
        try:
            tls.sendall(body)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    head, _, rest = data.partition(b"\r\n\r\n")
    assert b"application/json" in head
    return status, rest


def test_tls_without_client_certificate_is_refused(sqlite_broker: RunningBroker) -> None:
    ctx = ssl.create_default_context(capath=str(sqlite_broker.pki.ca_dir))
    with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
        with (
            socket.create_connection(("127.0.0.1", sqlite_broker.port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"GET /v1/whoami HTTP/1.1\r\nHost: localhost\r\n\r\n")
            if not tls.recv(100):
                raise ConnectionResetError("closed without a response")


def test_cli_round_trip(sqlite_broker: RunningBroker, tmp_path: Path) -> None:
    pki, env = sqlite_broker.pki, sqlite_broker.cli_env()
    bin_dir = Path(sqlite_broker.broker_cmd()[0]).parent
    init = subprocess.run(
        [
            str(bin_dir / "broker-init"),
            "--cert",
            str(pki.cert_path("alice")),
            "--key",
            str(pki.key_path("alice")),
            "-l",
            "alice",
            "-k",
            "cli",
            "-t",
            "3",
            "-Z",
            "/DC=org/DC=example/CN=pilot",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert init.returncode == 0, init.stderr
    out = tmp_path / "x509"
    logon = subprocess.run(
        [
            str(bin_dir / "broker-logon"),
            "--cert",
            str(pki.cert_path("pilot")),
            "--key",
            str(pki.key_path("pilot")),
            "-l",
            "alice",
            "-k",
            "cli",
            "-o",
            str(out),
            "--job-id",
            "9.0",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert logon.returncode == 0, logon.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    info = subprocess.run(
        [str(bin_dir / "broker-info"), "--proxy", str(out), "--json"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert info.returncode == 0, info.stderr
    creds = json.loads(info.stdout)["credentials"]
    assert creds[0]["trusted_retrievers"] == ["/DC=org/DC=example/CN=pilot"]
    denied = subprocess.run(
        [
            str(bin_dir / "broker-logon"),
            "--cert",
            str(pki.cert_path("bob")),
            "--key",
            str(pki.key_path("bob")),
            "-l",
            "alice",
            "-k",
            "cli",
            "-o",
            str(tmp_path / "bob"),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert denied.returncode == 4  # no right: told what a missing credential is told
    assert "Traceback" not in denied.stderr and "no credential 'cli'" in denied.stderr
    missing = subprocess.run(
        [
            str(bin_dir / "broker-logon"),
            "--cert",
            str(pki.cert_path("pilot")),
            "--key",
            str(pki.key_path("pilot")),
            "-l",
            "alice",
            "-k",
            "nope",
            "-o",
            str(tmp_path / "n"),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 4, missing.stderr
    assert credential_to_pem is not None  # imported for symmetry with the library test above


def test_wrong_passphrases_end_in_429(sqlite_broker: RunningBroker) -> None:
    _delegate(sqlite_broker, name="throttled", passphrase="correct horse")
    client = sqlite_broker.client("alice")
    for attempt in range(5):  # the default limit
        with pytest.raises(AuthenticationError) as err:
            client.retrieve(
                username="alice", name="throttled", passphrase=f"guess {attempt}", key_type="ec"
            )
        assert not isinstance(err.value, TooManyAttempts)
    with pytest.raises(TooManyAttempts) as throttled:
        client.retrieve(
            username="alice", name="throttled", passphrase="correct horse", key_type="ec"
        )
    assert throttled.value.reason == "too_many_attempts"
    assert "5 wrong passphrases for alice/throttled from 127.0.0.1" in throttled.value.message
