"""The REST client used by the CLIs and by the pilot (broker-pilot).

Authenticated with the caller's certificate or proxy; the server's certificate
is verified against the CA directory and its host name.  Server errors come
back as the matching :class:`BrokerError`.

Several servers
    ``server`` (``-s``, ``BROKER_SERVER``, the pilot's ``broker_url``) may name
    several brokers, separated by commas or spaces, like MyProxy's
    ``MYPROXY_SERVER``. A call goes to the server that answered last (the first
    one to begin with); when it cannot be reached (refused, reset, timed out,
    closed mid-reply) or answers 503, the next one is tried, once each. Any other
    answer, a 4xx refusal included, is final: a refusal on one node would be the
    same on the others. When every server failed the error names them all.
Connection reuse
    The TLS connection stays open between calls of one client object (HTTP/1.1
    keep-alive), so a pilot's refreshes and a CLI's batch pay one handshake. A
    kept connection the server has meanwhile closed (its keep-alive timeout) is
    reopened once, transparently, before the server counts as unreachable.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from broker import errors
from broker.errors import BrokerError, ConfigError, InputError, SystemFailure
from broker.fileio import read_private_file
from broker.naming import DEFAULT_CREDENTIAL
from broker.pki.loading import (
    Credential,
    PrivateKey,
    chain_to_pem,
    load_cert_and_key,
    load_certificates,
    load_credential,
)
from broker.pki.proxy import csr_to_pem, generate_key, load_csr, make_csr, sign_request

DEFAULT_PORT = 8443
_BY_STATUS: dict[int, type[BrokerError]] = errors.by_http_status()


@dataclass(frozen=True)
class ClientIdentity:
    """Where the caller's credential lives: a proxy file, or a certificate and key."""

    cert: str
    key: str

    @classmethod
    def from_environment(
        cls, proxy: str | None = None, cert: str | None = None, key: str | None = None
    ) -> ClientIdentity:
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
            "X509_USER_PROXY, or X509_USER_CERT and X509_USER_KEY"
        )

    def load(self) -> Credential:
        key_bytes = read_private_file(self.key, require_owner=os.getuid())
        if self.key == self.cert:
            return load_credential(key_bytes)
        with open(self.cert, "rb") as handle:
            return load_cert_and_key(handle.read(), key_bytes)


def parse_servers(server: str | None) -> list[tuple[str, int]]:
    """The servers named by ``server`` (or ``BROKER_SERVER``, or localhost), in order.

    Entries are separated by commas or white space; each is ``HOST``, ``HOST:PORT``,
    ``[IPv6]:PORT`` or any of these behind ``https://``. Duplicates are dropped.
    """
    text = server or os.environ.get("BROKER_SERVER") or "localhost"
    servers: list[tuple[str, int]] = []
    for entry in text.replace(",", " ").split():
        parsed = _parse_one(entry)
        if parsed not in servers:
            servers.append(parsed)
    if not servers:
        raise InputError(f"no server in {text!r}; give HOST[:PORT][,HOST[:PORT]...]")
    return servers


def _parse_one(entry: str) -> tuple[str, int]:
    text = entry.removeprefix("https://").rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or "]" in port:
        host, number = text.strip("[]"), DEFAULT_PORT
    elif not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"the server {entry!r} must be HOST or HOST:PORT")
    else:
        host, number = host.strip("[]"), int(port)
    if not host or "/" in host:
        raise InputError(f"the server {entry!r} must be HOST or HOST:PORT")
    return host, number


def parse_server(server: str | None) -> tuple[str, int]:
    """The first server named by ``server`` (see :func:`parse_servers`)."""
    return parse_servers(server)[0]


class _Unreachable(Exception):
    """A server could not be used (connection failure or 503); try the next one."""

    def __init__(self, where: str, why: str, error: BrokerError | None = None) -> None:
        super().__init__(why)
        self.where = where
        self.why = why
        self.error = error


class BrokerClient:
    servers: list[tuple[str, int]]
    _current: int = 0
    _local: threading.local | None = None  # the kept connection, one per thread
    connections_opened: int = 0  # connection attempts by this client (tests, benchmarks)

    def __init__(
        self,
        server: str | None,
        identity: ClientIdentity,
        *,
        ca_dir: str,
        timeout: float = 30.0,
        bearer_token_file: str | None = None,
    ) -> None:
        self.servers = parse_servers(server)
        self._local = threading.local()
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

    @property
    def host(self) -> str:
        """The server in use (the one that answered last, or the first one)."""
        return self.servers[self._current][0]

    @property
    def port(self) -> int:
        return self.servers[self._current][1]

    @property
    def _conn(self) -> http.client.HTTPSConnection | None:
        return getattr(self._local, "conn", None)

    @_conn.setter
    def _conn(self, conn: http.client.HTTPSConnection | None) -> None:
        if self._local is None:
            self._local = threading.local()  # a client shared by threads: one each
        self._local.conn = conn

    @property
    def _conn_server(self) -> tuple[str, int] | None:
        return getattr(self._local, "server", None)

    @_conn_server.setter
    def _conn_server(self, server: tuple[str, int] | None) -> None:
        if self._local is None:
            self._local = threading.local()
        self._local.server = server

    def close(self) -> None:
        """Close this thread's kept connection (the next call opens a new one)."""
        conn = self._conn
        if conn is not None:
            conn.close()
            self._conn = None
            self._conn_server = None

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One request; on a connection failure or a 503, the next server (module docstring)."""
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        bearer_file = getattr(self, "bearer_token_file", None)  # subclasses may not set it
        if bearer_file:
            token = (
                read_private_file(bearer_file, require_owner=os.getuid(), max_size=16384)
                .decode("ascii", "replace")
                .strip()
            )
            headers["Authorization"] = f"Bearer {token}"
        tried: list[_Unreachable] = []
        count = len(self.servers)
        for step in range(count):
            index = (self._current + step) % count
            try:
                data = self._call_one(self.servers[index], method, path, payload, headers)
            except _Unreachable as failure:
                tried.append(failure)
                continue
            self._current = index
            return data
        last = tried[-1]
        detail = "; ".join(f"{t.where}: {t.why}" for t in tried)
        if len(tried) == 1:
            if last.error is not None:
                raise last.error
            raise SystemFailure(
                f"cannot reach the broker at {detail}; is it running?", reason="unreachable"
            )
        if all(t.error is not None for t in tried) and last.error is not None:
            raise type(last.error)(
                f"no broker could serve the request (tried {detail})", reason=last.error.reason
            )
        raise SystemFailure(f"cannot reach any broker (tried {detail})", reason="unreachable")

    def _call_one(
        self,
        server: tuple[str, int],
        method: str,
        path: str,
        payload: bytes | None,
        headers: dict[str, str],
    ) -> Any:
        host, port = server
        where = f"{host}:{port}"
        if self._conn is not None and getattr(self._local, "pid", None) != os.getpid():
            # Inherited through fork: the TLS state belongs to the parent; never touch it.
            self._conn = None
            self._conn_server = None
        reused = self._conn is not None and self._conn_server == server
        if not reused:
            self.close()
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = http.client.HTTPSConnection(
                    host, port, context=self._ctx, timeout=self.timeout
                )
                self._conn_server = server
                if self._local is not None:
                    self._local.pid = os.getpid()
                self.connections_opened += 1
            conn = self._conn
            try:
                conn.request(method, path, body=payload, headers=headers)
                response = conn.getresponse()
                raw = response.read(4 << 20)
                if response.will_close or not response.isclosed():
                    self.close()  # the server ends the connection, or a reply was too long
                break
            except (
                ssl.SSLEOFError,
                ssl.SSLZeroReturnError,
                ConnectionError,
                http.client.RemoteDisconnected,
                http.client.BadStatusLine,
            ) as exc:
                self.close()
                if reused and attempt == 0:
                    reused = False
                    continue  # the kept connection had gone stale: one fresh try
                raise _Unreachable(where, str(exc) or type(exc).__name__) from exc
            except ssl.SSLError as exc:
                self.close()
                raise errors.AuthenticationError(
                    f"TLS with {where} failed: {exc.reason or exc}; check that your "
                    "credential is valid and the server's CA is in your CA directory",
                    reason="tls",
                ) from exc
            except (TimeoutError, OSError, http.client.HTTPException) as exc:
                self.close()
                raise _Unreachable(where, str(exc) or type(exc).__name__) from exc
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            data = {"error": "bad_response", "message": raw[:200].decode(errors="replace")}
        if response.status >= 400:
            cls = _BY_STATUS.get(response.status, SystemFailure)
            error = cls(
                str(data.get("message", f"HTTP {response.status}")),
                reason=str(data.get("error", "error")),
            )
            if response.status == 503:
                raise _Unreachable(where, f"unavailable ({error.message})", error)
            raise error
        return data

    # ----------------------------------------------------------------- operations

    def delegate(
        self,
        credential: Credential,
        *,
        username: str,
        name: str = DEFAULT_CREDENTIAL,
        stored_hours: float = 168,
        max_proxy_hours: float = 12,
        retrievers: Sequence[str] = (),
        trusted_retrievers: Sequence[str] = (),
        renewers: Sequence[str] = (),
        description: str | None = None,
        passphrase: str | None = None,
        now: Any,
    ) -> dict[str, Any]:
        started = self.call(
            "POST",
            "/v1/delegations",
            {
                "username": username,
                "name": name,
                "stored_hours": stored_hours,
                "max_proxy_hours": max_proxy_hours,
                "retrievers": list(retrievers),
                "trusted_retrievers": list(trusted_retrievers),
                "renewers": list(renewers),
                "description": description,
            },
        )
        csr = load_csr(_field(started, "csr").encode())
        chain = sign_request(credential, csr, now=now, lifetime=timedelta(hours=stored_hours))
        body: dict[str, Any] = {"chain": chain_to_pem(chain).decode()}
        if passphrase is not None:
            body["passphrase"] = passphrase
        result: dict[str, Any] = self.call("PUT", f"/v1/delegations/{_field(started, 'id')}", body)
        return result

    def retrieve(
        self,
        *,
        username: str | None = None,
        owner: str | None = None,
        name: str = DEFAULT_CREDENTIAL,
        lifetime_hours: float | None = None,
        job_id: str | None = None,
        passphrase: str | None = None,
        limited: bool = False,
        key: Any = None,
        key_type: str = "rsa",
    ) -> tuple[Credential, dict[str, Any]]:
        """Retrieve a fresh proxy; the key is made here and never sent."""
        key = key or generate_key(key_type)
        body: dict[str, Any] = {
            "csr": csr_to_pem(make_csr(key)).decode(),
            "name": name,
            "limited": limited,
        }
        _add_given(
            body,
            username=username,
            owner=owner,
            job_id=job_id,
            passphrase=passphrase,
            lifetime_hours=lifetime_hours,
        )
        return _issued(self.call("POST", "/v1/retrievals", body), key)

    def renew(
        self,
        authz: Credential,
        *,
        username: str | None = None,
        owner: str | None = None,
        name: str = DEFAULT_CREDENTIAL,
        lifetime_hours: float | None = None,
        job_id: str | None = None,
        key_type: str = "rsa",
    ) -> tuple[Credential, dict[str, Any]]:
        from broker.service import sign_challenge

        challenge = _field(self.call("GET", "/v1/renewals/challenge"), "challenge")
        key = generate_key(key_type)
        body: dict[str, Any] = {
            "csr": csr_to_pem(make_csr(key)).decode(),
            "name": name,
            "challenge": challenge,
            "authz_chain": chain_to_pem(authz.chain).decode(),
            "signature": base64.b64encode(sign_challenge(authz.key, challenge.encode())).decode(),
        }
        _add_given(
            body, username=username, owner=owner, job_id=job_id, lifetime_hours=lifetime_hours
        )
        return _issued(self.call("POST", "/v1/renewals", body), key)

    def info(self, *, username: str | None = None, name: str | None = None) -> dict[str, Any]:
        query = "&".join(f"{k}={v}" for k, v in (("username", username), ("name", name)) if v)
        path = "/v1/credentials" + (f"?{query}" if query else "")
        result: dict[str, Any] = self.call("GET", path)
        return result

    def destroy(self, *, username: str, name: str = DEFAULT_CREDENTIAL) -> dict[str, Any]:
        from urllib.parse import quote

        result: dict[str, Any] = self.call(
            "DELETE", f"/v1/credentials/{quote(username, safe='')}/{quote(name, safe='')}"
        )
        return result


def _add_given(body: dict[str, Any], **fields: Any) -> None:
    """Put the optional request fields that were given (not None) into ``body``."""
    body.update((k, v) for k, v in fields.items() if v is not None)


def _issued(result: dict[str, Any], key: PrivateKey) -> tuple[Credential, dict[str, Any]]:
    """The proxy a retrieval or renewal answered, with the key its CSR was made from."""
    chain = tuple(load_certificates(_field(result, "chain").encode()))
    return Credential(chain=chain, key=key), result


def _field(data: Any, key: str) -> str:
    """A text field of a successful answer; an incomplete answer (a server killed while
    replying, a proxy in between) is a system failure, not a KeyError."""
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, str):
        raise SystemFailure(
            f"the broker's answer lacks {key!r} (an incomplete or foreign response); retry",
            reason="bad_response",
        )
    return value
