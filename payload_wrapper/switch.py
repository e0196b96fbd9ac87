"""Start the payload under the target identity, track it, and clean up after it.

Modes
-----
* ``setuid``: the wrapper runs as root; ``subprocess.Popen(user=, group=,
  extra_groups=)`` does setgroups/setgid/setuid in the child, and a check in
  the child (after the switch, before exec) confirms that real, effective and
  saved ids are the target's and that ``setuid(0)`` now fails. If not, the
  payload never runs (202).
* ``sudo``: the wrapper runs as the unprivileged pilot and starts
  ``sudo -n -u TARGET -- <helper> helper run <spec>``; the helper (this module,
  :func:`helper_main`) checks it is not root, builds the sandbox entries the
  target must own and ``execve``s the payload. Everything travels as argv
  elements or in a JSON spec file; no shell ever parses a value.
* ``none``: no switch, same environment rebuild; loudly announced.

Tracking
--------
The job's processes are contained by the mechanism :mod:`payload_wrapper.containment`
describes (a cgroup v2 per job, a uid-wide ``kill(-1)`` for an account the job has to
itself, or the ``/proc`` scan below); :func:`run_tracked` takes what the caller chose.

The wrapper also makes itself a *child subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``)
before starting the payload. An orphaned process is then re-parented to the
wrapper rather than to init, so a payload that double-forks and calls
``setsid`` (leaving the process group and the session) still descends from the
wrapper, and its zombies are reaped while the payload runs. After the payload
exits (or times out) the wrapper kills the cgroup, then scans ``/proc``,
signals every descendant (SIGTERM, then SIGKILL after a grace period, repeated
until nothing is left) and reaps them. A scan alone can miss a process that
changes its pid between the listing and the kill, which is why it is only the
last line of defence (containment ``session``).

A consequence: one process runs one job at a time (the CLI, or one
``broker-pilot`` per job), since every descendant counts as part of the job.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from payload_wrapper.containment import JobCgroup
from payload_wrapper.containment import kill_uid as kill_uid_processes
from payload_wrapper.errors import (
    EXIT_EXEC_FAILED,
    EXIT_NOT_FOUND,
    EXIT_SYSTEM,
    WrapperSystemError,
)
from payload_wrapper.mapping import Account

__all__ = [
    "EXEC_FAILED_WORD",
    "FORWARDED_SIGNALS",
    "STARTED_LINE",
    "LaunchSpec",
    "ProcInfo",
    "RunResult",
    "descendants",
    "helper_main",
    "kill_job_processes",
    "run_epilogue",
    "run_tracked",
    "scan_processes",
    "subreaper",
    "sudo_argv",
]

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37
_KILL_ROUNDS = 50
STARTED_LINE = b"started\n"  # the sudo helper's word that exec follows
EXEC_FAILED_WORD = "exec-failed"  # its second line when exec failed: "exec-failed CODE WHY"
_REAP_EVERY = 0.25  # seconds between reaping the job's orphaned zombies


# --------------------------------------------------------------------------- /proc


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str
    uid: int

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X")


def _read_proc(pid: int) -> ProcInfo | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read().decode("ascii", "replace")
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None
    # The command name may contain spaces and parentheses; fields follow the last ')'.
    fields = raw[raw.rfind(")") + 2 :].split()
    if len(fields) < 4:
        return None
    return ProcInfo(pid, int(fields[1]), int(fields[2]), int(fields[3]), fields[0], uid)


def scan_processes() -> list[ProcInfo]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = _read_proc(int(name))
            if info is not None:
                out.append(info)
    return out


def descendants(ancestor: int, procs: Sequence[ProcInfo]) -> list[ProcInfo]:
    """Every process below ``ancestor`` in the parent tree."""
    children: dict[int, list[ProcInfo]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    found: list[ProcInfo] = []
    stack = [ancestor]
    while stack:
        for child in children.get(stack.pop(), []):
            if child.pid != ancestor:
                found.append(child)
                stack.append(child.pid)
    return found


def _job_processes(
    *, root: int, pgid: int | None, uid: int | None, exclude: set[int]
) -> list[ProcInfo]:
    procs = scan_processes()
    chosen = {p.pid: p for p in descendants(root, procs)}
    for p in procs:
        if (pgid is not None and p.pgid == pgid) or (uid is not None and p.uid == uid):
            chosen[p.pid] = p
    return [p for pid, p in chosen.items() if pid not in exclude and pid != root]


def kill_job_processes(
    *,
    root: int | None = None,
    pgid: int | None = None,
    uid: int | None = None,
    grace: float = 2.0,
    exclude: Sequence[int] = (),
) -> int:
    """SIGTERM, then SIGKILL, every process of the job until none is left; returns how many.

    The job is: the descendants of ``root`` (default: this process), the
    process group ``pgid``, and, when ``uid`` is given, every process of that
    uid. Zombies among our own children are reaped.
    """
    root = os.getpid() if root is None else root
    skip = {os.getpid(), *exclude}
    if uid == 0:
        raise WrapperSystemError("refusing to kill every process of uid 0")
    seen: set[int] = set()  # every pid found (zombies included), to reap
    killed: set[int] = set()  # the live ones that were signalled

    def round_(sig: int) -> int:
        alive = 0
        for p in _job_processes(root=root, pgid=pgid, uid=uid, exclude=skip):
            seen.add(p.pid)
            if p.alive:
                alive += 1
                killed.add(p.pid)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p.pid, sig)
        _reap(seen)
        return alive

    if round_(signal.SIGTERM):
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            time.sleep(0.02)
            _reap(seen)
            if not any(
                p.alive for p in _job_processes(root=root, pgid=pgid, uid=uid, exclude=skip)
            ):
                break
        for _ in range(_KILL_ROUNDS):
            if not round_(signal.SIGKILL):
                break
            time.sleep(0.01)
        else:
            raise WrapperSystemError(
                "processes of the job survived repeated SIGKILL; check the node (D-state "
                "processes on a hung filesystem?)"
            )
    _reap(seen)
    return len(killed)


def _reap(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


# --------------------------------------------------------------------------- subreaper


def _prctl(option: int, value: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0))


@contextlib.contextmanager
def subreaper() -> Iterator[None]:
    """Make this process the reaper of its orphaned descendants for the duration."""
    previous = ctypes.c_int(0)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(previous), 0, 0, 0)
    if _prctl(_PR_SET_CHILD_SUBREAPER, 1) != 0:
        raise WrapperSystemError(
            "cannot become a child subreaper (prctl failed); processes of the job could not "
            "be tracked, so the payload is not started"
        )
    try:
        yield
    finally:
        _prctl(_PR_SET_CHILD_SUBREAPER, previous.value)


# --------------------------------------------------------------------------- launching


@dataclass(frozen=True)
class LaunchSpec:
    """What to start: argv (no shell), the complete environment, cwd, umask, identity."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: Path
    umask: int
    account: Account | None  # None: no switch


@dataclass(frozen=True)
class RunResult:
    returncode: int | None  # None: the payload never started (exec failed)
    timed_out: bool
    exec_error: str | None = None  # why exec failed (strerror)
    exit_code_hint: int | None = None  # 126/127 when exec failed
    leftovers: int = 0  # processes killed after the payload's exit


def _verify_switched(account: Account) -> Callable[[], None]:
    """A check run in the child after the switch and before exec."""
    uid, gid, groups = account.uid, account.gid, set(account.groups)

    def check() -> None:
        if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
            raise RuntimeError("ids after the switch are not the target's")
        if set(os.getgroups()) - {gid} != groups:
            raise RuntimeError("supplementary groups after the switch are not the target's")
        try:
            os.setuid(0)
        except PermissionError:
            return
        raise RuntimeError("setuid(0) succeeded after the switch")

    return check


def sudo_argv(sudo: str, helper: str, account: str, *args: str) -> list[str]:
    """``sudo -n -u ACCOUNT -- HELPER helper ARGS...`` as a list; nothing is ever joined."""
    return [sudo, "-n", "-u", account, "--", helper, "helper", *args]


def _in_child(account: Account | None, cgroup: JobCgroup | None) -> Callable[[], None] | None:
    """What the child runs after the switch and before exec: join the cgroup, verify ids."""
    verify = _verify_switched(account) if account is not None else None
    if verify is None and cgroup is None:
        return None

    def run() -> None:
        if cgroup is not None:
            cgroup.enter()  # through the descriptor root opened: allowed after the switch
        if verify is not None:
            verify()

    return run


def _start(
    spec: LaunchSpec,
    mode: str,
    sudo_prefix: Sequence[str] | None,
    cgroup: JobCgroup | None = None,
) -> subprocess.Popen[bytes]:
    if mode == "setuid":
        assert spec.account is not None
        return subprocess.Popen(
            list(spec.argv),
            env=dict(spec.env),
            cwd=spec.cwd,
            umask=spec.umask,
            user=spec.account.uid,
            group=spec.account.gid,
            extra_groups=list(spec.account.groups),
            preexec_fn=_in_child(spec.account, cgroup),  # runs after the switch
            start_new_session=True,
            close_fds=True,
        )
    if mode == "sudo":
        assert sudo_prefix is not None
        # sudo resets the environment anyway; the payload's travels in the spec file.
        return subprocess.Popen(
            list(sudo_prefix),
            env={"PATH": spec.env["PATH"]},
            cwd="/",
            umask=spec.umask,
            start_new_session=True,
            close_fds=True,
        )
    return subprocess.Popen(
        list(spec.argv),
        env=dict(spec.env),
        cwd=spec.cwd,
        umask=spec.umask,
        start_new_session=True,
        close_fds=True,
        preexec_fn=_in_child(None, cgroup),
    )


@contextlib.contextmanager
def _forward_signals(target: Callable[[int], None]) -> Iterator[None]:
    """Forward SIGTERM/SIGINT/SIGHUP to the payload (only possible in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        target(signum)

    previous = {s: signal.signal(s, handler) for s in FORWARDED_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def run_tracked(
    spec: LaunchSpec,
    *,
    mode: str,
    timeout: float | None,
    grace: float,
    heartbeat: Callable[[], None] | None = None,
    heartbeat_every: float = 300.0,
    sudo_prefix: Sequence[str] | None = None,
    kill_uid: Callable[[], int] | None = None,
    remote_kill: Callable[[], None] | None = None,
    cgroup: JobCgroup | None = None,
    reap_uid: int | None = None,
) -> RunResult:
    """Start the payload, wait for it (forwarding signals), then kill what it left behind.

    ``cgroup``: the payload joins it before exec and everything in it is killed
    with ``cgroup.kill`` afterwards. ``kill_uid``: called afterwards to kill every
    process of the target uid when that is safe (it decides; returns how many).
    ``reap_uid``: zombies of that uid re-parented to us are reaped while the
    payload runs, so a payload forking in a loop cannot fill the pid table.
    """
    with subreaper():
        try:
            proc = _start(spec, mode, sudo_prefix, cgroup)
        except subprocess.SubprocessError as exc:
            raise WrapperSystemError(
                f"the identity switch to {spec.account.name if spec.account else '?'} (or "
                f"joining the job's cgroup) could not be verified ({exc}); the payload was "
                "not started"
            ) from exc
        except FileNotFoundError as exc:
            return RunResult(
                None, False, exc.strerror or "No such file or directory", EXIT_NOT_FOUND
            )
        except OSError as exc:
            return RunResult(None, False, exc.strerror or str(exc), EXIT_EXEC_FAILED)
        pgid = proc.pid  # start_new_session: the payload leads its own group

        def forward(signum: int) -> None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signum)

        timed_out = False
        with _forward_signals(forward):
            timed_out = _wait(proc, timeout, heartbeat, heartbeat_every, reap_uid)
            if timed_out:
                forward(signal.SIGTERM)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    forward(signal.SIGKILL)
            returncode = proc.wait()
        leftovers = 0
        if cgroup is not None:
            leftovers += cgroup.kill(timeout=max(10.0, 5 * grace))
        if remote_kill is not None:
            remote_kill()
        if kill_uid is not None:
            leftovers += kill_uid()
        # Descendants and the process group (all that is left without a cgroup); reaps zombies.
        leftovers += kill_job_processes(pgid=pgid, uid=None, grace=grace)
    return RunResult(returncode, timed_out, leftovers=leftovers)


def _reap_orphans(exclude: int, uid: int) -> None:
    """Reap zombie children of ``uid`` (orphans of the job re-parented to us), except one."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/children", "rb") as handle:
                pids = [int(x) for x in handle.read().split()]
        except (OSError, ValueError):
            continue
        for pid in pids:
            if pid == exclude:
                continue
            info = _read_proc(pid)
            if info is None or info.alive:
                continue
            try:
                with open(f"/proc/{pid}/status", "rb") as handle:
                    real_uid = next(
                        int(line.split()[1]) for line in handle if line.startswith(b"Uid:")
                    )
            except (OSError, StopIteration, ValueError):
                continue
            if real_uid == uid:
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(pid, os.WNOHANG)


def _wait(
    proc: subprocess.Popen[bytes],
    timeout: float | None,
    heartbeat: Callable[[], None] | None,
    every: float,
    reap_uid: int | None = None,
) -> bool:
    """Wait for ``proc`` through a pidfd (no polling latency); True when it timed out."""
    pidfd = os.pidfd_open(proc.pid)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        start = time.monotonic()
        next_beat = start + every
        while True:
            now = time.monotonic()
            limit = next_beat - now
            if timeout is not None:
                limit = min(limit, start + timeout - now)
            if reap_uid is not None:
                limit = min(limit, _REAP_EVERY)
            if poller.poll(max(0, int(limit * 1000) + 1)):
                return False
            if reap_uid is not None:
                _reap_orphans(proc.pid, reap_uid)
            now = time.monotonic()
            if timeout is not None and now - start >= timeout:
                return True
            if now >= next_beat:
                next_beat = now + every
                if heartbeat is not None:
                    heartbeat()
    finally:
        os.close(pidfd)


def run_epilogue(
    argv: Sequence[str], *, env: Mapping[str, str], timeout: float
) -> tuple[int | None, str | None]:
    """Run the trusted epilogue with the wrapper's identity; (exit code, problem)."""
    try:
        proc = subprocess.Popen(list(argv), env=dict(env), cwd="/", start_new_session=True)
    except OSError as exc:
        return None, f"the epilogue {argv[0]} could not be started: {exc.strerror}"
    try:
        return proc.wait(timeout), None
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None, f"the epilogue {argv[0]} ran longer than {timeout:g} s and was killed"


# --------------------------------------------------------------------------- sudo helper


def _helper_fail(message: str, code: int = EXIT_SYSTEM) -> int:
    sys.stderr.write(f"payload-wrapper helper: {message}\n")
    return code


def _assert_unprivileged() -> None:
    if os.geteuid() == 0 or os.getuid() == 0:
        raise WrapperSystemError("the helper runs as the target account and refuses to run as root")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise WrapperSystemError("the helper could regain root; refusing to continue")


def helper_main(argv: Sequence[str]) -> int:
    """Entry of ``payload-wrapper helper ...``, run by sudo as the target account.

    ``run SPEC``      create HOME/TMPDIR/proxy/egg cache from the JSON spec and exec the payload
    ``kill PID``      kill this account's processes that descend from the wrapper PID
    ``killall``       kill every process of this account (containment uid only)
    ``finish DIR UID EGG``  remove DIR/proxy/x509up and the egg cache EGG, then give
                      UID read access to the outputs below DIR
    ``refresh DIR FILE``  replace DIR/x509up with the content of FILE
    """
    from payload_wrapper import sandbox  # here: the helper needs little else

    try:
        _assert_unprivileged()
        if len(argv) == 2 and argv[0] == "run":
            return _helper_run(Path(argv[1]))
        if len(argv) == 2 and argv[0] == "kill":
            kill_job_processes(root=int(argv[1]), uid=None, grace=1.0, exclude=[os.getppid()])
            return 0
        if len(argv) == 1 and argv[0] == "killall":
            # Only asked for when the account belongs to this job alone (containment uid).
            kill_uid_processes(os.getuid(), os.getgid())
            return 0
        if len(argv) == 4 and argv[0] == "finish":
            job_dir = Path(argv[1])
            with contextlib.suppress(FileNotFoundError):
                os.unlink(job_dir / "proxy" / sandbox.PROXY_NAME)
            egg = Path(argv[3])
            if egg.parent == sandbox.EGG_ROOT and egg.name.startswith("payload-eggs-"):
                shutil.rmtree(egg, ignore_errors=True)
            sandbox.grant_read(job_dir, pilot_uid=int(argv[2]), owner_uid=os.getuid())
            return 0
        if len(argv) == 3 and argv[0] == "refresh":
            pem = Path(argv[2]).read_bytes()
            fd = os.open(argv[1], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                sandbox.install_proxy(fd, pem, uid=os.getuid(), gid=os.getgid(), replace=True)
            finally:
                os.close(fd)
            return 0
    except (WrapperSystemError, OSError, ValueError) as exc:
        return _helper_fail(str(exc))
    return _helper_fail(f"unknown helper command {list(argv)!r}", 2)


def _helper_run(spec_path: Path) -> int:
    from payload_wrapper import sandbox

    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    job_dir = Path(spec["job_dir"])
    fd = os.open(job_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for sub in ("home", "tmp", "proxy"):
            os.mkdir(sub, 0o700, dir_fd=fd)
        pfd = os.open("proxy", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        try:
            sandbox.install_proxy(
                pfd, spec["proxy_pem"].encode(), uid=os.getuid(), gid=os.getgid(), replace=False
            )
        finally:
            os.close(pfd)
    finally:
        os.close(fd)
    sandbox.create_egg_cache(Path(spec["egg_cache"]), os.getuid(), os.getgid())
    sandbox.claim_default_proxy_path(os.getuid(), os.getgid())
    env = {str(k): str(v) for k, v in spec["env"].items()}
    argv = [str(a) for a in spec["argv"]]
    os.umask(int(spec["umask"]))
    os.chdir(job_dir)
    # Tell the wrapper the set-up is done and exec follows: one line into the FIFO
    # the wrapper created (in its own directory) and reads after the payload's exit.
    # Only the first line counts, and nothing of the payload exists before this write,
    # so no file or message of the payload can change the wrapper's verdict.
    # The descriptor stays open (close-on-exec) so that a failed exec can say why on a
    # second line; a successful exec closes it.
    started = os.open(spec["started"], os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        os.write(started, STARTED_LINE)
        try:
            os.execvpe(argv[0], argv, env)  # noqa: S606 - argv list, no shell
        except OSError as exc:
            code = EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_EXEC_FAILED
            why = (exc.strerror or str(exc)).replace("\n", " ")[:200]
            with contextlib.suppress(OSError):
                os.write(started, f"{EXEC_FAILED_WORD} {code} {why}\n".encode())
            return _helper_fail(f"{argv[0]}: cannot execute ({why})", code)
    finally:
        os.close(started)
    return EXIT_EXEC_FAILED  # pragma: no cover - execvpe returns only by raising
