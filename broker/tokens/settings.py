"""Token issuers the broker trusts: the ``[tokens]`` section of ``broker.toml``.

::

    [tokens]
    leeway_seconds = 60          # clock skew tolerated on exp / nbf / iat
    jwks_refresh_seconds = 300   # how long fetched keys are used before asking again
    http_timeout_seconds = 5     # every call to an issuer (connect and read)

    [[tokens.issuers]]
    name = "cms"                                  # short name: CLI, store, credential name
    issuer = "https://cms-auth.example.org/"      # the exact "iss" value
    audience = ["https://broker.example.org"]     # accepted "aud" values (one must match)
    jwks_file = ""                                # air-gapped: a local JWKS instead of discovery
    client_id = "credential-broker"               # the broker's client at this issuer
    client_secret_file = "/etc/broker/cms.secret" # (refresh grant; empty for a public client)
    job_scopes = ["compute.read", "storage.read:/"]   # the most a job access token may carry
    ca_bundle = ""                                # PEM CA file for the issuer's https (default:
                                                  # the CA bundle requests ships, certifi)
    insecure_loopback_http = false                # tests/dev only: http:// on 127.0.0.1 / ::1

Production issuers must be ``https://``. Plain HTTP is accepted only for a
loopback host and only with ``insecure_loopback_http = true``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from broker.errors import ConfigError

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_LOOPBACK_NAMES = frozenset({"localhost"})


@dataclass(frozen=True)
class IssuerConfig:
    name: str
    issuer: str
    audience: tuple[str, ...]
    jwks_file: str = ""
    client_id: str = ""
    client_secret_file: str = ""
    job_scopes: tuple[str, ...] = ()
    insecure_loopback_http: bool = False
    ca_bundle: str = ""

    def client_secret(self) -> str | None:
        if not self.client_secret_file:
            return None
        try:
            return Path(self.client_secret_file).read_text().strip() or None
        except OSError as exc:
            raise ConfigError(
                f"issuer {self.name}: cannot read client_secret_file "
                f"{self.client_secret_file}: {exc.strerror}"
            ) from exc


@dataclass(frozen=True)
class TokenSettings:
    issuers: tuple[IssuerConfig, ...] = ()
    leeway_seconds: int = 60
    jwks_refresh_seconds: int = 300
    http_timeout_seconds: float = 5.0
    max_token_bytes: int = 16 * 1024

    def by_issuer(self, iss: str) -> IssuerConfig | None:
        return next((i for i in self.issuers if i.issuer == iss), None)

    def by_name(self, name: str) -> IssuerConfig | None:
        return next((i for i in self.issuers if i.name == name or i.issuer == name), None)


def is_loopback_host(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str, *, insecure_loopback_http: bool, what: str) -> str:
    """Return ``url`` if the broker may call it; raise ConfigError otherwise."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and parts.hostname and is_loopback_host(parts.hostname):
        if insecure_loopback_http:
            return url
        raise ConfigError(
            f"{what} {url!r} is plain HTTP; set insecure_loopback_http = true (tests and "
            "development only) or use https://"
        )
    raise ConfigError(f"{what} {url!r} must be an https:// URL")


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{what} must be a list of non-empty strings")
    return tuple(value)


_ISSUER_KEYS = {
    "name",
    "issuer",
    "audience",
    "jwks_file",
    "client_id",
    "client_secret_file",
    "job_scopes",
    "insecure_loopback_http",
    "ca_bundle",
}


def parse_issuer(raw: Any, where: str) -> IssuerConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = set(raw) - _ISSUER_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")
    name, issuer = raw.get("name"), raw.get("issuer")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError(f"{where}: name must be lower-case letters, digits, '_', '.', '-'")
    if not isinstance(issuer, str) or not issuer:
        raise ConfigError(f"{where}: issuer (the exact 'iss' URL) is required")
    insecure = raw.get("insecure_loopback_http", False)
    if not isinstance(insecure, bool):
        raise ConfigError(f"{where}: insecure_loopback_http must be true or false")
    check_url(issuer, insecure_loopback_http=insecure, what=f"{where}: issuer")
    audience = _strings(raw.get("audience", []), f"{where}: audience")
    if not audience:
        raise ConfigError(f"{where}: audience must name at least one accepted 'aud' value")
    text: dict[str, str] = {}
    for key in ("jwks_file", "client_id", "client_secret_file", "ca_bundle"):
        value = raw.get(key, "")
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string")
        text[key] = value
    return IssuerConfig(
        name=name,
        issuer=issuer,
        audience=audience,
        job_scopes=_strings(raw.get("job_scopes", []), f"{where}: job_scopes"),
        insecure_loopback_http=insecure,
        **text,
    )


def parse_token_settings(raw: Any, where: str = "[tokens]") -> TokenSettings:
    """Validate the ``[tokens]`` table; ConfigError names the bad setting."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = set(raw) - {
        "issuers",
        "leeway_seconds",
        "jwks_refresh_seconds",
        "http_timeout_seconds",
    }
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")
    issuers_raw = raw.get("issuers", [])
    if not isinstance(issuers_raw, list):
        raise ConfigError(f"{where}: issuers must be an array of tables ([[tokens.issuers]])")
    issuers = tuple(
        parse_issuer(item, f"{where} issuer #{n + 1}") for n, item in enumerate(issuers_raw)
    )
    names = [i.name for i in issuers]
    if len(set(names)) != len(names) or len({i.issuer for i in issuers}) != len(issuers):
        raise ConfigError(f"{where}: issuer names and issuer URLs must be unique")
    numbers: dict[str, float] = {}
    for key, low, high, default in (
        ("leeway_seconds", 0, 600, 60),
        ("jwks_refresh_seconds", 10, 86400, 300),
        ("http_timeout_seconds", 0.1, 60, 5),
    ):
        value = raw.get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (low <= value <= high)
        ):
            raise ConfigError(f"{where}: {key} must be a number between {low} and {high}")
        numbers[key] = value
    return TokenSettings(
        issuers=issuers,
        leeway_seconds=int(numbers["leeway_seconds"]),
        jwks_refresh_seconds=int(numbers["jwks_refresh_seconds"]),
        http_timeout_seconds=float(numbers["http_timeout_seconds"]),
    )
