"""SMTP smuggling, pipelining and STARTTLS injection (docs/security.md rows 1–7), on the real server.

Inbound rows 1–3 on the submission listener are tests/blackbox/test_submission.py; here the same variants
go to the relay listener (operator to operator, mutual TLS), plus the `\\r\\r\\n` folding variant on
submission. Row 4 follows a message out to a capturing next hop and checks the bytes on the wire.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from mailserver.testing import wait_for
from tests.security.clients import SMTP, message, tls_context
from tests.security.conftest import Space
from tests.security.peers import CapturePeer, PeerSession, unstuff

pytestmark = pytest.mark.blackbox

REFUSED_BARE = "550 5.5.2"  # replies.BARE_LINE_ENDING
MUST_STARTTLS = "530 5.7.0"
AUTH_REQUIRED = "530 5.7.0 Authentication required"

# research/security.md §1.1 test 1: every terminator variant of the smuggling research.
SMUGGLING_ENDINGS = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CRLF.LF": b"\r\n.\n",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.CR": b"\r\n.\r",
    "CRCRLF.CRCRLF": b"\r\r\n.\r\r\n",
    "CR.CR": b"\r.\r",
}


def _canonical(raw: bytes) -> bool:
    """Every CR is followed by LF and every LF preceded by CR."""
    return re.search(rb"\r(?!\n)|(?<!\r)\n", raw) is None


def _relay(space: Space) -> SMTP:
    """A session on our relay listener as operator B (STARTTLS, B's whitelisted certificate)."""
    c = SMTP.connect(space.server, "relay")
    c.upgrade(tls_context(space.server, space.b.chain, space.b.key), helo="mx.b.test")
    return c


def _inbox(space: Space, ident: dict, tag: str) -> list[bytes]:
    m = space.server.imap(ident)
    try:
        m.select("INBOX", readonly=True)
        typ, data = m.search(None, "SUBJECT", f'"{tag}"')
        assert typ == "OK"
        out = []
        for num in data[0].split():
            _, got = m.fetch(num, "(BODY.PEEK[])")
            part = got[0]
            assert isinstance(part, tuple)
            out.append(part[1])
        return out
    finally:
        m.logout()


def _smuggled(sender: str, rcpt: str, tag: str) -> bytes:
    return (f"MAIL FROM:<{sender}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\nFrom: {sender}\r\nSubject: {tag}-inner\r\n"
            f"\r\nsmuggled\r\n").encode()


# -- rows 1–3 on the relay listener ------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SMUGGLING_ENDINGS))
def test_relay_listener_refuses_every_smuggling_terminator(space: Space, name: str) -> None:
    bob = space.server.identity("PER", 1)
    tag = f"relay-smuggle-{name}-{time.monotonic_ns()}"
    payload = (message("dr@b.test", bob["address"], tag).rstrip(b"\r\n") + SMUGGLING_ENDINGS[name]
               + _smuggled("dr@b.test", bob["address"], tag) + b"\r\n.")
    c = _relay(space)
    try:
        assert c.cmd("MAIL FROM:<dr@b.test>").startswith("250")
        assert c.cmd(f"RCPT TO:<{bob['address']}>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        assert c.cmd(payload).startswith(REFUSED_BARE)
        assert c.cmd("NOOP").startswith("250")  # exactly one reply for the whole payload
    finally:
        c.quit()
    assert _inbox(space, bob, tag) == [] and _inbox(space, bob, f"{tag}-inner") == []


def test_submission_refuses_the_cr_cr_lf_folding_variant(space: Space) -> None:
    """Row 3: `\\r\\r\\n.\\r\\r\\n` must not be folded into CRLF.CRLF (Postfix before 3.9-20240106 did)."""
    alice, bob = space.server.identity("PER", 0), space.server.identity("PER", 1)
    tag = f"crcrlf-{time.monotonic_ns()}"
    payload = (message(alice["address"], bob["address"], tag).rstrip(b"\r\n") + b"\r\r\n.\r\r\n"
               + _smuggled(alice["address"], bob["address"], tag) + b"\r\n.")
    c = SMTP.connect(space.server, "submissions", alice)
    try:
        c.login()
        assert c.cmd(f"MAIL FROM:<{alice['address']}>").startswith("250")
        assert c.cmd(f"RCPT TO:<{bob['address']}>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        assert c.cmd(payload).startswith(REFUSED_BARE)
        assert c.cmd("NOOP").startswith("250")
    finally:
        c.quit()
    assert _inbox(space, bob, tag) == [] and _inbox(space, bob, f"{tag}-inner") == []


# -- row 4: outbound ----------------------------------------------------------------------------------------

def _captured(peer: CapturePeer, tag: str) -> list[bytes]:
    return [d for s in peer.snapshot() for d in s.data if tag.encode() in d]


def test_relayed_message_leaves_with_canonical_crlf_and_dot_stuffing(space: Space) -> None:
    alice = space.server.identity("PER", 0)
    tag = f"outbound-{time.monotonic_ns()}"
    body = ".\r\n..\r\n.MAIL FROM:<x@evil.test>\r\n. \r\nend\r\n.\tx"
    original = message(alice["address"], "dr@b.test", tag, body)
    s = space.server.smtp(alice)
    try:
        s.sendmail(alice["address"], ["dr@b.test"], original)
    finally:
        s.quit()
    (raw,) = wait_for(lambda: _captured(space.b.peer, tag), timeout=20)
    assert _canonical(raw), raw
    lines = raw.split(b"\r\n")
    assert lines[-2:] == [b".", b""]  # the final dot, and only there
    assert b"." not in lines[:-2] and b"\r\n.\r\n" not in raw[:-5]
    received = unstuff(raw)
    assert received.startswith(b"Received: ") and received.endswith(original)
    session = next(s for s in space.b.peer.snapshot() if raw in s.data)
    assert session.tls and session.verbs().count(b"MAIL") == 1 and len(session.data) == 1


def test_a_stray_newline_never_reaches_the_outbound_queue(space: Space) -> None:
    alice = space.server.identity("PER", 0)
    tag = f"outbound-stray-{time.monotonic_ns()}"
    payload = (message(alice["address"], "dr@b.test", tag).rstrip(b"\r\n") + b"\n.\n"
               + _smuggled(alice["address"], "dr@b.test", tag) + b"\r\n.")
    c = SMTP.connect(space.server, "submissions", alice)
    try:
        c.login()
        assert c.cmd(f"MAIL FROM:<{alice['address']}>").startswith("250")
        assert c.cmd("RCPT TO:<dr@b.test>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        assert c.cmd(payload).startswith(REFUSED_BARE)
    finally:
        c.quit()
    # a message submitted afterwards is relayed, and it is the first (and only) one with the tag prefix
    after = f"{tag}-after"
    s = space.server.smtp(alice)
    try:
        s.sendmail(alice["address"], ["dr@b.test"], message(alice["address"], "dr@b.test", after))
    finally:
        s.quit()
    wait_for(lambda: _captured(space.b.peer, after), timeout=20)
    assert len(_captured(space.b.peer, tag)) == 1


def test_outbound_worker_normalises_stray_line_endings_it_is_given(tmp_path: Path, space: Space) -> None:
    """Defence in depth: were a body with stray CR/LF ever queued (every entry point refuses one), the
    outbound relay still writes canonical CRLF with dot-stuffing, in one transaction: aiosmtplib rewrites
    bare CR and LF to CRLF before stuffing (aiosmtplib/protocol.py), so `\\n.\\n` leaves as `\\r\\n..\\r\\n`."""
    from caducee import database
    from crypto.validation import CertificateValidator
    from mailserver.blobs import BlobStore
    from mailserver.db import Writer, make_engine
    from mailserver.queue import Envelope, Queue, Recipient
    from mailserver.smtp_client import NextHop, RemoteDelivery, RemoteSettings

    class Whitelist:
        def lookup(self, domain: str) -> object | None:
            return object() if domain == "b.test" else None

        def is_trusted(self, domain: str, subject: object) -> bool:
            return domain == "b.test"

        def is_operator(self, subject: object) -> bool:
            return True

    pki = space.server.state / "pki"
    url = f"sqlite:///{tmp_path / 'q.db'}"
    database.upgrade(url)
    writer = Writer(make_engine(url, writer=True))
    try:
        blobs = BlobStore(tmp_path / "blobs")
        queue = Queue(writer, blobs, node="security-test")
        settings = RemoteSettings(
            hostname="mx.a.test", local_domains=frozenset({"a.test"}),
            certificate=pki / "server" / "server-fullchain.pem", key=pki / "server" / "server.key",
            ca_bundle=Path(space.server.ca_bundle), next_hops={"b.test": NextHop("127.0.0.1", space.b.peer.port)},
            connect_timeout=5)
        validator = CertificateValidator.from_files(Path(space.server.ca_bundle),
                                                    sorted((pki / "crl").glob("*.crl.pem")))
        remote = RemoteDelivery(queue, blobs, Whitelist(), validator, settings)  # type: ignore[arg-type]
        tag = f"stray-{time.monotonic_ns()}"
        body = (f"From: a@a.test\r\nSubject: {tag}\r\n\r\nline\n.\nMAIL FROM:<x@evil.test>\r\nRCPT TO:<y@b.test>"
                f"\r\nDATA\r\nbare\rcr\r\n").encode()

        async def main() -> None:
            await queue.enqueue(Envelope("a@a.test", (Recipient("dr@b.test"),)), body)
            assert await remote.run_once() == 1

        asyncio.run(main())
    finally:
        writer.stop()
    (raw,) = _captured(space.b.peer, tag)
    assert _canonical(raw)
    assert b"\r\n..\r\nMAIL FROM" in raw and b"bare\r\ncr" in raw
    session: PeerSession = next(s for s in space.b.peer.snapshot() if raw in s.data)
    assert session.verbs().count(b"MAIL") == 1 and session.verbs().count(b"DATA") == 1


# -- row 5: no BDAT --------------------------------------------------------------------------------------------

def test_bdat_is_neither_offered_nor_accepted(space: Space) -> None:
    """Row 5 (BDAT edge cases) does not apply while CHUNKING is not implemented; this pins that down."""
    alice = space.server.identity("PER", 0)
    c = SMTP.connect(space.server, "submissions", alice)
    try:
        ehlo = c.cmd("EHLO client.test")
        assert "CHUNKING" not in ehlo and "BINARYMIME" not in ehlo
        assert c.cmd("AUTH EXTERNAL =").startswith("235")
        assert c.cmd(f"MAIL FROM:<{alice['address']}>").startswith("250")
        assert c.cmd(f"RCPT TO:<{alice['address']}>").startswith("250")
        # The chunk is not read as data: its line is one more (unknown) command, and nothing is queued.
        assert c.cmd(b"BDAT 12 LAST\r\nSubject: x").startswith("500 5.5.2")
        assert c.reply().startswith("500 5.5.2")
        assert c.cmd("NOOP").startswith("250")
        assert c.cmd("RSET").startswith("250")
    finally:
        c.quit()


# -- row 6: pipelining before the greeting and before authentication ---------------------------------------------

def test_whole_transaction_before_the_greeting_gets_one_reply_per_command(space: Space) -> None:
    """Everything in one write before the 220, with a smuggled second transaction behind a bare LF: the
    server answers each command in order, refuses the message whole, and creates no second envelope."""
    alice, bob = space.server.identity("PER", 0), space.server.identity("PER", 1)
    tag = f"pregreet-{time.monotonic_ns()}"
    blob = (b"EHLO client.test\r\nAUTH EXTERNAL =\r\n"
            + f"MAIL FROM:<{alice['address']}>\r\nRCPT TO:<{bob['address']}>\r\nDATA\r\n".encode()
            + message(alice["address"], bob["address"], tag).rstrip(b"\r\n") + b"\n.\n"
            + _smuggled(alice["address"], bob["address"], tag) + b"\r\n.\r\nNOOP\r\nQUIT\r\n")
    c = SMTP.connect(space.server, "submissions", alice, greeting=False)
    try:
        c.send(blob)
        replies = c.replies(9)
    finally:
        c.close()
    assert [r[:3] for r in replies] == ["220", "250", "235", "250", "250", "354", "550", "250", "221"], replies
    assert replies[6].startswith(REFUSED_BARE)
    assert _inbox(space, bob, tag) == [] and _inbox(space, bob, f"{tag}-inner") == []


@pytest.mark.parametrize("listener", ["submission", "submissions"])
def test_unauthenticated_pipelined_transaction_is_refused_command_by_command(space: Space, listener: str) -> None:
    """MAIL, RCPT, DATA and a body in one packet without TLS (STARTTLS port) or without AUTH: every command
    is refused (`530 5.7.0`), the body lines are read as (refused) commands, nothing is queued."""
    alice, bob = space.server.identity("PER", 0), space.server.identity("PER", 1)
    tag = f"unauth-pipe-{listener}-{time.monotonic_ns()}"
    lines = [b"EHLO client.test", f"MAIL FROM:<{alice['address']}>".encode(),
             f"RCPT TO:<{bob['address']}>".encode(), b"DATA", f"Subject: {tag}".encode(), b"", b"x", b".",
             b"QUIT"]
    c = SMTP.connect(space.server, listener, alice if listener == "submissions" else None)
    try:
        c.send(b"".join(line + b"\r\n" for line in lines))
        replies = c.replies(len(lines))
    finally:
        c.close()
    assert replies[0].startswith("250") and replies[-1].startswith("221")
    for reply in replies[1:4]:
        assert reply.startswith(MUST_STARTTLS), replies
        if listener == "submissions":
            assert reply == AUTH_REQUIRED
    assert not any(r.startswith(("250 2.0.0 Ok", "354")) for r in replies)
    assert _inbox(space, bob, tag) == []


# -- row 7: STARTTLS command injection (CVE-2011-0411) -----------------------------------------------------------

@pytest.mark.parametrize("listener", ["submission", "relay"])
def test_commands_pipelined_after_starttls_are_discarded(space: Space, listener: str) -> None:
    c = SMTP.connect(space.server, listener)
    try:
        assert c.cmd("EHLO client.test").startswith("250")
        c.send(b"STARTTLS\r\nNOOP\r\nEHLO injected.test\r\nMAIL FROM:<x@b.test>\r\n")
        assert c.reply().startswith("220")
        # Any byte the server still owes for the injected lines would be in the buffer now, or decrypted next.
        assert c.buf == b""
        ident = space.server.identity("PER", 0)
        ctx = (tls_context(space.server, ident["cert"], ident["key"]) if listener == "submission"
               else tls_context(space.server, space.b.chain, space.b.key))
        c.starttls(ctx)
        assert c.quiet_for(1.0) == b"", "the server answered a command injected before the TLS handshake"
        # RFC 3207 §4.2: the state before TLS is forgotten; the injected EHLO did not count either.
        reply = c.cmd("MAIL FROM:<x@b.test>")
        assert reply.startswith(("503", "530")), reply
        assert c.cmd("EHLO client.test").startswith("250")
    finally:
        c.quit()
