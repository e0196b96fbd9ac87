#!/usr/bin/env python3
"""Token-authenticated REST retrievals beside X.509 ones, on the same broker in the same run.

    scripts/bench tokens [--clients 1,4,16] [--requests 300] [--workers 2]

A real authlib issuer (tests/broker/tokens/issuer.py) on 127.0.0.1, a dev PKI, and
``broker serve`` with a ``[tokens]`` issuer and a policy that lets both the pilot
certificate and pilot tokens (``token-group:/cms/pilots``) retrieve alice's proxy.
Per concurrency level and mode, every retrieval opens a new TCP connection with a
full TLS handshake (no resumption): ``x509`` presents the pilot certificate,
``bearer`` presents no certificate and an ``Authorization: Bearer`` RS256 token
(the broker verifies it on every request; the JWKS is cached). A third mode,
``access-token``, measures ``POST /v1/tokens/access`` for a job (the broker
reuses a fresh access token, so this is the cached path). Results: retrievals/s,
p50 / p99 ms; JSON to bench-out/tokens.json. The server and the issuer are
stopped at the end; the temporary directory is removed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import ssl
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.retrieval import post_once
from broker.devpki import DEV_POLICY, write_dev_pki
from broker.pki.proxy import csr_to_pem, generate_key, make_csr
from tests.broker.tokens.issuer import TestIssuer
from tests.broker.tokens.test_token_e2e import broker_toml
from tests.brokerserver import start_broker
from tests.pkifixtures import GridPki

REPO = Path(__file__).resolve().parents[1]


def _policy(issuer_url: str) -> str:
    return (
        DEV_POLICY
        + f"""
[[rule]]
name = "pilot tokens"
effect = "allow"
action = ["retrieve"]
requester = ["token-group:{issuer_url}#/cms/pilots"]
auth = ["token"]
"""
    )


def _one(port: int, ctx: ssl.SSLContext, path: str, body: bytes, token: str | None) -> str | None:
    answer = post_once(ctx, port, path, body, 60, token)
    if isinstance(answer, str):
        return answer
    status, raw = answer
    return None if status == 200 else f"HTTP {status} {raw[:120]!r}"


def _level(
    port: int,
    ctx: ssl.SSLContext,
    path: str,
    bodies: list[bytes],
    token: str | None,
    clients: int,
    requests: int,
) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    per_thread = max(1, requests // clients)

    def worker(index: int) -> None:
        for i in range(per_thread):
            t0 = time.perf_counter()
            err = _one(port, ctx, path, bodies[(index + i) % len(bodies)], token)
            elapsed = time.perf_counter() - t0
            with lock:
                (errors.append(err) if err else latencies.append(elapsed))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()

    def pct(p: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000
            if latencies
            else float("nan")
        )

    return {
        "clients": clients,
        "ok": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(pct(50), 1),
        "p99_ms": round(pct(99), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "bench-out" / "tokens.json"))
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-tokens-"))
    issuer = TestIssuer(access_lifetime=1200).start()
    broker = None
    try:
        now = datetime.now(UTC)
        pki_obj, manifest = write_dev_pki(tmp / "pki", now=now, users=("alice",), pilots=("pilot",))
        base = tmp / "pki"
        pki = GridPki(pki_obj, base, base / "certificates", base / "vomsdir", manifest, now)
        config = broker_toml(issuer, tmp)
        broker = start_broker(
            pki,
            tmp / "srv",
            policy=_policy(issuer.url),
            extra=("--config", str(config)),
            workers=args.workers,
        )
        alice = broker.client("alice")
        alice.delegate(alice.identity.load(), username="alice", now=datetime.now(UTC))
        alice.call(
            "POST",
            "/v1/tokens/refresh-tokens",
            {
                "issuer": "test",
                "username": "alice",
                "refresh_token": issuer.issue_refresh_token(
                    "alice-sub", "offline_access compute.read storage.read:/"
                ),
            },
        )
        csrs = [
            json.dumps(
                {
                    "csr": csr_to_pem(make_csr(generate_key("ec"))).decode(),
                    "username": "alice",
                    "job_id": f"bench.{n}",
                }
            ).encode()
            for n in range(16)
        ]
        access = [
            json.dumps(
                {
                    "issuer": "test",
                    "username": "alice",
                    "scopes": ["compute.read"],
                    "job_id": f"bench.{n}",
                }
            ).encode()
            for n in range(16)
        ]
        server_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        server_ctx.load_verify_locations(capath=str(pki.ca_dir))
        cert_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        cert_ctx.load_verify_locations(capath=str(pki.ca_dir))
        cert_ctx.load_cert_chain(str(pki.cert_path("pilot")), str(pki.key_path("pilot")))
        token = issuer.mint(sub="bench-pilot", groups=["/cms/pilots"], lifetime=7200)
        results: list[dict[str, Any]] = []
        print(
            f"{'mode':<13} {'clients':>7} {'ok':>5} {'err':>4} {'per s':>7} {'p50 ms':>7} "
            f"{'p99 ms':>7}"
        )
        for clients in levels:
            for mode, ctx, path, bodies, bearer in (
                ("x509", cert_ctx, "/v1/retrievals", csrs, None),
                ("bearer", server_ctx, "/v1/retrievals", csrs, token),
                ("access-token", server_ctx, "/v1/tokens/access", access, token),
            ):
                row = {
                    "mode": mode,
                    **_level(broker.port, ctx, path, bodies, bearer, clients, args.requests),
                }
                results.append(row)
                print(
                    f"{mode:<13} {clients:>7} {row['ok']:>5} {row['errors']:>4} "
                    f"{row['per_s']:>7} {row['p50_ms']:>7} {row['p99_ms']:>7}"
                    + (f"  {row['first_error']}" if row["first_error"] else "")
                )
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps(
                {"workers": args.workers, "requests": args.requests, "results": results}, indent=2
            )
        )
        return 0 if all(r["errors"] == 0 for r in results) else 1
    finally:
        if broker is not None:
            broker.stop()
        issuer.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
