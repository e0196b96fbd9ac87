"""Value objects of the policy engine: requests, owner policies, rules, decisions."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from broker.errors import AuthorizationError, DnSyntaxError, InputError
from broker.policy._duration import format_duration
from broker.policy._enums import Action, AuthMethod, Effect
from broker.policy._fqan import Fqan, FqanError, parse_fqan
from broker.policy._patterns import Matcher, Subject, TokenClaims

# A slash-form DN: "/attr=value" repeated. Values may contain "/" (hostnames
# in service DNs do), so only the leading "/X=" shape and the absence of
# control characters are enforced here; broker.pki owns full DN parsing.
_DN_RE = re.compile(r"/[A-Za-z][A-Za-z0-9.\-]*=[^\x00-\x1f\x7f]*")
_MAX_DN_LENGTH = 2048


def validate_dn(dn: str, *, what: str = "DN") -> str:
    """Return ``dn`` if it looks like an OpenSSL slash-form DN; raise DnSyntaxError otherwise."""
    if not isinstance(dn, str) or not _DN_RE.fullmatch(dn) or len(dn) > _MAX_DN_LENGTH:
        raise DnSyntaxError(
            f'bad {what} "{dn}": write it in the OpenSSL slash form, '
            'e.g. "/DC=org/DC=example/CN=Alice"',
            reason="bad_dn",
        )
    return dn


def _parse_fqans(values: tuple[str, ...], what: str) -> tuple[Fqan, ...]:
    parsed: list[Fqan] = []
    for value in values:
        try:
            parsed.append(parse_fqan(value))
        except FqanError as exc:
            raise InputError(f"bad {what}: {exc}", reason="bad_fqan") from None
    return tuple(parsed)


@dataclass(frozen=True)
class Request:
    """One authorization question: may this requester do ``action`` to that credential?

    ``requester_dn`` is None only when no certificate was presented (passphrase
    or PAM login). ``credential`` is the credential name; "" is the default
    (unnamed) credential, as in MyProxy. Construction validates everything and
    raises InputError subclasses, so a Request that exists is well-formed.
    """

    action: Action
    requester_dn: str | None
    owner_dn: str
    requester_fqans: tuple[str, ...] = ()
    owner_fqans: tuple[str, ...] = ()
    auth: AuthMethod = AuthMethod.CERTIFICATE
    credential: str = ""
    job_id: str | None = None
    username: str | None = None
    token: TokenClaims | None = None  # the verified bearer token (auth = token)
    requester: Subject = field(init=False, repr=False, compare=False)
    owner: Subject = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            action = Action(self.action)
        except ValueError:
            raise InputError(
                f'unknown action "{self.action}"; use one of {", ".join(a.value for a in Action)}'
            ) from None
        try:
            auth = AuthMethod(self.auth)
        except ValueError:
            raise InputError(
                f'unknown authentication method "{self.auth}"; use one of '
                f"{', '.join(a.value for a in AuthMethod)}"
            ) from None
        if self.requester_dn is not None:
            validate_dn(self.requester_dn, what="requester DN")
        elif auth is AuthMethod.CERTIFICATE:
            raise InputError("a certificate-authenticated request needs the requester's DN")
        validate_dn(self.owner_dn, what="owner DN")
        if (auth is AuthMethod.TOKEN) != (self.token is not None):
            raise InputError(
                "a token-authenticated request needs the token's claims, and "
                "only such a request may carry them"
            )
        if auth is AuthMethod.PAM and not self.username:
            raise InputError("a PAM-authenticated request needs the username")
        if self.job_id is not None and not self.job_id.strip():
            raise InputError("an empty job id was given; leave it out instead")
        req_fqans = tuple(self.requester_fqans)
        own_fqans = tuple(self.owner_fqans)
        object.__setattr__(self, "action", action)
        object.__setattr__(self, "auth", auth)
        object.__setattr__(self, "requester_fqans", req_fqans)
        object.__setattr__(self, "owner_fqans", own_fqans)
        object.__setattr__(
            self,
            "requester",
            Subject(
                dn=self.requester_dn,
                fqans=_parse_fqans(req_fqans, "requester FQAN"),
                auth=auth,
                username=self.username if auth is AuthMethod.PAM else None,
                owner_dn=self.owner_dn,
                token=self.token,
            ),
        )
        object.__setattr__(
            self, "owner", Subject(dn=self.owner_dn, fqans=_parse_fqans(own_fqans, "owner FQAN"))
        )


@dataclass(frozen=True)
class OwnerPolicy:
    """The lists a credential's owner set at delegation (``broker-init -r/-Z/-R``).

    Each list holds subject patterns in the site language (DN globs, ``re:``,
    ``fqan:``, ``group:``...). ``None`` means "not set": the site policy alone
    decides. An empty tuple means "nobody". These lists can only narrow what the
    site allows, never widen it.

    ``retrievers``: who may retrieve with the passphrase (or PAM).
    ``trusted_retrievers``: who may retrieve by certificate alone, no passphrase.
    ``renewers``: who may renew.
    """

    retrievers: tuple[str, ...] | None = None
    trusted_retrievers: tuple[str, ...] | None = None
    renewers: tuple[str, ...] | None = None
    key_retrievers: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    """A compiled site rule. ``position`` is its global order across files."""

    name: str
    file: str
    line: int
    position: int
    actions: frozenset[Action]
    effect: Effect
    requester: tuple[Matcher, ...]
    owner: tuple[Matcher, ...] | None = None
    credential: tuple[str, ...] | None = None
    credential_regex: re.Pattern[str] | None = None
    auth: frozenset[AuthMethod] | None = None
    max_lifetime: int | None = None
    limited: bool = False
    require_job_id: bool = False
    #: MyProxy's default_* = "none": the rule applies only to credentials whose owner set
    #: a list for the action (-r/-Z/-R/-E); the owner's list then decides who.
    owner_list_required: bool = False
    description: str = ""

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True, slots=True)
class RuleRef:
    """Which rule (or owner-policy list) decided."""

    file: str
    name: str
    line: int

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "name": self.name, "line": self.line}


@dataclass(frozen=True, slots=True)
class TraceEntry:
    """One rule considered: did it match, and if not, the first condition that failed."""

    layer: Literal["site", "owner"]
    rule: str
    file: str
    line: int
    effect: str
    matched: bool
    why: str

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "rule": self.rule,
            "file": self.file,
            "line": self.line,
            "effect": self.effect,
            "matched": self.matched,
            "why": self.why,
        }


# Reason codes carried by decisions (and by AuthorizationError.reason).
REASON_ALLOWED = "allowed"
REASON_DENY_RULE = "denied_by_rule"
REASON_NO_RULE = "no_matching_rule"
REASON_JOB_ID = "job_id_required"
REASON_OWNER = "owner_policy"
REASON_BAD_OWNER = "bad_owner_policy"


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer of :func:`broker.policy.evaluate`.

    ``max_lifetime`` (seconds) is the smallest cap among *all* matching allow
    rules, None when none caps it; ``limited`` is True when any matching allow
    rule forces limited proxies. Both are meaningless on a denial (None/False).
    """

    allowed: bool
    reason: str
    message: str
    rule: RuleRef | None
    max_lifetime: int | None
    limited: bool
    trace: tuple[TraceEntry, ...]
    rules_checked: int

    @property
    def decision(self) -> Literal["allow", "deny"]:
        return "allow" if self.allowed else "deny"

    def raise_if_denied(self) -> None:
        """Raise AuthorizationError (reason = the decision's reason code) on a denial."""
        if not self.allowed:
            raise AuthorizationError(self.message, reason=self.reason)

    def to_json(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "rule": self.rule.to_json() if self.rule else None,
            "reason": self.reason,
            "message": self.message,
            "max_lifetime": self.max_lifetime,
            "max_lifetime_text": (
                format_duration(self.max_lifetime) if self.max_lifetime is not None else None
            ),
            "limited": self.limited,
            "rules_checked": self.rules_checked,
            "trace": [entry.to_json() for entry in self.trace],
        }


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    """One problem found in a policy file."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


@dataclass(slots=True)
class ActionIndex:
    """Rules of one action, keyed so a request only touches the rules that can match it."""

    rules: list[Rule] = field(default_factory=list)
    always: list[int] = field(default_factory=list)
    dn_prefix: dict[str, list[int]] = field(default_factory=dict)
    prefix_lengths: tuple[int, ...] = ()
    vo: dict[str, list[int]] = field(default_factory=dict)
    pam: list[int] = field(default_factory=list)
    passphrase: list[int] = field(default_factory=list)
    anonymous: list[int] = field(default_factory=list)
    files: tuple[str, ...] = ()


def _build_index(rules: tuple[Rule, ...]) -> dict[Action, ActionIndex]:
    index = {action: ActionIndex() for action in Action}
    for rule in rules:
        for action in sorted(rule.actions):
            entry = index[action]
            local = len(entry.rules)
            entry.rules.append(rule)
            keys = {m.leaf.index_key() for m in rule.requester}
            for kind, value in keys:
                if kind == "dn":
                    entry.dn_prefix.setdefault(value, []).append(local)
                elif kind == "vo":
                    entry.vo.setdefault(value, []).append(local)
                elif kind == "pam":
                    entry.pam.append(local)
                elif kind == "passphrase":
                    entry.passphrase.append(local)
                elif kind == "anonymous":
                    entry.anonymous.append(local)
                else:
                    entry.always.append(local)
    for entry in index.values():
        entry.prefix_lengths = tuple(sorted({len(p) for p in entry.dn_prefix}))
        entry.files = tuple(dict.fromkeys(rule.file for rule in entry.rules))
    return index


#: Owner-pattern compilations kept per PolicySet; owner lists repeat across
#: credentials, and the bound keeps user-supplied strings from growing memory.
_OWNER_CACHE_LIMIT = 4096


@dataclass(frozen=True)
class PolicySet:
    """An immutable, compiled set of site rules and groups, with its lookup index.

    Build one with :func:`broker.policy.load_policy`; ``groups`` maps each
    group name to its fully resolved (flattened) members.
    """

    rules: tuple[Rule, ...]
    groups: Mapping[str, tuple[Matcher, ...]]
    files: tuple[str, ...]
    index: dict[Action, ActionIndex] = field(init=False, repr=False, compare=False)
    owner_cache: dict[tuple[str, ...], tuple[Matcher, ...] | str] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", _build_index(self.rules))
        object.__setattr__(self, "owner_cache", {})

    def summary(self) -> str:
        return (
            f"{len(self.rules)} rule{'s' if len(self.rules) != 1 else ''}, "
            f"{len(self.groups)} group{'s' if len(self.groups) != 1 else ''} in "
            f"{len(self.files)} file{'s' if len(self.files) != 1 else ''}"
        )
