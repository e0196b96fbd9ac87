"""One JSON line per job in the audit log (append-only, never world-readable).

Fields: ``job_id``, ``dn``, ``fqans``, ``account``, ``uid``, ``mode``,
``start``, ``end`` (ISO 8601, UTC), ``exit`` (the wrapper's exit code),
``payload_exit`` (the payload's own status, when it ran), ``reason`` (the
sentence shown to the job owner when the wrapper refused or failed),
``caller_uid``, ``rule`` (which mapping rule chose the account),
``leftovers`` (processes killed after the payload's exit) and ``containment``
(how the job's processes were contained: ``cgroup``, ``uid`` or ``session``);
``cgroup`` (the job's cgroup) and ``planted`` (a planted ``/tmp/x509up_u<uid>``
that was removed) when they apply.

The line is written with one ``write(2)`` on an ``O_APPEND`` descriptor, so
concurrent wrappers never interleave inside a line.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from payload_wrapper.errors import WrapperSystemError

__all__ = ["AuditRecord", "write_audit"]


@dataclass
class AuditRecord:
    job_id: str
    mode: str
    start: datetime
    caller_uid: int
    dn: str | None = None
    fqans: tuple[str, ...] = ()
    account: str | None = None
    uid: int | None = None
    rule: str | None = None
    end: datetime | None = None
    exit: int | None = None
    payload_exit: int | None = None
    reason: str | None = None
    leftovers: int = 0
    containment: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def to_line(self) -> str:
        data = asdict(self)
        data["fqans"] = list(self.fqans)
        data["start"] = self.start.isoformat()
        data["end"] = self.end.isoformat() if self.end else None
        extra = data.pop("extra")
        data.update(extra)
        return json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n"


def write_audit(path: Path, record: AuditRecord) -> None:
    """Append the record's line to ``path`` (created 0640, never through a symlink)."""
    line = record.to_line().encode()
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640
        )
    except OSError as exc:
        raise WrapperSystemError(
            f"cannot open the audit log {path} ({exc.strerror}); the admin must make it writable"
        ) from exc
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
