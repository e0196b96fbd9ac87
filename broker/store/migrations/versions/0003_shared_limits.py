"""Shared state for limits that must hold across worker processes and nodes.

* ``service_secrets``: the renewal-challenge key, created once, read by every worker;
* ``used_challenges``: answered renewal challenges (single use) until they expire;
* ``passphrase_attempts``: passphrase tries reserved before scrypt runs (the throttle);
* an index on ``pending_delegations (requester_dn, expires_at)`` for the per-user cap.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from broker.store.migrations.columns import growing_id_column

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

_PENDING_INDEX = "ix_pending_delegations_requester_dn_expires_at"


def upgrade() -> None:
    tz = sa.DateTime(timezone=True)
    op.create_table(
        "service_secrets",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", tz, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_service_secrets"),
    )
    op.create_table(
        "used_challenges",
        sa.Column("nonce", sa.String(64), nullable=False),
        sa.Column("expires_at", tz, nullable=False),
        sa.PrimaryKeyConstraint("nonce", name="pk_used_challenges"),
    )
    op.create_index("ix_used_challenges_expires_at", "used_challenges", ["expires_at"])
    op.create_table(
        "passphrase_attempts",
        growing_id_column(),
        sa.Column("username", sa.String(255), nullable=False),
        sa.Column("credential_name", sa.String(255), nullable=False),
        sa.Column("client_address", sa.String(255), nullable=True),
        sa.Column("time", tz, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.CheckConstraint("state IN ('pending', 'failed')", name="ck_passphrase_attempts_state"),
        sa.PrimaryKeyConstraint("id", name="pk_passphrase_attempts"),
    )
    op.create_index(
        "ix_passphrase_attempts_username_credential_name_time",
        "passphrase_attempts",
        ["username", "credential_name", "time"],
    )
    op.create_index(_PENDING_INDEX, "pending_delegations", ["requester_dn", "expires_at"])


def downgrade() -> None:
    op.drop_index(_PENDING_INDEX, table_name="pending_delegations")
    op.drop_index(
        "ix_passphrase_attempts_username_credential_name_time", table_name="passphrase_attempts"
    )
    op.drop_table("passphrase_attempts")
    op.drop_index("ix_used_challenges_expires_at", table_name="used_challenges")
    op.drop_table("used_challenges")
    op.drop_table("service_secrets")
