"""The ``broker`` admin command: serve, keys, audit, policy, dev PKI and proxy tools."""

from __future__ import annotations

import click

from broker.cli import keys_cmd  # noqa: F401 - registers keys status/add/activate/...
from broker.cli.common import run_command
from broker.cli.pki_cmd import dev_pki, proxy_info_cmd, proxy_init
from broker.cli.policy_cmd import policy
from broker.cli.serve_cmd import audit, keys, serve


@click.group()
@click.version_option(package_name="grid-credential-broker")
def cli() -> None:
    """Credential broker: a MyProxy-style proxy cache with policy, audit and REST API."""


cli.add_command(dev_pki)
cli.add_command(proxy_init)
cli.add_command(proxy_info_cmd)
cli.add_command(serve)
cli.add_command(keys)
cli.add_command(audit)
cli.add_command(policy)


def main() -> None:
    run_command(cli, "broker")
