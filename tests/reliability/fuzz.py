"""Bad input: mutation fuzzing plus hypothesis over every parser, and JSON at a live server.

Library parsers may raise only :class:`broker.errors.BrokerError` subclasses;
anything else is a crash. Each input runs under an alarm (a hang is a failure).
The REST part sends random bodies, fields and path segments to every endpoint
of a running broker; no answer may be a 5xx or a non-JSON error.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from broker.errors import BrokerError
from broker.myproxy import codec
from broker.myproxy.codec import AuthMethodId, Command, ResponseCode
from broker.pki import voms
from broker.pki.loading import chain_to_pem, load_certificates
from broker.pki.proxy import csr_to_pem, generate_key, load_csr, make_csr, new_proxy
from broker.policy import check_policy_files, load_policy
from tests.brokerserver import DEV_POLICY, RunningBroker
from tests.pkifixtures import GridPki
from tests.reliability.harness import Outcome, launch

HANG_SECONDS = 10
REPO = Path(__file__).resolve().parents[2]
INTERESTING = [
    b"\x00",
    b"\xff",
    b"\x7f",
    b"\x80",
    b"\x81\x80",
    b"\x84\xff\xff\xff\xff",
    b"\n",
    b"=",
    b"\r\n",
    b"-----BEGIN CERTIFICATE-----\n",
    b"-----END CERTIFICATE-----\n",
    b"VERSION=MYPROXYv2\n",
    b"COMMAND=",
    b"\x30\x80",
    b"\x30\x82\xff\xff",
    b"[[rule]]\n",
    b'"""',
    b"'",
    b"\\u0000",
    b"%n%s",
    "é".encode(),
    b"\xf0\x9f\x92\xa9",
]


class _Hang(BaseException):
    """Raised by the alarm; a BaseException so that no ``except Exception`` swallows it."""


def _on_alarm(signum: int, frame: object) -> None:
    raise _Hang()


# --------------------------------------------------------------------------- seeds


def _seeds(pki: GridPki) -> dict[str, list[bytes]]:
    now = datetime.now(UTC)
    alice = pki.load("alice")
    proxy = new_proxy(alice, now=now, lifetime=timedelta(hours=1), key=generate_key("ec"))
    ders = [c.public_bytes(serialization.Encoding.DER) for c in proxy.chain]
    csr = make_csr(generate_key("ec"))
    ext = voms.make_ac_extension(
        alice.cert,
        pki.pki.voms,
        vo="atlas",
        fqans=["/atlas", "/atlas/Role=pilot"],
        uri=str(pki.manifest["voms_uri"]),
        now=now,
        lifetime=timedelta(hours=1),
    )
    voms_proxy = new_proxy(
        alice, now=now, lifetime=timedelta(hours=1), key=generate_key("ec"), extra_extensions=[ext]
    )
    acs = voms.find_acs(voms_proxy.chain[0])
    policies = [DEV_POLICY.encode()] + [
        p.read_bytes() for p in sorted((REPO / "policies").glob("*.toml"))
    ]
    return {
        "request": [
            codec.format_request(
                c,
                "alice",
                "pass phrase",
                43200,
                [
                    ("CRED_NAME", "x"),
                    ("RETRIEVER", "*/CN=pilot"),
                    ("VONAME", "atlas"),
                    ("TRUSTED_CERTS", "1"),
                ],
            )
            for c in Command
        ],
        "response": [
            codec.ok([("CRED_NAME", "x")]),
            codec.error("denied\nsecond line"),
            codec.challenge([(AuthMethodId.X509_CERTIFICATE_SHA256, "abcd")]),
            codec.format_response(ResponseCode.OK),
        ],
        "chain": [codec.encode_chain(ders), codec.encode_chain(ders[:1])],
        "auth": [codec.format_auth_reply(AuthMethodId.X509_CERTIFICATE_SHA256, b"s" * 256, ders)],
        "pem": [chain_to_pem(proxy.chain), chain_to_pem(voms_proxy.chain)],
        "der": [*ders, voms_proxy.chain[0].public_bytes(serialization.Encoding.DER)],
        "csr": [csr_to_pem(csr), csr.public_bytes(serialization.Encoding.DER)],
        "ac": acs,
        "acext": [ext.value],
        "policy": policies,
    }


# --------------------------------------------------------------------------- mutation


def mutate(data: bytes, rng: random.Random, pool: list[bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 5, 8))):
        op = rng.randrange(10)
        pos = rng.randrange(len(out) + 1)
        if op == 0 and out:  # flip bits
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif op == 1 and out:  # random byte
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif op == 2:  # insert random bytes
            out[pos:pos] = rng.randbytes(rng.choice((1, 2, 4, 16, 100)))
        elif op == 3 and out:  # delete a range
            end = min(len(out), pos + rng.choice((1, 2, 8, 64, 1000)))
            del out[pos:end]
        elif op == 4 and out:  # duplicate a range
            start = rng.randrange(len(out))
            chunk = out[start : start + rng.choice((1, 8, 64, 512))]
            out[pos:pos] = chunk * rng.choice((1, 2, 16))
        elif op == 5:  # truncate
            del out[pos:]
        elif op == 6:  # a token that parsers react to
            out[pos:pos] = rng.choice(INTERESTING)
        elif op == 7 and pool:  # splice with another seed
            other = rng.choice(pool)
            cut = rng.randrange(len(other) + 1)
            out = out[:pos] + bytearray(other[cut:])
        elif op == 8 and len(out) > 2:  # length bytes: set a byte to an edge value
            out[rng.randrange(len(out))] = rng.choice((0, 1, 0x7F, 0x80, 0x81, 0x82, 0xFF))
        elif op == 9:
            out[pos:pos] = bytes(rng.choice((b"\x00", b"\xff", b"A"))) * rng.choice((1, 300))
    return bytes(out)


def _pem_wrap(der: bytes, label: bytes = b"CERTIFICATE") -> bytes:
    body = base64.encodebytes(der)
    return b"-----BEGIN " + label + b"-----\n" + body + b"-----END " + label + b"-----\n"


def _cert_with_extension(value: bytes, key: Any, subject: x509.Name) -> x509.Certificate:
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.UnrecognizedExtension(voms._VOMS_AC_EXT, value), critical=False)
        .sign(key, hashes.SHA256())
    )


class _Checker:
    """Runs one input against one target; counts crashes, hangs and the slowest input."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.by_target: dict[str, int] = {}
        self.slowest = (0.0, "")

    def __call__(self, target: str, fn: Callable[[bytes], object], data: bytes) -> None:
        self.by_target[target] = self.by_target.get(target, 0) + 1
        self.outcome.tried += 1
        started = time.perf_counter()
        signal.alarm(HANG_SECONDS)
        try:
            fn(data)
        except BrokerError:
            pass
        except _Hang:
            self._crash(target, data, f"no answer within {HANG_SECONDS} s (hang)")
        except Exception as exc:
            self._crash(target, data, f"{type(exc).__name__}: {exc}")
        finally:
            signal.alarm(0)
        spent = time.perf_counter() - started
        if spent > self.slowest[0]:
            self.slowest = (spent, target)

    def _crash(self, target: str, data: bytes, why: str) -> None:
        digest = hashlib.sha256(data).hexdigest()[:12]
        self.outcome.fail(
            f"{target}: {why[:200]} (input sha256 {digest}, "
            f"{len(data)} bytes, head {data[:48].hex()})"
        )


def fuzz_parsers(
    pki: GridPki, total: int, rng: random.Random, outcome: Outcome, *, myproxy: bool
) -> None:
    seeds = _seeds(pki)
    pool = [s for group in seeds.values() for s in group]
    check = _Checker(outcome)
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    ext_key = generate_key("ec")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz")])

    def policy(data: bytes) -> None:
        text = data.decode("utf-8", errors="replace")
        check_policy_files({"10-fuzz.toml": text})
        load_policy({"10-fuzz.toml": text, "20-ok.toml": DEV_POLICY})

    def find(data: bytes) -> None:
        voms.find_acs(_cert_with_extension(data, ext_key, subject))

    targets: list[tuple[str, str, Callable[[bytes], object], int]] = [
        # name, seed group, function, weight
        ("PEM chain (load_certificates)", "pem", load_certificates, 12),
        ("DER in PEM (load_certificates)", "der", lambda d: load_certificates(_pem_wrap(d)), 12),
        ("CSR PEM/DER (load_csr)", "csr", load_csr, 10),
        (
            "CSR DER in PEM (load_csr)",
            "csr",
            lambda d: load_csr(_pem_wrap(d, b"CERTIFICATE REQUEST")),
            4,
        ),
        ("VOMS AC (parse_ac)", "ac", voms.parse_ac, 14),
        ("VOMS AC extension (split_ac_extension)", "acext", voms.split_ac_extension, 6),
        ("VOMS AC in a certificate (find_acs)", "acext", find, 4),
        ("policy files (check_policy_files/load_policy)", "policy", policy, 12),
    ]
    if myproxy:
        targets += [
            ("MyProxy request (parse_request)", "request", codec.parse_request, 10),
            ("MyProxy response (parse_response)", "response", codec.parse_response, 4),
            ("MyProxy chain blob (decode_chain)", "chain", codec.decode_chain, 6),
            ("MyProxy auth reply (parse_auth_reply)", "auth", codec.parse_auth_reply, 4),
        ]
    else:
        outcome.note("MyProxy codec not fuzzed: the endpoint is not available")
    weight = sum(t[3] for t in targets)
    hyp_share = total // 5  # a fifth from hypothesis, the rest from the mutator
    mutated = total - hyp_share
    try:
        for name, group, fn, w in targets:
            for _ in range(mutated * w // weight):
                base = rng.choice(seeds[group])
                data = (
                    mutate(base, rng, pool)
                    if rng.random() < 0.97
                    else rng.randbytes(rng.randrange(0, 600))
                )
                check(name, fn, data)
        _hypothesis(targets, seeds, total - outcome.tried, check)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    outcome.note("inputs per target: " + "; ".join(f"{k} {v}" for k, v in check.by_target.items()))
    outcome.note(f"slowest single input {check.slowest[0] * 1000:.0f} ms ({check.slowest[1]})")


def _hypothesis(
    targets: list[tuple[str, str, Callable[[bytes], object], int]],
    seeds: dict[str, list[bytes]],
    budget: int,
    check: _Checker,
) -> None:
    """Hypothesis-generated inputs: raw bytes, seed-derived bytes, structured policy TOML."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    if budget <= 0:
        return
    per = max(budget // (len(targets) + 1), 1)
    config = settings(
        max_examples=per,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    for name, group, fn, _ in targets:
        strategy = st.one_of(
            st.binary(max_size=2048),
            st.tuples(
                st.sampled_from(seeds[group]), st.integers(0, 4096), st.binary(max_size=64)
            ).map(lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + len(t[2]) :]),
        )

        _given_bytes(config, strategy, f"{name} [hypothesis]", fn, check)()

    words = st.sampled_from(
        [
            "self",
            "group:pilots",
            "fqan:/atlas/Role=pilot",
            "re:(",
            "re:.*",
            "*",
            "/DC=org/*",
            "passphrase",
            "pam:alice",
            "anonymous",
            "12h",
            "-1h",
            "0s",
            "retrieve",
            "delegate",
            "renew",
            "info",
            "destroy",
            "allow",
            "deny",
            "certificate",
            "group:nope",
            "fqan:bad",
            "",
        ]
    )
    scalar = st.one_of(
        words,
        st.text(max_size=40),
        st.integers(-(2**70), 2**70),
        st.booleans(),
        st.floats(allow_nan=False, allow_infinity=False),
    )
    value = st.one_of(scalar, st.lists(scalar, max_size=5))
    keys = st.sampled_from(
        [
            "name",
            "action",
            "effect",
            "requester",
            "auth",
            "max_lifetime",
            "limited",
            "credential",
            "require_job_id",
            "owner",
            "bogus",
        ]
    )
    rule = st.dictionaries(keys, value, max_size=8)
    groups = st.dictionaries(
        st.text("abcxyz_-", min_size=1, max_size=8), st.lists(words, max_size=4), max_size=4
    )

    @config
    @given(st.lists(rule, max_size=5), groups)
    def structured(rules: list[dict[str, Any]], group_table: dict[str, list[str]]) -> None:
        lines = ["[groups]"] + [f"{json.dumps(k)} = {_toml(v)}" for k, v in group_table.items()]
        for r in rules:
            lines.append("[[rule]]")
            lines += [f"{k} = {_toml(v)}" for k, v in r.items()]
        text = "\n".join(lines) + "\n"
        check(
            "policy files [hypothesis, structured]",
            lambda d: load_policy({"10-h.toml": d.decode()}),
            text.encode(),
        )

    structured()


def _given_bytes(
    config: Any, strategy: Any, label: str, fn: Callable[[bytes], object], check: _Checker
) -> Callable[[], None]:
    from hypothesis import given

    @config
    @given(strategy)
    def run(data: bytes) -> None:
        check(label, fn, data)

    return run


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if isinstance(value, int) else json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)  # a JSON string is a TOML basic string


# --------------------------------------------------------------------------- REST bodies

_FIELDS = [
    "username",
    "name",
    "stored_hours",
    "max_proxy_hours",
    "retrievers",
    "trusted_retrievers",
    "renewers",
    "description",
    "chain",
    "passphrase",
    "csr",
    "owner",
    "job_id",
    "lifetime_hours",
    "limited",
    "challenge",
    "authz_chain",
    "signature",
    "old",
    "new",
    "extra",
    "__proto__",
]


def _json_value(rng: random.Random, depth: int, samples: list[str]) -> Any:
    kind = rng.randrange(11 if depth < 3 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, -(2**63), 2**64, 10**400 // 10**380, 24 * 367])
    if kind == 3:
        return rng.choice([0.0, -0.5, 1e308, 1e-308, 12.5, 8784.0001])
    if kind == 4:
        return rng.choice(samples)
    if kind == 5:
        return "".join(
            chr(
                rng.choice(
                    [
                        0,
                        10,
                        47,
                        46,
                        92,
                        0x202E,
                        0xFFFF,
                        rng.randrange(32, 127),
                        rng.randrange(0x80, 0x2FFF),
                    ]
                )
            )
            for _ in range(rng.choice((0, 1, 5, 40, 300)))
        )
    if kind == 6:
        return "x" * rng.choice((129, 1025, 4097, 70_000))
    if kind in (7, 8):
        return [_json_value(rng, depth + 1, samples) for _ in range(rng.choice((0, 1, 3, 300)))]
    return {
        rng.choice(_FIELDS): _json_value(rng, depth + 1, samples)
        for _ in range(rng.randrange(0, 6))
    }


def _body(rng: random.Random, samples: list[str]) -> bytes:
    roll = rng.random()
    if roll < 0.05:
        return rng.randbytes(rng.randrange(0, 200))
    if roll < 0.10:
        return json.dumps(_json_value(rng, 2, samples)).encode()
    doc = {rng.choice(_FIELDS): _json_value(rng, 1, samples) for _ in range(rng.randrange(0, 9))}
    text = json.dumps(doc)
    if rng.random() < 0.05:  # break it after the fact
        text = text[: rng.randrange(len(text) + 1)]
    return text.encode()


def _segment(rng: random.Random) -> str:
    return quote(
        rng.choice(
            [
                "alice",
                "..",
                "../etc",
                "a\0b",
                "%00",
                "x" * 300,
                "default",
                "ü",
                "a/b",
                " ",
                "load0",
                "-",
            ]
        ),
        safe="",
    )


def fuzz_rest(pki: GridPki, base: Path, total: int, rng: random.Random, outcome: Outcome) -> None:
    broker, _ = launch(pki, base / "rest-fuzz")
    try:
        alice = broker.client("alice")
        alice.delegate(alice.identity.load(), username="alice", now=datetime.now(UTC))
        pending = alice.call("POST", "/v1/delegations", {"username": "alice", "name": "p"})
        csr = csr_to_pem(make_csr(generate_key("ec"))).decode()
        chain = chain_to_pem(pki.load("alice").chain).decode()
        samples = [
            csr,
            chain,
            "alice",
            "default",
            "/DC=org/DC=example/CN=Alice",
            "1.0",
            pending["id"],
            "*/CN=pilot",
            "group:pilots",
            "fqan:/atlas",
            "c2lnbmF0dXJl",
        ]
        _fuzz_rest_threads(broker, total, rng.randrange(2**32), samples, pending["id"], outcome)
        _bad_version(broker, pki, outcome)
    finally:
        broker.stop()
    log = broker.log.read_text(errors="replace")
    outcome.note(
        f"server log after REST fuzzing: {log.count('Traceback')} tracebacks, "
        f"{log.count('unexpected error')} 'unexpected error' lines"
    )
    if "unexpected error" in log:
        outcome.fail("the server logged an unexpected error (a 500 path) during REST fuzzing")


def _bad_version(broker: RunningBroker, pki: GridPki, outcome: Outcome) -> None:
    """Fixed inputs found by the parser fuzzer: a version field cryptography refuses.

    Sent on every run so that the REST consequence (a 500) is never left to chance.
    """
    alice = broker.client("alice")
    der = bytearray(pki.load("alice").cert.public_bytes(serialization.Encoding.DER))
    der[der.index(bytes.fromhex("a003020102")) + 4] = 0x0A  # certificate version 11
    csr_der = bytearray(make_csr(generate_key("ec")).public_bytes(serialization.Encoding.DER))
    csr_der[csr_der.index(b"\x02\x01\x00") + 2] = 0x41  # CSR version 66
    pending = alice.call("POST", "/v1/delegations", {"username": "alice", "name": "ver"})
    cases = [
        (
            "PUT",
            f"/v1/delegations/{pending['id']}",
            {"chain": _pem_wrap(bytes(der)).decode()},
            alice._ctx,
        ),
        (
            "POST",
            "/v1/retrievals",
            {
                "username": "alice",
                "csr": _pem_wrap(bytes(csr_der), b"CERTIFICATE REQUEST").decode(),
            },
            broker.client("pilot")._ctx,
        ),
    ]
    for method, path, body, ctx in cases:
        outcome.tried += 1
        status, answer = _send(broker, ctx, method, path, json.dumps(body).encode())
        if status >= 500 or status == 0:
            outcome.fail(
                f"{method} {path} with an out-of-range X.509 version: HTTP {status} "
                f"{answer[:120]!r}"
            )


def _fuzz_rest_threads(
    broker: RunningBroker,
    total: int,
    seed: int,
    samples: list[str],
    pending_id: str,
    outcome: Outcome,
) -> None:
    lock = threading.Lock()
    statuses: dict[int, int] = {}
    sent = [0]
    deadline = time.monotonic() + 600
    identities = ["alice", "bob", "pilot"]
    contexts = [broker.client(who)._ctx for who in identities]

    def worker(index: int) -> None:
        rng = random.Random(seed + index)
        while time.monotonic() < deadline:
            with lock:
                if sent[0] >= total:
                    return
                sent[0] += 1
            method, path = rng.choice(
                [
                    ("POST", "/v1/delegations"),
                    ("PUT", f"/v1/delegations/{pending_id}"),
                    ("PUT", f"/v1/delegations/{_segment(rng)}"),
                    ("POST", "/v1/retrievals"),
                    ("POST", "/v1/renewals"),
                    ("GET", "/v1/renewals/challenge"),
                    ("GET", f"/v1/credentials?username={_segment(rng)}&name={_segment(rng)}"),
                    ("DELETE", f"/v1/credentials/{_segment(rng)}/{_segment(rng)}"),
                    ("POST", f"/v1/credentials/alice/{_segment(rng)}/passphrase"),
                    ("GET", "/v1/whoami"),
                ]
            )
            body = _body(rng, samples)
            status, answer = _send(broker, contexts[rng.randrange(3)], method, path, body)
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                outcome.tried += 1
                if status >= 500 or status == 0:
                    outcome.fail(
                        f"{method} {path} body {body[:100]!r}: HTTP {status} {answer[:150]!r}"
                    )
                elif status >= 400 and not _json_error(answer):
                    outcome.fail(
                        f"{method} {path}: HTTP {status} without a JSON error body {answer[:150]!r}"
                    )

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=660)
    outcome.note("REST statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())))


def _json_error(answer: bytes) -> bool:
    try:
        doc = json.loads(answer)
    except ValueError:
        return False
    return isinstance(doc, dict) and "error" in doc and "message" in doc


def _send(
    broker: RunningBroker, ctx: Any, method: str, path: str, body: bytes
) -> tuple[int, bytes]:
    """One request on a fresh TLS connection; the answer is read even when the server
    stopped reading an oversize body (it answers 413 and closes: our send then fails)."""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    data = b""
    try:
        with (
            socket.create_connection(("127.0.0.1", broker.port), timeout=30) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            try:
                tls.sendall(head + body)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    chunk = tls.recv(65536)
                except (ConnectionResetError, ssl.SSLError):
                    break
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        return 0, repr(exc).encode()
    if not data.startswith(b"HTTP/1."):
        return 0, b"no HTTP response: " + data[:100]
    top, _, rest = data.partition(b"\r\n\r\n")
    return int(top.split(b" ", 2)[1]), rest
