"""`broker policy check` and `broker policy explain` through click's runner."""

from __future__ import annotations

import json
import re
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


# --------------------------------------------------------------------------- import-myproxy-config

DEBIAN_SAMPLE = Path("/etc/myproxy-server.config")


def _debian_samples() -> dict[str, str]:
    """Every "Complete Sample Policy" block of Debian's config file, uncommented."""
    if not DEBIAN_SAMPLE.exists():
        from tests.prerequisites import unavailable

        unavailable("the Debian sample /etc/myproxy-server.config comes with myproxy-server")
    text = DEBIAN_SAMPLE.read_text()
    samples: dict[str, str] = {}
    for block in text.split("# Complete Sample Policy #")[1:]:
        number = block.split(" ", 1)[0]
        lines: list[str] = []
        for line in block.splitlines():
            if not line:
                break  # a sample ends at the first empty line
            if re.match(r"#[a-z_]+\s", line):
                lines.append(line[1:])
        samples[number] = "\n".join(lines) + "\n"
    # and every directive the file shows anywhere, one per line, as a third "sample"
    samples["all"] = (
        "\n".join(line[1:] for line in text.splitlines() if re.match(r"#[a-z_]+\s+\S", line)) + "\n"
    )
    return samples


def test_import_debian_sample_1_expresses_everything(tmp_path: Path) -> None:
    config = tmp_path / "myproxy-server.config"
    config.write_text(_debian_samples()["1"])
    code, out, err = run("import-myproxy-config", str(config), "--dir", str(tmp_path / "p"))
    assert code == 0, err
    assert "note: cert_dir" in out  # trust roots come from the broker's ca_dir
    # the result passes `broker policy check`, unsafe-rule check included
    code, out, err = run("check", str(tmp_path / "p"))
    assert code == 0, err
    text = (tmp_path / "p" / "50-myproxy.toml").read_text()
    assert 'action = ["retrieve-key"]' in text and "owner_list_required = true" in text
    # no allow_self_authorization: the owner is refused as its own renewer, in MyProxy's words
    assert 'name = "self-authz not allowed for renewer"' in text


def test_import_debian_sample_2_lists_what_it_cannot_express(tmp_path: Path) -> None:
    config = tmp_path / "ca.config"
    config.write_text(_debian_samples()["2"])
    code, _, err = run("import-myproxy-config", str(config), "--dir", str(tmp_path / "p"))
    assert code == 1
    # the online-CA directives are named with their line numbers
    assert f"{config}:2: not imported: pam" in err, err
    assert "certificate_issuer_cert" in err and "certificate_issuer_key" in err
    # what it could express is written (and checks)
    assert run("check", str(tmp_path / "p"))[0] == 0


def test_import_every_debian_sample_is_handled(tmp_path: Path) -> None:
    for number, text in _debian_samples().items():
        config = tmp_path / f"sample{number}.config"
        config.write_text(text)
        target = tmp_path / f"p{number}"
        code, _, err = run("import-myproxy-config", str(config), "--dir", str(target))
        assert code in (0, 1), err
        assert "Traceback" not in err
        assert run("check", str(target))[0] == 0, (number, (target / "50-myproxy.toml").read_text())


def test_import_refuses_unsupported_defaults_and_keeps_existing_files(tmp_path: Path) -> None:
    config = tmp_path / "c.config"
    config.write_text('authorized_renewers "*"\ndefault_renewers "/CN=robot"\n')
    code, _, err = run("import-myproxy-config", str(config), "--dir", str(tmp_path / "p"))
    assert code == 1 and f"{config}:2: not imported: default_renewers" in err
    code, _, err = run("import-myproxy-config", str(config), "--dir", str(tmp_path / "p"))
    assert code == 1 and "already exists" in err
    code, _, err = run(
        "import-myproxy-config", str(tmp_path / "missing"), "--dir", str(tmp_path / "q")
    )
    assert code == 1 and "cannot read" in err


def test_import_allow_self_authorization(tmp_path: Path) -> None:
    config = tmp_path / "c.config"
    config.write_text(
        'authorized_renewers "*"\ndefault_renewers "none"\nallow_self_authorization true\n'
    )
    code, _, err = run("import-myproxy-config", str(config), "--dir", str(tmp_path / "p"))
    assert code == 0, err
    text = (tmp_path / "p" / "50-myproxy.toml").read_text()
    assert "self-authz not allowed" not in text and 'requester = ["self"]' in text


def test_import_max_proxy_lifetime_caps_issuing_rules(tmp_path: Path) -> None:
    config = tmp_path / "c.config"
    config.write_text('authorized_retrievers "*"\nauthorized_renewers "*"\nmax_proxy_lifetime 12\n')
    code, _, err = run("import-myproxy-config", str(config), "--dir", str(tmp_path / "p"))
    assert code == 0, err
    text = (tmp_path / "p" / "50-myproxy.toml").read_text()
    assert text.count('max_lifetime = "12h"') == 2


def test_explain_key_retrieval_with_owner_list(tmp_path: Path) -> None:
    config = tmp_path / "c.config"
    config.write_text('authorized_key_retrievers "*"\ndefault_key_retrievers "none"\n')
    assert run("import-myproxy-config", str(config), "--dir", str(tmp_path / "p"))[0] == 0
    base = [
        "explain",
        "--dir",
        str(tmp_path / "p"),
        "--action",
        "retrieve-key",
        "--owner",
        BOB,
        "--requester",
        PILOT,
        "--auth",
        "passphrase",
    ]
    code, out, _ = run(*base)
    assert code == 3 and "owner_list_required" in out
    code, out, _ = run(*base, "--key-retrievers", PILOT)
    assert code == 0, out
