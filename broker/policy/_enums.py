"""The small closed vocabularies of the policy language."""

from __future__ import annotations

from enum import StrEnum


class Action(StrEnum):
    """What a requester wants to do with a stored credential."""

    DELEGATE = "delegate"
    RETRIEVE = "retrieve"
    RENEW = "renew"
    INFO = "info"
    DESTROY = "destroy"
    #: MyProxy RETRIEVE (myproxy-retrieve): the stored certificate and private key
    #: themselves leave the broker. Never implied by "*" rules of other actions.
    RETRIEVE_KEY = "retrieve-key"


#: Actions that issue a proxy, so a lifetime cap or ``limited`` means something.
ISSUING_ACTIONS = frozenset({Action.DELEGATE, Action.RETRIEVE, Action.RENEW})


class Effect(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


class AuthMethod(StrEnum):
    """How the requester proved who it is.

    ``certificate``: a client certificate and nothing else (MyProxy's "trusted
    retrieval", no passphrase). ``passphrase``: the credential's passphrase,
    with or without a certificate. ``pam``: a username and password checked
    through PAM, with or without a certificate. ``token``: a verified bearer
    token (WLCG / SciTokens JWT) from a configured issuer, no certificate.
    """

    CERTIFICATE = "certificate"
    PASSPHRASE = "passphrase"  # noqa: S105 - a method name, not a secret
    PAM = "pam"
    TOKEN = "token"  # noqa: S105 - a verified OAuth2/WLCG bearer token, not a secret
