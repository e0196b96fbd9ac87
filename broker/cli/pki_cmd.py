"""``broker dev-pki``, ``broker proxy-init`` and ``broker proxy-info``."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import click

from broker.cli.common import format_timedelta, reports_errors, utcnow
from broker.errors import ChainError, InputError
from broker.fileio import read_private_file, write_private_file
from broker.pki.chain import validate_chain
from broker.pki.loading import (
    Credential,
    credential_to_pem,
    load_cert_and_key,
    load_certificates,
    load_credential,
    load_private_key,
)
from broker.pki.proxy import ProxyType, chain_job_id, generate_key, new_proxy, proxy_info
from broker.trustdir import default_ca_dir, default_vomsdir, load_ca_dir, load_vomsdir


def default_proxy_path() -> str:
    # The grid convention, shared with every Globus tool; files there are 0600.
    return os.environ.get("X509_USER_PROXY") or f"/tmp/x509up_u{os.getuid()}"  # noqa: S108


@click.command("dev-pki")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--user", "users", multiple=True, help="User names (default: alice, bob).")
@click.option("--pilot", "pilots", multiple=True, help="Pilot names (default: pilot).")
@click.option("--days", default=30, show_default=True, help="Lifetime of the CA and certificates.")
@reports_errors
def dev_pki(directory: str, users: tuple[str, ...], pilots: tuple[str, ...], days: int) -> None:
    """Create a throwaway grid PKI in DIRECTORY (CA dir, host, users, pilot, VOMS signer)."""
    from broker.devpki import write_dev_pki

    _, manifest = write_dev_pki(
        directory,
        now=utcnow(),
        users=users or ("alice", "bob"),
        pilots=pilots or ("pilot",),
        days=days,
    )
    click.echo(f"dev PKI written to {directory}")
    click.echo(f"  export X509_CERT_DIR={manifest['ca_dir']}")
    click.echo(f"  export X509_VOMS_DIR={manifest['vomsdir']}")
    for name, entry in manifest["users"].items():  # type: ignore[attr-defined]
        click.echo(f"  {name:8} {entry['dn']}")


def _parse_voms(spec: str) -> tuple[str, str]:
    vo, sep, fqan = spec.partition(":")
    if not sep or not vo or not fqan:
        raise InputError(f"--voms {spec!r}: use VO:FQAN, e.g. atlas:/atlas/Role=production")
    return vo, fqan


@click.command("proxy-init")
@click.option("--cert", type=click.Path(dir_okay=False), help="User certificate (or a proxy file).")
@click.option("--key", type=click.Path(dir_okay=False), help="User key (omit for a proxy file).")
@click.option("--out", type=click.Path(dir_okay=False), help="Output file [X509_USER_PROXY].")
@click.option("--hours", default=12.0, show_default=True, help="Proxy lifetime in hours.")
@click.option("--limited", is_flag=True, help="Make a limited proxy.")
@click.option("--independent", is_flag=True, help="Make an independent proxy.")
@click.option("--path-length", type=click.IntRange(min=0), help="Proxy path length constraint.")
@click.option("--bits", default=2048, show_default=True, help="RSA key size.")
@click.option("--ec", is_flag=True, help="Use an EC P-256 key instead of RSA.")
@click.option(
    "--voms",
    "voms_specs",
    multiple=True,
    metavar="VO:FQAN",
    help="Add a VOMS AC with this FQAN (repeatable; all must name one VO).",
)
@click.option("--voms-cert", type=click.Path(dir_okay=False), help="VOMS signer certificate.")
@click.option("--voms-key", type=click.Path(dir_okay=False), help="VOMS signer key.")
@click.option("--voms-uri", default="voms.example.org:15001", show_default=True)
@click.option("--voms-hours", type=float, help="AC lifetime in hours [same as the proxy].")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@reports_errors
def proxy_init(
    cert: str | None,
    key: str | None,
    out: str | None,
    hours: float,
    limited: bool,
    independent: bool,
    path_length: int | None,
    bits: int,
    ec: bool,
    voms_specs: tuple[str, ...],
    voms_cert: str | None,
    voms_key: str | None,
    voms_uri: str,
    voms_hours: float | None,
    force: bool,
) -> None:
    """Make an RFC 3820 proxy (grid-proxy-init / voms-proxy-fake equivalent)."""
    if limited and independent:
        raise InputError("--limited and --independent exclude each other")
    if hours <= 0:
        raise InputError("--hours must be positive")
    now = utcnow()
    issuer = _load_issuer(cert, key)
    extensions = []
    if voms_specs:
        from broker.pki.voms import make_ac_extension

        if not voms_cert or not voms_key:
            raise InputError("--voms needs --voms-cert and --voms-key (the AC signer)")
        specs = [_parse_voms(s) for s in voms_specs]
        vos = {vo for vo, _ in specs}
        if len(vos) != 1:
            raise InputError("all --voms options must name the same VO")
        signer = load_cert_and_key(
            Path(voms_cert).read_bytes(), read_private_file(voms_key, require_owner=os.getuid())
        )
        holder = _eec_of(issuer)
        extensions.append(
            make_ac_extension(
                holder,
                signer,
                vo=vos.pop(),
                fqans=[f for _, f in specs],
                uri=voms_uri,
                now=now,
                lifetime=timedelta(hours=voms_hours or hours),
            )
        )
    kind = (
        ProxyType.LIMITED
        if limited
        else (ProxyType.INDEPENDENT if independent else ProxyType.IMPERSONATION)
    )
    proxy = new_proxy(
        issuer,
        now=now,
        lifetime=timedelta(hours=hours),
        proxy_type=kind,
        path_length=path_length,
        key=generate_key("ec") if ec else generate_key("rsa", bits),
        extra_extensions=extensions,
    )
    target = out or default_proxy_path()
    write_private_file(target, credential_to_pem(proxy), mode=0o600, overwrite=force or out is None)
    left = proxy.cert.not_valid_after_utc - now
    click.echo(
        f"Your proxy is valid until {proxy.cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC "
        f"({format_timedelta(left.total_seconds())}); written to {target}"
    )


def _eec_of(cred: Credential):  # type: ignore[no-untyped-def]
    for cert in cred.chain:
        if proxy_info(cert) is None:
            return cert
    raise InputError("the credential holds no end-entity certificate")


def _load_issuer(cert: str | None, key: str | None) -> Credential:
    if cert is None:
        home = Path.home() / ".globus"
        cert = os.environ.get("X509_USER_CERT") or str(home / "usercert.pem")
        key = key or os.environ.get("X509_USER_KEY") or str(home / "userkey.pem")
    cert_bytes = Path(cert).read_bytes()
    if key is None:
        return load_credential(read_private_file(cert, require_owner=os.getuid()))
    key_bytes = read_private_file(key, require_owner=os.getuid())
    if b"PRIVATE KEY-----" in cert_bytes:  # a proxy file given as --cert
        load_private_key(cert_bytes)
    return load_cert_and_key(cert_bytes, key_bytes)


@click.command("proxy-info")
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@click.option("--ca-dir", help="CA directory [X509_CERT_DIR, /etc/grid-security/certificates].")
@click.option("--vomsdir", help="VOMS LSC directory [X509_VOMS_DIR, /etc/grid-security/vomsdir].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@reports_errors
def proxy_info_cmd(
    file: str | None, ca_dir: str | None, vomsdir: str | None, as_json: bool
) -> None:
    """Validate a proxy file and show its identity, type, time left and verified FQANs."""
    path = file or default_proxy_path()
    data = Path(path).read_bytes()
    chain = load_certificates(data, what=f"proxy file {path}")
    trust = load_ca_dir(ca_dir or default_ca_dir())
    vdir = load_vomsdir(vomsdir or default_vomsdir())
    now = utcnow()
    try:
        info = validate_chain(chain, trust, now=now, vomsdir=vdir)
    except ChainError as exc:
        raise ChainError(f"{path}: {exc.message}", reason=exc.reason) from exc
    from broker.pki.dn import slash_from_name

    result = {
        "identity": info.identity,
        "subject": slash_from_name(chain[0].subject),
        "issuer": slash_from_name(chain[0].issuer),
        "type": info.leaf_type,
        "limited": info.limited,
        "path_length": info.path_length,
        "timeleft": int(info.time_left(now).total_seconds()),
        "not_after": info.not_after.isoformat(),
        "fqans": list(info.fqans),
        "vo": sorted({getattr(a, "vo", "") for a in info.voms}),
        "job_id": chain_job_id(chain),
        "path": path,
    }
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    plen = "unlimited" if info.path_length is None else str(info.path_length)
    click.echo(f"subject  : {result['subject']}")
    click.echo(f"issuer   : {result['issuer']}")
    click.echo(f"identity : {info.identity}")
    click.echo(f"type     : {info.leaf_type}")
    click.echo(f"pathlen  : {plen}")
    click.echo(f"timeleft : {format_timedelta(info.time_left(now).total_seconds())}")
    for attrs in info.voms:
        click.echo(f"VO       : {getattr(attrs, 'vo', '')} (issuer {getattr(attrs, 'issuer', '')})")
    for fqan in info.fqans:
        click.echo(f"attribute: {fqan}")
    if result["job_id"] is not None:
        click.echo(f"job id   : {result['job_id']}")
