"""The database restarts under load (security.md §6 'DB restart'): a private PostgreSQL cluster is
crashed (`pg_ctl stop -m immediate`, in-flight transactions lost) and later stopped cleanly (`-m fast`,
sessions terminated mid-transaction) while clients send. During each outage clients get temporary
failures (4xx), never 5xx; no delivery report is generated; once the database is back mail flows, and
every message that got 250 is delivered exactly once.

A message whose COMMIT reached the database just before the connection broke may have been answered
451 and still be stored: the client's retry then makes a duplicate, which RFC 5321 §6.1 accepts rather
than a loss. The test counts such messages and checks none is delivered twice.
"""

from __future__ import annotations

import collections
import smtplib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.harness import (
    FaultServer,
    PrivatePostgres,
    message,
    queue_states,
    reply_of,
    reports_in,
    send_one,
    wait_for_ids,
    wait_until,
)

pytestmark = pytest.mark.blackbox

SENDERS = 6
PER_SESSION = 5
OUTAGES = [("crash", "immediate"), ("restart", "fast")]


@pytest.fixture
def postgres() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    try:
        pg.start()
        yield pg
    finally:
        pg.close()


def test_database_restart_gives_temporary_failures_and_loses_nothing(tmp_path: Path, postgres: PrivatePostgres) -> None:
    started = time.monotonic()
    url = postgres.create_database("caducee")
    server = FaultServer.make(tmp_path / "state", {"database": {"url": f'"{url}"'}})
    server.start()
    alice, bob = server.identity("PER", 0), server.identity("PER", 1)
    phase = ["up"]
    results: list[tuple[str, str, str]] = []  # (phase at start/at reply, message id, reply)
    lock = threading.Lock()
    stop = threading.Event()

    def record(sent_in: str, mid: str, reply: str) -> None:
        with lock:
            results.append((f"{sent_in}/{phase[0]}", mid, reply))

    def sender(n: int) -> None:
        i = 0
        while not stop.is_set():
            sent_in = phase[0]
            try:
                s = server.smtp(alice)
            except (OSError, smtplib.SMTPException) as exc:  # AUTH reads the directory: 451 while it is down
                got = reply_of(exc)
                record(sent_in, f"s{n}login{i}", f"{got[0]} {got[1].split()[0]}" if got else "no session")
                i += 1
                time.sleep(0.05)
                continue
            try:
                for _ in range(PER_SESSION):
                    if stop.is_set():
                        break
                    mid, sent_in = f"s{n}m{i}", phase[0]
                    i += 1
                    try:
                        code, text = send_one(s, alice["address"], bob["address"],
                                              message(alice["address"], bob["address"], mid))
                        record(sent_in, mid, f"{code} {text.split()[0]}")
                    except smtplib.SMTPResponseException as exc:
                        got = reply_of(exc)
                        record(sent_in, mid, f"{got[0]} {got[1].split()[0]}" if got else "no reply")
                s.quit()
            except (OSError, smtplib.SMTPException):
                record(sent_in, f"s{n}m{i}", "no reply")
            finally:
                s.close()

    def count(where: str, prefix: str) -> int:
        with lock:
            return sum(1 for p, _, r in results if p == where and r.startswith(prefix))

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(SENDERS)]
    for t in threads:
        t.start()
    try:
        for outage, mode in OUTAGES:
            wait_until(lambda: count(f"{phase[0]}/{phase[0]}", "250") >= 20, 60, "20 messages accepted")
            phase[0] = f"stopping-{outage}"  # pg_ctl takes a moment: the label changes before and after
            postgres.stop(mode)  # with transactions in flight
            phase[0] = outage
            wait_until(lambda o=outage: count(f"{o}/{o}", "4") >= 15, 30, f"15 temporary failures ({outage})")
            phase[0] = f"starting-{outage}"
            postgres.start()
            phase[0] = f"after-{outage}"
        wait_until(lambda: count(f"{phase[0]}/{phase[0]}", "250") >= 20, 60, "20 messages accepted at the end")
    finally:
        stop.set()
        for t in threads:
            t.join(30)

    by_phase: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for p, _, r in results:
        by_phase[p][r] += 1
    print("\nreplies by phase at start/at reply:")
    for p, c in by_phase.items():
        print(f"  {p}: {dict(c)}")
    assert not [r for r in results if r[2].startswith("5")], "a permanent failure for a temporary condition"
    for outage, _ in OUTAGES:  # down the whole time: 451, every one; up the whole time: 250
        assert set(by_phase[f"{outage}/{outage}"]) == {"451 4.3.0"}, by_phase[f"{outage}/{outage}"]
        assert set(by_phase[f"after-{outage}/after-{outage}"]) == {"250 2.0.0"}
    assert set(by_phase["up/up"]) == {"250 2.0.0"}
    acked = {mid for _, mid, r in results if r.startswith("250")}
    refused = {mid for _, mid, r in results if not r.startswith("250") and "login" not in mid}
    try:
        seen = wait_for_ids(server, bob, acked, timeout=40)
        wait_until(lambda: not queue_states(server.state)["queued"], 20, "the queue to drain")
        states = queue_states(server.state)
        print(f"acknowledged={len(acked)} refused={len(refused)} delivered={sum(seen.values())} "
              f"duplicates={sum(v - 1 for v in seen.values())} refused-but-stored={len(set(seen) & refused)} "
              f"queue={dict(states)} reports to the sender={reports_in(server, alice)}")
        assert all(v == 1 for v in seen.values())
        assert set(seen) <= acked | refused
        assert set(states) <= {"delivered"}  # nothing failed, no report pending
        assert reports_in(server, alice) == 0  # no bounce
    finally:
        assert server.stop() == 0
    print(f"runtime {time.monotonic() - started:.1f} s")
