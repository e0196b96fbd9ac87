"""MyProxy semantics in the policy engine: ``retrieve-key`` and ``owner_list_required``."""

from __future__ import annotations

from broker.policy import Action, OwnerPolicy, evaluate, unsafe_rules
from tests.broker.policy.policy_helpers import ALICE, PILOT, load, req

ALLOW_ALL = """
[[rule]]
name = "everything"
action = "*"
effect = "allow"
requester = ["*"]
auth = ["passphrase"]
"""

KEY_RULE = """
[[rule]]
name = "key retrievers"
action = "retrieve-key"
effect = "allow"
requester = ["*"]
auth = ["passphrase"]
owner_list_required = true
"""

TRUSTED_STAR = """
[[rule]]
name = "trusted retrievers"
action = "retrieve"
effect = "allow"
requester = ["*"]
auth = ["certificate"]
owner_list_required = true
"""


def test_allow_star_does_not_grant_key_retrieval() -> None:
    policy = load(ALLOW_ALL)
    assert evaluate(policy, req("retrieve", auth="passphrase")).allowed
    decision = evaluate(policy, req("retrieve-key", auth="passphrase"))
    assert not decision.allowed
    assert Action.RETRIEVE_KEY not in policy.rules[0].actions


def test_deny_star_still_forbids_key_retrieval() -> None:
    text = (
        KEY_RULE
        + """
[[rule]]
name = "ban"
action = "*"
effect = "deny"
requester = ["/DC=org/DC=example/CN=pilot*"]
"""
    )
    owner = OwnerPolicy(key_retrievers=(PILOT,))
    assert not evaluate(load(text), req("retrieve-key", auth="passphrase"), owner).allowed


def test_key_retrieval_needs_the_owners_list() -> None:
    policy = load(KEY_RULE)
    request = req("retrieve-key", auth="passphrase")
    # no owner list: MyProxy's default_key_retrievers "none"
    assert not evaluate(policy, request).allowed
    assert not evaluate(policy, request, OwnerPolicy(retrievers=(PILOT,))).allowed
    assert evaluate(policy, request, OwnerPolicy(key_retrievers=(PILOT,))).allowed
    denied = evaluate(policy, request, OwnerPolicy(key_retrievers=("/CN=someone-else",)))
    assert not denied.allowed and "key retrievers" in denied.message


def test_owner_list_required_trace_names_the_condition() -> None:
    decision = evaluate(load(TRUSTED_STAR), req("retrieve"), None, full_trace=True)
    assert not decision.allowed
    assert any("owner_list_required" in entry.why for entry in decision.trace)


def test_trusted_star_with_owner_list_required_is_not_unsafe() -> None:
    assert unsafe_rules(load(TRUSTED_STAR)) == ()
    plain = TRUSTED_STAR.replace("owner_list_required = true\n", "")
    assert [r.name for r in unsafe_rules(load(plain))] == ["trusted retrievers"]


def test_trusted_star_applies_only_to_credentials_with_a_list() -> None:
    policy = load(TRUSTED_STAR)
    assert not evaluate(policy, req("retrieve")).allowed  # a REST delegation without -Z
    assert evaluate(policy, req("retrieve"), OwnerPolicy(trusted_retrievers=(PILOT,))).allowed
    assert not evaluate(
        policy, req("retrieve", owner=ALICE), OwnerPolicy(trusted_retrievers=("/CN=x",))
    ).allowed
