"""The per-job sandbox: job directory, HOME, TMPDIR, egg cache, proxy copy.

Layout, inside the pilot's work directory::

    WORKDIR/job-<id>/            owner: target, 0700 + ACL user:<pilot>:r-x
    WORKDIR/job-<id>/home/       HOME, owner: target, 0700
    WORKDIR/job-<id>/tmp/        TMPDIR, owner: target, 0700
    WORKDIR/job-<id>/proxy/      owner: the wrapper (root), 0755
    WORKDIR/job-<id>/proxy/x509up  X509_USER_PROXY, owner: target, 0600, O_EXCL|O_NOFOLLOW
    /tmp/payload-eggs-<random>/  PYTHON_EGG_CACHE, owner: target, 0700

Why it is shaped like this:

* Every entry is created relative to an open directory descriptor and before
  the job directory is handed to the target, so no process of the target
  account can plant a link on the way. ``mkdir`` fails on any existing name,
  which refuses a reused job id or a planted link.
* The proxy sits in a directory the target cannot change; the wrapper keeps
  that directory open, so :func:`Sandbox.replace_proxy` writes into the same
  inode even if the payload renames things around it, and ``rename(2)``
  replaces a link rather than writing through it.
* The egg cache is made with ``mkdir`` of a random name directly under
  ``/tmp`` (never ``mktemp`` or ``$TMPDIR``, which sites point at places the
  target cannot write).
* The pilot reads outputs through a POSIX ACL entry for its uid, added from
  open descriptors (``fsetxattr``), never by widening group/other bits; see
  :func:`grant_read`.

In sudo mode the wrapper is not root: it creates the job directory for itself
and grants the target ``rwx`` through an ACL, and the helper running as the
target creates the rest (see :mod:`payload_wrapper.switch`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from broker.errors import BrokerError, DnSyntaxError
from broker.fileio import create_exclusive, replace_in_directory, validate_component
from payload_wrapper.errors import ClientError, WrapperSystemError

__all__ = [
    "EGG_ROOT",
    "GRANT_MAX_DEPTH",
    "GRANT_MAX_ENTRIES",
    "PROXY_NAME",
    "GrantResult",
    "Sandbox",
    "add_acl_user",
    "check_workdir",
    "claim_default_proxy_path",
    "create_egg_cache",
    "create_sandbox",
    "default_proxy_path",
    "egg_cache_path",
    "grant_read",
    "install_proxy",
    "job_dir_name",
    "remove_default_proxy_path",
    "replace_payload_file",
]

EGG_ROOT = Path("/tmp")  # noqa: S108 - deliberately /tmp itself, not $TMPDIR
PROXY_NAME = "x509up"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def job_dir_name(job_id: str) -> str:
    """``job-<id>``, after checking that the id is one safe path component."""
    try:
        validate_component(job_id, what="job id")
    except DnSyntaxError as exc:
        raise ClientError(exc.message, reason="bad_job_id") from None
    return f"job-{job_id}"


def check_workdir(path: Path, *, target_uid: int | None) -> os.stat_result:
    """The work directory must be a real directory, not world-writable, reachable by the target."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise ClientError(
            f"the work directory {path} cannot be used ({exc.strerror}); create it or pass "
            "another --workdir",
            reason="bad_workdir",
        ) from exc
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ClientError(
            f"the work directory {path} is not a directory (or is a symbolic link); pass its "
            "real path with --workdir",
            reason="bad_workdir",
        )
    if st.st_mode & 0o002:
        raise ClientError(
            f"the work directory {path} is world-writable; anyone could interfere with job "
            f"directories there: run chmod o-w {path} or use a private directory",
            reason="bad_workdir",
        )
    if target_uid is not None and target_uid != st.st_uid and not st.st_mode & 0o001:
        raise ClientError(
            f"the work directory {path} is not searchable by other accounts, so the payload "
            f"could not reach its job directory: run chmod o+x {path} (e.g. mode 0711)",
            reason="bad_workdir",
        )
    return st


def _own(fd: int, uid: int, gid: int, mode: int) -> None:
    """Give the open file or directory ``fd`` to uid:gid (when that is not us) and ``mode``."""
    if (uid, gid) != (os.geteuid(), os.getegid()):
        os.fchown(fd, uid, gid)
    os.fchmod(fd, mode)


def _own_and_close(fd: int, uid: int, gid: int, mode: int) -> None:
    """:func:`_own` a descriptor opened only for that, then close it whatever happened."""
    try:
        _own(fd, uid, gid, mode)
    finally:
        os.close(fd)


def _mkdir_at(name: str, dir_fd: int, mode: int, *, uid: int, gid: int) -> int:
    """mkdir + open without following links; returns the open directory fd."""
    try:
        os.mkdir(name, mode, dir_fd=dir_fd)
    except FileExistsError:
        raise ClientError(
            f"{name} already exists in the work directory; each job needs a new job id "
            "(remove the old directory or pass another --job-id)",
            reason="exists",
        ) from None
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        _own(fd, uid, gid, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def egg_cache_path(root: Path = EGG_ROOT) -> Path:
    """A fresh random name directly under /tmp (128 bits: nobody can pre-create it by guessing)."""
    return root / f"payload-eggs-{secrets.token_hex(16)}"


def create_egg_cache(path: Path, uid: int, gid: int) -> Path:
    """mkdir ``path`` 0700 for ``uid``; an existing name (a planted link) is refused."""
    try:
        os.mkdir(path, 0o700)
    except OSError as exc:
        raise WrapperSystemError(
            f"cannot create the egg cache {path}: {exc.strerror}", reason="egg_cache"
        ) from exc
    _own_and_close(os.open(path, _DIR_FLAGS), uid, gid, 0o700)
    return path


def install_proxy(
    dir_fd: int, pem: bytes, *, uid: int, gid: int, replace: bool, name: str = PROXY_NAME
) -> None:
    """Put the proxy copy into the open directory ``dir_fd`` (0600, owned by uid:gid).

    A first install uses O_EXCL|O_NOFOLLOW and so refuses anything already
    there, a planted link included. A replacement writes a temporary file,
    then renames it over the old copy; a link found there is refused rather
    than replaced silently, since only root could have planted it.
    """
    owner = None if (uid, gid) == (os.geteuid(), os.getegid()) else uid
    group = None if owner is None else gid
    if not replace:
        try:
            create_exclusive(name, pem, mode=0o600, uid=owner, gid=group, dir_fd=dir_fd)
        except BrokerError as exc:
            raise WrapperSystemError(
                f"cannot create the payload's proxy copy: {exc.message}", reason=exc.reason
            ) from None
        return
    replace_payload_file(
        dir_fd,
        name,
        pem,
        uid=owner,
        gid=group,
        what=f"proxy copy {name}",
        failure=lambda exc: WrapperSystemError(f"cannot refresh the proxy copy: {exc.message}"),
    )


def replace_payload_file(
    dir_fd: int,
    name: str,
    data: bytes,
    *,
    uid: int | None,
    gid: int | None,
    what: str,
    failure: Callable[[BrokerError], WrapperSystemError],
) -> None:
    """Swap ``data`` in as ``name`` in the open directory ``dir_fd`` (0600, uid:gid) by rename.

    A payload-owned file that is no longer a regular file (a link planted in its
    place) is refused, naming it as the payload's ``what``; any other failure
    is raised as ``failure(error)``.
    """
    try:
        replace_in_directory(dir_fd, name, data, mode=0o600, uid=uid, gid=gid)
    except BrokerError as exc:
        if exc.reason == "not_regular_file":
            raise WrapperSystemError(
                f"the payload's {what} was replaced by something that is not a regular "
                "file (a symbolic link?); refusing to write through it",
                reason="symlink",
            ) from None
        raise failure(exc) from None


@dataclass
class Sandbox:
    """The directories of one job; ``proxy_dir_fd`` stays open until :meth:`close`."""

    job_dir: Path
    home: Path
    tmpdir: Path
    egg_cache: Path
    proxy_path: Path
    proxy_dir_fd: int
    uid: int
    gid: int

    def replace_proxy(self, pem: bytes) -> None:
        install_proxy(self.proxy_dir_fd, pem, uid=self.uid, gid=self.gid, replace=True)

    def remove_proxy(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(PROXY_NAME, dir_fd=self.proxy_dir_fd)

    def remove_egg_cache(self) -> None:
        # rmtree works from directory descriptors on Linux and never follows links.
        shutil.rmtree(self.egg_cache, ignore_errors=True)

    def close(self) -> None:
        if self.proxy_dir_fd >= 0:
            os.close(self.proxy_dir_fd)
            self.proxy_dir_fd = -1


def create_sandbox(
    workdir: Path,
    job_id: str,
    *,
    uid: int,
    gid: int,
    pem: bytes,
    pilot_uid: int | None,
    egg_cache: Path,
) -> Sandbox:
    """Create the sandbox for a payload running as uid:gid (needs root when it is not us)."""
    name = job_dir_name(job_id)
    check_workdir(workdir, target_uid=uid)
    me, mygid = os.geteuid(), os.getegid()
    try:
        wfd = os.open(workdir, _DIR_FLAGS)
    except OSError as exc:
        raise ClientError(f"cannot open the work directory {workdir}: {exc.strerror}") from exc
    jfd = pfd = -1
    done = False
    egg: Path | None = None
    try:
        # Owned by us until everything inside exists; handed to the target last.
        jfd = _mkdir_at(name, wfd, 0o700, uid=me, gid=mygid)
        for sub in ("home", "tmp"):
            os.close(_mkdir_at(sub, jfd, 0o700, uid=uid, gid=gid))
        pfd = _mkdir_at("proxy", jfd, 0o755 if uid != me else 0o700, uid=me, gid=mygid)
        install_proxy(pfd, pem, uid=uid, gid=gid, replace=False)
        egg = create_egg_cache(egg_cache, uid, gid)
        if pilot_uid is not None and pilot_uid not in (0, uid):
            add_acl_user(jfd, pilot_uid, read=True, write=False, execute=True)
        if uid != me:
            os.fchown(jfd, uid, gid)
        job_dir = workdir / name
        sandbox = Sandbox(
            job_dir=job_dir,
            home=job_dir / "home",
            tmpdir=job_dir / "tmp",
            egg_cache=egg,
            proxy_path=job_dir / "proxy" / PROXY_NAME,
            proxy_dir_fd=pfd,
            uid=uid,
            gid=gid,
        )
        done = True
        return sandbox
    except OSError as exc:
        raise WrapperSystemError(
            f"cannot prepare the job directory {workdir / name}: {exc.strerror}"
        ) from exc
    finally:
        os.close(wfd)
        if jfd >= 0:
            os.close(jfd)
        if not done:
            if pfd >= 0:
                with contextlib.suppress(OSError):
                    os.unlink(PROXY_NAME, dir_fd=pfd)
                os.close(pfd)
            if egg is not None:
                shutil.rmtree(egg, ignore_errors=True)


# --------------------------------------------------------------------------- POSIX ACLs
# The xattr "system.posix_acl_access" holds a little-endian header (version 2)
# and entries (tag u16, perm u16, id u32), sorted by tag then id.

_ACL_XATTR = "system.posix_acl_access"
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_UNDEFINED = 0xFFFFFFFF
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")


def _read_acl(fd: int, mode: int) -> dict[tuple[int, int], int]:
    try:
        blob = os.getxattr(fd, _ACL_XATTR)
    except OSError as exc:
        if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
            raise
        blob = b""
    entries: dict[tuple[int, int], int] = {}
    if len(blob) >= _HEADER.size:
        for offset in range(_HEADER.size, len(blob) - _ENTRY.size + 1, _ENTRY.size):
            tag, perm, ident = _ENTRY.unpack_from(blob, offset)
            entries[(tag, ident)] = perm
    if not entries:  # no ACL yet: the minimal one the mode bits describe
        entries = {
            (_USER_OBJ, _UNDEFINED): (mode >> 6) & 7,
            (_GROUP_OBJ, _UNDEFINED): (mode >> 3) & 7,
            (_OTHER, _UNDEFINED): mode & 7,
        }
    return entries


def add_acl_user(fd: int, uid: int, *, read: bool, write: bool, execute: bool) -> None:
    """Add (or widen) ``user:<uid>`` on the open file ``fd``; group/other stay as they are.

    The mask becomes the union of the group-class entries, as setfacl does, so
    the owning group gains nothing it did not already have.
    """
    st = os.fstat(fd)
    entries = _read_acl(fd, st.st_mode)
    perm = (4 if read else 0) | (2 if write else 0) | (1 if execute else 0)
    entries[(_USER, uid)] = entries.get((_USER, uid), 0) | perm
    entries.pop((_MASK, _UNDEFINED), None)
    mask = 0
    for (tag, _), p in entries.items():
        if tag in (_USER, _GROUP_OBJ, _GROUP):
            mask |= p
    entries[(_MASK, _UNDEFINED)] = mask
    blob = _HEADER.pack(2) + b"".join(
        _ENTRY.pack(tag, p, ident) for (tag, ident), p in sorted(entries.items())
    )
    try:
        os.setxattr(fd, _ACL_XATTR, blob)
    except OSError as exc:
        raise WrapperSystemError(
            f"cannot add an ACL entry for uid {uid} ({exc.strerror}); the work directory's "
            "filesystem must support POSIX ACLs (mount option acl)"
        ) from exc


#: Bounds on the output walk: a payload controls its job directory, so the walk
#: must not let it decide how much work (or how many open descriptors) the wrapper spends.
GRANT_MAX_DEPTH = 128
GRANT_MAX_ENTRIES = 200_000


@dataclass
class GrantResult:
    """What :func:`grant_read` did; ``limited`` names a bound that stopped it, if any."""

    granted: int = 0
    visited: int = 0
    limited: str | None = None


def _open_entry(name: str, dir_fd: int) -> int | None:
    try:
        return os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError:
        return None  # a link (ELOOP), a socket, a FIFO with no writer, or gone


def grant_read(
    job_dir: Path,
    *,
    pilot_uid: int,
    owner_uid: int,
    max_depth: int = GRANT_MAX_DEPTH,
    max_entries: int = GRANT_MAX_ENTRIES,
) -> GrantResult:
    """Let ``pilot_uid`` read the payload's outputs (like ``setfacl -R -m u:PILOT:rX``).

    Runs after every process of the job is gone. Only regular files and
    directories owned by the payload's account are touched, and files with more
    than one link are skipped, so a payload cannot trick the wrapper into
    opening up a file it merely linked into its job directory.

    The walk is iterative (an explicit stack, no recursion), never follows a
    link (every entry is opened with O_NOFOLLOW relative to its parent's
    descriptor) and is bounded: at most ``max_depth`` directories deep (so at
    most that many descriptors are open) and ``max_entries`` entries in all.
    Hitting a bound is reported in the result, never an exception.
    """
    result = GrantResult()
    try:
        top = os.open(job_dir, _DIR_FLAGS)
    except OSError as exc:
        raise WrapperSystemError(
            f"cannot open {job_dir} to grant read access: {exc.strerror}"
        ) from exc
    # Each frame: an open directory and the names in it still to visit.
    stack: list[tuple[int, list[str]]] = []
    try:
        stack.append((top, _names(top)))
        while stack:
            dir_fd, pending = stack[-1]
            if not pending:
                os.close(dir_fd)
                stack.pop()
                continue
            name = pending.pop()
            if result.visited >= max_entries:
                result.limited = f"more than {max_entries} entries"
                break
            result.visited += 1
            fd = _open_entry(name, dir_fd)
            if fd is None:
                continue
            keep = False
            try:
                st = os.fstat(fd)
                if st.st_uid != owner_uid:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    add_acl_user(fd, pilot_uid, read=True, write=False, execute=True)
                    result.granted += 1
                    if len(stack) >= max_depth:
                        result.limited = f"directories nested deeper than {max_depth} levels"
                        continue
                    stack.append((fd, _names(fd)))
                    keep = True
                elif stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                    add_acl_user(
                        fd, pilot_uid, read=True, write=False, execute=bool(st.st_mode & 0o111)
                    )
                    result.granted += 1
            finally:
                if not keep:
                    os.close(fd)
    finally:
        for dir_fd, _ in stack:
            os.close(dir_fd)
    return result


def _names(dir_fd: int) -> list[str]:
    try:
        with os.scandir(dir_fd) as entries:
            return [e.name for e in entries]
    except OSError:
        return []


# --------------------------------------------------------------------------- /tmp/x509up_u<uid>


def default_proxy_path(uid: int) -> Path:
    """Where grid tools look for a proxy when X509_USER_PROXY is unset."""
    return Path(f"/tmp/x509up_u{uid}")  # noqa: S108 - the grid convention, guarded below


def claim_default_proxy_path(uid: int, gid: int, *, attempts: int = 5) -> str | None:
    """Make ``/tmp/x509up_u<uid>`` an empty 0600 file of ``uid`` before the payload starts.

    Anything else found there (a link, a file of another account, a file with
    several links) was planted: another local user could read whatever a grid
    tool of the payload writes through it. As root, the planted entry is removed
    and the name claimed with O_EXCL|O_NOFOLLOW for the target (in sticky /tmp
    nobody else can then replace it); as the target itself (sudo mode) the
    entry cannot be removed and the job is refused. Returns a note for the
    audit when something was removed.
    """
    path = default_proxy_path(uid)
    note = None
    for _ in range(attempts):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if stat.S_ISREG(st.st_mode) and st.st_uid == uid and st.st_nlink == 1:
                return note  # the target's own file
            if os.geteuid() != 0:
                kind = "a link" if stat.S_ISLNK(st.st_mode) else f"mode {st.st_mode:o}"
                raise WrapperSystemError(
                    f"{path} exists but is not a private file of uid {uid} (owner uid "
                    f"{st.st_uid}, {kind}); another local user may have planted it to catch a "
                    "proxy, so the payload is not started: ask the admin to remove it",
                    reason="planted_proxy_path",
                )
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            note = f"removed {path} planted by uid {st.st_uid}"
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            continue  # somebody raced us; look again
        except OSError as exc:
            raise WrapperSystemError(f"cannot create {path}: {exc.strerror}") from exc
        _own_and_close(fd, uid, gid, 0o600)
        return note
    raise WrapperSystemError(
        f"{path} keeps being re-created by another account; the payload is not started",
        reason="planted_proxy_path",
    )


def remove_default_proxy_path(uid: int) -> None:
    """After a job on an account it had to itself: a proxy left there must not reach the next."""
    path = default_proxy_path(uid)
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if os.geteuid() == 0 or st.st_uid == os.geteuid():
            os.unlink(path)
