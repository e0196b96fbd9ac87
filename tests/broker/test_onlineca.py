"""broker.onlineca: short-lived user certificates for PAM users (time passed in)."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from broker.errors import ConfigError, CredentialError, InputError
from broker.onlineca import OnlineCa
from broker.pki.chain import validate_chain
from broker.pki.devca import ca_files, issue_certificate, make_ca
from broker.pki.dn import slash_from_name
from broker.pki.loading import Credential, key_to_pem
from broker.pki.proxy import generate_key, make_csr, new_proxy
from broker.pki.trust import TrustStore

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
TEMPLATE = "/DC=org/DC=example/OU=Online/CN={username}"


@pytest.fixture(scope="module")
def ca() -> Credential:
    return make_ca(now=NOW, days=30)


@pytest.fixture(scope="module")
def online(ca: Credential) -> OnlineCa:
    return OnlineCa(ca, dn_template=TEMPLATE, max_lifetime=timedelta(hours=12))


def _trust(ca: Credential) -> TrustStore:
    return TrustStore.from_files(ca_files(ca.cert, ("/DC=org/DC=example/*",)))


def test_issue_for_a_username(online: OnlineCa, ca: Credential) -> None:
    key = generate_key("ec")
    cert = online.issue("alice", make_csr(key), now=NOW)
    assert slash_from_name(cert.subject) == "/DC=org/DC=example/OU=Online/CN=alice"
    assert cert.issuer == ca.cert.subject
    assert cert.public_key() == key.public_key()
    assert cert.not_valid_after_utc == NOW + timedelta(hours=12)
    assert cert.not_valid_before_utc <= NOW
    ext = cert.extensions
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ku = ext.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    # the holder can use it as a grid credential: it verifies and signs proxies
    user = Credential(chain=(cert,), key=key)
    info = validate_chain(
        new_proxy(user, now=NOW, lifetime=timedelta(hours=1)).chain, _trust(ca), now=NOW
    )
    assert info.identity == "/DC=org/DC=example/OU=Online/CN=alice"


def test_lifetime_is_capped(online: OnlineCa, ca: Credential) -> None:
    csr = make_csr(generate_key("ec"))
    short = online.issue("bob", csr, now=NOW, lifetime=timedelta(hours=2))
    assert short.not_valid_after_utc == NOW + timedelta(hours=2)
    long = online.issue("bob", csr, now=NOW, lifetime=timedelta(days=5))
    assert long.not_valid_after_utc == NOW + timedelta(hours=12)
    # never beyond the CA's own expiry
    late = ca.cert.not_valid_after_utc - timedelta(hours=1)
    assert online.issue("bob", csr, now=late).not_valid_after_utc == ca.cert.not_valid_after_utc
    with pytest.raises(CredentialError):
        online.issue("bob", csr, now=ca.cert.not_valid_after_utc + timedelta(seconds=1))
    with pytest.raises(InputError):
        online.issue("bob", csr, now=NOW, lifetime=timedelta(0))


def test_serials_are_random(online: OnlineCa) -> None:
    csr = make_csr(generate_key("ec"))
    serials = {online.issue("alice", csr, now=NOW).serial_number for _ in range(5)}
    assert len(serials) == 5


@pytest.mark.parametrize(
    "username", ["a/CN=root", "..", "alice,CN=x", "x=y", "", "-x", "al ice", "é"]
)
def test_unsafe_usernames_refused(online: OnlineCa, username: str) -> None:
    with pytest.raises(InputError):
        online.issue(username, make_csr(generate_key("ec")), now=NOW)


def test_username_stays_one_attribute_value(online: OnlineCa) -> None:
    # '+' and '@' are allowed in usernames; they must not split or add RDNs
    name = online.subject_for("a+b@site.org")
    assert len(name.rdns) == 4
    assert name.rdns[-1].get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "a+b@site.org"


@pytest.mark.parametrize(
    "template",
    [
        "/DC=org/CN=fixed",
        "/DC=org/CN={username}/CN={username}",
        "/DC=org/CN={user}",
        "/DC=org/CN={username}{x}",
        "DC=org/CN={username}",
        "/XX=org/CN={username}",
    ],
)
def test_bad_templates(ca: Credential, template: str) -> None:
    with pytest.raises(ConfigError):
        OnlineCa(ca, dn_template=template)


def test_not_a_ca_refused(ca: Credential) -> None:
    user = issue_certificate(ca, "/DC=org/DC=example/CN=Notaca", now=NOW)
    with pytest.raises(ConfigError, match="not a CA"):
        OnlineCa(user)
    with pytest.raises(ConfigError):
        OnlineCa(Credential(chain=ca.chain))  # no key
    with pytest.raises(ConfigError):
        OnlineCa(ca, max_lifetime=timedelta(0))


def test_load_requires_a_private_key_file(ca: Credential, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding

    assert ca.key is not None
    cert_path, key_path = tmp_path / "ca.pem", tmp_path / "ca.key"
    cert_path.write_bytes(ca.cert.public_bytes(Encoding.PEM))
    key_path.write_bytes(key_to_pem(ca.key))
    os.chmod(key_path, 0o644)
    with pytest.raises(InputError, match="chmod"):
        OnlineCa.load(str(cert_path), str(key_path))
    os.chmod(key_path, 0o600)
    loaded = OnlineCa.load(str(cert_path), str(key_path), dn_template=TEMPLATE)
    assert loaded.subject_dn("carol") == "/DC=org/DC=example/OU=Online/CN=carol"
