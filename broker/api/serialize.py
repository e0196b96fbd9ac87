"""The REST API's JSON shapes of the service's results (the wire format lives here only)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from broker.service import CredentialSummary, IssuedProxy, PendingInfo


def credential_json(summary: CredentialSummary, now: datetime) -> dict[str, Any]:
    """A stored credential as ``GET /v1/credentials`` and friends show it."""
    return {
        "owner": summary.owner_dn,
        "username": summary.username,
        "name": summary.name,
        "description": summary.description,
        "not_after": summary.not_after.isoformat(),
        "timeleft": max(int((summary.not_after - now).total_seconds()), 0),
        "retrievers": list(summary.retrievers),
        "trusted_retrievers": list(summary.trusted_retrievers),
        "renewers": list(summary.renewers),
        "max_proxy_lifetime": summary.max_proxy_lifetime,
        "limited": summary.limited,
        "passphrase_protected": summary.passphrase_protected,
        "created_at": summary.created_at.isoformat(),
        "updated_at": summary.updated_at.isoformat(),
    }


def issued_json(issued: IssuedProxy) -> dict[str, Any]:
    """A proxy the broker issued: one shape for retrievals, renewals and PAM retrievals."""
    return {
        "chain": issued.pem().decode(),
        "owner": issued.owner_dn,
        "username": issued.username,
        "name": issued.name,
        "lifetime": int(issued.lifetime.total_seconds()),
        "limited": issued.limited,
    }


def pending_json(pending: PendingInfo) -> dict[str, Any]:
    """A started delegation: the CSR the owner signs and when the offer lapses."""
    return {
        "id": pending.id,
        "csr": pending.csr_pem.decode(),
        "expires_at": pending.expires_at.isoformat(),
    }
