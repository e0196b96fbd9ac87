"""Limits that must hold across threads, worker processes and nodes: the per-requester
pending cap, single-use renewal challenges, the shared challenge secret and the
passphrase-attempt reservation; housekeeping; private database and key files.

Every case runs on SQLite and PostgreSQL (the ``db_url`` fixture); a second Store on
the same database stands for another worker process or node.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest

from broker.errors import AuthenticationError, BrokerError, ConfigError, TooManyAttempts
from broker.store import (
    MasterKeyRing,
    Store,
    default_sqlite_url,
    load_master_keys,
    make_engine,
    migrate,
)
from tests.broker.store.store_support import ALICE, BOB, T0, KeyFactory

T = TypeVar("T")


def _all_at_once(count: int, fn: Callable[[int], T]) -> list[T | BaseException]:
    """Run ``fn(i)`` for i < count in threads released together; results or exceptions."""
    barrier = threading.Barrier(count)

    def run(i: int) -> T | BaseException:
        barrier.wait()
        try:
            return fn(i)
        except BrokerError as exc:
            return exc

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


def test_pending_cap_holds_under_concurrent_requests(
    db_url: str, master_keys: MasterKeyRing, new_key: KeyFactory
) -> None:
    key_pem = new_key().key_pem
    with Store(db_url, master_keys) as one, Store(db_url, master_keys) as two:

        def start(i: int) -> object:
            return (one if i % 2 else two).create_pending(
                requester_dn=ALICE,
                username="alice",
                name=f"n{i}",
                private_key_pem=key_pem,
                params={},
                now=T0,
                max_live=3,
            )

        results = _all_at_once(12, start)
        refused = [r for r in results if isinstance(r, TooManyAttempts)]
        assert len(results) - len(refused) == 3, results
        assert all(r.reason == "too_many_pending" for r in refused)
        assert one.count_pending(ALICE, now=T0) == 3
        # another requester is not affected; expired rows do not count
        one.create_pending(
            requester_dn=BOB, username="bob", private_key_pem=key_pem, params={}, now=T0, max_live=3
        )
        later = T0 + timedelta(minutes=11)
        one.create_pending(
            requester_dn=ALICE,
            username="alice",
            private_key_pem=key_pem,
            params={},
            now=later,
            max_live=3,
        )
        # housekeeping removes the expired rows (each an encrypted key) and counts them
        purged = two.purge_expired(later, attempts_before=later)
        assert purged["pending"] == 4  # alice's three and bob's one
        assert one.count_pending(ALICE, now=later) == 1


def test_renewal_challenge_is_single_use_across_processes(
    db_url: str, master_keys: MasterKeyRing
) -> None:
    with Store(db_url, master_keys) as one, Store(db_url, master_keys) as two:
        results = _all_at_once(
            8,
            lambda i: (one if i % 2 else two).use_challenge(
                "nonce-abc", expires_at=T0 + timedelta(minutes=5)
            ),
        )
        assert results.count(None) == 1
        assert all(
            isinstance(r, AuthenticationError) and r.reason == "challenge_reused"
            for r in results
            if r is not None
        )
        two.use_challenge("nonce-other", expires_at=T0 + timedelta(minutes=5))
        assert one.purge_expired(T0 + timedelta(minutes=6), attempts_before=T0)["challenges"] == 2


def test_shared_secret_is_created_once(db_url: str, master_keys: MasterKeyRing) -> None:
    with Store(db_url, master_keys) as one, Store(db_url, master_keys) as two:
        secrets = _all_at_once(
            6, lambda i: (one if i % 2 else two).shared_secret("s", now=datetime.now(UTC))
        )
        assert all(isinstance(s, bytes) and len(s) == 32 for s in secrets)
        assert len(set(secrets)) == 1
        assert one.shared_secret("other", now=datetime.now(UTC)) != secrets[0]


def test_passphrase_attempts_are_reserved_atomically(
    db_url: str, master_keys: MasterKeyRing
) -> None:
    with Store(db_url, master_keys) as one, Store(db_url, master_keys) as two:

        def reserve(i: int) -> tuple[int | None, int]:
            return (one if i % 2 else two).reserve_passphrase_attempt(
                username="alice",
                credential_name="pp",
                client_address="192.0.2.7",
                since=T0 - timedelta(minutes=10),
                limit=5,
                now=T0,
            )

        results = _all_at_once(24, reserve)
        granted = [r for r in results if isinstance(r, tuple) and r[0] is not None]
        assert len(granted) == 5, results
        # a success frees its place, a failure keeps it
        first, second = granted[0][0], granted[1][0]
        assert first is not None and second is not None
        one.finish_passphrase_attempt(first, failed=False)
        two.finish_passphrase_attempt(second, failed=True)
        again = reserve(0)
        assert again[0] is not None and again[1] == 4
        assert reserve(1) == (None, 5)
        # another address has its own budget
        other = one.reserve_passphrase_attempt(
            username="alice",
            credential_name="pp",
            client_address="198.51.100.1",
            since=T0 - timedelta(minutes=10),
            limit=5,
            now=T0,
        )
        assert other[0] is not None and other[1] == 0


def test_new_sqlite_database_file_is_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        url = default_sqlite_url(tmp_path / "elsewhere")
        migrate(url)
        engine = make_engine(url)
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
        engine.dispose()
    finally:
        os.umask(old)
    database = tmp_path / "elsewhere" / "broker.sqlite"
    assert stat.S_IMODE(database.stat().st_mode) == 0o600
    for extra in ("broker.sqlite-wal", "broker.sqlite-shm"):
        path = tmp_path / "elsewhere" / extra
        if path.exists():
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


def test_master_key_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "master.key"
    os.mkfifo(fifo, 0o600)
    outcome: list[BaseException | object] = []
    worker = threading.Thread(target=lambda: outcome.append(_try_load(fifo)), daemon=True)
    worker.start()
    worker.join(5)
    if worker.is_alive():
        # unblock the reader so the test process can exit, then fail
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        worker.join(5)
        pytest.fail("load_master_keys blocked on a FIFO")
    assert isinstance(outcome[0], ConfigError), outcome
    assert "not a regular file" in str(outcome[0])


def _try_load(path: Path) -> BaseException | object:
    try:
        return load_master_keys(path)
    except BaseException as exc:
        return exc
