"""Payload containment, as root: pid-hopping payloads, one owner per uid, deep output trees,
the sudo helper's verdict and a planted /tmp/x509up_u<uid>.

Each test here failed on the wrapper before containment (issues 18 and 19) and passes now.
Throwaway accounts (useradd/userdel) keep "nothing of the uid survives" meaningful.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from payload_wrapper import api
from payload_wrapper.containment import (
    JobCgroup,
    cgroup_parent,
    kill_uid,
    reap_stale_cgroups,
    uid_processes,
)
from payload_wrapper.errors import WrapperSystemError
from payload_wrapper.sandbox import default_proxy_path, grant_read
from tests.prerequisites import require_tools

from .conftest import JobPlace, needs_root, public_tempdir

pytestmark = [pytest.mark.root, needs_root]

WRAPPER = str(Path(sys.executable).parent / "payload-wrapper")

# Forks, and the parent exits at once: one process alive at a time, a new pid every hop,
# each in a new session (so neither the process group nor the session finds it).
HOPPER_C = r"""
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
    useconds_t pause = argc > 1 ? (useconds_t)atoi(argv[1]) : 0;
    for (;;) {
        if (pause) usleep(pause);
        pid_t pid = fork();
        if (pid > 0) _exit(0);
        if (pid == 0) setsid();
        if (pid < 0) usleep(1000);
    }
}
"""


@pytest.fixture(scope="module")
def hopper() -> Iterator[Path]:
    require_tools("gcc")
    top = public_tempdir("pw-hop-")
    source = top / "hopper.c"
    source.write_text(HOPPER_C)
    binary = top / "hopper"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(source)], check=True, capture_output=True)
    binary.chmod(0o755)
    yield binary
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def state_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pw-state-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def audit_lines(place: JobPlace) -> list[dict[str, object]]:
    return [json.loads(line) for line in place.audit.read_text().splitlines()]


def survivors(uid: int, watch: float = 0.5) -> list[int]:
    """Processes of ``uid`` seen at any moment during ``watch`` seconds."""
    seen: set[int] = set()
    end = time.monotonic() + watch
    while time.monotonic() < end:
        seen.update(uid_processes(uid))
        time.sleep(0.02)
    return sorted(seen)


def hop_script(place: JobPlace, hopper: Path, pause_us: int) -> list[str]:
    script = place.script("hop.sh", f"#!/bin/sh\n{hopper} {pause_us} &\nsleep 0.3\nexit 0\n")
    return [str(script)]


@pytest.mark.parametrize("pause_us", [0, 100, 1000])
def test_pid_hopping_payload_is_killed_by_the_cgroup(
    place: JobPlace,
    make_account: Callable[[str], str],
    hopper: Path,
    state_dir: Path,
    pause_us: int,
) -> None:
    account = make_account("pwhop01")
    uid = pwd.getpwnam(account).pw_uid
    settings = place.settings(account=account, state_dir=state_dir)
    try:
        code = api.run_payload(
            settings, place.proxy, hop_script(place, hopper, pause_us), job_id=f"hop{pause_us}"
        )
        left = survivors(uid)
    finally:
        kill_uid(uid, pwd.getpwnam(account).pw_gid)  # never leave a hopper behind
    assert code == 0
    assert left == [], f"processes of the job survived: {left}"
    line = audit_lines(place)[-1]
    assert line["containment"] == "cgroup"
    assert isinstance(line["leftovers"], int) and line["leftovers"] >= 1
    assert not Path(str(line["cgroup"])).exists(), "the job's cgroup was left behind"


def test_pid_hopping_payload_is_killed_by_uid_on_a_dedicated_account(
    place: JobPlace,
    make_account: Callable[[str], str],
    hopper: Path,
    state_dir: Path,
) -> None:
    account = make_account("pwhop02")
    entry = pwd.getpwnam(account)
    settings = place.settings(
        account=account, state_dir=state_dir, containment="uid", kill_all_target_processes=True
    )
    try:
        code = api.run_payload(settings, place.proxy, hop_script(place, hopper, 0), job_id="hopuid")
        left = survivors(entry.pw_uid)
    finally:
        kill_uid(entry.pw_uid, entry.pw_gid)
    assert code == 0
    assert left == [], f"processes of the job survived: {left}"
    assert audit_lines(place)[-1]["containment"] == "uid"


def test_uid_containment_is_refused_for_a_shared_account(
    place: JobPlace,
    make_account: Callable[[str], str],
    state_dir: Path,
) -> None:
    account = make_account("pwshared1")
    settings = place.settings(account=account, state_dir=state_dir, containment="uid")
    code = api.run_payload(settings, place.proxy, ["/bin/true"], job_id="refuse")
    assert code == 202
    line = audit_lines(place)[-1]
    assert "only safe for an account that belongs to the job" in str(line["reason"])


def test_two_owners_never_share_an_account(
    place: JobPlace,
    make_account: Callable[[str], str],
    state_dir: Path,
) -> None:
    account = make_account("pwshared2")
    config = place.base / "wrapper.toml"
    config.write_text(f'state_dir = "{state_dir}"\n')
    gate = place.base / "gate"
    first = subprocess.Popen(
        [
            WRAPPER,
            "--config",
            str(config),
            "--proxy",
            str(place.proxy),
            "--ca-dir",
            str(place.pki.ca_dir),
            "--vomsdir",
            str(place.pki.vomsdir),
            "--workdir",
            str(place.workdir),
            "--account",
            account,
            "--job-id",
            "alice1",
            "--",
            "/bin/sh",
            "-c",
            f"touch {place.workdir}/job-alice1/started; while [ ! -e {gate} ]; do sleep 0.05; done",
        ],
        env={"PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (place.job_dir("alice1") / "started").exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first job did not start"
            time.sleep(0.05)
        bob = place.pki.proxy("bob", place.base / "pilot" / "bob.pem")
        settings = place.settings(account=account, state_dir=state_dir)
        with pytest.raises(WrapperSystemError, match="in use by a job of another owner") as info:
            api.prepare(settings, bob, ["/bin/true"], job_id="bob1")
        assert info.value.reason == "account_in_use"
        assert "pool accounts" in info.value.message
        assert not place.job_dir("bob1").exists()
        # The same owner may share the account.
        assert api.run_payload(settings, place.proxy, ["/bin/true"], job_id="alice2") == 0
    finally:
        gate.touch()
        _, err = first.communicate(timeout=30)
    assert first.returncode == 0, err
    # Once the first owner is gone, another owner may use the account.
    assert api.run_payload(settings, bob, ["/bin/true"], job_id="bob2") == 0


DEEP_TREE = r"""#!/usr/bin/python3
import os
for _ in range(3000):
    os.mkdir("d")
    os.chdir("d")
with open("leaf", "w") as out:
    out.write("deep")
"""


def test_deep_output_tree_still_gets_epilogue_and_audit(
    place: JobPlace,
    make_account: Callable[[str], str],
    state_dir: Path,
) -> None:
    pilot = make_account("pwpilot05")
    epilogue_mark = place.base / "epilogue-ran"
    epilogue = place.script("epilogue.sh", f"#!/bin/sh\ntouch {epilogue_mark}\n")
    settings = place.settings(state_dir=state_dir, pilot_account=pilot, epilogue=(str(epilogue),))
    script = place.script("deep.py", DEEP_TREE)
    try:
        code = api.run_payload(settings, place.proxy, [str(script)], job_id="deep")
    except BaseException:
        subprocess.run(["rm", "-rf", str(place.job_dir("deep"))], check=True)
        raise
    assert code == 0
    assert epilogue_mark.exists(), "the epilogue did not run"
    line = audit_lines(place)[-1]
    assert line["exit"] == 0
    assert "deeper than" in str(line["reason"])
    # The top of the tree was still made readable for the pilot.
    acl = subprocess.run(
        ["getfacl", "-p", str(place.job_dir("deep") / "d")], capture_output=True, text=True
    ).stdout
    assert f"user:{pilot}:r-x" in acl
    # shutil.rmtree recurses too: GNU rm removes any depth.
    subprocess.run(["rm", "-rf", str(place.job_dir("deep"))], check=True)


def test_grant_read_walk_is_bounded_by_entries(place: JobPlace) -> None:
    top = place.base / "many"
    top.mkdir()
    for n in range(50):
        (top / f"f{n}").write_text("x")
    result = grant_read(top, pilot_uid=65534, owner_uid=0, max_entries=10)
    assert result.visited == 10 and result.limited == "more than 10 entries"


def sudo_shim(place: JobPlace) -> Path:
    """Stands in for sudo: the same argv (-n -u ACCOUNT -- ...), switched with runuser."""
    require_tools("runuser")
    runuser = shutil.which("runuser")
    return place.script(
        "sudo",
        '#!/bin/sh\n[ "$1" = -n ] && [ "$2" = -u ] && [ "$4" = -- ] || exit 1\n'
        f'account=$3\nshift 4\nexec {runuser} -u "$account" -- "$@"\n',
    )


def helper_script(place: JobPlace) -> Path:
    """The sudo helper's own code, started with an interpreter the target account can run.

    (The test venv's interpreter may sit below a directory only root can enter; the
    helper needs nothing but the standard library and this checkout.)
    """
    import site

    paths = [str(Path(__file__).resolve().parents[2]), *site.getsitepackages()]
    return place.script(
        "helper",
        f"#!/usr/bin/python3\nimport sys\nsys.path[:0] = {paths!r}\n"
        "from payload_wrapper.switch import helper_main\n"
        "sys.exit(helper_main(sys.argv[2:]))\n",
    )


def test_sudo_payload_cannot_fake_a_helper_failure(
    place: JobPlace,
    make_account: Callable[[str], str],
    state_dir: Path,
) -> None:
    account = make_account("pwsudo01")
    settings = place.settings(
        mode="sudo",
        account=account,
        state_dir=state_dir,
        sudo=str(sudo_shim(place)),
        sudo_helper=str(helper_script(place)),
        kill_all_target_processes=True,
    )
    code = api.run_payload(
        settings,
        place.proxy,
        ["/bin/sh", "-c", "echo '{}' > .spec.json; echo ran > ran.txt; exit 0"],
        job_id="sp",
    )
    assert (place.job_dir("sp") / "ran.txt").read_text() == "ran\n"
    assert code == 0, audit_lines(place)[-1]
    assert audit_lines(place)[-1]["containment"] == "uid"
    assert not list(place.workdir.glob(".spec-*")) and not list(place.workdir.glob(".started-*"))


def test_sudo_failure_before_the_payload_is_still_202(
    place: JobPlace,
    make_account: Callable[[str], str],
    state_dir: Path,
) -> None:
    account = make_account("pwsudo02")
    failing = place.script("sudo", "#!/bin/sh\necho 'sudo: a password is required' >&2\nexit 1\n")
    settings = place.settings(
        mode="sudo", account=account, state_dir=state_dir, sudo=str(failing), containment="session"
    )
    assert api.run_payload(settings, place.proxy, ["/bin/true"], job_id="sf") == 202
    assert "failed before the payload started" in str(audit_lines(place)[-1]["reason"])


@pytest.mark.parametrize("planted", ["symlink", "file"])
def test_planted_default_proxy_path_never_receives_a_proxy(
    place: JobPlace,
    make_account: Callable[[str], str],
    state_dir: Path,
    planted: str,
) -> None:
    target = pwd.getpwnam(make_account("pwtarget1"))
    attacker = pwd.getpwnam(make_account("pwattack1"))
    catch = Path(tempfile.mkdtemp(prefix="pw-catch-")) / "caught"
    catch.parent.chmod(0o755)
    catch.write_text("")
    os.chown(catch, attacker.pw_uid, attacker.pw_gid)
    catch.chmod(0o666)
    path = default_proxy_path(target.pw_uid)
    if path.exists() or path.is_symlink():
        path.unlink()
    if planted == "symlink":
        path.symlink_to(catch)
    else:  # the attacker's own file, hard-linked so the attacker still reads it afterwards
        os.link(catch, path)
    os.chown(path, attacker.pw_uid, attacker.pw_gid, follow_symlinks=False)
    try:
        # A grid tool of the payload storing its proxy at the default location.
        settings = place.settings(account=target.pw_name, state_dir=state_dir)
        code = api.run_payload(
            settings,
            place.proxy,
            ["/bin/sh", "-c", 'cat "$X509_USER_PROXY" > /tmp/x509up_u$(id -u)'],
            job_id=f"pl{planted}",
        )
        caught = catch.read_text()
        still_planted = path.is_symlink() or (path.exists() and path.stat().st_uid != target.pw_uid)
        leftover = path.exists() and path.stat().st_size > 0
    finally:
        if path.exists() or path.is_symlink():
            path.unlink()
        shutil.rmtree(catch.parent, ignore_errors=True)
    assert code == 0
    assert "PRIVATE KEY" not in caught and caught == "", "the proxy went to the attacker's file"
    assert not still_planted and not leftover
    assert "planted by uid" in str(audit_lines(place)[-1]["planted"])


def test_cgroup_of_a_killed_wrapper_is_reaped_by_the_next() -> None:
    parent = cgroup_parent(None)
    gone = subprocess.Popen(["/bin/true"])
    gone.wait()  # a pid that no longer exists: the "wrapper" that was SIGKILLed
    stale = parent / f"payload-wrapper-{gone.pid}-test"
    stale.mkdir()
    orphan = subprocess.Popen(["/bin/sleep", "300"])
    try:
        (stale / "cgroup.procs").write_text(str(orphan.pid))
        job = JobCgroup.create(parent)
        job.remove()
        assert orphan.wait(10) == -9
        assert not stale.exists()
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
        if stale.exists():
            stale.rmdir()


def test_live_wrappers_cgroup_is_left_alone() -> None:
    parent = cgroup_parent(None)
    live = parent / f"payload-wrapper-{os.getpid()}-test"
    live.mkdir()
    try:
        assert live not in reap_stale_cgroups(parent)
        assert live.exists()
    finally:
        live.rmdir()
