"""The token broker in the service layer: real store, real policy, real authlib issuer."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from sqlalchemy import select

from broker.delegation import DelegationOptions
from broker.errors import AuthenticationError, AuthorizationError, NotFound
from broker.pki.loading import chain_to_pem
from broker.pki.proxy import csr_to_pem, generate_key, load_csr, make_csr, sign_request
from broker.policy import load_policy
from broker.service import BrokerService, Requester
from broker.store import MasterKeyRing, Store, default_sqlite_url, migrate
from broker.store.tokens import RefreshTokenRow
from broker.tokens import (
    IssuerDirectory,
    IssuerUnavailable,
    RefreshTokenRevoked,
    ScopeNotAllowed,
    TokenSettings,
    verify_bearer,
)
from tests.broker.tokens.issuer import CLIENT_ID, CLIENT_SECRET, TestIssuer
from tests.brokerserver import DEV_POLICY
from tests.pkifixtures import GridPki

ALICE = "/DC=org/DC=example/CN=Alice"


def token_policy(issuer_url: str) -> str:
    return (
        DEV_POLICY
        + f"""
[[rule]]
name = "cms pilots by token"
effect = "allow"
action = ["retrieve"]
requester = ["token-group:{issuer_url}#/cms/pilots"]
auth = ["token"]
require_job_id = true
max_lifetime = "1h"

[[rule]]
name = "owners store refresh tokens"
effect = "allow"
action = ["delegate"]
requester = ["self"]
credential = ["token:*"]
"""
    )


@pytest.fixture
def service(
    grid_pki: GridPki, tmp_path: Path, issuer: TestIssuer, settings: TokenSettings
) -> Iterator[BrokerService]:
    url = default_sqlite_url(tmp_path)
    migrate(url)
    policy = load_policy({"p.toml": token_policy(issuer.url)})
    with Store(url, MasterKeyRing.generate(now=datetime.now(UTC))) as store:
        service = BrokerService(
            store, grid_pki.trust, lambda: policy, clock=lambda: datetime.now(UTC)
        )
        service.use_tokens(IssuerDirectory(settings))
        yield service


def who(service: BrokerService, grid_pki: GridPki, name: str) -> Requester:
    return service.authenticate_chain(list(grid_pki.user(name).chain))


def pilot(service: BrokerService, issuer: TestIssuer, **claims: object) -> Requester:
    claims.setdefault("groups", ["/cms/pilots"])
    return service.authenticate_bearer(
        issuer.mint(sub="glidein-1", **claims),  # type: ignore[arg-type]
        client_address="127.0.0.1",
    )


def delegate(service: BrokerService, grid_pki: GridPki) -> None:
    alice = who(service, grid_pki, "alice")
    pending = service.start_delegation(alice, DelegationOptions(username="alice"))
    chain = sign_request(
        grid_pki.user("alice"),
        load_csr(pending.csr_pem),
        now=service.now(),
        lifetime=timedelta(hours=24),
    )
    service.finish_delegation(alice, pending.id, chain_to_pem(chain))


def test_token_pilot_retrieves_a_proxy_and_is_audited(
    service: BrokerService, grid_pki: GridPki, issuer: TestIssuer
) -> None:
    delegate(service, grid_pki)
    requester = pilot(service, issuer)
    assert requester.dn is None and requester.token is not None
    csr = csr_to_pem(make_csr(generate_key("ec")))
    issued = service.retrieve(requester, csr_pem=csr, username="alice", job_id="job.7#1")
    assert issued.owner_dn == ALICE
    assert issued.lifetime <= timedelta(hours=1)  # the token rule's cap
    audit = _audit(service)
    assert any(
        r.requester_dn == f"token:{issuer.url}#glidein-1"
        and r.job_id == "job.7#1"
        and r.decision == "allow"
        for r in audit
    ), audit
    # without a job id the rule does not apply
    with pytest.raises(AuthorizationError) as err:
        service.retrieve(requester, csr_pem=csr, username="alice")
    assert err.value.reason == "job_id_required"
    # a token without the pilots group: denied, and audited as that token
    # (told "not found", as for a credential that does not exist: no right, no hint)
    stranger = pilot(service, issuer, groups=["/cms/users"])
    with pytest.raises(NotFound):
        service.retrieve(stranger, csr_pem=csr, username="alice", job_id="j")
    assert any(
        r.decision == "deny" and r.requester_dn == f"token:{issuer.url}#glidein-1"
        for r in _audit(service)
    )


def _audit(service: BrokerService) -> list:  # type: ignore[type-arg]
    from broker.store.models import AuditEventRow

    with service.store.engine.connect() as conn:
        return list(conn.execute(select(AuditEventRow)).all())


def test_refused_bearer_token_is_audited(service: BrokerService, issuer: TestIssuer) -> None:
    with pytest.raises(AuthenticationError):
        service.authenticate_bearer(issuer.mint(aud="nope"), client_address="127.0.0.1")
    assert any(
        r.decision == "deny" and "token_audience" in (r.reason or "") for r in _audit(service)
    )


def _store_refresh(
    service: BrokerService,
    grid_pki: GridPki,
    issuer: TestIssuer,
    scope: str = "offline_access compute.read storage.read:/",
) -> str:
    refresh = issuer.issue_refresh_token("alice-sub", scope)
    service.store_refresh_token(
        who(service, grid_pki, "alice"),
        issuer="test",
        username="alice",
        refresh_token=refresh,
        scopes=tuple(scope.split()),
    )
    return refresh


def test_access_token_for_a_job_with_rotation(
    service: BrokerService, grid_pki: GridPki, issuer: TestIssuer, settings: TokenSettings
) -> None:
    first = _store_refresh(service, grid_pki, issuer)
    with service.store.engine.connect() as conn:
        before = conn.execute(select(RefreshTokenRow)).one()
    assert first.encode() not in before.key_ciphertext  # encrypted at rest
    token = service.issue_access_token(
        pilot(service, issuer),
        username="alice",
        issuer="test",
        scopes=("compute.read",),
        job_id="job.1",
    )
    claims = verify_bearer(
        token.token, settings, IssuerDirectory(settings), now=int(datetime.now(UTC).timestamp())
    )
    assert claims.subject == "alice-sub" and claims.scopes == ("compute.read",)
    with service.store.engine.connect() as conn:
        after = conn.execute(select(RefreshTokenRow)).one()
    assert after.rotations == 1 and after.key_ciphertext != before.key_ciphertext
    # replay of the rotated (old) refresh token at the issuer is refused...
    replay = requests.post(
        issuer.url + "/token",
        auth=(CLIENT_ID, CLIENT_SECRET),
        data={"grant_type": "refresh_token", "refresh_token": first},
        timeout=5,
    )
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"
    # ...and revokes the family, so the broker tells the owner to start again
    with pytest.raises(RefreshTokenRevoked) as err:
        service.issue_access_token(
            pilot(service, issuer),
            username="alice",
            issuer="test",
            scopes=("storage.read:/cms",),
            job_id="job.2",
        )
    assert "broker-init --token-issuer test" in err.value.message
    assert err.value.http_status == 403
    assert any(
        r.action == "retrieve-token" and r.job_id == "job.2" and r.decision == "deny"
        for r in _audit(service)
    )


def test_same_scopes_reuse_the_access_token(
    service: BrokerService, grid_pki: GridPki, issuer: TestIssuer
) -> None:
    _store_refresh(service, grid_pki, issuer)
    alice_pilot = pilot(service, issuer)
    a = service.issue_access_token(
        alice_pilot, username="alice", issuer="test", scopes=("compute.read",), job_id="1"
    )
    b = service.issue_access_token(
        alice_pilot, username="alice", issuer="test", scopes=("compute.read",), job_id="2"
    )
    assert a.token == b.token and issuer.state.refresh_requests == 1
    jobs = [r.job_id for r in _audit(service) if r.action == "retrieve-token"]
    assert jobs == ["1", "2"]


def test_scope_escalation_is_refused(
    service: BrokerService, grid_pki: GridPki, issuer: TestIssuer
) -> None:
    _store_refresh(service, grid_pki, issuer, scope="offline_access compute.read")
    requester = pilot(service, issuer)
    # beyond the site's job_scopes
    with pytest.raises(ScopeNotAllowed):
        service.issue_access_token(
            requester, username="alice", issuer="test", scopes=("compute.modify",), job_id="1"
        )
    # within job_scopes but beyond the stored grant
    with pytest.raises(ScopeNotAllowed):
        service.issue_access_token(
            requester, username="alice", issuer="test", scopes=("storage.read:/cms",), job_id="1"
        )
    assert issuer.state.refresh_requests == 0  # refused before the issuer was asked
    # the issuer itself refuses an escalation (grant unknown to the broker)
    other = issuer.issue_refresh_token("bob-sub", "offline_access compute.read")
    service.store_refresh_token(
        who(service, grid_pki, "bob"), issuer="test", username="bob", refresh_token=other
    )
    with pytest.raises(ScopeNotAllowed):
        service.issue_access_token(
            requester, username="bob", issuer="test", scopes=("storage.read:/",), job_id="1"
        )


def test_errors_name_the_issuer_and_the_fix(
    service: BrokerService, grid_pki: GridPki, issuer: TestIssuer
) -> None:
    requester = pilot(service, issuer)
    with pytest.raises(NotFound) as missing:
        service.issue_access_token(requester, username="alice", issuer="test", job_id="1")
    assert "broker-init --token-issuer test" in missing.value.message
    with pytest.raises(NotFound):
        service.issue_access_token(requester, username="alice", issuer="nope", job_id="1")
    _store_refresh(service, grid_pki, issuer)
    issuer.state.down = True
    with pytest.raises(IssuerUnavailable) as down:
        service.issue_access_token(requester, username="alice", issuer="test", job_id="1")
    assert down.value.http_status == 503 and "test" in down.value.message
    issuer.state.down = False
    # the failed call changed nothing: the stored token still works
    service.issue_access_token(requester, username="alice", issuer="test", job_id="1")


def test_only_certificate_owners_store_refresh_tokens(
    service: BrokerService, grid_pki: GridPki, issuer: TestIssuer
) -> None:
    with pytest.raises(AuthenticationError):
        service.store_refresh_token(
            pilot(service, issuer), issuer="test", username="alice", refresh_token="abc"
        )
    _store_refresh(service, grid_pki, issuer)
    with pytest.raises(AuthorizationError):  # bob cannot overwrite alice's token
        service.store_refresh_token(
            who(service, grid_pki, "bob"), issuer="test", username="alice", refresh_token="x"
        )


def test_username_of_another_owner_is_refused(
    service: BrokerService, grid_pki: GridPki, issuer: TestIssuer
) -> None:
    delegate(service, grid_pki)  # "alice" holds alice's proxy
    with pytest.raises(AuthorizationError) as err:
        service.store_refresh_token(
            who(service, grid_pki, "bob"),
            issuer="test",
            username="alice",
            refresh_token="bobs-token",
        )
    assert err.value.reason == "not_owner"


def test_master_key_rotation_rewraps_refresh_tokens(
    service: BrokerService, grid_pki: GridPki, issuer: TestIssuer, tmp_path: Path
) -> None:
    _store_refresh(service, grid_pki, issuer)
    old = service.store.master_keys.active_id
    assert service.store.master_key_ids_in_use() == {old: 1}  # the refresh token row
    ring = MasterKeyRing.generate(now=datetime.now(UTC))
    merged = MasterKeyRing(keys=(*service.store.master_keys.keys, *ring.keys))
    service.store.use_master_keys(merged)
    while service.store.rewrap_batch(10):
        pass
    assert set(service.store.master_key_ids_in_use()) == {merged.active_id}
    # still decrypts and works
    service.issue_access_token(pilot(service, issuer), username="alice", issuer="test", job_id="1")
