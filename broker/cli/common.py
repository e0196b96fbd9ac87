"""What every command shares: error reporting and exit codes.

Exit codes (all commands):

====  ==========================================================
0     success
1     bad input or a request the broker refused as malformed
2     system or server error (the broker is down, a file cannot be written)
3     denied / not authenticated (the policy said no; ``policy explain`` also uses 3)
4     not found (no such credential)
====  ==========================================================
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import ParamSpec, TypeVar

import click

from broker.errors import BrokerError

P = ParamSpec("P")
R = TypeVar("R")


def utcnow() -> datetime:
    """The one clock read of the CLIs; library code gets ``now`` passed in."""
    return datetime.now(UTC)


def fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def reports_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn a :class:`BrokerError` (and stray OS errors) into a message and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except BrokerError as exc:
            click.echo(f"error: {exc.message}", err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            click.echo(f"error: {exc.strerror or exc}{where}", err=True)
            sys.exit(2)
        except click.exceptions.Exit:
            raise
        except Exception as exc:
            click.echo(
                f"error: internal error ({type(exc).__name__}: {exc}); please report it", err=True
            )
            sys.exit(2)

    return wrapper


def format_timedelta(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
