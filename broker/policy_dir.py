"""The policy directory on disk: initial load and hot reload.

This is the only module of the policy engine that touches the filesystem or a
clock; broker.policy itself stays pure. Files are ``*.toml`` directly in the
directory (no recursion), applied in name order; names starting with "." are
skipped because editors park swap and lock files there (emacs' ``.#x.toml``).

Reloading waits for the files to settle: a change is applied only once the
directory has not changed for ``settle`` seconds (5 by default; judged by the
files' change times, so all workers switch together). An editor
that rewrites a file in place leaves it truncated for a moment, and a truncated
file can be valid TOML that simply lacks the deny rules further down; admins
should still write a new file and rename it over the old one (policies/README.md).

Reloading fails closed in the useful sense: a broken edit never replaces a
working policy. The error is logged and ``last_error`` says what is wrong,
while the last good PolicySet stays in force. Unsafe rules (see
:func:`broker.policy.unsafe_rules`) count as broken unless ``allow_unsafe``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from broker.errors import PolicyFileError
from broker.policy import (
    PolicyIssue,
    PolicySet,
    compile_policy_files,
    format_issues,
    sort_file_names,
    sort_issues,
    unsafe_rule_message,
    unsafe_rules,
)

log = logging.getLogger(__name__)

DEFAULT_SETTLE = 5.0

# name, mtime_ns, ctime_ns, size, inode: an editor's atomic rename changes the
# inode even when size and mtime happen to collide.
_Fingerprint = tuple[tuple[str, int, int, int, int], ...]


def _policy_files(directory: Path) -> list[Path]:
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        raise PolicyFileError(
            f"the policy directory {directory} does not exist; create it or set "
            "BROKER_POLICY_DIR to the directory holding the *.toml policy files"
        ) from None
    except NotADirectoryError:
        raise PolicyFileError(f"{directory} is not a directory of policy files") from None
    except OSError as exc:
        raise PolicyFileError(f"cannot list the policy directory {directory}: {exc}") from None
    return sorted(
        (p for p in entries if p.suffix == ".toml" and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def _fingerprint(directory: Path) -> _Fingerprint:
    prints: list[tuple[str, int, int, int, int]] = []
    for path in _policy_files(directory):
        try:
            st = path.stat()
        except OSError:
            # Vanished between listing and stat: an edit in progress; the next look settles it.
            prints.append((path.name, -1, -1, -1, -1))
            continue
        prints.append((path.name, st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino))
    return tuple(prints)


def read_policy_directory(
    directory: str | os.PathLike[str], *, allow_unsafe: bool = False
) -> PolicySet:
    """Load every policy file of ``directory``; raise PolicyFileError listing all problems."""
    policy_set, issues = check_policy_directory(directory, allow_unsafe=allow_unsafe)
    if policy_set is None:
        raise PolicyFileError(format_issues(issues))
    return policy_set


def check_policy_directory(
    directory: str | os.PathLike[str], *, allow_unsafe: bool = False
) -> tuple[PolicySet | None, list[PolicyIssue]]:
    """Like :func:`broker.policy.check_policy_files`, reading the files first.

    Unreadable files, an empty directory and (unless ``allow_unsafe``) unsafe
    rules are reported as issues too. A missing directory raises PolicyFileError.
    """
    path = Path(directory)
    files: dict[str, str] = {}
    issues: list[PolicyIssue] = []
    paths = _policy_files(path)
    if not paths:
        issues.append(
            PolicyIssue(
                str(path), 0, "no *.toml policy files here; without rules every request is denied"
            )
        )
        return None, issues
    for file in paths:
        try:
            files[str(file)] = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            issues.append(PolicyIssue(str(file), 1, f"not UTF-8 text: {exc.reason}"))
        except OSError as exc:
            issues.append(PolicyIssue(str(file), 0, f"cannot read: {exc.strerror or exc}"))
    policy_set, load_issues = compile_policy_files(files)
    issues.extend(load_issues)
    if not allow_unsafe:
        # Checked on the partial set too, so one `check` run lists every problem.
        issues.extend(
            PolicyIssue(rule.file, rule.line, unsafe_rule_message(rule))
            for rule in unsafe_rules(policy_set)
        )
    if issues:
        sort_issues(issues, sort_file_names(files))
        return None, issues
    return policy_set, []


class PolicyDirectory:
    """A policy directory with the last good PolicySet and cheap change detection.

    ``current()`` never touches the disk. Call ``reload_if_changed()`` per
    request or from :meth:`run_watcher` in a thread; ``min_interval`` seconds
    bound how often it even looks (one ``listdir`` + ``stat`` per file). A
    change takes effect at the first look after it has stayed unchanged for
    ``settle`` seconds: by the files' change times (``wall_clock``), so that every
    worker applies it together, or by this object's own looks (``clock``).
    Thread-safe: reloads are serialised and the swap of the PolicySet is a
    single reference assignment.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        min_interval: float = 0.0,
        settle: float = DEFAULT_SETTLE,
        allow_unsafe: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.min_interval = min_interval
        self.settle = settle
        self.allow_unsafe = allow_unsafe
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self.last_error: str | None = None
        fingerprint = _fingerprint(self.path)
        # Initial failure propagates: a server must not start with no policy.
        self._current = read_policy_directory(self.path, allow_unsafe=allow_unsafe)
        self._fingerprint = fingerprint
        self._last_look = clock()
        # A change seen but not applied yet: its fingerprint and when it was first seen.
        self._pending: tuple[_Fingerprint, float] | None = None

    def current(self) -> PolicySet:
        """The policy in force: the last set of files that loaded cleanly."""
        return self._current

    def reload_if_changed(self) -> bool:
        """Reload when the files changed; True if a new PolicySet took effect.

        A broken edit is logged at ERROR, recorded in ``last_error`` and
        otherwise ignored until the files change again.
        """
        now = self._clock()
        if now - self._last_look < self.min_interval:
            return False
        if not self._lock.acquire(blocking=False):
            return False  # another thread is already looking
        try:
            self._last_look = now
            try:
                fingerprint = _fingerprint(self.path)
            except PolicyFileError as exc:
                self._record_failure(exc.message)
                return False
            if fingerprint == self._fingerprint:
                self._pending = None  # changed and changed back
                return False
            if self._pending is None or self._pending[0] != fingerprint:
                self._pending = (fingerprint, now)  # still being written, perhaps
            if now - self._pending[1] < self.settle and not self._stable_on_disk(fingerprint):
                return False
            try:
                policy_set = read_policy_directory(self.path, allow_unsafe=self.allow_unsafe)
                after = _fingerprint(self.path)
            except PolicyFileError as exc:
                self._fingerprint, self._pending = fingerprint, None
                self._record_failure(exc.message)
                return False
            if after != fingerprint:  # written to while we read: wait for it to settle again
                self._pending = (after, now)
                return False
            self._fingerprint, self._pending = fingerprint, None
            self._current = policy_set
            self.last_error = None
            log.info("policy reloaded from %s: %s", self.path, policy_set.summary())
            return True
        finally:
            self._lock.release()

    def _stable_on_disk(self, fingerprint: _Fingerprint) -> bool:
        """True when nothing in the directory changed for ``settle`` seconds by the file times.

        Every process (each gunicorn worker, each node on shared storage) then applies
        the same edit at the same moment, however late it first looks; a process's own
        observation window only decides when the times cannot be trusted (a clock ahead
        of ours).
        """
        try:
            newest = os.stat(self.path).st_mtime_ns  # renames and removals
        except OSError:
            return False
        for _name, _mtime, ctime, _size, _inode in fingerprint:
            if ctime < 0:
                return False  # vanished while we looked: still being edited
            newest = max(newest, ctime)
        return 0 <= self._wall_clock() - newest / 1e9 - self.settle

    def _record_failure(self, message: str) -> None:
        if message != self.last_error:
            log.error(
                "policy in %s not reloaded, keeping the last good policy (%s): %s",
                self.path,
                self._current.summary(),
                message,
            )
        self.last_error = message

    def run_watcher(self, stop: threading.Event, interval: float = 5.0) -> None:
        """Poll every ``interval`` seconds until ``stop`` is set (run it in a daemon thread)."""
        while not stop.wait(interval):
            try:
                self.reload_if_changed()
            except Exception:  # the watcher must outlive any surprise; the policy stays
                log.exception("policy watcher failed; keeping the last good policy")
