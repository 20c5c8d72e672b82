"""Submission policy as plain functions: values in, a refusal `Reply` (or None) out. No sockets.

- check_sender: MAIL FROM must be a mailbox of the authenticated principal (anti-spoofing, DESIGN.md §4);
- check_recipient: local and known (550 5.1.1), or in a whitelisted domain of another operator of the
  trust space; anything else is refused as relaying (550 5.7.1);
- check_body: no bare CR or LF anywhere (RFC 5321 §2.3.8; SMTP smuggling), a header within the size and
  count caps (mailserver.headers), parseable, whose From: (and Sender:) are all mailboxes of the principal.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import email.utils
import re
import time
from dataclasses import dataclass
from typing import Protocol

from mailserver import replies
from mailserver.auth import Identity
from mailserver.headers import MAX_COMMENT_DEPTH, comment_depth, header_limits
from mailserver.replies import Reply
from mailserver.trust_api import TrustLookup

_ADDRESS = re.compile(r"^[^@\s<>()\[\],;:\"]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")
_HELO_SAFE = re.compile(r"[^A-Za-z0-9.\-\[\]:_]")


class MailboxLookup(Protocol):
    def mailbox_by_address(self, address: str) -> object | None: ...


class RecipientCache:
    """`directory.mailbox_by_address` answers kept `ttl` seconds, at most `size` of them.

    A recipient checked a moment ago is checked again on the event loop, without a database read nor a
    thread: a practice sending its reports to the same mailboxes costs one lookup per mailbox every few
    seconds instead of one per RCPT. A mailbox closed in the meantime is refused at most `ttl` seconds
    later; until then a message to it is accepted and its delivery fails (with a report), as for a
    mailbox closed while a message waits in the queue. Unknown addresses are kept too (a directory
    harvest gets no faster answers than `ttl` allows anyway)."""

    def __init__(self, directory: MailboxLookup, *, ttl: float = 5.0, size: int = 10_000) -> None:
        self.directory = directory
        self.ttl = ttl
        self.size = size
        self._entries: dict[str, tuple[float, object | None]] = {}

    def known(self, address: str) -> bool:
        """Whether `mailbox_by_address(address)` would answer from memory."""
        entry = self._entries.get(address)
        return entry is not None and time.monotonic() < entry[0]

    def mailbox_by_address(self, address: str) -> object | None:
        entry = self._entries.get(address)
        now = time.monotonic()
        if entry is not None and now < entry[0]:
            return entry[1]
        found = self.directory.mailbox_by_address(address)
        if len(self._entries) >= self.size:
            self._entries.clear()  # bounded; refilled by the next lookups
        self._entries[address] = (now + self.ttl, found)
        return found


async def check_recipient_cached(address: str, local_domains: frozenset[str], cache: RecipientCache,
                                 trust: TrustLookup | None = None) -> Reply | None:
    """`check_recipient` through `cache`: on the event loop when the answer is in memory, else in a
    thread (the directory read blocks)."""
    if address.rpartition("@")[2].lower() in local_domains and cache.known(address):
        return check_recipient(address, local_domains, cache, trust)
    return await asyncio.to_thread(check_recipient, address, local_domains, cache, trust)


def valid_address(address: str) -> bool:
    return bool(_ADDRESS.match(address)) and len(address) <= 254


def check_sender(identity: Identity, mail_from: str) -> Reply | None:
    if not mail_from:
        return replies.NULL_SENDER_REFUSED
    if not valid_address(mail_from):
        return replies.BAD_ADDRESS
    if not identity.owns(mail_from):
        return replies.SENDER_NOT_OWNED
    return None


def check_recipient(address: str, local_domains: frozenset[str], directory: MailboxLookup,
                    trust: TrustLookup | None = None) -> Reply | None:
    """Local and known, or in another operator's domain of the trust space; nothing else (no open relay)."""
    if not valid_address(address):
        return replies.BAD_ADDRESS
    domain = address.rpartition("@")[2].lower()
    if domain not in local_domains:
        if trust is not None and trust.lookup(domain) is not None:
            return None  # relayed to that operator
        return replies.RELAY_DENIED
    if directory.mailbox_by_address(address) is None:
        return replies.UNKNOWN_RECIPIENT
    return None


@dataclass(frozen=True)
class CheckedMessage:
    header_end: int  # offset of the blank line ending the header (or len(content) if none)
    message_id: str | None
    has_date: bool


def has_bare_line_ending(content: bytes) -> bool:
    """RFC 5321 §2.3.8: CR and LF only as CRLF (bare ones enable SMTP smuggling downstream).

    Every CR and every LF belongs to a CRLF exactly when the three counts agree (three passes in C, several
    times faster than a regular expression with a look-behind on every LF of a message).
    """
    pairs = content.count(b"\r\n")
    return content.count(b"\r") != pairs or content.count(b"\n") != pairs


def header_message_id(content: bytes) -> str | None:
    end = content.find(b"\r\n\r\n")
    try:
        headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
            content[: end + 2] if end >= 0 else content)
    except Exception:  # noqa: BLE001 - an unparseable header has no usable Message-ID
        return None
    value = headers.get("Message-ID")
    return str(value).strip()[:998] if value else None


def check_body(content: bytes, identity: Identity) -> CheckedMessage | Reply:
    if has_bare_line_ending(content):
        return replies.BARE_LINE_ENDING
    end = content.find(b"\r\n\r\n")
    header_block = content[: end + 2] if end >= 0 else content
    if content.startswith(b"\r\n"):
        return replies.FROM_MISSING
    if header_limits(header_block) is not None:
        return replies.HEADER_TOO_LARGE
    try:
        headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(header_block)
    except Exception:  # noqa: BLE001 - any parser failure is a malformed header
        return replies.HEADER_MALFORMED
    if headers.defects:
        return replies.HEADER_MALFORMED
    froms = headers.get_all("From") or []
    if len(froms) != 1:  # RFC 5322 §3.6: exactly one From field
        return replies.FROM_MISSING
    senders = headers.get_all("Sender") or []
    # getaddresses recurses once per nested comment: a deep nest was a RecursionError (451 4.3.0).
    if any(comment_depth(str(v)) > MAX_COMMENT_DEPTH for v in froms + senders):
        return replies.HEADER_MALFORMED
    addresses = [a for _, a in email.utils.getaddresses(froms + senders)]
    if not addresses or any(not a or not valid_address(a) for a in addresses):
        return replies.FROM_MISSING
    if any(not identity.owns(a) for a in addresses):
        return replies.FROM_NOT_OWNED
    message_id = headers.get("Message-ID")
    return CheckedMessage(
        header_end=end if end >= 0 else len(content),
        message_id=str(message_id).strip()[:998] if message_id else None,
        has_date=headers.get("Date") is not None,
    )


def prepend_trace(content: bytes, checked: CheckedMessage, *, received: bytes, hostname: str) -> tuple[bytes, str]:
    """Add the Received field, and Date and Message-ID when absent (RFC 6409 §8.2, §8.3).

    Returns the message and its Message-ID.
    """
    added = bytearray(received)
    if not checked.has_date:
        added += f"Date: {email.utils.formatdate(usegmt=True)}\r\n".encode()
    message_id = checked.message_id
    if message_id is None:
        message_id = email.utils.make_msgid(domain=hostname)
        added += f"Message-ID: {message_id}\r\n".encode()
    return bytes(added) + content, message_id


def sanitise_helo(name: str) -> str:
    return _HELO_SAFE.sub("_", name)[:255]
