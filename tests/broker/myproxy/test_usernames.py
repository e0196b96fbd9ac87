"""Usernames as MyProxy accepts them (database keys), with the characters that could
break a log line or an ERROR message refused."""

from __future__ import annotations

import re

import pytest

from broker.errors import DnSyntaxError
from broker.service import MAX_USERNAME_BYTES, validate_username

ACCEPTED = [
    "alice",
    "/DC=org/DC=example/CN=Alice",  # myproxy-init -d
    "../etc/passwd",  # never a path: a database key
    "alice.myproxy-test" + "x" * 1153,  # myproxy-test's 1,171-character LOGNAME
    "Élodie Müller",
    "a" * MAX_USERNAME_BYTES,
]

REFUSED = [
    ("", "empty"),
    ("al\x00ice", "U+0000"),
    ("al\nice", "U+000A"),
    ("al\rice", "U+000D"),
    ("al\x1b[31mice", "U+001B"),
    ("al\x7fice", "U+007F"),
    ("al\x85ice", "U+0085"),  # C1 next line
    ("al\u2028ice", "U+2028"),  # line separator
    ("al\u202eice", "U+202E"),  # right-to-left override
    ("a" * (MAX_USERNAME_BYTES + 1), "bytes long"),
    ("é" * (MAX_USERNAME_BYTES // 2 + 1), "bytes long"),
]


@pytest.mark.parametrize("username", ACCEPTED)
def test_accepted(username: str) -> None:
    assert validate_username(username) == username


@pytest.mark.parametrize(("username", "why"), REFUSED)
def test_refused(username: str, why: str) -> None:
    with pytest.raises(DnSyntaxError, match=re.escape(why)):
        validate_username(username)


def test_not_text() -> None:
    with pytest.raises(DnSyntaxError, match="must be text"):
        validate_username(b"alice")
