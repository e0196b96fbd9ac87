"""``broker serve``: gunicorn with mutual TLS that accepts RFC 3820 proxies.

gunicorn calls the ``ssl_context`` server hook for every connection; the hook
returns a context built once per worker (rebuilt when the CA directory changes,
noticed within ``broker.trustdir.RELOAD_INTERVAL`` seconds, the same bound as the
service's trust store and the MyProxy endpoint) with:

* client certificates required, verified against the CA directory (``capath``);
* ``VERIFY_ALLOW_PROXY_CERTS``, without which OpenSSL refuses every proxy;
* no session tickets (``num_tickets = 0``, ``OP_NO_TICKET``): on a resumed
  session the verified chain is gone, and the app refuses such requests.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import heapq
import json
import logging
import selectors
import socket
import ssl
import threading
import time
from typing import Any

from gunicorn import http as gunicorn_http
from gunicorn import sock as gunicorn_sock
from gunicorn import util as gunicorn_util
from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import TConn, ThreadWorker

from broker.config import ServerConfig
from broker.tlsctx import server_context
from broker.trustdir import CaDirWatch

log = logging.getLogger("broker.server")

# A client must deliver its request head (TLS handshake included) within HEAD_DEADLINE
# seconds of connecting (or, on a kept-alive connection, of sending its first byte), and its
# body within BODY_DEADLINE after the head. Both are waited for in the worker's event loop
# (see DeadlineThreadWorker): a thread of the bounded pool is only given a request that has fully
# arrived, so idle, silent or trickling clients hold a file descriptor and a buffer, never a
# thread. REQUEST_DEADLINE bounds the rest (the application and the response) per request.
HEAD_DEADLINE = 3.0
BODY_DEADLINE = 5.0
REQUEST_DEADLINE = 30.0
# Connections one client address may have in the incoming stage of one worker; a newer one
# closes the address's oldest. (Served connections do not count: they sent a whole request.)
PER_ADDRESS_INCOMING = 64
# Largest head buffered in the incoming stage; gunicorn refuses longer ones anyway.
MAX_HEAD = 64 * 1024
# Largest body buffered; the API refuses bodies over 128 KiB with 413 (broker.api.app).
MAX_PREREAD_BODY = 256 * 1024
# After a refusal from the incoming stage (413, 411...), how long what the client still sends
# is read and thrown away: closing with unread data would reset the connection, and the
# client could lose the answer.
DRAIN_SECONDS = 2.0


def _cut(conn: Any) -> None:
    # conn.sock is read when the timer fires: the TLS wrap replaces the socket object. Shut the
    # descriptor down (not SSLSocket.shutdown, which also unwraps TLS state that the worker
    # thread is using): the blocked read returns and gunicorn closes the connection. A closed
    # socket has fileno -1, so a late timer cannot touch a descriptor reused by another client.
    sock = conn.sock
    try:
        if sock.fileno() >= 0:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class _Watchdog:
    """One thread per worker process that cuts connections whose deadline passed.

    (A ``threading.Timer`` per request would start two threads per request.)
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._armed: dict[int, Any] = {}
        self._seq = 0
        self._thread: threading.Thread | None = None

    def arm(self, conn: Any, seconds: float) -> int:
        with self._cond:
            if self._thread is None:  # started lazily, i.e. in the worker after fork
                self._thread = threading.Thread(target=self._run, name="deadlines", daemon=True)
                self._thread.start()
            self._seq += 1
            heapq.heappush(self._heap, (time.monotonic() + seconds, self._seq))
            self._armed[self._seq] = conn
            self._cond.notify()
            return self._seq

    def disarm(self, token: int) -> None:
        with self._cond:
            self._armed.pop(token, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0][1] not in self._armed:
                    heapq.heappop(self._heap)  # disarmed in time
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, token = self._heap[0]
                delay = deadline - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                heapq.heappop(self._heap)
                conn = self._armed.pop(token)
            _cut(conn)


_WATCHDOG = _Watchdog()


def _json_error(status: int, reason: str, error: str, message: str) -> bytes:
    body = json.dumps({"error": error, "message": message}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def _write_json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """Replaces gunicorn's HTML error page (bad request line, header limits...) with JSON."""
    error = {
        400: "bad_request",
        403: "forbidden",
        414: "uri_too_long",
        431: "headers_too_large",
        501: "not_implemented",
    }.get(status_int, "http_error")
    message = mesg or reason
    gunicorn_util.write_nonblock(sock, _json_error(status_int, reason, error, message))


def _head_framing(head: bytes) -> tuple[int | None, tuple[int, str, str, str] | None]:
    """Content-Length of a request head, or the refusal to send instead of waiting for a body.

    (An ``Expect: 100-continue`` line is handled by the caller.)

    Bodies are framed by Content-Length only: every client of this API sends one, and a
    length known up front is what lets the whole body be waited for outside the pool.
    """
    length: int | None = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding":
            return None, (
                411,
                "Length Required",
                "length_required",
                "send the request body with a Content-Length header (no chunked transfer coding)",
            )
        if name == b"content-length":
            text = value.strip()
            if not text.isdigit() or len(text) > 12 or (length is not None and length != int(text)):
                return None, (400, "Bad Request", "bad_request", "invalid Content-Length")
            length = int(text)
    if length is not None and length > MAX_PREREAD_BODY:
        return None, (
            413,
            "Content Too Large",
            "too_large",
            f"the request body is larger than {MAX_PREREAD_BODY} bytes",
        )
    return length or 0, None


class _Incoming:
    """A connection waiting in the worker's event loop for its whole request."""

    __slots__ = ("buf", "conn", "deadline", "draining", "handshaken", "host", "need")

    def __init__(self, conn: Any, host: str, *, handshaken: bool, deadline: float) -> None:
        self.conn = conn
        self.host = host
        self.handshaken = handshaken
        self.deadline = deadline
        self.buf = bytearray()
        self.need: int | None = None  # head + body length, once the head is complete
        self.draining = False  # refused: the rest of the request is read and dropped


class DeadlineThreadWorker(ThreadWorker):  # type: ignore[misc]
    """gthread whose pool threads only ever get requests that have fully arrived.

    gthread hands every new connection to a pool thread, which then does the TLS handshake
    and reads the request with blocking calls: 16 threads x 2 workers could be held by as
    many idle, silent or trickling clients (the thread waits up to 5 s for a first byte, and
    reads a trickled body for as long as the client likes). Here the worker's own event loop
    does the handshake and buffers the head and the Content-Length body without blocking,
    under HEAD_DEADLINE and BODY_DEADLINE, with at most PER_ADDRESS_INCOMING such connections
    per client address; kept-alive connections come back through the same stage.
    """

    def init_process(self) -> None:
        # Incoming connections by client address, oldest first (dicts keep insertion order).
        self._incoming: dict[str, dict[int, _Incoming]] = {}
        # gunicorn writes its own errors (bad request line, oversized headers) as HTML.
        gunicorn_util.write_error = _write_json_error
        super().init_process()

    # ------------------------------------------------------------ the incoming stage

    def accept(self, listener: Any) -> None:
        try:
            client_sock, client_addr = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        host = client_addr[0] if isinstance(client_addr, tuple) else ""
        same = self._incoming.get(host, {})
        if len(same) >= PER_ADDRESS_INCOMING:
            # One peer cannot hold more; a new client behind the same address still gets in.
            log.warning(
                "%s has %d connections without a whole request; closing the oldest", host, len(same)
            )
            self._drop(next(iter(same.values())))
        elif self.nr_conns >= self.worker_connections - 1 and self._incoming:
            # gunicorn stops accepting at worker_connections; idle peers from many addresses
            # must not get it there: the connection waiting longest for its request goes.
            oldest = min(
                (i for s in self._incoming.values() for i in s.values()), key=lambda i: i.deadline
            )
            log.warning(
                "%d connections open; closing the one from %s that has waited "
                "longest for its request",
                self.nr_conns,
                oldest.host,
            )
            self._drop(oldest)
        self.nr_conns += 1
        try:
            client_sock.setblocking(False)
            client_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = gunicorn_sock.ssl_wrap_socket(client_sock, self.cfg)
            conn = TConn(self.cfg, tls, client_addr, listener.getsockname())
        except (OSError, ssl.SSLError):
            self.nr_conns -= 1
            client_sock.close()
            return
        self._stage(
            _Incoming(conn, host, handshaken=False, deadline=time.monotonic() + HEAD_DEADLINE)
        )

    def on_client_socket_readable(self, conn: Any, client: Any) -> None:
        # A kept-alive connection's next request goes through the incoming stage as well.
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        host = conn.client[0] if isinstance(conn.client, tuple) else ""
        self._stage(
            _Incoming(conn, host, handshaken=True, deadline=time.monotonic() + HEAD_DEADLINE)
        )

    def _stage(self, inc: _Incoming) -> None:
        sock = inc.conn.sock
        self._incoming.setdefault(inc.host, {})[id(inc)] = inc
        try:
            self.poller.register(sock, selectors.EVENT_READ, functools.partial(self._step, inc))
        except (OSError, ValueError):
            self._drop(inc)
            return
        self._step(inc, sock)

    def _unstage(self, inc: _Incoming) -> None:
        same = self._incoming.get(inc.host, {})
        if same.pop(id(inc), None) is None:
            return
        if not same:
            del self._incoming[inc.host]
        with contextlib.suppress(OSError, KeyError, ValueError):
            self.poller.unregister(inc.conn.sock)

    def _drop(self, inc: _Incoming) -> None:
        self._unstage(inc)
        self.nr_conns -= 1
        inc.conn.close()

    def _refuse(self, inc: _Incoming, answer: bytes) -> None:
        """Answer from the stage, end our side, drain the client's for a moment; raise."""
        sock = inc.conn.sock
        with contextlib.suppress(OSError, ssl.SSLError):
            sock.send(answer)
            socket.socket.shutdown(sock, socket.SHUT_WR)
        inc.draining = True
        inc.buf.clear()
        inc.deadline = time.monotonic() + DRAIN_SECONDS
        raise _Refused

    def _wait_for(self, inc: _Incoming, events: int) -> None:
        with contextlib.suppress(OSError, KeyError, ValueError):
            self.poller.modify(inc.conn.sock, events, functools.partial(self._step, inc))

    def _step(self, inc: _Incoming, _fileobj: Any = None) -> None:
        """Advance one connection as far as it goes without blocking."""
        tls = inc.conn.sock
        try:
            if not inc.handshaken:
                tls.do_handshake()
                inc.handshaken = True
            while inc.draining:
                if not tls.recv(65536):
                    self._drop(inc)
                    return
            while inc.need is None or len(inc.buf) < inc.need:
                chunk = tls.recv(65536)
                if not chunk:
                    self._drop(inc)
                    return
                inc.buf += chunk
                if inc.need is None:
                    self._head_done(inc)
        except _Refused:  # refused: drain from the next readable event on
            self._wait_for(inc, selectors.EVENT_READ)
            return
        except ssl.SSLWantReadError:
            self._wait_for(inc, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._wait_for(inc, selectors.EVENT_WRITE)
            return
        except (OSError, ssl.SSLError) as exc:
            log.debug("connection from %s failed before its request: %s", inc.host, exc)
            self._drop(inc)
            return
        self._unstage(inc)
        conn = inc.conn
        if conn.parser is None:
            conn.parser = gunicorn_http.get_parser(self.cfg, tls, conn.client)
        conn.parser.unreader.unread(bytes(inc.buf))
        conn.initialized = True
        conn.data_ready = True
        self.enqueue_req(conn)

    def _head_done(self, inc: _Incoming) -> None:
        """Set ``need`` once the head is complete; raise _Refused when it is refused."""
        end = inc.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(inc.buf) > MAX_HEAD:
                self._refuse(
                    inc,
                    _json_error(
                        431,
                        "Request Header Fields Too Large",
                        "headers_too_large",
                        f"the request head is longer than {MAX_HEAD} bytes",
                    ),
                )
            return
        length, refusal = _head_framing(bytes(inc.buf[:end]))
        if refusal is not None:
            self._refuse(inc, _json_error(*refusal))
        assert length is not None
        if length and len(inc.buf) < end + 4 + length:
            end = self._continue(inc, end)
        inc.need = end + 4 + length
        inc.deadline = time.monotonic() + BODY_DEADLINE

    @staticmethod
    def _continue(inc: _Incoming, end: int) -> int:
        """Answer ``Expect: 100-continue`` here (curl waits 1 s for it before sending a body).

        The line is taken out of the head so that gunicorn does not send a second 100.
        Returns the new end of the head.
        """
        lines = bytes(inc.buf[:end]).split(b"\r\n")
        kept = [
            line
            for line in lines
            if line.partition(b":")[0].strip().lower() != b"expect"
            or line.partition(b":")[2].strip().lower() != b"100-continue"
        ]
        if len(kept) == len(lines) or not lines[0].endswith(b"HTTP/1.1"):
            return end
        head = b"\r\n".join(kept)
        inc.buf[:end] = head
        with contextlib.suppress(OSError, ssl.SSLError):
            inc.conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        return len(head)

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        late = [i for same in self._incoming.values() for i in same.values() if i.deadline <= now]
        for inc in late:
            if not inc.draining:
                log.info(
                    "closing the connection from %s: no whole request within the deadline (%s)",
                    inc.host,
                    "body" if inc.need is not None else "handshake and head",
                )
            self._drop(inc)

    # ------------------------------------------------------------ in the pool

    def handle(self, conn: Any) -> Any:
        conn.broker_deadline = _WATCHDOG.arm(conn, REQUEST_DEADLINE)
        try:
            return super().handle(conn)
        finally:
            _WATCHDOG.disarm(conn.broker_deadline)


class _Refused(Exception):
    """The incoming stage answered the request itself (a refusal); the connection drains."""


def make_server_context(config: ServerConfig, *, max_tls: str = "") -> ssl.SSLContext:
    # With PAM on, users without certificates must reach the PAM routes, so a
    # client certificate becomes optional at the handshake (one that is sent must
    # still verify); every other route still refuses a request without a verified
    # chain (broker.api.app requester(), fail closed).
    # The same holds for pilots with bearer tokens when [tokens] issuers are configured.
    return server_context(
        host_cert=config.host_cert,
        host_key=config.host_key,
        ca_dir=config.ca_dir,
        certificate_optional=config.certificate_optional,
        max_tls=max_tls,
    )


class _ContextCache:
    """The worker's TLS context, rebuilt when the CA directory changes (one reload path with
    :class:`broker.trustdir.ReloadingTrustStore`)."""

    def __init__(self, config: ServerConfig) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._ctx: ssl.SSLContext | None = None
        self._watch: CaDirWatch | None = None  # made in the worker, after the fork
        self._version = -1

    def get(self) -> ssl.SSLContext:
        with self._lock:
            if self._watch is None:
                self._watch = CaDirWatch(self._config.ca_dir)
            version = self._watch.version()
            if self._ctx is None or version != self._version:
                try:
                    self._ctx = make_server_context(self._config)
                except (OSError, ssl.SSLError):
                    if self._ctx is None:
                        raise
                    log.exception("could not rebuild the TLS context; keeping the old one")
                self._version = version
            return self._ctx


class BrokerApplication(BaseApplication):  # type: ignore[misc]
    """gunicorn application that builds the service inside each worker (after fork)."""

    def __init__(self, config: ServerConfig) -> None:
        self.broker_config = config
        self._contexts = _ContextCache(config)
        super().__init__()

    def load_config(self) -> None:
        cfg = self.broker_config
        contexts = self._contexts

        def ssl_context(conf: Any, default_factory: Any) -> ssl.SSLContext:
            return contexts.get()

        settings = {
            "bind": [cfg.bind],
            "workers": cfg.workers,
            "threads": cfg.threads,
            "worker_class": "broker.server.DeadlineThreadWorker",
            "certfile": cfg.host_cert,
            "keyfile": cfg.host_key,
            "cert_reqs": ssl.CERT_OPTIONAL if cfg.certificate_optional else ssl.CERT_REQUIRED,
            "ssl_context": ssl_context,
            "timeout": 30,
            "graceful_timeout": 10,
            "keepalive": 5,
            "accesslog": None,
            "errorlog": "-",
            "loglevel": cfg.log_level,
            "logger_class": "broker.gunicorn_log.GunicornLogger",  # --log-format json
            "proc_name": "broker",
            "limit_request_line": 8190,
            "limit_request_fields": 50,
            # gunicorn 23+ opens a control socket in ~/.gunicorn by default; two brokers
            # (or a broker and a test) would fight over it, and we do not use it.
            "control_socket_disable": True,
        }
        for key, value in settings.items():
            if value is not None and key in self.cfg.settings:
                self.cfg.set(key, value)

    def load(self) -> Any:
        from broker.api.app import create_app
        from broker.runtime import build_runtime

        runtime = build_runtime(self.broker_config)
        from broker.admin_service import AdminSettings

        return create_app(
            runtime.service,
            pam=runtime.pam,
            online_ca=runtime.online_ca,
            admin=AdminSettings.from_config(runtime.config),
        )
