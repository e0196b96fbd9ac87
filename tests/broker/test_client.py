"""The REST client: several servers with failover, and one kept TLS connection.

The failover cases run a real broker (gunicorn, mutual TLS) next to small TLS
servers on loopback that answer every request with a fixed status (503, 404) or
close the connection after each answer, to show what the client does with each.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from broker import errors
from broker.client import BrokerClient, ClientIdentity, parse_server, parse_servers
from broker.errors import InputError, SystemFailure
from tests.brokerserver import RunningBroker, free_port, sqlite_broker  # noqa: F401
from tests.pkifixtures import GridPki


class _Stub:
    """A TLS server on loopback answering every request with ``status``."""

    def __init__(self, pki: GridPki, status: int, *, close_after_reply: bool = False) -> None:
        stub = self
        self.requests = 0
        self.connections: set[tuple[str, int]] = set()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                stub.requests += 1
                stub.connections.add(self.client_address)
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                body = json.dumps({"error": "stub", "message": f"stub says {status}"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                if close_after_reply:
                    # Close without announcing it, like a server whose keep-alive expired.
                    self.close_connection = True

            do_GET = do_POST = do_PUT = do_DELETE = _answer

            def log_message(self, *_args: object) -> None:
                pass

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(pki.cert_path("host"), pki.key_path("host"))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stubs(grid_pki: GridPki) -> Iterator[list[_Stub]]:
    made: list[_Stub] = []
    yield made
    for stub in made:
        stub.stop()


def _client(pki: GridPki, server: str) -> BrokerClient:
    identity = ClientIdentity(cert=str(pki.cert_path("alice")), key=str(pki.key_path("alice")))
    return BrokerClient(server, identity, ca_dir=str(pki.ca_dir))


# ------------------------------------------------------------------ parsing


def test_server_lists_are_parsed_in_order() -> None:
    assert parse_servers("a.example:1,https://b.example:2/ c.example") == [
        ("a.example", 1),
        ("b.example", 2),
        ("c.example", 8443),
    ]
    assert parse_servers("[::1]:9000, a:1 ,a:1") == [("::1", 9000), ("a", 1)]
    assert parse_server("x:5,y:6") == ("x", 5)


def test_server_list_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_SERVER", "n1:8443,n2:8443")
    assert parse_servers(None) == [("n1", 8443), ("n2", 8443)]


@pytest.mark.parametrize("bad", ["a:b", "a:0", "a:70000", ":80", " , ", "a:1,b:x"])
def test_bad_server_entries_are_refused(bad: str) -> None:
    with pytest.raises(InputError):
        parse_servers(bad)


# ------------------------------------------------------------------ failover


def test_failover_to_the_next_server_when_one_is_down(sqlite_broker: RunningBroker) -> None:  # noqa: F811
    dead = free_port()
    client = _client(sqlite_broker.pki, f"127.0.0.1:{dead},{sqlite_broker.server}")
    assert client.call("GET", "/healthz")["status"] == "ok"
    # The server that answered is remembered: the next call goes straight to it.
    assert (client.host, client.port) == ("localhost", sqlite_broker.port)
    assert client.call("GET", "/healthz")["status"] == "ok"
    assert client.connections_opened == 2  # the refused attempt, then one kept connection


def test_failover_on_503_but_not_on_a_refusal(
    sqlite_broker: RunningBroker,  # noqa: F811
    stubs: list[_Stub],
) -> None:
    pki = sqlite_broker.pki
    busy = _Stub(pki, 503)
    refusing = _Stub(pki, 404)
    stubs += [busy, refusing]
    client = _client(pki, f"localhost:{busy.port},{sqlite_broker.server}")
    assert client.call("GET", "/healthz")["status"] == "ok"
    assert busy.requests == 1

    # A 4xx is the answer: the healthy broker after the refusing one is not asked.
    client = _client(pki, f"localhost:{refusing.port},{sqlite_broker.server}")
    with pytest.raises(errors.NotFound, match="stub says 404"):
        client.call("GET", "/healthz")
    assert refusing.requests == 1
    assert (client.host, client.port) == ("localhost", refusing.port)


def test_every_server_failing_names_them_all(grid_pki: GridPki, stubs: list[_Stub]) -> None:
    busy = _Stub(grid_pki, 503)
    stubs.append(busy)
    dead = free_port()
    client = _client(grid_pki, f"127.0.0.1:{dead},localhost:{busy.port}")
    with pytest.raises(SystemFailure) as caught:
        client.call("GET", "/healthz")
    assert f"127.0.0.1:{dead}" in caught.value.message
    assert f"localhost:{busy.port}" in caught.value.message
    assert caught.value.exit_code == 2

    client = _client(grid_pki, f"localhost:{busy.port},localhost:{busy.port + 0}")
    with pytest.raises(errors.StoreUnavailable, match="stub says 503"):
        client.call("GET", "/healthz")


# ------------------------------------------------------------------ connection reuse


def test_one_tls_connection_serves_many_calls(sqlite_broker: RunningBroker) -> None:  # noqa: F811
    client = sqlite_broker.client("alice")
    for _ in range(5):
        assert client.call("GET", "/healthz")["status"] == "ok"
    assert client.connections_opened == 1
    client.close()
    client.call("GET", "/healthz")
    assert client.connections_opened == 2


def test_a_connection_the_server_closed_is_reopened(grid_pki: GridPki, stubs: list[_Stub]) -> None:
    closing = _Stub(grid_pki, 200, close_after_reply=True)
    stubs.append(closing)
    client = _client(grid_pki, f"localhost:{closing.port}")
    for _ in range(3):
        client.call("GET", "/healthz")
    assert closing.requests == 3
    assert client.connections_opened == 3


def test_a_dead_server_is_reported_with_its_name(grid_pki: GridPki, tmp_path: Path) -> None:
    dead = free_port()
    with pytest.raises(SystemFailure, match=f"127.0.0.1:{dead}.*is it running"):
        _client(grid_pki, f"127.0.0.1:{dead}").call("GET", "/healthz")


# ------------------------------------------------------------------ the pilot's broker_url


def test_pilot_broker_url_takes_a_list() -> None:
    from payload_wrapper.errors import WrapperSystemError
    from payload_wrapper.pilot_config import parse_pilot_config

    base = {"cert": "/c.pem", "key": "/k.pem", "allowed_owners": ["*"]}
    cfg = parse_pilot_config({**base, "broker_url": ["https://n1:8443", "https://n2:8443"]})
    assert parse_servers(cfg.broker_url) == [("n1", 8443), ("n2", 8443)]
    assert parse_pilot_config({**base, "broker_url": "https://n1"}).broker_url == "https://n1"
    for bad in ([], ["https://n1", 3], ["a,b"], [""]):
        with pytest.raises(WrapperSystemError, match="broker_url"):
            parse_pilot_config({**base, "broker_url": bad})


def test_a_client_shared_by_threads_keeps_one_connection_per_thread(
    sqlite_broker: RunningBroker,  # noqa: F811
) -> None:
    client = sqlite_broker.client("alice")
    failures: list[BaseException] = []

    def calls() -> None:
        try:
            for _ in range(5):
                assert client.call("GET", "/healthz")["status"] == "ok"
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=calls) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert client.connections_opened == 6


def test_a_connection_gunicorn_closed_after_its_keepalive_is_reopened(
    sqlite_broker: RunningBroker,  # noqa: F811
) -> None:
    """A pilot refreshes every few minutes; gunicorn closes idle connections after 5 s."""
    client = sqlite_broker.client("alice")
    assert client.call("GET", "/v1/whoami")["identity"] == "/DC=org/DC=example/CN=Alice"
    time.sleep(6.5)
    assert client.call("GET", "/v1/whoami")["identity"] == "/DC=org/DC=example/CN=Alice"
    assert client.connections_opened == 2
