"""atheris target: SMTP command lines on the submission listener (mailserver/smtp_protocol.py, smtp_server.py).

Input: first byte = where the session starts (0 greeting, 1 after EHLO, 2 after AUTH EXTERNAL, 3 inside a
transaction, 4 the STARTTLS listener before TLS) and whether lines are fed one by one (even) or pipelined
(odd); the rest = what the client sends. Finding: a reply that is not a well-formed SMTP reply, exception
text, a command line without exactly one reply, a hang, an exception at the connection boundary, or an
envelope holding a sender or recipient the policy refuses. See fuzz/README.md.
"""

from __future__ import annotations

import _common
import atheris

# Every module under test is imported inside this block, so that atheris instruments it for coverage.
with atheris.instrument_imports(include=["mailserver", "aiosmtpd", "email"]):
    from tests.fuzz.harness import SENDER, SmtpDriver, check_smtp, lines_of

PRELUDES = (
    (),
    (b"EHLO client.test\r\n",),
    (b"EHLO client.test\r\n", b"AUTH EXTERNAL =\r\n"),
    (b"EHLO client.test\r\n", b"AUTH EXTERNAL =\r\n", f"MAIL FROM:<{SENDER}>\r\n".encode()),
    (),
)
DRIVER = SmtpDriver()


def test_one_input(data: bytes) -> None:
    head = data[0] if data else 0
    mode, serial = head % len(PRELUDES), head // len(PRELUDES) % 2 == 0
    lines = [*PRELUDES[mode], *lines_of(data[1:])[:64]]
    run = DRIVER.run(lines, starttls_listener=mode == 4, serial=serial)
    _common.check(check_smtp(run), run.output)


if __name__ == "__main__":
    _common.main(test_one_input)
