"""The Store API against a real database: SQLite and PostgreSQL (parametrised `store`)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, select

from broker.errors import (
    AuthenticationError,
    AuthorizationError,
    BrokerError,
    Conflict,
    DnSyntaxError,
    InputError,
    NotFound,
    PemError,
    StoreError,
    StoreUnavailable,
)
from broker.store import AuditEvent, CredentialWrite, Store
from broker.store.models import AuditEventRow, Credential, PendingDelegationRow
from tests.broker.store.store_support import ALICE, BOB, PILOT, T0, KeyFactory, KeyMaterial


def _put(store: Store, mat: KeyMaterial, **kw: Any) -> Any:
    args: dict[str, Any] = {
        "owner_dn": ALICE,
        "username": "alice",
        "private_key_pem": mat.key_pem,
        "certificate_chain": mat.chain_pem,
    }
    args.update(kw)
    now, audit = args.pop("now", datetime.now(UTC)), args.pop("audit", None)
    return store.put_credential(CredentialWrite(**args), now=now, audit=audit)


def _count(store: Store, model: Any) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(model)).scalar_one())


def _audit(action: str = "put", **kw: Any) -> AuditEvent:
    base: dict[str, Any] = {
        "action": action,
        "decision": "allow",
        "endpoint": "rest",
        "requester_dn": ALICE,
        "owner_dn": ALICE,
        "username": "alice",
        "credential_name": "default",
    }
    base.update(kw)
    return AuditEvent(**base)


@contextmanager
def fail_on_audit_insert(engine: Engine) -> Iterator[None]:
    """Make the database connection fail when the audit row is written.

    A real failure injected at the driver boundary, after the credential or
    pending change was already sent in the same transaction.
    """

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO AUDIT_EVENTS"):
            raise RuntimeError("injected failure while writing the audit row")

    event.listen(engine, "before_cursor_execute", before)
    try:
        yield
    finally:
        event.remove(engine, "before_cursor_execute", before)


# ---------------------------------------------------------------- credentials


def test_round_trip(store: Store, rsa_material: KeyMaterial) -> None:
    rec = _put(
        store,
        rsa_material,
        description="for CMS jobs",
        retrievers=["/DC=org/DC=example/OU=Services/*"],
        trusted_retrievers=[PILOT],
        renewers=[],
        max_lifetime_seconds=43200,
        limited=True,
        now=T0,
    )
    got = store.get_credential("alice")
    assert got == rec
    assert got.name == "default" and got.owner_dn == ALICE
    assert got.retrievers == ("/DC=org/DC=example/OU=Services/*",)
    assert got.trusted_retrievers == (PILOT,) and got.renewers == ()
    assert got.max_lifetime_seconds == 43200 and got.limited is True
    assert got.not_after == rsa_material.not_after and got.not_after.tzinfo is not None
    assert got.created_at == T0 == got.updated_at
    assert "PRIVATE KEY" not in got.certificate_chain
    assert store.decrypt_private_key(got) == rsa_material.key_pem
    assert "PRIVATE" not in repr(got) and "envelope" not in repr(got)


def test_replace_same_owner_keeps_identity(store: Store, new_key: KeyFactory) -> None:
    first, second = new_key(), new_key()
    a = _put(store, first, now=T0)
    b = _put(store, second, now=T0 + timedelta(hours=1), description="renewed")
    assert b.id == a.id and b.created_at == T0 and b.updated_at == T0 + timedelta(hours=1)
    assert store.decrypt_private_key(store.get_credential("alice")) == second.key_pem
    assert len(store.list_credentials()) == 1


def test_owner_mismatch_is_conflict(store: Store, new_key: KeyFactory) -> None:
    mine = new_key()
    _put(store, mine)
    with pytest.raises(Conflict) as err:
        _put(store, new_key("Bob"), owner_dn=BOB)
    assert err.value.reason == "owner_mismatch"
    got = store.get_credential("alice")
    assert got.owner_dn == ALICE and store.decrypt_private_key(got) == mine.key_pem


def test_concurrent_first_puts_one_owner_wins(store: Store, new_key: KeyFactory) -> None:
    mats = {ALICE: new_key(), BOB: new_key("Bob")}
    outcomes: dict[str, object] = {}
    barrier = threading.Barrier(2)

    def worker(dn: str) -> None:
        barrier.wait()
        try:
            outcomes[dn] = _put(store, mats[dn], owner_dn=dn, name="shared")
        except BrokerError as exc:
            outcomes[dn] = exc

    threads = [threading.Thread(target=worker, args=(dn,)) for dn in mats]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    errors = [o for o in outcomes.values() if isinstance(o, BrokerError)]
    assert len(outcomes) == 2 and len(errors) == 1
    assert isinstance(errors[0], Conflict) and errors[0].reason == "owner_mismatch"
    winner = store.get_credential("alice", "shared")
    assert store.decrypt_private_key(winner) == mats[winner.owner_dn].key_pem


def test_bad_input_gets_specific_errors(store: Store, new_key: KeyFactory) -> None:
    mat, other = new_key(), new_key("Other")
    with pytest.raises(PemError) as err:
        _put(store, mat, certificate_chain=other.chain_pem)
    assert err.value.reason == "key_mismatch"
    with pytest.raises(PemError):
        _put(store, mat, certificate_chain=mat.chain_pem + mat.key_pem.decode())
    with pytest.raises(PemError):
        _put(store, mat, private_key_pem=b"-----BEGIN PRIVATE KEY-----\nAAAA\n")
    with pytest.raises(PemError):
        _put(store, mat, certificate_chain="garbage")
    with pytest.raises(DnSyntaxError):
        _put(store, mat, owner_dn="CN=Alice,DC=example")
    with pytest.raises(DnSyntaxError):
        _put(store, mat, username="")
    with pytest.raises(DnSyntaxError):
        _put(store, mat, name="bad\nname")
    with pytest.raises(InputError):
        _put(store, mat, now=datetime(2026, 1, 1))  # naive
    with pytest.raises(InputError):
        _put(store, mat, retrievers="/CN=oops-a-string")
    with pytest.raises(InputError):
        _put(store, mat, max_lifetime_seconds=0)
    with pytest.raises(InputError, match="at least 6"):
        _put(store, mat, passphrase="short")
    with pytest.raises(InputError):
        _put(store, mat, audit=_audit(decision="maybe"))
    assert store.list_credentials() == []


def test_passphrase_required_and_wrong_refused(store: Store, new_key: KeyFactory) -> None:
    mat = new_key()
    rec = _put(store, mat, passphrase="open sesame")
    assert rec.passphrase_protected
    for attempt in (None, "open sesamE", "x"):
        with pytest.raises(AuthenticationError, match=r"^invalid credential passphrase$"):
            store.decrypt_private_key(rec, attempt)
    assert store.decrypt_private_key(rec, "open sesame") == mat.key_pem

    changed = store.change_passphrase(
        "alice",
        old_passphrase="open sesame",
        new_passphrase="new secret",
        owner_dn=ALICE,
        now=datetime.now(UTC),
    )
    with pytest.raises(AuthenticationError):
        store.decrypt_private_key(changed, "open sesame")
    assert store.decrypt_private_key(store.get_credential("alice"), "new secret") == mat.key_pem

    with pytest.raises(AuthenticationError):
        store.change_passphrase(
            "alice", old_passphrase="guess!", new_passphrase="whatever", now=datetime.now(UTC)
        )
    with pytest.raises(AuthorizationError):
        store.change_passphrase(
            "alice",
            old_passphrase="new secret",
            new_passphrase="abcdefg",
            owner_dn=BOB,
            now=datetime.now(UTC),
        )
    cleared = store.change_passphrase(
        "alice", old_passphrase="new secret", new_passphrase=None, now=datetime.now(UTC)
    )
    assert not cleared.passphrase_protected
    assert store.decrypt_private_key(cleared) == mat.key_pem


def test_list_find_delete(store: Store, new_key: KeyFactory) -> None:
    _put(store, new_key())
    _put(store, new_key(), name="cms")
    _put(store, new_key("Bob"), owner_dn=BOB, username="bob")
    assert [(r.username, r.name) for r in store.list_credentials()] == [
        ("alice", "cms"),
        ("alice", "default"),
        ("bob", "default"),
    ]
    assert {r.username for r in store.find_credentials(BOB)} == {"bob"}
    assert [r.name for r in store.list_credentials(owner_dn=ALICE, username="alice")] == [
        "cms",
        "default",
    ]
    with pytest.raises(AuthorizationError):
        store.delete_credential("alice", "cms", owner_dn=BOB, now=datetime.now(UTC))
    deleted = store.delete_credential(
        "alice",
        "cms",
        owner_dn=ALICE,
        audit=_audit("destroy", credential_name="cms"),
        now=datetime.now(UTC),
    )
    assert deleted.name == "cms"
    with pytest.raises(NotFound):
        store.get_credential("alice", "cms")
    with pytest.raises(NotFound):
        store.delete_credential("alice", "cms", now=datetime.now(UTC))
    assert [e.action for e in store.query_audit(owner_dn=ALICE)] == ["destroy"]


# ---------------------------------------------------------------- pending delegations


def _pending(store: Store, mat: KeyMaterial, **kw: Any) -> Any:
    args: dict[str, Any] = {
        "requester_dn": ALICE,
        "username": "alice",
        "private_key_pem": mat.key_pem,
        "params": {"lifetime": 43200, "retrievers": [PILOT], "description": "x"},
        "now": T0,
    }
    args.update(kw)
    return store.create_pending(**args)


def test_pending_is_single_use(store: Store, new_key: KeyFactory) -> None:
    mat = new_key()
    pending = _pending(store, mat)
    assert len(pending.id) >= 22 and pending.expires_at == T0 + timedelta(minutes=10)
    assert pending.params["retrievers"] == [PILOT]
    assert store.get_pending(pending.id, ALICE, now=T0).id == pending.id

    with pytest.raises(AuthorizationError):
        store.take_pending(pending.id, BOB, now=T0)
    taken = store.take_pending(pending.id, ALICE, now=T0 + timedelta(minutes=9))
    assert store.decrypt_private_key(taken) == mat.key_pem
    with pytest.raises(NotFound):
        store.take_pending(pending.id, ALICE, now=T0)
    with pytest.raises(NotFound):
        store.take_pending("not a valid id!", ALICE, now=T0)


def test_pending_expires(store: Store, new_key: KeyFactory) -> None:
    p1 = _pending(store, new_key())
    p2 = _pending(store, new_key(), ttl=timedelta(hours=1))
    with pytest.raises(NotFound) as err:
        store.take_pending(p1.id, ALICE, now=T0 + timedelta(minutes=10))
    assert err.value.reason == "expired"
    # The expired row is gone for good, the other is still there.
    with pytest.raises(NotFound) as err:
        store.get_pending(p1.id, ALICE, now=T0)
    assert err.value.reason == "not_found"
    assert store.purge_expired_pending(T0 + timedelta(minutes=30)) == 0
    assert store.purge_expired_pending(T0 + timedelta(hours=2)) == 1
    with pytest.raises(NotFound):
        store.get_pending(p2.id, ALICE, now=T0)


def test_consume_pending_into_credential(store: Store, new_key: KeyFactory) -> None:
    mat, other = new_key(), new_key("Mallory")
    pending = _pending(store, mat)
    with pytest.raises(PemError):  # a chain for another key: nothing changes
        store.put_credential(
            CredentialWrite(
                owner_dn=ALICE,
                username="alice",
                certificate_chain=other.chain_pem,
                consume_pending=pending.id,
            ),
            now=T0,
        )
    with pytest.raises(AuthorizationError):
        store.put_credential(
            CredentialWrite(
                owner_dn=BOB,
                username="alice",
                certificate_chain=mat.chain_pem,
                consume_pending=pending.id,
            ),
            now=T0,
        )
    rec = store.put_credential(
        CredentialWrite(
            owner_dn=ALICE,
            username="alice",
            certificate_chain=mat.chain_pem,
            consume_pending=pending.id,
            passphrase="protect me",
        ),
        now=T0 + timedelta(minutes=1),
        audit=_audit("delegate"),
    )
    assert store.decrypt_private_key(rec, "protect me") == mat.key_pem
    with pytest.raises(NotFound):
        store.take_pending(pending.id, ALICE, now=T0)
    assert [e.action for e in store.query_audit(owner_dn=ALICE)] == ["delegate"]


# ---------------------------------------------------------------- audit


def test_audit_is_written_in_the_same_transaction(store: Store, new_key: KeyFactory) -> None:
    mat = new_key()
    with fail_on_audit_insert(store.engine), pytest.raises((StoreError, RuntimeError)):
        _put(store, mat, audit=_audit())
    assert _count(store, Credential) == 0 and _count(store, AuditEventRow) == 0

    pending = _pending(store, mat)
    with fail_on_audit_insert(store.engine), pytest.raises((StoreError, RuntimeError)):
        store.take_pending(pending.id, ALICE, now=T0, audit=_audit("delegate-finish"))
    # Not consumed, no audit row.
    assert store.get_pending(pending.id, ALICE, now=T0).id == pending.id
    assert _count(store, AuditEventRow) == 0

    _put(store, mat, audit=_audit())
    with fail_on_audit_insert(store.engine), pytest.raises((StoreError, RuntimeError)):
        store.delete_credential("alice", audit=_audit("destroy"), now=datetime.now(UTC))
    assert store.get_credential("alice")
    assert [e.action for e in store.query_audit()] == ["put"]
    assert _count(store, PendingDelegationRow) == 1


def test_count_audit_counts_one_credential_address_and_reason_since_a_time(store: Store) -> None:
    def failure(minute: int, **kw: Any) -> None:
        base = {
            "decision": "deny",
            "reason": "invalid_passphrase: invalid credential passphrase",
            "client_address": "192.0.2.7",
            "time": T0 + timedelta(minutes=minute),
        }
        base.update(kw)
        store.add_audit(_audit("retrieve", **base), now=datetime.now(UTC))

    for minute in range(4):
        failure(minute)
    failure(1, client_address="198.51.100.1")  # another address
    failure(2, credential_name="other")  # another credential
    failure(2, reason="invalidXpassphrase: a LIKE wildcard must not match this")
    failure(3, reason="too_many_attempts: not a failure of the passphrase")
    failure(2, client_address=None)

    def count(since_minute: int, address: str | None = "192.0.2.7") -> int:
        return store.count_audit(
            username="alice",
            credential_name="default",
            client_address=address,
            reason_prefix="invalid_passphrase:",
            since=T0 + timedelta(minutes=since_minute),
        )

    assert count(0) == 4
    assert count(2) == 2
    assert count(9) == 0
    assert count(0, "198.51.100.1") == 1
    assert count(0, None) == 1


def test_audit_query(store: Store) -> None:
    for i in range(5):
        store.add_audit(
            _audit(
                "retrieve" if i % 2 else "info",
                time=T0 + timedelta(minutes=i),
                job_id=f"42.{i}",
                requester_fqans=("/cms/Role=pilot",),
                decision="deny" if i == 4 else "allow",
                reason="policy rule 3" if i == 4 else None,
                client_address="127.0.0.1",
                request_id=f"req-{i}",
                endpoint="myproxy",
            ),
            now=datetime.now(UTC),
        )
    store.add_audit(_audit("info", owner_dn=BOB, endpoint="cli"), now=datetime.now(UTC))
    newest_first = store.query_audit(owner_dn=ALICE)
    assert [e.job_id for e in newest_first] == ["42.4", "42.3", "42.2", "42.1", "42.0"]
    assert newest_first[0].decision == "deny" and newest_first[0].reason == "policy rule 3"
    assert newest_first[0].requester_fqans == ("/cms/Role=pilot",)
    assert newest_first[0].time == T0 + timedelta(minutes=4)
    assert newest_first[0].time.tzinfo is not None
    assert [e.job_id for e in store.query_audit(job_id="42.3")] == ["42.3"]
    assert len(store.query_audit(action="retrieve")) == 2
    assert len(store.query_audit(owner_dn=ALICE, limit=2)) == 2
    assert len(store.query_audit(since=T0 + timedelta(minutes=3), owner_dn=ALICE)) == 2
    with pytest.raises(InputError):
        store.query_audit(limit=0)
    with pytest.raises(InputError):
        store.add_audit(_audit(endpoint="smtp"), now=datetime.now(UTC))


# ---------------------------------------------------------------- failures


def test_unreachable_postgres_is_store_unavailable(master_keys: Any) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql+psycopg://broker:hunter2secret@127.0.0.1:{port}/db?connect_timeout=2"
    with Store(url, master_keys) as s, pytest.raises(StoreUnavailable) as err:
        s.list_credentials()
    msg = err.value.message
    assert "not reachable" in msg and "check that PostgreSQL is running" in msg
    assert "hunter2secret" not in msg and "***" in msg
    assert err.value.http_status == 503


def test_unusable_sqlite_is_store_unavailable(tmp_path: Any, master_keys: Any) -> None:
    (tmp_path / "db.sqlite3").mkdir()  # a directory where the file should be
    with Store(f"sqlite:///{tmp_path}/db.sqlite3", master_keys) as s:
        with pytest.raises(StoreUnavailable):
            s.list_credentials()


def test_missing_schema_is_store_error(tmp_path: Any, master_keys: Any) -> None:
    with Store(f"sqlite:///{tmp_path}/empty.sqlite3", master_keys) as s:
        with pytest.raises(StoreError):
            s.get_credential("alice")


def test_times_are_utc(store: Store, new_key: KeyFactory) -> None:
    from datetime import timezone

    plus_two = timezone(timedelta(hours=2))
    rec = _put(store, new_key(), now=datetime(2026, 11, 21, 14, 0, tzinfo=plus_two))
    got = store.get_credential("alice")
    assert got.created_at == datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
    assert got.created_at.utcoffset() == timedelta(0) and rec.created_at == got.created_at


def test_not_after_can_only_shorten(store: Store, new_key: KeyFactory) -> None:
    mat = new_key(hours=12)
    early = mat.not_after - timedelta(hours=6)
    assert _put(store, mat, not_after=early).not_after == early
    later = mat.not_after + timedelta(days=30)
    assert _put(store, mat, not_after=later).not_after == mat.not_after
