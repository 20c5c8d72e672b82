"""Corrupt queue entries (security.md §6 'corrupt queue entries'): a body truncated, garbled, or gone
from under its queue row — a file for a large body, a database row for a small one (mailserver.blobs).
The entry is quarantined — the body set aside in blobs/quarantine/, its recipients
in the state `quarantined` (shown by `caducee queue list --all`), one log line with the queue id and the
reason and nothing of the content — and the rest of the queue is delivered.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mailserver.testing import free_port
from tests.faults.harness import (
    PEER_DOMAIN,
    FaultServer,
    SmtpPeer,
    database_url,
    enqueue_offline,
    make_relaying_node,
    message,
    queue_blobs,
    queue_rows,
    send_one,
    wait_for_ids,
    wait_until,
)

pytestmark = pytest.mark.blackbox

BACKLOG = 30


LARGE = {2, 17}  # entries with a body too large for a database row: a file
LINES_LARGE = 2000  # ~100 KB, above the default inline_max of 64 KiB


def _body(sender: str, rcpt: str, mid: str, n: int) -> bytes:
    return message(sender, rcpt, mid, lines=LINES_LARGE if n in LARGE else 40)


def _corrupt(server: FaultServer, queue_ids: list[str]) -> dict[str, str]:
    """Truncate, garble and delete bodies, in files (entries 2 and 17) and in rows (12 and 22): queue id →
    what was done."""
    import sqlalchemy as sa

    from mailserver.db import make_engine
    from mailserver.schema import inline_blobs

    blobs = queue_blobs(server.state)
    done = {}
    engine = make_engine(database_url(server.state))
    try:
        for n, how in ((2, "truncated"), (17, "garbled"), (12, "garbled"), (22, "missing")):
            qid = queue_ids[n]
            path = server.state / "blobs" / blobs[qid][:2] / blobs[qid]
            assert path.exists() == (n in LARGE), "a large body is a file, a small one a row"
            where = inline_blobs.c.address == blobs[qid]
            with engine.begin() as conn:
                data = path.read_bytes() if n in LARGE else bytes(
                    conn.execute(sa.select(inline_blobs.c.data).where(where)).scalar_one())
                altered = {"truncated": data[: len(data) // 2],
                           "garbled": data[:100] + bytes([data[100] ^ 0x20]) + data[101:]}.get(how)
                if n in LARGE:
                    path.write_bytes(altered) if altered is not None else path.unlink()
                elif altered is not None:
                    conn.execute(sa.update(inline_blobs).where(where).values(data=altered))
                else:
                    conn.execute(sa.delete(inline_blobs).where(where))
            done[qid] = how
    finally:
        engine.dispose()
    return done


def _check_quarantine(server: FaultServer, corrupted: dict[str, str], secrets: list[bytes]) -> None:
    rows = queue_rows(server.state)
    quarantined = {r["message_id"] for r in rows if r["state"] == "quarantined"}
    assert quarantined == set(corrupted)
    reasons = {r["message_id"]: r["last_error"] for r in rows if r["state"] == "quarantined"}
    for qid, how in corrupted.items():
        expected = "missing" if how == "missing" else "digest_mismatch"
        assert reasons[qid] == f"4.3.0 queue entry corrupt: body {expected}"
    listed = server.caducee("queue", "list", "--all").stdout
    assert sum(1 for line in listed.splitlines() if " quarantined " in line) == len(corrupted)
    aside = list((server.state / "blobs" / "quarantine").iterdir())
    assert len(aside) == sum(1 for h in corrupted.values() if h != "missing")
    logged = [line for line in server.log if "event=quarantined" in line]
    assert len(logged) == len(corrupted)
    assert not any(s in line.encode() for line in server.log for s in secrets), "content in the log"
    print(f"quarantined={len(quarantined)} ({', '.join(sorted(corrupted.values()))}) files set aside={len(aside)} "
          f"log lines={len(logged)}")


def test_corrupt_local_entries_are_quarantined_and_the_rest_is_delivered(tmp_path: Path) -> None:
    started = time.monotonic()
    server = FaultServer.make(tmp_path / "state")
    alice, bob = server.identity("PER", 0), server.identity("PER", 1)
    mids = [f"local-{i}" for i in range(BACKLOG)]
    queue_ids = enqueue_offline(server.state, [(alice["address"], [bob["address"]],
                                                _body(alice["address"], bob["address"], mid, n))
                                               for n, mid in enumerate(mids)],
                                principal=alice["national_id"])
    corrupted = _corrupt(server, queue_ids)
    bad = {mids[queue_ids.index(q)] for q in corrupted}
    server.start()
    try:
        seen = wait_for_ids(server, bob, set(mids) - bad)
        wait_until(lambda: sum(1 for r in queue_rows(server.state) if r["state"] == "quarantined")
                   == len(corrupted), 10, "every corrupt entry quarantined")
        print(f"\nbacklog={BACKLOG} delivered={sum(seen.values())} duplicates={sum(v - 1 for v in seen.values())}")
        assert not set(seen) & bad
        assert all(v == 1 for v in seen.values())
        _check_quarantine(server, corrupted, [b"fault local-", b"END-OF-MESSAGE"])
        # The queue flows on: a new message is delivered.
        s = server.smtp(alice)
        assert send_one(s, alice["address"], bob["address"], message(alice["address"], bob["address"], "new"))[0] == 250
        s.quit()
        wait_for_ids(server, bob, {"new"})
    finally:
        assert server.stop() == 0
    print(f"runtime {time.monotonic() - started:.1f} s")


def test_corrupt_entries_for_another_operator_are_quarantined_and_the_rest_is_relayed(tmp_path: Path) -> None:
    started = time.monotonic()
    port = free_port()
    server, chain, key = make_relaying_node(tmp_path, port)
    alice = server.identity("PER", 0)
    rcpt = f"dr.durand@{PEER_DOMAIN}"
    mids = [f"remote-{i}" for i in range(BACKLOG)]
    queue_ids = enqueue_offline(server.state, [(alice["address"], [rcpt], _body(alice["address"], rcpt, mid, n))
                                               for n, mid in enumerate(mids)], principal=alice["national_id"])
    corrupted = _corrupt(server, queue_ids)
    bad = {mids[queue_ids.index(q)] for q in corrupted}
    with SmtpPeer(chain, key).start(port) as peer:
        server.start()
        try:
            def settled() -> list[dict[str, object]] | None:
                rows = queue_rows(server.state)
                return rows if all(r["state"] in ("relayed", "quarantined") for r in rows) else None

            rows = wait_until(settled, 30, "every entry relayed or quarantined")
            accepted = peer.accepted_ids()
            print(f"\nbacklog={BACKLOG} relayed={sum(1 for r in rows if r['state'] == 'relayed')} "
                  f"peer accepted={sum(accepted.values())} duplicates={sum(v - 1 for v in accepted.values())}")
            assert accepted == {mid: 1 for mid in mids if mid not in bad}
            _check_quarantine(server, corrupted, [b"fault remote-", b"END-OF-MESSAGE"])
        finally:
            assert server.stop() == 0
    print(f"runtime {time.monotonic() - started:.1f} s")
