"""Deployment (issue 14): the plain-HTTP ops listener under abuse, and client failover
past a server that accepts connections but never answers.

One broker of its own (``broker serve``, 2 workers, ``--ops-bind`` on loopback).
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from broker.client import BrokerClient, ClientIdentity
from tests.brokerserver import RunningBroker, free_port
from tests.pkifixtures import GridPki
from tests.reliability.harness import Outcome, launch


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def attacks(pki: GridPki, base: Path) -> Iterator[tuple[str, Callable[[Outcome], None]]]:
    state: dict[str, Any] = {}

    def broker() -> tuple[RunningBroker, int]:
        if "broker" not in state:
            ops = free_port()
            b, _ = launch(pki, base / "deploy", extra=("--ops-bind", f"127.0.0.1:{ops}"))
            alice = b.client("alice")
            alice.delegate(alice.identity.load(), username="alice", now=datetime.now(UTC))
            state["broker"], state["ops"] = b, ops
        return state["broker"], state["ops"]

    def ops_abuse(outcome: Outcome) -> None:
        b, ops = broker()
        probes: list[tuple[str, bytes, bytes]] = [
            (
                "POST /metrics",
                b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
                b" 405 ",
            ),
            ("DELETE /healthz", b"DELETE /healthz HTTP/1.1\r\n\r\n", b" 405 "),
            ("64 KiB path", b"GET /" + b"a" * 65536 + b" HTTP/1.1\r\n\r\n", b" 414 "),
            ("garbage request line", b"\x00\xff\xfe garbage\r\n\r\n", b" 400 "),
            ("unknown path", b"GET /v1/credentials HTTP/1.1\r\n\r\n", b" 404 "),
            (
                "TLS hello on plain HTTP",
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
                b" 400 ",
            ),
        ]
        for label, data, expected in probes:
            outcome.tried += 1
            try:
                answer = _raw(ops, data)
            except OSError as exc:
                outcome.fail(f"ops listener, {label}: {exc}")
                continue
            if expected not in answer.split(b"\r\n", 1)[0]:
                outcome.fail(f"ops listener, {label}: answered {answer[:60]!r}")
        # 20 connections held open without a byte, then a scrape must still be answered.
        idle = [socket.create_connection(("127.0.0.1", ops), timeout=5) for _ in range(20)]
        try:
            outcome.tried += 1
            status, text = _get(ops, "/metrics")
            if status != 200 or "broker_credentials_stored" not in text:
                outcome.fail(f"ops /metrics with idle connections open: HTTP {status}")
            if "CN=" in text or "alice" in text:
                outcome.fail("ops /metrics shows an identity (a DN or a username)")
            outcome.tried += 1
            status, body = _get(ops, "/healthz")
            if status != 200 or "CN=" in body:
                outcome.fail(f"ops /healthz: HTTP {status} {body[:100]}")
        finally:
            for sock in idle:
                sock.close()
        if "Traceback" in b.log.read_text(errors="replace"):
            outcome.fail("a traceback in the broker log after the ops probes")

    def blackhole_failover(outcome: Outcome) -> None:
        b, _ = broker()
        hole = socket.socket()
        hole.bind(("127.0.0.1", 0))
        hole.listen(8)  # accepts (the kernel does), never answers
        held: list[socket.socket] = []
        stop = threading.Event()

        def accept() -> None:
            hole.settimeout(0.2)
            while not stop.is_set():
                try:
                    held.append(hole.accept()[0])
                except OSError:
                    continue

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        try:
            identity = ClientIdentity(
                cert=str(pki.cert_path("pilot")), key=str(pki.key_path("pilot"))
            )
            client = BrokerClient(
                f"127.0.0.1:{hole.getsockname()[1]},{b.server}",
                identity,
                ca_dir=str(pki.ca_dir),
                timeout=1.0,
            )
            started = time.monotonic()
            for _ in range(3):
                outcome.tried += 1
                try:
                    client.retrieve(username="alice", key_type="ec")
                except Exception as exc:
                    outcome.fail(f"failover past a silent server: {type(exc).__name__}: {exc}")
            took = time.monotonic() - started
            outcome.note(
                f"3 retrievals past a silent first server in {took:.1f} s "
                "(one 1 s timeout, then the live server is kept)"
            )
            if took > 10:
                outcome.fail(f"failover took {took:.1f} s")
        finally:
            stop.set()
            thread.join(timeout=2)
            hole.close()
            for sock in held:
                sock.close()

    def finish(outcome: Outcome) -> None:
        outcome.tried += 1
        if "broker" in state:
            state["broker"].stop()

    yield "deploy: ops listener abuse", ops_abuse
    yield "deploy: failover past a silent server", blackhole_failover
    yield "deploy: server stopped", finish
