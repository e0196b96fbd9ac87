"""The staged master-key rotation for several nodes (add, activate, rewrap, retire),
each node holding its own copy of the key file."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from broker.errors import Conflict, InputError
from broker.store import CredentialWrite, Store, load_master_keys
from broker.store.crypto import (
    KeyStatus,
    activate_master_key,
    add_master_key,
    key_status,
    retire_master_key,
    rewrap_all,
)
from tests.broker.store.store_support import ALICE, KeyFactory


def test_key_status_lists_file_keys_then_missing_ones(key_file: Path) -> None:
    ring = load_master_keys(key_file)
    (only,) = ring.ids
    assert key_status(ring, {only: 3, "mk-gone": 2}) == [
        KeyStatus(only, True, True, 3),
        KeyStatus("mk-gone", False, False, 2),
    ]


def test_staged_rotation_across_two_key_file_copies(
    db_url: str, key_file: Path, tmp_path: Path, new_key: KeyFactory
) -> None:
    other = tmp_path / "node-b.key"
    shutil.copy2(key_file, other)
    node_a = Store(db_url, load_master_keys(key_file))
    node_b = Store(db_url, load_master_keys(other))
    try:
        material = {n: new_key() for n in ("one", "two", "three")}

        def put(store: Store, name: str) -> None:
            store.put_credential(
                CredentialWrite(
                    owner_dn=ALICE,
                    username="alice",
                    name=name,
                    private_key_pem=material[name].key_pem,
                    certificate_chain=material[name].chain_pem,
                ),
                now=datetime.now(UTC),
            )

        def readable(store: Store, *names: str) -> None:
            for name in names:
                record = store.get_credential("alice", name)
                assert store.decrypt_private_key(record) == material[name].key_pem

        put(node_a, "one")
        old_id = load_master_keys(key_file).active_id
        new_id = add_master_key(key_file, now=datetime.now(UTC))
        assert load_master_keys(key_file).active_id == old_id  # standby, not active
        shutil.copy2(key_file, other)
        activate_master_key(key_file, new_id, now=datetime.now(UTC))
        put(node_a, "two")  # node A wraps with the new key, node B still with the old one
        put(node_b, "three")
        readable(node_a, "one", "two", "three")
        readable(node_b, "one", "two", "three")
        assert node_a.master_key_ids_in_use() == {old_id: 2, new_id: 1}
        shutil.copy2(key_file, other)
        with pytest.raises(Conflict, match="still wrapped"):
            retire_master_key(node_a, key_file, old_id, now=datetime.now(UTC))
        with pytest.raises(InputError, match="active key"):
            retire_master_key(node_a, key_file, new_id, now=datetime.now(UTC))
        assert rewrap_all(node_b, other) == 2
        retire_master_key(node_a, key_file, old_id, now=datetime.now(UTC))
        shutil.copy2(key_file, other)
        assert load_master_keys(other).ids == (new_id,)
        readable(node_a, "one", "two", "three")
        readable(node_b, "one", "two", "three")
        with Store(db_url, load_master_keys(other)) as restarted:  # only the new key
            readable(restarted, "one", "two", "three")
    finally:
        node_a.close()
        node_b.close()


def test_activating_an_unknown_key_is_refused(key_file: Path) -> None:
    with pytest.raises(InputError, match="no key 'mk-nope'"):
        activate_master_key(key_file, "mk-nope", now=datetime.now(UTC))
