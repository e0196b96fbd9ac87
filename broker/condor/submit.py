"""Check a submit description and add what broker-pilot needs to it.

The user's text is kept as it is (comments, macros and inline ``queue ... from
(...)`` item lists survive; ``str(htcondor2.Submit)`` loses the latter). The
helper removes the lines that set the attributes it owns and inserts one
block before the first ``queue`` statement::

    +BrokerOwner = "<the caller's DN>"
    +BrokerCredential = "<credential name>"
    +BrokerLifetime = <hours>        (only when asked for)
    run_as_owner = False             (the submit command behind RunAsOwner)
    getenv = False

The result is parsed again with :class:`htcondor2.Submit` before anyone sees it.

Refused, with a sentence saying what to change (:class:`~broker.errors.InputError`):

* text htcondor2 cannot parse, a missing or empty ``executable`` (docker
  universe excepted);
* ``getenv`` set to anything but false: it copies the submitter's whole
  environment (proxy paths, tokens, HOME) into the job;
* ``environment``/``env`` entries naming a credential location (``X509_*``,
  ``BEARER_TOKEN*``, ``KRB5CCNAME``) or HTCondor's own ``_CONDOR_*`` names;
* ``environment``/``env`` entries that would reach the pilot rather than the
  job: the starter hands the job's environment to ``broker-pilot``, which runs
  as root, so ``PYTHON*``, ``LD_*``, ``BROKER_*`` and glibc's/OpenSSL's
  loader variables (``GCONV_PATH``, ``MALLOC_*``, ``OPENSSL_CONF``, ...) are
  refused here (the pilot refuses or ignores them too; docs/htcondor.md);
* ``x509userproxy`` / ``use_x509userproxy``: these ship the submitter's own
  proxy with the job, which is what the broker replaces;
* ``include`` lines, whose content cannot be checked here.

Refusing is preferred to silently dropping: the user learns at submit time,
and the pilot's answer (drop such names) never surprises anybody.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from broker.condor.jobad import parse_environment
from broker.errors import DnSyntaxError, InputError, SystemFailure
from broker.fileio import validate_component

__all__ = [
    "OWNED_KEYS",
    "AugmentedSubmit",
    "augment_submit",
    "check_environment_names",
    "check_pilot_names",
    "parse_submit",
    "submit_to_schedd",
]

#: Submit keys (lower case, ``+X`` written as ``my.x``) this module writes itself.
OWNED_KEYS = frozenset(
    {
        "my.brokerowner",
        "my.brokercredential",
        "my.brokerlifetime",
        "run_as_owner",
        "my.runasowner",
        "getenv",
    }
)
_FORBIDDEN_KEYS = {
    "x509userproxy": "it ships your own proxy file with the job",
    "use_x509userproxy": "it ships your own proxy file with the job",
}
_CREDENTIAL_PREFIXES = ("X509_", "BEARER_TOKEN", "_CONDOR_")
_CREDENTIAL_NAMES = frozenset({"KRB5CCNAME"})
# Names that would act on broker-pilot (root) before it runs the job: the same
# loader, glibc and OpenSSL names its launcher refuses, Python's and the pilot's own.
_PILOT_PREFIXES = (
    "PYTHON",
    "LD_",
    "BROKER_",
    "MALLOC_",
    "GLIBC_",
    "GCONV_",
    "OPENSSL_",
    "DYLD_",
    "_RLD",
)
_PILOT_NAMES = frozenset(
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
_FALSE = frozenset({"false", "no", "0", "f", "n"})
_QUEUE_RE = re.compile(r"\s*queue(\s|$)", re.IGNORECASE)
_INCLUDE_RE = re.compile(r"\s*include\s*(:|command\s*:)", re.IGNORECASE)
_KEY_RE = re.compile(r"\s*(\+?[A-Za-z_][A-Za-z0-9_.]*)\s*=")


@dataclass(frozen=True)
class AugmentedSubmit:
    """The augmented text and its parsed form."""

    text: str
    submit: Any  # htcondor2.Submit
    removed: tuple[str, ...]  # keys of the user's lines that were replaced


def _normal_key(key: str) -> str:
    key = key.strip().lower()
    return "my." + key[1:] if key.startswith("+") else key


def parse_submit(text: str) -> Any:
    """Parse ``text`` with htcondor2.Submit; a parse failure is an InputError."""
    import htcondor2

    try:
        submit = htcondor2.Submit(text)
        submit.itemdata()  # inline item lists are only read here
    except (ValueError, RuntimeError, htcondor2.HTCondorException) as exc:
        raise InputError(
            f"the submit description cannot be parsed ({exc}); check each line is "
            "'key = value' and that queue item lists are closed with ')'",
            reason="bad_submit",
        ) from None
    return submit


def check_environment_names(names: Iterable[str]) -> list[str]:
    """The names among ``names`` that would carry a credential or HTCondor internals."""
    return [
        n
        for n in names
        if n.upper().startswith(_CREDENTIAL_PREFIXES) or n.upper() in _CREDENTIAL_NAMES
    ]


def check_pilot_names(names: Iterable[str]) -> list[str]:
    """The names among ``names`` that would reach broker-pilot instead of the job."""
    return [n for n in names if n.upper().startswith(_PILOT_PREFIXES) or n.upper() in _PILOT_NAMES]


def _environment_entries(value: str) -> list[tuple[str, str]]:
    stripped = value.strip()
    if len(stripped) >= 2 and stripped[0] == stripped[-1] == '"':
        return parse_environment(stripped[1:-1].replace('""', '"'))
    return [
        (e.partition("=")[0].strip(), e.partition("=")[2]) for e in stripped.split(";") if e.strip()
    ]


def _refuse_includes(lines: list[str]) -> None:
    for line in lines:
        if _INCLUDE_RE.match(line):
            raise InputError(
                f"the line {line.strip()!r} includes another file, which broker-submit cannot "
                "check for environment or proxy settings; paste its content instead",
                reason="include",
            )


def _validate(submit: Any) -> None:
    values = {_normal_key(k): str(v) for k, v in submit.items()}
    universe = values.get("universe", "vanilla").strip().lower()
    if not values.get("executable", "").strip() and universe != "docker":
        raise InputError(
            "the submit description has no executable; add a line such as 'executable = run.sh'",
            reason="no_executable",
        )
    for key, why in _FORBIDDEN_KEYS.items():
        if key in values and values[key].strip().lower() not in _FALSE:
            raise InputError(
                f"remove '{key}' from the submit description: {why}; the pilot fetches a "
                "fresh proxy from the broker instead",
                reason="proxy_shipped",
            )
    getenv = values.get("getenv")
    if getenv is not None and getenv.strip().lower() not in _FALSE:
        raise InputError(
            f"'getenv = {getenv.strip()}' copies your environment (proxy path, tokens, HOME) "
            "into the job; remove it and list what the job needs with "
            "'environment = \"NAME=value ...\"'",
            reason="getenv",
        )
    for key in ("environment", "env"):
        if key not in values:
            continue
        try:
            entries = _environment_entries(values[key])
        except InputError as exc:
            raise InputError(
                f"the '{key}' line is malformed: {exc.message}", reason="bad_environment"
            ) from None
        bad = check_environment_names(n for n, _ in entries)
        if bad:
            raise InputError(
                f"the '{key}' line sets {', '.join(sorted(set(bad)))}, which would point the "
                "job at a credential or HTCondor internals; remove it: the pilot sets "
                "X509_USER_PROXY to the proxy it fetched for the job",
                reason="credential_env",
            )
        bad = check_pilot_names(n for n, _ in entries)
        if bad:
            raise InputError(
                f"the '{key}' line sets {', '.join(sorted(set(bad)))}, which the execute node's "
                "pilot (running as root) would see before your job starts; remove it and set "
                "it inside your executable instead (e.g. 'export PYTHONPATH=...' in the "
                "job's script)",
                reason="pilot_env",
            )


def _logical_lines(text: str) -> list[list[str]]:
    """Physical lines grouped into logical ones (a trailing backslash continues a line)."""
    groups: list[list[str]] = []
    current: list[str] = []
    for line in text.splitlines():
        current.append(line)
        if not line.rstrip().endswith("\\"):
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


def _classad_string(value: str, what: str) -> str:
    # '$' starts a submit macro and '"'/'\\' need ClassAd escapes; no real DN or
    # credential name holds them, so refusing is simpler than escaping three layers.
    if any(c in value for c in '"\\$') or any(ord(c) < 32 for c in value):
        raise InputError(
            f"the {what} {value!r} contains a quote, backslash, '$' or control "
            "character and cannot be written into a submit description",
            reason="bad_value",
        )
    return f'"{value}"'


def augment_submit(
    text: str, *, owner_dn: str, credential: str, lifetime_hours: float | None = None
) -> AugmentedSubmit:
    """Validate ``text`` and return it with the broker attributes added."""
    try:
        validate_component(credential, what="credential name")
    except DnSyntaxError as exc:
        raise InputError(exc.message, reason="bad_credential_name") from None
    if lifetime_hours is not None and not lifetime_hours > 0:
        raise InputError(
            "the proxy lifetime must be a positive number of hours", reason="bad_lifetime"
        )
    groups = _logical_lines(text)
    _refuse_includes(["".join(g) for g in groups])
    _validate(parse_submit(text))

    block = [
        "# added by broker-submit: the pilot fetches this owner's proxy from the broker",
        f"+BrokerOwner = {_classad_string(owner_dn, 'owner DN')}",
        f"+BrokerCredential = {_classad_string(credential, 'credential name')}",
    ]
    if lifetime_hours is not None:
        block.append(f"+BrokerLifetime = {lifetime_hours:g}")
    block += ["run_as_owner = False", "getenv = False"]

    out: list[str] = []
    removed: list[str] = []
    inserted = False
    for group in groups:
        first = group[0]
        match = _KEY_RE.match(first)
        if match and _normal_key(match.group(1)) in OWNED_KEYS:
            removed.append(match.group(1))
            continue
        if not inserted and _QUEUE_RE.match(first):
            out.extend(block)
            inserted = True
        out.extend(group)
    if not inserted:
        out.extend(block)
    result = "\n".join(out) + "\n"
    reparsed = parse_submit(result)
    return AugmentedSubmit(text=result, submit=reparsed, removed=tuple(removed))


def submit_to_schedd(augmented: AugmentedSubmit, *, schedd_name: str | None = None) -> int:
    """Queue the jobs with the local (or named) schedd; returns the cluster id.

    No reachable schedd is a :class:`~broker.errors.SystemFailure` whose message
    says what to do, never a traceback.
    """
    import htcondor2

    try:
        if schedd_name:
            collector = htcondor2.Collector()
            ad = collector.locate(htcondor2.DaemonType.Schedd, schedd_name)
            schedd = htcondor2.Schedd(ad)
        else:
            schedd = htcondor2.Schedd()
    except (htcondor2.HTCondorException, RuntimeError, ValueError) as exc:
        raise SystemFailure(
            f"no HTCondor schedd can be reached ({exc}); run broker-submit on a submit host "
            "of the pool, or use --dry-run and pass the printed description to condor_submit",
            reason="no_schedd",
        ) from None
    try:
        result = schedd.submit(augmented.submit)
    except (htcondor2.HTCondorException, RuntimeError, ValueError) as exc:
        raise SystemFailure(f"the schedd refused the job: {exc}", reason="submit_failed") from None
    return int(result.cluster())
