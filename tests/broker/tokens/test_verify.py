"""Bearer-token verification against a real issuer: the accepted token and the attacks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import pytest
from joserfc.jwk import RSAKey

from broker.errors import ConfigError
from broker.tokens import (
    IssuerDirectory,
    IssuerUnavailable,
    TokenRejected,
    TokenSettings,
    parse_token_settings,
    verify_bearer,
)
from tests.broker.tokens.conftest import issuer_config
from tests.broker.tokens.issuer import AUDIENCE, TestIssuer
from tests.pkifixtures import GridPki


def _now() -> int:
    return int(time.time())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _reason(raw: str, settings: TokenSettings, directory: IssuerDirectory) -> str:
    with pytest.raises(TokenRejected) as err:
        verify_bearer(raw, settings, directory, now=_now())
    assert err.value.http_status == 401
    return err.value.reason


def test_valid_rs256_and_es256_tokens_yield_claims(
    issuer: TestIssuer, settings: TokenSettings, directory: IssuerDirectory
) -> None:
    for alg in ("RS256", "ES256"):
        raw = issuer.mint(
            sub="pilot-7",
            alg=alg,
            scope="compute.read storage.read:/cms",
            groups=["/cms/pilots", "cms"],
        )
        claims = verify_bearer(raw, settings, directory, now=_now())
        assert claims.issuer == issuer.url
        assert claims.subject == "pilot-7"
        assert claims.scopes == ("compute.read", "storage.read:/cms")
        assert claims.groups == ("/cms/pilots", "/cms")


def test_audience_list_and_scitokens_scp(
    issuer: TestIssuer, settings: TokenSettings, directory: IssuerDirectory
) -> None:
    no_wlcg_ver: dict[str, Any] = {"wlcg.ver": None}
    raw = issuer.mint(aud=["other", AUDIENCE], scope=None, **no_wlcg_ver)
    # no profile at all: refused
    assert _reason(raw, settings, directory) == "token_profile"
    sci = issuer.mint(
        scope=None, scp=["compute.read"], ver="scitoken:2.0", aud=["other", AUDIENCE], **no_wlcg_ver
    )
    claims = verify_bearer(sci, settings, directory, now=_now())
    assert "compute.read" in claims.scopes


def test_alg_none_is_refused(
    issuer: TestIssuer, settings: TokenSettings, directory: IssuerDirectory
) -> None:
    valid = issuer.mint()
    payload = valid.split(".")[1]
    header = _b64(json.dumps({"alg": "none", "kid": issuer.rsa.kid}).encode())
    assert _reason(f"{header}.{payload}.", settings, directory) == "token_algorithm"


def test_hs256_with_the_public_key_as_secret_is_refused(
    issuer: TestIssuer, settings: TokenSettings, directory: IssuerDirectory
) -> None:
    public_pem = issuer.rsa.as_pem(private=False)
    header = _b64(json.dumps({"alg": "HS256", "kid": issuer.rsa.kid, "typ": "JWT"}).encode())
    payload = issuer.mint().split(".")[1]
    mac = hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    assert _reason(f"{header}.{payload}.{_b64(mac)}", settings, directory) == "token_algorithm"


def test_unknown_kid_and_foreign_key_are_refused(
    issuer: TestIssuer, settings: TokenSettings, directory: IssuerDirectory
) -> None:
    attacker = RSAKey.generate_key(2048, parameters={"kid": "attacker"})
    assert _reason(issuer.mint(key=attacker), settings, directory) == "token_kid"
    # The attacker's key under the issuer's real kid: the signature does not verify.
    real_kid = issuer.rsa.kid
    assert real_kid is not None
    stolen_kid = RSAKey.generate_key(2048, parameters={"kid": real_kid})
    assert _reason(issuer.mint(key=stolen_kid), settings, directory) == "token_signature"


def test_wrong_issuer_audience_and_times_are_refused(
    issuer: TestIssuer, settings: TokenSettings, directory: IssuerDirectory
) -> None:
    assert _reason(issuer.mint(iss="https://evil.example"), settings, directory) == "token_issuer"
    assert (
        _reason(issuer.mint(aud="https://other-service.example"), settings, directory)
        == "token_audience"
    )
    assert (
        _reason(issuer.mint(now=_now() - 3600, lifetime=600), settings, directory)
        == "token_expired_token"
    )
    assert _reason(issuer.mint(now=_now() + 3600), settings, directory).startswith("token_")
    # within the leeway: accepted
    verify_bearer(issuer.mint(now=_now() - 620, lifetime=600), settings, directory, now=_now())


def test_token_from_an_unconfigured_issuer_is_refused(
    issuer: TestIssuer, settings: TokenSettings, directory: IssuerDirectory
) -> None:
    other = TestIssuer().start()
    try:
        assert _reason(other.mint(), settings, directory) == "token_issuer"
        # even claiming the configured issuer's iss, its keys are not the issuer's
        forged = other.mint(iss=issuer.url, key=other.rsa)
        assert _reason(forged, settings, directory) in ("token_kid", "token_signature")
    finally:
        other.stop()


def test_garbage_is_refused_cleanly(settings: TokenSettings, directory: IssuerDirectory) -> None:
    for raw in ("", "abc", "a.b.c", "\u00e9.x.y", "x" * 20000):
        assert _reason(raw, settings, directory) in ("token_malformed", "token_too_large")


def test_key_rollover_fetches_new_keys_and_drops_old_ones(
    issuer: TestIssuer, settings: TokenSettings
) -> None:
    clock = [1000.0]
    directory = IssuerDirectory(settings, clock=lambda: clock[0])
    old_token = issuer.mint()
    verify_bearer(old_token, settings, directory, now=_now())
    old_key = issuer.rsa
    issuer.rsa = RSAKey.generate_key(2048, parameters={"kid": "rsa-rolled", "use": "sig"})
    clock[0] += 60  # past the anti-hammering interval, within the refresh period
    verify_bearer(issuer.mint(), settings, directory, now=_now())  # unknown kid: refetched
    # The old key left the issuer's JWKS: tokens it signed no longer verify.
    assert _reason(issuer.mint(key=old_key), settings, directory) == "token_kid"


def test_unreachable_issuer_is_503_naming_it(issuer: TestIssuer, settings: TokenSettings) -> None:
    directory = IssuerDirectory(settings)
    issuer.state.down = True
    with pytest.raises(IssuerUnavailable) as err:
        verify_bearer(issuer.mint(), settings, directory, now=_now())
    assert err.value.http_status == 503
    assert "test" in err.value.message and issuer.url in err.value.message
    # Cached keys keep working while the issuer is down.
    issuer.state.down = False
    verify_bearer(issuer.mint(), settings, directory, now=_now())
    issuer.state.down = True
    verify_bearer(issuer.mint(), settings, directory, now=_now())


def test_local_jwks_file_for_air_gapped_sites(issuer: TestIssuer, tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    config = issuer_config(issuer, tmp_path, jwks_file=str(jwks))
    settings = TokenSettings(issuers=(config,))
    directory = IssuerDirectory(settings)
    issuer.state.down = True  # no network needed
    claims = verify_bearer(issuer.mint(sub="offline"), settings, directory, now=_now())
    assert claims.subject == "offline"


def test_settings_refuse_plain_http_without_the_flag() -> None:
    base = {"name": "x", "issuer": "http://127.0.0.1:1/", "audience": ["a"]}
    with pytest.raises(ConfigError, match="insecure_loopback_http"):
        parse_token_settings({"issuers": [base]})
    with pytest.raises(ConfigError, match="https"):
        parse_token_settings(
            {"issuers": [{**base, "issuer": "http://example.org/", "insecure_loopback_http": True}]}
        )
    with pytest.raises(ConfigError, match="audience"):
        parse_token_settings(
            {"issuers": [{**base, "audience": [], "insecure_loopback_http": True}]}
        )
    ok = parse_token_settings({"issuers": [{**base, "insecure_loopback_http": True}]})
    assert ok.issuers[0].issuer == "http://127.0.0.1:1/"


def test_https_issuer_needs_a_trusted_certificate(grid_pki: GridPki, tmp_path: Path) -> None:
    tls = TestIssuer(tls=(str(grid_pki.cert_path("host")), str(grid_pki.key_path("host"))))
    tls.start()
    try:
        ca_file = next(grid_pki.ca_dir.glob("*.0"))
        trusted = TokenSettings(
            issuers=(
                issuer_config(tls, tmp_path, ca_bundle=str(ca_file), insecure_loopback_http=False),
            )
        )
        claims = verify_bearer(
            tls.mint(sub="over-tls"), trusted, IssuerDirectory(trusted), now=_now()
        )
        assert claims.subject == "over-tls"
        # without the site's CA the issuer's certificate is not trusted: 503, not accepted
        untrusted = TokenSettings(
            issuers=(issuer_config(tls, tmp_path, insecure_loopback_http=False),)
        )
        with pytest.raises(IssuerUnavailable, match="unreachable"):
            verify_bearer(tls.mint(), untrusted, IssuerDirectory(untrusted), now=_now())
    finally:
        tls.stop()
