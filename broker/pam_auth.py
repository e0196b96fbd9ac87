"""Username + password checks through PAM (python-pam), for users without grid certificates.

:func:`check_password` runs the full PAM conversation of a service
(``pam_authenticate`` then ``pam_acct_mgmt``), so a locked or expired account is
refused even with the right password.  It is thread-safe: python-pam keeps
per-call state on its ``pam.pam()`` object, so every call makes its own.  The
password is handed to PAM and never logged or put in an exception.

Production reads the service from ``/etc/pam.d/<service>``.  ``confdir`` (the
server setting ``pam_confdir``) is for tests and development only: it loads the
service from another directory through ``pam_start_confdir`` (Linux-PAM 1.4+),
so a test suite can build a PAM stack without writing to ``/etc``.  python-pam
does not wrap that call; :func:`_confdir_start` swaps it in per instance.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.errors import AuthenticationError, ConfigError, InputError, SystemFailure
from broker.fileio import validate_component

log = logging.getLogger("broker.pam")

MAX_PASSWORD_LENGTH = 1024

# Linux-PAM return codes (security/_pam_types.h) that mean "this login is refused",
# as opposed to "PAM itself is broken".
_REFUSALS = {
    6: "pam_permission_denied",  # PAM_PERM_DENIED
    7: "pam_auth_failed",  # PAM_AUTH_ERR: wrong password, or a locked password hash
    8: "pam_credentials_insufficient",  # PAM_CRED_INSUFFICIENT
    10: "pam_user_unknown",  # PAM_USER_UNKNOWN
    11: "pam_max_tries",  # PAM_MAXTRIES
    12: "pam_new_password_required",  # PAM_NEW_AUTHTOK_REQD
    13: "pam_account_expired",  # PAM_ACCT_EXPIRED
    17: "pam_credentials_expired",  # PAM_CRED_EXPIRED
    20: "pam_password_expired",  # PAM_AUTHTOK_EXPIRED
}


@dataclass(frozen=True)
class PamSettings:
    """Which PAM service checks passwords; ``confdir`` is a test/dev-only override."""

    service: str
    confdir: str | None = None

    def __post_init__(self) -> None:
        validate_component(self.service, what="PAM service name")
        if self.confdir is not None:
            if not Path(self.confdir, self.service).is_file():
                raise ConfigError(
                    f"pam_confdir {self.confdir} holds no service file {self.service!r}; "
                    "pam_confdir is for tests only: leave it unset to use /etc/pam.d"
                )
            _confdir_start()  # fail at startup, not at the first login, if libpam lacks it


class PamRefused(AuthenticationError):
    """PAM refused the login; ``pam_code`` and ``pam_reason`` are what PAM said.

    The message names the user and PAM's reason: fit for the log and the audit
    trail.  An edge that answers untrusted clients should send a uniform error
    instead, so that "unknown user" and "wrong password" look the same.
    """

    def __init__(self, username: str, service: str, pam_code: int, pam_reason: str) -> None:
        super().__init__(
            f"PAM service {service!r} refused user {username!r}: {pam_reason} (code {pam_code})",
            reason=_REFUSALS.get(pam_code, "pam_refused"),
        )
        self.username = username
        self.pam_code = pam_code
        self.pam_reason = pam_reason


_confdir_lock = threading.Lock()
_confdir_fn: Callable[..., int] | None = None


def _confdir_start() -> Callable[..., int]:
    """libpam's ``pam_start_confdir``, typed for ctypes (loaded once)."""
    global _confdir_fn
    with _confdir_lock:
        if _confdir_fn is None:
            from pam.__internals import PamConv, PamHandle

            name = ctypes.util.find_library("pam")
            try:
                fn = ctypes.CDLL(name or "libpam.so.0").pam_start_confdir
            except (OSError, AttributeError) as exc:
                raise ConfigError(
                    "pam_confdir needs libpam with pam_start_confdir (Linux-PAM 1.4 or later); "
                    "leave pam_confdir unset to use /etc/pam.d"
                ) from exc
            fn.restype = ctypes.c_int
            fn.argtypes = [
                ctypes.c_char_p,
                ctypes.c_char_p,
                ctypes.POINTER(PamConv),
                ctypes.c_char_p,
                ctypes.POINTER(PamHandle),
            ]
            _confdir_fn = fn
        return _confdir_fn


def _authenticator(settings: PamSettings) -> Any:
    import pam

    authenticator = pam.pam()
    if settings.confdir is not None:
        start = _confdir_start()
        confdir = settings.confdir.encode()

        def start_in_confdir(service: bytes, user: bytes, conv: Any, handle: Any) -> int:
            return start(service, user, conv, confdir, handle)

        authenticator.pam_start = start_in_confdir
    return authenticator


def check_password(settings: PamSettings, username: str, password: str) -> None:
    """Return if PAM accepts ``username``/``password``; raise otherwise.

    Raises :class:`InputError` for a malformed username or password,
    :class:`PamRefused` (an AuthenticationError) when PAM says no, and
    :class:`SystemFailure` when the PAM stack itself fails (missing module,
    unreadable password file): that is the administrator's problem, not the user's.
    """
    validate_component(username, what="username")
    if not password:
        raise InputError("the password is empty", reason="bad_field")
    if len(password) > MAX_PASSWORD_LENGTH or "\x00" in password:
        raise InputError(
            f"the password must be 1..{MAX_PASSWORD_LENGTH} characters without NUL",
            reason="bad_field",
        )
    authenticator = _authenticator(settings)
    ok = authenticator.authenticate(username, password, service=settings.service)
    code = int(authenticator.code)
    raw = authenticator.reason
    reason = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw or "")
    if ok:
        return
    if code in _REFUSALS:
        log.info("PAM service %s refused user %s: %s", settings.service, username, reason)
        raise PamRefused(username, settings.service, code, reason)
    log.error(
        "PAM service %s failed for user %s: %s (code %d)", settings.service, username, reason, code
    )
    raise SystemFailure(
        f"password checking is not working on this broker (PAM service {settings.service!r}: "
        f"{reason}); tell the administrator",
        reason="pam_unavailable",
    )
