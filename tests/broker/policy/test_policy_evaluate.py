"""Decisions: deny overrides, owner narrowing, caps, conditions, messages, traces."""

from __future__ import annotations

import pytest

from broker.errors import AuthorizationError, InputError
from broker.policy import (
    REASON_ALLOWED,
    REASON_BAD_OWNER,
    REASON_DENY_RULE,
    REASON_JOB_ID,
    REASON_NO_RULE,
    REASON_OWNER,
    OwnerPolicy,
    evaluate,
    unsafe_rules,
    validate_owner_policy,
)
from tests.broker.policy.policy_helpers import ALICE, BOB, PILOT, load, req, rule

PILOTS = '"/DC=org/DC=example/CN=pilot*"'


def test_no_rules_denies() -> None:
    decision = evaluate(load(""), req())
    assert not decision.allowed and decision.reason == REASON_NO_RULE
    assert "no rule in the policy covers retrieve" in decision.message


def test_no_matching_rule_message_style() -> None:
    text = rule("a", '"/CN=other"') + rule("b", '"/CN=x"') + rule("c", '"fqan:/cms"')
    decision = evaluate(load(text, "policies/atlas.toml"), req())
    assert decision.reason == REASON_NO_RULE and decision.rule is None
    assert decision.message.startswith(
        f"denied: no rule lets {PILOT} retrieve credentials of {ALICE} "
        "(checked 3 rules in policies/atlas.toml); run `broker policy explain --requester "
    )
    with pytest.raises(AuthorizationError) as info:
        decision.raise_if_denied()
    assert info.value.reason == REASON_NO_RULE


def test_allow_and_rule_reference() -> None:
    decision = evaluate(load(rule("pilots", PILOTS)), req())
    assert decision.allowed and decision.reason == REASON_ALLOWED
    assert decision.rule is not None and (decision.rule.name, decision.rule.line) == ("pilots", 1)
    assert decision.to_json()["decision"] == "allow"


def test_other_action_does_not_allow() -> None:
    assert not evaluate(load(rule("pilots", PILOTS, action="renew")), req()).allowed


@pytest.mark.parametrize("order", ["deny-first", "deny-last"])
def test_deny_overrides_allow_in_any_order(order: str) -> None:
    allow = rule("allow pilots", PILOTS)
    deny = rule("ban pilot01", f'"{PILOT}"', effect="deny")
    text = deny + allow if order == "deny-first" else allow + deny
    decision = evaluate(load(text), req())
    assert not decision.allowed and decision.reason == REASON_DENY_RULE
    assert decision.rule is not None and decision.rule.name == "ban pilot01"
    assert 'rule "ban pilot01"' in decision.message


def test_deny_in_an_earlier_file_beats_allow_in_later_file() -> None:
    from broker.policy import load_policy

    policy_set = load_policy(
        {"10.toml": rule("ban", f'"{PILOT}"', effect="deny"), "20.toml": rule("ok", PILOTS)}
    )
    assert evaluate(policy_set, req()).reason == REASON_DENY_RULE


def test_max_lifetime_is_min_of_matching_allows() -> None:
    text = (
        rule("long", PILOTS, extra='max_lifetime = "2d"')
        + rule("short", '"fqan:/atlas"', extra='max_lifetime = "1h30m"')
        + rule("nocap", '"*/CN=pilot01"', extra='auth = ["certificate"]')
        + rule("unmatched", '"/CN=x"', extra='max_lifetime = "1m"')
    )
    decision = evaluate(load(text), req(fqans=("/atlas/Role=NULL/Capability=NULL",)))
    assert decision.allowed and decision.max_lifetime == 5400
    assert "max lifetime 1h30m" in decision.message
    assert evaluate(load(rule("nocap", PILOTS)), req()).max_lifetime is None


def test_limited_forced_by_any_matching_allow() -> None:
    text = rule("a", PILOTS) + rule("b", '"fqan:/atlas"', extra="limited = true")
    assert not evaluate(load(text), req()).limited
    assert evaluate(load(text), req(fqans=("/atlas",))).limited


def test_credential_globs() -> None:
    policy_set = load(rule("prod", PILOTS, extra='credential = ["prod-*", "main"]'))
    assert evaluate(policy_set, req(credential="prod-1")).allowed
    assert evaluate(policy_set, req(credential="main")).allowed
    assert not evaluate(policy_set, req(credential="mainx")).allowed
    assert not evaluate(policy_set, req(credential="")).allowed
    assert evaluate(load(rule("any", PILOTS, extra='credential = "*"')), req()).allowed


def test_require_job_id() -> None:
    policy_set = load(rule("jobs", PILOTS, extra="require_job_id = true"))
    decision = evaluate(policy_set, req())
    assert decision.reason == REASON_JOB_ID and "requires a job id" in decision.message
    assert evaluate(policy_set, req(job_id="1234.0")).allowed
    with pytest.raises(InputError):
        req(job_id=" ")


def test_owner_condition_by_dn_and_fqan() -> None:
    policy_set = load(
        rule("atlas", PILOTS, extra='owner = ["fqan:/atlas", "/DC=org/DC=example/CN=B*"]')
    )
    assert evaluate(policy_set, req(owner_fqans=("/atlas/sub/Role=NULL/Capability=NULL",))).allowed
    assert evaluate(policy_set, req(owner=BOB)).allowed
    denied = evaluate(policy_set, req(owner_fqans=("/cms",)))
    assert not denied.allowed and "owner" in denied.trace[0].why


def test_auth_condition_and_passphrase_retrieval() -> None:
    policy_set = load(rule("pass", '"passphrase"', extra='auth = ["passphrase"]'))
    assert evaluate(policy_set, req(requester=None, auth="passphrase")).allowed
    assert evaluate(policy_set, req(auth="passphrase")).allowed
    assert not evaluate(policy_set, req()).allowed  # certificate alone is not enough
    anon = load(rule("anon", '"anonymous"'))
    assert evaluate(anon, req(requester=None, auth="passphrase")).allowed
    assert not evaluate(anon, req(auth="passphrase")).allowed


def test_pam_requester() -> None:
    policy_set = load(rule("pam", '"pam:atlas*"', extra='auth = "pam"'))
    assert evaluate(policy_set, req(requester=None, auth="pam", username="atlas01")).allowed
    assert not evaluate(policy_set, req(requester=None, auth="pam", username="cms01")).allowed
    with pytest.raises(InputError, match="username"):
        req(requester=None, auth="pam")


def test_self_rule() -> None:
    policy_set = load(rule("own", '"self"', action="destroy"))
    assert evaluate(policy_set, req("destroy", requester=ALICE)).allowed
    assert not evaluate(policy_set, req("destroy", requester=BOB)).allowed


def test_group_requester_and_nested_group() -> None:
    text = (
        "[groups]\n"
        'robots = ["/DC=org/DC=example/CN=pilot*"]\n'
        'all = ["group:robots", "fqan:/atlas/Role=pilot"]\n' + rule("g", '"group:all"')
    )
    policy_set = load(text)
    decision = evaluate(policy_set, req())
    assert decision.allowed and "group:all" in decision.trace[0].why
    assert evaluate(policy_set, req(requester=BOB, fqans=("/atlas/x/Role=pilot",))).allowed
    assert not evaluate(policy_set, req(requester=BOB, fqans=("/atlas/x",))).allowed


class TestOwnerLayer:
    site = rule("pilots", PILOTS, action="*") + rule(
        "phrase", '"passphrase"', extra='auth = ["passphrase"]'
    )

    def test_no_owner_policy_site_alone(self) -> None:
        assert evaluate(load(self.site), req(), None).allowed
        assert evaluate(load(self.site), req(), OwnerPolicy()).allowed

    def test_trusted_retrievers_narrow(self) -> None:
        policy_set = load(self.site)
        owner = OwnerPolicy(trusted_retrievers=("/DC=org/DC=example/CN=pilot99",))
        decision = evaluate(policy_set, req(), owner)
        assert not decision.allowed and decision.reason == REASON_OWNER
        assert "trusted retrievers" in decision.message and decision.trace[-1].layer == "owner"
        assert evaluate(policy_set, req(requester="/DC=org/DC=example/CN=pilot99"), owner).allowed

    def test_owner_cannot_widen(self) -> None:
        owner = OwnerPolicy(trusted_retrievers=("*",), retrievers=("*",), renewers=("*",))
        policy_set = load(self.site)
        assert not evaluate(policy_set, req(requester=BOB), owner).allowed
        assert not evaluate(policy_set, req("renew", requester=BOB), owner).allowed

    def test_passphrase_retrieval_uses_retrievers(self) -> None:
        policy_set = load(self.site)
        owner = OwnerPolicy(retrievers=(BOB,), trusted_retrievers=())
        assert evaluate(policy_set, req(requester=BOB, auth="passphrase"), owner).allowed
        assert not evaluate(policy_set, req(requester=PILOT, auth="passphrase"), owner).allowed
        assert not evaluate(policy_set, req(), owner).allowed  # empty list: nobody

    def test_renewers(self) -> None:
        owner = OwnerPolicy(renewers=("fqan:/atlas/Role=production",))
        policy_set = load(self.site)
        assert not evaluate(policy_set, req("renew"), owner).allowed
        assert evaluate(
            policy_set, req("renew", fqans=("/atlas/sub/Role=production/Capability=NULL",)), owner
        ).allowed
        assert evaluate(policy_set, req("info"), owner).allowed  # lists don't govern info

    def test_owner_groups_resolved_from_site(self) -> None:
        policy_set = load('[groups]\np = ["*/CN=pilot01"]\n' + self.site)
        assert evaluate(policy_set, req(), OwnerPolicy(trusted_retrievers=("group:p",))).allowed

    def test_bad_owner_entry_fails_closed(self) -> None:
        policy_set = load(self.site)
        for bad in ("group:missing", "re:(", "CN=x"):
            decision = evaluate(policy_set, req(), OwnerPolicy(trusted_retrievers=(bad,)))
            assert not decision.allowed and decision.reason == REASON_BAD_OWNER
            with pytest.raises(InputError):
                validate_owner_policy(policy_set, OwnerPolicy(trusted_retrievers=(bad,)))
        validate_owner_policy(policy_set, OwnerPolicy(retrievers=("*/CN=pilot", "re:/CN=.*")))


def test_full_trace_lists_every_rule_of_the_action() -> None:
    text = rule("a", '"/CN=x"') + rule("b", PILOTS) + rule("c", '"/CN=y"', action="info")
    fast = evaluate(load(text), req())
    full = evaluate(load(text), req(), full_trace=True)
    assert [t.rule for t in fast.trace] == ["b"]
    assert [(t.rule, t.matched) for t in full.trace] == [("a", False), ("b", True)]
    assert fast.rules_checked == full.rules_checked == 2


def test_unsafe_rules() -> None:
    unsafe = rule("open", '"*"') + rule("open-re", '"re:.*"', extra='auth = ["certificate"]')
    safe = (
        rule("phrase", '"*"', extra='auth = ["passphrase"]')
        + rule("deny", '"*"', effect="deny")
        + rule("info", '"*"', action="info")
        + rule("narrow", PILOTS)
    )
    policy_set = load(unsafe + safe)
    assert [r.name for r in unsafe_rules(policy_set)] == ["open", "open-re"]
    grouped = load('[groups]\neveryone = ["/*"]\n' + rule("g", '"group:everyone"', action="*"))
    assert [r.name for r in unsafe_rules(grouped)] == ["g"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"requester": "CN=x"},
        {"owner": "not a dn"},
        {"fqans": ("atlas",)},
        {"owner_fqans": ("/atlas/Role=a/Role=b",)},
        {"requester": None},
    ],
)
def test_bad_requests_raise_input_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(InputError):
        req(**kwargs)  # type: ignore[arg-type]
