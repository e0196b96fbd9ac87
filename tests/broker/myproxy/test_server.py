"""The MyProxy endpoint over real TLS with a raw protocol client: exact exchanges,
hostile input, limits, and the process wrapper."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from broker.myproxy import codec
from broker.myproxy.codec import AuthMethodId, Command, ResponseCode
from broker.pki.loading import Credential, credential_to_pem
from broker.pki.proxy import generate_key, load_csr, make_csr, new_proxy, sign_request
from broker.pki.voms import make_ac_extension
from tests.broker.myproxy.support import (
    ALICE_DN,
    PASSPHRASE,
    PILOT_DN,
    Endpoint,
    RawClient,
    running_endpoint,
)
from tests.pkifixtures import GridPki, write_proxy_file


@pytest.fixture(scope="module")
def endpoint(grid_pki: GridPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    with running_endpoint(
        tmp_path_factory.mktemp("myproxy-raw"),
        grid_pki,
        overrides={
            "request_timeout": 3.0,
            "max_connections": 4,
            "first_request_timeout": 2.0,
            "request_size_limit": 64 * 1024,
        },
    ) as ep:
        yield ep


def client(ep: Endpoint, who: str | None = None, **kw: object) -> RawClient:
    if who is None:
        return RawClient(ep, ep.pki.ca_dir, **kw)  # type: ignore[arg-type]
    return RawClient(ep, ep.pki.ca_dir, ep.pki.cert_path(who), ep.pki.key_path(who), **kw)  # type: ignore[arg-type]


def put(
    ep: Endpoint,
    user: str,
    *,
    passphrase: str = PASSPHRASE,
    name: str | None = None,
    extra: dict[str, str] | None = None,
    who: str = "alice",
) -> codec.Response:
    """myproxy-init's exchange, signing the server's CSR with the user's certificate."""
    fields = dict(extra or {})
    if name:
        fields["CRED_NAME"] = name
    c = client(ep, who)
    try:
        first = c.request(Command.PUT, user, passphrase, 7200, fields)
        if first.code is not ResponseCode.OK:
            return first
        csr_der = c.recv()
        issuer = ep.pki.load(who)
        chain = sign_request(
            issuer, load_csr(csr_der), now=ep.service.now(), lifetime=timedelta(hours=24)
        )
        c.send(
            codec.encode_chain([cert.public_bytes(serialization.Encoding.DER) for cert in chain])
        )
        return c.recv_response()
    finally:
        c.close()


def get(
    ep: Endpoint,
    user: str,
    passphrase: str = PASSPHRASE,
    who: str | None = None,
    extra: dict[str, str] | None = None,
) -> tuple[codec.Response, list[x509.Certificate]]:
    c = client(ep, who)
    try:
        first = c.request(Command.GET, user, passphrase, 3600, extra)
        if first.code is not ResponseCode.OK:
            return first, []
        key = generate_key("ec")
        c.send(make_csr(key).public_bytes(serialization.Encoding.DER))
        blob = b""
        while not codec.chain_complete(blob):
            blob += c.recv()
        final = c.recv_response()
        return final, [x509.load_der_x509_certificate(d) for d in codec.decode_chain(blob)]
    finally:
        c.close()


def test_put_then_get_with_passphrase(endpoint: Endpoint) -> None:
    assert put(endpoint, "r-basic").code is ResponseCode.OK
    final, chain = get(endpoint, "r-basic")
    assert final.code is ResponseCode.OK
    assert len(chain) == 3  # new proxy, stored proxy, EEC
    assert chain[0].issuer == chain[1].subject
    life = chain[0].not_valid_after_utc - chain[0].not_valid_before_utc
    assert life <= timedelta(hours=1, minutes=5)


def test_get_with_trusted_certs_sends_the_ca_directory_first(endpoint: Endpoint) -> None:
    put(endpoint, "r-trust")
    c = client(endpoint)
    try:
        first = c.request(Command.GET, "r-trust", PASSPHRASE, 3600, {"TRUSTED_CERTS": "1"})
        assert first.code is ResponseCode.OK
        names = first.fields["TRUSTED_CERTS"].split(",")
        assert any(n.endswith(".0") for n in names)
        assert all(f"FILEDATA_{n}" in first.fields for n in names)
    finally:
        c.close()


def test_myproxyclient_username_credname_form(endpoint: Endpoint) -> None:
    put(endpoint, "r-mpc", name="job7")
    final, chain = get(endpoint, "r-mpc-job7")
    assert final.code is ResponseCode.OK and chain


def test_requests_without_nul_are_served(endpoint: Endpoint) -> None:
    put(endpoint, "r-nonul")
    c = client(endpoint)
    try:
        c.send(b"0")
        c.send(b"VERSION=MYPROXYv2\n COMMAND=2\n USERNAME=r-nonul\n PASSPHRASE=x\n LIFETIME=0")
        response = c.recv_response()
        assert response.code is ResponseCode.ERROR  # anonymous INFO
        assert "client certificate" in response.error
    finally:
        c.close()


def test_info_fields(endpoint: Endpoint) -> None:
    put(
        endpoint,
        "r-info",
        extra={"RETRIEVER_TRUSTED": "*/CN=pilot", "CRED_DESC": "d1"},
        passphrase="",
    )
    put(endpoint, "r-info", name="second")
    c = client(endpoint, "alice")
    try:
        response = c.request(Command.INFO, "r-info", "DUMMY-PASSPHRASE", 0)
    finally:
        c.close()
    fields = response.fields
    assert response.code is ResponseCode.OK
    assert fields["CRED_OWNER"] == ALICE_DN
    assert fields["CRED_RETRIEVER_TRUSTED"] == "*/CN=pilot"
    assert fields["CRED_DESC"] == "d1"
    assert "CRED_RETRIEVER" not in fields  # the "nobody" marker is not shown
    assert fields["ADDL_CREDS"] == "second"
    assert int(fields["CRED_second_END_TIME"]) > int(fields["CRED_second_START_TIME"])


def test_put_over_someone_elses_credential_is_refused(endpoint: Endpoint) -> None:
    put(endpoint, "r-owned")
    response = put(endpoint, "r-owned", who="bob")
    assert response.code is ResponseCode.ERROR
    assert "not owned by" in response.error


def test_bad_policy_string_is_refused_before_delegation(endpoint: Endpoint) -> None:
    response = put(endpoint, "r-badpol", extra={"RETRIEVER_TRUSTED": "FQAN:/atlas/*"})
    assert response.code is ResponseCode.ERROR
    assert "literal FQAN" in response.error


def test_renewal_challenge_exchange(endpoint: Endpoint) -> None:
    assert put(endpoint, "r-renew", passphrase="", extra={"RENEWER": PILOT_DN}).code == 0
    alice = endpoint.pki.load("alice")
    old = new_proxy(alice, now=endpoint.service.now(), lifetime=timedelta(hours=1))
    c = client(endpoint, "pilot")
    try:
        challenge = c.request(Command.GET, "r-renew", "", 3600)
        assert challenge.code is ResponseCode.AUTHORIZATION
        methods = dict(challenge.auth_methods())
        nonce = methods["X509_certificate_SHA256"]
        assert len(nonce) == 32
        assert old.key is not None
        signature = old.key.sign(nonce.encode(), padding.PKCS1v15(), hashes.SHA256())  # type: ignore[call-arg, arg-type]
        ders = [cert.public_bytes(serialization.Encoding.DER) for cert in old.chain]
        c.send(codec.format_auth_reply(AuthMethodId.X509_CERTIFICATE_SHA256, signature, ders))
        assert c.recv_response().code is ResponseCode.OK
        c.send(make_csr(generate_key("ec")).public_bytes(serialization.Encoding.DER))
        blob = b""
        while not codec.chain_complete(blob):
            blob += c.recv()
        assert c.recv_response().code is ResponseCode.OK
    finally:
        c.close()


def test_renewal_with_a_bad_signature_is_refused(endpoint: Endpoint) -> None:
    put(endpoint, "r-renew2", passphrase="", extra={"RENEWER": PILOT_DN})
    alice = endpoint.pki.load("alice")
    c = client(endpoint, "pilot")
    try:
        challenge = c.request(Command.GET, "r-renew2", "", 3600)
        assert challenge.code is ResponseCode.AUTHORIZATION
        ders = [cert.public_bytes(serialization.Encoding.DER) for cert in alice.chain]
        c.send(codec.format_auth_reply(AuthMethodId.X509_CERTIFICATE_SHA256, b"\1" * 256, ders))
        response = c.recv_response()
        assert response.code is ResponseCode.ERROR
        assert "signature does not verify" in response.error
    finally:
        c.close()


def test_key_retrieval_is_refused_clearly(endpoint: Endpoint) -> None:
    put(endpoint, "r-key")
    c = client(endpoint, "alice")
    try:
        response = c.request(Command.RETRIEVE, "r-key", PASSPHRASE, 0)
    finally:
        c.close()
    assert response.code is ResponseCode.ERROR
    assert "myproxy-retrieve" in response.error


def test_store_command_uploads_a_credential(endpoint: Endpoint, grid_pki: GridPki) -> None:
    alice = grid_pki.load("alice")
    proxy = new_proxy(alice, now=endpoint.service.now(), lifetime=timedelta(hours=10))
    c = client(endpoint, "alice")
    try:
        assert c.request(Command.STORE, "r-store", PASSPHRASE, 3600).code is ResponseCode.OK
        c.send(credential_to_pem(Credential(proxy.chain, proxy.key)) + b"\0")
        assert c.recv_response().code is ResponseCode.OK
    finally:
        c.close()
    final, chain = get(endpoint, "r-store")
    assert final.code is ResponseCode.OK and len(chain) == 3


def test_get_trustroots_anonymous(endpoint: Endpoint) -> None:
    c = client(endpoint)
    try:
        response = c.request(Command.GET_TRUSTROOTS, "", "", 0, {"TRUSTED_CERTS": "1"})
    finally:
        c.close()
    assert response.code is ResponseCode.OK
    assert any(n.endswith(".signing_policy") for n in response.fields["TRUSTED_CERTS"].split(","))


# --------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    "payload",
    [
        b"garbage\0",
        b"VERSION=MYPROXYv9\nCOMMAND=0\nUSERNAME=a\n\0",
        b"VERSION=MYPROXYv2\nCOMMAND=0\nUSERNAME=../../etc\nPASSPHRASE=abcdefg\nLIFETIME=1\n\0",
        b"VERSION=MYPROXYv2\nCOMMAND=0\nUSERNAME=a\nLIFETIME=99999999999999999999999\n\0",
        b"\xff\xfe\x00",
    ],
)
def test_malformed_requests_get_an_error_and_the_server_lives(
    endpoint: Endpoint, payload: bytes
) -> None:
    c = client(endpoint)
    try:
        c.send(b"0")
        c.send(payload)
        response = c.recv_response()
        assert response.code is ResponseCode.ERROR and response.error
        assert c.recv() == b""  # closed after an ERROR
    finally:
        c.close()
    test_get_trustroots_anonymous(endpoint)


def test_garbage_instead_of_a_csr(endpoint: Endpoint) -> None:
    put(endpoint, "r-garbage")
    c = client(endpoint)
    try:
        assert c.request(Command.GET, "r-garbage", PASSPHRASE, 3600).code is ResponseCode.OK
        c.send(b"\x30\x05hello")
        response = c.recv_response()
        assert response.code is ResponseCode.ERROR
        assert "request" in response.error
    finally:
        c.close()


def test_oversized_request_is_refused(endpoint: Endpoint) -> None:
    c = client(endpoint)
    try:
        c.send(b"0")
        try:
            for _ in range(10):
                c.send(b"VERSION=MYPROXYv2\nCRED_DESC=" + b"x" * 16000)
        except OSError:
            pass
        # the server gives up on this connection (ERROR or a plain close)
        try:
            data = c.sock.recv(65536)
        except OSError:
            data = b""
        assert data == b"" or b"RESPONSE=1" in data
    finally:
        c.close()
    test_get_trustroots_anonymous(endpoint)


def test_silent_clients_time_out_and_do_not_block_the_pool(endpoint: Endpoint) -> None:
    idle = [socket.create_connection((endpoint.host, endpoint.port)) for _ in range(6)]
    try:
        started = time.monotonic()
        test_get_trustroots_anonymous(endpoint)  # waits for a slot: request_timeout is 3 s
        assert time.monotonic() - started < 15
    finally:
        for s in idle:
            s.close()


def test_wrong_flag_byte(endpoint: Endpoint) -> None:
    c = client(endpoint)
    try:
        c.send(b"D")
        assert c.recv() == b""
    finally:
        c.close()


def test_tls12_has_no_post_handshake_nul(grid_pki: GridPki, tmp_path: Path) -> None:
    with running_endpoint(tmp_path, grid_pki, max_tls="1.2") as ep:
        c = RawClient(ep, grid_pki.ca_dir)
        try:
            assert c.sock.version() == "TLSv1.2"
            c.sock.settimeout(0.5)
            with pytest.raises((TimeoutError, ssl.SSLError)):
                c.sock.recv(1)  # nothing arrives before the client speaks
            c.sock.settimeout(10)
            response = c.request(Command.GET_TRUSTROOTS, "", "", 0)
            assert response.code is ResponseCode.OK
        finally:
            c.close()


# --------------------------------------------------------------------------- process wrapper


def test_child_process_dies_with_its_parent(grid_pki: GridPki, tmp_path: Path) -> None:
    """start_myproxy_in_master's child exits when the parent is killed (-9, no atexit)."""
    from tests.broker.myproxy.support import make_config

    config = make_config(tmp_path, grid_pki)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = (
        "import dataclasses, json, sys, time\n"
        "from broker.config import ServerConfig\n"
        "from broker.myproxy.server import start_myproxy_in_master\n"
        "cfg = ServerConfig(**json.loads(sys.argv[1]))\n"
        "child = start_myproxy_in_master(cfg)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    import dataclasses
    import json

    payload = json.dumps(
        dataclasses.asdict(dataclasses.replace(config, myproxy_bind=f"127.0.0.1:{port}"))
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, payload],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[3],
    )
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        end = time.monotonic() + 30
        while time.monotonic() < end:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        else:
            pytest.fail("the MyProxy child never listened")
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        end = time.monotonic() + 15
        while time.monotonic() < end and _alive(child_pid):
            time.sleep(0.2)
        assert not _alive(child_pid)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_ambiguous_username_credname_form_is_refused(endpoint: Endpoint) -> None:
    # alice stores "r-amb/prod"; bob squats the slot "r-amb-prod": the hyphenated form is
    # ambiguous now and must not hand out bob's credential for a request meant for alice's.
    assert put(endpoint, "r-amb", name="prod").code is ResponseCode.OK
    assert put(endpoint, "r-amb-prod", who="bob").code is ResponseCode.OK
    final, chain = get(endpoint, "r-amb-prod")
    assert final.code is ResponseCode.ERROR and not chain
    assert "ambiguous" in final.fields.get("ERROR", "") or "ambiguous" in str(final)
    # naming the credential explicitly still works
    final, chain = get(endpoint, "r-amb", extra={"CRED_NAME": "prod"})
    assert final.code is ResponseCode.OK and chain


def test_refusals_decided_by_the_endpoint_are_audited(endpoint: Endpoint) -> None:
    put(endpoint, "r-audit")
    final, _ = get(endpoint, "r-audit", passphrase="wrong-passphrase")
    assert final.code is ResponseCode.ERROR
    rows = endpoint.service.store.query_audit(username="r-audit", action="retrieve")
    assert any(r.decision == "deny" for r in rows)


def test_too_many_wrong_passphrases_get_a_clear_refusal(endpoint: Endpoint) -> None:
    put(endpoint, "r-guess")
    limit = endpoint.service.config.passphrase_failures
    for attempt in range(limit):
        final, _ = get(endpoint, "r-guess", passphrase=f"wrong-passphrase-{attempt}")
        assert final.code is ResponseCode.ERROR
        assert "invalid credential passphrase" in final.error
    final, chain = get(endpoint, "r-guess")  # the right one, but not tried any more
    assert final.code is ResponseCode.ERROR and chain == []
    assert f"{limit} wrong passphrases for r-guess/default" in final.error


def test_negative_lifetime_is_refused_at_once(endpoint: Endpoint) -> None:
    put(endpoint, "r-negative")
    c = client(endpoint, "pilot")
    try:
        started = time.monotonic()
        response = c.request(Command.GET, "r-negative", PASSPHRASE, -5)
        assert response.code is ResponseCode.ERROR and "negative" in response.error
        assert time.monotonic() - started < 2
    finally:
        c.close()


def test_idle_tls_peers_do_not_hold_the_pool(endpoint: Endpoint) -> None:
    """Handshaken-but-silent clients wait outside the pool (4 threads here), then are closed."""
    idle = [client(endpoint) for _ in range(12)]  # three times the pool, after the handshake
    try:
        started = time.monotonic()
        test_get_trustroots_anonymous(endpoint)
        assert time.monotonic() - started < 2
        closed_by_server = 0
        for c in idle:
            c.sock.settimeout(10)
            with contextlib.suppress(OSError):
                closed_by_server += c.recv() == b""
        assert closed_by_server == len(idle)  # after the first-request deadline
    finally:
        for c in idle:
            c.close()


def test_one_address_keeps_at_most_per_address_first_stage_connections(
    grid_pki: GridPki, tmp_path: Path
) -> None:
    with running_endpoint(
        tmp_path, grid_pki, overrides={"per_address": 3, "first_request_timeout": 30.0}
    ) as ep:
        raws = [socket.create_connection((ep.host, ep.port)) for _ in range(5)]
        try:
            for raw in raws[:2]:  # the two oldest made room for the two newest
                raw.settimeout(5)
                assert raw.recv(10) == b""
            test_get_trustroots_anonymous(ep)  # evicts the oldest one left: served at once
        finally:
            for raw in raws:
                raw.close()


def test_a_full_server_closes_the_longest_waiting_connection(
    grid_pki: GridPki, tmp_path: Path
) -> None:
    with running_endpoint(
        tmp_path, grid_pki, overrides={"max_open": 4, "first_request_timeout": 30.0}
    ) as ep:
        raws = []
        for _ in range(6):
            raws.append(socket.create_connection((ep.host, ep.port)))
            time.sleep(0.05)  # accepted in this order
        try:
            for raw in raws[:2]:
                raw.settimeout(5)
                assert raw.recv(10) == b""
            started = time.monotonic()
            test_get_trustroots_anonymous(ep)
            assert time.monotonic() - started < 2
        finally:
            for raw in raws:
                raw.close()


def test_a_chain_our_checks_refuse_is_audited_on_the_myproxy_endpoint(
    endpoint: Endpoint, grid_pki: GridPki, tmp_path: Path
) -> None:
    """OpenSSL accepts the chain (an AC is only an extension to it), the broker's VOMS
    check refuses it: the refusal leaves a row, as on REST, and nothing is served."""
    pilot = grid_pki.load("pilot")
    now = datetime.now(UTC)
    # the real VOMS server's certificate, but the AC signed with bob's key
    forger = Credential(chain=grid_pki.load("voms").chain, key=grid_pki.load("bob").key)
    ac = make_ac_extension(
        pilot.cert,
        forger,
        vo="atlas",
        fqans=["/atlas/Role=pilot"],
        uri="voms.example.org:15001",
        now=now,
        lifetime=timedelta(hours=2),
    )
    proxy = new_proxy(pilot, now=now, lifetime=timedelta(hours=2), extra_extensions=[ac])
    path = write_proxy_file(tmp_path / "forged.pem", proxy)
    c = RawClient(endpoint, grid_pki.ca_dir, path, path)
    try:
        response = c.request(Command.INFO, "forged-ac-probe")
        assert response.code is ResponseCode.ERROR
        assert "VOMS" in response.error or "attribute" in response.error, response.error
    finally:
        c.close()
    rows = [
        r
        for r in endpoint.service.store.query_audit(action="authenticate", limit=1000)
        if r.endpoint == "myproxy" and (r.reason or "").startswith("bad_ac_signature")
    ]
    assert len(rows) == 1, rows
    assert rows[0].decision == "deny"
    assert rows[0].requester_dn == "/DC=org/DC=example/CN=pilot"
