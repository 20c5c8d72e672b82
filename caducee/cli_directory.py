"""`caducee directory …`: the directory of practitioners, organisations and mailboxes.

    caducee directory import FILE… [--max-rejected PERCENT] [--state DIR]
    caducee directory search [--name N] [--rpps R | --national-id I] [--profession P] [--specialty S]
                             [--postcode C] [--city C] [--mailbox ADDR] [--type PER|ORG|APP|CAB]
                             [--limit N] [--json] [--state DIR]

`import` reads the national open-data files (REFERENCE.md §4): PS_LibreAcces_Personne_activite,
PS_LibreAcces_SavoirFaire, PS_LibreAcces_Dipl_AutExerc and Extraction_Correspondance_MSSante, each
recognised by its header and applied in that order whatever the order given. Each file is applied in one
transaction: the difference with the directory (added, changed, removed), or nothing. It prints each
file's kind and summary; a progress bar goes to standard error when it is a terminal. Exit status 0 when
every file was applied (even with rejected lines), 2 when a file could not be imported at all (the
reason is printed on standard error; the other files are still imported).

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
    """A one-line progress bar (percent of bytes read, lines, lines/s), redrawn at most 5 times a second."""

    WIDTH = 30

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._last = 0.0

    def __call__(self, progress: Any) -> None:
        now = time.monotonic()
        if progress.phase == "reading" and now - self._last < 0.2:
            return
        self._last = now
        filled = int(progress.fraction * self.WIDTH)
        rate = progress.lines / progress.elapsed if progress.elapsed > 0 else 0.0
        text = (f"\r  {progress.phase:<9} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {progress.fraction:4.0%}  "
                f"{progress.lines:,} lines  {rate:,.0f} lines/s")
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
    if args.json:
        for entry in entries:
            print(json.dumps(to_jsonable(entry), ensure_ascii=False))
    else:
        _print_table(_table(entries), sys.stdout)
    if len(entries) == args.limit:
        print(f"(the first {args.limit}; --limit N for more)", file=sys.stderr)
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
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_search)
