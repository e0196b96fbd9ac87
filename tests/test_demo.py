"""The README's first quick-start command must keep working: run scripts/demo as a user would."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_demo_runs_end_to_end_and_leaves_nothing() -> None:
    before = set(Path("/tmp").glob("broker-demo.*"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("X509_")}
    result = subprocess.run(
        [str(REPO / "scripts" / "demo")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    # no right on the credential: the not-found answer (exit 4), as for a missing one
    assert "(refused as expected, exit 4)" in out
    # two jobs ran, each with its owner's proxy, their outputs handed back into the
    # scratch dirs (the slot user's)
    assert out.count("output.txt (handed back into the scratch dir, owned by ") == 2
    assert "input   : events of alice" in out and "input   : events of bob" in out
    # a job's proxy names its job
    assert "job id   : demo#0.0" in out
    assert "proxy   : /DC=org/DC=example/CN=Alice/CN=" in out
    assert "proxy   : /DC=org/DC=example/CN=Bob/CN=" in out
    # the audit trail names the pilot, its FQAN and both jobs
    assert "job=submit.example.org#1.0#1700000000" in out
    assert "job=submit.example.org#2.0#1700000000" in out
    assert "/DC=org/DC=example/CN=pilot (/atlas/Role=pilot/Capability=NULL)" in out
    # nothing left behind: no temp dir, no throwaway account
    assert set(Path("/tmp").glob("broker-demo.*")) == before
    for user in ("bdemo-slot", "bdemopool01", "bdemopool02"):
        assert subprocess.run(["id", user], capture_output=True).returncode != 0
