"""The use cases of the broker: the only module that combines pki, policy and store.

Edges (the REST API, the MyProxy endpoint, the CLIs) authenticate the caller,
build a :class:`Requester` and call one method here.  Every method asks the
policy, does its work in one store transaction and leaves an audit row, whether
it succeeds or is refused.

Flow of one credential::

    start_delegation  server makes key + CSR (pending, 10 min)   ─┐ broker-init /
    finish_delegation client's signed chain checked and stored   ─┘ myproxy-init (PUT)
    store_credential  a whole credential (chain + key) at once      myproxy-init STORE
    retrieve          sign a fresh proxy for the requester's CSR    pilots, broker-logon
    renew             retrieve, proving possession of an old proxy  HTCondor-style renewal
    info / destroy / change_passphrase
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
import unicodedata
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from broker.audit import AuditAction, Endpoint
from broker.delegation import (
    DEFAULT_PROXY_LIFETIME,
    DelegationOptions,
    options_from_pending,
    pending_params,
)
from broker.errors import (
    AuthenticationError,
    AuthorizationError,
    BrokerError,
    ChainError,
    CredentialError,
    DnSyntaxError,
    InputError,
    NotFound,
    TooManyAttempts,
)
from broker.fileio import validate_component
from broker.naming import DEFAULT_CREDENTIAL, policy_name
from broker.observability import observe_event
from broker.onlineca import OnlineCa
from broker.pki.chain import ChainInfo, validate_chain
from broker.pki.dn import slash_from_name
from broker.pki.loading import (
    Credential,
    chain_to_pem,
    key_to_pem,
    load_certificates,
    load_private_key,
    public_keys_equal,
)
from broker.pki.proxy import (
    ProxyType,
    SignatureCheck,
    check_signature,
    generate_key,
    load_csr,
    make_csr,
    proxy_info,
    sign_request,
)
from broker.pki.trust import TrustStore
from broker.pki.voms import VomsDir
from broker.policy import (
    REASON_JOB_ID,
    Action,
    AuthMethod,
    Decision,
    OwnerPolicy,
    PolicySet,
    Request,
    TokenClaims,
    evaluate,
    scope_covers,
    validate_owner_policy,
)
from broker.store import AuditEvent, CredentialRecord, CredentialWrite, Store
from broker.store.crypto import (
    INVALID_PASSPHRASE,
    INVALID_PASSPHRASE_REASON,
    is_owner_encrypted,
)
from broker.store.tokens import RefreshTokenRecord, RefreshTokenStore
from broker.tokens.errors import ScopeNotAllowed
from broker.tokens.issuers import DeviceAuthorization, IssuerDirectory, TokenResponse
from broker.tokens.settings import IssuerConfig
from broker.tokens.verify import verify_bearer

log = logging.getLogger("broker.service")

MIN_PROXY_LIFETIME = timedelta(minutes=5)
RENEWAL_CHALLENGE_TTL = timedelta(minutes=5)
CHALLENGE_SECRET_NAME = "renewal-challenge-hmac"  # noqa: S105 - a row name, not a secret
USERNAME_BINDINGS = ("dn", "none")


@dataclass(frozen=True)
class Requester:
    """Who is asking, as the edge established it."""

    dn: str | None  # identity (end-entity DN); None for an anonymous MyProxy client
    fqans: tuple[str, ...] = ()
    limited: bool = False
    chain_info: ChainInfo | None = None
    client_address: str | None = None
    endpoint: str = Endpoint.REST
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    pam_user: str | None = None
    token: TokenClaims | None = None  # a verified bearer token (see authenticate_bearer)
    started: float = field(default_factory=time.perf_counter, compare=False)  # for latency

    @classmethod
    def unverified(
        cls,
        *,
        chain: Sequence[x509.Certificate] = (),
        pam_user: str | None = None,
        client_address: str | None = None,
        endpoint: str = Endpoint.REST,
        request_id: str | None = None,
    ) -> Requester:
        """Who a refused login claimed to be, for its audit row: with a ``chain``, the
        chain's end-entity DN (OpenSSL verified the chain; only our own checks failed)."""
        return cls(
            dn=_claimed_identity(chain),
            pam_user=pam_user,
            client_address=client_address,
            endpoint=endpoint,
            request_id=request_id or uuid.uuid4().hex,
        )

    @property
    def label(self) -> str:
        if self.token is not None:
            return self.token.label
        return self.dn or (f"PAM user {self.pam_user}" if self.pam_user else "an anonymous client")


@dataclass(frozen=True)
class ServiceConfig:
    max_stored_lifetime: timedelta = timedelta(days=30)
    max_proxy_lifetime: timedelta = timedelta(days=7)
    delegation_key: str = "rsa"  # the key the server makes for a delegation: rsa | ec
    delegation_key_bits: int = 2048
    accept_limited: bool = False  # store limited chains (they can only yield limited proxies)
    pending_ttl: timedelta = timedelta(minutes=10)
    # Wrong passphrases for one credential from one client address: after this many
    # within the window, further attempts are refused (429) without trying them.
    passphrase_failures: int = 5
    passphrase_failure_window: timedelta = timedelta(minutes=10)
    # Unexpired pending delegations one requester may hold (each is a server-made key).
    max_pending_per_user: int = 10
    # "dn": a credential may be stored only under the username derived from its owner's
    # DN (see dn_username); "none": first come, first served (the old behaviour).
    username_binding: str = "none"
    # Refusals of unauthenticated clients: the first per (endpoint, address, action,
    # reason) and window is written as it is, the rest are counted into one row.
    refusal_audit_window: timedelta = timedelta(seconds=60)


@dataclass(frozen=True)
class PendingInfo:
    id: str
    csr_pem: bytes
    expires_at: datetime


@dataclass(frozen=True)
class CredentialSummary:
    owner_dn: str
    username: str
    name: str
    description: str | None
    not_after: datetime
    retrievers: tuple[str, ...]
    trusted_retrievers: tuple[str, ...]
    renewers: tuple[str, ...]
    max_proxy_lifetime: int | None
    limited: bool
    passphrase_protected: bool
    created_at: datetime
    updated_at: datetime
    key_retrievers: tuple[str, ...] = ()  # MyProxy -E (KEYRETRIEVERS)


# The one summary field whose record attribute has another name.
_SUMMARY_RENAMED = {"max_proxy_lifetime": "max_lifetime_seconds"}


def _summary(record: CredentialRecord) -> CredentialSummary:
    """The record's public part: every CredentialSummary field taken from the record by name."""
    return CredentialSummary(
        **{
            f.name: getattr(record, _SUMMARY_RENAMED.get(f.name, f.name))
            for f in fields(CredentialSummary)
        }
    )


@dataclass(frozen=True)
class IssuedProxy:
    chain: tuple[x509.Certificate, ...]
    lifetime: timedelta
    limited: bool
    owner_dn: str
    username: str
    name: str

    def pem(self) -> bytes:
        return chain_to_pem(self.chain)


@dataclass(frozen=True)
class RetrievalGrant:
    """An authorized retrieval waiting for its CSR (see :meth:`BrokerService.issue`)."""

    record: CredentialRecord
    decision: Decision
    action: Action
    job_id: str | None
    issuer: Credential = field(repr=False)


class _Lru:
    """A small thread-safe LRU with per-entry expiry (seconds of ``clock``)."""

    def __init__(self, size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._size = size
        self._clock = clock
        self._items: OrderedDict[Any, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            expires, value = item
            if expires < self._clock():
                del self._items[key]
                return None
            self._items.move_to_end(key)
            return value

    def put(self, key: Any, value: Any, ttl: float) -> None:
        with self._lock:
            self._items[key] = (self._clock() + ttl, value)
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


def _owner_policy(record: CredentialRecord) -> OwnerPolicy | None:
    if not (
        record.retrievers or record.trusted_retrievers or record.renewers or record.key_retrievers
    ):
        return None
    return OwnerPolicy(
        retrievers=record.retrievers or None,
        trusted_retrievers=record.trusted_retrievers or None,
        renewers=record.renewers or None,
        key_retrievers=record.key_retrievers or None,
    )


class _RefusalAggregator:
    """Rate-limits audit rows of unauthenticated refusals without losing their count.

    Per key (endpoint, client address, action, reason code) the first refusal of a
    window is written at once; later ones only increment a counter, and when the window
    has passed one row says how many there were (``reason`` starts with
    ``aggregated:``). Per process: with N workers at most N rows per key and window."""

    def __init__(self, window: timedelta, max_keys: int = 10_000) -> None:
        self._window = window
        self._max_keys = max_keys
        self._lock = threading.Lock()
        # key -> [window start, suppressed count, last suppressed event]
        self._open: dict[tuple[Any, ...], list[Any]] = {}
        self._overdue: list[tuple[AuditEvent, int, datetime]] = []

    def admit(self, event: AuditEvent, reason: str, now: datetime) -> bool:
        if self._window <= timedelta(0):
            return True
        key = (event.endpoint, event.client_address, event.action, reason)
        with self._lock:
            entry = self._open.get(key)
            if entry is None or now - entry[0] >= self._window:
                if entry is not None and entry[1]:
                    self._overdue.append((entry[2], entry[1], entry[0]))
                if entry is None and len(self._open) >= self._max_keys:
                    return True  # never drop the count: write the row itself
                self._open[key] = [now, 0, None]
                return True
            entry[1] += 1
            entry[2] = event
            return False

    def due(self, now: datetime, *, force: bool) -> list[tuple[AuditEvent, int]]:
        """Summary rows for windows that ended (all of them with ``force``)."""
        with self._lock:
            rows = list(self._overdue)
            self._overdue.clear()
            for key, entry in list(self._open.items()):
                if force or now - entry[0] >= self._window:
                    if entry[1]:
                        rows.append((entry[2], entry[1], entry[0]))
                    del self._open[key]
        out = []
        for event, count, start in rows:
            seconds = int(self._window.total_seconds())
            out.append(
                (
                    dataclasses.replace(
                        event,
                        # one row for many requests: not one request's job id or FQANs
                        requester_fqans=(),
                        job_id=None,
                        reason=f"aggregated: {count} more refusals like this one from "
                        f"{event.client_address or 'an unknown address'} in the {seconds} s "
                        f"after {start:%Y-%m-%d %H:%M:%S} UTC; the last: {event.reason}"[:4000],
                    ),
                    count,
                )
            )
        return out


_USERNAME_CHARS = re.compile(r"[^a-z0-9._-]+")


#: Longest username in UTF-8 bytes. MyProxy keeps usernames in a file name of the
#: storage directory plus its request buffer; its test script uses a 1,171-character
#: name. 1,500 bytes leave room for the credential name in a PostgreSQL btree key.
MAX_USERNAME_BYTES = 1500
# Characters that could break a log line or hide text: C0/C1 controls, DEL, Unicode
# line/paragraph separators, bidi and other format characters.
_UNSAFE_USERNAME_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def validate_username(username: object) -> str:
    """Return ``username`` if the broker accepts it as a username (a database key only).

    MyProxy accepts any text as a username, DNs included (``myproxy-init -d``); so does
    the broker, up to :data:`MAX_USERNAME_BYTES`. Refused: empty names, control, format
    and separator characters (NUL, newlines, ESC, bidi overrides...), so a username is
    safe in a log line and an ERROR message. Usernames never become file names.
    """
    if not isinstance(username, str):
        raise DnSyntaxError(f"the username must be text, not {type(username).__name__}")
    if not username:
        raise DnSyntaxError("the username is empty; give one with -l")
    size = len(username.encode("utf-8", "surrogatepass"))
    if size > MAX_USERNAME_BYTES:
        raise DnSyntaxError(f"the username is {size} bytes long; the limit is {MAX_USERNAME_BYTES}")
    for char in username:
        if unicodedata.category(char) in _UNSAFE_USERNAME_CATEGORIES:
            raise DnSyntaxError(
                f"the username contains the character U+{ord(char):04X}, which "
                "is not allowed (control, format or line separator)"
            )
    return username


def dn_username(dn: str) -> str | None:
    """The username a DN may store credentials under with ``username_binding = "dn"``:
    its last CN, lower-cased, with runs of other characters than a-z 0-9 . _ - made one
    "-" (``/DC=org/CN=Alice Smith`` -> ``alice-smith``). None when the DN has no CN."""
    cns = [part[3:] for part in dn.split("/") if part.upper().startswith("CN=")]
    if not cns:
        return None
    name = _USERNAME_CHARS.sub("-", cns[-1].lower()).strip("-.")
    return name or None


class BrokerService:
    """The broker's use cases; one instance per server process, thread-safe."""

    def __init__(
        self,
        store: Store,
        trust: TrustStore | Callable[[], TrustStore],
        policy: Callable[[], PolicySet],
        *,
        vomsdir: VomsDir | None = None,
        config: ServiceConfig | None = None,
        clock: Callable[[], datetime] | None = None,
        challenge_secret: bytes | None = None,
    ) -> None:
        self.store = store
        self._trust = trust
        self._policy = policy
        self.vomsdir = vomsdir
        self.config = config or ServiceConfig()
        self._clock = clock or (lambda: datetime.now(UTC))
        # Expiry follows the service's clock, so that tests can move time forward.
        self._chain_cache = _Lru(4096, lambda: self.now().timestamp())
        self._owner_cache = _Lru(4096, lambda: self.now().timestamp())
        # Shared by every worker and node through the database (created once), so a
        # challenge one worker issues verifies in another; tests may inject their own.
        self._challenge_secret_value = challenge_secret
        self._secret_lock = threading.Lock()
        self._counters: dict[str, int] = {
            "pending_purged": 0,
            "challenges_purged": 0,
            "passphrase_attempts_purged": 0,
            "refusals_aggregated": 0,
        }
        self._refusals = _RefusalAggregator(self.config.refusal_audit_window)

    @property
    def _challenge_secret(self) -> bytes:
        with self._secret_lock:
            if self._challenge_secret_value is None:
                self._challenge_secret_value = self.store.shared_secret(
                    CHALLENGE_SECRET_NAME, now=self.now()
                )
            return self._challenge_secret_value

    def counters(self) -> dict[str, int]:
        """Running totals of this process's housekeeping (for /metrics)."""
        with self._secret_lock:
            return dict(self._counters)

    def _count(self, key: str, amount: int) -> None:
        with self._secret_lock:
            self._counters[key] = self._counters.get(key, 0) + amount

    def maintain(self) -> dict[str, int]:
        """Housekeeping, run on a schedule by the runtime (every process): remove expired
        pending delegations (each an encrypted private key), answered challenges and old
        passphrase attempts, and write the aggregated refusal rows that are due."""
        now = self.now()
        horizon = now - max(self.config.passphrase_failure_window, timedelta(minutes=1))
        purged = self.store.purge_expired(now, attempts_before=horizon)
        self._count("pending_purged", purged.get("pending", 0))
        self._count("challenges_purged", purged.get("challenges", 0))
        self._count("passphrase_attempts_purged", purged.get("attempts", 0))
        self._flush_refusals(now, force=False)
        if purged.get("pending"):
            log.info("purged %d expired pending delegations", purged["pending"])
        return purged

    def flush_refusals(self) -> None:
        """Write the aggregated refusal rows of every open window (at process exit)."""
        self._flush_refusals(self.now(), force=True)

    def _flush_refusals(self, now: datetime, *, force: bool) -> None:
        for event, count in self._refusals.due(now, force=force):
            try:
                self.store.add_audit(event, now=self.now())
            except BrokerError:
                log.exception("could not write an aggregated refusal row (%d refusals)", count)

    def now(self) -> datetime:
        return self._clock()

    @property
    def trust(self) -> TrustStore:
        """The CA directory's current contents (the runtime reloads it when it changes)."""
        return self._trust() if callable(self._trust) else self._trust

    # ------------------------------------------------------------------ identity

    def authenticate_chain(
        self,
        chain: Sequence[x509.Certificate],
        *,
        client_address: str | None = None,
        endpoint: str = Endpoint.REST,
        request_id: str | None = None,
    ) -> Requester:
        """Validate a TLS peer's verified chain (our RFC 3820 + VOMS rules on top of OpenSSL)."""
        if not chain:
            raise AuthenticationError(
                "no verified client certificate chain is available; present a certificate or "
                "proxy signed by a CA in the broker's CA directory",
                reason="no_chain",
            )
        now = self.now()
        key = hashlib.sha256(
            b"".join(c.public_bytes(serialization.Encoding.DER) for c in chain)
        ).digest()
        # A verdict holds only for the trust store it was reached with: a reloaded CA
        # directory (new CRL, removed CA) is a new store object and voids every cached one.
        trust = self.trust
        cached: tuple[TrustStore, ChainInfo] | None = self._chain_cache.get(key)
        info = cached[1] if cached is not None and cached[0] is trust else None
        if info is None or info.not_after <= now:
            try:
                info = validate_chain(chain, trust, now=now, vomsdir=self.vomsdir)
            except ChainError as exc:
                raise AuthenticationError(
                    f"the client certificate chain was refused: {exc.message}", reason=exc.reason
                ) from exc
            self._chain_cache.put(key, (trust, info), ttl=60.0)
        return Requester(
            dn=info.identity,
            fqans=info.fqans,
            limited=info.limited,
            chain_info=info,
            client_address=client_address,
            endpoint=endpoint,
            request_id=request_id or uuid.uuid4().hex,
        )

    # ------------------------------------------------------------------ helpers

    def _audit(
        self,
        requester: Requester,
        action: AuditAction | Action | str,
        decision: str,
        *,
        reason: str | None,
        owner_dn: str | None = None,
        username: str | None = None,
        name: str | None = None,
        job_id: str | None = None,
    ) -> AuditEvent:
        requester_dn = requester.dn or (f"pam:{requester.pam_user}" if requester.pam_user else None)
        if requester.token is not None:
            requester_dn = requester.token.label
        # Refused requests carry whatever the client sent (NUL, control characters, huge
        # names); the row must still be written, so such text is escaped and shortened.
        event = AuditEvent(
            action=AuditAction(action).value,
            decision=decision,
            endpoint=Endpoint(requester.endpoint).value,
            time=self.now(),
            requester_dn=_audit_text(requester_dn, 1024),
            requester_fqans=tuple(_audit_text(f, 1024) or "" for f in requester.fqans),
            owner_dn=_audit_text(owner_dn, 1024),
            username=_audit_text(username, 128),
            credential_name=_audit_text(name, 128),
            job_id=_audit_text(job_id, 255),
            reason=reason if reason is None or len(reason) <= 4000 else reason[:3997] + "...",
            client_address=requester.client_address,
            request_id=_audit_text(requester.request_id, 128),
        )
        observe_event(event, requester.started)  # metrics and the request log line
        return event

    @contextmanager
    def audited(
        self,
        requester: Requester | Callable[[], Requester],
        action: AuditAction | Action,
        where: dict[str, Any] | None = None,
        *,
        unauthenticated: bool = False,
    ) -> Iterator[AuditScope]:
        """Run one use case (the service's or an edge's); every refusal inside it leaves
        one audit row, then propagates. The one way anything writes a refusal's row.

        ``where`` (owner, username, name, job id) is read when the refusal happens, so
        the use case may fill it in as it learns them; ``scope.action`` may be changed
        the same way. A refusal already audited by an inner scope is not written again.
        A refusal raised through ``scope.refuse(real, public=...)`` is audited with its
        real reason and re-raised as its public face (or as ``scope.concealed_as()``);
        ``scope.on_failure`` runs first (e.g. to settle a passphrase attempt).
        ``scope.allow(reason)`` asks for an ``allow`` row when the block completes (an
        edge's own use case, e.g. the online CA); a failure to write it propagates.
        ``unauthenticated``: nobody is accountable for the request (a refused login), so
        its refusals are aggregated like an anonymous client's. ``requester`` may be a
        function: a login's claimed identity is then worked out only for a row.
        """
        scope = AuditScope(action, {} if where is None else where)
        try:
            yield scope
        except _Concealed as hidden:
            public = hidden.public
            if public is None and scope.concealed_as is not None:
                public = scope.concealed_as()
            if public is None:
                raise
            if scope.on_failure is not None:
                scope.on_failure(hidden.real, True)
            self._record_failure(requester, scope, hidden.real, unauthenticated)
            public.audited = True
            raise public from None
        except BrokerError as exc:
            if exc.audited:
                raise
            if scope.on_failure is not None:
                scope.on_failure(exc, False)
            self._record_failure(requester, scope, exc, unauthenticated)
            raise
        if scope.allowed is not None:
            reason, more = scope.allowed
            event = self._audit(
                _resolve(requester), scope.action, "allow", reason=reason, **scope.where, **more
            )
            self.store.add_audit(event, now=self.now())

    def _record_failure(
        self,
        who: Requester | Callable[[], Requester],
        scope: AuditScope,
        exc: BrokerError,
        unauthenticated: bool,
    ) -> None:
        """Write the refusal's row (never raises: a failure to write it is logged)."""
        exc.audited = True
        requester = _resolve(who)
        event = self._audit(
            requester,
            scope.action,
            exc.audit_decision,
            reason=f"{exc.reason}: {exc.message}",
            **scope.where,
        )
        if unauthenticated or (requester.dn is None and requester.pam_user is None):
            # Nobody is accountable for these, so one client could write rows as fast as
            # it can connect: the first of a kind per window is written, the rest counted.
            if not self._refusals.admit(event, exc.reason, self.now()):
                self._count("refusals_aggregated", 1)
                return
        try:
            self.store.add_audit(event, now=self.now())
        except BrokerError:
            log.exception("could not write the audit row for a refused %s", scope.action)

    def _decide(
        self,
        requester: Requester,
        action: Action,
        *,
        owner_dn: str,
        owner_fqans: Sequence[str] = (),
        name: str,
        username: str | None,
        job_id: str | None = None,
        auth: AuthMethod = AuthMethod.CERTIFICATE,
        owner_policy: OwnerPolicy | None = None,
    ) -> Decision:
        request = Request(
            action=action,
            requester_dn=requester.dn,
            owner_dn=owner_dn,
            requester_fqans=requester.fqans,
            owner_fqans=tuple(owner_fqans),
            auth=auth,
            credential=policy_name(name),
            job_id=job_id,
            username=username,
            token=requester.token if auth is AuthMethod.TOKEN else None,
        )
        return evaluate(self._policy(), request, owner_policy)

    def _owner_fqans(self, record: CredentialRecord) -> tuple[str, ...]:
        """The verified FQANs of a stored chain; raises CredentialError when it no longer
        verifies (a revoked user, a CA removed from the CA directory)."""
        key = (record.id, record.updated_at)
        trust = self.trust
        cached = self._owner_cache.get(key)
        if cached is not None and cached[0] is trust:
            return tuple(cached[1])
        chain = load_certificates(record.certificate_chain.encode())
        try:
            info = validate_chain(chain, trust, now=self.now(), vomsdir=self.vomsdir)
        except ChainError as exc:
            raise CredentialError(
                f"the stored credential {record.username}/{record.name} no longer verifies: "
                f"{exc.message}",
                reason=exc.reason,
            ) from exc
        if info.independent:
            # Stored before delegation refused independent proxies (or written behind our back).
            raise CredentialError(
                f"the stored credential {record.username}/{record.name} holds an independent "
                f"proxy ({info.identity}), which is not a credential of {record.owner_dn}",
                reason="independent_proxy",
            )
        # Tied to the trust store: a reloaded CA directory (new CRL) voids it at once.
        self._owner_cache.put(key, (trust, info.fqans), ttl=60.0)
        return info.fqans

    def credential(self, username: str, name: str = DEFAULT_CREDENTIAL) -> CredentialRecord:
        """A stored credential by username and name (NotFound; bad names are InputError).

        For edges that must look before they act, e.g. MyProxy refusing before its OK."""
        return self._find(username=username, owner_dn=None, name=name)

    def _find(self, *, username: str | None, owner_dn: str | None, name: str) -> CredentialRecord:
        validate_component(name, what="credential name")
        if username:
            validate_username(username)
            record = self.store.get_credential(username, name)
            if owner_dn and record.owner_dn != owner_dn:
                raise NotFound(f"no credential {name!r} of {owner_dn} under username {username!r}")
            return record
        if owner_dn:
            matches = [r for r in self.store.find_credentials(owner_dn) if r.name == name]
            if not matches:
                raise NotFound(
                    f"no credential named {name!r} is stored for {owner_dn}; the owner can "
                    f"store one with: broker-init -k {name}"
                )
            if len(matches) > 1:
                raise InputError(
                    f"{owner_dn} has credentials named {name!r} under several usernames "
                    f"({', '.join(r.username for r in matches)}); give the username"
                )
            return matches[0]
        raise InputError("name the credential's owner: a username or the owner's DN")

    def _authorize_delegation(self, requester: Requester, options: DelegationOptions) -> Decision:
        """Refuse options out of bounds, a username bound to someone else, or a delegation
        the policy does not allow (before any key is made or chain is read)."""
        self._check_options(options)
        self._check_username_binding(requester, options.username)
        return self._may_delegate(requester, options.username, options.name)

    def _may_delegate(self, requester: Requester, username: str, name: str) -> Decision:
        """The policy's allowing ``delegate`` decision for the requester's own slot."""
        if requester.dn is None:
            raise AuthenticationError("delegation needs a client certificate or proxy")
        decision = self._decide(
            requester,
            Action.DELEGATE,
            owner_dn=requester.dn,
            owner_fqans=requester.fqans,
            name=name,
            username=username,
        )
        decision.raise_if_denied()
        return decision

    def _check_username_binding(self, requester: Requester, username: str) -> None:
        """With ``username_binding = "dn"`` the username is the owner's DN-derived name, so
        nobody can store a credential under another person's username."""
        if self.config.username_binding != "dn" or requester.dn is None:
            return
        bound = dn_username(requester.dn)
        # myproxy-init -d: the owner's own DN is as bound to the owner as its CN.
        if username != bound and username != requester.dn:
            raise AuthorizationError(
                f"this broker binds usernames to identities: {requester.dn} may store "
                + (
                    f"credentials only under the username {bound!r} (-l {bound}), not {username!r}"
                    if bound
                    else "no credential (its DN has no CN)"
                ),
                reason="username_binding",
            )

    def _check_options(self, options: DelegationOptions) -> None:
        validate_username(options.username)
        validate_component(options.name, what="credential name")
        if options.stored_lifetime <= timedelta(0) or options.max_proxy_lifetime <= timedelta(0):
            raise InputError("credential and proxy lifetimes must be positive")
        if options.stored_lifetime > self.config.max_stored_lifetime:
            raise InputError(
                f"a stored credential may live at most {self.config.max_stored_lifetime}; "
                "ask for less with -c HOURS"
            )
        if options.description is not None and len(options.description) > 1024:
            raise InputError("the description is longer than 1024 characters")
        owner_policy = OwnerPolicy(
            retrievers=options.retrievers or None,
            trusted_retrievers=options.trusted_retrievers or None,
            renewers=options.renewers or None,
            key_retrievers=options.key_retrievers or None,
        )
        validate_owner_policy(self._policy(), owner_policy)

    # ------------------------------------------------------------------ delegation

    def start_delegation(self, requester: Requester, options: DelegationOptions) -> PendingInfo:
        """Make a key and CSR for the requester to sign (the key never leaves the server)."""
        where: dict[str, Any] = {
            "owner_dn": requester.dn,
            "username": options.username,
            "name": options.name,
        }
        with self.audited(requester, AuditAction.DELEGATE_START, where):
            if requester.dn is None:
                raise AuthenticationError("delegation needs a client certificate or proxy")
            if requester.limited and not self.config.accept_limited:
                # Refused before a key is made and a pending row is written: the chain it
                # would sign is limited, and this broker would refuse it at the end anyway.
                _refuse_limited(requester, "start a delegation on this broker")
            decision = self._authorize_delegation(requester, options)
            key = generate_key(self.config.delegation_key, self.config.delegation_key_bits)
            csr = make_csr(key)
            pending = self.store.create_pending(
                requester_dn=requester.dn,
                username=options.username,
                name=options.name,
                private_key_pem=key_to_pem(key),
                params=pending_params(options),
                now=self.now(),
                ttl=self.config.pending_ttl,
                audit=self._audit(
                    requester, AuditAction.DELEGATE_START, "allow", reason=decision.reason, **where
                ),
                max_live=self.config.max_pending_per_user or None,
            )
        return PendingInfo(
            id=pending.id,
            csr_pem=csr.public_bytes(serialization.Encoding.PEM),
            expires_at=pending.expires_at,
        )

    def finish_delegation(
        self,
        requester: Requester,
        pending_id: str,
        chain_pem: bytes,
        *,
        passphrase: str | None = None,
    ) -> CredentialSummary:
        """Check the chain the client signed for our CSR and store it with the owner policy."""
        where: dict[str, Any] = {"owner_dn": requester.dn}
        with self.audited(requester, AuditAction.DELEGATE, where):
            if requester.dn is None:
                raise AuthenticationError("delegation needs a client certificate or proxy")
            now = self.now()
            pending = self.store.get_pending(pending_id, requester.dn, now=now)
            where.update(username=pending.username, name=pending.name)
            options = options_from_pending(pending.username, pending.name, pending.params)
            chain = load_certificates(chain_pem, what="delegated chain")
            # The store checks, inside its transaction, that chain[0] carries the pending key.
            info = self._check_delegated_chain(requester, chain, now)
            record = self._store_chain(
                requester,
                options,
                chain,
                info,
                now,
                passphrase=passphrase,
                consume_pending=pending.id,
                key_pem=None,
            )
        return _summary(record)

    def _check_delegated_chain(
        self, requester: Requester, chain: Sequence[x509.Certificate], now: datetime
    ) -> ChainInfo:
        try:
            info = validate_chain(chain, self.trust, now=now, vomsdir=self.vomsdir)
        except ChainError as exc:
            raise ChainError(
                f"the delegated chain does not verify: {exc.message}", reason=exc.reason
            ) from exc
        if info.independent:
            raise ChainError(
                f"the delegated chain holds an independent proxy ({info.identity}), which "
                f"carries none of {info.end_entity}'s rights; delegate an impersonation proxy",
                reason="independent_proxy",
            )
        if info.identity != requester.dn:
            raise AuthorizationError(
                f"the delegated chain belongs to {info.identity}, but you authenticated as "
                f"{requester.dn}; delegate your own credential",
                reason="foreign_chain",
            )
        if info.limited and not self.config.accept_limited:
            raise ChainError(
                "the delegated chain is a limited proxy; this broker stores only full proxies "
                "(create the proxy without -limited)",
                reason="limited_chain",
            )
        return info

    def _store_chain(
        self,
        requester: Requester,
        options: DelegationOptions,
        chain: Sequence[x509.Certificate],
        info: ChainInfo,
        now: datetime,
        *,
        passphrase: str | None,
        consume_pending: str | None,
        key_pem: bytes | None,
        owner_encrypted_key: bool = False,
    ) -> CredentialRecord:
        assert requester.dn is not None
        # The owner's -c (and the site's maximum) ends the credential before its chain does.
        stored_until = min(
            info.not_after, now + options.stored_lifetime, now + self.config.max_stored_lifetime
        )
        if info.not_after <= now + MIN_PROXY_LIFETIME:
            raise CredentialError(
                "the delegated chain expires in less than 5 minutes; make a longer proxy",
                reason="expired",
            )
        max_lifetime = min(options.max_proxy_lifetime, self.config.max_proxy_lifetime)
        return self.store.put_credential(
            CredentialWrite(
                owner_dn=requester.dn,
                username=options.username,
                name=options.name,
                private_key_pem=key_pem,
                certificate_chain=chain_to_pem(chain).decode(),
                description=options.description,
                retrievers=options.retrievers,
                trusted_retrievers=options.trusted_retrievers,
                renewers=options.renewers,
                key_retrievers=options.key_retrievers,
                max_lifetime_seconds=int(max_lifetime.total_seconds()),
                limited=info.limited,
                passphrase=passphrase or options.passphrase,
                consume_pending=consume_pending,
                not_after=stored_until,
                owner_encrypted_key=owner_encrypted_key,
            ),
            now=now,
            audit=self._audit(
                requester,
                AuditAction.DELEGATE,
                "allow",
                reason="stored",
                owner_dn=requester.dn,
                username=options.username,
                name=options.name,
            ),
        )

    def store_credential(
        self,
        requester: Requester,
        options: DelegationOptions,
        credential: Credential,
        *,
        encrypted_key_pem: bytes | None = None,
    ) -> CredentialSummary:
        """Store a whole credential (MyProxy STORE): the client hands over chain and key.

        ``encrypted_key_pem``: the key as the owner encrypted it with its passphrase
        (``credential.key`` is then None). It is kept encrypted inside the envelope and
        opened only by a retrieval with that passphrase, as MyProxy does."""
        where: dict[str, Any] = {
            "owner_dn": requester.dn,
            "username": options.username,
            "name": options.name,
        }
        with self.audited(requester, AuditAction.STORE, where):
            if requester.dn is None or (credential.key is None) == (encrypted_key_pem is None):
                raise AuthenticationError("storing a credential needs a client certificate")
            if encrypted_key_pem is not None and options.passphrase is not None:
                raise InputError(
                    "an encrypted key is stored without PASSPHRASE: its own passphrase protects it"
                )
            self._authorize_delegation(requester, options)
            now = self.now()
            info = self._check_delegated_chain(requester, credential.chain, now)
            record = self._store_chain(
                requester,
                options,
                credential.chain,
                info,
                now,
                passphrase=options.passphrase,
                consume_pending=None,
                key_pem=(
                    encrypted_key_pem if credential.key is None else key_to_pem(credential.key)
                ),
                owner_encrypted_key=encrypted_key_pem is not None,
            )
        return _summary(record)

    # ------------------------------------------------------------------ retrieval

    def authorize_retrieval(
        self,
        requester: Requester,
        *,
        username: str | None = None,
        owner_dn: str | None = None,
        name: str = DEFAULT_CREDENTIAL,
        job_id: str | None = None,
        passphrase: str | None = None,
        action: Action = Action.RETRIEVE,
        record: CredentialRecord | None = None,
        _authz_owner: str | None = None,
    ) -> RetrievalGrant:
        """Everything a retrieval checks, and the decrypted issuer, before any CSR is read.

        The MyProxy endpoint must refuse before it says OK (the C clients show the
        server's text only then), so the decision is separate from the signing:
        :meth:`issue` completes a grant. A refusal here is audited; the allow row is
        written by :meth:`issue`.
        """
        where: dict[str, Any] = {
            "owner_dn": owner_dn,
            "username": username,
            "name": name,
            "job_id": job_id,
        }
        attempt: int | None = None

        def settle(exc: BrokerError, concealed: bool) -> None:
            if attempt is not None:
                self._finish_passphrase_attempt(
                    attempt, failed=concealed or exc.reason == INVALID_PASSPHRASE_REASON
                )

        def concealed_as() -> BrokerError:
            return _not_found(
                username or (record.username if record and not owner_dn else None),
                owner_dn,
                name if record is None else record.name,
            )

        with self.audited(requester, action, where) as scope:
            scope.on_failure, scope.concealed_as = settle, concealed_as
            if job_id is not None:
                _check_job_id(job_id)
            if record is None:
                record = self._find(username=username, owner_dn=owner_dn, name=name)
            where.update(owner_dn=record.owner_dn, username=record.username, name=record.name)
            auth = _retrieval_auth_method(requester, record, action, passphrase)
            if record.not_after <= self.now():
                self._refuse_expired(requester, record, action, auth, job_id)
            decision = self._allowed_decision(requester, record, action, auth, job_id)
            _check_retrieval_form(record, action, passphrase, _authz_owner)
            if passphrase is not None:
                # Reserved before scrypt runs, so concurrent guesses cannot pass the limit.
                attempt = self._reserve_passphrase_attempt(requester, record)
                if not record.passphrase_protected:
                    # A passphrase proves nothing about a credential stored without one
                    # (myproxy-init -n, broker-init without -S): it must not open it. To
                    # the client this is a wrong passphrase (and counts as one).
                    scope.refuse(_no_passphrase_set(record), public=_wrong_passphrase())
            key_pem = self.store.decrypt_private_key(record, passphrase)
            if attempt is not None:
                self._finish_passphrase_attempt(attempt, failed=False)
                attempt = None
            if passphrase is not None and is_owner_encrypted(record.envelope):
                self._reseal_owner_encrypted(record, passphrase)
            if record.not_after <= self.now():
                raise _expired_error(record)
            issuer = _stored_issuer(record, key_pem)
        return RetrievalGrant(
            record=record, decision=decision, action=action, job_id=job_id, issuer=issuer
        )

    def _refuse_expired(
        self,
        requester: Requester,
        record: CredentialRecord,
        action: Action,
        auth: AuthMethod,
        job_id: str | None,
    ) -> NoReturn:
        """Refuse a retrieval of an expired credential, concealing it from strangers.

        An expired chain no longer verifies (so it has no FQANs to offer the policy);
        the owner and the parties the policy lets in are told it expired.
        """
        probe = self._decide(
            requester,
            action,
            owner_dn=record.owner_dn,
            name=record.name,
            username=record.username,
            job_id=job_id,
            auth=auth,
            owner_policy=_owner_policy(record),
        )
        if not probe.allowed:
            raise _Concealed(AuthorizationError(probe.message, reason=probe.reason))
        raise _expired_error(record)

    def _allowed_decision(
        self,
        requester: Requester,
        record: CredentialRecord,
        action: Action,
        auth: AuthMethod,
        job_id: str | None,
    ) -> Decision:
        """The policy's allowing decision for this retrieval; a denial raises."""
        decision = self.decide(requester, record, action, auth, job_id=job_id)
        if not decision.allowed:
            if decision.reason == REASON_JOB_ID:
                # A rule admits this requester for the credential; only the job id is
                # missing. It has a right here, and the pilot developer needs the reason.
                decision.raise_if_denied()
            # No right on the credential: the answer must not tell it exists.
            raise _Concealed(AuthorizationError(decision.message, reason=decision.reason))
        return decision

    def _reseal_owner_encrypted(self, record: CredentialRecord, passphrase: str) -> None:
        """A key stored as its owner encrypted it (MyProxy STORE) is protected only by the
        PEM's own key derivation (one MD5 round for Proc-Type PEMs). Once its passphrase is
        known to be right, seal it again under the broker's scrypt layer; a failure leaves
        the credential as it was (the retrieval goes on)."""
        try:
            self.store.change_passphrase(
                record.username,
                record.name,
                old_passphrase=passphrase,
                new_passphrase=passphrase,
                owner_dn=record.owner_dn,
                now=self.now(),
            )
        except BrokerError as exc:
            log.info(
                "kept %s/%s as stored by its owner: %s", record.username, record.name, exc.message
            )

    def authenticated_only(self, requester: Requester, grant: RetrievalGrant) -> None:
        """A granted retrieval the client ended before asking for a proxy
        (myproxy-logon -N): audited as allowed, nothing issued."""
        with self.audited(requester, grant.action, _grant_where(grant)) as scope:
            scope.allow("authenticated only (myproxy-logon -N): no proxy issued")

    def release_key(self, requester: Requester, grant: RetrievalGrant, passphrase: str) -> bytes:
        """MyProxy RETRIEVE: the stored chain and its key, the key encrypted under the
        passphrase the requester proved. Only for a grant of ``retrieve-key`` (a distinct
        policy action, never granted by an allow ``"*"``); audited like a retrieval."""
        with self.audited(requester, Action.RETRIEVE_KEY, _grant_where(grant)) as scope:
            if grant.action is not Action.RETRIEVE_KEY or grant.issuer.key is None:
                raise AuthorizationError(
                    "this grant does not release a private key", reason="not_key_retrieval"
                )
            pem = chain_to_pem(grant.issuer.chain) + grant.issuer.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(passphrase.encode()),
            )
            scope.allow(_allow_reason(grant.decision))
        return pem

    def issue(
        self,
        requester: Requester,
        grant: RetrievalGrant,
        *,
        csr: bytes | x509.CertificateSigningRequest,
        lifetime: timedelta | None = None,
        limited: bool = False,
    ) -> IssuedProxy:
        """Sign a fresh proxy of a granted credential for the requester's CSR (PEM/DER bytes,
        or a request :func:`load_csr` already checked).

        Lifetime = min(requested, credential's max, policy max, stored chain's life).
        A limited requester, a limited stored chain or a policy that says so
        yields a limited proxy.
        """
        record, decision = grant.record, grant.decision
        where = _grant_where(grant)
        with self.audited(requester, grant.action, where) as scope:
            if not isinstance(csr, x509.CertificateSigningRequest):
                csr = load_csr(csr)
            now = self.now()
            granted, make_limited = self._proxy_terms(requester, grant, lifetime, limited, now)
            proxy_type = ProxyType.LIMITED if make_limited else ProxyType.IMPERSONATION
            issued = sign_request(
                grant.issuer,
                csr,
                now=now,
                lifetime=granted,
                proxy_type=proxy_type,
                job_id=_audit_text(grant.job_id, 255),
            )  # as audited
            scope.allow(_allow_reason(decision))
        return IssuedProxy(
            chain=issued,
            lifetime=granted,
            limited=make_limited,
            owner_dn=record.owner_dn,
            username=record.username,
            name=record.name,
        )

    def _proxy_terms(
        self,
        requester: Requester,
        grant: RetrievalGrant,
        lifetime: timedelta | None,
        limited: bool,
        now: datetime,
    ) -> tuple[timedelta, bool]:
        """The issued proxy's lifetime (the least of every cap) and whether it is limited."""
        record, decision = grant.record, grant.decision
        caps = [
            lifetime or DEFAULT_PROXY_LIFETIME,
            record.not_after - now,
            self.config.max_proxy_lifetime,
        ]
        if record.max_lifetime_seconds:
            caps.append(timedelta(seconds=record.max_lifetime_seconds))
        if decision.max_lifetime:
            caps.append(timedelta(seconds=decision.max_lifetime))
        retrieval_limited = False
        if grant.action is Action.RENEW:
            # Renewal must not yield more than retrieval by the same requester would:
            # the site's retrieval caps (lifetime, limited) apply to it as well.
            as_retrieval = self.decide(
                requester, record, Action.RETRIEVE, AuthMethod.CERTIFICATE, job_id=grant.job_id
            )
            if as_retrieval.allowed:
                retrieval_limited = as_retrieval.limited
                if as_retrieval.max_lifetime:
                    caps.append(timedelta(seconds=as_retrieval.max_lifetime))
        granted = min(caps)
        if granted <= timedelta(0):
            raise CredentialError("the credential has no lifetime left", reason="expired")
        make_limited = (
            limited or requester.limited or decision.limited or record.limited or retrieval_limited
        )
        return granted, make_limited

    def retrieve(
        self,
        requester: Requester,
        *,
        csr_pem: bytes,
        username: str | None = None,
        owner_dn: str | None = None,
        name: str = DEFAULT_CREDENTIAL,
        lifetime: timedelta | None = None,
        job_id: str | None = None,
        passphrase: str | None = None,
        limited: bool = False,
        action: Action = Action.RETRIEVE,
        _authz_owner: str | None = None,
    ) -> IssuedProxy:
        """:meth:`authorize_retrieval` then :meth:`issue`, for edges that have the CSR at once."""
        where = {"owner_dn": owner_dn, "username": username, "name": name, "job_id": job_id}
        with self.audited(requester, action, where):
            csr = load_csr(csr_pem)  # a malformed request is refused before any look-up
        grant = self.authorize_retrieval(
            requester,
            username=username,
            owner_dn=owner_dn,
            name=name,
            job_id=job_id,
            passphrase=passphrase,
            action=action,
            _authz_owner=_authz_owner,
        )
        return self.issue(requester, grant, csr=csr, lifetime=lifetime, limited=limited)

    def decide(
        self,
        requester: Requester,
        record: CredentialRecord,
        action: Action,
        auth: AuthMethod,
        *,
        job_id: str | None = None,
    ) -> Decision:
        """The policy's answer for ``requester`` on a stored credential (no audit, no side
        effect): for edges that must choose between, say, retrieval and renewal."""
        return self._decide(
            requester,
            action,
            owner_dn=record.owner_dn,
            owner_fqans=self._owner_fqans(record),
            name=record.name,
            username=record.username,
            job_id=job_id,
            auth=auth,
            owner_policy=_owner_policy(record),
        )

    def site_allows_any(self, action: Action) -> bool:
        """Whether any allow rule of the site policy covers ``action`` (a site setting)."""
        return any(rule.effect.value == "allow" for rule in self._policy().index[action].rules)

    # ------------------------------------------------------------------ renewal

    def renewal_challenge(self, requester: Requester) -> str:
        """A short-lived token the renewer signs with the old proxy's key."""
        issued = str(int(self.now().timestamp()))
        nonce = secrets.token_hex(16)
        mac = self._challenge_mac(requester, issued, nonce)
        return f"{issued}.{nonce}.{mac}"

    def _challenge_mac(self, requester: Requester, issued: str, nonce: str) -> str:
        message = f"{issued}.{nonce}.{requester.dn or ''}".encode()
        return hmac.new(self._challenge_secret, message, hashlib.sha256).hexdigest()

    def check_renewal_proof(
        self, requester: Requester, challenge: str, authz_chain_pem: bytes, signature: bytes
    ) -> ChainInfo:
        """Verify that the renewer holds a valid proxy (key included) of some identity."""
        try:
            issued, nonce, mac = challenge.split(".")
            age = self.now().timestamp() - int(issued)
        except ValueError as exc:
            raise InputError("the renewal challenge is malformed") from exc
        if not hmac.compare_digest(mac, self._challenge_mac(requester, issued, nonce)):
            raise AuthenticationError(
                "the renewal challenge was not issued to you", reason="bad_challenge"
            )
        if not 0 <= age <= RENEWAL_CHALLENGE_TTL.total_seconds():
            raise AuthenticationError(
                "the renewal challenge expired; ask for a new one", reason="bad_challenge"
            )
        chain = load_certificates(authz_chain_pem, what="renewal proxy")
        try:
            info = validate_chain(chain, self.trust, now=self.now(), vomsdir=None)
        except ChainError as exc:
            raise AuthenticationError(
                f"the proxy presented for renewal is not valid: {exc.message}", reason=exc.reason
            ) from exc
        verify_signature(chain[0], challenge.encode(), signature)
        # Single use, across worker processes and nodes: the nonce is recorded in the
        # database, and a second answer to the same challenge is refused.
        self.store.use_challenge(
            nonce, expires_at=datetime.fromtimestamp(int(issued), UTC) + RENEWAL_CHALLENGE_TTL
        )
        return info

    def renew(
        self,
        requester: Requester,
        *,
        csr_pem: bytes,
        challenge: str,
        authz_chain_pem: bytes,
        signature: bytes,
        username: str | None = None,
        owner_dn: str | None = None,
        name: str = DEFAULT_CREDENTIAL,
        lifetime: timedelta | None = None,
        job_id: str | None = None,
    ) -> IssuedProxy:
        where = {"owner_dn": owner_dn, "username": username, "name": name, "job_id": job_id}
        with self.audited(requester, AuditAction.RENEW, where):
            info = self.check_renewal_proof(requester, challenge, authz_chain_pem, signature)
        # A limited proof of possession yields a limited proxy: renewal never widens rights.
        return self.retrieve(
            requester,
            csr_pem=csr_pem,
            username=username,
            owner_dn=owner_dn,
            name=name,
            lifetime=lifetime,
            job_id=job_id,
            action=Action.RENEW,
            limited=info.limited,
            _authz_owner=info.identity,
        )

    # ------------------------------------------------------------------ info / destroy

    def info(
        self, requester: Requester, *, username: str | None = None, name: str | None = None
    ) -> list[CredentialSummary]:
        """The requester's own credentials, or another owner's where the policy allows info."""
        with self.audited(requester, AuditAction.INFO, {"username": username, "name": name}):
            if requester.dn is None:
                raise AuthenticationError("info needs a client certificate or proxy")
            if username:
                validate_username(username)
                records = self.store.list_credentials(username=username)
            else:
                records = self.store.list_credentials(owner_dn=requester.dn)
            if name is not None:
                records = [r for r in records if r.name == name]
            visible = []
            for record in records:
                decision = self._decide(
                    requester,
                    Action.INFO,
                    owner_dn=record.owner_dn,
                    owner_fqans=(),
                    name=record.name,
                    username=record.username,
                )
                if decision.allowed:
                    visible.append(_summary(record))
            if not visible and (username or name):
                raise NotFound(
                    f"no credentials found for user {username or '(yours)'}"
                    + (f" named {name!r}" if name else "")
                    + f", owner {requester.dn}"
                )
            self.store.add_audit(
                self._audit(
                    requester,
                    AuditAction.INFO,
                    "allow",
                    reason="listed",
                    owner_dn=requester.dn,
                    username=username,
                    name=name,
                ),
                now=self.now(),
            )
        return visible

    def _owned(
        self, requester: Requester, username: str, name: str, what: str, where: dict[str, Any]
    ) -> CredentialRecord:
        """The credential, when the requester (with a full certificate or proxy) owns it."""
        if requester.dn is None:
            raise AuthenticationError(f"to {what} you need a client certificate or proxy")
        _refuse_limited(requester, what)
        record = self._find(username=username, owner_dn=None, name=name)
        where["owner_dn"] = record.owner_dn
        if record.owner_dn != requester.dn:
            # Someone else's credential: answered as a missing one (the audit keeps why).
            raise _Concealed(
                AuthorizationError(
                    f"Credentials not owned by {requester.dn}: {record.username}/{record.name} "
                    "is not yours",
                    reason="not_owner",
                )
            )
        return record

    def _reserve_passphrase_attempt(
        self, requester: Requester, record: CredentialRecord
    ) -> int | None:
        """Reserve one passphrase try for a credential from the requester's address, or
        refuse it (TooManyAttempts) when the failed and running tries from there within the
        window reach the limit. Count and reservation are one serialised transaction in
        the database, so the limit holds across threads, worker processes, both endpoints
        and restarts, and scrypt never runs for a refused try. None: no limit configured."""
        limit, window = self.config.passphrase_failures, self.config.passphrase_failure_window
        if limit <= 0:
            return None
        attempt, failures = self.store.reserve_passphrase_attempt(
            username=record.username,
            credential_name=record.name,
            client_address=requester.client_address,
            since=self.now() - window,
            limit=limit,
            now=self.now(),
        )
        if attempt is None:
            minutes = max(1, int(window.total_seconds() // 60))
            raise TooManyAttempts(
                f"{failures} wrong passphrases for {record.username}/{record.name} from "
                f"{requester.client_address or 'this client'} in the last {minutes} minutes; "
                f"no more passphrases are tried from there until the oldest of them is "
                f"{minutes} minutes old"
            )
        return attempt

    def _finish_passphrase_attempt(self, attempt: int, *, failed: bool) -> None:
        try:
            self.store.finish_passphrase_attempt(attempt, failed=failed)
        except BrokerError:
            # The reservation stays "pending" and keeps counting: fails closed.
            log.exception("could not record the outcome of passphrase attempt %d", attempt)

    def destroy(
        self, requester: Requester, *, username: str, name: str = DEFAULT_CREDENTIAL
    ) -> CredentialSummary:
        where: dict[str, Any] = {"username": username, "name": name}
        with self.audited(requester, AuditAction.DESTROY, where) as scope:
            scope.concealed_as = lambda: _not_found(username, None, name)
            record = self._owned(requester, username, name, "destroy a credential", where)
            self._decide(
                requester,
                Action.DESTROY,
                owner_dn=record.owner_dn,
                owner_fqans=requester.fqans,
                name=record.name,
                username=record.username,
            ).raise_if_denied()
            deleted = self.store.delete_credential(
                username,
                name,
                owner_dn=requester.dn,
                audit=self._audit(
                    requester, AuditAction.DESTROY, "allow", reason="destroyed", **where
                ),
                now=self.now(),
            )
        return _summary(deleted)

    def change_passphrase(
        self, requester: Requester, *, username: str, name: str, old: str | None, new: str | None
    ) -> CredentialSummary:
        where: dict[str, Any] = {"username": username, "name": name}
        with self.audited(requester, AuditAction.CHANGE_PASSPHRASE, where) as scope:
            scope.concealed_as = lambda: _not_found(username, None, name)
            record = self._owned(
                requester, username, name, "change a credential's passphrase", where
            )
            attempt = (
                self._reserve_passphrase_attempt(requester, record)
                if old is not None and record.passphrase_protected
                else None
            )
            try:
                updated = self.store.change_passphrase(
                    username,
                    name,
                    old_passphrase=old,
                    new_passphrase=new,
                    owner_dn=requester.dn,
                    now=self.now(),
                    audit=self._audit(
                        requester, AuditAction.CHANGE_PASSPHRASE, "allow", reason="changed", **where
                    ),
                )
            except BrokerError as exc:
                if attempt is not None:
                    self._finish_passphrase_attempt(
                        attempt, failed=exc.reason == INVALID_PASSPHRASE_REASON
                    )
                raise
            if attempt is not None:
                self._finish_passphrase_attempt(attempt, failed=False)
        return _summary(updated)

    def issue_certificate(
        self,
        requester: Requester,
        ca: OnlineCa,
        csr: x509.CertificateSigningRequest,
        *,
        lifetime: timedelta,
    ) -> x509.Certificate:
        """The online CA: a short-lived certificate for a PAM-authenticated user's own key.

        Audited before it is returned: no audit row, no certificate.
        """
        username = requester.pam_user
        where: dict[str, Any] = {"username": username}
        with self.audited(requester, AuditAction.ISSUE_CERTIFICATE, where) as scope:
            if username is None:
                raise AuthenticationError("the online CA certifies PAM-authenticated users only")
            cert = ca.issue(username, csr, now=self.now(), lifetime=lifetime)
            scope.allow(
                f"online CA issued serial {cert.serial_number:x} valid until "
                f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC",
                owner_dn=slash_from_name(cert.subject),
            )
        return cert

    def health(self) -> None:
        """One cheap indexed query; raises StoreUnavailable when the database is down."""
        self.store.list_credentials(username="healthz-probe")

    # ------------------------------------------------------------------ bearer tokens
    # Issue 16: pilots authenticate with WLCG / SciTokens bearer tokens, and owners store
    # OAuth2 refresh tokens from which the broker mints short per-job access tokens.
    # Everything below is inert until :meth:`use_tokens` is called (``[tokens]`` issuers).

    def use_tokens(self, directory: IssuerDirectory) -> None:
        """Accept bearer tokens from ``directory``'s issuers and broker their access tokens."""
        self._token_directory = directory
        self._refresh_tokens = RefreshTokenStore(self.store)
        self._access_tokens = _Lru(4096, lambda: self.now().timestamp())
        self._token_locks: dict[tuple[str, str], threading.Lock] = {}
        self._token_locks_guard = threading.Lock()

    @property
    def token_directory(self) -> IssuerDirectory | None:
        return getattr(self, "_token_directory", None)

    def _token_issuer(self, issuer: str) -> tuple[IssuerDirectory, IssuerConfig]:
        directory = self.token_directory
        if directory is None:
            raise AuthenticationError(
                "this broker has no token issuers configured ([tokens] in broker.toml)",
                reason="tokens_disabled",
            )
        config = directory.settings.by_name(issuer) if isinstance(issuer, str) else None
        if config is None:
            known = ", ".join(i.name for i in directory.settings.issuers)
            raise NotFound(
                f"unknown token issuer {str(issuer)[:200]!r}; this broker knows: {known}",
                reason="unknown_issuer",
            )
        return directory, config

    def authenticate_bearer(
        self,
        token: str,
        *,
        client_address: str | None = None,
        endpoint: str = Endpoint.REST,
        request_id: str | None = None,
    ) -> Requester:
        """Verify a bearer token (signature, issuer, audience, times, profile); the
        requester it yields has no DN, only the token's claims."""
        request_id = request_id or uuid.uuid4().hex

        def claimant() -> Requester:
            return Requester.unverified(
                client_address=client_address, endpoint=endpoint, request_id=request_id
            )

        with self.audited(claimant, AuditAction.AUTHENTICATE, unauthenticated=True):
            directory = self.token_directory
            if directory is None:
                raise AuthenticationError(
                    "this broker accepts no bearer tokens (no [tokens] issuers configured); "
                    "authenticate with a certificate or proxy",
                    reason="tokens_disabled",
                )
            claims = verify_bearer(
                token, directory.settings, directory, now=int(self.now().timestamp())
            )
        return Requester(
            dn=None,
            token=claims,
            client_address=client_address,
            endpoint=endpoint,
            request_id=request_id,
        )

    def store_refresh_token(
        self,
        requester: Requester,
        *,
        issuer: str,
        username: str,
        refresh_token: str,
        scopes: Sequence[str] = (),
    ) -> RefreshTokenRecord:
        """The owner (by certificate) stores its refresh token for ``issuer`` under
        ``username``; the policy's ``delegate`` rules decide, credential name
        ``token:ISSUER``."""
        where: dict[str, Any] = {
            "username": username,
            "name": f"token:{issuer}"[:128],
            "owner_dn": requester.dn,
        }
        with self.audited(requester, AuditAction.STORE_REFRESH_TOKEN, where):
            if requester.dn is None or requester.token is not None:
                raise AuthenticationError(
                    "to store a refresh token you need a client certificate or proxy",
                    reason="certificate_required",
                )
            _refuse_limited(requester, "store a refresh token")
            validate_component(username, what="username")
            _, config = self._token_issuer(issuer)
            where["name"] = f"token:{config.name}"
            if (
                not isinstance(refresh_token, str)
                or not 0 < len(refresh_token) <= 8192
                or not refresh_token.isascii()
                or not refresh_token.isprintable()
                or " " in refresh_token
            ):
                raise InputError(
                    "the refresh token must be 1..8192 printable ASCII characters",
                    reason="bad_refresh_token",
                )
            for scope in scopes:
                _check_scope(scope)
            # A username names one person: refuse it when its proxies belong to another DN
            # (a job of that user must never be handed someone else's token).
            others = {r.owner_dn for r in self.store.list_credentials(username=username)}
            if others - {requester.dn}:
                raise AuthorizationError(
                    f"the username {username!r} holds credentials of another owner; store the "
                    "refresh token under your own username",
                    reason="not_owner",
                )
            self._may_delegate(requester, username, f"token:{config.name}")
            record = self._refresh_tokens.put(
                owner_dn=requester.dn,
                username=username,
                issuer=config.name,
                token=refresh_token,
                scopes=tuple(scopes),
                now=self.now(),
            )
            self.store.add_audit(
                self._audit(
                    requester,
                    AuditAction.STORE_REFRESH_TOKEN,
                    "allow",
                    reason=f"refresh token for issuer {config.name} stored",
                    **where,
                ),
                now=self.now(),
            )
        return record

    def start_token_device_flow(
        self,
        requester: Requester,
        *,
        issuer: str,
        scopes: Sequence[str] = (),
    ) -> DeviceAuthorization:
        """Begin the OAuth2 device-code flow with the broker's client at ``issuer`` (the
        refresh token must belong to the broker's client, which alone can redeem it)."""
        if requester.dn is None or requester.token is not None:
            raise AuthenticationError(
                "to store a refresh token you need a client certificate or proxy",
                reason="certificate_required",
            )
        directory, config = self._token_issuer(issuer)
        for scope in scopes:
            _check_scope(scope)
        wanted = tuple(scopes) or ("offline_access", *config.job_scopes)
        return directory.start_device_flow(config, wanted)

    def poll_token_device_flow(
        self,
        requester: Requester,
        *,
        issuer: str,
        username: str,
        device_code: str,
    ) -> RefreshTokenRecord | str:
        """Poll the issuer once; the stored refresh token's record, or the pending state
        (``authorization_pending`` / ``slow_down``). A denied or expired flow is an error."""
        directory, config = self._token_issuer(issuer)
        if not isinstance(device_code, str) or not 0 < len(device_code) <= 1024:
            raise InputError("bad device_code", reason="bad_field")
        device = DeviceAuthorization(
            device_code=device_code,
            user_code="",
            verification_uri="",
            verification_uri_complete=None,
            expires_in=0,
            interval=0,
        )
        result = directory.poll_device_flow(config, device)
        if isinstance(result, str):
            if result in ("authorization_pending", "slow_down"):
                return result
            raise AuthorizationError(
                f"issuer {config.name} ended the device flow: {result}; run `broker-init "
                f"--token-issuer {config.name}` again",
                reason="device_flow_failed",
            )
        if result.refresh_token is None:
            raise AuthorizationError(
                f"issuer {config.name} returned no refresh token (was offline_access granted?)",
                reason="no_refresh_token",
            )
        scopes = tuple(result.scope.split()) if result.scope else ()
        return self.store_refresh_token(
            requester,
            issuer=config.name,
            username=username,
            refresh_token=result.refresh_token,
            scopes=scopes,
        )

    def _token_lock(self, key: tuple[str, str]) -> threading.Lock:
        with self._token_locks_guard:
            return self._token_locks.setdefault(key, threading.Lock())

    def issue_access_token(
        self,
        requester: Requester,
        *,
        username: str,
        issuer: str,
        scopes: Sequence[str] = (),
        audience: str | None = None,
        job_id: str | None = None,
    ) -> AccessToken:
        """A short access token for a job, from the owner's stored refresh token.

        The policy decides as for a retrieval (action ``retrieve``, credential name
        ``token:ISSUER``, auth ``token`` or ``certificate``); the scopes are narrowed to the
        issuer's ``job_scopes`` and to the stored grant; the refresh happens under the row
        lock and a rotated refresh token is stored re-encrypted. An access token minted for
        the same owner, scopes and audience is reused while more than half of its life is
        left (this throttles calls to the issuer).
        """
        where: dict[str, Any] = {
            "username": username,
            "name": f"token:{issuer}"[:128],
            "job_id": job_id,
        }
        with self.audited(requester, AuditAction.RETRIEVE_TOKEN, where) as scope:
            if requester.dn is None and requester.token is None:
                raise AuthenticationError(
                    "a token request needs a certificate or bearer token", reason="no_identity"
                )
            if job_id is not None:
                _check_job_id(job_id)
            validate_component(username, what="username")
            directory, config = self._token_issuer(issuer)
            where["name"] = f"token:{config.name}"
            record = self._refresh_tokens.get(username, config.name)
            if record is None:
                raise NotFound(
                    f"{username} has stored no refresh token for issuer {config.name}; the owner "
                    f"must run `broker-init --token-issuer {config.name}`",
                    reason="no_refresh_token",
                )
            where["owner_dn"] = record.owner_dn
            auth = AuthMethod.TOKEN if requester.token is not None else AuthMethod.CERTIFICATE
            decision = self._decide(
                requester,
                Action.RETRIEVE,
                owner_dn=record.owner_dn,
                name=f"token:{config.name}",
                username=username,
                job_id=job_id,
                auth=auth,
            )
            decision.raise_if_denied()
            wanted = _narrow_scopes(config, record, tuple(scopes))
            if audience is not None and (
                not 0 < len(audience) <= 1024 or not audience.isprintable()
            ):
                raise InputError(
                    "the audience must be 1..1024 printable characters", reason="bad_field"
                )
            access = self._cached_access_token(directory, config, record, wanted, audience)
            scope.allow(f"{_allow_reason(decision)}; scopes {' '.join(wanted)}")
        return access

    def _cached_access_token(
        self,
        directory: IssuerDirectory,
        config: IssuerConfig,
        record: RefreshTokenRecord,
        wanted: tuple[str, ...],
        audience: str | None,
    ) -> AccessToken:
        """A cached access token for these owner, scopes and audience, or a fresh one
        (refreshed under the owner's lock, so concurrent jobs make one issuer call)."""
        key = (record.username, config.name, wanted, audience)
        access: AccessToken | None = self._access_tokens.get(key)
        if access is None:
            with self._token_lock((record.username, config.name)):
                access = self._access_tokens.get(key)
                if access is None:
                    access = self._refresh_access_token(directory, config, record, wanted, audience)
                    life = (access.expires_at - self.now()).total_seconds()
                    if life > 0:
                        self._access_tokens.put(key, access, ttl=life / 2)
        return access

    def _refresh_access_token(
        self,
        directory: IssuerDirectory,
        config: IssuerConfig,
        record: RefreshTokenRecord,
        scopes: tuple[str, ...],
        audience: str | None,
    ) -> AccessToken:
        def use(refresh_token: str) -> tuple[str | None, TokenResponse]:
            response = directory.refresh(config, refresh_token, scopes=scopes, audience=audience)
            return response.refresh_token, response

        now = self.now()
        response = self._refresh_tokens.redeem(record.username, config.name, now, use)
        granted = tuple(response.scope.split()) if response.scope else scopes
        extra = [s for s in granted if not any(scope_covers(w, s) for w in scopes)]
        if extra:
            # The issuer gave more than asked: do not pass it on to a job.
            raise ScopeNotAllowed(
                f"issuer {config.name} granted scopes that were not asked for "
                f"({' '.join(extra)}); refusing the token",
                reason="scope_not_allowed",
            )
        lifetime = timedelta(seconds=min(response.expires_in or 1200, 24 * 3600))
        return AccessToken(
            token=response.access_token,
            issuer=config.name,
            owner_dn=record.owner_dn,
            username=record.username,
            scopes=granted,
            audience=audience,
            expires_at=now + lifetime,
        )


_JOB_ID_MAX = 256


@dataclass
class AuditScope:
    """What a use case running under :meth:`BrokerService.audited` may tell it."""

    #: What the row says was attempted; an edge may narrow it once it knows.
    action: AuditAction | Action
    where: dict[str, Any]
    #: The public face of a concealed refusal that carries none of its own.
    concealed_as: Callable[[], BrokerError] | None = None
    #: Called with the refusal (and whether it was concealed) before it is audited.
    on_failure: Callable[[BrokerError, bool], None] | None = None
    #: Set by :meth:`allow`: the reason (and extra fields) of the ``allow`` row.
    allowed: tuple[str, dict[str, Any]] | None = None

    def allow(self, reason: str, **more: Any) -> None:
        """Write an ``allow`` row with ``reason`` when the use case completes."""
        self.allowed = (reason, more)

    def refuse(self, real: BrokerError, *, public: BrokerError | None = None) -> NoReturn:
        """Refuse: ``real`` goes to the audit row, ``public`` (default: the scope's
        ``concealed_as``, else not-found) to the client."""
        raise _Concealed(real, public=public)


class _Concealed(Exception):
    """A refusal whose real reason goes to the audit trail only; the client gets
    ``public`` (default: the same answer as for a credential that does not exist)."""

    def __init__(self, real: BrokerError, *, public: BrokerError | None = None) -> None:
        super().__init__(real.message)
        self.real = real
        self.public = public


def _not_found(username: str | None, owner_dn: str | None, name: str) -> NotFound:
    """Exactly what :meth:`BrokerService._find` says when nothing matches the request."""
    if username:
        return NotFound(f"no credential {name!r} for user {username!r}")
    return NotFound(
        f"no credential named {name!r} is stored for {owner_dn}; the owner can "
        f"store one with: broker-init -k {name}"
    )


def _no_passphrase_set(record: CredentialRecord) -> AuthenticationError:
    return AuthenticationError(
        f"the credential {record.username}/{record.name} has no passphrase, "
        "so a passphrase cannot retrieve it",
        reason="no_passphrase_set",
    )


def _wrong_passphrase() -> AuthenticationError:
    """What a client is told for any passphrase that does not open the credential."""
    return AuthenticationError(INVALID_PASSPHRASE, reason=INVALID_PASSPHRASE_REASON)


def _resolve(requester: Requester | Callable[[], Requester]) -> Requester:
    return requester() if callable(requester) else requester


def _allow_reason(decision: Decision) -> str:
    """An allow row's reason: the policy's reason and the rule that allowed."""
    return f"{decision.reason}: {decision.rule.name if decision.rule else ''}"


def _grant_where(grant: RetrievalGrant) -> dict[str, Any]:
    """The audit fields of a granted retrieval."""
    record = grant.record
    return {
        "owner_dn": record.owner_dn,
        "username": record.username,
        "name": record.name,
        "job_id": grant.job_id,
    }


def _check_retrieval_form(
    record: CredentialRecord, action: Action, passphrase: str | None, authz_owner: str | None
) -> None:
    """Refuse a retrieval the policy allows but whose form does not fit the credential:
    a renewal proved by someone else's proxy, a protected credential without its passphrase."""
    if authz_owner is not None and authz_owner != record.owner_dn:
        raise AuthorizationError(
            f"the proxy presented for renewal belongs to {authz_owner}, not to the "
            "credential's owner",
            reason="renewal_identity",
        )
    if record.passphrase_protected and passphrase is None and action is Action.RETRIEVE:
        raise AuthenticationError(
            f"the credential {record.username}/{record.name} is protected by a passphrase;"
            " supply it to retrieve",
            reason="passphrase_required",
        )


def _retrieval_auth_method(
    requester: Requester, record: CredentialRecord, action: Action, passphrase: str | None
) -> AuthMethod:
    """How the requester of a retrieval authenticated, for the policy's ``auth`` match."""
    if action is Action.RENEW:
        return AuthMethod.CERTIFICATE
    if passphrase is not None:
        return AuthMethod.PASSPHRASE
    if requester.pam_user is not None:
        # A PAM login proves one account's password, and the policy's
        # pam:USERGLOB patterns see the credential's username: so a PAM
        # requester may only open credentials stored under its own username.
        if requester.pam_user != record.username:
            raise _Concealed(
                AuthorizationError(
                    f"PAM user {requester.pam_user!r} may only retrieve credentials stored "
                    f"under the username {requester.pam_user!r}, not {record.username!r}",
                    reason="pam_user_mismatch",
                )
            )
        return AuthMethod.PAM
    if requester.token is not None:
        return AuthMethod.TOKEN
    return AuthMethod.CERTIFICATE


def _expired_error(record: CredentialRecord) -> CredentialError:
    return CredentialError(
        f"the credential {record.username}/{record.name} expired at "
        f"{record.not_after:%Y-%m-%d %H:%M:%S} UTC; its owner must delegate a new "
        f"one (broker-init -k {record.name})",
        reason="expired",
    )


def _stored_issuer(record: CredentialRecord, key_pem: bytes) -> Credential:
    """The stored chain with its decrypted key, checked to belong together."""
    key = load_private_key(key_pem)
    chain = tuple(load_certificates(record.certificate_chain.encode()))
    if not public_keys_equal(key, chain[0]):
        # A key its owner encrypted (MyProxy STORE) is first seen here.
        raise CredentialError(
            f"the stored key of {record.username}/{record.name} does not belong to "
            "its certificate; the owner must store the credential again",
            reason="key_mismatch",
        )
    return Credential(chain=chain, key=key)


def _refuse_limited(requester: Requester, what: str) -> None:
    # A limited proxy is handed to jobs; it must not manage its owner's stored credentials.
    if requester.limited:
        raise AuthorizationError(
            f"a limited proxy cannot {what}; use your certificate or a full proxy",
            reason="limited_requester",
        )


def _audit_text(value: str | None, limit: int) -> str | None:
    """``value`` with control characters escaped, cut to ``limit`` characters."""
    if value is None:
        return None
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _claimed_identity(chain: Sequence[x509.Certificate]) -> str | None:
    """The end-entity DN of a chain (the first certificate that is not a proxy), for audit."""
    for cert in chain:
        try:
            is_proxy = proxy_info(cert) is not None
        except (BrokerError, ValueError):
            return None
        if not is_proxy:
            return slash_from_name(cert.subject)
    return None


def _check_job_id(job_id: str) -> None:
    if not job_id or len(job_id) > _JOB_ID_MAX or any(ord(c) < 32 or ord(c) == 127 for c in job_id):
        raise InputError(
            f"the job id must be 1..{_JOB_ID_MAX} printable characters (e.g. a GlobalJobId)"
        )


def verify_signature(cert: x509.Certificate, message: bytes, signature: bytes) -> None:
    """Check ``signature`` over ``message`` with ``cert``'s key (RSA PKCS#1 v1.5 or ECDSA)."""
    outcome = check_signature(cert, message, signature, hashes.SHA256())
    if outcome is SignatureCheck.UNSUPPORTED_KEY:
        raise AuthenticationError("unsupported key type in the renewal proxy")
    if outcome is SignatureCheck.MISMATCH:
        raise AuthenticationError(
            "the renewal proof's signature does not verify with the presented proxy's key",
            reason="bad_proof",
        )


def sign_challenge(key: Any, message: bytes) -> bytes:
    """The client side of :func:`verify_signature`."""
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    raise InputError("unsupported key type for the renewal proof")


# ---------------------------------------------------------------------- bearer tokens (issue 16)

_SCOPE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-:/")


@dataclass(frozen=True)
class AccessToken:
    """An access token minted for a job from a stored refresh token."""

    token: str = field(repr=False)
    issuer: str
    owner_dn: str
    username: str
    scopes: tuple[str, ...]
    audience: str | None
    expires_at: datetime


def _check_scope(scope: str) -> None:
    if not isinstance(scope, str) or not 0 < len(scope) <= 256 or not set(scope) <= _SCOPE_CHARS:
        raise InputError(
            f"bad scope {str(scope)[:100]!r}: scopes use letters, digits and "
            "'_.-:/', e.g. compute.read or storage.read:/cms",
            reason="bad_scope",
        )


def _narrow_scopes(
    config: IssuerConfig, record: RefreshTokenRecord, requested: tuple[str, ...]
) -> tuple[str, ...]:
    """The scopes a job may get: every one must be within the site's ``job_scopes`` for the
    issuer and within the stored grant (when the grant's scopes are known)."""
    if not config.job_scopes:
        raise ScopeNotAllowed(
            f"issuer {config.name} has no job_scopes configured, so this broker gives jobs no "
            "access tokens from it",
            reason="scope_not_allowed",
        )
    wanted = requested or config.job_scopes
    for scope in wanted:
        _check_scope(scope)
        if not any(scope_covers(allowed, scope) for allowed in config.job_scopes):
            raise ScopeNotAllowed(
                f"the scope {scope!r} is beyond what jobs may get from issuer {config.name} "
                f"({' '.join(config.job_scopes)})",
                reason="scope_not_allowed",
            )
        if record.scopes and not any(scope_covers(granted, scope) for granted in record.scopes):
            raise ScopeNotAllowed(
                f"the refresh token {record.username} stored for issuer {config.name} was not "
                f"granted {scope!r} (it has {' '.join(record.scopes)})",
                reason="scope_not_allowed",
            )
    return tuple(dict.fromkeys(wanted))
