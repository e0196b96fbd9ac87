"""Admin sessions against a service whose clock and policy the test moves: a PAM login ends
after ``admin_session_minutes``, and leaving the admin group closes the page at once.
(A real PAM stack and store; Flask's test client over HTTPS URLs, since the cookie is Secure.)"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from broker.admin_service import AdminSettings, is_admin
from broker.api.app import create_app
from broker.devpki import DEV_POLICY
from broker.pam_auth import PamSettings
from broker.policy import PolicySet, load_policy
from broker.service import BrokerService, Requester
from broker.store import MasterKeyRing, Store, default_sqlite_url, migrate
from tests.broker.api.admin_support import ADMIN_PASSWORD, ADMIN_USER, csrf_of
from tests.broker.test_service import Clock
from tests.pamstack import make_pam_stack
from tests.pkifixtures import GridPki

BASE = "https://localhost"


class World:
    def __init__(self, client: FlaskClient, clock: Clock, policy: dict[str, PolicySet]) -> None:
        self.client, self.clock, self.policy = client, clock, policy

    def get(self, path: str) -> tuple[int, str, str]:
        response = self.client.get(path, base_url=BASE)
        return response.status_code, response.headers.get("Location", ""), response.text

    def login(self) -> int:
        form = self.client.get("/admin/login", base_url=BASE).text
        response = self.client.post(
            "/admin/login",
            base_url=BASE,
            data={"csrf": csrf_of(form), "username": ADMIN_USER, "password": ADMIN_PASSWORD},
        )
        return response.status_code


def _policy(members: str) -> PolicySet:
    return load_policy(
        {"05-admins.toml": f"[groups]\nsite-admins = [{members}]\n", "10-test.toml": DEV_POLICY}
    )


@pytest.fixture
def world(grid_pki: GridPki, tmp_path: Path) -> Iterator[World]:
    stack = make_pam_stack(tmp_path / "pam", {ADMIN_USER: ADMIN_PASSWORD})
    clock = Clock(grid_pki.now)
    url = default_sqlite_url(tmp_path / "state")
    migrate(url)
    policy = {"current": _policy(f'"pam:{ADMIN_USER}"')}
    with Store(url, MasterKeyRing.generate(now=datetime.now(UTC))) as store:
        service = BrokerService(store, grid_pki.trust, lambda: policy["current"], clock=clock)
        app = create_app(
            service,
            pam=PamSettings(stack.service, confdir=str(stack.confdir)),
            admin=AdminSettings(session_lifetime=timedelta(minutes=30)),
        )
        yield World(app.test_client(), clock, policy)


def test_pam_session_ends_after_its_lifetime(world: World) -> None:
    assert world.login() == 303
    assert world.get("/admin/")[0] == 200
    world.clock.now += timedelta(minutes=29)
    assert world.get("/admin/")[0] == 200
    world.clock.now += timedelta(minutes=2)
    status, location, _ = world.get("/admin/")
    assert status == 303 and location.endswith("/admin/login")


def test_leaving_the_admin_group_closes_the_page_within_a_session(world: World) -> None:
    assert world.login() == 303
    assert world.get("/admin/audit")[0] == 200
    world.policy["current"] = _policy('"/DC=org/CN=someone else"')
    status, _, body = world.get("/admin/audit")
    assert status == 403 and "who is not a site admin" in body


def test_admin_group_membership_rules() -> None:
    policy = _policy('"/DC=org/DC=example/CN=Admin*", "fqan:/ops/Role=admin", "pam:root-*"')
    assert is_admin(policy, "site-admins", Requester(dn="/DC=org/DC=example/CN=Admin One"))
    assert is_admin(
        policy,
        "site-admins",
        Requester(dn="/DC=org/CN=x", fqans=("/ops/Role=admin/Capability=NULL",)),
    )
    assert is_admin(policy, "site-admins", Requester(dn=None, pam_user="root-ann"))
    # a limited proxy (a job's) is never an admin; neither is anyone when the group is missing
    assert not is_admin(
        policy, "site-admins", Requester(dn="/DC=org/DC=example/CN=Admin One", limited=True)
    )
    assert not is_admin(policy, "ops-admins", Requester(dn="/DC=org/DC=example/CN=Admin One"))
    assert not is_admin(policy, "site-admins", Requester(dn="/DC=org/CN=Admin One"))
    assert not is_admin(policy, "site-admins", Requester(dn=None, pam_user="ann"))
    assert not is_admin(policy, "site-admins", Requester(dn=None))
    # a PAM user is not matched by a DN entry that happens to look like its name
    assert not is_admin(
        _policy('"/CN=root-ann"'), "site-admins", Requester(dn=None, pam_user="root-ann")
    )
