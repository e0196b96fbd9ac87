"""RFC 3820 proxy certificates: keys, CSRs, creation and delegation.

A proxy is signed by the key of its issuer (an end-entity certificate or another
proxy).  Its subject is the issuer's subject plus one ``CN=<serial>``; it carries
a critical ProxyCertInfo extension naming the policy language:

* impersonation (``id-ppl-inheritAll``): the proxy may do what its issuer may;
* limited (the Globus OID): job submission is refused by gatekeepers; a limited
  proxy can only issue limited proxies;
* independent (``id-ppl-independent``): carries no rights of the issuer.

Delegation never moves a private key: the receiving side makes a key and a CSR,
the holder of the credential signs the CSR's public key into a proxy.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from asn1crypto import core
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID, ObjectIdentifier

from broker.errors import CredentialError, CsrError, InputError
from broker.pki.dn import slash_from_name
from broker.pki.loading import Credential, PrivateKey

PROXY_CERT_INFO_OID = ObjectIdentifier("1.3.6.1.5.5.7.1.14")
# The pre-RFC "draft" (GSI-3) ProxyCertInfo; recognised only to be refused.
DRAFT_PROXY_CERT_INFO_OID = ObjectIdentifier("1.3.6.1.4.1.3536.1.222")
INHERIT_ALL_OID = "1.3.6.1.5.5.7.21.1"
INDEPENDENT_OID = "1.3.6.1.5.5.7.21.2"
LIMITED_OID = "1.3.6.1.4.1.3536.1.1.1.9"
#: The broker's job-binding extension: non-critical, its value a DER UTF8String holding
#: the batch job id the proxy was issued for (an HTCondor GlobalJobId). The OID is in
#: the ``2.25`` arc (ITU-T X.667: an OID made from a UUID, no registration needed), so
#: it cannot collide with anyone else's; tools that do not know it ignore it.
JOB_ID_OID = ObjectIdentifier("2.25.309585141664004713532870067774460027533")
JOB_ID_MAX = 256  # as the service accepts

BACKDATE = timedelta(minutes=5)
MAX_CSR_SIZE = 64 * 1024


class ProxyType(enum.Enum):
    IMPERSONATION = "impersonation"
    LIMITED = "limited"
    INDEPENDENT = "independent"

    @property
    def policy_oid(self) -> str:
        return {
            ProxyType.IMPERSONATION: INHERIT_ALL_OID,
            ProxyType.LIMITED: LIMITED_OID,
            ProxyType.INDEPENDENT: INDEPENDENT_OID,
        }[self]


class _ProxyPolicy(core.Sequence):  # type: ignore[misc]
    _fields = [
        ("policy_language", core.ObjectIdentifier),
        ("policy", core.OctetString, {"optional": True}),
    ]


class _ProxyCertInfo(core.Sequence):  # type: ignore[misc]
    _fields = [
        ("path_len_constraint", core.Integer, {"optional": True}),
        ("proxy_policy", _ProxyPolicy),
    ]


@dataclass(frozen=True)
class ProxyInfo:
    """What a ProxyCertInfo extension says."""

    type: ProxyType | None  # None: a policy language this code does not know
    policy_oid: str
    path_length: int | None  # None: unlimited


def encode_proxy_cert_info(proxy_type: ProxyType, path_length: int | None) -> bytes:
    value = _ProxyCertInfo(
        {
            "path_len_constraint": path_length,
            "proxy_policy": {"policy_language": proxy_type.policy_oid},
        }
    )
    return bytes(value.dump())


def decode_proxy_cert_info(der: bytes) -> ProxyInfo:
    try:
        parsed = _ProxyCertInfo.load(der, strict=True)
        oid = parsed["proxy_policy"]["policy_language"].dotted
        plen_field = parsed["path_len_constraint"]
        plen = None if plen_field.native is None else int(plen_field.native)
    except (ValueError, TypeError, KeyError) as exc:
        raise InputError(f"malformed ProxyCertInfo extension: {exc}") from exc
    kind = {t.policy_oid: t for t in ProxyType}.get(oid)
    return ProxyInfo(type=kind, policy_oid=oid, path_length=plen)


def extension_value(cert: x509.Certificate, oid: ObjectIdentifier) -> x509.ExtensionType | None:
    """The value of ``cert``'s extension ``oid``, or None when it has none."""
    try:
        return cert.extensions.get_extension_for_oid(oid).value
    except x509.ExtensionNotFound:
        return None


def proxy_info(cert: x509.Certificate) -> ProxyInfo | None:
    """The RFC 3820 proxy information of ``cert``, or None when it is not an RFC proxy."""
    value = extension_value(cert, PROXY_CERT_INFO_OID)
    if value is None:
        return None
    der = value.value if isinstance(value, x509.UnrecognizedExtension) else value.public_bytes()
    return decode_proxy_cert_info(der)


def job_id_extension(job_id: str) -> x509.UnrecognizedExtension:
    """The non-critical extension that binds a proxy to ``job_id`` (see :data:`JOB_ID_OID`)."""
    if not job_id or len(job_id) > JOB_ID_MAX or any(ord(c) < 32 or ord(c) == 127 for c in job_id):
        raise InputError(f"a job id must be 1 to {JOB_ID_MAX} printable characters")
    return x509.UnrecognizedExtension(JOB_ID_OID, core.UTF8String(job_id).dump())


def proxy_job_id(cert: x509.Certificate) -> str | None:
    """The job id a proxy was issued for, or None (no such extension, or not a UTF8String)."""
    value = extension_value(cert, JOB_ID_OID)
    if not isinstance(value, x509.UnrecognizedExtension):
        return None
    try:
        parsed = core.UTF8String.load(value.value, strict=True)
        text = parsed.native
    except (ValueError, TypeError):
        return None
    return text if isinstance(text, str) else None


def chain_job_id(chain: Sequence[x509.Certificate]) -> str | None:
    """The job id of the proxy nearest the leaf that carries one (a proxy of a job's proxy
    keeps naming that job)."""
    for cert in chain:
        if proxy_info(cert) is None:
            return None
        job_id = proxy_job_id(cert)
        if job_id is not None:
            return job_id
    return None


def generate_key(kind: str = "rsa", bits: int = 2048) -> PrivateKey:
    """A fresh key: ``rsa`` (``bits``, 2048 by default) or ``ec`` (P-256)."""
    if kind == "rsa":
        if bits < 1024 or bits > 8192:
            raise InputError(f"RSA key size {bits} is out of range (1024..8192)")
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    raise InputError(f"unknown key kind {kind!r}; use 'rsa' or 'ec'")


def _hash_for(key: PrivateKey) -> hashes.SHA256:
    return hashes.SHA256()


def make_csr(key: PrivateKey) -> x509.CertificateSigningRequest:
    """A CSR carrying ``key``'s public key; the subject is a placeholder the signer replaces."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "proxy request")])
    )
    return builder.sign(key, _hash_for(key))


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """A CSR in PEM or DER; its self-signature must verify (proof of key possession)."""
    if not data:
        raise CsrError("the certificate request is empty")
    if len(data) > MAX_CSR_SIZE:
        raise CsrError(f"the certificate request is larger than {MAX_CSR_SIZE} bytes")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            csr = x509.load_pem_x509_csr(data)
        else:
            csr = x509.load_der_x509_csr(data)
    except (ValueError, x509.InvalidVersion) as exc:
        raise CsrError(f"the certificate request is malformed: {exc}") from exc
    try:
        valid = csr.is_signature_valid
    except Exception as exc:
        raise CsrError(f"the certificate request's signature cannot be checked: {exc}") from exc
    if not valid:
        raise CsrError("the certificate request's signature does not verify")
    pub = csr.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        if pub.key_size < 1024:
            raise CsrError(f"the requested RSA key has {pub.key_size} bits; at least 1024 needed")
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        if pub.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
            raise CsrError(f"the requested EC curve {pub.curve.name} is not supported")
    else:
        raise CsrError(f"unsupported public key type {type(pub).__name__} in the request")
    return csr


PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def _inherited_limits(
    issuer: Credential, proxy_type: ProxyType, path_length: int | None
) -> tuple[ProxyType, int | None]:
    """The type and path length a new proxy of ``issuer`` may have.

    Every proxy above the new one constrains it, not only the parent: the proxy at
    index i of the issuer's chain will have i + 1 proxies below it (Globus-style
    clients do not copy a constraint down, so a looser child can sit under a tighter
    ancestor).
    """
    for depth, ancestor in enumerate(issuer.chain):
        info = proxy_info(ancestor)
        if info is None:
            break
        if info.type is ProxyType.LIMITED:
            proxy_type = ProxyType.LIMITED
        if info.path_length is not None:
            allowed = info.path_length - depth - 1
            if allowed < 0:
                raise CredentialError(
                    f"the proxy {slash_from_name(ancestor.subject)} allows "
                    f"{info.path_length} level(s) below it; it cannot take another one",
                    reason="path_length",
                )
            path_length = allowed if path_length is None else min(path_length, allowed)
    return proxy_type, path_length


def _proxy_key_usage(parent: x509.Certificate) -> x509.KeyUsage | None:
    """The parent's key usage without certificate signing (None when the parent has none)."""
    try:
        parent_ku = parent.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None
    return x509.KeyUsage(
        digital_signature=parent_ku.digital_signature,
        content_commitment=False,
        key_encipherment=parent_ku.key_encipherment,
        data_encipherment=parent_ku.data_encipherment,
        key_agreement=parent_ku.key_agreement,
        key_cert_sign=False,
        crl_sign=parent_ku.crl_sign,
        encipher_only=parent_ku.encipher_only if parent_ku.key_agreement else False,
        decipher_only=parent_ku.decipher_only if parent_ku.key_agreement else False,
    )


def create_proxy(
    issuer: Credential,
    public_key: PublicKey,
    *,
    now: datetime,
    lifetime: timedelta,
    proxy_type: ProxyType = ProxyType.IMPERSONATION,
    path_length: int | None = None,
    extra_extensions: Sequence[x509.ExtensionType] = (),
) -> x509.Certificate:
    """Sign a proxy of ``issuer`` for ``public_key``.

    The proxy is limited when the issuer is limited (whatever was asked), its
    path length is tightened to what the issuer allows, and it never outlives the
    issuer.  Raises :class:`CredentialError` when the issuer cannot sign proxies
    (no key, expired, a path length of 0).
    """
    if issuer.key is None:
        raise CredentialError("the issuing credential has no private key")
    parent = issuer.cert
    if lifetime <= timedelta(0):
        raise InputError("a proxy lifetime must be positive")
    if path_length is not None and path_length < 0:
        raise InputError("a proxy path length must be 0 or more")
    if now >= parent.not_valid_after_utc:
        raise CredentialError(
            f"the issuing credential expired at {parent.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC",
            reason="expired",
        )
    proxy_type, path_length = _inherited_limits(issuer, proxy_type, path_length)
    serial = secrets.randbits(62) | (1 << 62)  # positive, fixed width, never zero
    subject = x509.Name(
        [
            *parent.subject.rdns,
            x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, str(serial))]),
        ]
    )
    not_after = min(now + lifetime, parent.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(parent.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(
            x509.UnrecognizedExtension(
                PROXY_CERT_INFO_OID, encode_proxy_cert_info(proxy_type, path_length)
            ),
            critical=True,
        )
    )
    proxy_ku = _proxy_key_usage(parent)
    if proxy_ku is not None:
        builder = builder.add_extension(proxy_ku, critical=True)
    for ext in extra_extensions:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(issuer.key, _hash_for(issuer.key))


def new_proxy(
    issuer: Credential,
    *,
    now: datetime,
    lifetime: timedelta,
    proxy_type: ProxyType = ProxyType.IMPERSONATION,
    path_length: int | None = None,
    key: PrivateKey | None = None,
    extra_extensions: Sequence[x509.ExtensionType] = (),
) -> Credential:
    """A complete proxy credential (new key unless one is given): grid-proxy-init's job."""
    key = key if key is not None else generate_key()
    cert = create_proxy(
        issuer,
        key.public_key(),
        now=now,
        lifetime=lifetime,
        proxy_type=proxy_type,
        path_length=path_length,
        extra_extensions=extra_extensions,
    )
    return Credential(chain=(cert, *issuer.chain), key=key)


def sign_request(
    issuer: Credential,
    csr: x509.CertificateSigningRequest,
    *,
    now: datetime,
    lifetime: timedelta,
    proxy_type: ProxyType = ProxyType.IMPERSONATION,
    path_length: int | None = None,
    job_id: str | None = None,
) -> tuple[x509.Certificate, ...]:
    """Delegate: sign the CSR's public key into a proxy; returns the new chain, leaf first.

    ``job_id``: the proxy carries it in the non-critical job-binding extension
    (:func:`job_id_extension`), so whoever holds the proxy can see which job it was for.
    """
    public_key = csr.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise CsrError(f"unsupported public key type {type(public_key).__name__}")
    cert = create_proxy(
        issuer,
        public_key,
        now=now,
        lifetime=lifetime,
        proxy_type=proxy_type,
        path_length=path_length,
        extra_extensions=[job_id_extension(job_id)] if job_id is not None else (),
    )
    return (cert, *issuer.chain)


def csr_to_pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


class SignatureCheck(enum.Enum):
    """The outcome of :func:`check_signature`; callers word the refusal for their protocol."""

    VALID = "valid"
    UNSUPPORTED_KEY = "unsupported_key"
    MISMATCH = "mismatch"


def check_signature(
    cert: x509.Certificate, message: bytes, signature: bytes, digest: hashes.HashAlgorithm
) -> SignatureCheck:
    """Whether ``signature`` over ``message`` verifies with ``cert``'s public key.

    RSA keys use PKCS#1 v1.5 and EC keys ECDSA, both with ``digest``; other key
    types are reported rather than raised so that each edge keeps its wording.
    """
    key = cert.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, message, padding.PKCS1v15(), digest)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(digest))
        else:
            return SignatureCheck.UNSUPPORTED_KEY
    except InvalidSignature:
        return SignatureCheck.MISMATCH
    return SignatureCheck.VALID
