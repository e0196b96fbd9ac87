"""The real Debian MyProxy clients (and PyPI MyProxyClient) against our MyProxy endpoint.

The endpoint runs in-process over a BrokerService with a temporary state dir and
the site policy of tests/broker/myproxy/support.py. Every client runs with
``MYPROXY_SERVER_DN`` set, ``-o`` for output, and no X509_USER_* leftovers for
anonymous calls (as root the clients would otherwise pick up host or /tmp
credentials). Each test uses its own username, so tests do not depend on order.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.broker.myproxy.support import (
    ALICE_DN,
    HOST_DN,
    PASSPHRASE,
    PILOT_DN,
    Endpoint,
    running_endpoint,
    write_policy,
)
from tests.interop.tools import need
from tests.pkifixtures import GridPki

pytestmark = pytest.mark.interop

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def endpoint(grid_pki: GridPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    need("myproxy-init")
    with running_endpoint(tmp_path_factory.mktemp("myproxy"), grid_pki) as ep:
        yield ep


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
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def refused(result: subprocess.CompletedProcess[str], *wording: str) -> str:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    for text in wording:
        assert text in output, output
    return output


def init(
    ep: Endpoint, user: str, *args: str, passphrase: str | None = PASSPHRASE, who: str = "alice"
) -> str:
    argv = ["myproxy-init", "-l", user, "-c", "24", "-t", "2", *args]
    if passphrase is None:
        return ok(mp(ep, [*argv, "-n"], who))
    return ok(mp(ep, [*argv, "-S"], who, stdin=passphrase + "\n"))


def proxy_info(ep: Endpoint, path: Path) -> str:
    return ok(mp(ep, ["grid-proxy-info", "-all", "-file", str(path)], None))


# --------------------------------------------------------------------------- store + logon


def test_init_info_logon_with_passphrase(endpoint: Endpoint, tmp_path: Path) -> None:
    assert "now exists on localhost" in init(endpoint, "u-plain")
    info = ok(mp(endpoint, ["myproxy-info", "-l", "u-plain"], "alice"))
    assert f"owner: {ALICE_DN}" in info and "timeleft: 2" in info  # ~24h left
    out = tmp_path / "p.pem"
    text = ok(
        mp(
            endpoint,
            ["myproxy-logon", "-S", "-l", "u-plain", "-t", "1", "-o", str(out)],
            None,
            stdin=PASSPHRASE + "\n",
        )
    )
    assert "A credential has been received for user u-plain" in text
    assert out.stat().st_mode & 0o077 == 0
    described = proxy_info(endpoint, out)
    assert f"identity : {ALICE_DN}" in described
    assert "RFC 3820 compliant impersonation proxy" in described
    hours, minutes = described.split("timeleft : ")[1].split(":")[:2]
    assert (int(hours), int(minutes)) <= (1, 0)


def test_lifetime_is_capped_by_stored_t(endpoint: Endpoint, tmp_path: Path) -> None:
    init(endpoint, "u-life")  # -t 2
    out = tmp_path / "p.pem"
    ok(
        mp(
            endpoint,
            ["myproxy-logon", "-S", "-l", "u-life", "-t", "12", "-o", str(out)],
            None,
            stdin=PASSPHRASE + "\n",
        )
    )
    left = proxy_info(endpoint, out).split("timeleft : ")[1].split(":")
    assert int(left[0]) < 2 or (int(left[0]) == 2 and int(left[1]) == 0)


def test_wrong_passphrase_is_refused_with_reference_wording(
    endpoint: Endpoint, tmp_path: Path
) -> None:
    init(endpoint, "u-wrong")
    result = mp(
        endpoint,
        ["myproxy-logon", "-S", "-l", "u-wrong", "-o", str(tmp_path / "x")],
        None,
        stdin="not-the-passphrase\n",
    )
    refused(result, "ERROR from myproxy-server", "Bad password", "invalid credential passphrase")
    assert not (tmp_path / "x").exists()


def test_named_credentials_and_info(endpoint: Endpoint, tmp_path: Path) -> None:
    init(endpoint, "u-named")
    init(endpoint, "u-named", "-k", "second", "-K", "for the pipeline")
    info = ok(mp(endpoint, ["myproxy-info", "-l", "u-named"], "alice"))
    assert "name: second" in info and "description: for the pipeline" in info
    out = tmp_path / "p.pem"
    ok(
        mp(
            endpoint,
            ["myproxy-logon", "-S", "-l", "u-named", "-k", "second", "-o", str(out)],
            None,
            stdin=PASSPHRASE + "\n",
        )
    )
    assert out.exists()


def test_info_by_someone_else(endpoint: Endpoint) -> None:
    init(endpoint, "u-info")
    refused(
        mp(endpoint, ["myproxy-info", "-l", "u-info"], "bob"),
        'no credentials found for user u-info, owner "/DC=org/DC=example/CN=Bob"',
    )


def test_stored_credential_proxy_file_c_t(endpoint: Endpoint, tmp_path: Path) -> None:
    # -C/-y: store an existing proxy instead of the user certificate.
    proxy = tmp_path / "alice_proxy.pem"
    ok(mp(endpoint, ["grid-proxy-init", "-q", "-rfc", "-hours", "6", "-out", str(proxy)], "alice"))
    init(endpoint, "u-cy", "-C", str(proxy), "-y", str(proxy))
    info = ok(mp(endpoint, ["myproxy-info", "-l", "u-cy"], "alice"))
    assert "timeleft: 5:" in info or "timeleft: 6:" in info


# --------------------------------------------------------------------------- pilots


def test_trusted_retrieval_regex_mode(endpoint: Endpoint, tmp_path: Path) -> None:
    init(endpoint, "u-pilot", "-x", "-Z", PILOT_DN)
    info = ok(mp(endpoint, ["myproxy-info", "-l", "u-pilot"], "alice"))
    assert f"trusted retrieval policy: {PILOT_DN}" in info
    out = tmp_path / "p.pem"
    ok(mp(endpoint, ["myproxy-logon", "-n", "-l", "u-pilot", "-o", str(out)], "pilot"))
    assert f"identity : {ALICE_DN}" in proxy_info(endpoint, out)


def test_trusted_retrieval_cn_mode_without_passphrase(endpoint: Endpoint, tmp_path: Path) -> None:
    init(endpoint, "u-cn", "-Z", "pilot", passphrase=None)
    info = ok(mp(endpoint, ["myproxy-info", "-l", "u-cn"], "alice"))
    assert "trusted retrieval policy: */CN=pilot" in info
    ok(mp(endpoint, ["myproxy-logon", "-n", "-l", "u-cn", "-o", str(tmp_path / "p.pem")], "pilot"))
    # Stored without a passphrase: a passphrase must not open it (and the answer is that of
    # a wrong passphrase, so it does not tell the credential has none).
    refused(
        mp(
            endpoint,
            ["myproxy-logon", "-S", "-l", "u-cn", "-o", str(tmp_path / "x")],
            None,
            stdin="whatever-passphrase\n",
        ),
        "Bad password",
    )


def test_unauthorized_pilots_are_refused(endpoint: Endpoint, tmp_path: Path) -> None:
    init(endpoint, "u-deny", "-x", "-Z", PILOT_DN)
    init(endpoint, "u-noz")
    out = str(tmp_path / "x.pem")
    # bob is not named in -Z (and no site rule lets him retrieve by certificate)
    refused(
        mp(endpoint, ["myproxy-logon", "-n", "-l", "u-deny", "-o", out], "bob"),
        "no passphrase",
        "authentication failed",
    )
    # pilot2 is named nowhere
    refused(
        mp(endpoint, ["myproxy-logon", "-n", "-l", "u-deny", "-o", out], "pilot2"),
        "no passphrase",
        "authentication failed",
    )
    # the pilot on a credential stored without -Z: no right, so not told it has a passphrase
    refused(
        mp(endpoint, ["myproxy-logon", "-n", "-l", "u-noz", "-o", out], "pilot"),
        "no passphrase",
        "authentication failed",
    )
    # nor that a credential exists at all
    refused(
        mp(endpoint, ["myproxy-logon", "-n", "-l", "u-never", "-o", out], "pilot"),
        "no passphrase",
        "authentication failed",
    )
    assert not Path(out).exists()


def test_renewal_with_old_proxy(endpoint: Endpoint, tmp_path: Path) -> None:
    init(endpoint, "u-renew", "-x", "-R", PILOT_DN, passphrase=None)
    info = ok(mp(endpoint, ["myproxy-info", "-l", "u-renew"], "alice"))
    assert f"renewal policy: {PILOT_DN}" in info
    old = tmp_path / "old.pem"
    ok(mp(endpoint, ["grid-proxy-init", "-q", "-rfc", "-out", str(old)], "alice"))
    out = tmp_path / "renewed.pem"
    ok(
        mp(
            endpoint,
            ["myproxy-logon", "-n", "-a", str(old), "-l", "u-renew", "-o", str(out)],
            "pilot",
        )
    )
    assert f"identity : {ALICE_DN}" in proxy_info(endpoint, out)
    refused(
        mp(endpoint, ["myproxy-logon", "-n", "-l", "u-renew", "-o", str(tmp_path / "x")], "pilot"),
        "No credentials for renewal authorization",
    )
    refused(
        mp(
            endpoint,
            ["myproxy-logon", "-n", "-a", str(old), "-l", "u-renew", "-o", str(tmp_path / "x")],
            "bob",
        ),
        "authentication failed",
    )
    # a proxy of someone else does not renew alice's credential
    bobs = tmp_path / "bob.pem"
    ok(mp(endpoint, ["grid-proxy-init", "-q", "-rfc", "-out", str(bobs)], "bob"))
    refused(
        mp(
            endpoint,
            ["myproxy-logon", "-n", "-a", str(bobs), "-l", "u-renew", "-o", str(tmp_path / "x")],
            "pilot",
        ),
        "renewal authentication failed",
    )


def test_limited_in_limited_out(endpoint: Endpoint, tmp_path: Path) -> None:
    init(endpoint, "u-lim", "-x", "-Z", PILOT_DN)
    limited = tmp_path / "pilot_limited.pem"
    ok(mp(endpoint, ["grid-proxy-init", "-q", "-rfc", "-limited", "-out", str(limited)], "pilot"))
    out = tmp_path / "p.pem"
    ok(
        mp(
            endpoint,
            ["myproxy-logon", "-n", "-l", "u-lim", "-o", str(out)],
            None,
            X509_USER_PROXY=str(limited),
            X509_USER_CERT="/nonexistent",
            X509_USER_KEY="/x",
        )
    )
    assert "limited proxy" in proxy_info(endpoint, out)


# --------------------------------------------------------------------------- manage


def test_destroy(endpoint: Endpoint, tmp_path: Path) -> None:
    init(endpoint, "u-destroy", "-k", "gone")
    # someone else's credential is answered as a missing one
    refused(
        mp(endpoint, ["myproxy-destroy", "-l", "u-destroy", "-k", "gone"], "bob"),
        'No credentials exist with username "u-destroy" and credential name "gone".',
    )
    text = ok(mp(endpoint, ["myproxy-destroy", "-l", "u-destroy", "-k", "gone"], "alice"))
    assert "was successfully removed" in text
    # a GET does not tell a missing credential from a wrong passphrase
    refused(
        mp(
            endpoint,
            ["myproxy-logon", "-S", "-l", "u-destroy", "-k", "gone", "-o", str(tmp_path / "x")],
            None,
            stdin=PASSPHRASE + "\n",
        ),
        "Bad password",
        "invalid credential passphrase",
    )
    refused(
        mp(endpoint, ["myproxy-destroy", "-l", "u-destroy", "-k", "gone"], "alice"),
        'No credentials exist with username "u-destroy" and credential name "gone".',
    )


def test_change_passphrase(endpoint: Endpoint, tmp_path: Path) -> None:
    init(endpoint, "u-chpass")
    refused(
        mp(
            endpoint,
            ["myproxy-change-pass-phrase", "-S", "-l", "u-chpass"],
            "alice",
            stdin="wrong-old-pass\nnewpass22\n",
        ),
        "invalid credential passphrase",
    )
    ok(
        mp(
            endpoint,
            ["myproxy-change-pass-phrase", "-S", "-l", "u-chpass"],
            "alice",
            stdin=f"{PASSPHRASE}\nnewpass22\n",
        )
    )
    refused(
        mp(
            endpoint,
            ["myproxy-logon", "-S", "-l", "u-chpass", "-o", str(tmp_path / "x")],
            None,
            stdin=PASSPHRASE + "\n",
        ),
        "Bad password",
    )
    ok(
        mp(
            endpoint,
            ["myproxy-logon", "-S", "-l", "u-chpass", "-o", str(tmp_path / "p.pem")],
            None,
            stdin="newpass22\n",
        )
    )


def test_get_trustroots_bootstrap(endpoint: Endpoint, tmp_path: Path) -> None:
    target = tmp_path / "trust"
    target.mkdir()
    text = ok(mp(endpoint, ["myproxy-get-trustroots", "-b"], None, X509_CERT_DIR=str(target)))
    assert f"New trusted MyProxy server: {HOST_DN}" in text
    names = {p.name for p in target.iterdir()}
    assert {n for n in names if n.endswith(".0")} == {
        p.name for p in endpoint.pki.ca_dir.iterdir() if p.name.endswith(".0")
    }
    assert any(n.endswith(".signing_policy") for n in names)
    # the bootstrapped directory is good enough for a logon
    init(endpoint, "u-trust")
    ok(
        mp(
            endpoint,
            ["myproxy-logon", "-S", "-l", "u-trust", "-o", str(tmp_path / "p.pem")],
            None,
            stdin=PASSPHRASE + "\n",
            X509_CERT_DIR=str(target),
        )
    )


def test_logon_with_trustroots_t(endpoint: Endpoint, tmp_path: Path) -> None:
    init(endpoint, "u-t")
    trust = tmp_path / "t"
    trust.mkdir()
    shutil.copytree(endpoint.pki.ca_dir, trust, dirs_exist_ok=True)
    ok(
        mp(
            endpoint,
            ["myproxy-logon", "-T", "-S", "-l", "u-t", "-o", str(tmp_path / "p.pem")],
            None,
            stdin=PASSPHRASE + "\n",
            X509_CERT_DIR=str(trust),
        )
    )


def test_tls12_cap(grid_pki: GridPki, tmp_path: Path) -> None:
    with running_endpoint(tmp_path, grid_pki, max_tls="1.2") as ep:
        init(ep, "u-tls12")
        ok(
            mp(
                ep,
                ["myproxy-logon", "-S", "-l", "u-tls12", "-o", str(tmp_path / "p.pem")],
                None,
                stdin=PASSPHRASE + "\n",
            )
        )


# --------------------------------------------------------------------------- PyPI MyProxyClient

MPC_SCRIPT = r"""
import json, os, sys
from myproxy.client import MyProxyClient
host, port, cadir, user, passphrase, credname, cert, key, out = sys.argv[1:10]
client = MyProxyClient(hostname=host, port=int(port), caCertDir=cadir)
kw = {"sslCertFile": cert, "sslKeyFile": key} if cert else {}
if credname:
    kw["credname"] = credname
creds = client.logon(user, passphrase, lifetime=3600, nBitsForKey=2048, **kw)
fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
with os.fdopen(fd, "wb") as f:
    f.write(b"".join(creds))
print(json.dumps({"blocks": len(creds)}))
"""


def _mpc_python() -> Path:
    """A venv with MyProxyClient and pyOpenSSL<24.3 (newer ones lack crypto.X509Req)."""
    cache = Path(os.environ.get("BROKER_TEST_CACHE") or Path.home() / ".cache" / "broker-tests")
    venv = cache / "myproxyclient-venv"
    python = venv / "bin" / "python"
    marker = venv / ".ready"
    if not marker.exists():
        shutil.rmtree(venv, ignore_errors=True)
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "MyProxyClient", "pyOpenSSL<24.3"],
            check=True,
            timeout=600,
        )
        marker.write_text("ok\n")
    return python


def test_pypi_myproxyclient_logon(endpoint: Endpoint, tmp_path: Path) -> None:
    python = _mpc_python()
    init(endpoint, "u-mpc")
    init(endpoint, "u-mpc", "-k", "pilotjob", "-x", "-Z", PILOT_DN)
    env = {**os.environ, "MYPROXY_SERVER_DN": HOST_DN}
    script = tmp_path / "mpc.py"
    script.write_text(MPC_SCRIPT)
    base = [str(python), str(script), "localhost", str(endpoint.port), str(endpoint.pki.ca_dir)]
    runs = {
        "passphrase": ["u-mpc", PASSPHRASE, "", "", ""],
        # MyProxyClient sends USERNAME=user-credname for a named credential
        "pilot": [
            "u-mpc",
            "",
            "pilotjob",
            str(endpoint.pki.cert_path("pilot")),
            str(endpoint.pki.key_path("pilot")),
        ],
    }
    for label, args in runs.items():
        out = tmp_path / f"{label}.pem"
        result = subprocess.run(
            [*base, *args, str(out)], env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"{label}: {result.stdout}{result.stderr}"
        assert json.loads(result.stdout.strip().splitlines()[-1])["blocks"] >= 3
        assert f"identity : {ALICE_DN}" in proxy_info(endpoint, out)


# --------------------------------------------------------------------------- REST <-> MyProxy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"broker serve exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on port {port}")


@pytest.fixture
def broker_serve(grid_pki: GridPki, tmp_path: Path) -> Iterator[tuple[int, int]]:
    rest, wire = _free_port(), _free_port()
    policies = write_policy(tmp_path / "policies")
    bindir = Path(sys.executable).parent
    proc = subprocess.Popen(
        [
            str(bindir / "broker"),
            "serve",
            "--state-dir",
            str(tmp_path / "state"),
            "--policy-dir",
            str(policies),
            "--bind",
            f"127.0.0.1:{rest}",
            "--myproxy-bind",
            f"127.0.0.1:{wire}",
            "--host-cert",
            str(grid_pki.root / "host.pem"),
            "--host-key",
            str(grid_pki.root / "host.key"),
            "--ca-dir",
            str(grid_pki.ca_dir),
            "--vomsdir",
            str(grid_pki.vomsdir),
            "--workers",
            "1",
            "--username-binding",
            "none",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "serve.log", "wb"),
    )
    try:
        _wait_port(rest, proc)
        _wait_port(wire, proc)
        yield rest, wire
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_rest_and_myproxy_share_the_store(
    broker_serve: tuple[int, int], grid_pki: GridPki, tmp_path: Path
) -> None:
    rest, wire = broker_serve
    bindir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("X509_USER")}
    env["X509_CERT_DIR"] = str(grid_pki.ca_dir)
    alice = ["--cert", str(grid_pki.cert_path("alice")), "--key", str(grid_pki.key_path("alice"))]
    # REST delegation with a passphrase -> anonymous myproxy-logon
    result = subprocess.run(
        [str(bindir / "broker-init"), "-s", f"localhost:{rest}", *alice, "-l", "xalice", "-S"],
        env=env,
        input=PASSPHRASE + "\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    ep = Endpoint("127.0.0.1", wire, None, None, grid_pki)  # type: ignore[arg-type]
    out = tmp_path / "from_rest.pem"
    ok(
        mp(
            ep,
            ["myproxy-logon", "-S", "-l", "xalice", "-o", str(out)],
            None,
            stdin=PASSPHRASE + "\n",
        )
    )
    assert f"identity : {ALICE_DN}" in proxy_info(ep, out)
    # myproxy-init -> broker-logon with the passphrase
    init(ep, "yalice")
    out2 = tmp_path / "from_myproxy.pem"
    result = subprocess.run(
        [
            str(bindir / "broker-logon"),
            "-s",
            f"localhost:{rest}",
            *alice,
            "-l",
            "yalice",
            "-S",
            "-o",
            str(out2),
        ],
        env=env,
        input=PASSPHRASE + "\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"identity : {ALICE_DN}" in proxy_info(ep, out2)
