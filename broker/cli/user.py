"""User and pilot commands with MyProxy-like flags: broker-init, -logon, -info, -destroy.

Exit codes: 0 ok, 1 bad input, 2 system/server error (broker unreachable), 3 denied or
not authenticated, 4 no such credential.
"""

from __future__ import annotations

import functools
import getpass
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import click

from broker.cli.common import F, format_timedelta, reports_errors, run_command, utcnow
from broker.client import BrokerClient, ClientIdentity
from broker.errors import InputError
from broker.fileio import read_private_file, write_private_file
from broker.pki.loading import Credential, credential_to_pem
from broker.trustdir import default_ca_dir

_SERVER_HELP = (
    "Broker HOST[:PORT], or several separated by commas (tried in turn when one "
    "is unreachable or answers 503) [BROKER_SERVER, localhost:8443]."
)


def _client(
    server: str | None,
    ca_dir: str | None,
    proxy: str | None = None,
    cert: str | None = None,
    key: str | None = None,
) -> BrokerClient:
    identity = ClientIdentity.from_environment(proxy=proxy, cert=cert, key=key)
    return BrokerClient(server, identity, ca_dir=ca_dir or default_ca_dir())


def _read_passphrase(from_stdin: bool, prompt: str) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        if not line:
            raise InputError("-S: no passphrase on standard input")
        return line.rstrip("\n")
    return getpass.getpass(prompt)


def _default_username() -> str:
    return os.environ.get("LOGNAME") or os.environ.get("USER") or getpass.getuser()


def _online_ca_client(
    server: str | None, ca_dir: str | None, username: str, stdin_pass: bool
) -> tuple[BrokerClient, Credential]:
    """A client authenticated by a fresh certificate from the broker's online CA.

    The key is made here.  The certificate and key sit in a 0600 file in a private
    temporary directory only while the TLS context loads them, then are deleted.
    """
    from broker.pam_client import PamClient

    cas = ca_dir or default_ca_dir()
    password = _read_passphrase(stdin_pass, f"PAM password for {username}: ")
    eec, _ = PamClient(server, ca_dir=cas).pam_certificate(username=username, password=password)
    with tempfile.TemporaryDirectory(prefix="broker-init-") as tmp:
        path = os.path.join(tmp, "usercred.pem")
        write_private_file(path, credential_to_pem(eec), mode=0o600)
        try:
            # The TLS context reads the file now; later connections reuse it from memory.
            client = BrokerClient(server, ClientIdentity(cert=path, key=path), ca_dir=cas)
        finally:
            os.unlink(path)
    return client, eec


common_server = click.option("-s", "--server", help=_SERVER_HELP)
common_ca = click.option("--ca-dir", help="CA directory [X509_CERT_DIR].")
common_user = click.option(
    "-l", "--username", help="Username the credential is stored under [$LOGNAME]."
)
common_name = click.option(
    "-k", "--credname", default="default", show_default=True, help="Credential name."
)


def identity_options(
    proxy_help: str = "Authenticate with this proxy file.",
    cert_help: str = "Authenticate with this certificate.",
    key_help: str = "Key for --cert.",
) -> Callable[[F], F]:
    """--proxy, --cert and --key: the credential this command presents to the broker."""
    options = (
        click.option("--proxy", help=proxy_help),
        click.option("--cert", help=cert_help),
        click.option("--key", help=key_help),
    )

    def add(func: F) -> F:
        for option in reversed(options):
            func = option(func)
        return func

    return add


@click.command("broker-init")
@common_server
@common_user
@common_name
@click.option(
    "-c",
    "--cred-lifetime",
    "hours",
    default=168.0,
    show_default=True,
    help="Hours the stored credential lives.",
)
@click.option(
    "-t",
    "--proxy-lifetime",
    "proxy_hours",
    default=12.0,
    show_default=True,
    help="Max hours of proxies retrieved from it.",
)
@click.option(
    "-r",
    "--retriever",
    "retrievers",
    multiple=True,
    help="Who may retrieve with the passphrase: DN glob, fqan:/vo/..., group:NAME.",
)
@click.option(
    "-Z",
    "--trusted-retriever",
    "trusted",
    multiple=True,
    help="Who may retrieve by certificate alone (pilots).",
)
@click.option("-R", "--renewer", "renewers", multiple=True, help="Who may renew.")
@click.option("-d", "--description", help="A description shown by broker-info.")
@click.option("-S", "--stdin-pass", is_flag=True, help="Read a passphrase from stdin.")
@click.option(
    "--passphrase/--no-passphrase",
    "want_pass",
    default=False,
    help="Protect the credential with a passphrase (prompted).",
)
@identity_options(
    proxy_help="Delegate from this proxy file [X509_USER_PROXY].",
    cert_help="User certificate [X509_USER_CERT, ~/.globus/usercert.pem].",
    key_help="User key [X509_USER_KEY, ~/.globus/userkey.pem].",
)
@click.option(
    "--pam",
    "use_pam",
    is_flag=True,
    help="No grid certificate: log in with your site password (-S: from stdin); the "
    "broker's online CA certifies a key made here, and a proxy of it is stored.",
)
@click.option(
    "--token-issuer",
    metavar="NAME",
    help="Store an OAuth2 refresh token for this issuer instead of a proxy (the "
    "device-code flow: open the URL shown and approve).",
)
@click.option(
    "--refresh-token-file",
    type=click.Path(dir_okay=False),
    help="With --token-issuer: store the refresh token in this file (mode 0600).",
)
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    help="With --token-issuer: scopes to ask for / that the token holds (repeat).",
)
@common_ca
@click.option("--json", "as_json", is_flag=True)
@reports_errors
def init_cmd(
    server: str | None,
    username: str | None,
    credname: str,
    hours: float,
    proxy_hours: float,
    retrievers: tuple[str, ...],
    trusted: tuple[str, ...],
    renewers: tuple[str, ...],
    description: str | None,
    stdin_pass: bool,
    want_pass: bool,
    proxy: str | None,
    cert: str | None,
    key: str | None,
    use_pam: bool,
    token_issuer: str | None,
    refresh_token_file: str | None,
    scopes: tuple[str, ...],
    ca_dir: str | None,
    as_json: bool,
) -> None:
    """Delegate a proxy to the broker; your private key never leaves this machine."""
    if token_issuer is not None or refresh_token_file is not None:
        if token_issuer is None:
            raise InputError("--refresh-token-file needs --token-issuer NAME")
        _init_token(
            _client(server, ca_dir, proxy, cert, key),
            token_issuer,
            username or _default_username(),
            refresh_token_file,
            scopes,
            as_json,
        )
        return
    if use_pam:
        client, credential = _online_ca_client(
            server, ca_dir, username or _default_username(), stdin_pass
        )
        ask_passphrase = want_pass  # with --pam, -S carries the password; a passphrase is line 2
    else:
        client = _client(server, ca_dir, proxy, cert, key)
        credential = client.identity.load()
        ask_passphrase = stdin_pass or want_pass
    passphrase = None
    if ask_passphrase:
        passphrase = _read_passphrase(stdin_pass, "Enter a passphrase for the stored credential: ")
    result = client.delegate(
        credential,
        username=username or _default_username(),
        name=credname,
        stored_hours=hours,
        max_proxy_hours=proxy_hours,
        retrievers=retrievers,
        trusted_retrievers=trusted,
        renewers=renewers,
        description=description,
        passphrase=passphrase,
        now=utcnow(),
    )
    _report(
        result,
        as_json,
        lambda: (
            f"A proxy valid for {format_timedelta(result['timeleft'])} for user "
            f"{result['username']} (credential {result['name']!r}) now exists on "
            f"{client.host}:{client.port}."
        ),
    )


def _init_token(
    client: BrokerClient,
    issuer: str,
    username: str,
    token_file: str | None,
    scopes: tuple[str, ...],
    as_json: bool,
) -> None:
    """broker-init --token-issuer: store a refresh token, from a file or the device flow."""
    if token_file is not None:
        token = read_private_file(token_file, require_owner=os.getuid(), max_size=16384)
        try:
            text = token.decode("ascii").strip()
        except UnicodeDecodeError:
            raise InputError(f"{token_file} does not hold an ASCII refresh token") from None
        result = client.call(
            "POST",
            "/v1/tokens/refresh-tokens",
            {"issuer": issuer, "username": username, "refresh_token": text, "scopes": list(scopes)},
        )
    else:
        device = client.call(
            "POST", "/v1/tokens/device", {"issuer": issuer, "scopes": list(scopes)}
        )
        where = device.get("verification_uri_complete") or device.get("verification_uri")
        click.echo(
            f"To let the broker obtain tokens for you from {issuer}, open\n  {where}\n"
            f"and enter the code {device.get('user_code')}. Waiting...",
            err=True,
        )
        deadline = time.monotonic() + float(device.get("expires_in") or 600)
        interval = max(1.0, float(device.get("interval") or 5))
        while True:
            result = client.call(
                "POST",
                "/v1/tokens/device/poll",
                {"issuer": issuer, "username": username, "device_code": device.get("device_code")},
            )
            if result.get("status") == "slow_down":
                interval += 5
            elif result.get("status") != "authorization_pending":
                break
            if time.monotonic() + interval > deadline:
                raise InputError(
                    f"the code was not approved in time; run `broker-init "
                    f"--token-issuer {issuer}` again"
                )
            time.sleep(interval)
    _report(
        result,
        as_json,
        lambda: (
            f"A refresh token for {result.get('username')} at issuer {result.get('issuer')} "
            f"(scopes: {' '.join(result.get('scopes') or []) or 'as granted'}) is now "
            f"stored on {client.host}:{client.port}."
        ),
    )


def _report(result: dict[str, Any], as_json: bool, sentence: Callable[[], str]) -> None:
    """Print the broker's answer: as JSON with --json, else the sentence made from it."""
    click.echo(json.dumps(result, indent=2) if as_json else sentence())


@click.command("broker-logon")
@common_server
@common_user
@click.option("--owner", help="Owner DN instead of a username.")
@common_name
@click.option("-t", "--proxy-lifetime", "hours", type=float, help="Requested hours [12].")
@click.option("-o", "--out", help="Output file [/tmp/x509up_u<uid>].")
@click.option("--limited", is_flag=True, help="Ask for a limited proxy.")
@click.option("--job-id", help="The job this proxy is for (recorded in the audit).")
@click.option("-S", "--stdin-pass", is_flag=True, help="Read the passphrase from stdin.")
@click.option("--key-type", type=click.Choice(["rsa", "ec"]), default="rsa", show_default=True)
@identity_options()
@click.option(
    "--pam",
    "use_pam",
    is_flag=True,
    help="Log in with your site password (-S: from stdin) instead of a certificate; "
    "retrieves the credential stored under that username (-l).",
)
@common_ca
@click.option("--json", "as_json", is_flag=True)
@reports_errors
def logon_cmd(
    server: str | None,
    username: str | None,
    owner: str | None,
    credname: str,
    hours: float | None,
    out: str | None,
    limited: bool,
    job_id: str | None,
    stdin_pass: bool,
    key_type: str,
    proxy: str | None,
    cert: str | None,
    key: str | None,
    use_pam: bool,
    ca_dir: str | None,
    as_json: bool,
) -> None:
    """Retrieve a fresh proxy of a stored credential (yours, or a job owner's as a pilot)."""
    if not username and not owner:
        username = _default_username()
    if use_pam:
        if owner or not username:
            raise InputError(
                "--pam retrieves the credential stored under your username: "
                "give -l USERNAME, not --owner"
            )
        from broker.pam_client import PamClient

        pam_client = PamClient(server, ca_dir=ca_dir or default_ca_dir())
        password = _read_passphrase(stdin_pass, f"PAM password for {username}: ")
        retrieve = functools.partial(pam_client.pam_retrieve, username=username, password=password)
    else:
        client = _client(server, ca_dir, proxy, cert, key)
        passphrase = _read_passphrase(True, "") if stdin_pass else None
        retrieve = functools.partial(
            client.retrieve, username=username, owner=owner, passphrase=passphrase
        )
    # What the proxy should be is asked the same way whichever way we authenticated.
    cred, result = retrieve(
        name=credname, lifetime_hours=hours, job_id=job_id, limited=limited, key_type=key_type
    )
    target = out or f"/tmp/x509up_u{os.getuid()}"  # noqa: S108 - the grid convention
    write_private_file(target, credential_to_pem(cred), mode=0o600, overwrite=True)
    if as_json:
        click.echo(json.dumps({**result, "path": target, "chain": None}, indent=2))
        return
    click.echo(
        f"A credential of {result['owner']} has been received and stored in {target} "
        f"(valid for {format_timedelta(result['lifetime'])}"
        f"{', limited' if result['limited'] else ''})."
    )


@click.command("broker-info")
@common_server
@common_user
@click.option("-k", "--credname", help="Only this credential.")
@common_ca
@identity_options()
@click.option("--json", "as_json", is_flag=True)
@reports_errors
def info_cmd(
    server: str | None,
    username: str | None,
    credname: str | None,
    ca_dir: str | None,
    proxy: str | None,
    cert: str | None,
    key: str | None,
    as_json: bool,
) -> None:
    """Show your stored credentials, their time left and their policies."""
    client = _client(server, ca_dir, proxy, cert, key)
    result = client.info(username=username, name=credname)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"owner: {result['identity']}")
    if not result["credentials"]:
        click.echo("  no credentials stored")
    for cred in result["credentials"]:
        not_after = datetime.fromisoformat(cred["not_after"]).astimezone(UTC)
        click.echo(f"  username: {cred['username']}   name: {cred['name']}")
        if cred.get("description"):
            click.echo(f"    description: {cred['description']}")
        click.echo(
            f"    timeleft: {format_timedelta(cred['timeleft'])}  (until "
            f"{not_after:%Y-%m-%d %H:%M} UTC)"
        )
        if cred.get("max_proxy_lifetime"):
            click.echo(f"    max proxy lifetime: {format_timedelta(cred['max_proxy_lifetime'])}")
        for label, key in (
            ("retrievers", "retrievers"),
            ("trusted retrievers", "trusted_retrievers"),
            ("renewers", "renewers"),
        ):
            if cred[key]:
                click.echo(f"    {label}: {', '.join(cred[key])}")
        flags = [
            f
            for f, on in (
                ("passphrase protected", cred["passphrase_protected"]),
                ("limited", cred["limited"]),
            )
            if on
        ]
        if flags:
            click.echo(f"    {', '.join(flags)}")


@click.command("broker-destroy")
@common_server
@common_user
@common_name
@common_ca
@identity_options()
@reports_errors
def destroy_cmd(
    server: str | None,
    username: str | None,
    credname: str,
    ca_dir: str | None,
    proxy: str | None,
    cert: str | None,
    key: str | None,
) -> None:
    """Remove one of your stored credentials."""
    client = _client(server, ca_dir, proxy, cert, key)
    user = username or _default_username()
    client.destroy(username=user, name=credname)
    click.echo(f"Credential {credname!r} of user {user} was destroyed.")


def init_main() -> None:
    run_command(init_cmd, "broker-init")


def logon_main() -> None:
    run_command(logon_cmd, "broker-logon")


def info_main() -> None:
    run_command(info_cmd, "broker-info")


def destroy_main() -> None:
    run_command(destroy_cmd, "broker-destroy")
