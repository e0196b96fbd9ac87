"""broker/tlsctx.py: the one server-context builder and peer-chain reader, over real handshakes."""

from __future__ import annotations

import socket
import ssl
import threading

import pytest

from broker.pki.dn import slash_from_name
from broker.tlsctx import server_context, verified_peer_chain
from tests.pkifixtures import GridPki


def _server(pki: GridPki, *, optional: bool, max_tls: str = "") -> ssl.SSLContext:
    return server_context(
        host_cert=str(pki.cert_path("host")),
        host_key=str(pki.key_path("host")),
        ca_dir=str(pki.ca_dir),
        certificate_optional=optional,
        max_tls=max_tls,
    )


def _handshake(server: ssl.SSLContext, pki: GridPki, user: str | None) -> ssl.SSLSocket:
    """Connect a client (with ``user``'s certificate, or none) and return the server's socket."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.load_verify_locations(capath=str(pki.ca_dir))
    if user is not None:
        client.load_cert_chain(str(pki.cert_path(user)), str(pki.key_path(user)))
    left, right = socket.socketpair()
    tls_client = client.wrap_socket(left, do_handshake_on_connect=False)
    errors: list[BaseException] = []

    def run_client() -> None:
        try:
            tls_client.do_handshake()
            tls_client.recv(1)  # TLS 1.3 sends the client certificate after the Finished
        except (OSError, ssl.SSLError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=run_client)
    thread.start()
    tls_server = server.wrap_socket(right, server_side=True)
    tls_server.sendall(b"x")
    thread.join(10)
    tls_client.close()
    assert not errors, errors
    return tls_server


def test_the_context_is_locked_down(grid_pki: GridPki) -> None:
    ctx = _server(grid_pki, optional=False, max_tls="1.2")
    assert ctx.verify_mode is ssl.CERT_REQUIRED
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2
    assert ctx.maximum_version is ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_TICKET and ctx.num_tickets == 0
    assert ctx.verify_flags & ssl.VERIFY_ALLOW_PROXY_CERTS
    assert _server(grid_pki, optional=True).verify_mode is ssl.CERT_OPTIONAL


@pytest.mark.parametrize("max_tls", ["", "1.2"])
def test_the_verified_chain_is_read_leaf_first(grid_pki: GridPki, max_tls: str) -> None:
    sock = _handshake(_server(grid_pki, optional=True, max_tls=max_tls), grid_pki, "alice")
    try:
        chain = verified_peer_chain(sock)
    finally:
        sock.close()
    assert [slash_from_name(c.subject) for c in chain] == [
        slash_from_name(c.subject) for c in grid_pki.user("alice").chain
    ] + [slash_from_name(grid_pki.pki.ca.chain[0].subject)]


def test_no_certificate_or_no_tls_gives_an_empty_chain(grid_pki: GridPki) -> None:
    sock = _handshake(_server(grid_pki, optional=True), grid_pki, None)
    try:
        assert verified_peer_chain(sock) == []
    finally:
        sock.close()
    plain, other = socket.socketpair()
    with plain, other:
        assert verified_peer_chain(plain) == []
    assert verified_peer_chain(None) == []
