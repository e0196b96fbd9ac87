"""Read-only queries behind the admin page (SQLAlchemy Core, SQLite and PostgreSQL).

Every list is paged on the server with a keyset cursor on indexed columns, so a
page costs the same at the first row as at the millionth:

* credentials: ordered by ``(owner_dn, id)`` (index ``ix_credentials_owner_dn``;
  the "expiring soon" filter uses ``ix_credentials_not_after``);
* audit rows: newest first by ``id`` (the primary key), filtered on indexed
  columns (owner, requester, job id, time) or cheap ones (action, decision);
* the activity chart: index-only counts on ``(decision, action, time)``.

Figures at 1e5 credentials and 1e6 audit rows: docs/performance.md
("Admin page queries"), from ``scripts/bench admin``.

Nothing here selects key material: the envelope columns of ``credentials``
(ciphertext, wrapped data key, salt) are never read.  Counts of the whole audit
trail are never taken (a ``COUNT(*)`` over 1e6 rows is the slow part of naive
admin pages); a page only says whether there is a next one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Engine,
    bindparam,
    cast,
    extract,
    func,
    or_,
    select,
)
from sqlalchemy.exc import SQLAlchemyError

from broker.errors import InputError
from broker.store.engine import unavailable_error
from broker.store.models import AuditEventRow, Credential
from broker.store.repository import AuditRecord, audit_record, record_from_row

MAX_PAGE_SIZE = 500
MAX_CHART_BUCKETS = 200

_CRED = Credential.__table__
_AUDIT = AuditEventRow.__table__

#: Audit actions that hand out a proxy: the chart's "retrievals".
RETRIEVAL_ACTIONS = ("retrieve", "renew")


def _utc(value: datetime) -> datetime:
    """Aware UTC, whatever the driver handed back."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@contextmanager
def _reading(engine: Engine) -> Iterator[Connection]:
    """A read connection whose driver failures become the store's errors (no traceback)."""
    try:
        with engine.connect() as conn:
            yield conn
    except SQLAlchemyError as exc:
        raise unavailable_error(engine, exc) from None


def _check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE_SIZE:
        raise InputError(f"the page size must be between 1 and {MAX_PAGE_SIZE}")
    return limit


# --------------------------------------------------------------------------- credentials


@dataclass(frozen=True)
class CredentialRow:
    """What the admin page shows of a stored credential: no key, no chain, no passphrase."""

    id: int
    owner_dn: str
    username: str
    name: str
    description: str | None
    not_after: datetime
    passphrase_protected: bool
    limited: bool
    created_at: datetime


@dataclass(frozen=True)
class CredentialCursor:
    """Where the next page of credentials starts: after this (owner, id)."""

    owner_dn: str
    id: int


@dataclass(frozen=True)
class CredentialPage:
    rows: tuple[CredentialRow, ...]
    next: CredentialCursor | None


@dataclass(frozen=True)
class CredentialCounts:
    total: int
    expiring: int  # still valid, but expiring within the window
    expired: int


# Exactly the columns a CredentialRow shows (never the envelope): one per field, by name.
_CRED_COLUMNS = tuple(_CRED.c[f.name] for f in fields(CredentialRow))


def credential_page(
    engine: Engine,
    *,
    owner_dn: str | None = None,
    expiring_before: datetime | None = None,
    after: CredentialCursor | None = None,
    limit: int = 50,
) -> CredentialPage:
    """One page of credentials ordered by owner DN, optionally of one owner only, or only
    those whose ``not_after`` is before ``expiring_before`` (expired ones included)."""
    limit = _check_limit(limit)
    stmt = select(*_CRED_COLUMNS)
    if owner_dn is not None:
        stmt = stmt.where(_CRED.c.owner_dn == owner_dn)
    if expiring_before is not None:
        stmt = stmt.where(_CRED.c.not_after < expiring_before)
    if after is not None:
        # (owner, id) > (a, b), spelt so that both planners see a range on owner_dn
        stmt = stmt.where(
            _CRED.c.owner_dn >= after.owner_dn,
            or_(_CRED.c.owner_dn > after.owner_dn, _CRED.c.id > after.id),
        )
    stmt = stmt.order_by(_CRED.c.owner_dn, _CRED.c.id).limit(limit + 1)
    with _reading(engine) as conn:
        found = conn.execute(stmt).all()
    rows = tuple(
        record_from_row(
            CredentialRow,
            r,
            id=int(r.id),
            not_after=_utc(r.not_after),
            passphrase_protected=bool(r.passphrase_protected),
            limited=bool(r.limited),
            created_at=_utc(r.created_at),
        )
        for r in found[:limit]
    )
    following = None
    if len(found) > limit:
        following = CredentialCursor(rows[-1].owner_dn, rows[-1].id)
    return CredentialPage(rows, following)


def credential_counts(engine: Engine, *, now: datetime, window: timedelta) -> CredentialCounts:
    """How many credentials there are, how many expire within ``window``, how many expired.

    The two expiry counts are range scans of ``ix_credentials_not_after``."""
    soon = now + window
    with _reading(engine) as conn:
        total = conn.execute(select(func.count()).select_from(_CRED)).scalar_one()
        expired = conn.execute(
            select(func.count()).select_from(_CRED).where(_CRED.c.not_after <= now)
        ).scalar_one()
        expiring = conn.execute(
            select(func.count())
            .select_from(_CRED)
            .where(_CRED.c.not_after > now, _CRED.c.not_after <= soon)
        ).scalar_one()
    return CredentialCounts(int(total), int(expiring), int(expired))


# --------------------------------------------------------------------------- audit


@dataclass(frozen=True)
class AuditFilter:
    """Exact-match filters (all optional) and a half-open time range ``[since, until)``."""

    owner_dn: str | None = None
    requester_dn: str | None = None
    job_id: str | None = None
    action: str | None = None
    decision: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def conditions(self) -> list[ColumnElement[bool]]:
        where: list[ColumnElement[bool]] = []
        for column, value in (
            (_AUDIT.c.owner_dn, self.owner_dn),
            (_AUDIT.c.requester_dn, self.requester_dn),
            (_AUDIT.c.job_id, self.job_id),
            (_AUDIT.c.action, self.action),
            (_AUDIT.c.decision, self.decision),
        ):
            if value is not None:
                where.append(column == value)
        if self.since is not None:
            where.append(_AUDIT.c.time >= self.since)
        if self.until is not None:
            where.append(_AUDIT.c.time < self.until)
        return where


@dataclass(frozen=True)
class AuditPage:
    rows: tuple[AuditRecord, ...]
    next_before: int | None  # the id to pass as ``before`` for the next (older) page


def audit_page(
    engine: Engine, filters: AuditFilter, *, before: int | None = None, limit: int = 50
) -> AuditPage:
    """The newest audit rows matching ``filters`` with an id below ``before``."""
    limit = _check_limit(limit)
    stmt = select(_AUDIT).where(*filters.conditions())
    if before is not None:
        stmt = stmt.where(_AUDIT.c.id < before)
    stmt = stmt.order_by(_AUDIT.c.id.desc()).limit(limit + 1)
    with _reading(engine) as conn:
        found = conn.execute(stmt).all()
    # The time column's type (UTCDateTime) already hands back aware UTC.
    rows = tuple(audit_record(r) for r in found[:limit])
    return AuditPage(rows, rows[-1].id if len(found) > limit else None)


# --------------------------------------------------------------------------- chart


@dataclass(frozen=True)
class ChartBucket:
    start: datetime
    retrievals: int  # allowed retrievals and renewals
    refusals: int  # denied requests of any action


def _epoch_bucket(engine: Engine, width: int) -> ColumnElement[int]:
    """The integer ``floor(epoch seconds / width)`` of a row's time, per dialect."""
    if engine.dialect.name == "sqlite":
        # UTCDateTime keeps naive UTC text on SQLite; strftime('%s') reads it as UTC.
        seconds = cast(func.strftime("%s", _AUDIT.c.time), BigInteger)
    else:
        seconds = cast(func.floor(extract("epoch", _AUDIT.c.time)), BigInteger)
    return seconds // width  # integer operands: floor division on both backends


def activity_chart(
    engine: Engine, *, since: datetime, until: datetime, bucket: timedelta
) -> list[ChartBucket]:
    """Allowed retrievals and refusals per time bucket in ``[since, until)``.

    Buckets are aligned to multiples of ``bucket`` since the epoch (the first and
    last may be partly outside the range, which is then clipped). Allowed
    retrievals are most of the trail, so they are counted per bucket, each count
    one range of ``ix_audit_events_decision_action_time`` (no table rows read, no
    per-row date arithmetic); refusals are few, so one grouped query over the
    ``decision = 'deny'`` part of the same index gives all their buckets.
    """
    width = int(bucket.total_seconds())
    if width < 60:
        raise InputError("a chart bucket must be at least one minute")
    first = int(since.timestamp()) // width
    last = (int(until.timestamp()) - 1) // width
    if last < first or last - first + 1 > MAX_CHART_BUCKETS:
        raise InputError(f"the chart covers 1 to {MAX_CHART_BUCKETS} buckets")
    starts = [max(since, datetime.fromtimestamp(k * width, UTC)) for k in range(first, last + 1)]
    ends = [*starts[1:], until]
    allowed = (
        select(func.count())
        .select_from(_AUDIT)
        .where(
            _AUDIT.c.decision == "allow",
            _AUDIT.c.action.in_(RETRIEVAL_ACTIONS),
            _AUDIT.c.time >= bindparam("start"),
            _AUDIT.c.time < bindparam("end"),
        )
    )
    key = _epoch_bucket(engine, width).label("bucket")
    denied = (
        select(key, func.count().label("n"))
        .where(_AUDIT.c.decision == "deny", _AUDIT.c.time >= since, _AUDIT.c.time < until)
        .group_by(key)
    )
    with _reading(engine) as conn:
        retrievals = [
            int(conn.execute(allowed, {"start": s, "end": e}).scalar_one())
            for s, e in zip(starts, ends, strict=True)
        ]
        refusals = {int(r.bucket): int(r.n) for r in conn.execute(denied)}
    return [
        ChartBucket(datetime.fromtimestamp(k * width, UTC), retrievals[i], refusals.get(k, 0))
        for i, k in enumerate(range(first, last + 1))
    ]
