"""broker.toml: the passphrase throttle's settings reach the service, bad values are refused."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.config import load_config
from broker.errors import ConfigError
from broker.runtime import build_runtime, prepare_state


def _write(tmp_path: Path, limits: str) -> str:
    path = tmp_path / "broker.toml"
    path.write_text(f"[limits]\n{limits}\n")
    return str(path)


def test_throttle_defaults() -> None:
    config = load_config(None, {})
    assert config.passphrase_failures == 5
    assert config.passphrase_failure_minutes == 10


def test_throttle_settings_reach_the_service(tmp_path: Path) -> None:
    path = _write(tmp_path, "passphrase_failures = 3\npassphrase_failure_minutes = 2.5")
    config = load_config(path, {"state_dir": str(tmp_path / "state")})  # embedded default
    prepare_state(config)
    runtime = build_runtime(config)
    try:
        assert runtime.service.config.passphrase_failures == 3
        assert runtime.service.config.passphrase_failure_window == timedelta(minutes=2.5)
    finally:
        runtime.stop.set()
        runtime.service.store.close()


@pytest.mark.parametrize(
    ("limits", "words"),
    [
        ("passphrase_failures = -1", "passphrase_failures must be between 0"),
        ("passphrase_failures = 100000", "passphrase_failures must be between 0"),
        ("passphrase_failure_minutes = 0", "passphrase_failure_minutes must be between 0 and 1440"),
        ("passphrase_failure_minutes = 5000", "passphrase_failure_minutes must be between"),
    ],
)
def test_bad_throttle_settings_are_refused(tmp_path: Path, limits: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, limits), {})
    assert words in err.value.message


def test_hardening_defaults_bind_usernames_and_cap_pending() -> None:
    config = load_config(None, {})
    assert config.username_binding == "dn"  # on for new deployments
    assert config.max_pending_per_user == 10
    assert config.housekeeping_seconds == 60
    assert config.refusal_audit_seconds == 60


def test_hardening_settings_reach_the_service(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        'username_binding = "none"\nmax_pending_per_user = 4\n'
        "housekeeping_seconds = 1\nrefusal_audit_seconds = 0",
    )
    config = load_config(path, {"state_dir": str(tmp_path / "state")})
    prepare_state(config)
    runtime = build_runtime(config)
    try:
        service = runtime.service
        assert service.config.username_binding == "none"
        assert service.config.max_pending_per_user == 4
        assert service.config.refusal_audit_window == timedelta(0)
        # every process that builds a runtime purges on a schedule: an expired pending
        # delegation (an encrypted private key) disappears within a few seconds
        assert any(t.name == "broker-housekeeping" for t in threading.enumerate())
        from cryptography.hazmat.primitives.asymmetric import ec

        from broker.pki.loading import key_to_pem

        past = datetime.now(UTC) - timedelta(hours=1)
        service.store.create_pending(
            requester_dn="/DC=org/CN=Alice",
            username="alice",
            params={},
            now=past,
            private_key_pem=key_to_pem(ec.generate_private_key(ec.SECP256R1())),
        )
        assert service.store.master_key_ids_in_use()
        deadline = time.monotonic() + 10
        while service.store.master_key_ids_in_use() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not service.store.master_key_ids_in_use()
        assert service.counters()["pending_purged"] == 1
    finally:
        runtime.stop.set()
        runtime.service.store.close()


@pytest.mark.parametrize(
    ("limits", "words"),
    [
        ('username_binding = "cn"', "username_binding must be 'dn'"),
        ("max_pending_per_user = -1", "max_pending_per_user must be between 0"),
        ("housekeeping_seconds = 0", "housekeeping_seconds must be between 1"),
        ("refusal_audit_seconds = 7200", "refusal_audit_seconds must be between 0"),
    ],
)
def test_bad_hardening_settings_are_refused(tmp_path: Path, limits: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, limits), {})
    assert words in err.value.message
