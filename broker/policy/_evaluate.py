"""Decide a Request against a PolicySet and an optional OwnerPolicy.

Two layers, both must allow (MyProxy semantics):

1. Site rules. Only rules for the request's action are considered, and of
   those only the ones whose requester patterns can match (the index built at
   load time). A matching deny rule always wins; otherwise at least one
   matching allow rule is needed — no match means deny.
2. The owner's lists. Only consulted once the site allowed, so an owner policy
   can narrow but never widen. ``None`` lists leave the site decision alone.

With ``full_trace=True`` every rule of the action is examined and reported,
not only the index's candidates; the decision is the same (tests assert
this), only slower and more verbose. ``broker policy explain`` uses it.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable

from broker.errors import InputError
from broker.policy._duration import format_duration
from broker.policy._enums import Action, AuthMethod, Effect
from broker.policy._model import (
    _OWNER_CACHE_LIMIT,
    REASON_ALLOWED,
    REASON_BAD_OWNER,
    REASON_DENY_RULE,
    REASON_JOB_ID,
    REASON_NO_RULE,
    REASON_OWNER,
    Decision,
    OwnerPolicy,
    PolicySet,
    Request,
    Rule,
    RuleRef,
    TraceEntry,
)
from broker.policy._patterns import GroupRef, Matcher, PatternError, matches_any_dn, parse_pattern

_JOB_ID_FAILURE = "needs a job id (require_job_id = true) and the request has none"


def _check_rule(
    rule: Rule, request: Request, owner_policy: OwnerPolicy | None = None
) -> tuple[str | None, str]:
    """Return (first failed condition or None, how the requester matched)."""
    if request.action not in rule.actions:
        return f"action {request.action} not in [{', '.join(sorted(rule.actions))}]", ""
    if rule.auth is not None and request.auth not in rule.auth:
        return (
            f"authentication by {request.auth} not in [{', '.join(sorted(rule.auth))}]",
            "",
        )
    via = _first_match(rule.requester, request)
    if via is None:
        return f"requester matches none of {_sources(rule.requester)}", ""
    if rule.owner is not None:
        owner_via = next((m.source for m in rule.owner if m.matches(request.owner)), None)
        if owner_via is None:
            return f"owner {request.owner_dn} matches none of {_sources(rule.owner)}", via
    if (
        rule.credential_regex is not None
        and rule.credential_regex.fullmatch(request.credential) is None
    ):
        return (
            f"credential name {request.credential!r} matches none of {list(rule.credential or ())}",
            via,
        )
    if rule.require_job_id and not request.job_id:
        return _JOB_ID_FAILURE, via
    if rule.owner_list_required:
        selected = _owner_list(request, owner_policy) if owner_policy is not None else None
        if selected is None or selected[2] is None:
            label = selected[1] if selected is not None else "list for this action"
            return f"owner_list_required and the owner set no {label}", via
    return None, via


def _first_match(matchers: tuple[Matcher, ...], request: Request) -> str | None:
    for matcher in matchers:
        if matcher.matches(request.requester):
            if matcher.source == matcher.leaf.text:
                return repr(matcher.source)
            return f"{matcher.source!r} (via {matcher.leaf.text!r})"
    return None


def _sources(matchers: Iterable[Matcher]) -> str:
    # Group members share their source ("group:x"); list each entry once.
    unique = list(dict.fromkeys(m.source for m in matchers))
    shown = unique[:5]
    more = f" and {len(unique) - 5} more" if len(unique) > 5 else ""
    return "[" + ", ".join(repr(s) for s in shown) + "]" + more


def _candidates(policy_set: PolicySet, request: Request) -> tuple[list[Rule], int, tuple[str, ...]]:
    """Rules of the action that the index says may match, in file order."""
    index = policy_set.index[request.action]
    hits: set[int] = set(index.always)
    subject = request.requester
    dn = subject.dn
    if dn is not None:
        prefix_map = index.dn_prefix
        for length in index.prefix_lengths:
            if length > len(dn):
                break
            found = prefix_map.get(dn[:length])
            if found:
                hits.update(found)
    elif subject.auth is not None:
        hits.update(index.anonymous)
    for fqan in subject.fqans:
        found = index.vo.get(fqan.vo)
        if found:
            hits.update(found)
    if subject.auth is AuthMethod.PAM:
        hits.update(index.pam)
    elif subject.auth is AuthMethod.PASSPHRASE:
        hits.update(index.passphrase)
    rules = index.rules
    return [rules[i] for i in sorted(hits)], len(rules), index.files


def evaluate(
    policy_set: PolicySet,
    request: Request,
    owner_policy: OwnerPolicy | None = None,
    *,
    full_trace: bool = False,
) -> Decision:
    """Decide ``request``; never raises for a well-formed Request (bad owner lists deny)."""
    if full_trace:
        index = policy_set.index[request.action]
        considered: list[Rule] = list(index.rules)
        checked, files = len(index.rules), index.files
    else:
        considered, checked, files = _candidates(policy_set, request)

    allows, denies, job_id_blocked, trace = _match_site_rules(considered, request, owner_policy)

    who = _describe_requester(request)
    what = f"{request.action} {_describe_target(request)}"
    hint = _explain_hint(request)

    if denies:
        rule = denies[0]
        return _deny(
            REASON_DENY_RULE,
            f'denied: rule "{rule.name}" ({rule.where}) forbids {who} to {what}; run `{hint}`',
            rule,
            trace,
            checked,
        )
    if not allows:
        if job_id_blocked is not None:
            rule = job_id_blocked
            message = (
                f'denied: rule "{rule.name}" ({rule.where}) would let {who} {what} but requires '
                f"a job id, and none was given; pass the job id with the request"
            )
            return _deny(REASON_JOB_ID, message, rule, trace, checked)
        return _deny(
            REASON_NO_RULE,
            f"denied: no rule lets {who} {what} ({_checked_text(checked, files, request.action)});"
            f" run `{hint}`",
            None,
            trace,
            checked,
        )

    owner_denial = _owner_layer(policy_set, request, owner_policy, trace, who, hint)
    if owner_denial is not None:
        return _deny(owner_denial[0], owner_denial[1], None, trace, checked, owner_denial[2])

    return _allow(allows, f"{who} {what}", trace, checked)


def _match_site_rules(
    considered: list[Rule], request: Request, owner_policy: OwnerPolicy | None
) -> tuple[list[Rule], list[Rule], Rule | None, list[TraceEntry]]:
    """Check each site rule: the matching allows and denies, the first allow that only a
    missing job id kept from matching, and the trace."""
    trace: list[TraceEntry] = []
    denies: list[Rule] = []
    allows: list[Rule] = []
    job_id_blocked: Rule | None = None
    for rule in considered:
        failure, via = _check_rule(rule, request, owner_policy)
        if failure is None:
            (allows if rule.effect is Effect.ALLOW else denies).append(rule)
            why = f"matched: requester matched {via}"
        else:
            why = failure
            if (
                failure is _JOB_ID_FAILURE
                and rule.effect is Effect.ALLOW
                and job_id_blocked is None
            ):
                job_id_blocked = rule
        trace.append(
            TraceEntry("site", rule.name, rule.file, rule.line, rule.effect, failure is None, why)
        )
    return allows, denies, job_id_blocked, trace


def _allow(allows: list[Rule], who_what: str, trace: list[TraceEntry], checked: int) -> Decision:
    """The allow decision: the first matching rule names it, the tightest limits apply."""
    caps = [rule.max_lifetime for rule in allows if rule.max_lifetime is not None]
    max_lifetime = min(caps) if caps else None
    limited = any(rule.limited for rule in allows)
    first = allows[0]
    extras = []
    if max_lifetime is not None:
        extras.append(f"max lifetime {format_duration(max_lifetime)}")
    if limited:
        extras.append("limited proxy")
    suffix = f" ({', '.join(extras)})" if extras else ""
    return Decision(
        allowed=True,
        reason=REASON_ALLOWED,
        message=f'allowed: rule "{first.name}" ({first.where}) lets {who_what}{suffix}',
        rule=RuleRef(first.file, first.name, first.line),
        max_lifetime=max_lifetime,
        limited=limited,
        trace=tuple(trace),
        rules_checked=checked,
    )


def _deny(
    reason: str,
    message: str,
    rule: Rule | None,
    trace: list[TraceEntry],
    checked: int,
    ref: RuleRef | None = None,
) -> Decision:
    if rule is not None:
        ref = RuleRef(rule.file, rule.name, rule.line)
    return Decision(
        allowed=False,
        reason=reason,
        message=message,
        rule=ref,
        max_lifetime=None,
        limited=False,
        trace=tuple(trace),
        rules_checked=checked,
    )


_OWNER_FILE = "<owner policy>"


def _owner_list(
    request: Request, owner_policy: OwnerPolicy
) -> tuple[str, str, tuple[str, ...] | None] | None:
    """Which of the owner's lists governs this request: (key, human name, entries)."""
    if request.action is Action.RETRIEVE:
        if request.auth in (AuthMethod.CERTIFICATE, AuthMethod.TOKEN):
            # A bearer token, like a certificate, retrieves without the passphrase.
            return "trusted_retrievers", "trusted retrievers", owner_policy.trusted_retrievers
        return "retrievers", "retrievers", owner_policy.retrievers
    if request.action is Action.RENEW:
        return "renewers", "renewers", owner_policy.renewers
    if request.action is Action.RETRIEVE_KEY:
        return "key_retrievers", "key retrievers", owner_policy.key_retrievers
    return None


def _owner_layer(
    policy_set: PolicySet,
    request: Request,
    owner_policy: OwnerPolicy | None,
    trace: list[TraceEntry],
    who: str,
    hint: str,
) -> tuple[str, str, RuleRef] | None:
    """Apply the owner's lists; return (reason, message, ref) on denial, None to allow."""
    if owner_policy is None:
        return None
    selected = _owner_list(request, owner_policy)
    if selected is None:
        return None
    key, label, entries = selected
    if entries is None:
        trace.append(_owner_step(key, True, f"owner set no {label}"))
        return None
    compiled = compile_owner_entries(policy_set, entries)
    if isinstance(compiled, str):
        trace.append(_owner_step(key, False, compiled))
        message = (
            f"denied: the {label} list of {_describe_target(request)} cannot be used "
            f"({compiled}); the owner must store the credential again with a valid list"
        )
        return REASON_BAD_OWNER, message, RuleRef(_OWNER_FILE, key, 0)
    via = _first_match(compiled, request)
    if via is None:
        why = f"requester matches none of {_sources(compiled)}" if compiled else "list is empty"
        trace.append(_owner_step(key, False, why))
        message = (
            f"denied: the owner of {_describe_target(request)} does not list {who} among its "
            f"{label}; run `{hint}`"
        )
        return REASON_OWNER, message, RuleRef(_OWNER_FILE, key, 0)
    trace.append(_owner_step(key, True, f"requester matched {via}"))
    return None


def _owner_step(key: str, matched: bool, note: str) -> TraceEntry:
    """The trace line of the owner's list ``key``: whether it let the request through."""
    return TraceEntry("owner", key, _OWNER_FILE, 0, "allow", matched, note)


def compile_owner_entries(
    policy_set: PolicySet, entries: tuple[str, ...]
) -> tuple[Matcher, ...] | str:
    """Compile an owner list against the site's groups; a string is the error message.

    Results are cached on the PolicySet: the same lists recur on many credentials.
    """
    key = tuple(entries)
    cached = policy_set.owner_cache.get(key)
    if cached is not None:
        return cached
    result: tuple[Matcher, ...] | str
    try:
        matchers: list[Matcher] = []
        for entry in key:
            parsed = parse_pattern(entry, context="requester")
            if isinstance(parsed, GroupRef):
                members = policy_set.groups.get(parsed.name)
                if members is None:
                    raise PatternError(f'undefined group "{parsed.name}"')
                matchers.extend(Matcher(entry, member.leaf) for member in members)
            else:
                matchers.append(Matcher(entry, parsed))
        result = tuple(matchers)
    except PatternError as exc:
        result = str(exc)
    if len(policy_set.owner_cache) >= _OWNER_CACHE_LIMIT:
        policy_set.owner_cache.clear()
    policy_set.owner_cache[key] = result
    return result


def validate_owner_policy(policy_set: PolicySet, owner_policy: OwnerPolicy) -> None:
    """Raise InputError if any owner list entry is unusable (call it before storing)."""
    problems: list[str] = []
    for key in ("retrievers", "trusted_retrievers", "renewers", "key_retrievers"):
        entries: tuple[str, ...] | None = getattr(owner_policy, key)
        if entries is None:
            continue
        compiled = compile_owner_entries(policy_set, tuple(entries))
        if isinstance(compiled, str):
            problems.append(f"{key}: {compiled}")
    if problems:
        raise InputError("bad owner policy: " + "; ".join(problems), reason="bad_owner_policy")


def unsafe_rules(policy_set: PolicySet) -> tuple[Rule, ...]:
    """Allow rules that let *any* certificate holder retrieve without a passphrase.

    MyProxy accepts ``trusted_retrievers *`` only with ``default_trusted_retrievers
    none``: then only credentials whose owner named trusted retrievers (-Z) can be
    taken by certificate. The broker's form of that is ``owner_list_required = true``;
    without it, anyone with a certificate from any trusted CA could take anybody's
    credential. The server calls this at start-up and refuses a non-empty answer;
    ``broker policy check`` reports the same rules as errors.
    """
    found: list[Rule] = []
    for rule in policy_set.rules:
        if rule.effect is not Effect.ALLOW or Action.RETRIEVE not in rule.actions:
            continue
        if rule.auth is not None and AuthMethod.CERTIFICATE not in rule.auth:
            continue
        if rule.owner_list_required:
            continue  # only credentials whose owner named its trusted retrievers (-Z)
        if any(matches_any_dn(m.leaf) for m in rule.requester):
            found.append(rule)
    return tuple(found)


def unsafe_rule_message(rule: Rule) -> str:
    return (
        f'rule "{rule.name}" lets any DN retrieve credentials by certificate without a '
        'passphrase; add auth = ["passphrase"] or name the trusted retrievers'
    )


def _describe_requester(request: Request) -> str:
    if request.token is not None:
        return f"bearer token {request.token.issuer}#{request.token.subject}"
    if request.auth is AuthMethod.PAM:
        base = f"PAM user {request.username!r}"
        return f"{base} ({request.requester_dn})" if request.requester_dn else base
    if request.requester_dn is None:
        return "an anonymous requester with the passphrase"
    if request.auth is AuthMethod.PASSPHRASE:
        return f"{request.requester_dn} (with the passphrase)"
    return request.requester_dn


def _describe_target(request: Request) -> str:
    name = f" {request.credential!r}" if request.credential else ""
    return (
        f"credential{name} of {request.owner_dn}"
        if name
        else (f"credentials of {request.owner_dn}")
    )


def _checked_text(checked: int, files: tuple[str, ...], action: Action) -> str:
    if checked == 0:
        return f"no rule in the policy covers {action}"
    where = ", ".join(files[:3]) + (f" and {len(files) - 3} more files" if len(files) > 3 else "")
    return f"checked {checked} rule{'s' if checked != 1 else ''} in {where}"


def _explain_hint(request: Request) -> str:
    """The `broker policy explain` command line that reproduces this decision."""
    parts = ["broker", "policy", "explain"]
    if request.requester_dn is not None:
        parts += ["--requester", request.requester_dn]
    for fqan in request.requester_fqans:
        parts += ["--fqan", fqan]
    parts += ["--action", str(request.action), "--owner", request.owner_dn]
    for fqan in request.owner_fqans:
        parts += ["--owner-fqan", fqan]
    if request.credential:
        parts += ["--credential", request.credential]
    if request.job_id:
        parts += ["--job-id", request.job_id]
    if request.auth is not AuthMethod.CERTIFICATE:
        parts += ["--auth", str(request.auth)]
    if request.username:
        parts += ["--username", request.username]
    if request.token is not None:
        parts += ["--token-issuer", request.token.issuer, "--token-subject", request.token.subject]
        for group in request.token.groups:
            parts += ["--token-group", group]
        for scope in request.token.scopes:
            parts += ["--token-scope", scope]
    return shlex.join(parts)
