"""Turn policy file texts into a PolicySet, collecting every problem with its file and line.

Pure: the caller hands in ``{filename: text}``; reading a directory is
broker.policy_dir's job. Files are processed in name order (basename, then the
full key), which is also the order rules are listed in traces.
"""

from __future__ import annotations

import difflib
import posixpath
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from broker.errors import PolicyFileError
from broker.policy._duration import DurationError, parse_duration
from broker.policy._enums import ISSUING_ACTIONS, Action, AuthMethod, Effect
from broker.policy._model import PolicyIssue, PolicySet, Rule
from broker.policy._patterns import (
    GroupRef,
    Matcher,
    Parsed,
    PatternContext,
    PatternError,
    glob_to_regex,
    parse_pattern,
)
from broker.policy._toml_lines import TableLines, locate

RULE_KEYS = (
    "name",
    "description",
    "action",
    "effect",
    "requester",
    "owner",
    "credential",
    "auth",
    "max_lifetime",
    "limited",
    "require_job_id",
    "owner_list_required",
)
_REQUIRED = ("name", "action", "effect", "requester")
_TOP_LEVEL = ("groups", "rule")
_GROUP_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_TOML_LINE_RE = re.compile(r"at line (\d+)")
_MAX_NAME_LENGTH = 200

# Reports a problem with one key of the rule being read: (key, message).
_Issue = Callable[[str, str], None]


def _type_name(value: object) -> str:
    return {
        str: "a string",
        int: "a number",
        float: "a number",
        bool: "true/false",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


def sort_file_names(names: Iterable[str]) -> list[str]:
    """Policy files apply in name order: by basename, then by the full key."""
    return sorted(names, key=lambda name: (posixpath.basename(name), name))


@dataclass
class _GroupDef:
    name: str
    file: str
    line: int
    entries: list[Parsed]


@dataclass
class _RawRule:
    file: str
    line: int
    key_lines: dict[str, int]
    name: str
    actions: frozenset[Action]
    effect: Effect
    requester: list[Parsed]
    owner: list[Parsed] | None
    credential: tuple[str, ...] | None
    auth: frozenset[AuthMethod] | None
    max_lifetime: int | None
    limited: bool
    require_job_id: bool
    owner_list_required: bool
    description: str


class _FileReader:
    """Validate one file's data; append issues; collect group definitions and raw rules."""

    def __init__(self, file: str, issues: list[PolicyIssue]) -> None:
        self.file = file
        self.issues = issues
        self.groups: list[_GroupDef] = []
        self.rules: list[_RawRule] = []

    def issue(self, line: int, message: str) -> None:
        self.issues.append(PolicyIssue(self.file, line, message))

    def read(self, text: str) -> None:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            found = _TOML_LINE_RE.search(str(exc))
            self.issue(int(found.group(1)) if found else 1, f"not valid TOML: {exc}")
            return
        tables = locate(text)
        root = tables[0]
        for key, value in data.items():
            line = root.keys.get(key) or _first_header_line(tables, key)
            if key == "groups":
                self._read_groups(value, line, tables)
            elif key == "rule":
                self._read_rules(value, line, tables)
            else:
                self.issue(
                    line,
                    f'unknown key "{key}"{_did_you_mean(key, _TOP_LEVEL)}; a policy file holds '
                    "a [groups] table and [[rule]] tables",
                )

    def _read_groups(self, value: object, line: int, tables: list[TableLines]) -> None:
        if not isinstance(value, dict):
            self.issue(line, f"groups must be a table ([groups]), not {_type_name(value)}")
            return
        key_lines: dict[str, int] = {}
        for table in tables:
            if table.name == "groups" and not table.is_array:
                key_lines.update(table.keys)
        for name, members in value.items():
            at = key_lines.get(name, line)
            if not _GROUP_NAME_RE.fullmatch(name):
                self.issue(at, f'bad group name "{name}": use letters, digits, "_", "." and "-"')
                continue
            entries = self._patterns(members, at, f'group "{name}"', "group")
            if entries is not None:
                self.groups.append(_GroupDef(name, self.file, at, entries))

    def _read_rules(self, value: object, line: int, tables: list[TableLines]) -> None:
        if not isinstance(value, list):
            self.issue(line, f"rule must be an array of tables ([[rule]]), not {_type_name(value)}")
            return
        rule_tables = [t for t in tables if t.name == "rule" and t.is_array]
        for number, item in enumerate(value):
            # Inline arrays (rule = [{...}]) have no per-rule header: fall back to the key line.
            table = rule_tables[number] if len(rule_tables) == len(value) else None
            at = table.line if table else line
            keys = table.keys if table else {}
            if not isinstance(item, dict):
                self.issue(at, f"each rule must be a table, not {_type_name(item)}")
                continue
            self._read_rule(item, at, keys)

    def _read_rule(self, item: dict[str, Any], at: int, keys: dict[str, int]) -> None:
        label = f'rule "{item["name"]}"' if isinstance(item.get("name"), str) else "rule"
        before = len(self.issues)

        def issue(key: str, message: str) -> None:
            self.issue(keys.get(key, at), f"{label}: {message}")

        for key in item:
            if key not in RULE_KEYS:
                issue(key, f'unknown key "{key}"{_did_you_mean(key, RULE_KEYS)}')
        for key in _REQUIRED:
            if key not in item:
                self.issue(at, f'{label}: missing required key "{key}"')

        name = item.get("name", "")
        if "name" in item and (not isinstance(name, str) or not name.strip()):
            issue("name", f"name must be a non-empty string, not {_type_name(name)}")
        elif isinstance(name, str) and len(name) > _MAX_NAME_LENGTH:
            issue("name", f"name is longer than {_MAX_NAME_LENGTH} characters")

        actions = self._actions(item.get("action"), issue) if "action" in item else frozenset()
        effect = self._effect(item, issue)
        if (
            effect is Effect.ALLOW
            and Action.RETRIEVE_KEY in actions
            and _names_star(item.get("action"))
        ):
            # Handing out the private key must be named: an allow "*" does not grant it
            # (a deny "*" still forbids it).
            actions = actions - {Action.RETRIEVE_KEY}

        requester = (
            self._patterns(item["requester"], keys.get("requester", at), label, "requester")
            if "requester" in item
            else None
        )
        if requester is not None and not requester:
            issue("requester", "requester is empty, so the rule could never match")
        owner = None
        if "owner" in item:
            owner = self._patterns(item["owner"], keys.get("owner", at), label, "owner")
            if owner is not None and not owner:
                issue("owner", "owner is empty, so the rule could never match (leave it out)")

        credential = self._credential(item, issue)
        auth = self._auth(item, issue)

        max_lifetime = self._max_lifetime(item, issue)
        limited = self._bool(item, "limited", issue)
        require_job_id = self._bool(item, "require_job_id", issue)
        owner_list_required = self._bool(item, "owner_list_required", issue)
        description = item.get("description", "")
        if not isinstance(description, str):
            issue("description", f"description must be a string, not {_type_name(description)}")
            description = ""

        self._keys_without_effect(item, effect, actions, issue)

        if len(self.issues) == before and requester is not None:
            self.rules.append(
                _RawRule(
                    file=self.file,
                    line=at,
                    key_lines=keys,
                    name=name,
                    actions=actions,
                    effect=effect,
                    requester=requester,
                    owner=owner,
                    credential=credential,
                    auth=auth,
                    max_lifetime=max_lifetime,
                    limited=limited,
                    require_job_id=require_job_id,
                    owner_list_required=owner_list_required,
                    description=description,
                )
            )

    @staticmethod
    def _effect(item: dict[str, Any], issue: _Issue) -> Effect:
        if "effect" not in item:
            return Effect.DENY
        raw_effect = item["effect"]
        if raw_effect not in ("allow", "deny"):
            issue("effect", f'effect must be "allow" or "deny", not {raw_effect!r}')
            return Effect.DENY
        return Effect(raw_effect)

    @staticmethod
    def _max_lifetime(item: dict[str, Any], issue: _Issue) -> int | None:
        if "max_lifetime" not in item:
            return None
        raw = item["max_lifetime"]
        if not isinstance(raw, str):
            issue(
                "max_lifetime",
                f'max_lifetime must be a string with a unit such as "12h", not {_type_name(raw)}',
            )
            return None
        try:
            return parse_duration(raw)
        except DurationError as exc:
            issue("max_lifetime", str(exc))
            return None

    @staticmethod
    def _keys_without_effect(
        item: dict[str, Any], effect: Effect, actions: frozenset[Action], issue: _Issue
    ) -> None:
        """Warn about limits that cannot apply: on a deny rule, or where nothing is issued."""
        if effect is Effect.DENY and "effect" in item:
            for key in ("max_lifetime", "limited", "require_job_id"):
                if key in item:
                    issue(key, f"{key} has no effect on a deny rule; remove it")
        if actions and not actions & ISSUING_ACTIONS:
            for key in ("max_lifetime", "limited"):
                if key in item:
                    issue(
                        key,
                        f"{key} has no effect on {'/'.join(sorted(actions))} (no proxy is issued)",
                    )

    def _actions(self, raw: object, issue: _Issue) -> frozenset[Action]:
        values = [raw] if isinstance(raw, str) else raw
        if not isinstance(values, list) or not values:
            issue(
                "action",
                f"action must be an action name or a non-empty list, not {_type_name(raw)}",
            )
            return frozenset()
        actions: set[Action] = set()
        for value in values:
            if value == "*":
                actions.update(Action)
                continue
            try:
                actions.add(Action(value))
            except ValueError:
                choices = [a.value for a in Action]
                issue(
                    "action",
                    f"unknown action {value!r}{_did_you_mean(str(value), choices)}; "
                    f'use {", ".join(choices)} or "*"',
                )
        return frozenset(actions)

    def _credential(self, item: dict[str, Any], issue: _Issue) -> tuple[str, ...] | None:
        if "credential" not in item:
            return None
        raw = item["credential"]
        values = [raw] if isinstance(raw, str) else raw
        if not isinstance(values, list) or not values:
            issue(
                "credential",
                f"credential must be a glob or a non-empty list, not {_type_name(raw)}",
            )
            return None
        if not all(isinstance(v, str) for v in values):
            issue("credential", "every credential glob must be a string")
            return None
        return tuple(values)

    def _auth(self, item: dict[str, Any], issue: _Issue) -> frozenset[AuthMethod] | None:
        if "auth" not in item:
            return None
        raw = item["auth"]
        values = [raw] if isinstance(raw, str) else raw
        if not isinstance(values, list) or not values:
            issue("auth", f"auth must be a method or a non-empty list, not {_type_name(raw)}")
            return None
        methods: set[AuthMethod] = set()
        for value in values:
            try:
                methods.add(AuthMethod(value))
            except ValueError:
                issue(
                    "auth",
                    f"unknown authentication method {value!r}; use "
                    f"{', '.join(m.value for m in AuthMethod)}",
                )
        return frozenset(methods)

    def _bool(self, item: dict[str, Any], key: str, issue: _Issue) -> bool:
        value = item.get(key, False)
        if not isinstance(value, bool):
            issue(key, f"{key} must be true or false, not {_type_name(value)}")
            return False
        return value

    def _patterns(
        self, raw: object, line: int, label: str, context: PatternContext
    ) -> list[Parsed] | None:
        values = [raw] if isinstance(raw, str) else raw
        if not isinstance(values, list):
            self.issue(line, f"{label}: expected a list of patterns, not {_type_name(raw)}")
            return None
        parsed: list[Parsed] = []
        ok = True
        for value in values:
            if not isinstance(value, str):
                self.issue(
                    line, f"{label}: every pattern must be a string, not {_type_name(value)}"
                )
                ok = False
                continue
            try:
                parsed.append(parse_pattern(value, context=context))
            except PatternError as exc:
                self.issue(line, f"{label}: {exc}")
                ok = False
        return parsed if ok else None


def _first_header_line(tables: list[TableLines], name: str) -> int:
    for table in tables:
        if table.name == name or table.name.startswith(name + "."):
            return table.line
    return 1


def _resolve_groups(
    defs: list[_GroupDef], issues: list[PolicyIssue]
) -> dict[str, tuple[Matcher, ...]]:
    """Flatten nested groups; report duplicates, undefined references and cycles."""
    by_name: dict[str, _GroupDef] = {}
    for group in defs:
        first = by_name.get(group.name)
        if first is not None:
            issues.append(
                PolicyIssue(
                    group.file,
                    group.line,
                    f'group "{group.name}" is already defined at {first.file}:{first.line}',
                )
            )
            continue
        by_name[group.name] = group

    resolved: dict[str, tuple[Matcher, ...]] = {}
    broken: set[str] = set()

    def visit(name: str, path: list[str]) -> tuple[Matcher, ...] | None:
        if name in resolved:
            return resolved[name]
        if name in broken:
            return None
        group = by_name[name]
        if name in path:
            cycle = " -> ".join([*path[path.index(name) :], name])
            issues.append(PolicyIssue(group.file, group.line, f"group cycle: {cycle}"))
            broken.update(path[path.index(name) :])
            return None
        members: list[Matcher] = []
        ok = True
        for entry in group.entries:
            if isinstance(entry, GroupRef):
                if entry.name not in by_name:
                    issues.append(
                        PolicyIssue(
                            group.file,
                            group.line,
                            f'group "{name}": undefined group "{entry.name}"'
                            f"{_did_you_mean(entry.name, by_name)}",
                        )
                    )
                    ok = False
                    continue
                inner = visit(entry.name, [*path, name])
                if inner is None:
                    ok = False
                    continue
                members.extend(inner)
            else:
                members.append(Matcher(entry.text, entry))
        if not ok:
            broken.add(name)
            return None
        resolved[name] = tuple(members)
        return resolved[name]

    for name in by_name:
        visit(name, [])
    return resolved


def _resolve_entries(
    entries: list[Parsed],
    groups: Mapping[str, tuple[Matcher, ...]],
    known: Iterable[str],
) -> tuple[tuple[Matcher, ...], list[str]]:
    """Expand group references; return matchers and the names of undefined groups."""
    out: list[Matcher] = []
    missing: list[str] = []
    for entry in entries:
        if isinstance(entry, GroupRef):
            members = groups.get(entry.name)
            if members is None:
                missing.append(entry.name)
                continue
            out.extend(Matcher(entry.text, member.leaf) for member in members)
        else:
            out.append(Matcher(entry.text, entry))
    return tuple(out), [name for name in missing if name not in known]


def check_policy_files(files: Mapping[str, str]) -> tuple[PolicySet | None, list[PolicyIssue]]:
    """Validate and compile; return (PolicySet, []) or (None, every issue found)."""
    policy_set, issues = compile_policy_files(files)
    return (None, issues) if issues else (policy_set, [])


def compile_policy_files(files: Mapping[str, str]) -> tuple[PolicySet, list[PolicyIssue]]:
    """Compile what can be compiled and return it with every issue found.

    The PolicySet holds only the rules without problems; it exists so that
    checks on the rules (such as unsafe_rules) can still run and be reported
    together with the file errors. Never *enforce* a set that came with issues.
    """
    issues: list[PolicyIssue] = []
    readers: list[_FileReader] = []
    names = sort_file_names(files)
    for name in names:
        reader = _FileReader(name, issues)
        reader.read(files[name])
        readers.append(reader)

    group_defs = [group for reader in readers for group in reader.groups]
    groups = _resolve_groups(group_defs, issues)
    defined = {group.name for group in group_defs}

    rules: list[Rule] = []
    seen: dict[str, Rule] = {}
    for raw in (rule for reader in readers for rule in reader.rules):
        requester, missing = _resolve_entries(raw.requester, groups, defined)
        owner: tuple[Matcher, ...] | None = None
        owner_missing: list[str] = []
        if raw.owner is not None:
            owner, owner_missing = _resolve_entries(raw.owner, groups, defined)
        problem = False
        for key, names_missing in (("requester", missing), ("owner", owner_missing)):
            for group_name in names_missing:
                issues.append(
                    PolicyIssue(
                        raw.file,
                        raw.key_lines.get(key, raw.line),
                        f'rule "{raw.name}": undefined group "{group_name}"'
                        f"{_did_you_mean(group_name, defined)}",
                    )
                )
                problem = True
        first = seen.get(raw.name)
        if first is not None:
            issues.append(
                PolicyIssue(
                    raw.file,
                    raw.key_lines.get("name", raw.line),
                    f'duplicate rule name "{raw.name}" (first defined at {first.where}); '
                    "rule names must be unique across all files",
                )
            )
            problem = True
        if problem:
            continue
        credential_regex = None
        if raw.credential is not None:
            credential_regex = re.compile(
                "|".join(f"(?:{glob_to_regex(glob)})" for glob in raw.credential), re.DOTALL
            )
        rule = Rule(
            name=raw.name,
            file=raw.file,
            line=raw.line,
            position=len(rules),
            actions=raw.actions,
            effect=raw.effect,
            requester=requester,
            owner=owner,
            credential=raw.credential,
            credential_regex=credential_regex,
            auth=raw.auth,
            max_lifetime=raw.max_lifetime,
            limited=raw.limited,
            require_job_id=raw.require_job_id,
            owner_list_required=raw.owner_list_required,
            description=raw.description,
        )
        seen[raw.name] = rule
        rules.append(rule)

    sort_issues(issues, names)
    return PolicySet(rules=tuple(rules), groups=groups, files=tuple(names)), issues


def sort_issues(issues: list[PolicyIssue], names: list[str]) -> None:
    """Order issues by file (policy order) then line, in place."""
    issues.sort(key=lambda i: (names.index(i.file) if i.file in names else -1, i.line))


def format_issues(issues: Iterable[PolicyIssue]) -> str:
    items = list(issues)
    head = f"{len(items)} problem{'s' if len(items) != 1 else ''} in the policy files:"
    return "\n".join([head, *(f"  {issue}" for issue in items)])


def load_policy(files: Mapping[str, str]) -> PolicySet:
    """Compile ``{filename: text}`` into a PolicySet.

    Raises PolicyFileError listing every problem as ``file:line: message``.
    Unsafe rules (see :func:`unsafe_rules`) are *not* load errors here: the
    server and ``broker policy check`` refuse them separately.
    """
    policy_set, issues = check_policy_files(files)
    if policy_set is None:
        raise PolicyFileError(format_issues(issues))
    return policy_set


def _names_star(raw: object) -> bool:
    """Whether a rule's ``action`` value is or contains "*"."""
    return raw == "*" or (isinstance(raw, list) and "*" in raw)
