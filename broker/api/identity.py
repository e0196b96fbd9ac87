"""Who is calling: the one place a REST request's identity is read.

The verified client chain reaches the app through :func:`peer_chain` only.  By
default it is the chain OpenSSL verified on the socket gunicorn hands over
(:func:`tls_chain`); ``create_app(peer_chain=...)`` replaces that source, which
is how in-process tests drive routes with Flask's test client.  An empty chain
is refused on every route that needs one: fail closed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cryptography import x509
from flask import Flask, Request, current_app, g, request

from broker.audit import AuditAction, Endpoint
from broker.errors import AuthenticationError
from broker.pam_auth import PamRefused, PamSettings, check_password
from broker.service import BrokerService, Requester
from broker.tlsctx import verified_peer_chain

ChainSource = Callable[[Request], list[x509.Certificate]]
_CONFIG_KEY = "BROKER_PEER_CHAIN"


def tls_chain(req: Request) -> list[x509.Certificate]:
    """The chain verified on the request's TLS socket (empty for plain HTTP or a resumption)."""
    return verified_peer_chain(req.environ.get("gunicorn.socket"))


def use_chain_source(app: Flask, source: ChainSource) -> None:
    app.config[_CONFIG_KEY] = source


def peer_chain() -> list[x509.Certificate]:
    """The current request's verified client chain, leaf first; empty when there is none."""
    source: ChainSource = current_app.config.get(_CONFIG_KEY, tls_chain)
    return source(request)


def requester(service: BrokerService, *, bearer: bool = False) -> Requester:
    """The authenticated caller of the current request, or :class:`AuthenticationError`.

    ``bearer=True`` only on the routes that accept pilots' bearer tokens
    (broker.api.token_routes); everywhere else a verified chain is required.
    """
    if bearer:
        from broker.api.token_routes import bearer_requester

        who = bearer_requester(service)
        if who is not None:
            return who
    chain = peer_chain()
    if not chain:
        raise AuthenticationError(
            "the TLS layer gave no verified client chain (a resumed session or no client "
            "certificate); reconnect with your certificate or proxy",
            reason="no_chain",
        )
    return authenticate_chain(service, chain)


def authenticate_chain(
    service: BrokerService, chain: list[x509.Certificate], *, action: AuditAction | None = None
) -> Requester:
    """The requester ``chain`` proves, for the current request.

    A chain OpenSSL accepted but the RFC 3820 / VOMS checks refuse (e.g. a forged AC)
    leaves an audit row with the reason (``action`` names what was attempted, when the
    route knows) before the refusal is raised.
    """
    request_id, address = g.get("request_id"), request.remote_addr

    def claimant() -> Requester:  # worked out only for a refusal's row
        return Requester.unverified(chain=chain, client_address=address, request_id=request_id)

    with service.audited(claimant, action or AuditAction.AUTHENTICATE, unauthenticated=True):
        return service.authenticate_chain(
            chain, client_address=address, endpoint=Endpoint.REST, request_id=request_id
        )


_PAM_FAILED = (
    "PAM login failed: the username or password is wrong, or the account is locked or "
    "expired; check them, or ask the site's account administrators"
)


def pam_login(
    service: BrokerService,
    pam: PamSettings,
    username: str,
    password: str,
    action: AuditAction,
    /,
    **where: Any,
) -> Requester:
    """The PAM user ``username`` proves, for the current request.

    A refused login leaves an audit row with PAM's own reason, but the client always
    gets the same answer (``pam_failed``): an unknown user and a wrong password look
    alike.
    """
    request_id = g.get("request_id")
    claimant = Requester.unverified(
        pam_user=username or None, client_address=request.remote_addr, request_id=request_id
    )
    with service.audited(claimant, action, where, unauthenticated=True) as scope:
        try:
            check_password(pam, username, password)
        except PamRefused as exc:
            scope.refuse(exc, public=AuthenticationError(_PAM_FAILED, reason="pam_failed"))
    return Requester(
        dn=None,
        pam_user=username,
        client_address=request.remote_addr,
        endpoint=Endpoint.REST,
        request_id=request_id or "",
    )
