"""The admin page's read-only queries on SQLite and PostgreSQL: keyset paging, filters,
expiry counts and the activity chart."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, insert

from broker.errors import InputError
from broker.store import admin_queries as q
from broker.store import default_sqlite_url, make_engine, migrate
from broker.store.models import AuditEventRow, Credential

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = default_sqlite_url(tmp_path / "state")
    else:
        url = str(request.getfixturevalue("postgres_database"))
    migrate(url)
    eng = make_engine(url)
    try:
        yield eng
    finally:
        eng.dispose()


def _credential(owner: str, username: str, not_after: datetime) -> dict[str, object]:
    return {
        "owner_dn": owner,
        "username": username,
        "name": "default",
        "certificate_chain": "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
        "not_after": not_after,
        "retrievers": [],
        "trusted_retrievers": [],
        "renewers": [],
        "limited": False,
        "created_at": NOW,
        "updated_at": NOW,
        "key_ciphertext": b"SECRET-CIPHERTEXT",
        "key_nonce": b"n" * 12,
        "wrapped_data_key": b"SECRET-WRAPPED",
        "master_key_id": "k1",
        "passphrase_protected": True,
    }


def _audit(i: int, **values: object) -> dict[str, object]:
    row: dict[str, object] = {
        "time": NOW - timedelta(minutes=i),
        "action": "retrieve",
        "decision": "allow",
        "endpoint": "rest",
        "requester_dn": "/CN=pilot",
        "requester_fqans": [],
        "owner_dn": "/CN=alice",
        "username": "alice",
        "credential_name": "default",
        "job_id": f"job-{i}",
        "reason": "ok",
    }
    row.update(values)
    return row


def test_credential_pages_walk_every_row_once_in_owner_order(engine: Engine) -> None:
    owners = [f"/DC=org/CN=user{i % 7:02d}" for i in range(23)]
    with engine.begin() as conn:
        conn.execute(
            insert(Credential),
            [
                _credential(owner, f"u{i}", NOW + timedelta(hours=i))
                for i, owner in enumerate(owners)
            ],
        )
    seen: list[tuple[str, int]] = []
    cursor = None
    pages = 0
    while True:
        page = q.credential_page(engine, after=cursor, limit=5)
        seen += [(r.owner_dn, r.id) for r in page.rows]
        pages += 1
        if page.next is None:
            break
        cursor = page.next
    assert pages == 5
    assert seen == sorted(seen) and len(set(seen)) == 23
    # one owner only, and the expiring filter (not_after before the bound)
    one = q.credential_page(engine, owner_dn="/DC=org/CN=user03", limit=50)
    assert {r.owner_dn for r in one.rows} == {"/DC=org/CN=user03"} and len(one.rows) == 3
    soon = q.credential_page(engine, expiring_before=NOW + timedelta(hours=3), limit=50)
    assert sorted(r.username for r in soon.rows) == ["u0", "u1", "u2"]


def test_credential_rows_carry_no_key_material(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(insert(Credential), [_credential("/CN=a", "a", NOW)])
    row = q.credential_page(engine).rows[0]
    names = {f.name for f in fields(row)}
    assert not names & {"key_ciphertext", "wrapped_data_key", "kdf_salt", "certificate_chain"}
    assert "SECRET" not in repr(row)


def test_counts_split_expired_and_expiring(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            insert(Credential),
            [
                _credential("/CN=a", "gone", NOW - timedelta(hours=1)),
                _credential("/CN=a", "soon", NOW + timedelta(hours=5)),
                _credential("/CN=a", "later", NOW + timedelta(days=5)),
            ],
        )
    counts = q.credential_counts(engine, now=NOW, window=timedelta(hours=24))
    assert counts == q.CredentialCounts(total=3, expiring=1, expired=1)


def test_audit_filters_and_paging(engine: Engine) -> None:
    rows = [_audit(i) for i in range(30)]
    rows[3] = _audit(3, job_id="<script>alert(1)</script>", decision="deny", reason="no rule")
    rows[4] = _audit(4, requester_dn="/CN=other", action="info")
    rows[5] = _audit(5, owner_dn="/CN=bob")
    with engine.begin() as conn:  # oldest first, as the service writes them
        conn.execute(insert(AuditEventRow), rows[::-1])
    job = q.audit_page(engine, q.AuditFilter(job_id="<script>alert(1)</script>"))
    assert [r.job_id for r in job.rows] == ["<script>alert(1)</script>"] and job.next_before is None
    assert [r.job_id for r in q.audit_page(engine, q.AuditFilter(decision="deny")).rows] == [
        "<script>alert(1)</script>"
    ]
    assert [
        r.job_id for r in q.audit_page(engine, q.AuditFilter(requester_dn="/CN=other")).rows
    ] == ["job-4"]
    assert [r.job_id for r in q.audit_page(engine, q.AuditFilter(action="info")).rows] == ["job-4"]
    assert [r.job_id for r in q.audit_page(engine, q.AuditFilter(owner_dn="/CN=bob")).rows] == [
        "job-5"
    ]
    # [since, until): minutes 10..12 ago
    window = q.AuditFilter(since=NOW - timedelta(minutes=12), until=NOW - timedelta(minutes=9))
    assert [r.job_id for r in q.audit_page(engine, window).rows] == ["job-10", "job-11", "job-12"]
    # newest first, keyset pages of 12 cover all 30 rows once
    got: list[int] = []
    before = None
    while True:
        page = q.audit_page(engine, q.AuditFilter(), before=before, limit=12)
        got += [r.id for r in page.rows]
        if page.next_before is None:
            break
        before = page.next_before
    assert got == sorted(got, reverse=True) and len(set(got)) == 30


def test_activity_chart_counts_per_bucket(engine: Engine) -> None:
    hour = timedelta(hours=1)
    rows = [
        _audit(0, time=NOW - 0.5 * hour),  # allowed retrieval, last bucket
        _audit(1, time=NOW - 0.4 * hour, action="renew"),  # renewals count as retrievals
        _audit(2, time=NOW - 0.3 * hour, action="info"),  # an allowed info is neither
        _audit(3, time=NOW - 2.5 * hour, decision="deny"),  # a refusal, third-last bucket
        _audit(4, time=NOW - 2.2 * hour, decision="deny", action="destroy"),
        _audit(5, time=NOW - 30 * hour),  # outside the window
    ]
    with engine.begin() as conn:
        conn.execute(insert(AuditEventRow), rows)
    buckets = q.activity_chart(engine, since=NOW - 24 * hour, until=NOW, bucket=hour)
    assert len(buckets) == 24 and buckets[0].start == NOW - 24 * hour
    assert (buckets[-1].retrievals, buckets[-1].refusals) == (2, 0)
    assert (buckets[-3].retrievals, buckets[-3].refusals) == (0, 2)
    assert sum(b.retrievals + b.refusals for b in buckets) == 4


def test_bad_page_sizes_and_chart_ranges_are_input_errors(engine: Engine) -> None:
    with pytest.raises(InputError):
        q.credential_page(engine, limit=0)
    with pytest.raises(InputError):
        q.audit_page(engine, q.AuditFilter(), limit=q.MAX_PAGE_SIZE + 1)
    with pytest.raises(InputError):
        q.activity_chart(
            engine, since=NOW - timedelta(days=30), until=NOW, bucket=timedelta(minutes=1)
        )
