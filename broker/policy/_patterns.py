"""Subject patterns: the one small language used by site rules, groups and owner policies.

Forms (see policies/README.md for the administrator's view):

``/DC=org/DC=example/CN=pilot*``   DN glob on the OpenSSL slash form; ``*`` matches any run of
                                   characters *including* ``/``, ``?`` exactly one; nothing else is
                                   special (``[`` is literal, DNs may contain it). Whole-DN,
                                   case-sensitive match.
``re:REGEX``                       regular expression (RE2: no look-arounds), full match on the DN.
``fqan:/vo/sub[/Role=R]``          hierarchical VOMS match (any FQAN in that group or below; with
                                   ``Role=R`` only that role; ``Role=NULL`` only "no role").
``group:NAME``                     every member of a ``[groups]`` entry (groups may nest).
``pam:USERGLOB``                   requester authenticated through PAM with a matching username.
``passphrase``                     requester proved the credential's passphrase.
``anonymous``                      requester presented no certificate.
``self``                           requester's DN is the credential owner's DN (for the owner's own
                                   delegate/info/destroy rules).
``token:ISSUER#SUBGLOB``           requester authenticated with a bearer token from ISSUER (the
                                   exact ``iss``) whose ``sub`` matches SUBGLOB (``*``, ``?``).
``token-group:/g[/sub]``           bearer token whose ``wlcg.groups`` holds /g or a subgroup of it;
``token-group:ISSUER#/g``          the second form also pins the issuer.
``scope:NAME[:/path]``             bearer token granting NAME (with a path: the same or a
                                   broader path, e.g. token scope ``storage.read:/`` matches
                                   ``scope:storage.read:/cms``).

Everything is compiled once, at load time; matching is then a dict lookup or
one precompiled ``re`` call.
"""

from __future__ import annotations

import re
import re._parser as sre_parser  # type: ignore[import-not-found]  # what RE2 lacks
from dataclasses import dataclass, field
from typing import Literal, Protocol, cast

import re2

from broker.errors import InputError
from broker.policy._enums import AuthMethod
from broker.policy._fqan import Fqan, FqanError, parse_fqan

#: Longer patterns are refused: owner policies come from users, and a long
#: regex is the usual vehicle for catastrophic backtracking.
MAX_PATTERN_LENGTH = 1024

PatternContext = Literal["requester", "owner", "group"]

_GROUP_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_PREFIX_RE = re.compile(r"([A-Za-z][A-Za-z0-9_-]*):")

# DNs that any "matches every DN" pattern must accept. They vary the first
# attribute, length, spaces and non-ASCII so that `/DC=*` style patterns are
# not mistaken for wildcards, while `*`, `/*`, `re:.*`, `re:/.+` are caught.
_PROBE_DNS = (
    "/CN=a",
    "/DC=org/DC=example/CN=Alice Example 123",
    "/C=XX/O=x.y-z/OU=u/L=Geneva/CN=proxy/CN=12345",
    "/emailAddress=someone@example.org/CN=\u00e9l\u00e8ve",
    "/O=Grid/O=Globus/OU=local/CN=host/name.example.org",
)


class PatternError(InputError, ValueError):
    """A pattern that cannot be compiled; the message says what to write instead."""

    code = "bad_pattern"


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What a verified bearer token says about its holder (the token layer verified it)."""

    issuer: str
    subject: str
    groups: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"token:{self.issuer}#{self.subject}"


@dataclass(frozen=True, slots=True)
class Subject:
    """Who is being matched: the requester (with auth) or a credential owner (auth None)."""

    dn: str | None
    fqans: tuple[Fqan, ...] = ()
    auth: AuthMethod | None = None
    username: str | None = None
    # Set on requester subjects only, so that the `self` pattern can compare.
    owner_dn: str | None = None
    # Set only when the requester authenticated with a bearer token.
    token: TokenClaims | None = None


# Patterns come from users (owner policies via broker-init -r/-Z/-R and myproxy-init -x), and
# Python's backtracking engine needs exponential time on some ("(.|.|.)*Z"), holding the GIL:
# one retrieval could freeze a server process. RE2 matches in linear time. Constructs RE2
# lacks (look-arounds, back-references, atomic groups, possessive repeats, \Z) are found in
# Python's own parse of the source and refused with a clear message, before RE2 sees them
# (RE2 would also print a C++ log line on stderr).
_UNSUPPORTED_OPS = {
    "ASSERT": "a look-around",
    "ASSERT_NOT": "a look-around",
    "GROUPREF": "a back-reference",
    "GROUPREF_EXISTS": "a conditional group",
    "ATOMIC_GROUP": "an atomic group",
    "POSSESSIVE_REPEAT": "a possessive repeat",
}


class _Matcher(Protocol):
    def fullmatch(self, text: str) -> object | None: ...


def _unsupported(tree: object) -> str | None:
    for item in tree:  # type: ignore[attr-defined]
        op, arg = item
        name = str(op)
        if name in _UNSUPPORTED_OPS:
            return _UNSUPPORTED_OPS[name]
        if name == "AT" and str(arg) == "AT_END_STRING":
            return r"\Z (write $ or nothing: patterns match the whole DN)"
        for sub in arg if isinstance(arg, tuple | list) else (arg,):
            if isinstance(sub, sre_parser.SubPattern):
                found = _unsupported(sub)
            elif isinstance(sub, tuple | list):
                found = next(
                    (
                        f
                        for f in (
                            _unsupported(x) for x in sub if isinstance(x, sre_parser.SubPattern)
                        )
                        if f
                    ),
                    None,
                )
            else:
                found = None
            if found:
                return found
    return None


def compile_linear(source: str, *, dotall: bool = False) -> _Matcher:
    """Compile ``source`` (Python syntax) with RE2; raises PatternError when unsupported."""
    try:
        tree = sre_parser.parse(source)
    except re.error as exc:
        raise PatternError(f'bad regular expression "{source}": {exc}') from None
    what = _unsupported(tree)
    if what:
        raise PatternError(
            f'the regular expression "{source}" uses {what}, which the broker does not support '
            "(patterns are matched in linear time with RE2)"
        )
    try:
        return cast(_Matcher, re2.compile(("(?s)" if dotall else "") + source))
    except re2.error as exc:
        raise PatternError(f'unsupported regular expression "{source}": {exc}') from None


def glob_to_regex(glob: str) -> str:
    """Translate a DN/username glob into an anchored-by-fullmatch regex source."""
    out: list[str] = []
    for char in glob:
        if char == "*":
            # Collapse runs of '*': '**' means the same and must not cost more.
            if not out or out[-1] != ".*":
                out.append(".*")
        elif char == "?":
            out.append(".")
        else:
            out.append(re.escape(char))
    return "".join(out)


@dataclass(frozen=True, slots=True)
class DnGlob:
    text: str
    literal_prefix: str
    _regex: _Matcher | None  # None when the glob has no wildcard: plain equality

    def matches(self, subject: Subject) -> bool:
        if subject.dn is None:
            return False
        if self._regex is None:
            return subject.dn == self.text
        return self._regex.fullmatch(subject.dn) is not None

    def index_key(self) -> tuple[str, str]:
        return ("dn", self.literal_prefix)


@dataclass(frozen=True, slots=True)
class DnRegex:
    text: str
    _regex: _Matcher

    def matches(self, subject: Subject) -> bool:
        return subject.dn is not None and self._regex.fullmatch(subject.dn) is not None

    def index_key(self) -> tuple[str, str]:
        return ("always", "")


_ANY_ROLE: Literal["*"] = "*"


@dataclass(frozen=True, slots=True)
class FqanPattern:
    text: str
    groups: tuple[str, ...]
    role: str | Literal["*"] | None  # "*" = any role, None = only "no role"

    def matches(self, subject: Subject) -> bool:
        depth = len(self.groups)
        for fqan in subject.fqans:
            if fqan.groups[:depth] != self.groups:
                continue
            if self.role == _ANY_ROLE or fqan.role == self.role:
                return True
        return False

    def index_key(self) -> tuple[str, str]:
        return ("vo", self.groups[0])


@dataclass(frozen=True, slots=True)
class PamPattern:
    text: str
    _regex: _Matcher

    def matches(self, subject: Subject) -> bool:
        return (
            subject.auth is AuthMethod.PAM
            and subject.username is not None
            and self._regex.fullmatch(subject.username) is not None
        )

    def index_key(self) -> tuple[str, str]:
        return ("pam", "")


@dataclass(frozen=True, slots=True)
class PassphraseSubject:
    text: str = "passphrase"

    def matches(self, subject: Subject) -> bool:
        return subject.auth is AuthMethod.PASSPHRASE

    def index_key(self) -> tuple[str, str]:
        return ("passphrase", "")


@dataclass(frozen=True, slots=True)
class AnonymousSubject:
    text: str = "anonymous"

    def matches(self, subject: Subject) -> bool:
        # Only a requester can be anonymous; owners always have a DN. A token holder
        # is identified by its token, so it is not anonymous.
        return subject.auth is not None and subject.dn is None and subject.token is None

    def index_key(self) -> tuple[str, str]:
        return ("anonymous", "")


@dataclass(frozen=True, slots=True)
class SelfSubject:
    text: str = "self"

    def matches(self, subject: Subject) -> bool:
        return subject.dn is not None and subject.dn == subject.owner_dn

    def index_key(self) -> tuple[str, str]:
        return ("always", "")


@dataclass(frozen=True, slots=True)
class TokenSubjectPattern:
    text: str
    issuer: str
    _regex: _Matcher | None  # None: exact subject

    def matches(self, subject: Subject) -> bool:
        token = subject.token
        if token is None or token.issuer != self.issuer:
            return False
        if self._regex is None:
            return token.subject == self.text.rpartition("#")[2]
        return self._regex.fullmatch(token.subject) is not None

    def index_key(self) -> tuple[str, str]:
        return ("always", "")


def _group_within(group: str, parent: str) -> bool:
    return (
        group == parent
        or (parent == "/" and group.startswith("/"))
        or group.startswith(parent + "/")
    )


@dataclass(frozen=True, slots=True)
class TokenGroupPattern:
    text: str
    group: str
    issuer: str | None

    def matches(self, subject: Subject) -> bool:
        token = subject.token
        if token is None or (self.issuer is not None and token.issuer != self.issuer):
            return False
        return any(_group_within(g, self.group) for g in token.groups)

    def index_key(self) -> tuple[str, str]:
        return ("always", "")


def scope_covers(granted: str, wanted: str) -> bool:
    """Does the token scope ``granted`` include ``wanted``? Same name; for path scopes
    (``storage.read:/a``) the granted path must be the wanted one or a parent of it."""
    g_name, g_sep, g_path = granted.partition(":")
    w_name, w_sep, w_path = wanted.partition(":")
    if g_name != w_name:
        return False
    if not g_sep and not w_sep:
        return True
    if not g_sep or not w_sep:
        return False
    g_path = g_path.rstrip("/") or "/"
    w_path = w_path.rstrip("/") or "/"
    return g_path == "/" or w_path == g_path or w_path.startswith(g_path + "/")


@dataclass(frozen=True, slots=True)
class ScopePattern:
    text: str
    scope: str

    def matches(self, subject: Subject) -> bool:
        token = subject.token
        return token is not None and any(scope_covers(s, self.scope) for s in token.scopes)

    def index_key(self) -> tuple[str, str]:
        return ("always", "")


@dataclass(frozen=True, slots=True)
class GroupRef:
    """An unresolved ``group:NAME``; the loader replaces it by the group's members."""

    text: str
    name: str


Leaf = (
    DnGlob
    | DnRegex
    | FqanPattern
    | PamPattern
    | PassphraseSubject
    | AnonymousSubject
    | SelfSubject
    | TokenSubjectPattern
    | TokenGroupPattern
    | ScopePattern
)
Parsed = Leaf | GroupRef


@dataclass(frozen=True, slots=True)
class Matcher:
    """A resolved leaf plus the entry it came from (``group:x`` or the leaf itself)."""

    source: str
    leaf: Leaf = field(compare=False)

    def matches(self, subject: Subject) -> bool:
        return self.leaf.matches(subject)


def parse_pattern(text: str, *, context: PatternContext = "requester") -> Parsed:
    """Compile one pattern; raise PatternError with a message fit for an administrator.

    ``context`` limits the forms: an ``owner =`` list describes the stored
    credential's owner, who never authenticates by PAM or passphrase.
    """
    if not isinstance(text, str):
        raise PatternError(f"a pattern must be a string, not {type(text).__name__}")
    if not text.strip():
        raise PatternError("empty pattern")
    if text != text.strip():
        raise PatternError(f'pattern "{text}" has leading or trailing spaces')
    if len(text) > MAX_PATTERN_LENGTH:
        raise PatternError(f"pattern is longer than {MAX_PATTERN_LENGTH} characters")

    if context == "owner" and (
        text in ("passphrase", "anonymous", "self")
        or text.startswith(("pam:", "token:", "token-group:", "scope:"))
    ):
        raise PatternError(
            f'"{text}" describes how a requester authenticates; it cannot match a '
            "credential owner (use a DN, re:, fqan: or group: pattern)"
        )
    if text == "passphrase":
        return PassphraseSubject()
    if text == "anonymous":
        return AnonymousSubject()
    if text == "self":
        return SelfSubject()
    if text.startswith("re:"):
        source = text[3:]
        if not source:
            raise PatternError('empty regular expression after "re:"')
        return DnRegex(text, compile_linear(source))
    if text.startswith("fqan:"):
        return _parse_fqan_pattern(text)
    if text.startswith("group:"):
        name = text[len("group:") :]
        if not _GROUP_NAME_RE.fullmatch(name):
            raise PatternError(
                f'bad group reference "{text}": group names use letters, digits, "_", "." and "-"'
            )
        return GroupRef(text, name)
    if text.startswith("pam:"):
        user_glob = text[len("pam:") :]
        if not user_glob:
            raise PatternError('empty username pattern after "pam:" (use "pam:*" for any user)')
        return PamPattern(text, compile_linear(glob_to_regex(user_glob), dotall=True))
    if text.startswith(("token:", "token-group:", "scope:")):
        return _parse_token_pattern(text)
    if text[0] in "/*?":
        return _compile_dn_glob(text)
    prefix = _PREFIX_RE.match(text)
    if prefix and "=" not in prefix.group(1):
        raise PatternError(
            f'unknown pattern kind "{prefix.group(0)}" in "{text}"; use a DN glob, '
            're:, fqan:, group:, pam:, token:, token-group:, scope:, "passphrase", '
            '"anonymous" or "self"'
        )
    raise PatternError(
        f'"{text}" is not a DN pattern: write DNs in the OpenSSL slash form, '
        'e.g. "/DC=org/DC=example/CN=Alice" (a leading "*" is also fine)'
    )


_SCOPE_RE = re.compile(r"[A-Za-z0-9_.\-]+(:/[\x21-\x7e]*)?")
_TOKEN_GROUP_RE = re.compile(r"/[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*|/")


def _parse_token_pattern(text: str) -> TokenSubjectPattern | TokenGroupPattern | ScopePattern:
    kind, _, body = text.partition(":")
    if kind == "scope":
        if not _SCOPE_RE.fullmatch(body):
            raise PatternError(
                f'bad scope pattern "{text}": write "scope:NAME" or "scope:NAME:/path", '
                'e.g. "scope:compute.read" or "scope:storage.read:/cms"'
            )
        return ScopePattern(text, body)
    if kind == "token-group":
        issuer, sep, group = body.rpartition("#")
        if not _TOKEN_GROUP_RE.fullmatch(group) or (sep and not issuer):
            raise PatternError(
                f'bad token group pattern "{text}": write "token-group:/vo/group" or '
                '"token-group:ISSUER#/vo/group" (no wildcards; subgroups match)'
            )
        return TokenGroupPattern(text, group, issuer if sep else None)
    issuer, sep, sub = body.rpartition("#")
    if not sep or not issuer or not sub:
        raise PatternError(
            f'bad token pattern "{text}": write "token:ISSUER#SUBJECT" with the exact issuer '
            'URL; SUBJECT may use "*" and "?" (e.g. "token:https://iam.example#*")'
        )
    if any(c in issuer for c in "*?"):
        raise PatternError(f'"{text}": the issuer of a token: pattern takes no wildcards')
    regex = None
    if any(c in sub for c in "*?"):
        regex = compile_linear(glob_to_regex(sub), dotall=True)
    return TokenSubjectPattern(text, issuer, regex)


def _compile_dn_glob(text: str) -> DnGlob:
    cut = min((i for i, c in enumerate(text) if c in "*?"), default=None)
    if cut is None:
        return DnGlob(text, text, None)
    return DnGlob(text, text[:cut], compile_linear(glob_to_regex(text), dotall=True))


def _parse_fqan_pattern(text: str) -> FqanPattern:
    body = text[len("fqan:") :]
    if "*" in body or "?" in body:
        raise PatternError(
            f'"{text}": fqan: patterns take no wildcards; "fqan:/vo" already matches every '
            'subgroup and role, and leaving out "Role=" matches any role'
        )
    try:
        fqan = parse_fqan(body)
    except FqanError as exc:
        raise PatternError(f'"{text}": {exc}') from None
    if fqan.capability is not None:
        raise PatternError(f'"{text}": capabilities are deprecated in VOMS and cannot be matched')
    role: str | Literal["*"] | None = fqan.role
    if fqan.role is None and "/Role=NULL" not in body:
        role = _ANY_ROLE
    return FqanPattern(text, fqan.groups, role)


def matches_any_dn(leaf: Leaf) -> bool:
    """True for a DN pattern so broad that it admits every certificate holder."""
    if not isinstance(leaf, DnGlob | DnRegex):
        return False
    return all(leaf.matches(Subject(dn=dn)) for dn in _PROBE_DNS)
