"""Assemble a :class:`BrokerService` from a :class:`ServerConfig` (the IO side of startup)."""

from __future__ import annotations

import atexit
import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from broker.config import ServerConfig
from broker.errors import ConfigError
from broker.fileio import make_private_dir
from broker.onlineca import OnlineCa
from broker.pam_auth import PamSettings
from broker.pki.trust import TrustStore
from broker.policy import unsafe_rule_message, unsafe_rules
from broker.policy_dir import PolicyDirectory
from broker.service import BrokerService, ServiceConfig
from broker.store import Store, init_master_key_file, load_master_keys, make_engine, migrate
from broker.trustdir import ReloadingTrustStore, load_vomsdir

log = logging.getLogger("broker.runtime")


def prepare_state(config: ServerConfig) -> None:
    """Create what the embedded default needs: state dir, dev PKI, master key, schema."""
    state = Path(config.state_dir)
    make_private_dir(state)
    if config.uses_dev_pki and not Path(config.host_cert).exists():
        from broker.devpki import write_dev_pki

        write_dev_pki(
            Path(config.host_cert).parent, now=datetime.now(UTC), pilots=("pilot", "pilot2")
        )
        log.warning(
            "no host certificate configured: made a development PKI in %s",
            Path(config.host_cert).parent,
        )
    if not Path(config.master_key_file).exists():
        if Path(config.master_key_file).parent != state:
            raise ConfigError(
                f"the master key file {config.master_key_file} does not exist; "
                "create it with: broker keys init"
            )
        init_master_key_file(config.master_key_file, now=datetime.now(UTC))
        log.warning("created a new master key in %s", config.master_key_file)
    migrate(config.database_url)


def check_policy(config: ServerConfig) -> PolicyDirectory:
    """Load the policy; refuse an invalid or unsafe one (MyProxy's 'unsafe policy')."""
    policy = PolicyDirectory(config.policy_dir, min_interval=2.0, allow_unsafe=True)
    unsafe = unsafe_rules(policy.current())
    if unsafe:
        raise ConfigError(
            "refusing to start on an unsafe policy: "
            + "; ".join(unsafe_rule_message(rule) for rule in unsafe)
        )
    # From now on an edit that adds an unsafe rule is a broken edit: logged, not applied.
    policy.allow_unsafe = False
    return policy


@dataclass
class Runtime:
    config: ServerConfig
    service: BrokerService
    policy: PolicyDirectory
    stop: threading.Event
    pam: PamSettings | None = None  # password logins, when pam_service is set
    online_ca: OnlineCa | None = None  # certificates for PAM users


def build_pam(
    config: ServerConfig, trust: TrustStore
) -> tuple[PamSettings | None, OnlineCa | None]:
    """The PAM settings and the online CA the config asks for (or None)."""
    if not config.pam_service:
        return None, None
    pam = PamSettings(config.pam_service, confdir=config.pam_confdir or None)
    if config.pam_confdir:
        log.warning(
            "PAM service %s is read from %s (pam_confdir: for tests only)",
            config.pam_service,
            config.pam_confdir,
        )
    if not config.online_ca_cert:
        return pam, None
    online_ca = OnlineCa.load(
        config.online_ca_cert,
        config.online_ca_key,
        dn_template=config.online_ca_dn_template,
        max_lifetime=timedelta(hours=config.online_ca_max_hours),
    )
    if not trust.issuers_of(online_ca.ca.cert):
        log.warning(
            "the online CA %s is not in the CA directory %s: this broker will refuse "
            "the certificates it issues",
            online_ca.ca.cert.subject.rfc4514_string(),
            config.ca_dir,
        )
    return pam, online_ca


def start_housekeeping(
    service: BrokerService, stop: threading.Event, interval: float
) -> threading.Thread:
    """Run :meth:`BrokerService.maintain` every ``interval`` seconds in a daemon thread of
    this process (each worker and the MyProxy child have one; the deletes are idempotent)."""

    def loop() -> None:
        while not stop.wait(interval):
            try:
                service.maintain()
            except Exception:  # a database outage must not end the loop
                log.exception("housekeeping failed; retrying in %.0f s", interval)

    thread = threading.Thread(target=loop, name="broker-housekeeping", daemon=True)
    thread.start()
    # A worker that exits normally writes the refusal counts of its open windows.
    atexit.register(service.flush_refusals)
    return thread


def build_runtime(config: ServerConfig) -> Runtime:
    keys = load_master_keys(config.master_key_file)
    store = Store(make_engine(config.database_url), keys)
    policy = check_policy(config)
    trust = ReloadingTrustStore(config.ca_dir)
    vomsdir = load_vomsdir(config.vomsdir)

    def current_policy() -> object:
        policy.reload_if_changed()
        return policy.current()

    service = BrokerService(
        store,
        trust,
        current_policy,  # type: ignore[arg-type]
        vomsdir=vomsdir,
        config=ServiceConfig(
            max_stored_lifetime=timedelta(hours=config.max_stored_hours),
            max_proxy_lifetime=timedelta(hours=config.max_proxy_hours),
            delegation_key=config.delegation_key,
            passphrase_failures=config.passphrase_failures,
            passphrase_failure_window=timedelta(minutes=config.passphrase_failure_minutes),
            max_pending_per_user=config.max_pending_per_user,
            username_binding=config.username_binding,
            refusal_audit_window=timedelta(seconds=config.refusal_audit_seconds),
        ),
    )
    if config.tokens is not None and config.tokens.issuers:
        from broker.tokens import IssuerDirectory

        service.use_tokens(IssuerDirectory(config.tokens))
    stop = threading.Event()
    start_housekeeping(service, stop, config.housekeeping_seconds)
    pam, online_ca = build_pam(config, trust())
    return Runtime(
        config=config, service=service, policy=policy, stop=stop, pam=pam, online_ca=online_ca
    )
