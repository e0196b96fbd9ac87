#!/usr/bin/env python3
"""Job start overhead of broker-pilot: job ad -> retrieval -> payload wrapper.

Run from the checkout, as root for the real identity switch (otherwise mode none):

    scripts/bench pilot [--runs 30]

It writes a throwaway dev PKI under /tmp, starts ``broker serve`` on 127.0.0.1
(one gthread worker), delegates alice's credential and then measures, each for a
bounded number of runs:

* the in-process pilot path up to the payload's start (``Pilot.start``: read the
  job ad, allow-list, job key, retrieval over mutual TLS, proxy file, wrapper
  ``prepare``), with EC keys, fresh RSA keys and pooled RSA keys; and its parts;
* the whole ``broker-pilot /bin/true`` command as the starter would run it
  (interpreter start-up, imports, the above, the switch, the run and cleanup),
  next to ``/bin/true`` and a bare ``python -c pass``.

Target: median of the in-process path with EC keys <= 50 ms. The server is
stopped by its PID at the end and everything is removed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from bench.load import stop_process
from broker.client import BrokerClient, ClientIdentity
from broker.condor.jobad import read_job_ad
from broker.devpki import DEV_POLICY, write_dev_pki
from broker.pki.proxy import generate_key
from payload_wrapper.api import execute
from payload_wrapper.launcher import build_launcher
from payload_wrapper.pilot import Pilot, fill_rsa_pool
from payload_wrapper.pilot_config import load_pilot_config

REPO = Path(__file__).resolve().parent.parent

TARGET_MS = 50.0
BIN = Path(sys.executable).parent
AD = """MyType = "Job"
ClusterId = {n}
ProcId = 0
GlobalJobId = "bench.example.org#{n}.0#1700000000"
Owner = "alice"
BrokerOwner = "/DC=org/DC=example/CN=Alice"
BrokerCredential = "default"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stats(samples: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered), p99, ordered[0]


def timed(func: Callable[[], object], runs: int, warmup: int = 2) -> list[float]:
    out = []
    for i in range(runs + warmup):
        start = time.perf_counter()
        func()
        if i >= warmup:
            out.append((time.perf_counter() - start) * 1000)
    return out


def start_server(top: Path, pki: Path) -> tuple[subprocess.Popen[bytes], int]:
    policies = top / "policies"
    policies.mkdir()
    (policies / "10-bench.toml").write_text(DEV_POLICY)
    port = free_port()
    with open(top / "serve.log", "wb") as log:
        proc = subprocess.Popen(
            [
                str(BIN / "broker"),
                "serve",
                "--state-dir",
                str(top / "state"),
                "--bind",
                f"127.0.0.1:{port}",
                "--host-cert",
                str(pki / "host.pem"),
                "--host-key",
                str(pki / "host.key"),
                "--ca-dir",
                str(pki / "certificates"),
                "--vomsdir",
                str(pki / "vomsdir"),
                "--policy-dir",
                str(policies),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return proc, port


def wait_for(client: BrokerClient, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("broker serve exited early; see its serve.log")
        try:
            client.call("GET", "/healthz")
            return
        except Exception:
            time.sleep(0.2)
    raise SystemExit("broker serve did not come up within 30 s")


def inner(top: Path, runs: int) -> int:
    """The in-process measurements; prints [[label, samples], ...] as JSON."""
    config_path = top / "pilot.toml"
    ad_path = top / "job.ad"
    counter = iter(range(1, 10**5))

    def write_ad() -> None:
        ad_path.write_text(AD.format(n=next(counter)))

    base = load_pilot_config(config_path)
    rows: list[tuple[str, list[float]]] = []

    def pilot_path(pilot: Pilot) -> Callable[[], object]:
        def once() -> object:
            write_ad()
            job = pilot.start(read_job_ad(ad_path), ["/bin/true"])
            # the run itself is not part of the start overhead; keep it out
            # of the timing by running it after the clock stops (below)
            pending.append(job)
            return job

        return once

    pending: list[object] = []

    def drain() -> None:
        while pending:
            execute(pending.pop().prepared)  # type: ignore[attr-defined]

    for label, cfg in (
        ("in-process start, EC P-256", base),
        ("in-process start, RSA 2048 fresh", replace(base, key_type="rsa")),
        (
            "in-process start, RSA 2048 pool",
            replace(base, key_type="rsa", rsa_pool_dir=top / "pool"),
        ),
    ):
        if cfg.rsa_pool_dir is not None:
            fill_rsa_pool(cfg.rsa_pool_dir, runs + 4)
        pilot = Pilot(cfg)
        samples = []
        step = pilot_path(pilot)
        for i in range(runs + 2):
            start = time.perf_counter()
            step()
            elapsed = (time.perf_counter() - start) * 1000
            drain()
            if i >= 2:
                samples.append(elapsed)
        rows.append((label, samples))

    pilot = Pilot(base)
    ad = read_job_ad(ad_path)
    rows.append(("  part: read job ad (classad2)", timed(lambda: read_job_ad(ad_path), runs)))
    rows.append(("  part: EC P-256 key", timed(lambda: generate_key("ec"), runs)))
    rows.append(("  part: RSA 2048 key", timed(lambda: generate_key("rsa"), min(runs, 20))))
    rows.append(("  part: retrieval (mTLS, EC key)", timed(lambda: pilot.retrieve(ad), runs)))
    json.dump(rows, sys.stdout)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, choices=range(3, 501), metavar="N")
    parser.add_argument("--inner", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    runs = args.runs
    if args.inner is not None:
        return inner(args.inner, runs)
    root = os.geteuid() == 0
    top = Path(tempfile.mkdtemp(prefix="bench-pilot-", dir="/tmp"))
    top.chmod(0o755)
    proc: subprocess.Popen[bytes] | None = None
    try:
        write_dev_pki(top / "pki", now=datetime.now(UTC), users=("alice",), pilots=("pilot",))
        pki = top / "pki"
        for d in (pki, pki / "certificates", pki / "vomsdir"):
            d.chmod(0o755)
        proc, port = start_server(top, pki)
        alice = BrokerClient(
            f"localhost:{port}",
            ClientIdentity(str(pki / "alice.pem"), str(pki / "alice.key")),
            ca_dir=str(pki / "certificates"),
        )
        wait_for(alice, proc)
        alice.delegate(alice.identity.load(), username="alice", now=datetime.now(UTC))
        work = top / "work"
        work.mkdir(mode=0o755)
        mode = "setuid" if root else "none"
        config_path = top / "pilot.toml"
        config_path.write_text(
            f'broker_url = "https://localhost:{port}"\ncert = "{pki}/pilot.pem"\n'
            f'key = "{pki}/pilot.key"\nca_dir = "{pki}/certificates"\n'
            f'vomsdir = "{pki}/vomsdir"\nallowed_owners = ["/DC=org/DC=example/*"]\n'
            f'workdir = "{work}"\n'
            f'[wrapper]\nmode = "{mode}"\n'
            + ('account = "nobody"\n' if root else "")
            + "kill_grace = 0.2\n"
        )
        # execute() kills every descendant of the process that calls it, the
        # broker server included, so the in-process part runs in a child of its
        # own; the server is a sibling there, not a descendant.
        child = subprocess.run(
            [sys.executable, __file__, "--inner", str(top), "--runs", str(runs)],
            capture_output=True,
            text=True,
            check=False,
            timeout=1800,
        )
        if child.returncode != 0:
            raise SystemExit(f"the in-process part failed:\n{child.stderr}")
        rows = [(label, samples) for label, samples in json.loads(child.stdout)]
        ad_path = top / "job.ad"
        counter = iter(range(10**5, 10**6))

        def write_ad() -> None:
            ad_path.write_text(AD.format(n=next(counter)))

        env = {
            "PATH": "/usr/bin:/bin",
            "BROKER_PILOT_CONFIG": str(config_path),
            "_CONDOR_JOB_AD": str(ad_path),
            "_CONDOR_SCRATCH_DIR": str(top),
            "_CONDOR_WRAPPER_ERROR_FILE": str(top / "wrapper-error"),
        }

        def command(argv: list[str], with_ad: bool = False) -> Callable[[], object]:
            def once() -> object:
                if with_ad:
                    write_ad()
                return subprocess.run(
                    argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )

            return once

        rows.append(("command: /bin/true", timed(command(["/bin/true"]), runs)))
        rows.append(
            ("command: python -c pass", timed(command([sys.executable, "-c", "pass"]), runs))
        )
        rows.append(
            (
                "command: python -c 'import payload_wrapper.pilot'",
                timed(command([sys.executable, "-c", "import payload_wrapper.pilot"]), runs),
            )
        )
        # what USER_JOB_WRAPPER names: the static launcher -> python -I -m payload_wrapper.pilot
        launcher = build_launcher(top / "broker-pilot")
        rows.append(
            (
                "command: broker-pilot /bin/true",
                timed(command([str(launcher), "/bin/true"], with_ad=True), runs),
            )
        )
    finally:
        if proc is not None and proc.poll() is None:
            stop_process(proc)
        shutil.rmtree(top, ignore_errors=True)

    print(
        f"broker-pilot job start overhead ({runs} runs each, mode {mode}, "
        f"{os.cpu_count()} CPUs, broker on 127.0.0.1 with 1 worker)"
    )
    print(f"{'measurement':<52} {'median ms':>10} {'p99 ms':>9} {'min ms':>8}")
    for label, samples in rows:
        med, p99, low = stats(samples)
        print(f"{label:<52} {med:>10.1f} {p99:>9.1f} {low:>8.1f}")
    ec_median = stats(rows[0][1])[0]
    verdict = "meets" if ec_median <= TARGET_MS else "MISSES"
    print(
        f"\nin-process start with EC keys: median {ec_median:.1f} ms {verdict} the "
        f"{TARGET_MS:.0f} ms target"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
