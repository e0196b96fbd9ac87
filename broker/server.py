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

import heapq
import logging
import socket
import ssl
import threading
import time
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import ThreadWorker

from broker.config import ServerConfig
from broker.trustdir import CaDirWatch

log = logging.getLogger("broker.server")

# A client must deliver its request head (TLS handshake included) within this many seconds,
# and the whole exchange must end within REQUEST_DEADLINE: gunicorn's gthread worker has no
# read timeout of its own, so a slow-loris client could hold a worker thread forever.
HEAD_DEADLINE = 3.0
REQUEST_DEADLINE = 30.0


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


class DeadlineThreadWorker(ThreadWorker):  # type: ignore[misc]
    """gthread with deadlines per request: HEAD_DEADLINE for the head, REQUEST_DEADLINE in all."""

    def handle(self, conn: Any) -> Any:
        conn.broker_deadline = _WATCHDOG.arm(conn, HEAD_DEADLINE)
        try:
            return super().handle(conn)
        finally:
            _WATCHDOG.disarm(conn.broker_deadline)

    def handle_request(self, req: Any, conn: Any) -> Any:
        # The head has arrived: from here the longer deadline covers body and response.
        _WATCHDOG.disarm(conn.broker_deadline)
        conn.broker_deadline = _WATCHDOG.arm(conn, REQUEST_DEADLINE)
        return super().handle_request(req, conn)


def make_server_context(config: ServerConfig, *, max_tls: str = "") -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if max_tls == "1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.host_cert, config.host_key)
    ctx.load_verify_locations(capath=config.ca_dir)
    # With PAM on, users without certificates must reach the PAM routes, so a
    # client certificate becomes optional at the handshake (one that is sent must
    # still verify); every other route still refuses a request without a verified
    # chain (broker.api.app requester(), fail closed).
    ctx.verify_mode = ssl.CERT_OPTIONAL if config.pam_service else ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_ALLOW_PROXY_CERTS
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    return ctx


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
            "cert_reqs": ssl.CERT_OPTIONAL if cfg.pam_service else ssl.CERT_REQUIRED,
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
        return create_app(runtime.service, pam=runtime.pam, online_ca=runtime.online_ca)
