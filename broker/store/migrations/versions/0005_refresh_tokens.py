"""Stored OAuth2 refresh tokens (issue 16), encrypted like private keys.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from broker.store.migrations.columns import envelope_columns

revision = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    tz = sa.DateTime(timezone=True)
    op.create_table(
        "refresh_tokens",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("owner_dn", sa.String(1024), nullable=False),
        sa.Column("username", sa.String(255), nullable=False),
        sa.Column("issuer", sa.String(64), nullable=False),
        sa.Column("scopes", sa.JSON(), nullable=False),
        sa.Column("rotations", sa.Integer(), nullable=False),
        sa.Column("created_at", tz, nullable=False),
        sa.Column("updated_at", tz, nullable=False),
        *envelope_columns(),
        sa.PrimaryKeyConstraint("id", name="pk_refresh_tokens"),
        sa.UniqueConstraint("username", "issuer", name="uq_refresh_tokens_username_issuer"),
    )
    op.create_index("ix_refresh_tokens_owner_dn", "refresh_tokens", ["owner_dn"])
    op.create_index("ix_refresh_tokens_master_key_id", "refresh_tokens", ["master_key_id"])


def downgrade() -> None:
    op.drop_index("ix_refresh_tokens_master_key_id", table_name="refresh_tokens")
    op.drop_index("ix_refresh_tokens_owner_dn", table_name="refresh_tokens")
    op.drop_table("refresh_tokens")
