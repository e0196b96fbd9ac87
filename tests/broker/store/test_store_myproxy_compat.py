"""Issue 13 in the store (SQLite and PostgreSQL): keys their owner encrypted (MyProxy
STORE), owners' key-retriever lists and usernames as long and free as MyProxy's."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from broker.errors import AuthenticationError, PemError
from broker.store import CredentialWrite, Store
from broker.store.crypto import is_owner_encrypted
from tests.broker.store.store_support import ALICE, KeyMaterial

PASSPHRASE = "owner-passphrase-1"


def _encrypted(material: KeyMaterial, passphrase: str = PASSPHRASE) -> bytes:
    key = serialization.load_pem_private_key(material.key_pem, password=None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase.encode()),
    )


def test_owner_encrypted_key_opens_only_with_its_passphrase(
    store: Store, rsa_material: KeyMaterial
) -> None:
    encrypted = _encrypted(rsa_material)
    record = store.put_credential(
        CredentialWrite(
            owner_dn=ALICE,
            username="alice",
            name="stored",
            private_key_pem=encrypted,
            certificate_chain=rsa_material.chain_pem,
            owner_encrypted_key=True,
            key_retrievers=[ALICE],
        ),
        now=datetime.now(UTC),
    )
    again = store.get_credential("alice", "stored")
    assert again.passphrase_protected and is_owner_encrypted(again.envelope)
    assert again.key_retrievers == (ALICE,)
    # the encrypted PEM is inside the envelope, not in the row
    assert encrypted not in again.envelope.ciphertext
    with pytest.raises(AuthenticationError):
        store.decrypt_private_key(again, None)
    with pytest.raises(AuthenticationError):
        store.decrypt_private_key(again, "not-the-passphrase")
    clear = store.decrypt_private_key(again, PASSPHRASE)
    key = serialization.load_pem_private_key(clear, password=None)
    original = serialization.load_pem_private_key(rsa_material.key_pem, password=None)
    assert key.private_numbers() == original.private_numbers()
    assert record.id == again.id


def test_owner_encrypted_key_passphrase_change_reseals(
    store: Store, rsa_material: KeyMaterial
) -> None:
    store.put_credential(
        CredentialWrite(
            owner_dn=ALICE,
            username="alice",
            name="c",
            private_key_pem=_encrypted(rsa_material),
            certificate_chain=rsa_material.chain_pem,
            owner_encrypted_key=True,
        ),
        now=datetime.now(UTC),
    )
    changed = store.change_passphrase(
        "alice",
        "c",
        old_passphrase=PASSPHRASE,
        new_passphrase="a-new-passphrase",
        now=datetime.now(UTC),
    )
    assert not is_owner_encrypted(changed.envelope) and changed.passphrase_protected
    with pytest.raises(AuthenticationError):
        store.decrypt_private_key(changed, PASSPHRASE)
    assert store.decrypt_private_key(changed, "a-new-passphrase")


def test_owner_encrypted_needs_an_encrypted_pem(store: Store, rsa_material: KeyMaterial) -> None:
    with pytest.raises(PemError, match="not encrypted"):
        store.put_credential(
            CredentialWrite(
                owner_dn=ALICE,
                username="alice",
                name="x",
                private_key_pem=rsa_material.key_pem,
                certificate_chain=rsa_material.chain_pem,
                owner_encrypted_key=True,
            ),
            now=datetime.now(UTC),
        )


@pytest.mark.parametrize("username", [ALICE, "alice." + "z" * 1490, "élodie/ü"])
def test_usernames_as_myproxy_accepts(
    store: Store, rsa_material: KeyMaterial, username: str
) -> None:
    store.put_credential(
        CredentialWrite(
            owner_dn=ALICE,
            username=username,
            name="default",
            private_key_pem=rsa_material.key_pem,
            certificate_chain=rsa_material.chain_pem,
        ),
        now=datetime.now(UTC),
    )
    assert store.get_credential(username, "default").username == username


def test_costly_key_encryption_is_refused(
    store: Store, rsa_material: KeyMaterial, tmp_path: Path
) -> None:
    # Whoever stores a key must not make every later passphrase try arbitrarily costly.
    source = tmp_path / "k.pem"
    source.write_bytes(rsa_material.key_pem)
    costly = tmp_path / "costly.pem"
    made = subprocess.run(
        [
            "openssl",
            "pkcs8",
            "-topk8",
            "-v2",
            "aes256",
            "-iter",
            "2000000",
            "-in",
            str(source),
            "-out",
            str(costly),
            "-passout",
            "pass:" + PASSPHRASE,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    with pytest.raises(PemError, match="at most 1000000"):
        store.put_credential(
            CredentialWrite(
                owner_dn=ALICE,
                username="alice",
                name="costly",
                private_key_pem=costly.read_bytes(),
                certificate_chain=rsa_material.chain_pem,
                owner_encrypted_key=True,
            ),
            now=datetime.now(UTC),
        )
    scrypt = tmp_path / "scrypt.pem"
    made = subprocess.run(
        [
            "openssl",
            "pkcs8",
            "-topk8",
            "-scrypt",
            "-in",
            str(source),
            "-out",
            str(scrypt),
            "-passout",
            "pass:" + PASSPHRASE,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    with pytest.raises(PemError, match="scheme this broker does not accept"):
        store.put_credential(
            CredentialWrite(
                owner_dn=ALICE,
                username="alice",
                name="scrypt",
                private_key_pem=scrypt.read_bytes(),
                certificate_chain=rsa_material.chain_pem,
                owner_encrypted_key=True,
            ),
            now=datetime.now(UTC),
        )
