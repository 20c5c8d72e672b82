"""`caducee directory …`: the directory of practitioners, organisations and mailboxes.

    caducee directory import FILE… [--max-rejected PERCENT] [--state DIR]
    caducee directory search [--name N] [--rpps R | --national-id I] [--profession P] [--specialty S]
                             [--postcode C] [--city C] [--mailbox ADDR] [--type PER|ORG|APP|CAB]
                             [--limit N] [--json | --format table|json|fhir] [--state DIR]
    caducee directory publish URL --bind-dn DN [--password-file FILE] [--base DN] [--ca PEM] [--starttls]
                              [--full] [--dry-run] [--timeout S] [--state DIR]
    caducee directory certificate ADDRESS [--out FILE.pem] [--state DIR]

`import` reads the national open-data files (REFERENCE.md §4): PS_LibreAcces_Personne_activite,
PS_LibreAcces_SavoirFaire, PS_LibreAcces_Dipl_AutExerc and Extraction_Correspondance_MSSante, each
recognised by its header and applied in that order whatever the order given. Each file is applied in one
transaction: the difference with the directory (added, changed, removed), or nothing. It prints each
file's kind and summary; a progress bar goes to standard error when it is a terminal. Exit status 0 when
every file was applied (even with rejected lines), 2 when a file could not be imported at all (the
reason is printed on standard error; the other files are still imported).

`publish` pushes the published directory (what the LDAPS listener serves) to an OpenLDAP server, sending
only what changed since the last run to that server (see directory.ldap_sync); the password comes from
--password-file or the environment variable CADUCEE_LDAP_PASSWORD, never from the command line. Exit
status 0 when every entry went in, 1 when the server refused some (each is printed with its DN), 2 when
the publication could not run or stopped (the reason is printed).

`certificate` prints the encryption certificates of a mailbox (PEM): from the local directory for this
operator's mailboxes, else from the remote directory of [discovery] (see directory.discovery). Exit status
0 when one was found, 1 when none, 2 when the lookup failed.

`search` prints matching practitioners and organisations with their published mailboxes (never those on
the liste rouge): a table, or one JSON object per line with --json. Exit status 1 when nothing matches,
2 when the criteria cannot be searched.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from caducee import config as config_mod

EXIT_NOT_FOUND = 1
EXIT_REFUSED = 2
MAX_COLUMN = 40


def _actor() -> str:
    """Who runs the command, for the audit trail."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli:{user}"[:64]


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


class ProgressBar:
    """A one-line progress bar (percent done, lines or other units, units/s), redrawn at most 5 times a
    second within a phase."""

    WIDTH = 30

    def __init__(self, stream: TextIO, unit: str = "lines") -> None:
        self.stream = stream
        self.unit = unit
        self._last = 0.0
        self._phase = ""

    def __call__(self, progress: Any) -> None:
        now = time.monotonic()
        if progress.phase != "done" and progress.phase == self._phase and now - self._last < 0.2:
            return
        self._last = now
        self._phase = progress.phase
        filled = int(progress.fraction * self.WIDTH)
        rate = progress.lines / progress.elapsed if progress.elapsed > 0 else 0.0
        text = (f"\r  {progress.phase:<9} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {progress.fraction:4.0%}  "
                f"{progress.lines:,} {self.unit}  {rate:,.0f} {self.unit}/s")
        self.stream.write(text + "\x1b[K")
        if progress.phase == "done":
            self.stream.write("\r\x1b[K")
        self.stream.flush()


def _print_summary(summary: Any, out: TextIO) -> None:
    out.write(f"  {_plural(summary.lines, 'line')} read: {summary.added:,} added, {summary.changed:,} changed, "
              f"{summary.removed:,} removed, {summary.rejected:,} rejected, {_plural(summary.warnings, 'warning')} "
              f"({summary.elapsed:.1f} s)\n")
    out.writelines(f"    {name:<14} +{c.added:<8,} ~{c.changed:<8,} -{c.removed:,}\n" for name, c in summary.entities.items())
    if summary.principals_created:
        out.write(f"    {_plural(summary.principals_created, 'principal')} created\n")
    for title, total, issues in (("rejected", summary.rejected, summary.errors),
                                 ("warnings", summary.warnings, summary.warning_samples)):
        if total:
            shown = f"first {len(issues)} of {total:,}" if len(issues) < total else f"{total:,}"
            out.write(f"  {title} ({shown}):\n")
            out.writelines(f"    line {issue.line}: {issue.message}\n" for issue in issues)


def cmd_import(args: argparse.Namespace) -> int:
    import sqlalchemy as sa

    from caducee import database
    from directory.importers import DirectoryImportError, ImportSummary, import_file, import_order
    from mailserver.audit import append_in
    from mailserver.audit_api import AuditEvent
    from mailserver.db import make_engine

    cfg = config_mod.load(args.state)
    database.upgrade(cfg.database_url)
    actor = _actor()

    def audit(conn: sa.Connection, summary: ImportSummary) -> None:
        append_in(conn, AuditEvent.ADMIN, actor=actor, detail={
            "action": "directory_import", "kind": summary.kind.value, "file": summary.path.name[:200],
            "lines": str(summary.lines), "added": str(summary.added), "changed": str(summary.changed),
            "removed": str(summary.removed), "rejected": str(summary.rejected), "warnings": str(summary.warnings),
        })

    failed = 0
    ordered = import_order(args.files)
    kinds = [kind for _, kind in ordered if not isinstance(kind, DirectoryImportError)]
    for kind in dict.fromkeys(kinds):
        if kinds.count(kind) > 1:
            print(f"note: {kinds.count(kind)} {kind.value} files: each one replaces what the one before brought",
                  file=sys.stderr)
    engine = make_engine(cfg.database_url)
    try:
        for path, detected in ordered:
            if isinstance(detected, DirectoryImportError):
                failed += 1
                print(f"caducee directory import: {path}: {detected.reason}", file=sys.stderr)
                continue
            kind = detected
            print(f"{path}: {kind.value} ({kind.description})", flush=True)
            progress: Callable[[Any], None] | None = ProgressBar(sys.stderr) if sys.stderr.isatty() else None
            try:
                summary = import_file(engine, path, kind=kind, local_domains=cfg.server.domains,
                                      progress=progress, on_applied=audit,
                                      max_rejected_ratio=args.max_rejected / 100)
            except DirectoryImportError as exc:
                failed += 1
                print(f"caducee directory import: {path}: {exc.reason}; the directory is unchanged", file=sys.stderr)
                continue
            except sa.exc.SQLAlchemyError as exc:
                failed += 1
                reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
                print(f"caducee directory import: {path}: database error ({type(exc).__name__}: {reason}); "
                      "the directory is unchanged", file=sys.stderr)
                continue
            finally:
                if progress is not None:
                    sys.stderr.write("\r\x1b[K")
            _print_summary(summary, sys.stdout)
            sys.stdout.flush()
    finally:
        engine.dispose()
    return EXIT_REFUSED if failed else 0


def _table(entries: list[Any]) -> list[list[str]]:
    from directory.model import SkillKind

    rows = [["NATIONAL ID", "NAME", "PROFESSION", "SPECIALTY", "PLACE", "MAILBOXES"]]
    for e in entries:
        p, o = e.practitioner, e.organisation
        name = f"{p.last_name} {p.first_names or ''}".strip() if p else (o.name if o and o.name else e.display_name)
        profession = (p.profession_label or p.profession_code or "") if p else "organisation" if o else ""
        specialty = next((f"{s.code} {s.label or ''}".strip() for s in e.skills if s.kind is SkillKind.SAVOIR_FAIRE), "")
        site = o if o else next((s.organisation for s in e.sites if s.organisation), None)
        place = " ".join(x for x in (site.postcode, site.city) if x) if site else ""
        boxes = ", ".join(f"{m.address} ({m.mailbox_type.value})" for m in e.mailboxes)
        rows.append([e.national_id, name, profession, specialty, place, boxes])
    return rows


def _print_table(rows: list[list[str]], out: TextIO) -> None:
    widths = [min(MAX_COLUMN, max(len(r[i]) for r in rows)) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [(c if len(c) <= w else c[: w - 1] + "…").ljust(w) for c, w in zip(row, widths)]
        out.write("  ".join([*cells, row[-1]]).rstrip() + "\n")


def cmd_search(args: argparse.Namespace) -> int:
    import sqlalchemy as sa

    from directory.model import MailboxType
    from directory.search import SearchError, SearchQuery, search, to_jsonable
    from mailserver.db import make_engine

    query = SearchQuery(
        name=args.name, rpps=args.rpps, national_id=args.national_id, profession=args.profession,
        specialty=args.specialty, postcode=args.postcode, city=args.city, mailbox=args.mailbox,
        mailbox_type=MailboxType(args.type) if args.type else None, limit=args.limit,
    )
    cfg = config_mod.load(args.state)
    engine = make_engine(cfg.database_url)
    try:
        entries = search(engine, query)
    except SearchError as exc:
        print(f"caducee directory search: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except sa.exc.OperationalError as exc:
        reason = str(exc.orig).splitlines()[0] if exc.orig else type(exc).__name__
        print(f"caducee directory search: cannot read the directory ({reason}); "
              f"run `caducee init --state {args.state}` or `caducee directory import` first", file=sys.stderr)
        return EXIT_REFUSED
    finally:
        engine.dispose()
    if not entries:
        print("no entry matches", file=sys.stderr)
        return EXIT_NOT_FOUND
    output = args.format or ("json" if args.json else "table")
    if output == "fhir":
        from directory.fhir import bundle, resource_of

        where = cfg.listen.admin
        base = f"https://{cfg.server.hostname}:{where.port if where else 8025}/fhir"
        print(json.dumps(bundle(base, [resource_of(e) for e in entries],
                                total=len(entries) if len(entries) < args.limit else None,
                                self_url=f"{base}?_type=Practitioner,Organization"), ensure_ascii=False, indent=2))
    elif output == "json":
        for entry in entries:
            print(json.dumps(to_jsonable(entry), ensure_ascii=False))
    else:
        _print_table(_table(entries), sys.stdout)
    if len(entries) == args.limit:
        print(f"(the first {args.limit}; --limit N for more)", file=sys.stderr)
    return 0


PUBLISH_PASSWORD_ENV = "CADUCEE_LDAP_PASSWORD"


def _publish_password(args: argparse.Namespace) -> str:
    """The bind password: --password-file (its first line), else $CADUCEE_LDAP_PASSWORD; never an argument."""
    import os
    import stat

    if args.password_file is not None:
        path: Path = args.password_file
        try:
            data = path.read_bytes()
            mode = path.stat().st_mode
        except OSError as exc:
            raise ValueError(f"cannot read the password file {path}: {exc.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            print(f"warning: {path} can be read by other users (chmod 600 {path})", file=sys.stderr)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"the password file {path} is not UTF-8") from None
        password = text.split("\n", 1)[0].removesuffix("\r")
        if not password:
            raise ValueError(f"the password file {path} is empty")
        return password
    password = os.environ.get(PUBLISH_PASSWORD_ENV, "")
    if not password:
        raise ValueError(f"no password: give --password-file FILE or set {PUBLISH_PASSWORD_ENV} "
                         "(never on the command line, where `ps` shows it)")
    return password


def _print_publish_summary(summary: Any, out: TextIO) -> None:
    def entries_text(n: int) -> str:
        return f"{n:,} entr{'y' if n == 1 else 'ies'}"

    if summary.full:
        out.write(f"  {entries_text(summary.remote_entries)} read from the server\n")
    entries = entries_text(summary.entries)
    out.write(f"  {entries}: {summary.added:,} added, {summary.modified:,} modified, {summary.deleted:,} deleted, "
              f"{summary.unchanged:,} unchanged, {summary.failed:,} failed ({summary.elapsed:.1f} s, "
              f"{summary.rate:,.0f} entries/s; {summary.writes:,} updates and {summary.reads:,} searches sent)\n")
    if summary.dry_run:
        out.write("  dry run: nothing was changed on the server nor recorded here\n")
        for kind in ("added", "modified", "deleted"):
            names = summary.samples.get(kind, [])
            if names:
                total = getattr(summary, kind)
                shown = f"first {len(names)} of {total:,}" if len(names) < total else f"{total:,}"
                out.write(f"  would be {kind} ({shown}):\n")
                out.writelines(f"    {dn}\n" for dn in names)
    if summary.failed:
        shown = f"first {len(summary.failures)} of {summary.failed:,}" if len(summary.failures) < summary.failed \
            else f"{summary.failed:,}"
        out.write(f"  refused by the server ({shown}):\n")
        out.writelines(f"    {failure}\n" for failure in summary.failures)


def cmd_publish(args: argparse.Namespace) -> int:
    from caducee import database
    from directory.ldap_client import LdapError, close, connect, parse_url
    from directory.ldap_sync import Publisher, PublishError, Target
    from mailserver.audit import append_in
    from mailserver.audit_api import AuditEvent
    from mailserver.db import make_engine

    prog = "caducee directory publish"
    cfg = config_mod.load(args.state)
    try:
        endpoint = parse_url(args.url, starttls=args.starttls)
        password = _publish_password(args)
    except (LdapError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    base = args.base or cfg.ldap_base
    ca = args.ca if args.ca is not None else cfg.path(cfg.tls.trust_anchors)
    if endpoint.tls and not ca.is_file():
        print(f"{prog}: no CA bundle at {ca} to verify the server's certificate (--ca PEM)", file=sys.stderr)
        return EXIT_REFUSED
    database.upgrade(cfg.database_url)
    mode = "full" if args.full else "incremental"
    print(f"publishing {base} to {endpoint} ({mode}{', dry run' if args.dry_run else ''})", flush=True)
    try:
        conn = connect(endpoint, ca_file=ca if endpoint.tls else None, bind_dn=args.bind_dn, password=password,
                       timeout=args.timeout, check_names=False)
    except LdapError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    progress: Callable[[Any], None] | None = ProgressBar(sys.stderr, "entries") if sys.stderr.isatty() else None

    def on_failure(failure: Any) -> None:
        if progress is not None:
            sys.stderr.write("\r\x1b[K")
        print(f"refused: {failure}", file=sys.stderr, flush=True)

    engine = make_engine(cfg.database_url)
    publisher = Publisher(engine, conn, Target(endpoint, base), organisation=cfg.server.organisation,
                          full=args.full, dry_run=args.dry_run, progress=progress, on_failure=on_failure)
    stopped: str | None = None
    try:
        try:
            summary = publisher.run()
        except PublishError as exc:
            stopped = str(exc)
            summary = publisher.summary
        finally:
            if progress is not None:
                sys.stderr.write("\r\x1b[K")
            close(conn)
        if not args.dry_run:
            with engine.begin() as db:
                append_in(db, AuditEvent.ADMIN, actor=_actor(), detail={
                    "action": "directory_publish", "target": f"{endpoint.url}/{base}"[:200], "mode": mode,
                    "added": str(summary.added), "modified": str(summary.modified),
                    "deleted": str(summary.deleted), "failed": str(summary.failed),
                    "outcome": "stopped" if stopped else "done"})
    finally:
        engine.dispose()
    _print_publish_summary(summary, sys.stdout)
    sys.stdout.flush()
    if stopped:
        print(f"{prog}: stopped: {stopped}", file=sys.stderr)
        print(f"{prog}: what was sent before is recorded; run it again to carry on", file=sys.stderr)
        return EXIT_REFUSED
    return 0 if summary.ok else 1


def cmd_certificate(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives.serialization import Encoding

    from crypto.validation import CertificateValidator
    from directory.discovery import (
        CertificateDiscovery,
        DiscoveryError,
        DiscoveryNotConfigured,
        InvalidAddress,
        local_encryption_certificates,
        normalise_address,
    )
    from mailserver.db import make_engine

    prog = "caducee directory certificate"
    cfg = config_mod.load(args.state)
    try:
        address = normalise_address(args.address)
    except InvalidAddress as exc:
        print(f"{prog}: {args.address!r}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    try:
        validator = CertificateValidator.from_files(cfg.path(cfg.tls.trust_anchors),
                                                    [cfg.path(p) for p in cfg.tls.crls])
    except (OSError, ValueError) as exc:
        print(f"{prog}: cannot load the trust anchors [tls] trust_anchors: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    engine = make_engine(cfg.database_url)
    try:
        found = local_encryption_certificates(engine, address, validator=validator)
    finally:
        engine.dispose()
    domain = address.rpartition("@")[2]
    source = "the local directory"
    if not found and domain not in cfg.server.domains:
        try:
            ca = cfg.path(Path(cfg.discovery.ca)) if cfg.discovery.ca else cfg.path(cfg.tls.trust_anchors)
            discovery = CertificateDiscovery(cfg.discovery, ca_file=ca, validator=validator)
        except DiscoveryNotConfigured as exc:
            print(f"{prog}: {address} is not a mailbox of this operator and {exc}", file=sys.stderr)
            return EXIT_REFUSED
        source = f"the remote directory {discovery.endpoint}"
        try:
            found = discovery.lookup(address)
        except DiscoveryError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return EXIT_REFUSED
        finally:
            discovery.close()
    if not found:
        print(f"no usable encryption certificate for {address} in {source}", file=sys.stderr)
        return EXIT_NOT_FOUND
    import hashlib

    for cert in found:
        fingerprint = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
        print(f"{address}: {cert.subject.rfc4514_string()} serial {cert.serial_number:X}, valid until "
              f"{cert.not_valid_after_utc:%Y-%m-%d}, SHA-256 {fingerprint} (from {source})", file=sys.stderr)
    pem = b"".join(cert.public_bytes(Encoding.PEM) for cert in found)
    if args.out is not None:
        args.out.write_bytes(pem)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(pem.decode("ascii"))
    return 0


def _limit(text: str) -> int:
    from directory.search import MAX_LIMIT

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 1 <= value <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"expected 1 to {MAX_LIMIT}, got {value}")
    return value


class _RefusedPassword(argparse.Action):
    """`--password` is refused, without echoing its value (argparse would, as an unrecognised argument)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        parser.error(f"--password is not accepted: a password on the command line is visible to every user "
                     f"(ps); use --password-file FILE or ${PUBLISH_PASSWORD_ENV}")


def _seconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"expected 1 to 3600, got {value}")
    return value


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage, got {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"expected 0 to 100, got {text}")
    return value


def register(sub: Any, state_parent: argparse.ArgumentParser) -> None:
    """Add this command group to the `caducee` parser."""
    directory = sub.add_parser(
        "directory", help="the directory of practitioners, organisations and mailboxes",
        description="Import the national open-data files (RPPS/ADELI, MSSanté extraction) and search them.",
    ).add_subparsers(dest="directory_command", metavar="ACTION", required=True)

    p = directory.add_parser(
        "import", parents=[state_parent], help="import national open-data files",
        description="Import PS_LibreAcces_Personne_activite, PS_LibreAcces_SavoirFaire, "
                    "PS_LibreAcces_Dipl_AutExerc and Extraction_Correspondance_MSSante files (UTF-8, "
                    "'|'-separated, recognised by their header, applied in that order). Each file is "
                    "applied in one transaction: what it adds, changes and removes, or nothing. Lines that "
                    "cannot be read are reported with their number and skipped. National mailboxes in this "
                    "server's domains ([server] domains) are hosted here; local mailboxes are never touched.",
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="a national file (any order)")
    p.add_argument("--max-rejected", type=_percent, default=50.0, metavar="PERCENT",
                   help="refuse a file when more than PERCENT of its lines are rejected (default 50)")
    p.set_defaults(func=cmd_import)

    p = directory.add_parser(
        "search", parents=[state_parent], help="search practitioners, organisations and mailboxes",
        description="Every criterion given must hold. Names, professions, specialties and cities match "
                    "by prefix, ignoring accents and case; postcodes by prefix; identifiers and "
                    "addresses exactly. Mailboxes on the liste rouge are never shown.",
    )
    p.add_argument("--name", metavar="N", help="last or first name, or organisation name (prefix)")
    ident = p.add_mutually_exclusive_group()
    ident.add_argument("--rpps", metavar="R", help="RPPS number (11 digits)")
    ident.add_argument("--national-id", metavar="I", help="national id: 8+RPPS, 0+ADELI, 1+FINESS, 3+SIRET…")
    p.add_argument("--profession", metavar="P", help="profession code (10) or label (médecin)")
    p.add_argument("--specialty", metavar="S", help="savoir-faire, diploma or authorisation code (SM53) or label")
    p.add_argument("--postcode", metavar="C", help="postcode of a site (prefix: 75 for Paris)")
    p.add_argument("--city", metavar="C", help="city of a site (prefix)")
    p.add_argument("--mailbox", metavar="ADDR", help="a mailbox address")
    p.add_argument("--type", choices=("PER", "ORG", "APP", "CAB"), type=str.upper, help="holds a mailbox of this type")
    p.add_argument("--limit", type=_limit, default=50, metavar="N", help="at most N entries (default 50)")
    p.add_argument("--json", action="store_true", help="one JSON object per line (= --format json)")
    p.add_argument("--format", choices=("table", "json", "fhir"),
                   help="table (default), JSON lines, or a FHIR R4 searchset Bundle of Practitioner and "
                        "Organization resources (as GET /fhir/… of the admin API)")
    p.set_defaults(func=cmd_search)

    p = directory.add_parser(
        "publish", parents=[state_parent], allow_abbrev=False, help="publish the directory to an OpenLDAP server",
        description="Push the published directory (active persons, organisations, mailboxes not on the "
                    "liste rouge, encryption certificates) to an LDAP server, under --base (default: "
                    "[directory] ldap_base). Only what changed since the last run to that server is sent: "
                    "adds, modifies of the changed attributes, deletes (children first). The bind password "
                    "comes from --password-file or $CADUCEE_LDAP_PASSWORD. ldaps:// and StartTLS verify the "
                    "server against --ca (default: [tls] trust_anchors); plain ldap:// is refused except to a "
                    "loopback address.",
    )
    p.add_argument("url", metavar="URL", help="ldaps://host[:636], or ldap://host[:389] with --starttls")
    p.add_argument("--bind-dn", required=True, metavar="DN", help="DN that may write under the base")
    p.add_argument("--password-file", type=Path, metavar="FILE",
                   help=f"file whose first line is the bind password (else ${PUBLISH_PASSWORD_ENV})")
    p.add_argument("--password", nargs="?", action=_RefusedPassword, help=argparse.SUPPRESS)
    p.add_argument("--base", metavar="DN", help="base DN on the server (default: [directory] ldap_base)")
    p.add_argument("--ca", type=Path, metavar="PEM", help="CA bundle that verifies the server (default: [tls] "
                                                         "trust_anchors)")
    p.add_argument("--starttls", action="store_true", help="ldap:// upgraded with StartTLS before the bind")
    p.add_argument("--full", action="store_true",
                   help="compare with what the server holds (paged read of the subtrees) instead of what was "
                        "published last: repairs changes made on the server")
    p.add_argument("--dry-run", action="store_true", help="bind and compare, print what would change, change nothing")
    p.add_argument("--timeout", type=_seconds, default=30, metavar="S",
                   help="seconds to wait for the server at most, per operation (default 30)")
    p.set_defaults(func=cmd_publish)

    p = directory.add_parser(
        "certificate", parents=[state_parent], help="find the encryption certificate of a mailbox",
        description="Print the encryption certificates of ADDRESS (PEM): valid now, keyEncipherment, chained "
                    "to [tls] trust_anchors and not revoked. This operator's mailboxes are looked up in the "
                    "local directory; others in the remote directory of [discovery] url.",
    )
    p.add_argument("address", metavar="ADDRESS", help="a mailbox address")
    p.add_argument("--out", type=Path, metavar="FILE.pem", help="write the certificates there instead of stdout")
    p.set_defaults(func=cmd_certificate)
