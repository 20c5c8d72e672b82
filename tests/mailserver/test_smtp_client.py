"""The outbound relay against in-test peers: mutual TLS, whitelist DN, retries, leases, uncertain drops."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from aiosmtpd.smtp import SMTP
from cryptography import x509

from caducee import database
from crypto.pki import DevPKI
from crypto.tls import peer_certificate_der, server_context
from crypto.validation import CertificateValidator
from mailserver.blobs import BlobStore
from mailserver.db import Writer, make_engine
from mailserver.queue import Envelope, Queue, Recipient, RecipientState
from mailserver.schema import queue_recipients
from mailserver.smtp_client import NextHop, RemoteDelivery, RemoteSettings, backoff, claim_in, remote_due

LOCAL, REMOTE = "a.test", "b.test"


@dataclass
class Entry:
    domain: str
    operator_dn: str


class Whitelist:
    """A two-line whitelist for the unit test (the real one is mailserver.trust.TrustStore)."""

    def __init__(self, entries: dict[str, x509.Name]) -> None:
        self.names = entries

    def lookup(self, domain: str) -> Entry | None:
        name = self.names.get(domain)
        return Entry(domain, name.rfc4514_string()) if name is not None else None

    def is_trusted(self, domain: str, subject: x509.Name) -> bool:
        return self.names.get(domain) == subject

    def is_operator(self, subject: x509.Name) -> bool:
        return subject in self.names.values()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[DevPKI, Path]:
    base = tmp_path_factory.mktemp("pki")
    pki = DevPKI.create_or_load(base / "pki")
    for name in ("a", "b", "rogue"):
        pki.issue_server([f"mx.{name}.test", "localhost"], ["127.0.0.1"], base, name,
                         structure_id=f"3{name}00000000001"[:15], organisation=f"Operateur {name.upper()}")
    return pki, base


class Peer:
    """An SMTP server in a thread, requiring STARTTLS; `drop_after_dot` loses the first session after DATA."""

    def __init__(self, cert: Path, key: Path, *, drop_after_dot: int = 0, reply: str = "250 2.0.0 Ok") -> None:
        self.tls = server_context(cert, key)
        self.received: list[tuple[str, list[str], bytes, bytes | None]] = []
        self.drop_after_dot = drop_after_dot
        self.reply = reply
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(
            self.loop.create_server(lambda: SMTP(self, tls_context=self.tls, require_starttls=True), "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        try:
            der = peer_certificate_der(session.ssl["ssl_object"]) if session.ssl else None
        except ValueError:
            der = None
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content, der))
        if self.drop_after_dot > 0:
            self.drop_after_dot -= 1
            server.transport.abort()  # the dot arrived; the reply never will
            return "250 lost"
        return self.reply

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def node(tmp_path: Path, pki: tuple[DevPKI, Path]) -> Iterator[dict[str, Any]]:
    devpki, base = pki
    url = f"sqlite:///{tmp_path / 'a.db'}"
    database.upgrade(url)
    writer = Writer(make_engine(url, writer=True))
    blobs = BlobStore(tmp_path / "blobs")
    validator = CertificateValidator.from_files(devpki.ca_bundle_path, devpki.crl_paths())
    b_subject = x509.load_pem_x509_certificate((base / "b.pem").read_bytes()).subject
    yield dict(writer=writer, blobs=blobs, validator=validator, base=base, devpki=devpki,
               trust=Whitelist({REMOTE: b_subject}), read=make_engine(url))
    writer.stop()


def _remote(node: dict[str, Any], port: int, **overrides: Any) -> tuple[Queue, RemoteDelivery]:
    base = node["base"]
    queue = Queue(node["writer"], node["blobs"], node="node-a")
    settings = RemoteSettings(hostname="mx.a.test", local_domains=frozenset({LOCAL}),
                              certificate=base / "a-fullchain.pem", key=base / "a.key",
                              ca_bundle=node["devpki"].ca_bundle_path,
                              next_hops={REMOTE: NextHop("127.0.0.1", port)}, connect_timeout=5,
                              **overrides)
    return queue, RemoteDelivery(queue, node["blobs"], node["trust"], node["validator"], settings)


def _states(node: dict[str, Any]) -> list[sa.Row]:
    with node["read"].connect() as conn:
        return conn.execute(sa.select(queue_recipients).order_by(queue_recipients.c.id)).all()


BODY = b"From: camille@a.test\r\nTo: louis@b.test\r\nSubject: x\r\nMessage-ID: <m@a.test>\r\n\r\nbonjour\r\n"


def test_relays_over_mutual_tls_with_dsn_parameters(node: dict[str, Any]) -> None:
    base = node["base"]
    peer = Peer(base / "b-fullchain.pem", base / "b.key")
    try:
        queue, remote = _remote(node, peer.port)

        async def main() -> int:
            await queue.enqueue(Envelope("camille@a.test", (Recipient("louis@b.test", "SUCCESS,FAILURE",
                                                                      "rfc822;Louis@b.test"),),
                                         envid="ENV-1", ret="HDRS"), BODY)
            return await remote.run_once()

        assert asyncio.run(main()) == 1
    finally:
        peer.close()
    mail_from, rcpts, content, der = peer.received[0]
    assert (mail_from, rcpts, content) == ("camille@a.test", ["louis@b.test"], BODY)
    assert der is not None  # our operator certificate was presented
    assert x509.load_der_x509_certificate(der).subject.rfc4514_string().find("Operateur A") >= 0
    (row,) = _states(node)
    # aiosmtpd's plain SMTP does not announce DSN: the success report is ours to send ("relayed")
    assert row.state == RecipientState.DSN_RELAYED and row.attempts == 1 and row.lease_owner is None


def test_peer_with_a_certificate_not_whitelisted_is_not_given_the_message(node: dict[str, Any],
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    base = node["base"]
    peer = Peer(base / "rogue-fullchain.pem", base / "rogue.key")
    try:
        queue, remote = _remote(node, peer.port)

        async def main() -> None:
            await queue.enqueue(Envelope("camille@a.test", (Recipient("louis@b.test"),)), BODY)
            with caplog.at_level(logging.WARNING):
                await remote.run_once()

        asyncio.run(main())
    finally:
        peer.close()
    assert peer.received == []
    (row,) = _states(node)
    assert row.state == RecipientState.QUEUED and row.last_error.startswith("4.7.5")
    assert row.next_attempt_at > row.last_attempt_at  # scheduled again, before the dial
    assert any("relay_peer_refused" in r.getMessage() for r in caplog.records)


def test_drop_after_the_final_dot_is_uncertain_and_retried(node: dict[str, Any],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    base = node["base"]
    peer = Peer(base / "b-fullchain.pem", base / "b.key", drop_after_dot=1)
    try:
        queue, remote = _remote(node, peer.port, retry_initial=1, retry_max=1)

        async def main() -> None:
            await queue.enqueue(Envelope("camille@a.test", (Recipient("louis@b.test"),)), BODY)
            with caplog.at_level(logging.WARNING):
                await remote.run_once()
            (first,) = _states(node)
            assert first.state == RecipientState.QUEUED and first.uncertain
            await asyncio.sleep(1.3)
            assert await remote.run_once() == 1

        asyncio.run(main())
    finally:
        peer.close()
    assert len(peer.received) == 2  # the peer got it twice: the duplicate the log warned of
    (row,) = _states(node)
    assert row.state == RecipientState.RELAYED and row.attempts == 2 and row.uncertain
    assert any("possible_duplicate=yes" in r.getMessage() for r in caplog.records)


def test_expiry_fails_the_recipient_and_permanent_refusals_are_final(node: dict[str, Any]) -> None:
    base = node["base"]
    peer = Peer(base / "b-fullchain.pem", base / "b.key", reply="550 5.1.1 no such user")
    try:
        queue, remote = _remote(node, peer.port)

        async def main() -> None:
            await queue.enqueue(Envelope("camille@a.test", (Recipient("nobody@b.test"),)), BODY)
            await remote.run_once()

        asyncio.run(main())
    finally:
        peer.close()
    (row,) = _states(node)
    assert row.state == RecipientState.DSN_FAILED and "5.1.1" in row.last_error

    queue, remote = _remote(node, 1, max_lifetime=0)  # port 1: nothing listens; and no time left

    async def expire() -> None:
        await queue.enqueue(Envelope("camille@a.test", (Recipient("louis@b.test", "NEVER"),)), BODY)
        await remote.run_once()

    asyncio.run(expire())
    row = _states(node)[-1]
    assert row.state == RecipientState.FAILED  # NOTIFY=NEVER: no report
    assert row.last_error.startswith("4.4.7 delivery time expired")


def test_a_crashed_workers_lease_expires(node: dict[str, Any]) -> None:
    queue, remote = _remote(node, 1, lease=60, retry_initial=10, retry_max=10)
    asyncio.run(queue.enqueue(Envelope("camille@a.test", (Recipient("louis@b.test"),)), BODY))
    now = dt.datetime.now(dt.timezone.utc)
    settings = remote.settings
    first = node["writer"].run_sync(lambda c: claim_in(c, settings, "worker-1", now=now))
    assert len(first) == 1  # worker-1 claims it, then dies without a word
    assert node["writer"].run_sync(lambda c: claim_in(c, settings, "worker-2", now=now + dt.timedelta(seconds=30))) == []
    later = node["writer"].run_sync(lambda c: claim_in(c, settings, "worker-2", now=now + dt.timedelta(seconds=61)))
    assert [c.recipient_id for c in later] == [first[0].recipient_id] and later[0].attempts == 2


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    import random

    rng = random.Random(7)
    values = [backoff(n, 60, 3600, rng) for n in range(1, 9)]
    assert 48 <= values[0] <= 72 and 96 <= values[1] <= 144
    assert all(v <= 3600 * 1.2 for v in values) and values[-1] >= 3600 * 0.8


def test_a_wake_up_with_nothing_remote_due_takes_no_place_in_the_writer(node: dict[str, Any]) -> None:
    """Every accepted message wakes the relay worker; with only local recipients queued it reads, finds
    nothing due and never claims (no writer batch); a remote recipient is then claimed at once."""
    queue, remote = _remote(node, 9)  # the hop is never reached: nothing is due, or the claim is checked only
    remote.read_engine = node["read"]

    async def main() -> tuple[int, int, bool, bool]:
        await queue.enqueue(Envelope("camille@a.test", (Recipient(f"louis@{LOCAL}"),)), BODY)
        batches = node["writer"].batches
        done = await remote.run_once()
        with node["read"].connect() as conn:
            local_only = remote_due(conn, remote.settings)
        after = node["writer"].batches
        await queue.enqueue(Envelope("camille@a.test", (Recipient(f"louis@{REMOTE}"),)), BODY)
        with node["read"].connect() as conn:
            with_remote = remote_due(conn, remote.settings)
        return done, after - batches, local_only, with_remote

    done, batches, local_only, with_remote = asyncio.run(main())
    assert (done, batches, local_only, with_remote) == (0, 0, False, True)
