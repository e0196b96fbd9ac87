"""The REST API: a thin Flask edge over :class:`broker.service.BrokerService`.

Identity comes only from the TLS layer: the verified chain of the client's
certificate or proxy, read from the socket gunicorn hands over.  When the chain
is not available (a resumed session, a plain-HTTP request) the request is
refused: fail closed.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import ssl
import time
import uuid
from datetime import timedelta
from importlib import resources
from typing import Any

from cryptography import x509
from flask import Flask, Response, g, jsonify, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from werkzeug.exceptions import HTTPException, NotFound

from broker.admin_service import AdminSettings
from broker.errors import (
    AuthenticationError,
    BrokerError,
    InputError,
    PayloadTooLarge,
    StoreUnavailable,
)
from broker.observability import aggregated_registry
from broker.onlineca import OnlineCa
from broker.pam_auth import PamSettings
from broker.pki.loading import MAX_PEM_SIZE
from broker.service import BrokerService, DelegationOptions, Requester

log = logging.getLogger("broker.api")

MAX_BODY = 128 * 1024
# No request of this API nests deeper than a few levels; the cap is checked on the raw bytes
# before json.loads, whose recursion would otherwise fail (a 500) on "[[[[..." 60k deep.
MAX_JSON_DEPTH = 32
_MAX_HOURS = 24 * 366
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKETS = re.compile(rb"[\[\]{}]")
# What a client's own X-Request-Id may contain to be logged beside the server's id.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,64}")


def _peer_chain() -> list[x509.Certificate] | None:
    sock = request.environ.get("gunicorn.socket")
    if not isinstance(sock, ssl.SSLSocket):
        return None
    if hasattr(sock, "get_verified_chain"):  # Python 3.13+
        raw = sock.get_verified_chain()
        ders = [c.public_bytes(ssl._ssl.ENCODING_DER) for c in raw] if raw else []  # type: ignore[attr-defined]
    else:
        sslobj = getattr(sock, "_sslobj", None)
        chain = sslobj.get_verified_chain() if sslobj is not None else None
        if not chain:
            return None
        ders = [c.public_bytes(ssl._ssl.ENCODING_DER) for c in chain]  # type: ignore[attr-defined]
    return [x509.load_der_x509_certificate(d) for d in ders]


class _HousekeepingCollector:
    """The service's housekeeping totals (purged pending delegations, aggregated
    refusals, ...) as counters, read at scrape time."""

    def __init__(self, service: BrokerService) -> None:
        self._service = service

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily("broker_housekeeping", "Housekeeping totals of this "
                                     "worker process", labels=["what"])
        for what, value in sorted(self._service.counters().items()):
            family.add_metric([what], value)
        yield family


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("broker_requests", "REST requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("broker_request_seconds", "REST request latency",
                                 ["endpoint"], registry=self.registry,
                                 buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1, 5))


def json_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in ``raw`` (brackets inside strings do not count)."""
    depth = deepest = 0
    for match in _JSON_BRACKETS.finditer(_JSON_STRING.sub(b'""', raw)):
        if match.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _json_body() -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise PayloadTooLarge(f"the request body is larger than {MAX_BODY} bytes")
    raw = request.get_data(cache=False)
    if len(raw) > MAX_BODY:
        raise PayloadTooLarge(f"the request body is larger than {MAX_BODY} bytes")
    if not raw:
        return {}
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise InputError(f"the request body nests deeper than {MAX_JSON_DEPTH} levels",
                         reason="bad_json")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"the request body is not valid JSON: {exc}", reason="bad_json") from exc
    if not isinstance(body, dict):
        raise InputError("the request body must be a JSON object", reason="bad_json")
    return body


def _str(body: dict[str, Any], key: str, *, required: bool = False, default: str | None = None,
         max_len: int = 4096) -> str | None:
    value = body.get(key, default)
    if value is None:
        if required:
            raise InputError(f"the field {key!r} is required", reason="missing_field")
        return None
    if not isinstance(value, str):
        raise InputError(f"the field {key!r} must be a string", reason="bad_field")
    if len(value) > max_len:
        raise InputError(f"the field {key!r} is longer than {max_len} characters",
                         reason="bad_field")
    return value


def _pem(body: dict[str, Any], key: str) -> bytes:
    value = _str(body, key, required=True, max_len=MAX_PEM_SIZE)
    assert value is not None
    try:
        return value.encode("ascii")
    except UnicodeEncodeError as exc:
        raise InputError(f"the field {key!r} must be ASCII PEM text", reason="bad_pem") from exc


def _hours(body: dict[str, Any], key: str, default: float) -> timedelta:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"the field {key!r} must be a number of hours", reason="bad_field")
    if not 0 < value <= _MAX_HOURS:
        raise InputError(f"the field {key!r} must be between 0 and {_MAX_HOURS} hours",
                         reason="bad_field")
    return timedelta(hours=float(value))


def _list(body: dict[str, Any], key: str) -> tuple[str, ...]:
    value = body.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"the field {key!r} must be a list of strings", reason="bad_field")
    if len(value) > 256:
        raise InputError(f"the field {key!r} has more than 256 entries", reason="bad_field")
    return tuple(value)


def _bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise InputError(f"the field {key!r} must be true or false", reason="bad_field")
    return value


# The only paths that end in "/": the root and the admin page's index (a browser address).
_SLASH_PATHS = frozenset({"/", "/admin/"})


def create_app(service: BrokerService, *, pam: PamSettings | None = None,
               online_ca: OnlineCa | None = None, admin: AdminSettings | None = None) -> Flask:
    app = Flask("broker")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    # Werkzeug answers "//v1/x" (merged slashes) and "/rule/" mismatches with a 308 redirect
    # and an HTML body; this API has one spelling per path and answers everything else 404 JSON
    # (see _start: the matcher still ignores empty segments, so those are refused there).
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    metrics = _Metrics()
    metrics.registry.register(_HousekeepingCollector(service))

    def requester(*, bearer: bool = False) -> Requester:
        if bearer:  # only routes that accept pilots' bearer tokens (broker.api.token_routes)
            from broker.api.token_routes import bearer_requester

            who = bearer_requester(service)
            if who is not None:
                return who
        chain = _peer_chain()
        if not chain:
            raise AuthenticationError(
                "the TLS layer gave no verified client chain (a resumed session or no client "
                "certificate); reconnect with your certificate or proxy", reason="no_chain")
        try:
            return service.authenticate_chain(chain, client_address=request.remote_addr,
                                              endpoint="rest", request_id=g.request_id)
        except AuthenticationError as exc:
            # A chain OpenSSL accepted but our RFC 3820 / VOMS checks refused
            # (e.g. a forged AC) leaves an audit row with the reason.
            service.record_refused_authentication(
                exc, chain=chain, client_address=request.remote_addr, request_id=g.request_id)
            raise

    @app.before_request
    def _start() -> None:
        g.request_id = uuid.uuid4().hex
        # gunicorn's PATH_INFO already has "//" folded away; the request line has not.
        path = str(request.environ.get("RAW_URI") or request.path).partition("?")[0]
        if "//" in path or (path.endswith("/") and path not in _SLASH_PATHS):
            raise NotFound()
        # The request id in audit rows and logs is always made here: a client could otherwise
        # pick ids that collide with or impersonate other requests. A well-formed id the client
        # sent is logged beside ours so that the two can be matched.
        g.started = time.perf_counter()
        client_id = request.headers.get("X-Request-Id", "")
        if client_id:
            shown = client_id if _CLIENT_ID.fullmatch(client_id) else "(malformed)"
            log.info("request %s: client request id %s", g.request_id, shown)

    @app.after_request
    def _finish(response: Response) -> Response:
        endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - g.get("started", 0))
        response.headers["X-Request-Id"] = g.get("request_id", "")
        return response

    @app.errorhandler(BrokerError)
    def _broker_error(exc: BrokerError) -> tuple[Response, int]:
        if exc.http_status >= 500:
            log.error("request %s failed: %s", g.get("request_id"), exc.message)
        return jsonify(exc.to_json()), exc.http_status

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        code = exc.code or 500
        names = {404: "not_found", 405: "method_not_allowed", 413: "too_large",
                 400: "bad_request"}
        message = {
            404: f"there is no endpoint {request.path}; see /v1/openapi.json",
            405: f"{request.method} is not allowed on {request.path}",
            413: f"the request body is larger than {MAX_BODY} bytes",
        }.get(code, exc.description or "bad request")
        return jsonify({"error": names.get(code, "http_error"), "message": message}), code

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("request %s: unexpected error", g.get("request_id"))
        return jsonify({"error": "internal", "message": "an internal error occurred; the "
                        f"administrator can find request {g.get('request_id')} in the log"}), 500

    @app.get("/healthz")
    def healthz() -> tuple[Response, int]:
        try:
            service.health()
        except StoreUnavailable as exc:
            return jsonify({"status": "unavailable", "message": exc.message}), 503
        return jsonify({"status": "ok"}), 200

    @app.get("/metrics")
    def metrics_view() -> Response:
        # Every worker's and endpoint's counters when broker serve set up multiprocess mode.
        combined = aggregated_registry()
        if combined is not None:
            combined.register(_HousekeepingCollector(service))
        return Response(generate_latest(combined or metrics.registry),
                        mimetype=CONTENT_TYPE_LATEST)

    @app.get("/v1/openapi.json")
    def openapi() -> Response:
        text = resources.files("broker.api").joinpath("openapi.json").read_text()
        return Response(text, mimetype="application/json")

    @app.get("/v1/whoami")
    def whoami() -> Response:
        who = requester(bearer=True)
        if who.token is not None:
            return jsonify({"identity": who.label, "token": {
                "issuer": who.token.issuer, "subject": who.token.subject,
                "groups": list(who.token.groups), "scopes": list(who.token.scopes)}})
        return jsonify({"identity": who.dn, "fqans": list(who.fqans), "limited": who.limited})

    @app.post("/v1/delegations")
    def start_delegation() -> tuple[Response, int]:
        who = requester()
        body = _json_body()
        options = DelegationOptions(
            username=_str(body, "username", required=True, max_len=128) or "",
            name=_str(body, "name", default="default", max_len=128) or "default",
            stored_lifetime=_hours(body, "stored_hours", 168),
            max_proxy_lifetime=_hours(body, "max_proxy_hours", 12),
            retrievers=_list(body, "retrievers"),
            trusted_retrievers=_list(body, "trusted_retrievers"),
            renewers=_list(body, "renewers"),
            description=_str(body, "description", max_len=1024),
        )
        pending = service.start_delegation(who, options)
        return jsonify({"id": pending.id, "csr": pending.csr_pem.decode(),
                        "expires_at": pending.expires_at.isoformat()}), 201

    @app.put("/v1/delegations/<delegation_id>")
    def finish_delegation(delegation_id: str) -> tuple[Response, int]:
        who = requester()
        body = _json_body()
        summary = service.finish_delegation(who, delegation_id, _pem(body, "chain"),
                                            passphrase=_str(body, "passphrase", max_len=1024))
        return jsonify(summary.to_json(service.now())), 201

    def _lifetime(body: dict[str, Any]) -> timedelta | None:
        return _hours(body, "lifetime_hours", 12) if "lifetime_hours" in body else None

    def _owner(body: dict[str, Any]) -> dict[str, Any]:
        return {
            "username": _str(body, "username", max_len=128),
            "owner_dn": _str(body, "owner", max_len=1024),
            "name": _str(body, "name", default="default", max_len=128) or "default",
        }

    @app.post("/v1/retrievals")
    def retrieve() -> Response:
        who = requester(bearer=True)
        body = _json_body()
        issued = service.retrieve(
            who, csr_pem=_pem(body, "csr"), lifetime=_lifetime(body),
            job_id=_str(body, "job_id", max_len=256),
            passphrase=_str(body, "passphrase", max_len=1024), limited=_bool(body, "limited"),
            **_owner(body),
        )
        return jsonify({"chain": issued.pem().decode(), "owner": issued.owner_dn,
                        "username": issued.username, "name": issued.name,
                        "lifetime": int(issued.lifetime.total_seconds()),
                        "limited": issued.limited})

    @app.get("/v1/renewals/challenge")
    def renewal_challenge() -> Response:
        who = requester()
        return jsonify({"challenge": service.renewal_challenge(who)})

    @app.post("/v1/renewals")
    def renew() -> Response:
        who = requester()
        body = _json_body()
        try:
            signature = base64.b64decode(_str(body, "signature", required=True) or "",
                                         validate=True)
        except ValueError as exc:
            raise InputError("the field 'signature' must be base64", reason="bad_field") from exc
        issued = service.renew(
            who, csr_pem=_pem(body, "csr"), challenge=_str(body, "challenge", required=True) or "",
            authz_chain_pem=_pem(body, "authz_chain"), signature=signature,
            lifetime=_lifetime(body), job_id=_str(body, "job_id", max_len=256), **_owner(body),
        )
        return jsonify({"chain": issued.pem().decode(), "owner": issued.owner_dn,
                        "lifetime": int(issued.lifetime.total_seconds()),
                        "limited": issued.limited})

    @app.get("/v1/credentials")
    def info() -> Response:
        who = requester()
        username = request.args.get("username") or None
        name = request.args.get("name") or None
        summaries = service.info(who, username=username, name=name)
        now = service.now()
        return jsonify({"identity": who.dn, "credentials": [s.to_json(now) for s in summaries]})

    @app.delete("/v1/credentials/<username>/<name>")
    def destroy(username: str, name: str) -> Response:
        who = requester()
        summary = service.destroy(who, username=username, name=name)
        return jsonify({"destroyed": summary.to_json(service.now())})

    @app.post("/v1/credentials/<username>/<name>/passphrase")
    def change_passphrase(username: str, name: str) -> Response:
        who = requester()
        body = _json_body()
        summary = service.change_passphrase(
            who, username=username, name=name, old=_str(body, "old", max_len=1024),
            new=_str(body, "new", max_len=1024))
        return jsonify(summary.to_json(service.now()))

    # Username + password routes (PAM retrieval, online CA); they alone work
    # without a client certificate (the TLS port is CERT_OPTIONAL only when PAM is on).
    if pam is not None:
        from broker.api.pam_routes import pam_blueprint

        app.register_blueprint(pam_blueprint(service, pam, online_ca))

    # The read-only admin page (/admin/), for the policy's admin group only.
    from broker.api.admin import admin_blueprint

    app.register_blueprint(admin_blueprint(service, pam=pam, settings=admin))

    # Bearer tokens and the token broker (issue 16), when [tokens] issuers are configured.
    if getattr(service, "token_directory", None) is not None:
        from broker.api.token_routes import token_blueprint

        app.register_blueprint(token_blueprint(service, requester, _json_body))

    return app
