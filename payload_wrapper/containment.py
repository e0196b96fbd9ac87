"""Keeping a job's processes together, killing all of them, and one owner per account.

Three mechanisms, chosen by the ``containment`` setting (see :func:`choose`):

``cgroup``
    The wrapper (root) creates a cgroup v2 directory for the job below its own
    cgroup (or ``cgroup_parent``), opens its ``cgroup.procs`` *before* the fork
    and the payload's child process writes ``0`` to that descriptor after the
    identity switch and before ``execve``. Since Linux 5.16 the kernel checks a
    write to ``cgroup.procs`` against the credentials of whoever opened the
    file, so the switched child can move itself in while the directory stays
    root-owned and the payload can never move itself out. Every process the
    payload forks is born inside, however fast it hops pids; at the end one
    write of ``1`` to ``cgroup.kill`` kills them all in the kernel, the wrapper
    waits for ``cgroup.events`` to say ``populated 0``, checks that
    ``cgroup.procs`` is empty and removes the directory.
``uid``
    For an account that is exclusive to the job (a pool lease, or an account the
    admin declared dedicated with ``kill_all_target_processes``) *and* no other
    job of the wrapper holds it: a child process becomes the target uid and
    calls ``kill(-1, SIGKILL)``, which the kernel applies to every process the
    uid may signal in one pass over the task list (a fork cannot slip past it),
    repeated until ``/proc`` shows nothing of the uid. Never used for a shared
    account.
``session``
    The old way: descendants of the wrapper (it is a child subreaper) and the
    payload's process group, found by scanning ``/proc``. A payload that forks
    and exits in a tight loop can outrun the scan; only chosen explicitly.

:class:`UidLock` makes sure two different owners never run under one uid at the
same time: a job holds a shared ``flock`` on ``STATE_DIR/uid-<uid>.lock`` for
its lifetime, the file records the owner (the DN), and a job of another owner
is refused while any holder remains. Jobs of the same owner may share.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import select
import signal
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from payload_wrapper.errors import WrapperSystemError

__all__ = [
    "JobCgroup",
    "UidLock",
    "cgroup_parent",
    "default_state_dir",
    "find_cgroup2_mount",
    "kernel_version",
    "kill_uid",
    "own_cgroup",
    "reap_stale_cgroups",
    "uid_processes",
]

_UID_ROUNDS = 200
_CGROUP_NAME = "payload-wrapper-"


# --------------------------------------------------------------------------- cgroup v2


def find_cgroup2_mount(mountinfo: str) -> Path | None:
    """The mount point of the cgroup v2 hierarchy in a ``/proc/self/mountinfo`` text."""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fstype = right.split(" ", 1)[0]
        parts = left.split(" ")
        if fstype == "cgroup2" and len(parts) >= 5:
            # Octal escapes (\040 for a space) as the kernel writes them.
            point = parts[4].encode().decode("unicode_escape")
            return Path(point)
    return None


def own_cgroup(proc_cgroup: str) -> str | None:
    """This process's cgroup v2 path (the ``0::/path`` line of ``/proc/self/cgroup``)."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            path = line[3:].strip()
            # A process in another cgroup namespace's ancestor sees "/.." paths; unusable.
            if path.startswith("/") and "/.." not in path and " (deleted)" not in path:
                return path
    return None


def cgroup_parent(configured: Path | None) -> Path:
    """Where job cgroups are created: ``configured``, or the wrapper's own cgroup.

    Raises WrapperSystemError (with the reason) when there is no usable cgroup v2.
    """
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as handle:
            mount = find_cgroup2_mount(handle.read())
        with open("/proc/self/cgroup", encoding="utf-8") as handle:
            own = own_cgroup(handle.read())
    except OSError as exc:
        raise WrapperSystemError(f"cannot read this process's cgroup: {exc.strerror}") from exc
    if mount is None:
        raise WrapperSystemError(
            "no cgroup v2 hierarchy is mounted (see /proc/self/mountinfo)", reason="no_cgroup"
        )
    if configured is not None:
        parent = configured
        if not parent.is_absolute() or not (parent == mount or mount in parent.parents):
            raise WrapperSystemError(
                f"cgroup_parent {parent} is not a directory below the cgroup v2 mount {mount}",
                reason="no_cgroup",
            )
    else:
        if own is None:
            raise WrapperSystemError("this process's cgroup v2 path is unknown", reason="no_cgroup")
        parent = mount / own.lstrip("/")
    if not (parent / "cgroup.procs").exists():
        raise WrapperSystemError(f"{parent} is not a cgroup v2 directory", reason="no_cgroup")
    if kernel_version(os.uname().release) < (5, 16):
        raise WrapperSystemError(
            f"Linux {os.uname().release} checks cgroup.procs writes against the writer, not the "
            "opener (5.16 or later is needed for a switched payload to join its cgroup)",
            reason="no_cgroup",
        )
    return parent


def kernel_version(release: str) -> tuple[int, int]:
    """``(major, minor)`` of a ``uname -r`` string such as ``6.1.0-18-amd64``; (0, 0) if odd."""
    parts = release.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


@dataclass
class JobCgroup:
    """One job's cgroup; ``procs_fd`` was opened by the wrapper for the child to write."""

    path: Path
    procs_fd: int
    removed: bool = False

    @classmethod
    def create(cls, parent: Path) -> JobCgroup:
        if os.geteuid() != 0:
            raise WrapperSystemError(
                "a cgroup per job needs the wrapper to run as root", reason="no_cgroup"
            )
        reap_stale_cgroups(parent)
        path = parent / f"{_CGROUP_NAME}{os.getpid()}-{secrets.token_hex(6)}"
        try:
            os.mkdir(path, 0o755)
        except OSError as exc:
            raise WrapperSystemError(
                f"cannot create the job's cgroup {path}: {exc.strerror}", reason="no_cgroup"
            ) from exc
        try:
            if not (path / "cgroup.kill").exists():
                raise WrapperSystemError(
                    "this kernel has no cgroup.kill (Linux 5.14 or later is needed)",
                    reason="no_cgroup",
                )
            fd = os.open(path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
        except BaseException:
            with contextlib.suppress(OSError):
                os.rmdir(path)
            raise
        return cls(path, fd)

    def enter(self) -> None:
        """Move the calling process in (run in the child, after the switch, before exec)."""
        os.write(self.procs_fd, b"0")

    def members(self) -> list[int]:
        try:
            text = (self.path / "cgroup.procs").read_text(encoding="ascii")
        except FileNotFoundError:
            return []
        return [int(x) for x in text.split()]

    def populated(self) -> bool:
        try:
            text = (self.path / "cgroup.events").read_text(encoding="ascii")
        except FileNotFoundError:
            return False
        return "populated 1" in text

    def kill(self, timeout: float = 10.0) -> int:
        """Kill everything inside and wait until it is empty; returns how many were inside."""
        count = len(self.members())
        deadline = time.monotonic() + timeout
        while True:
            with open(self.path / "cgroup.kill", "w", encoding="ascii") as handle:
                handle.write("1")
            if self._wait_empty(min(1.0, max(0.0, deadline - time.monotonic()))):
                break
            if time.monotonic() >= deadline:
                raise WrapperSystemError(
                    f"processes of the job survived cgroup.kill in {self.path} for "
                    f"{timeout:g} s; check the node (D-state processes on a hung filesystem?)"
                )
        left = self.members()
        if left:
            raise WrapperSystemError(
                f"the job's cgroup {self.path} still lists processes {left[:5]} after cgroup.kill"
            )
        return count

    def _wait_empty(self, timeout: float) -> bool:
        events = self.path / "cgroup.events"
        try:
            fd = os.open(events, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return True
        try:
            poller = select.poll()
            poller.register(fd, select.POLLPRI)
            end = time.monotonic() + timeout
            while True:
                os.lseek(fd, 0, os.SEEK_SET)
                if b"populated 0" in os.read(fd, 256):
                    return True
                left = end - time.monotonic()
                if left <= 0:
                    return False
                # The kernel signals a change of cgroup.events with POLLPRI; the
                # short cap only guards against a missed edge.
                poller.poll(min(100, int(left * 1000) + 1))
        finally:
            os.close(fd)

    def remove(self) -> None:
        """Close the descriptor and remove the (empty) directory."""
        if self.procs_fd >= 0:
            os.close(self.procs_fd)
            self.procs_fd = -1
        if self.removed:
            return
        for _ in range(50):
            try:
                os.rmdir(self.path)
                self.removed = True
                return
            except FileNotFoundError:
                self.removed = True
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise WrapperSystemError(
                        f"cannot remove the job's cgroup {self.path}: {exc.strerror}"
                    ) from exc
                time.sleep(0.02)
        raise WrapperSystemError(f"the job's cgroup {self.path} stays busy; it was left behind")


def reap_stale_cgroups(parent: Path) -> list[Path]:
    """Kill and remove job cgroups whose wrapper is gone (it was SIGKILLed, say).

    A job cgroup is named ``payload-wrapper-<wrapper pid>-<random>``; when no
    process has that pid any more, nothing will ever clean it up but us. A live
    pid (even a reused one) is left alone. Best effort: returns what was removed.
    """
    removed: list[Path] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(_CGROUP_NAME):
            continue
        pid_text = name[len(_CGROUP_NAME) :].split("-", 1)[0]
        if not pid_text.isdigit() or Path(f"/proc/{pid_text}").exists():
            continue
        stale = JobCgroup(parent / name, -1)
        try:
            stale.kill(timeout=5.0)
            stale.remove()
        except (WrapperSystemError, OSError):
            continue
        removed.append(stale.path)
    return removed


# --------------------------------------------------------------------------- by uid


def _status_uids(pid: int) -> tuple[int, ...] | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"Uid:"):
                    return tuple(int(x) for x in line.split()[1:])
    except (OSError, ValueError):
        return None
    return None


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :][:1] or None


def uid_processes(uid: int) -> list[int]:
    """Live processes (not zombies) whose real, effective or saved uid is ``uid``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        uids = _status_uids(pid)
        if uids is None or uid not in uids[:3]:
            continue
        if _state(pid) not in (None, "Z", "X"):
            found.append(pid)
    return found


def kill_uid(uid: int, gid: int) -> int:
    """SIGKILL every process of ``uid`` until none is left; returns how many were seen.

    Only for an account that belongs to this job alone. A forked child takes
    the uid and calls ``kill(-1, SIGKILL)``: the kernel walks the whole task
    list under its lock and signals every process that uid may signal, so a
    payload forking in a loop cannot escape between a scan and a kill.
    """
    if uid == 0:
        raise WrapperSystemError("refusing to kill every process of uid 0")
    seen: set[int] = set()
    # A scan of /proc can miss a process that changes its pid while the scan runs,
    # so the kill never waits for a scan to find something: kill first, then look.
    for _ in range(_UID_ROUNDS):
        seen.update(pid for pid in uid_processes(uid) if pid != os.getpid())
        _kill_all_as(uid, gid)
        time.sleep(0.005)
        alive = [pid for pid in uid_processes(uid) if pid != os.getpid()]
        if not alive:
            return len(seen)
        seen.update(alive)
    raise WrapperSystemError(
        f"processes of uid {uid} survived repeated kill(-1); check the node (D-state processes?)"
    )


def _kill_all_as(uid: int, gid: int) -> None:
    """``kill(-1, SIGKILL)`` with the identity of ``uid`` (ourselves, or a forked child)."""
    if os.getuid() == uid and os.geteuid() == uid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)  # spares the caller itself
        return
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)
            code = 0
        except ProcessLookupError:
            code = 0  # nothing to signal
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise WrapperSystemError("the uid-wide kill helper process failed")


# --------------------------------------------------------------------------- one owner per uid


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/run/payload-wrapper")
    return Path(f"/tmp/payload-wrapper-{os.geteuid()}")  # noqa: S108 - checked private below


def _private_dir(path: Path) -> None:
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise WrapperSystemError(
            f"cannot create the state directory {path}: {exc.strerror}", reason="state_dir"
        ) from exc
    st = os.lstat(path)
    if (
        not stat.S_ISDIR(st.st_mode)
        or st.st_uid != os.geteuid()
        or stat.S_IMODE(st.st_mode) & 0o022
    ):
        raise WrapperSystemError(
            f"the state directory {path} must be a real directory owned by uid {os.geteuid()} "
            "and writable by nobody else; fix it or set state_dir",
            reason="state_dir",
        )


def _open_private(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise WrapperSystemError(
            f"cannot open the lock file {path}: {exc.strerror}", reason="state_dir"
        ) from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise WrapperSystemError(f"the lock file {path} is not ours; remove it", reason="state_dir")
    return fd


@dataclass
class UidLock:
    """A job's claim on a uid; see the module docstring."""

    state_dir: Path
    uid: int
    owner: str
    fd: int = -1
    exclusive: bool = False
    _guard_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self._guard_path = self.state_dir / f"uid-{self.uid}.guard"

    @classmethod
    def acquire(
        cls, state_dir: Path, uid: int, owner: str, *, account: str, exclusive: bool = False
    ) -> UidLock:
        """Join the uid's holders (or take it alone with ``exclusive``); refuse another owner."""
        _private_dir(state_dir)
        lock = cls(state_dir, uid, owner)
        guard = _open_private(lock._guard_path)
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)
            fd = _open_private(state_dir / f"uid-{uid}.lock")
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 65536, 0).decode("utf-8", "replace")
                    if holder != owner:
                        raise WrapperSystemError(
                            f"the account {account} (uid {uid}) is in use by a job of another "
                            f"owner ({holder}); two owners never run under one account at the "
                            "same time, because each could read the other's proxy and "
                            "processes. Try again later, or have the site map owners to pool "
                            "accounts (gridmapfile + gridmapdir) instead of one shared account",
                            reason="account_in_use",
                        ) from None
                    if exclusive:
                        raise WrapperSystemError(
                            f"the account {account} (uid {uid}) is in use by another job; with "
                            "containment uid a job needs its account to itself (its processes "
                            "are killed by uid). Try again later, or use a cgroup (run as root "
                            "on a host with cgroup v2)",
                            reason="account_in_use",
                        ) from None
                    try:
                        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    except BlockingIOError:
                        raise WrapperSystemError(
                            f"the account {account} (uid {uid}) is held exclusively by another "
                            "job (of the same owner) that is finishing; try again shortly",
                            reason="account_in_use",
                        ) from None
                else:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, owner.encode(), 0)
                    if not exclusive:
                        fcntl.flock(fd, fcntl.LOCK_SH)  # under the guard: nobody slips in
            except BaseException:
                os.close(fd)
                raise
            lock.fd, lock.exclusive = fd, exclusive
            return lock
        finally:
            os.close(guard)

    def sole_holder(self) -> bool:
        """True (and keeps the uid exclusively until :meth:`release`) when no other job holds it."""
        if self.fd < 0:
            return False
        if self.exclusive:
            return True
        guard = _open_private(self._guard_path)
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # A refused conversion has dropped our shared lock (flock(2) converts by
                # unlocking first); take it again while the guard keeps others out.
                fcntl.flock(self.fd, fcntl.LOCK_SH)
                return False
            self.exclusive = True
            return True
        finally:
            os.close(guard)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
