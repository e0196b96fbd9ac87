"""``broker-submit``: check a submit description, the caller's stored credential, then submit.

    broker-submit JOB.sub [-k CREDNAME] [--min-hours H] [--lifetime H] [--dry-run]
                  [-o FILE] [-s SERVER] [--ca-dir D] [--proxy F | --cert F --key F]

Exit codes as for the other commands (broker/cli/common.py): 1 a bad submit
description, 2 no schedd / broker unreachable, 3 not authenticated,
4 no usable credential stored.
"""

from __future__ import annotations

from pathlib import Path

import click

from broker.cli.common import format_timedelta, reports_errors, run_command
from broker.cli.user import _client, common_ca, common_server
from broker.condor.submit import augment_submit, submit_to_schedd
from broker.errors import BrokerError, InputError, NotFound

__all__ = ["main", "submit_cmd"]


def _fix_hint(name: str) -> str:
    return (f"store one with: broker-init -k {name} (add -Z <pilot DN> if the site's policy "
            "does not already let its pilots retrieve), then run broker-submit again")


def check_credential(info: dict[str, object], name: str, min_hours: float) -> dict[str, object]:
    """The caller's credential ``name`` with at least ``min_hours`` left; else NotFound."""
    identity = info.get("identity")
    creds = info.get("credentials")
    mine = [c for c in creds if isinstance(c, dict) and c.get("name") == name
            and c.get("owner") == identity] if isinstance(creds, list) else []
    if not mine:
        raise NotFound(f"you ({identity}) have no credential named {name!r} in the broker; "
                       + _fix_hint(name), reason="no_credential")
    best = max(mine, key=lambda c: int(c.get("timeleft", 0)))
    left = int(best.get("timeleft", 0))
    if left < min_hours * 3600:
        raise NotFound(
            f"your credential {name!r} has only {format_timedelta(left)} left, less than the "
            f"{min_hours:g} h the job needs (--min-hours); " + _fix_hint(name),
            reason="credential_too_short")
    if best.get("passphrase_protected"):
        raise InputError(
            f"your credential {name!r} is protected by a passphrase, which a pilot cannot "
            f"supply; store it again without one (broker-init -k {name})",
            reason="passphrase_protected")
    return best


@click.command("broker-submit")
@click.argument("submit_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-k", "--credname", default="default", show_default=True,
              help="Name of your stored credential the pilot fetches.")
@click.option("--min-hours", type=float, default=2.0, show_default=True,
              help="Refuse to submit when the stored credential has less time left.")
@click.option("--lifetime", "lifetime_hours", type=float,
              help="Proxy lifetime the pilot asks for, in hours (+BrokerLifetime).")
@click.option("--dry-run", is_flag=True, help="Print the augmented description, do not submit.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the augmented description to this file.")
@click.option("--schedd", "schedd_name", help="Submit to this schedd instead of the local one.")
@common_server
@common_ca
@click.option("--proxy", help="Authenticate with this proxy file [X509_USER_PROXY].")
@click.option("--cert", help="Authenticate with this certificate.")
@click.option("--key", help="Key for --cert.")
@reports_errors
def submit_cmd(submit_file: Path, credname: str, min_hours: float, lifetime_hours: float | None,
               dry_run: bool, output: Path | None, schedd_name: str | None, server: str | None,
               ca_dir: str | None, proxy: str | None, cert: str | None,
               key: str | None) -> None:
    """Submit an HTCondor job whose pilot fetches your proxy from the broker."""
    try:
        text = submit_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the submit description {submit_file}: {exc}") from exc
    # A first pass with a placeholder owner catches a broken description before
    # the broker is asked anything.
    augment_submit(text, owner_dn="/CN=placeholder", credential=credname,
                   lifetime_hours=lifetime_hours)
    client = _client(server, ca_dir, proxy, cert, key)
    try:
        info = client.info(name=credname)
    except NotFound:
        info = {"identity": None, "credentials": []}
    check_credential(info, credname, min_hours)
    owner = str(info["identity"])
    augmented = augment_submit(text, owner_dn=owner, credential=credname,
                               lifetime_hours=lifetime_hours)
    if output is not None:
        output.write_text(augmented.text, encoding="utf-8")
    if augmented.removed:
        click.echo(f"note: replaced your {', '.join(augmented.removed)} line(s)", err=True)
    if dry_run:
        click.echo(augmented.text, nl=False)
        return
    try:
        cluster = submit_to_schedd(augmented, schedd_name=schedd_name)
    except BrokerError:
        click.echo(augmented.text, nl=False)
        raise
    click.echo(f"Submitted cluster {cluster} for {owner} (credential {credname!r}).")


def main() -> None:
    run_command(submit_cmd, "broker-submit")
