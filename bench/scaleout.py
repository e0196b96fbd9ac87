#!/usr/bin/env python3
"""Scale-out: two ``broker serve`` instances on one PostgreSQL database vs one.

Run it through the entry script (it picks the venv's python)::

    scripts/bench scaleout                      # 16 and 64 clients
    scripts/bench scaleout --levels 16 --requests 1000
    scripts/bench scaleout --help

Setup, all on 127.0.0.1 under a temp dir removed at the end: a throwaway
PostgreSQL cluster (the same recipe as bench/store.py and
tests/pgcluster.py), one database holding ``--credentials`` credentials of
alice (filled like bench/store.py does), one master key file, and two
``broker serve`` processes (A and B, default 2 workers x 8 threads each, own
state dirs and ports) given the same ``--database-url`` and
``--master-key-file``. Both are up during the whole run.

Per concurrency level the same load (pre-generated EC P-256 CSRs, random
usernames, one full TLS handshake per retrieval) is run twice with the load
generator of bench/retrieval.py (two client processes, threads in
them): once with both processes sending to A only, once with the first process
sending to A and the second to B (the load split in half). The ratio is
throughput(A+B) / throughput(A). Server CPU per retrieval sums both brokers.

On a 2-core machine one broker with 2 workers can already use both cores, so a
second instance can add no CPU; what this shows is that two instances work
correctly side by side on one database (no errors, no lost audit rows) and
whether the shared database becomes a bottleneck. The audit row count is
checked against the number of retrievals made.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path

from sqlalchemy import create_engine, func, select

from bench import retrieval as br
from bench import store as bs
from broker.store.models import AuditEventRow
from tests.pgcluster import PostgresCluster

REPO = Path(__file__).resolve().parents[1]


def audit_rows(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(AuditEventRow)).scalar_one())
    finally:
        engine.dispose()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench scaleout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--levels", default="16,64", help="client concurrency levels [16,64]")
    p.add_argument("--requests", type=int, default=600, help="retrievals per run [600]")
    p.add_argument("--max-seconds", type=float, default=30.0, help="time bound per run [30]")
    p.add_argument("--credentials", type=int, default=1000, help="stored credentials [1000]")
    p.add_argument("--workers", type=int, default=2, help="gunicorn workers per broker [2]")
    p.add_argument("--threads", type=int, default=8, help="threads per worker [8]")
    p.add_argument(
        "--client-procs",
        type=int,
        default=2,
        help="load-generator processes; with 2 brokers they alternate [2]",
    )
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--out", default=str(REPO / "bench-out" / "scaleout.json"))
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    args.levels = [int(x) for x in args.levels.split(",")]
    if args.client_procs < 2:
        p.error("--client-procs must be at least 2 (one per broker)")
    if not 1 <= args.requests <= 100_000 or not 1 <= args.credentials <= 1_000_000:
        p.error("--requests 1..1e5, --credentials 1..1e6")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = br.report_head("scaleout", args, "levels")
    with bs.scratch_dir("broker-bench-scaleout-", keep=args.keep) as tmp:
        pg: PostgresCluster | None = None
        servers: list[br.Server] = []
        try:
            fx = bs.make_fixture(tmp, csr_pool=16)
            pg = bs.start_pg(tmp / "pg")
            report["postgresql"] = bs.postgresql_info(pg)
            url = pg.create_database("scaleout")
            bs.populate(url, fx, args.credentials)
            for label in ("A", "B"):
                servers.append(
                    bs.start_broker(
                        fx, tmp / f"serve-{label}", url, workers=args.workers, threads=args.threads
                    )
                )
            report["brokers"] = [{"pid": s.pid, "port": s.port} for s in servers]
            print(
                f"brokers A (:{servers[0].port}) and B (:{servers[1].port}) on {pg.version()}",
                file=sys.stderr,
            )
            bodies = bs.bodies_for(fx, args.credentials, 256, args.seed)
            common = {**bs.level_options(fx, args), "bodies": bodies}
            audit0 = audit_rows(url)
            made = 0
            br.run_level(servers=servers, concurrency=4, requests=args.warmup, **common)
            made += args.warmup
            for conc in args.levels:
                level = {"concurrency": conc, "requests": args.requests, **common}
                one = br.run_level(servers=servers[:1], **level)
                two = br.run_level(servers=servers, **level)
                made += one.requests + two.requests
                ratio = round(two.per_s / one.per_s, 2) if one.per_s else None
                print(
                    f"c={conc}: one broker {one.per_s}/s p99 {one.p99_ms} ms; two brokers "
                    f"{two.per_s}/s p99 {two.p99_ms} ms; ratio {ratio}",
                    file=sys.stderr,
                )
                report["levels"].append(
                    {"concurrency": conc, "one": asdict(one), "two": asdict(two), "ratio": ratio}
                )
            audit1 = audit_rows(url)
            report["audit_rows_added"] = audit1 - audit0
            report["retrievals_made"] = made
        finally:
            for s in servers:
                s.stop()
            if pg is not None:
                pg.stop()
    report["loadavg_end"] = os.getloadavg()

    print()
    head = (
        f"{'clients':>7} | {'1 broker /s':>11} {'p50':>6} {'p99':>7} {'CPU ms/op':>9} | "
        f"{'2 brokers /s':>12} {'p50':>6} {'p99':>7} {'CPU ms/op':>9} | {'ratio':>5} "
        f"{'errors':>6}"
    )
    print(head)
    print("-" * len(head))
    for lv in report["levels"]:
        a, b = lv["one"], lv["two"]
        print(
            f"{lv['concurrency']:>7} | {a['per_s']:>11.1f} {a['p50_ms']:>6.1f} "
            f"{a['p99_ms']:>7.1f} {a['server_cpu_ms_per_op']:>9.2f} | {b['per_s']:>12.1f} "
            f"{b['p50_ms']:>6.1f} {b['p99_ms']:>7.1f} {b['server_cpu_ms_per_op']:>9.2f} | "
            f"{lv['ratio']:>5} {a['errors'] + b['errors']:>6}"
        )
    print(
        f"audit rows added {report['audit_rows_added']} for {report['retrievals_made']} retrievals"
    )
    br.write_report(report, args.out)
    errors = sum(lv["one"]["errors"] + lv["two"]["errors"] for lv in report["levels"])
    return 1 if errors else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
