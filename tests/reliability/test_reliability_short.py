"""CI entry of the reliability suite: ``scripts/reliability --short`` must pass.

It runs as a subprocess (it starts brokers, a PostgreSQL cluster, a tmpfs, and
uses SIGALRM) with a hard time limit; its summary table is shown on failure.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.prerequisites import needs_root

REPO = Path(__file__).resolve().parents[2]
LIMIT_S = 480  # the short run takes about three to four minutes on two cores (more when loaded)


@needs_root  # tmpfs, identity switch
def test_reliability_short_run() -> None:
    started = time.monotonic()
    done = subprocess.run(
        [str(REPO / "scripts" / "reliability"), "--short"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=LIMIT_S,
    )
    elapsed = time.monotonic() - started
    table = (
        done.stdout[done.stdout.rfind("=" * 100) :]
        if "=" * 100 in done.stdout
        else done.stdout[-6000:]
    )
    assert done.returncode == 0, (
        f"scripts/reliability --short failed:\n{table}\n{done.stderr[-3000:]}"
    )
    assert elapsed < LIMIT_S
