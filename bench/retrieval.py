#!/usr/bin/env python3
"""Benchmark REST retrievals against a real ``broker serve`` (gunicorn, mutual TLS).

Run it through the entry script (it picks the venv's python)::

    scripts/bench retrieval                      # concurrency 1, 4, 16
    scripts/bench retrieval --full               # ... and 64
    scripts/bench retrieval --csr-keys ec --requests 500 --delegation-key ec

What it does, all on 127.0.0.1 and under a temporary directory that is removed
at the end:

1. ``openssl speed -seconds 1 rsa2048 ecdsap256`` (sign/s, verify/s) and a few
   in-process timings of the crypto the server does per retrieval, before the
   server starts, so that they do not compete with it;
2. writes a dev PKI (alice, pilot), starts ``broker serve`` (gunicorn gthread,
   default 2 workers x 8 threads) with a policy that lets pilots retrieve;
3. alice delegates once; the pilot then POSTs /v1/retrievals with
   pre-generated CSRs (EC P-256 and/or RSA-2048; key generation is not
   measured), one new TCP + full TLS handshake per retrieval (no keep-alive,
   no session resumption: the server issues no tickets);
4. per concurrency level: retrievals/s, p50/p90/p99 latency, errors, server
   CPU per retrieval (utime+stime of the gunicorn master and its workers from
   /proc/PID/stat), client CPU per retrieval and machine busy % (/proc/stat);
5. prints a table and writes JSON (default bench-out/retrieval.json).

The load generator runs in at most two processes (threads inside them), so
that it does not take more of the two cores than the TLS client work needs.
The server is stopped by its PID at the end, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import os
import platform
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from bench.load import (
    CLK_TCK,
    background_busy_pct,
    client_threads,
    load_process_signals,
    percentile,
    run_load,
    stop_process,
    thread_groups,
)
from broker.client import BrokerClient, ClientIdentity
from broker.devpki import DEV_POLICY, write_dev_pki
from broker.pki.loading import Credential, load_cert_and_key, load_private_key
from broker.pki.proxy import csr_to_pem, generate_key, make_csr, sign_request

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- /proc helpers


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as handle:
        text = handle.read()
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime is field 14, stime field 15
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return sorted(set(found))


def server_cpu(master: int) -> tuple[float, list[int]]:
    pids = [master, *children_of(master)]
    total = 0.0
    for pid in pids:
        try:
            total += proc_cpu_seconds(pid)
        except OSError:
            continue
    return total, pids


# ---------------------------------------------------------------- crypto reference


def openssl_speed() -> dict[str, Any]:
    """``openssl speed -seconds 1 rsa2048 ecdsap256``: sign/s and verify/s."""
    cmd = ["openssl", "speed", "-seconds", "1", "rsa2048", "ecdsap256"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return {"command": " ".join(cmd), "error": str(exc)}
    result: dict[str, Any] = {"command": " ".join(cmd)}
    version = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout
    result["version"] = version.strip()
    for line in out.splitlines():
        m = re.match(r"\s*rsa\s+2048 bits\s+\S+\s+\S+\s+([\d.]+)\s+([\d.]+)", line)
        if m:
            result["rsa2048_sign_per_s"] = float(m.group(1))
            result["rsa2048_verify_per_s"] = float(m.group(2))
        m = re.match(r"\s*256 bits ecdsa \(nistp256\)\s+\S+\s+\S+\s+([\d.]+)\s+([\d.]+)", line)
        if m:
            result["ecdsap256_sign_per_s"] = float(m.group(1))
            result["ecdsap256_verify_per_s"] = float(m.group(2))
    return result


def python_crypto_costs(pilot: Credential) -> dict[str, float]:
    """Milliseconds per call of what the server does per retrieval, in this process."""
    now = datetime.now(UTC)
    costs: dict[str, float] = {}

    def per_call(fn: Any, number: int) -> float:
        return min(timeit.repeat(fn, number=number, repeat=3)) / number * 1000

    for kind in ("rsa", "ec"):
        key = generate_key(kind)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        costs[f"load_private_key_{kind}_ms"] = per_call(lambda p=pem: load_private_key(p), 20)
        if kind == "rsa":
            costs["load_rsa_key_skip_validation_ms"] = per_call(
                lambda p=pem: serialization.load_pem_private_key(
                    p, None, unsafe_skip_rsa_key_validation=True
                ),
                20,
            )
        # a delegated credential of that key type, then one proxy signed with it
        cred_csr = make_csr(key)
        chain = sign_request(pilot, cred_csr, now=now, lifetime=timedelta(hours=24))
        issuer = Credential(chain=tuple(chain), key=key)
        req = make_csr(generate_key("ec"))
        costs[f"sign_proxy_with_{kind}_key_ms"] = per_call(
            lambda i=issuer, r=req: sign_request(i, r, now=now, lifetime=timedelta(hours=1)), 20
        )
    return costs


# ---------------------------------------------------------------- load generator


@dataclass
class LevelResult:
    concurrency: int
    csr_key: str
    requests: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    per_s: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    server_cpu_ms_per_op: float = 0.0
    client_cpu_ms_per_op: float = 0.0
    machine_busy_pct: float = 0.0
    stopped_by_time: bool = False
    server_pids: list[int] = field(default_factory=list)


def _client_context(ca_dir: str, cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(capath=ca_dir)
    ctx.load_cert_chain(cert, key)
    return ctx


def post_once(
    ctx: ssl.SSLContext,
    port: int,
    path: str,
    body: bytes,
    timeout: float,
    token: str | None = None,
) -> tuple[int, bytes] | str:
    """One JSON POST to the broker on 127.0.0.1 over a fresh connection (a bearer
    token if given): (status, body) of the answer, or the text of the error."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=timeout)
    headers = {"Content-Type": "application/json", "Connection": "close"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


def _one_retrieval(ctx: ssl.SSLContext, port: int, body: bytes, timeout: float) -> str | None:
    """One retrieval on a fresh connection; None when it worked, else an error text."""
    answer = post_once(ctx, port, "/v1/retrievals", body, timeout)
    if isinstance(answer, str):
        return answer
    status, raw = answer
    if status != 200:
        return f"HTTP {status}: {raw[:200]!r}"
    if b"BEGIN CERTIFICATE" not in raw:
        return "no chain in the response"
    return None


def _client_process(
    port: int,
    ca_dir: str,
    cert: str,
    key: str,
    bodies: list[bytes],
    counts: list[int],
    timeout: float,
    start_at: float,
    deadline: float,
    queue: Any,
) -> None:
    """Run len(counts) threads; thread i does counts[i] retrievals (or stops at deadline)."""
    load_process_signals()
    ctx = _client_context(ca_dir, cert, key)

    def worker(index: int, count: int, stopped: threading.Event) -> tuple[list[float], list[str]]:
        mine: list[float] = []
        bad: list[str] = []
        for i in range(count):
            if time.monotonic() >= deadline:
                stopped.set()
                break
            body = bodies[(index * 7919 + i) % len(bodies)]
            t0 = time.perf_counter()
            err = _one_retrieval(ctx, port, body, timeout)
            elapsed = time.perf_counter() - t0
            if err is None:
                mine.append(elapsed)
            else:
                bad.append(err)
        return mine, bad

    client_threads(worker, list(enumerate(counts)), start_at, queue)


def run_level(
    *,
    servers: Sequence[Server],
    ca_dir: str,
    cert: str,
    key: str,
    bodies: list[bytes],
    concurrency: int,
    csr_key: str,
    requests: int,
    max_seconds: float,
    client_procs: int,
    timeout: float,
) -> LevelResult:
    """One load level; client process p sends to servers[p % len(servers)] (scale-out)."""

    def cpu_and_pids() -> tuple[float, list[int]]:
        measured = [server_cpu(s.pid) for s in servers]
        return sum(c for c, _ in measured), [pid for _, pids in measured for pid in pids]

    # thread indices are per process (they pick the bodies)
    groups = [[count for _, count in g] for g in thread_groups(requests, concurrency, client_procs)]
    run = run_load(
        [
            functools.partial(
                _client_process,
                servers[i % len(servers)].port,
                ca_dir,
                cert,
                key,
                bodies,
                g,
                timeout,
            )
            for i, g in enumerate(groups)
        ],
        seconds=max_seconds,
        collect_timeout=max_seconds + timeout + 60,
        probe=cpu_and_pids,
    )
    assert run.after is not None
    (cpu0, pids), (cpu1, pids1) = run.before, run.after
    latencies, errors, wall = run.latencies, run.errors, run.wall
    done = len(latencies) + len(errors)
    result = LevelResult(
        concurrency=concurrency,
        csr_key=csr_key,
        requests=done,
        errors=len(errors),
        error_samples=errors[:5],
        wall_s=round(wall, 3),
    )
    result.per_s = round(len(latencies) / wall, 1) if wall > 0 else 0.0
    result.p50_ms = round(percentile(latencies, 50) * 1000, 1)
    result.p90_ms = round(percentile(latencies, 90) * 1000, 1)
    result.p99_ms = round(percentile(latencies, 99) * 1000, 1)
    result.max_ms = round(latencies[-1] * 1000, 1) if latencies else float("nan")
    if done:
        result.server_cpu_ms_per_op = round((cpu1 - cpu0) / done * 1000, 2)
        result.client_cpu_ms_per_op = round(run.client_cpu / done * 1000, 2)
    if run.busy_pct is not None:
        result.machine_busy_pct = run.busy_pct
    result.stopped_by_time = run.stopped_by_time
    result.server_pids = pids1 if pids1 != pids else pids
    return result


# ---------------------------------------------------------------- server


class Server:
    def __init__(
        self, base: Path, pki_dir: Path, *, workers: int, threads: int, delegation_key: str
    ) -> None:
        self.base = base
        self.pki_dir = pki_dir
        self.port = _free_port()
        policy_dir = base / "policies"
        policy_dir.mkdir()
        (policy_dir / "10-bench.toml").write_text(DEV_POLICY)
        config = base / "broker.toml"
        config.write_text(f'[limits]\ndelegation_key = "{delegation_key}"\n')
        self.argv = [
            str(Path(sys.executable).parent / "broker"),
            "serve",
            "--config",
            str(config),
            "--state-dir",
            str(base / "state"),
            "--bind",
            f"127.0.0.1:{self.port}",
            "--host-cert",
            str(pki_dir / "host.pem"),
            "--host-key",
            str(pki_dir / "host.key"),
            "--ca-dir",
            str(pki_dir / "certificates"),
            "--vomsdir",
            str(pki_dir / "vomsdir"),
            "--policy-dir",
            str(policy_dir),
            "--workers",
            str(workers),
            "--threads",
            str(threads),
        ]
        self.log = base / "serve.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, client: BrokerClient) -> None:
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"broker serve exited early:\n{self.log.read_text()}")
            try:
                client.call("GET", "/healthz")
                return
            except Exception:  # not up yet
                time.sleep(0.2)
        raise RuntimeError(f"broker serve did not come up:\n{self.log.read_text()}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        stop_process(self.process)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- report


def machine_info() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"model name\s*:\s*(.*)", cpuinfo)
    mem = re.search(r"MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text())
    return {
        "cpu_model": model.group(1) if model else "?",
        "nproc": os.cpu_count(),
        "mem_gib": round(int(mem.group(1)) / 1024 / 1024, 1) if mem else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "os": _os_release(),
    }


def report_head(name: str, args: Any, results_key: str) -> dict[str, Any]:
    """The opening of a benchmark's JSON report: what ran, where, when, with which options."""
    return {
        "benchmark": name,
        "started": datetime.now(UTC).isoformat(),
        "machine": machine_info(),
        "argv": sys.argv,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "keep")},
        "loadavg_start": os.getloadavg(),
        results_key: [],
    }


def write_report(report: dict[str, Any], path: str) -> None:
    """The closing of a benchmark: its JSON report to ``path`` (folders made as needed)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")


def _os_release() -> str:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return "?"
    m = re.search(r'PRETTY_NAME="([^"]*)"', text)
    return m.group(1) if m else "?"


def print_table(levels: list[LevelResult]) -> None:
    head = (
        f"{'csr':>4} {'conc':>4} {'reqs':>5} {'err':>4} {'ret/s':>7} {'p50 ms':>7} "
        f"{'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} {'srv CPU ms/op':>13} "
        f"{'cli CPU ms/op':>13} {'busy %':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in levels:
        flag = " (time limit)" if r.stopped_by_time else ""
        print(
            f"{r.csr_key:>4} {r.concurrency:>4} {r.requests:>5} {r.errors:>4} {r.per_s:>7.1f} "
            f"{r.p50_ms:>7.1f} {r.p90_ms:>7.1f} {r.p99_ms:>7.1f} {r.max_ms:>7.1f} "
            f"{r.server_cpu_ms_per_op:>13.2f} {r.client_cpu_ms_per_op:>13.2f} "
            f"{r.machine_busy_pct:>6.1f}{flag}"
        )


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench retrieval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--full", action="store_true", help="also run concurrency 64")
    parser.add_argument("--levels", help="comma-separated concurrency levels [1,4,16]")
    parser.add_argument(
        "--requests", type=int, default=300, help="retrievals per level (count bound) [300]"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=30.0, help="stop a level after this many seconds [30]"
    )
    parser.add_argument(
        "--csr-keys",
        default="ec,rsa",
        help="CSR key types to run, comma-separated: ec, rsa [ec,rsa]",
    )
    parser.add_argument(
        "--csr-pool",
        type=int,
        default=16,
        help="pre-generated CSRs per key type, used round-robin [16]",
    )
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers [2]")
    parser.add_argument("--threads", type=int, default=8, help="threads per worker [8]")
    parser.add_argument(
        "--delegation-key",
        choices=("rsa", "ec"),
        default="rsa",
        help="key type the server makes for the delegation [rsa]",
    )
    parser.add_argument(
        "--client-procs", type=int, default=2, help="load-generator processes (threads inside) [2]"
    )
    parser.add_argument("--warmup", type=int, default=20, help="untimed retrievals first [20]")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout [30]")
    parser.add_argument("--no-openssl-speed", action="store_true")
    parser.add_argument("--out", default=str(REPO / "bench-out" / "retrieval.json"))
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temp dir (PKI, state, serve.log) and print its path",
    )
    args = parser.parse_args(argv)
    if args.requests < 1 or args.max_seconds <= 0:
        parser.error("--requests and --max-seconds must be positive")
    if args.requests > 100_000:
        parser.error("--requests is capped at 100000 per level")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    levels = (
        [int(x) for x in args.levels.split(",")]
        if args.levels
        else [1, 4, 16, *([64] if args.full else [])]
    )
    csr_keys = [k.strip() for k in args.csr_keys.split(",") if k.strip()]
    for k in csr_keys:
        if k not in ("ec", "rsa"):
            raise SystemExit(f"unknown CSR key type {k!r}; use ec or rsa")
    report = report_head("retrieval", args, "levels")
    if not args.no_openssl_speed:
        print("openssl speed -seconds 1 rsa2048 ecdsap256 ...", file=sys.stderr)
        report["openssl_speed"] = openssl_speed()

    report["background_busy_pct"] = background_busy_pct(1.0) or 0.0  # 0.0: no tick passed
    tmp = Path(tempfile.mkdtemp(prefix="broker-bench-"))
    server: Server | None = None
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        pki_dir = tmp / "pki"
        write_dev_pki(pki_dir, now=datetime.now(UTC), users=("alice",), pilots=("pilot",))
        pilot_cert, pilot_key = str(pki_dir / "pilot.pem"), str(pki_dir / "pilot.key")
        ca_dir = str(pki_dir / "certificates")
        alice_cred = load_cert_and_key(
            (pki_dir / "alice.pem").read_bytes(), (pki_dir / "alice.key").read_bytes()
        )
        report["python_crypto_ms"] = python_crypto_costs(alice_cred)
        server = Server(
            tmp,
            pki_dir,
            workers=args.workers,
            threads=args.threads,
            delegation_key=args.delegation_key,
        )
        alice = BrokerClient(
            f"127.0.0.1:{server.port}",
            ClientIdentity(cert=str(pki_dir / "alice.pem"), key=str(pki_dir / "alice.key")),
            ca_dir=ca_dir,
        )
        print(
            f"starting broker serve on 127.0.0.1:{server.port} "
            f"({args.workers} workers x {args.threads} threads)",
            file=sys.stderr,
        )
        server.start(alice)
        report["server"] = {
            "pid": server.pid,
            "argv": server.argv,
            "host_key": _key_desc(pki_dir / "host.key"),
            "pilot_key": _key_desc(pki_dir / "pilot.key"),
        }
        alice.delegate(alice_cred, username="alice", now=datetime.now(UTC), max_proxy_hours=12)

        bodies_by_key: dict[str, list[bytes]] = {}
        for kind in csr_keys:
            print(f"pre-generating {args.csr_pool} {kind} CSRs ...", file=sys.stderr)
            bodies_by_key[kind] = [
                json.dumps(
                    {
                        "csr": csr_to_pem(make_csr(generate_key(kind))).decode(),
                        "username": "alice",
                        "job_id": f"bench#{i}.0",
                        "lifetime_hours": 1,
                    }
                ).encode()
                for i in range(args.csr_pool)
            ]

        if args.warmup:
            run_level(
                servers=[server],
                ca_dir=ca_dir,
                cert=pilot_cert,
                key=pilot_key,
                bodies=bodies_by_key[csr_keys[0]],
                concurrency=min(4, args.warmup),
                csr_key=csr_keys[0],
                requests=args.warmup,
                max_seconds=args.max_seconds,
                client_procs=args.client_procs,
                timeout=args.timeout,
            )
        results: list[LevelResult] = []
        for kind in csr_keys:
            for conc in levels:
                print(
                    f"level: {kind} CSRs, {conc} concurrent clients, "
                    f"{args.requests} requests max, {args.max_seconds:g} s max",
                    file=sys.stderr,
                )
                results.append(
                    run_level(
                        servers=[server],
                        ca_dir=ca_dir,
                        cert=pilot_cert,
                        key=pilot_key,
                        bodies=bodies_by_key[kind],
                        concurrency=conc,
                        csr_key=kind,
                        requests=args.requests,
                        max_seconds=args.max_seconds,
                        client_procs=args.client_procs,
                        timeout=args.timeout,
                    )
                )
        report["levels"] = [asdict(r) for r in results]
    finally:
        signal.signal(signal.SIGTERM, previous)
        if server is not None:
            server.stop()
            report["server_log_tail"] = _tail(server.log, 20)
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            subprocess.run(["rm", "-rf", "--", str(tmp)], check=False)

    print()
    speed = report.get("openssl_speed", {})
    if "rsa2048_sign_per_s" in speed:
        rsa_ms = 1000 / speed["rsa2048_sign_per_s"]
        ec_ms = 1000 / speed.get("ecdsap256_sign_per_s", float("inf"))
        print(
            f"{speed.get('version', 'openssl')}: rsa2048 {speed['rsa2048_sign_per_s']:.0f} "
            f"sign/s ({rsa_ms:.2f} ms), ecdsap256 {speed.get('ecdsap256_sign_per_s', 0):.0f} "
            f"sign/s ({ec_ms:.3f} ms)"
        )
    crypto = report.get("python_crypto_ms", {})
    if crypto:
        print(
            "in-process (cryptography), ms per call: "
            + ", ".join(f"{k.removesuffix('_ms')} {v:.2f}" for k, v in crypto.items())
        )
    m = report["machine"]
    print(
        f"machine busy before the run (other processes, 1 s sample): "
        f"{report['background_busy_pct']}% of all cores"
    )
    print(
        f"machine: {m['cpu_model']}, {m['nproc']} cores, {m['mem_gib']} GiB; server "
        f"{args.workers} workers x {args.threads} threads, delegation key "
        f"{args.delegation_key}"
    )
    print_table(results)
    write_report(report, args.out)
    total_errors = sum(r.errors for r in results)
    if total_errors:
        print(
            f"ERROR: {total_errors} failed retrievals, e.g. "
            f"{[e for r in results for e in r.error_samples][:3]}",
            file=sys.stderr,
        )
        return 1
    return 0


def _key_desc(path: Path) -> str:
    key = load_private_key(path.read_bytes())
    size = getattr(key, "key_size", None)
    return f"{type(key).__name__.removeprefix('_')} {size}" if size else type(key).__name__


def _tail(path: Path, lines: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
