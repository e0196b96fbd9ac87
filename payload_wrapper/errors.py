"""Exit codes and the wrapper's errors, as subclasses of the broker's one tree.

::

    broker.errors.BrokerError
    └── WrapperError                 exit 202 (a system error unless a subclass says otherwise)
        ├── ClientError              exit 201  bad proxy, bad arguments, unsafe caller files
        ├── WrapperSystemError       exit 202  configuration, OS failures, missing tools
        └── AuthorizationDenied      exit 203  banned, unmapped, forbidden target account

Every message is a sentence the job owner (or the pilot admin) can act on; it
is printed on stderr and recorded in the audit line. :func:`exit_code_for`
maps any broker error (for example a ``ChainError`` from the pki module) to
the gLExec exit codes, so callers never see a Python traceback.
"""

from __future__ import annotations

from broker.errors import (
    AuthenticationError,
    AuthorizationError,
    BrokerError,
    ChainError,
    Conflict,
    CredentialError,
    InputError,
    NotFound,
    PayloadTooLarge,
)

__all__ = [
    "EXIT_CLIENT",
    "EXIT_DENIED",
    "EXIT_EXEC_FAILED",
    "EXIT_NOT_FOUND",
    "EXIT_PAYLOAD_RESERVED",
    "EXIT_SYSTEM",
    "EXIT_TIMEOUT",
    "AuthorizationDenied",
    "ClientError",
    "WrapperError",
    "WrapperSystemError",
    "exit_code_for",
    "payload_exit_code",
]

EXIT_CLIENT = 201
EXIT_SYSTEM = 202
EXIT_DENIED = 203
EXIT_PAYLOAD_RESERVED = 204
EXIT_EXEC_FAILED = 126
EXIT_NOT_FOUND = 127
EXIT_TIMEOUT = 124


class WrapperError(BrokerError):
    """Base of the wrapper's own errors; ``exit_code`` is the process exit status."""

    code = "wrapper"
    exit_code = EXIT_SYSTEM


class ClientError(WrapperError):
    """The caller gave something unusable: a bad proxy, a bad flag, an unsafe file."""

    code = "client"
    http_status = 400
    exit_code = EXIT_CLIENT


class WrapperSystemError(WrapperError):
    """The node or the configuration is broken; the caller cannot fix it by retrying."""

    code = "system"
    exit_code = EXIT_SYSTEM


class AuthorizationDenied(WrapperError):
    """The credential is not allowed to run here (banned, unmapped, forbidden account)."""

    code = "denied"
    http_status = 403
    exit_code = EXIT_DENIED


def exit_code_for(error: BaseException) -> int:
    """The gLExec exit code for any error raised before the payload started."""
    if isinstance(error, WrapperError):
        return error.exit_code
    if isinstance(error, AuthorizationError | AuthenticationError):
        return EXIT_DENIED
    # A missing credential is the job owner's to fix (broker-init), like a bad proxy.
    if isinstance(
        error, InputError | ChainError | CredentialError | PayloadTooLarge | Conflict | NotFound
    ):
        return EXIT_CLIENT
    return EXIT_SYSTEM


def payload_exit_code(returncode: int) -> int:
    """Turn a ``Popen.returncode`` into the wrapper's exit status.

    A payload's own 201-204 becomes 204 so that it can never be mistaken for a
    wrapper failure; death by signal N becomes 128+N as in the shell.
    """
    if returncode < 0:
        return 128 + (-returncode)
    if EXIT_CLIENT <= returncode <= EXIT_PAYLOAD_RESERVED:
        return EXIT_PAYLOAD_RESERVED
    return returncode
