"""Reading the starter's job ad with classad2 (no HTCondor daemons needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.condor.jobad import parse_environment, parse_job_ad, read_job_ad
from broker.errors import InputError, SystemFailure

AD = """MyType = "Job"
ClusterId = 42
ProcId = 3
GlobalJobId = "submit.example.org#42.3#1700000000"
Owner = "alice"
BrokerOwner = "/DC=org/DC=example/CN=Alice"
BrokerCredential = "analysis"
BrokerLifetime = 6
x509userproxysubject = "/DC=org/DC=example/CN=Someone Else"
Environment = "A=1 B='two words' C='it''s'"
"""


def test_reads_the_broker_attributes(tmp_path: Path) -> None:
    path = tmp_path / ".job.ad"
    path.write_text(AD)
    ad = read_job_ad(path)
    assert ad.owner_dn == "/DC=org/DC=example/CN=Alice"
    assert ad.owner_source == "BrokerOwner"
    assert ad.credential == "analysis"
    assert ad.lifetime_hours == 6.0
    assert ad.job_id == "submit.example.org#42.3#1700000000"
    assert ad.submitter == "alice"
    assert ad.environment == (("A", "1"), ("B", "two words"), ("C", "it's"))


def test_fallbacks_subject_default_name_and_cluster_proc() -> None:
    ad = parse_job_ad(
        "ClusterId = 7\nProcId = 0\n"
        'x509UserProxySubject = "/DC=org/DC=example/CN=Bob"\nEnv = "X=1;Y=2"\n'
    )
    assert (ad.owner_dn, ad.owner_source) == ("/DC=org/DC=example/CN=Bob", "x509UserProxySubject")
    assert ad.credential == "default"
    assert ad.job_id == "7.0"
    assert ad.lifetime_hours is None and ad.submitter is None
    assert ad.environment == (("X", "1"), ("Y", "2"))


def test_attribute_lookup_ignores_case_and_evaluates() -> None:
    ad = parse_job_ad('clusterid = 1\nprocid = 2\nbrokerowner = "/CN=x"\nbrokerlifetime = 2 * 3\n')
    assert ad.owner_dn == "/CN=x" and ad.job_id == "1.2" and ad.lifetime_hours == 6.0


@pytest.mark.parametrize(
    ("text", "reason", "phrase"),
    [
        ("ClusterId = 1\nProcId = 0\n", "no_owner", "broker-submit"),
        ('ClusterId = 1\nProcId = 0\nBrokerOwner = "alice"\n', "bad_owner", "DN"),
        ("ClusterId = 1\nProcId = 0\nBrokerOwner = 5\n", "bad_job_ad", "string"),
        (
            'ClusterId = 1\nProcId = 0\nBrokerOwner = "/CN=a"\nBrokerCredential = "../etc"\n',
            "bad_credential_name",
            "credential name",
        ),
        (
            'ClusterId = 1\nProcId = 0\nBrokerOwner = "/CN=a"\nBrokerLifetime = -1\n',
            "bad_lifetime",
            "positive",
        ),
        (
            'ClusterId = 1\nProcId = 0\nBrokerOwner = "/CN=a"\nBrokerLifetime = "x"\n',
            "bad_lifetime",
            "positive",
        ),
        ('BrokerOwner = "/CN=a"\n', "no_job_id", "GlobalJobId"),
        ("this is not a job ad at all\n", "no_owner", "BrokerOwner"),
        (
            'ClusterId = 1\nProcId = 0\nBrokerOwner = "/CN=a"\nEnvironment = "A=\'open"\n',
            "bad_environment",
            "quote",
        ),
    ],
)
def test_unusable_ads_are_refused_with_a_reason(text: str, reason: str, phrase: str) -> None:
    with pytest.raises(InputError) as err:
        parse_job_ad(text)
    assert err.value.reason == reason
    assert phrase in err.value.message


def test_missing_file_is_a_system_failure(tmp_path: Path) -> None:
    with pytest.raises(SystemFailure) as err:
        read_job_ad(tmp_path / "absent")
    assert "_CONDOR_JOB_AD" in err.value.message


def test_environment_syntax() -> None:
    assert parse_environment("") == []
    assert parse_environment("  A=  B='x  y'  ") == [("A", ""), ("B", "x  y")]
    assert parse_environment("P='a=b' Q=''''") == [("P", "a=b"), ("Q", "'")]
    with pytest.raises(InputError):
        parse_environment("novalue")
