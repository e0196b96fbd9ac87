"""Durations written by administrators: ``"90s"``, ``"12h"``, ``"1h30m"``, ``"2d"``.

Units must appear largest first and at most once each, so ``"30m1h"`` (almost
certainly a typo) is refused rather than silently summed.
"""

from __future__ import annotations

import re

from broker.errors import InputError

_UNITS: dict[str, int] = {"d": 86400, "h": 3600, "m": 60, "s": 1}
# One optional group per unit in descending order; the whole string must match.
_DURATION_RE = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


class DurationError(InputError, ValueError):
    """A duration string that cannot be read; the loader turns it into a file issue."""

    code = "bad_duration"


def parse_duration(text: str) -> int:
    """Return the number of seconds in ``text``; raise DurationError when malformed.

    Zero is refused: a zero lifetime cap would deny every issuance and is
    more likely a mistake than a way to switch an action off (use a deny rule).
    """
    compact = text.strip().lower()
    match = _DURATION_RE.fullmatch(compact)
    if not compact or match is None:
        raise DurationError(
            f'bad duration "{text}": write a number with a unit (s, m, h, d), '
            'largest unit first, e.g. "12h" or "1h30m"'
        )
    seconds = 0
    for value, factor in zip(match.groups(), _UNITS.values(), strict=True):
        if value is not None:
            seconds += int(value) * factor
    if seconds <= 0:
        raise DurationError(f'bad duration "{text}": it must be longer than zero')
    return seconds


def format_duration(seconds: int) -> str:
    """Render seconds in the same notation the files use (``5400`` → ``"1h30m"``)."""
    if seconds <= 0:
        return "0s"
    parts: list[str] = []
    remaining = seconds
    for unit, factor in _UNITS.items():
        count, remaining = divmod(remaining, factor)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
