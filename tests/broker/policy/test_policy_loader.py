"""Loading: every error kind, with file and line, all collected."""

from __future__ import annotations

import pytest

from broker.errors import PolicyFileError
from broker.policy import PolicyIssue, check_policy_files, load_policy
from broker.policy._toml_lines import locate


def issues_of(files: dict[str, str]) -> list[PolicyIssue]:
    policy_set, issues = check_policy_files(files)
    assert policy_set is None
    return issues


def only(files: dict[str, str]) -> PolicyIssue:
    issues = issues_of(files)
    assert len(issues) == 1, issues
    return issues[0]


GOOD = """\
[groups]
pilots = ["/DC=org/CN=pilot*"]

[[rule]]
name = "r1"
action = "retrieve"
effect = "allow"
requester = ["group:pilots"]
"""


RULE_ONLY = GOOD.split("\n", 3)[3].replace("group:pilots", "/DC=org/CN=pilot*")


def test_good_file_loads() -> None:
    policy_set = load_policy({"a.toml": GOOD})
    assert policy_set.summary() == "1 rule, 1 group in 1 file"
    assert policy_set.rules[0].line == 4


def test_unknown_key_with_line_and_suggestion() -> None:
    text = GOOD + 'max_lifetme = "12h"\n'
    issue = only({"p/a.toml": text})
    assert (issue.file, issue.line) == ("p/a.toml", 9)
    assert 'unknown key "max_lifetme"' in issue.message
    assert 'did you mean "max_lifetime"' in issue.message


def test_unknown_top_level_table() -> None:
    issue = only({"a.toml": GOOD + "\n[rules]\nx = 1\n"})
    assert issue.line == 10 and 'unknown key "rules"' in issue.message


def test_bad_regex_line() -> None:
    text = GOOD.replace('requester = ["group:pilots"]', 'requester = [\n  "re:/CN=(x",\n]')
    issue = only({"a.toml": text})
    assert issue.line == 8 and "bad regular expression" in issue.message


def test_undefined_group_in_rule_and_in_group() -> None:
    text = GOOD.replace('"group:pilots"', '"group:pilot"') + "\n[groups.x]\n"
    issues = issues_of({"a.toml": GOOD.replace('"group:pilots"', '"group:pilotz"')})
    assert len(issues) == 1
    assert issues[0].line == 8 and 'undefined group "pilotz"' in issues[0].message
    assert 'did you mean "pilots"' in issues[0].message
    issue = only({"a.toml": '[groups]\na = ["/CN=x"]\nb = ["group:nope"]\n'})
    assert issue.line == 3 and 'undefined group "nope"' in issue.message
    del text


def test_group_cycle_detected() -> None:
    text = '[groups]\na = ["group:b"]\nb = ["group:c", "/CN=x"]\nc = ["group:a"]\n'
    issue = only({"a.toml": text})
    assert "group cycle: a -> b -> c -> a" in issue.message and issue.line == 2


def test_self_cycle() -> None:
    assert "a -> a" in only({"a.toml": '[groups]\na = ["group:a"]\n'}).message


def test_nested_groups_flatten() -> None:
    text = (
        '[groups]\ninner = ["/CN=x", "fqan:/atlas"]\nouter = ["group:inner", "/CN=y"]\n'
        + '[[rule]]\nname = "r"\naction = "info"\neffect = "allow"\nrequester = ["group:outer"]\n'
    )
    policy_set = load_policy({"a.toml": text})
    assert [m.leaf.text for m in policy_set.groups["outer"]] == ["/CN=x", "fqan:/atlas", "/CN=y"]


def test_duplicate_rule_name_across_files() -> None:
    issue = only({"10-a.toml": GOOD, "20-b.toml": GOOD.split("\n", 2)[2]})
    assert issue.file == "20-b.toml" and issue.line == 3
    assert 'duplicate rule name "r1" (first defined at 10-a.toml:4)' in issue.message


def test_duplicate_group_across_files() -> None:
    issue = only({"1.toml": '[groups]\ng = ["/CN=x"]\n', "2.toml": '\n[groups]\ng = ["/CN=y"]\n'})
    assert (
        issue.file == "2.toml"
        and issue.line == 3
        and "already defined at 1.toml:2" in issue.message
    )


@pytest.mark.parametrize(
    ("line", "replacement", "expected"),
    [
        (6, 'action = "retreive"', "unknown action 'retreive'"),
        (6, "action = []", "action must be"),
        (7, 'effect = "permit"', "effect must be"),
        (8, "requester = []", "requester is empty"),
        (8, "requester = 5", "expected a list of patterns"),
        (8, 'requester = ["CN=x"]', "OpenSSL slash form"),
        (5, "name = 3", "name must be a non-empty string"),
    ],
)
def test_rule_field_errors(line: int, replacement: str, expected: str) -> None:
    lines = GOOD.splitlines()
    lines[line - 1] = replacement
    issue = only({"a.toml": "\n".join(lines) + "\n"})
    assert issue.line == line and expected in issue.message, issue


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ('max_lifetime = "12"', "bad duration"),
        ('max_lifetime = "1h1h"', "bad duration"),
        ("max_lifetime = 3600", "max_lifetime must be a string"),
        ('limited = "yes"', "limited must be true or false"),
        ("require_job_id = 1", "require_job_id must be true or false"),
        ('credential = [""]', None),
        ("credential = []", "credential must be"),
        ('auth = ["kerberos"]', "unknown authentication method"),
        ('owner = ["passphrase"]', "credential owner"),
        ("description = 4", "description must be a string"),
    ],
)
def test_optional_field_errors(extra: str, expected: str | None) -> None:
    text = GOOD + extra + "\n"
    if expected is None:
        load_policy({"a.toml": text})
        return
    issue = only({"a.toml": text})
    assert issue.line == 9 and expected in issue.message, issue


def test_missing_required_keys_reported_at_rule_line() -> None:
    issues = issues_of({"a.toml": '\n\n[[rule]]\nname = "x"\n'})
    assert {i.line for i in issues} == {3}
    assert {i.message.split('"')[-2] for i in issues} == {"action", "effect", "requester"}


def test_caps_on_deny_and_info_rules_are_errors() -> None:
    deny = GOOD.replace('effect = "allow"', 'effect = "deny"') + 'max_lifetime = "1h"\n'
    assert "no effect on a deny rule" in only({"a.toml": deny}).message
    info = GOOD.replace('action = "retrieve"', 'action = ["info", "destroy"]') + "limited = true\n"
    assert "no effect on destroy/info" in only({"a.toml": info}).message


def test_toml_syntax_error_line() -> None:
    issue = only({"a.toml": GOOD + "limited = \n"})
    assert issue.line == 9 and "not valid TOML" in issue.message


def test_all_errors_collected_across_files_in_order() -> None:
    files = {
        "20-b.toml": GOOD.replace("r1", "r2")
        .replace('"allow"', '"maybe"')
        .replace("pilots =", "p2 =")
        + "bogus = 1\n",
        "10-a.toml": GOOD.replace('"retrieve"', '"fetch"'),
    }
    issues = issues_of(files)
    assert [(i.file, i.line) for i in issues] == [
        ("10-a.toml", 6),
        ("20-b.toml", 7),
        ("20-b.toml", 9),
    ]
    with pytest.raises(PolicyFileError) as info:
        load_policy(files)
    assert "3 problems" in info.value.message
    assert "10-a.toml:6:" in info.value.message and "20-b.toml:9:" in info.value.message


def test_inline_rule_array_falls_back_to_key_line() -> None:
    text = (
        '\nrule = [{name = "x", action = "info", effect = "allow", requester = ["/CN=a"], z = 1}]\n'
    )
    issue = only({"a.toml": text})
    assert issue.line == 2 and 'unknown key "z"' in issue.message


def test_line_scanner_ignores_structure_inside_strings_and_arrays() -> None:
    text = (
        'description = """\n[[rule]]\nname = "fake"\n"""\n'
        "[[rule]]  # real\n"
        'requester = [\n  "a",  # [[rule]]\n  "name = x",\n]\n'
        "name = 'n'\n"
        '[[ "rule" ]]\n'
        '"quoted key" = 1\n'
    )
    tables = locate(text)
    rules = [t for t in tables if t.name == "rule"]
    assert [t.line for t in rules] == [5, 11]
    assert rules[0].keys == {"requester": 6, "name": 10}
    assert rules[1].keys == {"quoted key": 12}
    assert tables[0].keys == {"description": 1}


def test_rules_keep_file_order() -> None:
    files = {
        "b/20.toml": RULE_ONLY.replace("r1", "second"),
        "a/10.toml": GOOD.replace("r1", "first"),
    }
    policy_set = load_policy(files)
    assert [r.name for r in policy_set.rules] == ["first", "second"]
    assert policy_set.files == ("a/10.toml", "b/20.toml")
