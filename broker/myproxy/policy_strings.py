"""MyProxy per-credential policy strings <-> entries of the broker's owner policy.

``myproxy-init -r/-R/-Z`` send one policy string per list (``RETRIEVER=``,
``RENEWER=``, ``RETRIEVER_TRUSTED=``). MyProxy matches it against the client's
identity (OpenSSL slash DN, or ``<anonymous>``) as a whole-string POSIX ERE
in its own dialect:

* an unescaped ``*`` means any run of characters, ``?`` one character and
  ``.`` a literal dot;
* ``\\*``, ``\\?`` and ``\\.`` give back the ERE meaning (repeat, optional, any
  character);
* everything else is ERE: ``|``, ``[...]``, ``(...)``, ``+``, ``{m,n}``;
* a ``SUBJECT:`` prefix is a plain DN rule, ``FQAN:`` matches VOMS FQANs.

The client's default "CN mode" turns ``-Z pilot`` into ``*/CN=pilot`` before
sending, so the server only ever sees this dialect.

Translation into the broker's pattern language (broker/policy/_patterns.py):
the string is split at top-level ``|``; an alternative that uses only ``*``,
``?`` and literal characters becomes a DN glob (same meaning: the broker's
``*`` also crosses ``/``); anything else becomes a ``re:`` pattern with the
dialect rewritten into Python syntax. When the string matches
``<anonymous>`` (``*`` does), the ``anonymous`` entry is added, because in
MyProxy ``*`` admits clients without a certificate.

``FQAN:`` strings are supported only when literal (no regex operators): they
become ``fqan:`` patterns, which also admit subgroups of the named group
(``FQAN:/atlas/Role=pilot`` admits ``/atlas/sub/Role=pilot``). A FQAN regex is
refused with an error that says so.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from broker.errors import InputError
from broker.policy import PatternError, compile_linear

#: An owner-list entry that matches nobody. MyProxy's "not set" for trusted
#: retrievers means "nobody" (``default_trusted_retrievers none``), while the
#: broker's unset list means "the site decides"; this marker keeps MyProxy's meaning.
NOBODY = r"re:[^\s\S]"  # a class nothing belongs to: matches no DN
ANONYMOUS_IDENTITY = "<anonymous>"

_ERE_SPECIAL = set("|()[]{}+^$\\")
_POSIX_CLASSES = {
    "alpha": "a-zA-Z",
    "digit": "0-9",
    "alnum": "a-zA-Z0-9",
    "upper": "A-Z",
    "lower": "a-z",
    "space": r" \t\n\r\f\v",
    "blank": r" \t",
    "punct": r"!-/:-@\[-`{-~",
    "xdigit": "0-9A-Fa-f",
    "print": r" -~",
    "graph": r"!-~",
    "cntrl": r"\x00-\x1f\x7f",
}


class PolicyStringError(InputError):
    """A per-credential policy string the broker cannot represent."""

    code = "bad_policy_string"


def split_alternatives(text: str) -> list[str]:
    """Split at ``|`` outside brackets, parentheses and escapes."""
    parts: list[str] = []
    depth = 0
    start = 0
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "[":
            i = _bracket_end(text, i)
            continue
        if char == "(":
            depth += 1
        elif char == ")":
            depth = max(depth - 1, 0)
        elif char == "|" and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


def _bracket_end(text: str, i: int) -> int:
    """Index just past the POSIX bracket expression starting at ``text[i] == '['``."""
    j = i + 1
    if j < len(text) and text[j] == "^":
        j += 1
    if j < len(text) and text[j] == "]":
        j += 1  # a leading ']' is a literal member
    while j < len(text):
        if text.startswith("[:", j):
            close = text.find(":]", j + 2)
            if close >= 0:
                j = close + 2
                continue
        if text[j] == "]":
            return j + 1
        j += 1
    raise PolicyStringError(f'unbalanced "[" in the policy string "{text}"')


def _is_glob(alternative: str) -> bool:
    return bool(alternative) and alternative[0] in "/*?" and not (set(alternative) & _ERE_SPECIAL)


def dialect_to_python(text: str) -> str:
    """Rewrite one MyProxy dialect regex as Python ``re`` source (anchoring left to fullmatch)."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            if i + 1 >= len(text):
                raise PolicyStringError(f'the policy string "{text}" ends with a backslash')
            nxt = text[i + 1]
            out.append(nxt if nxt in "*?." else "\\" + nxt)
            i += 2
            continue
        if char == "[":
            end = _bracket_end(text, i)
            out.append(_bracket_to_python(text[i:end]))
            i = end
            continue
        out.append({"*": ".*", "?": ".", ".": r"\."}.get(char, char))
        i += 1
    return "".join(out)


def _bracket_to_python(bracket: str) -> str:
    inner = bracket[1:-1]
    negate = inner.startswith("^")
    if negate:
        inner = inner[1:]
    members: list[str] = []
    i = 0
    while i < len(inner):
        if inner.startswith("[:", i):
            close = inner.find(":]", i + 2)
            name = inner[i + 2 : close] if close >= 0 else ""
            if name not in _POSIX_CLASSES:
                raise PolicyStringError(f'unknown character class "[:{name}:]"')
            members.append(_POSIX_CLASSES[name])
            i = close + 2
            continue
        char = inner[i]
        # In POSIX brackets a backslash is literal and so is '[' ; Python needs them escaped.
        members.append("\\" + char if char in "\\[]" else char)
        i += 1
    return "[" + ("^" if negate else "") + "".join(members) + "]"


def _check_regex(source: str, original: str) -> re.Pattern[str]:
    try:
        compile_linear(source)  # what the policy engine will accept (RE2 subset)
        return re.compile(source)
    except (re.error, PatternError) as exc:
        raise PolicyStringError(
            f'the policy string "{original}" is not a valid regex: {exc}'
        ) from None


def translate_policy(text: str | None) -> tuple[str, ...] | None:
    """A MyProxy policy string as owner-policy entries; None when ``text`` is unset."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    prefix, _, rest = text.partition(":")
    if prefix.upper() == "FQAN" and rest:
        return tuple(_fqan_entry(alt, text) for alt in split_alternatives(rest))
    if prefix.upper() == "SUBJECT" and rest:
        text = rest
    entries: list[str] = []
    admits_anonymous = False
    for alternative in split_alternatives(text):
        if not alternative:
            raise PolicyStringError(f'the policy string "{text}" has an empty alternative')
        source = dialect_to_python(alternative)
        compiled = _check_regex(source, text)
        if compiled.fullmatch(ANONYMOUS_IDENTITY):
            admits_anonymous = True
        if _is_glob(alternative) and alternative == alternative.strip():
            entry = alternative
        elif source != source.strip():
            # The pattern language refuses edge spaces (a typo guard); a group keeps them.
            entry = "re:(?:" + source + ")"
        else:
            entry = "re:" + source
        if entry not in entries:
            entries.append(entry)
    if admits_anonymous:
        entries.append("anonymous")
    return tuple(entries)


def _fqan_entry(alternative: str, original: str) -> str:
    if not alternative.startswith("/") or set(alternative) & (_ERE_SPECIAL | set("*?")):
        raise PolicyStringError(
            f'"{original}": only literal FQAN policies are supported (for example '
            '"FQAN:/atlas/Role=pilot"); FQAN regular expressions are not'
        )
    value = re.sub(r"/Capability=[^/]*$", "", alternative)
    return "fqan:" + value


# --------------------------------------------------------------------------- back to MyProxy


def python_to_dialect(source: str) -> str:
    """Best-effort inverse of :func:`dialect_to_python` (for INFO display)."""
    out: list[str] = []
    i = 0
    while i < len(source):
        if source.startswith(".*", i):
            out.append("*")
            i += 2
            continue
        char = source[i]
        if char == "\\" and i + 1 < len(source):
            nxt = source[i + 1]
            out.append("." if nxt == "." else "\\" + nxt)
            i += 2
            continue
        if char == "[":
            end = source.find("]", i + 2 if source[i + 1 : i + 2] in ("]", "^") else i + 1)
            end = len(source) - 1 if end < 0 else end
            out.append(source[i : end + 1].replace("\\\\", "\\"))
            i = end + 1
            continue
        out.append({".": "?", "*": "\\*", "?": "\\?"}.get(char, char))
        i += 1
    return "".join(out)


def _glob_to_dialect(glob: str) -> str:
    return "".join("\\" + c if c in _ERE_SPECIAL else c for c in glob)


def render_policy(entries: Iterable[str] | None) -> str | None:
    """Owner-policy entries as one MyProxy policy string (None when nothing to show)."""
    if entries is None:
        return None
    dns: list[str] = []
    fqans: list[str] = []
    for entry in entries:
        if entry in (NOBODY, "anonymous", "self"):
            continue
        if entry.startswith("re:"):
            dns.append(python_to_dialect(entry[3:]))
        elif entry.startswith("fqan:"):
            fqans.append(entry[5:])
        elif entry.startswith(("group:", "pam:")) or entry == "passphrase":
            dns.append(entry)  # broker-only forms, shown verbatim
        else:
            dns.append(_glob_to_dialect(entry))
    parts = dns + [f"FQAN:{f}" for f in fqans]
    return "|".join(parts) if parts else None
