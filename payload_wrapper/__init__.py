"""A gLExec-style payload wrapper: map a proxy to a local account and run a payload as it.

The public surface (see docs/payload-wrapper.md):

* :func:`run_payload` - everything in one call, returns the exit code;
* :func:`prepare` / :func:`execute` / :func:`refresh_proxy` - the same in steps, for a pilot
  that refreshes the proxy while the payload runs;
* :class:`WrapperSettings`, :func:`load_config_file`, :func:`merge_settings` - settings;
* the exit codes and errors of :mod:`payload_wrapper.errors`.
"""

from __future__ import annotations

from payload_wrapper.api import PreparedJob, execute, prepare, refresh_proxy, run_payload
from payload_wrapper.config import WrapperSettings, load_config_file, merge_settings
from payload_wrapper.errors import (
    EXIT_CLIENT,
    EXIT_DENIED,
    EXIT_PAYLOAD_RESERVED,
    EXIT_SYSTEM,
    AuthorizationDenied,
    ClientError,
    WrapperError,
    WrapperSystemError,
    exit_code_for,
)

__all__ = [
    "EXIT_CLIENT",
    "EXIT_DENIED",
    "EXIT_PAYLOAD_RESERVED",
    "EXIT_SYSTEM",
    "AuthorizationDenied",
    "ClientError",
    "PreparedJob",
    "WrapperError",
    "WrapperSettings",
    "WrapperSystemError",
    "execute",
    "exit_code_for",
    "load_config_file",
    "merge_settings",
    "prepare",
    "refresh_proxy",
    "run_payload",
]
