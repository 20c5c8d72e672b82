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

    from caducee import cli_mdn, cli_trust

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
