"""Byte-exact clients for the security tests: SMTP and IMAP over plaintext, STARTTLS or implicit TLS, with
or without a client certificate, that send exactly the bytes a test gives (several commands in one write,
bare CR or LF, NUL, huge lines) and read replies with a deadline."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path
from typing import Any, Self

from mailserver.testing import ServerProcess

TIMEOUT = 15


def tls_context(server: ServerProcess, cert: str | Path | None = None, key: str | Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=server.ca_bundle)
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def ident_context(server: ServerProcess, ident: dict[str, Any] | None) -> ssl.SSLContext:
    return tls_context(server, ident["cert"], ident["key"]) if ident else tls_context(server)


class Connection:
    """A socket with a read buffer. `line()` splits on LF only, so a stray CR in a reply stays visible."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    @classmethod
    def open(cls, server: ServerProcess, listener: str, ctx: ssl.SSLContext | None = None,
             timeout: float = TIMEOUT) -> Self:
        raw = socket.create_connection(("127.0.0.1", server.port(listener)), timeout=timeout)
        if ctx is not None:
            try:
                raw = ctx.wrap_socket(raw, server_hostname="localhost")
            except BaseException:
                raw.close()
                raise
        return cls(raw)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed by the server; unread: {self.buf[:200]!r}")
        self.buf += chunk

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\n", 1)
        return line + b"\n"

    def read_to_eof(self, timeout: float = TIMEOUT) -> bytes:
        """Everything until the server closes; fails if it has not closed within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                chunk = b""
            except TimeoutError:
                raise AssertionError(f"server did not close within {timeout} s; got {self.buf[:300]!r}") from None
            if not chunk:
                out, self.buf = self.buf, b""
                return out
            self.buf += chunk

    def quiet_for(self, seconds: float) -> bytes:
        """What arrives within `seconds` (b"" when the server says nothing: the expected case)."""
        self.sock.settimeout(seconds)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return self.buf
        finally:
            self.sock.settimeout(TIMEOUT)
        self.buf += chunk
        return self.buf

    def starttls(self, ctx: ssl.SSLContext) -> None:
        assert self.buf == b"", f"bytes pending before the TLS handshake: {self.buf!r}"
        self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SMTP(Connection):
    """An SMTP client line by line. `reply()` returns one (possibly multi-line) reply as text."""

    @classmethod
    def connect(cls, server: ServerProcess, listener: str = "submissions", ident: dict[str, Any] | None = None,
                *, greeting: bool = True, ctx: ssl.SSLContext | None = None) -> SMTP:
        implicit = listener == "submissions"
        conn = cls.open(server, listener, (ctx or ident_context(server, ident)) if implicit else None)
        if greeting:
            assert conn.reply().startswith("220 ")
        return conn

    def reply(self) -> str:
        lines = []
        while True:
            line = self.line()
            assert line.endswith(b"\r\n"), f"reply line without CRLF: {line!r}"
            lines.append(line[:-2].decode("utf-8", "replace"))
            if len(line) < 6 or line[3:4] != b"-":
                return "\n".join(lines)

    def replies(self, n: int) -> list[str]:
        return [self.reply() for _ in range(n)]

    def cmd(self, line: str | bytes) -> str:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def upgrade(self, ctx: ssl.SSLContext, helo: str = "client.test") -> None:
        """EHLO, STARTTLS, handshake, EHLO again (RFC 3207 §4.2)."""
        assert self.cmd(f"EHLO {helo}").startswith("250")
        assert self.cmd("STARTTLS").startswith("220")
        self.starttls(ctx)
        assert self.cmd(f"EHLO {helo}").startswith("250")

    def login(self, helo: str = "client.test") -> None:
        assert self.cmd(f"EHLO {helo}").startswith("250")
        reply = self.cmd("AUTH EXTERNAL =")
        assert reply.startswith("235 2.7.0"), reply

    def quit(self) -> None:
        try:
            self.cmd("QUIT")
        except (ConnectionError, OSError):
            pass
        self.close()


class IMAP(Connection):
    """An IMAP client line by line."""

    @classmethod
    def connect(cls, server: ServerProcess, listener: str = "imaps", ident: dict[str, Any] | None = None,
                *, authenticate: bool = False) -> IMAP:
        implicit = listener == "imaps"
        conn = cls.open(server, listener, ident_context(server, ident) if implicit else None)
        assert conn.line().startswith(b"* OK")
        if authenticate:
            assert conn.command(b"A0", b"AUTHENTICATE EXTERNAL =")[-1].startswith(b"A0 OK")
        return conn

    def until_tagged(self, tag: bytes) -> list[bytes]:
        lines = []
        while True:
            line = self.line().rstrip(b"\r\n")
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines

    def command(self, tag: bytes, text: bytes) -> list[bytes]:
        self.send(tag + b" " + text + b"\r\n")
        return self.until_tagged(tag)


def rss_kib(server: ServerProcess) -> int:
    """Resident set size of the server process, from /proc (Linux)."""
    assert server.proc is not None
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc status")


def message(sender: str, to: str, subject: str, body: str = "Bonjour.", extra: str = "") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{subject}@test>\r\n{extra}"
            f"\r\n{body}\r\n").encode()
