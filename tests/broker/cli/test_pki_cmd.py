"""``broker dev-pki``, ``broker proxy-init`` and ``broker proxy-info`` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BROKER = str(Path(sys.executable).parent / "broker")


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BROKER, *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clipki") / "pki"
    result = _run("dev-pki", str(root))
    assert result.returncode == 0, result.stderr
    return root


def _env(pki: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("X509_")}
    return {
        **env,
        "X509_CERT_DIR": str(pki / "certificates"),
        "X509_VOMS_DIR": str(pki / "vomsdir"),
    }


def test_dev_pki_layout_and_permissions(pki: Path) -> None:
    manifest = json.loads((pki / "manifest.json").read_text())
    assert manifest["users"]["alice"]["dn"] == "/DC=org/DC=example/CN=Alice"
    for name in ("ca", "host", "voms", "alice", "bob", "pilot"):
        assert (pki / f"{name}.key").stat().st_mode & 0o777 == 0o600
    names = sorted(p.name for p in (pki / "certificates").iterdir())
    assert [n.split(".")[1] for n in names] == ["0", "namespaces", "r0", "signing_policy"]
    assert (pki / "vomsdir" / "atlas" / "voms.example.org.lsc").read_text().splitlines() == [
        "/DC=org/DC=example/CN=voms.example.org",
        "/DC=org/DC=example/CN=Example Dev CA",
    ]
    again = _run("dev-pki", str(pki))
    assert again.returncode == 1 and "already holds a dev PKI" in again.stderr


def test_proxy_init_and_info_json(pki: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.pem"
    made = _run(
        "proxy-init",
        "--cert",
        str(pki / "alice.pem"),
        "--key",
        str(pki / "alice.key"),
        "--out",
        str(out),
        "--hours",
        "3",
        "--limited",
        "--path-length",
        "2",
        "--voms",
        "atlas:/atlas/Role=production",
        "--voms-cert",
        str(pki / "voms.pem"),
        "--voms-key",
        str(pki / "voms.key"),
        env=_env(pki),
    )
    assert made.returncode == 0, made.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    info = _run("proxy-info", str(out), "--json", env=_env(pki))
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["identity"] == "/DC=org/DC=example/CN=Alice"
    assert data["type"] == "RFC 3820 limited proxy"
    assert data["path_length"] == 2
    assert data["fqans"] == ["/atlas/Role=production/Capability=NULL"]
    assert 2 * 3600 < data["timeleft"] <= 3 * 3600
    # the default file comes from X509_USER_PROXY
    env = {**_env(pki), "X509_USER_PROXY": str(out)}
    text = _run("proxy-info", env=env)
    assert text.returncode == 0 and "identity : /DC=org/DC=example/CN=Alice" in text.stdout


def test_proxy_info_refuses_with_reason(pki: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.pem"
    assert (
        _run(
            "proxy-init",
            "--cert",
            str(pki / "bob.pem"),
            "--key",
            str(pki / "bob.key"),
            "--out",
            str(out),
            env=_env(pki),
        ).returncode
        == 0
    )
    # an empty vomsdir is fine for a proxy without ACs, a wrong CA dir is not
    wrong = tmp_path / "emptyca"
    wrong.mkdir()
    result = _run("proxy-info", str(out), "--ca-dir", str(wrong), env=_env(pki))
    assert result.returncode == 1
    assert "holds no CA certificates" in result.stderr
    other = tmp_path / "other"
    assert _run("dev-pki", str(other)).returncode == 0
    result = _run("proxy-info", str(out), "--ca-dir", str(other / "certificates"), env=_env(pki))
    assert result.returncode == 1
    assert "CA directory" in result.stderr and "Traceback" not in result.stderr
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a proxy")
    result = _run("proxy-info", str(garbage), env=_env(pki))
    assert result.returncode == 1 and "CERTIFICATE" in result.stderr


def test_forged_voms_ac_rejected_by_proxy_info(pki: Path, tmp_path: Path) -> None:
    # an AC signed by bob's key posing as the VOMS server: proxy-info must refuse it
    out = tmp_path / "forged.pem"
    made = _run(
        "proxy-init",
        "--cert",
        str(pki / "alice.pem"),
        "--key",
        str(pki / "alice.key"),
        "--out",
        str(out),
        "--voms",
        "atlas:/atlas",
        "--voms-cert",
        str(pki / "bob.pem"),
        "--voms-key",
        str(pki / "bob.key"),
        env=_env(pki),
    )
    assert made.returncode == 0, made.stderr
    result = _run("proxy-info", str(out), env=_env(pki))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and result.stderr.startswith("error:")


def test_proxy_info_shows_the_job_a_proxy_was_issued_for(pki: Path, tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from broker.pki.loading import Credential, credential_to_pem, load_cert_and_key
    from broker.pki.proxy import generate_key, make_csr, sign_request

    alice = load_cert_and_key((pki / "alice.pem").read_bytes(), (pki / "alice.key").read_bytes())
    key = generate_key("ec")
    job = "submit.example.org#7.0#1700000000"
    chain = sign_request(
        alice, make_csr(key), now=datetime.now(UTC), lifetime=timedelta(hours=1), job_id=job
    )
    out = tmp_path / "job.pem"
    out.write_bytes(credential_to_pem(Credential(chain=chain, key=key)))
    out.chmod(0o600)
    data = json.loads(_run("proxy-info", str(out), "--json", env=_env(pki)).stdout)
    assert data["job_id"] == job
    text = _run("proxy-info", str(out), env=_env(pki)).stdout
    assert f"job id   : {job}" in text
    # a proxy made by hand names no job
    plain = tmp_path / "plain.pem"
    made = _run(
        "proxy-init",
        "--cert",
        str(pki / "alice.pem"),
        "--key",
        str(pki / "alice.key"),
        "--out",
        str(plain),
        env=_env(pki),
    )
    assert made.returncode == 0, made.stderr
    assert (
        json.loads(_run("proxy-info", str(plain), "--json", env=_env(pki)).stdout)["job_id"] is None
    )
