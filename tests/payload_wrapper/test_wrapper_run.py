"""End to end, as root: the identity switch, the sandbox, the environment, cleanup.

These run as root in CI (never skipped there). Payloads are small scripts that
write what they see to report.json in their job directory.
"""

from __future__ import annotations

import json
import os
import pwd
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from payload_wrapper import api
from payload_wrapper.errors import ClientError, WrapperSystemError
from payload_wrapper.sandbox import PROXY_NAME, install_proxy

from .conftest import JobPlace, needs_root

pytestmark = [pytest.mark.root, needs_root]

WRAPPER = str(Path(sys.executable).parent / "payload-wrapper")

REPORT = r"""#!/usr/bin/python3
import json, os, stat, subprocess, sys
pilot_pid, pilot_proxy, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]

def attempt(action):
    try:
        action()
        return "ok"
    except Exception as exc:
        return type(exc).__name__

mask = os.umask(0)
os.umask(mask)
egg = os.environ["PYTHON_EGG_CACHE"]
st = os.lstat(egg)
report = {
    "resuid": os.getresuid(), "resgid": os.getresgid(), "groups": sorted(os.getgroups()),
    "umask": mask, "env": dict(os.environ), "cwd": os.getcwd(),
    "egg": [st.st_uid, stat.S_IMODE(st.st_mode), stat.S_ISDIR(st.st_mode)],
    "read_pilot_proxy": attempt(lambda: open(pilot_proxy).read()),
    "write_workdir": attempt(lambda: open(os.path.join(workdir, "intruder"), "w")),
    "signal_pilot": attempt(lambda: os.kill(pilot_pid, 0)),
    "read_own_proxy": attempt(lambda: open(os.environ["X509_USER_PROXY"]).read()),
    "write_tmpdir": attempt(lambda: open(os.path.join(os.environ["TMPDIR"], "t"), "w").write("x")),
    "write_home": attempt(lambda: open(os.path.join(os.environ["HOME"], "h"), "w").write("x")),
    "setuid_root": attempt(lambda: os.setuid(0)),
    "id": subprocess.run(["id"], capture_output=True, text=True).stdout,
}
with open("report.json", "w") as out:
    json.dump(report, out)
with open("id.txt", "w") as out:
    out.write(report["id"])
"""


def run_cli(
    place: JobPlace, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    base = {"PATH": "/usr/bin:/bin", "CI": os.environ.get("CI", "")}
    return subprocess.run(
        [
            WRAPPER,
            "--proxy",
            str(place.proxy),
            "--ca-dir",
            str(place.pki.ca_dir),
            "--vomsdir",
            str(place.pki.vomsdir),
            "--workdir",
            str(place.workdir),
            "--audit-log",
            str(place.audit),
            *args,
        ],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def report_cmd(place: JobPlace) -> list[str]:
    script = place.script("report.py", REPORT)
    return [str(script), str(os.getpid()), str(place.proxy), str(place.workdir)]


def audit_lines(place: JobPlace) -> list[dict[str, Any]]:
    return [json.loads(line) for line in place.audit.read_text().splitlines()]


def check_common(place: JobPlace, job_id: str, account: str, umask: int) -> dict[str, Any]:
    entry = pwd.getpwnam(account)
    job_dir = place.job_dir(job_id)
    report = json.loads((job_dir / "report.json").read_text())
    assert report["resuid"] == [entry.pw_uid] * 3
    assert report["resgid"] == [entry.pw_gid] * 3
    expected_groups = sorted(set(os.getgrouplist(account, entry.pw_gid)))
    assert sorted(set(report["groups"]) | {entry.pw_gid}) == expected_groups
    assert f"uid={entry.pw_uid}({account})" in (job_dir / "id.txt").read_text()
    assert report["umask"] == umask
    env = report["env"]
    assert not [k for k in env if k.startswith(("LD_", "MALLOC_"))]
    assert env["HOME"] == str(job_dir / "home") and env["USER"] == account
    assert env["TMPDIR"] == str(job_dir / "tmp")
    assert env["X509_USER_PROXY"] == str(job_dir / "proxy" / PROXY_NAME)
    assert env["X509_CERT_DIR"] == str(place.pki.ca_dir)
    egg = env["PYTHON_EGG_CACHE"]
    assert Path(egg).parent == Path("/tmp")
    assert report["egg"] == [entry.pw_uid, 0o700, True]
    assert report["read_pilot_proxy"] == "PermissionError"
    assert report["write_workdir"] == "PermissionError"
    assert report["signal_pilot"] == "PermissionError"
    assert report["setuid_root"] == "PermissionError"
    assert report["read_own_proxy"] == "ok"
    assert report["write_tmpdir"] == "ok" and report["write_home"] == "ok"
    assert not (place.workdir / "intruder").exists()
    # after the job: the proxy copy and the egg cache are gone
    assert not (job_dir / "proxy" / PROXY_NAME).exists()
    assert not Path(egg).exists()
    return report


def test_payload_runs_as_nobody(place: JobPlace) -> None:
    unwritable = place.base / "unwritable"
    unwritable.mkdir(mode=0o700)
    done = run_cli(
        place,
        "--account",
        "nobody",
        "--job-id",
        "n1",
        "--umask",
        "0027",
        "--keep-env",
        "LANG",
        "--set-env",
        "SITE=x y",
        "--",
        *report_cmd(place),
        env={
            "LD_PRELOAD": "/nonexistent.so",
            "MALLOC_CHECK_": "3",
            "TMPDIR": str(unwritable),
            "LANG": "C.UTF-8",
            "PYTHONPATH": "/evil",
        },
    )
    assert done.returncode == 0, done.stderr
    report = check_common(place, "n1", "nobody", 0o027)
    assert report["env"]["LANG"] == "C.UTF-8" and report["env"]["SITE"] == "x y"
    assert "PYTHONPATH" not in report["env"]
    [line] = audit_lines(place)
    assert line["job_id"] == "n1" and line["account"] == "nobody" and line["exit"] == 0
    assert line["dn"] == place.pki.dn("alice") and line["mode"] == "setuid"
    assert {"start", "end", "fqans"} <= set(line)


def test_payload_runs_as_pool_account(place: JobPlace, make_account: object) -> None:
    make = make_account
    account = make("bwpool01")  # type: ignore[operator]
    gridmapdir = place.base / "gridmapdir"
    gridmapdir.mkdir(mode=0o755)
    (gridmapdir / account).touch()
    gridmap = place.base / "grid-mapfile"
    gridmap.write_text(f'"{place.pki.dn("alice")}" .bwpool\n')
    config = place.base / "wrapper.toml"
    config.write_text(
        f'gridmapfile = "{gridmap}"\ngridmapdir = "{gridmapdir}"\n'
        'lease_expiry = 3600\numask = "0022"\n'
    )
    done = run_cli(place, "--config", str(config), "--job-id", "p1", "--", *report_cmd(place))
    assert done.returncode == 0, done.stderr
    check_common(place, "p1", account, 0o022)
    leases = [p for p in gridmapdir.iterdir() if p.name.startswith("%")]
    assert [p.name for p in leases] == ["%2FDC%3Dorg%2FDC%3Dexample%2FCN%3DAlice"]
    assert os.stat(gridmapdir / account).st_nlink == 2
    assert audit_lines(place)[0]["account"] == account


DOUBLE_FORK = r"""#!/usr/bin/python3
import os, sys, time
pidfile = sys.argv[1]
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        with open(pidfile, "w") as out:
            out.write(str(os.getpid()))
        time.sleep(300)
    os._exit(0)
while not os.path.exists(pidfile) or not open(pidfile).read():
    time.sleep(0.01)
"""


def test_double_forked_sleeper_is_killed(place: JobPlace) -> None:
    script = place.script("escape.py", DOUBLE_FORK)
    pidfile = place.base / "sleeper.pid"
    place.base.chmod(0o777)  # the payload writes the pid file here
    try:
        done = run_cli(
            place, "--account", "nobody", "--job-id", "df", "--", str(script), str(pidfile)
        )
    finally:
        place.base.chmod(0o755)
    assert done.returncode == 0, done.stderr
    pid = int(pidfile.read_text())
    assert not Path(f"/proc/{pid}").exists(), "the setsid sleeper survived the job"
    assert audit_lines(place)[0]["leftovers"] >= 1


def test_banned_dn_gets_203_with_a_reason(place: JobPlace) -> None:
    done = run_cli(place, "--account", "nobody", "--ban", place.pki.dn("alice"), "--", "/bin/true")
    assert done.returncode == 203
    assert "banned" in done.stderr and place.pki.dn("alice") in done.stderr
    assert "not started" in done.stderr
    assert not list(place.workdir.iterdir())
    [line] = audit_lines(place)
    assert line["exit"] == 203 and line["dn"] == place.pki.dn("alice")


def test_broken_proxy_gets_201(place: JobPlace) -> None:
    place.proxy.unlink()
    fd = os.open(place.proxy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    os.close(fd)
    done = run_cli(place, "--account", "nobody", "--", "/bin/true")
    assert done.returncode == 201, done.stderr
    assert "proxy" in done.stderr
    assert not list(place.workdir.iterdir())


def test_group_readable_proxy_gets_201(place: JobPlace) -> None:
    place.proxy.chmod(0o640)
    done = run_cli(place, "--account", "nobody", "--", "/bin/true")
    assert done.returncode == 201
    assert "chmod 600" in done.stderr


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--account", "nobody", "--umask", "0000"], 201),
        (["--account", "nobody", "--keep-env", "LD_PRELOAD"], 201),
        (["--account", "nobody", "--set-env", "PYTHONPATH=/x"], 201),
        (["--account", "nobody", "--job-id", "../etc"], 201),
        (["--account", "root"], 203),
        (["--account", "no-such-user-xyz"], 202),
        (["--account", "nobody", "--mode", "bogus"], 201),
    ],
)
def test_refusals(place: JobPlace, args: list[str], code: int) -> None:
    marker = place.base / "ran"
    done = run_cli(place, *args, "--", "/usr/bin/touch", str(marker))
    assert done.returncode == code, done.stderr
    assert not marker.exists()  # fail closed: the payload never ran
    assert done.stderr.strip()


def test_none_mode_runs_unswitched_and_says_so(place: JobPlace) -> None:
    done = run_cli(
        place,
        "--mode",
        "none",
        "--account",
        "nobody",
        "--job-id",
        "nm",
        "--",
        "/bin/sh",
        "-c",
        "id -u > uid.txt",
    )
    assert done.returncode == 0, done.stderr
    assert "MODE NONE" in done.stderr and "UNSWITCHED" in done.stderr
    assert (place.job_dir("nm") / "uid.txt").read_text().strip() == str(os.getuid())
    assert audit_lines(place)[0]["mode"] == "none"


@pytest.mark.parametrize(("status", "expected"), [(0, 0), (3, 3), (201, 204), (204, 204)])
def test_exit_codes(place: JobPlace, status: int, expected: int) -> None:
    done = run_cli(place, "--account", "nobody", "--", "/bin/sh", "-c", f"exit {status}")
    assert done.returncode == expected


def test_missing_command_gets_127(place: JobPlace) -> None:
    done = run_cli(place, "--account", "nobody", "--", "/no/such/payload")
    assert done.returncode == 127
    assert "cannot execute /no/such/payload: No such file or directory" in done.stderr


def test_payload_timeout(place: JobPlace) -> None:
    start = time.monotonic()
    done = run_cli(place, "--account", "nobody", "--payload-timeout", "1", "--", "/bin/sleep", "60")
    assert done.returncode == 124
    assert "time limit" in done.stderr
    assert time.monotonic() - start < 20


def test_outputs_readable_by_pilot_through_acl(place: JobPlace, make_account: object) -> None:
    pilot = make_account("bwpilot01")  # type: ignore[operator]
    entry = pwd.getpwnam(pilot)
    os.chown(place.workdir, entry.pw_uid, entry.pw_gid)
    os.chmod(place.workdir, 0o711)
    done = run_cli(
        place,
        "--account",
        "nobody",
        "--job-id",
        "acl",
        "--umask",
        "0077",
        "--",
        "/bin/sh",
        "-c",
        "mkdir out && echo result > out/data && chmod 600 out/data",
    )
    assert done.returncode == 0, done.stderr
    job_dir = place.job_dir("acl")
    data = job_dir / "out" / "data"
    assert stat.S_IMODE(os.stat(job_dir).st_mode) & 0o007 == 0  # never world-accessible
    acl = subprocess.run(["getfacl", "-p", str(data)], capture_output=True, text=True).stdout
    assert f"user:{pilot}:r--" in acl
    assert "group::---" in acl and "other::---" in acl
    read = subprocess.run(
        [
            "setpriv",
            f"--reuid={pilot}",
            f"--regid={entry.pw_gid}",
            "--clear-groups",
            "cat",
            str(data),
        ],
        capture_output=True,
        text=True,
    )
    assert read.stdout == "result\n", read.stderr
    write = subprocess.run(
        [
            "setpriv",
            f"--reuid={pilot}",
            f"--regid={entry.pw_gid}",
            "--clear-groups",
            "sh",
            "-c",
            f"echo x >> {data}",
        ],
        capture_output=True,
        text=True,
    )
    assert write.returncode != 0


def test_symlink_planted_at_proxy_copy_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "proxy"
    d.mkdir()
    target = tmp_path / "victim"
    target.write_text("keep me")
    (d / PROXY_NAME).symlink_to(target)
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(WrapperSystemError, match=r"symbolic link|exists"):
            install_proxy(fd, b"PEM", uid=65534, gid=65534, replace=False)
        with pytest.raises(WrapperSystemError, match="symbolic link"):
            install_proxy(fd, b"PEM", uid=65534, gid=65534, replace=True)
    finally:
        os.close(fd)
    assert target.read_text() == "keep me"
    assert (d / PROXY_NAME).is_symlink()


def test_refresh_proxy_replaces_the_copy_and_refuses_links(place: JobPlace) -> None:
    settings = place.settings()
    job = api.prepare(settings, place.proxy, ["/bin/true"], job_id="rf")
    copy = job.proxy_path
    before = copy.read_bytes()
    fresh = place.pki.proxy("alice", place.base / "fresh.pem")
    api.refresh_proxy(job, fresh.read_bytes())
    st = os.lstat(copy)
    assert copy.read_bytes() == fresh.read_bytes() != before
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (65534, 0o600)
    other = place.pki.proxy("bob", place.base / "bob.pem")
    with pytest.raises(ClientError, match="belongs to"):
        api.refresh_proxy(job, other.read_bytes())
    copy.unlink()
    copy.symlink_to(place.base / "victim")
    with pytest.raises(WrapperSystemError, match="symbolic link"):
        api.refresh_proxy(job, fresh.read_bytes())
    assert not (place.base / "victim").exists()
    copy.unlink()
    assert api.execute(job) == 0


def test_epilogue_runs_and_is_timed_out(place: JobPlace) -> None:
    marker = place.base / "epilogue.out"
    epi = place.script("epilogue.sh", f'#!/bin/sh\necho "$PAYLOAD_WRAPPER_ACCOUNT" > {marker}\n')
    assert api.run_payload(place.settings(epilogue=(str(epi),)), place.proxy, ["/bin/true"]) == 0
    assert marker.read_text() == "nobody\n"
    slow = place.script("slow.sh", "#!/bin/sh\nsleep 30\n")
    start = time.monotonic()
    assert (
        api.run_payload(
            place.settings(epilogue=(str(slow),), epilogue_timeout=0.5), place.proxy, ["/bin/true"]
        )
        == 0
    )
    assert time.monotonic() - start < 10
    assert "killed" in audit_lines(place)[-1]["reason"]


def test_sigterm_is_forwarded(place: JobPlace) -> None:
    proc = subprocess.Popen(
        [
            WRAPPER,
            "--proxy",
            str(place.proxy),
            "--ca-dir",
            str(place.pki.ca_dir),
            "--workdir",
            str(place.workdir),
            "--account",
            "nobody",
            "--job-id",
            "sig",
            "--",
            "/bin/sh",
            "-c",
            "trap 'echo got > term.txt; exit 7' TERM; touch started; while :; do sleep 0.1; done",
        ],
        env={"PATH": "/usr/bin:/bin"},
        stderr=subprocess.PIPE,
        text=True,
    )
    started = place.job_dir("sig") / "started"
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.terminate()
    assert proc.wait(30) == 7
    assert (place.job_dir("sig") / "term.txt").read_text() == "got\n"


def _voms_proxy(place: JobPlace, fqan: str) -> Path:
    from datetime import UTC, datetime, timedelta

    from broker.fileio import write_private_file
    from broker.pki.loading import credential_to_pem, load_cert_and_key
    from broker.pki.proxy import new_proxy
    from broker.pki.voms import make_ac_extension

    root = place.pki.root
    alice = load_cert_and_key((root / "alice.pem").read_bytes(), (root / "alice.key").read_bytes())
    voms = load_cert_and_key((root / "voms.pem").read_bytes(), (root / "voms.key").read_bytes())
    now = datetime.now(UTC)
    ac = make_ac_extension(
        alice.cert,
        voms,
        vo="atlas",
        fqans=[fqan],
        uri="voms.example.org:15001",
        now=now,
        lifetime=timedelta(hours=2),
    )
    proxy = new_proxy(alice, now=now, lifetime=timedelta(hours=2), extra_extensions=[ac])
    path = place.proxy.parent / "voms-proxy.pem"
    write_private_file(path, credential_to_pem(proxy))
    return path


@pytest.mark.parametrize("entry", ["fqan:/atlas", "fqan:/atlas/Role=banned", "/atlas"])
def test_ban_by_fqan_denies_the_payload(place: JobPlace, entry: str) -> None:
    # Before the fix "--ban fqan:/atlas" was accepted and compared as a DN: nobody was banned.
    place.proxy = _voms_proxy(place, "/atlas/Role=banned")
    done = run_cli(place, "--account", "nobody", "--ban", entry, "--", "/bin/true")
    assert done.returncode == 203, done.stderr
    assert "banned" in done.stderr and "not started" in done.stderr
    assert not list(place.workdir.iterdir())
    # another VO's ban does not touch it
    done = run_cli(place, "--account", "nobody", "--ban", "fqan:/cms", "--", "/bin/true")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("entry", ["fqan:atlas", "CN=Mallory", "dn:/DC=org/CN=x", "fqan:/DC=org"])
def test_ban_entry_that_could_never_match_is_refused(place: JobPlace, entry: str) -> None:
    done = run_cli(place, "--account", "nobody", "--ban", entry, "--", "/bin/true")
    assert done.returncode == 202, done.stderr
    assert f"the ban entry {entry!r}" in done.stderr
    assert "Traceback" not in done.stderr
    assert not list(place.workdir.iterdir())
