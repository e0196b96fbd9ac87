"""broker-pilot isolation pieces without a broker: the launcher, config trust, the error file.

The end-to-end hostile-job tests (driven as the starter) are in test_pilot.py;
these pin each defence on its own: the static launcher's refusals and exec,
main()'s refusal outside an isolated interpreter, trusted_config_path and the
wrapper error file's rules.
"""

from __future__ import annotations

import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from payload_wrapper.errors import WrapperSystemError
from payload_wrapper.launcher import build_launcher
from payload_wrapper.pilot import (
    _parse,
    report_failure,
    run,
    unsafe_variables,
    write_error_file,
)
from payload_wrapper.pilot_config import load_pilot_config, trusted_config_path
from tests.prerequisites import needs_root, require_tools

GOOD = (
    'broker_url = "https://broker.example.org:8443"\nproxy = "/p"\nallowed_owners = ["/DC=org/*"]\n'
)


@pytest.fixture(scope="module")
def place() -> Iterator[Path]:
    require_tools("gcc")
    path = Path(tempfile.mkdtemp(prefix="pilot-iso-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def launcher(place: Path) -> Path:
    return build_launcher(place / "broker-pilot")


@pytest.fixture(scope="module")
def recording_launcher(place: Path) -> tuple[Path, Path]:
    """A launcher whose "interpreter" records its argv and environment."""
    record = place / "record"
    fake = place / "fake-python"
    fake.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$0" "$@" > {record}.argv\n/usr/bin/env > {record}.env\n'
    )
    fake.chmod(0o755)
    return build_launcher(
        place / "recording", python=str(fake), config="/etc/broker/site.toml"
    ), record


# --------------------------------------------------------------------------- the launcher


def _has_interpreter(path: Path) -> bool:
    """True when the ELF file asks for a dynamic loader (a PT_INTERP program header)."""
    data = path.read_bytes()
    assert data[:5] == b"\x7fELF\x02", "not a 64-bit ELF file"
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return any(struct.unpack_from("<I", data, phoff + i * phentsize)[0] == 3 for i in range(phnum))


def test_launcher_is_static_and_runs_the_isolated_interpreter(
    recording_launcher: tuple[Path, Path],
) -> None:
    path, record = recording_launcher
    assert not _has_interpreter(path), "the launcher is dynamically linked"
    env = {
        "PATH": "/job/bin",
        "TMPDIR": "/scratch",
        "TMP": "/scratch",
        "SITE_X": "kept",
        "PYTHONPATH": "/job/lib",
        "_CONDOR_JOB_AD": "/scratch/.job.ad",
        "SSL_CERT_FILE": "/scratch/evil-ca.pem",
        "SSL_CERT_DIR": "/scratch",
        "TZ": ":/scratch/zone",
    }
    done = subprocess.run(
        [str(path), "--config", "/job/c.toml", "a b"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    argv = Path(f"{record}.argv").read_text().splitlines()
    assert argv == [
        str(path.parent / "fake-python"),
        "-I",
        "-m",
        "payload_wrapper.pilot",
        "--launcher-config=/etc/broker/site.toml",
        "--config",
        "/job/c.toml",
        "a b",
    ]
    seen = dict(
        line.split("=", 1) for line in Path(f"{record}.env").read_text().splitlines() if "=" in line
    )
    for dropped in ("TMPDIR", "TMP", "SSL_CERT_FILE", "SSL_CERT_DIR", "TZ"):
        assert dropped not in seen, dropped
    assert seen["SITE_X"] == "kept" and seen["PYTHONPATH"] == "/job/lib"  # -I ignores it


@pytest.mark.parametrize(
    "name",
    [
        "LD_PRELOAD",
        "LD_BIND_NOW",
        "GCONV_PATH",
        "GLIBC_TUNABLES",
        "MALLOC_PERTURB_",
        "OPENSSL_CONF",
        "OPENSSL_MODULES",
        "LOCPATH",
        "NLSPATH",
        "HOSTALIASES",
        "RES_OPTIONS",
        "TZDIR",
        "RESOLV_HOST_CONF",
        "GETCONF_DIR",
        "NIS_PATH",
        "LOCALDOMAIN",
    ],
)
def test_launcher_refuses_loader_variables_before_anything_runs(
    recording_launcher: tuple[Path, Path], place: Path, name: str
) -> None:
    path, record = recording_launcher
    for leftover in (Path(f"{record}.argv"), place / "err"):
        leftover.unlink(missing_ok=True)
    env = {"PATH": "/usr/bin:/bin", name: "x", "_CONDOR_WRAPPER_ERROR_FILE": str(place / "err")}
    done = subprocess.run(
        [str(path), "/bin/true"], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 202
    assert done.stderr.startswith(
        f"broker-pilot: the job was not started: the environment sets "
        f"{name}, which would make the loader"
    ), done.stderr
    assert (place / "err").read_text() == done.stderr
    assert not Path(f"{record}.argv").exists(), "the interpreter was started"


def test_launcher_prints_a_hostile_name_on_one_line(launcher: Path) -> None:
    done = subprocess.run(
        [str(launcher)], env={"LD_\nX$(id)": "1"}, capture_output=True, timeout=30, check=False
    )
    assert done.returncode == 202
    assert done.stderr.count(b"\n") == 1
    assert b"LD_?X??id?" in done.stderr


def test_launcher_reports_a_missing_interpreter(place: Path) -> None:
    gone = place / "gone-python"
    gone.write_text("#!/bin/sh\n")
    gone.chmod(0o755)
    path = build_launcher(place / "orphan", python=str(gone))
    gone.unlink()
    done = subprocess.run(
        [str(path)], env={}, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 202
    assert "cannot be started" in done.stderr


def test_build_refuses_an_interpreter_path_it_cannot_embed(place: Path) -> None:
    for bad in ("python3", '/tmp/x"; system("id"); "', "/tmp/a\nb"):
        with pytest.raises(WrapperSystemError, match="must be absolute"):
            build_launcher(place / "never", python=bad)
    assert not (place / "never").exists()


def test_the_real_launcher_runs_the_pilot(launcher: Path) -> None:
    done = subprocess.run(
        [str(launcher), "--help"],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "usage: broker-pilot" in done.stdout


# --------------------------------------------------------------------------- main()


def test_pilot_refuses_a_job_outside_an_isolated_interpreter(place: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "_CONDOR_JOB_AD": str(place / "none.ad"),
        "_CONDOR_WRAPPER_ERROR_FILE": str(place / "err-main"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "payload_wrapper.pilot", "/bin/true"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 202
    assert "only through its static launcher" in done.stderr
    assert "only through its static launcher" in (place / "err-main").read_text()
    # the admin's own commands still work from a plain interpreter
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "payload_wrapper.pilot",
            "--install-launcher",
            str(place / "installed"),
        ],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    assert os.stat(place / "installed").st_mode & 0o777 == 0o755


def test_in_process_run_refuses_loader_variables(tmp_path: Path) -> None:
    err = tmp_path / "err"
    code = run(["/bin/true"], {"LD_PRELOAD": "/x.so", "_CONDOR_WRAPPER_ERROR_FILE": str(err)})
    assert code == 202
    assert "the environment sets LD_PRELOAD" in err.read_text()
    assert unsafe_variables(
        {"ld_audit": "1", "OPENSSL_CONF": "c", "HOME": "h", "PYTHONPATH": "p"}
    ) == ["OPENSSL_CONF", "ld_audit"]


def test_under_the_starter_every_argument_is_the_jobs_command() -> None:
    argv = ["--config", "/scratch/evil.toml", "--job-ad", "/scratch/forged.ad", "x"]
    assert _parse(argv, starter=True).command == tuple(argv)
    assert _parse(argv, starter=True).config is None
    assert _parse(argv).config == "/scratch/evil.toml"  # by hand, options are read
    # the launcher's first argument is its own; a Cmd imitating it is the job's
    args = _parse(["--launcher-config=", "--launcher-config=/scratch/evil.toml", "x"], starter=True)
    assert args.launcher_config is None
    assert args.command == ("--launcher-config=/scratch/evil.toml", "x")
    assert (
        _parse(["--launcher-config=/etc/b.toml", "x"], starter=True).launcher_config
        == "/etc/b.toml"
    )


# --------------------------------------------------------------------------- config trust


def test_config_writable_by_others_or_in_an_open_directory_is_refused(tmp_path: Path) -> None:
    good = tmp_path / "pilot.toml"
    good.write_text(GOOD)
    good.chmod(0o644)
    assert trusted_config_path(good) == good.resolve()
    assert load_pilot_config(environ={"BROKER_PILOT_CONFIG": str(good)}).source == str(good)
    good.chmod(0o664)
    with pytest.raises(WrapperSystemError, match="can be written by its group or others") as err:
        load_pilot_config(environ={"BROKER_PILOT_CONFIG": str(good)})
    assert err.value.exit_code == 202
    good.chmod(0o644)
    tmp_path.chmod(0o777)  # not sticky: anyone could replace the file
    try:
        with pytest.raises(WrapperSystemError, match=f"its directory {tmp_path} can be written"):
            load_pilot_config(good)
    finally:
        tmp_path.chmod(0o700)
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)  # like /tmp: others cannot replace an entry they do not own
    (sticky / "ok.toml").write_text(GOOD)
    assert load_pilot_config(sticky / "ok.toml").broker_url.startswith("https://")
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    with pytest.raises(WrapperSystemError, match="not a regular file"):
        load_pilot_config(fifo)


@needs_root
def test_config_owned_by_someone_else_is_refused_even_through_a_link(tmp_path: Path) -> None:
    jobs = tmp_path / "job"
    jobs.mkdir()
    evil = jobs / "evil.toml"
    evil.write_text(GOOD.replace("/DC=org/*", "*"))
    os.chown(evil, 65534, 65534)
    with pytest.raises(WrapperSystemError, match="belongs to uid 65534"):
        load_pilot_config(environ={"BROKER_PILOT_CONFIG": str(evil)})
    # an admin-owned file inside a directory the job owns can be swapped: refused
    os.chown(evil, 0, 0)
    os.chown(jobs, 65534, 65534)
    with pytest.raises(WrapperSystemError, match=f"its directory {jobs} belongs to uid 65534"):
        load_pilot_config(evil)
    # a link the job made to the admin's file is judged by the file it reaches
    admin = tmp_path / "admin.toml"
    admin.write_text(GOOD)
    (jobs / "link.toml").symlink_to(admin)
    assert load_pilot_config(jobs / "link.toml").source == str(admin)
    # an unprivileged glidein pilot trusts its own files too, but not through the
    # variable: the starter transfers the job's input files as that same user
    os.chown(evil, 4242, 4242)
    os.chown(jobs, 4242, 4242)
    assert trusted_config_path(evil, euid=4242) == evil
    with pytest.raises(WrapperSystemError, match="root or uid 1"):
        trusted_config_path(evil, euid=1)
    with pytest.raises(WrapperSystemError, match=r"belongs to uid 4242.*\(owned by root,"):
        trusted_config_path(evil, euid=4242, root_only=True)


def test_default_config_gets_the_same_check(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("payload_wrapper.pilot_config.DEFAULT_CONFIG", str(tmp_path / "x.toml"))
    with pytest.raises(WrapperSystemError, match="does not exist"):
        load_pilot_config(environ={})
    (tmp_path / "x.toml").write_text(GOOD)
    (tmp_path / "x.toml").chmod(0o646)
    with pytest.raises(WrapperSystemError, match="group or others"):
        load_pilot_config(environ={})


# --------------------------------------------------------------------------- the error file


def test_error_file_is_created_or_appended_only_when_new_or_empty(tmp_path: Path) -> None:
    new = tmp_path / "new"
    assert write_error_file("one", str(new)) is None
    assert new.read_text() == "one\n"
    assert stat.S_IMODE(os.stat(new).st_mode) & 0o022 == 0
    empty = tmp_path / "empty"
    empty.touch()
    assert write_error_file("two", str(empty)) is None
    assert empty.read_text() == "two\n"
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    (tmp_path / "link").symlink_to(victim)
    os.link(victim, tmp_path / "hard")
    os.mkfifo(tmp_path / "fifo")
    for name in ("victim", "link", "hard", "fifo"):
        assert write_error_file("x", str(tmp_path / name)) is not None, name
    (tmp_path / "dangling").symlink_to(tmp_path / "created-through-link")
    assert write_error_file("x", str(tmp_path / "dangling")) is not None
    assert not (tmp_path / "created-through-link").exists()
    assert victim.read_text() == "keep\n"


def test_error_file_fifo_with_a_reader_is_not_written(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    assert write_error_file("x", str(fifo)) is not None
    with open(fifo, "wb"):
        pass  # release the reader
    reader.join(5)
    assert got == [b""]


def test_reported_failure_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = tmp_path / "err"
    report_failure("bad DN /CN=x\n* * * * * root id\r", str(err))
    assert err.read_text().count("\n") == 1
    assert "x?* * * * * root id?" in err.read_text()
    assert capsys.readouterr().err.count("\n") == 1
