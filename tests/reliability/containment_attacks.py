"""Payload containment attacks (issues 18 and 19): what a job controls must not reach past it.

Each case runs the real ``payload-wrapper`` as root with the fixed account ``nobody`` and a
private state directory, and checks the outcome from outside (``/proc``, the audit line, the
files an attacker would read):

* a payload whose processes hop pids (fork + exit in a loop, a new session each hop);
* two owners at once on one account (the second must be refused);
* a 3,000-level directory tree in the job directory (audit line and epilogue must follow);
* a ``/tmp/x509up_u<uid>`` link planted by another account (no proxy may go through it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from broker.fileio import write_private_file
from broker.pki.loading import credential_to_pem
from broker.pki.proxy import new_proxy
from tests.pkifixtures import GridPki
from tests.reliability.harness import Outcome

WRAPPER = str(Path(sys.executable).parent / "payload-wrapper")
NOBODY = 65534

HOPPER_C = r"""
#include <unistd.h>
int main(void) {
    for (;;) {
        pid_t pid = fork();
        if (pid > 0) _exit(0);
        if (pid == 0) setsid();
        if (pid < 0) usleep(1000);
    }
}
"""


def _processes_of(exe: Path) -> list[int]:
    """Live processes running ``exe`` (found through /proc/<pid>/exe)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{name}/exe") == str(exe):
                with open(f"/proc/{name}/stat", "rb") as handle:
                    raw = handle.read()
                if raw[raw.rfind(b")") + 2 :][:1] not in (b"Z", b"X"):
                    found.append(int(name))
        except OSError:
            continue
    return found


def attacks(pki: GridPki, base: Path) -> Iterator[tuple[str, Callable[[Outcome], None]]]:
    def need_root(fn: Callable[[Outcome, Path], None]) -> Callable[[Outcome], None]:
        def body(outcome: Outcome) -> None:
            if os.geteuid() != 0:
                outcome.skipped = "the payload wrapper's identity switch needs root"
                return
            place = Path(tempfile.mkdtemp(prefix="rel-pc-", dir="/tmp"))
            place.chmod(0o755)
            try:
                fn(outcome, place)
            finally:
                subprocess.run(["rm", "-rf", str(place)], check=False)  # any depth

        return body

    def proxy(place: Path, user: str) -> Path:
        private = place / "pilot"
        private.mkdir(mode=0o700, exist_ok=True)
        cred = new_proxy(pki.load(user), now=datetime.now(UTC), lifetime=timedelta(hours=2))
        path = private / f"{user}.pem"
        write_private_file(path, credential_to_pem(cred))
        return path

    def command(place: Path, prx: Path, job: str, *payload: str) -> list[str]:
        workdir = place / "work"
        workdir.mkdir(mode=0o755, exist_ok=True)
        config = place / "wrapper.toml"
        if not config.exists():
            (place / "state").mkdir(mode=0o700)
            mark = f"touch {place}/epilogue-$PAYLOAD_WRAPPER_JOB_ID"
            config.write_text(
                f'state_dir = "{place / "state"}"\nepilogue = ["/bin/sh", "-c", "{mark}"]\n'
            )
        return [
            WRAPPER,
            "--config",
            str(config),
            "--proxy",
            str(prx),
            "--ca-dir",
            str(pki.ca_dir),
            "--vomsdir",
            str(pki.vomsdir),
            "--workdir",
            str(workdir),
            "--audit-log",
            str(place / "audit.log"),
            "--account",
            "nobody",
            "--job-id",
            job,
            "--",
            *payload,
        ]

    def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            cmd, env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120
        )

    def audit(place: Path, job: str) -> dict[str, object]:
        for line in (place / "audit.log").read_text().splitlines():
            record = json.loads(line)
            if record["job_id"] == job:
                return record
        return {}

    def hopping(outcome: Outcome, place: Path) -> None:
        if shutil.which("gcc") is None:
            outcome.fail("gcc is missing: the pid-hopping payload cannot be built")
            return
        source = place / "hopper.c"
        source.write_text(HOPPER_C)
        hopper = place / "hopper"
        subprocess.run(
            ["gcc", "-O2", "-o", str(hopper), str(source)], check=True, capture_output=True
        )
        hopper.chmod(0o755)
        prx = proxy(place, "alice")
        for n in range(3):
            job = f"hop{n}"
            done = run(command(place, prx, job, "/bin/sh", "-c", f"{hopper} & sleep 0.3"))
            seen: set[int] = set()
            end = time.monotonic() + 0.5
            while time.monotonic() < end:
                seen.update(_processes_of(hopper))
                time.sleep(0.02)
            outcome.tried += 1
            record = audit(place, job)
            if seen:
                outcome.fail(f"ACCEPTED: pid-hopping processes survived the job: {sorted(seen)}")
                for pid in _processes_of(hopper):  # clean up what escaped, by pid
                    os.kill(pid, 9)
            elif done.returncode != 0:
                outcome.fail(f"the hopping job failed: exit {done.returncode} {done.stderr[-200:]}")
            else:
                outcome.note(
                    f"hopper killed ({record.get('containment')}, "
                    f"{record.get('leftovers')} leftovers)"
                )

    def two_owners(outcome: Outcome, place: Path) -> None:
        alice, bob = proxy(place, "alice"), proxy(place, "bob")
        gate = place / "gate"
        started = place / "work" / "job-own1" / "up"
        first = subprocess.Popen(
            command(
                place,
                alice,
                "own1",
                "/bin/sh",
                "-c",
                f"touch {started}; while [ ! -e {gate} ]; do sleep 0.05; done",
            ),
            env={"PATH": "/usr/bin:/bin"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 30
            while not started.exists() and first.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if not started.exists():
                outcome.fail("the first owner's job did not start")
                return
            second = run(
                command(
                    place,
                    bob,
                    "own2",
                    "/bin/sh",
                    "-c",
                    "cat /proc/[0-9]*/environ > /dev/null 2>&1; echo ran > ran",
                )
            )
            outcome.tried += 1
            if (place / "work" / "job-own2" / "ran").exists():
                outcome.fail("ACCEPTED: a second owner ran under the account of a running job")
            elif second.returncode == 202 and "another owner" in second.stderr:
                outcome.note("second owner refused: " + second.stderr.strip()[:160])
            else:
                outcome.fail(f"second owner: exit {second.returncode} {second.stderr[-160:]}")
        finally:
            gate.touch()
            first.wait(60)

    def deep_tree(outcome: Outcome, place: Path) -> None:
        prx = proxy(place, "alice")
        script = place / "deep.py"
        script.write_text(
            "#!/usr/bin/python3\nimport os\nfor _ in range(3000):\n"
            "    os.mkdir('d')\n    os.chdir('d')\n"
        )
        script.chmod(0o755)
        pilot_dir = place / "work"
        pilot_dir.mkdir(mode=0o755, exist_ok=True)
        os.chown(pilot_dir, 1, 1)  # a pilot other than root (daemon): outputs get an ACL
        done = run(command(place, prx, "deep", str(script)))
        outcome.tried += 1
        record = audit(place, "deep")
        if "Traceback" in done.stderr or not record:
            outcome.fail(
                f"deep tree: exit {done.returncode}, audit line {bool(record)}, "
                f"{done.stderr[-160:]}"
            )
        elif not (place / "epilogue-deep").exists():
            outcome.fail("deep tree: the epilogue did not run")
        else:
            outcome.note(
                f"deep tree: exit {done.returncode}, audit reason: "
                f"{str(record.get('reason'))[:100]}"
            )

    def planted(outcome: Outcome, place: Path) -> None:
        prx = proxy(place, "alice")
        catch = place / "caught"
        catch.write_text("")
        catch.chmod(0o666)
        os.chown(catch, 1, 1)
        path = Path(f"/tmp/x509up_u{NOBODY}")
        if path.exists() or path.is_symlink():
            outcome.note(f"{path} existed before the check; removed")
            path.unlink()
        path.symlink_to(catch)
        os.chown(path, 1, 1, follow_symlinks=False)  # planted by daemon
        try:
            done = run(
                command(place, prx, "plant", "/bin/sh", "-c", f'cat "$X509_USER_PROXY" > {path}')
            )
        finally:
            if path.exists() or path.is_symlink():
                path.unlink()
        outcome.tried += 1
        if catch.read_text():
            outcome.fail("ACCEPTED: the proxy went through a planted /tmp/x509up_u link")
        else:
            outcome.note(
                f"planted link: exit {done.returncode}, "
                f"{audit(place, 'plant').get('planted', 'no note')}"
            )

    yield "containment: pid-hopping payload", need_root(hopping)
    yield "containment: two owners, one account", need_root(two_owners)
    yield "containment: 3,000-level output tree", need_root(deep_tree)
    yield "containment: planted /tmp/x509up_u<uid>", need_root(planted)
