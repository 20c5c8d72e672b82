"""SIGKILL at chosen points (security.md §6 'kill -9 before and after 250'), with the fault shim choosing
the instant: the process kills itself inside the Nth fsync of a given file, so the crash lands exactly
where the queue and the mailbox writes are most fragile.

1. Many sessions send their final dot at once, and the server dies while storing them: inside a body's
   fsync, inside the flush of the shard directories before COMMIT, or inside the COMMIT's own fsync
   (tests/blackbox/test_crash.py kills at a random instant under load; this kills mid-burst on purpose).
   Every message that got 250 is delivered exactly once; a message stored whose 250 never left (the
   commit had reached the disk) is delivered once too — the client, seeing no reply, may send it again:
   RFC 5321 §6.1 prefers that duplicate to a loss.
2. Local delivery of a backlog is killed four times: inside the COMMIT (before and after its frames reach
   the WAL), then in later batches' COMMITs. After each crash the mailboxes and the queue agree, and in
   the end each message is in the mailbox exactly once, whole.
"""

from __future__ import annotations

import collections
import signal
import smtplib
import threading
import time
from pathlib import Path

import pytest

from tests.faults.harness import (
    FaultControl,
    FaultServer,
    delivery_counts,
    enqueue_offline,
    mailbox_counts,
    message,
    queue_states,
    reply_of,
    wait_for_ids,
    wait_until,
)

pytestmark = pytest.mark.blackbox

SESSIONS = 40
KILLED = -signal.SIGKILL


# A body above `[storage] inline_max` (64 KiB) is a file, fsynced, renamed, its directory flushed before
# COMMIT; a smaller one is a row of the COMMIT itself (mailserver.blobs).
LINES_FILE, LINES_ROW = 2000, 40  # ~100 KB and ~2 KB messages


@pytest.mark.parametrize("where, directive, lines", [
    ("body fsync", "kill=15:file:/blobs/tmp/", LINES_FILE),
    ("flush before COMMIT", "kill=20:dir:/blobs/", LINES_FILE),
    ("COMMIT fsync, bodies in files", "kill=2:file:/caducee.db-wal", LINES_FILE),
    ("COMMIT fsync, bodies in rows", "kill=2:file:/caducee.db-wal", LINES_ROW),
])
def test_sigkill_while_many_final_dots_are_processed(tmp_path: Path, shim: Path, control: FaultControl,
                                                     where: str, directive: str, lines: int) -> None:
    started = time.monotonic()
    server = FaultServer.make(tmp_path / "state")
    server.preload(shim, control)
    server.start()
    alice, bob = server.identity("PER", 0), server.identity("PER", 1)
    ready = threading.Semaphore(0)
    go = threading.Event()
    outcome: dict[str, str] = {}

    def session(n: int) -> None:
        mid = f"dot-{n}"
        try:
            s = server.smtp(alice)
        except (OSError, smtplib.SMTPException):
            outcome[mid] = "no session"
            ready.release()
            return
        try:
            assert s.mail(alice["address"])[0] == 250 and s.rcpt(bob["address"])[0] == 250
            s.putcmd("data")
            assert s.getreply()[0] == 354
            s.send(message(alice["address"], bob["address"], mid, lines))
            ready.release()
            go.wait()
            s.send(b".\r\n")
            code, text = s.getreply()
            outcome[mid] = f"{code} {text.decode().split()[0]}"
        except (OSError, smtplib.SMTPException) as exc:
            got = reply_of(exc)
            outcome[mid] = f"{got[0]}" if got else "no reply"
        finally:
            s.close()

    # A few messages acknowledged before the burst: they must come through the crash too, whichever
    # batch of the burst the kill lands in (a burst may fill one writer batch: no 250 leaves before it).
    before = {f"before-{n}" for n in range(5)}
    s = server.smtp(alice)
    for mid in sorted(before):
        s.sendmail(alice["address"], [bob["address"]], message(alice["address"], bob["address"], mid))
    s.quit()
    threads = [threading.Thread(target=session, args=(n,)) for n in range(SESSIONS)]
    for t in threads:
        t.start()
    for _ in threads:
        assert ready.acquire(timeout=60)
    control.set(directive)
    go.set()  # every session sends its final dot now
    status = server.wait_exit(30)
    for t in threads:
        t.join(30)
    control.clear()
    assert status == KILLED, f"the shim did not kill the server at the {where}"
    acked = {mid for mid, o in outcome.items() if o.startswith("250")} | before
    counts = collections.Counter(outcome.values())

    server.start()
    try:
        seen = wait_for_ids(server, bob, acked)
        wait_until(lambda: not queue_states(server.state)["queued"], 20, "the queue to drain")
        seen = mailbox_counts(server, bob)
        unacked = set(seen) - acked
        print(f"\nkilled in the {where}: replies {dict(counts)}; after restart delivered={sum(seen.values())} "
              f"(acknowledged {len(acked)}, stored without a 250: {len(unacked)}), "
              f"duplicates={sum(v - 1 for v in seen.values())}")
        assert all(v == 1 for v in seen.values())
        assert acked <= set(seen)
        assert set(counts) <= {"250 2.0.0", "no reply"}
    finally:
        assert server.stop() == 0
    print(f"runtime {time.monotonic() - started:.1f} s")


BACKLOG = 600
# A mailbox entry points at the queued blob (which holds the Return-Path already): delivery writes no file,
# it commits mailbox entries and recipient states in one transaction per batch of 200. With
# synchronous=FULL a COMMIT that starts a new WAL cycle syncs the WAL header first (before any frame: a
# kill there loses the batch, which nobody was told of), then the frames (a kill there keeps the batch:
# the frames are written, and a process crash does not lose the page cache — committed, though the worker
# never learnt it).
CRASHES = [
    ("COMMIT, syncing the WAL header", "kill=1:file:/caducee.db-wal"),
    ("COMMIT, syncing the written frames", "kill=2:file:/caducee.db-wal"),
    ("a later batch's COMMIT", "kill=2:file:/caducee.db-wal"),
    ("the COMMIT of the batch after", "kill=2:file:/caducee.db-wal"),
]


def test_sigkill_during_local_delivery_delivers_each_message_once(tmp_path: Path, shim: Path,
                                                                 control: FaultControl) -> None:
    started = time.monotonic()
    server = FaultServer.make(tmp_path / "state")
    server.preload(shim, control)
    alice, bob = server.identity("PER", 0), server.identity("PER", 1)
    mids = [f"backlog-{i}" for i in range(BACKLOG)]
    enqueue_offline(server.state, [(alice["address"], [bob["address"]], message(alice["address"], bob["address"], m))
                                   for m in mids], principal=alice["national_id"])
    history = []
    for where, directive in CRASHES:
        control.set(directive)  # armed before the start: the backlog is delivered at once
        server.start(wait_ready=False)
        status = server.wait_exit(60)
        assert status == KILLED, f"the shim did not kill the server in {where}:\n" + "\n".join(server.log[-20:])
        stored, marked = delivery_counts(server.state)
        history.append((where, stored))
        assert stored == marked, f"after a kill while {where}: {stored} mailbox entries, {marked} marked"
    control.clear()
    print("\n" + "\n".join(f"killed in {w}: {n} delivered so far (mailboxes and queue agree)" for w, n in history))
    assert [n for _, n in history] == sorted(n for _, n in history)

    server.start()
    try:
        seen = wait_for_ids(server, bob, set(mids), timeout=40)
        print(f"after the last restart: delivered={sum(seen.values())} of {BACKLOG}, "
              f"duplicates={sum(v - 1 for v in seen.values())}")
        assert seen == {m: 1 for m in mids}
    finally:
        assert server.stop() == 0
    print(f"runtime {time.monotonic() - started:.1f} s")
