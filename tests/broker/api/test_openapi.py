"""broker/api/openapi.json: valid OpenAPI 3.1, in step with the routes, served by the broker."""

from __future__ import annotations

import json
import re
from importlib import resources
from types import SimpleNamespace
from typing import Any

from flask import Flask
from openapi_spec_validator import validate

from broker.api.app import create_app
from broker.pam_auth import PamSettings
from tests.brokerserver import RunningBroker

METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
IGNORED_METHODS = {"HEAD", "OPTIONS"}  # Flask adds these to every route


def _document() -> dict[str, Any]:
    text = resources.files("broker.api").joinpath("openapi.json").read_text()
    doc: dict[str, Any] = json.loads(text)
    return doc


# Blueprints whose routes are not part of the REST API document.
UNDOCUMENTED_BLUEPRINTS = {"admin"}  # the admin page is HTML for browsers (docs/admin.md)


def _full_app() -> Flask:
    """The app with every optional part on: PAM, the online CA and the token broker.

    create_app and the blueprints only store the service and settings until a request
    comes, so stand-ins are enough to read the URL map."""
    service = SimpleNamespace(token_directory=object())  # tokens on
    return create_app(
        service,  # type: ignore[arg-type]
        pam=PamSettings("broker-test"),
        online_ca=object(),  # type: ignore[arg-type]
    )


def _flask_routes() -> set[tuple[str, str]]:
    app = _full_app()
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.endpoint.split(".")[0] in UNDOCUMENTED_BLUEPRINTS:
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        for method in (rule.methods or set()) - IGNORED_METHODS:
            routes.add((method.lower(), path))
    return routes


def _documented_routes(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method, path)
        for path, item in doc["paths"].items()
        for method in item
        if method in METHODS
    }


def _resolve(doc: dict[str, Any], node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), ref
        target: Any = doc
        for part in ref[2:].split("/"):
            target = target[part]
        node = target
    return node


def test_document_is_valid_openapi_31() -> None:
    doc = _document()
    assert doc["openapi"].startswith("3.1.")
    validate(doc)  # openapi-spec-validator: the full 3.1 schema, and every $ref resolves


def test_document_structure() -> None:
    """Checks of our own, beyond the OpenAPI schema."""
    doc = _document()
    assert doc["info"]["title"] and doc["info"]["version"]
    scheme = doc["components"]["securitySchemes"]["mutualTLS"]
    assert scheme["type"] == "mutualTLS"
    assert doc["security"] == [{"mutualTLS": []}]
    description = doc["info"]["description"]
    assert "verified" in description and "ProxyCertInfo" in description
    error = doc["components"]["schemas"]["Error"]
    assert error["required"] == ["error", "message"]
    assert error["properties"]["error"]["type"] == "string"
    for path, item in doc["paths"].items():
        assert path.startswith("/")
        for name in re.findall(r"{([^}]+)}", path):
            for method, operation in item.items():
                params = [_resolve(doc, p) for p in operation.get("parameters", [])]
                assert any(
                    p["name"] == name and p["in"] == "path" and p["required"] for p in params
                ), (method, path, name)
        for method, operation in item.items():
            assert method in METHODS, (path, method)
            assert operation["operationId"] and operation["responses"]
            for status, response in operation["responses"].items():
                response = _resolve(doc, response)
                assert response["description"]
                if status.startswith(("4", "5")) and path != "/healthz":
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (path, status)


def test_error_statuses_per_route() -> None:
    doc = _document()
    expected = {
        ("post", "/v1/delegations"): {"400", "401", "403", "409", "413", "503"},
        ("put", "/v1/delegations/{delegation_id}"): {
            "400",
            "401",
            "403",
            "404",
            "409",
            "413",
            "422",
            "503",
        },
        ("post", "/v1/retrievals"): {"400", "401", "403", "404", "413", "422", "503"},
        ("post", "/v1/renewals"): {"400", "401", "403", "404", "413", "422", "503"},
        ("get", "/v1/whoami"): {"401"},
        ("get", "/healthz"): {"503"},
    }
    for (method, path), statuses in expected.items():
        documented = set(doc["paths"][path][method]["responses"])
        assert statuses <= documented, (method, path, statuses - documented)


def test_request_body_limits_match_the_code() -> None:
    schemas = _document()["components"]["schemas"]
    delegation = schemas["DelegationRequest"]
    assert delegation["required"] == ["username"]
    assert delegation["properties"]["username"]["maxLength"] == 128
    assert delegation["properties"]["stored_hours"]["maximum"] == 24 * 366
    assert delegation["properties"]["stored_hours"]["default"] == 168
    assert delegation["properties"]["max_proxy_hours"]["default"] == 12
    assert delegation["properties"]["retrievers"]["maxItems"] == 256
    retrieval = schemas["RetrievalRequest"]
    assert retrieval["required"] == ["csr"]
    assert retrieval["properties"]["job_id"]["maxLength"] == 256
    assert retrieval["properties"]["limited"]["type"] == "boolean"
    assert set(schemas["RenewalRequest"]["required"]) == {
        "csr",
        "challenge",
        "authz_chain",
        "signature",
    }


def test_every_route_is_documented_and_nothing_else() -> None:
    routes = _flask_routes()
    documented = _documented_routes(_document())
    assert routes, "no routes found in create_app"
    assert documented == routes, {
        "undocumented": sorted(routes - documented),
        "documented but not routed": sorted(documented - routes),
    }


def test_optional_routes_are_in_the_map_and_the_document() -> None:
    """PAM, online-CA and token routes count too: the route comparison above only means
    something when the app it reads has them all registered."""
    routes = _flask_routes()
    documented = _documented_routes(_document())
    optional = {
        ("post", "/v1/pam/retrievals"),
        ("post", "/v1/pam/certificate"),
        ("post", "/v1/tokens/refresh-tokens"),
        ("post", "/v1/tokens/device"),
        ("post", "/v1/tokens/device/poll"),
        ("post", "/v1/tokens/access"),
    }
    assert optional <= routes
    assert optional <= documented
    admin = {
        rule.rule for rule in _full_app().url_map.iter_rules() if rule.endpoint.startswith("admin.")
    }
    assert admin and not any(path.startswith("/admin") for _, path in documented)


def test_broker_serves_the_document(sqlite_broker: RunningBroker) -> None:
    served = sqlite_broker.client("alice").call("GET", "/v1/openapi.json")
    assert served == _document()
