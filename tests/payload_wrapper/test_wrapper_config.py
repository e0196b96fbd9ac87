"""Settings: TOML + flags, validation, the sudo command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from payload_wrapper.config import WrapperSettings, load_config_file, merge_settings
from payload_wrapper.errors import ClientError, WrapperSystemError, payload_exit_code
from payload_wrapper.switch import sudo_argv


def test_flags_win_and_lists_merge(tmp_path: Path) -> None:
    f = tmp_path / "w.toml"
    f.write_text(
        '[wrapper]\nmode = "sudo"\numask = "0077"\nkeep_env = ["LANG"]\n'
        'ban = ["/CN=a"]\nset_env = { A = "1", B = "2" }\n'
        'epilogue = ["/bin/true"]\npayload_timeout = 60\n'
    )
    s = merge_settings(
        load_config_file(f),
        {
            "mode": "none",
            "umask": "0022",
            "keep_env": ["TZ"],
            "set_env": ["B=3"],
            "ban": ["/CN=b"],
            "account": None,
        },
    )
    assert s.mode == "none" and s.umask == 0o022
    assert s.keep_env == ("LANG", "TZ") and s.ban == ("/CN=a", "/CN=b")
    assert dict(s.set_env) == {"A": "1", "B": "3"}
    assert s.epilogue == ("/bin/true",) and s.payload_timeout == 60.0


def test_unknown_or_bad_file_settings_are_system_errors(tmp_path: Path) -> None:
    f = tmp_path / "w.toml"
    f.write_text("colour = 1\n")
    with pytest.raises(WrapperSystemError, match="unknown setting"):
        load_config_file(f)
    f.write_text("umask = 1.5\n")
    with pytest.raises(WrapperSystemError):
        merge_settings(load_config_file(f), {})


def test_epilogue_only_from_file() -> None:
    with pytest.raises(ClientError, match="configuration file"):
        merge_settings(None, {"epilogue": ["/bin/sh"]})


@pytest.mark.parametrize("umask", [0, 0o020, 0o070, 0o700])
def test_umask_that_lets_other_write_is_refused(umask: int) -> None:
    with pytest.raises(ClientError, match="umask"):
        WrapperSettings(umask=umask)


def test_account_and_gridmapfile_exclusive() -> None:
    with pytest.raises(ClientError):
        WrapperSettings(account="nobody", gridmapfile=Path("/x"))


def test_sudo_argv_is_a_list_without_shell() -> None:
    argv = sudo_argv(
        "/usr/bin/sudo", "/opt/pw/bin/payload-wrapper", "pool01", "run", "/w/job-1/.spec.json"
    )
    assert argv == [
        "/usr/bin/sudo",
        "-n",
        "-u",
        "pool01",
        "--",
        "/opt/pw/bin/payload-wrapper",
        "helper",
        "run",
        "/w/job-1/.spec.json",
    ]
    assert "sh" not in argv and "-c" not in argv


@pytest.mark.parametrize(
    ("rc", "code"),
    [
        (0, 0),
        (1, 1),
        (200, 200),
        (201, 204),
        (203, 204),
        (204, 204),
        (205, 205),
        (-9, 137),
        (-15, 143),
    ],
)
def test_payload_exit_code(rc: int, code: int) -> None:
    assert payload_exit_code(rc) == code
