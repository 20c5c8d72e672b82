"""Disk full during DATA (security.md §6 'disk full'): `452 4.3.1`, never a 5xx nor a 250 for a message
that was not stored; what was acknowledged before is still delivered; mail is accepted again once space
returns.

The state folder lives on a small tmpfs that the test fills. Where mounting is not allowed, the fault
shim makes writes under the state folder fail with ENOSPC instead.
"""

from __future__ import annotations

import collections
import errno
import os
import smtplib
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.harness import (
    FaultControl,
    FaultServer,
    message,
    queue_states,
    reply_of,
    send_one,
    wait_for_ids,
    wait_until,
)

pytestmark = pytest.mark.blackbox

SENDERS = 4


class DiskFull:
    """Fills the filesystem of the state folder, then frees it."""

    def __init__(self, mount: Path | None, control: FaultControl) -> None:
        self.mount = mount
        self.control = control
        self.filler = mount / "filler" if mount else None

    def fill(self) -> int:
        if self.filler is None:
            self.control.set("write=ENOSPC")
            return 0
        written = 0
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            chunk = 1 << 20
            while chunk:
                try:
                    written += os.write(fd, b"\0" * chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    chunk //= 2
        finally:
            os.close(fd)
        return written

    def free(self) -> None:
        if self.filler is None:
            self.control.clear()
        else:
            self.filler.unlink()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path | None]:
    """A 32 MiB tmpfs, or None where this machine does not let the test mount one."""
    mount = tmp_path / "fs"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m,mode=0700", "tmpfs", str(mount)],
                       check=False, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"cannot mount a tmpfs ({r.stderr.strip()}): ENOSPC comes from the shim")
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_disk_full_during_data_answers_452_and_loses_nothing(tmp_path: Path, small_fs: Path | None, shim: Path,
                                                             control: FaultControl) -> None:
    started = time.monotonic()
    server = FaultServer.make((small_fs or tmp_path) / "state")
    if small_fs is None:
        server.preload(shim, control, write=True)
    disk = DiskFull(small_fs, control)
    server.start()
    alice, bob = server.identity("PER", 0), server.identity("PER", 1)
    phase = ["before"]
    # (phase when the message was started / when its reply came, message id, code, enhanced code)
    results: list[tuple[str, str, int, str]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def sender(n: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                s = server.smtp(alice)
            except (OSError, smtplib.SMTPException):
                time.sleep(0.05)
                continue
            try:
                while not stop.is_set():
                    mid, sent_in = f"s{n}m{i}", phase[0]
                    i += 1
                    try:
                        code, text = send_one(s, alice["address"], bob["address"],
                                              message(alice["address"], bob["address"], mid))
                    except smtplib.SMTPResponseException as exc:
                        got = reply_of(exc)
                        code, text = got if got else (exc.smtp_code, "")
                    with lock:
                        results.append((f"{sent_in}/{phase[0]}", mid, code, text.split()[0] if text else ""))
            except (OSError, smtplib.SMTPException) as exc:
                got = reply_of(exc)
                if got:
                    with lock:
                        results.append((f"?/{phase[0]}", f"s{n}m{i}", got[0], got[1].split()[0]))
            finally:
                try:
                    s.close()
                except OSError:
                    pass

    def count(in_phase: str, code: int) -> int:
        with lock:
            return sum(1 for p, _, c, _ in results if p == f"{in_phase}/{in_phase}" and c == code)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(SENDERS)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: count("before", 250) >= 20, 30, "20 messages accepted")
        filled = disk.fill()
        phase[0] = "full"
        wait_until(lambda: count("full", 452) >= 20, 30, "20 messages refused with 452")
        pending = queue_states(server.state)["queued"]  # acknowledged, not yet in the mailbox
        disk.free()
        phase[0] = "after"
        wait_until(lambda: count("after", 250) >= 20, 30, "20 messages accepted once space returned")
    finally:
        stop.set()
        for t in threads:
            t.join(20)
        control.clear()

    by_phase: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for p, _, c, e in results:
        by_phase[p][f"{c} {e}"] += 1
    print(f"\nfiller={filled} bytes; acknowledged but undelivered while full: {pending}")
    print(f"replies by phase at start/at reply: { {p: dict(c) for p, c in by_phase.items()} }")
    acked = {mid for _, mid, c, _ in results if c == 250}
    refused = {mid for _, mid, c, _ in results if c != 250}
    assert not [r for r in results if r[2] >= 500], "a permanent failure for a temporary condition"
    # A message sent and answered while the disk was full: 452 4.3.1 (at least the 20 waited for above).
    # A 250 too where its rows fit in space the database already holds: SQLite writes its log again from
    # the start after a checkpoint, into pages the file has, so a burst before the fill can leave room
    # for many more (seen under load: 125 of 157); such a message is stored, and is checked below to
    # be delivered like every acknowledged one. Before and after: 250. (One that straddles a switch may
    # get either.)
    assert set(by_phase["full/full"]) <= {"452 4.3.1", "250 2.0.0"}, by_phase["full/full"]
    assert by_phase["full/full"]["452 4.3.1"] >= 20
    assert set(by_phase["before/before"]) == {"250 2.0.0"} == set(by_phase["after/after"])

    try:
        seen = wait_for_ids(server, bob, acked)
        duplicates = sum(v - 1 for v in seen.values() if v > 1)
        print(f"acknowledged={len(acked)} refused={len(refused)} delivered={sum(seen.values())} "
              f"duplicates={duplicates} refused-but-delivered={len(set(seen) & refused)}")
        assert duplicates == 0
        assert not set(seen) & refused, "a message answered 452 was delivered"
    finally:
        assert server.stop() == 0
    print(f"runtime {time.monotonic() - started:.1f} s")
