"""``broker-pilot``: HTCondor's USER_JOB_WRAPPER on a pilot node.

The starter runs ``broker-pilot <Cmd> <args...>`` with ``$_CONDOR_JOB_AD`` set;
by hand it is ``broker-pilot [--job-ad FILE] [--config FILE] -- CMD ARGS...``.
``broker-pilot --fill-rsa-pool N`` adds N pre-generated RSA keys to the pool.

For one job, in order, failing closed at every step before the payload starts:

1. read the pilot configuration and the job ad;
2. check the owner DN against ``allowed_owners`` (DN globs / ``re:``);
3. take a key (EC P-256 by default, or a pre-generated RSA key from the pool)
   and retrieve a proxy of the owner's credential bound to the job id (and,
   with ``bind_submitter``, to the ad's ``Owner`` as the credential's username);
4. with only ``fqan:`` entries left to decide, verify the proxy's VOMS
   attributes against the vomsdir and match them;
5. write the proxy 0600 into a private directory and hand it to the payload
   wrapper's :func:`~payload_wrapper.api.prepare`; the pilot's copy is removed
   as soon as the wrapper holds its own target-owned copy;
   Under the starter, the job's transferred files are copied from the scratch
   directory into the job directory for the mapped account (:mod:`payload_wrapper.staging`);
6. :func:`~payload_wrapper.api.execute` the payload while a background thread
   refreshes the proxy at ``refresh_fraction`` of its lifetime;
7. hand the outputs back into the scratch directory, owned by the slot user.

A failure before the payload starts is written to
``$_CONDOR_WRAPPER_ERROR_FILE`` (HTCondor puts it in the job's hold reason)
and on stderr, and the exit status follows the wrapper's codes: 201 the job's
or its owner's fault, 202 the node's or the broker's, 203 not allowed. So is
every later outcome that is not simply the payload's own exit status (126/127
when the mapped account cannot execute the command, 124, outputs not handed back).

The starter runs this as root in an environment the job controls, so the
entry point is the static launcher (:mod:`payload_wrapper.launcher`), which
refuses loader variables and starts ``python -I -m payload_wrapper.pilot``.
:func:`main` checks again: it refuses to run a job unless the interpreter is
isolated and the environment is free of loader variables, reads no
``PYTHON*``/``BROKER_*`` setting except a configuration path that names an
admin-owned file (:func:`~payload_wrapper.pilot_config.trusted_config_path`),
and under the starter takes every argument as the job's command, never as an
option. :func:`run` is the in-process path (tests, benchmarks).
"""

from __future__ import annotations

import abc
import contextlib
import functools
import os
import re
import secrets
import stat
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from broker.client import BrokerClient, ClientIdentity
from broker.condor.jobad import JobAd, read_job_ad
from broker.errors import BrokerError, NotFound, SystemFailure
from broker.fileio import make_private_dir, read_private_file, write_private_file
from broker.pki.dn import slash_from_name
from broker.pki.loading import Credential, credential_to_pem, key_to_pem, load_private_key
from broker.pki.proxy import generate_key, proxy_info
from broker.policy import FqanError, Subject, parse_fqan, parse_pattern
from payload_wrapper import staging
from payload_wrapper.api import PreparedJob, abandon, execute, prepare, refresh_proxy
from payload_wrapper.environment import RESERVED_NAMES, is_refused
from payload_wrapper.errors import (
    EXIT_CLIENT,
    EXIT_SYSTEM,
    AuthorizationDenied,
    WrapperSystemError,
    exit_code_for,
)
from payload_wrapper.pilot_config import PilotConfig, load_pilot_config
from payload_wrapper.tokenfile import TokenFile, place_token

__all__ = [
    "KeySource",
    "Pilot",
    "StartedJob",
    "fill_rsa_pool",
    "main",
    "owner_allowed_by_dn",
    "owner_allowed_by_fqans",
    "unsafe_variables",
]

#: Prefixes of names that make the dynamic loader, glibc or OpenSSL load code or data
#: from a path of the caller's choosing; the launcher refuses the same ones.
UNSAFE_PREFIXES = ("LD_", "MALLOC_", "GLIBC_", "GCONV_", "OPENSSL_", "DYLD_", "_RLD")
UNSAFE_NAMES = frozenset(
    {
        "GETCONF_DIR",
        "HOSTALIASES",
        "LOCALDOMAIN",
        "LOCPATH",
        "NIS_PATH",
        "NLSPATH",
        "RESOLV_HOST_CONF",
        "RES_OPTIONS",
        "TZDIR",
        "SSLKEYLOGFILE",
        "KRB5_CONFIG",
    }
)

#: Names the launcher removes (not refuses) and main() removes again: OpenSSL would
#: trust the job's CA file, glibc would read the job's zone file, tempfile would
#: write into the job's directory. The payload gets its own values from the job ad.
DROPPED_NAMES = ("TMPDIR", "TMP", "TEMP", "SSL_CERT_FILE", "SSL_CERT_DIR", "CTLOG_FILE", "TZ")

#: Variables from the starter that the payload may still find useful.
STARTER_NAMES = (
    "_CONDOR_SCRATCH_DIR",
    "_CONDOR_JOB_IWD",
    "_CONDOR_SLOT",
    "_CONDOR_JOB_AD",
    "_CONDOR_MACHINE_AD",
)
#: What the payload sees as these when the job's files were copied: its job directory.
_SCRATCH_NAMES = ("_CONDOR_SCRATCH_DIR", "_CONDOR_JOB_IWD")
_CREDENTIAL_PREFIXES = ("X509_", "BEARER_TOKEN", "_CONDOR_")
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._@+-]")


def say(message: str) -> None:
    sys.stderr.write(f"broker-pilot: {message}\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------- owners


@functools.lru_cache(maxsize=256)
def _matcher(text: str) -> Callable[[Subject], bool]:
    # The config loader admits only DN globs, re: and fqan: entries; a group
    # reference (which needs a policy file to resolve) never matches here.
    compiled = parse_pattern(text, context="owner")
    matches = getattr(compiled, "matches", None)
    if not callable(matches):
        return lambda _subject: False
    return lambda subject: bool(matches(subject))


def owner_allowed_by_dn(config: PilotConfig, dn: str) -> str | None:
    """The ``allowed_owners`` DN entry that admits ``dn``, or None."""
    subject = Subject(dn=dn)
    for text in config.dn_owners:
        if _matcher(text)(subject):
            return text
    return None


def owner_allowed_by_fqans(config: PilotConfig, dn: str, fqans: Sequence[str]) -> str | None:
    """The ``fqan:`` entry matched by one of the proxy's verified FQANs, or None."""
    parsed = []
    for fqan in fqans:
        with contextlib.suppress(FqanError, ValueError):
            parsed.append(parse_fqan(fqan))
    subject = Subject(dn=dn, fqans=tuple(parsed))
    for text in config.fqan_owners:
        if _matcher(text)(subject):
            return text
    return None


# --------------------------------------------------------------------------- keys


class KeySource:
    """Job keys: a pre-generated RSA key from the pool when there is one, else a fresh key.

    A pool key is claimed by renaming it to a private name first, so two pilots
    sharing the pool can never use the same key.
    """

    def __init__(self, key_type: str = "ec", pool_dir: Path | None = None) -> None:
        self.key_type = key_type
        self.pool_dir = pool_dir
        self.pool_empty_noted = False

    def take(self) -> Any:
        if self.pool_dir is not None:
            key = self._from_pool(self.pool_dir)
            if key is not None:
                return key
            if not self.pool_empty_noted:
                say(
                    f"the RSA key pool {self.pool_dir} is empty; generating a {self.key_type} "
                    "key (refill it with broker-pilot --fill-rsa-pool N)"
                )
                self.pool_empty_noted = True
        return generate_key(self.key_type)

    @staticmethod
    def _from_pool(pool: Path) -> Any:
        try:
            entries = os.scandir(pool)
        except OSError:
            return None
        with entries:
            for entry in entries:
                if not entry.name.endswith(".pem") or entry.name.startswith("."):
                    continue
                claimed = pool / f".claimed-{secrets.token_hex(8)}"
                try:
                    os.rename(pool / entry.name, claimed)
                except FileNotFoundError:
                    continue  # another pilot was faster
                try:
                    return load_private_key(read_private_file(claimed, require_owner=os.geteuid()))
                except BrokerError as exc:
                    say(f"skipping the unusable pool key {entry.name}: {exc.message}")
                finally:
                    with contextlib.suppress(OSError):
                        os.unlink(claimed)
        return None


def fill_rsa_pool(pool: Path, count: int, *, bits: int = 2048) -> int:
    """Add ``count`` RSA keys (0600) to ``pool`` (created 0700); returns how many were written."""
    make_private_dir(pool)
    for _ in range(count):
        key = generate_key("rsa", bits)
        write_private_file(pool / f"key-{secrets.token_hex(8)}.pem", key_to_pem(key))
    return count


# --------------------------------------------------------------------------- the job


@dataclass
class StartedJob:
    """A job whose proxy is in place and whose payload is ready to run."""

    ad: JobAd
    prepared: PreparedJob
    lifetime: float  # seconds of the proxy handed to the payload
    rule: str  # the allowed_owners entry that admitted the owner
    token: TokenFile | None = None  # the payload's BEARER_TOKEN_FILE (job_token_issuer)
    token_lifetime: float = 0.0
    scratch: Scratch | None = None  # the starter's scratch dir when the job's files are staged


@dataclass
class Scratch:
    """The starter's scratch directory (open) and what was copied from it into the job dir."""

    path: str
    fd: int
    slot_uid: int
    slot_gid: int
    inputs: dict[str, tuple[int, int, int]]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def starter_scratch(environ: Mapping[str, str]) -> tuple[int, os.stat_result] | None:
    """The scratch directory to stage through, or None (with a note) when there is none.

    Only the starter's layout qualifies: ``_CONDOR_SCRATCH_DIR`` is the working
    directory the pilot was started in (the starter's chdir, which the job cannot
    choose), it is not a link, nobody but its owner can write it, and as root it is
    not root's own (a slot user owns a real one).
    """
    path = environ.get("_CONDOR_SCRATCH_DIR")
    if not path or not os.path.isabs(path):
        return None
    fd, st = staging.open_scratch(path)
    try:
        here = os.stat(".")
    except OSError:
        here = None
    why = None
    if here is None or (here.st_dev, here.st_ino) != (st.st_dev, st.st_ino):
        why = "it is not the working directory the starter started the pilot in"
    elif os.geteuid() == 0 and st.st_uid == 0:
        why = "it belongs to root, not to a slot user"
    if why is not None:
        os.close(fd)
        say(f"not copying files between {_one_line(path)} and the job directory: {why}")
        return None
    return fd, st


def local_job_id(job_id: str) -> str:
    """A path-safe, unique name for the wrapper's job directory derived from the job id."""
    safe = _UNSAFE_ID_CHARS.sub("_", job_id).lstrip(".-")[:100] or "job"
    return f"{safe}.{secrets.token_hex(3)}"


def _identity_of(cred: Credential) -> str:
    for cert in cred.chain:
        if proxy_info(cert) is None:
            return slash_from_name(cert.subject)
    raise AuthorizationDenied("the broker returned a chain without an end-entity certificate")


class Pilot:
    """Everything broker-pilot does for one job, reusable in-process (see the benchmark)."""

    def __init__(
        self,
        config: PilotConfig,
        *,
        client: BrokerClient | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.config = config
        self.clock = clock
        self.keys = KeySource(config.key_type, config.rsa_pool_dir)
        self._client = client

    @property
    def client(self) -> BrokerClient:
        if self._client is None:
            cfg = self.config
            self._client = BrokerClient(
                cfg.broker_url,
                ClientIdentity(cert=cfg.cert, key=cfg.key),
                ca_dir=str(cfg.ca_dir),
                timeout=cfg.timeout_seconds,
                bearer_token_file=cfg.token_file,
            )
        return self._client

    # ----------------------------------------------------------------- retrieval

    def retrieve(self, ad: JobAd) -> tuple[Credential, dict[str, Any]]:
        """A fresh proxy of the job owner's credential, bound to the job id."""
        cfg = self.config
        lifetime = ad.lifetime_hours or cfg.lifetime_hours
        username = ad.submitter if cfg.bind_submitter else None
        if cfg.bind_submitter and not username:
            raise AuthorizationDenied(
                "the job ad has no Owner, so the credential cannot be bound to the submitter; "
                "set bind_submitter = false in the pilot configuration for hand-made ads",
                reason="no_submitter",
            )
        key = self.keys.take()
        for attempt in range(1, cfg.retrieve_attempts + 1):
            try:
                return self.client.retrieve(
                    username=username,
                    owner=ad.owner_dn,
                    name=ad.credential,
                    lifetime_hours=lifetime,
                    job_id=ad.job_id,
                    key=key,
                    key_type=cfg.key_type,
                )
            except SystemFailure as exc:
                if exc.reason != "unreachable" or attempt == cfg.retrieve_attempts:
                    raise
                say(f"{exc.message}; retrying in {cfg.retry_delay_seconds:g} s")
                time.sleep(cfg.retry_delay_seconds)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def job_token(self, ad: JobAd) -> tuple[str, float]:
        """An access token for the job from the owner's stored refresh token: (token, seconds
        it is valid). Asked with the job id, under the ad's Owner as username."""
        cfg = self.config
        if not ad.submitter:
            raise AuthorizationDenied(
                "the job ad has no Owner, so no job token can be asked "
                "for (the refresh token is stored under a username)",
                reason="no_submitter",
            )
        body: dict[str, Any] = {
            "issuer": cfg.job_token_issuer,
            "username": ad.submitter,
            "scopes": list(cfg.job_token_scopes),
            "job_id": ad.job_id,
        }
        if cfg.job_token_audience:
            body["audience"] = cfg.job_token_audience
        result = self.client.call("POST", "/v1/tokens/access", body)
        if not isinstance(result, dict) or result.get("owner") != ad.owner_dn:
            owner = result.get("owner") if isinstance(result, dict) else None
            raise AuthorizationDenied(
                f"the broker's job token belongs to {owner}, not to the job owner {ad.owner_dn}",
                reason="wrong_identity",
            )
        token = result.get("access_token")
        expires = result.get("expires_in")
        if not isinstance(token, str) or not isinstance(expires, int) or expires <= 0:
            raise AuthorizationDenied(
                "the broker's token answer has no usable access token", reason="bad_token"
            )
        return token, float(expires)

    def _explain(self, ad: JobAd, exc: BrokerError) -> BrokerError:
        """Add the next step for the failures users meet most."""
        if isinstance(exc, NotFound):
            who = f" under username {ad.submitter!r}" if self.config.bind_submitter else ""
            err: BrokerError = NotFound(
                f"the broker holds no credential {ad.credential!r} of {ad.owner_dn}{who} "
                f"({exc.message}); the owner must store one with 'broker-init -k "
                f"{ad.credential}' on the submit host, then release the job",
                reason="no_credential",
            )
            return err
        return exc

    # ----------------------------------------------------------------- start

    def start(
        self, ad: JobAd, command: Sequence[str], environ: dict[str, str] | None = None
    ) -> StartedJob:
        """Steps 2-5: everything up to the payload's start; raises BrokerError."""
        cfg = self.config
        if not command:
            raise WrapperSystemError(
                "no payload command was given (broker-pilot CMD ARGS...)", reason="no_command"
            )
        rule = owner_allowed_by_dn(cfg, ad.owner_dn)
        if rule is None and not cfg.fqan_owners:
            raise AuthorizationDenied(
                f"this pilot does not run jobs of {ad.owner_dn} (not in allowed_owners of "
                f"{cfg.source})",
                reason="owner_not_allowed",
            )
        try:
            cred, result = self.retrieve(ad)
        except BrokerError as exc:
            raise self._explain(ad, exc) from None
        identity = _identity_of(cred)
        if identity != ad.owner_dn:
            raise AuthorizationDenied(
                f"the broker returned a proxy of {identity}, not of the job owner {ad.owner_dn}",
                reason="wrong_identity",
            )
        if rule is None:
            rule = self._check_fqans(cred, ad.owner_dn)
        job_token: tuple[str, float] | None = None
        if cfg.job_token_issuer:  # asked before the sandbox exists: a refusal leaves nothing
            job_token = self.job_token(ad)
        pem = credential_to_pem(cred)
        environ = dict(os.environ) if environ is None else environ
        proxy_dir = make_private_dir(cfg.workdir / ".broker-pilot")
        local_id = local_job_id(ad.job_id)
        proxy_path = proxy_dir / f"proxy-{local_id}.pem"
        found = starter_scratch(environ)
        scratch = (
            None
            if found is None
            else Scratch(
                path=environ["_CONDOR_SCRATCH_DIR"],
                fd=found[0],
                slot_uid=found[1].st_uid,
                slot_gid=found[1].st_gid,
                inputs={},
            )
        )
        try:
            keep = [n for n in STARTER_NAMES if n in environ]
            job_env = self._job_environment(ad)
            if scratch is not None:
                # The payload's scratch directory is its copy: the job directory.
                workdir = cfg.wrapper_settings().workdir or Path.cwd()
                job_dir = Path(workdir).absolute() / f"job-{local_id}"
                keep = [n for n in keep if n not in _SCRATCH_NAMES]
                job_env += [f"{n}={job_dir}" for n in _SCRATCH_NAMES]
            settings = cfg.wrapper_settings(keep_env=keep, set_env=job_env)
            return self._prepare_and_stage(
                ad,
                command,
                settings,
                proxy_path,
                pem,
                local_id,
                environ,
                scratch,
                result,
                rule,
                job_token,
            )
        except BaseException:
            if scratch is not None:
                scratch.close()
            raise

    def _prepare_and_stage(
        self,
        ad: JobAd,
        command: Sequence[str],
        settings: Any,
        proxy_path: Path,
        pem: bytes,
        local_id: str,
        environ: dict[str, str],
        scratch: Scratch | None,
        result: dict[str, Any],
        rule: str,
        job_token: tuple[str, float] | None,
    ) -> StartedJob:
        workdir = Path(settings.workdir or Path.cwd()).absolute()
        job_dir = workdir / f"job-{local_id}"
        shown = command[0]
        argv = list(command)
        if scratch is not None:
            argv[0] = _staged_command(argv[0], scratch, job_dir)
        write_private_file(proxy_path, pem, mode=0o600)
        try:
            prepared = prepare(
                settings, proxy_path, argv, job_id=local_id, now=self.clock(), caller_env=environ
            )
        finally:
            with contextlib.suppress(OSError):
                proxy_path.unlink()
        prepared.shown_command = shown
        if scratch is not None:
            try:
                scratch.inputs = self._stage_in(prepared, scratch)
            except BrokerError as exc:
                abandon(prepared, exc)
                raise
        started = StartedJob(
            ad=ad, prepared=prepared, lifetime=float(result["lifetime"]), rule=rule, scratch=scratch
        )
        if job_token is not None:
            try:
                started.token = place_token(prepared, job_token[0])
            except BrokerError as exc:
                abandon(prepared, exc)  # the sandbox goes, as for any failure before the start
                raise
            started.token_lifetime = job_token[1]
        return started

    def _limits(self) -> staging.Limits:
        return staging.Limits(files=self.config.stage_max_files, bytes=self.config.stage_max_bytes)

    def _stage_in(self, job: PreparedJob, scratch: Scratch) -> dict[str, tuple[int, int, int]]:
        try:
            dfd = os.open(job.job_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as exc:
            raise WrapperSystemError(
                f"cannot open the job directory {job.job_dir}: {exc.strerror}"
            ) from None
        try:
            staged = staging.stage_in(
                scratch.fd,
                dfd,
                slot_uid=scratch.slot_uid,
                uid=job.run_as.uid,
                gid=job.run_as.gid,
                limits=self._limits(),
            )
        finally:
            os.close(dfd)
        for note in staged.notes:
            say(f"input {_one_line(note)}")
        return staged.copies

    def stage_out(self, job: StartedJob) -> str | None:
        """Copy the payload's outputs into the scratch directory; returns a problem or None."""
        scratch = job.scratch
        if scratch is None:
            return None
        prepared = job.prepared
        try:
            dfd = os.open(prepared.job_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as exc:
            return f"the outputs could not be handed back: {exc.strerror}"
        try:
            staged = staging.stage_out(
                dfd,
                scratch.fd,
                payload_uids=_payload_uids(prepared),
                slot_uid=scratch.slot_uid,
                slot_gid=scratch.slot_gid,
                requested=job.ad.transfer_output,
                inputs=scratch.inputs,
                limits=self._limits(),
            )
        except BrokerError as exc:
            return f"the outputs were not handed back: {exc.message}"
        except OSError as exc:
            return f"handing the outputs back failed: {exc.strerror or exc}"
        finally:
            os.close(dfd)
        for note in staged.notes:
            say(f"output {_one_line(note)}")
        if staged.over_limit:
            return (
                f"only part of the outputs were handed back to {scratch.path}: they exceed "
                f"{staged.over_limit} (stage_max_files/stage_max_bytes)"
            )
        missing = [n for n in staged.notes if n.endswith("was not found in the job directory")]
        if missing:
            return f"not all of transfer_output_files were written: {'; '.join(missing[:3])}"
        return None

    def _check_fqans(self, cred: Credential, dn: str) -> str:
        from broker.pki.chain import validate_chain
        from broker.trustdir import load_ca_dir, load_vomsdir

        try:
            info = validate_chain(
                cred.chain,
                load_ca_dir(self.config.ca_dir),
                now=self.clock(),
                vomsdir=load_vomsdir(self.config.vomsdir),
            )
        except BrokerError as exc:
            raise AuthorizationDenied(
                f"{dn} is admitted here only through its VOMS attributes, and those of its "
                f"proxy do not verify: {exc.message}",
                reason="fqans_unverified",
            ) from None
        rule = owner_allowed_by_fqans(self.config, dn, info.fqans)
        if rule is None:
            shown = ", ".join(info.fqans) or "none"
            raise AuthorizationDenied(
                f"this pilot does not run jobs of {dn}: neither the DN nor the proxy's FQANs "
                f"({shown}) match allowed_owners of {self.config.source}",
                reason="owner_not_allowed",
            )
        return rule

    @staticmethod
    def _job_environment(ad: JobAd) -> list[str]:
        kept = []
        for name, value in ad.environment:
            upper = name.upper()
            if (
                upper in RESERVED_NAMES
                or is_refused(name)
                or upper.startswith(_CREDENTIAL_PREFIXES)
                or upper == "KRB5CCNAME"
            ):
                say(f"the job's environment entry {name} is not passed to the payload")
                continue
            kept.append(f"{name}={value}")
        return kept

    # ----------------------------------------------------------------- run

    def run(self, job: StartedJob) -> int:
        """Step 6: run the payload with the proxy kept fresh; returns the exit code."""
        refresher = Refresher(self, job)
        refresher.start()
        token_refresher = TokenRefresher(self, job) if job.token is not None else None
        if token_refresher is not None:
            token_refresher.start()
        try:
            code = execute(job.prepared)
        finally:
            refresher.stop()
            if token_refresher is not None:
                token_refresher.stop()
            if job.token is not None:
                job.token.remove()
        try:
            problem = self.stage_out(job)
        finally:
            if job.scratch is not None:
                job.scratch.close()
        if problem is not None:
            reason = job.prepared.audit.reason
            job.prepared.audit.reason = f"{reason}; {problem}" if reason else problem
            if code == 0:
                code = EXIT_SYSTEM
        return code


class _PeriodicRefresher(abc.ABC):
    """A daemon thread that replaces something the payload uses before it expires.

    The delay between refreshes is the configured interval, else ``refresh_fraction``
    of the current lifetime. A failed refresh is reported on stderr and retried
    (sooner as the current one nears its end); it never stops the payload, whose own
    calls say why once the old one expires. Subclasses name what they refresh and
    do one refresh in :meth:`_refresh`.
    """

    thread_name: str
    what: str  # "proxy" / "token", for the messages

    def __init__(self, pilot: Pilot, job: StartedJob, lifetime: float) -> None:
        self.pilot, self.job = pilot, job
        self._lifetime = lifetime
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self.refreshed = 0

    def _delay(self, lifetime: float) -> float:
        cfg = self.pilot.config
        if cfg.refresh_interval_seconds is not None:
            return cfg.refresh_interval_seconds
        return max(1.0, cfg.refresh_fraction * lifetime)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.pilot.config.timeout_seconds + 5)

    @abc.abstractmethod
    def _refresh(self) -> float | None:
        """Fetch and place a new one; its lifetime in seconds, or None once stopped."""

    def _loop(self) -> None:
        cfg = self.pilot.config
        delay = self._delay(self._lifetime)
        expires = time.monotonic() + self._lifetime
        while not self._stop.wait(delay):
            try:
                lifetime = self._refresh()
            except Exception as exc:  # never let the thread die silently
                left = expires - time.monotonic()
                delay = min(cfg.refresh_retry_seconds, max(1.0, left / 2))
                detail = (
                    exc.message if isinstance(exc, BrokerError) else f"{type(exc).__name__}: {exc}"
                )
                if not self._stop.is_set():
                    say(
                        f"refreshing the payload's {self.what} failed ({detail}); retrying in "
                        f"{delay:g} s (the current {self.what} has {max(left, 0):.0f} s left)"
                    )
                continue
            if lifetime is None:
                return
            self.refreshed += 1
            expires = time.monotonic() + lifetime
            delay = self._delay(lifetime)
            say(
                f"refreshed the payload's {self.what} (valid {lifetime:.0f} s; next refresh in "
                f"{delay:g} s)"
            )


class Refresher(_PeriodicRefresher):
    """Replaces the payload's proxy before it expires, from a daemon thread."""

    thread_name = "proxy-refresh"
    what = "proxy"

    def __init__(self, pilot: Pilot, job: StartedJob) -> None:
        super().__init__(pilot, job, job.lifetime)

    def _refresh(self) -> float | None:
        cred, result = self.pilot.retrieve(self.job.ad)
        if self._stop.is_set():
            return None
        refresh_proxy(self.job.prepared, credential_to_pem(cred), now=self.pilot.clock())
        return float(result["lifetime"])


class TokenRefresher(_PeriodicRefresher):
    """Replaces the payload's bearer token (BEARER_TOKEN_FILE) before it expires."""

    thread_name = "token-refresh"
    what = "token"

    def __init__(self, pilot: Pilot, job: StartedJob) -> None:
        super().__init__(pilot, job, job.token_lifetime)

    def _refresh(self) -> float | None:
        token_file = self.job.token
        if token_file is None:
            return None
        token, lifetime = self.pilot.job_token(self.job.ad)
        if self._stop.is_set():
            return None
        token_file.write(token)
        return lifetime


def _payload_uids(job: PreparedJob) -> set[int]:
    """Whose files in the job directory are outputs: the mapped account's, and in mode sudo
    (an unprivileged pilot) the pilot's own copies of the inputs; never root's."""
    uids = {job.run_as.uid}
    if os.geteuid() != 0:
        uids.add(os.geteuid())
    return uids


def _staged_command(cmd: str, scratch: Scratch, job_dir: Path) -> str:
    """Where the payload finds ``cmd`` when it is a file the starter put in the scratch dir."""
    if "/" not in cmd:
        return cmd  # looked up on PATH
    full = os.path.normpath(cmd if os.path.isabs(cmd) else os.path.join(scratch.path, cmd))
    top = os.path.normpath(scratch.path)
    if not full.startswith(top + "/"):
        return cmd
    rel = full[len(top) + 1 :]
    parts = rel.split("/")
    if parts[0] in staging.RESERVED_NAMES or parts[0] in staging.STARTER_FILES:
        return cmd
    try:
        st = os.stat(rel, dir_fd=scratch.fd, follow_symlinks=False)
    except FileNotFoundError:
        return str(job_dir / rel)  # fails there as "No such file", which is the truth
    except OSError:
        return cmd
    return str(job_dir / rel) if stat.S_ISREG(st.st_mode) else cmd


# --------------------------------------------------------------------------- command line


def _error_code(exc: BrokerError) -> int:
    if isinstance(exc, NotFound):
        return EXIT_CLIENT  # the owner did not delegate: theirs to fix
    return exit_code_for(exc)


def _one_line(text: str) -> str:
    """``text`` without control characters, so a job-chosen value cannot start a new line."""
    return "".join(c if c.isprintable() else "?" for c in text)[:2000]


def write_error_file(line: str, error_file: str) -> str | None:
    """Append ``line`` to the wrapper error file; returns why not, or None.

    The path comes from the environment, which the job may have set, and the
    pilot may be root: the file is opened without following a symlink and
    without blocking, and written only when it is a regular file with one link
    that is new or still empty (the starter's file is), so the job cannot aim
    it at a device, a FIFO, a link to a system file or any file with content.
    """
    flags = (
        os.O_WRONLY
        | os.O_APPEND
        | os.O_CREAT
        | os.O_NOFOLLOW
        | os.O_NONBLOCK
        | os.O_NOCTTY
        | os.O_CLOEXEC
    )

    def unsuitable(st: os.stat_result) -> bool:
        return not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size != 0

    try:
        if unsuitable(os.lstat(error_file)):
            return "it is not a new or empty regular file"
    except FileNotFoundError:
        pass
    except OSError as exc:
        return exc.strerror or str(exc)
    try:
        fd = os.open(error_file, flags, 0o644)
    except OSError as exc:
        return exc.strerror or str(exc)
    try:
        if unsuitable(os.fstat(fd)):
            return "it is not a new or empty regular file"
        os.write(fd, (line + "\n").encode("utf-8", "replace"))
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        os.close(fd)
    return None


def report_outcome(message: str, error_file: str | None, *, started: bool) -> None:
    """A failure after ``prepare``: "not started" unless the payload ran."""
    if not started:
        report_failure(message, error_file)
        return
    _report_line(_one_line(f"broker-pilot: {message}"), error_file)


def report_failure(message: str, error_file: str | None) -> None:
    """One sentence on stderr and, under HTCondor, in the wrapper error file."""
    _report_line(_one_line(f"broker-pilot: the job was not started: {message}"), error_file)


def _report_line(line: str, error_file: str | None) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    if error_file:
        why = write_error_file(line, error_file)
        if why is not None:
            sys.stderr.write(
                f"broker-pilot: not writing to the wrapper error file "
                f"{_one_line(error_file)}: {why}\n"
            )


def unsafe_variables(environ: Mapping[str, str]) -> list[str]:
    """The names in ``environ`` that would let the caller load code into the pilot."""
    return sorted(
        n for n in environ if n.upper().startswith(UNSAFE_PREFIXES) or n.upper() in UNSAFE_NAMES
    )


def interpreter_isolated() -> bool:
    """True when Python ignores PYTHON* variables, the user site and the working directory."""
    flags = sys.flags
    return bool(
        flags.isolated
        and flags.ignore_environment
        and flags.no_user_site
        and getattr(flags, "safe_path", True)
    )


_USAGE = """usage: broker-pilot [--job-ad FILE] [--config FILE] [--] CMD [ARGS...]
       broker-pilot [--config FILE] --fill-rsa-pool N
       broker-pilot [--config FILE] --install-launcher DEST

HTCondor USER_JOB_WRAPPER: fetches the job owner's proxy from the broker and runs
CMD through the payload wrapper. The job ad comes from $_CONDOR_JOB_AD (or --job-ad),
the configuration from --config, the path built into the launcher, $BROKER_PILOT_CONFIG
(a root-owned file only) or /etc/broker/pilot.toml; it must be a file owned by root (or
the pilot's user) that nobody else can write.
Under the starter ($_CONDOR_JOB_AD set) every argument is the job's command.
Jobs run only through the static launcher: build it with --install-launcher DEST
(or scripts/build-pilot-launcher DEST) and set USER_JOB_WRAPPER = DEST.
Exit codes: the payload's own; 201 the job's fault, 202 the node's or broker's, 203 denied.
"""


@dataclass
class _Args:
    job_ad: str | None = None
    config: str | None = None
    fill: int | None = None
    install_launcher: str | None = None
    launcher_config: str | None = None
    command: tuple[str, ...] = ()


_LAUNCHER_FLAG = "--launcher-config="


class _UsageError(Exception):
    pass


def _parse(argv: Sequence[str], *, starter: bool = False) -> _Args:
    # The starter passes the job's own command line after ours; options are only
    # read before the first word that is not one of ours (or after nothing at all).
    # Under the starter the first word is the job's Cmd, which the job chooses:
    # nothing there is an option, so a job cannot pick the configuration or ad.
    args = _Args()
    if argv and argv[0].startswith(_LAUNCHER_FLAG):
        # Always the launcher's own first argument (its value may be empty).
        args.launcher_config = argv[0][len(_LAUNCHER_FLAG) :] or None
        argv = argv[1:]
    if starter:
        args.command = tuple(argv)
        return args
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            i += 1
            break
        if word in ("-h", "--help"):
            sys.stdout.write(_USAGE)
            raise SystemExit(0)
        if word in ("--job-ad", "--config", "--fill-rsa-pool", "--install-launcher"):
            if i + 1 >= len(argv):
                raise _UsageError(f"{word} needs a value")
            value = argv[i + 1]
            if word == "--job-ad":
                args.job_ad = value
            elif word == "--config":
                args.config = value
            elif word == "--install-launcher":
                args.install_launcher = value
            else:
                if not value.isdigit() or not 0 < int(value) <= 100000:
                    raise _UsageError("--fill-rsa-pool needs a count from 1 to 100000")
                args.fill = int(value)
            i += 2
            continue
        if word.startswith("--"):
            raise _UsageError(f"unknown option {word}")
        break
    args.command = tuple(argv[i:])
    return args


def run(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> int:
    """The whole command; returns the exit status (``environ``: os.environ)."""
    env = os.environ if environ is None else environ
    error_file = env.get("_CONDOR_WRAPPER_ERROR_FILE") or None
    unsafe = unsafe_variables(env)
    if unsafe:
        report_failure(
            f"the environment sets {', '.join(_one_line(n) for n in unsafe[:5])}, which would "
            "let the job load code or data into the pilot; remove it from the job's "
            "environment (or the node's STARTER_JOB_ENVIRONMENT)",
            error_file,
        )
        return EXIT_SYSTEM
    try:
        args = _parse(argv, starter="_CONDOR_JOB_AD" in env)
    except _UsageError as exc:
        report_failure(f"{exc}; see broker-pilot --help", error_file)
        return EXIT_SYSTEM
    if args.install_launcher is not None:
        return _install_launcher(args.install_launcher, args.config)
    try:
        config = load_pilot_config(args.config or args.launcher_config, environ=env)
        if args.fill is not None:
            if config.rsa_pool_dir is None:
                raise WrapperSystemError(
                    f"set rsa_pool_dir in {config.source} first", reason="no_pool"
                )
            fill_rsa_pool(config.rsa_pool_dir, args.fill)
            say(f"added {args.fill} RSA keys to {config.rsa_pool_dir}")
            return 0
        ad_path = args.job_ad or env.get("_CONDOR_JOB_AD")
        if not ad_path:
            raise WrapperSystemError(
                "no job ad: _CONDOR_JOB_AD is not set (by hand: --job-ad FILE)", reason="no_job_ad"
            )
        ad = read_job_ad(ad_path)
        pilot = Pilot(config)
        job = pilot.start(ad, args.command, dict(env))
    except BrokerError as exc:
        report_failure(exc.message, error_file)
        return _error_code(exc)
    except OSError as exc:
        report_failure(
            f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), error_file
        )
        return EXIT_SYSTEM
    say(
        f"running job {ad.job_id} of {ad.owner_dn} as {job.prepared.run_as.name} "
        f"(allowed by {job.rule!r})"
    )
    code = pilot.run(job)
    reason = job.prepared.audit.reason
    if code != 0 and reason:
        # Every outcome that is not simply the payload's own exit status: the wrapper's
        # failures (201-203), exec failures (126/127), the time limit (124), the payload's
        # own 201-204 reported as 204, outputs not handed back.
        report_outcome(reason, error_file, started=job.prepared.audit.payload_exit is not None)
    return code


def _install_launcher(dest: str, config: str | None) -> int:
    from payload_wrapper.launcher import build_launcher

    try:
        path = build_launcher(dest, config=str(Path(config).absolute()) if config else None)
    except BrokerError as exc:
        say(exc.message)
        return EXIT_SYSTEM
    except OSError as exc:
        say(f"cannot write the launcher {dest}: {exc.strerror or exc}")
        return EXIT_SYSTEM
    say(
        f"built the launcher {path} for {sys.executable}"
        + (f" with the configuration {Path(config).absolute()}" if config else "")
        + f"; set USER_JOB_WRAPPER = {path}"
    )
    return 0


def main() -> None:
    """The entry point: a job runs only in an isolated interpreter (the launcher's)."""
    argv = sys.argv[1:]
    if not interpreter_isolated() and not _admin_only(argv):
        report_failure(
            "broker-pilot runs jobs only through its static launcher (python -I), because "
            "the starter's environment belongs to the job; build it with 'broker-pilot "
            "--install-launcher DEST' and set USER_JOB_WRAPPER = DEST",
            os.environ.get("_CONDOR_WRAPPER_ERROR_FILE") or None,
        )
        sys.exit(EXIT_SYSTEM)
    for name in DROPPED_NAMES:
        os.environ.pop(name, None)
    sys.exit(run(argv))


def _admin_only(argv: Sequence[str]) -> bool:
    """--help and --install-launcher, which run no job, also work from a plain interpreter."""
    if "_CONDOR_JOB_AD" in os.environ:
        return False
    try:
        args = _parse(argv)  # --help prints the usage and exits here
    except _UsageError:
        return False
    return (
        args.install_launcher is not None
        and not args.command
        and args.launcher_config is None
        and args.job_ad is None
        and args.fill is None
    )


if __name__ == "__main__":
    main()
