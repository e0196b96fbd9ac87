"""OAuth2 / WLCG bearer tokens: issuer settings, JWKS discovery and cache, verification,
and the refresh and device-code grants (see docs/tokens.md).

The service layer (:mod:`broker.service`) combines these with the policy and the store;
nothing here touches the database.
"""

from broker.tokens.errors import (
    IssuerUnavailable,
    RefreshTokenRevoked,
    ScopeNotAllowed,
    TokenRejected,
)
from broker.tokens.issuers import IssuerDirectory
from broker.tokens.settings import IssuerConfig, TokenSettings, parse_token_settings
from broker.tokens.verify import verify_bearer

__all__ = [
    "IssuerConfig",
    "IssuerDirectory",
    "IssuerUnavailable",
    "RefreshTokenRevoked",
    "ScopeNotAllowed",
    "TokenRejected",
    "TokenSettings",
    "parse_token_settings",
    "verify_bearer",
]
