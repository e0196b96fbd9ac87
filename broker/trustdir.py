"""Reading trust directories from disk (the IO edge of :mod:`broker.pki`).

``X509_CERT_DIR`` (CA certificates, CRLs) and ``X509_VOMS_DIR`` (``<vo>/<host>.lsc``).
Defaults follow the grid convention: the environment variable, then
``/etc/grid-security/certificates`` and ``/etc/grid-security/vomsdir``.

A CA without a ``.signing_policy`` or ``.namespaces`` file is refused unless
``BROKER_ACCEPT_CA_WITHOUT_NAMESPACE=1`` is set (docs/trust.md).

Reloading: :class:`CaDirWatch` notices a changed CA directory (fetch-crl, a new CA) within
:data:`RELOAD_INTERVAL` seconds; :class:`ReloadingTrustStore` and the TLS contexts of both
endpoints (REST and MyProxy) use it, so a new CRL takes effect on both at the same bound.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from broker.errors import BrokerError, ConfigError
from broker.pki.trust import TrustStore
from broker.pki.voms import VomsDir

DEFAULT_CA_DIR = "/etc/grid-security/certificates"
DEFAULT_VOMSDIR = "/etc/grid-security/vomsdir"
ACCEPT_UNCONSTRAINED_ENV = "BROKER_ACCEPT_CA_WITHOUT_NAMESPACE"
#: Seconds between two looks at the CA directory (one scandir + stat per file).
RELOAD_INTERVAL = 2.0
_CA_DIR_SUFFIXES = (".signing_policy", ".namespaces")
_MAX_FILE = 1 << 20
log = logging.getLogger("broker.trustdir")


def default_ca_dir(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("X509_CERT_DIR") or DEFAULT_CA_DIR


def default_vomsdir(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("X509_VOMS_DIR") or DEFAULT_VOMSDIR


def _read_small(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(_MAX_FILE)


def read_ca_dir_files(path: str | os.PathLike[str]) -> dict[str, bytes]:
    directory = Path(path)
    if not directory.is_dir():
        raise ConfigError(
            f"the CA directory {directory} does not exist; set X509_CERT_DIR or pass --ca-dir"
        )
    files: dict[str, bytes] = {}
    for entry in sorted(directory.iterdir()):
        if entry.is_file() and (
            entry.name.split(".")[-1].isdigit()
            or ".r" in entry.name
            or entry.name.endswith(_CA_DIR_SUFFIXES)
        ):
            files[entry.name] = _read_small(entry)
    return files


def accept_unconstrained_default(env: Mapping[str, str] | None = None) -> bool:
    """Whether CAs without namespace files are accepted (``BROKER_ACCEPT_CA_WITHOUT_NAMESPACE``)."""
    env = os.environ if env is None else env
    value = env.get(ACCEPT_UNCONSTRAINED_ENV, "").strip().lower()
    if value in ("", "0", "no", "false"):
        return False
    if value in ("1", "yes", "true"):
        return True
    raise ConfigError(f"{ACCEPT_UNCONSTRAINED_ENV}={value!r}: use 1 or 0")


def load_ca_dir(
    path: str | os.PathLike[str], *, accept_unconstrained: bool | None = None
) -> TrustStore:
    """The trust store of a CA directory; a directory without CA files is an error.

    Malformed namespace files are logged; the CAs they belong to issue nothing accepted.
    """
    if accept_unconstrained is None:
        accept_unconstrained = accept_unconstrained_default()
    store = TrustStore.from_files(
        read_ca_dir_files(path), accept_unconstrained=accept_unconstrained
    )
    if not store.cas:
        raise ConfigError(f"the CA directory {path} holds no CA certificates (<hash>.0 files)")
    for problem in store.problems:
        log.error("CA directory %s: %s (the CA it belongs to is refused)", path, problem)
    return store


def read_vomsdir_files(path: str | os.PathLike[str]) -> dict[str, bytes]:
    directory = Path(path)
    files: dict[str, bytes] = {}
    if not directory.is_dir():
        return files
    for vo_dir in sorted(directory.iterdir()):
        if not vo_dir.is_dir():
            continue
        for entry in sorted(vo_dir.iterdir()):
            if entry.is_file() and entry.name.endswith(".lsc"):
                files[f"{vo_dir.name}/{entry.name}"] = _read_small(entry)
    return files


def load_vomsdir(path: str | os.PathLike[str]) -> VomsDir:
    """The vomsdir's LSC entries (an empty VomsDir when the directory is missing)."""
    return VomsDir.from_files(read_vomsdir_files(path))


def ca_dir_fingerprint(path: str | os.PathLike[str]) -> tuple[tuple[str, int, int, int], ...]:
    """Name, inode, mtime and size of every entry: changes when fetch-crl or an admin does."""
    try:
        out = []
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            info = entry.stat()
            out.append((entry.name, info.st_ino, info.st_mtime_ns, info.st_size))
        return tuple(out)
    except OSError:
        return ()


class CaDirWatch:
    """Counts the changes of a CA directory, looking at most every ``interval`` seconds.

    ``version()`` is cheap between looks; a changed directory bumps it. Thread-safe.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        interval: float = RELOAD_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._fingerprint = ca_dir_fingerprint(self.path)
        self._checked = clock()
        self._version = 0

    def version(self) -> int:
        if self._clock() - self._checked < self.interval or not self._lock.acquire(False):
            return self._version
        try:
            self._checked = self._clock()
            fingerprint = ca_dir_fingerprint(self.path)
            if fingerprint != self._fingerprint:
                self._fingerprint = fingerprint
                self._version += 1
            return self._version
        finally:
            self._lock.release()


class ReloadingTrustStore:
    """The trust store of a CA directory, reloaded when its files change (fetch-crl, a new CA).

    Call it to get the current :class:`TrustStore`; the directory is looked at at most every
    ``interval`` seconds (:class:`CaDirWatch`), so a change is in force within that bound. A
    directory that fails to load is logged and the last good store stays in force. A new
    store is a new object: callers that cache verdicts compare it by identity.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        interval: float = RELOAD_INTERVAL,
        accept_unconstrained: bool | None = None,
    ) -> None:
        self.path = Path(path)
        self.interval = interval
        self._accept = accept_unconstrained
        self._watch = CaDirWatch(self.path, interval=interval)
        self._loaded = self._watch.version()
        self._store = load_ca_dir(self.path, accept_unconstrained=self._accept)  # must succeed
        self._lock = threading.Lock()

    def __call__(self) -> TrustStore:
        version = self._watch.version()
        if version == self._loaded or not self._lock.acquire(False):
            return self._store
        try:
            try:
                self._store = load_ca_dir(self.path, accept_unconstrained=self._accept)
                log.info(
                    "CA directory %s reloaded (%d CAs, %d CRLs)",
                    self.path,
                    len(self._store.cas),
                    len(self._store.crls),
                )
            except BrokerError as exc:
                log.error(
                    "CA directory %s not reloaded, keeping the last good one: %s",
                    self.path,
                    exc.message,
                )
            self._loaded = version
            return self._store
        finally:
            self._lock.release()
