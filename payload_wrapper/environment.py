"""The payload's environment, rebuilt from nothing.

Nothing is inherited by default. The result holds the names the wrapper sets
itself (PATH, HOME, USER, LOGNAME, TMPDIR, PYTHON_EGG_CACHE, X509_*), the
allow-listed names copied from the caller (``keep``) and explicit settings
(``set``). Names that change how a dynamic loader, an allocator or an
interpreter starts (``LD_*``, ``MALLOC_*``, ``PYTHONPATH``, ``BASH_ENV``, ...)
are refused even when an admin allow-lists them: a request to keep or set one
is a client error (201) with a sentence naming it, which is clearer than
gLExec's silent drop. The caller's own values of such names are never carried
because nothing is carried unless asked for.

Values are passed to ``execve`` as they are; no shell text is ever built.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from payload_wrapper.errors import ClientError

__all__ = [
    "REFUSED_NAMES",
    "REFUSED_PREFIXES",
    "RESERVED_NAMES",
    "PayloadPaths",
    "build_environment",
    "is_refused",
]

# Prefixes of names that inject code into a loader, an allocator or a shell.
REFUSED_PREFIXES = ("LD_", "MALLOC_", "DYLD_", "BASH_FUNC_", "GLIBC_", "_RLD")

# Names that make an interpreter or library load code or configuration from a
# path the caller chooses.
REFUSED_NAMES = frozenset(
    {
        "PYTHONPATH",
        "PYTHONSTARTUP",
        "PYTHONHOME",
        "PYTHONINSPECT",
        "PYTHONUSERBASE",
        "PYTHONEXECUTABLE",
        "PYTHONBREAKPOINT",
        "PYTHONWARNINGS",
        "PYTHONPLATLIBDIR",
        "PYTHONSAFEPATH",
        "PYTHONDEBUG",
        "PERL5LIB",
        "PERLLIB",
        "PERL5OPT",
        "PERL5DB",
        "PERLIO_DEBUG",
        "RUBYOPT",
        "RUBYLIB",
        "GEM_PATH",
        "GEM_HOME",
        "NODE_OPTIONS",
        "NODE_PATH",
        "BASH_ENV",
        "ENV",
        "IFS",
        "CDPATH",
        "SHELLOPTS",
        "BASHOPTS",
        "PS4",
        "PROMPT_COMMAND",
        "GCONV_PATH",
        "LOCPATH",
        "NLSPATH",
        "HOSTALIASES",
        "RESOLV_HOST_CONF",
        "RES_OPTIONS",
        "GETCONF_DIR",
        "JAVA_TOOL_OPTIONS",
        "_JAVA_OPTIONS",
        "JDK_JAVA_OPTIONS",
        "CLASSPATH",
        "LUA_PATH",
        "LUA_CPATH",
        "LUA_INIT",
        "TCLLIBPATH",
        "PHPRC",
        "PHP_INI_SCAN_DIR",
        "OPENSSL_CONF",
        "OPENSSL_ENGINES",
        "OPENSSL_MODULES",
        "SSLKEYLOGFILE",
        "GIO_EXTRA_MODULES",
        "GTK_MODULES",
        "QT_PLUGIN_PATH",
        "KRB5_CONFIG",
    }
)

# Names the wrapper sets itself; asking to keep or set them is refused so that
# no caller can point HOME or X509_USER_PROXY somewhere else.
RESERVED_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "TMPDIR",
        "PYTHON_EGG_CACHE",
        "X509_USER_PROXY",
        "X509_CERT_DIR",
        "X509_VOMS_DIR",
        "PAYLOAD_WRAPPER_JOB_ID",
    }
)

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def is_refused(name: str) -> bool:
    """True for a name that may never reach a payload (compared without case)."""
    upper = name.upper()
    return upper in REFUSED_NAMES or upper.startswith(REFUSED_PREFIXES)


def _check_name(name: str, how: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise ClientError(
            f"{how} {name!r}: an environment variable name has letters, digits and _ only",
            reason="bad_env_name",
        )
    if is_refused(name):
        raise ClientError(
            f"{how} {name}: this variable can inject code into the payload's programs and is "
            "never passed on; remove it from the request (set it inside the payload if needed)",
            reason="refused_env",
        )
    if name.upper() in RESERVED_NAMES:
        raise ClientError(
            f"{how} {name}: the wrapper sets this variable itself and will not take it from "
            "the caller; remove it from the request",
            reason="reserved_env",
        )


@dataclass(frozen=True)
class PayloadPaths:
    """The per-job values the wrapper itself puts in the environment."""

    user: str
    home: str
    tmpdir: str
    egg_cache: str
    proxy: str
    ca_dir: str
    vomsdir: str
    path: str
    job_id: str


def build_environment(
    paths: PayloadPaths,
    *,
    caller_env: Mapping[str, str],
    keep: Iterable[str] = (),
    set_: Iterable[tuple[str, str]] = (),
) -> dict[str, str]:
    """The complete environment for the payload; raises ClientError for refused names."""
    env: dict[str, str] = {}
    for name in keep:
        _check_name(name, "--keep-env")
        if name in caller_env:
            env[name] = caller_env[name]
    for name, value in set_:
        _check_name(name, "--set-env")
        if "\x00" in value:
            raise ClientError(f"--set-env {name}: the value contains a NUL character")
        env[name] = value
    env.update(
        {
            "PATH": paths.path,
            "HOME": paths.home,
            "USER": paths.user,
            "LOGNAME": paths.user,
            "TMPDIR": paths.tmpdir,
            "PYTHON_EGG_CACHE": paths.egg_cache,
            "X509_USER_PROXY": paths.proxy,
            "X509_CERT_DIR": paths.ca_dir,
            "X509_VOMS_DIR": paths.vomsdir,
            "PAYLOAD_WRAPPER_JOB_ID": paths.job_id,
        }
    )
    # A last guard: whatever happens above, no refused name leaves this function.
    return {k: v for k, v in env.items() if not is_refused(k)}
