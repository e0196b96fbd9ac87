#!/usr/bin/env python3
"""Median overhead of ``payload-wrapper ... -- /bin/true`` over plain ``/bin/true``.

Run as root (setuid mode, account nobody) from the checkout:

    scripts/bench wrapper [--runs 30] [--mode setuid|none]

It builds a throwaway dev PKI and proxy under /tmp, runs each command a
bounded number of times, prints a table and removes everything. The target is
a median overhead of at most 30 ms.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from broker.devpki import write_dev_pki
from broker.fileio import write_private_file
from broker.pki.loading import credential_to_pem, load_cert_and_key
from broker.pki.proxy import new_proxy

TARGET_MS = 30.0

# Where a Python command's start-up time goes (the same interpreter, nothing else run):
# the floor under any payload-wrapper written in Python that validates chains with
# cryptography / pyOpenSSL, as the broker does.
FLOORS: list[tuple[str, list[str]]] = [
    ("floor: python -I -S (no site)", ["-I", "-S", "-c", "pass"]),
    ("floor: python (site, venv)", ["-c", "pass"]),
    ("floor: + import cryptography.x509", ["-c", "import cryptography.x509"]),
    ("floor: + import OpenSSL.crypto", ["-c", "import OpenSSL.crypto"]),
    ("floor: + import payload_wrapper.cli", ["-c", "import payload_wrapper.cli"]),
]


def timed(argv: list[str], runs: int, env: dict[str, str]) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
        out.append((time.perf_counter() - start) * 1000)
    return out


def in_process(mode: str, proxy: Path, top: Path, work: Path, runs: int) -> list[float]:
    from payload_wrapper.api import run_payload
    from payload_wrapper.config import WrapperSettings

    settings = WrapperSettings(
        mode=mode,
        account="nobody",
        workdir=work,
        ca_dir=top / "pki/certificates",
        vomsdir=top / "pki/vomsdir",
    )
    out = []
    for _ in range(runs + 2):
        start = time.perf_counter()
        run_payload(settings, proxy, ["/bin/true"])
        out.append((time.perf_counter() - start) * 1000)
    return out[2:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, choices=range(1, 501), metavar="N")
    parser.add_argument("--mode", choices=("setuid", "none"), default="setuid")
    args = parser.parse_args()
    if args.mode == "setuid" and os.geteuid() != 0:
        print("setuid mode needs root; use --mode none otherwise", file=sys.stderr)
        return 2
    top = Path(tempfile.mkdtemp(prefix="pw-bench-", dir="/tmp"))
    try:
        top.chmod(0o755)
        now = datetime.now(UTC)
        write_dev_pki(top / "pki", now=now, users=("alice",), pilots=("pilot",))
        cred = load_cert_and_key(
            (top / "pki/alice.pem").read_bytes(), (top / "pki/alice.key").read_bytes()
        )
        proxy = top / "proxy.pem"
        write_private_file(
            proxy, credential_to_pem(new_proxy(cred, now=now, lifetime=timedelta(hours=1)))
        )
        work = top / "work"
        work.mkdir(mode=0o755)
        wrapper = str(Path(sys.executable).parent / "payload-wrapper")
        base = [
            wrapper,
            "--proxy",
            str(proxy),
            "--ca-dir",
            str(top / "pki/certificates"),
            "--vomsdir",
            str(top / "pki/vomsdir"),
            "--workdir",
            str(work),
            "--mode",
            args.mode,
            "--account",
            "nobody",
            "--",
            "/bin/true",
        ]
        env = {"PATH": "/usr/bin:/bin"}
        timed(["/bin/true"], 3, env)
        timed(base, 3, env)  # warm caches
        plain = timed(["/bin/true"], args.runs, env)
        wrapped = timed(base, args.runs, env)
        library = in_process(args.mode, proxy, top, work, args.runs)
        floors = [
            (label, timed([sys.executable, *flags], args.runs, env)) for label, flags in FLOORS
        ]
    finally:
        shutil.rmtree(top, ignore_errors=True)
    rows = [
        ("/bin/true", plain),
        (f"payload-wrapper ({args.mode})", wrapped),
        (f"api.run_payload in-process ({args.mode})", library),
        *floors,
    ]
    print(f"{'command':38} {'runs':>5} {'median ms':>10} {'min ms':>8} {'max ms':>8}")
    for name, samples in rows:
        print(
            f"{name:38} {len(samples):5d} {statistics.median(samples):10.1f} "
            f"{min(samples):8.1f} {max(samples):8.1f}"
        )
    overhead = statistics.median(wrapped) - statistics.median(plain)
    verdict = "within" if overhead <= TARGET_MS else "OVER"
    print(f"median overhead: {overhead:.1f} ms ({verdict} the {TARGET_MS:.0f} ms target)")
    lib = statistics.median(library) - statistics.median(plain)
    print(f"median overhead in-process (what broker-pilot pays): {lib:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
