"""Validation of certificate chains that may contain RFC 3820 proxies.

Two layers: OpenSSL (through pyOpenSSL, with ``ALLOW_PROXY_CERTS`` and the
verification time set to ``now``) checks the signatures, the CA path and the
proxy rules it knows; this module adds what OpenSSL leaves to the application
and gives every refusal a reason code and a sentence:

* structure: a legacy ``CN=proxy`` or draft GSI-3 proxy is refused, each proxy's
  subject is its issuer's plus one ``CN``, an unknown policy language is refused;
* path length: a proxy with constraint *n* may have at most *n* proxies below it;
* limited proxies: only limited proxies may be issued by a limited one;
* validity of every certificate at ``now``; revocation of the end-entity (and
  intermediate CA) certificates against the CRLs of the trust store;
* names: every subject and issuer name must have a one-to-one slash form
  (:func:`broker.pki.dn.slash_ambiguity`), since identities are compared as slash strings;
* namespaces: every CA-issued certificate (end entity, intermediate CA) must lie in its
  issuing CA's ``.signing_policy`` / ``.namespaces`` namespace (:mod:`broker.pki.namespace`);
* VOMS attribute certificates in the chain, when a vomsdir is given.

The identity of a chain is its end-entity subject, except below an *independent* proxy
(which carries none of its issuer's rights): then it is the subject of the topmost
independent proxy, and the chain carries no VOMS attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import crypto

from broker.errors import ChainError
from broker.pki.dn import slash_ambiguity, slash_from_name
from broker.pki.proxy import (
    DRAFT_PROXY_CERT_INFO_OID,
    ProxyInfo,
    ProxyType,
    extension_value,
    proxy_info,
)
from broker.pki.trust import TrustStore, signed_by
from broker.pki.voms import VomsAttributes, VomsDir, verify_chain_acs

MAX_CHAIN_LENGTH = 16
_LEGACY_PROXY_CNS = ("proxy", "limited proxy")


@dataclass(frozen=True)
class ChainInfo:
    """What a verified chain says about its holder."""

    identity: str  # slash form of the end-entity certificate's subject
    identity_cert: x509.Certificate
    leaf_subject: str
    proxy_types: tuple[ProxyType, ...]  # leaf first, one per proxy
    path_length: int | None  # the leaf's own constraint (None: unlimited or not a proxy)
    not_after: datetime  # earliest notAfter of the chain's end-entity and proxies
    fqans: tuple[str, ...] = ()
    voms: tuple[VomsAttributes, ...] = ()  # one per verified AC
    end_entity: str = ""  # slash form of the end-entity subject (= identity unless independent)

    @property
    def independent(self) -> bool:
        """True when an independent proxy in the chain made the identity its own subject."""
        return ProxyType.INDEPENDENT in self.proxy_types

    @property
    def proxy_depth(self) -> int:
        return len(self.proxy_types)

    @property
    def is_proxy(self) -> bool:
        return bool(self.proxy_types)

    @property
    def limited(self) -> bool:
        return ProxyType.LIMITED in self.proxy_types

    @property
    def leaf_type(self) -> str:
        if not self.proxy_types:
            return "end entity"
        kind = self.proxy_types[0]
        return f"RFC 3820 {kind.value} proxy"

    def time_left(self, now: datetime) -> timedelta:
        return max(self.not_after - now, timedelta(0))


def _fail(reason: str, message: str) -> ChainError:
    return ChainError(message, reason=reason)


def _describe(cert: x509.Certificate) -> str:
    return slash_from_name(cert.subject)


def _is_self_issued(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject


def _last_cn(cert: x509.Certificate) -> str | None:
    rdns = cert.subject.rdns
    if not rdns:
        return None
    attrs = list(rdns[-1])
    if len(attrs) == 1 and attrs[0].oid == NameOID.COMMON_NAME:
        value = attrs[0].value
        return value if isinstance(value, str) else None
    return None


def _classify(chain: Sequence[x509.Certificate]) -> list[ProxyInfo]:
    """The proxy information of the leading proxies; checks structure on the way."""
    infos: list[ProxyInfo] = []
    for index, cert in enumerate(chain):
        if extension_value(cert, DRAFT_PROXY_CERT_INFO_OID) is not None:
            raise _fail(
                "draft_proxy",
                f"{_describe(cert)} is a pre-RFC (GSI-3 draft) proxy, which is not supported; "
                "create an RFC 3820 proxy (grid-proxy-init -rfc or broker proxy-init)",
            )
        try:
            info = proxy_info(cert)
        except Exception as exc:
            raise _fail("malformed_proxy", f"{_describe(cert)}: {exc}") from exc
        if info is None:
            parent = chain[index + 1] if index + 1 < len(chain) else None
            if (
                _last_cn(cert) in _LEGACY_PROXY_CNS
                and parent is not None
                and cert.subject.rdns[:-1] == parent.subject.rdns
            ):
                raise _fail(
                    "legacy_proxy",
                    f"{_describe(cert)} is a legacy (pre-RFC 3820) proxy, which is not "
                    "supported; create an RFC 3820 proxy (grid-proxy-init -rfc)",
                )
            break
        if info.type is None:
            raise _fail(
                "unknown_proxy_policy",
                f"{_describe(cert)} uses the unknown proxy policy language {info.policy_oid}",
            )
        infos.append(info)
    return infos


def _check_proxy_rules(chain: Sequence[x509.Certificate], infos: Sequence[ProxyInfo]) -> None:
    for index, info in enumerate(infos):
        cert, parent = chain[index], chain[index + 1] if index + 1 < len(chain) else None
        if parent is None:
            raise _fail(
                "incomplete_chain",
                f"the chain ends at the proxy {_describe(cert)}; include the certificates "
                "it was issued by (the proxy file's chain up to the user certificate)",
            )
        # Naming: subject = issuer subject + exactly one single-valued CN.
        rdns = cert.subject.rdns
        last = list(rdns[-1]) if rdns else []
        if (
            cert.issuer != parent.subject
            or rdns[:-1] != parent.subject.rdns
            or len(last) != 1
            or last[0].oid != NameOID.COMMON_NAME
        ):
            raise _fail(
                "proxy_naming",
                f"the proxy {_describe(cert)} is not named after its issuer "
                f"{_describe(parent)} plus one CN component (RFC 3820 section 3.4)",
            )
        if not signed_by(cert, parent):
            raise _fail(
                "bad_signature",
                f"the proxy {_describe(cert)} is not signed by the key of {_describe(parent)}",
            )
        # Path length: the proxy at index i has i proxies below it.
        if info.path_length is not None and index > info.path_length:
            raise _fail(
                "path_length",
                f"the proxy {_describe(cert)} allows {info.path_length} further proxy level(s) "
                f"but {index} were issued below it",
            )
        if info.type is ProxyType.LIMITED:
            for below in range(index):
                if infos[below].type is not ProxyType.LIMITED:
                    raise _fail(
                        "limited_parent",
                        f"the full proxy {_describe(chain[below])} was issued by the limited "
                        f"proxy {_describe(cert)}; a limited proxy can only issue limited proxies",
                    )


def _check_times(chain: Sequence[x509.Certificate], now: datetime) -> None:
    for cert in chain:
        if now < cert.not_valid_before_utc:
            raise _fail(
                "not_yet_valid",
                f"{_describe(cert)} is not valid before "
                f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC",
            )
        if now > cert.not_valid_after_utc:
            raise _fail(
                "expired",
                f"{_describe(cert)} expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC",
            )


def _crl_signature_ok(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    key = ca.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            return crl.is_signature_valid(key)
    except Exception:
        return False
    return False


def _check_names(certs: Sequence[x509.Certificate]) -> None:
    for cert in certs:
        for which, name in (("subject", cert.subject), ("issuer", cert.issuer)):
            why = slash_ambiguity(name)
            if why is not None:
                raise _fail(
                    "ambiguous_name",
                    f"the certificate {_describe(cert)} is refused: its {which} name cannot be "
                    f"told apart from another name in the /-separated form ({why})",
                )


def _check_namespaces(verified: Sequence[x509.Certificate], first: int, trust: TrustStore) -> None:
    """Each CA-issued certificate from ``verified[first]`` up must be in its issuer's namespace."""
    for index in range(first, len(verified) - 1):
        cert, ca = verified[index], verified[index + 1]
        if _is_self_issued(cert):
            continue
        why = trust.namespace_violation(cert, ca)
        if why is not None:
            raise _fail("namespace", why)


def _check_revocation(certs: Sequence[x509.Certificate], trust: TrustStore, now: datetime) -> None:
    """Check each non-proxy, non-root certificate against its issuer's CRL, when one is held."""
    for cert in certs:
        if _is_self_issued(cert):
            continue
        for ca in trust.issuers_of(cert):
            for crl in trust.crls_for(ca):
                if not _crl_signature_ok(crl, ca):
                    raise _fail(
                        "bad_crl",
                        f"the CRL of {_describe(ca)} in the CA directory is not signed by it",
                    )
                next_update = crl.next_update_utc
                if next_update is not None and now > next_update:
                    raise _fail(
                        "crl_expired",
                        f"the CRL of {_describe(ca)} expired at {next_update:%Y-%m-%d %H:%M} UTC;"
                        " refresh the CA directory's CRLs (fetch-crl)",
                    )
                if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
                    raise _fail(
                        "revoked",
                        f"{_describe(cert)} (serial {cert.serial_number}) has been revoked by "
                        f"{_describe(ca)}",
                    )


_OPENSSL_REASONS = {
    2: "unknown_ca",  # unable to get issuer certificate
    20: "unknown_ca",  # unable to get local issuer certificate
    21: "unknown_ca",  # unable to verify the first certificate
    7: "bad_signature",
    9: "not_yet_valid",
    10: "expired",
    18: "self_signed",
    19: "unknown_ca",  # self-signed certificate in chain, not trusted
    24: "invalid_ca",
    25: "path_length",
    38: "path_length",  # proxy path length exceeded
    40: "proxy_naming",  # proxy subject name violation
    41: "proxy_not_allowed",
    34: "unhandled_critical_extension",
}


def _openssl_verify(
    chain: Sequence[x509.Certificate], trust: TrustStore, now: datetime
) -> list[x509.Certificate]:
    store = crypto.X509Store()
    for ca in trust.cas:
        store.add_cert(crypto.X509.from_cryptography(ca))
    store.set_flags(crypto.X509StoreFlags.ALLOW_PROXY_CERTS)
    store.set_time(now.replace(tzinfo=None))
    leaf = crypto.X509.from_cryptography(chain[0])
    untrusted = [crypto.X509.from_cryptography(c) for c in chain[1:]]
    ctx = crypto.X509StoreContext(store, leaf, untrusted)
    try:
        verified = ctx.get_verified_chain()
    except crypto.X509StoreContextError as exc:
        code = exc.errors[0] if exc.errors else -1
        message = exc.errors[2] if len(exc.errors) > 2 else str(exc)
        reason = _OPENSSL_REASONS.get(int(code), "untrusted")
        subject = exc.certificate.to_cryptography() if exc.certificate is not None else None
        where = f" at {_describe(subject)}" if subject is not None else ""
        hint = ""
        if reason == "unknown_ca":
            hint = "; the issuing CA is not in the CA directory (X509_CERT_DIR)"
        raise _fail(reason, f"certificate verification failed{where}: {message}{hint}") from exc
    return [c.to_cryptography() for c in verified]


def validate_chain(
    chain: Sequence[x509.Certificate],
    trust: TrustStore,
    *,
    now: datetime,
    vomsdir: VomsDir | None = None,
) -> ChainInfo:
    """Verify ``chain`` (leaf first) against ``trust`` at ``now``.

    ``vomsdir`` is a :class:`broker.pki.voms.VomsDir`; when given, every VOMS
    attribute certificate of the chain must verify and its FQANs are returned.
    Without it the chain's FQANs are empty: FQANs only ever come from a verified AC.
    Raises :class:`ChainError` (or its subclass ``VomsError``) with a reason code.
    """
    if not chain:
        raise _fail("empty_chain", "no certificate was presented")
    if len(chain) > MAX_CHAIN_LENGTH:
        raise _fail("chain_too_long", f"the chain has more than {MAX_CHAIN_LENGTH} certificates")
    _check_names(chain)
    infos = _classify(chain)
    _check_proxy_rules(chain, infos)
    _check_times(chain, now)
    verified = _openssl_verify(chain, trust, now)
    eec = chain[len(infos)] if len(infos) < len(chain) else None
    if eec is None:  # _check_proxy_rules guarantees a parent for each proxy
        raise _fail("incomplete_chain", "the chain holds no end-entity certificate")
    _check_names(verified)
    _check_times(verified, now)
    _check_namespaces(verified, len(infos), trust)
    _check_revocation(verified[len(infos) :], trust, now)
    not_after = min(c.not_valid_after_utc for c in chain[: len(infos) + 1])
    # An independent proxy starts a new identity: the topmost one names the holder.
    independent = [i for i, info in enumerate(infos) if info.type is ProxyType.INDEPENDENT]
    identity_cert = chain[independent[-1]] if independent else eec
    fqans: tuple[str, ...] = ()
    voms: tuple[VomsAttributes, ...] = ()
    if vomsdir is not None and not independent:
        attrs = verify_chain_acs(list(chain), eec, vomsdir, trust, now)
        voms = tuple(attrs)
        fqans = tuple(f for a in attrs for f in a.fqans)
    return ChainInfo(
        identity=slash_from_name(identity_cert.subject),
        identity_cert=identity_cert,
        end_entity=slash_from_name(eec.subject),
        leaf_subject=slash_from_name(chain[0].subject),
        proxy_types=tuple(i.type for i in infos if i.type is not None),
        path_length=infos[0].path_length if infos else None,
        not_after=not_after,
        fqans=fqans,
        voms=voms,
    )
