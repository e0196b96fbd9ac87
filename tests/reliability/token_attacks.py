"""Attacks on the bearer-token path (issue 16), against a real `broker serve` with a real
authlib issuer on loopback: forged and misdirected tokens on the REST API, scope
escalation and refresh-token replay on the token broker. Every attempt must be refused
with a 4xx JSON answer (never a 2xx, never a 5xx other than a named 503), and the
server log must show no unexpected error.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import shutil
import ssl
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.reliability.harness import Outcome


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def attacks(pki: Any, base: Path) -> Iterator[tuple[str, Callable[[Outcome], None]]]:
    state: dict[str, Any] = {}

    def setup() -> dict[str, Any]:
        if "broker" in state:
            return state
        from joserfc.jwk import RSAKey  # noqa: F401 - fail early if the library is missing

        from tests.broker.tokens.issuer import TestIssuer
        from tests.broker.tokens.test_token_e2e import broker_toml
        from tests.broker.tokens.test_token_service import token_policy
        from tests.brokerserver import start_broker

        issuer = TestIssuer().start()
        state["issuer"] = issuer
        work = Path(tempfile.mkdtemp(prefix="token-attacks-", dir=base))
        state["work"] = work
        broker = start_broker(
            pki,
            work / "srv",
            policy=token_policy(issuer.url),
            extra=("--config", str(broker_toml(issuer, work))),
        )
        state["broker"] = broker
        alice = broker.client("alice")
        state["refresh"] = issuer.issue_refresh_token("alice-sub", "offline_access compute.read")
        alice.call(
            "POST",
            "/v1/tokens/refresh-tokens",
            {
                "issuer": "test",
                "username": "alice",
                "refresh_token": state["refresh"],
                "scopes": ["offline_access", "compute.read"],
            },
        )
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ctx.load_verify_locations(capath=str(pki.ca_dir))
        state["ctx"] = ctx
        return state

    def call(path: str, body: dict[str, Any], token: str) -> tuple[int, bytes]:
        s = setup()
        conn = http.client.HTTPSConnection(
            "127.0.0.1", s["broker"].port, context=s["ctx"], timeout=30
        )
        try:
            conn.request(
                "POST",
                path,
                body=json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
            )
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def expect_refused(
        outcome: Outcome, label: str, status: int, body: bytes, reason: str | None = None
    ) -> None:
        outcome.tried += 1
        got = ""
        try:
            got = json.loads(body).get("error", "")
        except ValueError:
            got = "?"
        if 200 <= status < 300:
            outcome.fail(f"ACCEPTED {label}: HTTP {status} {body[:160]!r}")
        elif status >= 500:
            outcome.fail(f"{label}: HTTP {status} {body[:160]!r}")
        elif reason is not None and got != reason:
            outcome.fail(f"{label}: refused as {got!r}, expected {reason!r}")
        else:
            outcome.note(f"refused {label}: {status} {got}")

    def forgeries(outcome: Outcome) -> None:
        from joserfc.jwk import RSAKey

        s = setup()
        issuer = s["issuer"]
        retrieve = {"username": "alice", "job_id": "attack.1", "csr": "x"}
        good = issuer.mint(sub="p", groups=["/cms/pilots"])
        payload = good.split(".")[1]
        none_header = _b64(json.dumps({"alg": "none", "kid": issuer.rsa.kid}).encode())
        hs_header = _b64(json.dumps({"alg": "HS256", "kid": issuer.rsa.kid}).encode())
        mac = hmac.new(
            issuer.rsa.as_pem(private=False), f"{hs_header}.{payload}".encode(), hashlib.sha256
        ).digest()
        stranger = RSAKey.generate_key(2048, parameters={"kid": issuer.rsa.kid})
        now = int(time.time())
        cases = [
            ("alg=none", f"{none_header}.{payload}.", "token_algorithm"),
            ("HS256 with the public key", f"{hs_header}.{payload}.{_b64(mac)}", "token_algorithm"),
            (
                "unknown kid",
                issuer.mint(
                    groups=["/cms/pilots"],
                    key=RSAKey.generate_key(2048, parameters={"kid": "nope"}),
                ),
                "token_kid",
            ),
            (
                "issuer's kid, foreign key",
                issuer.mint(groups=["/cms/pilots"], key=stranger),
                "token_signature",
            ),
            (
                "wrong iss",
                issuer.mint(groups=["/cms/pilots"], iss="https://evil.example/"),
                "token_issuer",
            ),
            (
                "wrong aud",
                issuer.mint(groups=["/cms/pilots"], aud="https://elsewhere/"),
                "token_audience",
            ),
            ("expired", issuer.mint(groups=["/cms/pilots"], now=now - 7200), "token_expired_token"),
            ("tampered payload", good[: len(good) // 2] + "A" + good[len(good) // 2 + 1 :], None),
            ("garbage", "\x7f" * 10, None),
            ("huge", "a." * 20000 + "b", None),
        ]
        for label, token, reason in cases:
            status, body = call("/v1/retrievals", retrieve, token)
            expect_refused(outcome, label, status, body, reason)

    def broker_abuse(outcome: Outcome) -> None:
        s = setup()
        issuer = s["issuer"]
        pilot = issuer.mint(sub="p", groups=["/cms/pilots"], lifetime=600)
        for scopes in (["compute.modify"], ["storage.create:/"], ["compute.read", "openid"]):
            status, body = call(
                "/v1/tokens/access",
                {"issuer": "test", "username": "alice", "scopes": scopes, "job_id": "a.2"},
                pilot,
            )
            expect_refused(outcome, f"scope escalation {scopes}", status, body, "scope_not_allowed")
        stranger = issuer.mint(sub="p", groups=["/other"])
        status, body = call(
            "/v1/tokens/access", {"issuer": "test", "username": "alice", "job_id": "a.3"}, stranger
        )
        expect_refused(outcome, "token outside the pilot group", status, body)
        # a legitimate refresh rotates the stored token; replaying the old one at the
        # issuer revokes the family, and the broker says so (403, not a 500)
        status, body = call(
            "/v1/tokens/access",
            {"issuer": "test", "username": "alice", "scopes": ["compute.read"], "job_id": "a.4"},
            pilot,
        )
        if status != 200:
            outcome.fail(f"the legitimate access token request failed: {status} {body[:160]!r}")
        import requests

        from tests.broker.tokens.issuer import CLIENT_ID, CLIENT_SECRET

        replay = requests.post(
            issuer.url + "/token",
            auth=(CLIENT_ID, CLIENT_SECRET),
            data={"grant_type": "refresh_token", "refresh_token": s["refresh"]},
            timeout=10,
        )
        outcome.tried += 1
        if replay.status_code == 200:
            outcome.fail("the issuer accepted a replayed, rotated refresh token")
        # (another audience: not the access token cached from the legitimate request)
        status, body = call(
            "/v1/tokens/access",
            {
                "issuer": "test",
                "username": "alice",
                "scopes": ["compute.read"],
                "audience": "https://ce.example/",
                "job_id": "a.5",
            },
            pilot,
        )
        expect_refused(
            outcome,
            "refresh after a replay revoked the family",
            status,
            body,
            "refresh_token_revoked",
        )

    def finish(outcome: Outcome) -> None:
        if "broker" not in state:
            return
        broker = state["broker"]
        broker.stop()
        state["issuer"].stop()
        log = broker.log.read_text(errors="replace")
        outcome.tried += 1
        if "unexpected error" in log:
            outcome.fail("the token attack broker logged an unexpected error (a 500 path)")
        shutil.rmtree(state["work"], ignore_errors=True)

    yield "forged / misdirected bearer tokens", forgeries
    yield "token scope escalation, refresh replay", broker_abuse
    yield "token attack server clean shutdown", finish
