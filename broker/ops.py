"""The operations listener: ``/metrics`` and ``/healthz`` over plain HTTP, no client certificate.

``broker serve --ops-bind 127.0.0.1:9180`` runs it in a thread of the serving
process (the gunicorn master), so that a Prometheus scraper or a load balancer's
health check, which hold no grid certificate, can reach both. It binds to
loopback unless told otherwise; it shows no credential, owner or DN, only counts.

``GET /metrics``
    Every process's counters and histograms added up (multiprocess mode, see
    :mod:`broker.observability`), plus gauges read from the database and files at
    scrape time: stored credentials, credentials expiring within 24 h and 7 days,
    the host certificate's expiry time, and one 0/1 gauge per health check.
``GET /healthz``
    200 ``{"status": "ok", "checks": {...}}`` when the database answers, a policy is
    loaded and the master key file is readable; otherwise 503 with the failing
    check's reason.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sqlalchemy import Engine, func, select, text

from broker.config import ServerConfig
from broker.errors import ConfigError

log = logging.getLogger("broker.ops")

EXPIRY_WINDOWS = (("24h", timedelta(hours=24)), ("7d", timedelta(days=7)))


def parse_ops_bind(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``PORT`` (then 127.0.0.1); a bad value is a ConfigError."""
    text_value = value.strip()
    host, sep, port = text_value.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text_value
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--ops-bind {value!r}: give HOST:PORT or PORT (1-65535)")
    return host, int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: str


class HealthChecks:
    """The checks behind ``/healthz`` (and the ``broker_health_check`` gauges)."""

    def __init__(
        self, config: ServerConfig, engine: Engine, policy_loaded: Callable[[], str | None]
    ) -> None:
        self.config = config
        self.engine = engine
        self._policy_loaded = policy_loaded

    def database(self) -> CheckResult:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:  # any driver failure means "not reachable"
            from broker.store.engine import unavailable_error

            return CheckResult(False, unavailable_error(self.engine, exc).message)
        return CheckResult(True, "reachable")

    def policy(self) -> CheckResult:
        try:
            problem = self._policy_loaded()
        except Exception as exc:
            return CheckResult(False, f"no policy: {exc}")
        return CheckResult(
            True,
            "loaded" if problem is None else f"loaded; the last edit was not applied: {problem}",
        )

    def key_file(self) -> CheckResult:
        from broker.store import load_master_keys

        try:
            ring = load_master_keys(self.config.master_key_file)
        except ConfigError as exc:
            return CheckResult(False, exc.message)
        return CheckResult(True, f"readable, {len(ring.ids)} key(s)")

    def run(self) -> dict[str, CheckResult]:
        return {
            "database": self.database(),
            "policy": self.policy(),
            "master_key_file": self.key_file(),
        }


class _StateCollector:
    """Gauges read at scrape time (this process only; they describe shared state)."""

    def __init__(self, checks: HealthChecks, clock: Callable[[], datetime]) -> None:
        self._checks = checks
        self._clock = clock

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        health = GaugeMetricFamily("broker_health_check", "1 if the check passes", labels=["check"])
        for name, result in self._checks.run().items():
            health.add_metric([name], 1.0 if result.ok else 0.0)
        yield health
        now = self._clock()
        try:
            stored, expiring = self._credential_counts(now)
        except Exception:  # the database check above already says why
            log.debug("credential counts unavailable", exc_info=True)
        else:
            yield GaugeMetricFamily("broker_credentials_stored", "Stored credentials", value=stored)
            soon = GaugeMetricFamily(
                "broker_credentials_expiring",
                "Stored credentials whose certificate ends within the window (not yet expired)",
                labels=["within"],
            )
            for label, count in expiring.items():
                soon.add_metric([label], count)
            yield soon
        not_after = self._host_cert_not_after()
        if not_after is not None:
            yield GaugeMetricFamily(
                "broker_host_certificate_expiry_timestamp_seconds",
                "When the host certificate expires (Unix time)",
                value=not_after.timestamp(),
            )

    def _credential_counts(self, now: datetime) -> tuple[int, dict[str, int]]:
        from broker.store.models import Credential

        with self._checks.engine.connect() as conn:
            stored = int(conn.execute(select(func.count()).select_from(Credential)).scalar_one())
            expiring = {}
            for label, window in EXPIRY_WINDOWS:
                stmt = (
                    select(func.count())
                    .select_from(Credential)
                    .where(Credential.not_after > now, Credential.not_after <= now + window)
                )
                expiring[label] = int(conn.execute(stmt).scalar_one())
        return stored, expiring

    def _host_cert_not_after(self) -> datetime | None:
        from cryptography import x509

        try:
            with open(self._checks.config.host_cert, "rb") as handle:
                cert = x509.load_pem_x509_certificate(handle.read())
        except (OSError, ValueError):
            return None
        return cert.not_valid_after_utc


class OpsServer:
    """The listener; :meth:`start` serves in a daemon thread until :meth:`stop`."""

    def __init__(
        self,
        bind: tuple[str, int],
        checks: HealthChecks,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.checks = checks
        self.collector = _StateCollector(checks, clock)
        ops = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "broker-ops"
            sys_version = ""
            timeout = 10  # seconds a connection may sit idle (slow clients hold a thread)

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, status, kind = ops.metrics(), 200, _METRICS_TYPE
                elif path == "/healthz":
                    doc, status = ops.health()
                    body, kind = json.dumps(doc).encode(), "application/json"
                else:
                    body = json.dumps(
                        {
                            "error": "not_found",
                            "message": "the ops listener serves /metrics and /healthz",
                        }
                    ).encode()
                    status, kind = 404, "application/json"
                self._send(status, kind, body)

            def _refuse(self) -> None:
                body = json.dumps(
                    {"error": "method_not_allowed", "message": "only GET is served here"}
                ).encode()
                self._send(405, "application/json", body)

            do_POST = do_PUT = do_DELETE = do_PATCH = _refuse

            def _send(self, status: int, kind: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("ops %s " + format, self.client_address[0], *args)

        host, port = bind
        if not _is_loopback(host):
            log.warning(
                "the ops listener binds to %s, not loopback: anyone who can reach it "
                "reads the broker's metrics",
                host,
            )
        try:
            self.server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port} for --ops-bind: {exc.strerror}"
            ) from None
        self.server.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def metrics(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest

        from broker.observability import aggregated_registry

        registry = aggregated_registry() or CollectorRegistry()
        registry.register(self.collector)
        return bytes(generate_latest(registry))

    def health(self) -> tuple[dict[str, Any], int]:
        results = self.checks.run()
        ok = all(r.ok for r in results.values())
        doc = {
            "status": "ok" if ok else "unavailable",
            "checks": {name: {"ok": r.ok, "detail": r.detail} for name, r in results.items()},
        }
        return doc, 200 if ok else 503

    def start(self) -> OpsServer:
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="broker-ops", daemon=True
        )
        self.thread.start()
        host, port = self.address
        log.info("ops listener (metrics, health) on http://%s:%d", host, port)
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


_METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def start_ops_listener(
    config: ServerConfig, bind: str, policy_loaded: Callable[[], str | None]
) -> OpsServer:
    """Start the listener of ``broker serve`` (engine of its own, a few connections)."""
    from broker.store import make_engine

    engine = (
        make_engine(config.database_url, pool_size=2, max_overflow=0)
        if not config.database_url.startswith("sqlite")
        else make_engine(config.database_url)
    )
    return OpsServer(parse_ops_bind(bind), HealthChecks(config, engine, policy_loaded)).start()
