#!/usr/bin/env python3
"""Store scaling: REST retrieval latency with 1e2, 1e4 and 1e5 stored credentials.

Run it through the entry script (it picks the venv's python)::

    scripts/bench store                                  # both backends, 1e2 / 1e4 / 1e5
    scripts/bench store --backends sqlite --sizes 100,10000
    scripts/bench store --help

For every backend (SQLite in WAL mode, PostgreSQL) and every size N:

1. a fresh database gets the schema (``broker.store.migrate``) and N credentials.
   The first row is written by ``Store.put_credential`` itself. The other N-1
   rows are a bulk insert that copies every column of that row and changes only
   ``username`` (``user000001`` ...) and the key envelope: the same private key
   is sealed again with ``broker.store.crypto.seal`` under each row's own
   context (owner DN, username, name), exactly as put_credential would seal it.
   So every row is a valid, retrievable credential (same owner alice, same
   proxy chain and key, a fresh data key per row), and filling 1e5 rows takes
   seconds instead of the minutes 1e5 put_credential calls would take;
2. an in-process look-up loop (``Store.get_credential`` of random usernames,
   ``--lookups`` calls) gives the store's own cost without HTTP and TLS;
3. ``broker serve`` (default 2 workers x 8 threads) runs on that database with
   a policy letting the pilot retrieve, and the pilot POSTs /v1/retrievals for
   random usernames among the N rows (pre-generated EC P-256 CSRs; one full TLS
   handshake per retrieval). All sizes of one backend are served at once (one
   ``broker serve`` each), so that the single-client level can take the sizes
   in turn, request by request: every size then sees the same background load
   (this machine is shared; its load drifts more than the effect measured).
   Higher levels use the load generator of bench/retrieval.py, one
   size after the other. Per level: p50/p90/p99 latency, retrievals/s, server
   CPU per retrieval;
4. the databases are dropped before the next backend (disk space).

PostgreSQL runs as a throwaway cluster, as tests/pgcluster.py makes one:
``initdb`` as the ``postgres`` OS user into a temp dir, ``pg_ctl`` on
127.0.0.1 with a free port, ``synchronous_commit=off`` (a crash loses the last
commits, never corrupts; the same trade as SQLite's ``synchronous=NORMAL`` that
the broker uses), stopped by its postmaster PID at the end. Everything runs on
127.0.0.1 under one temp dir that is removed at the end (``--keep`` keeps it).

Target (from the issue): p50 latency at 1e5 credentials <= 1.2 x p50 at 1e2.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select

from bench import load as bl
from bench import retrieval as br
from broker.client import BrokerClient, ClientIdentity
from broker.devpki import write_dev_pki
from broker.pki.loading import chain_to_pem, key_to_pem, load_cert_and_key
from broker.pki.proxy import csr_to_pem, generate_key, make_csr, new_proxy
from broker.store import (
    CredentialWrite,
    Store,
    crypto,
    init_master_key_file,
    load_master_keys,
    migrate,
)
from broker.store.crypto import MasterKeyRing
from broker.store.models import Credential
from tests.pgcluster import PostgresCluster, find_bindir, start_cluster

REPO = Path(__file__).resolve().parents[1]

TARGET_RATIO = 1.2
BATCH = 2000


# ---------------------------------------------------------------- PostgreSQL


#: The benchmarks keep fsync on (unlike the test fixture) so the figures include
#: the WAL flush; synchronous_commit=off as in the deployment notes.
BENCH_PG_OPTIONS = "-c synchronous_commit=off -c max_connections=200"


def start_pg(base: Path) -> PostgresCluster:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (the tests' recipe, tests/pgcluster.py)."""
    bindir = find_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL server binaries not found (apt-get install -y postgresql)")
    return start_cluster(base, bindir, options=BENCH_PG_OPTIONS, start_timeout=60)


# ---------------------------------------------------------------- fixtures


@dataclass
class Fixture:
    """What every size shares: PKI, master key, alice's proxy, the pilot's CSRs."""

    tmp: Path
    pki: Path
    ring: MasterKeyRing
    master_key_file: Path
    owner_dn: str
    key_pem: bytes
    chain_pem: str
    csr_pems: list[str]


def make_fixture(tmp: Path, csr_pool: int) -> Fixture:
    pki = tmp / "pki"
    write_dev_pki(pki, now=datetime.now(UTC), users=("alice",), pilots=("pilot",))
    master_key_file = tmp / "master.key"
    init_master_key_file(master_key_file, now=datetime.now(UTC))
    alice = load_cert_and_key((pki / "alice.pem").read_bytes(), (pki / "alice.key").read_bytes())
    proxy = new_proxy(alice, now=datetime.now(UTC), lifetime=timedelta(days=7))
    assert proxy.key is not None  # new_proxy always makes the proxy's key
    owner_dn = _slash_dn(alice.chain[0])
    return Fixture(
        tmp=tmp,
        pki=pki,
        ring=load_master_keys(master_key_file),
        master_key_file=master_key_file,
        owner_dn=owner_dn,
        key_pem=key_to_pem(proxy.key),
        chain_pem=chain_to_pem(proxy.chain).decode(),
        csr_pems=[csr_to_pem(make_csr(generate_key("ec"))).decode() for _ in range(csr_pool)],
    )


def _slash_dn(cert: Any) -> str:
    from broker.pki.dn import slash_from_name

    return slash_from_name(cert.subject)


def username(i: int) -> str:
    return f"user{i:06d}"


def populate(url: str, fx: Fixture, count: int) -> float:
    """Schema + ``count`` credentials (see the module docstring); returns seconds taken."""
    t0 = time.perf_counter()
    migrate(url)
    store = Store(url, fx.ring)
    try:
        store.put_credential(
            CredentialWrite(
                owner_dn=fx.owner_dn,
                username=username(0),
                private_key_pem=fx.key_pem,
                certificate_chain=fx.chain_pem,
            ),
            now=datetime.now(UTC),
        )
        table = Credential.__table__
        with store.engine.begin() as conn:
            template = dict(conn.execute(select(table)).mappings().one())
        template.pop("id")
        for start in range(1, count, BATCH):
            rows = []
            for i in range(start, min(start + BATCH, count)):
                name = username(i)
                env = crypto.seal(
                    fx.key_pem,
                    crypto.credential_context(fx.owner_dn, name, template["name"]),
                    fx.ring,
                )
                rows.append(
                    {
                        **template,
                        "username": name,
                        "key_ciphertext": env.ciphertext,
                        "key_nonce": env.nonce,
                        "wrapped_data_key": env.wrapped_data_key,
                        "master_key_id": env.master_key_id,
                        "passphrase_protected": env.passphrase_protected,
                        "kdf_salt": env.kdf_salt,
                        "kdf_params": env.kdf_params,
                    }
                )
            with store.engine.begin() as conn:
                conn.execute(insert(Credential), rows)
        # sanity: a filler row decrypts to the same key through the store's own API
        # (decryption raises if the envelope is not bound to the row).
        probe = store.get_credential(username(count - 1))
        store.decrypt_private_key(probe)
        if probe.certificate_chain != template["certificate_chain"]:
            raise RuntimeError("bulk-inserted row differs from the put_credential row")
    finally:
        store.close()
    return time.perf_counter() - t0


def lookup_timing(url: str, fx: Fixture, count: int, lookups: int, seed: int) -> dict[str, float]:
    """In-process Store.get_credential of random usernames: p50/p99 in microseconds."""
    rng = random.Random(seed)  # noqa: S311 - benchmark sampling, not secrets
    store = Store(url, fx.ring)
    try:
        names = [username(rng.randrange(count)) for _ in range(lookups)]
        for name in names[:50]:
            store.get_credential(name)
        samples = []
        for name in names:
            t0 = time.perf_counter_ns()
            store.get_credential(name)
            samples.append(time.perf_counter_ns() - t0)
        rows = store.engine.connect()
        try:
            stored = rows.execute(select(Credential.id)).fetchall()
        finally:
            rows.close()
    finally:
        store.close()
    samples.sort()
    return {
        "lookups": lookups,
        "rows": len(stored),
        "p50_us": round(statistics.median(samples) / 1000, 1),
        "p99_us": round(bl.percentile(samples, 99) / 1000, 1),
    }


def bodies_for(fx: Fixture, count: int, how_many: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)  # noqa: S311
    return [
        json.dumps(
            {
                "csr": fx.csr_pems[i % len(fx.csr_pems)],
                "username": username(rng.randrange(count)),
                "job_id": f"store#{i}.0",
                "lifetime_hours": 1,
            }
        ).encode()
        for i in range(how_many)
    ]


def start_broker(fx: Fixture, base: Path, url: str, *, workers: int, threads: int) -> br.Server:
    """``broker serve`` on a free loopback port, on ``url``, with the shared master key."""
    base.mkdir(parents=True)
    server = br.Server(base, fx.pki, workers=workers, threads=threads, delegation_key="rsa")
    server.argv += ["--database-url", url, "--master-key-file", str(fx.master_key_file)]
    probe = BrokerClient(
        f"127.0.0.1:{server.port}",
        ClientIdentity(cert=str(fx.pki / "pilot.pem"), key=str(fx.pki / "pilot.key")),
        ca_dir=str(fx.pki / "certificates"),
    )
    server.start(probe)
    return server


# ---------------------------------------------------------------- main


@contextmanager
def scratch_dir(prefix: str, *, keep: bool) -> Iterator[Path]:
    """A scratch directory for one run (0755: the brokers and PostgreSQL read it).

    SIGTERM (from ``scripts/bench all`` on a timeout) becomes SystemExit(143), so
    the caller's cleanup runs; afterwards the directory goes, unless ``keep``.
    """
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    tmp.chmod(0o755)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        yield tmp
    finally:
        signal.signal(signal.SIGTERM, previous)
        if keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def level_options(fx: Fixture, args: argparse.Namespace) -> dict[str, Any]:
    """The br.run_level arguments every load level of the store and scale-out runs
    shares: the pilot's certificate, EC CSRs, the time cap, client processes, 30 s timeout."""
    return {
        "ca_dir": str(fx.pki / "certificates"),
        "cert": str(fx.pki / "pilot.pem"),
        "key": str(fx.pki / "pilot.key"),
        "csr_key": "ec",
        "max_seconds": args.max_seconds,
        "client_procs": args.client_procs,
        "timeout": 30.0,
    }


def postgresql_info(pg: PostgresCluster) -> dict[str, Any]:
    """What the report says about the PostgreSQL the benchmark started."""
    return {
        "version": pg.version(),
        "pid": pg.pid,
        "settings": "synchronous_commit=off, fsync on",
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench store",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sizes", default="100,10000,100000", help="credential counts [1e2,1e4,1e5]")
    p.add_argument("--backends", default="sqlite,postgresql", help="[sqlite,postgresql]")
    p.add_argument("--levels", default="1,16", help="client concurrency levels [1,16]")
    p.add_argument("--requests", type=int, default=300, help="retrievals per level [300]")
    p.add_argument("--max-seconds", type=float, default=30.0, help="time bound per level [30]")
    p.add_argument("--warmup", type=int, default=30, help="untimed retrievals per size [30]")
    p.add_argument("--lookups", type=int, default=2000, help="in-process look-ups [2000]")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--client-procs", type=int, default=2)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", default=str(REPO / "bench-out" / "store.json"))
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = p.parse_args(argv)
    args.sizes = [int(float(s)) for s in args.sizes.split(",")]
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.levels = [int(x) for x in args.levels.split(",")]
    if any(not 1 <= n <= 1_000_000 for n in args.sizes):
        p.error("sizes must be between 1 and 1e6")
    if set(args.backends) - {"sqlite", "postgresql"}:
        p.error("backends: sqlite, postgresql")
    if args.requests < 1 or args.requests > 100_000:
        p.error("--requests must be 1..100000")
    return args


def interleaved_single_client(
    servers: dict[int, br.Server],
    bodies: dict[int, list[bytes]],
    fx: Fixture,
    requests: int,
    max_seconds: float,
) -> dict[int, dict[str, Any]]:
    """One client, one retrieval at a time, taking the sizes in turn (rotating the order).

    Interleaving puts every size under the same background load, which on a
    shared machine drifts far more than the effect being measured.
    """
    ctx = br._client_context(
        str(fx.pki / "certificates"), str(fx.pki / "pilot.pem"), str(fx.pki / "pilot.key")
    )
    sizes = sorted(servers)
    lat: dict[int, list[float]] = {n: [] for n in sizes}
    errs: dict[int, list[str]] = {n: [] for n in sizes}
    cpu0 = {n: br.server_cpu(servers[n].pid)[0] for n in sizes}
    deadline = time.monotonic() + max_seconds
    for i in range(requests):
        if time.monotonic() > deadline:
            break
        order = sizes[i % len(sizes) :] + sizes[: i % len(sizes)]
        for n in order:
            body = bodies[n][i % len(bodies[n])]
            t0 = time.perf_counter()
            err = br._one_retrieval(ctx, servers[n].port, body, 30.0)
            if err is None:
                lat[n].append(time.perf_counter() - t0)
            else:
                errs[n].append(err)
    out = {}
    for n in sizes:
        cpu = br.server_cpu(servers[n].pid)[0] - cpu0[n]
        values = sorted(lat[n])
        done = len(values) + len(errs[n])
        out[n] = {
            "concurrency": 1,
            "requests": done,
            "errors": len(errs[n]),
            "error_samples": errs[n][:3],
            "interleaved": True,
            "p50_ms": round(bl.percentile(values, 50) * 1000, 2),
            "p90_ms": round(bl.percentile(values, 90) * 1000, 2),
            "p99_ms": round(bl.percentile(values, 99) * 1000, 2),
            "mean_ms": round(statistics.fmean(values) * 1000, 2) if values else None,
            "per_s": round(1 / statistics.fmean(values), 1) if values else 0.0,
            "server_cpu_ms_per_op": round(cpu / done * 1000, 2) if done else None,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = br.report_head("store", args, "runs")
    with scratch_dir("broker-bench-store-", keep=args.keep) as tmp:
        pg: PostgresCluster | None = None
        servers: dict[int, br.Server] = {}
        try:
            fx = make_fixture(tmp, csr_pool=16)
            common = level_options(fx, args)
            if "postgresql" in args.backends:
                pg = start_pg(tmp / "pg")
                report["postgresql"] = postgresql_info(pg)
            for backend in args.backends:
                runs: dict[int, dict[str, Any]] = {}
                bodies: dict[int, list[bytes]] = {}
                for size in args.sizes:
                    tag = f"{backend}-{size}"
                    if backend == "sqlite":
                        (tmp / tag).mkdir()
                        url = f"sqlite:///{tmp / tag / 'broker.sqlite'}"
                    else:
                        assert pg is not None
                        url = pg.create_database(f"store_{size}")
                    print(f"[{tag}] populating {size} credentials ...", file=sys.stderr)
                    fill_s = populate(url, fx, size)
                    lookup = lookup_timing(url, fx, size, args.lookups, args.seed)
                    print(
                        f"[{tag}] filled in {fill_s:.1f} s; in-process get_credential p50 "
                        f"{lookup['p50_us']} us",
                        file=sys.stderr,
                    )
                    servers[size] = start_broker(
                        fx, tmp / f"serve-{tag}", url, workers=args.workers, threads=args.threads
                    )
                    bodies[size] = bodies_for(fx, size, 256, args.seed + size)
                    runs[size] = {
                        "backend": backend,
                        "credentials": size,
                        "populate_s": round(fill_s, 1),
                        "lookup": lookup,
                        "levels": [],
                    }
                for size, server in servers.items():
                    if args.warmup:
                        br.run_level(
                            servers=[server],
                            bodies=bodies[size],
                            concurrency=4,
                            requests=args.warmup,
                            **common,
                        )
                for conc in args.levels:
                    if conc == 1:
                        print(
                            f"[{backend}] 1 client, sizes interleaved, {args.requests} each",
                            file=sys.stderr,
                        )
                        single = interleaved_single_client(
                            servers, bodies, fx, args.requests, args.max_seconds * len(servers)
                        )
                        for size, row in single.items():
                            runs[size]["levels"].append(row)
                        continue
                    for size, server in servers.items():
                        r = br.run_level(
                            servers=[server],
                            bodies=bodies[size],
                            concurrency=conc,
                            requests=args.requests,
                            **common,
                        )
                        runs[size]["levels"].append(asdict(r))
                for size in args.sizes:
                    for lv in runs[size]["levels"]:
                        print(
                            f"[{backend}-{size}] c={lv['concurrency']}: {lv['per_s']}/s p50 "
                            f"{lv['p50_ms']} ms p99 {lv['p99_ms']} ms errors {lv['errors']}",
                            file=sys.stderr,
                        )
                for server in servers.values():
                    server.stop()
                servers.clear()
                report["runs"] += [runs[n] for n in args.sizes]
                for size in args.sizes:
                    if backend == "sqlite":
                        shutil.rmtree(tmp / f"sqlite-{size}", ignore_errors=True)
                    else:
                        assert pg is not None
                        pg.drop_database(f"store_{size}")
        finally:
            for server in servers.values():
                server.stop()
            if pg is not None:
                pg.stop()

    report["ratios"] = ratios(report["runs"], args.sizes)
    report["loadavg_end"] = os.getloadavg()
    print_table(report)
    br.write_report(report, args.out)
    errors = sum(lv["errors"] for run in report["runs"] for lv in run["levels"])
    return 1 if errors else 0


def ratios(runs: list[dict[str, Any]], sizes: list[int]) -> list[dict[str, Any]]:
    """Latency at the largest size over latency at the smallest, per backend and level."""
    out = []
    small, large = min(sizes), max(sizes)
    for backend in sorted({r["backend"] for r in runs}):
        a = next((r for r in runs if r["backend"] == backend and r["credentials"] == small), None)
        b = next((r for r in runs if r["backend"] == backend and r["credentials"] == large), None)
        if a is None or b is None or a is b:
            continue
        for la, lb in zip(a["levels"], b["levels"], strict=True):
            out.append(
                {
                    "backend": backend,
                    "concurrency": la["concurrency"],
                    "small": small,
                    "large": large,
                    "p50_ratio": round(lb["p50_ms"] / la["p50_ms"], 2),
                    "p99_ratio": round(lb["p99_ms"] / la["p99_ms"], 2),
                    "lookup_p50_ratio": round(b["lookup"]["p50_us"] / a["lookup"]["p50_us"], 2),
                    "target": TARGET_RATIO,
                }
            )
    return out


def print_table(report: dict[str, Any]) -> None:
    head = (
        f"{'backend':<11} {'creds':>7} {'fill s':>7} {'lookup p50 us':>13} {'conc':>4} "
        f"{'ret/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'srv CPU ms/op':>13} {'err':>4}"
    )
    print()
    print(head)
    print("-" * len(head))
    for run in report["runs"]:
        for lv in run["levels"]:
            print(
                f"{run['backend']:<11} {run['credentials']:>7} {run['populate_s']:>7.1f} "
                f"{run['lookup']['p50_us']:>13.1f} {lv['concurrency']:>4} {lv['per_s']:>7.1f} "
                f"{lv['p50_ms']:>7.1f} {lv['p99_ms']:>7.1f} "
                f"{lv['server_cpu_ms_per_op']:>13.2f} {lv['errors']:>4}"
            )
    for r in report["ratios"]:
        verdict = "met" if r["p50_ratio"] <= r["target"] else "NOT met"
        print(
            f"{r['backend']}, {r['concurrency']} client(s): p50 at {r['large']} / at "
            f"{r['small']} = {r['p50_ratio']} (p99 {r['p99_ratio']}, in-process look-up "
            f"{r['lookup_p50_ratio']}); target <= {r['target']}: {verdict}"
        )


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
