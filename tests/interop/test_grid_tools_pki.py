"""Our proxies against the real grid tools, and theirs against our validator."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.errors import ChainError
from broker.pki.chain import validate_chain
from broker.pki.loading import load_certificates
from broker.pki.proxy import ProxyType, generate_key, new_proxy
from broker.pki.voms import make_ac_extension
from tests.interop.tools import run
from tests.pkifixtures import GridPki, write_proxy_file

pytestmark = pytest.mark.interop


def _chain_of(grid_pki: GridPki, kind: str):  # type: ignore[no-untyped-def]
    now = grid_pki.now
    alice = grid_pki.user("alice")
    if kind == "plain":
        return new_proxy(alice, now=now, lifetime=timedelta(hours=6))
    if kind == "limited":
        return new_proxy(alice, now=now, lifetime=timedelta(hours=6), proxy_type=ProxyType.LIMITED)
    if kind == "ec":
        return new_proxy(alice, now=now, lifetime=timedelta(hours=6), key=generate_key("ec"))
    if kind == "voms":
        ac = make_ac_extension(
            alice.cert,
            grid_pki.pki.voms,
            vo="atlas",
            fqans=["/atlas/Role=production"],
            uri="voms.example.org:15001",
            now=now,
            lifetime=timedelta(hours=6),
        )
        return new_proxy(alice, now=now, lifetime=timedelta(hours=6), extra_extensions=[ac])
    cred = alice
    for _ in range(3):
        cred = new_proxy(cred, now=now, lifetime=timedelta(hours=6))
    return cred


@pytest.mark.parametrize("kind", ["plain", "limited", "three_levels", "ec", "voms"])
def test_our_proxies_accepted_by_openssl_and_globus(
    grid_pki: GridPki, tmp_path: Path, kind: str
) -> None:
    proxy = _chain_of(grid_pki, kind)
    path = write_proxy_file(tmp_path / "proxy.pem", proxy)
    verify = run(
        [
            "openssl",
            "verify",
            "-CApath",
            str(grid_pki.ca_dir),
            "-allow_proxy_certs",
            "-untrusted",
            str(path),
            str(path),
        ]
    )
    assert verify.returncode == 0, verify.stderr
    assert f"{path}: OK" in verify.stdout
    info = run(["grid-proxy-info", "-file", str(path)], grid_pki.env())
    assert info.returncode == 0, info.stderr
    assert "identity : /DC=org/DC=example/CN=Alice" in info.stdout
    expected_type = "limited proxy" if kind == "limited" else "impersonation proxy"
    assert f"RFC 3820 compliant {expected_type}" in info.stdout
    # grid-proxy-init -verify style check: globus verifies the whole chain against the CA dir
    exists = run(
        ["grid-proxy-info", "-file", str(path), "-exists", "-valid", "5:00"], grid_pki.env()
    )
    assert exists.returncode == 0, exists.stderr
    if kind == "voms":
        voms = run(["voms-proxy-info", "-all", "-file", str(path)], grid_pki.env())
        assert voms.returncode == 0, voms.stderr
        assert "attribute : /atlas/Role=production/Capability=NULL" in voms.stdout
        assert "VO        : atlas" in voms.stdout


def _grid_proxy_init(grid_pki: GridPki, out: Path, *extra: str) -> Path:
    result = run(
        [
            "grid-proxy-init",
            "-q",
            "-cert",
            str(grid_pki.cert_path("alice")),
            "-key",
            str(grid_pki.key_path("alice")),
            "-out",
            str(out),
            "-hours",
            "4",
            *extra,
        ],
        grid_pki.env(),
    )
    assert result.returncode == 0, result.stderr + result.stdout
    return out


@pytest.mark.parametrize(
    ("extra", "limited", "path_length"),
    [((), False, None), (("-limited",), True, None), (("-path-length", "2"), False, 2)],
)
def test_grid_proxy_init_output_validates(
    grid_pki: GridPki,
    tmp_path: Path,
    extra: tuple[str, ...],
    limited: bool,
    path_length: int | None,
) -> None:
    path = _grid_proxy_init(grid_pki, tmp_path / "gpi.pem", *extra)
    data = path.read_bytes()
    assert b"-----BEGIN PRIVATE KEY-----" in data  # grid-proxy-init writes PKCS#8
    info = validate_chain(load_certificates(data), grid_pki.trust, now=datetime.now(UTC))
    assert info.identity == "/DC=org/DC=example/CN=Alice"
    assert info.limited is limited
    assert info.path_length == path_length
    assert timedelta(hours=3, minutes=50) < info.time_left(datetime.now(UTC)) <= timedelta(hours=4)


def test_grid_proxy_init_legacy_proxy_refused(grid_pki: GridPki, tmp_path: Path) -> None:
    path = _grid_proxy_init(grid_pki, tmp_path / "old.pem", "-old")
    with pytest.raises(ChainError) as err:
        validate_chain(load_certificates(path.read_bytes()), grid_pki.trust, now=datetime.now(UTC))
    assert err.value.reason == "legacy_proxy"
    assert "grid-proxy-init -rfc" in err.value.message


def test_grid_proxy_init_proxy_of_our_proxy(grid_pki: GridPki, tmp_path: Path) -> None:
    """grid-proxy-init can sign with our proxy as its credential; we validate the result."""
    ours = write_proxy_file(
        tmp_path / "ours.pem",
        new_proxy(grid_pki.user("alice"), now=datetime.now(UTC), lifetime=timedelta(hours=6)),
    )
    out = tmp_path / "theirs.pem"
    result = run(
        [
            "grid-proxy-init",
            "-q",
            "-cert",
            str(ours),
            "-key",
            str(ours),
            "-out",
            str(out),
            "-hours",
            "1",
        ],
        grid_pki.env(),
    )
    assert result.returncode == 0, result.stderr
    info = validate_chain(
        load_certificates(out.read_bytes()), grid_pki.trust, now=datetime.now(UTC)
    )
    assert info.proxy_depth == 2 and info.identity == "/DC=org/DC=example/CN=Alice"
