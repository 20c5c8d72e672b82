"""The tamper-evident audit trail: append-only, each entry chained to the previous by SHA-256.

`hash = SHA-256(prev_hash || canonical JSON of the entry)`; altering, removing or reordering any entry
breaks every hash after it, which `verify` reports. Entries name who did what to which mailbox and
message; never message content or patient data.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from typing import Iterator

import sqlalchemy as sa

from mailserver.audit_api import AuditEvent
from mailserver.db import Writer, defer_in
from mailserver.schema import audit_log

GENESIS = "0" * 64
_LAST_HASH = sa.select(audit_log.c.hash).order_by(audit_log.c.seq.desc()).limit(1)
_INSERT_ENTRY = sa.insert(audit_log)


# Built once: json.dumps with options builds a new encoder per call, twice per audit entry.
_CANONICAL = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_DETAIL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _canonical(at: dt.datetime, event: str, actor: str, protocol: str | None, mailbox: str | None,
               message_id: str | None, detail: str | None) -> bytes:
    return _CANONICAL.encode(
        [at.astimezone(dt.timezone.utc).isoformat(timespec="microseconds"), event, actor, protocol,
         mailbox, message_id, detail],
    ).encode()


def chain_hash(prev_hash: str, canonical: bytes) -> str:
    return hashlib.sha256(prev_hash.encode() + canonical).hexdigest()


@dataclass(frozen=True)
class NewEntry:
    """An entry to append (`append_many_in`)."""

    event: AuditEvent
    actor: str
    protocol: str | None = None
    mailbox: str | None = None
    message_id: str | None = None
    detail: dict[str, str] | None = None
    at: dt.datetime | None = None


def append_in(
    conn: sa.Connection,
    event: AuditEvent,
    *,
    actor: str,
    protocol: str | None = None,
    mailbox: str | None = None,
    message_id: str | None = None,
    detail: dict[str, str] | None = None,
    at: dt.datetime | None = None,
) -> None:
    """Append one entry inside the caller's transaction (so the event commits with what it records).

    In a writer batch the entries of every job are appended together at the end of the batch, in job
    order (`db.defer_in`): one read of the chain's end and one insert per batch, not per message."""
    entry = NewEntry(event, actor, protocol, mailbox, message_id, detail, at or dt.datetime.now(dt.timezone.utc))
    if not defer_in(conn, "audit", append_many_in, entry):
        append_many_in(conn, [entry])


def append_many_in(conn: sa.Connection, new: list[NewEntry]) -> None:
    """Append entries in order inside the caller's transaction: one read of the chain's end, one insert."""
    if not new:
        return
    if conn.dialect.name == "postgresql":
        # Several nodes append to one chain: serialise them (released at commit).
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(7223372036)"))
    prev_hash = conn.execute(_LAST_HASH).scalar() or GENESIS
    rows = []
    now = dt.datetime.now(dt.timezone.utc)
    for e in new:
        at = e.at or now
        detail_json = _DETAIL.encode(e.detail) if e.detail else None
        digest = chain_hash(prev_hash, _canonical(at, e.event.value, e.actor, e.protocol, e.mailbox, e.message_id,
                                                  detail_json))
        rows.append(dict(at=at, event=e.event.value, actor=e.actor, protocol=e.protocol, mailbox=e.mailbox,
                         message_id=e.message_id, detail=detail_json, prev_hash=prev_hash, hash=digest))
        prev_hash = digest
    conn.execute(_INSERT_ENTRY, rows)


class AuditTrail:
    """The `AuditSink` the servers use: events are appended by the database writer, in order."""

    def __init__(self, writer: Writer) -> None:
        self.writer = writer

    def record(
        self,
        event: AuditEvent,
        *,
        actor: str,
        protocol: str | None = None,
        mailbox: str | None = None,
        message_id: str | None = None,
        detail: dict[str, str] | None = None,
    ) -> None:
        at = dt.datetime.now(dt.timezone.utc)
        self.writer.submit_nowait(
            lambda conn: append_in(conn, event, actor=actor, protocol=protocol, mailbox=mailbox,
                                   message_id=message_id, detail=detail, at=at)
        )


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    at: dt.datetime
    event: str
    actor: str
    protocol: str | None
    mailbox: str | None
    message_id: str | None
    detail: str | None
    prev_hash: str
    hash: str


def entries(engine: sa.Engine, *, since_seq: int = 0) -> Iterator[AuditEntry]:
    with engine.connect() as conn:
        for row in conn.execute(sa.select(audit_log).where(audit_log.c.seq > since_seq).order_by(audit_log.c.seq)):
            at = row.at if row.at.tzinfo else row.at.replace(tzinfo=dt.timezone.utc)
            yield AuditEntry(row.seq, at, row.event, row.actor, row.protocol, row.mailbox, row.message_id,
                             row.detail, row.prev_hash, row.hash)


def verify(engine: sa.Engine) -> tuple[int, int | None]:
    """Walk the chain. Returns (entries checked, seq of the first broken entry or None)."""
    prev = GENESIS
    count = 0
    for entry in entries(engine):
        expected = chain_hash(prev, _canonical(entry.at, entry.event, entry.actor, entry.protocol,
                                               entry.mailbox, entry.message_id, entry.detail))
        if entry.prev_hash != prev or entry.hash != expected:
            return count, entry.seq
        prev = entry.hash
        count += 1
    return count, None
