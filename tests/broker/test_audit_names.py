"""Audit rows keep their strings: the enums carry exactly the values rows always had."""

from __future__ import annotations

from broker.audit import AuditAction, Endpoint
from broker.policy import Action


def test_every_policy_action_has_an_audit_action() -> None:
    # The service audits a retrieval under its policy action (AuditAction(action)).
    for action in Action:
        assert AuditAction(action.value).value == action.value


def test_values_are_the_strings_rows_already_hold() -> None:
    assert {a.value for a in AuditAction} == {
        "delegate-start",
        "delegate",
        "store",
        "retrieve",
        "renew",
        "retrieve-key",
        "info",
        "destroy",
        "change-passphrase",
        "trustroots",
        "authenticate",
        "issue-certificate",
        "store-refresh-token",
        "retrieve-token",
        "admin-login",
        "admin-page",
        "myproxy",
    }
    assert {e.value for e in Endpoint} == {"rest", "myproxy"}
    assert type(AuditAction.RETRIEVE.value) is str
