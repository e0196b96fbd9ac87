"""A real PAM stack for tests, in a temporary directory (nothing is written to /etc).

The service file uses pam_pwdfile (package libpam-pwdfile, installed by
scripts/test) for ``auth`` and pam_listfile for ``account``; the broker loads
it through ``pam_confdir`` (``pam_start_confdir``).  Accounts:

* a locked account has a ``!``-prefixed hash, as ``passwd -l`` does;
* a disabled account has a good hash but is listed in the account stack's deny
  list, so only ``pam_acct_mgmt`` refuses it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.prerequisites import unavailable

PWDFILE_MODULE = "pam_pwdfile.so"
_MODULE_DIRS = (
    "/lib/x86_64-linux-gnu/security",
    "/usr/lib/x86_64-linux-gnu/security",
    "/lib/security",
    "/usr/lib/security",
    "/lib64/security",
)


@dataclass
class PamStack:
    confdir: Path
    service: str
    passwords: dict[str, str] = field(default_factory=dict)


def _hash(password: str) -> str:
    out = subprocess.run(
        ["openssl", "passwd", "-6", "-stdin"],
        input=password,
        text=True,
        capture_output=True,
        check=True,
    )
    return out.stdout.strip()


def require_pwdfile_module() -> None:
    """Skip (a failure under CI=true) when libpam-pwdfile is not installed."""
    if not any(os.path.exists(os.path.join(d, PWDFILE_MODULE)) for d in _MODULE_DIRS):
        unavailable("pam_pwdfile.so is missing: apt-get install libpam-pwdfile")


def make_pam_stack(
    base: Path,
    passwords: Mapping[str, str],
    *,
    locked: Mapping[str, str] = {},
    disabled: Mapping[str, str] = {},
    service: str = "broker-test",
) -> PamStack:
    require_pwdfile_module()
    base.mkdir(parents=True, exist_ok=True)
    pwdfile = base / "pwdfile"
    denyfile = base / "disabled-users"
    lines = [f"{user}:{_hash(pw)}" for user, pw in {**passwords, **disabled}.items()]
    lines += [f"{user}:!{_hash(pw)}" for user, pw in locked.items()]
    pwdfile.write_text("\n".join(lines) + "\n")
    pwdfile.chmod(0o600)
    denyfile.write_text("".join(f"{user}\n" for user in disabled))
    denyfile.chmod(0o600)
    confdir = base / "pam.d"
    confdir.mkdir()
    # nodelay: pam_pwdfile otherwise sleeps after every failure, slowing the suite.
    (confdir / service).write_text(
        f"auth     required  pam_pwdfile.so pwdfile={pwdfile} nodelay\n"
        f"account  required  pam_listfile.so item=user sense=deny file={denyfile} onerr=fail\n"
    )
    return PamStack(confdir, service, {**passwords})
