"""Two Caducée operators of one trust space, end to end: relay with mutual TLS both ways, the success
DSN ("accusé de réception") back to the sender, whitelist refusals, no open relay, retries and reports."""

from __future__ import annotations

import imaplib
import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from mailserver.testing import ServerProcess, free_port, wait_for

LISTENERS = ("relay", "submission", "submissions", "imap", "imaps")


@pytest.fixture(scope="module")
def operators(tmp_path_factory: pytest.TempPathFactory, tools: None) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    base = tmp_path_factory.mktemp("trust-space")
    ports_a = {n: free_port() for n in LISTENERS}
    ports_b = {n: free_port() for n in LISTENERS}
    fast = {"retry_initial": 1, "retry_max": 2, "delay_warning": 2, "max_lifetime": 6, "connect_timeout": 3}
    a = ServerProcess.create(base / "a", domain="a.test", hostname="mx.a.test", organisation="Operateur A",
                             structure_id="311111111100011", ports=ports_a,
                             next_hops={"b.test": ports_b["relay"], "c.test": free_port()}, relay=fast)
    b = ServerProcess.create(base / "b", domain="b.test", hostname="mx.b.test", organisation="Operateur B",
                             structure_id="322222222200022", ports=ports_b, pki_from=base / "a",
                             next_hops={"a.test": ports_a["relay"]}, relay=fast)
    a.caducee("trust", "add", "b.test", "--dn", b.operator_dn, "--description", "Operateur B")
    a.caducee("trust", "add", "c.test", "--dn", "CN=mx.c.test,O=Operateur C,C=FR")  # nothing listens there
    b.caducee("trust", "add", "a.test", "--dn", a.operator_dn, "--description", "Operateur A")
    with a, b:
        yield a, b


def _imap(server: ServerProcess, ident: dict) -> imaplib.IMAP4_SSL:
    m = server.imap(ident)
    m.select("INBOX")
    return m


def _find(m: imaplib.IMAP4, *criteria: str) -> list[bytes]:
    m.noop()
    typ, data = m.search(None, *criteria)
    assert typ == "OK"
    out = []
    for num in data[0].split():
        typ, got = m.fetch(num, "(BODY.PEEK[])")
        out.append(got[0][1])
    return out


def test_message_crosses_operators_and_the_success_dsn_comes_back(operators: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = operators
    camille, louis = a.identity("PER", 0), b.identity("PER", 1)
    tag = f"inter-{time.monotonic_ns()}"
    msg = (f"From: {camille['address']}\r\nTo: {louis['address']}\r\nSubject: {tag}\r\n"
           f"Message-ID: <{tag}@a.test>\r\n\r\nCompte rendu.\r\n").encode()
    s = a.smtp(camille)
    s.sendmail(camille["address"], [louis["address"]], msg, mail_options=["RET=HDRS", f"ENVID={tag}"],
               rcpt_options=["NOTIFY=SUCCESS,FAILURE", f"ORCPT=rfc822;{louis['address']}"])
    s.quit()

    m = _imap(b, louis)
    try:
        got = wait_for(lambda: _find(m, "SUBJECT", tag), timeout=20)
    finally:
        m.logout()
    assert b"Compte rendu." in got[0]
    received = re.findall(rb"^Received: from", got[0], flags=re.M)
    assert len(received) == 2  # submission on A, relay on B

    m = _imap(a, camille)
    try:
        reports = wait_for(lambda: _find(m, "HEADER", "Content-Type", "delivery-status"), timeout=30)
    finally:
        m.logout()
    report = next(r for r in reports if tag.encode() in r)
    assert re.search(rb"(?im)^Action:\s*delivered", report)
    assert re.search(rb"(?im)^Original-Envelope-Id:\s*" + tag.encode(), report)
    assert re.search(rb"(?im)^Original-Recipient:\s*rfc822;\s*" + louis["address"].encode(), report)
    assert re.search(rb"(?im)^Final-Recipient:\s*rfc822;\s*" + louis["address"].encode(), report)
    # A correlates the report with the message it is about
    r = a.caducee("reports", "--message-id", f"<{tag}@a.test>")
    assert "dsn" in r.stdout and "delivered" in r.stdout and louis["address"] in r.stdout


def test_relay_refuses_a_peer_whose_certificate_is_not_whitelisted(operators: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = operators
    intruder = b.identity("ORG", 0)  # a valid certificate of the trust anchors, but not an operator's
    r = subprocess.run(["swaks", "--server", "127.0.0.1", "--port", str(a.port("relay")), "--tls",
                        "--tls-cert", intruder["cert"], "--tls-key", intruder["key"], "--helo", "mx.b.test",
                        "--from", "x@b.test", "--to", a.identity("PER", 0)["address"], "--quit-after", "MAIL",
                        "--timeout", "15"], capture_output=True, text=True, timeout=60)
    assert "550 5.7.1" in r.stdout, r.stdout
    r = subprocess.run(["swaks", "--server", "127.0.0.1", "--port", str(a.port("relay")), "--helo", "mx.b.test",
                        "--from", "x@b.test", "--to", "y@a.test", "--quit-after", "MAIL", "--timeout", "15"],
                       capture_output=True, text=True, timeout=60)
    assert "530 5.7.0" in r.stdout  # STARTTLS before MAIL
    audit = a.caducee("audit", "list", "--json").stdout
    assert '"relay_refused"' in audit


def test_relay_is_not_open(operators: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = operators
    op_cert = b.state / "pki" / "server" / "server-fullchain.pem"
    op_key = b.state / "pki" / "server" / "server.key"
    r = subprocess.run(["swaks", "--server", "127.0.0.1", "--port", str(a.port("relay")), "--tls",
                        "--tls-cert", str(op_cert), "--tls-key", str(op_key), "--helo", "mx.b.test",
                        "--from", "x@b.test", "--to", "someone@elsewhere.example", "--quit-after", "RCPT",
                        "--timeout", "15"], capture_output=True, text=True, timeout=60)
    assert "250 2.1.0" in r.stdout and "550 5.7.1" in r.stdout, r.stdout
    r = subprocess.run(["swaks", "--server", "127.0.0.1", "--port", str(a.port("relay")), "--tls",
                        "--tls-cert", str(op_cert), "--tls-key", str(op_key), "--helo", "mx.b.test",
                        "--from", "x@b.test", "--to", "nobody@a.test", "--quit-after", "RCPT",
                        "--timeout", "15"], capture_output=True, text=True, timeout=60)
    assert "550 5.1.1" in r.stdout, r.stdout


def test_submission_refuses_recipients_outside_the_trust_space(operators: tuple[ServerProcess, ServerProcess]) -> None:
    a, _ = operators
    camille = a.identity("PER", 0)
    s = a.smtp(camille)
    try:
        s.mail(camille["address"])
        assert s.rcpt("someone@gmail.example")[0] == 550
        assert s.rcpt("louis.bernard@b.test")[0] == 250
    finally:
        s.quit()


def test_unreachable_operator_gives_delay_then_failure_reports(operators: tuple[ServerProcess, ServerProcess]) -> None:
    a, _ = operators
    camille = a.identity("PER", 0)
    tag = f"unreach-{time.monotonic_ns()}"
    msg = (f"From: {camille['address']}\r\nTo: dr@c.test\r\nSubject: {tag}\r\nMessage-ID: <{tag}@a.test>\r\n"
           f"\r\nx\r\n").encode()
    s = a.smtp(camille)
    s.sendmail(camille["address"], ["dr@c.test"], msg, rcpt_options=["NOTIFY=FAILURE,DELAY"])
    s.quit()
    m = _imap(a, camille)
    try:
        def both() -> list[bytes] | None:
            found = [r for r in _find(m, "HEADER", "Content-Type", "delivery-status") if tag.encode() in r]
            actions = {a.lower() for r in found for a in re.findall(rb"(?im)^Action:\s*(\w+)", r)}
            return found if {b"delayed", b"failed"} <= actions else None

        reports = wait_for(both, timeout=40, interval=0.5)
    finally:
        m.logout()
    failed = next(r for r in reports if re.search(rb"(?im)^Action:\s*failed", r))
    assert re.search(rb"(?im)^Status:\s*5\.4\.7", failed) or re.search(rb"(?im)^Status:\s*5\.", failed)


def test_a_looping_message_is_refused_by_hop_count(operators: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = operators
    op_cert = b.state / "pki" / "server" / "server-fullchain.pem"
    op_key = b.state / "pki" / "server" / "server.key"
    hops = "".join(f"Received: from hop{i}.b.test by mx{i}.b.test; Mon, 30 Nov 2026 00:00:00 +0000\n"
                   for i in range(31))
    r = subprocess.run(["swaks", "--server", "127.0.0.1", "--port", str(a.port("relay")), "--tls",
                        "--tls-cert", str(op_cert), "--tls-key", str(op_key), "--helo", "mx.b.test",
                        "--from", "x@b.test", "--to", a.identity("PER", 0)["address"],
                        "--add-header", "X-Loop-Test: yes", "--data", hops + "Subject: loop\n\nx\n",
                        "--timeout", "15"], capture_output=True, text=True, timeout=60)
    assert "554 5.4.6" in r.stdout, r.stdout[-2000:]


def test_reading_sends_one_read_receipt_back_across_operators(operators: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = operators
    camille, louis = a.identity("PER", 0), b.identity("PER", 1)
    tag = f"mdn-{time.monotonic_ns()}"
    msg = (f"From: {camille['address']}\r\nTo: {louis['address']}\r\nSubject: {tag}\r\n"
           f"Message-ID: <{tag}@a.test>\r\nDisposition-Notification-To: {camille['address']}\r\n\r\nCR.\r\n").encode()
    s = a.smtp(camille)
    s.sendmail(camille["address"], [louis["address"]], msg)
    s.quit()
    m = _imap(b, louis)
    try:
        wait_for(lambda: _find(m, "SUBJECT", tag), timeout=20)
        typ, data = m.search(None, "SUBJECT", tag)
        num = data[0].split()[0]
        typ, got = m.fetch(num, "(BODY[])")  # reading it: \Seen
        assert got[0][1].startswith(f"Return-Path: <{camille['address']}>\r\n".encode())
        flags = wait_for(lambda: (lambda f: f if b"$MDNSent" in f else None)(m.fetch(num, "(FLAGS)")[1][0]))
        assert b"\\Seen" in flags
        m.store(num, "-FLAGS", "(\\Seen)")
        m.fetch(num, "(BODY[])")  # read again: no second receipt
    finally:
        m.logout()
    m = _imap(a, camille)
    try:
        receipts = wait_for(lambda: [r for r in _find(m, "HEADER", "Content-Type", "disposition-notification")
                                     if tag.encode() in r], timeout=30)
    finally:
        m.logout()
    assert len(receipts) == 1
    assert re.search(rb"(?im)^Disposition:\s*manual-action/MDN-sent-automatically;\s*displayed", receipts[0])
    assert re.search(rb"(?im)^Original-Message-ID:\s*<" + tag.encode() + rb"@a.test>", receipts[0])
    r = a.caducee("reports", "--message-id", f"<{tag}@a.test>")
    assert "mdn" in r.stdout and "displayed" in r.stdout
    time.sleep(2)
    m = _imap(a, camille)
    try:
        assert len([r for r in _find(m, "HEADER", "Content-Type", "disposition-notification")
                    if tag.encode() in r]) == 1
    finally:
        m.logout()
