"""Site policy end to end over a real `broker serve`: FQAN rules, forged ACs, hot reload."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.devpki import OWNERS_RULE, policy_rule
from broker.errors import AuthenticationError, NotFound
from broker.pki.devca import VOMS_DN, issue_certificate, make_ca
from broker.pki.loading import Credential
from broker.pki.proxy import new_proxy
from broker.pki.voms import make_ac_extension
from tests.brokerserver import RunningBroker, start_broker
from tests.pkifixtures import GridPki, write_proxy_file

ALICE = "/DC=org/DC=example/CN=Alice"
PILOT_FQAN = "/atlas/Role=pilot"

# Only the FQAN admits pilots here: a plain pilot certificate must be refused.
FQAN_POLICY = OWNERS_RULE + policy_rule(
    "atlas pilots retrieve", "retrieve", ["fqan:/atlas/Role=pilot"], auth=["certificate"]
)

BOB_RULE = policy_rule(
    "bob retrieves too", "retrieve", ["/DC=org/DC=example/CN=Bob"], auth=["certificate"]
)


def _voms_proxy(pki: GridPki, who: str, signer: Credential, path: Path) -> Path:
    holder = pki.load(who)
    now = datetime.now(UTC)
    ext = make_ac_extension(
        holder.cert,
        signer,
        vo="atlas",
        fqans=[PILOT_FQAN],
        uri="voms.example.org:15001",
        now=now,
        lifetime=timedelta(hours=2),
    )
    proxy = new_proxy(holder, now=now, lifetime=timedelta(hours=2), extra_extensions=[ext])
    return write_proxy_file(path, proxy)


def _audit(broker: RunningBroker, *args: str) -> list[dict[str, object]]:
    out = subprocess.run(
        broker.broker_cmd(
            "audit",
            "--state-dir",
            str(broker.state_dir),
            "--database-url",
            broker.database_url,
            "--json",
            *args,
        ),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows: list[dict[str, object]] = json.loads(out)
    return rows


def _delegate_alice(broker: RunningBroker) -> None:
    client = broker.client("alice")
    client.delegate(client.identity.load(), username="alice", now=datetime.now(UTC))


@pytest.fixture
def fqan_broker(grid_pki: GridPki, tmp_path: Path) -> Iterator[RunningBroker]:
    broker = start_broker(grid_pki, tmp_path / "srv", policy=FQAN_POLICY)
    try:
        _delegate_alice(broker)
        yield broker
    finally:
        broker.stop()


def test_pilots_with_the_fqan_retrieve(fqan_broker: RunningBroker, tmp_path: Path) -> None:
    voms = fqan_broker.pki.load("voms")
    for pilot in ("pilot", "pilot2"):
        path = _voms_proxy(fqan_broker.pki, pilot, voms, tmp_path / f"{pilot}.pem")
        _, result = fqan_broker.proxy_client(path).retrieve(
            username="alice", job_id=f"fqan-{pilot}"
        )
        assert result["owner"] == ALICE
        rows = _audit(fqan_broker, "--job-id", f"fqan-{pilot}")
        assert [(r["decision"], r["requester"]) for r in rows] == [
            ("allow", f"/DC=org/DC=example/CN={pilot}")
        ]
        assert any("Role=pilot" in f for f in rows[0]["requester_fqans"])  # type: ignore[attr-defined]
        assert "atlas pilots retrieve" in str(rows[0]["reason"])


def test_pilot_without_the_fqan_is_refused(fqan_broker: RunningBroker) -> None:
    # no right: the answer for a missing credential; the audit row says why (issue 18)
    with pytest.raises(NotFound) as err:
        fqan_broker.client("pilot").retrieve(username="alice", job_id="no-fqan")
    assert err.value.reason == "not_found"
    rows = _audit(fqan_broker, "--job-id", "no-fqan")
    assert [(r["decision"], r["requester"]) for r in rows] == [
        ("deny", "/DC=org/DC=example/CN=pilot")
    ]
    assert str(rows[0]["reason"]).startswith("no_matching_rule")


def test_forged_acs_are_refused_and_audited(
    fqan_broker: RunningBroker, grid_pki: GridPki, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    rogue_ca = make_ca(now=now, dn="/DC=org/DC=rogue/CN=Rogue CA")
    rogue_voms = issue_certificate(rogue_ca, VOMS_DN, now=now, kind="host")
    rogue = Credential(chain=(rogue_voms.cert, rogue_ca.cert), key=rogue_voms.key)
    # the real VOMS certificate, but the AC signed with bob's key
    bob_key = grid_pki.load("bob").key
    stolen_name = Credential(chain=grid_pki.load("voms").chain, key=bob_key)
    for label, signer, reason in (
        ("rogue", rogue, "untrusted_signer"),
        ("bobkey", stolen_name, "bad_ac_signature"),
    ):
        path = _voms_proxy(grid_pki, "pilot", signer, tmp_path / f"{label}.pem")
        with pytest.raises(AuthenticationError) as err:
            fqan_broker.proxy_client(path).retrieve(username="alice", job_id=f"forged-{label}")
        assert err.value.reason == reason, err.value.message
        rows = [
            r
            for r in _audit(fqan_broker, "--action", "authenticate")
            if str(r["reason"]).startswith(reason)
        ]
        assert len(rows) == 1, rows
        assert rows[0]["decision"] == "deny"
        assert rows[0]["requester"] == "/DC=org/DC=example/CN=pilot"
    # nothing was issued to the forgers
    assert _audit(fqan_broker, "--job-id", "forged-rogue") == []
    assert all(
        r["decision"] != "allow" or r["requester"] != "/DC=org/DC=example/CN=pilot"
        for r in _audit(fqan_broker, "--action", "retrieve")
    )


def _wait_for(check: object, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.5)
    return False


def test_policy_hot_reload(grid_pki: GridPki, tmp_path: Path) -> None:
    broker = start_broker(grid_pki, tmp_path / "srv", policy=FQAN_POLICY)
    try:
        _delegate_alice(broker)
        bob = broker.client("bob")
        with pytest.raises(NotFound):
            bob.retrieve(username="alice")
        policy_file = broker.policy_dir / "10-test.toml"

        # an edit that allows bob takes effect without a restart (looks every 2 s, applies
        # a change once it has stayed the same for 5 s)
        policy_file.write_text(FQAN_POLICY + BOB_RULE)

        def bob_allowed() -> bool:
            try:
                bob.retrieve(username="alice")
            except NotFound:
                return False
            return True

        started = time.monotonic()
        assert _wait_for(bob_allowed), "the edited policy never took effect"
        assert time.monotonic() - started < 12

        # a broken file is logged and the last good policy (bob allowed) stays in force
        (broker.policy_dir / "20-broken.toml").write_text("[[rule]\nname = 'oops'\n")

        def error_logged() -> bool:
            bob.retrieve(username="alice")  # each request may trigger the reload check
            return "keeping the last good policy" in broker.log.read_text()

        assert _wait_for(error_logged), broker.log.read_text()[-2000:]
        assert "20-broken.toml" in broker.log.read_text()
        _, result = bob.retrieve(username="alice")
        assert result["owner"] == ALICE
        assert broker.process.poll() is None
    finally:
        broker.stop()
