"""Two broker nodes on one PostgreSQL database, as a site runs them.

Both nodes (``broker serve``, 2 gunicorn workers each, every node with its own
state directory and its *own copy* of the master key file) are started at the
same moment on an empty database, so both run the schema migration at once.
Then everything that must hold across nodes is exercised: a delegation started
on A and finished on B, retrieval, renewal (challenge from A, answer to B),
destruction, the passphrase throttle, the staged key rotation, and node A
killed mid-run while clients that know both nodes keep delegating.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.client import BrokerClient, ClientIdentity
from broker.errors import AuthenticationError, BrokerError, NotFound, TooManyAttempts
from broker.pki.loading import chain_to_pem
from broker.pki.proxy import csr_to_pem, generate_key, load_csr, make_csr, new_proxy, sign_request
from broker.service import sign_challenge
from broker.store import init_master_key_file
from tests.brokerserver import RunningBroker, launch_broker, wait_ready
from tests.pgcluster import PostgresCluster
from tests.pkifixtures import GridPki

pytestmark = pytest.mark.postgres


@dataclass
class Nodes:
    a: RunningBroker
    b: RunningBroker
    keys: dict[str, Path]
    database_url: str
    pki: GridPki

    def client(self, who: str, *nodes: RunningBroker) -> BrokerClient:
        servers = ",".join(n.server for n in nodes)
        identity = ClientIdentity(
            cert=str(self.pki.cert_path(who)), key=str(self.pki.key_path(who))
        )
        return BrokerClient(servers, identity, ca_dir=str(self.pki.ca_dir))

    def broker(self, node: str, *args: str) -> subprocess.CompletedProcess[str]:
        """``broker ARGS`` as an operator on ``node`` runs it (its key file, the shared DB)."""
        return subprocess.run(
            [
                *self.a.broker_cmd(*args),
                "--state-dir",
                str(self.keys[node].parent),
                "--database-url",
                self.database_url,
                "--master-key-file",
                str(self.keys[node]),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def copy_key_file(self, source: str, target: str) -> None:
        """What scp/config management does: replace the target node's file (0600)."""
        temp = self.keys[target].with_suffix(".new")
        shutil.copyfile(self.keys[source], temp)
        os.chmod(temp, 0o600)
        os.replace(temp, self.keys[target])


@pytest.fixture
def nodes(grid_pki: GridPki, postgres_database: str, tmp_path: Path) -> Iterator[Nodes]:
    keys: dict[str, Path] = {}
    for node in ("a", "b"):
        (tmp_path / node / "keys").mkdir(parents=True)
        keys[node] = tmp_path / node / "keys" / "master.key"
    init_master_key_file(keys["a"], now=datetime.now(UTC))
    shutil.copyfile(keys["a"], keys["b"])
    os.chmod(keys["b"], 0o600)
    started = [
        launch_broker(
            grid_pki,
            tmp_path / node,
            database_url=postgres_database,
            extra=("--master-key-file", str(keys[node])),
            new_session=True,
        )
        for node in ("a", "b")
    ]
    try:
        for broker in started:
            wait_ready(broker, timeout=60)
        yield Nodes(started[0], started[1], keys, postgres_database, grid_pki)
    finally:
        for broker in started:
            broker.stop()


def _delegate(client: BrokerClient, pki: GridPki, name: str, **kw: object) -> dict[str, object]:
    return client.delegate(
        pki.load("alice"),
        username="alice",
        name=name,
        now=datetime.now(UTC),
        **kw,  # type: ignore[arg-type]
    )


def test_nodes_started_at_once_share_delegation_renewal_and_destruction(nodes: Nodes) -> None:
    pki = nodes.pki
    alice_a, alice_b = nodes.client("alice", nodes.a), nodes.client("alice", nodes.b)
    pilot_a, pilot_b = nodes.client("pilot", nodes.a), nodes.client("pilot", nodes.b)

    # Delegate on A, retrieve on B.
    _delegate(alice_a, pki, "default")
    _, result = pilot_b.retrieve(username="alice", job_id="two-nodes.1")
    assert result["owner"] == "/DC=org/DC=example/CN=Alice"

    # A delegation begun on A (key pair made there) is completed on B.
    started = alice_a.call(
        "POST",
        "/v1/delegations",
        {
            "username": "alice",
            "name": "split",
            "stored_hours": 24,
            "max_proxy_hours": 12,
            "retrievers": [],
            "trusted_retrievers": [],
            "renewers": [],
            "description": None,
        },
    )
    chain = sign_request(
        pki.load("alice"),
        load_csr(started["csr"].encode()),
        now=datetime.now(UTC),
        lifetime=timedelta(hours=24),
    )
    alice_b.call("PUT", f"/v1/delegations/{started['id']}", {"chain": chain_to_pem(chain).decode()})
    pilot_a.retrieve(username="alice", name="split")

    # Renewal: the challenge comes from A, the signed answer goes to B.
    old = new_proxy(pki.load("alice"), now=datetime.now(UTC), lifetime=timedelta(hours=1))
    challenge = pilot_a.call("GET", "/v1/renewals/challenge")["challenge"]
    renewed = pilot_b.call(
        "POST",
        "/v1/renewals",
        {
            "csr": csr_to_pem(make_csr(generate_key("ec"))).decode(),
            "name": "default",
            "username": "alice",
            "challenge": challenge,
            "authz_chain": chain_to_pem(old.chain).decode(),
            "signature": base64.b64encode(sign_challenge(old.key, challenge.encode())).decode(),
        },
    )
    assert renewed["owner"] == "/DC=org/DC=example/CN=Alice"

    # Destroyed on B: gone on A too.
    alice_b.destroy(username="alice", name="split")
    with pytest.raises(NotFound):
        pilot_a.retrieve(username="alice", name="split")


def test_passphrase_throttle_counts_across_nodes(nodes: Nodes) -> None:
    alice_a, alice_b = nodes.client("alice", nodes.a), nodes.client("alice", nodes.b)
    _delegate(alice_a, nodes.pki, "locked", passphrase="correct horse")
    for attempt in range(5):  # the default limit, spread over both nodes
        client = alice_a if attempt % 2 else alice_b
        with pytest.raises(AuthenticationError) as err:
            client.retrieve(
                username="alice", name="locked", passphrase=f"guess {attempt}", key_type="ec"
            )
        assert not isinstance(err.value, TooManyAttempts)
    with pytest.raises(TooManyAttempts):
        alice_a.retrieve(username="alice", name="locked", passphrase="correct horse", key_type="ec")


def test_staged_key_rotation_with_a_key_file_per_node(nodes: Nodes) -> None:
    pki = nodes.pki
    alice_a, alice_b = nodes.client("alice", nodes.a), nodes.client("alice", nodes.b)
    pilots = (nodes.client("pilot", nodes.a), nodes.client("pilot", nodes.b))
    _delegate(alice_a, pki, "before")

    def retrievable(*names: str) -> None:
        for pilot in pilots:
            for name in names:
                pilot.retrieve(username="alice", name=name, key_type="ec")

    status = nodes.broker("a", "keys", "status", "--json")
    assert status.returncode == 0, status.stderr
    (old,) = json.loads(status.stdout)
    assert old["active"] and old["rows"] == 1

    # 1. add (standby) on A, copy to B.
    added = nodes.broker("a", "keys", "add")
    assert added.returncode == 0, added.stderr
    new_id = added.stdout.split()[1]
    nodes.copy_key_file("a", "b")
    # 2. activate on A; B has not got the file yet and keeps wrapping with the old key.
    assert nodes.broker("a", "keys", "activate", new_id).returncode == 0
    _delegate(alice_a, pki, "on-a-new-key")
    _delegate(alice_b, pki, "on-b-old-key")
    retrievable("before", "on-a-new-key", "on-b-old-key")
    nodes.copy_key_file("a", "b")
    # The old key cannot be retired while rows use it.
    refused = nodes.broker("a", "keys", "retire", old["id"])
    assert refused.returncode != 0 and "still wrapped" in refused.stderr
    # 3. rewrap (one node), 4. retire, copy.
    rewrap = nodes.broker("b", "keys", "rewrap")
    assert rewrap.returncode == 0 and "rewrapped 2 row(s)" in rewrap.stdout, rewrap
    status = json.loads(nodes.broker("b", "keys", "status", "--json").stdout)
    assert {(k["id"], k["active"], k["rows"]) for k in status} == {
        (old["id"], False, 0),
        (new_id, True, 3),
    }
    retired = nodes.broker("a", "keys", "retire", old["id"])
    assert retired.returncode == 0, retired.stderr
    nodes.copy_key_file("a", "b")
    _delegate(alice_b, pki, "after")
    retrievable("before", "on-a-new-key", "on-b-old-key", "after")
    text = nodes.broker("b", "keys", "status")
    assert new_id in text.stdout and "active" in text.stdout and old["id"] not in text.stdout


def test_node_killed_mid_run_clients_fail_over_and_lose_no_acknowledged_delegation(
    nodes: Nodes,
) -> None:
    pki = nodes.pki
    owner = nodes.client("alice", nodes.a, nodes.b)  # A first, B when A fails
    acknowledged: list[str] = []
    failed: list[str] = []
    stop = threading.Event()

    def delegate_loop() -> None:
        i = 0
        while not stop.is_set():
            name = f"d{i}"
            i += 1
            try:
                _delegate(owner, pki, name, stored_hours=24)
            except BrokerError as exc:
                failed.append(f"{name}: {exc.message}")
            else:
                acknowledged.append(name)

    worker = threading.Thread(target=delegate_loop)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while len(acknowledged) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        before_kill = len(acknowledged)
        os.killpg(nodes.a.process.pid, signal.SIGKILL)  # the node and its workers
        nodes.a.process.wait(timeout=10)
        # A killed node cannot remove its metrics directory; the test does.
        found = re.search(
            r"metrics of every process are summed from (/\S+)", nodes.a.log.read_text()
        )
        if found:
            shutil.rmtree(found.group(1), ignore_errors=True)
        deadline = time.monotonic() + 60
        while len(acknowledged) < before_kill + 5 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(timeout=120)
    assert before_kill >= 5 and len(acknowledged) >= before_kill + 5, (acknowledged, failed)
    assert (owner.host, owner.port) == ("localhost", nodes.b.port)
    # At most the delegation in flight at the kill may have failed (and was not acknowledged).
    assert len(failed) <= 1, failed
    pilot = nodes.client("pilot", nodes.a, nodes.b)
    for name in acknowledged:
        pilot.retrieve(username="alice", name=name, key_type="ec")


def test_backup_and_restore_then_retrieve(
    nodes: Nodes, postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """The procedure of docs/deployment.md: pg_dump -Fc of the live database, pg_restore
    into an empty one, a node started on it with the same key file serves the credential."""
    _delegate(nodes.client("alice", nodes.a), nodes.pki, "kept")
    dump = tmp_path / "broker.dump"
    source = nodes.database_url.rsplit("/", 1)[1]
    connection = ["-h", "127.0.0.1", "-p", str(postgres_cluster.port), "-U", postgres_cluster.user]
    done = subprocess.run(
        [
            str(postgres_cluster.bindir / "pg_dump"),
            *connection,
            "-Fc",
            "-d",
            source,
            "-f",
            str(dump),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    target = f"r_{source[2:]}"
    restored_url = postgres_cluster.create_database(target)
    try:
        done = subprocess.run(
            [
                str(postgres_cluster.bindir / "pg_restore"),
                *connection,
                "--no-owner",
                "-d",
                target,
                str(dump),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        restored = launch_broker(
            nodes.pki,
            tmp_path / "restored",
            database_url=restored_url,
            extra=("--master-key-file", str(nodes.keys["a"])),
            workers=1,
        )
        try:
            wait_ready(restored, timeout=60)
            with restored.client("pilot") as pilot:
                _, result = pilot.retrieve(username="alice", name="kept", key_type="ec")
            assert result["owner"] == "/DC=org/DC=example/CN=Alice"
        finally:
            restored.stop()
    finally:
        postgres_cluster.drop_database(target)
