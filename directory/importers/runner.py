"""Import one national file: read it once, stage it, apply the difference in one transaction.

1. The header tells the file kind and where each column is (`formats.parse_header`); a file whose header
   is unknown, undecodable or lacks a needed column is refused before anything is written.
2. Lines are read one at a time (constant memory), as bytes: a BOM is tolerated, an undecodable line or
   a line with the wrong number of fields is rejected with its number; each good line becomes staging
   rows (`parsers`), written in batches to temporary tables (`staging`). Nothing in the directory changes.
3. If enough lines are usable, the difference is applied in ONE transaction (`apply`): it either commits
   whole or changes nothing. The transaction starts with a write (the `directory_imports` row), so that on
   SQLite it holds the write lock from its first statement and never has to upgrade a read snapshot.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from directory.importers import apply, staging
from directory.importers.apply import EntityCounts
from directory.importers.formats import FileKind, FormatError, Header, parse_header
from directory.importers.parsers import (
    ActivityParser,
    Issue,
    MailboxParser,
    Parser,
    Report,
    SkillParser,
)
from directory.schema import directory_imports

DEFAULT_BATCH_SIZE = 5000
DEFAULT_MAX_REJECTED_RATIO = 0.5
PROGRESS_EVERY = 1 << 14  # lines
FLUSH_EVERY = 1 << 10  # lines between two checks of the staging batches
_PG_IMPORT_LOCK = 7223372037  # pg_advisory_xact_lock key: one directory import at a time


class DirectoryImportError(Exception):
    """The file cannot be imported at all; the directory is unchanged."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class ImportProgress:
    """Where an import stands: `phase` is "reading", then "indexing", "applying" and "done"."""

    phase: str
    bytes_done: int
    bytes_total: int
    lines: int
    elapsed: float

    @property
    def fraction(self) -> float:
        return self.bytes_done / self.bytes_total if self.bytes_total else 1.0


@dataclass
class ImportSummary:
    """What one file did: lines read, rejected lines and warnings (with the first ones), per-entity counts."""

    path: Path
    kind: FileKind
    lines: int = 0
    rejected: int = 0
    warnings: int = 0
    errors: list[Issue] = field(default_factory=list)
    warning_samples: list[Issue] = field(default_factory=list)
    entities: dict[str, EntityCounts] = field(default_factory=dict)
    principals_created: int = 0
    ignored_columns: tuple[str, ...] = ()
    elapsed: float = 0.0
    import_id: int | None = None

    @property
    def added(self) -> int:
        return sum(c.added for c in self.entities.values())

    @property
    def changed(self) -> int:
        return sum(c.changed for c in self.entities.values())

    @property
    def removed(self) -> int:
        return sum(c.removed for c in self.entities.values())


ProgressCallback = Callable[[ImportProgress], None]
AppliedHook = Callable[[sa.Connection, ImportSummary], None]


def read_header(path: Path, kind: FileKind | None = None) -> Header:
    """The parsed header of `path`; raises `DirectoryImportError` when the file is not a national file."""
    try:
        with open(path, "rb") as fh:
            raw = fh.readline()
    except OSError as exc:
        raise DirectoryImportError(path, f"cannot read the file: {exc.strerror or exc}") from None
    return _parse_header(path, raw, kind)


def _parse_header(path: Path, raw: bytes, kind: FileKind | None) -> Header:
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    if not raw.strip():
        raise DirectoryImportError(path, "the file is empty (no header line)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DirectoryImportError(
            path, f"the header is not UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1})") from None
    try:
        return parse_header(text, kind)
    except FormatError as exc:
        raise DirectoryImportError(path, str(exc)) from None


def detect(path: Path) -> FileKind:
    """The kind of national file at `path`, from its header."""
    return read_header(path).kind


def import_order(paths: Iterable[Path]) -> list[tuple[Path, FileKind | DirectoryImportError]]:
    """Detect each file and sort them in the order they must be applied (practitioners before their
    skills, mailboxes last); unreadable files come first, with their error."""
    detected: list[tuple[Path, FileKind | DirectoryImportError]] = []
    for path in paths:
        try:
            detected.append((path, detect(path)))
        except DirectoryImportError as exc:
            detected.append((path, exc))
    return sorted(detected, key=lambda item: -1 if isinstance(item[1], DirectoryImportError) else item[1].order)


def _tables(kind: FileKind) -> Sequence[sa.Table]:
    if kind is FileKind.ACTIVITY:
        return (staging.stg_practitioners, staging.stg_organisations, staging.stg_activities, staging.stg_skills)
    if kind is FileKind.MSSANTE:
        return (staging.stg_mailboxes,)
    return (staging.stg_skills,)


def _parser(header: Header, report: Report, loaders: dict[str, staging.BulkLoader],
            local_domains: frozenset[str]) -> Parser:
    if header.kind is FileKind.ACTIVITY:
        return ActivityParser(header, report, loaders)
    if header.kind is FileKind.MSSANTE:
        return MailboxParser(header, report, loaders, local_domains)
    return SkillParser(header, report, loaders)


def import_file(
    engine: sa.Engine,
    path: Path,
    *,
    kind: FileKind | None = None,
    local_domains: Iterable[str] = (),
    progress: ProgressCallback | None = None,
    on_applied: AppliedHook | None = None,
    max_rejected_ratio: float = DEFAULT_MAX_REJECTED_RATIO,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> ImportSummary:
    """Import one national file into the directory at `engine` and return what it did.

    `kind` forces the file kind (else it is detected from the header). `local_domains` are this
    operator's mail domains: national mailboxes in them are hosted here (they log in and receive mail
    here); the others are only published. `on_applied(conn, summary)` runs inside the import
    transaction, after the changes (to write an audit entry that commits with them). The import is
    refused, and nothing changes, when no line is usable or when more than `max_rejected_ratio` of the
    lines are rejected (the wrong file, most likely): applying it would remove most of the directory.

    Raises `DirectoryImportError` when the file cannot be imported at all; database errors propagate
    (the transaction is rolled back).
    """
    started = time.monotonic()
    path = Path(path)
    try:
        total = os.path.getsize(path)
        fh = open(path, "rb")
    except OSError as exc:
        raise DirectoryImportError(path, f"cannot read the file: {exc.strerror or exc}") from None
    domains = frozenset(d.strip().lower() for d in local_domains if d.strip())
    report = Report()

    def tell(phase: str, done: int, lines: int) -> None:
        if progress is not None:
            progress(ImportProgress(phase, done, total, lines, time.monotonic() - started))

    with fh:
        first = fh.readline()
        header = _parse_header(path, first, kind)
        summary = ImportSummary(path=path, kind=header.kind, ignored_columns=header.ignored)
        tables = _tables(header.kind)
        with engine.connect() as conn:
            _tune_connection(conn)
            try:
                with conn.begin():
                    _tune_transaction(conn)
                    staging.create(conn, tables)
                    loaders = {t.name: staging.BulkLoader(conn, t, batch_size) for t in tables}
                    parser = _parser(header, report, loaders, domains)
                    summary.lines, done = _read(fh, header.width, parser, report, len(first), tell)
                    parser.finish()
                    tell("indexing", done, summary.lines)
                    for table in tables:
                        staging.index(conn, table)
                    if header.kind is FileKind.MSSANTE:
                        for line_no, address, first_line in staging.duplicates(conn, staging.stg_mailboxes):
                            report.reject(line_no, f"mailbox {address} already listed on line {first_line}")
                    for table in tables:
                        staging.dedupe(conn, table)
                        staging.analyze(conn, table)
                _check_usable(path, summary.lines, report, max_rejected_ratio)
                tell("applying", done, summary.lines)
                with conn.begin():
                    _tune_transaction(conn)
                    _apply(conn, header, report, summary, started, on_applied)
            except BaseException:
                _discard_staging(conn, tables)
                raise
            _discard_staging(conn, tables)
    summary.rejected, summary.warnings = report.rejected, report.warnings
    summary.errors = sorted(report.errors, key=lambda i: i.line)
    summary.warning_samples = sorted(report.warning_samples, key=lambda i: i.line)
    summary.elapsed = time.monotonic() - started
    tell("done", total, summary.lines)
    return summary


def _tune_connection(conn: sa.Connection) -> None:
    """SQLite: larger page caches while importing (the staging tables are sorted in the temporary
    database, the target indexes grow in the main one). The connection is discarded at the end of the
    import (`_discard_staging`), so the pool never hands these settings out."""
    if conn.dialect.name == "sqlite":
        driver = conn.connection.dbapi_connection
        assert driver is not None
        # On the driver's connection, outside any transaction (where "synchronous" cannot change).
        driver.execute("PRAGMA temp.cache_size = -262144")  # KiB: 256 MiB at most
        driver.execute("PRAGMA main.cache_size = -524288")  # 512 MiB at most
        # WAL + NORMAL: the import commits atomically and consistently, without waiting for an fsync of
        # the whole write-ahead log (a power cut right after it may lose the import, never half of it).
        driver.execute("PRAGMA synchronous = NORMAL")


def _tune_transaction(conn: sa.Connection) -> None:
    """PostgreSQL: sorts, hash joins and index builds in memory, for this transaction only."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET LOCAL work_mem = '128MB'")
        conn.exec_driver_sql("SET LOCAL maintenance_work_mem = '256MB'")


def _discard_staging(conn: sa.Connection, tables: Sequence[sa.Table]) -> None:
    """Get rid of the staging tables. SQLite: close the connection, which deletes its temporary database
    at once (dropping gigabytes of temporary tables page by page takes seconds) and its import-time page
    cache settings with it. PostgreSQL: drop them. If that fails, the connection is discarded."""
    if conn.dialect.name == "sqlite":
        conn.invalidate()
        return
    try:
        if conn.in_transaction():
            conn.rollback()
        with conn.begin():
            staging.drop(conn, tables)
    except sa.exc.SQLAlchemyError:
        conn.invalidate()


def _read(fh: Iterable[bytes], width: int, parser: Parser, report: Report, done: int,
          tell: Callable[[str, int, int], None]) -> tuple[int, int]:
    """Feed every data line to `parser`; return (data lines read, bytes read)."""
    lines = 0
    line_no = 1
    feed = parser.feed
    for raw in fh:
        line_no += 1
        done += len(raw)
        if line_no % FLUSH_EVERY == 0:
            parser.flush_if_full()
            if line_no % PROGRESS_EVERY == 0:
                tell("reading", done, lines)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            lines += 1
            report.reject(line_no, f"not valid UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1})")
            continue
        text = text.rstrip("\r\n")
        if not text or text.isspace():
            continue
        lines += 1
        parts = text.split("|")
        count = len(parts)
        if count == width:
            parts.append("")  # no trailing `|`: add the empty field that absent columns read
        elif count != width + 1 or parts[-1]:
            found = count - 1 if text.endswith("|") else count
            report.reject(line_no, f"{found} fields instead of {width}")
            continue
        feed(line_no, parts)
    return lines, done


def _check_usable(path: Path, lines: int, report: Report, max_rejected_ratio: float) -> None:
    if lines == report.rejected:
        first = f" (line {report.errors[0].line}: {report.errors[0].message})" if report.errors else ""
        raise DirectoryImportError(path, f"no usable line among {lines}{first}: nothing imported")
    if report.rejected > lines * max_rejected_ratio:
        raise DirectoryImportError(
            path, f"{report.rejected} of {lines} lines rejected (more than {max_rejected_ratio:.0%}): "
                  f"nothing imported; first: line {report.errors[0].line}: {report.errors[0].message}")


def _apply(conn: sa.Connection, header: Header, report: Report, summary: ImportSummary, started: float,
           on_applied: AppliedHook | None) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    conn.execution_options(preserve_rowcount=True)  # counts of INSERT … SELECT (kept on every backend)
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_IMPORT_LOCK)))
    import_id = conn.execute(sa.insert(directory_imports).values(
        kind=header.kind.value, file_name=summary.path.name[:255], started_at=now, lines=summary.lines,
    )).inserted_primary_key[0]  # type: ignore[index]
    if header.kind is FileKind.ACTIVITY:
        applied = apply.apply_activity(conn, report, now, with_skills=header.has("sf_code"))
    elif header.kind is FileKind.MSSANTE:
        applied = apply.apply_mailboxes(conn, report, now)
    else:
        applied = apply.apply_skills(conn, report, now, "savoir_faire" if header.kind is FileKind.SAVOIR_FAIRE
                                     else "diploma")
    summary.entities = applied.entities
    summary.principals_created = applied.principals_created
    summary.rejected, summary.warnings = report.rejected, report.warnings
    summary.import_id = int(import_id)
    summary.elapsed = time.monotonic() - started
    conn.execute(sa.update(directory_imports).where(directory_imports.c.id == import_id).values(
        finished_at=dt.datetime.now(dt.timezone.utc), added=summary.added, changed=summary.changed,
        removed=summary.removed, rejected=summary.rejected, warnings=summary.warnings,
    ))
    if on_applied is not None:
        on_applied(conn, summary)
