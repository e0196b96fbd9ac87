"""The client side of the PAM routes, for users without a grid certificate.

:class:`PamClient` speaks TLS without a client certificate (the server still
proves itself against the CA directory) and sends a username and password.
Keys are made here; only CSRs travel.
"""

from __future__ import annotations

import ssl
from datetime import timedelta
from typing import Any

from broker.client import BrokerClient, parse_servers
from broker.errors import ConfigError
from broker.naming import DEFAULT_CREDENTIAL
from broker.pki.loading import Credential, PrivateKey, load_certificates
from broker.pki.proxy import csr_to_pem, generate_key, make_csr


class PamClient(BrokerClient):
    """A :class:`BrokerClient` that authenticates with a password instead of a certificate.

    It reuses the parent's request and error mapping (:meth:`BrokerClient.call`);
    the certificate-based operations of the parent are not meant to be used on it.
    """

    def __init__(self, server: str | None, *, ca_dir: str, timeout: float = 30.0) -> None:
        # The parent's __init__ loads a client certificate; this one has none on purpose.
        self.servers = parse_servers(server)
        self.timeout = timeout
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_verify_locations(capath=ca_dir)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"cannot load the CA directory {ca_dir}: {exc}") from exc
        self._ctx = ctx

    def pam_retrieve(
        self,
        *,
        username: str,
        password: str,
        name: str = DEFAULT_CREDENTIAL,
        lifetime_hours: float | None = None,
        job_id: str | None = None,
        limited: bool = False,
        key_type: str = "rsa",
    ) -> tuple[Credential, dict[str, Any]]:
        """A fresh proxy of the passphrase-less credential stored under ``username``."""
        key = generate_key(key_type)
        body: dict[str, Any] = {
            "username": username,
            "password": password,
            "name": name,
            "csr": csr_to_pem(make_csr(key)).decode(),
            "limited": limited,
        }
        if lifetime_hours is not None:
            body["lifetime_hours"] = lifetime_hours
        if job_id is not None:
            body["job_id"] = job_id
        result = self.call("POST", "/v1/pam/retrievals", body)
        chain = tuple(load_certificates(result["chain"].encode()))
        return Credential(chain=chain, key=key), result

    def pam_certificate(
        self,
        *,
        username: str,
        password: str,
        lifetime: timedelta | None = None,
        key: PrivateKey | None = None,
    ) -> tuple[Credential, dict[str, Any]]:
        """A short-lived user certificate from the broker's online CA, for a local key."""
        key = key or generate_key("rsa")
        body: dict[str, Any] = {
            "username": username,
            "password": password,
            "csr": csr_to_pem(make_csr(key)).decode(),
        }
        if lifetime is not None:
            body["lifetime_hours"] = lifetime.total_seconds() / 3600
        result = self.call("POST", "/v1/pam/certificate", body)
        chain = tuple(load_certificates(result["certificate"].encode()))
        return Credential(chain=chain, key=key), result
