"""Attacks on broker-pilot from the job it is about to run (issue 19).

The starter builds the wrapper's environment from STARTER_JOB_ENVIRONMENT and
lets the job's Environment override it, and starts the wrapper in the job's
scratch directory. Each case plays that with ``env -i`` + the job's variables,
the cwd a directory of job files, against the static launcher built from
payload_wrapper/launcher (what USER_JOB_WRAPPER names). No broker is needed:
every attack must be stopped, or be harmless, before the pilot would ask one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.reliability.harness import Outcome

EVIL_C = """#include <stdio.h>
__attribute__((constructor)) static void evil(void) {
    FILE *f = fopen("%s", "w");
    if (f) { fputs("constructor ran", f); fclose(f); }
}
"""

SITECUSTOMIZE = """import os
with open(%r, "w") as out:
    out.write(f"job code ran in the pilot as uid {os.getuid()}")
"""


def attacks(base: Path) -> Iterator[tuple[str, Callable[[Outcome], None]]]:
    state: dict[str, Path] = {}

    def launcher() -> Path:
        if "launcher" not in state:
            from payload_wrapper.launcher import build_launcher

            place = Path(tempfile.mkdtemp(prefix="rel-pilot-", dir=base))
            place.chmod(0o755)
            state["place"] = place
            state["launcher"] = build_launcher(place / "broker-pilot")
        return state["launcher"]

    def case(fn: Callable[[Outcome, Path, Path], None]) -> Callable[[Outcome], None]:
        def body(outcome: Outcome) -> None:
            if shutil.which("gcc") is None:
                outcome.skipped = "gcc is needed to build the pilot's static launcher"
                return
            exe = launcher()
            job = Path(tempfile.mkdtemp(prefix="job-", dir=state["place"]))
            job.chmod(0o755)
            try:
                fn(outcome, exe, job)
            finally:
                shutil.rmtree(job, ignore_errors=True)

        return body

    def starter(
        exe: Path, job: Path, job_env: dict[str, str], *command: str
    ) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": "/usr/bin:/bin",
            "_CONDOR_JOB_AD": str(job / ".job.ad"),
            "_CONDOR_SCRATCH_DIR": str(job),
            "_CONDOR_WRAPPER_ERROR_FILE": str(job / ".wrapper_error"),
            "TMPDIR": str(job),
            "BROKER_PILOT_CONFIG": str(state["place"] / "absent.toml"),
            **job_env,
        }
        return subprocess.run(
            [
                "env",
                "-i",
                *(f"{k}={v}" for k, v in env.items()),
                str(exe),
                *(command or ("/bin/true",)),
            ],
            cwd=job,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def loader(outcome: Outcome, exe: Path, job: Path) -> None:
        evidence = job / "constructor-ran"
        (job / "evil.c").write_text(EVIL_C % evidence)
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-o", str(job / "evil.so"), str(job / "evil.c")],
            check=True,
            timeout=60,
        )
        library = str(job / "evil.so")
        for name, value in (
            ("LD_PRELOAD", library),
            ("LD_AUDIT", library),
            ("LD_LIBRARY_PATH", str(job)),
            ("GCONV_PATH", str(job)),
            ("GLIBC_TUNABLES", "glibc.malloc.check=3"),
            ("OPENSSL_CONF", str(job / "evil.cnf")),
            ("MALLOC_PERTURB_", "85"),
        ):
            outcome.tried += 1
            done = starter(exe, job, {name: value})
            if evidence.exists():
                outcome.fail(f"ACCEPTED {name}: the job's constructor ran in the pilot")
                evidence.unlink()
            elif done.returncode != 202 or f"sets {name}" not in done.stderr:
                outcome.fail(
                    f"{name}: exit {done.returncode}, not the launcher's refusal: "
                    f"{done.stderr.strip()[:160]}"
                )
            else:
                outcome.note(f"refused {name} before anything ran (202)")

    def python(outcome: Outcome, exe: Path, job: Path) -> None:
        evidence = job / "python-ran"
        code = SITECUSTOMIZE % str(evidence)
        for name in ("sitecustomize.py", "usercustomize.py", "tomllib.py", "secrets.py"):
            (job / name).write_text(code)
        (job / "payload_wrapper").mkdir()
        (job / "payload_wrapper" / "__init__.py").write_text(code)
        for label, job_env in (
            ("PYTHONPATH", {"PYTHONPATH": str(job)}),
            (
                "PYTHONSTARTUP+PYTHONINSPECT",
                {"PYTHONSTARTUP": str(job / "tomllib.py"), "PYTHONINSPECT": "1"},
            ),
            ("PYTHONHOME", {"PYTHONHOME": str(job)}),
            ("PYTHONUSERBASE", {"PYTHONUSERBASE": str(job), "HOME": str(job)}),
            ("modules in the working directory", {}),
        ):
            outcome.tried += 1
            done = starter(exe, job, job_env)
            if evidence.exists():
                outcome.fail(f"ACCEPTED {label}: {evidence.read_text()}")
                evidence.unlink()
            elif "pilot configuration" not in done.stderr:
                outcome.fail(
                    f"{label}: the pilot did not get as far as its configuration: "
                    f"exit {done.returncode} {done.stderr.strip()[:160]}"
                )
            else:
                outcome.note(f"ignored {label}: the isolated pilot ran none of the job's code")

    def config(outcome: Outcome, exe: Path, job: Path) -> None:
        evil = job / "evil.toml"
        evil.write_text(
            'broker_url = "https://127.0.0.1:1"\nproxy = "/p"\n'
            'allowed_owners = ["*"]\n[wrapper]\nmode = "none"\n'
        )
        evil.chmod(0o666)
        if os.geteuid() == 0:
            os.chown(evil, 65534, 65534)
        (job / "link.toml").symlink_to(evil)
        for label, path in (("BROKER_PILOT_CONFIG", evil), ("a link to it", job / "link.toml")):
            outcome.tried += 1
            done = starter(exe, job, {"BROKER_PILOT_CONFIG": str(path)})
            if done.returncode == 202 and "is not trusted" in done.stderr:
                outcome.note(f"refused a job-written config via {label} (202)")
            else:
                outcome.fail(
                    f"ACCEPTED a job-written config via {label}: exit "
                    f"{done.returncode} {done.stderr.strip()[:160]}"
                )
        outcome.tried += 1
        done = starter(exe, job, {}, "--config", str(evil), "/bin/true")
        if "is not trusted" in done.stderr or "pilot configuration" not in done.stderr:
            outcome.fail(f"the job's Cmd was read as --config: {done.stderr.strip()[:160]}")
        else:
            outcome.note("the job's Cmd '--config FILE' was taken as its command, not an option")

    def error_file(outcome: Outcome, exe: Path, job: Path) -> None:
        victim = job / "victim"
        victim.write_text("root's file\n")
        (job / "link").symlink_to(victim)
        os.link(victim, job / "hard")
        os.mkfifo(job / "fifo")
        for name in ("link", "hard", "fifo", "victim"):
            for trigger, why in (({"LD_PRELOAD": "x"}, "launcher"), ({}, "pilot")):
                outcome.tried += 1
                try:
                    done = starter(
                        exe, job, {**trigger, "_CONDOR_WRAPPER_ERROR_FILE": str(job / name)}
                    )
                except subprocess.TimeoutExpired:
                    outcome.fail(f"the {why} blocked on a wrapper error file that is a {name}")
                    continue
                if victim.read_text() != "root's file\n":
                    outcome.fail(f"the {why} wrote through a wrapper error file that is a {name}")
                    victim.write_text("root's file\n")
                elif "not writing to the wrapper error file" not in done.stderr:
                    outcome.fail(f"the {why} gave no reason for skipping the {name}")
                else:
                    outcome.note(f"the {why} did not write through a {name}")

    def finish(outcome: Outcome) -> None:
        if "place" in state:
            shutil.rmtree(state["place"], ignore_errors=True)
        outcome.tried += 1

    yield "pilot: loader variables from the job", case(loader)
    yield "pilot: PYTHON* and job modules", case(python)
    yield "pilot: job-written configuration", case(config)
    yield "pilot: aimed wrapper error file", case(error_file)
    yield "pilot: attack files removed", finish
