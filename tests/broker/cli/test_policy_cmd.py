"""`broker policy check` and `broker policy explain` through click's runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from broker.cli.policy_cmd import policy

REPO_POLICIES = Path(__file__).resolve().parents[3] / "policies"
PILOT = "/DC=org/DC=example/OU=Robots/CN=pilot3"
BOB = "/DC=org/DC=example/OU=People/CN=Bob"
BASE = ["explain", "--dir", str(REPO_POLICIES), "--action", "retrieve", "--owner", BOB]


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(policy, list(args), env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def test_check_examples_ok() -> None:
    code, out, _ = run("check", str(REPO_POLICIES))
    assert code == 0 and out.startswith("OK: ") and "rules" in out and "in 2 files" in out


def test_check_uses_env_dir(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('[groups]\ng = ["/CN=x"]\n')
    code, out, _ = run("check", env={"BROKER_POLICY_DIR": str(tmp_path)})
    assert code == 0 and out == "OK: 0 rules, 1 group in 1 file\n"


def test_check_reports_every_error_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "10-a.toml").write_text(
        '[[rule]]\nname = "open"\naction = "retrieve"\neffect = "allow"\nrequester = ["*"]\n'
    )
    (tmp_path / "20-b.toml").write_text(
        '[groups]\nx = ["group:y"]\ny = ["group:x"]\n\n'
        '[[rule]]\nname = "r"\naction = "retreive"\neffect = "allow"\nrequester = ["/CN=a"]\n'
        'max_lifetime = "forever"\n'
    )
    code, out, err = run("check", str(tmp_path))
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith(f"ERROR {tmp_path}/10-a.toml:1: ") and "any DN" in lines[0]
    assert any("20-b.toml:2: group cycle: x -> y -> x" in line for line in lines)
    assert any("20-b.toml:7:" in line and "unknown action" in line for line in lines)
    assert any("20-b.toml:10:" in line and "bad duration" in line for line in lines)
    assert "FAILED: 4 problems" in err


def test_check_missing_dir(tmp_path: Path) -> None:
    code, _, err = run("check", str(tmp_path / "nope"))
    assert code == 1 and "does not exist" in err and "Traceback" not in err


def test_explain_allowed_json() -> None:
    code, out, _ = run(
        *BASE, "--requester", PILOT, "--owner-fqan", "/atlas", "--job-id", "1.0", "--json"
    )
    assert code == 0
    data = json.loads(out)
    assert data["decision"] == "allow" and data["reason"] == "allowed"
    assert data["rule"]["name"] == "atlas pilots retrieve for atlas users"
    assert data["max_lifetime"] == 12 * 3600 and data["limited"] is True
    assert {"rule", "matched", "why", "file", "line"} <= set(data["trace"][0])
    assert len(data["trace"]) == data["rules_checked"]


def test_explain_denied_text() -> None:
    code, out, _ = run(*BASE, "--requester", "/DC=org/DC=example/CN=Eve")
    assert code == 3
    assert out.startswith("decision: deny (no_matching_rule)\ndenied: no rule lets ")
    assert "[ ]" in out


def test_explain_denied_json_owner_layer() -> None:
    code, out, _ = run(
        *BASE,
        "--requester",
        PILOT,
        "--owner-fqan",
        "/atlas",
        "--job-id",
        "1",
        "--trusted-retrievers",
        "/CN=someone-else",
        "--json",
    )
    data = json.loads(out)
    assert code == 3 and data["decision"] == "deny" and data["reason"] == "owner_policy"
    assert data["trace"][-1]["layer"] == "owner"


@pytest.mark.parametrize(
    "args",
    [
        ["--requester", "CN=not-slash-form"],
        ["--requester", PILOT, "--fqan", "atlas"],
        [],  # certificate auth without a DN
        ["--requester", PILOT, "--auth", "kerberos"],
        ["--requester", PILOT, "--dir", "/nonexistent/policies"],
    ],
)
def test_explain_bad_input_exit_1(args: list[str]) -> None:
    code, out, err = run(*BASE, *args)
    assert code == 1 and "Traceback" not in out + err and err


def test_explain_missing_required_option_exit_1() -> None:
    code, _, err = run("explain", "--action", "retrieve")
    assert code == 1 and "--owner" in err
