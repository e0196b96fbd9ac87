"""REST routes for users without grid certificates: username + password checked by PAM.

``POST /v1/pam/retrievals``
    ``{username, password, csr, name?, lifetime_hours?, job_id?, limited?}`` →
    a proxy of the passphrase-less credential stored under ``username``, when
    the site policy allows PAM retrieval (``requester = ["pam:*"]``,
    ``auth = ["pam"]``).  The PAM user can only open credentials stored under
    its own username.
``POST /v1/pam/certificate`` (only with an online CA configured)
    ``{username, password, csr, lifetime_hours?}`` → a short-lived user
    certificate for the CSR's public key (the key never leaves the client).

These routes ignore any client certificate: the requester is the PAM user.
Every refused login leaves an audit row with PAM's own reason, but the client
always gets the same answer (``pam_failed``), so a caller cannot tell an
unknown user from a wrong password.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from flask import Blueprint, Response, jsonify

from broker.api.body import flag, hours, json_body, pem, text
from broker.api.identity import pam_login
from broker.api.serialize import issued_json
from broker.audit import AuditAction
from broker.onlineca import OnlineCa
from broker.pam_auth import PamSettings
from broker.pki.dn import slash_from_name
from broker.pki.proxy import load_csr
from broker.service import BrokerService, Requester


def pam_blueprint(
    service: BrokerService, pam: PamSettings, online_ca: OnlineCa | None = None
) -> Blueprint:
    """The PAM routes, bound to ``service``; register on the app from create_app."""
    bp = Blueprint("pam", __name__)

    def login(body: dict[str, Any], action: AuditAction, **where: Any) -> Requester:
        username = text(body, "username", required=True, max_len=128) or ""
        password = text(body, "password", required=True, max_len=1024) or ""
        return pam_login(service, pam, username, password, action, username=username, **where)

    @bp.post("/v1/pam/retrievals")
    def pam_retrieve() -> Response:
        body = json_body()
        csr_pem = pem(body, "csr")
        name = text(body, "name", default="default", max_len=128) or "default"
        job_id = text(body, "job_id", max_len=256)
        lifetime = hours(body, "lifetime_hours", 12) if "lifetime_hours" in body else None
        limited = flag(body, "limited")
        who = login(body, AuditAction.RETRIEVE, name=name, job_id=job_id)
        issued = service.retrieve(
            who,
            csr_pem=csr_pem,
            username=who.pam_user,
            name=name,
            lifetime=lifetime,
            job_id=job_id,
            limited=limited,
        )
        return jsonify(issued_json(issued))

    if online_ca is None:
        return bp

    ca = online_ca

    @bp.post("/v1/pam/certificate")
    def pam_certificate() -> tuple[Response, int]:
        body = json_body()
        csr = load_csr(pem(body, "csr"))
        max_hours = ca.max_lifetime.total_seconds() / 3600
        lifetime = hours(body, "lifetime_hours", max_hours)
        who = login(body, AuditAction.ISSUE_CERTIFICATE)
        now = service.now()
        cert = service.issue_certificate(who, ca, csr, lifetime=lifetime)
        subject = slash_from_name(cert.subject)
        return jsonify(
            {
                "certificate": cert.public_bytes(Encoding.PEM).decode(),
                "subject": subject,
                "issuer": slash_from_name(cert.issuer),
                "not_after": cert.not_valid_after_utc.isoformat(),
                "lifetime": int((cert.not_valid_after_utc - now).total_seconds()),
            }
        ), 201

    return bp
