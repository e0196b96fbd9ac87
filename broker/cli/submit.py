"""``broker-submit``: check a submit description, the caller's stored credential, then submit.

    broker-submit JOB.sub [-k CREDNAME] [--min-hours H] [--lifetime H] [--dry-run]
                  [-o FILE] [-s SERVER] [--ca-dir D] [--proxy F | --cert F --key F]
                  [--pilot DN]... [--policy-dir DIR]

With the site's pilot DNs (``--pilot``, or ``$BROKER_SUBMIT_PILOTS``, one DN per
line) and its policy directory (``--policy-dir`` or ``$BROKER_POLICY_DIR``), it
warns before submitting when neither the site policy nor the credential's own
retriever lists would let any of those pilots retrieve the credential: the same
decision ``broker policy explain --action retrieve`` shows.

Exit codes as for the other commands (broker/cli/common.py): 1 a bad submit
description, 2 no schedd / broker unreachable, 3 not authenticated,
4 no usable credential stored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import click

from broker.cli.common import format_timedelta, reports_errors, run_command
from broker.cli.user import _client, common_ca, common_server, identity_options
from broker.condor.submit import augment_submit, submit_to_schedd
from broker.errors import BrokerError, InputError, NotFound
from broker.naming import DEFAULT_CREDENTIAL, policy_name

__all__ = ["main", "submit_cmd"]


def _fix_hint(name: str) -> str:
    return (
        f"store one with: broker-init -k {name} (add -Z <pilot DN> if the site's policy "
        "does not already let its pilots retrieve), then run broker-submit again"
    )


def check_credential(info: dict[str, object], name: str, min_hours: float) -> dict[str, object]:
    """The caller's credential ``name`` with at least ``min_hours`` left; else NotFound."""
    identity = info.get("identity")
    creds = info.get("credentials")
    mine = (
        [
            c
            for c in creds
            if isinstance(c, dict) and c.get("name") == name and c.get("owner") == identity
        ]
        if isinstance(creds, list)
        else []
    )
    if not mine:
        you = f"you ({identity})" if isinstance(identity, str) and identity else "you"
        raise NotFound(
            f"{you} have no credential named {name!r} in the broker; " + _fix_hint(name),
            reason="no_credential",
        )
    best = max(mine, key=lambda c: int(c.get("timeleft", 0)))
    left = int(best.get("timeleft", 0))
    if left < min_hours * 3600:
        raise NotFound(
            f"your credential {name!r} has only {format_timedelta(left)} left, less than the "
            f"{min_hours:g} h the job needs (--min-hours); " + _fix_hint(name),
            reason="credential_too_short",
        )
    if best.get("passphrase_protected"):
        raise InputError(
            f"your credential {name!r} is protected by a passphrase, which a pilot cannot "
            f"supply; store it again without one (broker-init -k {name})",
            reason="passphrase_protected",
        )
    return best


def configured_pilots(given: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """``--pilot`` values, else the DNs in ``$BROKER_SUBMIT_PILOTS`` (one per line)."""
    if given:
        return [p.strip() for p in given if p.strip()]
    text = environ.get("BROKER_SUBMIT_PILOTS", "")
    return [line.strip() for line in text.splitlines() if line.strip()]


def pilot_warnings(
    owner: str, name: str, credential: Mapping[str, object], pilots: Sequence[str], policy_dir: Path
) -> list[str]:
    """Why no configured pilot may retrieve the credential (empty: at least one may).

    The decision is the broker's own (:func:`broker.policy.evaluate` over the site policy
    directory and the credential's retriever lists), as ``broker policy explain`` makes it.
    """
    from broker.policy import Action, AuthMethod, OwnerPolicy, Request, evaluate
    from broker.policy_dir import read_policy_directory

    policy_set = read_policy_directory(policy_dir, allow_unsafe=True)

    def listed(key: str) -> tuple[str, ...] | None:
        value = credential.get(key)
        return tuple(str(v) for v in value) or None if isinstance(value, list) else None

    retrievers, trusted, renewers = (
        listed("retrievers"),
        listed("trusted_retrievers"),
        listed("renewers"),
    )
    owner_policy = None
    if retrievers or trusted or renewers:
        owner_policy = OwnerPolicy(
            retrievers=retrievers, trusted_retrievers=trusted, renewers=renewers
        )
    refusals = []
    for pilot in pilots:
        request = Request(
            action=Action.RETRIEVE,
            requester_dn=pilot,
            owner_dn=owner,
            auth=AuthMethod.CERTIFICATE,
            credential=policy_name(name),
            job_id="broker-submit-check",
            username=str(credential.get("username") or "") or None,
        )
        decision = evaluate(policy_set, request, owner_policy)
        if decision.allowed:
            return []
        refusals.append(f"{pilot}: {decision.message}")
    return refusals


@click.command("broker-submit")
@click.argument("submit_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-k",
    "--credname",
    default=DEFAULT_CREDENTIAL,
    show_default=True,
    help="Name of your stored credential the pilot fetches.",
)
@click.option(
    "--min-hours",
    type=float,
    default=2.0,
    show_default=True,
    help="Refuse to submit when the stored credential has less time left.",
)
@click.option(
    "--lifetime",
    "lifetime_hours",
    type=float,
    help="Proxy lifetime the pilot asks for, in hours (+BrokerLifetime).",
)
@click.option("--dry-run", is_flag=True, help="Print the augmented description, do not submit.")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the augmented description to this file.",
)
@click.option("--schedd", "schedd_name", help="Submit to this schedd instead of the local one.")
@common_server
@common_ca
@identity_options(proxy_help="Authenticate with this proxy file [X509_USER_PROXY].")
@click.option(
    "--pilot",
    "pilots",
    multiple=True,
    metavar="DN",
    help="A pilot DN of the execute site (repeat) [BROKER_SUBMIT_PILOTS].",
)
@click.option(
    "--policy-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The site's policy directory [BROKER_POLICY_DIR].",
)
@reports_errors
def submit_cmd(
    submit_file: Path,
    credname: str,
    min_hours: float,
    lifetime_hours: float | None,
    dry_run: bool,
    output: Path | None,
    schedd_name: str | None,
    server: str | None,
    ca_dir: str | None,
    proxy: str | None,
    cert: str | None,
    key: str | None,
    pilots: tuple[str, ...],
    policy_dir: Path | None,
) -> None:
    """Submit an HTCondor job whose pilot fetches your proxy from the broker."""
    try:
        text = submit_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the submit description {submit_file}: {exc}") from exc
    # A first pass with a placeholder owner catches a broken description before
    # the broker is asked anything.
    augment_submit(
        text, owner_dn="/CN=placeholder", credential=credname, lifetime_hours=lifetime_hours
    )
    client = _client(server, ca_dir, proxy, cert, key)
    try:
        info = client.info(name=credname)
    except NotFound:
        info = {"identity": _whoami(client), "credentials": []}
    best = check_credential(info, credname, min_hours)
    owner = str(info["identity"])
    _warn_about_pilots(owner, credname, best, pilots, policy_dir)
    augmented = augment_submit(
        text, owner_dn=owner, credential=credname, lifetime_hours=lifetime_hours
    )
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


def _whoami(client: object) -> str | None:
    try:
        answer = client.call("GET", "/v1/whoami")  # type: ignore[attr-defined]
    except BrokerError:
        return None
    identity = answer.get("identity") if isinstance(answer, dict) else None
    return identity if isinstance(identity, str) and identity else None


def _warn_about_pilots(
    owner: str,
    name: str,
    credential: Mapping[str, object],
    given: Sequence[str],
    policy_dir: Path | None,
) -> None:
    pilots = configured_pilots(given, os.environ)
    if not pilots:
        return
    directory = policy_dir or (
        Path(os.environ["BROKER_POLICY_DIR"]) if os.environ.get("BROKER_POLICY_DIR") else None
    )
    if directory is None:
        click.echo(
            "note: --pilot given without the site's policy directory (--policy-dir or "
            "BROKER_POLICY_DIR); not checking whether a pilot may retrieve",
            err=True,
        )
        return
    try:
        refusals = pilot_warnings(owner, name, credential, pilots, directory)
    except BrokerError as exc:
        click.echo(
            f"note: cannot check the pilots against the site policy: {exc.message}", err=True
        )
        return
    if refusals:
        click.echo(
            f"warning: no configured pilot may retrieve your credential {name!r}, so the "
            "job will be held when it starts:",
            err=True,
        )
        for line in refusals:
            click.echo(f"  {line}", err=True)
        click.echo(
            f"  (store it with broker-init -k {name} -Z <pilot DN>, or ask the site "
            "to allow its pilots; details: broker policy explain --action retrieve "
            f"--requester <pilot DN> --owner '{owner}')",
            err=True,
        )


def main() -> None:
    run_command(submit_cmd, "broker-submit")
