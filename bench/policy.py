#!/usr/bin/env python3
"""Benchmark policy evaluation on synthetic rule sets of 1e2, 1e3 and 1e4 rules.

Run from the repository root (with or without the venv active):

    scripts/bench policy [--iterations N] [--json]

The rule mix imitates a large site: per-user DN globs, VO/role rules, exact
DNs, group rules, a few regexes and deny rules, spread over several files and
actions. Each request is timed on its own with time.perf_counter_ns, in a
bounded loop, and the table shows median and p99 per rule-set size.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from broker.policy import Action, AuthMethod, PolicySet, Request, evaluate, load_policy

SIZES = (100, 1_000, 10_000)
VOS = 50
ACTIONS = ("retrieve", "renew", "info", "delegate", "destroy")


def build_files(size: int, rng: random.Random) -> dict[str, str]:
    """Synthetic policy text: ~size rules over ten files, plus one groups file."""
    groups = ["[groups]\n"]
    for vo in range(VOS):
        groups.append(f'vo{vo}-robots = ["/DC=org/DC=example/OU=Robots/CN=vo{vo}-pilot*"]\n')
    files = {"policies/00-groups.toml": "".join(groups)}
    chunks: list[list[str]] = [[] for _ in range(10)]
    for i in range(size):
        kind = rng.random()
        vo = i % VOS
        action = ACTIONS[i % len(ACTIONS)]
        effect = "allow"
        extra = ""
        if kind < 0.60:
            requester = f'"/DC=org/DC=example/OU=Users{vo}/CN=user{i}*"'
            extra = f'owner = ["fqan:/vo{vo}"]\n'
        elif kind < 0.75:
            requester = f'"fqan:/vo{vo}/Role=pilot{i % 7}"'
        elif kind < 0.85:
            requester = f'"/DC=org/DC=example/OU=Users{vo}/CN=exact{i}"'
        elif kind < 0.93:
            requester = f'"group:vo{vo}-robots"'
            extra = f'credential = ["job-{i}-*"]\n'
        elif kind < 0.94:
            requester = f'"re:/DC=org/DC=example/OU=Svc{i}/CN=[a-z]+"'
        else:
            requester = f'"/DC=org/DC=example/OU=Users{vo}/CN=banned{i}*"'
            effect = "deny"
        if effect == "allow" and action in ("retrieve", "renew") and i % 3 == 0:
            extra += 'max_lifetime = "12h"\n'
        chunks[i % 10].append(
            f'[[rule]]\nname = "rule {i}"\naction = "{action}"\neffect = "{effect}"\n'
            f"requester = [{requester}]\n{extra}\n"
        )
    for n, chunk in enumerate(chunks):
        files[f"policies/{10 + n}-rules.toml"] = "".join(chunk)
    return files


def build_requests(size: int, rng: random.Random, count: int = 256) -> list[Request]:
    requests = []
    for _ in range(count):
        i = rng.randrange(size)
        vo = i % VOS
        dn = rng.choice(
            [
                f"/DC=org/DC=example/OU=Users{vo}/CN=user{i}/CN=proxy",
                f"/DC=org/DC=example/OU=Users{vo}/CN=exact{i}",
                f"/DC=org/DC=example/OU=Robots/CN=vo{vo}-pilot{i}",
                f"/DC=org/DC=example/OU=Nobody/CN=stranger{i}",
            ]
        )
        requests.append(
            Request(
                action=Action(rng.choice(ACTIONS)),
                requester_dn=dn,
                owner_dn=f"/DC=org/DC=example/OU=Users{vo}/CN=owner{i}",
                requester_fqans=(f"/vo{vo}/sub/Role=pilot{i % 7}/Capability=NULL",),
                owner_fqans=(f"/vo{vo}/Role=NULL/Capability=NULL",),
                auth=AuthMethod.CERTIFICATE,
                credential=f"job-{i}-x",
                job_id=str(i),
            )
        )
    return requests


def percentile(sorted_ns: list[int], fraction: float) -> int:
    index = min(len(sorted_ns) - 1, round(fraction * (len(sorted_ns) - 1)))
    return sorted_ns[index]


def bench(size: int, iterations: int, seed: int) -> dict[str, float | int]:
    rng = random.Random(seed + size)  # noqa: S311 - reproducible synthetic data, not secrets
    files = build_files(size, rng)
    start = time.perf_counter_ns()
    policy_set: PolicySet = load_policy(files)
    load_ms = (time.perf_counter_ns() - start) / 1e6
    requests = build_requests(size, rng)
    for request in requests:  # warm caches and the regex engine
        evaluate(policy_set, request)
    timings: list[int] = []
    allowed = 0
    for n in range(iterations):  # bounded: exactly `iterations` timed calls
        request = requests[n % len(requests)]
        t0 = time.perf_counter_ns()
        decision = evaluate(policy_set, request)
        timings.append(time.perf_counter_ns() - t0)
        allowed += decision.allowed
    timings.sort()
    return {
        "rules": len(policy_set.rules),
        "load_ms": round(load_ms, 1),
        "median_us": round(statistics.median(timings) / 1e3, 1),
        "p99_us": round(percentile(timings, 0.99) / 1e3, 1),
        "max_us": round(timings[-1] / 1e3, 1),
        "allowed_fraction": round(allowed / iterations, 3),
        "iterations": iterations,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=20_000, help="timed calls per size")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.iterations < 1:
        parser.error("--iterations must be at least 1")
    results = [bench(size, args.iterations, args.seed) for size in SIZES]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(
        f"{'rules':>7} {'load ms':>9} {'median µs':>10} {'p99 µs':>8} {'max µs':>8} {'allowed':>8}"
    )
    for row in results:
        print(
            f"{row['rules']:>7} {row['load_ms']:>9} {row['median_us']:>10} {row['p99_us']:>8} "
            f"{row['max_us']:>8} {row['allowed_fraction']:>8}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
