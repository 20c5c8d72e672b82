"""Relaying between operators, on the real server (docs/security.md rows 9–11, 23–25): no open relay
through address tricks or weak authentication, never plaintext towards a peer, and certificates checked
both ways — a next hop with a bad certificate is never given MAIL, a peer with one is refused at MAIL."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mailserver.testing import wait_for
from tests.security.clients import SMTP, message, tls_context
from tests.security.conftest import Space
from tests.security.peers import PeerSession

pytestmark = pytest.mark.blackbox

RELAY_DENIED = "550 5.7.1"
UNKNOWN = "550 5.1.1"
BAD_ADDRESS = "553 5.1.3"
PEER_REFUSED = "550 5.7.1"
MUST_STARTTLS = "530 5.7.0"
AUTH_INVALID = "535 5.7.8"
AUTH_UNAVAILABLE = "504 5.5.4"

LOCAL = "caducee.localhost"
# Classic relay tests: each must be refused, or delivered to a local mailbox only (never relayed).
ADDRESS_TRICKS = {
    "percent-hack": (f"louis.bernard%evil.test@{LOCAL}", UNKNOWN),
    "percent-hack-to-peer": (f"dr%b.test@{LOCAL}", UNKNOWN),
    "source-route-out": (f"@{LOCAL}:x@evil.test", RELAY_DENIED),
    "source-route-list-out": (f"@{LOCAL},@b.test:x@evil.test", RELAY_DENIED),
    "quoted-local-part": (f'"x@evil.test"@{LOCAL}', BAD_ADDRESS),
    "two-at-signs": (f"x@evil.test@{LOCAL}", BAD_ADDRESS),
    "local-then-remote": (f"louis.bernard@{LOCAL}@evil.test", BAD_ADDRESS),
    "bang-path": (f"evil.test!x@{LOCAL}", UNKNOWN),
    "trailing-dot-domain": (f"louis.bernard@{LOCAL}.", BAD_ADDRESS),
    "ip-literal": ("x@[127.0.0.1]", BAD_ADDRESS),
    "unqualified": ("postmaster", BAD_ADDRESS),
    "external": ("x@evil.test", RELAY_DENIED),
    "percent-in-domain": (f"x@evil.test%{LOCAL}", BAD_ADDRESS),
}


def _relay_session(space: Space, chain: Path, key: Path, helo: str = "mx.b.test") -> SMTP:
    """A session on our relay listener, STARTTLS with `chain` as the client certificate."""
    c = SMTP.connect(space.server, "relay")
    c.upgrade(tls_context(space.server, chain, key), helo=helo)
    return c


# -- row 10: open relay ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("listener", ["submission", "submissions"])
def test_no_relay_after_failed_or_empty_authentication(space: Space, listener: str) -> None:
    """Research §1.3 tests 2–3: after a refused AUTH, and with empty credentials (PLAIN and LOGIN are not
    even offered, EXTERNAL without a certificate fails), MAIL and RCPT are still refused."""
    c = SMTP.connect(space.server, listener, None)
    try:
        if listener == "submission":
            c.upgrade(tls_context(space.server))
        else:
            assert c.cmd("EHLO client.test").startswith("250")
        assert c.cmd("AUTH EXTERNAL =").startswith(AUTH_INVALID)
        assert c.cmd("AUTH PLAIN AGFhAGI=").startswith(AUTH_UNAVAILABLE)  # \0a\0b
        assert c.cmd("AUTH PLAIN =").startswith(AUTH_UNAVAILABLE)
        assert c.cmd("MAIL FROM:<a@evil.test>").startswith(MUST_STARTTLS)
        assert c.cmd("RCPT TO:<b@other.test>").startswith(MUST_STARTTLS)
    finally:
        c.quit()


def test_login_mechanisms_with_empty_credentials_are_not_offered(space: Space) -> None:
    c = SMTP.connect(space.server, "submissions", None)
    try:
        ehlo = c.cmd("EHLO client.test")
        assert "AUTH EXTERNAL" in ehlo and "PLAIN" not in ehlo and "LOGIN" not in ehlo
        assert c.cmd("AUTH LOGIN").startswith(AUTH_UNAVAILABLE)
        assert c.cmd("AUTH PLAIN").startswith(AUTH_UNAVAILABLE)
        assert c.cmd("AUTH EXTERNAL").startswith("334")  # no initial response: the challenge form
        assert c.cmd("").startswith(AUTH_INVALID)  # an empty response and no certificate
        assert c.cmd("AUTH EXTERNAL =").startswith("421")  # the fourth AUTH of the session closes it
    finally:
        c.close()


# -- row 11: relay through address tricks -------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(ADDRESS_TRICKS))
def test_address_tricks_on_submission(space: Space, case: str) -> None:
    address, expected = ADDRESS_TRICKS[case]
    alice = space.server.identity("PER", 0)
    c = SMTP.connect(space.server, "submissions", alice)
    try:
        c.login()
        assert c.cmd(f"MAIL FROM:<{alice['address']}>").startswith("250")
        reply = c.cmd(f"RCPT TO:<{address}>")
        assert reply.startswith(expected), (address, reply)
    finally:
        c.quit()


@pytest.mark.parametrize("case", list(ADDRESS_TRICKS) + ["peer-own-domain", "another-peer"])
def test_address_tricks_on_the_relay_listener(space: Space, case: str) -> None:
    """A trusted operator may only hand us mail for our own mailboxes: not for its own domain, another
    operator's, or anything outside the trust space."""
    address, expected = {**ADDRESS_TRICKS, "peer-own-domain": ("dr@b.test", RELAY_DENIED),
                         "another-peer": ("dr@expired.test", RELAY_DENIED)}[case]
    c = _relay_session(space, space.b.chain, space.b.key)
    try:
        assert c.cmd("MAIL FROM:<dr@b.test>").startswith("250")
        reply = c.cmd(f"RCPT TO:<{address}>")
        assert reply.startswith(expected), (address, reply)
    finally:
        c.quit()


def test_source_route_to_a_local_mailbox_is_delivered_locally(space: Space) -> None:
    """RFC 5321 §4.1.1.3 / App. C: a source route is ignored — the mail stays here, it is not routed via
    the hosts listed."""
    alice, bob = space.server.identity("PER", 0), space.server.identity("PER", 1)
    tag = f"route-{time.monotonic_ns()}"
    c = SMTP.connect(space.server, "submissions", alice)
    try:
        c.login()
        assert c.cmd(f"MAIL FROM:<{alice['address']}>").startswith("250")
        assert c.cmd(f"RCPT TO:<@evil.test,@b.test:{bob['address']}>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        assert c.cmd(message(alice["address"], bob["address"], tag) + b".").startswith("250")
    finally:
        c.quit()

    def delivered() -> bool:
        m = space.server.imap(bob)
        try:
            m.select("INBOX", readonly=True)
            return bool(m.search(None, "SUBJECT", tag)[1][0])
        finally:
            m.logout()

    wait_for(delivered, timeout=20)
    assert not any(tag.encode() in d for op in space.ops.values() for s in op.peer.snapshot() for d in s.data)


# -- row 9: never plaintext towards a peer -------------------------------------------------------------------------

def _submit_to(space: Space, domain: str) -> str:
    alice = space.server.identity("PER", 0)
    tag = f"to-{domain}-{time.monotonic_ns()}"
    s = space.server.smtp(alice)
    try:
        s.sendmail(alice["address"], [f"dr@{domain}"], message(alice["address"], f"dr@{domain}", tag))
    finally:
        s.quit()
    return tag


def _finished_sessions(space: Space, domain: str, n: int = 1) -> list[PeerSession]:
    peer = space.ops[domain].peer

    def enough() -> list[PeerSession] | None:
        done = peer.finished()
        return done if len(done) >= n else None

    return wait_for(enough, timeout=30)  # type: ignore[no-any-return]


def _queue_line(space: Space, domain: str) -> str:
    lines = [ln for ln in space.server.caducee("queue", "list").stdout.splitlines() if f"@{domain}" in ln]
    assert lines, f"nothing queued for {domain} any more"
    return lines[-1]


def _queue_line_with(space: Space, domain: str, text: str) -> str:
    """The recipient's queue line once its last error says `text` (the attempt is recorded after the
    peer saw the session end)."""
    def recorded() -> str | None:
        line = _queue_line(space, domain)
        return line if text in line else None

    return wait_for(recorded, timeout=15)  # type: ignore[no-any-return]


def test_next_hop_without_starttls_never_gets_the_message_in_plaintext(space: Space) -> None:
    _submit_to(space, "plain.test")
    sessions = _finished_sessions(space, "plain.test", 2)  # the first attempt and one retry
    for s in sessions:
        assert s.verbs() and s.verbs()[0] in (b"EHLO", b"HELO")
        assert b"MAIL" not in s.verbs() and b"DATA" not in s.verbs() and not s.data, s.commands
    line = _queue_line_with(space, "plain.test", "(SMTPException)")
    assert " queued " in line and "4.4.1" in line  # deferred, to be retried; never sent in clear


# -- rows 23–25: the next hop's certificate ------------------------------------------------------------------------

BAD_HOP_ERRORS = {  # the recipient's last_error, as `caducee queue list` shows it
    "wrongname.test": "4.4.1 cannot reach 127.0.0.1:{port} over TLS (SSLCertVerificationError)",
    "selfsigned.test": "4.4.1 cannot reach 127.0.0.1:{port} over TLS (SSLCertVerificationError)",
    "expired.test": "4.4.1 cannot reach 127.0.0.1:{port} over TLS (SSLCertVerificationError)",
    "clientonly.test": "4.4.1 cannot reach 127.0.0.1:{port} over TLS (SSLCertVerificationError)",
    "revoked.test": "4.7.5 peer certificate refused: certificate revoked",  # the CRL, after the handshake
}


@pytest.mark.parametrize("domain", list(BAD_HOP_ERRORS))
def test_next_hop_with_a_bad_certificate_is_never_given_mail(space: Space, domain: str) -> None:
    """Whitelisted by DN, reachable, speaking STARTTLS — only its certificate is wrong: name (RFC 6125),
    chain (self-signed), validity, revocation (CRL), extended key usage (clientAuth only). The relay quits
    before MAIL and keeps the message queued (a temporary failure, retried; never plaintext)."""
    _submit_to(space, domain)
    sessions = _finished_sessions(space, domain, 1)
    for s in space.ops[domain].peer.snapshot():
        assert b"MAIL" not in s.verbs() and not s.data, s.commands
    assert sessions[0].verbs()[:2] == [b"EHLO", b"STARTTLS"]
    expected = BAD_HOP_ERRORS[domain].format(port=space.ops[domain].peer.port)
    line = _queue_line_with(space, domain, expected)
    assert " queued " in line


# -- rows 23–25: the certificate a peer presents to our relay listener ---------------------------------------------

@pytest.mark.parametrize("domain", ["selfsigned.test", "expired.test", "revoked.test", "serveronly.test"])
def test_peer_with_a_bad_client_certificate_is_refused_at_mail(space: Space, domain: str) -> None:
    """Its DN is whitelisted for the sender domain; the certificate is self-signed, expired, revoked, or
    for serverAuth only (row 24): `550 5.7.1` at MAIL, nothing accepted after it."""
    cert = space.certs[domain]
    bob = space.server.identity("PER", 1)
    c = _relay_session(space, cert.chain, cert.key, helo=f"mx.{domain}")
    try:
        assert c.cmd(f"MAIL FROM:<dr@{domain}>").startswith(PEER_REFUSED)
        assert c.cmd(f"RCPT TO:<{bob['address']}>").startswith("503")
        assert c.cmd("DATA").startswith("503")
    finally:
        c.quit()
    audit = space.server.caducee("audit", "list", "--json").stdout
    assert '"relay_refused"' in audit


def test_peer_without_a_client_certificate_is_refused_at_mail(space: Space) -> None:
    c = SMTP.connect(space.server, "relay")
    try:
        c.upgrade(tls_context(space.server), helo="mx.b.test")
        assert c.cmd("MAIL FROM:<dr@b.test>").startswith(PEER_REFUSED)
    finally:
        c.quit()


def test_a_valid_peer_certificate_for_another_domain_is_refused(space: Space) -> None:
    """B's certificate is valid and whitelisted — for b.test only: mail from another operator's domain is
    refused (the DN must be the one whitelisted for the MAIL FROM domain)."""
    c = _relay_session(space, space.b.chain, space.b.key)
    try:
        assert c.cmd("MAIL FROM:<dr@expired.test>").startswith(PEER_REFUSED)
        assert c.cmd("MAIL FROM:<dr@evil.test>").startswith(PEER_REFUSED)
        assert c.cmd("MAIL FROM:<dr@b.test>").startswith("250")
    finally:
        c.quit()
