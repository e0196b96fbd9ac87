"""The job's files in and out: HTCondor's scratch directory and the payload's job directory.

Under the condor_starter the job's executable and input files are transferred
into ``_CONDOR_SCRATCH_DIR``, which belongs to the slot user with mode 0700, and
HTCondor transfers the outputs back from there as that user. The payload runs as
another (mapped) account in the wrapper's job directory, so:

* **in** (:func:`stage_in`): before the payload starts, every file the starter put
  into the scratch directory (not the starter's own files) is *copied* into the job
  directory, owned by the mapped account (as root), or owned by the pilot with an
  ACL entry for the mapped account (mode sudo). The scratch directory is never
  opened up; the payload sees private copies.
* **out** (:func:`stage_out`): after the payload and all its processes are gone,
  the files named in ``transfer_output_files`` (or, without that list, the regular
  files at the top of the job directory that are new or changed) are copied back
  into the scratch directory, owned by the slot user.

Both directions read and write only relative to open directory descriptors, open
every file with ``O_NOFOLLOW | O_NONBLOCK`` and check it with ``fstat``: a symbolic
link, a FIFO, a device or a file with more than one hard link is *not copied* (a
note says so); a file must belong to the side it comes from (the slot user's
files in, the mapped account's files out). Copies are written to a new name
created ``O_EXCL`` and renamed into place, so nothing is ever written through a
link. Counts, sizes and depth are bounded (:class:`Limits`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from payload_wrapper.errors import ClientError, WrapperSystemError

__all__ = [
    "RESERVED_NAMES",
    "STARTER_FILES",
    "Limits",
    "Staged",
    "open_scratch",
    "output_names",
    "stage_in",
    "stage_out",
]

#: Files the starter keeps in the scratch directory for itself; never handed to the payload.
STARTER_FILES = frozenset(
    {
        ".job.ad",
        ".machine.ad",
        ".update.ad",
        ".execution_overlay.ad",
        ".chirp.config",
        ".wrapper_error",
        ".wrapper_error_file",
        "_condor_stdout",
        "_condor_stderr",
        ".docker_sock",
        ".docker_stdout",
        ".docker_stderr",
        ".condor_creds",
    }
)
#: Names the wrapper's sandbox uses inside the job directory.
RESERVED_NAMES = frozenset({"home", "tmp", "proxy"})

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Limits:
    files: int = 10_000
    bytes: int = 16 << 30
    depth: int = 32


@dataclass
class Staged:
    """What one direction did: counts, notes on what was left out, and the copies made."""

    files: int = 0
    bytes: int = 0
    notes: list[str] = field(default_factory=list)
    #: relative path -> (inode, size, mtime_ns) of each copy (to tell unchanged inputs)
    copies: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    over_limit: str | None = None

    def note(self, text: str) -> None:
        if len(self.notes) < 50:
            self.notes.append(text)
        elif len(self.notes) == 50:
            self.notes.append("(further notes left out)")


@dataclass(frozen=True)
class _Side:
    """How files are owned on the destination side, and whose files the source may hold."""

    uid: int | None  # chown copies to this uid (root only); None: keep ours
    gid: int | None
    acl_uid: int | None  # add an ACL entry for this uid (mode sudo: the mapped account)
    source_uids: frozenset[int] | None  # None: any owner


def open_scratch(path: str) -> tuple[int, os.stat_result]:
    """Open the starter's scratch directory; refuse a link, a non-directory or a shared one.

    Returns the descriptor and its ``fstat``; the owner is the slot user.
    """
    try:
        fd = os.open(path, _DIR)
    except OSError as exc:
        raise WrapperSystemError(
            f"the scratch directory {path} cannot be opened ({exc.strerror}); it must be the "
            "starter's own directory, not a symbolic link",
            reason="bad_scratch",
        ) from None
    st = os.fstat(fd)
    if st.st_mode & 0o022:
        os.close(fd)
        raise WrapperSystemError(
            f"the scratch directory {path} can be written by its group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); the starter makes it 0700 for the slot user, so "
            "the job's files there cannot be trusted",
            reason="bad_scratch",
        )
    return fd, st


def _copy_bytes(src: int, dst: int, size: int, staged: Staged, limits: Limits) -> None:
    left = size
    while True:
        chunk = os.read(src, min(_CHUNK, left + 1) if left >= 0 else _CHUNK)
        if not chunk:
            return
        if len(chunk) > left:
            raise _Limit("a file grew while it was copied")
        staged.bytes += len(chunk)
        if staged.bytes > limits.bytes:
            raise _Limit(f"more than {limits.bytes} bytes")
        view = memoryview(chunk)
        while view:
            written = os.write(dst, view)
            view = view[written:]
        left -= len(chunk)


class _Limit(Exception):
    pass


def _finish_copy(out: int, st: os.stat_result, side: _Side, executable_bits: int) -> None:
    if side.uid is not None and side.gid is not None:
        os.fchown(out, side.uid, side.gid)
    os.fchmod(out, (stat.S_IMODE(st.st_mode) & 0o755 & ~0o022) | 0o600 | executable_bits)
    if side.acl_uid is not None:
        from payload_wrapper.sandbox import add_acl_user

        add_acl_user(out, side.acl_uid, read=True, write=True, execute=bool(st.st_mode & 0o100))
    os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))


def _copy_file(
    src_dir: int, name: str, dst_dir: int, rel: str, side: _Side, staged: Staged, limits: Limits
) -> None:
    try:
        src = os.open(name, _READ, dir_fd=src_dir)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            staged.note(f"{rel} is a symbolic link: not copied")
        else:
            staged.note(f"{rel} cannot be read ({exc.strerror}): not copied")
        return
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode):
            staged.note(f"{rel} is not a regular file: not copied")
            return
        if st.st_nlink != 1:
            staged.note(f"{rel} has {st.st_nlink} hard links: not copied")
            return
        if side.source_uids is not None and st.st_uid not in side.source_uids:
            staged.note(f"{rel} belongs to uid {st.st_uid}, not to the job: not copied")
            return
        if staged.files + 1 > limits.files:
            raise _Limit(f"more than {limits.files} files")
        staged.files += 1
        temp = f".staging-{secrets.token_hex(8)}"
        out = os.open(
            temp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dst_dir,
        )
        try:
            try:
                _copy_bytes(src, out, st.st_size, staged, limits)
                _finish_copy(out, st, side, 0)
                done = os.fstat(out)
            finally:
                os.close(out)
            try:
                os.rename(temp, name, src_dir_fd=dst_dir, dst_dir_fd=dst_dir)
            except IsADirectoryError:
                staged.note(f"{rel}: a directory of that name is in the way: not copied")
                raise _Skip() from None
            staged.copies[rel] = (done.st_ino, done.st_size, done.st_mtime_ns)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dst_dir)
            raise
    except _Skip:
        return
    finally:
        os.close(src)


class _Skip(Exception):
    pass


def _open_or_make_dir(name: str, dst_dir: int, mode: int, side: _Side) -> int:
    try:
        os.mkdir(name, 0o700, dir_fd=dst_dir)
        made = True
    except FileExistsError:
        made = False
    fd = os.open(name, _DIR, dir_fd=dst_dir)  # an existing link here fails with ELOOP
    if made:
        try:
            if side.uid is not None and side.gid is not None:
                os.fchown(fd, side.uid, side.gid)
            os.fchmod(fd, (mode & 0o755 & ~0o022) | 0o700)
            if side.acl_uid is not None:
                from payload_wrapper.sandbox import add_acl_user

                add_acl_user(fd, side.acl_uid, read=True, write=True, execute=True)
        except BaseException:
            os.close(fd)
            raise
    return fd


def _copy_entry(
    src_dir: int,
    name: str,
    dst_dir: int,
    rel: str,
    side: _Side,
    staged: Staged,
    limits: Limits,
    depth: int,
) -> None:
    try:
        st = os.stat(name, dir_fd=src_dir, follow_symlinks=False)
    except OSError as exc:
        staged.note(f"{rel} cannot be read ({exc.strerror}): not copied")
        return
    if not stat.S_ISDIR(st.st_mode):
        _copy_file(src_dir, name, dst_dir, rel, side, staged, limits)
        return
    if depth >= limits.depth:
        raise _Limit(f"directories deeper than {limits.depth} levels")
    if side.source_uids is not None and st.st_uid not in side.source_uids:
        staged.note(f"{rel}/ belongs to uid {st.st_uid}, not to the job: not copied")
        return
    try:
        sub = os.open(name, _DIR, dir_fd=src_dir)
    except OSError as exc:
        staged.note(f"{rel}/ cannot be opened ({exc.strerror}): not copied")
        return
    try:
        opened = os.fstat(sub)  # what was opened, not what lstat saw a moment before
        if side.source_uids is not None and opened.st_uid not in side.source_uids:
            staged.note(f"{rel}/ belongs to uid {opened.st_uid}, not to the job: not copied")
            return
        try:
            out = _open_or_make_dir(name, dst_dir, st.st_mode, side)
        except OSError as exc:
            staged.note(f"{rel}/ cannot be created ({exc.strerror}): not copied")
            return
        try:
            for entry in sorted(os.listdir(sub)):
                _copy_entry(sub, entry, out, f"{rel}/{entry}", side, staged, limits, depth + 1)
        finally:
            os.close(out)
    finally:
        os.close(sub)


def _is_starter_file(name: str) -> bool:
    return name in STARTER_FILES or name.startswith(("_condor_", ".condor_"))


def stage_in(
    scratch_fd: int,
    job_dir_fd: int,
    *,
    slot_uid: int,
    uid: int,
    gid: int,
    limits: Limits = Limits(),
) -> Staged:
    """Copy the job's files from the scratch directory into the job directory.

    As root the copies belong to ``uid:gid`` (the mapped account) and only files of
    the slot user are read; otherwise they belong to us with an ACL entry for ``uid``.
    Raises :class:`ClientError` when the job's files exceed the limits.
    """
    root = os.geteuid() == 0
    side = _Side(
        uid=uid if root else None,
        gid=gid if root else None,
        acl_uid=None if root or uid == os.geteuid() else uid,
        source_uids=frozenset({slot_uid}) if root else None,
    )
    staged = Staged()
    try:
        for name in sorted(os.listdir(scratch_fd)):
            if _is_starter_file(name):
                continue
            if name in RESERVED_NAMES:
                staged.note(f"{name} is a name the wrapper uses in the job directory: not copied")
                continue
            _copy_entry(scratch_fd, name, job_dir_fd, name, side, staged, limits, 0)
    except _Limit as exc:
        raise ClientError(
            f"the job's input files are too many or too large to copy for the mapped account "
            f"({exc}); limits: {limits.files} files, {limits.bytes} bytes, {limits.depth} "
            "levels",
            reason="inputs_too_large",
        ) from None
    except OSError as exc:
        raise WrapperSystemError(
            f"copying the job's input files for the mapped account failed: {exc.strerror or exc}",
            reason="stage_in",
        ) from None
    return staged


def output_names(requested: Sequence[str] | None) -> list[str]:
    """Check ``transfer_output_files`` entries: relative paths without ``..`` (others refused)."""
    if not requested:
        return []
    names = []
    for raw in requested:
        name = raw.strip().rstrip("/")
        parts = name.split("/")
        if (
            not name
            or name.startswith("/")
            or any(p in ("", ".", "..") for p in parts)
            or _is_starter_file(parts[0])
        ):
            raise ClientError(
                f"transfer_output_files entry {raw!r} is not a relative path inside the job's "
                "directory (nor one of the starter's own files)",
                reason="bad_output_name",
            )
        names.append(name)
    return names


def _walk_to_parent(
    src_top: int, dst_top: int, parts: Sequence[str], side: _Side
) -> tuple[int, int] | None:
    """Open the parent directories of an output on both sides (made on the destination)."""
    src, dst = os.dup(src_top), os.dup(dst_top)
    try:
        for part in parts:
            nsrc = os.open(part, _DIR, dir_fd=src)
            os.close(src)
            src = nsrc
            ndst = _open_or_make_dir(part, dst, 0o755, side)
            os.close(dst)
            dst = ndst
    except OSError:
        os.close(src)
        os.close(dst)
        return None
    return src, dst


def stage_out(
    job_dir_fd: int,
    scratch_fd: int,
    *,
    payload_uids: Iterable[int],
    slot_uid: int,
    slot_gid: int,
    requested: Sequence[str] | None,
    inputs: dict[str, tuple[int, int, int]],
    limits: Limits = Limits(),
) -> Staged:
    """Copy the payload's outputs back into the scratch directory, owned by the slot user.

    ``requested``: ``transfer_output_files`` (checked with :func:`output_names`); without
    it, the regular files at the top of the job directory that are not the sandbox's and
    not an unchanged copy of an input. Only files of ``payload_uids`` are read. Never raises
    for one bad file (it is noted); limits end the copy with ``over_limit`` set.
    """
    root = os.geteuid() == 0
    side = _Side(
        uid=slot_uid if root else None,
        gid=slot_gid if root else None,
        acl_uid=None,
        source_uids=frozenset(payload_uids),
    )
    staged = Staged()
    try:
        if requested:
            for name in output_names(requested):
                *parents, leaf = name.split("/")
                opened = _walk_to_parent(job_dir_fd, scratch_fd, parents, side)
                if opened is None:
                    staged.note(f"{name} was not found in the job directory")
                    continue
                src, dst = opened
                try:
                    try:
                        os.stat(leaf, dir_fd=src, follow_symlinks=False)
                    except FileNotFoundError:
                        staged.note(f"{name} was not found in the job directory")
                        continue
                    _copy_entry(src, leaf, dst, name, side, staged, limits, len(parents))
                finally:
                    os.close(src)
                    os.close(dst)
            return staged
        for name in sorted(os.listdir(job_dir_fd)):
            if name in RESERVED_NAMES or name.startswith(".staging-") or _is_starter_file(name):
                continue
            try:
                st = os.stat(name, dir_fd=job_dir_fd, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                continue  # HTCondor's default: files at the top level only
            if inputs.get(name) == (st.st_ino, st.st_size, st.st_mtime_ns):
                continue  # an input the payload left alone
            _copy_file(job_dir_fd, name, scratch_fd, name, side, staged, limits)
    except _Limit as exc:
        staged.over_limit = str(exc)
    return staged
