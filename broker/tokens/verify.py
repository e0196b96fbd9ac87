"""Verify a bearer token (WLCG token profile / SciTokens) and return its holder's claims.

The cryptography is joserfc's; this module decides *what* is acceptable:

* the header's ``alg`` is an asymmetric algorithm we allow (never ``none``, never HMAC: with
  HMAC the issuer's public key would become a shared secret) and it names a ``kid``;
* ``iss`` is exactly one configured issuer, whose keys (JWKS) hold that ``kid``;
* the signature verifies with that key, for that algorithm only;
* ``aud`` contains one of the issuer's configured audiences;
* ``exp`` is required and in the future, ``nbf`` / ``iat`` not in the future
  (with ``leeway_seconds`` of clock skew); ``sub`` is required;
* the token follows a profile: ``wlcg.ver`` (WLCG, ``scope`` string), SciTokens 2.0
  (``ver: scitoken:2.0``), SciTokens 1.0 (a ``scope`` string, no ``ver``) or ``scp``; groups
  come from ``wlcg.groups``.

Failures raise :class:`TokenRejected` (HTTP 401) with a reason naming the check.
"""

from __future__ import annotations

import json
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jws import extract_compact

from broker.policy import TokenClaims
from broker.tokens.errors import TokenRejected
from broker.tokens.issuers import IssuerDirectory
from broker.tokens.settings import TokenSettings

ALLOWED_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
)
_MAX_CLAIM_ITEMS = 256


def _reject(message: str, reason: str) -> TokenRejected:
    return TokenRejected(f"the bearer token was refused: {message}", reason=reason)


def _unverified(raw: str, settings: TokenSettings) -> tuple[dict[str, Any], dict[str, Any]]:
    if len(raw) > settings.max_token_bytes:
        raise _reject(f"it is longer than {settings.max_token_bytes} bytes", "token_too_large")
    try:
        compact = extract_compact(raw.encode("ascii"))
        header = dict(compact.headers())
        payload = json.loads(compact.payload)
    except (JoseError, ValueError, UnicodeError) as exc:
        raise _reject(f"it is not a signed JWT ({exc})", "token_malformed") from None
    if not isinstance(payload, dict):
        raise _reject("its payload is not a JSON object", "token_malformed")
    return header, payload


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split()
    if (
        not isinstance(value, list)
        or not all(isinstance(v, str) for v in value)
        or len(value) > _MAX_CLAIM_ITEMS
    ):
        raise _reject(f"its {what} claim is not a list of strings", "token_claims")
    return tuple(value)


def verify_bearer(
    raw: str, settings: TokenSettings, directory: IssuerDirectory, *, now: int
) -> TokenClaims:
    """Verify ``raw`` (the compact JWT) at time ``now`` (Unix seconds)."""
    header, unverified = _unverified(raw, settings)
    alg = header.get("alg")
    if alg not in ALLOWED_ALGORITHMS:
        raise _reject(
            f"its algorithm {alg!r} is not accepted (use one of {', '.join(ALLOWED_ALGORITHMS)})",
            "token_algorithm",
        )
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise _reject("its header names no key id (kid)", "token_kid")
    iss = unverified.get("iss")
    issuer = settings.by_issuer(iss) if isinstance(iss, str) else None
    if issuer is None:
        raise _reject(f"its issuer {iss!r} is not configured in [tokens]", "token_issuer")
    keys = directory.keys(issuer, kid)
    if not any(k.kid == kid for k in keys.keys):
        raise _reject(f"issuer {issuer.name} has no key {kid!r}", "token_kid")
    try:
        token = jwt.decode(raw, keys, algorithms=[alg])
    except JoseError as exc:
        raise _reject(f"its signature does not verify ({exc.error})", "token_signature") from None
    claims = dict(token.claims)
    registry = jwt.JWTClaimsRegistry(
        now=now,
        leeway=settings.leeway_seconds,
        iss={"essential": True, "value": issuer.issuer},
        sub={"essential": True},
        exp={"essential": True},
    )
    try:
        registry.validate(claims)
    except JoseError as exc:
        raise _reject(f"{exc.description or exc.error}", f"token_{exc.error}") from None
    iat = claims.get("iat")
    if iat is not None and (
        not isinstance(iat, int | float) or iat > now + settings.leeway_seconds
    ):
        raise _reject("it was issued in the future (iat)", "token_iat")
    audiences = _strings(claims.get("aud"), "aud")
    if not set(audiences) & set(issuer.audience):
        raise _reject(
            f"its audience {list(audiences)} names none of this broker's audiences "
            f"for issuer {issuer.name}",
            "token_audience",
        )
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject or len(subject) > 512:
        raise _reject("its subject (sub) is missing or too long", "token_claims")
    if isinstance(claims.get("wlcg.ver"), str):
        scopes = _strings(claims.get("scope"), "scope")
    elif (
        str(claims.get("ver", "")).startswith("scitoken:")
        or "scp" in claims
        or isinstance(claims.get("scope"), str)
    ):  # SciTokens 2.0, or 1.0 (no "ver")
        scopes = _strings(claims.get("scope", claims.get("scp")), "scope")
    else:
        raise _reject(
            "it follows neither the WLCG token profile (wlcg.ver) nor SciTokens (ver / scp)",
            "token_profile",
        )
    groups = tuple(
        g if g.startswith("/") else "/" + g
        for g in _strings(claims.get("wlcg.groups"), "wlcg.groups")
    )
    return TokenClaims(issuer=issuer.issuer, subject=subject, groups=groups, scopes=scopes)
