"""SQLAlchemy models of the credential store.

Three tables:

``credentials``
    One delegated credential per (username, name): the certificate chain in
    PEM (leaf first, never a key), the private key in an encryption envelope
    (see :mod:`broker.store.crypto`), and the owner's policy.
``pending_delegations``
    The server half of a delegation in progress: the key the server generated
    for the CSR, encrypted the same way, until the signed chain comes back.
``audit_events``
    An append-only trail of every decision.
``service_secrets``
    Random secrets every worker process and node must share (the key that
    authenticates renewal challenges), created once by whoever comes first.
``used_challenges``
    Renewal challenges already answered, kept until they would have expired
    anyway: a challenge is single-use across processes and nodes.
``passphrase_attempts``
    Passphrase tries in progress or failed, per credential and client address:
    the throttle reserves a row before it runs scrypt.

The schema is created and changed only by the Alembic migrations in
``broker/store/migrations``; these models are what the code reads and writes,
and a test checks that the two agree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Deterministic constraint names: the migration spells the same names, so
# autogenerate comparisons and later ALTERs never depend on what a backend
# would have invented.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Column sizes shared with the validation in the repository.
DN_LENGTH = 1024
USERNAME_LENGTH = 1500  # bytes of UTF-8 at most (service.MAX_USERNAME_BYTES)
CREDNAME_LENGTH = 255
KEY_ID_LENGTH = 64
PENDING_ID_LENGTH = 64


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    PostgreSQL keeps ``timestamptz``; SQLite has no time zones, so the value
    is stored as naive UTC text (whose lexical order is its time order) and
    marked UTC again on the way out. Naive datetimes are refused on the way
    in, because guessing their zone is how expiry bugs start.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("naive datetime given to the store; use an aware UTC datetime")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# Audit ids grow without bound, so BIGINT on PostgreSQL; SQLite only makes an
# INTEGER PRIMARY KEY an auto-incrementing rowid, hence the variant.
AuditId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class EnvelopeColumns:
    """The encrypted private key, identical in credentials and pending rows.

    ``wrapped_data_key`` is the per-row AES key, wrapped by the master key
    ``master_key_id`` (and, inside that, by the owner's passphrase when
    ``passphrase_protected``). See :mod:`broker.store.crypto`.
    """

    key_ciphertext: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    key_nonce: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    wrapped_data_key: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    master_key_id: Mapped[str] = mapped_column(String(KEY_ID_LENGTH), nullable=False)
    passphrase_protected: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    kdf_salt: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    kdf_params: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class Credential(EnvelopeColumns, Base):
    __tablename__ = "credentials"
    __table_args__ = (
        UniqueConstraint("username", "name"),
        Index(None, "owner_dn"),
        Index(None, "master_key_id"),
        Index(None, "not_after"),  # the admin page's "expiring soon"
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner_dn: Mapped[str] = mapped_column(String(DN_LENGTH), nullable=False)
    username: Mapped[str] = mapped_column(String(USERNAME_LENGTH), nullable=False)
    name: Mapped[str] = mapped_column(String(CREDNAME_LENGTH), nullable=False, default="default")
    description: Mapped[str | None] = mapped_column(Text, nullable=True)
    certificate_chain: Mapped[str] = mapped_column(Text, nullable=False)
    not_after: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    retrievers: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    trusted_retrievers: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    renewers: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    # MyProxy's KEYRETRIEVERS (myproxy-store -E): who may download the key itself.
    key_retrievers: Mapped[list[str]] = mapped_column(JSON, nullable=False, default=list)
    max_lifetime_seconds: Mapped[int | None] = mapped_column(Integer, nullable=True)
    limited: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class PendingDelegationRow(EnvelopeColumns, Base):
    __tablename__ = "pending_delegations"
    __table_args__ = (
        Index(None, "expires_at"),
        Index(None, "master_key_id"),
        # the per-requester cap counts a requester's live rows
        Index(None, "requester_dn", "expires_at"),
    )

    id: Mapped[str] = mapped_column(String(PENDING_ID_LENGTH), primary_key=True)
    requester_dn: Mapped[str] = mapped_column(String(DN_LENGTH), nullable=False)
    username: Mapped[str] = mapped_column(String(USERNAME_LENGTH), nullable=False)
    name: Mapped[str] = mapped_column(String(CREDNAME_LENGTH), nullable=False)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class AuditEventRow(Base):
    __tablename__ = "audit_events"
    __table_args__ = (
        CheckConstraint("decision IN ('allow', 'deny', 'error')", name="decision"),
        CheckConstraint("endpoint IN ('rest', 'myproxy', 'cli')", name="endpoint"),
        Index(None, "owner_dn"),
        Index(None, "job_id"),
        Index(None, "time"),
        # recent failures for one credential (the passphrase throttle counts them)
        Index(None, "username", "credential_name", "time"),
        Index(None, "requester_dn"),  # the admin page's requester filter
        Index(None, "decision", "action", "time"),  # the admin page's activity chart
    )

    id: Mapped[int] = mapped_column(AuditId, primary_key=True, autoincrement=True)
    time: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    action: Mapped[str] = mapped_column(String(64), nullable=False)
    requester_dn: Mapped[str | None] = mapped_column(String(DN_LENGTH), nullable=True)
    requester_fqans: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    owner_dn: Mapped[str | None] = mapped_column(String(DN_LENGTH), nullable=True)
    username: Mapped[str | None] = mapped_column(String(USERNAME_LENGTH), nullable=True)
    credential_name: Mapped[str | None] = mapped_column(String(CREDNAME_LENGTH), nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    decision: Mapped[str] = mapped_column(String(16), nullable=False)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    client_address: Mapped[str | None] = mapped_column(String(255), nullable=True)
    request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    endpoint: Mapped[str] = mapped_column(String(16), nullable=False)


class ServiceSecretRow(Base):
    __tablename__ = "service_secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class UsedChallengeRow(Base):
    __tablename__ = "used_challenges"
    __table_args__ = (Index(None, "expires_at"),)

    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class PassphraseAttemptRow(Base):
    __tablename__ = "passphrase_attempts"
    __table_args__ = (
        CheckConstraint("state IN ('pending', 'failed')", name="state"),
        Index(None, "username", "credential_name", "time"),
    )

    id: Mapped[int] = mapped_column(AuditId, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(USERNAME_LENGTH), nullable=False)
    credential_name: Mapped[str] = mapped_column(String(CREDNAME_LENGTH), nullable=False)
    client_address: Mapped[str | None] = mapped_column(String(255), nullable=True)
    time: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
