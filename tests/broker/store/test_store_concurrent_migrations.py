"""Nodes started at the same moment on one empty PostgreSQL database all come up.

Each node is a separate process (as in a deployment): it imports the broker, waits
for a shared start signal, then migrates. Without the advisory lock in
``broker.store.engine.migrate`` the concurrent ``CREATE TABLE`` statements race in
PostgreSQL's catalogue and some nodes die on ``duplicate key value violates unique
constraint "pg_type_typname_nsp_index"``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from broker.store import make_engine

NODES = 6

_NODE = r"""
import sys, time
from pathlib import Path
from broker.store import migrate
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
migrate(sys.argv[1])
print("migrated")
"""


@pytest.mark.postgres
def test_nodes_migrating_at_once_all_come_up(postgres_database: str, tmp_path: Path) -> None:
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _NODE, postgres_database, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(NODES)
    ]
    time.sleep(3.0)  # let every process finish its imports and wait on the signal
    go.touch()
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    failures = [err for rc, _out, err in results if rc != 0]
    assert failures == [], failures[0][-2000:]
    assert all(out.strip() == "migrated" for _rc, out, _err in results)
    engine = make_engine(postgres_database)
    try:
        assert "credentials" in inspect(engine).get_table_names()
        with engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() is not None
    finally:
        engine.dispose()
