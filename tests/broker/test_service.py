"""The service layer in-process, with an injected clock (no TLS, real store and policy)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.audit import AuditAction
from broker.delegation import DelegationOptions
from broker.devpki import OWNERS_RULE, policy_rule
from broker.errors import (
    AuthenticationError,
    AuthorizationError,
    Conflict,
    InputError,
    NotFound,
    TooManyAttempts,
)
from broker.pki.loading import Credential, chain_to_pem
from broker.pki.proxy import (
    ProxyType,
    csr_to_pem,
    generate_key,
    load_csr,
    make_csr,
    new_proxy,
    sign_request,
)
from broker.policy import load_policy
from broker.service import (
    BrokerService,
    Requester,
    ServiceConfig,
    dn_username,
    sign_challenge,
)
from broker.store import MasterKeyRing, Store, default_sqlite_url, migrate
from tests.brokerserver import DEV_POLICY
from tests.pkifixtures import GridPki

ALICE = "/DC=org/DC=example/CN=Alice"


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock(grid_pki: GridPki) -> Clock:
    return Clock(grid_pki.now + timedelta(minutes=1))


@pytest.fixture
def service(grid_pki: GridPki, tmp_path: Path, clock: Clock) -> Iterator[BrokerService]:
    url = default_sqlite_url(tmp_path)
    migrate(url)
    with Store(url, MasterKeyRing.generate(now=datetime.now(UTC))) as store:
        yield BrokerService(
            store, grid_pki.trust, lambda: load_policy({"p.toml": DEV_POLICY}), clock=clock
        )


def who(service: BrokerService, grid_pki: GridPki, name: str) -> Requester:
    return service.authenticate_chain(list(grid_pki.user(name).chain))


def delegate(service: BrokerService, grid_pki: GridPki, **options: object) -> None:
    alice = who(service, grid_pki, "alice")
    opts = DelegationOptions(username="alice", **options)  # type: ignore[arg-type]
    pending = service.start_delegation(alice, opts)
    chain = sign_request(
        grid_pki.user("alice"),
        load_csr(pending.csr_pem),
        now=service.now(),
        lifetime=opts.stored_lifetime,
    )
    service.finish_delegation(alice, pending.id, chain_to_pem(chain), passphrase=opts.passphrase)


def csr() -> bytes:
    return csr_to_pem(make_csr(generate_key("ec")))


def test_pending_delegation_expires(
    service: BrokerService, grid_pki: GridPki, clock: Clock
) -> None:
    alice = who(service, grid_pki, "alice")
    pending = service.start_delegation(alice, DelegationOptions(username="alice"))
    clock.now += timedelta(minutes=11)
    chain = sign_request(
        grid_pki.user("alice"),
        load_csr(pending.csr_pem),
        now=clock.now,
        lifetime=timedelta(hours=2),
    )
    with pytest.raises(NotFound) as err:
        service.finish_delegation(alice, pending.id, chain_to_pem(chain))
    assert err.value.reason == "expired"


def test_lifetime_is_the_minimum_of_all_caps(
    service: BrokerService, grid_pki: GridPki, clock: Clock
) -> None:
    delegate(
        service, grid_pki, stored_lifetime=timedelta(hours=5), max_proxy_lifetime=timedelta(hours=4)
    )
    pilot = who(service, grid_pki, "pilot")
    issued = service.retrieve(pilot, csr_pem=csr(), username="alice", lifetime=timedelta(hours=3))
    assert issued.lifetime == timedelta(hours=3)  # requested
    issued = service.retrieve(pilot, csr_pem=csr(), username="alice", lifetime=timedelta(hours=48))
    assert issued.lifetime == timedelta(hours=4)  # owner's -t
    clock.now += timedelta(hours=4, minutes=30)
    issued = service.retrieve(pilot, csr_pem=csr(), username="alice", lifetime=timedelta(hours=48))
    assert timedelta(minutes=29) < issued.lifetime <= timedelta(minutes=31)  # chain's life
    clock.now += timedelta(hours=1)
    from broker.errors import CredentialError

    with pytest.raises(CredentialError) as err:
        service.retrieve(pilot, csr_pem=csr(), username="alice")
    assert err.value.reason == "expired"


def test_owner_policy_narrows_site_policy(service: BrokerService, grid_pki: GridPki) -> None:
    delegate(service, grid_pki, trusted_retrievers=("/DC=org/DC=example/CN=pilot2",))
    # A party with no right is told what it would be told for a missing credential; the
    # audit trail keeps the real reason.
    with pytest.raises(NotFound):
        service.retrieve(who(service, grid_pki, "pilot"), csr_pem=csr(), username="alice")
    assert service.store.query_audit(username="alice", action="retrieve")[0].reason.startswith(
        "owner_policy:"
    )
    service.retrieve(who(service, grid_pki, "pilot2"), csr_pem=csr(), username="alice")
    # the owner list cannot widen: bob is not a pilot, the site does not let him retrieve
    delegate(service, grid_pki, name="wide", trusted_retrievers=("/DC=org/DC=example/CN=Bob",))
    with pytest.raises(NotFound):
        service.retrieve(
            who(service, grid_pki, "bob"), csr_pem=csr(), username="alice", name="wide"
        )


def test_wrong_passphrases_are_throttled_per_credential_and_address(
    service: BrokerService, grid_pki: GridPki, clock: Clock
) -> None:
    delegate(service, grid_pki, name="pp", passphrase="sesame-123")
    guesser = Requester(dn=None, endpoint="myproxy", client_address="192.0.2.7")
    for attempt in range(service.config.passphrase_failures):
        with pytest.raises(AuthenticationError) as err:
            service.retrieve(
                guesser, csr_pem=csr(), username="alice", name="pp", passphrase=f"guess-{attempt}"
            )
        assert err.value.reason == "invalid_passphrase"
        clock.now += timedelta(seconds=30)
    # Now even the right passphrase is not tried from that address ...
    with pytest.raises(TooManyAttempts) as throttled:
        service.retrieve(
            guesser, csr_pem=csr(), username="alice", name="pp", passphrase="sesame-123"
        )
    assert throttled.value.http_status == 429
    assert "5 wrong passphrases for alice/pp from 192.0.2.7" in throttled.value.message
    # ... while the owner elsewhere, and other credentials, are unaffected.
    elsewhere = Requester(dn=None, endpoint="myproxy", client_address="198.51.100.1")
    service.retrieve(elsewhere, csr_pem=csr(), username="alice", name="pp", passphrase="sesame-123")
    delegate(service, grid_pki, name="other", passphrase="other-pass-1")
    service.retrieve(
        guesser, csr_pem=csr(), username="alice", name="other", passphrase="other-pass-1"
    )
    # The refusal is audited with its own reason (it does not count as a failure).
    rows = service.store.query_audit(username="alice", action="retrieve")
    assert any(
        r.reason
        and r.reason.startswith("too_many_attempts:")
        and r.decision == "deny"
        and r.client_address == "192.0.2.7"
        for r in rows
    )
    # Once the oldest failure is older than the window, passphrases are tried again.
    clock.now += service.config.passphrase_failure_window - timedelta(seconds=60)
    issued = service.retrieve(
        guesser, csr_pem=csr(), username="alice", name="pp", passphrase="sesame-123"
    )
    assert issued.owner_dn == ALICE


def test_passphrase_throttle_covers_change_passphrase(
    service: BrokerService, grid_pki: GridPki
) -> None:
    delegate(service, grid_pki, name="cp", passphrase="sesame-123")
    alice = who(service, grid_pki, "alice")
    for attempt in range(service.config.passphrase_failures):
        with pytest.raises(AuthenticationError):
            service.change_passphrase(
                alice, username="alice", name="cp", old=f"guess-{attempt}", new="new-pass-123"
            )
    with pytest.raises(TooManyAttempts):
        service.change_passphrase(
            alice, username="alice", name="cp", old="sesame-123", new="new-pass-123"
        )


def test_passphrase_protected_credential(service: BrokerService, grid_pki: GridPki) -> None:
    delegate(service, grid_pki, name="pp", passphrase="sesame-123")
    anonymous = Requester(dn=None, endpoint="myproxy")
    with pytest.raises(AuthenticationError):
        service.retrieve(
            anonymous, csr_pem=csr(), username="alice", name="pp", passphrase="wrong-pass"
        )
    issued = service.retrieve(
        anonymous, csr_pem=csr(), username="alice", name="pp", passphrase="sesame-123"
    )
    assert issued.owner_dn == ALICE
    with pytest.raises(AuthenticationError) as err:
        service.retrieve(
            who(service, grid_pki, "pilot"), csr_pem=csr(), username="alice", name="pp"
        )
    assert err.value.reason == "passphrase_required"


def test_every_outcome_is_audited(service: BrokerService, grid_pki: GridPki) -> None:
    delegate(service, grid_pki)
    service.retrieve(who(service, grid_pki, "pilot"), csr_pem=csr(), username="alice", job_id="7.0")
    with pytest.raises(NotFound):
        service.retrieve(
            who(service, grid_pki, "bob"), csr_pem=csr(), username="alice", job_id="7.1"
        )
    rows = service.store.query_audit(owner_dn=ALICE)
    summary = [(r.action, r.decision, r.job_id) for r in rows]
    assert ("retrieve", "allow", "7.0") in summary
    assert ("retrieve", "deny", "7.1") in summary
    assert ("delegate", "allow", None) in summary
    denied = next(r for r in rows if r.job_id == "7.1")
    assert denied.requester_dn == "/DC=org/DC=example/CN=Bob"
    assert denied.reason and "no rule lets" in denied.reason


def test_an_edge_scope_writes_each_refusal_once(service: BrokerService, grid_pki: GridPki) -> None:
    """An edge running a use case under its own scope (as the MyProxy session does)
    gets one row per refusal: the innermost scope's, never a second from the outer."""
    delegate(service, grid_pki)
    bob = who(service, grid_pki, "bob")
    where = {"username": "alice", "name": "default", "job_id": "8.0"}
    with pytest.raises(NotFound), service.audited(bob, AuditAction.MYPROXY, where):
        service.retrieve(bob, csr_pem=csr(), username="alice", job_id="8.0")
    rows = service.store.query_audit(job_id="8.0")
    assert [(r.action, r.decision) for r in rows] == [("retrieve", "deny")]

    # A refusal the edge decides itself is written by its scope, with the scope's
    # action as the edge narrowed it, and its real reason behind a public answer.
    where = {"username": "alice", "job_id": "8.1"}
    with pytest.raises(InputError) as public:
        with service.audited(bob, AuditAction.MYPROXY, where) as scope:
            scope.action = AuditAction.INFO
            scope.refuse(
                AuthorizationError("the real reason", reason="edge_rule"),
                public=InputError("what the client may read"),
            )
    assert public.value.message == "what the client may read" and public.value.audited
    rows = service.store.query_audit(job_id="8.1")
    assert [(r.action, r.decision, r.reason) for r in rows] == [
        ("info", "deny", "edge_rule: the real reason")
    ]


def test_a_claimed_identity_is_worked_out_only_for_a_refusal(service: BrokerService) -> None:
    """Edges pass a login's claimant as a function: every request authenticates, only a
    refused one needs the claimed identity for its row."""
    calls: list[int] = []

    def claimant() -> Requester:
        calls.append(1)
        return Requester.unverified(client_address="192.0.2.7", request_id="probe")

    with service.audited(claimant, AuditAction.AUTHENTICATE, unauthenticated=True):
        pass
    assert calls == []
    with (
        pytest.raises(AuthenticationError),
        service.audited(claimant, AuditAction.AUTHENTICATE, unauthenticated=True),
    ):
        raise AuthenticationError("the probe is refused", reason="probe_refused")
    assert calls == [1]
    rows = service.store.query_audit(action="authenticate")
    assert [(r.decision, r.reason, r.client_address) for r in rows] == [
        ("deny", "probe_refused: the probe is refused", "192.0.2.7")
    ]


def test_an_allow_row_is_written_only_when_the_use_case_completes(
    service: BrokerService, grid_pki: GridPki
) -> None:
    alice = who(service, grid_pki, "alice")
    with service.audited(alice, AuditAction.ADMIN_LOGIN, {"job_id": "9.0"}) as scope:
        scope.allow("signed in")
    with pytest.raises(Conflict), service.audited(alice, AuditAction.ADMIN_LOGIN) as scope:
        scope.allow("never written", job_id="9.1")
        raise Conflict("the use case failed after asking for its allow row")
    rows = [
        (r.decision, r.reason, r.job_id) for r in service.store.query_audit(action="admin-login")
    ]
    assert ("allow", "signed in", "9.0") in rows
    assert not any(r[1] == "never written" for r in rows)
    assert ("error", "conflict: the use case failed after asking for its allow row", None) in rows


def test_owner_stored_lifetime_ends_the_credential(
    service: BrokerService, grid_pki: GridPki, clock: Clock
) -> None:
    alice = who(service, grid_pki, "alice")
    pending = service.start_delegation(
        alice, DelegationOptions(username="alice", stored_lifetime=timedelta(hours=1))
    )
    # the chain itself lives 100 hours; the owner asked the broker to keep it for one
    chain = sign_request(
        grid_pki.user("alice"),
        load_csr(pending.csr_pem),
        now=clock.now,
        lifetime=timedelta(hours=100),
    )
    service.finish_delegation(alice, pending.id, chain_to_pem(chain))
    clock.now += timedelta(hours=2)
    from broker.errors import CredentialError

    with pytest.raises(CredentialError) as err:
        service.retrieve(who(service, grid_pki, "pilot"), csr_pem=csr(), username="alice")
    assert err.value.reason == "expired"


def test_revoked_owner_cannot_be_retrieved_once_the_crl_arrives(
    grid_pki: GridPki, tmp_path: Path, clock: Clock
) -> None:
    from broker.errors import CredentialError
    from broker.pki.devca import make_crl

    url = default_sqlite_url(tmp_path)
    migrate(url)
    current = {"trust": grid_pki.trust}
    with Store(url, MasterKeyRing.generate(now=datetime.now(UTC))) as store:
        svc = BrokerService(
            store,
            lambda: current["trust"],
            lambda: load_policy({"p.toml": DEV_POLICY}),
            clock=clock,
        )
        delegate(svc, grid_pki)
        svc.retrieve(who(svc, grid_pki, "pilot"), csr_pem=csr(), username="alice")
        crl = make_crl(
            grid_pki.pki.ca,
            now=clock.now,
            revoked_serials=[grid_pki.user("alice").cert.serial_number],
        )
        current["trust"] = dataclasses.replace(grid_pki.trust, crls=(crl,))
        clock.now += timedelta(minutes=2)  # past the one-minute cache of the stored chain
        with pytest.raises(CredentialError) as err:
            svc.retrieve(who(svc, grid_pki, "pilot"), csr_pem=csr(), username="alice")
        assert err.value.reason == "revoked"


def test_limited_proxies_cannot_manage_credentials(
    service: BrokerService, grid_pki: GridPki
) -> None:
    from broker.pki.proxy import ProxyType, new_proxy

    delegate(service, grid_pki)
    limited = new_proxy(
        grid_pki.user("alice"),
        now=service.now(),
        lifetime=timedelta(hours=1),
        proxy_type=ProxyType.LIMITED,
    )
    requester = service.authenticate_chain(list(limited.chain))
    with pytest.raises(AuthorizationError) as err:
        service.destroy(requester, username="alice")
    assert err.value.reason == "limited_requester"
    service.destroy(who(service, grid_pki, "alice"), username="alice")


# --------------------------------------------------------------------------- issue 18/19


def _service(
    store: Store, grid_pki: GridPki, clock: Clock, policy: str = DEV_POLICY, **config: object
) -> BrokerService:
    return BrokerService(
        store,
        grid_pki.trust,
        lambda: load_policy({"p.toml": policy}),
        clock=clock,
        config=ServiceConfig(**config),  # type: ignore[arg-type]
    )


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[Store]:
    url = default_sqlite_url(tmp_path / "db")
    migrate(url)
    with Store(url, MasterKeyRing.generate(now=datetime.now(UTC))) as s:
        yield s


def test_limited_proxy_cannot_start_a_delegation(service: BrokerService, grid_pki: GridPki) -> None:
    limited = new_proxy(
        grid_pki.user("alice"),
        now=service.now(),
        lifetime=timedelta(hours=1),
        proxy_type=ProxyType.LIMITED,
    )
    requester = service.authenticate_chain(list(limited.chain))
    with pytest.raises(AuthorizationError) as err:
        service.start_delegation(requester, DelegationOptions(username="alice"))
    assert err.value.reason == "limited_requester"
    assert requester.dn is not None
    assert service.store.count_pending(requester.dn, now=service.now()) == 0


def test_pending_delegations_are_capped_per_user_and_purged(
    store: Store, grid_pki: GridPki, clock: Clock
) -> None:
    svc = _service(store, grid_pki, clock, max_pending_per_user=3)
    alice = who(svc, grid_pki, "alice")
    for i in range(3):
        svc.start_delegation(alice, DelegationOptions(username="alice", name=f"n{i}"))
    with pytest.raises(TooManyAttempts) as err:
        svc.start_delegation(alice, DelegationOptions(username="alice", name="n3"))
    assert err.value.reason == "too_many_pending" and err.value.http_status == 429
    # another user is not affected
    svc.start_delegation(who(svc, grid_pki, "bob"), DelegationOptions(username="bob"))
    clock.now += timedelta(minutes=11)
    assert svc.maintain()["pending"] == 4
    assert svc.counters()["pending_purged"] == 4
    svc.start_delegation(alice, DelegationOptions(username="alice", name="again"))


def _renew(
    svc: BrokerService,
    grid_pki: GridPki,
    challenge: str | None = None,
    issuer: BrokerService | None = None,
    **kw: object,
) -> tuple[str, object]:
    pilot = who(svc, grid_pki, "pilot")
    challenge = challenge or (issuer or svc).renewal_challenge(pilot)
    old = new_proxy(grid_pki.user("alice"), now=svc.now(), lifetime=timedelta(hours=1))
    proof = sign_challenge(old.key, challenge.encode())
    issued = svc.renew(
        pilot,
        csr_pem=csr(),
        challenge=challenge,
        authz_chain_pem=chain_to_pem(old.chain),
        signature=proof,
        username="alice",
        **kw,  # type: ignore[arg-type]
    )
    return challenge, issued


def test_renewal_challenge_is_single_use_and_shared_by_processes(
    store: Store, grid_pki: GridPki, clock: Clock
) -> None:
    # two services on one database stand for two gunicorn workers (or two nodes)
    one, two = _service(store, grid_pki, clock), _service(store, grid_pki, clock)
    delegate(one, grid_pki)
    challenge, _ = _renew(two, grid_pki, issuer=one)  # issued by one, answered at two
    pilot = who(one, grid_pki, "pilot")
    old = new_proxy(grid_pki.user("alice"), now=one.now(), lifetime=timedelta(hours=1))
    for svc in (one, two):  # the same challenge again, with a fresh valid signature
        with pytest.raises(AuthenticationError) as err:
            svc.renew(
                pilot,
                csr_pem=csr(),
                challenge=challenge,
                authz_chain_pem=chain_to_pem(old.chain),
                signature=sign_challenge(old.key, challenge.encode()),
                username="alice",
            )
        assert err.value.reason == "challenge_reused"


RETRIEVE_LIMITED_POLICY = (
    '[groups]\npilots = ["/DC=org/DC=example/CN=pilot*"]\n\n'
    + OWNERS_RULE
    + '[[rule]]\nname = "pilots retrieve limited"\naction = "retrieve"\neffect = "allow"\n'
    'requester = ["group:pilots"]\nauth = ["certificate"]\nmax_lifetime = "1h"\n'
    "limited = true\n\n" + policy_rule("renewal by pilots", "renew", ["group:pilots"])
)


def test_renewal_obeys_the_caps_of_retrieval(store: Store, grid_pki: GridPki, clock: Clock) -> None:
    svc = _service(store, grid_pki, clock, policy=RETRIEVE_LIMITED_POLICY)
    delegate(svc, grid_pki)
    retrieved = svc.retrieve(who(svc, grid_pki, "pilot"), csr_pem=csr(), username="alice")
    assert retrieved.limited and retrieved.lifetime == timedelta(hours=1)
    _, renewed = _renew(svc, grid_pki, lifetime=timedelta(hours=12))
    assert renewed.limited  # type: ignore[attr-defined]
    assert renewed.lifetime == timedelta(hours=1)  # type: ignore[attr-defined]


def test_concurrent_wrong_passphrases_never_exceed_the_limit(
    service: BrokerService, grid_pki: GridPki
) -> None:
    delegate(service, grid_pki, name="pp", passphrase="sesame-123")
    guesser = Requester(dn=None, endpoint="myproxy", client_address="192.0.2.9")
    barrier = threading.Barrier(16)

    def guess(i: int) -> str:
        barrier.wait()
        try:
            service.retrieve(
                guesser, csr_pem=csr(), username="alice", name="pp", passphrase=f"guess-{i}"
            )
        except AuthenticationError as exc:
            return exc.reason
        return "accepted"

    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(guess, range(16)))
    assert outcomes.count("invalid_passphrase") == service.config.passphrase_failures
    assert outcomes.count("too_many_attempts") == 16 - service.config.passphrase_failures


def test_username_binding_stops_squatting(store: Store, grid_pki: GridPki, clock: Clock) -> None:
    svc = _service(store, grid_pki, clock, username_binding="dn")
    assert dn_username(ALICE) == "alice"
    assert dn_username("/DC=org/CN=Alice Smith/CN=proxy") == "proxy"
    assert dn_username("/DC=org/CN=Jean-Luc O'Neil") == "jean-luc-o-neil"
    bob = who(svc, grid_pki, "bob")
    with pytest.raises(AuthorizationError) as err:
        svc.start_delegation(bob, DelegationOptions(username="alice", name="prod"))
    assert err.value.reason == "username_binding" and "'bob'" in err.value.message
    bob_cred = Credential(chain=grid_pki.user("bob").chain, key=grid_pki.user("bob").key)
    with pytest.raises(AuthorizationError):
        svc.store_credential(bob, DelegationOptions(username="alice"), bob_cred)
    assert store.count_pending("/DC=org/DC=example/CN=Bob", now=clock.now) == 0
    delegate(svc, grid_pki, name="prod")  # alice under "alice": allowed
    issued = svc.retrieve(who(svc, grid_pki, "pilot"), csr_pem=csr(), username="alice", name="prod")
    assert issued.owner_dn == ALICE
    # "none" keeps the old first-come, first-served behaviour
    loose = _service(store, grid_pki, clock, username_binding="none")
    loose.start_delegation(bob, DelegationOptions(username="alice", name="other"))


def test_refusals_do_not_reveal_credentials_to_parties_without_a_right(
    service: BrokerService, grid_pki: GridPki
) -> None:
    delegate(service, grid_pki)
    delegate(service, grid_pki, name="pp", passphrase="sesame-123")
    bob = who(service, grid_pki, "bob")
    answers = []
    for name in ("default", "pp", "absent"):
        with pytest.raises(NotFound) as err:
            service.retrieve(bob, csr_pem=csr(), username="alice", name=name)
        answers.append((err.value.reason, err.value.message.replace(repr(name), "N")))
    assert len(set(answers)) == 1, answers
    assert ALICE not in str(answers)
    # a passphrase for a credential stored without one: a wrong passphrase, nothing more
    anonymous = Requester(dn=None, endpoint="rest", client_address="192.0.2.10")
    replies = []
    for name in ("default", "pp"):
        with pytest.raises(AuthenticationError) as perr:
            service.retrieve(
                anonymous, csr_pem=csr(), username="alice", name=name, passphrase="not-it-123"
            )
        replies.append((perr.value.reason, perr.value.message))
    assert replies[0] == replies[1] == ("invalid_passphrase", "invalid credential passphrase")
    # not the owner: destroy and change-passphrase answer as for a missing credential
    with pytest.raises(NotFound) as derr:
        service.destroy(bob, username="alice")
    assert derr.value.message == "no credential 'default' for user 'alice'"
    with pytest.raises(NotFound):
        service.change_passphrase(bob, username="alice", name="pp", old="x", new="new-pass-12")
    # a passphrase over MyProxy, where the record is looked up first, gets the same answer
    with pytest.raises(NotFound) as merr:
        service.authorize_retrieval(bob, record=service.credential("alice"))
    assert merr.value.message == "no credential 'default' for user 'alice'"
    # the audit trail keeps the real reasons
    reasons = [r.reason or "" for r in service.store.query_audit(username="alice")]
    assert any(r.startswith("no_passphrase_set:") for r in reasons)


def test_unauthenticated_refusals_are_aggregated(
    store: Store, grid_pki: GridPki, clock: Clock
) -> None:
    svc = _service(store, grid_pki, clock)
    anonymous = Requester(dn=None, endpoint="myproxy", client_address="203.0.113.5")
    for _ in range(200):
        with pytest.raises(NotFound):
            svc.retrieve(anonymous, csr_pem=csr(), username="nobody-here")
    rows = store.query_audit(username="nobody-here")
    assert len(rows) == 1
    assert svc.counters()["refusals_aggregated"] == 199
    clock.now += timedelta(seconds=61)
    svc.maintain()
    rows = store.query_audit(username="nobody-here")
    assert len(rows) == 2
    assert rows[0].reason and rows[0].reason.startswith("aggregated: 199 more refusals")
    # authenticated refusals are written one by one
    bob = who(svc, grid_pki, "bob")
    for _ in range(3):
        with pytest.raises(NotFound):
            svc.retrieve(bob, csr_pem=csr(), username="nobody-here")
    assert len(store.query_audit(username="nobody-here")) == 5


def test_housekeeping_totals_are_in_the_metrics(
    store: Store, grid_pki: GridPki, clock: Clock
) -> None:
    from broker.api.app import create_app

    svc = _service(store, grid_pki, clock)
    svc.start_delegation(who(svc, grid_pki, "alice"), DelegationOptions(username="alice"))
    anonymous = Requester(dn=None, endpoint="myproxy", client_address="203.0.113.6")
    for _ in range(3):
        with pytest.raises(NotFound):
            svc.retrieve(anonymous, csr_pem=csr(), username="ghost")
    clock.now += timedelta(minutes=11)
    svc.maintain()
    text = create_app(svc).test_client().get("/metrics").get_data(as_text=True)
    assert 'broker_housekeeping_total{what="pending_purged"} 1.0' in text
    assert 'broker_housekeeping_total{what="refusals_aggregated"} 2.0' in text
    # at exit, a window still open is written with its count
    for _ in range(4):
        with pytest.raises(NotFound):
            svc.retrieve(anonymous, csr_pem=csr(), username="ghost")
    svc.flush_refusals()
    reasons = [r.reason or "" for r in store.query_audit(username="ghost")]
    assert sum(r.startswith("aggregated: 3 more") for r in reasons) == 1
