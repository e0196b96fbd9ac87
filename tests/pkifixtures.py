"""A throwaway grid PKI for the whole test session (never committed keys).

Also helpers that forge certificates our library refuses to make, so the
validator's refusals can be tested.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from broker.devpki import write_dev_pki
from broker.pki.devca import DevPki
from broker.pki.loading import Credential, credential_to_pem, load_cert_and_key
from broker.pki.proxy import (
    PROXY_CERT_INFO_OID,
    ProxyType,
    encode_proxy_cert_info,
    generate_key,
)
from broker.pki.trust import TrustStore
from broker.trustdir import load_ca_dir


@dataclass
class GridPki:
    """The dev PKI in memory and on disk."""

    pki: DevPki
    root: Path
    ca_dir: Path
    vomsdir: Path
    manifest: dict[str, object]
    now: datetime

    @property
    def trust(self) -> TrustStore:
        return load_ca_dir(self.ca_dir)

    def user(self, name: str) -> Credential:
        return self.pki.users[name]

    def cert_path(self, name: str) -> Path:
        return self.root / f"{name}.pem"

    def key_path(self, name: str) -> Path:
        return self.root / f"{name}.key"

    def env(self) -> dict[str, str]:
        return {**os.environ, "X509_CERT_DIR": str(self.ca_dir), "X509_VOMS_DIR": str(self.vomsdir)}

    def load(self, name: str) -> Credential:
        return load_cert_and_key(
            self.cert_path(name).read_bytes(), self.key_path(name).read_bytes()
        )


@pytest.fixture(scope="session")
def grid_pki(tmp_path_factory: pytest.TempPathFactory) -> GridPki:
    root = tmp_path_factory.mktemp("devpki")
    # Payload accounts (nobody, pool users) must be able to read the CA directory.
    os.chmod(root, 0o755)
    now = datetime.now(UTC)
    pki, manifest = write_dev_pki(
        root / "pki", now=now, users=("alice", "bob"), pilots=("pilot", "pilot2")
    )
    base = root / "pki"
    return GridPki(pki, base, base / "certificates", base / "vomsdir", manifest, now)


def write_proxy_file(path: Path, cred: Credential) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(credential_to_pem(cred))
    return path


def forge_proxy(
    issuer: Credential,
    *,
    now: datetime,
    proxy_type: ProxyType = ProxyType.IMPERSONATION,
    path_length: int | None = None,
    subject: x509.Name | None = None,
    last_cn: str | None = None,
    with_pci: bool = True,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    extensions: Iterable[tuple[x509.ExtensionType, bool]] = (),
) -> Credential:
    """Sign a proxy-like certificate with none of the library's safety checks."""
    assert issuer.key is not None
    key = generate_key("ec")
    serial = x509.random_serial_number()
    if subject is None:
        cn = last_cn if last_cn is not None else str(serial)
        subject = x509.Name(
            [
                *issuer.cert.subject.rdns,
                x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, cn)]),
            ]
        )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before or now - timedelta(minutes=5))
        .not_valid_after(not_after or now + timedelta(hours=1))
    )
    if with_pci:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(
                PROXY_CERT_INFO_OID, encode_proxy_cert_info(proxy_type, path_length)
            ),
            critical=True,
        )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    cert = builder.sign(issuer.key, hashes.SHA256())
    return Credential(chain=(cert, *issuer.chain), key=key)
