"""REST routes of the token broker (issue 16) and the bearer-token authentication hook.

``Authorization: Bearer <JWT>`` is honoured only on the routes that pass
``bearer=True`` to the app's ``requester()`` (``/v1/whoami``, ``/v1/retrievals``,
``/v1/tokens/access``); every other route still requires a verified client
certificate chain, whatever the header says.

Routes:

``POST /v1/tokens/refresh-tokens``   owner (certificate) stores a refresh token it holds
``POST /v1/tokens/device``           owner starts the device-code flow with the broker's client
``POST /v1/tokens/device/poll``      owner polls it; on approval the refresh token is stored
``POST /v1/tokens/access``           pilot (bearer token or certificate) gets a job access token
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, g, jsonify, request

from broker.errors import AuthenticationError, InputError
from broker.service import BrokerService, Requester
from broker.store.tokens import RefreshTokenRecord


def bearer_requester(service: BrokerService) -> Requester | None:
    """The requester proven by the Authorization header, or None when there is none."""
    header = request.headers.get("Authorization")
    if header is None or service.token_directory is None:
        return None  # tokens off: the header is ignored and a certificate is required
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise AuthenticationError(
            "the Authorization header must be 'Bearer <token>'", reason="bad_authorization"
        )
    return service.authenticate_bearer(
        value.strip(), client_address=request.remote_addr, endpoint="rest", request_id=g.request_id
    )


def _text(
    body: dict[str, Any], key: str, *, required: bool = False, max_len: int = 1024
) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise InputError(f"the field {key!r} is required", reason="missing_field")
        return None
    if not isinstance(value, str) or len(value) > max_len:
        raise InputError(
            f"the field {key!r} must be a string of at most {max_len} characters",
            reason="bad_field",
        )
    return value


def _scopes(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("scopes", [])
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or len(value) > 64:
        raise InputError(
            "the field 'scopes' must be a list of at most 64 strings", reason="bad_field"
        )
    return tuple(value)


def _record_json(record: RefreshTokenRecord) -> dict[str, Any]:
    return {
        "owner": record.owner_dn,
        "username": record.username,
        "issuer": record.issuer,
        "scopes": list(record.scopes),
        "rotations": record.rotations,
        "updated_at": record.updated_at.isoformat(),
    }


def token_blueprint(
    service: BrokerService,
    requester: Callable[..., Requester],
    json_body: Callable[[], dict[str, Any]],
) -> Blueprint:
    bp = Blueprint("tokens", __name__)

    @bp.post("/v1/tokens/refresh-tokens")
    def store_refresh_token() -> tuple[Response, int]:
        who = requester()
        body = json_body()
        record = service.store_refresh_token(
            who,
            issuer=_text(body, "issuer", required=True, max_len=1024) or "",
            username=_text(body, "username", required=True, max_len=128) or "",
            refresh_token=_text(body, "refresh_token", required=True, max_len=8192) or "",
            scopes=_scopes(body),
        )
        return jsonify(_record_json(record)), 201

    @bp.post("/v1/tokens/device")
    def start_device() -> Response:
        who = requester()
        body = json_body()
        device = service.start_token_device_flow(
            who, issuer=_text(body, "issuer", required=True) or "", scopes=_scopes(body)
        )
        return jsonify(
            {
                "device_code": device.device_code,
                "user_code": device.user_code,
                "verification_uri": device.verification_uri,
                "verification_uri_complete": device.verification_uri_complete,
                "expires_in": device.expires_in,
                "interval": device.interval,
            }
        )

    @bp.post("/v1/tokens/device/poll")
    def poll_device() -> tuple[Response, int]:
        who = requester()
        body = json_body()
        result = service.poll_token_device_flow(
            who,
            issuer=_text(body, "issuer", required=True) or "",
            username=_text(body, "username", required=True, max_len=128) or "",
            device_code=_text(body, "device_code", required=True) or "",
        )
        if isinstance(result, str):
            return jsonify({"status": result}), 202
        return jsonify(_record_json(result)), 201

    @bp.post("/v1/tokens/access")
    def access_token() -> Response:
        who = requester(bearer=True)
        body = json_body()
        token = service.issue_access_token(
            who,
            issuer=_text(body, "issuer", required=True) or "",
            username=_text(body, "username", required=True, max_len=128) or "",
            scopes=_scopes(body),
            audience=_text(body, "audience"),
            job_id=_text(body, "job_id", max_len=256),
        )
        return jsonify(
            {
                "access_token": token.token,
                "issuer": token.issuer,
                "owner": token.owner_dn,
                "username": token.username,
                "scopes": list(token.scopes),
                "audience": token.audience,
                "expires_in": max(0, int((token.expires_at - service.now()).total_seconds())),
            }
        )

    return bp
