"""``broker keys status|add|activate|rewrap|retire``: master keys on several nodes.

These attach to the ``keys`` group of :mod:`broker.cli.serve_cmd` (which has
``init`` and the single-node ``rotate``). The staged procedure and why it needs
no downtime are in :mod:`broker.store.crypto` and docs/deployment.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import click

from broker.cli.common import reports_errors, utcnow
from broker.cli.serve_cmd import keys
from broker.config import load_config

_config_opt = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="broker.toml (flags override it).",
)
_state_opt = click.option("--state-dir", help="State directory [./broker-state].")
_db_opt = click.option("--database-url", help="SQLAlchemy URL [SQLite in the state dir].")
_key_opt = click.option("--master-key-file")


F = TypeVar("F", bound=Callable[..., Any])


def _where_options(func: F) -> F:
    """--config, --state-dir, --database-url and --master-key-file, shared by every command."""
    for option in (_key_opt, _db_opt, _state_opt, _config_opt):
        func = option(func)
    return func


def _store(config: Any) -> Any:
    from broker.store import Store, load_master_keys, make_engine

    return Store(make_engine(config.database_url), load_master_keys(config.master_key_file))


@keys.command("status")
@_where_options
@click.option("--json", "as_json", is_flag=True)
@reports_errors
def keys_status(config_path: str | None, as_json: bool, **flags: Any) -> None:
    """Which master key wraps how many stored rows; keys the file lacks are flagged."""
    from broker.store.crypto import key_status, load_master_keys

    config = load_config(config_path, flags)
    store = _store(config)
    try:
        rows = key_status(load_master_keys(config.master_key_file), store.master_key_ids_in_use())
    finally:
        store.close()
    if as_json:
        click.echo(
            json.dumps(
                [
                    {"id": r.key_id, "in_file": r.in_file, "active": r.active, "rows": r.rows}
                    for r in rows
                ],
                indent=2,
            )
        )
        return
    click.echo(f"{'key id':32} {'state':9} rows (credentials + pending delegations)")
    for r in rows:
        state = "active" if r.active else ("standby" if r.in_file else "MISSING")
        click.echo(f"{r.key_id:32} {state:9} {r.rows}")
    missing = [r.key_id for r in rows if not r.in_file]
    if missing:
        click.echo(
            f"warning: the database uses key(s) not in {config.master_key_file}: "
            f"{', '.join(missing)}; copy the key file from a node that has them",
            err=True,
        )


@keys.command("add")
@_where_options
@reports_errors
def keys_add(config_path: str | None, **flags: Any) -> None:
    """Step 1: add a new key, not active yet; then copy the file to every node."""
    from broker.store.crypto import add_master_key

    config = load_config(config_path, flags)
    key_id = add_master_key(config.master_key_file, now=utcnow())
    click.echo(
        f"added {key_id} (standby); copy {config.master_key_file} to every node, "
        f"then: broker keys activate {key_id}"
    )


@keys.command("activate")
@_where_options
@click.argument("key_id")
@reports_errors
def keys_activate(config_path: str | None, key_id: str, **flags: Any) -> None:
    """Step 2: wrap new rows with KEY_ID; then copy the file to every node."""
    from broker.store.crypto import activate_master_key

    config = load_config(config_path, flags)
    activate_master_key(config.master_key_file, key_id, now=utcnow())
    click.echo(
        f"{key_id} is active; copy {config.master_key_file} to every node, then: broker keys rewrap"
    )


@keys.command("rewrap")
@_where_options
@reports_errors
def keys_rewrap(config_path: str | None, **flags: Any) -> None:
    """Step 3: rewrap every stored row with the active key (database-wide)."""
    from broker.store.crypto import rewrap_all

    config = load_config(config_path, flags)
    store = _store(config)
    try:
        count = rewrap_all(store, config.master_key_file)
    finally:
        store.close()
    click.echo(
        f"rewrapped {count} row(s); check with 'broker keys status', then retire the old key"
    )


@keys.command("retire")
@_where_options
@click.argument("key_id")
@reports_errors
def keys_retire(config_path: str | None, key_id: str, **flags: Any) -> None:
    """Step 4: remove KEY_ID from the file (refused while rows use it)."""
    from broker.store.crypto import retire_master_key

    config = load_config(config_path, flags)
    store = _store(config)
    try:
        retire_master_key(store, config.master_key_file, key_id, now=utcnow())
    finally:
        store.close()
    click.echo(f"retired {key_id}; copy {config.master_key_file} to every node")
