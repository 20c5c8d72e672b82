"""Stale leases (security.md §6 'stale leases'): a node dies while it holds claims on recipients it was
relaying to a next hop that hangs. Its leases are left in the queue; after a restart those recipients are
not touched while the lease runs, are retried once it has expired, and reach the peer exactly once; the
rest of the queue does not wait for them.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest

from mailserver.testing import free_port
from tests.faults.harness import (
    PEER_DOMAIN,
    Blackhole,
    SmtpPeer,
    make_relaying_node,
    message,
    message_id,
    queue_rows,
    set_setting,
    wait_until,
)

pytestmark = pytest.mark.blackbox

LEASED_RCPTS = [f"dr.{n}@{PEER_DOMAIN}" for n in ("durand", "lefevre", "moreau", "garnier")]
LATER = 2  # messages queued after the claim: never leased by the dead node
LEASE = 6  # seconds


def _utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def test_leases_of_a_dead_worker_expire_and_each_recipient_is_relayed_once(tmp_path: Path) -> None:
    started = time.monotonic()
    hang = Blackhole()  # takes the TCP connection and never greets: the attempt outlives the node
    try:
        server, chain, key = make_relaying_node(tmp_path, hang.port, lease=str(LEASE), connect_timeout="30")
        server.start()
        alice = server.identity("PER", 0)
        s = server.smtp(alice)
        s.sendmail(alice["address"], LEASED_RCPTS, message(alice["address"], LEASED_RCPTS[0], "leased"))

        def leased_rows() -> list[dict[str, object]] | None:
            rows = queue_rows(server.state)
            return rows if len(rows) == len(LEASED_RCPTS) and all(r["lease_owner"] for r in rows) else None

        leased = wait_until(leased_rows, 20, "the recipients claimed by the worker")
        for i in range(LATER):  # the worker is stuck on the hanging hop: these stay unclaimed
            s.sendmail(alice["address"], [LEASED_RCPTS[0]], message(alice["address"], LEASED_RCPTS[0], f"later-{i}"))
        s.quit()
        wait_until(lambda: len(queue_rows(server.state)) == len(LEASED_RCPTS) + LATER, 10, "the later messages")
        server.kill()  # SIGKILL with the leases held and the connection hanging
    finally:
        hang.close()
    expiry = min(_utc(r["lease_expires"]) for r in leased)
    dead_owner = leased[0]["lease_owner"]

    port = free_port()
    set_setting(server.state, "relay", "next_hops", f'{{ "{PEER_DOMAIN}" = "127.0.0.1:{port}" }}')
    with SmtpPeer(chain, key).start(port) as peer:
        restarted = dt.datetime.now(dt.UTC)
        server.start()
        try:
            def relayed() -> list[dict[str, object]] | None:
                rows = queue_rows(server.state)
                return rows if all(r["state"] == "relayed" for r in rows) else None

            rows = wait_until(relayed, 40, "every recipient relayed")
            pairs = peer.accepted_pairs()
            when = {message_id(d): dt.datetime.fromtimestamp(t, dt.UTC) for t, _, d in peer.accepted}
            later_at = min(when[f"later-{i}"] for i in range(LATER)) - restarted
            print(f"\nleased by the dead node={len(leased)} recipients (lease {LEASE} s, expiring "
                  f"{(expiry - restarted).total_seconds():.1f} s after the restart); queued later={LATER}")
            print(f"after restart: later messages relayed at +{later_at.total_seconds():.1f} s, "
                  f"leased ones at +{(when['leased'] - restarted).total_seconds():.1f} s; "
                  f"peer accepted {sum(pairs.values())} recipient copies, duplicates={sum(v - 1 for v in pairs.values())}")
            assert pairs == {**{("leased", r): 1 for r in LEASED_RCPTS},
                             **{(f"later-{i}", LEASED_RCPTS[0]): 1 for i in range(LATER)}}
            assert len(peer.received) == 1 + LATER  # one transaction each, nothing retried twice
            assert when["leased"] >= expiry  # nobody touched them while the dead node's lease ran
            leased_ids = {r["id"] for r in leased}
            assert all(r["attempts"] == 2 for r in rows if r["id"] in leased_ids)  # the dead one, then this
            assert all(r["attempts"] == 1 for r in rows if r["id"] not in leased_ids)
            assert not any(r["lease_owner"] for r in rows) and dead_owner
        finally:
            assert server.stop() == 0
    print(f"runtime {time.monotonic() - started:.1f} s")

