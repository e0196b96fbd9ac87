"""Attacks on broker-pilot's file hand-over between the starter's scratch dir and the job dir.

As root, like a site pilot in mode setuid: the slot user's scratch directory and the
mapped account's job directory are real directories; the hostile side (a payload running
as ``nobody``, or a slot user's planted entries) is played by real processes and links.
Each case checks that root's copy never reads or writes anything outside the job's own
files (payload_wrapper/staging.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from payload_wrapper.staging import stage_in, stage_out
from tests.reliability.harness import Outcome

SECRET = "root's secret: must never be copied"
NOBODY = 65534


def attacks(base: Path) -> Iterator[tuple[str, Callable[[Outcome], None]]]:
    def case(fn: Callable[[Outcome, Path], None]) -> Callable[[Outcome], None]:
        def body(outcome: Outcome) -> None:
            if os.geteuid() != 0:
                outcome.skipped = "needs root (copies change owners)"
                return
            if shutil.which("runuser") is None:
                outcome.skipped = "runuser is needed to act as the payload"
                return
            place = Path(tempfile.mkdtemp(prefix="rel-condor-", dir=base))
            place.chmod(0o755)
            try:
                fn(outcome, place)
            finally:
                shutil.rmtree(place, ignore_errors=True)

        return body

    def layout(place: Path) -> tuple[Path, Path, Path, Path]:
        secret = place / "secret"
        secret.write_text(SECRET)
        secret.chmod(0o600)
        victim_dir = place / "victim"
        victim_dir.mkdir(mode=0o755)
        (victim_dir / "victim.conf").write_text("keep me")
        job = place / "job"
        job.mkdir(mode=0o700)
        os.chown(job, NOBODY, NOBODY)
        scratch = place / "scratch"
        scratch.mkdir(mode=0o700)
        (scratch / ".job.ad").write_text("the starter's ad")
        return secret, victim_dir, job, scratch

    def as_payload(job: Path, script: str) -> None:
        subprocess.run(
            ["runuser", "-u", "nobody", "--", "/bin/sh", "-c", script],
            cwd=job,
            check=False,
            capture_output=True,
            timeout=20,
        )

    def leaked(scratch: Path) -> list[str]:
        found = []
        for path in scratch.rglob("*"):
            if (
                path.is_file()
                and not path.is_symlink()
                and SECRET in path.read_text("utf-8", "replace")
            ):
                found.append(str(path.relative_to(scratch)))
        return found

    def fds(*paths: Path) -> list[int]:
        return [os.open(p, os.O_RDONLY | os.O_DIRECTORY) for p in paths]

    def planted_outputs(outcome: Outcome, place: Path) -> None:
        secret, victim_dir, job, scratch = layout(place)
        as_payload(
            job,
            f"ln -s {secret} stolen.txt; ln -s {victim_dir}/victim.conf result.txt;"
            f" ln -s {victim_dir} sub; ln {secret} hard.txt 2>/dev/null;"
            " echo mine > own.txt; ln own.txt own2.txt; mkfifo pipe;"
            " echo forged > .job.ad; echo fine > fine.txt",
        )
        jfd, sfd = fds(job, scratch)
        try:
            for requested in (
                None,
                ["result.txt", "sub/victim.conf", "stolen.txt", "pipe", "own.txt"],
            ):
                outcome.tried += 1
                started = time.monotonic()
                stage_out(
                    jfd,
                    sfd,
                    payload_uids={NOBODY},
                    slot_uid=0,
                    slot_gid=0,
                    requested=requested,
                    inputs={},
                )
                if time.monotonic() - started > 5:
                    outcome.fail("the hand-back blocked (a FIFO?)")
        finally:
            os.close(jfd)
            os.close(sfd)
        if leaked(scratch):
            outcome.fail(f"root copied the secret into the scratch dir: {leaked(scratch)}")
        if (victim_dir / "victim.conf").read_text() != "keep me" or sorted(
            p.name for p in victim_dir.iterdir()
        ) != ["victim.conf"]:
            outcome.fail("a file outside the job was written through a link")
        if (scratch / ".job.ad").read_text() != "the starter's ad":
            outcome.fail("the payload overwrote the starter's .job.ad")
        if not (scratch / "fine.txt").exists():
            outcome.fail("the payload's ordinary output was not handed back")
        outcome.note("links, hard links, a FIFO and a forged .job.ad: none copied; fine.txt was")

    def planted_inputs(outcome: Outcome, place: Path) -> None:
        secret, _victim_dir, job, scratch = layout(place)
        slot = 1  # daemon: the slot user's stand-in, not the payload's account
        (scratch / "sym").symlink_to(secret)
        os.link(secret, scratch / "hard")
        (scratch / "rootfile").write_text(SECRET)
        (scratch / "dirlink").symlink_to(secret.parent)
        (scratch / "run.sh").write_text("#!/bin/sh\n")
        os.chown(scratch / "run.sh", slot, slot)
        os.chown(scratch, slot, slot)
        sfd, jfd = fds(scratch, job)
        try:
            outcome.tried += 1
            staged = stage_in(sfd, jfd, slot_uid=slot, uid=NOBODY, gid=NOBODY)
        finally:
            os.close(sfd)
            os.close(jfd)
        names = sorted(p.name for p in job.iterdir())
        if names != ["run.sh"]:
            outcome.fail(f"the job dir received {names}, not only run.sh")
        if leaked(job):
            outcome.fail("root copied the secret into the job dir")
        outcome.note(f"{len(staged.notes)} planted entries skipped with a note")

    def swap_race(outcome: Outcome, place: Path) -> None:
        # Another process of the account (a second job of the same owner) flips an output
        # between a regular file and a link to root's secret while root copies it back.
        secret, _victim_dir, job, scratch = layout(place)
        flipper = subprocess.Popen(
            [
                "runuser",
                "-u",
                "nobody",
                "--",
                "/bin/sh",
                "-c",
                f"while :; do echo mine > o.tmp; mv -f o.tmp out.txt; ln -sf {secret} l.tmp;"
                " mv -f l.tmp out.txt; done",
            ],
            cwd=job,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        jfd, sfd = fds(job, scratch)
        try:
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                outcome.tried += 1
                stage_out(
                    jfd,
                    sfd,
                    payload_uids={NOBODY},
                    slot_uid=0,
                    slot_gid=0,
                    requested=["out.txt"],
                    inputs={},
                )
        finally:
            flipper.kill()
            flipper.wait(timeout=10)
            os.close(jfd)
            os.close(sfd)
        if leaked(scratch):
            outcome.fail("the secret reached the scratch dir through the race")
        outcome.note(f"{outcome.tried} hand-backs during the flip: the secret never copied")

    yield "condor: planted links in the payload's outputs", case(planted_outputs)
    yield "condor: planted links in the scratch dir", case(planted_inputs)
    yield "condor: file/link swap race during the hand-back", case(swap_race)
