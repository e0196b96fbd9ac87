"""Attacks on the payload wrapper: environment smuggling, planted links, reaching the pilot.

Run as root with the fixed account ``nobody`` (the approach of
tests/payload_wrapper/test_wrapper_run.py); the payload is a script that reports
what it could see and do.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from broker.fileio import write_private_file
from broker.pki.loading import credential_to_pem
from broker.pki.proxy import new_proxy
from tests.pkifixtures import GridPki
from tests.reliability import condor_attacks, containment_attacks
from tests.reliability.harness import Outcome

WRAPPER = str(Path(sys.executable).parent / "payload-wrapper")

PROBE = r"""#!/usr/bin/python3
import json, os, signal, sys
pilot_pid, pilot_proxy, pilot_key = int(sys.argv[1]), sys.argv[2], sys.argv[3]

def attempt(action):
    try:
        action()
        return "ok"
    except Exception as exc:
        return type(exc).__name__

report = {
    "env": sorted(k for k in os.environ if k.startswith(("LD_", "MALLOC_", "GCONV"))
                  or k in ("PYTHONPATH", "PYTHONSTARTUP")),
    "uid": os.getuid(),
    "read_pilot_proxy": attempt(lambda: open(pilot_proxy, "rb").read()),
    "read_pilot_key": attempt(lambda: open(pilot_key, "rb").read()),
    "signal_pilot_0": attempt(lambda: os.kill(pilot_pid, 0)),
    "signal_pilot_stop": attempt(lambda: os.kill(pilot_pid, signal.SIGSTOP)),
    "signal_pilot_term": attempt(lambda: os.kill(pilot_pid, signal.SIGTERM)),
    "ptrace_pilot_mem": attempt(lambda: open(f"/proc/{pilot_pid}/mem", "rb").read(1)),
    "pilot_environ": attempt(lambda: open(f"/proc/{pilot_pid}/environ", "rb").read()),
}
with open("probe.json", "w") as out:
    json.dump(report, out)
"""


def attacks(pki: GridPki, base: Path) -> Iterator[tuple[str, Callable[[Outcome], None]]]:
    def need_root(fn: Callable[[Outcome, Path], None]) -> Callable[[Outcome], None]:
        def body(outcome: Outcome) -> None:
            if os.geteuid() != 0:
                outcome.skipped = "the payload wrapper's identity switch needs root"
                return
            place = Path(tempfile.mkdtemp(prefix="rel-pw-", dir="/tmp"))
            place.chmod(0o755)
            try:
                fn(outcome, place)
            finally:
                shutil.rmtree(place, ignore_errors=True)

        return body

    def proxy(place: Path) -> Path:
        private = place / "pilot"
        private.mkdir(mode=0o700)
        cred = new_proxy(pki.load("alice"), now=datetime.now(UTC), lifetime=timedelta(hours=2))
        path = private / "proxy.pem"
        write_private_file(path, credential_to_pem(cred))
        return path

    def run(
        place: Path, prx: Path, args: list[str], env: dict[str, str]
    ) -> subprocess.CompletedProcess[str]:
        workdir = place / "work"
        workdir.mkdir(mode=0o755, exist_ok=True)
        return subprocess.run(
            [
                WRAPPER,
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
                *args,
            ],
            env={"PATH": "/usr/bin:/bin", **env},
            capture_output=True,
            text=True,
            timeout=60,
        )

    def smuggling(outcome: Outcome, place: Path) -> None:
        prx = proxy(place)
        script = place / "probe.py"
        script.write_text(PROBE)
        script.chmod(0o755)
        evil = {
            "LD_PRELOAD": "/tmp/evil.so",
            "LD_LIBRARY_PATH": "/tmp/evil",
            "LD_AUDIT": "/tmp/evil.so",
            "MALLOC_CHECK_": "3",
            "MALLOC_PERTURB_": "85",
            "MALLOC_ARENA_MAX": "1",
            "GCONV_PATH": "/tmp/evil",
            "PYTHONPATH": "/evil",
            "PYTHONSTARTUP": "/evil/x.py",
            "LD_DEBUG": "all",
        }
        cases: list[tuple[str, list[str], dict[str, str]]] = [
            ("inherited from the pilot", [], evil)
        ]
        for name in ("LD_PRELOAD", "MALLOC_CHECK_", "LD_LIBRARY_PATH"):
            cases.append((f"--keep-env {name}", ["--keep-env", name], evil))
            cases.append((f"--set-env {name}=...", ["--set-env", f"{name}=/tmp/evil.so"], {}))
        for n, (label, args, env) in enumerate(cases):
            job = f"sm{n}"
            done = run(
                place,
                prx,
                [
                    *args,
                    "--job-id",
                    job,
                    "--",
                    str(script),
                    str(os.getpid()),
                    str(prx),
                    str(pki.key_path("alice")),
                ],
                env,
            )
            outcome.tried += 1
            report = place / "work" / f"job-{job}" / "probe.json"
            if done.returncode != 0 and not report.exists():
                outcome.note(
                    f"refused {label}: exit {done.returncode} "
                    f"{done.stderr.strip().splitlines()[-1][:120] if done.stderr else ''}"
                )
                continue
            seen = json.loads(report.read_text())["env"] if report.exists() else []
            if seen:
                outcome.fail(f"ACCEPTED {label}: the payload saw {seen}")
            else:
                outcome.note(f"stripped {label}: payload ran (exit {done.returncode}) and saw none")

    def reach_pilot(outcome: Outcome, place: Path) -> None:
        prx = proxy(place)
        script = place / "probe.py"
        script.write_text(PROBE)
        script.chmod(0o755)
        done = run(
            place,
            prx,
            [
                "--job-id",
                "reach",
                "--",
                str(script),
                str(os.getpid()),
                str(prx),
                str(pki.key_path("alice")),
            ],
            {},
        )
        report_file = place / "work" / "job-reach" / "probe.json"
        if not report_file.exists():
            outcome.fail(f"the probe payload did not run: exit {done.returncode} {done.stderr}")
            return
        report = json.loads(report_file.read_text())
        for key in (
            "read_pilot_proxy",
            "read_pilot_key",
            "signal_pilot_0",
            "signal_pilot_stop",
            "signal_pilot_term",
            "ptrace_pilot_mem",
            "pilot_environ",
        ):
            outcome.tried += 1
            if report[key] == "ok":
                outcome.fail(f"ACCEPTED payload {key} (uid {report['uid']})")
            else:
                outcome.note(f"refused payload {key}: {report[key]}")

    def symlink(outcome: Outcome, place: Path) -> None:
        from payload_wrapper.errors import WrapperSystemError
        from payload_wrapper.sandbox import PROXY_NAME, install_proxy

        victim = place / "victim"
        victim.write_text("keep me")
        for replace in (False, True):
            d = place / f"proxy{int(replace)}"
            d.mkdir()
            (d / PROXY_NAME).symlink_to(victim)
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            outcome.tried += 1
            try:
                install_proxy(fd, b"PEM", uid=65534, gid=65534, replace=replace)
                outcome.fail(f"ACCEPTED a planted symlink at the proxy copy (replace={replace})")
            except WrapperSystemError as exc:
                outcome.note(f"refused planted symlink (replace={replace}): {exc}"[:160])
            finally:
                os.close(fd)
        # the pilot's --proxy itself given as a link to someone else's file
        prx = proxy(place)
        link = place / "pilot" / "link.pem"
        link.symlink_to(prx)
        done = run(place, link, ["--job-id", "lnk", "--", "/bin/true"], {})
        outcome.tried += 1
        if done.returncode == 0:
            outcome.note(
                "a --proxy given through a symlink was followed (the pilot's own "
                "file, owned by root 0600: allowed by design)"
            )
        else:
            outcome.note(f"a --proxy symlink was refused: exit {done.returncode}")
        if victim.read_text() != "keep me":
            outcome.fail("the symlink victim was overwritten")

    yield "payload: LD_PRELOAD / MALLOC_* smuggling", need_root(smuggling)
    yield "payload: read pilot key / signal pilot", need_root(reach_pilot)
    yield "payload: symlinked proxy target", need_root(symlink)
    # Containment cases (issues 18/19) live in their own module; all_attacks reaches them here.
    yield from containment_attacks.attacks(pki, base)
    yield from condor_attacks.attacks(base)
