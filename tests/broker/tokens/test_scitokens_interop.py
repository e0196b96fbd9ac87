"""Tokens minted by the `scitokens` library (SciTokens 2.0 profile) verify here."""

from __future__ import annotations

import time

import scitokens
from cryptography.hazmat.primitives import serialization

from broker.policy import AuthMethod, parse_pattern
from broker.policy._patterns import Subject
from broker.tokens import IssuerDirectory, TokenRejected, TokenSettings, verify_bearer
from tests.broker.tokens.issuer import AUDIENCE, TestIssuer


def _scitoken(issuer: TestIssuer, **claims: object) -> str:
    private = serialization.load_pem_private_key(issuer.rsa.as_pem(private=True), None)
    token = scitokens.SciToken(key=private, key_id=issuer.rsa.kid, algorithm="RS256")
    for name, value in {
        "sub": "sci-pilot",
        "aud": AUDIENCE,
        "scope": "compute.read storage.read:/cms",
        **claims,
    }.items():
        token[name] = value
    raw = token.serialize(issuer=issuer.url, lifetime=600)
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def test_a_scitoken_verifies_and_matches_scope_patterns(
    issuer: TestIssuer, settings: TokenSettings, directory: IssuerDirectory
) -> None:
    claims = verify_bearer(_scitoken(issuer), settings, directory, now=int(time.time()))
    assert claims.subject == "sci-pilot"
    assert claims.scopes == ("compute.read", "storage.read:/cms")
    subject = Subject(dn=None, auth=AuthMethod.TOKEN, token=claims)
    assert parse_pattern("scope:storage.read:/cms/data").matches(subject)
    assert not parse_pattern("scope:storage.read:/atlas").matches(subject)


def test_a_scitoken_for_another_audience_is_refused(
    issuer: TestIssuer, settings: TokenSettings, directory: IssuerDirectory
) -> None:
    try:
        verify_bearer(
            _scitoken(issuer, aud="https://other.example"),
            settings,
            directory,
            now=int(time.time()),
        )
    except TokenRejected as exc:
        assert exc.reason == "token_audience"
    else:
        raise AssertionError("a SciToken for another audience was accepted")
