"""DATA read in blocks (CaduceeSMTP._data): the end of data, dot-unstuffing, limits and pipelined bytes
behave as aiosmtpd's line-by-line reader did, however the client's bytes are split into segments."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mailserver.smtp_protocol import CaduceeSMTP


class Recorder:
    def __init__(self) -> None:
        self.connections: set[Any] = set()
        self.messages: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's API
        self.messages.append(envelope.original_content)
        return "250 2.0.0 stored"


async def converse(segments: list[bytes], *, size_limit: int = 4096) -> tuple[list[bytes], bytes]:
    """Send `segments` one write each (with a pause, so that they arrive apart) after MAIL and RCPT; returns
    the messages the handler got and every reply line."""
    handler = Recorder()
    server = await asyncio.get_running_loop().create_server(
        lambda: CaduceeSMTP(handler, implicit_tls=False, hostname="mx.test", data_size_limit=size_limit,
                            auth_require_tls=False), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    replies = bytearray(await reader.readline())
    writer.write(b"EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
    for segment in segments:
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(segment)
    writer.write(b"QUIT\r\n")
    await writer.drain()
    replies += await asyncio.wait_for(reader.read(), 10)
    writer.close()
    server.close()
    await server.wait_closed()
    return handler.messages, bytes(replies)


def run(segments: list[bytes], **kw: Any) -> tuple[list[bytes], bytes]:
    return asyncio.run(converse(segments, **kw))


def test_an_empty_message_ends_at_once() -> None:
    messages, replies = run([b".\r\n"])
    assert messages == [b""]
    assert b"250 2.0.0 stored" in replies


@pytest.mark.parametrize("cut", [1, 2, 3, 4, 5, 6, 7])
def test_the_end_of_data_split_across_segments(cut: int) -> None:
    wire = b"Subject: s\r\n\r\nbody\r\n.\r\n"
    at = len(wire) - cut
    messages, replies = run([wire[:at], wire[at:]])
    assert messages == [b"Subject: s\r\n\r\nbody\r\n"]
    assert replies.count(b"250 2.0.0 stored") == 1 and replies.endswith(b"221 2.0.0 Bye\r\n")


def test_dots_are_unstuffed_and_bare_endings_never_end_the_data() -> None:
    wire = b"..leading\r\n.x\r\nmid\n.\nstill\r.\rin\r\n...\r\n.\r\n"
    messages, _ = run([wire])
    assert messages == [b".leading\r\nx\r\nmid\n.\nstill\r.\rin\r\n..\r\n"]


def test_commands_pipelined_after_the_end_of_data_run_in_order() -> None:
    messages, replies = run([b"one\r\n.\r\nRSET\r\nNOOP\r\n"])
    assert messages == [b"one\r\n"]
    stored = replies.index(b"250 2.0.0 stored")
    assert replies.index(b"250 2.0.0 OK", stored) > stored  # RSET, then NOOP, answered after the 250
    assert replies.count(b"250 2.0.0 OK") >= 2


def test_too_much_data_is_552_after_the_end_and_memory_is_not_kept() -> None:
    block = (b"x" * 998 + b"\r\n") * 64  # 64 KB per segment
    messages, replies = run([block] * 8 + [b".\r\n"], size_limit=100_000)
    assert messages == []
    assert b"552 5.3.4" in replies and b"250 2.0.0 stored" not in replies


def test_a_line_over_the_limit_is_500() -> None:
    messages, replies = run([b"a" * 1000 + b"\r\n.\r\n"])
    assert messages == []
    assert b"500 5.5.2 Line too long" in replies
    messages, _ = run([b"a" * 999 + b"\r\n.\r\n"])
    assert messages == [b"a" * 999 + b"\r\n"]


def test_the_client_leaving_in_data_stores_nothing() -> None:
    async def main() -> list[bytes]:
        handler = Recorder()
        server = await asyncio.get_running_loop().create_server(
            lambda: CaduceeSMTP(handler, implicit_tls=False, hostname="mx.test", auth_require_tls=False),
            "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        await reader.readline()
        writer.write(b"EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\npart of a message\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.close()
        await asyncio.sleep(0.1)
        server.close()
        await server.wait_closed()
        return handler.messages

    assert asyncio.run(main()) == []
