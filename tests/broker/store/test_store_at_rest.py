"""Nothing secret is ever on disk in the clear: scan the raw database bytes."""

from __future__ import annotations

import base64
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import text

from broker.store import CredentialWrite, MasterKeyRing, Store, default_sqlite_url, migrate
from tests.broker.store.store_support import ALICE, T0, KeyFactory, KeyMaterial
from tests.pgcluster import PostgresCluster

PASSPHRASE = "a passphrase nobody should see"


def _needles(mat: KeyMaterial, ring: MasterKeyRing) -> dict[str, bytes]:
    body = b"".join(line for line in mat.key_pem.splitlines() if b"-----" not in line)
    master = ring.get(ring.active_id)
    assert master is not None
    return {
        "PEM marker": b"PRIVATE KEY",
        "key DER": mat.key_der,
        "key DER (first 48 bytes)": mat.key_der[:48],
        "key DER hex": mat.key_der[:48].hex().encode(),
        "PEM body (base64)": body[:48],
        "passphrase": PASSPHRASE.encode(),
        "master key": master,
        "master key hex": master.hex().encode(),
        "master key base64": base64.b64encode(master),
    }


def _fill(store: Store, mats: list[KeyMaterial]) -> None:
    store.put_credential(
        CredentialWrite(
            owner_dn=ALICE,
            username="alice",
            private_key_pem=mats[0].key_pem,
            certificate_chain=mats[0].chain_pem,
        ),
        now=datetime.now(UTC),
    )
    store.put_credential(
        CredentialWrite(
            owner_dn=ALICE,
            username="alice",
            name="protected",
            private_key_pem=mats[1].key_pem,
            certificate_chain=mats[1].chain_pem,
            passphrase=PASSPHRASE,
        ),
        now=datetime.now(UTC),
    )
    store.create_pending(
        requester_dn=ALICE,
        username="alice",
        name="next",
        private_key_pem=mats[2].key_pem,
        params={},
        now=T0,
    )


def _assert_absent(blob: bytes, mats: list[KeyMaterial], ring: MasterKeyRing) -> None:
    for mat in mats:
        for what, needle in _needles(mat, ring).items():
            assert needle not in blob, f"{what} found in the database at rest"


def test_sqlite_file_holds_no_plaintext_key(
    tmp_path: Path, master_keys: MasterKeyRing, new_key: KeyFactory
) -> None:
    url = default_sqlite_url(tmp_path / "state")
    migrate(url)
    mats = [new_key(), new_key(), new_key()]
    with Store(url, master_keys) as store:
        _fill(store, mats)
        # Sanity: the scan sees real data (the chain is stored in clear).
        blob = b"".join(p.read_bytes() for p in (tmp_path / "state").iterdir())
        assert mats[0].chain_pem.splitlines()[1].encode() in blob
        _assert_absent(blob, mats, master_keys)
        with store.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    blob = b"".join(p.read_bytes() for p in (tmp_path / "state").iterdir())
    _assert_absent(blob, mats, master_keys)


def test_postgres_dump_holds_no_plaintext_key(
    postgres_cluster: PostgresCluster,
    postgres_database: str,
    master_keys: MasterKeyRing,
    new_key: KeyFactory,
) -> None:
    migrate(postgres_database)
    mats = [new_key(), new_key(), new_key()]
    with Store(postgres_database, master_keys) as store:
        _fill(store, mats)
        dbname = postgres_database.rsplit("/", 1)[1]
        dump = subprocess.run(
            [
                str(postgres_cluster.bindir / "pg_dump"),
                "-h", "127.0.0.1",
                "-p", str(postgres_cluster.port),
                "-U", postgres_cluster.user,
                "--no-password",
                dbname,
            ],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout  # fmt: skip
        assert b"COPY public.credentials" in dump
        assert mats[0].chain_pem.splitlines()[1].encode() in dump
        _assert_absent(dump, mats, master_keys)

        # And every column of every row, as the driver returns it.
        raw = bytearray()
        with store.engine.connect() as conn:
            for table in ("credentials", "pending_delegations", "audit_events"):
                for row in conn.execute(text(f"SELECT * FROM {table}")):
                    for value in row:
                        raw += value if isinstance(value, bytes) else str(value).encode()
        assert len(raw) > 1000
        _assert_absent(bytes(raw), mats, master_keys)
