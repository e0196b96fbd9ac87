"""Property tests: glob semantics, and the indexed fast path agreeing with the full scan."""

from __future__ import annotations

import fnmatch

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.policy import evaluate
from broker.policy._patterns import DnGlob, Subject, parse_pattern
from tests.broker.policy.policy_helpers import load, req

# '[' is special to fnmatch but literal for us, so keep it out of the comparison alphabet.
DN_CHARS = st.sampled_from(list("/=CNDOabc12 .*?-"))
DNS = st.text(alphabet=st.sampled_from(list("/=CNDOabc12 .-")), min_size=0, max_size=20).map(
    lambda s: "/" + s
)


PATTERNS = st.text(alphabet=DN_CHARS, max_size=12).map(lambda s: "/" + s)


# Patterns with surrounding spaces are refused at load time (a likely copy-paste slip).
@given(pattern=PATTERNS.filter(lambda s: s == s.strip()), dn=DNS)
def test_dn_glob_equals_fnmatchcase(pattern: str, dn: str) -> None:
    leaf = parse_pattern(pattern)
    assert isinstance(leaf, DnGlob)
    # fnmatchcase's '*' also crosses '/', which is the documented DN-glob semantics.
    assert leaf.matches(Subject(dn=dn)) == fnmatch.fnmatchcase(dn, pattern)


@given(dn=DNS)
def test_literal_glob_only_matches_itself(dn: str) -> None:
    leaf = parse_pattern("/CN=ab")
    assert leaf.matches(Subject(dn=dn)) == (dn == "/CN=ab")


REQUESTERS = [
    '"/DC=org/CN=pilot*"',
    '"*/CN=a"',
    '"re:/DC=org/.*"',
    '"fqan:/atlas"',
    '"fqan:/atlas/Role=pilot"',
    '"fqan:/cms/Role=NULL"',
    '"/DC=org/CN=a"',
    '"passphrase"',
    '"anonymous"',
    '"self"',
    '"pam:a*"',
    '"/DC=org/CN=p?lot1"',
    '"group:g"',
]
EXTRAS = [
    "",
    'owner = ["fqan:/atlas"]',
    'credential = ["p*"]',
    "require_job_id = true",
    'auth = ["passphrase"]',
    'max_lifetime = "1h"',
    "limited = true",
    'max_lifetime = "2h"',
]

rule_st = st.tuples(
    st.sampled_from(["retrieve", "renew", "info"]),
    st.sampled_from(["allow", "deny"]),
    st.lists(st.sampled_from(REQUESTERS), min_size=1, max_size=3, unique=True),
    st.sampled_from(EXTRAS),
)


def build(rules: list[tuple[str, str, list[str], str]]) -> str:
    out = ['[groups]\ng = ["/DC=org/CN=b", "fqan:/cms/sub"]\n']
    for i, (action, effect, requester, extra) in enumerate(rules):
        if effect == "deny" and extra and not extra.startswith(("owner", "credential", "auth")):
            extra = ""
        if action == "info" and extra.startswith(("max_lifetime", "limited")):
            extra = ""
        out.append(
            f'[[rule]]\nname = "r{i}"\naction = "{action}"\neffect = "{effect}"\n'
            f"requester = [{', '.join(requester)}]\n{extra}\n"
        )
    return "".join(out)


request_st = st.fixed_dictionaries(
    {
        "action": st.sampled_from(["retrieve", "renew", "info"]),
        "requester": st.sampled_from(
            ["/DC=org/CN=pilot1", "/DC=org/CN=a", "/DC=org/CN=b", "/X=1/CN=a"]
        ),
        "owner": st.sampled_from(["/DC=org/CN=a", "/DC=org/CN=o"]),
        "fqans": st.lists(
            st.sampled_from(["/atlas/Role=pilot", "/atlas/sub", "/cms", "/cms/sub/Role=x"]),
            max_size=2,
        ).map(tuple),
        "owner_fqans": st.lists(st.sampled_from(["/atlas", "/cms"]), max_size=1).map(tuple),
        "auth": st.sampled_from(["certificate", "passphrase", "pam", "anon"]),
        "credential": st.sampled_from(["", "prod", "x"]),
        "job_id": st.sampled_from([None, "7.0"]),
    }
)


@settings(max_examples=300, deadline=None)
@given(rules=st.lists(rule_st, max_size=8), request=request_st)
def test_index_agrees_with_full_scan(
    rules: list[tuple[str, str, list[str], str]], request: dict[str, object]
) -> None:
    policy_set = load(build(rules))
    auth = request.pop("auth")
    if auth == "anon":
        r = req(**request | {"requester": None, "auth": "passphrase"})  # type: ignore[arg-type]
    elif auth == "pam":
        r = req(**request | {"auth": "pam", "username": "alice"})  # type: ignore[arg-type]
    else:
        r = req(**request | {"auth": auth})  # type: ignore[arg-type]
    fast = evaluate(policy_set, r)
    full = evaluate(policy_set, r, full_trace=True)
    assert (fast.allowed, fast.reason, fast.rule, fast.max_lifetime, fast.limited) == (
        full.allowed,
        full.reason,
        full.rule,
        full.max_lifetime,
        full.limited,
    )
    # Every rule the full scan saw matching must also be among the fast path's candidates.
    assert {t.rule for t in full.trace if t.matched} <= {t.rule for t in fast.trace}
    # The model: deny wins, then any allow, else deny.
    matched = [t for t in full.trace if t.matched]
    if any(t.effect == "deny" for t in matched):
        assert not fast.allowed
    elif not matched:
        assert not fast.allowed
    else:
        assert fast.allowed
