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


def parse_fqan(text: str) -> Fqan:
    """Parse a full or short FQAN; raise FqanError naming the problem."""
    if not text.startswith("/"):
        raise FqanError(f'bad FQAN "{text}": it must start with "/" (e.g. /atlas/Role=production)')
    groups: list[str] = []
    role: str | None = None
    capability: str | None = None
    seen_role = seen_capability = False
    for part in text[1:].split("/"):
        if part.startswith("Role="):
            if seen_role or seen_capability:
                raise FqanError(f'bad FQAN "{text}": Role= must appear once, after the groups')
            seen_role = True
            value = part[len("Role=") :]
            if value != "NULL":
                if not _ROLE_RE.fullmatch(value):
                    raise FqanError(f'bad FQAN "{text}": bad role "{value}"')
                role = value
        elif part.startswith("Capability="):
            if seen_capability:
                raise FqanError(f'bad FQAN "{text}": Capability= must appear once, last')
            seen_capability = True
            value = part[len("Capability=") :]
            if value != "NULL":
                if not _ROLE_RE.fullmatch(value):
                    raise FqanError(f'bad FQAN "{text}": bad capability "{value}"')
                capability = value
        else:
            if seen_role or seen_capability:
                raise FqanError(f'bad FQAN "{text}": group "{part}" after Role=/Capability=')
            if not _GROUP_RE.fullmatch(part):
                raise FqanError(f'bad FQAN "{text}": bad group name "{part}"')
            groups.append(part)
    if not groups:
        raise FqanError(f'bad FQAN "{text}": it names no VO group')
    return Fqan(groups=tuple(groups), role=role, capability=capability)
