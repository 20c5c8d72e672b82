"""`caducee bench smtp`: SMTP acceptance and delivery, Caducée side by side with Postfix.

Both servers run on 127.0.0.1 in the same run, with the same certificates (Caducée's development PKI),
and are driven by the same load generator: N sessions (threads, smtplib), each doing EHLO, STARTTLS with
a client certificate, EHLO, then sending its share of the messages; Caducée also needs `AUTH EXTERNAL`
(its senders are identified by their certificate and must name the mailbox they send as). Postfix is
configured as the reference of REFERENCE.md §7: mandatory STARTTLS, a required client certificate
(`smtpd_tls_req_ccert`), delivery to Maildir by `virtual`. Caducée runs with full durability (each 250
after the body and its queue rows are on disk) and delivers to its mailboxes. Caducée runs with
`[server] smtp_processes = 0` (one SMTP process per CPU, as Postfix runs as many `smtpd` as it has
sessions) unless `--smtp-processes` says otherwise; the table says which.

Postfix's `smtp-source` cannot be used against Caducée: it does not speak TLS, and Caducée never accepts
mail in clear. The load generator is therefore ours, for both.

Modes: `reuse` — each session sends messages/sessions messages on one connection; `permsg` — every
message on a new connection (TCP, TLS handshake, EHLO, STARTTLS, EHLO, [AUTH], MAIL, RCPT, DATA, QUIT).

For each round, each session count and each mode, both targets run one after the other (the first
rotating); recorded per run: accepted messages/s (from the first connect to the last 250), the time
until every message is in a mailbox, and the CPU time per message of each server (its processes and
their children: Caducée's acceptors, Postfix's master and every daemon it starts).
"""

from __future__ import annotations

import argparse
import os
import smtplib
import sqlite3
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    Cell,
    fmt,
    machine,
    publish,
    ratio_median,
    reference_postfix,
    rotated,
    tree_cpu_seconds,
)

SIZE = 5120


def message(sender: str, rcpt: str, size: int, n: int) -> bytes:
    head = f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: bench {n}\r\nMessage-ID: <bench.{n}.{time.time_ns()}@bench>\r\n\r\n"
    line = "x" * 76 + "\r\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(head) - 2)]
    return (head + body).encode() + b"\r\n"


@dataclass
class Target:
    name: str
    host: str
    port: int
    sender: str
    rcpt: str
    client: ssl.SSLContext
    auth_external: bool
    delivered: Callable[[], int]
    pid: Callable[[], int | None]


def _session(target: Target, count: int, size: int, per_message: bool, errors: list[str], first: int) -> None:
    def connect() -> smtplib.SMTP:
        s = smtplib.SMTP(target.host, target.port, local_hostname="loadgen.bench", timeout=60)
        s.ehlo()
        s.starttls(context=target.client)
        s.ehlo()
        if target.auth_external:
            code, text = s.docmd("AUTH", "EXTERNAL =")
            if code != 235:
                raise smtplib.SMTPResponseException(code, text)
        return s

    s = None
    try:
        for i in range(count):
            if s is None:
                s = connect()
            s.sendmail(target.sender, [target.rcpt], message(target.sender, target.rcpt, size, first + i))
            if per_message:
                s.quit()
                s = None
        if s is not None:
            s.quit()
    except (smtplib.SMTPException, OSError) as exc:
        errors.append(f"{type(exc).__name__}: {exc}")


def run_once(target: Target, messages: int, sessions: int, size: int, per_message: bool,
             timeout: float = 600) -> dict[str, float]:
    """One run: returns accepted/s, seconds until all delivered, and the server's CPU ms per message."""
    before = target.delivered()
    pid = target.pid()
    cpu0 = tree_cpu_seconds(pid) if pid else None
    per, errors = messages // sessions, []
    threads = [threading.Thread(target=_session, args=(target, per, size, per_message, errors, k * per))
               for k in range(sessions)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    accepted_s = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{target.name}: {len(errors)} sessions failed, first: {errors[0]}")
    sent = per * sessions
    deadline = time.monotonic() + timeout
    while target.delivered() < before + sent:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{target.name}: only {target.delivered() - before} of {sent} delivered")
        time.sleep(0.01)
    all_s = time.perf_counter() - t0
    out = {"accepted_per_s": sent / accepted_s, "all_delivered_s": all_s}
    if cpu0 is not None and pid:
        out["cpu_ms_per_message"] = (tree_cpu_seconds(pid) - cpu0) / sent * 1000
    return out


def _caducee_delivered(db: Path) -> Callable[[], int]:
    def count() -> int:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
            return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
    return count


def _maildir_count(box: Path) -> Callable[[], int]:
    def count() -> int:
        new = box / "new"
        return sum(1 for _ in new.iterdir()) if new.is_dir() else 0
    return count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="caducee bench smtp", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--messages", type=int, default=2000, help="messages per run (default 2000)")
    p.add_argument("--sessions", default="1,10,50", help="session counts, comma-separated (default 1,10,50)")
    p.add_argument("--modes", default="reuse,permsg", help="reuse and/or permsg (default both)")
    p.add_argument("--size", type=int, default=SIZE, help="message size in bytes (default 5120)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--warmup", type=int, default=200, help="unrecorded messages per target first (default 200)")
    p.add_argument("--only", choices=("caducee", "postfix"), help="run one target alone (no ratio)")
    p.add_argument("--smtp-processes", type=int, default=0, metavar="N",
                   help="Caducée's [server] smtp_processes (default 0: one per CPU)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = p.parse_args(argv)
    session_counts = [int(x) for x in args.sessions.split(",") if x]
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in ("reuse", "permsg") for m in modes) or not session_counts or min(session_counts) < 1:
        p.error("--modes takes reuse,permsg; --sessions positive integers")

    from mailserver.testing import ServerProcess
    from mailserver.testing_postfix import postfix_workdir

    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    desc = machine()
    with tempfile.TemporaryDirectory(prefix="caducee-bench-") as tmp, postfix_workdir() as pf_dir:
        server = ServerProcess.create(Path(tmp) / "state", relay={"smtp_processes": str(args.smtp_processes)})
        ident, rcpt = server.identity("PER", 0), server.identity("PER", 1)["address"]
        client = ssl.create_default_context(cafile=server.ca_bundle)
        client.load_cert_chain(ident["cert"], ident["key"])
        postfix = reference_postfix(server, Path(tmp), pf_dir)
        targets: dict[str, Target] = {}
        with server, postfix:
            if args.only != "postfix":
                targets["caducee"] = Target(
                    "caducee", "127.0.0.1", server.port("submission"), ident["address"], rcpt, client, True,
                    _caducee_delivered(server.state / "caducee.db"), lambda: server.proc.pid if server.proc else None)
            if args.only != "caducee":
                targets["postfix"] = Target(
                    "postfix", "127.0.0.1", postfix.listen_port, ident["address"], "bench@postfix.bench", client,
                    False, _maildir_count(postfix.maildir_base / "postfix.bench" / "bench"), postfix.master_pid)
            names = list(targets)
            for t in targets.values():
                run_once(t, args.warmup, min(10, args.warmup), args.size, False)
            cells: dict[tuple[str, int, str], Cell] = {}
            total = args.rounds * len(modes) * len(session_counts) * len(names)
            done = 0
            for r in range(args.rounds):
                for mode in modes:
                    for n in session_counts:
                        for name in rotated(names, r):
                            figures = run_once(targets[name], args.messages, n, args.size, mode == "permsg")
                            cell = cells.setdefault((name, n, mode), Cell(name, {"sessions": n, "mode": mode}))
                            cell.add(**figures)
                            done += 1
                            cpu = (f", {figures['cpu_ms_per_message']:.2f} ms CPU/msg"
                                   if "cpu_ms_per_message" in figures else "")
                            print(f"[{done}/{total}] round {r + 1} {mode:6} sessions={n:<3} {name:8} "
                                  f"{figures['accepted_per_s']:7.0f} msg/s accepted, all delivered in "
                                  f"{figures['all_delivered_s']:.2f} s{cpu}", file=sys.stderr, flush=True)

    rows: list[dict[str, Any]] = []
    table = [("| mode | sessions | Caducée msg/s | Postfix msg/s | ratio | Caducée all delivered | "
              "Postfix all delivered | ratio | Caducée CPU ms/msg | Postfix CPU ms/msg |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode in modes:
        for n in session_counts:
            ours, ref = cells.get(("caducee", n, mode)), cells.get(("postfix", n, mode))
            row = {"mode": mode, "sessions": n, "messages": args.messages, "size": args.size,
                   "caducee": ours.values if ours else None, "postfix": ref.values if ref else None}
            rate = ratio_median(ours, ref, "accepted_per_s") if ours and ref else None
            delivered = ratio_median(ours, ref, "all_delivered_s", higher_is_better=False) if ours and ref else None
            row.update(accepted_ratio=rate, delivered_ratio=delivered)
            rows.append(row)
            table.append(
                f"| {mode} | {n} | {fmt(ours.median('accepted_per_s') if ours else None)} | "
                f"{fmt(ref.median('accepted_per_s') if ref else None)} | {fmt(rate, 2, '×')} | "
                f"{fmt(ours.median('all_delivered_s') if ours else None, 2, ' s')} | "
                f"{fmt(ref.median('all_delivered_s') if ref else None, 2, ' s')} | {fmt(delivered, 2, '×')} | "
                f"{fmt(ours.median('cpu_ms_per_message') if ours else None, 2)} | "
                f"{fmt(ref.median('cpu_ms_per_message') if ref else None, 2)} |")
    table.append("")
    processes = args.smtp_processes or f"0 (one per CPU: {len(os.sched_getaffinity(0))})"
    table.append(f"{args.messages} messages of {args.size} bytes per run, medians of {args.rounds} interleaved rounds; "
                 "ratios are Caducée/Postfix per round (above 1: Caducée faster), then their median. "
                 f"Caducée with `smtp_processes = {processes}`; CPU is each server's processes and their "
                 "children.")
    result = {"title": "SMTP with STARTTLS and client certificates: Caducée and Postfix", "started": started,
              "machine": desc, "load_average_at_end": os.getloadavg(),
              "parameters": vars(args) | {"out": str(args.out) if args.out else None}, "rows": rows}
    return publish("smtp", result, table, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
