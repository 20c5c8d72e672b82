"""atheris target: IMAP command lines (mailserver/imap_server.py on Twisted's IMAP4Server).

Input: first byte = the state the lines start in (0 not authenticated, 1 authenticated, 2 INBOX selected,
3 the STARTTLS listener before TLS) and whether lines are fed one by one (even) or pipelined (odd); the rest
= what the client sends. Finding: an internal error (NO [SERVERBUG]) or a logged error, a response line that
is not RFC 3501 framing, exception text, a command line left unanswered or completed under another tag, or a
hang. See fuzz/README.md.
"""

from __future__ import annotations

import re

import _common
import atheris

# Every module under test is imported inside this block, so that atheris instruments it for coverage.
with atheris.instrument_imports(include=["mailserver", "twisted.mail", "twisted.protocols.basic"]):
    import twisted.mail.imap4  # noqa: F401

    import mailserver.imap_server  # noqa: F401
    from tests.fuzz.harness import ImapDriver, check_imap

STATES = ("unauth", "auth", "select", "starttls")
DRIVER = ImapDriver()


def test_one_input(data: bytes) -> None:
    head = data[0] if data else 0
    state, serial = STATES[head % len(STATES)], head // len(STATES) % 2 == 0
    lines = [piece for piece in re.split(b"(?<=\r\n)", data[1:]) if piece][:64]
    run = DRIVER.run(lines, state=state, serial=serial)
    _common.check(check_imap(run), run.output)


if __name__ == "__main__":
    _common.main(test_one_input)
