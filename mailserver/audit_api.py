"""Typed audit events and the sink the protocol servers write them to.

The trail itself (hash-chained, append-only) lives in `mailserver.audit`; servers only see `AuditSink`.
An event names who acted, on which mailbox and message; never message content or patient data.
"""

from __future__ import annotations

import enum
from typing import Protocol


class AuditEvent(enum.Enum):
    LOGIN = "login"  # successful authentication (SMTP or IMAP)
    LOGIN_FAILED = "login_failed"
    SUBMIT = "submit"  # message accepted and queued
    DELIVER = "deliver"  # message placed in a mailbox
    READ = "read"  # message body fetched or marked \Seen by its reader
    DELETE = "delete"  # message expunged
    APPEND = "append"  # message stored by a client (IMAP APPEND)
    ADMIN = "admin"  # administrative change
    RELAY_IN = "relay_in"  # message accepted from another operator of the trust space
    RELAY_OUT = "relay_out"  # message handed to another operator
    RELAY_REFUSED = "relay_refused"  # a peer refused: not on the whitelist, bad certificate
    REPORT = "report"  # a delivery status notification or disposition notification sent


class AuditSink(Protocol):
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
        """Record one event. Never blocks the caller; durability is the sink's business."""
