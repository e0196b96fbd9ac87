#!/usr/bin/env python3
"""Admin page queries at scale: 1e5 credentials and 1e6 audit rows, SQLite and PostgreSQL.

Run it through the entry script (it picks the venv's python)::

    scripts/bench admin                                   # both backends, 1e5 / 1e6
    scripts/bench admin --backends sqlite --credentials 10000 --audit 100000
    scripts/bench admin --help

For every backend a fresh database gets the schema (``broker.store.migrate``,
so the admin indexes of migration 0004 are there) and is filled by
bulk Core inserts: N credentials (owners spread over N/10 DNs, expiry spread
over 30 days; the key columns hold placeholder bytes, the admin page never
reads them) and M audit rows over the last 30 days (ids in time order, as the
service writes them; 2 % refusals, job ids unique per 10 rows, 1000 requesters).
Then every query the admin page runs (``broker.store.admin_queries``) is timed
``--repeat`` times on a warm cache; the report gives the median and the worst
in milliseconds.  PostgreSQL is a throwaway cluster (bench/store.py's
recipe), queried after ``VACUUM ANALYZE`` (the steady state autovacuum keeps).
Results: bench-out/admin.json.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, insert, text

from bench.store import start_pg
from broker.store import admin_queries as q
from broker.store import make_engine, migrate
from broker.store.models import AuditEventRow, Credential
from tests.pgcluster import PostgresCluster

REPO = Path(__file__).resolve().parents[1]

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
BATCH = 5000
TARGET_MS = 100.0  # a page's queries must stay well under a human's patience


def owner(i: int) -> str:
    return f"/DC=org/DC=example/OU=bench/CN=user {i:06d}"


def fill(engine: Engine, credentials: int, audit: int, seed: int) -> float:
    rng = random.Random(seed)  # noqa: S311 - test data, not secrets
    started = time.perf_counter()
    owners = max(1, credentials // 10)
    with engine.begin() as conn:
        for start in range(0, credentials, BATCH):
            conn.execute(
                insert(Credential),
                [
                    {
                        "owner_dn": owner(i % owners),
                        "username": f"u{i:07d}",
                        "name": "default",
                        "certificate_chain": "placeholder",
                        "retrievers": [],
                        "trusted_retrievers": [],
                        "renewers": [],
                        "limited": False,
                        "not_after": NOW + timedelta(seconds=rng.randrange(-86400, 30 * 86400)),
                        "created_at": NOW,
                        "updated_at": NOW,
                        "key_ciphertext": b"x",
                        "key_nonce": b"n" * 12,
                        "wrapped_data_key": b"w",
                        "master_key_id": "bench",
                        "passphrase_protected": False,
                    }
                    for i in range(start, min(credentials, start + BATCH))
                ],
            )
    span = 30 * 86400
    with engine.begin() as conn:
        for start in range(0, audit, BATCH):
            rows: list[dict[str, Any]] = []
            for i in range(start, min(audit, start + BATCH)):
                deny = rng.random() < 0.02
                rows.append(
                    {
                        "time": NOW - timedelta(seconds=span * (audit - i) / audit),
                        "action": "retrieve" if rng.random() < 0.8 else "info",
                        "decision": "deny" if deny else "allow",
                        "endpoint": "rest",
                        "requester_dn": f"/DC=org/DC=example/CN=pilot {i % 1000:04d}",
                        "requester_fqans": [],
                        "owner_dn": owner(i % owners),
                        "username": f"u{i % max(1, credentials):07d}",
                        "credential_name": "default",
                        "job_id": f"job-{i // 10}",
                        "reason": "no_matching_rule" if deny else "ok",
                    }
                )
            conn.execute(insert(AuditEventRow), rows)
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))
    return time.perf_counter() - started


def timed(call: Callable[[], Any], repeat: int) -> dict[str, float]:
    call()  # warm the cache and the statement cache
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        call()
        samples.append((time.perf_counter() - t0) * 1000)
    return {"median_ms": round(statistics.median(samples), 2), "max_ms": round(max(samples), 2)}


def cases(engine: Engine, credentials: int, audit: int) -> dict[str, Callable[[], Any]]:
    owners = max(1, credentials // 10)
    window = timedelta(hours=24)
    deep_cred = q.CredentialCursor(owner(owners - 2), 0)
    return {
        "credential counts (total, expiring, expired)": lambda: q.credential_counts(
            engine, now=NOW, window=window
        ),
        "credentials: first page": lambda: q.credential_page(engine, limit=50),
        "credentials: a page near the end (keyset)": lambda: q.credential_page(
            engine, after=deep_cred, limit=50
        ),
        "credentials: one owner": lambda: q.credential_page(engine, owner_dn=owner(owners // 2)),
        "credentials: expiring within 24 h": lambda: q.credential_page(
            engine, expiring_before=NOW + window
        ),
        "audit: newest page, no filter": lambda: q.audit_page(engine, q.AuditFilter()),
        "audit: a page near the start of the trail (keyset)": lambda: q.audit_page(
            engine, q.AuditFilter(), before=100
        ),
        "audit: by job id": lambda: q.audit_page(engine, q.AuditFilter(job_id="job-12345")),
        "audit: by requester": lambda: q.audit_page(
            engine, q.AuditFilter(requester_dn="/DC=org/DC=example/CN=pilot 0042")
        ),
        "audit: by owner": lambda: q.audit_page(engine, q.AuditFilter(owner_dn=owner(7))),
        "audit: refusals only": lambda: q.audit_page(engine, q.AuditFilter(decision="deny")),
        "audit: one hour 10 days ago": lambda: q.audit_page(
            engine,
            q.AuditFilter(since=NOW - timedelta(days=10, hours=1), until=NOW - timedelta(days=10)),
        ),
        "chart: last 24 h, hourly": lambda: q.activity_chart(
            engine, since=NOW - timedelta(hours=24), until=NOW, bucket=timedelta(hours=1)
        ),
        "chart: last 30 days, 30 h buckets": lambda: q.activity_chart(
            engine, since=NOW - timedelta(hours=720), until=NOW, bucket=timedelta(hours=30)
        ),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--backends", default="sqlite,postgresql", type=lambda s: [b for b in s.split(",") if b]
    )
    p.add_argument("--credentials", type=int, default=100_000)
    p.add_argument("--audit", type=int, default=1_000_000)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--seed", type=int, default=17)
    p.add_argument("--out", default=str(REPO / "bench-out" / "admin.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report: dict[str, Any] = {
        "benchmark": "admin",
        "credentials": args.credentials,
        "audit_rows": args.audit,
        "repeat": args.repeat,
        "target_ms": TARGET_MS,
        "backends": {},
    }
    tmp = Path(tempfile.mkdtemp(prefix="broker-bench-admin-"))
    tmp.chmod(0o755)
    pg: PostgresCluster | None = None
    try:
        for backend in args.backends:
            if backend == "sqlite":
                url = f"sqlite:///{tmp / 'admin.sqlite'}"
            elif backend == "postgresql":
                pg = start_pg(tmp / "pg")
                url = pg.create_database("admin")
            else:
                raise SystemExit(f"unknown backend {backend!r}: use sqlite or postgresql")
            migrate(url)
            engine = make_engine(url)
            print(
                f"[{backend}] filling {args.credentials} credentials and {args.audit} "
                "audit rows ...",
                file=sys.stderr,
            )
            filled = fill(engine, args.credentials, args.audit, args.seed)
            results = {}
            for name, call in cases(engine, args.credentials, args.audit).items():
                results[name] = timed(call, args.repeat)
                print(
                    f"[{backend}] {name:55s} median {results[name]['median_ms']:8.2f} ms  "
                    f"max {results[name]['max_ms']:8.2f} ms",
                    file=sys.stderr,
                )
            worst = max(r["median_ms"] for r in results.values())
            report["backends"][backend] = {
                "fill_seconds": round(filled, 1),
                "queries": results,
                "worst_median_ms": worst,
                "meets_target": worst <= TARGET_MS,
            }
            engine.dispose()
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({b: v["worst_median_ms"] for b, v in report["backends"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
