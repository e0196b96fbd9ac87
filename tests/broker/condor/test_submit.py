"""Checking and augmenting submit descriptions with htcondor2.Submit (offline)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import htcondor2
import pytest

from broker.condor.submit import augment_submit, parse_submit, submit_to_schedd
from broker.errors import InputError, SystemFailure

OWNER = "/DC=org/DC=example/CN=Alice"

JOB = """# a job with inline item data
executable = analyse.sh
arguments = $(name)
+BrokerOwner = "/DC=org/DC=example/CN=Mallory"
getenv = false
environment = "MODE=fast LABEL='two words'"
queue name from (
  first
  second
)
"""


def _values(submit: object) -> dict[str, str]:
    return {k.lower(): str(v) for k, v in submit.items()}  # type: ignore[attr-defined]


def test_augmented_text_reparses_and_carries_the_attributes() -> None:
    result = augment_submit(JOB, owner_dn=OWNER, credential="analysis", lifetime_hours=6)
    again = htcondor2.Submit(result.text)
    values = _values(again)
    assert values["my.brokerowner"] == f'"{OWNER}"'
    assert values["my.brokercredential"] == '"analysis"'
    assert values["my.brokerlifetime"] == "6"
    assert values["run_as_owner"] == "False"
    assert values["getenv"] == "False"
    assert values["executable"] == "analyse.sh"
    # the user's own BrokerOwner line is replaced, not kept
    assert "Mallory" not in result.text
    assert set(result.removed) == {"+BrokerOwner", "getenv"}
    # the inline item list survives (str(Submit) would lose it)
    assert [d["name"] for d in again.itemdata()] == ["first", "second"]
    assert result.text.index("+BrokerOwner") < result.text.index("queue name from")
    assert "# a job with inline item data" in result.text


def test_no_queue_statement_appends_the_block() -> None:
    result = augment_submit("executable = /bin/true\n", owner_dn=OWNER, credential="default")
    assert result.text.rstrip().endswith("getenv = False")
    assert _values(result.submit)["my.brokercredential"] == '"default"'


@pytest.mark.parametrize(
    ("text", "reason", "phrase"),
    [
        ("arguments = 1\nqueue\n", "no_executable", "executable = run.sh"),
        ("executable =\nqueue\n", "no_executable", "no executable"),
        ("this is garbage\nqueue\n", "bad_submit", "cannot be parsed"),
        ("executable = a\ngetenv = True\nqueue\n", "getenv", "getenv = True"),
        ("executable = a\ngetenv = HOME, PATH\nqueue\n", "getenv", "environment"),
        (
            'executable = a\nenvironment = "A=1 X509_USER_PROXY=/tmp/x509up_u1"\nqueue\n',
            "credential_env",
            "X509_USER_PROXY",
        ),
        (
            "executable = a\nenv = BEARER_TOKEN_FILE=/t;A=1\nqueue\n",
            "credential_env",
            "BEARER_TOKEN_FILE",
        ),
        (
            'executable = a\nenvironment = "A=1 PYTHONPATH=/home/a/lib"\nqueue\n',
            "pilot_env",
            "PYTHONPATH",
        ),
        ("executable = a\nenv = LD_PRELOAD=/home/a/x.so\nqueue\n", "pilot_env", "LD_PRELOAD"),
        (
            'executable = a\nenvironment = "BROKER_PILOT_CONFIG=/home/a/p.toml"\nqueue\n',
            "pilot_env",
            "BROKER_PILOT_CONFIG",
        ),
        (
            'executable = a\nenvironment = "pythonhome=/x GCONV_PATH=/y"\nqueue\n',
            "pilot_env",
            "GCONV_PATH, pythonhome",
        ),
        (
            "executable = a\nenv = OPENSSL_CONF=/home/a/engine.cnf\nqueue\n",
            "pilot_env",
            "inside your executable",
        ),
        (
            "executable = a\nx509userproxy = /tmp/x509up_u1\nqueue\n",
            "proxy_shipped",
            "x509userproxy",
        ),
        ("executable = a\nuse_x509userproxy = true\nqueue\n", "proxy_shipped", "broker"),
        ("include : other.sub\nexecutable = a\nqueue\n", "include", "paste"),
    ],
)
def test_refusals_say_what_to_change(text: str, reason: str, phrase: str) -> None:
    with pytest.raises(InputError) as err:
        augment_submit(text, owner_dn=OWNER, credential="default")
    assert err.value.reason == reason, err.value.message
    assert phrase in err.value.message


def test_docker_universe_may_omit_the_executable() -> None:
    result = augment_submit(
        "universe = docker\ndocker_image = debian:12\nqueue\n", owner_dn=OWNER, credential="default"
    )
    assert "+BrokerOwner" in result.text


@pytest.mark.parametrize(
    ("owner", "name"), [('/CN=a"b', "default"), ("/CN=$(x)", "default"), (OWNER, "../etc")]
)
def test_values_that_cannot_be_written_safely(owner: str, name: str) -> None:
    with pytest.raises(InputError):
        augment_submit("executable = a\nqueue\n", owner_dn=owner, credential=name)


def test_parse_error_is_an_input_error() -> None:
    with pytest.raises(InputError):
        parse_submit("executable = a\nqueue x from (\n")


def test_no_schedd_is_a_clear_system_failure() -> None:
    result = augment_submit("executable = /bin/true\nqueue\n", owner_dn=OWNER, credential="default")
    with pytest.raises(SystemFailure) as err:
        submit_to_schedd(result)
    assert err.value.reason == "no_schedd"
    assert "--dry-run" in err.value.message


def test_broker_submit_refuses_pilot_variables_before_asking_the_broker(tmp_path: Path) -> None:
    job = tmp_path / "job.sub"
    job.write_text('executable = /bin/true\nenvironment = "PYTHONPATH=/home/a/lib A=1"\nqueue\n')
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "broker-submit"),
            str(job),
            "-k",
            "default",
            "--dry-run",
            "-s",
            "localhost:1",
        ],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "PYTHONPATH" in result.stderr and "inside your executable" in result.stderr
    assert "Traceback" not in result.stderr
