"""The read-only use cases behind the admin web page (``broker.api.admin``).

Who is an admin is policy: the members of one ``[groups]`` entry of the site
policy (``site-admins`` by default, the server setting ``admin_group``).  A
missing or empty group means nobody: the page is closed by default.  Membership
is checked on every request against the policy in force, so removing someone
from the group takes effect at the next policy reload, session or not.

Everything here reads: credentials (never their keys or passphrases), the audit
trail, the loaded policy, and ``policy explain`` (the engine's own
:func:`broker.policy.evaluate` with the full trace, exactly what the CLI runs).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime, timedelta

from broker.audit import AuditAction
from broker.config import ServerConfig
from broker.errors import AuthorizationError
from broker.naming import policy_name
from broker.policy import (
    AuthMethod,
    Decision,
    OwnerPolicy,
    PolicySet,
    Request,
    Rule,
    Subject,
    evaluate,
    format_duration,
    parse_fqan,
)
from broker.service import BrokerService, Requester
from broker.store import admin_queries as q

DEFAULT_ADMIN_GROUP = "site-admins"


@dataclass(frozen=True)
class AdminSettings:
    """The admin page's knobs (``[admin]``-style keys of the server configuration)."""

    group: str = DEFAULT_ADMIN_GROUP
    expiring_window: timedelta = timedelta(hours=24)
    session_lifetime: timedelta = timedelta(minutes=30)
    page_size: int = 50

    @classmethod
    def from_config(cls, config: ServerConfig) -> AdminSettings:
        return cls(
            group=config.admin_group,
            expiring_window=timedelta(hours=config.admin_expiring_hours),
            session_lifetime=timedelta(minutes=config.admin_session_minutes),
        )


@dataclass(frozen=True)
class RuleView:
    name: str
    file: str
    line: int
    actions: tuple[str, ...]
    effect: str
    requester: tuple[str, ...]
    owner: tuple[str, ...] | None
    credential: tuple[str, ...] | None
    auth: tuple[str, ...] | None
    max_lifetime: str | None
    limited: bool
    require_job_id: bool
    description: str


@dataclass(frozen=True)
class PolicyView:
    summary: str
    files: tuple[tuple[str, tuple[RuleView, ...]], ...]
    groups: tuple[tuple[str, tuple[str, ...]], ...]
    admin_group: str
    admin_group_defined: bool


@dataclass(frozen=True)
class ExplainQuery:
    """The "why" form: one request to decide, as ``broker policy explain`` takes it."""

    action: str
    owner_dn: str
    requester_dn: str | None = None
    requester_fqans: tuple[str, ...] = ()
    owner_fqans: tuple[str, ...] = ()
    credential: str = ""
    job_id: str | None = None
    auth: str = AuthMethod.CERTIFICATE.value
    username: str | None = None
    retrievers: tuple[str, ...] | None = None
    trusted_retrievers: tuple[str, ...] | None = None
    renewers: tuple[str, ...] | None = None


def _rule_view(rule: Rule) -> RuleView:
    return RuleView(
        name=rule.name,
        file=rule.file,
        line=rule.line,
        actions=tuple(sorted(a.value for a in rule.actions)),
        effect=rule.effect.value,
        requester=tuple(dict.fromkeys(m.source for m in rule.requester)),
        owner=None if rule.owner is None else tuple(dict.fromkeys(m.source for m in rule.owner)),
        credential=rule.credential,
        auth=None if rule.auth is None else tuple(sorted(a.value for a in rule.auth)),
        max_lifetime=None if rule.max_lifetime is None else format_duration(rule.max_lifetime),
        limited=rule.limited,
        require_job_id=rule.require_job_id,
        description=rule.description,
    )


def policy_view(policy: PolicySet, admin_group: str) -> PolicyView:
    """The loaded policy, file by file in load order, with its groups."""
    by_file: dict[str, list[RuleView]] = {name: [] for name in policy.files}
    for rule in sorted(policy.rules, key=lambda r: r.position):
        by_file.setdefault(rule.file, []).append(_rule_view(rule))
    groups = tuple(
        (name, tuple(dict.fromkeys(m.source for m in members)))
        for name, members in sorted(policy.groups.items())
    )
    return PolicyView(
        summary=policy.summary(),
        files=tuple((name, tuple(rules)) for name, rules in by_file.items()),
        groups=groups,
        admin_group=admin_group,
        admin_group_defined=admin_group in policy.groups,
    )


def is_admin(policy: PolicySet, group: str, requester: Requester) -> bool:
    """True when ``requester`` matches a member of the policy group ``group``.

    PAM users match ``pam:USER`` entries, certificate users DN and FQAN entries;
    a limited proxy (handed to jobs) is never an admin."""
    members = policy.groups.get(group)
    if not members or requester.limited:
        return False
    if requester.pam_user is not None and requester.dn is None:
        subject = Subject(dn=None, auth=AuthMethod.PAM, username=requester.pam_user)
    elif requester.dn is not None:
        fqans = tuple(parse_fqan(f) for f in requester.fqans)
        subject = Subject(dn=requester.dn, fqans=fqans, auth=AuthMethod.CERTIFICATE)
    else:
        return False
    return any(member.matches(subject) for member in members)


def explain(policy: PolicySet, query: ExplainQuery) -> Decision:
    """``broker policy explain``: the decision with every rule considered.

    Raises InputError (from :class:`broker.policy.Request`) for a malformed query."""
    request = Request(
        action=query.action,  # type: ignore[arg-type]  # Request checks it, naming the choices
        requester_dn=query.requester_dn,
        owner_dn=query.owner_dn,
        requester_fqans=query.requester_fqans,
        owner_fqans=query.owner_fqans,
        auth=query.auth,  # type: ignore[arg-type]  # Request validates it
        credential=policy_name(query.credential),
        job_id=query.job_id,
        username=query.username,
    )
    owner_policy = None
    if any(v is not None for v in (query.retrievers, query.trusted_retrievers, query.renewers)):
        owner_policy = OwnerPolicy(
            retrievers=query.retrievers,
            trusted_retrievers=query.trusted_retrievers,
            renewers=query.renewers,
        )
    return evaluate(policy, request, owner_policy, full_trace=True)


class AdminService:
    """The admin page's read-only view of one :class:`BrokerService`."""

    def __init__(self, service: BrokerService, settings: AdminSettings) -> None:
        self.service = service
        self.settings = settings

    def now(self) -> datetime:
        return self.service.now()

    def policy(self) -> PolicySet:
        # The service's policy source (reloaded when a file changes); read-only here.
        return self.service._policy()

    def session_key(self) -> bytes:
        """The key that signs admin session cookies, the same in every worker process.

        Derived from the active master key with its own label, so it is never the key
        that encrypts credentials; a master-key rotation ends every admin session."""
        ring = self.service.store.master_keys
        key = ring.get(ring.active_id)
        assert key is not None
        return hmac.new(key, b"broker admin session cookie v1", hashlib.sha256).digest()

    def is_admin(self, requester: Requester) -> bool:
        return is_admin(self.policy(), self.settings.group, requester)

    def credentials(
        self, *, owner_dn: str | None, expiring_only: bool, after: q.CredentialCursor | None
    ) -> q.CredentialPage:
        before = self.now() + self.settings.expiring_window if expiring_only else None
        return q.credential_page(
            self.service.store.engine,
            owner_dn=owner_dn,
            expiring_before=before,
            after=after,
            limit=self.settings.page_size,
        )

    def credential_counts(self) -> q.CredentialCounts:
        return q.credential_counts(
            self.service.store.engine, now=self.now(), window=self.settings.expiring_window
        )

    def audit(self, filters: q.AuditFilter, *, before: int | None) -> q.AuditPage:
        return q.audit_page(
            self.service.store.engine, filters, before=before, limit=self.settings.page_size
        )

    def chart(self, *, hours: int) -> list[q.ChartBucket]:
        """Allowed retrievals and refusals over the last ``hours``, about 24 bars."""
        now = self.now()
        bucket = timedelta(hours=max(1, hours // 24)) if hours >= 24 else timedelta(hours=1)
        return q.activity_chart(
            self.service.store.engine, since=now - timedelta(hours=hours), until=now, bucket=bucket
        )

    def policy_view(self) -> PolicyView:
        return policy_view(self.policy(), self.settings.group)

    def explain(self, query: ExplainQuery) -> Decision:
        return explain(self.policy(), query)

    def require_admin(self, requester: Requester) -> None:
        """Refuse (and audit) a signed-in party who is not in the policy's admin group."""
        with self.service.audited(requester, AuditAction.ADMIN_PAGE):
            if not self.is_admin(requester):
                raise AuthorizationError(
                    f"{requester.label} is not in the policy group {self.settings.group!r}",
                    reason="not_admin",
                )

    def audit_login(self, requester: Requester, *, reason: str) -> None:
        """An ``allow`` row for an admin's PAM login; raises StoreError when it cannot."""
        with self.service.audited(requester, AuditAction.ADMIN_LOGIN) as scope:
            scope.allow(reason)


def split_lines(text: str, *, limit: int = 64) -> tuple[str, ...]:
    """Form text with one entry per line (DNs may hold commas) as a tuple of entries."""
    return tuple(line.strip() for line in text.splitlines() if line.strip())[:limit]
