#!/usr/bin/env python3
"""The TLS floor: CPU per bare mutual-TLS handshake, with no application work at all.

Every retrieval benchmark here opens a fresh connection with a full handshake (the
issues ask for it), so this cost sits under every REST and MyProxy figure. This
script measures it alone, on 127.0.0.1, for the two TLS stacks a Python server
can use on this machine:

* ``ssl`` (the standard library): the system OpenSSL; what gunicorn (REST) and the
  MyProxy endpoint use;
* ``pyOpenSSL``: the OpenSSL that the ``cryptography`` wheel bundles.

The server side does what our endpoints do before any request: accept, TCP_NODELAY,
handshake with the client certificate requested (RFC 3820 proxies allowed, no
session tickets; for ``ssl`` the MyProxy endpoint's own ``make_context``), read the
verified peer chain, then one byte each way and close.
The client presents a real RFC 3820 proxy chain (dev PKI: alice's proxy). Server
and client run in separate processes; CPU comes from getrusage in each. The host
key is the dev PKI's (RSA-2048), as in the other benchmarks.

    scripts/bench tls [--handshakes 600] [--json bench-out/tls.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import socket
import ssl
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from OpenSSL import SSL, crypto

from broker.devpki import write_dev_pki
from broker.fileio import write_private_file
from broker.myproxy.server import EndpointSettings, make_context
from broker.pki.loading import credential_to_pem, load_cert_and_key
from broker.pki.proxy import new_proxy

REPO = Path(__file__).resolve().parents[1]


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _stdlib_server(listener: socket.socket, pki: Path, count: int) -> None:
    # exactly the MyProxy endpoint's server context
    ctx = make_context(
        EndpointSettings(
            host="127.0.0.1",
            port=0,
            host_cert=str(pki / "host.pem"),
            host_key=str(pki / "host.key"),
            ca_dir=str(pki / "certificates"),
        )
    )
    for _ in range(count):
        conn, _addr = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with ctx.wrap_socket(conn, server_side=True) as tls:
            sslobj: Any = getattr(tls, "_sslobj", None)  # Python 3.11: the chain getter
            if not sslobj or not sslobj.get_verified_chain():
                raise RuntimeError("no verified peer chain")
            tls.sendall(b"\0")
            tls.recv(1)


def _pyopenssl_server(listener: socket.socket, pki: Path, count: int) -> None:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate_chain_file(str(pki / "host.pem"))
    ctx.use_privatekey_file(str(pki / "host.key"))
    ctx.load_verify_locations(None, str(pki / "certificates"))
    ctx.set_verify(SSL.VERIFY_PEER, None)
    ctx.get_cert_store().set_flags(crypto.X509StoreFlags.ALLOW_PROXY_CERTS)
    ctx.set_options(SSL.OP_NO_TICKET)
    for _ in range(count):
        conn, _addr = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = SSL.Connection(ctx, conn)
        tls.set_accept_state()
        tls.do_handshake()
        if not tls.get_verified_chain():
            raise RuntimeError("no verified peer chain")
        tls.sendall(b"\0")
        tls.recv(1)
        tls.shutdown()
        conn.close()


def _serve(kind: str, listener: socket.socket, pki: Path, count: int, out: Any) -> None:
    serve = _stdlib_server if kind == "ssl" else _pyopenssl_server
    serve(listener, pki, 20)  # warm-up, not measured
    started = _cpu()
    serve(listener, pki, count)
    out.put(_cpu() - started)


def _client(port: int, pki: Path, proxy: Path, count: int) -> tuple[float, float]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(capath=str(pki / "certificates"))
    ctx.load_cert_chain(str(proxy))

    def once() -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.recv(1)
            tls.sendall(b"0")

    for _ in range(20):
        once()
    cpu0, wall0 = _cpu(), time.perf_counter()
    for _ in range(count):
        once()
    return _cpu() - cpu0, time.perf_counter() - wall0


def measure(kind: str, pki: Path, proxy: Path, count: int) -> dict[str, Any]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    ctx = mp.get_context("fork")
    queue: Any = ctx.Queue()
    server = ctx.Process(target=_serve, args=(kind, listener, pki, count, queue), daemon=True)
    server.start()
    try:
        client_cpu, wall = _client(port, pki, proxy, count)
        server_cpu = queue.get(timeout=120)
        server.join(timeout=10)
    finally:
        listener.close()
        if server.is_alive():
            server.terminate()
            server.join(timeout=5)
    if kind == "ssl":
        version = ssl.OPENSSL_VERSION
    else:
        version = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
    return {
        "stack": kind,
        "openssl": version,
        "handshakes": count,
        "server_cpu_ms": round(server_cpu / count * 1000, 3),
        "client_cpu_ms": round(client_cpu / count * 1000, 3),
        "wall_ms": round(wall / count * 1000, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--handshakes",
        type=int,
        default=600,
        choices=range(10, 20001),
        metavar="N",
        help="measured handshakes per stack (default 600)",
    )
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="bench-tls-"))
    try:
        now = datetime.now(UTC)
        pki = top / "pki"
        write_dev_pki(pki, now=now, users=("alice",), pilots=("pilot",))
        alice = load_cert_and_key(
            (pki / "alice.pem").read_bytes(), (pki / "alice.key").read_bytes()
        )
        proxy = top / "proxy.pem"
        write_private_file(
            proxy, credential_to_pem(new_proxy(alice, now=now, lifetime=timedelta(hours=1)))
        )
        rows = [measure(kind, pki, proxy, args.handshakes) for kind in ("ssl", "pyopenssl")]
    finally:
        shutil.rmtree(top, ignore_errors=True)
    print(
        f"{'stack':10} {'OpenSSL':28} {'server CPU ms':>14} {'client CPU ms':>14} "
        f"{'wall ms':>8}   (per handshake, {args.handshakes} sequential)"
    )
    for r in rows:
        print(
            f"{r['stack']:10} {r['openssl']:28} {r['server_cpu_ms']:14.3f} "
            f"{r['client_cpu_ms']:14.3f} {r['wall_ms']:8.3f}"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {"benchmark": "tls", "generated": datetime.now(UTC).isoformat(), "rows": rows},
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
