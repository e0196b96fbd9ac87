"""CA namespaces (issue 18): the parsers, the matcher and their enforcement in chain validation."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509

from broker.errors import ChainError, VomsError
from broker.pki.chain import validate_chain
from broker.pki.devca import ca_files, issue_certificate, make_ca, subject_hash
from broker.pki.namespace import NamespaceFileError, parse_namespaces, parse_signing_policy
from broker.pki.proxy import new_proxy
from broker.pki.trust import TrustStore
from broker.pki.voms import VomsDir, make_ac_extension
from tests.pkifixtures import GridPki

CA = "/DC=org/DC=example/CN=Example CA"
ROGUE_DN = "/DC=org/DC=rogue/CN=Rogue CA"


def _refusal(
    chain: tuple[x509.Certificate, ...], trust: TrustStore, grid_pki: GridPki
) -> ChainError:
    with pytest.raises(ChainError) as err:
        validate_chain(chain, trust, now=grid_pki.now)
    return err.value


def _with_rogue(
    grid_pki: GridPki, namespace: tuple[str, ...] | None, **kw: bool
) -> tuple[TrustStore, object]:
    """The dev CA directory plus a second trusted CA whose namespace is ``namespace`` globs
    (None: it ships no namespace file at all)."""
    rogue = make_ca(now=grid_pki.now, dn=ROGUE_DN)
    files = dict(grid_pki.pki.ca_directory())
    if namespace is None:
        files.update({k: v for k, v in ca_files(rogue.cert).items() if k.endswith(".0")})
    else:
        files.update(ca_files(rogue.cert, namespace))
    return TrustStore.from_files(files, **kw), rogue


# ----------------------------------------------------------------- parsers


def test_signing_policy_parsed_with_globs() -> None:
    text = (
        f"# comment\n access_id_CA X509 '{CA}'\npos_rights globus CA:sign\n"
        'cond_subjects globus \'"/DC=org/DC=example/*" "/O=Ex/CN=?ob"\'  # trailing\n'
    )
    rules = parse_signing_policy(text, "abcd0123.signing_policy")[CA]
    assert [r.pattern for r in rules] == ["/DC=org/DC=example/*", "/O=Ex/CN=?ob"]
    assert rules[0].matches("/DC=org/DC=example/OU=x/CN=Alice")
    assert not rules[0].matches("/DC=org/DC=examplex/CN=Alice")
    assert rules[1].matches("/O=Ex/CN=Bob") and not rules[1].matches("/O=Ex/CN=Boob")
    # Regular-expression characters are literal in a glob.
    dotted = parse_signing_policy(
        f"access_id_CA X509 '{CA}'\npos_rights globus CA:sign\n"
        "cond_subjects globus '\"/O=a.b/*\"'\n",
        "f",
    )[CA][0]
    assert dotted.matches("/O=a.b/CN=x") and not dotted.matches("/O=aXb/CN=x")


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("access_id_CA X509 /DC=org/CN=CA\n", 1, "quoted"),
        (f"access_id_CA X509 '{CA}'\ncond_subjects globus '\"/*\"'\n", 2, "pos_rights"),
        (f"access_id_CA X509 '{CA}'\npos_rights globus CA:revoke\n", 2, "CA:sign"),
        (
            f"access_id_CA X509 '{CA}'\npos_rights globus CA:sign\n"
            "cond_subjects globus '/DC=x/*'\n",
            3,
            "double quotes",
        ),
        (f"access_id_CA X509 '{CA}'\npos_rights globus CA:sign\nbogus_key a 'b'\n", 3, "unknown"),
        ("access_id_CA X509 'no slash form'\n", 1, "not a valid DN"),
        ("pos_rights globus CA:sign\n", 1, "before any access_id_CA"),
        (f"access_id_CA X509 '{CA}'\npos_rights globus CA:sign\n", None, "no cond_subjects"),
    ],
)
def test_signing_policy_errors_name_file_and_line(text: str, line: int | None, words: str) -> None:
    with pytest.raises(NamespaceFileError) as err:
        parse_signing_policy(text, "0a1b2c3d.signing_policy")
    where = "0a1b2c3d.signing_policy" + (f":{line}" if line else "")
    assert err.value.message.startswith(where) and words in err.value.message


def test_namespaces_parsed_with_continuation_self_and_deny() -> None:
    text = (
        f'# EUGridPMA\nTO Issuer "{CA}" \\\n   PERMIT Subject "/DC=org/DC=example/.*"\n'
        'to issuer SELF deny subject "/DC=org/DC=example/CN=root"\n'
    )
    parsed = parse_namespaces(text, "h.namespaces")
    assert [(r.permit, r.pattern, r.where) for r in parsed[CA]] == [
        (True, "/DC=org/DC=example/.*", "h.namespaces:2")
    ]
    assert [(r.permit, r.where) for r in parsed["SELF"]] == [(False, "h.namespaces:4")]


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ('TO Issuer "/DC=org/CN=CA" PERMIT Subject\n', 1, "expected"),
        ('TO Issuer "/DC=org/CN=CA" ALLOW Subject "/.*"\n', 1, "expected"),
        ('\n\nTO Issuer "/DC=org/CN=CA" PERMIT Subject "/DC=org/(.*"\n', 3, "regular expression"),
        ('TO Issuer "/DC=org/CN=CA PERMIT Subject "/.*"\n', 1, "unbalanced"),
        ('TO Issuer "/DC=org/CN=CA" PERMIT Subject ""\n', 1, "empty"),
        ('TO Issuer "nonsense" PERMIT Subject "/.*"\n', 1, "not a valid DN"),
    ],
)
def test_namespaces_errors_name_file_and_line(text: str, line: int, words: str) -> None:
    with pytest.raises(NamespaceFileError) as err:
        parse_namespaces(text, "0a1b2c3d.namespaces")
    assert err.value.message.startswith(f"0a1b2c3d.namespaces:{line}:")
    assert words in err.value.message


# ----------------------------------------------------------------- enforcement


def test_dev_pki_ships_both_files_and_its_users_pass(grid_pki: GridPki) -> None:
    h = subject_hash(grid_pki.pki.ca.cert)
    names = {p.name for p in grid_pki.ca_dir.iterdir()}
    assert {f"{h}.signing_policy", f"{h}.namespaces"} <= names
    trust = grid_pki.trust
    assert trust.problems == ()
    for name in ("alice", "bob", "pilot"):
        proxy = new_proxy(grid_pki.user(name), now=grid_pki.now, lifetime=timedelta(hours=1))
        validate_chain(proxy.chain, trust, now=grid_pki.now)


def test_second_ca_cannot_issue_outside_its_namespace(grid_pki: GridPki) -> None:
    """The finding: a second trusted CA issued Alice's DN and was taken for Alice."""
    trust, rogue = _with_rogue(grid_pki, ("/DC=org/DC=rogue/*",))
    fake = issue_certificate(rogue, "/DC=org/DC=example/CN=Alice", now=grid_pki.now)  # type: ignore[arg-type]
    proxy = new_proxy(fake, now=grid_pki.now, lifetime=timedelta(hours=1))
    err = _refusal(proxy.chain, trust, grid_pki)
    assert err.reason == "namespace"
    assert ROGUE_DN in err.message and '"/DC=org/DC=rogue/*"' in err.message
    assert "/DC=org/DC=example/CN=Alice" in err.message
    # Inside its own namespace the second CA is fine; the first CA is unaffected.
    own = issue_certificate(rogue, "/DC=org/DC=rogue/CN=Carol", now=grid_pki.now)  # type: ignore[arg-type]
    assert (
        validate_chain(own.chain, trust, now=grid_pki.now).identity == "/DC=org/DC=rogue/CN=Carol"
    )
    validate_chain(grid_pki.user("alice").chain, trust, now=grid_pki.now)


def test_namespaces_file_alone_is_enforced_and_deny_wins(grid_pki: GridPki) -> None:
    rogue = make_ca(now=grid_pki.now, dn=ROGUE_DN)
    h = subject_hash(rogue.cert)
    files = {k: v for k, v in ca_files(rogue.cert).items() if k.endswith(".0")}
    files[f"{h}.namespaces"] = (
        f'TO Issuer "{ROGUE_DN}" PERMIT Subject "/DC=org/DC=rogue/.*"\n'
        'TO Issuer SELF DENY Subject "/DC=org/DC=rogue/CN=Admin.*"\n'
    ).encode()
    trust = TrustStore.from_files(files)
    ok = issue_certificate(rogue, "/DC=org/DC=rogue/CN=Carol", now=grid_pki.now)
    validate_chain(ok.chain, trust, now=grid_pki.now)
    for dn in ("/DC=org/DC=rogue/CN=Admin Eve", "/DC=org/DC=example/CN=Alice"):
        bad = issue_certificate(rogue, dn, now=grid_pki.now)
        err = _refusal(bad.chain, trust, grid_pki)
        assert err.reason == "namespace" and 'DENY "/DC=org/DC=rogue/CN=Admin.*"' in err.message


def test_ca_without_namespace_refused_unless_switched(grid_pki: GridPki) -> None:
    trust, rogue = _with_rogue(grid_pki, None)
    carol = issue_certificate(rogue, "/DC=org/DC=rogue/CN=Carol", now=grid_pki.now)  # type: ignore[arg-type]
    err = _refusal(carol.chain, trust, grid_pki)
    assert err.reason == "namespace" and "has no namespace" in err.message
    assert ROGUE_DN in err.message
    relaxed, rogue = _with_rogue(grid_pki, None, accept_unconstrained=True)
    carol = issue_certificate(rogue, "/DC=org/DC=rogue/CN=Carol", now=grid_pki.now)  # type: ignore[arg-type]
    validate_chain(carol.chain, relaxed, now=grid_pki.now)


def test_policy_naming_another_ca_does_not_count(grid_pki: GridPki) -> None:
    """Only statements for the CA the file (by hash) belongs to apply to it."""
    rogue = make_ca(now=grid_pki.now, dn=ROGUE_DN)
    h = subject_hash(rogue.cert)
    files = {k: v for k, v in ca_files(rogue.cert).items() if k.endswith(".0")}
    files[f"{h}.signing_policy"] = (
        b"access_id_CA X509 '/DC=org/DC=example/CN=Example Dev CA'\n"
        b"pos_rights globus CA:sign\ncond_subjects globus '\"/*\"'\n"
    )
    fake = issue_certificate(rogue, "/DC=org/DC=example/CN=Alice", now=grid_pki.now)
    assert _refusal(fake.chain, TrustStore.from_files(files), grid_pki).reason == "namespace"


def test_malformed_namespace_file_refuses_its_ca(grid_pki: GridPki) -> None:
    rogue = make_ca(now=grid_pki.now, dn=ROGUE_DN)
    files = ca_files(rogue.cert, ("/DC=org/DC=rogue/*",))
    h = subject_hash(rogue.cert)
    files[f"{h}.namespaces"] = b'TO Issuer SELF PERMIT Subject "/DC=org/(unclosed"\n'
    trust = TrustStore.from_files(files, accept_unconstrained=True)
    assert len(trust.problems) == 1 and trust.problems[0].startswith(f"{h}.namespaces:1:")
    carol = issue_certificate(rogue, "/DC=org/DC=rogue/CN=Carol", now=grid_pki.now)
    err = _refusal(carol.chain, trust, grid_pki)
    assert err.reason == "namespace" and f"{h}.namespaces:1" in err.message


def test_intermediate_ca_checked_against_the_root_and_its_own_namespace(grid_pki: GridPki) -> None:
    now = grid_pki.now
    root = make_ca(now=now, dn="/DC=org/DC=grid/CN=Root CA")
    sub_key_ca = make_ca(now=now, dn="/DC=org/DC=grid/CN=Sub CA")
    # Re-issue the sub CA under the root (same key, CA:true).
    sub_cert = (
        x509.CertificateBuilder()
        .subject_name(sub_key_ca.cert.subject)
        .issuer_name(root.cert.subject)
        .public_key(sub_key_ca.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(root.key, sub_key_ca.cert.signature_hash_algorithm)  # type: ignore[arg-type]
    )
    sub = type(root)(chain=(sub_cert, root.cert), key=sub_key_ca.key)
    user = issue_certificate(sub, "/DC=org/DC=grid/CN=Dave", now=now)
    chain = (user.cert, sub_cert)
    # Root may issue only /DC=org/DC=grid/CN=Other*; the sub CA is outside it.
    narrow = TrustStore.from_files(
        {
            **ca_files(root.cert, ("/DC=org/DC=grid/CN=Other*",)),
            **ca_files(sub_cert, ("/DC=org/DC=grid/*",)),
        }
    )
    err = _refusal(chain, narrow, grid_pki)
    assert err.reason == "namespace" and "Root CA" in err.message and "Sub CA" in err.message
    # The sub CA within the root's namespace, the user outside the sub CA's.
    wrong_user = TrustStore.from_files(
        {
            **ca_files(root.cert, ("/DC=org/DC=grid/*",)),
            **ca_files(sub_cert, ("/DC=org/DC=grid/CN=E*",)),
        }
    )
    err = _refusal(chain, wrong_user, grid_pki)
    assert err.reason == "namespace" and "may not issue /DC=org/DC=grid/CN=Dave" in err.message
    both = TrustStore.from_files(
        {
            **ca_files(root.cert, ("/DC=org/DC=grid/*",)),
            **ca_files(sub_cert, ("/DC=org/DC=grid/*",)),
        }
    )
    assert validate_chain(chain, both, now=now).identity == "/DC=org/DC=grid/CN=Dave"


def test_voms_signer_outside_its_ca_namespace_is_untrusted(grid_pki: GridPki) -> None:
    """A VOMS server certificate is CA-issued too: the namespace applies to it."""
    now = grid_pki.now
    pki = grid_pki.pki
    alice = grid_pki.user("alice")
    ext = make_ac_extension(
        alice.cert,
        pki.voms,
        vo="atlas",
        fqans=["/atlas"],
        uri="voms.example.org:15001",
        now=now,
        lifetime=timedelta(hours=1),
    )
    proxy = new_proxy(alice, now=now, lifetime=timedelta(hours=1), extra_extensions=[ext])
    vomsdir = VomsDir.from_files(pki.vomsdir())
    assert validate_chain(proxy.chain, grid_pki.trust, now=now, vomsdir=vomsdir).fqans
    files = dict(pki.ca_directory())
    files.update(
        {
            k: v
            for k, v in ca_files(pki.ca.cert, ("/DC=org/DC=example/CN=A*",)).items()
            if not k.endswith((".0", ".r0"))
        }
    )
    narrow = TrustStore.from_files(files)
    with pytest.raises(VomsError) as err:
        validate_chain(proxy.chain, narrow, now=now, vomsdir=vomsdir)
    assert "voms.example.org" in err.value.message and "namespace" in err.value.message


def test_igtf_style_files_parse() -> None:
    """The shape IGTF distributes: headers, leading blanks, alternations, unknown DN types."""
    namespaces = (
        "##############################################################\n"
        "#NAMESPACES-VERSION: 1.0\n#\n# CA alias    : example-medium\n#\n"
        'TO Issuer "/C=NL/O=Example/CN=Example medium-security CA" \\\n'
        '  PERMIT Subject "/O=dutchgrid/O=(users|hosts|robots)/.*"\n'
    )
    rules = parse_namespaces(namespaces, "1a2b3c4d.namespaces")[
        "/C=NL/O=Example/CN=Example medium-security CA"
    ]
    assert rules[0].matches("/O=dutchgrid/O=users/O=nikhef/CN=Some Body")
    assert not rules[0].matches("/O=dutchgrid/O=admins/CN=x")
    policy = (
        " # EACL\n access_id_CA      X509         '/C=NL/O=Example/unstructuredName=x'\n"
        " pos_rights        globus        CA:sign\n"
        " cond_subjects     globus       '\"/O=dutchgrid/*\"'\n"
    )
    assert list(parse_signing_policy(policy, "f")) == ["/C=NL/O=Example/unstructuredName=x"]
