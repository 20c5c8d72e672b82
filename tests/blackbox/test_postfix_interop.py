"""Caducée and a real Postfix as two operators of one trust space: mail both ways over mutual TLS, the
delivery report back through Postfix, and a Postfix whose certificate DN is not whitelisted refused."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from crypto.pki import DevPKI
from mailserver.testing import ServerProcess, free_port, wait_for
from mailserver.testing_postfix import PostfixPeer, postfix_workdir

LISTENERS = ("relay", "submission", "submissions", "imap", "imaps")


def _operator_cert(pki: DevPKI, workdir: Path, name: str, organisation: str, structure_id: str) -> tuple[Path, Path, str]:
    issued = pki.issue_server([f"mx.{name}.test"], ["127.0.0.1"], workdir, name, structure_id=structure_id,
                              organisation=organisation)
    return issued.chain_path, issued.key_path, issued.certificate.subject.rfc4514_string()


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory, tools: None) -> Iterator[dict[str, object]]:
    if shutil.which("postfix") is None:
        pytest.fail("Postfix is needed (make test installs it)")
    ports = {n: free_port() for n in LISTENERS}
    postfix_port, rogue_port = free_port(), free_port()
    a = ServerProcess.create(tmp_path_factory.mktemp("interop") / "a", domain="a.test", hostname="mx.a.test",
                             organisation="Operateur A", structure_id="311111111100011", ports=ports,
                             next_hops={"postfix.test": postfix_port},
                             relay={"retry_initial": 1, "retry_max": 2, "connect_timeout": 5})
    pki = DevPKI.create_or_load(a.state / "pki")
    with postfix_workdir() as workdir:
        cert, key, dn = _operator_cert(pki, workdir, "postfix", "Operateur Postfix", "333333333300033")
        rcert, rkey, _ = _operator_cert(pki, workdir, "rogue", "Operateur Inconnu", "344444444400044")
        ca = workdir / "ca-bundle.pem"
        shutil.copy(a.ca_bundle, ca)
        peer = PostfixPeer.create(workdir / "postfix", domain="postfix.test", hostname="mx.postfix.test",
                                  cert_file=cert, key_file=key, ca_file=ca, listen_port=postfix_port,
                                  mailboxes=["dr.dupont@postfix.test"],
                                  transport={"a.test": f"127.0.0.1:{ports['relay']}"}, tls_match={"a.test": "mx.a.test"})
        rogue = PostfixPeer.create(workdir / "rogue", domain="rogue.test", hostname="mx.rogue.test",
                                   cert_file=rcert, key_file=rkey, ca_file=ca, listen_port=rogue_port,
                                   mailboxes=["x@rogue.test"],
                                   transport={"a.test": f"127.0.0.1:{ports['relay']}"}, tls_match={"a.test": "mx.a.test"})
        a.caducee("trust", "add", "postfix.test", "--dn", dn, "--description", "Operateur Postfix")
        a.caducee("trust", "add", "rogue.test", "--dn", "CN=mx.rogue.test,O=Un autre operateur,C=FR")
        with a, peer, rogue:
            yield {"a": a, "postfix": peer, "rogue": rogue}


def _inbox(server: ServerProcess, ident: dict, *criteria: str) -> list[bytes]:
    m = server.imap(ident)
    try:
        m.select("INBOX", readonly=True)
        typ, data = m.search(None, *criteria)
        return [m.fetch(n, "(BODY.PEEK[])")[1][0][1] for n in data[0].split()]
    finally:
        m.logout()


def test_caducee_to_postfix_with_the_delivery_report_back(space: dict[str, object]) -> None:
    a: ServerProcess = space["a"]  # type: ignore[assignment]
    peer: PostfixPeer = space["postfix"]  # type: ignore[assignment]
    camille = a.identity("PER", 0)
    tag = f"to-postfix-{time.monotonic_ns()}"
    msg = (f"From: {camille['address']}\r\nTo: dr.dupont@postfix.test\r\nSubject: {tag}\r\n"
           f"Message-ID: <{tag}@a.test>\r\n\r\nCompte rendu pour Postfix.\r\n").encode()
    s = a.smtp(camille)
    s.sendmail(camille["address"], ["dr.dupont@postfix.test"], msg, mail_options=[f"ENVID={tag}"],
               rcpt_options=["NOTIFY=SUCCESS,FAILURE"])
    s.quit()
    delivered = wait_for(lambda: [m for m in peer.maildir_messages("dr.dupont") if tag.encode() in m], timeout=30)
    assert b"Compte rendu pour Postfix." in delivered[0]
    # Postfix saw our operator certificate and verified it (its log names the TLS session)
    assert re.search(r"Trusted TLS connection established from .*127\.0\.0\.1", peer.log_text()) or \
        re.search(r"TLS connection established from", peer.log_text())
    # Postfix speaks DSN: it sends the success report itself, back through our relay
    reports = wait_for(lambda: [r for r in _inbox(a, camille, "HEADER", "Content-Type", "delivery-status")
                                if tag.encode() in r], timeout=40)
    assert re.search(rb"(?im)^Action:\s*delivered", reports[0])
    assert re.search(rb"(?im)^Reporting-MTA:\s*dns;\s*mx\.postfix\.test", reports[0])


def test_postfix_to_caducee_over_mutual_tls(space: dict[str, object]) -> None:
    a: ServerProcess = space["a"]  # type: ignore[assignment]
    peer: PostfixPeer = space["postfix"]  # type: ignore[assignment]
    louis = a.identity("PER", 1)
    tag = f"from-postfix-{time.monotonic_ns()}"
    peer.inject("dr.dupont@postfix.test", [louis["address"]],
                (f"From: dr.dupont@postfix.test\r\nTo: {louis['address']}\r\nSubject: {tag}\r\n"
                 f"Message-ID: <{tag}@postfix.test>\r\n\r\nBonjour de Postfix.\r\n").encode())
    got = wait_for(lambda: _inbox(a, louis, "SUBJECT", tag), timeout=30)
    assert b"Bonjour de Postfix." in got[0]
    assert re.search(rb"(?m)^Received: from mx\.postfix\.test .*\r\n\tby mx\.a\.test \(Caducee ESMTP\) with ESMTPS", got[0])


def test_postfix_with_a_certificate_not_on_the_whitelist_is_refused(space: dict[str, object]) -> None:
    a: ServerProcess = space["a"]  # type: ignore[assignment]
    rogue: PostfixPeer = space["rogue"]  # type: ignore[assignment]
    louis = a.identity("PER", 1)
    tag = f"rogue-{time.monotonic_ns()}"
    offset = rogue.log_size()
    rogue.inject("x@rogue.test", [louis["address"]],
                 (f"From: x@rogue.test\r\nTo: {louis['address']}\r\nSubject: {tag}\r\n"
                  f"Message-ID: <{tag}@rogue.test>\r\n\r\nx\r\n").encode())
    line = rogue.wait_for_log(r"said: 550 5\.7\.1[^\n]*", timeout=30, offset=offset)
    assert "not an operator of the trust space" in line.group(0)
    time.sleep(0.5)
    assert _inbox(a, louis, "SUBJECT", tag) == []
    audit = a.caducee("audit", "list", "--json").stdout
    assert '"relay_refused"' in audit and "rogue.test" in audit
