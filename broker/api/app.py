"""The REST API: a thin Flask edge over :class:`broker.service.BrokerService`.

Identity comes only from the TLS layer: the verified chain of the client's
certificate or proxy, read from the socket gunicorn hands over
(:mod:`broker.api.identity`, the one seam tests replace).  When the chain is not
available (a resumed session, a plain-HTTP request) the request is refused:
fail closed.  The routes live in blueprints (:mod:`broker.api.routes`, PAM,
tokens, admin); this module wires them with the request hooks and error answers.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from flask import Flask, Response, g, jsonify, request
from prometheus_client import CollectorRegistry, Counter, Histogram
from werkzeug.exceptions import HTTPException, NotFound

from broker.admin_service import AdminSettings
from broker.api.body import MAX_BODY
from broker.api.identity import ChainSource, requester, tls_chain, use_chain_source
from broker.api.routes import (
    HousekeepingCollector,
    credentials_blueprint,
    delegations_blueprint,
    info_blueprint,
    issuance_blueprint,
)
from broker.errors import BrokerError
from broker.onlineca import OnlineCa
from broker.pam_auth import PamSettings
from broker.service import BrokerService, Requester

log = logging.getLogger("broker.api")

# What a client's own X-Request-Id may contain to be logged beside the server's id.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,64}")


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "broker_requests",
            "REST requests by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "broker_request_seconds",
            "REST request latency",
            ["endpoint"],
            registry=self.registry,
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1, 5),
        )


# The only paths that end in "/": the root and the admin page's index (a browser address).
_SLASH_PATHS = frozenset({"/", "/admin/"})


def create_app(
    service: BrokerService,
    *,
    pam: PamSettings | None = None,
    online_ca: OnlineCa | None = None,
    admin: AdminSettings | None = None,
    peer_chain: ChainSource = tls_chain,
) -> Flask:
    """The WSGI app over ``service``.

    ``peer_chain`` is where callers' verified chains come from: the TLS socket in
    production; in-process tests pass a function returning the chain they want.
    """
    app = Flask("broker")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    use_chain_source(app, peer_chain)
    # Werkzeug answers "//v1/x" (merged slashes) and "/rule/" mismatches with a 308 redirect
    # and an HTML body; this API has one spelling per path and answers everything else 404 JSON
    # (see _start: the matcher still ignores empty segments, so those are refused there).
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    metrics = _Metrics()
    metrics.registry.register(HousekeepingCollector(service))
    _install_hooks(app, metrics)
    _install_error_answers(app)

    app.register_blueprint(info_blueprint(service, metrics.registry))
    app.register_blueprint(delegations_blueprint(service))
    app.register_blueprint(issuance_blueprint(service))
    app.register_blueprint(credentials_blueprint(service))

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
        from broker.api.body import json_body
        from broker.api.token_routes import token_blueprint

        def token_requester(*, bearer: bool = False) -> Requester:
            return requester(service, bearer=bearer)

        app.register_blueprint(token_blueprint(service, token_requester, json_body))

    return app


def _install_hooks(app: Flask, metrics: _Metrics) -> None:
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


def _install_error_answers(app: Flask) -> None:
    @app.errorhandler(BrokerError)
    def _broker_error(exc: BrokerError) -> tuple[Response, int]:
        if exc.http_status >= 500:
            log.error("request %s failed: %s", g.get("request_id"), exc.message)
        return jsonify(exc.to_json()), exc.http_status

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        code = exc.code or 500
        names = {404: "not_found", 405: "method_not_allowed", 413: "too_large", 400: "bad_request"}
        message = {
            404: f"there is no endpoint {request.path}; see /v1/openapi.json",
            405: f"{request.method} is not allowed on {request.path}",
            413: f"the request body is larger than {MAX_BODY} bytes",
        }.get(code, exc.description or "bad request")
        return jsonify({"error": names.get(code, "http_error"), "message": message}), code

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("request %s: unexpected error", g.get("request_id"))
        return jsonify(
            {
                "error": "internal",
                "message": "an internal error occurred; the "
                f"administrator can find request {g.get('request_id')} in the log",
            }
        ), 500
