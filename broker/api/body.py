"""Reading a REST request's JSON body: size and depth caps, typed fields, specific errors.

Every reader raises :class:`broker.errors.InputError` (or ``PayloadTooLarge``) with a
reason the client can act on; nothing here lets a malformed body reach the service.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import Any

from flask import request

from broker.errors import InputError, PayloadTooLarge
from broker.pki.loading import MAX_PEM_SIZE

MAX_BODY = 128 * 1024
# No request of this API nests deeper than a few levels; the cap is checked on the raw bytes
# before json.loads, whose recursion would otherwise fail (a 500) on "[[[[..." 60k deep.
MAX_JSON_DEPTH = 32
MAX_HOURS = 24 * 366
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKETS = re.compile(rb"[\[\]{}]")


def json_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in ``raw`` (brackets inside strings do not count)."""
    depth = deepest = 0
    for match in _JSON_BRACKETS.finditer(_JSON_STRING.sub(b'""', raw)):
        if match.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def json_body() -> dict[str, Any]:
    """The current request's body as a JSON object (``{}`` when empty)."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise PayloadTooLarge(f"the request body is larger than {MAX_BODY} bytes")
    raw = request.get_data(cache=False)
    if len(raw) > MAX_BODY:
        raise PayloadTooLarge(f"the request body is larger than {MAX_BODY} bytes")
    if not raw:
        return {}
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise InputError(
            f"the request body nests deeper than {MAX_JSON_DEPTH} levels", reason="bad_json"
        )
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"the request body is not valid JSON: {exc}", reason="bad_json") from exc
    if not isinstance(body, dict):
        raise InputError("the request body must be a JSON object", reason="bad_json")
    return body


def text(
    body: dict[str, Any],
    key: str,
    *,
    required: bool = False,
    default: str | None = None,
    max_len: int = 4096,
) -> str | None:
    """A string field of at most ``max_len`` characters."""
    value = body.get(key, default)
    if value is None:
        if required:
            raise InputError(f"the field {key!r} is required", reason="missing_field")
        return None
    if not isinstance(value, str):
        raise InputError(f"the field {key!r} must be a string", reason="bad_field")
    if len(value) > max_len:
        raise InputError(
            f"the field {key!r} is longer than {max_len} characters", reason="bad_field"
        )
    return value


def pem(body: dict[str, Any], key: str) -> bytes:
    """A required PEM text field, as bytes."""
    value = text(body, key, required=True, max_len=MAX_PEM_SIZE)
    assert value is not None
    try:
        return value.encode("ascii")
    except UnicodeEncodeError as exc:
        raise InputError(f"the field {key!r} must be ASCII PEM text", reason="bad_pem") from exc


def hours(body: dict[str, Any], key: str, default: float) -> timedelta:
    """A positive number of hours, at most a year."""
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"the field {key!r} must be a number of hours", reason="bad_field")
    if not 0 < value <= MAX_HOURS:
        raise InputError(
            f"the field {key!r} must be between 0 and {MAX_HOURS} hours", reason="bad_field"
        )
    return timedelta(hours=float(value))


def strings(body: dict[str, Any], key: str) -> tuple[str, ...]:
    """A list of at most 256 strings (empty when absent)."""
    value = body.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"the field {key!r} must be a list of strings", reason="bad_field")
    if len(value) > 256:
        raise InputError(f"the field {key!r} has more than 256 entries", reason="bad_field")
    return tuple(value)


def flag(body: dict[str, Any], key: str) -> bool:
    """A boolean field (false when absent)."""
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise InputError(f"the field {key!r} must be true or false", reason="bad_field")
    return value
