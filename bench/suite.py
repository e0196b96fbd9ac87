#!/usr/bin/env python3
"""The whole benchmark suite: every part, one summary, one table, one plot.

Run it through the entry script (it picks the venv's python)::

    scripts/bench all                  # everything, about 6 minutes on 2 cores (+ waiting)
    scripts/bench all --quick          # small counts: a smoke test of the suite itself
    scripts/bench all --only store,policy
    scripts/bench all --help

Parts, in this order, each a script of its own run as a child process with
fixed, documented options (see PARTS below) so that one run gives every figure:

    retrieval  bench/retrieval.py  REST over mutual TLS, 1/4/16/64 clients,
                                           openssl speed + in-process crypto costs
    myproxy    bench/myproxy.py    our MyProxy endpoint and the real
                                           myproxy-server, same load generator
    policy     bench/policy.py     1e2 / 1e3 / 1e4 rules
    wrapper    bench/wrapper.py    payload-wrapper vs bare exec
    pilot      bench/pilot.py      broker-pilot job start
    store      bench/store.py      1e2 / 1e4 / 1e5 credentials, SQLite and PostgreSQL
    scaleout   bench/scaleout.py   two brokers on one PostgreSQL vs one
    tls        bench/tls.py        bare mutual-TLS handshakes: the floor under
                                           every retrieval figure

Each part's JSON goes to bench-out/<part>.json (the wrapper and pilot scripts
print tables only; their tables are parsed), its output to
bench-out/logs/<part>.log. The suite then writes bench-out/summary.json, prints
one table (target / measured / met?) and draws bench-out/bench.png.

Before it starts, the suite waits (up to --max-wait seconds, checking every
30 s) until the 1-minute load average is below --max-load, because the
machine this was written on is shared; the load at the start and end of every
part is recorded. A part that fails is reported and the others still run; the
exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

OUT = REPO / "bench-out"
PY = sys.executable

# name -> (script, arguments of the complete run, arguments of --quick, timeout s)
PARTS: dict[str, tuple[str, list[str], list[str], int]] = {
    "retrieval": (
        "bench.retrieval",
        ["--full", "--csr-keys", "ec", "--requests", "600", "--max-seconds", "20"],
        ["--levels", "1,16", "--csr-keys", "ec", "--requests", "60", "--no-openssl-speed"],
        600,
    ),
    "myproxy": (
        "bench.myproxy",
        # --processes 2: the endpoint as `broker serve` runs it with its default
        # 2 workers (bench/myproxy.py alone starts one process)
        [
            "--clients",
            "1,4,16,64",
            "--modes",
            "pilot",
            "--seconds",
            "8",
            "--ours-args=--processes 2",
        ],
        ["--clients", "1,16", "--modes", "pilot", "--seconds", "2", "--ours-args=--processes 2"],
        900,
    ),
    "policy": (
        "bench.policy",
        ["--iterations", "20000", "--json"],
        ["--iterations", "2000", "--json"],
        600,
    ),
    "wrapper": ("bench.wrapper", ["--runs", "30"], ["--runs", "5"], 600),
    "pilot": ("bench.pilot", ["--runs", "30"], ["--runs", "3"], 900),
    "store": (
        "bench.store",
        ["--requests", "400"],
        ["--sizes", "100,2000", "--requests", "60", "--lookups", "300"],
        1500,
    ),
    "scaleout": ("bench.scaleout", [], ["--levels", "16", "--requests", "150"], 900),
    "tls": ("bench.tls", ["--handshakes", "600"], ["--handshakes", "50"], 300),
}


# ---------------------------------------------------------------- running parts


def wait_for_quiet(max_load: float, max_wait: float) -> dict[str, Any]:
    waited = 0.0
    first = os.getloadavg()
    while os.getloadavg()[0] > max_load and waited < max_wait:
        print(
            f"bench_suite: load average {os.getloadavg()[0]:.2f} > {max_load}; waiting "
            f"({waited:.0f}/{max_wait:.0f} s)",
            file=sys.stderr,
        )
        step = min(30.0, max_wait - waited)
        time.sleep(step)
        waited += step
    return {"loadavg_first_seen": first, "waited_s": waited, "loadavg_at_start": os.getloadavg()}


def run_part(name: str, quick: bool) -> dict[str, Any]:
    script, full_args, quick_args, timeout = PARTS[name]
    argv = [PY, "-m", script, *(quick_args if quick else full_args)]
    json_path = OUT / f"{name}.json"
    if name == "retrieval":
        argv += ["--out", str(json_path)]
    elif name in ("myproxy", "tls"):
        argv += ["--json", str(json_path)]
    elif name in ("store", "scaleout"):
        argv += ["--out", str(json_path)]
    log = OUT / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"\n==== {name}: {' '.join(a.replace(str(REPO) + '/', '') for a in argv[1:])}",
        file=sys.stderr,
    )
    info: dict[str, Any] = {
        "argv": argv[1:],
        "log": str(log),
        "loadavg_before": os.getloadavg(),
    }
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        # SIGTERM first: the parts stop their own servers on it (by PID); then SIGKILL.
        proc.terminate()
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        rc = -1
        stderr += f"\nbench_suite: timed out after {timeout} s"
    except BaseException:
        proc.terminate()
        proc.wait(timeout=60)
        raise
    info["seconds"] = round(time.monotonic() - t0, 1)
    info["loadavg_after"] = os.getloadavg()
    info["returncode"] = rc
    log.write_text(f"$ {' '.join(argv)}\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    print(stdout.rstrip()[-3000:], file=sys.stderr)
    if rc != 0:
        print(f"bench_suite: {name} failed (exit {rc}); see {log}", file=sys.stderr)
    try:
        if name == "policy":
            data: Any = json.loads(stdout)
            json_path.write_text(json.dumps(data, indent=2) + "\n")
        elif name == "wrapper":
            data = parse_wrapper(stdout)
            json_path.write_text(json.dumps(data, indent=2) + "\n")
        elif name == "pilot":
            data = parse_pilot(stdout)
            json_path.write_text(json.dumps(data, indent=2) + "\n")
        else:
            data = json.loads(json_path.read_text()) if rc == 0 else None
    except (OSError, ValueError) as exc:
        data = None
        info["parse_error"] = str(exc)
    info["data"] = data
    info["ok"] = rc == 0 and data is not None
    return info


_ROW = re.compile(
    r"^(?P<label>.*?\S)\s+(?P<a>[\d.]+)\s+(?P<b>[\d.]+)\s+(?P<c>[\d.]+)"
    r"(?:\s+(?P<d>[\d.]+))?\s*$"
)


def _wrapper_floor_note(wrapper: dict[str, Any]) -> str:
    """How much of the command's time a Python start with cryptography costs by itself."""
    floor = {r["command"]: r["median_ms"] for r in wrapper.get("rows", [])}
    crypto = floor.get("floor: + import cryptography.x509")
    if crypto is None:
        return "interpreter start + imports included"
    return (
        f"interpreter start + imports included; python + import cryptography.x509 "
        f"alone: {crypto:.0f} ms"
    )


def parse_wrapper(text: str) -> dict[str, Any]:
    """bench/wrapper.py's table: command, runs, median, min, max; and its overhead lines."""
    rows = []
    for line in text.splitlines():
        m = _ROW.match(line)
        if m and m["d"] is not None:
            rows.append(
                {
                    "command": m["label"],
                    "runs": int(float(m["a"])),
                    "median_ms": float(m["b"]),
                    "min_ms": float(m["c"]),
                    "max_ms": float(m["d"]),
                }
            )
    out: dict[str, Any] = {"rows": rows}
    m1 = re.search(r"^median overhead: ([\d.-]+) ms", text, re.M)
    m2 = re.search(r"^median overhead in-process.*?: ([\d.-]+) ms", text, re.M)
    if m1 is None or m2 is None:
        raise ValueError("bench_wrapper output without its overhead lines")
    out["overhead_ms"] = float(m1.group(1))
    out["in_process_overhead_ms"] = float(m2.group(1))
    return out


def parse_pilot(text: str) -> dict[str, Any]:
    """bench/pilot.py's table: measurement, median, p99, min."""
    rows = []
    for line in text.splitlines():
        m = _ROW.match(line)
        if m and m["d"] is None and not line.startswith("broker-pilot"):
            rows.append(
                {
                    "measurement": m["label"].strip(),
                    "median_ms": float(m["a"]),
                    "p99_ms": float(m["b"]),
                    "min_ms": float(m["c"]),
                }
            )
    if not rows:
        raise ValueError("bench_pilot output without its table")
    return {"rows": rows}


# ---------------------------------------------------------------- targets


def _row(parts: dict[str, Any], name: str) -> Any:
    part = parts.get(name)
    return part["data"] if part and part.get("data") is not None else None


def _sci(n: int) -> str:
    """1e5 for powers of ten, the plain number otherwise."""
    text = str(n)
    return f"1e{len(text) - 1}" if text.startswith("1") and set(text[1:]) <= {"0"} else text


def _fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


def targets(parts: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(what: str, target: str, measured: str, met: bool | None, note: str = "") -> None:
        rows.append(
            {"what": what, "target": target, "measured": measured, "met": met, "note": note}
        )

    retr, mp, pol = _row(parts, "retrieval"), _row(parts, "myproxy"), _row(parts, "policy")
    rest16 = next((lv for lv in (retr or {}).get("levels", []) if lv["concurrency"] == 16), None)
    cells = {c["clients"]: c for c in (mp or {}).get("cells", []) if c["mode"] == "pilot"}
    mp16 = cells.get(16)

    # 1. throughput against the real myproxy-server
    if mp16:
        ratios = {c: cell["ratio"] for c, cell in sorted(cells.items())}
        add(
            "MyProxy endpoint vs myproxy-server, 16 clients (same load generator)",
            ">= 5x",
            f"{mp16['ratio']:.1f}x ({mp16['broker']['per_s']:.0f} vs "
            f"{mp16['myproxy_server']['per_s']:.0f}/s)",
            mp16["ratio"] >= 5,
            "all levels: " + ", ".join(f"{c}: {r:.1f}x" for c, r in ratios.items()),
        )
    else:
        add("MyProxy endpoint vs myproxy-server, 16 clients", ">= 5x", "n/a", None)
    if rest16 and mp16 and mp16["myproxy_server"]["per_s"]:
        r = rest16["per_s"] / mp16["myproxy_server"]["per_s"]
        add(
            "REST /v1/retrievals vs myproxy-server, 16 clients",
            ">= 5x",
            f"{r:.1f}x ({rest16['per_s']:.0f} vs {mp16['myproxy_server']['per_s']:.0f}/s)",
            r >= 5,
            "REST uses bench_retrieval's HTTP load generator",
        )
    # 2. tail latency at 16 clients
    if rest16:
        add(
            "REST p99 latency, 16 clients",
            "<= 50 ms",
            _fmt(rest16["p99_ms"], " ms"),
            rest16["p99_ms"] <= 50,
            f"p50 {rest16['p50_ms']} ms, {rest16['per_s']}/s",
        )
    if mp16:
        add(
            "MyProxy endpoint p99 latency, 16 clients",
            "<= 50 ms",
            _fmt(mp16["broker"]["p99_ms"], " ms"),
            mp16["broker"]["p99_ms"] <= 50,
            f"p50 {mp16['broker']['p50_ms']} ms",
        )
    # 3. store scaling
    store = _row(parts, "store")
    for r in (store or {}).get("ratios", []):
        if r["concurrency"] != 1:
            continue
        add(
            f"store {r['backend']}: p50 at {_sci(r['large'])} / at {_sci(r['small'])} credentials",
            "<= 1.2x",
            f"{r['p50_ratio']:.2f}x",
            r["p50_ratio"] <= 1.2,
            f"1 client; p99 ratio {r['p99_ratio']}, in-process look-up ratio "
            f"{r['lookup_p50_ratio']}",
        )
    if store is None:
        add("store: p50 at 1e5 / at 1e2 credentials", "<= 1.2x", "n/a", None)
    # 4. policy
    big = max(pol or [], key=lambda x: x["rules"], default=None)
    if big:
        add(
            f"policy evaluation, {big['rules']} rules (p99)",
            "<= 1 ms",
            f"{big['p99_us'] / 1000:.3f} ms",
            big["p99_us"] <= 1000,
            f"median {big['median_us'] / 1000:.3f} ms, max {big['max_us'] / 1000:.2f} ms",
        )
    else:
        add("policy evaluation, 1e4 rules", "<= 1 ms", "n/a", None)
    # 5. wrapper
    wr = _row(parts, "wrapper")
    if wr:
        add(
            "payload-wrapper command vs bare exec (median)",
            "<= 30 ms",
            f"{wr['overhead_ms']:.1f} ms",
            wr["overhead_ms"] <= 30,
            _wrapper_floor_note(wr),
        )
        add(
            "payload-wrapper in-process (api.run_payload, as broker-pilot uses it)",
            "<= 30 ms",
            f"{wr['in_process_overhead_ms']:.1f} ms",
            wr["in_process_overhead_ms"] <= 30,
        )
    else:
        add("payload-wrapper vs bare exec", "<= 30 ms", "n/a", None)
    # 6. pilot (bench/pilot.py's own target) and the whole command, for information
    pi = _row(parts, "pilot")
    if pi:
        ec = next(
            (r for r in pi["rows"] if r["measurement"].startswith("in-process start, EC")), None
        )
        cmd = next((r for r in pi["rows"] if "broker-pilot /bin/true" in r["measurement"]), None)
        if ec:
            add(
                "broker-pilot job start, in-process, EC keys (median)",
                "<= 50 ms",
                f"{ec['median_ms']:.1f} ms",
                ec["median_ms"] <= 50,
                "target of bench/pilot.py, not of the issue",
            )
        if cmd:
            add(
                "broker-pilot /bin/true, whole command (median)",
                "-",
                f"{cmd['median_ms']:.1f} ms",
                None,
                "for information",
            )
    # 7. scale-out
    so = _row(parts, "scaleout")
    for lv in (so or {}).get("levels", []):
        add(
            f"two brokers / one broker on one PostgreSQL, {lv['concurrency']} clients",
            "-",
            f"{lv['ratio']:.2f}x ({lv['two']['per_s']:.0f} vs {lv['one']['per_s']:.0f}/s)",
            None,
            f"errors {lv['one']['errors'] + lv['two']['errors']}; 2 cores",
        )
    # 8. server CPU per retrieval next to the crypto
    speed = (retr or {}).get("openssl_speed", {})
    if rest16 and "rsa2048_sign_per_s" in speed:
        note = (
            f"openssl speed: rsa2048 sign {1000 / speed['rsa2048_sign_per_s']:.3f} ms, "
            f"ecdsap256 sign {1000 / speed['ecdsap256_sign_per_s']:.3f} ms"
        )
        if mp16 and mp16["broker"].get("server_cpu_ms_per_op") is not None:
            note += (
                f"; MyProxy endpoint {mp16['broker']['server_cpu_ms_per_op']} ms, "
                f"myproxy-server {mp16['myproxy_server']['server_cpu_ms_per_op']} ms"
            )
        add(
            "server CPU per REST retrieval, 16 clients",
            "-",
            f"{rest16['server_cpu_ms_per_op']:.2f} ms",
            None,
            note,
        )
    # 9. the TLS floor under every retrieval figure (bare handshakes, no application work)
    tls = _row(parts, "tls")
    for stack in (tls or {}).get("rows", []):
        add(
            f"bare mutual-TLS handshake, {stack['stack']} ({stack['openssl'].split(' ')[1]})",
            "-",
            f"{stack['server_cpu_ms']:.2f} + {stack['client_cpu_ms']:.2f} ms",
            None,
            "server + client CPU per handshake, no request; the floor under each retrieval",
        )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    w = max(len(r["what"]) for r in rows)
    head = f"{'benchmark':<{w}}  {'target':>8}  {'measured':<28}  met?"
    print(head)
    print("-" * (len(head) + 4))
    for r in rows:
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        print(f"{r['what']:<{w}}  {r['target']:>8}  {r['measured']:<28}  {met}")
        if r["note"]:
            print(f"{'':<{w}}  {'':>8}  ({r['note']})")


# ---------------------------------------------------------------- plot


# one curve of the retrieval panels: label, client counts, and the measured level per count
_Series = tuple[str, list[int], list[dict[str, Any]]]


def _plot_series(ax: Any, series: list[_Series], key: str) -> None:
    """One line per server (those that were measured) of ``key`` over the client counts."""
    for label, xs, ys in series:
        if xs:
            ax.plot(xs, [y[key] for y in ys], marker="o", label=label)


def _target_line(ax: Any, y: float, label: str) -> None:
    ax.axhline(y, color="red", ls="--", lw=1, label=label)


def _log_panel(ax: Any, xlabel: str, ylabel: str, title: str, *, logy: bool = True) -> None:
    """Labels, a logarithmic x axis (and y axis unless ``logy`` is False), a legend."""
    scales = {"xscale": "log", **({"yscale": "log"} if logy else {})}
    ax.set(**scales, xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)


def plot(parts: dict[str, Any], rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(17, 14))
    fig.suptitle(title, fontsize=11)
    retr, mp = _row(parts, "retrieval"), _row(parts, "myproxy")
    rest = sorted((lv for lv in (retr or {}).get("levels", [])), key=lambda x: x["concurrency"])
    cells = sorted(
        (c for c in (mp or {}).get("cells", []) if c["mode"] == "pilot"), key=lambda c: c["clients"]
    )
    series: list[_Series] = [
        ("REST (broker)", [lv["concurrency"] for lv in rest], rest),
        ("MyProxy endpoint (broker)", [c["clients"] for c in cells], [c["broker"] for c in cells]),
        (
            "myproxy-server 6.2",
            [c["clients"] for c in cells],
            [c["myproxy_server"] for c in cells],
        ),
    ]

    ax = axes[0][0]
    _plot_series(ax, series, "per_s")
    _log_panel(ax, "concurrent clients", "retrievals/s", "Retrieval throughput", logy=False)
    ax = axes[0][1]
    _plot_series(ax, series, "p99_ms")
    _target_line(ax, 50, "target p99 50 ms @16")
    _log_panel(ax, "concurrent clients", "p99 ms", "Retrieval p99 latency")

    ax = axes[0][2]
    labels, values = [], []
    rest16 = next((lv for lv in rest if lv["concurrency"] == 16), None)
    if rest16:
        labels.append("REST\n(16 cl.)")
        values.append(rest16["server_cpu_ms_per_op"])
    c16 = next((c for c in cells if c["clients"] == 16), None)
    if c16 and c16["broker"].get("server_cpu_ms_per_op") is not None:
        labels += ["MyProxy ep.\n(16 cl.)", "myproxy-\nserver (16)"]
        values += [
            c16["broker"]["server_cpu_ms_per_op"],
            c16["myproxy_server"]["server_cpu_ms_per_op"],
        ]
    speed = (retr or {}).get("openssl_speed", {})
    if "rsa2048_sign_per_s" in speed:
        labels += ["openssl\nRSA-2048 sign", "openssl\nP-256 sign"]
        values += [1000 / speed["rsa2048_sign_per_s"], 1000 / speed["ecdsap256_sign_per_s"]]
    if labels:
        bars = ax.bar(labels, values, color=["C0", "C1", "C2", "grey", "silver"][: len(labels)])
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set(ylabel="CPU ms per retrieval / per signature", title="Server CPU vs pure crypto")
    ax.tick_params(axis="x", labelsize=8)

    ax = axes[1][0]
    store = _row(parts, "store")
    for backend, color in (("sqlite", "C0"), ("postgresql", "C3")):
        runs = [r for r in (store or {}).get("runs", []) if r["backend"] == backend]
        for conc, ls in ((1, "-"), (16, ":")):
            pts = [
                (r["credentials"], lv["p50_ms"])
                for r in runs
                for lv in r["levels"]
                if lv["concurrency"] == conc
            ]
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    marker="o",
                    ls=ls,
                    color=color,
                    label=f"{backend}, {conc} client(s), p50",
                )
    _log_panel(ax, "stored credentials", "ms", "Store scaling: REST retrieval p50")

    ax = axes[1][1]
    for backend, color in (("sqlite", "C0"), ("postgresql", "C3")):
        runs = [r for r in (store or {}).get("runs", []) if r["backend"] == backend]
        if runs:
            ax.plot(
                [r["credentials"] for r in runs],
                [r["lookup"]["p50_us"] for r in runs],
                marker="o",
                color=color,
                label=f"{backend} get_credential p50",
            )
    ax.set_ylim(bottom=0)
    _log_panel(ax, "stored credentials", "µs", "Store scaling: in-process look-up", logy=False)

    ax = axes[1][2]
    pol = _row(parts, "policy") or []
    if pol:
        xs = [p["rules"] for p in pol]
        ax.plot(xs, [p["median_us"] for p in pol], marker="o", label="median")
        ax.plot(xs, [p["p99_us"] for p in pol], marker="o", label="p99")
    _target_line(ax, 1000, "target 1 ms")
    _log_panel(ax, "rules", "µs per evaluation", "Policy evaluation")

    ax = axes[2][0]
    so = _row(parts, "scaleout")
    lvls = (so or {}).get("levels", [])
    if lvls:
        xs = list(range(len(lvls)))
        ax.bar([x - 0.2 for x in xs], [lv["one"]["per_s"] for lv in lvls], 0.4, label="1 broker")
        ax.bar([x + 0.2 for x in xs], [lv["two"]["per_s"] for lv in lvls], 0.4, label="2 brokers")
        ax.set_xticks(
            list(xs), [f"{lv['concurrency']} clients\nratio {lv['ratio']}" for lv in lvls]
        )
    ax.set(ylabel="retrievals/s", title="Scale-out on one PostgreSQL")
    ax.legend(fontsize=8)

    ax = axes[2][1]
    labels, values = [], []
    wr, pi = _row(parts, "wrapper"), _row(parts, "pilot")
    if wr:
        labels += ["wrapper\ncommand", "wrapper\nin-process"]
        values += [wr["overhead_ms"], wr["in_process_overhead_ms"]]
    if pi:
        for r in pi["rows"]:
            if r["measurement"].startswith("in-process start, EC"):
                labels.append("pilot start\nin-process EC")
                values.append(r["median_ms"])
            if "broker-pilot /bin/true" in r["measurement"]:
                labels.append("broker-pilot\ncommand")
                values.append(r["median_ms"])
    if labels:
        bars = ax.bar(labels, values)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    _target_line(ax, 30, "wrapper target 30 ms")
    ax.set(ylabel="median ms", title="Wrapper overhead and job start")
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=8)

    ax = axes[2][2]
    ax.axis("off")
    text = "\n".join(
        f"{ {True: 'met ', False: 'MISS', None: '    '}[r['met']] }  {r['what'][:52]}: "
        f"{r['measured'][:24]}"
        for r in rows
    )
    ax.text(0, 1, text, va="top", family="monospace", fontsize=6.5)
    ax.set_title("Targets")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    global OUT
    p = argparse.ArgumentParser(
        prog="scripts/bench all",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small counts (smoke test)")
    p.add_argument("--only", help="comma-separated parts to run [all]")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out")
    p.add_argument(
        "--max-load",
        type=float,
        default=1.5,
        help="wait until the 1-min load average is below this [1.5]",
    )
    p.add_argument(
        "--max-wait",
        type=float,
        default=900.0,
        help="give up waiting for a quiet machine after this many s [900]",
    )
    p.add_argument(
        "--from-json",
        action="store_true",
        help="run nothing: rebuild summary, table and plot from bench-out/*.json",
    )
    p.add_argument(
        "--out-dir", default=str(OUT), help="where JSON, logs, summary and plot go [bench-out]"
    )
    args = p.parse_args(argv)
    names = [n for n in (args.only.split(",") if args.only else PARTS) if n]
    unknown = set(names) - set(PARTS) | (set(filter(None, args.skip.split(","))) - set(PARTS))
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    names = [n for n in names if n not in args.skip.split(",")]
    OUT = Path(args.out_dir).resolve()
    OUT.mkdir(parents=True, exist_ok=True)

    from bench.retrieval import machine_info

    summary: dict[str, Any] = {
        "suite": "scripts/bench all",
        "argv": sys.argv[1:],
        "started": datetime.now(UTC).isoformat(),
        "machine": machine_info(),
        "quick": args.quick,
        "parts": {},
    }
    t0 = time.monotonic()
    if args.from_json:
        for name in names:
            path = OUT / f"{name}.json"
            data = json.loads(path.read_text()) if path.exists() else None
            summary["parts"][name] = {"data": data, "ok": data is not None, "from_json": True}
    else:
        summary["load"] = wait_for_quiet(args.max_load, args.max_wait)
        for name in names:
            summary["parts"][name] = run_part(name, args.quick)
    summary["seconds"] = round(time.monotonic() - t0, 1)
    summary["loadavg_end"] = os.getloadavg()
    rows = targets(summary["parts"])
    summary["targets"] = rows
    failed = [n for n, part in summary["parts"].items() if not part["ok"]]
    summary["failed"] = failed
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")

    m = summary["machine"]
    load = summary.get("load", {}).get("loadavg_at_start")
    title = (
        f"scripts/bench all{' --quick' if args.quick else ''} - {m['cpu_model']}, "
        f"{m['nproc']} cores, {m['os']} - {summary['started'][:16]} UTC"
        + (f" - load avg at start {load[0]:.2f}" if load else "")
    )
    print()
    print(title)
    print_table(rows)
    try:
        plot(summary["parts"], rows, OUT / "bench.png", title)
        print(
            f"\nwrote {OUT / 'summary.json'} and {OUT / 'bench.png'} ({summary['seconds']:.0f} s)"
        )
    except ImportError:
        print(
            "matplotlib is not installed in this venv: no plot "
            "(pip install matplotlib, or the project's `bench` extra)",
            file=sys.stderr,
        )
    if failed:
        print(f"failed parts: {', '.join(failed)} (logs in bench-out/logs/)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
