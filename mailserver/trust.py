"""The trust space: the whitelist of operator domains and the certificate DN each one must present.

The national list is the ANS file `ListeBlancheMSSante` (REFERENCE.md §1; namespace
`https://listeblanche.mssante.fr/schema`): `<DateDeGeneration>`, then `<ListeDomaines>` of `<Domaine>` with
`<Nom>`, `<Description>`, `<DNCertificatOperateur>`, `<ResponsableContact>`, `<SupportContact>`, `<DateMAJ>`.
ANS publishes a SHA-256 checksum of the file beside it.

Three layers, from pure to effectful:

* parsing and decisions, pure: `parse_whitelist`, `verify_checksum`, `parse_dn`, `dn_matches`;
* `TrustStore`: the `trust_domains` / `trust_imports` tables, written through the single database `Writer`,
  with an in-memory snapshot so that `lookup` / `is_trusted` cost no query per relay connection;
* `fetch_source` and `TrustRefresher`: fetch the configured source (a file or an `https://` URL) and import
  it every `[trust] refresh_interval` seconds.

An import is all or nothing: the document is validated completely first, every problem is reported at
once (`TrustListError.problems`), and only a valid list replaces the national entries, in one transaction.
A list that fails to fetch, to verify or to parse leaves the last good list in force. Entries an
administrator added (`source = "local"`) are never touched by an import and take precedence over a national
entry for the same domain.

Security of the XML reader: the document is parsed with expat directly, any DOCTYPE is refused (so no
entity can be declared: no XXE, no "billion laughs"), parameter entities are never parsed and the input is
capped at `MAX_LIST_SIZE` bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import enum
import hashlib
import hmac
import http.client
import logging
import os
import re
import secrets
import ssl
import threading
import time
import unicodedata
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol
from xml.parsers import expat

import sqlalchemy as sa
from cryptography import x509
from cryptography.x509.oid import NameOID

from mailserver.audit import append_in
from mailserver.audit_api import AuditEvent
from mailserver.db import Writer
from mailserver.schema import trust_domains, trust_imports

log = logging.getLogger(__name__)

NAMESPACE = "https://listeblanche.mssante.fr/schema"
ROOT = "ListeBlancheMSSante"
MAX_LIST_SIZE = 50 * 1024 * 1024  # the 2025 national file is well under 1 MB
ARCHIVE_NAME = "listeblanchemssante.xml"  # the name ANS publishes the file under
FETCH_TIMEOUT = 60.0
SNAPSHOT_TTL = 5.0  # seconds before a lookup checks whether another process changed the tables

# Column widths of mailserver/schema.py.
_MAX_DOMAIN = 253  # RFC 1035 §2.3.4 (255 octets on the wire: 253 characters in text form)
_MAX_DN = 1000
_MAX_DESCRIPTION = 500
_MAX_SOURCE = 1000
_MAX_ACTOR = 64
_MAX_PROBLEMS_LOGGED = 20


class TrustListError(Exception):
    """Every problem found in a whitelist, a checksum, a fetch or an administrative change."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class TrustSource(enum.Enum):
    """Where an entry of `trust_domains` comes from."""

    NATIONAL = "national"  # the imported ListeBlancheMSSante; replaced wholesale by each import
    LOCAL = "local"  # added by an administrator; kept across imports, wins over a national entry


@dataclass(frozen=True)
class TrustEntry:
    """One `<Domaine>` of the list: a domain and the subject DN of its operator's certificate."""

    domain: str
    operator_dn: str
    description: str | None = None
    responsible_contact: str | None = None
    support_contact: str | None = None
    updated_at: dt.datetime | None = None  # <DateMAJ>


@dataclass(frozen=True)
class Whitelist:
    """A validated `ListeBlancheMSSante` document."""

    generated_at: dt.datetime  # <DateDeGeneration>
    entries: tuple[TrustEntry, ...]

    @property
    def operators(self) -> int:
        """Number of distinct operator certificates (DNs compared as `dn_matches` does)."""
        return len({_dn_key(parse_dn(e.operator_dn)) for e in self.entries})


@dataclass(frozen=True)
class StoredEntry:
    """A row of `trust_domains`: an entry in force, with where it comes from."""

    domain: str
    operator_dn: str
    description: str | None
    source: TrustSource
    updated_at: dt.datetime


@dataclass(frozen=True)
class ImportRecord:
    """A row of `trust_imports`: one accepted import."""

    id: int
    imported_at: dt.datetime
    generated_at: dt.datetime | None
    source: str
    sha256: str
    domains: int


@dataclass(frozen=True)
class ImportResult:
    """What an accepted import changed."""

    import_id: int
    source: str
    sha256: str
    generated_at: dt.datetime
    domains: int  # domains in the list
    operators: int  # distinct operator certificates in the list
    local: int  # local entries in force, untouched by the import
    overridden: tuple[str, ...]  # national domains not written because a local entry overrides them


# --------------------------------------------------------------------------------------------------
# Distinguished names (RFC 4514 string form; matching after RFC 5280 §7.1 / RFC 4518)
# --------------------------------------------------------------------------------------------------

DnAttribute = tuple[str, str]  # (dotted OID, value)
Rdn = tuple[DnAttribute, ...]

_EMAIL_OID = "1.2.840.113549.1.9.1"  # PKCS #9 emailAddress, still found in subject DNs
_ATTRIBUTE_TYPES: dict[str, str] = {
    # RFC 4514 §3 keywords, then the usual X.520 / RFC 4519 names and their OpenSSL short forms.
    "cn": NameOID.COMMON_NAME.dotted_string,
    "commonname": NameOID.COMMON_NAME.dotted_string,
    "l": NameOID.LOCALITY_NAME.dotted_string,
    "localityname": NameOID.LOCALITY_NAME.dotted_string,
    "st": NameOID.STATE_OR_PROVINCE_NAME.dotted_string,
    "s": NameOID.STATE_OR_PROVINCE_NAME.dotted_string,
    "stateorprovincename": NameOID.STATE_OR_PROVINCE_NAME.dotted_string,
    "o": NameOID.ORGANIZATION_NAME.dotted_string,
    "organizationname": NameOID.ORGANIZATION_NAME.dotted_string,
    "ou": NameOID.ORGANIZATIONAL_UNIT_NAME.dotted_string,
    "organizationalunitname": NameOID.ORGANIZATIONAL_UNIT_NAME.dotted_string,
    "c": NameOID.COUNTRY_NAME.dotted_string,
    "countryname": NameOID.COUNTRY_NAME.dotted_string,
    "street": NameOID.STREET_ADDRESS.dotted_string,
    "streetaddress": NameOID.STREET_ADDRESS.dotted_string,
    "dc": NameOID.DOMAIN_COMPONENT.dotted_string,
    "domaincomponent": NameOID.DOMAIN_COMPONENT.dotted_string,
    "uid": NameOID.USER_ID.dotted_string,
    "userid": NameOID.USER_ID.dotted_string,
    "serialnumber": NameOID.SERIAL_NUMBER.dotted_string,
    "sn": NameOID.SURNAME.dotted_string,
    "surname": NameOID.SURNAME.dotted_string,
    "gn": NameOID.GIVEN_NAME.dotted_string,
    "givenname": NameOID.GIVEN_NAME.dotted_string,
    "title": NameOID.TITLE.dotted_string,
    "initials": NameOID.INITIALS.dotted_string,
    "generationqualifier": NameOID.GENERATION_QUALIFIER.dotted_string,
    "dnqualifier": NameOID.DN_QUALIFIER.dotted_string,
    "pseudonym": NameOID.PSEUDONYM.dotted_string,
    "businesscategory": NameOID.BUSINESS_CATEGORY.dotted_string,
    "postalcode": NameOID.POSTAL_CODE.dotted_string,
    "organizationidentifier": NameOID.ORGANIZATION_IDENTIFIER.dotted_string,
    "emailaddress": _EMAIL_OID,
    "email": _EMAIL_OID,
    "e": _EMAIL_OID,
}
_KEYWORD_RE = re.compile(r"[A-Za-z][A-Za-z0-9-]*\Z")
_OID_RE = re.compile(r"(?:OID\.)?([0-2](?:\.(?:0|[1-9][0-9]*))+)\Z", re.IGNORECASE)
# RFC 4514 §2.4: characters that may follow a backslash as themselves.
_ESCAPABLE = frozenset(' "#+,;<=>\\')
_HEX = frozenset("0123456789abcdefABCDEF")


def _attribute_oid(raw: str) -> str:
    name = raw.strip()
    if not name:
        raise ValueError("attribute type missing before '='")
    match = _OID_RE.match(name)
    if match:
        return match.group(1)
    if not _KEYWORD_RE.match(name):
        raise ValueError(f"invalid attribute type {name!r}")
    oid = _ATTRIBUTE_TYPES.get(name.lower())
    if oid is None:
        raise ValueError(f"unknown attribute type {name!r} (write it as a dotted OID)")
    return oid


def _read_value(text: str, i: int) -> tuple[str, int]:
    """Read one attribute value from `text[i:]` up to an unescaped ',' or '+'. RFC 4514 §3 and §2.4."""
    n = len(text)
    while i < n and text[i] == " ":
        i += 1
    if i < n and text[i] == "#":
        # RFC 4514 §2.4 hexstring: the BER encoding of the value. Certificate DNs in the whitelist never
        # use it; refusing is safer than guessing the string type.
        raise ValueError("hex-encoded (#…) attribute values are not supported")
    buf = bytearray()
    if i < n and text[i] == '"':  # the quoted form of RFC 2253's predecessors (RFC 1779 §2.3)
        i += 1
        while True:
            if i >= n:
                raise ValueError("unterminated quoted value")
            c = text[i]
            if c == '"':
                i += 1
                break
            if c == "\\":
                i = _read_escape(text, i, buf)
                continue
            buf += c.encode()
            i += 1
        while i < n and text[i] == " ":
            i += 1
        if i < n and text[i] not in ",+":
            raise ValueError("unexpected text after a quoted value")
    else:
        keep = 0  # length of `buf` up to its last character that is not an unescaped space
        while i < n and text[i] not in ",+":
            c = text[i]
            if c == "\\":
                i = _read_escape(text, i, buf)
                keep = len(buf)
                continue
            buf += c.encode()
            i += 1
            if c != " ":
                keep = len(buf)
        del buf[keep:]  # RFC 4514 §2.4: unescaped trailing spaces are not part of the value
    try:
        value = buf.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("escaped bytes are not valid UTF-8") from None
    if not value.strip():
        raise ValueError("empty attribute value")
    return value, i


def _read_escape(text: str, i: int, buf: bytearray) -> int:
    """Decode the escape at `text[i] == '\\'` into `buf`; return the index after it. RFC 4514 §2.4."""
    if i + 1 >= len(text):
        raise ValueError("DN ends with a lone backslash")
    nxt = text[i + 1]
    if nxt in _ESCAPABLE:
        buf += nxt.encode()
        return i + 2
    if nxt in _HEX and i + 2 < len(text) and text[i + 2] in _HEX:
        buf.append(int(text[i + 1:i + 3], 16))
        return i + 3
    raise ValueError(f"invalid escape '\\{nxt}'")


def _strip_dn(text: str) -> str:
    """Remove surrounding whitespace, except a trailing space escaped by a backslash (RFC 4514 §2.4)."""
    text = text.lstrip()
    body = text.rstrip()
    backslashes = len(body) - len(body.rstrip("\\"))
    if backslashes % 2 and len(body) < len(text):
        body += text[len(body)]  # "\ " at the end: the escaped space belongs to the value
    return body


def parse_dn(text: str) -> tuple[Rdn, ...]:
    """Parse a DN in RFC 4514 string form into its RDNs, in written order, each a tuple of (OID, value).

    Leniencies, because whitelists are typed by people: spaces around ',', '+' and '=' are ignored,
    keywords are case-insensitive (`CN`, `cn`, `commonName`), `E`/`emailAddress` and `S` are accepted, a
    value may be quoted (RFC 1779 §2.3). Refused with `ValueError`: an empty DN, a type with no '=', an
    unknown keyword (write a dotted OID instead), an empty value, a bad escape, `#hex` values.
    """
    text = _strip_dn(text)
    if not text:
        raise ValueError("empty DN")
    rdns: list[Rdn] = []
    current: list[DnAttribute] = []
    i, n = 0, len(text)
    while True:
        eq = i
        while eq < n and text[eq] not in "=,+":
            eq += 1
        if eq >= n or text[eq] != "=":
            fragment = text[i:eq].strip() or text[i:i + 20]
            raise ValueError(f"attribute {fragment!r} has no '=value'")
        oid = _attribute_oid(text[i:eq])
        value, i = _read_value(text, eq + 1)
        current.append((oid, value))
        if i >= n:
            rdns.append(tuple(current))
            return tuple(rdns)
        separator = text[i]
        i += 1
        if separator == ",":
            rdns.append(tuple(current))
            current = []
        if i >= n or not text[i:].strip():
            raise ValueError(f"DN ends with '{separator}'")


def _normalise_value(value: str) -> str:
    """RFC 4518 §2 string preparation, simplified: NFKC, case folding, insignificant space removed."""
    return " ".join(unicodedata.normalize("NFKC", value).casefold().split())


DnKey = tuple[DnAttribute, ...]


def _dn_key(rdns: Iterable[Iterable[DnAttribute]]) -> DnKey:
    return tuple(sorted((oid, _normalise_value(value)) for rdn in rdns for oid, value in rdn))


def _name_key(subject: x509.Name) -> DnKey:
    pairs = []
    for attribute in subject:
        value = attribute.value
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        pairs.append((attribute.oid.dotted_string, _normalise_value(text)))
    return tuple(sorted(pairs))


def dn_matches(subject: x509.Name, whitelist_dn: str) -> bool:
    """Whether a certificate subject is the DN written in the whitelist.

    Both sides are reduced to the multiset of their (attribute type, value) pairs, values prepared as in
    RFC 4518 §2 (Unicode NFKC, case folded, leading, trailing and repeated spaces removed), and the two
    multisets must be equal. Why this rule:

    * Order-insensitive: the whitelist writes DNs leaf first (`CN=…,OU=…,O=…,C=FR`, RFC 4514 §2.1 order)
      while certificates encode them root first, and tools print either order; multi-valued RDNs are
      flattened for the same reason. Attribute *types* still have to agree, so moving a value from OU to O
      does not match.
    * Case- and space-insensitive: X.520 declares caseIgnoreMatch for the naming attributes used here (CN,
      OU, O, L, ST, C, serialNumber) and RFC 5280 §7.1 prescribes RFC 4518 preparation before comparing.
    * Exact otherwise: a different, missing, extra or repeated attribute fails. No subset or wildcard
      rule: a certificate with an extra OU is another certificate.

    A whitelist DN that does not parse matches nothing (entries are validated when stored).
    """
    try:
        expected = _dn_key(parse_dn(whitelist_dn))
    except ValueError:
        return False
    return _name_key(subject) == expected


# --------------------------------------------------------------------------------------------------
# Domains, dates, checksum
# --------------------------------------------------------------------------------------------------

_LABEL_RE = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)\Z")


def normalise_domain(name: str) -> str:
    """The domain in lower case; `ValueError` unless it is a fully qualified LDH host name.

    RFC 1035 §2.3.1 preferred syntax as relaxed by RFC 1123 §2.1; internationalised names must be given
    as A-labels (`xn--…`, RFC 5890).
    """
    domain = name.strip().lower()
    if not domain:
        raise ValueError("empty domain name")
    if len(domain) > _MAX_DOMAIN:
        raise ValueError(f"domain name longer than {_MAX_DOMAIN} characters")
    labels = domain.split(".")
    if len(labels) < 2:
        raise ValueError(f"{domain!r} is not a fully qualified domain name")
    if not all(_LABEL_RE.match(label) for label in labels):
        raise ValueError(f"{domain!r} is not a valid domain name (letters, digits, '-' and '.'; A-labels)")
    if labels[-1].isdigit():
        raise ValueError(f"{domain!r} is not a valid domain name (numeric top-level label)")
    return domain


def _parse_time(text: str) -> dt.datetime:
    """An ISO 8601 timestamp such as `2025-03-13T14:54:10Z`; without an offset it is taken as UTC."""
    value = dt.datetime.fromisoformat(text.strip())
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}\Z")
_BSD_RE = re.compile(r"SHA256 \((?P<name>.*)\) = (?P<hex>[0-9a-fA-F]{64})\Z")


def _expected_digest(expected: str, filename: str | None) -> str:
    """The hex digest in a checksum text: bare hex, `sha256sum` lines or BSD `SHA256 (f) = hex` lines."""
    candidates: list[tuple[str | None, str]] = []
    for line in expected.splitlines():
        line = line.strip()
        if not line:
            continue
        bsd = _BSD_RE.match(line)
        if bsd:
            candidates.append((bsd.group("name"), bsd.group("hex")))
            continue
        digest, _, name = line.partition(" ")
        if not _SHA256_RE.match(digest):
            raise TrustListError([f"checksum line {line[:80]!r} does not start with a SHA-256 hex digest"])
        name = name.strip()
        candidates.append((name.lstrip("*") or None, digest))  # '*' marks binary mode in sha256sum
    if not candidates:
        raise TrustListError(["the checksum is empty"])
    if len(candidates) == 1:
        return candidates[0][1].lower()
    named = [digest for name, digest in candidates if filename is not None and name == filename]
    if len(named) != 1:
        raise TrustListError([f"the checksum file lists {len(candidates)} files and none is named {filename!r}"])
    return named[0].lower()


def verify_checksum(data: bytes, expected: str, *, filename: str | None = None) -> str:
    """Check `data` against a published SHA-256; return its hex digest. Raises `TrustListError`.

    `expected` is the hex digest (any case) or the text of a checksum file, in `sha256sum` format
    (`HEX  name`, `HEX *name`) or BSD format (`SHA256 (name) = HEX`). A file that lists several files
    needs `filename` to pick the line.
    """
    want = _expected_digest(expected, filename)
    actual = hashlib.sha256(data).hexdigest()
    if not hmac.compare_digest(actual, want):
        raise TrustListError([f"SHA-256 mismatch: the checksum says {want}, the file hashes to {actual}"])
    return actual


# --------------------------------------------------------------------------------------------------
# The XML reader
# --------------------------------------------------------------------------------------------------


class _Refused(Exception):
    """Raised from an expat handler to abort parsing of a document we do not accept."""


def _read_xml(data: bytes) -> tuple[ET.Element, dict[ET.Element, int]]:
    """Parse with expat into an ElementTree, refusing any DOCTYPE; also return each element's line."""
    parser = expat.ParserCreate(namespace_separator="}")
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    builder = ET.TreeBuilder()
    lines: dict[ET.Element, int] = {}

    def qname(tag: str) -> str:
        return "{" + tag if "}" in tag else tag

    def start(tag: str, attrs: dict[str, str]) -> None:
        element = builder.start(qname(tag), attrs)
        lines[element] = parser.CurrentLineNumber

    def refuse_doctype(*_args: Any) -> None:
        # No DOCTYPE means no entity declaration: no entity expansion (billion laughs), no external
        # entity (XXE), no external DTD fetch.
        raise _Refused("a DOCTYPE is not allowed in the whitelist")

    def refuse_entity(*_args: Any) -> None:
        raise _Refused("entity declarations are not allowed in the whitelist")

    def refuse_external(_context: str, _base: str | None, _system_id: str | None,
                        _public_id: str | None) -> int:
        raise _Refused("external entities are not allowed in the whitelist")

    parser.StartElementHandler = start
    parser.EndElementHandler = lambda tag: builder.end(qname(tag))
    parser.CharacterDataHandler = builder.data
    parser.StartDoctypeDeclHandler = refuse_doctype
    parser.EntityDeclHandler = refuse_entity
    parser.ExternalEntityRefHandler = refuse_external
    parser.Parse(data, True)
    return builder.close(), lines


def _text(element: ET.Element | None) -> str | None:
    if element is None:
        return None
    value = "".join(element.itertext()).strip()
    return value or None


def parse_whitelist(data: bytes) -> Whitelist:
    """Validate and read a `ListeBlancheMSSante` document (REFERENCE.md §1). Pure.

    Accepts the document in the ANS namespace or without namespace. Raises `TrustListError` with every
    problem found: not XML, DOCTYPE, wrong root, no `<DateDeGeneration>` or `<ListeDomaines>`, no domain,
    and per `<Domaine>` a missing or repeated `<Nom>` / `<DNCertificatOperateur>`, an invalid domain name,
    a DN that does not parse, an invalid `<DateMAJ>`, and a domain listed twice with different DNs (listed
    twice with the same DN is accepted once). Descriptions beyond 500 characters are shortened.
    """
    if len(data) > MAX_LIST_SIZE:
        raise TrustListError([f"the list is {len(data)} bytes; at most {MAX_LIST_SIZE} are accepted"])
    if not data.strip():
        raise TrustListError(["the list is empty"])
    try:
        root, lines = _read_xml(data)
    except _Refused as exc:
        raise TrustListError([str(exc)]) from None
    except expat.ExpatError as exc:
        raise TrustListError(
            [f"not well-formed XML: {expat.ErrorString(exc.code)} at line {exc.lineno}, column {exc.offset}"]
        ) from None
    except (LookupError, ValueError):
        # An encoding declaration expat hands to Python's codecs: unknown ("bogus"), not a text encoding
        # ("rot13"), multi-byte ("utf-7") or failing ("idna"). Found by tests/fuzz.
        raise TrustListError(["not well-formed XML: unsupported encoding declaration"]) from None

    if root.tag == f"{{{NAMESPACE}}}{ROOT}":
        ns = f"{{{NAMESPACE}}}"
    elif root.tag == ROOT:
        ns = ""
    else:
        raise TrustListError(
            [f"root element is <{root.tag}>, expected <{ROOT}> (namespace {NAMESPACE} or none)"]
        )

    problems: list[str] = []

    def one(parent: ET.Element, name: str, where: str, *, required: bool) -> str | None:
        found = parent.findall(ns + name)
        if len(found) > 1:
            problems.append(f"{where}: <{name}> appears {len(found)} times")
            return None
        value = _text(found[0]) if found else None
        if value is None and required:
            problems.append(f"{where}: <{name}> missing or empty")
        return value

    generated_at: dt.datetime | None = None
    generated_text = one(root, "DateDeGeneration", f"<{ROOT}>", required=True)
    if generated_text is not None:
        try:
            generated_at = _parse_time(generated_text)
        except ValueError:
            problems.append(f"<DateDeGeneration> {generated_text[:40]!r} is not an ISO 8601 date")

    lists = root.findall(ns + "ListeDomaines")
    if len(lists) != 1:
        problems.append(f"<{ROOT}> must hold exactly one <ListeDomaines>, found {len(lists)}")
    domaines = [d for lst in lists for d in lst.findall(ns + "Domaine")]
    if lists and not domaines:
        problems.append("<ListeDomaines> holds no <Domaine>")

    entries: dict[str, TrustEntry] = {}
    keys: dict[str, DnKey] = {}
    first_line: dict[str, int] = {}
    for index, element in enumerate(domaines, start=1):
        line = lines.get(element, 0)
        raw_name = one(element, "Nom", f"line {line}: <Domaine> #{index}", required=True)
        where = f"line {line}: <Domaine> {raw_name!r}" if raw_name else f"line {line}: <Domaine> #{index}"
        raw_dn = one(element, "DNCertificatOperateur", where, required=True)
        description = one(element, "Description", where, required=False)
        responsible = one(element, "ResponsableContact", where, required=False)
        support = one(element, "SupportContact", where, required=False)
        updated_text = one(element, "DateMAJ", where, required=False)

        domain: str | None = None
        if raw_name is not None:
            try:
                domain = normalise_domain(raw_name)
            except ValueError as exc:
                problems.append(f"{where}: {exc}")
        key: DnKey | None = None
        if raw_dn is not None:
            if len(raw_dn) > _MAX_DN:
                problems.append(f"{where}: <DNCertificatOperateur> longer than {_MAX_DN} characters")
            else:
                try:
                    key = _dn_key(parse_dn(raw_dn))
                except ValueError as exc:
                    problems.append(f"{where}: <DNCertificatOperateur> does not parse: {exc}")
        updated_at: dt.datetime | None = None
        if updated_text is not None:
            try:
                updated_at = _parse_time(updated_text)
            except ValueError:
                problems.append(f"{where}: <DateMAJ> {updated_text[:40]!r} is not an ISO 8601 date")
        if domain is None or key is None or raw_dn is None:
            continue
        if domain in entries:
            if keys[domain] != key:
                problems.append(
                    f"{where}: domain listed again (first at line {first_line[domain]}) with another "
                    f"operator DN"
                )
            continue
        if description is not None and len(description) > _MAX_DESCRIPTION:
            description = description[:_MAX_DESCRIPTION - 1] + "…"
        entries[domain] = TrustEntry(domain, raw_dn, description, responsible, support, updated_at)
        keys[domain] = key
        first_line[domain] = line

    if problems:
        raise TrustListError(problems)
    assert generated_at is not None  # a missing or bad date is a problem above
    return Whitelist(generated_at, tuple(entries.values()))


# --------------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Snapshot:
    version: tuple[Any, ...]
    entries: dict[str, tuple[StoredEntry, DnKey | None]]
    ordered: tuple[StoredEntry, ...]  # by domain
    operators: frozenset[DnKey]
    checked_at: float


def _stored(row: sa.Row[Any]) -> StoredEntry:
    return StoredEntry(row.domain, row.operator_dn, row.description, TrustSource(row.source),
                       _aware(row.updated_at))


def _write_temp(directory: Path, data: bytes) -> Path:
    """Write `data` durably to a fresh temporary file in `directory` (renamed into place later)."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{ARCHIVE_NAME}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TrustStore:
    """The whitelist in force: `trust_domains` and `trust_imports`, read through a cached snapshot.

    Writes (`import_list`, `add`, `remove`) go through the database `Writer` and block until durable: call
    them from a thread (`asyncio.to_thread`) when on the event loop. Reads (`lookup`, `is_trusted`,
    `is_operator`, `entries`) use an in-memory snapshot, reloaded at once after a change made through this
    object and, for changes made by other processes, when a cheap version query (at most every
    `snapshot_ttl` seconds) sees the tables change; a reload is one short query, run by whichever caller
    finds the snapshot due. `archive_dir`, when given, receives a copy of the last accepted XML
    (`listeblanchemssante.xml`).
    """

    def __init__(self, engine: sa.Engine, writer: Writer, *, archive_dir: Path | None = None,
                 snapshot_ttl: float = SNAPSHOT_TTL) -> None:
        self.engine = engine
        self.writer = writer
        self.archive_dir = archive_dir
        self.snapshot_ttl = snapshot_ttl
        self._lock = threading.Lock()
        self._snapshot: _Snapshot | None = None

    # -- reads --

    def entries(self) -> list[StoredEntry]:
        """Every entry in force, by domain (from the snapshot)."""
        return list(self._current().ordered)

    def lookup(self, domain: str) -> StoredEntry | None:
        """The entry in force for `domain` (case-insensitive, trailing dot ignored), from the snapshot."""
        key = domain.strip().lower().rstrip(".")
        found = self._current().entries.get(key)
        return found[0] if found else None

    def is_trusted(self, domain: str, subject: x509.Name) -> bool:
        """Whether `domain` is in the trust space and `subject` is its operator certificate's DN."""
        found = self._current().entries.get(domain.strip().lower().rstrip("."))
        if found is None or found[1] is None:
            return False
        return _name_key(subject) == found[1]

    def is_operator(self, subject: x509.Name) -> bool:
        """Whether `subject` is the certificate DN of any operator in force, whatever its domain.

        For messages with no sender domain to check against (DSN/MDN with a null reverse-path); one set
        look-up instead of one `is_trusted` per entry.
        """
        return _name_key(subject) in self._current().operators

    def last_import(self) -> ImportRecord | None:
        """The most recent accepted import, if any."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(trust_imports).order_by(trust_imports.c.id.desc()).limit(1)).first()
        if row is None:
            return None
        return ImportRecord(row.id, _aware(row.imported_at),
                            _aware(row.generated_at) if row.generated_at else None,
                            row.source, row.sha256, row.domains)

    def counts(self) -> dict[TrustSource, int]:
        """Entries in force per source."""
        query = sa.select(trust_domains.c.source, sa.func.count()).group_by(trust_domains.c.source)
        with self.engine.connect() as conn:
            found = {TrustSource(source): count for source, count in conn.execute(query)}
        return {source: found.get(source, 0) for source in TrustSource}

    # -- writes --

    def import_list(self, data: bytes, *, source: str, expected_sha256: str | None = None,
                    actor: str = "admin", allow_older: bool = True) -> ImportResult:
        """Validate `data` completely, then replace the national entries with it in one transaction.

        `expected_sha256` is the published checksum (see `verify_checksum`). With `allow_older=False` a
        list generated before the one in force is refused (a replayed old file). Local entries stay, and
        a national entry for a domain with a local entry is not written (reported in `overridden`). The
        import is recorded in `trust_imports` and audited (`AuditEvent.ADMIN`). On any problem
        `TrustListError` is raised and nothing changes.
        """
        problems: list[str] = []
        digest = hashlib.sha256(data).hexdigest()
        if expected_sha256 is not None:
            try:
                verify_checksum(data, expected_sha256, filename=ARCHIVE_NAME)
            except TrustListError as exc:
                problems.extend(exc.problems)
        whitelist: Whitelist | None = None
        try:
            whitelist = parse_whitelist(data)
        except TrustListError as exc:
            problems.extend(exc.problems)
        if problems or whitelist is None:
            raise TrustListError(problems)
        wl = whitelist
        operators = wl.operators
        label = source[:_MAX_SOURCE]

        def job(conn: sa.Connection) -> tuple[int, int, tuple[str, ...]]:
            if not allow_older:
                previous = conn.execute(
                    sa.select(trust_imports.c.generated_at).order_by(trust_imports.c.id.desc()).limit(1)
                ).scalar()
                if previous is not None and wl.generated_at < _aware(previous):
                    raise TrustListError([
                        f"the list was generated on {wl.generated_at.isoformat()}, before the list in force "
                        f"({_aware(previous).isoformat()}); refusing to go back"
                    ])
            now = dt.datetime.now(dt.timezone.utc)
            local = set(conn.execute(
                sa.select(trust_domains.c.domain).where(trust_domains.c.source == TrustSource.LOCAL.value)
            ).scalars())
            conn.execute(sa.delete(trust_domains).where(trust_domains.c.source == TrustSource.NATIONAL.value))
            rows = [
                {"domain": e.domain, "operator_dn": e.operator_dn, "description": e.description,
                 "source": TrustSource.NATIONAL.value, "updated_at": now}
                for e in wl.entries if e.domain not in local
            ]
            if rows:
                conn.execute(sa.insert(trust_domains), rows)
            overridden = tuple(sorted(e.domain for e in wl.entries if e.domain in local))
            import_id = conn.execute(
                sa.insert(trust_imports).values(imported_at=now, generated_at=wl.generated_at, source=label,
                                                sha256=digest, domains=len(wl.entries))
            ).inserted_primary_key[0]  # type: ignore[index]
            append_in(conn, AuditEvent.ADMIN, actor=actor[:_MAX_ACTOR], at=now, detail={
                "action": "trust_import", "source": label[:200], "sha256": digest,
                "generated_at": wl.generated_at.isoformat(), "domains": str(len(wl.entries)),
                "operators": str(operators), "overridden": str(len(overridden)),
            })
            return int(import_id), len(local), overridden

        tmp: Path | None = None
        if self.archive_dir is not None:
            try:
                tmp = _write_temp(self.archive_dir, data)
            except OSError as exc:
                raise TrustListError([
                    f"cannot keep a copy of the list in {self.archive_dir} ({exc.strerror or type(exc).__name__})"
                ]) from None
        try:
            import_id, local_count, overridden = self.writer.run_sync(job)
        except BaseException:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            raise
        finally:
            self._invalidate()
        if tmp is not None and self.archive_dir is not None:
            try:
                os.replace(tmp, self.archive_dir / ARCHIVE_NAME)
                _fsync_dir(self.archive_dir)
            except OSError as exc:  # the import is committed: report the stale copy, do not undo
                tmp.unlink(missing_ok=True)
                log.error("event=trust_archive_failed import_id=%d error=%s", import_id, type(exc).__name__)
        log.info("event=trust_import import_id=%d sha256=%s domains=%d operators=%d local=%d overridden=%d",
                 import_id, digest, len(wl.entries), operators, local_count, len(overridden))
        return ImportResult(import_id, label, digest, wl.generated_at, len(wl.entries), operators,
                            local_count, overridden)

    def add(self, domain: str, operator_dn: str, description: str | None = None, *,
            actor: str = "admin") -> StoredEntry:
        """Add or replace a local entry (it overrides a national entry for the same domain). Audited."""
        problems: list[str] = []
        name = ""
        try:
            name = normalise_domain(domain)
        except ValueError as exc:
            problems.append(f"domain: {exc}")
        dn = operator_dn.strip()
        if len(dn) > _MAX_DN:
            problems.append(f"DN: longer than {_MAX_DN} characters")
        else:
            try:
                parse_dn(dn)
            except ValueError as exc:
                problems.append(f"DN {dn[:80]!r} does not parse: {exc}")
        text = description.strip() if description else None
        if text is not None and len(text) > _MAX_DESCRIPTION:
            problems.append(f"description: longer than {_MAX_DESCRIPTION} characters")
        if problems:
            raise TrustListError(problems)

        def job(conn: sa.Connection) -> StoredEntry:
            now = dt.datetime.now(dt.timezone.utc)
            previous = conn.execute(
                sa.select(trust_domains.c.source).where(trust_domains.c.domain == name)
            ).scalar()
            conn.execute(sa.delete(trust_domains).where(trust_domains.c.domain == name))
            conn.execute(sa.insert(trust_domains).values(domain=name, operator_dn=dn, description=text,
                                                         source=TrustSource.LOCAL.value, updated_at=now))
            append_in(conn, AuditEvent.ADMIN, actor=actor[:_MAX_ACTOR], at=now, detail={
                "action": "trust_add", "domain": name, "operator_dn": dn[:300],
                "replaces": previous or "none",
            })
            return StoredEntry(name, dn, text, TrustSource.LOCAL, now)

        try:
            entry = self.writer.run_sync(job)
        finally:
            self._invalidate()
        log.info("event=trust_add domain=%s", name)
        return entry

    def remove(self, domain: str, *, actor: str = "admin") -> StoredEntry | None:
        """Remove the entry for `domain`, local or national; None if there is none. Audited.

        A national entry removed here, or hidden by the local entry removed here, comes back with the next
        import.
        """
        name = domain.strip().lower().rstrip(".")

        def job(conn: sa.Connection) -> StoredEntry | None:
            row = conn.execute(sa.select(trust_domains).where(trust_domains.c.domain == name)).first()
            if row is None:
                return None
            conn.execute(sa.delete(trust_domains).where(trust_domains.c.domain == name))
            append_in(conn, AuditEvent.ADMIN, actor=actor[:_MAX_ACTOR], detail={
                "action": "trust_remove", "domain": name, "source": row.source,
            })
            return _stored(row)

        try:
            entry = self.writer.run_sync(job)
        finally:
            self._invalidate()
        if entry is not None:
            log.info("event=trust_remove domain=%s source=%s", name, entry.source.value)
        return entry

    # -- the snapshot --

    def _invalidate(self) -> None:
        with self._lock:
            self._snapshot = None

    def _version(self, conn: sa.Connection) -> tuple[Any, ...]:
        # Any import adds a trust_imports row; add/remove change the count or the newest updated_at.
        query = sa.select(
            sa.select(sa.func.max(trust_imports.c.id)).scalar_subquery(),
            sa.select(sa.func.count()).select_from(trust_domains).scalar_subquery(),
            sa.select(sa.func.max(trust_domains.c.updated_at)).scalar_subquery(),
        )
        return tuple(conn.execute(query).one())

    def _current(self) -> _Snapshot:
        with self._lock:
            snap = self._snapshot
            now = time.monotonic()
            if snap is not None and now - snap.checked_at < self.snapshot_ttl:
                return snap
            with self.engine.connect() as conn:
                version = self._version(conn)
                if snap is not None and version == snap.version:
                    snap = dataclasses.replace(snap, checked_at=now)
                else:
                    table: dict[str, tuple[StoredEntry, DnKey | None]] = {}
                    for row in conn.execute(sa.select(trust_domains)):
                        entry = _stored(row)
                        try:
                            key: DnKey | None = _dn_key(parse_dn(entry.operator_dn))
                        except ValueError:
                            log.error("event=trust_bad_dn domain=%s", entry.domain)
                            key = None
                        table[entry.domain] = (entry, key)
                    ordered = tuple(entry for _, (entry, _key) in sorted(table.items()))
                    operators = frozenset(key for _entry, key in table.values() if key is not None)
                    snap = _Snapshot(version, table, ordered, operators, now)
            self._snapshot = snap
            return snap


# --------------------------------------------------------------------------------------------------
# Fetching and refreshing
# --------------------------------------------------------------------------------------------------


class _HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to https: a redirect must not downgrade the transport."""

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: Any, newurl: str) -> urllib.request.Request | None:
        if not newurl.lower().startswith("https://"):
            fp.close()
            raise TrustListError([f"{req.full_url}: redirected to a non-https address"])
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _read_capped(stream: IO[bytes], location: str, max_size: int) -> bytes:
    data = stream.read(max_size + 1)
    if len(data) > max_size:
        raise TrustListError([f"{location}: larger than {max_size} bytes"])
    return data


def fetch_source(location: str, *, cafile: str | os.PathLike[str] | None = None,
                 timeout: float = FETCH_TIMEOUT, max_size: int = MAX_LIST_SIZE) -> bytes:
    """The bytes at `location`: an `https://` URL or a file path (relative paths: the caller resolves).

    HTTPS verifies the server certificate and host name, against `cafile` if given (e.g. the IGC-Santé
    chain) else the system store; redirects to plain http are refused; plain http is refused. At most
    `max_size` bytes are read. Raises `TrustListError` with a reason that carries no response content.
    """
    lowered = location.lower()
    if lowered.startswith("http://"):
        raise TrustListError([f"{location}: plain http is refused, use https"])
    if lowered.startswith("https://"):
        context = ssl.create_default_context(cafile=os.fspath(cafile) if cafile is not None else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _HttpsOnlyRedirects())
        request = urllib.request.Request(location, headers={"User-Agent": "caducee-trust"})
        try:
            with opener.open(request, timeout=timeout) as response:
                return _read_capped(response, location, max_size)
        except urllib.error.HTTPError as exc:
            exc.close()
            raise TrustListError([f"{location}: HTTP {exc.code}"]) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, ssl.SSLCertVerificationError):
                detail = f"server certificate refused ({reason.verify_message})"
            elif isinstance(reason, ssl.SSLError):
                detail = f"TLS error ({reason.reason or type(reason).__name__})"
            elif isinstance(reason, OSError):
                detail = f"connection failed ({reason.strerror or type(reason).__name__})"
            else:
                detail = "connection failed"
            raise TrustListError([f"{location}: {detail}"]) from None
        except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, truncated bodies
            raise TrustListError([f"{location}: transfer failed ({type(exc).__name__})"]) from None
    path = Path(location)
    try:
        with path.open("rb") as fh:
            return _read_capped(fh, location, max_size)
    except OSError as exc:
        raise TrustListError([f"{location}: cannot read ({exc.strerror or type(exc).__name__})"]) from None


class TrustSettings(Protocol):
    """The `[trust]` section of the configuration (caducee.config.TrustConfig)."""

    @property
    def source(self) -> str: ...

    @property
    def checksum(self) -> str: ...

    @property
    def refresh_interval(self) -> int: ...


def _resolve(location: str, state_dir: Path) -> str:
    if location.lower().startswith(("https://", "http://")):
        return location
    path = Path(location)
    return str(path if path.is_absolute() else state_dir / path)


def fetch_configured(settings: TrustSettings, state_dir: Path) -> tuple[bytes, str | None]:
    """Fetch the configured list and its checksum text (None if none is configured). Blocking.

    `checksum` is the 64-hex digest itself, or a path (relative to `state_dir`) or https URL of the
    published checksum file.
    """
    if not settings.source:
        raise TrustListError(["no whitelist source configured ([trust] source)"])
    data = fetch_source(_resolve(settings.source, state_dir))
    checksum: str | None = None
    if settings.checksum:
        if _SHA256_RE.match(settings.checksum.strip()):
            checksum = settings.checksum.strip()
        else:
            raw = fetch_source(_resolve(settings.checksum, state_dir), max_size=64 * 1024)
            try:
                checksum = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise TrustListError([f"{settings.checksum}: the checksum file is not text"]) from None
    return data, checksum


def refresh(store: TrustStore, settings: TrustSettings, state_dir: Path, *,
            actor: str = "trust-refresh") -> ImportResult | None:
    """Fetch the configured list and import it; None if it is the list already in force. Blocking.

    A list generated before the one in force is refused. Raises `TrustListError`; nothing changes then.
    """
    data, checksum = fetch_configured(settings, state_dir)
    last = store.last_import()
    if last is not None and last.sha256 == hashlib.sha256(data).hexdigest():
        if checksum is not None:
            verify_checksum(data, checksum, filename=ARCHIVE_NAME)
        return None
    return store.import_list(data, source=settings.source, expected_sha256=checksum, actor=actor,
                             allow_older=False)


class TrustRefresher:
    """Re-imports the configured whitelist every `refresh_interval` seconds, on the event loop.

    Fetching, hashing, parsing and writing run in a worker thread. A failure is logged and counted
    (`failures`); the last good list stays in force.
    """

    def __init__(self, store: TrustStore, trust_config: TrustSettings, state_dir: Path) -> None:
        self.store = store
        self.config = trust_config
        self.state_dir = state_dir
        self.failures = 0
        self.imports = 0
        self.last_success: dt.datetime | None = None
        self._task: asyncio.Task[None] | None = None

    async def refresh_once(self) -> ImportResult | None:
        """One refresh: the import's result, or None when unchanged, not configured or failed."""
        if not self.config.source:
            return None
        try:
            result = await asyncio.to_thread(refresh, self.store, self.config, self.state_dir)
        except TrustListError as exc:
            self.failures += 1
            log.warning("event=trust_refresh_failed problems=%d kept=last_good_list", len(exc.problems))
            for problem in exc.problems[:_MAX_PROBLEMS_LOGGED]:
                log.warning("event=trust_refresh_problem problem=%s", problem)
            return None
        except Exception as exc:  # noqa: BLE001 - the refresh boundary: keep the last good list
            self.failures += 1
            log.error("event=trust_refresh_failed error=%s kept=last_good_list", type(exc).__name__)
            return None
        self.last_success = dt.datetime.now(dt.timezone.utc)
        if result is None:
            log.info("event=trust_refresh_unchanged")
        else:
            self.imports += 1
        return result

    def start(self) -> None:
        """Start refreshing now and then every `refresh_interval` seconds; no-op without a source."""
        if self._task is not None:
            return
        if not self.config.source:
            log.info("event=trust_refresh_disabled reason=no_source")
            return
        self._task = asyncio.get_running_loop().create_task(self._run(), name="trust-refresh")

    async def stop(self) -> None:
        """Cancel the refresh task and wait for it (an import in its worker thread still completes)."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        while True:
            await self.refresh_once()
            await asyncio.sleep(self.config.refresh_interval)


__all__ = [
    "ARCHIVE_NAME", "MAX_LIST_SIZE", "NAMESPACE", "ImportRecord", "ImportResult", "StoredEntry",
    "TrustEntry", "TrustListError", "TrustRefresher", "TrustSettings", "TrustSource", "TrustStore",
    "Whitelist", "dn_matches", "fetch_configured", "fetch_source", "normalise_domain", "parse_dn",
    "parse_whitelist", "refresh", "verify_checksum",
]
