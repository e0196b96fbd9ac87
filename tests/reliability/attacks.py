"""Attacks, one named check each; every one counts what it tried and what got through.

"Accepted" means the server (or the payload wrapper) did what the attacker
wanted: a 2xx answer, a TLS session that reached the application, a payload
that saw a smuggled variable or touched the pilot. It must be 0 everywhere.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from broker.errors import BrokerError
from broker.pki import voms
from broker.pki.loading import Credential, chain_to_pem
from broker.pki.proxy import (
    PROXY_CERT_INFO_OID,
    ProxyType,
    encode_proxy_cert_info,
    generate_key,
    load_csr,
    new_proxy,
)
from tests.brokerserver import RunningBroker
from tests.pkifixtures import GridPki, write_proxy_file
from tests.reliability.harness import Outcome, launch
from tests.reliability.myproxy_client import MyProxyClient, MyProxyRefused

HOUR = timedelta(hours=1)


# --------------------------------------------------------------------------- helpers


def _forge(
    issuer: Credential,
    public_key: Any,
    *,
    now: datetime,
    proxy_type: ProxyType = ProxyType.IMPERSONATION,
    path_length: int | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    subject: x509.Name | None = None,
    extensions: tuple[x509.ExtensionType, ...] = (),
) -> x509.Certificate:
    """A proxy-shaped certificate for ``public_key`` signed with none of the library's checks."""
    assert issuer.key is not None
    serial = x509.random_serial_number()
    subject = subject or x509.Name(
        [
            *issuer.cert.subject.rdns,
            x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, str(serial))]),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before or now - timedelta(minutes=5))
        .not_valid_after(not_after or now + HOUR)
        .add_extension(
            x509.UnrecognizedExtension(
                PROXY_CERT_INFO_OID, encode_proxy_cert_info(proxy_type, path_length)
            ),
            critical=True,
        )
    )
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(issuer.key, hashes.SHA256())


def _forged_cred(issuer: Credential, **kw: Any) -> Credential:
    key = generate_key("ec")
    cert = _forge(issuer, key.public_key(), now=datetime.now(UTC), **kw)
    return Credential(chain=(cert, *issuer.chain), key=key)


def _rogue_ca_user(dn_cn: str = "Alice") -> tuple[Credential, Credential]:
    """A CA nobody trusts and a user named exactly like a real one."""
    now = datetime.now(UTC)
    ca_key = generate_key("ec")
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "org"),
            x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "example"),
            x509.NameAttribute(NameOID.COMMON_NAME, "Example Test CA"),
        ]
    )
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - HOUR)
        .not_valid_after(now + 24 * HOUR)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    user_key = generate_key("ec")
    user_name = x509.Name(
        [
            x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "org"),
            x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "example"),
            x509.NameAttribute(NameOID.COMMON_NAME, dn_cn),
        ]
    )
    user = (
        x509.CertificateBuilder()
        .subject_name(user_name)
        .issuer_name(ca_name)
        .public_key(user_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - HOUR)
        .not_valid_after(now + 24 * HOUR)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return Credential(chain=(ca,), key=ca_key), Credential(chain=(user, ca), key=user_key)


class _Tls:
    """Raw HTTPS on a fresh connection with any credential file; status 0 = refused."""

    def __init__(self, broker: RunningBroker, workdir: Path) -> None:
        self.broker = broker
        self.workdir = workdir
        self.count = 0

    def status(
        self,
        cred: Credential | None,
        method: str,
        path: str,
        body: dict[str, Any] | bytes | None = None,
        *,
        extra_headers: str = "",
    ) -> tuple[int, bytes]:
        ctx = ssl.create_default_context(capath=str(self.broker.pki.ca_dir))
        if cred is not None:
            self.count += 1
            path_file = write_proxy_file(self.workdir / f"cred{self.count}.pem", cred)
            ctx.load_cert_chain(str(path_file))
        payload = (
            body
            if isinstance(body, bytes)
            else (json.dumps(body).encode() if body is not None else b"")
        )
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
            f"{extra_headers}\r\n"
        ).encode()
        data = b""
        try:
            with (
                socket.create_connection(("127.0.0.1", self.broker.port), timeout=20) as raw,
                ctx.wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                try:
                    tls.sendall(head + payload)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    pass
                while True:
                    try:
                        chunk = tls.recv(65536)
                    except (ConnectionResetError, ssl.SSLError, TimeoutError):
                        break
                    if not chunk:
                        break
                    data += chunk
        except (ssl.SSLError, OSError):
            return 0, b""
        if not data.startswith(b"HTTP/1."):
            return 0, data[:100]
        top, _, rest = data.partition(b"\r\n\r\n")
        return int(top.split(b" ", 2)[1]), rest


class _Attack:
    """Counts attempts; ``expect_refused`` records one and fails it when it got through."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome

    def expect_refused(self, label: str, status: int, body: bytes = b"") -> None:
        self.outcome.tried += 1
        if 200 <= status < 300:
            self.outcome.fail(f"ACCEPTED {label}: HTTP {status} {body[:160]!r}")
        elif status >= 500:
            self.outcome.fail(
                f"{label}: HTTP {status} (a server error, not a refusal) {body[:160]!r}"
            )
        else:
            reason = ""
            if body:
                try:
                    reason = json.loads(body).get("error", "")
                except ValueError:
                    reason = "?"
            self.outcome.note(f"refused {label}: {status or 'TLS'} {reason}".rstrip())


def _pending(broker: RunningBroker, who: str, username: str, name: str) -> tuple[str, Any]:
    started = broker.client(who).call(
        "POST", "/v1/delegations", {"username": username, "name": name}
    )
    return started["id"], load_csr(started["csr"].encode())


def _put(
    tls: _Tls, who: Credential, pending_id: str, chain: tuple[x509.Certificate, ...]
) -> tuple[int, bytes]:
    return tls.status(
        who, "PUT", f"/v1/delegations/{pending_id}", {"chain": chain_to_pem(chain).decode()}
    )


# --------------------------------------------------------------------------- the attacks


def all_attacks(
    pki: GridPki, base: Path, sizes: Any, rng: random.Random, *, myproxy: bool
) -> Iterator[tuple[str, Callable[[Outcome], None]]]:
    """(name, body) pairs; one broker serves the broker-side attacks (started lazily)."""
    state: dict[str, Any] = {}

    def broker() -> tuple[RunningBroker, _Tls, int]:
        if "broker" not in state:
            b, mp = launch(pki, base / "attacks", myproxy=myproxy)
            state["broker"], state["mp"] = b, mp
            work = base / "attack-creds"
            work.mkdir(mode=0o700, exist_ok=True)
            state["tls"] = _Tls(b, work)
            alice = b.client("alice")
            alice.delegate(alice.identity.load(), username="alice", now=datetime.now(UTC))
        return state["broker"], state["tls"], state["mp"]

    def wrap(fn: Callable[..., None]) -> Callable[[Outcome], None]:
        def body(outcome: Outcome) -> None:
            b, tls, mp = broker()
            fn(pki, b, tls, mp, _Attack(outcome))

        return body

    yield "forged VOMS AC", wrap(_forged_ac)
    yield "AC for another holder", wrap(_ac_other_holder)
    yield "wrong CA", wrap(_wrong_ca)
    yield "expired / not-yet-valid", wrap(_validity)
    yield "path-length violation", wrap(_path_length)
    yield "full proxy from a limited one", wrap(_full_from_limited)
    yield "chain for another DN", wrap(_foreign_chain)
    yield "replayed / foreign delegation id", wrap(_replay)
    yield "../ and NUL in names", wrap(_names)
    yield "oversize requests", wrap(_oversize)

    def slow(outcome: Outcome) -> None:
        b, _, _ = broker()
        _slowloris(b, sizes.slow_connections, outcome, short=sizes.kills < 10)

    yield "slow-loris connections", slow

    def finish(outcome: Outcome) -> None:
        if "broker" in state:
            b = state["broker"]
            b.stop()
            log = b.log.read_text(errors="replace")
            outcome.note(f"attack broker log: {log.count('unexpected error')} unexpected errors")
            if "unexpected error" in log:
                outcome.fail("the attack broker logged an unexpected error (a 500 path)")
            outcome.tried += 1

    yield "attack server clean shutdown", finish
    from tests.reliability import (
        availability_attacks,
        deploy_attacks,
        identity_attacks,
        pilot_attacks,
        protocol_attacks,
        token_attacks,
        wrapper_attacks,
    )

    yield from wrapper_attacks.attacks(pki, base)
    yield from pilot_attacks.attacks(base)
    yield from identity_attacks.attacks(pki, base, myproxy=myproxy)
    yield from protocol_attacks.attacks(pki, base)
    yield from availability_attacks.attacks(pki, base, myproxy=myproxy)
    yield from token_attacks.attacks(pki, base)
    yield from deploy_attacks.attacks(pki, base)


def _voms_proxy(pki: GridPki, *, holder: x509.Certificate, signer: Credential) -> Credential:
    now = datetime.now(UTC)
    ext = voms.make_ac_extension(
        holder,
        signer,
        vo="atlas",
        fqans=["/atlas/Role=pilot"],
        uri=str(pki.manifest["voms_uri"]),
        now=now,
        lifetime=HOUR,
    )
    return new_proxy(
        pki.load("alice"), now=now, lifetime=HOUR, key=generate_key("ec"), extra_extensions=[ext]
    )


def _forged_ac(pki: GridPki, b: RunningBroker, tls: _Tls, mp: int, a: _Attack) -> None:
    _, rogue = _rogue_ca_user("voms.example.org")
    forger = Credential(chain=(pki.pki.voms.cert,), key=rogue.key)  # genuine cert, wrong key
    proxy = _voms_proxy(pki, holder=pki.load("alice").cert, signer=forger)
    a.expect_refused("whoami with a forged AC", *tls.status(proxy, "GET", "/v1/whoami"))
    # the forged Role=pilot would let alice retrieve as a pilot if it were believed
    a.expect_refused(
        "retrieval as fqan:/atlas/Role=pilot with a forged AC",
        *tls.status(proxy, "POST", "/v1/retrievals", {"username": "alice", "csr": _csr()}),
    )
    self_signed = Credential(chain=(rogue.cert,), key=rogue.key)  # a whole fake signer
    proxy2 = _voms_proxy(pki, holder=pki.load("alice").cert, signer=self_signed)
    a.expect_refused(
        "whoami with an AC from an untrusted signer", *tls.status(proxy2, "GET", "/v1/whoami")
    )


def _ac_other_holder(pki: GridPki, b: RunningBroker, tls: _Tls, mp: int, a: _Attack) -> None:
    proxy = _voms_proxy(pki, holder=pki.load("bob").cert, signer=pki.pki.voms)
    a.expect_refused(
        "whoami with bob's AC in alice's proxy", *tls.status(proxy, "GET", "/v1/whoami")
    )
    a.expect_refused(
        "retrieval with bob's AC in alice's proxy",
        *tls.status(proxy, "POST", "/v1/retrievals", {"username": "alice", "csr": _csr()}),
    )


def _csr() -> str:
    from broker.pki.proxy import csr_to_pem, make_csr

    return csr_to_pem(make_csr(generate_key("ec"))).decode()


def _wrong_ca(pki: GridPki, b: RunningBroker, tls: _Tls, mp: int, a: _Attack) -> None:
    _, fake_alice = _rogue_ca_user("Alice")
    a.expect_refused(
        "TLS as a look-alike Alice from an untrusted CA",
        *tls.status(fake_alice, "GET", "/v1/whoami"),
    )
    fake_proxy = new_proxy(fake_alice, now=datetime.now(UTC), lifetime=HOUR, key=generate_key("ec"))
    a.expect_refused(
        "TLS with a proxy of the look-alike", *tls.status(fake_proxy, "GET", "/v1/credentials")
    )
    pending_id, csr = _pending(b, "alice", "alice", "wrongca")
    chain = (_forge(fake_alice, csr.public_key(), now=datetime.now(UTC)), *fake_alice.chain)
    a.expect_refused(
        "delegating a chain from an untrusted CA", *_put(tls, pki.load("alice"), pending_id, chain)
    )
    if mp:
        _myproxy_refused(a, "MyProxy PUT as the look-alike", b, mp, fake_alice)


def _myproxy_refused(a: _Attack, label: str, b: RunningBroker, mp: int, cred: Credential) -> None:
    path = write_proxy_file(Path(tempfile.mkdtemp()) / "c.pem", cred)
    try:
        client = MyProxyClient(mp, b.pki.ca_dir, path, path, timeout=10)
        client.put(cred, "alice", "mpattack")
        status = 201
    except (MyProxyRefused, OSError, ConnectionError, ssl.SSLError, BrokerError):
        status = 0
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)
    a.expect_refused(label, status)


def _validity(pki: GridPki, b: RunningBroker, tls: _Tls, mp: int, a: _Attack) -> None:
    now = datetime.now(UTC)
    alice = pki.load("alice")
    expired = _forged_cred(alice, not_before=now - 3 * HOUR, not_after=now - HOUR)
    future = _forged_cred(alice, not_before=now + HOUR, not_after=now + 3 * HOUR)
    a.expect_refused("TLS with an expired proxy", *tls.status(expired, "GET", "/v1/whoami"))
    a.expect_refused("TLS with a not-yet-valid proxy", *tls.status(future, "GET", "/v1/whoami"))
    for label, nb, na in (
        ("expired", now - 3 * HOUR, now - HOUR),
        ("not-yet-valid", now + HOUR, now + 3 * HOUR),
    ):
        pending_id, csr = _pending(b, "alice", "alice", f"v{label[:3]}")
        chain = (
            _forge(alice, csr.public_key(), now=now, not_before=nb, not_after=na),
            *alice.chain,
        )
        a.expect_refused(f"delegating an {label} chain", *_put(tls, alice, pending_id, chain))


def _path_length(pki: GridPki, b: RunningBroker, tls: _Tls, mp: int, a: _Attack) -> None:
    alice = pki.load("alice")
    zero = _forged_cred(alice, path_length=0)
    below = _forged_cred(zero)
    a.expect_refused(
        "TLS with a proxy under a path-length-0 proxy", *tls.status(below, "GET", "/v1/whoami")
    )
    pending_id, csr = _pending(b, "alice", "alice", "plen")
    chain = (_forge(zero, csr.public_key(), now=datetime.now(UTC)), *zero.chain)
    a.expect_refused("delegating under a path-length-0 proxy", *_put(tls, zero, pending_id, chain))


def _full_from_limited(pki: GridPki, b: RunningBroker, tls: _Tls, mp: int, a: _Attack) -> None:
    alice = pki.load("alice")
    limited = _forged_cred(alice, proxy_type=ProxyType.LIMITED)
    full = _forged_cred(limited, proxy_type=ProxyType.IMPERSONATION)
    status, body = tls.status(full, "GET", "/v1/whoami")
    if status == 200 and json.loads(body).get("limited") is True:
        status = 403  # accepted only as the limited proxy it really is: not an escalation
    a.expect_refused("TLS with a full proxy under a limited one", status, body)
    pending_id, csr = _pending(b, "alice", "alice", "lim")
    chain = (_forge(limited, csr.public_key(), now=datetime.now(UTC)), *limited.chain)
    a.expect_refused(
        "delegating a full proxy signed by a limited one", *_put(tls, limited, pending_id, chain)
    )


def _foreign_chain(pki: GridPki, b: RunningBroker, tls: _Tls, mp: int, a: _Attack) -> None:
    alice, bob = pki.load("alice"), pki.load("bob")
    pending_id, csr = _pending(b, "alice", "alice", "foreign")
    from broker.pki.proxy import sign_request

    chain = sign_request(bob, csr, now=datetime.now(UTC), lifetime=HOUR)
    a.expect_refused(
        "alice stores a chain of bob (delegation of a foreign chain)",
        *_put(tls, alice, pending_id, chain),
    )
    pending_id, csr = _pending(b, "alice", "alice", "foreign2")
    other_key = generate_key("ec")
    chain2 = (_forge(alice, other_key.public_key(), now=datetime.now(UTC)), *alice.chain)
    a.expect_refused(
        "a valid alice chain for a key other than the pending one",
        *_put(tls, alice, pending_id, chain2),
    )


def _replay(pki: GridPki, b: RunningBroker, tls: _Tls, mp: int, a: _Attack) -> None:
    from broker.pki.proxy import sign_request

    alice, bob = pki.load("alice"), pki.load("bob")
    pending_id, csr = _pending(b, "alice", "alice", "replay")
    bob_chain = sign_request(bob, csr, now=datetime.now(UTC), lifetime=HOUR)
    a.expect_refused("bob PUTs alice's pending id", *_put(tls, bob, pending_id, bob_chain))
    good = sign_request(alice, csr, now=datetime.now(UTC), lifetime=HOUR)
    status, body = _put(tls, alice, pending_id, good)
    if status != 201:
        a.outcome.fail(f"alice's own PUT failed after bob's attempt: {status} {body[:120]!r}")
    a.expect_refused("alice PUTs the same id twice (replay)", *_put(tls, alice, pending_id, good))
    a.expect_refused("PUT to an invented id", *_put(tls, alice, "A" * 22, good))
    pending2, csr2 = _pending(b, "bob", "bob", "bobs")
    a.expect_refused(
        "alice PUTs bob's pending id with her chain",
        *_put(
            tls, alice, pending2, sign_request(alice, csr2, now=datetime.now(UTC), lifetime=HOUR)
        ),
    )


def _names(pki: GridPki, b: RunningBroker, tls: _Tls, mp: int, a: _Attack) -> None:
    from urllib.parse import quote

    alice = pki.load("alice")
    bad = [
        "../etc",
        "..",
        "a/../../b",
        "a\0b",
        "\0",
        "x/y",
        ".",
        "../../../../tmp/pwn",
        "..\\x",
        "a\nb",
        "%2e%2e",
        "con\0.toml",
    ]
    for value in bad:
        # Usernames are database keys (DNs and "../x" included, as in MyProxy); only
        # control characters are refused there. Credential names stay single path components.
        fields = ("username", "name") if any(c < " " for c in value) else ("name",)
        for field in fields:
            body = {"username": "alice", "name": "ok", field: value}
            a.expect_refused(
                f"POST delegation with {field}={value!r}",
                *tls.status(alice, "POST", "/v1/delegations", body),
            )
        a.expect_refused(
            f"DELETE /v1/credentials/{value!r}/default",
            *tls.status(alice, "DELETE", f"/v1/credentials/{quote(value, safe='')}/default"),
        )
        a.expect_refused(
            f"retrieval of username {value!r}",
            *tls.status(
                pki.load("pilot"), "POST", "/v1/retrievals", {"username": value, "csr": _csr()}
            ),
        )
    if mp:
        path = write_proxy_file(Path(tempfile.mkdtemp()) / "a.pem", alice)
        try:
            client = MyProxyClient(mp, b.pki.ca_dir, path, path, timeout=10)
            for value in ("a\x1bb", "a\x7fb", "a\u202eb"):
                try:
                    client.put(alice, value, "x")
                    status = 201
                except (MyProxyRefused, OSError, ConnectionError):
                    status = 0
                a.expect_refused(f"MyProxy PUT with USERNAME={value!r}", status)
        finally:
            shutil.rmtree(path.parent, ignore_errors=True)
    stray = [p for p in Path(b.state_dir).rglob("*") if ".." in p.name or "pwn" in p.name]
    if stray:
        a.outcome.fail(f"files named after hostile input appeared: {stray}")


def _oversize(pki: GridPki, b: RunningBroker, tls: _Tls, mp: int, a: _Attack) -> None:
    pilot = pki.load("pilot")
    a.expect_refused(
        "a 300 kB JSON body",
        *tls.status(pilot, "POST", "/v1/retrievals", b"{" + b" " * 300_000 + b"}"),
    )
    a.expect_refused(
        "a 16 kB header line",
        *tls.status(pilot, "GET", "/v1/whoami", extra_headers="X-Big: " + "a" * 16_000 + "\r\n"),
    )
    a.expect_refused(
        "200 header fields",
        *tls.status(
            pilot, "GET", "/v1/whoami", extra_headers="".join(f"X-H{i}: v\r\n" for i in range(200))
        ),
    )
    a.expect_refused(
        "a 10 kB request line", *tls.status(pilot, "GET", "/v1/whoami?" + "a" * 10_000)
    )
    chain = chain_to_pem(pki.load("alice").chain).decode() * 60
    pending_id, _ = _pending(b, "alice", "alice", "big")
    a.expect_refused(
        "a 120 kB chain",
        *tls.status(pki.load("alice"), "PUT", f"/v1/delegations/{pending_id}", {"chain": chain}),
    )
    a.expect_refused(
        "retrievers list of 10,000 entries",
        *tls.status(
            pki.load("alice"),
            "POST",
            "/v1/delegations",
            {"username": "alice", "name": "many", "retrievers": ["/CN=x"] * 10_000},
        ),
    )


def _slowloris(b: RunningBroker, count: int, outcome: Outcome, *, short: bool) -> None:
    """Many TLS connections that trickle their headers; others must still be served."""
    hold = 25.0 if short else 45.0
    closed_after: list[float] = []
    lock = threading.Lock()
    stop = threading.Event()

    def slow(index: int) -> None:
        ctx = ssl.create_default_context(capath=str(b.pki.ca_dir))
        ctx.load_cert_chain(str(b.pki.cert_path("bob")), str(b.pki.key_path("bob")))
        started = time.monotonic()
        try:
            with (
                socket.create_connection(("127.0.0.1", b.port), timeout=5) as raw,
                ctx.wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                request = b"GET /v1/whoami HTTP/1.1\r\nHost: localhost\r\nX-Slow: "
                tls.sendall(request)
                for _ in range(int(hold / 0.5)):
                    if stop.wait(0.5):
                        break
                    tls.sendall(b"a")
                    tls.settimeout(0.01)
                    try:
                        if tls.recv(1024) == b"":
                            break
                    except (TimeoutError, ssl.SSLWantReadError):
                        pass
                    except (ssl.SSLError, OSError):
                        break
                    tls.settimeout(5)
                else:
                    return  # still open at the end of the hold
        except (ssl.SSLError, OSError):
            pass
        with lock:
            closed_after.append(time.monotonic() - started)

    threads = [threading.Thread(target=slow, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    client = b.client("alice")
    client.timeout = 15
    latencies: list[float] = []
    failures = 0
    probe_deadline = time.monotonic() + hold - 4
    probes = 0
    while time.monotonic() < probe_deadline and probes < 200:
        probes += 1
        t0 = time.monotonic()
        try:
            client.call("GET", "/v1/whoami")
            latencies.append(time.monotonic() - t0)
        except (BrokerError, OSError) as exc:
            failures += 1
            outcome.fail(f"a normal client was not served during the slow-loris: {exc}")
        time.sleep(0.25)
    for thread in threads:
        thread.join(timeout=hold + 10)
    stop.set()
    outcome.tried += probes + count
    worst = max(latencies) if latencies else 0.0
    if worst > 5.0:
        outcome.fail(f"a normal request took {worst:.1f} s during the slow-loris (bound 5 s)")
    still_open = count - len(closed_after)
    outcome.note(
        f"{count} slow connections for up to {hold:.0f} s; {probes} normal requests, "
        f"{failures} failed, worst {worst * 1000:.0f} ms"
    )
    outcome.note(
        f"slow connections closed by the server: {len(closed_after)} (after "
        f"{min(closed_after, default=0):.1f}-{max(closed_after, default=0):.1f} s); "
        f"still open after {hold:.0f} s: {still_open}"
    )
    if still_open:
        outcome.fail(
            f"{still_open} slow-loris connections were still open after {hold:.0f} s: "
            "the server has no timeout for a client that trickles its headers"
        )
