#!/usr/bin/env python3
"""Benchmark: retrievals/s of our MyProxy endpoint vs the real myproxy-server.

Both servers get the SAME load generator: a small MyProxy v2 client (this file)
that opens a fresh TLS connection per retrieval (full handshake, client
certificate), sends a GET, a pre-generated DER CSR, and reads the chain and the
final OK. Keys and CSRs are made before the clock starts, so the numbers are
about the servers, not about client key generation (which dominates
myproxy-logon itself).

Modes: ``pilot`` (trusted retrieval by certificate, myproxy-logon -n) and
``passphrase`` (anonymous client + passphrase). Concurrency 1 / 4 / 16 client
processes, each cell bounded by ``--seconds`` and ``--max-ops``.

Usage (everything on loopback; the reference server is started and stopped
by PID here unless ``--peer HOST:PORT`` names one that already runs)::

    .venv/bin/python scripts/bench_myproxy.py --seconds 8 --json bench-myproxy.json

The reference side needs the Debian packages myproxy-server and
globus-proxy-utils; ``/work/shared/tools/myproxy_peer.sh pki`` style PKI is made
here with our dev PKI, so nothing outside a temp dir is touched.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

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


# --------------------------------------------------------------------------- load generator


def _recv_until(sock: ssl.SSLSocket, done: Any) -> bytes:
    data = b""
    while not done(data):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection early")
        data += chunk
    return data


def one_retrieval(target: Target, ctx: ssl.SSLContext, csr_der: bytes) -> None:
    from broker.myproxy import codec

    raw = socket.create_connection((target.host, target.port), timeout=30)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
        if sock.version() == "TLSv1.3":
            sock.recv(1)  # the GSI post-handshake NUL
        sock.sendall(b"0")
        extra = [("CRED_NAME", target.credname)] if target.credname else []
        sock.sendall(codec.format_request(codec.Command.GET, target.username,
                                          target.passphrase, 3600, extra))
        first = codec.parse_response(_recv_until(sock, lambda d: b"\0" in d))
        if first.code is not codec.ResponseCode.OK:
            raise RuntimeError(f"refused: {first.error}")
        sock.sendall(csr_der)
        blob = _recv_until(sock, codec.chain_complete)
        codec.decode_chain(blob)
        # The final OK (the C client ignores it; waiting for it keeps timing honest).
        _recv_until(sock, lambda d: b"\0" in d)


def _client_context(target: Target) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(capath=target.ca_dir)
    if target.cert:
        ctx.load_cert_chain(target.cert, target.key)
    return ctx


def _worker(target: Target, csrs: list[bytes], deadline: float, max_ops: int,
            out: Any) -> None:
    ctx = _client_context(target)
    latencies: list[float] = []
    errors = 0
    i = 0
    while time.monotonic() < deadline and len(latencies) < max_ops:
        started = time.perf_counter()
        try:
            one_retrieval(target, ctx, csrs[i % len(csrs)])
        except Exception as exc:
            errors += 1
            if errors <= 3:
                print(f"  [{target.label}] error: {exc}", file=sys.stderr)
            if errors > 50:
                break
            continue
        finally:
            i += 1
        latencies.append(time.perf_counter() - started)
    out.put((latencies, errors))


def make_csrs(count: int) -> list[bytes]:
    from cryptography.hazmat.primitives import serialization

    from broker.pki.proxy import generate_key, make_csr

    # RSA 2048 like myproxy-logon; made once, before any clock starts.
    keys = [generate_key("rsa", 2048) for _ in range(count)]
    return [make_csr(k).public_bytes(serialization.Encoding.DER) for k in keys]


# server CPU per retrieval (added for scripts/bench_suite.py): utime+stime
# of the server process, plus cutime+cstime (its reaped children: myproxy-server forks
# one child per connection), plus any live descendants. Sampled at quiet points only.
def _tree_cpu_seconds(pid: int) -> float:
    tck = os.sysconf("SC_CLK_TCK")
    total = 0.0
    todo, first = [pid], True
    while todo:
        p = todo.pop()
        try:
            text = Path(f"/proc/{p}/stat").read_text()
            f = text[text.rindex(")") + 2:].split()
            total += (int(f[11]) + int(f[12]) + (int(f[13]) + int(f[14]) if first else 0)) / tck
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            pass
        first = False
    return total


def run_cell(target: Target, clients: int, seconds: float, max_ops: int,
             csrs: list[bytes], server_pid: int | None = None) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    queue: Any = ctx.Queue()
    one_retrieval(target, _client_context(target), csrs[0])  # warm-up + sanity check
    time.sleep(0.2)  # let the warm-up's child be reaped
    cpu0 = _tree_cpu_seconds(server_pid) if server_pid else None
    start = time.monotonic()
    deadline = start + seconds
    per_client = max(1, max_ops // clients)
    procs = [ctx.Process(target=_worker, args=(target, csrs, deadline, per_client, queue))
             for _ in range(clients)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    elapsed = time.monotonic() - start
    cpu_s = None
    if cpu0 is not None and server_pid:
        time.sleep(0.3)
        cpu_s = _tree_cpu_seconds(server_pid) - cpu0
    latencies = sorted(lat for lats, _ in results for lat in lats)
    errors = sum(e for _, e in results)
    n = len(latencies)

    def pct(q: float) -> float:
        return latencies[min(n - 1, int(q * n))] * 1000 if n else float("nan")

    return {
        "server": target.label, "clients": clients, "ops": n, "errors": errors,
        "seconds": round(elapsed, 2), "per_s": round(n / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(pct(0.50), 1), "p99_ms": round(pct(0.99), 1),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 1) if n else float("nan"),
        # server CPU per retrieval (the waits above are not in `seconds`)
        "server_cpu_ms_per_op": (round(cpu_s / (n + errors) * 1000, 2)
                                 if cpu_s is not None and n + errors else None),
    }


# --------------------------------------------------------------------------- servers


def wait_port(host: str, port: int, proc: subprocess.Popen[bytes] | None, timeout: float = 60
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

    _, manifest = write_dev_pki(work / "pki", now=datetime.now(UTC), users=("alice",),
                                pilots=("pilot",))
    return manifest


def start_ours(work: Path, manifest: dict[str, Any], extra: list[str]
               ) -> tuple[subprocess.Popen[bytes], int]:
    """Our endpoint as `broker serve` runs it (python -m broker.myproxy.server)."""
    from broker.config import ServerConfig
    from broker.devpki import PASSPHRASE_RULE, policy_rule
    from broker.pki.loading import load_cert_and_key
    from broker.pki.proxy import new_proxy
    from broker.runtime import build_runtime, prepare_state
    from broker.service import DelegationOptions

    pilot_dn = manifest["users"]["pilot"]["dn"]
    policies = work / "policies"
    policies.mkdir()
    (policies / "10-bench.toml").write_text(
        policy_rule("owners", ["delegate", "info", "destroy"], ["self"]) + PASSPHRASE_RULE
        + policy_rule("pilot", "retrieve", [pilot_dn], auth=["certificate"]))
    port = free_port()
    config = ServerConfig(
        state_dir=str(work / "state"), policy_dir=str(policies),
        host_cert=manifest["host"]["cert"], host_key=manifest["host"]["key"],
        ca_dir=manifest["ca_dir"], vomsdir=manifest["vomsdir"],
        myproxy_bind=f"127.0.0.1:{port}",
    ).resolved()
    prepare_state(config)
    runtime = build_runtime(config)
    service = runtime.service
    alice = load_cert_and_key(Path(manifest["users"]["alice"]["cert"]).read_bytes(),
                              Path(manifest["users"]["alice"]["key"]).read_bytes())
    me = service.authenticate_chain(list(alice.chain), endpoint="myproxy")
    proxy = new_proxy(alice, now=service.now(), lifetime=timedelta(hours=24))
    service.store_credential(me, DelegationOptions(
        username="alice", name="pilotjob", trusted_retrievers=(pilot_dn,)), proxy)
    proxy2 = new_proxy(alice, now=service.now(), lifetime=timedelta(hours=24))
    service.store_credential(me, DelegationOptions(
        username="alice", passphrase=PASS, trusted_retrievers=(r"re:[^\s\S]",)), proxy2)
    service.store.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.myproxy.server", "--config-stdin", *extra],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
        stderr=open(work / "ours.log", "wb"))
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(dataclasses.asdict(config)).encode())
    proc.stdin.close()
    wait_port("127.0.0.1", port, proc)
    return proc, port


def start_reference(work: Path, manifest: dict[str, Any]
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
cert_dir {manifest['ca_dir']}
""")
    port = free_port()
    pidfile = work / "myproxy-server.pid"
    env = {**os.environ, "X509_CERT_DIR": manifest["ca_dir"],
           "X509_USER_CERT": manifest["host"]["cert"], "X509_USER_KEY": manifest["host"]["key"]}
    subprocess.run(["myproxy-server", "-c", str(cfg), "-s", str(store), "-l", "127.0.0.1",
                    "-p", str(port), "-P", str(pidfile)], env=env, check=True, timeout=30)
    wait_port("127.0.0.1", port, None)
    pid = int(pidfile.read_text().strip())
    client_env = {k: v for k, v in os.environ.items() if not k.startswith("X509_USER")}
    client_env.update(X509_CERT_DIR=manifest["ca_dir"], MYPROXY_SERVER="localhost",
                      MYPROXY_SERVER_PORT=str(port),
                      MYPROXY_SERVER_DN=manifest["host"]["dn"],
                      X509_USER_CERT=manifest["users"]["alice"]["cert"],
                      X509_USER_KEY=manifest["users"]["alice"]["key"])
    for args, stdin in ((["-S", "-l", "alice"], PASS + "\n"),
                        (["-n", "-l", "alice", "-k", "pilotjob", "-x", "-Z", pilot_dn], None)):
        subprocess.run(["myproxy-init", "-c", "24", "-t", "2", *args], env=client_env,
                       input=stdin, text=True, check=True, capture_output=True, timeout=120)
    return None, port, pid


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="per cell")
    parser.add_argument("--max-ops", type=int, default=2000, help="per cell")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--modes", default="pilot,passphrase")
    parser.add_argument("--json", default="bench-myproxy.json")
    parser.add_argument("--ours-args", default="", help="extra args for broker.myproxy.server")
    args = parser.parse_args()
    concurrency = [int(c) for c in args.clients.split(",")]
    modes = args.modes.split(",")

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
        pilot = manifest["users"]["pilot"]
        for mode in modes:
            for label, port, spid in (("broker", ours_port, ours.pid),  # pids
                                      ("myproxy-server", ref_port, ref_pid)):
                if mode == "pilot":
                    target = Target(label, "127.0.0.1", port, manifest["ca_dir"], pilot["cert"],
                                    pilot["key"], "alice", "pilotjob", "")
                else:
                    target = Target(label, "127.0.0.1", port, manifest["ca_dir"], None, None,
                                    "alice", None, PASS)
                for clients in concurrency:
                    row = run_cell(target, clients, args.seconds, args.max_ops, csrs, spid)
                    row["mode"] = mode
                    rows.append(row)
                    print(f"  {mode:10} {label:15} c={clients:<3} {row['per_s']:7.1f}/s "
                          f"p50 {row['p50_ms']:7.1f} ms p99 {row['p99_ms']:7.1f} ms "
                          f"errors {row['errors']}", file=sys.stderr)
    finally:
        ours.send_signal(signal.SIGTERM)
        try:
            ours.wait(10)
        except subprocess.TimeoutExpired:
            ours.kill()
        if ref_pid is not None:
            os.kill(ref_pid, signal.SIGTERM)

    print()
    print(f"{'mode':10} {'clients':>7} | {'broker /s':>9} {'p50':>7} {'p99':>7} | "
          f"{'myproxy /s':>10} {'p50':>7} {'p99':>7} | {'ratio':>6}")
    summary = []
    for mode in modes:
        for clients in concurrency:
            a = next(r for r in rows if r["mode"] == mode and r["clients"] == clients
                     and r["server"] == "broker")
            b = next(r for r in rows if r["mode"] == mode and r["clients"] == clients
                     and r["server"] == "myproxy-server")
            ratio = a["per_s"] / b["per_s"] if b["per_s"] else float("inf")
            summary.append({"mode": mode, "clients": clients, "broker": a,
                            "myproxy_server": b, "ratio": round(ratio, 2)})
            print(f"{mode:10} {clients:>7} | {a['per_s']:>9.1f} {a['p50_ms']:>7.1f} "
                  f"{a['p99_ms']:>7.1f} | {b['per_s']:>10.1f} {b['p50_ms']:>7.1f} "
                  f"{b['p99_ms']:>7.1f} | {ratio:>5.1f}x")
    result = {"generated": datetime.now(UTC).isoformat(), "cpus": os.cpu_count(),
              "seconds_per_cell": args.seconds, "max_ops_per_cell": args.max_ops,
              "cells": summary}
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"\nJSON written to {args.json}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
