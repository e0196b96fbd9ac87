"""The extensions of the end-entity certificates this project's own CAs sign.

Both the online CA (:mod:`broker.onlineca`, real users) and the development CA
(:mod:`broker.pki.devca`) issue certificates of the grid user/host profile: not a
CA, digitalSignature and keyEncipherment (plus dataEncipherment for users), the
extended key usages asked for, and both key identifiers.  Pure: returns objects.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPublicKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ObjectIdentifier

# (extension, critical) in the order they go into the certificate
Extensions = list[tuple[x509.ExtensionType, bool]]


def key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    data_encipherment: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    """A KeyUsage with the named bits set; the bits no certificate here uses stay clear."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=data_encipherment,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def end_entity_extensions(
    public_key: CertificatePublicKeyTypes,
    issuer_key: CertificateIssuerPublicKeyTypes,
    *,
    extended_usages: Sequence[ObjectIdentifier],
    data_encipherment: bool,
) -> Extensions:
    """The extensions of an end-entity certificate for ``public_key`` signed by ``issuer_key``."""
    # digitalSignature is what lets the holder sign proxies (OpenSSL insists).
    usage = key_usage(
        digital_signature=True, key_encipherment=True, data_encipherment=data_encipherment
    )
    return [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (usage, True),
        (x509.ExtendedKeyUsage(list(extended_usages)), False),
        (x509.SubjectKeyIdentifier.from_public_key(public_key), False),
        (x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key), False),
    ]


def with_extensions(
    builder: x509.CertificateBuilder, extensions: Extensions
) -> x509.CertificateBuilder:
    """``builder`` with each of ``extensions`` added, in order."""
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder
