"""The mailbox store as the IMAP server sees it.

A *mailbox* (boîte aux lettres, BAL) is an address of the directory (PER, ORG, APP or CAB); it holds
IMAP *folders* (INBOX always exists).  Message bodies are immutable blobs; a folder entry points to one.
Reads are synchronous (cheap, local); writes are coroutines committed by the single database writer, so
they are durable when they return.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable, Literal, Protocol, Sequence

FlagMode = Literal["set", "add", "remove"]


@dataclass(frozen=True)
class FolderInfo:
    id: int
    mailbox_id: int
    name: str  # "INBOX" for the inbox, otherwise as created (hierarchy delimiter "/")
    uidvalidity: int
    uidnext: int
    exists: int
    unseen: int


@dataclass(frozen=True, slots=True)  # slots: a folder listing holds one per message
class StoredMessage:
    uid: int
    size: int
    internaldate: dt.datetime  # timezone-aware, UTC
    flags: frozenset[str]  # IMAP flags as sent by clients, e.g. "\\Seen", "$Label1"
    blob: str  # content address of the raw RFC 5322 bytes


class NewMessageListener(Protocol):
    def __call__(self, folder_id: int) -> None: ...


class MailStore(Protocol):
    # -- reads (synchronous) --
    def list_folders(self, mailbox_id: int) -> list[FolderInfo]: ...
    def get_folder(self, mailbox_id: int, name: str) -> FolderInfo | None:
        """Folder by name; "INBOX" matches case-insensitively (RFC 3501 §5.1)."""
    def messages(self, folder_id: int, uids: Sequence[int] | None = None) -> list[StoredMessage]:
        """All messages of a folder in UID order (sequence number = index + 1); with `uids`, only those
        of them still in the folder (one query however many, flags as they are now)."""
    def message_flags(self, folder_id: int, after: int = 0) -> list[tuple[int, frozenset[str]]]:
        """(UID, flags) of the messages of a folder with a UID above `after` (all by default), in UID
        order: what SELECT and change reports need, without the rest of each row."""
    def message_count(self, folder_id: int, up_to: int | None = None) -> int:
        """How many messages a folder holds (with a UID up to `up_to` when given)."""
    def read_blob(self, blob: str) -> bytes:
        """The exact bytes of a message as delivered or appended."""
    def read_small(self, blobs: Sequence[str]) -> dict[str, bytes]:
        """The bytes of those of `blobs` that are small enough to be read together (one query for a
        whole FETCH batch); the others are left out, for `read_blob` / `read_header`."""
    def read_header(self, blob: str) -> bytes:
        """The header block of a message, its empty line included (RFC 3501 §6.4.5 BODY[HEADER]): the
        prefix of `read_blob` that `mailserver.imap_server.split_message` returns, read without the body."""

    # -- writes (durable when the coroutine returns) --
    def create_folder(self, mailbox_id: int, name: str) -> Awaitable[FolderInfo]: ...
    def delete_folder(self, folder_id: int) -> Awaitable[None]: ...
    def rename_folder(self, folder_id: int, new_name: str) -> Awaitable[None]: ...
    def append(self, folder_id: int, raw: bytes, flags: Iterable[str],
               internaldate: dt.datetime | None) -> Awaitable[int]:
        """Store a new message; returns its UID."""
    def set_flags(self, folder_id: int, uids: Iterable[int], flags: Iterable[str],
                  mode: FlagMode) -> Awaitable[dict[int, frozenset[str]]]:
        """Change flags; returns the new flags of every message touched."""
    def expunge(self, folder_id: int, uids: Iterable[int] | None = None) -> Awaitable[list[int]]:
        """Remove messages flagged \\Deleted (only among `uids` when given); returns removed UIDs."""
    def copy(self, folder_id: int, uids: Iterable[int], dest_folder_id: int) -> Awaitable[list[tuple[int, int]]]:
        """Copy; returns (source uid, destination uid) pairs."""
    def move(self, folder_id: int, uids: Iterable[int], dest_folder_id: int) -> Awaitable[list[tuple[int, int]]]:
        """Copy then remove atomically (RFC 6851); returns (source uid, destination uid) pairs."""

    # -- notifications (IDLE) --
    def add_listener(self, folder_id: int, listener: Callable[[int], None]) -> None: ...
    def remove_listener(self, folder_id: int, listener: Callable[[int], None]) -> None: ...
