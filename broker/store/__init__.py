"""The encrypted credential store: models, envelope encryption, repository, migrations.

The service layer uses :class:`Store` (see :mod:`broker.store.repository` for
the API) and never touches SQLAlchemy directly. Tables are created only by
:func:`migrate`.
"""

from broker.store import tokens as _tokens  # noqa: F401 - registers the refresh_tokens table
from broker.store.crypto import (
    Envelope,
    MasterKeyRing,
    RotationReport,
    init_master_key_file,
    load_master_keys,
    rotate_master_key,
)
from broker.store.engine import default_sqlite_url, make_engine, migrate
from broker.store.repository import (
    DEFAULT_PENDING_TTL,
    AuditEvent,
    AuditRecord,
    CredentialRecord,
    CredentialWrite,
    PendingDelegation,
    Store,
)

__all__ = [
    "DEFAULT_PENDING_TTL",
    "AuditEvent",
    "AuditRecord",
    "CredentialRecord",
    "CredentialWrite",
    "Envelope",
    "MasterKeyRing",
    "PendingDelegation",
    "RotationReport",
    "Store",
    "default_sqlite_url",
    "init_master_key_file",
    "load_master_keys",
    "make_engine",
    "migrate",
    "rotate_master_key",
]
