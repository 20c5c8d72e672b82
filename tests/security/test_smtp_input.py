"""Hostile SMTP input on the real server (docs/security.md rows 15, 27, 28): oversized lines, shell
metacharacters in the envelope, malformed ESMTP parameters. Every case gets a reply code, the session (or
at least the server) keeps working, and memory stays bounded."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mailserver.testing import wait_for
from tests.security.clients import SMTP, message, rss_kib, tls_context
from tests.security.conftest import Space

pytestmark = pytest.mark.blackbox

RSS_BOUND_KIB = 64 * 1024  # generous: the inputs below are 10–50 MB; a server buffering them would exceed it


def _session(space: Space) -> SMTP:
    c = SMTP.connect(space.server, "submissions", space.server.identity("PER", 0))
    c.login()
    return c


# -- row 15: oversized command line and header line ------------------------------------------------------------

def test_one_megabyte_command_line_is_refused_and_the_session_goes_on(space: Space) -> None:
    c = SMTP.connect(space.server, "submissions", space.server.identity("PER", 0))
    try:
        assert c.cmd("EHLO client.test").startswith("250")
        assert c.cmd(b"NOOP " + b"x" * (1 << 20)).startswith("500 5.5.2")
        assert c.cmd("NOOP").startswith("250")
    finally:
        c.quit()


def test_endless_command_line_is_not_buffered(space: Space) -> None:
    """50 MB without a line end: the server does not keep it (RSS bounded) and others are served."""
    before = rss_kib(space.server)
    c = SMTP.connect(space.server, "submission")
    try:
        assert c.cmd("EHLO client.test").startswith("250")
        chunk = b"A" * (1 << 20)
        for _ in range(50):
            c.send(chunk)
        with SMTP.connect(space.server, "submissions", space.server.identity("PER", 1)) as other:
            assert other.cmd("NOOP").startswith("250")
        assert rss_kib(space.server) - before < RSS_BOUND_KIB
        assert c.cmd(b"").startswith("500 5.5.2")  # the line ends: refused as a whole
        assert c.cmd("NOOP").startswith("250")
    finally:
        c.close()


def test_ten_megabyte_header_line_is_refused(space: Space) -> None:
    alice, bob = space.server.identity("PER", 0), space.server.identity("PER", 1)
    before = rss_kib(space.server)
    c = _session(space)
    try:
        assert c.cmd(f"MAIL FROM:<{alice['address']}>").startswith("250")
        assert c.cmd(f"RCPT TO:<{bob['address']}>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        data = f"From: {alice['address']}\r\nX-Big: ".encode() + b"y" * (10 << 20) + b"\r\n\r\nbody\r\n."
        reply = c.cmd(data)
        assert reply.startswith(("500 5.5.2", "552 5.3.4")), reply
        assert c.cmd("NOOP").startswith("250")  # the transaction ended; the session did not
        assert rss_kib(space.server) - before < RSS_BOUND_KIB
    finally:
        c.quit()


# -- row 27: shell metacharacters in the envelope ------------------------------------------------------------------

SHELL = ["a;id", "`id`", "$(id)", "a|id", "a&&id", "${IFS}id", "a>x", "a\\id"]


@pytest.mark.parametrize("local", SHELL)
def test_shell_metacharacters_in_the_envelope_are_refused_as_addresses(space: Space, local: str) -> None:
    """Submission: whatever the characters, the reply is a syntax or address refusal (553 5.1.3, or
    550 5.7.1 / 550 5.1.1 for syntactically valid addresses that are not the user's / not a mailbox)."""
    alice = space.server.identity("PER", 0)
    c = _session(space)
    try:
        reply = c.cmd(f"MAIL FROM:<{local}@caducee.localhost>")
        assert reply.startswith(("553 5.1.3", "550 5.7.1", "501 5.5.4")), reply
        assert c.cmd(f"MAIL FROM:<{alice['address']}>").startswith("250")
        reply = c.cmd(f"RCPT TO:<{local}@caducee.localhost>")
        assert reply.startswith(("553 5.1.3", "550 5.1.1", "501 5.5.4")), reply
        assert c.cmd("NOOP").startswith("250")
    finally:
        c.quit()


def test_shell_metacharacters_from_a_peer_are_carried_as_data_never_run(space: Space, tmp_path: Path) -> None:
    """On the relay listener a local part such as `` `touch${IFS}/path` `` is valid RFC 5322 atext: it is
    accepted, delivered, and the success report goes back to it through the outbound relay — and the
    command it spells is never run (OpenSMTPD CVE-2020-7247 ran it)."""
    bob = space.server.identity("PER", 1)
    canary = tmp_path / "pwned"
    tag = f"shell-{time.monotonic_ns()}"
    sender = f"`touch${{IFS}}{canary}`|touch${{IFS}}{canary}@b.test"
    c = SMTP.connect(space.server, "relay")
    try:
        c.upgrade(tls_context(space.server, space.b.chain, space.b.key), helo="mx.b.test")
        assert c.cmd(f"MAIL FROM:<{sender}>").startswith("250")
        assert c.cmd(f"RCPT TO:<{bob['address']}> NOTIFY=SUCCESS").startswith("250")
        assert c.cmd("DATA").startswith("354")
        assert c.cmd(message("dr@b.test", bob["address"], tag) + b".").startswith("250")
    finally:
        c.quit()

    def report_sent() -> bool:  # (the relay keeps reverse-paths in lower case)
        wanted = f"RCPT TO:<{sender}>".lower().encode()
        return any(wanted in cmd.lower() for s in space.b.peer.snapshot() for cmd in s.commands)

    wait_for(report_sent, timeout=30)
    assert not canary.exists()


# -- row 28: malformed ESMTP parameters ---------------------------------------------------------------------------------

MAIL_PARAMS = {
    "SIZE=abc": "501 5.5.4", "SIZE=-1": "501 5.5.4", 'SIZE="10"': "501 5.5.4", "SIZE=": "501 5.5.4",
    "SIZE=99999999999999999999": "552 5.3.4", "SIZE=1 SIZE=2": "501 5.5.4", "SIZE==1": "501 5.5.4",
    "SIZE=1\x00": "501 5.5.4", "=x": "501 5.5.4",
    "AUTH=<>": "555 5.5.4", "AUTH=x@y.test": "555 5.5.4",
    "ENVID=+ZZ": "501 5.5.4", "ENVID=" + "x" * 101: "501 5.5.4", "ENVID=a+0D+0Ab": "501 5.5.4",
    "ENVID=": "501 5.5.4", "ENVID=a+": "501 5.5.4",
    "RET=NONE": "501 5.5.4", "RET=": "501 5.5.4", "RET=FULL RET=HDRS": "501 5.5.4",
    "BODY=BINARYMIME": "501 5.5.4", "SMTPUTF8=yes": "501 5.5.4", "X-VENDOR=1": "555 5.5.4",
}
RCPT_PARAMS = {
    "NOTIFY=NEVER,SUCCESS": "501 5.5.4", "NOTIFY=BOGUS": "501 5.5.4", "NOTIFY=": "501 5.5.4",
    "NOTIFY=SUCCESS,,FAILURE": "501 5.5.4", "NOTIFY=SUCCESS NOTIFY=FAILURE": "501 5.5.4",
    "ORCPT=rfc822": "501 5.5.4", "ORCPT=;x": "501 5.5.4", "ORCPT=rfc822;+ZZ": "501 5.5.4",
    "ORCPT=utf-8;\\x{D800}": "501 5.5.4", "ORCPT=" + "x" * 600: "500 5.5.2", "SIZE=1": "555 5.5.4",
    'ORCPT="rfc822;a@b"': "501 5.5.4",
}


@pytest.mark.parametrize("params", list(MAIL_PARAMS))
def test_malformed_mail_parameters(space: Space, params: str) -> None:
    alice = space.server.identity("PER", 0)
    c = _session(space)
    try:
        reply = c.cmd(f"MAIL FROM:<{alice['address']}> {params}")
        assert reply.startswith(MAIL_PARAMS[params]), reply
        assert c.cmd(f"MAIL FROM:<{alice['address']}>").startswith("250")  # no half-made envelope left
    finally:
        c.quit()


@pytest.mark.parametrize("params", list(RCPT_PARAMS))
def test_malformed_rcpt_parameters(space: Space, params: str) -> None:
    alice, bob = space.server.identity("PER", 0), space.server.identity("PER", 1)
    c = _session(space)
    try:
        assert c.cmd(f"MAIL FROM:<{alice['address']}>").startswith("250")
        reply = c.cmd(f"RCPT TO:<{bob['address']}> {params}")
        assert reply.startswith(RCPT_PARAMS[params]), reply
        assert c.cmd(f"RCPT TO:<{bob['address']}>").startswith("250")
    finally:
        c.quit()


def test_parameters_on_helo_sessions_are_refused(space: Space) -> None:
    """RFC 5321 §4.1.1.1: no service extensions after HELO."""
    alice = space.server.identity("PER", 0)
    c = _session(space)
    try:
        assert c.cmd("HELO client.test").startswith("250")
        assert c.cmd(f"MAIL FROM:<{alice['address']}> SIZE=10").startswith("501 5.5.4")
        assert c.cmd(f"MAIL FROM:<{alice['address']}>").startswith("250")
    finally:
        c.quit()
