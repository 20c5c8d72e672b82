"""Header values read at a bounded cost (docs/security.md rows 13–14).

CPython's `email` parsers take time quadratic in some inputs (cpython#136063: RFC 2047 encoded-word runs,
long address lists) and recurse once per nested comment (RecursionError past about 500 levels). Caducée
parses headers on its one event loop, so a single hostile message would stall every session:

- `decode_encoded_words`: RFC 2047 §6 decoding in one linear pass (instead of
  `email.header.make_header(decode_header(...))`);
- `comment_depth` / `strip_comments`: one linear pass over RFC 5322 §3.2.2 comments, so that a caller
  refuses, or drops, nesting that no mail client writes before it reaches a recursive parser;
- `header_limits`: the size and count caps checked when a message arrives over SMTP.
"""

from __future__ import annotations

import binascii
import codecs
import re

MAX_COMMENT_DEPTH = 16  # RFC 5322 allows nesting; real mail uses one level, rarely two
MAX_HEADER_FIELD = 100 * 1024  # octets of one field with its continuation lines (Postfix header_size_limit)
MAX_HEADER_FIELDS = 1000  # fields in the header section of one message

# RFC 2047 §2 (with the RFC 2231 §5 language suffix): =?charset?encoding?encoded-text?=
_ENCODED_WORD = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([QqBb])\?([^?\s]*)\?=")
_FIELD_START = re.compile(rb"(?m)^[^ \t\r\n]")


def _payload(encoding: str, text: str) -> bytes | None:
    data = text.encode("ascii", "replace")
    if encoding in "Qq":
        return binascii.a2b_qp(data, header=True)  # "_" is a space in a Q word (RFC 2047 §4.2)
    try:
        return binascii.a2b_base64(data + b"=" * (-len(data) % 4), strict_mode=True)
    except binascii.Error:
        return None


def decode_encoded_words(value: str) -> str:
    """RFC 2047 §6 decoding of an unstructured value, linear in its length.

    Adjacent encoded words of one charset are decoded together (a character may be split between them)
    and the white space between encoded words is dropped (§6.2); a word with an unknown charset or a bad
    payload is kept as written.
    """
    if "=?" not in value:
        return value
    out: list[str] = []
    pending = bytearray()
    pending_charset: str | None = None

    def flush() -> None:
        nonlocal pending_charset
        if pending_charset is not None:
            out.append(pending.decode(pending_charset, "replace"))
            pending.clear()
            pending_charset = None

    pos = 0
    for m in _ENCODED_WORD.finditer(value):
        gap = value[pos : m.start()]
        pos = m.end()
        if gap and not (pending_charset is not None and gap.isspace()):
            flush()
            out.append(gap)
        charset = m.group(1).lower()
        try:
            codecs.lookup(charset)
        except LookupError:
            flush()
            out.append(m.group(0))
            continue
        data = _payload(m.group(2), m.group(3))
        if data is None:
            flush()
            out.append(m.group(0))
            continue
        if charset != pending_charset:
            flush()
            pending_charset = charset
        pending += data
    flush()
    out.append(value[pos:])
    return "".join(out)


def comment_depth(value: str) -> int:
    """The deepest nesting of RFC 5322 §3.2.2 comments in `value` (quoted strings and quoted pairs
    respected); an unbalanced ")" counts as nothing."""
    depth = deepest = 0
    quoted = escaped = False
    for ch in value:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif quoted:
            quoted = ch != '"'
        elif ch == '"' and depth == 0:
            quoted = True
        elif ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")" and depth:
            depth -= 1
    return deepest


def strip_comments(value: str) -> str:
    """`value` with every comment replaced by one space (quoted strings kept as written)."""
    out: list[str] = []
    depth = 0
    quoted = escaped = False
    for ch in value:
        if escaped:
            escaped = False
            if depth == 0:
                out.append(ch)
            continue
        if ch == "\\":
            escaped = True
            if depth == 0:
                out.append(ch)
        elif quoted:
            quoted = ch != '"'
            out.append(ch)
        elif ch == '"' and depth == 0:
            quoted = True
            out.append(ch)
        elif ch == "(":
            if depth == 0:
                out.append(" ")
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def header_limits(header: bytes) -> str | None:
    """What is wrong with a header section against the caps, or None: more than `MAX_HEADER_FIELDS`
    fields, or one field (continuation lines included) longer than `MAX_HEADER_FIELD` octets."""
    starts = [m.start() for m in _FIELD_START.finditer(header)]
    if len(starts) > MAX_HEADER_FIELDS:
        return "too many header fields"
    ends = starts[1:] + [len(header)]
    if any(end - start > MAX_HEADER_FIELD for start, end in zip(starts, ends)):
        return "header field too long"
    return None
