"""Database tables of the mail server: queue, mailbox store, audit trail (DESIGN.md §3)."""

from __future__ import annotations

import sqlalchemy as sa

from directory.schema import metadata

TZDateTime = sa.DateTime(timezone=True)

# A message accepted for delivery. Its body is the blob `blob` (content address, see blobs.py).
queue_messages = sa.Table(
    "queue_messages",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("blob", sa.String(64), nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("mail_from", sa.String(320), nullable=False),  # "" for the null reverse-path
    sa.Column("envid", sa.String(100), nullable=True),  # RFC 3461 ENVID
    sa.Column("ret", sa.String(4), nullable=True),  # RFC 3461 RET=FULL|HDRS
    sa.Column("principal", sa.String(32), nullable=True),  # national id of the submitter
    sa.Column("header_message_id", sa.String(998), nullable=True),
    sa.Column("received_at", TZDateTime, nullable=False),
    # Trace fields counted on arrival: a message with too many hops is looping (RFC 5321 §6.3).
    sa.Column("hops", sa.Integer, nullable=False, server_default="0"),
    # "dsn" / "mdn" when the message is itself a report: never answered by another report.
    sa.Column("report_kind", sa.String(8), nullable=True),
    # Bytes of the Return-Path field the blob starts with (RFC 5321 §4.4, for final delivery: the blob is
    # then the mailbox copy as is); relaying and returned content skip them. NULL: queued before 0005,
    # the blob has none.
    sa.Column("trace_length", sa.Integer, nullable=True),
)

# A message body of at most `[storage] inline_max` bytes, by content address (blobs.py): committed with
# the rows that name it. Larger bodies are files under `[storage] blobs`.
inline_blobs = sa.Table(
    "inline_blobs",
    metadata,
    sa.Column("address", sa.String(64), primary_key=True),  # SHA-256 of `data`, hex
    sa.Column("data", sa.LargeBinary, nullable=False),
)

queue_recipients = sa.Table(
    "queue_recipients",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("message_id", sa.String(32), sa.ForeignKey("queue_messages.id"), nullable=False, index=True),
    sa.Column("rcpt", sa.String(320), nullable=False),
    sa.Column("notify", sa.String(40), nullable=True),  # RFC 3461 NOTIFY
    sa.Column("orcpt", sa.String(500), nullable=True),  # RFC 3461 ORCPT
    sa.Column("state", sa.String(16), nullable=False),  # queued | delivered | failed
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", TZDateTime, nullable=False),
    sa.Column("lease_owner", sa.String(64), nullable=True),
    sa.Column("lease_expires", TZDateTime, nullable=True),
    sa.Column("last_error", sa.String(500), nullable=True),
    sa.Column("updated_at", TZDateTime, nullable=False),
    sa.Column("last_attempt_at", TZDateTime, nullable=True),
    # The peer dropped the connection after our final dot: it may have the message (possible duplicate).
    sa.Column("uncertain", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("delay_reported", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Index("ix_queue_recipients_due", "state", "next_attempt_at"),
)

folders = sa.Table(
    "folders",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("mailbox_id", sa.Integer, sa.ForeignKey("mailboxes.id"), nullable=False),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("uidvalidity", sa.BigInteger, nullable=False),
    sa.Column("uidnext", sa.BigInteger, nullable=False, server_default="1"),
    sa.Column("subscribed", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.UniqueConstraint("mailbox_id", "name", name="uq_folders_mailbox_name"),
)

messages = sa.Table(
    "messages",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("folder_id", sa.Integer, sa.ForeignKey("folders.id"), nullable=False),
    sa.Column("uid", sa.BigInteger, nullable=False),
    sa.Column("blob", sa.String(64), nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("internaldate", TZDateTime, nullable=False),
    sa.Column("flags", sa.String(1000), nullable=False, server_default=""),  # space-separated
    sa.Column("header_message_id", sa.String(998), nullable=True),
    # Set when the message came through the queue: makes delivery idempotent (exactly once).
    sa.Column("queue_recipient_id", sa.Integer, nullable=True, unique=True),
    sa.UniqueConstraint("folder_id", "uid", name="uq_messages_folder_uid"),
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", TZDateTime, nullable=False),
    sa.Column("event", sa.String(32), nullable=False),
    sa.Column("actor", sa.String(64), nullable=False),
    sa.Column("protocol", sa.String(16), nullable=True),
    sa.Column("mailbox", sa.String(320), nullable=True),
    sa.Column("message_id", sa.String(998), nullable=True),
    sa.Column("detail", sa.Text, nullable=True),  # JSON object of short strings
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)

# -- the trust space (issue: relay between operators) --

# Operator domains of the trust space, each tied to the subject DN of its operator certificate
# (ListeBlancheMSSante, REFERENCE.md §1). `source` is "national" for the imported list, "local" for
# entries an administrator added; an import replaces the national entries only.
trust_domains = sa.Table(
    "trust_domains",
    metadata,
    sa.Column("domain", sa.String(255), primary_key=True),
    sa.Column("operator_dn", sa.String(1000), nullable=False),
    sa.Column("description", sa.String(500), nullable=True),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("updated_at", TZDateTime, nullable=False),
)

# Every accepted whitelist import, newest last: what was loaded, from where, with which checksum.
trust_imports = sa.Table(
    "trust_imports",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("imported_at", TZDateTime, nullable=False),
    sa.Column("generated_at", TZDateTime, nullable=True),  # <DateDeGeneration>
    sa.Column("source", sa.String(1000), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("domains", sa.Integer, nullable=False),
)

# Delivery status (DSN, RFC 3464) and dispositions (MDN, RFC 8098) seen for a message, correlated by
# its Message-ID, so that the sender's software can ask what became of what it sent.
delivery_reports = sa.Table(
    "delivery_reports",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("original_message_id", sa.String(998), nullable=False, index=True),
    sa.Column("sender", sa.String(320), nullable=True),
    sa.Column("recipient", sa.String(320), nullable=False),
    sa.Column("kind", sa.String(8), nullable=False),  # dsn | mdn
    sa.Column("status", sa.String(64), nullable=False),  # DSN action or MDN disposition type
    sa.Column("detail", sa.String(500), nullable=True),  # status code, MDN error code, diagnostic
    sa.Column("at", TZDateTime, nullable=False),
)
