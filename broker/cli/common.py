"""What the commands share: error reporting, exit codes, the options naming a
server's configuration and state, and opening its store.

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

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import click

from broker.errors import BrokerError

if TYPE_CHECKING:
    from broker.config import ServerConfig
    from broker.store import MasterKeyRing, Store

P = ParamSpec("P")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])

# The options that say where a server's configuration and state live (serve, keys, audit).
config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="broker.toml (flags override it).",
)
state_dir_option = click.option("--state-dir", help="State directory [./broker-state].")
database_url_option = click.option(
    "--database-url", help="SQLAlchemy URL [SQLite in the state dir]."
)
master_key_option = click.option("--master-key-file")


def where_options(func: F) -> F:
    """--config, --state-dir, --database-url and --master-key-file, in that order."""
    for option in (master_key_option, database_url_option, state_dir_option, config_option):
        func = option(func)
    return func


@contextlib.contextmanager
def opened_store(config: ServerConfig, keys: MasterKeyRing | None = None) -> Iterator[Store]:
    """The configured database, closed afterwards.

    ``keys`` defaults to the master key file's ring; a command that reads no key
    material (the audit) passes a throwaway ring instead.
    """
    from broker.store import Store, load_master_keys, make_engine

    engine = make_engine(config.database_url)  # before the key file, as the commands did
    store = Store(engine, keys if keys is not None else load_master_keys(config.master_key_file))
    try:
        yield store
    finally:
        store.close()


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
