"""Metrics across processes and endpoints, and the log format (text or JSON).

Metrics
    ``broker serve`` runs several processes (gunicorn workers, the MyProxy endpoint
    and its pre-forked children). :func:`enable_multiprocess_metrics` points
    prometheus_client's multiprocess mode at a private directory *before* the
    library is imported anywhere, so every process writes its counters and
    histograms to its own file there, and a scrape (:func:`aggregated_metrics`, used
    by the ops listener and by the REST ``/metrics``) adds them up.

    The service layer reports every audited event (both endpoints, allowed or
    refused) through :func:`observe_event`, which counts it by endpoint, action and
    outcome, counts refusals by reason, and records the time since the request's
    requester was established (a latency histogram per endpoint and action).

Logs
    :func:`configure_logging` honours the configured level and writes either the
    usual text lines or one JSON object per line (``time``, ``level``, ``logger``,
    ``message`` and, for request lines, ``request_id``, ``requester``, ``action``,
    ``outcome``, ``endpoint``). gunicorn's own log follows through
    :class:`broker.gunicorn_log.GunicornLogger`.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LOG_FORMAT_ENV = "BROKER_LOG_FORMAT"
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_REASON_RE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
_REQUEST_FIELDS = (
    "request_id",
    "requester",
    "action",
    "outcome",
    "endpoint",
    "reason",
    "duration_ms",
)

access_log = logging.getLogger("broker.access")


# ------------------------------------------------------------------ metrics


class _Instruments:
    """The counters and histograms the service layer feeds (made on first use, so that
    prometheus_client is imported after the multiprocess directory is set)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        # A private registry: in multiprocess mode the values go to the directory and a
        # scrape reads them from there, whatever registry the instruments are in.
        self.registry = CollectorRegistry()
        self.operations = Counter(
            "broker_operations",
            "Audited operations by endpoint, action and outcome (allow, deny, error)",
            ["endpoint", "action", "outcome"],
            registry=self.registry,
        )
        self.refusals = Counter(
            "broker_refusals",
            "Refused or failed operations by endpoint, action and reason",
            ["endpoint", "action", "reason"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "broker_operation_seconds",
            "Time from authentication to the audited outcome",
            ["endpoint", "action"],
            registry=self.registry,
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )


_instruments: _Instruments | None = None


def _get_instruments() -> _Instruments:
    global _instruments
    if _instruments is None:
        _instruments = _Instruments()
    return _instruments


def enable_multiprocess_metrics(parent: str | os.PathLike[str] | None = None) -> Path:
    """Give every process started from here on one private directory (0700) for its
    metrics, and return it. Call it in the parent before any worker starts and before
    anything imports prometheus_client.

    The directory is made in ``parent``, by default in /dev/shm (memory): prometheus_client
    writes through memory-mapped files, and a write into a mapped file on a full disk
    kills the process with SIGBUS, so the metrics must not share the state directory's
    disk. It is removed when this process exits (not when a forked worker does)."""
    if "prometheus_client" in sys.modules and not os.environ.get(MULTIPROC_ENV):
        logging.getLogger("broker.observability").warning(
            "prometheus_client was imported before the metrics directory was set: "
            "metrics stay per process"
        )
    if parent is None:
        shm = Path("/dev/shm")  # noqa: S108 - mkdtemp below makes a private, unguessable dir
        parent = shm if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else None
    _remove_stale_dirs(Path(parent or tempfile.gettempdir()))
    path = Path(tempfile.mkdtemp(prefix=f"broker-metrics-{os.getpid()}-", dir=parent))
    os.environ[MULTIPROC_ENV] = str(path)
    owner = os.getpid()

    def remove() -> None:
        if os.getpid() == owner:
            shutil.rmtree(path, ignore_errors=True)

    atexit.register(remove)
    logging.getLogger("broker.observability").info(
        "metrics of every process are summed from %s", path
    )
    return path


def _remove_stale_dirs(parent: Path) -> None:
    """Remove metrics directories of ours whose creating process is gone (a killed
    ``broker serve`` cannot remove its own)."""
    try:
        candidates = list(parent.glob("broker-metrics-*-*"))
    except OSError:
        return
    for candidate in candidates:
        pid_text = candidate.name.split("-")[2]
        try:
            st = candidate.lstat()
            if not pid_text.isdigit() or st.st_uid != os.geteuid():
                continue
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(candidate, ignore_errors=True)
        except OSError:
            continue


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def aggregated_registry() -> Any:
    """A registry that sums every process's values (multiprocess mode), or None."""
    directory = multiprocess_dir()
    if directory is None:
        return None
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return registry


def process_exited(pid: int) -> None:
    """Forget a dead worker's live gauges (gunicorn ``child_exit``); counters stay."""
    if multiprocess_dir() is None:
        return
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(pid)  # type: ignore[no-untyped-call]


def _reason_code(reason: str | None) -> str:
    code = (reason or "").split(":", 1)[0].strip()
    return code if _REASON_RE.match(code) else "other"


def observe_event(event: Any, started: float | None) -> None:
    """Count one audited event (a ``broker.store.AuditEvent``) and log its request line.

    ``started`` is the ``time.perf_counter()`` of the request's authentication. Never
    raises: metrics and logs must not turn a served request into an error.
    """
    try:
        elapsed = time.perf_counter() - started if started is not None else None
        endpoint, action, outcome = event.endpoint, event.action, event.decision
        instruments = _get_instruments()
        instruments.operations.labels(endpoint, action, outcome).inc()
        if outcome != "allow":
            instruments.refusals.labels(endpoint, action, _reason_code(event.reason)).inc()
        if elapsed is not None:
            instruments.latency.labels(endpoint, action).observe(elapsed)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(
                "%s %s %s by %s",
                endpoint,
                action,
                outcome,
                event.requester_dn or "anonymous",
                extra={
                    "request_id": event.request_id,
                    "requester": event.requester_dn,
                    "action": action,
                    "outcome": outcome,
                    "endpoint": endpoint,
                    "reason": event.reason if outcome != "allow" else None,
                    "duration_ms": round(elapsed * 1000, 2) if elapsed is not None else None,
                },
            )
    except Exception:  # see the docstring
        logging.getLogger("broker.observability").debug("could not record an event", exc_info=True)


# ------------------------------------------------------------------ logs


class JsonFormatter(logging.Formatter):
    """One JSON object per line; request fields when the record carries them."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for name in _REQUEST_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                doc[name] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


_log_format = "text"


def log_format() -> str:
    """The format chosen by :func:`configure_logging` (text until then)."""
    return _log_format


def make_formatter(log_format: str | None = None) -> logging.Formatter:
    return (
        JsonFormatter() if (log_format or _log_format) == "json" else logging.Formatter(TEXT_FORMAT)
    )


def inherited_log_format() -> str:
    """The format ``broker serve`` chose, for the processes it starts (the MyProxy child)."""
    value = os.environ.get(LOG_FORMAT_ENV, "text")
    return value if value in LOG_FORMATS else "text"


def configure_logging(level: str, log_format: str, *, text_format: str = TEXT_FORMAT) -> None:
    """Root logging at ``level`` (debug ... critical) in ``log_format`` (text or json), on
    standard error; processes started from here on inherit the format. Raises ValueError
    for an unknown level or format."""
    global _log_format
    if level.lower() not in LOG_LEVELS:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(LOG_LEVELS)}")
    if log_format not in LOG_FORMATS:
        raise ValueError(f"unknown log format {log_format!r}; use text or json")
    _log_format = log_format
    os.environ[LOG_FORMAT_ENV] = log_format
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(text_format)
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
