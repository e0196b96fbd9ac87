"""Reading a broker's store from outside: integrity of every row, audit counts, keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import text

from broker.errors import BrokerError
from broker.pki.loading import load_certificates, load_private_key, public_keys_equal
from broker.store import Store, load_master_keys


@dataclass
class Integrity:
    credentials: int = 0
    pending: int = 0
    bad: list[str] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)  # decrypted PEMs, for the secrets scan
    present: set[tuple[str, str]] = field(default_factory=set)


def open_store(state_dir: Path, database_url: str) -> Store:
    return Store(database_url, load_master_keys(state_dir / "master.key"))


def check_rows(store: Store, *, keep_keys: int = 0) -> Integrity:
    """Every credential decrypts with the master key and its chain belongs to its key."""
    out = Integrity()
    for record in store.list_credentials():
        out.credentials += 1
        out.present.add((record.username, record.name))
        where = f"{record.username}/{record.name}"
        try:
            pem = store.decrypt_private_key(record)
            key = load_private_key(pem)
            chain = load_certificates(record.certificate_chain.encode())
        except BrokerError as exc:
            out.bad.append(f"{where}: {exc.reason}: {exc.message}")
            continue
        if not public_keys_equal(key, chain[0]):
            out.bad.append(f"{where}: the stored chain does not belong to the stored key")
        if len(out.keys) < keep_keys:
            out.keys.append(pem)
    return out


def pending_rows(store: Store) -> list[tuple[str, datetime | str]]:
    with store.engine.connect() as conn:
        rows = conn.execute(text("SELECT id, expires_at FROM pending_delegations")).all()
    return [(str(r[0]), r[1]) for r in rows]


def check_pending(store: Store, now: datetime, ttl: timedelta) -> list[str]:
    """Pending rows left by crashes expire: none outlives the TTL, a purge past it empties."""
    problems: list[str] = []
    rows = pending_rows(store)
    for pending_id, expires in rows:
        # SQLite hands the raw column back as text, PostgreSQL as a datetime
        moment = datetime.fromisoformat(expires) if isinstance(expires, str) else expires
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=now.tzinfo)
        if moment > now + ttl + timedelta(seconds=5):
            problems.append(f"pending {pending_id} expires too late ({moment.isoformat()})")
    removed = store.purge_expired_pending(now + ttl + timedelta(minutes=1))
    if removed != len(rows) or pending_rows(store):
        problems.append(f"purge past the TTL removed {removed} of {len(rows)} pending rows")
    return problems


def audit_count(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM audit_events")).scalar_one())
