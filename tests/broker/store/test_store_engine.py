"""Engine configuration: SQLite pragmas, URL handling, error mapping."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.errors import ConfigError, StoreUnavailable
from broker.store import default_sqlite_url, make_engine, migrate
from broker.store.engine import safe_url


def test_sqlite_pragmas(tmp_path: Path) -> None:
    url = default_sqlite_url(tmp_path / "state")
    assert url.endswith("/state/broker.sqlite")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
            assert conn.exec_driver_sql("PRAGMA secure_delete").scalar() == 1
    finally:
        engine.dispose()


def test_postgres_engine_pings(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    try:
        assert engine.pool._pre_ping
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "sqlite:///:memory:",
        "mysql://u:p@localhost/db",
        "postgresql+psycopg2://broker@127.0.0.1/db",  # only psycopg 3 is supported
        "::not a url::",
    ],
)
def test_bad_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        make_engine(url)


def test_safe_url_masks_password() -> None:
    shown = safe_url("postgresql+psycopg://broker:s3cr3t@db.example.org/broker")
    assert "s3cr3t" not in shown and "***" in shown


def test_migrate_unreachable_database() -> None:
    with pytest.raises(StoreUnavailable) as err:
        migrate("postgresql+psycopg://broker:pw-x1@127.0.0.1:1/db?connect_timeout=2")
    assert "pw-x1" not in err.value.message
    assert "check that PostgreSQL is running" in err.value.message
