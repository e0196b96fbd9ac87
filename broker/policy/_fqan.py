"""VOMS Fully Qualified Attribute Names (FQANs).

An FQAN names a group path and optionally a role:
``/atlas/sub/Role=production/Capability=NULL``. ``Role=NULL`` (or no ``Role``)
means "no role"; capabilities are deprecated in VOMS and carry no meaning for
authorization, so they are parsed and then ignored on the request side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from broker.errors import InputError

# Group names in VOMS are restricted; we accept the conservative set VOMS
# itself allows so that a typo such as a space is caught rather than matched.
_GROUP_RE = re.compile(r"[A-Za-z0-9_.\-]+")
_ROLE_RE = re.compile(r"[A-Za-z0-9_.\-]+")


class FqanError(InputError, ValueError):
    """A string that is not a well-formed FQAN (still a ValueError for older callers)."""

    code = "bad_fqan"


@dataclass(frozen=True, slots=True)
class Fqan:
    """A parsed FQAN: group path components and the role (None = no role)."""

    groups: tuple[str, ...]
    role: str | None
    capability: str | None = None

    @property
    def vo(self) -> str:
        return self.groups[0]

    def __str__(self) -> str:
        text = "/" + "/".join(self.groups)
        text += f"/Role={self.role if self.role is not None else 'NULL'}"
        text += f"/Capability={self.capability if self.capability is not None else 'NULL'}"
        return text


# The qualifiers that may follow the groups, in order: each one's place in that order
# (an FQAN may name a qualifier only after everything of a lower place) and where
# the error message says it belongs.
_QUALIFIERS: dict[str, tuple[int, str]] = {
    "Role": (1, "after the groups"),
    "Capability": (2, "last"),
}


def parse_fqan(text: str) -> Fqan:
    """Parse a full or short FQAN; raise FqanError naming the problem."""
    if not text.startswith("/"):
        raise FqanError(f'bad FQAN "{text}": it must start with "/" (e.g. /atlas/Role=production)')
    groups: list[str] = []
    qualifiers: dict[str, str | None] = {}
    place = 0  # 0 while reading groups, then the place of the last qualifier seen
    for part in text[1:].split("/"):
        name, _, value = part.partition("=")
        if part.startswith(("Role=", "Capability=")):
            rank, where = _QUALIFIERS[name]
            if place >= rank:
                raise FqanError(f'bad FQAN "{text}": {name}= must appear once, {where}')
            place = rank
            qualifiers[name] = _qualifier_value(text, name, value)
        else:
            if place > 0:
                raise FqanError(f'bad FQAN "{text}": group "{part}" after Role=/Capability=')
            if not _GROUP_RE.fullmatch(part):
                raise FqanError(f'bad FQAN "{text}": bad group name "{part}"')
            groups.append(part)
    if not groups:
        raise FqanError(f'bad FQAN "{text}": it names no VO group')
    return Fqan(
        groups=tuple(groups),
        role=qualifiers.get("Role"),
        capability=qualifiers.get("Capability"),
    )


def _qualifier_value(text: str, name: str, value: str) -> str | None:
    """A Role or Capability value: None for ``NULL``, else a checked name."""
    if value == "NULL":
        return None
    if not _ROLE_RE.fullmatch(value):
        raise FqanError(f'bad FQAN "{text}": bad {name.lower()} "{value}"')
    return value
