"""Reading and writing credentials in the PEM layout grid tools use.

A proxy file holds the proxy certificate, its private key, then the rest of the
chain up to (not including) the CA: ``cert, key, chain``.  Keys may be PKCS#1
(``RSA PRIVATE KEY``, myproxy-logon) or PKCS#8 (``PRIVATE KEY``,
grid-proxy-init); both load.  Writing uses PKCS#1 for RSA keys, as the Globus
tools do, and PKCS#8 for EC keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker.errors import PemError

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
MAX_PEM_SIZE = 256 * 1024


@dataclass(frozen=True)
class Credential:
    """A certificate chain (leaf first) and, when held, the leaf's private key."""

    chain: tuple[x509.Certificate, ...]
    key: PrivateKey | None = None

    @property
    def cert(self) -> x509.Certificate:
        return self.chain[0]


def load_certificates(data: bytes, *, what: str = "certificate chain") -> list[x509.Certificate]:
    """All certificates of a PEM blob, in file order; key blocks are skipped."""
    if len(data) > MAX_PEM_SIZE:
        raise PemError(f"the {what} is larger than {MAX_PEM_SIZE} bytes")
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise PemError(f"the {what} holds no PEM 'CERTIFICATE' block")
    try:
        return x509.load_pem_x509_certificates(data)
    except (ValueError, x509.InvalidVersion) as exc:
        raise PemError(f"the {what} has a malformed PEM certificate: {exc}") from exc


def load_private_key(data: bytes, password: bytes | None = None) -> PrivateKey:
    """The first private key of a PEM blob (PKCS#1 or PKCS#8, RSA or EC)."""
    start = _first_key_block(data)
    if start is None:
        raise PemError("no PEM private key block found")
    try:
        # cryptography's full RSA consistency check costs ~35 ms per load, on every retrieval
        # (the server loads the stored key each time) and every job start. It guards against
        # crafted keys; ours come from the caller's own 0600 file or from the store, where
        # AES-GCM authenticates them, and callers compare the key with its certificate.
        key = serialization.load_pem_private_key(
            data[start:], password=password, unsafe_skip_rsa_key_validation=True
        )
    except TypeError as exc:
        raise PemError(f"the private key is encrypted or a password was not needed: {exc}") from exc
    except ValueError as exc:
        raise PemError(f"the private key is malformed or the password is wrong: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise PemError(f"unsupported private key type {type(key).__name__}; use RSA or EC")
    return key


def _first_key_block(data: bytes) -> int | None:
    positions = [
        data.find(marker)
        for marker in (
            b"-----BEGIN RSA PRIVATE KEY-----",
            b"-----BEGIN PRIVATE KEY-----",
            b"-----BEGIN EC PRIVATE KEY-----",
            b"-----BEGIN ENCRYPTED PRIVATE KEY-----",
        )
    ]
    found = [p for p in positions if p >= 0]
    return min(found) if found else None


def load_credential(data: bytes, password: bytes | None = None) -> Credential:
    """A proxy/credential file: certificates plus the key, which must match the leaf."""
    certs = load_certificates(data, what="credential file")
    key = load_private_key(data, password)
    if not public_keys_equal(key, certs[0]):
        raise PemError("the private key does not belong to the first certificate of the file")
    return Credential(chain=tuple(certs), key=key)


def load_cert_and_key(
    cert_data: bytes, key_data: bytes, password: bytes | None = None
) -> Credential:
    """A user certificate file (maybe with a chain) and a separate key file."""
    certs = load_certificates(cert_data, what="certificate file")
    key = load_private_key(key_data, password)
    if not public_keys_equal(key, certs[0]):
        raise PemError("the private key does not belong to the certificate")
    return Credential(chain=tuple(certs), key=key)


def public_keys_equal(key: PrivateKey, cert: x509.Certificate) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return key.public_key().public_bytes(enc, fmt) == cert.public_key().public_bytes(enc, fmt)


def key_to_pem(key: PrivateKey) -> bytes:
    fmt = (
        serialization.PrivateFormat.TraditionalOpenSSL
        if isinstance(key, rsa.RSAPrivateKey)
        else serialization.PrivateFormat.PKCS8
    )
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def chain_to_pem(chain: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)


def credential_to_pem(cred: Credential) -> bytes:
    """``cert, key, rest of chain``: the order grid tools read and write."""
    if cred.key is None:
        raise PemError("this credential has no private key to write")
    return chain_to_pem(cred.chain[:1]) + key_to_pem(cred.key) + chain_to_pem(cred.chain[1:])
