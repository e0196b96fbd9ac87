"""Revocation takes effect on both endpoints within one documented bound (issue 18).

A real ``broker serve`` with two gunicorn workers and the MyProxy endpoint; the CA
directory gets a new CRL the way fetch-crl writes one (rename into place). Before the
fix REST kept accepting the revoked user for 40-120 s (a 60 s chain-verdict cache on top
of a 60 s CA-directory look) while MyProxy refused at once.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from broker.errors import BrokerError
from broker.pki.devca import make_crl, subject_hash
from broker.trustdir import RELOAD_INTERVAL
from tests.brokerserver import free_port, start_broker
from tests.pkifixtures import GridPki
from tests.reliability.harness import wait_port
from tests.reliability.myproxy_client import MyProxyClient, MyProxyRefused

#: Documented in docs/trust.md: a CA-directory change is in force within RELOAD_INTERVAL
#: seconds; the slack covers a loaded two-core machine.
BOUND = RELOAD_INTERVAL + 3.0


def revoke(pki: GridPki, ca_dir: Path, serial: int) -> None:
    crl = make_crl(pki.pki.ca, now=pki.now, revoked_serials=[serial])
    name = f"{subject_hash(pki.pki.ca.cert)}.r0"
    fd, tmp = tempfile.mkstemp(dir=ca_dir, prefix=".crl")
    with os.fdopen(fd, "wb") as handle:
        handle.write(crl.public_bytes(Encoding.PEM))
    os.chmod(tmp, 0o644)
    os.replace(tmp, ca_dir / name)


def time_until(refused: Callable[[], bool], limit: float, *, streak: int = 4) -> float | None:
    """Seconds until ``refused`` holds ``streak`` times in a row, or None within ``limit``."""
    start = time.monotonic()
    run = 0
    while time.monotonic() - start < limit:
        run = run + 1 if refused() else 0
        if run >= streak:
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def test_revocation_reaches_rest_and_myproxy_within_the_bound(
    grid_pki: GridPki, tmp_path: Path
) -> None:
    ca_dir = tmp_path / "certificates"
    shutil.copytree(grid_pki.ca_dir, ca_dir)
    pki = dataclasses.replace(grid_pki, ca_dir=ca_dir)
    mp_port = free_port()
    broker = start_broker(
        pki, tmp_path / "b", workers=2, extra=("--myproxy-bind", f"127.0.0.1:{mp_port}")
    )
    try:
        wait_port(mp_port, 20)
        bob = broker.client("bob")

        def rest_refused() -> bool:
            try:
                bob.call("GET", "/v1/whoami")
            except BrokerError as exc:
                assert exc.reason in ("revoked", "unauthenticated"), exc.message
                return True
            return False

        mp = MyProxyClient(mp_port, ca_dir, pki.cert_path("bob"), pki.key_path("bob"), timeout=10)

        def myproxy_refused() -> bool:
            try:
                mp.info("bob")
            except MyProxyRefused as exc:
                return "revoked" in str(exc)
            return False

        # Warm every worker's caches (chain verdicts, TLS contexts).
        for _ in range(8):
            assert not rest_refused()
        assert not myproxy_refused()
        revoke(pki, ca_dir, grid_pki.user("bob").cert.serial_number)
        rest = time_until(rest_refused, BOUND + 2)
        myproxy = time_until(myproxy_refused, BOUND + 2, streak=2)
        assert rest is not None and rest <= BOUND, f"REST still accepted bob after {BOUND} s"
        assert myproxy is not None, "MyProxy still accepted bob"
        # Alice is unaffected on both.
        assert broker.client("alice").call("GET", "/v1/whoami")["identity"].endswith("Alice")
    finally:
        broker.stop()
