"""The credential store's repository: the service layer's only way to the database.

Every public method of :class:`Store` is exactly one database transaction: it
commits as a whole or not at all, so a crash at any point leaves either the
old or the new state. Nothing returned is an ORM object; results are frozen
dataclasses that stay valid after the transaction.

The schema must exist (``broker.store.migrate(url)``); the Store never creates
tables. The methods' own signatures and docstrings are the API; writes that
change a credential (``put_credential`` with a :class:`CredentialWrite`,
``delete_credential``, ``change_passphrase``) and the pending-delegation writes
take ``audit=AuditEvent(...)`` and write it in their own transaction: both rows
exist, or neither.

Time: the store never reads a clock. Every method that stamps or compares a
time takes ``now`` from its caller (the service passes its own clock's reading).
Every datetime must be timezone-aware.

Errors: bad input -> InputError/PemError/DnSyntaxError; missing -> NotFound;
wrong owner -> Conflict (put) or AuthorizationError; wrong passphrase ->
AuthenticationError; database down -> StoreUnavailable; anything else from
the database -> StoreError.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from sqlalchemy import Connection, Engine, delete, func, insert, select, text, update
from sqlalchemy.engine import URL, Row
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

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
    TooManyAttempts,
)
from broker.naming import DEFAULT_CREDENTIAL
from broker.store import crypto
from broker.store.crypto import Envelope, MasterKeyRing
from broker.store.engine import SQLITE_BEGIN_OPTION, make_engine, safe_url, unavailable_error
from broker.store.models import (
    CREDNAME_LENGTH,
    DN_LENGTH,
    USERNAME_LENGTH,
    AuditEventRow,
    Credential,
    EnvelopeColumns,
    PassphraseAttemptRow,
    PendingDelegationRow,
    ServiceSecretRow,
    UsedChallengeRow,
)

DEFAULT_PENDING_TTL = timedelta(minutes=10)
MAX_CHAIN_BYTES = 64 * 1024
MAX_KEY_BYTES = 32 * 1024
MAX_AUDIT_LIMIT = 10_000
DECISIONS = frozenset({"allow", "deny", "error"})
ENDPOINTS = frozenset({"rest", "myproxy", "cli"})
_PENDING_ID_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")

T = TypeVar("T")
R = TypeVar("R")


# --------------------------------------------------------------------------
# Records handed to the service layer


@dataclass(frozen=True)
class CredentialRecord:
    id: int
    owner_dn: str
    username: str
    name: str
    description: str | None
    certificate_chain: str
    not_after: datetime
    retrievers: tuple[str, ...]
    trusted_retrievers: tuple[str, ...]
    renewers: tuple[str, ...]
    max_lifetime_seconds: int | None
    limited: bool
    passphrase_protected: bool
    created_at: datetime
    updated_at: datetime
    envelope: Envelope = field(repr=False, compare=False)
    key_retrievers: tuple[str, ...] = ()


@dataclass(frozen=True)
class PendingDelegation:
    id: str
    requester_dn: str
    username: str
    name: str
    params: dict[str, Any]
    created_at: datetime
    expires_at: datetime
    envelope: Envelope = field(repr=False, compare=False)


@dataclass(frozen=True, kw_only=True)
class CredentialWrite:
    """One credential to store, as :meth:`CredentialStore.put_credential` takes it.

    Exactly one of ``private_key_pem`` and ``consume_pending`` (the id of a pending
    delegation whose key the chain certifies) is given. ``owner_encrypted_key``:
    ``private_key_pem`` is encrypted with the owner's passphrase (MyProxy STORE); it
    is kept as it is inside the envelope and opened only by a retrieval that gives
    the passphrase. ``not_after`` may keep the credential for less than its chain lives.
    """

    owner_dn: str
    username: str
    name: str = DEFAULT_CREDENTIAL
    certificate_chain: str
    private_key_pem: bytes | None = None
    description: str | None = None
    retrievers: Sequence[str] = ()
    trusted_retrievers: Sequence[str] = ()
    renewers: Sequence[str] = ()
    key_retrievers: Sequence[str] = ()
    max_lifetime_seconds: int | None = None
    limited: bool = False
    passphrase: str | None = field(default=None, repr=False)
    consume_pending: str | None = None
    not_after: datetime | None = None
    owner_encrypted_key: bool = False


@dataclass(frozen=True)
class AuditEvent:
    """An audit entry to write; ``time=None`` means the ``now`` of the write."""

    action: str
    decision: str
    endpoint: str
    time: datetime | None = None
    requester_dn: str | None = None
    requester_fqans: tuple[str, ...] = ()
    owner_dn: str | None = None
    username: str | None = None
    credential_name: str | None = None
    job_id: str | None = None
    reason: str | None = None
    client_address: str | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class AuditRecord:
    id: int
    time: datetime
    action: str
    decision: str
    endpoint: str
    requester_dn: str | None
    requester_fqans: tuple[str, ...]
    owner_dn: str | None
    username: str | None
    credential_name: str | None
    job_id: str | None
    reason: str | None
    client_address: str | None
    request_id: str | None


# --------------------------------------------------------------------------
# Input checks (specific errors, never a traceback)


def _aware(value: datetime, what: str) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise InputError(f"{what} must be a timezone-aware datetime")
    return value.astimezone(UTC)


def _text(value: object, what: str, max_length: int, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DnSyntaxError(f"{what} must be text")
    if not value and not allow_empty:
        raise DnSyntaxError(f"{what} must not be empty")
    if len(value) > max_length:
        raise DnSyntaxError(f"{what} is longer than {max_length} characters")
    if _CONTROL_RE.search(value):
        raise DnSyntaxError(f"{what} contains control characters")
    return value


def _dn(value: object, what: str = "DN") -> str:
    dn = _text(value, what, DN_LENGTH)
    if not dn.startswith("/"):
        raise DnSyntaxError(f"{what} {dn!r} is not in slash form (/DC=org/CN=...)")
    return dn


def _username(value: object) -> str:
    return _text(value, "username", USERNAME_LENGTH)


def _credname(value: object) -> str:
    return _text(value, "credential name", CREDNAME_LENGTH)


def _dn_list(values: Iterable[str], what: str) -> list[str]:
    if isinstance(values, str):
        raise InputError(f"{what} must be a list of DNs or patterns, not one string")
    out: list[str] = []
    for value in values:
        # Entries may be patterns ("/DC=org/*"), so only the basic text rules.
        out.append(_text(value, f"an entry of {what}", DN_LENGTH))
    return out


def _check_private_key(pem: object, *, encrypted: bool = False) -> bytes:
    """A PEM private key of a sane size: in the clear, or (``encrypted``) one that needs its
    owner's passphrase to load, with a bounded key-derivation cost."""
    if not isinstance(pem, bytes | bytearray):
        raise PemError("the private key must be PEM bytes")
    data = bytes(pem)
    if len(data) > MAX_KEY_BYTES:
        raise PemError("the private key PEM is too large")
    try:
        serialization.load_pem_private_key(data, password=None)
    except TypeError:
        if not encrypted:
            raise PemError(
                "the private key PEM is encrypted; the store needs it in the clear"
            ) from None
        _check_key_encryption_cost(data)
        return data
    except (ValueError, UnsupportedAlgorithm):
        raise PemError("the private key is not a readable PEM private key") from None
    if encrypted:
        raise PemError("the private key PEM is not encrypted")
    return data


#: The most PBKDF2 rounds an owner-encrypted key may ask for. Every passphrase try
#: (anonymous clients included) runs them once; OpenSSL's default is 2,048.
MAX_KEY_KDF_ITERATIONS = 1_000_000


def _check_key_encryption_cost(pem: bytes) -> None:
    """Refuse an encrypted PKCS#8 key whose key derivation would let whoever uploads it
    make each passphrase try arbitrarily expensive (a CPU exhaustion)."""
    from asn1crypto import keys as asn1_keys
    from asn1crypto import pem as asn1_pem

    if b"Proc-Type: 4,ENCRYPTED" in pem:
        return  # OpenSSL's traditional format: one MD5 round, cheap by construction
    try:
        _, _, der = asn1_pem.unarmor(pem)
        info = asn1_keys.EncryptedPrivateKeyInfo.load(der)
        algorithm = info["encryption_algorithm"]
        kdf = algorithm.kdf
        iterations = int(algorithm.kdf_iterations)
    except Exception:  # asn1crypto raises many types for unknown input
        raise PemError(
            "the private key is encrypted with a scheme this broker does not "
            "accept; use PKCS#8 with PBKDF2 (openssl pkcs8 -topk8 -v2 aes256)"
        ) from None
    if kdf not in ("pbkdf2", "pbkdf1", "pkcs12_kdf") or not 1 <= iterations <= (
        MAX_KEY_KDF_ITERATIONS
    ):
        raise PemError(
            f"the private key's encryption asks for {iterations} {kdf} rounds; "
            f"at most {MAX_KEY_KDF_ITERATIONS} are accepted"
        )


def _check_chain(chain: object, private_key_pem: bytes | None) -> tuple[str, datetime]:
    """Normalise the chain to PEM certificates only; return it and its earliest expiry."""
    if not isinstance(chain, str):
        raise PemError("the certificate chain must be PEM text")
    if len(chain) > MAX_CHAIN_BYTES:
        raise PemError("the certificate chain is too large")
    if "PRIVATE KEY" in chain:
        raise PemError("the certificate chain must not contain a private key")
    try:
        certs = x509.load_pem_x509_certificates(chain.encode("ascii"))
    except (ValueError, UnicodeEncodeError, x509.InvalidVersion):
        raise PemError("the certificate chain is not readable PEM") from None
    if not certs:
        raise PemError("the certificate chain holds no certificate")
    if private_key_pem is not None:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if key.public_key().public_bytes(der, public) != certs[0].public_key().public_bytes(
            der, public
        ):
            raise PemError(
                "the private key does not belong to the first certificate of the chain",
                reason="key_mismatch",
            )
    normalised = "".join(c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in certs)
    return normalised, min(c.not_valid_after_utc for c in certs)


@dataclass(frozen=True)
class _WriteAcl:
    """The checked access lists of a :class:`CredentialWrite`."""

    retrievers: list[str]
    trusted_retrievers: list[str]
    renewers: list[str]
    key_retrievers: list[str]


def _checked_write_settings(write: CredentialWrite) -> _WriteAcl:
    """Check a write's description, access lists, lifetime cap and new passphrase."""
    if write.description is not None:
        _text(write.description, "description", 4096, allow_empty=True)
    acl = _WriteAcl(
        retrievers=_dn_list(write.retrievers, "retrievers"),
        trusted_retrievers=_dn_list(write.trusted_retrievers, "trusted_retrievers"),
        renewers=_dn_list(write.renewers, "renewers"),
        key_retrievers=_dn_list(write.key_retrievers, "key_retrievers"),
    )
    max_lifetime_seconds = write.max_lifetime_seconds
    if max_lifetime_seconds is not None and (
        not isinstance(max_lifetime_seconds, int)
        or isinstance(max_lifetime_seconds, bool)
        or max_lifetime_seconds <= 0
    ):
        raise InputError("max_lifetime_seconds must be a positive integer")
    if write.passphrase is not None:
        crypto.check_new_passphrase(write.passphrase)
    return acl


def _checked_key_and_chain(write: CredentialWrite) -> tuple[bytes | None, str, datetime]:
    """The write's key PEM (None when it comes from a pending row), chain and chain end."""
    private_key_pem = write.private_key_pem
    if (private_key_pem is None) == (write.consume_pending is None):
        raise InputError("give exactly one of private_key_pem and consume_pending")
    if write.owner_encrypted_key:
        if private_key_pem is None or write.passphrase is not None:
            raise InputError("an owner-encrypted key comes as PEM, without a passphrase")
        key_pem = _check_private_key(private_key_pem, encrypted=True)
        return (key_pem, *_check_chain(write.certificate_chain, None))
    if private_key_pem is not None:
        key_pem = _check_private_key(private_key_pem)
        return (key_pem, *_check_chain(write.certificate_chain, key_pem))
    # The key comes from the pending row; it is checked against the
    # chain inside the transaction.
    return (None, *_check_chain(write.certificate_chain, None))


def _locked_credential_row(session: Session, username: str, name: str) -> Credential | None:
    """The credential row of a slot, locked for update (None when the slot is empty)."""
    return session.scalars(
        select(Credential)
        .where(Credential.username == username, Credential.name == name)
        .with_for_update()
    ).one_or_none()


def _credential_row_for_write(
    session: Session, owner_dn: str, username: str, name: str, moment: datetime
) -> Credential:
    """The locked row of the slot, or a new one; another owner's slot is a conflict."""
    row = _locked_credential_row(session, username, name)
    if row is None:
        row = Credential(owner_dn=owner_dn, username=username, name=name, created_at=moment)
        session.add(row)
    elif row.owner_dn != owner_dn:
        raise Conflict(
            f"credential {name!r} of user {username!r} belongs to another owner",
            reason="owner_mismatch",
        )
    return row


def _fill_credential_row(
    row: Credential,
    write: CredentialWrite,
    acl: _WriteAcl,
    chain: str,
    stored_until: datetime,
    moment: datetime,
) -> None:
    row.description = write.description
    row.certificate_chain = chain
    row.not_after = stored_until
    row.retrievers = acl.retrievers
    row.trusted_retrievers = acl.trusted_retrievers
    row.renewers = acl.renewers
    row.key_retrievers = acl.key_retrievers
    row.max_lifetime_seconds = write.max_lifetime_seconds
    row.limited = bool(write.limited)
    row.updated_at = moment


def _checked_slot(username: str, name: str, owner_dn: str | None) -> tuple[str, str, str | None]:
    """The checked username, credential name and expected owner (None: any owner) of a
    write to an existing credential."""
    username, name = _username(username), _credname(name)
    return username, name, _dn(owner_dn, "owner DN") if owner_dn is not None else None


def _locked_owned_row(
    session: Session, username: str, name: str, expected_owner: str | None
) -> Credential:
    """The credential row, locked for update; NotFound, or AuthorizationError for another owner."""
    row = _locked_credential_row(session, username, name)
    if row is None:
        raise NotFound(f"no credential {name!r} for user {username!r}")
    if expected_owner is not None and row.owner_dn != expected_owner:
        raise AuthorizationError(
            f"credential {name!r} of user {username!r} is not owned by {expected_owner}"
        )
    return row


def _check_audit(event: AuditEvent) -> None:
    if not isinstance(event, AuditEvent):
        raise InputError("audit must be an AuditEvent")
    _text(event.action, "audit action", 64)
    if event.decision not in DECISIONS:
        raise InputError(f"audit decision must be one of {sorted(DECISIONS)}")
    if event.endpoint not in ENDPOINTS:
        raise InputError(f"audit endpoint must be one of {sorted(ENDPOINTS)}")
    for value, what, limit in (
        (event.requester_dn, "audit requester DN", DN_LENGTH),
        (event.owner_dn, "audit owner DN", DN_LENGTH),
        (event.username, "audit username", USERNAME_LENGTH),
        (event.credential_name, "audit credential name", CREDNAME_LENGTH),
        (event.job_id, "audit job id", 255),
        (event.client_address, "audit client address", 255),
        (event.request_id, "audit request id", 128),
    ):
        if value is not None:
            _text(value, what, limit, allow_empty=True)
    if event.reason is not None and not isinstance(event.reason, str):
        raise InputError("audit reason must be text")
    for fqan in event.requester_fqans:
        _text(fqan, "an FQAN", 1024)


# --------------------------------------------------------------------------
# Row <-> record


def envelope_of(row: EnvelopeColumns | Row[Any]) -> Envelope:
    """The envelope a row's envelope columns hold (an ORM row of any envelope table, or a
    Core row of one)."""
    return Envelope(
        ciphertext=bytes(row.key_ciphertext),
        nonce=bytes(row.key_nonce),
        wrapped_data_key=bytes(row.wrapped_data_key),
        master_key_id=row.master_key_id,
        passphrase_protected=row.passphrase_protected,
        kdf_salt=bytes(row.kdf_salt) if row.kdf_salt is not None else None,
        kdf_params=dict(row.kdf_params) if row.kdf_params is not None else None,
    )


def store_envelope(row: EnvelopeColumns, envelope: Envelope) -> None:
    """Write ``envelope`` into the row's envelope columns."""
    row.key_ciphertext = envelope.ciphertext
    row.key_nonce = envelope.nonce
    row.wrapped_data_key = envelope.wrapped_data_key
    row.master_key_id = envelope.master_key_id
    row.passphrase_protected = envelope.passphrase_protected
    row.kdf_salt = envelope.kdf_salt
    row.kdf_params = envelope.kdf_params


def _field_names(record_type: type[Any]) -> tuple[str, ...]:
    return tuple(f.name for f in fields(record_type))


def record_from_row(record_type: type[R], row: object, **converted: Any) -> R:
    """A record (a dataclass) whose every field is the row's attribute of the same name,
    except those given in ``converted``. The row may be an ORM object or a Core row."""
    names = _field_names(record_type)
    taken = {name: getattr(row, name) for name in names if name not in converted}
    return record_type(**taken, **converted)


def _credential_record(row: Credential | Row[Any]) -> CredentialRecord:
    # An ORM object or a Core row of the credentials table: same attribute names.
    return record_from_row(
        CredentialRecord,
        row,
        retrievers=tuple(row.retrievers),
        trusted_retrievers=tuple(row.trusted_retrievers),
        renewers=tuple(row.renewers),
        key_retrievers=tuple(row.key_retrievers or ()),
        envelope=envelope_of(row),
    )


def _pending_record(row: PendingDelegationRow) -> PendingDelegation:
    return record_from_row(
        PendingDelegation, row, params=dict(row.params), envelope=envelope_of(row)
    )


def _audit_values(event: AuditEvent, now: datetime) -> dict[str, Any]:
    """The checked column values of one audit row (the ORM and the Core paths share them):
    every AuditEvent field is the column of the same name."""
    _check_audit(event)
    values = {name: getattr(event, name) for name in _field_names(AuditEvent)}
    values["time"] = _aware(event.time, "audit time") if event.time is not None else now
    values["requester_fqans"] = list(event.requester_fqans)
    return values


def audit_record(row: AuditEventRow | Row[Any]) -> AuditRecord:
    """The record of an audit row (an ORM object or a Core row of ``audit_events``)."""
    return record_from_row(
        AuditRecord, row, id=int(row.id), requester_fqans=tuple(row.requester_fqans or ())
    )


def rows_per_master_key(session: Session, model: Any) -> dict[str, int]:
    """How many rows of an envelope table each master key wraps."""
    stmt = select(model.master_key_id, func.count()).group_by(model.master_key_id)
    return {key_id: int(count) for key_id, count in session.execute(stmt)}


def rewrap_rows(
    session: Session,
    model: Any,
    context_of: Callable[[Any], bytes],
    ring: MasterKeyRing,
    limit: int,
) -> int:
    """Rewrap up to ``limit`` rows of an envelope table (``model``, whose rows have an
    ``id``) that are not under the ring's active key, oldest id first; how many."""
    rows = session.scalars(
        select(model)
        .where(model.master_key_id != ring.active_id)
        .order_by(model.id)
        .limit(limit)
        .with_for_update()
    ).all()
    for row in rows:
        store_envelope(row, crypto.rewrap(envelope_of(row), context_of(row), ring))
    return len(rows)


def _context_of_credential(row: Credential | CredentialRecord) -> bytes:
    return crypto.credential_context(row.owner_dn, row.username, row.name)


def _context_of_pending(row: PendingDelegationRow | PendingDelegation) -> bytes:
    return crypto.pending_context(row.id, row.requester_dn, row.username, row.name)


# --------------------------------------------------------------------------
# The store


class Store:
    """Transactional access to credentials, pending delegations and the audit trail."""

    def __init__(
        self,
        url: str | URL | Engine,
        master_keys: MasterKeyRing,
    ) -> None:
        if not isinstance(master_keys, MasterKeyRing):
            raise InputError("master_keys must be a MasterKeyRing (see load_master_keys)")
        self._owns_engine = not isinstance(url, Engine)
        self._engine = url if isinstance(url, Engine) else make_engine(url)
        self._ring = master_keys
        self._read_sessions = sessionmaker(bind=self._engine, expire_on_commit=False)
        # Writers take SQLite's write lock at BEGIN (see broker.store.engine).
        self._write_engine = self._engine.execution_options(**{SQLITE_BEGIN_OPTION: "IMMEDIATE"})
        self._write_sessions = sessionmaker(bind=self._write_engine, expire_on_commit=False)

    # -- lifetime ----------------------------------------------------------

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def url(self) -> str:
        """The database URL with the password masked."""
        return safe_url(self._engine.url)

    def close(self) -> None:
        if self._owns_engine:
            self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.url!r}, keys={self._ring.ids!r})"

    # -- plumbing ----------------------------------------------------------

    @contextmanager
    def _database_errors(self) -> Iterator[None]:
        """Database exceptions as the store's errors (a lost insert race, the database down)."""
        try:
            yield
        except BrokerError:
            raise
        except IntegrityError:
            raise Conflict(
                "the change conflicts with data stored meanwhile; retry", reason="race"
            ) from None
        except SQLAlchemyError as exc:
            raise unavailable_error(self._engine, exc) from None

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Session]:
        factory = self._write_sessions if write else self._read_sessions
        with self._database_errors(), factory.begin() as session:
            yield session

    @contextmanager
    def _core(self, *, write: bool) -> Iterator[Connection]:
        """A Core connection in one transaction, for the per-retrieval hot path (a read of
        one credential, an audit insert): the same errors as :meth:`_transaction`, without
        the ORM unit of work (about 0.2 ms per statement on SQLite)."""
        engine = self._write_engine if write else self._engine
        with self._database_errors(), engine.begin() as conn:
            yield conn

    def _serialise(self, session: Session, key: str) -> None:
        """Serialise write transactions that share ``key`` (count-then-insert limits).

        SQLite writers already run one at a time (BEGIN IMMEDIATE); PostgreSQL takes a
        transaction-scoped advisory lock on a hash of the key."""
        if self._engine.dialect.name == "postgresql":
            session.execute(
                text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"), {"k": key}
            )

    def _now(self, now: datetime) -> datetime:
        return _aware(now, "now")

    def _with_retry(self, attempt: Callable[[], T]) -> T:
        """Run a write once more if it lost an insert race (unique violation)."""
        try:
            return attempt()
        except Conflict as exc:
            if exc.reason != "race":
                raise
        return attempt()

    @contextmanager
    def _owned_row_write(
        self, slot: tuple[str, str, str | None], audit: AuditEvent | None, now: datetime
    ) -> Iterator[tuple[Session, Credential, datetime]]:
        """A write transaction on an existing credential (``slot`` from :func:`_checked_slot`):
        yields the session, the locked row and the checked ``now``; the audit event is
        written in the same transaction when the block ends without an error."""
        if audit is not None:
            _check_audit(audit)
        moment = self._now(now)
        with self._transaction(write=True) as session:
            row = _locked_owned_row(session, *slot)
            yield session, row, moment
            self._write_audit(session, audit, moment)

    def _write_audit(
        self, session: Session, event: AuditEvent | None, now: datetime
    ) -> AuditEventRow | None:
        if event is None:
            return None
        row = AuditEventRow(**_audit_values(event, now))
        session.add(row)
        return row

    # -- master keys -------------------------------------------------------

    @property
    def master_keys(self) -> MasterKeyRing:
        return self._ring

    def use_master_keys(self, ring: MasterKeyRing) -> None:
        """Swap the key ring (rotation; a reload). Takes effect for the next call."""
        self._ring = ring

    def _reload_keys(self) -> MasterKeyRing:
        """Re-read the key file, keeping keys we hold that it no longer lists.

        The file decides which key is active; keys only in memory stay
        (first, i.e. never active) so rows still wrapped with them decrypt.
        """
        current = self._ring
        if current.path is None:
            return current
        fresh = crypto.load_master_keys(current.path)
        extra = tuple((k, v) for k, v in current.keys if fresh.get(k) is None)
        merged = MasterKeyRing(
            keys=(*extra, *fresh.keys), path=fresh.path, signature=fresh.signature
        )
        self._ring = merged
        return merged

    def _ring_for_encrypt(self) -> MasterKeyRing:
        if self._ring.changed_on_disk():
            return self._reload_keys()
        return self._ring

    def _ring_for(self, key_id: str) -> MasterKeyRing:
        ring = self._ring
        if ring.get(key_id) is None and ring.path is not None:
            ring = self._reload_keys()
        return ring

    def master_key_ids_in_use(self) -> dict[str, int]:
        """How many rows (credentials + pending) each master key wraps."""
        counts: dict[str, int] = {}
        with self._transaction(write=False) as session:
            for model in (Credential, PendingDelegationRow):
                for key_id, count in rows_per_master_key(session, model).items():
                    counts[key_id] = counts.get(key_id, 0) + count
        from broker.store.tokens import RefreshTokenStore  # refresh tokens use the same keys

        for key_id, count in RefreshTokenStore(self).master_key_ids_in_use().items():
            counts[key_id] = counts.get(key_id, 0) + count
        return counts

    def rewrap_batch(self, batch_size: int = 100) -> int:
        """Rewrap up to ``batch_size`` rows not under the active key; one transaction.

        Returns how many rows changed (0 when everything is on the active key).
        """
        ring = self._ring
        done = 0
        with self._transaction(write=True) as session:
            tables: tuple[tuple[Any, Callable[[Any], bytes]], ...] = (
                (Credential, _context_of_credential),
                (PendingDelegationRow, _context_of_pending),
            )
            for model, context_of in tables:
                if done < batch_size:
                    done += rewrap_rows(session, model, context_of, ring, batch_size - done)
        if done < batch_size:  # stored refresh tokens (broker.store.tokens), same keys
            from broker.store.tokens import RefreshTokenStore

            done += RefreshTokenStore(self).rewrap_batch(batch_size - done)
        return done

    # -- credentials -------------------------------------------------------

    def put_credential(
        self,
        write: CredentialWrite,
        *,
        now: datetime,
        audit: AuditEvent | None = None,
    ) -> CredentialRecord:
        """Store a credential described by ``write`` (see :class:`CredentialWrite`)."""
        owner_dn = _dn(write.owner_dn, "owner DN")
        username = _username(write.username)
        name = _credname(write.name)
        acl = _checked_write_settings(write)
        if audit is not None:
            _check_audit(audit)
        key_pem, chain, chain_end = _checked_key_and_chain(write)
        # The caller may keep a credential for less time than its chain lives.
        stored_until = (
            chain_end
            if write.not_after is None
            else min(chain_end, _aware(write.not_after, "not_after"))
        )
        moment = self._now(now)
        context = crypto.credential_context(owner_dn, username, name)
        passphrase, consume_pending = write.passphrase, write.consume_pending
        # Encrypting (scrypt with a passphrase) before BEGIN keeps the write
        # lock short; only a key taken from a pending row must be sealed inside.
        early_envelope = (
            crypto.seal_owner_encrypted(key_pem, context, self._ring_for_encrypt())
            if key_pem is not None and write.owner_encrypted_key
            else crypto.seal(key_pem, context, self._ring_for_encrypt(), passphrase)
            if key_pem is not None
            else None
        )

        def attempt() -> CredentialRecord:
            envelope = early_envelope
            with self._transaction(write=True) as session:
                if consume_pending is not None:
                    pending = self._locked_pending(session, consume_pending, owner_dn, moment)
                    if (pending.username, pending.name) != (username, name):
                        raise Conflict(
                            "the pending delegation was made for another credential slot"
                        )
                    pending_ring = self._ring_for(pending.master_key_id)
                    pem = crypto.open_envelope(
                        envelope_of(pending), _context_of_pending(pending), pending_ring
                    )
                    _check_chain(chain, pem)
                    session.delete(pending)
                    envelope = crypto.seal(pem, context, self._ring_for_encrypt(), passphrase)
                assert envelope is not None
                row = _credential_row_for_write(session, owner_dn, username, name, moment)
                _fill_credential_row(row, write, acl, chain, stored_until, moment)
                store_envelope(row, envelope)
                self._write_audit(session, audit, moment)
                session.flush()
                return _credential_record(row)

        return self._with_retry(attempt)

    def get_credential(self, username: str, name: str = DEFAULT_CREDENTIAL) -> CredentialRecord:
        username, name = _username(username), _credname(name)
        table = Credential.__table__
        with self._core(write=False) as conn:
            row = conn.execute(
                select(table).where(table.c.username == username, table.c.name == name)
            ).one_or_none()
            if row is None:
                raise NotFound(f"no credential {name!r} for user {username!r}")
            return _credential_record(row)

    def find_credentials(self, owner_dn: str) -> list[CredentialRecord]:
        return self.list_credentials(owner_dn=owner_dn)

    def list_credentials(
        self, *, owner_dn: str | None = None, username: str | None = None
    ) -> list[CredentialRecord]:
        stmt = select(Credential).order_by(Credential.username, Credential.name)
        if owner_dn is not None:
            stmt = stmt.where(Credential.owner_dn == _dn(owner_dn, "owner DN"))
        if username is not None:
            stmt = stmt.where(Credential.username == _username(username))
        with self._transaction(write=False) as session:
            return [_credential_record(row) for row in session.scalars(stmt)]

    def delete_credential(
        self,
        username: str,
        name: str = DEFAULT_CREDENTIAL,
        *,
        owner_dn: str | None = None,
        audit: AuditEvent | None = None,
        now: datetime,
    ) -> CredentialRecord:
        """Delete one credential; with ``owner_dn`` only if that DN owns it."""
        slot = _checked_slot(username, name, owner_dn)
        with self._owned_row_write(slot, audit, now) as (session, row, _):
            record = _credential_record(row)
            session.delete(row)
        return record

    def decrypt_private_key(
        self, record: CredentialRecord | PendingDelegation, passphrase: str | None = None
    ) -> bytes:
        """The private key PEM of a record returned by this store."""
        if isinstance(record, CredentialRecord):
            context = _context_of_credential(record)
        elif isinstance(record, PendingDelegation):
            context = _context_of_pending(record)
        else:
            raise InputError("decrypt_private_key needs a CredentialRecord or PendingDelegation")
        ring = self._ring_for(record.envelope.master_key_id)
        return crypto.open_envelope(record.envelope, context, ring, passphrase)

    def change_passphrase(
        self,
        username: str,
        name: str = DEFAULT_CREDENTIAL,
        *,
        old_passphrase: str | None,
        new_passphrase: str | None,
        owner_dn: str | None = None,
        now: datetime,
        audit: AuditEvent | None = None,
    ) -> CredentialRecord:
        """Set, change or (``new_passphrase=None``) remove a credential's passphrase."""
        slot = _checked_slot(username, name, owner_dn)
        if new_passphrase is not None:
            crypto.check_new_passphrase(new_passphrase)
        with self._owned_row_write(slot, audit, now) as (session, row, moment):
            envelope = envelope_of(row)
            ring = self._ring_for(envelope.master_key_id)
            if ring.changed_on_disk():
                ring = self._reload_keys()
            updated = crypto.change_envelope_passphrase(
                envelope, _context_of_credential(row), ring, old_passphrase, new_passphrase
            )
            store_envelope(row, updated)
            row.updated_at = moment
            session.flush()
            return _credential_record(row)

    # -- pending delegations ----------------------------------------------

    def create_pending(
        self,
        *,
        requester_dn: str,
        username: str,
        name: str = DEFAULT_CREDENTIAL,
        private_key_pem: bytes,
        params: Mapping[str, Any],
        now: datetime,
        ttl: timedelta = DEFAULT_PENDING_TTL,
        audit: AuditEvent | None = None,
        max_live: int | None = None,
    ) -> PendingDelegation:
        """With ``max_live``, refuse (TooManyAttempts, reason ``too_many_pending``) when the
        requester already has that many unexpired pending delegations; counted and inserted
        in one serialised transaction, so concurrent requests cannot overshoot."""
        requester_dn = _dn(requester_dn, "requester DN")
        username, name = _username(username), _credname(name)
        pem = _check_private_key(private_key_pem)
        if not isinstance(params, Mapping):
            raise InputError("pending delegation params must be a mapping")
        if not isinstance(ttl, timedelta) or ttl <= timedelta(0):
            raise InputError("the pending delegation lifetime must be positive")
        if audit is not None:
            _check_audit(audit)
        moment = self._now(now)
        params_copy = dict(params)
        pending_id = secrets.token_urlsafe(16)  # 128 random bits
        ring = self._ring_for_encrypt()
        envelope = crypto.seal(
            pem, crypto.pending_context(pending_id, requester_dn, username, name), ring
        )
        with self._transaction(write=True) as session:
            if max_live is not None:
                self._serialise(session, f"pending:{requester_dn}")
                live = session.execute(
                    select(func.count())
                    .select_from(PendingDelegationRow)
                    .where(
                        PendingDelegationRow.requester_dn == requester_dn,
                        PendingDelegationRow.expires_at > moment,
                    )
                ).scalar_one()
                if live >= max_live:
                    raise TooManyAttempts(
                        f"{requester_dn} already has {live} delegations waiting for their "
                        f"signed chain (at most {max_live}); finish or let them expire "
                        f"({int(ttl.total_seconds() // 60)} minutes) before starting another",
                        reason="too_many_pending",
                    )
            row = PendingDelegationRow(
                id=pending_id,
                requester_dn=requester_dn,
                username=username,
                name=name,
                params=params_copy,
                created_at=moment,
                expires_at=moment + ttl,
            )
            store_envelope(row, envelope)
            session.add(row)
            self._write_audit(session, audit, moment)
            try:
                session.flush()
            except (TypeError, ValueError):
                # JSON serialisation of params happens at flush.
                raise InputError("pending delegation params must be JSON-serialisable") from None
            return _pending_record(row)

    def _locked_pending(
        self, session: Session, pending_id: str, requester_dn: str, now: datetime
    ) -> PendingDelegationRow:
        if not isinstance(pending_id, str) or not _PENDING_ID_RE.match(pending_id):
            raise NotFound("no such pending delegation")
        row = session.scalars(
            select(PendingDelegationRow)
            .where(PendingDelegationRow.id == pending_id)
            .with_for_update()
        ).one_or_none()
        if row is None:
            raise NotFound("no such pending delegation")
        if row.requester_dn != requester_dn:
            raise AuthorizationError("the pending delegation belongs to another requester")
        if row.expires_at <= now:
            raise NotFound("the pending delegation has expired", reason="expired")
        return row

    def get_pending(
        self, pending_id: str, requester_dn: str, *, now: datetime
    ) -> PendingDelegation:
        """Read a pending delegation without consuming it."""
        requester_dn = _dn(requester_dn, "requester DN")
        moment = self._now(now)
        with self._transaction(write=False) as session:
            return _pending_record(self._locked_pending(session, pending_id, requester_dn, moment))

    def take_pending(
        self,
        pending_id: str,
        requester_dn: str,
        *,
        now: datetime,
        audit: AuditEvent | None = None,
    ) -> PendingDelegation:
        """Return and delete a pending delegation in one transaction (single use)."""
        requester_dn = _dn(requester_dn, "requester DN")
        moment = self._now(now)
        if audit is not None:
            _check_audit(audit)
        expired = False
        with self._transaction(write=True) as session:
            try:
                row = self._locked_pending(session, pending_id, requester_dn, moment)
            except NotFound as exc:
                if exc.reason != "expired":
                    raise
                # Remove the dead row (committed), then report; the caller's
                # audit event described a success and is not written.
                session.execute(
                    delete(PendingDelegationRow).where(PendingDelegationRow.id == pending_id)
                )
                expired = True
            else:
                record = _pending_record(row)
                session.delete(row)
                self._write_audit(session, audit, moment)
        if expired:
            raise NotFound("the pending delegation has expired", reason="expired")
        return record

    def purge_expired_pending(self, now: datetime) -> int:
        moment = self._now(now)
        with self._transaction(write=True) as session:
            result = session.execute(
                delete(PendingDelegationRow).where(PendingDelegationRow.expires_at <= moment)
            )
            return int(getattr(result, "rowcount", 0) or 0)

    def purge_expired(self, now: datetime, *, attempts_before: datetime) -> dict[str, int]:
        """Remove expired pending delegations, answered challenges past their expiry and
        passphrase attempts older than ``attempts_before``; how many of each."""
        moment = self._now(now)
        horizon = _aware(attempts_before, "attempts_before")
        counts: dict[str, int] = {}
        with self._transaction(write=True) as session:
            for label, stmt in (
                (
                    "pending",
                    delete(PendingDelegationRow).where(PendingDelegationRow.expires_at <= moment),
                ),
                (
                    "challenges",
                    delete(UsedChallengeRow).where(UsedChallengeRow.expires_at <= moment),
                ),
                (
                    "attempts",
                    delete(PassphraseAttemptRow).where(PassphraseAttemptRow.time < horizon),
                ),
            ):
                counts[label] = int(getattr(session.execute(stmt), "rowcount", 0) or 0)
        return counts

    def count_pending(self, requester_dn: str, *, now: datetime) -> int:
        """Unexpired pending delegations of one requester."""
        moment = self._now(now)
        stmt = (
            select(func.count())
            .select_from(PendingDelegationRow)
            .where(
                PendingDelegationRow.requester_dn == _dn(requester_dn, "requester DN"),
                PendingDelegationRow.expires_at > moment,
            )
        )
        with self._transaction(write=False) as session:
            return int(session.execute(stmt).scalar_one())

    # -- shared secrets and single-use challenges ----------------------------

    def shared_secret(self, name: str, *, now: datetime, length: int = 32) -> bytes:
        """The secret ``name`` every process of the deployment shares; the first caller
        creates it (a primary key decides a race: the loser reads the winner's)."""
        name = _text(name, "secret name", 64)
        stmt = select(ServiceSecretRow.value).where(ServiceSecretRow.name == name)
        for _ in range(2):
            with self._core(write=False) as conn:
                value = conn.execute(stmt).scalar_one_or_none()
            if value is not None:
                return bytes(value)
            try:
                with self._core(write=True) as conn:
                    conn.execute(
                        insert(ServiceSecretRow),
                        {
                            "name": name,
                            "value": secrets.token_bytes(length),
                            "created_at": self._now(now),
                        },
                    )
            except Conflict as exc:
                if exc.reason != "race":
                    raise
        with self._core(write=False) as conn:
            value = conn.execute(stmt).scalar_one_or_none()
        if value is None:
            raise StoreError(f"the shared secret {name!r} could not be created")
        return bytes(value)

    def use_challenge(self, nonce: str, *, expires_at: datetime) -> None:
        """Mark a challenge answered; AuthenticationError (reason ``challenge_reused``) when
        it was answered before, by any process."""
        nonce = _text(nonce, "challenge nonce", 64)
        try:
            with self._core(write=True) as conn:
                conn.execute(
                    insert(UsedChallengeRow),
                    {"nonce": nonce, "expires_at": _aware(expires_at, "expires_at")},
                )
        except Conflict as exc:
            if exc.reason != "race":
                raise
            raise AuthenticationError(
                "this renewal challenge was already used; ask for a new one",
                reason="challenge_reused",
            ) from None

    # -- passphrase attempts (the throttle) ----------------------------------

    def reserve_passphrase_attempt(
        self,
        *,
        username: str,
        credential_name: str,
        client_address: str | None,
        since: datetime,
        limit: int,
        now: datetime,
    ) -> tuple[int | None, int]:
        """Count the tries for one credential from one address since ``since`` (failed
        ones and ones still running) and, below ``limit``, reserve one more, all in one
        serialised transaction. Returns (the reservation's id or None, the count before)."""
        username, credential_name = _username(username), _credname(credential_name)
        moment = self._now(now)
        model = PassphraseAttemptRow
        where = [
            model.username == username,
            model.credential_name == credential_name,
            model.time >= _aware(since, "since"),
            model.client_address.is_(None)
            if client_address is None
            else model.client_address == client_address,
        ]
        with self._transaction(write=True) as session:
            self._serialise(session, f"passphrase:{username}/{credential_name}")
            count = int(
                session.execute(select(func.count()).select_from(model).where(*where)).scalar_one()
            )
            if count >= limit:
                return None, count
            row = PassphraseAttemptRow(
                username=username,
                credential_name=credential_name,
                client_address=client_address,
                time=moment,
                state="pending",
            )
            session.add(row)
            session.flush()
            return int(row.id), count

    def finish_passphrase_attempt(self, attempt_id: int, *, failed: bool) -> None:
        """A reserved try ended: a failure keeps counting, a success frees its place."""
        model = PassphraseAttemptRow
        with self._transaction(write=True) as session:
            if failed:
                session.execute(update(model).where(model.id == attempt_id).values(state="failed"))
            else:
                session.execute(delete(model).where(model.id == attempt_id))

    # -- audit -------------------------------------------------------------

    def add_audit(self, event: AuditEvent, *, now: datetime) -> int:
        values = _audit_values(event, self._now(now))
        with self._core(write=True) as conn:
            key = conn.execute(insert(AuditEventRow), values).inserted_primary_key
            if key is None:  # every supported dialect reports it; never a silent 0
                raise StoreError("the database did not report the new audit row's id")
            return int(key[0])

    def count_audit(
        self,
        *,
        username: str,
        credential_name: str,
        client_address: str | None,
        reason_prefix: str,
        since: datetime,
    ) -> int:
        """Audit rows for one credential and client address since ``since`` whose reason
        starts with ``reason_prefix`` (e.g. the wrong passphrases the throttle counts)."""
        table = AuditEventRow.__table__
        stmt = (
            select(func.count())
            .select_from(table)
            .where(
                table.c.username == username,
                table.c.credential_name == credential_name,
                table.c.time >= _aware(since, "since"),
                table.c.reason.startswith(reason_prefix, autoescape=True),
            )
        )
        stmt = stmt.where(
            table.c.client_address.is_(None)
            if client_address is None
            else table.c.client_address == client_address
        )
        with self._core(write=False) as conn:
            return int(conn.execute(stmt).scalar_one())

    def query_audit(
        self,
        *,
        owner_dn: str | None = None,
        job_id: str | None = None,
        action: str | None = None,
        username: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[AuditRecord]:
        if (
            not isinstance(limit, int)
            or isinstance(limit, bool)
            or not 1 <= limit <= MAX_AUDIT_LIMIT
        ):
            raise InputError(f"limit must be between 1 and {MAX_AUDIT_LIMIT}")
        stmt = select(AuditEventRow)
        if owner_dn is not None:
            stmt = stmt.where(AuditEventRow.owner_dn == owner_dn)
        if job_id is not None:
            stmt = stmt.where(AuditEventRow.job_id == job_id)
        if action is not None:
            stmt = stmt.where(AuditEventRow.action == action)
        if username is not None:
            stmt = stmt.where(AuditEventRow.username == username)
        if since is not None:
            stmt = stmt.where(AuditEventRow.time >= _aware(since, "since"))
        stmt = stmt.order_by(AuditEventRow.time.desc(), AuditEventRow.id.desc()).limit(limit)
        with self._transaction(write=False) as session:
            return [audit_record(row) for row in session.scalars(stmt)]
