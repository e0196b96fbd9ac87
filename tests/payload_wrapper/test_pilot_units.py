"""broker-pilot pieces that need neither root nor a broker: config, allow-list, keys, args."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from broker.condor.jobad import JobAd
from broker.errors import SystemFailure
from payload_wrapper.errors import WrapperSystemError
from payload_wrapper.pilot import (
    KeySource,
    Pilot,
    Refresher,
    StartedJob,
    TokenRefresher,
    _parse,
    fill_rsa_pool,
    local_job_id,
    owner_allowed_by_dn,
    owner_allowed_by_fqans,
)
from payload_wrapper.pilot_config import PilotConfig, load_pilot_config, parse_pilot_config

BASE: dict[str, Any] = {
    "broker_url": "https://broker.example.org:8443",
    "cert": "/etc/grid-security/pilotcert.pem",
    "key": "/etc/grid-security/pilotkey.pem",
    "allowed_owners": ["/DC=org/DC=example/*", "fqan:/atlas"],
}


def config(**changes: Any) -> PilotConfig:
    return parse_pilot_config({**BASE, **changes})


def test_issue_example_loads_with_the_wrapper_table(tmp_path: Path) -> None:
    path = tmp_path / "pilot.toml"
    path.write_text("""
broker_url = "https://broker.example.org:8443"
cert = "/etc/grid-security/pilotcert.pem"
key = "/etc/grid-security/pilotkey.pem"
ca_dir = "/etc/grid-security/certificates"
vomsdir = "/etc/grid-security/vomsdir"
allowed_owners = ["/DC=org/DC=example/*", "fqan:/atlas"]
workdir = "/var/lib/broker-pilot"
[wrapper]
mode = "setuid"
account = "nobody"
umask = "0027"
""")
    cfg = load_pilot_config(path)
    assert cfg.key_type == "ec" and cfg.refresh_fraction == 0.5
    settings = cfg.wrapper_settings()
    assert settings.account == "nobody" and settings.umask == 0o027
    assert settings.workdir == Path("/var/lib/broker-pilot")
    assert settings.ca_dir == Path("/etc/grid-security/certificates")


def test_config_from_the_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "p.toml"
    path.write_text('broker_url = "b:1"\nproxy = "/p"\nallowed_owners = ["*"]\n')
    monkeypatch.setenv("BROKER_PILOT_CONFIG", str(path))
    cfg = load_pilot_config()
    assert (cfg.cert, cfg.key, cfg.source) == ("/p", "/p", str(path))
    assert cfg.wrapper_file == {}


@pytest.mark.parametrize(
    ("changes", "phrase"),
    [
        ({"allowed_owners": []}, "allowed_owners must be a non-empty list"),
        ({"allowed_owners": ["group:pilots"]}, "must be a DN glob"),
        ({"allowed_owners": ["re:("]}, "bad regular expression"),
        ({"key_type": "dsa"}, "key_type"),
        ({"refresh_fraction": 1.5}, "refresh_fraction"),
        ({"refresh_fraction": 0}, "refresh_fraction"),
        ({"retrieve_attempts": 0}, "retrieve_attempts"),
        ({"proxy": "/p"}, "either proxy or cert"),
        ({"surprise": 1}, "unknown setting"),
        ({"broker_url": ""}, "broker_url"),
        ({"stage_max_files": 0}, "stage_max_files must be a whole number"),
        ({"stage_max_bytes": "1G"}, "stage_max_bytes must be a whole number"),
        ({"stage_max_bytes": True}, "stage_max_bytes must be a whole number"),
    ],
)
def test_bad_settings_are_system_errors(changes: dict[str, Any], phrase: str) -> None:
    with pytest.raises(WrapperSystemError) as err:
        config(**changes)
    assert phrase in err.value.message
    assert err.value.exit_code == 202


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(WrapperSystemError, match="does not exist"):
        load_pilot_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("broker_url = \n")
    with pytest.raises(WrapperSystemError, match="not valid TOML"):
        load_pilot_config(bad)
    bad.write_text(
        'broker_url = "b"\nproxy = "/p"\nallowed_owners = ["*"]\n[wrapper]\nnot_a_wrapper_key = 1\n'
    )
    with pytest.raises(WrapperSystemError, match="not_a_wrapper_key"):
        load_pilot_config(bad)


def test_dn_allow_list_uses_the_policy_glob_language() -> None:
    cfg = config(
        allowed_owners=["/DC=org/DC=example/CN=A*", "re:/DC=org/DC=other/CN=[bc]", "fqan:/atlas"]
    )
    assert owner_allowed_by_dn(cfg, "/DC=org/DC=example/CN=Alice") == "/DC=org/DC=example/CN=A*"
    assert owner_allowed_by_dn(cfg, "/DC=org/DC=other/CN=b") is not None
    assert owner_allowed_by_dn(cfg, "/DC=org/DC=example/CN=Bob") is None
    # fqan entries are never decided from the DN alone
    assert cfg.fqan_owners == ("fqan:/atlas",)


def test_fqan_allow_list_matches_below_the_group() -> None:
    cfg = config(allowed_owners=["fqan:/atlas/Role=production"])
    dn = "/DC=org/DC=example/CN=Bob"
    assert owner_allowed_by_fqans(cfg, dn, ["/atlas/Role=production/Capability=NULL"])
    assert owner_allowed_by_fqans(cfg, dn, ["/atlas/Role=NULL/Capability=NULL"]) is None
    assert owner_allowed_by_fqans(cfg, dn, ["not an fqan"]) is None
    cfg = config(allowed_owners=["fqan:/atlas"])
    assert owner_allowed_by_fqans(cfg, dn, ["/atlas/higgs/Role=NULL/Capability=NULL"])
    assert owner_allowed_by_fqans(cfg, dn, ["/cms/Role=NULL/Capability=NULL"]) is None


def test_local_job_id_is_one_safe_unique_component() -> None:
    first = local_job_id("submit.example.org#42.3#1700000000")
    assert first.startswith("submit.example.org_42.3_1700000000.")
    assert first != local_job_id("submit.example.org#42.3#1700000000")
    assert local_job_id("../../etc").startswith("_.._etc.")
    assert len(local_job_id("x" * 500)) < 128


def test_rsa_pool_keys_are_claimed_once(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    fill_rsa_pool(pool, 2, bits=1024)
    assert os.stat(pool).st_mode & 0o777 == 0o700
    source = KeySource("ec", pool)
    first, second = source.take(), source.take()
    assert first.key_size == 1024 and second.key_size == 1024
    assert list(pool.iterdir()) == []
    third = source.take()  # empty pool: a fresh key of key_type
    assert third.curve.name == "secp256r1"
    assert source.pool_empty_noted


def test_refresh_schedule_follows_the_fraction() -> None:
    pilot = Pilot(config(refresh_fraction=0.25))
    ad = JobAd(owner_dn="/CN=a", credential="default", job_id="1.0")
    job = StartedJob(ad=ad, prepared=None, lifetime=3600.0, rule="*")  # type: ignore[arg-type]
    assert Refresher(pilot, job)._delay(3600.0) == 900.0
    pilot = Pilot(config(refresh_interval_seconds=2.5))
    assert Refresher(pilot, job)._delay(3600.0) == 2.5


def test_token_refresher_retries_a_failed_refresh_and_keeps_going(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The one refresh loop both refreshers share: a failure is said and retried, never fatal."""

    class Token:
        def __init__(self) -> None:
            self.written: list[str] = []

        def write(self, token: str) -> None:
            self.written.append(token)

    answers: list[Any] = [
        SystemFailure("issuer down", reason="unreachable"),
        ("t1", 60.0),
        ("t2", 60.0),
    ]

    class FakePilot(Pilot):
        def job_token(self, ad: JobAd) -> tuple[str, float]:
            answer = answers.pop(0) if answers else ("t3", 60.0)
            if isinstance(answer, Exception):
                raise answer
            return answer

    pilot = FakePilot(config(refresh_interval_seconds=0.05, refresh_retry_seconds=0.05))
    ad = JobAd(owner_dn="/CN=a", credential="default", job_id="1.0")
    job = StartedJob(ad=ad, prepared=None, lifetime=3600.0, rule="*")  # type: ignore[arg-type]
    token = Token()
    job.token, job.token_lifetime = token, 60.0  # type: ignore[assignment]
    refresher = TokenRefresher(pilot, job)
    refresher.start()
    deadline = time.monotonic() + 10
    while refresher.refreshed < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    refresher.stop()
    assert token.written[:2] == ["t1", "t2"] and refresher.refreshed >= 2
    err = capsys.readouterr().err
    assert "refreshing the payload's token failed (issuer down); retrying in" in err
    assert "refreshed the payload's token (valid 60 s" in err


def test_job_environment_drops_credential_and_loader_names() -> None:
    ad = JobAd(
        owner_dn="/CN=a",
        credential="default",
        job_id="1.0",
        environment=(
            ("A", "1"),
            ("X509_USER_PROXY", "/x"),
            ("LD_PRELOAD", "/y"),
            ("HOME", "/h"),
            ("_CONDOR_SLOT", "s"),
            ("B", "two words"),
        ),
    )
    assert Pilot._job_environment(ad) == ["A=1", "B=two words"]


def test_argument_parsing_leaves_the_job_command_alone() -> None:
    args = _parse(["/scratch/condor_exec.exe", "--job-ad", "x"])
    assert args.command == ("/scratch/condor_exec.exe", "--job-ad", "x")
    assert args.job_ad is None
    args = _parse(["--job-ad", "ad", "--config", "c", "--", "--weird", "a"])
    assert (args.job_ad, args.config, args.command) == ("ad", "c", ("--weird", "a"))
    assert _parse(["--fill-rsa-pool", "3"]).fill == 3
