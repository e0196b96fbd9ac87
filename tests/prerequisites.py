"""The one place where a test meets a missing prerequisite (root, a system tool, a package).

Under ``CI=true`` (how ``.ci/run`` runs, as root, after scripts/test installed every package)
a missing prerequisite is a **failure**: it means scripts/test lacks an install step. Only on a
developer's machine (not root, packages missing) is the test skipped, with the reason and the
command that fixes it. README.md ("Running the tests") says so.
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def unavailable(reason: str) -> NoReturn:
    if in_ci():
        pytest.fail(f"{reason} -- CI must provide it (scripts/test installs what tests need)")
    pytest.skip(reason)


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        unavailable(f"needs root: {what}")


def require_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        unavailable(f"not installed: {', '.join(missing)} (scripts/test installs them)")


@pytest.fixture
def must_be_root() -> None:
    require_root("identity switching, file ownership, throwaway accounts or tmpfs")


#: ``@needs_root`` on a test: root required (a failure under CI, where tests run as root).
needs_root = pytest.mark.usefixtures("must_be_root")
