"""Trust and identity in the service (issue 18): independent proxies, reloaded trust stores,
bans on owners; and :class:`broker.trustdir.ReloadingTrustStore` on a real directory."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from broker.delegation import DelegationOptions
from broker.errors import (
    AuthenticationError,
    AuthorizationError,
    ChainError,
    CredentialError,
    NotFound,
)
from broker.pki.devca import ca_files, issue_certificate, make_ca, make_crl, subject_hash
from broker.pki.dn import slash_from_name
from broker.pki.loading import chain_to_pem, key_to_pem
from broker.pki.proxy import ProxyType, generate_key, load_csr, make_csr, new_proxy, sign_request
from broker.pki.trust import TrustStore
from broker.policy import Action, AuthMethod, Request, evaluate, load_policy
from broker.service import BrokerService, Requester
from broker.store import CredentialWrite, MasterKeyRing, Store, default_sqlite_url, migrate
from broker.trustdir import CaDirWatch, ReloadingTrustStore, load_ca_dir
from tests.brokerserver import DEV_POLICY
from tests.pkifixtures import GridPki

ALICE = "/DC=org/DC=example/CN=Alice"
REPO = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def trust_box(grid_pki: GridPki) -> dict[str, TrustStore]:
    return {"trust": grid_pki.trust}


@pytest.fixture
def service(
    grid_pki: GridPki, tmp_path: Path, trust_box: dict[str, TrustStore]
) -> Iterator[BrokerService]:
    url = default_sqlite_url(tmp_path)
    migrate(url)
    clock = Clock(grid_pki.now + timedelta(minutes=1))
    with Store(url, MasterKeyRing.generate(now=datetime.now(UTC))) as store:
        yield BrokerService(
            store,
            lambda: trust_box["trust"],
            lambda: load_policy({"p.toml": DEV_POLICY}),
            clock=clock,
        )


def _csr() -> bytes:
    from broker.pki.proxy import csr_to_pem

    return csr_to_pem(make_csr(generate_key("ec")))


def _delegate(
    service: BrokerService, requester: Requester, issuer_chain: object, issuer: object
) -> None:
    pending = service.start_delegation(requester, DelegationOptions(username="alice"))
    chain = sign_request(
        issuer,  # type: ignore[arg-type]
        load_csr(pending.csr_pem),
        now=service.now(),
        lifetime=timedelta(hours=12),
    )
    service.finish_delegation(requester, pending.id, chain_to_pem(chain), passphrase=None)


# ----------------------------------------------------------------- independent proxies


def test_independent_proxy_is_not_alice_anywhere(service: BrokerService, grid_pki: GridPki) -> None:
    alice_cred = grid_pki.user("alice")
    alice = service.authenticate_chain(list(alice_cred.chain))
    _delegate(service, alice, alice_cred.chain, alice_cred)
    indep = new_proxy(
        alice_cred, now=grid_pki.now, lifetime=timedelta(hours=2), proxy_type=ProxyType.INDEPENDENT
    )
    # TLS authentication: the identity is the proxy's own subject.
    who = service.authenticate_chain(list(indep.chain))
    assert who.dn == slash_from_name(indep.cert.subject) != ALICE
    # It sees and destroys nothing of Alice's.
    assert service.info(who) == []
    with pytest.raises((NotFound, AuthorizationError)):
        service.destroy(who, username="alice", name="default")
    assert service.info(alice)  # still there
    # Delegating a chain through an independent proxy, as Alice, is refused.
    pending = service.start_delegation(alice, DelegationOptions(username="alice", name="ind"))
    chain = sign_request(
        indep, load_csr(pending.csr_pem), now=service.now(), lifetime=timedelta(hours=1)
    )
    with pytest.raises(ChainError) as refused:
        service.finish_delegation(alice, pending.id, chain_to_pem(chain), passphrase=None)
    assert refused.value.reason == "independent_proxy"


def test_stored_chain_with_independent_proxy_is_not_served(
    service: BrokerService, grid_pki: GridPki
) -> None:
    """A record written before delegation refused them (or behind the broker's back)."""
    alice_cred = grid_pki.user("alice")
    indep = new_proxy(
        alice_cred, now=grid_pki.now, lifetime=timedelta(hours=6), proxy_type=ProxyType.INDEPENDENT
    )
    now = service.now()
    assert indep.key is not None
    service.store.put_credential(
        CredentialWrite(
            owner_dn=ALICE,
            username="alice",
            name="default",
            private_key_pem=key_to_pem(indep.key),
            certificate_chain=chain_to_pem(indep.chain).decode(),
            description=None,
            retrievers=(),
            trusted_retrievers=(),
            renewers=(),
            max_lifetime_seconds=3600,
            limited=False,
            passphrase=None,
            consume_pending=None,
            not_after=now + timedelta(hours=5),
        ),
        now=now,
        audit=None,
    )
    pilot = service.authenticate_chain(list(grid_pki.user("pilot").chain))
    with pytest.raises(CredentialError) as err:
        service.retrieve(pilot, csr_pem=_csr(), username="alice")
    assert err.value.reason == "independent_proxy"


def test_stored_chain_outside_its_ca_namespace_is_not_served(
    service: BrokerService, grid_pki: GridPki, trust_box: dict[str, TrustStore]
) -> None:
    """Retrieval re-verifies the stored chain: a second CA's "Alice" stored before the
    namespace rule (or written behind the broker's back) is not handed out."""
    rogue = make_ca(now=grid_pki.now, dn="/DC=org/DC=rogue/CN=Rogue CA")
    files = {**grid_pki.pki.ca_directory(), **ca_files(rogue.cert, ("/DC=org/DC=rogue/*",))}
    trust_box["trust"] = TrustStore.from_files(files)
    fake = new_proxy(
        issue_certificate(rogue, ALICE, now=grid_pki.now),
        now=grid_pki.now,
        lifetime=timedelta(hours=6),
    )
    now = service.now()
    assert fake.key is not None
    service.store.put_credential(
        CredentialWrite(
            owner_dn=ALICE,
            username="alice",
            name="default",
            private_key_pem=key_to_pem(fake.key),
            certificate_chain=chain_to_pem(fake.chain).decode(),
            description=None,
            retrievers=(),
            trusted_retrievers=(),
            renewers=(),
            max_lifetime_seconds=3600,
            limited=False,
            passphrase=None,
            consume_pending=None,
            not_after=now + timedelta(hours=5),
        ),
        now=now,
        audit=None,
    )
    pilot = service.authenticate_chain(list(grid_pki.user("pilot").chain))
    with pytest.raises(CredentialError) as err:
        service.retrieve(pilot, csr_pem=_csr(), username="alice")
    assert err.value.reason == "namespace" and "Rogue CA" in err.value.message


# ----------------------------------------------------------------- revocation


def test_cached_verdict_dropped_when_the_trust_store_changes(
    service: BrokerService, grid_pki: GridPki, trust_box: dict[str, TrustStore]
) -> None:
    """The REST lag: a chain verdict was cached for 60 s whatever the CA directory did."""
    bob = grid_pki.user("bob")
    proxy = new_proxy(bob, now=grid_pki.now, lifetime=timedelta(hours=1))
    assert service.authenticate_chain(list(proxy.chain)).dn == "/DC=org/DC=example/CN=Bob"
    crl = make_crl(grid_pki.pki.ca, now=grid_pki.now, revoked_serials=[bob.cert.serial_number])
    trust_box["trust"] = dataclasses.replace(grid_pki.trust, crls=(crl,))
    with pytest.raises(AuthenticationError) as err:  # same chain, same second: not cached
        service.authenticate_chain(list(proxy.chain))
    assert err.value.reason == "revoked"


def _copy_ca_dir(grid_pki: GridPki, tmp_path: Path) -> Path:
    target = tmp_path / "certificates"
    shutil.copytree(grid_pki.ca_dir, target)
    return target


def _write_crl(ca_dir: Path, grid_pki: GridPki, serials: list[int]) -> None:
    crl = make_crl(grid_pki.pki.ca, now=grid_pki.now, revoked_serials=serials)
    name = f"{subject_hash(grid_pki.pki.ca.cert)}.r0"
    tmp = ca_dir / f".{name}.new"
    tmp.write_bytes(crl.public_bytes(Encoding.PEM))
    os.replace(tmp, ca_dir / name)  # as fetch-crl does


def test_reloading_trust_store_sees_a_new_crl_within_its_interval(
    grid_pki: GridPki, tmp_path: Path
) -> None:
    ca_dir = _copy_ca_dir(grid_pki, tmp_path)
    reloading = ReloadingTrustStore(ca_dir, interval=0.5)
    first = reloading()
    assert reloading() is first  # unchanged directory: the same object
    _write_crl(ca_dir, grid_pki, [grid_pki.user("bob").cert.serial_number])
    deadline = time.monotonic() + 3.0
    while reloading() is first and time.monotonic() < deadline:
        time.sleep(0.1)
    store = reloading()
    assert store is not first
    assert any(
        c.get_revoked_certificate_by_serial_number(grid_pki.user("bob").cert.serial_number)
        for c in store.crls
    )


def test_default_reload_interval_is_short(grid_pki: GridPki, tmp_path: Path) -> None:
    from broker.trustdir import RELOAD_INTERVAL

    assert RELOAD_INTERVAL <= 5.0
    assert ReloadingTrustStore(_copy_ca_dir(grid_pki, tmp_path)).interval == RELOAD_INTERVAL


def test_ca_dir_watch_counts_changes(grid_pki: GridPki, tmp_path: Path) -> None:
    ca_dir = _copy_ca_dir(grid_pki, tmp_path)
    ticks = [0.0]
    watch = CaDirWatch(ca_dir, interval=1.0, clock=lambda: ticks[0])
    assert watch.version() == 0
    _write_crl(ca_dir, grid_pki, [])
    assert watch.version() == 0  # not looked yet
    ticks[0] = 1.5
    assert watch.version() == 1
    ticks[0] = 3.0
    assert watch.version() == 1


def test_ca_without_namespace_switch(
    grid_pki: GridPki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca_dir = _copy_ca_dir(grid_pki, tmp_path)
    for path in ca_dir.iterdir():
        if path.name.endswith((".signing_policy", ".namespaces")):
            path.unlink()
    alice = grid_pki.user("alice")
    from broker.pki.chain import validate_chain

    monkeypatch.delenv("BROKER_ACCEPT_CA_WITHOUT_NAMESPACE", raising=False)
    with pytest.raises(ChainError) as err:
        validate_chain(alice.chain, load_ca_dir(ca_dir), now=grid_pki.now)
    assert err.value.reason == "namespace"
    assert "has no namespace" in err.value.message
    assert "BROKER_ACCEPT_CA_WITHOUT_NAMESPACE" in err.value.message
    monkeypatch.setenv("BROKER_ACCEPT_CA_WITHOUT_NAMESPACE", "1")
    validate_chain(alice.chain, load_ca_dir(ca_dir), now=grid_pki.now)
    monkeypatch.setenv("BROKER_ACCEPT_CA_WITHOUT_NAMESPACE", "perhaps")
    from broker.errors import ConfigError

    with pytest.raises(ConfigError):
        load_ca_dir(ca_dir)


# ----------------------------------------------------------------- bans


def test_shipped_ban_covers_owners() -> None:
    """The finding: the example ban matched requesters only, so a pilot still got the banned
    user's stored credential."""
    files = sorted((REPO / "policies").glob("*.toml"))
    policy = load_policy({p.name: p.read_text() for p in files})
    banned = "/DC=org/DC=example/OU=People/CN=Mallory"
    pilot = "/DC=org/DC=example/OU=Robots/CN=pilot3"
    ok = Request(
        action=Action.RETRIEVE,
        requester_dn=pilot,
        owner_dn="/DC=org/DC=example/OU=People/CN=Bob",
        owner_fqans=("/atlas",),
        job_id="42.0",
    )
    assert evaluate(policy, ok).allowed  # the pilot rule itself works
    for action in (Action.RETRIEVE, Action.RENEW):
        req = Request(
            action=action,
            requester_dn=pilot,
            owner_dn=banned,
            owner_fqans=("/atlas",),
            job_id="42.0",
        )
        assert not evaluate(policy, req).allowed
    for auth, username in ((AuthMethod.PASSPHRASE, None), (AuthMethod.PAM, "mallory")):
        req = Request(
            action=Action.RETRIEVE, requester_dn=None, owner_dn=banned, auth=auth, username=username
        )
        assert not evaluate(policy, req).allowed
        assert evaluate(
            policy,
            Request(
                action=Action.RETRIEVE,
                requester_dn=None,
                owner_dn="/DC=org/DC=example/OU=People/CN=Bob",
                auth=auth,
                username=username,
            ),
        ).allowed
