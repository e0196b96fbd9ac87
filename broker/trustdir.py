"""Reading trust directories from disk (the IO edge of :mod:`broker.pki`).

``X509_CERT_DIR`` (CA certificates, CRLs) and ``X509_VOMS_DIR`` (``<vo>/<host>.lsc``).
Defaults follow the grid convention: the environment variable, then
``/etc/grid-security/certificates`` and ``/etc/grid-security/vomsdir``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from broker.errors import BrokerError, ConfigError
from broker.pki.trust import TrustStore
from broker.pki.voms import VomsDir

DEFAULT_CA_DIR = "/etc/grid-security/certificates"
DEFAULT_VOMSDIR = "/etc/grid-security/vomsdir"
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
        if entry.is_file() and (entry.name.split(".")[-1].isdigit() or ".r" in entry.name):
            files[entry.name] = _read_small(entry)
    return files


def load_ca_dir(path: str | os.PathLike[str]) -> TrustStore:
    """The trust store of a CA directory; a directory without CA files is an error."""
    store = TrustStore.from_files(read_ca_dir_files(path))
    if not store.cas:
        raise ConfigError(f"the CA directory {path} holds no CA certificates (<hash>.0 files)")
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


class ReloadingTrustStore:
    """The trust store of a CA directory, reloaded when its files change (fetch-crl, a new CA).

    Call it to get the current :class:`TrustStore`; it looks at the directory at most every
    ``interval`` seconds (one listdir + stat). A directory that fails to load is logged and
    the last good store stays in force.
    """

    def __init__(self, path: str | os.PathLike[str], *, interval: float = 60.0) -> None:
        self.path = Path(path)
        self.interval = interval
        self._lock = threading.Lock()
        self._fingerprint = self._look()
        self._store = load_ca_dir(self.path)  # the first load must succeed
        self._checked = time.monotonic()

    def _look(self) -> tuple[tuple[str, int, int], ...]:
        try:
            entries = sorted(os.scandir(self.path), key=lambda e: e.name)
            return tuple((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in entries)
        except OSError:
            return ()

    def __call__(self) -> TrustStore:
        if time.monotonic() - self._checked < self.interval or not self._lock.acquire(False):
            return self._store
        try:
            self._checked = time.monotonic()
            fingerprint = self._look()
            if fingerprint != self._fingerprint:
                try:
                    self._store = load_ca_dir(self.path)
                    log.info("CA directory %s reloaded (%d CAs, %d CRLs)", self.path,
                             len(self._store.cas), len(self._store.crls))
                except BrokerError as exc:
                    log.error("CA directory %s not reloaded, keeping the last good one: %s",
                              self.path, exc.message)
                self._fingerprint = fingerprint
            return self._store
        finally:
            self._lock.release()
