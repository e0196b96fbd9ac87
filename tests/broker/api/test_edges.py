"""The REST edge under hostile clients: idle and trickling connections, odd paths and bodies.

One real ``broker serve`` with the default worker count (2) serves the module.
Flooding clients connect from 127.0.0.2-127.0.0.9 (all loopback on Linux), the
legitimate client from 127.0.0.1, as they would come from different hosts.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.api.body import json_depth
from broker.config import ServerConfig
from tests.brokerserver import RunningBroker, start_broker
from tests.pkifixtures import GridPki

WORKERS = ServerConfig().workers  # the default a site runs


@pytest.fixture(scope="module")
def broker(grid_pki: GridPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    b = start_broker(grid_pki, tmp_path_factory.mktemp("edges"), workers=WORKERS)
    try:
        yield b
    finally:
        b.stop()


def _tls(b: RunningBroker, who: str = "alice", source: str = "127.0.0.1") -> ssl.SSLSocket:
    ctx = ssl.create_default_context(capath=str(b.pki.ca_dir))
    ctx.load_cert_chain(str(b.pki.cert_path(who)), str(b.pki.key_path(who)))
    raw = socket.create_connection(("127.0.0.1", b.port), timeout=10, source_address=(source, 0))
    return ctx.wrap_socket(raw, server_hostname="localhost")


def _exchange(b: RunningBroker, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with _tls(b) as tls:
        tls.sendall(request)
        data = b""
        while True:
            try:
                chunk = tls.recv(65536)
            except (ssl.SSLError, OSError):
                break
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _get(path: str, extra: str = "") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{extra}\r\n").encode()


def _legit_latencies(b: RunningBroker, seconds: float) -> list[float]:
    client = b.client("alice")
    client.timeout = 20
    latencies: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.monotonic()
        client.call("GET", "/v1/whoami")
        latencies.append(time.monotonic() - started)
        time.sleep(0.05)
    return latencies


def test_double_slashes_and_trailing_slashes_get_json_404(broker: RunningBroker) -> None:
    for path in ("//v1/whoami", "/v1//whoami", "/v1/whoami/", "//healthz"):
        status, headers, body = _exchange(broker, _get(path))
        assert status == 404, (path, status, body[:200])
        assert headers["content-type"] == "application/json"
        assert json.loads(body)["error"] == "not_found"


def test_request_ids_are_made_by_the_server(broker: RunningBroker) -> None:
    chosen = "audit-row-of-someone-else"
    status, headers, _ = _exchange(broker, _get("/v1/whoami", f"X-Request-Id: {chosen}\r\n"))
    assert status == 200
    ours = headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", ours), ours
    time.sleep(0.5)
    assert f"request {ours}: client request id {chosen}" in broker.log.read_text()


def test_deeply_nested_json_is_a_400(broker: RunningBroker) -> None:
    body = b"[" * 60_000 + b"]" * 60_000
    status, _, answer = _exchange(
        broker,
        (
            "POST /v1/retrievals HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body,
    )
    assert status == 400, answer[:200]
    assert json.loads(answer)["error"] == "bad_json"


@pytest.mark.parametrize(
    ("raw", "depth"),
    [
        (b"{}", 1),
        (b'{"a": [1, {"b": []}]}', 4),
        (b'{"a": "[[[[{{{{"}', 1),
        (b'["\\"[[[", [[]]]', 3),
        (b"17", 0),
        (b"[" * 100, 100),
    ],
)
def test_json_depth_ignores_brackets_in_strings(raw: bytes, depth: int) -> None:
    assert json_depth(raw) == depth


def test_gunicorn_level_errors_are_json(broker: RunningBroker) -> None:
    status, headers, body = _exchange(broker, b"NOT A REQUEST LINE\r\n\r\n")
    assert status == 400
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"] == "bad_request"
    status, headers, body = _exchange(
        broker,
        (
            b"POST /v1/retrievals HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
            b"\r\n2\r\n{}\r\n0\r\n\r\n"
        ),
    )
    assert status == 411
    assert json.loads(body)["error"] == "length_required"


def test_silent_connections_do_not_delay_others(broker: RunningBroker) -> None:
    """300 TCP connections that never speak (issue 18): before, a request waited ~24 s."""
    silent = [
        socket.create_connection(
            ("127.0.0.1", broker.port), source_address=(f"127.0.0.{2 + i % 6}", 0)
        )
        for i in range(300)
    ]
    try:
        latencies = _legit_latencies(broker, 3.0)
    finally:
        for s in silent:
            s.close()
    assert max(latencies) < 1.0, f"worst {max(latencies):.2f} s over {len(latencies)} requests"


def test_trickled_bodies_do_not_delay_others_and_are_cut(broker: RunningBroker) -> None:
    """40 clients with valid certificates trickling bodies (issue 19): before, others stalled
    for 26-27 s."""
    stop = threading.Event()
    cut_after: list[float] = []

    def trickle(index: int) -> None:
        try:
            with _tls(broker, "bob", source=f"127.0.0.{2 + index % 6}") as tls:
                started = time.monotonic()
                tls.sendall(
                    b"POST /v1/retrievals HTTP/1.1\r\nHost: localhost\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
                )
                while not stop.wait(0.3):
                    tls.sendall(b" ")
        except OSError:
            cut_after.append(time.monotonic() - started)

    threads = [threading.Thread(target=trickle, args=(i,), daemon=True) for i in range(40)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        latencies = _legit_latencies(broker, 3.0)
        for thread in threads:
            thread.join(12)
    finally:
        stop.set()
    assert max(latencies) < 1.0, f"worst {max(latencies):.2f} s over {len(latencies)} requests"
    assert len(cut_after) == 40  # the server closed every trickler (body deadline 5 s) ...
    assert max(cut_after) < 9  # ... long before the 30 s request deadline


def test_one_address_cannot_fill_the_incoming_stage(broker: RunningBroker, tmp_path: Path) -> None:
    """More silent connections from one address than the stage keeps: the oldest are closed
    and a new client from that address is still served."""
    from broker.server import PER_ADDRESS_INCOMING

    flood = [
        socket.create_connection(("127.0.0.1", broker.port), source_address=("127.0.0.9", 0))
        for _ in range(PER_ADDRESS_INCOMING * WORKERS + 40)
    ]
    try:
        time.sleep(0.5)
        closed = 0
        for s in flood:
            s.setblocking(False)
            try:
                closed += s.recv(1) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
        assert closed >= 40
        with _tls(broker, source="127.0.0.9") as tls:
            tls.sendall(_get("/healthz"))
            assert tls.recv(100).startswith(b"HTTP/1.1 200")
    finally:
        for s in flood:
            s.close()


def test_expect_100_continue_is_answered_once(broker: RunningBroker) -> None:
    body = json.dumps({"csr": "x" * 2000}).encode()
    with _tls(broker) as tls:
        tls.sendall(
            (
                "POST /v1/retrievals HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                "Expect: 100-continue\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
        )
        tls.settimeout(0.8)  # curl waits 1 s for the 100 before sending anyway
        assert tls.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        tls.settimeout(10)
        tls.sendall(body)
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 4")  # no second 100; a refusal of the bad CSR
    assert b"100 Continue" not in answer


def test_an_oversize_body_gets_its_413_even_while_still_sending(broker: RunningBroker) -> None:
    body = b"x" * (2 << 20)
    status, _, answer = _exchange(
        broker,
        (
            "POST /v1/retrievals HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body,
    )
    assert status == 413
    assert json.loads(answer)["error"] == "too_large"
