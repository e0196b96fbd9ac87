"""Security-sensitive file operations, kept in one place.

Every file that holds a private key, a proxy or another secret is written and
read through this module, so the rules live here and nowhere else:

* files are created with their final permissions (``O_CREAT`` with the mode,
  then ``fchmod`` so the umask cannot leave them looser or tighter than asked);
* the last path component is never followed when it is a symbolic link
  (``O_NOFOLLOW``), and new files are created with ``O_EXCL``;
* whole-file writes go to a temporary file in the same directory which is
  fsynced and then renamed (or hard-linked) into place, so a reader sees the
  old content or the new content, never a torn file;
* reads refuse files that group or other can access, files owned by the wrong
  account, non-regular files and oversized files;
* every name that becomes a path component is checked by
  :func:`validate_component` first.

Only the final component is protected against links: the directories above it
are trusted, as they are chosen by the administrator or by
:func:`make_private_dir`.

Failures are raised from :mod:`broker.errors`: ``Conflict`` when a file that
must be new already exists, ``InputError`` (with a ``reason``) when a path or
file is unsafe or unusable, ``DnSyntaxError`` for a bad name and
``SystemFailure`` for an unexpected operating-system error.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from pathlib import Path

from broker.errors import BrokerError, Conflict, DnSyntaxError, InputError, SystemFailure

__all__ = [
    "MAX_COMPONENT_LENGTH",
    "create_exclusive",
    "make_private_dir",
    "read_private_file",
    "replace_file_atomically",
    "validate_component",
    "write_private_file",
]

StrPath = str | os.PathLike[str]

MAX_COMPONENT_LENGTH = 128

_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK keeps open() from hanging on a FIFO that has no writer; fstat then
# rejects it. It changes nothing for regular files.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_COMPONENT_RE = re.compile(r"[A-Za-z0-9._@+-]+")
_TEMP_ATTEMPTS = 16


# --------------------------------------------------------------------------- writing


def write_private_file(
    path: StrPath, data: bytes, *, mode: int = 0o600, overwrite: bool = False
) -> None:
    """Write ``data`` to ``path`` atomically, with exactly ``mode`` permissions.

    With ``overwrite=False`` (the default) an existing file is never replaced:
    the finished temporary file is hard-linked into place, which fails if the
    name exists, and ``Conflict`` is raised. With ``overwrite=True`` the file is
    renamed over any existing regular file. A symbolic link at ``path`` is
    refused in both cases.
    """
    _write_via_temp(Path(path), data, mode=mode, uid=None, gid=None, replace=overwrite)


def replace_file_atomically(
    path: StrPath,
    data: bytes,
    *,
    mode: int = 0o600,
    uid: int | None = None,
    gid: int | None = None,
) -> None:
    """Replace the content of ``path`` in one step, owned by ``uid``/``gid`` if given.

    Meant for files another process keeps reading, such as a payload's proxy
    that is refreshed while the payload runs: the reader sees the old or the
    new file, never a partial one. ``path`` need not exist yet. Changing the
    owner needs root (or ``CAP_CHOWN``).
    """
    _write_via_temp(Path(path), data, mode=mode, uid=uid, gid=gid, replace=True)


def create_exclusive(
    path: StrPath,
    data: bytes,
    *,
    mode: int = 0o600,
    uid: int | None = None,
    gid: int | None = None,
    dir_fd: int | None = None,
) -> None:
    """Create ``path``, which must not exist, and write ``data`` into it.

    The owner is changed (when ``uid`` or ``gid`` is given) before any byte is
    written, so the data never sits in a file owned by the wrong account. With
    ``dir_fd``, ``path`` is relative to that open directory, as for
    :func:`os.open`. On failure the half-written file is removed.
    """
    p = Path(path)
    try:
        fd = os.open(p, _NEW_FILE_FLAGS, mode & 0o7777, dir_fd=dir_fd)
    except OSError as exc:
        raise _file_error(exc, "create", p) from exc
    complete = False
    try:
        _fill(fd, data, mode=mode, uid=uid, gid=gid)
        complete = True
    except OSError as exc:
        raise _file_error(exc, "write", p) from exc
    finally:
        os.close(fd)
        if not complete:
            _unlink_quietly(p, dir_fd=dir_fd)
    if dir_fd is not None:
        _fsync_dir_fd(dir_fd)
    else:
        _fsync_dir(p.parent)


def replace_in_directory(
    dir_fd: int,
    name: str,
    data: bytes,
    *,
    mode: int = 0o600,
    uid: int | None = None,
    gid: int | None = None,
) -> None:
    """Replace ``name`` inside the open directory ``dir_fd`` in one step.

    The new content goes into a temporary file created exclusively next to it
    (owner set before any byte is written, see :func:`create_exclusive`), which
    is then renamed over ``name``. An existing entry that is not a regular file
    (a symbolic link, say) is refused with reason ``not_regular_file``, never
    replaced; a failed rename has reason ``rename_failed`` and leaves no
    temporary file behind.
    """
    mode_there = _mode_without_following(Path(name), dir_fd=dir_fd)
    if mode_there is not None and not stat.S_ISREG(mode_there):
        raise InputError(
            f"{name} was replaced by something that is not a regular file (a symbolic "
            "link?); refusing to write through it",
            reason="not_regular_file",
        )
    temp = _temp_name(name)
    create_exclusive(temp, data, mode=mode, uid=uid, gid=gid, dir_fd=dir_fd)
    try:
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as exc:
        _unlink_quietly(Path(temp), dir_fd=dir_fd)
        raise SystemFailure(
            f"cannot put {name} in place: {exc.strerror or exc}", reason="rename_failed"
        ) from exc


def _write_via_temp(
    path: Path, data: bytes, *, mode: int, uid: int | None, gid: int | None, replace: bool
) -> None:
    _refuse_link_or_odd_target(path)
    directory = path.parent
    tmp, fd = _create_temp(directory, path.name, mode)
    placed = False
    try:
        _fill(fd, data, mode=mode, uid=uid, gid=gid)
        os.close(fd)
        fd = -1
        if replace:
            # rename() replaces the name itself and never follows a link there,
            # so a link planted after the check above is replaced, not written through.
            os.rename(tmp, path)
            placed = True
        else:
            os.link(tmp, path, follow_symlinks=False)
            placed = True
            os.unlink(tmp)
    except OSError as exc:
        raise _file_error(exc, "write", path) from exc
    finally:
        if fd >= 0:
            os.close(fd)
        if not placed:
            _unlink_quietly(tmp)
    _fsync_dir(directory)


def _mode_without_following(path: Path, *, dir_fd: int | None = None) -> int | None:
    """The mode of what ``path`` names, a symbolic link itself included (None: nothing)."""
    try:
        return os.lstat(path, dir_fd=dir_fd).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _file_error(exc, "inspect", path) from exc


def _temp_name(name: str, suffix: str = "") -> str:
    """A hidden, random name for a temporary file next to ``name``."""
    return f".{name[:64]}.{secrets.token_hex(8)}{suffix}"


def _refuse_link_or_odd_target(path: Path) -> None:
    mode_there = _mode_without_following(path)
    if mode_there is None:
        return
    if stat.S_ISLNK(mode_there):
        raise InputError(
            f"{path} is a symbolic link; refusing to write a private file through a link, "
            "which could point anywhere: remove the link or choose another path",
            reason="symlink",
        )
    if not stat.S_ISREG(mode_there):
        raise InputError(
            f"{path} exists and is not a regular file; remove it or choose another path",
            reason="not_regular_file",
        )


def _create_temp(directory: Path, name: str, mode: int) -> tuple[Path, int]:
    for _ in range(_TEMP_ATTEMPTS):
        tmp = directory / _temp_name(name, ".tmp")
        try:
            return tmp, os.open(tmp, _NEW_FILE_FLAGS, mode & 0o7777)
        except FileExistsError:
            continue
        except OSError as exc:
            raise _file_error(exc, "create a temporary file in", directory) from exc
    raise SystemFailure(
        f"could not create a temporary file in {directory} after {_TEMP_ATTEMPTS} attempts; "
        "check what is creating files there"
    )


def _fill(fd: int, data: bytes, *, mode: int, uid: int | None, gid: int | None) -> None:
    if uid is not None or gid is not None:
        os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
    # The umask may have stripped bits from the mode given to open(); set it exactly.
    os.fchmod(fd, mode & 0o7777)
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    os.fsync(fd)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return  # the file itself is already fsynced; the entry is best effort
    try:
        _fsync_dir_fd(fd)
    finally:
        os.close(fd)


def _fsync_dir_fd(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems cannot fsync a directory, and an O_PATH descriptor
        # cannot be fsynced at all; neither makes the write itself fail.
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.EROFS):
            raise SystemFailure(
                f"the file was written but its directory could not be synced to disk: {exc}; "
                "check the filesystem"
            ) from exc


def _unlink_quietly(path: Path, *, dir_fd: int | None = None) -> None:
    try:
        os.unlink(path, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError:
        pass  # cleanup must not hide the error that got us here


# --------------------------------------------------------------------------- reading


def read_private_file(
    path: StrPath, *, require_owner: int | None = None, max_size: int = 1 << 20
) -> bytes:
    """Return the content of a file that must be private to its owner.

    Refused: a symbolic link, anything but a regular file, a file owned by
    another uid than ``require_owner`` (when given), a file with any group or
    other permission bit, and a file larger than ``max_size`` bytes. All checks
    are made on the opened descriptor, so the file cannot be swapped between
    the check and the read.
    """
    p = Path(path)
    try:
        fd = os.open(p, _READ_FLAGS)
    except OSError as exc:
        raise _file_error(exc, "open", p) from exc
    try:
        st = os.fstat(fd)
        _check_private(p, st, require_owner)
        if st.st_size > max_size:
            raise _too_large(p, max_size)
        # Read one byte past the limit in case the file grew after fstat().
        chunks: list[bytes] = []
        remaining = max_size + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError as exc:
        raise _file_error(exc, "read", p) from exc
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_size:
        raise _too_large(p, max_size)
    return data


def _check_private(path: Path, st: os.stat_result, require_owner: int | None) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise InputError(
            f"{path} is not a regular file ({_kind(st.st_mode)}); "
            "a private key or proxy must be stored in a regular file",
            reason="not_regular_file",
        )
    if require_owner is not None and st.st_uid != require_owner:
        raise InputError(
            f"{path} is owned by {_user(st.st_uid)}, but it must be owned by "
            f"{_user(require_owner)}: run chown {require_owner} {path}",
            reason="wrong_owner",
        )
    perms = stat.S_IMODE(st.st_mode)
    if perms & 0o077:
        raise InputError(
            f"permissions on {path} are {perms:04o}; a file holding a private key must be "
            f"0600 or stricter: run chmod 600 {path}",
            reason="unsafe_permissions",
        )


def _too_large(path: Path, max_size: int) -> InputError:
    return InputError(
        f"{path} is larger than {max_size} bytes; this is not a key or proxy file, check the path",
        reason="too_large",
    )


def _kind(st_mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(st_mode):
            return name
    return "not a regular file"


def _user(uid: int) -> str:
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"uid {uid}"


# --------------------------------------------------------------------------- directories


def make_private_dir(path: StrPath, mode: int = 0o700, *, owner: int | None = None) -> Path:
    """Create ``path`` with ``mode``, or check that the existing directory is as safe.

    An existing directory must not be a symbolic link, must be owned by
    ``owner`` (the effective uid unless given) and must not grant any
    permission bit that ``mode`` does not. A new directory is given to
    ``owner`` (which needs root when it is another account). The parent must
    exist. Returns the path.
    """
    p = Path(path)
    expected_owner = os.geteuid() if owner is None else owner
    try:
        os.mkdir(p, mode & 0o7777)
        created = True
    except FileExistsError:
        created = False
    except OSError as exc:
        raise _file_error(exc, "create the directory", p) from exc
    try:
        fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            if os.path.islink(p):
                raise InputError(
                    f"{p} is a symbolic link; a private directory must be a real directory: "
                    "remove the link or choose another path",
                    reason="symlink",
                ) from exc
            raise InputError(
                f"{p} exists and is not a directory; remove it or choose another path",
                reason="not_a_directory",
            ) from exc
        raise _file_error(exc, "open the directory", p) from exc
    try:
        if created:
            if expected_owner != os.geteuid():
                os.fchown(fd, expected_owner, -1)
            # mkdir() applies the umask; set the mode we were asked for.
            os.fchmod(fd, mode & 0o7777)
            return p
        st = os.fstat(fd)
    except OSError as exc:
        raise _file_error(exc, "set up the directory", p) from exc
    finally:
        os.close(fd)
    if st.st_uid != expected_owner:
        raise InputError(
            f"the directory {p} is owned by {_user(st.st_uid)}, but it must be owned by "
            f"{_user(expected_owner)}: fix its owner or choose another path",
            reason="wrong_owner",
        )
    extra = stat.S_IMODE(st.st_mode) & ~mode & 0o7777
    if extra:
        raise InputError(
            f"permissions on the directory {p} are {stat.S_IMODE(st.st_mode):04o}, "
            f"looser than {mode:04o}: run chmod {mode:o} {p}",
            reason="unsafe_permissions",
        )
    return p


# --------------------------------------------------------------------------- names


def validate_component(name: str, *, what: str = "credential name") -> str:
    """Return ``name`` if it is safe as one path component and as a database key.

    Allowed: 1 to 128 characters from ``A-Z a-z 0-9 . _ @ + -``, not starting
    with ``.`` or ``-`` (so never ``.``, ``..``, a hidden file or something that
    looks like a command-line option). ``what`` names the value in the error
    message, e.g. ``"credential name"`` or ``"account name"``.
    """
    if not isinstance(name, str):
        raise DnSyntaxError(f"the {what} must be text, not {type(name).__name__}")
    if not name:
        raise DnSyntaxError(f"the {what} is empty; give a name such as 'default'")
    shown = _show(name)
    if len(name) > MAX_COMPONENT_LENGTH:
        raise DnSyntaxError(
            f"the {what} {shown} is {len(name)} characters long; "
            f"the limit is {MAX_COMPONENT_LENGTH}"
        )
    if "\x00" in name:
        raise DnSyntaxError(f"the {what} {shown} contains a NUL character, which is not allowed")
    if "/" in name:
        raise DnSyntaxError(
            f"the {what} {shown} contains '/', which is not allowed: "
            "a name is a single path component"
        )
    if not _COMPONENT_RE.fullmatch(name):
        bad = next(c for c in name if not _COMPONENT_RE.fullmatch(c))
        raise DnSyntaxError(
            f"the {what} {shown} contains {bad!r}; use only letters, digits and . _ @ + -"
        )
    if name[0] in ".-":
        raise DnSyntaxError(
            f"the {what} {shown} starts with {name[0]!r}; start it with a letter or digit"
        )
    return name


def _show(name: str) -> str:
    return repr(name) if len(name) <= 40 else repr(name[:37]) + "..."


# --------------------------------------------------------------------------- errors


def _file_error(exc: OSError, action: str, path: Path) -> BrokerError:
    """Turn an OSError into the broker error a caller can act on."""
    code = exc.errno
    if code == errno.EEXIST:
        return Conflict(
            f"{path} already exists; remove it first or choose another path", reason="exists"
        )
    if code == errno.ELOOP:
        return InputError(
            f"{path} is a symbolic link; refusing to follow it for a private file: "
            "use the real path",
            reason="symlink",
        )
    if code == errno.ENOENT:
        return InputError(
            f"cannot {action} {path}: it (or its directory) does not exist", reason="not_found"
        )
    if code in (errno.EACCES, errno.EPERM):
        return InputError(
            f"cannot {action} {path}: permission denied; check the owner and mode of the "
            "file and its directory",
            reason="permission_denied",
        )
    if code in (errno.EISDIR, errno.ENOTDIR):
        return InputError(
            f"cannot {action} {path}: {exc.strerror}; check the path", reason="not_regular_file"
        )
    return SystemFailure(f"cannot {action} {path}: {exc.strerror or exc}")
