"""Column definitions that several migrations create alike.

Frozen like the migrations that use them: a migration describes the schema as
it was when written, so nothing here may change once a migration uses it; a
table that needs another shape spells its own columns (or a new function).
"""

from __future__ import annotations

import sqlalchemy as sa


def envelope_columns() -> list[sa.Column[object]]:
    """The encrypted-key columns of every table that holds a secret (see
    :mod:`broker.store.crypto`)."""
    return [
        sa.Column("key_ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("key_nonce", sa.LargeBinary(), nullable=False),
        sa.Column("wrapped_data_key", sa.LargeBinary(), nullable=False),
        sa.Column("master_key_id", sa.String(64), nullable=False),
        sa.Column("passphrase_protected", sa.Boolean(), nullable=False),
        sa.Column("kdf_salt", sa.LargeBinary(), nullable=True),
        sa.Column("kdf_params", sa.JSON(), nullable=True),
    ]


def growing_id_column() -> sa.Column[object]:
    """An ``id`` for a table whose ids grow without bound: BIGINT on PostgreSQL, and on
    SQLite an INTEGER (only an INTEGER PRIMARY KEY is an auto-incrementing rowid)."""
    return sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        autoincrement=True,
        nullable=False,
    )
