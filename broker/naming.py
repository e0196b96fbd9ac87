"""The credential name nobody has to type, and how the policy language spells it.

A MyProxy client that gives no ``CRED_NAME``, a REST call without ``name``, and a
job ad without ``BrokerCredential`` all mean the same stored credential; its
name lives here once. The policy language (and MyProxy's own INFO output) call
that credential ``""`` instead.
"""

from __future__ import annotations

DEFAULT_CREDENTIAL = "default"


def policy_name(name: str) -> str:
    """The name as the policy language writes it: ``""`` for the default credential."""
    return "" if name == DEFAULT_CREDENTIAL else name
