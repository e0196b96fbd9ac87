"""Envelope encryption and the master key file (no database)."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import AuthenticationError, ConfigError, InputError, StoreError
from broker.store import crypto
from broker.store.crypto import MasterKeyRing
from tests.prerequisites import require_root

CTX = crypto.credential_context("/CN=a", "alice", "default")


def test_seal_open_round_trip() -> None:
    ring = MasterKeyRing.generate(now=datetime.now(UTC))
    env = crypto.seal(b"secret key", CTX, ring)
    assert env.master_key_id == ring.active_id
    assert b"secret key" not in env.ciphertext + env.wrapped_data_key
    assert crypto.open_envelope(env, CTX, ring) == b"secret key"


@settings(max_examples=40, deadline=None)
@given(plaintext=st.binary(max_size=4096), user=st.text(max_size=40), name=st.text(max_size=40))
def test_round_trip_any_payload(plaintext: bytes, user: str, name: str) -> None:
    ring = MasterKeyRing.generate(now=datetime.now(UTC))
    ctx = crypto.credential_context("/CN=x", user, name)
    assert crypto.open_envelope(crypto.seal(plaintext, ctx, ring), ctx, ring) == plaintext


def test_context_binding_stops_row_swaps() -> None:
    ring = MasterKeyRing.generate(now=datetime.now(UTC))
    env = crypto.seal(b"k", CTX, ring)
    for other in (
        crypto.credential_context("/CN=a", "alice", "other"),
        crypto.credential_context("/CN=b", "alice", "default"),
        # Framing: moving a separator between fields must not collide.
        crypto.credential_context("/CN=a", "alic", "edefault"),
    ):
        with pytest.raises(StoreError) as err:
            crypto.open_envelope(env, other, ring)
        assert err.value.reason == "integrity"


def test_tampering_is_detected() -> None:
    ring = MasterKeyRing.generate(now=datetime.now(UTC))
    env = crypto.seal(b"k" * 100, CTX, ring)
    flipped = bytes([env.ciphertext[0] ^ 1]) + env.ciphertext[1:]
    with pytest.raises(StoreError):
        crypto.open_envelope(crypto.Envelope(**{**env.__dict__, "ciphertext": flipped}), CTX, ring)
    with pytest.raises(StoreError):
        crypto.open_envelope(
            crypto.Envelope(**{**env.__dict__, "wrapped_data_key": env.wrapped_data_key[:-1]}),
            CTX,
            ring,
        )


def test_passphrase_is_required_and_checked() -> None:
    ring = MasterKeyRing.generate(now=datetime.now(UTC))
    env = crypto.seal(b"k", CTX, ring, passphrase="correct horse")
    assert env.passphrase_protected and env.kdf_salt and env.kdf_params
    assert crypto.open_envelope(env, CTX, ring, "correct horse") == b"k"
    for attempt in (None, "wrong passphrase", "", "x" * 5000):
        with pytest.raises(AuthenticationError) as err:
            crypto.open_envelope(env, CTX, ring, attempt)
        assert err.value.message == "invalid credential passphrase"


def test_short_passphrase_refused() -> None:
    ring = MasterKeyRing.generate(now=datetime.now(UTC))
    with pytest.raises(InputError, match="at least 6"):
        crypto.seal(b"k", CTX, ring, passphrase="12345")


def test_change_passphrase_and_rewrap_keep_ciphertext() -> None:
    ring = MasterKeyRing.generate(now=datetime.now(UTC))
    env = crypto.seal(b"k", CTX, ring, passphrase="first-pass")
    changed = crypto.change_envelope_passphrase(env, CTX, ring, "first-pass", "second-pass")
    assert changed.ciphertext == env.ciphertext
    with pytest.raises(AuthenticationError):
        crypto.open_envelope(changed, CTX, ring, "first-pass")
    assert crypto.open_envelope(changed, CTX, ring, "second-pass") == b"k"

    bigger = MasterKeyRing(keys=(*ring.keys, ("mk-new", os.urandom(32))))
    moved = crypto.rewrap(changed, CTX, bigger)
    assert moved.master_key_id == "mk-new"
    only_new = MasterKeyRing(keys=(("mk-new", bigger.get("mk-new") or b""),))
    # Rewrapping needed no passphrase, and the passphrase is still required.
    assert crypto.open_envelope(moved, CTX, only_new, "second-pass") == b"k"
    with pytest.raises(AuthenticationError):
        crypto.open_envelope(moved, CTX, only_new)

    removed = crypto.change_envelope_passphrase(moved, CTX, only_new, "second-pass", None)
    assert not removed.passphrase_protected and removed.kdf_salt is None
    assert crypto.open_envelope(removed, CTX, only_new) == b"k"


def test_unknown_master_key_is_a_clear_error() -> None:
    env = crypto.seal(b"k", CTX, MasterKeyRing.generate(now=datetime.now(UTC)))
    with pytest.raises(StoreError) as err:
        crypto.open_envelope(env, CTX, MasterKeyRing.generate(now=datetime.now(UTC)))
    assert err.value.reason == "unknown_master_key"
    assert env.master_key_id in err.value.message


def test_ring_repr_hides_keys() -> None:
    ring = MasterKeyRing.generate(now=datetime.now(UTC))
    key = ring.get(ring.active_id)
    assert key is not None
    assert key.hex() not in repr(ring) and repr(key) not in repr(ring)


# ---------------------------------------------------------------- the key file


def test_init_creates_private_file_and_refuses_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "mk.json"
    ring = crypto.init_master_key_file(path, now=datetime.now(UTC))
    st_ = path.stat()
    assert stat.S_IMODE(st_.st_mode) == 0o600
    assert st_.st_uid == os.geteuid()
    assert len(ring.ids) == 1 and ring.path == path
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        crypto.init_master_key_file(path, now=datetime.now(UTC))
    assert path.read_bytes() == before
    assert crypto.load_master_keys(path).keys == ring.keys


def test_init_refuses_through_symlink(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(ConfigError):
        crypto.init_master_key_file(tmp_path / "link", now=datetime.now(UTC))
    assert not (tmp_path / "target").exists()


def test_world_readable_key_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "mk.json"
    crypto.init_master_key_file(path, now=datetime.now(UTC))
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        crypto.load_master_keys(path)
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        crypto.load_master_keys(path)
    path.chmod(0o400)
    crypto.load_master_keys(path)


def test_symlinked_key_file_refused(tmp_path: Path) -> None:
    real = tmp_path / "mk.json"
    crypto.init_master_key_file(real, now=datetime.now(UTC))
    link = tmp_path / "link.json"
    link.symlink_to(real)
    with pytest.raises(ConfigError, match="symbolic link"):
        crypto.load_master_keys(link)


@pytest.mark.root
def test_key_file_of_another_user_refused(tmp_path: Path) -> None:
    require_root("giving the file to another user")
    path = tmp_path / "mk.json"
    crypto.init_master_key_file(path, now=datetime.now(UTC))
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        crypto.load_master_keys(path)


def test_missing_and_malformed_key_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        crypto.load_master_keys(tmp_path / "nope")
    bad_docs = [
        b"not json",
        b"[]",
        json.dumps({"format": crypto.KEY_FILE_FORMAT, "version": 1, "keys": []}).encode(),
        json.dumps(
            {"format": crypto.KEY_FILE_FORMAT, "version": 1, "keys": [{"id": "a", "key": "AA=="}]}
        ).encode(),
        json.dumps(
            {"format": crypto.KEY_FILE_FORMAT, "version": 1, "keys": [{"id": "../x", "key": ""}]}
        ).encode(),
    ]
    for i, doc in enumerate(bad_docs):
        path = tmp_path / f"bad{i}"
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.write(fd, doc)
        os.close(fd)
        with pytest.raises(ConfigError, match="malformed"):
            crypto.load_master_keys(path)


def test_replace_is_atomic_and_private(tmp_path: Path) -> None:
    path = tmp_path / "mk.json"
    ring = crypto.init_master_key_file(path, now=datetime.now(UTC))
    grown = MasterKeyRing(keys=(*ring.keys, ("mk-second", os.urandom(32))))
    loaded = crypto.replace_master_key_file(path, grown, now=datetime.now(UTC))
    assert loaded.ids == (ring.active_id, "mk-second")
    assert loaded.active_id == "mk-second"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ring.changed_on_disk()
    assert [p.name for p in tmp_path.iterdir()] == ["mk.json"]  # no temp file left


def test_key_file_times_come_from_the_caller(tmp_path: Path) -> None:
    """The key tools read no clock: ids and "created" stamps are the ``now`` given."""
    path = tmp_path / "mk.json"
    made = datetime(2031, 2, 3, 4, 5, 6, tzinfo=UTC)
    ring = crypto.init_master_key_file(path, now=made)
    assert ring.active_id.startswith("mk-20310203T040506Z-")
    later = datetime(2032, 7, 8, 9, 10, 11, tzinfo=UTC)
    grown = MasterKeyRing(keys=(*ring.keys, ("mk-second", os.urandom(32))))
    crypto.replace_master_key_file(path, grown, now=later)
    created = {k["id"]: k["created"] for k in json.loads(path.read_bytes())["keys"]}
    assert created == {ring.active_id: made.isoformat(), "mk-second": later.isoformat()}
    assert MasterKeyRing.generate(now=later).active_id.startswith("mk-20320708T091011Z-")
