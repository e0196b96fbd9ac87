"""Find the line numbers of tables and keys in TOML text.

``tomllib`` returns plain dicts without positions, yet an administrator needs
"policies/atlas.toml:14: unknown key". This scanner walks the text once,
tracking strings (basic, literal, multi-line), comments and bracket depth, so
that a ``[[rule]]`` inside a string or a ``name =`` inside a multi-line array
is not mistaken for structure. It never decides validity — tomllib does —
it only maps what tomllib parsed back to lines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_ARRAY_HEADER = re.compile(r"\[\[\s*([^\[\]#]+?)\s*\]\]")
_TABLE_HEADER = re.compile(r"\[\s*([^\[\]#]+?)\s*\]")
_KEY = re.compile(r"""("(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_\-]+)\s*(?:\.[^=]*)?=""")


@dataclass(slots=True)
class TableLines:
    """One table occurrence: its header name ("" for the root), line, and key lines."""

    name: str
    is_array: bool
    line: int
    keys: dict[str, int] = field(default_factory=dict)


def _unquote(key: str) -> str:
    if len(key) >= 2 and key[0] == key[-1] and key[0] in "\"'":
        return key[1:-1]
    return key


def _header_name(raw: str) -> str:
    # "[ rule ]" and '["rule"]' name the same table; dotted headers keep their dots.
    return ".".join(_unquote(part.strip()) for part in raw.split("."))


def locate(text: str) -> list[TableLines]:
    """Return the tables in order of appearance, the root first."""
    tables = [TableLines(name="", is_array=False, line=1)]
    multiline: str | None = None  # the closing delimiter while inside """ or '''
    depth = 0  # open [ and { of values that span lines
    for lineno, line in enumerate(text.splitlines(), start=1):
        pos = 0
        if multiline is not None:
            end = line.find(multiline)
            if end < 0:
                continue
            pos = end + 3
            multiline = None
        elif depth == 0:
            stripped = line.lstrip()
            offset = len(line) - len(stripped)
            header = _ARRAY_HEADER.match(stripped)
            if header:
                tables.append(TableLines(_header_name(header.group(1)), True, lineno))
                continue
            header = _TABLE_HEADER.match(stripped)
            if header:
                tables.append(TableLines(_header_name(header.group(1)), False, lineno))
                continue
            key = _KEY.match(stripped)
            if key:
                tables[-1].keys.setdefault(_unquote(key.group(1)), lineno)
                pos = offset + key.end()
        multiline, depth = _scan_value(line, pos, depth)
    return tables


def _scan_value(line: str, pos: int, depth: int) -> tuple[str | None, int]:
    """Advance over ``line[pos:]``; return (open multi-line delimiter or None, new depth)."""
    i = pos
    n = len(line)
    while i < n:
        char = line[i]
        if char == "#":
            break
        if char in "\"'":
            triple = char * 3
            if line.startswith(triple, i):
                end = line.find(triple, i + 3)
                if end < 0:
                    return triple, depth
                i = end + 3
                # A closing run may be up to five quotes long ("""a"""").
                while i < n and line[i] == char:
                    i += 1
                continue
            i += 1
            while i < n and line[i] != char:
                if char == '"' and line[i] == "\\":
                    i += 1
                i += 1
            i += 1
            continue
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth = max(0, depth - 1)
        i += 1
    return None, depth
