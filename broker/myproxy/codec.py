"""The MyProxy v2 wire format: parse and build messages. Pure: no sockets, no clock.

Text messages are ``KEY=value`` lines separated by ``\\n``. The C clients end
them with a NUL byte; MyProxyClient (PyPI) sends neither a NUL nor a final
newline and indents some lines with a space. The parser accepts all of these.

Binary messages are DER: a client CSR, and certificate blobs written as one
count byte followed by that many DER certificates back to back.

Every parse failure raises :class:`broker.errors.ProtocolError` (an
``InputError``) with a message fit for an ``ERROR=`` line; no other exception
escapes a parser (the fuzz tests hold us to that).
"""

from __future__ import annotations

import base64
import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from broker.errors import ProtocolError

VERSION = "MYPROXYv2"
MAX_PASSPHRASE = 1024
MAX_VALUE = 64 * 1024  # one line; policies are unbounded in MyProxy but the request is capped
MAX_CHAIN_CERTS = 32

#: The one byte a client writes after the handshake ("no GSI delegation").
CLIENT_FLAG = b"0"


class Command(enum.IntEnum):
    GET = 0
    PUT = 1
    INFO = 2
    DESTROY = 3
    CHANGE_PASSPHRASE = 4
    STORE = 5
    RETRIEVE = 6
    GET_TRUSTROOTS = 7


class ResponseCode(enum.IntEnum):
    OK = 0
    ERROR = 1
    AUTHORIZATION = 2


class AuthMethodId(enum.IntEnum):
    """The methods of the RESPONSE=2 challenge (only the X509 ones are offered here)."""

    PASSWORD = 1
    X509_CERTIFICATE = 2  # RSA PKCS#1 v1.5 with SHA-1
    SASL = 3
    X509_CERTIFICATE_SHA256 = 4


AUTH_METHOD_NAMES = {
    AuthMethodId.PASSWORD: "password",
    AuthMethodId.X509_CERTIFICATE: "X509_certificate",
    AuthMethodId.SASL: "SASL",
    AuthMethodId.X509_CERTIFICATE_SHA256: "X509_certificate_SHA256",
}

# Keys whose repeated lines are joined with "\n" instead of being an error.
_MULTI_KEYS = frozenset({"VONAME", "VOMSES", "ERROR", "AUTHORIZATION_DATA"})
_KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.@+\-]*")  # FILEDATA_<file>, CRED_<name>_...
# C strtol(..., 0): optional sign, then hex (0x..), octal (0..) or decimal; nothing else.
_INT_RE = re.compile(r"[+-]?(?:0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


@dataclass(frozen=True)
class Request:
    """One client request, with the wire names mapped to attributes."""

    command: Command
    username: str
    passphrase: str
    lifetime: int  # seconds; 0 = the server's default (negative values are refused)
    new_phrase: str | None = None
    retriever: str | None = None
    renewer: str | None = None
    cred_name: str | None = None
    cred_desc: str | None = None
    key_retrievers: str | None = None
    retriever_trusted: str | None = None
    trusted_certs: bool = False
    vonames: tuple[str, ...] = ()
    vomses: tuple[str, ...] = ()


@dataclass(frozen=True)
class Response:
    """A server response as a client sees it (used by tests and the load generator)."""

    code: ResponseCode
    fields: Mapping[str, str] = field(default_factory=dict)

    @property
    def error(self) -> str:
        return self.fields.get("ERROR", "")

    def auth_methods(self) -> list[tuple[str, str]]:
        """``AUTHORIZATION_DATA`` lines as (method name, server data)."""
        out = []
        for line in self.fields.get("AUTHORIZATION_DATA", "").split("\n"):
            name, _, data = line.partition(":")
            if name:
                out.append((name, data))
        return out


# --------------------------------------------------------------------------- text messages


def _text(data: bytes) -> str:
    cut = data.find(b"\0")
    if cut >= 0:
        data = data[:cut]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        # DNs and passphrases are normally ASCII; latin-1 keeps odd bytes usable
        # instead of refusing the request (OpenSSL prints \xHH for them anyway).
        return data.decode("latin-1")


def parse_fields(data: bytes) -> dict[str, str]:
    """``KEY=value`` lines into a dict; tolerant of indentation, CRs and a missing NUL."""
    fields: dict[str, str] = {}
    for raw in _text(data).split("\n"):
        line = raw.strip(" \t\r")
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep or not _KEY_RE.fullmatch(key):
            continue  # "ignore what you don't understand"
        if len(value) > MAX_VALUE:
            raise ProtocolError(f"the value of {key} is longer than {MAX_VALUE} bytes")
        if key in fields:
            if key not in _MULTI_KEYS:
                raise ProtocolError(f"{key} appears more than once in the request")
            fields[key] = fields[key] + "\n" + value
        else:
            fields[key] = value
    return fields


def parse_int(text: str, what: str) -> int:
    """An integer the way C ``strtol(s, &end, 0)`` with a full-string check reads it."""
    text = text.strip()
    # strtol saturates at 64 bits; more than 20 digits is never a real value (and Python's
    # int() refuses over 4300 digits with a ValueError, which must not escape the codec).
    if len(text) > 24 or not _INT_RE.fullmatch(text):
        raise ProtocolError(f"{what} {text[:40]!r} is not an integer the server accepts")
    sign = -1 if text.startswith("-") else 1
    body = text.lstrip("+-")
    if body[:2] in ("0x", "0X"):
        value = int(body[2:], 16)
    elif len(body) > 1 and body.startswith("0"):
        value = int(body[1:], 8)
    else:
        value = int(body)
    return sign * value


def parse_request(data: bytes) -> Request:
    """Decode the first message of a session."""
    fields = parse_fields(data)
    version = fields.get("VERSION")
    if version is None:
        raise ProtocolError("the request has no VERSION line; is this a MyProxy client?")
    if version != VERSION:
        raise ProtocolError("Invalid version number received.")
    if "COMMAND" not in fields:
        raise ProtocolError("the request has no COMMAND line")
    number = parse_int(fields["COMMAND"], "COMMAND")
    try:
        command = Command(number)
    except ValueError:
        raise ProtocolError(f"unknown command number {number}") from None
    username = fields.get("USERNAME")
    if username is None:
        raise ProtocolError("the request has no USERNAME line")
    if not username and command is not Command.GET_TRUSTROOTS:
        raise ProtocolError("the request has an empty USERNAME")
    passphrase = fields.get("PASSPHRASE", "")
    new_phrase = fields.get("NEW_PHRASE")
    for value in (passphrase, new_phrase or ""):
        if len(value) > MAX_PASSPHRASE:
            raise ProtocolError(f"a passphrase is longer than {MAX_PASSPHRASE} characters")
    lifetime = parse_int(fields["LIFETIME"], "LIFETIME") if "LIFETIME" in fields else 0
    if lifetime < 0:
        # Refused with the first reply: read as "the default", a GET went on to wait for a CSR
        # the client was not going to send.
        raise ProtocolError(
            f"LIFETIME {lifetime} is negative; send the lifetime in seconds "
            "(0 for the server's default)"
        )
    trusted = fields.get("TRUSTED_CERTS", "0").strip()
    return Request(
        command=command,
        username=username,
        passphrase=passphrase,
        lifetime=min(lifetime, 1 << 40),
        new_phrase=new_phrase or None,
        retriever=fields.get("RETRIEVER") or None,
        renewer=fields.get("RENEWER") or None,
        cred_name=fields.get("CRED_NAME") or None,
        cred_desc=fields.get("CRED_DESC") or None,
        key_retrievers=fields.get("KEYRETRIEVERS") or None,
        retriever_trusted=fields.get("RETRIEVER_TRUSTED") or None,
        trusted_certs=trusted not in ("", "0"),
        vonames=tuple(v for v in fields.get("VONAME", "").split("\n") if v),
        vomses=tuple(v for v in fields.get("VOMSES", "").split("\n") if v),
    )


def format_request(
    command: Command,
    username: str,
    passphrase: str = "",
    lifetime: int = 0,
    extra: Iterable[tuple[str, str]] = (),
    *,
    nul: bool = True,
) -> bytes:
    """Build a request as the C client writes it (tests and the load generator use this)."""
    lines = [
        ("VERSION", VERSION),
        ("COMMAND", str(int(command))),
        ("USERNAME", username),
        ("PASSPHRASE", passphrase),
        ("LIFETIME", str(lifetime)),
        *extra,
    ]
    return _join(lines, nul=nul)


def _clean(value: str) -> str:
    # A value must stay on its line and must not end the message early.
    return value.replace("\0", " ").replace("\n", " ").replace("\r", " ")


def _join(lines: Iterable[tuple[str, str]], *, nul: bool = True) -> bytes:
    body = "".join(f"{key}={_clean(value)}\n" for key, value in lines)
    return body.encode("utf-8") + (b"\0" if nul else b"")


def format_response(code: ResponseCode, lines: Iterable[tuple[str, str]] = ()) -> bytes:
    return _join([("VERSION", VERSION), ("RESPONSE", str(int(code))), *lines])


def ok(lines: Iterable[tuple[str, str]] = ()) -> bytes:
    return format_response(ResponseCode.OK, lines)


def error(message: str) -> bytes:
    """An ERROR response; each line of ``message`` becomes one ``ERROR=`` line."""
    parts = [p for p in message.replace("\0", " ").split("\n") if p.strip()] or ["unknown error"]
    return format_response(ResponseCode.ERROR, [("ERROR", p) for p in parts])


def challenge(methods: Sequence[tuple[AuthMethodId, str]]) -> bytes:
    """A RESPONSE=2 authorization challenge offering ``methods`` (id, server data)."""
    return format_response(
        ResponseCode.AUTHORIZATION,
        [("AUTHORIZATION_DATA", f"{AUTH_METHOD_NAMES[m]}:{data}") for m, data in methods],
    )


def parse_response(data: bytes) -> Response:
    fields = parse_fields(data)
    if fields.get("VERSION") != VERSION:
        raise ProtocolError("the response has no or a wrong VERSION line")
    if "RESPONSE" not in fields:
        raise ProtocolError("the response has no RESPONSE line")
    try:
        code = ResponseCode(parse_int(fields["RESPONSE"], "RESPONSE"))
    except ValueError:
        raise ProtocolError(f"unknown response code {fields['RESPONSE']!r}") from None
    return Response(code, fields)


# --------------------------------------------------------------------------- payloads


@dataclass(frozen=True)
class InfoEntry:
    """One credential as INFO reports it; ``name`` None is the unnamed (default) one."""

    name: str | None
    owner: str
    start_time: int
    end_time: int
    description: str | None = None
    retriever: str | None = None
    key_retrievers: str | None = None
    retriever_trusted: str | None = None
    renewer: str | None = None
    lock_message: str | None = None


def _info_fields(entry: InfoEntry, prefix: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    optional = (
        ("DESC", entry.description),
        ("RETRIEVER", entry.retriever),
        ("KEYRETRIEVERS", entry.key_retrievers),
        ("RETRIEVER_TRUSTED", entry.retriever_trusted),
        ("RENEWER", entry.renewer),
        ("LOCKMSG", entry.lock_message),
    )
    out.append((f"{prefix}START_TIME", str(entry.start_time)))
    out.append((f"{prefix}END_TIME", str(entry.end_time)))
    out.append((f"{prefix}OWNER", entry.owner))
    out.extend((f"{prefix}{key}", value) for key, value in optional if value)
    return out


def info_lines(entries: Sequence[InfoEntry]) -> list[tuple[str, str]]:
    """The INFO payload: the first credential plain, the rest under ADDL_CREDS.

    Names that contain a comma cannot be listed in ADDL_CREDS (the client splits
    at commas); they are left out, as the reference server does with file names.
    """
    ordered = sorted(entries, key=lambda e: (e.name is not None, e.name or ""))
    ordered = [e for e in ordered if e.name is None or "," not in e.name]
    if not ordered:
        return []
    first, rest = ordered[0], ordered[1:]
    out: list[tuple[str, str]] = []
    if first.name is not None:
        out.append(("CRED_NAME", first.name))
    out.extend(_info_fields(first, "CRED_"))
    named = [e for e in rest if e.name is not None]
    if named:
        out.append(("ADDL_CREDS", ",".join(e.name for e in named if e.name)))
        for entry in named:
            out.extend(_info_fields(entry, f"CRED_{entry.name}_"))
    return out


def trustroot_lines(files: Mapping[str, bytes]) -> list[tuple[str, str]]:
    """``TRUSTED_CERTS=a,b`` then ``FILEDATA_a=<base64>`` for each file."""
    names = [n for n in sorted(files) if "," not in n and "\n" not in n and "=" not in n]
    out = [("TRUSTED_CERTS", ",".join(names))]
    out.extend((f"FILEDATA_{n}", base64.b64encode(files[n]).decode("ascii")) for n in names)
    return out


# --------------------------------------------------------------------------- DER blobs


def der_length(data: bytes, offset: int = 0) -> int | None:
    """Total length of the DER TLV at ``offset``; None if ``data`` is too short to tell.

    Raises ProtocolError when the bytes cannot be a DER SEQUENCE.
    """
    if len(data) - offset < 2:
        return None
    if data[offset] != 0x30:
        raise ProtocolError("expected a DER SEQUENCE (a certificate or a request)")
    first = data[offset + 1]
    if first < 0x80:
        return 2 + first
    count = first & 0x7F
    if count == 0 or count > 4:
        raise ProtocolError("a DER length field is malformed or too large")
    if len(data) - offset < 2 + count:
        return None
    length = int.from_bytes(data[offset + 2 : offset + 2 + count], "big")
    return 2 + count + length


def encode_chain(ders: Sequence[bytes]) -> bytes:
    """``<count><DER>...``: the blob carrying a certificate chain, leaf first."""
    if not 0 < len(ders) <= 255:
        raise ProtocolError("a chain must hold between 1 and 255 certificates")
    return bytes([len(ders)]) + b"".join(ders)


def chain_complete(data: bytes) -> bool:
    """Whether ``data`` holds a whole ``<count><DER>...`` blob (for the reader)."""
    try:
        decode_chain(data)
    except _Incomplete:
        return False
    except ProtocolError:
        return True  # complete enough to be refused
    return True


class _Incomplete(ProtocolError):
    pass


def decode_chain(data: bytes) -> list[bytes]:
    """The DER certificates of a ``<count><DER>...`` blob; extra bytes are an error."""
    if not data:
        raise _Incomplete("the certificate chain message is empty")
    count = data[0]
    if count == 0 or count > MAX_CHAIN_CERTS:
        raise ProtocolError(
            f"the certificate chain announces {count} certificates (1..{MAX_CHAIN_CERTS} accepted)"
        )
    offset = 1
    out = []
    for _ in range(count):
        length = der_length(data, offset)
        if length is None or offset + length > len(data):
            raise _Incomplete("the certificate chain message is truncated")
        out.append(data[offset : offset + length])
        offset += length
    if offset != len(data):
        raise ProtocolError("the certificate chain message has trailing bytes")
    return out


def der_complete(data: bytes) -> bool:
    """Whether ``data`` holds one whole DER object (a CSR)."""
    try:
        length = der_length(data)
    except ProtocolError:
        return True
    return length is not None and len(data) >= length


# --------------------------------------------------------------------------- challenge replies


@dataclass(frozen=True)
class X509Proof:
    """A client's answer to an X509 challenge: signature over the hex text, and its chain."""

    method: AuthMethodId
    signature: bytes
    chain: list[bytes]


def parse_auth_reply(data: bytes) -> X509Proof:
    """``<method><0><0><0>`` then, for X509 methods, ``<len:4 BE><sig><count><DER>...``."""
    if len(data) < 4:
        raise ProtocolError("the authorization reply is shorter than its 4-byte header")
    try:
        method = AuthMethodId(data[0])
    except ValueError:
        raise ProtocolError(f"unknown authorization method {data[0]}") from None
    if method not in (AuthMethodId.X509_CERTIFICATE, AuthMethodId.X509_CERTIFICATE_SHA256):
        raise ProtocolError(f"authorization method {AUTH_METHOD_NAMES[method]} was not offered")
    body = data[4:]
    if len(body) < 4:
        raise ProtocolError("the X509 authorization reply has no signature length")
    size = int.from_bytes(body[:4], "big")
    if size == 0 or size > 2048 or len(body) < 4 + size:
        raise ProtocolError("the X509 authorization reply has a bad signature length")
    signature = body[4 : 4 + size]
    chain = decode_chain(body[4 + size :])
    return X509Proof(method, signature, chain)


def format_auth_reply(method: AuthMethodId, signature: bytes, chain: Sequence[bytes]) -> bytes:
    return (
        bytes([int(method), 0, 0, 0])
        + len(signature).to_bytes(4, "big")
        + signature
        + encode_chain(chain)
    )


def auth_reply_complete(data: bytes) -> bool:
    if len(data) < 8:
        return False
    size = int.from_bytes(data[4:8], "big")
    if len(data) < 8 + size:
        return False
    return chain_complete(data[8 + size :])
