"""Every subject pattern form, matched on its own."""

from __future__ import annotations

import pytest

from broker.policy import AuthMethod, PatternError, Subject, parse_fqan, parse_pattern
from broker.policy._patterns import GroupRef, Leaf, matches_any_dn


def leaf(text: str, context: str = "requester") -> Leaf:
    parsed = parse_pattern(text, context=context)  # type: ignore[arg-type]
    assert not isinstance(parsed, GroupRef)
    return parsed


def dn(value: str) -> Subject:
    return Subject(dn=value, auth=AuthMethod.CERTIFICATE)


def fq(*values: str) -> Subject:
    return Subject(
        dn="/CN=x", fqans=tuple(parse_fqan(v) for v in values), auth=AuthMethod.CERTIFICATE
    )


class TestDnGlob:
    def test_exact(self) -> None:
        p = leaf("/DC=org/DC=example/CN=Alice")
        assert p.matches(dn("/DC=org/DC=example/CN=Alice"))
        assert not p.matches(dn("/DC=org/DC=example/CN=Alice2"))
        assert not p.matches(dn("/DC=org/DC=example/CN=alice"))  # case-sensitive

    def test_star_crosses_slash(self) -> None:
        p = leaf("/DC=org/*/CN=pilot")
        assert p.matches(dn("/DC=org/DC=example/OU=Robots/CN=pilot"))
        assert leaf("*/CN=pilot").matches(dn("/DC=org/CN=pilot"))
        assert not leaf("*/CN=pilot").matches(dn("/DC=org/CN=pilot/CN=123"))

    def test_question_mark_is_one_char(self) -> None:
        p = leaf("/CN=pilot??")
        assert p.matches(dn("/CN=pilot01"))
        assert not p.matches(dn("/CN=pilot1"))
        assert not p.matches(dn("/CN=pilot123"))

    def test_brackets_and_regex_chars_are_literal(self) -> None:
        p = leaf("/CN=a[1]+(b).*")
        assert p.matches(dn("/CN=a[1]+(b).xyz"))
        assert not p.matches(dn("/CN=a1+(b).xyz"))

    def test_whole_dn_only(self) -> None:
        assert not leaf("/CN=pilot").matches(dn("/O=x/CN=pilot"))

    def test_no_dn_never_matches(self) -> None:
        assert not leaf("*").matches(Subject(dn=None, auth=AuthMethod.PASSPHRASE))

    @pytest.mark.parametrize("bad", ["CN=Alice", "DC=org,CN=x", "", " /CN=x", "dn:/CN=x"])
    def test_rejects_non_slash_form(self, bad: str) -> None:
        with pytest.raises(PatternError):
            parse_pattern(bad)


class TestRegex:
    def test_full_match(self) -> None:
        p = leaf("re:/DC=org/DC=example/CN=[a-z]+")
        assert p.matches(dn("/DC=org/DC=example/CN=alice"))
        assert not p.matches(dn("/DC=org/DC=example/CN=alice/CN=proxy"))
        assert not p.matches(dn("/X=1/DC=org/DC=example/CN=alice"))

    def test_bad_regex_names_the_problem(self) -> None:
        with pytest.raises(PatternError, match="bad regular expression"):
            parse_pattern("re:/CN=(unclosed")


class TestFqan:
    def test_vo_matches_subgroups_and_roles(self) -> None:
        p = leaf("fqan:/atlas")
        assert p.matches(fq("/atlas/Role=NULL/Capability=NULL"))
        assert p.matches(fq("/atlas/sub/Role=production/Capability=NULL"))
        assert not p.matches(fq("/atlasx/Role=NULL/Capability=NULL"))
        assert not p.matches(fq("/cms/atlas"))

    def test_role_in_subgroup(self) -> None:
        p = leaf("fqan:/atlas/Role=production")
        assert p.matches(fq("/atlas/Role=production/Capability=NULL"))
        assert p.matches(fq("/atlas/sub/deeper/Role=production/Capability=NULL"))
        assert not p.matches(fq("/atlas/sub/Role=pilot/Capability=NULL"))
        assert not p.matches(fq("/atlas/sub/Role=NULL/Capability=NULL"))

    def test_subgroup_pattern_does_not_match_parent(self) -> None:
        p = leaf("fqan:/atlas/sub")
        assert p.matches(fq("/atlas/sub/x"))
        assert not p.matches(fq("/atlas/Role=NULL/Capability=NULL"))
        assert not p.matches(fq("/atlas/subway"))

    def test_role_null_means_no_role(self) -> None:
        p = leaf("fqan:/atlas/Role=NULL")
        assert p.matches(fq("/atlas/Role=NULL/Capability=NULL"))
        assert p.matches(fq("/atlas/sub"))
        assert not p.matches(fq("/atlas/Role=production/Capability=NULL"))

    def test_capability_null_in_pattern_is_ignored(self) -> None:
        p = leaf("fqan:/atlas/Role=NULL/Capability=NULL")
        assert p.matches(fq("/atlas/sub/Role=NULL/Capability=NULL"))

    def test_any_of_several_fqans(self) -> None:
        assert leaf("fqan:/cms").matches(fq("/atlas", "/cms/Role=lcgadmin"))

    @pytest.mark.parametrize(
        "bad",
        [
            "fqan:atlas",
            "fqan:/atlas/*",
            "fqan:/atlas/Role=*",
            "fqan:/at las",
            "fqan:/atlas/Capability=x",
            "fqan:/Role=x",
            "fqan:/atlas/Role=a/sub",
        ],
    )
    def test_rejects(self, bad: str) -> None:
        with pytest.raises(PatternError):
            parse_pattern(bad)


class TestAuthForms:
    def test_pam(self) -> None:
        p = leaf("pam:atl*")
        assert p.matches(Subject(dn=None, auth=AuthMethod.PAM, username="atlasuser"))
        assert not p.matches(Subject(dn=None, auth=AuthMethod.PAM, username="cmsuser"))
        # A username alone is not PAM authentication.
        assert not p.matches(Subject(dn=None, auth=AuthMethod.PASSPHRASE, username="atlasuser"))

    def test_passphrase(self) -> None:
        p = leaf("passphrase")
        assert p.matches(Subject(dn=None, auth=AuthMethod.PASSPHRASE))
        assert p.matches(Subject(dn="/CN=x", auth=AuthMethod.PASSPHRASE))
        assert not p.matches(Subject(dn="/CN=x", auth=AuthMethod.CERTIFICATE))

    def test_anonymous(self) -> None:
        p = leaf("anonymous")
        assert p.matches(Subject(dn=None, auth=AuthMethod.PASSPHRASE))
        assert not p.matches(Subject(dn="/CN=x", auth=AuthMethod.PASSPHRASE))
        assert not p.matches(Subject(dn=None))  # an owner is never anonymous

    def test_self(self) -> None:
        p = leaf("self")
        assert p.matches(Subject(dn="/CN=a", auth=AuthMethod.CERTIFICATE, owner_dn="/CN=a"))
        assert not p.matches(Subject(dn="/CN=a", auth=AuthMethod.CERTIFICATE, owner_dn="/CN=b"))

    @pytest.mark.parametrize("text", ["pam:*", "passphrase", "anonymous", "self"])
    def test_not_allowed_for_owner(self, text: str) -> None:
        with pytest.raises(PatternError, match="credential owner"):
            parse_pattern(text, context="owner")

    def test_group_reference(self) -> None:
        assert parse_pattern("group:atlas-pilots") == GroupRef("group:atlas-pilots", "atlas-pilots")
        with pytest.raises(PatternError):
            parse_pattern("group:bad name")

    def test_unknown_prefix(self) -> None:
        with pytest.raises(PatternError, match="unknown pattern kind"):
            parse_pattern("voms:/atlas")


@pytest.mark.parametrize("text", ["*", "**", "/*", "re:.*", "re:/.+", "re:.+"])
def test_any_dn_detection(text: str) -> None:
    assert matches_any_dn(leaf(text))


@pytest.mark.parametrize(
    "text", ["/DC=org/*", "*/CN=pilot", "re:/DC=.*", "fqan:/atlas", "passphrase"]
)
def test_not_any_dn(text: str) -> None:
    assert not matches_any_dn(leaf(text))
