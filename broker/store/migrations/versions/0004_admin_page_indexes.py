"""Indexes for the admin page: audit rows by requester and by decision, credentials by expiry.

The admin page filters the audit trail by requester DN, counts allowed
retrievals and refusals per time bucket for its chart, and lists or counts the
credentials that expire soon; without these indexes each is a full scan (1e6
audit rows, 1e5 credentials).  ``(decision, action, time)`` covers the chart's
counts: each bucket is one index range, no table row is read.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

_REQUESTER = "ix_audit_events_requester_dn"
_NOT_AFTER = "ix_credentials_not_after"
_DECISION = "ix_audit_events_decision_action_time"


def upgrade() -> None:
    op.create_index(_REQUESTER, "audit_events", ["requester_dn"])
    op.create_index(_NOT_AFTER, "credentials", ["not_after"])
    op.create_index(_DECISION, "audit_events", ["decision", "action", "time"])


def downgrade() -> None:
    op.drop_index(_DECISION, table_name="audit_events")
    op.drop_index(_NOT_AFTER, table_name="credentials")
    op.drop_index(_REQUESTER, table_name="audit_events")
