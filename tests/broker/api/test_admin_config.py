"""broker.toml: the admin page's settings, their defaults and the refusal of bad values."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from broker.admin_service import AdminSettings
from broker.config import load_config
from broker.errors import ConfigError


def _write(tmp_path: Path, server: str) -> str:
    path = tmp_path / "broker.toml"
    path.write_text(f"[server]\n{server}\n")
    return str(path)


def test_admin_defaults_and_settings(tmp_path: Path) -> None:
    assert AdminSettings.from_config(load_config(None, {})) == AdminSettings(
        group="site-admins",
        expiring_window=timedelta(hours=24),
        session_lifetime=timedelta(minutes=30),
    )
    path = _write(
        tmp_path, 'admin_group = "ops.admins"\nadmin_expiring_hours = 72\nadmin_session_minutes = 5'
    )
    settings = AdminSettings.from_config(load_config(path, {}))
    assert settings.group == "ops.admins"
    assert settings.expiring_window == timedelta(hours=72)
    assert settings.session_lifetime == timedelta(minutes=5)


@pytest.mark.parametrize(
    ("server", "words"),
    [
        ('admin_group = ""', "admin_group must be a policy group name"),
        ('admin_group = "group:site-admins"', "admin_group must be a policy group name"),
        ("admin_expiring_hours = 0", "admin_expiring_hours must be between 0 and 8784"),
        ("admin_session_minutes = 100000", "admin_session_minutes must be between 0 and 1440"),
    ],
)
def test_bad_admin_settings_are_refused(tmp_path: Path, server: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, server), {})
    assert words in err.value.message
