"""A peer that drops the connection right after our final dot, without a reply (security.md §6 'peer drop
after the final dot').

RFC 5321 §6.1: the receiver takes responsibility for a message by answering 250 to the final dot, and the
sender holds it until then. A connection lost between the dot and the reply leaves the sender unable to
know whether the receiver kept the message (the window of RFC 1047): the only choice that loses nothing is
to keep it and retry, at the price of a possible duplicate at the receiver. What Caducée promises, and this
test counts: the message is never dropped, the attempt is marked `uncertain` and logged as a possible
duplicate, retries go on until a 250, and there is exactly one acknowledged hand-off per recipient — no
attempt after the 250.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mailserver.testing import free_port
from tests.faults.harness import (
    PEER_DOMAIN,
    SmtpPeer,
    make_relaying_node,
    message,
    queue_rows,
    send_one,
    wait_until,
)

pytestmark = pytest.mark.blackbox

MESSAGES = 3
DROPS = 4  # the first three attempts (one per message) and one retry are cut after the dot


def test_peer_dropping_after_the_final_dot_gets_the_message_again_until_it_answers(tmp_path: Path) -> None:
    started = time.monotonic()
    port = free_port()
    server, chain, key = make_relaying_node(tmp_path, port)
    rcpt = f"dr.durand@{PEER_DOMAIN}"
    with SmtpPeer(chain, key, drop_after_dot=DROPS).start(port) as peer:
        server.start()
        try:
            alice = server.identity("PER", 0)
            s = server.smtp(alice)
            mids = [f"drop-{i}" for i in range(MESSAGES)]
            for mid in mids:
                assert send_one(s, alice["address"], rcpt, message(alice["address"], rcpt, mid))[0] == 250
            s.quit()

            def relayed() -> list[dict[str, object]] | None:
                rows = queue_rows(server.state)
                return rows if len(rows) == MESSAGES and all(r["state"] == "relayed" for r in rows) else None

            rows = wait_until(relayed, 30, "every message relayed")
            uncertain_logged = server.count_log("event=relay_uncertain")
            attempts = sum(int(r["attempts"]) for r in rows)
            accepted = peer.accepted_ids()
            print(f"\nmessages={MESSAGES} final dots read by the peer={len(peer.received)} "
                  f"dropped without reply={DROPS} answered 250={sum(accepted.values())} attempts={attempts} "
                  f"logged possible_duplicate={uncertain_logged}")
            relay_log = [line for line in server.log if "event=relay" in line] + peer.errors
            # An attempt that failed before DATA (connection, TLS) is logged as such; none is expected.
            before_data = sum(1 for line in relay_log if "event=relay_connect_failed" in line
                              or "event=relay_peer_refused" in line or "event=relay_attempt_failed" in line)
            assert len(peer.received) == MESSAGES + DROPS, "\n".join(relay_log)
            assert attempts == len(peer.received) + before_data, "\n".join(relay_log)
            assert before_data == 0, "\n".join(relay_log)
            assert accepted == {mid: 1 for mid in mids}  # one acknowledged hand-off each
            assert uncertain_logged == DROPS
            assert all(r["uncertain"] for r in rows)  # kept as a possible duplicate
            assert all(r["last_error"] is None for r in rows)
            # Nothing more once the peer answered: the count stays put while the queue keeps running.
            received = len(peer.received)
            listed = server.caducee("queue", "list", "--all").stdout
            assert listed.count("uncertain") == MESSAGES, listed
            assert len(peer.received) == received
        finally:
            assert server.stop() == 0
    print(f"runtime {time.monotonic() - started:.1f} s")
