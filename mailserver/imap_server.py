"""IMAP access to the mailbox store, authenticated by client certificate only.

Implements IMAP4rev1 (RFC 3501) on top of Twisted's ``IMAP4Server`` running on the asyncio reactor,
with these extensions: IDLE (RFC 2177), NAMESPACE (RFC 2342), CHILDREN (RFC 3348), UNSELECT
(RFC 3691), UIDPLUS (RFC 4315), SASL-IR (RFC 4959), ENABLE (RFC 5161), MOVE (RFC 6851), ID
(RFC 2971), APPENDLIMIT (RFC 7889) and the response codes of RFC 5530.  The only authentication is
SASL EXTERNAL (RFC 4422 Appendix A) over TLS (RFC 8314 implicit TLS or RFC 3501 §6.2.1 STARTTLS); LOGIN
is always disabled (RFC 3501 §7.2.1 LOGINDISABLED).

Layout:

* pure parts (no I/O): wire encoding, sequence sets, the FETCH and SEARCH parsers, a raw MIME tree that
  keeps every part's exact bytes, ENVELOPE / BODYSTRUCTURE builders and the SEARCH evaluator;
* Twisted model objects (``IAccount``, ``IMailbox``, ``IMessage`` ...) over :class:`MailStore`;
* :class:`IMAPServer`, the ``IMAP4Server`` subclass that gathers every fix of Twisted's defects in one
  place (each one commented with what it fixes), and :func:`build_imap_factory`.

Messages are served byte for byte as stored: header blocks and MIME parts are sliced out of the
stored bytes rather than re-serialised, so DKIM signatures and archival hashes stay valid.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import codecs
import datetime as dt
import email.header
import email.message
import email.policy
import email.utils
import functools
import hashlib
import io
import logging
import quopri
import re
import secrets
import urllib.parse
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import (
    Any,
    Awaitable,
    Callable,
    ClassVar,
    Iterable,
    Iterator,
    Protocol,
    Sequence,
    TypeVar,
    Union,
    cast,
)

from twisted.internet import defer, interfaces, protocol
from twisted.internet.defer import Deferred
from twisted.mail import imap4
from twisted.python.failure import Failure
from zope.interface import implementer

from crypto.tls import twisted_peer_certificate_der
from mailserver.audit_api import AuditEvent, AuditSink
from mailserver.headers import (
    MAX_COMMENT_DEPTH,
    comment_depth,
    decode_encoded_words,
    strip_comments,
)
from mailserver.store_api import FlagMode, FolderInfo, MailStore, StoredMessage

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# ---------------------------------------------------------------------------------------------------------
# Public types
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImapLogin:
    """The outcome of a successful AUTHENTICATE EXTERNAL."""

    mailbox_id: int  # the directory mailbox (BAL) this session opens
    address: str  # its address
    principal: str  # national id of the authenticated person/organisation (for audit)


class ImapAuthenticator(Protocol):
    """Maps a TLS client certificate and a SASL authorization identity to a mailbox.

    ``cert_der`` is the DER encoding of the peer certificate (``None`` when the client sent none);
    ``authzid`` is the SASL EXTERNAL authorization identity (RFC 4422 Appendix A), ``""`` when the client
    asked for the identity derived from its certificate.  Returns ``None`` to refuse.
    """

    def __call__(self, cert_der: bytes | None, authzid: str) -> Awaitable[ImapLogin | None]: ...


# ---------------------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------------------

DEFAULT_MAX_APPEND_SIZE = 10 * 1024 * 1024
DELIMITER = "/"
SERVER_NAME = "Caducée"

SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
_SYSTEM_FLAGS_BY_LOWER = {f.lower(): f for f in SYSTEM_FLAGS}
SEEN = "\\Seen"
DELETED = "\\Deleted"
RECENT = "\\Recent"

MAX_LINE_LENGTH = 64 * 1024  # RFC 7162 §4 recommends accepting command lines of at least 8192 octets
MAX_STRING_LITERAL = 64 * 1024  # literals inside commands other than APPEND
MAX_LITERALS_PER_COMMAND = 32
MAX_AUTH_FAILURES = 3
MAX_SEARCH_DEPTH = 32
MAX_MIME_DEPTH = 24
MAX_MIME_PARTS = 1000
MAX_FETCH_ITEMS = 64
PARSE_CACHE_ENTRIES = 64
PARSE_CACHE_BYTES = 16 * 1024 * 1024  # per session
SEARCH_BATCH = 64  # messages evaluated between two returns to the reactor
# Messages read from the store at a time while a FETCH response is streamed: few enough that a batch's
# objects are freed before CPython's first garbage-collector generation fills (700 allocations), so a
# listing of a large folder triggers no collection and promotes nothing to the older generations.
FETCH_BATCH = 200
_NO_CONTENT = frozenset({"UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE"})  # fetch-atts the rows answer
_MAX_NUMBER = 4294967295  # RFC 3501 §9 number / nz-number

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH_NUMBER = {m.lower(): i + 1 for i, m in enumerate(_MONTHS)}

# RFC 3501 §9: ATOM-CHAR is any CHAR except atom-specials; ASTRING-CHAR adds "]"; a tag is any
# ASTRING-CHAR except "+"; list-mailbox also allows the list-wildcards "%" and "*".
_ATOM_SPECIALS = b'(){%*"\\]'
_ATOM_CHARS = bytes(c for c in range(0x21, 0x7F) if c not in _ATOM_SPECIALS)
_ATOM_RE = re.compile(b"[" + re.escape(_ATOM_CHARS) + b"]+")
_ASTRING_ATOM_RE = re.compile(b"[" + re.escape(_ATOM_CHARS + b"]") + b"]+")
_LIST_ATOM_RE = re.compile(b"[" + re.escape(_ATOM_CHARS + b"]%*") + b"]+")
_TAG_RE = re.compile(b"[" + re.escape((_ATOM_CHARS + b"]").replace(b"+", b"")) + b"]+")
_FLAG_RE = re.compile(b"\\\\?[" + re.escape(_ATOM_CHARS) + b"]+")
_QUOTABLE_RE = re.compile(rb"[\x01-\x09\x0b\x0c\x0e-\x7f]*")
_LITERAL_MARKER_RE = re.compile(rb"\{([^{}]*)\}\Z")
_SYNC_LITERAL_RE = re.compile(rb"\d{1,10}")
_NONSYNC_LITERAL_RE = re.compile(rb"\d{1,10}\+")


# ---------------------------------------------------------------------------------------------------------
# Errors carried to the client
# ---------------------------------------------------------------------------------------------------------


class CommandError(Exception):
    """A tagged completion with public text (RFC 3501 §7.1); never carries exception or patient detail."""

    state = b"NO"

    def __init__(self, text: str, code: bytes | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.code = code

    def response(self) -> bytes:
        text = _safe_text(self.text)
        return (b"[" + self.code + b"] " + text) if self.code else text


class CommandBad(CommandError):
    """Tagged BAD: protocol or syntax error (RFC 3501 §7.1.5)."""

    state = b"BAD"


class CommandNo(CommandError):
    """Tagged NO: operational refusal (RFC 3501 §7.1.2), optionally with an RFC 5530 code."""

    state = b"NO"


class _ConnectionGone(Exception):
    """The peer went away while a response was being streamed."""


def _safe_text(text: str | bytes, limit: int = 200) -> bytes:
    """Printable US-ASCII only (RFC 3501 resp-text is 7-bit), bounded."""
    data = text.encode("ascii", "replace") if isinstance(text, str) else text
    return bytes(c if 0x20 <= c < 0x7F else 0x3F for c in data[:limit])


# ---------------------------------------------------------------------------------------------------------
# Wire encoding (RFC 3501 §4)
# ---------------------------------------------------------------------------------------------------------


class Atom(bytes):
    """Bytes sent verbatim (flags, keywords, already formatted atoms)."""


@dataclass(frozen=True)
class _Multipart:
    """body-type-mpart: bodies are concatenated without separator (RFC 3501 §9)."""

    bodies: tuple[Any, ...]
    rest: tuple[Any, ...]


Wire = Union[None, int, str, bytes, list[Any], tuple[Any, ...], _Multipart]


def imap_string(data: bytes) -> bytes:
    """A quoted string when RFC 3501 §4.3 allows it, otherwise a literal."""
    if len(data) <= 1024 and _QUOTABLE_RE.fullmatch(data):
        return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(data) + data


def render(value: Any) -> bytes:
    """Serialise nested values: None → NIL, int → number, str/bytes → string, list → parenthesised."""
    if value is None:
        return b"NIL"
    if isinstance(value, Atom):
        return bytes(value)
    if isinstance(value, bool):
        raise TypeError("booleans have no IMAP encoding")
    if isinstance(value, int):
        return b"%d" % value
    if isinstance(value, str):
        return imap_string(value.encode("utf-8", "surrogateescape"))
    if isinstance(value, (bytes, bytearray)):
        return imap_string(bytes(value))
    if isinstance(value, _Multipart):
        head = b"".join(render(b) for b in value.bodies)
        tail = b" ".join(render(r) for r in value.rest)
        return b"(" + head + (b" " + tail if tail else b"") + b")"
    if isinstance(value, (list, tuple)):
        return b"(" + b" ".join(render(v) for v in value) + b")"
    raise TypeError(f"no IMAP encoding for {type(value).__name__}")


def encode_mailbox(name: str) -> bytes:
    """A mailbox name as an astring in modified UTF-7 (RFC 3501 §5.1.3)."""
    wire = name.encode("imap4-utf-7")
    if wire and _ATOM_RE.fullmatch(wire) and wire.upper() != b"NIL":
        return wire
    return imap_string(wire)


def decode_mailbox(wire: bytes) -> str:
    """Decode a client mailbox name (modified UTF-7, RFC 3501 §5.1.3); INBOX is case-insensitive (§5.1)."""
    try:
        name = wire.decode("imap4-utf-7")
    except Exception:
        raise CommandNo("Invalid mailbox name encoding", b"CANNOT") from None
    head, sep, tail = name.partition(DELIMITER)
    if head.upper() == "INBOX":
        name = "INBOX" + sep + tail
    return name


def validate_new_mailbox_name(name: str) -> str:
    """Check a name given to CREATE or RENAME; returns it without a trailing delimiter (RFC 3501 §6.3.3)."""
    if name.endswith(DELIMITER):
        name = name[: -len(DELIMITER)]
    if not name or len(name) > 512:
        raise CommandNo("Invalid mailbox name", b"CANNOT")
    if any(not part for part in name.split(DELIMITER)):
        raise CommandNo("Invalid mailbox name: empty hierarchy level", b"CANNOT")
    if any(ch in name for ch in "*%") or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        raise CommandNo("Invalid character in mailbox name", b"CANNOT")
    return name


def _utc(value: dt.datetime) -> dt.datetime:
    """Store dates are UTC; a naive one is taken as UTC rather than local time."""
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc)


def format_internaldate(value: dt.datetime) -> bytes:
    """date-time of RFC 3501 §9 (``"dd-Mon-yyyy hh:mm:ss +zzzz"``, day space-padded), in UTC."""
    value = _utc(value)
    return b'"%2d-%s-%04d %02d:%02d:%02d +0000"' % (
        value.day,
        _MONTHS[value.month - 1].encode(),
        value.year,
        value.hour,
        value.minute,
        value.second,
    )


_DATETIME_RE = re.compile(
    rb"([ \d]?\d)-([A-Za-z]{3})-(\d{4}) (\d{2}):(\d{2}):(\d{2}) ([+-])(\d{2})(\d{2})"
)
_DATE_RE = re.compile(rb"(\d{1,2})-([A-Za-z]{3})-(\d{4})")


def parse_datetime(text: bytes) -> dt.datetime:
    """Parse an APPEND date-time (RFC 3501 §9, without the quotes)."""
    m = _DATETIME_RE.fullmatch(text)
    if not m:
        raise CommandBad("Invalid date-time")
    day, mon, year, hh, mm, ss, sign, zh, zm = m.groups()
    month = _MONTH_NUMBER.get(mon.decode().lower())
    if month is None:
        raise CommandBad("Invalid date-time")
    offset = dt.timedelta(hours=int(zh), minutes=int(zm))
    try:
        tz = dt.timezone(-offset if sign == b"-" else offset)
        value = dt.datetime(int(year), month, int(day), int(hh), int(mm), int(ss), tzinfo=tz)
    except ValueError:
        raise CommandBad("Invalid date-time") from None
    return value.astimezone(dt.timezone.utc)


def parse_date(text: bytes) -> dt.date:
    """Parse a SEARCH date (RFC 3501 §9 ``date``, quotes already removed)."""
    m = _DATE_RE.fullmatch(text)
    month = _MONTH_NUMBER.get(m.group(2).decode().lower()) if m else None
    if m is None or month is None:
        raise CommandBad("Invalid date")
    try:
        return dt.date(int(m.group(3)), month, int(m.group(1)))
    except ValueError:
        raise CommandBad("Invalid date") from None


def normalise_flag(flag: str) -> str:
    """System flags in canonical case; keywords as given (RFC 3501 §2.3.2)."""
    return _SYSTEM_FLAGS_BY_LOWER.get(flag.lower(), flag)


def parse_flag_list(items: Iterable[bytes], *, allow_recent: bool = False) -> list[str]:
    """Validate flags from STORE or APPEND; unknown system flags are refused (RFC 3501 §9 flag)."""
    flags: list[str] = []
    for raw in items:
        if not _FLAG_RE.fullmatch(raw):
            raise CommandBad("Invalid flag")
        flag = raw.decode("ascii")
        if flag.startswith("\\"):
            if flag.lower() == RECENT.lower():
                if allow_recent:
                    continue
                raise CommandBad("\\Recent cannot be set by a client")
            if flag.lower() not in _SYSTEM_FLAGS_BY_LOWER:
                raise CommandBad("Unknown system flag")
        flag = normalise_flag(flag)
        if flag not in flags:
            flags.append(flag)
    return flags


def sorted_flags(flags: Iterable[str]) -> list[str]:
    """System flags first in RFC order, then keywords; anything that is not a valid flag atom is dropped."""
    unique = {normalise_flag(f) for f in flags}
    system = [f for f in (*SYSTEM_FLAGS, RECENT) if f in unique]
    keywords = sorted(f for f in unique if not f.startswith("\\") and _ATOM_RE.fullmatch(f.encode("ascii", "replace")))
    return system + keywords


def render_flags(flags: Iterable[str]) -> bytes:
    return b"(" + b" ".join(f.encode("ascii") for f in sorted_flags(flags)) + b")"


@functools.lru_cache(maxsize=1024)
def _message_flags(flags: frozenset[str], recent: bool) -> bytes:
    """The FLAGS list of a message, memoised: a folder holds few distinct sets of flags (the store
    shares one frozenset per distinct set), and a header listing renders one per message."""
    return render_flags(flags | {RECENT} if recent else flags)


# ---------------------------------------------------------------------------------------------------------
# Sequence sets (RFC 3501 §9 sequence-set)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SequenceSet:
    """A parsed sequence-set; ``None`` stands for ``*`` (the largest number in use)."""

    ranges: tuple[tuple[int | None, int | None], ...]

    @classmethod
    def parse(cls, text: bytes) -> SequenceSet:
        ranges: list[tuple[int | None, int | None]] = []
        if not text:
            raise CommandBad("Missing message set")
        for item in text.split(b","):
            low, sep, high = item.partition(b":")
            start = cls._number(low)
            end = cls._number(high) if sep else start
            ranges.append((start, end))
        return cls(tuple(ranges))

    @staticmethod
    def _number(text: bytes) -> int | None:
        if text == b"*":
            return None
        if not text.isdigit() or len(text) > 10:
            raise CommandBad("Invalid message set")
        value = int(text)
        if not 0 < value <= _MAX_NUMBER:
            raise CommandBad("Invalid message set")
        return value

    @classmethod
    def from_twisted(cls, messages: imap4.MessageSet) -> SequenceSet:
        return cls(tuple((low, high) for low, high in messages.ranges))

    def _bounds(self, star: int) -> Iterator[tuple[int, int]]:
        for low, high in self.ranges:
            lo = star if low is None else low
            hi = star if high is None else high
            yield (lo, hi) if lo <= hi else (hi, lo)

    def highest_explicit(self) -> int:
        return max((n for pair in self.ranges for n in pair if n is not None), default=0)

    def contains(self, value: int, star: int) -> bool:
        return any(lo <= value <= hi for lo, hi in self._bounds(star))

    def select(self, values: Sequence[int], star: int) -> list[int]:
        """The members of sorted ``values`` inside the set, ascending."""
        return [values[i] for i in self.select_indices(values, star)]

    def select_indices(self, values: Sequence[int], star: int) -> Sequence[int]:
        """The positions in sorted ``values`` of the members inside the set, ascending."""
        spans = [(bisect.bisect_left(values, lo), bisect.bisect_right(values, hi)) for lo, hi in self._bounds(star)]
        if len(spans) == 1:
            return range(*spans[0])
        chosen: set[int] = set()
        for start, end in spans:
            chosen.update(range(start, end))
        return sorted(chosen)

    def __str__(self) -> str:
        def one(n: int | None) -> str:
            return "*" if n is None else str(n)

        return ",".join(one(a) if a == b else f"{one(a)}:{one(b)}" for a, b in self.ranges)


def compress_uids(uids: Sequence[int]) -> bytes:
    """A uid-set keeping the given order (RFC 4315 §4: COPYUID sets correspond element by element)."""
    out: list[bytes] = []
    i = 0
    while i < len(uids):
        j = i
        while j + 1 < len(uids) and uids[j + 1] == uids[j] + 1:
            j += 1
        out.append(b"%d" % uids[i] if i == j else b"%d:%d" % (uids[i], uids[j]))
        i = j + 1
    return b",".join(out)


# ---------------------------------------------------------------------------------------------------------
# FETCH attributes (RFC 3501 §6.4.5)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BodySection:
    """section-spec: part numbers then "", HEADER, HEADER.FIELDS[.NOT], TEXT or MIME."""

    part: tuple[int, ...] = ()
    text: str = ""
    fields: tuple[bytes, ...] = ()

    def spec(self) -> bytes:
        out = b".".join(b"%d" % p for p in self.part)
        if self.text:
            out += (b"." if out else b"") + self.text.encode()
        if self.fields:
            names = [f if _ASTRING_ATOM_RE.fullmatch(f) else imap_string(f) for f in self.fields]
            out += b" (" + b" ".join(names) + b")"
        return out


@dataclass(frozen=True)
class FetchItem:
    """One fetch-att.  ``name`` is ENVELOPE, FLAGS, INTERNALDATE, RFC822, RFC822.HEADER, RFC822.SIZE,
    RFC822.TEXT, BODY, BODYSTRUCTURE, UID or BODY[] (a body section, see ``section``)."""

    name: str
    section: BodySection | None = None
    peek: bool = False
    partial: tuple[int, int] | None = None

    @property
    def sets_seen(self) -> bool:
        """Fetching this implicitly sets \\Seen (RFC 3501 §6.4.5)."""
        return self.name in ("RFC822", "RFC822.TEXT") or (self.name == "BODY[]" and not self.peek)

    @property
    def needs_content(self) -> bool:
        return self.name not in ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "UID")


_SIMPLE_FETCH = ("ENVELOPE", "FLAGS", "INTERNALDATE", "RFC822", "RFC822.HEADER", "RFC822.SIZE",
                 "RFC822.TEXT", "BODYSTRUCTURE", "UID")
_FETCH_MACROS = {
    b"ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    b"FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    b"FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}


class _Cursor:
    """A read position over a byte string, for the small recursive-descent parsers below."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def eof(self) -> bool:
        return self.pos >= len(self.data)

    def peek(self, n: int = 1) -> bytes:
        return self.data[self.pos : self.pos + n]

    def take(self, literal: bytes) -> bool:
        if self.data[self.pos : self.pos + len(literal)].upper() == literal:
            self.pos += len(literal)
            return True
        return False

    def expect(self, literal: bytes, what: str) -> None:
        if not self.take(literal):
            raise CommandBad(f"Syntax error in {what}")

    def match(self, pattern: re.Pattern[bytes]) -> bytes | None:
        m = pattern.match(self.data, self.pos)
        if not m:
            return None
        self.pos = m.end()
        return m.group(0)


_FETCH_NAME_RE = re.compile(rb"[A-Za-z0-9.]+")
_NUMBER_RE = re.compile(rb"\d{1,10}")
_SECTION_PART_RE = re.compile(rb"[1-9]\d{0,8}(?:\.[1-9]\d{0,8})*")
_QUOTED_RE = re.compile(rb'"((?:[^"\\\r\n]|\\["\\])*)"')
_BARE_TOKEN_RE = re.compile(rb'[^ ()"]+')


def parse_fetch_items(text: bytes) -> list[FetchItem]:
    """Parse the fetch attributes of FETCH / UID FETCH (RFC 3501 §6.4.5, §9 fetch)."""
    data = text.strip()
    macro = _FETCH_MACROS.get(data.upper())
    if macro is not None:
        return [FetchItem(name) for name in macro]
    cur = _Cursor(data)
    items: list[FetchItem] = []
    if cur.take(b"("):
        while True:
            items.append(_parse_fetch_att(cur))
            if len(items) > MAX_FETCH_ITEMS:
                raise CommandBad("Too many fetch attributes")
            if cur.take(b")"):
                break
            cur.expect(b" ", "fetch attribute list")
    else:
        items.append(_parse_fetch_att(cur))
    if not cur.eof():
        raise CommandBad("Unexpected data after fetch attributes")
    return items


def _parse_fetch_att(cur: _Cursor) -> FetchItem:
    raw = cur.match(_FETCH_NAME_RE)
    if raw is None:
        raise CommandBad("Missing fetch attribute")
    name = raw.upper().decode("ascii")
    if name in _SIMPLE_FETCH:
        return FetchItem(name)
    if name not in ("BODY", "BODY.PEEK"):
        raise CommandBad("Unknown fetch attribute")
    if cur.peek() != b"[":
        if name == "BODY.PEEK":
            raise CommandBad("BODY.PEEK needs a section")
        return FetchItem("BODY")
    cur.take(b"[")
    section = _parse_section(cur)
    cur.expect(b"]", "section")
    partial = None
    if cur.take(b"<"):
        start = cur.match(_NUMBER_RE)
        cur.expect(b".", "partial range")
        length = cur.match(_NUMBER_RE)
        cur.expect(b">", "partial range")
        if start is None or length is None or int(length) == 0:
            raise CommandBad("Invalid partial range")
        partial = (int(start), int(length))
    return FetchItem("BODY[]", section, peek=(name == "BODY.PEEK"), partial=partial)


def _parse_section(cur: _Cursor) -> BodySection:
    part: tuple[int, ...] = ()
    numbers = cur.match(_SECTION_PART_RE)
    if numbers is not None:
        part = tuple(int(n) for n in numbers.split(b"."))
        if cur.peek() == b"]":
            return BodySection(part)
        cur.expect(b".", "section")
    elif cur.peek() == b"]":
        return BodySection()
    if cur.take(b"HEADER.FIELDS.NOT"):
        return BodySection(part, "HEADER.FIELDS.NOT", _parse_header_list(cur))
    if cur.take(b"HEADER.FIELDS"):
        return BodySection(part, "HEADER.FIELDS", _parse_header_list(cur))
    if cur.take(b"HEADER"):
        return BodySection(part, "HEADER")
    if cur.take(b"TEXT"):
        return BodySection(part, "TEXT")
    if part and cur.take(b"MIME"):
        return BodySection(part, "MIME")
    raise CommandBad("Invalid section")


def _parse_header_list(cur: _Cursor) -> tuple[bytes, ...]:
    cur.expect(b" (", "header list")
    names: list[bytes] = []
    while True:
        quoted = cur.match(_QUOTED_RE)
        if quoted is not None:
            names.append(re.sub(rb"\\(.)", rb"\1", quoted[1:-1]))
        else:
            atom = cur.match(_ASTRING_ATOM_RE)
            if atom is None:
                raise CommandBad("Invalid header list")
            names.append(atom)
        if cur.take(b")"):
            return tuple(names)
        cur.expect(b" ", "header list")


# ---------------------------------------------------------------------------------------------------------
# Tokens (SEARCH keys, STATUS items, ID parameters)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    """``kind`` is "atom", "string" (quoted or literal), "(" or ")"."""

    kind: str
    value: bytes = b""


class LiteralChunk(bytes):
    """Literal data spliced into a command line by the literal reader."""


def tokenize(segments: Sequence[bytes]) -> list[Token]:
    """Split command text (with literals already read) into atoms, strings and parentheses."""
    tokens: list[Token] = []
    for segment in segments:
        if isinstance(segment, LiteralChunk):
            tokens.append(Token("string", bytes(segment)))
            continue
        cur = _Cursor(segment)
        while not cur.eof():
            ch = cur.peek()
            if ch == b" ":
                cur.pos += 1
            elif ch in (b"(", b")"):
                tokens.append(Token(ch.decode()))
                cur.pos += 1
            elif ch == b'"':
                quoted = cur.match(_QUOTED_RE)
                if quoted is None:
                    raise CommandBad("Unterminated quoted string")
                tokens.append(Token("string", re.sub(rb"\\(.)", rb"\1", quoted[1:-1])))
            else:
                atom = cur.match(_BARE_TOKEN_RE)
                if atom is None:
                    raise CommandBad("Invalid token")
                if b"{" in atom or any(c < 0x20 or c > 0x7E for c in atom):
                    raise CommandBad("Invalid atom")
                tokens.append(Token("atom", atom))
    return tokens


# ---------------------------------------------------------------------------------------------------------
# SEARCH (RFC 3501 §6.4.4)
# ---------------------------------------------------------------------------------------------------------


# The search program as a tree (RFC 3501 §6.4.4 search-key); string values are casefolded at parse time.


@dataclass(frozen=True)
class SAll:
    pass


@dataclass(frozen=True)
class SAnd:
    keys: tuple[SearchKey, ...]


@dataclass(frozen=True)
class SOr:
    left: SearchKey
    right: SearchKey


@dataclass(frozen=True)
class SNot:
    key: SearchKey


@dataclass(frozen=True)
class SFlag:
    flag: str
    present: bool


@dataclass(frozen=True)
class SRecent:
    kind: str  # "RECENT", "NEW" (recent and unseen) or "OLD" (not recent)


@dataclass(frozen=True)
class SHeader:
    name: str  # lower case
    value: str  # casefolded; "" matches every message having the field


@dataclass(frozen=True)
class SText:
    value: str  # casefolded
    with_headers: bool  # TEXT (header and body) rather than BODY


@dataclass(frozen=True)
class SDate:
    sent: bool  # Date: header rather than internal date
    op: str  # "BEFORE", "ON" or "SINCE"
    date: dt.date


@dataclass(frozen=True)
class SSize:
    larger: bool
    size: int


@dataclass(frozen=True)
class SSet:
    uid: bool
    messages: SequenceSet


SearchKey = Union[SAll, SAnd, SOr, SNot, SFlag, SRecent, SHeader, SText, SDate, SSize, SSet]

_FLAG_KEYS = {
    "ANSWERED": ("\\Answered", True), "UNANSWERED": ("\\Answered", False),
    "DELETED": ("\\Deleted", True), "UNDELETED": ("\\Deleted", False),
    "DRAFT": ("\\Draft", True), "UNDRAFT": ("\\Draft", False),
    "FLAGGED": ("\\Flagged", True), "UNFLAGGED": ("\\Flagged", False),
    "SEEN": ("\\Seen", True), "UNSEEN": ("\\Seen", False),
}
_HEADER_KEYS = {"BCC": "bcc", "CC": "cc", "FROM": "from", "SUBJECT": "subject", "TO": "to"}
_DATE_KEYS = {
    "BEFORE": (False, "BEFORE"), "ON": (False, "ON"), "SINCE": (False, "SINCE"),
    "SENTBEFORE": (True, "BEFORE"), "SENTON": (True, "ON"), "SENTSINCE": (True, "SINCE"),
}
_SEQSET_ATOM_RE = re.compile(rb"[0-9*:,]+")
ACCEPTED_CHARSETS = ("US-ASCII", "UTF-8")


class _SearchParser:
    def __init__(self, tokens: list[Token], charset: str) -> None:
        self.tokens = tokens
        self.pos = 0
        self.charset = charset

    def eof(self) -> bool:
        return self.pos >= len(self.tokens)

    def next(self) -> Token:
        if self.eof():
            raise CommandBad("Incomplete search key")
        tok = self.tokens[self.pos]
        self.pos += 1
        return tok

    def astring(self) -> bytes:
        tok = self.next()
        if tok.kind not in ("atom", "string"):
            raise CommandBad("Search key expects a string")
        return tok.value

    def text(self) -> str:
        raw = self.astring()
        try:
            return raw.decode(self.charset)
        except (UnicodeDecodeError, LookupError):
            raise CommandBad("Search string not in the declared charset") from None

    def number(self) -> int:
        raw = self.astring()
        if not raw.isdigit() or len(raw) > 10 or int(raw) > _MAX_NUMBER:
            raise CommandBad("Invalid number in search key")
        return int(raw)

    def key(self, depth: int = 0) -> SearchKey:
        if depth > MAX_SEARCH_DEPTH:
            raise CommandBad("Search program nested too deeply")
        tok = self.next()
        if tok.kind == "(":
            keys: list[SearchKey] = []
            while True:
                if self.eof():
                    raise CommandBad("Unbalanced parenthesis in search")
                if self.tokens[self.pos].kind == ")":
                    self.pos += 1
                    break
                keys.append(self.key(depth + 1))
            if not keys:
                raise CommandBad("Empty search group")
            return keys[0] if len(keys) == 1 else SAnd(tuple(keys))
        if tok.kind != "atom":
            raise CommandBad("Invalid search key")
        word = tok.value.upper().decode("ascii")
        if word == "ALL":
            return SAll()
        if word in _FLAG_KEYS:
            flag, present = _FLAG_KEYS[word]
            return SFlag(flag, present)
        if word in ("KEYWORD", "UNKEYWORD"):
            raw = self.astring()
            if not _ATOM_RE.fullmatch(raw):
                raise CommandBad("Invalid keyword")
            return SFlag(normalise_flag(raw.decode("ascii")), word == "KEYWORD")
        if word in ("NEW", "OLD", "RECENT"):
            return SRecent(word)
        if word in _HEADER_KEYS:
            return SHeader(_HEADER_KEYS[word], self.text().casefold())
        if word == "HEADER":
            name = self.astring().decode("ascii", "replace").lower()
            return SHeader(name, self.text().casefold())
        if word in ("BODY", "TEXT"):
            return SText(self.text().casefold(), word == "TEXT")
        if word in _DATE_KEYS:
            sent, op = _DATE_KEYS[word]
            return SDate(sent, op, parse_date(self.astring()))
        if word in ("LARGER", "SMALLER"):
            return SSize(word == "LARGER", self.number())
        if word == "UID":
            return SSet(True, SequenceSet.parse(self.astring()))
        if word == "NOT":
            return SNot(self.key(depth + 1))
        if word == "OR":
            left = self.key(depth + 1)
            return SOr(left, self.key(depth + 1))
        if _SEQSET_ATOM_RE.fullmatch(tok.value):
            return SSet(False, SequenceSet.parse(tok.value))
        raise CommandBad("Unknown search key")


def parse_search(tokens: list[Token]) -> tuple[str, SearchKey]:
    """Parse a SEARCH program; returns (charset, key).  Unknown charsets get NO [BADCHARSET] (§6.4.4)."""
    charset = "US-ASCII"
    pos = 0
    if tokens and tokens[0].kind == "atom" and tokens[0].value.upper() == b"CHARSET":
        if len(tokens) < 2 or tokens[1].kind not in ("atom", "string"):
            raise CommandBad("Missing charset")
        charset = tokens[1].value.decode("ascii", "replace").upper()
        pos = 2
    try:
        codec = codecs.lookup(charset).name
    except LookupError:
        codec = ""
    if not codec:
        raise CommandNo("Unsupported charset", b"BADCHARSET (" + " ".join(ACCEPTED_CHARSETS).encode() + b")")
    # Clients declaring US-ASCII routinely send UTF-8 anyway; UTF-8 is a strict superset.
    parser = _SearchParser(tokens[pos:], "utf-8" if codec == "ascii" else codec)
    keys: list[SearchKey] = []
    while not parser.eof():
        keys.append(parser.key())
    if not keys:
        raise CommandBad("Missing search key")
    return charset, keys[0] if len(keys) == 1 else SAnd(tuple(keys))


def search_key_from_twisted(query: Sequence[Any]) -> SearchKey:
    """Accept the nested token list Twisted's own parser produces (``ISearchableMailbox.search``)."""
    segments: list[bytes] = []

    def flatten(items: Sequence[Any]) -> None:
        for item in items:
            if isinstance(item, list):
                segments.append(b" (")
                flatten(item)
                segments.append(b") ")
            elif isinstance(item, tuple):  # a literal, as parseNestedParens returns it
                segments.append(LiteralChunk(item[0]))
            else:
                value = item.encode() if isinstance(item, str) else item
                segments.append(b" " + (value if _ATOM_RE.fullmatch(value) else imap_string(value)) + b" ")

    flatten(query)
    return parse_search(tokenize(segments))[1]


# ---------------------------------------------------------------------------------------------------------
# Raw message model: exact bytes of every header block and MIME part (RFC 5322, RFC 2045/2046)
# ---------------------------------------------------------------------------------------------------------

_FIELD_NAME_RE = re.compile(rb"([!-9;-~]+)[ \t]*:")
_LINE_RE = re.compile(rb"[^\n]*\n|[^\n]+\Z")
_BLANK_LINE_RE = re.compile(rb"\n(\r?\n)")
_UNFOLD_RE = re.compile(rb"\r?\n(?=[ \t])")


@dataclass(frozen=True)
class HeaderField:
    """One header field exactly as stored, folding and line ending included."""

    name: str
    raw: bytes

    @property
    def key(self) -> str:
        return self.name.lower()

    def value(self) -> bytes:
        """The unfolded field body (RFC 5322 §2.2.3), surrounding white space removed."""
        body = self.raw.split(b":", 1)[1] if b":" in self.raw else b""
        return _UNFOLD_RE.sub(b"", body).strip(b" \t\r\n")


def split_message(data: bytes) -> tuple[bytes, bytes]:
    """Split at the first empty line; the header block keeps that empty line (RFC 3501 §6.4.5 HEADER)."""
    if data.startswith(b"\r\n"):
        return data[:2], data[2:]
    if data.startswith(b"\n"):
        return data[:1], data[1:]
    m = _BLANK_LINE_RE.search(data)
    if m is None:
        return data, b""
    return data[: m.end()], data[m.end() :]


def parse_header_fields(header: bytes) -> list[HeaderField]:
    """The fields of a header block, continuation lines attached to their field."""
    raw_fields: list[list[bytes]] = []
    names: list[str] = []
    for m in _LINE_RE.finditer(header):
        line = m.group(0)
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t") and raw_fields:
            raw_fields[-1].append(line)
            continue
        nm = _FIELD_NAME_RE.match(line)
        names.append(nm.group(1).decode("ascii") if nm else "")
        raw_fields.append([line])
    return [HeaderField(n, b"".join(parts)) for n, parts in zip(names, raw_fields)]


def _trailing_blank(header: bytes) -> bytes:
    if header.endswith(b"\r\n\r\n") or header == b"\r\n":
        return b"\r\n"
    if header.endswith(b"\n\n") or header == b"\n":
        return b"\n"
    return b""


def decode_header_value(raw: bytes) -> str:
    """RFC 2047 decoding of an unfolded field body; undecodable words are kept as text. Linear time:
    the stdlib decoder is quadratic in the number of encoded words and ran on the event loop for every
    header SEARCH (docs/security.md row 14)."""
    return decode_encoded_words(raw.decode("utf-8", "replace"))


@dataclass
class MimePart:
    """A message or body part: exact header and body bytes plus its decoded content type."""

    header: bytes
    body: bytes
    fields: list[HeaderField]
    content_type: str
    params: list[tuple[str, str]]
    children: list[MimePart] = field(default_factory=list)
    message: MimePart | None = None  # the encapsulated message of a message/rfc822 part

    def first(self, name: str) -> bytes | None:
        key = name.lower()
        for f in self.fields:
            if f.key == key:
                return f.value()
        return None

    def values(self, name: str) -> list[bytes]:
        key = name.lower()
        return [f.value() for f in self.fields if f.key == key]

    @property
    def is_multipart(self) -> bool:
        return bool(self.children)

    @property
    def raw(self) -> bytes:
        return self.header + self.body


def _header_params(name: str, value: bytes, default_type: str | None = None) -> tuple[str, list[tuple[str, str]]]:
    """Main value and parameters of a MIME header (RFC 2045 §5.1, RFC 2231 continuations decoded)."""
    msg = email.message.Message()
    msg.set_raw(name, value.decode("utf-8", "replace"))
    if default_type is not None:
        msg.set_default_type(default_type)
    header = name.lower()
    main = msg.get_content_type() if header == "content-type" else (msg.get_content_disposition() or "")
    params: list[tuple[str, str]] = []
    try:
        for key, val in (msg.get_params(header=header, unquote=True) or [])[1:]:
            text = email.utils.collapse_rfc2231_value(val) if isinstance(val, tuple) else val
            if key:
                params.append((key.lower(), text))
    except Exception:  # a hostile parameter list must not stop FETCH; the part is served without params
        params = []
    return main, params


def _split_multipart(body: bytes, boundary: bytes) -> list[bytes]:
    """Body parts between boundary delimiter lines (RFC 2046 §5.1.1); the CRLF before a delimiter
    belongs to the delimiter.  An unterminated last part extends to the end of the body."""
    delimiter = re.compile(rb"^--" + re.escape(boundary) + rb"(--)?[ \t]*\r?$", re.M)
    parts: list[bytes] = []
    start: int | None = None
    for m in delimiter.finditer(body):
        if start is not None:
            end = m.start()
            if body[end - 2 : end] == b"\r\n":
                end -= 2
            elif body[end - 1 : end] == b"\n":
                end -= 1
            parts.append(body[start : max(end, start)])
        if m.group(1):
            return parts
        start = m.end() + (1 if body[m.end() : m.end() + 1] == b"\n" else 0)
        if len(parts) >= MAX_MIME_PARTS:
            return parts
    if start is not None:
        parts.append(body[start:])
    return parts


def parse_mime(data: bytes, default_type: str = "text/plain", depth: int = 0,
               budget: list[int] | None = None) -> MimePart:
    """Build the MIME tree of ``data`` without copying it into a re-serialisable model."""
    if budget is None:
        budget = [MAX_MIME_PARTS]
    budget[0] -= 1
    header, body = split_message(data)
    fields = parse_header_fields(header)
    raw_type = next((f.value() for f in fields if f.key == "content-type"), None)
    if raw_type is None:
        ctype = default_type
        params = [("charset", "us-ascii")] if default_type == "text/plain" else []
    else:
        ctype, params = _header_params("Content-Type", raw_type, default_type)
    part = MimePart(header, body, fields, ctype, params)
    if depth >= MAX_MIME_DEPTH or budget[0] <= 0:
        return part
    if ctype.startswith("multipart/"):
        boundary = dict(params).get("boundary", "")
        chunks = _split_multipart(body, boundary.encode("utf-8")) if boundary else []
        if not chunks:  # no usable boundary: serve it as opaque text (as Dovecot does)
            part.content_type, part.params = "text/plain", [("charset", "us-ascii")]
            return part
        child_default = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
        for chunk in chunks:
            if budget[0] <= 0:
                break
            part.children.append(parse_mime(chunk, child_default, depth + 1, budget))
    elif ctype in ("message/rfc822", "message/global"):
        cte = (part.first("content-transfer-encoding") or b"7bit").lower()
        if cte in (b"7bit", b"8bit", b"binary"):
            part.message = parse_mime(body, "text/plain", depth + 1, budget)
    return part


def resolve_part(root: MimePart, numbers: Sequence[int]) -> MimePart | None:
    """The part named by a section part number (RFC 3501 §6.4.5): part 1 of a non-multipart message is
    its body; numbers below a message/rfc822 part address the encapsulated message's parts."""
    cur = root
    for i, n in enumerate(numbers):
        if i > 0 and cur.message is not None:
            cur = cur.message
        if cur.children:
            if n > len(cur.children):
                return None
            cur = cur.children[n - 1]
        elif n != 1:
            return None
    return cur


def _header_subset(msg: MimePart, names: Sequence[bytes], negate: bool) -> bytes:
    return fields_subset(msg.header, msg.fields, names, negate)


def fields_subset(header: bytes, fields: Sequence[HeaderField], names: Sequence[bytes], negate: bool) -> bytes:
    """HEADER.FIELDS / HEADER.FIELDS.NOT (RFC 3501 §6.4.5): the fields kept, as stored, then the empty line."""
    wanted = {n.decode("ascii", "replace").lower() for n in names}
    kept = b"".join(f.raw for f in fields if (f.key in wanted) != negate)
    return kept + _trailing_blank(header)


def section_bytes(root: MimePart, section: BodySection) -> bytes | None:
    """The exact octets of a body section; None (NIL) for a part that does not exist."""
    target: MimePart | None = root
    if section.part:
        part = resolve_part(root, section.part)
        if part is None:
            return None
        if section.text == "":
            return part.body
        if section.text == "MIME":
            return part.header
        target = part.message
        if target is None:
            return None
    assert target is not None
    if section.text == "":
        return target.raw
    if section.text == "HEADER":
        return target.header
    if section.text == "TEXT":
        return target.body
    return _header_subset(target, section.fields, section.text == "HEADER.FIELDS.NOT")


def _line_count(body: bytes) -> int:
    return body.count(b"\n") + (1 if body and not body.endswith(b"\n") else 0)


def _encode_phrase(name: str) -> str:
    """A display name for ENVELOPE: as is when ASCII, else RFC 2047 encoded words."""
    if name.isascii():
        return name
    return email.header.Header(name, "utf-8").encode(linesep="\r\n").replace("\r\n", "")


_HEADER_FACTORY = email.policy.default.header_factory
MAX_ADDRESS_TEXT = 16 * 1024  # characters of an unusual address field given to the stdlib parsers


_ADDR_SPEC = r'[^\s<>()\[\]",;:@\\]+@[^\s<>()\[\]",;:@\\]+'
_SIMPLE_ADDRESS_RE = re.compile(
    r'\s*(?:(?P<name>"(?:[^"\\]|\\.)*"|[^"<>()\[\],;:@\\]*?)\s*<(?P<spec>' + _ADDR_SPEC + r')>'
    r'|(?P<bare>' + _ADDR_SPEC + r'))\s*'
)
_ADDRESS_SPLIT_RE = re.compile(r'(?:[^,"]|"(?:[^"\\]|\\.)*")+')


def _simple_addresses(text: str) -> list[list[Any]] | None:
    """Fast path for the usual ``addr-spec`` / ``name <addr-spec>`` lists (no groups, comments or
    routes); display names stay as written, encoded words included (RFC 3501 §7.4.2).  None when the
    header needs the full RFC 5322 parser."""
    out: list[list[Any]] = []
    for item in _ADDRESS_SPLIT_RE.findall(text):
        if not item.strip():
            continue
        m = _SIMPLE_ADDRESS_RE.fullmatch(item)
        if m is None:
            return None
        spec = m.group("spec") or m.group("bare")
        display = (m.group("name") or "").strip()
        if display.startswith('"'):
            display = re.sub(r"\\(.)", r"\1", display[1:-1])
        mailbox, _, host = spec.rpartition("@")
        out.append([display or None, None, mailbox, host])
    return out


def _address_list(part: MimePart, name: str) -> list[list[Any]] | None:
    """ENVELOPE address structures with RFC 3501 §7.4.2 group markers; None when absent or empty."""
    raw = part.first(name)
    if raw is None:
        return None
    text = raw.decode("utf-8", "replace")
    simple = _simple_addresses(text)
    if simple is not None:
        return simple or None
    # The stdlib parsers below recurse once per nested comment (RecursionError: every FETCH of the
    # message failed) and take quadratic time on long lists, on the event loop (docs/security.md row 14):
    # comments nested deeper than any client writes are dropped, and a long list that needs them is read
    # up to MAX_ADDRESS_TEXT characters.
    if comment_depth(text) > MAX_COMMENT_DEPTH:
        text = strip_comments(text)
        simple = _simple_addresses(text)
        if simple is not None:
            return simple or None
    if len(text) > MAX_ADDRESS_TEXT:
        cut = text.rfind(",", 0, MAX_ADDRESS_TEXT)
        text = text[: cut if cut > 0 else MAX_ADDRESS_TEXT]
    out: list[list[Any]] = []
    try:
        groups = _HEADER_FACTORY(name, text).groups
        for group in groups:
            if group.display_name is not None:
                out.append([None, None, _encode_phrase(group.display_name), None])
            for addr in group.addresses:
                out.append([
                    _encode_phrase(addr.display_name) if addr.display_name else None,
                    None,
                    addr.username or "MISSING_MAILBOX",
                    addr.domain or "MISSING_DOMAIN",
                ])
            if group.display_name is not None:
                out.append([None, None, None, None])
    except Exception:  # the stdlib parser failed on hostile input: fall back to the lenient one
        out = []
        for display, address in email.utils.getaddresses([text]):
            mailbox, _, host = address.rpartition("@") if "@" in address else (address, "", "")
            out.append([_encode_phrase(display) if display else None, None,
                        mailbox or "MISSING_MAILBOX", host or "MISSING_DOMAIN"])
    return out or None


def envelope(part: MimePart) -> list[Any]:
    """ENVELOPE (RFC 3501 §7.4.2).  Sender and Reply-To default to From; a missing From is NIL."""
    sender_from = _address_list(part, "from")
    return [
        part.first("date"),
        part.first("subject"),
        sender_from,
        _address_list(part, "sender") or sender_from,
        _address_list(part, "reply-to") or sender_from,
        _address_list(part, "to"),
        _address_list(part, "cc"),
        _address_list(part, "bcc"),
        part.first("in-reply-to"),
        part.first("message-id"),
    ]


def _param_list(params: Sequence[tuple[str, str]]) -> list[str] | None:
    if not params:
        return None
    out: list[str] = []
    for key, value in params:
        if value.isascii() and value.isprintable():
            out += [key, value]
        else:  # RFC 2231 §4 extended value, so that 7-bit clients can still decode it
            out += [key + "*", "utf-8''" + urllib.parse.quote(value, safe="")]
    return out


def _disposition(part: MimePart) -> list[Any] | None:
    raw = part.first("content-disposition")
    if raw is None:
        return None
    kind, params = _header_params("Content-Disposition", raw)
    return [kind or "attachment", _param_list(params)] if kind else None


def _language(part: MimePart) -> Any:
    raw = part.first("content-language")
    if raw is None:
        return None
    tags = [t.strip() for t in raw.split(b",") if t.strip()]
    if not tags:
        return None
    return tags[0] if len(tags) == 1 else tags


def body_structure(part: MimePart, extended: bool) -> Any:
    """BODY / BODYSTRUCTURE (RFC 3501 §7.4.2) computed from the raw tree."""
    if part.children:
        rest: list[Any] = [part.content_type.split("/", 1)[1]]
        if extended:
            rest += [_param_list([p for p in part.params]), _disposition(part), _language(part),
                     part.first("content-location")]
        return _Multipart(tuple(body_structure(c, extended) for c in part.children), tuple(rest))
    main, _, sub = part.content_type.partition("/")
    fields: list[Any] = [
        main,
        sub or "plain",
        _param_list(part.params),
        part.first("content-id"),
        part.first("content-description"),
        (part.first("content-transfer-encoding") or b"7BIT").upper(),
        len(part.body),
    ]
    if part.message is not None:
        fields += [envelope(part.message), body_structure(part.message, extended), _line_count(part.body)]
    elif main == "text":
        fields.append(_line_count(part.body))
    if extended:
        fields += [part.first("content-md5"), _disposition(part), _language(part),
                   part.first("content-location")]
    return fields


def _decode_transfer(part: MimePart) -> bytes:
    cte = (part.first("content-transfer-encoding") or b"7bit").strip().lower()
    try:
        if cte == b"base64":
            return binascii.a2b_base64(part.body)
        if cte == b"quoted-printable":
            return quopri.decodestring(part.body)
    except (binascii.Error, ValueError):
        return part.body
    return part.body


def _decode_text(data: bytes, charset: str | None) -> str:
    try:
        return data.decode(charset or "us-ascii")
    except (LookupError, UnicodeDecodeError):
        return data.decode("utf-8", "replace")


class ParsedMessage:
    """A stored message parsed once per session: the raw MIME tree plus lazily derived search data."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._root: MimePart | None = None
        self._headers: dict[str, list[str]] | None = None
        self._body_text: str | None = None

    @property
    def root(self) -> MimePart:
        """The MIME tree, built on first use: BODY[] and RFC822 serve ``raw`` without it."""
        if self._root is None:
            self._root = parse_mime(self.raw)
        return self._root

    @property
    def message_id(self) -> str | None:
        value = self.root.first("message-id")
        return value.decode("ascii", "replace") if value is not None else None

    def header_values(self, name: str) -> list[str]:
        """Decoded (RFC 2047), casefolded values of a field, for SEARCH."""
        if self._headers is None:
            headers: dict[str, list[str]] = {}
            for f in self.root.fields:
                if f.name:
                    headers.setdefault(f.key, []).append(decode_header_value(f.value()).casefold())
            self._headers = headers
        return self._headers.get(name, [])

    def header_text(self) -> str:
        self.header_values("")
        assert self._headers is not None
        return "\n".join(f"{k}: {v}" for k, vs in self._headers.items() for v in vs)

    def body_text(self) -> str:
        """Decoded text of every text/* part (transfer encoding and charset), casefolded."""
        if self._body_text is None:
            chunks: list[str] = []
            self._collect_text(self.root, chunks, top=True)
            self._body_text = "\n".join(chunks).casefold()
        return self._body_text

    def _collect_text(self, part: MimePart, out: list[str], top: bool = False) -> None:
        if part.children:
            for child in part.children:
                self._collect_text(child, out)
        elif part.message is not None:
            out.append("\n".join(decode_header_value(f.value()) for f in part.message.fields))
            self._collect_text(part.message, out, top=True)
        elif part.content_type.startswith("text/"):
            out.append(_decode_text(_decode_transfer(part), dict(part.params).get("charset")))

    def sent_date(self) -> dt.date | None:
        raw = self.root.first("date")
        if raw is None:
            return None
        try:
            return email.utils.parsedate_to_datetime(raw.decode("ascii", "replace")).date()
        except (TypeError, ValueError, IndexError):
            return None


class ParseCache:
    """Per-session LRU of parsed messages, keyed by blob address and bounded in entries and bytes."""

    def __init__(self, store: MailStore, max_entries: int = PARSE_CACHE_ENTRIES,
                 max_bytes: int = PARSE_CACHE_BYTES) -> None:
        self._store = store
        self._entries: OrderedDict[str, ParsedMessage] = OrderedDict()
        self._batch: dict[str, bytes] = {}  # small bodies of the FETCH batch being rendered (`preload`)
        self._bytes = 0
        self._max_entries = max_entries
        self._max_bytes = max_bytes

    def preload(self, blobs: Sequence[str]) -> None:
        """Read together the small ones of `blobs` (the messages of the FETCH batch about to be rendered),
        replacing the previous batch's: one query instead of one read per message."""
        self._batch = self._store.read_small(blobs) if blobs else {}

    def header(self, blob: str) -> bytes:
        """The header block of a message: from the session's copy if it has one, else read alone (a
        header listing of a whole folder then reads no body and evicts nothing)."""
        parsed = self._entries.get(blob)
        if parsed is not None:
            return split_message(parsed.raw)[0]
        raw = self._batch.get(blob)
        if raw is not None:
            return split_message(raw)[0]
        return self._store.read_header(blob)

    def get(self, blob: str) -> ParsedMessage:
        parsed = self._entries.get(blob)
        if parsed is not None:
            self._entries.move_to_end(blob)
            return parsed
        raw = self._batch.get(blob)
        parsed = ParsedMessage(raw if raw is not None else self._store.read_blob(blob))
        self._entries[blob] = parsed
        self._bytes += len(parsed.raw)
        while self._entries and (len(self._entries) > self._max_entries or self._bytes > self._max_bytes):
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= len(evicted.raw)
        return parsed


# ---------------------------------------------------------------------------------------------------------
# FETCH responses (RFC 3501 §7.4.2)
# ---------------------------------------------------------------------------------------------------------


def _literal(data: bytes | None) -> bytes:
    return b"NIL" if data is None else b"{%d}\r\n" % len(data) + data


def _top_section(message: StoreMessage, section: BodySection) -> bytes | None:
    """BODY[], BODY[HEADER] and BODY[HEADER.FIELDS (...)] of the message itself, which need no MIME
    tree: the stored bytes, or the header block alone. None for any other section."""
    if section.part:
        return None
    if section.text == "":
        return message.parsed.raw
    if section.text == "HEADER":
        return message.header()
    if section.text.startswith("HEADER.FIELDS"):
        header = message.header()
        return fields_subset(header, parse_header_fields(header), section.fields,
                             section.text == "HEADER.FIELDS.NOT")
    return None


def render_fetch(seq: int, message: StoreMessage, items: Sequence[FetchItem], add_flags: bool) -> bytes:
    """One ``* n FETCH (...)`` response, items in the order requested."""
    out: list[bytes] = []
    for item in items:
        name = item.name
        if name == "FLAGS":
            out.append(b"FLAGS " + message.flags_response())
        elif name == "UID":
            out.append(b"UID %d" % message.getUID())
        elif name == "INTERNALDATE":
            out.append(b"INTERNALDATE " + format_internaldate(message.stored.internaldate))
        elif name == "RFC822.SIZE":
            out.append(b"RFC822.SIZE %d" % message.getSize())
        elif name == "ENVELOPE":
            out.append(b"ENVELOPE " + render(envelope(message.parsed.root)))
        elif name == "BODYSTRUCTURE":
            out.append(b"BODYSTRUCTURE " + render(body_structure(message.parsed.root, True)))
        elif name == "BODY":
            out.append(b"BODY " + render(body_structure(message.parsed.root, False)))
        elif name == "RFC822":
            out.append(b"RFC822 " + _literal(message.parsed.raw))
        elif name == "RFC822.HEADER":
            out.append(b"RFC822.HEADER " + _literal(message.header()))
        elif name == "RFC822.TEXT":
            out.append(b"RFC822.TEXT " + _literal(message.parsed.root.body))
        else:
            assert item.section is not None
            data = _top_section(message, item.section)
            if data is None:
                data = section_bytes(message.parsed.root, item.section)
            label = _section_label(item.section)
            if item.partial is not None and data is not None:
                start, length = item.partial
                label += b"<%d>" % start
                data = data[start : start + length]
            out.append(label + b" " + _literal(data))
    if add_flags and not any(i.name == "FLAGS" for i in items):
        out.append(b"FLAGS " + message.flags_response())
    return b"* %d FETCH (" % seq + b" ".join(out) + b")\r\n"


@functools.lru_cache(maxsize=256)
def _section_label(section: BodySection) -> bytes:
    return b"BODY[" + section.spec() + b"]"


# ---------------------------------------------------------------------------------------------------------
# Bridging asyncio awaitables into Twisted
# ---------------------------------------------------------------------------------------------------------


def bridge(awaitable: Awaitable[_T]) -> Deferred[_T]:
    """A Deferred for a store or authenticator awaitable (asyncio coroutine or future)."""
    if isinstance(awaitable, Deferred):
        return awaitable
    return Deferred.fromFuture(asyncio.ensure_future(awaitable))


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


async def _cooperate() -> None:
    """Give the reactor a turn during long CPU-bound loops (SEARCH over large folders)."""
    d: Deferred[None] = Deferred()
    _reactor().callLater(0, d.callback, None)
    await d


# ---------------------------------------------------------------------------------------------------------
# Twisted model objects over MailStore
# ---------------------------------------------------------------------------------------------------------


@implementer(imap4.IMessagePart)
class StorePart:
    """``IMessagePart`` over one part of the raw MIME tree."""

    __slots__ = ("_mime",)  # a header listing makes one message object per message of the folder

    def __init__(self, part: MimePart) -> None:
        self._mime = part

    def _part(self) -> MimePart:
        return self._mime

    def getHeaders(self, negate: bool, *names: str) -> dict[str, str]:
        """Decoded header values keyed by lower-case name; the first occurrence wins."""
        wanted = {n.lower() for n in names}
        out: dict[str, str] = {}
        for f in self._part().fields:
            if f.name and (f.key in wanted) != negate and f.key not in out:
                out[f.key] = decode_header_value(f.value())
        return out

    def getBodyFile(self) -> io.BytesIO:
        return io.BytesIO(self._part().body)

    def getSize(self) -> int:
        return len(self._part().raw)

    def isMultipart(self) -> bool:
        return self._part().is_multipart

    def getSubPart(self, part: int) -> StorePart:
        mime = self._part()
        if not mime.children:
            raise TypeError("not a multipart part")
        return StorePart(mime.children[part])


@implementer(imap4.IMessage, imap4.IMessageFile)
class StoreMessage(StorePart):
    """``IMessage`` + ``IMessageFile``: ``open()`` yields the exact stored bytes (RFC 3501 §6.4.5 BODY[])."""

    __slots__ = ("_cache", "_recent", "stored")

    def __init__(self, stored: StoredMessage, cache: ParseCache, recent: bool) -> None:
        self.stored = stored
        self._cache = cache
        self._recent = recent

    @property
    def parsed(self) -> ParsedMessage:
        return self._cache.get(self.stored.blob)

    def _part(self) -> MimePart:
        return self.parsed.root

    def getUID(self) -> int:
        return self.stored.uid

    def getFlags(self) -> list[str]:
        flags = set(self.stored.flags)
        if self._recent:
            flags.add(RECENT)
        return sorted_flags(flags)

    def flags_response(self) -> bytes:
        """``render_flags(self.getFlags())``, memoised per distinct set of flags."""
        return _message_flags(frozenset(self.stored.flags), self._recent)

    def getInternalDate(self) -> str:
        return email.utils.format_datetime(self.stored.internaldate)

    def getSize(self) -> int:
        return self.stored.size

    def header(self) -> bytes:
        """The header block (BODY[HEADER]), without reading the body when the session has no copy."""
        return self._cache.header(self.stored.blob)

    def open(self) -> io.BytesIO:
        return io.BytesIO(self.parsed.raw)

    def with_flags(self, flags: frozenset[str]) -> StoreMessage:
        return StoreMessage(
            StoredMessage(self.stored.uid, self.stored.size, self.stored.internaldate, flags, self.stored.blob),
            self._cache,
            self._recent,
        )


@dataclass(frozen=True)
class MailboxDelta:
    """What changed since the session last reported the folder (RFC 3501 §7.3.1, §7.4.1)."""

    expunged: list[int]  # sequence numbers, descending, so each is valid when sent
    exists: int | None
    recent: int | None


@implementer(imap4.IMailboxInfo)
class FolderListing:
    """``IMailboxInfo`` for LIST/LSUB results."""

    def __init__(self, flags: list[str]) -> None:
        self._flags = flags

    def getFlags(self) -> list[str]:
        return list(self._flags)

    def getHierarchicalDelimiter(self) -> str:
        return DELIMITER


@implementer(imap4.IMailbox, imap4.ISearchableMailbox, imap4.ICloseableMailbox)
class StoreMailbox:
    """A selected folder as one session sees it.

    The session keeps its own list of UIDs so that sequence numbers only change when the client is told
    (RFC 3501 §7.4.1): arrivals are appended by :meth:`refresh`, expunges by other sessions are applied only
    where an EXPUNGE response is allowed.  Flags are always read fresh from the store, for the messages a
    command names only (one query per command, whatever the size of the folder).

    The (UID, flags) listing read when the folder is opened serves every SELECT response (FLAGS, EXISTS,
    UNSEEN, UIDVALIDITY, UIDNEXT: one snapshot), then is dropped by :meth:`opened`.
    """

    def __init__(self, account: StoreAccount, info: FolderInfo, writable: bool) -> None:
        self.account = account
        self.info = info
        self.folder_id = info.id
        self._writable = writable
        self._listeners: list[Any] = []
        listing = account.store.message_flags(info.id)
        self._opening: list[tuple[int, frozenset[str]]] | None = listing
        self.uids: list[int] = [u for u, _ in listing]
        self._highest = self.uids[-1] if self.uids else 0
        self._recent: set[int] = set()

    def _listing(self) -> list[tuple[int, frozenset[str]]]:
        if self._opening is not None:
            return self._opening
        return self.account.store.message_flags(self.folder_id)

    def opened(self) -> None:
        """The SELECT responses are sent: later questions read the store again."""
        self._opening = None

    # -- IMailboxInfo --
    def getFlags(self) -> list[str]:
        keywords: set[str] = set()
        for flags in {flags for _, flags in self._listing()}:
            keywords.update(f for f in flags if not f.startswith("\\"))
        return sorted_flags([*SYSTEM_FLAGS, *keywords])

    def getHierarchicalDelimiter(self) -> str:
        return DELIMITER

    # -- IMailbox --
    def _fresh_info(self) -> FolderInfo:
        if self._opening is not None:
            return self.info  # read just before the listing: UIDNEXT below is at least its highest + 1
        for info in self.account.store.list_folders(self.account.login.mailbox_id):
            if info.id == self.folder_id:
                self.info = info
                break
        return self.info

    def getUIDValidity(self) -> int:
        return self._fresh_info().uidvalidity

    def getUIDNext(self) -> int:
        return max(self._fresh_info().uidnext, self._highest + 1)

    def getUID(self, message: int) -> int:
        return self.uids[message - 1]

    def getMessageCount(self) -> int:
        return len(self.uids)

    def getRecentCount(self) -> int:
        return len(self._recent)

    def getUnseenCount(self) -> int:
        return sum(1 for _, flags in self._listing() if SEEN not in flags)

    def first_unseen(self) -> int | None:
        """Sequence number of the first message without \\Seen (RFC 3501 §7.1 UNSEEN)."""
        unseen = {uid for uid, flags in self._listing() if SEEN not in flags}
        return next((i + 1 for i, uid in enumerate(self.uids) if uid in unseen), None)

    def isWriteable(self) -> bool:
        return self._writable

    def destroy(self) -> None:
        raise imap4.MailboxException("Folders are deleted through the account")

    def requestStatus(self, names: Iterable[str]) -> dict[str, int]:
        info = self._fresh_info()
        values = {"MESSAGES": info.exists, "RECENT": 0, "UIDNEXT": info.uidnext,
                  "UIDVALIDITY": info.uidvalidity, "UNSEEN": info.unseen}
        return {n.upper(): values[n.upper()] for n in names}

    def addListener(self, listener: Any) -> None:
        if listener not in self._listeners:
            self._listeners.append(listener)

    def removeListener(self, listener: Any) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def addMessage(self, message: Any, flags: Iterable[str], date: Any = None) -> Deferred[int]:
        """Append (RFC 3501 §6.3.11); ``message`` is a file or bytes, ``date`` a datetime or RFC 5322 date."""
        raw = message if isinstance(message, bytes) else message.read()
        when: dt.datetime | None
        if date is None or isinstance(date, dt.datetime):
            when = date
        else:
            text = date if isinstance(date, bytes) else date.encode("ascii")
            try:
                when = parse_datetime(text.strip(b'"'))  # IMAP date-time, as Twisted passes it
            except CommandBad:
                when = email.utils.parsedate_to_datetime(text.decode("ascii"))  # RFC 5322 date
        return defer.ensureDeferred(self._add(raw, flags, when))

    async def _add(self, raw: bytes, flags: Iterable[str], when: dt.datetime | None) -> int:
        if not self._writable:
            raise imap4.ReadOnlyMailbox()
        _, uid = await self.account.append_to(self.info, raw, flags, when)
        return uid

    def expunge(self) -> Deferred[list[int]]:
        """EXPUNGE (RFC 3501 §6.4.3): sequence numbers removed, descending."""
        return defer.ensureDeferred(self.expunge_uids(None))

    def fetch(self, messages: imap4.MessageSet | SequenceSet, uid: bool) -> list[tuple[int, StoreMessage]]:
        return self.messages_for(self.resolve(messages, uid))

    def store(self, messages: imap4.MessageSet | SequenceSet, flags: Iterable[str], mode: int,
              uid: bool) -> Deferred[dict[int, list[str]]]:
        """Twisted's STORE contract: mode 1 add, -1 remove, 0 replace; result keyed by sequence number."""
        pairs = self.resolve(messages, uid)
        kind: FlagMode = "add" if mode > 0 else "remove" if mode < 0 else "set"

        async def run() -> dict[int, list[str]]:
            changed = await self.store_flags([u for _, u in pairs], list(flags), kind)
            return {seq: sorted_flags(changed[u]) for seq, u in pairs if u in changed}

        return defer.ensureDeferred(run())

    # -- ISearchableMailbox --
    def search(self, query: SearchKey | Sequence[Any], uid: bool = False) -> Deferred[list[int]]:
        """Matching sequence numbers (Twisted's server maps them to UIDs for UID SEARCH)."""
        key = query if not isinstance(query, list) else search_key_from_twisted(query)
        return defer.ensureDeferred(self.search_seqs(key))  # type: ignore[arg-type]

    # -- ICloseableMailbox --
    def close(self) -> None:
        self._listeners.clear()

    # -- session view --
    def resolve(self, messages: imap4.MessageSet | SequenceSet, uid: bool) -> list[tuple[int, int]]:
        """(sequence number, UID) pairs named by a sequence-set or uid-set (RFC 3501 §6.4.8)."""
        seqset = messages if isinstance(messages, SequenceSet) else SequenceSet.from_twisted(messages)
        if uid:
            uids = self.uids
            star = uids[-1] if uids else 0
            return [(i + 1, uids[i]) for i in seqset.select_indices(uids, star)]
        count = len(self.uids)
        if count == 0:
            if seqset.highest_explicit() > 1 or any(None not in r for r in seqset.ranges):
                raise CommandBad("Invalid message sequence number: the folder is empty")
            return []
        if seqset.highest_explicit() > count:
            raise CommandBad("Invalid message sequence number")
        return [(s, self.uids[s - 1]) for s in seqset.select(range(1, count + 1), count)]

    def messages_for(self, pairs: Sequence[tuple[int, int]]) -> list[tuple[int, StoreMessage]]:
        """Message objects for the pairs still present in the store (RFC 2180 §4.1.2: an expunged
        message not yet reported is silently left out)."""
        if not pairs:
            return []
        found = self.account.store.messages(self.folder_id, [u for _, u in pairs])
        cache, recent = self.account.cache, self._recent
        if len(found) == len(pairs) and all(m.uid == u for m, (_, u) in zip(found, pairs)):
            return [(seq, StoreMessage(m, cache, m.uid in recent)) for m, (seq, _) in zip(found, pairs)]
        current = {m.uid: m for m in found}
        return [(seq, StoreMessage(current[u], cache, u in recent)) for seq, u in pairs if u in current]

    def iter_messages(self, pairs: Sequence[tuple[int, int]], *,
                      content: bool = False) -> Iterator[tuple[int, StoreMessage]]:
        """:meth:`messages_for`, read from the store :data:`FETCH_BATCH` messages at a time as the caller
        consumes them (a FETCH response is streamed: a large folder is never held whole, and its objects
        die young instead of loading the garbage collector's oldest generation).  The first batch is
        read at once, so a store failure fails the command before any response is sent. With `content`
        (the FETCH needs headers or bodies), the small bodies of each batch are read together with it."""

        def read(batch: Sequence[tuple[int, int]]) -> list[tuple[int, StoreMessage]]:
            found = self.messages_for(batch)
            if content:
                self.account.cache.preload([m.stored.blob for _, m in found])
            return found

        first = read(pairs[:FETCH_BATCH])

        def batches() -> Iterator[tuple[int, StoreMessage]]:
            yield from first
            for start in range(FETCH_BATCH, len(pairs), FETCH_BATCH):
                yield from read(pairs[start : start + FETCH_BATCH])
            if content:
                self.account.cache.preload([])  # the last batch's bodies are not kept past the command

        return batches()

    def refresh(self, allow_expunge: bool) -> MailboxDelta:
        """Bring the session view up to date with the store (new arrivals always, expunges if allowed).

        Incremental: arrivals are the UIDs above the highest one seen (UIDs are allocated in commit order,
        RFC 3501 §2.3.1.1), and the whole UID list is read only when the count of messages up to that UID
        shows that some of the session's messages are gone. A NOOP on a large folder costs two index
        lookups, not a read of the folder."""
        store = self.account.store
        arrived = [uid for uid, _ in store.message_flags(self.folder_id, after=self._highest)]
        expunged: list[int] = []
        if allow_expunge and self.uids and store.message_count(self.folder_id, up_to=self._highest) != len(self.uids):
            present = {uid for uid, _ in store.message_flags(self.folder_id)}
            kept: list[int] = []
            for index, u in enumerate(self.uids):
                if u in present:
                    kept.append(u)
                else:
                    expunged.append(index + 1)
                    self._recent.discard(u)
            self.uids = kept
            expunged.reverse()
        if arrived:
            self.uids.extend(arrived)
            self._recent.update(arrived)
            self._highest = arrived[-1]
        return MailboxDelta(
            expunged=expunged,
            exists=len(self.uids) if arrived else None,
            recent=len(self._recent) if arrived else None,
        )

    def forget(self, removed_uids: Iterable[int]) -> list[int]:
        """Drop UIDs this session itself expunged; returns their sequence numbers, descending."""
        removed = set(removed_uids)
        seqs = [i + 1 for i, u in enumerate(self.uids) if u in removed]
        self.uids = [u for u in self.uids if u not in removed]
        self._recent -= removed
        seqs.reverse()
        return seqs

    async def store_flags(self, uids: Sequence[int], flags: Sequence[str], mode: FlagMode) -> dict[int, frozenset[str]]:
        """STORE (RFC 3501 §6.4.6); audits READ for each message whose \\Seen flag this sets."""
        if not self._writable:
            raise CommandNo("The folder is read-only (EXAMINE)")
        if not uids:
            return {}
        before = {m.uid: m for m in self.account.store.messages(self.folder_id, uids)}
        changed = await bridge(self.account.store.set_flags(self.folder_id, uids, flags, mode))
        for u, new in changed.items():
            old = before.get(u)
            if SEEN in new and old is not None and SEEN not in old.flags:
                self.account.audit_message(AuditEvent.READ, self.folder_id, old)
        return changed

    async def mark_read(self, messages: Sequence[StoreMessage]) -> dict[int, frozenset[str]]:
        """Implicit \\Seen of a non-PEEK body fetch (RFC 3501 §6.4.5), then READ audited for every
        message before any content is sent."""
        unseen = [m.stored.uid for m in messages if SEEN not in m.stored.flags]
        changed: dict[int, frozenset[str]] = {}
        if self._writable and unseen:
            changed = await bridge(self.account.store.set_flags(self.folder_id, unseen, [SEEN], "add"))
        for m in messages:
            self.account.audit_message(AuditEvent.READ, self.folder_id, m.stored)
        return changed

    async def expunge_uids(self, uids: Sequence[int] | None) -> list[int]:
        """EXPUNGE / UID EXPUNGE (RFC 4315 §2.1); audits DELETE; returns sequence numbers, descending."""
        if not self._writable:
            raise CommandNo("The folder is read-only (EXAMINE)")
        wanted = None if uids is None else set(uids)
        deleted = [u for u, flags in self.account.store.message_flags(self.folder_id)
                   if DELETED in flags and (wanted is None or u in wanted)]
        if not deleted:
            return []
        doomed = {m.uid: m for m in self.account.store.messages(self.folder_id, deleted) if DELETED in m.flags}
        if not doomed:
            return []
        # Message-IDs are read before the blobs may be collected.
        message_ids = {u: self.account.message_id(m) for u, m in doomed.items()}
        candidates = None if uids is None else sorted(doomed)
        removed = await bridge(self.account.store.expunge(self.folder_id, candidates))
        for u in removed:
            self.account.audit(AuditEvent.DELETE, self.folder_id, u, message_ids.get(u))
        return self.forget(removed)

    async def search_seqs(self, key: SearchKey) -> list[int]:
        """Evaluate a SEARCH program over the session view, yielding to the reactor between batches."""
        current = {m.uid: m for m in self.account.store.messages(self.folder_id)}
        uids = list(self.uids)
        count = len(uids)
        star_uid = uids[-1] if uids else 0
        found: list[int] = []
        for index, u in enumerate(uids):
            if index and index % SEARCH_BATCH == 0:
                await _cooperate()
            stored = current.get(u)
            if stored is None:
                continue
            candidate = _Candidate(index + 1, stored, u in self._recent, self.account.cache)
            if matches(key, candidate, count, star_uid):
                found.append(index + 1)
        return found


@dataclass
class _Candidate:
    """One message under SEARCH evaluation; the body is parsed only if a key needs it."""

    seq: int
    stored: StoredMessage
    recent: bool
    cache: ParseCache

    @property
    def parsed(self) -> ParsedMessage:
        return self.cache.get(self.stored.blob)

    def has_flag(self, flag: str) -> bool:
        wanted = flag.casefold()
        return any(f.casefold() == wanted for f in self.stored.flags)


def _compare_date(value: dt.date, op: str, ref: dt.date) -> bool:
    if op == "BEFORE":
        return value < ref
    if op == "ON":
        return value == ref
    return value >= ref


def matches(key: SearchKey, c: _Candidate, max_seq: int, max_uid: int) -> bool:
    """Does a message satisfy a search key (RFC 3501 §6.4.4)?  String matches are case-insensitive
    substrings of RFC 2047-decoded header values and of decoded text parts."""
    if isinstance(key, SAll):
        return True
    if isinstance(key, SAnd):
        return all(matches(k, c, max_seq, max_uid) for k in key.keys)
    if isinstance(key, SOr):
        return matches(key.left, c, max_seq, max_uid) or matches(key.right, c, max_seq, max_uid)
    if isinstance(key, SNot):
        return not matches(key.key, c, max_seq, max_uid)
    if isinstance(key, SFlag):
        return c.has_flag(key.flag) == key.present
    if isinstance(key, SRecent):
        if key.kind == "RECENT":
            return c.recent
        if key.kind == "NEW":
            return c.recent and not c.has_flag(SEEN)
        return not c.recent
    if isinstance(key, SSize):
        return c.stored.size > key.size if key.larger else c.stored.size < key.size
    if isinstance(key, SSet):
        return key.messages.contains(c.stored.uid if key.uid else c.seq, max_uid if key.uid else max_seq)
    if isinstance(key, SDate):
        if key.sent:
            value = c.parsed.sent_date() or c.stored.internaldate.date()
        else:
            value = _utc(c.stored.internaldate).date()
        return _compare_date(value, key.op, key.date)
    if isinstance(key, SHeader):
        values = c.parsed.header_values(key.name)
        if not key.value:
            return bool(values)
        return any(key.value in v for v in values)
    if isinstance(key, SText):
        if key.with_headers and key.value in c.parsed.header_text():
            return True
        return key.value in c.parsed.body_text()
    raise TypeError(f"unknown search key {key!r}")


@implementer(imap4.IAccount, imap4.INamespacePresenter)
class StoreAccount:
    """The folders of one directory mailbox (BAL), as seen by one authenticated session."""

    def __init__(self, store: MailStore, login: ImapLogin, audit: AuditSink) -> None:
        self.store = store
        self.login = login
        self._audit = audit
        self.cache = ParseCache(store)

    # -- audit --
    def audit(self, event: AuditEvent, folder_id: int, uid: int, message_id: str | None) -> None:
        self._audit.record(event, actor=self.login.principal, protocol="imap", mailbox=self.login.address,
                           message_id=message_id, detail={"folder_id": str(folder_id), "uid": str(uid)})

    def audit_message(self, event: AuditEvent, folder_id: int, stored: StoredMessage) -> None:
        self.audit(event, folder_id, stored.uid, self.message_id(stored))

    def message_id(self, stored: StoredMessage) -> str | None:
        return self.cache.get(stored.blob).message_id

    # -- folders --
    def folders(self) -> list[FolderInfo]:
        return self.store.list_folders(self.login.mailbox_id)

    def folder(self, name: str) -> FolderInfo | None:
        return self.store.get_folder(self.login.mailbox_id, name)

    def require_folder(self, name: str) -> FolderInfo:
        info = self.folder(name)
        if info is None:
            raise CommandNo("No such folder", b"NONEXISTENT")
        return info

    def addMailbox(self, name: str, mbox: Any = None) -> Deferred[bool]:
        if mbox is not None:
            raise imap4.MailboxException("Only store-backed folders can be added")
        return self.create(name)

    def create(self, pathspec: str) -> Deferred[bool]:
        """CREATE (RFC 3501 §6.3.3), creating missing superior levels as the RFC recommends."""
        return defer.ensureDeferred(self._create(pathspec))

    async def _create(self, pathspec: str) -> bool:
        name = validate_new_mailbox_name(pathspec)
        if self.folder(name) is not None:
            raise CommandNo("Folder already exists", b"ALREADYEXISTS")
        levels = name.split(DELIMITER)
        for depth in range(1, len(levels) + 1):
            prefix = DELIMITER.join(levels[:depth])
            if self.folder(prefix) is None:
                await bridge(self.store.create_folder(self.login.mailbox_id, prefix))
        return True

    def select(self, name: str, rw: bool = True) -> StoreMailbox | None:
        info = self.folder(name)
        return None if info is None else StoreMailbox(self, info, bool(rw))

    def delete(self, name: str) -> Deferred[bool]:
        """DELETE (RFC 3501 §6.3.4).  INBOX cannot be deleted; a folder with children is refused because
        the store cannot keep a \\Noselect placeholder."""
        return defer.ensureDeferred(self._delete(name))

    async def _delete(self, name: str) -> bool:
        if name.upper() == "INBOX":
            raise CommandNo("INBOX cannot be deleted", b"CANNOT")
        info = self.require_folder(name)
        prefix = info.name + DELIMITER
        if any(f.name.startswith(prefix) for f in self.folders()):
            raise CommandNo("Folder has subfolders; delete them first", b"INUSE")
        await bridge(self.store.delete_folder(info.id))
        return True

    def rename(self, oldname: str, newname: str) -> Deferred[bool]:
        """RENAME (RFC 3501 §6.3.5): inferior names follow; renaming INBOX moves its messages out."""
        return defer.ensureDeferred(self._rename(oldname, newname))

    async def _rename(self, oldname: str, newname: str) -> bool:
        source = self.require_folder(oldname)
        target = validate_new_mailbox_name(newname)
        if target == "INBOX":
            raise CommandNo("Cannot rename to INBOX", b"CANNOT")
        if self.folder(target) is not None:
            raise CommandNo("Target folder already exists", b"ALREADYEXISTS")
        if source.name != "INBOX" and target.startswith(source.name + DELIMITER):
            raise CommandNo("Cannot move a folder below itself", b"CANNOT")
        parent = target.rpartition(DELIMITER)[0]
        if parent and self.folder(parent) is None:
            await self._create(parent)
        if source.name == "INBOX":
            created = await bridge(self.store.create_folder(self.login.mailbox_id, target))
            uids = [m.uid for m in self.store.messages(source.id)]
            if uids:
                await bridge(self.store.move(source.id, uids, created.id))
            return True
        prefix = source.name + DELIMITER
        children = sorted((f for f in self.folders() if f.name.startswith(prefix)), key=lambda f: f.name)
        await bridge(self.store.rename_folder(source.id, target))
        for child in children:
            await bridge(self.store.rename_folder(child.id, target + DELIMITER + child.name[len(prefix):]))
        return True

    # Every existing folder is subscribed: the store keeps no separate subscription list.
    def isSubscribed(self, name: str) -> bool:
        return self.folder(name) is not None

    def subscribe(self, name: str) -> bool:
        self.require_folder(name)
        return True

    def unsubscribe(self, name: str) -> bool:
        if self.folder(name) is not None:
            raise CommandNo("Every existing folder is subscribed on this server", b"CANNOT")
        return True

    def listMailboxes(self, ref: str, wildcard: str) -> list[tuple[str, FolderListing]]:
        """LIST (RFC 3501 §6.3.8) with CHILDREN attributes (RFC 3348); implied parents are \\Noselect."""
        pattern = wildcard if wildcard.startswith(DELIMITER) or not ref else ref + wildcard
        head, sep, tail = pattern.partition(DELIMITER)
        if head.upper() == "INBOX":
            pattern = "INBOX" + sep + tail
        regex = re.compile(
            "".join(".*" if ch == "*" else "[^/]*" if ch == "%" else re.escape(ch) for ch in pattern) + r"\Z"
        )
        existing = {f.name for f in self.folders()}
        implied = {DELIMITER.join(n.split(DELIMITER)[:i]) for n in existing
                   for i in range(1, n.count(DELIMITER) + 1)} - existing
        names = sorted(existing | implied, key=lambda n: (n != "INBOX", n))
        out: list[tuple[str, FolderListing]] = []
        for name in names:
            if not regex.match(name):
                continue
            has_children = any(other.startswith(name + DELIMITER) for other in existing | implied)
            flags = ["\\HasChildren" if has_children else "\\HasNoChildren"]
            if name in implied:
                flags.insert(0, "\\Noselect")
            out.append((name, FolderListing(flags)))
        return out

    async def append_to(self, info: FolderInfo, raw: bytes, flags: Iterable[str],
                        when: dt.datetime | None) -> tuple[FolderInfo, int]:
        """APPEND (RFC 3501 §6.3.11), audited as APPEND."""
        uid = await bridge(self.store.append(info.id, raw, list(flags), when))
        self.audit(AuditEvent.APPEND, info.id, uid, _message_id_of(raw))
        return info, uid

    # -- INamespacePresenter (RFC 2342) --
    def getPersonalNamespaces(self) -> list[list[str]]:
        return [["", DELIMITER]]

    def getSharedNamespaces(self) -> None:
        return None

    def getOtherNamespaces(self) -> None:
        return None

    def getUserNamespaces(self) -> None:
        return None


# ---------------------------------------------------------------------------------------------------------
# Streaming with back-pressure
# ---------------------------------------------------------------------------------------------------------


STREAM_WRITE_SIZE = 64 * 1024  # bytes of responses gathered into one write (four full TLS records)


@implementer(interfaces.IPushProducer)
class _ResponseStream:
    """Writes FETCH responses as they are rendered, pausing while the transport buffer is full.

    Responses are gathered into writes of about :data:`STREAM_WRITE_SIZE` bytes: one write per message
    would cost one TLS record (and its encryption call) per message of a header listing."""

    def __init__(self, transport: Any, chunks: Iterator[bytes]) -> None:
        self._transport = transport
        self._chunks = chunks
        self._paused = False
        self._pumping = False
        self._finished = False
        self._done: Deferred[None] = Deferred()

    def start(self) -> Deferred[None]:
        self._transport.registerProducer(self, True)
        self._pump()
        return self._done

    def _finish(self, failure: Failure | None = None) -> None:
        if self._finished:
            return
        self._finished = True
        self._transport.unregisterProducer()
        if failure is None:
            self._done.callback(None)
        else:
            self._done.errback(failure)

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        batch: list[bytes] = []
        size = 0
        try:
            while not self._paused and not self._finished:
                try:
                    chunk = next(self._chunks)
                except StopIteration:
                    self._write(batch)
                    self._finish()
                    return
                except Exception:
                    self._write(batch)
                    self._finish(Failure())
                    return
                batch.append(chunk)
                size += len(chunk)
                if size >= STREAM_WRITE_SIZE:
                    self._write(batch)  # may pause us (the transport's buffer is full)
                    batch, size = [], 0
            self._write(batch)
        finally:
            self._pumping = False

    def _write(self, batch: list[bytes]) -> None:
        if batch and not self._finished:
            self._transport.write(batch[0] if len(batch) == 1 else b"".join(batch))

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        if not self._finished:
            self._finished = True
            self._done.errback(Failure(_ConnectionGone()))


# ---------------------------------------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------------------------------------

Handler = Callable[..., Any]
_NO_EXPUNGE_DURING = (b"FETCH", b"STORE", b"SEARCH")  # RFC 3501 §7.4.1 (the UID forms may expunge)
_STATUS_ITEMS = ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN")


def _message_id_of(raw: bytes) -> str | None:
    header, _ = split_message(raw)
    for f in parse_header_fields(header):
        if f.key == "message-id":
            return f.value().decode("ascii", "replace")
    return None


class IMAPServer(imap4.IMAP4Server):
    """Twisted's ``IMAP4Server`` with every defect we depend on fixed here, in one visible place.

    Fixes (each is also commented where it is made):

    1. STARTTLS command injection: bytes pipelined after STARTTLS are discarded (``clearLineBuffer``).
    2. No password authentication at all: LOGINDISABLED always, LOGIN refused, only AUTH=EXTERNAL, and
       only under TLS (Twisted adds PLAIN/LOGIN challengers after STARTTLS).
    3. SEARCH implemented here (Twisted's header keys crash on Python 3 with bytes/str).
    4. APPEND without a flag list (Twisted: TypeError) and without a date-time.
    5. ENVELOPE: NIL for a missing From, RFC 3501 group markers (Twisted emits a 3-element address).
    6. BODY[] and BODY[HEADER]/[TEXT]/[n]/[n.MIME] byte-exact (Twisted re-synthesises headers).
    7. APPEND literal capped before any byte is read (Twisted buffers any size, leaks temp files);
       malformed and non-synchronizing literals are refused without reading them.
    8. Extensions: UIDPLUS, MOVE, ID, ENABLE, UNSELECT, CHILDREN, SASL-IR, APPENDLIMIT; IDLE kept.
    9. No exception text ever reaches the client: generic text plus an opaque reference, detail logged.

    Also: commands are executed one at a time in arrival order (Twisted runs pipelined commands
    concurrently when one is asynchronous, RFC 3501 §5.5), sequence numbers only change where RFC 3501
    §7.4.1 allows, the partial FETCH response carries only the origin (``BODY[]<0>``, §7.4.2), and the
    \\Seen flag is set by non-PEEK body fetches (§6.4.5).
    """

    MAX_LENGTH = MAX_LINE_LENGTH
    timeOut = 60  # before authentication
    POSTAUTH_TIMEOUT = 30 * 60  # RFC 3501 §5.4 (at least 30 minutes)
    _literalStringLimit = MAX_STRING_LITERAL

    factory: IMAPFactory
    transport: Any
    account: StoreAccount | None
    mbox: StoreMailbox | None
    _pendingLiteral: Any

    def __init__(self, factory: IMAPFactory) -> None:
        # Fix 2: no challengers at all; EXTERNAL is handled by cmd_authenticate below.
        super().__init__(chal={}, contextFactory=None if factory.implicit_tls else factory.tls_context_factory)
        self.factory = factory
        self.conn_id = factory.next_connection_id()
        self._in_flight: bytes | None = None
        self._current_cmd: bytes | None = None
        self._dirty = False
        self._watched_folder: int | None = None
        self._sasl_tag: bytes | None = None
        self._idle_tag: bytes | None = None
        self._auth_failures = 0
        self._literal_count = 0
        self._closed = False
        self._peer = "-"

    # -- connection lifecycle --------------------------------------------------------------------------

    def connectionMade(self) -> None:
        """Log the connection and send the greeting (RFC 3501 §7.1.1)."""
        # Responses go out in several writes (untagged data, then the tagged completion): without
        # TCP_NODELAY (Twisted leaves it off) the last one can wait for the client's delayed ACK.
        set_nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            set_nodelay(True)
        peer = self.transport.getPeer()
        self._peer = getattr(peer, "host", "-")
        logger.info("imap connect conn=%s peer=%s tls=%s", self.conn_id, self._peer, self.factory.implicit_tls)
        self.factory.metrics["connections"] += 1
        super().connectionMade()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        """Drop the store listener and the selected folder."""
        self._closed = True
        self._deselect()
        logger.info("imap disconnect conn=%s", self.conn_id)
        super().connectionLost(reason)

    def sendServerGreeting(self) -> None:
        """Greeting with the CAPABILITY response code (RFC 3501 §7.1.1 and §7.2.1)."""
        caps = b" ".join(self.listCapabilities())
        host = _safe_text(self.factory.hostname, 100)
        self._untagged(b"OK [CAPABILITY " + caps + b"] " + host + b" Caducee IMAP4rev1 ready")

    def lineLengthExceeded(self, line: bytes) -> None:
        """A line above :data:`MAX_LINE_LENGTH` octets: BYE and close (RFC 3501 §7.1.5)."""
        self._untagged(b"BYE Command line too long")
        self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        """Autologout timer (RFC 3501 §5.4)."""
        self._untagged(b"BYE Autologout; idle for too long")
        self.transport.loseConnection()

    # -- capabilities (fix 2, fix 8) ---------------------------------------------------------------------

    def _tls_active(self) -> bool:
        return (self.factory.implicit_tls or self.startedTLS
                or interfaces.ISSLTransport(self.transport, None) is not None)

    def listCapabilities(self) -> list[bytes]:
        """RFC 3501 §7.2.1.  AUTH=EXTERNAL and SASL-IR only under TLS; LOGINDISABLED always."""
        caps = [b"IMAP4rev1"]
        if self.state == "unauth":
            if self._tls_active():
                caps += [b"AUTH=EXTERNAL", b"SASL-IR"]
            elif self.ctx is not None:
                caps.append(b"STARTTLS")
            caps.append(b"LOGINDISABLED")
        caps += [b"ID", b"ENABLE", b"IDLE", b"NAMESPACE", b"CHILDREN", b"UNSELECT", b"UIDPLUS", b"MOVE",
                 b"APPENDLIMIT=%d" % self.factory.max_append_size]
        return caps

    def capabilities(self) -> dict[bytes, Any]:
        """Twisted's view of :meth:`listCapabilities`, kept consistent for its callers."""
        caps: dict[bytes, Any] = {}
        for cap in self.listCapabilities()[1:]:
            name, _, value = cap.partition(b"=")
            caps.setdefault(name, [] if value else None)
            if value:
                caps[name].append(value)
        return caps

    # -- line handling, serial execution, literals (fix 7) ---------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        """One command line (or the rest of one after a literal, a SASL response, or DONE)."""
        self.resetTimeout()
        if self.parseState in ("command", "pending"):
            marker = _LITERAL_MARKER_RE.search(line)
            if marker is not None and not _SYNC_LITERAL_RE.fullmatch(marker.group(1)):
                self._refuse_literal(line, nonsync=bool(_NONSYNC_LITERAL_RE.fullmatch(marker.group(1))))
                return
        try:
            getattr(self, "parse_" + self.parseState)(line)
        except Exception:
            self._command_failed(Failure(), self._in_flight)
        # Serial execution: while an asynchronous command is running, stop reading further lines
        # (Twisted would dispatch them at once; RFC 3501 §5.5 forbids ambiguous concurrency).
        if (self._in_flight is not None and self.parseState == "command" and not self.paused
                and not self._closed and not self.transport.disconnecting):
            self.pauseProducing()

    def _refuse_literal(self, line: bytes, nonsync: bool) -> None:
        """Fix 7: a literal we will not read.  A non-synchronizing one (LITERAL+, not advertised) is
        followed by its data at once: close rather than parse that data as commands (RFC 7888 §4)."""
        tag = self._in_flight if self.parseState == "pending" else line.split(b" ", 1)[0]
        if tag is not None and not _TAG_RE.fullmatch(tag):
            tag = None
        self.parseState = "command"
        self._pendingLiteral = None
        if nonsync:
            self.factory.metrics["nonsync_literal_refused"] += 1
            self.clearLineBuffer()
            self._respond(b"BAD", tag, b"Non-synchronizing literals are not supported")
            self._untagged(b"BYE Protocol error")
            self.transport.loseConnection()
        else:
            self._respond(b"BAD", tag, b"Invalid literal")

    def parse_command(self, line: bytes) -> None:
        """tag SP command [SP arguments] (RFC 3501 §2.2.1, §9 command)."""
        if not line.strip():
            self._untagged(b"BAD Empty command line")
            return
        parts = line.split(b" ", 2)
        tag = parts[0]
        if not _TAG_RE.fullmatch(tag):
            self._untagged(b"BAD Invalid tag")
            return
        if len(parts) < 2 or not parts[1]:
            self._bad(tag, b"Missing command")
            return
        cmd = parts[1].upper()
        rest = parts[2] if len(parts) == 3 else None
        self._in_flight = tag
        self._current_cmd = cmd
        self._literal_count = 0
        try:
            self.dispatchCommand(tag, cmd, rest)
        except Exception:
            self._command_failed(Failure(), tag)

    def dispatchCommand(self, tag: bytes, cmd: bytes, rest: bytes | None, uid: int | None = None) -> None:
        """Run a command from :attr:`COMMANDS` for the current state (RFC 3501 §3)."""
        entry = self.lookupCommand(cmd)
        if entry is None:
            known = any(cmd in table for table in self.COMMANDS.values())
            raise CommandBad("Command not valid in this state" if known else "Unknown command")
        handler, *parsers = entry
        self._run_parsers(tag, handler, [tag], parsers, rest, uid)

    def lookupCommand(self, cmd: bytes) -> tuple[Any, ...] | None:
        """Our command table only: Twisted's ``<state>_<COMMAND>`` attributes are never consulted."""
        return self.COMMANDS.get(self.state, {}).get(cmd)

    def _run_parsers(self, tag: bytes, handler: Handler, args: list[Any], parsers: list[Any],
                     line: bytes | None, uid: int | None) -> None:
        while parsers:
            parser = parsers.pop(0)
            if not callable(parser):
                args.append(parser)
                continue
            result = parser(self, line)
            if isinstance(result, Deferred):
                result.addCallback(self._parsers_resume, tag, handler, args, parsers, uid)
                result.addErrback(self._command_failed, tag)
                return
            value, line = result
            args.append(value)
        if line and line.strip():
            raise CommandBad("Too many arguments")
        outcome = handler(self, *args, uid=uid) if uid is not None else handler(self, *args)
        if asyncio.iscoroutine(outcome):
            outcome = defer.ensureDeferred(outcome)
        if isinstance(outcome, Deferred):
            outcome.addErrback(self._command_failed, tag)

    def _parsers_resume(self, result: tuple[Any, bytes], tag: bytes, handler: Handler, args: list[Any],
                        parsers: list[Any], uid: int | None) -> None:
        value, rest = result
        args.append(value)
        self._run_parsers(tag, handler, args, parsers, rest, uid)

    def _command_failed(self, failure: Failure, tag: bytes | None) -> None:
        """Fix 9: map a failure to a tagged completion; unexpected errors never show their text."""
        if self._closed or failure.check(_ConnectionGone):
            return None
        self.parseState = "command"
        self._pendingLiteral = None
        self._sasl_tag = self._idle_tag = None
        if self.line_mode == 0:
            self.setLineMode()
        exc = failure.value
        if isinstance(exc, CommandError):
            self._respond(exc.state, tag, exc.response())
        elif isinstance(exc, imap4.IllegalClientResponse):
            self._respond(b"BAD", tag, b"Syntax error: " + _safe_text(str(exc), 100))
        elif isinstance(exc, imap4.IllegalMailboxEncoding):
            self._respond(b"NO", tag, b"Invalid mailbox name")
        elif isinstance(exc, imap4.ReadOnlyMailbox):
            self._respond(b"NO", tag, b"The folder is read-only")
        else:
            ref = secrets.token_hex(5).upper()
            self.factory.metrics["internal_errors"] += 1
            logger.error("imap internal error conn=%s cmd=%s ref=%s", self.conn_id,
                         (self._current_cmd or b"-").decode("ascii", "replace"), ref,
                         exc_info=cast(Any, (failure.type, failure.value, failure.getTracebackObject())))
            self._respond(b"NO", tag, b"[SERVERBUG] Internal server error (ref " + ref.encode() + b")")
        return None

    def _respond(self, state: bytes, tag: bytes | None, message: bytes | None) -> None:
        """Every response line goes through here.  Before a tagged completion, pending mailbox changes
        are reported (RFC 3501 §7.3.1, §7.4.1); after it, reading resumes (serial execution)."""
        tagged = tag is not None and state in (b"OK", b"NO", b"BAD")
        if tagged:
            self._report_changes()
        line = (tag or b"*") + b" " + state + (b" " + message if message else b"")
        self.transport.write(line + b"\r\n")
        if tagged and tag == self._in_flight:
            self._in_flight = None
            self._current_cmd = None
            if self.paused and not self._closed and not self.transport.disconnecting:
                self.resumeProducing()

    def _line(self, line: bytes) -> None:
        self.transport.write(line + b"\r\n")

    def _untagged(self, text: bytes) -> None:
        self._respond(text, None, None)

    def _ok(self, tag: bytes | None, text: bytes) -> None:
        self._respond(b"OK", tag, text)

    def _no(self, tag: bytes | None, text: bytes) -> None:
        self._respond(b"NO", tag, text)

    def _bad(self, tag: bytes | None, text: bytes) -> None:
        self._respond(b"BAD", tag, text)

    # -- mailbox change reporting (RFC 3501 §5.2, §7.3.1, §7.4.1; IDLE RFC 2177) ----------------------

    def _report_changes(self, force: bool = False) -> None:
        if self.mbox is None or self.state != "select" or not (self._dirty or force):
            return
        allow_expunge = self._current_cmd not in _NO_EXPUNGE_DURING
        try:
            delta = self.mbox.refresh(allow_expunge)
        except Exception:
            ref = secrets.token_hex(5).upper()
            logger.error("imap refresh failed conn=%s ref=%s", self.conn_id, ref, exc_info=True)
            return
        self._dirty = False
        for seq in delta.expunged:
            self._untagged(b"%d EXPUNGE" % seq)
        self.newMessages(delta.exists, delta.recent)

    def newMessages(self, exists: int | None, recent: int | None) -> None:
        """``IMailboxListener``: report EXISTS / RECENT (RFC 3501 §7.3.1, §7.3.2)."""
        if exists is not None:
            self._untagged(b"%d EXISTS" % exists)
        if recent is not None:
            self._untagged(b"%d RECENT" % recent)

    def _store_notified(self, folder_id: int) -> None:
        """Store listener; may run inside a store write, so the work is deferred to the reactor."""
        _reactor().callFromThread(self._folder_changed, folder_id)

    def _folder_changed(self, folder_id: int) -> None:
        if self._closed or self.mbox is None or self.mbox.folder_id != folder_id:
            return
        self._dirty = True
        if self.parseState == "idle":
            self._report_changes(force=True)

    def _watch(self, mbox: StoreMailbox) -> None:
        self.mbox = mbox
        self._watched_folder = mbox.folder_id
        self.factory.store.add_listener(mbox.folder_id, self._store_notified)
        mbox.addListener(self)

    def _deselect(self) -> None:
        if self._watched_folder is not None:
            try:
                self.factory.store.remove_listener(self._watched_folder, self._store_notified)
            except Exception:
                logger.warning("imap listener removal failed conn=%s", self.conn_id, exc_info=True)
            self._watched_folder = None
        if self.mbox is not None:
            self.mbox.removeListener(self)
            self.mbox.close()
            self.mbox = None
        self._dirty = False
        if self.state == "select":
            self.state = "auth"

    # -- argument parsers --------------------------------------------------------------------------------

    def _stringLiteral(self, size: int) -> Deferred[tuple[bytes, bytes]]:
        self._literal_count += 1
        if self._literal_count > MAX_LITERALS_PER_COMMAND:
            raise CommandBad("Too many literals in one command")
        if size > self._literalStringLimit:
            raise CommandBad("Literal too long")
        return cast(Deferred[tuple[bytes, bytes]], super()._stringLiteral(size))

    def arg_astring(self, line: bytes | None, final: bool = False) -> Any:
        """astring (RFC 3501 §9) with backslash escapes in quoted strings, validated atoms and literals."""
        if not line:
            raise CommandBad("Missing argument")
        line = line.lstrip(b" ")
        if line[:1] == b'"':
            m = _QUOTED_RE.match(line)
            if m is None:
                raise CommandBad("Unterminated quoted string")
            rest = line[m.end():]
            if rest[:1] not in (b"", b" "):
                raise CommandBad("Missing space after quoted string")
            return re.sub(rb"\\(.)", rb"\1", m.group(1)), rest[1:]
        if line[:1] == b"{":
            m = _LITERAL_MARKER_RE.fullmatch(line)
            if m is None or not _SYNC_LITERAL_RE.fullmatch(m.group(1)):
                raise CommandBad("Invalid literal")
            size = int(m.group(1))
            if final and size == 0:
                return b"", b""
            return self._stringLiteral(size)
        arg, _, rest = line.partition(b" ")
        if not _ASTRING_ATOM_RE.fullmatch(arg):
            raise CommandBad("Invalid atom")
        return arg, rest

    def arg_finalastring(self, line: bytes | None) -> Any:
        """The last astring of a command: an empty literal ``{0}`` is allowed there."""
        return self.arg_astring(line, final=True)

    def arg_list_mailbox(self, line: bytes | None) -> Any:
        """list-mailbox: an astring that may also contain the wildcards % and * (RFC 3501 §9)."""
        if line and line.lstrip(b" ")[:1] not in (b'"', b"{"):
            arg, _, rest = line.lstrip(b" ").partition(b" ")
            if not _LIST_ATOM_RE.fullmatch(arg):
                raise CommandBad("Invalid list pattern")
            return arg, rest
        return self.arg_astring(line, final=True)

    def arg_atom(self, line: bytes | None) -> tuple[bytes, bytes]:
        """An atom (RFC 3501 §9)."""
        if not line:
            raise CommandBad("Missing argument")
        arg, _, rest = line.partition(b" ")
        if not _ATOM_RE.fullmatch(arg):
            raise CommandBad("Invalid atom")
        return arg, rest

    def arg_line(self, line: bytes | None) -> tuple[bytes, bytes]:
        """The rest of the line, unparsed."""
        return (line or b""), b""

    def arg_seqset(self, line: bytes | None) -> tuple[SequenceSet, bytes]:
        """A sequence-set (RFC 3501 §9)."""
        if not line:
            raise CommandBad("Missing message set")
        arg, _, rest = line.partition(b" ")
        return SequenceSet.parse(arg), rest

    def arg_fetchatt(self, line: bytes | None) -> tuple[list[FetchItem], bytes]:
        """FETCH attributes (RFC 3501 §6.4.5)."""
        if not line:
            raise CommandBad("Missing fetch attributes")
        return parse_fetch_items(line), b""

    def arg_flaglist(self, line: bytes | None) -> tuple[list[str], bytes]:
        """STORE flags: a parenthesised or bare list of flags (RFC 3501 §9 store-att-flags)."""
        line = (line or b"").strip()
        if line.startswith(b"("):
            if not line.endswith(b")"):
                raise CommandBad("Unbalanced parenthesis in flag list")
            line = line[1:-1]
        return parse_flag_list(line.split()), b""

    def opt_flaglist(self, line: bytes | None) -> tuple[list[str] | None, bytes | None]:
        """Fix 4: APPEND's flag list is optional (RFC 3501 §6.3.11)."""
        if line is None or not line.startswith(b"("):
            return None, line
        end = line.find(b")")
        if end == -1:
            raise CommandBad("Unbalanced parenthesis in flag list")
        return parse_flag_list(line[1:end].split(), allow_recent=True), line[end + 1 :].lstrip(b" ")

    def opt_datetime(self, line: bytes | None) -> tuple[dt.datetime | None, bytes | None]:
        """Fix 4: APPEND's date-time is optional too."""
        if line is None or not line.startswith(b'"'):
            return None, line
        end = line.find(b'"', 1)
        if end == -1:
            raise CommandBad("Unterminated date-time")
        return parse_datetime(line[1:end]), line[end + 1 :].lstrip(b" ")

    def arg_literal(self, line: bytes | None) -> Deferred[tuple[io.BytesIO, bytes]]:
        """Fix 7: the APPEND message literal is checked against the cap before the continuation
        request is sent, so an oversize message is never read, let alone buffered (RFC 7889)."""
        m = _LITERAL_MARKER_RE.fullmatch((line or b"").strip())
        if m is None or not _SYNC_LITERAL_RE.fullmatch(m.group(1)):
            raise CommandBad("Message literal expected")
        size = int(m.group(1))
        if size > self.factory.max_append_size:
            self.factory.metrics["append_too_big"] += 1
            raise CommandNo(f"Message exceeds the {self.factory.max_append_size} octet limit", b"TOOBIG")
        if size == 0:
            raise CommandNo("Empty messages are not accepted")
        d: Deferred[tuple[io.BytesIO, bytes]] = Deferred()
        self.parseState = "pending"
        self._pendingLiteral = _AppendLiteral(size, d)
        self._line(b"+ Ready for literal data")
        self.setRawMode()
        return d

    def arg_searchkeys(self, line: bytes | None) -> Any:
        """Fix 3: SEARCH keys with literals (RFC 3501 §6.4.4); parsed into our own search program."""
        return self._gather_literals([], line or b"")

    def _gather_literals(self, segments: list[bytes], line: bytes) -> Any:
        m = _LITERAL_MARKER_RE.search(line)
        if m is None:
            segments.append(line)
            return parse_search(tokenize(segments)), b""
        segments.append(line[: m.start()])
        d = self._stringLiteral(int(m.group(1)))

        def got(result: tuple[bytes, bytes]) -> Any:
            data, rest = result
            segments.append(LiteralChunk(data))
            return self._gather_literals(segments, rest)

        return d.addCallback(got)

    def arg_status_items(self, line: bytes | None) -> tuple[list[str], bytes]:
        """The STATUS item list (RFC 3501 §6.3.10)."""
        tokens = tokenize([(line or b"").strip()])
        if len(tokens) < 3 or tokens[0].kind != "(" or tokens[-1].kind != ")":
            raise CommandBad("STATUS needs a parenthesised item list")
        names = []
        for tok in tokens[1:-1]:
            name = tok.value.decode("ascii", "replace").upper()
            if tok.kind != "atom" or name not in _STATUS_ITEMS:
                raise CommandBad("Unknown STATUS item")
            names.append(name)
        return names, b""

    def arg_id_params(self, line: bytes | None) -> tuple[dict[str, str | None], bytes]:
        """ID parameters: NIL or a list of field/value pairs (RFC 2971 §3.3)."""
        tokens = tokenize([(line or b"").strip()])
        if len(tokens) == 1 and tokens[0].kind == "atom" and tokens[0].value.upper() == b"NIL":
            return {}, b""
        if len(tokens) < 2 or tokens[0].kind != "(" or tokens[-1].kind != ")" or len(tokens) % 2:
            raise CommandBad("ID expects NIL or a list of field/value pairs")
        inner = tokens[1:-1]
        if len(inner) > 60:
            raise CommandBad("Too many ID fields")
        params: dict[str, str | None] = {}
        for key, value in zip(inner[::2], inner[1::2]):
            if key.kind != "string" or len(key.value) > 30 or len(value.value) > 1024:
                raise CommandBad("Invalid ID field")
            nil = value.kind == "atom" and value.value.upper() == b"NIL"
            params[key.value.decode("utf-8", "replace")] = None if nil else value.value.decode("utf-8", "replace")
        return params, b""

    def opt_initial_response(self, line: bytes | None) -> tuple[bytes | None, bytes]:
        """SASL-IR (RFC 4959): the optional initial response after the mechanism name."""
        if line is None or not line.strip():
            return None, b""
        return line.strip(), b""

    # -- any state -----------------------------------------------------------------------------------------

    def cmd_capability(self, tag: bytes) -> None:
        """CAPABILITY (RFC 3501 §6.1.1)."""
        self._untagged(b"CAPABILITY " + b" ".join(self.listCapabilities()))
        self._ok(tag, b"CAPABILITY completed")

    def cmd_noop(self, tag: bytes) -> None:
        """NOOP (RFC 3501 §6.1.2): also the poll point for folder changes (§7.3.1, §7.4.1)."""
        self._report_changes(force=True)
        self._ok(tag, b"NOOP completed")

    def cmd_logout(self, tag: bytes) -> None:
        """LOGOUT (RFC 3501 §6.1.3): BYE, then the tagged OK, then close."""
        self._untagged(b"BYE Logging out")
        self._ok(tag, b"LOGOUT completed")
        self.transport.loseConnection()

    def cmd_id(self, tag: bytes, params: dict[str, str | None]) -> None:
        """ID (RFC 2971): what the client says is logged; the server answers with its name."""
        if params:
            logger.info("imap client id conn=%s name=%s version=%s", self.conn_id,
                        _safe_text(params.get("name") or "-", 60).decode(),
                        _safe_text(params.get("version") or "-", 60).decode())
        self._untagged(b"ID " + render(["name", SERVER_NAME]))
        self._ok(tag, b"ID completed")

    # -- not authenticated ---------------------------------------------------------------------------------

    def do_STARTTLS(self, tag: bytes) -> None:
        """STARTTLS (RFC 3501 §6.2.1), valid before authentication on the STARTTLS listener only."""
        if self._tls_active():
            raise CommandBad("TLS is already active")
        if self.ctx is None:
            raise CommandNo("STARTTLS is not available")
        # Fix 1 (STARTTLS command injection, RFC 3501 §6.2.1 / RFC 2595 §3.1, CVE-2011-0411 class):
        # anything the client sent after STARTTLS in the same plaintext read must not be executed once
        # TLS is up.  Commands are read one line at a time, so the rest sits in the line buffer.
        discarded = self.clearLineBuffer()
        if discarded:
            self.factory.metrics["starttls_injection_discarded"] += 1
            logger.warning("imap starttls discarded pipelined plaintext conn=%s octets=%d",
                           self.conn_id, len(discarded))
        self._ok(tag, b"Begin TLS negotiation now")
        self.transport.startTLS(self.ctx)
        self.startedTLS = True

    def cmd_login(self, tag: bytes, _args: bytes) -> None:
        """Fix 2: LOGINDISABLED is always advertised, so LOGIN is always refused (RFC 3501 §6.2.3)."""
        self._audit_login_failure("LOGIN", "password_login_disabled", None)
        raise CommandNo("LOGIN is disabled; authenticate with a client certificate (AUTHENTICATE EXTERNAL)",
                        b"PRIVACYREQUIRED" if not self._tls_active() else b"CANNOT")

    def cmd_authenticate(self, tag: bytes, mechanism: bytes, initial: bytes | None) -> Any:
        """AUTHENTICATE EXTERNAL (RFC 3501 §6.2.2, RFC 4422 Appendix A, SASL-IR RFC 4959)."""
        if not self._tls_active():
            # Fix 2: no authentication of any kind before TLS on the STARTTLS listener.
            raise CommandNo("Authentication requires TLS; run STARTTLS first", b"PRIVACYREQUIRED")
        if mechanism.upper() != b"EXTERNAL":
            raise CommandNo("Unsupported authentication mechanism", b"CANNOT")
        if initial is None:
            self._sasl_tag = tag
            self.parseState = "sasl"
            self._line(b"+ ")
            return None
        return self._authenticate_external(tag, initial)

    def parse_sasl(self, line: bytes) -> None:
        """The client's answer to the empty EXTERNAL challenge; ``*`` cancels (RFC 3501 §6.2.2)."""
        tag = self._sasl_tag
        assert tag is not None
        self._sasl_tag = None
        self.parseState = "command"
        if line.strip() == b"*":
            self._respond(b"BAD", tag, b"AUTHENTICATE cancelled")
            return
        d = defer.ensureDeferred(self._authenticate_external(tag, line))
        d.addErrback(self._command_failed, tag)

    def _peer_certificate_der(self) -> bytes | None:
        return twisted_peer_certificate_der(self.transport)

    async def _authenticate_external(self, tag: bytes, response: bytes) -> None:
        text = response.strip()
        try:
            authzid_raw = b"" if text in (b"", b"=") else base64.b64decode(text, validate=True)
            authzid = authzid_raw.decode("utf-8")
        except (binascii.Error, ValueError):
            raise CommandBad("Invalid SASL response") from None
        if "\x00" in authzid or len(authzid) > 512:
            raise CommandBad("Invalid authorization identity")
        cert_der = self._peer_certificate_der()
        try:
            login = await bridge(self.factory.authenticator(cert_der, authzid))
        except Exception:
            ref = secrets.token_hex(5).upper()
            logger.error("imap authenticator failed conn=%s ref=%s", self.conn_id, ref, exc_info=True)
            self._audit_login_failure("EXTERNAL", "authenticator_error", cert_der)
            raise CommandNo(f"Authentication temporarily unavailable (ref {ref})", b"UNAVAILABLE") from None
        if self._closed:
            return
        if login is None:
            self._auth_failures += 1
            self.factory.metrics["auth_failures"] += 1
            reason = "no_certificate" if cert_der is None else "rejected"
            self._audit_login_failure("EXTERNAL", reason, cert_der)
            logger.info("imap login failed conn=%s reason=%s", self.conn_id, reason)
            self._respond(b"NO", tag, b"[AUTHENTICATIONFAILED] Authentication failed")
            if self._auth_failures >= MAX_AUTH_FAILURES:
                self._untagged(b"BYE Too many authentication failures")
                self.transport.loseConnection()
            return
        self.account = StoreAccount(self.factory.store, login, self.factory.audit)
        self.state = "auth"
        self.setTimeout(self.POSTAUTH_TIMEOUT)
        self.factory.metrics["logins"] += 1
        self.factory.audit.record(AuditEvent.LOGIN, actor=login.principal, protocol="imap", mailbox=login.address,
                                  detail={"mechanism": "EXTERNAL", "peer": self._peer})
        logger.info("imap login conn=%s mailbox=%s principal=%s", self.conn_id, login.address, login.principal)
        caps = b" ".join(self.listCapabilities())
        self._respond(b"OK", tag, b"[CAPABILITY " + caps + b"] Authenticated")

    def _audit_login_failure(self, mechanism: str, reason: str, cert_der: bytes | None) -> None:
        detail = {"mechanism": mechanism, "reason": reason, "peer": self._peer}
        if cert_der is not None:
            detail["cert_sha256"] = hashlib.sha256(cert_der).hexdigest()
        self.factory.audit.record(AuditEvent.LOGIN_FAILED, actor="unknown", protocol="imap", detail=detail)

    # -- authenticated -------------------------------------------------------------------------------------

    def _account(self) -> StoreAccount:
        assert self.account is not None
        return self.account

    def _select(self, tag: bytes, name: bytes, writable: bool) -> None:
        """SELECT / EXAMINE (RFC 3501 §6.3.1, §6.3.2); a failed SELECT leaves no folder selected."""
        self._deselect()
        folder = decode_mailbox(name)
        mbox = self._account().select(folder, writable)
        if mbox is None:
            raise CommandNo("No such folder", b"NONEXISTENT")
        self._watch(mbox)
        self._untagged(b"FLAGS " + render_flags(mbox.getFlags()))
        permanent = b"(" + b" ".join(f.encode() for f in SYSTEM_FLAGS) + b" \\*)" if writable else b"()"
        self._untagged(b"OK [PERMANENTFLAGS " + permanent + b"] Flags permitted")
        self._untagged(b"%d EXISTS" % mbox.getMessageCount())
        self._untagged(b"%d RECENT" % mbox.getRecentCount())
        unseen = mbox.first_unseen()
        if unseen is not None:
            self._untagged(b"OK [UNSEEN %d] First unseen" % unseen)
        self._untagged(b"OK [UIDVALIDITY %d] UIDs valid" % mbox.getUIDValidity())
        self._untagged(b"OK [UIDNEXT %d] Predicted next UID" % mbox.getUIDNext())
        mbox.opened()
        self.state = "select"
        mode = b"READ-WRITE" if writable else b"READ-ONLY"
        self._ok(tag, b"[" + mode + b"] " + (b"SELECT" if writable else b"EXAMINE") + b" completed")

    def cmd_select(self, tag: bytes, name: bytes) -> None:
        """SELECT (RFC 3501 §6.3.1)."""
        self._select(tag, name, True)

    def cmd_examine(self, tag: bytes, name: bytes) -> None:
        """EXAMINE (RFC 3501 §6.3.2): read-only, \\Seen is never set implicitly."""
        self._select(tag, name, False)

    async def cmd_create(self, tag: bytes, name: bytes) -> None:
        """CREATE (RFC 3501 §6.3.3)."""
        await self._account().create(decode_mailbox(name))
        self._ok(tag, b"CREATE completed")

    async def cmd_delete(self, tag: bytes, name: bytes) -> None:
        """DELETE (RFC 3501 §6.3.4); deleting the selected folder deselects it first."""
        folder = decode_mailbox(name)
        info = self._account().require_folder(folder)
        await self._account().delete(folder)
        if self.mbox is not None and self.mbox.folder_id == info.id:
            self._deselect()
            self._untagged(b"OK [CLOSED] Selected folder deleted")  # RFC 7162 §3.2.11
        self._ok(tag, b"DELETE completed")

    async def cmd_rename(self, tag: bytes, old: bytes, new: bytes) -> None:
        """RENAME (RFC 3501 §6.3.5)."""
        await self._account().rename(decode_mailbox(old), decode_mailbox(new))
        self._ok(tag, b"RENAME completed")

    def cmd_subscribe(self, tag: bytes, name: bytes) -> None:
        """SUBSCRIBE (RFC 3501 §6.3.6): every existing folder is subscribed."""
        self._account().subscribe(decode_mailbox(name))
        self._ok(tag, b"SUBSCRIBE completed")

    def cmd_unsubscribe(self, tag: bytes, name: bytes) -> None:
        """UNSUBSCRIBE (RFC 3501 §6.3.7): refused for existing folders, see :meth:`StoreAccount.unsubscribe`."""
        self._account().unsubscribe(decode_mailbox(name))
        self._ok(tag, b"UNSUBSCRIBE completed")

    def _list(self, tag: bytes, ref: bytes, pattern: bytes, command: bytes) -> None:
        """LIST / LSUB (RFC 3501 §6.3.8, §6.3.9)."""
        reference = decode_mailbox(ref) if ref else ""
        wildcard = decode_mailbox(pattern) if pattern else ""
        if not wildcard and command == b"LIST":
            # The hierarchy delimiter query (RFC 3501 §6.3.8).
            self._untagged(b'LIST (\\Noselect) "/" ""')
        else:
            for name, info in self._account().listMailboxes(reference, wildcard):
                attrs = b" ".join(f.encode() for f in info.getFlags())
                self._untagged(command + b" (" + attrs + b') "/" ' + encode_mailbox(name))
        self._ok(tag, command + b" completed")

    def cmd_list(self, tag: bytes, ref: bytes, pattern: bytes) -> None:
        """LIST (RFC 3501 §6.3.8)."""
        self._list(tag, ref, pattern, b"LIST")

    def cmd_lsub(self, tag: bytes, ref: bytes, pattern: bytes) -> None:
        """LSUB (RFC 3501 §6.3.9)."""
        self._list(tag, ref, pattern, b"LSUB")

    def cmd_status(self, tag: bytes, name: bytes, items: list[str]) -> None:
        """STATUS (RFC 3501 §6.3.10)."""
        folder = decode_mailbox(name)
        info = self._account().require_folder(folder)
        values = {"MESSAGES": info.exists, "RECENT": 0, "UIDNEXT": info.uidnext,
                  "UIDVALIDITY": info.uidvalidity, "UNSEEN": info.unseen}
        body = b" ".join(b"%s %d" % (n.encode(), values[n]) for n in items)
        self._untagged(b"STATUS " + encode_mailbox(info.name) + b" (" + body + b")")
        self._ok(tag, b"STATUS completed")

    async def cmd_append(self, tag: bytes, name: bytes, flags: list[str] | None, when: dt.datetime | None,
                        message: io.BytesIO) -> None:
        """APPEND (RFC 3501 §6.3.11) answering APPENDUID (RFC 4315 §3).  Fix 4: flags and date optional."""
        raw = message.getvalue()
        message.close()
        account = self._account()
        info = account.folder(decode_mailbox(name))
        if info is None:
            raise CommandNo("No such folder", b"TRYCREATE")
        _, uid = await account.append_to(info, raw, flags or [], when)
        if self.mbox is not None and self.mbox.folder_id == info.id:
            self._dirty = True
        self._ok(tag, b"[APPENDUID %d %d] APPEND completed" % (info.uidvalidity, uid))

    def cmd_enable(self, tag: bytes, _caps: bytes) -> None:
        """ENABLE (RFC 5161): none of our extensions needs enabling, so nothing is enabled."""
        self._untagged(b"ENABLED")
        self._ok(tag, b"ENABLE completed")

    def cmd_idle(self, tag: bytes) -> None:
        """IDLE (RFC 2177): arrivals are pushed as ``* n EXISTS`` until the client sends DONE."""
        self._idle_tag = tag
        self.parseState = "idle"
        self._line(b"+ idling")
        self._report_changes(force=True)

    def parse_idle(self, line: bytes) -> None:
        """The line that ends IDLE must be DONE (RFC 2177 §3)."""
        tag = self._idle_tag
        self._idle_tag = None
        self.parseState = "command"
        if line.strip().upper() != b"DONE":
            self._respond(b"BAD", tag, b"Expected DONE")
            return
        self._ok(tag, b"IDLE terminated")

    def cmd_namespace(self, tag: bytes) -> None:
        """NAMESPACE (RFC 2342): one personal namespace, delimiter "/"."""
        self._untagged(b'NAMESPACE (("" "/")) NIL NIL')
        self._ok(tag, b"NAMESPACE completed")

    # -- selected ------------------------------------------------------------------------------------------

    def _selected(self) -> StoreMailbox:
        assert self.mbox is not None
        return self.mbox

    def _writable(self) -> StoreMailbox:
        mbox = self._selected()
        if not mbox.isWriteable():
            raise CommandNo("The folder is read-only (EXAMINE)")
        return mbox

    def cmd_check(self, tag: bytes) -> None:
        """CHECK (RFC 3501 §6.4.1): store writes are already durable; report folder changes."""
        self._report_changes(force=True)
        self._ok(tag, b"CHECK completed")

    async def cmd_close(self, tag: bytes) -> None:
        """CLOSE (RFC 3501 §6.4.2): silent expunge when read-write, then back to authenticated."""
        mbox = self._selected()
        if mbox.isWriteable():
            await mbox.expunge_uids(None)
        self._deselect()
        self._ok(tag, b"CLOSE completed")

    def cmd_unselect(self, tag: bytes) -> None:
        """UNSELECT (RFC 3691): like CLOSE without the expunge."""
        self._deselect()
        self._ok(tag, b"UNSELECT completed")

    async def cmd_expunge(self, tag: bytes, uids: SequenceSet | None = None, uid: int = 0) -> None:
        """EXPUNGE (RFC 3501 §6.4.3) and UID EXPUNGE (RFC 4315 §2.1)."""
        mbox = self._writable()
        chosen = None if uids is None else [u for _, u in mbox.resolve(uids, True)]
        if chosen is not None and not chosen:
            self._ok(tag, b"EXPUNGE completed")
            return
        for seq in await mbox.expunge_uids(chosen):
            self._untagged(b"%d EXPUNGE" % seq)
        self._ok(tag, b"EXPUNGE completed")

    async def cmd_search(self, tag: bytes, program: tuple[str, SearchKey], uid: int = 0) -> None:
        """SEARCH / UID SEARCH (RFC 3501 §6.4.4, §6.4.8).  Fix 3: evaluated by our own engine."""
        mbox = self._selected()
        self._report_arrivals()
        seqs = await mbox.search(program[1], uid=bool(uid))
        result = [mbox.getUID(s) for s in seqs] if uid else seqs
        self._untagged(b"SEARCH" + b"".join(b" %d" % n for n in result))
        self._ok(tag, b"SEARCH completed")

    def _report_arrivals(self) -> None:
        """Announce arrivals before a command refers to messages (EXISTS is always allowed)."""
        if self._dirty and self.mbox is not None:
            delta = self.mbox.refresh(allow_expunge=False)
            self._dirty = False
            self.newMessages(delta.exists, delta.recent)

    async def cmd_fetch(self, tag: bytes, messages: SequenceSet, items: list[FetchItem], uid: int = 0) -> None:
        """FETCH / UID FETCH (RFC 3501 §6.4.5, §6.4.8), streamed with back-pressure.

        Fix 5 and 6: ENVELOPE and every body section are built from the stored bytes by this module.
        """
        mbox = self._selected()
        self._report_arrivals()
        if uid and not any(i.name == "UID" for i in items):
            items = [FetchItem("UID"), *items]
        pairs = mbox.resolve(messages, bool(uid))
        if any(i.sets_seen for i in items):
            # \Seen is set and READ audited for every message before any content is sent.
            selected = mbox.messages_for(pairs)
            seen_set: set[int] = set()
            if selected:
                changed = await mbox.mark_read([m for _, m in selected])
                seen_set = set(changed)
                selected = [(s, m.with_flags(changed[m.getUID()]) if m.getUID() in changed else m)
                            for s, m in selected]
            chunks = (render_fetch(seq, msg, items, msg.getUID() in seen_set) for seq, msg in selected)
        else:
            content = any(i.name not in _NO_CONTENT for i in items)
            chunks = (render_fetch(seq, msg, items, False)
                      for seq, msg in mbox.iter_messages(pairs, content=content))
        await _ResponseStream(self.transport, chunks).start()
        self._ok(tag, b"FETCH completed")

    async def cmd_store(self, tag: bytes, messages: SequenceSet, mode: bytes, flags: list[str],
                       uid: int = 0) -> None:
        """STORE / UID STORE (RFC 3501 §6.4.6)."""
        mbox = self._writable()
        action = mode.upper()
        silent = action.endswith(b".SILENT")
        action = action.removesuffix(b".SILENT")
        kinds: dict[bytes, FlagMode] = {b"FLAGS": "set", b"+FLAGS": "add", b"-FLAGS": "remove"}
        if action not in kinds:
            raise CommandBad("STORE expects FLAGS, +FLAGS or -FLAGS")
        self._report_arrivals()
        pairs = mbox.resolve(messages, bool(uid))
        changed = await mbox.store_flags([u for _, u in pairs], flags, kinds[action])
        if not silent:
            for seq, u in pairs:
                if u in changed:
                    extra = b" UID %d" % u if uid else b""
                    self._untagged(b"%d FETCH (FLAGS %s%s)" % (seq, render_flags(changed[u]), extra))
        self._ok(tag, b"STORE completed")

    async def cmd_copy(self, tag: bytes, messages: SequenceSet, name: bytes, uid: int = 0) -> None:
        """COPY / UID COPY answering COPYUID (RFC 3501 §6.4.7, RFC 4315 §3)."""
        await self._copy_or_move(tag, messages, name, bool(uid), move=False)

    async def cmd_move(self, tag: bytes, messages: SequenceSet, name: bytes, uid: int = 0) -> None:
        """MOVE / UID MOVE (RFC 6851 §3): COPYUID in an untagged OK, then EXPUNGE responses."""
        await self._copy_or_move(tag, messages, name, bool(uid), move=True)

    async def _copy_or_move(self, tag: bytes, messages: SequenceSet, name: bytes, uid: bool, move: bool) -> None:
        mbox = self._writable() if move else self._selected()
        dest = self._account().folder(decode_mailbox(name))
        if dest is None:
            raise CommandNo("No such folder", b"TRYCREATE")
        self._report_arrivals()
        uids = [u for _, u in mbox.resolve(messages, uid)]
        verb = b"MOVE" if move else b"COPY"
        if not uids:
            self._ok(tag, verb + b" completed (no messages)")
            return
        store = self.factory.store
        call = store.move if move else store.copy
        pairs = await bridge(call(mbox.folder_id, uids, dest.id))
        if dest.id == mbox.folder_id:
            self._dirty = True
        code = b"COPYUID %d %s %s" % (dest.uidvalidity, compress_uids([s for s, _ in pairs]),
                                       compress_uids([d for _, d in pairs]))
        if not move:
            self._ok(tag, b"[" + code + b"] COPY completed")
            return
        self._untagged(b"OK [" + code + b"] Moved")
        for seq in mbox.forget(s for s, _ in pairs):
            self._untagged(b"%d EXPUNGE" % seq)
        self._ok(tag, b"MOVE completed")

    def cmd_uid(self, tag: bytes, command: bytes, line: bytes) -> None:
        """UID FETCH/SEARCH/STORE/COPY/MOVE (RFC 3501 §6.4.8, RFC 6851) and UID EXPUNGE (RFC 4315)."""
        entry = self._UID_COMMANDS.get(command.upper())
        if entry is None:
            raise CommandBad("Unknown UID command")
        self._current_cmd = b"UID " + command.upper()
        handler, *parsers = entry
        self._run_parsers(tag, handler, [tag], parsers, line or None, 1)

    # -- the command table --------------------------------------------------------------------------------
    # Handler first, then its argument parsers (Twisted's convention).  Commands absent from a state's
    # table get "BAD Command not valid in this state".

    _any_state: dict[bytes, tuple[Any, ...]] = {
        b"CAPABILITY": (cmd_capability,),
        b"NOOP": (cmd_noop,),
        b"LOGOUT": (cmd_logout,),
        b"ID": (cmd_id, arg_id_params),
    }
    _authenticated: dict[bytes, tuple[Any, ...]] = {
        **_any_state,
        b"ENABLE": (cmd_enable, arg_line),
        b"NAMESPACE": (cmd_namespace,),
        b"SELECT": (cmd_select, arg_finalastring),
        b"EXAMINE": (cmd_examine, arg_finalastring),
        b"CREATE": (cmd_create, arg_finalastring),
        b"DELETE": (cmd_delete, arg_finalastring),
        b"RENAME": (cmd_rename, arg_astring, arg_finalastring),
        b"SUBSCRIBE": (cmd_subscribe, arg_finalastring),
        b"UNSUBSCRIBE": (cmd_unsubscribe, arg_finalastring),
        b"LIST": (cmd_list, arg_astring, arg_list_mailbox),
        b"LSUB": (cmd_lsub, arg_astring, arg_list_mailbox),
        b"STATUS": (cmd_status, arg_astring, arg_status_items),
        b"APPEND": (cmd_append, arg_astring, opt_flaglist, opt_datetime, arg_literal),
        b"IDLE": (cmd_idle,),
    }
    _UID_COMMANDS: ClassVar[dict[bytes, tuple[Any, ...]]] = {
        b"FETCH": (cmd_fetch, arg_seqset, arg_fetchatt),
        b"SEARCH": (cmd_search, arg_searchkeys),
        b"STORE": (cmd_store, arg_seqset, arg_atom, arg_flaglist),
        b"COPY": (cmd_copy, arg_seqset, arg_finalastring),
        b"MOVE": (cmd_move, arg_seqset, arg_finalastring),
        b"EXPUNGE": (cmd_expunge, arg_seqset),  # RFC 4315 §2.1
    }
    COMMANDS: ClassVar[dict[str, dict[bytes, tuple[Any, ...]]]] = {
        "unauth": {
            **_any_state,
            b"STARTTLS": (do_STARTTLS,),
            b"AUTHENTICATE": (cmd_authenticate, arg_atom, opt_initial_response),
            b"LOGIN": (cmd_login, arg_line),
        },
        "auth": _authenticated,
        "select": {
            **{k: v for k, v in _authenticated.items() if k != b"ENABLE"},  # RFC 5161 §3.1
            **{k: v for k, v in _UID_COMMANDS.items() if k != b"EXPUNGE"},
            b"CHECK": (cmd_check,),
            b"CLOSE": (cmd_close,),
            b"UNSELECT": (cmd_unselect,),
            b"EXPUNGE": (cmd_expunge,),
            b"UID": (cmd_uid, arg_atom, arg_line),
        },
    }
    del _any_state, _authenticated

    # Fix 1, belt and braces: Twisted's own table entry points at the unfixed base method.
    unauth_STARTTLS = (do_STARTTLS,)  # type: ignore[assignment]


class _AppendLiteral:
    """Collects an APPEND literal already checked against the size cap (fix 7); always in memory."""

    def __init__(self, size: int, deferred: Deferred[tuple[io.BytesIO, bytes]]) -> None:
        self.size = size
        self.data = io.BytesIO()
        self.defer = deferred

    def write(self, data: bytes) -> bytes | None:
        if len(data) < self.size:
            self.data.write(data)
            self.size -= len(data)
            return None
        self.data.write(data[: self.size])
        rest = data[self.size :]
        self.size = 0
        return rest

    def callback(self, line: bytes) -> None:
        self.defer.callback((self.data, line))


# ---------------------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------------------


class IMAPFactory(protocol.Factory[IMAPServer]):
    """Builds one :class:`IMAPServer` per connection, sharing the store, authenticator and audit sink."""

    noisy = False

    def __init__(self, store: MailStore, authenticator: ImapAuthenticator, audit: AuditSink,
                 tls_context_factory: Any, *, implicit_tls: bool, max_append_size: int, hostname: str) -> None:
        self.store = store
        self.authenticator = authenticator
        self.audit = audit
        self.tls_context_factory = tls_context_factory
        self.implicit_tls = implicit_tls
        self.max_append_size = max_append_size
        self.hostname = hostname
        self.metrics: Counter[str] = Counter()
        self._connections = 0

    def next_connection_id(self) -> str:
        self._connections += 1
        return f"{self._connections:x}"

    def buildProtocol(self, addr: Any) -> IMAPServer:
        """One protocol, with its own session state, per connection."""
        proto = IMAPServer(self)
        proto.factory = self
        return proto


def build_imap_factory(
    store: MailStore,
    authenticator: ImapAuthenticator,
    audit: AuditSink,
    tls_context_factory: Any,
    *,
    implicit_tls: bool,
    max_append_size: int = DEFAULT_MAX_APPEND_SIZE,
    hostname: str = "localhost",
) -> protocol.Factory[IMAPServer]:
    """An IMAP server factory.

    ``tls_context_factory`` has ``getContext()`` returning a pyOpenSSL context that requests a client
    certificate.  With ``implicit_tls`` the caller listens with ``reactor.listenSSL(port, factory,
    tls_context_factory)`` (RFC 8314); otherwise with ``reactor.listenTCP`` and clients use STARTTLS.
    """
    if max_append_size <= 0:
        raise ValueError("max_append_size must be positive")
    return IMAPFactory(store, authenticator, audit, tls_context_factory, implicit_tls=implicit_tls,
                       max_append_size=max_append_size, hostname=hostname)
