"""The one exception tree of the broker.

Every failure a caller can act on is one of these. Each edge maps them once:
the REST API to an HTTP status and a JSON body, the MyProxy endpoint to an
``ERROR=`` line, the CLIs to a message and an exit code.

::

    BrokerError                      code="internal"          HTTP 500 exit 2
    ├── InputError                   code="bad_request"       HTTP 400 exit 1
    │   ├── PemError                 code="bad_pem"
    │   ├── CsrError                 code="bad_csr"
    │   ├── DnSyntaxError            code="bad_name"      (a DN, username or credential name)
    │   ├── ConfigError              code="bad_config"
    │   │   └── NamespaceFileError   code="bad_namespace_file"   (broker.pki.namespace)
    │   ├── PolicyFileError          code="bad_policy"
    │   ├── ProtocolError            code="protocol"      (a malformed MyProxy message)
    │   ├── PolicyStringError        code="bad_policy_string"    (broker.myproxy.policy_strings)
    │   ├── FqanError                code="bad_fqan"      (broker.policy; also a ValueError)
    │   ├── PatternError             code="bad_pattern"   (broker.policy; also a ValueError)
    │   └── DurationError            code="bad_duration"  (broker.policy; also a ValueError)
    ├── PayloadTooLarge              code="too_large"         HTTP 413
    ├── ChainError                   code="invalid_chain"     HTTP 400 (a bad chain)
    │   └── VomsError                code="invalid_voms"      (an AC that does not verify)
    ├── AuthenticationError          code="unauthenticated"   HTTP 401 exit 3
    │   ├── TooManyAttempts          code="too_many_attempts" HTTP 429
    │   ├── PamRefused               code="unauthenticated"   (broker.pam_auth)
    │   └── TokenRejected            code="token_rejected"    (broker.tokens.errors)
    ├── AuthorizationError           code="denied"            HTTP 403 exit 3
    │   ├── RefreshTokenRevoked      code="refresh_token_revoked"  (broker.tokens.errors)
    │   └── ScopeNotAllowed          code="scope_not_allowed"      (broker.tokens.errors)
    ├── NotFound                     code="not_found"         HTTP 404 exit 4
    ├── Conflict                     code="conflict"          HTTP 409
    ├── CredentialError              code="credential"        HTTP 422 (expired, unusable)
    ├── StoreError                   code="store"             HTTP 500
    │   └── StoreUnavailable         code="unavailable"       HTTP 503
    ├── SystemFailure                code="system"            HTTP 500
    ├── IssuerUnavailable            code="issuer_unavailable"  HTTP 503 (broker.tokens.errors)
    ├── Refusal                      code="myproxy_refused"   HTTP 403 (broker.myproxy.handler)
    └── WrapperError                 code="wrapper"           exit 202 (payload_wrapper.errors)
        ├── ClientError              code="client"            HTTP 400 exit 201
        ├── WrapperSystemError       code="system"            exit 202
        └── AuthorizationDenied      code="denied"            HTTP 403 exit 203

Classes defined outside this module name their module in brackets; private
helper classes (a leading underscore) are left out. ``tests/broker/test_error_tree.py``
checks that this drawing equals the real subclass tree, so it cannot go stale.

A subclass may override ``code`` per instance (``reason=``) so that callers can
tell, say, ``expired`` from ``revoked`` without a new class for each.
"""

from __future__ import annotations


class BrokerError(Exception):
    """Base of every error the broker raises on purpose."""

    code = "internal"
    http_status = 500
    exit_code = 2
    #: The audit row's decision for this refusal: "deny" for a refused party, "error"
    #: for everything else (bad input, a store failure...).
    audit_decision = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.code
        #: Set once an audit row says this refusal happened (by the innermost
        #: ``BrokerService.audited`` scope it passed), so outer scopes do not repeat it.
        self.audited = False

    def to_json(self) -> dict[str, str]:
        return {"error": self.reason, "message": self.message}


class InputError(BrokerError):
    code = "bad_request"
    http_status = 400
    exit_code = 1


class PemError(InputError):
    code = "bad_pem"


class CsrError(InputError):
    code = "bad_csr"


class DnSyntaxError(InputError):
    code = "bad_name"


class ConfigError(InputError):
    code = "bad_config"


class PolicyFileError(InputError):
    code = "bad_policy"


class ProtocolError(InputError):
    code = "protocol"


class PayloadTooLarge(BrokerError):
    code = "too_large"
    http_status = 413
    exit_code = 1


class ChainError(BrokerError):
    """A certificate chain that does not verify; ``reason`` says why."""

    code = "invalid_chain"
    http_status = 400
    exit_code = 1


class VomsError(ChainError):
    """A VOMS attribute certificate that does not verify; never silently ignored."""

    code = "invalid_voms"


class AuthenticationError(BrokerError):
    code = "unauthenticated"
    http_status = 401
    exit_code = 3
    audit_decision = "deny"


class TooManyAttempts(AuthenticationError):
    """Too many wrong passphrases for one credential from one address: wait, then retry."""

    code = "too_many_attempts"
    http_status = 429


class AuthorizationError(BrokerError):
    code = "denied"
    http_status = 403
    exit_code = 3
    audit_decision = "deny"


class NotFound(BrokerError):
    code = "not_found"
    http_status = 404
    exit_code = 4


class Conflict(BrokerError):
    code = "conflict"
    http_status = 409
    exit_code = 1


class CredentialError(BrokerError):
    code = "credential"
    http_status = 422
    exit_code = 1


class StoreError(BrokerError):
    code = "store"
    http_status = 500
    exit_code = 2


class StoreUnavailable(StoreError):
    code = "unavailable"
    http_status = 503


class SystemFailure(BrokerError):
    code = "system"
    http_status = 500
    exit_code = 2


def by_http_status() -> dict[int, type[BrokerError]]:
    """Each HTTP status to the class of this module that introduces it, for clients.

    Walks the tree above in definition order; the first class whose status differs
    from its parent's owns that status (so 400 is ``InputError``, not ``ChainError``).
    A status no class introduces (500) is not in the map: clients use ``SystemFailure``.
    """
    found: dict[int, type[BrokerError]] = {}

    def walk(cls: type[BrokerError]) -> None:
        for sub in cls.__subclasses__():
            if sub.__module__ != __name__:
                continue
            if sub.http_status != cls.http_status:
                found.setdefault(sub.http_status, sub)
            walk(sub)

    walk(BrokerError)
    return found
