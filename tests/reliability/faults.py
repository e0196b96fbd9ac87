"""Faults: kill -9 of the server and of a worker, PostgreSQL going away, a full disk."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from broker.errors import BrokerError
from tests.brokerserver import RunningBroker
from tests.pkifixtures import GridPki
from tests.reliability.harness import (
    Outcome,
    crash,
    launch,
    pg_start,
    pg_stop,
    postgres_cluster,
    worker_pids,
)
from tests.reliability.myproxy_client import MyProxyClient, MyProxyRefused
from tests.reliability.storecheck import check_pending, check_rows, open_store

PENDING_TTL = timedelta(minutes=10)  # ServiceConfig.pending_ttl


@dataclass
class _Acks:
    lock: threading.Lock = field(default_factory=threading.Lock)
    acked: set[tuple[str, str]] = field(default_factory=set)
    attempts: int = 0
    retrievals: int = 0


def _traffic(
    index: int, broker: RunningBroker, mp_port: int, tag: str, stop: threading.Event, acks: _Acks
) -> None:
    """Delegate and retrieve until stopped; remember each acknowledged delegation."""
    who = "alice" if index % 2 == 0 else "bob"
    username = f"f{tag}x{index}"
    rest = broker.client(who)
    rest.timeout = 10.0
    pilot = broker.client("pilot")
    pilot.timeout = 10.0
    cred = rest.identity.load()
    mp = None
    if mp_port and index % 3 == 2:
        mp = MyProxyClient(
            mp_port,
            broker.pki.ca_dir,
            broker.pki.cert_path(who),
            broker.pki.key_path(who),
            timeout=10.0,
        )
    done: list[str] = []
    for serial in range(10_000):
        if stop.is_set():
            return
        name = f"n{serial}"
        with acks.lock:
            acks.attempts += 1
        try:
            if mp is not None:
                mp.put(cred, username, name)
            else:
                rest.delegate(cred, username=username, name=name, now=datetime.now(UTC))
        except (BrokerError, MyProxyRefused, OSError, ConnectionError):
            time.sleep(0.05)  # the server is down or restarting: expected here
            continue
        with acks.lock:
            acks.acked.add((username, name))
        done.append(name)
        try:
            pilot.retrieve(username=username, name=random.choice(done), key_type="ec")
            with acks.lock:
                acks.retrievals += 1
        except (BrokerError, OSError):
            pass


def _healthy(broker: RunningBroker, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    client = broker.client("alice")
    client.timeout = 5.0
    while time.monotonic() < deadline:
        try:
            client.call("GET", "/healthz")
            return True
        except (BrokerError, OSError):
            time.sleep(0.2)
    return False


def kill_rounds(
    pki: GridPki,
    base: Path,
    *,
    rounds: int,
    mode: str,
    myproxy: bool,
    outcome: Outcome,
    keys_out: list[bytes],
    rng: random.Random,
) -> None:
    """``mode`` "server": kill -9 the master (and its children); "worker": one worker only."""
    workdir = base / f"kill-{mode}"
    broker, mp_port = launch(pki, workdir, myproxy=myproxy)
    acks = _Acks()
    try:
        for round_no in range(rounds):
            stop = threading.Event()
            threads = [
                threading.Thread(
                    target=_traffic,
                    daemon=True,
                    args=(i, broker, mp_port, f"{mode[0]}{round_no}", stop, acks),
                )
                for i in range(6)
            ]
            for thread in threads:
                thread.start()
            time.sleep(rng.uniform(0.4, 2.5))  # a random point in the traffic
            if mode == "server":
                crash(broker)
            else:
                victims = worker_pids(broker)
                if not victims:
                    outcome.fail(
                        f"round {round_no}: no gunicorn worker found under {broker.process.pid}"
                    )
                else:
                    os.kill(rng.choice(victims), signal.SIGKILL)
            outcome.tried += 1
            time.sleep(0.3)
            if mode == "server":
                stop.set()
                for thread in threads:
                    thread.join(timeout=30)
                broker, mp_port = launch(pki, workdir, myproxy=myproxy)
            else:
                # the master replaces the worker; the server keeps answering
                if not _healthy(broker, 20):
                    outcome.fail(f"round {round_no}: no answer 20 s after a worker was killed")
                time.sleep(0.5)
                stop.set()
                for thread in threads:
                    thread.join(timeout=30)
                if broker.process.poll() is not None:
                    outcome.fail(f"round {round_no}: the master died after a worker kill")
                    broker, mp_port = launch(pki, workdir, myproxy=myproxy)
            if any(t.is_alive() for t in threads):
                outcome.fail(f"round {round_no}: a client thread did not stop in 30 s")
            _verify(broker, acks, outcome, f"{mode} round {round_no}", keys_out)
        with open_store(broker.state_dir, broker.database_url) as store:
            for problem in check_pending(store, datetime.now(UTC), PENDING_TTL):
                outcome.fail(problem)
    finally:
        broker.stop()
    outcome.note(
        f"{mode} kills: {rounds}; delegations attempted {acks.attempts}, acknowledged "
        f"{len(acks.acked)}, retrievals during traffic {acks.retrievals}"
    )


def _verify(
    broker: RunningBroker, acks: _Acks, outcome: Outcome, label: str, keys_out: list[bytes]
) -> None:
    with open_store(broker.state_dir, broker.database_url) as store:
        integrity = check_rows(store, keep_keys=40)
    keys_out.extend(integrity.keys[: max(0, 200 - len(keys_out))])
    for problem in integrity.bad:
        outcome.fail(f"{label}: corrupt credential {problem}")
    pilot = broker.client("pilot")
    with acks.lock:
        acked = sorted(acks.acked)
    lost = [a for a in acked if a not in integrity.present]
    for username, name in lost:
        outcome.fail(f"{label}: acknowledged delegation {username}/{name} is gone")
    # retrieve a sample of the acknowledged ones through the restarted server
    for username, name in random.sample(acked, min(len(acked), 15)):
        try:
            pilot.retrieve(username=username, name=name, key_type="ec")
        except BrokerError as exc:
            outcome.fail(f"{label}: acknowledged {username}/{name} not retrievable: {exc}")


# --------------------------------------------------------------------------- PostgreSQL


def _raw_get(
    broker: RunningBroker, path: str, body: Mapping[str, object] | None = None, method: str = "GET"
) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(capath=str(broker.pki.ca_dir))
    ctx.load_cert_chain(str(broker.pki.cert_path("pilot")), str(broker.pki.key_path("pilot")))
    payload = json.dumps(body).encode() if body is not None else b""
    with (
        socket.create_connection(("127.0.0.1", broker.port), timeout=30) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(
            f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        data = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (chunk := tls.recv(65536)):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), rest


def _clear_json(status: int, body: bytes, want: tuple[int, ...]) -> str:
    """Empty when the answer is a JSON error with a sentence and one of ``want``."""
    try:
        doc = json.loads(body)
    except ValueError:
        return f"HTTP {status} with a non-JSON body {body[:120]!r}"
    message = str(doc.get("message", ""))
    if status not in want:
        return f"HTTP {status} (wanted {want}): {doc}"
    if len(message) < 20 or "Traceback" in message:
        return f"HTTP {status} without a clear message: {doc}"
    return ""


def postgres_outage(pki: GridPki, base: Path, outcome: Outcome, rng: random.Random) -> None:
    from broker.pki.proxy import csr_to_pem, generate_key, make_csr

    with postgres_cluster() as cluster:
        url = cluster.create_database("reliability")
        broker, _ = launch(pki, base / "pg", database_url=url)
        try:
            alice = broker.client("alice")
            alice.delegate(alice.identity.load(), username="pguser", now=datetime.now(UTC))
            csr = csr_to_pem(make_csr(generate_key("ec"))).decode()
            retrieval = {"username": "pguser", "csr": csr}
            pid_before = broker.process.pid
            time.sleep(rng.uniform(0.1, 1.0))
            pg_stop(cluster)
            outcome.tried += 1
            for path, body, method in (
                ("/healthz", None, "GET"),
                ("/v1/retrievals", retrieval, "POST"),
            ):
                status, answer = _raw_get(broker, path, body, method)
                problem = _clear_json(status, answer, (503,))
                if problem:
                    outcome.fail(f"PostgreSQL down, {method} {path}: {problem}")
                else:
                    outcome.note(
                        f"PostgreSQL down, {method} {path}: {status} "
                        f"{json.loads(answer).get('message', '')[:110]}"
                    )
            pg_start(cluster)
            deadline = time.monotonic() + 30
            recovered = False
            while time.monotonic() < deadline and not recovered:
                status, _ = _raw_get(broker, "/healthz")
                recovered = status == 200
                if not recovered:
                    time.sleep(0.3)
            status, answer = _raw_get(broker, "/v1/retrievals", retrieval, "POST")
            same = broker.process.poll() is None and broker.process.pid == pid_before
            if not (recovered and status == 200 and same):
                outcome.fail(
                    f"no recovery after PostgreSQL came back: healthz ok={recovered}, "
                    f"retrieval {status} {answer[:120]!r}, same process={same}"
                )
            else:
                outcome.note(
                    "PostgreSQL back: healthz 200 and retrieval 200 from the same "
                    "server process (no restart)"
                )
            with open_store(broker.state_dir, broker.database_url) as store:
                keys = check_rows(store, keep_keys=5).keys
        finally:
            broker.stop()
        _scan_pg(cluster.data, keys, outcome)


def _scan_pg(data: Path, keys: list[bytes], outcome: Outcome) -> None:
    """The PostgreSQL data files (tables, WAL) hold no key material of stored credentials."""
    from tests.reliability.secrets_scan import MARKERS, _needles

    needles = [n for pem in keys for n in _needles(pem)] + MARKERS
    files = [p for p in data.rglob("*") if p.is_file() and p.stat().st_size < (64 << 20)]
    for path in files:
        blob = path.read_bytes()
        for needle in needles:
            if needle in blob:
                outcome.fail(f"PostgreSQL file {path.name} holds private-key bytes")
    outcome.note(
        f"PostgreSQL data dir: {len(files)} files scanned for {len(keys)} stored keys "
        "and PEM markers"
    )


# --------------------------------------------------------------------------- disk full


def disk_full(pki: GridPki, base: Path, outcome: Outcome) -> None:
    if os.geteuid() != 0:
        outcome.skipped = "the disk-full check mounts a tmpfs and needs root"
        return
    mount = base / "tinyfs"
    mount.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    broker = None
    try:
        broker = _launch_on(pki, base, mount / "state")
        alice = broker.client("alice")
        alice.delegate(alice.identity.load(), username="df", name="before", now=datetime.now(UTC))
        filler = mount / "filler"
        _fill(filler, 65536)
        _fill(mount / "filler2", 512)  # the last few bytes
        for attempt in range(3):
            outcome.tried += 1
            status, answer = _delegate_raw(broker, f"full{attempt}")
            problem = _clear_json(status, answer, (503, 507))
            if not problem and b"full" not in answer.lower():
                problem = f"HTTP {status} does not say the disk is full: {answer[:200]!r}"
            if problem:
                outcome.fail(f"disk full, delegation: {problem}")
            elif attempt == 0:
                outcome.note(
                    f"disk full: HTTP {status} {json.loads(answer).get('message', '')[:140]}"
                )
        status, _ = _raw_get(broker, "/healthz")
        outcome.note(f"disk full: /healthz answers {status}")
        for path in (filler, mount / "filler2"):
            path.unlink(missing_ok=True)
        outcome.tried += 1
        try:
            alice.delegate(
                alice.identity.load(), username="df", name="after", now=datetime.now(UTC)
            )
            broker.client("pilot").retrieve(username="df", name="before", key_type="ec")
            outcome.note("space freed: delegation and retrieval work again without a restart")
        except BrokerError as exc:
            outcome.fail(f"after freeing space the broker did not recover: {exc}")
        log = broker.log.read_text(errors="replace")
        outcome.note(
            f"server log: {log.count('Traceback')} tracebacks (log only, never in a response)"
        )
    finally:
        if broker is not None:
            broker.stop()
        subprocess.run(["umount", str(mount)], check=False, capture_output=True, timeout=30)


def _fill(path: Path, block: int) -> None:
    """Write zeros to ``path`` until the filesystem is full (ENOSPC ends it)."""
    try:
        with open(path, "wb") as out:
            for _ in range(1 << 20):  # bounded: 2 MiB / 512 B is far below this
                out.write(b"\0" * block)
                out.flush()
    except OSError:
        pass


def _launch_on(pki: GridPki, base: Path, state: Path) -> RunningBroker:
    """start_broker with its state dir on the small filesystem (policies and log elsewhere)."""
    work = base / "df"
    broker, _ = launch(pki, work, extra=("--state-dir", str(state)))
    broker.state_dir = state
    broker.database_url = f"sqlite:///{state / 'broker.sqlite'}"
    return broker


def _delegate_raw(broker: RunningBroker, name: str) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(capath=str(broker.pki.ca_dir))
    ctx.load_cert_chain(str(broker.pki.cert_path("alice")), str(broker.pki.key_path("alice")))
    return _raw_get_ctx(broker, ctx, "/v1/delegations", {"username": "df", "name": name})


def _raw_get_ctx(
    broker: RunningBroker, ctx: ssl.SSLContext, path: str, body: dict[str, object]
) -> tuple[int, bytes]:
    payload = json.dumps(body).encode()
    with (
        socket.create_connection(("127.0.0.1", broker.port), timeout=30) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(
            f"POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), rest


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
