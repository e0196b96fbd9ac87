"""broker.toml: the passphrase throttle's settings reach the service, bad values are refused."""

from __future__ import annotations

from datetime import timedelta
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


@pytest.mark.parametrize(("limits", "words"), [
    ("passphrase_failures = -1", "passphrase_failures must be between 0"),
    ("passphrase_failures = 100000", "passphrase_failures must be between 0"),
    ("passphrase_failure_minutes = 0", "passphrase_failure_minutes must be between 0 and 1440"),
    ("passphrase_failure_minutes = 5000", "passphrase_failure_minutes must be between"),
])
def test_bad_throttle_settings_are_refused(tmp_path: Path, limits: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, limits), {})
    assert words in err.value.message
