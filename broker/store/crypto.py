"""Envelope encryption of private keys at rest.

Layers, innermost first::

    private key PEM --AES-256-GCM(data key, AAD = row context)--> key_ciphertext
    data key        --AES-256-GCM(scrypt(passphrase))----------->  (only if a passphrase is set)
                    --AES-256-GCM(master key, AAD = key id + row context)--> wrapped_data_key

* Every row has its own random 256-bit data key.
* The *row context* (``credential_context`` / ``pending_context``) is bound
  into every layer as associated data, so copying the ciphertext or the
  wrapped key from one row into another makes decryption fail instead of
  handing out the wrong key.
* The passphrase layer sits *inside* the master-key layer: without the
  passphrase nobody (not even a holder of the master key) gets the data key,
  and a master-key rotation rewraps the outer layer without needing it.
* A wrong passphrase is reported as ``AuthenticationError("invalid
  credential passphrase")`` and nothing more; any other failed integrity
  check is a StoreError (tampering or the wrong master key), never a
  passphrase problem.

Master key file
---------------
JSON, mode 0600, owned by the service user::

    {"format": "grid-credential-broker/master-keys", "version": 1,
     "keys": [{"id": "mk-20261121T051500Z-1f2e3d4c", "created": "...", "key": "<base64>"}]}

The *last* key is the active one (new rows are wrapped with it); the others
stay only as long as some row still references them. This module reads no
clock: the functions that make a key or stamp its "created" time take ``now``
from their caller (the ``broker keys`` commands, the server's start-up).

Rotation (:func:`rotate_master_key`) and running servers
--------------------------------------------------------
1. A new key is appended to the file (atomic: temp file 0600, fsync, rename).
   The file now holds old + new, new active.
2. Every row wrapped with another key is rewrapped with the new key, in
   batches, one transaction per batch.
3. When no row references an old key, the file is rewritten without it, and
   a last sweep rewraps rows that a server still using the old active key
   wrote meanwhile.

A running :class:`~broker.store.repository.Store` notices a changed key
file (inode/mtime/size) before it encrypts and reloads it, and when it meets
a row wrapped with a key id it does not hold it reloads the file once before
giving up. So a server that loaded the file before step 1 keeps decrypting
old rows, picks up the new key the first time it sees a rewrapped row, and
never needs a restart. The remaining window is a write whose transaction
started before step 3's file rewrite and commits after its final sweep;
running the rotation when no delegation is in flight (or simply running it
twice) closes it.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from broker.errors import (
    AuthenticationError,
    BrokerError,
    ConfigError,
    Conflict,
    InputError,
    StoreError,
)
from broker.fileio import create_exclusive, replace_file_atomically

KEY_FILE_FORMAT = "grid-credential-broker/master-keys"
KEY_FILE_VERSION = 1
KEY_BYTES = 32
NONCE_BYTES = 12
MAX_KEY_FILE_BYTES = 1 << 20
KEY_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# MyProxy refuses passphrases shorter than 6 characters; the upper bound only
# keeps absurd input away from the KDF.
MIN_PASSPHRASE_LENGTH = 6
MAX_PASSPHRASE_LENGTH = 1024

# scrypt n=2**14, r=8, p=1: ~16 MiB and tens of milliseconds per derivation.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
# Parameters read back from the database are bounded, so a tampered row
# cannot make a decryption allocate gigabytes.
_SCRYPT_MAX_N = 2**20
_SCRYPT_MAX_R = 32
_SCRYPT_MAX_P = 16

INVALID_PASSPHRASE = "invalid credential passphrase"  # noqa: S105 - a message, not a secret
INVALID_PASSPHRASE_REASON = "invalid_passphrase"  # noqa: S105 - the error's reason code

_DATA_AAD = b"broker/data-key/v1"
_WRAP_AAD = b"broker/master-wrap/v1"
_PASSPHRASE_AAD = b"broker/passphrase-wrap/v1"


# --------------------------------------------------------------------------
# Row contexts


def _frame(*parts: str | bytes) -> bytes:
    """Length-prefixed concatenation: no two different tuples encode alike."""
    out = bytearray()
    for part in parts:
        raw = part.encode("utf-8") if isinstance(part, str) else part
        out += struct.pack(">I", len(raw)) + raw
    return bytes(out)


def credential_context(owner_dn: str, username: str, name: str) -> bytes:
    """Associated data binding a credential's key to its owner and its slot."""
    return _frame("credential", owner_dn, username, name)


def pending_context(pending_id: str, requester_dn: str, username: str, name: str) -> bytes:
    """Associated data binding a pending delegation's key to its row."""
    return _frame("pending", pending_id, requester_dn, username, name)


# --------------------------------------------------------------------------
# Master keys


@dataclass(frozen=True)
class MasterKeyRing:
    """The master keys the process holds, oldest first; the last is active.

    ``path`` and ``signature`` remember where the ring came from, so that a
    long-running store can notice that the file changed (a rotation).
    """

    keys: tuple[tuple[str, bytes], ...] = field(repr=False)
    path: Path | None = None
    signature: tuple[int, int, int, int] | None = None

    def __post_init__(self) -> None:
        if not self.keys:
            raise ConfigError("a master key ring needs at least one key")
        ids = [key_id for key_id, _ in self.keys]
        if len(set(ids)) != len(ids):
            raise ConfigError("duplicate master key id")
        for key_id, key in self.keys:
            if not KEY_ID_RE.match(key_id):
                raise ConfigError(f"invalid master key id {key_id!r}")
            if len(key) != KEY_BYTES:
                raise ConfigError(f"master key {key_id!r} is not {KEY_BYTES * 8} bits")

    def __repr__(self) -> str:
        return f"MasterKeyRing(ids={self.ids!r}, path={self.path!s})"

    @classmethod
    def generate(cls, *, now: datetime) -> MasterKeyRing:
        """A ring with one fresh key, in memory only (tools and tests); ``now`` stamps its id."""
        return cls(keys=((new_key_id(now), AESGCM.generate_key(bit_length=256)),))

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(key_id for key_id, _ in self.keys)

    @property
    def active_id(self) -> str:
        return self.keys[-1][0]

    def get(self, key_id: str) -> bytes | None:
        for candidate, key in self.keys:
            if candidate == key_id:
                return key
        return None

    def changed_on_disk(self) -> bool:
        """True if the file this ring came from now differs (or vanished)."""
        if self.path is None:
            return False
        try:
            return _signature(os.lstat(self.path)) != self.signature
        except OSError:
            return True


def new_key_id(now: datetime) -> str:
    """A fresh key id: the creation time (UTC) and 32 random bits."""
    return f"mk-{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def _fresh_key(ring: MasterKeyRing, now: datetime) -> tuple[str, bytes]:
    """A new (id, key) pair whose id the ring does not hold yet."""
    key_id = new_key_id(now)
    while ring.get(key_id) is not None:  # pragma: no cover - 32 random bits
        key_id = new_key_id(now)
    return key_id, AESGCM.generate_key(bit_length=256)


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _serialise(keys: Iterable[tuple[str, bytes]], created: dict[str, str]) -> bytes:
    doc = {
        "format": KEY_FILE_FORMAT,
        "version": KEY_FILE_VERSION,
        "keys": [
            {
                "id": key_id,
                "created": created.get(key_id, ""),
                "key": base64.b64encode(key).decode("ascii"),
            }
            for key_id, key in keys
        ],
    }
    return (json.dumps(doc, indent=2) + "\n").encode("ascii")


def init_master_key_file(path: str | os.PathLike[str], *, now: datetime) -> MasterKeyRing:
    """Create a new key file with one fresh key made at ``now``; refuse to touch an
    existing one."""
    target = Path(path)
    key_id = new_key_id(now)
    key = AESGCM.generate_key(bit_length=256)
    try:
        # 0600, never through a symlink, never over an existing file, fsynced
        create_exclusive(target, _serialise([(key_id, key)], {key_id: now.isoformat()}))
    except Conflict:
        raise ConfigError(
            f"the master key file {target} already exists; refusing to overwrite it "
            "(losing it makes every stored credential unreadable)"
        ) from None
    except BrokerError as exc:
        raise ConfigError(f"cannot create the master key file {target}: {exc}") from None
    return load_master_keys(target)


def load_master_keys(path: str | os.PathLike[str]) -> MasterKeyRing:
    """Read and check a key file: regular file, ours, mode 0600 or stricter."""
    target = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer and
        # hang start-up; the type check below then refuses anything but a regular file.
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigError(
            f"the master key file {target} does not exist; create it with "
            "'broker keys init' (or init_master_key_file)"
        ) from None
    except OSError as exc:
        if os.path.islink(target):
            raise ConfigError(
                f"the master key file {target} is a symbolic link; point the configuration "
                "at the real file"
            ) from None
        raise ConfigError(f"cannot open the master key file {target}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(
                f"the master key file {target} is not a regular file (a FIFO, device or "
                "directory); point the configuration at the key file itself"
            )
        os.set_blocking(fd, True)
        if st.st_uid != os.geteuid():
            raise ConfigError(
                f"the master key file {target} is owned by uid {st.st_uid}, not by the "
                f"service user (uid {os.geteuid()}); chown it to the service user"
            )
        if st.st_mode & 0o077:
            raise ConfigError(
                f"the master key file {target} has mode {stat.S_IMODE(st.st_mode):04o}, "
                f"readable by others; run: chmod 600 {target}"
            )
        if st.st_size > MAX_KEY_FILE_BYTES:
            raise ConfigError(f"the master key file {target} is implausibly large")
        raw = b""
        while chunk := os.read(fd, 65536):
            raw += chunk
            if len(raw) > MAX_KEY_FILE_BYTES:
                raise ConfigError(f"the master key file {target} is implausibly large")
    finally:
        os.close(fd)
    keys = _parse_key_file(target, raw)
    return MasterKeyRing(keys=keys, path=target, signature=_signature(st))


def _parse_key_file(target: Path, raw: bytes) -> tuple[tuple[str, bytes], ...]:
    def bad(why: str) -> ConfigError:
        return ConfigError(f"the master key file {target} is malformed: {why}")

    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != KEY_FILE_FORMAT:
        raise bad(f'missing "format": "{KEY_FILE_FORMAT}"')
    if doc.get("version") != KEY_FILE_VERSION:
        raise bad(f"unsupported version {doc.get('version')!r}")
    entries = doc.get("keys")
    if not isinstance(entries, list) or not entries:
        raise bad("no keys")
    keys: list[tuple[str, bytes]] = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise bad("a key entry is not an object")
        key_id, encoded = entry.get("id"), entry.get("key")
        if not isinstance(key_id, str) or not KEY_ID_RE.match(key_id):
            raise bad(f"invalid key id {key_id!r}")
        if not isinstance(encoded, str):
            raise bad(f'key {key_id!r} has no base64 "key"')
        try:
            key = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise bad(f"key {key_id!r} is not valid base64") from None
        if len(key) != KEY_BYTES:
            raise bad(f"key {key_id!r} is not {KEY_BYTES * 8} bits")
        keys.append((key_id, key))
    if len({key_id for key_id, _ in keys}) != len(keys):
        raise bad("duplicate key ids")
    return tuple(keys)


def _read_created(path: Path) -> dict[str, str]:
    try:
        doc = json.loads(path.read_bytes())
        return {e["id"]: str(e.get("created", "")) for e in doc["keys"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def replace_master_key_file(
    path: str | os.PathLike[str], keys: MasterKeyRing, *, now: datetime
) -> MasterKeyRing:
    """Atomically replace the key file's contents with ``keys`` (last = active); a key
    the file does not list yet is recorded as created at ``now``.

    A temp file in the same directory is written 0600 and fsynced, renamed
    over the original, and the directory fsynced: a crash leaves either the
    old or the new file, never a torn one.
    """
    target = Path(path)
    created = _read_created(target)
    stamp = now.isoformat()
    for key_id in keys.ids:
        created.setdefault(key_id, stamp)
    try:
        # temp file 0600 + fsync, renamed over the original, directory fsynced
        replace_file_atomically(target, _serialise(keys.keys, created), mode=0o600)
    except BrokerError as exc:
        raise ConfigError(f"cannot rewrite the master key file {target}: {exc}") from None
    return load_master_keys(target)


# --------------------------------------------------------------------------
# Passphrases


def check_new_passphrase(passphrase: str) -> None:
    """Enforce the rules for a passphrase being *set* (not for one being tried)."""
    if not isinstance(passphrase, str):
        raise InputError("the credential passphrase must be text")
    if len(passphrase) < MIN_PASSPHRASE_LENGTH:
        raise InputError(
            f"the credential passphrase must be at least {MIN_PASSPHRASE_LENGTH} characters long",
            reason="weak_passphrase",
        )
    if len(passphrase) > MAX_PASSPHRASE_LENGTH:
        raise InputError(
            f"the credential passphrase must be at most {MAX_PASSPHRASE_LENGTH} characters long"
        )


def _scrypt_params(params: dict[str, Any] | None) -> tuple[int, int, int]:
    if not isinstance(params, dict) or params.get("kdf") != "scrypt":
        raise StoreError("unsupported key-derivation parameters on a stored credential")
    n, r, p = params.get("n"), params.get("r"), params.get("p")
    if not (
        isinstance(n, int)
        and isinstance(r, int)
        and isinstance(p, int)
        and 2 <= n <= _SCRYPT_MAX_N
        and n & (n - 1) == 0
        and 1 <= r <= _SCRYPT_MAX_R
        and 1 <= p <= _SCRYPT_MAX_P
    ):
        raise StoreError("out-of-range scrypt parameters on a stored credential")
    return n, r, p


def _passphrase_key(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=KEY_BYTES, n=n, r=r, p=p).derive(passphrase.encode("utf-8"))


# --------------------------------------------------------------------------
# Envelopes


@dataclass(frozen=True)
class Envelope:
    """The stored form of one private key (the envelope columns of a row)."""

    ciphertext: bytes = field(repr=False)
    nonce: bytes = field(repr=False)
    wrapped_data_key: bytes = field(repr=False)
    master_key_id: str
    passphrase_protected: bool = False
    kdf_salt: bytes | None = field(default=None, repr=False)
    kdf_params: dict[str, Any] | None = None


def _gcm_seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def _gcm_open(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Raises InvalidTag on any mismatch, including a truncated blob."""
    if len(blob) < NONCE_BYTES + 16:
        raise InvalidTag()
    return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)


def _master_key(ring: MasterKeyRing, key_id: str) -> bytes:
    key = ring.get(key_id)
    if key is None:
        raise StoreError(
            f"a stored key is wrapped with master key {key_id!r}, which is not in the master "
            f"key file (holding {', '.join(ring.ids)}); restore the key file from backup",
            reason="unknown_master_key",
        )
    return key


def _wrap(ring: MasterKeyRing, key_id: str, inner: bytes, context: bytes) -> bytes:
    return _gcm_seal(_master_key(ring, key_id), inner, _WRAP_AAD + _frame(key_id, context))


def _unwrap(ring: MasterKeyRing, envelope: Envelope, context: bytes) -> bytes:
    key_id = envelope.master_key_id
    try:
        return _gcm_open(
            _master_key(ring, key_id),
            envelope.wrapped_data_key,
            _WRAP_AAD + _frame(key_id, context),
        )
    except InvalidTag:
        raise StoreError(
            "a stored key failed its integrity check (tampered row, or the wrong master key)",
            reason="integrity",
        ) from None


def _passphrase_aad(context: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return _PASSPHRASE_AAD + _frame(context, salt, f"scrypt:{n}:{r}:{p}")


def _protect(
    data_key: bytes, context: bytes, passphrase: str
) -> tuple[bytes, bytes, dict[str, Any]]:
    salt = os.urandom(SALT_BYTES)
    derived = _passphrase_key(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    inner = _gcm_seal(
        derived, data_key, _passphrase_aad(context, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    )
    return inner, salt, {"kdf": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}


def _key_layers(
    data_key: bytes, context: bytes, ring: MasterKeyRing, passphrase: str | None
) -> dict[str, Any]:
    """The envelope fields that hold the data key: the passphrase layer (when a passphrase
    is given) inside the wrap with the ring's active master key."""
    salt: bytes | None = None
    params: dict[str, Any] | None = None
    inner = data_key
    if passphrase is not None:
        inner, salt, params = _protect(data_key, context, passphrase)
    key_id = ring.active_id
    return {
        "wrapped_data_key": _wrap(ring, key_id, inner, context),
        "master_key_id": key_id,
        "passphrase_protected": passphrase is not None,
        "kdf_salt": salt,
        "kdf_params": params,
    }


#: ``kdf_params`` of a key the owner encrypted itself (MyProxy STORE of an encrypted
#: PEM): the plaintext inside the envelope is that encrypted PEM, and the owner's
#: passphrase opens it only at retrieval (the broker never learns it at upload).
OWNER_ENCRYPTED_PEM = {"kdf": "owner-pem"}


def is_owner_encrypted(envelope: Envelope) -> bool:
    return bool(
        envelope.passphrase_protected
        and envelope.kdf_params
        and envelope.kdf_params.get("kdf") == OWNER_ENCRYPTED_PEM["kdf"]
    )


def _data_key(
    ring: MasterKeyRing, envelope: Envelope, context: bytes, passphrase: str | None
) -> bytes:
    inner = _unwrap(ring, envelope, context)
    if not envelope.passphrase_protected:
        return inner
    if passphrase is None or not isinstance(passphrase, str):
        # Same answer as a wrong passphrase: no hint beyond "not accepted".
        raise AuthenticationError(INVALID_PASSPHRASE, reason=INVALID_PASSPHRASE_REASON)
    if len(passphrase) > MAX_PASSPHRASE_LENGTH:
        raise AuthenticationError(INVALID_PASSPHRASE, reason=INVALID_PASSPHRASE_REASON)
    if is_owner_encrypted(envelope):
        return inner  # the passphrase opens the PEM itself (open_envelope)
    n, r, p = _scrypt_params(envelope.kdf_params)
    salt = envelope.kdf_salt
    if not salt:
        raise StoreError("a passphrase-protected credential has no salt", reason="integrity")
    derived = _passphrase_key(passphrase, salt, n, r, p)
    try:
        return _gcm_open(derived, inner, _passphrase_aad(context, salt, n, r, p))
    except InvalidTag:
        raise AuthenticationError(INVALID_PASSPHRASE, reason=INVALID_PASSPHRASE_REASON) from None


def seal(
    plaintext: bytes,
    context: bytes,
    ring: MasterKeyRing,
    passphrase: str | None = None,
) -> Envelope:
    """Encrypt ``plaintext`` (a private key PEM) for the row described by ``context``."""
    if passphrase is not None:
        check_new_passphrase(passphrase)
    data_key = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = AESGCM(data_key).encrypt(nonce, plaintext, _DATA_AAD + context)
    return Envelope(
        ciphertext=ciphertext, nonce=nonce, **_key_layers(data_key, context, ring, passphrase)
    )


def open_envelope(
    envelope: Envelope, context: bytes, ring: MasterKeyRing, passphrase: str | None = None
) -> bytes:
    """Decrypt an envelope; the passphrase is required exactly when one was set."""
    data_key = _data_key(ring, envelope, context, passphrase)
    try:
        plaintext = AESGCM(data_key).decrypt(
            envelope.nonce, envelope.ciphertext, _DATA_AAD + context
        )
    except InvalidTag:
        raise StoreError(
            "a stored private key failed its integrity check (tampered or swapped row)",
            reason="integrity",
        ) from None
    if is_owner_encrypted(envelope):
        assert passphrase is not None  # _data_key refused a missing one
        return decrypt_owner_pem(plaintext, passphrase)
    return plaintext


def decrypt_owner_pem(pem: bytes, passphrase: str) -> bytes:
    """The clear PKCS#8 PEM of a key its owner encrypted; a wrong passphrase is
    AuthenticationError("invalid credential passphrase"), as for the scrypt layer."""
    try:
        key = serialization.load_pem_private_key(pem, password=passphrase.encode())
    except (TypeError, ValueError, UnsupportedAlgorithm):
        raise AuthenticationError(INVALID_PASSPHRASE, reason=INVALID_PASSPHRASE_REASON) from None
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def seal_owner_encrypted(pem: bytes, context: bytes, ring: MasterKeyRing) -> Envelope:
    """Envelope for a PEM key the owner encrypted with its passphrase (kept as it is)."""
    envelope = seal(pem, context, ring, None)
    return replace(envelope, passphrase_protected=True, kdf_params=dict(OWNER_ENCRYPTED_PEM))


def rewrap(envelope: Envelope, context: bytes, ring: MasterKeyRing) -> Envelope:
    """Re-wrap the data key with the ring's active key; no passphrase needed."""
    inner = _unwrap(ring, envelope, context)
    key_id = ring.active_id
    return replace(
        envelope, wrapped_data_key=_wrap(ring, key_id, inner, context), master_key_id=key_id
    )


def change_envelope_passphrase(
    envelope: Envelope,
    context: bytes,
    ring: MasterKeyRing,
    old_passphrase: str | None,
    new_passphrase: str | None,
) -> Envelope:
    """Swap the passphrase layer (add, change or remove it); the ciphertext stays.

    A key its owner encrypted is opened with the old passphrase and sealed again
    under the new one the usual way (scrypt layer), so the change takes effect."""
    if new_passphrase is not None:
        check_new_passphrase(new_passphrase)
    if is_owner_encrypted(envelope):
        clear = open_envelope(envelope, context, ring, old_passphrase)
        return seal(clear, context, ring, new_passphrase)
    data_key = _data_key(ring, envelope, context, old_passphrase)
    return replace(envelope, **_key_layers(data_key, context, ring, new_passphrase))


def reseal(
    envelope: Envelope,
    old_context: bytes,
    new_context: bytes,
    ring: MasterKeyRing,
    passphrase: str | None = None,
) -> Envelope:
    """Move an unprotected key to another row (pending -> credential) with a fresh data key."""
    plaintext = open_envelope(envelope, old_context, ring)
    return seal(plaintext, new_context, ring, passphrase)


# --------------------------------------------------------------------------
# Master key rotation


class RotatableStore(Protocol):
    """What rotation needs from a store (``broker.store.repository.Store``)."""

    def master_key_ids_in_use(self) -> dict[str, int]: ...

    def rewrap_batch(self, batch_size: int = ...) -> int: ...

    def use_master_keys(self, ring: MasterKeyRing) -> None: ...


@dataclass(frozen=True)
class RotationReport:
    new_key_id: str
    rewrapped: int
    retired_key_ids: tuple[str, ...]


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise InputError("batch_size must be at least 1")


def _refuse_missing_keys(
    store: RotatableStore, ring: MasterKeyRing, keyfile: object, remedy: str
) -> None:
    """ConfigError when the database references a key the ring lacks (``remedy`` says
    what to do about it)."""
    missing = sorted(k for k in store.master_key_ids_in_use() if ring.get(k) is None)
    if missing:
        raise ConfigError(
            f"the database references master keys missing from {keyfile}: "
            f"{', '.join(missing)}; {remedy}"
        )


def _rewrap_until_done(store: RotatableStore, batch_size: int) -> int:
    """Rewrap batch after batch until none is left; how many rows changed."""
    done = 0
    while count := store.rewrap_batch(batch_size):
        done += count
    return done


def rotate_master_key(
    store: RotatableStore,
    keyfile: str | os.PathLike[str],
    *,
    now: datetime,
    batch_size: int = 100,
) -> RotationReport:
    """Rotate to a fresh master key made at ``now`` (the sequence is in the module docstring).

    Safe to interrupt at any point: every batch is its own transaction, and
    the key file always holds every key some row still references. Running it
    again after an interruption finishes the job (with yet another new key).
    """
    _check_batch_size(batch_size)
    path = Path(keyfile)
    current = load_master_keys(path)
    _refuse_missing_keys(store, current, path, "refusing to rotate (restore the key file first)")
    new_id, new_key = _fresh_key(current, now)

    # Step 1: old + new in the file, new active.
    grown = replace_master_key_file(
        path, MasterKeyRing(keys=(*current.keys, (new_id, new_key))), now=now
    )
    store.use_master_keys(grown)

    # Step 2: rewrap everything, batch by batch.
    rewrapped = _rewrap_until_done(store, batch_size)
    leftover = sorted(set(store.master_key_ids_in_use()) - {new_id})
    if leftover:  # pragma: no cover - rewrap_batch loops until none is left
        raise StoreError(f"rows still wrapped with {', '.join(leftover)} after rotation")

    # Step 3: drop the old keys from the file, then sweep once more with the
    # old keys still in memory, for rows a stale writer added meanwhile.
    replace_master_key_file(path, MasterKeyRing(keys=((new_id, new_key),)), now=now)
    store.use_master_keys(grown)
    rewrapped += _rewrap_until_done(store, batch_size)
    store.use_master_keys(load_master_keys(path))
    return RotationReport(
        new_key_id=new_id,
        rewrapped=rewrapped,
        retired_key_ids=tuple(k for k in current.ids),
    )


# --------------------------------------------------------------------------
# Staged rotation for several nodes
#
# Every node holds its own copy of the key file, so a key must be on every node
# before any node wraps with it, and must stay on every node while any row is
# still wrapped with it. The four steps below are run on one node, and after
# each the file is copied to every node (a running Store notices the changed
# file and reloads it, no restart):
#
#   1. add       a new key, *not* active (placed first in the file);
#   2. activate  it (moved last): nodes that have the new file wrap with it,
#                nodes still on the old file keep wrapping with the old key,
#                which every node still holds, so nothing breaks meanwhile;
#   3. rewrap    every row to the active key (database-wide, batch by batch);
#   4. retire    the old key, refused while the database still references it
#                (a node that wrote with the old key after step 3: rewrap again).


@dataclass(frozen=True)
class KeyStatus:
    key_id: str
    in_file: bool
    active: bool
    rows: int  # credentials and pending delegations wrapped with this key


def key_status(ring: MasterKeyRing, in_use: dict[str, int]) -> list[KeyStatus]:
    """Every key the file or the database knows, the file's order first (pure)."""
    rows = [
        KeyStatus(key_id, True, key_id == ring.active_id, in_use.get(key_id, 0))
        for key_id in ring.ids
    ]
    rows += [
        KeyStatus(key_id, False, False, count)
        for key_id, count in sorted(in_use.items())
        if ring.get(key_id) is None
    ]
    return rows


def add_master_key(keyfile: str | os.PathLike[str], *, now: datetime) -> str:
    """Step 1: add a fresh key made at ``now`` that is not active yet; returns its id."""
    current = load_master_keys(keyfile)
    new_id, key = _fresh_key(current, now)
    replace_master_key_file(keyfile, MasterKeyRing(keys=((new_id, key), *current.keys)), now=now)
    return new_id


def activate_master_key(keyfile: str | os.PathLike[str], key_id: str, *, now: datetime) -> None:
    """Step 2: make ``key_id`` (already in the file) the key new rows are wrapped with.

    ``now`` stamps only a key whose creation time the file lacks."""
    current = load_master_keys(keyfile)
    key = current.get(key_id)
    if key is None:
        raise InputError(f"no key {key_id!r} in {keyfile}; known: {', '.join(current.ids)}")
    others = tuple((k, v) for k, v in current.keys if k != key_id)
    replace_master_key_file(keyfile, MasterKeyRing(keys=(*others, (key_id, key))), now=now)


def rewrap_all(
    store: RotatableStore, keyfile: str | os.PathLike[str], *, batch_size: int = 100
) -> int:
    """Step 3: rewrap every row not under the file's active key; returns how many."""
    _check_batch_size(batch_size)
    ring = load_master_keys(keyfile)
    _refuse_missing_keys(store, ring, keyfile, "copy the key file from a node that has them first")
    store.use_master_keys(ring)
    return _rewrap_until_done(store, batch_size)


def retire_master_key(
    store: RotatableStore, keyfile: str | os.PathLike[str], key_id: str, *, now: datetime
) -> None:
    """Step 4: drop ``key_id`` from the file; refused while it is active or still in use.

    ``now`` stamps only a key whose creation time the file lacks."""
    current = load_master_keys(keyfile)
    if current.get(key_id) is None:
        raise InputError(f"no key {key_id!r} in {keyfile}")
    if key_id == current.active_id:
        raise InputError(f"{key_id} is the active key; activate another key first")
    in_use = store.master_key_ids_in_use().get(key_id, 0)
    if in_use:
        raise Conflict(
            f"{in_use} row(s) are still wrapped with {key_id}; run 'broker keys rewrap' "
            "(after every node has the file with the new active key) and retry"
        )
    replace_master_key_file(
        keyfile,
        MasterKeyRing(keys=tuple((k, v) for k, v in current.keys if k != key_id)),
        now=now,
    )
