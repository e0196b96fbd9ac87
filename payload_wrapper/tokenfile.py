"""The payload's bearer token: a target-owned file found through ``BEARER_TOKEN_FILE``.

WLCG Bearer Token Discovery: a payload looks at ``BEARER_TOKEN``, then the file named
by ``BEARER_TOKEN_FILE``, then ``$XDG_RUNTIME_DIR/bt_u<uid>``, then
``/tmp/bt_u<uid>``. broker-pilot uses the second form only: the token lives next
to the payload's proxy copy, in the job's private proxy directory, as
``bearer_token`` (mode 0600, owned by the mapped account). The file is written
through the sandbox's open directory descriptor, so a directory swapped by the
payload cannot redirect the write; a refresh writes a temporary file and renames
it over the old one (the payload reads the old or the new token, never a torn
one), and the file is removed when the payload ends.

The pilot's own token (the one it authenticates to the broker with) is never
written here, and ``BEARER_TOKEN*`` from the job ad never reaches the payload.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from broker.errors import BrokerError
from payload_wrapper.api import PreparedJob
from payload_wrapper.errors import WrapperSystemError
from payload_wrapper.sandbox import replace_payload_file

TOKEN_NAME = "bearer_token"  # noqa: S105 - a file name
TOKEN_ENV = "BEARER_TOKEN_FILE"  # noqa: S105 - a variable name
MAX_TOKEN_BYTES = 16 * 1024


@dataclass
class TokenFile:
    """The job's token file, kept writable through a private descriptor of its directory."""

    path: Path
    dir_fd: int
    uid: int | None
    gid: int | None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False

    def write(self, token: str) -> None:
        """Replace the token atomically (0600, owned by the payload's account)."""
        data = _check_token(token)
        with self._lock:
            if self.closed:
                raise WrapperSystemError(
                    "the job has ended; its token file is gone", reason="job_finished"
                )
            _replace(self.dir_fd, data, uid=self.uid, gid=self.gid)

    def remove(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            with contextlib.suppress(FileNotFoundError):
                os.unlink(TOKEN_NAME, dir_fd=self.dir_fd)
            os.close(self.dir_fd)


def _check_token(token: str) -> bytes:
    if (
        not isinstance(token, str)
        or not 0 < len(token) <= MAX_TOKEN_BYTES
        or not token.isascii()
        or not token.isprintable()
        or " " in token
    ):
        raise WrapperSystemError(
            "the broker returned an access token that is not a compact "
            "JWT (printable ASCII, no spaces)",
            reason="bad_token",
        )
    return token.encode("ascii") + b"\n"


def _replace(dir_fd: int, data: bytes, *, uid: int | None, gid: int | None) -> None:
    replace_payload_file(
        dir_fd, TOKEN_NAME, data, uid=uid, gid=gid, what=TOKEN_NAME, failure=_write_failure
    )


def _write_failure(exc: BrokerError) -> WrapperSystemError:
    if exc.reason == "rename_failed":
        return WrapperSystemError(
            f"cannot install the payload's token: {exc.message}", reason="token_write"
        )
    return WrapperSystemError(f"cannot write the payload's token: {exc.message}", reason=exc.reason)


def place_token(job: PreparedJob, token: str) -> TokenFile:
    """Write ``token`` for the payload of ``job`` and point ``BEARER_TOKEN_FILE`` at it.

    Call between :func:`~payload_wrapper.api.prepare` and
    :func:`~payload_wrapper.api.execute`. The sudo mode keeps the job directory out of
    the pilot's reach, so it has no token placement (refused with a clear error).
    """
    if job.sandbox is None or job.sandbox.proxy_dir_fd < 0:
        raise WrapperSystemError(
            f"per-job tokens need the setuid or none mode; mode {job.settings.mode!r} gives "
            "the pilot no handle on the job directory",
            reason="token_mode",
        )
    dir_fd = os.dup(job.sandbox.proxy_dir_fd)
    run_as = job.run_as
    mine = (run_as.uid, run_as.gid) == (os.geteuid(), os.getegid())
    handle = TokenFile(
        path=job.proxy_path.parent / TOKEN_NAME,
        dir_fd=dir_fd,
        uid=None if mine else run_as.uid,
        gid=None if mine else run_as.gid,
    )
    try:
        handle.write(token)
    except BaseException:
        handle.remove()
        raise
    job.env[TOKEN_ENV] = str(handle.path)
    return handle
