"""Usernames as MyProxy accepts them (DNs, long names); owners' key-retriever lists.

Adds ``credentials.key_retrievers`` (MyProxy's KEYRETRIEVERS, ``myproxy-store -E``).

Widens every ``username`` column from 255 to 1,500 characters (the service
limits a username to 1,500 bytes of UTF-8, which keeps the ``(username, name)``
unique key within PostgreSQL's btree entry size).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None

_COLUMNS = (
    ("credentials", False),
    ("pending_delegations", False),
    ("audit_events", True),
    ("passphrase_attempts", False),
    ("refresh_tokens", False),
)


def _resize(old: int, new: int) -> None:
    for table, nullable in _COLUMNS:
        with op.batch_alter_table(table) as batch:
            batch.alter_column(
                "username",
                existing_type=sa.String(old),
                type_=sa.String(new),
                existing_nullable=nullable,
            )


def upgrade() -> None:
    _resize(255, 1500)
    with op.batch_alter_table("credentials") as batch:
        batch.add_column(
            sa.Column("key_retrievers", sa.JSON(), nullable=False, server_default="[]")
        )


def downgrade() -> None:
    with op.batch_alter_table("credentials") as batch:
        batch.drop_column("key_retrievers")
    # Fails on PostgreSQL if a longer username is stored: remove those rows first.
    _resize(1500, 255)
