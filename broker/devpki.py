"""Write a development grid PKI to a directory (``broker dev-pki DIR``).

Layout::

    DIR/certificates/<hash>.0 .signing_policy .r0   the CA directory (X509_CERT_DIR)
    DIR/vomsdir/atlas/voms.example.org.lsc          the vomsdir (X509_VOMS_DIR)
    DIR/ca.pem, ca.key                              the CA (kept for revocation / online CA)
    DIR/host.pem, host.key                          localhost, 127.0.0.1, ::1
    DIR/voms.pem, voms.key                          the VOMS AC signer
    DIR/<name>.pem, <name>.key                      alice, bob, pilot, ...
    DIR/manifest.json                               names, DNs and paths

Keys are 0600, created with O_EXCL; an existing PKI is never overwritten.

:data:`DEV_POLICY` is the site policy that goes with it (tests, benchmarks); :func:`policy_rule`
writes one ``[[rule]]`` table for variations of it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from broker.errors import Conflict
from broker.fileio import make_private_dir, validate_component, write_private_file
from broker.pki.devca import VOMS_HOST, VOMS_PORT, DevPki, make_dev_pki
from broker.pki.dn import slash_from_name
from broker.pki.loading import Credential, key_to_pem


def _write_pair(base: Path, name: str, cred: Credential) -> dict[str, str]:
    assert cred.key is not None
    cert_path, key_path = base / f"{name}.pem", base / f"{name}.key"
    write_private_file(cert_path, cred.cert.public_bytes(Encoding.PEM), mode=0o644)
    write_private_file(key_path, key_to_pem(cred.key), mode=0o600)
    return {"dn": slash_from_name(cred.cert.subject), "cert": str(cert_path), "key": str(key_path)}


def write_dev_pki(
    directory: str | os.PathLike[str],
    *,
    now: datetime,
    users: Sequence[str] = ("alice", "bob"),
    pilots: Sequence[str] = ("pilot",),
    days: int = 30,
) -> tuple[DevPki, dict[str, object]]:
    for name in (*users, *pilots):
        validate_component(name, what="user name")
    base = Path(directory).resolve()
    if (base / "manifest.json").exists():
        raise Conflict(f"{base} already holds a dev PKI; choose an empty directory")
    base.mkdir(parents=True, exist_ok=True)
    pki = make_dev_pki(now=now, users=users, pilots=pilots, days=days)
    certdir = base / "certificates"
    certdir.mkdir(exist_ok=True)
    for fname, data in pki.ca_directory().items():
        write_private_file(certdir / fname, data, mode=0o644)
    vomsdir = base / "vomsdir"
    for rel, data in pki.vomsdir().items():
        (vomsdir / rel).parent.mkdir(parents=True, exist_ok=True)
        write_private_file(vomsdir / rel, data, mode=0o644)
    make_private_dir(base / "private")  # scratch for state that must stay private
    manifest: dict[str, object] = {
        "ca_dir": str(certdir),
        "vomsdir": str(vomsdir),
        "vo": pki.vo,
        "voms_uri": f"{VOMS_HOST}:{VOMS_PORT}",
        "ca": _write_pair(base, "ca", pki.ca),
        "host": _write_pair(base, "host", pki.host),
        "voms": _write_pair(base, "voms", pki.voms),
        "users": {name: _write_pair(base, name, cred) for name, cred in pki.users.items()},
    }
    write_private_file(base / "manifest.json", json.dumps(manifest, indent=2).encode(), mode=0o644)
    return pki, manifest


def policy_rule(
    name: str,
    action: str | Sequence[str],
    requester: Sequence[str],
    *,
    auth: Sequence[str] = (),
    max_lifetime: str | None = None,
) -> str:
    """One ``[[rule]]`` table (effect allow) of the policy file format, as TOML text."""
    actions = json.dumps(action if isinstance(action, str) else list(action))
    lines = [
        "[[rule]]",
        f"name = {json.dumps(name)}",
        f"action = {actions}",
        'effect = "allow"',
        f"requester = {json.dumps(list(requester))}",
    ]
    if auth:
        lines.append(f"auth = {json.dumps(list(auth))}")
    if max_lifetime:
        lines.append(f"max_lifetime = {json.dumps(max_lifetime)}")
    return "\n".join(lines) + "\n\n"


#: Owners manage (and retrieve) their own credentials.
OWNERS_RULE = policy_rule(
    "owners manage their own credentials", ["delegate", "info", "destroy", "retrieve"], ["self"]
)
#: Classic MyProxy retrieval: whoever knows the passphrase.
PASSPHRASE_RULE = policy_rule(
    "passphrase retrieval", "retrieve", ["passphrase"], auth=["passphrase"]
)

#: The development site policy: dev-PKI pilots (or /atlas/Role=pilot) retrieve by certificate
#: and renew, owners manage their own, passphrase retrieval as in MyProxy.
DEV_POLICY = (
    '[groups]\npilots = ["/DC=org/DC=example/CN=pilot*", "fqan:/atlas/Role=pilot"]\n\n'
    + OWNERS_RULE
    + policy_rule(
        "pilots retrieve for users",
        "retrieve",
        ["group:pilots"],
        auth=["certificate"],
        max_lifetime="12h",
    )
    + policy_rule("renewal by pilots", "renew", ["group:pilots"])
    + PASSPHRASE_RULE
)
