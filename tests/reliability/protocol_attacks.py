"""Issue 18/19 server-side cases: abuse of the protocol by parties that authenticate (or
do not) but should get no further than their rights.

Each case counts what it tried; "failed" is anything that got through. One broker with
two gunicorn workers and ``username_binding = "dn"`` serves the REST cases (so state that
must be shared between workers is tested as such); the rest run the service in-process
on a real SQLite store with a movable clock, which keeps every case to a few seconds.
"""

from __future__ import annotations

import base64
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from broker.delegation import DelegationOptions
from broker.devpki import DEV_POLICY, OWNERS_RULE, policy_rule
from broker.errors import BrokerError, ConfigError
from broker.pki.loading import chain_to_pem
from broker.pki.proxy import (
    ProxyType,
    csr_to_pem,
    generate_key,
    load_csr,
    make_csr,
    new_proxy,
    sign_request,
)
from broker.policy import load_policy
from broker.service import (
    BrokerService,
    Requester,
    ServiceConfig,
    sign_challenge,
)
from broker.store import MasterKeyRing, Store, default_sqlite_url, load_master_keys, migrate
from tests.brokerserver import RunningBroker
from tests.pkifixtures import GridPki, write_proxy_file
from tests.reliability.harness import Outcome, launch

PASS = "sesame-open-123"


class _Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def _csr() -> bytes:
    return csr_to_pem(make_csr(generate_key("ec")))


def attacks(pki: GridPki, base: Path) -> Iterator[tuple[str, Callable[[Outcome], None]]]:
    state: dict[str, Any] = {}
    work = base / "protocol"

    def broker() -> RunningBroker:
        if "broker" not in state:
            work.mkdir(parents=True, exist_ok=True)
            b, _ = launch(pki, work / "server", workers=2, extra=("--username-binding", "dn"))
            state["broker"] = b
            alice = b.client("alice")
            now = datetime.now(UTC)
            alice.delegate(alice.identity.load(), username="alice", now=now)
            alice.delegate(
                alice.identity.load(), username="alice", name="pp", now=now, passphrase=PASS
            )
        b = state["broker"]
        assert isinstance(b, RunningBroker)
        return b

    def local(policy: str = DEV_POLICY, **config: Any) -> tuple[BrokerService, _Clock]:
        place = work / f"local-{len(state)}"
        state[str(place)] = True
        url = default_sqlite_url(place)
        migrate(url)
        clock = _Clock()
        store = Store(url, MasterKeyRing.generate(now=datetime.now(UTC)))
        state.setdefault("stores", []).append(store)
        svc = BrokerService(
            store,
            pki.trust,
            lambda: load_policy({"p.toml": policy}),
            clock=clock,
            config=ServiceConfig(**config),
        )
        return svc, clock

    def who(svc: BrokerService, name: str) -> Requester:
        return svc.authenticate_chain(list(pki.user(name).chain))

    def delegate(svc: BrokerService, name: str = "default", passphrase: str | None = None) -> None:
        alice = who(svc, "alice")
        pending = svc.start_delegation(alice, DelegationOptions(username="alice", name=name))
        chain = sign_request(
            pki.user("alice"),
            load_csr(pending.csr_pem),
            now=svc.now(),
            lifetime=timedelta(hours=24),
        )
        svc.finish_delegation(alice, pending.id, chain_to_pem(chain), passphrase=passphrase)

    # ------------------------------------------------------------------ issue 19

    def pending_flood(outcome: Outcome) -> None:
        b = broker()
        alice = b.client("alice")
        accepted = refused = 0
        for i in range(15):
            outcome.tried += 1
            try:
                alice.call("POST", "/v1/delegations", {"username": "alice", "name": f"f{i}"})
                accepted += 1
            except BrokerError as exc:
                if exc.reason != "too_many_pending":
                    outcome.fail(f"pending #{i}: unexpected refusal {exc.reason}")
                refused += 1
        outcome.note(
            f"15 delegations started in a row by one user: {accepted} accepted, "
            f"{refused} refused with 429 too_many_pending"
        )
        if accepted > 10:
            outcome.fail(f"{accepted} pending delegations for one user (cap 10)")
        # a limited proxy is refused before any key is made
        proxy = write_proxy_file(
            work / "alice-limited.pem",
            new_proxy(
                pki.load("alice"),
                now=datetime.now(UTC),
                lifetime=timedelta(hours=1),
                proxy_type=ProxyType.LIMITED,
            ),
        )
        early = 0
        for i in range(5):
            outcome.tried += 1
            try:
                b.proxy_client(proxy).call(
                    "POST", "/v1/delegations", {"username": "alice", "name": f"lim{i}"}
                )
                outcome.fail("ACCEPTED a delegation started with a limited proxy")
            except BrokerError as exc:
                if exc.reason != "limited_requester":
                    outcome.fail(f"limited proxy refused with {exc.reason}, not early")
                else:
                    early += 1
        outcome.note(
            f"5 delegations started with a limited proxy: {early} refused at once "
            "(limited_requester)"
        )

    def pending_purge(outcome: Outcome) -> None:
        svc, clock = local()
        for user in ("alice", "bob"):
            requester = who(svc, user)
            for i in range(8):
                svc.start_delegation(requester, DelegationOptions(username=user, name=f"p{i}"))
        clock.now += timedelta(minutes=11)
        purged = svc.maintain()["pending"]
        outcome.tried += 16
        left = svc.store.master_key_ids_in_use()
        outcome.note(
            f"16 expired pending delegations: {purged} purged by housekeeping, "
            f"{sum(left.values())} encrypted keys left; "
            f"metrics counter pending_purged={svc.counters()['pending_purged']}"
        )
        if purged != 16 or sum(left.values()) != 0 or svc.counters()["pending_purged"] != 16:
            outcome.fail("expired pending delegations were not all purged and counted")

    def database_mode(outcome: Outcome) -> None:
        place = work / "outside-state"
        old = os.umask(0o022)
        try:
            url = f"sqlite:///{place / 'custom.db'}"
            migrate(url)
        finally:
            os.umask(old)
        mode = (place / "custom.db").stat().st_mode & 0o777
        outcome.tried += 1
        outcome.note(f"--database-url sqlite:///elsewhere created with mode {mode:04o}")
        if mode & 0o077:
            outcome.fail(f"a new database file outside the state dir is {mode:04o}")

    # ------------------------------------------------------------------ issue 18

    def renewal_replay(outcome: Outcome) -> None:
        b = broker()
        pilot = b.client("pilot")
        old = new_proxy(pki.load("alice"), now=datetime.now(UTC), lifetime=timedelta(hours=1))
        assert old.key is not None
        ok = 0
        for _ in range(6):  # fresh challenges; the two workers answer in turn
            outcome.tried += 1
            try:
                pilot.renew(old, username="alice", lifetime_hours=1)
                ok += 1
            except BrokerError as exc:
                outcome.fail(f"a fair renewal failed across workers: {exc.reason}")
        challenge = pilot.call("GET", "/v1/renewals/challenge")["challenge"]
        body = {
            "csr": _csr().decode(),
            "challenge": challenge,
            "username": "alice",
            "authz_chain": chain_to_pem(old.chain).decode(),
            "signature": base64.b64encode(sign_challenge(old.key, challenge.encode())).decode(),
        }
        replays = 0
        for i in range(6):
            outcome.tried += 1
            try:
                pilot.call("POST", "/v1/renewals", {**body, "csr": _csr().decode()})
                if i > 0:
                    replays += 1
            except BrokerError as exc:
                if i == 0:
                    outcome.fail(f"the first answer to a challenge failed: {exc.reason}")
        outcome.note(
            f"{ok}/6 renewals with fresh challenges over 2 workers; the same "
            f"challenge + signature replayed 5 times: {replays} accepted"
        )
        if replays:
            outcome.fail(f"ACCEPTED {replays} replayed renewal challenges")

    def renewal_caps(outcome: Outcome) -> None:
        policy = (
            '[groups]\npilots = ["/DC=org/DC=example/CN=pilot*"]\n\n'
            + OWNERS_RULE
            + '[[rule]]\nname = "pilots retrieve limited"\naction = "retrieve"\n'
            'effect = "allow"\nrequester = ["group:pilots"]\nauth = ["certificate"]\n'
            'max_lifetime = "1h"\nlimited = true\n\n'
            + policy_rule("renewal by pilots", "renew", ["group:pilots"])
        )
        svc, _ = local(policy)
        delegate(svc)
        pilot = who(svc, "pilot")
        retrieved = svc.retrieve(pilot, csr_pem=_csr(), username="alice")
        old = new_proxy(pki.user("alice"), now=svc.now(), lifetime=timedelta(hours=1))
        challenge = svc.renewal_challenge(pilot)
        renewed = svc.renew(
            pilot,
            csr_pem=_csr(),
            challenge=challenge,
            authz_chain_pem=chain_to_pem(old.chain),
            signature=sign_challenge(old.key, challenge.encode()),
            username="alice",
            lifetime=timedelta(hours=12),
        )
        outcome.tried += 1
        outcome.note(
            f"retrieval: limited={retrieved.limited} {retrieved.lifetime}; renewal "
            f"asking 12 h: limited={renewed.limited} {renewed.lifetime}"
        )
        if not renewed.limited or renewed.lifetime > retrieved.lifetime:
            outcome.fail("renewal yielded more than retrieval by the same pilot")

    def passphrase_race(outcome: Outcome) -> None:
        b = broker()
        barrier = threading.Barrier(32)

        def rest_guess(i: int) -> str:
            client = b.client("bob")
            barrier.wait()
            try:
                client.retrieve(username="alice", name="pp", passphrase=f"wrong-guess-{i}")
            except BrokerError as exc:
                return exc.reason
            return "accepted"

        with ThreadPoolExecutor(32) as pool:
            rest = list(pool.map(rest_guess, range(32)))
        tried_rest = rest.count("invalid_passphrase")
        outcome.tried += 32
        # the MyProxy endpoint's path (authorize_retrieval) in-process: 100 at once
        svc, _ = local()
        delegate(svc, "pp", PASS)
        guesser = Requester(dn=None, endpoint="myproxy", client_address="192.0.2.77")
        gate = threading.Barrier(100)

        def wire_guess(i: int) -> str:
            gate.wait()
            try:
                svc.authorize_retrieval(
                    guesser, username="alice", name="pp", passphrase=f"wrong-guess-{i}"
                )
            except BrokerError as exc:
                return exc.reason
            return "accepted"

        with ThreadPoolExecutor(100) as pool:
            wire = list(pool.map(wire_guess, range(100)))
        tried_wire = wire.count("invalid_passphrase")
        outcome.tried += 100
        outcome.note(
            f"concurrent wrong passphrases (limit 5): REST 32 sent, {tried_rest} "
            f"tried; MyProxy path 100 sent, {tried_wire} tried"
        )
        if tried_rest > 5 or tried_wire > 5 or "accepted" in rest + wire:
            outcome.fail("the passphrase throttle let more than 5 tries through")

    def squatting(outcome: Outcome) -> None:
        b = broker()
        mallory = b.client("bob")
        for name in ("prod", "default", "x"):
            outcome.tried += 1
            try:
                mallory.delegate(
                    mallory.identity.load(), username="alice", name=name, now=datetime.now(UTC)
                )
                outcome.fail(f"ACCEPTED bob storing alice/{name}")
            except BrokerError as exc:
                if exc.reason != "username_binding":
                    outcome.fail(f"squatting refused with {exc.reason}")
        result = b.client("pilot").retrieve(username="alice")
        outcome.tried += 1
        owner = result[1].get("owner") if isinstance(result, tuple) else None
        outcome.note(
            f"bob storing under alice/*: 3 refused (username_binding); retrieval "
            f"by username reports owner {owner}"
        )
        if owner != "/DC=org/DC=example/CN=Alice":
            outcome.fail(f"a retrieval by username did not show the owner ({owner})")

    def enumeration(outcome: Outcome) -> None:
        b = broker()
        bob = b.client("bob")
        answers = []
        for name in ("default", "pp", "never-stored"):
            outcome.tried += 1
            try:
                bob.retrieve(username="alice", name=name)
                outcome.fail(f"ACCEPTED bob retrieving alice/{name}")
            except BrokerError as exc:
                answers.append(
                    (type(exc).__name__, exc.reason, exc.message.replace(repr(name), "NAME"))
                )
        same = len(set(answers)) == 1
        leaks = [a for a in answers if "CN=Alice" in a[2] or "passphrase" in a[2]]
        outcome.note(
            f"bob asking for alice's existing, passphrase-protected and missing "
            f"credentials: {'identical' if same else 'DIFFERENT'} answers "
            f"({answers[0][1]})"
        )
        if not same or leaks:
            outcome.fail(f"refusals tell credentials apart: {answers}")

    def audit_flood(outcome: Outcome) -> None:
        svc, clock = local()
        anonymous = Requester(dn=None, endpoint="myproxy", client_address="203.0.113.9")
        for _ in range(1000):
            outcome.tried += 1
            try:
                svc.retrieve(anonymous, csr_pem=_csr(), username="ghost")
                outcome.fail("ACCEPTED an anonymous retrieval of nothing")
            except BrokerError:
                pass
        rows = len(svc.store.query_audit(username="ghost", limit=10_000))
        clock.now += timedelta(seconds=61)
        svc.maintain()
        after = svc.store.query_audit(username="ghost", limit=10_000)
        counted = sum(
            int(r.reason.split()[1])
            for r in after
            if r.reason and r.reason.startswith("aggregated:")
        )
        outcome.note(
            f"1000 anonymous refusals: {rows} row(s) at once, {len(after)} after the "
            f"window with {counted} counted in the aggregate"
        )
        if rows > 2 or len(after) + counted - 1 != 1000:
            outcome.fail("anonymous refusals flooded the audit trail or lost their count")

    def key_fifo(outcome: Outcome) -> None:
        fifo = work / "master.fifo"
        work.mkdir(parents=True, exist_ok=True)
        if fifo.exists():
            fifo.unlink()
        os.mkfifo(fifo, 0o600)
        result: list[object] = []

        def load() -> None:
            try:
                result.append(load_master_keys(fifo))
            except ConfigError as exc:
                result.append(exc)

        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        thread.join(5)
        outcome.tried += 1
        if thread.is_alive():
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # release the reader
            outcome.fail("start-up blocked on a master key FIFO")
            return
        outcome.note(f"master key file is a FIFO: {type(result[0]).__name__} at once")
        if not isinstance(result[0], ConfigError):
            outcome.fail("a FIFO master key file was not refused")

    def finish(outcome: Outcome) -> None:
        outcome.tried += 1
        for store in state.get("stores", []):
            store.close()
        if "broker" in state:
            b = state["broker"]
            b.stop()
            log = b.log.read_text(errors="replace")
            if "unexpected error" in log:
                outcome.fail("the protocol broker logged an unexpected error (a 500 path)")
        shutil.rmtree(work, ignore_errors=True)

    yield "pending: per-user cap, limited refused", pending_flood
    yield "pending: purged on schedule, counted", pending_purge
    yield "DB file outside state dir is 0600", database_mode
    yield "renewal: single-use across workers", renewal_replay
    yield "renewal: retrieval caps apply", renewal_caps
    yield "passphrase throttle, concurrent", passphrase_race
    yield "username squatting (binding dn)", squatting
    yield "enumeration by refusal texts", enumeration
    yield "anonymous audit flood aggregated", audit_flood
    yield "master key file is a FIFO", key_fifo
    yield "protocol broker clean shutdown", finish
