"""The REST client used by the CLIs and by the pilot (broker-pilot).

One TLS connection per call, authenticated with the caller's certificate or
proxy; the server's certificate is verified against the CA directory and its
host name.  Server errors come back as the matching :class:`BrokerError`.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from broker import errors
from broker.errors import BrokerError, ConfigError, InputError, SystemFailure
from broker.fileio import read_private_file
from broker.pki.loading import Credential, chain_to_pem, load_cert_and_key, load_credential
from broker.pki.proxy import csr_to_pem, generate_key, load_csr, make_csr, sign_request

DEFAULT_PORT = 8443
_BY_STATUS: dict[int, type[BrokerError]] = {
    400: errors.InputError,
    401: errors.AuthenticationError,
    403: errors.AuthorizationError,
    404: errors.NotFound,
    409: errors.Conflict,
    413: errors.PayloadTooLarge,
    422: errors.CredentialError,
    429: errors.TooManyAttempts,
    503: errors.StoreUnavailable,
}


@dataclass(frozen=True)
class ClientIdentity:
    """Where the caller's credential lives: a proxy file, or a certificate and key."""

    cert: str
    key: str

    @classmethod
    def from_environment(cls, proxy: str | None = None, cert: str | None = None,
                         key: str | None = None) -> ClientIdentity:
        if cert:
            return cls(cert=cert, key=key or cert)
        candidates = [proxy, os.environ.get("X509_USER_PROXY"), f"/tmp/x509up_u{os.getuid()}"]  # noqa: S108
        for path in candidates:
            if path and os.path.exists(path):
                return cls(cert=path, key=path)
        home = os.path.expanduser("~/.globus")
        ucert = os.environ.get("X509_USER_CERT") or os.path.join(home, "usercert.pem")
        ukey = os.environ.get("X509_USER_KEY") or os.path.join(home, "userkey.pem")
        if os.path.exists(ucert) and os.path.exists(ukey):
            return cls(cert=ucert, key=ukey)
        raise ConfigError(
            "no credential found: create a proxy (grid-proxy-init or broker proxy-init), set "
            "X509_USER_PROXY, or X509_USER_CERT and X509_USER_KEY")

    def load(self) -> Credential:
        key_bytes = read_private_file(self.key, require_owner=os.getuid())
        if self.key == self.cert:
            return load_credential(key_bytes)
        with open(self.cert, "rb") as handle:
            return load_cert_and_key(handle.read(), key_bytes)


def parse_server(server: str | None) -> tuple[str, int]:
    text = server or os.environ.get("BROKER_SERVER") or "localhost"
    text = text.removeprefix("https://").rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or "]" in port:
        return text.strip("[]"), DEFAULT_PORT
    if not port.isdigit():
        raise InputError(f"the server {server!r} must be HOST or HOST:PORT")
    return host.strip("[]"), int(port)


class BrokerClient:
    def __init__(self, server: str | None, identity: ClientIdentity, *, ca_dir: str,
                 timeout: float = 30.0, bearer_token_file: str | None = None) -> None:
        self.host, self.port = parse_server(server)
        self.identity = identity
        self.timeout = timeout
        # A bearer token (WLCG discovery: a file, re-read for every call so that an
        # external agent may renew it); with one, the certificate may be left out.
        self.bearer_token_file = bearer_token_file
        if identity.cert or not bearer_token_file:
            read_private_file(identity.key, require_owner=os.getuid())  # 0600 and ours
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_verify_locations(capath=ca_dir)
            if identity.cert or not bearer_token_file:
                ctx.load_cert_chain(identity.cert, identity.key)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"cannot load the client credential or CA directory: {exc}") from exc
        self._ctx = ctx

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        conn = http.client.HTTPSConnection(self.host, self.port, context=self._ctx,
                                           timeout=self.timeout)
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        bearer_file = getattr(self, "bearer_token_file", None)  # subclasses may not set it
        if bearer_file:
            token = read_private_file(bearer_file, require_owner=os.getuid(),
                                      max_size=16384).decode("ascii", "replace").strip()
            headers["Authorization"] = f"Bearer {token}"
        try:
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            raw = response.read(4 << 20)
        except ssl.SSLError as exc:
            raise errors.AuthenticationError(
                f"TLS with {self.host}:{self.port} failed: {exc.reason or exc}; check that your "
                "credential is valid and the server's CA is in your CA directory",
                reason="tls") from exc
        except (TimeoutError, ConnectionError, OSError, http.client.HTTPException) as exc:
            raise SystemFailure(
                f"cannot reach the broker at {self.host}:{self.port}: {exc}; is it running?",
                reason="unreachable") from exc
        finally:
            conn.close()
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            data = {"error": "bad_response", "message": raw[:200].decode(errors="replace")}
        if response.status >= 400:
            cls = _BY_STATUS.get(response.status, SystemFailure)
            raise cls(str(data.get("message", f"HTTP {response.status}")),
                      reason=str(data.get("error", "error")))
        return data

    # ----------------------------------------------------------------- operations

    def delegate(
        self, credential: Credential, *, username: str, name: str = "default",
        stored_hours: float = 168, max_proxy_hours: float = 12,
        retrievers: Sequence[str] = (), trusted_retrievers: Sequence[str] = (),
        renewers: Sequence[str] = (), description: str | None = None,
        passphrase: str | None = None, now: Any,
    ) -> dict[str, Any]:
        started = self.call("POST", "/v1/delegations", {
            "username": username, "name": name, "stored_hours": stored_hours,
            "max_proxy_hours": max_proxy_hours, "retrievers": list(retrievers),
            "trusted_retrievers": list(trusted_retrievers), "renewers": list(renewers),
            "description": description,
        })
        csr = load_csr(_field(started, "csr").encode())
        chain = sign_request(credential, csr, now=now, lifetime=timedelta(hours=stored_hours))
        body: dict[str, Any] = {"chain": chain_to_pem(chain).decode()}
        if passphrase is not None:
            body["passphrase"] = passphrase
        result: dict[str, Any] = self.call(
            "PUT", f"/v1/delegations/{_field(started, 'id')}", body)
        return result

    def retrieve(
        self, *, username: str | None = None, owner: str | None = None, name: str = "default",
        lifetime_hours: float | None = None, job_id: str | None = None,
        passphrase: str | None = None, limited: bool = False, key: Any = None,
        key_type: str = "rsa",
    ) -> tuple[Credential, dict[str, Any]]:
        """Retrieve a fresh proxy; the key is made here and never sent."""
        key = key or generate_key(key_type)
        body: dict[str, Any] = {"csr": csr_to_pem(make_csr(key)).decode(), "name": name,
                                "limited": limited}
        for field, value in (("username", username), ("owner", owner), ("job_id", job_id),
                             ("passphrase", passphrase), ("lifetime_hours", lifetime_hours)):
            if value is not None:
                body[field] = value
        result = self.call("POST", "/v1/retrievals", body)
        from broker.pki.loading import load_certificates

        chain = tuple(load_certificates(_field(result, "chain").encode()))
        return Credential(chain=chain, key=key), result

    def renew(
        self, authz: Credential, *, username: str | None = None, owner: str | None = None,
        name: str = "default", lifetime_hours: float | None = None, job_id: str | None = None,
        key_type: str = "rsa",
    ) -> tuple[Credential, dict[str, Any]]:
        from broker.pki.loading import load_certificates
        from broker.service import sign_challenge

        challenge = _field(self.call("GET", "/v1/renewals/challenge"), "challenge")
        key = generate_key(key_type)
        body: dict[str, Any] = {
            "csr": csr_to_pem(make_csr(key)).decode(), "name": name, "challenge": challenge,
            "authz_chain": chain_to_pem(authz.chain).decode(),
            "signature": base64.b64encode(sign_challenge(authz.key, challenge.encode())).decode(),
        }
        for field, value in (("username", username), ("owner", owner), ("job_id", job_id),
                             ("lifetime_hours", lifetime_hours)):
            if value is not None:
                body[field] = value
        result = self.call("POST", "/v1/renewals", body)
        chain = tuple(load_certificates(_field(result, "chain").encode()))
        return Credential(chain=chain, key=key), result

    def info(self, *, username: str | None = None, name: str | None = None) -> dict[str, Any]:
        query = "&".join(f"{k}={v}" for k, v in (("username", username), ("name", name)) if v)
        path = "/v1/credentials" + (f"?{query}" if query else "")
        result: dict[str, Any] = self.call("GET", path)
        return result

    def destroy(self, *, username: str, name: str = "default") -> dict[str, Any]:
        from urllib.parse import quote

        result: dict[str, Any] = self.call(
            "DELETE", f"/v1/credentials/{quote(username, safe='')}/{quote(name, safe='')}")
        return result


def _field(data: Any, key: str) -> str:
    """A text field of a successful answer; an incomplete answer (a server killed while
    replying, a proxy in between) is a system failure, not a KeyError."""
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, str):
        raise SystemFailure(
            f"the broker's answer lacks {key!r} (an incomplete or foreign response); retry",
            reason="bad_response")
    return value
