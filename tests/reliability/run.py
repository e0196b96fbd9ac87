"""Entry point of ``scripts/reliability``: run every category, print the table, exit 1 on failure.

    python -m tests.reliability.run [--short] [--only load,faults,...] [--keep] [--seed N]

The full run uses the sizes of docs/reliability.md; ``--short`` is the CI form
(about three minutes on two cores).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.reliability.harness import Outcome, launch, make_pki, myproxy_usable


@dataclass(frozen=True)
class Sizes:
    load_clients: int
    load_seconds: float
    kills: int
    fuzz_inputs: int
    rest_fuzz: int
    slow_connections: int


FULL = Sizes(
    load_clients=64,
    load_seconds=60,
    kills=20,
    fuzz_inputs=100_000,
    rest_fuzz=6_000,
    slow_connections=40,
)
SHORT = Sizes(
    load_clients=16, load_seconds=10, kills=3, fuzz_inputs=4_000, rest_fuzz=400, slow_connections=12
)
CATEGORIES = ("load", "faults", "fuzz", "attacks", "secrets")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/reliability",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--short", action="store_true", help="the CI form (about 3 minutes)")
    parser.add_argument(
        "--only",
        default=",".join(CATEGORIES),
        help=f"comma-separated subset of {','.join(CATEGORIES)}",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    only = {c.strip() for c in args.only.split(",") if c.strip()}
    unknown = only - set(CATEGORIES)
    if unknown:
        parser.error(f"unknown categories {sorted(unknown)}; choose from {CATEGORIES}")
    sizes = SHORT if args.short else FULL
    # The CI form repeats the same inputs (a fixed seed); the full run varies them.
    seed = args.seed if args.seed is not None else (1 if args.short else int(time.time()))
    rng = random.Random(seed)
    base = Path(tempfile.mkdtemp(prefix="broker-reliability-"))
    os.chmod(base, 0o755)
    started = time.monotonic()
    print(
        f"reliability: {'short' if args.short else 'full'} run, seed {seed}, work dir {base}",
        flush=True,
    )
    outcomes: list[Outcome] = []
    keys: list[bytes] = []  # decrypted stored keys, for the secrets scan
    mp_problem = myproxy_usable()
    if mp_problem:
        print(f"reliability: the MyProxy endpoint is NOT covered: {mp_problem}", flush=True)
    try:
        pki = make_pki(base / "pki")

        def step(name: str, body: Callable[[Outcome], None]) -> None:
            outcome = Outcome(name)
            outcomes.append(outcome)
            t0 = time.monotonic()
            print(f"reliability: {name} ...", flush=True)
            try:
                body(outcome)
            except Exception as exc:  # a harness failure is a failed category, not a crash
                outcome.fail(f"harness error: {type(exc).__name__}: {exc}")
                traceback.print_exc()
            outcome.seconds = time.monotonic() - t0
            print(
                f"reliability: {name}: {outcome.verdict} ({outcome.tried} tried, "
                f"{outcome.failed} failed, {outcome.seconds:.1f} s)",
                flush=True,
            )

        if "load" in only:
            from tests.reliability.load import run_load

            def load(outcome: Outcome) -> None:
                broker, mp_port = launch(pki, base / "load", myproxy=not mp_problem)
                try:
                    run_load(
                        broker,
                        mp_port,
                        clients=sizes.load_clients,
                        seconds=sizes.load_seconds,
                        outcome=outcome,
                    )
                finally:
                    broker.stop()
                if mp_problem:
                    outcome.note("REST only: " + mp_problem)

            step("load: REST + MyProxy" if not mp_problem else "load: REST only", load)
        if "faults" in only:
            from tests.reliability import faults

            step(
                "faults: kill -9 server",
                lambda o: faults.kill_rounds(
                    pki,
                    base,
                    rounds=sizes.kills,
                    mode="server",
                    myproxy=not mp_problem,
                    outcome=o,
                    keys_out=keys,
                    rng=rng,
                ),
            )
            step(
                "faults: kill -9 worker",
                lambda o: faults.kill_rounds(
                    pki,
                    base,
                    rounds=sizes.kills,
                    mode="worker",
                    myproxy=not mp_problem,
                    outcome=o,
                    keys_out=keys,
                    rng=rng,
                ),
            )
            step("faults: PostgreSQL stopped", lambda o: faults.postgres_outage(pki, base, o, rng))
            step("faults: disk full (SQLite)", lambda o: faults.disk_full(pki, base, o))
        if "fuzz" in only:
            from tests.reliability import fuzz

            step(
                "fuzz: parsers",
                lambda o: fuzz.fuzz_parsers(pki, sizes.fuzz_inputs, rng, o, myproxy=not mp_problem),
            )
            step(
                "fuzz: REST JSON bodies",
                lambda o: fuzz.fuzz_rest(pki, base, sizes.rest_fuzz, rng, o),
            )
        if "attacks" in only:
            from tests.reliability import attacks

            for name, body in attacks.all_attacks(pki, base, sizes, rng, myproxy=not mp_problem):
                step(f"attack: {name}", body)
        if "secrets" in only:
            from tests.reliability.secrets_scan import scan

            step("secrets at rest and in logs", lambda o: scan(pki, base, keys, o))
    finally:
        total = time.monotonic() - started
        _table(outcomes, total)
        if args.keep:
            print(f"reliability: kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    bad = [o for o in outcomes if o.verdict != "PASS"]
    return 1 if bad or not outcomes else 0


def _table(outcomes: list[Outcome], total: float) -> None:
    print("\n" + "=" * 100)
    for outcome in outcomes:
        if outcome.notes or outcome.skipped:
            print(f"-- {outcome.category}")
            if outcome.skipped:
                print(f"   not run: {outcome.skipped}")
            for note in outcome.notes:
                print(f"   {note}")
    print("=" * 100)
    head = f"{'category':<44} {'tried':>9} {'accepted/failed':>16} {'time s':>8}  verdict"
    print(head)
    print("-" * len(head))
    for o in outcomes:
        print(f"{o.category:<44} {o.tried:>9} {o.failed:>16} {o.seconds:>8.1f}  {o.verdict}")
    print("-" * len(head))
    verdict = "PASS" if outcomes and all(o.verdict == "PASS" for o in outcomes) else "FAIL"
    print(
        f"{'overall':<44} {sum(o.tried for o in outcomes):>9} "
        f"{sum(o.failed for o in outcomes):>16} {total:>8.1f}  {verdict}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
