"""Load: many concurrent clients mixing delegate / retrieve / info / destroy.

Half of the clients use the REST API, half the MyProxy endpoint (when it is
running). Each client works on its own usernames, so every refusal is a real
error. Afterwards: audit rows = requests sent, and every credential that was
delegated and not destroyed is retrievable.
"""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from broker.errors import BrokerError
from tests.brokerserver import RunningBroker
from tests.reliability.harness import Outcome, children_of
from tests.reliability.myproxy_client import MyProxyClient, MyProxyRefused
from tests.reliability.storecheck import audit_count, check_rows, open_store

MAX_OPS_PER_CLIENT = 5000  # a bound on top of the time bound


@dataclass
class _Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: dict[str, int] = field(default_factory=dict)  # endpoint -> requests sent
    ops: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    five_xx: int = 0
    latencies: list[float] = field(default_factory=list)
    live: set[tuple[str, str]] = field(default_factory=set)

    def add(self, endpoint: str, op: str, requests: int, seconds: float) -> None:
        with self.lock:
            self.requests[endpoint] = self.requests.get(endpoint, 0) + requests
            self.ops[f"{endpoint}:{op}"] = self.ops.get(f"{endpoint}:{op}", 0) + 1
            self.latencies.append(seconds)


def _client_loop(
    index: int, broker: RunningBroker, mp_port: int, deadline: float, tally: _Tally
) -> None:
    rng = random.Random(index)
    who = "alice" if index % 2 == 0 else "bob"
    use_myproxy = bool(mp_port) and index % 4 in (1, 2)
    endpoint = "myproxy" if use_myproxy else "rest"
    username = f"load{index}"
    owner_rest = broker.client(who)
    pilot_rest = broker.client("pilot")
    cred = owner_rest.identity.load()
    pki = broker.pki
    owner_mp = pilot_mp = None
    if use_myproxy:
        owner_mp = MyProxyClient(mp_port, pki.ca_dir, pki.cert_path(who), pki.key_path(who))
        pilot_mp = MyProxyClient(mp_port, pki.ca_dir, pki.cert_path("pilot"), pki.key_path("pilot"))
    mine: list[str] = []
    serial = 0
    for _ in range(MAX_OPS_PER_CLIENT):
        if time.monotonic() >= deadline:
            break
        roll = rng.random()
        if not mine or roll < 0.3:
            op = "delegate"
        elif roll < 0.65:
            op = "retrieve"
        elif roll < 0.85:
            op = "info"
        else:
            op = "destroy"
        name = f"c{serial}" if op == "delegate" else rng.choice(mine)
        started = time.monotonic()
        sent = 2 if op == "delegate" else 1
        try:
            if use_myproxy:
                assert owner_mp is not None and pilot_mp is not None
                if op == "delegate":
                    owner_mp.put(cred, username, name)
                elif op == "retrieve":
                    pilot_mp.get(username, name)
                elif op == "info":
                    owner_mp.info(username)
                else:
                    owner_mp.destroy(username, name)
            else:
                if op == "delegate":
                    owner_rest.delegate(cred, username=username, name=name, now=datetime.now(UTC))
                elif op == "retrieve":
                    pilot_rest.retrieve(username=username, name=name, key_type="ec")
                elif op == "info":
                    owner_rest.info(username=username)
                else:
                    owner_rest.destroy(username=username, name=name)
        except (BrokerError, MyProxyRefused, OSError, ConnectionError) as exc:
            status = getattr(exc, "http_status", 0)
            with tally.lock:
                if isinstance(exc, BrokerError) and status >= 500:
                    tally.five_xx += 1
                tally.errors.append(
                    f"{endpoint} {op} {username}/{name}: {type(exc).__name__}: {exc}"
                )
            # A delegation that failed half-way may have left one audit row or two;
            # stop counting this client's requests exactly by recording the doubt.
            tally.add(endpoint, "error", sent, time.monotonic() - started)
            continue
        tally.add(endpoint, op, sent, time.monotonic() - started)
        if op == "delegate":
            mine.append(name)
            serial += 1
        elif op == "destroy":
            mine.remove(name)
    with tally.lock:
        tally.live.update((username, n) for n in mine)


def run_load(
    broker: RunningBroker, mp_port: int, *, clients: int, seconds: float, outcome: Outcome
) -> None:
    with open_store(broker.state_dir, broker.database_url) as store:
        audit_before = audit_count(store)
    cpu_before = _server_cpu(broker)
    own_before = time.process_time()
    tally = _Tally()
    deadline = time.monotonic() + seconds
    threads = [
        threading.Thread(
            target=_client_loop,
            args=(i, broker, mp_port, deadline, tally),
            name=f"load-{i}",
            daemon=True,
        )
        for i in range(clients)
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 120)
        if thread.is_alive():
            outcome.fail(f"{thread.name} still running {seconds + 120:.0f} s after the end")
    elapsed = time.monotonic() - started
    cpu = _server_cpu(broker) - cpu_before
    own = time.process_time() - own_before
    total = sum(tally.requests.values())
    outcome.tried += total
    for message in tally.errors[:20]:
        outcome.fail(message)
    outcome.failed += max(len(tally.errors) - 20, 0)
    lat = sorted(tally.latencies) or [0.0]
    outcome.note(
        f"{clients} clients for {seconds:.0f} s ({elapsed:.1f} s wall): {total} "
        f"requests, {total / elapsed:.1f}/s; by endpoint {tally.requests}"
    )
    outcome.note("operations " + ", ".join(f"{k}={v}" for k, v in sorted(tally.ops.items())))
    outcome.note(
        f"operation latency p50 {lat[len(lat) // 2] * 1000:.0f} ms, p95 "
        f"{lat[int(len(lat) * 0.95)] * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms"
    )
    outcome.note(
        f"errors {len(tally.errors)}, 5xx {tally.five_xx}; server CPU {cpu:.1f} s "
        f"(load generator {own:.1f} s) over {elapsed:.1f} s wall on "
        f"{os.cpu_count()} cores"
    )
    with open_store(broker.state_dir, broker.database_url) as store:
        rows = audit_count(store) - audit_before
        integrity = check_rows(store)
    outcome.note(f"audit rows written {rows}, requests sent {total}")
    if rows != total:
        outcome.fail(f"audit rows {rows} != requests {total}")
    for problem in integrity.bad:
        outcome.fail(f"corrupt row: {problem}")
    # every credential delegated and not destroyed must come back
    pilot = broker.client("pilot")
    missing = 0
    for username, name in sorted(tally.live):
        try:
            pilot.retrieve(username=username, name=name, key_type="ec")
        except BrokerError as exc:
            missing += 1
            outcome.fail(f"live credential {username}/{name} not retrievable: {exc}")
    outcome.note(f"{len(tally.live)} live credentials checked afterwards, {missing} missing")
    outcome.tried += len(tally.live)


def _server_cpu(broker: RunningBroker) -> float:
    """CPU seconds (user + system) of the broker master and its live children."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in [broker.process.pid, *children_of(broker.process.pid)]:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total
