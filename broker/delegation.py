"""What an owner says about a credential it delegates, and how a pending delegation keeps it.

:class:`DelegationOptions` is the service's input for ``start_delegation`` and
``store_credential``; the REST and MyProxy edges build it from their requests.
Between the two steps of a delegation the options wait in the pending row's JSON
column (``broker.store``): :func:`pending_params` and :func:`options_from_pending`
are that column's one format.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from broker.naming import DEFAULT_CREDENTIAL

DEFAULT_STORED_LIFETIME = timedelta(hours=168)  # broker-init / myproxy-init -c
DEFAULT_PROXY_LIFETIME = timedelta(hours=12)  # broker-init / myproxy-init -t


@dataclass(frozen=True)
class DelegationOptions:
    """What the owner says about a credential it delegates (broker-init / myproxy-init)."""

    username: str
    name: str = DEFAULT_CREDENTIAL
    stored_lifetime: timedelta = DEFAULT_STORED_LIFETIME
    max_proxy_lifetime: timedelta = DEFAULT_PROXY_LIFETIME
    retrievers: tuple[str, ...] = ()
    trusted_retrievers: tuple[str, ...] = ()
    renewers: tuple[str, ...] = ()
    description: str | None = None
    passphrase: str | None = None
    key_retrievers: tuple[str, ...] = ()  # MyProxy -E: who may download the key itself


def pending_params(options: DelegationOptions) -> dict[str, Any]:
    """The options a pending row keeps. Username and name have columns of their own;
    a passphrase is never written there (the client sends it with the finishing step)."""
    return {
        "stored_lifetime": int(options.stored_lifetime.total_seconds()),
        "max_proxy_lifetime": int(options.max_proxy_lifetime.total_seconds()),
        "retrievers": list(options.retrievers),
        "trusted_retrievers": list(options.trusted_retrievers),
        "renewers": list(options.renewers),
        "description": options.description,
    }


def options_from_pending(username: str, name: str, params: Mapping[str, Any]) -> DelegationOptions:
    """The options :func:`pending_params` kept for the pending row of ``username/name``."""
    return DelegationOptions(
        username=username,
        name=name,
        stored_lifetime=timedelta(seconds=int(params["stored_lifetime"])),
        max_proxy_lifetime=timedelta(seconds=int(params["max_proxy_lifetime"])),
        retrievers=tuple(params.get("retrievers") or ()),
        trusted_retrievers=tuple(params.get("trusted_retrievers") or ()),
        renewers=tuple(params.get("renewers") or ()),
        description=params.get("description"),
    )
