"""Talking to token issuers: discovery, JWKS (cached), refresh and device-code grants.

All outbound HTTP goes through :class:`IssuerDirectory` with bounded timeouts,
no redirects (a redirect could leave https) and bounded response sizes. Any
failure to reach an issuer, or an answer that is not what OAuth2 promises, is
:class:`IssuerUnavailable` (HTTP 503) naming the issuer.

JWKS cache: keys fetched from the issuer's ``jwks_uri`` are used for
``jwks_refresh_seconds``; a token signed with a ``kid`` we do not hold causes
one early refetch (key rollover), at most every ``_MIN_REFETCH`` seconds so
that forged kids cannot make us hammer the issuer. Every fetch replaces the
whole set, so keys the issuer dropped are dropped here too. When the issuer
is down, keys fetched within ``_MAX_STALE`` seconds are still used.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from urllib3.exceptions import HTTPError as Urllib3Error  # raised by reading the raw body

from broker.errors import ConfigError
from broker.tokens.errors import IssuerUnavailable, RefreshTokenRevoked, ScopeNotAllowed
from broker.tokens.settings import IssuerConfig, TokenSettings, check_url

_MIN_REFETCH = 30.0
_MAX_STALE = 24 * 3600.0
_MAX_RESPONSE = 512 * 1024


@dataclass(frozen=True)
class Endpoints:
    jwks_uri: str
    token_endpoint: str | None
    device_authorization_endpoint: str | None


@dataclass(frozen=True)
class TokenResponse:
    access_token: str
    refresh_token: str | None
    expires_in: int | None
    scope: str | None


@dataclass(frozen=True)
class DeviceAuthorization:
    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: int
    interval: int


@dataclass
class _Keys:
    keys: KeySet
    fetched: float


class IssuerDirectory:
    """The configured issuers, their endpoints and keys; thread-safe, one per process."""

    def __init__(
        self,
        settings: TokenSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        session: requests.Session | None = None,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._session = session or requests.Session()
        self._session.trust_env = False  # no proxies or netrc from the environment
        self._lock = threading.Lock()
        self._endpoints: dict[str, tuple[Endpoints, float]] = {}
        self._keys: dict[str, _Keys] = {}
        self._last_fetch: dict[str, float] = {}

    # ---------------------------------------------------------------- HTTP

    def _call(
        self, issuer: IssuerConfig, method: str, url: str, what: str, **kwargs: Any
    ) -> requests.Response:
        try:
            check_url(url, insecure_loopback_http=issuer.insecure_loopback_http, what=what)
        except ConfigError as exc:
            raise IssuerUnavailable(
                f"issuer {issuer.name} ({issuer.issuer}) advertises an unusable {what}: "
                f"{exc.message}",
                reason="issuer_unavailable",
            ) from None
        timeout = self.settings.http_timeout_seconds
        try:
            response = self._session.request(
                method,
                url,
                timeout=(timeout, timeout),
                allow_redirects=False,
                stream=True,
                verify=issuer.ca_bundle or True,
                **kwargs,
            )
            try:
                body = response.raw.read(_MAX_RESPONSE + 1, decode_content=True)
            finally:
                response.close()
        except (requests.RequestException, Urllib3Error, OSError) as exc:
            raise IssuerUnavailable(
                f"issuer {issuer.name} ({issuer.issuer}) is unreachable ({what} {url}): "
                f"{type(exc).__name__}",
                reason="issuer_unavailable",
            ) from None
        if len(body) > _MAX_RESPONSE:
            raise IssuerUnavailable(
                f"issuer {issuer.name}: the {what} answer is too large", reason="issuer_unavailable"
            )
        response._content = body
        return response

    def _json(self, issuer: IssuerConfig, response: requests.Response, what: str) -> dict[str, Any]:
        try:
            data = json.loads(response.content)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise IssuerUnavailable(
                f"issuer {issuer.name} ({issuer.issuer}) answered the {what} request with "
                f"HTTP {response.status_code} and no JSON object",
                reason="issuer_unavailable",
            )
        return data

    # ---------------------------------------------------------------- discovery

    def endpoints(self, issuer: IssuerConfig) -> Endpoints:
        now = self._clock()
        with self._lock:
            cached = self._endpoints.get(issuer.name)
        if cached is not None and now - cached[1] < self.settings.jwks_refresh_seconds:
            return cached[0]
        url = issuer.issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            response = self._call(issuer, "GET", url, "discovery document")
            doc = self._json(issuer, response, "discovery")
            if response.status_code != 200:
                raise IssuerUnavailable(
                    f"issuer {issuer.name} ({issuer.issuer}): discovery answered HTTP "
                    f"{response.status_code}",
                    reason="issuer_unavailable",
                )
        except IssuerUnavailable:
            if cached is not None and now - cached[1] < _MAX_STALE:
                return cached[0]
            raise
        if doc.get("issuer") != issuer.issuer:
            raise IssuerUnavailable(
                f"issuer {issuer.name}: the discovery document names issuer "
                f"{doc.get('issuer')!r}, not {issuer.issuer!r}",
                reason="issuer_unavailable",
            )
        jwks_uri = doc.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise IssuerUnavailable(
                f"issuer {issuer.name}: discovery has no jwks_uri", reason="issuer_unavailable"
            )
        token = doc.get("token_endpoint")
        device = doc.get("device_authorization_endpoint")
        found = Endpoints(
            jwks_uri,
            token if isinstance(token, str) else None,
            device if isinstance(device, str) else None,
        )
        with self._lock:
            self._endpoints[issuer.name] = (found, now)
        return found

    # ---------------------------------------------------------------- keys

    def _load_keys(self, issuer: IssuerConfig) -> KeySet:
        if issuer.jwks_file:
            try:
                raw = json.loads(Path(issuer.jwks_file).read_text())
            except (OSError, ValueError) as exc:
                raise IssuerUnavailable(
                    f"issuer {issuer.name}: cannot read the JWKS file {issuer.jwks_file}: {exc}",
                    reason="issuer_unavailable",
                ) from None
        else:
            jwks_uri = self.endpoints(issuer).jwks_uri
            response = self._call(issuer, "GET", jwks_uri, "JWKS")
            raw = self._json(issuer, response, "JWKS")
            if response.status_code != 200:
                raise IssuerUnavailable(
                    f"issuer {issuer.name}: JWKS answered HTTP {response.status_code}",
                    reason="issuer_unavailable",
                )
        if not isinstance(raw, dict) or not isinstance(raw.get("keys"), list):
            raise IssuerUnavailable(
                f"issuer {issuer.name}: the JWKS has no 'keys' list", reason="issuer_unavailable"
            )
        # Only public signing keys with a kid; a symmetric key in a JWKS would let
        # anyone who read the JWKS sign tokens.
        usable = [
            k
            for k in raw["keys"]
            if isinstance(k, dict)
            and k.get("kty") in ("RSA", "EC")
            and isinstance(k.get("kid"), str)
            and "d" not in k
            and k.get("use", "sig") == "sig"
        ]
        try:
            return KeySet.import_key_set({"keys": usable})
        except (JoseError, ValueError, TypeError) as exc:
            raise IssuerUnavailable(
                f"issuer {issuer.name}: bad key in the JWKS: {exc}", reason="issuer_unavailable"
            ) from None

    def keys(self, issuer: IssuerConfig, kid: str) -> KeySet:
        """The issuer's key set, refetched when stale or when ``kid`` is unknown."""
        now = self._clock()
        with self._lock:
            cached = self._keys.get(issuer.name)
            last = self._last_fetch.get(issuer.name, -_MIN_REFETCH * 2)
        fresh = cached is not None and now - cached.fetched < self.settings.jwks_refresh_seconds
        if cached is not None and fresh and _has_kid(cached.keys, kid):
            return cached.keys
        if cached is not None and fresh and now - last < _MIN_REFETCH:
            return cached.keys  # unknown kid, but we asked very recently: no refetch
        with self._lock:
            self._last_fetch[issuer.name] = now
        try:
            keys = self._load_keys(issuer)
        except IssuerUnavailable:
            if cached is not None and now - cached.fetched < _MAX_STALE:
                return cached.keys
            raise
        with self._lock:
            self._keys[issuer.name] = _Keys(keys, now)
        return keys

    # ---------------------------------------------------------------- grants

    def _client_auth(self, issuer: IssuerConfig) -> dict[str, Any]:
        secret = issuer.client_secret()
        if secret is not None:
            return {"auth": (issuer.client_id, secret)}
        return {}

    def _token_endpoint(self, issuer: IssuerConfig) -> str:
        endpoint = self.endpoints(issuer).token_endpoint
        if endpoint is None:
            raise IssuerUnavailable(
                f"issuer {issuer.name}: discovery has no token_endpoint",
                reason="issuer_unavailable",
            )
        return endpoint

    def _post_token(
        self, issuer: IssuerConfig, form: dict[str, str]
    ) -> tuple[requests.Response, dict[str, Any]]:
        """POST a grant to the issuer's token endpoint (with the client's credentials)."""
        response = self._call(
            issuer,
            "POST",
            self._token_endpoint(issuer),
            "token endpoint",
            data=form,
            **self._client_auth(issuer),
        )
        return response, self._json(issuer, response, "token")

    def refresh(
        self,
        issuer: IssuerConfig,
        refresh_token: str,
        *,
        scopes: tuple[str, ...],
        audience: str | None,
    ) -> TokenResponse:
        """Redeem a refresh token for an access token with ``scopes`` (and a rotated refresh
        token when the issuer rotates)."""
        form = {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": issuer.client_id,
        }
        if scopes:
            form["scope"] = " ".join(scopes)
        if audience:
            form["audience"] = audience
        response, data = self._post_token(issuer, form)
        if response.status_code == 200:
            return _token_response(issuer, data)
        error = str(data.get("error", ""))
        if error == "invalid_grant":
            raise RefreshTokenRevoked(
                f"issuer {issuer.name} refused the stored refresh token (revoked, expired or "
                f"already used); its owner must run `broker-init --token-issuer {issuer.name}` "
                "again",
                reason="refresh_token_revoked",
            )
        if error == "invalid_scope":
            raise ScopeNotAllowed(
                f"issuer {issuer.name} refused the scopes {' '.join(scopes)!r}: "
                f"{data.get('error_description', '')}",
                reason="scope_not_allowed",
            )
        raise IssuerUnavailable(
            f"issuer {issuer.name} ({issuer.issuer}) refused the refresh: HTTP "
            f"{response.status_code} {error} {data.get('error_description', '')}".rstrip(),
            reason="issuer_unavailable",
        )

    def start_device_flow(
        self, issuer: IssuerConfig, scopes: tuple[str, ...]
    ) -> DeviceAuthorization:
        endpoint = self.endpoints(issuer).device_authorization_endpoint
        if endpoint is None:
            raise IssuerUnavailable(
                f"issuer {issuer.name} offers no device-code flow", reason="issuer_unavailable"
            )
        form = {"client_id": issuer.client_id, "scope": " ".join(scopes)}
        response = self._call(
            issuer,
            "POST",
            endpoint,
            "device authorization endpoint",
            data=form,
            **self._client_auth(issuer),
        )
        data = self._json(issuer, response, "device authorization")
        if response.status_code != 200 or not all(
            isinstance(data.get(k), str) for k in ("device_code", "user_code", "verification_uri")
        ):
            raise IssuerUnavailable(
                f"issuer {issuer.name} refused the device authorization: HTTP "
                f"{response.status_code} {data.get('error', '')}",
                reason="issuer_unavailable",
            )
        complete = data.get("verification_uri_complete")
        return DeviceAuthorization(
            device_code=data["device_code"],
            user_code=data["user_code"],
            verification_uri=data["verification_uri"],
            verification_uri_complete=complete if isinstance(complete, str) else None,
            expires_in=_int(data.get("expires_in"), 600),
            interval=_int(data.get("interval"), 5),
        )

    def poll_device_flow(
        self, issuer: IssuerConfig, device: DeviceAuthorization
    ) -> TokenResponse | str:
        """One poll: the tokens, or the OAuth2 error string (authorization_pending, slow_down,
        access_denied, expired_token)."""
        form = {
            "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
            "device_code": device.device_code,
            "client_id": issuer.client_id,
        }
        response, data = self._post_token(issuer, form)
        if response.status_code == 200:
            return _token_response(issuer, data)
        return str(data.get("error", f"http_{response.status_code}"))


def _has_kid(keys: KeySet, kid: str) -> bool:
    return any(k.kid == kid for k in keys.keys)


def _int(value: Any, default: int) -> int:
    return (
        value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default
    )


def _token_response(issuer: IssuerConfig, data: dict[str, Any]) -> TokenResponse:
    access = data.get("access_token")
    if not isinstance(access, str) or not access:
        raise IssuerUnavailable(
            f"issuer {issuer.name}: the token answer has no access_token",
            reason="issuer_unavailable",
        )
    refresh = data.get("refresh_token")
    scope = data.get("scope")
    expires = data.get("expires_in")
    return TokenResponse(
        access_token=access,
        refresh_token=refresh if isinstance(refresh, str) else None,
        expires_in=expires if isinstance(expires, int) and not isinstance(expires, bool) else None,
        scope=scope if isinstance(scope, str) else None,
    )
