"""``broker serve``, ``broker keys init|rotate`` and ``broker audit``."""

from __future__ import annotations

import json
import logging
from typing import Any

import click

from broker.cli.common import (
    config_option,
    database_url_option,
    master_key_option,
    opened_store,
    reports_errors,
    state_dir_option,
    utcnow,
    where_options,
)
from broker.config import load_config
from broker.errors import ConfigError


@click.command("serve")
@config_option
@click.option("--bind", help="REST endpoint HOST:PORT [127.0.0.1:8443].")
@click.option("--myproxy-bind", help="MyProxy endpoint HOST:PORT (empty: off).")
@state_dir_option
@database_url_option
@click.option("--host-cert")
@click.option("--host-key")
@click.option("--ca-dir")
@click.option("--vomsdir")
@click.option("--policy-dir")
@master_key_option
@click.option("--workers", type=int)
@click.option("--threads", type=int)
@click.option("--max-tls", type=click.Choice(["1.2", "1.3"]))
@click.option(
    "--username-binding",
    type=click.Choice(["dn", "none"]),
    help="dn: a credential's username must be its owner's DN-derived name [dn].",
)
@click.option(
    "--ops-bind",
    default="",
    help="Plain-HTTP HOST:PORT (or PORT, on 127.0.0.1) "
    "serving /metrics and /healthz without a client certificate [off].",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one object per line.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="[log_level in the config, info].",
)
@reports_errors
def serve(config_path: str | None, ops_bind: str, log_format: str, **flags: Any) -> None:
    """Run the broker (REST over mutual TLS; MyProxy protocol when --myproxy-bind is set)."""
    from broker.observability import configure_logging, enable_multiprocess_metrics
    from broker.runtime import check_policy, prepare_state
    from broker.server import BrokerApplication

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = load_config(config_path, flags)
    try:
        configure_logging(config.log_level, log_format)
    except ValueError as exc:
        raise ConfigError(f"log_level: {exc}") from None
    if ops_bind:
        from broker.ops import parse_ops_bind

        parse_ops_bind(ops_bind)  # a bad value stops us before anything is created
    prepare_state(config)
    policy = check_policy(config)  # refuse to start on an invalid or unsafe policy
    # Before any worker (or the MyProxy child) starts: counters of every process, one view.
    enable_multiprocess_metrics()
    if ops_bind:
        from broker.ops import start_ops_listener

        def policy_problem() -> str | None:
            policy.reload_if_changed()
            return policy.last_error

        start_ops_listener(config, ops_bind, policy_problem)
    click.echo(
        f"broker: REST on https://{config.bind} state={config.state_dir} "
        f"policy={config.policy_dir}",
        err=True,
    )
    if config.myproxy_bind:
        from broker.myproxy.server import start_myproxy_in_master

        start_myproxy_in_master(config)
    BrokerApplication(config).run()


@click.group("keys")
def keys() -> None:
    """Master key management (the key that wraps every credential's data key)."""


@keys.command("init")
@config_option
@state_dir_option
@master_key_option
@reports_errors
def keys_init(config_path: str | None, **flags: Any) -> None:
    """Create the master key file (0600, never overwritten)."""
    from broker.store import init_master_key_file

    config = load_config(config_path, flags)
    from broker.fileio import make_private_dir

    make_private_dir(config.state_dir)
    init_master_key_file(config.master_key_file, now=utcnow())
    click.echo(f"master key created in {config.master_key_file}")


@keys.command("rotate")
@where_options
@reports_errors
def keys_rotate(config_path: str | None, **flags: Any) -> None:
    """Add a new master key, re-wrap every data key with it, then drop the old key."""
    from broker.store import rotate_master_key

    config = load_config(config_path, flags)
    with opened_store(config) as store:
        report = rotate_master_key(store, config.master_key_file, now=utcnow())
    click.echo(f"master key rotated: {report}")


@click.command("audit")
@config_option
@state_dir_option
@database_url_option
@click.option("--owner", help="Only events for credentials of this owner DN.")
@click.option("--job-id", help="Only events for this job.")
@click.option("--action", help="Only this action (delegate, retrieve, renew, info, destroy...).")
@click.option("--limit", default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@reports_errors
def audit(
    config_path: str | None,
    owner: str | None,
    job_id: str | None,
    action: str | None,
    limit: int,
    as_json: bool,
    **flags: Any,
) -> None:
    """Who fetched whose credential, for which job (newest first)."""
    from broker.store.crypto import MasterKeyRing

    config = load_config(config_path, flags)
    # Audit rows hold no key material: a throwaway in-memory key ring is enough.
    with opened_store(config, MasterKeyRing.generate(now=utcnow())) as store:
        rows = store.query_audit(owner_dn=owner, job_id=job_id, action=action, limit=limit)
    if as_json:
        click.echo(json.dumps([_row(r) for r in rows], indent=2))
        return
    if not rows:
        click.echo("no audit events match")
    for r in rows:
        who = r.requester_dn or "anonymous"
        if r.requester_fqans:
            who += f" ({', '.join(r.requester_fqans)})"
        target = f"{r.owner_dn or '-'} [{r.username or '-'}/{r.credential_name or '-'}]"
        job = f" job={r.job_id}" if r.job_id else ""
        click.echo(
            f"{r.time:%Y-%m-%d %H:%M:%S} {r.endpoint:7} {r.action:17} {r.decision:5} "
            f"{who} -> {target}{job}  ({r.reason or ''})"
        )


def _row(r: Any) -> dict[str, Any]:
    return {
        "time": r.time.isoformat(),
        "action": r.action,
        "decision": r.decision,
        "endpoint": r.endpoint,
        "requester": r.requester_dn,
        "requester_fqans": list(r.requester_fqans),
        "owner": r.owner_dn,
        "username": r.username,
        "credential": r.credential_name,
        "job_id": r.job_id,
        "reason": r.reason,
        "client_address": r.client_address,
        "request_id": r.request_id,
    }
