"""The TLS edge shared by the REST server and the MyProxy endpoint.

One builder for the server context (TLS 1.2 or newer, RFC 3820 proxies accepted,
no session tickets so that every connection shows its verified chain) and one
reader of the verified peer chain of an accepted socket.
"""

from __future__ import annotations

import ssl
from typing import Any

from cryptography import x509


def server_context(
    *, host_cert: str, host_key: str, ca_dir: str, certificate_optional: bool, max_tls: str = ""
) -> ssl.SSLContext:
    """A server context for the host credential, trusting the CA directory ``ca_dir``.

    ``certificate_optional`` lets clients without a certificate finish the handshake
    (a certificate that is sent must still verify); the caller then refuses every
    request that needs an identity.  ``max_tls="1.2"`` caps the protocol version.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if max_tls == "1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(host_cert, host_key)
    ctx.load_verify_locations(capath=ca_dir)
    ctx.verify_mode = ssl.CERT_OPTIONAL if certificate_optional else ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_ALLOW_PROXY_CERTS
    # Resumed sessions carry no verified chain: without tickets, every client
    # goes through a full handshake and is identified afresh.
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    return ctx


def verified_peer_chain(sock: Any) -> list[x509.Certificate]:
    """The chain OpenSSL verified for the peer of ``sock``, leaf first.

    Empty when ``sock`` is not a TLS socket, the client sent no certificate, or
    the session was resumed (no chain to show): callers fail closed on empty.
    """
    if not isinstance(sock, ssl.SSLSocket):
        return []
    getter = getattr(sock, "get_verified_chain", None)  # public since Python 3.13
    if getter is None:
        getter = getattr(getattr(sock, "_sslobj", None), "get_verified_chain", None)
    raw = getter() if getter is not None else None
    if not raw:
        return []
    der = ssl._ssl.ENCODING_DER  # type: ignore[attr-defined]
    return [x509.load_der_x509_certificate(c.public_bytes(der)) for c in raw]
