"""Server configuration: ``broker.toml``, overridden by command-line flags.

Everything has an embedded default so that ``broker serve`` runs with no
arguments: a state directory (``./broker-state`` or ``BROKER_STATE_DIR``) holding
a SQLite database, the master key file and, when no host certificate is
configured, a development PKI made on first start.  Servers bind to loopback
unless told otherwise.

::

    [server]
    bind = "127.0.0.1:8443"
    myproxy_bind = "127.0.0.1:7512"      # "" disables the MyProxy endpoint
    state_dir = "/var/lib/broker"
    database_url = "postgresql+psycopg://broker@db/broker"   # default: SQLite in state_dir
    host_cert = "/etc/grid-security/hostcert.pem"
    host_key = "/etc/grid-security/hostkey.pem"
    ca_dir = "/etc/grid-security/certificates"
    vomsdir = "/etc/grid-security/vomsdir"
    policy_dir = "/etc/broker/policies"
    master_key_file = "/var/lib/broker/master.key"
    workers = 2
    threads = 16                          # per worker; only requests that fully arrived take one
    max_tls = ""                          # "1.2" caps the MyProxy endpoint at TLS 1.2
    pam_service = ""                      # PAM service for password logins ("" = off)
    pam_confdir = ""                      # tests/dev only: load the service from this dir
    online_ca_cert = ""                   # online CA for PAM users (needs pam_service)
    online_ca_key = ""                    # its key, mode 0600
    online_ca_dn_template = "/DC=org/DC=example/CN={username}"
    online_ca_max_hours = 12
    admin_group = "site-admins"           # policy [groups] entry allowed on the /admin page
    admin_expiring_hours = 24             # the admin page marks credentials expiring this soon
    admin_session_minutes = 30            # PAM login lifetime on the admin page

    [limits]
    max_stored_hours = 720
    max_proxy_hours = 168
    delegation_key = "rsa"                # or "ec"
    passphrase_failures = 5               # wrong passphrases per credential and address ...
    passphrase_failure_minutes = 10       # ... within this window; then refused (0 = no limit)
    max_pending_per_user = 10             # unexpired pending delegations per DN (0 = no cap)
    housekeeping_seconds = 60             # purge expired pending rows etc. this often
    refusal_audit_seconds = 60            # unauthenticated refusals: 1 row + 1 count row per window
    username_binding = "dn"               # "dn": username = owner's DN-derived name; "none"

    [tokens]                              # bearer tokens; see broker/tokens/settings.py
    [[tokens.issuers]]
    name = "cms"
    issuer = "https://cms-auth.example.org/"
    audience = ["https://broker.example.org"]
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from broker.errors import ConfigError
from broker.store.engine import default_sqlite_url
from broker.tokens.settings import TokenSettings, parse_token_settings

DEFAULT_BIND = "127.0.0.1:8443"


@dataclass(frozen=True)
class ServerConfig:
    bind: str = DEFAULT_BIND
    myproxy_bind: str = ""
    state_dir: str = ""
    database_url: str = ""
    host_cert: str = ""
    host_key: str = ""
    ca_dir: str = ""
    vomsdir: str = ""
    policy_dir: str = ""
    master_key_file: str = ""
    workers: int = 2
    threads: int = 16
    max_tls: str = ""
    max_stored_hours: float = 720.0
    max_proxy_hours: float = 168.0
    delegation_key: str = "rsa"
    passphrase_failures: int = 5
    passphrase_failure_minutes: float = 10.0
    max_pending_per_user: int = 10
    housekeeping_seconds: float = 60.0
    refusal_audit_seconds: float = 60.0
    # New deployments bind usernames to identities; existing sites that rely on free
    # usernames set "none" (see docs/myproxy.md, "Usernames").
    username_binding: str = "dn"
    log_level: str = "info"
    # PAM logins and the online CA (see broker.pam_auth, broker.onlineca).
    pam_service: str = ""
    pam_confdir: str = ""  # test/dev only: production uses /etc/pam.d
    online_ca_cert: str = ""
    online_ca_key: str = ""
    online_ca_dn_template: str = "/DC=org/DC=example/CN={username}"
    online_ca_max_hours: float = 12.0
    # The admin web page (see broker.api.admin).
    admin_group: str = "site-admins"
    admin_expiring_hours: float = 24.0
    admin_session_minutes: float = 30.0
    # Bearer-token issuers ([tokens] in broker.toml); None = tokens off.
    tokens: TokenSettings | None = None

    @property
    def certificate_optional(self) -> bool:
        """Client certificates become optional at the TLS handshake only for PAM logins and
        bearer tokens; every other route still demands a verified chain."""
        return bool(self.pam_service) or bool(self.tokens and self.tokens.issuers)

    def resolved(self) -> ServerConfig:
        """Fill the defaults that depend on the state directory."""
        state = Path(self.state_dir or os.environ.get("BROKER_STATE_DIR") or "broker-state")
        state = state.resolve()
        devpki = state / "devpki"
        return replace(
            self,
            state_dir=str(state),
            database_url=self.database_url or default_sqlite_url(state),
            master_key_file=self.master_key_file or str(state / "master.key"),
            host_cert=self.host_cert or str(devpki / "host.pem"),
            host_key=self.host_key or str(devpki / "host.key"),
            ca_dir=self.ca_dir or os.environ.get("X509_CERT_DIR") or str(devpki / "certificates"),
            vomsdir=self.vomsdir or os.environ.get("X509_VOMS_DIR") or str(devpki / "vomsdir"),
            policy_dir=self.policy_dir or os.environ.get("BROKER_POLICY_DIR") or "policies",
        )

    @property
    def uses_dev_pki(self) -> bool:
        return Path(self.host_cert).parent.name == "devpki"


def _check_bind(value: str, what: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ConfigError(f"{what} {value!r} must be HOST:PORT, e.g. 127.0.0.1:8443")


def load_config(path: str | None, overrides: dict[str, Any]) -> ServerConfig:
    """Read ``path`` (if given), then apply non-None ``overrides`` (the flags)."""
    values: dict[str, Any] = {}
    if path:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"the config file {path} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"the config file {path} is not valid TOML: {exc}") from exc
        known = {f.name for f in fields(ServerConfig)}
        for section in ("server", "limits"):
            table = raw.get(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: [{section}] must be a table")
            for key, value in table.items():
                if key not in known:
                    raise ConfigError(f"{path}: unknown setting {key!r} in [{section}]")
                values[key] = value
        if "tokens" in raw:
            values["tokens"] = parse_token_settings(raw["tokens"], f"{path}: [tokens]")
        unknown = set(raw) - {"server", "limits", "tokens"}
        if unknown:
            raise ConfigError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        config = ServerConfig(**values)
    except TypeError as exc:
        raise ConfigError(f"bad configuration: {exc}") from exc
    _check_bind(config.bind, "bind")
    if config.myproxy_bind:
        _check_bind(config.myproxy_bind, "myproxy_bind")
    if config.workers < 1 or config.threads < 1:
        raise ConfigError("workers and threads must be at least 1")
    if config.delegation_key not in ("rsa", "ec"):
        raise ConfigError("delegation_key must be 'rsa' or 'ec'")
    if not 0 <= config.passphrase_failures <= 10_000:
        raise ConfigError("passphrase_failures must be between 0 (no limit) and 10000")
    if not 0 < config.passphrase_failure_minutes <= 24 * 60:
        raise ConfigError("passphrase_failure_minutes must be between 0 and 1440")
    if not 0 <= config.max_pending_per_user <= 100_000:
        raise ConfigError("max_pending_per_user must be between 0 (no cap) and 100000")
    if not 1 <= config.housekeeping_seconds <= 24 * 3600:
        raise ConfigError("housekeeping_seconds must be between 1 and 86400")
    if not 0 <= config.refusal_audit_seconds <= 3600:
        raise ConfigError("refusal_audit_seconds must be between 0 (a row each) and 3600")
    if config.username_binding not in ("dn", "none"):
        raise ConfigError(
            "username_binding must be 'dn' (the username is the owner's "
            "DN-derived name) or 'none' (first come, first served)"
        )
    if config.max_tls not in ("", "1.2", "1.3"):
        raise ConfigError("max_tls must be '1.2', '1.3' or empty")

    if bool(config.online_ca_cert) != bool(config.online_ca_key):
        raise ConfigError("online_ca_cert and online_ca_key must be set together")
    if config.online_ca_cert and not config.pam_service:
        raise ConfigError("the online CA issues certificates to PAM users: set pam_service too")
    if config.pam_confdir and not config.pam_service:
        raise ConfigError("pam_confdir needs pam_service")
    if not 0 < config.online_ca_max_hours <= 24 * 31:
        raise ConfigError("online_ca_max_hours must be between 0 and 744")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", config.admin_group):
        raise ConfigError(
            "admin_group must be a policy group name (letters, digits, '_', '.' and '-')"
        )
    if not 0 < config.admin_expiring_hours <= 24 * 366:
        raise ConfigError("admin_expiring_hours must be between 0 and 8784")
    if not 0 < config.admin_session_minutes <= 24 * 60:
        raise ConfigError("admin_session_minutes must be between 0 and 1440")
    return config.resolved()
