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


def run_command(command: click.Command, prog_name: str) -> None:
    """Run a click command with the documented exit codes: a usage error is bad input (1),
    not click's 2, which this project reserves for system and server errors."""
    try:
        command.main(prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(1)
    sys.exit(0)
