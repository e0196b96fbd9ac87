from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker.errors import CredentialError, CsrError
from broker.pki.chain import validate_chain
from broker.pki.dn import slash_from_name
from broker.pki.loading import credential_to_pem, load_credential
from broker.pki.proxy import (
    BACKDATE,
    PROXY_CERT_INFO_OID,
    ProxyType,
    csr_to_pem,
    generate_key,
    load_csr,
    make_csr,
    new_proxy,
    proxy_info,
    sign_request,
)
from tests.pkifixtures import GridPki


def test_impersonation_proxy_fields(grid_pki: GridPki) -> None:
    alice, now = grid_pki.user("alice"), grid_pki.now
    proxy = new_proxy(alice, now=now, lifetime=timedelta(hours=12))
    cert = proxy.cert
    ext = cert.extensions.get_extension_for_oid(PROXY_CERT_INFO_OID)
    assert ext.critical
    info = proxy_info(cert)
    assert info is not None and info.type is ProxyType.IMPERSONATION and info.path_length is None
    # subject = issuer subject + CN=<serial>
    assert cert.subject.rdns[:-1] == alice.cert.subject.rdns
    assert next(iter(cert.subject.rdns[-1])).value == str(cert.serial_number)
    assert cert.issuer == alice.cert.subject
    assert cert.not_valid_before_utc == now.replace(microsecond=0) - BACKDATE or (
        abs(cert.not_valid_before_utc - (now - BACKDATE)) < timedelta(seconds=1)
    )
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.content_commitment and not ku.key_cert_sign
    assert isinstance(proxy.key, rsa.RSAPrivateKey) and proxy.key.key_size == 2048


def test_lifetime_capped_at_issuer(grid_pki: GridPki) -> None:
    alice, now = grid_pki.user("alice"), grid_pki.now
    short = new_proxy(alice, now=now, lifetime=timedelta(hours=1))
    child = new_proxy(short, now=now, lifetime=timedelta(days=3))
    assert child.cert.not_valid_after_utc == short.cert.not_valid_after_utc


def test_limited_issuer_forces_limited(grid_pki: GridPki) -> None:
    now = grid_pki.now
    limited = new_proxy(
        grid_pki.user("alice"), now=now, lifetime=timedelta(hours=2), proxy_type=ProxyType.LIMITED
    )
    child = new_proxy(limited, now=now, lifetime=timedelta(hours=1))
    info = proxy_info(child.cert)
    assert info is not None and info.type is ProxyType.LIMITED


def test_path_length_tightened_and_zero_refused(grid_pki: GridPki) -> None:
    now = grid_pki.now
    p2 = new_proxy(grid_pki.user("alice"), now=now, lifetime=timedelta(hours=2), path_length=2)
    p1 = new_proxy(p2, now=now, lifetime=timedelta(hours=2), path_length=5)
    info = proxy_info(p1.cert)
    assert info is not None and info.path_length == 1
    p0 = new_proxy(p1, now=now, lifetime=timedelta(hours=2))
    assert proxy_info(p0.cert).path_length == 0
    with pytest.raises(CredentialError) as err:
        new_proxy(p0, now=now, lifetime=timedelta(hours=1))
    assert err.value.reason == "path_length"


def test_ec_keys_and_independent(grid_pki: GridPki) -> None:
    now = grid_pki.now
    proxy = new_proxy(
        grid_pki.user("bob"),
        now=now,
        lifetime=timedelta(hours=1),
        proxy_type=ProxyType.INDEPENDENT,
        key=generate_key("ec"),
    )
    assert isinstance(proxy.key, ec.EllipticCurvePrivateKey)
    info = validate_chain(proxy.chain, grid_pki.trust, now=now)
    # An independent proxy carries none of Bob's rights: it is its own identity.
    assert info.identity == slash_from_name(proxy.cert.subject) != "/DC=org/DC=example/CN=Bob"
    assert info.end_entity == "/DC=org/DC=example/CN=Bob"
    assert info.independent
    assert info.proxy_types == (ProxyType.INDEPENDENT,)


def test_delegation_via_csr_moves_no_private_key(grid_pki: GridPki) -> None:
    now = grid_pki.now
    requester_key = generate_key("ec")
    csr_pem = csr_to_pem(make_csr(requester_key))
    assert b"PRIVATE" not in csr_pem
    csr = load_csr(csr_pem)
    alice_proxy = new_proxy(grid_pki.user("alice"), now=now, lifetime=timedelta(hours=3))
    chain = sign_request(alice_proxy, csr, now=now, lifetime=timedelta(hours=1))
    assert chain[0].public_key() == requester_key.public_key()
    info = validate_chain(chain, grid_pki.trust, now=now)
    assert info.identity == "/DC=org/DC=example/CN=Alice"
    assert info.proxy_depth == 2


def test_csr_errors() -> None:
    with pytest.raises(CsrError):
        load_csr(b"")
    with pytest.raises(CsrError):
        load_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
    with pytest.raises(CsrError):
        load_csr(b"\x30\x03\x02\x01\x00")
    with pytest.raises(CsrError):
        load_csr(b"x" * 70000)


def test_pem_round_trip_pkcs1_and_pkcs8(grid_pki: GridPki) -> None:
    proxy = new_proxy(grid_pki.user("alice"), now=grid_pki.now, lifetime=timedelta(hours=1))
    pem = credential_to_pem(proxy)
    assert pem.index(b"RSA PRIVATE KEY") > pem.index(b"CERTIFICATE")
    loaded = load_credential(pem)
    assert loaded.chain == proxy.chain
    assert slash_from_name(loaded.cert.subject).startswith("/DC=org/DC=example/CN=Alice/CN=")


def test_every_ancestors_path_length_constrains_a_new_proxy(grid_pki: GridPki) -> None:
    # A Globus-style chain: P1 allows one level below it, then a child without a constraint.
    from tests.pkifixtures import forge_proxy

    now = grid_pki.now
    p1 = new_proxy(grid_pki.user("alice"), now=now, lifetime=timedelta(hours=2), path_length=1)
    loose = forge_proxy(p1, now=now, path_length=None)  # does not copy the constraint down
    validate_chain(loose.chain, grid_pki.trust, now=now)  # still valid: one level below P1
    with pytest.raises(CredentialError) as err:
        new_proxy(loose, now=now, lifetime=timedelta(hours=1))  # would be two levels below P1
    assert err.value.reason == "path_length"


def test_check_signature_outcomes(grid_pki: GridPki) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ed25519, padding

    from broker.pki.proxy import SignatureCheck, check_signature

    now = grid_pki.now
    message = b"challenge-123"
    for key_type in ("rsa", "ec"):
        proxy = new_proxy(
            grid_pki.user("bob"), now=now, lifetime=timedelta(hours=1), key=generate_key(key_type)
        )
        key = proxy.key
        for digest in (hashes.SHA256(), hashes.SHA1()):
            if isinstance(key, rsa.RSAPrivateKey):
                signature = key.sign(message, padding.PKCS1v15(), digest)
            else:
                assert isinstance(key, ec.EllipticCurvePrivateKey)
                signature = key.sign(message, ec.ECDSA(digest))
            assert check_signature(proxy.cert, message, signature, digest) is SignatureCheck.VALID
            assert (
                check_signature(proxy.cert, message + b"x", signature, digest)
                is SignatureCheck.MISMATCH
            )
    # A key type the renewal protocols do not use is reported, not raised.
    ed_key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name.from_rfc4514_string("CN=ed")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ed_key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(hours=1))
        .sign(ed_key, None)
    )
    assert (
        check_signature(cert, message, ed_key.sign(message), hashes.SHA256())
        is SignatureCheck.UNSUPPORTED_KEY
    )
