"""Command lines of the real clients the tests drive."""

from __future__ import annotations

import subprocess

from mailserver.testing import ServerProcess


def message(sender: str, to: str, subject: str, body: str = "Bonjour.") -> bytes:
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{subject.replace(' ', '.')}@test>\r\n"
        f"\r\n{body}\r\n"
    ).encode()


def curl_send(server: ServerProcess, ident: dict, rcpt: list[str], data: bytes, *, implicit: bool = True,
              sasl_ir: bool = True, authzid: str | None = None,
              mail_from: str | None = None) -> subprocess.CompletedProcess[str]:
    url = (f"smtps://localhost:{server.port('submissions')}" if implicit
           else f"smtp://localhost:{server.port('submission')}")
    cmd = ["curl", "--silent", "--show-error", "--ssl-reqd", "--cacert", server.ca_bundle,
           "--cert", ident["cert"], "--key", ident["key"], "--login-options", "AUTH=EXTERNAL",
           "-u", f"{ident['address'] if authzid is None else authzid}:",
           "--mail-from", mail_from or ident["address"], "--upload-file", "-", "-v"]
    if sasl_ir:
        cmd.append("--sasl-ir")
    for r in rcpt:
        cmd += ["--mail-rcpt", r]
    cmd.append(url)
    return subprocess.run(cmd, input=data, capture_output=True, timeout=30)  # type: ignore[return-value]


def curl_imap(server: ServerProcess, ident: dict, path: str = "INBOX", *, request: str | None = None,
              implicit: bool = True, sasl_ir: bool = False) -> subprocess.CompletedProcess[bytes]:
    url = (f"imaps://localhost:{server.port('imaps')}/{path}" if implicit
           else f"imap://localhost:{server.port('imap')}/{path}")
    cmd = ["curl", "--silent", "--show-error", "--cacert", server.ca_bundle, "--cert", ident["cert"],
           "--key", ident["key"], "--login-options", "AUTH=EXTERNAL", "-u", f"{ident['address']}:"]
    if not implicit:
        cmd.append("--ssl-reqd")
    if sasl_ir:
        cmd.append("--sasl-ir")
    if request:
        cmd += ["--request", request]
    cmd.append(url)
    return subprocess.run(cmd, capture_output=True, timeout=30)


def swaks(server: ServerProcess, *args: str, implicit: bool = False) -> subprocess.CompletedProcess[str]:
    port = server.port("submissions" if implicit else "submission")
    cmd = ["swaks", "--server", "127.0.0.1", "--port", str(port), "--helo", "client.test",
           "--timeout", "20", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
