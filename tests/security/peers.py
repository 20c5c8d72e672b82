"""A capturing next hop: an SMTP server of "another operator" that records the exact bytes it is sent.

It speaks just enough SMTP (EHLO, STARTTLS, MAIL, RCPT, DATA, RSET, NOOP, QUIT) for Caducée's outbound
relay, offers DSN, and keeps, for each session, every command line and every DATA section exactly as it
arrived on the wire (after TLS): line endings, dot-stuffing and all. Nothing is normalised, so a test can
assert what the relay really sent (security matrix row 4), or that it sent nothing (rows 9, 23–25).
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from mailserver.testing import ThreadedTlsServer


@dataclass
class PeerSession:
    commands: list[bytes] = field(default_factory=list)  # every command line, raw, CRLF included
    data: list[bytes] = field(default_factory=list)  # each DATA section, raw, up to and including CRLF.CRLF
    tls: bool = False
    tls_failed: bool = False
    closed: bool = False

    def verbs(self) -> list[bytes]:
        return [c.split(b" ", 1)[0].split(b":", 1)[0].strip().upper() for c in self.commands]


class CapturePeer(ThreadedTlsServer):
    """An SMTP server with STARTTLS in a thread; `sessions` holds what each connection sent."""

    thread_name = "capture-peer"

    def __init__(self, chain: Path, key: Path, *, hostname: str = "mx.peer.test",
                 starttls: bool = True) -> None:
        super().__init__(chain, key)
        self.hostname = hostname
        self.starttls = starttls
        self.sessions: list[PeerSession] = []

    def start(self, port: int = 0) -> Self:
        super().start(port)
        return self

    def snapshot(self) -> list[PeerSession]:
        with self._lock:
            return list(self.sessions)

    def finished(self) -> list[PeerSession]:
        return [s for s in self.snapshot() if s.closed]

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        record = PeerSession()
        with self._lock:
            self.sessions.append(record)
        self._writers.add(writer)
        try:
            await self._converse(reader, writer, record)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ssl.SSLError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()
            record.closed = True

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        record: PeerSession) -> None:
        async def reply(text: str) -> None:
            writer.write(text.encode() + b"\r\n")
            await writer.drain()

        await reply(f"220 {self.hostname} ESMTP capture peer")
        while True:
            line = await reader.readline()
            if not line:
                return
            record.commands.append(line)
            verb = line.split(b" ", 1)[0].split(b":", 1)[0].strip().upper()
            if verb in (b"EHLO", b"HELO"):
                extensions = ["PIPELINING", "8BITMIME", "DSN", "ENHANCEDSTATUSCODES"]
                if self.starttls and not record.tls:
                    extensions.append("STARTTLS")
                lines = [self.hostname, *extensions]
                await reply("\r\n".join(f"250{'-' if i < len(lines) - 1 else ' '}{x}"
                                        for i, x in enumerate(lines)))
            elif verb == b"STARTTLS" and self.starttls and not record.tls:
                await reply("220 2.0.0 Ready to start TLS")
                try:
                    await writer.start_tls(self.tls)
                except (ssl.SSLError, ConnectionError, OSError):
                    record.tls_failed = True
                    return
                record.tls = True
            elif verb == b"DATA":
                await reply("354 End data with <CR><LF>.<CR><LF>")
                raw = bytearray()
                while not raw.endswith(b"\r\n.\r\n") and raw != b".\r\n":
                    chunk = await reader.readline()
                    if not chunk:
                        return
                    raw += chunk
                record.data.append(bytes(raw))
                await reply("250 2.0.0 Ok: captured")
            elif verb == b"QUIT":
                await reply("221 2.0.0 Bye")
                return
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                await reply("250 2.0.0 Ok")
            else:
                await reply("502 5.5.1 Not implemented")


def unstuff(raw: bytes) -> bytes:
    """The message a DATA section carries (RFC 5321 §4.5.2): the final dot removed, dot-stuffing undone."""
    assert raw.endswith(b"\r\n.\r\n"), raw[-20:]
    body = raw[: -len(b".\r\n")]
    return b"".join(line[1:] if line.startswith(b".") else line for line in body.splitlines(keepends=True))
