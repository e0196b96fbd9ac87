"""Database engines and schema migration.

``make_engine(url)`` returns an Engine configured for the two supported
backends:

* SQLite (development, single host): a file in the state directory, in WAL
  mode with a busy timeout and foreign keys on. Python's sqlite3 module
  opens transactions lazily and implicitly, which lets two writers deadlock
  on a lock upgrade; we switch that off and emit ``BEGIN`` ourselves, and a
  connection carrying the execution option ``broker_sqlite_begin="IMMEDIATE"``
  takes the write lock up front.
* PostgreSQL (production): ``postgresql+psycopg://user@host/db`` with
  ``pool_pre_ping`` so that a restarted server costs a reconnect, not an error.

``migrate(engine_or_url)`` brings a database to the newest schema with the
Alembic scripts shipped in this package; it is the only way tables are
created. On PostgreSQL it first takes a transaction-scoped advisory lock
(:data:`MIGRATION_LOCK_KEY`), so nodes started at the same moment migrate one
after the other: the first creates the tables, the others wait for its commit
and then find the schema at head. Without the lock two concurrent ``CREATE
TABLE`` statements race in the catalogue and one node dies on a duplicate key
in ``pg_type``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError, SQLAlchemyError

from broker.errors import ConfigError, StoreError, StoreUnavailable

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_FILENAME = "broker.sqlite"
SQLITE_BUSY_TIMEOUT_MS = 5000
SQLITE_BEGIN_OPTION = "broker_sqlite_begin"
# conn.info key: this connection holds its engine's in-process writer lock.
_WRITE_LOCK_HELD = "broker_sqlite_write_lock"
# How long a writer queues in-process before falling back to SQLite's
# busy handler: long enough for a queue of writers on a saturated two-core host.
SQLITE_WRITE_QUEUE_WAIT_S = 25.0
# The advisory lock every node takes before migrating a PostgreSQL database (an
# arbitrary constant, the same on every node: "broker-mig" in ASCII).
MIGRATION_LOCK_KEY = 0x62726F6B65726D69
# How long a node waits for another node's migration before giving up (ms).
MIGRATION_LOCK_TIMEOUT_MS = 120_000


def default_sqlite_url(state_dir: str | os.PathLike[str]) -> str:
    """The URL of the SQLite database inside ``state_dir``."""
    path = Path(state_dir).resolve() / SQLITE_FILENAME
    return f"sqlite+pysqlite:///{path}"


def safe_url(url: str | URL) -> str:
    """The URL as text with any password masked, for messages and logs."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except ArgumentError:
        return "<unparseable database URL>"
    return parsed.render_as_string(hide_password=True)


def _parse(url: str | URL) -> URL:
    try:
        return make_url(url) if isinstance(url, str) else url
    except ArgumentError as exc:
        raise ConfigError(f"invalid database URL {safe_url(url)!r}: {exc}") from None


def make_engine(url: str | URL, **engine_kwargs: Any) -> Engine:
    """Create an Engine for SQLite or PostgreSQL (see the module docstring).

    Nothing is connected here; connection failures surface on first use and
    are translated by :func:`unavailable_error`.
    """
    parsed = _parse(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database
        if not database or database == ":memory:":
            # Each pooled connection would get its own empty in-memory
            # database; a store must be a file.
            raise ConfigError("the SQLite store needs a file path, not an in-memory database")
        Path(database).parent.mkdir(parents=True, exist_ok=True)
        _create_private_database_file(Path(database))
        engine = create_engine(parsed, **engine_kwargs)
        _configure_sqlite(engine)
        return engine
    if backend == "postgresql":
        if parsed.get_driver_name() != "psycopg":
            raise ConfigError(
                f"use the psycopg 3 driver for PostgreSQL (postgresql+psycopg://...), "
                f"not {safe_url(parsed)!r}"
            )
        engine_kwargs.setdefault("pool_pre_ping", True)
        return create_engine(parsed, **engine_kwargs)
    raise ConfigError(
        f"unsupported database {safe_url(parsed)!r}; use sqlite:///path or postgresql+psycopg://"
    )


def _create_private_database_file(path: Path) -> None:
    """Create a missing SQLite file as mode 0600 before SQLite does it with the umask
    (0644 usually): it holds the encrypted keys and the audit trail. SQLite gives its
    -wal and -shm files the database file's mode, so those follow. An existing file is
    left as it is (its mode is the administrator's choice)."""
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
    except FileExistsError:
        return
    except OSError as exc:
        raise ConfigError(f"cannot create the SQLite database {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)  # the umask may have removed bits, never added them; be explicit
    finally:
        os.close(fd)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module (see the
        # module docstring); _on_begin emits BEGIN instead.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS:d}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA foreign_keys = ON")
            # NORMAL (in WAL mode): a commit survives the server being killed
            # (kill -9) and the database is never corrupted; only a power cut or
            # kernel crash may lose the last commits. FULL added an fsync to every
            # commit, i.e. to every retrieval's audit row, inside the write lock,
            # and that lock wait was the broker's tail latency under load.
            # Sites that need power-cut durability use PostgreSQL.
            cursor.execute("PRAGMA synchronous = NORMAL")
            # Freed pages (deleted keys' ciphertext) are zeroed, not left behind.
            cursor.execute("PRAGMA secure_delete = ON")
        finally:
            cursor.close()

    # Writers of one process queue on a Python lock before BEGIN IMMEDIATE.
    # SQLite's busy handler polls with sleeps of up to 100 ms, so under load (64 clients,
    # scripts/reliability) a freed write lock sat idle while sleepers woke late and new
    # arrivals won it; writers starved past the busy timeout ("database is locked", 503).
    # With this lock only the processes (gunicorn workers, the MyProxy child) contend
    # inside SQLite. A lock that somehow stays held costs a wait, never a deadlock: the
    # acquire times out and the writer falls back to SQLite's own busy handling.
    write_lock = threading.Lock()

    def _release(info: dict[str, Any]) -> None:
        if info.pop(_WRITE_LOCK_HELD, False):
            write_lock.release()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get(SQLITE_BEGIN_OPTION, "DEFERRED")
        if mode not in ("DEFERRED", "IMMEDIATE"):
            raise ValueError(f"bad {SQLITE_BEGIN_OPTION} option {mode!r}")
        if mode == "IMMEDIATE" and not conn.info.get(_WRITE_LOCK_HELD):
            conn.info[_WRITE_LOCK_HELD] = write_lock.acquire(timeout=SQLITE_WRITE_QUEUE_WAIT_S)
        try:
            conn.exec_driver_sql(f"BEGIN {mode}")
        except BaseException:
            _release(conn.info)
            raise

    @event.listens_for(engine, "commit")
    def _on_commit(conn: Any) -> None:
        # Fires just before COMMIT; the next writer's BEGIN IMMEDIATE waits the few
        # milliseconds of the commit in SQLite's busy handler.
        _release(conn.info)

    @event.listens_for(engine, "rollback")
    def _on_rollback(conn: Any) -> None:
        _release(conn.info)

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        _release(record.info)  # a connection returned without commit or rollback


def unavailable_error(engine_or_url: Engine | str | URL, exc: BaseException) -> StoreError:
    """Translate a driver failure into the error tree without leaking passwords.

    A connection that cannot be made (or was lost) becomes StoreUnavailable;
    anything else a plain StoreError. The driver's own text is kept because it
    says *why* (refused, timeout, auth), but the URL is re-rendered masked.
    """
    url = engine_or_url.url if isinstance(engine_or_url, Engine) else _parse(engine_or_url)
    detail = _driver_detail(exc)
    if isinstance(exc, OperationalError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    ):
        if url.get_backend_name() == "sqlite":
            if "locked" in detail or "busy" in detail:
                return StoreUnavailable(
                    f"the database at {safe_url(url)} is busy: {detail}", reason="busy"
                )
            # SQLITE_FULL: say so plainly (the generic advice below, about
            # permissions, sent admins the wrong way; scripts/reliability checks this).
            if "full" in detail:
                return StoreUnavailable(
                    f"the disk holding the database at {safe_url(url)} is full ({detail}); "
                    "nothing was stored: free space in the state directory and retry",
                    reason="disk_full",
                )
            return StoreUnavailable(
                f"the database at {safe_url(url)} cannot be used: {detail}; "
                "check the state directory and its permissions"
            )
        return StoreUnavailable(
            f"the database at {safe_url(url)} is not reachable: {detail}; "
            "check that PostgreSQL is running"
        )
    return StoreError(f"database error on {safe_url(url)}: {detail}")


def _driver_detail(exc: BaseException) -> str:
    original = getattr(exc, "orig", None) or exc
    text = str(original).strip().splitlines()
    first = text[0] if text else type(original).__name__
    # psycopg may echo the connection string; never let a password through.
    if "password=" in first:
        first = first.split("password=")[0] + "password=***"
    return first


def migrate(engine_or_url: Engine | str | URL, revision: str = "head") -> None:
    """Run ``alembic upgrade <revision>`` on the database, in one transaction."""
    owned = not isinstance(engine_or_url, Engine)
    engine = make_engine(engine_or_url) if not isinstance(engine_or_url, Engine) else engine_or_url
    config = alembic_config()
    try:
        with engine.begin() as connection:
            lock_for_migration(connection)
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    except SQLAlchemyError as exc:
        raise unavailable_error(engine, exc) from None
    finally:
        config.attributes.pop("connection", None)
        if owned:
            engine.dispose()


def lock_for_migration(connection: Connection) -> None:
    """Serialise migrations across nodes: on PostgreSQL, wait (bounded) for the
    transaction-scoped advisory lock; it is released by the commit or rollback of
    ``connection``'s transaction. SQLite needs nothing: it is one host, and its
    write lock already serialises the DDL."""
    if connection.dialect.name != "postgresql":
        return
    connection.exec_driver_sql(f"SET LOCAL lock_timeout = {MIGRATION_LOCK_TIMEOUT_MS:d}")
    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})


def alembic_config() -> Config:
    """An Alembic configuration pointing at the packaged scripts (no .ini file).

    The database is handed over as ``config.attributes["connection"]``, so no
    URL (and no password) ever lands in the configuration.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config
