"""A real OAuth2 / OIDC token issuer on loopback, built with authlib, for the tests.

Per instance: fresh RS256 and ES256 signing keys, a discovery document, a JWKS,
the refresh_token grant with rotation (an old refresh token used again is
refused *and* its whole family is revoked, as WLCG IAM does) and the device-code
flow. Access tokens are WLCG-profile JWTs (``wlcg.ver``, ``scope``,
``wlcg.groups``). Tests approve a device code through ``/approve`` (the user at
the browser) and mint arbitrary tokens with :meth:`TestIssuer.mint`.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import ClientMixin, grants
from authlib.oauth2.rfc6749.errors import InvalidGrantError
from authlib.oauth2.rfc8628 import (
    DeviceAuthorizationEndpoint,
    DeviceCodeGrant,
    DeviceCredentialDict,
)
from flask import Flask, jsonify, request
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey
from werkzeug.serving import make_server

CLIENT_ID = "credential-broker"
CLIENT_SECRET = "broker-secret"
AUDIENCE = "https://broker.test"


@dataclass
class Client(ClientMixin):
    client_id: str
    client_secret: str
    scope: str

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str:
        return ""

    def get_allowed_scope(self, scope: str) -> str:
        allowed = set(self.scope.split())
        return " ".join(s for s in scope.split() if s in allowed)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return False

    def check_client_secret(self, client_secret: str) -> bool:
        return secrets.compare_digest(client_secret, self.client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method in ("client_secret_basic", "client_secret_post")

    def check_response_type(self, response_type: str) -> bool:
        return False

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in ("refresh_token", "urn:ietf:params:oauth:grant-type:device_code")


@dataclass
class RefreshToken:
    token: str
    user: str
    scope: str
    family: str
    revoked: bool = False

    def get_scope(self) -> str:
        return self.scope

    def check_client(self, client: Any) -> bool:
        return True

    def is_expired(self) -> bool:
        return False

    def is_revoked(self) -> bool:
        return self.revoked


@dataclass
class IssuerState:
    refresh: dict[str, RefreshToken] = field(default_factory=dict)
    families_revoked: set[str] = field(default_factory=set)
    device: dict[str, DeviceCredentialDict] = field(default_factory=dict)
    approvals: dict[str, tuple[str, bool]] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)
    refresh_requests: int = 0
    down: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class TestIssuer:
    __test__ = False

    def __init__(self, *, access_lifetime: int = 600, tls: tuple[str, str] | None = None) -> None:
        self.rsa = RSAKey.generate_key(
            2048, parameters={"kid": "rsa-" + secrets.token_hex(4), "use": "sig", "alg": "RS256"}
        )
        self.ec = ECKey.generate_key(
            "P-256", parameters={"kid": "ec-" + secrets.token_hex(4), "use": "sig", "alg": "ES256"}
        )
        self.state = IssuerState()
        self.access_lifetime = access_lifetime
        self.scopes = (
            "openid offline_access compute.read compute.modify storage.read:/ "
            "storage.create:/ wlcg.groups"
        )
        self.app = self._make_app()
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
        context = None
        if tls is not None:  # (certificate, key) files: serve https
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
        self._server = make_server("127.0.0.1", 0, self.app, threaded=True, ssl_context=context)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> TestIssuer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.rsa.as_dict(private=False), self.ec.as_dict(private=False)]}

    def mint(
        self,
        *,
        sub: str = "pilot-1",
        scope: str | None = "compute.read",
        aud: Any = AUDIENCE,
        groups: list[str] | None = None,
        lifetime: int = 600,
        key: Any = None,
        alg: str = "RS256",
        header: dict[str, Any] | None = None,
        iss: str | None = None,
        now: int | None = None,
        **extra: Any,
    ) -> str:
        now = int(time.time()) if now is None else now
        claims: dict[str, Any] = {
            "iss": self.url if iss is None else iss,
            "sub": sub,
            "aud": aud,
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "jti": secrets.token_hex(8),
            "wlcg.ver": "1.0",
            "scope": scope,
        }
        if groups is not None:
            claims["wlcg.groups"] = groups
        claims.update(extra)
        claims = {k: v for k, v in claims.items() if v is not None}  # None: leave the claim out
        signer = key or (self.ec if alg.startswith("ES") else self.rsa)
        head = {"alg": alg, "kid": signer.kid, "typ": "JWT", **(header or {})}
        return jwt.encode(head, claims, signer, algorithms=[alg])

    def issue_refresh_token(self, user: str, scope: str) -> str:
        value = secrets.token_urlsafe(32)
        with self.state.lock:
            self.state.refresh[value] = RefreshToken(value, user, scope, family=value)
        return value

    # ------------------------------------------------------------------ app

    def _make_app(self) -> Flask:
        app = Flask("test-issuer")
        state = self.state
        client = Client(CLIENT_ID, CLIENT_SECRET, self.scopes)
        issuer = self

        def generate(
            grant_type: str,
            client: Any,
            user: Any = None,
            scope: Any = None,
            expires_in: Any = None,
            include_refresh_token: bool = True,
        ) -> dict[str, Any]:
            groups = state.groups.get(str(user), [])
            access = issuer.mint(
                sub=str(user), scope=scope or "", groups=groups, lifetime=issuer.access_lifetime
            )
            token = {
                "token_type": "Bearer",
                "access_token": access,
                "expires_in": issuer.access_lifetime,
                "scope": scope or "",
            }
            if include_refresh_token:
                token["refresh_token"] = secrets.token_urlsafe(32)
            return token

        def save_token(token: dict[str, Any], req: Any) -> None:
            if "refresh_token" not in token:
                return
            old = getattr(req, "refresh_token", None)
            with state.lock:
                if isinstance(old, RefreshToken):
                    # Rotation keeps the family's full grant, whatever the narrowed request.
                    entry = RefreshToken(token["refresh_token"], old.user, old.scope, old.family)
                else:
                    entry = RefreshToken(
                        token["refresh_token"],
                        str(req.user),
                        token.get("scope") or "",
                        token["refresh_token"],
                    )
                state.refresh[entry.token] = entry

        server = AuthorizationServer(
            app,
            query_client=lambda cid: client if cid == CLIENT_ID else None,
            save_token=save_token,
        )
        server.register_token_generator("default", generate)

        class Refresh(grants.RefreshTokenGrant):
            INCLUDE_NEW_REFRESH_TOKEN = True
            TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]

            def authenticate_refresh_token(self, refresh_token: str) -> RefreshToken | None:
                with state.lock:
                    state.refresh_requests += 1
                    entry = state.refresh.get(refresh_token)
                    if entry is None:
                        return None
                    if entry.revoked or entry.family in state.families_revoked:
                        # Replay of a rotated token: revoke the whole family.
                        state.families_revoked.add(entry.family)
                        raise InvalidGrantError("refresh token already used; family revoked")
                    return entry

            def authenticate_user(self, refresh_token: RefreshToken) -> str:
                return refresh_token.user

            def revoke_old_credential(self, refresh_token: RefreshToken) -> None:
                with state.lock:
                    refresh_token.revoked = True

        class Device(DeviceCodeGrant):
            TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]

            def query_device_credential(self, device_code: str) -> Any:
                return state.device.get(device_code)

            def query_user_grant(self, user_code: str) -> Any:
                return state.approvals.get(user_code)

            def should_slow_down(self, credential: Any) -> bool:
                return False

        class DeviceEndpoint(DeviceAuthorizationEndpoint):
            CLIENT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]
            INTERVAL = 1

            def get_verification_uri(self) -> str:
                return issuer.url + "/device"

            def save_device_credential(
                self, client_id: str, scope: str, data: dict[str, Any]
            ) -> None:
                entry = DeviceCredentialDict(
                    client_id=client_id,
                    scope=scope,
                    **data,
                    expires_at=int(time.time()) + data["expires_in"],
                )
                state.device[data["device_code"]] = entry

        server.register_grant(Refresh)
        server.register_grant(Device)
        server.register_endpoint(DeviceEndpoint)

        @app.before_request
        def _down() -> Any:
            if state.down:
                return jsonify({"error": "temporarily_unavailable"}), 503
            return None

        @app.get("/.well-known/openid-configuration")
        def discovery() -> Any:
            return jsonify(
                {
                    "issuer": issuer.url,
                    "jwks_uri": issuer.url + "/jwks",
                    "token_endpoint": issuer.url + "/token",
                    "device_authorization_endpoint": issuer.url + "/device_authorization",
                    "grant_types_supported": [
                        "refresh_token",
                        "urn:ietf:params:oauth:grant-type:device_code",
                    ],
                }
            )

        @app.get("/jwks")
        def jwks() -> Any:
            return jsonify(issuer.jwks())

        @app.post("/token")
        def token() -> Any:
            return server.create_token_response()

        @app.post("/device_authorization")
        def device_authorization() -> Any:
            return server.create_endpoint_response("device_authorization")

        @app.post("/approve")
        def approve() -> Any:
            user_code = request.form["user_code"]
            state.approvals[user_code] = (
                request.form["user"],
                request.form.get("approve", "yes") == "yes",
            )
            return jsonify({"ok": True})

        return app
