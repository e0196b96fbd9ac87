"""VOMS attribute certificates: parsing, verification and (for tests and tools) issuing.

A VOMS proxy carries, in the non-critical extension ``1.3.6.1.4.1.8005.100.100.5``,
a ``SEQUENCE OF SEQUENCE OF AttributeCertificate`` (RFC 5755 v2 ACs).  Each AC
names its holder by the issuer name and serial number of the user's end-entity
certificate, lists the user's FQANs under attribute ``1.3.6.1.4.1.8005.100.100.4``
(an ``IetfAttrSyntax`` whose policyAuthority is ``<vo>://<host>:<port>``), and
embeds the VOMS server's certificate in the ``ACCERTS`` extension
(``1.3.6.1.4.1.8005.100.100.10``).

Trust in an AC takes three things, all of which :func:`verify_chain_acs` checks:
the AC's signature verifies with the embedded signer certificate, that certificate
chains to a CA of the :class:`~broker.pki.trust.TrustStore`, and the vomsdir holds
an LSC file (``<vo>/<host>.lsc``) listing the signer's DN and its CA's DN.

Pure: no file or network access, no clock reads.  Callers pass file contents and
``now``.  Every failure is a :class:`~broker.errors.VomsError` whose ``reason`` is
one of ``malformed_ac``, ``holder_mismatch``, ``expired_ac``, ``ac_not_yet_valid``,
``target_mismatch``, ``signer_not_embedded``, ``bad_ac_signature``,
``untrusted_signer``, ``no_lsc``, ``bad_lsc`` or ``bad_fqan``.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from asn1crypto import cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from broker.errors import BrokerError, DnSyntaxError, InputError, VomsError
from broker.pki.dn import name_from_slash, slash_from_name
from broker.pki.loading import Credential
from broker.pki.trust import TrustStore, signed_by
from broker.policy import FqanError, parse_fqan

__all__ = [
    "ACCERTS_OID",
    "FQAN_ATTRIBUTE_OID",
    "VOMS_AC_EXTENSION_OID",
    "LscEntry",
    "ParsedAC",
    "VomsAttributes",
    "VomsDir",
    "find_acs",
    "fqan_validate",
    "full_fqan",
    "make_ac_extension",
    "parse_ac",
    "parse_lsc",
    "split_ac_extension",
    "verify_chain_acs",
]

VOMS_AC_EXTENSION_OID = "1.3.6.1.4.1.8005.100.100.5"
FQAN_ATTRIBUTE_OID = "1.3.6.1.4.1.8005.100.100.4"
ACCERTS_OID = "1.3.6.1.4.1.8005.100.100.10"
NO_REV_AVAIL_OID = "2.5.29.56"
AUTHORITY_KEY_ID_OID = "2.5.29.35"
TARGETS_OID = "2.5.29.55"

# libvomsapi tolerates 5 minutes of clock difference; we apply it to notBefore only,
# so that an AC freshly issued by a server whose clock runs ahead is usable, while an
# expired AC stays expired.
CLOCK_SKEW = timedelta(minutes=5)
MAX_AC_SIZE = 64 * 1024
MAX_LSC_SIZE = 64 * 1024
MAX_FQAN_LENGTH = 512
MAX_SIGNER_PATH = 6
LSC_SEPARATOR = "------NEXT CHAIN------"

_VOMS_AC_EXT = x509.ObjectIdentifier(VOMS_AC_EXTENSION_OID)


# --------------------------------------------------------------------------- ASN.1 shapes
# The standard AC structures come from asn1crypto.cms; these are the VOMS containers.


class _AnyList(core.SequenceOf):  # type: ignore[misc]
    _child_spec = core.Any


class _AcEnvelope(core.SequenceOf):  # type: ignore[misc]
    """The proxy extension: one inner sequence per VOMS server contacted."""

    _child_spec = _AnyList


class _AcList(core.SequenceOf):  # type: ignore[misc]
    _child_spec = cms.AttributeCertificateV2


class _AcWrapper(core.SequenceOf):  # type: ignore[misc]
    _child_spec = _AcList


class _CertList(core.SequenceOf):  # type: ignore[misc]
    _child_spec = asn1_x509.Certificate


class _AcCerts(core.Sequence):  # type: ignore[misc]
    """ACCERTS: ``SEQUENCE { SEQUENCE OF Certificate }``, the signer first."""

    _fields = [("certs", _CertList)]


class _AcTarget(core.Sequence):  # type: ignore[misc]
    _fields = [
        ("name", asn1_x509.GeneralName, {"explicit": 0, "optional": True}),
        ("group", asn1_x509.GeneralName, {"explicit": 1, "optional": True}),
        ("cert", cms.IssuerSerial, {"explicit": 2, "optional": True}),
    ]


class _AcTargetList(core.SequenceOf):  # type: ignore[misc]
    _child_spec = _AcTarget


class _AcTargets(core.Sequence):  # type: ignore[misc]
    """VOMS's form of the targetInformation extension (critical when present)."""

    _fields = [("targets", _AcTargetList)]


class _FqanAttributeValues(core.SetOf):  # type: ignore[misc]
    _child_spec = cms.IetfAttrSyntax


# --------------------------------------------------------------------------- FQANs


def _fqan_parts(text: str) -> tuple[str, str, str]:
    """Split an FQAN with the one FQAN parser (:func:`broker.policy.parse_fqan`).

    Returns the group path, the role and the capability ("NULL" when absent);
    every refusal is a ``VomsError(reason="bad_fqan")``.
    """
    if not isinstance(text, str) or not text:
        raise VomsError(
            "an FQAN is empty; give it as /vo[/group...][/Role=role]", reason="bad_fqan"
        )
    if len(text) > MAX_FQAN_LENGTH:
        raise VomsError(f"an FQAN is longer than {MAX_FQAN_LENGTH} characters", reason="bad_fqan")
    if not text.startswith("/"):
        raise VomsError(
            f"the FQAN {text!r} does not start with '/'; give it as /vo[/group...][/Role=role]",
            reason="bad_fqan",
        )
    try:
        fqan = parse_fqan(text)
    except FqanError as exc:
        raise VomsError(
            f"the FQAN {text!r} is malformed ({exc}): it must be /vo, then /group parts, then "
            "optionally /Role=name and /Capability=name, in that order "
            "(letters, digits, '_', '.', '-')",
            reason="bad_fqan",
        ) from None
    groups = "/" + "/".join(fqan.groups)
    return groups, fqan.role or "NULL", fqan.capability or "NULL"


def fqan_validate(text: str, *, vo: str | None = None) -> None:
    """Raise ``VomsError(reason="bad_fqan")`` unless ``text`` is a well-formed FQAN.

    With ``vo``, the FQAN's first group must also be that VO.
    """
    groups, _, _ = _fqan_parts(text)
    if vo is not None and groups.split("/")[1] != vo:
        raise VomsError(
            f"the FQAN {text!r} does not belong to the VO {vo!r}; it must start with /{vo}",
            reason="bad_fqan",
        )


def full_fqan(text: str) -> str:
    """The full FQAN form VOMS servers issue: ``/vo/group/Role=x/Capability=y``.

    ``/atlas`` becomes ``/atlas/Role=NULL/Capability=NULL`` and
    ``/atlas/Role=production`` becomes ``/atlas/Role=production/Capability=NULL``.
    """
    groups, role, cap = _fqan_parts(text)
    return f"{groups}/Role={role}/Capability={cap}"


# --------------------------------------------------------------------------- vomsdir


@dataclass(frozen=True)
class LscEntry:
    """One accepted DN chain of an LSC file: the VOMS signer, any intermediates, the CA."""

    signer_dn: str
    ca_dn: str
    intermediates: tuple[str, ...] = ()

    @property
    def chain(self) -> tuple[str, ...]:
        return (self.signer_dn, *self.intermediates, self.ca_dn)


def parse_lsc(data: bytes, *, name: str = "LSC file") -> tuple[LscEntry, ...]:
    """The DN chains of an ``.lsc`` file (chains separated by ``------NEXT CHAIN------``).

    Each chain lists the VOMS server's DN, then the DN of each issuing CA up to the
    root.  Blank lines and ``#`` comments are ignored.  DNs are normalised to the
    slash form :func:`broker.pki.dn.slash_from_name` prints.
    """
    if len(data) > MAX_LSC_SIZE:
        raise VomsError(f"the {name} is larger than {MAX_LSC_SIZE} bytes", reason="bad_lsc")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise VomsError(f"the {name} is not UTF-8 text", reason="bad_lsc") from exc
    chains: list[list[str]] = [[]]
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(LSC_SEPARATOR):
            chains.append([])
            continue
        try:
            chains[-1].append(slash_from_name(name_from_slash(line)))
        except DnSyntaxError as exc:
            raise VomsError(
                f"the {name}, line {lineno}, does not hold a DN in slash form: {exc.message}",
                reason="bad_lsc",
            ) from exc
    entries: list[LscEntry] = []
    for chain in chains:
        if not chain:
            continue
        if len(chain) < 2:
            raise VomsError(
                f"the {name} has a chain with only the DN {chain[0]}; each chain needs the "
                "VOMS server's DN on one line and its CA's DN on the next",
                reason="bad_lsc",
            )
        entries.append(LscEntry(chain[0], chain[-1], tuple(chain[1:-1])))
    if not entries:
        raise VomsError(
            f"the {name} lists no DNs; it needs the VOMS server's DN, then its CA's DN",
            reason="bad_lsc",
        )
    return tuple(entries)


@dataclass(frozen=True)
class VomsDir:
    """The LSC files of an ``X509_VOMS_DIR``: VO -> VOMS host -> accepted DN chains."""

    entries: Mapping[str, Mapping[str, tuple[tuple[str, ...], ...]]] = field(default_factory=dict)

    @classmethod
    def from_files(cls, files: Mapping[str, bytes]) -> VomsDir:
        """Build from ``{relative path: content}``, e.g. ``{"atlas/voms.example.org.lsc": ...}``.

        Files not ending in ``.lsc`` are ignored (old vomsdirs also hold server
        certificates, which this module never trusts directly).
        """
        entries: dict[str, dict[str, tuple[tuple[str, ...], ...]]] = {}
        for path in sorted(files):
            if not path.endswith(".lsc"):
                continue
            parts = [p for p in path.split("/") if p not in ("", ".")]
            if len(parts) != 2 or parts[1] == ".lsc" or ".." in parts:
                raise VomsError(
                    f"the vomsdir file {path!r} is not at <vo>/<host>.lsc; "
                    "move it into a directory named after its VO",
                    reason="bad_lsc",
                )
            vo, host = parts[0], parts[1][: -len(".lsc")]
            chains = parse_lsc(files[path], name=f"LSC file {path}")
            entries.setdefault(vo, {})[host] = tuple(e.chain for e in chains)
        return cls(entries=entries)

    def chains_for(self, vo: str, host: str) -> tuple[tuple[str, ...], ...] | None:
        """The accepted DN chains for ``vo`` at ``host``, or None when no LSC file exists."""
        return self.entries.get(vo, {}).get(host)


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class ParsedAC:
    """The fields of one VOMS AC, as encoded; nothing here has been verified."""

    der: bytes
    version: int  # 1 means v2, the only version VOMS issues
    holder_issuer: str | None  # slash DN; None when the holder is not a baseCertificateID
    holder_serial: int | None
    issuer: str  # slash DN of the signer (v2Form directoryName)
    serial: int
    not_before: datetime
    not_after: datetime
    vo: str
    uri: str  # host:port
    fqans: tuple[str, ...]
    signer_certs: tuple[x509.Certificate, ...]  # ACCERTS, signer first; () when absent
    authority_key_id: bytes | None
    has_no_rev_avail: bool
    targets: tuple[str, ...] | None  # None: no targeting extension
    unknown_critical: tuple[str, ...]  # OIDs of critical extensions not understood
    signature_algorithm: str  # dotted OID of the outer signatureAlgorithm
    inner_signature_algorithm: str  # dotted OID inside the signed part (must match)
    signature: bytes
    tbs: bytes  # the DER of AttributeCertificateInfo, what the signature covers

    @property
    def host(self) -> str:
        return _host_of(self.uri)


def _malformed(what: str) -> VomsError:
    return VomsError(f"the VOMS attribute certificate is malformed: {what}", reason="malformed_ac")


def _host_of(uri: str) -> str:
    host, sep, port = uri.rpartition(":")
    return host if sep and port.isdigit() else uri


def _slash_from_asn1_name(name: Any) -> str:
    """Slash form of an asn1crypto Name, via cryptography so formatting matches dn.py."""
    rdns: list[x509.RelativeDistinguishedName] = []
    for rdn in name.chosen:
        attrs: list[x509.NameAttribute[str]] = []
        for atv in rdn:
            value = atv["value"].native
            if not isinstance(value, str):
                raise _malformed("a DN holds a value that is not a string")
            attrs.append(x509.NameAttribute(x509.ObjectIdentifier(atv["type"].dotted), value))
        if not attrs:
            raise _malformed("a DN holds an empty RDN")
        rdns.append(x509.RelativeDistinguishedName(attrs))
    return slash_from_name(x509.Name(rdns))


def _single_dirname(names: Any, what: str) -> str:
    if len(names) != 1 or names[0].name != "directory_name":
        raise _malformed(f"the {what} must be exactly one directoryName")
    return _slash_from_asn1_name(names[0].chosen)


def split_ac_extension(der: bytes) -> list[bytes]:
    """The DER of each AC inside the proxy extension's ``SEQUENCE OF SEQUENCE OF AC``."""
    try:
        if len(der) > MAX_AC_SIZE:
            raise _malformed(f"the AC extension is larger than {MAX_AC_SIZE} bytes")
        envelope = _AcEnvelope.load(der, strict=True)
        out: list[bytes] = []
        for inner in envelope:
            for item in inner:
                encoded = bytes(item.dump())
                # An AC is a universal, constructed SEQUENCE.
                if not encoded.startswith(b"\x30"):
                    raise _malformed("an element of the AC extension is not a SEQUENCE")
                out.append(encoded)
    except VomsError:
        raise
    except Exception as exc:  # asn1crypto raises many kinds on hostile input
        raise _malformed(
            f"the extension {VOMS_AC_EXTENSION_OID} cannot be decoded ({exc})"
        ) from exc
    if not out:
        raise _malformed("the AC extension holds no attribute certificate")
    return out


def find_acs(cert: x509.Certificate) -> list[bytes]:
    """The DER of each VOMS AC carried by ``cert``; ``[]`` when it has no AC extension."""
    try:
        ext = cert.extensions.get_extension_for_oid(_VOMS_AC_EXT)
    except x509.ExtensionNotFound:
        return []
    except ValueError as exc:  # cryptography refuses duplicate or broken extensions
        raise _malformed(f"the certificate's extensions cannot be read ({exc})") from exc
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise _malformed("the AC extension was decoded as something else")
    return split_ac_extension(value.value)


def parse_ac(der: bytes) -> ParsedAC:
    """Decode one VOMS AC; raises ``VomsError(reason="malformed_ac")`` on any structural fault."""
    try:
        return _parse_ac(der)
    except BrokerError as exc:
        if isinstance(exc, VomsError) and exc.reason == "malformed_ac":
            raise
        raise _malformed(exc.message) from exc
    except Exception as exc:  # asn1crypto and cryptography raise many kinds on hostile input
        raise _malformed(f"{type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class _AcExtensionValues:
    signer_certs: tuple[x509.Certificate, ...]
    authority_key_id: bytes | None
    has_no_rev_avail: bool
    targets: tuple[str, ...] | None
    unknown_critical: tuple[str, ...]


def _parse_ac_extensions(extensions: Any) -> _AcExtensionValues:
    """The AC extensions the checks use; a repeated extension is malformed."""
    signer_certs: tuple[x509.Certificate, ...] = ()
    authority_key_id: bytes | None = None
    has_no_rev_avail = False
    targets: tuple[str, ...] | None = None
    unknown_critical: list[str] = []
    seen: set[str] = set()
    for ext in extensions if extensions.native is not None else ():
        oid = ext["extn_id"].dotted
        if oid in seen:
            raise _malformed(f"the extension {oid} appears twice")
        seen.add(oid)
        raw = bytes(ext["extn_value"].contents)
        if oid == ACCERTS_OID:
            certs = _AcCerts.load(raw, strict=True)["certs"]
            signer_certs = tuple(x509.load_der_x509_certificate(c.dump()) for c in certs)
        elif oid == AUTHORITY_KEY_ID_OID:
            aki = asn1_x509.AuthorityKeyIdentifier.load(raw, strict=True)
            key_id = aki["key_identifier"].native
            authority_key_id = bytes(key_id) if key_id is not None else None
        elif oid == NO_REV_AVAIL_OID:
            core.Null.load(raw, strict=True)
            has_no_rev_avail = True
        elif oid == TARGETS_OID:
            parsed_targets = _AcTargets.load(raw, strict=True)["targets"]
            names: list[str] = []
            for target in parsed_targets:
                name = target["name"]
                if name.native is not None and name.name == "uniform_resource_identifier":
                    names.append(str(name.native))
            targets = tuple(names)
        elif ext["critical"].native:
            unknown_critical.append(oid)

    return _AcExtensionValues(
        signer_certs=signer_certs,
        authority_key_id=authority_key_id,
        has_no_rev_avail=has_no_rev_avail,
        targets=targets,
        unknown_critical=tuple(unknown_critical),
    )


def _parse_ac(der: bytes) -> ParsedAC:
    if len(der) > MAX_AC_SIZE:
        raise _malformed(f"it is larger than {MAX_AC_SIZE} bytes")
    ac = cms.AttributeCertificateV2.load(der, strict=True)
    info = ac["ac_info"]
    version = int(info["version"])

    holder = info["holder"]
    base_id = holder["base_certificate_id"]
    holder_issuer: str | None = None
    holder_serial: int | None = None
    if base_id.native is not None:
        holder_issuer = _single_dirname(base_id["issuer"], "holder's issuer")
        holder_serial = int(base_id["serial"].native)

    issuer_choice = info["issuer"]
    if issuer_choice.name != "v2_form":
        raise _malformed("the issuer is not in v2Form")
    issuer = _single_dirname(issuer_choice.chosen["issuer_name"], "AC issuer")

    validity = info["att_cert_validity_period"]
    not_before = validity["not_before_time"].native
    not_after = validity["not_after_time"].native
    if not isinstance(not_before, datetime) or not isinstance(not_after, datetime):
        raise _malformed("the validity period is not two GeneralizedTimes")

    vo, uri, fqans = _parse_fqan_attribute(info["attributes"])

    exts = _parse_ac_extensions(info["extensions"])

    sig_alg = ac["signature_algorithm"]
    return ParsedAC(
        der=bytes(der),
        version=version,
        holder_issuer=holder_issuer,
        holder_serial=holder_serial,
        issuer=issuer,
        serial=int(info["serial_number"].native),
        not_before=not_before.astimezone(UTC),
        not_after=not_after.astimezone(UTC),
        vo=vo,
        uri=uri,
        fqans=fqans,
        signer_certs=exts.signer_certs,
        authority_key_id=exts.authority_key_id,
        has_no_rev_avail=exts.has_no_rev_avail,
        targets=exts.targets,
        unknown_critical=exts.unknown_critical,
        signature_algorithm=sig_alg["algorithm"].dotted,
        inner_signature_algorithm=info["signature"]["algorithm"].dotted,
        signature=bytes(ac["signature"].native),
        tbs=bytes(info.dump()),
    )


def _parse_fqan_attribute(attributes: Any) -> tuple[str, str, tuple[str, ...]]:
    found = [a for a in attributes if a["type"].dotted == FQAN_ATTRIBUTE_OID]
    if len(found) != 1:
        raise _malformed(f"it must carry exactly one FQAN attribute {FQAN_ATTRIBUTE_OID}")
    values = _FqanAttributeValues.load(found[0]["values"].dump(), strict=True)
    if len(values) != 1:
        raise _malformed("the FQAN attribute must hold exactly one IetfAttrSyntax")
    syntax = values[0]
    authority = syntax["policy_authority"]
    if (
        authority.native is None
        or len(authority) != 1
        or authority[0].name != "uniform_resource_identifier"
    ):
        raise _malformed("the FQAN attribute must name one policyAuthority URI (vo://host:port)")
    vo, sep, uri = str(authority[0].native).partition("://")
    if not sep or not vo or not uri:
        raise _malformed(f"the policyAuthority {authority[0].native!r} is not vo://host:port")
    fqans: list[str] = []
    for value in syntax["values"]:
        if value.name != "octets":
            raise _malformed("an FQAN value is not an OCTET STRING")
        try:
            text = bytes(value.native).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _malformed("an FQAN is not UTF-8") from exc
        # The same rule libvomsapi applies: the first group is the VO itself.
        if text != f"/{vo}" and not text.startswith(f"/{vo}/"):
            raise _malformed(f"the FQAN {text!r} does not belong to the VO {vo!r}")
        fqans.append(text)
    if not fqans:
        raise _malformed("the FQAN attribute lists no FQAN")
    return vo, uri, tuple(fqans)


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class VomsAttributes:
    """The verified content of one AC."""

    vo: str
    fqans: tuple[str, ...]  # in AC order; the first is the primary FQAN
    issuer: str  # slash DN of the AC signer
    uri: str  # host:port of the VOMS server
    not_before: datetime
    not_after: datetime
    holder_issuer: str
    holder_serial: int

    @property
    def primary_fqan(self) -> str:
        return self.fqans[0]


def verify_chain_acs(
    chain: Sequence[x509.Certificate],
    eec: x509.Certificate,
    vomsdir: VomsDir,
    trust: TrustStore,
    now: datetime,
    *,
    target_host: str | None = None,
) -> tuple[VomsAttributes, ...]:
    """Verify the VOMS ACs of a proxy chain (leaf first); ``()`` when it carries none.

    The ACs are taken from the proxy nearest the leaf that carries the AC
    extension, as VOMS clients do; every AC found there must verify, or
    :class:`VomsError` is raised with a ``reason``.  ``eec`` is the end-entity
    certificate the chain was validated to: each AC must have been issued for it.
    ``target_host`` is this service's host name; an AC restricted to target hosts
    is refused unless it is one of them.
    """
    now = _as_utc(now)
    ders: list[bytes] = []
    for cert in chain:
        if cert == eec:
            break
        ders = find_acs(cert)
        if ders:
            break
    return tuple(_verify_one(parse_ac(der), eec, vomsdir, trust, now, target_host) for der in ders)


def _as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _verify_one(
    ac: ParsedAC,
    eec: x509.Certificate,
    vomsdir: VomsDir,
    trust: TrustStore,
    now: datetime,
    target_host: str | None,
) -> VomsAttributes:
    label = f"the VOMS AC of VO {ac.vo!r} from {ac.uri} (signed by {ac.issuer})"
    if ac.version != 1:
        raise _malformed(f"{label} is not a version 2 AC")
    if not ac.has_no_rev_avail or ac.authority_key_id is None:
        raise _malformed(
            f"{label} lacks the noRevAvail or authorityKeyIdentifier extension that VOMS requires"
        )
    if ac.unknown_critical:
        raise _malformed(
            f"{label} has critical extensions this verifier does not know: "
            + ", ".join(ac.unknown_critical)
        )
    if ac.signature_algorithm != ac.inner_signature_algorithm:
        raise _malformed(f"{label} names two different signature algorithms")

    holder_issuer, holder_serial = _check_holder(ac, eec, label)

    if now + CLOCK_SKEW < ac.not_before:
        raise VomsError(
            f"{label} is not valid before {ac.not_before:%Y-%m-%d %H:%M:%S} UTC",
            reason="ac_not_yet_valid",
        )
    if now > ac.not_after:
        raise VomsError(
            f"{label} expired at {ac.not_after:%Y-%m-%d %H:%M:%S} UTC; "
            "get a fresh VOMS proxy (voms-proxy-init)",
            reason="expired_ac",
        )

    if ac.targets is not None and (target_host is None or target_host not in ac.targets):
        allowed = ", ".join(ac.targets) or "no host at all"
        raise VomsError(
            f"{label} may only be used at {allowed}, not at {target_host or 'this service'}",
            reason="target_mismatch",
        )

    signer = _find_signer(ac, label)
    path = _signer_path(signer, ac.signer_certs, trust, now, label)
    _check_lsc(ac, path, vomsdir, label)

    return VomsAttributes(
        vo=ac.vo,
        fqans=ac.fqans,
        issuer=ac.issuer,
        uri=ac.uri,
        not_before=ac.not_before,
        not_after=ac.not_after,
        holder_issuer=holder_issuer,
        holder_serial=holder_serial,
    )


def _check_holder(ac: ParsedAC, eec: x509.Certificate, label: str) -> tuple[str, int]:
    # VOMS servers name the holder by the EEC's issuer; voms-proxy-fake without
    # -newformat writes the EEC's own subject instead.  libvomsapi accepts both, so do we.
    expected = (slash_from_name(eec.issuer), slash_from_name(eec.subject))
    if ac.holder_issuer is None or ac.holder_serial is None:
        raise VomsError(
            f"{label} does not name its holder by issuer and serial number",
            reason="holder_mismatch",
        )
    if ac.holder_serial != eec.serial_number or ac.holder_issuer not in expected:
        raise VomsError(
            f"{label} is an AC for another holder (serial {ac.holder_serial:#x} of "
            f"{ac.holder_issuer}), not for {expected[1]} (serial {eec.serial_number:#x}, "
            f"issued by {expected[0]})",
            reason="holder_mismatch",
        )
    return ac.holder_issuer, ac.holder_serial


def _hash_named(name: str) -> hashes.HashAlgorithm | None:
    return {
        "sha224": hashes.SHA224(),
        "sha256": hashes.SHA256(),
        "sha384": hashes.SHA384(),
        "sha512": hashes.SHA512(),
    }.get(name)


def _signature_ok(ac: ParsedAC, signer: x509.Certificate, label: str) -> bool:
    try:
        alg = cms.SignedDigestAlgorithm({"algorithm": ac.signature_algorithm})
        sig_algo, hash_name = alg.signature_algo, alg.hash_algo
    except (ValueError, KeyError) as exc:
        raise VomsError(
            f"{label} uses the signature algorithm {ac.signature_algorithm}, "
            "which this verifier does not support",
            reason="bad_ac_signature",
        ) from exc
    digest = _hash_named(hash_name)
    if digest is None:
        raise VomsError(
            f"{label} is signed with {hash_name}, which is too weak or unsupported; "
            "SHA-224/256/384/512 are accepted",
            reason="bad_ac_signature",
        )
    key = signer.public_key()
    try:
        if sig_algo == "rsassa_pkcs1v15" and isinstance(key, rsa.RSAPublicKey):
            key.verify(ac.signature, ac.tbs, padding.PKCS1v15(), digest)
        elif sig_algo == "ecdsa" and isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(ac.signature, ac.tbs, ec.ECDSA(digest))
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _find_signer(ac: ParsedAC, label: str) -> x509.Certificate:
    candidates = [c for c in ac.signer_certs if slash_from_name(c.subject) == ac.issuer]
    if not candidates:
        raise VomsError(
            f"{label} does not embed its signer's certificate (ACCERTS extension "
            f"{ACCERTS_OID}); real VOMS servers always do, so this AC is refused",
            reason="signer_not_embedded",
        )
    for cert in candidates:
        if _signature_ok(ac, cert, label):
            return cert
    raise VomsError(
        f"{label} has a signature that does not verify with the embedded certificate of "
        f"{ac.issuer}: it was forged or altered",
        reason="bad_ac_signature",
    )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _untrusted(label: str, why: str) -> VomsError:
    return VomsError(f"{label}: the signer is not trusted: {why}", reason="untrusted_signer")


def _check_time(cert: x509.Certificate, now: datetime, label: str) -> None:
    who = slash_from_name(cert.subject)
    if now < cert.not_valid_before_utc:
        raise _untrusted(label, f"the certificate of {who} is not valid yet")
    if now > cert.not_valid_after_utc:
        raise _untrusted(
            label,
            f"the certificate of {who} expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC",
        )


def _check_not_revoked(
    child: x509.Certificate, ca: x509.Certificate, trust: TrustStore, label: str
) -> None:
    ca_key = ca.public_key()
    if not isinstance(ca_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return
    for crl in trust.crls_for(ca):
        if (
            crl.is_signature_valid(ca_key)
            and crl.get_revoked_certificate_by_serial_number(child.serial_number) is not None
        ):
            raise _untrusted(
                label,
                f"the certificate of {slash_from_name(child.subject)} "
                f"is revoked by {slash_from_name(ca.subject)}",
            )


def _check_namespace(
    child: x509.Certificate, ca: x509.Certificate, trust: TrustStore, label: str
) -> None:
    why = trust.namespace_violation(child, ca)
    if why is not None:
        raise _untrusted(label, why)


def _signer_path(
    signer: x509.Certificate,
    embedded: Sequence[x509.Certificate],
    trust: TrustStore,
    now: datetime,
    label: str,
) -> list[x509.Certificate]:
    """The signer, any embedded intermediates, then the trust anchor that issued the last."""
    path = [signer]
    current = signer
    for _ in range(MAX_SIGNER_PATH):
        _check_time(current, now, label)
        for ca in trust.issuers_of(current):
            if signed_by(current, ca):
                _check_time(ca, now, label)
                _check_namespace(current, ca, trust, label)
                _check_not_revoked(current, ca, trust, label)
                return [*path, ca]
        nexts = [
            c
            for c in embedded
            if c != current and c not in path and _is_ca(c) and signed_by(current, c)
        ]
        if not nexts:
            break
        _check_namespace(current, nexts[0], trust, label)
        current = nexts[0]
        path.append(current)
    raise _untrusted(
        label,
        f"the certificate of {slash_from_name(signer.subject)} (issued by "
        f"{slash_from_name(signer.issuer)}) does not chain to a CA of the trust directory",
    )


def _check_lsc(
    ac: ParsedAC, path: Sequence[x509.Certificate], vomsdir: VomsDir, label: str
) -> None:
    host = ac.host
    chains = vomsdir.chains_for(ac.vo, host)
    if chains is None:
        raise VomsError(
            f"{label} cannot be trusted: the vomsdir has no {ac.vo}/{host}.lsc; add one "
            f"listing {ac.issuer} and then its CA's DN",
            reason="no_lsc",
        )
    dns = tuple(slash_from_name(c.subject) for c in path)
    if dns not in chains:
        raise VomsError(
            f"{label} is signed by an unlisted server: {' <- '.join(dns)} matches no chain "
            f"of {ac.vo}/{host}.lsc",
            reason="no_lsc",
        )


# --------------------------------------------------------------------------- issuing


def _signature_algorithm_for(key: Any) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        return {"algorithm": "sha256_rsa", "parameters": core.Null()}
    if isinstance(key, ec.EllipticCurvePrivateKey):
        name = {"secp384r1": "sha384_ecdsa", "secp521r1": "sha512_ecdsa"}.get(
            key.curve.name, "sha256_ecdsa"
        )
        return {"algorithm": name}
    raise InputError(f"cannot sign an AC with a {type(key).__name__} key; use RSA or EC")


def _sign(key: Any, data: bytes) -> bytes:
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InputError(f"cannot sign an AC with a {type(key).__name__} key; use RSA or EC")
    digest: hashes.HashAlgorithm = {"secp384r1": hashes.SHA384(), "secp521r1": hashes.SHA512()}.get(
        key.curve.name, hashes.SHA256()
    )
    return key.sign(data, ec.ECDSA(digest))


def _directory_name(name: x509.Name) -> Any:
    return asn1_x509.GeneralName(
        name="directory_name", value=asn1_x509.Name.load(name.public_bytes())
    )


def _key_identifier(cert: x509.Certificate) -> bytes:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest


def _checked_ac_fqans(*, vo: str, uri: str, fqans: Sequence[str], lifetime: timedelta) -> list[str]:
    """Check what :func:`make_ac_extension` is asked for; the FQANs in full form."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", vo):
        raise VomsError(f"the VO name {vo!r} is not valid", reason="bad_fqan")
    if not re.fullmatch(r"[A-Za-z0-9.\-]+:[0-9]{1,5}", uri):
        raise InputError(f"the VOMS URI {uri!r} is not host:port, e.g. voms.example.org:15001")
    if not fqans:
        raise VomsError("an AC needs at least one FQAN", reason="bad_fqan")
    if lifetime <= timedelta(0):
        raise InputError("an AC lifetime must be positive")
    full: list[str] = []
    for text in fqans:
        fqan_validate(text, vo=vo)
        full.append(full_fqan(text))
    return full


def _ac_serial(serial: int | None) -> int:
    """The AC serial asked for, or a fresh random one of 63 bits; checked against RFC 5755."""
    if serial is None:
        serial = secrets.randbits(62) | (1 << 62)
    if not 0 < serial < 1 << 159:
        raise InputError("an AC serial number must be positive and at most 20 bytes")
    return serial


def _fqan_attribute(vo: str, uri: str, full: Sequence[str]) -> dict[str, Any]:
    """The one IetfAttrSyntax attribute: policyAuthority ``vo://uri`` and the FQANs."""
    value = cms.IetfAttrSyntax(
        {
            "policy_authority": [
                asn1_x509.GeneralName(name="uniform_resource_identifier", value=f"{vo}://{uri}")
            ],
            "values": [cms.IetfAttrValue(name="octets", value=q.encode("utf-8")) for q in full],
        }
    )
    return {"type": FQAN_ATTRIBUTE_OID, "values": cms.SetOfAny([core.Any.load(value.dump())])}


def _ac_extensions(signer: Credential) -> list[dict[str, Any]]:
    """ACCERTS (the signer's chain without its root), noRevAvail, authorityKeyIdentifier."""
    accerts = _AcCerts(
        {
            "certs": [
                asn1_x509.Certificate.load(c.public_bytes(Encoding.DER))
                for c in signer.chain
                if not _is_self_signed(c)
            ]
        }
    )
    return [
        {"extn_id": ACCERTS_OID, "extn_value": accerts.dump()},
        {"extn_id": NO_REV_AVAIL_OID, "extn_value": core.Null().dump()},
        {
            "extn_id": AUTHORITY_KEY_ID_OID,
            "extn_value": asn1_x509.AuthorityKeyIdentifier(
                {"key_identifier": _key_identifier(signer.cert)}
            ),
        },
    ]


def make_ac_extension(
    holder: x509.Certificate,
    signer: Credential,
    *,
    vo: str,
    fqans: Sequence[str],
    uri: str,
    now: datetime,
    lifetime: timedelta,
    serial: int | None = None,
) -> x509.UnrecognizedExtension:
    """A VOMS AC for ``holder`` (the user's EEC), wrapped as the proxy extension.

    Laid out as VOMS servers do: v2 AC, holder = the EEC's issuer and serial,
    issuer = the signer's DN (v2Form), one IetfAttrSyntax attribute with
    policyAuthority ``vo://uri`` and the FQANs (normalised to full form), and the
    extensions ACCERTS (the signer's chain), noRevAvail and authorityKeyIdentifier.
    Pass the result to :func:`broker.pki.proxy.new_proxy` in ``extra_extensions``.
    """
    if signer.key is None:
        raise InputError("the AC signer credential has no private key")
    full = _checked_ac_fqans(vo=vo, uri=uri, fqans=fqans, lifetime=lifetime)
    start = _as_utc(now).replace(microsecond=0)
    serial = _ac_serial(serial)
    algorithm = _signature_algorithm_for(signer.key)
    info = cms.AttributeCertificateInfoV2(
        {
            "version": "v2",
            "holder": {
                "base_certificate_id": {
                    "issuer": [_directory_name(holder.issuer)],
                    "serial": holder.serial_number,
                }
            },
            "issuer": cms.AttCertIssuer(
                name="v2_form",
                value={"issuer_name": [_directory_name(signer.cert.subject)]},
            ),
            "signature": algorithm,
            "serial_number": serial,
            "att_cert_validity_period": {
                "not_before_time": start,
                "not_after_time": start + lifetime,
            },
            "attributes": [_fqan_attribute(vo, uri, full)],
            "extensions": _ac_extensions(signer),
        }
    )
    ac = cms.AttributeCertificateV2(
        {
            "ac_info": info,
            "signature_algorithm": algorithm,
            "signature": _sign(signer.key, bytes(info.dump())),
        }
    )
    envelope = _AcWrapper([_AcList([ac])])
    return x509.UnrecognizedExtension(_VOMS_AC_EXT, bytes(envelope.dump()))


def _is_self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject and signed_by(cert, cert)
