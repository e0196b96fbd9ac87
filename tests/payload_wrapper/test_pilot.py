"""broker-pilot end to end: the test plays the condor_starter against a real broker.

Each test writes a ``.job.ad`` in the starter's format into a scratch dir, sets
the ``_CONDOR_*`` variables and runs ``broker-pilot`` as USER_JOB_WRAPPER is
installed: the static launcher (built here from payload_wrapper/launcher) that
execs this venv's ``python -I -m payload_wrapper.pilot``, with a test pilot.toml.
The payload is a small sh script; it runs as ``nobody`` and records its uid
and what ``grid-proxy-info`` says about the proxy it was given. Needs root (the
identity switch), like the wrapper tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from payload_wrapper.launcher import build_launcher
from tests.brokerserver import RunningBroker, free_port, start_broker
from tests.interop.tools import need
from tests.payload_wrapper.conftest import needs_root
from tests.pkifixtures import GridPki, grid_pki  # noqa: F401 - fixture

pytestmark = [pytest.mark.root, needs_root]

BIN = Path(sys.executable).parent
ALICE = "/DC=org/DC=example/CN=Alice"
BOB = "/DC=org/DC=example/CN=Bob"


PAYLOAD = """#!/bin/sh
# argv: MARKER [SLEEP]
id -u > uid.txt
echo "$X509_CERT_DIR" > certdir.txt
echo "$SITE_NOTE" > site_note.txt
echo "${BROKER_TEST_LEAK:-unset}" > leak.txt
grid-proxy-info -file "$X509_USER_PROXY" > proxyinfo.txt 2>&1
echo "rc=$?" >> proxyinfo.txt
openssl x509 -noout -serial -enddate -in "$X509_USER_PROXY" > proxy1.txt 2>&1
if [ -n "$2" ]; then
    sleep "$2"
    openssl x509 -noout -serial -enddate -in "$X509_USER_PROXY" > proxy2.txt 2>&1
    grid-proxy-info -file "$X509_USER_PROXY" > proxyinfo2.txt 2>&1
fi
touch "$1"
"""


def _public_dir(prefix: str, mode: int = 0o755) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(mode)
    return path


@dataclass
class Site:
    """A pilot node: public CA copies, a workdir, the payload, and a broker."""

    base: Path
    broker: RunningBroker
    ca_dir: Path
    vomsdir: Path
    workdir: Path
    payload: Path
    marks: Path
    pki: GridPki
    launcher: Path

    def config(self, **overrides: object) -> Path:
        values: dict[str, object] = {
            "broker_url": f"https://{self.broker.server}",
            "cert": str(self.pki.cert_path("pilot")),
            "key": str(self.pki.key_path("pilot")),
            "ca_dir": str(self.ca_dir),
            "vomsdir": str(self.vomsdir),
            "allowed_owners": ["/DC=org/DC=example/CN=Alice", "/DC=org/DC=example/CN=B*"],
            "workdir": str(self.workdir),
            "retrieve_attempts": 1,
        }
        values.update(overrides)
        lines = [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        lines += [
            "[wrapper]",
            'mode = "setuid"',
            'account = "nobody"',
            'umask = "0022"',
            "kill_grace = 0.5",
            f'audit_log = "{self.base / "wrapper-audit.log"}"',
        ]
        path = self.base / f"pilot-{len(list(self.base.glob('pilot-*.toml')))}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def job_dirs(self) -> list[Path]:
        return sorted(self.workdir.glob("job-*"))


@dataclass
class StarterRun:
    result: subprocess.CompletedProcess[str]
    error_file: Path
    marker: Path
    scratch: Path

    @property
    def error_text(self) -> str:
        return self.error_file.read_text() if self.error_file.exists() else ""


def job_ad(
    *, owner_dn: str | None = ALICE, submitter: str = "alice", cluster: int = 42, extra: str = ""
) -> str:
    lines = [
        'MyType = "Job"',
        f"ClusterId = {cluster}",
        "ProcId = 0",
        f'GlobalJobId = "submit.example.org#{cluster}.0#1700000000"',
        f'Owner = "{submitter}"',
        'Cmd = "/bin/true"',
        "RunAsOwner = false",
        'BrokerCredential = "default"',
    ]
    if owner_dn is not None:
        lines.append(f'BrokerOwner = "{owner_dn}"')
    return "\n".join(lines) + ("\n" + extra if extra else "") + "\n"


def run_as_starter(
    site: Site, config: Path, ad_text: str, *args: str, timeout: float = 120
) -> StarterRun:
    """Do what condor_starter does for a USER_JOB_WRAPPER."""
    scratch = Path(tempfile.mkdtemp(prefix="scratch-", dir=site.base))  # 0700, like the starter's
    (scratch / ".job.ad").write_text(ad_text)
    error_file = scratch / ".wrapper_error"
    marker = site.marks / f"ran-{scratch.name}"
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "_CONDOR_JOB_AD": str(scratch / ".job.ad"),
        "_CONDOR_SCRATCH_DIR": str(scratch),
        "_CONDOR_JOB_IWD": str(scratch),
        "_CONDOR_WRAPPER_ERROR_FILE": str(error_file),
        "BROKER_PILOT_CONFIG": str(config),
        "BROKER_TEST_LEAK": "the starter's environment",  # must not reach the payload
    }
    result = subprocess.run(
        [str(site.launcher), str(site.payload), str(marker), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return StarterRun(result, error_file, marker, scratch)


@pytest.fixture(scope="module")
def site(grid_pki: GridPki) -> Iterator[Site]:  # noqa: F811 - fixture parameter
    need("grid-proxy-info")
    base = _public_dir("pilot-site-")
    # Copies the payload account can read (pytest's basetemp is root-only).
    ca_dir = base / "certificates"
    shutil.copytree(grid_pki.ca_dir, ca_dir)
    vomsdir = base / "vomsdir"
    shutil.copytree(grid_pki.vomsdir, vomsdir)
    for path in [ca_dir, vomsdir, *ca_dir.rglob("*"), *vomsdir.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    workdir = base / "work"
    workdir.mkdir(mode=0o755)
    marks = _public_dir("pilot-marks-", 0o1777)
    payload = base / "payload.sh"
    payload.write_text(PAYLOAD)
    payload.chmod(0o755)
    launcher = build_launcher(base / "broker-pilot")
    broker_dir = Path(tempfile.mkdtemp(prefix="pilot-broker-"))
    broker = start_broker(grid_pki, broker_dir)  # DEV_POLICY
    try:
        alice = broker.client("alice")
        alice.delegate(
            alice.identity.load(), username="alice", now=datetime.now(UTC), max_proxy_hours=6
        )
        yield Site(base, broker, ca_dir, vomsdir, workdir, payload, marks, grid_pki, launcher)
    finally:
        broker.stop()
        shutil.rmtree(broker_dir, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(marks, ignore_errors=True)


def _audit_rows(site: Site, job_id: str) -> list[dict[str, object]]:
    out = subprocess.run(
        [
            str(BIN / "broker"),
            "audit",
            "--state-dir",
            str(site.broker.state_dir),
            "--database-url",
            site.broker.database_url,
            "--job-id",
            job_id,
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    rows: list[dict[str, object]] = json.loads(out)
    return rows


def _new_job_dir(site: Site, before: list[Path]) -> Path:
    new = [d for d in site.job_dirs() if d not in before]
    assert len(new) == 1, new
    return new[0]


# --------------------------------------------------------------------------- success


def test_payload_runs_as_nobody_with_the_owners_fresh_proxy(site: Site) -> None:
    before = site.job_dirs()
    ad = job_ad(
        cluster=101, extra="Environment = \"SITE_NOTE='hello world' X509_USER_PROXY=/tmp/stolen\""
    )
    run = run_as_starter(site, site.config(), ad)
    assert run.result.returncode == 0, run.result.stderr
    assert run.marker.exists()
    assert run.error_text == ""
    job_dir = _new_job_dir(site, before)
    nobody = int(
        subprocess.run(["id", "-u", "nobody"], capture_output=True, text=True, check=True).stdout
    )
    assert int((job_dir / "uid.txt").read_text()) == nobody
    info = (job_dir / "proxyinfo.txt").read_text()
    assert f"identity : {ALICE}" in info, info
    assert "rc=0" in info, info
    assert "timeleft : 0:00:00" not in info
    assert (job_dir / "certdir.txt").read_text().strip() == str(site.ca_dir)
    # the job's own environment is re-created, minus credential locations;
    # nothing of the starter's environment leaks
    assert (job_dir / "site_note.txt").read_text().strip() == "hello world"
    assert (job_dir / "leak.txt").read_text().strip() == "unset"
    assert "X509_USER_PROXY is not passed" in run.result.stderr
    # the proxy copy is gone after the job, and so is the pilot's own copy
    assert not (job_dir / "proxy" / "x509up").exists()
    assert list((site.workdir / ".broker-pilot").iterdir()) == []
    # the broker's audit names the pilot, the owner and the GlobalJobId
    rows = _audit_rows(site, "submit.example.org#101.0#1700000000")
    assert [(r["action"], r["decision"], r["requester"], r["owner"]) for r in rows] == [
        ("retrieve", "allow", "/DC=org/DC=example/CN=pilot", ALICE)
    ]


# --------------------------------------------------------------------------- fail closed


def _assert_refused(run: StarterRun, code: int, *phrases: str) -> None:
    assert run.result.returncode == code, (run.result.returncode, run.result.stderr)
    assert not run.marker.exists(), "the payload ran"
    text = run.error_text
    assert text.startswith("broker-pilot: the job was not started: "), text
    for phrase in phrases:
        assert phrase in text, text
    assert "Traceback" not in run.result.stderr


def test_owner_not_on_the_allow_list_is_refused_before_retrieval(site: Site) -> None:
    before = site.job_dirs()
    config = site.config(allowed_owners=["/DC=org/DC=example/CN=Bob"])
    run = run_as_starter(site, config, job_ad(cluster=102))
    _assert_refused(run, 203, ALICE, "allowed_owners")
    assert site.job_dirs() == before
    assert _audit_rows(site, "submit.example.org#102.0#1700000000") == []


def test_owner_without_a_credential_is_told_to_delegate(site: Site) -> None:
    run = run_as_starter(site, site.config(), job_ad(owner_dn=BOB, submitter="bob", cluster=103))
    _assert_refused(run, 201, BOB, "broker-init -k default")


def test_credential_of_another_submitter_is_not_used(site: Site) -> None:
    # bob's job names alice as the owner: the broker finds no credential of
    # alice under bob's username, so no proxy is issued at all
    run = run_as_starter(site, site.config(), job_ad(submitter="bob", cluster=104))
    _assert_refused(run, 201, "under username 'bob'")
    rows = _audit_rows(site, "submit.example.org#104.0#1700000000")
    assert all(r["decision"] != "allow" for r in rows), rows


def test_broker_down_fails_closed(site: Site) -> None:
    config = site.config(broker_url=f"https://localhost:{free_port()}")
    run = run_as_starter(site, config, job_ad(cluster=105))
    _assert_refused(run, 202, "cannot reach the broker")


def test_job_ad_without_an_owner_is_refused(site: Site) -> None:
    run = run_as_starter(site, site.config(), job_ad(owner_dn=None, cluster=106))
    _assert_refused(run, 201, "BrokerOwner", "broker-submit")


def test_missing_job_ad_and_bad_config(site: Site) -> None:
    marker = site.marks / "ran-no-ad"
    env = {
        "PATH": "/usr/bin:/bin",
        "BROKER_PILOT_CONFIG": str(site.config()),
        "_CONDOR_WRAPPER_ERROR_FILE": str(site.base / "err-no-ad"),
    }
    result = subprocess.run(
        [str(site.launcher), str(site.payload), str(marker)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 202
    assert "_CONDOR_JOB_AD" in (site.base / "err-no-ad").read_text()
    bad = site.base / "bad.toml"
    bad.write_text('broker_url = "https://x"\ncert = "c"\nkey = "k"\n')
    env["BROKER_PILOT_CONFIG"] = str(bad)
    result = subprocess.run(
        [str(site.launcher), str(site.payload), str(marker)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 202
    assert "allowed_owners" in result.stderr
    assert not marker.exists()


# --------------------------------------------------------------------------- refresh


def test_refresh_replaces_the_proxy_of_a_running_payload(site: Site) -> None:
    before = site.job_dirs()
    config = site.config(refresh_interval_seconds=1.0)
    run = run_as_starter(site, config, job_ad(cluster=107, extra="BrokerLifetime = 0.05"), "6")
    assert run.result.returncode == 0, run.result.stderr
    assert "refreshed the payload's proxy" in run.result.stderr
    job_dir = _new_job_dir(site, before)
    first = (job_dir / "proxy1.txt").read_text()
    second = (job_dir / "proxy2.txt").read_text()
    assert first.startswith("serial=") and second.startswith("serial="), (first, second)
    assert first != second
    info = (job_dir / "proxyinfo2.txt").read_text()
    assert f"identity : {ALICE}" in info, info
    # every refresh is a retrieval bound to the same job
    rows = _audit_rows(site, "submit.example.org#107.0#1700000000")
    assert len(rows) >= 2
    assert {(r["action"], r["decision"]) for r in rows} == {("retrieve", "allow")}


# --------------------------------------------------------------------------- by hand


def test_by_hand_with_job_ad_and_rsa_pool(site: Site) -> None:
    pool = site.base / "keys"
    config = site.config(rsa_pool_dir=str(pool), key_type="rsa")
    filled = subprocess.run(
        [str(site.launcher), "--config", str(config), "--fill-rsa-pool", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert filled.returncode == 0, filled.stderr
    assert len(list(pool.glob("*.pem"))) == 2
    ad = site.base / "hand.job.ad"
    ad.write_text(job_ad(cluster=108))
    marker = site.marks / "ran-by-hand"
    result = subprocess.run(
        [
            str(site.launcher),
            "--config",
            str(config),
            "--job-ad",
            str(ad),
            "--",
            str(site.payload),
            str(marker),
        ],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert marker.exists()
    assert len(list(pool.glob("*.pem"))) == 1  # one pool key consumed
    assert os.stat(pool).st_mode & 0o777 == 0o700


# --------------------------------------------------------------------------- fqan allow-list


def _delegate_voms(site: Site, name: str, vo: str, fqan: str) -> None:
    from datetime import timedelta

    from broker.pki.proxy import new_proxy
    from broker.pki.voms import make_ac_extension

    alice = site.pki.load("alice")
    now = datetime.now(UTC)
    ac = make_ac_extension(
        alice.cert,
        site.pki.pki.voms,
        vo=vo,
        fqans=[fqan],
        uri="voms.example.org:15001",
        now=now,
        lifetime=timedelta(hours=6),
    )
    voms_proxy = new_proxy(alice, now=now, lifetime=timedelta(hours=6), extra_extensions=[ac])
    site.broker.client("alice").delegate(
        voms_proxy, username="alice", name=name, now=now, max_proxy_hours=2
    )


def test_fqan_allow_list_admits_a_job_after_retrieval(site: Site) -> None:
    _delegate_voms(site, "atlasjob", "atlas", "/atlas/higgs")
    ad = job_ad(cluster=131).replace(
        'BrokerCredential = "default"', 'BrokerCredential = "atlasjob"'
    )
    run = run_as_starter(site, site.config(allowed_owners=["fqan:/atlas"]), ad)
    assert run.result.returncode == 0, run.result.stderr
    assert run.marker.exists() and run.error_text == ""


def test_fqan_allow_list_refuses_another_vo(site: Site) -> None:
    _delegate_voms(site, "atlasjob2", "atlas", "/atlas")
    ad = job_ad(cluster=132).replace(
        'BrokerCredential = "default"', 'BrokerCredential = "atlasjob2"'
    )
    run = run_as_starter(site, site.config(allowed_owners=["fqan:/cms"]), ad)
    _assert_refused(run, 203, "FQANs (/atlas/Role=NULL/Capability=NULL)", "allowed_owners")
    # the FQAN check needs the proxy, so the retrieval happened and is audited
    assert _audit_rows(site, "submit.example.org#132.0#1700000000")


# --------------------------------------------------------------------------- hostile jobs
#
# Issue 19: the starter builds the wrapper's environment from STARTER_JOB_ENVIRONMENT
# and lets the job ad's Environment override it, and runs the wrapper in the job's
# scratch directory, which holds the job's files. Each test plays that literally:
# `env -i` + the starter's variables + the job's, the cwd the job's scratch directory.

SITECUSTOMIZE = """import os
with open({marker!r}, "w") as out:
    out.write(f"uid={{os.getuid()}}\\n")
    try:
        out.write(open({key!r}).read()[:40])
    except OSError as exc:
        out.write(f"key: {{exc}}")
"""


def run_hostile(
    site: Site,
    config: Path | None,
    ad_text: str,
    job_env: dict[str, str],
    files: dict[str, str],
    *command: str,
) -> StarterRun:
    """The starter running a job whose Environment is ``job_env`` and whose files are ``files``."""
    nobody = int(
        subprocess.run(["id", "-u", "nobody"], capture_output=True, text=True, check=True).stdout
    )
    scratch = Path(tempfile.mkdtemp(prefix="scratch-", dir=site.base))
    (scratch / ".job.ad").write_text(ad_text)
    for name, text in files.items():
        path = scratch / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        for owned in (path, *[p for p in path.parents if p != scratch and scratch in p.parents]):
            os.chown(owned, nobody, nobody)  # the job's files are the job's
    error_file = scratch / ".wrapper_error"
    marker = site.marks / f"ran-{scratch.name}"
    starter = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "_CONDOR_JOB_AD": str(scratch / ".job.ad"),
        "_CONDOR_SCRATCH_DIR": str(scratch),
        "_CONDOR_JOB_IWD": str(scratch),
        "_CONDOR_WRAPPER_ERROR_FILE": str(error_file),
        "TMPDIR": str(scratch),
    }
    if config is not None:
        starter["BROKER_PILOT_CONFIG"] = str(config)
    env = {**starter, **{k: v.replace("@SCRATCH@", str(scratch)) for k, v in job_env.items()}}
    cmd = [c.replace("@SCRATCH@", str(scratch)) for c in command] or [
        str(site.payload),
        str(marker),
    ]
    result = subprocess.run(
        ["env", "-i", *(f"{k}={v}" for k, v in env.items()), str(site.launcher), *cmd],
        cwd=scratch,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return StarterRun(result, error_file, marker, scratch)


def _ad_environment(job_env: dict[str, str]) -> str:
    return 'Environment = "' + " ".join(f"{k}={v}" for k, v in job_env.items()) + '"'


def test_job_python_variables_and_modules_never_run_in_the_pilot(site: Site) -> None:
    # A job-shipped sitecustomize/usercustomize, a module shadowing one the pilot
    # imports (tomllib) in the working directory and PYTHON* variables pointing at
    # them: before the fix sitecustomize ran as root and read the pilot's key.
    evidence = site.marks / "sitecustomize-ran"
    code = SITECUSTOMIZE.format(marker=str(evidence), key=str(site.pki.key_path("pilot")))
    job_env = {
        "PYTHONPATH": "@SCRATCH@/lib",
        "PYTHONSTARTUP": "@SCRATCH@/lib/sitecustomize.py",
        "PYTHONUSERBASE": "@SCRATCH@/user",
        "PYTHONINSPECT": "1",
        "PYTHONWARNINGS": "error",
        "HOME": "@SCRATCH@",
    }
    files = {
        "lib/sitecustomize.py": code,
        "tomllib.py": code,
        "secrets.py": code,
        "payload_wrapper/__init__.py": code,
        "user/lib/python3.11/site-packages/usercustomize.py": code,
    }
    run = run_hostile(
        site, site.config(), job_ad(cluster=120, extra=_ad_environment(job_env)), job_env, files
    )
    assert not evidence.exists(), evidence.read_text()
    assert run.result.returncode == 0, run.result.stderr
    assert run.marker.exists()
    assert "PYTHONPATH is not passed" in run.result.stderr


def test_ld_preload_from_the_job_is_refused_before_any_code_runs(site: Site) -> None:
    # Before the fix the constructor ran inside the pilot as uid 0.
    evidence = site.marks / "constructor-ran"
    source = site.base / "evil.c"
    source.write_text(
        "#include <stdio.h>\n__attribute__((constructor)) static void evil(void) {\n"
        f'    FILE *f = fopen("{evidence}", "w"); if (f) {{ fputs("ran", f); fclose(f); }}\n'
        "}\n"
    )
    library = site.base / "evil.so"
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True, timeout=60
    )
    # the library is a working one: it does run in a dynamically linked program
    subprocess.run(["env", "-i", f"LD_PRELOAD={library}", "/bin/true"], check=True, timeout=30)
    assert evidence.exists()
    evidence.unlink()
    for job_env in (
        {"LD_PRELOAD": str(library)},
        {"LD_LIBRARY_PATH": "@SCRATCH@"},
        {"LD_AUDIT": str(library)},
    ):
        run = run_hostile(
            site, site.config(), job_ad(cluster=121, extra=_ad_environment(job_env)), job_env, {}
        )
        _assert_refused(run, 202, f"the environment sets {next(iter(job_env))}")
        assert not evidence.exists()
        assert _audit_rows(site, "submit.example.org#121.0#1700000000") == []


def test_job_written_pilot_config_is_refused(site: Site) -> None:
    # Before the fix the job's config (mode none, every owner) ran the payload
    # unswitched as root.
    evil = (
        'broker_url = "https://127.0.0.1:1"\nproxy = "/nonexistent"\n'
        'allowed_owners = ["*"]\n[wrapper]\nmode = "none"\n'
    )
    job_env = {"BROKER_PILOT_CONFIG": "@SCRATCH@/evil.toml"}
    run = run_hostile(
        site,
        site.config(),
        job_ad(cluster=122, extra=_ad_environment(job_env)),
        job_env,
        {"evil.toml": evil},
    )
    _assert_refused(run, 202, "evil.toml is not trusted", "belongs to uid")
    # root-owned but writable by others, or reached through a job-owned directory
    loose = site.base / "loose.toml"
    loose.write_text(site.config().read_text())
    loose.chmod(0o666)
    run = run_hostile(site, None, job_ad(cluster=122), {"BROKER_PILOT_CONFIG": str(loose)}, {})
    _assert_refused(run, 202, "can be written by its group or others")
    job_env = {"BROKER_PILOT_CONFIG": "@SCRATCH@/conf/link.toml"}
    run = run_hostile(site, None, job_ad(cluster=122), job_env, {"conf/placeholder": ""})
    _assert_refused(run, 202, "does not exist")
    assert _audit_rows(site, "submit.example.org#122.0#1700000000") == []


def test_job_command_is_never_read_as_pilot_options(site: Site) -> None:
    # The job chooses Cmd, which the starter passes first: "--job-ad FORGED" must be
    # the job's command line, not a job ad of the job's making.
    forged = job_ad(cluster=123)
    run = run_hostile(
        site,
        site.config(),
        job_ad(cluster=124),
        {},
        {"forged.ad": forged},
        "--job-ad",
        "@SCRATCH@/forged.ad",
        str(site.payload),
        "unused",
    )
    assert run.result.returncode != 0
    assert _audit_rows(site, "submit.example.org#123.0#1700000000") == []


def test_wrapper_error_file_aimed_at_other_files_is_not_written(site: Site) -> None:
    # The job may set _CONDOR_WRAPPER_ERROR_FILE: the pilot (root) must not follow a
    # link to a system file, append to a file that has content, or block on a FIFO.
    victim = site.base / "victim.conf"
    victim.write_text("root's file\n")
    aim = Path(tempfile.mkdtemp(prefix="aim-", dir=site.base))
    (aim / "symlink").symlink_to(victim)
    (aim / "full").write_text("earlier content\n")
    os.link(victim, aim / "hardlink")
    os.mkfifo(aim / "fifo")
    for name in ("symlink", "full", "hardlink", "fifo"):
        run = run_hostile(
            site,
            site.config(),
            job_ad(owner_dn=None, cluster=125),
            {"_CONDOR_WRAPPER_ERROR_FILE": str(aim / name)},
            {},
        )
        assert run.result.returncode == 201, run.result.stderr
        assert "BrokerOwner" in run.result.stderr
        assert "not writing to the wrapper error file" in run.result.stderr, name
    assert victim.read_text() == "root's file\n"
    assert (aim / "full").read_text() == "earlier content\n"
    # the launcher's own refusal obeys the same rule
    run = run_hostile(
        site,
        site.config(),
        job_ad(cluster=125),
        {"_CONDOR_WRAPPER_ERROR_FILE": str(aim / "symlink"), "LD_PRELOAD": "x"},
        {},
    )
    assert run.result.returncode == 202
    assert "not writing to the wrapper error file" in run.result.stderr
    assert victim.read_text() == "root's file\n"
