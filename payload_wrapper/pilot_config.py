"""broker-pilot's configuration: one TOML file, the first of

* ``--config FILE`` (by hand only: under the starter no argument is an option);
* the path compiled into the launcher (``--install-launcher DEST`` with ``--config``);
* ``$BROKER_PILOT_CONFIG`` — only when it names a file owned by **root**;
* /etc/broker/pilot.toml.

Whichever names it, the file must belong to the node's administrator: owned by
root (or by the pilot's own user, for an unprivileged glidein — except through
the variable: files the starter transfers for a job belong to that user too),
a regular file that neither group nor others can write, in directories that
are equally safe (a sticky directory such as /tmp is accepted above an
admin-owned entry). The job sets the pilot's environment, so a variable naming
a file the job wrote is refused (202), never read (:func:`trusted_config_path`).

::

    broker_url = "https://broker.example.org:8443"  # or a list: tried in turn on failure
    cert = "/etc/grid-security/pilotcert.pem"     # or: proxy = "/path/to/pilot/proxy"
    key = "/etc/grid-security/pilotkey.pem"
    ca_dir = "/etc/grid-security/certificates"
    vomsdir = "/etc/grid-security/vomsdir"
    allowed_owners = ["/DC=org/DC=example/*", "fqan:/atlas"]
    workdir = "/var/lib/broker-pilot"
    key_type = "ec"                  # ec (P-256, default) | rsa
    rsa_pool_dir = "/var/lib/broker-pilot/keys"   # optional pre-generated RSA keys
    bind_submitter = true            # the credential's username must be the ad's Owner
    lifetime_hours = 12              # when the ad has no BrokerLifetime (default: broker's)
    refresh_fraction = 0.5           # refresh when this much of the proxy's life is used
    refresh_retry_seconds = 60
    retrieve_attempts = 2            # only for "broker unreachable"
    retry_delay_seconds = 2
    timeout_seconds = 30
    token_file = "/var/lib/broker-pilot/pilot.token"  # the pilot's own bearer token for the
                                     # broker (instead of, or besides, cert/key; 0600, re-read)
    job_token_issuer = "cms"         # also give each payload an access token (BEARER_TOKEN_FILE)
    job_token_scopes = ["compute.read"]   # what the job asks for (the broker narrows it)
    job_token_audience = "https://ce.example.org"   # optional
    stage_max_files = 10000          # job files copied between scratch and job directory
    stage_max_bytes = 17179869184    # (each way, per job)
    [wrapper]                        # payload-wrapper settings (docs/payload-wrapper.md)
    mode = "setuid"
    gridmapfile = "/etc/grid-security/grid-mapfile"   # owners -> .pool accounts
    gridmapdir = "/etc/grid-security/gridmapdir"      # one owner per pool account at a time
    umask = "0022"

``ca_dir``, ``vomsdir`` and ``workdir`` at the top level are also the
wrapper's unless ``[wrapper]`` sets its own. Every problem found here is a
system error (202): the pilot's administrator has to fix it.
"""

from __future__ import annotations

import math
import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.policy import PatternError, parse_pattern
from payload_wrapper.config import WrapperSettings, load_config_file, merge_settings
from payload_wrapper.errors import WrapperSystemError

__all__ = [
    "DEFAULT_CONFIG",
    "KEY_TYPES",
    "PilotConfig",
    "load_pilot_config",
    "parse_pilot_config",
    "trusted_config_path",
]

DEFAULT_CONFIG = "/etc/broker/pilot.toml"
KEY_TYPES = ("ec", "rsa")
_OWNER_FORMS = ("/", "re:", "fqan:")


@dataclass(frozen=True)
class PilotConfig:
    """The pilot's settings; ``wrapper_file`` are the raw ``[wrapper]`` values."""

    broker_url: str
    cert: str
    key: str
    ca_dir: Path
    vomsdir: Path
    allowed_owners: tuple[str, ...]
    workdir: Path
    source: str = DEFAULT_CONFIG
    key_type: str = "ec"
    rsa_pool_dir: Path | None = None
    bind_submitter: bool = True
    lifetime_hours: float | None = None
    refresh_fraction: float = 0.5
    refresh_interval_seconds: float | None = None  # fixed interval; for tests and odd sites
    refresh_retry_seconds: float = 60.0
    retrieve_attempts: int = 2
    retry_delay_seconds: float = 2.0
    timeout_seconds: float = 30.0
    wrapper_file: Mapping[str, Any] = field(default_factory=dict)
    token_file: str | None = None  # the pilot's own bearer token for the broker
    job_token_issuer: str | None = None  # per-job access tokens from this broker issuer
    job_token_scopes: tuple[str, ...] = ()
    job_token_audience: str | None = None
    stage_max_files: int = 10_000  # the job's files copied in (and out) per job
    stage_max_bytes: int = 16 << 30

    @property
    def dn_owners(self) -> tuple[str, ...]:
        return tuple(p for p in self.allowed_owners if not p.startswith("fqan:"))

    @property
    def fqan_owners(self) -> tuple[str, ...]:
        return tuple(p for p in self.allowed_owners if p.startswith("fqan:"))

    def wrapper_settings(self, **flags: Any) -> WrapperSettings:
        """The wrapper's settings: [wrapper] over the pilot's defaults, then ``flags``."""
        base: dict[str, Any] = {
            "ca_dir": str(self.ca_dir),
            "vomsdir": str(self.vomsdir),
            "workdir": str(self.workdir),
        }
        base.update(self.wrapper_file)
        return merge_settings(base, flags)


def _not_admin_owned(path: Path, st: os.stat_result, trusted: frozenset[int], what: str) -> str:
    if st.st_uid not in trusted:
        return f"{what} {path} belongs to uid {st.st_uid}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not (
        stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
    ):
        return f"{what} {path} can be written by its group or others"
    return ""


def trusted_config_path(
    path: str | os.PathLike[str], *, euid: int | None = None, root_only: bool = False
) -> Path:
    """The resolved ``path`` when only the node's administrator can have written it.

    Trusted owners are root and ``euid`` (default: the effective uid; only root
    with ``root_only``). Every
    directory from / down to the file (symlinks resolved) and the file itself
    must have a trusted owner and be writable by nobody else (a sticky
    directory may be world-writable: others cannot replace an entry in it).
    Raises WrapperSystemError (202) with a sentence saying what to fix.
    """
    uid = os.geteuid() if euid is None else euid
    trusted = frozenset({0} if root_only else {0, uid})
    given = Path(path)
    if not given.is_absolute():
        raise WrapperSystemError(
            f"the pilot configuration path {given} must be absolute", reason="untrusted_config"
        )
    real = Path(os.path.realpath(given))
    try:
        st = os.stat(real, follow_symlinks=False)
    except FileNotFoundError:
        raise WrapperSystemError(
            f"the pilot configuration {given} does not exist; create it (see docs/htcondor.md)",
            reason="no_config",
        ) from None
    except OSError as exc:
        raise WrapperSystemError(
            f"cannot read the pilot configuration {given}: {exc.strerror}", reason="no_config"
        ) from exc
    problem = "" if stat.S_ISREG(st.st_mode) else f"{real} is not a regular file"
    problem = problem or _not_admin_owned(real, st, trusted, "the file")
    for parent in real.parents:
        if problem:
            break
        try:
            problem = _not_admin_owned(
                parent, os.stat(parent, follow_symlinks=False), trusted, "its directory"
            )
        except OSError as exc:
            problem = f"its directory {parent} cannot be checked ({exc.strerror})"
    if problem:
        owners = "root" if uid == 0 or root_only else f"root or uid {uid}"
        raise WrapperSystemError(
            f"the pilot configuration {given} is not trusted: {problem}; only the node's "
            f"administrator may write it (owned by {owners}, chmod go-w, in such directories)",
            reason="untrusted_config",
        )
    return real


def load_pilot_config(
    path: str | os.PathLike[str] | None = None, *, environ: Mapping[str, str] | None = None
) -> PilotConfig:
    """Read the file at ``path``, ``$BROKER_PILOT_CONFIG`` or /etc/broker/pilot.toml.

    The file must pass :func:`trusted_config_path` wherever its name came from;
    one named by the variable must be owned by root.
    """
    env = os.environ if environ is None else environ
    from_env = not path and bool(env.get("BROKER_PILOT_CONFIG"))
    given = path or env.get("BROKER_PILOT_CONFIG") or DEFAULT_CONFIG
    where = trusted_config_path(Path(given).absolute(), root_only=from_env)
    try:
        # O_NOFOLLOW: the resolved path has no link left; one appearing now is refused.
        fd = os.open(where, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise WrapperSystemError(
            f"cannot read the pilot configuration {where}: {exc.strerror}", reason="no_config"
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise WrapperSystemError(
            f"the pilot configuration {where} is not valid TOML: {exc}", reason="bad_config"
        ) from exc
    wrapper: dict[str, Any] = {}
    if "wrapper" in data:
        # The wrapper's own loader checks its table (names and types) the same way
        # as for payload-wrapper --config.
        wrapper = load_config_file(where)
    return parse_pilot_config(data, source=str(where), wrapper=wrapper)


def _bad(source: str, message: str) -> WrapperSystemError:
    return WrapperSystemError(f"{source}: {message}", reason="bad_config")


def _number(
    data: Mapping[str, Any],
    name: str,
    default: float | None,
    source: str,
    *,
    low: float = 0.0,
    high: float = math.inf,
) -> float | None:
    value = data.get(name, default)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not low < value <= high
    ):
        raise _bad(
            source,
            f"{name} must be a number above {low:g}"
            + ("" if high == math.inf else f" and at most {high:g}")
            + f", not {value!r}",
        )
    return float(value)


def _text(data: Mapping[str, Any], name: str, source: str, default: str | None = None) -> str:
    value = data.get(name, default)
    if not isinstance(value, str) or not value:
        raise _bad(source, f"{name} must be set to a non-empty string")
    return value


def _broker_urls(data: Mapping[str, Any], source: str) -> str:
    """``broker_url``: one URL, or a list of them (tried in turn on a connection failure
    or a 503, see broker.client); kept as one comma-separated string."""
    value = data.get("broker_url")
    if isinstance(value, list):
        if not value or not all(isinstance(v, str) and v and "," not in v for v in value):
            raise _bad(source, "broker_url must be a URL or a non-empty list of URLs")
        return ",".join(value)
    return _text(data, "broker_url", source)


_KNOWN = {
    "broker_url",
    "cert",
    "key",
    "proxy",
    "ca_dir",
    "vomsdir",
    "allowed_owners",
    "workdir",
    "key_type",
    "rsa_pool_dir",
    "bind_submitter",
    "lifetime_hours",
    "refresh_fraction",
    "refresh_interval_seconds",
    "refresh_retry_seconds",
    "retrieve_attempts",
    "retry_delay_seconds",
    "timeout_seconds",
    "stage_max_files",
    "stage_max_bytes",
    "wrapper",
    "token_file",
    "job_token_issuer",
    "job_token_scopes",
    "job_token_audience",
}


def parse_pilot_config(
    data: Mapping[str, Any], *, source: str = "pilot.toml", wrapper: Mapping[str, Any] | None = None
) -> PilotConfig:
    """Check the top-level keys (``wrapper`` holds the already-read [wrapper] table)."""
    unknown = sorted(set(data) - _KNOWN)
    if unknown:
        raise _bad(source, f"unknown setting(s) {', '.join(unknown)}; see docs/htcondor.md")
    broker_url = _broker_urls(data, source)
    cert, key = _credential_paths(data, source)
    owners = _allowed_owners(data, source)
    key_type = data.get("key_type", "ec")
    if key_type not in KEY_TYPES:
        raise _bad(source, f"key_type must be one of {', '.join(KEY_TYPES)}, not {key_type!r}")
    bind = data.get("bind_submitter", True)
    if not isinstance(bind, bool):
        raise _bad(source, "bind_submitter must be true or false")
    attempts = data.get("retrieve_attempts", 2)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 10:
        raise _bad(source, "retrieve_attempts must be a whole number from 1 to 10")
    stage = _stage_limits(data, source)
    pool = data.get("rsa_pool_dir")
    if pool is not None and (not isinstance(pool, str) or not pool):
        raise _bad(source, "rsa_pool_dir must be a directory path")
    tokens, scopes = _job_token_settings(data, source)
    return PilotConfig(
        **tokens,
        job_token_scopes=scopes,
        broker_url=broker_url,
        cert=cert,
        key=key,
        ca_dir=Path(_text(data, "ca_dir", source, "/etc/grid-security/certificates")),
        vomsdir=Path(_text(data, "vomsdir", source, "/etc/grid-security/vomsdir")),
        allowed_owners=owners,
        workdir=Path(_text(data, "workdir", source, "/var/lib/broker-pilot")),
        source=source,
        key_type=key_type,
        rsa_pool_dir=Path(pool) if pool else None,
        bind_submitter=bind,
        lifetime_hours=_number(data, "lifetime_hours", None, source),
        refresh_fraction=_number(data, "refresh_fraction", 0.5, source, high=0.95) or 0.5,
        refresh_interval_seconds=_number(data, "refresh_interval_seconds", None, source),
        refresh_retry_seconds=_number(data, "refresh_retry_seconds", 60.0, source) or 60.0,
        retrieve_attempts=attempts,
        retry_delay_seconds=_number(data, "retry_delay_seconds", 2.0, source) or 2.0,
        timeout_seconds=_number(data, "timeout_seconds", 30.0, source) or 30.0,
        wrapper_file=dict(wrapper or {}),
        stage_max_files=stage["stage_max_files"],
        stage_max_bytes=stage["stage_max_bytes"],
    )


def _credential_paths(data: Mapping[str, Any], source: str) -> tuple[str, str]:
    """(cert, key): a proxy file serves as both; a token-only pilot has neither."""
    if "proxy" in data and ("cert" in data or "key" in data):
        raise _bad(source, "give either proxy or cert and key, not both")
    if "proxy" in data:
        proxy = _text(data, "proxy", source)
        return proxy, proxy
    if "token_file" in data and "cert" not in data and "key" not in data:
        return "", ""  # a token-only pilot
    cert = _text(data, "cert", source)
    return cert, _text(data, "key", source)


def _allowed_owners(data: Mapping[str, Any], source: str) -> tuple[str, ...]:
    """The owner patterns, each a DN glob, re:REGEX or fqan:/vo/... (or ``*``)."""
    owners = data.get("allowed_owners")
    if not isinstance(owners, list) or not owners or not all(isinstance(o, str) for o in owners):
        raise _bad(
            source,
            "allowed_owners must be a non-empty list such as "
            '["/DC=org/DC=example/*", "fqan:/atlas"]; use ["*"] to run every owner\'s jobs',
        )
    for pattern in owners:
        if pattern != "*" and not pattern.startswith(_OWNER_FORMS):
            raise _bad(
                source,
                f"allowed_owners entry {pattern!r} must be a DN glob (/...), "
                "re:REGEX or fqan:/vo/...",
            )
        try:
            parse_pattern(pattern, context="owner")
        except PatternError as exc:
            raise _bad(source, f"allowed_owners entry {pattern!r}: {exc}") from None
    return tuple(owners)


def _stage_limits(data: Mapping[str, Any], source: str) -> dict[str, int]:
    """stage_max_files and stage_max_bytes, each a whole number of at least 1."""
    stage: dict[str, int] = {}
    for name, default in (("stage_max_files", 10_000), ("stage_max_bytes", 16 << 30)):
        value = data.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _bad(source, f"{name} must be a whole number of at least 1")
        stage[name] = value
    return stage


def _job_token_settings(
    data: Mapping[str, Any], source: str
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The token file and per-job token issuer/audience given, and the job token scopes."""
    tokens: dict[str, Any] = {}
    for name in ("token_file", "job_token_issuer", "job_token_audience"):
        if name in data:
            tokens[name] = _text(data, name, source)
    scopes = data.get("job_token_scopes", [])
    if not isinstance(scopes, list) or not all(isinstance(x, str) and x for x in scopes):
        raise _bad(source, "job_token_scopes must be a list of scopes")
    if scopes and "job_token_issuer" not in data:
        raise _bad(source, "job_token_scopes needs job_token_issuer")
    return tokens, tuple(scopes)
