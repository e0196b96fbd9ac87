"""Distinguished names in the two textual forms grid software uses.

The *slash form* is what OpenSSL's ``X509_NAME_oneline`` prints and what every
grid tool (grid-mapfiles, MyProxy, VOMS LSC files) stores: each attribute in
encoding order, each preceded by ``/``, short names for the attribute types,
bytes outside printable ASCII written as ``\\xHH`` with upper-case hex digits.
The form is ambiguous when a value holds ``/`` followed by ``NAME=``; the parser
splits only where a known attribute name (or a dotted OID) follows the slash.

RFC 4514 is the form ``cryptography`` and LDAP use: last RDN first, commas.
"""

from __future__ import annotations

import re

from cryptography import x509
from cryptography.x509.oid import NameOID, ObjectIdentifier

from broker.errors import DnSyntaxError

# The short names OpenSSL prints (OBJ_nid2sn) for the attributes grid DNs use.
_SHORT_NAMES: dict[ObjectIdentifier, str] = {
    NameOID.COUNTRY_NAME: "C",
    NameOID.STATE_OR_PROVINCE_NAME: "ST",
    NameOID.LOCALITY_NAME: "L",
    NameOID.ORGANIZATION_NAME: "O",
    NameOID.ORGANIZATIONAL_UNIT_NAME: "OU",
    NameOID.COMMON_NAME: "CN",
    NameOID.DOMAIN_COMPONENT: "DC",
    NameOID.EMAIL_ADDRESS: "emailAddress",
    NameOID.USER_ID: "UID",
    NameOID.SERIAL_NUMBER: "serialNumber",
    NameOID.GIVEN_NAME: "GN",
    NameOID.SURNAME: "SN",
    NameOID.TITLE: "title",
    NameOID.STREET_ADDRESS: "street",
}
_BY_SHORT_NAME: dict[str, ObjectIdentifier] = {v: k for k, v in _SHORT_NAMES.items()}
# Aliases found in the wild (old Globus tools print "Email" and "E"; "USERID" appears in
# some grid-mapfiles).  They parse; rendering always uses OpenSSL's names.
_BY_SHORT_NAME.update(
    {
        "Email": NameOID.EMAIL_ADDRESS,
        "E": NameOID.EMAIL_ADDRESS,
        "USERID": NameOID.USER_ID,
        "userId": NameOID.USER_ID,
    }
)
_OID_TEXT = re.compile(r"^[0-2](?:\.[0-9]+)+$")
# A slash starts a new attribute only when a type name and '=' follow it.
_TYPE_AHEAD = "|".join(sorted((re.escape(k) for k in _BY_SHORT_NAME), key=len, reverse=True))
_SPLIT = re.compile(rf"/(?=(?:{_TYPE_AHEAD}|[0-2](?:\.[0-9]+)+)=)")
_HEX_ESCAPE = re.compile(rb"\\x([0-9A-Fa-f]{2})")

MAX_DN_LENGTH = 4096


def _type_name(oid: ObjectIdentifier) -> str:
    return _SHORT_NAMES.get(oid, oid.dotted_string)


def _escape_value(value: str) -> str:
    out: list[str] = []
    for byte in value.encode("utf-8"):
        if 32 <= byte <= 126:
            out.append(chr(byte))
        else:
            out.append(f"\\x{byte:02X}")
    return "".join(out)


def slash_from_name(name: x509.Name) -> str:
    """Render ``name`` exactly as ``X509_NAME_oneline`` does (``/DC=org/CN=Alice``)."""
    parts: list[str] = []
    for rdn in name.rdns:
        for attr in rdn:
            value = attr.value if isinstance(attr.value, str) else attr.value.decode("latin-1")
            parts.append(f"/{_type_name(attr.oid)}={_escape_value(value)}")
    return "".join(parts)


# A value holding "/" then "X=" would read as a second attribute in the slash form; a
# literal "\\xHH" would read as an escaped byte. Either makes two names print alike.
_SLASH_TYPE_IN_VALUE = re.compile(r"/[^/]*=")
_ESCAPE_IN_VALUE = re.compile(r"\\x[0-9A-Fa-f]{2}")


def slash_ambiguity(name: x509.Name) -> str | None:
    """Why ``name``'s slash form could be mistaken for another name's, or None.

    The slash form is what identities are compared by (policies, owners, grid-mapfiles),
    so a name is refused when its rendering is not one-to-one: a multi-valued RDN
    (``/CN=A/O=B`` would equal two single RDNs), a value with a control character (NUL
    included), a value holding ``/`` followed later by ``=`` (``DC=example/CN=Alice``
    would read as two attributes) or a literal ``\\xHH`` (would read as an escaped byte).
    """
    for rdn in name.rdns:
        attrs = list(rdn)
        if len(attrs) != 1:
            types = "+".join(_type_name(a.oid) for a in attrs)
            return f"it has a multi-valued name component ({types})"
        attr = attrs[0]
        value = attr.value if isinstance(attr.value, str) else attr.value.decode("latin-1")
        label = _type_name(attr.oid)
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            return f"its {label} value holds a control character"
        if _SLASH_TYPE_IN_VALUE.search(value):
            return f"its {label} value holds '/' followed by '=' ({_escape_value(value)!r})"
        if _ESCAPE_IN_VALUE.search(value):
            return f"its {label} value holds a literal \\x escape"
    return None


def name_from_slash(text: str) -> x509.Name:
    """Parse the slash form into a :class:`x509.Name` (one attribute per RDN).

    Raises :class:`DnSyntaxError` with a sentence naming the problem.
    """
    if not isinstance(text, str) or not text:
        raise DnSyntaxError("a distinguished name is empty; give it in the /DC=org/CN=Name form")
    if len(text) > MAX_DN_LENGTH:
        raise DnSyntaxError(f"a distinguished name is longer than {MAX_DN_LENGTH} characters")
    if "\x00" in text:
        raise DnSyntaxError("a distinguished name contains a NUL character")
    if not text.startswith("/"):
        raise DnSyntaxError(
            f"the distinguished name {text!r} does not start with '/'; "
            "give it in the OpenSSL slash form, e.g. /DC=org/DC=example/CN=Alice"
        )
    pieces = _SPLIT.split(text[1:])
    rdns: list[x509.RelativeDistinguishedName] = []
    for piece in pieces:
        key, sep, raw = piece.partition("=")
        if not sep:
            raise DnSyntaxError(
                f"the distinguished name {text!r} has a part without '=': {piece!r}"
            )
        oid = _BY_SHORT_NAME.get(key)
        if oid is None:
            if not _OID_TEXT.match(key):
                raise DnSyntaxError(
                    f"the distinguished name {text!r} uses an unknown attribute type {key!r}"
                )
            oid = ObjectIdentifier(key)
        value_bytes = _HEX_ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), raw.encode("utf-8"))
        try:
            value = value_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DnSyntaxError(
                f"the distinguished name {text!r} has \\x escapes that are not UTF-8"
            ) from exc
        if not value:
            raise DnSyntaxError(f"the distinguished name {text!r} has an empty {key} value")
        try:
            attr = x509.NameAttribute(oid, value)
        except ValueError as exc:
            raise DnSyntaxError(f"the distinguished name {text!r}: {key}={value!r}: {exc}") from exc
        rdns.append(x509.RelativeDistinguishedName([attr]))
    return x509.Name(rdns)


def rfc4514_from_name(name: x509.Name) -> str:
    """Render ``name`` in RFC 4514 form (last RDN first), with OpenSSL short names."""
    return name.rfc4514_string(
        {
            NameOID.EMAIL_ADDRESS: "emailAddress",
            NameOID.USER_ID: "UID",
            NameOID.SERIAL_NUMBER: "serialNumber",
        }
    )


def name_from_rfc4514(text: str) -> x509.Name:
    """Parse an RFC 4514 string; raises :class:`DnSyntaxError` on malformed input."""
    if not text or len(text) > MAX_DN_LENGTH or "\x00" in text:
        raise DnSyntaxError("a distinguished name in RFC 4514 form is empty, too long or holds NUL")
    try:
        return x509.Name.from_rfc4514_string(
            text,
            {
                "emailAddress": NameOID.EMAIL_ADDRESS,
                "UID": NameOID.USER_ID,
                "serialNumber": NameOID.SERIAL_NUMBER,
            },
        )
    except ValueError as exc:
        raise DnSyntaxError(
            f"the distinguished name {text!r} is not valid RFC 4514: {exc}"
        ) from exc


def normalize_dn(text: str) -> str:
    """Accept either form and return the slash form (used for user-supplied DNs)."""
    text = text.strip()
    if text.startswith("/"):
        return slash_from_name(name_from_slash(text))
    return slash_from_name(name_from_rfc4514(text))
