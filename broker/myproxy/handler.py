"""One MyProxy session: decoded messages <-> :class:`broker.service.BrokerService`.

The handler talks to the peer through a :class:`Channel` (the TLS connection in
production, a scripted fake in unit tests), so it holds no socket code. Every
refusal is an :class:`Refusal` carrying the text of the ``ERROR=`` lines; the
server sends it and closes the connection, as the reference server does.

Authorization happens *before* the first OK, because the C clients print the
server's ERROR text only at that point; an ERROR sent in place of the
certificate chain shows up as "server-side error: check server logs".
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Literal, NoReturn, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from broker.audit import AuditAction, Endpoint
from broker.delegation import DelegationOptions
from broker.errors import (
    AuthenticationError,
    AuthorizationError,
    BrokerError,
    ChainError,
    InputError,
    NotFound,
    PemError,
    ProtocolError,
    TooManyAttempts,
)
from broker.myproxy import codec
from broker.myproxy.codec import AuthMethodId, Command
from broker.myproxy.policy_strings import NOBODY, render_policy, translate_policy
from broker.naming import DEFAULT_CREDENTIAL, policy_name
from broker.pki.loading import Credential, chain_to_pem, load_certificates, public_keys_equal
from broker.pki.proxy import SignatureCheck, check_signature
from broker.policy import (
    REASON_DENY_RULE,
    REASON_JOB_ID,
    REASON_OWNER,
    Action,
    AuthMethod,
    Decision,
)
from broker.service import BrokerService, Requester
from broker.store import CredentialRecord

log = logging.getLogger("broker.myproxy")

MessageKind = Literal["text", "der", "chain", "auth"]

# Reference wording (myproxy-server 6.2.14), so that scripts grepping for it keep working.
# (Messages, not secrets.)
BAD_PASSWORD = "Bad password\ninvalid credential passphrase"  # noqa: S105
INVALID_PASSPHRASE = "invalid credential passphrase"  # noqa: S105
NO_PASSPHRASE = "no passphrase\nauthentication failed"  # noqa: S105
# What the server's channel says when the peer closes between messages.
CLIENT_CLOSED = "the client closed the connection"


class Channel(Protocol):
    """What the handler needs from a connection."""

    def recv(self, kind: MessageKind) -> bytes:
        """One whole message of ``kind``; raises ProtocolError on EOF, timeout or size."""

    def send(self, data: bytes) -> None:
        """Write one message in one write (never glued to the next one)."""


class Refusal(BrokerError):
    """Send these ERROR lines and close.

    ``audited`` is True when the service already wrote the audit row (the refusal
    re-words a service error); otherwise the session writes one.
    """

    code = "myproxy_refused"
    http_status = 403
    exit_code = 3
    audit_decision = "deny"

    def __init__(self, message: str, *, audited: bool = False) -> None:
        super().__init__(message)
        self.audited = audited


_ACTIONS = {
    Command.GET: AuditAction.RETRIEVE,
    Command.PUT: AuditAction.DELEGATE,
    Command.INFO: AuditAction.INFO,
    Command.DESTROY: AuditAction.DESTROY,
    Command.CHANGE_PASSPHRASE: AuditAction.CHANGE_PASSPHRASE,
    Command.STORE: AuditAction.STORE,
    Command.RETRIEVE: AuditAction.RETRIEVE_KEY,
    Command.GET_TRUSTROOTS: AuditAction.TRUSTROOTS,
}


@dataclass(frozen=True)
class Settings:
    max_lifetime: timedelta | None = None  # extra cap on issued proxies (None: service rules)


def _name(cred_name: str | None) -> str:
    return cred_name or DEFAULT_CREDENTIAL


def _shown(name: str) -> str:
    return policy_name(name)


class _Missing(Refusal):
    """No such credential (MyProxy's wording)."""


@contextmanager
def _owner_refusals(request: codec.Request, dn: str) -> Iterator[None]:
    """Word the service's refusals of an owner's command (destroy, change passphrase) as
    the reference does: someone else's credential is told as missing or as not owned."""
    try:
        yield
    except NotFound:  # someone else's: told as missing (the service audited why)
        raise _not_found(request.username, request.cred_name, audited=True) from None
    except AuthorizationError as exc:
        raise _not_owned(exc, dn) from None


def _not_found(username: str, cred_name: str | None, *, audited: bool = False) -> Refusal:
    if cred_name:
        return _Missing(
            f'No credentials exist with username "{username}" and credential name "{cred_name}".',
            audited=audited,
        )
    return _Missing(f'No credentials exist for username "{username}".', audited=audited)


def _not_owned(exc: AuthorizationError, dn: str) -> Refusal:
    """The service's refusal (already audited) in the reference server's wording."""
    if exc.reason == "not_owner":
        return Refusal(f'Credentials not owned by "{dn}".', audited=True)
    return Refusal(exc.message, audited=True)


def _to_der_certs(ders: list[bytes]) -> list[x509.Certificate]:
    try:
        return [x509.load_der_x509_certificate(d) for d in ders]
    except (ValueError, x509.InvalidVersion) as exc:
        raise Refusal(f"a certificate in the chain is malformed: {exc}") from None


class Session:
    """Serve one request (and its sub-messages) on ``channel``."""

    def __init__(
        self,
        service: BrokerService,
        channel: Channel,
        requester: Requester,
        *,
        trust_files: Callable[[], Mapping[str, bytes]],
        settings: Settings | None = None,
    ) -> None:
        self.service = service
        self.channel = channel
        self.requester = requester
        self.trust_files = trust_files
        self.settings = settings or Settings()
        self._renewal_limited = False

    # ------------------------------------------------------------------ entry

    def run(self) -> None:
        """Serve the session; refusals become one ERROR message (the caller closes).

        Every refusal leaves one audit row: the service's own scopes write the rows of
        the refusals they raise, the session's scope those the session decides itself
        (protocol rules, malformed messages), under the command's action.
        """
        where: dict[str, Any] = {}
        try:
            with self.service.audited(self.requester, AuditAction.MYPROXY, where) as scope:
                request = codec.parse_request(self.channel.recv("text"))
                scope.action = _ACTIONS.get(request.command, AuditAction.MYPROXY)
                where.update(username=request.username or None, name=_name(request.cred_name))
                self._dispatch(request)
        except BrokerError as exc:  # audited once, by the service or by the scope above
            self._send_error(exc.message)

    def _send_error(self, message: str) -> None:
        log.info("myproxy %s refused: %s", self.requester.label, message.replace("\n", " / "))
        try:
            self.channel.send(codec.error(message))
        except (OSError, ProtocolError):
            pass  # the peer left; nothing to tell it

    def _dispatch(self, request: codec.Request) -> None:
        handlers = {
            Command.GET: self._get,
            Command.PUT: self._put,
            Command.INFO: self._info,
            Command.DESTROY: self._destroy,
            Command.CHANGE_PASSPHRASE: self._change_passphrase,
            Command.STORE: self._store,
            Command.RETRIEVE: self._retrieve_key,
            Command.GET_TRUSTROOTS: self._trustroots,
        }
        handlers[request.command](request)

    def _need_identity(self, what: str) -> str:
        if self.requester.dn is None:
            raise Refusal(
                f"{what} needs a client certificate or proxy; the connection was "
                "anonymous (set X509_USER_PROXY or X509_USER_CERT/KEY)"
            )
        return self.requester.dn

    # ------------------------------------------------------------------ look-ups

    def _find(self, username: str, cred_name: str | None) -> CredentialRecord:
        """The credential, accepting MyProxyClient's ``USERNAME=user-credname`` form.

        Every reading of a hyphenated name is looked up; when more than one exists the request
        is refused as ambiguous, so nobody can squat ``alice-prod`` to receive requests meant
        for alice's ``prod`` credential (or the other way round).
        """
        readings = [(username, _name(cred_name))]
        if cred_name is None:
            readings += [
                (username[:i], username[i + 1 :])
                for i, char in enumerate(username)
                if char == "-" and 0 < i < len(username) - 1
            ]
        found: list[CredentialRecord] = []
        for user, name in readings:
            try:
                found.append(self.service.credential(user, name))
            except NotFound:
                continue
            except InputError as exc:  # a username or name no credential can have
                if (user, name) == readings[0]:
                    raise Refusal(exc.message) from None
        if not found:
            raise _not_found(username, cred_name)
        if len(found) > 1:
            names = ", ".join(f"{r.username}/{_shown(r.name) or '(default)'}" for r in found)
            raise Refusal(
                f'the username "{username}" is ambiguous ({names}); name the credential with -k'
            )
        return found[0]

    def _trust_lines(self) -> list[tuple[str, str]]:
        return codec.trustroot_lines(self.trust_files())

    # ------------------------------------------------------------------ GET (0)

    def _get(self, request: codec.Request) -> None:
        requester = self.requester
        passphrase = request.passphrase or None
        try:
            record = self._find(request.username, request.cred_name)
        except _Missing:
            # A missing credential is answered as one the requester has no right on, so a
            # GET does not tell which usernames exist (a typo shows the same refusal).
            raise Refusal(BAD_PASSWORD if passphrase is not None else NO_PASSPHRASE) from None
        action = Action.RETRIEVE
        authz_owner: str | None = None
        # MyProxy's order of questions, so that refusals carry the reference wording. A
        # passphrase, even for a credential stored without one (myproxy-init -n/-Z/-R), goes
        # to the service, which refuses that as a wrong passphrase (and counts it as one).
        if passphrase is None:
            if requester.dn is None:
                raise Refusal(NO_PASSPHRASE)
            if self._allowed(record, Action.RETRIEVE, AuthMethod.CERTIFICATE):
                if record.passphrase_protected:
                    raise Refusal(INVALID_PASSPHRASE)
            elif self._allowed(record, Action.RENEW, AuthMethod.CERTIFICATE) and not (
                record.passphrase_protected
            ):
                authz_owner = self._renewal_challenge(record)
                action = Action.RENEW
            else:
                # No right: the same answer whether or not the credential has a passphrase
                # (and whether it exists at all, see above), unless the requester is the
                # owner or has a right the MyProxy endpoint cannot satisfy (job id).
                self._refuse_certificate_get(record)
        try:
            # All checks and the one passphrase derivation happen here, before the OK.
            grant = self.service.authorize_retrieval(
                requester,
                record=record,
                passphrase=passphrase,
                action=action,
                _authz_owner=authz_owner,
            )
        except TooManyAttempts as exc:  # say so: "bad password" would invite more guesses
            raise Refusal(exc.message, audited=True) from None
        except AuthenticationError as exc:
            if passphrase is not None:
                raise Refusal(BAD_PASSWORD, audited=True) from None
            raise Refusal(exc.message, audited=True) from None
        except NotFound:  # no right on it (the service audited why): as a missing one
            raise Refusal(
                BAD_PASSWORD if passphrase is not None else NO_PASSPHRASE, audited=True
            ) from None
        except BrokerError as exc:
            raise Refusal(exc.message, audited=True) from None

        self.channel.send(codec.ok(self._trust_lines() if request.trusted_certs else ()))
        try:
            csr_der = self.channel.recv("der")
        except ProtocolError as exc:
            if exc.message != CLIENT_CLOSED:
                raise
            # myproxy-logon -N: it only wanted to know that the passphrase (or its
            # certificate) is accepted, and closes after the OK. A success, not an error.
            self.service.authenticated_only(requester, grant)
            return
        lifetime = timedelta(seconds=request.lifetime) if request.lifetime > 0 else None
        if lifetime is not None and self.settings.max_lifetime is not None:
            lifetime = min(lifetime, self.settings.max_lifetime)
        issued = self.service.issue(
            requester, grant, csr=csr_der, lifetime=lifetime, limited=self._renewal_limited
        )
        ders = [c.public_bytes(serialization.Encoding.DER) for c in issued.chain]
        self.channel.send(codec.encode_chain(ders))
        self.channel.send(codec.ok())

    def _refuse_certificate_get(self, record: CredentialRecord) -> NoReturn:
        """Audit the policy's real reason for refusing a certificate-only GET and word it
        for the wire: the reference's wording where it has one, and "no passphrase /
        authentication failed" for a party that must not learn the credential exists."""
        # The path the owner opened (-R renewers rather than -Z) is the one to explain.
        renewal_first = bool(record.renewers) and record.renewers != (NOBODY,)
        actions = (
            (Action.RENEW, Action.RETRIEVE) if renewal_first else (Action.RETRIEVE, Action.RENEW)
        )
        decisions = [
            self.service.decide(self.requester, record, action, AuthMethod.CERTIFICATE)
            for action in actions
        ]
        # The most telling of the two: a deny rule or a job id over "no rule".
        order = [REASON_DENY_RULE, REASON_JOB_ID, REASON_OWNER]
        decision = min(
            decisions, key=lambda d: order.index(d.reason) if d.reason in order else len(order)
        )
        where = {"owner_dn": record.owner_dn, "username": record.username, "name": record.name}
        with self.service.audited(self.requester, AuditAction.RETRIEVE, where) as scope:
            scope.refuse(
                AuthorizationError(decision.message, reason=decision.reason),
                public=self._certificate_refusal_words(record, decision),
            )

    def _certificate_refusal_words(self, record: CredentialRecord, decision: Decision) -> Refusal:
        rule = f" (rule {decision.rule.name!r})" if decision.rule else ""
        dn = self.requester.dn
        if decision.reason == REASON_JOB_ID:
            # Only a party the site would let in learns this; MyProxy cannot send a job id.
            return Refusal(
                f'"{dn}" not authorized by server\'s policy{rule}: a job id is '
                "required, which MyProxy cannot send; use broker-logon --job-id",
            )
        if dn == record.owner_dn and decision.reason == REASON_DENY_RULE and decision.rule:
            name = decision.rule.name
            if name.startswith("self-authz"):
                return Refusal(name)  # the reference's own words
            return Refusal(f'"{dn}" not authorized by server\'s policy{rule}')
        return Refusal(NO_PASSPHRASE)

    def _allowed(self, record: CredentialRecord, action: Action, auth: AuthMethod) -> bool:
        # A probe (no audit): which of MyProxy's paths applies to this requester.
        return self.service.decide(self.requester, record, action, auth).allowed

    def _renewal_challenge(self, record: CredentialRecord) -> str:
        """RESPONSE=2 with the X509 methods; return the identity the client proved."""
        nonce = secrets.token_hex(16)
        self.channel.send(
            codec.challenge(
                [
                    (AuthMethodId.X509_CERTIFICATE_SHA256, nonce),
                    (AuthMethodId.X509_CERTIFICATE, nonce),
                ]
            )
        )
        proof = codec.parse_auth_reply(self.channel.recv("auth"))
        certs = _to_der_certs(proof.chain)
        digest: hashes.HashAlgorithm = (
            hashes.SHA256()
            if proof.method is AuthMethodId.X509_CERTIFICATE_SHA256
            else hashes.SHA1()  # noqa: S303 - the protocol's method 2 is defined with SHA-1
        )
        _verify(certs[0], nonce.encode("ascii"), proof.signature, digest)
        try:
            proven = self.service.authenticate_chain(
                certs,
                client_address=self.requester.client_address,
                endpoint=Endpoint.MYPROXY,
                request_id=self.requester.request_id,
            )
        except AuthenticationError as exc:
            raise Refusal(f"renewal authentication failed: {exc.message}") from None
        if proven.dn != record.owner_dn:
            # The owner's DN is not told: the requester may have no right on the credential.
            raise Refusal(
                f"renewal authentication failed: the proxy presented with -a belongs to "
                f"{proven.dn}, not to the credential's owner"
            )
        assert proven.dn is not None
        # A limited proof of possession yields a limited proxy: renewal never widens rights.
        self._renewal_limited = proven.limited
        return proven.dn

    # ------------------------------------------------------------------ PUT (1) / STORE (5)

    def _options(self, request: codec.Request) -> DelegationOptions:
        passphrase = request.passphrase or None
        retrievers = translate_policy(request.retriever)
        trusted = translate_policy(request.retriever_trusted)
        renewers = translate_policy(request.renewer)
        config = self.service.config
        proxy_life = (
            timedelta(seconds=request.lifetime)
            if request.lifetime > 0
            else config.max_proxy_lifetime
        )
        return DelegationOptions(
            username=request.username,
            name=_name(request.cred_name),
            stored_lifetime=config.max_stored_lifetime,
            max_proxy_lifetime=min(proxy_life, config.max_proxy_lifetime),
            # MyProxy semantics, which the broker's "unset = site decides" would lose:
            # without a passphrase nobody may retrieve "with the passphrase", and only
            # the owner's -Z / -R lists admit trusted retrievers and renewers.
            retrievers=(retrievers or ()) if passphrase else (NOBODY,),
            trusted_retrievers=trusted or (NOBODY,),
            renewers=renewers or (NOBODY,),
            # MyProxy's default_key_retrievers "none": only the owner's -E list admits.
            key_retrievers=translate_policy(request.key_retrievers) or (NOBODY,),
            description=request.cred_desc,
            passphrase=passphrase,
        )

    def _put(self, request: codec.Request) -> None:
        self._need_identity("storing a credential (myproxy-init)")
        options = self._options(request)
        self._check_owner(options)
        pending = self.service.start_delegation(self.requester, options)
        csr = x509.load_pem_x509_csr(pending.csr_pem)
        self.channel.send(codec.ok())
        self.channel.send(csr.public_bytes(serialization.Encoding.DER))
        ders = codec.decode_chain(self.channel.recv("chain"))
        chain_pem = chain_to_pem(_to_der_certs(ders))
        try:
            self.service.finish_delegation(
                self.requester, pending.id, chain_pem, passphrase=options.passphrase
            )
        except ChainError as exc:
            raise Refusal(f"Credentials are not valid.\n{exc.message}", audited=True) from None
        self.channel.send(codec.ok())

    def _check_owner(self, options: DelegationOptions) -> None:
        try:
            record = self.service.credential(options.username, options.name)
        except NotFound:
            return
        if record.owner_dn != self.requester.dn:
            raise Refusal(
                f"Credentials are already stored for user {options.username} "
                f"{'' if options.name == DEFAULT_CREDENTIAL else 'name ' + options.name + ' '}"
                f'and not owned by "{self.requester.dn}".'
            )

    def _store(self, request: codec.Request) -> None:
        self._need_identity("storing a credential (myproxy-store)")
        options = self._options(request)
        self._check_owner(options)
        self.channel.send(codec.ok())
        text = self.channel.recv("text")
        cut = text.find(b"\0")
        pem = text[:cut] if cut >= 0 else text
        encrypted = _encrypted_key_block(pem)
        if encrypted is not None and not request.passphrase:
            # The key's own passphrase protects it, so "retrieve with the passphrase" is
            # what the owner's -r list (or the site) says, not "nobody".
            options = replace(options, retrievers=translate_policy(request.retriever) or ())
            # The Debian client never sends PASSPHRASE with an encrypted key: MyProxy keeps
            # the PEM as it is, and so does the broker (inside its envelope encryption);
            # myproxy-logon's passphrase opens it at retrieval.
            certs = load_certificates(pem, what="stored certificate")
            self.service.store_credential(
                self.requester,
                options,
                Credential(chain=tuple(certs), key=None),
                encrypted_key_pem=encrypted,
            )
        else:
            credential = _load_stored(pem, request.passphrase or None)
            self.service.store_credential(self.requester, options, credential)
        self.channel.send(codec.ok())

    # ------------------------------------------------------------------ INFO (2)

    def _info(self, request: codec.Request) -> None:
        dn = self._need_identity("myproxy-info")
        try:
            summaries = self.service.info(
                self.requester, username=request.username, name=request.cred_name
            )
        except NotFound:
            summaries = []
        if not summaries and request.cred_name is None and "-" in request.username:
            try:
                record = self._find(request.username, None)
                summaries = self.service.info(
                    self.requester, username=record.username, name=record.name
                )
            except (Refusal, NotFound):
                summaries = []
        if not summaries:
            raise Refusal(f'no credentials found for user {request.username}, owner "{dn}"')
        entries = [
            codec.InfoEntry(
                name=None if s.name == DEFAULT_CREDENTIAL else s.name,
                owner=s.owner_dn,
                start_time=int(s.created_at.timestamp()),
                end_time=int(s.not_after.timestamp()),
                description=s.description,
                retriever=render_policy(s.retrievers),
                retriever_trusted=render_policy(s.trusted_retrievers),
                renewer=render_policy(s.renewers),
                key_retrievers=render_policy(s.key_retrievers),
            )
            for s in summaries
        ]
        self.channel.send(codec.ok(codec.info_lines(entries)))

    # ------------------------------------------------------------------ DESTROY (3) / CHANGE (4)

    def _destroy(self, request: codec.Request) -> None:
        dn = self._need_identity("myproxy-destroy")
        record = self._find(request.username, request.cred_name)
        with _owner_refusals(request, dn):
            self.service.destroy(self.requester, username=record.username, name=record.name)
        self.channel.send(codec.ok())

    def _change_passphrase(self, request: codec.Request) -> None:
        dn = self._need_identity("myproxy-change-pass-phrase")
        record = self._find(request.username, request.cred_name)
        if not request.new_phrase:
            raise Refusal("no new passphrase was given (NEW_PHRASE is empty)")
        try:
            with _owner_refusals(request, dn):
                self.service.change_passphrase(
                    self.requester,
                    username=record.username,
                    name=record.name,
                    old=request.passphrase or None if record.passphrase_protected else None,
                    new=request.new_phrase,
                )
        except TooManyAttempts as exc:
            raise Refusal(exc.message, audited=True) from None
        except AuthenticationError:
            raise Refusal(BAD_PASSWORD, audited=True) from None
        self.channel.send(codec.ok())

    # ------------------------------------------------------------------ RETRIEVE (6) / TRUST (7)

    def _retrieve_key(self, request: codec.Request) -> None:
        """myproxy-retrieve: only where the site allows ``retrieve-key`` (none does by
        default) and the owner listed the requester (-E), always with the passphrase."""
        dn = self._need_identity("key retrieval (myproxy-retrieve)")
        if not self.service.site_allows_any(Action.RETRIEVE_KEY):
            # A site setting, the same for every credential: telling it reveals nothing.
            raise Refusal(
                f'"{dn}" not authorized by server\'s authorized_key_retrievers '
                "policy: key retrieval (myproxy-retrieve) is not enabled on this "
                "server; use myproxy-logon to get a proxy"
            )
        passphrase = request.passphrase or None
        try:
            record = self._find(request.username, request.cred_name)
        except _Missing:
            raise Refusal(BAD_PASSWORD if passphrase is not None else NO_PASSPHRASE) from None
        if passphrase is None:
            raise Refusal(NO_PASSPHRASE)
        try:
            grant = self.service.authorize_retrieval(
                self.requester, record=record, passphrase=passphrase, action=Action.RETRIEVE_KEY
            )
        except TooManyAttempts as exc:
            raise Refusal(exc.message, audited=True) from None
        except (AuthenticationError, NotFound):
            raise Refusal(BAD_PASSWORD, audited=True) from None
        except BrokerError as exc:
            raise Refusal(exc.message, audited=True) from None
        payload = self.service.release_key(self.requester, grant, passphrase)
        self.channel.send(codec.ok(self._trust_lines() if request.trusted_certs else ()))
        self.channel.send(payload + b"\0")
        self.channel.send(codec.ok())

    def _trustroots(self, request: codec.Request) -> None:
        self.channel.send(codec.ok(self._trust_lines()))


def _verify(
    cert: x509.Certificate, message: bytes, signature: bytes, digest: hashes.HashAlgorithm
) -> None:
    outcome = check_signature(cert, message, signature, digest)
    if outcome is SignatureCheck.UNSUPPORTED_KEY:
        raise Refusal("renewal authentication failed: unsupported key type")
    if outcome is SignatureCheck.MISMATCH:
        raise Refusal(
            "renewal authentication failed: the challenge signature does not "
            "verify with the presented proxy's key"
        )


_KEY_BLOCK = re.compile(
    rb"-----BEGIN (?:ENCRYPTED |RSA |EC )?PRIVATE KEY-----.*?"
    rb"-----END (?:ENCRYPTED |RSA |EC )?PRIVATE KEY-----\r?\n?",
    re.DOTALL,
)


def _encrypted_key_block(pem: bytes) -> bytes | None:
    """The private key block of an upload if it is encrypted (PKCS#8 or Proc-Type)."""
    match = _KEY_BLOCK.search(pem)
    if match is None:
        return None
    block = match.group(0)
    if block.startswith(b"-----BEGIN ENCRYPTED") or b"Proc-Type: 4,ENCRYPTED" in block:
        return block
    return None


def _load_stored(pem: bytes, passphrase: str | None) -> Credential:
    """myproxy-store's upload: certificates, then the (maybe encrypted) key."""
    from broker.pki.loading import load_private_key

    certs = load_certificates(pem, what="stored certificate")
    try:
        encrypted = b"ENCRYPTED" in pem  # PKCS#8 "ENCRYPTED PRIVATE KEY" or Proc-Type
        key = load_private_key(pem, passphrase.encode() if passphrase and encrypted else None)
    except PemError as exc:
        raise Refusal(f"{BAD_PASSWORD}\n{exc.message}") from None
    if not public_keys_equal(key, certs[0]):
        raise Refusal("the uploaded private key does not belong to the first certificate")
    return Credential(chain=tuple(certs), key=key)


__all__ = ["Channel", "Refusal", "Session", "Settings"]
