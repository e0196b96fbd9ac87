"""The exception tree drawn in broker/errors.py's docstring is the real one.

The drawing is parsed (names, parents, ``code=`` values) and compared with the
subclass tree of :class:`BrokerError` after every product module is imported,
so a new error class anywhere in ``broker`` or ``payload_wrapper`` must be
drawn, and a drawn class must exist.
"""

from __future__ import annotations

import importlib
import pkgutil
import re

import broker
import payload_wrapper
from broker import errors
from broker.errors import BrokerError

_LINE = re.compile(r"^(?P<lead>[ │├└─]*)(?P<name>[A-Z]\w*)\s+code=\"(?P<code>[^\"]+)\"")


def _drawn() -> dict[str, tuple[str | None, str]]:
    """``name -> (parent name, code)`` as drawn in the docstring."""
    doc = errors.__doc__ or ""
    block = doc.split("::\n\n", 1)[1].split("\n\n", 1)[0]
    drawn: dict[str, tuple[str | None, str]] = {}
    stack: list[str] = []
    for line in block.splitlines():
        match = _LINE.match(line)
        assert match, f"unreadable line in the drawing: {line!r}"
        depth = (len(match["lead"]) - 4) // 4  # 4 spaces of indent, then 4 per level
        del stack[depth:]
        parent = stack[-1] if stack else None
        assert match["name"] not in drawn, f"{match['name']} drawn twice"
        drawn[match["name"]] = (parent, match["code"])
        stack.append(match["name"])
    return drawn


def _real() -> dict[str, tuple[str | None, str]]:
    for package in (broker, payload_wrapper):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            # Alembic's env and revision files only run inside alembic.
            if info.name.rsplit(".", 1)[-1] == "__main__" or ".migrations" in info.name:
                continue
            importlib.import_module(info.name)
    real: dict[str, tuple[str | None, str]] = {"BrokerError": (None, BrokerError.code)}

    def walk(cls: type[BrokerError]) -> None:
        for sub in cls.__subclasses__():
            if sub.__name__.startswith("_") or not sub.__module__.startswith(
                ("broker.", "payload_wrapper.")
            ):
                continue
            real[sub.__name__] = (cls.__name__, sub.code)
            walk(sub)

    walk(BrokerError)
    return real


def test_docstring_tree_equals_the_subclass_tree() -> None:
    assert _drawn() == _real()


def test_the_drawing_reader_sees_nesting() -> None:
    # Guards the reader itself: a flat reading would make the comparison weaker.
    drawn = _drawn()
    assert drawn["VomsError"] == ("ChainError", "invalid_voms")
    assert drawn["NamespaceFileError"] == ("ConfigError", "bad_namespace_file")
    assert drawn["ClientError"] == ("WrapperError", "client")
    assert drawn["InputError"] == ("BrokerError", "bad_request")


def test_policy_and_myproxy_errors_are_broker_errors() -> None:
    from broker.myproxy.handler import Refusal
    from broker.policy import DurationError, FqanError, PatternError

    for cls in (FqanError, PatternError, DurationError):
        assert issubclass(cls, errors.InputError)
        assert issubclass(cls, ValueError)  # callers that catch ValueError still do
        assert cls("x").http_status == 400
    assert issubclass(Refusal, BrokerError)
    refusal = Refusal("no", audited=True)
    assert (refusal.message, refusal.audited) == ("no", True)


def test_client_status_map_is_derived_from_the_tree() -> None:
    assert errors.by_http_status() == {
        400: errors.InputError,
        401: errors.AuthenticationError,
        403: errors.AuthorizationError,
        404: errors.NotFound,
        409: errors.Conflict,
        413: errors.PayloadTooLarge,
        422: errors.CredentialError,
        429: errors.TooManyAttempts,
        503: errors.StoreUnavailable,
    }
