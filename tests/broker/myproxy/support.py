"""Shared helpers for the MyProxy endpoint tests: an in-process server and a tiny client.

``running_endpoint(tmp, grid_pki)`` builds a BrokerService over a temp state
dir and the test site policy below, starts :func:`serve_myproxy` in a thread
on an ephemeral loopback port and yields an :class:`Endpoint`.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.config import ServerConfig
from broker.devpki import PASSPHRASE_RULE, policy_rule
from broker.myproxy import codec
from broker.myproxy.server import serve_myproxy
from broker.runtime import build_runtime, prepare_state
from broker.service import BrokerService
from tests.pkifixtures import GridPki

HOST_DN = "/DC=org/DC=example/CN=localhost"
ALICE_DN = "/DC=org/DC=example/CN=Alice"
BOB_DN = "/DC=org/DC=example/CN=Bob"
PILOT_DN = "/DC=org/DC=example/CN=pilot"
PASSPHRASE = "alicepass1"

# MyProxy semantics: owners do not retrieve their own credentials by certificate alone.
SITE_POLICY = (
    policy_rule(
        "owners store and manage their own credentials", ["delegate", "info", "destroy"], ["self"]
    )
    + PASSPHRASE_RULE
    + policy_rule(
        "the pilot retrieves by certificate", "retrieve", [PILOT_DN], auth=["certificate"]
    )
    + policy_rule("the pilot renews", "renew", [PILOT_DN])
)


@dataclass
class Endpoint:
    host: str
    port: int
    service: BrokerService
    config: ServerConfig
    pki: GridPki

    def client_env(self, who: str | None, **extra: str) -> dict[str, str]:
        """Environment for the Debian myproxy clients acting as ``who`` (None: anonymous)."""
        env = {
            k: v
            for k, v in os.environ.items()
            if k
            not in (
                "X509_USER_CERT",
                "X509_USER_KEY",
                "X509_USER_PROXY",
                "MYPROXY_SERVER",
                "MYPROXY_SERVER_PORT",
                "MYPROXY_SERVER_DN",
            )
        }
        env.update(
            X509_CERT_DIR=str(self.pki.ca_dir),
            MYPROXY_SERVER="localhost",
            MYPROXY_SERVER_PORT=str(self.port),
            MYPROXY_SERVER_DN=HOST_DN,
            GLOBUS_HOSTNAME="localhost",
            LC_ALL="C",
        )
        if who is None:
            # No cert anywhere the client looks: it must fall back to anonymous.
            env["X509_USER_PROXY"] = "/nonexistent/proxy"
            env["X509_USER_CERT"] = "/nonexistent/cert"
            env["X509_USER_KEY"] = "/nonexistent/key"
        else:
            env["X509_USER_CERT"] = str(self.pki.cert_path(who))
            env["X509_USER_KEY"] = str(self.pki.key_path(who))
        env.update(extra)
        return env


def write_policy(directory: Path, text: str = SITE_POLICY) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "10-test.toml").write_text(text)
    return directory


def make_config(tmp: Path, pki: GridPki, **changes: Any) -> ServerConfig:
    values: dict[str, Any] = {
        "state_dir": str(tmp / "state"),
        "policy_dir": str(write_policy(tmp / "policies")),
        "host_cert": str(pki.root / "host.pem"),
        "host_key": str(pki.root / "host.key"),
        "ca_dir": str(pki.ca_dir),
        "vomsdir": str(pki.vomsdir),
        "myproxy_bind": "127.0.0.1:0",
        # the tests store under free usernames (r-basic, u-renew, ...)
        "username_binding": "none",
    }
    values.update(changes)
    config = ServerConfig(**values).resolved()
    prepare_state(config)
    return config


@contextmanager
def running_endpoint(tmp: Path, pki: GridPki, **changes: Any) -> Iterator[Endpoint]:
    overrides = changes.pop("overrides", {})
    config = make_config(tmp, pki, **changes)
    runtime = build_runtime(config)
    stop = threading.Event()
    bound: list[tuple[str, int]] = []
    ready = threading.Event()

    def on_ready(address: tuple[str, int]) -> None:
        bound.append(address)
        ready.set()

    thread = threading.Thread(
        target=serve_myproxy,
        args=(config, stop),
        kwargs={"service": runtime.service, "ready": on_ready, **overrides},
        name="myproxy-test-server",
        daemon=True,
    )
    thread.start()
    assert ready.wait(10), "the MyProxy endpoint did not start"
    host, port = bound[0]
    try:
        yield Endpoint(host, port, runtime.service, config, pki)
    finally:
        stop.set()
        thread.join(10)
        runtime.service.store.close()


# --------------------------------------------------------------------------- a raw client


class RawClient:
    """Speaks the wire protocol directly (for hostile or precise tests)."""

    def __init__(
        self,
        endpoint: Endpoint | tuple[str, int],
        ca_dir: Path,
        cert: Path | None = None,
        key: Path | None = None,
        max_tls: ssl.TLSVersion | None = None,
    ) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(capath=str(ca_dir))
        if max_tls is not None:
            ctx.maximum_version = max_tls
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key) if key else None)
        host, port = (endpoint.host, endpoint.port) if isinstance(endpoint, Endpoint) else endpoint
        raw = socket.create_connection((host, port), timeout=20)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        if self.sock.version() == "TLSv1.3":
            assert self.sock.recv(1) == b"\x00"

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> bytes:
        return self.sock.recv(65536)

    def recv_response(self) -> codec.Response:
        data = b""
        while b"\0" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return codec.parse_response(data)

    def request(
        self,
        command: codec.Command,
        username: str,
        passphrase: str = "",
        lifetime: int = 0,
        extra: Mapping[str, str] | None = None,
        flag: bytes = b"0",
    ) -> codec.Response:
        if flag:
            self.send(flag)
        self.send(
            codec.format_request(
                command, username, passphrase, lifetime, list((extra or {}).items())
            )
        )
        return self.recv_response()

    def close(self) -> None:
        self.sock.close()
