"""Initial schema: credentials, pending_delegations, audit_events.

Revision ID: 0001
Revises:
Create Date: 2026-11-21

Self-contained on purpose (no import of the models): a migration must keep
describing the schema as it was when written, whatever the models become. The
column helpers it shares with later migrations (``migrations/columns.py``) are
frozen in the same way.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from broker.store.migrations.columns import envelope_columns, growing_id_column

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    tz = sa.DateTime(timezone=True)
    op.create_table(
        "credentials",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("owner_dn", sa.String(1024), nullable=False),
        sa.Column("username", sa.String(255), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("certificate_chain", sa.Text(), nullable=False),
        sa.Column("not_after", tz, nullable=False),
        sa.Column("retrievers", sa.JSON(), nullable=False),
        sa.Column("trusted_retrievers", sa.JSON(), nullable=False),
        sa.Column("renewers", sa.JSON(), nullable=False),
        sa.Column("max_lifetime_seconds", sa.Integer(), nullable=True),
        sa.Column("limited", sa.Boolean(), nullable=False),
        sa.Column("created_at", tz, nullable=False),
        sa.Column("updated_at", tz, nullable=False),
        *envelope_columns(),
        sa.PrimaryKeyConstraint("id", name="pk_credentials"),
        sa.UniqueConstraint("username", "name", name="uq_credentials_username_name"),
    )
    op.create_index("ix_credentials_owner_dn", "credentials", ["owner_dn"])
    op.create_index("ix_credentials_master_key_id", "credentials", ["master_key_id"])

    op.create_table(
        "pending_delegations",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("requester_dn", sa.String(1024), nullable=False),
        sa.Column("username", sa.String(255), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("created_at", tz, nullable=False),
        sa.Column("expires_at", tz, nullable=False),
        *envelope_columns(),
        sa.PrimaryKeyConstraint("id", name="pk_pending_delegations"),
    )
    op.create_index("ix_pending_delegations_expires_at", "pending_delegations", ["expires_at"])
    op.create_index(
        "ix_pending_delegations_master_key_id", "pending_delegations", ["master_key_id"]
    )

    op.create_table(
        "audit_events",
        growing_id_column(),
        sa.Column("time", tz, nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("requester_dn", sa.String(1024), nullable=True),
        sa.Column("requester_fqans", sa.JSON(), nullable=False),
        sa.Column("owner_dn", sa.String(1024), nullable=True),
        sa.Column("username", sa.String(255), nullable=True),
        sa.Column("credential_name", sa.String(255), nullable=True),
        sa.Column("job_id", sa.String(255), nullable=True),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("client_address", sa.String(255), nullable=True),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("endpoint", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_events"),
        sa.CheckConstraint(
            "decision IN ('allow', 'deny', 'error')", name="ck_audit_events_decision"
        ),
        sa.CheckConstraint(
            "endpoint IN ('rest', 'myproxy', 'cli')", name="ck_audit_events_endpoint"
        ),
    )
    op.create_index("ix_audit_events_owner_dn", "audit_events", ["owner_dn"])
    op.create_index("ix_audit_events_job_id", "audit_events", ["job_id"])
    op.create_index("ix_audit_events_time", "audit_events", ["time"])


def downgrade() -> None:
    op.drop_table("audit_events")
    op.drop_table("pending_delegations")
    op.drop_table("credentials")
