"""Fixtures for the credential store tests: a migrated database on SQLite and on
PostgreSQL (parametrised), a master key file, and key material."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from broker.store import (
    MasterKeyRing,
    Store,
    default_sqlite_url,
    init_master_key_file,
    load_master_keys,
    migrate,
)
from tests.broker.store.store_support import KeyFactory, KeyMaterial, make_key_material


@pytest.fixture(scope="session")
def rsa_material() -> KeyMaterial:
    # RSA generation is slow-ish; one per session is enough.
    return make_key_material("rsa", "Alice Example RSA", 12)


@pytest.fixture
def new_key() -> KeyFactory:
    def factory(cn: str = "Alice Example", hours: int = 12) -> KeyMaterial:
        return make_key_material("ec", cn, hours)

    return factory


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "master.json"
    path.parent.mkdir(mode=0o700)
    init_master_key_file(path, now=datetime.now(UTC))
    return path


@pytest.fixture
def master_keys(key_file: Path) -> MasterKeyRing:
    return load_master_keys(key_file)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        url = default_sqlite_url(tmp_path / "state")
    else:
        url = str(request.getfixturevalue("postgres_database"))
    migrate(url)
    return url


@pytest.fixture
def store(db_url: str, master_keys: MasterKeyRing) -> Iterator[Store]:
    with Store(db_url, master_keys) as s:
        yield s
