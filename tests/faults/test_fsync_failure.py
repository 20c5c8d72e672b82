"""fsync() and close() failing with EIO on the queue's files (security.md §6 'fsync failure').

The real server runs with the fault shim preloaded; while a fault is in force every message gets
`451 4.3.0` — never `250` — and nothing is left half-written where it could be read: no queue row, no
mailbox entry, no blob under a wrong name. Once the fault stops, mail flows again in the same session
(RFC 5321 §4.1.1.4: the transaction ended with the reply, whatever it was).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from tests.faults.harness import (
    FaultControl,
    FaultServer,
    inline_bodies,
    message,
    referenced_blobs,
    send_one,
    wait_for_ids,
)

pytestmark = pytest.mark.blackbox

PER_PHASE = 4
LINES_FILE, LINES_ROW = 2000, 40  # ~100 KB: a body in a file (above inline_max); ~2 KB: a database row
# (phase, shim directive, message size): the blob file's fsync, the shard directory's fsync (the flush
# just before COMMIT), the database's fsync (SQLite WAL: the COMMIT itself, with the body in a file and
# with the body in the row it commits), the blob file's close.
PHASES = [
    ("before", None, LINES_ROW),
    ("blob-fsync", "fsync=EIO:file:/blobs/", LINES_FILE),
    ("dir-fsync", "fsync=EIO:dir:/blobs/", LINES_FILE),
    ("db-fsync", "fsync=EIO:any:/caducee.db", LINES_FILE),
    ("db-fsync-row", "fsync=EIO:any:/caducee.db", LINES_ROW),
    ("blob-close", "close=EIO:file:/blobs/", LINES_FILE),
    ("after", None, LINES_FILE),
]


def test_fsync_and_close_failures_answer_451_and_acknowledge_nothing(tmp_path: Path, shim: Path,
                                                                      control: FaultControl) -> None:
    started = time.monotonic()
    server = FaultServer.make(tmp_path / "state")
    server.preload(shim, control)
    server.start()
    alice, bob = server.identity("PER", 0), server.identity("PER", 1)
    replies: dict[str, list[str]] = {}
    acked: list[str] = []
    refused: list[str] = []
    try:
        s = server.smtp(alice)
        try:
            for phase, directive, lines in PHASES:
                if directive:
                    control.set(directive)
                else:
                    control.clear()
                for i in range(PER_PHASE):
                    mid = f"{phase}-{i}"
                    # After a failed DATA the next MAIL comes without RSET: the server must have ended
                    # the transaction itself.
                    code, text = send_one(s, alice["address"], bob["address"],
                                          message(alice["address"], bob["address"], mid, lines))
                    replies.setdefault(phase, []).append(f"{code} {text.split()[0]}")
                    (acked if code == 250 else refused).append(mid)
        finally:
            control.clear()
            s.quit()

        counts = {phase: sorted(set(r)) for phase, r in replies.items()}
        print(f"\nreplies per phase ({PER_PHASE} messages each): {counts}")
        assert counts["before"] == ["250 2.0.0"] and counts["after"] == ["250 2.0.0"]
        for phase, directive, _ in PHASES:
            if directive:
                assert counts[phase] == ["451 4.3.0"], (phase, counts[phase])

        seen = wait_for_ids(server, bob, set(acked))
        print(f"acknowledged={len(acked)} refused={len(refused)} in mailbox={sum(seen.values())} "
              f"duplicates={sum(v - 1 for v in seen.values() if v > 1)}")
        faulty = sum(1 for _, directive, _ in PHASES if directive)
        assert len(acked) == (len(PHASES) - faulty) * PER_PHASE and len(refused) == faulty * PER_PHASE
        assert all(seen[mid] == 1 for mid in acked)
        assert not set(seen) & set(refused), "a message answered 451 was delivered"
        queued = server.caducee("queue", "list", "--all").stdout
        assert queued.count("\n") == len(acked), queued  # one recipient row per acknowledged message

        # Nothing half-written where it can be read: every blob under its name is whole, and no
        # temporary file was left behind by a failed write.
        blobs = server.state / "blobs"
        shards = [p for p in blobs.glob("[0-9a-f][0-9a-f]/*")]
        bad = [p.name for p in shards if hashlib.sha256(p.read_bytes()).hexdigest() != p.name]
        leftovers = list((blobs / "tmp").iterdir())
        # A blob renamed into place before its batch failed (shard flush or COMMIT) is whole and unused.
        orphans = {p.name for p in shards} - referenced_blobs(server.state)
        # A body held as a row commits with its queue entry or not at all: whole, and always referenced.
        rows = inline_bodies(server.state)
        bad_rows = [a for a, data in rows.items() if hashlib.sha256(data).hexdigest() != a]
        unreferenced_rows = set(rows) - referenced_blobs(server.state)
        print(f"blobs={len(shards)} corrupt={len(bad)} temporary files left={len(leftovers)} "
              f"whole but unreferenced={len(orphans)}; rows={len(rows)} corrupt={len(bad_rows)} "
              f"unreferenced={len(unreferenced_rows)}")
        assert not bad and not leftovers
        assert rows and not bad_rows and not unreferenced_rows
        verify = server.caducee("audit", "verify", check=False)
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        if server.proc is not None and server.proc.poll() is None:
            assert server.stop() == 0
    print(f"runtime {time.monotonic() - started:.1f} s")
