"""broker-pilot in a real execute slot's layout: the job's files in the starter's scratch dir.

The test plays the condor_starter of a vanilla job with file transfer: the scratch
directory belongs to a throwaway slot user with mode 0700, the job's executable and an
input file are transferred into it, the wrapper is started there (``env -i`` + the job's
environment + the starter's ``_CONDOR_*``) through the static launcher, and the payload
runs as a different, throwaway mapped account. Afterwards the outputs must be in the
scratch dir, owned by the slot user, as HTCondor's output transfer reads them.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.pki.loading import load_certificates
from broker.pki.proxy import chain_job_id
from tests.payload_wrapper import test_pilot
from tests.payload_wrapper.conftest import needs_root
from tests.payload_wrapper.test_pilot import Site, _audit_rows, job_ad
from tests.pkifixtures import grid_pki  # noqa: F401 - fixture

site = test_pilot.site  # the same broker-backed pilot node (a module-scoped fixture)

pytestmark = [pytest.mark.root, needs_root]

ANALYSIS = """#!/bin/sh
# a job's executable, transferred by HTCondor: reads its input, writes its outputs
set -e
id -un > who.txt
pwd > where.txt
echo "$_CONDOR_SCRATCH_DIR $_CONDOR_JOB_IWD" > scratchvars.txt
{ echo "processed: $(cat input.dat)"; echo "arg: $1"; } > result.txt
cp "$X509_USER_PROXY" proxy-copy.pem
mkdir -p sub && echo nested > sub/deep.txt
"""


@dataclass
class Slot:
    """A throwaway slot user and mapped account, and the pilot configuration using them."""

    slot: str
    slot_uid: int
    slot_gid: int
    mapped: str
    mapped_uid: int
    config: Path


@pytest.fixture
def slot(site: Site, make_account: Callable[[str], str]) -> Iterator[Slot]:
    slot_user = make_account("brkslot01")
    mapped = make_account("brkmap01")
    entry = subprocess.run(["id", "-u", slot_user], capture_output=True, text=True, check=True)
    gid = subprocess.run(["id", "-g", slot_user], capture_output=True, text=True, check=True)
    mapped_uid = int(
        subprocess.run(["id", "-u", mapped], capture_output=True, text=True, check=True).stdout
    )
    config = site.config()
    text = config.read_text().replace('account = "nobody"', f'account = "{mapped}"')
    config.write_text(text + 'containment = "session"\n')
    yield Slot(slot_user, int(entry.stdout), int(gid.stdout), mapped, mapped_uid, config)


@dataclass
class Job:
    scratch: Path
    result: subprocess.CompletedProcess[str]

    @property
    def error_text(self) -> str:
        path = self.scratch / ".wrapper_error"
        return path.read_text() if path.exists() else ""


def transferred(site: Site, slot: Slot, files: dict[str, tuple[str, int]]) -> Path:
    """A scratch dir as the starter leaves it: 0700 slot user, the job's files inside."""
    scratch = Path(tempfile.mkdtemp(prefix="dir_", dir=site.base))
    for name, (text, mode) in files.items():
        path = scratch / name
        path.write_text(text)
        path.chmod(mode)
        os.chown(path, slot.slot_uid, slot.slot_gid)
    os.chown(scratch, slot.slot_uid, slot.slot_gid)
    scratch.chmod(0o700)
    return scratch


def start_job(site: Site, slot: Slot, scratch: Path, ad_text: str, *command: str) -> Job:
    (scratch / ".job.ad").write_text(ad_text)
    os.chown(scratch / ".job.ad", slot.slot_uid, slot.slot_gid)
    starter = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "_CONDOR_JOB_AD": str(scratch / ".job.ad"),
        "_CONDOR_SCRATCH_DIR": str(scratch),
        "_CONDOR_JOB_IWD": str(scratch),
        "_CONDOR_WRAPPER_ERROR_FILE": str(scratch / ".wrapper_error"),
        "_CONDOR_SLOT": "slot1_1",
        "BROKER_PILOT_CONFIG": str(slot.config),
        "TMPDIR": str(scratch),
    }
    result = subprocess.run(
        ["env", "-i", *(f"{k}={v}" for k, v in starter.items()), str(site.launcher), *command],
        cwd=scratch,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    return Job(scratch, result)


def _owned(path: Path, uid: int) -> bool:
    st = os.lstat(path)
    return st.st_uid == uid and not os.path.islink(path)


def test_vanilla_job_with_file_transfer_runs_as_the_mapped_account(site: Site, slot: Slot) -> None:
    # Before the fix: exit 126 "Permission denied" (the mapped account cannot enter the
    # 0700 scratch dir), an empty error file, and no outputs where the starter looks.
    scratch = transferred(
        site, slot, {"analysis.sh": (ANALYSIS, 0o755), "input.dat": ("event data 42\n", 0o644)}
    )
    ad = job_ad(cluster=301, extra='TransferInput = "input.dat"')
    job = start_job(site, slot, scratch, ad, str(scratch / "analysis.sh"), "first")
    assert job.result.returncode == 0, job.result.stderr
    assert job.error_text == ""
    # the scratch dir is still the slot user's alone
    st = os.stat(scratch)
    assert (st.st_uid, st.st_mode & 0o777) == (slot.slot_uid, 0o700)
    # the outputs are in it, owned by the slot user, as output transfer reads them
    for name in ("result.txt", "who.txt", "where.txt", "proxy-copy.pem"):
        assert _owned(scratch / name, slot.slot_uid), name
    assert (scratch / "who.txt").read_text().strip() == slot.mapped
    assert (scratch / "result.txt").read_text() == "processed: event data 42\narg: first\n"
    where = Path((scratch / "where.txt").read_text().strip())
    assert where.parent == site.workdir and where.name.startswith("job-submit.example.org_301")
    # the payload's scratch dir and Iwd are its copy, the job directory
    assert (scratch / "scratchvars.txt").read_text() == f"{where} {where}\n"
    # HTCondor's default: top-level files only; unchanged inputs are not sent back as outputs
    assert not (scratch / "sub").exists()
    assert (scratch / "analysis.sh").read_text() == ANALYSIS
    assert _owned(scratch / "analysis.sh", slot.slot_uid)
    # the job-bound proxy names the job, and the broker's audit row says the same
    chain = load_certificates((scratch / "proxy-copy.pem").read_bytes(), what="proxy")
    rows = _audit_rows(site, "submit.example.org#301.0#1700000000")
    assert [r["action"] for r in rows] == ["retrieve"]
    assert chain_job_id(chain) == rows[0]["job_id"] == "submit.example.org#301.0#1700000000"


def test_transfer_output_files_are_handed_back_by_name(site: Site, slot: Slot) -> None:
    scratch = transferred(
        site, slot, {"analysis.sh": (ANALYSIS, 0o755), "input.dat": ("x\n", 0o644)}
    )
    ad = job_ad(cluster=302, extra='TransferOutput = "result.txt,sub"')
    job = start_job(site, slot, scratch, ad, str(scratch / "analysis.sh"), "second")
    assert job.result.returncode == 0, job.result.stderr
    assert _owned(scratch / "result.txt", slot.slot_uid)
    assert _owned(scratch / "sub", slot.slot_uid)
    assert (scratch / "sub" / "deep.txt").read_text() == "nested\n"
    assert _owned(scratch / "sub" / "deep.txt", slot.slot_uid)
    assert not (scratch / "who.txt").exists()  # not named
    # a named output the payload never wrote puts the job on hold with a sentence
    ad = job_ad(cluster=303, extra='TransferOutput = "result.txt,never.txt"')
    scratch = transferred(
        site, slot, {"analysis.sh": (ANALYSIS, 0o755), "input.dat": ("x\n", 0o644)}
    )
    job = start_job(site, slot, scratch, ad, str(scratch / "analysis.sh"), "third")
    assert job.result.returncode == 202, job.result.stderr
    assert "never.txt was not found in the job directory" in job.error_text


@pytest.mark.parametrize(
    ("mode", "name", "code", "why"),
    [
        (0o644, "analysis.sh", 126, "Permission denied"),
        (0o755, "missing.sh", 127, "No such file or directory"),
    ],
)
def test_exec_failure_is_explained_in_the_error_file(
    site: Site, slot: Slot, mode: int, name: str, code: int, why: str
) -> None:
    # Before the fix the error file stayed empty: the owner saw only "exit 126".
    scratch = transferred(
        site, slot, {"analysis.sh": (ANALYSIS, mode), "input.dat": ("x\n", 0o644)}
    )
    job = start_job(site, slot, scratch, job_ad(cluster=304), str(scratch / name))
    assert job.result.returncode == code, job.result.stderr
    assert job.error_text == (
        f"broker-pilot: the job was not started: the mapped account {slot.mapped} cannot "
        f"execute {scratch / name}: {why}\n"
    )
    assert "Traceback" not in job.result.stderr


HOSTILE = """#!/bin/sh
# a payload trying to read or overwrite files outside its own through the hand-back
ln -s {secret} stolen.txt
ln -s {victim} result.txt
ln {secret} hard.txt 2>/dev/null
echo mine > own.txt && ln own.txt own-again.txt
ln -s {victim_dir} sub
echo forged > .job.ad
echo forged > _condor_stdout
mkfifo pipe
echo fine > fine.txt
"""


def test_links_planted_by_the_payload_reach_nothing(site: Site, slot: Slot) -> None:
    secret = site.base / "root-secret"
    secret.write_text("root's secret\n")
    secret.chmod(0o600)
    victim_dir = Path(tempfile.mkdtemp(prefix="victim-", dir=site.base))
    victim = victim_dir / "victim.conf"
    victim.write_text("root's config\n")
    script = HOSTILE.format(secret=secret, victim=victim, victim_dir=victim_dir)
    scratch = transferred(site, slot, {"hostile.sh": (script, 0o755)})
    job_ad_text = job_ad(cluster=305)
    job = start_job(site, slot, scratch, job_ad_text, str(scratch / "hostile.sh"))
    assert job.result.returncode == 0, job.result.stderr
    assert (scratch / "fine.txt").read_text() == "fine\n"
    assert victim.read_text() == "root's config\n"
    assert sorted(p.name for p in victim_dir.iterdir()) == ["victim.conf"]
    for name in ("stolen.txt", "result.txt", "hard.txt", "own.txt", "own-again.txt", "sub", "pipe"):
        assert not (scratch / name).exists(), name
    assert (scratch / ".job.ad").read_text() == job_ad_text
    assert not (scratch / "_condor_stdout").exists()
    assert "output stolen.txt is a symbolic link: not copied" in job.result.stderr
    assert "output own.txt has 2 hard links: not copied" in job.result.stderr
    # with transfer_output_files naming the links, nothing is written through them either
    scratch = transferred(site, slot, {"hostile.sh": (script, 0o755)})
    job = start_job(
        site,
        slot,
        scratch,
        job_ad(cluster=306, extra='TransferOutput = "result.txt,sub/victim.conf"'),
        str(scratch / "hostile.sh"),
    )
    assert job.result.returncode == 202, job.result.stderr
    assert victim.read_text() == "root's config\n"
    assert not (scratch / "result.txt").exists() and not (scratch / "sub").exists()


def test_links_in_the_scratch_dir_give_the_payload_nothing(site: Site, slot: Slot) -> None:
    # The slot user's side: a link (or a file of someone else) in the scratch dir must not
    # make root copy a file the mapped account may not read.
    secret = site.base / "root-secret-2"
    secret.write_text("root's secret\n")
    secret.chmod(0o600)
    reader = (
        "#!/bin/sh\nls -a > list.txt\n"
        'for f in *; do [ -f "$f" ] && cat "$f"; done > seen.txt 2>&1\nexit 0\n'
    )
    scratch = transferred(site, slot, {"reader.sh": (reader, 0o755)})
    (scratch / "sym").symlink_to(secret)
    os.link(secret, scratch / "hard")
    (scratch / "rootfile").write_text("root's own\n")
    job = start_job(site, slot, scratch, job_ad(cluster=307), str(scratch / "reader.sh"))
    assert job.result.returncode == 0, job.result.stderr
    seen = (scratch / "seen.txt").read_text()
    assert "secret" not in seen and "root's own" not in seen
    listed = (scratch / "list.txt").read_text().split()
    assert "reader.sh" in listed
    assert not {"sym", "hard", "rootfile", ".job.ad"} & set(listed), listed
    for note in (
        "input sym is a symbolic link",
        "input hard has 2 hard links",
        "input rootfile belongs to uid 0",
    ):
        assert note in job.result.stderr


def test_scratch_dir_open_to_others_is_refused(site: Site, slot: Slot) -> None:
    scratch = transferred(site, slot, {"analysis.sh": (ANALYSIS, 0o755)})
    scratch.chmod(0o777)
    job = start_job(site, slot, scratch, job_ad(cluster=308), str(scratch / "analysis.sh"))
    assert job.result.returncode == 202
    assert "can be written by its group or others" in job.error_text
    assert json.dumps(job.error_text).count("\\n") == 1


def test_inputs_over_the_limit_refuse_the_job_and_free_the_account(site: Site, slot: Slot) -> None:
    text = slot.config.read_text().replace("[wrapper]", "stage_max_files = 1\n[wrapper]")
    small = slot.config.with_name("pilot-small.toml")
    small.write_text(text)
    scratch = transferred(
        site, slot, {"analysis.sh": (ANALYSIS, 0o755), "input.dat": ("x\n", 0o644)}
    )
    job = start_job(
        site,
        Slot(**{**slot.__dict__, "config": small}),
        scratch,
        job_ad(cluster=309),
        str(scratch / "analysis.sh"),
        "x",
    )
    assert job.result.returncode == 201, job.result.stderr
    assert job.error_text.startswith(
        "broker-pilot: the job was not started: the job's input files are too many or too large"
    ), job.error_text
    assert not (scratch / "who.txt").exists()
    [job_dir] = site.workdir.glob("job-submit.example.org_309.*")
    assert not (job_dir / "proxy" / "x509up").exists()  # the refused job's proxy copy is gone
    # nothing of the refused job holds the account: the next job runs
    scratch = transferred(
        site, slot, {"analysis.sh": (ANALYSIS, 0o755), "input.dat": ("x\n", 0o644)}
    )
    job = start_job(site, slot, scratch, job_ad(cluster=310), str(scratch / "analysis.sh"), "y")
    assert job.result.returncode == 0, job.result.stderr


def test_mode_sudo_job_with_file_transfer(site: Site, slot: Slot) -> None:
    # The wrapper half of the glidein layout: the payload is started through sudo and the
    # helper (sudo stands in as runuser), files are copied as in mode setuid.
    import shutil
    import site as pysite

    runuser = shutil.which("runuser")
    assert runuser is not None
    shim = site.base / "sudo-shim"
    shim.write_text(
        '#!/bin/sh\n[ "$1" = -n ] && [ "$2" = -u ] && [ "$4" = -- ] || exit 1\n'
        f'account=$3\nshift 4\nexec {runuser} -u "$account" -- "$@"\n'
    )
    shim.chmod(0o755)
    paths = [str(Path(__file__).resolve().parents[2]), *pysite.getsitepackages()]
    helper = site.base / "sudo-helper"
    helper.write_text(
        f"#!/usr/bin/python3\nimport sys\nsys.path[:0] = {paths!r}\n"
        "from payload_wrapper.switch import helper_main\n"
        "sys.exit(helper_main(sys.argv[2:]))\n"
    )
    helper.chmod(0o755)
    text = slot.config.read_text().replace('mode = "setuid"', 'mode = "sudo"')
    config = slot.config.with_name("pilot-sudo.toml")
    config.write_text(text + f'sudo = "{shim}"\nsudo_helper = "{helper}"\n')
    scratch = transferred(
        site, slot, {"analysis.sh": (ANALYSIS, 0o755), "input.dat": ("sudo data\n", 0o644)}
    )
    job = start_job(
        site,
        Slot(**{**slot.__dict__, "config": config}),
        scratch,
        job_ad(cluster=311),
        str(scratch / "analysis.sh"),
        "s",
    )
    assert job.result.returncode == 0, job.result.stderr
    assert (scratch / "who.txt").read_text().strip() == slot.mapped
    assert (scratch / "result.txt").read_text() == "processed: sudo data\narg: s\n"
    assert _owned(scratch / "result.txt", slot.slot_uid)
