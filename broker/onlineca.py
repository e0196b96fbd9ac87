"""The online CA: short-lived end-entity certificates for users who logged in with PAM.

A user with a site account and no grid certificate proves their password
(:mod:`broker.pam_auth`) and sends a CSR; the broker signs the CSR's public key
into a user certificate whose subject comes from a template such as
``/DC=org/DC=example/CN={username}``.  The private key stays with the user.

Pure apart from :meth:`OnlineCa.load` (which reads the CA files): ``now`` is
always passed in.  The username is validated as a safe name and then placed
into an attribute *value* of the parsed template, never spliced into DN text,
so no username can add or change an RDN.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from broker.errors import ConfigError, CredentialError, CsrError, InputError
from broker.fileio import read_private_file, validate_component
from broker.pki.certprofile import end_entity_extensions, with_extensions
from broker.pki.dn import name_from_slash, slash_from_name
from broker.pki.loading import Credential, load_cert_and_key

DEFAULT_DN_TEMPLATE = "/DC=org/DC=example/CN={username}"
DEFAULT_MAX_LIFETIME = timedelta(hours=12)
# Clients' clocks run a little behind ours; a certificate valid from "now" would be
# refused by them for a few minutes.
BACKDATE = timedelta(minutes=5)
_PLACEHOLDER = "{username}"
_MARK = "\x01username\x01"  # cannot occur in a parsed DN value of a real template


def _check_template(template: str) -> x509.Name:
    if template.count(_PLACEHOLDER) != 1:
        raise ConfigError(
            f"the online CA DN template {template!r} must contain {_PLACEHOLDER} exactly once, "
            "e.g. /DC=org/DC=example/CN={username}"
        )
    rest = template.replace(_PLACEHOLDER, "")
    if "{" in rest or "}" in rest:
        raise ConfigError(f"the online CA DN template {template!r} may only use {_PLACEHOLDER}")
    try:
        name = name_from_slash(template.replace(_PLACEHOLDER, _MARK))
    except InputError as exc:
        raise ConfigError(f"the online CA DN template is not a valid DN: {exc.message}") from exc
    return name


@dataclass(frozen=True)
class OnlineCa:
    """A CA credential, the subject template and the lifetime cap."""

    ca: Credential
    dn_template: str = DEFAULT_DN_TEMPLATE
    max_lifetime: timedelta = DEFAULT_MAX_LIFETIME

    def __post_init__(self) -> None:
        if self.ca.key is None:
            raise ConfigError("the online CA credential has no private key")
        try:
            constraints = self.ca.cert.extensions.get_extension_for_class(x509.BasicConstraints)
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.value.ca:
            raise ConfigError(
                f"online_ca_cert ({slash_from_name(self.ca.cert.subject)}) is not a CA "
                "certificate (basicConstraints CA:TRUE)"
            )
        if self.max_lifetime <= timedelta(0):
            raise ConfigError("online_ca_max_hours must be positive")
        _check_template(self.dn_template)

    @classmethod
    def load(
        cls,
        cert_path: str,
        key_path: str,
        *,
        dn_template: str = DEFAULT_DN_TEMPLATE,
        max_lifetime: timedelta = DEFAULT_MAX_LIFETIME,
    ) -> OnlineCa:
        """Read the CA certificate and its key (which must be 0600 and owned by us)."""
        key = read_private_file(key_path, require_owner=os.getuid())
        try:
            with open(cert_path, "rb") as handle:
                cert = handle.read()
        except OSError as exc:
            raise ConfigError(f"cannot read online_ca_cert {cert_path}: {exc.strerror}") from exc
        return cls(load_cert_and_key(cert, key), dn_template=dn_template, max_lifetime=max_lifetime)

    def subject_for(self, username: str) -> x509.Name:
        """The certificate subject of ``username`` (validated as a safe name first)."""
        validate_component(username, what="username")
        template = _check_template(self.dn_template)
        rdns = []
        for rdn in template.rdns:
            attrs = [x509.NameAttribute(a.oid, str(a.value).replace(_MARK, username)) for a in rdn]
            rdns.append(x509.RelativeDistinguishedName(attrs))
        return x509.Name(rdns)

    def subject_dn(self, username: str) -> str:
        return slash_from_name(self.subject_for(username))

    def issue(
        self,
        username: str,
        csr: x509.CertificateSigningRequest,
        *,
        now: datetime,
        lifetime: timedelta | None = None,
    ) -> x509.Certificate:
        """Sign ``csr``'s public key into a user certificate for ``username``.

        ``csr`` must already be checked (its self-signature proves key
        possession; :func:`broker.pki.proxy.load_csr` does that).  The lifetime
        is capped by ``max_lifetime`` and by the CA's own expiry.
        """
        assert self.ca.key is not None
        public_key = csr.public_key()
        if not isinstance(public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise CsrError(f"unsupported public key type {type(public_key).__name__}")
        wanted = lifetime if lifetime is not None else self.max_lifetime
        if wanted <= timedelta(0):
            raise InputError("the certificate lifetime must be positive", reason="bad_field")
        ca_cert = self.ca.cert
        if now >= ca_cert.not_valid_after_utc:
            raise CredentialError(
                "the online CA certificate has expired; tell the administrator", reason="expired"
            )
        not_after = min(now + min(wanted, self.max_lifetime), ca_cert.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(self.subject_for(username))
            .issuer_name(ca_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(max(now - BACKDATE, ca_cert.not_valid_before_utc))
            .not_valid_after(not_after)
        )
        extensions = end_entity_extensions(
            public_key,
            self.ca.key.public_key(),
            extended_usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
            data_encipherment=True,
        )
        return with_extensions(builder, extensions).sign(self.ca.key, hashes.SHA256())
