"""Running the real Debian grid tools from tests."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping, Sequence

from tests.prerequisites import unavailable


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        unavailable(f"{tool} is not installed (scripts/test installs it)")
    return path


def run(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    *,
    input: bytes | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    need(argv[0])
    return subprocess.run(
        list(argv),
        env=dict(env) if env is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input.decode() if input is not None else None,
    )
