"""Import one national file: read it once, stage it, apply the difference in one transaction.

1. The header tells the file kind and where each column is (`formats.parse_header`); a file whose header
   is unknown, undecodable or lacks a needed column is refused before anything is written.
2. Lines are read one at a time (memory stays bounded whatever the file size), as bytes: a BOM is
   tolerated, an undecodable line or a line with the wrong number of fields is rejected with its number;
   each good line becomes staging rows (`parsers`), written in batches of a few thousand to temporary
   tables (`staging`). A large file is read on two cores (`parallel`). Nothing in the directory changes,
   and on SQLite no write lock is taken: the mail server keeps writing meanwhile.
3. If enough lines are usable, the difference is found by a read-only pass over the directory (`plan_*`)
   and applied in ONE transaction (`apply_*`): it either commits whole or changes nothing. The transaction
   starts with a write (the `directory_imports` row), so that on SQLite it holds the write lock from its
   first statement and never has to upgrade a read snapshot; it then checks that no other import was
   applied since the plan. The mail server's writes wait for it (SQLite allows one writer; the server
   waits up to 30 s): a re-import of the whole France file, which changes little, writes in seconds, but
   a first import writes everything (about a minute for 2 million lines on two cores): make the first
   import before opening the service, or use PostgreSQL, where readers and writers never wait for it.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from directory.importers import apply, parallel, staging
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
    """Where an import stands: `phase` is "reading", "merging" (a large file read on two cores),
    "indexing", "planning" (finding the difference), "applying" (writing it), then "done"."""

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


def staging_tables(kind: FileKind) -> Sequence[sa.Table]:
    """The staging tables a file kind fills."""
    if kind is FileKind.ACTIVITY:
        return (staging.stg_practitioners, staging.stg_organisations, staging.stg_activities, staging.stg_skills)
    if kind is FileKind.MSSANTE:
        return (staging.stg_mailboxes,)
    return (staging.stg_skills,)


def make_parser(header: Header, report: Report, loaders: dict[str, staging.BulkLoader],
                local_domains: frozenset[str]) -> Parser:
    """The parser of a file kind, writing to `loaders` (one per staging table)."""
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
    parallel_parse: bool | None = None,
) -> ImportSummary:
    """Import one national file into the directory at `engine` and return what it did.

    `kind` forces the file kind (else it is detected from the header). `local_domains` are this
    operator's mail domains: national mailboxes in them are hosted here (they log in and receive mail
    here); the others are only published. `on_applied(conn, summary)` runs inside the import
    transaction, after the changes (to write an audit entry that commits with them). The import is
    refused, and nothing changes, when no line is usable or when more than `max_rejected_ratio` of the
    lines are rejected (the wrong file, most likely): applying it would remove most of the directory.

    A file of more than `parallel.PARALLEL_MIN_BYTES` is parsed on two cores when there are two
    (`parallel_parse` None); True forces it whatever the size, False keeps it in this process.

    Raises `DirectoryImportError` when the file cannot be imported at all; database errors propagate
    (the transaction is rolled back).
    """
    started = time.monotonic()
    path = Path(path)
    header = read_header(path, kind)
    total = os.path.getsize(path)
    domains = frozenset(d.strip().lower() for d in local_domains if d.strip())
    report = Report()

    def tell(phase: str, done: int, lines: int) -> None:
        if progress is not None:
            progress(ImportProgress(phase, done, total, lines, time.monotonic() - started))

    with open(path, "rb") as fh:
        first = fh.readline()
        header_text = (first[3:] if first.startswith(b"\xef\xbb\xbf") else first).decode("utf-8")
        summary = ImportSummary(path=path, kind=header.kind, ignored_columns=header.ignored)
        tables = staging_tables(header.kind)
        half = None if parallel_parse is False else parallel.second_half(
            path, len(first), total, force=bool(parallel_parse))
        with engine.connect() as conn, tempfile.TemporaryDirectory(prefix="caducee-import-") as scratch_dir:
            _tune_connection(conn)
            scratch = Path(scratch_dir) / "part.db"
            worker = None
            try:
                if half is not None:
                    worker = parallel.start_worker(path, half, header.kind, header_text, domains, scratch,
                                                   batch_size)

                def tell_reading(phase: str, done: int, lines: int) -> None:
                    tell(phase, done + (worker[2].value if worker is not None else 0), lines)

                with conn.begin():
                    _tune_transaction(conn)
                    staging.create(conn, tables)
                    loaders = {t.name: staging.BulkLoader(conn, t, batch_size) for t in tables}
                    parser = make_parser(header, report, loaders, domains)
                    summary.lines, done = read_lines(fh, header.width, parser, report, len(first), tell_reading,
                                                     end=half.start if half else None)
                    parser.finish()
                if worker is not None:
                    process, receiver, worker_done = worker
                    part = parallel.wait(process, receiver,
                                         lambda: tell("reading", done + worker_done.value, summary.lines))
                    worker = None
                    summary.lines += part.lines
                    report.merge(part.report)
                    done = total
                    tell("merging", done, summary.lines)
                    parallel.merge_into(conn, scratch, tables, batch_size)
                tell("indexing", done, summary.lines)
                with conn.begin():
                    _tune_transaction(conn)
                    for table in tables:
                        staging.index(conn, table)
                    if header.kind is FileKind.MSSANTE:
                        for line_no, address, first_line in staging.duplicates(conn, staging.stg_mailboxes):
                            report.reject(line_no, f"mailbox {address} already listed on line {first_line}")
                    for table in tables:
                        staging.dedupe(conn, table)
                        staging.analyze(conn, table)
                    _check_usable(path, summary.lines, report, max_rejected_ratio)
                    tell("planning", done, summary.lines)
                    plan = _plan(conn, header, report)
                tell("applying", done, summary.lines)
                with conn.begin():
                    _tune_transaction(conn)
                    _apply(conn, header, report, summary, started, on_applied, plan)
            except BaseException:
                if worker is not None:
                    parallel.stop(worker[0])
                _discard_staging(conn, (*tables, staging.stg_gone))
                raise
            _discard_staging(conn, (*tables, staging.stg_gone))
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
        driver.execute(f"PRAGMA threads = {parallel.cores()}")  # sorts (index builds) on every core
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


def read_lines(fh: Iterable[bytes], width: int, parser: Parser, report: Report, done: int,
               tell: Callable[[str, int, int], None], *, first_line: int = 2,
               end: int | None = None) -> tuple[int, int]:
    """Feed every data line to `parser`, from the current position of `fh` (whose offset is `done`)
    to the offset `end` (a line start) or the end of the file; `first_line` is the number of the
    first line read. Returns (data lines read, offset reached)."""
    lines = 0
    line_no = first_line - 1
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
        else:
            text = text.rstrip("\r\n")
            if text and not text.isspace():
                lines += 1
                parts = text.split("|")
                count = len(parts)
                if "\x00" in text:  # PostgreSQL text cannot hold it: the COPY of the whole import would fail
                    report.reject(line_no, f"NUL character at column {text.index(chr(0)) + 1}")
                elif count == width:
                    parts.append("")  # no trailing `|`: add the empty field that absent columns read
                    feed(line_no, parts)
                elif count == width + 1 and not parts[-1]:
                    feed(line_no, parts)
                else:
                    found = count - 1 if text.endswith("|") else count
                    report.reject(line_no, f"{found} fields instead of {width}")
        if end is not None and done >= end:
            break
    return lines, done


def _check_usable(path: Path, lines: int, report: Report, max_rejected_ratio: float) -> None:
    if lines == report.rejected:
        first = f" (line {report.errors[0].line}: {report.errors[0].message})" if report.errors else ""
        raise DirectoryImportError(path, f"no usable line among {lines}{first}: nothing imported")
    if report.rejected > lines * max_rejected_ratio:
        raise DirectoryImportError(
            path, f"{report.rejected} of {lines} lines rejected (more than {max_rejected_ratio:.0%}): "
                  f"nothing imported; first: line {report.errors[0].line}: {report.errors[0].message}")


def _source(kind: FileKind) -> str:
    return "savoir_faire" if kind is FileKind.SAVOIR_FAIRE else "diploma"


def _plan(conn: sa.Connection, header: Header, report: Report) -> apply.Plan:
    """Find the difference (read-only over the directory)."""
    now = dt.datetime.now(dt.UTC)
    if header.kind is FileKind.ACTIVITY:
        return apply.plan_activity(conn, now, with_skills=header.has("sf_code"))
    if header.kind is FileKind.MSSANTE:
        return apply.Plan(apply.last_import_id(conn))  # compared and written in the write transaction
    return apply.plan_skills(conn, report, now, _source(header.kind))


def _apply(conn: sa.Connection, header: Header, report: Report, summary: ImportSummary, started: float,
           on_applied: AppliedHook | None, plan: apply.Plan) -> None:
    now = dt.datetime.now(dt.UTC)
    conn.execution_options(preserve_rowcount=True)  # counts of INSERT … SELECT (kept on every backend)
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_IMPORT_LOCK)))
    import_id = conn.execute(sa.insert(directory_imports).values(
        kind=header.kind.value, file_name=summary.path.name[:255], started_at=now, lines=summary.lines,
    )).inserted_primary_key[0]  # type: ignore[index]
    meanwhile = conn.execute(sa.select(sa.func.count()).select_from(directory_imports).where(
        directory_imports.c.id > plan.after_import, directory_imports.c.id != import_id)).scalar_one()
    if meanwhile:
        raise DirectoryImportError(summary.path, "another import was applied while this one was being prepared; "
                                                 "nothing imported: run it again")
    if header.kind is FileKind.ACTIVITY:
        applied = apply.apply_activity(conn, plan, report, now, with_skills=header.has("sf_code"))
    elif header.kind is FileKind.MSSANTE:
        applied = apply.apply_mailboxes(conn, report, now)
    else:
        applied = apply.apply_skills(conn, plan, now, _source(header.kind))
    summary.entities = applied.entities
    summary.principals_created = applied.principals_created
    summary.rejected, summary.warnings = report.rejected, report.warnings
    summary.import_id = int(import_id)
    summary.elapsed = time.monotonic() - started
    conn.execute(sa.update(directory_imports).where(directory_imports.c.id == import_id).values(
        finished_at=dt.datetime.now(dt.UTC), added=summary.added, changed=summary.changed,
        removed=summary.removed, rejected=summary.rejected, warnings=summary.warnings,
    ))
    if on_applied is not None:
        on_applied(conn, summary)
