"""Grid-mapfile, ban list and gridmapdir leases with expiry (no root needed)."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from payload_wrapper.errors import AuthorizationDenied, WrapperSystemError
from payload_wrapper.mapping import (
    BanList,
    GridmapDir,
    is_fqan,
    lease_name,
    map_identity,
    normalize_fqan,
    parse_gridmapfile,
)

ALICE = "/DC=org/DC=example/CN=Alice"
BOB = "/DC=org/DC=example/CN=Bob Smith"
DAY = 86400.0
T0 = 1_700_000_000.0

GRIDMAP = f'''
# comment
"{ALICE}" nobody
"{BOB}" .pool
"/atlas/Role=pilot" .atlpilot
"/atlas/Role=pilot" ignored-second
'''


def make_gridmapdir(tmp_path: Path, *names: str) -> GridmapDir:
    d = tmp_path / "gridmapdir"
    d.mkdir()
    for n in names:
        (d / n).touch()
    return GridmapDir(d, expiry=DAY)


def test_parse_gridmapfile() -> None:
    entries = parse_gridmapfile(GRIDMAP)
    assert [(e.pattern, e.target) for e in entries][:3] == [
        (ALICE, "nobody"),
        (BOB, ".pool"),
        ("/atlas/Role=pilot", ".atlpilot"),
    ]
    assert entries[2].is_fqan and not entries[0].is_fqan
    assert entries[2].matches_fqan("/atlas/Role=pilot/Capability=NULL")


def test_fqan_helpers() -> None:
    assert is_fqan("/atlas/Role=pilot") and not is_fqan(ALICE)
    assert normalize_fqan("/atlas/Role=NULL/Capability=NULL") == "/atlas"


def test_lease_name_is_urlencoded_and_keeps_case() -> None:
    assert lease_name(BOB) == "%2FDC%3Dorg%2FDC%3Dexample%2FCN%3DBob%20Smith"
    assert lease_name(BOB, "/atlas/Role=pilot").endswith(":%2Fatlas%2FRole%3Dpilot")
    # DNs differing only in case are different people: different leases
    assert lease_name(BOB) != lease_name(BOB.lower())


def test_ban_list_dn_and_fqan() -> None:
    bans = BanList((ALICE.upper(), "/atlas/Role=banned", "/cms"))
    assert bans.match(ALICE, ()) == ALICE.upper()
    assert bans.match(BOB, ("/atlas/Role=banned/Capability=NULL",)) == "/atlas/Role=banned"
    assert bans.match(BOB, ("/cms/higgs",)) == "/cms"
    assert bans.match(BOB, ("/atlas/Role=pilot", "/cmsx")) is None


def test_ban_file(tmp_path: Path) -> None:
    f = tmp_path / "ban"
    f.write_text(f'# banned\n"{BOB}"\n/atlas/Role=x\n')
    assert BanList.from_sources([], f).entries == (BOB, "/atlas/Role=x")
    with pytest.raises(WrapperSystemError, match="does not exist"):
        BanList.from_sources([], tmp_path / "missing")


def test_banned_dn_is_denied_with_reason() -> None:
    with pytest.raises(AuthorizationDenied) as info:
        map_identity(ALICE, (), bans=BanList((ALICE,)), account="nobody", now=T0, caller_uid=0)
    assert info.value.exit_code == 203
    assert "banned" in info.value.message and ALICE in info.value.message


def test_unmapped_dn_is_denied() -> None:
    with pytest.raises(AuthorizationDenied, match="no grid-mapfile entry"):
        map_identity(
            "/CN=Nobody",
            (),
            bans=BanList(),
            gridmap=parse_gridmapfile(GRIDMAP),
            now=T0,
            caller_uid=0,
        )


def test_never_root_never_caller() -> None:
    with pytest.raises(AuthorizationDenied, match="root"):
        map_identity(ALICE, (), bans=BanList(), account="root", now=T0, caller_uid=1)
    me = pwd.getpwuid(os.getuid()).pw_name
    if os.getuid() != 0:
        with pytest.raises(AuthorizationDenied, match="caller"):
            map_identity(ALICE, (), bans=BanList(), account=me, now=T0, caller_uid=os.getuid())
    # mode none maps to anything: nothing is switched
    assert (
        map_identity(
            ALICE, (), bans=BanList(), account="root", now=T0, caller_uid=0, switching=False
        ).account.uid
        == 0
    )


def test_gridmapfile_dn_and_fqan_lines(tmp_path: Path) -> None:
    gm = parse_gridmapfile(GRIDMAP)
    assert (
        map_identity(ALICE, (), bans=BanList(), gridmap=gm, now=T0, caller_uid=0).account.name
        == "nobody"
    )
    gmdir = make_gridmapdir(tmp_path, "atlpilot01")
    with pytest.raises(WrapperSystemError, match="atlpilot01"):  # leased, but no such user
        map_identity(
            ALICE,
            ("/atlas/Role=pilot/Capability=NULL",),
            bans=BanList(),
            gridmap=gm,
            gridmapdir=gmdir,
            now=T0,
            caller_uid=0,
        )
    assert os.stat(gmdir.path / "atlpilot01").st_nlink == 2  # the FQAN line won over the DN


def test_lease_is_stable_and_touched(tmp_path: Path) -> None:
    g = make_gridmapdir(tmp_path, "pool01", "pool02")
    assert g.lease(ALICE, ".pool", now=T0) == "pool01"
    assert g.lease(BOB, ".pool", now=T0) == "pool02"
    assert g.lease(ALICE, ".pool", now=T0 + 100) == "pool01"
    assert os.stat(g.path / lease_name(ALICE)).st_mtime == T0 + 100
    assert os.stat(g.path / "pool01").st_nlink == 2


def test_pool_exhausted(tmp_path: Path) -> None:
    g = make_gridmapdir(tmp_path, "pool01")
    g.lease(ALICE, ".pool", now=T0)
    with pytest.raises(WrapperSystemError, match="are leased") as info:
        g.lease(BOB, ".pool", now=T0 + 10)
    assert info.value.exit_code == 202


def test_expired_lease_is_released_and_reused(tmp_path: Path) -> None:
    g = make_gridmapdir(tmp_path, "pool01")
    g.lease(ALICE, ".pool", now=T0)
    # before expiry Bob gets nothing; after it Alice's idle lease is released for him
    with pytest.raises(WrapperSystemError):
        g.lease(BOB, ".pool", now=T0 + DAY - 1)
    assert g.lease(BOB, ".pool", now=T0 + DAY + 1) == "pool01"
    assert not (g.path / lease_name(ALICE)).exists()
    assert os.stat(g.path / "pool01").st_nlink == 2


def test_touch_keeps_a_lease_alive(tmp_path: Path) -> None:
    g = make_gridmapdir(tmp_path, "pool01")
    g.lease(ALICE, ".pool", now=T0)
    g.touch(lease_name(ALICE), T0 + DAY)  # a running job's heartbeat
    assert g.release_expired(T0 + DAY + 10) == []
    assert g.release_expired(T0 + 2 * DAY + 10) == [lease_name(ALICE)]
    assert os.stat(g.path / "pool01").st_nlink == 1


def test_release_gives_back_a_lease_touched_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = make_gridmapdir(tmp_path, "pool01")
    g.lease(ALICE, ".pool", now=T0)
    name = lease_name(ALICE)
    # the releaser saw an old mtime; a user touches it before the re-check
    real_rename = os.rename

    def rename_then_touch(src: object, dst: object) -> None:
        os.utime(src, (T0 + DAY + 5, T0 + DAY + 5))  # type: ignore[arg-type]
        real_rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rename", rename_then_touch)
    assert g.release_expired(T0 + DAY + 10) == []
    monkeypatch.undo()
    assert (g.path / name).exists()
    assert os.stat(g.path / "pool01").st_nlink == 2
    assert not list(g.path.glob(".release-*"))


def test_simultaneous_link_backs_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = make_gridmapdir(tmp_path, "pool01", "pool02")
    real_link = os.link

    def link_racing(src: object, dst: object, **kw: object) -> None:
        # another wrapper links the same free account just before we do
        if str(src).endswith("pool01") and not (g.path / "%2fother").exists():
            real_link(src, g.path / "%2fother")  # type: ignore[arg-type]
        real_link(src, dst, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "link", link_racing)
    assert g.lease(ALICE, ".pool", now=T0) == "pool02"
    monkeypatch.undo()
    assert os.stat(g.path / "pool01").st_nlink == 2  # ours was withdrawn, theirs stays
    assert os.stat(g.path / "pool02").st_nlink == 2


def test_world_writable_gridmapdir_refused(tmp_path: Path) -> None:
    d = tmp_path / "g"
    d.mkdir()
    d.chmod(0o777)
    with pytest.raises(WrapperSystemError, match="world-writable"):
        GridmapDir(d, expiry=DAY)
