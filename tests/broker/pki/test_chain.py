from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from broker.errors import ChainError
from broker.pki.chain import validate_chain
from broker.pki.devca import issue_certificate, make_ca, make_crl
from broker.pki.proxy import DRAFT_PROXY_CERT_INFO_OID, ProxyType, new_proxy
from tests.pkifixtures import GridPki, forge_proxy


def _reason(chain, trust, now) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(ChainError) as err:
        validate_chain(chain, trust, now=now)
    assert err.value.message  # every refusal carries a sentence
    return err.value.reason


def test_five_levels_deep_accepted(grid_pki: GridPki) -> None:
    now, cred = grid_pki.now, grid_pki.user("alice")
    for _ in range(6):
        cred = new_proxy(cred, now=now, lifetime=timedelta(hours=1))
    info = validate_chain(cred.chain, grid_pki.trust, now=now)
    assert info.proxy_depth == 6
    assert info.identity == "/DC=org/DC=example/CN=Alice"
    assert not info.limited
    assert timedelta(minutes=59) < info.time_left(now) <= timedelta(hours=1)


def test_end_entity_alone_is_valid(grid_pki: GridPki) -> None:
    info = validate_chain(grid_pki.user("bob").chain, grid_pki.trust, now=grid_pki.now)
    assert info.identity == "/DC=org/DC=example/CN=Bob" and info.proxy_depth == 0


def test_wrong_ca(grid_pki: GridPki) -> None:
    now = grid_pki.now
    other_ca = make_ca(now=now, dn="/DC=org/DC=evil/CN=Other CA")
    mallory = issue_certificate(other_ca, "/DC=org/DC=example/CN=Alice", now=now)
    proxy = new_proxy(mallory, now=now, lifetime=timedelta(hours=1))
    assert _reason(proxy.chain, grid_pki.trust, now) == "unknown_ca"


def test_expired_and_not_yet_valid(grid_pki: GridPki) -> None:
    now = grid_pki.now
    proxy = new_proxy(grid_pki.user("alice"), now=now, lifetime=timedelta(hours=1))
    assert _reason(proxy.chain, grid_pki.trust, now + timedelta(hours=2)) == "expired"
    future = forge_proxy(
        grid_pki.user("alice"),
        now=now,
        not_before=now + timedelta(hours=1),
        not_after=now + timedelta(hours=3),
    )
    assert _reason(future.chain, grid_pki.trust, now) == "not_yet_valid"


def test_revoked_eec(grid_pki: GridPki) -> None:
    now = grid_pki.now
    bob = grid_pki.user("bob")
    crl = make_crl(grid_pki.pki.ca, now=now, revoked_serials=[bob.cert.serial_number])
    trust = dataclasses.replace(grid_pki.trust, crls=(crl,))
    proxy = new_proxy(bob, now=now, lifetime=timedelta(hours=1))
    assert _reason(proxy.chain, trust, now) == "revoked"
    # alice, not on the CRL, still passes with the same store
    alice_proxy = new_proxy(grid_pki.user("alice"), now=now, lifetime=timedelta(hours=1))
    validate_chain(alice_proxy.chain, trust, now=now)


def test_path_length_exceeded(grid_pki: GridPki) -> None:
    now = grid_pki.now
    p0 = new_proxy(grid_pki.user("alice"), now=now, lifetime=timedelta(hours=1), path_length=0)
    child = forge_proxy(p0, now=now)
    assert _reason(child.chain, grid_pki.trust, now) == "path_length"
    p1 = new_proxy(grid_pki.user("alice"), now=now, lifetime=timedelta(hours=1), path_length=1)
    ok = new_proxy(p1, now=now, lifetime=timedelta(hours=1))
    validate_chain(ok.chain, grid_pki.trust, now=now)
    too_deep = forge_proxy(ok, now=now)
    assert _reason(too_deep.chain, grid_pki.trust, now) == "path_length"


def test_proxy_naming_violation(grid_pki: GridPki) -> None:
    now = grid_pki.now
    bad = forge_proxy(
        grid_pki.user("alice"),
        now=now,
        subject=x509.Name.from_rfc4514_string("CN=123,CN=Bob,DC=example,DC=org"),
    )
    assert _reason(bad.chain, grid_pki.trust, now) == "proxy_naming"
    two_rdns = forge_proxy(
        grid_pki.user("alice"),
        now=now,
        subject=x509.Name(
            [
                *grid_pki.user("alice").cert.subject.rdns,
                x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, "1")]),
                x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, "2")]),
            ]
        ),
    )
    assert _reason(two_rdns.chain, grid_pki.trust, now) == "proxy_naming"


def test_full_proxy_from_limited(grid_pki: GridPki) -> None:
    now = grid_pki.now
    limited = new_proxy(
        grid_pki.user("alice"), now=now, lifetime=timedelta(hours=1), proxy_type=ProxyType.LIMITED
    )
    full = forge_proxy(limited, now=now, proxy_type=ProxyType.IMPERSONATION)
    assert _reason(full.chain, grid_pki.trust, now) == "limited_parent"
    fine = forge_proxy(limited, now=now, proxy_type=ProxyType.LIMITED)
    assert validate_chain(fine.chain, grid_pki.trust, now=now).limited


def test_legacy_and_draft_proxies(grid_pki: GridPki) -> None:
    now = grid_pki.now
    legacy = forge_proxy(grid_pki.user("alice"), now=now, last_cn="proxy", with_pci=False)
    assert _reason(legacy.chain, grid_pki.trust, now) == "legacy_proxy"
    draft = forge_proxy(
        grid_pki.user("alice"),
        now=now,
        with_pci=False,
        extensions=[(x509.UnrecognizedExtension(DRAFT_PROXY_CERT_INFO_OID, b"\x30\x00"), True)],
    )
    assert _reason(draft.chain, grid_pki.trust, now) == "draft_proxy"


def test_forged_signature_and_incomplete_chain(grid_pki: GridPki) -> None:
    now = grid_pki.now
    proxy = new_proxy(grid_pki.user("alice"), now=now, lifetime=timedelta(hours=1))
    # proxy of alice presented with bob's certificate as its issuer
    assert _reason((proxy.cert, grid_pki.user("bob").cert), grid_pki.trust, now) == "proxy_naming"
    assert _reason((proxy.cert,), grid_pki.trust, now) == "incomplete_chain"
    assert _reason((), grid_pki.trust, now) == "empty_chain"
    # a non-proxy certificate signed by alice's (non-CA) key
    fake = forge_proxy(grid_pki.user("alice"), now=now, with_pci=False, last_cn="svc")
    assert _reason(fake.chain, grid_pki.trust, now) in {"invalid_ca", "untrusted", "unknown_ca"}
