"""Index audit rows by credential and time (the passphrase throttle counts recent failures).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

_NAME = "ix_audit_events_username_credential_name_time"


def upgrade() -> None:
    op.create_index(_NAME, "audit_events", ["username", "credential_name", "time"])


def downgrade() -> None:
    op.drop_index(_NAME, table_name="audit_events")
