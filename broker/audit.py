"""The names an audit row uses for what was asked and where it arrived.

Both enums are ``StrEnum`` with today's strings as values, so rows written
before and after this module existed read the same; ``.value`` is what the
store keeps.
"""

from __future__ import annotations

from enum import StrEnum


class AuditAction(StrEnum):
    """The ``action`` column of an audit row."""

    DELEGATE_START = "delegate-start"
    DELEGATE = "delegate"
    STORE = "store"
    RETRIEVE = "retrieve"
    RENEW = "renew"
    RETRIEVE_KEY = "retrieve-key"
    INFO = "info"
    DESTROY = "destroy"
    CHANGE_PASSPHRASE = "change-passphrase"  # noqa: S105 - an action name
    TRUSTROOTS = "trustroots"
    AUTHENTICATE = "authenticate"
    ISSUE_CERTIFICATE = "issue-certificate"
    STORE_REFRESH_TOKEN = "store-refresh-token"  # noqa: S105 - an action name
    RETRIEVE_TOKEN = "retrieve-token"  # noqa: S105 - an action name
    ADMIN_LOGIN = "admin-login"
    ADMIN_PAGE = "admin-page"
    #: A MyProxy request refused before its command was known.
    MYPROXY = "myproxy"


class Endpoint(StrEnum):
    """The ``endpoint`` column: which listener the request arrived on."""

    REST = "rest"
    MYPROXY = "myproxy"
