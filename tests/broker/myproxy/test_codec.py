"""The MyProxy wire codec: exact bytes, tolerant parsing, and fuzzing for crashes."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import ProtocolError
from broker.myproxy import codec
from broker.myproxy.codec import AuthMethodId, Command, ResponseCode

# Bytes seen on the wire from myproxy-init -k c1 -x -r ... -Z ... (protocol notes 1.3).
C_CLIENT_PUT = (
    b"VERSION=MYPROXYv2\nCOMMAND=1\nUSERNAME=carol\nPASSPHRASE=\nLIFETIME=10800\n"
    b"RETRIEVER=*/CN=portal*\nCRED_NAME=c1\n"
    b"RETRIEVER_TRUSTED=/C=XX/O=TestGrid/CN=host/pilot.example.org|*/CN=Bob Test\n\0"
)


def test_parses_the_c_client_request() -> None:
    request = codec.parse_request(C_CLIENT_PUT)
    assert request.command is Command.PUT
    assert request.username == "carol"
    assert request.passphrase == ""
    assert request.lifetime == 10800
    assert request.retriever == "*/CN=portal*"
    assert request.cred_name == "c1"
    assert request.retriever_trusted == "/C=XX/O=TestGrid/CN=host/pilot.example.org|*/CN=Bob Test"
    assert request.renewer is None


def test_myproxyclient_style_without_nul_and_with_indentation() -> None:
    data = (
        b"VERSION=MYPROXYv2\n COMMAND=4\n USERNAME=alice-job7\n PASSPHRASE=oldpass1\n"
        b" NEW_PHRASE=newpass2\n LIFETIME=0"
    )
    request = codec.parse_request(data)
    assert request.command is Command.CHANGE_PASSPHRASE
    assert request.username == "alice-job7"
    assert request.new_phrase == "newpass2"


def test_bytes_after_the_nul_are_not_part_of_the_request() -> None:
    data = codec.format_request(Command.GET, "alice", "pw12345", 3600) + b"COMMAND=3\n"
    assert codec.parse_request(data).command is Command.GET


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"VERSION=MYPROXYv1\nCOMMAND=0\nUSERNAME=a\n\0", "Invalid version number received."),
        (b"COMMAND=0\nUSERNAME=a\n\0", "no VERSION"),
        (b"VERSION=MYPROXYv2\nUSERNAME=a\n\0", "no COMMAND"),
        (b"VERSION=MYPROXYv2\nCOMMAND=9\nUSERNAME=a\n\0", "unknown command"),
        (b"VERSION=MYPROXYv2\nCOMMAND=zero\nUSERNAME=a\n\0", "not an integer"),
        (b"VERSION=MYPROXYv2\nCOMMAND=0\nUSERNAME=a\nUSERNAME=b\n\0", "more than once"),
        (b"VERSION=MYPROXYv2\nCOMMAND=0\n\0", "no USERNAME"),
        (b"VERSION=MYPROXYv2\nCOMMAND=0\nUSERNAME=\n\0", "empty USERNAME"),
        (
            b"VERSION=MYPROXYv2\nCOMMAND=0\nUSERNAME=a\nPASSPHRASE=" + b"x" * 1025 + b"\n\0",
            "longer than 1024",
        ),
    ],
)
def test_refusals(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        codec.parse_request(data)


def test_trustroots_may_have_an_empty_username_and_unknown_lines_are_ignored() -> None:
    data = b"VERSION=MYPROXYv2\nCOMMAND=7\nUSERNAME=\nTRUSTED_CERTS=1\nFUTURE_KEY=x\njunk\n\0"
    request = codec.parse_request(data)
    assert request.command is Command.GET_TRUSTROOTS and request.trusted_certs


def test_repeated_voname_lines_are_joined() -> None:
    data = codec.format_request(Command.GET, "a", extra=[("VONAME", "atlas"), ("VONAME", "cms")])
    assert codec.parse_request(data).vonames == ("atlas", "cms")


@pytest.mark.parametrize(
    ("text", "value"), [("43200", 43200), ("0x10", 16), ("010", 8), ("0", 0), ("-5", -5), ("+7", 7)]
)
def test_integers_like_strtol_base_0(text: str, value: int) -> None:
    assert codec.parse_int(text, "LIFETIME") == value


@pytest.mark.parametrize("text", ["-5", "-100", "-0x10"])
def test_negative_lifetime_is_refused(text: str) -> None:
    data = codec.format_request(Command.GET, "a").replace(
        b"LIFETIME=0", b"LIFETIME=" + text.encode()
    )
    with pytest.raises(ProtocolError, match="negative"):
        codec.parse_request(data)


def test_zero_lifetime_is_the_default() -> None:
    assert codec.parse_request(codec.format_request(Command.GET, "a")).lifetime == 0


def test_response_bytes() -> None:
    assert codec.ok() == b"VERSION=MYPROXYv2\nRESPONSE=0\n\0"
    assert len(codec.ok()) == 30
    assert codec.error("Bad password\ninvalid credential passphrase") == (
        b"VERSION=MYPROXYv2\nRESPONSE=1\nERROR=Bad password\n"
        b"ERROR=invalid credential passphrase\n\0"
    )
    data = codec.challenge([(AuthMethodId.X509_CERTIFICATE_SHA256, "ab" * 16)])
    assert data == (
        b"VERSION=MYPROXYv2\nRESPONSE=2\nAUTHORIZATION_DATA="
        b"X509_certificate_SHA256:" + b"ab" * 16 + b"\n\0"
    )
    response = codec.parse_response(data)
    assert response.code is ResponseCode.AUTHORIZATION
    assert response.auth_methods() == [("X509_certificate_SHA256", "ab" * 16)]


def test_values_cannot_break_out_of_their_line() -> None:
    data = codec.error("evil\0VERSION=x")
    assert data.count(b"\0") == 1 and data.endswith(b"\0")
    line = codec.format_response(ResponseCode.OK, [("CRED_DESC", "a\nRESPONSE=1")])
    assert codec.parse_response(line).code is ResponseCode.OK


def test_info_lines_put_the_default_first_and_list_the_rest() -> None:
    entries = [
        codec.InfoEntry(name="b", owner="/CN=A", start_time=1, end_time=2, renewer="*/CN=p"),
        codec.InfoEntry(name=None, owner="/CN=A", start_time=3, end_time=4, description="d"),
        codec.InfoEntry(name="bad,name", owner="/CN=A", start_time=1, end_time=2),
    ]
    lines = codec.info_lines(entries)
    assert lines[:4] == [
        ("CRED_START_TIME", "3"),
        ("CRED_END_TIME", "4"),
        ("CRED_OWNER", "/CN=A"),
        ("CRED_DESC", "d"),
    ]
    assert ("ADDL_CREDS", "b") in lines
    assert ("CRED_b_RENEWER", "*/CN=p") in lines
    assert not any("bad" in key for key, _ in lines)


def test_trustroot_lines() -> None:
    lines = codec.trustroot_lines({"abcd.0": b"PEM", "abcd.signing_policy": b"x", "a,b": b"no"})
    assert lines[0] == ("TRUSTED_CERTS", "abcd.0,abcd.signing_policy")
    assert ("FILEDATA_abcd.0", base64.b64encode(b"PEM").decode()) in lines


def _der(payload: bytes) -> bytes:
    if len(payload) < 128:
        return b"\x30" + bytes([len(payload)]) + payload
    size = len(payload).to_bytes(2, "big")
    return b"\x30\x82" + size + payload


def test_chain_blob_round_trip_and_completeness() -> None:
    ders = [_der(b"a" * 10), _der(b"b" * 300), _der(b"")]
    blob = codec.encode_chain(ders)
    assert blob[0] == 3
    assert codec.decode_chain(blob) == ders
    assert codec.chain_complete(blob)
    assert not codec.chain_complete(blob[:-1])
    with pytest.raises(ProtocolError, match="trailing"):
        codec.decode_chain(blob + b"x")
    with pytest.raises(ProtocolError, match="announces 0"):
        codec.decode_chain(b"\x00")


def test_auth_reply_round_trip() -> None:
    ders = [_der(b"leaf"), _der(b"eec")]
    reply = codec.format_auth_reply(AuthMethodId.X509_CERTIFICATE_SHA256, b"s" * 256, ders)
    assert reply[:4] == b"\x04\x00\x00\x00"
    assert codec.auth_reply_complete(reply)
    assert not codec.auth_reply_complete(reply[:100])
    proof = codec.parse_auth_reply(reply)
    assert proof.method is AuthMethodId.X509_CERTIFICATE_SHA256
    assert proof.signature == b"s" * 256 and proof.chain == ders
    with pytest.raises(ProtocolError, match="not offered"):
        codec.parse_auth_reply(b"\x01\x00\x00\x00secret\0")


# --------------------------------------------------------------------------- fuzzing

_KEYS = [
    "VERSION",
    "COMMAND",
    "USERNAME",
    "PASSPHRASE",
    "NEW_PHRASE",
    "LIFETIME",
    "RETRIEVER",
    "RENEWER",
    "CRED_NAME",
    "CRED_DESC",
    "RETRIEVER_TRUSTED",
    "TRUSTED_CERTS",
    "VONAME",
]

_line = st.tuples(st.sampled_from(_KEYS), st.text(max_size=40)).map(
    lambda kv: f"{kv[0]}={kv[1]}".encode("utf-8", "surrogatepass")
)
_structured = st.lists(
    st.one_of(_line, st.just(b"VERSION=MYPROXYv2"), st.binary(max_size=30)), max_size=12
).map(lambda lines: b"\n".join(lines) + b"\0")


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=300), _structured))
def test_fuzz_parse_request_only_raises_protocol_errors(data: bytes) -> None:
    try:
        request = codec.parse_request(data)
    except ProtocolError as exc:
        assert exc.message
    else:
        assert isinstance(request.command, Command)
        assert request.lifetime >= 0


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_binary_parsers_only_raise_protocol_errors(data: bytes) -> None:
    for parse in (codec.decode_chain, codec.parse_auth_reply, codec.parse_response):
        try:
            parse(data)
        except ProtocolError:
            pass
    for check in (codec.chain_complete, codec.der_complete, codec.auth_reply_complete):
        assert check(data) in (True, False)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200), st.lists(st.text(max_size=30), max_size=5))
def test_fuzz_responses_round_trip(message: str, values: list[str]) -> None:
    parsed = codec.parse_response(codec.error(message))
    assert parsed.code is ResponseCode.ERROR
    assert "\0" not in parsed.error
    response = codec.parse_response(codec.ok([("CRED_DESC", v) for v in values[:1]]))
    assert response.code is ResponseCode.OK


def test_huge_integers_are_a_protocol_error_not_a_crash() -> None:
    from broker.errors import ProtocolError

    for text in ("9" * 5000, "1" * 25, "0x" + "f" * 40):
        with pytest.raises(ProtocolError):
            codec.parse_int(text, "LIFETIME")
