"""Read the job ClassAd the condor_starter hands to a USER_JOB_WRAPPER.

The starter writes the ad to ``$_CONDOR_JOB_AD`` in the old ``Attr = value``
form, one attribute per line; :func:`classad2.parseOne` reads it. Only the
attributes broker-pilot needs are extracted, and each is checked here so that
the pilot never acts on a half-understood ad:

``BrokerOwner``            owner DN (falls back to ``x509UserProxySubject``)
``BrokerCredential``       credential name, one safe path component (``default``)
``BrokerLifetime``         optional proxy lifetime in hours (a positive number)
``GlobalJobId``            the job id sent to the broker (else ``ClusterId.ProcId``)
``Owner``                  the submitter's account as the schedd authenticated it
``Environment`` / ``Env``  the job's own environment (new or old syntax)

Errors: :class:`~broker.errors.SystemFailure` when the file cannot be read
(the starter's business), :class:`~broker.errors.InputError` with a reason
code when the ad itself is unusable (the submitter's business).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from broker.errors import DnSyntaxError, InputError, SystemFailure
from broker.fileio import validate_component
from broker.naming import DEFAULT_CREDENTIAL

__all__ = [
    "MAX_JOB_AD_BYTES",
    "JobAd",
    "parse_environment",
    "parse_job_ad",
    "read_job_ad",
]

#: A starter's job ad is a few kB; anything far larger is not one.
MAX_JOB_AD_BYTES = 4 << 20


@dataclass(frozen=True)
class JobAd:
    """What broker-pilot takes from the job ad."""

    owner_dn: str
    credential: str
    job_id: str
    lifetime_hours: float | None = None
    submitter: str | None = None  # the ad's Owner: the schedd-authenticated account
    environment: tuple[tuple[str, str], ...] = ()
    owner_source: str = "BrokerOwner"  # or x509UserProxySubject
    #: ``transfer_output_files`` (the ad's TransferOutput), None when not given
    transfer_output: tuple[str, ...] | None = None


def read_job_ad(path: str | os.PathLike[str]) -> JobAd:
    """Read and check the job ad file at ``path``."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_JOB_AD_BYTES + 1)
    except OSError as exc:
        raise SystemFailure(
            f"cannot read the job ad {os.fspath(path)}: {exc.strerror}; the starter sets "
            "_CONDOR_JOB_AD (by hand: --job-ad FILE)",
            reason="no_job_ad",
        ) from exc
    if len(raw) > MAX_JOB_AD_BYTES:
        raise InputError(
            f"the job ad {os.fspath(path)} is larger than {MAX_JOB_AD_BYTES} bytes",
            reason="bad_job_ad",
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(
            f"the job ad {os.fspath(path)} is not UTF-8 text", reason="bad_job_ad"
        ) from None
    return parse_job_ad(text)


def _evaluate(ad: Any, name: str) -> Any:
    """The evaluated value of ``name`` or None when absent/undefined (lookups ignore case)."""
    import classad2

    if name not in ad:
        return None
    try:
        value = ad.eval(name)
    except (KeyError, ValueError, TypeError, RuntimeError):
        return None
    if isinstance(value, classad2.Value):  # UNDEFINED or ERROR
        return None
    return value


def _string(ad: Any, name: str) -> str | None:
    value = _evaluate(ad, name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InputError(
            f"the job ad attribute {name} must be a string, not {value!r}", reason="bad_job_ad"
        )
    return value


def parse_job_ad(text: str) -> JobAd:
    """Parse the starter's ``Attr = value`` text and extract what the pilot needs."""
    import classad2

    try:
        ad = classad2.parseOne(text)
    except (ValueError, RuntimeError, SyntaxError) as exc:
        raise InputError(f"the job ad cannot be parsed: {exc}", reason="bad_job_ad") from None
    owner, source = _owner(ad)
    return JobAd(
        owner_dn=owner,
        credential=_credential(ad),
        lifetime_hours=_lifetime(ad),  # checked before the job id, as it always was
        job_id=_job_id(ad),
        submitter=_string(ad, "Owner") or None,
        environment=tuple(_environment(ad)),
        owner_source=source,
        transfer_output=_transfer_output(ad),
    )


def _owner(ad: Any) -> tuple[str, str]:
    """The owner DN and the attribute it came from (BrokerOwner, else x509UserProxySubject)."""
    owner = _string(ad, "BrokerOwner")
    source = "BrokerOwner"
    if not owner:
        owner, source = _string(ad, "x509UserProxySubject"), "x509UserProxySubject"
    if not owner:
        raise InputError(
            "the job ad names no credential owner (neither BrokerOwner nor "
            "x509UserProxySubject); submit the job with broker-submit, or add "
            '+BrokerOwner = "<your DN>" to the submit description',
            reason="no_owner",
        )
    if not owner.startswith("/") or any(ord(c) < 32 for c in owner):
        raise InputError(
            f"the job ad's {source} {owner!r} is not a DN in /DC=.../CN=... form",
            reason="bad_owner",
        )
    return owner, source


def _credential(ad: Any) -> str:
    """BrokerCredential (or the default name), checked to be one safe path component."""
    credential = _string(ad, "BrokerCredential") or DEFAULT_CREDENTIAL
    try:
        validate_component(credential, what="credential name (BrokerCredential)")
    except DnSyntaxError as exc:
        raise InputError(exc.message, reason="bad_credential_name") from None
    return credential


def _lifetime(ad: Any) -> float | None:
    """BrokerLifetime in hours: absent, or a finite positive number."""
    lifetime = _evaluate(ad, "BrokerLifetime")
    if lifetime is None:
        return None
    if (
        isinstance(lifetime, bool)
        or not isinstance(lifetime, int | float)
        or not math.isfinite(lifetime)
        or lifetime <= 0
    ):
        raise InputError(
            f"BrokerLifetime must be a positive number of hours, not {lifetime!r}",
            reason="bad_lifetime",
        )
    return float(lifetime)


def _job_id(ad: Any) -> str:
    """GlobalJobId, else ``ClusterId.ProcId``; 1..256 printable characters."""
    job_id = _string(ad, "GlobalJobId")
    if not job_id:
        cluster, proc = _evaluate(ad, "ClusterId"), _evaluate(ad, "ProcId")
        if (
            not (isinstance(cluster, int) and isinstance(proc, int))
            or isinstance(cluster, bool)
            or isinstance(proc, bool)
        ):
            raise InputError(
                "the job ad has neither GlobalJobId nor integer ClusterId and ProcId; "
                "cannot name the job",
                reason="no_job_id",
            )
        job_id = f"{cluster}.{proc}"
    if len(job_id) > 256 or any(ord(c) < 32 or ord(c) == 127 for c in job_id):
        raise InputError(
            f"the job id {job_id!r} is not 1..256 printable characters", reason="bad_job_id"
        )
    return job_id


def _environment(ad: Any) -> list[tuple[str, str]]:
    """The job's environment: the new ``Environment`` syntax wins over the old ``Env``."""
    new_style = _string(ad, "Environment")
    if new_style:
        return parse_environment(new_style)
    old_style = _string(ad, "Env")
    if old_style:
        return _parse_old_environment(old_style)
    return []


def _transfer_output(ad: Any) -> tuple[str, ...] | None:
    """The comma-separated TransferOutput names, None when the ad does not say."""
    outputs = _string(ad, "TransferOutput")
    if outputs is None:
        return None
    return tuple(n.strip() for n in outputs.split(",") if n.strip())


def parse_environment(text: str) -> list[tuple[str, str]]:
    """Split HTCondor's new environment syntax: ``A=1 B='two words' C='it''s'``.

    Entries are separated by whitespace; single quotes group a value, and a
    doubled quote inside them stands for one quote. The surrounding double
    quotes of the ClassAd string are already gone here.
    """
    entries: list[str] = []
    current: list[str] = []
    in_quote = False
    started = False
    i = 0
    while i < len(text):
        char = text[i]
        if in_quote:
            if char == "'":
                if text[i + 1 : i + 2] == "'":
                    current.append("'")
                    i += 1
                else:
                    in_quote = False
            else:
                current.append(char)
        elif char == "'":
            in_quote = started = True
        elif char.isspace():
            if started:
                entries.append("".join(current))
                current, started = [], False
        else:
            current.append(char)
            started = True
        i += 1
    if in_quote:
        raise InputError(
            f"unbalanced single quote in the job's environment {text!r}", reason="bad_environment"
        )
    if started:
        entries.append("".join(current))
    return [_split_entry(e) for e in entries]


def _parse_old_environment(text: str) -> list[tuple[str, str]]:
    return [_split_entry(e) for e in text.split(";") if e.strip()]


def _split_entry(entry: str) -> tuple[str, str]:
    name, sep, value = entry.partition("=")
    if not sep or not name:
        raise InputError(
            f"the job's environment entry {entry!r} is not NAME=VALUE", reason="bad_environment"
        )
    return name, value
