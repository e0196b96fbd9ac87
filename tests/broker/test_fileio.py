from __future__ import annotations

import os
import stat
import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.errors import Conflict, DnSyntaxError, InputError
from broker.fileio import (
    MAX_COMPONENT_LENGTH,
    create_exclusive,
    make_private_dir,
    read_private_file,
    replace_file_atomically,
    replace_in_directory,
    validate_component,
    write_private_file,
)
from tests.prerequisites import needs_root as _needs_root

NOBODY = 65534
needs_root = _needs_root  # changing a file's owner; a failure under CI


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# --------------------------------------------------------------------------- write_private_file


def test_write_creates_file_with_exact_mode_despite_umask(tmp_path: Path) -> None:
    os.umask(0o077)
    target = tmp_path / "key.pem"
    write_private_file(target, b"secret", mode=0o640)
    assert target.read_bytes() == b"secret"
    assert mode_of(target) == 0o640

    os.umask(0)
    other = tmp_path / "other.pem"
    write_private_file(other, b"x")
    assert mode_of(other) == 0o600
    assert leftovers(tmp_path) == []


def test_write_refuses_existing_target_by_default(tmp_path: Path) -> None:
    target = tmp_path / "key.pem"
    target.write_bytes(b"old")
    with pytest.raises(Conflict, match="already exists"):
        write_private_file(target, b"new")
    assert target.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_write_overwrite_replaces_and_tightens_mode(tmp_path: Path) -> None:
    target = tmp_path / "key.pem"
    target.write_bytes(b"old")
    target.chmod(0o644)
    write_private_file(target, b"new", overwrite=True)
    assert target.read_bytes() == b"new"
    assert mode_of(target) == 0o600


@pytest.mark.parametrize("overwrite", [False, True])
def test_write_refuses_symlink_target(tmp_path: Path, overwrite: bool) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    link = tmp_path / "key.pem"
    link.symlink_to(victim)
    with pytest.raises(InputError, match="symbolic link") as info:
        write_private_file(link, b"evil", overwrite=overwrite)
    assert info.value.reason == "symlink"
    assert victim.read_bytes() == b"untouched"
    assert link.is_symlink()
    assert leftovers(tmp_path) == []


def test_write_refuses_dangling_symlink(tmp_path: Path) -> None:
    link = tmp_path / "key.pem"
    link.symlink_to(tmp_path / "does-not-exist")
    with pytest.raises(InputError, match="symbolic link"):
        write_private_file(link, b"evil")
    assert not (tmp_path / "does-not-exist").exists()


def test_write_refuses_directory_target(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match="not a regular file"):
        write_private_file(tmp_path / "d", b"x", overwrite=True)


def test_write_into_missing_directory_says_so(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        write_private_file(tmp_path / "nope" / "key.pem", b"x")


# --------------------------------------------------------------------------- create_exclusive


def test_create_exclusive_refuses_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "proxy"
    create_exclusive(target, b"one")
    assert mode_of(target) == 0o600
    with pytest.raises(Conflict):
        create_exclusive(target, b"two")
    assert target.read_bytes() == b"one"


def test_create_exclusive_refuses_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    (tmp_path / "proxy").symlink_to(victim)
    with pytest.raises((Conflict, InputError)):
        create_exclusive(tmp_path / "proxy", b"evil")
    assert victim.read_bytes() == b"untouched"


def test_create_exclusive_relative_to_dir_fd(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        create_exclusive("proxy", b"data", dir_fd=fd, mode=0o400)
    finally:
        os.close(fd)
    assert (tmp_path / "proxy").read_bytes() == b"data"
    assert mode_of(tmp_path / "proxy") == 0o400


@pytest.mark.root
@needs_root
def test_create_exclusive_gives_file_to_another_account(tmp_path: Path) -> None:
    target = tmp_path / "proxy"
    create_exclusive(target, b"data", uid=NOBODY, gid=NOBODY)
    st_ = os.stat(target)
    assert (st_.st_uid, st_.st_gid) == (NOBODY, NOBODY)
    assert mode_of(target) == 0o600
    assert read_private_file(target, require_owner=NOBODY) == b"data"


# ----------------------------------------------------------------- replace_file_atomically


def test_replace_keeps_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "proxy"
    create_exclusive(target, b"old")
    inode_before = os.stat(target).st_ino
    replace_file_atomically(target, b"new")
    assert target.read_bytes() == b"new"
    assert os.stat(target).st_ino != inode_before  # a new file, renamed into place
    assert leftovers(tmp_path) == []


@pytest.mark.root
@needs_root
def test_replace_sets_owner(tmp_path: Path) -> None:
    target = tmp_path / "proxy"
    create_exclusive(target, b"old", uid=NOBODY)
    replace_file_atomically(target, b"new", uid=NOBODY, gid=NOBODY)
    st_ = os.stat(target)
    assert (st_.st_uid, st_.st_gid) == (NOBODY, NOBODY)
    assert mode_of(target) == 0o600


def test_replace_refuses_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    (tmp_path / "proxy").symlink_to(victim)
    with pytest.raises(InputError, match="symbolic link"):
        replace_file_atomically(tmp_path / "proxy", b"evil")
    assert victim.read_bytes() == b"untouched"


# --------------------------------------------------------------------------- read_private_file


def test_read_returns_content(tmp_path: Path) -> None:
    target = tmp_path / "key.pem"
    write_private_file(target, b"k" * 100)
    assert read_private_file(target, require_owner=os.geteuid()) == b"k" * 100


@pytest.mark.parametrize("perms", [0o644, 0o640, 0o604, 0o660])
def test_read_refuses_group_or_other_bits(tmp_path: Path, perms: int) -> None:
    target = tmp_path / "key.pem"
    write_private_file(target, b"k", mode=perms)
    with pytest.raises(InputError) as info:
        read_private_file(target)
    assert info.value.reason == "unsafe_permissions"
    assert str(info.value) == (
        f"permissions on {target} are {perms:04o}; a file holding a private key must be "
        f"0600 or stricter: run chmod 600 {target}"
    )


def test_read_accepts_stricter_than_0600(tmp_path: Path) -> None:
    target = tmp_path / "key.pem"
    write_private_file(target, b"k", mode=0o400)
    assert read_private_file(target) == b"k"


def test_read_refuses_wrong_owner(tmp_path: Path) -> None:
    target = tmp_path / "key.pem"
    write_private_file(target, b"k")
    someone_else = os.geteuid() + 1 if os.geteuid() != NOBODY else 0
    with pytest.raises(InputError, match="owned by") as info:
        read_private_file(target, require_owner=someone_else)
    assert info.value.reason == "wrong_owner"


def test_read_refuses_fifo_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "key.pem"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(InputError, match="FIFO") as info:
        read_private_file(fifo)
    assert info.value.reason == "not_regular_file"


def test_read_refuses_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="directory"):
        read_private_file(tmp_path)


def test_read_refuses_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real.pem"
    write_private_file(real, b"k")
    link = tmp_path / "key.pem"
    link.symlink_to(real)
    with pytest.raises(InputError, match="symbolic link") as info:
        read_private_file(link)
    assert info.value.reason == "symlink"


def test_read_refuses_oversize(tmp_path: Path) -> None:
    target = tmp_path / "big"
    write_private_file(target, b"x" * 101)
    with pytest.raises(InputError, match="larger than 100 bytes"):
        read_private_file(target, max_size=100)
    assert read_private_file(target, max_size=101) == b"x" * 101


def test_read_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist") as info:
        read_private_file(tmp_path / "missing.pem")
    assert info.value.reason == "not_found"


# --------------------------------------------------------------------------- make_private_dir


def test_make_private_dir_creates_with_exact_mode(tmp_path: Path) -> None:
    os.umask(0o022)
    made = make_private_dir(tmp_path / "state", 0o700)
    assert made == tmp_path / "state"
    assert mode_of(made) == 0o700
    assert make_private_dir(made) == made  # an existing safe directory is fine


def test_make_private_dir_refuses_loose_existing_dir(tmp_path: Path) -> None:
    loose = tmp_path / "state"
    loose.mkdir()
    loose.chmod(0o755)
    with pytest.raises(InputError, match="chmod 700") as info:
        make_private_dir(loose)
    assert info.value.reason == "unsafe_permissions"


def test_make_private_dir_refuses_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "state").symlink_to(real)
    with pytest.raises(InputError, match="symbolic link"):
        make_private_dir(tmp_path / "state")


def test_make_private_dir_refuses_regular_file(tmp_path: Path) -> None:
    (tmp_path / "state").write_bytes(b"")
    with pytest.raises(InputError, match="not a directory"):
        make_private_dir(tmp_path / "state")


def test_make_private_dir_refuses_wrong_owner(tmp_path: Path) -> None:
    existing = tmp_path / "state"
    existing.mkdir(mode=0o700)
    with pytest.raises(InputError, match="owned by") as info:
        make_private_dir(existing, owner=os.geteuid() + 1)
    assert info.value.reason == "wrong_owner"


@pytest.mark.root
@needs_root
def test_make_private_dir_for_another_account(tmp_path: Path) -> None:
    made = make_private_dir(tmp_path / "job", owner=NOBODY)
    assert os.stat(made).st_uid == NOBODY
    assert make_private_dir(made, owner=NOBODY) == made


# --------------------------------------------------------------------------- validate_component


@pytest.mark.parametrize(
    "name",
    ["default", "alice@cern.ch", "atlas+prod-1", "A_b.c", "0", "x" * MAX_COMPONENT_LENGTH],
)
def test_validate_component_accepts(name: str) -> None:
    assert validate_component(name) == name


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("../x", "contains '/'"),
        ("a/b", "contains '/'"),
        ("/abs", "contains '/'"),
        ("a\x00b", "NUL"),
        ("", "empty"),
        (".", "starts with '.'"),
        ("..", "starts with '.'"),
        (".hidden", "starts with '.'"),
        ("-x", "starts with '-'"),
        ("x" * (MAX_COMPONENT_LENGTH + 1), "the limit is 128"),
        ("a b", "contains ' '"),
        ("name\n", "contains '\\n'"),
        ("caf\u00e9", "contains"),
        ("a\\b", "contains"),
    ],
)
def test_validate_component_rejects(name: str, fragment: str) -> None:
    with pytest.raises(DnSyntaxError) as info:
        validate_component(name)
    assert fragment in str(info.value)
    assert str(info.value).startswith("the credential name")


def test_validate_component_names_what_it_checks() -> None:
    with pytest.raises(DnSyntaxError, match=r"^the account name is empty"):
        validate_component("", what="account name")


_NEAR_MISS = string.ascii_letters + string.digits + "._@+-/\x00 \n\\"


@given(st.one_of(st.text(), st.text(alphabet=_NEAR_MISS, max_size=140)))
def test_accepted_names_are_single_safe_components(name: str) -> None:
    try:
        validate_component(name)
    except DnSyntaxError:
        return
    assert "/" not in name
    assert "\x00" not in name
    assert name not in (".", "..")
    assert 0 < len(name) <= MAX_COMPONENT_LENGTH
    base = Path("/srv/creds")
    assert (base / name).parent == base
    assert os.path.normpath(base / name) == str(base / name)


# --------------------------------------------------------------------------- replace_in_directory


def test_replace_in_directory_puts_new_content_in_place_0600(tmp_path: Path) -> None:
    (tmp_path / "proxy").write_bytes(b"old")
    (tmp_path / "proxy").chmod(0o644)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        replace_in_directory(fd, "proxy", b"new", mode=0o600)
        replace_in_directory(fd, "fresh", b"first")  # need not exist yet
    finally:
        os.close(fd)
    assert (tmp_path / "proxy").read_bytes() == b"new"
    assert stat.S_IMODE((tmp_path / "proxy").stat().st_mode) == 0o600
    assert (tmp_path / "fresh").read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "proxy"]  # no temp left


def test_replace_in_directory_refuses_a_planted_link(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep")
    (tmp_path / "proxy").symlink_to(target)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(InputError) as err:
            replace_in_directory(fd, "proxy", b"new")
    finally:
        os.close(fd)
    assert err.value.reason == "not_regular_file"
    assert target.read_bytes() == b"keep"
    assert (tmp_path / "proxy").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "proxy"]
