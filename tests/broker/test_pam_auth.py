"""broker.pam_auth against a real PAM stack (pam_pwdfile + pam_listfile via pam_confdir)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from broker.errors import AuthenticationError, ConfigError, InputError, SystemFailure
from broker.pam_auth import PamRefused, PamSettings, check_password
from tests.pamstack import PamStack, make_pam_stack

PASSWORD = "c0rrect horse"


@pytest.fixture
def stack(tmp_path: Path) -> PamStack:
    return make_pam_stack(
        tmp_path / "pam",
        {"alice": PASSWORD, "bob": "bob-pw"},
        locked={"carol": PASSWORD},
        disabled={"dave": PASSWORD},
    )


@pytest.fixture
def settings(stack: PamStack) -> PamSettings:
    return PamSettings(stack.service, confdir=str(stack.confdir))


def test_right_password(settings: PamSettings) -> None:
    check_password(settings, "alice", PASSWORD)
    check_password(settings, "bob", "bob-pw")


def test_wrong_password(settings: PamSettings) -> None:
    with pytest.raises(PamRefused) as err:
        check_password(settings, "alice", "bob-pw")
    assert isinstance(err.value, AuthenticationError)
    assert err.value.reason == "pam_auth_failed"
    assert err.value.pam_code == 7
    assert err.value.pam_reason == "Authentication failure"
    assert "'alice'" in err.value.message and "Authentication failure" in err.value.message


def test_unknown_user(settings: PamSettings) -> None:
    with pytest.raises(PamRefused) as err:
        check_password(settings, "mallory", PASSWORD)
    assert err.value.reason == "pam_user_unknown"
    assert err.value.pam_code == 10
    assert "not known" in err.value.pam_reason


def test_locked_account_refused_with_the_right_password(settings: PamSettings) -> None:
    # carol's hash is "!"-prefixed, as `passwd -l` leaves it
    with pytest.raises(PamRefused) as err:
        check_password(settings, "carol", PASSWORD)
    assert err.value.reason == "pam_auth_failed"
    assert err.value.pam_reason == "Authentication failure"


def test_account_stack_refusal(settings: PamSettings) -> None:
    # dave's password is right; the account phase (pam_acct_mgmt) refuses him
    with pytest.raises(PamRefused) as err:
        check_password(settings, "dave", PASSWORD)
    assert err.value.pam_code == 7
    check_password(settings, "alice", PASSWORD)  # and the stack still works for others


@pytest.mark.parametrize("username", ["", "../etc", "a/b", "-rf", "al ice", "x" * 129])
def test_bad_usernames_never_reach_pam(settings: PamSettings, username: str) -> None:
    with pytest.raises(InputError):
        check_password(settings, username, PASSWORD)


@pytest.mark.parametrize("password", ["", "a\x00b", "p" * 1025])
def test_bad_passwords(settings: PamSettings, password: str) -> None:
    with pytest.raises(InputError):
        check_password(settings, "alice", password)


def test_broken_stack_is_a_system_failure(stack: PamStack) -> None:
    (stack.confdir / "broken").write_text(
        "auth required pam_no_such_module.so\naccount required pam_permit.so\n"
    )
    with pytest.raises(SystemFailure) as err:
        check_password(PamSettings("broken", confdir=str(stack.confdir)), "alice", PASSWORD)
    assert err.value.reason == "pam_unavailable"


def test_settings_refuse_a_missing_service(stack: PamStack) -> None:
    with pytest.raises(ConfigError, match="no service file"):
        PamSettings("absent", confdir=str(stack.confdir))
    with pytest.raises(InputError):
        PamSettings("../login")


def test_password_never_logged(settings: PamSettings, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "s3cret-that-must-not-leak"
    with pytest.raises(PamRefused) as err:
        check_password(settings, "alice", secret)
    assert secret not in str(err.value)
    assert secret not in caplog.text
    assert "alice" in caplog.text  # the refusal itself is logged


def test_concurrent_logins(settings: PamSettings) -> None:
    """One pam.pam() per call: threads never see each other's result."""
    cases = [
        ("alice", PASSWORD, True),
        ("alice", "nope", False),
        ("bob", "bob-pw", True),
        ("mallory", "x", False),
        ("carol", PASSWORD, False),
    ]
    mismatches: list[tuple[str, str]] = []
    done: list[int] = []

    def run() -> None:
        for _ in range(10):
            for user, password, expected in cases:
                try:
                    check_password(settings, user, password)
                    ok = True
                except PamRefused:
                    ok = False
                if ok != expected:
                    mismatches.append((user, password))
        done.append(1)

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(done) == 6 and mismatches == []
