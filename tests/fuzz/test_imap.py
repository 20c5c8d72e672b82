"""The IMAP command parser and dispatch under arbitrary input (mailserver/imap_server.py).

Before and after AUTHENTICATE, with and without a selected folder, line by line or pipelined: every command
line is answered (tagged completion, untagged BAD, continuation, or BYE), every response line is framed
(RFC 3501 §7), no internal error (NO [SERVERBUG]), no exception text, no hang (security matrix rows 8,
16–18).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.harness import ImapDriver, check_imap, chunked, examples

FUZZ = settings(max_examples=examples(250), deadline=None, suppress_health_check=[HealthCheck.too_slow])

_ENDINGS = st.sampled_from([b"\r\n"] * 12 + [b"\n", b"\r", b""])
_TAGS = st.sampled_from([b"a1", b"A002", b"t3", b"x.4"] * 10 + [b"*", b"+", b"", b"t(", b"t{", b"x" * 40, b"\xff", b"a%"])
_JUNK = st.binary(max_size=12).filter(lambda b: b"\n" not in b and b"\r" not in b)


def _pick(*items: bytes) -> st.SearchStrategy[bytes]:
    return st.sampled_from(items)


def _mostly(strategy: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """`strategy` four times in five, junk bytes otherwise."""
    return st.one_of(strategy, strategy, strategy, strategy, _JUNK)


_MAILBOX = _pick(b"INBOX", b"inbox", b"Archives", b'"INBOX"', b'"Archives/2025"', b'"a\\"b"', b'"\\\\"', b"&AOk-t&AOk-",
                 b"&-", b"&Jjo", b"&AAA-", b"Archives/../INBOX", b"Archives/", b"/", b"NIL", b'""', b"Nouveau",
                 b'"Dossier partag\xc3\xa9"', b"{7}", b"{0}", b"{70000}", b"{4+}", b"{-1}", b"*", b"%")
_MAILBOX = _mostly(_MAILBOX)
_PATTERN = _mostly(_pick(b"*", b"%", b'""', b"INBOX", b"Arch*", b"%/%", b"*%*%*%*%*%*%*%*%", b"&-*"))
_SEQ = _mostly(_pick(b"1", b"2", b"1:*", b"*", b"*:1", b"1,2", b"0", b"3", b"4294967295", b"4294967296", b"1:",
                     b"2:1", b"1,,2", b"$", b"1:2:3"))
_FETCH_ATT = _pick(b"FLAGS", b"UID", b"ENVELOPE", b"BODYSTRUCTURE", b"BODY", b"RFC822.SIZE", b"INTERNALDATE", b"BODY[]",
                   b"BODY.PEEK[]", b"BODY[HEADER]", b"BODY[TEXT]", b"BODY[1]", b"BODY[1.MIME]", b"BODY[2.1]",
                   b"BODY[1.2.3.4.5.6]", b"BODY[HEADER.FIELDS (FROM SUBJECT)]", b"BODY[HEADER.FIELDS.NOT (X)]",
                   b"BODY[]<0.10>", b"BODY[]<5>", b"BODY[]<4294967296.1>", b"RFC822", b"RFC822.HEADER", b"BINARY[1]",
                   b"BODY[HEADER.FIELDS ()]", b"BODY[0]", b"BODY[1.HEADER]")
_FETCH = _pick(b"ALL", b"FAST", b"FULL") | _FETCH_ATT | st.lists(_FETCH_ATT, max_size=4).map(
    lambda items: b"(" + b" ".join(items) + b")")
_FLAG = _pick(b"\\Seen", b"\\Deleted", b"\\Answered", b"\\Flagged", b"\\Draft", b"\\Recent", b"$MDNSent", b"\\Bogus",
              b"Important", b"(", b")", b"\\", b"*")
_FLAGS = st.lists(_FLAG, max_size=3).map(lambda f: b"(" + b" ".join(f) + b")") | _FLAG
_KEY = _pick(b"ALL", b"SEEN", b"UNSEEN", b"DELETED", b"RECENT", b"NEW", b"OLD", b"ANSWERED", b"FLAGGED", b"DRAFT",
             b"SUBJECT x", b'SUBJECT "R\xc3\xa9sultats"', b"FROM labo", b"TO dr", b"CC x", b"BCC x", b"BODY Bonjour",
             b"TEXT pdf", b"HEADER Message-ID r1", b'HEADER "" ""', b"KEYWORD $MDNSent", b"UNKEYWORD x",
             b"SINCE 1-Jan-2025", b"BEFORE 32-Feb-2025", b"ON 6-Jan-2025", b"SENTSINCE 1-Jan-1900", b"LARGER 10",
             b"SMALLER 99999999999", b"UID 1:*", b"1:*", b"NOT SEEN", b"OR SEEN DELETED", b"OR SEEN", b"NOT",
             b"(SEEN DELETED)", b"((((((((((SEEN))))))))))", b"(", b")", b"SUBJECT {3}", b"CHARSET", b"SUBJECT")
_SEARCH = (st.just(b"") | _pick(b"CHARSET UTF-8 ", b"CHARSET US-ASCII ", b"CHARSET KOI8-R ", b"CHARSET ")) .flatmap(
    lambda charset: st.lists(_KEY, min_size=1, max_size=4).map(lambda keys: charset + b" ".join(keys)))
_DATE = _pick(b'"06-Jan-2025 09:00:00 +0100"', b'" 6-Jan-2025 09:00:00 +0100"', b'"31-Dec-9999 99:99:99 +9999"',
              b'"junk"', b"06-Jan-2025")

_ARGS: dict[bytes, st.SearchStrategy[bytes]] = {
    b"SELECT": _MAILBOX, b"EXAMINE": _MAILBOX, b"CREATE": _MAILBOX, b"DELETE": _MAILBOX, b"SUBSCRIBE": _MAILBOX,
    b"UNSUBSCRIBE": _MAILBOX,
    b"RENAME": st.tuples(_MAILBOX, _MAILBOX).map(b" ".join),
    b"LIST": st.tuples(_MAILBOX, _PATTERN).map(b" ".join), b"LSUB": st.tuples(_MAILBOX, _PATTERN).map(b" ".join),
    b"STATUS": st.tuples(_MAILBOX, _pick(b"(MESSAGES UNSEEN UIDNEXT)", b"(UIDVALIDITY RECENT)", b"(BOGUS)", b"()",
                                         b"MESSAGES", b"(")).map(b" ".join),
    b"APPEND": st.tuples(_MAILBOX, st.just(b"") | _FLAGS, st.just(b"") | _DATE,
                         _pick(b"{20}", b"{0}", b"{70000}", b"{5+}", b"{x}", b"")).map(
        lambda t: b" ".join(p for p in t if p)),
    b"FETCH": st.tuples(_SEQ, _FETCH).map(b" ".join),
    b"STORE": st.tuples(_SEQ, _pick(b"FLAGS", b"+FLAGS", b"-FLAGS.SILENT", b"+FLAGS.SILENT", b"X"), _FLAGS).map(b" ".join),
    b"COPY": st.tuples(_SEQ, _MAILBOX).map(b" ".join), b"MOVE": st.tuples(_SEQ, _MAILBOX).map(b" ".join),
    b"SEARCH": _SEARCH,
    b"AUTHENTICATE": _pick(b"EXTERNAL", b"EXTERNAL =", b"EXTERNAL ZHIubWFydGluQGNhZHVjZWUubG9jYWxob3N0",
                           b"EXTERNAL Y2FkdWNlZQ==", b"EXTERNAL !!", b"PLAIN AGEAYg==", b"external", b""),
    b"LOGIN": _pick(b"user pass", b'"a" "b"', b"{3}", b""),
    b"ID": _pick(b"NIL", b'("name" "client" "version" "1")', b'("name")', b"(", b'("a" NIL)'),
    b"ENABLE": _pick(b"UTF8=ACCEPT", b"CONDSTORE", b"X", b""),
    b"EXPUNGE": st.just(b"") | _SEQ,
}
_UID_SUB = _pick(b"FETCH", b"SEARCH", b"STORE", b"COPY", b"MOVE", b"EXPUNGE", b"X")
_VERBS = [b"CAPABILITY", b"NOOP", b"LOGOUT", b"STARTTLS", b"NAMESPACE", b"CHECK", b"CLOSE", b"UNSELECT", b"IDLE",
          b"UID", b"XYZZY", *_ARGS]


@st.composite
def command_line(draw: st.DrawFn) -> list[bytes]:
    """A command line with arguments of the right kind (sometimes not), and the data that may follow it."""
    if draw(st.integers(0, 15)) == 0:
        return [draw(st.binary(max_size=60)) + draw(_ENDINGS)]
    verb = draw(st.sampled_from(_VERBS))
    args = b""
    if verb == b"UID":
        sub = draw(_UID_SUB)
        args = sub + b" " + draw(_ARGS.get(sub, _JUNK))
    elif verb in _ARGS:
        args = draw(_ARGS[verb])
    if draw(st.integers(0, 19)) == 0:
        args = draw(st.sampled_from([b"", args + b" " + draw(_JUNK), draw(_JUNK)]))
    verb = draw(st.sampled_from([verb, verb.lower()]))
    line = draw(_TAGS) + b" " + verb + (b" " + args if args else b"")
    out = [line + draw(_ENDINGS)]
    if line.endswith(b"}") and b"{" in line:  # literal data: the announced size, or not
        announced = line[line.rindex(b"{") + 1:-1]
        size = int(announced) if announced.isdigit() else 3
        data = draw(st.sampled_from([b"From: a@b\r\n\r\nx\r\n", b"INBOX", b""]) | st.binary(max_size=20))
        if draw(st.booleans()) and size <= 64:
            data = (data * (size // max(1, len(data)) + 1))[:size] if data else b"x" * size
        out.append(data + draw(st.sampled_from([b"\r\n", b" (\\Seen)\r\n", b""])))
    if verb.upper() == b"IDLE" and draw(st.booleans()):
        out.append(draw(st.sampled_from([b"DONE\r\n", b"done\r\n", b"NOPE\r\n"])))
    if verb.upper() == b"AUTHENTICATE" and draw(st.booleans()):
        out.append(draw(st.sampled_from([b"=\r\n", b"*\r\n", b"\r\n", b"!!\r\n"])))
    return out


def _lines(draw: st.DrawFn) -> list[bytes]:
    return [piece for _ in range(draw(st.integers(1, 6))) for piece in draw(command_line())]


@st.composite
def session(draw: st.DrawFn) -> list[bytes]:
    return _lines(draw)


@pytest.fixture(scope="module")
def imap(twisted_reactor: object) -> Iterator[ImapDriver]:
    with ImapDriver() as driver:
        yield driver


@FUZZ
@given(lines=session(), state=st.sampled_from(["unauth", "auth", "select"]))
def test_every_command_line_is_answered_well(imap: ImapDriver, lines: list[bytes], state: str) -> None:
    run = imap.run(lines, state=state, serial=True)
    assert check_imap(run) == [], run.output[-2000:].decode("utf-8", "replace")


@FUZZ
@given(lines=session(), state=st.sampled_from(["unauth", "auth", "select"]),
       sizes=st.lists(st.integers(1, 5), max_size=5))
def test_pipelined_commands_are_answered_well(imap: ImapDriver, lines: list[bytes], state: str,
                                               sizes: list[int]) -> None:
    run = imap.run(chunked(lines, iter(sizes)), state=state, serial=False)
    assert check_imap(run) == [], run.output[-2000:].decode("utf-8", "replace")


@FUZZ
@given(lines=session())
def test_starttls_listener_before_tls(imap: ImapDriver, lines: list[bytes]) -> None:
    run = imap.run(lines, state="starttls", serial=True)
    assert check_imap(run) == [], run.output[-2000:].decode("utf-8", "replace")
    if run.starttls_started:  # RFC 3501 §6.2.1 / CVE-2011-0411: nothing answered after "Begin TLS"
        assert run.output.rstrip(b"\r\n").endswith(b"OK Begin TLS negotiation now")
