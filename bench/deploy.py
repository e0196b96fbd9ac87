#!/usr/bin/env python3
"""Benchmark: the deployment figures of issue 14, in one run, against myproxy-server.

Parts (every figure in one run, so that they are comparable):

1. ``cpu``: server CPU per retrieval (the server's process tree, /proc), our MyProxy
   endpoint (2 processes, as ``broker serve`` runs it) vs myproxy-server, trusted
   retrieval by certificate, fresh TLS connection per retrieval, 4 clients.
2. ``pinned``: server-only capacity: each server's process tree pinned to CPU 0 and the
   load generator to CPU 1 (``sched_setaffinity``, what ``taskset`` does), 16 clients,
   retrievals/s of both.
3. ``reuse``: REST (``broker serve``, 2 workers) with 16 clients, each keeping one TLS
   connection (``BrokerClient`` reuse) vs a new connection per call: retrievals/s, p99.
4. ``openloop``: a fixed arrival rate (default 100 retrievals/s) for some seconds on both
   of our endpoints (MyProxy: fresh connection each; REST: 16 kept connections);
   latency counted from the scheduled arrival, so queueing shows: p50/p99.

Usage::

    scripts/bench deploy --seconds 8 --json bench-out/deploy.json
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.load import stop_process
from bench.myproxy import (
    _client_context,
    free_port,
    make_csrs,
    one_retrieval,
    pilot_target,
    request_bytes,
    run_cell,
    setup_pki,
    start_ours,
    start_reference,
    wait_port,
)

REPO = Path(__file__).resolve().parents[1]


def _tree_pids(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


def _pin_tree(pid: int, cpus: set[int]) -> None:
    for p in _tree_pids(pid):
        for task in Path(f"/proc/{p}/task").iterdir():
            try:
                os.sched_setaffinity(int(task.name), cpus)
            except OSError:
                pass


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


# --------------------------------------------------------------------------- REST server


def start_rest(work: Path, manifest: dict[str, Any]) -> tuple[subprocess.Popen[bytes], str]:
    from broker.devpki import policy_rule

    pilot_dn = manifest["users"]["pilot"]["dn"]
    policies = work / "policies"
    policies.mkdir(parents=True)
    (policies / "10-bench.toml").write_text(
        policy_rule("owners", ["delegate", "info", "destroy"], ["self"])
        + policy_rule("pilot", "retrieve", [pilot_dn], auth=["certificate"])
    )
    port = free_port()
    argv = [
        str(Path(sys.executable).parent / "broker"),
        "serve",
        "--state-dir",
        str(work / "state"),
        "--bind",
        f"127.0.0.1:{port}",
        "--host-cert",
        manifest["host"]["cert"],
        "--host-key",
        manifest["host"]["key"],
        "--ca-dir",
        manifest["ca_dir"],
        "--vomsdir",
        manifest["vomsdir"],
        "--policy-dir",
        str(policies),
        "--workers",
        "2",
        "--threads",
        "8",
        "--username-binding",
        "none",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(work / "rest.log", "wb"))
    wait_port("127.0.0.1", port, proc)
    return proc, f"127.0.0.1:{port}"


def _rest_client(manifest: dict[str, Any], who: str, server: str) -> Any:
    from broker.client import BrokerClient, ClientIdentity

    user = manifest["users"][who]
    return BrokerClient(
        server, ClientIdentity(cert=user["cert"], key=user["key"]), ca_dir=manifest["ca_dir"]
    )


def rest_closed_loop(
    manifest: dict[str, Any],
    server: str,
    clients: int,
    seconds: float,
    reuse: bool,
    keys: list[Any],
) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker(index: int) -> None:
        client = _rest_client(manifest, "pilot", server)
        mine: list[float] = []
        i = index
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                client.retrieve(username="alice", key=keys[i % len(keys)], key_type="ec")
            except Exception as exc:
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            finally:
                i += clients
                if not reuse:
                    client.close()
            mine.append(time.perf_counter() - started)
        client.close()
        with lock:
            latencies.extend(mine)

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    return {
        "clients": clients,
        "reuse": reuse,
        "ops": len(latencies),
        "errors": len(errors),
        "per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(_pct(latencies, 0.5), 1),
        "p99_ms": round(_pct(latencies, 0.99), 1),
        "error_samples": errors[:3],
    }


# --------------------------------------------------------------------------- open loop


def open_loop(
    call: Callable[[int], None], rate: float, seconds: float, pool: int = 64
) -> dict[str, Any]:
    """Arrivals every 1/rate s; latency from the scheduled arrival to the answer."""
    total = int(rate * seconds)
    results: queue.Queue[tuple[float, str | None]] = queue.Queue()
    start = time.perf_counter() + 0.2

    def job(i: int, scheduled: float) -> None:
        try:
            call(i)
            results.put((time.perf_counter() - scheduled, None))
        except Exception as exc:
            results.put((time.perf_counter() - scheduled, f"{type(exc).__name__}: {exc}"))

    with ThreadPoolExecutor(max_workers=pool) as executor:
        for i in range(total):
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            executor.submit(job, i, scheduled)
    latencies, errors = [], []
    while not results.empty():
        latency, error = results.get()
        (errors.append(error) if error else latencies.append(latency))
    return {
        "rate": rate,
        "seconds": seconds,
        "ops": len(latencies),
        "errors": len(errors),
        "p50_ms": round(_pct(latencies, 0.5), 1),
        "p99_ms": round(_pct(latencies, 0.99), 1),
        "max_ms": round(max(latencies) * 1000, 1) if latencies else None,
        "mean_ms": round(statistics.fmean(latencies) * 1000, 1) if latencies else None,
        "error_samples": errors[:3],
    }


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    parser.add_argument("--max-ops", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=100.0, help="open-loop arrivals/s")
    parser.add_argument("--parts", default="cpu,pinned,reuse,openloop")
    parser.add_argument("--json", default=str(REPO / "bench-out" / "deploy.json"))
    args = parser.parse_args()
    parts = set(args.parts.split(","))

    from cryptography.hazmat.primitives.asymmetric import ec

    work = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    manifest = setup_pki(work)
    csrs = make_csrs(32)
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(64)]
    (work / "ours").mkdir()
    ours, ours_port = start_ours(work / "ours", manifest, ["--processes", "2"])
    ref_pid: int | None = None
    rest: subprocess.Popen[bytes] | None = None
    report: dict[str, Any] = {"generated": datetime.now(UTC).isoformat(), "cpus": os.cpu_count()}
    pilot = manifest["users"]["pilot"]
    all_cpus = os.sched_getaffinity(0)
    try:
        _, ref_port, ref_pid = start_reference(work, manifest)
        targets = {
            "broker": (pilot_target("broker", ours_port, manifest), ours.pid),
            "myproxy-server": (pilot_target("myproxy-server", ref_port, manifest), ref_pid),
        }
        if "cpu" in parts:
            cells = {
                label: run_cell(t, 4, args.seconds, args.max_ops, csrs, pid)
                for label, (t, pid) in targets.items()
            }
            ours_ms = cells["broker"]["server_cpu_ms_per_op"]
            ref_ms = cells["myproxy-server"]["server_cpu_ms_per_op"]
            report["cpu"] = {
                "cells": cells,
                "broker_ms": ours_ms,
                "reference_ms": ref_ms,
                "reference_over_broker": round(ref_ms / ours_ms, 2) if ours_ms and ref_ms else None,
            }
            print(f"cpu/retrieval: broker {ours_ms} ms, myproxy-server {ref_ms} ms", flush=True)
        if "pinned" in parts and len(all_cpus) >= 2:
            server_cpu, client_cpu = sorted(all_cpus)[:2]
            cells = {}
            try:
                os.sched_setaffinity(0, {client_cpu})
                for label, (t, pid) in targets.items():
                    assert pid is not None
                    _pin_tree(pid, {server_cpu})
                    cells[label] = run_cell(t, 16, args.seconds, args.max_ops, csrs, pid)
                    _pin_tree(pid, all_cpus)
            finally:
                os.sched_setaffinity(0, all_cpus)
            a, b = cells["broker"]["per_s"], cells["myproxy-server"]["per_s"]
            report["pinned"] = {
                "cells": cells,
                "server_cpu": server_cpu,
                "client_cpu": client_cpu,
                "ratio": round(a / b, 2) if b else None,
            }
            print(f"pinned capacity: broker {a}/s, myproxy-server {b}/s", flush=True)
        if "reuse" in parts or "openloop" in parts:
            rest, server = start_rest(work / "rest", manifest)
            _rest_client(manifest, "alice", server).delegate(
                _load(manifest, "alice"),
                username="alice",
                now=datetime.now(UTC),
                retrievers=[pilot["dn"]],
            )
        if "reuse" in parts and rest is not None:
            cells = {
                str(reuse): rest_closed_loop(manifest, server, 16, args.seconds, reuse, keys)
                for reuse in (True, False)
            }
            report["reuse"] = cells
            print(
                f"REST 16 clients: reuse {cells['True']['per_s']}/s p99 "
                f"{cells['True']['p99_ms']} ms; new connection each {cells['False']['per_s']}"
                f"/s p99 {cells['False']['p99_ms']} ms",
                flush=True,
            )
        if "openloop" in parts and rest is not None:
            mp_target = targets["broker"][0]
            ctx = _client_context(mp_target)
            request = request_bytes(mp_target)

            def myproxy_call(i: int) -> None:
                one_retrieval(mp_target, ctx, request, csrs[i % len(csrs)])

            clients: queue.Queue[Any] = queue.Queue()
            for _ in range(16):
                clients.put(_rest_client(manifest, "pilot", server))

            def rest_call(i: int) -> None:
                client = clients.get()
                try:
                    client.retrieve(username="alice", key=keys[i % len(keys)], key_type="ec")
                finally:
                    clients.put(client)

            report["openloop"] = {
                "myproxy": open_loop(myproxy_call, args.rate, args.seconds),
                "rest": open_loop(rest_call, args.rate, args.seconds),
            }
            for name, row in report["openloop"].items():
                print(
                    f"open loop {args.rate:.0f}/s {name}: p50 {row['p50_ms']} ms p99 "
                    f"{row['p99_ms']} ms errors {row['errors']}",
                    flush=True,
                )
    finally:
        for proc in (ours, rest):
            if proc is not None:
                stop_process(proc)
        if ref_pid is not None:
            os.kill(ref_pid, signal.SIGTERM)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"JSON written to {args.json}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def _load(manifest: dict[str, Any], who: str) -> Any:
    from broker.pki.loading import load_cert_and_key

    user = manifest["users"][who]
    return load_cert_and_key(Path(user["cert"]).read_bytes(), Path(user["key"]).read_bytes())


if __name__ == "__main__":
    sys.exit(main())
