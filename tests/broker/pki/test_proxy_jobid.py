"""Job-bound proxies: the job id travels in a non-critical extension of the issued proxy.

A proxy the broker issues for a job names the job (``JOB_ID_OID``), so a stolen
per-job proxy shows whose job it was for; the real grid tools still accept it.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from broker.errors import InputError
from broker.pki.chain import validate_chain
from broker.pki.loading import Credential
from broker.pki.proxy import (
    JOB_ID_OID,
    chain_job_id,
    generate_key,
    job_id_extension,
    make_csr,
    new_proxy,
    proxy_job_id,
    sign_request,
)
from broker.pki.voms import make_ac_extension
from tests.interop.tools import run
from tests.pkifixtures import GridPki, write_proxy_file

JOB = "submit.example.org#42.0#1700000000"


def _job_proxy(grid_pki: GridPki, job_id: str | None = JOB, *, voms: bool = False) -> Credential:
    alice, now = grid_pki.user("alice"), grid_pki.now
    if voms:
        ac = make_ac_extension(
            alice.cert,
            grid_pki.pki.voms,
            vo="atlas",
            fqans=["/atlas/Role=production"],
            uri="voms.example.org:15001",
            now=now,
            lifetime=timedelta(hours=6),
        )
        alice = new_proxy(alice, now=now, lifetime=timedelta(hours=6), extra_extensions=[ac])
    key = generate_key("ec")
    chain = sign_request(alice, make_csr(key), now=now, lifetime=timedelta(hours=2), job_id=job_id)
    return Credential(chain=chain, key=key)


def test_issued_proxy_names_its_job_in_a_non_critical_extension(grid_pki: GridPki) -> None:
    proxy = _job_proxy(grid_pki)
    ext = proxy.cert.extensions.get_extension_for_oid(JOB_ID_OID)
    assert not ext.critical
    assert proxy_job_id(proxy.cert) == JOB
    assert chain_job_id(proxy.chain) == JOB
    # our own validator accepts it as an ordinary impersonation proxy of Alice
    info = validate_chain(proxy.chain, grid_pki.trust, now=grid_pki.now)
    assert info.identity == "/DC=org/DC=example/CN=Alice"
    # a proxy without a job names none; a proxy of the job's proxy still names the job
    plain = _job_proxy(grid_pki, None)
    assert proxy_job_id(plain.cert) is None and chain_job_id(plain.chain) is None
    child = new_proxy(proxy, now=grid_pki.now, lifetime=timedelta(hours=1))
    assert proxy_job_id(child.cert) is None
    assert chain_job_id(child.chain) == JOB


@pytest.mark.parametrize("bad", ["", "a\nb", "x" * 257, "tab\there"])
def test_unprintable_or_long_job_ids_are_refused(bad: str) -> None:
    with pytest.raises(InputError, match="job id"):
        job_id_extension(bad)


def test_a_malformed_extension_value_reads_as_no_job(grid_pki: GridPki) -> None:
    from cryptography import x509

    alice = grid_pki.user("alice")
    odd = x509.UnrecognizedExtension(JOB_ID_OID, b"\x04\x03abc")  # an OCTET STRING
    proxy = new_proxy(alice, now=grid_pki.now, lifetime=timedelta(hours=1), extra_extensions=[odd])
    assert proxy_job_id(proxy.cert) is None


@pytest.mark.interop
@pytest.mark.parametrize("voms", [False, True])
def test_job_bound_proxy_accepted_by_openssl_globus_and_voms(
    grid_pki: GridPki, tmp_path: Path, voms: bool
) -> None:
    proxy = _job_proxy(grid_pki, voms=voms)
    path = write_proxy_file(tmp_path / "proxy.pem", proxy)
    verify = run(
        [
            "openssl",
            "verify",
            "-CApath",
            str(grid_pki.ca_dir),
            "-allow_proxy_certs",
            "-untrusted",
            str(path),
            str(path),
        ]
    )
    assert verify.returncode == 0, verify.stderr
    assert f"{path}: OK" in verify.stdout
    info = run(["grid-proxy-info", "-file", str(path)], grid_pki.env())
    assert info.returncode == 0, info.stderr
    assert "identity : /DC=org/DC=example/CN=Alice" in info.stdout
    exists = run(
        ["grid-proxy-info", "-file", str(path), "-exists", "-valid", "1:00"], grid_pki.env()
    )
    assert exists.returncode == 0, exists.stderr
    vinfo = run(["voms-proxy-info", "-all", "-file", str(path)], grid_pki.env())
    assert vinfo.returncode == 0, vinfo.stderr + vinfo.stdout
    assert "identity  : /DC=org/DC=example/CN=Alice" in vinfo.stdout
    if voms:
        assert "attribute : /atlas/Role=production/Capability=NULL" in vinfo.stdout
    # openssl shows the extension as an unknown, non-critical one
    text = run(["openssl", "x509", "-noout", "-text", "-in", str(path)])
    assert JOB_ID_OID.dotted_string in text.stdout
    assert JOB in text.stdout


# --------------------------------------------------------------------------- the service

from broker.service import BrokerService  # noqa: E402
from tests.broker import test_service as _svc  # noqa: E402 - the service fixtures

service = _svc.service
clock = _svc.clock


@pytest.mark.parametrize(
    "job_id", ["submit.example.org#9.0#1700000000", "j" * 256, "job\u200eid", "ünïcode#1.0"]
)
def test_audit_row_and_issued_proxy_name_the_same_job(
    service: BrokerService, grid_pki: GridPki, job_id: str
) -> None:
    _svc.delegate(service, grid_pki)
    issued = service.retrieve(
        _svc.who(service, grid_pki, "pilot"), csr_pem=_svc.csr(), username="alice", job_id=job_id
    )
    [row] = [r for r in service.store.query_audit(owner_dn=_svc.ALICE) if r.action == "retrieve"]
    assert row.job_id is not None
    assert chain_job_id(issued.chain) == row.job_id
