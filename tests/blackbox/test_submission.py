"""SMTP submission driven by curl, swaks, openssl and a raw TLS socket against `caducee serve`."""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import time

import pytest

from mailserver.testing import ServerProcess, wait_for
from tests.blackbox.clients import curl_imap, curl_send, message, swaks


def _fetch_subjects(server: ServerProcess, ident: dict) -> str:
    r = curl_imap(server, ident, request="SEARCH ALL")
    return r.stdout.decode()


def _inbox_uids(server: ServerProcess, ident: dict, subject: str) -> list[int]:
    r = curl_imap(server, ident, request=f'SEARCH SUBJECT "{subject}"')
    assert r.returncode == 0, r.stderr
    m = re.search(rb"\* SEARCH([ 0-9]*)", r.stdout)
    return [int(x) for x in m.group(1).split()] if m else []


class RawSMTP:
    """A line-level SMTP client over implicit TLS with a client certificate, for byte-exact probes."""

    def __init__(self, server: ServerProcess, ident: dict | None) -> None:
        ctx = ssl.create_default_context(cafile=server.ca_bundle)
        if ident:
            ctx.load_cert_chain(ident["cert"], ident["key"])
        raw = socket.create_connection(("127.0.0.1", server.port("submissions")), timeout=20)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        self.buf = b""
        self.reply()

    def reply(self) -> str:
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line.decode())
            if len(line) < 4 or line[3:4] != b"-":
                return "\n".join(lines)

    def cmd(self, line: str | bytes) -> str:
        self.sock.sendall((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def login(self, authzid: str = "") -> None:
        assert self.cmd("EHLO client.test").startswith("250")
        import base64

        arg = base64.b64encode(authzid.encode()).decode() if authzid else "="
        assert self.cmd(f"AUTH EXTERNAL {arg}").startswith("235 2.7.0")

    def close(self) -> None:
        try:
            self.cmd("QUIT")
        finally:
            self.sock.close()


# -- sending and reading with curl ----------------------------------------------------------------

@pytest.mark.parametrize("sasl_ir", [True, False], ids=["sasl-ir", "challenge"])
@pytest.mark.parametrize("implicit", [True, False], ids=["smtps", "starttls"])
def test_curl_submits_with_external_and_recipient_reads_over_imap(server: ServerProcess, implicit: bool,
                                                                   sasl_ir: bool) -> None:
    alice, bob = server.identity("PER", 0), server.identity("PER", 1)
    subject = f"curl {implicit} {sasl_ir} {time.monotonic_ns()}"
    r = curl_send(server, alice, [bob["address"]], message(alice["address"], bob["address"], subject),
                  implicit=implicit, sasl_ir=sasl_ir)
    assert r.returncode == 0, r.stderr
    assert b"235 2.7.0" in r.stderr and b"250 2.0.0 Ok: queued as" in r.stderr
    uids = wait_for(lambda: _inbox_uids(server, bob, subject))
    assert len(uids) == 1
    body = curl_imap(server, bob, f"INBOX;UID={uids[0]}")
    assert body.returncode == 0
    assert f"Subject: {subject}".encode() in body.stdout
    assert body.stdout.startswith(b"Received: from client.test") or b"Received: from" in body.stdout


def test_organisation_certificate_sends_from_its_app_mailbox(server: ServerProcess) -> None:
    app, bob = server.identity("APP", 0), server.identity("PER", 1)
    subject = f"resultats {time.monotonic_ns()}"
    r = curl_send(server, app, [bob["address"]], message(app["address"], bob["address"], subject))
    assert r.returncode == 0, r.stderr
    assert wait_for(lambda: _inbox_uids(server, bob, subject))


# -- refusals with swaks ---------------------------------------------------------------------------

def test_mail_before_starttls_is_refused(server: ServerProcess) -> None:
    alice = server.identity("PER", 0)
    r = swaks(server, "--from", alice["address"], "--to", alice["address"], "--quit-after", "MAIL")
    assert "530 5.7.0 Must issue a STARTTLS command first" in r.stdout
    assert "AUTH" not in [line.split()[1] for line in r.stdout.splitlines() if line.startswith("<-  250")
                          and len(line.split()) > 1]


def test_auth_before_starttls_is_refused(server: ServerProcess) -> None:
    r = swaks(server, "--auth", "PLAIN", "--auth-user", "x", "--auth-password", "y", "--quit-after", "AUTH")
    assert "STARTTLS" in r.stdout
    # swaks finds no AUTH offered before TLS and gives up without sending credentials
    assert "AUTH PLAIN" not in r.stdout.replace("--auth", "")


def test_mail_after_starttls_without_auth_is_refused(server: ServerProcess) -> None:
    alice = server.identity("PER", 0)
    r = swaks(server, "--tls", "--tls-cert", alice["cert"], "--tls-key", alice["key"],
              "--from", alice["address"], "--to", alice["address"], "--quit-after", "MAIL")
    assert "TLS started" in r.stdout
    assert "530 5.7.0 Authentication required" in r.stdout


def test_only_external_is_offered_after_tls(server: ServerProcess) -> None:
    alice = server.identity("PER", 0)
    r = swaks(server, "--tls", "--tls-cert", alice["cert"], "--tls-key", alice["key"], "--quit-after", "EHLO")
    auth_lines = [line for line in r.stdout.splitlines() if "AUTH" in line and line.startswith("<~")]
    assert auth_lines and all(line.rstrip().endswith("AUTH EXTERNAL") for line in auth_lines), r.stdout
    assert "SIZE 10485760" in r.stdout and "ENHANCEDSTATUSCODES" in r.stdout


# -- certificate refusals ----------------------------------------------------------------------------

def _external_reply(server: ServerProcess, cert: str | None, key: str | None) -> str:
    ident = {"cert": cert, "key": key} if cert else None
    c = RawSMTP(server, ident)
    try:
        c.cmd("EHLO client.test")
        return c.cmd("AUTH EXTERNAL =")
    finally:
        c.close()


def test_no_client_certificate_gets_535(server: ServerProcess) -> None:
    assert _external_reply(server, None, None).startswith("535 5.7.8")


def test_expired_revoked_and_foreign_certificates_get_535(server: ServerProcess, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import datetime as dt

    from crypto.pki import CertUsage, DevPKI

    pki = DevPKI.create_or_load(server.state / "pki")
    person = server.identity("PER", 2)
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=400)
    expired = pki.issue_person(person["national_id"], "Sophie", "Petit", person["address"], CertUsage.AUTH,
                               tmp_path, "expired", None, not_before=past,
                               not_after=past + dt.timedelta(days=30))
    revoked = pki.issue_person(person["national_id"], "Sophie", "Petit", person["address"], CertUsage.AUTH,
                               tmp_path, "revoked", None)
    assert _external_reply(server, str(revoked.cert_path), str(revoked.key_path)).startswith("235")
    pki.revoke(revoked.serial)
    foreign = DevPKI.create_or_load(tmp_path / "foreign")
    alien = foreign.issue_person(person["national_id"], "Sophie", "Petit", person["address"], CertUsage.AUTH,
                                 tmp_path, "alien", None)
    enc_only = (person["enc_cert"], person["enc_key"])
    for cert, key in ((expired.cert_path, expired.key_path), (revoked.cert_path, revoked.key_path),
                      (alien.cert_path, alien.key_path), enc_only):
        assert _external_reply(server, str(cert), str(key)).startswith("535 5.7.8"), cert


def test_authzid_of_someone_else_is_refused(server: ServerProcess) -> None:
    alice, bob = server.identity("PER", 0), server.identity("PER", 1)
    c = RawSMTP(server, alice)
    try:
        c.cmd("EHLO client.test")
        import base64

        assert c.cmd("AUTH EXTERNAL " + base64.b64encode(bob["address"].encode()).decode()).startswith("535 5.7.8")
    finally:
        c.close()


# -- anti-spoofing, recipients ---------------------------------------------------------------------------

def test_sender_and_from_header_must_belong_to_the_principal(server: ServerProcess) -> None:
    alice, bob = server.identity("PER", 0), server.identity("PER", 1)
    c = RawSMTP(server, alice)
    try:
        c.login()
        assert c.cmd(f"MAIL FROM:<{bob['address']}>").startswith("550 5.7.1")
        assert c.cmd(f"MAIL FROM:<{alice['address']}>").startswith("250")
        assert c.cmd(f"RCPT TO:<{bob['address']}>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        reply = c.cmd(message(bob["address"], bob["address"], "spoof").rstrip(b"\r\n") + b"\r\n.")
        assert reply.startswith("550 5.7.1"), reply
    finally:
        c.close()


def test_unknown_local_and_foreign_recipients(server: ServerProcess) -> None:
    alice = server.identity("PER", 0)
    c = RawSMTP(server, alice)
    try:
        c.login()
        assert c.cmd(f"MAIL FROM:<{alice['address']}>").startswith("250")
        assert c.cmd(f"RCPT TO:<nobody@{server.demo['domain']}>").startswith("550 5.1.1")
        assert c.cmd("RCPT TO:<someone@elsewhere.example>").startswith("550 5.7.1")
    finally:
        c.close()


# -- input hygiene -----------------------------------------------------------------------------------

SMUGGLING_ENDINGS = {
    "LF.LF": b"\n.\n",
    "CRLF.LF": b"\r\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.CR": b"\r\n.\r",
    "CR.CR": b"\r.\r",
}


@pytest.mark.parametrize("name", list(SMUGGLING_ENDINGS))
def test_smuggling_end_of_data_variants_refuse_the_whole_message(server: ServerProcess, name: str) -> None:
    alice, bob = server.identity("PER", 0), server.identity("PER", 1)
    tag = f"smuggle-{name}-{time.monotonic_ns()}"
    smuggled = (f"MAIL FROM:<{alice['address']}>\r\nRCPT TO:<{bob['address']}>\r\nDATA\r\n"
                f"From: {alice['address']}\r\nSubject: {tag}-inner\r\n\r\nsmuggled\r\n").encode()
    payload = (message(alice["address"], bob["address"], tag).rstrip(b"\r\n") + SMUGGLING_ENDINGS[name]
               + smuggled + b"\r\n.")
    c = RawSMTP(server, alice)
    try:
        c.login()
        assert c.cmd(f"MAIL FROM:<{alice['address']}>").startswith("250")
        assert c.cmd(f"RCPT TO:<{bob['address']}>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        reply = c.cmd(payload)
        assert reply.startswith("550 5.5.2"), reply
        assert c.cmd("NOOP").startswith("250")  # one reply for the one message: nothing was split
    finally:
        c.close()
    time.sleep(0.3)
    assert _inbox_uids(server, bob, tag) == []
    assert _inbox_uids(server, bob, f"{tag}-inner") == []


def test_size_is_announced_and_enforced(server: ServerProcess) -> None:
    alice, bob = server.identity("PER", 0), server.identity("PER", 1)
    c = RawSMTP(server, alice)
    try:
        ehlo = c.cmd("EHLO client.test")
        assert "250-SIZE 10485760" in ehlo
        c.cmd("AUTH EXTERNAL =")
        assert c.cmd(f"MAIL FROM:<{alice['address']}> SIZE=20000000").startswith("552 5.3.4")
        assert c.cmd(f"MAIL FROM:<{alice['address']}>").startswith("250")
        assert c.cmd(f"RCPT TO:<{bob['address']}>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        big = message(alice["address"], bob["address"], "big").rstrip(b"\r\n") + b"\r\n" + (b"x" * 998 + b"\r\n") * 11000
        assert c.cmd(big + b".").startswith("552 5.3.4")
        assert c.cmd("NOOP").startswith("250")
    finally:
        c.close()


def test_overlong_command_line_is_refused(server: ServerProcess) -> None:
    c = RawSMTP(server, None)
    try:
        c.cmd("EHLO client.test")
        assert c.cmd("NOOP " + "x" * 5000).startswith("500 5.5.2")
        assert c.cmd("NOOP").startswith("250")
    finally:
        c.close()


# -- TLS profile with openssl s_client ------------------------------------------------------------

def _s_client(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", "s_client", "-brief", *args], input="QUIT\r\n", capture_output=True,
                          text=True, timeout=20)


@pytest.mark.parametrize("listener,extra", [("submissions", []), ("submission", ["-starttls", "smtp"]),
                                            ("imaps", []), ("imap", ["-starttls", "imap"])])
def test_tls_versions_and_suites(server: ServerProcess, listener: str, extra: list[str]) -> None:
    target = ["-connect", f"127.0.0.1:{server.port(listener)}", *extra]
    ok13 = _s_client(*target, "-tls1_3")
    assert "Protocol version: TLSv1.3" in ok13.stderr, ok13.stderr
    ok12 = _s_client(*target, "-tls1_2", "-cipher", "ECDHE-RSA-AES256-GCM-SHA384")
    assert "Protocol version: TLSv1.2" in ok12.stderr, ok12.stderr
    for bad in (["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"], ["-tls1", "-cipher", "DEFAULT@SECLEVEL=0"],
                ["-tls1_2", "-cipher", "AES128-SHA"], ["-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA256"],
                ["-tls1_2", "-cipher", "AES256-GCM-SHA384"]):
        r = _s_client(*target, *bad)
        assert "Protocol version" not in r.stderr, (bad, r.stderr)


@pytest.mark.parametrize("listener,extra", [("submissions", []), ("imaps", [])])
def test_key_exchange_groups_are_restricted(server: ServerProcess, listener: str, extra: list[str]) -> None:
    target = ["-connect", f"127.0.0.1:{server.port(listener)}", *extra]
    for group in ("X25519", "P-256", "P-384"):
        assert "Protocol version" in _s_client(*target, "-groups", group).stderr, group
    for group in ("X448", "P-521", "ffdhe2048"):
        assert "Protocol version" not in _s_client(*target, "-groups", group).stderr, group
