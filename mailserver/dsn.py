"""Delivery Status Notifications: the "accusé de réception" of the trust space.

Pure functions, values in and bytes or values out: no socket, no database.

Implements:
- RFC 3461 (SMTP DSN extension): xtext (§4), NOTIFY (§4.1), RET (§4.3), ORCPT (§4.2), ENVID (§4.4) and
  when a report is due (§4.1, §6.2);
- RFC 3464 (message/delivery-status): per-message fields (§2.2) and per-recipient fields (§2.3);
- RFC 6522 (multipart/report) and its text/rfc822-headers part (§4);
- RFC 3463 enhanced status codes (checked against the action, RFC 3464 §2.3.4);
- RFC 3834 §5 (`Auto-Submitted: auto-replied`), RFC 2047 encoded words, RFC 6533 §3 (utf-8 address type)
  for the addresses that are not US-ASCII.

Reports are built 7bit-clean with CRLF line endings and no line over 998 octets (RFC 5322 §2.1.1), so they
cross any relay unchanged. Parsing is tolerant: it reads what real MTAs send (Exchange's blank lines and
missing spaces, reports without Status, sendmail, Postfix and Exim layouts).

The building blocks shared with `mailserver.mdn` (header folding, RFC 2047, the original's header block,
the multipart/report assembly and lookup) live here, under leading-underscore names.
"""

from __future__ import annotations

import contextlib
import enum
import re
import secrets
import time
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from email import policy as email_policy
from email import quoprimime
from email.errors import MessageError
from email.message import Message
from email.parser import BytesHeaderParser, BytesParser
from email.utils import format_datetime, parsedate_to_datetime
from typing import Literal

from mailserver.headers import decode_encoded_words

__all__ = [
    "DEFAULT_NOTIFY",
    "FULL_RETURN_LIMIT",
    "MAX_LINE",
    "Action",
    "DsnRecipient",
    "DsnReport",
    "Notify",
    "RecipientStatus",
    "build_dsn",
    "format_orcpt",
    "never_report_to",
    "parse_dsn",
    "parse_notify",
    "parse_orcpt",
    "should_report",
    "validate_envid",
    "validate_ret",
    "xtext_decode",
    "xtext_encode",
]

# A delivered, relayed or delayed report returns the whole original only up to this size (RET=FULL);
# above it, the headers only. Failure reports honour RET=FULL whatever the size (RFC 3461 §4.3).
FULL_RETURN_LIMIT = 1024 * 1024

MAX_LINE = 998  # RFC 5322 §2.1.1, octets before CRLF
_MAX_LINE = MAX_LINE
_FOLD_AT = 78  # RFC 5322 §2.1.1 SHOULD
_CRLF = "\r\n"


# --------------------------------------------------------------------------------------------------
# RFC 3461 §4: xtext
# --------------------------------------------------------------------------------------------------

_XTEXT_HEX = re.compile(r"\+([0-9A-Fa-f]{2})")
_UTF8_ADDR_ESCAPE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


def xtext_encode(value: str) -> str:
    """Encode `value` as xtext (RFC 3461 §4).

    Octets "!" to "~" stand for themselves, except "+" and "="; every other octet of the UTF-8 form
    becomes "+HH" with upper-case hexadecimal digits.
    """
    out: list[str] = []
    for octet in value.encode("utf-8"):
        if 0x21 <= octet <= 0x7E and octet not in (0x2B, 0x3D):
            out.append(chr(octet))
        else:
            out.append(f"+{octet:02X}")
    return "".join(out)


def xtext_decode(value: str) -> str:
    """Decode xtext (RFC 3461 §4); ValueError when `value` is not xtext.

    Only "!" to "~" may appear, "=" never, and "+" only as "+HH". Lower-case hex digits are accepted
    (liberal in what is read); the decoded octets must be UTF-8.
    """
    raw = bytearray()
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "+":
            m = _XTEXT_HEX.match(value, i)
            if m is None:
                raise ValueError("xtext: '+' must be followed by two hexadecimal digits (RFC 3461 §4)")
            raw.append(int(m.group(1), 16))
            i += 3
            continue
        if not "!" <= ch <= "~" or ch == "=":
            raise ValueError(f"xtext: character {ch!r} must be encoded as +HH (RFC 3461 §4)")
        raw.append(ord(ch))
        i += 1
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("xtext: decoded octets are not UTF-8") from None


def _utf8_addr_xtext(address: str) -> str:
    """utf-8-addr-xtext (RFC 6533 §3): QCHAR as is, anything else as \\x{HEX}."""
    out: list[str] = []
    for ch in address:
        if "!" <= ch <= "~" and ch not in "+=\\":
            out.append(ch)
        else:
            out.append(f"\\x{{{ord(ch):X}}}")
    return "".join(out)


def _utf8_addr_unescape(value: str) -> str:
    def repl(m: re.Match[str]) -> str:
        code = int(m.group(1), 16)
        if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
            raise ValueError("utf-8-addr-xtext: invalid code point (RFC 6533 §3)")
        return chr(code)

    return _UTF8_ADDR_ESCAPE.sub(repl, value)


# --------------------------------------------------------------------------------------------------
# RFC 3461 §4.1–4.4: the ESMTP parameters
# --------------------------------------------------------------------------------------------------


class Notify(enum.Enum):
    """NOTIFY keywords (RFC 3461 §4.1)."""

    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    DELAY = "DELAY"
    NEVER = "NEVER"


class Action(enum.Enum):
    """The Action of a recipient in a DSN (RFC 3464 §2.3.3)."""

    FAILED = "failed"
    DELAYED = "delayed"
    DELIVERED = "delivered"
    RELAYED = "relayed"
    EXPANDED = "expanded"


# RFC 3461 §4.1: with no NOTIFY parameter the MTA reports "FAILURE" or "FAILURE,DELAY" at its discretion.
# We choose FAILURE,DELAY: a sender of health documents must learn that a message is held up, not only
# that it finally failed days later.
DEFAULT_NOTIFY: frozenset[Notify] = frozenset({Notify.FAILURE, Notify.DELAY})

# Which NOTIFY keyword asks for a report of each action (RFC 3461 §4.1, §6.2: "relayed" and "expanded"
# reports are success reports, sent only when SUCCESS was requested).
_NOTIFY_FOR_ACTION = {
    Action.FAILED: Notify.FAILURE,
    Action.DELAYED: Notify.DELAY,
    Action.DELIVERED: Notify.SUCCESS,
    Action.RELAYED: Notify.SUCCESS,
    Action.EXPANDED: Notify.SUCCESS,
}


def parse_notify(value: str) -> frozenset[Notify]:
    """Parse a NOTIFY value (RFC 3461 §4.1): "NEVER" alone, or a list of SUCCESS, FAILURE, DELAY.

    Keywords are case-insensitive. ValueError on an empty element, an unknown keyword, or NEVER
    combined with anything else.
    """
    items: set[Notify] = set()
    for part in value.split(","):
        word = part.strip().upper()
        try:
            items.add(Notify(word))
        except ValueError:
            raise ValueError(f"NOTIFY: unknown keyword {part.strip()!r} (RFC 3461 §4.1)") from None
    if Notify.NEVER in items and len(items) > 1:
        raise ValueError("NOTIFY: NEVER must appear alone (RFC 3461 §4.1)")
    return frozenset(items)


def should_report(notify: frozenset[Notify] | None, action: Action) -> bool:
    """Whether a DSN is due for `action`, given the recipient's NOTIFY (RFC 3461 §4.1).

    `None` means the RCPT had no NOTIFY parameter: RFC 3461 §4.1 leaves "FAILURE" or "FAILURE,DELAY"
    to the MTA; this server applies FAILURE,DELAY (see `DEFAULT_NOTIFY`), never SUCCESS.
    """
    wanted = DEFAULT_NOTIFY if notify is None else notify
    if Notify.NEVER in wanted:
        return False
    return _NOTIFY_FOR_ACTION[action] in wanted


def never_report_to(reverse_path: str) -> bool:
    """True for the null reverse-path: no report is ever sent to it (RFC 5321 §4.5.5, RFC 3461 §6.2).

    Accepts the path with or without its angle brackets ("" or "<>").
    """
    return reverse_path.strip() in ("", "<>")


_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+$")  # RFC 5322 §3.2.3 atext


def parse_orcpt(value: str) -> tuple[str, str]:
    """Parse an ORCPT value "addr-type;xtext" (RFC 3461 §4.2) into (address type, decoded address).

    The address type is returned in lower case ("rfc822", "utf-8"). For the utf-8 type the
    \\x{HEX} escapes of RFC 6533 §3 are decoded too. ValueError when the value is malformed or longer
    than 500 characters (RFC 3461 §4.2).
    """
    if len(value) > 500:
        raise ValueError("ORCPT longer than 500 characters (RFC 3461 §4.2)")
    addr_type, sep, encoded = value.partition(";")
    addr_type = addr_type.strip()
    if not sep or not _ATOM.match(addr_type):
        raise ValueError("ORCPT must be addr-type;xtext (RFC 3461 §4.2)")
    address = xtext_decode(encoded.strip())
    if addr_type.lower() == "utf-8":
        address = _utf8_addr_unescape(address)
    if not address:
        raise ValueError("ORCPT carries an empty address (RFC 3461 §4.2)")
    return addr_type.lower(), address


def format_orcpt(address: str, addr_type: str = "rfc822") -> str:
    """Format an ORCPT value (RFC 3461 §4.2) from a plain address.

    An address that is not US-ASCII is given the "utf-8" type with RFC 6533 §3 escapes.
    """
    if not _ATOM.match(addr_type):
        raise ValueError("ORCPT address type must be an atom (RFC 3461 §4.2)")
    if not address or any(ch in address for ch in "\r\n"):
        raise ValueError("ORCPT needs a single-line, non-empty address")
    if not address.isascii():
        return "utf-8;" + xtext_encode(_utf8_addr_xtext(address))
    return f"{addr_type.lower()};{xtext_encode(address)}"


def validate_envid(value: str) -> str:
    """Check an ENVID value (RFC 3461 §4.4) and return it decoded.

    It must be xtext decoding to 1–100 printable US-ASCII characters; ValueError otherwise.
    """
    decoded = xtext_decode(value)
    if not 1 <= len(decoded) <= 100:
        raise ValueError("ENVID must be 1 to 100 characters (RFC 3461 §4.4)")
    if not all(" " <= ch <= "~" for ch in decoded):
        raise ValueError("ENVID must be printable US-ASCII (RFC 3461 §4.4)")
    return decoded


def validate_ret(value: str) -> Literal["FULL", "HDRS"]:
    """Check a RET value (RFC 3461 §4.3), case-insensitively; returns "FULL" or "HDRS"."""
    word = value.strip().upper()
    if word == "FULL":
        return "FULL"
    if word == "HDRS":
        return "HDRS"
    raise ValueError("RET must be FULL or HDRS (RFC 3461 §4.3)")


# --------------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------------

_STATUS = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")  # RFC 3463 §2
_STATUS_CLASS = {
    Action.FAILED: "5",
    Action.DELAYED: "4",
    Action.DELIVERED: "2",
    Action.RELAYED: "2",
    Action.EXPANDED: "2",
}
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$)(?:{_LABEL}(?:\.{_LABEL})*\.?|\[[0-9A-Fa-f:.]{{2,45}}\])$")


@dataclass(frozen=True)
class RecipientStatus:
    """What became of one recipient: the input of `build_dsn` (RFC 3464 §2.3).

    `original_recipient` is the ORCPT parameter exactly as the client gave it ("rfc822;" + xtext);
    `diagnostic` is "diagnostic-type; text" such as "smtp; 550 5.1.1 no such user" (RFC 3464 §2.3.6).
    Datetimes must be timezone-aware. ValueError when `status` is not an RFC 3463 code of the class that
    `action` implies (5 for failed, 4 for delayed, 2 otherwise; RFC 3464 §2.3.4).
    """

    final_recipient: str
    action: Action
    status: str
    original_recipient: str | None = None
    diagnostic: str | None = None
    remote_mta: str | None = None
    last_attempt: datetime | None = None
    will_retry_until: datetime | None = None

    def __post_init__(self) -> None:
        _check_mailbox(self.final_recipient, "final_recipient", ascii_only=False)
        m = _STATUS.match(self.status)
        if m is None:
            raise ValueError(f"status {self.status!r} is not an RFC 3463 code such as 5.1.1")
        if m.group(1) != _STATUS_CLASS[self.action]:
            raise ValueError(f"status {self.status} does not fit action {self.action.value} (RFC 3464 §2.3.4)")
        if self.original_recipient is not None:
            parse_orcpt(self.original_recipient)
        if self.remote_mta is not None and not _HOSTNAME.match(self.remote_mta):
            raise ValueError(f"remote_mta {self.remote_mta!r} is not a host name")
        for name in ("last_attempt", "will_retry_until"):
            value = getattr(self, name)
            if value is not None and value.utcoffset() is None:
                raise ValueError(f"{name} must be timezone-aware")


@dataclass(frozen=True)
class DsnRecipient:
    """One per-recipient group of a received DSN (RFC 3464 §2.3), as far as the report told.

    Addresses are given without their address type. `action` is inferred from the Status class when the
    report has no Action field (seen from Exchange); it is None when neither is given.
    """

    final_recipient: str | None
    original_recipient: str | None
    action: Action | None
    status: str | None
    diagnostic: str | None
    remote_mta: str | None = None
    last_attempt: datetime | None = None
    will_retry_until: datetime | None = None
    extension_fields: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class DsnReport:
    """A received delivery-status report (RFC 3464 §2.2 per-message fields and the recipient groups).

    `original_message_id` comes from the returned headers or message, else from the report's
    In-Reply-To; `reporting_mta` is the MTA name without its type ("dns;").
    """

    reporting_mta: str | None
    original_envelope_id: str | None
    arrival_date: datetime | None
    original_message_id: str | None
    recipients: tuple[DsnRecipient, ...]


# --------------------------------------------------------------------------------------------------
# Shared building blocks (also used by mailserver.mdn)
# --------------------------------------------------------------------------------------------------

_LINE_END = re.compile(rb"\r\n|\r|\n")
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_FOLDING = re.compile(r"\r?\n[ \t]+")
_NEWLINE = re.compile(r"\r\n|\r|\n")
_MSG_ID = re.compile(r"<[^<>\s\x00-\x1f\x7f]+>")
_Q_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")  # RFC 2047 §5(3)
_DIAG_TYPE = re.compile(r"^[A-Za-z][A-Za-z0-9-]*\s*;")
_MAX_TOKEN = 900
_MAX_NESTING = 8
_NOT_TEXT = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_SPACES = re.compile(r" {2,}")


def _crlf(data: bytes) -> bytes:
    """Every line ending as CRLF (RFC 5322 §2.1)."""
    return _LINE_END.sub(b"\r\n", data)


def _split_message(data: bytes) -> tuple[bytes, bytes]:
    """(header block including its last line ending, body) of a message; tolerant of LF-only input."""
    if data.startswith((b"\r\n", b"\n")):
        return b"", data[2:] if data.startswith(b"\r\n") else data[1:]
    m = _HEADER_END.search(data)
    if m is None:
        return data, b""
    newline = data[m.start():m.end()].find(b"\n") + 1
    return data[: m.start() + newline], data[m.end():]


def _decode_octets(value: bytes | str) -> str:
    """Header octets as text: UTF-8 (RFC 6532), anything else replaced."""
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    return value.decode("utf-8", "replace")


def _unfold(value: str) -> str:
    """RFC 5322 §2.2.3 unfolding, each fold's white space kept as one space; outer white space removed."""
    return _FOLDING.sub(" ", value).replace("\r", "").replace("\n", "").strip()


def _header_fields(header: bytes) -> list[tuple[str, str]]:
    """(name, unfolded value) of each field of a header block; lines that are no field are skipped.

    White space before the colon is tolerated (RFC 5322 §4.5, obsolete syntax)."""
    fields: list[tuple[str, str]] = []
    name: str | None = None
    parts: list[str] = []
    for line in _NEWLINE.split(_decode_octets(header)):
        if line[:1] in (" ", "\t") and name is not None:
            parts.append(line.strip())
            continue
        if name is not None:
            fields.append((name, " ".join(p for p in parts if p)))
        name, sep, value = line.partition(":")
        name = name.rstrip(" \t")
        if not sep or not name or any(not "!" <= c <= "~" for c in name):
            name, parts = None, []
            continue
        parts = [value.strip()]
    if name is not None:
        fields.append((name, " ".join(p for p in parts if p)))
    return fields


def _field(fields: Iterable[tuple[str, str]], name: str) -> str | None:
    """The first value of field `name` (case-insensitive)."""
    key = name.lower()
    for n, v in fields:
        if n.lower() == key:
            return v
    return None


def _fields_named(fields: Iterable[tuple[str, str]], name: str) -> list[str]:
    key = name.lower()
    return [v for n, v in fields if n.lower() == key]


def _decode_words(value: str) -> str:
    """RFC 2047 decoding of an unstructured value; undecodable words are kept as written. Linear time
    (mailserver.headers): the stdlib decoder is quadratic in the number of encoded words."""
    return decode_encoded_words(value)


def _clean_text(value: str) -> str:
    """One line of text: control, format and line-separator characters become spaces, runs of spaces
    and tabs become one space, outer spaces go. Other spaces (such as U+00A0) are kept."""
    chars = [" " if unicodedata.category(ch) in _NOT_TEXT else ch for ch in value]
    return _SPACES.sub(" ", "".join(chars)).strip(" ")


def _ascii_text(value: str) -> str:
    """Single-line printable US-ASCII for a report field: other characters become "?" and words longer
    than a line allows are cut."""
    text = _clean_text(value)
    text = "".join(ch if " " <= ch <= "~" else "?" for ch in text)
    return " ".join(word[:_MAX_TOKEN] for word in text.split(" "))


def _fold(name: str, value: str, width: int = _FOLD_AT) -> str:
    """One header field folded at spaces (RFC 5322 §2.2.3) to at most `width` characters a line where
    the words allow it (78 by default, the SHOULD of §2.1.1); ValueError if a line would pass 998."""
    line = name + ":"
    lines: list[str] = []
    for word in value.split():
        if len(line) + 1 + len(word) > width and line != name + ":":
            lines.append(line)
            line = " " + word
        else:
            line += " " + word
    lines.append(line)
    if any(len(ln) > _MAX_LINE for ln in lines):
        raise ValueError(f"{name}: a word is too long for a header line (RFC 5322 §2.1.1)")
    return _CRLF.join(lines)


def _q_word(text: str, room: int) -> tuple[str, str]:
    """The longest RFC 2047 Q encoded-word of at most `room` characters from the start of `text`,
    whole characters only (RFC 2047 §5); returns (word, rest)."""
    budget = room - len("=?utf-8?q??=")
    encoded: list[str] = []
    used = 0
    taken = 0
    for ch in text:
        if ch in _Q_SAFE:
            piece = ch
        elif ch == " ":
            piece = "_"
        else:
            piece = "".join(f"={octet:02X}" for octet in ch.encode("utf-8"))
        if used + len(piece) > budget and encoded:
            break
        encoded.append(piece)
        used += len(piece)
        taken += 1
    return "=?utf-8?q?" + "".join(encoded) + "?=", text[taken:]


def _fold_text(name: str, text: str) -> str:
    """An unstructured field (or a display name) with `text` kept exactly: plain when it is printable
    US-ASCII that cannot be mistaken for encoded words, else RFC 2047 encoded words of at most 75
    characters, lines of at most 76 (RFC 2047 §2)."""
    text = _clean_text(text)
    words = text.split(" ")
    if text.isascii() and "=?" not in text and all(len(w) <= _MAX_TOKEN for w in words):
        return _fold(name, text)
    lines: list[str] = []
    rest = text
    room = 76 - len(name) - 2
    while rest:
        word, rest = _q_word(rest, room)
        lines.append(word)
        room = 75
    return name + ": " + (_CRLF + " ").join(lines)


def _qp(text: str) -> str:
    """UTF-8 text as quoted-printable (RFC 2045 §6.7) with CRLF, lines of at most 76 characters."""
    body = _CRLF.join(_NEWLINE.split(text))
    return quoprimime.body_encode(body.encode("utf-8").decode("latin-1"), maxlinelen=76, eol=_CRLF)


def _seven_bit_clean(data: bytes) -> bool:
    """US-ASCII without NUL, CRLF line endings only, lines within 998 octets (RFC 2045 §2.7)."""
    if not data.isascii() or b"\x00" in data:
        return False
    if re.search(rb"\r(?!\n)|(?<!\r)\n", data):
        return False
    return all(len(line) <= _MAX_LINE for line in data.split(b"\r\n"))


def _new_message_id(domain: str) -> str:
    """A fresh msg-id (RFC 5322 §3.6.4) in `domain`."""
    if not _HOSTNAME.match(domain) or domain.startswith("["):
        raise ValueError(f"message_id_domain {domain!r} is not a domain name")
    return f"<{int(time.time())}.{secrets.token_hex(12)}@{domain.rstrip('.')}>"


def _check_mailbox(address: str, what: str, *, ascii_only: bool = True) -> str:
    """An addr-spec as a plain, single-line value; ValueError otherwise."""
    if not address or "@" not in address:
        raise ValueError(f"{what}: {address!r} is not a mail address")
    if any(ch.isspace() or ch in "<>," or unicodedata.category(ch)[0] == "C" for ch in address):
        raise ValueError(f"{what}: {address!r} is not a plain mail address")
    if ascii_only and not address.isascii():
        raise ValueError(f"{what}: {address!r} is not US-ASCII; a 7bit report cannot carry it")
    return address


def _typed_address(address: str) -> str:
    """An address for a report field with its type: "rfc822;" or, beyond US-ASCII, "utf-8;" with RFC 6533
    §3 escapes."""
    if address.isascii():
        return "rfc822;" + address
    return "utf-8;" + _utf8_addr_xtext(address)


def _format_date(value: datetime, what: str) -> str:
    """RFC 5322 §3.3 date-time of an aware datetime."""
    if value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware")
    return format_datetime(value)


def _parse_date(value: str | None) -> datetime | None:
    """An RFC 5322 date-time; None when absent or unreadable. "-0000" is read as UTC."""
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=timezone.utc)


def _clean_msg_id(value: str | None) -> str | None:
    """The first well-formed "<...>" msg-id of a field, for In-Reply-To and References."""
    if not value:
        return None
    m = _MSG_ID.search(value)
    if m is None or len(m.group(0)) > _MAX_TOKEN or not m.group(0).isascii():
        return None
    return m.group(0)


def _original_headers_part(original: bytes) -> tuple[list[str], bytes]:
    """The original's header block as a text/rfc822-headers part (RFC 6522 §4): 7bit when it is clean,
    quoted-printable otherwise (8-bit or over-long lines)."""
    header, _ = _split_message(original)
    header = _crlf(header)
    if header and not header.endswith(b"\r\n"):
        header += b"\r\n"
    if _seven_bit_clean(header):
        return ["Content-Type: text/rfc822-headers"], header
    encoded = quoprimime.body_encode(header.decode("latin-1"), maxlinelen=76, eol=_CRLF)
    if not encoded.endswith(_CRLF):
        encoded += _CRLF
    return (["Content-Type: text/rfc822-headers", "Content-Transfer-Encoding: quoted-printable"],
            encoded.encode("ascii"))


def _original_message_part(original: bytes) -> tuple[list[str], bytes] | None:
    """The whole original as message/rfc822, or None when it is not 7bit-clean (a message/rfc822 part
    may not be re-encoded, RFC 2046 §5.2.1)."""
    body = _crlf(original)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    if not _seven_bit_clean(body):
        return None
    return ["Content-Type: message/rfc822"], body


def _assemble_report(
    top: Sequence[str], report_type: str, parts: Sequence[tuple[Sequence[str], bytes]]
) -> bytes:
    """A multipart/report message (RFC 6522 §3) from folded top-level fields and (part header lines,
    part body) pairs. The boundary is random and checked against every part; the CRLF before each
    delimiter belongs to the delimiter (RFC 2046 §5.1.1)."""
    while True:
        boundary = "=_" + secrets.token_hex(16)  # "=_" cannot occur in quoted-printable text
        marker = ("--" + boundary).encode("ascii")
        if not any(marker in body for _, body in parts):
            break
    out = [
        _CRLF.join(top).encode("ascii"),
        b"\r\nMIME-Version: 1.0\r\n",
        f"Content-Type: multipart/report; report-type={report_type};\r\n"
        f'\tboundary="{boundary}"\r\n'.encode("ascii"),
        b"Content-Transfer-Encoding: 7bit\r\n\r\n",
        b"This is a MIME-encapsulated message.\r\n",
    ]
    for headers, body in parts:
        out.append(b"\r\n" + marker + b"\r\n" + _CRLF.join(headers).encode("ascii") + b"\r\n\r\n" + body)
    out.append(b"\r\n" + marker + b"--\r\n")
    return b"".join(out)


def _parse_message(data: bytes) -> Message | None:
    """The message parsed by the standard library (compat32: raw header values), or None when even that
    tolerant parser gives up (deep nesting)."""
    try:
        return BytesParser(policy=email_policy.compat32).parsebytes(data)
    except (MessageError, ValueError, LookupError, IndexError, RecursionError):
        return None


def _payload(msg: Message) -> object:
    """`msg.get_payload()`, or None when the standard library cannot give it: for a non-ASCII text payload
    it decodes with the declared charset and catches only LookupError, so a charset holding a NUL or naming
    "idna" raised ValueError out of the parser (found by tests/fuzz)."""
    try:
        return msg.get_payload()
    except ValueError:
        return None


def _header_message(data: bytes) -> Message | None:
    """The header block alone, parsed by the standard library."""
    header, _ = _split_message(data)
    try:
        return BytesHeaderParser(policy=email_policy.compat32).parsebytes(header + b"\r\n")
    except (MessageError, ValueError, LookupError, IndexError):  # pragma: no cover - stdlib is tolerant
        return None


def _find_report(msg: Message, report_types: frozenset[str], depth: int = 0) -> Message | None:
    """The first multipart/report of one of `report_types` in `msg` or its multipart containers
    (a signed report, a report inside multipart/mixed), at most `_MAX_NESTING` levels down; never inside
    an attached message."""
    if msg.get_content_type() == "multipart/report":
        kind = str(msg.get_param("report-type", "") or "").strip().lower()
        if kind in report_types:
            return msg
    if depth < _MAX_NESTING and msg.is_multipart() and msg.get_content_maintype() == "multipart":
        payload = _payload(msg)
        if isinstance(payload, list):
            for part in payload:
                if isinstance(part, Message):
                    found = _find_report(part, report_types, depth + 1)
                    if found is not None:
                        return found
    return None


def _raw_fields(msg: Message) -> list[tuple[str, str]]:
    return [(name, _unfold(_decode_octets(value))) for name, value in msg.raw_items()]


def _report_blocks(part: Message) -> list[list[tuple[str, str]]]:
    """The groups of fields of a message/delivery-status or message/disposition-notification part
    (RFC 3464 §2.1, RFC 8098 §3.1), whichever way the parser saw them.

    Fields written without the blank line after the part's Content-Type land among the part's own
    header fields: they are taken as a first group. Empty groups (extra blank lines) are dropped.
    """
    blocks: list[list[tuple[str, str]]] = []
    own = [(n, v) for n, v in _raw_fields(part)
           if not n.lower().startswith("content-") and n.lower() != "mime-version"]
    if own:
        blocks.append(own)
    payload = _payload(part)
    if isinstance(payload, list):
        for sub in payload:
            if not isinstance(sub, Message):
                continue
            fields = _raw_fields(sub)
            if fields:
                blocks.append(fields)
            rest = _payload(sub)
            if isinstance(rest, str) and rest.strip():
                blocks.extend(_text_blocks(rest.encode("utf-8", "surrogateescape")))
    else:
        decoded = part.get_payload(decode=True)
        if isinstance(decoded, bytes):
            blocks.extend(_text_blocks(decoded))
    return [b for b in blocks if b]


def _text_blocks(data: bytes) -> list[list[tuple[str, str]]]:
    """Groups of fields separated by blank lines."""
    text = _crlf(data).decode("utf-8", "replace")
    return [fields for chunk in re.split(r"\r\n(?:[ \t]*\r\n)+", text)
            if (fields := _header_fields(chunk.encode("utf-8")))]


def _returned_message_id(report: Message, status_part: Message) -> str | None:
    """The Message-ID of the original returned after the status part (text/rfc822-headers,
    message/rfc822, or their RFC 6533 global forms)."""
    payload = _payload(report)
    if not isinstance(payload, list):
        return None
    after = False
    for part in payload:
        if part is status_part:
            after = True
            continue
        if not after or not isinstance(part, Message):
            continue
        ctype = part.get_content_type()
        if ctype in ("message/rfc822", "message/global"):
            inner = _payload(part)
            if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                value = _field(_raw_fields(inner[0]), "Message-ID")
                if value:
                    return value
        elif ctype in ("text/rfc822-headers", "message/global-headers"):
            decoded = part.get_payload(decode=True)
            if isinstance(decoded, bytes):
                value = _field(_header_fields(_crlf(decoded)), "Message-ID")
                if value:
                    return value
    return None


def _in_reply_to(*messages: Message) -> str | None:
    for msg in messages:
        value = _field(_raw_fields(msg), "In-Reply-To")
        if value:
            return _clean_msg_id(value) or value.split()[0]
    return None


def _address_of(value: str | None) -> str | None:
    """The address of a typed address field ("rfc822; a@b", "utf-8; ...", or an untyped "a@b")."""
    if not value:
        return None
    addr_type, sep, address = value.partition(";")
    if not sep:
        address, addr_type = value, "rfc822"
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    if addr_type.strip().lower() == "utf-8":
        with contextlib.suppress(ValueError):  # a bad escape: keep the address as written
            address = _utf8_addr_unescape(address)
    return address or None


# --------------------------------------------------------------------------------------------------
# Building a DSN
# --------------------------------------------------------------------------------------------------

_SUBJECTS = {
    Action.FAILED: "Avis de non-remise / Delivery Status Notification (Failure)",
    Action.DELAYED: "Remise différée / Delivery Status Notification (Delay)",
    Action.RELAYED: "Message relayé / Delivery Status Notification (Relayed)",
    Action.DELIVERED: "Accusé de réception / Delivery Status Notification (Success)",
    Action.EXPANDED: "Accusé de réception / Delivery Status Notification (Success)",
}
_SEVERITY = (Action.FAILED, Action.DELAYED, Action.RELAYED, Action.EXPANDED, Action.DELIVERED)

_INTRO_FR = {
    Action.DELIVERED: "Accusé de réception : votre message a été remis dans la boîte aux lettres de :",
    Action.EXPANDED: "Accusé de réception : votre message a été remis à la liste de diffusion suivante, "
                     "qui l'a redistribué à ses membres :",
    Action.RELAYED: "Votre message a été transmis, pour les destinataires suivants, à un serveur qui ne "
                    "fournit pas d'accusé de réception ; sa remise finale ne sera pas confirmée :",
    Action.DELAYED: "Remise différée : votre message n'a pas encore pu être remis aux destinataires "
                    "suivants. Vous n'avez rien à faire pour l'instant, de nouvelles tentatives ont lieu :",
    Action.FAILED: "Avis de non-remise : votre message n'a pas pu être remis aux destinataires suivants :",
}
_INTRO_EN = {
    Action.DELIVERED: "Delivery receipt: your message was delivered to the mailbox of:",
    Action.EXPANDED: "Delivery receipt: your message was delivered to the following mailing list, "
                     "which passed it on to its members:",
    Action.RELAYED: "Your message was relayed, for the following recipients, to a server that does not "
                    "send delivery notifications; final delivery will not be confirmed:",
    Action.DELAYED: "Delivery delayed: your message has not yet been delivered to the following "
                    "recipients. No action is needed yet; delivery is still being attempted:",
    Action.FAILED: "Delivery failure: your message could not be delivered to the following recipients:",
}


def _diagnostic_field(diagnostic: str) -> str:
    text = _ascii_text(diagnostic)
    return text if _DIAG_TYPE.match(text) else "smtp; " + text


def _human_dsn(
    recipients: Sequence[RecipientStatus], reporting_mta: str, message_id: str | None,
    arrival_date: datetime | None,
) -> str:
    """The human-readable part (RFC 6522 §3 first part): French, then English. It names recipients,
    status codes and the servers' replies; never a word of the original's body."""
    fr: list[str] = [f"Ceci est un message automatique du serveur de messagerie {reporting_mta}.", ""]
    en: list[str] = [f"This is an automatic message from the mail server {reporting_mta}.", ""]
    if message_id:
        fr.append(f"Message concerné : {message_id}")
        en.append(f"Message: {message_id}")
    if arrival_date is not None:
        fr.append(f"Reçu le : {format_datetime(arrival_date)}")
        en.append(f"Received: {format_datetime(arrival_date)}")
    for action in _SEVERITY:
        group = [r for r in recipients if r.action is action]
        if not group:
            continue
        fr += ["", _INTRO_FR[action]]
        en += ["", _INTRO_EN[action]]
        for r in group:
            fr.append(f"  - {r.final_recipient} (statut {r.status})")
            en.append(f"  - {r.final_recipient} (status {r.status})")
            if r.diagnostic:
                reply = _ascii_text(r.diagnostic)
                reply = reply.split(";", 1)[1].strip() if _DIAG_TYPE.match(reply) else reply
                fr.append(f"    Réponse du serveur : {reply}")
                en.append(f"    Server reply: {reply}")
            if r.will_retry_until is not None:
                fr.append(f"    Nouvelles tentatives jusqu'au : {format_datetime(r.will_retry_until)}")
                en.append(f"    Will retry until: {format_datetime(r.will_retry_until)}")
    return "\r\n".join([*fr, "", "-" * 72, "", *en]) + "\r\n"


def _delivery_status(
    reporting_mta: str, envid: str | None, arrival_date: datetime | None,
    recipients: Sequence[RecipientStatus],
) -> bytes:
    """The message/delivery-status body (RFC 3464 §2.1): per-message fields, then one group per
    recipient, each group preceded by a blank line."""
    lines = [_fold("Reporting-MTA", "dns; " + reporting_mta)]  # RFC 3464 §2.2.2
    if envid is not None:  # RFC 3464 §2.2.1, decoded from xtext; 100 characters at most, never folded
        lines.append(f"Original-Envelope-Id: {envid}")
    if arrival_date is not None:
        lines.append(_fold("Arrival-Date", _format_date(arrival_date, "arrival_date")))  # §2.2.5
    for r in recipients:
        lines.append("")
        if r.original_recipient is not None:  # RFC 3464 §2.3.1, from ORCPT (RFC 3461 §4.2)
            addr_type, address = parse_orcpt(r.original_recipient)
            if addr_type == "rfc822" and all("!" <= ch <= "~" for ch in address):
                lines.append(_fold("Original-Recipient", "rfc822;" + address))
            else:  # not printable US-ASCII once decoded: keep the encoded form
                lines.append(_fold("Original-Recipient", r.original_recipient))
        lines.append(_fold("Final-Recipient", _typed_address(r.final_recipient)))  # RFC 3464 §2.3.2
        lines.append(f"Action: {r.action.value}")  # RFC 3464 §2.3.3
        lines.append(f"Status: {r.status}")  # RFC 3464 §2.3.4
        if r.remote_mta is not None:
            lines.append(_fold("Remote-MTA", "dns; " + r.remote_mta))  # RFC 3464 §2.3.5
        if r.diagnostic:
            lines.append(_fold("Diagnostic-Code", _diagnostic_field(r.diagnostic)))  # RFC 3464 §2.3.6
        if r.last_attempt is not None:
            lines.append(_fold("Last-Attempt-Date", _format_date(r.last_attempt, "last_attempt")))  # §2.3.7
        if r.will_retry_until is not None:  # RFC 3464 §2.3.9, delayed reports only
            lines.append(_fold("Will-Retry-Until", _format_date(r.will_retry_until, "will_retry_until")))
    return (_CRLF.join(lines) + _CRLF).encode("ascii")


def build_dsn(
    *,
    original: bytes,
    reporting_mta: str,
    postmaster: str,
    to: str,
    envid: str | None,
    ret: str | None,
    arrival_date: datetime | None,
    recipients: Sequence[RecipientStatus],
    message_id_domain: str,
) -> bytes:
    """Build a delivery status notification (RFC 3464 in an RFC 6522 multipart/report).

    - `original`: the message reported on, as queued.
    - `reporting_mta`: this server's host name (Reporting-MTA: dns; …).
    - `postmaster`: the From: address, such as "mailer-daemon@domain".
    - `to`: the original reverse-path, without angle brackets; the report goes there. The null path is
      refused (`never_report_to`).
    - `envid`: the ENVID parameter as the client gave it (xtext, RFC 3461 §4.4); it is decoded for the
      Original-Envelope-Id field.
    - `ret`: "FULL", "HDRS" or None (RFC 3461 §4.3). The third part is the original's header block
      (text/rfc822-headers) unless RET=FULL, which returns the whole message as message/rfc822 for a
      failure, and for other reports only up to `FULL_RETURN_LIMIT` octets. A message that is not
      7bit-clean is always returned as headers: message/rfc822 cannot be re-encoded (RFC 2046 §5.2.1).
    - `arrival_date`, and the datetimes of `recipients`: timezone-aware.

    The Subject and the human-readable part follow the most serious action reported (failure, then
    delay, then relayed, then success). Returns the message with CRLF line endings, 7bit, every line
    within 998 octets. ValueError on an argument that cannot be put in such a report.
    """
    if never_report_to(to):
        raise ValueError("no report is sent to the null reverse-path (RFC 3461 §6.2)")
    _check_mailbox(to, "to")
    _check_mailbox(postmaster, "postmaster")
    if not _HOSTNAME.match(reporting_mta):
        raise ValueError(f"reporting_mta {reporting_mta!r} is not a host name")
    if not recipients:
        raise ValueError("a DSN reports on at least one recipient (RFC 3464 §2.1)")
    envelope_id = validate_envid(envid) if envid is not None else None
    ret_value = validate_ret(ret) if ret is not None else None
    if arrival_date is not None:
        _format_date(arrival_date, "arrival_date")

    header, _ = _split_message(original)
    original_fields = _header_fields(header)
    original_id = _field(original_fields, "Message-ID")
    parent = _clean_msg_id(original_id)
    worst = next(a for a in _SEVERITY if any(r.action is a for r in recipients))

    top = [
        _fold("From", f"Serveur de messagerie / Mail Delivery System <{postmaster}>"),
        _fold("To", to),
        _fold_text("Subject", _SUBJECTS[worst]),
        _fold("Date", format_datetime(datetime.now(timezone.utc))),
        _fold("Message-ID", _new_message_id(message_id_domain)),
    ]
    if parent is not None:  # RFC 5322 §3.6.4
        top += [_fold("In-Reply-To", parent), _fold("References", parent)]
    top.append("Auto-Submitted: auto-replied")  # RFC 3834 §5: a response to a message

    human = _qp(_human_dsn(recipients, reporting_mta, _clean_msg_id(original_id), arrival_date))
    parts: list[tuple[Sequence[str], bytes]] = [
        (["Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: quoted-printable",
          "Content-Description: Notification"], human.encode("ascii")),
        (["Content-Type: message/delivery-status", "Content-Description: Delivery report"],
         _delivery_status(reporting_mta, envelope_id, arrival_date, recipients)),
    ]
    returned: tuple[list[str], bytes] | None = None
    if ret_value == "FULL" and (worst is Action.FAILED or len(original) <= FULL_RETURN_LIMIT):
        returned = _original_message_part(original)
    if returned is None:
        returned = _original_headers_part(original)
        returned[0].append("Content-Description: Headers of the original message")
    else:
        returned[0].append("Content-Description: Original message")
    parts.append(returned)
    return _assemble_report(top, "delivery-status", parts)


# --------------------------------------------------------------------------------------------------
# Reading a DSN
# --------------------------------------------------------------------------------------------------

_DSN_TYPES = frozenset({"delivery-status", "global-delivery-status"})
_DSN_PARTS = ("message/delivery-status", "message/global-delivery-status")
_RECIPIENT_FIELDS = frozenset({"final-recipient", "original-recipient", "action", "status"})
_KNOWN_RECIPIENT_FIELDS = _RECIPIENT_FIELDS | {
    "remote-mta", "diagnostic-code", "last-attempt-date", "will-retry-until", "final-log-id",
}
_STATUS_IN_TEXT = re.compile(r"^\s*([245]\.\d{1,3}\.\d{1,3})\b")
_ACTION_FOR_CLASS = {"5": Action.FAILED, "4": Action.DELAYED, "2": Action.DELIVERED}


def _mta_name(value: str | None) -> str | None:
    if not value:
        return None
    _, sep, name = value.partition(";")
    return (name if sep else value).strip() or None


def _recipient(fields: list[tuple[str, str]]) -> DsnRecipient:
    status_text = _field(fields, "Status")
    m = _STATUS_IN_TEXT.match(status_text or "")
    status = m.group(1) if m else None
    action_text = (_field(fields, "Action") or "").split("(")[0].strip().lower()
    try:
        action: Action | None = Action(action_text)
    except ValueError:
        action = _ACTION_FOR_CLASS.get(status[0]) if status else None
    return DsnRecipient(
        final_recipient=_address_of(_field(fields, "Final-Recipient")),
        original_recipient=_address_of(_field(fields, "Original-Recipient")),
        action=action,
        status=status,
        diagnostic=" ".join((_field(fields, "Diagnostic-Code") or "").split()) or None,
        remote_mta=_mta_name(_field(fields, "Remote-MTA")),
        last_attempt=_parse_date(_field(fields, "Last-Attempt-Date")),
        will_retry_until=_parse_date(_field(fields, "Will-Retry-Until")),
        extension_fields=tuple((n, v) for n, v in fields if n.lower() not in _KNOWN_RECIPIENT_FIELDS),
    )


def parse_dsn(data: bytes) -> DsnReport | None:
    """Read a delivery status notification (RFC 3464, RFC 6522); None if `data` is not one.

    Tolerant of what real MTAs send: per-message fields and recipient groups told apart by their fields
    rather than by position (extra blank lines), fields without a space after the colon, reports with no
    Status or no Action, a delivery-status part whose fields follow its Content-Type without a blank line.
    """
    msg = _parse_message(data)
    if msg is None:
        return None
    report = _find_report(msg, _DSN_TYPES)
    if report is None:
        return None
    payload = _payload(report)
    status_part = next((p for p in payload if isinstance(p, Message) and p.get_content_type() in _DSN_PARTS),
                       None) if isinstance(payload, list) else None
    if status_part is None:
        return None
    per_message: list[tuple[str, str]] = []
    recipients: list[DsnRecipient] = []
    for block in _report_blocks(status_part):
        if any(n.lower() in _RECIPIENT_FIELDS for n, _ in block):
            recipients.append(_recipient(block))
        elif not recipients:
            per_message.extend(block)
    envid = _field(per_message, "Original-Envelope-Id")
    return DsnReport(
        reporting_mta=_mta_name(_field(per_message, "Reporting-MTA")),
        original_envelope_id=envid or None,
        arrival_date=_parse_date(_field(per_message, "Arrival-Date")),
        original_message_id=_returned_message_id(report, status_part) or _in_reply_to(report, msg),
        recipients=tuple(recipients),
    )
