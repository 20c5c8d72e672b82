"""Submission throughput of a real `caducee serve`: N messages of 5 KB over C TLS sessions with client
certificates and AUTH EXTERNAL (aiosmtplib), connections reused; then the time until all are delivered.

    .venv/bin/python bench/submission.py --messages 2000 --sessions 10

Prints accepted messages/s and delivery time. Comparison with Postfix belongs to `caducee bench smtp`.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiosmtplib

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mailserver.testing import ServerProcess  # noqa: E402

BODY = ("x" * 76 + "\r\n") * 64  # ~5 KB


async def sender(server: ServerProcess, ident: dict, rcpt: str, count: int, tls: ssl.SSLContext) -> None:
    smtp = aiosmtplib.SMTP(hostname="localhost", port=server.port("submissions"), use_tls=True, tls_context=tls)
    await smtp.connect()
    await smtp.ehlo()
    code, _ = await smtp.execute_command(b"AUTH", b"EXTERNAL", b"=")
    assert code == 235, code
    for i in range(count):
        msg = f"From: {ident['address']}\r\nTo: {rcpt}\r\nSubject: bench {i}\r\n\r\n{BODY}".encode()
        await smtp.sendmail(ident["address"], [rcpt], msg)
    await smtp.quit()


async def run(server: ServerProcess, messages: int, sessions: int) -> float:
    ident, rcpt = server.identity("PER", 0), server.identity("PER", 1)["address"]
    tls = ssl.create_default_context(cafile=server.ca_bundle)
    tls.load_cert_chain(ident["cert"], ident["key"])
    per = messages // sessions
    start = time.perf_counter()
    await asyncio.gather(*(sender(server, ident, rcpt, per, tls) for _ in range(sessions)))
    return per * sessions / (time.perf_counter() - start)


def delivered(state: Path) -> int:
    with sqlite3.connect(state / "caducee.db") as db:
        return int(db.execute("select count(*) from messages").fetchone()[0])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--sessions", type=int, default=10)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess.create(Path(tmp) / "state")
        with server:
            rates, delays = [], []
            for _ in range(args.runs):
                before = delivered(server.state)
                t0 = time.perf_counter()
                rates.append(asyncio.run(run(server, args.messages, args.sessions)))
                target = before + args.messages // args.sessions * args.sessions
                while delivered(server.state) < target:
                    time.sleep(0.02)
                delays.append(time.perf_counter() - t0)
        print(f"sessions={args.sessions} messages={args.messages} accepted_per_s_median={statistics.median(rates):.0f} "
              f"all_delivered_s_median={statistics.median(delays):.2f} runs={args.runs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
