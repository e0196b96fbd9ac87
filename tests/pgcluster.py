"""pytest plugin: a throwaway PostgreSQL cluster for the test session.

Fixtures:

``postgres_cluster`` (session)
    A fresh cluster in a temp dir: ``initdb`` (as the ``postgres`` OS user
    when we are root, because the server refuses to run as root), trust
    authentication, listening on 127.0.0.1 only, on a free port, with its
    socket in the temp dir. Stopped by its postmaster PID at the end of the
    session and the directory removed.
``postgres_url`` (session)
    ``postgresql+psycopg://broker@127.0.0.1:PORT/broker_test``.
``postgres_database`` (function)
    The URL of a brand-new, empty database for one test, dropped afterwards.

If the server binaries are missing the tests are skipped with the reason
(CI treats a skip as a failure, which is intended). Set ``BROKER_PG_BIN`` to
pick a bin directory explicitly.

The cluster itself (:func:`start_cluster`, :class:`PostgresCluster`) does not
depend on pytest: the benchmarks (``bench.store``, ``bench.scaleout``,
``bench.admin``) use the same recipe through it, with their own server options.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.prerequisites import unavailable

SUPERUSER = "broker"
SESSION_DATABASE = "broker_test"
START_ATTEMPTS = 3
#: Durability is pointless for a throwaway test cluster; speed is not.
TEST_OPTIONS = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"


class ClusterError(RuntimeError):
    """initdb or pg_ctl failed; the message carries their output and the server log."""


@dataclass(frozen=True)
class PostgresCluster:
    base: Path
    data: Path
    bindir: Path
    port: int
    pid: int
    user: str = SUPERUSER

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def libpq_dsn(self, database: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={database}"

    def execute_autocommit(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.libpq_dsn("postgres"), autocommit=True) as conn:
            conn.execute(sql.encode("utf-8"))

    def create_database(self, name: str) -> str:
        _check_identifier(name)
        self.execute_autocommit(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        _check_identifier(name)
        self.execute_autocommit(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def version(self) -> str:
        out = subprocess.run(
            [str(self.bindir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            check=False,
        )
        return out.stdout.strip()

    def stop(self, timeout: float = 20.0) -> None:
        """Fast shutdown of the postmaster this cluster started, by its PID."""
        _stop(self.pid, timeout)


def _check_identifier(name: str) -> None:
    if not name.replace("_", "").isalnum() or not name.isascii():
        raise ValueError(f"unsafe database name {name!r}")


def find_bindir() -> Path | None:
    """The PostgreSQL server bin directory: ``BROKER_PG_BIN``, the newest Debian one, PATH."""
    candidates: list[Path] = []
    if os.environ.get("BROKER_PG_BIN"):
        candidates.append(Path(os.environ["BROKER_PG_BIN"]))

    def version(path: str) -> int:
        try:
            return int(Path(path).parent.name)
        except ValueError:
            return 0

    candidates += [
        Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    ]
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for candidate in candidates:
        if all((candidate / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return candidate
    return None


_find_bindir = find_bindir  # the name tests/reliability/harness.py imports


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_server_user(argv: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return argv


def _run(argv: list[str], what: str, timeout: float = 60) -> None:
    proc = subprocess.run(
        _as_server_user(argv), capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise ClusterError(f"{what} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def _postmaster_pid(data: Path) -> int:
    return int((data / "postmaster.pid").read_text().splitlines()[0])


def _stop(pid: int, timeout: float = 20.0) -> None:
    """Fast shutdown (SIGINT) of the postmaster we started; SIGQUIT if it hangs."""
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGQUIT)
    except ProcessLookupError:
        return
    time.sleep(1.0)


def start_cluster(
    base: Path,
    bindir: Path,
    *,
    options: str = TEST_OPTIONS,
    start_timeout: int = 30,
) -> PostgresCluster:
    """initdb a cluster in ``base`` (made 0700, owned by ``postgres`` when root) and start it.

    It listens on 127.0.0.1 only, on a free port (retried if another process
    takes the port first), with its socket in ``base``; ``options`` are extra
    server settings. The caller stops it (:meth:`PostgresCluster.stop`) and
    removes ``base``. Raises :class:`ClusterError` when initdb or pg_ctl fails.
    """
    base.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        server_user = pwd.getpwnam("postgres")
        os.chown(base, server_user.pw_uid, server_user.pw_gid)
    os.chmod(base, 0o700)
    data = base / "data"
    _run(
        [
            str(bindir / "initdb"),
            "-D", str(data),
            "-A", "trust",
            "-U", SUPERUSER,
            "-E", "UTF8",
            "--locale=C",
            "--no-sync",
        ],
        "initdb",
        timeout=120,
    )  # fmt: skip
    for attempt in range(START_ATTEMPTS):
        port = _free_port()
        server_options = f"-c listen_addresses=127.0.0.1 -p {port} -k {base} {options}"
        proc = subprocess.run(
            _as_server_user(
                [
                    str(bindir / "pg_ctl"),
                    "-w", "-t", str(start_timeout),
                    "-D", str(data),
                    "-l", str(base / "server.log"),
                    "-o", server_options,
                    "start",
                ]
            ),
            capture_output=True,
            text=True,
            timeout=start_timeout + 30,
            check=False,
        )  # fmt: skip
        if proc.returncode == 0:
            pid = _postmaster_pid(data)
            return PostgresCluster(base=base, data=data, bindir=bindir, port=port, pid=pid)
        if attempt == START_ATTEMPTS - 1:
            log = (base / "server.log").read_text(errors="replace")[-4000:]
            raise ClusterError(f"pg_ctl start failed:\n{proc.stdout}\n{proc.stderr}\n{log}")
    raise AssertionError("unreachable")  # pragma: no cover


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    bindir = find_bindir()
    if bindir is None:
        unavailable(
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: "
            "apt-get install -y postgresql, or set BROKER_PG_BIN"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            unavailable("running as root but there is no 'postgres' OS user to run the server")
        if shutil.which("runuser") is None:
            unavailable("running as root but runuser(1) is missing")
    base = Path(tempfile.mkdtemp(prefix="broker-pg-"))
    cluster: PostgresCluster | None = None
    try:
        try:
            cluster = start_cluster(base, bindir)
        except ClusterError as exc:
            pytest.fail(str(exc))
        yield cluster
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url(postgres_cluster: PostgresCluster) -> str:
    return postgres_cluster.create_database(SESSION_DATABASE)


@pytest.fixture
def postgres_database(postgres_cluster: PostgresCluster) -> Iterator[str]:
    name = f"t_{secrets.token_hex(6)}"
    url = postgres_cluster.create_database(name)
    try:
        yield url
    finally:
        postgres_cluster.drop_database(name)
