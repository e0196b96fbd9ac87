"""Trust anchors: the CA certificates and CRLs of an ``X509_CERT_DIR``.

Pure: the caller reads the directory (``broker.trustdir``) and passes the file
contents in.  In that layout CA certificates are ``<hash>.0`` (``.1``… on hash
collisions) and CRLs are ``<hash>.r0``; other files (``.signing_policy``,
``.namespaces``, ``.info``) are ignored here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography import x509

from broker.errors import PemError

_CERT_FILE = re.compile(r"^[0-9a-f]{8}\.[0-9]+$")
_CRL_FILE = re.compile(r"^[0-9a-f]{8}\.r[0-9]+$")


@dataclass(frozen=True)
class TrustStore:
    """CA certificates and CRLs, looked up by subject."""

    cas: tuple[x509.Certificate, ...]
    crls: tuple[x509.CertificateRevocationList, ...] = ()
    _by_subject: dict[bytes, list[x509.Certificate]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        for ca in self.cas:
            self._by_subject.setdefault(ca.subject.public_bytes(), []).append(ca)

    def issuers_of(self, cert: x509.Certificate) -> list[x509.Certificate]:
        """CA certificates whose subject is ``cert``'s issuer."""
        return list(self._by_subject.get(cert.issuer.public_bytes(), ()))

    def crls_for(self, ca: x509.Certificate) -> list[x509.CertificateRevocationList]:
        return [crl for crl in self.crls if crl.issuer == ca.subject]


    @classmethod
    def from_files(cls, files: Mapping[str, bytes]) -> TrustStore:
        """Build a store from ``{file name: content}`` of a CA directory."""
        cas: list[x509.Certificate] = []
        crls: list[x509.CertificateRevocationList] = []
        for name in sorted(files):
            data = files[name]
            if _CERT_FILE.match(name):
                try:
                    cas.extend(x509.load_pem_x509_certificates(data))
                except (ValueError, x509.InvalidVersion) as exc:
                    raise PemError(
                        f"CA file {name} does not hold a PEM certificate: {exc}"
                    ) from exc
            elif _CRL_FILE.match(name):
                try:
                    crls.append(x509.load_pem_x509_crl(data))
                except ValueError as exc:
                    raise PemError(f"CRL file {name} does not hold a PEM CRL: {exc}") from exc
        return cls(cas=tuple(cas), crls=tuple(crls))
