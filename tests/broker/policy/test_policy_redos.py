"""User-supplied patterns cannot freeze the server: matching is linear time (RE2)."""

from __future__ import annotations

import time

import pytest

from broker.policy import Action, OwnerPolicy, PatternError, Request, evaluate, load_policy

SITE = """
[[rule]]
name = "pilots"
action = "retrieve"
effect = "allow"
requester = ["/DC=org/DC=example/*"]
"""
EVE = "/DC=org/DC=example/CN=Eve" + "/CN=x" * 150


@pytest.mark.parametrize(
    "pattern", ["re:(.|.|.)*Z", "re:(.*)*Z", "re:(a|aa)*Z", "*a*a*a*a*a*a*a*a*a*a*a*a*Z"]
)
def test_catastrophic_patterns_match_in_linear_time(pattern: str) -> None:
    policy = load_policy({"site.toml": SITE})
    request = Request(action=Action.RETRIEVE, requester_dn=EVE, owner_dn=EVE)
    started = time.perf_counter()
    decision = evaluate(policy, request, OwnerPolicy(trusted_retrievers=(pattern,)))
    assert time.perf_counter() - started < 0.5
    assert not decision.allowed and decision.reason == "owner_policy"


@pytest.mark.parametrize("pattern", ["re:(?=x).*", "re:(a)\\1", "re:a*+", "re:(?>a)", "re:a\\Z"])
def test_constructs_without_a_linear_time_engine_are_refused(pattern: str) -> None:
    from broker.policy import parse_pattern

    with pytest.raises(PatternError) as err:
        parse_pattern(pattern)
    assert "RE2" in str(err.value)
