"""The admin page over a real ``broker serve`` (gunicorn, TLS, PAM): who gets in, the
session cookie and CSRF rules, escaping, and specific answers to bad input."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from markupsafe import escape

from tests.broker.api.admin_support import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    JOB_ID,
    OTHER_PASSWORD,
    OTHER_USER,
    XSS_DN,
    XSS_JOB,
    AdminBroker,
    csrf_of,
    start_admin_broker,
)
from tests.pkifixtures import GridPki


@pytest.fixture
def admin_broker(grid_pki: GridPki, tmp_path: Path) -> Iterator[AdminBroker]:
    running = start_admin_broker(grid_pki, tmp_path)
    try:
        yield running
    finally:
        running.broker.stop()


def _text(body: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", body))


def test_admin_by_client_certificate_sees_credentials_escaped(admin_broker: AdminBroker) -> None:
    status, headers, _, body = admin_broker.request("GET", "/admin/", cert="alice")
    assert status == 200, body
    assert "script-src" not in headers["content-security-policy"]  # default-src 'none' rules
    assert "default-src 'none'" in headers["content-security-policy"]
    assert headers["cache-control"] == "no-store"
    # every stored credential, the expiring one (2 h left, window 24 h) marked
    for username in ("alice", "bob", "xss"):
        assert f'data-username="{username}"' in body
    alice_row = re.search(r'<tr class="expiring" data-username="alice".*?</tr>', body, re.S)
    assert alice_row and "expiring soon" in alice_row.group(0)
    bob_row = re.search(r'<tr class="[^"]*" data-username="bob".*?</tr>', body, re.S)
    assert bob_row and "expiring soon" not in bob_row.group(0)
    assert 'id="count-expiring">1<' in body
    # the DN is shown as text: escaped, never markup
    assert "<script>" not in body and str(escape(XSS_DN)) in body
    # nothing secret: no key, no passphrase, no envelope
    for secret in ("PRIVATE KEY", "a passphrase nobody may see", "BEGIN CERTIFICATE"):
        assert secret not in body
    # the audit filtered by job id, the attacker's job id escaped too
    status, _, _, body = admin_broker.request(
        "GET", f"/admin/audit?job_id={quote(JOB_ID)}", cert="alice"
    )
    assert status == 200
    assert body.count(f'<td class="mono job-id">{JOB_ID}</td>') == 2
    assert "other-job" not in body
    status, _, _, body = admin_broker.request("GET", "/admin/audit", cert="alice")
    assert "<img" not in body and str(escape(XSS_JOB)) in body
    status, _, _, body = admin_broker.request("GET", "/admin/policy", cert="alice")
    assert status == 200 and "site-admins" in body and "pilots retrieve for users" in body


def test_non_admin_certificate_is_refused_with_a_sentence(admin_broker: AdminBroker) -> None:
    for path in ("/admin/", "/admin/audit", "/admin/policy", "/admin/explain"):
        status, _, _, body = admin_broker.request("GET", path, cert="bob")
        assert status == 403
        assert "who is not a site admin" in _text(body) and "site-admins" in body
        assert admin_broker.bob_dn in _text(body)
        assert 'id="credentials"' not in body


def test_pam_login_sets_a_strict_session_cookie(admin_broker: AdminBroker) -> None:
    # no certificate, no session: to the login form
    status, headers, _, _ = admin_broker.request("GET", "/admin/")
    assert status == 303 and headers["location"].endswith("/admin/login")
    status, _, set_cookies, _ = admin_broker.request("GET", "/admin/login")
    cookie = set_cookies[0]
    assert cookie.startswith("__Host-broker-admin=")
    flags = {part.strip().lower() for part in cookie.split(";")}
    assert {"secure", "httponly", "samesite=strict", "path=/"} <= flags
    assert not any(f.startswith("domain=") for f in flags)
    # a login without the form's CSRF token is refused before PAM is asked
    status, _, _, body = admin_broker.request(
        "POST",
        "/admin/login",
        cookie=cookie.split(";")[0],
        form={"username": ADMIN_USER, "password": ADMIN_PASSWORD},
    )
    assert status == 400 and "came from another site" in body
    status, _, body = admin_broker.login(ADMIN_USER, "wrong password")
    assert status == 401 and "username or password is wrong" in body
    status, session, _ = admin_broker.login(ADMIN_USER, ADMIN_PASSWORD)
    assert status == 303
    status, _, _, body = admin_broker.request("GET", "/admin/", cookie=session)
    assert status == 200 and f"PAM user {ADMIN_USER}" in body
    # the "why" form: CSRF required, then the engine's trace
    explain = {
        "requester": "/DC=org/DC=example/CN=pilot",
        "owner": admin_broker.alice_dn,
        "action": "retrieve",
        "auth": "certificate",
    }
    status, _, _, body = admin_broker.request(
        "POST", "/admin/explain", cookie=session, form=explain
    )
    assert status == 400 and "came from another site" in body
    status, _, _, page = admin_broker.request("GET", "/admin/explain", cookie=session)
    status, _, _, body = admin_broker.request(
        "POST", "/admin/explain", cookie=session, form={**explain, "csrf": csrf_of(page)}
    )
    assert status == 200
    assert 'id="explain-decision" class="allow">allow<' in body
    assert "pilots retrieve for users" in body and 'id="explain-trace"' in body
    # the login is in the audit trail
    status, _, _, body = admin_broker.request(
        "GET", "/admin/audit?action=admin-login", cookie=session
    )
    assert f"pam:{ADMIN_USER}" in body
    # sign out ends the session (the cookie is emptied)
    status, _, set_cookies, _ = admin_broker.request(
        "POST", "/admin/logout", cookie=session, form={"csrf": csrf_of(page)}
    )
    assert status == 303 and "__Host-broker-admin=;" in set_cookies[0]


def test_pam_user_outside_the_admin_group_is_refused(admin_broker: AdminBroker) -> None:
    status, session, _ = admin_broker.login(OTHER_USER, OTHER_PASSWORD)
    assert status == 303
    status, _, _, body = admin_broker.request("GET", "/admin/", cookie=session)
    assert status == 403 and f"PAM user {OTHER_USER}, who is not a site admin" in body
    status, _, _, body = admin_broker.request("GET", "/admin/audit?action=admin-page", cert="alice")
    assert f"pam:{OTHER_USER}" in body and "not in the policy group" in body


@pytest.mark.parametrize(
    ("path", "sentence"),
    [
        ("/admin/audit?since=yesterday", "must be a UTC date and time"),
        ("/admin/audit?before=-1", "must be a positive whole number"),
        ("/admin/audit?decision=maybe", "must be allow, deny or error"),
        ("/admin/audit?job_id=" + "j" * 300, "longer than 255 characters"),
        ("/admin/audit?before=" + "9" * 19, "must be a positive whole number below"),
        ("/admin/audit?owner=%2FCN%3Da%00b", "contains control characters"),
        ("/admin/?hours=5", "the chart covers"),
        ("/admin/?after_id=x&after_owner=%2FCN%3Da", "must be a positive whole number"),
    ],
)
def test_bad_filters_get_a_400_sentence(
    admin_broker: AdminBroker, path: str, sentence: str
) -> None:
    status, headers, _, body = admin_broker.request("GET", path, cert="alice")
    assert status == 400, body
    assert headers["content-type"].startswith("text/html")
    assert sentence in body and "Traceback" not in body


def test_explain_with_bad_input_names_the_problem(admin_broker: AdminBroker) -> None:
    status, _, _, page = admin_broker.request("GET", "/admin/explain", cert="alice")
    cookie_less_csrf = csrf_of(page)
    # a certificate user's CSRF token is bound to its session cookie: without it, refused
    status, _, _, body = admin_broker.request(
        "POST",
        "/admin/explain",
        cert="alice",
        form={"csrf": cookie_less_csrf, "owner": "not a dn", "action": "retrieve"},
    )
    assert status == 400 and "came from another site" in body
    status, _, cookies, page = admin_broker.request("GET", "/admin/explain", cert="alice")
    cookie = cookies[0].split(";")[0]
    for form, sentence in (
        ({"owner": "not a dn", "requester": "/CN=x"}, "owner DN"),
        ({"owner": "/CN=o", "requester": "/CN=x", "action": "steal"}, "unknown action"),
        ({"owner": "/CN=o", "requester": "/CN=x", "fqans": "atlas"}, "must start with"),
    ):
        status, _, _, body = admin_broker.request(
            "POST",
            "/admin/explain",
            cert="alice",
            cookie=cookie,
            form={"action": "retrieve", **form, "csrf": csrf_of(page)},
        )
        assert status == 400, body
        assert 'id="explain-error"' in body and sentence in _text(body)
