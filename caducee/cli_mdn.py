"""`caducee mdn …`: read receipts ("accusé de lecture", RFC 8098).

    caducee mdn FILE.eml --recipient ADDR [--disposition processed|displayed|deleted|dispatched]
                [--error 900..906] [--manual] [--out FILE]
                [--send --server HOST:PORT --ca BUNDLE --cert CERT --key KEY] [--state DIR]

Builds the MDN for the message in FILE as seen by the mailbox ADDR and writes it to --out, or to standard
output. It refuses (exit status 2) when the message asks for no MDN, is itself a report, has a required
option it does not understand (RFC 8098 §2.2), or may not be answered automatically (RFC 8098 §2.1) and
--manual is not given. With --send it submits the MDN over implicit TLS with the mailbox's certificate
(AUTH EXTERNAL) and prints the server's reply to DATA.
"""

from __future__ import annotations

import argparse
import smtplib
import ssl
import sys
from pathlib import Path
from typing import Any

from caducee import __version__
from caducee import config as config_mod
from mailserver.mdn import Disposition, DispositionType, MssErrorCode, build_mdn, mdn_request, report_kind

EXIT_REFUSED = 2
EXIT_SEND_FAILED = 1
_DISPOSITIONS = ("processed", "displayed", "deleted", "dispatched")


def _error_code(text: str) -> MssErrorCode:
    try:
        return MssErrorCode(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an MSSanté error code 900 to 906, got {text!r}") from None


def register(sub: Any, state_parent: argparse.ArgumentParser) -> None:
    """Add the `mdn` command to the `caducee` parser."""
    codes = "; ".join(f"{c.value} {c.label}" for c in MssErrorCode)
    p = sub.add_parser(
        "mdn", parents=[state_parent], help="build (and optionally send) a read receipt (MDN, RFC 8098)",
        description="Build the message disposition notification (\"accusé de lecture\") for the message in "
                    "FILE as seen by the mailbox ADDR. Refuses, with exit status 2, when the message asks "
                    "for no MDN or when it may not be answered without the user's consent and --manual is "
                    "not given. The configuration in --state, when there is one, names the reporting "
                    "user agent and the Message-ID domain.",
    )
    p.add_argument("message", type=Path, metavar="FILE.eml", help="the message to acknowledge")
    p.add_argument("--recipient", required=True, metavar="ADDR",
                   help="the mailbox that received the message (Final-Recipient, From: and MAIL FROM)")
    p.add_argument("--disposition", choices=_DISPOSITIONS, default="processed",
                   help="what became of the message (default: processed)")
    p.add_argument("--error", type=_error_code, metavar="900..906",
                   help=f"MSSanté integration error code: {codes}")
    p.add_argument("--manual", action="store_true",
                   help="the user consents to this MDN: manual-action/MDN-sent-manually; required when the "
                        "request may not be answered automatically")
    p.add_argument("--out", type=Path, metavar="FILE", help="write the MDN here (default: standard output)")
    send = p.add_argument_group("sending", "submit the MDN over implicit TLS with a client certificate")
    send.add_argument("--send", action="store_true",
                      help="submit the MDN (then it is written only with --out) and print the server's reply")
    send.add_argument("--server", metavar="HOST:PORT", help="submission server (implicit TLS)")
    send.add_argument("--ca", type=Path, metavar="BUNDLE", help="CA certificates to verify the server")
    send.add_argument("--cert", type=Path, metavar="CERT", help="the mailbox's certificate (PEM)")
    send.add_argument("--key", type=Path, metavar="KEY", help="its private key (PEM)")
    p.set_defaults(func=cmd_mdn)


def _refuse(message: str) -> int:
    print(f"caducee mdn: {message}", file=sys.stderr)
    return EXIT_REFUSED


def _identity(state: Path, recipient: str) -> tuple[str, str]:
    """(Reporting-UA, Message-ID domain): from the configuration when the state folder has one, else
    from the recipient's domain."""
    domain = recipient.rpartition("@")[2]
    if config_mod.config_path(state).is_file():
        cfg = config_mod.load(state)
        return f"{cfg.server.hostname}; Caducee {__version__}", cfg.server.domains[0]
    return f"{domain}; Caducee {__version__}", domain


def _split_hostport(value: str) -> tuple[str, int] | None:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def cmd_mdn(args: argparse.Namespace) -> int:
    """Build, write and optionally submit the MDN; the exit status of the command."""
    if args.send and not all((args.server, args.ca, args.cert, args.key)):
        return _refuse("--send needs --server HOST:PORT, --ca BUNDLE, --cert CERT and --key KEY")
    server = _split_hostport(args.server) if args.send else None
    if args.send and server is None:
        return _refuse(f"--server: expected HOST:PORT, got {args.server!r}")
    recipient: str = args.recipient
    if "@" not in recipient or not recipient.isascii() or any(c.isspace() or c in "<>," for c in recipient):
        return _refuse(f"--recipient: {recipient!r} is not a plain mail address")
    try:
        original = args.message.read_bytes()
    except OSError as exc:
        return _refuse(f"cannot read {args.message}: {exc.strerror or exc}")

    kind = report_kind(original)
    if kind is not None:
        return _refuse(f"{args.message} is itself a {'delivery' if kind == 'dsn' else 'disposition'} "
                       "report; a report is never answered with another report (RFC 8098 §2.1)")
    request = mdn_request(original)
    if request is None:
        return _refuse(f"{args.message} asks for no MDN: it has no usable Disposition-Notification-To header "
                       "(RFC 8098 §2.1)")
    if not request.may_send:
        return _refuse("the request has required Disposition-Notification-Options that are not understood "
                       f"({', '.join(request.unsupported_required)}): no MDN may be sent (RFC 8098 §2.2)")
    if not request.automatic_allowed and not args.manual:
        reasons = "".join(f"\n  - {r}" for r in request.manual_reasons)
        return _refuse("this MDN must not be sent automatically:" + reasons +
                       "\nGive --manual if the user of the mailbox consents to sending it.")

    dtype = DispositionType(args.disposition)
    disposition = (Disposition.manual(dtype, args.error) if args.manual
                   else Disposition.automatic(dtype, args.error))
    reporting_ua, domain = _identity(args.state, recipient)
    try:
        report = build_mdn(original=original, final_recipient=recipient, reporting_ua=reporting_ua,
                           disposition=disposition, from_addr=recipient, message_id_domain=domain)
    except ValueError as exc:
        return _refuse(str(exc))

    if args.out is not None:
        try:
            args.out.write_bytes(report)
        except OSError as exc:
            return _refuse(f"cannot write {args.out}: {exc.strerror or exc}")
    elif not args.send:
        sys.stdout.buffer.write(report)
        sys.stdout.buffer.flush()
    if not args.send:
        return 0
    assert server is not None
    return _submit(report, recipient, request.notify_to, server, args.ca, args.cert, args.key)


def _submit(report: bytes, sender: str, recipients: tuple[str, ...], server: tuple[str, int],
            ca: Path, cert: Path, key: Path) -> int:
    """Submit over implicit TLS (RFC 8314 §3) with AUTH EXTERNAL (RFC 4954, RFC 4422 Appendix A).

    MAIL FROM is the mailbox: submission refuses the null reverse-path that RFC 8098 §3 recommends for
    MDNs, so each RCPT asks NOTIFY=NEVER instead, when the server offers DSN (RFC 3461 §4.1): no report
    ever answers this one.
    """
    host, port = server
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
        context.load_cert_chain(str(cert), str(key))
        with smtplib.SMTP_SSL(host, port, context=context, timeout=60) as smtp:
            smtp.ehlo()
            smtp.auth("EXTERNAL", lambda challenge=None: "")
            code, reply = smtp.mail(sender)
            if code != 250:
                raise smtplib.SMTPSenderRefused(code, reply, sender)
            options = ["NOTIFY=NEVER"] if smtp.has_extn("dsn") else []
            for rcpt in recipients:
                code, reply = smtp.rcpt(rcpt, options)
                if code not in (250, 251):
                    raise smtplib.SMTPRecipientsRefused({rcpt: (code, reply)})
            code, reply = smtp.data(report)
    except (OSError, smtplib.SMTPException, ssl.SSLError) as exc:
        print(f"caducee mdn: sending failed: {exc}", file=sys.stderr)
        return EXIT_SEND_FAILED
    print(f"{code} {reply.decode('utf-8', 'replace')}")
    return 0 if code == 250 else EXIT_SEND_FAILED
