"""The `caducee` command (DESIGN.md §5). Every command takes --state DIR (default ./var)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from caducee import __version__
from caducee import config as config_mod

DEFAULT_STATE = Path("var")


def _state_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--state", type=Path, default=DEFAULT_STATE, metavar="DIR",
                        help="state folder holding caducee.toml, the database, blobs and the PKI (default: ./var)")
    return parent


def _load(args: argparse.Namespace) -> config_mod.Config:
    return config_mod.load(args.state)


def cmd_init(args: argparse.Namespace) -> int:
    from caducee.state import init_state

    cfg = init_state(args.state, domain=args.domain, demo=args.demo)
    print(f"state folder {cfg.state_dir} is ready")
    if args.demo:
        index = json.loads((cfg.state_dir / "demo" / "demo.json").read_text(encoding="utf-8"))
        first, second = index["identities"][0], index["identities"][1]
        sub = index["ports"]["submissions"]
        imaps = index["ports"]["imaps"]
        d = cfg.state_dir
        print(
            "\nSend a first message (in another terminal, once `caducee serve` runs):\n"
            f"  curl --ssl-reqd --cacert {d}/{index['ca_bundle']} --cert {d}/{first['cert']} --key {d}/{first['key']} \\\n"
            f"       --login-options AUTH=EXTERNAL -u '{first['address']}:' \\\n"
            f"       --mail-from {first['address']} --mail-rcpt {second['address']} \\\n"
            f"       --upload-file message.eml smtps://localhost:{sub}\n"
            "Read it:\n"
            f"  curl --cacert {d}/{index['ca_bundle']} --cert {d}/{second['cert']} --key {d}/{second['key']} \\\n"
            f"       --login-options AUTH=EXTERNAL -u '{second['address']}:' 'imaps://localhost:{imaps}/INBOX;UID=1'\n"
            "See README.md for the full walkthrough."
        )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    if args.acceptor:
        from caducee.acceptors import serve_acceptor

        return serve_acceptor(_load(args), args.acceptor)
    from caducee.app import serve

    return serve(_load(args))


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from mailserver import audit
    from mailserver.db import make_engine

    engine = make_engine(_load(args).database_url)
    count, broken = audit.verify(engine)
    if broken is not None:
        print(f"audit trail BROKEN at entry {broken} ({count} entries verified before it)")
        return 1
    print(f"audit trail intact: {count} entries")
    return 0


def cmd_audit_list(args: argparse.Namespace) -> int:
    from mailserver import audit
    from mailserver.db import make_engine

    engine = make_engine(_load(args).database_url)
    for e in audit.entries(engine, since_seq=args.since):
        if args.json:
            print(json.dumps({"seq": e.seq, "at": e.at.isoformat(), "event": e.event, "actor": e.actor,
                              "protocol": e.protocol, "mailbox": e.mailbox, "message_id": e.message_id,
                              "detail": json.loads(e.detail) if e.detail else None, "hash": e.hash}))
        else:
            print(f"{e.seq:>6} {e.at.isoformat(timespec='seconds')} {e.event:<12} {e.actor:<16} "
                  f"{e.protocol or '-':<6} {e.mailbox or '-'} {e.message_id or ''}")
    return 0


def cmd_mailbox_list(args: argparse.Namespace) -> int:
    from directory.store import DirectoryStore
    from mailserver.db import make_engine

    store = DirectoryStore(make_engine(_load(args).database_url))
    for m in store.all_mailboxes():
        print(f"{m.address:<40} {m.mailbox_type.value}  {m.description or ''}")
    return 0


def cmd_reports(args: argparse.Namespace) -> int:
    import sqlalchemy as sa

    from mailserver.db import make_engine
    from mailserver.schema import delivery_reports

    engine = make_engine(_load(args).database_url)
    query = sa.select(delivery_reports).order_by(delivery_reports.c.id)
    if args.message_id:
        wanted = args.message_id.strip()
        if not wanted.startswith("<"):
            wanted = f"<{wanted}>"
        query = query.where(delivery_reports.c.original_message_id == wanted)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    for r in rows:
        if args.json:
            print(json.dumps({"message_id": r.original_message_id, "recipient": r.recipient, "kind": r.kind,
                              "status": r.status, "detail": r.detail, "at": r.at.isoformat()}))
        else:
            print(f"{r.at.isoformat(timespec='seconds')} {r.kind:<4} {r.status:<12} {r.recipient:<40} "
                  f"{r.detail or ''} {r.original_message_id}")
    if not rows and args.message_id:
        print(f"no delivery report or read receipt received yet for {args.message_id}", file=sys.stderr)
        return 1
    return 0


def cmd_queue_list(args: argparse.Namespace) -> int:
    import sqlalchemy as sa

    from mailserver.db import make_engine
    from mailserver.schema import queue_messages, queue_recipients

    engine = make_engine(_load(args).database_url)
    query = (sa.select(queue_recipients, queue_messages.c.received_at, queue_messages.c.size)
             .join(queue_messages, queue_messages.c.id == queue_recipients.c.message_id)
             .order_by(queue_recipients.c.id))
    if not args.all:
        query = query.where(queue_recipients.c.state == "queued")
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    for r in rows:
        print(f"{r.message_id} {r.state:<13} attempts={r.attempts:<3} next={r.next_attempt_at:%Y-%m-%dT%H:%M:%S} "
              f"{'uncertain ' if r.uncertain else ''}{r.rcpt} {r.last_error or ''}")
    print(f"{len(rows)} recipient(s)", file=sys.stderr)
    return 0


def cmd_pki_revoke(args: argparse.Namespace) -> int:
    from crypto.pki import DevPKI

    pki = DevPKI.create_or_load(args.state / "pki")
    pki.revoke(args.certificate)
    print(f"revoked {args.certificate}; CRLs updated under {args.state / 'pki' / 'crl'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    state = _state_parent()
    parser = argparse.ArgumentParser(
        prog="caducee",
        description="Caducée: secure health messaging server (certificate-authenticated SMTP and IMAP).",
    )
    parser.add_argument("--version", action="version", version=f"caducee {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("init", parents=[state], help="create or complete the state folder (idempotent)",
                       description="Write the configuration, the development PKI, the server certificate and "
                                   "the database; with --demo, sample practitioners and an organisation.")
    p.add_argument("--domain", help="local mail domain for a new configuration (default caducee.localhost)")
    p.add_argument("--demo", action="store_true",
                   help="add demo identities with certificates under DIR/demo/ and DIR/demo/demo.json")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("serve", parents=[state], help="run every listener until SIGTERM",
                       description="Run SMTP submission and IMAP listeners; SIGTERM or SIGINT stops cleanly.")
    # Started by the node itself for `[server] smtp_processes` (caducee.acceptors), never by hand.
    p.add_argument("--acceptor", metavar="SPEC", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)

    audit = sub.add_parser("audit", help="the tamper-evident audit trail").add_subparsers(
        dest="audit_command", metavar="ACTION", required=True)
    p = audit.add_parser("verify", parents=[state], help="check the hash chain of the whole trail")
    p.set_defaults(func=cmd_audit_verify)
    p = audit.add_parser("list", parents=[state], help="print audit entries")
    p.add_argument("--since", type=int, default=0, metavar="SEQ", help="only entries after SEQ")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_audit_list)

    mailbox = sub.add_parser("mailbox", help="mailboxes (BAL) of this operator").add_subparsers(
        dest="mailbox_command", metavar="ACTION", required=True)
    p = mailbox.add_parser("list", parents=[state], help="list mailboxes")
    p.set_defaults(func=cmd_mailbox_list)

    pki = sub.add_parser("pki", help="the development PKI").add_subparsers(
        dest="pki_command", metavar="ACTION", required=True)
    p = pki.add_parser("revoke", parents=[state], help="revoke a certificate and publish new CRLs")
    p.add_argument("certificate", help="PEM file of the certificate, or its serial number")
    p.set_defaults(func=cmd_pki_revoke)

    p = sub.add_parser("reports", parents=[state], help="delivery reports and read receipts received for sent mail",
                       description="DSN (accusés de réception) and MDN (accusés de lecture) delivered here, "
                                   "correlated with the Message-ID of the message they are about.")
    p.add_argument("--message-id", help="only reports about this Message-ID")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_reports)

    queue = sub.add_parser("queue", help="the delivery queue").add_subparsers(
        dest="queue_command", metavar="ACTION", required=True)
    p = queue.add_parser("list", parents=[state], help="recipients waiting for delivery")
    p.add_argument("--all", action="store_true", help="also delivered, relayed and failed recipients")
    p.set_defaults(func=cmd_queue_list)

    from caducee import cli_bench, cli_directory, cli_mdn, cli_trust

    cli_bench.register(sub, state)
    cli_directory.register(sub, state)
    cli_trust.register(sub, state)
    cli_mdn.register(sub, state)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except config_mod.ConfigError as exc:
        print(f"caducee: configuration error in {exc.path}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
