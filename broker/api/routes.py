"""The REST routes of the certificate-authenticated API, as blueprints bound to a service.

``create_app`` registers them; each route reads its caller through
:func:`broker.api.identity.requester` and its body through :mod:`broker.api.body`,
and answers the shapes of :mod:`broker.api.serialize`.
"""

from __future__ import annotations

import base64
from datetime import timedelta
from importlib import resources
from typing import Any

from flask import Blueprint, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from broker.api.body import flag, hours, json_body, pem, strings, text
from broker.api.identity import requester
from broker.api.serialize import credential_json, issued_json, pending_json
from broker.delegation import DelegationOptions
from broker.errors import InputError, StoreUnavailable
from broker.observability import aggregated_registry
from broker.service import BrokerService


class HousekeepingCollector:
    """The service's housekeeping totals (purged pending delegations, aggregated
    refusals, ...) as counters, read at scrape time."""

    def __init__(self, service: BrokerService) -> None:
        self._service = service

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(
            "broker_housekeeping", "Housekeeping totals of this worker process", labels=["what"]
        )
        for what, value in sorted(self._service.counters().items()):
            family.add_metric([what], value)
        yield family


def info_blueprint(service: BrokerService, registry: CollectorRegistry) -> Blueprint:
    """Health, metrics, the OpenAPI document and whoami."""
    bp = Blueprint("info", __name__)

    @bp.get("/healthz")
    def healthz() -> tuple[Response, int]:
        try:
            service.health()
        except StoreUnavailable as exc:
            return jsonify({"status": "unavailable", "message": exc.message}), 503
        return jsonify({"status": "ok"}), 200

    @bp.get("/metrics")
    def metrics_view() -> Response:
        # Every worker's and endpoint's counters when broker serve set up multiprocess mode.
        combined = aggregated_registry()
        if combined is not None:
            combined.register(HousekeepingCollector(service))
        return Response(generate_latest(combined or registry), mimetype=CONTENT_TYPE_LATEST)

    @bp.get("/v1/openapi.json")
    def openapi() -> Response:
        document = resources.files("broker.api").joinpath("openapi.json").read_text()
        return Response(document, mimetype="application/json")

    @bp.get("/v1/whoami")
    def whoami() -> Response:
        who = requester(service, bearer=True)
        if who.token is not None:
            return jsonify(
                {
                    "identity": who.label,
                    "token": {
                        "issuer": who.token.issuer,
                        "subject": who.token.subject,
                        "groups": list(who.token.groups),
                        "scopes": list(who.token.scopes),
                    },
                }
            )
        return jsonify({"identity": who.dn, "fqans": list(who.fqans), "limited": who.limited})

    return bp


def delegations_blueprint(service: BrokerService) -> Blueprint:
    """Storing a credential: the broker makes the key, the owner signs its CSR."""
    bp = Blueprint("delegations", __name__)

    @bp.post("/v1/delegations")
    def start_delegation() -> tuple[Response, int]:
        who = requester(service)
        body = json_body()
        options = DelegationOptions(
            username=text(body, "username", required=True, max_len=128) or "",
            name=text(body, "name", default="default", max_len=128) or "default",
            stored_lifetime=hours(body, "stored_hours", 168),
            max_proxy_lifetime=hours(body, "max_proxy_hours", 12),
            retrievers=strings(body, "retrievers"),
            trusted_retrievers=strings(body, "trusted_retrievers"),
            renewers=strings(body, "renewers"),
            description=text(body, "description", max_len=1024),
        )
        return jsonify(pending_json(service.start_delegation(who, options))), 201

    @bp.put("/v1/delegations/<delegation_id>")
    def finish_delegation(delegation_id: str) -> tuple[Response, int]:
        who = requester(service)
        body = json_body()
        summary = service.finish_delegation(
            who,
            delegation_id,
            pem(body, "chain"),
            passphrase=text(body, "passphrase", max_len=1024),
        )
        return jsonify(credential_json(summary, service.now())), 201

    return bp


def _lifetime(body: dict[str, Any]) -> timedelta | None:
    return hours(body, "lifetime_hours", 12) if "lifetime_hours" in body else None


def _owner(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "username": text(body, "username", max_len=128),
        "owner_dn": text(body, "owner", max_len=1024),
        "name": text(body, "name", default="default", max_len=128) or "default",
    }


def issuance_blueprint(service: BrokerService) -> Blueprint:
    """Proxies from stored credentials: retrievals and renewals (one response shape)."""
    bp = Blueprint("issuance", __name__)

    @bp.post("/v1/retrievals")
    def retrieve() -> Response:
        who = requester(service, bearer=True)
        body = json_body()
        issued = service.retrieve(
            who,
            csr_pem=pem(body, "csr"),
            lifetime=_lifetime(body),
            job_id=text(body, "job_id", max_len=256),
            passphrase=text(body, "passphrase", max_len=1024),
            limited=flag(body, "limited"),
            **_owner(body),
        )
        return jsonify(issued_json(issued))

    @bp.get("/v1/renewals/challenge")
    def renewal_challenge() -> Response:
        who = requester(service)
        return jsonify({"challenge": service.renewal_challenge(who)})

    @bp.post("/v1/renewals")
    def renew() -> Response:
        who = requester(service)
        body = json_body()
        try:
            signature = base64.b64decode(
                text(body, "signature", required=True) or "", validate=True
            )
        except ValueError as exc:
            raise InputError("the field 'signature' must be base64", reason="bad_field") from exc
        issued = service.renew(
            who,
            csr_pem=pem(body, "csr"),
            challenge=text(body, "challenge", required=True) or "",
            authz_chain_pem=pem(body, "authz_chain"),
            signature=signature,
            lifetime=_lifetime(body),
            job_id=text(body, "job_id", max_len=256),
            **_owner(body),
        )
        return jsonify(issued_json(issued))

    return bp


def credentials_blueprint(service: BrokerService) -> Blueprint:
    """Listing, destroying and re-keying stored credentials."""
    bp = Blueprint("credentials", __name__)

    @bp.get("/v1/credentials")
    def info() -> Response:
        who = requester(service)
        username = request.args.get("username") or None
        name = request.args.get("name") or None
        summaries = service.info(who, username=username, name=name)
        now = service.now()
        return jsonify(
            {"identity": who.dn, "credentials": [credential_json(s, now) for s in summaries]}
        )

    @bp.delete("/v1/credentials/<username>/<name>")
    def destroy(username: str, name: str) -> Response:
        who = requester(service)
        summary = service.destroy(who, username=username, name=name)
        return jsonify({"destroyed": credential_json(summary, service.now())})

    @bp.post("/v1/credentials/<username>/<name>/passphrase")
    def change_passphrase(username: str, name: str) -> Response:
        who = requester(service)
        body = json_body()
        summary = service.change_passphrase(
            who,
            username=username,
            name=name,
            old=text(body, "old", max_len=1024),
            new=text(body, "new", max_len=1024),
        )
        return jsonify(credential_json(summary, service.now()))

    return bp
