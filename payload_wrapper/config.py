"""Settings: a TOML file merged with command-line flags (flags win).

Every flag has a key of the same name (dashes become underscores) in the
``[wrapper]`` table of the TOML file, or at its top level::

    mode = "setuid"            # setuid | sudo | none
    gridmapfile = "/etc/grid-security/grid-mapfile"
    gridmapdir = "/etc/grid-security/gridmapdir"
    lease_expiry = 172800      # seconds a pool lease may stay unused
    ban = ["/DC=org/DC=example/CN=Mallory", "/atlas/Role=banned"]
    umask = "0022"
    workdir = "/var/lib/pilot/work"
    keep_env = ["LANG"]
    set_env = { SITE_NAME = "EXAMPLE" }
    payload_timeout = 86400
    epilogue = ["/usr/libexec/site-epilogue"]   # config only: a trusted command
    epilogue_timeout = 300
    audit_log = "/var/log/payload-wrapper/audit.log"
    containment = "auto"       # auto | cgroup | uid | session (payload_wrapper.containment)
    cgroup_parent = "/sys/fs/cgroup/pilot.slice"   # default: the wrapper's own cgroup
    state_dir = "/run/payload-wrapper"             # one-owner-per-uid locks

Merging rules: a scalar flag replaces the file's value; ``keep_env`` and
``ban`` are the union of both; ``set_env`` takes the file's values and then
the flags' (per name). The epilogue is read from the file only, because it
runs with the wrapper's own privileges.

Validation happens here, once: a bad value in the file is a system error
(202, the admin's to fix), a bad flag a client error (201).
"""

from __future__ import annotations

import os
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from payload_wrapper.errors import ClientError, WrapperError, WrapperSystemError

__all__ = [
    "CONTAINMENTS",
    "MODES",
    "WrapperSettings",
    "load_config_file",
    "merge_settings",
    "parse_umask",
]

MODES = ("setuid", "sudo", "none")
CONTAINMENTS = ("auto", "cgroup", "uid", "session")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
DEFAULT_LEASE_EXPIRY = 2 * 24 * 3600.0


def _default_helper() -> str:
    # The console script installed next to the interpreter that runs us.
    return str(Path(sys.executable).parent / "payload-wrapper")


@dataclass(frozen=True)
class WrapperSettings:
    """Everything the wrapper needs besides the proxy and the command."""

    mode: str = "setuid"
    account: str | None = None
    gridmapfile: Path | None = None
    gridmapdir: Path | None = None
    lease_expiry: float = DEFAULT_LEASE_EXPIRY
    ban: tuple[str, ...] = ()
    ban_file: Path | None = None
    umask: int = 0o022
    workdir: Path | None = None  # None: the current directory
    keep_env: tuple[str, ...] = ()
    set_env: tuple[tuple[str, str], ...] = ()
    ca_dir: Path | None = None  # None: X509_CERT_DIR, then /etc/grid-security/certificates
    vomsdir: Path | None = None  # None: X509_VOMS_DIR, then /etc/grid-security/vomsdir
    path: str = DEFAULT_PATH
    payload_timeout: float | None = None
    epilogue: tuple[str, ...] = ()
    epilogue_timeout: float = 300.0
    audit_log: Path | None = None
    pilot_account: str | None = None  # gets read access to outputs; None: owner of workdir
    kill_grace: float = 2.0
    kill_all_target_processes: bool = False  # only for accounts dedicated to this job
    sudo: str = "/usr/bin/sudo"
    sudo_helper: str = field(default_factory=_default_helper)
    containment: str = "auto"  # auto | cgroup | uid | session; see payload_wrapper.containment
    cgroup_parent: Path | None = None  # None: the wrapper's own cgroup
    state_dir: Path | None = None  # None: /run/payload-wrapper (root) or /tmp/payload-wrapper-UID

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ClientError(
                f"unknown mode {self.mode!r}; use one of {', '.join(MODES)}", reason="bad_mode"
            )
        if self.containment not in CONTAINMENTS:
            raise ClientError(
                f"unknown containment {self.containment!r}; use one of {', '.join(CONTAINMENTS)}",
                reason="bad_containment",
            )
        if not self.umask & 0o002:
            raise ClientError(
                f"umask {self.umask:04o} would let every account write the payload's files; "
                "use 0022 (the default), 0027 or 0077",
                reason="bad_umask",
            )
        if not 0 <= self.umask <= 0o777:
            raise ClientError(f"umask {self.umask:o} is not a valid umask", reason="bad_umask")
        if self.account is not None and self.gridmapfile is not None:
            raise ClientError(
                "both a fixed account and a grid-mapfile were given; choose one of "
                "--account and --gridmapfile",
                reason="bad_mapping",
            )
        if self.gridmapdir is not None and self.gridmapfile is None:
            raise ClientError(
                "a gridmapdir was given without a grid-mapfile; pool accounts are "
                'named in the grid-mapfile ("DN" .prefix)',
                reason="bad_mapping",
            )
        for name, value in (
            ("lease_expiry", self.lease_expiry),
            ("epilogue_timeout", self.epilogue_timeout),
            ("kill_grace", self.kill_grace),
        ):
            if value <= 0:
                raise ClientError(f"{name} must be positive, not {value}", reason="bad_number")
        if self.payload_timeout is not None and self.payload_timeout <= 0:
            raise ClientError(
                f"payload_timeout must be positive, not {self.payload_timeout}",
                reason="bad_number",
            )
        if not self.path or any(not p.startswith("/") for p in self.path.split(":")):
            raise ClientError(
                f"the PATH {self.path!r} must list absolute directories only", reason="bad_path"
            )


def parse_umask(value: str | int) -> int:
    """``"0022"``, ``"022"`` or an int; refuses anything that is not octal."""
    if isinstance(value, bool):
        raise ClientError(
            f"umask {value!r} is not an octal number such as 0022", reason="bad_umask"
        )
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        raise ClientError(
            f"umask {value!r} is not an octal number such as 0022", reason="bad_umask"
        )
    text = value.strip()
    try:
        number = int(text, 8)
    except ValueError:
        raise ClientError(
            f"umask {value!r} is not an octal number such as 0022", reason="bad_umask"
        ) from None
    return number


_PATH_KEYS = {
    "gridmapfile",
    "gridmapdir",
    "ban_file",
    "workdir",
    "ca_dir",
    "vomsdir",
    "audit_log",
    "cgroup_parent",
    "state_dir",
}
_FLOAT_KEYS = {"lease_expiry", "payload_timeout", "epilogue_timeout", "kill_grace"}
_STR_KEYS = {"mode", "account", "path", "pilot_account", "sudo", "sudo_helper", "containment"}
_LIST_KEYS = {"keep_env", "ban", "epilogue"}
_KNOWN = {f.name for f in fields(WrapperSettings)} | {"job_id", "config"}


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the TOML file into a plain dict of setting names; 202 when unreadable or unknown."""
    p = Path(path)
    try:
        with open(p, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ClientError(
            f"the configuration file {p} does not exist; check --config", reason="no_config"
        ) from None
    except OSError as exc:
        raise WrapperSystemError(f"cannot read the configuration file {p}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise WrapperSystemError(f"the configuration file {p} is not valid TOML: {exc}") from exc
    table = data.get("wrapper", data)
    if not isinstance(table, dict):
        raise WrapperSystemError(f"[wrapper] in {p} must be a table")
    unknown = sorted(k for k in table if k.replace("-", "_") not in _KNOWN and k != "wrapper")
    if unknown:
        raise WrapperSystemError(
            f"unknown setting(s) {', '.join(unknown)} in {p}; the known ones are listed in "
            "docs/payload-wrapper.md"
        )
    return {k.replace("-", "_"): v for k, v in table.items() if k != "wrapper"}


def _convert(name: str, value: Any, origin: str) -> Any:
    """Check the type of one raw value (from TOML or flags) and convert it."""
    error = WrapperSystemError if origin == "file" else ClientError

    def bad(expected: str) -> WrapperError:
        return error(f"the setting {name} ({origin}) must be {expected}, not {value!r}")

    if name in _PATH_KEYS:
        if not isinstance(value, str | os.PathLike) or not str(value):
            raise bad("a path")
        return Path(value)
    if name in _FLOAT_KEYS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad("a number of seconds")
        return float(value)
    if name in _STR_KEYS:
        if not isinstance(value, str) or not value:
            raise bad("a non-empty string")
        return value
    if name in _LIST_KEYS:
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise bad("a list of strings")
        if not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
        return tuple(value)
    if name == "set_env":
        if isinstance(value, Mapping):
            items = list(value.items())
        elif isinstance(value, Sequence) and not isinstance(value, str):
            items = [_split_assignment(v, error) for v in value]
        else:
            raise bad("a table of NAME = value")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in items):
            raise bad('a table of NAME = "value" strings')
        return tuple(items)
    if name == "umask":
        try:
            return parse_umask(value)
        except ClientError as exc:
            raise error(exc.message, reason="bad_umask") from None
    if name == "kill_all_target_processes":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if name == "job_id":
        return value
    raise error(f"unknown setting {name}")


def _split_assignment(text: object, error: type[WrapperError]) -> tuple[str, str]:
    if not isinstance(text, str) or "=" not in text:
        raise error(f"an environment setting must look like NAME=VALUE, not {text!r}")
    name, _, value = text.partition("=")
    return name, value


def _merge(sources: list[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for origin, source in sources:
        for name, raw in source.items():
            if raw is None or name in ("job_id", "config"):
                continue
            if origin == "flag" and name == "epilogue":
                raise ClientError(
                    "the epilogue can only be set in the configuration file, because it runs "
                    "with the wrapper's privileges",
                    reason="bad_flag",
                )
            value = _convert(name, raw, origin)
            if name in ("keep_env", "ban") and name in merged:
                merged[name] = tuple(dict.fromkeys((*merged[name], *value)))
            elif name == "set_env" and name in merged:
                combined = dict(merged[name])
                combined.update(dict(value))
                merged[name] = tuple(combined.items())
            else:
                merged[name] = value
    return merged


def merge_settings(
    file_values: Mapping[str, Any] | None, flag_values: Mapping[str, Any]
) -> WrapperSettings:
    """Combine the file's values and the flags' (``None`` = flag not given)."""
    if file_values:
        # A bad value in the site's configuration file is the node's problem (202), not the
        # job owner's (201): check the file's values on their own first.
        try:
            WrapperSettings(**_merge([("file", file_values)]))
        except ClientError as exc:
            raise WrapperSystemError(
                f"the wrapper configuration is invalid: {exc.message}", reason="bad_config"
            ) from exc
    merged = _merge([("file", file_values or {}), ("flag", flag_values)])
    try:
        return WrapperSettings(**merged)
    except WrapperError:
        raise
    except TypeError as exc:  # pragma: no cover - _convert filters unknown names
        raise WrapperSystemError(f"bad settings: {exc}") from exc
