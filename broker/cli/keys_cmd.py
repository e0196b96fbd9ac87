"""``broker keys status|add|activate|rewrap|retire``: master keys on several nodes.

These attach to the ``keys`` group of :mod:`broker.cli.serve_cmd` (which has
``init`` and the single-node ``rotate``). The staged procedure and why it needs
no downtime are in :mod:`broker.store.crypto` and docs/deployment.md.
"""

from __future__ import annotations

import json
from typing import Any

import click

from broker.cli.common import opened_store, reports_errors, utcnow, where_options
from broker.cli.serve_cmd import keys
from broker.config import load_config


@keys.command("status")
@where_options
@click.option("--json", "as_json", is_flag=True)
@reports_errors
def keys_status(config_path: str | None, as_json: bool, **flags: Any) -> None:
    """Which master key wraps how many stored rows; keys the file lacks are flagged."""
    from broker.store.crypto import key_status, load_master_keys

    config = load_config(config_path, flags)
    with opened_store(config) as store:
        rows = key_status(load_master_keys(config.master_key_file), store.master_key_ids_in_use())
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
@where_options
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
@where_options
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
@where_options
@reports_errors
def keys_rewrap(config_path: str | None, **flags: Any) -> None:
    """Step 3: rewrap every stored row with the active key (database-wide)."""
    from broker.store.crypto import rewrap_all

    config = load_config(config_path, flags)
    with opened_store(config) as store:
        count = rewrap_all(store, config.master_key_file)
    click.echo(
        f"rewrapped {count} row(s); check with 'broker keys status', then retire the old key"
    )


@keys.command("retire")
@where_options
@click.argument("key_id")
@reports_errors
def keys_retire(config_path: str | None, key_id: str, **flags: Any) -> None:
    """Step 4: remove KEY_ID from the file (refused while rows use it)."""
    from broker.store.crypto import retire_master_key

    config = load_config(config_path, flags)
    with opened_store(config) as store:
        retire_master_key(store, config.master_key_file, key_id, now=utcnow())
    click.echo(f"retired {key_id}; copy {config.master_key_file} to every node")
