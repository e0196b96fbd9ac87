"""The library API: what ``payload-wrapper`` and ``broker-pilot`` call.

::

    settings = merge_settings(load_config_file("wrapper.toml"), {"account": "nobody"})
    code = run_payload(settings, "/pilot/proxies/job42.pem", ["./run.sh"], job_id="42")

or, when the pilot must refresh the proxy while the payload runs::

    job = prepare(settings, proxy_path, command, job_id="42")   # raises WrapperError (exit_code)
    ...another thread: refresh_proxy(job, new_pem)
    code = execute(job)                                          # never raises; audits

Order of work (fail closed: nothing runs unless every step before the switch
succeeded): check the proxy file and chain -> ban list and mapping -> choose
the containment and take the account's one-owner lock -> build the environment
-> create the sandbox -> (job cgroup) switch and run -> kill everything of the
job -> make outputs readable by the pilot -> epilogue -> audit line -> exit code.
Every step after the run happens whatever the one before it did.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from broker.errors import BrokerError, InputError
from broker.fileio import read_private_file
from broker.pki.chain import validate_chain
from broker.pki.loading import load_credential
from broker.trustdir import default_ca_dir, default_vomsdir, load_ca_dir
from payload_wrapper import sandbox as sb
from payload_wrapper.audit import AuditRecord, write_audit
from payload_wrapper.config import WrapperSettings
from payload_wrapper.containment import (
    JobCgroup,
    UidLock,
    cgroup_parent,
    default_state_dir,
)
from payload_wrapper.containment import kill_uid as kill_uid_processes
from payload_wrapper.environment import PayloadPaths, build_environment
from payload_wrapper.errors import (
    EXIT_SYSTEM,
    EXIT_TIMEOUT,
    ClientError,
    WrapperError,
    WrapperSystemError,
    exit_code_for,
    payload_exit_code,
)
from payload_wrapper.mapping import (
    Account,
    BanList,
    GridmapDir,
    lookup_account,
    map_identity,
    parse_gridmapfile,
)
from payload_wrapper.mapping import Mapping as AccountMapping
from payload_wrapper.switch import (
    EXEC_FAILED_WORD,
    STARTED_LINE,
    LaunchSpec,
    RunResult,
    run_epilogue,
    run_tracked,
    sudo_argv,
)

__all__ = [
    "Identity",
    "PreparedJob",
    "abandon",
    "check_proxy",
    "exec_failure_message",
    "execute",
    "prepare",
    "refresh_proxy",
    "run_payload",
]

if TYPE_CHECKING:
    from broker.pki.voms import VomsDir

_RUN_LOCK = threading.Lock()


def say(message: str) -> None:
    """A line on stderr for the job owner (the payload's stderr is the same stream)."""
    sys.stderr.write(f"payload-wrapper: {message}\n")
    sys.stderr.flush()


@dataclass(frozen=True)
class Identity:
    dn: str
    fqans: tuple[str, ...]
    not_after: datetime


@dataclass
class PreparedJob:
    """A job ready to run; hand it to :func:`execute` (and to :func:`refresh_proxy`)."""

    settings: WrapperSettings
    job_id: str
    identity: Identity
    mapping: AccountMapping | None  # None in mode none without a mapping rule
    run_as: Account
    command: tuple[str, ...]
    env: dict[str, str]
    job_dir: Path
    egg_cache: Path
    proxy_path: Path
    pilot_uid: int | None
    caller_uid: int
    audit: AuditRecord
    sandbox: sb.Sandbox | None = None  # setuid and none modes
    spec_path: Path | None = None  # sudo mode: in the pilot's workdir, read-only for the target
    started_path: Path | None = None  # sudo mode: the FIFO the helper writes before exec
    started_fd: int = -1  # its read end, opened before sudo runs
    containment: str = "session"  # cgroup | uid | session (the mechanism chosen)
    uid_lock: UidLock | None = None  # one owner per uid while the job lives
    shown_command: str | None = None  # argv[0] as the job named it (messages only)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    finished: bool = False


# --------------------------------------------------------------------------- step 1


def _vomsdir(path: Path, needed: bool) -> VomsDir | None:
    try:
        from broker.pki.voms import VomsDir
        from broker.trustdir import load_vomsdir

        loaded = load_vomsdir(path)
        return loaded if isinstance(loaded, VomsDir) else None
    except ImportError:
        if needed:
            raise WrapperSystemError(
                "FQAN rules are configured (ban list or grid-mapfile) but VOMS support "
                "(broker.pki.voms) is not installed; refusing to decide without FQANs"
            ) from None
        return None


def check_proxy(
    path: str | os.PathLike[str],
    settings: WrapperSettings,
    *,
    now: datetime,
    owner: int | None = None,
    fqans_needed: bool = False,
) -> tuple[bytes, Identity]:
    """Read and verify the proxy file; returns its bytes and the identity it proves."""
    owner = os.getuid() if owner is None else owner
    try:
        pem = read_private_file(path, require_owner=owner)
    except InputError as exc:
        raise ClientError(f"the proxy file is unusable: {exc.message}", reason=exc.reason) from None
    return pem, _verify_pem(pem, settings, now=now, fqans_needed=fqans_needed)


def _verify_pem(
    pem: bytes, settings: WrapperSettings, *, now: datetime, fqans_needed: bool
) -> Identity:
    ca_dir = settings.ca_dir or Path(default_ca_dir())
    vomsdir = settings.vomsdir or Path(default_vomsdir())
    try:
        cred = load_credential(pem)
    except BrokerError as exc:
        raise ClientError(
            f"the proxy file does not hold a usable credential: {exc.message}; create a new "
            "proxy (grid-proxy-init or broker-logon)",
            reason=exc.reason,
        ) from None
    try:
        trust = load_ca_dir(ca_dir)
    except BrokerError as exc:
        raise WrapperSystemError(f"the node's trust anchors are unusable: {exc.message}") from None
    voms = _vomsdir(vomsdir, fqans_needed)
    try:
        info = validate_chain(cred.chain, trust, now=now, vomsdir=voms)
    except BrokerError as exc:
        raise ClientError(
            f"the proxy does not verify ({exc.reason}): {exc.message}; renew the proxy "
            "(or check that its CA is trusted on this node)",
            reason=exc.reason,
        ) from None
    return Identity(info.identity, tuple(info.fqans), info.not_after)


# --------------------------------------------------------------------------- prepare


def _new_job_id(now: datetime) -> str:
    return f"{now.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"


def _read_gridmap(settings: WrapperSettings) -> list[object]:
    if settings.gridmapfile is None:
        return []
    try:
        text = settings.gridmapfile.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WrapperSystemError(
            f"cannot read the grid-mapfile {settings.gridmapfile}: {exc}"
        ) from exc
    return list(parse_gridmapfile(text, source=str(settings.gridmapfile)))


def _pilot_uid(settings: WrapperSettings, workdir: Path, run_as: Account) -> int | None:
    if settings.pilot_account is not None:
        uid = lookup_account(settings.pilot_account).uid
    else:
        try:
            uid = os.lstat(workdir).st_uid
        except OSError:
            return None
    return None if uid in (0, run_as.uid) else uid


def _caller_account() -> Account:
    entry = pwd.getpwuid(os.getuid())
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, tuple(os.getgroups()), entry.pw_dir)


def prepare(
    settings: WrapperSettings,
    proxy_pem_path: str | os.PathLike[str],
    command: Sequence[str],
    *,
    job_id: str | None = None,
    now: datetime | None = None,
    caller_env: Mapping[str, str] | None = None,
) -> PreparedJob:
    """Steps 1-4: verify, authorize, map, build the environment and the sandbox.

    Raises a :class:`WrapperError` (or another ``BrokerError``; use
    :func:`payload_wrapper.errors.exit_code_for`) and leaves nothing behind
    when any step fails.
    """
    now = now or datetime.now(UTC)
    job_id = job_id or _new_job_id(now)
    audit = AuditRecord(job_id=job_id, mode=settings.mode, start=now, caller_uid=os.getuid())
    try:
        return _prepare(settings, proxy_pem_path, command, job_id, now, caller_env, audit)
    except BrokerError as exc:
        exc.audit = audit  # type: ignore[attr-defined]  # what was known when it failed
        raise


def _prepare(
    settings: WrapperSettings,
    proxy_pem_path: str | os.PathLike[str],
    command: Sequence[str],
    job_id: str,
    now: datetime,
    caller_env: Mapping[str, str] | None,
    audit: AuditRecord,
) -> PreparedJob:
    _check_request(settings, command, job_id)
    switching = settings.mode != "none"
    bans = BanList.from_sources(settings.ban, settings.ban_file)
    gridmap = _read_gridmap(settings)
    fqans_needed = bans.has_fqans or any(getattr(e, "is_fqan", False) for e in gridmap)
    pem, identity = check_proxy(proxy_pem_path, settings, now=now, fqans_needed=fqans_needed)
    audit.dn, audit.fqans = identity.dn, identity.fqans

    mapping = _map_account(settings, identity, bans, gridmap, now, audit.caller_uid)
    run_as = mapping.account if (mapping is not None and switching) else _caller_account()
    audit.account, audit.uid = run_as.name, run_as.uid
    audit.rule = mapping.rule if mapping else "none (no mapping configured)"

    containment = choose_containment(settings, mapping)
    audit.containment = containment
    uid_lock = _lock_account(settings, run_as, identity, containment) if switching else None
    try:
        job = _prepare_job(
            settings, command, job_id, caller_env, audit, identity, mapping, run_as, pem
        )
    except BaseException:
        if uid_lock is not None:
            uid_lock.release()
        raise
    job.containment, job.uid_lock = containment, uid_lock
    return job


def _check_request(settings: WrapperSettings, command: Sequence[str], job_id: str) -> None:
    """Refuse a request that cannot run here before anything is read or touched."""
    sb.job_dir_name(job_id)  # validate before anything touches the disk
    if not command:
        raise ClientError("no payload command was given; put it after --", reason="no_command")
    if settings.mode == "setuid" and os.geteuid() != 0:
        raise WrapperSystemError(
            "mode setuid needs the wrapper to run as root; run it as root or use mode sudo",
            reason="not_root",
        )
    switching = settings.mode != "none"
    if switching and settings.account is None and settings.gridmapfile is None:
        raise WrapperSystemError(
            "no mapping is configured; set account (e.g. nobody) or gridmapfile",
            reason="no_mapping",
        )


def _map_account(
    settings: WrapperSettings,
    identity: Identity,
    bans: BanList,
    gridmap: list[object],
    now: datetime,
    caller_uid: int,
) -> AccountMapping | None:
    """Map the identity to an account; None when no mapping is configured.

    Without a mapping the ban list is still applied, against the caller's own account.
    """
    switching = settings.mode != "none"
    if settings.account is None and settings.gridmapfile is None:
        map_identity(
            identity.dn,
            identity.fqans,
            bans=bans,
            account=_caller_account().name,
            now=now.timestamp(),
            caller_uid=caller_uid,
            switching=False,
        )
        return None
    gmdir = (
        GridmapDir(settings.gridmapdir, expiry=settings.lease_expiry)
        if settings.gridmapdir is not None
        else None
    )
    return map_identity(
        identity.dn,
        identity.fqans,
        bans=bans,
        account=settings.account,
        gridmap=gridmap,  # type: ignore[arg-type]
        gridmapdir=gmdir,
        gridmap_source=str(settings.gridmapfile or "grid-mapfile"),
        now=now.timestamp(),
        caller_uid=caller_uid,
        switching=switching,
    )


def _lock_account(
    settings: WrapperSettings, run_as: Account, identity: Identity, containment: str
) -> UidLock:
    """Take the account's one-owner lock (exclusive when the job is contained by uid)."""
    return UidLock.acquire(
        settings.state_dir or default_state_dir(),
        run_as.uid,
        identity.dn,
        account=run_as.name,
        exclusive=containment == "uid",
    )


def choose_containment(settings: WrapperSettings, mapping: AccountMapping | None) -> str:
    """The mechanism that will contain the job's processes (fail closed; see the docs).

    ``auto``: a cgroup when the wrapper can make one (root, cgroup v2 with
    cgroup.kill); otherwise a uid-wide kill when the account belongs to the job
    (a pool lease, or ``kill_all_target_processes``), holding the account
    exclusively; otherwise the payload is not started. ``session`` must be chosen
    explicitly. In mode none nothing is switched: a cgroup when possible, else session.
    """
    wanted = settings.containment
    if wanted == "session":
        return "session"
    why_not_cgroup = None
    if settings.mode == "sudo":
        why_not_cgroup = "mode sudo cannot create cgroups (the wrapper is not root)"
    elif os.geteuid() != 0:
        why_not_cgroup = "the wrapper does not run as root"
    else:
        try:
            cgroup_parent(settings.cgroup_parent)
        except WrapperSystemError as exc:
            why_not_cgroup = exc.message
    if wanted in ("auto", "cgroup") and why_not_cgroup is None:
        return "cgroup"
    if wanted == "cgroup":
        raise WrapperSystemError(
            f'containment = "cgroup" is configured, but {why_not_cgroup}; the payload was '
            "not started",
            reason="no_containment",
        )
    if settings.mode == "none":
        if wanted == "uid":
            raise WrapperSystemError(
                'containment = "uid" needs a switched account (mode setuid or sudo)',
                reason="no_containment",
            )
        return "session"
    dedicated = (
        mapping is not None and mapping.lease is not None
    ) or settings.kill_all_target_processes
    if dedicated:
        return "uid"
    raise WrapperSystemError(
        (
            'containment = "uid" is configured'
            if wanted == "uid"
            else f"no cgroup is available ({why_not_cgroup})"
        )
        + ", and killing by uid is only safe for an account that belongs to the job (a pool "
        "lease through gridmapdir, or kill_all_target_processes = true for an account used "
        "by nothing else); the payload was not started. Use pool accounts, or set "
        'containment = "session" to accept a /proc scan that a payload forking in a '
        "loop can escape",
        reason="no_containment",
    )


def _prepare_job(
    settings: WrapperSettings,
    command: Sequence[str],
    job_id: str,
    caller_env: Mapping[str, str] | None,
    audit: AuditRecord,
    identity: Identity,
    mapping: AccountMapping | None,
    run_as: Account,
    pem: bytes,
) -> PreparedJob:
    caller_uid = audit.caller_uid
    workdir = (settings.workdir or Path.cwd()).absolute()
    job_dir = workdir / sb.job_dir_name(job_id)
    egg = sb.egg_cache_path()
    proxy_path = job_dir / "proxy" / sb.PROXY_NAME
    paths = PayloadPaths(
        user=run_as.name,
        home=str(job_dir / "home"),
        tmpdir=str(job_dir / "tmp"),
        egg_cache=str(egg),
        proxy=str(proxy_path),
        ca_dir=os.path.abspath(settings.ca_dir or default_ca_dir()),
        vomsdir=os.path.abspath(settings.vomsdir or default_vomsdir()),
        path=settings.path,
        job_id=job_id,
    )
    env = build_environment(
        paths,
        caller_env=os.environ if caller_env is None else caller_env,
        keep=settings.keep_env,
        set_=settings.set_env,
    )
    pilot_uid = _pilot_uid(settings, workdir, run_as)
    job = PreparedJob(
        settings=settings,
        job_id=job_id,
        identity=identity,
        mapping=mapping,
        run_as=run_as,
        command=tuple(command),
        env=env,
        job_dir=job_dir,
        egg_cache=egg,
        proxy_path=proxy_path,
        pilot_uid=pilot_uid,
        caller_uid=caller_uid,
        audit=audit,
    )
    if settings.mode == "sudo":
        try:
            _prepare_sudo(job, workdir, pem)
        except BaseException:
            if job.started_fd >= 0:
                os.close(job.started_fd)
            for leftover in (job.spec_path, job.started_path):
                if leftover is not None:
                    with contextlib.suppress(OSError):
                        leftover.unlink()
            raise
    else:
        job.sandbox = sb.create_sandbox(
            workdir,
            job_id,
            uid=run_as.uid,
            gid=run_as.gid,
            pem=pem,
            pilot_uid=pilot_uid,
            egg_cache=egg,
        )
    return job


def _prepare_sudo(job: PreparedJob, workdir: Path, pem: bytes) -> None:
    """The pilot's half of the sandbox; the helper (as the target) makes the rest.

    The spec and the "started" FIFO live in the pilot's workdir, which the
    target cannot write, under unguessable names (the workdir is not listable
    by others); nothing the payload can create decides the wrapper's verdict.
    """
    sb.check_workdir(workdir, target_uid=job.run_as.uid)
    os.mkdir(job.job_dir, 0o700)
    fd = os.open(job.job_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        sb.add_acl_user(fd, job.run_as.uid, read=True, write=True, execute=True)
    finally:
        os.close(fd)
    token = secrets.token_hex(16)
    job.started_path = workdir / f".started-{job.job_id}-{token}"
    os.mkfifo(job.started_path, 0o600)
    job.started_fd = os.open(job.started_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISFIFO(os.fstat(job.started_fd).st_mode):
        raise WrapperSystemError(f"{job.started_path} is not the FIFO the wrapper made")
    sb.add_acl_user(job.started_fd, job.run_as.uid, read=False, write=True, execute=False)
    spec = {
        "job_dir": str(job.job_dir),
        "proxy_pem": pem.decode("ascii"),
        "egg_cache": str(job.egg_cache),
        "started": str(job.started_path),
        "env": job.env,
        "argv": list(job.command),
        "umask": job.settings.umask,
    }
    job.spec_path = workdir / f".spec-{job.job_id}-{token}.json"
    fd = os.open(job.spec_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, json.dumps(spec).encode())
        sb.add_acl_user(fd, job.run_as.uid, read=True, write=False, execute=False)
    finally:
        os.close(fd)


def _helper_started(job: PreparedJob) -> tuple[bool, tuple[int, str] | None]:
    """Whether the sudo helper wrote its line before exec, and why exec failed if it says so.

    Read once, after the payload's exit. The "exec-failed" line is believed only when the
    payload's status is the code it names (see :func:`_interpret`).
    """
    if job.started_fd < 0:
        return False, None
    try:
        first = os.read(job.started_fd, len(STARTED_LINE))
    except BlockingIOError:
        first = b""
    if first != STARTED_LINE:
        return False, None
    try:
        rest = os.read(job.started_fd, 512).decode("utf-8", "replace")
    except BlockingIOError:
        rest = ""
    word, _, tail = rest.partition(" ")
    code, _, why = tail.partition(" ")
    if word == EXEC_FAILED_WORD and code in ("126", "127"):
        return True, (int(code), why.splitlines()[0] if why else "")
    return True, None


def exec_failure_message(job: PreparedJob, why: str) -> str:
    """One sentence for a payload that could not be started as the mapped account."""
    shown = job.shown_command or (job.command[0] if job.command else "?")
    return f"the mapped account {job.run_as.name} cannot execute {shown}: {why}"


# --------------------------------------------------------------------------- refresh


def refresh_proxy(job: PreparedJob, new_pem: bytes, *, now: datetime | None = None) -> None:
    """Replace the payload's proxy copy atomically (the payload sees old or new, never torn).

    The new proxy must verify and belong to the same DN as the job's.
    """
    now = now or datetime.now(UTC)
    identity = _verify_pem(new_pem, job.settings, now=now, fqans_needed=False)
    if identity.dn != job.identity.dn:
        raise ClientError(
            f"the new proxy belongs to {identity.dn}, but the job runs for {job.identity.dn}; "
            "refresh with a proxy of the job's owner",
            reason="wrong_identity",
        )
    with job._lock:
        if job.finished:
            raise ClientError("the job has finished; there is no proxy copy to refresh")
        if job.sandbox is not None:
            job.sandbox.replace_proxy(new_pem)
            return
        staging = job.job_dir / f".refresh-{secrets.token_hex(8)}"
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, new_pem)
            sb.add_acl_user(fd, job.run_as.uid, read=True, write=False, execute=False)
        finally:
            os.close(fd)
        try:
            _sudo_helper(job, "refresh", str(job.job_dir / "proxy"), str(staging))
        finally:
            with contextlib.suppress(OSError):
                os.unlink(staging)


def _sudo_helper(job: PreparedJob, *args: str) -> None:
    argv = sudo_argv(job.settings.sudo, job.settings.sudo_helper, job.run_as.name, *args)
    done = subprocess.run(argv, env={"PATH": job.settings.path}, cwd="/", check=False, timeout=120)
    if done.returncode != 0:
        raise WrapperSystemError(
            f"the sudo helper ({' '.join(args[:1])}) failed with status {done.returncode}; check "
            "the sudoers rule in docs/payload-wrapper.md"
        )


# --------------------------------------------------------------------------- execute


def _heartbeat(job: PreparedJob) -> None:
    if job.mapping is None or job.mapping.lease is None or job.settings.gridmapdir is None:
        return
    with contextlib.suppress(OSError):
        GridmapDir(job.settings.gridmapdir, expiry=job.settings.lease_expiry).touch(
            job.mapping.lease, time.time()
        )


def execute(job: PreparedJob) -> int:
    """Steps 5-7: switch, run, track, clean up, audit. Returns the exit code; never raises."""
    if not _RUN_LOCK.acquire(blocking=False):
        say("another payload is already running in this process; one job per process")
        return EXIT_SYSTEM
    try:
        return _execute(job)
    finally:
        _RUN_LOCK.release()


def _execute(job: PreparedJob) -> int:
    s = job.settings
    if s.mode == "none":
        say(
            f"MODE NONE: the payload runs UNSWITCHED as {job.run_as.name} (uid {job.run_as.uid}); "
            f"the mapping would have chosen "
            f"{job.mapping.account.name if job.mapping else 'no account'} - logging only"
        )
    spec = LaunchSpec(
        job.command, job.env, job.job_dir, s.umask, job.run_as if s.mode == "setuid" else None
    )
    result: RunResult | None = None
    code = EXIT_SYSTEM
    reason: str | None = None
    sudo_prefix = None
    remote_kill = None
    switched = s.mode != "none"
    uid_wide = job.containment == "uid"
    if s.mode == "sudo":
        assert job.spec_path is not None
        sudo_prefix = sudo_argv(s.sudo, s.sudo_helper, job.run_as.name, "run", str(job.spec_path))
        me = str(os.getpid())

        def remote_kill() -> None:
            with contextlib.suppress(WrapperError, OSError, subprocess.SubprocessError):
                _sudo_helper(job, "killall" if uid_wide else "kill", *([] if uid_wide else [me]))

    def kill_uid() -> int:
        # Decided after the payload's exit: only when no other job holds the account now.
        lock = job.uid_lock
        if uid_wide or (s.kill_all_target_processes and lock is not None and lock.sole_holder()):
            return kill_uid_processes(job.run_as.uid, job.run_as.gid)
        return 0

    cgroup: JobCgroup | None = None
    try:
        if job.containment == "cgroup":
            cgroup = JobCgroup.create(cgroup_parent(s.cgroup_parent))
            job.audit.extra["cgroup"] = str(cgroup.path)
        if s.mode == "setuid":
            note = sb.claim_default_proxy_path(job.run_as.uid, job.run_as.gid)
            if note:
                job.audit.extra["planted"] = note
        _heartbeat(job)
        result = run_tracked(
            spec,
            mode=s.mode,
            timeout=s.payload_timeout,
            grace=s.kill_grace,
            heartbeat=lambda: _heartbeat(job),
            heartbeat_every=min(300.0, s.lease_expiry / 4),
            sudo_prefix=sudo_prefix,
            kill_uid=kill_uid if s.mode == "setuid" else None,
            remote_kill=remote_kill,
            cgroup=cgroup,
            reap_uid=job.run_as.uid if s.mode == "setuid" else None,
        )
        code, reason = _interpret(job, result)
    except BrokerError as exc:
        code, reason = exit_code_for(exc), exc.message
    except Exception as exc:  # never a traceback: the audit line and the epilogue must follow
        code, reason = EXIT_SYSTEM, f"running the payload failed: {exc}"
    finally:
        reason = _clean_up_after_run(job, cgroup, reason, switched=switched)
    if reason:
        say(reason)
    job.audit.end = datetime.now(UTC)
    job.audit.exit = code
    job.audit.payload_exit = result.returncode if result else None
    job.audit.leftovers = result.leftovers if result else 0
    job.audit.reason = reason
    _audit(job.settings, job.audit)
    return code


def _clean_up_after_run(
    job: PreparedJob, cgroup: JobCgroup | None, reason: str | None, *, switched: bool
) -> str | None:
    """After the payload (or a failure to run it): empty and remove its cgroup, finish the
    job directory, free the account; returns the reason with any cleanup problem added."""
    problems = [reason] if reason else []
    if cgroup is not None:
        try:
            cgroup.kill()  # again: nothing may outlive the job, even after an error
            cgroup.remove()
        except (BrokerError, OSError) as exc:
            problems.append(f"cleaning up the job's cgroup failed: {exc}")
    _heartbeat(job)
    finished = _finish(job, "; ".join(problems) or None)
    if switched and job.uid_lock is not None:
        if job.uid_lock.sole_holder():
            # The account is nobody else's now: a proxy left at the default path must
            # not reach whoever is mapped to it next.
            sb.remove_default_proxy_path(job.run_as.uid)
        job.uid_lock.release()
    return finished


def _interpret(job: PreparedJob, result: RunResult) -> tuple[int, str | None]:
    if result.returncode is None:
        return (
            result.exit_code_hint or EXIT_SYSTEM,
            exec_failure_message(job, result.exec_error or "exec failed"),
        )
    if job.settings.mode == "sudo":
        started, failed = _helper_started(job)
        if not started:
            return EXIT_SYSTEM, (
                f"sudo or the helper failed before the payload started (status "
                f"{result.returncode}); check the sudoers rule in docs/payload-wrapper.md"
            )
        if failed is not None and failed[0] == result.returncode:
            return failed[0], exec_failure_message(job, failed[1])
    if result.timed_out:
        return EXIT_TIMEOUT, (
            f"the payload ran longer than its time limit of {job.settings.payload_timeout:g} s "
            "and was killed"
        )
    code = payload_exit_code(result.returncode)
    if code != result.returncode and result.returncode > 0:
        return code, f"the payload itself exited with {result.returncode}, reported as {code}"
    return code, None


def _finish(job: PreparedJob, reason: str | None) -> str | None:
    """Epilogue, proxy removal, output access; problems are appended to ``reason``.

    Each step runs whatever happened in the one before; the epilogue always runs.
    """
    problems = [reason] if reason else []
    s = job.settings
    with job._lock:
        job.finished = True
        try:
            if job.sandbox is not None:
                job.sandbox.remove_proxy()
                job.sandbox.remove_egg_cache()
                job.sandbox.close()
                if job.pilot_uid is not None:
                    granted = sb.grant_read(
                        job.job_dir, pilot_uid=job.pilot_uid, owner_uid=job.run_as.uid
                    )
                    if granted.limited:
                        problems.append(
                            f"outputs were made readable only in part: the job directory has "
                            f"{granted.limited}"
                        )
            elif s.mode == "sudo":
                pilot = job.pilot_uid if job.pilot_uid is not None else os.getuid()
                _sudo_helper(job, "finish", str(job.job_dir), str(pilot), str(job.egg_cache))
        except Exception as exc:
            problems.append(f"cleaning up the job directory failed: {exc}")
        finally:
            _remove_sudo_files(job)
    if s.epilogue:
        env = {
            "PATH": s.path,
            "PAYLOAD_WRAPPER_JOB_ID": job.job_id,
            "PAYLOAD_WRAPPER_JOB_DIR": str(job.job_dir),
            "PAYLOAD_WRAPPER_ACCOUNT": job.run_as.name,
            "PAYLOAD_WRAPPER_DN": job.identity.dn,
        }
        status, problem = run_epilogue(s.epilogue, env=env, timeout=s.epilogue_timeout)
        if problem:
            problems.append(problem)
        elif status:
            problems.append(f"the epilogue {s.epilogue[0]} exited with {status}")
    return "; ".join(problems) or None


def _remove_sudo_files(job: PreparedJob) -> None:
    """Remove the sudo mode's spec file and FIFO and close the FIFO's read end (call under
    the job's lock; what was never made is skipped)."""
    for leftover in (job.spec_path, job.started_path):
        if leftover is not None:
            with contextlib.suppress(OSError):
                leftover.unlink()
    if job.started_fd >= 0:
        os.close(job.started_fd)
        job.started_fd = -1


def abandon(job: PreparedJob, exc: BrokerError) -> int:
    """Give up a prepared job that will not run (e.g. its inputs could not be staged).

    Removes what :func:`prepare` made for the payload (proxy copy, egg cache, sudo
    spec and FIFO), releases the account, audits the refusal; returns the exit code.
    """
    code = exit_code_for(exc)
    with job._lock:
        job.finished = True
        if job.sandbox is not None:
            with contextlib.suppress(OSError):
                job.sandbox.remove_proxy()
            job.sandbox.remove_egg_cache()
            job.sandbox.close()
        _remove_sudo_files(job)
    if job.uid_lock is not None:
        job.uid_lock.release()
    say(f"the payload was not started: {exc.message}")
    job.audit.end, job.audit.exit, job.audit.reason = datetime.now(UTC), code, exc.message
    _audit(job.settings, job.audit)
    return code


def _audit(settings: WrapperSettings, record: AuditRecord) -> None:
    if settings.audit_log is None:
        return
    try:
        write_audit(settings.audit_log, record)
    except WrapperError as exc:
        say(exc.message)


# --------------------------------------------------------------------------- all in one


def run_payload(
    settings: WrapperSettings,
    proxy_pem_path: str | os.PathLike[str],
    command: Sequence[str],
    *,
    job_id: str | None = None,
    now: datetime | None = None,
    caller_env: Mapping[str, str] | None = None,
) -> int:
    """Prepare and execute one payload; returns the wrapper's exit code, never raises."""
    start = now or datetime.now(UTC)
    try:
        job = prepare(
            settings, proxy_pem_path, command, job_id=job_id, now=start, caller_env=caller_env
        )
    except BrokerError as exc:
        return _refused(settings, exc, job_id=job_id, start=start)
    except OSError as exc:
        return _refused(
            settings,
            WrapperSystemError(f"preparing the job failed: {exc}"),
            job_id=job_id,
            start=start,
        )
    return execute(job)


def _refused(
    settings: WrapperSettings, exc: BrokerError, *, job_id: str | None, start: datetime
) -> int:
    code = exit_code_for(exc)
    say(f"the payload was not started: {exc.message}")
    record = getattr(exc, "audit", None)
    if not isinstance(record, AuditRecord):
        record = AuditRecord(
            job_id=job_id or "-", mode=settings.mode, start=start, caller_uid=os.getuid()
        )
    record.end, record.exit, record.reason = datetime.now(UTC), code, exc.message
    _audit(settings, record)
    return code
