"""Stored OAuth2 refresh tokens (one per username and issuer), encrypted like private keys.

A refresh token is as powerful as a private key (it mints access tokens until
revoked), so it gets the same envelope: a per-row AES-GCM data key wrapped by
the master key, with the row's identity (owner DN, username, issuer) as
associated data so that rows cannot be swapped. Master-key rotation rewraps
these rows too (:func:`rewrap_refresh_tokens`).

Redeeming a rotating refresh token twice revokes it at the issuer, so
:meth:`RefreshTokenStore.redeem` runs the issuer call while it holds the row
lock (``SELECT ... FOR UPDATE`` on PostgreSQL, the write lock on SQLite): two
workers never send the same refresh token.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from sqlalchemy import JSON, Index, Integer, String, UniqueConstraint, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from broker.errors import AuthorizationError, NotFound
from broker.store import crypto
from broker.store.models import DN_LENGTH, USERNAME_LENGTH, Base, EnvelopeColumns, UTCDateTime
from broker.store.repository import (
    Store,
    envelope_of,
    record_from_row,
    rewrap_rows,
    rows_per_master_key,
    store_envelope,
)

ISSUER_NAME_LENGTH = 64
T = TypeVar("T")


class RefreshTokenRow(EnvelopeColumns, Base):
    __tablename__ = "refresh_tokens"
    __table_args__ = (
        UniqueConstraint("username", "issuer"),
        Index(None, "owner_dn"),
        Index(None, "master_key_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner_dn: Mapped[str] = mapped_column(String(DN_LENGTH), nullable=False)
    username: Mapped[str] = mapped_column(String(USERNAME_LENGTH), nullable=False)
    issuer: Mapped[str] = mapped_column(String(ISSUER_NAME_LENGTH), nullable=False)
    scopes: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    rotations: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


@dataclass(frozen=True)
class RefreshTokenRecord:
    owner_dn: str
    username: str
    issuer: str
    scopes: tuple[str, ...]
    rotations: int
    created_at: datetime
    updated_at: datetime


def _context(owner_dn: str, username: str, issuer: str) -> bytes:
    return b"refresh-token" + crypto._frame(owner_dn, username, issuer)


def _context_of_row(row: RefreshTokenRow) -> bytes:
    return _context(row.owner_dn, row.username, row.issuer)


def _record(row: RefreshTokenRow) -> RefreshTokenRecord:
    return record_from_row(RefreshTokenRecord, row, scopes=tuple(row.scopes))


class RefreshTokenStore:
    """Refresh tokens in the same database and under the same master keys as a Store."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def _session(self, *, write: bool) -> AbstractContextManager[Session]:
        """One transaction of the Store (its sessions, its error translation)."""
        return self._store._transaction(write=write)

    def _row(
        self, session: Session, username: str, issuer: str, *, lock: bool
    ) -> RefreshTokenRow | None:
        stmt = select(RefreshTokenRow).where(
            RefreshTokenRow.username == username, RefreshTokenRow.issuer == issuer
        )
        if lock:
            stmt = stmt.with_for_update()
        return session.scalars(stmt).one_or_none()

    def put(
        self,
        *,
        owner_dn: str,
        username: str,
        issuer: str,
        token: str,
        scopes: tuple[str, ...],
        now: datetime,
    ) -> RefreshTokenRecord:
        """Store (or replace, for the same owner) the refresh token of username at issuer."""
        envelope = crypto.seal(
            token.encode(), _context(owner_dn, username, issuer), self._store._ring_for_encrypt()
        )
        with self._session(write=True) as session:
            row = self._row(session, username, issuer, lock=True)
            if row is not None and row.owner_dn != owner_dn:
                raise AuthorizationError(
                    f"the refresh token of {username} at {issuer} belongs to {row.owner_dn}",
                    reason="not_owner",
                )
            if row is None:
                row = RefreshTokenRow(
                    owner_dn=owner_dn, username=username, issuer=issuer, created_at=now, rotations=0
                )
                session.add(row)
            row.scopes = list(scopes)
            row.updated_at = now
            store_envelope(row, envelope)
            session.flush()
            return _record(row)

    def get(self, username: str, issuer: str) -> RefreshTokenRecord | None:
        with self._session(write=False) as session:
            row = self._row(session, username, issuer, lock=False)
            return _record(row) if row is not None else None

    def delete(self, username: str, issuer: str, *, owner_dn: str) -> bool:
        with self._session(write=True) as session:
            row = self._row(session, username, issuer, lock=True)
            if row is None or row.owner_dn != owner_dn:
                return False
            session.delete(row)
            return True

    def redeem(
        self, username: str, issuer: str, now: datetime, use: Callable[[str], tuple[str | None, T]]
    ) -> T:
        """Call ``use(refresh_token)`` under the row lock; it returns (rotated token or None,
        result). A rotated token replaces the stored one in the same transaction; when
        ``use`` raises, nothing changes."""
        with self._session(write=True) as session:
            row = self._row(session, username, issuer, lock=True)
            if row is None:
                raise NotFound(
                    f"no refresh token of {username} at {issuer} is stored",
                    reason="no_refresh_token",
                )
            context = _context_of_row(row)
            ring = self._store._ring_for(row.master_key_id)
            token = crypto.open_envelope(envelope_of(row), context, ring).decode()
            rotated, result = use(token)
            if rotated is not None and rotated != token:
                store_envelope(
                    row, crypto.seal(rotated.encode(), context, self._store._ring_for_encrypt())
                )
                row.rotations += 1
                row.updated_at = now
            return result

    # -- master key rotation -------------------------------------------------

    def master_key_ids_in_use(self) -> dict[str, int]:
        with self._session(write=False) as session:
            return rows_per_master_key(session, RefreshTokenRow)

    def rewrap_batch(self, batch_size: int = 100) -> int:
        ring = self._store.master_keys
        with self._session(write=True) as session:
            return rewrap_rows(session, RefreshTokenRow, _context_of_row, ring, batch_size)
