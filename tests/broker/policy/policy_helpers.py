"""Builders shared by the policy tests (a plain module: no conftest name clashes)."""

from __future__ import annotations

from broker.policy import Action, AuthMethod, PolicySet, Request, load_policy

ALICE = "/DC=org/DC=example/CN=Alice"
BOB = "/DC=org/DC=example/CN=Bob"
PILOT = "/DC=org/DC=example/CN=pilot01"


def load(text: str, name: str = "policies/site.toml") -> PolicySet:
    return load_policy({name: text})


def req(
    action: str = "retrieve",
    requester: str | None = PILOT,
    owner: str = ALICE,
    *,
    fqans: tuple[str, ...] = (),
    owner_fqans: tuple[str, ...] = (),
    auth: str = "certificate",
    credential: str = "",
    job_id: str | None = None,
    username: str | None = None,
) -> Request:
    return Request(
        action=Action(action),
        requester_dn=requester,
        owner_dn=owner,
        requester_fqans=fqans,
        owner_fqans=owner_fqans,
        auth=AuthMethod(auth),
        credential=credential,
        job_id=job_id,
        username=username,
    )


def rule(
    name: str,
    requester: str,
    *,
    action: str = "retrieve",
    effect: str = "allow",
    extra: str = "",
) -> str:
    return (
        f'[[rule]]\nname = "{name}"\naction = "{action}"\neffect = "{effect}"\n'
        f"requester = [{requester}]\n{extra}\n"
    )
