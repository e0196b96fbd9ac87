"""Fixtures: a real authlib issuer on loopback and the broker's settings for it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.tokens import IssuerConfig, IssuerDirectory, TokenSettings
from tests.broker.tokens.issuer import AUDIENCE, CLIENT_ID, CLIENT_SECRET, TestIssuer

JOB_SCOPES = ("compute.read", "storage.read:/")


@pytest.fixture
def issuer() -> Iterator[TestIssuer]:
    running = TestIssuer().start()
    try:
        yield running
    finally:
        running.stop()


def issuer_config(
    issuer: TestIssuer, secret_dir: Path, *, name: str = "test", **changes: object
) -> IssuerConfig:
    secret = secret_dir / f"{name}.secret"
    secret.write_text(CLIENT_SECRET + "\n")
    secret.chmod(0o600)
    values: dict[str, object] = {
        "name": name,
        "issuer": issuer.url,
        "audience": (AUDIENCE,),
        "client_id": CLIENT_ID,
        "client_secret_file": str(secret),
        "job_scopes": JOB_SCOPES,
        "insecure_loopback_http": True,
    }
    values.update(changes)
    return IssuerConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
def settings(issuer: TestIssuer, tmp_path: Path) -> TokenSettings:
    return TokenSettings(issuers=(issuer_config(issuer, tmp_path),), leeway_seconds=30)


@pytest.fixture
def directory(settings: TokenSettings) -> IssuerDirectory:
    return IssuerDirectory(settings)
