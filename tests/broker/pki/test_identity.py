"""Whose identity a chain carries (issue 18): slash-form ambiguity and independent proxies."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from broker.errors import ChainError
from broker.pki.chain import validate_chain
from broker.pki.dn import name_from_slash, slash_ambiguity, slash_from_name
from broker.pki.loading import Credential
from broker.pki.proxy import ProxyType, generate_key, new_proxy
from tests.pkifixtures import GridPki

ALICE = "/DC=org/DC=example/CN=Alice"


def _dc(value: str) -> x509.RelativeDistinguishedName:
    return x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.DOMAIN_COMPONENT, value)])


def _cn(value: str, kind: _ASN1Type | None = None) -> x509.RelativeDistinguishedName:
    attr = (
        x509.NameAttribute(NameOID.COMMON_NAME, value)
        if kind is None
        else x509.NameAttribute(NameOID.COMMON_NAME, value, _type=kind)
    )
    return x509.RelativeDistinguishedName([attr])


def _issue(grid_pki: GridPki, subject: x509.Name) -> Credential:
    """A user certificate from the dev CA with exactly ``subject`` (no name checks)."""
    ca = grid_pki.pki.ca
    assert ca.key is not None
    key = generate_key("ec")
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(grid_pki.now - timedelta(hours=1))
        .not_valid_after(grid_pki.now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca.key, hashes.SHA256())
    )
    return Credential(chain=(cert,), key=key)


def _refused(grid_pki: GridPki, cred: Credential) -> ChainError:
    proxy = new_proxy(cred, now=grid_pki.now, lifetime=timedelta(hours=1))
    with pytest.raises(ChainError) as err:
        validate_chain(proxy.chain, grid_pki.trust, now=grid_pki.now)
    return err.value


# ----------------------------------------------------------------- slash-form ambiguity


def test_slash_in_a_dc_value_is_not_taken_for_alice(grid_pki: GridPki) -> None:
    """The finding: one DC value 'example/CN=Alice' printed exactly as Alice's DN."""
    name = x509.Name([_dc("org"), _dc("example/CN=Alice")])
    assert slash_from_name(name) == ALICE  # why it was dangerous
    err = _refused(grid_pki, _issue(grid_pki, name))
    assert err.reason == "ambiguous_name" and "'/' followed by '='" in err.message


def test_multi_valued_rdn_refused(grid_pki: GridPki) -> None:
    multi = x509.Name(
        [
            _dc("org"),
            _dc("example"),
            x509.RelativeDistinguishedName(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "Alice"),
                    x509.NameAttribute(NameOID.USER_ID, "alice"),
                ]
            ),
        ]
    )
    flat = x509.Name(
        [
            _dc("org"),
            _dc("example"),
            _cn("Alice"),
            x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.USER_ID, "alice")]),
        ]
    )
    assert slash_from_name(multi) == slash_from_name(flat)  # the collision
    err = _refused(grid_pki, _issue(grid_pki, multi))
    assert err.reason == "ambiguous_name" and "multi-valued" in err.message
    validate_chain(_issue(grid_pki, flat).chain, grid_pki.trust, now=grid_pki.now)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("Alice\x00", "control character"),
        ("Al\x01ice", "control character"),
        ("Alice\x7f", "control character"),
        ("Jos\\xC3\\xA9", "literal \\x escape"),  # would print like the UTF-8 'José'
        ("x/OU=People=y", "'/' followed by '='"),
        ("a/1.2.3=b", "'/' followed by '='"),
    ],
)
def test_other_ambiguous_spellings_refused(grid_pki: GridPki, value: str, words: str) -> None:
    err = _refused(grid_pki, _issue(grid_pki, x509.Name([_dc("org"), _dc("example"), _cn(value)])))
    assert err.reason == "ambiguous_name" and words in err.message


def test_unambiguous_names_still_accepted_in_openssl_form(grid_pki: GridPki) -> None:
    # A service certificate with '/' but no '=' after it, and a non-ASCII name.
    for value, rendered in (
        ("host/ce.example.org", "host/ce.example.org"),
        ("José", "Jos\\xC3\\xA9"),
    ):
        cred = _issue(grid_pki, x509.Name([_dc("org"), _dc("example"), _cn(value)]))
        info = validate_chain(cred.chain, grid_pki.trust, now=grid_pki.now)
        assert info.identity == f"/DC=org/DC=example/CN={rendered}"
        assert slash_from_name(name_from_slash(info.identity)) == info.identity


def test_string_encoding_variants_are_one_identity(grid_pki: GridPki) -> None:
    """PrintableString and UTF8String spellings of one name are the same name (RFC 5280)."""
    identities = set()
    for kind in (_ASN1Type.PrintableString, _ASN1Type.UTF8String):
        cred = _issue(grid_pki, x509.Name([_dc("org"), _dc("example"), _cn("Alice", kind)]))
        identities.add(validate_chain(cred.chain, grid_pki.trust, now=grid_pki.now).identity)
    assert identities == {ALICE}


def test_slash_ambiguity_pure() -> None:
    assert slash_ambiguity(name_from_slash(ALICE)) is None
    assert slash_ambiguity(x509.Name([_dc("a/CN=b")])) is not None


# ----------------------------------------------------------------- independent proxies


def test_independent_proxy_is_its_own_identity(grid_pki: GridPki) -> None:
    now, alice = grid_pki.now, grid_pki.user("alice")
    indep = new_proxy(alice, now=now, lifetime=timedelta(hours=1), proxy_type=ProxyType.INDEPENDENT)
    below = new_proxy(indep, now=now, lifetime=timedelta(hours=1))
    below2 = new_proxy(
        below, now=now, lifetime=timedelta(hours=1), proxy_type=ProxyType.INDEPENDENT
    )
    info = validate_chain(below.chain, grid_pki.trust, now=now)
    assert info.identity == slash_from_name(indep.cert.subject) != ALICE
    assert info.end_entity == ALICE and info.independent
    # The topmost independent proxy names the holder of everything below it.
    assert validate_chain(below2.chain, grid_pki.trust, now=now).identity == slash_from_name(
        indep.cert.subject
    )
    # An impersonation chain is unchanged.
    plain = new_proxy(alice, now=now, lifetime=timedelta(hours=1))
    info = validate_chain(plain.chain, grid_pki.trust, now=now)
    assert info.identity == ALICE and not info.independent
