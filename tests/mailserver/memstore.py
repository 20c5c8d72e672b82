"""An in-memory ``MailStore`` for the IMAP server tests.

Reads are synchronous and writes are coroutines, as in the real store.  Listeners are told about new
messages (append, and the destination of copy/move).  ``faults`` makes the next call of a named method
raise, to check how the server reports internal errors.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Sequence

from mailserver.store_api import FlagMode, FolderInfo, StoredMessage


@dataclass
class _Folder:
    id: int
    mailbox_id: int
    name: str
    uidvalidity: int
    uidnext: int = 1
    messages: dict[int, StoredMessage] = field(default_factory=dict)


class MemoryMailStore:
    """Folders, messages and blobs in dictionaries; not thread-safe (use it from the reactor thread)."""

    def __init__(self) -> None:
        self._folders: dict[int, _Folder] = {}
        self._blobs: dict[str, bytes] = {}
        self._listeners: dict[int, list[Callable[[int], None]]] = {}
        self._next_folder = 1
        self.faults: dict[str, Exception] = {}
        self.calls: collections.Counter[str] = collections.Counter()  # calls per method, for batching tests

    # -- test helpers --
    def add_mailbox(self, mailbox_id: int) -> FolderInfo:
        """Create the INBOX of a directory mailbox."""
        return self._new_folder(mailbox_id, "INBOX")

    def listener_count(self, folder_id: int) -> int:
        return len(self._listeners.get(folder_id, []))

    def _fault(self, name: str) -> None:
        self.calls[name] += 1
        exc = self.faults.pop(name, None)
        if exc is not None:
            raise exc

    def _new_folder(self, mailbox_id: int, name: str) -> FolderInfo:
        folder = _Folder(self._next_folder, mailbox_id, name, uidvalidity=1_700_000_000 + self._next_folder)
        self._folders[folder.id] = folder
        self._next_folder += 1
        return self._info(folder)

    def _info(self, folder: _Folder) -> FolderInfo:
        msgs = folder.messages.values()
        return FolderInfo(
            id=folder.id,
            mailbox_id=folder.mailbox_id,
            name=folder.name,
            uidvalidity=folder.uidvalidity,
            uidnext=folder.uidnext,
            exists=len(folder.messages),
            unseen=sum(1 for m in msgs if "\\Seen" not in m.flags),
        )

    def _notify(self, folder_id: int) -> None:
        for listener in list(self._listeners.get(folder_id, [])):
            listener(folder_id)

    def _put(self, folder: _Folder, raw_blob: str, size: int, flags: Iterable[str],
             internaldate: dt.datetime | None) -> int:
        uid = folder.uidnext
        folder.uidnext += 1
        folder.messages[uid] = StoredMessage(
            uid=uid,
            size=size,
            internaldate=internaldate or dt.datetime.now(dt.timezone.utc).replace(microsecond=0),
            flags=frozenset(flags),
            blob=raw_blob,
        )
        return uid

    # -- reads --
    def list_folders(self, mailbox_id: int) -> list[FolderInfo]:
        self._fault("list_folders")
        return [self._info(f) for f in self._folders.values() if f.mailbox_id == mailbox_id]

    def get_folder(self, mailbox_id: int, name: str) -> FolderInfo | None:
        self._fault("get_folder")
        for f in self._folders.values():
            if f.mailbox_id != mailbox_id:
                continue
            if f.name == name or (name.upper() == "INBOX" and f.name == "INBOX"):
                return self._info(f)
        return None

    def messages(self, folder_id: int, uids: Sequence[int] | None = None) -> list[StoredMessage]:
        self._fault("messages")
        folder = self._folders.get(folder_id)
        if folder is None:
            return []
        wanted = sorted(folder.messages) if uids is None else sorted(set(uids) & folder.messages.keys())
        return [folder.messages[uid] for uid in wanted]

    def message_flags(self, folder_id: int, after: int = 0) -> list[tuple[int, frozenset[str]]]:
        return [(m.uid, m.flags) for m in self.messages(folder_id) if m.uid > after]

    def message_count(self, folder_id: int, up_to: int | None = None) -> int:
        return sum(1 for m in self.messages(folder_id) if up_to is None or m.uid <= up_to)

    def read_blob(self, blob: str) -> bytes:
        self._fault("read_blob")
        return self._blobs[blob]

    def read_small(self, blobs: Sequence[str]) -> dict[str, bytes]:
        self._fault("read_small")
        return {b: self._blobs[b] for b in blobs if b in self._blobs and len(self._blobs[b]) <= 64 * 1024}

    def read_header(self, blob: str) -> bytes:
        self._fault("read_header")
        from mailserver.imap_server import split_message

        return split_message(self.read_blob(blob))[0]

    # -- writes --
    async def create_folder(self, mailbox_id: int, name: str) -> FolderInfo:
        self._fault("create_folder")
        if self.get_folder(mailbox_id, name) is not None:
            raise ValueError("folder exists")
        return self._new_folder(mailbox_id, name)

    async def delete_folder(self, folder_id: int) -> None:
        self._fault("delete_folder")
        del self._folders[folder_id]

    async def rename_folder(self, folder_id: int, new_name: str) -> None:
        self._fault("rename_folder")
        self._folders[folder_id].name = new_name

    async def append(self, folder_id: int, raw: bytes, flags: Iterable[str],
                     internaldate: dt.datetime | None) -> int:
        self._fault("append")
        blob = hashlib.sha256(raw).hexdigest()
        self._blobs[blob] = raw
        uid = self._put(self._folders[folder_id], blob, len(raw), flags, internaldate)
        self._notify(folder_id)
        return uid

    async def set_flags(self, folder_id: int, uids: Iterable[int], flags: Iterable[str],
                        mode: FlagMode) -> dict[int, frozenset[str]]:
        self._fault("set_flags")
        folder = self._folders[folder_id]
        wanted = frozenset(flags)
        out: dict[int, frozenset[str]] = {}
        for uid in uids:
            msg = folder.messages.get(uid)
            if msg is None:
                continue
            if mode == "set":
                new = wanted
            elif mode == "add":
                new = msg.flags | wanted
            else:
                new = msg.flags - wanted
            folder.messages[uid] = replace(msg, flags=new)
            out[uid] = new
        return out

    async def expunge(self, folder_id: int, uids: Iterable[int] | None = None) -> list[int]:
        self._fault("expunge")
        folder = self._folders[folder_id]
        allowed = None if uids is None else set(uids)
        removed = [uid for uid, m in sorted(folder.messages.items())
                   if "\\Deleted" in m.flags and (allowed is None or uid in allowed)]
        for uid in removed:
            del folder.messages[uid]
        return removed

    async def copy(self, folder_id: int, uids: Iterable[int], dest_folder_id: int) -> list[tuple[int, int]]:
        self._fault("copy")
        source, dest = self._folders[folder_id], self._folders[dest_folder_id]
        pairs = []
        for uid in sorted(uids):
            msg = source.messages.get(uid)
            if msg is not None:
                pairs.append((uid, self._put(dest, msg.blob, msg.size, msg.flags, msg.internaldate)))
        if pairs:
            self._notify(dest_folder_id)
        return pairs

    async def move(self, folder_id: int, uids: Iterable[int], dest_folder_id: int) -> list[tuple[int, int]]:
        self._fault("move")
        pairs = await self.copy(folder_id, uids, dest_folder_id)
        for uid, _ in pairs:
            del self._folders[folder_id].messages[uid]
        return pairs

    # -- notifications --
    def add_listener(self, folder_id: int, listener: Callable[[int], None]) -> None:
        self._listeners.setdefault(folder_id, []).append(listener)

    def remove_listener(self, folder_id: int, listener: Callable[[int], None]) -> None:
        listeners = self._listeners.get(folder_id, [])
        if listener in listeners:
            listeners.remove(listener)
