"""``payload-wrapper``: the command-line edge over :func:`payload_wrapper.api.run_payload`.

    payload-wrapper --proxy FILE [--config wrapper.toml] [--account NAME |
        --gridmapfile F [--gridmapdir D]] [--mode setuid|sudo|none] [--umask 0022]
        [--workdir DIR] [--job-id ID] [--keep-env NAME]... [--set-env NAME=VALUE]...
        [--ca-dir D] [--vomsdir D] [--ban DN|FQAN]... [--ban-file F]
        [--lease-expiry S] [--payload-timeout S] [--audit-log F] [--pilot-account NAME]
        -- COMMAND [ARGS...]

``payload-wrapper helper ...`` is the sudo-mode helper (see :mod:`payload_wrapper.switch`).
Argument errors exit 201, like every other client error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from broker.errors import BrokerError
from payload_wrapper.api import run_payload, say
from payload_wrapper.config import MODES, load_config_file, merge_settings
from payload_wrapper.errors import EXIT_CLIENT, exit_code_for
from payload_wrapper.switch import helper_main

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        say(f"{message}; see payload-wrapper --help")
        raise SystemExit(EXIT_CLIENT)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="payload-wrapper",
        description="Run a grid payload under the local account its proxy maps to.",
        epilog="Exit codes: the payload's own; 201 client error, 202 system error, "
        "203 authorization denied, 204 the payload itself exited 201-204, "
        "124 payload time limit, 126/127 the command could not be executed.",
    )
    add = p.add_argument
    add("--proxy", required=True, metavar="FILE", help="the job owner's proxy (0600, yours)")
    add("--config", metavar="FILE", help="TOML settings; flags override them")
    add("--account", metavar="NAME", help="run every payload as this fixed account")
    add("--gridmapfile", metavar="FILE", help='"DN" account / "DN" .pool / "/vo/Role=x" .pool')
    add("--gridmapdir", metavar="DIR", help="pool-account leases (gLExec layout)")
    add("--mode", choices=MODES, help="setuid (root), sudo (unprivileged pilot) or none")
    add("--umask", metavar="OCTAL", help="umask for the payload (default 0022; never 0000)")
    add("--workdir", metavar="DIR", help="where the job directory is created (default: cwd)")
    add("--job-id", metavar="ID", help="names the job directory job-ID (letters, digits, ._@+-)")
    add("--keep-env", action="append", metavar="NAME", help="copy this variable from the caller")
    add("--set-env", action="append", metavar="NAME=VALUE", help="set this variable")
    add("--ca-dir", metavar="DIR", help="CA directory (default X509_CERT_DIR, then /etc/...)")
    add("--vomsdir", metavar="DIR", help="vomsdir (default X509_VOMS_DIR, then /etc/...)")
    add("--ban", action="append", metavar="DN|FQAN", help="deny this DN or FQAN")
    add("--ban-file", metavar="FILE", help="a file of banned DNs/FQANs, one per line")
    add("--lease-expiry", type=float, metavar="S", help="release pool leases unused for S s")
    add("--payload-timeout", type=float, metavar="S", help="kill the payload after S s")
    add("--audit-log", metavar="FILE", help="append one JSON line per job here")
    add(
        "--pilot-account",
        metavar="NAME",
        help="gets read access to outputs (default: the workdir's owner)",
    )
    add("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    return p


def _flag_values(ns: argparse.Namespace) -> dict[str, object]:
    return {
        "account": ns.account,
        "gridmapfile": ns.gridmapfile,
        "gridmapdir": ns.gridmapdir,
        "mode": ns.mode,
        "umask": ns.umask,
        "workdir": ns.workdir,
        "keep_env": ns.keep_env,
        "set_env": ns.set_env,
        "ca_dir": ns.ca_dir,
        "vomsdir": ns.vomsdir,
        "ban": ns.ban,
        "ban_file": ns.ban_file,
        "lease_expiry": ns.lease_expiry,
        "payload_timeout": ns.payload_timeout,
        "audit_log": ns.audit_log,
        "pilot_account": ns.pilot_account,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["helper"]:
        return helper_main(args[1:])
    ns = build_parser().parse_args(args)
    command = list(ns.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        say("no payload command was given; put it after --, e.g. payload-wrapper ... -- ./run.sh")
        return EXIT_CLIENT
    try:
        file_values = load_config_file(ns.config) if ns.config else None
        settings = merge_settings(file_values, _flag_values(ns))
    except BrokerError as exc:
        say(f"the payload was not started: {exc.message}")
        return exit_code_for(exc)
    return run_payload(settings, ns.proxy, command, job_id=ns.job_id)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
