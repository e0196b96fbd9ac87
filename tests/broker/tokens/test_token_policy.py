"""Token subject patterns in the policy language, evaluation and `broker policy explain`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from broker.cli.policy_cmd import policy
from broker.policy import (
    Action,
    AuthMethod,
    OwnerPolicy,
    PatternError,
    Request,
    Subject,
    TokenClaims,
    evaluate,
    load_policy,
    parse_pattern,
    scope_covers,
)

ISS = "https://iam.example.org/"
OWNER = "/DC=org/DC=example/CN=Alice"
POLICY = f"""
[groups]
token-pilots = ["token-group:{ISS}#/cms/pilots", "token:{ISS}#pilot-*"]

[[rule]]
name = "cms pilots by token"
effect = "allow"
action = ["retrieve"]
requester = ["group:token-pilots"]
auth = ["token"]

[[rule]]
name = "no storage writers"
effect = "deny"
action = ["retrieve"]
requester = ["scope:storage.create:/"]
"""


def token(
    sub: str = "x", groups: tuple[str, ...] = (), scopes: tuple[str, ...] = (), iss: str = ISS
) -> Subject:
    return Subject(dn=None, auth=AuthMethod.TOKEN, token=TokenClaims(iss, sub, groups, scopes))


def test_token_subject_group_and_scope_patterns() -> None:
    sub = parse_pattern(f"token:{ISS}#pilot-*")
    assert sub.matches(token("pilot-3")) and not sub.matches(token("user-3"))
    assert not sub.matches(token("pilot-3", iss="https://other.example/"))
    exact = parse_pattern(f"token:{ISS}#abc")
    assert exact.matches(token("abc")) and not exact.matches(token("abcd"))
    group = parse_pattern("token-group:/cms/pilots")
    assert group.matches(token(groups=("/cms/pilots",)))
    assert group.matches(token(groups=("/cms/pilots/prod",)))
    assert not group.matches(token(groups=("/cms/pilotsX", "/cms")))
    pinned = parse_pattern(f"token-group:{ISS}#/cms")
    assert not pinned.matches(token(groups=("/cms",), iss="https://other.example/"))
    scope = parse_pattern("scope:storage.read:/cms")
    assert scope.matches(token(scopes=("storage.read:/",)))
    assert scope.matches(token(scopes=("storage.read:/cms",)))
    assert not scope.matches(token(scopes=("storage.read:/cmsX",)))
    assert not scope.matches(token(scopes=("storage.create:/",)))
    # none of them match a certificate holder, and `anonymous` never matches a token holder
    cert = Subject(dn="/DC=org/CN=x", auth=AuthMethod.CERTIFICATE)
    assert not any(p.matches(cert) for p in (sub, group, scope))
    assert not parse_pattern("anonymous").matches(token())


def test_scope_covers_paths() -> None:
    assert scope_covers("compute.read", "compute.read")
    assert not scope_covers("compute.read", "compute.modify")
    assert scope_covers("storage.read:/", "storage.read:/a/b")
    assert scope_covers("storage.read:/a", "storage.read:/a/b")
    assert not scope_covers("storage.read:/a/b", "storage.read:/a")
    assert not scope_covers("storage.read:/a", "storage.read")
    assert not scope_covers("storage.read", "storage.read:/a")


@pytest.mark.parametrize(
    "text",
    [
        "token:nohash",
        "token:#sub",
        f"token:{ISS}#",
        "token:http*://x#a",
        "token-group:cms",
        "token-group:/a b",
        "scope:",
        "scope:a b",
        "token-group:#/cms",
    ],
)
def test_bad_token_patterns_are_refused(text: str) -> None:
    with pytest.raises(PatternError):
        parse_pattern(text)


def test_token_patterns_cannot_describe_owners() -> None:
    with pytest.raises(PatternError, match="requester"):
        parse_pattern("token-group:/cms", context="owner")


def test_evaluation_and_owner_layer() -> None:
    policy_set = load_policy({"t.toml": POLICY})
    claims = TokenClaims(ISS, "someone", ("/cms/pilots",), ("compute.read",))
    request = Request(
        action=Action.RETRIEVE,
        requester_dn=None,
        owner_dn=OWNER,
        auth=AuthMethod.TOKEN,
        token=claims,
        job_id="1.0",
    )
    decision = evaluate(policy_set, request)
    assert decision.allowed, decision.message
    # owner's trusted retrievers govern token retrievals (no passphrase involved)
    narrowed = evaluate(policy_set, request, OwnerPolicy(trusted_retrievers=("/CN=nobody",)))
    assert not narrowed.allowed and "bearer token" in narrowed.message
    listed = evaluate(
        policy_set, request, OwnerPolicy(trusted_retrievers=(f"token:{ISS}#someone",))
    )
    assert listed.allowed
    writer = Request(
        action=Action.RETRIEVE,
        requester_dn=None,
        owner_dn=OWNER,
        auth=AuthMethod.TOKEN,
        token=TokenClaims(ISS, "pilot-1", (), ("storage.create:/",)),
    )
    denied = evaluate(policy_set, writer)
    assert not denied.allowed and denied.rule is not None
    assert denied.rule.name == "no storage writers"
    # a token from another issuer with the same group is not a pilot
    other = Request(
        action=Action.RETRIEVE,
        requester_dn=None,
        owner_dn=OWNER,
        auth=AuthMethod.TOKEN,
        token=TokenClaims("https://other.example/", "x", ("/cms/pilots",), ()),
    )
    assert not evaluate(policy_set, other).allowed


def test_request_requires_claims_exactly_with_token_auth() -> None:
    from broker.errors import InputError

    with pytest.raises(InputError):
        Request(action=Action.RETRIEVE, requester_dn=None, owner_dn=OWNER, auth=AuthMethod.TOKEN)
    with pytest.raises(InputError):
        Request(
            action=Action.RETRIEVE,
            requester_dn="/CN=x",
            owner_dn=OWNER,
            token=TokenClaims(ISS, "x"),
        )


def test_policy_explain_shows_token_requests(tmp_path: Path) -> None:
    (tmp_path / "10-t.toml").write_text(POLICY)
    runner = CliRunner()
    args = [
        "explain",
        "--dir",
        str(tmp_path),
        "--action",
        "retrieve",
        "--owner",
        OWNER,
        "--token-issuer",
        ISS,
        "--token-subject",
        "pilot-9",
        "--token-scope",
        "compute.read",
    ]
    result = runner.invoke(policy, args)
    assert result.exit_code == 0, result.output
    assert "cms pilots by token" in result.output and "bearer token" in result.output
    result = runner.invoke(policy, [*args[:-2], "--token-scope", "storage.create:/", "--json"])
    assert result.exit_code == 3, result.output
    data = json.loads(result.output)
    assert data["decision"] == "deny" and data["rule"]["name"] == "no storage writers"
    assert "--token-issuer" in data["message"]
