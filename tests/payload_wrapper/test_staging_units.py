"""payload_wrapper.staging on real directories: what is copied, what never is, the bounds.

Runs as root (ownership is the point: copies change owner, foreign files are skipped);
one test repeats the copy as an unprivileged user, as a glidein in mode sudo/none does.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from payload_wrapper.errors import ClientError, WrapperSystemError
from payload_wrapper.staging import Limits, open_scratch, output_names, stage_in, stage_out

from .conftest import needs_root

pytestmark = [pytest.mark.root, needs_root]


@pytest.fixture
def dirs() -> Iterator[tuple[Path, Path]]:
    base = Path(tempfile.mkdtemp(prefix="staging-"))
    base.chmod(0o755)
    src, dst = base / "src", base / "dst"
    src.mkdir(mode=0o700)
    dst.mkdir(mode=0o700)
    yield src, dst
    shutil.rmtree(base, ignore_errors=True)


def _fd(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


def _ids(name: str) -> tuple[int, int]:
    entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def test_stage_in_copies_the_slot_users_files_for_the_mapped_account(
    dirs: tuple[Path, Path],
    make_account: Callable[[str], str],
) -> None:
    src, dst = dirs
    slot_uid, slot_gid = _ids(make_account("stgslot1"))
    mapped_uid, mapped_gid = _ids(make_account("stgmap1"))
    (src / "run.sh").write_text("#!/bin/sh\n")
    (src / "run.sh").chmod(0o775)
    (src / "data").mkdir()
    (src / "data" / "in.txt").write_text("input")
    for name in (".job.ad", "_condor_stdout", "home", "tmp"):
        (src / name).write_text("starter's")
    secret = src.parent / "secret"
    secret.write_text("root only")
    secret.chmod(0o600)
    (src / "link").symlink_to(secret)
    os.link(secret, src / "hard")
    os.mkfifo(src / "fifo")
    for path in (src, *src.rglob("*")):
        if not path.is_symlink() and path.name not in ("hard", "fifo"):
            os.chown(path, slot_uid, slot_gid)
    os.chown(src / "fifo", slot_uid, slot_gid)
    sfd, dfd = _fd(src), _fd(dst)
    try:
        staged = stage_in(sfd, dfd, slot_uid=slot_uid, uid=mapped_uid, gid=mapped_gid)
    finally:
        os.close(sfd)
        os.close(dfd)
    assert sorted(p.name for p in dst.iterdir()) == ["data", "run.sh"]
    st = os.stat(dst / "run.sh")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (mapped_uid, mapped_gid, 0o755)
    assert os.stat(dst / "data" / "in.txt").st_uid == mapped_uid
    assert (dst / "data" / "in.txt").read_text() == "input"
    assert set(staged.copies) == {"run.sh", "data/in.txt"}
    notes = " | ".join(staged.notes)
    for phrase in (
        "link is a symbolic link",
        "hard has 2 hard links",
        "fifo is not a regular file",
        "home is a name the wrapper uses",
    ):
        assert phrase in notes


def test_stage_in_limits_refuse_the_job(dirs: tuple[Path, Path]) -> None:
    src, dst = dirs
    for n in range(5):
        (src / f"f{n}").write_text("12345")
    sfd, dfd = _fd(src), _fd(dst)
    try:
        with pytest.raises(ClientError, match="more than 3 files"):
            stage_in(sfd, dfd, slot_uid=0, uid=0, gid=0, limits=Limits(files=3))
        with pytest.raises(ClientError, match="more than 12 bytes"):
            stage_in(sfd, dfd, slot_uid=0, uid=0, gid=0, limits=Limits(bytes=12))
    finally:
        os.close(sfd)
        os.close(dfd)


def test_stage_out_default_named_and_hostile(
    dirs: tuple[Path, Path], make_account: Callable[[str], str]
) -> None:
    job, scratch = dirs
    mapped_uid, mapped_gid = _ids(make_account("stgmap2"))
    slot_uid, slot_gid = _ids(make_account("stgslot2"))
    (job / "new.txt").write_text("new")
    (job / "input.dat").write_text("unchanged")
    (job / "out").mkdir()
    (job / "out" / "a.txt").write_text("a")
    (job / "root.txt").write_text("root's")  # stays root's: not the payload's file
    (job / "proxy").mkdir()
    (job / "escape").symlink_to("/etc")
    for path in (job / "new.txt", job / "input.dat", job / "out", job / "out" / "a.txt"):
        os.chown(path, mapped_uid, mapped_gid)
    st = os.stat(job / "input.dat")
    inputs = {"input.dat": (st.st_ino, st.st_size, st.st_mtime_ns)}
    jfd, sfd = _fd(job), _fd(scratch)
    try:
        staged = stage_out(
            jfd,
            sfd,
            payload_uids={mapped_uid},
            slot_uid=slot_uid,
            slot_gid=slot_gid,
            requested=None,
            inputs=inputs,
        )
        assert sorted(p.name for p in scratch.iterdir()) == ["new.txt"]
        assert os.stat(scratch / "new.txt").st_uid == slot_uid
        assert "root.txt belongs to uid 0" in " ".join(staged.notes)
        staged = stage_out(
            jfd,
            sfd,
            payload_uids={mapped_uid},
            slot_uid=slot_uid,
            slot_gid=slot_gid,
            requested=["out", "escape/passwd", "gone"],
            inputs=inputs,
        )
        assert (scratch / "out" / "a.txt").read_text() == "a"
        assert os.stat(scratch / "out" / "a.txt").st_uid == slot_uid
        assert not (scratch / "escape").exists() and not (scratch / "passwd").exists()
        assert "escape/passwd was not found" in " ".join(staged.notes)
        assert "gone was not found" in " ".join(staged.notes)
        staged = stage_out(
            jfd,
            sfd,
            payload_uids={mapped_uid},
            slot_uid=slot_uid,
            slot_gid=slot_gid,
            requested=["out"],
            inputs=inputs,
            limits=Limits(bytes=0),
        )
        assert staged.over_limit == "more than 0 bytes"
    finally:
        os.close(jfd)
        os.close(sfd)


@pytest.mark.parametrize(
    "bad", ["/etc/passwd", "../x", "a/../../b", ".job.ad", "", "a//b", "_condor_stdout"]
)
def test_output_names_are_relative_and_never_the_starters(bad: str) -> None:
    with pytest.raises(ClientError):
        output_names([bad])


def test_open_scratch_refuses_links_and_shared_directories(dirs: tuple[Path, Path]) -> None:
    src, _dst = dirs
    link = src.parent / "link"
    link.symlink_to(src)
    with pytest.raises(WrapperSystemError, match="cannot be opened"):
        open_scratch(str(link))
    src.chmod(0o770)
    with pytest.raises(WrapperSystemError, match="group or others"):
        open_scratch(str(src))


UNPRIVILEGED = """
import os, sys
sys.path[:0] = {paths!r}
from payload_wrapper.staging import stage_in, stage_out
src, dst, back = sys.argv[1:4]
s, d, b = (os.open(p, os.O_RDONLY | os.O_DIRECTORY) for p in (src, dst, back))
got = stage_in(s, d, slot_uid=os.getuid(), uid=os.getuid(), gid=os.getgid())
with open(os.path.join(dst, "made.txt"), "w") as out:
    out.write("made")
done = stage_out(d, b, payload_uids={{os.getuid()}}, slot_uid=os.getuid(),
                 slot_gid=os.getgid(), requested=None, inputs=got.copies)
print(sorted(got.copies), done.files)
"""


def test_unprivileged_pilot_copies_as_itself(dirs: tuple[Path, Path]) -> None:
    # A glidein (mode none here; sudo adds ACL entries) stages without root.
    import site

    src, dst = dirs
    back = src.parent / "back"
    back.mkdir(mode=0o700)
    (src / "in.txt").write_text("x")
    for path in (src, dst, back, src / "in.txt"):
        os.chown(path, 65534, 65534)
    paths = [str(Path(__file__).resolve().parents[2]), *site.getsitepackages()]
    script = src.parent / "stage.py"
    script.write_text(UNPRIVILEGED.format(paths=paths))
    script.chmod(0o644)
    runuser = shutil.which("runuser")
    assert runuser is not None
    done = subprocess.run(
        [
            runuser,
            "-u",
            "nobody",
            "--",
            "/usr/bin/python3",
            str(script),
            str(src),
            str(dst),
            str(back),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['in.txt'] 1"
    assert sorted(p.name for p in back.iterdir()) == ["made.txt"]
