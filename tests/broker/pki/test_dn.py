from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from broker.errors import DnSyntaxError
from broker.pki.dn import (
    name_from_rfc4514,
    name_from_slash,
    normalize_dn,
    rfc4514_from_name,
    slash_from_name,
)
from broker.pki.proxy import generate_key


def test_slash_form_order_and_short_names() -> None:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "org"),
            x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "example"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "People"),
            x509.NameAttribute(NameOID.COMMON_NAME, "Alice Smith"),
            x509.NameAttribute(NameOID.EMAIL_ADDRESS, "alice@example.org"),
            x509.NameAttribute(NameOID.USER_ID, "asmith"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, "42"),
        ]
    )
    text = slash_from_name(name)
    assert text == (
        "/DC=org/DC=example/OU=People/CN=Alice Smith/emailAddress=alice@example.org"
        "/UID=asmith/serialNumber=42"
    )
    assert name_from_slash(text) == name


def test_rfc4514_is_reversed() -> None:
    name = name_from_slash("/DC=org/DC=example/CN=Alice")
    assert rfc4514_from_name(name) == "CN=Alice,DC=example,DC=org"
    assert name_from_rfc4514("CN=Alice,DC=example,DC=org") == name
    assert normalize_dn("CN=Alice,DC=example,DC=org") == "/DC=org/DC=example/CN=Alice"


def test_value_with_slash_is_kept_when_no_attribute_follows() -> None:
    name = name_from_slash("/O=Grid/OU=a/b/CN=host/node1.example.org")
    assert [a.value for a in name] == ["Grid", "a/b", "host/node1.example.org"]


def test_non_ascii_escaped_like_openssl() -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "José")])
    assert slash_from_name(name) == "/CN=Jos\\xC3\\xA9"
    assert name_from_slash("/CN=Jos\\xC3\\xA9") == name


@pytest.mark.parametrize(
    "bad",
    ["", "DC=org/CN=x", "/=x", "/Foo=bar", "/CN=", "/CN=a\x00b", "/" + "CN=x/" * 2000],
)
def test_malformed_slash_dn_rejected(bad: str) -> None:
    with pytest.raises(DnSyntaxError):
        name_from_slash(bad)


def test_matches_openssl_compat_output(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``openssl x509 -subject -nameopt compat`` prints X509_NAME_oneline."""
    key = generate_key("ec")
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "CH"),
            x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "Geneva"),
            x509.NameAttribute(NameOID.LOCALITY_NAME, "Meyrin"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "CERN"),
            x509.NameAttribute(NameOID.COMMON_NAME, "Zoë Müller"),
            x509.NameAttribute(NameOID.EMAIL_ADDRESS, "zoe@example.org"),
        ]
    )
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "c.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out = subprocess.run(
        ["openssl", "x509", "-in", str(path), "-noout", "-subject", "-nameopt", "compat"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == "subject=" + slash_from_name(name)


_ATTRS = st.sampled_from(
    [
        NameOID.COUNTRY_NAME,
        NameOID.ORGANIZATION_NAME,
        NameOID.ORGANIZATIONAL_UNIT_NAME,
        NameOID.COMMON_NAME,
        NameOID.DOMAIN_COMPONENT,
        NameOID.USER_ID,
        NameOID.LOCALITY_NAME,
    ]
)
# Values without '/' followed by an attribute name and without a literal "\x":
# the slash form itself cannot represent those unambiguously (OpenSSL neither).
_VALUE = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\"),
    min_size=1,
    max_size=15,  # cryptography caps CN at 64 UTF-8 bytes
)


@st.composite
def _names(draw: st.DrawFn) -> x509.Name:
    attrs = []
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        oid = draw(_ATTRS)
        value = draw(_VALUE)
        if oid == NameOID.COUNTRY_NAME:
            value = draw(st.sampled_from(["CH", "DE", "US", "IT"]))
        elif oid == NameOID.DOMAIN_COMPONENT:
            value = draw(st.from_regex(r"[a-z0-9]{1,12}", fullmatch=True))
        attrs.append(x509.RelativeDistinguishedName([x509.NameAttribute(oid, value)]))
    return x509.Name(attrs)


@given(_names())
def test_slash_round_trip(name: x509.Name) -> None:
    assert name_from_slash(slash_from_name(name)) == name


@given(_names())
def test_rfc4514_round_trip(name: x509.Name) -> None:
    assert name_from_rfc4514(rfc4514_from_name(name)) == name


@given(st.text(max_size=200))
def test_parser_never_crashes(text: str) -> None:
    try:
        name_from_slash(text)
    except DnSyntaxError:
        pass
