"""Master key rotation with real rows on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from broker.errors import ConfigError
from broker.store import CredentialWrite, MasterKeyRing, Store, load_master_keys, rotate_master_key
from broker.store.crypto import replace_master_key_file
from tests.broker.store.store_support import ALICE, BOB, T0, KeyFactory


def test_rotation_keeps_everything_decryptable(
    db_url: str, key_file: Path, new_key: KeyFactory
) -> None:
    old = load_master_keys(key_file)
    with Store(db_url, old) as store:
        mats = {}
        for i in range(5):
            mats[f"c{i}"] = new_key()
            store.put_credential(
                CredentialWrite(
                    owner_dn=ALICE,
                    username="alice",
                    name=f"c{i}",
                    private_key_pem=mats[f"c{i}"].key_pem,
                    certificate_chain=mats[f"c{i}"].chain_pem,
                    passphrase="pass phrase" if i == 3 else None,
                ),
                now=datetime.now(UTC),
            )
        pend_mat = new_key()
        pending = store.create_pending(
            requester_dn=BOB,
            username="bob",
            private_key_pem=pend_mat.key_pem,
            params={},
            now=T0,
        )

        # A second server that loaded the key file before the rotation.
        with Store(db_url, load_master_keys(key_file)) as stale:
            report = rotate_master_key(store, key_file, batch_size=2, now=datetime.now(UTC))
            assert report.rewrapped == 6
            assert report.retired_key_ids == old.ids

            on_disk = json.loads(key_file.read_text())
            assert [k["id"] for k in on_disk["keys"]] == [report.new_key_id]
            assert (key_file.stat().st_mode & 0o777) == 0o600
            assert store.master_key_ids_in_use() == {report.new_key_id: 6}

            # Everything opens with only the new key ...
            fresh = load_master_keys(key_file)
            assert fresh.get(old.active_id) is None
            with Store(db_url, fresh) as reader:
                for name, mat in mats.items():
                    rec = reader.get_credential("alice", name)
                    phrase = "pass phrase" if name == "c3" else None
                    assert reader.decrypt_private_key(rec, phrase) == mat.key_pem
                taken = reader.take_pending(pending.id, BOB, now=T0)
                assert reader.decrypt_private_key(taken) == pend_mat.key_pem

            # ... and the stale server copes: it meets an unknown key id and
            # reloads the file, and its next write uses the new key.
            rec = stale.get_credential("alice", "c0")
            assert stale.decrypt_private_key(rec) == mats["c0"].key_pem
            stale.put_credential(
                CredentialWrite(
                    owner_dn=ALICE,
                    username="alice",
                    name="after",
                    private_key_pem=mats["c1"].key_pem,
                    certificate_chain=mats["c1"].chain_pem,
                ),
                now=datetime.now(UTC),
            )
            assert stale.get_credential("alice", "after").envelope.master_key_id == (
                report.new_key_id
            )


def test_writer_during_rotation_picks_up_the_new_key(
    db_url: str, key_file: Path, new_key: KeyFactory
) -> None:
    """Step 1 of a rotation (new key appended) seen by a running server."""
    ring = load_master_keys(key_file)
    with Store(db_url, ring) as server:
        grown = MasterKeyRing(keys=(*ring.keys, ("mk-next", bytes(range(32)))))
        replace_master_key_file(key_file, grown, now=datetime.now(UTC))
        mat = new_key()
        rec = server.put_credential(
            CredentialWrite(
                owner_dn=ALICE,
                username="alice",
                private_key_pem=mat.key_pem,
                certificate_chain=mat.chain_pem,
            ),
            now=datetime.now(UTC),
        )
        assert rec.envelope.master_key_id == "mk-next"
        assert server.decrypt_private_key(rec) == mat.key_pem


def test_rotation_refuses_when_keys_are_missing(
    db_url: str, key_file: Path, tmp_path: Path, new_key: KeyFactory
) -> None:
    with Store(db_url, load_master_keys(key_file)) as store:
        mat = new_key()
        store.put_credential(
            CredentialWrite(
                owner_dn=ALICE,
                username="alice",
                private_key_pem=mat.key_pem,
                certificate_chain=mat.chain_pem,
            ),
            now=datetime.now(UTC),
        )
        from broker.store import init_master_key_file

        other = tmp_path / "other.json"
        init_master_key_file(other, now=datetime.now(UTC))
        before = other.read_bytes()
        with pytest.raises(ConfigError, match="missing"):
            rotate_master_key(store, other, now=datetime.now(UTC))
        assert other.read_bytes() == before
