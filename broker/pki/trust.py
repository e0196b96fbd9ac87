"""Trust anchors: the CA certificates and CRLs of an ``X509_CERT_DIR``.

Pure: the caller reads the directory (``broker.trustdir``) and passes the file
contents in.  In that layout CA certificates are ``<hash>.0`` (``.1``… on hash
collisions), CRLs are ``<hash>.r0`` and each CA's namespace is in
``<hash>.signing_policy`` and/or ``<hash>.namespaces`` (:mod:`broker.pki.namespace`);
other files (``.info``, ``.crl_url``) are ignored.

A CA that ships neither namespace file issues nothing this broker accepts, unless the
store is built with ``accept_unconstrained=True`` (docs/trust.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import crypto

from broker.errors import PemError
from broker.pki.dn import slash_from_name
from broker.pki.namespace import CaNamespace, ca_namespace, check_files

_CERT_FILE = re.compile(r"^[0-9a-f]{8}\.[0-9]+$")
_CRL_FILE = re.compile(r"^[0-9a-f]{8}\.r[0-9]+$")


@dataclass(frozen=True)
class TrustStore:
    """CA certificates and CRLs, looked up by subject."""

    cas: tuple[x509.Certificate, ...]
    crls: tuple[x509.CertificateRevocationList, ...] = ()
    # Keyed by the CA certificate's DER; a CA missing here has no namespace files.
    namespaces: Mapping[bytes, CaNamespace] = field(default_factory=dict)
    accept_unconstrained: bool = False
    problems: tuple[str, ...] = ()  # malformed namespace files (file:line: ...)
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

    def namespace_of(self, ca: x509.Certificate) -> CaNamespace | None:
        return self.namespaces.get(ca.public_bytes(Encoding.DER))

    def namespace_violation(self, cert: x509.Certificate, ca: x509.Certificate) -> str | None:
        """None when ``ca`` may issue ``cert``'s subject name, else a sentence saying why not
        (naming the CA and its namespace)."""
        ca_dn = slash_from_name(ca.subject)
        subject = slash_from_name(cert.subject)
        namespace = self.namespace_of(ca)
        if namespace is None or (not namespace.constrained and namespace.error is None):
            if self.accept_unconstrained:
                return None
            return (
                f"the CA {ca_dn} has no namespace (neither a .signing_policy nor a "
                f".namespaces file names it in the CA directory), so {subject} issued by "
                "it is not accepted; install the CA's namespace files, or set "
                "BROKER_ACCEPT_CA_WITHOUT_NAMESPACE=1 to accept such CAs (docs/trust.md)"
            )
        why = namespace.violation(subject)
        if why is None:
            return None
        return f"the CA {ca_dn} may not issue {subject}: {why}"

    @classmethod
    def from_files(
        cls, files: Mapping[str, bytes], *, accept_unconstrained: bool = False
    ) -> TrustStore:
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
        namespaces: dict[bytes, CaNamespace] = {}
        for ca in cas:
            namespaces[ca.public_bytes(Encoding.DER)] = ca_namespace(
                slash_from_name(ca.subject), subject_hash(ca), files
            )
        return cls(
            cas=tuple(cas),
            crls=tuple(crls),
            namespaces=namespaces,
            accept_unconstrained=accept_unconstrained,
            problems=tuple(check_files(files)),
        )


def subject_hash(cert: x509.Certificate) -> str:
    """OpenSSL's subject hash (``openssl x509 -subject_hash``), the CA directory's file stem."""
    return f"{crypto.X509.from_cryptography(cert).subject_name_hash() & 0xFFFFFFFF:08x}"


def signed_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    """Whether ``parent`` issued ``child``: its subject is ``child``'s issuer and its key
    verifies ``child``'s signature.  Any failure to verify (a name or key type that does
    not fit, an algorithm cryptography cannot check, a bad signature) answers no."""
    try:
        child.verify_directly_issued_by(parent)
    except Exception:  # verification raises ValueError, TypeError, InvalidSignature and more
        return False
    return True
