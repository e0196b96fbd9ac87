"""Identity attacks of issue 18: who a chain says it is, and whether the broker believes it.

One broker of its own (two gunicorn workers, MyProxy when usable) on a private copy of
the CA directory, which also trusts a second CA ("Rogue CA", namespace /DC=org/DC=rogue/*)
and later gets a CRL. Each case fails on the code before issue 18:

* a second trusted CA issues Alice's DN outside its namespace;
* a DC value ``example/CN=Alice`` prints as Alice's DN;
* an independent proxy of Alice acts as Alice;
* the shipped ban rule leaves a banned owner's credential retrievable;
* a revoked user keeps using REST after the CRL update.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from broker.errors import BrokerError
from broker.pki.devca import ca_files, issue_certificate, make_ca, make_crl, subject_hash
from broker.pki.loading import Credential
from broker.pki.proxy import ProxyType, csr_to_pem, generate_key, make_csr, new_proxy, sign_request
from broker.policy_dir import DEFAULT_SETTLE
from broker.trustdir import RELOAD_INTERVAL
from tests.brokerserver import RunningBroker
from tests.pkifixtures import GridPki, write_proxy_file
from tests.reliability.attacks import _Attack, _pending, _put, _Tls
from tests.reliability.harness import Outcome, launch
from tests.reliability.myproxy_client import MyProxyClient, MyProxyRefused

ALICE = "/DC=org/DC=example/CN=Alice"
ROGUE_CA = "/DC=org/DC=rogue/CN=Rogue CA"
HOUR = timedelta(hours=1)
REPO = Path(__file__).resolve().parents[2]
#: The bound docs/trust.md states (RELOAD_INTERVAL) plus slack for two loaded cores.
REVOCATION_BOUND = RELOAD_INTERVAL + 3.0


@dataclasses.dataclass
class _World:
    pki: GridPki  # ca_dir: the private copy
    broker: RunningBroker
    tls: _Tls
    mp: int
    rogue: Credential


def _csr_body(username: str, name: str = "default") -> dict[str, Any]:
    return {
        "csr": csr_to_pem(make_csr(generate_key("ec"))).decode(),
        "username": username,
        "name": name,
    }


def _myproxy(world: _World, cred: Credential) -> tuple[MyProxyClient, Path]:
    path = write_proxy_file(Path(tempfile.mkdtemp()) / "c.pem", cred)
    return MyProxyClient(world.mp, world.pki.ca_dir, path, path, timeout=10), path


def _myproxy_refused(
    a: _Attack, world: _World, label: str, cred: Credential, act: Callable[[MyProxyClient], object]
) -> None:
    client, path = _myproxy(world, cred)
    a.outcome.tried += 1
    try:
        act(client)
        a.outcome.fail(f"ACCEPTED {label}")
    except MyProxyRefused as exc:
        a.outcome.note(f"refused {label}: ERROR {str(exc)[:100]}")
    except (OSError, ConnectionError, BrokerError) as exc:
        a.outcome.note(f"refused {label}: {type(exc).__name__} {str(exc)[:80]}")
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)


def _myproxy_works(
    a: _Attack, world: _World, label: str, cred: Credential, act: Callable[[MyProxyClient], object]
) -> None:
    """A control: the same MyProxy command with a genuine credential must succeed."""
    client, path = _myproxy(world, cred)
    a.outcome.tried += 1
    try:
        act(client)
    except (MyProxyRefused, OSError, ConnectionError, BrokerError) as exc:
        a.outcome.fail(f"control failed, {label}: {exc}")
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)


def _not_alice(a: _Attack, label: str, status: int, body: bytes) -> None:
    """A 2xx answer is fine here as long as it is not Alice's identity or credentials."""
    import json

    a.outcome.tried += 1
    if 200 <= status < 300:
        data = json.loads(body or b"{}")
        if data.get("identity") == ALICE or data.get("credentials"):
            a.outcome.fail(f"ACCEPTED {label}: answered as Alice {body[:160]!r}")
            return
        a.outcome.note(f"{label}: answered as {data.get('identity')}")
    elif status >= 500:
        a.outcome.fail(f"{label}: HTTP {status} (a server error, not a refusal)")
    else:
        a.outcome.note(f"refused {label}: {status or 'TLS'}")


# --------------------------------------------------------------------------- the cases


def _second_ca(world: _World, a: _Attack) -> None:
    now = datetime.now(UTC)
    fake_alice = issue_certificate(world.rogue, ALICE, now=now, days=1)
    fake_pilot = issue_certificate(
        world.rogue, "/DC=org/DC=example/CN=pilot-rogue", now=now, days=1
    )
    tls = world.tls
    _not_alice(
        a, "rogue-CA Alice lists credentials", *tls.status(fake_alice, "GET", "/v1/credentials")
    )
    a.expect_refused(
        "rogue-CA pilot retrieves Alice's proxy",
        *tls.status(fake_pilot, "POST", "/v1/retrievals", _csr_body("alice")),
    )
    a.expect_refused(
        "rogue-CA Alice destroys her credential",
        *tls.status(fake_alice, "DELETE", "/v1/credentials/alice/default"),
    )
    if world.mp:
        _myproxy_refused(
            a,
            world,
            "MyProxy GET of Alice's proxy by the rogue-CA pilot",
            fake_pilot,
            lambda c: c.get("alice", "default"),
        )
        _myproxy_refused(
            a, world, "MyProxy INFO as the rogue-CA Alice", fake_alice, lambda c: c.info("alice")
        )
        _myproxy_works(
            a,
            world,
            "MyProxy INFO as the real Alice",
            world.pki.load("alice"),
            lambda c: c.info("alice"),
        )
    # The second CA inside its own namespace still works (not a blanket refusal).
    carol = issue_certificate(world.rogue, "/DC=org/DC=rogue/CN=Carol", now=now, days=1)
    status, body = tls.status(carol, "GET", "/v1/whoami")
    a.outcome.tried += 1
    if status != 200:
        a.outcome.fail(f"a rogue-CA user inside its namespace was refused: {status} {body!r}")


def _slash_dn(world: _World, a: _Attack) -> None:
    ca = world.pki.pki.ca
    assert ca.key is not None
    now = datetime.now(UTC)
    key = generate_key("ec")
    name = x509.Name(
        [
            x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "org")]),
            x509.RelativeDistinguishedName(
                [x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "example/CN=Alice")]
            ),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - HOUR)
        .not_valid_after(now + HOUR)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca.key, hashes.SHA256())
    )
    fake = Credential(chain=(cert,), key=key)
    _not_alice(
        a,
        "DC='example/CN=Alice' lists credentials",
        *world.tls.status(fake, "GET", "/v1/credentials"),
    )
    _not_alice(a, "DC='example/CN=Alice' whoami", *world.tls.status(fake, "GET", "/v1/whoami"))
    a.expect_refused(
        "DC='example/CN=Alice' destroys Alice's credential",
        *world.tls.status(fake, "DELETE", "/v1/credentials/alice/default"),
    )
    if world.mp:
        _myproxy_refused(
            a, world, "MyProxy INFO as DC='example/CN=Alice'", fake, lambda c: c.info("alice")
        )


def _independent(world: _World, a: _Attack) -> None:
    alice = world.pki.load("alice")
    now = datetime.now(UTC)
    indep = new_proxy(
        alice, now=now, lifetime=HOUR, proxy_type=ProxyType.INDEPENDENT, key=generate_key("ec")
    )
    tls = world.tls
    _not_alice(a, "independent proxy whoami", *tls.status(indep, "GET", "/v1/whoami"))
    _not_alice(
        a, "independent proxy lists credentials", *tls.status(indep, "GET", "/v1/credentials")
    )
    a.expect_refused(
        "independent proxy destroys Alice's credential",
        *tls.status(indep, "DELETE", "/v1/credentials/alice/default"),
    )
    pending_id, csr = _pending(world.broker, "alice", "alice", "indep")
    chain = sign_request(indep, csr, now=now, lifetime=HOUR)
    a.expect_refused(
        "a chain through an independent proxy delegated as Alice's",
        *_put(tls, alice, pending_id, chain),
    )
    a.expect_refused(
        "pilot retrieves from that chain",
        *tls.status(world.pki.load("pilot"), "POST", "/v1/retrievals", _csr_body("alice", "indep")),
    )
    if world.mp:
        _myproxy_refused(
            a,
            world,
            "MyProxy PUT with an independent proxy as Alice's",
            indep,
            lambda c: c.put(indep, "alice", "mpindep"),
        )


def _banned_owner(world: _World, a: _Attack) -> None:
    """The shipped policies/10-site.toml, its ban list naming the dev PKI's Mallory."""
    b = world.broker
    mallory = b.client("mallory")
    mallory.delegate(mallory.identity.load(), username="mallory", now=datetime.now(UTC))
    site = (REPO / "policies" / "10-site.toml").read_text()
    lines = [
        ('banned = ["/DC=org/DC=example/CN=Mallory*"]' if line.startswith("banned =") else line)
        for line in site.splitlines()
    ]
    assert any('CN=Mallory*"]' in line for line in lines)
    (b.policy_dir / "05-site.toml").write_text("\n".join(lines) + "\n")
    written = time.monotonic()
    # Each worker applies a changed policy directory once it has been stable for
    # DEFAULT_SETTLE seconds, looking at most every 2 s, on a request.
    settled = DEFAULT_SETTLE + 2.5
    deadline = written + settled + 15
    while time.monotonic() < deadline:
        try:  # starting a delegation asks the policy; the ban denies it
            mallory.call("POST", "/v1/delegations", {"username": "mallory", "name": "probe"})
        except BrokerError:
            if time.monotonic() - written > settled:
                break
        time.sleep(0.3)
    else:
        a.outcome.fail(f"the ban file was not picked up within {deadline - written:.0f} s")
        return
    pilot = world.pki.load("pilot")
    for attempt in range(4):  # fresh connections: both workers
        a.expect_refused(
            f"pilot retrieves banned Mallory's credential ({attempt + 1})",
            *world.tls.status(pilot, "POST", "/v1/retrievals", _csr_body("mallory")),
        )
    # The ban does not spill over: the pilot still gets Alice's.
    status, body = world.tls.status(pilot, "POST", "/v1/retrievals", _csr_body("alice"))
    a.outcome.tried += 1
    if status != 200:
        a.outcome.fail(f"the pilot could not retrieve Alice's credential: {status} {body!r}")
    (b.policy_dir / "05-site.toml").unlink()


def _revocation(world: _World, a: _Attack) -> None:
    pki, tls = world.pki, world.tls
    bob = pki.load("bob")
    # A stored credential, so that MyProxy INFO as bob succeeds until the CRL says otherwise.
    world.broker.client("bob").delegate(bob, username="bob", now=datetime.now(UTC))
    if world.mp:
        _myproxy_works(a, world, "MyProxy INFO as bob before the CRL", bob, lambda c: c.info("bob"))
    for _ in range(6):  # warm the chain caches of both workers
        status, _ = tls.status(bob, "GET", "/v1/whoami")
        if status != 200:
            a.outcome.fail(f"bob was refused before any CRL: {status}")
            return
    crl = make_crl(pki.pki.ca, now=datetime.now(UTC), revoked_serials=[bob.cert.serial_number])
    fd, tmp = tempfile.mkstemp(dir=pki.ca_dir, prefix=".crl")
    with os.fdopen(fd, "wb") as handle:
        handle.write(crl.public_bytes(Encoding.PEM))
    os.chmod(tmp, 0o644)
    os.replace(tmp, pki.ca_dir / f"{subject_hash(pki.pki.ca.cert)}.r0")  # as fetch-crl does
    start = time.monotonic()
    streak, took = 0, None
    while time.monotonic() - start < REVOCATION_BOUND + 2:
        status, _ = tls.status(bob, "GET", "/v1/whoami")
        streak = streak + 1 if status != 200 else 0
        if streak >= 4:
            took = time.monotonic() - start
            break
        time.sleep(0.05)
    a.outcome.tried += 1
    if took is None or took > REVOCATION_BOUND:
        a.outcome.fail(
            f"REST still accepted revoked bob {REVOCATION_BOUND:.0f} s after the CRL update"
        )
    else:
        a.outcome.note(
            f"REST refused revoked bob {took:.1f} s after the CRL update "
            f"(bound {REVOCATION_BOUND:.0f} s)"
        )
    if world.mp:
        # The MyProxy endpoint watches the CA directory on its own clock: it must refuse
        # within the same bound, counted from the CRL update (not from REST's refusal).
        client, path = _myproxy(world, bob)
        a.outcome.tried += 1
        try:
            refused: str | None = None
            while refused is None:
                try:
                    client.info("bob")
                except MyProxyRefused as exc:
                    refused = str(exc)
                    break
                if time.monotonic() - start > REVOCATION_BOUND:
                    break
                time.sleep(0.1)
            if refused is None:
                a.outcome.fail(
                    f"ACCEPTED MyProxy INFO as revoked bob {REVOCATION_BOUND:.0f} s "
                    "after the CRL update"
                )
            elif "revoked" not in refused:
                a.outcome.fail(f"MyProxy refused revoked bob for another reason: {refused}")
            else:
                a.outcome.note(
                    f"refused MyProxy INFO as revoked bob "
                    f"{time.monotonic() - start:.1f} s after the CRL update: revoked"
                )
        finally:
            shutil.rmtree(path.parent, ignore_errors=True)
        _myproxy_works(
            a, world, "MyProxy INFO as alice", world.pki.load("alice"), lambda c: c.info("alice")
        )


# --------------------------------------------------------------------------- the list


def attacks(
    pki: GridPki, base: Path, *, myproxy: bool
) -> Iterator[tuple[str, Callable[[Outcome], None]]]:
    state: dict[str, _World] = {}

    def world() -> _World:
        if "world" not in state:
            root = base / "identity"
            ca_dir = root / "certificates"
            shutil.copytree(pki.ca_dir, ca_dir)
            now = datetime.now(UTC)
            rogue = make_ca(now=now, dn=ROGUE_CA, days=2, key=generate_key("ec"))
            for fname, data in ca_files(rogue.cert, ("/DC=org/DC=rogue/*",)).items():
                (ca_dir / fname).write_bytes(data)
                (ca_dir / fname).chmod(0o644)
            own = dataclasses.replace(pki, ca_dir=ca_dir)
            b, mp = launch(own, root / "broker", myproxy=myproxy, workers=2)
            work = root / "creds"
            work.mkdir(mode=0o700)
            alice = b.client("alice")
            alice.delegate(alice.identity.load(), username="alice", now=now)
            state["world"] = _World(own, b, _Tls(b, work), mp, rogue)
        return state["world"]

    def wrap(fn: Callable[[_World, _Attack], None]) -> Callable[[Outcome], None]:
        def body(outcome: Outcome) -> None:
            fn(world(), _Attack(outcome))

        return body

    yield "identity: second CA outside its namespace", wrap(_second_ca)
    yield "identity: '/' inside a DN value", wrap(_slash_dn)
    yield "identity: independent proxy as its issuer", wrap(_independent)
    yield "identity: banned owner's credential", wrap(_banned_owner)
    yield "identity: revocation lag on REST", wrap(_revocation)

    def finish(outcome: Outcome) -> None:
        if "world" in state:
            b = state["world"].broker
            b.stop()
            log = b.log.read_text(errors="replace")
            if "unexpected error" in log:
                outcome.fail("the identity broker logged an unexpected error (a 500 path)")
        outcome.tried += 1

    yield "identity: server clean shutdown", finish
