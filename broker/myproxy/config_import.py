"""Translate a ``myproxy-server.config`` into the broker's policy language (pure).

:func:`translate_config` takes the file's text and returns the TOML text of one
policy file plus the directives it could not express (with line numbers). The
CLI edge (``broker policy import-myproxy-config``) writes the file and exits 1
when anything was left out, so nothing is silently dropped.

How each directive maps (see docs/myproxy.md for the full table):

* ``accepted_credentials P``: rule ``delegate`` for requesters P; owners always
  inspect and destroy their own credentials (MyProxy lets them, too).
* ``authorized_retrievers P``: ``retrieve`` with the passphrase for P (``"*"``:
  anyone who knows the passphrase, certificate or not).
* ``trusted_retrievers P``: ``retrieve`` by certificate alone for P, with
  ``owner_list_required`` when ``default_trusted_retrievers`` is ``none``.
* ``authorized_renewers P``: ``renew`` for P (``owner_list_required`` likewise).
* ``authorized_key_retrievers P``: ``retrieve-key`` with the passphrase for P.
* ``default_retrievers "*"``, ``default_trusted_retrievers "none"``,
  ``default_renewers "none"``, ``default_key_retrievers "none"``: what the
  MyProxy endpoint applies when the owner set no list; other values are
  reported as not expressible.
* ``allow_self_authorization true``: the owner may renew its own credential
  (``renew`` for ``self``). Without it, deny rules named after MyProxy's messages
  ("self-authz not allowed for renewer" / "... trusted retriever") refuse the owner
  as its own renewer or trusted retriever, and the MyProxy endpoint says so. The
  stored chain's identity always equals the owner DN in the broker (chains of
  another identity, independent proxies included, are refused at store), so "self"
  compares the client with the stored credential's base subject, as MyProxy does.
* ``max_proxy_lifetime H``: ``max_lifetime = "Hh"`` on the retrieve and renew rules.
* ``cert_dir``: a note (exit 0): the broker serves its ``ca_dir`` as trust roots.
* anything else (``passphrase_policy_program``, ``accepted_credentials_mapapp``,
  ``pam``, ``certificate_issuer_*``...): reported with its line number, exit 1.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field

#: Directives whose values are lists of DN regular expressions (MyProxy's patterns).
_LIST_DIRECTIVES = (
    "accepted_credentials",
    "allowed_clients",
    "authorized_retrievers",
    "allowed_services",
    "trusted_retrievers",
    "authorized_renewers",
    "authorized_key_retrievers",
    "default_retrievers",
    "default_trusted_retrievers",
    "default_renewers",
    "default_key_retrievers",
)
_ALIASES = {"allowed_clients": "accepted_credentials", "allowed_services": "authorized_retrievers"}


@dataclass
class Translation:
    """The policy file text and what was left out as (line, directive, why)."""

    toml: str
    unsupported: list[tuple[int, str, str]] = field(default_factory=list)
    notes: list[tuple[int, str, str]] = field(default_factory=list)
    directives: int = 0


def _values(rest: str) -> list[str]:
    try:
        return shlex.split(rest, posix=True)
    except ValueError:
        return []


def _pattern(value: str) -> str:
    """A MyProxy DN pattern in the policy language.

    MyProxy's patterns are DNs where ``*`` matches anything; the policy language's DN
    globs mean the same. "*" alone stays "*" (any certificate)."""
    return value


def translate_config(text: str, source: str = "myproxy-server.config") -> Translation:
    lists: dict[str, list[str]] = {}
    first_line: dict[str, int] = {}
    unsupported: list[tuple[int, str, str]] = []
    notes: list[tuple[int, str, str]] = []
    self_authz = False
    max_hours: int | None = None
    count = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        count += 1
        directive, _, rest = line.partition(" ")
        if "\t" in directive:
            directive, _, more = directive.partition("\t")
            rest = more + " " + rest
        directive = directive.strip().lower()
        values = _values(rest.strip())
        if directive in _LIST_DIRECTIVES:
            key = _ALIASES.get(directive, directive)
            if not values:
                unsupported.append((number, directive, "no value"))
                continue
            lists.setdefault(key, []).extend(values)
            first_line.setdefault(key, number)
        elif directive == "cert_dir":
            notes.append(
                (
                    number,
                    directive,
                    "the broker serves its ca_dir setting as trust "
                    "roots: point ca_dir at the same directory",
                )
            )
        elif (
            directive == "max_proxy_lifetime"
            and len(values) == 1
            and values[0].isdigit()
            and 0 < int(values[0]) <= 100_000
        ):
            max_hours = int(values[0])
        elif directive == "allow_self_authorization":
            self_authz = bool(values) and values[0].lower() in ("true", "yes", "1", "on")
        else:
            unsupported.append((number, directive, _why_not(directive)))

    defaults_ok = {
        "default_retrievers": ("*",),
        "default_trusted_retrievers": ("none",),
        "default_renewers": ("none",),
        "default_key_retrievers": ("none",),
    }
    for key, allowed in defaults_ok.items():
        given = lists.get(key)
        if (
            given is not None
            and tuple(v.lower() if v.lower() == "none" else v for v in given) != allowed
        ):
            unsupported.append(
                (
                    first_line[key],
                    key,
                    f"only {allowed[0]!r} is supported: the MyProxy endpoint "
                    f"applies {allowed[0]!r} when the owner set no list",
                )
            )

    rules = _policy_rules(source, lists, first_line, max_hours=max_hours, self_authz=self_authz)
    return Translation("\n".join(rules), unsupported, notes, count)


def _policy_rules(
    source: str,
    lists: dict[str, list[str]],
    first_line: dict[str, int],
    *,
    max_hours: int | None,
    self_authz: bool,
) -> list[str]:
    """The broker policy rules (TOML text, one per item) for the translated directives.

    A fixed order: the lists of who may store, retrieve and renew, then the
    owners' own renewal (allowed or refused), then key retrieval.
    """
    return [
        f"# Imported from {source} by `broker policy import-myproxy-config`.",
        "# MyProxy semantics: owners always inspect and destroy their own credentials.",
        "",
        _rule("owners inspect and destroy their own credentials", ["info", "destroy"], ["self"]),
        *_access_list_rules(lists, first_line, max_hours=max_hours),
        *_self_authorization_rules(self_authz, max_hours=max_hours),
        *_key_retrieval_rules(lists, first_line),
    ]


def _access_list_rules(
    lists: dict[str, list[str]], first_line: dict[str, int], *, max_hours: int | None
) -> list[str]:
    """One rule per list of who may store, retrieve (passphrase or certificate) and renew."""
    rules: list[str] = []
    if "accepted_credentials" in lists:
        rules.append(
            _rule(
                "accepted_credentials: who may store",
                ["delegate"],
                _requesters(lists["accepted_credentials"]),
                line=first_line["accepted_credentials"],
            )
        )
    if "authorized_retrievers" in lists:
        rules.append(
            _rule(
                "authorized_retrievers: retrieval with the passphrase",
                ["retrieve"],
                _requesters(lists["authorized_retrievers"], passphrase=True),
                auth=["passphrase"],
                line=first_line["authorized_retrievers"],
                max_hours=max_hours,
            )
        )
    if "trusted_retrievers" in lists:
        rules.append(
            _rule(
                "trusted_retrievers: retrieval by certificate",
                ["retrieve"],
                _requesters(lists["trusted_retrievers"]),
                auth=["certificate"],
                owner_list=True,
                line=first_line["trusted_retrievers"],
                max_hours=max_hours,
            )
        )
    if "authorized_renewers" in lists:
        rules.append(
            _rule(
                "authorized_renewers: renewal",
                ["renew"],
                _requesters(lists["authorized_renewers"]),
                owner_list=True,
                line=first_line["authorized_renewers"],
                max_hours=max_hours,
            )
        )
    return rules


def _self_authorization_rules(self_authz: bool, *, max_hours: int | None) -> list[str]:
    """allow_self_authorization: owners may renew their own credentials, or are refused."""
    if self_authz:
        return [
            _rule(
                "allow_self_authorization: owners renew their own credentials",
                ["renew"],
                ["self"],
                owner_list=True,
                max_hours=max_hours,
            )
        ]
    # MyProxy refuses an owner as its own renewer or trusted retriever unless
    # allow_self_authorization is true; the rule names are its error messages.
    return [
        _rule("self-authz not allowed for renewer", ["renew"], ["self"], effect="deny"),
        _rule(
            "self-authz not allowed for trusted retriever",
            ["retrieve"],
            ["self"],
            auth=["certificate"],
            effect="deny",
        ),
    ]


def _key_retrieval_rules(lists: dict[str, list[str]], first_line: dict[str, int]) -> list[str]:
    """authorized_key_retrievers: who may retrieve the key itself, with the passphrase."""
    if "authorized_key_retrievers" not in lists:
        return []
    return [
        _rule(
            "authorized_key_retrievers: key retrieval with the passphrase",
            ["retrieve-key"],
            _requesters(lists["authorized_key_retrievers"]),
            auth=["passphrase"],
            owner_list=True,
            line=first_line["authorized_key_retrievers"],
        )
    ]


def _requesters(values: list[str], *, passphrase: bool = False) -> list[str]:
    if "*" in values:
        return ["passphrase"] if passphrase else ["*"]
    return [_pattern(v) for v in values]


def _rule(
    name: str,
    actions: list[str],
    requesters: list[str],
    *,
    auth: list[str] | None = None,
    owner_list: bool = False,
    line: int = 0,
    effect: str = "allow",
    max_hours: int | None = None,
) -> str:
    lines = ["[[rule]]", f"name = {json.dumps(name)}"]
    if line:
        lines.append(f"description = {json.dumps(f'myproxy-server.config line {line}')}")
    lines += [
        f"action = {json.dumps(actions)}",
        f"effect = {json.dumps(effect)}",
        f"requester = {json.dumps(requesters)}",
    ]
    if auth:
        lines.append(f"auth = {json.dumps(auth)}")
    if owner_list:
        lines.append("owner_list_required = true")
    if max_hours is not None and effect == "allow" and set(actions) & {"retrieve", "renew"}:
        lines.append(f'max_lifetime = "{max_hours}h"')
    return "\n".join(lines) + "\n"


def _why_not(directive: str) -> str:
    if directive in (
        "passphrase_policy_program",
        "accepted_credentials_mapapp",
        "check_multiple_credentials",
        "max_proxy_lifetime",
        "max_cred_lifetime",
    ):
        return "a server setting with no equivalent in the broker's policy"
    return "not expressible in the broker's policy"
