"""A real ``broker serve`` set up for the admin page: PAM logins, an admin group in the
policy, and stored credentials and audit rows with attacker-chosen text in them."""

from __future__ import annotations

import http.client
import re
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import urlencode

from broker.devpki import DEV_POLICY
from broker.pki.dn import slash_from_name
from broker.store import AuditEvent, CredentialWrite, Store, load_master_keys
from tests.broker.store.store_support import make_key_material
from tests.brokerserver import RunningBroker, start_broker
from tests.pamstack import make_pam_stack
from tests.pkifixtures import GridPki

ADMIN_USER, ADMIN_PASSWORD = "siteadmin", "admin-pw-123"
OTHER_USER, OTHER_PASSWORD = "mallory", "mallory-pw-123"
XSS_DN = "/DC=org/DC=example/CN=<script>alert('dn')</script>"
XSS_JOB = "<img src=x onerror=alert('job')>"
JOB_ID = "condor-4711.0"
PILOT_DN = "/DC=org/DC=example/CN=pilot"


@dataclass
class AdminBroker:
    broker: RunningBroker
    alice_dn: str
    bob_dn: str

    def request(
        self,
        method: str,
        path: str,
        *,
        cert: str | None = None,
        cookie: str | None = None,
        form: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], list[str], str]:
        """One HTTPS request; returns status, headers, Set-Cookie lines and the body text."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ctx.load_verify_locations(capath=str(self.broker.pki.ca_dir))
        if cert is not None:
            ctx.load_cert_chain(
                str(self.broker.pki.cert_path(cert)), str(self.broker.pki.key_path(cert))
            )
        conn = http.client.HTTPSConnection("localhost", self.broker.port, context=ctx, timeout=30)
        headers = {"Cookie": cookie} if cookie else {}
        body = None
        if form is not None:
            body = urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            text = response.read().decode()
            return (
                response.status,
                {k.lower(): v for k, v in response.getheaders()},
                response.headers.get_all("Set-Cookie") or [],
                text,
            )
        finally:
            conn.close()

    def login(self, username: str, password: str) -> tuple[int, str, str]:
        """PAM login through the form: (status, cookie header for later requests, body)."""
        status, _, cookies, body = self.request("GET", "/admin/login")
        assert status == 200, body
        cookie = cookie_header(cookies)
        status, _, cookies, body = self.request(
            "POST",
            "/admin/login",
            cookie=cookie,
            form={"csrf": csrf_of(body), "username": username, "password": password},
        )
        return status, cookie_header(cookies) or cookie, body


def cookie_header(set_cookies: list[str]) -> str:
    jar: SimpleCookie = SimpleCookie()
    for line in set_cookies:
        jar.load(line)
    return "; ".join(f"{k}={m.value}" for k, m in jar.items())


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "no CSRF token in the form"
    return found.group(1)


def admin_policy(alice_dn: str) -> str:
    return f'[groups]\nsite-admins = ["{alice_dn}", "pam:{ADMIN_USER}"]\n'


def start_admin_broker(pki: GridPki, base: Path, *, database_url: str = "") -> AdminBroker:
    stack = make_pam_stack(base / "pam", {ADMIN_USER: ADMIN_PASSWORD, OTHER_USER: OTHER_PASSWORD})
    config = base / "broker.toml"
    config.write_text(
        "[server]\n"
        f'pam_service = "{stack.service}"\n'
        f'pam_confdir = "{stack.confdir}"\n'
        'admin_group = "site-admins"\n'
        "admin_expiring_hours = 24\n"
    )
    alice_dn = slash_from_name(pki.user("alice").cert.subject)
    bob_dn = slash_from_name(pki.user("bob").cert.subject)
    policy_dir = base / "srv" / "policies"
    policy_dir.mkdir(parents=True)
    (policy_dir / "05-admins.toml").write_text(admin_policy(alice_dn))
    broker = start_broker(
        pki,
        base / "srv",
        policy=DEV_POLICY,
        database_url=database_url,
        extra=("--config", str(config)),
    )
    try:
        seed(broker, alice_dn, bob_dn)
    except BaseException:
        broker.stop()
        raise
    return AdminBroker(broker, alice_dn, bob_dn)


def seed(broker: RunningBroker, alice_dn: str, bob_dn: str) -> None:
    """Credentials (one expiring within the window) and audit rows, written to the store
    the server uses, with the server's own master key."""
    keys = load_master_keys(broker.state_dir / "master.key")
    store = Store(broker.database_url, keys)
    try:
        for owner, username, hours in (
            (alice_dn, "alice", 2),
            (bob_dn, "bob", 200),
            (XSS_DN, "xss", 300),
        ):
            material = make_key_material("ec", username, hours)
            store.put_credential(
                CredentialWrite(
                    owner_dn=owner,
                    username=username,
                    private_key_pem=material.key_pem,
                    certificate_chain=material.chain_pem,
                    passphrase="a passphrase nobody may see",
                    description=f"{username}'s proxy",
                ),
                now=datetime.now(UTC),
            )
        now = datetime.now(UTC)
        for i, (job, decision) in enumerate(
            ((JOB_ID, "allow"), ("other-job", "allow"), (XSS_JOB, "deny"), (JOB_ID, "deny"))
        ):
            store.add_audit(
                AuditEvent(
                    action="retrieve",
                    decision=decision,
                    endpoint="rest",
                    time=now - timedelta(minutes=30 - i),
                    requester_dn=PILOT_DN if i != 2 else XSS_DN,
                    owner_dn=alice_dn,
                    username="alice",
                    credential_name="default",
                    job_id=job,
                    reason="allowed" if decision == "allow" else "no_matching_rule: refused",
                ),
                now=datetime.now(UTC),
            )
    finally:
        store.close()
