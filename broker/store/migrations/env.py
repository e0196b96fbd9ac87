"""Alembic environment for the credential store.

There is no alembic.ini: :func:`broker.store.engine.migrate` builds the
configuration in code and hands over an open connection in
``config.attributes["connection"]``. Run by hand, the URL comes from
``sqlalchemy.url`` in the configuration instead.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from broker.store.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place; batch mode lets later
        # migrations change columns portably.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    # Imported late so that importing this module never opens a database.
    from broker.store.engine import make_engine

    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection and no sqlalchemy.url given to the migrations")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) migrations are not supported; run them online")
run_migrations_online()
