"""Errors of the token layer, mapped to HTTP statuses like every :class:`BrokerError`."""

from __future__ import annotations

from broker.errors import AuthenticationError, AuthorizationError, BrokerError


class TokenRejected(AuthenticationError):
    """A bearer token that does not verify (401); the reason names the failed check."""

    code = "token_rejected"


class IssuerUnavailable(BrokerError):
    """The issuer's discovery, JWKS or token endpoint cannot be reached or answered badly."""

    code = "issuer_unavailable"
    http_status = 503


class RefreshTokenRevoked(AuthorizationError):
    """The issuer refused the stored refresh token; the owner must obtain a new one."""

    code = "refresh_token_revoked"


class ScopeNotAllowed(AuthorizationError):
    """A job asked for scopes beyond what the site or the stored grant allows."""

    code = "scope_not_allowed"
