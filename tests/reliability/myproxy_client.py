"""A small MyProxy v2 client over the wire protocol, for the load and fault runs.

It speaks what myproxy-init / myproxy-logon / myproxy-info / myproxy-destroy
send (see broker/myproxy/server.py for the transport facts): one TLS
connection per command, the ``0`` flag byte, one request message, then the
command's sub-messages.  Every socket operation has a timeout.
"""

from __future__ import annotations

import socket
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from broker.myproxy import codec
from broker.myproxy.codec import Command, ResponseCode
from broker.pki.loading import Credential
from broker.pki.proxy import generate_key, load_csr, make_csr, sign_request


class MyProxyRefused(Exception):
    """The server answered with an ERROR response (a refusal, not a transport failure)."""


class MyProxyClient:
    def __init__(
        self, port: int, ca_dir: Path, cert: Path, key: Path, *, timeout: float = 30.0
    ) -> None:
        self.port = port
        self.timeout = timeout
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(capath=str(ca_dir))
        ctx.load_cert_chain(str(cert), str(key))
        self._ctx = ctx

    # ------------------------------------------------------------------ transport

    def _open(self) -> tuple[ssl.SSLSocket, bytearray]:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = self._ctx.wrap_socket(raw, server_hostname="localhost")
        buf = bytearray()
        if tls.version() == "TLSv1.3":
            first = self._fill(tls, buf, 1)
            if first[:1] != b"\x00":
                raise ConnectionError("the server did not send the GSI 0x00 byte")
            del buf[:1]
        tls.sendall(b"0")
        return tls, buf

    @staticmethod
    def _fill(tls: ssl.SSLSocket, buf: bytearray, need: int) -> bytearray:
        while len(buf) < need:
            chunk = tls.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection early")
            buf += chunk
        return buf

    def _response(self, tls: ssl.SSLSocket, buf: bytearray) -> codec.Response:
        while b"\0" not in buf:
            chunk = tls.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection before responding")
            buf += chunk
        cut = buf.index(b"\0") + 1
        message = bytes(buf[:cut])
        del buf[:cut]
        response = codec.parse_response(message)
        if response.code is ResponseCode.ERROR:
            raise MyProxyRefused(response.error)
        return response

    def _der(self, tls: ssl.SSLSocket, buf: bytearray, *, chain: bool) -> bytes:
        while True:
            done = codec.chain_complete(bytes(buf)) if chain else codec.der_complete(bytes(buf))
            if buf and done:
                break
            chunk = tls.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection mid-message")
            buf += chunk
        if chain:
            data = bytes(buf)
            buf.clear()
            return data
        length = codec.der_length(bytes(buf)) or 0
        data = bytes(buf[:length])
        del buf[:length]
        return data

    @staticmethod
    def _close(tls: ssl.SSLSocket) -> None:
        try:
            tls.close()
        except OSError:
            pass

    # ------------------------------------------------------------------ commands

    def put(
        self,
        cred: Credential,
        username: str,
        name: str,
        *,
        hours: int = 12,
        trusted_retrievers: str = "*/CN=pilot",
    ) -> None:
        """myproxy-init: the server makes the key, we sign its CSR with ``cred``."""
        tls, buf = self._open()
        try:
            tls.sendall(
                codec.format_request(
                    Command.PUT,
                    username,
                    "",
                    hours * 3600,
                    [("CRED_NAME", name), ("RETRIEVER_TRUSTED", trusted_retrievers)],
                )
            )
            self._response(tls, buf)
            csr = load_csr(self._der(tls, buf, chain=False))
            chain = sign_request(cred, csr, now=datetime.now(UTC), lifetime=timedelta(hours=hours))
            tls.sendall(
                codec.encode_chain([c.public_bytes(serialization.Encoding.DER) for c in chain])
            )
            self._response(tls, buf)
        finally:
            self._close(tls)

    def get(self, username: str, name: str, *, hours: int = 1) -> list[bytes]:
        """myproxy-logon by certificate: returns the DER chain of the fresh proxy."""
        key = generate_key("ec")
        tls, buf = self._open()
        try:
            tls.sendall(
                codec.format_request(Command.GET, username, "", hours * 3600, [("CRED_NAME", name)])
            )
            self._response(tls, buf)
            tls.sendall(make_csr(key).public_bytes(serialization.Encoding.DER))
            blob = self._der(tls, buf, chain=True)
            ders = codec.decode_chain(blob)
            self._response(tls, buf)
            return ders
        finally:
            self._close(tls)

    def info(self, username: str) -> codec.Response:
        tls, buf = self._open()
        try:
            tls.sendall(codec.format_request(Command.INFO, username))
            return self._response(tls, buf)
        finally:
            self._close(tls)

    def destroy(self, username: str, name: str) -> None:
        tls, buf = self._open()
        try:
            tls.sendall(
                codec.format_request(Command.DESTROY, username, "", 0, [("CRED_NAME", name)])
            )
            self._response(tls, buf)
        finally:
            self._close(tls)
