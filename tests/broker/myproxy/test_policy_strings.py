"""myproxy-init -r/-R/-Z policy strings -> broker owner-policy patterns, and back."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.myproxy.policy_strings import (
    NOBODY,
    PolicyStringError,
    dialect_to_python,
    render_policy,
    split_alternatives,
    translate_policy,
)
from broker.policy import Subject, parse_pattern
from broker.policy._patterns import Leaf

PILOT = "/DC=org/DC=example/CN=pilot"


def matches(entries: tuple[str, ...], dn: str | None) -> bool:
    leaves: list[Leaf] = []
    for entry in entries:
        parsed = parse_pattern(entry)
        assert not hasattr(parsed, "name"), "no group refs expected"
        leaves.append(parsed)
    from broker.policy import AuthMethod

    subject = Subject(dn=dn, auth=AuthMethod.CERTIFICATE)
    return any(leaf.matches(subject) for leaf in leaves)


def test_cn_mode_string_becomes_a_glob() -> None:
    assert translate_policy("*/CN=pilot") == ("*/CN=pilot",)
    entries = translate_policy("*/CN=pilot")
    assert entries is not None
    assert matches(entries, PILOT)
    assert not matches(entries, PILOT + "2")


def test_dot_is_literal_and_question_mark_is_one_character() -> None:
    entries = translate_policy("*/CN=host/pilot.example.org")
    assert entries == ("*/CN=host/pilot.example.org",)
    assert not matches(entries, "/O=x/CN=host/pilotXexample.org")
    entries = translate_policy("/DC=org/DC=example/CN=pilot?")
    assert entries is not None and matches(entries, PILOT + "2")


def test_alternatives_are_split() -> None:
    entries = translate_policy("/C=XX/O=TestGrid/CN=host/pilot.example.org|*/CN=Bob Test")
    assert entries == ("/C=XX/O=TestGrid/CN=host/pilot.example.org", "*/CN=Bob Test")


def test_regex_features_become_re_patterns() -> None:
    entries = translate_policy("*/CN=(Jim|James) Basney")
    assert entries == ("re:.*/CN=(Jim|James) Basney",)
    assert matches(entries, "/O=NCSA/CN=James Basney")
    assert not matches(entries, "/O=NCSA/CN=Joe Basney")
    entries = translate_policy("/DC=org/DC=example/CN=pilot[0-9]+")
    assert entries is not None and matches(entries, "/DC=org/DC=example/CN=pilot42")


def test_escapes_give_back_the_ere_meaning() -> None:
    assert dialect_to_python(r"/CN=a\.b") == "/CN=a.b"  # any character
    assert dialect_to_python(r"/CN=ab\*") == "/CN=ab*"  # repetition
    assert dialect_to_python(r"/CN=\(x\)") == r"/CN=\(x\)"
    assert dialect_to_python("/CN=[[:digit:]]") == "/CN=[0-9]"


def test_star_admits_anonymous_clients() -> None:
    assert translate_policy("*") == ("*", "anonymous")
    assert translate_policy("/DC=org/*") == ("/DC=org/*",)


def test_prefixes() -> None:
    assert translate_policy("SUBJECT:*/CN=pilot") == ("*/CN=pilot",)
    assert translate_policy("fqan:/atlas/Role=pilot") == ("fqan:/atlas/Role=pilot",)
    assert translate_policy("FQAN:/atlas/Role=pilot/Capability=NULL") == ("fqan:/atlas/Role=pilot",)
    with pytest.raises(PolicyStringError, match="literal FQAN"):
        translate_policy("FQAN:/atlas/*")


def test_unset_and_bad_strings() -> None:
    assert translate_policy(None) is None
    assert translate_policy("  ") is None
    with pytest.raises(PolicyStringError):
        translate_policy("/CN=[abc")
    with pytest.raises(PolicyStringError):
        translate_policy("a||b")
    with pytest.raises(PolicyStringError):
        translate_policy("/CN=(x")


def test_split_respects_groups_and_escapes() -> None:
    assert split_alternatives(r"a|(b|c)|d\|e|[|]") == ["a", "(b|c)", r"d\|e", "[|]"]


def test_render_round_trip_for_info() -> None:
    for text in (
        "*/CN=pilot",
        "/DC=org/DC=example/CN=pilot|*/CN=Bob Test",
        "*/CN=(Jim|James) Basney",
        "*/CN=host/pilot.example.org",
        "FQAN:/atlas/Role=pilot",
    ):
        assert render_policy(translate_policy(text)) == text
    assert render_policy((NOBODY,)) is None
    assert render_policy(("*", "anonymous")) == "*"
    assert render_policy(None) is None


def test_the_nobody_marker_matches_nobody() -> None:
    assert not matches((NOBODY,), PILOT)
    assert not matches((NOBODY,), None)


_dn_chars = st.sampled_from(list("abcXYZ019 =/.-_*?|()[]+\\"))


@settings(max_examples=300, deadline=None)
@given(st.text(_dn_chars, max_size=40))
def test_fuzz_translation_never_crashes_and_agrees_with_the_dialect(text: str) -> None:
    try:
        entries = translate_policy(text)
    except PolicyStringError:
        return
    if entries is None:
        return
    for entry in entries:
        parse_pattern(entry)  # every produced entry is valid broker syntax
    # Reference semantics: the whole string as one regex, anchored.
    reference = re.compile(dialect_to_python(text.strip()))
    for dn in (PILOT, "/DC=org/DC=example/CN=Alice", "abc", "/a.b", "/CN=x|y"):
        assert matches(entries, dn) == bool(reference.fullmatch(dn)), (text, entries, dn)
