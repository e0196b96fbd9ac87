"""The Alembic migration creates exactly what the models describe."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from broker.store import make_engine, migrate
from broker.store.engine import alembic_config
from broker.store.models import Base


def test_models_and_migration_agree(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(context, Base.metadata)
        assert diff == []
        with engine.connect() as conn:
            head = MigrationContext.configure(conn).get_current_revision()
        assert head == "0006"
    finally:
        engine.dispose()


def test_migrate_is_idempotent_and_reversible(db_url: str) -> None:
    migrate(db_url)  # already at head: a no-op
    engine = make_engine(db_url)
    try:
        tables = set(inspect(engine).get_table_names())
        assert {"credentials", "pending_delegations", "audit_events"} <= tables
        config = alembic_config()
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.downgrade(config, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()
    migrate(db_url)
    engine = make_engine(db_url)
    try:
        assert "credentials" in inspect(engine).get_table_names()
    finally:
        engine.dispose()
