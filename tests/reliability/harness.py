"""Shared plumbing for the reliability suite: PKI, brokers, PostgreSQL, results.

Everything here runs outside pytest (``scripts/reliability``), so the pytest
fixtures of ``tests/`` are rebuilt as plain functions on top of the same
helpers (``tests.brokerserver.start_broker``, ``tests.pgcluster``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from broker.devpki import write_dev_pki
from tests.brokerserver import RunningBroker, free_port, start_broker
from tests.pgcluster import (
    TEST_OPTIONS,
    PostgresCluster,
    _find_bindir,
    _postmaster_pid,
    start_cluster,
)
from tests.pkifixtures import GridPki

PILOT_DN = "/DC=org/DC=example/CN=pilot"
ALICE_DN = "/DC=org/DC=example/CN=Alice"
BOB_DN = "/DC=org/DC=example/CN=Bob"


@dataclass
class Outcome:
    """One row of the summary table."""

    category: str
    tried: int = 0
    failed: int = 0  # accepted attacks, errors, crashes: anything that must be zero
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    skipped: str = ""  # a reason when the category could not run at all

    @property
    def verdict(self) -> str:
        if self.skipped:
            return "NOT RUN"
        return "PASS" if self.failed == 0 and self.tried > 0 else "FAIL"

    def fail(self, message: str) -> None:
        self.failed += 1
        if len(self.notes) < 40:
            self.notes.append(message)

    def note(self, message: str) -> None:
        if len(self.notes) < 60:
            self.notes.append(message)


def make_pki(base: Path) -> GridPki:
    """A dev PKI readable by payload accounts (the payload wrapper checks need that)."""
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)
    now = datetime.now(UTC)
    pki, manifest = write_dev_pki(
        base / "pki", now=now, users=("alice", "bob", "mallory"), pilots=("pilot", "pilot2")
    )
    root = base / "pki"
    for d in (root, root / "certificates", root / "vomsdir"):
        d.chmod(0o755)
    return GridPki(pki, root, root / "certificates", root / "vomsdir", manifest, now)


def myproxy_usable() -> str:
    """An empty string when the MyProxy endpoint can be started, else why not."""
    try:
        from broker.myproxy.server import start_myproxy_in_master  # noqa: F401
    except Exception as exc:  # an unfinished module may fail in any way
        return f"broker.myproxy.server.start_myproxy_in_master is not importable: {exc}"
    return ""


def launch(
    pki: GridPki,
    base: Path,
    *,
    database_url: str = "",
    myproxy: bool = False,
    workers: int = 2,
    extra: tuple[str, ...] = (),
) -> tuple[RunningBroker, int]:
    """``broker serve`` on loopback; returns the broker and its MyProxy port (0: none)."""
    mp_port = 0
    args = list(extra)
    if myproxy:
        mp_port = free_port()
        args += ["--myproxy-bind", f"127.0.0.1:{mp_port}"]
    broker = start_broker(pki, base, database_url=database_url, extra=tuple(args), workers=workers)
    if mp_port:
        wait_port(mp_port, 20)
    return broker, mp_port


def wait_port(port: int, timeout: float) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` read from /proc (gunicorn workers, the MyProxy child)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        # the command name is in parentheses and may hold spaces: split after it
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[1]) == pid:
            out.append(int(entry))
    return sorted(out)


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def worker_pids(broker: RunningBroker) -> list[int]:
    """The gunicorn workers: children of the master that are not the MyProxy child."""
    return [p for p in children_of(broker.process.pid) if "broker.myproxy" not in cmdline(p)]


def crash(broker: RunningBroker) -> None:
    """kill -9 the master and then each of its children we saw, by PID (a whole-host crash)."""
    kids = children_of(broker.process.pid)
    for pid in [broker.process.pid, *kids]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    broker.process.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in kids):
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


# --------------------------------------------------------------------------- PostgreSQL


@contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A throwaway cluster (tests/pgcluster.start_cluster), stopped by its PID at the end."""
    bindir = _find_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
    base = Path(tempfile.mkdtemp(prefix="broker-rel-pg-"))
    cluster: PostgresCluster | None = None
    try:
        cluster = start_cluster(base, bindir)
        yield cluster
    finally:
        if cluster is not None:
            # an attack may have restarted it: stop whichever postmaster runs now
            pg_stop_pid(_current_pid(base / "data") or cluster.pid)
        shutil.rmtree(base, ignore_errors=True)


def _current_pid(data: Path) -> int | None:
    try:
        return _postmaster_pid(data)
    except (OSError, ValueError, IndexError):
        return None


def pg_start(cluster: PostgresCluster) -> None:
    root = os.geteuid() == 0
    options = f"-c listen_addresses=127.0.0.1 -p {cluster.port} -k {cluster.base} {TEST_OPTIONS}"
    argv = [
        str(cluster.bindir / "pg_ctl"),
        "-w",
        "-t",
        "30",
        "-D",
        str(cluster.data),
        "-l",
        str(cluster.base / "server.log"),
        "-o",
        options,
        "start",
    ]
    if root:
        argv = ["runuser", "-u", "postgres", "--", *argv]
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


def pg_stop_pid(pid: int, timeout: float = 20.0) -> None:
    """Fast shutdown of the postmaster we started (SIGINT), by its PID."""
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGQUIT)
        time.sleep(1)


def pg_stop(cluster: PostgresCluster) -> None:
    pid = _current_pid(cluster.data)
    if pid is not None:
        pg_stop_pid(pid)
