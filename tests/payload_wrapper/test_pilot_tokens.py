"""broker-pilot with bearer tokens, end to end: a token-only pilot, per-job access tokens.

The test plays the condor_starter (as in test_pilot.py) against a real `broker serve`
configured with a real authlib issuer on loopback. The pilot authenticates to the
broker with its own bearer token only (no certificate); the payload, running as
``nobody``, must find an access token of the job owner through BEARER_TOKEN_FILE
(mode 0600, owned by nobody), refreshed while it runs, and never the pilot's token.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from payload_wrapper.launcher import build_launcher
from tests.broker.tokens.issuer import TestIssuer
from tests.broker.tokens.test_token_e2e import broker_toml
from tests.broker.tokens.test_token_service import token_policy
from tests.brokerserver import RunningBroker, start_broker
from tests.payload_wrapper.conftest import needs_root
from tests.payload_wrapper.test_pilot import ALICE, job_ad
from tests.pkifixtures import GridPki, grid_pki  # noqa: F401 - fixture

pytestmark = [pytest.mark.root, needs_root]

PAYLOAD = """#!/bin/sh
# argv: MARKER [SLEEP]
echo "${BEARER_TOKEN_FILE:-unset}" > token_path.txt
echo "${BEARER_TOKEN:-unset}" > token_env.txt
stat -c '%u %a' "$BEARER_TOKEN_FILE" > token_stat.txt 2>&1
cat "$BEARER_TOKEN_FILE" > token1.txt 2>&1
if [ -n "$2" ]; then
    sleep "$2"
    cat "$BEARER_TOKEN_FILE" > token2.txt 2>&1
fi
touch "$1"
"""


@dataclass
class TokenSite:
    base: Path
    broker: RunningBroker
    issuer: TestIssuer
    ca_dir: Path
    workdir: Path
    payload: Path
    marks: Path
    launcher: Path
    pilot_token: str
    pilot_token_file: Path

    def config(self, **overrides: object) -> Path:
        values: dict[str, object] = {
            "broker_url": f"https://{self.broker.server}",
            "token_file": str(self.pilot_token_file),
            "ca_dir": str(self.ca_dir),
            "vomsdir": str(self.ca_dir),
            "allowed_owners": [ALICE],
            "workdir": str(self.workdir),
            "retrieve_attempts": 1,
            "job_token_issuer": "test",
            "job_token_scopes": ["compute.read"],
        }
        values.update(overrides)
        lines = [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        lines += [
            "[wrapper]",
            'mode = "setuid"',
            'account = "nobody"',
            'umask = "0022"',
            "kill_grace = 0.5",
            f'audit_log = "{self.base / "wrapper-audit.log"}"',
        ]
        path = self.base / f"pilot-{len(list(self.base.glob('pilot-*.toml')))}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path


def _public_dir(prefix: str, mode: int = 0o755) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(mode)
    return path


@pytest.fixture(scope="module")
def token_site(grid_pki: GridPki) -> Iterator[TokenSite]:  # noqa: F811 - fixture parameter
    issuer = TestIssuer(access_lifetime=4).start()
    base = _public_dir("pilot-token-site-")
    ca_dir = base / "certificates"
    shutil.copytree(grid_pki.ca_dir, ca_dir)
    for path in [ca_dir, *ca_dir.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    workdir = base / "work"
    workdir.mkdir(mode=0o755)
    marks = _public_dir("pilot-token-marks-", 0o1777)
    payload = base / "payload.sh"
    payload.write_text(PAYLOAD)
    payload.chmod(0o755)
    launcher = build_launcher(base / "broker-pilot")
    broker_dir = Path(tempfile.mkdtemp(prefix="pilot-token-broker-"))
    config = broker_toml(issuer, broker_dir)
    broker = start_broker(
        grid_pki,
        broker_dir / "srv",
        policy=token_policy(issuer.url),
        extra=("--config", str(config)),
    )
    pilot_token = issuer.mint(sub="glidein-42", groups=["/cms/pilots"], lifetime=3600)
    token_file = base / "pilot.token"
    token_file.write_text(pilot_token + "\n")
    token_file.chmod(0o600)
    try:
        alice = broker.client("alice")
        alice.delegate(
            alice.identity.load(), username="alice", now=datetime.now(UTC), max_proxy_hours=6
        )
        alice.call(
            "POST",
            "/v1/tokens/refresh-tokens",
            {
                "issuer": "test",
                "username": "alice",
                "refresh_token": issuer.issue_refresh_token(
                    "alice-sub", "offline_access compute.read storage.read:/"
                ),
                "scopes": ["offline_access", "compute.read", "storage.read:/"],
            },
        )
        yield TokenSite(
            base, broker, issuer, ca_dir, workdir, payload, marks, launcher, pilot_token, token_file
        )
    finally:
        broker.stop()
        issuer.stop()
        shutil.rmtree(broker_dir, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(marks, ignore_errors=True)


def run_as_starter(
    site: TokenSite, config: Path, ad_text: str, *args: str
) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    scratch = Path(tempfile.mkdtemp(prefix="scratch-", dir=site.base))
    (scratch / ".job.ad").write_text(ad_text)
    marker = site.marks / f"ran-{scratch.name}"
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "_CONDOR_JOB_AD": str(scratch / ".job.ad"),
        "_CONDOR_SCRATCH_DIR": str(scratch),
        "_CONDOR_JOB_IWD": str(scratch),
        "_CONDOR_WRAPPER_ERROR_FILE": str(scratch / ".wrapper_error"),
        "BROKER_PILOT_CONFIG": str(config),
        # the pilot's own token location must never reach the payload
        "BEARER_TOKEN_FILE": str(site.pilot_token_file),
        "BEARER_TOKEN": site.pilot_token,
    }
    result = subprocess.run(
        [str(site.launcher), str(site.payload), str(marker), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return result, marker, scratch


def _job_dir(site: TokenSite, before: list[Path]) -> Path:
    new = [d for d in sorted(site.workdir.glob("job-*")) if d not in before]
    assert len(new) == 1, new
    return new[0]


def test_token_only_pilot_places_a_job_token_for_the_payload(token_site: TokenSite) -> None:
    site = token_site
    before = sorted(site.workdir.glob("job-*"))
    ad = job_ad(
        cluster=301, extra='Environment = "BEARER_TOKEN=stolen BEARER_TOKEN_FILE=/tmp/elsewhere"'
    )
    result, marker, _ = run_as_starter(site, site.config(refresh_interval_seconds=1.5), ad, "5")
    assert result.returncode == 0, result.stderr
    assert marker.exists()
    job_dir = _job_dir(site, before)
    path = (job_dir / "token_path.txt").read_text().strip()
    assert path == str(job_dir / "proxy" / "bearer_token")
    assert (job_dir / "token_env.txt").read_text().strip() == "unset"
    nobody = int(
        subprocess.run(["id", "-u", "nobody"], capture_output=True, text=True, check=True).stdout
    )
    assert (job_dir / "token_stat.txt").read_text().split() == [str(nobody), "600"]
    first = (job_dir / "token1.txt").read_text().strip()
    second = (job_dir / "token2.txt").read_text().strip()
    assert first.count(".") == 2 and first != site.pilot_token
    assert second.count(".") == 2 and second not in (first, site.pilot_token)
    # the job's token is the owner's (alice-sub), with only the asked scope
    payload_claims = json.loads(_b64(first.split(".")[1]))
    assert payload_claims["sub"] == "alice-sub" and payload_claims["scope"] == "compute.read"
    # removed when the payload ends
    assert not (job_dir / "proxy" / "bearer_token").exists()
    assert "BEARER_TOKEN is not passed" in result.stderr


def test_scope_escalation_by_the_pilot_config_fails_closed(token_site: TokenSite) -> None:
    site = token_site
    before = sorted(site.workdir.glob("job-*"))
    config = site.config(job_token_scopes=["compute.modify"])
    result, marker, scratch = run_as_starter(site, config, job_ad(cluster=302))
    assert result.returncode != 0
    assert not marker.exists()
    error = (scratch / ".wrapper_error").read_text()
    assert "compute.modify" in error, error
    assert sorted(site.workdir.glob("job-*")) == before  # refused before any sandbox


def test_job_token_of_another_owner_is_refused(token_site: TokenSite) -> None:
    site = token_site
    bob = site.broker.client("bob")
    bob.call(
        "POST",
        "/v1/tokens/refresh-tokens",
        {
            "issuer": "test",
            "username": "carol",
            "refresh_token": site.issuer.issue_refresh_token("bob-sub", "compute.read"),
        },
    )
    # alice's job, submitted as "carol": the proxy is alice's, the token would be bob's
    config = site.config(bind_submitter=False)
    result, marker, scratch = run_as_starter(site, config, job_ad(cluster=304, submitter="carol"))
    assert result.returncode != 0 and not marker.exists()
    error = (scratch / ".wrapper_error").read_text()
    assert "belongs to /DC=org/DC=example/CN=Bob" in error, error


def _b64(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_pilot_token_file_must_be_private(token_site: TokenSite) -> None:
    site = token_site
    loose = site.base / "loose.token"
    loose.write_text(site.pilot_token)
    loose.chmod(0o644)
    result, marker, scratch = run_as_starter(
        site, site.config(token_file=str(loose)), job_ad(cluster=303)
    )
    assert result.returncode != 0 and not marker.exists()
    assert "loose.token" in (scratch / ".wrapper_error").read_text()
    os.unlink(loose)
