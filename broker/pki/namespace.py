"""CA namespaces: which subject names a trusted CA may issue (pure: texts in, verdicts out).

Every CA of an IGTF-style ``X509_CERT_DIR`` comes with one or both of

* ``<hash>.signing_policy`` (the Globus EACL form)::

      access_id_CA   X509   '/DC=org/DC=example/CN=Example CA'
      pos_rights     globus CA:sign
      cond_subjects  globus '"/DC=org/DC=example/*" "/O=Example/*"'

  ``*`` in a subject pattern matches any characters (``/`` included), ``?`` one;
  nothing else is special.

* ``<hash>.namespaces`` (the EUGridPMA form)::

      TO Issuer "/DC=org/DC=example/CN=Example CA" \\
        PERMIT Subject "/DC=org/DC=example/.*"
      TO Issuer SELF DENY Subject "/DC=org/DC=example/CN=root"

  The subject pattern is a regular expression that must match the whole name;
  ``SELF`` is the CA the file belongs to. A name must match at least one
  ``PERMIT`` and no ``DENY`` of its issuer.

Only statements naming the CA that the file's hash belongs to count for that CA.
When a CA has both files, a name must satisfy both. The parsers raise
:class:`NamespaceFileError` with ``file:line`` for anything they do not understand.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from broker.errors import BrokerError, ConfigError
from broker.pki.dn import name_from_slash, slash_from_name

SIGNING_POLICY_SUFFIX = ".signing_policy"
NAMESPACES_SUFFIX = ".namespaces"
MAX_PATTERNS = 256


class NamespaceFileError(ConfigError):
    """A ``.signing_policy`` or ``.namespaces`` file that cannot be understood."""

    code = "bad_namespace_file"


@dataclass(frozen=True)
class SubjectRule:
    """One subject pattern: a signing-policy glob or a namespaces regular expression."""

    permit: bool
    pattern: str  # as written in the file
    regex: re.Pattern[str]
    where: str  # file:line

    def matches(self, subject: str) -> bool:
        return self.regex.fullmatch(subject) is not None


def _glob_regex(glob: str) -> re.Pattern[str]:
    parts = []
    for char in glob:
        if char == "*":
            parts.append(".*")
        elif char == "?":
            parts.append(".")
        else:
            parts.append(re.escape(char))
    return re.compile("".join(parts), re.DOTALL)


def _canonical_dn(text: str, where: str) -> str:
    """The CA name as :func:`slash_from_name` prints it (aliases such as ``Email``
    normalised); a name with attribute types this module does not know is kept as written."""
    if not text.startswith("/"):
        raise NamespaceFileError(
            f"{where}: the CA name {text!r} is not a valid DN in the /-separated form"
        )
    try:
        return slash_from_name(name_from_slash(text))
    except BrokerError:
        return text


def _strip_comment(line: str) -> str:
    # '#' starts a comment outside quotes.
    quote: str | None = None
    for index, char in enumerate(line):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#":
            return line[:index]
    return line


# ----------------------------------------------------------------- .signing_policy

_SP_LINE = re.compile(r"^\s*(\S+)\s+(\S+)\s+(.*?)\s*$")
_QUOTED = re.compile(r'"([^"]*)"')


def _single_quoted(value: str, where: str, what: str) -> str:
    if len(value) < 2 or value[0] != "'" or value[-1] != "'" or "'" in value[1:-1]:
        raise NamespaceFileError(f"{where}: the {what} must be one '...' quoted string")
    return value[1:-1]


def parse_signing_policy(text: str, filename: str) -> dict[str, tuple[SubjectRule, ...]]:
    """``{CA slash DN: permitted subject globs}`` from a Globus ``.signing_policy`` text."""
    result: dict[str, list[SubjectRule]] = {}
    current: str | None = None
    rights = False
    for number, raw in enumerate(text.splitlines(), start=1):
        where = f"{filename}:{number}"
        line = _strip_comment(raw).strip()
        if not line:
            continue
        match = _SP_LINE.match(line)
        if match is None:
            raise NamespaceFileError(f"{where}: expected '<keyword> <type> <value>', got {line!r}")
        keyword, kind, value = match.groups()
        if keyword == "access_id_CA":
            if kind != "X509":
                raise NamespaceFileError(f"{where}: access_id_CA must be of type X509, not {kind}")
            if current is not None and not result[current]:
                raise NamespaceFileError(f"{where}: the previous access_id_CA has no cond_subjects")
            current = _canonical_dn(_single_quoted(value, where, "CA name"), where)
            result.setdefault(current, [])
            rights = False
        elif keyword == "pos_rights":
            if current is None:
                raise NamespaceFileError(f"{where}: pos_rights before any access_id_CA")
            if kind != "globus" or value != "CA:sign":
                raise NamespaceFileError(f"{where}: only 'pos_rights globus CA:sign' is understood")
            rights = True
        elif keyword == "cond_subjects":
            if current is None or not rights:
                raise NamespaceFileError(
                    f"{where}: cond_subjects must follow access_id_CA and pos_rights"
                )
            if kind != "globus":
                raise NamespaceFileError(f"{where}: cond_subjects must be of type globus")
            inner = _single_quoted(value, where, "subject list")
            globs = _QUOTED.findall(inner)
            if _QUOTED.sub("", inner).strip() or not globs:
                raise NamespaceFileError(
                    f"{where}: cond_subjects must list subject patterns each in double quotes"
                )
            for glob in globs:
                if not glob:
                    raise NamespaceFileError(f"{where}: an empty subject pattern")
                result[current].append(SubjectRule(True, glob, _glob_regex(glob), where))
        elif keyword == "neg_rights":
            raise NamespaceFileError(f"{where}: neg_rights is not supported")
        else:
            raise NamespaceFileError(f"{where}: unknown keyword {keyword!r}")
        if current is not None and len(result[current]) > MAX_PATTERNS:
            raise NamespaceFileError(f"{where}: more than {MAX_PATTERNS} patterns for one CA")
    if current is not None and not result[current]:
        raise NamespaceFileError(f"{filename}: the last access_id_CA has no cond_subjects")
    return {dn: tuple(rules) for dn, rules in result.items()}


# ----------------------------------------------------------------- .namespaces

_NS_TOKEN = re.compile(r'\s*(?:"((?:[^"\\]|\\.)*)"|([^\s"]+))')
SELF = "SELF"


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Lines with comments removed and backslash continuations joined; first line numbers."""
    out: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = _strip_comment(raw).rstrip()
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1])
            continue
        pending.append(line)
        joined = " ".join(pending).strip()
        pending = []
        if joined:
            out.append((start, joined))
    if pending and " ".join(pending).strip():
        out.append((start, " ".join(pending).strip()))
    return out


def _tokens(line: str, where: str) -> list[tuple[str, bool]]:
    """(token, was quoted) pairs."""
    tokens: list[tuple[str, bool]] = []
    pos = 0
    while pos < len(line):
        match = _NS_TOKEN.match(line, pos)
        if match is None or match.end() == pos:
            if line[pos:].strip():
                raise NamespaceFileError(f"{where}: cannot read {line[pos:]!r} (unbalanced quote?)")
            break
        quoted, bare = match.groups()
        tokens.append((quoted, True) if quoted is not None else (bare, False))
        pos = match.end()
    return tokens


def parse_namespaces(text: str, filename: str) -> dict[str, tuple[SubjectRule, ...]]:
    """``{CA slash DN or "SELF": rules}`` from an EUGridPMA ``.namespaces`` text."""
    result: dict[str, list[SubjectRule]] = {}
    for number, line in _logical_lines(text):
        where = f"{filename}:{number}"
        tokens = _tokens(line, where)
        while tokens:
            statement, tokens = tokens[:6], tokens[6:]
            words = [t for t, _ in statement]
            if (
                len(statement) < 6
                or words[0].upper() != "TO"
                or words[1].upper() != "ISSUER"
                or words[3].upper() not in ("PERMIT", "DENY")
                or words[4].upper() != "SUBJECT"
                or (statement[2][1] is False and words[2].upper() != SELF)
                or not statement[5][1]
            ):
                raise NamespaceFileError(
                    f'{where}: expected \'TO Issuer "<CA DN>"|SELF PERMIT|DENY Subject '
                    f'"<regex>"\', got {line!r}'
                )
            issuer = SELF if not statement[2][1] else _canonical_dn(words[2], where)
            pattern = words[5]
            if not pattern:
                raise NamespaceFileError(f"{where}: an empty subject pattern")
            try:
                regex = re.compile(pattern, re.DOTALL)
            except re.error as exc:
                raise NamespaceFileError(
                    f"{where}: the subject pattern {pattern!r} is not a valid regular "
                    f"expression: {exc}"
                ) from exc
            rules = result.setdefault(issuer, [])
            rules.append(SubjectRule(words[3].upper() == "PERMIT", pattern, regex, where))
            if len(rules) > MAX_PATTERNS:
                raise NamespaceFileError(f"{where}: more than {MAX_PATTERNS} patterns for one CA")
    return {dn: tuple(rules) for dn, rules in result.items()}


# ----------------------------------------------------------------- one CA's namespace


@dataclass(frozen=True)
class CaNamespace:
    """What one CA may issue, from its files; ``error`` set means it may issue nothing."""

    ca_dn: str
    signing_policy: tuple[SubjectRule, ...] | None = None
    namespaces: tuple[SubjectRule, ...] | None = None
    error: str | None = None

    @property
    def constrained(self) -> bool:
        return self.signing_policy is not None or self.namespaces is not None

    def describe(self) -> str:
        """The namespace in words, for refusals."""
        parts: list[str] = []
        if self.signing_policy is not None:
            globs = " ".join(f'"{r.pattern}"' for r in self.signing_policy)
            parts.append(f"signing_policy {globs}")
        if self.namespaces is not None:
            rules = " ".join(
                f'{"PERMIT" if r.permit else "DENY"} "{r.pattern}"' for r in self.namespaces
            )
            parts.append(f"namespaces {rules}")
        return "; ".join(parts) if parts else "no namespace"

    def violation(self, subject: str) -> str | None:
        """None when ``subject`` (slash form) is inside the namespace, else why not."""
        if self.error is not None:
            return f"its namespace file is unusable ({self.error})"
        if self.signing_policy is not None and not any(
            r.matches(subject) for r in self.signing_policy
        ):
            return f"{subject} is outside its namespace ({self.describe()})"
        if self.namespaces is not None:
            denied = [r for r in self.namespaces if not r.permit and r.matches(subject)]
            permitted = any(r.permit and r.matches(subject) for r in self.namespaces)
            if denied or not permitted:
                return f"{subject} is outside its namespace ({self.describe()})"
        return None


def ca_namespace(
    ca_dn: str,
    hash_name: str,
    files: Mapping[str, bytes],
) -> CaNamespace:
    """The namespace of the CA ``ca_dn`` from ``<hash_name>.signing_policy`` / ``.namespaces``
    among ``files`` (a CA directory's ``{file name: content}``)."""
    sp_name = f"{hash_name}{SIGNING_POLICY_SUFFIX}"
    ns_name = f"{hash_name}{NAMESPACES_SUFFIX}"
    signing: tuple[SubjectRule, ...] | None = None
    names: tuple[SubjectRule, ...] | None = None
    try:
        if sp_name in files:
            entries = parse_signing_policy(_text(files[sp_name], sp_name), sp_name)
            signing = entries.get(ca_dn)
        if ns_name in files:
            ns_entries = parse_namespaces(_text(files[ns_name], ns_name), ns_name)
            found = [*ns_entries.get(ca_dn, ()), *ns_entries.get(SELF, ())]
            names = tuple(found) if found else None
    except NamespaceFileError as exc:
        return CaNamespace(ca_dn=ca_dn, error=exc.message)
    return CaNamespace(ca_dn=ca_dn, signing_policy=signing, namespaces=names)


def _text(data: bytes, filename: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NamespaceFileError(f"{filename}: not UTF-8 text") from exc


def check_files(files: Mapping[str, bytes]) -> list[str]:
    """Every problem in the namespace files of ``files`` (for ``broker pki`` and logs)."""
    problems: list[str] = []
    for name in sorted(files):
        try:
            if name.endswith(SIGNING_POLICY_SUFFIX):
                parse_signing_policy(_text(files[name], name), name)
            elif name.endswith(NAMESPACES_SUFFIX):
                parse_namespaces(_text(files[name], name), name)
        except NamespaceFileError as exc:
            problems.append(exc.message)
    return problems
