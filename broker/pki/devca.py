"""A throwaway grid PKI for development, demos and tests (pure: returns objects).

One CA signs a host certificate (``localhost`` / 127.0.0.1 / ::1), user
certificates, pilot certificates and a VOMS signer.  The CA directory contents
follow the ``X509_CERT_DIR`` layout Globus expects: ``<new-style hash>.0``, a
``.signing_policy`` whose ``cond_subjects`` covers the issued names, the same namespace
as ``.namespaces`` (EUGridPMA form) and a CRL as ``<hash>.r0``.  :mod:`broker.devpki`
writes it all to disk.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from ipaddress import IPv4Address, IPv6Address

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.pki.certprofile import end_entity_extensions, key_usage, with_extensions
from broker.pki.dn import name_from_slash, slash_from_name
from broker.pki.loading import Credential, PrivateKey
from broker.pki.proxy import generate_key
from broker.pki.trust import subject_hash as subject_hash  # re-exported for callers

BASE_DN = "/DC=org/DC=example"
CA_DN = f"{BASE_DN}/CN=Example Dev CA"
HOST_DN = f"{BASE_DN}/CN=localhost"
VOMS_DN = f"{BASE_DN}/CN=voms.example.org"
VOMS_HOST = "voms.example.org"
VOMS_PORT = 15001


def _ski(key: PrivateKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key())


def make_ca(
    *, now: datetime, dn: str = CA_DN, days: int = 30, key: PrivateKey | None = None
) -> Credential:
    key = key or generate_key()
    name = name_from_slash(dn)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(_ski(key), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Credential(chain=(cert,), key=key)


def issue_certificate(
    ca: Credential,
    dn: str,
    *,
    now: datetime,
    days: int = 30,
    kind: str = "user",
    key: PrivateKey | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> Credential:
    """An end-entity certificate: ``kind`` is ``user`` (clientAuth) or ``host`` (both)."""
    assert ca.key is not None
    key = key or generate_key()
    eku = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if kind == "host":
        eku = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (
        x509.CertificateBuilder()
        .subject_name(name_from_slash(dn))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - timedelta(hours=1))
        .not_valid_after(not_after or now + timedelta(days=days))
    )
    builder = with_extensions(
        builder,
        end_entity_extensions(
            key.public_key(),
            ca.key.public_key(),
            extended_usages=eku,
            data_encipherment=kind == "user",
        ),
    )
    if kind == "host":
        cn = name_from_slash(dn).get_attributes_for_oid(NameOID.COMMON_NAME)[-1].value
        names: list[x509.GeneralName] = [x509.DNSName(str(cn))]
        if cn == "localhost":
            names += [x509.IPAddress(IPv4Address("127.0.0.1")), x509.IPAddress(IPv6Address("::1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    return Credential(chain=(cert,), key=key)


def make_crl(
    ca: Credential, *, now: datetime, revoked_serials: Iterable[int] = (), days: int = 30
) -> x509.CertificateRevocationList:
    assert ca.key is not None
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - timedelta(hours=1))
        .next_update(now + timedelta(days=days))
        .add_extension(x509.CRLNumber(1), critical=False)
    )
    for serial in revoked_serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now - timedelta(minutes=1))
            .build()
        )
    return builder.sign(ca.key, hashes.SHA256())


def signing_policy(ca: x509.Certificate, namespaces: Sequence[str] = (f"{BASE_DN}/*",)) -> str:
    """The Globus ``.signing_policy`` text: without it Globus tools refuse the CA."""
    subjects = " ".join(namespaces)
    return (
        f"access_id_CA   X509   '{slash_from_name(ca.subject)}'\n"
        "pos_rights     globus CA:sign\n"
        f"cond_subjects  globus '\"{subjects}\"'\n"
    )


def namespaces_text(ca: x509.Certificate, namespaces: Sequence[str] = (f"{BASE_DN}/*",)) -> str:
    """The EUGridPMA ``.namespaces`` text for the same globs as :func:`signing_policy`."""
    lines = [f"# namespace of {slash_from_name(ca.subject)}"]
    for glob in namespaces:
        regex = "".join(
            ".*" if c == "*" else "." if c == "?" else ("\\" + c if c in ".^$+()[]{}|\\" else c)
            for c in glob
        )
        lines.append(f'TO Issuer "{slash_from_name(ca.subject)}" \\\n  PERMIT Subject "{regex}"')
    return "\n".join(lines) + "\n"


def ca_files(
    ca: x509.Certificate,
    namespaces: Sequence[str] = (f"{BASE_DN}/*",),
    crl: x509.CertificateRevocationList | None = None,
) -> dict[str, bytes]:
    """``{file name: content}`` of one CA in a CA directory: certificate, both namespace
    files (for ``namespaces`` globs), and the CRL when given."""
    from cryptography.hazmat.primitives.serialization import Encoding

    h = subject_hash(ca)
    files = {
        f"{h}.0": ca.public_bytes(Encoding.PEM),
        f"{h}.signing_policy": signing_policy(ca, namespaces).encode(),
        f"{h}.namespaces": namespaces_text(ca, namespaces).encode(),
    }
    if crl is not None:
        files[f"{h}.r0"] = crl.public_bytes(Encoding.PEM)
    return files


def lsc_text(signer: x509.Certificate, ca: x509.Certificate) -> str:
    """A vomsdir ``<host>.lsc`` entry: the signer DN, then its CA DN."""
    return f"{slash_from_name(signer.subject)}\n{slash_from_name(ca.subject)}\n"


@dataclass
class DevPki:
    """Everything a development grid needs, in memory."""

    ca: Credential
    host: Credential
    voms: Credential
    users: dict[str, Credential] = field(default_factory=dict)
    crl: x509.CertificateRevocationList | None = None
    vo: str = "atlas"

    def ca_directory(self) -> dict[str, bytes]:
        """``{file name: content}`` for the CA directory."""
        return ca_files(self.ca.cert, crl=self.crl)

    def vomsdir(self) -> dict[str, bytes]:
        return {f"{self.vo}/{VOMS_HOST}.lsc": lsc_text(self.voms.cert, self.ca.cert).encode()}


def user_dn(name: str) -> str:
    """``alice`` → ``/DC=org/DC=example/CN=Alice``; pilots keep their lower-case name."""
    cn = name if name.startswith("pilot") else name[:1].upper() + name[1:]
    return f"{BASE_DN}/CN={cn}"


def make_dev_pki(
    *,
    now: datetime,
    users: Sequence[str] = ("alice", "bob"),
    pilots: Sequence[str] = ("pilot",),
    days: int = 30,
) -> DevPki:
    ca = make_ca(now=now, days=days)
    host = issue_certificate(ca, HOST_DN, now=now, days=days, kind="host")
    voms = issue_certificate(ca, VOMS_DN, now=now, days=days, kind="host")
    pki = DevPki(ca=ca, host=host, voms=voms, crl=make_crl(ca, now=now, days=days))
    for name in (*users, *pilots):
        pki.users[name] = issue_certificate(ca, user_dn(name), now=now, days=days)
    return pki
