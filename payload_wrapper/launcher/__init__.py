"""Build broker-pilot's static launcher, the program HTCondor runs as USER_JOB_WRAPPER.

The launcher (``broker_pilot_launcher.c`` next to this file) refuses to start
when the environment carries loader, glibc or OpenSSL variables and otherwise
execs this installation's Python isolated (``-I -m payload_wrapper.pilot``).
It is linked statically (``gcc -static``; libc.a is Debian's ``libc6-dev``) so
that no ``LD_*`` variable acts before its own checks, and the interpreter's
absolute path is compiled in. docs/htcondor.md explains why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from payload_wrapper.errors import WrapperSystemError

__all__ = ["SOURCE", "build_launcher"]

#: The launcher's C source, shipped as package data.
SOURCE = Path(__file__).with_name("broker_pilot_launcher.c")

_UNSAFE_IN_C_STRING = frozenset('"\\\n\r\0?')


def build_launcher(
    dest: str | os.PathLike[str],
    *,
    python: str | None = None,
    config: str | None = None,
    compiler: str = "gcc",
) -> Path:
    """Compile the launcher to ``dest`` (mode 0755) for ``python`` (default: this interpreter).

    ``config`` (absolute) is compiled in as the pilot's configuration file, which
    then wins over ``$BROKER_PILOT_CONFIG`` and the default; an unprivileged
    glidein pilot needs this, since it cannot own /etc/broker/pilot.toml.

    The file is written next to ``dest`` and renamed over it, so a running
    starter never sees half a program. Raises WrapperSystemError with a
    sentence when the compiler is missing or the build fails.
    """
    interpreter = python or sys.executable
    if not os.path.isabs(interpreter) or set(interpreter) & _UNSAFE_IN_C_STRING:
        raise WrapperSystemError(
            f"the interpreter path {interpreter!r} must be absolute and free of quotes, "
            "backslashes, '?' and line breaks to be compiled into the launcher",
            reason="bad_interpreter",
        )
    if config is not None and (not os.path.isabs(config) or set(config) & _UNSAFE_IN_C_STRING):
        raise WrapperSystemError(
            f"the configuration path {config!r} must be absolute and free of quotes, "
            "backslashes, '?' and line breaks to be compiled into the launcher",
            reason="bad_config_path",
        )
    if not os.access(interpreter, os.X_OK):
        raise WrapperSystemError(
            f"the interpreter {interpreter} is not executable", reason="bad_interpreter"
        )
    cc = shutil.which(compiler)
    if cc is None:
        raise WrapperSystemError(
            f"{compiler} is not installed; the launcher needs a C compiler and a static libc "
            "(Debian: apt-get install gcc libc6-dev)",
            reason="no_compiler",
        )
    target = Path(dest).absolute()
    fd, partial = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [
                cc,
                "-static",
                "-O2",
                "-Wall",
                "-Wextra",
                "-Werror",
                f'-DPILOT_PYTHON="{interpreter}"',
                f'-DPILOT_CONFIG="{config or ""}"',
                "-o",
                partial,
                str(SOURCE),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise WrapperSystemError(
                f"building the launcher failed ({detail}); a static build needs libc.a "
                "(Debian: apt-get install libc6-dev)",
                reason="build_failed",
            )
        os.chmod(partial, 0o755)  # noqa: S103 - a program the starter executes
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target
