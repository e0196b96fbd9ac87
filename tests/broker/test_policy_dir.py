"""PolicyDirectory: initial load, hot reload, broken edits keep the last good policy."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from broker.errors import PolicyFileError
from broker.policy import Action, Request, evaluate
from broker.policy_dir import PolicyDirectory, check_policy_directory, read_policy_directory

REPO_POLICIES = Path(__file__).resolve().parents[2] / "policies"


def rule(name: str, requester: str) -> str:
    return (
        f'[[rule]]\nname = "{name}"\naction = "retrieve"\neffect = "allow"\n'
        f'requester = ["{requester}"]\n'
    )


def allowed(directory: PolicyDirectory, dn: str) -> bool:
    request = Request(action=Action.RETRIEVE, requester_dn=dn, owner_dn="/CN=owner")
    return evaluate(directory.current(), request).allowed


def write(path: Path, text: str) -> None:
    # Bump mtime explicitly: two writes within one timestamp tick must still be seen.
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(before + 10**9, before + 10**9))


def test_repository_examples_load() -> None:
    policy_set = read_policy_directory(REPO_POLICIES)
    assert len(policy_set.rules) >= 5 and len(policy_set.files) >= 2


def test_hot_reload_and_broken_edit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    site = tmp_path / "10-site.toml"
    write(site, rule("a", "/CN=a"))
    directory = PolicyDirectory(tmp_path, settle=0)
    assert allowed(directory, "/CN=a") and not allowed(directory, "/CN=b")
    assert directory.reload_if_changed() is False  # nothing changed

    write(site, rule("a", "/CN=a") + rule("b", "/CN=b"))
    assert directory.reload_if_changed() is True
    assert allowed(directory, "/CN=b")
    good = directory.current()

    with caplog.at_level(logging.ERROR, logger="broker.policy_dir"):
        write(site, rule("a", "/CN=a") + 'bogus = "x"\n')
        assert directory.reload_if_changed() is False
    assert directory.current() is good
    assert directory.last_error is not None and "10-site.toml:6" in directory.last_error
    assert "keeping the last good policy" in caplog.text

    write(site, rule("c", "/CN=c"))
    assert directory.reload_if_changed() is True
    assert directory.last_error is None
    assert allowed(directory, "/CN=c") and not allowed(directory, "/CN=a")


def test_new_and_removed_files_are_noticed(tmp_path: Path) -> None:
    write(tmp_path / "10.toml", rule("a", "/CN=a"))
    directory = PolicyDirectory(tmp_path, settle=0)
    write(tmp_path / "20.toml", rule("b", "/CN=b"))
    assert directory.reload_if_changed() and allowed(directory, "/CN=b")
    (tmp_path / "20.toml").unlink()
    assert directory.reload_if_changed() and not allowed(directory, "/CN=b")


def test_unsafe_edit_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "10.toml", rule("a", "/CN=a"))
    directory = PolicyDirectory(tmp_path, settle=0)
    write(tmp_path / "10.toml", rule("open", "*"))
    assert directory.reload_if_changed() is False
    assert "any DN" in (directory.last_error or "")
    with pytest.raises(PolicyFileError, match="any DN"):
        PolicyDirectory(tmp_path)
    assert PolicyDirectory(tmp_path, allow_unsafe=True).current().rules[0].name == "open"


def test_min_interval_throttles_stat(tmp_path: Path) -> None:
    now = [100.0]
    write(tmp_path / "10.toml", rule("a", "/CN=a"))
    directory = PolicyDirectory(tmp_path, min_interval=5.0, settle=0, clock=lambda: now[0])
    write(tmp_path / "10.toml", rule("b", "/CN=b"))
    now[0] += 1
    assert directory.reload_if_changed() is False
    now[0] += 5
    assert directory.reload_if_changed() is True


def deny(name: str, requester: str) -> str:
    return rule(name, requester).replace('"allow"', '"deny"')


def test_a_change_applies_only_once_settled(tmp_path: Path) -> None:
    """A file rewritten in place is valid but truncated for a moment (the deny rule at its
    end missing): that state must never be applied (issue 18), the finished file must."""
    now = [100.0]
    site = tmp_path / "10-site.toml"
    full = rule("everyone", "/CN=*") + deny("not mallory", "/CN=mallory")
    write(site, full)
    directory = PolicyDirectory(tmp_path, allow_unsafe=True, clock=lambda: now[0])
    assert directory.settle == 5.0  # the default
    assert not allowed(directory, "/CN=mallory")

    write(site, rule("everyone", "/CN=*"))  # the editor's first write: deny rule not there yet
    for _ in range(4):  # 4 s of looks while the writer is still busy
        assert directory.reload_if_changed() is False
        assert not allowed(directory, "/CN=mallory")
        now[0] += 1
    write(site, full + deny("not b", "/CN=b"))  # the rest arrives (and one more rule)
    for _ in range(4):
        assert directory.reload_if_changed() is False  # the new state has not settled yet
        assert allowed(directory, "/CN=b")
        now[0] += 1
    now[0] += 1
    assert directory.reload_if_changed() is True
    assert not allowed(directory, "/CN=b") and not allowed(directory, "/CN=mallory")


def test_workers_apply_a_settled_change_together(tmp_path: Path) -> None:
    """Each gunicorn worker has its own PolicyDirectory; one that first looks late must not
    serve the old policy for another settle interval (the shipped ban reached one worker
    5 s before the other). The files' change time decides, the same for every worker."""
    site = tmp_path / "10-site.toml"
    write(site, rule("everyone", "/CN=*"))
    wall = [time.time()]
    early_clock, late_clock = [0.0], [0.0]
    early = PolicyDirectory(
        tmp_path, allow_unsafe=True, clock=lambda: early_clock[0], wall_clock=lambda: wall[0]
    )
    late = PolicyDirectory(
        tmp_path, allow_unsafe=True, clock=lambda: late_clock[0], wall_clock=lambda: wall[0]
    )
    write(site, rule("everyone", "/CN=*") + deny("not mallory", "/CN=mallory"))
    wall[0] = time.time()
    assert early.reload_if_changed() is False  # just written: not settled for anyone
    wall[0] += 3
    early_clock[0] += 3
    assert early.reload_if_changed() is False
    wall[0] += 2.5  # 5.5 s after the write; `late` looks for the first time now
    early_clock[0] += 2.5
    late_clock[0] += 5.5
    assert late.reload_if_changed() is True
    assert early.reload_if_changed() is True
    assert not allowed(late, "/CN=mallory") and not allowed(early, "/CN=mallory")


def test_initial_failures_raise(tmp_path: Path) -> None:
    with pytest.raises(PolicyFileError, match="does not exist"):
        PolicyDirectory(tmp_path / "missing")
    with pytest.raises(PolicyFileError, match=r"no \*\.toml policy files"):
        PolicyDirectory(tmp_path)
    write(tmp_path / "10.toml", "[[rule]]\nname = 1\n")
    with pytest.raises(PolicyFileError, match=r"10\.toml:2"):
        PolicyDirectory(tmp_path)


def test_skips_dotfiles_and_other_suffixes(tmp_path: Path) -> None:
    write(tmp_path / "10.toml", rule("a", "/CN=a"))
    write(tmp_path / ".#10.toml", "garbage [[")
    write(tmp_path / "10.toml~", "garbage [[")
    policy_set, issues = check_policy_directory(tmp_path)
    assert policy_set is not None and not issues and len(policy_set.files) == 1


def test_non_utf8_file_is_an_issue(tmp_path: Path) -> None:
    (tmp_path / "10.toml").write_bytes(b"\xff\xfe")
    policy_set, issues = check_policy_directory(tmp_path)
    assert policy_set is None and "not UTF-8" in issues[0].message
