"""The read-only LDAPS listener: the published directory (`directory.ldap_view`) answered from the database.

LDAPv3 (RFC 4511) over implicit TLS only, on an ldaptor `LDAPServer` whose request decoding is replaced: the
PDUs are decoded here (`decode_message`), strictly, with a size cap, a filter depth and size cap, and no
recursion the client controls — ldaptor's decoder drops unknown filter choices silently (which widens an
AND), relies on `assert`, recurses without bound and buffers without bound. ldaptor encodes the responses.

* Bind (RFC 4513): anonymous simple bind only; the directory is public open data and liste rouge entries are
  never in the view. A simple bind with a password, or a name without one (an "unauthenticated bind",
  §5.1.2), gets unwillingToPerform (53); SASL gets authMethodNotSupported (7). No TLS client certificate is
  requested: nothing here depends on who asks, and a certificate request makes clients holding a CPS card
  prompt for it (or for its PIN) on a mere lookup.
* Search: base, one-level, subtree (and subordinate) scopes over the layout of `directory.ldap_schema`. The
  filter is translated into SQL that selects *candidate* ids through the indexes (`plan`); candidates are
  built into entries by `directory.ldap_view` in batches, and the exact filter is evaluated on each built
  entry (`evaluate`, RFC 4511 §4.5.1.7 three-valued logic, RFC 4517/4518 matching rules) before it is
  sent. Whatever cannot be translated selects a superset (at worst every id of the container, by batches),
  so a translation can make a search slow but never wrong. Every value is a bound SQL parameter. Names of
  persons without practitioner data and mailbox descriptions, which no database index serves by word,
  are looked up in an in-memory `WordIndex` rebuilt from the database every `word_index_ttl` seconds.
  Built entries and the candidate ids of each filter are kept in an `EntryCache` shared by the searches,
  emptied whenever the database changes (SQLite's data_version, seen by the next search), when the word
  indexes are rebuilt, and every `cache_ttl` seconds; without such a change signal (PostgreSQL) nothing is
  cached. Under a size limit, no more candidates are built than can be sent.
* Limits: min(client sizeLimit, server size limit) entries then sizeLimitExceeded (4) with the entries sent
  so far; the same for the time limit (timeLimitExceeded, 3), which also interrupts a running SQL statement.
  Filters deeper than `MAX_FILTER_DEPTH` or with more than `MAX_FILTER_ITEMS` items get unwillingToPerform;
  a PDU over `MAX_PDU` bytes closes the connection (as OpenLDAP does for anonymous sessions).
* Root DSE (RFC 4512 §5.1) with namingContexts, supportedLDAPVersion 3, the Who am I? extension (RFC 4532)
  and the features implemented (all operational attributes "+", RFC 3673; absolute true and false, RFC
  4526). No control is supported: a critical one gets unavailableCriticalExtension (12), others are ignored
  (RFC 4511 §4.1.11) — so paged results (RFC 2696) sent as non-critical return everything up to the limit.
* Add, delete, modify and modify DN get unwillingToPerform (53) "read-only directory"; compare is answered.
* Database work runs in the reactor's thread pool, never on the loop, `workers` searches at a time (no more
  than the database pool's connections). Entries and results are encoded to BER here (byte for byte as
  ldaptor would). One log line per search: base (the leaf value redacted), scope, the attribute names of
  the filter (never its values), result, entries, ms.
  Exception texts never reach a client nor the log; an internal error answers `other` (80) with a reference.
"""

from __future__ import annotations

import bisect
import contextlib
import datetime as dt
import enum
import itertools
import logging
import re
import secrets
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from ldaptor.protocols import pureldap
from ldaptor.protocols.ldap.ldapserver import LDAPServer
from OpenSSL import SSL
from twisted.internet import protocol
from twisted.internet.threads import deferToThreadPool

from directory import ldap_schema as ls
from directory import ldap_view as lv
from directory.importers.text import normalise, prefix_bounds
from directory.schema import (
    activities,
    certificates,
    mailboxes,
    organisations,
    practitioner_skills,
    practitioners,
    principals,
)

log = logging.getLogger(__name__)

MAX_PDU = 256 * 1024 - 1  # bytes of one request (OpenLDAP's sockbuf_max_incoming for anonymous sessions)
MAX_FILTER_DEPTH = 32  # nested and/or/not
MAX_FILTER_ITEMS = 256  # filter items in one search
MAX_PENDING = 8  # outstanding operations per connection (then busy)
MAX_REQUESTED_ATTRIBUTES = 100
BATCH = 200  # candidate ids built into entries at a time

NOTICE_OF_DISCONNECTION = "1.3.6.1.4.1.1466.20036"  # RFC 4511 §4.4.1
START_TLS = "1.3.6.1.4.1.1466.20037"
WHO_AM_I = "1.3.6.1.4.1.4203.1.11.3"  # RFC 4532
FEATURE_ALL_OPERATIONAL = "1.3.6.1.4.1.4203.1.5.1"  # RFC 3673
FEATURE_ABSOLUTE_TRUE_FALSE = "1.3.6.1.4.1.4203.1.5.3"  # RFC 4526


class ResultCode(enum.IntEnum):
    """LDAP result codes used here (RFC 4511 Appendix A)."""

    SUCCESS = 0
    OPERATIONS_ERROR = 1
    PROTOCOL_ERROR = 2
    TIME_LIMIT_EXCEEDED = 3
    SIZE_LIMIT_EXCEEDED = 4
    COMPARE_FALSE = 5
    COMPARE_TRUE = 6
    AUTH_METHOD_NOT_SUPPORTED = 7
    UNAVAILABLE_CRITICAL_EXTENSION = 12
    UNDEFINED_ATTRIBUTE_TYPE = 17
    NO_SUCH_OBJECT = 32
    INVALID_DN_SYNTAX = 34
    BUSY = 51
    UNWILLING_TO_PERFORM = 53
    OTHER = 80


class Scope(enum.IntEnum):
    BASE = 0
    ONE = 1
    SUBTREE = 2
    SUBORDINATE = 3  # draft-sermersheim-ldap-subordinate-scope, sent by ldapsearch -s children


class LdapError(Exception):
    """An operation ends with this result code; `message` is public text (never an exception's)."""

    def __init__(self, code: ResultCode, message: str = "", matched_dn: str = "") -> None:
        super().__init__(code.name)
        self.code = code
        self.message = message
        self.matched_dn = matched_dn


class ProtocolViolation(Exception):
    """The PDU is malformed: RFC 4511 §4.1.1 wants a notice of disconnection, then the session ends."""


# -------------------- BER decoding of requests (RFC 4511 §5.1: definite lengths, one-byte tags)


class _Ber:
    """A read cursor over one BER-encoded region."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def more(self) -> bool:
        return self.pos < self.end

    def peek_tag(self) -> int:
        if self.pos >= self.end:
            raise ProtocolViolation("truncated")
        return self.data[self.pos]

    def read(self, expected: int | None = None) -> tuple[int, _Ber]:
        """The next element: (tag, cursor over its content)."""
        tag = self.peek_tag()
        if tag & 0x1F == 0x1F:
            raise ProtocolViolation("multi-byte tag")
        if expected is not None and tag != expected:
            raise ProtocolViolation("unexpected tag")
        try:
            start, length = _length(self.data, self.pos + 1, self.end)
        except _Incomplete:
            raise ProtocolViolation("truncated") from None
        stop = start + length
        if stop > self.end:
            raise ProtocolViolation("length beyond the enclosing element")
        self.pos = stop
        return tag, _Ber(self.data, start, stop)

    def bytes(self) -> bytes:
        return bytes(self.data[self.pos:self.end])

    def integer(self) -> int:
        raw = self.bytes()
        if not 1 <= len(raw) <= 8:
            raise ProtocolViolation("integer size")
        return int.from_bytes(raw, "big", signed=True)

    def boolean(self) -> bool:
        raw = self.bytes()
        if len(raw) != 1:
            raise ProtocolViolation("boolean size")
        return raw != b"\x00"

    def done(self) -> None:
        if self.more():
            raise ProtocolViolation("trailing data")


def _length(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """(content start, content length) of the length octets at `pos`; raises _Incomplete at the end."""
    if pos >= end:
        raise _Incomplete
    first = data[pos]
    if first < 0x80:
        return pos + 1, first
    count = first & 0x7F
    if count == 0:
        raise ProtocolViolation("indefinite length")  # RFC 4511 §5.1
    if count > 4:
        raise ProtocolViolation("length too large")
    if pos + 1 + count > end:
        raise _Incomplete
    return pos + 1 + count, int.from_bytes(data[pos + 1:pos + 1 + count], "big")


class _Incomplete(Exception):
    pass


def frame(buffer: bytes | bytearray) -> int | None:
    """Size of the first complete LDAPMessage in `buffer`, None when more bytes are needed.

    Raises ProtocolViolation for a message that is not a SEQUENCE or is larger than MAX_PDU."""
    if not buffer:
        return None
    if buffer[0] != 0x30:
        raise ProtocolViolation("not an LDAPMessage")
    try:
        start, length = _length(bytes(buffer[:6]), 1, min(len(buffer), 6))
    except _Incomplete:
        return None
    if start + length > MAX_PDU:
        raise ProtocolViolation("request too large")
    return start + length if len(buffer) >= start + length else None


# Attribute descriptions (RFC 4512 §2.5): a descriptor or numeric OID, then ;options.
_ATTRIBUTE_DESCRIPTION = re.compile(r"^(?:[A-Za-z][A-Za-z0-9-]*|\d+(?:\.\d+)+)(?:;[A-Za-z0-9-]+)*$")


@dataclass(frozen=True)
class AttributeType:
    """An attribute type the server knows, with the matching rules of its schema (RFC 4517, RFC 4519)."""

    name: str
    oid: str
    equality: str  # ci | ia5 | oid | bool | tel | dn | int | cert
    substr: bool
    aliases: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return self.name.lower()


_STANDARD_TYPES = (
    AttributeType("objectClass", "2.5.4.0", "oid", False),
    AttributeType("uid", "0.9.2342.19200300.100.1.1", "ci", True, ("userid",)),
    AttributeType("cn", "2.5.4.3", "ci", True, ("commonName",)),
    AttributeType("sn", "2.5.4.4", "ci", True, ("surname",)),
    AttributeType("givenName", "2.5.4.42", "ci", True, ("gn",)),
    AttributeType("displayName", "2.16.840.1.113730.3.1.241", "ci", True),
    AttributeType("title", "2.5.4.12", "ci", True),
    AttributeType("mail", "0.9.2342.19200300.100.1.3", "ia5", True, ("rfc822Mailbox",)),
    AttributeType("o", "2.5.4.10", "ci", True, ("organizationName",)),
    AttributeType("ou", "2.5.4.11", "ci", True, ("organizationalUnitName",)),
    AttributeType("dc", "0.9.2342.19200300.100.1.25", "ia5", True, ("domainComponent",)),
    AttributeType("description", "2.5.4.13", "ci", True),
    AttributeType("l", "2.5.4.7", "ci", True, ("localityName",)),
    AttributeType("postalCode", "2.5.4.17", "ci", True),
    AttributeType("street", "2.5.4.9", "ci", True, ("streetAddress",)),
    AttributeType("postalAddress", "2.5.4.16", "ci", True),
    AttributeType("telephoneNumber", "2.5.4.20", "tel", True),
    AttributeType("facsimileTelephoneNumber", "2.5.4.23", "none", False, ("fax",)),
    AttributeType("userCertificate", "2.5.4.36", "cert", False),
    AttributeType("userSMIMECertificate", "2.16.840.1.113730.3.1.40", "cert", False),
    AttributeType("seeAlso", "2.5.4.34", "dn", False),
    # Root DSE (RFC 4512 §5.1)
    AttributeType("namingContexts", "1.3.6.1.4.1.1466.101.120.5", "dn", False),
    AttributeType("supportedLDAPVersion", "1.3.6.1.4.1.1466.101.120.15", "int", False),
    AttributeType("supportedControl", "1.3.6.1.4.1.1466.101.120.13", "oid", False),
    AttributeType("supportedExtension", "1.3.6.1.4.1.1466.101.120.7", "oid", False),
    AttributeType("supportedFeatures", "1.3.6.1.4.1.4203.1.3.5", "oid", False),
    AttributeType("vendorName", "1.3.6.1.1.4", "ci", False),
    AttributeType("vendorVersion", "1.3.6.1.1.5", "ci", False),
)
_OUR_EQUALITY = {"caseIgnoreMatch": "ci", "booleanMatch": "bool"}
ATTRIBUTE_TYPES: tuple[AttributeType, ...] = _STANDARD_TYPES + tuple(
    AttributeType(a.name, a.oid, _OUR_EQUALITY[a.equality], a.substr is not None) for a in ls.ATTRIBUTE_TYPES)
_TYPES: dict[str, AttributeType] = {}
for _t in ATTRIBUTE_TYPES:
    for _alias in (_t.name, _t.oid, *_t.aliases):
        _TYPES[_alias.lower()] = _t

OPERATIONAL = frozenset({"namingcontexts", "supportedldapversion", "supportedcontrol", "supportedextension",
                         "supportedfeatures", "vendorname", "vendorversion"})

# Object classes by OID (objectIdentifierMatch accepts either form).
_OBJECT_CLASS_OIDS = {
    "2.5.6.0": "top", "2.5.6.6": "person", "2.5.6.7": "organizationalperson",
    "2.16.840.1.113730.3.2.2": "inetorgperson", "2.5.6.4": "organization", "2.5.6.5": "organizationalunit",
    "1.3.6.1.4.1.1466.344": "dcobject", "1.3.6.1.1.3.1": "uidobject",
    **{c.oid: c.name.lower() for c in ls.OBJECT_CLASSES},
}


@dataclass(frozen=True)
class AttributeDescription:
    text: str
    type: AttributeType | None  # None: not an attribute this server knows (filters: Undefined)
    options: frozenset[str] = frozenset()  # lower-case, without "binary" (a transfer option, RFC 4522)

    @classmethod
    def parse(cls, raw: bytes) -> AttributeDescription:
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            return cls("?", None)
        if not _ATTRIBUTE_DESCRIPTION.match(text):
            return cls(text[:64], None)
        name, *options = text.split(";")
        return cls(text, _TYPES.get(name.lower()), frozenset(o.lower() for o in options) - {"binary"})

    @property
    def label(self) -> str:
        """What the log may show: the attribute's name (never a value)."""
        return self.type.name if self.type is not None else "unknown"


# -- filters (RFC 4511 §4.5.1.7) --

@dataclass(frozen=True)
class And:
    items: tuple[Filter, ...]


@dataclass(frozen=True)
class Or:
    items: tuple[Filter, ...]


@dataclass(frozen=True)
class Not:
    item: Filter


@dataclass(frozen=True)
class Compare:
    op: str  # eq | ge | le | approx
    attr: AttributeDescription
    value: bytes


@dataclass(frozen=True)
class Substrings:
    attr: AttributeDescription
    initial: bytes | None
    any: tuple[bytes, ...]
    final: bytes | None


@dataclass(frozen=True)
class Present:
    attr: AttributeDescription


@dataclass(frozen=True)
class Extensible:
    rule: str | None
    attr: AttributeDescription | None
    value: bytes
    dn_attributes: bool


Filter = And | Or | Not | Compare | Substrings | Present | Extensible

_COMPARE_TAGS = {0xA3: "eq", 0xA5: "ge", 0xA6: "le", 0xA8: "approx"}


class FilterTooComplex(Exception):
    pass


def decode_filter(ber: _Ber, depth: int = 0, counter: list[int] | None = None) -> Filter:
    """One filter from `ber` (which advances past it)."""
    counter = counter if counter is not None else [0]
    counter[0] += 1
    if counter[0] > MAX_FILTER_ITEMS:
        raise FilterTooComplex
    tag, content = ber.read()
    if tag in (0xA0, 0xA1):  # and, or: SET OF Filter (empty ones are absolute true/false, RFC 4526)
        if depth >= MAX_FILTER_DEPTH:
            raise FilterTooComplex
        items = []
        while content.more():
            items.append(decode_filter(content, depth + 1, counter))
        return And(tuple(items)) if tag == 0xA0 else Or(tuple(items))
    if tag == 0xA2:
        if depth >= MAX_FILTER_DEPTH:
            raise FilterTooComplex
        item = decode_filter(content, depth + 1, counter)
        content.done()
        return Not(item)
    if tag in _COMPARE_TAGS:
        attr = content.read(0x04)[1].bytes()
        value = content.read(0x04)[1].bytes()
        content.done()
        return Compare(_COMPARE_TAGS[tag], AttributeDescription.parse(attr), value)
    if tag == 0xA4:
        attr = content.read(0x04)[1].bytes()
        _, pieces = content.read(0x30)
        content.done()
        initial: bytes | None = None
        final: bytes | None = None
        middle: list[bytes] = []
        seen = 0
        while pieces.more():
            ptag, piece = pieces.read()
            value = piece.bytes()
            if ptag == 0x80 and seen == 0:
                initial = value
            elif ptag == 0x81 and final is None:
                middle.append(value)
            elif ptag == 0x82 and final is None:
                final = value
            else:
                raise ProtocolViolation("substrings out of order")
            seen += 1
        if seen == 0:
            raise ProtocolViolation("empty substrings")
        return Substrings(AttributeDescription.parse(attr), initial, tuple(middle), final)
    if tag == 0x87:
        return Present(AttributeDescription.parse(content.bytes()))
    if tag == 0xA9:
        rule = attr_desc = value_ = None
        dn_attributes = False
        if content.more() and content.peek_tag() == 0x81:
            rule = content.read()[1].bytes().decode("ascii", "replace")
        if content.more() and content.peek_tag() == 0x82:
            attr_desc = AttributeDescription.parse(content.read()[1].bytes())
        value_ = content.read(0x83)[1].bytes()
        if content.more():
            dn_attributes = content.read(0x84)[1].boolean()
        content.done()
        return Extensible(rule, attr_desc, value_, dn_attributes)
    raise ProtocolViolation("unknown filter choice")


def filter_attributes(f: Filter) -> set[str]:
    """The attribute names a filter uses (what the log shows of a filter)."""
    if isinstance(f, (And, Or)):
        return set().union(*(filter_attributes(i) for i in f.items)) if f.items else set()
    if isinstance(f, Not):
        return filter_attributes(f.item)
    if isinstance(f, Extensible):
        return {f.attr.label if f.attr else "dn"}
    return {f.attr.label}


@dataclass(frozen=True)
class Control:
    oid: str
    critical: bool


@dataclass(frozen=True)
class SearchRequest:
    base: bytes
    scope: int
    size_limit: int
    time_limit: int
    types_only: bool
    filter: Filter
    attributes: tuple[str, ...]


@dataclass(frozen=True)
class BindRequest:
    version: int
    name: bytes
    simple: bytes | None  # the password of a simple bind; None for SASL
    mechanism: str | None = None


@dataclass(frozen=True)
class CompareRequest:
    entry: bytes
    attr: AttributeDescription
    value: bytes


@dataclass(frozen=True)
class ExtendedRequest:
    name: str


@dataclass(frozen=True)
class Message:
    id: int
    op: int  # the protocolOp tag
    request: Any  # one of the dataclasses above, an int (abandon), or None (unbind, writes)
    controls: tuple[Control, ...] = ()
    error: LdapError | None = None  # a well-formed request that cannot be served (filter too complex)


OP_BIND, OP_UNBIND, OP_SEARCH, OP_MODIFY, OP_ADD, OP_DELETE, OP_MODDN, OP_COMPARE, OP_ABANDON, OP_EXTENDED = (
    0x60, 0x42, 0x63, 0x66, 0x68, 0x4A, 0x6C, 0x6E, 0x50, 0x77)
_WRITES = {OP_MODIFY: pureldap.LDAPModifyResponse, OP_ADD: pureldap.LDAPAddResponse,
           OP_DELETE: pureldap.LDAPDelResponse, OP_MODDN: pureldap.LDAPModifyDNResponse}


def decode_message(pdu: bytes) -> Message:
    """An LDAPMessage (RFC 4511 §4.1.1); raises ProtocolViolation when it is malformed."""
    _, envelope = _Ber(pdu).read(0x30)
    msg_id = envelope.read(0x02)[1].integer()
    if not 1 <= msg_id <= 2**31 - 1:
        raise ProtocolViolation("message id")
    op, content = envelope.read()
    controls: list[Control] = []
    if envelope.more():
        _, ctl_seq = envelope.read(0xA0)
        while ctl_seq.more():
            _, ctl = ctl_seq.read(0x30)
            oid = ctl.read(0x04)[1].bytes().decode("ascii", "replace")
            critical = False
            if ctl.more() and ctl.peek_tag() == 0x01:
                critical = ctl.read()[1].boolean()
            if ctl.more():
                ctl.read(0x04)
            ctl.done()
            controls.append(Control(oid, critical))
    envelope.done()
    ctls = tuple(controls)
    if op == OP_SEARCH:
        base = content.read(0x04)[1].bytes()
        scope = content.read(0x0A)[1].integer()
        content.read(0x0A)  # derefAliases: there are no aliases
        size_limit = content.read(0x02)[1].integer()
        time_limit = content.read(0x02)[1].integer()
        types_only = content.read(0x01)[1].boolean()
        try:
            flt = decode_filter(content)
        except FilterTooComplex:
            error = LdapError(ResultCode.UNWILLING_TO_PERFORM, "filter too complex")
            return Message(msg_id, op, None, ctls, error)
        _, attr_seq = content.read(0x30)
        content.done()
        attrs = []
        while attr_seq.more():
            attrs.append(attr_seq.read(0x04)[1].bytes().decode("utf-8", "replace"))
        if scope not in tuple(Scope) or size_limit < 0 or time_limit < 0:
            raise ProtocolViolation("search parameters")
        return Message(msg_id, op, SearchRequest(base, scope, size_limit, time_limit, types_only, flt,
                                                 tuple(attrs[:MAX_REQUESTED_ATTRIBUTES])), ctls)
    if op == OP_BIND:
        version = content.read(0x02)[1].integer()
        name = content.read(0x04)[1].bytes()
        tag, auth = content.read()
        content.done()
        if tag == 0x80:
            return Message(msg_id, op, BindRequest(version, name, auth.bytes()), ctls)
        if tag == 0xA3:
            mechanism = auth.read(0x04)[1].bytes().decode("ascii", "replace")
            return Message(msg_id, op, BindRequest(version, name, None, mechanism), ctls)
        raise ProtocolViolation("bind authentication choice")
    if op == OP_UNBIND:
        return Message(msg_id, op, None, ctls)
    if op == OP_ABANDON:
        return Message(msg_id, op, content.integer(), ctls)
    if op == OP_COMPARE:
        entry = content.read(0x04)[1].bytes()
        _, ava = content.read(0x30)
        content.done()
        attr = AttributeDescription.parse(ava.read(0x04)[1].bytes())
        value = ava.read(0x04)[1].bytes()
        ava.done()
        return Message(msg_id, op, CompareRequest(entry, attr, value), ctls)
    if op == OP_EXTENDED:
        request_name = content.read(0x80)[1].bytes().decode("ascii", "replace")
        return Message(msg_id, op, ExtendedRequest(request_name), ctls)
    if op in _WRITES:
        return Message(msg_id, op, None, ctls)
    raise ProtocolViolation("not a request")


# -------------------- matching (RFC 4517 matching rules, RFC 4518 string preparation)


def _prep(text: str) -> str:
    """caseIgnoreMatch preparation: NFKC, case folded, insignificant spaces removed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _prep_piece(text: str) -> str:
    """A substring assertion piece: as `_prep`, but a space at either end stays significant."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    core = " ".join(folded.split())
    if not core:
        return " " if folded else ""
    return (" " if folded[:1].isspace() else "") + core + (" " if folded[-1:].isspace() else "")


def _prep_value(rule: str, value: Any) -> str | None:
    """A stored or asserted value prepared for `rule`; None when it is not of the rule's syntax."""
    if isinstance(value, bytes):
        if rule == "cert":
            return None
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    text = str(value)
    if rule == "ia5":
        return " ".join(text.lower().split()) if text.isascii() else None
    if rule == "oid":
        key = text.strip().lower()
        return _OBJECT_CLASS_OIDS.get(key, key)
    if rule == "bool":
        return text if text in ("TRUE", "FALSE") else None
    if rule == "tel":
        return "".join(c for c in _prep(text) if c not in " -")
    if rule == "int":
        return text.strip() if re.fullmatch(r"-?\d+", text.strip()) else None
    if rule == "dn":
        try:
            return repr(normalise_dn(text))
        except InvalidDn:
            return None
    if rule in ("cert", "none"):
        return None
    return _prep(text)


def _prep_substring(rule: str, value: bytes) -> str | None:
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if rule == "ia5":
        return text.lower() if text.isascii() else None
    if rule == "tel":
        return "".join(c for c in _prep(text) if c not in " -")
    return _prep_piece(text)


@dataclass
class IndexedEntry:
    """An LdapEntry with its attributes keyed by lower-case type name (options dropped: only the
    `;binary` transfer option occurs, RFC 4522)."""

    entry: lv.LdapEntry
    values: dict[str, list[Any]]
    kind: str  # root | ou | people | organisations | mailboxes | rootdse
    operational: bool = False

    @classmethod
    def of(cls, entry: lv.LdapEntry, kind: str) -> IndexedEntry:
        values: dict[str, list[Any]] = {}
        for name, vals in entry.attributes.items():
            values.setdefault(name.split(";", 1)[0].lower(), []).extend(vals)
        return cls(entry, values, kind, operational=kind == "rootdse")

    @property
    def dn(self) -> str:
        return self.entry.dn


Tri = bool | None  # TRUE, FALSE, Undefined


def evaluate(f: Filter, entry: IndexedEntry) -> Tri:
    """RFC 4511 §4.5.1.7: True, False or None (Undefined) for `entry`. Only True returns the entry."""
    if isinstance(f, And):
        result: Tri = True
        for item in f.items:
            r = evaluate(item, entry)
            if r is False:
                return False
            if r is None:
                result = None
        return result
    if isinstance(f, Or):
        result = False
        for item in f.items:
            r = evaluate(item, entry)
            if r is True:
                return True
            if r is None:
                result = None
        return result
    if isinstance(f, Not):
        r = evaluate(f.item, entry)
        return None if r is None else not r
    if isinstance(f, Present):
        if f.attr.type is None or f.attr.options:
            return False
        return bool(entry.values.get(f.attr.type.key))
    if isinstance(f, Compare):
        if f.op in ("ge", "le"):
            return None  # no attribute published here has an ORDERING rule (RFC 4519, ldap_schema)
        return _equality(f.attr, f.value, entry)  # approx: equality (RFC 4511 §4.5.1.7.6)
    if isinstance(f, Substrings):
        return _substrings(f, entry)
    if isinstance(f, Extensible):
        return _extensible(f, entry)
    return None


def _equality(attr: AttributeDescription, value: bytes, entry: IndexedEntry, rule: str | None = None) -> Tri:
    if attr.type is None:
        return None
    rule = rule or attr.type.equality
    assertion = _prep_value(rule, value)
    if assertion is None:
        return None
    if attr.options:
        return False
    for stored in entry.values.get(attr.type.key, ()):
        if _prep_value(rule, stored) == assertion:
            return True
    return False


def _substrings(f: Substrings, entry: IndexedEntry) -> Tri:
    t = f.attr.type
    if t is None or not t.substr:
        return None
    prepared = [None if p is None else _prep_substring(t.equality, p) for p in (f.initial, *f.any, f.final)]
    if any(prepared[i] is None for i, p in enumerate((f.initial, *f.any, f.final)) if p is not None):
        return None
    if f.attr.options:
        return False
    initial = (prepared[0] or "").lstrip()
    middle = [p for p in prepared[1:-1] if p]
    final = (prepared[-1] or "").rstrip()
    for stored in entry.values.get(t.key, ()):
        text = _prep_value(t.equality, stored)
        if text is None or not text.startswith(initial):
            continue
        pos = len(initial)
        for piece in middle:
            found = text.find(piece, pos)
            if found < 0:
                break
            pos = found + len(piece)
        else:
            if text.endswith(final) and len(text) - len(final) >= pos:
                return True
    return False


# Matching rules an extensible match may name (by name or OID); others are Undefined.
_EXTENSIBLE_RULES = {
    "caseignorematch": "ci", "2.5.13.2": "ci", "caseignoreia5match": "ia5", "1.3.6.1.4.1.1466.109.114.2": "ia5",
    "caseexactmatch": "exact", "2.5.13.5": "exact", "caseexactia5match": "exact",
    "1.3.6.1.4.1.1466.109.114.1": "exact", "booleanmatch": "bool", "2.5.13.13": "bool",
}


def _extensible(f: Extensible, entry: IndexedEntry) -> Tri:
    rule = None
    if f.rule is not None:
        rule = _EXTENSIBLE_RULES.get(f.rule.lower())
        if rule is None:
            return None
    if f.attr is None:
        return None  # a rule applied to every attribute of its syntax: not supported
    if rule == "exact":
        if f.attr.type is None or f.attr.type.equality not in ("ci", "ia5"):
            return None
        try:
            wanted = " ".join(unicodedata.normalize("NFKC", f.value.decode("utf-8")).split())
        except UnicodeDecodeError:
            return None
        stored_values = entry.values.get(f.attr.type.key, ())
        result: Tri = any(" ".join(unicodedata.normalize("NFKC", str(v)).split()) == wanted
                          for v in stored_values if isinstance(v, str))
    else:
        result = _equality(f.attr, f.value, entry, rule)
    if result is not True and f.dn_attributes and f.attr.type is not None:
        try:
            rdns = parse_dn(entry.dn)
        except InvalidDn:
            return result
        assertion = _prep_value(rule or f.attr.type.equality, f.value)
        for rdn in rdns:
            for name, value in rdn:
                if _TYPES.get(name.lower()) is f.attr.type and _prep_value(
                        rule or f.attr.type.equality, value) == assertion:
                    return True
    return result


# -------------------- distinguished names (RFC 4514)


class InvalidDn(ValueError):
    pass


_HEX = re.compile(r"[0-9A-Fa-f]{2}")
_SPECIAL = ' "#+,;<=>\\'


def parse_dn(text: str) -> list[list[tuple[str, str]]]:
    """RDNs of an RFC 4514 string, each a list of (type, unescaped value); raises InvalidDn."""
    rdns: list[list[tuple[str, str]]] = []
    if not text.strip():
        return rdns
    i, n = 0, len(text)
    rdn: list[tuple[str, str]] = []
    while True:
        eq = i
        while eq < n and text[eq] != "=":
            if text[eq] in ",+\\":
                raise InvalidDn("attribute type")
            eq += 1
        if eq >= n:
            raise InvalidDn("missing =")
        attr = text[i:eq].strip()
        if not _ATTRIBUTE_DESCRIPTION.match(attr) or ";" in attr:
            raise InvalidDn("attribute type")
        i = eq + 1
        raw = bytearray()
        trailing_spaces = 0
        while i < n and text[i] == " ":
            i += 1
        if i < n and text[i] == "#":
            j = i + 1
            while j < n and text[j] not in ",+":
                j += 1
            value = text[i:j].strip()
            if not re.fullmatch(r"#(?:[0-9A-Fa-f]{2})+", value):
                raise InvalidDn("hex value")
            i = j
        else:
            while i < n and text[i] not in ",+":
                ch = text[i]
                if ch == "\\":
                    if i + 2 < n + 1 and _HEX.fullmatch(text[i + 1:i + 3]):
                        raw.append(int(text[i + 1:i + 3], 16))
                        i += 3
                    elif i + 1 < n and text[i + 1] in _SPECIAL:
                        raw += text[i + 1].encode()
                        i += 2
                    else:
                        raise InvalidDn("escape")
                    trailing_spaces = 0
                    continue
                if ch in '"<>;=' or ch == "\x00":
                    raise InvalidDn("unescaped special character")
                raw += ch.encode("utf-8")
                trailing_spaces = trailing_spaces + 1 if ch == " " else 0
                i += 1
            if trailing_spaces:
                del raw[-trailing_spaces:]
            try:
                value = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidDn("utf-8") from exc
        rdn.append((attr, value))
        if i >= n:
            rdns.append(rdn)
            return rdns
        if text[i] == ",":
            rdns.append(rdn)
            rdn = []
        i += 1
        if i >= n:
            raise InvalidDn("empty RDN")


def normalise_dn(text: str) -> tuple[tuple[tuple[str, str], ...], ...]:
    """A DN in comparable form (distinguishedNameMatch): types by canonical name, values prepared."""
    out = []
    for rdn in parse_dn(text):
        avas = []
        for attr, value in rdn:
            t = _TYPES.get(attr.lower())
            key = t.key if t is not None else attr.lower()
            avas.append((key, _prep(value)))
        out.append(tuple(sorted(avas)))
    return tuple(out)


# -------------------- candidate selection (filter → SQL over the indexes)

# Attributes each container's entries can carry (see directory.ldap_view; a test checks it on real entries).
KIND_ATTRIBUTES = {
    "people": frozenset({"objectclass", "uid", "caduceenationalid", "cn", "sn", "givenname", "displayname",
                         "caduceerpps", "title", "caduceeprofessioncode", "caduceeprofession",
                         "caduceespecialtycode", "caduceespecialty", "caduceestructureid", "postalcode", "l",
                         "seealso", "usercertificate", "usersmimecertificate"}),
    "organisations": frozenset({"objectclass", "uid", "caduceenationalid", "o", "displayname", "caduceefiness",
                                "caduceesiret", "postaladdress", "postalcode", "l", "telephonenumber",
                                "facsimiletelephonenumber"}),
    "mailboxes": frozenset({"objectclass", "mail", "cn", "sn", "givenname", "caduceeprofessioncode",
                            "caduceeprofession", "caduceespecialtycode", "caduceespecialty", "displayname",
                            "description", "o", "ou", "caduceemailboxtype", "caduceeowner", "caduceestructureid",
                            "caduceedematerialisation", "caduceeservice", "caduceeresponsible", "usercertificate",
                            "usersmimecertificate"}),
}
KIND_CLASSES = {
    "people": frozenset(c.lower() for c in lv.PERSON_CLASSES),
    "organisations": frozenset(c.lower() for c in lv.ORGANISATION_CLASSES),
    "mailboxes": frozenset(c.lower() for c in lv.MAILBOX_CLASSES),
}
_ALWAYS = {"people": frozenset({"objectclass", "uid", "caduceenationalid"}),
           "organisations": frozenset({"objectclass", "uid", "caduceenationalid"}),
           "mailboxes": frozenset({"objectclass", "mail", "caduceemailboxtype"})}
KINDS = ("people", "organisations", "mailboxes")
_KIND_OU = {"people": ls.PEOPLE_OU, "organisations": ls.ORGANISATIONS_OU, "mailboxes": ls.MAILBOXES_OU}
_OU_KIND = {v: k for k, v in _KIND_OU.items()}
_NORM_MAX = 200  # normalised prefixes are cut to the shortest NormText column (a shorter prefix: a superset)
_COMPOUND_CHUNK = 100  # terms per UNION/INTERSECT (SQLite allows 500 per compound SELECT)


@dataclass(frozen=True)
class Ids:
    """Candidates: a SELECT of one column labelled "id"."""

    stmt: Any


# Plan constants for one container: every entry matches, none does (all FALSE), none can (FALSE or
# Undefined), unknown (scan everything); or Ids.
TRUE, FALSE, NONE, ALL = "T", "F", "N", "A"
Plan = str | Ids


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _compound(op: Callable[..., Any], sels: list[Any]) -> Any:
    """UNION or INTERSECT of one-column SELECTs, as a plain SELECT (SQLite nests compounds only as
    subqueries, and allows 500 terms in one)."""
    while len(sels) > 1:
        sels = [sa.select(op(*c).subquery().c.id) if len(c) > 1 else c[0] for c in _chunks(sels, _COMPOUND_CHUNK)]
    return sels[0]


def plan_and(plans: Sequence[Plan]) -> Plan:
    if FALSE in plans:
        return FALSE
    if NONE in plans:
        return NONE
    ids = [p.stmt for p in plans if isinstance(p, Ids)]
    if ids:
        return Ids(_compound(sa.intersect, ids))
    return ALL if ALL in plans else TRUE


def plan_or(plans: Sequence[Plan]) -> Plan:
    if TRUE in plans:
        return TRUE
    if ALL in plans:
        return ALL
    ids = [p.stmt for p in plans if isinstance(p, Ids)]
    if ids:
        return Ids(_compound(sa.union, ids))
    return FALSE if all(p == FALSE for p in plans) else NONE


def plan_not(plan: Plan) -> Plan:
    return FALSE if plan == TRUE else TRUE if plan == FALSE else ALL


@dataclass(frozen=True)
class _Match:
    """An equality (exact=True) or substring assertion on one attribute, as text."""

    exact: bool
    initial: str
    any: tuple[str, ...] = ()
    final: str = ""


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class WordIndex:
    """Ids by the words of a normalised text, for the texts no database index can search by word: names of
    persons without practitioner data (kept "surname given" or "given surname"), mailbox descriptions.

    Every word-suffix of a text is a sorted key ("le gall yann", "gall yann", "yann"), so the ids whose text
    has a word starting with w are one bisection away. Built from the database by `LdapDirectory` and
    rebuilt when older than its `word_index_ttl`."""

    MAX_IDS = 20_000  # more candidates than this: let SQL do it

    def __init__(self, rows: Iterable[Any]) -> None:
        pairs: list[tuple[str, int]] = []
        for id_, text in rows:
            words = normalise(text or "").split()
            pairs.extend((" ".join(words[i:])[:_NORM_MAX], id_) for i in range(len(words)))
        pairs.sort()
        self.keys = [k for k, _ in pairs]
        self.ids = [i for _, i in pairs]
        self.built = time.monotonic()

    def lookup(self, m: _Match) -> list[int] | None:
        """Ids whose text has every word of the assertion's initial part at a word start (a superset of
        the texts the caseIgnore assertion can match); None when the assertion has no initial part."""
        words = normalise(m.initial).split()
        if not words:
            return None
        found: set[int] | None = None
        for word in words:
            low, high = prefix_bounds(word[:_NORM_MAX])
            ids = set(self.ids[bisect.bisect_left(self.keys, low):bisect.bisect_left(self.keys, high)])
            found = ids if found is None else found & ids
            if len(found) > self.MAX_IDS:
                return None
        return sorted(found or ())


class Planner:
    """Translates a filter into candidate ids for one container, through the indexes where it can.

    A plan is always a superset of the entries the filter is TRUE for: the exact filter runs on the
    built entries. Normalised prefixes (`directory.importers.text.normalise`) are prefixes of the
    normalised value whenever the caseIgnore-prepared assertion is a prefix of the prepared value.
    """

    def __init__(self, postgres: bool) -> None:
        self.postgres = postgres
        self.orphans: WordIndex | None = None  # persons without practitioner data, by name
        self.descriptions: WordIndex | None = None  # mailboxes, by description

    @staticmethod
    def _listed(column: Any, ids: list[int]) -> Ids:
        return Ids(sa.select(column.label("id")).where(column.in_(ids) if ids else sa.false()))

    # -- SQL building blocks --
    def _bytewise(self, column: Any) -> Any:
        return column.collate("C") if self.postgres else column  # NormText columns already are

    def _range(self, column: Any, prefix: str, bytewise: bool = False) -> Any:
        low, high = prefix_bounds(prefix)
        col = self._bytewise(column) if bytewise else column
        return sa.and_(col >= low, col < high)

    def _norm(self, column: Any, m: _Match) -> Any | None:
        """Condition on a normalised column, or None when the assertion leaves nothing to search."""
        initial = normalise(m.initial)[:_NORM_MAX]
        if initial:
            return self._range(column, initial)
        pieces = [normalise(p) for p in (*m.any, m.final)]
        pieces = [p for p in pieces if p]
        if not pieces:
            return None
        return column.like("%" + "%".join(_like_escape(p) for p in pieces) + "%", escape="\\")

    def _words(self, column: Any, m: _Match) -> Any | None:
        """Every word of the assertion appears in the column, in any order (names stored "last first")."""
        words = [w for p in (m.initial, *m.any, m.final) for w in normalise(p).split()]
        if not words:
            return None
        return sa.and_(*(column.like("%" + _like_escape(w[:_NORM_MAX]) + "%", escape="\\") for w in words))

    def _exact(self, column: Any, m: _Match, *, transform: Callable[[str], list[str]] | None = None) -> Any | None:
        """Condition on a raw identifier column (case variants of the assertion)."""
        variants = transform or (lambda v: sorted({v, v.upper(), v.lower()}))
        if m.exact:
            return column.in_(variants(m.initial.strip()))
        initial = m.initial.strip()
        if initial:
            return sa.or_(*(self._range(column, v, bytewise=True) for v in variants(initial)))
        pieces = [p.strip() for p in (*m.any, m.final) if p.strip()]
        if not pieces:
            return None
        return column.ilike("%" + "%".join(_like_escape(p) for p in pieces) + "%", escape="\\")

    def _loose(self, column: Any, m: _Match) -> Any:
        """A LIKE over raw text keeping only ASCII letters and digits of the assertion (every other character
        becomes "%"): a superset of the caseIgnore match, for columns without a normalised twin."""
        pieces = ("".join(c if c.isascii() and c.isalnum() else "%" for c in p) for p in (m.initial, *m.any, m.final))
        body = ("" if m.initial else "%") + "%".join(pieces) + "%"
        return column.ilike(re.sub("%+", "%", body))

    @staticmethod
    def _ids(column: Any, *where: Any, source: Any = None) -> Ids:
        stmt = sa.select(column.label("id"))
        if source is not None:
            stmt = stmt.select_from(source)
        return Ids(stmt.where(*where))

    # -- the filter --
    def plan(self, f: Filter, kind: str) -> Plan:
        if isinstance(f, And):
            return plan_and([self.plan(i, kind) for i in f.items])
        if isinstance(f, Or):
            return plan_or([self.plan(i, kind) for i in f.items])
        if isinstance(f, Not):
            return plan_not(self.plan(f.item, kind))
        if isinstance(f, Present):
            return self._present(f.attr, kind)
        if isinstance(f, Compare):
            if f.op in ("ge", "le"):
                return NONE
            return self._assertion(f.attr, f.value, None, kind)
        if isinstance(f, Substrings):
            t = f.attr.type
            if t is None or not t.substr:
                return NONE
            return self._assertion(f.attr, None, f, kind)
        if isinstance(f, Extensible):
            if f.attr is None or f.dn_attributes:
                return ALL if f.attr is not None else NONE
            if f.rule is not None and f.rule.lower() not in _EXTENSIBLE_RULES:
                return NONE
            return self._assertion(f.attr, f.value, None, kind)  # equality is a superset of caseExact
        return ALL

    def _present(self, attr: AttributeDescription, kind: str) -> Plan:
        if attr.type is None or attr.options or attr.type.key not in KIND_ATTRIBUTES[kind]:
            return FALSE
        if attr.type.key in _ALWAYS[kind]:
            return TRUE
        if attr.type.key in ("usercertificate", "usersmimecertificate"):
            return self._with_certificate(kind)
        return ALL

    def _with_certificate(self, kind: str) -> Plan:
        c = certificates
        valid = sa.and_(c.c.status == "valid", c.c.not_after > dt.datetime.now(dt.UTC))
        if kind == "people":
            return self._ids(c.c.principal_id, valid, c.c.usage == "enc")
        bound = sa.select(c.c.mailbox_id.label("id")).where(valid, c.c.usage.in_(("enc", "org")),
                                                            c.c.mailbox_id.is_not(None))
        owners = sa.select(c.c.principal_id).where(valid, c.c.usage.in_(("enc", "org")), c.c.mailbox_id.is_(None))
        return Ids(_compound(sa.union, [bound, sa.select(mailboxes.c.id.label("id")).where(
            mailboxes.c.owner_id.in_(owners))]))

    def _assertion(self, attr: AttributeDescription, value: bytes | None, sub: Substrings | None,
                   kind: str) -> Plan:
        t = attr.type
        if t is None:
            return NONE
        if attr.options or t.key not in KIND_ATTRIBUTES[kind]:
            return FALSE
        if sub is None:
            assert value is not None
            prepared = _prep_value(t.equality, value)
            if prepared is None:
                return NONE  # Undefined for every entry
            if "\x00" in prepared:
                return NONE  # no stored value holds a NUL (and PostgreSQL refuses them as parameters)
            if t.key == "objectclass":
                return TRUE if prepared in KIND_CLASSES[kind] else FALSE
            m = _Match(True, value.decode("utf-8"))
        else:
            pieces = []
            for p in (sub.initial, *sub.any, sub.final):
                if p is None:
                    pieces.append("")
                    continue
                prepared = _prep_substring(t.equality, p)
                if prepared is None:
                    return NONE
                if "\x00" in prepared:
                    return NONE
                pieces.append(p.decode("utf-8"))
            m = _Match(False, pieces[0], tuple(pieces[1:-1]), pieces[-1])
        try:
            return getattr(self, f"_{kind}")(t.key, m)
        except ValueError:
            return ALL

    # -- per container --
    def _people_names(self, key: str, m: _Match) -> Plan:
        p, pr = practitioners, principals
        column = p.c.name_norm if key == "sn" else p.c.given_name_norm
        indexed = self._norm(column, m)
        if indexed is None:
            return ALL
        # Persons without practitioner data (holders of a mailbox only, or created here) have only
        # principals.name_norm, in either name order: the word index, else every word of the assertion in it.
        practitioner_ids = sa.select(p.c.principal_id.label("id")).where(indexed)
        listed = self.orphans.lookup(m) if self.orphans is not None else None
        if listed == []:
            return Ids(practitioner_ids)
        if listed is not None:
            orphans = self._listed(pr.c.id, listed).stmt
        else:
            words = self._words(pr.c.name_norm, m)
            if words is None:
                return ALL
            orphans = sa.select(pr.c.id.label("id")).where(
                pr.c.kind == "person", words, ~sa.exists().where(p.c.principal_id == pr.c.id))
        return Ids(_compound(sa.union, [practitioner_ids, orphans]))

    def _people(self, key: str, m: _Match) -> Plan:
        p, pr, o, a, k = practitioners, principals, organisations, activities, practitioner_skills
        if key in ("uid", "caduceenationalid"):
            cond = self._exact(pr.c.national_id, m)
            return self._ids(pr.c.id, cond) if cond is not None else ALL
        if key == "caduceerpps" and m.exact:
            return self._ids(p.c.principal_id, self._exact(p.c.national_id, m, transform=lambda v: ["8" + v]))
        if key in ("cn", "displayname", "givenname", "sn"):
            return self._people_names(key, m)
        if key == "caduceeprofessioncode" and m.exact:
            return self._ids(p.c.principal_id, self._exact(p.c.profession_code, m))
        if key == "caduceeprofession":
            cond = self._norm(p.c.profession_norm, m)
            return self._ids(p.c.principal_id, cond) if cond is not None else ALL
        if key == "caduceespecialtycode" and m.exact:
            return self._ids(k.c.practitioner_id, self._exact(k.c.code, m))
        if key == "caduceespecialty":
            cond = self._norm(k.c.label_norm, m)
            return self._ids(k.c.practitioner_id, cond) if cond is not None else ALL
        site_cond = None
        if key == "caduceestructureid":
            site_cond = self._exact(o.c.structure_id, m)
        elif key == "postalcode":
            site_cond = self._exact(o.c.postcode, m)
        elif key == "l":
            site_cond = self._norm(o.c.city_norm, m)
        if site_cond is not None:
            return self._ids(a.c.practitioner_id, site_cond, source=a.join(o, o.c.id == a.c.organisation_id))
        return ALL

    def _organisations(self, key: str, m: _Match) -> Plan:
        o = organisations
        cond = None
        if key in ("uid", "caduceenationalid"):
            cond = self._exact(o.c.structure_id, m)
        elif key == "o":
            norm = self._norm(o.c.name_norm, m)
            # o is the name, else the trade name, else the structure id: rows without a name are kept
            cond = sa.or_(norm, o.c.name_norm.is_(None)) if norm is not None else None
        elif key == "caduceefiness" and m.exact:
            cond = self._exact(o.c.finess, m)
        elif key == "caduceesiret" and m.exact:
            cond = self._exact(o.c.siret, m)
        elif key == "postalcode":
            cond = self._exact(o.c.postcode, m)
        elif key == "l":
            cond = self._norm(o.c.city_norm, m)
        return self._ids(o.c.id, cond) if cond is not None else ALL

    def _mailboxes(self, key: str, m: _Match) -> Plan:
        mb, pr = mailboxes, principals
        if key == "mail":
            cond = self._exact(mb.c.address, m, transform=lambda v: [v.lower()])
            return self._ids(mb.c.id, cond) if cond is not None else ALL
        if key == "caduceemailboxtype" and m.exact:
            return self._ids(mb.c.id, mb.c.mailbox_type == _prep(m.initial).upper())
        if key == "caduceeowner" and m.exact:
            owners = sa.select(pr.c.id).where(pr.c.national_id.in_(sorted({m.initial.strip(), m.initial.strip().upper(),
                                                                            m.initial.strip().lower()})))
            return self._ids(mb.c.id, mb.c.owner_id.in_(owners))
        if key == "caduceestructureid":
            cond = self._exact(mb.c.structure_id, m)
            return self._ids(mb.c.id, cond) if cond is not None else ALL
        if key == "caduceedematerialisation" and m.exact:
            return self._ids(mb.c.id, mb.c.dematerialisation.is_(m.initial.strip() == "TRUE"))
        if key in ("caduceeprofessioncode", "caduceeprofession", "caduceespecialtycode", "caduceespecialty"):
            owners_plan = self._people(key, m)
            if not isinstance(owners_plan, Ids):
                return ALL
            return self._ids(mb.c.id, mb.c.owner_id.in_(owners_plan.stmt))
        if key in ("cn", "sn", "givenname", "displayname", "description"):
            listed = self.descriptions.lookup(m) if self.descriptions is not None else None
            described: Plan = (FALSE if listed == [] else self._listed(mb.c.id, listed) if listed is not None else
                               self._ids(mb.c.id, mb.c.description.is_not(None), self._loose(mb.c.description, m)))
            if key == "description":
                return described
            # PER of a person: the person's names; other mailboxes: the description, else the holder's name.
            people = [self._people_names(key, m), self._people_names("cn", m)]
            if ALL in people:
                return ALL
            norm = self._norm(pr.c.name_norm, m)
            if norm is None:
                return ALL
            org_owners = sa.select(pr.c.id.label("id")).where(pr.c.kind == "organisation",
                                                                sa.or_(norm, pr.c.name_norm.is_(None)))
            owners = _compound(sa.union, [*(p.stmt for p in people if isinstance(p, Ids)), org_owners])
            return plan_or([described, self._ids(mb.c.id, mb.c.owner_id.in_(owners))])
        return ALL


# -------------------- searching (blocking: runs in a worker thread)


class _SizeLimit(Exception):
    pass


class _TimeLimit(Exception):
    pass


class _Cancelled(Exception):
    pass


@dataclass
class SearchOutcome:
    code: ResultCode
    entries: int
    message: str = ""
    matched_dn: str = ""


class _LazyConnection:
    """A search's database connection, opened (with its time guard) when first needed: a search answered
    from the entry cache takes none from the pool."""

    __slots__ = ("_conn", "_open")

    def __init__(self, open_: Callable[[], sa.Connection]) -> None:
        self._open = open_
        self._conn: sa.Connection | None = None

    def get(self) -> sa.Connection:
        if self._conn is None:
            self._conn = self._open()
        return self._conn


@dataclass
class _Target:
    """Where a search starts: the root DSE, the base entry, a container, or one leaf entry."""

    kind: str  # rootdse | root | ou | leaf
    container: str | None = None  # people | organisations | mailboxes
    entry: IndexedEntry | None = None


@dataclass
class _Run:
    spec: SearchRequest
    deadline: float | None
    size_limit: int
    emit: Callable[[IndexedEntry], None]
    cancelled: Callable[[], bool]
    sent: int = 0
    view: CacheView | None = None  # the entry cache's generation this search uses (None: no cache)

    def check(self) -> None:
        if self.cancelled():
            raise _Cancelled
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise _TimeLimit

    def offer(self, entry: IndexedEntry) -> None:
        self.check()
        if evaluate(self.spec.filter, entry) is not True:
            return
        if self.size_limit and self.sent >= self.size_limit:
            raise _SizeLimit
        self.emit(entry)
        self.sent += 1


_MAIL_CANDIDATES = (sa.select(mailboxes.c.id).where(mailboxes.c.address == sa.bindparam("address"))
                    .order_by(mailboxes.c.id))


class ChangeWatch:
    """Tells whether the database changed: SQLite's `PRAGMA data_version`, on a connection of its own that
    never writes, changes whenever any other connection (of this process or another: an import, the
    admin command line) commits. None where there is no such signal (PostgreSQL, an in-memory database)."""

    def __init__(self, engine: sa.Engine) -> None:
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        database = engine.url.database
        if engine.dialect.name == "sqlite" and database and database != ":memory:" and "mode=memory" not in database:
            uri = database.startswith("file:")
            self._conn = sqlite3.connect(database, uri=uri, check_same_thread=False, timeout=30,
                                         isolation_level=None)

    @property
    def available(self) -> bool:
        return self._conn is not None

    def version(self) -> int | None:
        if self._conn is None:
            return None
        with self._lock:
            return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


_NOT_PUBLISHED = object()  # an id the container's builder left out (liste rouge, inactive…)


class CacheView:
    """One generation of the `EntryCache`: what the searches started since its last emptying share. A search
    keeps the view it started with, so what it builds after the cache was emptied lands in a view no later
    search reads."""

    __slots__ = ("candidates", "entries", "lock", "max_entries", "max_filters")

    def __init__(self, max_entries: int, max_filters: int) -> None:
        self.entries: dict[tuple[str, int], Any] = {}
        self.candidates: dict[tuple[str, Filter], tuple[list[int], bool]] = {}
        self.max_entries = max_entries
        self.max_filters = max_filters
        self.lock = threading.Lock()

    def put_entries(self, kind: str, found: dict[int, Any]) -> None:
        with self.lock:
            entries = self.entries
            for id_, entry in found.items():
                entries[(kind, id_)] = entry
            while len(entries) > self.max_entries:
                del entries[next(iter(entries))]

    def put_candidates(self, key: tuple[str, Filter], ids: list[int], complete: bool) -> None:
        with self.lock:
            candidates = self.candidates
            candidates[key] = (ids[:EntryCache.MAX_IDS], complete and len(ids) <= EntryCache.MAX_IDS)
            while len(candidates) > self.max_filters:
                del candidates[next(iter(candidates))]


class EntryCache:
    """Built entries by (container, id) and candidate ids by (container, filter), shared by the searches.

    Emptied as a whole when the database changes (`ChangeWatch`, looked at when each search starts, before
    it reads anything), when the word indexes are rebuilt, and at least every `ttl` seconds (what no change
    signal covers: a certificate reaching its expiry date). Bounded: beyond `max_entries` entries or
    `max_filters` filters, the oldest are dropped. Entries are shared between threads and never modified
    once built. Candidates are kept as the ids a search read, in ascending order, with whether they were all
    of them: a search that needs more goes on in SQL after the last one."""

    MAX_IDS = 2000  # candidate ids kept per filter

    def __init__(self, ttl: float, max_entries: int = 20_000, max_filters: int = 20_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_filters = max_filters
        self._lock = threading.Lock()
        self.version: int | None = None
        self.started = time.monotonic()
        self.view = CacheView(max_entries, max_filters)

    def sync(self, version: int | None) -> CacheView:
        """At the start of a search: the current view, emptied first if the database changed (`version`
        differs) or the view is older than `ttl`."""
        with self._lock:
            if version != self.version or time.monotonic() - self.started >= self.ttl:
                self._clear(version)
            return self.view

    def clear(self) -> None:
        with self._lock:
            self._clear(self.version)

    def _clear(self, version: int | None) -> None:
        self.view = CacheView(self.max_entries, self.max_filters)
        self.version = version
        self.started = time.monotonic()


class LdapDirectory:
    """The published directory as LDAP sees it, searched from the database (blocking calls)."""

    def __init__(self, engine: sa.Engine, base: str, *, organisation: str | None = None, size_limit: int = 500,
                 time_limit: int = 10, batch: int = BATCH, word_index_ttl: float = 60.0,
                 workers: int | None = None, cache_ttl: float = 60.0) -> None:
        self.engine = engine
        # Built entries and candidates are cached only where a change of the database can be seen.
        self.watch = ChangeWatch(engine)
        self.cache = EntryCache(cache_ttl) if self.watch.available and cache_ttl > 0 else None
        self.word_index_ttl = word_index_ttl
        self._word_lock = threading.Lock()
        self._word_version: int | None = None  # the database's data_version the word indexes were built at
        self.base = base
        self.base_rdns = normalise_dn(base)
        self.organisation = organisation
        self.size_limit = max(size_limit, 0)
        self.time_limit = max(time_limit, 0)
        self.batch = batch
        self.postgres = engine.dialect.name == "postgresql"
        self.planner = Planner(self.postgres)
        pool_size = getattr(engine.pool, "size", None)
        self.workers = max(1, workers if workers is not None else min(pool_size() if callable(pool_size) else 4, 4))
        self._limiter: Any = None
        structural = lv.structural_entries(base, organisation)
        self.root_entry = IndexedEntry.of(structural[0], "root")
        self.ou_entries = {_OU_KIND[e.get("ou")[0]]: IndexedEntry.of(e, "ou") for e in structural[1:]}

    def limiter(self) -> Any:
        """The DeferredSemaphore of `workers` searches and compares in threads (reactor thread only)."""
        if self._limiter is None:
            from twisted.internet.defer import DeferredSemaphore

            self._limiter = DeferredSemaphore(self.workers)
        return self._limiter

    # -- root DSE --
    def root_dse(self) -> IndexedEntry:
        entry = lv.LdapEntry("")
        entry.add("objectClass", "top")
        entry.add("namingContexts", self.base)
        entry.add("supportedLDAPVersion", "3")
        entry.add("supportedExtension", WHO_AM_I)
        entry.add("supportedFeatures", FEATURE_ALL_OPERATIONAL, FEATURE_ABSOLUTE_TRUE_FALSE)
        entry.add("vendorName", "Caducée")
        return IndexedEntry.of(entry, "rootdse")

    # -- limits --
    def limits(self, spec: SearchRequest) -> tuple[int, float | None]:
        size = min((x for x in (spec.size_limit, self.size_limit) if x > 0), default=0)
        seconds = min((x for x in (spec.time_limit, self.time_limit) if x > 0), default=0)
        return size, (time.monotonic() + seconds if seconds else None)

    # -- the search --
    def search(self, spec: SearchRequest, emit: Callable[[IndexedEntry], None],
               cancelled: Callable[[], bool] = lambda: False, *, deadline: float | None = None,
               size_limit: int | None = None) -> SearchOutcome:
        size, default_deadline = self.limits(spec)
        run = _Run(spec, deadline if deadline is not None else default_deadline,
                   size if size_limit is None else size_limit, emit, cancelled)
        try:
            base_text = spec.base.decode("utf-8")
            requested = normalise_dn(base_text)
        except (UnicodeDecodeError, InvalidDn):
            return SearchOutcome(ResultCode.INVALID_DN_SYNTAX, 0, "invalid DN")
        scope = Scope(spec.scope)
        if not requested and scope is Scope.BASE:
            run.offer(self.root_dse())
            return SearchOutcome(ResultCode.SUCCESS, run.sent)
        try:
            with contextlib.ExitStack() as stack:
                def connect() -> sa.Connection:
                    conn = stack.enter_context(self.engine.connect())
                    stack.enter_context(self._interruptible(conn, run))
                    return conn

                lazy = _LazyConnection(connect)
                if self.cache is not None:  # before this search reads anything (its snapshot is newer)
                    run.view = self.cache.sync(self.watch.version())
                if self._word_indexes_due():
                    self.refresh_word_indexes(lazy.get())
                target = self._locate(lazy, requested)
                self._walk(lazy, target, scope if requested else _scope_from_root(scope), run)
        except LdapError as exc:
            return SearchOutcome(exc.code, run.sent, exc.message, exc.matched_dn)
        except _SizeLimit:
            return SearchOutcome(ResultCode.SIZE_LIMIT_EXCEEDED, run.sent)
        except _TimeLimit:
            return SearchOutcome(ResultCode.TIME_LIMIT_EXCEEDED, run.sent)
        return SearchOutcome(ResultCode.SUCCESS, run.sent)

    def compare(self, entry_dn: bytes, attr: AttributeDescription, value: bytes) -> ResultCode:
        try:
            requested = normalise_dn(entry_dn.decode("utf-8"))
        except (UnicodeDecodeError, InvalidDn) as exc:
            raise LdapError(ResultCode.INVALID_DN_SYNTAX, "invalid DN") from exc
        if attr.type is None:
            raise LdapError(ResultCode.UNDEFINED_ATTRIBUTE_TYPE, "unknown attribute type")
        if not requested:
            entry = self.root_dse()
        else:
            with self.engine.connect() as conn:
                target = self._locate(conn, requested)
            if target.kind == "root":
                entry = self.root_entry
            elif target.kind == "ou":
                entry = self.ou_entries[target.container or ""]
            else:
                assert target.entry is not None
                entry = target.entry
        result = _equality(attr, value, entry)
        if result is None:
            raise LdapError(ResultCode.UNDEFINED_ATTRIBUTE_TYPE if attr.type.key not in entry.values
                            else ResultCode.UNWILLING_TO_PERFORM, "cannot compare this attribute")
        return ResultCode.COMPARE_TRUE if result else ResultCode.COMPARE_FALSE

    @staticmethod
    def _interruptible(conn: sa.Connection, run: _Run) -> Any:
        """Interrupt a running SQL statement at the deadline (SQLite progress handler; PostgreSQL
        statement_timeout), so that one expensive query cannot outlive the time limit."""
        from contextlib import contextmanager

        @contextmanager
        def guard() -> Iterator[None]:
            driver: Any = conn.connection.driver_connection
            if conn.dialect.name == "sqlite" and run.deadline is not None:
                deadline = run.deadline
                driver.set_progress_handler(lambda: int(time.monotonic() > deadline or run.cancelled()), 20000)
                try:
                    yield
                except sa.exc.OperationalError as exc:
                    if "interrupted" in str(exc.orig):
                        if run.cancelled():
                            raise _Cancelled from None
                        raise _TimeLimit from None
                    raise
                finally:
                    driver.set_progress_handler(None, 0)
                return
            if conn.dialect.name == "postgresql" and run.deadline is not None:
                ms = max(int((run.deadline - time.monotonic()) * 1000), 1)
                conn.exec_driver_sql(f"SET LOCAL statement_timeout = {ms}")
                try:
                    yield
                except sa.exc.OperationalError as exc:
                    if getattr(exc.orig, "sqlstate", None) == "57014":  # query_canceled
                        raise _TimeLimit from None
                    raise
                return
            yield

        return guard()

    def _locate(self, conn: sa.Connection | _LazyConnection, requested: tuple[Any, ...]) -> _Target:
        if not requested:
            return _Target("root")  # below the root DSE: the naming context
        base = self.base_rdns
        n = len(base)
        if len(requested) < n or requested[len(requested) - n:] != base:
            raise LdapError(ResultCode.NO_SUCH_OBJECT, "no such entry")
        relative = requested[:len(requested) - n]
        if not relative:
            return _Target("root")
        container_rdn = relative[-1]
        kind = _OU_KIND.get(container_rdn[0][1]) if len(container_rdn) == 1 and container_rdn[0][0] == "ou" else None
        if kind is None:
            raise LdapError(ResultCode.NO_SUCH_OBJECT, "no such entry", self.base)
        container_dn = f"ou={_KIND_OU[kind]},{self.base}"
        if len(relative) == 1:
            return _Target("ou", kind)
        leaf_rdn = relative[-2]
        entry = self._leaf(conn.get() if isinstance(conn, _LazyConnection) else conn, kind, leaf_rdn,
                           requested[len(requested) - n - 2:])
        if entry is None:
            raise LdapError(ResultCode.NO_SUCH_OBJECT, "no such entry", container_dn)
        if len(relative) > 2:
            raise LdapError(ResultCode.NO_SUCH_OBJECT, "no such entry", entry.dn)
        return _Target("leaf", kind, entry)

    def _leaf(self, conn: sa.Connection, kind: str, rdn: tuple[tuple[str, str], ...],
              dn: tuple[Any, ...]) -> IndexedEntry | None:
        if len(rdn) != 1:
            return None
        attr, value = rdn[0]
        wanted = dn  # normalised DN of the leaf
        variants = sorted({value, value.upper(), value.lower()})
        if kind == "people" and attr == "uid":
            ids = [r[0] for r in conn.execute(sa.select(principals.c.id).where(
                principals.c.national_id.in_(variants), principals.c.kind == "person"))]
            entries = lv.people(conn, ids, self.base)
        elif kind == "organisations" and attr == "uid":
            ids = [r[0] for r in conn.execute(sa.select(organisations.c.id).where(
                organisations.c.structure_id.in_(variants)))]
            entries = lv.organisation_entries(conn, ids, self.base)
        elif kind == "mailboxes" and attr == "mail":
            ids = [r[0] for r in conn.execute(sa.select(mailboxes.c.id).where(
                mailboxes.c.address == value.lower()))]
            entries = lv.mailbox_entries(conn, ids, self.base)
        else:
            return None
        for e in entries:
            if normalise_dn(e.dn) == tuple(wanted):
                return IndexedEntry.of(e, kind)
        return None

    def _walk(self, conn: _LazyConnection, target: _Target, scope: Scope, run: _Run) -> None:
        include_self = scope in (Scope.BASE, Scope.SUBTREE)
        if target.kind == "leaf":
            if include_self and target.entry is not None:
                run.offer(target.entry)
            return
        if target.kind == "ou":
            assert target.container is not None
            if include_self:
                run.offer(self.ou_entries[target.container])
            if scope is not Scope.BASE:
                self._container(conn, target.container, run)
            return
        if include_self:
            run.offer(self.root_entry)
        if scope is Scope.BASE:
            return
        for kind in KINDS:
            run.offer(self.ou_entries[kind])
        if scope is Scope.ONE:
            return
        for kind in KINDS:
            self._container(conn, kind, run)

    def _word_indexes_due(self) -> bool:
        current = self.planner.orphans
        return current is None or time.monotonic() - current.built >= self.word_index_ttl

    def refresh_word_indexes(self, conn: sa.Connection, *, force: bool = False) -> None:
        """(Re)build the word indexes when missing or older than `word_index_ttl`: one search thread builds,
        the others go on with the previous ones (or, the very first time, wait for them)."""
        current = self.planner.orphans
        if not force and current is not None and time.monotonic() - current.built < self.word_index_ttl:
            return
        if not self._word_lock.acquire(blocking=current is None or force):
            return
        try:
            current = self.planner.orphans
            if not force and current is not None and time.monotonic() - current.built < self.word_index_ttl:
                return
            # The indexes depend on the database only: unchanged since they were built (SQLite's data_version,
            # read before this connection reads anything), they are the same, and only get younger.
            version = None if conn.in_transaction() else self.watch.version()
            if not force and current is not None and version is not None and version == self._word_version:
                current.built = time.monotonic()
                if self.planner.descriptions is not None:
                    self.planner.descriptions.built = current.built
                return
            p, pr = practitioners, principals
            orphans = WordIndex(conn.execute(sa.select(pr.c.id, pr.c.name_norm).where(
                pr.c.kind == "person", pr.c.name_norm.is_not(None),
                ~sa.exists().where(p.c.principal_id == pr.c.id))))
            descriptions = WordIndex(conn.execute(sa.select(mailboxes.c.id, mailboxes.c.description).where(
                mailboxes.c.description.is_not(None), lv.PUBLISHED_MAILBOX)))
            self.planner.orphans, self.planner.descriptions = orphans, descriptions
            self._word_version = version
            if self.cache is not None:  # candidates were planned with the previous word indexes
                self.cache.clear()
        finally:
            self._word_lock.release()

    def candidates(self, kind: str, flt: Filter) -> Any | None:
        """The SELECT of candidate ids (ascending) for `flt` in a container, None when none can match."""
        return self._candidates(kind, flt)[0]

    def _candidates(self, kind: str, flt: Filter) -> tuple[Any | None, bool]:
        """`candidates`, and whether they are selected through the indexes (False: every id of the container)."""
        if (kind == "mailboxes" and isinstance(flt, Compare) and flt.op in ("eq", "approx")
                and flt.attr.type is not None and flt.attr.type.key == "mail" and not flt.attr.options):
            # The most frequent search (a sender looking up a recipient's certificate): the planner's
            # translation (the unique index on the address), as one statement built once.
            prepared = _prep_value("ia5", flt.value)
            if prepared is not None and "\x00" not in prepared:
                address = flt.value.decode("utf-8").strip().lower()
                return _MAIL_CANDIDATES.params(address=address), True
        plan = self.planner.plan(flt, kind)
        if plan in (FALSE, NONE):
            return None, False
        if isinstance(plan, Ids):
            sub = plan.stmt.subquery()
            return sa.select(sub.c.id).distinct().order_by(sub.c.id), True
        if kind == "people":
            return (sa.select(principals.c.id).where(principals.c.kind == "person", principals.c.active.is_(True))
                    .order_by(principals.c.id)), False
        if kind == "organisations":
            return sa.select(organisations.c.id).order_by(organisations.c.id), False
        return sa.select(mailboxes.c.id).where(lv.PUBLISHED_MAILBOX).order_by(mailboxes.c.id), False

    def _container(self, conn: _LazyConnection, kind: str, run: _Run) -> None:
        build = {"people": lv.people, "organisations": lv.organisation_entries,
                 "mailboxes": lv.mailbox_entries}[kind]
        cache = run.view
        key: tuple[str, Filter] | None = (kind, run.spec.filter) if cache is not None else None
        cached = cache.candidates.get(key) if cache is not None and key is not None else None
        statement: Any = None
        if cached is None or not cached[1]:
            statement, indexed = self._candidates(kind, run.spec.filter)
            if statement is None:  # none can match (planned without SQL: not worth a place in the cache)
                return
            if not indexed:
                key = None  # every id of the container: not kept
        # A first small batch answers the common one-entry search quickly; under a size limit, no more
        # candidates than the entries still to send, plus one to tell sizeLimitExceeded apart (every
        # entry built beyond that is thrown away). Then batches grow up to `batch`.
        size = min(50, self.batch)
        if run.size_limit:
            size = max(1, min(size, run.size_limit - run.sent + 1))
        read: list[int] = []
        if cached is not None:
            ids, complete = cached
            pos = 0
            while pos < len(ids):
                run.check()
                chunk = ids[pos:pos + size]
                pos += len(chunk)
                self._offer(conn, kind, build, chunk, run)
                size = min(self.batch, size * 4)
            if complete:
                return
            if ids:  # go on in SQL after the last id kept (candidates are in ascending order)
                statement = statement.where(statement.selected_columns[0] > ids[-1])
            read = list(ids)
        result = conn.get().execute(statement)
        complete = False
        try:
            while True:
                run.check()
                rows = result.fetchmany(size)
                if not rows:
                    complete = True
                    return
                chunk = [r[0] for r in rows]
                if key is not None and len(read) <= EntryCache.MAX_IDS:
                    read.extend(chunk)
                self._offer(conn, kind, build, chunk, run)
                size = min(self.batch, size * 4)
        finally:
            result.close()
            if cache is not None and key is not None and (cached is None or len(read) > len(cached[0]) or complete):
                cache.put_candidates(key, read, complete)

    def _offer(self, conn: _LazyConnection, kind: str, build: Callable[..., list[lv.LdapEntry]], ids: list[int],
               run: _Run) -> None:
        """Offer the entries of `ids` (ascending) to the search, from the cache or built."""
        cache = run.view
        if cache is None:
            for entry in build(conn.get(), ids, self.base):
                run.offer(IndexedEntry.of(entry, kind))
            return
        entries = cache.entries
        found: dict[int, Any] = {i: entries.get((kind, i)) for i in ids}
        missing = [i for i, e in found.items() if e is None]
        if missing:
            built: dict[int, Any] = dict.fromkeys(missing, _NOT_PUBLISHED)
            for made in build(conn.get(), missing, self.base):
                assert made.key is not None
                built[made.key] = IndexedEntry.of(made, kind)
            cache.put_entries(kind, built)
            found.update(built)
        for i in ids:
            cached = found[i]
            if cached is not _NOT_PUBLISHED:
                run.offer(cached)


def _scope_from_root(scope: Scope) -> Scope:
    """A search from the empty DN (the root DSE's children): the naming context, as if based there.
    The root DSE itself is never part of a one-level or subtree search (RFC 4512 §5.1)."""
    return Scope.BASE if scope is Scope.ONE else Scope.SUBTREE if scope is Scope.SUBORDINATE else scope


class AttributeSelection:
    """The attributes a search returns (RFC 4511 §4.5.1.8), worked out once per search from its requested
    list: none with "1.1" alone, every user attribute with none requested or "*", operational ones (the root
    DSE's) with "+" or by name."""

    __slots__ = ("_names", "all_operational", "all_user", "keys", "nothing_named", "types_only")

    def __init__(self, requested: Sequence[str], types_only: bool) -> None:
        names = [r.strip() for r in requested]
        wanted = [n for n in names if n and n != "1.1"]
        self.all_user = not wanted and "1.1" not in names or "*" in wanted
        self.all_operational = "+" in wanted
        self.nothing_named = not wanted and "1.1" not in names  # the root DSE then shows its attributes
        self.types_only = types_only
        keys: set[str] = set()
        for name in wanted:
            if name in ("*", "+"):
                continue
            desc = AttributeDescription.parse(name.encode("ascii", "replace"))
            if desc.type is not None and not desc.options:
                keys.add(desc.type.key)
        self.keys = frozenset(keys)
        self._names: dict[str, tuple[str, bool]] = {}  # attribute name → (key, operational)

    def select(self, entry: IndexedEntry) -> list[tuple[str, list[Any]]]:
        all_operational = self.all_operational or (entry.operational and self.nothing_named)
        out = []
        names = self._names
        for name, values in entry.entry.attributes.items():
            known = names.get(name)
            if known is None:
                key = name.split(";", 1)[0].lower()
                known = names[name] = (key, key in OPERATIONAL)
            key, operational = known
            if (operational and all_operational) or (not operational and self.all_user) or key in self.keys:
                out.append((name, [] if self.types_only else list(values)))
        return out

    def encode(self, msg_id: int, entry: IndexedEntry) -> bytes:
        """The SearchResultEntry message (RFC 4511 §4.5.2), BER as ldaptor writes it (a test compares)."""
        attributes = b"".join(
            _tlv(0x30, _tlv(0x04, name.encode("utf-8")) + _tlv(0x31, b"".join(_tlv(0x04, _octets(v)) for v in values)))
            for name, values in self.select(entry))
        body = _tlv(0x64, _tlv(0x04, entry.dn.encode("utf-8")) + _tlv(0x30, attributes))
        return _tlv(0x30, _tlv(0x02, _integer(msg_id)) + body)


def _integer(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 8) // 8, "big", signed=True)


def encode_search_done(msg_id: int, code: int, matched_dn: str = "", message: str = "") -> bytes:
    """The SearchResultDone message (RFC 4511 §4.5.2), BER as ldaptor writes it (a test compares)."""
    result = _tlv(0x0A, _integer(code)) + _tlv(0x04, matched_dn.encode("utf-8")) + _tlv(0x04, message.encode("utf-8"))
    return _tlv(0x30, _tlv(0x02, _integer(msg_id)) + _tlv(0x65, result))


def _octets(value: Any) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def _tlv(tag: int, content: bytes) -> bytes:
    """One BER element with a definite length in its shortest form (X.690 §8.1.3, as ldaptor encodes)."""
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(raw))) + raw + content


def select_attributes(entry: IndexedEntry, requested: Sequence[str], types_only: bool) -> list[tuple[str, list[Any]]]:
    """The attributes of `entry` to return (RFC 4511 §4.5.1.8): see `AttributeSelection`."""
    return AttributeSelection(requested, types_only).select(entry)


def encode_entry(msg_id: int, entry: IndexedEntry, requested: Sequence[str], types_only: bool) -> bytes:
    return AttributeSelection(requested, types_only).encode(msg_id, entry)


def encode_entry_ldaptor(msg_id: int, entry: IndexedEntry, requested: Sequence[str], types_only: bool) -> bytes:
    """The same message encoded by ldaptor (the reference the tests compare `encode_entry` with)."""
    response = pureldap.LDAPSearchResultEntry(objectName=entry.dn,
                                              attributes=select_attributes(entry, requested, types_only))
    return pureldap.LDAPMessage(response, id=msg_id).toWire()  # type: ignore[no-any-return]


def redact_dn(text: bytes, base: str) -> str:
    """The base DN of a search as the log may show it: below a container, the leaf's value is "*" (an
    address or national id someone looked up is not for the log)."""
    try:
        rdns = parse_dn(text.decode("utf-8"))
    except (UnicodeDecodeError, InvalidDn):
        return "invalid"
    depth = len(parse_dn(base)) + 1
    if len(rdns) <= depth:
        return text.decode("utf-8") or '""'
    shown = rdns[len(rdns) - depth:]
    return ",".join(["+".join(f"{a}=*" for a, _ in rdn) for rdn in rdns[:len(rdns) - depth]]
                    + ["+".join(f"{a}={ls.escape_rdn_value(v)}" for a, v in rdn) for rdn in shown])


# -------------------- the protocol (Twisted, on the reactor thread)

_connection_ids = itertools.count(1)


@dataclass
class _Pending:
    cancelled: threading.Event = field(default_factory=threading.Event)


class LdapServerProtocol(LDAPServer):  # type: ignore[misc]
    """One LDAPS connection. Decoding is ours (`decode_message`), and so is the encoding of search results
    (`AttributeSelection.encode`, `encode_search_done`); ldaptor encodes the other responses."""

    def __init__(self, directory: LdapDirectory) -> None:
        super().__init__()
        self.directory = directory
        self.buffer = bytearray()  # type: ignore[assignment]
        self.pending: dict[int, _Pending] = {}
        self.conn_id = f"L{next(_connection_ids)}"
        self.closing = False

    # -- transport --
    def connectionMade(self) -> None:
        # A search answers with several messages (entries, then the result) written at different times:
        # with Nagle's algorithm the result waits for the client's delayed ACK of the entries (~40 ms per
        # search on Linux). Twisted leaves TCP_NODELAY off; asyncio (the SMTP side) turns it on.
        set_nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            set_nodelay(True)
        super().connectionMade()

    def connectionLost(self, reason: Any = protocol.connectionDone) -> None:
        super().connectionLost(reason)
        for p in self.pending.values():
            p.cancelled.set()

    def send(self, msg_id: int, response: Any) -> None:
        if self.connected and not self.closing:
            self.transport.write(pureldap.LDAPMessage(response, id=msg_id).toWire())

    def disconnect(self, reason: str) -> None:
        """RFC 4511 §4.4.1: a notice of disconnection (protocolError), then close."""
        if self.closing:
            return
        log.info("event=ldap_disconnect conn=%s reason=%s", self.conn_id, reason)
        if self.connected:
            notice = pureldap.LDAPExtendedResponse(resultCode=ResultCode.PROTOCOL_ERROR,
                                                   errorMessage="protocol error",
                                                   responseName=NOTICE_OF_DISCONNECTION)
            self.transport.write(pureldap.LDAPMessage(notice, id=0).toWire())
        self.closing = True
        self.buffer.clear()
        for p in self.pending.values():
            p.cancelled.set()
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        self.buffer += data
        while not self.closing:
            try:
                size = frame(self.buffer)
                if size is None:
                    if len(self.buffer) > MAX_PDU:
                        raise ProtocolViolation("request too large")
                    return
                pdu = bytes(self.buffer[:size])
                del self.buffer[:size]
                message = decode_message(pdu)
            except ProtocolViolation as exc:
                self.disconnect(str(exc))
                return
            except Exception:
                log.exception("event=ldap_decode_error conn=%s", self.conn_id)
                self.disconnect("undecodable")
                return
            self.dispatch(message)

    # -- operations --
    def dispatch(self, message: Message) -> None:
        critical = [c for c in message.controls if c.critical]
        if message.op == OP_UNBIND:
            self.closing = True
            for p in self.pending.values():
                p.cancelled.set()
            self.transport.loseConnection()
            return
        if message.op == OP_ABANDON:
            pending = self.pending.get(message.request)
            if pending is not None:
                pending.cancelled.set()
            return
        response_class = {OP_BIND: pureldap.LDAPBindResponse, OP_SEARCH: pureldap.LDAPSearchResultDone,
                          OP_COMPARE: pureldap.LDAPCompareResponse,
                          OP_EXTENDED: pureldap.LDAPExtendedResponse, **_WRITES}[message.op]
        if critical:  # RFC 4511 §4.1.11: no control is supported here
            self.send(message.id, response_class(resultCode=ResultCode.UNAVAILABLE_CRITICAL_EXTENSION,
                                                 errorMessage="unsupported critical control"))
            if message.op == OP_SEARCH:
                self.log_search(message, ResultCode.UNAVAILABLE_CRITICAL_EXTENSION, 0, 0.0)
            return
        if message.error is not None:
            self.send(message.id, response_class(resultCode=message.error.code, errorMessage=message.error.message))
            if message.op == OP_SEARCH:
                log.info("event=ldap_search conn=%s op=%d result=%d entries=0 reason=filter_too_complex",
                         self.conn_id, message.id, message.error.code)
            return
        if message.op in _WRITES:
            self.send(message.id, response_class(resultCode=ResultCode.UNWILLING_TO_PERFORM,
                                                 errorMessage="read-only directory"))
            return
        if message.op == OP_BIND:
            self.bind(message)
        elif message.op == OP_EXTENDED:
            self.extended(message)
        elif message.op in (OP_SEARCH, OP_COMPARE):
            if len(self.pending) >= MAX_PENDING or message.id in self.pending:
                self.send(message.id, response_class(resultCode=ResultCode.BUSY, errorMessage="too many operations"))
                return
            if message.op == OP_SEARCH:
                self.search(message)
            else:
                self.compare(message)

    def bind(self, message: Message) -> None:
        request: BindRequest = message.request
        if request.version != 3:
            code, text = ResultCode.PROTOCOL_ERROR, "LDAPv3 only"
        elif request.simple is None:
            code, text = ResultCode.AUTH_METHOD_NOT_SUPPORTED, "anonymous simple bind only"
        elif request.name or request.simple:
            # RFC 4513 §5.1.2 (unauthenticated bind) and §5.1.3: there are no passwords in this system.
            code, text = ResultCode.UNWILLING_TO_PERFORM, "bind anonymously: no passwords here"
        else:
            code, text = ResultCode.SUCCESS, ""
        log.info("event=ldap_bind conn=%s result=%d", self.conn_id, code)
        self.send(message.id, pureldap.LDAPBindResponse(resultCode=code, errorMessage=text))

    def extended(self, message: Message) -> None:
        name = message.request.name
        if name == WHO_AM_I:
            self.send(message.id, pureldap.LDAPExtendedResponse(resultCode=ResultCode.SUCCESS, response=b""))
        elif name == START_TLS:
            self.send(message.id, pureldap.LDAPExtendedResponse(
                resultCode=ResultCode.OPERATIONS_ERROR, errorMessage="TLS is already established",
                responseName=START_TLS))
        else:  # RFC 4511 §4.12
            self.send(message.id, pureldap.LDAPExtendedResponse(resultCode=ResultCode.PROTOCOL_ERROR,
                                                                errorMessage="unsupported extended operation"))

    def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn` in the reactor's thread pool, at most `directory.workers` at a time: more threads than
        pooled database connections make the pool open (and close) a connection per search, each with a
        cold page cache, and more threads than that only contend for the GIL."""
        from twisted.internet import reactor

        limiter = self.directory.limiter()
        return limiter.run(deferToThreadPool, reactor, reactor.getThreadPool(), fn, *args)  # type: ignore[attr-defined]

    def search(self, message: Message) -> None:
        from twisted.internet import reactor

        spec: SearchRequest = message.request
        pending = self.pending[message.id] = _Pending()
        started = time.monotonic()
        size, deadline = self.directory.limits(spec)
        chunk: list[bytes] = []
        chunk_bytes = [0]

        def flush() -> None:
            if chunk:
                data = b"".join(chunk)
                chunk.clear()
                chunk_bytes[0] = 0
                reactor.callFromThread(self.write_raw, data)  # type: ignore[attr-defined]

        selection = AttributeSelection(spec.attributes, spec.types_only)

        def emit(entry: IndexedEntry) -> None:
            encoded = selection.encode(message.id, entry)
            chunk.append(encoded)
            chunk_bytes[0] += len(encoded)
            if chunk_bytes[0] > 64 * 1024 or len(chunk) >= 20:
                flush()

        def work() -> SearchOutcome:
            try:
                return self.directory.search(spec, emit, pending.cancelled.is_set, deadline=deadline,
                                             size_limit=size)
            finally:
                flush()

        def done(outcome: SearchOutcome) -> None:
            self.pending.pop(message.id, None)
            if pending.cancelled.is_set() and outcome.code is ResultCode.SUCCESS:
                return  # abandoned: no response (RFC 4511 §4.11)
            self.write_raw(encode_search_done(message.id, outcome.code, outcome.matched_dn, outcome.message))
            self.log_search(message, outcome.code, outcome.entries, started)

        def failed(failure: Any) -> None:
            self.pending.pop(message.id, None)
            if failure.check(_Cancelled):
                self.log_search(message, ResultCode.OTHER, 0, started, note="abandoned")
                return
            ref = secrets.token_hex(5).upper()
            log.error("event=ldap_search_error conn=%s op=%d ref=%s", self.conn_id, message.id, ref,
                      exc_info=(failure.type, failure.value, failure.getTracebackObject()))
            self.send(message.id, pureldap.LDAPSearchResultDone(resultCode=ResultCode.OTHER,
                                                                errorMessage=f"internal error, ref {ref}"))
            self.log_search(message, ResultCode.OTHER, 0, started)

        d = self._in_thread(work)
        d.addCallbacks(done, failed)

    def write_raw(self, data: bytes) -> None:
        if self.connected and not self.closing:
            self.transport.write(data)

    def compare(self, message: Message) -> None:
        request: CompareRequest = message.request
        self.pending[message.id] = _Pending()

        def done(code: ResultCode) -> None:
            self.pending.pop(message.id, None)
            self.send(message.id, pureldap.LDAPCompareResponse(resultCode=code))

        def failed(failure: Any) -> None:
            self.pending.pop(message.id, None)
            if failure.check(LdapError):
                err = failure.value
                self.send(message.id, pureldap.LDAPCompareResponse(resultCode=err.code, matchedDN=err.matched_dn,
                                                                   errorMessage=err.message))
                return
            ref = secrets.token_hex(5).upper()
            log.error("event=ldap_compare_error conn=%s op=%d ref=%s", self.conn_id, message.id, ref,
                      exc_info=(failure.type, failure.value, failure.getTracebackObject()))
            self.send(message.id, pureldap.LDAPCompareResponse(resultCode=ResultCode.OTHER,
                                                               errorMessage=f"internal error, ref {ref}"))

        d = self._in_thread(self.directory.compare, request.entry, request.attr, request.value)
        d.addCallbacks(done, failed)

    def log_search(self, message: Message, code: int, entries: int, started: float, note: str = "") -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        spec: SearchRequest = message.request
        ms = (time.monotonic() - started) * 1000 if started else 0.0
        log.info("event=ldap_search conn=%s op=%d base=%s scope=%s filter=%s result=%d entries=%d ms=%.1f%s",
                 self.conn_id, message.id, redact_dn(spec.base, self.directory.base), Scope(spec.scope).name.lower(),
                 ",".join(sorted(filter_attributes(spec.filter))) or "-", code, entries, ms,
                 f" note={note}" if note else "")


class LdapServerFactory(protocol.ServerFactory):
    def __init__(self, directory: LdapDirectory) -> None:
        self.directory = directory

    def buildProtocol(self, addr: Any) -> LdapServerProtocol:
        proto = LdapServerProtocol(self.directory)
        proto.factory = self
        return proto


def ldaps_context_factory(cert_file: Path, key_file: Path) -> Any:
    """The node's TLS profile (crypto.tls) without a client certificate request (see the module docstring)."""
    from crypto.tls import twisted_server_context_factory

    factory = twisted_server_context_factory(cert_file, key_file)
    factory.getContext().set_verify(SSL.VERIFY_NONE)
    return factory


def listen_ldaps(reactor: Any, directory: LdapDirectory, cert_file: Path, key_file: Path, host: str,
                 port: int) -> Any:
    """Listen for LDAPS (implicit TLS, RFC 4513 §3.1.3's "ldaps") on host:port; returns the Twisted port."""
    return reactor.listenSSL(port, LdapServerFactory(directory), ldaps_context_factory(cert_file, key_file),
                             interface=host)


__all__ = [
    "AttributeSelection",
    "LdapDirectory",
    "LdapServerFactory",
    "LdapServerProtocol",
    "Planner",
    "ResultCode",
    "Scope",
    "decode_message",
    "evaluate",
    "listen_ldaps",
    "normalise_dn",
    "parse_dn",
    "select_attributes",
]


