"""VOMS ACs: our parser and verifier against voms-proxy-fake, our issuer against
voms-proxy-info and libvomsapi (VERIFY_FULL), and hostile input."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.errors import InputError, VomsError
from broker.pki.loading import Credential, credential_to_pem, load_certificates
from broker.pki.proxy import new_proxy
from broker.pki.voms import (
    ACCERTS_OID,
    VOMS_AC_EXTENSION_OID,
    LscEntry,
    VomsDir,
    find_acs,
    fqan_validate,
    full_fqan,
    make_ac_extension,
    parse_ac,
    parse_lsc,
    split_ac_extension,
    verify_chain_acs,
)
from tests.broker.pki.voms_fixtures import (
    CA_DN,
    VOMS_DN,
    VOMS_URI,
    Pki,
    build_pki,
    need_tool,
    voms_proxy_fake,
    write_private,
)
from tests.prerequisites import unavailable

HOUR = timedelta(hours=1)
FQANS = ("/atlas/Role=production/Capability=NULL", "/atlas/Role=NULL/Capability=NULL")


def now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    need_tool("openssl")
    return build_pki(tmp_path_factory.mktemp("voms-pki"))


@pytest.fixture(scope="module")
def proxy_key() -> rsa.RSAPrivateKey:
    # One key for every proxy we make: key generation is the slow part.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def voms_proxy(
    pki: Pki,
    key: Any,
    *,
    holder: Credential | None = None,
    signer: Credential | None = None,
    when: datetime | None = None,
    lifetime: timedelta = 12 * HOUR,
    fqans: tuple[str, ...] = ("/atlas/Role=production", "/atlas"),
    uri: str = VOMS_URI,
) -> Credential:
    """alice's proxy carrying an AC made by make_ac_extension."""
    moment = when or now()
    ext = make_ac_extension(
        (holder or pki.alice).cert,
        signer or pki.voms,
        vo="atlas",
        fqans=fqans,
        uri=uri,
        now=moment,
        lifetime=lifetime,
    )
    return new_proxy(pki.alice, now=now(), lifetime=12 * HOUR, key=key, extra_extensions=[ext])


def verify(
    pki: Pki,
    chain: Any,
    *,
    vomsdir: VomsDir | None = None,
    at: datetime | None = None,
    target_host: str | None = None,
) -> Any:
    return verify_chain_acs(
        tuple(chain),
        pki.alice.cert,
        vomsdir or pki.voms_dir(),
        pki.trust(),
        at or now(),
        target_host=target_host,
    )


def reason_of(call: Callable[[], object]) -> str:
    with pytest.raises(VomsError) as info:
        call()
    assert info.value.message  # every refusal carries a sentence
    return info.value.reason


# --------------------------------------------------------------------------- FQANs and LSC


@pytest.mark.parametrize(
    ("short", "full"),
    [
        ("/atlas", "/atlas/Role=NULL/Capability=NULL"),
        ("/atlas/Role=production", "/atlas/Role=production/Capability=NULL"),
        ("/atlas/de/Role=pilot/Capability=NULL", "/atlas/de/Role=pilot/Capability=NULL"),
        ("/atlas/Capability=x", "/atlas/Role=NULL/Capability=x"),
        ("/vo.example.org/a/b", "/vo.example.org/a/b/Role=NULL/Capability=NULL"),
    ],
)
def test_full_fqan(short: str, full: str) -> None:
    assert full_fqan(short) == full
    assert full_fqan(full) == full


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "atlas",
        "/",
        "/atlas/",
        "//atlas",
        "/atlas//x",
        "/atlas/Role=",
        "/atlas/Role=a/b",
        "/atlas/Capability=NULL/Role=NULL",
        "/Role=x",
        "/atlas/Role=x/Role=y",
        "/atl as",
        "/atlas/g=x",
        "/atlas\n",
        "/" + "a" * 600,
    ],
)
def test_bad_fqans_are_refused(bad: str) -> None:
    assert reason_of(lambda: fqan_validate(bad)) == "bad_fqan"
    assert reason_of(lambda: full_fqan(bad)) == "bad_fqan"


def test_fqan_of_another_vo() -> None:
    fqan_validate("/atlas/x", vo="atlas")
    assert reason_of(lambda: fqan_validate("/cms/x", vo="atlas")) == "bad_fqan"


def test_lsc_chains_comments_and_separators() -> None:
    text = (
        "# the atlas server\n"
        f"{VOMS_DN}\n{CA_DN}\n"
        "------NEXT CHAIN------\n"
        "/DC=org/DC=example/CN=voms2.example.org\n/DC=org/DC=example/CN=Sub CA\n"
        f"{CA_DN}\n\n"
    )
    first, second = parse_lsc(text.encode())
    assert first == LscEntry(VOMS_DN, CA_DN)
    assert second.chain == (
        "/DC=org/DC=example/CN=voms2.example.org",
        "/DC=org/DC=example/CN=Sub CA",
        CA_DN,
    )


@pytest.mark.parametrize(
    "bad",
    [b"", b"# only a comment\n", f"{VOMS_DN}\n".encode(), b"CN=not slash\n/CN=x\n", b"\xff\xfe"],
)
def test_malformed_lsc(bad: bytes) -> None:
    assert reason_of(lambda: parse_lsc(bad)) == "bad_lsc"


def test_vomsdir_from_files() -> None:
    lsc = f"{VOMS_DN}\n{CA_DN}\n".encode()
    vd = VomsDir.from_files(
        {"atlas/voms.example.org.lsc": lsc, "atlas/old.pem": b"junk", "README": b"x"}
    )
    assert vd.chains_for("atlas", "voms.example.org") == ((VOMS_DN, CA_DN),)
    assert vd.chains_for("cms", "voms.example.org") is None
    assert reason_of(lambda: VomsDir.from_files({"voms.example.org.lsc": lsc})) == "bad_lsc"
    assert reason_of(lambda: VomsDir.from_files({"a/b/c.lsc": lsc})) == "bad_lsc"
    assert reason_of(lambda: VomsDir.from_files({"atlas/x.lsc": b"/CN=a\n"})) == "bad_lsc"


# --------------------------------------------------------------------------- voms-proxy-fake


@pytest.fixture(scope="module")
def fake_proxies(pki: Pki) -> dict[str, Path]:
    need_tool("voms-proxy-fake")
    return {
        "good": voms_proxy_fake(pki, "alice_voms.pem", "-vomslife", "12"),
        "expired": voms_proxy_fake(
            pki, "alice_voms_expired.pem", "-pastac", "2:00", "-vomslife", "1"
        ),
        "rogue": voms_proxy_fake(pki, "alice_voms_rogue.pem", "-vomslife", "12", hostcert="rogue"),
    }


@pytest.mark.interop
def test_voms_proxy_fake_ac_verifies(pki: Pki, fake_proxies: dict[str, Path]) -> None:
    chain = load_certificates(fake_proxies["good"].read_bytes())
    (attrs,) = verify(pki, chain)
    assert attrs.vo == "atlas"
    assert attrs.fqans == FQANS
    assert attrs.primary_fqan == FQANS[0]
    assert attrs.issuer == VOMS_DN
    assert attrs.uri == VOMS_URI
    assert attrs.holder_serial == pki.alice.cert.serial_number
    # voms-proxy-fake (without -newformat) names the holder by the EEC's subject.
    assert attrs.holder_issuer == "/DC=org/DC=example/CN=Alice"
    assert attrs.not_before <= now() < attrs.not_after


@pytest.mark.interop
def test_voms_proxy_fake_parse_details(fake_proxies: dict[str, Path]) -> None:
    chain = load_certificates(fake_proxies["good"].read_bytes())
    (der,) = find_acs(chain[0])
    ac = parse_ac(der)
    assert ac.version == 1 and ac.vo == "atlas" and ac.host == "voms.example.org"
    assert [c.subject.rfc4514_string() for c in ac.signer_certs] == [
        "CN=voms.example.org,DC=example,DC=org"
    ]
    assert ac.has_no_rev_avail and ac.authority_key_id is not None and ac.targets is None
    assert ac.signature_algorithm == "1.2.840.113549.1.1.11"
    assert find_acs(chain[1]) == []  # the EEC carries none


@pytest.mark.interop
def test_voms_proxy_fake_expired_ac(pki: Pki, fake_proxies: dict[str, Path]) -> None:
    chain = load_certificates(fake_proxies["expired"].read_bytes())
    assert reason_of(lambda: verify(pki, chain)) == "expired_ac"


@pytest.mark.interop
def test_voms_proxy_fake_rogue_signer(pki: Pki, fake_proxies: dict[str, Path]) -> None:
    # voms-proxy-fake embeds the impostor's own certificate in ACCERTS, so the signature
    # does verify against the embedded cert; what fails is that this self-signed cert
    # does not chain to the trusted CA: untrusted_signer, not bad_ac_signature.
    chain = load_certificates(fake_proxies["rogue"].read_bytes())
    assert reason_of(lambda: verify(pki, chain)) == "untrusted_signer"


@pytest.mark.interop
def test_voms_proxy_fake_without_lsc(pki: Pki, fake_proxies: dict[str, Path]) -> None:
    chain = load_certificates(fake_proxies["good"].read_bytes())
    empty = pki.voms_dir(pki.empty_vomsdir)
    assert reason_of(lambda: verify(pki, chain, vomsdir=empty)) == "no_lsc"


# --------------------------------------------------------------------------- our own ACs


def test_our_ac_round_trip(pki: Pki, proxy_key: Any) -> None:
    proxy = voms_proxy(pki, proxy_key)
    (attrs,) = verify(pki, proxy.chain)
    assert attrs.fqans == FQANS
    assert attrs.holder_issuer == CA_DN  # as a real VOMS server writes it
    assert attrs.issuer == VOMS_DN and attrs.uri == VOMS_URI


def test_ecdsa_signer(pki: Pki, proxy_key: Any) -> None:
    proxy = voms_proxy(pki, proxy_key, signer=pki.voms_ec, uri="voms-ec.example.org:15002")
    (attrs,) = verify(pki, proxy.chain)
    assert attrs.issuer == "/DC=org/DC=example/CN=voms-ec.example.org"


def test_ac_for_another_holder(pki: Pki, proxy_key: Any) -> None:
    proxy = voms_proxy(pki, proxy_key, holder=pki.bob)
    assert reason_of(lambda: verify(pki, proxy.chain)) == "holder_mismatch"


def test_ac_validity_window(pki: Pki, proxy_key: Any) -> None:
    proxy = voms_proxy(pki, proxy_key, when=now() + 2 * HOUR)
    assert reason_of(lambda: verify(pki, proxy.chain)) == "ac_not_yet_valid"
    # A few minutes of clock skew are tolerated, as libvomsapi does.
    verify(pki, proxy.chain, at=now() + 2 * HOUR - timedelta(minutes=4))
    assert reason_of(lambda: verify(pki, proxy.chain, at=now() + 15 * HOUR)) == "expired_ac"


def test_forged_signature_with_genuine_embedded_cert(pki: Pki, proxy_key: Any) -> None:
    forger = Credential(chain=(pki.voms.cert,), key=pki.rogue.key)
    proxy = voms_proxy(pki, proxy_key, signer=forger)
    assert reason_of(lambda: verify(pki, proxy.chain)) == "bad_ac_signature"


def test_expired_signer_is_untrusted(pki: Pki, proxy_key: Any) -> None:
    later = pki.voms.cert.not_valid_after_utc + timedelta(days=1)
    proxy = voms_proxy(pki, proxy_key, when=later)
    assert reason_of(lambda: verify(pki, proxy.chain, at=later + HOUR)) == "untrusted_signer"


def test_unlisted_signer(pki: Pki, proxy_key: Any) -> None:
    proxy = voms_proxy(pki, proxy_key)
    other = VomsDir.from_files(
        {"atlas/voms.example.org.lsc": f"/DC=org/DC=example/CN=other\n{CA_DN}\n".encode()}
    )
    assert reason_of(lambda: verify(pki, proxy.chain, vomsdir=other)) == "no_lsc"
    wrong_ca = VomsDir.from_files(
        {"atlas/voms.example.org.lsc": f"{VOMS_DN}\n/DC=org/CN=Other CA\n".encode()}
    )
    assert reason_of(lambda: verify(pki, proxy.chain, vomsdir=wrong_ca)) == "no_lsc"


def test_no_acs_and_nearest_proxy_wins(pki: Pki, proxy_key: Any) -> None:
    plain = new_proxy(pki.alice, now=now(), lifetime=HOUR, key=proxy_key)
    assert verify(pki, plain.chain) == ()
    # A proxy of a VOMS proxy: the ACs sit one level down and are still found.
    voms = voms_proxy(pki, proxy_key)
    child = new_proxy(voms, now=now(), lifetime=HOUR, key=proxy_key)
    (attrs,) = verify(pki, child.chain)
    assert attrs.fqans == FQANS
    # Two levels with ACs: the one nearest the leaf is what counts.
    ext = make_ac_extension(
        pki.alice.cert,
        pki.voms,
        vo="atlas",
        fqans=["/atlas/de"],
        uri=VOMS_URI,
        now=now(),
        lifetime=HOUR,
    )
    top = new_proxy(voms, now=now(), lifetime=HOUR, key=proxy_key, extra_extensions=[ext])
    (attrs,) = verify(pki, top.chain)
    assert attrs.fqans == ("/atlas/de/Role=NULL/Capability=NULL",)


def _rewrite_ac(
    proxy: Credential, key: Any, edit: Callable[[Any], None]
) -> x509.UnrecognizedExtension:
    """Re-sign the proxy's AC after ``edit`` changed its AttributeCertificateInfo."""
    (der,) = find_acs(proxy.cert)
    ac = cms.AttributeCertificateV2.load(der)
    info = ac["ac_info"]
    edit(info)
    tbs = info.dump(force=True)
    signature = key.sign(tbs, padding.PKCS1v15(), hashes.SHA256())
    new = cms.AttributeCertificateV2(
        {"ac_info": info, "signature_algorithm": ac["signature_algorithm"], "signature": signature}
    )
    return x509.UnrecognizedExtension(
        x509.ObjectIdentifier(VOMS_AC_EXTENSION_OID), _wrap(_wrap(new.dump()))
    )


def _wrap(body: bytes) -> bytes:
    """A DER SEQUENCE around ``body`` (the extension is SEQUENCE OF SEQUENCE OF AC)."""
    return b"\x30" + _der_len(len(body)) + body


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def test_missing_accerts_and_targets(pki: Pki, proxy_key: Any) -> None:
    base = voms_proxy(pki, proxy_key)
    voms_key = pki.voms.key

    def drop_accerts(info: Any) -> None:
        info["extensions"] = [e for e in info["extensions"] if e["extn_id"].dotted != ACCERTS_OID]

    ext = _rewrite_ac(base, voms_key, drop_accerts)
    proxy = new_proxy(pki.alice, now=now(), lifetime=HOUR, key=proxy_key, extra_extensions=[ext])
    assert reason_of(lambda: verify(pki, proxy.chain)) == "signer_not_embedded"

    def add_targets(info: Any) -> None:
        target = asn1_x509.GeneralName(
            name="uniform_resource_identifier", value="broker.example.org"
        )
        # VOMS's AC_TARGETS: SEQUENCE { SEQUENCE OF SEQUENCE { [0] EXPLICIT GeneralName } }
        one = core.Sequence(contents=b"\xa0" + _der_len(len(target.dump())) + target.dump())
        targets = _wrap(_wrap(one.dump()))
        info["extensions"] = [
            *info["extensions"],
            asn1_x509.Extension({"extn_id": "2.5.29.55", "critical": True, "extn_value": targets}),
        ]

    ext = _rewrite_ac(base, voms_key, add_targets)
    proxy = new_proxy(pki.alice, now=now(), lifetime=HOUR, key=proxy_key, extra_extensions=[ext])
    (attrs,) = verify(pki, proxy.chain, target_host="broker.example.org")
    assert attrs.vo == "atlas"
    assert reason_of(lambda: verify(pki, proxy.chain)) == "target_mismatch"
    assert reason_of(lambda: verify(pki, proxy.chain, target_host="x.org")) == "target_mismatch"


def test_make_ac_extension_refuses_bad_input(pki: Pki) -> None:
    def make(**kw: Any) -> Any:
        args: dict[str, Any] = dict(
            vo="atlas", fqans=["/atlas"], uri=VOMS_URI, now=now(), lifetime=HOUR
        )
        args.update(kw)
        return make_ac_extension(pki.alice.cert, pki.voms, **args)

    assert reason_of(lambda: make(fqans=["/cms"])) == "bad_fqan"
    assert reason_of(lambda: make(fqans=[])) == "bad_fqan"
    assert reason_of(lambda: make(vo="at las")) == "bad_fqan"
    for bad in (dict(uri="voms.example.org"), dict(lifetime=-HOUR), dict(serial=0)):
        with pytest.raises(InputError):
            make(**bad)


# --------------------------------------------------------------------------- real tools read ours

VERIFIER_SOURCE = r"""
// Reads a proxy file (leaf first, key block skipped) and asks libvomsapi for a full check.
#include <voms/voms_api.h>
#include <openssl/bio.h>
#include <openssl/pem.h>
#include <openssl/err.h>
#include <iostream>

int main(int argc, char **argv) {
  if (argc != 4) { std::cerr << "usage: vomscheck VOMSDIR CERTDIR PROXY\n"; return 2; }
  BIO *in = BIO_new_file(argv[3], "r");
  if (in == nullptr) { std::cerr << "cannot open " << argv[3] << "\n"; return 2; }
  X509 *leaf = nullptr;
  STACK_OF(X509) *rest = sk_X509_new_null();
  for (X509 *cert; (cert = PEM_read_bio_X509(in, nullptr, nullptr, nullptr)) != nullptr;) {
    if (leaf == nullptr) leaf = cert; else sk_X509_push(rest, cert);
  }
  BIO_free(in);
  if (leaf == nullptr) { std::cerr << "no certificate in " << argv[3] << "\n"; return 2; }
  vomsdata checker(argv[1], argv[2]);
  checker.SetVerificationType(VERIFY_FULL);
  if (!checker.Retrieve(leaf, rest, RECURSE_CHAIN)) {
    std::cout << "REFUSED " << checker.ErrorMessage() << "\n";
    return 1;
  }
  for (const voms &ac : checker.data) {
    std::cout << "VO " << ac.voname << "\nISSUER " << ac.server << "\nURI " << ac.uri << "\n";
    for (const std::string &fqan : ac.fqan) std::cout << "FQAN " << fqan << "\n";
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def libvoms_checker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_tool("g++", "pkg-config")
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "voms-2.0"], capture_output=True, text=True
    )
    if flags.returncode != 0:
        unavailable("voms-dev is not installed (pkg-config voms-2.0 fails)")
    build = tmp_path_factory.mktemp("vomscheck")
    source = build / "vomscheck.cc"
    source.write_text(VERIFIER_SOURCE)
    binary = build / "vomscheck"
    subprocess.run(
        ["g++", "-O0", "-o", str(binary), str(source), *flags.stdout.split(), "-lcrypto"],
        check=True,
        timeout=120,
    )
    return binary


@pytest.fixture(scope="module")
def our_proxy_file(pki: Pki, proxy_key: Any) -> Path:
    path = pki.path("alice_ours.pem")
    write_private(path, credential_to_pem(voms_proxy(pki, proxy_key)))
    return path


@pytest.mark.interop
def test_voms_proxy_info_reads_our_ac(pki: Pki, our_proxy_file: Path) -> None:
    need_tool("voms-proxy-info")
    done = subprocess.run(
        ["voms-proxy-info", "-all", "-file", str(our_proxy_file)],
        capture_output=True,
        text=True,
        env=pki.env(),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "VO        : atlas" in out
    assert f"issuer    : {VOMS_DN}" in out
    assert f"uri       : {VOMS_URI}" in out
    assert out.index(f"attribute : {FQANS[0]}") < out.index(f"attribute : {FQANS[1]}")
    chain = load_certificates(our_proxy_file.read_bytes())
    (attrs,) = verify(pki, chain)
    assert attrs.fqans == FQANS


@pytest.mark.interop
def test_libvomsapi_full_verification_accepts_ours(
    pki: Pki, our_proxy_file: Path, libvoms_checker: Path
) -> None:
    done = subprocess.run(
        [str(libvoms_checker), str(pki.vomsdir), str(pki.certdir), str(our_proxy_file)],
        capture_output=True,
        text=True,
        env=pki.env(),
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "VO atlas" in lines and f"ISSUER {VOMS_DN}" in lines and f"URI {VOMS_URI}" in lines
    assert [ln[5:] for ln in lines if ln.startswith("FQAN ")] == list(FQANS)


@pytest.mark.interop
def test_libvomsapi_agrees_on_the_fixtures(
    pki: Pki, fake_proxies: dict[str, Path], libvoms_checker: Path
) -> None:
    """The checker is a real check: it refuses what our verifier refuses."""

    def check(proxy: Path, vomsdir: Path) -> int:
        return subprocess.run(
            [str(libvoms_checker), str(vomsdir), str(pki.certdir), str(proxy)],
            capture_output=True,
            env=pki.env(),
            timeout=60,
        ).returncode

    assert check(fake_proxies["good"], pki.vomsdir) == 0
    assert check(fake_proxies["expired"], pki.vomsdir) == 1
    assert check(fake_proxies["rogue"], pki.vomsdir) == 1
    assert check(fake_proxies["good"], pki.empty_vomsdir) == 1


@pytest.mark.interop
def test_libvomsapi_agrees_on_our_acs(pki: Pki, proxy_key: Any, libvoms_checker: Path) -> None:
    """An ECDSA-signed AC is accepted, an AC for bob on alice's proxy is refused."""

    def check(proxy: Credential, name: str) -> subprocess.CompletedProcess[str]:
        path = pki.path(name)
        write_private(path, credential_to_pem(proxy))
        return subprocess.run(
            [str(libvoms_checker), str(pki.vomsdir), str(pki.certdir), str(path)],
            capture_output=True,
            text=True,
            env=pki.env(),
            timeout=60,
        )

    ec_signed = check(
        voms_proxy(pki, proxy_key, signer=pki.voms_ec, uri="voms-ec.example.org:15002"),
        "alice_ec.pem",
    )
    assert ec_signed.returncode == 0, ec_signed.stdout
    for_bob = check(voms_proxy(pki, proxy_key, holder=pki.bob), "alice_bob_ac.pem")
    assert for_bob.returncode == 1, for_bob.stdout


# --------------------------------------------------------------------------- hostile input


@pytest.fixture(scope="module")
def valid_ac(pki: Pki) -> bytes:
    ext = make_ac_extension(
        pki.alice.cert,
        pki.voms,
        vo="atlas",
        fqans=["/atlas"],
        uri=VOMS_URI,
        now=now(),
        lifetime=HOUR,
    )
    (der,) = split_ac_extension(ext.value)
    return der


def _only_voms_errors(call: Callable[[], object]) -> None:
    try:
        call()
    except VomsError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_crash(data: bytes) -> None:
    _only_voms_errors(lambda: parse_ac(data))
    _only_voms_errors(lambda: split_ac_extension(data))


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_mutated_acs_never_crash(valid_ac: bytes, data: st.DataObject) -> None:
    blob = bytearray(valid_ac)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, len(blob) - 1))
        if kind == "flip":
            blob[pos] ^= data.draw(st.integers(1, 255))
        elif kind == "cut":
            del blob[pos : pos + data.draw(st.integers(1, 40))]
        else:
            blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        if not blob:
            blob = bytearray(b"\x30")
    _only_voms_errors(lambda: parse_ac(bytes(blob)))
    _only_voms_errors(lambda: split_ac_extension(_wrap(_wrap(bytes(blob)))))


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=200))
def test_find_acs_on_certificates_with_junk_extension(data: bytes) -> None:
    key = _ec_key()
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "junk")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime(2020, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2030, 1, 1, tzinfo=UTC))
        .add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(VOMS_AC_EXTENSION_OID), data),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    _only_voms_errors(lambda: find_acs(cert))


_EC_KEY: list[ec.EllipticCurvePrivateKey] = []


def _ec_key() -> ec.EllipticCurvePrivateKey:
    if not _EC_KEY:
        _EC_KEY.append(ec.generate_private_key(ec.SECP256R1()))
    return _EC_KEY[0]
