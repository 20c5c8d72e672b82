"""SMTP acceptor processes (`[server] smtp_processes`, caducee.acceptors): a second process accepts on the
node's sockets and commits to the same SQLite database; the node delivers what it accepted; killing it
loses nothing acknowledged and the node starts it again; it dies with the node and stops with it."""

from __future__ import annotations

import collections
import os
import re
import signal
import smtplib
import threading
import time
from pathlib import Path

import pytest

from tests.faults.harness import (
    FaultServer,
    delivery_counts,
    mailbox_counts,
    message,
    wait_until,
)

pytestmark = pytest.mark.blackbox

_PID = re.compile(r"event=acceptor_ready acceptor=1 pid=(\d+)")


def _acceptor_pids(server: FaultServer) -> list[int]:
    return [int(m.group(1)) for line in server.log if (m := _PID.search(line))]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _node(tmp_path: Path) -> FaultServer:
    server = FaultServer.make(tmp_path / "state", {"server": {"smtp_processes": "2"}})
    server.start()
    wait_until(lambda: _acceptor_pids(server), 10, "the acceptor")
    return server


def test_the_acceptor_takes_connections_the_node_cannot_and_the_node_delivers_them(tmp_path: Path) -> None:
    server = _node(tmp_path)
    alice, bob = server.identity("PER", 0), server.identity("PER", 1)
    assert server.proc is not None
    (acceptor,) = _acceptor_pids(server)
    assert acceptor != server.proc.pid and _alive(acceptor)
    os.kill(server.proc.pid, signal.SIGSTOP)  # the node accepts nothing now: only the acceptor can answer
    try:
        for n in range(3):
            s = server.smtp(alice)
            try:
                assert s.sendmail(alice["address"], [bob["address"]],
                                  message(alice["address"], bob["address"], f"acc-{n}")) == {}
            finally:
                s.quit()
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    # The acceptor's commits woke the node's delivery: all three reach the mailbox once, whole.
    wait_until(lambda: mailbox_counts(server, bob) == {"acc-0": 1, "acc-1": 1, "acc-2": 1}, 10,
               "the three messages in the mailbox")
    assert server.stop() == 0
    assert not _alive(acceptor)
    stopped = [line for line in server.log if "event=acceptor_stopped" in line]
    assert len(stopped) == 1 and "[smtp-1]" in stopped[0] and " accepted=3 " in stopped[0]
    assert server.caducee("audit", "verify").returncode == 0


def test_sigkill_of_the_acceptor_under_load_loses_nothing_and_it_is_started_again(tmp_path: Path) -> None:
    server = _node(tmp_path)
    alice, bob = server.identity("PER", 0), server.identity("PER", 1)
    (first,) = _acceptor_pids(server)
    acknowledged: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def sender(k: int) -> None:
        i = 0
        while not stop.is_set():  # a new connection per message: both processes take some
            mid = f"k{k}m{i}"
            i += 1
            try:
                s = server.smtp(alice)
                s.sendmail(alice["address"], [bob["address"]], message(alice["address"], bob["address"], mid))
            except (OSError, smtplib.SMTPException):
                continue  # cut by the kill: not acknowledged, may be sent again under a new name
            with lock:
                acknowledged.append(mid)
            try:
                s.quit()
            except (OSError, smtplib.SMTPException):
                pass

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(acknowledged) >= 30, 60, "30 messages acknowledged")
        os.kill(first, signal.SIGKILL)
        # The node notices, starts another, and the traffic goes on through both.
        wait_until(lambda: len(_acceptor_pids(server)) == 2, 15, "a new acceptor")
        count = len(acknowledged)
        wait_until(lambda: len(acknowledged) >= count + 30, 60, "30 more acknowledged")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert server.count_log("event=acceptor_exited acceptor=1") == 1
    assert server.count_log("status=signal:SIGKILL") == 1
    second = _acceptor_pids(server)[1]
    assert second != first and _alive(second)

    acked = set(acknowledged)
    assert len(acked) == len(acknowledged)

    def all_in() -> collections.Counter[str] | None:
        counts = mailbox_counts(server, bob)
        return counts if acked <= set(counts) else None

    seen = wait_until(all_in, 30, "every acknowledged message in the mailbox")
    assert {k: v for k, v in seen.items() if v != 1} == {}
    # Only what was in flight at the kill (at most one per session) may be stored without its 250.
    assert len(set(seen) - acked) <= len(threads)
    assert server.stop() == 0
    stored, marked = delivery_counts(server.state)
    assert stored == marked == len(seen)
    assert server.caducee("audit", "verify").returncode == 0


def test_the_acceptor_dies_with_a_killed_node_and_the_restarted_node_can_listen(tmp_path: Path) -> None:
    server = _node(tmp_path)
    (acceptor,) = _acceptor_pids(server)
    server.kill()
    wait_until(lambda: not _alive(acceptor), 10, "the acceptor gone")  # nobody left holding the node's ports
    server.log.clear()
    server.start()  # binds the same ports again
    try:
        wait_until(lambda: _acceptor_pids(server), 10, "the new acceptor")
        alice, bob = server.identity("PER", 0), server.identity("PER", 1)
        s = server.smtp(alice)
        assert s.sendmail(alice["address"], [bob["address"]], message(alice["address"], bob["address"], "after")) == {}
        s.quit()
        wait_until(lambda: mailbox_counts(server, bob) == {"after": 1}, 10, "the message in the mailbox")
    finally:
        assert server.stop() == 0


def test_sigterm_lets_the_acceptor_finish_a_message_in_data(tmp_path: Path) -> None:
    server = _node(tmp_path)
    alice, bob = server.identity("PER", 0), server.identity("PER", 1)
    assert server.proc is not None
    (acceptor,) = _acceptor_pids(server)
    os.kill(server.proc.pid, signal.SIGSTOP)  # so that the session is the acceptor's
    try:
        s = server.smtp(alice)
        assert s.mail(alice["address"])[0] == 250 and s.rcpt(bob["address"])[0] == 250
        s.putcmd("data")
        assert s.getreply()[0] == 354
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    server.terminate()
    time.sleep(0.5)  # the acceptor got its SIGTERM and waits for this session's dot
    assert _alive(acceptor)
    s.send(message(alice["address"], bob["address"], "in-data") + b".\r\n")
    try:
        assert s.getreply()[0] == 250
    finally:
        s.close()
    assert server.wait_exit(60) == 0
    assert not _alive(acceptor)
    server.start()
    try:
        wait_until(lambda: mailbox_counts(server, bob) == {"in-data": 1}, 10, "the message in the mailbox")
    finally:
        assert server.stop() == 0
