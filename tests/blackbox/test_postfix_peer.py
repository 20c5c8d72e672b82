"""The Postfix peer harness against real TLS peers: swaks inbound, an aiosmtpd next hop outbound.

One Postfix instance serves the whole module (start and stop cost seconds). Its outbound next hops are
three in-test SMTP servers on 127.0.0.1 requesting any client certificate (``crypto.tls.server_context``):
one with a certificate of the trust space's CA, one with a certificate of a foreign CA, one with a
trusted certificate that does not carry the name Postfix expects.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from crypto.pki import DevPKI, IssuedCertificate
from crypto.tls import peer_certificate_der, server_context
from mailserver.testing import free_port, wait_for
from mailserver.testing_postfix import TOOLS, PostfixError, PostfixPeer, postfix_workdir

DOMAIN = "postfix.test"
HOSTNAME = "mx.postfix.test"
OTHER_HOST = "mx.other.test"


# -------------------- an SMTP next hop that records what it receives


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    client_cert_der: bytes | None


class RecordingHandler:
    """aiosmtpd handler keeping every message with the TLS client certificate it came with."""

    def __init__(self) -> None:
        self.messages: list[Received] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        ssl_object = session.ssl.get("ssl_object") if session.ssl else None
        self.messages.append(Received(
            mail_from=str(envelope.mail_from),
            rcpt_tos=list(envelope.rcpt_tos),
            data=bytes(envelope.original_content or b""),
            client_cert_der=peer_certificate_der(ssl_object) if ssl_object is not None else None,
        ))
        return "250 2.0.0 Ok: recorded"


@dataclass
class RecordingSMTPServer:
    """aiosmtpd on 127.0.0.1:<free port>, STARTTLS required, in an event loop of its own thread."""

    certificate: IssuedCertificate
    hostname: str
    handler: RecordingHandler = field(default_factory=RecordingHandler)
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: asyncio.Server | None = None
    _protocols: list[SMTP] = field(default_factory=list)

    def start(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name=f"smtp-{self.hostname}", daemon=True)
        self._thread.start()
        tls = server_context(self.certificate.chain_path, self.certificate.key_path)

        def protocol() -> SMTP:
            smtp = SMTP(self.handler, hostname=self.hostname, tls_context=tls, require_starttls=True, loop=loop)
            self._protocols.append(smtp)
            return smtp

        self._server = asyncio.run_coroutine_threadsafe(
            loop.create_server(protocol, "127.0.0.1", 0), loop).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        assert self._loop is not None and self._thread is not None and self._server is not None
        server = self._server

        async def shutdown() -> None:
            server.close()
            await server.wait_closed()
            for smtp in self._protocols:
                if smtp.transport is not None:
                    smtp.transport.close()
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


# -------------------- fixtures


@dataclass(frozen=True)
class Certificates:
    ca_bundle: Path
    postfix: IssuedCertificate
    other: IssuedCertificate
    foreign: IssuedCertificate

    @property
    def issuer_cn(self) -> str:
        """The CN of the CA that issued the trust space's operator certificates."""
        return str(self.other.certificate.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    base = tmp_path_factory.mktemp("postfix-pki")
    pki = DevPKI.create_or_load(base / "pki")
    foreign_pki = DevPKI.create_or_load(base / "foreign-pki", organisation="Autorité Étrangère")
    return Certificates(
        ca_bundle=pki.ca_bundle_path,
        postfix=pki.issue_server([HOSTNAME], ["127.0.0.1"], base, "postfix",
                                 structure_id="100000001", organisation="Opérateur Postfix"),
        other=pki.issue_server([OTHER_HOST], ["127.0.0.1"], base, "other",
                               structure_id="100000002", organisation="Autre Opérateur"),
        foreign=foreign_pki.issue_server(["mx.foreign.test"], ["127.0.0.1"], base, "foreign",
                                         structure_id="100000003", organisation="Opérateur Étranger"),
    )


@pytest.fixture(scope="module")
def next_hops(certificates: Certificates) -> Iterator[dict[str, RecordingSMTPServer]]:
    """Next hops by domain: trusted (other.test), foreign CA (foreign.test), unexpected name (misnamed.test)."""
    servers = {
        "other.test": RecordingSMTPServer(certificates.other, OTHER_HOST),
        "foreign.test": RecordingSMTPServer(certificates.foreign, "mx.foreign.test"),
        "misnamed.test": RecordingSMTPServer(certificates.other, OTHER_HOST),
    }
    started: list[RecordingSMTPServer] = []
    try:
        for server in servers.values():
            server.start()
            started.append(server)
        yield servers
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def postfix(certificates: Certificates, next_hops: dict[str, RecordingSMTPServer]) -> Iterator[PostfixPeer]:
    missing = [tool for tool in (*TOOLS, "swaks") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"the Postfix peer tests need {', '.join(missing)} (make test installs them)")
    with postfix_workdir() as workdir:
        peer = PostfixPeer.create(
            workdir,
            domain=DOMAIN,
            hostname=HOSTNAME,
            cert_file=certificates.postfix.chain_path,
            key_file=certificates.postfix.key_path,
            ca_file=certificates.ca_bundle,
            listen_port=free_port(),
            mailboxes=[f"alice@{DOMAIN}", f"bob@{DOMAIN}"],
            transport={domain: f"127.0.0.1:{server.port}" for domain, server in next_hops.items()},
            tls_match={"other.test": OTHER_HOST, "foreign.test": "mx.foreign.test",
                       "misnamed.test": "mx.misnamed.test"},
        )
        with peer:
            assert peer.master_pid() is not None
            yield peer
        assert peer.master_pid() is None
        assert peer.running_pids() == [], "Postfix processes left after stop"


# -------------------- helpers


def message(sender: str, to: str, subject: str) -> bytes:
    message_id = f"<{re.sub(r'[^A-Za-z0-9]+', '.', subject)}@{DOMAIN}>"
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: {message_id}\r\n\r\n"
            f"Bonjour.\r\n").encode()


def swaks(postfix: PostfixPeer, *args: str, cert: IssuedCertificate | None = None,
          tls: bool = True, ca_bundle: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = ["swaks", "--server", "127.0.0.1", "--port", str(postfix.listen_port), "--helo", OTHER_HOST,
           "--timeout", "20", *args]
    if tls:
        cmd.append("--tls")
        if ca_bundle is not None:
            cmd += ["--tls-verify", "--tls-ca-path", str(ca_bundle)]
    if cert is not None:
        cmd += ["--tls-cert", str(cert.chain_path), "--tls-key", str(cert.key_path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def replies(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The server's replies in swaks' transcript: ``<-`` in clear, ``<~`` over TLS; errors ``<**``, ``<~*``."""
    return [m.group(1) for m in re.finditer(r"^<(?:[-~]\*?|\*\*) +(\d{3}[ -].*)$", result.stdout, re.MULTILINE)]


def explain(postfix: PostfixPeer, offset: int, result: subprocess.CompletedProcess[str] | None = None) -> str:
    parts = [f"postfix log:\n{postfix.log_text(offset)}"]
    if result is not None:
        parts.insert(0, f"swaks exit {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return "\n".join(parts)


def der(certificate: IssuedCertificate) -> bytes:
    return certificate.certificate.public_bytes(Encoding.DER)


# -------------------- configuration


def test_configuration_is_private_and_strict(postfix: PostfixPeer, certificates: Certificates) -> None:
    main_cf = (postfix.config_dir / "main.cf").read_text()
    settings = dict(re.findall(r"^(\w+) =[ \t]*(.*)$", main_cf, re.MULTILINE))
    assert settings["queue_directory"] == str(postfix.queue_dir)
    assert settings["inet_interfaces"] == "127.0.0.1"
    assert settings["mydestination"] == ""
    assert settings["smtpd_tls_security_level"] == "encrypt"
    assert settings["smtpd_tls_req_ccert"] == "yes"
    assert settings["smtp_tls_cert_file"] == str(certificates.postfix.chain_path.resolve())
    master_cf = (postfix.config_dir / "master.cf").read_text()
    assert re.search(rf"^127\.0\.0\.1:{postfix.listen_port}\s+inet\b", master_cf, re.MULTILINE)
    assert not re.search(r"^(smtp|submission|smtps)\s+inet\b", master_cf, re.MULTILINE)
    policy = (postfix.config_dir / "tls_policy").read_text()
    assert f"[127.0.0.1]:{postfix.next_hops[0].port}\tverify match=" in policy
    # Postfix reads the same configuration back: these are the values in force.
    postconf = subprocess.run(["postconf", "-c", str(postfix.config_dir), "-h", "smtpd_relay_restrictions",
                               "virtual_mailbox_domains", "default_transport"],
                              capture_output=True, text=True, check=True).stdout.splitlines()
    assert postconf == ["reject_unauth_destination", DOMAIN, "error:5.4.4 no route outside the test trust space"]


def create_peer(workdir: Path, certificates: Certificates, *, require_client_cert: bool = True,
                mailboxes: tuple[str, ...] = (f"alice@{DOMAIN}",), transport: dict[str, str] | None = None,
                tls_match: dict[str, str] | None = None) -> PostfixPeer:
    return PostfixPeer.create(workdir, domain=DOMAIN, hostname=HOSTNAME, cert_file=certificates.postfix.chain_path,
                              key_file=certificates.postfix.key_path, ca_file=certificates.ca_bundle,
                              listen_port=free_port(), mailboxes=list(mailboxes),
                              require_client_cert=require_client_cert, transport=transport, tls_match=tls_match)


def test_create_refuses_what_would_leave_the_test(tmp_path: Path, certificates: Certificates) -> None:
    with pytest.raises(ValueError, match="only IPv4 loopback next hops"):
        create_peer(tmp_path, certificates, transport={"other.test": "192.0.2.1:2525"})
    with pytest.raises(ValueError, match="the host must be an IP address"):
        create_peer(tmp_path, certificates, transport={"other.test": "mx.other.test:2525"})
    with pytest.raises(ValueError, match=re.escape("must be local-part@postfix.test")):
        create_peer(tmp_path, certificates, mailboxes=("alice@other.test",))
    with pytest.raises(ValueError, match="tls_match names domains without a transport"):
        create_peer(tmp_path, certificates, tls_match={"other.test": OTHER_HOST})
    with pytest.raises(ValueError, match=re.escape("next hop [127.0.0.1]:2525 is given two certificate names")):
        create_peer(tmp_path, certificates, transport={"a.test": "127.0.0.1:2525", "b.test": "127.0.0.1:2525"})
    assert not (tmp_path / "config").exists()


def test_optional_client_certificate(certificates: Certificates) -> None:
    """require_client_cert=False: the certificate is asked for, a client without one is served."""
    with postfix_workdir() as workdir:
        peer = create_peer(workdir, certificates, require_client_cert=False)
        main_cf = (peer.config_dir / "main.cf").read_text()
        assert "\nsmtpd_tls_req_ccert = no\n" in main_cf
        assert "\nsmtpd_tls_ask_ccert = yes\n" in main_cf
        with peer:
            result = swaks(peer, "--from", "sender@other.test", "--to", f"alice@{DOMAIN}",
                           "--header", "Subject: no client certificate")
            assert result.returncode == 0, explain(peer, 0, result)
            peer.wait_for_log(r"Anonymous TLS connection established from unknown\[127\.0\.0\.1\]")
            peer.wait_for_log(rf"to=<alice@{DOMAIN}>, relay=virtual, .*status=sent")
            assert [m for m in peer.maildir_messages("alice") if b"Subject: no client certificate" in m]
        assert peer.running_pids() == []


# -------------------- inbound: swaks → Postfix


def test_inbound_with_client_certificate_is_delivered(postfix: PostfixPeer, certificates: Certificates) -> None:
    offset = postfix.log_size()
    result = swaks(postfix, "--from", "sender@other.test", "--to", f"alice@{DOMAIN}",
                   "--header", "Subject: inbound mutual TLS", cert=certificates.other,
                   ca_bundle=certificates.ca_bundle)
    assert result.returncode == 0, explain(postfix, offset, result)
    queued = re.search(r"^<~ +250 2\.0\.0 Ok: queued as ([0-9A-F]+)$", result.stdout, re.MULTILINE)
    assert queued, explain(postfix, offset, result)
    queue_id = queued.group(1)
    postfix.wait_for_log(rf"{queue_id}: to=<alice@{DOMAIN}>, relay=virtual, .*status=sent \(delivered to maildir\)",
                         offset=offset)
    assert re.search(r"Trusted TLS connection established from unknown\[127\.0\.0\.1\]: TLSv1\.[23]",
                     postfix.log_text(offset))
    delivered = [m for m in postfix.maildir_messages("alice") if b"Subject: inbound mutual TLS" in m]
    assert len(delivered) == 1
    # Postfix's Received header names the verified client certificate.
    assert f'(Client CN "{OTHER_HOST}", Issuer "{certificates.issuer_cn}" (verified OK))'.encode() in delivered[0]
    assert f"by {HOSTNAME} (Postfix) with ESMTPS id {queue_id}".encode() in delivered[0]


def test_inbound_without_client_certificate_is_refused(postfix: PostfixPeer) -> None:
    offset = postfix.log_size()
    before = len(postfix.maildir_messages("alice"))
    result = swaks(postfix, "--from", "sender@other.test", "--to", f"alice@{DOMAIN}")
    assert result.returncode != 0
    assert f"421 4.7.1 {HOSTNAME} Error: No client certificate presented" in replies(result), \
        explain(postfix, offset, result)
    postfix.wait_for_log(r"NOQUEUE: abort: TLS from unknown\[127\.0\.0\.1\]: No client certificate presented",
                         offset=offset)
    assert len(postfix.maildir_messages("alice")) == before


def test_inbound_with_foreign_client_certificate_is_refused(postfix: PostfixPeer,
                                                            certificates: Certificates) -> None:
    offset = postfix.log_size()
    result = swaks(postfix, "--from", "sender@foreign.test", "--to", f"alice@{DOMAIN}", cert=certificates.foreign)
    assert result.returncode != 0
    assert f"421 4.7.1 {HOSTNAME} Error: Client certificate not trusted" in replies(result), \
        explain(postfix, offset, result)
    postfix.wait_for_log(r"NOQUEUE: abort: TLS from unknown\[127\.0\.0\.1\]: Client certificate not trusted",
                         offset=offset)


def test_inbound_without_starttls_is_refused(postfix: PostfixPeer) -> None:
    offset = postfix.log_size()
    result = swaks(postfix, "--from", "sender@other.test", "--to", f"alice@{DOMAIN}", tls=False)
    assert result.returncode != 0
    assert "530 5.7.0 Must issue a STARTTLS command first" in replies(result), explain(postfix, offset, result)


@pytest.mark.parametrize(("recipient", "reply"), [
    ("carol@other.test", "554 5.7.1 <carol@other.test>: Relay access denied"),
    (f"nobody@{DOMAIN}", f"550 5.1.1 <nobody@{DOMAIN}>: Recipient address rejected: "
                         f"User unknown in virtual mailbox table"),
])
def test_inbound_recipient_not_local_is_refused(postfix: PostfixPeer, certificates: Certificates,
                                                recipient: str, reply: str) -> None:
    offset = postfix.log_size()
    result = swaks(postfix, "--from", "sender@other.test", "--to", recipient, cert=certificates.other)
    assert result.returncode != 0
    assert reply in replies(result), explain(postfix, offset, result)
    postfix.wait_for_log(rf"NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.1\]: {re.escape(reply)};",
                         offset=offset)


# -------------------- outbound: Postfix → aiosmtpd


def test_outbound_relay_presents_operator_certificate(postfix: PostfixPeer, certificates: Certificates,
                                                      next_hops: dict[str, RecordingSMTPServer]) -> None:
    hop = next_hops["other.test"]
    offset = postfix.log_size()
    queue_id = postfix.inject(f"alice@{DOMAIN}", ["dest@other.test"],
                              message(f"alice@{DOMAIN}", "dest@other.test", "outbound mutual TLS"))
    postfix.wait_for_log(rf"{queue_id}: to=<dest@other.test>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{hop.port}, "
                         rf".*status=sent \(250 2\.0\.0 Ok: recorded\)", offset=offset)
    log = postfix.log_text(offset)
    assert re.search(rf"Verified TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:{hop.port}: TLSv1\.[23]",
                     log), log
    received = [m for m in hop.handler.messages if b"Subject: outbound mutual TLS" in m.data]
    assert len(received) == 1, explain(postfix, offset)
    assert received[0].mail_from == f"alice@{DOMAIN}"
    assert received[0].rcpt_tos == ["dest@other.test"]
    assert received[0].client_cert_der == der(certificates.postfix)
    client = x509.load_der_x509_certificate(received[0].client_cert_der)
    assert client.subject.rfc4514_string() == certificates.postfix.subject_dn
    postfix.wait_for_log(rf"{queue_id}: removed", offset=offset)
    assert queue_id not in postfix.queue_ids()


@pytest.mark.parametrize(("domain", "why"), [
    # Postfix's own words, before the deferral: the chain does not lead to smtp_tls_CAfile ...
    ("foreign.test", r"certificate verification failed for {relay}: untrusted issuer /C=FR/O=[^/]+/"
                     r"OU=IGC-AUTORITE ETRANGERE DEV/CN=AC RACINE AUTORITE ETRANGERE DEV"),
    # ... or it does, but the certificate does not carry the name of the policy's "match=".
    ("misnamed.test", r"server certificate verification failed for {relay}: num=62:hostname mismatch"),
])
def test_outbound_to_unverified_server_is_deferred(postfix: PostfixPeer, next_hops: dict[str, RecordingSMTPServer],
                                                   domain: str, why: str) -> None:
    hop = next_hops[domain]
    recipient = f"dest@{domain}"
    relay = rf"127\.0\.0\.1\[127\.0\.0\.1\]:{hop.port}"
    offset = postfix.log_size()
    queue_id = postfix.inject(f"alice@{DOMAIN}", [recipient], message(f"alice@{DOMAIN}", recipient, f"to {domain}"))
    try:
        postfix.wait_for_log(rf"{queue_id}: to=<{re.escape(recipient)}>, relay={relay}, .*dsn=4\.7\.5, "
                             rf"status=deferred \(Server certificate not verified\)", offset=offset)
        postfix.wait_for_log(why.format(relay=relay), offset=offset)
        # Retried every second, the message moves between the deferred, incoming and active queues; it
        # spends most of its time in "deferred", with the reason of the last attempt.
        expected = {"queue_name": "deferred", "queue_id": queue_id,
                    "recipients": [{"address": recipient, "delay_reason": "Server certificate not verified"}]}
        seen: list[list[dict[str, Any]]] = []

        def in_deferred_queue() -> bool:
            seen.append(postfix.queue())
            return any(expected.items() <= entry.items() for entry in seen[-1])

        try:
            wait_for(in_deferred_queue, timeout=10)
        except TimeoutError:
            pytest.fail(f"never seen deferred with the expected reason; last queue: {seen[-1]}\n"
                        + explain(postfix, offset))
        # flush() makes Postfix try again at once, with the same outcome.
        second = postfix.log_size()
        postfix.flush()
        postfix.wait_for_log(rf"{queue_id}: to=<{re.escape(recipient)}>, .*status=deferred "
                             rf"\(.*Server certificate not verified\)", offset=second)
        assert queue_id in postfix.queue_ids()
        assert hop.handler.messages == []
    finally:
        postfix.purge_queue()
    wait_for(lambda: queue_id not in postfix.queue_ids(), timeout=10)


def test_inject_requires_message_id(postfix: PostfixPeer) -> None:
    with pytest.raises(ValueError, match="Message-ID"):
        postfix.inject(f"alice@{DOMAIN}", ["dest@other.test"], b"Subject: none\r\n\r\nBody\r\n")
    with pytest.raises(PostfixError, match="no log line matching"):
        postfix.wait_for_log(r"this line is never logged", timeout=0.2)
