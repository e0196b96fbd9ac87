"""Shared parts of the load generators of bench/retrieval.py and bench/myproxy.py.

Not a benchmark itself: the benchmarks import it (``from bench.load import ...``;
they run as ``python -m bench.<name>`` from the checkout, which ``scripts/bench`` does).

What is shared, the per-request client code staying in each benchmark:

* machine busy % over a window from ``/proc/stat`` (all CPUs: anything else
  that runs on the machine counts too) and a nearest-rank percentile;
* the shape of one load level: ``ops`` requests split over ``threads`` client
  threads in at most ``client_procs`` forked processes (:func:`thread_groups`);
  each process runs :func:`client_threads`, which waits for a common ``start_at``,
  runs its threads and reports latencies, errors and its own CPU (getrusage,
  all threads) through a queue; :func:`run_load` forks the processes, takes the
  baselines just before they start, collects their parts and stops leftovers by
  PID, also on Ctrl-C or errors.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import resource
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

CLK_TCK = os.sysconf("SC_CLK_TCK")

T = TypeVar("T")

# (thread index, request count, the process's "stopped by the deadline" event) ->
# (latencies in seconds of the requests that worked, error texts)
Worker = Callable[[int, int, threading.Event], tuple[list[float], list[str]]]
# the body of one load-generator process: (start_at, deadline, queue) -> None
ClientProcess = Callable[[float, float, Any], None]


# ---------------------------------------------------------------- measurements


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])  # guest time is already counted in user
    return total - idle, total


def busy_pct(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """Machine busy % between two machine_ticks() samples (None if no tick passed)."""
    total = after[1] - before[1]
    return round(100 * (after[0] - before[0]) / total, 1) if total > 0 else None


def background_busy_pct(seconds: float = 1.0) -> float | None:
    """Machine busy % over a sample of ``seconds`` (taken before a benchmark starts)."""
    before = machine_ticks()
    time.sleep(seconds)
    return busy_pct(before, machine_ticks())


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (``pct`` in 0..100) of sorted values; nan if empty."""
    if not sorted_values:
        return float("nan")
    rank = max(math.ceil(pct / 100 * len(sorted_values)) - 1, 0)
    return sorted_values[min(rank, len(sorted_values) - 1)]


# ---------------------------------------------------------------- client processes


def thread_groups(
    ops: int, threads: int, client_procs: int, *, at_least: int = 0
) -> list[list[tuple[int, int]]]:
    """(thread index, count) per thread, grouped by process: thread i runs in process
    i % procs, procs = min(client_procs, threads) (at least 1). The ``ops`` requests
    are split evenly (the first ``ops % threads`` threads do one more), each thread
    doing at least ``at_least``."""
    procs = max(1, min(client_procs, threads))
    per_thread = [
        max(at_least, ops // threads + (1 if i < ops % threads else 0)) for i in range(threads)
    ]
    return [[(i, per_thread[i]) for i in range(p, threads, procs)] for p in range(procs)]


def load_process_signals() -> None:
    """First thing in a load-generator process: the parent handles Ctrl-C and stops
    us with SIGTERM, so ignore SIGINT and die at once on SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """Stop a server the benchmark started: SIGTERM, up to ``timeout`` s to exit,
    then SIGKILL and reap it (a process that already exited is left alone)."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def client_threads(
    worker: Worker, specs: Sequence[tuple[int, int]], start_at: float, out: Any
) -> None:
    """One thread per (index, count) spec running ``worker``, all started at
    ``start_at``; puts this process's part on the queue ``out``: latencies, errors,
    cpu (getrusage of this process, all threads, from start_at to the last thread's
    end), ended (monotonic) and stopped (whether a worker hit the deadline)."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stopped = threading.Event()

    def run(index: int, count: int) -> None:
        mine, bad = worker(index, count, stopped)
        with lock:
            latencies.extend(mine)
            errors.extend(bad)

    threads = [threading.Thread(target=run, args=spec, daemon=True) for spec in specs]
    delay = start_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    r0 = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    ended = time.monotonic()
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    out.put(
        {
            "latencies": latencies,
            "errors": errors,
            "cpu": cpu,
            "ended": ended,
            "stopped": stopped.is_set(),
        }
    )


# ---------------------------------------------------------------- one load level


@dataclass
class LoadRun(Generic[T]):
    """What run_load measured around one load level."""

    start_at: float  # monotonic time at which the clients started
    parts: list[dict[str, Any]]  # one per process, as client_threads put it
    before: T  # probe() just before the clients started
    after: T | None  # probe() once all parts were in (None unless probe_after)
    wall: float  # seconds from the baselines (or start_at) until all parts were in
    busy_pct: float | None  # machine busy % over the same window

    @property
    def latencies(self) -> list[float]:
        """All latencies of all processes, sorted."""
        return sorted(x for part in self.parts for x in part["latencies"])

    @property
    def errors(self) -> list[str]:
        return [e for part in self.parts for e in part["errors"]]

    @property
    def client_cpu(self) -> float:
        """CPU seconds of all load-generator processes over the level."""
        return float(sum(part["cpu"] for part in self.parts))

    @property
    def stopped_by_time(self) -> bool:
        return any(part["stopped"] for part in self.parts)


def run_load(
    clients: Sequence[ClientProcess],
    *,
    seconds: float,
    collect_timeout: float,
    probe: Callable[[], T],
    probe_after: bool = True,
) -> LoadRun[T]:
    """Run one load level: fork one process per ``clients`` entry (called with
    start_at, deadline = start_at + seconds and the queue), take ``probe()`` and the
    machine ticks at a quiet point just before start_at, wait for every part (at most
    ``collect_timeout`` s each), probe again if ``probe_after``, and join. Processes
    still alive at the end (Ctrl-C, an error) are terminated by PID."""
    ctx = mp.get_context("fork")
    queue: Any = ctx.Queue()
    start_at = time.monotonic() + 0.5  # all processes forked and ready by then
    deadline = start_at + seconds
    processes = [
        ctx.Process(target=client, args=(start_at, deadline, queue), daemon=True)
        for client in clients
    ]
    try:
        for p in processes:
            p.start()
        # baselines at a quiet point just before the clients start
        time.sleep(max(start_at - time.monotonic() - 0.05, 0))
        before = probe()
        ticks0 = machine_ticks()
        t0 = time.monotonic()
        parts = [queue.get(timeout=collect_timeout) for _ in processes]
        wall = time.monotonic() - max(t0, start_at)
        after = probe() if probe_after else None
        ticks1 = machine_ticks()
        for p in processes:
            p.join(timeout=10)
    finally:
        # on Ctrl-C or an error: stop our own load generators (by PID)
        for p in processes:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    return LoadRun(
        start_at=start_at,
        parts=parts,
        before=before,
        after=after,
        wall=wall,
        busy_pct=busy_pct(ticks0, ticks1),
    )
