"""Secrets: no private-key material in database files, logs or the audit trail.

Needles per known key: PEM markers, the tail of the key's PKCS#8 DER, and the
first 32 bytes of the private scalar / exponent. Known keys: the users' and
pilots' keys of the dev PKI and the decrypted keys of stored credentials
collected during the run (up to 200: each needle is searched in every file).
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker.pki.loading import load_private_key
from tests.pkifixtures import GridPki
from tests.reliability.harness import Outcome

MARKERS = [b"PRIVATE KEY-----", b"BEGIN RSA PRIVATE", b"BEGIN EC PRIVATE", b"BEGIN ENCRYPTED"]
SCANNED = ("broker.sqlite", "broker.sqlite-wal", "broker.sqlite-shm", "serve.log", "audit.log")


def _needles(pem: bytes) -> list[bytes]:
    key = load_private_key(pem)
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    if isinstance(key, rsa.RSAPrivateKey):
        secret = key.private_numbers().d
        size = (key.key_size + 7) // 8
    else:
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        secret = key.private_numbers().private_value
        size = (key.curve.key_size + 7) // 8
    number = secret.to_bytes(size, "big").lstrip(b"\0")
    return [der[-48:], number[:24]]


def scan(pki: GridPki, base: Path, stored_keys: list[bytes], outcome: Outcome) -> None:
    files = [
        p
        for p in base.rglob("*")
        if p.is_file() and (p.name in SCANNED or p.name.startswith("broker.sqlite"))
    ]
    keys = list(stored_keys)
    for who in ("alice", "bob", "mallory", "pilot", "pilot2"):
        keys.append(pki.key_path(who).read_bytes())
    needles = [n for pem in keys for n in _needles(pem)]
    total = 0
    for path in files:
        blob = path.read_bytes()
        total += len(blob)
        for marker in MARKERS:
            outcome.tried += 1
            if marker in blob:
                outcome.fail(f"{path.relative_to(base)} contains the PEM marker {marker!r}")
        for needle in needles:
            outcome.tried += 1
            if needle in blob:
                outcome.fail(f"{path.relative_to(base)} contains bytes of a known private key")
    outcome.note(
        f"{len(files)} files ({total / 1e6:.1f} MB: SQLite databases with WAL and "
        f"shm, server logs, wrapper audit logs) against {len(keys)} known keys "
        f"({len(needles)} byte needles + {len(MARKERS)} PEM markers)"
    )
    if not files:
        outcome.fail("no files to scan: the run left no database or log behind")
