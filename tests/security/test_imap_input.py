"""Hostile IMAP input against the real server (docs/security.md rows 15–18): literal sizes before and after
login, malformed and non-synchronising literals, an endless line, deep nesting. The in-process versions
are in tests/mailserver/test_imap_server.py; these go through `caducee serve` on both listeners and watch
the process's memory and the other sessions."""

from __future__ import annotations

import pytest

from tests.security.clients import IMAP, rss_kib
from tests.security.conftest import Space

pytestmark = pytest.mark.blackbox

RSS_BOUND_KIB = 16 * 1024  # research §1.5 asks for < 1 MiB per probe; this bounds the whole series loosely
PRE_AUTH_LITERALS = [b"{0}", b"{1}", b"{400000000}", b"{2147483647}", b"{4294967296}", b"{99999999999999999999}",
                     b"{-1}", b"{}", b"{1+}", b"{400000000+}"]


def _expect_refusal(lines: list[bytes], tag: bytes) -> None:
    assert lines[-1].startswith((tag + b" NO", tag + b" BAD")), lines
    assert not any(line.startswith(b"+") for line in lines), "a continuation: the server would read the literal"


# -- row 16: pre-authentication literals ---------------------------------------------------------------------------

@pytest.mark.parametrize("listener", ["imap", "imaps"])
def test_pre_auth_literals_are_refused_without_allocation(space: Space, listener: str) -> None:
    """`a1 LOGIN {400000000}` and friends before login: answered at once (NO or BAD, never a `+`), the
    session goes on (a non-synchronising literal closes it: its data would follow at once), RSS flat."""
    before = rss_kib(space.server)
    for n, literal in enumerate(PRE_AUTH_LITERALS):
        tag = b"L%d" % n
        with IMAP.connect(space.server, listener) as c:
            c.send(tag + b" LOGIN " + literal + b"\r\n")
            if literal.endswith(b"+}"):
                rest = c.read_to_eof()
                assert rest.startswith(tag + b" BAD") and b"* BYE" in rest, rest
                continue
            _expect_refusal([c.line().rstrip(b"\r\n")], tag)
            assert c.command(b"N", b"NOOP")[-1] == b"N OK NOOP completed"
    assert rss_kib(space.server) - before < RSS_BOUND_KIB


def test_pre_auth_authenticate_with_a_literal_is_refused(space: Space) -> None:
    with IMAP.connect(space.server, "imaps") as c:
        _expect_refusal(c.command(b"A1", b"AUTHENTICATE EXTERNAL {400000000}"), b"A1")
        _expect_refusal(c.command(b"A2", b"AUTHENTICATE {400000000}"), b"A2")
        assert c.command(b"N", b"NOOP")[-1] == b"N OK NOOP completed"


# -- row 17: malformed literals after login ------------------------------------------------------------------------

@pytest.mark.parametrize("literal", [b"{-1}", b"{}", b"{abc}", b"{99999999999}", b"{-100}", b"{70000}", b"{1 }"])
def test_malformed_literals_get_bad_and_the_session_goes_on(space: Space, literal: bytes) -> None:
    """Twisted #12763 (`SEARCH {-100}` hung the reactor), GreenMail PR #1038."""
    bob = space.server.identity("PER", 1)
    with IMAP.connect(space.server, "imaps", bob, authenticate=True) as c, \
            IMAP.connect(space.server, "imaps", bob, authenticate=True) as other:
        assert c.command(b"S", b"EXAMINE INBOX")[-1].startswith(b"S OK")
        lines = c.command(b"M", b"SEARCH SUBJECT " + literal)
        assert lines[-1].startswith(b"M BAD"), lines
        assert c.command(b"N", b"NOOP")[-1] == b"N OK NOOP completed"
        assert other.command(b"O", b"NOOP")[-1] == b"O OK NOOP completed"


def test_append_larger_than_the_limit_is_refused_before_the_continuation(space: Space) -> None:
    bob = space.server.identity("PER", 1)
    before = rss_kib(space.server)
    with IMAP.connect(space.server, "imaps", bob, authenticate=True) as c:
        for n, size in enumerate((10 * 1024 * 1024 + 1, 4294967295, 2147483648)):
            tag = b"P%d" % n
            lines = c.command(tag, b"APPEND INBOX {%d}" % size)
            assert lines[-1].startswith(tag + b" NO [TOOBIG]"), lines
        assert c.command(b"N", b"NOOP")[-1] == b"N OK NOOP completed"
    assert rss_kib(space.server) - before < RSS_BOUND_KIB


# -- row 18: oversized LITERAL+ -----------------------------------------------------------------------------------

def test_non_synchronising_literal_closes_and_its_data_is_never_a_command(space: Space) -> None:
    """LITERAL+ is not offered; a `{n+}` literal (here larger than the APPEND limit) is followed by its data
    at once, so the server closes rather than read that data as commands (ruby/net-imap #701)."""
    bob = space.server.identity("PER", 1)
    injected = b"X1 CREATE Injected\r\nX2 DELETE INBOX\r\n"
    with IMAP.connect(space.server, "imaps", bob, authenticate=True) as c:
        caps = c.command(b"C", b"CAPABILITY")[0]
        assert b"LITERAL+" not in caps and b"LITERAL-" not in caps
        c.send(b"A APPEND INBOX {%d+}\r\n" % (20 * 1024 * 1024) + injected)
        rest = c.read_to_eof()
    assert rest.startswith(b"A BAD") and b"* BYE" in rest and b"X1" not in rest and b"X2" not in rest
    with IMAP.connect(space.server, "imaps", bob, authenticate=True) as c:
        listing = b"\n".join(c.command(b"L", b'LIST "" "*"'))
    assert b"Injected" not in listing and b"INBOX" in listing


# -- research §1.5 tests 3–4: endless line, deep nesting --------------------------------------------------------------

def test_endless_command_line_gets_bye_and_memory_stays_flat(space: Space) -> None:
    before = rss_kib(space.server)
    with IMAP.connect(space.server, "imaps") as c:
        try:
            for _ in range(16):
                c.send(b"a" * (1 << 20))
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while we were still sending: the expected outcome
        rest = c.read_to_eof()
    assert b"* BYE" in rest
    assert rss_kib(space.server) - before < RSS_BOUND_KIB


def test_deeply_nested_search_is_refused(space: Space) -> None:
    bob = space.server.identity("PER", 1)
    with IMAP.connect(space.server, "imaps", bob, authenticate=True) as c:
        assert c.command(b"S", b"EXAMINE INBOX")[-1].startswith(b"S OK")
        deep = b"(" * 30000 + b"ALL" + b")" * 30000  # under the 64 KiB line limit
        assert c.command(b"D", b"SEARCH " + deep)[-1].startswith(b"D BAD")
        fetch = b"(" * 30000 + b"UID" + b")" * 30000
        assert c.command(b"F", b"FETCH 1:* " + fetch)[-1].startswith(b"F BAD")
        assert c.command(b"N", b"NOOP")[-1] == b"N OK NOOP completed"
