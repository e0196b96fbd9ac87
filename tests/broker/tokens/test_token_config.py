"""[tokens] in broker.toml: parsed, validated, and what it changes at the TLS layer."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from broker.config import load_config
from broker.errors import ConfigError
from broker.server import make_server_context
from tests.pkifixtures import GridPki

TOKENS = """
[tokens]
leeway_seconds = 10
[[tokens.issuers]]
name = "cms"
issuer = "https://cms-auth.example.org/"
audience = ["https://broker.example.org"]
job_scopes = ["compute.read"]
"""


def _config(tmp_path: Path, text: str, pki: GridPki) -> object:
    path = tmp_path / "broker.toml"
    path.write_text(text)
    return load_config(
        str(path),
        {
            "state_dir": str(tmp_path / "state"),
            "host_cert": str(pki.cert_path("host")),
            "host_key": str(pki.key_path("host")),
            "ca_dir": str(pki.ca_dir),
        },
    )


def test_issuers_make_the_client_certificate_optional_at_the_handshake(
    tmp_path: Path, grid_pki: GridPki
) -> None:
    plain = _config(tmp_path, "[server]\nworkers = 1\n", grid_pki)
    assert not plain.certificate_optional  # type: ignore[attr-defined]
    assert make_server_context(plain).verify_mode is ssl.CERT_REQUIRED  # type: ignore[arg-type]
    with_tokens = _config(tmp_path, TOKENS, grid_pki)
    assert with_tokens.tokens.issuers[0].name == "cms"  # type: ignore[attr-defined]
    assert with_tokens.tokens.leeway_seconds == 10  # type: ignore[attr-defined]
    assert with_tokens.certificate_optional  # type: ignore[attr-defined]
    assert make_server_context(with_tokens).verify_mode is ssl.CERT_OPTIONAL  # type: ignore[arg-type]
    empty = _config(tmp_path, "[tokens]\nissuers = []\n", grid_pki)
    assert not empty.certificate_optional  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[tokens]\nbogus = 1\n", "bogus"),
        (TOKENS.replace('issuer = "https', 'issuer = "http'), "https"),
        (TOKENS.replace('name = "cms"', 'name = "CMS!"'), "name"),
        (TOKENS + TOKENS.split("[tokens]")[1].replace("leeway_seconds = 10", ""), "unique"),
        ("[tokens]\nleeway_seconds = 9999\n", "leeway_seconds"),
    ],
)
def test_bad_token_settings_are_config_errors(
    tmp_path: Path, grid_pki: GridPki, text: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, text, grid_pki)
