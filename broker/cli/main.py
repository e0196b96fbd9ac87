"""The ``broker`` admin command: serve, keys, audit, policy, dev PKI and proxy tools."""

from __future__ import annotations

import click

from broker.cli.pki_cmd import dev_pki, proxy_info_cmd, proxy_init


@click.group()
@click.version_option(package_name="grid-credential-broker")
def cli() -> None:
    """Credential broker: a MyProxy-style proxy cache with policy, audit and REST API."""


cli.add_command(dev_pki)
cli.add_command(proxy_init)
cli.add_command(proxy_info_cmd)


def _attach_optional() -> None:
    # Subcommands that live in their own modules; each registers itself here.
    try:
        from broker.cli.policy_cmd import policy
    except ImportError:  # pragma: no cover - only while the module is being written
        return
    cli.add_command(policy)


_attach_optional()


def main() -> None:
    cli(prog_name="broker")
