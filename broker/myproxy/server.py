"""The MyProxy v2 endpoint: a TLS server loop over :class:`broker.myproxy.handler.Session`.

Transport facts the real clients depend on (docs/myproxy.md has the detail):

* the session is one plain TLS connection; the client certificate is requested,
  not required (anonymous clients log on with a passphrase);
* with TLS 1.3 the server writes one ``0x00`` byte right after the handshake
  and issues no session tickets, else the Globus client deadlocks;
* the client then writes one ``'0'`` byte (no GSI delegation);
* each protocol message is one write (one TLS record); a reader takes a
  record, then whatever is immediately available, and stops at a NUL for text.

Concurrency: an event loop accepts every connection at once, does the TLS
handshake without blocking and waits for the client's first request message
(``first_request_timeout``, 5 s from the connection); only then does the
connection go to a thread of the bounded pool. Idle, silent or slow peers so
hold a file descriptor, never a thread, and cannot make the acceptor wait. Each
client address has at most ``per_address`` connections in that first stage (a
newer one closes its oldest), and each connection has a deadline and a byte
budget; whatever a peer sends, the worst it gets is an ``ERROR=`` line and a
closed socket.

Process model: ``broker serve`` calls :func:`start_myproxy_in_master` before
gunicorn forks, which starts ``python -m broker.myproxy.server`` as a child
process (never a thread in the gunicorn master). The child dies with its
parent (``PR_SET_PDEATHSIG`` plus a ``getppid`` poll) and the parent stops it
by PID at exit. Tests run :func:`serve_myproxy` in a thread instead.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import select
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.audit import AuditAction, Endpoint
from broker.config import ServerConfig
from broker.errors import BrokerError, ProtocolError
from broker.myproxy import codec
from broker.myproxy.handler import MessageKind, Session, Settings
from broker.service import BrokerService, Requester
from broker.tlsctx import server_context, verified_peer_chain
from broker.trustdir import CaDirWatch

log = logging.getLogger("broker.myproxy")

DEFAULT_MAX_CONNECTIONS = 32
DEFAULT_REQUEST_SIZE_LIMIT = 1 << 20  # MyProxy's request_size_limit default
DEFAULT_REQUEST_TIMEOUT = 120.0  # MyProxy's request_timeout default
DEFAULT_FIRST_REQUEST_TIMEOUT = 5.0  # handshake + flag + first request message
DEFAULT_PER_ADDRESS = 32  # connections per client address still in the first stage
DEFAULT_MAX_OPEN = 1024  # connections per process, first stage and served together
_MAX_TRUST_FILE = 1 << 20


@dataclass(frozen=True)
class EndpointSettings:
    host: str
    port: int
    host_cert: str
    host_key: str
    ca_dir: str
    max_tls: str = ""
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    request_size_limit: int = DEFAULT_REQUEST_SIZE_LIMIT
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    first_request_timeout: float = DEFAULT_FIRST_REQUEST_TIMEOUT
    per_address: int = DEFAULT_PER_ADDRESS
    max_open: int = DEFAULT_MAX_OPEN

    @classmethod
    def from_config(cls, config: ServerConfig, **overrides: Any) -> EndpointSettings:
        host, _, port = config.myproxy_bind.rpartition(":")
        values: dict[str, Any] = {
            "host": host.strip("[]"),
            "port": int(port),
            "host_cert": config.host_cert,
            "host_key": config.host_key,
            "ca_dir": config.ca_dir,
            "max_tls": config.max_tls,
            "max_connections": max(4, config.threads * 4),
        }
        values.update(overrides)
        return cls(**values)


def make_context(settings: EndpointSettings) -> ssl.SSLContext:
    """Server context: client cert optional, RFC 3820 proxies accepted, no tickets."""
    return server_context(
        host_cert=settings.host_cert,
        host_key=settings.host_key,
        ca_dir=settings.ca_dir,
        certificate_optional=True,
        max_tls=settings.max_tls,
    )


def read_trust_files(ca_dir: str) -> dict[str, bytes]:
    """The regular, world-readable files of the CA directory (what GET_TRUSTROOTS sends)."""
    files: dict[str, bytes] = {}
    directory = Path(ca_dir)
    if not directory.is_dir():
        return files
    for entry in sorted(directory.iterdir()):
        try:
            info = entry.stat()
        except OSError:
            continue
        if not entry.is_file() or not info.st_mode & 0o004 or info.st_size > _MAX_TRUST_FILE:
            continue
        if "," in entry.name or entry.name.startswith("."):
            continue
        with contextlib.suppress(OSError):
            files[entry.name] = entry.read_bytes()
    return files


class _TrustCache:
    """The CA directory's files for GET_TRUSTROOTS, re-read when the directory changes."""

    def __init__(self, ca_dir: str, watch: CaDirWatch) -> None:
        self._ca_dir = ca_dir
        self._watch = watch
        self._lock = threading.Lock()
        self._files: dict[str, bytes] = {}
        self._version = -1

    def __call__(self) -> Mapping[str, bytes]:
        with self._lock:
            version = self._watch.version()
            if version != self._version:
                self._files = read_trust_files(self._ca_dir)
                self._version = version
            return self._files


class TlsChannel:
    """The handler's :class:`~broker.myproxy.handler.Channel` over one TLS socket."""

    def __init__(self, sock: ssl.SSLSocket, *, deadline: float, limit: int) -> None:
        self.sock = sock
        self.deadline = deadline
        self.budget = limit
        self.pending = b""

    def _recv_some(self) -> bytes:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise ProtocolError("the request timed out")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise ProtocolError("the request timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise ProtocolError(f"the connection failed: {exc}") from None
        if not chunk:
            raise ProtocolError("the client closed the connection")
        self.budget -= len(chunk)
        if self.budget < 0:
            raise ProtocolError("the request is larger than the server's request size limit")
        return chunk

    def _more_now(self) -> bool:
        if self.sock.pending():
            return True
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable)

    def recv(self, kind: MessageKind) -> bytes:
        buf, self.pending = self.pending, b""
        while True:
            if buf and _complete(kind, buf):
                break
            if kind == "text" and buf and not self._more_now():
                break  # bytes read ahead (the first stage) that ended with their record
            buf += self._recv_some()
            if kind == "text" and b"\0" not in buf and not self._more_now():
                break  # MyProxyClient ends a text message with its record, not a NUL
        if kind == "text":
            cut = buf.find(b"\0")
            if cut >= 0:
                buf, self.pending = buf[:cut], buf[cut + 1 :]
        return buf

    def recv_flag(self) -> None:
        """The client's one-byte ``'0'`` (no GSI delegation) that follows the handshake."""
        data = self.pending or self._recv_some()
        if data[:1] == codec.CLIENT_FLAG:
            self.pending = data[1:]
        elif data.startswith(b"VERSION="):
            self.pending = data  # a client that skips the flag: be lenient
        elif data[:1] == b"D":
            raise ProtocolError("GSI delegation ('D') is not supported; MyProxy clients send '0'")
        else:
            raise ProtocolError("expected the one-byte '0' flag after the TLS handshake")

    def send(self, data: bytes) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise ProtocolError("the request timed out")
        self.sock.settimeout(remaining)
        try:
            self.sock.sendall(data)
        except (OSError, ssl.SSLError) as exc:
            raise ProtocolError(f"the connection failed: {exc}") from None


def _complete(kind: MessageKind, buf: bytes) -> bool:
    if kind == "text":
        return b"\0" in buf
    if kind == "der":
        return codec.der_complete(buf)
    if kind == "chain":
        return codec.chain_complete(buf)
    if len(buf) >= 4 and buf[0] not in (2, 4):
        return True  # not an X509 reply: complete enough to be refused
    return codec.auth_reply_complete(buf)


def listen(settings: EndpointSettings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    sock.listen(max(128, settings.max_connections * 2))
    return sock


class _Arrival:
    """A connection in the first stage: TLS handshake, then the flag and the first message."""

    __slots__ = ("accepted", "addr", "buf", "handshaken", "host", "nul_sent", "tls")

    def __init__(self, tls: ssl.SSLSocket, addr: Any, accepted: float) -> None:
        self.tls = tls
        self.addr = addr
        self.host = str(addr[0]) if isinstance(addr, tuple) else ""
        self.accepted = accepted
        self.buf = bytearray()
        self.handshaken = False
        self.nul_sent = False


class MyProxyServer:
    """Listening socket, first-stage event loop and bounded thread pool.

    :meth:`serve` until ``stop`` is set.
    """

    def __init__(
        self,
        service: BrokerService,
        settings: EndpointSettings,
        *,
        handler_settings: Settings | None = None,
        listener: socket.socket | None = None,
    ) -> None:
        self.service = service
        self.settings = settings
        self.handler_settings = handler_settings or Settings()
        # One reload path with the service's trust store (broker.trustdir): the context and
        # the trust-root files follow the CA directory within RELOAD_INTERVAL seconds.
        self._watch = CaDirWatch(settings.ca_dir)
        self._context = make_context(settings)
        self._context_version = self._watch.version()
        self._trust = _TrustCache(settings.ca_dir, self._watch)
        self._pool = ThreadPoolExecutor(
            max_workers=settings.max_connections, thread_name_prefix="myproxy"
        )
        self.sock = listener if listener is not None else listen(settings)
        self.sock.setblocking(False)
        self._selector = selectors.DefaultSelector()
        # First-stage connections by address, oldest first (dicts keep insertion order).
        self._arrivals: dict[str, dict[int, _Arrival]] = {}
        self._served = 0  # handed to the pool and not finished yet
        self._served_lock = threading.Lock()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    def _ctx(self) -> ssl.SSLContext:
        version = self._watch.version()
        if version != self._context_version:
            try:
                self._context = make_context(self.settings)
            except (OSError, ssl.SSLError):
                log.exception("could not rebuild the MyProxy TLS context; keeping the old one")
            self._context_version = version
        return self._context

    def serve(
        self, stop: threading.Event, *, should_stop: Callable[[], bool] | None = None
    ) -> None:
        log.info("MyProxy endpoint listening on %s:%d", *self.address)
        self._selector.register(self.sock, selectors.EVENT_READ, None)
        try:
            while not stop.is_set() and not (should_stop and should_stop()):
                for key, _ in self._selector.select(timeout=0.25):
                    if key.data is None:
                        self._accept_all(stop)
                    else:
                        self._step(key.data)
                self._expire()
        finally:
            self.close()

    def close(self) -> None:
        for arrivals in list(self._arrivals.values()):
            for arrival in list(arrivals.values()):
                self._drop(arrival)
        with contextlib.suppress(OSError, KeyError, ValueError):
            self._selector.unregister(self.sock)
        with contextlib.suppress(OSError):
            self.sock.close()
        self._selector.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ first stage

    def _open_count(self) -> int:
        with self._served_lock:
            served = self._served
        return served + sum(len(a) for a in self._arrivals.values())

    def _accept_all(self, stop: threading.Event) -> None:
        for _ in range(64):  # then let the others move too
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # none left (or another process took it)
            except OSError as exc:
                if stop.is_set():
                    return
                log.warning("accept failed: %s", exc)
                return
            self._admit(conn, addr)

    def _admit(self, conn: socket.socket, addr: Any) -> None:
        settings = self.settings
        if self._open_count() >= settings.max_open:
            waiting = [a for same in self._arrivals.values() for a in same.values()]
            if not waiting:  # every connection is being served: the newcomer must go
                log.warning(
                    "closing a connection from %s: %d connections are open",
                    addr[0],
                    settings.max_open,
                )
                conn.close()
                return
            # Idle peers must not lock the door: the one waiting longest for its request goes.
            oldest = min(waiting, key=lambda a: a.accepted)
            log.warning(
                "%d connections open; closing the one from %s that has waited "
                "longest for its request",
                settings.max_open,
                oldest.host,
            )
            self._drop(oldest)
        try:
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self._ctx().wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        except (OSError, ssl.SSLError) as exc:
            log.info("MyProxy connection from %s failed: %s", addr[0], exc)
            conn.close()
            return
        arrival = _Arrival(tls, addr, time.monotonic())
        same = self._arrivals.setdefault(arrival.host, {})
        if len(same) >= settings.per_address:
            # The address's oldest connection that has not sent a request yet makes room:
            # one peer cannot hold more than per_address of them, and a new client behind
            # the same address still gets in.
            oldest = next(iter(same.values()))
            log.info(
                "MyProxy client %s has %d connections without a request; closing the oldest",
                arrival.host,
                len(same),
            )
            self._drop(oldest)
            same = self._arrivals.setdefault(arrival.host, {})
        same[id(arrival)] = arrival
        self._selector.register(tls, selectors.EVENT_READ, arrival)
        self._step(arrival)

    def _forget(self, arrival: _Arrival) -> None:
        same = self._arrivals.get(arrival.host)
        if same is not None:
            same.pop(id(arrival), None)
            if not same:
                del self._arrivals[arrival.host]
        with contextlib.suppress(OSError, KeyError, ValueError):
            self._selector.unregister(arrival.tls)

    def _drop(self, arrival: _Arrival) -> None:
        self._forget(arrival)
        with contextlib.suppress(OSError):
            arrival.tls.close()

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.settings.first_request_timeout
        for same in list(self._arrivals.values()):
            for arrival in [a for a in same.values() if a.accepted <= cutoff]:
                log.info(
                    "MyProxy client %s sent no request within %.0f s; closing",
                    arrival.host,
                    self.settings.first_request_timeout,
                )
                self._drop(arrival)

    def _step(self, arrival: _Arrival) -> None:
        """Advance a first-stage connection as far as it goes without blocking."""
        tls = arrival.tls
        try:
            if not arrival.handshaken:
                tls.do_handshake()
                arrival.handshaken = True
            if not arrival.nul_sent:
                if tls.version() == "TLSv1.3":
                    tls.send(b"\x00")  # what a GSI acceptor sends when it has nothing else
                arrival.nul_sent = True
            while True:
                chunk = tls.recv(65536)
                if not chunk:
                    self._drop(arrival)
                    return
                arrival.buf += chunk
                if len(arrival.buf) > self.settings.request_size_limit:
                    log.info(
                        "MyProxy client %s: the request is larger than the server's "
                        "request size limit",
                        arrival.host,
                    )
                    self._drop(arrival)
                    return
        except ssl.SSLWantReadError:
            if not self._has_request(arrival.buf):
                with contextlib.suppress(OSError, KeyError, ValueError):
                    self._selector.modify(tls, selectors.EVENT_READ, arrival)
                return
        except ssl.SSLWantWriteError:
            with contextlib.suppress(OSError, KeyError, ValueError):
                self._selector.modify(tls, selectors.EVENT_WRITE, arrival)
            return
        except (OSError, ssl.SSLError) as exc:
            log.info("MyProxy TLS handshake with %s failed: %s", arrival.host, exc)
            self._drop(arrival)
            return
        self._forget(arrival)
        with self._served_lock:
            self._served += 1
        try:
            self._pool.submit(self._connection, arrival)
        except RuntimeError:  # pool shut down
            with self._served_lock:
                self._served -= 1
            tls.close()

    @staticmethod
    def _has_request(buf: bytearray) -> bool:
        """Enough for a thread: the flag and (the start of) the first message, or junk."""
        if not buf:
            return False
        if buf[:1] != codec.CLIENT_FLAG:
            return True  # a missing or wrong flag: refused at once in the thread
        return len(buf) > 1

    # ------------------------------------------------------------ in the pool

    def _connection(self, arrival: _Arrival) -> None:
        try:
            self._serve_connection(arrival)
        except Exception:  # a worker must never die silently or take the server down
            log.exception("MyProxy connection from %s failed", arrival.addr)
        finally:
            with contextlib.suppress(OSError):
                arrival.tls.close()
            with self._served_lock:
                self._served -= 1

    def _serve_connection(self, arrival: _Arrival) -> None:
        settings = self.settings
        tls, addr = arrival.tls, arrival.addr
        deadline = arrival.accepted + settings.request_timeout
        tls.setblocking(True)
        with tls:
            channel = TlsChannel(tls, deadline=deadline, limit=settings.request_size_limit)
            channel.pending = bytes(arrival.buf)
            channel.budget -= len(arrival.buf)
            request_id = uuid.uuid4().hex
            try:
                channel.recv_flag()
                requester = self._requester(tls, addr, request_id)
            except ProtocolError as exc:
                log.info("MyProxy client %s: %s", addr[0], exc.message)
                return
            except BrokerError as exc:
                # Let the client send its request so that it reads the refusal as a response.
                with contextlib.suppress(ProtocolError):
                    channel.recv("text")
                    channel.send(codec.error(exc.message))
                return
            Session(
                self.service,
                channel,
                requester,
                trust_files=self._trust,
                settings=self.handler_settings,
            ).run()
            with contextlib.suppress(OSError, ssl.SSLError):
                tls.settimeout(1.0)
                tls.unwrap()

    def _requester(self, tls: ssl.SSLSocket, addr: Any, request_id: str) -> Requester:
        chain = verified_peer_chain(tls)
        if not chain:
            return Requester(
                dn=None, client_address=addr[0], endpoint=Endpoint.MYPROXY, request_id=request_id
            )

        # A chain OpenSSL accepted but our RFC 3820 / VOMS / namespace checks refuse
        # (e.g. a forged AC) leaves an audit row, as it does on REST.
        def claimant() -> Requester:  # worked out only for a refusal's row
            return Requester.unverified(
                chain=chain,
                client_address=addr[0],
                endpoint=Endpoint.MYPROXY,
                request_id=request_id,
            )

        with self.service.audited(claimant, AuditAction.AUTHENTICATE, unauthenticated=True):
            return self.service.authenticate_chain(
                chain, client_address=addr[0], endpoint=Endpoint.MYPROXY, request_id=request_id
            )


def serve_myproxy(
    config: ServerConfig,
    stop_event: threading.Event,
    *,
    service: BrokerService | None = None,
    ready: Callable[[tuple[str, int]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    **overrides: Any,
) -> None:
    """Run the endpoint on ``config.myproxy_bind`` until ``stop_event`` is set.

    ``service`` defaults to one built from ``config`` (``broker.runtime.build_runtime``);
    tests pass their own. ``ready`` is called with the bound address (port 0 works).
    ``overrides`` set :class:`EndpointSettings` fields (``max_connections``...).
    """
    if service is None:
        from broker.runtime import build_runtime

        service = build_runtime(config).service
    server = MyProxyServer(service, EndpointSettings.from_config(config, **overrides))
    if ready is not None:
        ready(server.address)
    server.serve(stop_event, should_stop=should_stop)


# --------------------------------------------------------------------------- child process

_child: subprocess.Popen[bytes] | None = None
_PR_SET_PDEATHSIG = 1


def start_myproxy_in_master(config: ServerConfig) -> subprocess.Popen[bytes]:
    """Start the endpoint as a child process of ``broker serve`` (before gunicorn forks).

    The child is stopped by PID when this process exits (only from this very
    process: gunicorn workers inherit atexit hooks and must not run it). With
    ``config.workers`` > 1 the child pre-forks that many endpoint processes.
    """
    global _child
    # The config travels through a pipe, not the command line: /proc/PID/cmdline is readable
    # by every local user, and a database URL may hold a password.
    payload = json.dumps(dataclasses.asdict(config)).encode()
    command = [
        sys.executable,
        "-m",
        "broker.myproxy.server",
        "--config-stdin",
        "--parent-pid",
        str(os.getpid()),
        "--processes",
        str(max(1, config.workers)),
    ]
    child = subprocess.Popen(command, stdin=subprocess.PIPE)
    assert child.stdin is not None
    child.stdin.write(payload)
    child.stdin.close()
    _child = child
    owner = os.getpid()

    def stop_child() -> None:
        if os.getpid() != owner or child.poll() is not None:
            return
        child.terminate()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

    atexit.register(stop_child)
    log.info("MyProxy endpoint started as process %d on %s", child.pid, config.myproxy_bind)
    return child


def _die_with_parent(parent_pid: int) -> Callable[[], bool]:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:
        sys.exit(0)  # the parent left before we could ask to be told
    return lambda: os.getppid() != parent_pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m broker.myproxy.server", description="Run the broker's MyProxy endpoint."
    )
    parser.add_argument(
        "--config-stdin",
        action="store_true",
        help="Read a resolved ServerConfig as JSON from stdin (broker serve).",
    )
    parser.add_argument("--config", help="broker.toml")
    parser.add_argument("--myproxy-bind")
    parser.add_argument("--state-dir")
    parser.add_argument("--policy-dir")
    parser.add_argument("--max-tls", choices=["1.2", "1.3"])
    parser.add_argument("--max-connections", type=int)
    parser.add_argument("--parent-pid", type=int)
    parser.add_argument(
        "--processes", type=int, default=1, help="worker processes sharing the socket (default 1)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s[myproxy]: %(message)s"
    )
    if args.config_stdin:
        config = ServerConfig(**json.loads(sys.stdin.buffer.read(1 << 20)))
    else:
        from broker.config import load_config
        from broker.runtime import prepare_state

        config = load_config(
            args.config,
            {
                "myproxy_bind": args.myproxy_bind,
                "state_dir": args.state_dir,
                "policy_dir": args.policy_dir,
                "max_tls": args.max_tls,
            },
        )
        prepare_state(config)
    if not config.myproxy_bind:
        parser.error("no MyProxy bind address (--myproxy-bind or myproxy_bind in the config)")
    from broker.observability import configure_logging, inherited_log_format

    configure_logging(
        config.log_level,
        inherited_log_format(),  # as broker serve logs
        text_format="%(asctime)s %(levelname)s %(name)s[myproxy]: %(message)s",
    )
    should_stop = _die_with_parent(args.parent_pid) if args.parent_pid else None
    overrides = {"max_connections": args.max_connections} if args.max_connections else {}
    if args.processes > 1:
        return _prefork(config, args.processes, overrides)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    serve_myproxy(config, stop, should_stop=should_stop, **overrides)
    return 0


def _stop_on_sigterm() -> threading.Event:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent forwards Ctrl-C as SIGTERM
    return stop


def _prefork(config: ServerConfig, processes: int, overrides: dict[str, Any]) -> int:
    """N worker processes sharing one listening socket (one GIL each).

    Forks before any thread, database engine or TLS context exists; each
    worker builds its own runtime, dies with this parent, and is reaped by PID.
    """
    from broker.runtime import build_runtime

    settings = EndpointSettings.from_config(config, **overrides)
    listener = listen(settings)
    parent = os.getpid()
    children: list[int] = []
    for _ in range(processes):
        pid = os.fork()
        if pid == 0:
            should_stop = _die_with_parent(parent)
            stop = _stop_on_sigterm()
            server = MyProxyServer(build_runtime(config).service, settings, listener=listener)
            server.serve(stop, should_stop=should_stop)
            os._exit(0)
        children.append(pid)
    listener.close()
    stopping = threading.Event()

    def forward(signum: int, frame: object) -> None:
        stopping.set()
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        while True:
            try:
                os.waitpid(child, 0)
                break
            except ChildProcessError:
                break
            except InterruptedError:
                continue
    return 0


if __name__ == "__main__":
    sys.exit(main())
