"""Fixtures for the payload wrapper: a PKI readable by payload accounts, proxies, workdirs.

Everything lives in fresh directories under /tmp with mode 0755 where a
payload account must read it (pytest's own tmp_path is private to root).
Throwaway accounts are created with useradd and always removed with userdel.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.devpki import write_dev_pki
from broker.fileio import write_private_file
from broker.pki.loading import credential_to_pem, load_cert_and_key
from broker.pki.proxy import new_proxy
from payload_wrapper.config import WrapperSettings
from tests.prerequisites import needs_root as _needs_root

needs_root = _needs_root  # root required; a failure under CI (tests/prerequisites.py)


def public_tempdir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


@dataclass
class WrapperPki:
    root: Path
    ca_dir: Path
    vomsdir: Path
    now: datetime

    def proxy(self, user: str, path: Path, *, lifetime: timedelta = timedelta(hours=12)) -> Path:
        base = self.root
        cred = load_cert_and_key(
            (base / f"{user}.pem").read_bytes(), (base / f"{user}.key").read_bytes()
        )
        proxy = new_proxy(cred, now=datetime.now(UTC), lifetime=lifetime)
        write_private_file(path, credential_to_pem(proxy))
        return path

    def dn(self, user: str) -> str:
        return f"/DC=org/DC=example/CN={user.capitalize()}"


@pytest.fixture(scope="session")
def wpki() -> Iterator[WrapperPki]:
    top = public_tempdir("pw-pki-")
    now = datetime.now(UTC)
    write_dev_pki(top / "pki", now=now, users=("alice", "bob", "mallory"), pilots=("pilot",))
    # The dev PKI's private/ scratch dir is 0700 by design; the CA dir and
    # vomsdir must be readable by the payload account.
    for d in (top / "pki", top / "pki" / "certificates", top / "pki" / "vomsdir"):
        d.chmod(0o755)
    yield WrapperPki(top / "pki", top / "pki" / "certificates", top / "pki" / "vomsdir", now)
    shutil.rmtree(top, ignore_errors=True)


@dataclass
class JobPlace:
    """A fresh pilot area: a workdir, the pilot's proxy and a scripts dir."""

    base: Path
    workdir: Path
    proxy: Path
    scripts: Path
    audit: Path
    pki: WrapperPki

    def settings(self, **overrides: object) -> WrapperSettings:
        values: dict[str, object] = {
            "mode": "setuid",
            "account": "nobody",
            "workdir": self.workdir,
            "ca_dir": self.pki.ca_dir,
            "vomsdir": self.pki.vomsdir,
            "audit_log": self.audit,
            "kill_grace": 0.5,
        }
        values.update(overrides)
        return WrapperSettings(**values)  # type: ignore[arg-type]

    def script(self, name: str, text: str) -> Path:
        path = self.scripts / name
        path.write_text(text)
        path.chmod(0o755)
        return path

    def job_dir(self, job_id: str) -> Path:
        return self.workdir / f"job-{job_id}"


@pytest.fixture
def place(wpki: WrapperPki) -> Iterator[JobPlace]:
    base = public_tempdir("pw-job-")
    workdir = base / "work"
    workdir.mkdir(mode=0o755)
    scripts = base / "scripts"
    scripts.mkdir(mode=0o755)
    pilot_private = base / "pilot"
    pilot_private.mkdir(mode=0o700)
    proxy = wpki.proxy("alice", pilot_private / "proxy.pem")
    yield JobPlace(base, workdir, proxy, scripts, base / "audit.log", wpki)
    shutil.rmtree(base, ignore_errors=True)
    for egg in Path("/tmp").glob("payload-eggs-*"):
        # only ours: those of accounts the tests use and already empty of live jobs
        if egg.stat().st_uid != 0:
            shutil.rmtree(egg, ignore_errors=True)


@pytest.fixture
def make_account() -> Iterator[Callable[[str], str]]:
    """Create throwaway accounts (useradd) and remove them after the test, even on failure."""
    created: list[str] = []

    def make(name: str) -> str:
        subprocess.run(["userdel", name], capture_output=True, check=False)  # leftovers
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--user-group",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ],
            check=True,
            capture_output=True,
        )
        created.append(name)
        return name

    yield make
    for name in created:
        subprocess.run(["userdel", name], capture_output=True, check=False)
