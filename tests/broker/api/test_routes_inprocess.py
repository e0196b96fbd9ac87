"""The REST routes in-process: Flask's test client, a real store, policy and PKI.

The caller's verified chain reaches the app through the one seam
``create_app(peer_chain=...)``; every other layer is the production code.  Each
answer is also checked against its schema in broker/api/openapi.json, so the
document cannot drift from what the routes send.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from flask import Request
from flask.testing import FlaskClient
from openapi_schema_validator import OAS31Validator

from broker.api.app import create_app
from broker.pam_auth import PamSettings
from broker.pki.loading import chain_to_pem
from broker.pki.proxy import csr_to_pem, generate_key, load_csr, make_csr, new_proxy, sign_request
from broker.policy import load_policy
from broker.service import BrokerService, sign_challenge
from broker.store import MasterKeyRing, Store, default_sqlite_url, migrate
from tests.broker.test_service import Clock
from tests.brokerserver import DEV_POLICY
from tests.pamstack import make_pam_stack
from tests.pkifixtures import GridPki

ALICE = "/DC=org/DC=example/CN=Alice"
ISSUED_FIELDS = {"chain", "owner", "username", "name", "lifetime", "limited"}


def _document() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(
        resources.files("broker.api").joinpath("openapi.json").read_text()
    )
    return doc


def check_against_document(method: str, path: str, status: int, body: Any) -> None:
    """``body`` matches the documented schema of (method, path, status), and every top-level
    field it carries is documented."""
    doc = _document()
    response = doc["paths"][path][method.lower()]["responses"][str(status)]
    while "$ref" in response:
        response = doc["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    schema = response["content"]["application/json"]["schema"]
    OAS31Validator({**schema, "components": doc["components"]}).validate(body)
    resolved = schema
    if "$ref" in resolved:
        resolved = doc["components"]["schemas"][resolved["$ref"].rsplit("/", 1)[1]]
    if isinstance(body, dict) and "properties" in resolved:
        undocumented = set(body) - set(resolved["properties"])
        assert not undocumented, (method, path, undocumented)


class Caller:
    """Who the seam says is calling: a chain, or nobody."""

    def __init__(self) -> None:
        self.chain: list[x509.Certificate] = []

    def __call__(self, request: Request) -> list[x509.Certificate]:
        return list(self.chain)


@pytest.fixture
def clock(grid_pki: GridPki) -> Clock:
    return Clock(grid_pki.now + timedelta(minutes=1))


@pytest.fixture
def service(grid_pki: GridPki, tmp_path: Path, clock: Clock) -> Iterator[BrokerService]:
    url = default_sqlite_url(tmp_path)
    migrate(url)
    with Store(url, MasterKeyRing.generate(now=datetime.now(UTC))) as store:
        yield BrokerService(
            store, grid_pki.trust, lambda: load_policy({"p.toml": DEV_POLICY}), clock=clock
        )


@pytest.fixture
def caller() -> Caller:
    return Caller()


@pytest.fixture
def client(service: BrokerService, caller: Caller) -> FlaskClient:
    return create_app(service, peer_chain=caller).test_client()


def _json(response: Any, status: int, method: str, path: str) -> Any:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    check_against_document(method, path, status, body)
    return body


def _delegate(client: FlaskClient, caller: Caller, grid_pki: GridPki, clock: Clock) -> None:
    alice = grid_pki.user("alice")
    caller.chain = list(alice.chain)
    pending = _json(
        client.post("/v1/delegations", json={"username": "alice"}), 201, "post", "/v1/delegations"
    )
    signed = sign_request(
        alice, load_csr(pending["csr"].encode()), now=clock.now, lifetime=timedelta(days=7)
    )
    stored = _json(
        client.put(
            f"/v1/delegations/{pending['id']}", json={"chain": chain_to_pem(signed).decode()}
        ),
        201,
        "put",
        "/v1/delegations/{delegation_id}",
    )
    assert stored["owner"] == ALICE and stored["username"] == "alice"


def _csr() -> str:
    return csr_to_pem(make_csr(generate_key("ec"))).decode()


def test_without_a_chain_every_certificate_route_is_refused(client: FlaskClient) -> None:
    for method, path in (
        ("get", "/v1/whoami"),
        ("get", "/v1/credentials"),
        ("post", "/v1/delegations"),
        ("post", "/v1/retrievals"),
        ("get", "/v1/renewals/challenge"),
        ("post", "/v1/renewals"),
    ):
        response = getattr(client, method)(path, json={})
        body = _json(response, 401, method, path)
        assert body["error"] == "no_chain", (method, path)


def test_the_default_chain_source_fails_closed(service: BrokerService) -> None:
    # Without gunicorn's TLS socket there is no verified chain: refused, never anonymous.
    response = create_app(service).test_client().get("/v1/whoami")
    assert response.status_code == 401
    assert response.get_json()["error"] == "no_chain"


def test_whoami_reads_the_seams_chain(
    client: FlaskClient, caller: Caller, grid_pki: GridPki
) -> None:
    caller.chain = list(grid_pki.user("alice").chain)
    body = _json(client.get("/v1/whoami"), 200, "get", "/v1/whoami")
    assert body == {"identity": ALICE, "fqans": [], "limited": False}


def test_delegate_list_retrieve_renew_destroy(
    client: FlaskClient, caller: Caller, grid_pki: GridPki, clock: Clock
) -> None:
    _delegate(client, caller, grid_pki, clock)
    listed = _json(client.get("/v1/credentials"), 200, "get", "/v1/credentials")
    assert [c["name"] for c in listed["credentials"]] == ["default"]

    caller.chain = list(grid_pki.user("pilot").chain)
    retrieved = _json(
        client.post("/v1/retrievals", json={"csr": _csr(), "username": "alice"}),
        200,
        "post",
        "/v1/retrievals",
    )
    assert set(retrieved) == ISSUED_FIELDS
    assert (retrieved["owner"], retrieved["username"], retrieved["name"]) == (
        ALICE,
        "alice",
        "default",
    )

    challenge = _json(client.get("/v1/renewals/challenge"), 200, "get", "/v1/renewals/challenge")[
        "challenge"
    ]
    old = new_proxy(grid_pki.user("alice"), now=clock.now, lifetime=timedelta(hours=1))
    proof = base64.b64encode(sign_challenge(old.key, challenge.encode())).decode()
    renewed = _json(
        client.post(
            "/v1/renewals",
            json={
                "csr": _csr(),
                "challenge": challenge,
                "authz_chain": chain_to_pem(old.chain).decode(),
                "signature": proof,
                "username": "alice",
            },
        ),
        200,
        "post",
        "/v1/renewals",
    )
    # Retrieve and renew answer the same shape.
    assert set(renewed) == set(retrieved)
    assert (renewed["owner"], renewed["username"], renewed["name"]) == (ALICE, "alice", "default")

    caller.chain = list(grid_pki.user("alice").chain)
    destroyed = _json(
        client.delete("/v1/credentials/alice/default"),
        200,
        "delete",
        "/v1/credentials/{username}/{name}",
    )
    assert destroyed["destroyed"]["username"] == "alice"
    empty = _json(client.get("/v1/credentials"), 200, "get", "/v1/credentials")
    assert empty["credentials"] == []


def test_the_pilot_may_not_destroy_alices_credential(
    client: FlaskClient, caller: Caller, grid_pki: GridPki, clock: Clock
) -> None:
    _delegate(client, caller, grid_pki, clock)
    caller.chain = list(grid_pki.user("pilot").chain)
    response = client.delete("/v1/credentials/alice/default")
    assert response.status_code in (403, 404)
    check_against_document(
        "delete", "/v1/credentials/{username}/{name}", response.status_code, response.get_json()
    )


def test_bad_input_is_a_specific_400(
    client: FlaskClient, caller: Caller, grid_pki: GridPki
) -> None:
    caller.chain = list(grid_pki.user("alice").chain)
    cases = [
        (b"[1]", "bad_json"),
        (b"{", "bad_json"),
        (b'{"username": 5}', "bad_field"),
        (b"{}", "missing_field"),
        (b'{"username": "a", "stored_hours": 0}', "bad_field"),
    ]
    for raw, reason in cases:
        response = client.post("/v1/delegations", data=raw, content_type="application/json")
        body = _json(response, 400, "post", "/v1/delegations")
        assert body["error"] == reason, raw


def test_health_and_documents(client: FlaskClient) -> None:
    _json(client.get("/healthz"), 200, "get", "/healthz")
    served = client.get("/v1/openapi.json")
    assert served.status_code == 200 and served.get_json() == _document()
    assert client.get("/metrics").status_code == 200


def test_pam_routes_answer_documented_errors(service: BrokerService, tmp_path: Path) -> None:
    stack = make_pam_stack(tmp_path / "pam", {"carol": "right horse battery"})
    app = create_app(service, pam=PamSettings(stack.service, confdir=str(stack.confdir)))
    client = app.test_client()
    path = "/v1/pam/retrievals"
    wrong = _json(
        client.post(path, json={"username": "carol", "password": "wrong", "csr": _csr()}),
        401,
        "post",
        path,
    )
    assert wrong["error"] == "pam_failed"
    missing = _json(client.post(path, json={"username": "carol", "csr": _csr()}), 400, "post", path)
    assert missing["error"] == "missing_field"
