"""Issue 13 with the Debian MyProxy clients: the gaps myproxy-test found, one by one.

The endpoint runs in-process (tests/broker/myproxy/support.py) over SQLite and over
PostgreSQL, with the policy ``broker policy import-myproxy-config`` makes from
Debian's sample policy #1 (no allow_self_authorization), plus a rule that needs a
job id for one credential name.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.devpki import policy_rule
from broker.myproxy.config_import import translate_config
from broker.store.crypto import is_owner_encrypted
from broker.store.repository import AuditRecord
from tests.broker.myproxy.support import ALICE_DN, PASSPHRASE, Endpoint, running_endpoint
from tests.interop.tools import need
from tests.pgcluster import PostgresCluster
from tests.pkifixtures import GridPki

pytestmark = pytest.mark.interop

SAMPLE_1 = """\
accepted_credentials       "*"
authorized_retrievers      "*"
default_retrievers         "*"
authorized_renewers        "*"
default_renewers           "none"
authorized_key_retrievers  "*"
default_key_retrievers     "none"
trusted_retrievers         "*"
default_trusted_retrievers "none"
"""

JOB_RULE = """
[[rule]]
name = "batch credentials need a job id"
action = "retrieve"
effect = "allow"
requester = ["/DC=org/DC=example/CN=pilot"]
auth = ["certificate"]
credential = ["batch*"]
require_job_id = true
"""


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def endpoint(
    request: pytest.FixtureRequest, grid_pki: GridPki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Endpoint]:
    need("myproxy-init")
    base = tmp_path_factory.mktemp("compat")
    policies = base / "imported"
    policies.mkdir()
    translation = translate_config(SAMPLE_1)
    assert not translation.unsupported
    (policies / "50-myproxy.toml").write_text(translation.toml + JOB_RULE)
    changes: dict[str, object] = {"policy_dir": str(policies), "passphrase_failures": 50}
    database = None
    if request.param == "postgres":
        cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
        database = f"t_{secrets.token_hex(6)}"
        changes["database_url"] = cluster.create_database(database)
    try:
        with running_endpoint(base, grid_pki, **changes) as ep:
            try:
                yield ep
            finally:
                # aggregated refusal rows now, not at exit when the database is gone
                ep.service.flush_refusals()
    finally:
        if database is not None:
            cluster.drop_database(database)


def mp(
    ep: Endpoint, argv: list[str], who: str | None, *, stdin: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    need(argv[0])
    return subprocess.run(
        argv,
        env=ep.client_env(who, **env),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def refused(result: subprocess.CompletedProcess[str], *wording: str) -> str:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    for text in wording:
        assert text in output, output
    return output


def audit(ep: Endpoint, **match: object) -> list[AuditRecord]:
    events = ep.service.store.query_audit(limit=1000)
    return [e for e in events if all(getattr(e, k) == v for k, v in match.items())]


def alice_proxy(ep: Endpoint, path: Path, *extra: str) -> Path:
    ok(mp(ep, ["grid-proxy-init", "-q", "-rfc", "-hours", "6", *extra, "-out", str(path)], "alice"))
    return path


# --------------------------------------------------------------------------- usernames


def test_dn_as_username_myproxy_init_d(endpoint: Endpoint, tmp_path: Path) -> None:
    ok(
        mp(
            endpoint,
            ["myproxy-init", "-d", "-k", "dn", "-c", "2", "-t", "1", "-S"],
            "alice",
            stdin=PASSPHRASE + "\n",
        )
    )
    info = ok(mp(endpoint, ["myproxy-info", "-d"], "alice"))
    assert f"username: {ALICE_DN}" in info
    out = tmp_path / "p.pem"
    ok(
        mp(
            endpoint,
            ["myproxy-logon", "-S", "-l", ALICE_DN, "-k", "dn", "-o", str(out)],
            None,
            stdin=PASSPHRASE + "\n",
        )
    )
    assert out.exists()


def test_dn_username_under_dn_binding(grid_pki: GridPki, tmp_path: Path) -> None:
    with running_endpoint(tmp_path, grid_pki, username_binding="dn") as ep:
        ok(
            mp(
                ep,
                ["myproxy-init", "-d", "-c", "2", "-t", "1", "-S"],
                "alice",
                stdin=PASSPHRASE + "\n",
            )
        )
        ok(
            mp(
                ep,
                ["myproxy-init", "-l", "alice", "-c", "2", "-t", "1", "-S"],
                "alice",
                stdin=PASSPHRASE + "\n",
            )
        )
        # someone else's DN is not the requester's to use
        refused(
            mp(
                ep,
                ["myproxy-init", "-l", ALICE_DN, "-k", "b", "-c", "2", "-t", "1", "-S"],
                "bob",
                stdin=PASSPHRASE + "\n",
            ),
            "binds usernames to identities",
        )


def test_long_username_as_the_reference_accepts(endpoint: Endpoint, tmp_path: Path) -> None:
    user = "alice." + "x" * 1165  # 1,171 characters, as in myproxy-test
    ok(
        mp(
            endpoint,
            ["myproxy-init", "-l", user, "-c", "2", "-t", "1", "-S"],
            "alice",
            stdin=PASSPHRASE + "\n",
        )
    )
    out = tmp_path / "p.pem"
    ok(
        mp(
            endpoint,
            ["myproxy-logon", "-S", "-l", user, "-o", str(out)],
            None,
            stdin=PASSPHRASE + "\n",
        )
    )
    too_long = "y" * 1501
    refused(
        mp(
            endpoint,
            ["myproxy-init", "-l", too_long, "-c", "2", "-t", "1", "-S"],
            "alice",
            stdin=PASSPHRASE + "\n",
        ),
        "the username is 1501 bytes long",
    )


def test_username_with_escape_is_refused(endpoint: Endpoint) -> None:
    refused(
        mp(
            endpoint,
            ["myproxy-init", "-l", "al\x1bice", "-c", "2", "-t", "1", "-S"],
            "alice",
            stdin=PASSPHRASE + "\n",
        ),
        "U+001B",
        "not allowed",
    )


# --------------------------------------------------------------------------- STORE / RETRIEVE


def _encrypted_key(tmp_path: Path, source: Path, *, legacy: bool) -> Path:
    out = tmp_path / "enc.key"
    argv = ["openssl", "rsa", "-des3", "-passout", "stdin", "-in", str(source), "-out", str(out)]
    if legacy:
        argv.insert(2, "-traditional")
    made = subprocess.run(argv, input=PASSPHRASE + "\n", capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    return out


@pytest.mark.parametrize("legacy", [False, True], ids=["pkcs8", "proc-type"])
def test_store_encrypted_key_then_logon(endpoint: Endpoint, tmp_path: Path, legacy: bool) -> None:
    proxy = alice_proxy(endpoint, tmp_path / "proxy.pem")
    key = _encrypted_key(tmp_path, proxy, legacy=legacy)
    name = f"enc-{'legacy' if legacy else 'p8'}"
    ok(
        mp(
            endpoint,
            [
                "myproxy-store",
                "-l",
                "u-store",
                "-k",
                name,
                "-c",
                str(proxy),
                "-y",
                str(key),
                "-t",
                "1",
            ],
            "alice",
        )
    )
    # the stored key is still under the owner's passphrase: a wrong one gets nothing
    refused(
        mp(
            endpoint,
            ["myproxy-logon", "-S", "-l", "u-store", "-k", name, "-o", str(tmp_path / "x.pem")],
            None,
            stdin="wrong-passphrase\n",
        ),
        "Bad password",
    )
    out = tmp_path / "p.pem"
    ok(
        mp(
            endpoint,
            ["myproxy-logon", "-S", "-l", "u-store", "-k", name, "-o", str(out)],
            None,
            stdin=PASSPHRASE + "\n",
        )
    )
    described = ok(mp(endpoint, ["grid-proxy-info", "-all", "-file", str(out)], None))
    assert f"identity : {ALICE_DN}" in described
    # once the passphrase proved right, the key is sealed again under the scrypt layer
    record = endpoint.service.store.get_credential("u-store", name)
    assert record.passphrase_protected and not is_owner_encrypted(record.envelope)
    ok(
        mp(
            endpoint,
            ["myproxy-logon", "-S", "-l", "u-store", "-k", name, "-o", str(tmp_path / "p1.pem")],
            None,
            stdin=PASSPHRASE + "\n",
        )
    )
    # the passphrase can be changed like any other
    ok(
        mp(
            endpoint,
            ["myproxy-change-pass-phrase", "-S", "-l", "u-store", "-k", name],
            "alice",
            stdin=f"{PASSPHRASE}\nnew-passphrase-2\n",
        )
    )
    ok(
        mp(
            endpoint,
            ["myproxy-logon", "-S", "-l", "u-store", "-k", name, "-o", str(tmp_path / "p2.pem")],
            None,
            stdin="new-passphrase-2\n",
        )
    )


def test_key_retrieval_needs_the_owner_list(endpoint: Endpoint, tmp_path: Path) -> None:
    proxy = alice_proxy(endpoint, tmp_path / "proxy.pem")
    key = _encrypted_key(tmp_path, proxy, legacy=False)
    ok(
        mp(
            endpoint,
            [
                "myproxy-store",
                "-l",
                "u-key",
                "-k",
                "mine",
                "-x",
                "-E",
                ALICE_DN,
                "-c",
                str(proxy),
                "-y",
                str(key),
                "-t",
                "1",
            ],
            "alice",
        )
    )
    ok(
        mp(
            endpoint,
            [
                "myproxy-store",
                "-l",
                "u-key",
                "-k",
                "nobody",
                "-E",
                "nobody",
                "-c",
                str(proxy),
                "-y",
                str(key),
                "-t",
                "1",
            ],
            "alice",
        )
    )
    info = ok(mp(endpoint, ["myproxy-info", "-l", "u-key"], "alice"))
    assert f"key retrieval policy: {ALICE_DN}" in info
    cert, out_key = tmp_path / "c.pem", tmp_path / "k.pem"
    ok(
        mp(
            endpoint,
            [
                "myproxy-retrieve",
                "-S",
                "-l",
                "u-key",
                "-k",
                "mine",
                "-c",
                str(cert),
                "-y",
                str(out_key),
            ],
            "alice",
            stdin=PASSPHRASE + "\n",
        )
    )
    # the key (sent encrypted under the passphrase; the client run as root decrypts it)
    # is private and matches the certificate
    assert out_key.stat().st_mode & 0o077 == 0
    verified = subprocess.run(
        [
            "grid-proxy-init",
            "-verify",
            "-pwstdin",
            "-cert",
            str(cert),
            "-key",
            str(out_key),
            "-out",
            str(tmp_path / "check.pem"),
        ],
        env=endpoint.client_env(None),
        input=PASSPHRASE + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert audit(endpoint, action="retrieve-key", decision="allow", credential_name="mine")
    refused(
        mp(
            endpoint,
            [
                "myproxy-retrieve",
                "-S",
                "-l",
                "u-key",
                "-k",
                "nobody",
                "-c",
                str(tmp_path / "c2.pem"),
                "-y",
                str(tmp_path / "k2.pem"),
            ],
            "alice",
            stdin=PASSPHRASE + "\n",
        ),
        "Bad password",
    )
    assert not (tmp_path / "k2.pem").exists()
    denied = audit(endpoint, action="retrieve-key", decision="deny", credential_name="nobody")
    assert denied and denied[0].reason and "owner_policy" in denied[0].reason


# --------------------------------------------------------------------------- refusal reasons


def test_self_authorization_refused_in_reference_wording(
    endpoint: Endpoint, tmp_path: Path
) -> None:
    ok(
        mp(
            endpoint,
            ["myproxy-init", "-l", "u-self", "-x", "-R", ALICE_DN, "-c", "2", "-t", "1", "-n"],
            "alice",
        )
    )
    old = alice_proxy(endpoint, tmp_path / "old.pem")
    result = mp(
        endpoint,
        ["myproxy-logon", "-n", "-a", str(old), "-l", "u-self", "-o", str(tmp_path / "x.pem")],
        "alice",
    )
    refused(result, "self-authz not allowed for renewer")
    rows = audit(endpoint, action="retrieve", decision="deny", username="u-self")
    assert rows and rows[0].reason and "self-authz not allowed for renewer" in rows[0].reason


def test_job_id_reason_reaches_wire_and_audit(grid_pki: GridPki, tmp_path: Path) -> None:
    policies = tmp_path / "job-policies"
    policies.mkdir()
    (policies / "10.toml").write_text(
        policy_rule("owners", ["delegate", "info", "destroy"], ["self"]) + JOB_RULE
    )
    with running_endpoint(tmp_path, grid_pki, policy_dir=str(policies)) as ep:
        ok(
            mp(
                ep,
                [
                    "myproxy-init",
                    "-l",
                    "u-job",
                    "-k",
                    "batch1",
                    "-x",
                    "-Z",
                    "/DC=org/DC=example/CN=pilot",
                    "-c",
                    "2",
                    "-t",
                    "1",
                    "-n",
                ],
                "alice",
            )
        )
        result = mp(
            ep,
            ["myproxy-logon", "-n", "-l", "u-job", "-k", "batch1", "-o", str(tmp_path / "x.pem")],
            "pilot",
        )
        refused(result, "a job id is required", "batch credentials need a job id")
        rows = audit(ep, action="retrieve", decision="deny", username="u-job")
        assert rows and rows[0].reason and rows[0].reason.startswith("job_id_required")
        # a party with no right at all still learns nothing
        refused(
            mp(
                ep,
                [
                    "myproxy-logon",
                    "-n",
                    "-l",
                    "u-job",
                    "-k",
                    "batch1",
                    "-o",
                    str(tmp_path / "y.pem"),
                ],
                "bob",
            ),
            "no passphrase",
            "authentication failed",
        )


def test_logon_n_leaves_no_error_row(endpoint: Endpoint) -> None:
    ok(
        mp(
            endpoint,
            ["myproxy-init", "-l", "u-nflag", "-c", "2", "-t", "1", "-S"],
            "alice",
            stdin=PASSPHRASE + "\n",
        )
    )
    ok(mp(endpoint, ["myproxy-logon", "-N", "-S", "-l", "u-nflag"], None, stdin=PASSPHRASE + "\n"))
    assert not audit(endpoint, username="u-nflag", decision="error")
    rows = audit(endpoint, username="u-nflag", action="retrieve", decision="allow")
    assert rows and rows[0].reason and "-N" in rows[0].reason


# --------------------------------------------------------------------------- independent proxies


def test_independent_proxy_is_not_its_issuer(endpoint: Endpoint, tmp_path: Path) -> None:
    ok(
        mp(
            endpoint,
            ["myproxy-init", "-l", "u-indep", "-c", "2", "-t", "1", "-S"],
            "alice",
            stdin=PASSPHRASE + "\n",
        )
    )
    iproxy = alice_proxy(endpoint, tmp_path / "iproxy.pem", "-independent")
    as_iproxy = {
        "X509_USER_PROXY": str(iproxy),
        "X509_USER_CERT": str(iproxy),
        "X509_USER_KEY": str(iproxy),
    }
    refused(
        mp(endpoint, ["myproxy-info", "-l", "u-indep"], "alice", **as_iproxy),
        "no credentials found for user u-indep",
    )
    refused(mp(endpoint, ["myproxy-destroy", "-l", "u-indep"], "alice", **as_iproxy))
    assert "username: u-indep" in ok(mp(endpoint, ["myproxy-info", "-l", "u-indep"], "alice"))
    rows = audit(endpoint, username="u-indep", action="destroy")
    assert rows and all(r.requester_dn != ALICE_DN for r in rows)
