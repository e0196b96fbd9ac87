"""Shared helpers of the credential store tests (constants and key material
made with cryptography directly)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

ALICE = "/DC=org/DC=example/CN=Alice Example"
BOB = "/DC=org/DC=example/CN=Bob Example"
PILOT = "/DC=org/DC=example/OU=Services/CN=pilot.example.org"
T0 = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class KeyMaterial:
    key_pem: bytes
    key_der: bytes
    chain_pem: str
    not_after: datetime


def make_key_material(kind: str, cn: str, hours: int) -> KeyMaterial:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if kind == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    not_after = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=hours)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.now(UTC) - timedelta(minutes=5))
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    return KeyMaterial(
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ),
        key_der=key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        chain_pem=cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        not_after=not_after,
    )


KeyFactory = Callable[..., KeyMaterial]
