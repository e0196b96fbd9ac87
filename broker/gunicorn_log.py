"""gunicorn's error log in the broker's log format (see :mod:`broker.observability`)."""

from __future__ import annotations

from typing import Any

from gunicorn.glogging import Logger

from broker.observability import log_format, make_formatter


class GunicornLogger(Logger):  # type: ignore[misc]
    """gunicorn's error log in the format chosen by :func:`configure_logging`."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        if log_format() == "json":
            for handler in self.error_log.handlers:
                handler.setFormatter(make_formatter())
