#!/usr/bin/env python3
"""Benchmark: retrievals/s of our MyProxy endpoint vs the real myproxy-server.

Both servers get the SAME load generator: a small MyProxy v2 client (this file)
that opens a fresh TLS connection per retrieval (full handshake, client
certificate), sends a GET, a pre-generated DER CSR, and reads the chain and the
final OK. Keys and CSRs are made before the clock starts, so the numbers are
about the servers, not about client key generation (which dominates
myproxy-logon itself).

Modes: ``pilot`` (trusted retrieval by certificate, myproxy-logon -n) and
``passphrase`` (anonymous client + passphrase). Concurrency 1 / 4 / 16 clients,
each cell bounded by ``--seconds`` and ``--max-ops``. Like bench/retrieval.py, the
clients are threads in at most ``--client-procs`` processes (default 2; ``--client-procs
16`` at 16 clients gives the older one-process-per-client shape), so that the load
generator takes no more of the machine than its TLS work needs. Each cell reports
server CPU ms/op (the server's process tree, /proc), client CPU ms/op (getrusage of
the load-generator processes, all threads, over the cell) and machine busy % over
the cell (/proc/stat, all CPUs: anything else running on the machine counts too).

Usage (everything on loopback; the reference server is started and stopped
by PID here unless ``--peer HOST:PORT`` names one that already runs)::

    scripts/bench myproxy --seconds 8 --json bench-myproxy.json

The reference side needs the Debian packages myproxy-server and
globus-proxy-utils; ``/work/shared/tools/myproxy_peer.sh pki`` style PKI is made
here with our dev PKI, so nothing outside a temp dir is touched.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.load import (
    CLK_TCK,
    background_busy_pct,
    client_threads,
    load_process_signals,
    run_load,
    stop_process,
    thread_groups,
)
from broker.myproxy import codec

REPO = Path(__file__).resolve().parents[1]

PASS = "benchpass1"  # noqa: S105 - a throwaway test passphrase


@dataclass(frozen=True)
class Target:
    label: str
    host: str
    port: int
    ca_dir: str
    cert: str | None
    key: str | None
    username: str
    credname: str | None
    passphrase: str


def pilot_target(label: str, port: int, manifest: dict[str, Any]) -> Target:
    """The pilot's retrieval (certificate login, alice's "pilotjob" credential) on 127.0.0.1."""
    pilot = manifest["users"]["pilot"]
    return Target(
        label,
        "127.0.0.1",
        port,
        manifest["ca_dir"],
        pilot["cert"],
        pilot["key"],
        "alice",
        "pilotjob",
        "",
    )


# --------------------------------------------------------------------------- load generator
#
# At most --client-procs processes (threads inside them, like bench/retrieval.py;
# the process/thread/queue frame is bench/load.py), so that the load generator
# takes no more of the machine than the TLS client work needs. The ssl module releases
# the GIL around handshakes, reads and writes.


def _recv_until(sock: ssl.SSLSocket, done: Callable[[bytes], bool]) -> bytes:
    data = b""
    while not done(data):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection early")
        data += chunk
    return data


def _has_nul(data: bytes) -> bool:
    return b"\0" in data


def request_bytes(target: Target) -> bytes:
    """The GET request of one retrieval (the same bytes every time: built once)."""
    extra = [("CRED_NAME", target.credname)] if target.credname else []
    return codec.format_request(codec.Command.GET, target.username, target.passphrase, 3600, extra)


def one_retrieval(target: Target, ctx: ssl.SSLContext, request: bytes, csr_der: bytes) -> bytes:
    """One retrieval on a fresh connection; returns the chain blob (``<count><DER>...``)."""
    raw = socket.create_connection((target.host, target.port), timeout=30)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
        if sock.version() == "TLSv1.3":
            sock.recv(1)  # the GSI post-handshake NUL
        sock.sendall(b"0")
        sock.sendall(request)
        first = codec.parse_response(_recv_until(sock, _has_nul))
        if first.code is not codec.ResponseCode.OK:
            raise RuntimeError(f"refused: {first.error}")
        sock.sendall(csr_der)
        blob = _recv_until(sock, codec.chain_complete)
        # Cheap sanity check (DER framing, count, no trailing bytes); the X.509 content
        # is decoded in full once per cell, on the warm-up response (check_chain).
        if len(codec.decode_chain(blob)) < 2:
            raise RuntimeError("the chain holds no proxy on top of its issuer")
        # The final OK (the C client ignores it; waiting for it keeps timing honest).
        last = codec.parse_response(_recv_until(sock, _has_nul))
        if last.code is not codec.ResponseCode.OK:
            raise RuntimeError(f"no final OK: {last.error}")
    return blob


def check_chain(blob: bytes, csr_der: bytes) -> None:
    """Full decode of one response: a proxy for the CSR's key, issued by the next cert."""
    from cryptography import x509

    certs = [x509.load_der_x509_certificate(d) for d in codec.decode_chain(blob)]
    csr = x509.load_der_x509_csr(csr_der)
    if certs[0].public_key() != csr.public_key():
        raise RuntimeError("the returned proxy does not carry the CSR's public key")
    for child, parent in itertools.pairwise(certs):
        if child.issuer != parent.subject:
            raise RuntimeError(
                f"chain broken: {child.issuer.rfc4514_string()} "
                f"is not {parent.subject.rfc4514_string()}"
            )
        child.verify_directly_issued_by(parent)


def _client_context(target: Target) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(capath=target.ca_dir)
    if target.cert:
        ctx.load_cert_chain(target.cert, target.key)
    return ctx


def _client_process(
    target: Target,
    csrs: list[bytes],
    threads_: list[tuple[int, int]],
    start_at: float,
    deadline: float,
    out: Any,
) -> None:
    """One thread per (index, count): count retrievals each, or fewer at the deadline."""
    load_process_signals()
    ctx = _client_context(target)
    request = request_bytes(target)

    def worker(index: int, count: int, stopped: threading.Event) -> tuple[list[float], list[str]]:
        mine: list[float] = []
        bad: list[str] = []
        i = index * 7919  # threads start at different CSRs
        while len(mine) < count:
            if time.monotonic() >= deadline:
                stopped.set()
                break
            started = time.perf_counter()
            try:
                one_retrieval(target, ctx, request, csrs[i % len(csrs)])
            except Exception as exc:
                bad.append(f"{type(exc).__name__}: {exc}")
                if len(bad) > 50:
                    break
                continue
            finally:
                i += 1
            mine.append(time.perf_counter() - started)
        return mine, bad

    client_threads(worker, threads_, start_at, out)


def make_csrs(count: int) -> list[bytes]:
    from cryptography.hazmat.primitives import serialization

    from broker.pki.proxy import generate_key, make_csr

    # RSA 2048 like myproxy-logon; made once, before any clock starts.
    keys = [generate_key("rsa", 2048) for _ in range(count)]
    return [make_csr(k).public_bytes(serialization.Encoding.DER) for k in keys]


# server CPU per retrieval (added for bench/suite.py): utime+stime
# of the server process, plus cutime+cstime (its reaped children: myproxy-server forks
# one child per connection), plus any live descendants. Sampled at quiet points only.
def _tree_cpu_seconds(pid: int) -> float:
    total = 0.0
    todo, first = [pid], True
    while todo:
        p = todo.pop()
        try:
            text = Path(f"/proc/{p}/stat").read_text()
            f = text[text.rindex(")") + 2 :].split()
            total += (int(f[11]) + int(f[12]) + (int(f[13]) + int(f[14]) if first else 0)) / CLK_TCK
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            pass
        first = False
    return total


def run_cell(
    target: Target,
    clients: int,
    seconds: float,
    max_ops: int,
    csrs: list[bytes],
    server_pid: int | None = None,
    client_procs: int = 2,
) -> dict[str, Any]:
    # warm-up + full check of one response, outside the measured window
    check_chain(
        one_retrieval(target, _client_context(target), request_bytes(target), csrs[0]), csrs[0]
    )
    time.sleep(0.2)  # let the warm-up's child be reaped
    groups = thread_groups(max_ops, clients, client_procs, at_least=1)
    procs = len(groups)

    def server_cpu() -> float | None:
        return _tree_cpu_seconds(server_pid) if server_pid else None

    # the server's CPU is taken again below, after its last children are reaped
    run = run_load(
        [functools.partial(_client_process, target, csrs, g) for g in groups],
        seconds=seconds,
        collect_timeout=seconds + 120,
        probe=server_cpu,
        probe_after=False,
    )
    parts, cpu0 = run.parts, run.before
    elapsed = max(part["ended"] for part in parts) - run.start_at
    cpu_s = None
    if cpu0 is not None and server_pid:
        time.sleep(0.3)  # let myproxy-server reap its last children
        cpu_s = _tree_cpu_seconds(server_pid) - cpu0
    latencies = run.latencies
    error_list = run.errors
    for e in error_list[:3]:
        print(f"  [{target.label}] error: {e}", file=sys.stderr)
    errors = len(error_list)
    n = len(latencies)
    done = n + errors
    client_cpu = run.client_cpu

    def pct(q: float) -> float:
        return latencies[min(n - 1, int(q * n))] * 1000 if n else float("nan")

    return {
        "server": target.label,
        "clients": clients,
        "ops": n,
        "errors": errors,
        "seconds": round(elapsed, 2),
        "per_s": round(n / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": round(pct(0.50), 1),
        "p99_ms": round(pct(0.99), 1),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 1) if n else float("nan"),
        # server CPU per retrieval (the waits above are not in `seconds`)
        "server_cpu_ms_per_op": (
            round(cpu_s / done * 1000, 2) if cpu_s is not None and done else None
        ),
        # the load generator's own CPU (getrusage of its processes, all threads,
        # from the common start to their last thread's end) per retrieval
        "client_cpu_ms_per_op": round(client_cpu / done * 1000, 2) if done else None,
        # all CPUs of the machine over the cell (also anything else that runs)
        "machine_busy_pct": run.busy_pct,
        "client_procs": procs,
        "stopped_by_time": run.stopped_by_time,
        "error_samples": error_list[:3],
    }


# --------------------------------------------------------------------------- servers


def wait_port(
    host: str, port: int, proc: subprocess.Popen[bytes] | None, timeout: float = 60
) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {host}:{port}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup_pki(work: Path) -> dict[str, Any]:
    from broker.devpki import write_dev_pki

    _, manifest = write_dev_pki(
        work / "pki", now=datetime.now(UTC), users=("alice",), pilots=("pilot",)
    )
    return manifest


def start_ours(
    work: Path, manifest: dict[str, Any], extra: list[str]
) -> tuple[subprocess.Popen[bytes], int]:
    """Our endpoint as `broker serve` runs it (python -m broker.myproxy.server)."""
    from broker.config import ServerConfig
    from broker.delegation import DelegationOptions
    from broker.devpki import PASSPHRASE_RULE, policy_rule
    from broker.pki.loading import load_cert_and_key
    from broker.pki.proxy import new_proxy
    from broker.runtime import build_runtime, prepare_state

    pilot_dn = manifest["users"]["pilot"]["dn"]
    policies = work / "policies"
    policies.mkdir()
    (policies / "10-bench.toml").write_text(
        policy_rule("owners", ["delegate", "info", "destroy"], ["self"])
        + PASSPHRASE_RULE
        + policy_rule("pilot", "retrieve", [pilot_dn], auth=["certificate"])
    )
    port = free_port()
    config = ServerConfig(
        state_dir=str(work / "state"),
        policy_dir=str(policies),
        host_cert=manifest["host"]["cert"],
        host_key=manifest["host"]["key"],
        ca_dir=manifest["ca_dir"],
        vomsdir=manifest["vomsdir"],
        myproxy_bind=f"127.0.0.1:{port}",
    ).resolved()
    prepare_state(config)
    runtime = build_runtime(config)
    service = runtime.service
    alice = load_cert_and_key(
        Path(manifest["users"]["alice"]["cert"]).read_bytes(),
        Path(manifest["users"]["alice"]["key"]).read_bytes(),
    )
    me = service.authenticate_chain(list(alice.chain), endpoint="myproxy")
    proxy = new_proxy(alice, now=service.now(), lifetime=timedelta(hours=24))
    service.store_credential(
        me,
        DelegationOptions(username="alice", name="pilotjob", trusted_retrievers=(pilot_dn,)),
        proxy,
    )
    proxy2 = new_proxy(alice, now=service.now(), lifetime=timedelta(hours=24))
    service.store_credential(
        me,
        DelegationOptions(username="alice", passphrase=PASS, trusted_retrievers=(r"re:[^\s\S]",)),
        proxy2,
    )
    service.store.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.myproxy.server", "--config-stdin", *extra],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=open(work / "ours.log", "wb"),
    )
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(dataclasses.asdict(config)).encode())
    proc.stdin.close()
    wait_port("127.0.0.1", port, proc)
    return proc, port


def start_reference(
    work: Path, manifest: dict[str, Any]
) -> tuple[subprocess.Popen[bytes] | None, int, int | None]:
    """myproxy-server on loopback with the grid-test-rig config; creds via myproxy-init."""
    if shutil.which("myproxy-server") is None:
        raise RuntimeError("myproxy-server is not installed (apt-get install myproxy-server)")
    pilot_dn = manifest["users"]["pilot"]["dn"]
    store = work / "mpstore"
    store.mkdir(mode=0o700)
    cfg = work / "myproxy-server.config"
    cfg.write_text(f"""accepted_credentials       "*"
authorized_retrievers      "*"
default_retrievers         "*"
authorized_renewers        "*"
default_renewers           "none"
trusted_retrievers         "{pilot_dn}"
default_trusted_retrievers "none"
cert_dir {manifest["ca_dir"]}
""")
    port = free_port()
    pidfile = work / "myproxy-server.pid"
    env = {
        **os.environ,
        "X509_CERT_DIR": manifest["ca_dir"],
        "X509_USER_CERT": manifest["host"]["cert"],
        "X509_USER_KEY": manifest["host"]["key"],
    }
    subprocess.run(
        [
            "myproxy-server",
            "-c",
            str(cfg),
            "-s",
            str(store),
            "-l",
            "127.0.0.1",
            "-p",
            str(port),
            "-P",
            str(pidfile),
        ],
        env=env,
        check=True,
        timeout=30,
    )
    wait_port("127.0.0.1", port, None)
    pid = int(pidfile.read_text().strip())
    client_env = {k: v for k, v in os.environ.items() if not k.startswith("X509_USER")}
    client_env.update(
        X509_CERT_DIR=manifest["ca_dir"],
        MYPROXY_SERVER="localhost",
        MYPROXY_SERVER_PORT=str(port),
        MYPROXY_SERVER_DN=manifest["host"]["dn"],
        X509_USER_CERT=manifest["users"]["alice"]["cert"],
        X509_USER_KEY=manifest["users"]["alice"]["key"],
    )
    for args, stdin in (
        (["-S", "-l", "alice"], PASS + "\n"),
        (["-n", "-l", "alice", "-k", "pilotjob", "-x", "-Z", pilot_dn], None),
    ):
        subprocess.run(
            ["myproxy-init", "-c", "24", "-t", "2", *args],
            env=client_env,
            input=stdin,
            text=True,
            check=True,
            capture_output=True,
            timeout=120,
        )
    return None, port, pid


# --------------------------------------------------------------------------- main


def _ms(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="per cell")
    parser.add_argument("--max-ops", type=int, default=2000, help="per cell")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--modes", default="pilot,passphrase")
    parser.add_argument("--json", default="bench-myproxy.json")
    parser.add_argument("--ours-args", default="", help="extra args for broker.myproxy.server")
    parser.add_argument(
        "--client-procs",
        type=int,
        default=2,
        help="load-generator processes, the clients are threads in them [2]",
    )
    args = parser.parse_args()
    if args.client_procs < 1 or args.max_ops < 1 or args.seconds <= 0:
        parser.error("--client-procs, --max-ops and --seconds must be positive")
    concurrency = [int(c) for c in args.clients.split(",")]
    modes = args.modes.split(",")

    background = background_busy_pct(1.0)
    work = Path(tempfile.mkdtemp(prefix="bench-myproxy-"))
    manifest = setup_pki(work)
    print(f"work dir {work}; making CSRs...", file=sys.stderr)
    csrs = make_csrs(32)
    (work / "ours").mkdir()
    ours, ours_port = start_ours(work / "ours", manifest, args.ours_args.split())
    ref_pid: int | None = None
    rows: list[dict[str, Any]] = []
    try:
        _, ref_port, ref_pid = start_reference(work, manifest)
        for mode in modes:
            for label, port, spid in (
                ("broker", ours_port, ours.pid),  # pids
                ("myproxy-server", ref_port, ref_pid),
            ):
                if mode == "pilot":
                    target = pilot_target(label, port, manifest)
                else:
                    target = Target(
                        label,
                        "127.0.0.1",
                        port,
                        manifest["ca_dir"],
                        None,
                        None,
                        "alice",
                        None,
                        PASS,
                    )
                for clients in concurrency:
                    row = run_cell(
                        target, clients, args.seconds, args.max_ops, csrs, spid, args.client_procs
                    )
                    row["mode"] = mode
                    rows.append(row)
                    print(
                        f"  {mode:10} {label:15} c={clients:<3} {row['per_s']:7.1f}/s "
                        f"p50 {row['p50_ms']:7.1f} ms p99 {row['p99_ms']:7.1f} ms "
                        f"srv {_ms(row['server_cpu_ms_per_op'])} cli "
                        f"{_ms(row['client_cpu_ms_per_op'])} ms/op busy "
                        f"{row['machine_busy_pct']}% errors {row['errors']}",
                        file=sys.stderr,
                    )
    finally:
        stop_process(ours, timeout=10)
        if ref_pid is not None:
            os.kill(ref_pid, signal.SIGTERM)

    print()
    print(
        f"machine busy before the run (other processes, 1 s sample): {background}% of "
        f"{os.cpu_count()} cores; load generator: {args.client_procs} process(es) max"
    )
    print(
        f"{'mode':10} {'clients':>7} | {'broker /s':>9} {'p50':>7} {'p99':>7} | "
        f"{'myproxy /s':>10} {'p50':>7} {'p99':>7} | {'ratio':>6}"
    )
    summary = []
    for mode in modes:
        for clients in concurrency:
            a = next(
                r
                for r in rows
                if r["mode"] == mode and r["clients"] == clients and r["server"] == "broker"
            )
            b = next(
                r
                for r in rows
                if r["mode"] == mode and r["clients"] == clients and r["server"] == "myproxy-server"
            )
            ratio = a["per_s"] / b["per_s"] if b["per_s"] else float("inf")
            summary.append(
                {
                    "mode": mode,
                    "clients": clients,
                    "broker": a,
                    "myproxy_server": b,
                    "ratio": round(ratio, 2),
                }
            )
            print(
                f"{mode:10} {clients:>7} | {a['per_s']:>9.1f} {a['p50_ms']:>7.1f} "
                f"{a['p99_ms']:>7.1f} | {b['per_s']:>10.1f} {b['p50_ms']:>7.1f} "
                f"{b['p99_ms']:>7.1f} | {ratio:>5.1f}x"
            )
    print()
    print("CPU ms per retrieval (server / client = load generator) and machine busy %")
    print(
        f"{'mode':10} {'clients':>7} | {'broker srv':>10} {'cli':>6} {'busy%':>6} | "
        f"{'myproxy srv':>11} {'cli':>6} {'busy%':>6}"
    )
    for cell in summary:
        a, b = cell["broker"], cell["myproxy_server"]
        print(
            f"{cell['mode']:10} {cell['clients']:>7} | "
            f"{_ms(a['server_cpu_ms_per_op']):>10} {_ms(a['client_cpu_ms_per_op']):>6} "
            f"{_ms(a['machine_busy_pct'], 1):>6} | "
            f"{_ms(b['server_cpu_ms_per_op']):>11} {_ms(b['client_cpu_ms_per_op']):>6} "
            f"{_ms(b['machine_busy_pct'], 1):>6}"
        )
    result = {
        "generated": datetime.now(UTC).isoformat(),
        "cpus": os.cpu_count(),
        "seconds_per_cell": args.seconds,
        "max_ops_per_cell": args.max_ops,
        "client_procs": args.client_procs,
        "background_busy_pct": background,
        "cells": summary,
    }
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"\nJSON written to {args.json}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
