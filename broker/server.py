"""``broker serve``: gunicorn with mutual TLS that accepts RFC 3820 proxies.

gunicorn calls the ``ssl_context`` server hook for every connection; the hook
returns a context built once per worker (rebuilt every minute so that CRL and
CA-directory updates take effect) with:

* client certificates required, verified against the CA directory (``capath``);
* ``VERIFY_ALLOW_PROXY_CERTS``, without which OpenSSL refuses every proxy;
* no session tickets (``num_tickets = 0``, ``OP_NO_TICKET``): on a resumed
  session the verified chain is gone, and the app refuses such requests.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from typing import Any

from gunicorn.app.base import BaseApplication

from broker.config import ServerConfig

log = logging.getLogger("broker.server")

_CONTEXT_TTL = 60.0


def make_server_context(config: ServerConfig, *, max_tls: str = "") -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if max_tls == "1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.host_cert, config.host_key)
    ctx.load_verify_locations(capath=config.ca_dir)
    # [pam] With PAM on, users without certificates must reach the PAM routes, so a
    # client certificate becomes optional at the handshake (one that is sent must
    # still verify); every other route still refuses a request without a verified
    # chain (broker.api.app requester(), fail closed).
    ctx.verify_mode = ssl.CERT_OPTIONAL if config.pam_service else ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_ALLOW_PROXY_CERTS
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    return ctx


class _ContextCache:
    def __init__(self, config: ServerConfig) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._ctx: ssl.SSLContext | None = None
        self._built = 0.0

    def get(self) -> ssl.SSLContext:
        with self._lock:
            if self._ctx is None or time.monotonic() - self._built > _CONTEXT_TTL:
                self._ctx = make_server_context(self._config)
                self._built = time.monotonic()
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
            "worker_class": "gthread",
            "certfile": cfg.host_cert,
            "keyfile": cfg.host_key,
            "cert_reqs": ssl.CERT_OPTIONAL if cfg.pam_service else ssl.CERT_REQUIRED,  # [pam]
            "ssl_context": ssl_context,
            "timeout": 30,
            "graceful_timeout": 10,
            "keepalive": 5,
            "accesslog": None,
            "errorlog": "-",
            "loglevel": cfg.log_level,
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
        return create_app(runtime.service, pam=runtime.pam, online_ca=runtime.online_ca)  # [pam]
