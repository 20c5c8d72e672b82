"""SIGTERM with 50 sessions inside DATA (security.md §6 'graceful shutdown').

The server stops listening at once; idle sessions get 421; a session inside DATA may finish within the
grace (30 s) and gets its 250 — or closes, or stalls and gets 421 when the grace is over. The process
then exits 0. Every message that got 250 is delivered exactly once (after a restart if need be); no other
is.
"""

from __future__ import annotations

import collections
import smtplib
import threading
import time
from pathlib import Path

import pytest

from tests.faults.harness import (
    FaultServer,
    message,
    reply_of,
    wait_for_ids,
    wait_until,
)

pytestmark = pytest.mark.blackbox

FINISH, ABORT, STALL, IDLE = 35, 10, 5, 5  # the first three are inside DATA when SIGTERM comes
GRACE = 30  # mailserver.smtp_protocol.shutdown


def test_sigterm_with_50_sessions_in_data_loses_nothing_acknowledged(tmp_path: Path) -> None:
    started = time.monotonic()
    server = FaultServer.make(tmp_path / "state")
    server.start()
    alice, bob = server.identity("PER", 0), server.identity("PER", 1)
    roles = ["finish"] * FINISH + ["abort"] * ABORT + ["stall"] * STALL + ["idle"] * IDLE
    ready = threading.Semaphore(0)
    go = threading.Event()
    outcome: dict[int, str] = {}
    lock = threading.Lock()

    def session(n: int, role: str) -> None:
        result = "no session"
        s: smtplib.SMTP | None = None
        try:
            s = server.smtp(alice)
            assert s.sock is not None
            s.sock.settimeout(GRACE + 30)
            if role != "idle":
                data = message(alice["address"], bob["address"], f"m{n}")
                assert s.mail(alice["address"])[0] == 250 and s.rcpt(bob["address"])[0] == 250
                s.putcmd("data")
                assert s.getreply()[0] == 354
                s.send(data)  # all but the final dot: inside DATA
            ready.release()
            go.wait()
            if role == "finish":
                s.send(b".\r\n")
            elif role == "abort":
                s.sock.close()
                result = "closed before the dot"
                return
            code, text = s.getreply()  # idle and stalled sessions wait for what the server says
            result = f"{code} {text.decode().split()[0]}"
        except (OSError, smtplib.SMTPException) as exc:
            got = reply_of(exc)
            result = f"{got[0]} {got[1].split()[0]}" if got else f"disconnected ({type(exc).__name__})"
        finally:
            with lock:
                outcome[n] = result
            if s is not None:
                s.close()

    threads = [threading.Thread(target=session, args=(n, role)) for n, role in enumerate(roles)]
    for t in threads:
        t.start()
    for _ in roles:
        assert ready.acquire(timeout=60), "sessions not ready"
    terminated = time.monotonic()
    server.terminate()
    wait_until(lambda: server.count_log("event=stopping"), 10, "the server to begin its shutdown")
    go.set()
    status = server.wait_exit(GRACE + 30)
    exited = time.monotonic() - terminated
    for t in threads:
        t.join(GRACE + 30)

    by_role = {role: collections.Counter(outcome[n] for n, r in enumerate(roles) if r == role)
               for role in ("finish", "abort", "stall", "idle")}
    print(f"\nexit status={status} after {exited:.1f} s; replies by role: { {r: dict(c) for r, c in by_role.items()} }")
    assert status == 0 and any("event=stopped" in line for line in server.log)
    assert exited < GRACE + 10
    assert by_role["finish"] == {"250 2.0.0": FINISH}
    assert by_role["idle"] == {"421 4.3.2": IDLE}
    assert by_role["stall"] == {"421 4.3.2": STALL}
    acked = {f"m{n}" for n, r in enumerate(roles) if outcome[n].startswith("250")}

    server.start()
    try:
        seen = wait_for_ids(server, bob, acked)
        print(f"acknowledged={len(acked)} delivered={sum(seen.values())} "
              f"duplicates={sum(v - 1 for v in seen.values())} unacknowledged delivered={len(set(seen) - acked)}")
        assert set(seen) == acked and all(v == 1 for v in seen.values())
    finally:
        assert server.stop() == 0
    print(f"runtime {time.monotonic() - started:.1f} s")
