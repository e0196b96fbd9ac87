"""Alembic migrations of the credential store (run through :func:`broker.store.migrate`)."""
