"""The principles of docs/security.md that a black-box test can see: no message content in the log, and
no exception text in what a client is told (docs/security.md, "Principles")."""

from __future__ import annotations

import time

import pytest

from mailserver.testing import wait_for
from tests.security.clients import IMAP, SMTP
from tests.security.conftest import Space

pytestmark = pytest.mark.blackbox


def test_no_message_content_reaches_the_log(space: Space) -> None:
    """A message with a patient's name, an INS-like number and a diagnosis in its subject, body, a header
    and its Message-ID goes through submission, local delivery, a read (FETCH, SEARCH), a success report
    and a relay to another operator: none of those values is in any line of the server's log."""
    alice, bob = space.server.identity("PER", 0), space.server.identity("PER", 1)
    tag = f"{time.monotonic_ns()}"
    secrets = [f"DUPONT-Jeanne-{tag}", f"2850575123456{tag[-2:]}", f"carcinome-{tag}", f"mid-{tag}"]
    data = (f"From: {alice['address']}\r\nTo: {bob['address']}, dr@b.test\r\nSubject: {secrets[0]}\r\n"
            f"X-Patient: {secrets[1]}\r\nMessage-ID: <{secrets[3]}@test>\r\n\r\n{secrets[2]}\r\n").encode()
    c = SMTP.connect(space.server, "submissions", alice)
    try:
        c.login()
        assert c.cmd(f"MAIL FROM:<{alice['address']}> ENVID={tag}").startswith("250")
        assert c.cmd(f"RCPT TO:<{bob['address']}> NOTIFY=SUCCESS").startswith("250")
        assert c.cmd("RCPT TO:<dr@b.test>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        assert c.cmd(data + b".").startswith("250")
    finally:
        c.quit()
    wait_for(lambda: any(secrets[2].encode() in d for s in space.b.peer.snapshot() for d in s.data), timeout=20)
    with IMAP.connect(space.server, "imaps", bob, authenticate=True) as i:
        i.command(b"S", b"SELECT INBOX")
        found = wait_for(lambda: [ln for ln in i.command(b"F", b"SEARCH BODY " + secrets[2].encode())
                                  if ln.startswith(b"* SEARCH ") and ln.split()[2:]], timeout=20)
        i.command(b"R", b"FETCH " + found[0].split()[-1] + b" (BODY[] ENVELOPE)")
    with IMAP.connect(space.server, "imaps", alice, authenticate=True) as i:
        i.command(b"S", b"EXAMINE INBOX")
        wait_for(lambda: [ln for ln in i.command(b"D", b"SEARCH HEADER Content-Type delivery-status BODY "
                                                 + tag.encode()) if ln.startswith(b"* SEARCH ") and ln.split()[2:]],
                 timeout=20)
    leaked = [line for line in space.server.log for s in secrets if s in line]
    assert leaked == [], leaked[:5]
