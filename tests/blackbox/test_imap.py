"""IMAP against `caducee serve` with imaplib, curl and raw sockets, mail arriving through SMTP."""

from __future__ import annotations

import imaplib
import json
import re
import socket
import ssl
import subprocess
import sys
import time

import pytest

from mailserver.testing import ServerProcess, wait_for
from tests.blackbox.clients import curl_imap, curl_send, message


def _ctx(server: ServerProcess, ident: dict | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=server.ca_bundle)
    if ident:
        ctx.load_cert_chain(ident["cert"], ident["key"])
    return ctx


def imaps(server: ServerProcess, ident: dict, authzid: str = "") -> imaplib.IMAP4_SSL:
    return server.imap(ident, authzid=authzid)


def send(server: ServerProcess, sender: dict, rcpt: str, subject: str, body: str = "Bonjour.") -> None:
    r = curl_send(server, sender, [rcpt], message(sender["address"], rcpt, subject, body))
    assert r.returncode == 0, r.stderr


def search(m: imaplib.IMAP4, *criteria: str, uid: bool = False) -> list[int]:
    typ, data = (m.uid("SEARCH", *criteria) if uid else m.search(None, *criteria))
    assert typ == "OK", data
    return [int(x) for x in data[0].split()]


def test_starttls_then_authenticate_external(server: ServerProcess) -> None:
    bob = server.identity("PER", 1)
    m = imaplib.IMAP4("localhost", server.port("imap"), timeout=15)
    try:
        before = set(m.capabilities)
        assert {"STARTTLS", "LOGINDISABLED"} <= before
        assert not any(c.startswith("AUTH=") for c in before)
        with pytest.raises(imaplib.IMAP4.error):
            m.login(bob["address"], "password")  # no password login, ever
        m.starttls(_ctx(server, bob))
        typ, caps = m.capability()
        assert b"AUTH=EXTERNAL" in caps[0] and b"UIDPLUS" in caps[0] and b"MOVE" in caps[0]
        typ, _ = m.authenticate("EXTERNAL", lambda _c: b"")  # no initial response: "+" then ""
        assert typ == "OK"
        assert m.select("INBOX")[0] == "OK"
    finally:
        m.logout()


def test_curl_over_starttls_and_without_certificate(server: ServerProcess) -> None:
    alice, bob = server.identity("PER", 0), server.identity("PER", 1)
    subject = f"imap-starttls-{time.monotonic_ns()}"
    send(server, alice, bob["address"], subject)
    r = wait_for(lambda: (lambda r: r if re.search(rb"\* SEARCH \d", r.stdout) else None)(
        curl_imap(server, bob, request=f"SEARCH SUBJECT {subject}", implicit=False)))
    uid = int(re.search(rb"\* SEARCH (\d+)", r.stdout).group(1))
    body = curl_imap(server, bob, f"INBOX;UID={uid}", implicit=False)
    assert body.returncode == 0 and f"Subject: {subject}".encode() in body.stdout
    anonymous = subprocess.run(["curl", "-sS", "--cacert", server.ca_bundle, "--login-options", "AUTH=EXTERNAL",
                                "-u", f"{bob['address']}:", f"imaps://localhost:{server.port('imaps')}/INBOX"],
                               capture_output=True, timeout=30)
    assert anonymous.returncode == 67  # CURLE_LOGIN_DENIED


def test_organisation_certificate_reads_its_org_and_app_mailboxes(server: ServerProcess) -> None:
    alice = server.identity("PER", 0)
    org, app = server.identity("ORG", 0), server.identity("APP", 0)
    tag = f"org-{time.monotonic_ns()}"
    send(server, alice, org["address"], f"{tag}-org")
    send(server, alice, app["address"], f"{tag}-app")
    for target, subject in ((org, f"{tag}-org"), (app, f"{tag}-app")):
        m = imaps(server, org, authzid=target["address"])
        try:
            m.select("INBOX")
            assert wait_for(lambda: search(m, "SUBJECT", subject) or (m.noop() and None))
        finally:
            m.logout()
    # a person cannot open the organisation's mailbox, nor another person's
    for authzid in (org["address"], server.identity("PER", 1)["address"]):
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            imaps(server, alice, authzid=authzid)


def test_search_move_uidplus_expunge_and_audit(server: ServerProcess) -> None:
    alice, carol = server.identity("PER", 0), server.identity("PER", 2)
    tag = f"srch{time.monotonic_ns()}"
    for i in range(3):
        send(server, alice, carol["address"], f"{tag} {i}", body=f"confidentiel {tag} {i}")
    m = imaps(server, carol)
    try:
        m.select("INBOX")
        uids = wait_for(lambda: (lambda u: u if len(u) == 3 else (m.noop() and None))(
            search(m, "SUBJECT", tag, uid=True)))
        assert search(m, "FROM", alice["address"], "SUBJECT", tag, uid=True) == uids
        assert search(m, "HEADER", "Message-ID", f"{tag}.1@test", uid=True) == [uids[1]]
        today = time.strftime("%d-%b-%Y", time.gmtime())
        assert set(uids) <= set(search(m, "SINCE", today, uid=True))
        assert search(m, "OR", "SUBJECT", f'"{tag} 0"', "SUBJECT", f'"{tag} 2"', uid=True) == [uids[0], uids[2]]
        assert search(m, "NOT", "SUBJECT", tag, "SUBJECT", tag, uid=True) == []

        assert m.create("Archives")[0] == "OK"
        typ, data = m.uid("MOVE", str(uids[0]), "Archives")
        assert typ == "OK"
        assert any(b"COPYUID" in (d or b"") for d in m.untagged_responses.get("OK", [])) or b"COPYUID" in b" ".join(
            x for x in data if isinstance(x, bytes))
        typ, data = m.uid("FETCH", str(uids[1]), "(BODY[])")  # not PEEK: a READ event, \Seen set
        assert typ == "OK" and f"confidentiel {tag} 1".encode() in data[0][1]
        assert m.uid("STORE", str(uids[2]), "+FLAGS", "(\\Deleted)")[0] == "OK"
        typ, data = m.uid("EXPUNGE", str(uids[2]))
        assert typ == "OK"
        assert search(m, "SUBJECT", tag, uid=True) == [uids[1]]
        m.select("Archives")
        assert len(search(m, "SUBJECT", tag)) == 1
        typ, data = m.append("Archives", None, None, message(carol["address"], carol["address"], f"{tag} note"))
        assert typ == "OK" and b"APPENDUID" in data[0]
    finally:
        m.logout()
    r = subprocess.run([sys.executable, "-m", "caducee", "audit", "list", "--json", "--state", str(server.state)],
                       capture_output=True, text=True, check=True)
    events = [json.loads(line) for line in r.stdout.splitlines()]
    mine = [e for e in events if e["mailbox"] == carol["address"]]
    kinds = {e["event"] for e in mine}
    assert {"deliver", "read", "delete", "append"} <= kinds, kinds
    assert all("confidentiel" not in json.dumps(e) for e in events)  # never content


def test_idle_hears_a_message_submitted_over_smtp(server: ServerProcess) -> None:
    alice, bob = server.identity("PER", 0), server.identity("PER", 1)
    m = imaps(server, bob)
    try:
        m.select("INBOX")
        m.send(b"i1 IDLE\r\n")
        assert m.readline().startswith(b"+")
        send(server, alice, bob["address"], f"idle-{time.monotonic_ns()}")
        m.sock.settimeout(10)
        line = m.readline()
        assert re.match(rb"\* \d+ EXISTS", line), line
        m.send(b"DONE\r\n")
        while not (line := m.readline()).startswith(b"i1 "):
            pass
        assert line.startswith(b"i1 OK")
    finally:
        m.logout()


def test_append_over_the_cap_is_refused_before_the_literal(server: ServerProcess) -> None:
    bob = server.identity("PER", 1)
    m = imaps(server, bob)
    try:
        m.send(b"a1 APPEND INBOX {20000000}\r\n")
        line = m.readline()
        assert line.startswith(b"a1 NO [TOOBIG]"), line  # no "+": the literal is never read
        assert m.noop()[0] == "OK"
    finally:
        m.logout()


def test_starttls_command_injection_is_discarded(server: ServerProcess) -> None:
    bob = server.identity("PER", 1)
    raw = socket.create_connection(("127.0.0.1", server.port("imap")), timeout=10)
    assert raw.recv(4096).startswith(b"* OK")
    raw.sendall(b"a1 STARTTLS\r\na2 NOOP\r\n")  # a2 injected in the same plaintext packet
    got = b""
    while b"a1 OK" not in got:
        got += raw.recv(4096)
    tls = _ctx(server, bob).wrap_socket(raw, server_hostname="localhost")
    tls.settimeout(1.5)
    with pytest.raises(socket.timeout):
        tls.recv(4096)  # nothing answers the injected a2
    tls.sendall(b"a3 NOOP\r\n")
    tls.settimeout(5)
    assert tls.recv(4096).startswith(b"a3 OK")
    tls.close()
