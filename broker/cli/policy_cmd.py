"""``broker policy``: validate the policy files and explain a decision.

The lead attaches :data:`policy` to the ``broker`` command; tests and admins
can also run it alone (``python -m broker.cli.policy_cmd``).

Exit codes follow broker.errors: 0 allowed / OK, 1 bad input or broken
files, 3 denied.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from broker.errors import AuthorizationError, BrokerError, InputError
from broker.naming import policy_name
from broker.policy import (
    Action,
    AuthMethod,
    Decision,
    OwnerPolicy,
    Request,
    TokenClaims,
    evaluate,
    format_duration,
    unsafe_rules,
)
from broker.policy_dir import check_policy_directory, read_policy_directory

DEFAULT_POLICY_DIR = "policies"
POLICY_DIR_ENV = "BROKER_POLICY_DIR"


class _BadInput(click.UsageError):
    exit_code = InputError.exit_code


class _InputCommand(click.Command):
    """A command whose usage errors exit 1 (bad input), as the broker's CLIs promise."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            raise _BadInput(exc.format_message(), exc.ctx) from None


def _policy_dir(given: Path | None) -> Path:
    if given is not None:
        return given
    return Path(os.environ.get(POLICY_DIR_ENV) or DEFAULT_POLICY_DIR)


def _fail(message: str, code: int = InputError.exit_code) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.group(name="policy")
def policy() -> None:
    """Check the policy files and explain decisions."""


_DIR_HELP = f"Policy directory (default: ${POLICY_DIR_ENV}, else ./{DEFAULT_POLICY_DIR})."


@policy.command("check", cls=_InputCommand)
@click.argument("directory", required=False, type=click.Path(path_type=Path))
def check_cmd(directory: Path | None) -> None:
    """Validate every *.toml file in DIRECTORY; exit 1 listing all problems."""
    path = _policy_dir(directory)
    try:
        policy_set, issues = check_policy_directory(path)
    except BrokerError as exc:
        _fail(exc.message)
        return
    if policy_set is None:
        for issue in issues:
            click.echo(f"ERROR {issue}")
        count = len(issues)
        click.echo(f"FAILED: {count} problem{'s' if count != 1 else ''} in {path}", err=True)
        sys.exit(InputError.exit_code)
    click.echo(f"OK: {policy_set.summary()}")


@policy.command("explain", cls=_InputCommand)
@click.option("--requester", "requester_dn", metavar="DN", help="Requester DN (slash form).")
@click.option("--fqan", "fqans", multiple=True, metavar="FQAN", help="Requester FQAN (repeat).")
@click.option(
    "--action",
    required=True,
    type=click.Choice([a.value for a in Action]),
    help="The action requested.",
)
@click.option("--owner", "owner_dn", required=True, metavar="DN", help="Credential owner DN.")
@click.option("--owner-fqan", "owner_fqans", multiple=True, metavar="FQAN", help="Owner FQAN.")
@click.option("--credential", default="", metavar="NAME", help="Credential name ('' = default).")
@click.option("--job-id", default=None, metavar="ID", help="Job id sent with the request.")
@click.option(
    "--auth",
    type=click.Choice([m.value for m in AuthMethod]),
    default=AuthMethod.CERTIFICATE.value,
    show_default=True,
    help="How the requester authenticated.",
)
@click.option("--username", default=None, help="PAM username (with --auth pam).")
@click.option(
    "--token-issuer",
    default=None,
    metavar="URL",
    help="Bearer token issuer ('iss'); implies --auth token.",
)
@click.option("--token-subject", default=None, metavar="SUB", help="Bearer token 'sub'.")
@click.option(
    "--token-group",
    "token_groups",
    multiple=True,
    metavar="GROUP",
    help="Bearer token wlcg.groups entry (repeat).",
)
@click.option(
    "--token-scope",
    "token_scopes",
    multiple=True,
    metavar="SCOPE",
    help="Bearer token scope (repeat).",
)
@click.option(
    "--retrievers",
    "owner_retrievers",
    multiple=True,
    metavar="PATTERN",
    help="Owner policy: retrievers entry (repeat).",
)
@click.option(
    "--trusted-retrievers",
    "owner_trusted",
    multiple=True,
    metavar="PATTERN",
    help="Owner policy: trusted retrievers entry (repeat).",
)
@click.option(
    "--renewers",
    "owner_renewers",
    multiple=True,
    metavar="PATTERN",
    help="Owner policy: renewers entry (repeat).",
)
@click.option(
    "--key-retrievers",
    "owner_key_retrievers",
    multiple=True,
    metavar="PATTERN",
    help="Owner policy: key retrievers entry (MyProxy -E; repeat).",
)
@click.option("--dir", "directory", type=click.Path(path_type=Path), help=_DIR_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the decision as JSON.")
def explain_cmd(
    requester_dn: str | None,
    fqans: tuple[str, ...],
    action: str,
    owner_dn: str,
    owner_fqans: tuple[str, ...],
    credential: str,
    job_id: str | None,
    auth: str,
    username: str | None,
    token_issuer: str | None,
    token_subject: str | None,
    token_groups: tuple[str, ...],
    token_scopes: tuple[str, ...],
    owner_retrievers: tuple[str, ...],
    owner_trusted: tuple[str, ...],
    owner_renewers: tuple[str, ...],
    owner_key_retrievers: tuple[str, ...],
    directory: Path | None,
    as_json: bool,
) -> None:
    """Evaluate one request against the policy and show every rule considered.

    Exit 0 when allowed, 3 when denied, 1 on bad input or broken policy files.
    """
    token = None
    if token_issuer is not None or token_subject is not None:
        if not token_issuer or not token_subject:
            _fail("--token-issuer and --token-subject go together")
            return
        token = TokenClaims(token_issuer, token_subject, token_groups, token_scopes)
        auth = AuthMethod.TOKEN.value
    try:
        request = Request(
            action=Action(action),
            requester_dn=requester_dn,
            owner_dn=owner_dn,
            requester_fqans=fqans,
            owner_fqans=owner_fqans,
            auth=AuthMethod(auth),
            # The server and the policy spell the unnamed MyProxy credential differently.
            credential=policy_name(credential),
            job_id=job_id,
            username=username,
            token=token,
        )
        policy_set = read_policy_directory(_policy_dir(directory), allow_unsafe=True)
    except BrokerError as exc:
        _fail(exc.message)
        return
    for rule in unsafe_rules(policy_set):
        click.echo(
            f"warning: {rule.where}: rule {rule.name!r} is unsafe; the server refuses to start",
            err=True,
        )
    owner_policy = None
    if owner_retrievers or owner_trusted or owner_renewers or owner_key_retrievers:
        owner_policy = OwnerPolicy(
            retrievers=owner_retrievers or None,
            trusted_retrievers=owner_trusted or None,
            renewers=owner_renewers or None,
            key_retrievers=owner_key_retrievers or None,
        )
    decision = evaluate(policy_set, request, owner_policy, full_trace=True)
    if as_json:
        click.echo(json.dumps(decision.to_json(), indent=2))
    else:
        _print_decision(decision)
    sys.exit(0 if decision.allowed else AuthorizationError.exit_code)


def _print_decision(decision: Decision) -> None:
    click.echo(f"decision: {decision.decision} ({decision.reason})")
    click.echo(decision.message)
    if decision.allowed:
        lifetime = decision.max_lifetime
        click.echo(f"max lifetime: {format_duration(lifetime) if lifetime else 'no cap'}")
        click.echo(f"limited: {'yes' if decision.limited else 'no'}")
    click.echo(f"trace ({decision.rules_checked} site rules for this action):")
    for entry in decision.trace:
        mark = "x" if entry.matched else " "
        where = f"{entry.file}:{entry.line}" if entry.line else entry.file
        click.echo(f"  [{mark}] {entry.layer} {entry.effect} {entry.rule!r} {where}: {entry.why}")


@policy.command("import-myproxy-config", cls=_InputCommand)
@click.argument("config_file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--dir", "directory", type=click.Path(path_type=Path), help=_DIR_HELP)
@click.option(
    "--file-name",
    default="50-myproxy.toml",
    show_default=True,
    help="Name of the policy file written into the directory.",
)
def import_myproxy_config_cmd(config_file: Path, directory: Path | None, file_name: str) -> None:
    """Translate a myproxy-server.config into a policy file.

    Every directive the broker can express becomes a rule; each one it cannot is
    listed with its line number and the command exits 1 (the file is still written,
    so the rest can be reviewed). The result is checked like `broker policy check`.
    """
    from broker.fileio import validate_component
    from broker.myproxy.config_import import translate_config

    try:
        validate_component(file_name, what="policy file name")
        text = config_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"cannot read {config_file}: {exc}")
    except BrokerError as exc:
        _fail(exc.message)
    if not file_name.endswith(".toml"):
        _fail(f"the policy file name {file_name!r} must end in .toml")
    result = translate_config(text, source=config_file.name)
    target = _policy_dir(directory)
    try:
        target.mkdir(parents=True, exist_ok=True)
        out = target / file_name
        if out.exists():
            _fail(f"{out} already exists; remove it or choose another --file-name")
        out.write_text(result.toml, encoding="utf-8")
    except OSError as exc:
        _fail(f"cannot write the policy file: {exc}")
    for line, directive, why in result.notes:
        click.echo(f"{config_file}:{line}: note: {directive}: {why}")
    _, issues = check_policy_directory(target)
    for issue in issues:
        click.echo(f"error: {issue}", err=True)
    click.echo(f"wrote {out} ({result.directives} directives read)")
    if result.unsupported:
        for line, directive, why in result.unsupported:
            click.echo(f"{config_file}:{line}: not imported: {directive}: {why}", err=True)
        sys.exit(InputError.exit_code)
    if issues:
        sys.exit(InputError.exit_code)


def main() -> None:
    policy()


if __name__ == "__main__":
    main()
