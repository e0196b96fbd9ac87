from __future__ import annotations

import pytest

from broker.policy import DurationError, FqanError, format_duration, parse_duration, parse_fqan


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("12h", 43200),
        ("1h30m", 5400),
        ("2d", 172800),
        ("1d2h3m4s", 93784),
        ("15M", 900),
    ],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "12", "h", "30m1h", "1h1h", "0s", "-1h", "1.5h", "1w"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(DurationError):
        parse_duration(text)


def test_format_roundtrip() -> None:
    for seconds in (1, 59, 60, 3600, 5400, 86400, 93784):
        assert parse_duration(format_duration(seconds)) == seconds


def test_fqan_full_and_short() -> None:
    full = parse_fqan("/atlas/sub/Role=production/Capability=NULL")
    assert full.groups == ("atlas", "sub") and full.role == "production"
    assert parse_fqan("/atlas/Role=NULL/Capability=NULL").role is None
    assert parse_fqan("/atlas").role is None
    assert str(parse_fqan("/atlas/sub")) == "/atlas/sub/Role=NULL/Capability=NULL"


@pytest.mark.parametrize("text", ["atlas", "/", "/atlas/Role=a/Role=b", "/atlas//x", "/a b"])
def test_bad_fqans(text: str) -> None:
    with pytest.raises(FqanError):
        parse_fqan(text)
