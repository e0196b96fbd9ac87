"""Containment pieces that need no root: mount parsing, the one-owner lock, the settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from payload_wrapper.config import WrapperSettings, merge_settings
from payload_wrapper.containment import UidLock, find_cgroup2_mount, kernel_version, own_cgroup
from payload_wrapper.errors import ClientError, WrapperSystemError

HYBRID = """\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:27 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw
42 31 0:39 / /sys/fs/cgroup/memory rw,relatime shared:11 - cgroup cgroup rw,memory
"""


def test_cgroup2_mount_is_found_on_hybrid_and_pure_hosts() -> None:
    assert find_cgroup2_mount(HYBRID) == Path("/sys/fs/cgroup/unified")
    pure = "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
    assert find_cgroup2_mount(pure) == Path("/sys/fs/cgroup")
    assert find_cgroup2_mount(HYBRID.replace("cgroup2 cgroup2", "cgroup cgroup")) is None


def test_own_cgroup_path() -> None:
    assert (
        own_cgroup("4:memory:/x\n0::/system.slice/condor.service\n")
        == "/system.slice/condor.service"
    )
    assert own_cgroup("0::/\n") == "/"
    assert own_cgroup("0::/../../elsewhere\n") is None
    assert own_cgroup("4:memory:/x\n") is None


def test_kernel_version() -> None:
    assert kernel_version("6.18.44-fc-v1272") == (6, 18)
    assert kernel_version("5.15.0-91-generic") == (5, 15)
    assert kernel_version("garbage") == (0, 0)


def test_unknown_containment_is_refused() -> None:
    with pytest.raises(ClientError, match="unknown containment"):
        WrapperSettings(containment="none")
    with pytest.raises(WrapperSystemError, match="unknown containment"):
        merge_settings({"containment": "maybe"}, {})
    assert merge_settings({"containment": "cgroup", "state_dir": "/run/x"}, {}).state_dir == Path(
        "/run/x"
    )


def test_two_owners_never_hold_one_uid(tmp_path: Path) -> None:
    state = tmp_path / "state"
    alice = UidLock.acquire(state, 4242, "/CN=Alice", account="pool01")
    with pytest.raises(WrapperSystemError, match="another owner") as info:
        UidLock.acquire(state, 4242, "/CN=Bob", account="pool01")
    assert info.value.reason == "account_in_use"
    other_uid = UidLock.acquire(state, 4243, "/CN=Bob", account="pool02")  # another uid: fine
    alice2 = UidLock.acquire(state, 4242, "/CN=Alice", account="pool01")  # same owner shares
    assert not alice.sole_holder()
    with pytest.raises(WrapperSystemError, match="another owner"):  # still held after the try
        UidLock.acquire(state, 4242, "/CN=Bob", account="pool01")
    alice2.release()
    assert alice.sole_holder()
    alice.release()
    UidLock.acquire(state, 4242, "/CN=Bob", account="pool01").release()
    other_uid.release()


def test_exclusive_lock_refuses_even_the_same_owner(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = UidLock.acquire(state, 4242, "/CN=Alice", account="pool01", exclusive=True)
    with pytest.raises(WrapperSystemError, match=r"to itself|exclusively"):
        UidLock.acquire(state, 4242, "/CN=Alice", account="pool01")
    first.release()
    shared = UidLock.acquire(state, 4242, "/CN=Alice", account="pool01")
    with pytest.raises(WrapperSystemError, match="to itself"):
        UidLock.acquire(state, 4242, "/CN=Alice", account="pool01", exclusive=True)
    shared.release()


def test_unsafe_state_dir_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "open"
    state.mkdir(mode=0o777)
    state.chmod(0o777)
    with pytest.raises(WrapperSystemError, match="writable by nobody else"):
        UidLock.acquire(state, 4242, "/CN=Alice", account="pool01")
