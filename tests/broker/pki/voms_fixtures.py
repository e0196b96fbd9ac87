"""A throwaway grid PKI for the VOMS tests, generated with ``cryptography``.

Everything lives in one temporary directory: the CA and its Globus-style trust
directory (``<subject_hash>.0`` + ``.signing_policy``), the users alice and bob,
the VOMS server certificate ``CN=voms.example.org``, a self-signed impostor with
the same DN, and a vomsdir with ``atlas/voms.example.org.lsc``.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.pki.loading import Credential, PrivateKey, key_to_pem
from broker.pki.trust import TrustStore
from broker.pki.voms import VomsDir
from tests.prerequisites import require_tools

CA_DN = "/DC=org/DC=example/CN=Example Test CA"
VOMS_DN = "/DC=org/DC=example/CN=voms.example.org"
VOMS_URI = "voms.example.org:15001"


need_tool = require_tools  # the name the VOMS tests use


def _name(*cns: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "org"),
            x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "example"),
        ]
        + [x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in cns]
    )


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def issue(
    subject: x509.Name,
    key: PrivateKey,
    issuer: Credential | None,
    *,
    ca: bool = False,
    not_before: datetime | None = None,
    days: int = 30,
) -> Credential:
    """A certificate for ``key``; self-signed when ``issuer`` is None."""
    start = not_before or datetime.now(UTC) - timedelta(hours=1)
    sign_key = key if issuer is None else issuer.key
    assert sign_key is not None
    issuer_name = subject if issuer is None else issuer.cert.subject
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=isinstance(key, rsa.RSAPrivateKey),
                data_encipherment=isinstance(key, rsa.RSAPrivateKey),
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    cert = builder.sign(sign_key, hashes.SHA256())
    chain = (
        (cert,)
        if issuer is None or issuer.cert.issuer == issuer.cert.subject
        else (cert, *issuer.chain)
    )
    return Credential(chain=chain, key=key)


def write_cert(path: Path, cred: Credential) -> None:
    path.write_bytes(cred.cert.public_bytes(serialization.Encoding.PEM))


def write_key(path: Path, cred: Credential) -> None:
    assert cred.key is not None
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key_to_pem(cred.key))


def write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


@dataclass
class Pki:
    root: Path
    ca: Credential
    alice: Credential
    bob: Credential
    voms: Credential
    voms_ec: Credential
    rogue: Credential
    certdir: Path
    vomsdir: Path
    empty_vomsdir: Path

    def path(self, name: str) -> Path:
        return self.root / name

    def env(self, vomsdir: Path | None = None) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("X509_USER", "X509_VOMS", "X509_CERT"))
        }
        env.update(
            X509_CERT_DIR=str(self.certdir),
            X509_VOMS_DIR=str(vomsdir or self.vomsdir),
            RANDFILE=str(self.root / ".rnd"),
            HOME=str(self.root),
        )
        return env

    def trust(self) -> TrustStore:
        return TrustStore.from_files({p.name: p.read_bytes() for p in self.certdir.iterdir()})

    def voms_dir(self, root: Path | None = None) -> VomsDir:
        base = root or self.vomsdir
        return VomsDir.from_files(
            {str(p.relative_to(base)): p.read_bytes() for p in base.rglob("*") if p.is_file()}
        )


def build_pki(root: Path) -> Pki:
    ca = issue(_name("Example Test CA"), rsa_key(), None, ca=True)
    alice = issue(_name("Alice"), rsa_key(), ca)
    bob = issue(_name("Bob"), rsa_key(), ca)
    voms = issue(_name("voms.example.org"), rsa_key(), ca)
    voms_ec = issue(_name("voms-ec.example.org"), ec.generate_private_key(ec.SECP256R1()), ca)
    rogue = issue(_name("voms.example.org"), rsa_key(), None)  # same DN, self-signed

    for label, cred in (
        ("ca", ca),
        ("alice", alice),
        ("bob", bob),
        ("voms", voms),
        ("rogue", rogue),
    ):
        write_cert(root / f"{label}.pem", cred)
        write_key(root / f"{label}.key", cred)

    certdir = root / "certificates"
    certdir.mkdir()
    subject_hash = subprocess.run(
        ["openssl", "x509", "-in", str(root / "ca.pem"), "-noout", "-subject_hash"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (certdir / f"{subject_hash}.0").write_bytes((root / "ca.pem").read_bytes())
    (certdir / f"{subject_hash}.signing_policy").write_text(
        f"access_id_CA   X509   '{CA_DN}'\n"
        "pos_rights     globus CA:sign\n"
        "cond_subjects  globus '\"/DC=org/DC=example/*\"'\n"
    )

    vomsdir = root / "vomsdir"
    (vomsdir / "atlas").mkdir(parents=True)
    (vomsdir / "atlas" / "voms.example.org.lsc").write_text(f"{VOMS_DN}\n{CA_DN}\n")
    (vomsdir / "atlas" / "voms-ec.example.org.lsc").write_text(
        f"/DC=org/DC=example/CN=voms-ec.example.org\n{CA_DN}\n"
    )
    empty = root / "emptyvomsdir"
    empty.mkdir()
    return Pki(
        root=root,
        ca=ca,
        alice=alice,
        bob=bob,
        voms=voms,
        voms_ec=voms_ec,
        rogue=rogue,
        certdir=certdir,
        vomsdir=vomsdir,
        empty_vomsdir=empty,
    )


def voms_proxy_fake(pki: Pki, out: str, *extra: str, hostcert: str = "voms") -> Path:
    """Run voms-proxy-fake for alice the way grid-test-rig.md does; returns the proxy path."""
    target = pki.path(out)
    subprocess.run(
        [
            "voms-proxy-fake",
            "-q",
            "-cert",
            str(pki.path("alice.pem")),
            "-key",
            str(pki.path("alice.key")),
            "-rfc",
            "-bits",
            "2048",
            "-voms",
            "atlas",
            "-hostcert",
            str(pki.path(f"{hostcert}.pem")),
            "-hostkey",
            str(pki.path(f"{hostcert}.key")),
            "-uri",
            VOMS_URI,
            "-fqan",
            "/atlas/Role=production/Capability=NULL",
            "-fqan",
            "/atlas/Role=NULL/Capability=NULL",
            "-hours",
            "12",
            "-path-length",
            "-1",
            *extra,
            "-out",
            str(target),
        ],
        check=True,
        capture_output=True,
        env=pki.env(),
        timeout=60,
    )
    return target
